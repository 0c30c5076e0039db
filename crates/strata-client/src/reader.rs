//! Reading files: positional reads and an ordered stream that fetches
//! `client.read_ahead_blocks` chunks in parallel ahead of the consumer.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt, TryStreamExt, stream};
use strata_common::CacheId;
use strata_common::ids::PageKey;
use strata_proto::data::{ErrorCode, Message};
use strata_proto::pb::FileInfo;

use crate::{Client, ClientError, Result};

#[derive(Clone)]
pub struct Reader {
    client: Client,
    info: Arc<FileInfo>,
    cache_id: CacheId,
    /// Blocks below this index have been scheduled by [`Reader::prewarm`].
    prewarmed: Arc<AtomicU64>,
}

enum Want {
    Data,
    LoadOnly,
}

impl Reader {
    pub(crate) fn new(client: Client, info: FileInfo) -> Result<Reader> {
        if info.is_dir {
            return Err(ClientError::FailedPrecondition(format!(
                "{}: is a directory",
                info.path
            )));
        }
        if !info.complete {
            return Err(ClientError::FailedPrecondition(format!(
                "{}: is still being written (not yet closed by its writer)",
                info.path
            )));
        }
        let cache_id = CacheId::from_hex(&info.cache_id)
            .ok_or_else(|| ClientError::Other(format!("{}: master sent no cache id", info.path)))?;
        Ok(Reader {
            client,
            info: Arc::new(info),
            cache_id,
            prewarmed: Arc::new(AtomicU64::new(0)),
        })
    }

    /// The complete copy of this file in the heavy-client cache, opened
    /// read-only and kept (never evicted) until the returned value is
    /// dropped; `None` without a local cache or unless every page is there.
    pub fn local_file(&self) -> Option<crate::LocalFile> {
        let lc = self.client.inner.local_cache.as_ref()?;
        lc.whole_file(self.cache_id.0, self.info.page_size, self.info.size)
    }

    pub fn info(&self) -> &FileInfo {
        &self.info
    }

    pub fn len(&self) -> u64 {
        self.info.size
    }

    pub fn is_empty(&self) -> bool {
        self.info.size == 0
    }

    /// End offset of the block holding `off`, and the block index.
    pub(crate) fn block_bounds(&self, off: u64) -> (u64, u64) {
        let bs = self.info.block_size.max(1);
        let block = off / bs;
        ((block + 1) * bs, block)
    }

    /// Splits `[off, off+len)` into requests that stay inside one block.
    fn pieces(&self, off: u64, len: u64) -> Vec<(u64, u64)> {
        let end = off.saturating_add(len).min(self.info.size);
        let chunk = self.client.inner.cfg.read_chunk.0.max(1);
        let mut out = Vec::new();
        let mut pos = off;
        while pos < end {
            let (block_end, _) = self.block_bounds(pos);
            let e = (pos + chunk).min(block_end).min(end);
            out.push((pos, e - pos));
            pos = e;
        }
        out
    }

