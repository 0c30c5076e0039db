//! Talking to a set of masters: follow the leader, ride out failovers, and
//! tag mutating calls with request ids so a retried call is applied once.
//! Clients and workers both use it; it knows the gRPC conventions the
//! masters use (headers, "not the leader" replies), nothing else.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

use crate::pb::master_client::MasterClient;

/// Reply metadata naming the leader's address when a master is not it.
pub const LEADER_HEADER: &str = "x-strata-leader";
/// Request metadata: the id of a mutating call (32 hex digits).
pub const REQUEST_ID_HEADER: &str = "x-strata-request-id";
/// A request id as a `Mutate` batch member carries it: 16 bytes, big-endian.
pub fn request_id_bytes(id: u128) -> Vec<u8> {
    id.to_be_bytes().to_vec()
}

/// The request id of a `Mutate` batch member: `None` when it has none
/// (empty), an error when it is not 16 bytes.
pub fn request_id_from_bytes(b: &[u8]) -> Result<Option<u128>, String> {
    match <[u8; 16]>::try_from(b) {
        Ok(a) => Ok(Some(u128::from_be_bytes(a))),
        Err(_) if b.is_empty() => Ok(None),
        Err(_) => Err(format!("a request id of {} bytes; it has 16", b.len())),
    }
}

/// Request metadata: `stale` lets any master answer a read from its own
/// state without confirming it is current.
pub const READ_HEADER: &str = "x-strata-read";

/// Where reads go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadFrom {
    /// The leader only.
    Leader,
    /// Any master, in turn (each confirms with the leader that it is current).
    Any,
    /// Any master, answering from its own state (may lag the leader).
    AnyStale,
}

/// How often the membership is re-read in the background of calls.
const MEMBERSHIP_REFRESH: Duration = Duration::from_secs(3);

struct State {
    /// The configured addresses: always tried when the known ones fail.
    seeds: Vec<String>,
    addrs: Vec<String>,
    refreshed: Option<Instant>,
    channels: HashMap<String, Channel>,
    leader: Option<String>,
    /// Masters that failed recently are skipped for reads until then.
    down: HashMap<String, Instant>,
}

pub struct MasterSet {
    state: Mutex<State>,
    next_read: AtomicUsize,
    retry_for: Duration,
    read_from: ReadFrom,
    client_id: u64,
    seq: AtomicU64,
    /// Whether any master ever answered: until one has, a call gives up
    /// after [`FIRST_CONTACT`] (a wrong address should fail fast).
    reached: std::sync::atomic::AtomicBool,
}

const FIRST_CONTACT: Duration = Duration::from_secs(3);
/// Longest pause between retries while no leader is known.
const MAX_BACKOFF: Duration = Duration::from_millis(200);

/// The last failure of a call, with the master it came from.
#[derive(Debug)]
pub struct CallError {
    pub addr: String,
    pub status: Status,
}

/// A lazily connected channel to one master (clients, workers and the
/// masters themselves use the same settings).
pub fn channel(addr: &str) -> Result<Channel, String> {
    let uri = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    Ok(tonic::transport::Endpoint::from_shared(uri)
        .map_err(|e| format!("invalid master address {addr:?}: {e}"))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        // A master that is alive at the TCP level but not answering (stopped,
        // hung, cut off) fails its calls within ~3 s, which are then retried
        // elsewhere; calls that are merely slow are not cut short.
        .http2_keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(2))
        .keep_alive_while_idle(true)
        .connect_lazy())
}

/// True when another master (or the same one a little later) may succeed:
/// the master is not the leader, lost its quorum, or could not be reached.
pub fn is_failover(s: &Status) -> bool {
    if s.metadata().get(LEADER_HEADER).is_some() {
        return true;
    }
    let m = s.message();
    match s.code() {
        Code::Unavailable => !m.contains("under storage"),
        Code::Unknown | Code::Cancelled => true,
        _ => false,
    }
}

