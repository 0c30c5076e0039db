//! Read heat per block, for adaptive replication: a block this worker
//! serves more often than `worker.hot_block_reads_per_sec` asks readers (in
//! the `End` of each read) to spread over more workers of its ranking. The
//! extra replicas fill themselves from this worker (peer fetch) and, once
//! the heat is gone, are ordinary cached pages that the tier policy evicts.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(1);
/// Blocks tracked before idle ones are forgotten.
const TRACKED: usize = 65_536;

struct Window {
    start: Instant,
    count: u32,
    /// Reads in the previous window.
    last: u32,
}

/// Pages this worker copied from a peer to serve a hot block: extra
/// replicas, dropped once nobody has read them for a while.
#[derive(Default)]
pub struct ExtraReplicas {
    last_read: Mutex<HashMap<strata_common::ids::PageKey, Instant>>,
}

impl ExtraReplicas {
    pub fn note(&self, k: strata_common::ids::PageKey) {
        self.last_read
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(k, Instant::now());
    }

    /// A read of `k` (cheap when there are no extra replicas).
    pub fn touch(&self, k: &strata_common::ids::PageKey) {
        let mut m = self.last_read.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = m.get_mut(k) {
            *t = Instant::now();
        }
    }

    /// Forgets and returns the extra replicas idle for `idle`.
    pub fn take_idle(&self, idle: Duration) -> Vec<strata_common::ids::PageKey> {
        let mut m = self.last_read.lock().unwrap_or_else(|p| p.into_inner());
        let old: Vec<_> = m
            .iter()
            .filter(|(_, t)| t.elapsed() >= idle)
            .map(|(k, _)| *k)
            .collect();
        for k in &old {
            m.remove(k);
        }
        old
    }
}

pub struct HotBlocks {
    map: Mutex<HashMap<(u128, u64), Window>>,
    per_replica: u32,
    max: u8,
}

impl HotBlocks {
    pub fn new(per_replica: u32, max: u8) -> Self {
        HotBlocks {
            map: Mutex::new(HashMap::new()),
            per_replica,
            max: max.max(1),
        }
    }

    /// Counts a read of `block` and returns how many workers should serve it.
    pub fn read(&self, cache_id: u128, block: u64) -> u8 {
        if self.per_replica == 0 || self.max <= 1 {
            return 1;
        }
        let now = Instant::now();
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() >= TRACKED {
            m.retain(|_, w| now.duration_since(w.start) < 2 * WINDOW);
        }
        let w = m.entry((cache_id, block)).or_insert(Window {
            start: now,
            count: 0,
            last: 0,
        });
        let age = now.duration_since(w.start);
        if age >= WINDOW {
            w.last = if age < 2 * WINDOW { w.count } else { 0 };
            w.count = 0;
            w.start = now;
        }
        w.count += 1;
        let rate = w.count.max(w.last);
        (1 + rate / self.per_replica).min(u32::from(self.max)) as u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heat_grows_with_the_read_rate_up_to_the_cap() {
        let h = HotBlocks::new(10, 3);
        let mut last = 0;
        for _ in 0..9 {
            last = h.read(1, 0);
        }
        assert_eq!(last, 1, "9 reads in a second: the owner alone");
        assert_eq!(h.read(1, 0), 2, "the 10th asks for a second replica");
        for _ in 0..100 {
            last = h.read(1, 0);
        }
        assert_eq!(last, 3, "capped");
        assert_eq!(h.read(1, 1), 1, "other blocks are cold");
        assert_eq!(HotBlocks::new(0, 3).read(1, 0), 1, "0 turns it off");
    }
}
