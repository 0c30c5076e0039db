//! The worker: caches pages of blocks in a tiered [`page_store::PageStore`], fetches
//! misses from the UFS with ranged reads, serves bytes over the dedicated data
//! protocol ([`strata_proto::data`]), writes through to the UFS, and
//! heartbeats the master with its capacity and usage (never block lists:
//! placement is computed by rendezvous hashing, not recorded).

mod data_server;
mod heartbeat;
mod hot;
pub mod memory;
mod mounts;
pub mod page_store;
mod peers;
pub mod policy;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use strata_common::Config;
use strata_proto::pb;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use page_store::{PageStore, PutOpts, StoreError, StoreSettings};

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr}: {msg} (is another worker running? set worker.data_addr)")]
    Bind { addr: String, msg: String },
    #[error("invalid master address {addr:?}: {msg}")]
    Master { addr: String, msg: String },
}

/// Counters every part of the worker adds to.
#[derive(Default)]
pub struct Counters {
    pub ufs_bytes_read: AtomicU64,
    pub peer_bytes_read: AtomicU64,
    pub bytes_served: AtomicU64,
}

pub(crate) struct Shared {
    pub store: PageStore,
    pub mounts: mounts::Mounts,
    pub counters: Counters,
    pub config: Config,
    pub fetches: data_server::Fetches,
    /// Bounds the UFS page fetches in flight (and the memory they hold).
    pub fetch_permits: tokio::sync::Semaphore,
    /// The other workers, for peer-to-peer fetch.
    pub peers: peers::Peers,
    /// Read heat per block (adaptive replication).
    pub hot: hot::HotBlocks,
    /// Pages copied from peers to serve hot blocks.
    pub extra: hot::ExtraReplicas,
}

impl Shared {
    pub fn stats(&self) -> pb::WorkerStats {
        let u = self.store.usage();
        let s = self.store.stats();
        let (rss, peak_rss) = memory::process_rss();
        pb::WorkerStats {
            capacity_bytes: u.capacity,
            used_bytes: u.used,
            pinned_bytes: u.pinned,
            pages: u.pages,
            hits: s.hits.load(Ordering::Relaxed),
            misses: s.misses.load(Ordering::Relaxed),
            ufs_bytes_read: self.counters.ufs_bytes_read.load(Ordering::Relaxed),
            bytes_served: self.counters.bytes_served.load(Ordering::Relaxed),
            evictions: s.evictions.load(Ordering::Relaxed),
            tiers: self.store.tier_stats(),
            priorities: self.store.priority_stats(),
            corrupt_pages: s.corrupt_pages.load(Ordering::Relaxed),
            expired_pages: s.expired_pages.load(Ordering::Relaxed),
            memory_available_bytes: self.store.memory_available(),
            memory_pressure: self.store.memory_pressure(),
            pinned_files: self.store.pinned_files(),
            rss_bytes: rss,
            peak_rss_bytes: peak_rss,
            peer_bytes_read: self.counters.peer_bytes_read.load(Ordering::Relaxed),
        }
    }
}

/// A running worker.
pub struct WorkerHandle {
    pub id: u64,
    pub data_addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl WorkerHandle {
    pub fn stats(&self) -> pb::WorkerStats {
        self.shared.stats()
    }

    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Drops extra replicas of hot blocks nobody has read for `idle_secs`.
async fn drop_idle_replicas(shared: Arc<Shared>, idle_secs: u64, mut stop: watch::Receiver<bool>) {
    if idle_secs == 0 {
        return;
    }
    let idle = std::time::Duration::from_secs(idle_secs);
    let every = (idle / 4).clamp(
        std::time::Duration::from_millis(500),
        std::time::Duration::from_secs(30),
    );
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stopped(&mut stop) => return,
        }
        let mut n = 0;
        for k in shared.extra.take_idle(idle) {
            if shared.store.drop_unpinned(&k).await {
                n += 1;
            }
        }
        if n > 0 {
            tracing::debug!(pages = n, "dropped idle extra replicas");
        }
    }
}

/// Keeps the list of other workers (for peer fetch) fresh: every 3 s.
async fn refresh_peers(
    id: u64,
    masters: Arc<strata_proto::masters::MasterSet>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let res = masters
            .call(false, |mut c| async move {
                c.list_workers(tonic::Request::new(pb::Empty {})).await
            })
            .await;
        if let Ok(list) = res {
            shared.peers.set(id, &list.workers);
        }
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(3)) => {}
            _ = stopped(&mut stop) => return,
        }
    }
}