impl MasterSet {
    /// `addrs`: the configured masters (any member will do: the others are
    /// learned from their replies). `retry_for`: how long a call keeps
    /// retrying through a failover before it gives up.
    pub fn new(
        addrs: Vec<String>,
        retry_for: Duration,
        read_from: ReadFrom,
    ) -> Result<Self, String> {
        if addrs.is_empty() {
            return Err(
                "no master address configured (set cluster.master or STRATA_MASTER)".into(),
            );
        }
        let mut channels = HashMap::new();
        for a in &addrs {
            channels.insert(a.clone(), channel(a)?);
        }
        Ok(MasterSet {
            state: Mutex::new(State {
                seeds: addrs.clone(),
                addrs,
                refreshed: None,
                down: HashMap::new(),
                channels,
                leader: None,
            }),
            next_read: AtomicUsize::new(0),
            retry_for,
            read_from,
            client_id: rand_u64(),
            seq: AtomicU64::new(1),
            reached: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The masters currently known.
    pub fn addrs(&self) -> Vec<String> {
        self.lock().addrs.clone()
    }

    /// The leader, if known.
    pub fn leader(&self) -> Option<String> {
        self.lock().leader.clone()
    }

    /// Replaces the known masters with the membership a master reported
    /// (so masters replaced one by one are followed without restarts).
    pub fn set_members(&self, addrs: &[String]) {
        if addrs.is_empty() {
            return;
        }
        let mut st = self.lock();
        if st.addrs == addrs {
            return;
        }
        for a in addrs {
            if !st.channels.contains_key(a)
                && let Ok(ch) = channel(a)
            {
                st.channels.insert(a.clone(), ch);
            }
        }
        let seeds = st.seeds.clone();
        st.channels
            .retain(|k, _| addrs.contains(k) || seeds.contains(k));
        st.addrs = addrs.to_vec();
        if st.leader.as_ref().is_some_and(|l| !addrs.contains(l)) {
            st.leader = None;
        }
    }

    /// A client for one master.
    pub fn client(&self, addr: &str) -> Option<MasterClient<Channel>> {
        let mut st = self.lock();
        if !st.channels.contains_key(addr) {
            let ch = channel(addr).ok()?;
            st.channels.insert(addr.to_string(), ch);
        }
        st.channels.get(addr).map(|ch| {
            MasterClient::new(ch.clone())
                .max_decoding_message_size(256 << 20)
                .max_encoding_message_size(64 << 20)
        })
    }

    fn pick(&self, write: bool, attempt: u32) -> String {
        let st = self.lock();
        let n = st.addrs.len().max(1);
        if !write && self.read_from != ReadFrom::Leader && attempt == 0 {
            let now = Instant::now();
            for _ in 0..n {
                let i = self.next_read.fetch_add(1, Ordering::Relaxed) % n;
                let a = &st.addrs[i];
                if st.down.get(a).is_none_or(|t| *t < now) {
                    return a.clone();
                }
            }
        }
        if let Some(l) = &st.leader {
            return l.clone();
        }
        let i = self.next_read.fetch_add(1, Ordering::Relaxed) % n;
        st.addrs[i].clone()
    }

    fn note_leader(&self, addr: Option<String>) {
        let mut st = self.lock();
        if let Some(a) = &addr
            && !st.addrs.contains(a)
        {
            st.addrs.push(a.clone());
        }
        st.leader = addr;
    }

    /// A fresh id for one mutating call (kept across its retries).
    pub fn request_id(&self) -> u128 {
        ((self.client_id as u128) << 64) | self.seq.fetch_add(1, Ordering::Relaxed) as u128
    }

    /// A request carrying `msg`, with the request id (mutations) or the
    /// read mode (reads) in its metadata.
    pub fn request<T>(&self, msg: T, rid: Option<u128>) -> Request<T> {
        let mut r = Request::new(msg);
        match rid {
            Some(id) => {
                if let Ok(v) = format!("{id:032x}").parse() {
                    r.metadata_mut().insert(REQUEST_ID_HEADER, v);
                }
            }
            None if self.read_from == ReadFrom::AnyStale => {
                r.metadata_mut().insert(
                    READ_HEADER,
                    tonic::metadata::MetadataValue::from_static("stale"),
                );
            }
            None => {}
        }
        r
    }

    /// The member list as the configured masters see it: asked of the
    /// configured addresses first, in order (so `--master ADDR` shows that
    /// master's view), then of the other known members.
    pub async fn list_masters(&self) -> Result<crate::pb::MasterList, CallError> {
        let mut order = self.lock().seeds.clone();
        for a in self.addrs() {
            if !order.contains(&a) {
                order.push(a);
            }
        }
        let mut last = None;
        for addr in order {
            let Some(mut c) = self.client(&addr) else {
                continue;
            };
            let mut req = Request::new(crate::pb::Empty {});
            req.set_timeout(Duration::from_secs(2));
            match c.list_masters(req).await {
                Ok(r) => {
                    self.reached.store(true, Ordering::Relaxed);
                    let l = r.into_inner();
                    let addrs: Vec<String> = l.masters.iter().map(|m| m.addr.clone()).collect();
                    self.set_members(&addrs);
                    return Ok(l);
                }
                Err(status) => last = Some(CallError { addr, status }),
            }
        }
        Err(last.unwrap_or_else(|| CallError {
            addr: String::new(),
            status: Status::invalid_argument("no master address configured"),
        }))
    }

    /// Keeps the member list fresh in the background (every few seconds,
    /// for as long as the set is alive), so that even an idle client follows
    /// masters that are replaced one by one. Needs a tokio runtime; without
    /// one, the list is refreshed only by calls.
    pub fn keep_fresh(self: &std::sync::Arc<Self>) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let weak = std::sync::Arc::downgrade(self);
        rt.spawn(async move {
            loop {
                tokio::time::sleep(MEMBERSHIP_REFRESH).await;
                let Some(set) = weak.upgrade() else {
                    return;
                };
                if set.refresh_due() {
                    set.refresh().await;
                }
            }
        });
    }

    /// Asks a master for the current membership and leader (the leader
    /// first, then the other known masters in turn, then the configured
    /// ones).
    pub async fn refresh(&self) -> bool {
        let (mut order, seeds) = {
            let mut st = self.lock();
            st.refreshed = Some(Instant::now());
            let mut order = st.addrs.clone();
            if !order.is_empty() {
                let k = self.next_read.fetch_add(1, Ordering::Relaxed) % order.len();
                order.rotate_left(k);
            }
            if let Some(l) = st.leader.clone() {
                order.retain(|a| *a != l);
                order.insert(0, l);
            }
            (order, st.seeds.clone())
        };
        for s in seeds {
            if !order.contains(&s) {
                order.push(s);
            }
        }
        for addr in order {
            let Some(mut c) = self.client(&addr) else {
                continue;
            };
            let mut req = Request::new(crate::pb::Empty {});
            req.set_timeout(Duration::from_secs(1));
            if let Ok(r) = c.list_masters(req).await {
                self.reached.store(true, Ordering::Relaxed);
                let l = r.into_inner();
                let addrs: Vec<String> = l.masters.iter().map(|m| m.addr.clone()).collect();
                self.set_members(&addrs);
                if !l.leader_addr.is_empty() {
                    self.note_leader(Some(l.leader_addr));
                }
                return true;
            }
        }
        false
    }

    fn refresh_due(&self) -> bool {
        let st = self.lock();
        st.refreshed
            .is_none_or(|t| t.elapsed() > MEMBERSHIP_REFRESH)
    }

    /// Where reads go.
    pub fn read_from(&self) -> ReadFrom {
        self.read_from
    }

    /// Runs `f` against the leader (mutations) or a master chosen by the
    /// read mode, following "not the leader" replies and retrying through
    /// failovers with backoff for up to `retry_for`.
    pub async fn call<T, F, Fut>(&self, write: bool, mut f: F) -> Result<T, CallError>
    where
        F: FnMut(MasterClient<Channel>) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        self.call_at(write, |_, c| f(c)).await
    }

    /// [`MasterSet::call`], with `f` also given the address of the master
    /// it is sent to.
    pub async fn call_at<T, F, Fut>(&self, write: bool, mut f: F) -> Result<T, CallError>
    where
        F: FnMut(String, MasterClient<Channel>) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let retry_for = if self.reached.load(Ordering::Relaxed) {
            self.retry_for
        } else {
            self.retry_for.min(FIRST_CONTACT)
        };
        let deadline = Instant::now() + retry_for;
        if self.refresh_due() {
            self.refresh().await;
        }
        let mut backoff = Duration::from_millis(20);
        let mut attempt = 0u32;
        loop {
            let addr = self.pick(write, attempt);
            attempt += 1;
            let Some(client) = self.client(&addr) else {
                return Err(CallError {
                    addr: addr.clone(),
                    status: Status::invalid_argument(format!("invalid master address {addr:?}")),
                });
            };
            match f(addr.clone(), client).await {
                Ok(r) => {
                    self.reached.store(true, Ordering::Relaxed);
                    if write {
                        let mut st = self.lock();
                        if st.leader.as_deref() != Some(addr.as_str()) {
                            st.leader = Some(addr);
                        }
                    }
                    return Ok(r.into_inner());
                }
                Err(status) if is_failover(&status) && Instant::now() < deadline => {
                    let hint = status
                        .metadata()
                        .get(LEADER_HEADER)
                        .and_then(|v| v.to_str().ok())
                        .map(String::from)
                        .filter(|h| !h.is_empty() && *h != addr);
                    match hint {
                        // Told where the leader is: go there at once (but
                        // not round and round while a new leader settles).
                        Some(h) if attempt <= 3 => self.note_leader(Some(h)),
                        Some(h) => {
                            self.note_leader(Some(h));
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(MAX_BACKOFF);
                        }
                        None => {
                            {
                                let mut st = self.lock();
                                if st.leader.as_deref() == Some(addr.as_str()) {
                                    st.leader = None;
                                }
                                st.down
                                    .insert(addr.clone(), Instant::now() + Duration::from_secs(2));
                            }
                            tokio::time::sleep(backoff).await;
                            if attempt.is_multiple_of(4) {
                                self.refresh().await;
                            }
                            backoff = (backoff * 2).min(MAX_BACKOFF);
                        }
                    }
                }
                Err(status) => return Err(CallError { addr, status }),
            }
        }
    }
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded from the OS; mix in time and pid for good measure.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    h.finish()
}
