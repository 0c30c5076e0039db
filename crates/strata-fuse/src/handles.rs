//! Open files and directories. A read handle serves the kernel from
//! windows fetched ahead while reads are sequential (1 MiB, doubling up to
//! 8 MiB while the reader keeps up, two in flight, back to 1 MiB on a
//! random read); a write handle streams
//! sequential writes (and appends) into one SDK writer, committed at every
//! flush (each close of a descriptor) or fsync, and at release; a write
//! after a commit continues the file as an append. A write out of order, a
//! size change or a read through a write handle moves the file to a staged
//! local copy (unlinked, in `$TMPDIR`), uploaded whole at each commit.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use fuser::{Errno, FileType};
use futures::StreamExt;
use strata_client::{Reader, Writer};
use tokio::sync::Mutex;

use crate::{Ctx, lock, to_errno};

/// The read-ahead window of a sequential reader starts at this size,
/// doubles each time the reader consumes a prefetched window, and is capped
/// at [`MAX_WINDOW`] (larger windows cost more in fresh memory than they
/// gain: measured ~470 vs ~550 MB/s through the mount); a random read
/// resets it.
const MIN_WINDOW: u64 = 1 << 20;
const MAX_WINDOW: u64 = 8 << 20;
/// A read this far past where the last one ended still counts as
/// sequential (the kernel's read-ahead and parallel FUSE requests reorder
/// and skip a little).
const JUMP: u64 = 8 << 20;
/// Windows a sequential reader keeps (the newest and the one before it):
/// the kernel sends its read-ahead as several requests at once, which
/// arrive in any order, so a read may land just behind the newest window.
const KEPT: usize = 2;
/// Windows fetched ahead of a sequential reader at once: one window at a
/// time left the disk idle while the reader consumed it.
const DEPTH: usize = 2;
/// A read this far behind the farthest one so far is a late request of
/// the same sequential reader, not a random read: it is answered without
/// resetting the windows.
const BEHIND: u64 = 16 << 20;

pub enum Kind {
    Read {
        reader: Reader,
        window: Mutex<Window>,
    },
    Write(Box<Mutex<WriteState>>),
    Dir(Vec<DirEntry>),
}

/// One entry of a directory listed at `opendir`: its inode, type and name,
/// and what the listing said of it (`None` for `.` and `..`).
pub struct DirEntry {
    pub ino: u64,
    pub kind: FileType,
    pub name: String,
    pub info: Option<strata_client::FileInfo>,
    /// Found missing since the listing (a readdirplus entry must carry
    /// current attributes, so it leaves such a name out).
    pub gone: std::sync::atomic::AtomicBool,
}

/// A window being fetched.
type Fetch = tokio::task::JoinHandle<Result<Bytes, Errno>>;

/// What a read handle fetched: the last windows, the ones being fetched
/// after them while reads are sequential, and where the farthest read so
/// far ended.
pub struct Window {
    /// Fetched windows in file order, newest last, at most [`KEPT`].
    bufs: std::collections::VecDeque<(u64, Bytes)>,
    /// Prefetches in flight, each starting where the one before it ends
    /// (the first where the newest window ends): start, length, task.
    next: std::collections::VecDeque<(u64, u64, Fetch)>,
    /// End of the farthest read so far (`u64::MAX` before the first).
    frontier: u64,
    /// Bytes the next prefetch asks for.
    size: u64,
    /// The reader has read on from where it left off (or started at 0):
    /// reads just past the farthest one fetch windows ahead of it. A read
    /// that lands just past the last one by chance (a random reader,
    /// about one read in a hundred over a 1 GiB file) does not: it takes
    /// two such reads in a row.
    sequential: bool,
}

/// How a read relates to the reader's reads so far.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pattern {
    /// At or a little past the farthest read of a sequential reader (or
    /// the first read, at 0).
    Ahead,
    /// At or a little past the farthest read of a reader not (yet) seen
    /// reading sequentially: fetched alone, as a random read, after which
    /// the reader counts as sequential.
    Near,
    /// A little behind the farthest read: a request that arrived late.
    Late,
    Random,
}

impl Window {
    fn new() -> Window {
        Window {
            bufs: Default::default(),
            next: Default::default(),
            frontier: u64::MAX,
            size: MIN_WINDOW,
            sequential: false,
        }
    }

