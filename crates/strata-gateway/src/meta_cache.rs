//! A cache of object metadata (stat results) and bucket listings for
//! HEAD- and LIST-heavy clients. Entries live for `gateway.metadata_ttl_secs`
//! at most, and everything is dropped as soon as the namespace changes: a
//! background task asks the master for its namespace version a few times a
//! second, so a write through any Strata client (or `strata fs sync`
//! picking up a UFS change) is seen within that period. Writes through this
//! gateway also drop the entries they touch at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use strata_client::{Client, FileInfo};

/// How often the namespace version is checked.
pub const POLL: Duration = Duration::from_millis(250);

type Listing = Arc<Vec<(String, FileInfo)>>;

#[derive(Default)]
struct Maps {
    /// Namespace path -> its FileInfo (`None`: does not exist).
    stats: HashMap<String, (Instant, Option<FileInfo>)>,
    /// (Bucket, directory prefix) -> the objects under it, sorted by key.
    lists: HashMap<(String, String), (Instant, Listing)>,
}

pub struct MetaCache {
    ttl: Duration,
    maps: Mutex<Maps>,
    /// Bumped by every invalidation: an answer fetched before one (a slow
    /// listing across a write) is not stored.
    epoch: AtomicU64,
}

/// Entries kept before the oldest are dropped wholesale.
const MAX_STATS: usize = 100_000;
/// Listings kept (one per bucket and directory listed) before expired ones
/// are dropped, and then all.
const MAX_LISTS: usize = 1024;

impl MetaCache {
    /// A cache with `ttl` (zero: nothing is cached), kept in step with the
    /// namespace by a task on the current runtime that ends when the cache
    /// is dropped.
    pub fn new(client: Client, ttl: Duration) -> Arc<MetaCache> {
        let c = Arc::new(MetaCache {
            ttl,
            maps: Mutex::new(Maps::default()),
            epoch: AtomicU64::new(0),
        });
        if !ttl.is_zero() {
            let weak = Arc::downgrade(&c);
            tokio::spawn(async move {
                let mut seen = None;
                loop {
                    tokio::time::sleep(POLL).await;
                    let Some(cache) = weak.upgrade() else { return };
                    match client.namespace_version().await {
                        Ok(v) if seen != Some(v) => {
                            if seen.is_some() {
                                cache.clear();
                            }
                            seen = Some(v);
                        }
                        Ok(_) => {}
                        // The master is unreachable: trust nothing cached.
                        Err(_) => {
                            cache.clear();
                            seen = None;
                        }
                    }
                }
            });
        }
        c
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Maps> {
        self.maps.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn clear(&self) {
        let mut m = self.lock();
        self.epoch.fetch_add(1, Ordering::Relaxed);
        m.stats.clear();
        m.lists.clear();
    }

    /// Taken before fetching what `put_stat` / `put_list` will store.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Relaxed)
    }

    /// `Some(answer)` when cached and fresh.
    pub fn stat(&self, path: &str) -> Option<Option<FileInfo>> {
        let m = self.lock();
        let (at, v) = m.stats.get(path)?;
        (at.elapsed() < self.ttl).then(|| v.clone())
    }

    /// Stores a stat fetched at `epoch` (nothing if the cache was
    /// invalidated since).
    pub fn put_stat(&self, path: &str, v: Option<FileInfo>, epoch: u64) {
        if self.ttl.is_zero() {
            return;
        }
        let mut m = self.lock();
        if self.epoch() != epoch {
            return;
        }
        if m.stats.len() >= MAX_STATS {
            m.stats.clear();
        }
        m.stats.insert(path.to_string(), (Instant::now(), v));
    }

    /// The objects of `bucket` under the directory prefix `dir`.
    pub fn list(&self, bucket: &str, dir: &str) -> Option<Listing> {
        let m = self.lock();
        let (at, v) = m.lists.get(&(bucket.to_string(), dir.to_string()))?;
        (at.elapsed() < self.ttl).then(|| v.clone())
    }

    /// Whether anything is cached (a TTL above zero).
    pub fn caches(&self) -> bool {
        !self.ttl.is_zero()
    }

    /// Stores a listing fetched at `epoch` (nothing if the cache was
    /// invalidated since).
    pub fn put_list(&self, bucket: &str, dir: &str, v: Listing, epoch: u64) {
        if self.ttl.is_zero() {
            return;
        }
        let mut m = self.lock();
        if self.epoch() == epoch {
            if m.lists.len() >= MAX_LISTS {
                m.lists.retain(|_, (at, _)| at.elapsed() < self.ttl);
            }
            if m.lists.len() >= MAX_LISTS {
                m.lists.clear();
            }
            m.lists
                .insert((bucket.to_string(), dir.to_string()), (Instant::now(), v));
        }
    }

    /// A write through this gateway changed `path` in `bucket`.
    pub fn invalidate(&self, bucket: &str, path: &str) {
        let mut m = self.lock();
        self.epoch.fetch_add(1, Ordering::Relaxed);
        m.stats.remove(path);
        m.lists.retain(|(b, _), _| b != bucket);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(ttl: Duration) -> MetaCache {
        MetaCache {
            ttl,
            maps: Mutex::new(Maps::default()),
            epoch: AtomicU64::new(0),
        }
    }

    #[test]
    fn entries_expire_and_writes_invalidate() {
        let c = cache(Duration::from_millis(200));
        let info = FileInfo {
            path: "/b/k".into(),
            size: 3,
            ..Default::default()
        };
        assert!(c.stat("/b/k").is_none());
        let e = c.epoch();
        c.put_stat("/b/k", Some(info.clone()), e);
        c.put_stat("/b/missing", None, e);
        c.put_list("b", "", Arc::new(vec![("k".into(), info.clone())]), e);
        assert_eq!(c.stat("/b/k").unwrap().unwrap().size, 3);
        assert!(c.stat("/b/missing").unwrap().is_none());
        assert_eq!(c.list("b", "").unwrap().len(), 1);
        c.invalidate("b", "/b/k");
        assert!(c.stat("/b/k").is_none() && c.list("b", "").is_none());
        assert!(c.stat("/b/missing").is_some());
        std::thread::sleep(Duration::from_millis(250));
        assert!(c.stat("/b/missing").is_none(), "expired");
        // An answer fetched before an invalidation is not stored.
        let e = c.epoch();
        c.invalidate("b", "/b/other");
        c.put_stat("/b/k", Some(info.clone()), e);
        c.put_list("b", "", Arc::new(vec![("k".into(), info)]), e);
        assert!(c.stat("/b/k").is_none() && c.list("b", "").is_none());
        let off = cache(Duration::ZERO);
        off.put_stat("/x", None, off.epoch());
        assert!(off.stat("/x").is_none());
    }
}