    async fn exchange(&self, off: u64, len: u64, want: Want) -> Result<(Vec<Bytes>, u64, u64)> {
        let (_, block) = self.block_bounds(off);
        let spec = Client::read_spec(&self.info, off, len)?;
        let msg = match want {
            Want::Data => Message::Read(spec),
            Want::LoadOnly => Message::Load(spec),
        };
        let mut last_err = None;
        // A connection failure may mean the owner died: refresh the worker
        // list and try the next worker in the block's ranking, which holds
        // the replica of a replicated write (or fetches persisted data from
        // the UFS), even before the master declares the owner dead.
        // Reads of a hot block (or of a path with a minimum replication)
        // are spread over the first `spread` workers of its ranking.
        let data = matches!(want, Want::Data);
        let spread = if data {
            self.client.spread(self.cache_id, block, &self.info)
        } else {
            1
        };
        // When every candidate is unreachable (a worker restarting, the only
        // holder of a block down), the read waits and tries again, for up
        // to `client.failover_timeout_secs`, instead of failing at once.
        let deadline = std::time::Instant::now()
            + std::time::Duration::from_secs(self.client.inner.cfg.failover_timeout_secs);
        let mut pause = std::time::Duration::from_millis(100);
        let mut failed: Vec<String> = Vec::new();
        let mut attempt = 0;
        loop {
            if attempt >= 3 {
                if std::time::Instant::now() + pause > deadline {
                    break;
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_secs(1));
                failed.clear();
                attempt = 1;
            }
            attempt += 1;
            let ranked = self
                .client
                .owners(
                    self.cache_id,
                    block,
                    (failed.len() + 1).max(spread),
                    attempt > 1,
                )
                .await?;
            let pick = if attempt == 1 && spread > 1 {
                self.client.next_pick() % ranked.len()
            } else {
                0
            };
            let Some(addr) = ranked[pick..]
                .iter()
                .chain(ranked.iter())
                .find(|a| !failed.contains(a))
                .cloned()
            else {
                // Every candidate failed: wait (above) and start over.
                attempt = 3;
                continue;
            };
            match self.exchange_with(&addr, &msg).await {
                Err(e @ ClientError::Connection { .. }) => {
                    self.client.inner.pool.drop_addr(&addr);
                    failed.push(addr);
                    last_err = Some(e);
                }
                Ok((frames, c, u, replicas)) => {
                    if data {
                        self.client.note_heat(self.cache_id, block, replicas);
                    }
                    return Ok((frames, c, u));
                }
                Err(e) => return Err(e),
            }
        }
        Err(last_err.unwrap_or_else(|| ClientError::Other("read failed".into())))
    }

    /// `[off, off + len)` (inside one block) from the heavy-client cache
    /// when it has every page, else from the workers; with the cache on,
    /// whole pages are fetched and kept.
    async fn fetch(&self, off: u64, len: u64) -> Result<Vec<Bytes>> {
        let Some(lc) = &self.client.inner.local_cache else {
            return self.exchange(off, len, Want::Data).await.map(|r| r.0);
        };
        let (ps, size) = (self.info.page_size, self.info.size);
        if let Some(b) = lc.read(self.cache_id.0, ps, size, off, len) {
            return Ok(vec![b]);
        }
        let limit = self.block_bounds(off).0.min(size);
        let (ao, al) = crate::local_cache::LocalCache::aligned(ps, off, len, limit);
        let frames = self.exchange(ao, al, Want::Data).await?.0;
        lc.store(self.cache_id.0, ps, size, ao, frames.clone());
        Ok(crate::local_cache::slice_frames(&frames, off - ao, len))
    }

    async fn exchange_with(&self, addr: &str, msg: &Message) -> Result<(Vec<Bytes>, u64, u64, u8)> {
        let pool = &self.client.inner.pool;
        let mut c = pool.get(addr).await?;
        c.send(msg).await?;
        c.flush().await?;
        let mut frames = Vec::new();
        loop {
            match c.recv().await? {
                Message::Data(b) => frames.push(b),
                Message::End {
                    cached_pages,
                    ufs_pages,
                    replicas,
                    ..
                } => {
                    pool.put(c);
                    return Ok((frames, cached_pages, ufs_pages, replicas));
                }
                Message::Error { code, message } => {
                    pool.put(c);
                    return Err(match code {
                        ErrorCode::Stale => ClientError::Changed {
                            path: self.info.path.clone(),
                        },
                        _ => ClientError::Worker {
                            addr: addr.to_string(),
                            code,
                            msg: format!("{}: {message}", self.info.path),
                        },
                    });
                }
                other => {
                    return Err(ClientError::Connection {
                        addr: addr.to_string(),
                        msg: format!("unexpected reply {other:?}"),
                    });
                }
            }
        }
    }

    /// Short-circuit read of `[off, off+len)` inside one block from the page
    /// files of a worker on this host, done by `read` on the (file, offset,
    /// length) parts in order; `None` when any page is not available that
    /// way (the caller reads over the network).
    /// Whether a read of `len` bytes at `off` may go to page files of a
    /// worker on this host: short-circuit reads are on, this is not a
    /// heavy client (which reads, and keeps, its own copy), and the read
    /// stays in one block.
    fn short_circuits(&self, off: u64, len: u64) -> bool {
        self.client.inner.cfg.short_circuit
            && self.client.inner.local_cache.is_none()
            && len > 0
            && off + len <= self.block_bounds(off).0
    }

