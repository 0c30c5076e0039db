//! The FUSE file system: a directory tree over the Strata namespace, built
//! on the SDK (`strata-client`) and `fuser` (pure Rust, mounted through
//! `fusermount3`). It owns inode numbers, open-file handles and the mapping
//! of SDK errors to errno; it knows nothing about workers, pages or the UFS.
//!
//! Every request is answered from a task on a tokio runtime, so a slow read
//! never holds up the kernel's other requests. The exact semantics (what is
//! supported, the consistency model, every timeout) are in
//! `docs/fuse-semantics.md`.

mod errno;
mod handles;
mod inodes;
mod passthrough;
pub mod restart;

use std::ffi::OsStr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite,
    ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use strata_client::{Client, FileInfo, WriteOptions, WriteType};
use tokio::runtime::Handle;

pub use errno::to_errno;
use handles::{DirEntry, Handles, Open};
use inodes::{Inodes, ROOT};
use passthrough::IoModes;

/// Largest read and write the kernel sends in one request.
pub const MAX_IO: u32 = 1 << 20;

/// The I/O size files report (`st_blksize`), which programs size their
/// buffers by: Python's `open()` allocates a buffer of this size for every
/// file it opens, and at 1 MiB that allocation (mapped and unmapped by the
/// allocator each time) cost 78 µs per file, four times the whole read of
/// a cached 100 KiB file; up to 256 KiB it costs nothing measurable.
/// Request sizes do not follow it: the kernel's read-ahead and `max_write`
/// decide those.
pub const BLKSIZE: u32 = 128 << 10;

#[derive(Debug, thiserror::Error)]
pub enum FuseError {
    #[error("mount point {0} does not exist (create it with `mkdir -p {0}`)")]
    MissingMountPoint(String),
    #[error("mount point {0} is not a directory")]
    NotADirectory(String),
    #[error("mount point {0} is not empty (mounting would hide its files; use an empty directory)")]
    NotEmpty(String),
    #[error("namespace path {path} cannot be mounted: {msg}")]
    Root { path: String, msg: String },
    #[error(
        "mounting {mountpoint} failed: {err} (is /dev/fuse present and fusermount3 installed? \
         `apt-get install fuse3`)"
    )]
    Mount {
        mountpoint: String,
        err: std::io::Error,
    },
}

/// How a mount behaves; every timeout is documented in fuse-semantics.md.
#[derive(Clone, Debug)]
pub struct FuseOptions {
    /// The namespace directory shown at the mount point.
    pub root: String,
    /// How long the kernel may cache attributes.
    pub attr_ttl: Duration,
    /// How long the kernel may cache name lookups.
    pub entry_ttl: Duration,
    /// Threads reading requests from /dev/fuse.
    pub threads: usize,
    /// How files created through the mount are written.
    pub write_type: WriteType,
    /// Allow other users to use the mount (`allow_other`).
    pub allow_other: bool,
    /// Hand complete local copies (heavy-client mode) to the kernel with
    /// FUSE passthrough, where the kernel supports it.
    pub passthrough: bool,
    /// Mount read-only (`ro`): the kernel refuses every change with
    /// `EROFS`, and keeps attributes across reads (a read-write mount
    /// fetches them again after a read, for the access time).
    pub read_only: bool,
    /// Read-only mounts only: let the kernel open files without asking the
    /// daemon (FUSE `no_open`). Saves a round trip at every open and the
    /// release at every close; pages stay cached until the file's size or
    /// modification time changes; no passthrough.
    pub no_open: bool,
}

impl Default for FuseOptions {
    fn default() -> Self {
        FuseOptions {
            root: "/".into(),
            attr_ttl: Duration::from_secs(1),
            entry_ttl: Duration::from_secs(1),
            threads: 2,
            write_type: WriteType::CacheThrough,
            allow_other: false,
            passthrough: true,
            read_only: false,
            no_open: false,
        }
    }
}

/// The file system handed to `fuser`.
pub struct StrataFs {
    client: Client,
    rt: Handle,
    opts: FuseOptions,
    inodes: Arc<Mutex<Inodes>>,
    handles: Arc<Handles>,
    uid: u32,
    gid: u32,
    /// Fingerprint of each file at its last open: an unchanged file keeps
    /// the kernel's page cache across opens (FOPEN_KEEP_CACHE).
    fingerprints: Arc<Mutex<std::collections::HashMap<u64, String>>>,
    /// Set once mounted: tells the kernel to drop cached attributes and
    /// pages of a file this mount just changed.
    notifier: Arc<std::sync::OnceLock<fuser::Notifier>>,
    meta: Arc<MetaCache>,
    modes: Arc<IoModes>,
    unopened: Arc<Unopened>,
}

/// Read handles of files the kernel opened without asking (`no_open`
/// mounts): one per inode, shared by every descriptor of it, kept for the
/// most recently read files.
#[derive(Default)]
struct Unopened {
    by_ino: Mutex<UnopenedMap>,
    /// Reads served, to trim the read windows every 16 of them.
    reads: std::sync::atomic::AtomicU64,
}

/// Inode -> (last checked against the namespace, last used, its handle).
type UnopenedMap =
    std::collections::HashMap<u64, (std::time::Instant, std::time::Instant, Arc<Open>)>;

/// Read handles an `Unopened` keeps.
const UNOPENED_KEPT: usize = 256;
/// Of those, the most recent that keep their read windows (so at most
/// 32 × 32 MiB of window buffers, not 256 × 32 MiB: two kept windows and
/// two being fetched, of up to 8 MiB each).
const UNOPENED_WINDOWS: usize = 32;

impl Unopened {
    /// The handle of `ino`, if it was checked against the namespace
    /// within `ttl`; it counts as used now.
    fn fresh(&self, ino: u64, ttl: Duration) -> Option<Arc<Open>> {
        let mut m = lock(&self.by_ino);
        let (checked, used, o) = m.get_mut(&ino)?;
        if checked.elapsed() >= ttl {
            return None;
        }
        *used = std::time::Instant::now();
        let o = o.clone();
        if self
            .reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            % 16
            == 15
        {
            Self::trim_windows(&m);
        }
        Some(o)
    }

    /// Only the most recently used handles keep their read windows (up to
    /// 2 × 8 MiB each): the rest read afresh if used again.
    fn trim_windows(m: &UnopenedMap) {
        if m.len() > UNOPENED_WINDOWS {
            let mut by_use: Vec<&(std::time::Instant, std::time::Instant, Arc<Open>)> =
                m.values().collect();
            by_use.sort_by_key(|(_, used, _)| std::cmp::Reverse(*used));
            for (_, _, old) in by_use.into_iter().skip(UNOPENED_WINDOWS) {
                old.drop_windows();
            }
        }
    }

    /// The handle of `ino` for the version with fingerprint `fp`, made by
    /// `open` if there is none.
    fn get_or_insert(&self, ino: u64, fp: &str, open: impl FnOnce() -> Open) -> Arc<Open> {
        let now = std::time::Instant::now();
        let mut m = lock(&self.by_ino);
        if let Some((checked, used, o)) = m.get_mut(&ino)
            && o.fingerprint() == Some(fp)
        {
            (*checked, *used) = (now, now);
            return o.clone();
        }
        if m.len() >= UNOPENED_KEPT
            && let Some(oldest) = m
                .iter()
                .min_by_key(|(_, (_, used, _))| *used)
                .map(|(i, _)| *i)
        {
            m.remove(&oldest);
        }
        let o = Arc::new(open());
        m.insert(ino, (now, now, o.clone()));
        Self::trim_windows(&m);
        o
    }

