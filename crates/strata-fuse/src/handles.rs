//! Open files and directories. A read handle serves the kernel from a
//! window fetched ahead while reads are sequential (1 MiB, doubling up to
//! 8 MiB while the reader keeps up, back to 1 MiB on a random read); a write handle streams
//! sequential writes (and appends) into one SDK writer, committed at every
//! flush (each close of a descriptor) or fsync, and at release; a write
//! after a commit continues the file as an append.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use fuser::{Errno, FileType};
use futures::StreamExt;
use strata_client::{Reader, WriteOptions, Writer};
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

pub enum Kind {
    Read {
        reader: Reader,
        window: Mutex<Window>,
    },
    Write(Box<Mutex<WriteState>>),
    Dir(Vec<(u64, FileType, String)>),
}

/// What a read handle fetched: the current window, the one being fetched
/// behind it while reads are sequential, and where the last read ended.
pub struct Window {
    start: u64,
    buf: Bytes,
    last_end: u64,
    next: Option<(u64, tokio::task::JoinHandle<Result<Bytes, Errno>>)>,
    /// Bytes the next prefetch asks for.
    size: u64,
}

impl Window {
    fn covers(&self, off: u64, want: u64) -> bool {
        off >= self.start && off + want <= self.start + self.buf.len() as u64
    }

