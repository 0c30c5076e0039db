//! Extended attributes of inodes, kept in the inode's attribute record.

use serde::{Deserialize, Serialize};
use strata_common::InodeId;

use crate::MetaError;
use crate::store::Tables;

pub use strata_common::xattr::{
    NAME_MAX as XATTR_NAME_MAX, TOTAL_MAX as XATTR_TOTAL_MAX, VALUE_MAX as XATTR_VALUE_MAX,
};

/// How `SetXattrs` treats names that exist or not (as `setxattr(2)` flags).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum XattrFlag {
    /// Set creates or replaces; remove ignores missing names.
    #[default]
    Any,
    /// Set fails (`Exists`) when a name is already present.
    Create,
    /// Set and remove fail (`NoXattr`) when a name is missing.
    Replace,
}

/// Checks one name and value against the limits.
pub fn check_xattr(name: &str, value: Option<&[u8]>) -> Result<(), MetaError> {
    if name.is_empty() || name.len() > XATTR_NAME_MAX || name.contains('\0') {
        return Err(MetaError::Invalid(format!(
            "extended attribute name {name:?} must be 1..={XATTR_NAME_MAX} bytes without NUL"
        )));
    }
    if let Some(v) = value
        && v.len() > XATTR_VALUE_MAX
    {
        return Err(MetaError::Invalid(format!(
            "extended attribute {name:?}: value of {} bytes is above {XATTR_VALUE_MAX}",
            v.len()
        )));
    }
    Ok(())
}

/// Checks a whole set of attributes (names, values and their total size).
pub fn check_xattr_set(set: &[(String, Vec<u8>)]) -> Result<(), MetaError> {
    for (n, v) in set {
        check_xattr(n, Some(v))?;
    }
    let t: usize = set.iter().map(|(k, v)| k.len() + v.len()).sum();
    if t > XATTR_TOTAL_MAX {
        return Err(MetaError::Invalid(format!(
            "extended attributes of {t} bytes are above the {XATTR_TOTAL_MAX} allowed per file"
        )));
    }
    Ok(())
}

fn total(x: &std::collections::BTreeMap<String, Vec<u8>>) -> usize {
    x.iter().map(|(k, v)| k.len() + v.len()).sum()
}

