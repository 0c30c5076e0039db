//! Identifiers. A [`CacheId`] names the bytes of one version of one object:
//! cached pages are keyed by it, so a changed object (new fingerprint) can
//! never be served from the old pages, and the same UFS object mounted at two
//! namespace paths shares one cached copy.

use std::fmt;

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_128;

/// Inode number in the namespace. The root is 1.
pub type InodeId = u64;

/// A worker's stable identity (persisted in its cache directory, so a restart
/// keeps the same rendezvous placement).
pub type WorkerId = u64;

/// Identity of one immutable version of a file's bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CacheId(pub u128);

impl CacheId {
    /// Bytes that live in (or came from) the UFS: the canonical object URI
    /// (see `strata_ufs::UfsUri::object_identity`) and its fingerprint.
    pub fn for_ufs_object(object_identity: &str, fingerprint: &str) -> Self {
        let mut buf = Vec::with_capacity(object_identity.len() + fingerprint.len() + 8);
        buf.extend_from_slice(b"ufs\0");
        buf.extend_from_slice(object_identity.as_bytes());
        buf.push(0);
        buf.extend_from_slice(fingerprint.as_bytes());
        CacheId(xxh3_128(&buf))
    }

    /// Bytes written through Strata that have no UFS copy (MUST_CACHE).
    pub fn for_inode(inode: InodeId, generation: u64) -> Self {
        let mut buf = [0u8; 20];
        buf[..4].copy_from_slice(b"ino\0");
        buf[4..12].copy_from_slice(&inode.to_le_bytes());
        buf[12..].copy_from_slice(&generation.to_le_bytes());
        CacheId(xxh3_128(&buf))
    }

    pub fn to_hex(self) -> String {
        format!("{:032x}", self.0)
    }

    pub fn from_hex(s: &str) -> Option<Self> {
        if s.len() != 32 {
            return None;
        }
        u128::from_str_radix(s, 16).ok().map(CacheId)
    }
}

impl fmt::Debug for CacheId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CacheId({})", self.to_hex())
    }
}

impl fmt::Display for CacheId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// One cached page: the unit of caching and of UFS I/O.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize, Deserialize)]
pub struct PageKey {
    pub cache_id: CacheId,
    pub block: u64,
    /// Page index inside its block.
    pub page: u32,
}

/// The placement key of a block: what rendezvous hashing ranks workers by.
pub fn block_placement_key(cache_id: CacheId, block: u64) -> u64 {
    let mut buf = [0u8; 24];
    buf[..16].copy_from_slice(&cache_id.0.to_le_bytes());
    buf[16..].copy_from_slice(&block.to_le_bytes());
    xxhash_rust::xxh3::xxh3_64(&buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn identities_differ_by_fingerprint_and_roundtrip() {
        let a = CacheId::for_ufs_object("s3://h/b/k", "etag1");
        let b = CacheId::for_ufs_object("s3://h/b/k", "etag2");
        assert_ne!(a, b);
        assert_eq!(CacheId::from_hex(&a.to_hex()), Some(a));
        assert_ne!(CacheId::for_inode(1, 1), CacheId::for_inode(1, 2));
    }
}