    fn forget(&self, ino: u64) {
        lock(&self.by_ino).remove(&ino);
    }
}

/// File metadata seen in the last `attr_ttl`, so an `open` right after a
/// lookup (the common case) needs no second call to the master.
struct MetaCache {
    by_path: Mutex<std::collections::HashMap<String, (std::time::Instant, FileInfo)>>,
    /// How long an entry is used (the mount's attribute timeout).
    ttl: Duration,
    /// Recent misses per directory (see [`MetaCache::relist_for`]).
    misses: Mutex<std::collections::HashMap<String, DirMisses>>,
}

/// Misses of names in one directory within one second after which the
/// mount lists the directory again (one call) instead of asking the
/// master about each name (`ls -l` and `find` of a large directory stat
/// every name after reading the whole listing, when the attribute timeout
/// has passed for most of them). At least this many, and at least one in
/// [`RELIST_SHARE`] of the directory's entries (so a huge directory whose
/// files are stat'ed at random is not listed over and over).
const RELIST_AFTER_MISSES: usize = 32;
const RELIST_SHARE: usize = 64;

/// A directory is listed again for misses at most once per attribute
/// timeout, and at most once per this many times the duration of its last
/// listing.
const RELIST_COST_FACTOR: u32 = 2;

#[derive(Default)]
struct DirMisses {
    /// Start of the current one-second window and the misses in it.
    window: Option<std::time::Instant>,
    misses: usize,
    /// Entries of the directory when it was last listed for misses.
    entries: usize,
    /// When the last listing for misses ended, and how long it took.
    listed: Option<(std::time::Instant, Duration)>,
    /// A listing in progress, which other misses in the directory await.
    pending: Option<futures::future::Shared<futures::future::BoxFuture<'static, ()>>>,
}

impl DirMisses {
    /// Counts a miss at `now`; true if the directory should be listed
    /// again for it (see [`RELIST_AFTER_MISSES`], [`RELIST_COST_FACTOR`]).
    fn miss(&mut self, now: std::time::Instant, ttl: Duration) -> bool {
        if self
            .window
            .is_none_or(|w| now - w >= Duration::from_secs(1))
        {
            self.window = Some(now);
            self.misses = 0;
        }
        self.misses += 1;
        let recent = self
            .listed
            .is_some_and(|(at, took)| now - at < ttl.max(took * RELIST_COST_FACTOR));
        self.misses >= RELIST_AFTER_MISSES.max(self.entries / RELIST_SHARE) && !recent
    }
}

/// Entries a [`MetaCache`] holds before it drops expired ones (a listing
/// of a data set of a few hundred thousand files stays whole).
const META_CACHE_ENTRIES: usize = 400_000;

impl MetaCache {
    fn new(ttl: Duration) -> MetaCache {
        MetaCache {
            by_path: Mutex::default(),
            ttl,
            misses: Mutex::default(),
        }
    }

    fn put(&self, info: &FileInfo) {
        let mut m = lock(&self.by_path);
        if m.len() >= META_CACHE_ENTRIES {
            let ttl = self.ttl;
            m.retain(|_, (at, _)| at.elapsed() < ttl);
            // All still fresh: start over rather than sweep at every put.
            if m.len() >= META_CACHE_ENTRIES {
                m.clear();
            }
        }
        m.insert(info.path.clone(), (std::time::Instant::now(), info.clone()));
    }

    fn get(&self, path: &str, ttl: Duration) -> Option<FileInfo> {
        lock(&self.by_path)
            .get(path)
            .filter(|(at, _)| at.elapsed() < ttl)
            .map(|(_, i)| i.clone())
    }

    fn forget(&self, path: &str) {
        lock(&self.by_path).remove(path);
    }

    /// Called when `path` is not in the cache: once names of its directory
    /// keep missing, lists that directory again (one call, awaited by every
    /// miss in it meanwhile) and caches every entry, so the next misses
    /// are answered from a listing as fresh as a `stat`.
    async fn relist_for(self: &Arc<Self>, client: &Client, path: &str) {
        use futures::FutureExt;
        let Some((dir, _)) = path.rsplit_once('/') else {
            return;
        };
        let dir = if dir.is_empty() { "/" } else { dir };
        let listing = {
            let mut m = lock(&self.misses);
            if m.len() > 4096 {
                m.retain(|_, d| d.pending.is_some());
            }
            let now = std::time::Instant::now();
            let d = m.entry(dir.to_string()).or_default();
            if let Some(p) = &d.pending {
                p.clone()
            } else {
                if !d.miss(now, self.ttl) {
                    return;
                }
                let (me, client, dir) = (self.clone(), client.clone(), dir.to_string());
                let f = async move {
                    let start = std::time::Instant::now();
                    let mut entries = 0;
                    if let Ok(list) = client.list(&dir).await {
                        entries = list.len();
                        for e in &list {
                            me.put(e);
                        }
                    }
                    let mut m = lock(&me.misses);
                    let d = m.entry(dir).or_default();
                    d.pending = None;
                    d.misses = 0;
                    d.entries = entries;
                    d.listed = Some((std::time::Instant::now(), start.elapsed()));
                }
                .boxed()
                .shared();
                d.pending = Some(f.clone());
                f
            }
        };
        listing.await;
    }
}

/// What `/proc/self/mountinfo` says of a mount.
pub struct MountEntry {
    /// The device, as `MAJOR:MINOR`.
    pub dev: String,
    /// The file system type (`fuse`, `fuse.NAME`, `ext4`, ...).
    pub fstype: String,
}

/// The file system mounted at `mountpoint` right now (the last mounted,
/// if several are stacked there), if any.
pub fn mounted_at(mountpoint: &Path) -> Option<MountEntry> {
    let abs = std::fs::canonicalize(mountpoint).ok()?;
    let want = abs.to_string_lossy();
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        if f.get(4)?.replace("\\040", " ") != want {
            return None;
        }
        Some(MountEntry {
            dev: f[2].to_string(),
            fstype: l.split(" - ").nth(1)?.split(' ').next()?.to_string(),
        })
    })
}

/// Sets the kernel's read-ahead for the FUSE mount at `mountpoint` to
/// `kib` KiB (`/sys/class/bdi/MAJOR:MINOR/read_ahead_kb`; writing it needs
/// root). The kernel sets it to at most 128 KiB when the mount starts
/// (FUSE INIT), so a sequential reader has a single request in flight and
/// waits for each; a few MiB keep requests coming while the reader copies
/// the last one. Stats `mountpoint` first, which waits for INIT (call it
/// on a thread other than the mount's).
pub fn set_read_ahead(mountpoint: &Path, kib: u32) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(mountpoint)?.dev();
    let dev = format!("{}:{}", libc::major(dev), libc::minor(dev));
    // Only the FUSE mount at that path right now (not whatever the path
    // shows once it has been unmounted).
    if !mounted_at(mountpoint).is_some_and(|m| m.dev == dev && m.fstype.starts_with("fuse")) {
        return Err(std::io::Error::other(format!(
            "{} is no longer this FUSE mount",
            mountpoint.display()
        )));
    }
    let bdi = format!("/sys/class/bdi/{dev}/read_ahead_kb");
    std::fs::write(&bdi, kib.to_string()).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("{bdi}: {e} (only root may set it: run the mount as root, or --read-ahead 0)"),
        )
    })
}

