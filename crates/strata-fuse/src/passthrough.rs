//! FUSE passthrough (kernel ≥ 6.9): a read-only open of a file whose every
//! page is in the heavy-client cache (`client.local_cache_dir`) hands the
//! kernel that complete local copy, and the kernel reads it directly: no
//! request reaches the daemon, and the mount reads as fast as the local
//! disk.
//!
//! The kernel keeps one I/O mode per inode: while a file is open through
//! passthrough, every other open of it must be a passthrough open of the
//! same backing file, and a file open through the page cache cannot be
//! passed through (either mistake fails the `open` with EIO). This module
//! counts the open handles of each inode to stay within those rules:
//! passthrough only while no cached handle is open; while passthrough
//! handles are open, reads of the same version reuse the backing file, and
//! any other open (a writer, a newer version) waits briefly for them to be
//! released and then fails with ETXTBSY. The daemon learns of a close after
//! the kernel, so its counts are never below the kernel's.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use fuser::BackingId;
use strata_client::LocalFile;

use crate::lock;

/// How long an open that conflicts with passthrough handles waits for
/// them to be released (a `close` reaches the daemon shortly after it
/// returns) before failing with ETXTBSY.
const CONFLICT_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

#[derive(Default)]
struct InodeIo {
    cached: u32,
    passthrough: u32,
    /// The backing file every passthrough open of the inode uses, with the
    /// fingerprint of the version it holds (set while `passthrough > 0`).
    backing: Option<(String, Arc<BackingId>)>,
}

struct OpenIo {
    ino: u64,
    /// A passthrough open: keeps the local copy from eviction while the
    /// kernel reads it. `None`: an open through the daemon.
    pin: Option<LocalFile>,
}

#[derive(Default)]
struct State {
    inodes: HashMap<u64, InodeIo>,
    opens: HashMap<u64, OpenIo>,
}

impl State {
    fn uncount(&mut self, ino: u64, passthrough: bool) {
        let Some(io) = self.inodes.get_mut(&ino) else {
            return;
        };
        if passthrough {
            io.passthrough = io.passthrough.saturating_sub(1);
            if io.passthrough == 0 {
                // Closes the backing id; the kernel dropped the file with
                // the last passthrough handle.
                io.backing = None;
            }
        } else {
            io.cached = io.cached.saturating_sub(1);
        }
        if io.cached == 0 && io.passthrough == 0 {
            self.inodes.remove(&ino);
        }
    }
}

#[derive(Default)]
pub(crate) struct IoModes {
    enabled: AtomicBool,
    state: Mutex<State>,
}

impl IoModes {
    /// Passthrough was agreed with the kernel at mount time.
    pub fn enable(&self) {
        self.enabled.store(true, Ordering::Relaxed);
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Counts an open of `ino` through the daemon, unless passthrough
    /// handles of it are open (then `false`).
    fn try_cached(&self, ino: u64) -> bool {
        let mut st = lock(&self.state);
        let io = st.inodes.entry(ino).or_default();
        if io.passthrough > 0 {
            return false;
        }
        io.cached += 1;
        true
    }

    /// Counts an open of `ino` through the daemon (until
    /// [`IoModes::opened_cached`] or [`IoModes::abandon_cached`]); while
    /// passthrough handles of it are open, waits for their release, and
    /// fails with ETXTBSY if they stay open.
    pub async fn begin_cached(&self, ino: u64) -> Result<(), fuser::Errno> {
        let deadline = std::time::Instant::now() + CONFLICT_WAIT;
        while !self.try_cached(ino) {
            if std::time::Instant::now() > deadline {
                return Err(fuser::Errno::ETXTBSY);
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        Ok(())
    }

    /// A passthrough open of `ino` (version `fingerprint`): the backing
    /// file to reply with, registered by `register` unless the inode has
    /// one already; counted until [`IoModes::opened_passthrough`]. `None`
    /// when the kernel would refuse it (a cached handle is open, or
    /// passthrough handles of another version: the caller then opens
    /// through [`IoModes::begin_cached`]).
    pub fn begin_passthrough(
        &self,
        ino: u64,
        fingerprint: &str,
        register: impl FnOnce() -> std::io::Result<BackingId>,
    ) -> Option<Arc<BackingId>> {
        let mut st = lock(&self.state);
        let io = st.inodes.entry(ino).or_default();
        if io.cached > 0 {
            return None;
        }
        if let Some((fp, b)) = &io.backing {
            if fp != fingerprint {
                return None;
            }
            let b = b.clone();
            io.passthrough += 1;
            return Some(b);
        }
        match register() {
            Ok(b) => {
                let b = Arc::new(b);
                io.backing = Some((fingerprint.to_string(), b.clone()));
                io.passthrough += 1;
                Some(b)
            }
            Err(e) => {
                st.inodes.remove(&ino);
                // Without CAP_SYS_ADMIN, for instance: stop trying.
                tracing::warn!(
                    "FUSE passthrough unavailable ({e}); files are read through the daemon"
                );
                self.enabled.store(false, Ordering::Relaxed);
                None
            }
        }
    }

    /// Handle `fh` of `ino`, counted by [`IoModes::begin_cached`], was
    /// handed to the kernel.
    pub fn opened_cached(&self, fh: u64, ino: u64) {
        lock(&self.state)
            .opens
            .insert(fh, OpenIo { ino, pin: None });
    }

    /// Handle `fh` of `ino`, counted by [`IoModes::begin_passthrough`],
    /// was handed to the kernel reading `local`.
    pub fn opened_passthrough(&self, fh: u64, ino: u64, local: LocalFile) {
        let open = OpenIo {
            ino,
            pin: Some(local),
        };
        lock(&self.state).opens.insert(fh, open);
    }

    /// An open counted by [`IoModes::begin_cached`] failed before reaching
    /// the kernel.
    pub fn abandon_cached(&self, ino: u64) {
        lock(&self.state).uncount(ino, false);
    }

    /// The kernel released handle `fh`.
    pub fn released(&self, fh: u64) {
        let mut st = lock(&self.state);
        let open = st.opens.remove(&fh);
        if let Some(o) = &open {
            st.uncount(o.ino, o.pin.is_some());
        }
        drop(st);
        // Unpinning may evict (file I/O): outside the lock.
        drop(open);
    }
}
