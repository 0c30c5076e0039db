//! Metadata replication with openraft: the log ([`log_store`]), the state
//! machine over `strata_meta` ([`state_machine`]), master-to-master messages
//! ([`network`]), and what the service needs from Raft: is this master the
//! leader, where is the leader, and when may a read be answered.

pub mod log_store;
pub mod network;
pub mod state_machine;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, ServerState};
use serde::{Deserialize, Serialize};
use strata_meta::{Command, MetaError, MetaStore, Output};

use strata_proto::pb::{self, raft_transport_client::RaftTransportClient};
use tonic::transport::Channel;

use crate::MasterError;

/// One namespace command and the client's request id.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Item {
    pub command: Command,
    pub request_id: Option<u128>,
}

/// A log entry's payload: the commands that arrived while the previous
/// entry was being committed (openraft 0.9 commits one entry per log sync,
/// so batching here is what lets concurrent writes share a sync).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Request {
    pub items: Vec<Item>,
}

/// One result per item of the entry.
pub type Response = Vec<Result<Output, MetaError>>;

/// Most commands in one log entry.
pub const MAX_BATCH: usize = 1024;

openraft::declare_raft_types!(
    pub TypeConfig:
        D = Request,
        R = Response,
        SnapshotData = tokio::fs::File,
);

pub type Raft = openraft::Raft<TypeConfig>;

/// Timing of elections and heartbeats (milliseconds), snapshots, and
/// follower read gathering.
#[derive(Clone, Debug)]
pub struct Timing {
    pub heartbeat_ms: u64,
    pub election_min_ms: u64,
    pub election_max_ms: u64,
    /// Entries between snapshots.
    pub snapshot_every: u64,
    /// How long a follower collects reads before asking the leader for a
    /// read index on their behalf.
    pub read_index_gather: Duration,
}

impl Timing {
    /// How long after the last quorum acknowledgement the leader still
    /// answers reads alone: well under the election timeout, so no other
    /// master can have been elected meanwhile.
    pub fn lease_ms(&self) -> u64 {
        self.election_min_ms / 2
    }
}

/// Starts the Raft node over an opened store.
pub async fn start(
    id: u64,
    dir: &std::path::Path,
    store: Arc<MetaStore>,
    timing: &Timing,
) -> Result<Raft, MasterError> {
    let cfg = openraft::Config {
        cluster_name: "strata".into(),
        heartbeat_interval: timing.heartbeat_ms,
        election_timeout_min: timing.election_min_ms,
        election_timeout_max: timing.election_max_ms,
        install_snapshot_timeout: 10_000,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(timing.snapshot_every),
        max_in_snapshot_log_to_keep: 1000,
        max_payload_entries: 1000,
        ..Default::default()
    }
    .validate()
    .map_err(|e| MasterError::Raft(format!("invalid Raft settings: {e}")))?;
    let log = log_store::LogStore::open(dir).map_err(MasterError::Raft)?;
    let sm = state_machine::StateMachine::new(store, dir);
    Raft::new(id, Arc::new(cfg), network::Network, log, sm)
        .await
        .map_err(|e| MasterError::Raft(format!("cannot start Raft: {e}")))
}

/// The addresses of the current members (voters and learners).
pub fn members(raft: &Raft) -> BTreeMap<u64, String> {
    let m = raft.metrics().borrow().membership_config.clone();
    m.nodes().map(|(id, n)| (*id, n.addr.clone())).collect()
}

fn leader_addr(raft: &Raft) -> Option<String> {
    let id = raft.metrics().borrow().current_leader?;
    members(raft).remove(&id)
}

/// How long a follower waits for the leader's read index.
const READ_INDEX_TIMEOUT: Duration = Duration::from_secs(2);

/// A follower's read-index stream to the leader at `addr`: asks go out on
/// `asks` numbered by `seq`; each answer names the ask it answers.
struct IndexStream {
    addr: String,
    asks: tokio::sync::mpsc::Sender<pb::ReadIndexAsk>,
    answers: tonic::Streaming<pb::ReadIndexResponse>,
    seq: u64,
}

impl IndexStream {
    /// The answer to the last ask, by `deadline`.
    async fn answer(
        &mut self,
        deadline: tokio::time::Instant,
    ) -> Result<u64, Option<tonic::Status>> {
        match tokio::time::timeout_at(deadline, self.answers.message()).await {
            Ok(Ok(Some(a))) if a.seq == self.seq => Ok(a.index),
            Ok(Err(status)) => Err(Some(status)),
            _ => Err(None),
        }
    }
}