    /// The open page file that holds all `len` bytes at `off`, if one does
    /// (the bytes under a page key never change, wherever it is owned).
    fn open_page(&self, off: u64, len: u64) -> Option<crate::short_circuit::Part> {
        let (_, block) = self.block_bounds(off);
        let ps = self.info.page_size.max(1);
        let in_block = off - block * self.info.block_size;
        let skip = in_block % ps;
        if skip + len > ps {
            return None;
        }
        let k = PageKey {
            cache_id: self.cache_id,
            block,
            page: (in_block / ps) as u32,
        };
        let f = self.client.inner.short_circuit.get(&k, len >= 64 << 10)?;
        Some((f, skip, len))
    }

    /// Reads `len` bytes at `off` (clipped to the file) without waiting on
    /// anything but the disk, if they lie in one page of a worker on this
    /// host whose file this client has open already; `None` otherwise
    /// (then `read_at`). For a caller on a thread that must not wait for
    /// the async runtime (a FUSE request thread serving random reads).
    pub fn read_open_page(&self, off: u64, len: u64) -> Option<Bytes> {
        let len = len.min(self.info.size.saturating_sub(off));
        if !self.short_circuits(off, len) {
            return None;
        }
        crate::short_circuit::read_pages(&[self.open_page(off, len)?])
    }

    async fn read_local<T>(
        &self,
        off: u64,
        len: u64,
        read: impl FnOnce(&[crate::short_circuit::Part]) -> Option<T>,
    ) -> Option<T> {
        if !self.short_circuits(off, len) {
            return None;
        }
        let read = match self.open_page(off, len) {
            Some(part) => return read(&[part]),
            None => read,
        };
        let (_, block) = self.block_bounds(off);
        let sc = &self.client.inner.short_circuit;
        let addr = self.client.owner(self.cache_id, block, false).await.ok()?;
        if !crate::short_circuit::is_local(&addr) {
            return None;
        }
        let g = strata_common::Geometry {
            block_size: self.info.block_size,
            page_size: self.info.page_size,
        };
        let spans = g.spans(self.info.size, off, len);
        let key = |s: &strata_common::geometry::PageSpan| PageKey {
            cache_id: self.cache_id,
            block: s.block,
            page: s.page,
        };
        let mut files: Vec<Option<std::sync::Arc<crate::short_circuit::PageFile>>> =
            spans.iter().map(|s| sc.get(&key(s), true)).collect();
        if files.iter().any(Option::is_none) {
            let spec = Client::read_spec(&self.info, off, len).ok()?;
            let mut c = self.client.inner.pool.get(&addr).await.ok()?;
            c.send(&Message::Locate(spec)).await.ok()?;
            c.flush().await.ok()?;
            let reply = c.recv().await.ok()?;
            self.client.inner.pool.put(c);
            let Message::Located { pages } = reply else {
                return None;
            };
            for p in pages {
                if let Some(i) = spans
                    .iter()
                    .position(|s| s.block == p.block && s.page == p.page)
                    && files[i].is_none()
                {
                    files[i] = sc.insert(key(&spans[i]), &p.path);
                }
            }
        }
        let parts: Vec<_> = spans
            .iter()
            .zip(files)
            .map(|(s, f)| f.map(|f| (f, s.skip, s.take)))
            .collect::<Option<_>>()?;
        read(&parts)
    }