    /// Starts fetching the window after the current one.
    fn prefetch(&mut self, reader: &Reader) {
        let at = self.start + self.buf.len() as u64;
        if self.next.is_some() || at >= reader.len() || self.buf.is_empty() {
            return;
        }
        let r = reader.clone();
        let len = self.size.min(reader.len() - at);
        // A sequential reader: load the blocks after this one ahead of it.
        reader.prewarm(at, reader.len());
        let task = tokio::spawn(async move { r.read_at(at, len).await.map_err(|e| to_errno(&e)) });
        self.next = Some((at, task));
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        if let Some((_, t)) = self.next.take() {
            t.abort();
        }
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
}

pub struct Open {
    pub kind: Kind,
    pub ino: u64,
    /// For write handles: the file's size so far.
    written: Option<Arc<AtomicU64>>,
}

impl Open {
    pub fn reading(reader: Reader) -> Open {
        Open {
            ino: 0,
            written: None,
            kind: Kind::Read {
                reader,
                window: Mutex::new(Window {
                    start: 0,
                    buf: Bytes::new(),
                    last_end: u64::MAX,
                    next: None,
                    size: MIN_WINDOW,
                }),
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
            }))),
        }
    }

    pub fn dir(entries: Vec<(u64, FileType, String)>) -> Open {
        Open {
            ino: 0,
            written: None,
            kind: Kind::Dir(entries),
        }
    }

    pub fn is_write(&self) -> bool {
        matches!(self.kind, Kind::Write(_))
    }

    pub fn entries(&self) -> Option<&[(u64, FileType, String)]> {
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

    pub async fn read(&self, off: u64, size: u32) -> Result<Bytes, Errno> {
        let Kind::Read { reader, window } = &self.kind else {
            // Reading a file open for writing would see the old bytes.
            return Err(Errno::EBADF);
        };
        let len = reader.len();
        if off >= len {
            return Ok(Bytes::new());
        }
        let want = u64::from(size).min(len - off);
        let mut w = window.lock().await;
        let sequential = w.last_end != u64::MAX && off >= w.last_end && off - w.last_end <= JUMP;
        if !w.covers(off, want)
            && let Some((at, _)) = &w.next
            && off >= *at
            && off < *at + w.size
            && let Some((at, task)) = w.next.take()
        {
            // The reader caught up with the prefetched window: it is
            // sequential, so the next window is larger.
            match task.await {
                Ok(Ok(b)) => {
                    w.start = at;
                    w.buf = b;
                    w.size = (w.size * 2).min(MAX_WINDOW);
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => {}
            }
        }
        if w.covers(off, want) {
            let s = (off - w.start) as usize;
            w.last_end = off + want;
            let out = w.buf.slice(s..s + want as usize);
            if sequential || off == 0 {
                w.prefetch(reader);
            }
            return Ok(out);
        }
        // Sequential (or a small jump forward the kernel made): fetch a
        // window and the next one behind it; random reads fetch only what
        // was asked.
        if let Some((_, t)) = w.next.take() {
            t.abort();
        }
        let windowed = sequential || off == 0;
        let fetch = if windowed {
            w.size.max(want).min(len - off)
        } else {
            // Random access: fetch only what was asked, start small again.
            w.size = MIN_WINDOW;
            want
        };
        let data = reader.read_at(off, fetch).await.map_err(|e| to_errno(&e))?;
        let out = data.slice(..(want as usize).min(data.len()));
        w.start = off;
        w.buf = data;
        w.last_end = off + out.len() as u64;
        if windowed {
            w.prefetch(reader);
        }
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
        let at = s.written.load(Ordering::Relaxed);
        if s.committed {
            // A flush (close of a dup'ed descriptor, fsync) committed the
            // file and the writer goes on: continue as an append.
            s.committed = false;
            s.base = Some(at);
        }
        if off != at {
            // Only sequential writes and appends are supported.
            return Err(Errno::EOPNOTSUPP);
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
        }
    }

    /// Commits a written file (idempotent; later calls report the first
    /// result).
    pub async fn commit(&self) -> Result<(), Errno> {
        let Kind::Write(state) = &self.kind else {
            return Ok(());
        };
        let mut s = state.lock().await;
        if let Some(e) = s.failed {
            return Err(e);
        }
        if s.committed {
            return Ok(());
        }
        s.committed = true;
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
}

impl WriteState {
    /// The first write of an append: rewrite the file with its old bytes
    /// first (objects cannot be appended to in place).
    async fn start_append(&mut self) -> Result<(), Errno> {
        let ctx = self.ctx.clone().ok_or(Errno::EBADF)?;
        let base = self.base.take().unwrap_or(0);
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
        let opts = WriteOptions {
            write_type: ctx.write_type,
            overwrite: true,
            recursive: false,
            priority: 0,
        };
        let mut w = ctx
            .client
            .create(&self.path, opts)
            .await
            .map_err(|e| to_errno(&e))?;
        if let Some(r) = old {
            let mut s = r.stream_range(0, base);
            while let Some(chunk) = s.next().await {
                let chunk = chunk.map_err(|e| to_errno(&e))?;
                w.write(&chunk).await.map_err(|e| to_errno(&e))?;
            }
        }
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
    let size = if truncate {
        0
    } else {
        ctx.client.stat(path).await.map_err(|e| to_errno(&e))?.size
    };
    let open = if size == 0 {
        let opts = WriteOptions {
            write_type: ctx.write_type,
            overwrite: true,
            recursive: false,
            priority: 0,
        };
        let w = ctx
            .client
            .create(path, opts)
            .await
            .map_err(|e| to_errno(&e))?;
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
}

impl Handles {
    pub fn insert(&self, open: Open) -> u64 {
        let fh = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(w) = open.written_counter() {
            lock(&self.writing).insert(open.ino, w);
        }
        lock(&self.map).insert(fh, Arc::new(open));
        fh
    }

    pub fn get(&self, fh: u64) -> Option<Arc<Open>> {
        lock(&self.map).get(&fh).cloned()
    }

    pub fn remove(&self, fh: u64) -> Option<Arc<Open>> {
        let o = lock(&self.map).remove(&fh)?;
        if matches!(o.kind, Kind::Write(_)) {
            lock(&self.writing).remove(&o.ino);
        }
        Some(o)
    }

    /// Open write handles of an inode.
    pub fn writers_of(&self, ino: u64) -> Vec<Arc<Open>> {
        lock(&self.map)
            .values()
            .filter(|o| o.ino == ino && o.is_write())
            .cloned()
            .collect()
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
