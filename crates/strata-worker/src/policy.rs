//! Eviction policies: which cached entry goes next when a tier needs room.
//!
//! A policy only orders keys; it knows nothing about bytes, files or tiers.
//! The block store calls [`Policy::insert`] when a page lands in a tier,
//! [`Policy::access`] on every hit, and [`Policy::evict`] when the tier is
//! over its quota. Entries that must never leave (pinned pages in the last
//! tier) are simply never given to the policy. The same implementations
//! drive `strata bench cache`, which replays traces against them and against
//! Belady's optimal policy ([`belady_hits`]).

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::Hash;

pub use strata_common::config::PolicyKind;

/// An eviction order over keys.
pub trait Policy<K>: Send {
    /// A key entered the cache.
    fn insert(&mut self, k: K);
    /// A cached key was read.
    fn access(&mut self, k: &K);
    /// A key left the cache for another reason (freed, moved away).
    fn remove(&mut self, k: &K);
    /// Removes and returns the key to evict next.
    fn evict(&mut self) -> Option<K>;
    fn contains(&self, k: &K) -> bool;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Default LRFU decay per access. Small values weigh frequency more.
pub const DEFAULT_LRFU_LAMBDA: f64 = 0.0001;

/// Builds a policy with the default LRFU lambda.
pub fn new_policy<K>(kind: PolicyKind, capacity: usize) -> Box<dyn Policy<K>>
where
    K: Copy + Eq + Hash + Ord + Send + 'static,
{
    new_policy_with(kind, capacity, DEFAULT_LRFU_LAMBDA)
}

/// Builds a policy. `capacity` is the tier's size in entries (ARC uses it to
/// bound its ghost lists; the others ignore it); `lrfu_lambda` is LRFU's
/// decay per access.
pub fn new_policy_with<K>(kind: PolicyKind, capacity: usize, lrfu_lambda: f64) -> Box<dyn Policy<K>>
where
    K: Copy + Eq + Hash + Ord + Send + 'static,
{
    match kind {
        PolicyKind::Lru => Box::new(Lru::default()),
        PolicyKind::Lrfu => Box::new(Lrfu::new(lrfu_lambda)),
        PolicyKind::Arc => Box::new(Arc::new(capacity)),
    }
}

/// A recency list: O(log n) insert, touch, remove and pop-oldest.
struct RecencyList<K> {
    by_tick: BTreeMap<u64, K>,
    tick_of: HashMap<K, u64>,
    next: u64,
}

impl<K: Copy + Eq + Hash> Default for RecencyList<K> {
    fn default() -> Self {
        RecencyList {
            by_tick: BTreeMap::new(),
            tick_of: HashMap::new(),
            next: 0,
        }
    }
}

impl<K: Copy + Eq + Hash> RecencyList<K> {
    /// Inserts `k` as most recent (moving it if present).
    fn push(&mut self, k: K) {
        self.next += 1;
        if let Some(old) = self.tick_of.insert(k, self.next) {
            self.by_tick.remove(&old);
        }
        self.by_tick.insert(self.next, k);
    }
    fn remove(&mut self, k: &K) -> bool {
        match self.tick_of.remove(k) {
            Some(t) => {
                self.by_tick.remove(&t);
                true
            }
            None => false,
        }
    }
    fn pop_oldest(&mut self) -> Option<K> {
        let (_, k) = self.by_tick.pop_first()?;
        self.tick_of.remove(&k);
        Some(k)
    }
    fn contains(&self, k: &K) -> bool {
        self.tick_of.contains_key(k)
    }
    fn len(&self) -> usize {
        self.tick_of.len()
    }
}

/// Least recently used.
pub struct Lru<K> {
    list: RecencyList<K>,
}

impl<K: Copy + Eq + Hash> Default for Lru<K> {
    fn default() -> Self {
        Lru {
            list: RecencyList::default(),
        }
    }
}

impl<K: Copy + Eq + Hash + Send> Policy<K> for Lru<K> {
    fn insert(&mut self, k: K) {
        self.list.push(k);
    }
    fn access(&mut self, k: &K) {
        if self.list.contains(k) {
            self.list.push(*k);
        }
    }
    fn remove(&mut self, k: &K) {
        self.list.remove(k);
    }
    fn evict(&mut self) -> Option<K> {
        self.list.pop_oldest()
    }
    fn contains(&self, k: &K) -> bool {
        self.list.contains(k)
    }
    fn len(&self) -> usize {
        self.list.len()
    }
}

/// A totally ordered f64 (scores are never NaN).
#[derive(Clone, Copy, PartialEq)]
struct Score(f64);
impl Eq for Score {}
impl PartialOrd for Score {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Score {
    fn cmp(&self, o: &Self) -> Ordering {
        self.0.total_cmp(&o.0)
    }
}

/// LRFU (Lee et al., 2001). Each key's combined recency and frequency
/// (CRF) is `Σ 2^(-λ·(now - t_i))` over its references. All CRFs decay by
/// the same factor as time passes, so the eviction order only changes when
/// a key is referenced: ordering by `log2(crf) + λ·t_last` is exact and
/// needs no periodic re-scoring.
pub struct Lrfu<K> {
    lambda: f64,
    now: u64,
    /// crf at the last reference, last reference time, score.
    meta: HashMap<K, (f64, u64, Score, u64)>,
    order: BTreeMap<(Score, u64), K>,
    seq: u64,
}

impl<K: Copy + Eq + Hash> Lrfu<K> {
    pub fn new(lambda: f64) -> Self {
        Lrfu {
            lambda: lambda.clamp(1e-9, 1.0),
            now: 0,
            meta: HashMap::new(),
            order: BTreeMap::new(),
            seq: 0,
        }
    }

