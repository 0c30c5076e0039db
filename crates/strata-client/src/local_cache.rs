//! Heavy-client mode: pages this client reads are also kept in a local
//! directory (`client.local_cache_dir`, bounded by
//! `client.local_cache_capacity`) and read from there afterwards, so each
//! host keeps its own copy of its working set while the cluster's workers
//! only distribute it.
//!
//! A page is stored whole, as `<dir>/<2 hex>/<cache id>-<page>`, written to
//! a temporary name and renamed, so a crash leaves either the whole page or
//! nothing. Cache ids carry the object's version (its fingerprint), so a
//! changed object never reads an old page. Least recently used pages are
//! deleted beyond the capacity; the index is rebuilt from the directory at
//! start (oldest modification first).

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};

struct Entry {
    size: u64,
    tick: u64,
}

#[derive(Default)]
struct State {
    pages: HashMap<(u128, u64), Entry>,
    lru: BTreeMap<u64, (u128, u64)>,
    used: u64,
    tick: u64,
}

impl State {
    fn touch(&mut self, key: (u128, u64)) -> bool {
        self.tick += 1;
        let t = self.tick;
        match self.pages.get_mut(&key) {
            Some(e) => {
                self.lru.remove(&e.tick);
                e.tick = t;
                self.lru.insert(t, key);
                true
            }
            None => false,
        }
    }

    fn insert(&mut self, key: (u128, u64), size: u64) {
        self.tick += 1;
        let t = self.tick;
        if let Some(old) = self.pages.insert(key, Entry { size, tick: t }) {
            self.lru.remove(&old.tick);
            self.used -= old.size;
        }
        self.lru.insert(t, key);
        self.used += size;
    }

    fn remove(&mut self, key: (u128, u64)) {
        if let Some(e) = self.pages.remove(&key) {
            self.lru.remove(&e.tick);
            self.used -= e.size;
        }
    }
}

pub(crate) struct LocalCache {
    dir: PathBuf,
    capacity: u64,
    state: Mutex<State>,
}

/// Hits and misses of the local cache since the client started.
#[derive(Clone, Copy, Debug, Default)]
pub struct LocalCacheStats {
    pub pages: u64,
    pub bytes: u64,
    pub capacity: u64,
}

fn parse_name(name: &str) -> Option<(u128, u64)> {
    let (id, page) = name.split_once('-')?;
    Some((u128::from_str_radix(id, 16).ok()?, page.parse().ok()?))
}

impl LocalCache {
    /// Opens (creating it if needed) the cache directory and indexes the
    /// pages already in it.
    pub(crate) fn open(dir: &Path, capacity: u64) -> std::io::Result<LocalCache> {
        std::fs::create_dir_all(dir)?;
        let mut found = Vec::new();
        for sub in std::fs::read_dir(dir)? {
            let sub = sub?;
            if !sub.file_type()?.is_dir() {
                continue;
            }
            for f in std::fs::read_dir(sub.path())? {
                let f = f?;
                let name = f.file_name().to_string_lossy().into_owned();
                if name.ends_with(".tmp") {
                    let _ = std::fs::remove_file(f.path());
                    continue;
                }
                let (Some(key), Ok(meta)) = (parse_name(&name), f.metadata()) else {
                    continue;
                };
                let at = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
                found.push((at, key, meta.len()));
            }
        }
        found.sort_by_key(|f| f.0);
        let mut st = State::default();
        for (_, key, size) in found {
            st.insert(key, size);
        }
        let c = LocalCache {
            dir: dir.to_path_buf(),
            capacity,
            state: Mutex::new(st),
        };
        c.evict();
        Ok(c)
    }

    fn path(&self, key: (u128, u64)) -> PathBuf {
        let hex = format!("{:032x}", key.0);
        self.dir.join(&hex[..2]).join(format!("{hex}-{}", key.1))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn stats(&self) -> LocalCacheStats {
        let st = self.lock();
        LocalCacheStats {
            pages: st.pages.len() as u64,
            bytes: st.used,
            capacity: self.capacity,
        }
    }

    /// `[off, off + len)` of the file (`page_size`, `file_size`) when every
    /// page of it is here.
    pub(crate) fn read(
        &self,
        id: u128,
        page_size: u64,
        file_size: u64,
        off: u64,
        len: u64,
    ) -> Option<Bytes> {
        let end = off.saturating_add(len).min(file_size);
        if end <= off || page_size == 0 {
            return None;
        }
        let (first, last) = (off / page_size, (end - 1) / page_size);
        {
            let mut st = self.lock();
            if !(first..=last).all(|p| st.touch((id, p))) {
                return None;
            }
        }
        let mut out = BytesMut::zeroed((end - off) as usize);
        let mut filled = 0usize;
        for p in first..=last {
            let (ps, pe) = (p * page_size, ((p + 1) * page_size).min(file_size));
            let (s, e) = (off.max(ps), end.min(pe));
            let dst = &mut out[filled..filled + (e - s) as usize];
            let ok = std::fs::File::open(self.path((id, p)))
                .and_then(|f| f.read_exact_at(dst, s - ps))
                .is_ok();
            if !ok {
                // Deleted or damaged behind our back: forget it.
                self.lock().remove((id, p));
                return None;
            }
            filled += dst.len();
        }
        Some(out.freeze())
    }

    /// The page-aligned range a read of `[off, off + len)` should fetch so
    /// that its pages can be kept (clipped to `limit`, the block's end).
    pub(crate) fn aligned(page_size: u64, off: u64, len: u64, limit: u64) -> (u64, u64) {
        if page_size == 0 {
            return (off, len);
        }
        let start = off / page_size * page_size;
        let end = off
            .saturating_add(len)
            .div_ceil(page_size)
            .saturating_mul(page_size)
            .min(limit)
            .max(off.saturating_add(len).min(limit));
        (start, end - start)
    }

    /// Keeps the whole pages inside `frames` (the bytes of the file from
    /// `off`), in the background.
    pub(crate) fn store(
        self: &Arc<Self>,
        id: u128,
        page_size: u64,
        file_size: u64,
        off: u64,
        frames: Vec<Bytes>,
    ) {
        let total: u64 = frames.iter().map(|b| b.len() as u64).sum();
        if page_size == 0 || total == 0 || page_size > self.capacity {
            return;
        }
        let me = self.clone();
        let work = move || {
            let end = off + total;
            let mut p = off.div_ceil(page_size);
            while p * page_size < end {
                let (ps, pe) = (p * page_size, ((p + 1) * page_size).min(file_size));
                if pe > end || ps >= pe {
                    break;
                }
                if !me.lock().pages.contains_key(&(id, p)) {
                    me.write_page((id, p), &frames, ps - off, pe - ps);
                }
                p += 1;
            }
            me.evict();
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn_blocking(work);
            }
            Err(_) => work(),
        }
    }

