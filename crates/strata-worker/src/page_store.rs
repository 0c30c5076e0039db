//! The page store: cached pages as files in one directory, under a byte
//! quota, evicted least-recently-used first. Pages that exist nowhere else
//! (MUST_CACHE writes) are pinned and never evicted.
//!
//! Layout: `<dir>/pages/<2 hex>/<cache id>_<block>_<page>[.pin]`. The index is
//! rebuilt from file names at start-up, so a restarted worker serves what it
//! cached before.

use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use strata_common::CacheId;
use strata_common::ids::PageKey;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "cache directory {dir} is full: {need} bytes needed, {free} free of {capacity} and the rest is pinned \
         (free space with `strata fs free`, delete unpersisted files, or raise worker.cache_capacity)"
    )]
    Full {
        dir: String,
        need: u64,
        free: u64,
        capacity: u64,
    },
    #[error(
        "cache directory {dir}: {op} failed: {err} (check the disk, its free space and permissions)"
    )]
    Io {
        dir: String,
        op: &'static str,
        err: std::io::Error,
    },
}

#[derive(Clone, Copy)]
struct Meta {
    size: u64,
    tick: u64,
    pinned: bool,
}

#[derive(Default)]
struct Index {
    pages: BTreeMap<PageKey, Meta>,
    lru: BTreeMap<u64, PageKey>,
    /// Bytes reserved by writes in progress, counted as used.
    reserved: u64,
    used: u64,
    pinned: u64,
    tick: u64,
}

#[derive(Default)]
pub struct StoreStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub evictions: AtomicU64,
}

pub struct PageStore {
    dir: PathBuf,
    capacity: u64,
    index: Mutex<Index>,
    pub stats: StoreStats,
}

/// Snapshot of usage.
#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    pub capacity: u64,
    pub used: u64,
    pub pinned: u64,
    pub pages: u64,
}

fn file_name(k: &PageKey, pinned: bool) -> String {
    format!(
        "{}_{}_{}{}",
        k.cache_id.to_hex(),
        k.block,
        k.page,
        if pinned { ".pin" } else { "" }
    )
}

fn parse_name(name: &str) -> Option<(PageKey, bool)> {
    let (base, pinned) = match name.strip_suffix(".pin") {
        Some(b) => (b, true),
        None => (name, false),
    };
    let mut it = base.split('_');
    let cache_id = CacheId::from_hex(it.next()?)?;
    let block = it.next()?.parse().ok()?;
    let page = it.next()?.parse().ok()?;
    if it.next().is_some() {
        return None;
    }
    Some((
        PageKey {
            cache_id,
            block,
            page,
        },
        pinned,
    ))
}

