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

/// How one open of a file is served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum IoMode {
    /// Through the daemon (and the kernel's page cache).
    Cached,
    /// By the kernel from the local copy.
    Passthrough,
}

/// How long an open that conflicts with passthrough handles waits for
/// them to be released (a `close` reaches the daemon shortly after it
/// returns) before failing with ETXTBSY.
const CONFLICT_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

#[derive(Default)]
struct InodeIo {
    cached: u32,
    passthrough: u32,
    /// The backing file every passthrough open of the inode uses, with the
    /// fingerprint of the version it holds.
    backing: Option<(String, Arc<BackingId>)>,
}

struct OpenIo {
    ino: u64,
    mode: IoMode,
    /// Keeps the local copy from eviction while the kernel reads it.
    _pin: Option<LocalFile>,
}

#[derive(Default)]
struct State {
    inodes: HashMap<u64, InodeIo>,
    opens: HashMap<u64, OpenIo>,
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
    /// [`IoModes::opened`] or [`IoModes::abandon`]); while passthrough
    /// handles of it are open, waits for their release, and fails with
    /// ETXTBSY if they stay open.
    pub async fn begin_cached(&self, ino: u64) -> Result<IoMode, fuser::Errno> {
        let deadline = std::time::Instant::now() + CONFLICT_WAIT;
        while !self.try_cached(ino) {
            if std::time::Instant::now() > deadline {
                return Err(fuser::Errno::ETXTBSY);
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        Ok(IoMode::Cached)
    }

    /// A passthrough open of `ino` from `local` (version `fingerprint`):
    /// the backing file to reply with, registered by `register` unless the
    /// inode has one already; `None` when the kernel would refuse it (a
    /// cached handle is open, or passthrough handles of another version:
    /// the caller then opens through [`IoModes::begin_cached`]).
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
        match &io.backing {
            Some((fp, b)) if io.passthrough > 0 => {
                if fp != fingerprint {
                    return None;
                }
                let b = b.clone();
                io.passthrough += 1;
                Some(b)
            }
            _ => match register() {
                Ok(b) => {
                    let b = Arc::new(b);
                    io.backing = Some((fingerprint.to_string(), b.clone()));
                    io.passthrough += 1;
                    Some(b)
                }
                Err(e) => {
                    // Without CAP_SYS_ADMIN, for instance: stop trying.
                    tracing::warn!(
                        "FUSE passthrough unavailable ({e}); files are read through the daemon"
                    );
                    self.enabled.store(false, Ordering::Relaxed);
                    None
                }
            },
        }
    }

    /// Handle `fh` of `ino` was handed to the kernel in `mode`.
    pub fn opened(&self, fh: u64, ino: u64, mode: IoMode, pin: Option<LocalFile>) {
        lock(&self.state).opens.insert(
            fh,
            OpenIo {
                ino,
                mode,
                _pin: pin,
            },
        );
    }

    /// An open counted by `begin_*` failed before reaching the kernel.
    pub fn abandon(&self, ino: u64, mode: IoMode) {
        let mut st = lock(&self.state);
        Self::uncount(&mut st, ino, mode);
    }

    /// The kernel released handle `fh`.
    pub fn released(&self, fh: u64) {
        let mut st = lock(&self.state);
        if let Some(o) = st.opens.remove(&fh) {
            Self::uncount(&mut st, o.ino, o.mode);
        }
    }

    fn uncount(st: &mut State, ino: u64, mode: IoMode) {
        let Some(io) = st.inodes.get_mut(&ino) else {
            return;
        };
        match mode {
            IoMode::Cached => io.cached = io.cached.saturating_sub(1),
            IoMode::Passthrough => {
                io.passthrough = io.passthrough.saturating_sub(1);
                if io.passthrough == 0 {
                    // Closes the backing id; the kernel dropped the file
                    // with the last passthrough handle.
                    io.backing = None;
                }
            }
        }
        if io.cached == 0 && io.passthrough == 0 {
            st.inodes.remove(&ino);
        }
    }
}