/// Leadership and read barriers for one master.
pub struct ReadIndex {
    pub me: String,
    pub lease_ms: u64,
    gather: Duration,
    /// Connection to the leader for read-index requests (followers).
    leader: std::sync::Mutex<Option<(String, RaftTransportClient<Channel>)>>,
    /// The open read-index stream to the leader (followers), taken out by
    /// the one task asking at a time and put back after a good answer.
    stream: std::sync::Mutex<Option<IndexStream>>,
    /// A leader that does not know `ReadIndexStream` (an older master):
    /// while it leads, ask it with one call per round instead.
    unary_leader: std::sync::Mutex<Option<String>>,
    /// Reads waiting for the next read-index request, and whether a task
    /// is sending them.
    #[allow(clippy::type_complexity)]
    waiting: std::sync::Mutex<(bool, Vec<tokio::sync::oneshot::Sender<Result<u64, String>>>)>,
    /// When this master last heard from a leader (ms on `clock`): bounds
    /// how stale its answers to `stale` reads can be.
    last_leader_contact: AtomicU64,
    clock: std::time::Instant,
    /// Longest time since the last contact with a leader for which a
    /// follower answers a `stale` read itself (the election timeout).
    stale_bound_ms: u64,
    /// Term in which this master, as leader, has applied everything
    /// committed before it took over (so its store can be read and checked).
    ready_term: AtomicU64,
}

impl ReadIndex {
    pub fn new(me: String, timing: &Timing) -> Self {
        ReadIndex {
            me,
            lease_ms: timing.lease_ms(),
            gather: timing.read_index_gather,
            leader: std::sync::Mutex::new(None),
            stream: std::sync::Mutex::new(None),
            unary_leader: std::sync::Mutex::new(None),
            waiting: std::sync::Mutex::new((false, Vec::new())),
            last_leader_contact: AtomicU64::new(0),
            clock: std::time::Instant::now(),
            stale_bound_ms: timing.election_min_ms,
            ready_term: AtomicU64::new(0),
        }
    }

    pub fn not_leader(&self, raft: &Raft) -> MasterError {
        MasterError::NotLeader {
            me: self.me.clone(),
            leader: leader_addr(raft),
        }
    }

    /// Ok when this master is the leader and has applied every entry
    /// committed by earlier leaders: its store may be checked and changed.
    /// A new leader's first entry (a blank one in its own term) being
    /// applied proves that; no network round is needed.
    pub async fn ensure_leader(&self, raft: &Raft) -> Result<(), MasterError> {
        let (state, term, applied_term) = {
            let m = raft.metrics();
            let m = m.borrow();
            (
                m.state,
                m.current_term,
                m.last_applied.map(|l| l.leader_id.term),
            )
        };
        if state != ServerState::Leader {
            return Err(self.not_leader(raft));
        }
        if self.ready_term.load(Ordering::Acquire) == term {
            return Ok(());
        }
        if applied_term != Some(term) {
            raft.wait(Some(Duration::from_secs(5)))
                .metrics(
                    |m| {
                        m.state != ServerState::Leader
                            || m.current_term != term
                            || m.last_applied.map(|l| l.leader_id.term) == Some(term)
                    },
                    "leader applied its first entry",
                )
                .await
                .map_err(|_| self.not_leader(raft))?;
            let m = raft.metrics();
            let m = m.borrow();
            if m.state != ServerState::Leader || m.current_term != term {
                return Err(self.not_leader(raft));
            }
        }
        self.ready_term.store(term, Ordering::Release);
        Ok(())
    }

    /// As leader: the index a linearizable read must see applied. Within
    /// the lease that is what this master has applied (every acknowledged
    /// write is); otherwise a quorum round confirms leadership first.
    pub async fn leader_read_index(&self, raft: &Raft) -> Result<u64, MasterError> {
        self.ensure_leader(raft).await?;
        let (applied, acked_ms) = {
            let m = raft.metrics();
            let m = m.borrow();
            (
                m.last_applied.map(|l| l.index).unwrap_or(0),
                m.millis_since_quorum_ack,
            )
        };
        if acked_ms.is_some_and(|ms| ms < self.lease_ms) {
            return Ok(applied);
        }
        tracing::debug!(
            ?acked_ms,
            "lease expired: confirming leadership with a quorum round"
        );
        let (read, applied) = raft
            .get_read_log_id()
            .await
            .map_err(|_| self.not_leader(raft))?;
        Ok(read
            .map(|l| l.index)
            .unwrap_or(0)
            .max(applied.map(|l| l.index).unwrap_or(0)))
    }