/// Checks the mount point the way users expect: it exists, is a directory
/// and is empty.
pub fn check_mount_point(mountpoint: &Path) -> Result<(), FuseError> {
    let shown = mountpoint.display().to_string();
    let md =
        std::fs::metadata(mountpoint).map_err(|_| FuseError::MissingMountPoint(shown.clone()))?;
    if !md.is_dir() {
        return Err(FuseError::NotADirectory(shown));
    }
    let mut entries =
        std::fs::read_dir(mountpoint).map_err(|_| FuseError::MissingMountPoint(shown.clone()))?;
    if entries.next().is_some() {
        return Err(FuseError::NotEmpty(shown));
    }
    Ok(())
}

impl StrataFs {
    /// Checks that `opts.root` is a directory of the namespace.
    pub async fn new(client: Client, rt: Handle, opts: FuseOptions) -> Result<StrataFs, FuseError> {
        let root = normalize_root(&opts.root);
        let info = client.stat(&root).await.map_err(|e| FuseError::Root {
            path: root.clone(),
            msg: e.to_string(),
        })?;
        if !info.is_dir {
            return Err(FuseError::Root {
                path: root,
                msg: "not a directory".into(),
            });
        }
        // SAFETY: getuid/getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        Ok(StrataFs {
            client,
            rt,
            inodes: Arc::new(Mutex::new(Inodes::new(root.clone()))),
            meta: Arc::new(MetaCache::new(opts.attr_ttl)),
            opts: FuseOptions { root, ..opts },
            handles: Arc::new(Handles::default()),
            uid,
            gid,
            fingerprints: Arc::default(),
            notifier: Arc::default(),
            modes: Arc::default(),
            unopened: Arc::default(),
        })
    }

    /// Mounts in the background; dropping the session unmounts.
    pub fn mount(self, mountpoint: &Path) -> Result<fuser::BackgroundSession, FuseError> {
        let config = self.config();
        let notifier = self.notifier.clone();
        let session =
            fuser::spawn_mount(self, mountpoint, &config).map_err(|err| FuseError::Mount {
                mountpoint: mountpoint.display().to_string(),
                err,
            })?;
        let _ = notifier.set(session.notifier());
        Ok(session)
    }

    fn config(&self) -> fuser::Config {
        let mut c = fuser::Config::default();
        c.mount_options = mount_option_list(&self.opts);
        if self.opts.allow_other {
            c.acl = fuser::SessionACL::All;
        }
        c.n_threads = Some(self.opts.threads.max(1));
        c
    }

    fn path_of(&self, ino: INodeNo) -> Result<String, Errno> {
        lock(&self.inodes).path(ino.0).ok_or(Errno::ENOENT)
    }

    fn child_path(&self, parent: INodeNo, name: &OsStr) -> Result<String, Errno> {
        let name = name.to_str().ok_or(Errno::EINVAL)?;
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(Errno::EINVAL);
        }
        let p = self.path_of(parent)?;
        Ok(if p == "/" {
            format!("/{name}")
        } else {
            format!("{p}/{name}")
        })
    }

    /// Runs `f` on the runtime; a panic or error becomes EIO/errno.
    fn spawn<F>(&self, f: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.rt.spawn(f);
    }

    fn ctx(&self) -> Ctx {
        Ctx {
            client: self.client.clone(),
            inodes: self.inodes.clone(),
            handles: self.handles.clone(),
            uid: self.uid,
            gid: self.gid,
            attr_ttl: self.opts.attr_ttl,
            entry_ttl: self.opts.entry_ttl,
            write_type: self.opts.write_type,
            fingerprints: self.fingerprints.clone(),
            notifier: self.notifier.clone(),
            meta: self.meta.clone(),
            modes: self.modes.clone(),
            unopened: self.unopened.clone(),
        }
    }
}

/// Answers a readdir from the entries listed at opendir.
fn fill_dir(open: &Open, offset: u64, mut reply: ReplyDirectory) {
    let Some(entries) = open.entries() else {
        return reply.error(Errno::ENOTDIR);
    };
    for (i, e) in entries.iter().enumerate().skip(offset as usize) {
        if reply.add(INodeNo(e.ino), (i + 1) as u64, e.kind, &e.name) {
            break;
        }
    }
    reply.ok();
}

/// Answers a readdirplus from the entries listed at opendir, with their
/// attributes: the kernel then needs no `LOOKUP` for a name it has just
/// listed (`ls -l`, `os.scandir` and `stat`, `find`). It counts a lookup
/// for each entry it receives, `.` and `..` aside. Attributes come from
/// the mount's metadata cache, as a lookup's do (fresh within the
/// attribute timeout, dropped by every change made through the mount),
/// never from the listing alone, which may be older than a write or a
/// rename made since: an entry whose metadata has expired ends the batch,
/// and if it is the first, the reply is handed back for
/// [`Ctx::refresh_listed`], whose results (`fresh`, by entry index) come
/// first on the second try.
fn fill_dir_plus(
    ctx: &Ctx,
    open: &Open,
    offset: u64,
    mut reply: ReplyDirectoryPlus,
    fresh: &std::collections::HashMap<usize, FileInfo>,
) -> Option<ReplyDirectoryPlus> {
    let Some(entries) = open.entries() else {
        reply.error(Errno::ENOTDIR);
        return None;
    };
    let mut added = false;
    for (i, e) in entries.iter().enumerate().skip(offset as usize) {
        // `counted`: the kernel takes a lookup for the entry (for all but
        // `.` and `..`, whose attributes it ignores too).
        let (ino, attr, counted) = match &e.info {
            None => {
                let dir = FileInfo {
                    is_dir: true,
                    ..FileInfo::default()
                };
                (e.ino, ctx.attr(e.ino, &dir), false)
            }
            Some(_) if e.gone.load(std::sync::atomic::Ordering::Relaxed) => continue,
            Some(listed) => {
                let Some(info) = fresh
                    .get(&i)
                    .cloned()
                    .or_else(|| ctx.meta.get(&listed.path, ctx.attr_ttl))
                else {
                    if !added {
                        return Some(reply);
                    }
                    break;
                };
                // Counted before the attributes are taken, so the number
                // cannot be dropped as listed-only meanwhile; uncounted if
                // it does not fit.
                let ino = lock(&ctx.inodes).ino_for(&info.path, true);
                (ino, ctx.attr(ino, &info), true)
            }
        };
        let next = (i + 1) as u64;
        if reply.add(
            INodeNo(ino),
            next,
            &e.name,
            &ctx.entry_ttl,
            &attr,
            Generation(0),
        ) {
            if counted {
                lock(&ctx.inodes).uncount(ino);
            }
            break;
        }
        added = true;
    }
    reply.ok();
    None
}

/// `truncate PATH SIZE` of a file no handle writes: open it for writing,
/// resize the staged copy, commit.
async fn resize_closed(ctx: &Ctx, path: &str, ino: u64, size: u64) -> Result<(), Errno> {
    let fh = handles::open_writer(ctx, path, ino, false, false).await?;
    let res = match ctx.handles.get(fh) {
        Some(o) => match o.set_size(size).await {
            Ok(()) => o.commit().await,
            Err(e) => Err(e),
        },
        None => Err(Errno::EBADF),
    };
    ctx.handles.remove(fh);
    res
}

/// The only extended-attribute namespace the mount keeps.
const XATTR_USER: &str = "user.";

/// Answers a getxattr/listxattr: the size when asked for it (`size` 0),
/// the bytes when they fit, ERANGE when they do not.
fn xattr_reply(reply: ReplyXattr, v: &[u8], size: u32) {
    if size == 0 {
        reply.size(v.len() as u32);
    } else if v.len() > size as usize {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(v);
    }
}

