//! Heavy-client mode: pages this client reads are also kept in a local
//! directory (`client.local_cache_dir`, bounded by
//! `client.local_cache_capacity`) and read from there afterwards, so each
//! host keeps its own copy of its working set while the cluster's workers
//! only distribute it.
//!
//! Each object (one version of a file: cache ids carry the fingerprint, so
//! a changed file never reads an old page) is one sparse file,
//! `<dir>/<2 hex>/<cache id>.<page size>`, as long as the object, holding
//! the pages kept so far at their own offsets. Least recently used pages
//! are evicted by punching holes (`FALLOC_FL_PUNCH_HOLE`); an object with
//! no page left is deleted. When every page of an object is here, the file
//! is a complete local copy: the FUSE mount hands it to the kernel
//! (passthrough), and it is pinned (never evicted) while it is open that
//! way.
//!
//! At start the index is rebuilt from the directory: a page counts as kept
//! only if its whole range is allocated data (`SEEK_DATA`/`SEEK_HOLE`), so
//! a page whose write was cut short by a crash is a hole, fetched again.
//!
//! The index lives in memory, so one process at a time may use a
//! directory: a second one would evict (punch holes in) pages the first
//! still counts, and the first would read those holes as zeros. Each
//! process holds an exclusive `flock` on `<dir>/.lock` for as long as it
//! uses the directory; clients of one process share one cache per
//! directory.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};

/// Pages are whole file-system blocks (so a page's range is data or hole,
/// never a partly zeroed block); other page sizes are not kept locally.
const BLOCK: u64 = 4096;

/// Whether pages of `page_size` bytes can be kept locally.
fn keepable(page_size: u64) -> bool {
    page_size > 0 && page_size.is_multiple_of(BLOCK)
}

struct Object {
    page_size: u64,
    file_size: u64,
    /// Pages of the object present in its file.
    present: u64,
    /// Open passthrough descriptors of the complete file: while any is
    /// open, no page is evicted.
    pins: u32,
    /// Tells this object from a later one under the same id (no file
    /// descriptor is kept per object: a cache holds many thousands).
    generation: u64,
}

impl Object {
    fn pages(&self) -> u64 {
        self.file_size.div_ceil(self.page_size.max(1))
    }
}

#[derive(Default)]
struct State {
    objects: HashMap<u128, Object>,
    /// Tick of each present page (`(cache id, page)`) and the reverse.
    ticks: HashMap<(u128, u64), u64>,
    lru: BTreeMap<u64, (u128, u64)>,
    used: u64,
    tick: u64,
    generations: u64,
}

impl State {
    fn add_object(&mut self, id: u128, page_size: u64, file_size: u64) -> u64 {
        self.generations += 1;
        let generation = self.generations;
        self.objects.insert(
            id,
            Object {
                page_size,
                file_size,
                present: 0,
                pins: 0,
                generation,
            },
        );
        generation
    }

    fn touch(&mut self, key: (u128, u64)) -> bool {
        self.tick += 1;
        let t = self.tick;
        match self.ticks.get_mut(&key) {
            Some(old) => {
                self.lru.remove(old);
                *old = t;
                self.lru.insert(t, key);
                true
            }
            None => false,
        }
    }

    fn page_len(&self, key: (u128, u64)) -> u64 {
        self.objects.get(&key.0).map_or(0, |o| {
            let start = key.1 * o.page_size;
            (start + o.page_size).min(o.file_size).saturating_sub(start)
        })
    }

    /// Records page `key` as present (its object must exist).
    fn insert(&mut self, key: (u128, u64)) {
        if self.ticks.contains_key(&key) {
            self.touch(key);
            return;
        }
        self.tick += 1;
        let t = self.tick;
        self.ticks.insert(key, t);
        self.lru.insert(t, key);
        self.used += self.page_len(key);
        if let Some(o) = self.objects.get_mut(&key.0) {
            o.present += 1;
        }
    }