impl PageStore {
    /// Opens the store, creating the directory and indexing existing pages.
    pub fn open(dir: &Path, capacity: u64) -> Result<PageStore, StoreError> {
        let io = |op, err| StoreError::Io {
            dir: dir.display().to_string(),
            op,
            err,
        };
        let pages_dir = dir.join("pages");
        std::fs::create_dir_all(&pages_dir).map_err(|e| io("create", e))?;
        let mut idx = Index::default();
        for sub in std::fs::read_dir(&pages_dir).map_err(|e| io("scan", e))? {
            let sub = sub.map_err(|e| io("scan", e))?;
            if !sub.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                continue;
            }
            for f in std::fs::read_dir(sub.path()).map_err(|e| io("scan", e))? {
                let f = f.map_err(|e| io("scan", e))?;
                let name = f.file_name().to_string_lossy().into_owned();
                match parse_name(&name) {
                    Some((key, pinned)) => {
                        let size = f.metadata().map(|m| m.len()).unwrap_or(0);
                        idx.tick += 1;
                        let tick = idx.tick;
                        idx.pages.insert(key, Meta { size, tick, pinned });
                        idx.used += size;
                        if pinned {
                            idx.pinned += size;
                        } else {
                            idx.lru.insert(tick, key);
                        }
                    }
                    // Leftover temporary files from a crash.
                    None => {
                        let _ = std::fs::remove_file(f.path());
                    }
                }
            }
        }
        if idx.used > 0 {
            tracing::info!(dir = %dir.display(), pages = idx.pages.len(), used = idx.used, "page store reopened");
        }
        Ok(PageStore {
            dir: dir.to_path_buf(),
            capacity,
            index: Mutex::new(idx),
            stats: StoreStats::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn path_of(&self, k: &PageKey, pinned: bool) -> PathBuf {
        let hex = k.cache_id.to_hex();
        self.dir
            .join("pages")
            .join(&hex[..2])
            .join(file_name(k, pinned))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn usage(&self) -> Usage {
        let i = self.lock();
        Usage {
            capacity: self.capacity,
            used: i.used,
            pinned: i.pinned,
            pages: i.pages.len() as u64,
        }
    }

    /// Marks a page used and returns whether it is pinned; `None` on a miss.
    fn touch(&self, k: &PageKey) -> Option<bool> {
        let mut i = self.lock();
        i.tick += 1;
        let tick = i.tick;
        let m = i.pages.get_mut(k)?;
        let old = m.tick;
        m.tick = tick;
        let pinned = m.pinned;
        if !pinned {
            i.lru.remove(&old);
            i.lru.insert(tick, *k);
        }
        Some(pinned)
    }

    /// Opens a cached page for zero-copy sending, with its length; `None` on
    /// a miss. Asks the kernel to start reading it into the page cache so the
    /// later `sendfile` rarely waits on the disk.
    pub async fn open_page(&self, k: &PageKey) -> Option<(std::fs::File, u64)> {
        let Some(pinned) = self.touch(k) else {
            self.stats.misses.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        let path = self.path_of(k, pinned);
        let opened =
            tokio::task::spawn_blocking(move || -> std::io::Result<(std::fs::File, u64)> {
                use std::os::fd::AsRawFd;
                let f = std::fs::File::open(&path)?;
                let len = f.metadata()?.len();
                // SAFETY: plain syscall on a descriptor we own; failure is harmless.
                unsafe {
                    libc::posix_fadvise(
                        f.as_raw_fd(),
                        0,
                        len as libc::off_t,
                        libc::POSIX_FADV_WILLNEED,
                    );
                }
                Ok((f, len))
            })
            .await;
        match opened {
            Ok(Ok(v)) => {
                self.stats.hits.fetch_add(1, Ordering::Relaxed);
                Some(v)
            }
            _ => {
                self.forget(k);
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Reads a cached page, or `None` on a miss.
    pub async fn get(&self, k: &PageKey) -> Option<Bytes> {
        let Some(pinned) = self.touch(k) else {
            self.stats.misses.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        let path = self.path_of(k, pinned);
        match tokio::task::spawn_blocking(move || std::fs::read(&path)).await {
            Ok(Ok(data)) => {
                self.stats.hits.fetch_add(1, Ordering::Relaxed);
                Some(Bytes::from(data))
            }
            _ => {
                // The file vanished (deleted by hand, disk trouble): forget it.
                self.forget(k);
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    pub fn contains(&self, k: &PageKey) -> bool {
        self.lock().pages.contains_key(k)
    }

    fn forget(&self, k: &PageKey) {
        let mut i = self.lock();
        if let Some(m) = i.pages.remove(k) {
            i.used -= m.size;
            if m.pinned {
                i.pinned -= m.size;
            } else {
                i.lru.remove(&m.tick);
            }
        }
    }

    /// Makes room for `need` bytes, evicting unpinned pages LRU first, and
    /// reserves it. Returns the victims' paths to delete.
    fn reserve(&self, need: u64) -> Result<Vec<PathBuf>, StoreError> {
        let mut i = self.lock();
        let mut victims = Vec::new();
        while i.used + i.reserved + need > self.capacity {
            let Some((&tick, &key)) = i.lru.iter().next() else {
                let free = self.capacity.saturating_sub(i.used + i.reserved);
                return Err(StoreError::Full {
                    dir: self.dir.display().to_string(),
                    need,
                    free,
                    capacity: self.capacity,
                });
            };
            i.lru.remove(&tick);
            if let Some(m) = i.pages.remove(&key) {
                i.used -= m.size;
            }
            victims.push(self.path_of(&key, false));
            self.stats.evictions.fetch_add(1, Ordering::Relaxed);
        }
        i.reserved += need;
        Ok(victims)
    }

    /// Stores a page. Pinned pages are never evicted.
    pub async fn put(&self, k: PageKey, data: Bytes, pinned: bool) -> Result<(), StoreError> {
        let size = data.len() as u64;
        if let Some(m) = self.lock().pages.get(&k)
            && m.pinned == pinned
        {
            return Ok(());
        }
        let victims = self.reserve(size)?;
        let path = self.path_of(&k, pinned);
        let tmp = path.with_extension(format!("tmp{}", rand::random::<u32>()));
        let res = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            for v in victims {
                let _ = std::fs::remove_file(v);
            }
            if let Some(parent) = tmp.parent() {
                std::fs::create_dir_all(parent)?;
            }
            let r = std::fs::write(&tmp, &data).and_then(|_| std::fs::rename(&tmp, &path));
            if r.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            r
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
        let mut i = self.lock();
        i.reserved -= size;
        match res {
            Ok(()) => {
                i.tick += 1;
                let tick = i.tick;
                if let Some(old) = i.pages.insert(k, Meta { size, tick, pinned }) {
                    i.used -= old.size;
                    if old.pinned {
                        i.pinned -= old.size;
                    } else {
                        i.lru.remove(&old.tick);
                    }
                }
                i.used += size;
                if pinned {
                    i.pinned += size;
                } else {
                    i.lru.insert(tick, k);
                }
                Ok(())
            }
            Err(err) if err.kind() == ErrorKind::StorageFull || err.raw_os_error() == Some(28) => {
                Err(StoreError::Full {
                    dir: self.dir.display().to_string(),
                    need: size,
                    free: 0,
                    capacity: self.capacity,
                })
            }
            Err(err) => Err(StoreError::Io {
                dir: self.dir.display().to_string(),
                op: "write",
                err,
            }),
        }
    }

    fn keys_of(&self, id: CacheId) -> Vec<(PageKey, bool)> {
        let lo = PageKey {
            cache_id: id,
            block: 0,
            page: 0,
        };
        let hi = PageKey {
            cache_id: id,
            block: u64::MAX,
            page: u32::MAX,
        };
        self.lock()
            .pages
            .range(lo..=hi)
            .map(|(k, m)| (*k, m.pinned))
            .collect()
    }

    /// Drops one page.
    pub async fn free_page(&self, k: &PageKey) {
        let pinned = self.lock().pages.get(k).map(|m| m.pinned);
        if let Some(p) = pinned {
            self.forget(k);
            let path = self.path_of(k, p);
            let _ = tokio::task::spawn_blocking(move || std::fs::remove_file(path)).await;
        }
    }

    /// Drops every page of `id`; returns how many.
    pub async fn free(&self, id: CacheId) -> u64 {
        let keys = self.keys_of(id);
        let paths: Vec<PathBuf> = keys.iter().map(|(k, p)| self.path_of(k, *p)).collect();
        for (k, _) in &keys {
            self.forget(k);
        }
        let _ = tokio::task::spawn_blocking(move || {
            for p in paths {
                let _ = std::fs::remove_file(p);
            }
        })
        .await;
        keys.len() as u64
    }

    /// Moves every page of `from` to `to`, unpinned (a CACHE_THROUGH write
    /// learns its final identity only once the UFS returns the fingerprint).
    pub async fn rekey(&self, from: CacheId, to: CacheId) -> u64 {
        let keys = self.keys_of(from);
        let mut moved = 0;
        let mut renames = Vec::new();
        {
            let mut i = self.lock();
            for (k, pinned) in &keys {
                if let Some(m) = i.pages.remove(k) {
                    if m.pinned {
                        i.pinned -= m.size;
                    } else {
                        i.lru.remove(&m.tick);
                    }
                    let nk = PageKey { cache_id: to, ..*k };
                    i.tick += 1;
                    let tick = i.tick;
                    i.pages.insert(
                        nk,
                        Meta {
                            size: m.size,
                            tick,
                            pinned: false,
                        },
                    );
                    i.lru.insert(tick, nk);
                    renames.push((self.path_of(k, *pinned), self.path_of(&nk, false)));
                    moved += 1;
                }
            }
        }
        let _ = tokio::task::spawn_blocking(move || {
            for (a, b) in renames {
                if let Some(p) = b.parent() {
                    let _ = std::fs::create_dir_all(p);
                }
                let _ = std::fs::rename(a, b);
            }
        })
        .await;
        moved
    }
}

/// A worker's stable id, kept in its cache directory.
pub fn load_or_create_worker_id(dir: &Path) -> Result<u64, StoreError> {
    let p = dir.join("worker-id");
    if let Ok(s) = std::fs::read_to_string(&p)
        && let Ok(id) = s.trim().parse::<u64>()
    {
        return Ok(id);
    }
    let id: u64 = rand::random::<u64>() >> 1 | 1;
    std::fs::create_dir_all(dir)
        .and_then(|_| std::fs::write(&p, id.to_string()))
        .map_err(|err| StoreError::Io {
            dir: dir.display().to_string(),
            op: "write worker-id",
            err,
        })?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: u128, page: u32) -> PageKey {
        PageKey {
            cache_id: CacheId(id),
            block: 0,
            page,
        }
    }

    #[tokio::test]
    async fn lru_eviction_pinning_and_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = PageStore::open(dir.path(), 3000).unwrap();
            s.put(key(1, 0), Bytes::from(vec![1; 1000]), false)
                .await
                .unwrap();
            s.put(key(1, 1), Bytes::from(vec![2; 1000]), false)
                .await
                .unwrap();
            s.put(key(2, 0), Bytes::from(vec![3; 1000]), true)
                .await
                .unwrap();
            // touch (1,0) so (1,1) is the LRU victim
            assert_eq!(s.get(&key(1, 0)).await.unwrap()[0], 1);
            s.put(key(3, 0), Bytes::from(vec![4; 1000]), false)
                .await
                .unwrap();
            assert!(s.get(&key(1, 1)).await.is_none());
            assert!(s.get(&key(1, 0)).await.is_some());
            // Only pinned + one more fit; a 2500-byte page cannot.
            let e = s
                .put(key(4, 0), Bytes::from(vec![5; 2500]), false)
                .await
                .unwrap_err();
            assert!(e.to_string().contains("full"), "{e}");
            assert!(s.get(&key(2, 0)).await.is_some(), "pinned page survives");
        }
        let s = PageStore::open(dir.path(), 3000).unwrap();
        assert_eq!(s.usage().pages, 3);
        assert_eq!(s.usage().pinned, 1000);
        assert_eq!(s.free(CacheId(2)).await, 1);
        assert_eq!(s.usage().pinned, 0);
        assert_eq!(s.rekey(CacheId(1), CacheId(9)).await, 1);
        assert!(s.get(&key(9, 0)).await.is_some());
    }
}