    /// Records that a leader's append (or heartbeat) just arrived.
    pub fn leader_contact(&self) {
        self.last_leader_contact
            .store(self.clock.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Before answering a read: linearizable (everything acknowledged before
    /// the read began is visible) unless `stale`: then a follower that heard
    /// from the leader within the election timeout answers from its own
    /// state (it lags by at most that plus its apply delay); one that did
    /// not falls back to the linearizable path.
    pub async fn read_barrier(
        self: &Arc<Self>,
        raft: &Raft,
        stale: bool,
    ) -> Result<(), MasterError> {
        let (state, leader) = {
            let m = raft.metrics();
            let m = m.borrow();
            (m.state, m.current_leader)
        };
        if stale && leader.is_some() {
            let since = (self.clock.elapsed().as_millis() as u64)
                .saturating_sub(self.last_leader_contact.load(Ordering::Relaxed));
            if state == ServerState::Leader || since < self.stale_bound_ms {
                return Ok(());
            }
        }
        let index = if state == ServerState::Leader {
            self.leader_read_index(raft).await?
        } else {
            self.coalesced_read_index(raft).await?
        };
        let applied = raft
            .metrics()
            .borrow()
            .last_applied
            .map(|l| l.index)
            .unwrap_or(0);
        if applied < index {
            self.wait_applied(raft, index).await?;
        }
        Ok(())
    }

    /// A read index from the leader, shared by every read that arrived
    /// before the request was sent: concurrent reads on a follower cost the
    /// leader one small call per round, not one each. A read never joins a
    /// request already on the wire (its answer could predate the read).
    async fn coalesced_read_index(self: &Arc<Self>, raft: &Raft) -> Result<u64, MasterError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let start_driver = {
            let mut g = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
            g.1.push(tx);
            !std::mem::replace(&mut g.0, true)
        };
        if start_driver {
            let (me, raft) = (self.clone(), raft.clone());
            tokio::spawn(async move {
                let mut last: Option<tokio::time::Instant> = None;
                loop {
                    // Rounds start at most every `gather`: reads
                    // that arrive meanwhile gather, and one request then
                    // serves them all (which is what lets read capacity
                    // grow with the number of masters); the first read
                    // after a quiet spell goes at once.
                    if let Some(t) = last {
                        tokio::time::sleep_until(t + me.gather).await;
                    }
                    last = Some(tokio::time::Instant::now());
                    let waiters = {
                        let mut g = me.waiting.lock().unwrap_or_else(|p| p.into_inner());
                        if g.1.is_empty() {
                            g.0 = false;
                            return;
                        }
                        std::mem::take(&mut g.1)
                    };
                    let r = me.ask_leader(&raft).await.map_err(|e| e.to_string());
                    for w in waiters {
                        let _ = w.send(r.clone());
                    }
                }
            });
        }
        match rx.await {
            Ok(Ok(i)) => Ok(i),
            _ => Err(self.not_leader(raft)),
        }
    }

    async fn ask_leader(&self, raft: &Raft) -> Result<u64, MasterError> {
        let addr = leader_addr(raft).ok_or_else(|| self.not_leader(raft))?;
        let mut client = {
            let mut g = self.leader.lock().unwrap_or_else(|p| p.into_inner());
            match &*g {
                Some((a, c)) if *a == addr => c.clone(),
                _ => {
                    let c = RaftTransportClient::new(
                        network::channel(&addr).map_err(MasterError::Raft)?,
                    );
                    *g = Some((addr.clone(), c.clone()));
                    c
                }
            }
        };
        let unary = {
            let g = self.unary_leader.lock().unwrap_or_else(|p| p.into_inner());
            g.as_deref() == Some(addr.as_str())
        };
        if !unary {
            match self.ask_on_stream(&addr, client.clone()).await {
                Ok(index) => return Ok(index),
                Err(Some(s)) if s.code() == tonic::Code::Unimplemented => {
                    tracing::info!(leader = %addr, "the leader has no read-index stream: one call per round");
                    *self.unary_leader.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(addr.clone());
                }
                Err(_) => return Err(self.not_leader(raft)),
            }
        }
        let mut req = tonic::Request::new(pb::Empty {});
        req.set_timeout(READ_INDEX_TIMEOUT);
        client
            .read_index(req)
            .await
            .map(|r| r.into_inner().index)
            .map_err(|_| self.not_leader(raft))
    }

    /// One ask on the stream to the leader at `addr`, answered within
    /// [`READ_INDEX_TIMEOUT`]. The stream kept from the last round is used
    /// if it still leads there; if it turns out to have ended meanwhile
    /// (the leader's idle limit, a restart), a new one is opened for the
    /// same ask. Any failure drops the stream. `Err(Some)` carries the
    /// status the leader answered with.
    async fn ask_on_stream(
        &self,
        addr: &str,
        mut client: RaftTransportClient<Channel>,
    ) -> Result<u64, Option<tonic::Status>> {
        let deadline = tokio::time::Instant::now() + READ_INDEX_TIMEOUT;
        let kept = self
            .stream
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .filter(|s| s.addr == addr);
        if let Some(mut s) = kept {
            s.seq += 1;
            // Never full: at most one ask is unanswered at a time.
            if s.asks.try_send(pb::ReadIndexAsk { seq: s.seq }).is_ok() {
                match s.answer(deadline).await {
                    Ok(index) => return Ok(self.keep(s, index)),
                    Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                    Err(_) => {}
                }
            }
        }
        // The first ask is queued before the stream opens and goes out
        // with it.
        let (asks, rx) = tokio::sync::mpsc::channel(4);
        let _ = asks.try_send(pb::ReadIndexAsk { seq: 1 });
        let opened = tokio::time::timeout_at(
            deadline,
            client.read_index_stream(tokio_stream::wrappers::ReceiverStream::new(rx)),
        )
        .await
        .map_err(|_| None)?
        .map_err(Some)?;
        let mut s = IndexStream {
            addr: addr.to_string(),
            asks,
            answers: opened.into_inner(),
            seq: 1,
        };
        let index = s.answer(deadline).await?;
        Ok(self.keep(s, index))
    }

    fn keep(&self, s: IndexStream, index: u64) -> u64 {
        *self.stream.lock().unwrap_or_else(|p| p.into_inner()) = Some(s);
        index
    }

    /// Waits until this master has applied `index` (a follower serving a
    /// linearizable read).
    pub async fn wait_applied(&self, raft: &Raft, index: u64) -> Result<(), MasterError> {
        raft.wait(Some(Duration::from_secs(5)))
            .applied_index_at_least(Some(index), "read")
            .await
            .map(drop)
            .map_err(|e| MasterError::Raft(format!("waiting to apply index {index}: {e}")))
    }
}

/// Maps a failed write to the error the client acts on.
pub fn write_error(
    reads: &ReadIndex,
    raft: &Raft,
    e: RaftError<u64, ClientWriteError<u64, BasicNode>>,
) -> MasterError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => MasterError::NotLeader {
            me: reads.me.clone(),
            leader: f.leader_node.map(|n| n.addr),
        },
        RaftError::APIError(e) => MasterError::Raft(e.to_string()),
        RaftError::Fatal(_) => reads.not_leader(raft),
    }
}

