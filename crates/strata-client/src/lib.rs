//! The Rust SDK. Every other interface (CLI, FUSE, gateway, Python) is built
//! on it. It talks gRPC to the master for metadata and the binary data
//! protocol to workers for bytes, choosing each block's worker by rendezvous
//! hashing over the live workers. It knows nothing about how workers store
//! pages or how the master stores the namespace.

mod batch;
mod conn;
mod error;
mod jobs;
mod local_cache;
mod mutate_batch;
mod reader;
mod short_circuit;
mod stat_batch;
mod writer;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt, stream};
use strata_common::config::ClientConfig;
use strata_common::ids::block_placement_key;
use strata_common::placement::{Candidate, owners};
use strata_common::{CacheId, NsPath};
use strata_proto::data::{Message, ReadSpec, Source};
use strata_proto::masters::{CallError, MasterSet, ReadFrom};
use strata_proto::pb::{self, master_client::MasterClient};
use tonic::transport::Channel;

pub use error::ClientError;
pub use jobs::JobSpec;
pub use local_cache::{LocalCacheStats, LocalFile};
pub use pb::{FileInfo, MasterList, MountInfo, PersistState, WorkerInfo, WriteType};
pub use pb::{JobInfo, JobState, XattrFlag};
pub use reader::Reader;
pub use strata_common::xattr as xattr_limits;
pub use writer::{WriteOptions, Writer};

pub type Result<T> = std::result::Result<T, ClientError>;

/// How long a fetched worker list is trusted before asking the master again.
const WORKER_LIST_TTL: Duration = Duration::from_secs(2);

/// The live workers as last listed by the master, with their placement
/// weights (kept together so a read does not rebuild them).
pub(crate) struct LiveWorkers {
    pub list: Vec<WorkerInfo>,
    pub cands: Vec<Candidate>,
}

pub(crate) struct Inner {
    master_addr: String,
    masters: Arc<MasterSet>,
    cfg: ClientConfig,
    workers: Mutex<Option<(Instant, Arc<LiveWorkers>)>>,
    pool: conn::Pool,
    pub(crate) short_circuit: short_circuit::ShortCircuit,
    /// Heavy-client mode (`client.local_cache_dir`).
    pub(crate) local_cache: Option<Arc<local_cache::LocalCache>>,
    /// Blocks their owners reported hot: (cache id, block) → (workers to
    /// spread reads over, when reported).
    hot: Mutex<HashMap<(u128, u64), (u8, Instant)>>,
    /// Round-robin counter for spreading reads over replicas.
    picks: std::sync::atomic::AtomicU64,
    /// Stats of concurrent callers, sent together.
    stats: stat_batch::StatBatcher,
    mutations: mutate_batch::MutationBatcher,
}

/// How long a hot-block report steers reads after it was last received.
const HEAT_TTL: Duration = Duration::from_secs(10);

/// A handle to a Strata cluster; cheap to clone and share across tasks.
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
}

/// Progress of a [`Client::load`].
#[derive(Clone, Copy, Debug, Default)]
pub struct LoadProgress {
    pub files_total: u64,
    pub bytes_total: u64,
    pub files_done: u64,
    pub bytes_done: u64,
    /// Pages the workers had to fetch from the UFS.
    pub ufs_pages: u64,
    pub cached_pages: u64,
}

/// Mount options for [`Client::mount`].
#[derive(Clone, Debug, Default)]
pub struct MountOptions {
    pub options: BTreeMap<String, String>,
    pub read_only: bool,
    pub sync_interval: Option<i64>,
    pub block_size: Option<u64>,
    pub page_size: Option<u64>,
    /// Create the UFS directory if it does not exist yet (file:// only).
    pub create_root: bool,
}

fn parse_path(p: &str) -> Result<NsPath> {
    NsPath::parse(p).map_err(|e| ClientError::InvalidArgument(e.to_string()))
}