    /// The bytes of a kept window that hold the whole read.
    fn find(&self, off: u64, want: u64) -> Option<Bytes> {
        self.bufs.iter().find_map(|(start, buf)| {
            (off >= *start && off + want <= start + buf.len() as u64)
                .then(|| buf.slice((off - start) as usize..(off - start + want) as usize))
        })
    }

    fn pattern(&self, off: u64) -> Pattern {
        if self.frontier == u64::MAX {
            return if off == 0 {
                Pattern::Ahead
            } else {
                Pattern::Random
            };
        }
        if off >= self.frontier {
            if off - self.frontier <= JUMP {
                return if self.sequential {
                    Pattern::Ahead
                } else {
                    Pattern::Near
                };
            }
        } else if self.frontier - off <= BEHIND {
            return Pattern::Late;
        }
        Pattern::Random
    }

    /// How many prefetches (from the first) must be taken for the one that
    /// holds `off`, if one does.
    fn pending(&self, off: u64) -> Option<usize> {
        self.next
            .iter()
            .position(|(at, len, _)| off >= *at && off < at + len)
            .map(|i| i + 1)
    }

    /// A prefetched window arrived: kept as the newest; the reader is
    /// sequential, so the next window is larger.
    fn adopt(&mut self, at: u64, buf: Bytes) {
        self.bufs.push_back((at, buf));
        while self.bufs.len() > KEPT {
            self.bufs.pop_front();
        }
        self.size = (self.size * 2).min(MAX_WINDOW);
    }

    /// Serves a read a kept window holds; one that moves the reader ahead
    /// keeps [`DEPTH`] windows being fetched after it (inside a Tokio
    /// runtime).
    fn serve(&mut self, off: u64, want: u64, pattern: Pattern, reader: &Reader) -> Option<Bytes> {
        let out = self.find(off, want)?;
        if pattern == Pattern::Ahead {
            self.frontier = if self.frontier == u64::MAX {
                off + want
            } else {
                self.frontier.max(off + want)
            };
            self.prefetch(reader);
        }
        Some(out)
    }

    /// Starts over at `off` with `data` as the only window (a random read,
    /// or a sequential one past everything fetched); the read ended at
    /// `read_end`.
    fn reset(&mut self, off: u64, data: Bytes, read_end: u64) {
        self.stop_prefetch();
        self.frontier = read_end;
        self.bufs.clear();
        self.bufs.push_back((off, data));
    }

    /// A read fetched alone (`Random` or `Near`) returned `data`: it is
    /// the only window, the next prefetch starts small, and the reader
    /// counts as sequential only after a `Near` read.
    fn restart(&mut self, pattern: Pattern, off: u64, data: Bytes) {
        let end = off + data.len() as u64;
        self.reset(off, data, end);
        self.size = MIN_WINDOW;
        self.sequential = pattern == Pattern::Near;
    }

    /// Stops the prefetches in flight.
    fn stop_prefetch(&mut self) {
        for (_, _, t) in self.next.drain(..) {
            t.abort();
        }
    }

    /// Keeps [`DEPTH`] windows being fetched after the newest one.
    fn prefetch(&mut self, reader: &Reader) {
        while self.next.len() < DEPTH {
            let at = match (self.next.back(), self.bufs.back()) {
                (Some((at, len, _)), _) => at + len,
                (None, Some((start, buf))) if !buf.is_empty() => start + buf.len() as u64,
                _ => return,
            };
            if at >= reader.len() {
                return;
            }
            let r = reader.clone();
            // Windows stay inside one block, so that pages of a worker on
            // this host are read from its files.
            let len = self
                .size
                .min(reader.len() - at)
                .min(reader.block_end(at) - at);
            // A sequential reader: load the blocks after this one ahead of it.
            reader.prewarm(at, reader.len());
            let task =
                tokio::spawn(async move { r.read_at(at, len).await.map_err(|e| to_errno(&e)) });
            self.next.push_back((at, len, task));
        }
    }
}

/// The file written through a locked handle is being unlinked: nothing
/// written through it is committed any more.
pub async fn mark_unlinked(s: &mut WriteState) {
    s.unlinked = true;
    // Its unfinished version goes too (for a file being rewritten it is
    // not the one the name shows, which the caller removes).
    if let Some(w) = s.writer.take() {
        w.abort().await;
    }
    s.staged = None;
    s.base = None;
}

impl Drop for Window {
    fn drop(&mut self) {
        self.stop_prefetch();
    }
}

