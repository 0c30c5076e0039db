//! The master: namespace and mount table over [`strata_meta`], lazy metadata
//! sync from the UFS, worker membership, and the gRPC service. Every change
//! is a `strata_meta::Command` committed through Raft ([`raft`]) before it is
//! applied, so any master can take over with the same state. The master
//! never touches file data and keeps no per-block location table.

mod error;
mod jobs;
mod namespace;
pub mod raft;
mod service;
mod workers;

use std::net::SocketAddr;
use std::sync::Arc;

use strata_common::Config;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use error::{LEADER_HEADER, MasterError};
pub use namespace::Namespace;
pub use workers::Membership;

/// A running master.
pub struct MasterHandle {
    pub addr: SocketAddr,
    pub namespace: Arc<Namespace>,
    pub raft: raft::Raft,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl MasterHandle {
    pub async fn stop(self) {
        let _ = self.raft.shutdown().await;
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
    }
}

/// Opens the metadata store and serves the gRPC API on `config.master.rpc_addr`
/// (port 0 picks a free port; see [`MasterHandle::addr`]).
pub async fn start(config: &Config) -> Result<MasterHandle, MasterError> {
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
    let me = config
        .master
        .advertise_addr
        .clone()
        .unwrap_or_else(|| addr.to_string());
    let mc = &config.master;
    let timing = raft::Timing {
        heartbeat_ms: mc.raft_heartbeat_ms,
        election_min_ms: mc.raft_election_timeout_ms,
        election_max_ms: mc.raft_election_timeout_ms * 2,
        snapshot_every: mc.raft_snapshot_every,
        read_index_gather: std::time::Duration::from_micros(mc.read_index_gather_us),
    };
    let store = Arc::new(strata_meta::MetaStore::open(&mc.data_dir)?);
    let raft = raft::start(mc.node_id, &mc.data_dir, store.clone(), &timing).await?;
    let reads = Arc::new(raft::ReadIndex::new(me.clone(), &timing));
    let ns = Arc::new(Namespace::new(config, store, raft.clone(), reads.clone())?);
    let (tx, mut rx) = watch::channel(false);
    let svc = service::MasterService::new(ns.clone(), rx.clone());
    let transport = raft::network::Transport {
        raft: raft.clone(),
        reads: reads.clone(),
    };
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
            .add_service(
                strata_proto::pb::raft_transport_server::RaftTransportServer::new(transport)
                    .max_decoding_message_size(512 << 20)
                    .max_encoding_message_size(512 << 20),
            )
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = rx.wait_for(|v| *v).await;
            })
            .await
    });
    tracing::info!(%addr, node_id = mc.node_id, "master serving");
    bootstrap(&raft, &reads, config, &me).await?;
    tokio::spawn(log_leader_changes(raft.clone()));
    jobs::JobRunner::start(ns.clone(), config, &me)?;
    Ok(MasterHandle {
        addr,
        namespace: ns,
        raft,
        shutdown: tx,
        task,
    })
}

/// Forms the cluster on first start: the initial members (or this master
/// alone) unless it waits to be added. A single master that restarts at a
/// new address updates its own entry.
async fn bootstrap(
    raft: &raft::Raft,
    reads: &Arc<raft::ReadIndex>,
    config: &Config,
    me: &str,
) -> Result<(), MasterError> {
    use openraft::BasicNode;
    use std::collections::BTreeMap;
    let id = config.master.node_id;
    let initialized = raft
        .is_initialized()
        .await
        .map_err(|e| MasterError::Raft(e.to_string()))?;
    if initialized {
        let members = raft::members(raft);
        if members.len() == 1 && members.get(&id).is_some_and(|a| a != me) {
            let (raft, reads) = (raft.clone(), reads.clone());
            let me = me.to_string();
            tokio::spawn(async move {
                let _ = raft
                    .wait(Some(std::time::Duration::from_secs(30)))
                    .current_leader(id, "own address update")
                    .await;
                let nodes = BTreeMap::from([(id, BasicNode::new(&me))]);
                let _writing = reads.leases.quiesce().await;
                if let Err(e) = raft
                    .change_membership(openraft::ChangeMembers::SetNodes(nodes), true)
                    .await
                {
                    tracing::warn!(%e, "could not record this master's new address");
                }
            });
        }
        return Ok(());
    }
    if config.master.join {
        tracing::info!(id, %me, "waiting to be added with `strata admin masters add {id} {me}`");
        return Ok(());
    }
    let mut members: BTreeMap<u64, BasicNode> = config
        .master
        .initial_members()
        .map_err(MasterError::Raft)?
        .into_iter()
        .map(|(i, a)| (i, BasicNode::new(a)))
        .collect();
    if members.is_empty() {
        members.insert(id, BasicNode::new(me));
    }
    if !members.contains_key(&id) {
        return Err(MasterError::Raft(format!(
            "master.node_id {id} is not in master.initial_members ({}); \
             list every first member, this one included",
            config.master.initial_members
        )));
    }
    match raft.initialize(members).await {
        Ok(()) => Ok(()),
        // Another initial member's log reached us first: nothing to do.
        Err(openraft::error::RaftError::APIError(
            openraft::error::InitializeError::NotAllowed(_),
        )) => Ok(()),
        Err(e) => Err(MasterError::Raft(format!("cannot form the cluster: {e}"))),
    }
}

/// Logs every change of leader (openraft's own logs are off by default:
/// they report each failed heartbeat to a stopped peer).
async fn log_leader_changes(raft: raft::Raft) {
    let mut rx = raft.metrics();
    let mut last = None;
    loop {
        let (leader, term, me, fatal) = {
            let m = rx.borrow_and_update();
            (
                m.current_leader,
                m.current_term,
                m.id,
                m.running_state.as_ref().err().map(|e| e.to_string()),
            )
        };
        if let Some(e) = fatal {
            tracing::error!(error = %e, "metadata replication stopped; restart this master");
            return;
        }
        if leader != last {
            match leader {
                Some(l) if l == me => tracing::info!(term, "this master is now the leader"),
                Some(l) => tracing::info!(leader = l, term, "following a new leader"),
                None => tracing::warn!(term, "no leader; an election is under way"),
            }
            last = leader;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}