    /// Writes `len` bytes starting `at` bytes into `frames` as one page.
    fn write_page(&self, key: (u128, u64), frames: &[Bytes], at: u64, len: u64) {
        let path = self.path(key);
        let tmp = path.with_extension("tmp");
        let res = (|| -> std::io::Result<()> {
            if let Some(d) = path.parent() {
                std::fs::create_dir_all(d)?;
            }
            let mut f = std::fs::File::create(&tmp)?;
            let mut wrote = 0u64;
            for b in slice_frames(frames, at, len) {
                f.write_all(&b)?;
                wrote += b.len() as u64;
            }
            if wrote != len {
                return Err(std::io::Error::other("short page"));
            }
            std::fs::rename(&tmp, &path)
        })();
        match res {
            Ok(()) => self.lock().insert(key, len),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                tracing::debug!("local cache: cannot keep {}: {e}", path.display());
            }
        }
    }

    /// Deletes least recently used pages until the cache fits.
    fn evict(&self) {
        loop {
            let victim = {
                let mut st = self.lock();
                if st.used <= self.capacity {
                    return;
                }
                let Some((_, key)) = st.lru.pop_first() else {
                    return;
                };
                if let Some(e) = st.pages.remove(&key) {
                    st.used -= e.size;
                }
                key
            };
            let _ = std::fs::remove_file(self.path(victim));
        }
    }
}

/// `len` bytes starting `skip` bytes into `frames` (without copying).
pub(crate) fn slice_frames(frames: &[Bytes], mut skip: u64, len: u64) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut left = len;
    for b in frames {
        let n = b.len() as u64;
        if skip >= n {
            skip -= n;
            continue;
        }
        let take = (n - skip).min(left);
        out.push(b.slice(skip as usize..(skip + take) as usize));
        left -= take;
        skip = 0;
        if left == 0 {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_kept_read_back_bounded_and_found_again() {
        let d = tempfile::tempdir().unwrap();
        let ps = 4096u64;
        let size = 5 * ps + 100;
        let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        let c = Arc::new(LocalCache::open(d.path(), 4 * ps).unwrap());
        // Bytes 100..(3 pages + 50): only page 1 and 2 are whole.
        let (o, l) = (100, 3 * ps - 50);
        c.store(
            7,
            ps,
            size,
            o,
            vec![Bytes::copy_from_slice(&data[o as usize..(o + l) as usize])],
        );
        assert_eq!(c.stats().pages, 2);
        assert!(c.read(7, ps, size, 0, 10).is_none(), "page 0 was not whole");
        let b = c.read(7, ps, size, ps + 10, ps + 20).unwrap();
        assert_eq!(&b[..], &data[(ps + 10) as usize..(2 * ps + 30) as usize]);
        // The last, short page is whole at the end of the file; frames split
        // anywhere are reassembled.
        let tail = &data[(4 * ps) as usize..];
        c.store(
            7,
            ps,
            size,
            4 * ps,
            vec![
                Bytes::copy_from_slice(&tail[..10]),
                Bytes::copy_from_slice(&tail[10..]),
            ],
        );
        assert_eq!(
            &c.read(7, ps, size, 5 * ps, 100).unwrap()[..],
            &data[(5 * ps) as usize..]
        );
        assert_eq!(c.stats().pages, 4);
        assert!(c.stats().bytes <= 4 * ps);
        // Over capacity: the least recently used page (1 was read after 2
        // was stored... 2 was read too) goes; the total stays bounded.
        c.store(9, ps, ps, 0, vec![Bytes::from(vec![1u8; ps as usize])]);
        assert!(c.stats().bytes <= 4 * ps, "{:?}", c.stats());
        // A new cache over the same directory finds the pages.
        let c2 = LocalCache::open(d.path(), 4 * ps).unwrap();
        assert_eq!(c2.stats().pages, c.stats().pages);
        assert!(c2.read(9, ps, ps, 0, ps).is_some());
        // Alignment for fetching.
        assert_eq!(LocalCache::aligned(ps, ps + 5, 10, 10 * ps), (ps, ps));
        assert_eq!(LocalCache::aligned(ps, 5, 2 * ps, size), (0, 3 * ps));
        assert_eq!(LocalCache::aligned(ps, 5 * ps + 1, 10, size), (5 * ps, 100));
    }
}
