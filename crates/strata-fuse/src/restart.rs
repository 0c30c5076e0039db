//! Restartable mounts: a supervisor process owns the kernel connection
//! (the `/dev/fuse` descriptor) and starts a new daemon on it when the
//! daemon dies, so the mount survives without a remount.
//!
//! Three things make a new daemon able to take over:
//!
//! - **The handshake.** The kernel sends `INIT` once per mount. The
//!   supervisor reads it and keeps its bytes; every daemon runs `fuser`'s
//!   handshake on that copy, through a socket pair, and then swaps the
//!   socket for the real descriptor (`dup2`). Only the first daemon's
//!   `INIT` reply reaches the kernel.
//! - **Requests in flight.** Every daemon reads the supervisor's own open
//!   file description (no cloned descriptors), so the requests a dead
//!   daemon had read but not answered stay queued in the kernel; the new
//!   daemon asks the kernel to send them again (`FUSE_NOTIFY_RESEND`,
//!   Linux ≥ 6.9).
//! - **Numbers the kernel holds.** Inode numbers are journaled (see
//!   `inodes.rs`); file handles of a restarted daemon start at a new
//!   generation, and an earlier daemon's read handles are reopened on
//!   first use, while its write handles fail with `EIO` (their unwritten
//!   data died with it).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::{Arc, Mutex};

use nix::sys::socket::{
    AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockType, recv, recvmsg, socketpair,
};

use crate::handles::Handles;
use crate::inodes::Inodes;
use crate::{FuseError, FuseOptions, StrataFs, mount_option_list};

/// `fuse_notify_code::FUSE_NOTIFY_RESEND`.
const NOTIFY_RESEND: i32 = 7;

/// The `-o` options of a Strata mount (the same list a plain mount
/// gives `fuser`), as `fusermount3` takes them.
pub fn mount_options(opts: &FuseOptions) -> String {
    use fuser::MountOption as M;
    let mut o: Vec<String> = mount_option_list(opts)
        .iter()
        .map(|m| match m {
            M::FSName(n) => format!("fsname={}", n.replace(',', "_")),
            M::Subtype(t) => format!("subtype={t}"),
            M::DefaultPermissions => "default_permissions".into(),
            M::NoAtime => "noatime".into(),
            M::RO => "ro".into(),
            other => unreachable!("mount option {other:?} is not in mount_option_list"),
        })
        .collect();
    if opts.allow_other {
        o.push("allow_other".into());
    }
    o.join(",")
}

