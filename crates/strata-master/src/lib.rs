//! The master: namespace and mount table over [`strata_meta`], lazy metadata
//! sync from the UFS, worker membership, and the gRPC service. Every change
//! goes through a `strata_meta::Command`, so replicating it with Raft later
//! changes how commands are committed, not what they do. The master never
//! touches file data and keeps no per-block location table.

mod error;
mod namespace;
mod service;
mod workers;

use std::net::SocketAddr;
use std::sync::Arc;

use strata_common::Config;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use error::MasterError;
pub use namespace::Namespace;
pub use workers::Membership;

/// A running master.
pub struct MasterHandle {
    pub addr: SocketAddr,
    pub namespace: Arc<Namespace>,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl MasterHandle {
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
    }
}

/// Opens the metadata store and serves the gRPC API on `config.master.rpc_addr`
/// (port 0 picks a free port; see [`MasterHandle::addr`]).
pub async fn start(config: &Config) -> Result<MasterHandle, MasterError> {
    let ns = Arc::new(Namespace::open(config)?);
    let listener = TcpListener::bind(&config.master.rpc_addr)
        .await
        .map_err(|e| MasterError::Bind {
            addr: config.master.rpc_addr.clone(),
            msg: e.to_string(),
        })?;
    let addr = listener.local_addr().map_err(|e| MasterError::Bind {
        addr: config.master.rpc_addr.clone(),
        msg: e.to_string(),
    })?;
    let (tx, mut rx) = watch::channel(false);
    let svc = service::MasterService::new(ns.clone());
    // Small gRPC replies must not wait for Nagle's algorithm: without
    // TCP_NODELAY on each accepted socket a metadata call costs ~40 ms.
    // (`Server::tcp_nodelay` only applies to listeners tonic binds itself.)
    let incoming = tokio_stream::StreamExt::map(
        tokio_stream::wrappers::TcpListenerStream::new(listener),
        |conn| {
            if let Ok(s) = &conn {
                let _ = s.set_nodelay(true);
            }
            conn
        },
    );
    let task = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(
                strata_proto::pb::master_server::MasterServer::new(svc)
                    .max_decoding_message_size(64 << 20)
                    .max_encoding_message_size(256 << 20),
            )
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = rx.wait_for(|v| *v).await;
            })
            .await
    });
    tracing::info!(%addr, "master serving");
    Ok(MasterHandle {
        addr,
        namespace: ns,
        shutdown: tx,
        task,
    })
}
