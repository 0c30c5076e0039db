//! Reading files: positional reads and an ordered stream that fetches
//! `client.read_ahead_blocks` chunks in parallel ahead of the consumer.

use std::sync::Arc;

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
        })
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
        // A connection failure may mean the owner left: refresh and retry once.
        for attempt in 0..2 {
            let addr = self.client.owner(self.cache_id, block, attempt > 0).await?;
            match self.exchange_with(&addr, &msg).await {
                Err(e @ ClientError::Connection { .. }) => {
                    self.client.inner.pool.drop_addr(&addr);
                    last_err = Some(e);
                }
                other => return other,
            }
        }
        Err(last_err.unwrap_or_else(|| ClientError::Other("read failed".into())))
    }

    async fn exchange_with(&self, addr: &str, msg: &Message) -> Result<(Vec<Bytes>, u64, u64)> {
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
                    ..
                } => {
                    pool.put(c);
                    return Ok((frames, cached_pages, ufs_pages));
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
    /// files of a worker on this host; `None` when any page is not
    /// available that way (the caller reads over the network).
    async fn read_local(&self, off: u64, len: u64) -> Option<Bytes> {
        if !self.client.inner.cfg.short_circuit || len == 0 {
            return None;
        }
        let (block_end, block) = self.block_bounds(off);
        if off + len > block_end {
            return None;
        }
        let addr = self.client.owner(self.cache_id, block, false).await.ok()?;
        if !crate::short_circuit::is_local(&addr) {
            return None;
        }
        let g = strata_common::Geometry {
            block_size: self.info.block_size,
            page_size: self.info.page_size,
        };
        let spans = g.spans(self.info.size, off, len);
        let sc = &self.client.inner.short_circuit;
        let key = |s: &strata_common::geometry::PageSpan| PageKey {
            cache_id: self.cache_id,
            block: s.block,
            page: s.page,
        };
        let mut files: Vec<Option<std::sync::Arc<std::fs::File>>> =
            spans.iter().map(|s| sc.get(&key(s))).collect();
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
        crate::short_circuit::read_pages(&parts)
    }

    /// Reads `len` bytes at `off` (clipped to the file).
    pub async fn read_at(&self, off: u64, len: u64) -> Result<Bytes> {
        let clipped = len.min(self.info.size.saturating_sub(off));
        if let Some(b) = self.read_local(off, clipped).await {
            return Ok(b);
        }
        let pieces = self.pieces(off, len);
        let parallel = self.client.inner.cfg.read_ahead_blocks.max(1);
        let mut parts: Vec<Bytes> = stream::iter(pieces)
            .map(|(o, l)| async move { self.exchange(o, l, Want::Data).await.map(|r| r.0) })
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
        stream::iter(pieces)
            .map(move |(o, l)| {
                let me = me.clone();
                async move { me.exchange(o, l, Want::Data).await.map(|r| r.0) }
            })
            .buffered(parallel)
            .map_ok(|frames| stream::iter(frames.into_iter().map(Ok)))
            .try_flatten()
    }

    /// Caches a range on its owner without transferring it; returns
    /// (pages already cached, pages fetched from the UFS).
    pub(crate) async fn load_range(&self, off: u64, len: u64) -> Result<(u64, u64)> {
        let (_, c, u) = self.exchange(off, len, Want::LoadOnly).await?;
        Ok((c, u))
    }
}
