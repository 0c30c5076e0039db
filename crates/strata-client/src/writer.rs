//! Writing files. MUST_CACHE sends each block to its owner worker, pinned;
//! ASYNC_THROUGH does the same on the block's first `client.async_replicas`
//! workers, and the master then persists the file in the background;
//! CACHE_THROUGH and THROUGH stream the whole file through one worker, which
//! writes the UFS object and returns its fingerprint before `close` returns.

use bytes::{Bytes, BytesMut};
use strata_common::CacheId;
use strata_proto::data::{ErrorCode, Message, WriteMode, WriteSpec};
use strata_proto::pb::{self, FileInfo, WriteType};

use crate::conn::DataConn;
use crate::{Client, ClientError, Result};

/// Bytes gathered before a `Data` frame is sent.
const FRAME: usize = 4 << 20;

#[derive(Clone, Copy, Debug)]
pub struct WriteOptions {
    pub write_type: WriteType,
    pub overwrite: bool,
    /// Create missing parent directories.
    pub recursive: bool,
    /// 0..=8: how much of the file may stay in the workers' memory tier
    /// (`worker.priority_mem_base + priority × worker.priority_mem_step`);
    /// the rest goes to their disk tiers.
    pub priority: u8,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions {
            write_type: WriteType::CacheThrough,
            overwrite: false,
            recursive: true,
            priority: 0,
        }
    }
}

struct Sink {
    conn: DataConn,
    /// For MUST_CACHE: the block this stream carries.
    block: u64,
}

pub struct Writer {
    client: Client,
    info: FileInfo,
    mode: WriteMode,
    cache_id: CacheId,
    buf: BytesMut,
    sent: u64,
    /// The open block streams: one per replica (one for all but ASYNC_THROUGH).
    sinks: Vec<Sink>,
    replicas: usize,
    done: Option<(String, i64)>,
    priority: u8,
    /// Extended attributes the file gets when it is completed.
    xattrs: Option<std::collections::HashMap<String, Vec<u8>>>,
}

/// The master call that creates the file at `path`; `complete_empty`
/// creates it empty and complete at once (MUST_CACHE only).
pub(crate) fn create_request(
    path: &str,
    opts: &WriteOptions,
    complete_empty: bool,
) -> Result<pb::CreateFileRequest> {
    let p = strata_common::NsPath::parse(path)
        .map_err(|e| ClientError::InvalidArgument(e.to_string()))?;
    Ok(pb::CreateFileRequest {
        path: p.to_string(),
        write_type: opts.write_type as i32,
        overwrite: opts.overwrite,
        recursive: opts.recursive,
        complete_empty,
    })
}

impl Writer {
    pub(crate) async fn create(client: Client, path: &str, opts: WriteOptions) -> Result<Writer> {
        let req = create_request(path, &opts, false)?;
        if opts.priority > strata_proto::data::MAX_PRIORITY {
            return Err(ClientError::InvalidArgument(format!(
                "write priority {} for {path} is above {} (use 0..=8)",
                opts.priority,
                strata_proto::data::MAX_PRIORITY
            )));
        }
        let info = client
            .mutate_info(pb::mutation::Op::CreateFile(req))
            .await?;
        let cache_id = CacheId::for_inode(info.id, info.generation);
        let mode = match opts.write_type {
            WriteType::CacheThrough => WriteMode::CacheThrough,
            WriteType::Through => WriteMode::Through,
            _ => WriteMode::MustCache,
        };
        let replicas = match opts.write_type {
            WriteType::AsyncThrough => client.inner.cfg.async_replicas.max(1),
            _ => 1,
        };
        Ok(Writer {
            client,
            info,
            mode,
            cache_id,
            buf: BytesMut::with_capacity(FRAME),
            sent: 0,
            sinks: Vec::new(),
            replicas,
            done: None,
            priority: opts.priority,
            xattrs: None,
        })
    }

    pub fn path(&self) -> &str {
        &self.info.path
    }

    pub async fn write(&mut self, mut data: &[u8]) -> Result<()> {
        while !data.is_empty() {
            let room = FRAME - self.buf.len();
            let n = room.min(data.len());
            self.buf.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.buf.len() >= FRAME {
                self.flush_buf().await?;
            }
        }
        Ok(())
    }

    async fn flush_buf(&mut self) -> Result<()> {
        while !self.buf.is_empty() {
            let take = match self.mode {
                WriteMode::MustCache => {
                    let bs = self.info.block_size.max(1);
                    let to_block_end = bs - self.sent % bs;
                    (to_block_end as usize).min(self.buf.len())
                }
                _ => self.buf.len(),
            };
            let piece = self.buf.split_to(take).freeze();
            self.send(piece).await?;
        }
        Ok(())
    }