impl StrataFs {
    fn change_xattrs(
        &self,
        ino: INodeNo,
        set: Vec<(String, Vec<u8>)>,
        remove: Vec<String>,
        flag: strata_client::XattrFlag,
        reply: ReplyEmpty,
    ) {
        let ctx = self.ctx();
        let path = match self.path_of(ino) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        self.spawn(async move {
            let res = ctx.client.set_xattrs(&path, set, remove, flag).await;
            ctx.meta.forget(&path);
            match res {
                Ok(info) => {
                    ctx.meta.put(&info);
                    reply.ok()
                }
                // The inode exists (the kernel holds it): a missing name.
                Err(strata_client::ClientError::NotFound(_)) => reply.error(Errno::ENODATA),
                // Within the per-name limits, only the per-file total is left.
                Err(strata_client::ClientError::InvalidArgument(_)) => reply.error(Errno::ENOSPC),
                Err(e) => reply.error(to_errno(&e)),
            }
        });
    }
}

/// Waits for the session of a mount that was unmounted from outside
/// (`strata umount`, `fusermount3 -u`, `umount -l`) to end, without the
/// unmount `fuser` does when a session is dropped: that unmounts whatever
/// is mounted at the path *now*, which after a quick `strata umount` and
/// `strata mount` at the same path is the new mount (fuser 0.18 takes its
/// own, already disconnected device for still mounted). The process exits
/// right after, which releases the device.
pub fn join_unmounted(session: fuser::BackgroundSession) {
    let session = std::mem::ManuallyDrop::new(session);
    // SAFETY: `guard` is read out exactly once and `session` is never
    // dropped or used again, so nothing is dropped twice.
    let guard = unsafe { std::ptr::read(&session.guard) };
    let _ = guard.join();
}

/// The mount options of a Strata mount (besides `allow_other`, which
/// `fuser` derives from its ACL setting).
fn mount_option_list(opts: &FuseOptions) -> Vec<fuser::MountOption> {
    let mut o = vec![
        fuser::MountOption::FSName(format!("strata:{}", normalize_root(&opts.root))),
        fuser::MountOption::Subtype("strata".into()),
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::NoAtime,
    ];
    if opts.read_only {
        o.push(fuser::MountOption::RO);
    }
    o
}

