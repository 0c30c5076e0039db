//! Short-circuit reads: a client on the same host as a page's worker reads
//! the cached page file directly instead of over TCP. The worker says which
//! files hold verified pages (`Locate`); open files are kept (a few hundred)
//! and dropped when the worker has deleted them (evicted or moved), after
//! which the page is located again or read over the network.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use strata_common::ids::PageKey;

/// Open page files kept per client.
const MAX_OPEN: usize = 256;

#[derive(Default)]
pub(crate) struct ShortCircuit {
    files: Mutex<HashMap<PageKey, Arc<std::fs::File>>>,
}

/// True if a worker at `addr` runs on this host (loopback address).
pub(crate) fn is_local(addr: &str) -> bool {
    addr.parse::<SocketAddr>()
        .map(|a| match a.ip() {
            IpAddr::V4(v) => v.is_loopback(),
            IpAddr::V6(v) => v.is_loopback(),
        })
        .unwrap_or(false)
}

impl ShortCircuit {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PageKey, Arc<std::fs::File>>> {
        self.files.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An open, still-linked file for the page, if known.
    pub(crate) fn get(&self, k: &PageKey) -> Option<Arc<std::fs::File>> {
        let f = self.lock().get(k).cloned()?;
        // Deleted by the worker (evicted, moved to another tier): its bytes
        // are still right, but keeping it would pin freed disk space.
        if f.metadata().map(|m| m.nlink() == 0).unwrap_or(true) {
            self.lock().remove(k);
            return None;
        }
        Some(f)
    }

    pub(crate) fn insert(&self, k: PageKey, path: &str) -> Option<Arc<std::fs::File>> {
        let f = Arc::new(std::fs::File::open(path).ok()?);
        let mut m = self.lock();
        if m.len() >= MAX_OPEN {
            m.clear();
        }
        m.insert(k, f.clone());
        Some(f)
    }
}

/// Reads `take` bytes at `skip` of each page file, in order.
pub(crate) fn read_pages(parts: &[(Arc<std::fs::File>, u64, u64)]) -> Option<Bytes> {
    let total: u64 = parts.iter().map(|p| p.2).sum();
    let mut out = BytesMut::zeroed(total as usize);
    let mut at = 0usize;
    for (f, skip, take) in parts {
        let dst = &mut out[at..at + *take as usize];
        f.read_exact_at(dst, *skip).ok()?;
        at += *take as usize;
    }
    Some(out.freeze())
}