    /// The page files on this host's worker that hold cached pages of this
    /// file, in file order, as (file offset of the page, path). Pages not
    /// cached by a worker on this host are absent. For benchmarks and
    /// diagnostics: the files may be evicted or moved at any time.
    pub async fn local_page_files(&self) -> Result<Vec<(u64, String)>> {
        let ps = self.info.page_size.max(1);
        let step = ps * strata_proto::data::MAX_LOCATED as u64;
        let mut out = Vec::new();
        let mut off = 0;
        while off < self.info.size {
            let (block_end, block) = self.block_bounds(off);
            let len = step.min(block_end - off).min(self.info.size - off);
            let addr = self.client.owner(self.cache_id, block, false).await?;
            if crate::short_circuit::is_local(&addr) {
                let spec = Client::read_spec(&self.info, off, len)?;
                let mut c = self.client.inner.pool.get(&addr).await?;
                c.send(&Message::Locate(spec)).await?;
                c.flush().await?;
                let reply = c.recv().await?;
                self.client.inner.pool.put(c);
                if let Message::Located { pages } = reply {
                    out.extend(
                        pages
                            .into_iter()
                            .map(|p| (p.block * self.info.block_size + p.page as u64 * ps, p.path)),
                    );
                }
            }
            off += len;
        }
        out.sort();
        Ok(out)
    }

    /// Reads into `buf` from `off` (clipped to the file); returns the bytes
    /// read. Short-circuit reads land in `buf` directly with no
    /// intermediate buffer; network reads are copied in once.
    pub async fn read_into(&self, off: u64, buf: &mut [u8]) -> Result<usize> {
        let n = (buf.len() as u64).min(self.info.size.saturating_sub(off)) as usize;
        let dst = &mut buf[..n];
        if self
            .read_local(off, n as u64, |parts| {
                crate::short_circuit::read_pages_into(parts, dst)
            })
            .await
            .is_some()
        {
            return Ok(n);
        }
        let b = self.read_at(off, n as u64).await?;
        buf[..b.len()].copy_from_slice(&b);
        Ok(b.len())
    }

    /// Reads `len` bytes at `off` (clipped to the file).
    pub async fn read_at(&self, off: u64, len: u64) -> Result<Bytes> {
        let clipped = len.min(self.info.size.saturating_sub(off));
        if let Some(b) = self
            .read_local(off, clipped, crate::short_circuit::read_pages)
            .await
        {
            return Ok(b);
        }
        let pieces = self.pieces(off, len);
        let parallel = self.client.inner.cfg.read_ahead_blocks.max(1);
        let mut parts: Vec<Bytes> = stream::iter(pieces)
            .map(|(o, l)| self.fetch(o, l))
            .buffered(parallel)
            .try_fold(Vec::new(), |mut acc, v| async move {
                acc.extend(v);
                Ok(acc)
            })
            .await?;
        if parts.len() == 1 {
            return Ok(parts.remove(0));
        }
        let mut out = BytesMut::with_capacity(parts.iter().map(|b| b.len()).sum());
        for p in parts {
            out.extend_from_slice(&p);
        }
        Ok(out.freeze())
    }

