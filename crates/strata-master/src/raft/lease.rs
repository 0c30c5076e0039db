//! Follower read leases: a follower that holds one answers linearizable
//! reads from its own state, without asking the leader for a read index.
//!
//! The leader grants a lease with a read-index answer when nothing is being
//! written (no entry in flight, none for [`QUIET`], everything it logged
//! applied): it promises to append nothing to its log until the follower has
//! given the lease back or the lease has run out. The follower may answer
//! from its state once it has applied the index granted with the lease, as
//! every write acknowledged before the read was committed at or below it.
//! Before the next write the leader withdraws every lease it granted
//! ([`Leases::quiesce`]): it asks the holders on their read-index streams
//! and waits for each to confirm, or for its lease to run out (a holder that
//! is stopped or cut off). Leases are granted only within the leader's own
//! lease (no other master can have been elected before it ends: followers
//! refuse votes for the election timeout after they last heard from a
//! leader), and measured by the follower from before it asked, so a lease
//! never outlives the leadership that granted it.
//!
//! Cost: none while there are no reads on followers or no writes; with
//! both, the first write after a quiet spell waits one round trip to the
//! holders, and no lease is granted while writes keep coming (followers
//! then ask for read indices as before).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use strata_proto::pb;

/// How long after the last write the leader grants leases again.
pub const QUIET: Duration = Duration::from_millis(100);

/// A lease as the leader keeps it: one per read-index stream.
struct Granted {
    /// When the lease ends on the leader's clock (it ends earlier on the
    /// follower's, which counts from before its ask was sent).
    until: Instant,
    /// The ask the lease was granted with (named in the withdrawal).
    seq: u64,
    /// The stream's answers, to send the withdrawal on.
    answers: tokio::sync::mpsc::WeakSender<Result<pb::ReadIndexResponse, tonic::Status>>,
    /// Withdrawal sent, not yet confirmed.
    withdrawing: bool,
}

#[derive(Default)]
struct LeaderState {
    next_stream: u64,
    granted: HashMap<u64, Granted>,
    /// Proposals in flight.
    writing: usize,
    /// When the last proposal ended.
    last_write: Option<Instant>,
}

/// The leader's side: leases granted, and writes waiting for them.
pub struct Leases {
    state: Mutex<LeaderState>,
    confirmed: tokio::sync::Notify,
    /// Leases live in memory only: a master that restarts (and may lead
    /// again in the same term, openraft keeps its vote) cannot withdraw
    /// those it granted before, so it writes nothing and casts no vote
    /// until any of them would have run out.
    not_before: Instant,
}

impl Leases {
    /// `longest`: the longest lease this master grants.
    pub fn new(longest: Duration) -> Self {
        Leases {
            state: Mutex::default(),
            confirmed: tokio::sync::Notify::new(),
            not_before: Instant::now() + longest + Duration::from_millis(50),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LeaderState> {
        super::lock(&self.state)
    }

    /// A number for a new read-index stream.
    pub fn stream(&self) -> u64 {
        let mut s = self.lock();
        s.next_stream += 1;
        s.next_stream
    }

    /// Grants the follower on `stream` a lease of `length` with its ask
    /// `seq`, if nothing is being or was just written and `quiescent`
    /// (checked under the lock, so a write cannot start in between) says
    /// everything logged is applied; returns the index the follower must
    /// apply before it answers reads.
    pub fn grant(
        &self,
        stream: u64,
        seq: u64,
        length: Duration,
        answers: tokio::sync::mpsc::WeakSender<Result<pb::ReadIndexResponse, tonic::Status>>,
        quiescent: impl FnOnce() -> Option<u64>,
    ) -> Option<u64> {
        let mut s = self.lock();
        if s.writing > 0 || s.last_write.is_some_and(|t| t.elapsed() < QUIET) {
            return None;
        }
        let index = quiescent()?;
        let now = Instant::now();
        s.granted.retain(|_, g| g.until > now);
        s.granted.insert(
            stream,
            Granted {
                until: now + length,
                seq,
                answers,
                withdrawing: false,
            },
        );
        Some(index)
    }

    /// The follower on `stream` gave back the lease granted with ask `seq`
    /// (or an earlier one).
    pub fn given_back(&self, stream: u64, seq: u64) {
        let mut s = self.lock();
        if s.granted.get(&stream).is_some_and(|g| g.seq <= seq) {
            s.granted.remove(&stream);
            drop(s);
            self.confirmed.notify_waiters();
        }
    }

    /// Before a proposal or a vote: stops granting, withdraws every lease
    /// and waits until each is given back or has run out.
    pub async fn quiesce(&self) -> Writing<'_> {
        self.lock().writing += 1;
        // From here on no lease is granted; dropping the guard (also when
        // this future is dropped) allows it again.
        let writing = Writing(self);
        tokio::time::sleep_until(self.not_before.into()).await;
        loop {
            let notified = self.confirmed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let wait_until = {
                let mut s = self.lock();
                let now = Instant::now();
                s.granted.retain(|_, g| g.until > now);
                for g in s.granted.values_mut() {
                    if !g.withdrawing {
                        g.withdrawing = true;
                        let withdraw = pb::ReadIndexResponse {
                            withdraw: g.seq,
                            ..Default::default()
                        };
                        // Not sent (stream gone, or full): the lease runs out.
                        if let Some(tx) = g.answers.upgrade() {
                            let _ = tx.try_send(Ok(withdraw));
                        }
                    }
                }
                match s.granted.values().map(|g| g.until).min() {
                    None => return writing,
                    Some(t) => t,
                }
            };
            let _ = tokio::time::timeout_at(wait_until.into(), notified).await;
        }
    }
}

/// Held while a proposal is in flight: no lease is granted meanwhile.
pub struct Writing<'a>(&'a Leases);

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.writing -= 1;
        s.last_write = Some(Instant::now());
    }
}

/// A lease as the follower holds it.
#[derive(Clone, Copy, Debug)]
pub struct Held {
    /// When it ends on this master's clock, and how long it was for.
    pub until: Instant,
    pub length: Duration,
    /// The leader's term: a lease is void once this master's term moves on.
    pub term: u64,
    /// Reads wait until this master has applied this index.
    pub index: u64,
    /// The ask it was granted with, and the stream that carried it.
    pub seq: u64,
    pub stream: u64,
}

/// The part of a lease the follower counts on: its length less a margin
/// for the two clocks running at slightly different rates.
pub fn follower_length(granted_ms: u64) -> Duration {
    Duration::from_millis(granted_ms.saturating_sub(granted_ms / 20 + 2))
}