fn normalize_root(r: &str) -> String {
    let t = r.trim_end_matches('/');
    if t.is_empty() {
        "/".into()
    } else if t.starts_with('/') {
        t.to_string()
    } else {
        format!("/{t}")
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a request task needs, cloned out of the file system.
#[derive(Clone)]
struct Ctx {
    client: Client,
    inodes: Arc<Mutex<Inodes>>,
    handles: Arc<Handles>,
    uid: u32,
    gid: u32,
    attr_ttl: Duration,
    entry_ttl: Duration,
    write_type: WriteType,
    fingerprints: Arc<Mutex<std::collections::HashMap<u64, String>>>,
    notifier: Arc<std::sync::OnceLock<fuser::Notifier>>,
    meta: Arc<MetaCache>,
    modes: Arc<IoModes>,
    unopened: Arc<Unopened>,
}

impl Ctx {
    /// The entries of directory `ino`, with `.` and `..` first.
    async fn dir_entries(&self, ino: u64) -> Result<Vec<DirEntry>, Errno> {
        let (path, parent) = {
            let inodes = lock(&self.inodes);
            let path = inodes.path(ino).ok_or(Errno::ENOENT)?;
            (path, inodes.parent_ino(ino))
        };
        let list = self.client.list(&path).await.map_err(|e| to_errno(&e))?;
        let dot = |ino, name: &str| DirEntry {
            ino,
            kind: FileType::Directory,
            name: name.to_string(),
            info: None,
            gone: Default::default(),
        };
        let mut entries = vec![dot(ino, "."), dot(parent, "..")];
        let mut inodes = lock(&self.inodes);
        for e in list {
            // A lookup of a listed name within attr_ttl needs no second
            // call to the master.
            self.meta.put(&e);
            let child = inodes.ino_for(&e.path, false);
            let kind = if e.is_dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            };
            entries.push(DirEntry {
                ino: child,
                kind,
                name: e.name.clone(),
                info: Some(e),
                gone: Default::default(),
            });
        }
        Ok(entries)
    }

    /// Fetches the metadata of the next listed entries of `open` from
    /// `offset` whose cached metadata has expired (up to a batch of them),
    /// and marks those found missing since the listing as gone. What was
    /// fetched, by entry index, and the first other error, if any.
    async fn refresh_listed(
        &self,
        open: &Open,
        offset: u64,
    ) -> (std::collections::HashMap<usize, FileInfo>, Option<Errno>) {
        use futures::StreamExt;
        const BATCH: usize = 128;
        let mut fresh = std::collections::HashMap::new();
        let Some(entries) = open.entries() else {
            return (fresh, Some(Errno::ENOTDIR));
        };
        let stale: Vec<(usize, String)> = entries
            .iter()
            .enumerate()
            .skip(offset as usize)
            .filter(|(_, e)| !e.gone.load(std::sync::atomic::Ordering::Relaxed))
            .filter_map(|(i, e)| e.info.as_ref().map(|info| (i, info.path.clone())))
            .filter(|(_, p)| self.meta.get(p, self.attr_ttl).is_none())
            .take(BATCH)
            .collect();
        let mut results = futures::stream::iter(stale)
            .map(|(i, p)| async move { (i, self.stat_cached(&p).await) })
            .buffer_unordered(16);
        let mut first_err = None;
        while let Some((i, r)) = results.next().await {
            match r {
                Ok(info) => {
                    fresh.insert(i, info);
                }
                Err(err) if err.is_not_found() => entries[i]
                    .gone
                    .store(true, std::sync::atomic::Ordering::Relaxed),
                Err(err) => {
                    first_err.get_or_insert(to_errno(&err));
                }
            }
        }
        (fresh, first_err)
    }

    /// Opens file `ino` again for reading under handle `fh`, which an
    /// earlier daemon of this mount handed to the kernel.
    async fn reopen(&self, ino: u64, fh: u64) -> Result<Arc<Open>, Errno> {
        let r = self.file_reader(ino, false).await?;
        Ok(self.handles.adopt(fh, Open::reading(r)))
    }

    /// A reader of the current version of file `ino` (its metadata from
    /// the mount's cache when `cached`).
    async fn file_reader(&self, ino: u64, cached: bool) -> Result<strata_client::Reader, Errno> {
        let path = lock(&self.inodes).path(ino).ok_or(Errno::ENOENT)?;
        let info = if cached {
            self.stat_cached(&path).await
        } else {
            self.client.stat(&path).await
        };
        let info = info.map_err(|e| to_errno(&e))?;
        if info.is_dir {
            return Err(Errno::EISDIR);
        }
        self.client.open_info(info).map_err(|e| to_errno(&e))
    }

    /// The read handle of file `ino` on a `no_open` mount, where the kernel
    /// opens files without asking: checked against the namespace once per
    /// attribute timeout.
    async fn unopened(&self, ino: u64) -> Result<Arc<Open>, Errno> {
        if let Some(o) = self.unopened.fresh(ino, self.attr_ttl) {
            return Ok(o);
        }
        let r = self.file_reader(ino, true).await?;
        let fp = r.info().fingerprint.clone();
        Ok(self.unopened.get_or_insert(ino, &fp, || Open::reading(r)))
    }

    /// Opens `r` with FUSE passthrough when every page of it is in the
    /// local cache and the kernel accepts it for `ino`; gives `reply` back
    /// otherwise.
    fn open_passthrough(
        &self,
        ino: u64,
        r: &strata_client::Reader,
        reply: ReplyOpen,
    ) -> Result<(), ReplyOpen> {
        if !self.modes.enabled() {
            return Err(reply);
        }
        let Some(local) = r.local_file() else {
            return Err(reply);
        };
        let fp = r.info().fingerprint.clone();
        let Some(backing) = self
            .modes
            .begin_passthrough(ino, &fp, || reply.open_backing(&local.file))
        else {
            return Err(reply);
        };
        let fh = self.handles.insert(Open::reading(r.clone()));
        self.modes.opened_passthrough(fh, ino, local);
        // Nothing to commit at close: no FLUSH request.
        reply.opened_passthrough(FileHandle(fh), FopenFlags::FOPEN_NOFLUSH, &backing);
        Ok(())
    }

    /// A writer for a new version of the file at `path` (replacing what is
    /// there), with the mount's write type.
    async fn new_version(
        &self,
        path: &str,
    ) -> Result<strata_client::Writer, strata_client::ClientError> {
        self.new_file(path, true).await
    }

    /// A writer for `path`; without `overwrite`, an existing file (made
    /// meanwhile by another host, say) is `EEXIST`.
    async fn new_file(
        &self,
        path: &str,
        overwrite: bool,
    ) -> Result<strata_client::Writer, strata_client::ClientError> {
        let opts = WriteOptions {
            write_type: self.write_type,
            overwrite,
            recursive: false,
            priority: 0,
        };
        self.client.create(path, opts).await
    }

    /// `stat` through the metadata cache (fresh for `attr_ttl`).
    async fn stat_cached(&self, path: &str) -> Result<FileInfo, strata_client::ClientError> {
        if let Some(i) = self.meta.get(path, self.attr_ttl) {
            return Ok(i);
        }
        self.meta.relist_for(&self.client, path).await;
        if let Some(i) = self.meta.get(path, self.attr_ttl) {
            return Ok(i);
        }
        let i = self.client.stat(path).await?;
        self.meta.put(&i);
        Ok(i)
    }

    /// After a change through this mount (and after replying): drop the
    /// kernel's cached attributes of `ino`, so the next stat sees the new
    /// size. Attributes only: invalidating pages would wait for page locks
    /// that a concurrent write holds while it waits for us. The kernel call
    /// blocks, so it runs off the async runtime.
    fn invalidate(&self, ino: u64) {
        self.forget_cached(ino);
        if ino == 0 {
            return;
        }
        let notifier = self.notifier.clone();
        tokio::task::spawn_blocking(move || {
            if let Some(n) = notifier.get() {
                let _ = n.inval_inode(INodeNo(ino), -1, 0);
            }
        });
    }

    /// Deletes `path` from the namespace (unlink, rmdir, or the target a
    /// rename replaces). A file still open for writing here: its handles
    /// commit nothing while the delete runs (it waits for any commit in
    /// progress), and once it succeeded they stop committing, so closing
    /// them cannot bring it back, and a new file they were writing goes
    /// with them. If the delete fails they write on as before.
    async fn delete_entry(&self, path: &str, dir: bool) -> Result<(), Errno> {
        let ino = if dir {
            None
        } else {
            lock(&self.inodes).ino_of(path)
        };
        let mut writers = ino.map(|i| self.handles.writers_of(i)).unwrap_or_default();
        // Locked in one order (two unlinks of one name cannot deadlock),
        // held across the delete, and marked only once it succeeded: a
        // refused unlink leaves the writers writing.
        writers.sort_by_key(|w| Arc::as_ptr(w) as usize);
        let mut locked = Vec::new();
        for w in &writers {
            if let Some(g) = w.lock_write().await {
                locked.push(g);
            }
        }
        let res = match self.client.delete(path, false).await {
            // A new file whose writers never completed it has no entry.
            Err(e) if locked.is_empty() || !e.is_not_found() => Err(to_errno(&e)),
            _ => Ok(()),
        };
        if res.is_ok() {
            for g in &mut locked {
                handles::mark_unlinked(g).await;
            }
        }
        res
    }

    /// Drops the mount's own cached metadata and page fingerprint of `ino`.
    fn forget_cached(&self, ino: u64) {
        lock(&self.fingerprints).remove(&ino);
        if let Some(p) = lock(&self.inodes).path(ino) {
            self.meta.forget(&p);
        }
    }

    fn attr(&self, ino: u64, info: &FileInfo) -> FileAttr {
        let mtime = UNIX_EPOCH + Duration::from_millis(info.mtime_ms.max(0) as u64);
        let (kind, default_perm, nlink) = if info.is_dir {
            (FileType::Directory, 0o755, 2)
        } else {
            (FileType::RegularFile, 0o644, 1)
        };
        let inodes = lock(&self.inodes);
        let perm = inodes
            .mode(ino)
            .or_else(|| (info.mode & 0o7777 != 0).then_some((info.mode & 0o7777) as u16))
            .unwrap_or(default_perm);
        // A file being written shows the bytes written so far.
        let size = self.handles.written(ino).unwrap_or(info.size);
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: mtime,
            mtime,
            ctime: mtime,
            crtime: mtime,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: BLKSIZE,
            flags: 0,
        }
    }

    /// Stats `path` and registers its inode; returns (ino, attr).
    async fn stat_entry(&self, path: &str, count_lookup: bool) -> Result<(u64, FileAttr), Errno> {
        let info = self.stat_cached(path).await.map_err(|e| to_errno(&e))?;
        let ino = lock(&self.inodes).ino_for(path, count_lookup);
        Ok((ino, self.attr(ino, &info)))
    }
}

