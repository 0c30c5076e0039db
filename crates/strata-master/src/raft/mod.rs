//! Metadata replication with openraft: the log ([`log_store`]), the state
//! machine over `strata_meta` ([`state_machine`]), master-to-master messages
//! ([`network`]), and what the service needs from Raft: is this master the
//! leader, where is the leader, and when may a read be answered.

pub mod lease;
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

/// The shortest read lease worth granting (what is left of the leader's
/// own lease after the time since its last quorum acknowledgement).
const MIN_LEASE_MS: u64 = 20;

/// As leader: the highest log index a majority of every voter set has (the
/// commit index), or what this master has applied if higher. A follower
/// applies an entry once it learns the entry is committed, which may be
/// before the leader has applied it itself: a read on the leader must then
/// wait for it too, or it could miss what a read on that follower saw.
fn committed(m: &openraft::RaftMetrics<u64, BasicNode>) -> u64 {
    let applied = m.last_applied.map(|l| l.index).unwrap_or(0);
    let Some(matched) = &m.replication else {
        return applied;
    };
    let index = |v: &u64| matched.get(v).copied().flatten().map_or(0, |l| l.index);
    m.membership_config
        .membership()
        .get_joint_config()
        .iter()
        .filter(|voters| !voters.is_empty())
        .map(|voters| {
            let mut have: Vec<u64> = voters.iter().map(index).collect();
            have.sort_unstable_by(|a, b| b.cmp(a));
            // What the (n/2 + 1)-th highest holds: a majority has it.
            have[voters.len() / 2]
        })
        .min()
        .map_or(applied, |commit| commit.max(applied))
}

/// How long a follower waits for the leader's read index.
const READ_INDEX_TIMEOUT: Duration = Duration::from_secs(2);

/// The ask on the wire: its number, when it was sent, and where its
/// answer goes.
type Pending = Option<(
    u64,
    std::time::Instant,
    tokio::sync::oneshot::Sender<pb::ReadIndexResponse>,
)>;