pub struct WriteState {
    ctx: Option<Ctx>,
    path: String,
    writer: Option<Writer>,
    /// Bytes of the file so far (an append starts at the old size).
    written: Arc<AtomicU64>,
    /// Before the first write of an append, the old bytes to copy first.
    base: Option<u64>,
    committed: bool,
    failed: Option<Errno>,
    /// After a write out of order, a size change or a read through this
    /// handle: the whole file in a local temporary file, uploaded at each
    /// commit.
    staged: Option<Staged>,
    /// Unlinked while open: writes are accepted and dropped.
    unlinked: bool,
}

/// A file being written out of order, kept in an unlinked temporary file
/// until it is committed.
pub struct Staged {
    file: std::fs::File,
    len: u64,
    /// Changed since the last commit.
    dirty: bool,
}

/// An unlinked temporary file in `$TMPDIR` (default `/tmp`).
fn temp_file() -> std::io::Result<std::fs::File> {
    let dir = std::env::temp_dir();
    for i in 0..100u32 {
        let p = dir.join(format!(
            ".strata-staged-{}-{}-{i}",
            std::process::id(),
            STAGED.fetch_add(1, Ordering::Relaxed)
        ));
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&p)
        {
            Ok(f) => {
                let _ = std::fs::remove_file(&p);
                return Ok(f);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other("no free temporary file name"))
}

static STAGED: AtomicU64 = AtomicU64::new(0);

fn io_errno(e: &std::io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

pub struct Open {
    pub kind: Kind,
    pub ino: u64,
    /// For write handles: the file's size so far.
    written: Option<Arc<AtomicU64>>,
}

impl Open {
    /// Frees a read handle's window buffers (and stops its prefetch); a
    /// later read fetches again. Nothing if a read holds them now.
    pub fn drop_windows(&self) {
        if let Kind::Read { window, .. } = &self.kind
            && let Ok(mut w) = window.try_lock()
        {
            w.bufs.clear();
            w.stop_prefetch();
        }
    }

    pub fn reading(reader: Reader) -> Open {
        Open {
            ino: 0,
            written: None,
            kind: Kind::Read {
                reader,
                window: Mutex::new(Window::new()),
            },
        }
    }

    pub fn writing(w: Writer, ino: u64, written: u64, ctx: Ctx) -> Open {
        let written = Arc::new(AtomicU64::new(written));
        Open {
            ino,
            written: Some(written.clone()),
            kind: Kind::Write(Box::new(Mutex::new(WriteState {
                ctx: Some(ctx),
                path: w.path().to_string(),
                writer: Some(w),
                written,
                base: None,
                committed: false,
                failed: None,
                staged: None,
                unlinked: false,
            }))),
        }
    }

    pub fn dir(entries: Vec<DirEntry>) -> Open {
        Open {
            ino: 0,
            written: None,
            kind: Kind::Dir(entries),
        }
    }

    pub fn is_write(&self) -> bool {
        matches!(self.kind, Kind::Write(_))
    }

    /// The fingerprint of the version a read handle reads.
    pub fn fingerprint(&self) -> Option<&str> {
        match &self.kind {
            Kind::Read { reader, .. } => Some(&reader.info().fingerprint),
            _ => None,
        }
    }

    pub fn entries(&self) -> Option<&[DirEntry]> {
        match &self.kind {
            Kind::Dir(e) => Some(e),
            _ => None,
        }
    }

    fn written_counter(&self) -> Option<Arc<AtomicU64>> {
        self.written.clone()
    }

    pub fn written(&self) -> Option<u64> {
        self.written_counter().map(|w| w.load(Ordering::Relaxed))
    }

    /// A read served on the calling thread, without a hand-over to the
    /// async runtime and back (a third of the cost of a 4 KiB read): one
    /// the window holds (or the prefetch behind it, if that is done), or a
    /// random read whose bytes are in one page file of a worker on this
    /// host that is open already. `None`: use [`Open::read`]. `rt` runs
    /// the next prefetch.
    pub fn read_now(&self, off: u64, size: u32, rt: &tokio::runtime::Handle) -> Option<Bytes> {
        let Kind::Read { reader, window } = &self.kind else {
            return None;
        };
        let len = reader.len();
        if off >= len {
            return None;
        }
        let want = u64::from(size).min(len - off);
        let mut w = window.try_lock().ok()?;
        let pattern = w.pattern(off);
        if w.find(off, want).is_none()
            && let Some(n) = w.pending(off)
        {
            if !w.next.iter().take(n).all(|(_, _, t)| t.is_finished()) {
                return None;
            }
            for _ in 0..n {
                let (at, _, mut task) = w.next.pop_front()?;
                // Taken once done (a finished task is not polled again);
                // one that failed or was cancelled is dropped, and `read`
                // fetches again (and reports the error if that fails too).
                if let Some(Ok(Ok(b))) = futures::FutureExt::now_or_never(&mut task) {
                    w.adopt(at, b);
                }
            }
        }
        let served = {
            let _rt = rt.enter();
            w.serve(off, want, pattern, reader)
        };
        if served.is_some() {
            return served;
        }
        // Sequential reads past the windows wait for the runtime.
        if pattern == Pattern::Ahead {
            return None;
        }
        let data = reader.read_open_page(off, want)?;
        // As in `read`: a late read changes nothing; a random one starts
        // small again, with no window ahead.
        if pattern != Pattern::Late {
            w.restart(pattern, off, data.clone());
        }
        Some(data)
    }

    pub async fn read(&self, off: u64, size: u32) -> Result<Bytes, Errno> {
        let (reader, window) = match &self.kind {
            Kind::Read { reader, window } => (reader, window),
            Kind::Write(state) => {
                // Reading a file open for writing (O_RDWR, a shared
                // writable mapping): from the staged copy.
                let mut s = state.lock().await;
                s.stage().await?;
                let st = s.staged.as_ref().ok_or(Errno::EIO)?;
                let n = u64::from(size).min(st.len.saturating_sub(off)) as usize;
                let mut buf = vec![0u8; n];
                std::os::unix::fs::FileExt::read_exact_at(&st.file, &mut buf, off)
                    .map_err(|e| io_errno(&e))?;
                return Ok(Bytes::from(buf));
            }
            Kind::Dir(_) => return Err(Errno::EISDIR),
        };
        let len = reader.len();
        if off >= len {
            return Ok(Bytes::new());
        }
        let want = u64::from(size).min(len - off);
        let mut w = window.lock().await;
        let pattern = w.pattern(off);
        if w.find(off, want).is_none()
            && let Some(n) = w.pending(off)
        {
            for _ in 0..n {
                let Some((at, _, task)) = w.next.pop_front() else {
                    break;
                };
                // One that failed is fetched again below (which reports
                // the error if that fails too).
                if let Ok(Ok(b)) = task.await {
                    w.adopt(at, b);
                }
            }
        }
        if let Some(b) = w.serve(off, want, pattern, reader) {
            return Ok(b);
        }
        if pattern == Pattern::Late {
            // A request that arrived after later ones: fetched alone,
            // leaving the windows and the prefetches as they are (and not
            // holding them from the reads behind it meanwhile).
            drop(w);
            return reader.read_at(off, want).await.map_err(|e| to_errno(&e));
        }
        w.stop_prefetch();
        if pattern != Pattern::Ahead {
            // Random access (or a first step forward): fetch only what was
            // asked, start small again.
            let data = reader.read_at(off, want).await.map_err(|e| to_errno(&e))?;
            w.restart(pattern, off, data.clone());
            return Ok(data);
        }
        // Sequential (or a small jump forward the kernel made): fetch a
        // window and the ones after it.
        let fetch = w
            .size
            .min(reader.block_end(off) - off)
            .max(want)
            .min(len - off);
        let data = reader.read_at(off, fetch).await.map_err(|e| to_errno(&e))?;
        let out = data.slice(..(want as usize).min(data.len()));
        w.reset(off, data, off + out.len() as u64);
        w.sequential = true;
        w.prefetch(reader);
        Ok(out)
    }

    pub async fn write(&self, off: u64, data: &[u8]) -> Result<(), Errno> {
        let Kind::Write(state) = &self.kind else {
            return Err(Errno::EBADF);
        };
        let mut s = state.lock().await;
        if let Some(e) = s.failed {
            return Err(e);
        }
        if s.unlinked {
            return Ok(());
        }
        let at = s.written.load(Ordering::Relaxed);
        if s.staged.is_none() && off != at {
            // Out of order: the file moves to a local staged copy.
            s.stage().await?;
        }
        if let Some(st) = s.staged.as_mut() {
            std::os::unix::fs::FileExt::write_all_at(&st.file, data, off)
                .map_err(|e| io_errno(&e))?;
            st.len = st.len.max(off + data.len() as u64);
            st.dirty = true;
            let len = st.len;
            s.committed = false;
            s.written.store(len, Ordering::Relaxed);
            return Ok(());
        }
        if s.committed {
            // A flush (close of a dup'ed descriptor, fsync) committed the
            // file and the writer goes on: continue as an append.
            s.committed = false;
            s.base = Some(at);
        }
        if s.writer.is_none() {
            s.start_append().await?;
        }
        let Some(w) = s.writer.as_mut() else {
            return Err(Errno::EBADF);
        };
        if let Err(e) = w.write(data).await {
            tracing::warn!(path = %s.path, error = %e, "write failed");
            let e = to_errno(&e);
            s.failed = Some(e);
            return Err(e);
        }
        s.written.fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// The file was truncated to zero while this handle is open for
    /// writing: drop what it wrote; its next write starts a new file.
    pub async fn reset_to_empty(&self) {
        if let Kind::Write(state) = &self.kind {
            let mut s = state.lock().await;
            // An uncommitted writer is replaced by the truncation's file.
            s.writer = None;
            s.written.store(0, Ordering::Relaxed);
            s.base = None;
            s.committed = false;
            s.failed = None;
            if let Some(st) = s.staged.as_mut() {
                let _ = st.file.set_len(0);
                st.len = 0;
                st.dirty = false;
            }
        }
    }

    /// The file open through this handle is being unlinked: nothing it
    /// writes from now on is kept.
    /// The write state of a handle open for writing, locked (after any
    /// commit in progress): nothing is committed through it meanwhile.
    pub async fn lock_write(&self) -> Option<tokio::sync::MutexGuard<'_, WriteState>> {
        match &self.kind {
            Kind::Write(state) => Some(state.lock().await),
            _ => None,
        }
    }

    /// The file open through this handle was renamed to `path`.
    /// Truncates or extends the file open through this handle (`ftruncate`,
    /// as linkers do before writing their output through a mapping).
    pub async fn set_size(&self, size: u64) -> Result<(), Errno> {
        let Kind::Write(state) = &self.kind else {
            return Err(Errno::EBADF);
        };
        let mut s = state.lock().await;
        if let Some(e) = s.failed {
            return Err(e);
        }
        s.stage().await?;
        let st = s.staged.as_mut().ok_or(Errno::EIO)?;
        st.file.set_len(size).map_err(|e| io_errno(&e))?;
        st.len = size;
        st.dirty = true;
        s.committed = false;
        s.written.store(size, Ordering::Relaxed);
        Ok(())
    }

    /// Commits a written file (idempotent; later calls report the first
    /// result).
    pub async fn commit(&self) -> Result<(), Errno> {
        match self.lock_write().await {
            Some(mut s) => s.commit().await,
            None => Ok(()),
        }
    }
}

impl WriteState {
    /// Commits what was written so far (see [`Open::commit`]).
    pub async fn commit(&mut self) -> Result<(), Errno> {
        let s = self;
        if let Some(e) = s.failed {
            return Err(e);
        }
        if s.committed || s.unlinked {
            return Ok(());
        }
        s.committed = true;
        if s.staged.as_ref().is_some_and(|st| st.dirty) {
            if let Err(e) = s.upload_staged().await {
                tracing::warn!(path = %s.path, errno = ?e, "committing a written file failed");
                s.failed = Some(e);
                return Err(e);
            }
            return Ok(());
        }
        if let Some(w) = s.writer.take()
            && let Err(e) = w.close().await
        {
            tracing::warn!(path = %s.path, error = %e, "committing a written file failed");
            let e = to_errno(&e);
            s.failed = Some(e);
            return Err(e);
        }
        Ok(())
    }

    /// A write that failed earlier, if any.
    pub fn failed(&self) -> Option<Errno> {
        self.failed
    }

    /// The file this handle writes is now at `path` (renamed).
    pub fn set_path(&mut self, path: &str) {
        self.path = path.to_string();
    }

    /// Moves the file to a local staged copy (once): what this handle
    /// streamed so far is committed and read back, or the old bytes an
    /// append would have kept are copied.
    async fn stage(&mut self) -> Result<(), Errno> {
        if self.staged.is_some() {
            return Ok(());
        }
        let ctx = self.ctx.clone().ok_or(Errno::EBADF)?;
        let at = self.written.load(Ordering::Relaxed);
        if let Some(w) = self.writer.take() {
            w.close().await.map_err(|e| to_errno(&e))?;
        }
        let file = temp_file().map_err(|e| {
            tracing::warn!(path = %self.path, error = %e, "cannot create a staging file in $TMPDIR");
            io_errno(&e)
        })?;
        if at > 0 {
            let r = ctx
                .client
                .open(&self.path)
                .await
                .map_err(|e| to_errno(&e))?;
            let mut pos = 0u64;
            let mut s = r.stream_range(0, at);
            while let Some(chunk) = s.next().await {
                let chunk = chunk.map_err(|e| to_errno(&e))?;
                std::os::unix::fs::FileExt::write_all_at(&file, &chunk, pos)
                    .map_err(|e| io_errno(&e))?;
                pos += chunk.len() as u64;
            }
        }
        // The old bytes an append kept are in the staged copy now.
        self.base = None;
        self.staged = Some(Staged {
            file,
            len: at,
            dirty: false,
        });
        Ok(())
    }

    /// Writes the staged copy as the file's new version.
    async fn upload_staged(&mut self) -> Result<(), Errno> {
        let ctx = self.ctx.clone().ok_or(Errno::EBADF)?;
        let mut w = ctx
            .new_version(&self.path)
            .await
            .map_err(|e| to_errno(&e))?;
        let st = self.staged.as_mut().ok_or(Errno::EIO)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut pos = 0u64;
        while pos < st.len {
            let n = (st.len - pos).min(buf.len() as u64) as usize;
            if let Err(e) = std::os::unix::fs::FileExt::read_exact_at(&st.file, &mut buf[..n], pos)
            {
                w.abort().await;
                return Err(io_errno(&e));
            }
            if let Err(e) = w.write(&buf[..n]).await {
                w.abort().await;
                return Err(to_errno(&e));
            }
            pos += n as u64;
        }
        w.close().await.map_err(|e| to_errno(&e))?;
        st.dirty = false;
        Ok(())
    }

    /// The first write of an append: rewrite the file with its old bytes
    /// first (objects cannot be appended to in place).
    async fn start_append(&mut self) -> Result<(), Errno> {
        let ctx = self.ctx.clone().ok_or(Errno::EBADF)?;
        // `base` stays until the new version holds the old bytes: a
        // failure here leaves the file as it was, and the next write tries
        // again.
        let base = self.base.unwrap_or(0);
        let old = if base > 0 {
            Some(
                ctx.client
                    .open(&self.path)
                    .await
                    .map_err(|e| to_errno(&e))?,
            )
        } else {
            None
        };
        let mut w = ctx
            .new_version(&self.path)
            .await
            .map_err(|e| to_errno(&e))?;
        if let Some(r) = old {
            let copied = async {
                let mut s = r.stream_range(0, base);
                while let Some(chunk) = s.next().await {
                    let chunk = chunk.map_err(|e| to_errno(&e))?;
                    w.write(&chunk).await.map_err(|e| to_errno(&e))?;
                }
                Ok::<(), Errno>(())
            }
            .await;
            if let Err(e) = copied {
                // Only the unfinished new version goes; the old stays.
                w.abort().await;
                return Err(e);
            }
        }
        self.base = None;
        self.writer = Some(w);
        Ok(())
    }
}

/// Opens a file for writing: truncating (or empty) files get a writer now;
/// others become an append that starts at the first write.
pub async fn open_writer(
    ctx: &Ctx,
    path: &str,
    ino: u64,
    truncate: bool,
    _append: bool,
) -> Result<u64, Errno> {
    // Another descriptor of this mount is writing the file: this one
    // writes through the same handle (the kernel places its writes,
    // appends included, after what the other wrote), and each close
    // commits what both wrote so far.
    if !truncate && let Some(w) = ctx.handles.writers_of(ino).into_iter().next() {
        return Ok(ctx.handles.insert_shared(w));
    }
    let size = if truncate {
        0
    } else {
        ctx.client.stat(path).await.map_err(|e| to_errno(&e))?.size
    };
    let open = if size == 0 {
        let w = ctx.new_version(path).await.map_err(|e| to_errno(&e))?;
        Open::writing(w, ino, 0, ctx.clone())
    } else {
        let written = Arc::new(AtomicU64::new(size));
        Open {
            ino,
            written: Some(written.clone()),
            kind: Kind::Write(Box::new(Mutex::new(WriteState {
                ctx: Some(ctx.clone()),
                path: path.to_string(),
                writer: None,
                written,
                base: Some(size),
                committed: false,
                failed: None,
                staged: None,
                unlinked: false,
            }))),
        }
    };
    Ok(ctx.handles.insert(open))
}

#[derive(Default)]
pub struct Handles {
    map: std::sync::Mutex<HashMap<u64, Arc<Open>>>,
    next: AtomicU64,
    /// Bytes written so far, by inode, while a write handle is open.
    writing: std::sync::Mutex<HashMap<u64, Arc<AtomicU64>>>,
    /// Read-only descriptors of a file this mount is writing: they share
    /// the write handle (reads come from its staged copy).
    aliases: std::sync::Mutex<std::collections::HashSet<u64>>,
    /// The inode table of a restartable mount, which journals the handles
    /// open for writing (so a restarted daemon can fail them, not lose
    /// their data silently).
    journal: std::sync::OnceLock<Arc<std::sync::Mutex<crate::inodes::Inodes>>>,
}

/// File handles of a restarted daemon start at `generation << GEN_SHIFT`,
/// so a handle the kernel got from an earlier daemon is never mistaken
/// for a new one.
const GEN_SHIFT: u32 = 40;

impl Handles {
    /// Handles of the `generation`-th daemon of a restartable mount.
    pub fn for_generation(
        generation: u64,
        journal: Arc<std::sync::Mutex<crate::inodes::Inodes>>,
    ) -> Handles {
        let h = Handles::default();
        let _ = h.journal.set(journal);
        h.next.store(generation << GEN_SHIFT, Ordering::Relaxed);
        h
    }

    /// True when `fh` was handed out by an earlier daemon of this mount.
    pub fn is_inherited(&self, fh: u64) -> bool {
        fh >> GEN_SHIFT < self.next.load(Ordering::Relaxed) >> GEN_SHIFT
    }

    /// True when `fh` is an earlier daemon's handle open for writing: what
    /// was written through it died with that daemon.
    pub fn lost_writer(&self, fh: u64) -> bool {
        self.is_inherited(fh) && self.journal.get().is_some_and(|j| lock(j).is_writer(fh))
    }

    /// Forgets an earlier daemon's handle open for writing.
    pub fn forget_lost_writer(&self, fh: u64) {
        if let Some(j) = self.journal.get() {
            lock(j).writer_closed(fh);
        }
    }

    /// Takes over a handle an earlier daemon handed out (reopened here).
    pub fn adopt(&self, fh: u64, open: Open) -> Arc<Open> {
        let open = Arc::new(open);
        lock(&self.map).insert(fh, open.clone());
        open
    }

    /// A read-only handle on a file open for writing here.
    pub fn insert_alias(&self, open: Arc<Open>) -> u64 {
        let fh = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        lock(&self.map).insert(fh, open);
        lock(&self.aliases).insert(fh);
        fh
    }

    pub fn is_alias(&self, fh: u64) -> bool {
        lock(&self.aliases).contains(&fh)
    }

    /// Forgets a read-only alias; false when `fh` is not one.
    pub fn remove_alias(&self, fh: u64) -> bool {
        if !lock(&self.aliases).remove(&fh) {
            return false;
        }
        lock(&self.map).remove(&fh);
        true
    }

    /// A second descriptor writing through the open write handle `open`.
    pub fn insert_shared(&self, open: Arc<Open>) -> u64 {
        let fh = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        lock(&self.map).insert(fh, open);
        if let Some(j) = self.journal.get() {
            lock(j).writer_opened(fh);
        }
        fh
    }

    pub fn insert(&self, open: Open) -> u64 {
        let fh = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(w) = open.written_counter() {
            lock(&self.writing).insert(open.ino, w);
        }
        let write = open.is_write();
        lock(&self.map).insert(fh, Arc::new(open));
        if write && let Some(j) = self.journal.get() {
            lock(j).writer_opened(fh);
        }
        fh
    }

    /// The handles of descriptors that commit at their close (not the
    /// read-only aliases, which may outlive the writers).
    fn committing(&self) -> Vec<Arc<Open>> {
        let aliases = lock(&self.aliases).clone();
        lock(&self.map)
            .iter()
            .filter(|(fh, _)| !aliases.contains(fh))
            .map(|(_, o)| o.clone())
            .collect()
    }

    /// True while a descriptor that commits `open` at its close still
    /// holds it.
    pub fn is_open(&self, open: &Arc<Open>) -> bool {
        self.committing().iter().any(|o| Arc::ptr_eq(o, open))
    }

    pub fn get(&self, fh: u64) -> Option<Arc<Open>> {
        lock(&self.map).get(&fh).cloned()
    }

    pub fn remove(&self, fh: u64) -> Option<Arc<Open>> {
        let o = lock(&self.map).remove(&fh)?;
        if matches!(o.kind, Kind::Write(_)) {
            // The size written so far stays known while another
            // descriptor still writes through the same handle.
            if !self.is_open(&o) {
                lock(&self.writing).remove(&o.ino);
            }
            if let Some(j) = self.journal.get() {
                lock(j).writer_closed(fh);
            }
        }
        Some(o)
    }

    /// Open write handles of an inode, each once (descriptors sharing one
    /// count once; read-only aliases, which may outlive the writer, not
    /// at all).
    pub fn writers_of(&self, ino: u64) -> Vec<Arc<Open>> {
        self.writers_where(|i| i == ino)
    }

    /// Open write handles, each once, of the inodes `of` accepts.
    pub fn writers_where(&self, of: impl Fn(u64) -> bool) -> Vec<Arc<Open>> {
        let mut out: Vec<Arc<Open>> = Vec::new();
        for o in self.committing() {
            if of(o.ino) && o.is_write() && !out.iter().any(|x| Arc::ptr_eq(x, &o)) {
                out.push(o);
            }
        }
        out
    }

    pub fn written(&self, ino: u64) -> Option<u64> {
        lock(&self.writing)
            .get(&ino)
            .map(|w| w.load(Ordering::Relaxed))
    }

    pub fn len(&self) -> usize {
        lock(&self.map).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Classifies a read of `len` bytes at `off` and moves the window on
    /// as `Open::read` does for it (windows of `len` bytes, no prefetch).
    fn step(w: &mut Window, off: u64, len: u64) -> Pattern {
        let p = w.pattern(off);
        let data = Bytes::from(vec![0u8; len as usize]);
        match p {
            Pattern::Ahead => {
                w.reset(off, data, off + len);
                w.sequential = true;
            }
            Pattern::Late => {}
            Pattern::Near | Pattern::Random => w.restart(p, off, data),
        }
        p
    }

    #[test]
    fn random_reads_fetch_no_windows_and_sequential_ones_do() {
        // 4 KiB reads at pseudo-random offsets over 1 GiB (a fixed LCG):
        // about one in a hundred lands just past the one before it, which
        // must not start read-ahead windows.
        let mut w = Window::new();
        let (mut x, mut near, mut ahead) = (12345u64, 0, 0);
        for _ in 0..20_000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            match step(&mut w, ((x >> 33) % (1 << 18)) << 12, 4096) {
                Pattern::Near => near += 1,
                Pattern::Ahead => ahead += 1,
                _ => {}
            }
        }
        assert!(near > 50, "the sequence has near reads: {near}");
        assert!(ahead <= 2, "{ahead} of 20 000 random reads fetched windows");

        // From the start of the file: sequential at once.
        let mut w = Window::new();
        for i in 0..8 {
            assert!(step(&mut w, i << 20, 1 << 20) == Pattern::Ahead, "read {i}");
        }
        // From elsewhere: one read alone, one step forward, then windows;
        // a request that arrives late changes nothing.
        let mut w = Window::new();
        assert!(step(&mut w, 64 << 20, 1 << 20) == Pattern::Random);
        assert!(step(&mut w, 65 << 20, 1 << 20) == Pattern::Near);
        assert!(step(&mut w, 67 << 20, 1 << 20) == Pattern::Ahead);
        assert!(step(&mut w, 66 << 20, 1 << 20) == Pattern::Late);
        assert!(step(&mut w, 68 << 20, 1 << 20) == Pattern::Ahead);
        // A jump far away starts over.
        assert!(step(&mut w, 900 << 20, 1 << 20) == Pattern::Random);
        assert!(step(&mut w, 901 << 20, 1 << 20) == Pattern::Near);
    }
}