impl Client {
    /// Creates a client for the master at `addr` (`host:port`). Nothing is
    /// dialled until the first call.
    pub fn new(addr: &str, cfg: ClientConfig) -> Result<Client> {
        let read_from = match cfg.read_from.as_str() {
            "leader" => ReadFrom::Leader,
            "any" => ReadFrom::Any,
            "any-stale" => ReadFrom::AnyStale,
            other => {
                return Err(ClientError::InvalidArgument(format!(
                    "client.read_from is {other:?}; use leader, any or any-stale"
                )));
            }
        };
        let masters = Arc::new(
            MasterSet::new(
                strata_common::config::split_list(addr),
                Duration::from_secs(cfg.failover_timeout_secs),
                read_from,
            )
            .map_err(ClientError::InvalidArgument)?,
        );
        let local_cache = if cfg.local_cache_dir.as_os_str().is_empty() {
            None
        } else {
            let dir = &cfg.local_cache_dir;
            Some(
                local_cache::LocalCache::open(dir, cfg.local_cache_capacity.0).map_err(|e| {
                    if e.kind() == std::io::ErrorKind::WouldBlock {
                        ClientError::LocalCacheInUse {
                            dir: dir.display().to_string(),
                            holder: e.to_string(),
                        }
                    } else {
                        ClientError::InvalidArgument(format!(
                            "client.local_cache_dir {}: {e} (create it, make it writable, \
                             or leave the setting empty)",
                            dir.display()
                        ))
                    }
                })?,
            )
        };
        masters.keep_fresh();
        let timeout = Duration::from_secs(cfg.io_timeout_secs.max(1));
        Ok(Client {
            inner: Arc::new(Inner {
                master_addr: addr.to_string(),
                masters,
                pool: conn::Pool::new(timeout, cfg.pool_idle_per_worker),
                cfg,
                workers: Mutex::new(None),
                short_circuit: short_circuit::ShortCircuit::default(),
                local_cache,
                hot: Mutex::new(HashMap::new()),
                picks: std::sync::atomic::AtomicU64::new(0),
                stats: Default::default(),
                mutations: Default::default(),
            }),
        })
    }

    /// What the heavy-client cache holds (`None` when it is off).
    pub fn local_cache_stats(&self) -> Option<LocalCacheStats> {
        self.inner.local_cache.as_ref().map(|c| c.stats())
    }

    pub fn master_addr(&self) -> &str {
        &self.inner.master_addr
    }

    /// The masters this client knows (learned from the masters themselves).
    pub fn masters(&self) -> Vec<String> {
        self.inner.masters.addrs()
    }

    fn call_err(&self, e: CallError) -> ClientError {
        ClientError::from_status(e.status, &e.addr)
    }