/// A follower's read-index stream to the leader at `addr`: asks go out on
/// `asks` numbered by `seq`; a task reads what comes back (answers, and
/// withdrawals of leases, which may come at any time) until it ends.
struct IndexStream {
    addr: String,
    asks: tokio::sync::mpsc::Sender<pb::ReadIndexAsk>,
    pending: Arc<std::sync::Mutex<Pending>>,
    /// Reads the answers (once the stream is open).
    reader: Option<tokio::task::JoinHandle<()>>,
    seq: u64,
    /// This master's number for the stream (leases name the stream that
    /// granted them).
    no: u64,
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Drop for IndexStream {
    fn drop(&mut self) {
        // A lease it carried stays held until it runs out: the leader,
        // which cannot withdraw it any more, waits for that too.
        if let Some(r) = &self.reader {
            r.abort();
        }
    }
}

impl IndexStream {
    /// Sends the next ask; its answer arrives on the returned channel
    /// (closed if the stream ends first).
    fn ask(&mut self) -> Option<tokio::sync::oneshot::Receiver<pb::ReadIndexResponse>> {
        self.seq += 1;
        let (tx, rx) = tokio::sync::oneshot::channel();
        *lock(&self.pending) = Some((self.seq, std::time::Instant::now(), tx));
        let ask = pb::ReadIndexAsk {
            seq: self.seq,
            want_lease: true,
            given_back: 0,
        };
        // At most one ask is unanswered at a time, beside a few leases
        // given back: the channel is full only if the stream has stalled,
        // and then the ask fails (the caller opens a new stream or retries).
        self.asks.try_send(ask).ok()?;
        Some(rx)
    }
}

/// Reads a stream's answers until it ends: hands each answer to its ask
/// (recording the lease it grants first), and gives back withdrawn leases.
async fn read_answers(
    mut answers: tonic::Streaming<pb::ReadIndexResponse>,
    pending: Arc<std::sync::Mutex<Pending>>,
    held: Arc<std::sync::Mutex<Option<lease::Held>>>,
    asks: tokio::sync::mpsc::WeakSender<pb::ReadIndexAsk>,
    no: u64,
) {
    // The last ask whose lease was withdrawn: a withdrawal can overtake the
    // answer that grants the lease (both are sent by different tasks on the
    // leader), and that lease must then not be taken up.
    let mut withdrawn = 0;
    while let Ok(Some(a)) = answers.message().await {
        if a.withdraw > 0 {
            withdrawn = withdrawn.max(a.withdraw);
            {
                let mut h = lock(&held);
                if h.is_some_and(|h| h.stream == no && h.seq <= a.withdraw) {
                    *h = None;
                }
            }
            let Some(asks) = asks.upgrade() else { return };
            let back = pb::ReadIndexAsk {
                seq: 0,
                want_lease: false,
                given_back: a.withdraw,
            };
            if asks.send(back).await.is_err() {
                return;
            }
            continue;
        }
        let mut p = lock(&pending);
        if p.as_ref().is_some_and(|(seq, ..)| *seq == a.seq)
            && let Some((seq, sent, tx)) = p.take()
        {
            if a.lease_ms > 0 && seq > withdrawn {
                let length = lease::follower_length(a.lease_ms);
                *lock(&held) = Some(lease::Held {
                    until: sent + length,
                    length,
                    term: a.term,
                    index: a.index,
                    seq,
                    stream: no,
                });
            }
            let _ = tx.send(a);
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
    /// Read leases this master granted as leader.
    pub leases: lease::Leases,
    /// The read lease this master holds as a follower.
    held: Arc<std::sync::Mutex<Option<lease::Held>>>,
    /// A renewal of the held lease is on its way.
    renewing: std::sync::atomic::AtomicBool,
    /// Numbers this master's read-index streams.
    streams: AtomicU64,
    /// Linearizable read calls served as a follower: under a lease, and
    /// after asking for a read index.
    pub lease_reads: AtomicU64,
    pub read_index_reads: AtomicU64,
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
            leases: lease::Leases::new(Duration::from_millis(timing.lease_ms())),
            held: Arc::new(std::sync::Mutex::new(None)),
            renewing: std::sync::atomic::AtomicBool::new(false),
            streams: AtomicU64::new(0),
            lease_reads: AtomicU64::new(0),
            read_index_reads: AtomicU64::new(0),
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
    /// the lease that is what a majority has in its log (every write
    /// acknowledged or seen by a read anywhere is committed, so at or
    /// below it); otherwise a quorum round confirms leadership first.
    pub async fn leader_read_index(&self, raft: &Raft) -> Result<u64, MasterError> {
        self.ensure_leader(raft).await?;
        let (index, acked_ms) = {
            let m = raft.metrics();
            let m = m.borrow();
            (committed(&m), m.millis_since_quorum_ack)
        };
        if acked_ms.is_some_and(|ms| ms < self.lease_ms) {
            return Ok(index);
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

    /// As leader: answers a follower's ask on read-index stream `stream`,
    /// with a read lease if it wants one and one can be granted (see
    /// [`lease`]).
    pub async fn answer(
        &self,
        raft: &Raft,
        stream: u64,
        ask: &pb::ReadIndexAsk,
        answers: tokio::sync::mpsc::WeakSender<Result<pb::ReadIndexResponse, tonic::Status>>,
    ) -> Result<pb::ReadIndexResponse, MasterError> {
        let index = self.leader_read_index(raft).await?;
        let mut answer = pb::ReadIndexResponse {
            index,
            seq: ask.seq,
            ..Default::default()
        };
        if !ask.want_lease {
            return Ok(answer);
        }
        let (term, acked_ms) = {
            let m = raft.metrics();
            let m = m.borrow();
            (m.current_term, m.millis_since_quorum_ack)
        };
        // What is left of this leader's own lease, less what the ask took
        // to arrive is counted by the follower (it counts from before it
        // asked).
        let Some(left) = acked_ms.and_then(|ms| self.lease_ms.checked_sub(ms)) else {
            return Ok(answer);
        };
        if left < MIN_LEASE_MS {
            return Ok(answer);
        }
        let quiescent = || {
            let m = raft.metrics();
            let m = m.borrow();
            let applied = m.last_applied.map(|l| l.index).unwrap_or(0);
            (m.state == ServerState::Leader
                && m.current_term == term
                && m.last_log_index.unwrap_or(0) == applied)
                .then_some(applied)
        };
        if let Some(i) = self.leases.grant(
            stream,
            ask.seq,
            Duration::from_millis(left),
            answers,
            quiescent,
        ) {
            answer.index = answer.index.max(i);
            answer.lease_ms = left;
            answer.term = term;
        }
        Ok(answer)
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
    /// not falls back to the linearizable path. A follower holding a read
    /// lease answers linearizable reads from its own state too.
    pub async fn read_barrier(
        self: &Arc<Self>,
        raft: &Raft,
        stale: bool,
    ) -> Result<(), MasterError> {
        let (state, leader, term, applied) = {
            let m = raft.metrics();
            let m = m.borrow();
            (
                m.state,
                m.current_leader,
                m.current_term,
                m.last_applied.map(|l| l.index).unwrap_or(0),
            )
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
        } else if let Some(index) = self.leased(raft, term) {
            self.lease_reads.fetch_add(1, Ordering::Relaxed);
            index
        } else {
            self.read_index_reads.fetch_add(1, Ordering::Relaxed);
            self.coalesced_read_index(raft).await?
        };
        if applied < index {
            self.wait_applied(raft, index).await?;
        }
        Ok(())
    }

    /// The index to have applied if this follower holds a read lease good
    /// for a read beginning now (renewed once half of it has passed).
    fn leased(self: &Arc<Self>, raft: &Raft, term: u64) -> Option<u64> {
        let h = (*lock(&self.held))?;
        let now = std::time::Instant::now();
        if h.term != term || now >= h.until {
            return None;
        }
        if h.until - now < h.length / 2 && !self.renewing.swap(true, Ordering::AcqRel) {
            // The answer is not waited for: the lease still holds.
            let (tx, _) = tokio::sync::oneshot::channel();
            self.enqueue(raft, tx);
        }
        Some(h.index)
    }

    /// A read index from the leader, shared by every read that arrived
    /// before the request was sent: concurrent reads on a follower cost the
    /// leader one small call per round, not one each. A read never joins a
    /// request already on the wire (its answer could predate the read).
    async fn coalesced_read_index(self: &Arc<Self>, raft: &Raft) -> Result<u64, MasterError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.enqueue(raft, tx);
        match rx.await {
            Ok(Ok(i)) => Ok(i),
            _ => Err(self.not_leader(raft)),
        }
    }

    /// Queues a read for the next read-index round, starting the task that
    /// runs rounds if none is running.
    fn enqueue(
        self: &Arc<Self>,
        raft: &Raft,
        tx: tokio::sync::oneshot::Sender<Result<u64, String>>,
    ) {
        let start_driver = {
            let mut g = lock(&self.waiting);
            g.1.push(tx);
            !std::mem::replace(&mut g.0, true)
        };
        if !start_driver {
            return;
        }
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
                    let mut g = lock(&me.waiting);
                    if g.1.is_empty() {
                        g.0 = false;
                        return;
                    }
                    std::mem::take(&mut g.1)
                };
                let r = me.ask_leader(&raft).await.map_err(|e| e.to_string());
                me.renewing.store(false, Ordering::Release);
                for w in waiters {
                    let _ = w.send(r.clone());
                }
            }
        });
    }

    async fn ask_leader(&self, raft: &Raft) -> Result<u64, MasterError> {
        let addr = leader_addr(raft).ok_or_else(|| self.not_leader(raft))?;
        let mut client = {
            let mut g = lock(&self.leader);
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
        let unary = lock(&self.unary_leader).as_deref() == Some(addr.as_str());
        if !unary {
            match self.ask_on_stream(&addr, client.clone()).await {
                Ok(index) => return Ok(index),
                Err(Some(s)) if s.code() == tonic::Code::Unimplemented => {
                    tracing::info!(leader = %addr, "the leader has no read-index stream: one call per round");
                    *lock(&self.unary_leader) = Some(addr.clone());
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
        let kept = lock(&self.stream)
            .take()
            .filter(|s| s.addr == addr && s.reader.as_ref().is_some_and(|r| !r.is_finished()));
        if let Some(mut s) = kept
            && let Some(rx) = s.ask()
        {
            match tokio::time::timeout_at(deadline, rx).await {
                Ok(Ok(a)) => return Ok(self.keep(s, a.index)),
                Err(_) => return Err(None),
                // The stream ended: ask again on a new one.
                Ok(Err(_)) => {}
            }
        }
        // The first ask is queued before the stream opens and goes out
        // with it.
        let (asks, rx) = tokio::sync::mpsc::channel(16);
        let mut s = IndexStream {
            addr: addr.to_string(),
            asks,
            pending: Arc::new(std::sync::Mutex::new(None)),
            reader: None,
            seq: 0,
            no: self.streams.fetch_add(1, Ordering::Relaxed) + 1,
        };
        let answer = s.ask().ok_or(None)?;
        let opened = tokio::time::timeout_at(
            deadline,
            client.read_index_stream(tokio_stream::wrappers::ReceiverStream::new(rx)),
        )
        .await
        .map_err(|_| None)?
        .map_err(Some)?;
        s.reader = Some(tokio::spawn(read_answers(
            opened.into_inner(),
            s.pending.clone(),
            self.held.clone(),
            s.asks.downgrade(),
            s.no,
        )));
        match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(a)) => Ok(self.keep(s, a.index)),
            _ => Err(None),
        }
    }

    fn keep(&self, s: IndexStream, index: u64) -> u64 {
        *lock(&self.stream) = Some(s);
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

/// Runs `change` (a membership change: it appends log entries) with every
/// follower read lease withdrawn first and none granted until it is done.
/// It runs as its own task, so a caller that goes away (a timed-out call)
/// cannot end the wait while openraft still appends the change.
pub async fn with_leases_withdrawn<T: Send + 'static>(
    reads: &Arc<ReadIndex>,
    change: impl std::future::Future<Output = T> + Send + 'static,
) -> Result<T, MasterError> {
    let reads = reads.clone();
    tokio::spawn(async move {
        let _writing = reads.leases.quiesce().await;
        change.await
    })
    .await
    .map_err(|e| MasterError::Raft(format!("membership change did not finish: {e}")))
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
                    // Followers' read leases are withdrawn first, and none
                    // is granted until the entry is applied.
                    let writing = reads.leases.quiesce().await;
                    let written = raft.client_write(Request { items }).await;
                    drop(writing);
                    match written {
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