type Proposal = (
    Item,
    tokio::sync::oneshot::Sender<Result<Output, MasterError>>,
);

/// Collects commands from concurrent calls into log entries.
#[derive(Clone)]
pub struct Proposer {
    tx: tokio::sync::mpsc::UnboundedSender<Proposal>,
}

impl Proposer {
    pub fn start(raft: Raft, reads: Arc<ReadIndex>) -> Proposer {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Proposal>();
        // Two entries in flight: one being committed while the next fills.
        let slots = Arc::new(tokio::sync::Semaphore::new(2));
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(p) => batch.push(p),
                        Err(_) => break,
                    }
                }
                let (raft, reads) = (raft.clone(), reads.clone());
                tokio::spawn(async move {
                    let (items, senders): (Vec<Item>, Vec<_>) = batch.into_iter().unzip();
                    match raft.client_write(Request { items }).await {
                        Ok(r) => {
                            let mut outs = r.data.into_iter();
                            for s in senders {
                                let out = outs.next().unwrap_or_else(|| {
                                    Err(MetaError::Invalid("no result for a command".into()))
                                });
                                let _ = s.send(out.map_err(MasterError::from));
                            }
                        }
                        Err(e) => {
                            for s in senders {
                                let _ = s.send(Err(write_error(&reads, &raft, e.clone())));
                            }
                        }
                    }
                    drop(slot);
                });
            }
        });
        Proposer { tx }
    }

    /// Commits a command (with others that arrive meanwhile) and returns
    /// what applying it produced on this master.
    pub async fn propose(&self, item: Item) -> Result<Output, MasterError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send((item, tx))
            .map_err(|_| MasterError::Raft("the master is shutting down".into()))?;
        rx.await
            .map_err(|_| MasterError::Raft("the master is shutting down".into()))?
    }
}
