//! The worker: caches pages of blocks in a [`page_store::PageStore`], fetches
//! misses from the UFS with ranged reads, serves bytes over the dedicated data
//! protocol ([`strata_proto::data`]), writes through to the UFS, and
//! heartbeats the master with its capacity and usage (never block lists:
//! placement is computed by rendezvous hashing, not recorded).

mod data_server;
mod heartbeat;
mod mounts;
pub mod page_store;
pub mod policy;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use strata_common::Config;
use strata_proto::pb;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use page_store::{PageStore, StoreError};

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
    pub bytes_served: AtomicU64,
}

pub(crate) struct Shared {
    pub store: PageStore,
    pub mounts: mounts::Mounts,
    pub counters: Counters,
    pub config: Config,
}

impl Shared {
    pub fn stats(&self) -> pb::WorkerStats {
        let u = self.store.usage();
        let s = &self.store.stats;
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

pub fn master_channel(addr: &str) -> Result<tonic::transport::Channel, WorkerError> {
    let uri = if addr.starts_with("http://") || addr.starts_with("https://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    let ep = tonic::transport::Endpoint::from_shared(uri).map_err(|e| WorkerError::Master {
        addr: addr.to_string(),
        msg: e.to_string(),
    })?;
    Ok(ep
        .connect_timeout(std::time::Duration::from_secs(5))
        .tcp_nodelay(true)
        .connect_lazy())
}

/// Opens the cache directory, starts the data server and the heartbeat loop.
pub async fn start(config: &Config) -> Result<WorkerHandle, WorkerError> {
    let wc = &config.worker;
    let store = PageStore::open(&wc.cache_dir, wc.cache_capacity.0)?;
    let id = page_store::load_or_create_worker_id(&wc.cache_dir)?;
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
    let channel = master_channel(&config.cluster.master)?;
    let shared = Arc::new(Shared {
        store,
        mounts: mounts::Mounts::new(channel.clone()),
        counters: Counters::default(),
        config: config.clone(),
    });
    let (tx, rx) = watch::channel(false);
    let advertise = wc
        .advertise_addr
        .clone()
        .unwrap_or_else(|| data_addr.to_string());
    let tasks = vec![
        tokio::spawn(data_server::serve(listener, shared.clone(), rx.clone())),
        tokio::spawn(heartbeat::run(
            id,
            advertise,
            channel,
            shared.clone(),
            wc.heartbeat_interval_ms,
            rx,
        )),
    ];
    tracing::info!(worker = id, %data_addr, "worker serving");
    Ok(WorkerHandle {
        id,
        data_addr,
        shared,
        shutdown: tx,
        tasks,
    })
}

/// Resolves once the shutdown flag is set (or its sender is gone).
pub(crate) async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}