/// Mounts an (uninitialised) FUSE file system on `mountpoint` with
/// `fusermount3` and returns the kernel connection, inheritable by child
/// processes.
pub fn mount_fd(mountpoint: &Path, options: &str) -> Result<OwnedFd, FuseError> {
    let fail = |err: io::Error| FuseError::Mount {
        mountpoint: mountpoint.display().to_string(),
        err,
    };
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| fail(e.into()))?;
    // fusermount3 finds its end of the pair in _FUSE_COMMFD, so that end
    // must survive exec.
    // SAFETY: F_SETFD on a descriptor we own.
    unsafe { libc::fcntl(theirs.as_raw_fd(), libc::F_SETFD, 0) };
    let out = std::process::Command::new("fusermount3")
        .arg("-o")
        .arg(options)
        .arg("--")
        .arg(mountpoint)
        .env("_FUSE_COMMFD", theirs.as_raw_fd().to_string())
        .output()
        .map_err(|e| {
            fail(io::Error::new(
                e.kind(),
                format!("running fusermount3: {e}"),
            ))
        })?;
    drop(theirs);
    if !out.status.success() {
        return Err(fail(io::Error::other(format!(
            "fusermount3: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))));
    }
    let mut byte = [0u8; 1];
    let mut iov = [io::IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(
        ours.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::empty(),
    )
    .map_err(|e| fail(e.into()))?;
    for c in msg.cmsgs().map_err(|e| fail(e.into()))? {
        if let ControlMessageOwned::ScmRights(fds) = c
            && let Some(&fd) = fds.first()
        {
            // SAFETY: the kernel just installed this descriptor for us.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }
    Err(fail(io::Error::other(
        "fusermount3 mounted but passed no /dev/fuse descriptor",
    )))
}

/// Reads the kernel's `INIT` request, the first message of a new mount.
pub fn read_init(dev: BorrowedFd<'_>) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; (1 << 20) + 8192];
    loop {
        match nix::unistd::read(dev, &mut buf) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// True while the FUSE connection on `dev` is up (the kernel reports an
/// error on the device once the file system is unmounted or aborted).
pub fn connected(dev: i32) -> bool {
    let mut p = libc::pollfd {
        fd: dev,
        events: 0,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no wait.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    !(n == 1 && p.revents & (libc::POLLERR | libc::POLLNVAL) != 0)
}

/// Detaches the mount (lazily, so open files do not keep it).
pub fn unmount(mountpoint: &Path) -> io::Result<()> {
    let out = std::process::Command::new("fusermount3")
        .args(["-u", "-z", "--"])
        .arg(mountpoint)
        .output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "fusermount3 -u {}: {}",
            mountpoint.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Asks the kernel to queue again every request a daemon read but never
/// answered.
fn notify_resend(dev: BorrowedFd<'_>) -> io::Result<()> {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&16u32.to_ne_bytes());
    h[4..8].copy_from_slice(&NOTIFY_RESEND.to_ne_bytes());
    nix::unistd::write(dev, &h)?;
    Ok(())
}

impl StrataFs {
    /// Makes this the `generation`-th daemon of a restartable mount whose
    /// state lives in `state_dir`.
    pub fn restartable(mut self, state_dir: &Path, generation: u64) -> io::Result<StrataFs> {
        let inodes = Inodes::with_journal(self.opts.root.clone(), &state_dir.join("inodes"))
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("inode journal in {}: {e}", state_dir.display()),
                )
            })?;
        self.inodes = Arc::new(Mutex::new(inodes));
        self.handles = Arc::new(Handles::for_generation(generation, self.inodes.clone()));
        Ok(self)
    }

    /// Serves the mount behind `dev`, whose `INIT` request was `init`;
    /// `first` when no daemon has answered it yet.
    pub fn serve(
        self,
        dev: OwnedFd,
        init: &[u8],
        first: bool,
    ) -> Result<fuser::BackgroundSession, FuseError> {
        let fail = |err: io::Error| FuseError::Mount {
            mountpoint: "(restarted mount)".into(),
            err,
        };
        let (ours, handshake) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| fail(e.into()))?;
        nix::unistd::write(&handshake, init).map_err(|e| fail(e.into()))?;
        let mut config = self.config();
        // Cloned descriptors would take their unanswered requests with
        // them when this daemon dies; one shared descriptor keeps them.
        config.clone_fd = false;
        let acl = config.acl;
        let notifier = self.notifier.clone();
        let slot = ours.as_raw_fd();
        let session = fuser::Session::from_fd(self, ours, acl, config).map_err(fail)?;
        let mut reply = vec![0u8; 4096];
        let n = recv(handshake.as_raw_fd(), &mut reply, MsgFlags::empty())
            .map_err(|e| fail(e.into()))?;
        if first {
            // The kernel waits for this reply before it sends anything else.
            nix::unistd::write(&dev, &reply[..n]).map_err(|e| fail(e.into()))?;
        }
        // From here on the session's descriptor is the kernel connection.
        // SAFETY: `slot` is owned by the session and stays open; dup2
        // atomically replaces the socket behind it.
        if unsafe { libc::dup2(dev.as_raw_fd(), slot) } < 0 {
            return Err(fail(io::Error::last_os_error()));
        }
        // SAFETY: F_SETFD on a descriptor the session owns.
        unsafe { libc::fcntl(slot, libc::F_SETFD, libc::FD_CLOEXEC) };
        drop(dev);
        drop(handshake);
        if !first && let Err(e) = notify_resend(session_fd(slot)) {
            tracing::warn!(
                "the kernel did not resend the requests a dead daemon left unanswered \
                 (FUSE_NOTIFY_RESEND needs Linux 6.9 or later): {e}"
            );
        }
        let _ = notifier.set(session.notifier());
        session.spawn().map_err(fail)
    }
}

fn session_fd<'a>(fd: RawFd) -> BorrowedFd<'a> {
    // SAFETY: only used while the session that owns `fd` is alive.
    unsafe { BorrowedFd::borrow_raw(fd) }
}