impl Tables<'_> {
    /// Sets and removes extended attributes of one inode, all or nothing.
    pub(crate) fn set_xattrs(
        &mut self,
        id: InodeId,
        set: &[(String, Vec<u8>)],
        remove: &[String],
        flag: XattrFlag,
    ) -> Result<(), MetaError> {
        self.get_inode(id)?;
        let mut a = self.attrs_of(id)?;
        for n in remove {
            check_xattr(n, None)?;
            if a.xattrs.remove(n).is_none() && flag == XattrFlag::Replace {
                return Err(MetaError::NoXattr(n.clone()));
            }
        }
        for (n, v) in set {
            check_xattr(n, Some(v))?;
            let had = a.xattrs.contains_key(n);
            match flag {
                XattrFlag::Create if had => return Err(MetaError::Exists(n.clone())),
                XattrFlag::Replace if !had => return Err(MetaError::NoXattr(n.clone())),
                _ => {}
            }
            a.xattrs.insert(n.clone(), v.clone());
        }
        let t = total(&a.xattrs);
        if t > XATTR_TOTAL_MAX {
            return Err(MetaError::Invalid(format!(
                "inode {id}: extended attributes would take {t} bytes, above {XATTR_TOTAL_MAX}"
            )));
        }
        self.set_attrs_raw(id, &a)
    }

    /// Replaces every extended attribute of a file (a new object's
    /// metadata); the set was checked with [`check_xattr_set`].
    pub(crate) fn replace_xattrs(
        &mut self,
        id: InodeId,
        set: &[(String, Vec<u8>)],
    ) -> Result<(), MetaError> {
        let mut a = self.attrs_of(id)?;
        a.xattrs = set.iter().cloned().collect();
        self.set_attrs_raw(id, &a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Command, MetaStore, PersistState, ROOT_ID};

    fn file(s: &MetaStore) -> InodeId {
        s.apply(&Command::CreateFile {
            parent: ROOT_ID,
            name: "f".into(),
            mtime_ms: 1,
            persist: PersistState::NotPersisted,
            overwrite: false,
        })
        .unwrap()
        .inode
        .unwrap()
    }

    fn set(id: InodeId, n: &str, v: &[u8], flag: XattrFlag) -> Command {
        Command::SetXattrs {
            id,
            set: vec![(n.into(), v.to_vec())],
            remove: vec![],
            flag,
        }
    }

    #[test]
    fn xattrs_follow_setxattr_flags_and_survive_other_attribute_changes() {
        let d = tempfile::tempdir().unwrap();
        let s = MetaStore::open(d.path()).unwrap();
        let f = file(&s);
        s.apply(&set(f, "user.a", b"1", XattrFlag::Create)).unwrap();
        assert!(matches!(
            s.apply(&set(f, "user.a", b"2", XattrFlag::Create)),
            Err(MetaError::Exists(_))
        ));
        assert!(matches!(
            s.apply(&set(f, "user.b", b"2", XattrFlag::Replace)),
            Err(MetaError::NoXattr(_))
        ));
        s.apply(&set(f, "user.a", b"3", XattrFlag::Replace))
            .unwrap();
        // A TTL/pin change built from an older record keeps the xattrs.
        s.apply(&Command::SetAttrs {
            id: f,
            attrs: crate::Attrs {
                pinned: true,
                ..Default::default()
            },
        })
        .unwrap();
        let a = s.attrs(f).unwrap();
        assert!(a.pinned);
        assert_eq!(a.xattrs.get("user.a").unwrap(), b"3");
        // Limits: a value above 64 KiB, an empty name, and a total above
        // 64 KiB are refused and change nothing.
        let big = vec![0u8; XATTR_VALUE_MAX + 1];
        assert!(s.apply(&set(f, "user.big", &big, XattrFlag::Any)).is_err());
        assert!(s.apply(&set(f, "", b"x", XattrFlag::Any)).is_err());
        let half = vec![0u8; XATTR_TOTAL_MAX / 2];
        s.apply(&set(f, "user.h1", &half, XattrFlag::Any)).unwrap();
        assert!(s.apply(&set(f, "user.h2", &half, XattrFlag::Any)).is_err());
        assert!(!s.attrs(f).unwrap().xattrs.contains_key("user.h2"));
        // Removal: missing names are errors only with Replace.
        let rm = |n: &str, flag| Command::SetXattrs {
            id: f,
            set: vec![],
            remove: vec![n.into()],
            flag,
        };
        s.apply(&rm("user.none", XattrFlag::Any)).unwrap();
        assert!(matches!(
            s.apply(&rm("user.none", XattrFlag::Replace)),
            Err(MetaError::NoXattr(_))
        ));
        s.apply(&rm("user.h1", XattrFlag::Replace)).unwrap();
        // Completing a file with metadata replaces the whole set.
        s.apply(&Command::CompleteFile {
            id: f,
            generation: s.inode(f).unwrap().unwrap().generation,
            size: 0,
            fingerprint: String::new(),
            mtime_ms: 2,
            xattrs: Some(vec![("user.s3.meta.k".into(), b"v".to_vec())]),
        })
        .unwrap();
        let a = s.attrs(f).unwrap();
        assert_eq!(a.xattrs.len(), 1);
        assert!(a.pinned);
        // They go with the inode, and with a snapshot.
        let (snap, _) = s.export().unwrap();
        let d2 = tempfile::tempdir().unwrap();
        let s2 = MetaStore::open(d2.path()).unwrap();
        s2.import(&snap).unwrap();
        assert_eq!(s2.attrs(f).unwrap(), a);
        s.apply(&Command::Delete { id: f }).unwrap();
        assert!(s.all_attrs().unwrap().is_empty());
    }

    #[test]
    fn attribute_records_stored_before_xattrs_still_decode() {
        #[derive(Serialize)]
        struct V1 {
            ttl: Option<crate::Ttl>,
            pinned: bool,
            inode_cache_id: bool,
            replication_min: u8,
            replication_max: u8,
        }
        let b = postcard::to_allocvec(&V1 {
            ttl: None,
            pinned: true,
            inode_cache_id: true,
            replication_min: 2,
            replication_max: 3,
        })
        .unwrap();
        let a = crate::jobs::decode_attrs(&b).unwrap();
        assert!(a.pinned && a.inode_cache_id && a.xattrs.is_empty());
        assert_eq!((a.replication_min, a.replication_max), (2, 3));
    }
}