    /// Forgets page `key`; returns whether its object is now empty.
    fn remove(&mut self, key: (u128, u64)) -> bool {
        let Some(t) = self.ticks.remove(&key) else {
            return false;
        };
        self.lru.remove(&t);
        self.used -= self.page_len(key);
        match self.objects.get_mut(&key.0) {
            Some(o) => {
                o.present -= 1;
                o.present == 0
            }
            None => false,
        }
    }
}

pub(crate) struct LocalCache {
    dir: PathBuf,
    capacity: u64,
    state: Mutex<State>,
    /// Holds the directory's `flock` while this process uses it.
    _lock: File,
}

/// How long opening a directory this process itself still holds (a cache
/// of it being dropped on another thread) waits for it to be released.
const SELF_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// The caches this process has open, by directory: clients of one process
/// share one (the lock would refuse a second).
fn open_caches() -> &'static Mutex<HashMap<PathBuf, std::sync::Weak<LocalCache>>> {
    static OPEN: std::sync::OnceLock<Mutex<HashMap<PathBuf, std::sync::Weak<LocalCache>>>> =
        std::sync::OnceLock::new();
    OPEN.get_or_init(Default::default)
}

/// Takes the exclusive lock of `dir` (`<dir>/.lock`, holding the pid of
/// the process that has it). If another process holds it: an error of
/// kind `WouldBlock` whose message names the holder ("process PID").
fn lock_dir(dir: &Path) -> std::io::Result<File> {
    use std::io::{Read, Seek};
    let path = dir.join(".lock");
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)?;
    let deadline = std::time::Instant::now() + SELF_WAIT;
    loop {
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            f.set_len(0)?;
            f.write_all_at(format!("{}\n", std::process::id()).as_bytes(), 0)?;
            return Ok(f);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(e);
        }
        let mut holder = String::new();
        let _ = f.rewind().and_then(|()| f.read_to_string(&mut holder));
        let holder = holder.trim();
        let me = holder == std::process::id().to_string();
        if !me || std::time::Instant::now() >= deadline {
            let who = match holder {
                "" => "another process".to_string(),
                _ if me => "this process (another path to the same directory?)".to_string(),
                pid => format!("process {pid}"),
            };
            return Err(std::io::Error::new(std::io::ErrorKind::WouldBlock, who));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A complete local copy of an object, opened read-only, and pinned in the
/// cache until this is dropped.
pub struct LocalFile {
    pub file: File,
    cache: Arc<LocalCache>,
    id: u128,
}

impl Drop for LocalFile {
    fn drop(&mut self) {
        let mut st = self.cache.lock();
        if let Some(o) = st.objects.get_mut(&self.id) {
            o.pins = o.pins.saturating_sub(1);
        }
        drop(st);
        self.cache.evict();
    }
}

/// Hits and misses of the local cache since the client started.
#[derive(Clone, Copy, Debug, Default)]
pub struct LocalCacheStats {
    pub pages: u64,
    pub bytes: u64,
    pub capacity: u64,
}

fn parse_name(name: &str) -> Option<(u128, u64)> {
    let (id, ps) = name.split_once('.')?;
    if id.len() != 32 {
        return None;
    }
    Some((u128::from_str_radix(id, 16).ok()?, ps.parse().ok()?))
}

/// The allocated byte ranges of `f` (its data, not its holes) below `len`.
fn data_ranges(f: &File, len: u64) -> Vec<(u64, u64)> {
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < len {
        // SAFETY: lseek on a descriptor we own.
        let start = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if start < 0 {
            break;
        }
        // SAFETY: as above.
        let end = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
        if end <= start {
            break;
        }
        out.push((start as u64, (end as u64).min(len)));
        pos = end as u64;
    }
    out
}

/// Frees `[off, off + len)` of `f` (keeping its size).
fn punch_hole(f: &File, off: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: fallocate on a descriptor we own.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off as libc::off_t,
            len as libc::off_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl LocalCache {
    /// The cache of directory `dir` (created if needed): the one this
    /// process has open already, or a new one that locks the directory
    /// and indexes the pages in it. `ErrorKind::WouldBlock`, naming the
    /// holder, if another process holds it.
    pub(crate) fn open(dir: &Path, capacity: u64) -> std::io::Result<Arc<LocalCache>> {
        std::fs::create_dir_all(dir)?;
        let dir = std::fs::canonicalize(dir)?;
        let mut open = open_caches().lock().unwrap_or_else(|p| p.into_inner());
        open.retain(|_, c| c.strong_count() > 0);
        if let Some(c) = open.get(&dir).and_then(|c| c.upgrade()) {
            if c.capacity != capacity {
                tracing::warn!(
                    "local cache {}: already open in this process with a capacity of {} bytes, \
                     which it keeps (asked for {capacity})",
                    dir.display(),
                    c.capacity
                );
            }
            return Ok(c);
        }
        let c = Arc::new(Self::index(&dir, capacity, lock_dir(&dir)?)?);
        open.insert(dir, Arc::downgrade(&c));
        Ok(c)
    }

    /// Indexes the pages in `dir`, which this process has locked.
    fn index(dir: &Path, capacity: u64, lock: File) -> std::io::Result<LocalCache> {
        let mut found = Vec::new();
        for sub in std::fs::read_dir(dir)? {
            let sub = sub?;
            if !sub.file_type()?.is_dir() {
                continue;
            }
            for f in std::fs::read_dir(sub.path())? {
                let f = f?;
                let name = f.file_name().to_string_lossy().into_owned();
                let Some((id, page_size)) = parse_name(&name).filter(|k| keepable(k.1)) else {
                    // Not ours, or a page file of the older one-file-per-page
                    // layout: a cache may drop anything.
                    let _ = std::fs::remove_file(f.path());
                    continue;
                };
                let Ok(file) = File::open(f.path()) else {
                    continue;
                };
                let Ok(meta) = file.metadata() else { continue };
                let at = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
                let file_size = meta.len();
                let mut pages = Vec::new();
                for (s, e) in data_ranges(&file, file_size) {
                    let mut p = s.div_ceil(page_size);
                    while p * page_size < e && ((p + 1) * page_size).min(file_size) <= e {
                        pages.push(p);
                        p += 1;
                    }
                }
                if pages.is_empty() {
                    let _ = std::fs::remove_file(f.path());
                    continue;
                }
                found.push((at, id, page_size, file_size, pages));
            }
        }
        found.sort_by_key(|f| f.0);
        let mut st = State::default();
        for (_, id, page_size, file_size, pages) in found {
            st.add_object(id, page_size, file_size);
            for p in pages {
                st.insert((id, p));
            }
        }
        let c = LocalCache {
            dir: dir.to_path_buf(),
            capacity,
            state: Mutex::new(st),
            _lock: lock,
        };
        c.evict();
        Ok(c)
    }

    fn path(&self, id: u128, page_size: u64) -> PathBuf {
        let hex = format!("{id:032x}");
        self.dir.join(&hex[..2]).join(format!("{hex}.{page_size}"))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn stats(&self) -> LocalCacheStats {
        let st = self.lock();
        LocalCacheStats {
            pages: st.ticks.len() as u64,
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
        let generation = {
            let mut st = self.lock();
            let o = st.objects.get(&id)?;
            if (o.page_size, o.file_size) != (page_size, file_size) {
                return None;
            }
            let generation = o.generation;
            if !(first..=last).all(|p| st.touch((id, p))) {
                return None;
            }
            generation
        };
        let mut out = BytesMut::zeroed((end - off) as usize);
        let read =
            File::open(self.path(id, page_size)).and_then(|f| f.read_exact_at(&mut out, off));
        if read.is_err() {
            // Deleted or damaged behind our back: forget the object.
            self.drop_object(id);
            return None;
        }
        // A page evicted while it was being read may have read as zeros:
        // only pages still present (in the same object) count.
        let st = self.lock();
        let same = st
            .objects
            .get(&id)
            .is_some_and(|o| o.generation == generation)
            && (first..=last).all(|p| st.ticks.contains_key(&(id, p)));
        same.then(|| out.freeze())
    }

    /// The complete local copy of the object, pinned until the returned
    /// value is dropped; `None` unless every page is here.
    pub(crate) fn whole_file(
        self: &Arc<Self>,
        id: u128,
        page_size: u64,
        file_size: u64,
    ) -> Option<LocalFile> {
        {
            let mut st = self.lock();
            let o = st.objects.get_mut(&id)?;
            if (o.page_size, o.file_size) != (page_size, file_size) || o.present < o.pages() {
                return None;
            }
            o.pins += 1;
            for p in 0..file_size.div_ceil(page_size) {
                st.touch((id, p));
            }
        }
        let pinned = match File::open(self.path(id, page_size)) {
            // From here the pin is released when `pinned` is dropped.
            Ok(file) => LocalFile {
                file,
                cache: self.clone(),
                id,
            },
            Err(_) => {
                if let Some(o) = self.lock().objects.get_mut(&id) {
                    o.pins = o.pins.saturating_sub(1);
                }
                return None;
            }
        };
        Some(pinned)
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
        if !keepable(page_size) || total == 0 || page_size > self.capacity {
            return;
        }
        let me = self.clone();
        let work = move || {
            let Some((generation, file)) = me.object_file(id, page_size, file_size) else {
                return;
            };
            let end = off + total;
            let mut p = off.div_ceil(page_size);
            while p * page_size < end {
                let (ps, pe) = (p * page_size, ((p + 1) * page_size).min(file_size));
                if pe > end || ps >= pe {
                    break;
                }
                if !me.lock().ticks.contains_key(&(id, p)) {
                    let page = slice_frames(&frames, ps - off, pe - ps);
                    me.write_page(&file, generation, (id, p), page_size, &page, pe - ps);
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

    /// The generation of object `id` and its file open for writing, the
    /// file created (as long as the object, all holes) if the object is
    /// new; `None` if it cannot be, or if the object is kept with another
    /// layout.
    fn object_file(&self, id: u128, page_size: u64, file_size: u64) -> Option<(u64, File)> {
        let known = match self.lock().objects.get(&id) {
            Some(o) if (o.page_size, o.file_size) != (page_size, file_size) => return None,
            Some(o) => Some(o.generation),
            None => None,
        };
        let path = self.path(id, page_size);
        let res = (|| -> std::io::Result<File> {
            if known.is_none()
                && let Some(d) = path.parent()
            {
                std::fs::create_dir_all(d)?;
            }
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create(known.is_none())
                .truncate(false)
                .open(&path)?;
            if known.is_none() {
                f.set_len(file_size)?;
            }
            Ok(f)
        })();
        let file = match res {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!("local cache: cannot open {}: {e}", path.display());
                return None;
            }
        };
        if let Some(generation) = known {
            return Some((generation, file));
        }
        let mut st = self.lock();
        let generation = match st.objects.get(&id) {
            Some(o) if (o.page_size, o.file_size) != (page_size, file_size) => return None,
            Some(o) => o.generation,
            None => st.add_object(id, page_size, file_size),
        };
        Some((generation, file))
    }

    /// Writes `parts` (`len` bytes in all) as page `key`, with one
    /// `pwrite`: cut short by a crash, it ends on a page-cache boundary,
    /// so the rest of the page stays a hole (not counted at the next
    /// start).
    fn write_page(
        &self,
        file: &File,
        generation: u64,
        key: (u128, u64),
        page_size: u64,
        parts: &[Bytes],
        len: u64,
    ) {
        let whole: Bytes = match parts {
            [one] => one.clone(),
            many => {
                let mut b = BytesMut::with_capacity(len as usize);
                for p in many {
                    b.extend_from_slice(p);
                }
                b.freeze()
            }
        };
        let res = if whole.len() as u64 != len {
            Err(std::io::Error::other("short page"))
        } else {
            file.write_all_at(&whole, key.1 * page_size)
        };
        let mut st = self.lock();
        match res {
            // Only if the object was not dropped meanwhile.
            Ok(())
                if st
                    .objects
                    .get(&key.0)
                    .is_some_and(|o| o.generation == generation) =>
            {
                st.insert(key)
            }
            Ok(()) => {}
            Err(e) => {
                drop(st);
                let _ = punch_hole(file, key.1 * page_size, page_size);
                tracing::debug!("local cache: cannot keep a page of {:032x}: {e}", key.0);
            }
        }
    }

    /// Forgets object `id` and deletes its file.
    fn drop_object(&self, id: u128) {
        let mut st = self.lock();
        let Some(o) = st.objects.get(&id) else { return };
        let (n, ps) = (o.pages(), o.page_size);
        for p in 0..n {
            st.remove((id, p));
        }
        st.objects.remove(&id);
        drop(st);
        let _ = std::fs::remove_file(self.path(id, ps));
    }

    /// Evicts least recently used pages (never those of a pinned object)
    /// until the cache fits.
    fn evict(&self) {
        let mut skipped = Vec::new();
        loop {
            let mut st = self.lock();
            if st.used <= self.capacity {
                break;
            }
            let Some((t, key)) = st.lru.pop_first() else {
                break;
            };
            let Some(o) = st.objects.get(&key.0) else {
                st.ticks.remove(&key);
                continue;
            };
            if o.pins > 0 {
                skipped.push((key, t));
                continue;
            }
            let page_size = o.page_size;
            let path = self.path(key.0, page_size);
            if st.remove(key) {
                st.objects.remove(&key.0);
                drop(st);
                let _ = std::fs::remove_file(path);
                continue;
            }
            // The whole page, past the end of the file for the last one,
            // so no partly zeroed block is left to look like data; under
            // the lock, so no later object under this id can lose a page.
            let punched = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .and_then(|f| punch_hole(&f, key.1 * page_size, page_size));
            drop(st);
            if punched.is_err() {
                self.drop_object(key.0);
            }
        }
        // Pinned pages go back, as most recently used (unless touched
        // meanwhile, which put them back already).
        if !skipped.is_empty() {
            let mut st = self.lock();
            for (key, t) in skipped {
                if st.ticks.get(&key) == Some(&t) {
                    st.tick += 1;
                    let nt = st.tick;
                    st.ticks.insert(key, nt);
                    st.lru.insert(nt, key);
                }
            }
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
        let c = LocalCache::open(d.path(), 4 * ps).unwrap();
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
        // A second client of this process shares the cache; once it is
        // closed, a new one over the same directory finds the pages.
        let shared = LocalCache::open(d.path(), 4 * ps).unwrap();
        assert!(Arc::ptr_eq(&shared, &c));
        let pages = c.stats().pages;
        drop((c, shared));
        let c2 = LocalCache::open(d.path(), 4 * ps).unwrap();
        assert_eq!(c2.stats().pages, pages);
        assert!(c2.read(9, ps, ps, 0, ps).is_some());
        // Alignment for fetching.
        assert_eq!(LocalCache::aligned(ps, ps + 5, 10, 10 * ps), (ps, ps));
        assert_eq!(LocalCache::aligned(ps, 5, 2 * ps, size), (0, 3 * ps));
        assert_eq!(LocalCache::aligned(ps, 5 * ps + 1, 10, size), (5 * ps, 100));
    }

    #[test]
    fn a_complete_object_is_one_file_kept_while_pinned() {
        let d = tempfile::tempdir().unwrap();
        let ps = 4096u64;
        let size = 3 * ps + 10;
        let data: Vec<u8> = (0..size).map(|i| (i % 253) as u8).collect();
        let c = LocalCache::open(d.path(), 5 * ps).unwrap();
        assert!(c.whole_file(1, ps, size).is_none());
        c.store(
            1,
            ps,
            size,
            0,
            vec![Bytes::copy_from_slice(&data[..ps as usize])],
        );
        assert!(c.whole_file(1, ps, size).is_none(), "one page of four");
        c.store(
            1,
            ps,
            size,
            ps,
            vec![Bytes::copy_from_slice(&data[ps as usize..])],
        );
        let lf = c.whole_file(1, ps, size).expect("every page is here");
        let read_all = |f: &File| {
            let mut v = vec![0u8; size as usize];
            f.read_exact_at(&mut v, 0).unwrap();
            v
        };
        assert_eq!(read_all(&lf.file), data);
        assert!(c.whole_file(1, ps, size + 1).is_none(), "another layout");
        // Another object overflows the cache: the pinned one loses nothing.
        c.store(
            2,
            ps,
            4 * ps,
            0,
            vec![Bytes::from(vec![2u8; 4 * ps as usize])],
        );
        assert!(c.stats().bytes <= 5 * ps, "{:?}", c.stats());
        assert_eq!(read_all(&lf.file), data);
        assert!(c.whole_file(1, ps, size).is_some());
        // Unpinned, it is evicted like any other.
        drop(lf);
        c.store(
            3,
            ps,
            5 * ps,
            0,
            vec![Bytes::from(vec![3u8; 5 * ps as usize])],
        );
        assert!(c.whole_file(1, ps, size).is_none());
        assert!(c.stats().bytes <= 5 * ps);
    }

    #[test]
    fn a_page_cut_short_is_not_counted_at_the_next_start() {
        let d = tempfile::tempdir().unwrap();
        let ps = 4 * 4096u64;
        let id = 0xabcu128;
        let hex = format!("{id:032x}");
        std::fs::create_dir_all(d.path().join(&hex[..2])).unwrap();
        let f =
            std::fs::File::create(d.path().join(&hex[..2]).join(format!("{hex}.{ps}"))).unwrap();
        f.set_len(3 * ps).unwrap();
        // Page 0 whole; page 1 only its first block (a write cut short);
        // page 2 never written.
        f.write_all_at(&vec![7u8; ps as usize], 0).unwrap();
        f.write_all_at(&[8u8; 4096], ps).unwrap();
        drop(f);
        // A page file of the older layout is dropped.
        std::fs::write(d.path().join(&hex[..2]).join(format!("{hex}-0")), b"x").unwrap();
        let c = LocalCache::open(d.path(), 100 * ps).unwrap();
        assert_eq!(c.stats().pages, 1);
        assert_eq!(
            &c.read(id, ps, 3 * ps, 0, ps).unwrap()[..],
            &vec![7u8; ps as usize][..]
        );
        assert!(c.read(id, ps, 3 * ps, ps, 10).is_none());
        assert!(!d.path().join(&hex[..2]).join(format!("{hex}-0")).exists());
    }

    #[test]
    fn a_directory_another_process_holds_is_refused_until_released() {
        let d = tempfile::tempdir().unwrap();
        let ps = 4096u64;
        {
            let c = LocalCache::open(d.path(), 10 * ps).unwrap();
            c.store(5, ps, ps, 0, vec![Bytes::from(vec![5u8; ps as usize])]);
        }
        // Another process's lock (flock locks of two open file
        // descriptions conflict within one process too).
        let other = std::fs::OpenOptions::new()
            .write(true)
            .open(d.path().join(".lock"))
            .unwrap();
        // SAFETY: flock on a descriptor we own.
        assert_eq!(
            unsafe { libc::flock(other.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
            0
        );
        other.set_len(0).unwrap();
        other.write_all_at(b"4242\n", 0).unwrap();
        // Its capacity of one page would evict pages the holder counts.
        let e = LocalCache::open(d.path(), ps / 2)
            .err()
            .expect("refused while held");
        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
        assert_eq!(e.to_string(), "process 4242");
        let hex = format!("{:032x}", 5u128);
        let kept = d.path().join(&hex[..2]).join(format!("{hex}.{ps}"));
        assert_eq!(std::fs::read(&kept).unwrap(), vec![5u8; ps as usize]);
        drop(other);
        let c = LocalCache::open(d.path(), 10 * ps).unwrap();
        assert_eq!(c.stats().pages, 1);
        let pid = std::fs::read_to_string(d.path().join(".lock")).unwrap();
        assert_eq!(pid.trim(), std::process::id().to_string());
    }
}