    /// A read-only master call, sent where `client.read_from` says and
    /// retried through failovers.
    pub(crate) async fn master_read<M, T, F, Fut>(&self, msg: M, f: F) -> Result<T>
    where
        M: Clone,
        F: Fn(MasterClient<Channel>, tonic::Request<M>) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        let set = &self.inner.masters;
        set.call(false, |c| f(c, set.request(msg.clone(), None)))
            .await
            .map_err(|e| self.call_err(e))
    }

    /// A mutating master call: sent to the leader with one request id for
    /// all its retries, so it is applied once however often it is retried.
    pub(crate) async fn master_write<M, T, F, Fut>(&self, msg: M, f: F) -> Result<T>
    where
        M: Clone,
        F: Fn(MasterClient<Channel>, tonic::Request<M>) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        self.master_write_as(self.inner.masters.request_id(), msg, f)
            .await
    }

    /// [`Client::master_write`] with the request id `rid`.
    pub(crate) async fn master_write_as<M, T, F, Fut>(&self, rid: u128, msg: M, f: F) -> Result<T>
    where
        M: Clone,
        F: Fn(MasterClient<Channel>, tonic::Request<M>) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        let set = &self.inner.masters;
        set.call(true, |c| f(c, set.request(msg.clone(), Some(rid))))
            .await
            .map_err(|e| self.call_err(e))
    }

    /// A file's or directory's metadata. Concurrent stats of one client
    /// share calls to the master (see `stat_batch.rs`).
    pub async fn stat(&self, path: &str) -> Result<FileInfo> {
        let p = parse_path(path)?;
        self.stat_batched(p.to_string()).await
    }

    pub async fn list(&self, path: &str) -> Result<Vec<FileInfo>> {
        let p = parse_path(path)?;
        self.master_read(
            pb::PathRequest {
                path: p.to_string(),
            },
            |mut c, r| async move { c.list_status(r).await },
        )
        .await
        .map(|r| r.entries)
    }

    /// Up to `limit` entries of directory `path` in key order (a
    /// directory's key is its name and '/', the order of an S3 listing),
    /// from the first key after `start_after`; fewer than `limit` (the
    /// master returns at most 10 000) means the directory has no more. A
    /// file lists itself on the first page.
    pub async fn list_page(
        &self,
        path: &str,
        start_after: &str,
        limit: u32,
    ) -> Result<Vec<FileInfo>> {
        let p = parse_path(path)?.to_string();
        let paged = self
            .master_read(
                pb::ListPageRequest {
                    path: p.clone(),
                    start_after: start_after.to_string(),
                    limit,
                },
                |mut c, r| async move { c.list_page(r).await },
            )
            .await;
        match paged {
            Ok(r) => Ok(r.entries),
            // A master from before ListPage (a rolling upgrade): the whole
            // directory, cut here.
            Err(ClientError::Unimplemented(_)) => {
                let all = self.list(path).await?;
                Ok(page_of(all, &p, start_after, limit.min(10_000)))
            }
            Err(e) => Err(e),
        }
    }

    /// Every file below `path` (or `path` itself if it is a file).
    /// Up to 16 directories are listed at a time (each listing may wait
    /// for the master to sync that directory with its UFS).
    pub async fn list_files_recursive(&self, path: &str) -> Result<Vec<FileInfo>> {
        const PARALLEL: usize = 16;
        let mut out = Vec::new();
        let mut pending = vec![path.to_string()];
        let mut running = futures::stream::FuturesUnordered::new();
        loop {
            while running.len() < PARALLEL
                && let Some(p) = pending.pop()
            {
                let top = p == path;
                running.push(async move { (top, self.list(&p).await) });
            }
            let Some((top, entries)) = running.next().await else {
                break;
            };
            let entries = match entries {
                Ok(e) => e,
                // A directory below `path` removed (or replaced by a file)
                // while the walk ran: it holds nothing now.
                Err(ClientError::NotFound(_) | ClientError::FailedPrecondition(_)) if !top => {
                    continue;
                }
                Err(e) => return Err(e),
            };
            for e in entries {
                if e.is_dir {
                    pending.push(e.path.clone());
                } else {
                    out.push(e);
                }
            }
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }

    pub async fn mkdir(&self, path: &str, recursive: bool) -> Result<FileInfo> {
        let p = parse_path(path)?;
        self.mutate_info(pb::mutation::Op::Mkdir(pb::MkdirRequest {
            path: p.to_string(),
            recursive,
        }))
        .await
    }

    /// Deletes a file or (with `recursive`) a directory tree. Bytes that lived
    /// only in the cache are freed on the workers.
    pub async fn delete(&self, path: &str, recursive: bool) -> Result<u64> {
        let p = parse_path(path)?;
        self.delete_request(pb::DeleteRequest {
            path: p.to_string(),
            recursive,
            unfinished_id: 0,
        })
        .await
    }

    /// Removes the unfinished file `id` (a write being abandoned; `path`
    /// is where it was written, for messages), and nothing if it has
    /// completed or is gone: never what `path` holds by now.
    pub async fn delete_unfinished(&self, path: &str, id: u64) -> Result<()> {
        self.delete_request(pb::DeleteRequest {
            path: path.to_string(),
            recursive: false,
            unfinished_id: id,
        })
        .await
        .map(|_| ())
    }

    /// Sends a delete; frees the cached pages of removed files that existed
    /// nowhere else; returns the number of inodes removed.
    async fn delete_request(&self, req: pb::DeleteRequest) -> Result<u64> {
        let r = self
            .mutate(pb::mutation::Op::Delete(req))
            .await?
            .deleted
            .unwrap_or_default();
        self.free_removed(&r).await;
        Ok(r.inodes_removed)
    }

    /// Frees on every worker the cached pages of the files a delete
    /// removed that existed nowhere else (not in a UFS).
    pub async fn free_removed(&self, r: &pb::DeleteResponse) {
        for id in &r.unpersisted_cache_ids {
            if let Some(id) = CacheId::from_hex(id) {
                self.free_everywhere(id).await;
            }
        }
    }

    pub async fn rename(&self, src: &str, dst: &str) -> Result<()> {
        let (s, d) = (parse_path(src)?, parse_path(dst)?);
        self.mutate(pb::mutation::Op::Rename(pb::RenameRequest {
            src: s.to_string(),
            dst: d.to_string(),
        }))
        .await
        .map(|_| ())
    }

    pub async fn mount(&self, path: &str, ufs_uri: &str, opts: MountOptions) -> Result<MountInfo> {
        let p = parse_path(path)?;
        self.master_write(
            pb::MountRequest {
                path: p.to_string(),
                ufs_uri: ufs_uri.to_string(),
                options: opts.options.into_iter().collect(),
                read_only: opts.read_only,
                sync_interval: opts.sync_interval,
                block_size: opts.block_size,
                page_size: opts.page_size,
                create_root: opts.create_root,
            },
            |mut c, r| async move { c.mount(r).await },
        )
        .await
    }

    pub async fn unmount(&self, path: &str) -> Result<()> {
        let p = parse_path(path)?;
        self.master_write(
            pb::PathRequest {
                path: p.to_string(),
            },
            |mut c, r| async move { c.unmount(r).await },
        )
        .await
        .map(|_| ())
    }

    pub async fn mounts(&self) -> Result<Vec<MountInfo>> {
        self.master_read(
            pb::Empty {},
            |mut c, r| async move { c.list_mounts(r).await },
        )
        .await
        .map(|r| r.mounts)
    }

    /// A mount with its credentials (what workers use to reach the UFS).
    pub async fn mount_details(&self, id: u64) -> Result<MountInfo> {
        self.master_read(pb::MountIdRequest { id }, |mut c, r| async move {
            c.get_mount(r).await
        })
        .await
    }

    /// Re-validates `path` against the UFS now.
    pub async fn sync(&self, path: &str) -> Result<pb::SyncResponse> {
        let p = parse_path(path)?;
        self.master_write(
            pb::PathRequest {
                path: p.to_string(),
            },
            |mut c, r| async move { c.sync(r).await },
        )
        .await
    }

    /// A number that changes whenever the namespace changes (for caches of
    /// metadata: equal numbers mean nothing changed in between).
    pub async fn namespace_version(&self) -> Result<u64> {
        self.master_read(pb::Empty {}, |mut c, r| async move {
            c.namespace_version(r).await
        })
        .await
        .map(|r| r.version)
    }

    /// The masters (Raft members) and the current leader, as the first
    /// configured master that answers sees them.
    pub async fn list_masters(&self) -> Result<pb::MasterList> {
        self.inner
            .masters
            .list_masters()
            .await
            .map_err(|e| self.call_err(e))
    }

    /// Adds a master (started with `master.join`) to the cluster.
    pub async fn add_master(&self, id: u64, addr: &str) -> Result<pb::MasterList> {
        let req = pb::AddMasterRequest {
            id,
            addr: addr.to_string(),
        };
        self.master_write(req, |mut c, r| async move { c.add_master(r).await })
            .await
    }

    /// Removes a master from the cluster.
    pub async fn remove_master(&self, id: u64) -> Result<pb::MasterList> {
        let req = pb::RemoveMasterRequest { id };
        self.master_write(req, |mut c, r| async move { c.remove_master(r).await })
            .await
    }

    /// All workers the master knows, live or not.
    pub async fn workers(&self) -> Result<Vec<WorkerInfo>> {
        self.master_read(
            pb::Empty {},
            |mut c, r| async move { c.list_workers(r).await },
        )
        .await
        .map(|r| r.workers)
    }

    pub(crate) async fn live_workers(&self, refresh: bool) -> Result<Arc<LiveWorkers>> {
        if !refresh
            && let Some((t, w)) = &*self.inner.workers.lock().unwrap_or_else(|p| p.into_inner())
            && t.elapsed() < WORKER_LIST_TTL
        {
            return Ok(w.clone());
        }
        let live: Vec<WorkerInfo> = self
            .workers()
            .await?
            .into_iter()
            .filter(|w| w.live)
            .collect();
        if live.is_empty() {
            return Err(ClientError::NoWorkers(self.inner.master_addr.clone()));
        }
        let cands = live
            .iter()
            .map(|w| Candidate {
                id: w.worker_id,
                weight: w.stats.as_ref().map(|s| s.capacity_bytes).unwrap_or(1),
            })
            .collect();
        let live = Arc::new(LiveWorkers { list: live, cands });
        *self.inner.workers.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((Instant::now(), live.clone()));
        Ok(live)
    }

    /// The data addresses of the first `n` workers in `block`'s rendezvous
    /// ranking (fewer when fewer are live): the owner, then its replicas.
    pub(crate) async fn owners(
        &self,
        cache_id: CacheId,
        block: u64,
        n: usize,
        refresh: bool,
    ) -> Result<Vec<String>> {
        let live = self.live_workers(refresh).await?;
        let ids = owners(block_placement_key(cache_id, block), &live.cands, n.max(1));
        if ids.is_empty() {
            return Err(ClientError::NoWorkers(self.inner.master_addr.clone()));
        }
        Ok(ids
            .iter()
            .filter_map(|id| live.list.iter().find(|w| w.worker_id == *id))
            .map(|w| w.data_addr.clone())
            .collect())
    }

    /// Over how many workers of a block's ranking reads are spread: the
    /// owner's latest heat report (kept `HEAT_TTL`), at least the path's
    /// minimum replication, at most its maximum.
    pub(crate) fn spread(&self, cache_id: CacheId, block: u64, info: &FileInfo) -> usize {
        let heat = self
            .inner
            .hot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(cache_id.0, block))
            .filter(|(_, t)| t.elapsed() < HEAT_TTL)
            .map_or(1, |(n, _)| *n as usize);
        let mut n = heat.max(info.replication_min as usize).max(1);
        if info.replication_max > 0 {
            n = n.min(info.replication_max as usize);
        }
        n
    }

    pub(crate) fn note_heat(&self, cache_id: CacheId, block: u64, replicas: u8) {
        if replicas <= 1 {
            return;
        }
        let mut m = self.inner.hot.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() > 10_000 {
            m.retain(|_, (_, t)| t.elapsed() < HEAT_TTL);
        }
        let e = m
            .entry((cache_id.0, block))
            .or_insert((replicas, Instant::now()));
        if e.1.elapsed() >= HEAT_TTL || replicas >= e.0 {
            *e = (replicas, Instant::now());
        }
    }

    pub(crate) fn next_pick(&self) -> usize {
        self.inner
            .picks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed) as usize
    }

    /// The worker that owns `block` of `cache_id` (rendezvous hashing).
    pub(crate) async fn owner(
        &self,
        cache_id: CacheId,
        block: u64,
        refresh: bool,
    ) -> Result<String> {
        let live = self.live_workers(refresh).await?;
        let id = owners(block_placement_key(cache_id, block), &live.cands, 1)
            .first()
            .copied()
            .ok_or_else(|| ClientError::NoWorkers(self.inner.master_addr.clone()))?;
        Ok(live
            .list
            .iter()
            .find(|w| w.worker_id == id)
            .map(|w| w.data_addr.clone())
            .unwrap_or_default())
    }

    /// Opens a file for reading.
    pub async fn open(&self, path: &str) -> Result<Reader> {
        let info = self.stat(path).await?;
        Reader::new(self.clone(), info)
    }

    /// Opens a file for reading from metadata the caller already has (a
    /// recent `stat` or listing), without asking the master again.
    pub fn open_info(&self, info: FileInfo) -> Result<Reader> {
        Reader::new(self.clone(), info)
    }

    /// Reads a whole file. If the UFS object changes under the read, the
    /// namespace is re-synced and the read starts over once.
    pub async fn read_file(&self, path: &str) -> Result<bytes::Bytes> {
        let r = self.open(path).await?;
        match r.read_at(0, r.len()).await {
            Err(ClientError::Changed { .. }) => {
                self.sync(path).await?;
                let r = self.open(path).await?;
                r.read_at(0, r.len()).await
            }
            other => other,
        }
    }

    pub async fn create(&self, path: &str, opts: WriteOptions) -> Result<Writer> {
        Writer::create(self.clone(), path, opts).await
    }

    /// Writes a whole buffer as a new file.
    pub async fn write_file(
        &self,
        path: &str,
        data: &[u8],
        opts: WriteOptions,
    ) -> Result<FileInfo> {
        if data.is_empty() && opts.write_type == WriteType::MustCache {
            // Nothing for a worker to hold: one call to the master.
            let req = writer::create_request(path, &opts, true)?;
            return self.mutate_info(pb::mutation::Op::CreateFile(req)).await;
        }
        let mut w = self.create(path, opts).await?;
        if let Err(e) = w.write(data).await {
            w.abort().await;
            return Err(e);
        }
        w.close().await
    }

    /// Makes every block of every file below `path` cached on its owner.
    pub async fn load(
        &self,
        path: &str,
        mut progress: impl FnMut(&LoadProgress),
    ) -> Result<LoadProgress> {
        let files = self.list_files_recursive(path).await?;
        let mut p = LoadProgress {
            files_total: files.len() as u64,
            bytes_total: files.iter().map(|f| f.size).sum(),
            ..Default::default()
        };
        progress(&p);
        let mut tasks = Vec::new();
        for f in &files {
            let r = Reader::new(self.clone(), f.clone())?;
            let chunk = self.inner.cfg.read_chunk.0.max(f.page_size);
            let mut off = 0;
            while off < f.size {
                let (bs, _) = r.block_bounds(off);
                let end = (off + chunk).min(bs).min(f.size);
                tasks.push((r.clone(), off, end - off, end == f.size));
                off = end;
            }
            if f.size == 0 {
                p.files_done += 1;
            }
        }
        let parallel = self.inner.cfg.read_ahead_blocks.max(1) * 2;
        let mut results = stream::iter(tasks)
            .map(|(r, off, len, last)| async move {
                r.load_range(off, len).await.map(|(c, u)| (len, c, u, last))
            })
            .buffer_unordered(parallel);
        while let Some((len, c, u, last)) = results.try_next().await? {
            p.bytes_done += len;
            p.cached_pages += c;
            p.ufs_pages += u;
            if last {
                p.files_done += 1;
            }
            progress(&p);
        }
        Ok(p)
    }

    /// Drops the cached pages of every file below `path` on all workers.
    /// Files that exist only in the cache are skipped (freeing them would
    /// lose them).
    pub async fn free(&self, path: &str) -> Result<u64> {
        let files = self.list_files_recursive(path).await?;
        let mut pages = 0;
        for f in files {
            if f.persist_state != pb::PersistState::Persisted as i32 {
                continue;
            }
            if let Some(id) = CacheId::from_hex(&f.cache_id) {
                pages += self.free_everywhere(id).await;
            }
        }
        Ok(pages)
    }

    /// Pins (never evicted) or unpins the cached pages of every file below
    /// `path` on every live worker, including pages cached later for the
    /// same file version; returns (files, pages changed now). A pin follows
    /// the file's cache id: a file changed in the UFS is a new version and
    /// must be pinned again.
    pub async fn pin(&self, path: &str, pinned: bool) -> Result<(u64, u64)> {
        let files = self.list_files_recursive(path).await?;
        let workers = self.live_workers(false).await?;
        let (mut nfiles, mut pages) = (0, 0);
        for f in files {
            let Some(id) = CacheId::from_hex(&f.cache_id) else {
                continue;
            };
            for w in &workers.list {
                match self
                    .request(
                        &w.data_addr,
                        &Message::Pin {
                            cache_id: id.0,
                            pinned,
                        },
                    )
                    .await?
                {
                    Message::End { cached_pages, .. } => pages += cached_pages,
                    Message::Error { code, message } => {
                        return Err(ClientError::Worker {
                            addr: w.data_addr.clone(),
                            code,
                            msg: format!("pin of {}: {message}", f.path),
                        });
                    }
                    other => {
                        return Err(ClientError::Connection {
                            addr: w.data_addr.clone(),
                            msg: format!("unexpected answer to a pin of {}: {other:?}", f.path),
                        });
                    }
                }
            }
            nfiles += 1;
        }
        Ok((nfiles, pages))
    }

    async fn free_everywhere(&self, id: CacheId) -> u64 {
        self.tell_every_worker(&Message::Free { cache_id: id.0 })
            .await
    }

    /// Sends a per-cache-id request (free, persisted) to every live worker;
    /// returns the pages they report changed. Unreachable workers count 0.
    pub(crate) async fn tell_every_worker(&self, m: &Message) -> u64 {
        let Ok(workers) = self.live_workers(false).await else {
            return 0;
        };
        let mut n = 0;
        for w in &workers.list {
            if let Ok(Message::End { cached_pages, .. }) = self.request(&w.data_addr, m).await {
                n += cached_pages;
            }
        }
        n
    }

    /// One request/response exchange on a pooled connection.
    pub(crate) async fn request(&self, addr: &str, m: &Message) -> Result<Message> {
        let mut c = self.inner.pool.get(addr).await?;
        c.send(m).await?;
        c.flush().await?;
        let reply = c.recv().await;
        match &reply {
            Ok(_) => self.inner.pool.put(c),
            Err(_) => self.inner.pool.drop_addr(addr),
        }
        reply
    }

    pub(crate) fn read_spec(info: &FileInfo, offset: u64, len: u64) -> Result<ReadSpec> {
        let cache_id = CacheId::from_hex(&info.cache_id)
            .ok_or_else(|| ClientError::Other(format!("{}: master sent no cache id", info.path)))?;
        let persisted = info.persist_state == pb::PersistState::Persisted as i32;
        Ok(ReadSpec {
            cache_id: cache_id.0,
            source: if persisted && info.mount_id != 0 {
                Source::Ufs
            } else {
                Source::CacheOnly
            },
            mount_id: info.mount_id,
            ufs_path: if info.mount_id != 0 {
                info.ufs_path.clone()
            } else {
                info.path.clone()
            },
            fingerprint: info.fingerprint.clone(),
            file_len: info.size,
            block_size: info.block_size,
            page_size: info.page_size,
            offset,
            len,
        })
    }
}