    fn reference(&mut self, k: K, prior: Option<(f64, u64)>) {
        self.now += 1;
        let crf = match prior {
            Some((crf, last)) => 1.0 + crf * (-(self.lambda) * (self.now - last) as f64).exp2(),
            None => 1.0,
        };
        let score = Score(crf.log2() + self.lambda * self.now as f64);
        self.seq += 1;
        if let Some((_, _, s, q)) = self.meta.insert(k, (crf, self.now, score, self.seq)) {
            self.order.remove(&(s, q));
        }
        self.order.insert((score, self.seq), k);
    }
}

impl<K: Copy + Eq + Hash + Send> Policy<K> for Lrfu<K> {
    fn insert(&mut self, k: K) {
        let prior = self.meta.get(&k).map(|m| (m.0, m.1));
        self.reference(k, prior);
    }
    fn access(&mut self, k: &K) {
        if let Some(m) = self.meta.get(k) {
            let prior = Some((m.0, m.1));
            self.reference(*k, prior);
        }
    }
    fn remove(&mut self, k: &K) {
        if let Some((_, _, s, q)) = self.meta.remove(k) {
            self.order.remove(&(s, q));
        }
    }
    fn evict(&mut self) -> Option<K> {
        let (_, k) = self.order.pop_first()?;
        self.meta.remove(&k);
        Some(k)
    }
    fn contains(&self, k: &K) -> bool {
        self.meta.contains_key(k)
    }
    fn len(&self) -> usize {
        self.meta.len()
    }
}

/// ARC (Megiddo & Modha, 2003). T1 holds keys seen once recently, T2 keys
/// seen at least twice; B1/B2 remember keys recently evicted from each. A hit
/// in a ghost list shifts the target size `p` of T1 toward the list that
/// would have kept the key, so a one-pass scan only ever churns T1.
pub struct Arc<K> {
    c: usize,
    p: usize,
    t1: RecencyList<K>,
    t2: RecencyList<K>,
    b1: RecencyList<K>,
    b2: RecencyList<K>,
    /// The last insert came from B2 (the REPLACE tie-break of the paper).
    last_from_b2: bool,
}

impl<K: Copy + Eq + Hash> Arc<K> {
    pub fn new(capacity: usize) -> Self {
        Arc {
            c: capacity.max(1),
            p: 0,
            t1: RecencyList::default(),
            t2: RecencyList::default(),
            b1: RecencyList::default(),
            b2: RecencyList::default(),
            last_from_b2: false,
        }
    }