impl Filesystem for StrataFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_readahead(MAX_IO);
        let _ = config.set_max_write(MAX_IO);
        // The mount keeps no security.* attributes, so the kernel need not
        // ask for `security.capability` before every write (one round trip
        // per write(2) otherwise); set-ID bits are cleared in `write`.
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_HANDLE_KILLPRIV_V2);
        // Listings with attributes, when the kernel sees they help: the
        // first batch of a directory, and later ones while the lister also
        // looks the names up (`ls -l`); plain `ls` gets plain READDIR.
        let _ = config.add_capabilities(
            fuser::InitFlags::FUSE_DO_READDIRPLUS | fuser::InitFlags::FUSE_READDIRPLUS_AUTO,
        );
        if self.opts.no_open {
            // The kernel keeps pages of files it opens by itself; a change
            // of size or modification time (seen once the attribute
            // timeout is over) drops them.
            let _ = config.add_capabilities(fuser::InitFlags::FUSE_AUTO_INVAL_DATA);
        }
        // Passthrough needs complete local copies: heavy-client mode.
        if !self.opts.no_open && self.opts.passthrough && self.client.local_cache_stats().is_some()
        {
            match config.add_capabilities(fuser::InitFlags::FUSE_PASSTHROUGH) {
                Ok(()) => {
                    // Backing files on a plain (not stacked) file system.
                    let _ = config.set_max_stack_depth(1);
                    self.modes.enable();
                }
                Err(_) => tracing::info!(
                    "the kernel offers no FUSE passthrough (Linux ≥ 6.9 has it): \
                     cached files are read through the daemon"
                ),
            }
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let ctx = self.ctx();
        let path = match self.child_path(parent, name) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        // Listed or looked up within attr_ttl: answered on this thread.
        if let Some(info) = ctx.meta.get(&path, ctx.attr_ttl) {
            let ino = lock(&ctx.inodes).ino_for(&path, true);
            return reply.entry(&ctx.entry_ttl, &ctx.attr(ino, &info), Generation(0));
        }
        self.spawn(async move {
            match ctx.stat_entry(&path, true).await {
                Ok((_, attr)) => reply.entry(&ctx.entry_ttl, &attr, Generation(0)),
                Err(e) => reply.error(e),
            }
        });
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.unopened.forget(ino.0);
        let mut inodes = lock(&self.inodes);
        inodes.forget(ino.0, nlookup);
        // A forgotten number is not used again for that name.
        if inodes.path(ino.0).is_none() {
            lock(&self.fingerprints).remove(&ino.0);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let ctx = self.ctx();
        let path = match self.path_of(ino) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        if let Some(info) = ctx.meta.get(&path, ctx.attr_ttl) {
            return reply.attr(&ctx.attr_ttl, &ctx.attr(ino.0, &info));
        }
        self.spawn(async move {
            match ctx.stat_cached(&path).await {
                Ok(info) => reply.attr(&ctx.attr_ttl, &ctx.attr(ino.0, &info)),
                Err(e) => reply.error(to_errno(&e)),
            }
        });
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // Owners cannot change: every file belongs to the mounting user.
        if uid.is_some_and(|u| u != self.uid) || gid.is_some_and(|g| g != self.gid) {
            return reply.error(Errno::EPERM);
        }
        let ctx = self.ctx();
        let path = match self.path_of(ino) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        self.spawn(async move {
            if let Some(size) = size {
                // Truncation to zero empties the file (and resets any write
                // handle on it); another size moves the file open for
                // writing to a staged copy and resizes it there (a file not
                // open for writing is opened, resized and committed).
                let writer = fh
                    .and_then(|h| ctx.handles.get(h.0))
                    .filter(|o| o.is_write())
                    .or_else(|| ctx.handles.writers_of(ino.0).into_iter().next());
                let current = match writer.as_ref().and_then(|o| o.written()) {
                    Some(w) => Some(w),
                    None => ctx.client.stat(&path).await.ok().map(|i| i.size),
                };
                if size == 0 && current != Some(0) {
                    for w in ctx.handles.writers_of(ino.0) {
                        w.reset_to_empty().await;
                    }
                    let res = async { ctx.new_version(&path).await?.close().await }.await;
                    if let Err(e) = res {
                        return reply.error(to_errno(&e));
                    }
                } else if current != Some(size) {
                    let res = match writer {
                        Some(w) => match w.set_size(size).await {
                            // `truncate PATH` (no descriptor of its own) is
                            // committed at once, as a local disk shows it at
                            // once (the writers' next commit would come only
                            // at their close, which may have been the last
                            // one already); so is a resize of a handle
                            // released meanwhile.
                            Ok(()) if fh.is_none() || !ctx.handles.is_open(&w) => w.commit().await,
                            r => r,
                        },
                        None => resize_closed(&ctx, &path, ino.0, size).await,
                    };
                    if let Err(e) = res {
                        return reply.error(e);
                    }
                }
            }
            if let Some(m) = mode {
                lock(&ctx.inodes).set_mode(ino.0, (m & 0o7777) as u16);
            }
            match ctx.client.stat(&path).await {
                Ok(info) => reply.attr(&ctx.attr_ttl, &ctx.attr(ino.0, &info)),
                Err(e) => reply.error(to_errno(&e)),
            }
            if size.is_some() {
                ctx.invalidate(ino.0);
            }
        });
    }

    fn readlink(&self, _req: &Request, _ino: INodeNo, reply: ReplyData) {
        // No symbolic links exist in the namespace.
        reply.error(Errno::EINVAL);
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let ctx = self.ctx();
        let path = match self.child_path(parent, name) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        self.spawn(async move {
            match ctx.client.mkdir(&path, false).await {
                Ok(info) => {
                    let ino = lock(&ctx.inodes).ino_for(&path, true);
                    reply.entry(&ctx.entry_ttl, &ctx.attr(ino, &info), Generation(0))
                }
                Err(e) => reply.error(to_errno(&e)),
            }
        });
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove(parent, name, false, reply);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove(parent, name, true, reply);
    }

    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _link_name: &OsStr,
        _target: &Path,
        reply: ReplyEntry,
    ) {
        // The namespace keeps files and directories only.
        reply.error(Errno::EPERM);
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if !flags.is_empty() {
            // RENAME_EXCHANGE / RENAME_NOREPLACE are not offered.
            return reply.error(Errno::EINVAL);
        }
        let ctx = self.ctx();
        let (src, dst) = match (
            self.child_path(parent, name),
            self.child_path(newparent, newname),
        ) {
            (Ok(s), Ok(d)) => (s, d),
            (Err(e), _) | (_, Err(e)) => return reply.error(e),
        };
        self.spawn(async move {
            // A file still open for writing (`src`, or a file below the
            // directory `src`) is committed first (its entry is incomplete
            // until then), and its handles write to its new path after the
            // rename. They are held (locked in one order, as for unlink)
            // from the commit to the new path, so no write in between
            // starts a new version at the old path. A writer that failed
            // earlier is left as it is (its close reports the failure).
            let mut writers: Vec<(Arc<handles::Open>, String)> = {
                let open = ctx.handles.writers_where(|_| true);
                let inodes = lock(&ctx.inodes);
                open.into_iter()
                    .filter_map(|w| {
                        let p = inodes.path(w.ino)?;
                        let rest = p
                            .strip_prefix(src.as_str())
                            .filter(|r| r.is_empty() || r.starts_with('/'))
                            .filter(|r| !r.contains('\0'))?;
                        let to = format!("{dst}{rest}");
                        Some((w, to))
                    })
                    .collect()
            };
            writers.sort_by_key(|(w, _)| Arc::as_ptr(w) as usize);
            let mut locked = Vec::new();
            for (w, to) in &writers {
                if let Some(g) = w.lock_write().await {
                    locked.push((g, to.clone()));
                }
            }
            locked.retain(|(g, _)| g.failed().is_none());
            for (g, _) in &mut locked {
                if let Err(e) = g.commit().await {
                    return reply.error(e);
                }
            }
            // POSIX rename replaces an existing file (not atomically here).
            if let Ok(existing) = ctx.client.stat(&dst).await {
                let src_info = match ctx.client.stat(&src).await {
                    Ok(i) => i,
                    Err(e) => return reply.error(to_errno(&e)),
                };
                if existing.is_dir != src_info.is_dir {
                    return reply.error(if existing.is_dir {
                        Errno::EISDIR
                    } else {
                        Errno::ENOTDIR
                    });
                }
                if let Err(e) = ctx.delete_entry(&dst, existing.is_dir).await {
                    return reply.error(e);
                }
            }
            match ctx.client.rename(&src, &dst).await {
                Ok(()) => {
                    ctx.meta.forget(&src);
                    ctx.meta.forget(&dst);
                    lock(&ctx.inodes).rename(&src, &dst);
                    for (g, to) in &mut locked {
                        g.set_path(to);
                    }
                    reply.ok()
                }
                Err(e) => reply.error(to_errno(&e)),
            }
        });
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, mut reply: ReplyOpen) {
        let ctx = self.ctx();
        let path = match self.path_of(ino) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        let writing = flags.acc_mode() != OpenAccMode::O_RDONLY;
        if self.opts.no_open {
            // ENOSYS: from now on the kernel opens files by itself (and
            // sends no release); reads come with handle 0.
            return reply.error(if writing { Errno::EROFS } else { Errno::ENOSYS });
        }
        // A read of a file complete in the local cache, its metadata fresh:
        // passed through on this thread, with no call to anyone.
        if !writing
            && ctx.modes.enabled()
            && ctx.handles.written(ino.0).is_none()
            && let Some(info) = ctx.meta.get(&path, ctx.attr_ttl).filter(|i| !i.is_dir)
            && let Ok(r) = ctx.client.open_info(info)
        {
            match ctx.open_passthrough(ino.0, &r, reply) {
                Ok(()) => return,
                Err(back) => reply = back,
            }
        }
        let truncate = flags.0 & libc::O_TRUNC != 0;
        let append = flags.0 & libc::O_APPEND != 0;
        self.spawn(async move {
            if writing {
                if let Err(e) = ctx.modes.begin_cached(ino.0).await {
                    return reply.error(e);
                }
                match handles::open_writer(&ctx, &path, ino.0, truncate, append).await {
                    Ok(fh) => {
                        ctx.modes.opened_cached(fh, ino.0);
                        reply.opened(FileHandle(fh), FopenFlags::empty())
                    }
                    Err(e) => {
                        ctx.modes.abandon_cached(ino.0);
                        reply.error(e)
                    }
                }
                return;
            }
            // Being written through this mount: read what was written so
            // far (from the writer's staged copy), not the old version.
            if let Some(w) = ctx.handles.writers_of(ino.0).into_iter().next() {
                if let Err(e) = ctx.modes.begin_cached(ino.0).await {
                    return reply.error(e);
                }
                let fh = ctx.handles.insert_alias(w);
                ctx.modes.opened_cached(fh, ino.0);
                return reply.opened(FileHandle(fh), FopenFlags::empty());
            }
            let opened = match ctx.stat_cached(&path).await {
                Ok(info) if info.is_dir => Err(strata_client::ClientError::FailedPrecondition(
                    format!("{path}: is a directory"),
                )),
                Ok(info) => ctx.client.open_info(info),
                Err(e) => Err(e),
            };
            match opened {
                Ok(r) => {
                    let fp = r.info().fingerprint.clone();
                    match ctx.open_passthrough(ino.0, &r, reply) {
                        Ok(()) => return,
                        Err(back) => reply = back,
                    }
                    let keep = {
                        let mut fps = lock(&ctx.fingerprints);
                        let same = fps.get(&ino.0) == Some(&fp);
                        fps.insert(ino.0, fp);
                        same
                    };
                    if let Err(e) = ctx.modes.begin_cached(ino.0).await {
                        return reply.error(e);
                    }
                    let fh = ctx.handles.insert(Open::reading(r));
                    ctx.modes.opened_cached(fh, ino.0);
                    // A read-only descriptor has nothing to commit at
                    // close: no FLUSH request.
                    let flags = if keep {
                        FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_NOFLUSH
                    } else {
                        FopenFlags::FOPEN_NOFLUSH
                    };
                    reply.opened(FileHandle(fh), flags)
                }
                Err(e) => reply.error(to_errno(&e)),
            }
        });
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        // Handle 0 on a `no_open` mount: a file the kernel opened by itself.
        let unopened = fh.0 == 0 && self.opts.no_open;
        let open = self.handles.get(fh.0);
        if !unopened && open.is_none() && !self.handles.is_inherited(fh.0) {
            return reply.error(Errno::EBADF);
        }
        if let Some(b) = open
            .as_ref()
            .and_then(|o| o.read_now(offset, size, &self.rt))
        {
            return reply.data(&b);
        }
        let ctx = self.ctx();
        self.spawn(async move {
            let open = match open {
                Some(o) => Ok(o),
                None if unopened => ctx.unopened(ino.0).await,
                // A read handle of an earlier daemon of this mount: open
                // the file again and carry on.
                None => ctx.reopen(ino.0, fh.0).await,
            };
            let open = match open {
                Ok(o) => o,
                Err(e) => return reply.error(e),
            };
            match open.read(offset, size).await {
                Ok(b) => reply.data(&b),
                Err(e) => reply.error(e),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        let Some(open) = self.handles.get(fh.0) else {
            // What was written through an earlier daemon's handle died with
            // it: the writer gets an error, not a file with a hole.
            return reply.error(if self.handles.lost_writer(fh.0) {
                Errno::EIO
            } else {
                Errno::EBADF
            });
        };
        if write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID) {
            // With FUSE_HANDLE_KILLPRIV_V2 a write by a non-owner clears
            // set-user-ID and set-group-ID here (no capabilities are kept).
            let mut inodes = lock(&self.inodes);
            if let Some(m) = inodes.mode(ino.0).filter(|m| m & 0o6000 != 0) {
                inodes.set_mode(ino.0, m & !0o6000);
            }
        }
        let data = data.to_vec();
        self.spawn(async move {
            match open.write(offset, &data).await {
                Ok(()) => reply.written(data.len() as u32),
                Err(e) => reply.error(e),
            }
        });
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: fuser::LockOwner,
        reply: ReplyEmpty,
    ) {
        if fh.0 == 0 && self.opts.no_open {
            // A file the kernel opened by itself on a read-only mount:
            // nothing to commit, and ENOSYS tells the kernel to send no
            // FLUSH from now on.
            return reply.error(Errno::ENOSYS);
        }
        // close(2) reports write errors: the file is committed here (not
        // when a read-only descriptor of a file being written is closed).
        if self.handles.is_alias(fh.0) {
            return reply.ok();
        }
        let Some(open) = self.handles.get(fh.0) else {
            return match self.handles.is_inherited(fh.0) {
                true if self.handles.lost_writer(fh.0) => reply.error(Errno::EIO),
                // An earlier daemon's read handle: nothing to commit.
                true => reply.ok(),
                false => reply.error(Errno::EBADF),
            };
        };
        self.commit_and_reply(open, None, reply);
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Data reaches the store when the file is closed; fsync commits it.
        self.flush(_req, _ino, fh, fuser::LockOwner(0), reply);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        // The handle stays findable until its commit is done, so a rename
        // or unlink right after close waits for it (releases are
        // asynchronous: the kernel does not wait for them).
        self.modes.released(fh.0);
        if self.handles.remove_alias(fh.0) {
            return reply.ok();
        }
        let Some(open) = self.handles.get(fh.0) else {
            self.handles.forget_lost_writer(fh.0);
            return reply.ok();
        };
        if !open.is_write() {
            // Nothing to commit.
            self.handles.remove(fh.0);
            return reply.ok();
        }
        self.commit_and_reply(open, Some(fh.0), reply);
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        // O_CREAT|O_EXCL: the kernel found no such name, but another host
        // may have created it since; it must not be replaced.
        let exclusive = flags & libc::O_EXCL != 0;
        let ctx = self.ctx();
        let path = match self.child_path(parent, name) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        self.spawn(async move {
            ctx.meta.forget(&path);
            // A name still open through passthrough (unlinked, say) keeps
            // its inode: the new file cannot be opened through the daemon
            // until those descriptors are closed.
            let counted = lock(&ctx.inodes).ino_held(&path);
            if let Err(e) = ctx.modes.begin_cached(counted).await {
                lock(&ctx.inodes).not_counted(counted);
                return reply.error(e);
            }
            match ctx.new_file(&path, !exclusive).await {
                Ok(w) => {
                    let ino = lock(&ctx.inodes).ino_for(&path, true);
                    if mode & 0o7777 != 0 {
                        lock(&ctx.inodes).set_mode(ino, (mode & 0o7777) as u16);
                    }
                    let fh = ctx.handles.insert(Open::writing(w, ino, 0, ctx.clone()));
                    ctx.modes.opened_cached(fh, counted);
                    let info = FileInfo {
                        path: path.clone(),
                        mtime_ms: now_ms(),
                        ..FileInfo::default()
                    };
                    reply.created(
                        &ctx.entry_ttl,
                        &ctx.attr(ino, &info),
                        Generation(0),
                        FileHandle(fh),
                        FopenFlags::empty(),
                    )
                }
                Err(e) => {
                    ctx.modes.abandon_cached(counted);
                    lock(&ctx.inodes).not_counted(counted);
                    reply.error(to_errno(&e))
                }
            }
        });
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let ctx = self.ctx();
        self.spawn(async move {
            match ctx.dir_entries(ino.0).await {
                Ok(entries) => {
                    let fh = ctx.handles.insert(Open::dir(entries));
                    reply.opened(FileHandle(fh), FopenFlags::empty())
                }
                Err(e) => reply.error(e),
            }
        });
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectory,
    ) {
        if let Some(open) = self.handles.get(fh.0) {
            return fill_dir(&open, offset, reply);
        }
        if !self.handles.is_inherited(fh.0) {
            return reply.error(Errno::EBADF);
        }
        // An earlier daemon's directory handle: list the directory again.
        let ctx = self.ctx();
        self.spawn(async move {
            match ctx.dir_entries(ino.0).await {
                Ok(entries) => {
                    fill_dir(&ctx.handles.adopt(fh.0, Open::dir(entries)), offset, reply)
                }
                Err(e) => reply.error(e),
            }
        });
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let ctx = self.ctx();
        let open = self.handles.get(fh.0);
        if let Some(open) = &open {
            match fill_dir_plus(&ctx, open, offset, reply, &Default::default()) {
                None => return,
                Some(r) => reply = r,
            }
        } else if !self.handles.is_inherited(fh.0) {
            return reply.error(Errno::EBADF);
        }
        self.spawn(async move {
            let open = match open {
                Some(o) => o,
                // An earlier daemon's directory handle: list it again.
                None => match ctx.dir_entries(ino.0).await {
                    Ok(entries) => ctx.handles.adopt(fh.0, Open::dir(entries)),
                    Err(e) => return reply.error(e),
                },
            };
            let (fresh, err) = ctx.refresh_listed(&open, offset).await;
            if let Some(reply) = fill_dir_plus(&ctx, &open, offset, reply, &fresh) {
                reply.error(err.unwrap_or(Errno::EIO));
            }
        });
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.handles.remove(fh.0);
        reply.ok();
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        // Only `user.*` names are kept; the kernel's own questions (such as
        // `security.capability` before a write) are answered here at once.
        let Some(name) = name.to_str().filter(|n| n.starts_with(XATTR_USER)) else {
            return reply.error(Errno::ENODATA);
        };
        let name = name.to_string();
        let ctx = self.ctx();
        let path = match self.path_of(ino) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        self.spawn(async move {
            match ctx.stat_cached(&path).await {
                Ok(info) => match info.xattrs.get(&name) {
                    None => reply.error(Errno::ENODATA),
                    Some(v) => xattr_reply(reply, v, size),
                },
                Err(e) => reply.error(to_errno(&e)),
            }
        });
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let ctx = self.ctx();
        let path = match self.path_of(ino) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        self.spawn(async move {
            match ctx.stat_cached(&path).await {
                Ok(info) => {
                    let mut names: Vec<&String> = info.xattrs.keys().collect();
                    names.sort();
                    let mut buf = Vec::new();
                    for n in names {
                        buf.extend_from_slice(n.as_bytes());
                        buf.push(0);
                    }
                    xattr_reply(reply, &buf, size)
                }
                Err(e) => reply.error(to_errno(&e)),
            }
        });
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let Some(name) = name.to_str() else {
            return reply.error(Errno::EINVAL);
        };
        if !name.starts_with(XATTR_USER) {
            // security.*, trusted.*, system.* (ACLs) are not kept.
            return reply.error(Errno::EOPNOTSUPP);
        }
        if name.len() > strata_client::xattr_limits::NAME_MAX {
            return reply.error(Errno::ERANGE);
        }
        if value.len() > strata_client::xattr_limits::VALUE_MAX {
            return reply.error(Errno::E2BIG);
        }
        let flag = if flags & libc::XATTR_CREATE != 0 {
            strata_client::XattrFlag::XattrCreate
        } else if flags & libc::XATTR_REPLACE != 0 {
            strata_client::XattrFlag::XattrReplace
        } else {
            strata_client::XattrFlag::XattrAny
        };
        let (name, value) = (name.to_string(), value.to_vec());
        self.change_xattrs(ino, vec![(name, value)], vec![], flag, reply);
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let Some(name) = name.to_str().filter(|n| n.starts_with(XATTR_USER)) else {
            return reply.error(Errno::ENODATA);
        };
        let name = name.to_string();
        self.change_xattrs(
            ino,
            vec![],
            vec![name],
            strata_client::XattrFlag::XattrReplace,
            reply,
        );
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let client = self.client.clone();
        self.spawn(async move {
            let (mut cap, mut used) = (0u64, 0u64);
            if let Ok(ws) = client.workers().await {
                for w in ws.into_iter().filter(|w| w.live) {
                    if let Some(s) = w.stats {
                        cap += s.capacity_bytes;
                        used += s.used_bytes;
                    }
                }
            }
            let bsize = 4096u64;
            let blocks = cap / bsize;
            let free = cap.saturating_sub(used) / bsize;
            reply.statfs(
                blocks,
                free,
                free,
                1 << 32,
                1 << 32,
                bsize as u32,
                255,
                bsize as u32,
            );
        });
    }
}

impl StrataFs {
    /// Commits a handle (a no-op unless it wrote) and answers with the
    /// result; a written file's cached attributes are dropped afterwards.
    /// Commits `open` and replies; with `release`, then forgets the handle.
    fn commit_and_reply(&self, open: Arc<handles::Open>, release: Option<u64>, reply: ReplyEmpty) {
        let ctx = self.ctx();
        self.spawn(async move {
            let changed = open.is_write();
            let mut res = open.commit().await;
            if let Some(fh) = release {
                ctx.handles.remove(fh);
                // A change that reached the handle during that commit (a
                // resize racing this release) is committed now: no other
                // descriptor will.
                if res.is_ok() && !ctx.handles.is_open(&open) {
                    res = open.commit().await;
                }
            }
            if changed {
                // Before the reply: an open or stat right after `close`
                // must not be served the old version's cached metadata.
                ctx.forget_cached(open.ino);
            }
            match res {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            }
            if changed {
                ctx.invalidate(open.ino);
            }
        });
    }

    fn remove(&self, parent: INodeNo, name: &OsStr, dir: bool, reply: ReplyEmpty) {
        let ctx = self.ctx();
        let path = match self.child_path(parent, name) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        self.spawn(async move {
            match ctx.client.stat(&path).await {
                Ok(info) if info.is_dir && !dir => return reply.error(Errno::EISDIR),
                Ok(info) if !info.is_dir && dir => return reply.error(Errno::ENOTDIR),
                Ok(_) => {}
                Err(e) => return reply.error(to_errno(&e)),
            }
            match ctx.delete_entry(&path, dir).await {
                Err(e) => reply.error(e),
                Ok(()) => {
                    ctx.meta.forget(&path);
                    lock(&ctx.inodes).unlinked(&path);
                    reply.ok()
                }
            }
        });
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Root inode number, for tests and tools.
pub const ROOT_INO: u64 = ROOT;

/// Counts of open handles (tests).
pub fn open_handles(fs: &StrataFs) -> usize {
    fs.handles.len()
}