/// Opens the cache directory, starts the data server and the heartbeat loop.
pub async fn start(config: &Config) -> Result<WorkerHandle, WorkerError> {
    let wc = &config.worker;
    let store = PageStore::open(StoreSettings::from_config(wc))?;
    let id = page_store::load_or_create_worker_id(store.home())?;
    let listener = TcpListener::bind(&wc.data_addr)
        .await
        .map_err(|e| WorkerError::Bind {
            addr: wc.data_addr.clone(),
            msg: e.to_string(),
        })?;
    let data_addr = listener.local_addr().map_err(|e| WorkerError::Bind {
        addr: wc.data_addr.clone(),
        msg: e.to_string(),
    })?;
    let masters = Arc::new(
        strata_proto::masters::MasterSet::new(
            config.cluster.masters(),
            std::time::Duration::from_secs(config.client.failover_timeout_secs),
            strata_proto::masters::ReadFrom::Any,
        )
        .map_err(|msg| WorkerError::Master {
            addr: config.cluster.master.clone(),
            msg,
        })?,
    );
    masters.keep_fresh();
    let shared = Arc::new(Shared {
        store,
        mounts: mounts::Mounts::new(masters.clone()),
        counters: Counters::default(),
        config: config.clone(),
        fetches: data_server::Fetches::default(),
        fetch_permits: tokio::sync::Semaphore::new(wc.max_ufs_fetches.max(1)),
        peers: Default::default(),
        hot: hot::HotBlocks::new(wc.hot_block_reads_per_sec, wc.hot_block_max_replicas),
        extra: Default::default(),
    });
    let (tx, rx) = watch::channel(false);
    let advertise = wc
        .advertise_addr
        .clone()
        .unwrap_or_else(|| data_addr.to_string());
    let mut tasks = vec![
        tokio::spawn(data_server::serve(listener, shared.clone(), rx.clone())),
        tokio::spawn(refresh_peers(
            id,
            masters.clone(),
            shared.clone(),
            rx.clone(),
        )),
        tokio::spawn(heartbeat::run(
            id,
            advertise,
            masters,
            shared.clone(),
            wc.heartbeat_interval_ms,
            rx.clone(),
        )),
        tokio::spawn(watch_memory(
            shared.store.clone(),
            wc.memory_floor.0,
            wc.memory_check_interval_ms,
            rx.clone(),
        )),
        tokio::spawn(drop_idle_replicas(
            shared.clone(),
            wc.idle_replica_secs,
            rx.clone(),
        )),
        tokio::spawn(expire_pages(
            shared.store.clone(),
            wc.page_ttl_secs,
            rx.clone(),
        )),
    ];
    if let Some(queue) = shared.store.take_promotion_queue() {
        tasks.push(tokio::spawn(promote_pages(shared.store.clone(), queue, rx)));
    }
    tracing::info!(worker = id, %data_addr, "worker serving");
    Ok(WorkerHandle {
        id,
        data_addr,
        shared,
        shutdown: tx,
        tasks,
    })
}

/// Watches the memory available to the worker and spills MEM pages to the
/// next tier while it is under `floor` (with a margin of an eighth of the
/// floor before the pressure is over, so the spill does not flap).
async fn watch_memory(
    store: PageStore,
    floor: u64,
    every_ms: u64,
    mut stop: watch::Receiver<bool>,
) {
    let every = std::time::Duration::from_millis(every_ms.max(10));
    let margin = floor / 8;
    let mut pressure = false;
    loop {
        let reading = tokio::task::spawn_blocking(memory::read)
            .await
            .unwrap_or_default();
        let available = reading.available.unwrap_or(0);
        if floor > 0 && store.has_mem_tier() && reading.available.is_some() {
            // A heavy memory stall (PSI) counts as pressure even with room left.
            let stalled = reading.psi_some_avg10.is_some_and(|p| p >= 20.0);
            if available < floor || stalled {
                if !pressure {
                    tracing::warn!(
                        available,
                        floor,
                        "memory pressure: spilling MEM pages to disk"
                    );
                }
                pressure = true;
                store.set_memory(available, true);
                let want = (floor.saturating_sub(available) + margin).clamp(8 << 20, 256 << 20);
                let s = store.clone();
                let moved = tokio::task::spawn_blocking(move || s.spill(want))
                    .await
                    .unwrap_or(0);
                if moved > 0 {
                    // Measure again at once: the spill freed memory.
                    continue;
                }
            } else if available >= floor + margin {
                if pressure {
                    tracing::info!(available, floor, "memory pressure over");
                }
                pressure = false;
            }
        }
        store.set_memory(available, pressure);
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stopped(&mut stop) => return,
        }
    }
}

/// Drops pages older than the TTL, checking a few times per TTL.
async fn expire_pages(store: PageStore, ttl_secs: u64, mut stop: watch::Receiver<bool>) {
    if ttl_secs == 0 {
        return;
    }
    let every = std::time::Duration::from_millis((ttl_secs * 250).clamp(200, 30_000));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stopped(&mut stop) => return,
        }
        let s = store.clone();
        let _ = tokio::task::spawn_blocking(move || s.expire()).await;
    }
}

/// Promotes pages read often in a lower tier. While user reads are in
/// flight it goes slowly (one page per 50 ms), so it never competes with
/// them for the disks.
async fn promote_pages(
    store: PageStore,
    mut queue: tokio::sync::mpsc::Receiver<strata_common::ids::PageKey>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let key = tokio::select! {
            k = queue.recv() => match k { Some(k) => k, None => return },
            _ = stopped(&mut stop) => return,
        };
        if store.busy() > 0 {
            tokio::select! {
                _ = tokio::time::sleep(std::time::Duration::from_millis(50)) => {}
                _ = stopped(&mut stop) => return,
            }
        }
        let s = store.clone();
        let _ = tokio::task::spawn_blocking(move || s.promote(&key)).await;
    }
}

/// Resolves once the shutdown flag is set (or its sender is gone).
pub(crate) async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}