    /// Real-time prewarm: a reader at `off` that will go on sequentially up
    /// to `until` has the next `client.prewarm_blocks` blocks after its own
    /// loaded on their owner workers (UFS to cache, nothing sent back), each
    /// block once per reader. The loads run in the background; a failure
    /// only means the reader fetches those pages itself later. Does nothing
    /// outside a Tokio runtime.
    pub fn prewarm(&self, off: u64, until: u64) {
        let k = self.client.inner.cfg.prewarm_blocks;
        let bs = self.info.block_size;
        let until = until.min(self.info.size);
        if k == 0 || bs == 0 || off >= until {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (_, block) = self.block_bounds(off);
        let last = (until - 1) / bs;
        let upto = (block + 1 + k).min(last + 1);
        let from = self
            .prewarmed
            .fetch_max(upto, Ordering::AcqRel)
            .max(block + 1);
        self.load_blocks(&rt, from..upto);
    }

    /// Loads `blocks` on their owners in the background (prewarm); a failure
    /// only means the reader fetches those pages itself later.
    fn load_blocks(&self, rt: &tokio::runtime::Handle, blocks: std::ops::Range<u64>) {
        let bs = self.info.block_size;
        for b in blocks {
            let me = self.clone();
            rt.spawn(async move {
                let start = b * bs;
                let len = bs.min(me.info.size - start);
                if let Err(e) = me.load_range(start, len).await {
                    tracing::debug!(path = %me.info.path, block = b, "prewarm failed: {e}");
                }
            });
        }
    }

    /// Prewarm for a client that reads a file in consecutive pieces, each
    /// with its own reader (an S3 client's ranged GETs): having read up to
    /// `end`, the block holding `end` and the `client.prewarm_blocks - 1`
    /// after it are loaded on their owners, except blocks below
    /// `scheduled` (already asked for by an earlier piece). Returns the new
    /// `scheduled` bound for the caller to keep.
    pub fn prewarm_after(&self, end: u64, scheduled: u64) -> u64 {
        let k = self.client.inner.cfg.prewarm_blocks;
        let bs = self.info.block_size;
        if k == 0 || bs == 0 || end >= self.info.size {
            return scheduled;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return scheduled;
        };
        let first = end / bs;
        let upto = (first + k).min(self.info.size.div_ceil(bs));
        self.load_blocks(&rt, first.max(scheduled)..upto);
        upto.max(scheduled)
    }

    /// The file from `off` to the end as an ordered stream of chunks, with
    /// up to `client.read_ahead_blocks` requests in flight.
    pub fn stream(&self, off: u64) -> impl Stream<Item = Result<Bytes>> + Send + 'static {
        self.stream_range(off, self.info.size.saturating_sub(off))
    }

    /// Like [`Reader::stream`], for `[off, off + len)`.
    pub fn stream_range(
        &self,
        off: u64,
        len: u64,
    ) -> impl Stream<Item = Result<Bytes>> + Send + 'static {
        let me = self.clone();
        let pieces = self.pieces(off, len);
        let parallel = self.client.inner.cfg.read_ahead_blocks.max(1);
        let until = off.saturating_add(len);
        stream::iter(pieces)
            .map(move |(o, l)| {
                let me = me.clone();
                me.prewarm(o, until);
                async move {
                    // Pages on this host are mapped, not copied: a stream's
                    // frames usually go on to a socket, which copies them.
                    if let Some(frames) = me.read_local(o, l, crate::short_circuit::map_pages).await
                    {
                        return Ok(frames);
                    }
                    me.fetch(o, l).await
                }
            })
            .buffered(parallel)
            .map_ok(|frames| stream::iter(frames.into_iter().map(Ok)))
            .try_flatten()
    }

    /// Caches a range on its owner without transferring it; returns
    /// (pages already cached, pages fetched from the UFS).
    /// Has the workers ranked 2..=`n` for the block holding `off` cache
    /// `[off, off+len)` too (they copy it from the owner, which must hold
    /// it already); returns the pages they fetched from the UFS.
    pub async fn load_replicas(&self, off: u64, len: u64, n: usize) -> Result<u64> {
        if n <= 1 {
            return Ok(0);
        }
        let (_, block) = self.block_bounds(off);
        let spec = Client::read_spec(&self.info, off, len)?;
        let msg = Message::Load(spec);
        let mut ufs = 0;
        for addr in self
            .client
            .owners(self.cache_id, block, n, false)
            .await?
            .iter()
            .skip(1)
        {
            let (_, _, u, _) = self.exchange_with(addr, &msg).await?;
            ufs += u;
        }
        Ok(ufs)
    }

    /// The data address of the worker that owns the block holding `off`.
    pub async fn owner_of(&self, off: u64) -> Result<String> {
        let (_, block) = self.block_bounds(off);
        self.client.owner(self.cache_id, block, false).await
    }

    /// End offset of the block holding `off` (for splitting work by block).
    pub fn block_end(&self, off: u64) -> u64 {
        self.block_bounds(off).0
    }

    /// Has the owner worker cache `[off, off+len)` (one block at most)
    /// without sending the bytes back; returns (pages cached already, pages
    /// fetched from the UFS).
    pub async fn load_range(&self, off: u64, len: u64) -> Result<(u64, u64)> {
        let (_, c, u) = self.exchange(off, len, Want::LoadOnly).await?;
        Ok((c, u))
    }
}