    fn trim_ghosts(&mut self) {
        while self.t1.len() + self.b1.len() > self.c && self.b1.pop_oldest().is_some() {}
        while self.t1.len() + self.t2.len() + self.b1.len() + self.b2.len() > 2 * self.c
            && self.b2.pop_oldest().is_some()
        {}
    }
}

impl<K: Copy + Eq + Hash + Send> Policy<K> for Arc<K> {
    fn insert(&mut self, k: K) {
        if self.t1.contains(&k) || self.t2.contains(&k) {
            self.access(&k);
            return;
        }
        self.last_from_b2 = false;
        if self.b1.remove(&k) {
            let delta = (self.b2.len() / self.b1.len().max(1)).max(1);
            self.p = (self.p + delta).min(self.c);
            self.t2.push(k);
        } else if self.b2.remove(&k) {
            let delta = (self.b1.len() / self.b2.len().max(1)).max(1);
            self.p = self.p.saturating_sub(delta);
            self.t2.push(k);
            self.last_from_b2 = true;
        } else {
            self.t1.push(k);
        }
        self.trim_ghosts();
    }
    fn access(&mut self, k: &K) {
        if self.t1.remove(k) || self.t2.contains(k) {
            self.t2.push(*k);
        }
    }
    fn remove(&mut self, k: &K) {
        if !self.t1.remove(k) {
            self.t2.remove(k);
        }
    }
    fn evict(&mut self) -> Option<K> {
        let t1 = self.t1.len();
        let from_t1 =
            t1 > 0 && (t1 > self.p || (self.last_from_b2 && t1 == self.p) || self.t2.len() == 0);
        let k = if from_t1 {
            let k = self.t1.pop_oldest()?;
            self.b1.push(k);
            k
        } else {
            let k = self.t2.pop_oldest()?;
            self.b2.push(k);
            k
        };
        self.trim_ghosts();
        Some(k)
    }
    fn contains(&self, k: &K) -> bool {
        self.t1.contains(k) || self.t2.contains(k)
    }
    fn len(&self) -> usize {
        self.t1.len() + self.t2.len()
    }
}

/// Replays `trace` against `policy` with room for `capacity` entries;
/// returns the number of hits.
pub fn simulate<K: Copy>(policy: &mut dyn Policy<K>, trace: &[K], capacity: usize) -> u64 {
    let mut hits = 0;
    for k in trace {
        if policy.contains(k) {
            hits += 1;
            policy.access(k);
        } else {
            while policy.len() >= capacity.max(1) {
                if policy.evict().is_none() {
                    break;
                }
            }
            policy.insert(*k);
        }
    }
    hits
}

/// Hits of Belady's optimal policy (MIN): on a miss with a full cache, drop
/// the entry whose next use is farthest away (possibly the new one).
pub fn belady_hits<K: Copy + Eq + Hash>(trace: &[K], capacity: usize) -> u64 {
    let capacity = capacity.max(1);
    let mut next = vec![usize::MAX; trace.len()];
    let mut seen: HashMap<K, usize> = HashMap::new();
    for (i, k) in trace.iter().enumerate().rev() {
        if let Some(&j) = seen.get(k) {
            next[i] = j;
        }
        seen.insert(*k, i);
    }
    // Cached keys by next use; the key's identity is the index of its
    // latest access, so no map from key to entry is needed.
    let mut cached: BTreeSet<(usize, usize)> = BTreeSet::new();
    let mut pos_of: HashMap<K, usize> = HashMap::new();
    let mut hits = 0;
    for (i, k) in trace.iter().enumerate() {
        if let Some(prev) = pos_of.remove(k) {
            hits += 1;
            cached.remove(&(next[prev], prev));
            cached.insert((next[i], i));
            pos_of.insert(*k, i);
            continue;
        }
        if cached.len() >= capacity {
            let Some(&(far, j)) = cached.last() else {
                continue;
            };
            if far <= next[i] {
                continue; // the new key is needed last: do not cache it
            }
            cached.remove(&(far, j));
            pos_of.remove(&trace[j]);
        }
        cached.insert((next[i], i));
        pos_of.insert(*k, i);
    }
    hits
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn lru_evicts_least_recent() {
        let mut p = Lru::default();
        for k in 1..=3u32 {
            p.insert(k);
        }
        p.access(&1);
        assert_eq!(p.evict(), Some(2));
        assert_eq!(p.evict(), Some(3));
        assert_eq!(p.evict(), Some(1));
        assert_eq!(p.evict(), None);
    }

    #[test]
    fn lrfu_keeps_frequent_keys() {
        let mut p = Lrfu::new(0.001);
        p.insert(1u32);
        for _ in 0..5 {
            p.access(&1);
        }
        p.insert(2);
        p.insert(3);
        // 1 is older but referenced six times.
        assert_eq!(p.evict(), Some(2));
        assert_eq!(p.evict(), Some(3));
        // With lambda = 1 it behaves like LRU.
        let mut q = Lrfu::new(1.0);
        q.insert(1u32);
        q.access(&1);
        q.insert(2);
        assert_eq!(q.evict(), Some(1));
    }

    #[test]
    fn arc_resists_a_scan() {
        let hot: Vec<u32> = (0..50).collect();
        let mut trace = Vec::new();
        for round in 0..40u32 {
            trace.extend(&hot);
            trace.extend(&hot);
            trace.extend((0..200).map(|i| 10_000 + round * 1000 + i));
        }
        let lru = simulate(&mut Lru::default(), &trace, 100);
        let arc = simulate(&mut Arc::new(100), &trace, 100);
        assert!(arc > lru, "arc {arc} lru {lru}");
    }

    #[test]
    fn belady_on_a_loop() {
        // Loop of 4 keys, room for 3: MIN hits 2 of every 3 accesses after
        // warm-up; LRU never hits.
        let trace: Vec<u32> = (0..4).cycle().take(400).collect();
        assert_eq!(simulate(&mut Lru::default(), &trace, 3), 0);
        let opt = belady_hits(&trace, 3);
        assert!(opt >= 260, "{opt}");
    }

    fn model_check(kind: PolicyKind, ops: &[(u8, u8)]) {
        let mut p = new_policy::<u8>(kind, 8);
        let mut present = std::collections::HashSet::new();
        for &(op, k) in ops {
            match op % 4 {
                0 => {
                    p.insert(k);
                    present.insert(k);
                }
                1 => p.access(&k),
                2 => {
                    p.remove(&k);
                    present.remove(&k);
                }
                _ => {
                    if let Some(v) = p.evict() {
                        assert!(present.remove(&v), "{kind:?} evicted absent {v}");
                    } else {
                        assert!(present.is_empty());
                    }
                }
            }
            assert_eq!(p.len(), present.len(), "{kind:?}");
            for k in &present {
                assert!(p.contains(k));
            }
        }
    }

    proptest! {
        #[test]
        fn policies_track_exactly_their_keys(ops in proptest::collection::vec((0u8..4, 0u8..20), 0..300)) {
            for kind in PolicyKind::ALL {
                model_check(kind, &ops);
            }
        }

        #[test]
        fn belady_is_an_upper_bound(trace in proptest::collection::vec(0u8..30, 1..400), cap in 1usize..20) {
            let opt = belady_hits(&trace, cap);
            for kind in PolicyKind::ALL {
                let h = simulate(new_policy::<u8>(kind, cap).as_mut(), &trace, cap);
                prop_assert!(h <= opt, "{kind:?} {h} > opt {opt}");
            }
        }
    }
}