/// The page `ListPage` gives, cut from a whole listing of `path`: entries
/// in key order (a directory's key is its name and '/') after
/// `start_after`, at most `limit`; a file lists itself on the first page.
fn page_of(mut all: Vec<FileInfo>, path: &str, start_after: &str, limit: u32) -> Vec<FileInfo> {
    let limit = if limit == 0 { 1000 } else { limit as usize };
    if let [only] = &all[..]
        && !only.is_dir
        && only.path == path
    {
        return if start_after.is_empty() {
            all
        } else {
            Vec::new()
        };
    }
    let key = |f: &FileInfo| {
        if f.is_dir {
            format!("{}/", f.name)
        } else {
            f.name.clone()
        }
    };
    all.retain(|f| key(f).as_str() > start_after);
    all.sort_by_cached_key(key);
    all.truncate(limit);
    all
}

#[cfg(test)]
mod page_tests {
    use super::*;

    #[test]
    fn a_whole_listing_is_cut_as_list_page_would() {
        let e = |name: &str, is_dir: bool| FileInfo {
            path: format!("/d/{name}"),
            name: name.into(),
            is_dir,
            ..Default::default()
        };
        let all = vec![
            e("b", false),
            e("a", true),
            e("a-1", false),
            e("a.x", true),
            e("c", false),
        ];
        let names = |v: Vec<FileInfo>| v.into_iter().map(|f| f.name).collect::<Vec<_>>();
        // Key order: a-1, a.x/, a/, b, c.
        assert_eq!(
            names(page_of(all.clone(), "/d", "", 0)),
            ["a-1", "a.x", "a", "b", "c"]
        );
        assert_eq!(names(page_of(all.clone(), "/d", "a-1", 2)), ["a.x", "a"]);
        assert_eq!(
            names(page_of(all.clone(), "/d", "a", 9)),
            ["a-1", "a.x", "a", "b", "c"]
        );
        assert_eq!(names(page_of(all.clone(), "/d", "a/", 9)), ["b", "c"]);
        // A file lists itself, once.
        let f = vec![FileInfo {
            path: "/d".into(),
            name: "d".into(),
            ..Default::default()
        }];
        assert_eq!(page_of(f.clone(), "/d", "", 5).len(), 1);
        assert!(page_of(f, "/d", "x", 5).is_empty());
    }
}