    async fn open_sinks(&mut self, block: u64) -> Result<()> {
        let addrs = self
            .client
            .owners(self.cache_id, block, self.replicas, false)
            .await?;
        for addr in addrs {
            let mut conn = self.client.inner.pool.get(&addr).await?;
            conn.send(&Message::WriteBegin(WriteSpec {
                mode: self.mode,
                cache_id: self.cache_id.0,
                mount_id: self.info.mount_id,
                ufs_path: self.info.ufs_path.clone(),
                block_size: self.info.block_size,
                page_size: self.info.page_size,
                offset: block * self.info.block_size,
                priority: self.priority,
            }))
            .await?;
            self.sinks.push(Sink { conn, block });
        }
        Ok(())
    }

    async fn send(&mut self, piece: Bytes) -> Result<()> {
        let block = match self.mode {
            WriteMode::MustCache => self.sent / self.info.block_size.max(1),
            _ => 0,
        };
        if self.sinks.first().map(|s| s.block) != Some(block) {
            self.finish_sinks().await?;
            self.open_sinks(block).await?;
        }
        self.sent += piece.len() as u64;
        for s in &mut self.sinks {
            s.conn.send(&Message::Data(piece.clone())).await?;
        }
        Ok(())
    }

    async fn finish_sinks(&mut self) -> Result<()> {
        for s in std::mem::take(&mut self.sinks) {
            self.finish_sink(s).await?;
        }
        Ok(())
    }

    async fn finish_sink(&mut self, mut s: Sink) -> Result<()> {
        s.conn.send(&Message::WriteEnd).await?;
        s.conn.flush().await?;
        let addr = s.conn.addr.clone();
        match s.conn.recv().await? {
            Message::WriteDone {
                fingerprint,
                mtime_ms,
                ..
            } => {
                self.client.inner.pool.put(s.conn);
                self.done = Some((fingerprint, mtime_ms));
                Ok(())
            }
            Message::Error { code, message } => {
                self.client.inner.pool.put(s.conn);
                Err(ClientError::Worker {
                    addr,
                    code,
                    msg: format!("writing {}: {message}", self.info.path),
                })
            }
            other => Err(ClientError::Connection {
                addr,
                msg: format!("unexpected reply to a write: {other:?}"),
            }),
        }
    }

    /// Gives the file exactly these extended attributes when it is
    /// completed (an object's metadata; without this call they are kept).
    pub fn set_xattrs(&mut self, xattrs: impl IntoIterator<Item = (String, Vec<u8>)>) {
        self.xattrs = Some(xattrs.into_iter().collect());
    }

    /// Completes the file; it is visible to readers once this returns.
    pub async fn close(mut self) -> Result<FileInfo> {
        let res = self.close_inner().await;
        if res.is_err() {
            self.abort_ref().await;
        }
        res
    }

    async fn close_inner(&mut self) -> Result<FileInfo> {
        self.flush_buf().await?;
        if self.sinks.is_empty() && self.mode != WriteMode::MustCache {
            // An empty file still needs its UFS object.
            self.open_sinks(0).await?;
        }
        self.finish_sinks().await?;
        let (fingerprint, mtime_ms) = match self.mode {
            WriteMode::MustCache => (String::new(), 0),
            _ => self.done.clone().ok_or_else(|| ClientError::Worker {
                addr: String::new(),
                code: ErrorCode::Internal,
                msg: format!(
                    "{}: the worker did not confirm the UFS write",
                    self.info.path
                ),
            })?,
        };
        let req = pb::CompleteFileRequest {
            id: self.info.id,
            generation: self.info.generation,
            size: self.sent,
            fingerprint,
            mtime_ms,
            set_xattrs: self.xattrs.is_some(),
            xattrs: self.xattrs.take().unwrap_or_default(),
        };
        self.client
            .mutate_info(pb::mutation::Op::CompleteFile(req))
            .await
    }

    async fn abort_ref(&mut self) {
        self.sinks.clear();
        // This write's own version only: by now the path may hold another
        // writer's file, or (for a rewrite) the old version, which stays.
        let _ = self
            .client
            .delete_unfinished(&self.info.path, self.info.id)
            .await;
        let _ = self.client.free_everywhere(self.cache_id).await;
    }

    /// Abandons the file: it is removed and its cached pages freed.
    pub async fn abort(mut self) {
        self.abort_ref().await;
    }
}
