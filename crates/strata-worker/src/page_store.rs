//! The tiered page store: cached pages as files in the directories of up to
//! three tiers (MEM on tmpfs, SSD, HDD), each directory under a byte quota and
//! each tier ordered by its own eviction policy ([`crate::policy`]).
//!
//! * New pages land in the fastest tier that may take them; making room there
//!   *demotes* that tier's victims to the next tier, and only the last tier
//!   drops pages.
//! * Pages read `promote_after_hits` times in a lower tier are queued for
//!   promotion; [`PageStore::promote`] moves them one tier up.
//! * Under memory pressure [`PageStore::spill`] moves MEM pages down, and new
//!   pages skip MEM.
//! * Pinned pages (user pins, and MUST_CACHE data that exists nowhere else)
//!   are never given to a policy, so they are never evicted.
//! * A file written at a priority may keep only its MEM budget in MEM.
//!
//! Layout: `<tier dir>/pages/<2 hex>/<cache id>_<block>_<page>_<crc32c>_<flags>`.
//! The name carries everything the index needs, so the index is rebuilt from
//! a directory scan at start-up and a restarted worker serves what it cached
//! before. A page found at start-up is checked against its crc32c the first
//! time it is read (or moved); a torn or corrupt page is dropped, counted and
//! refetched, never served. Pages are written to a temporary name and renamed,
//! so a crash leaves either the whole page or a temporary file (removed at
//! start-up).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{ErrorKind, Read, Seek};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use strata_common::CacheId;
use strata_common::config::{Medium, PolicyKind, TierConfig, WorkerConfig};
use strata_common::ids::PageKey;
use strata_proto::pb;

use crate::policy::{Policy, new_policy};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "the cache is full (cache directory {dirs}): {need} bytes needed and the rest is pinned \
         (free space with `strata fs free` or `strata fs unpin`, delete unpersisted files, \
         or raise the tier quotas in worker.tiers / worker.cache_capacity)"
    )]
    Full { dirs: String, need: u64 },
    #[error(
        "cache directory {dir}: {op} failed: {err} (check the disk, its free space and permissions)"
    )]
    Io {
        dir: String,
        op: &'static str,
        err: std::io::Error,
    },
    #[error("worker.tiers: {0}")]
    Config(String),
}

/// Flag bits kept in page file names.
const FLAG_USER_PIN: u8 = 1;
/// MUST_CACHE data: the only copy anywhere.
const FLAG_SOLE: u8 = 2;

/// How a page is being stored.
#[derive(Clone, Copy, Debug, Default)]
pub struct PutOpts {
    /// The page exists nowhere else (MUST_CACHE): pinned, never evicted.
    pub sole: bool,
    /// The write priority (0..=8) whose MEM budget the page counts against;
    /// `None` for pages cached on reads.
    pub priority: Option<u8>,
}

#[derive(Clone, Copy, Debug)]
struct Meta {
    size: u64,
    crc: u32,
    flags: u8,
    tier: u8,
    dir: u8,
    /// Destination (tier, dir) while the page is being copied there; the
    /// source copy keeps serving reads until the move completes.
    moving: Option<(u8, u8)>,
    /// The file's bytes were checked against `crc` (or written by this run).
    verified: bool,
    /// Reads since the page arrived in its tier (drives promotion).
    hits: u32,
    /// Unix seconds when the page was cached (drives the TTL).
    cached_at: u64,
}

impl Meta {
    fn pinned(&self) -> bool {
        self.flags != 0
    }
}

#[derive(Default)]
struct DirIndex {
    capacity: u64,
    used: u64,
    reserved: u64,
}

impl DirIndex {
    fn free(&self) -> u64 {
        self.capacity.saturating_sub(self.used + self.reserved)
    }
}

struct TierIndex {
    dirs: Vec<DirIndex>,
    policy: Box<dyn Policy<PageKey>>,
    pages: u64,
    pinned: u64,
}

struct Index {
    pages: BTreeMap<PageKey, Meta>,
    tiers: Vec<TierIndex>,
    /// Cache ids pinned by users; pages cached later for them are pinned too.
    pinned_ids: BTreeSet<CacheId>,
    /// Bytes each cache id holds in a MEM tier (priority budgets).
    mem_by_id: HashMap<CacheId, u64>,
}

/// Per-tier counters.
#[derive(Default)]
pub struct TierCounters {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub evictions: AtomicU64,
    pub promotions: AtomicU64,
    pub demotions: AtomicU64,
    pub spills: AtomicU64,
}

/// Store-wide counters.
#[derive(Default)]
pub struct StoreStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    /// Pages dropped from the last tier to make room.
    pub evictions: AtomicU64,
    pub corrupt_pages: AtomicU64,
    pub expired_pages: AtomicU64,
}

#[derive(Default)]
struct PriorityCounters {
    mem_bytes: AtomicU64,
    disk_bytes: AtomicU64,
}

struct TierInfo {
    medium: Medium,
    policy: PolicyKind,
    dirs: Vec<PathBuf>,
}

/// Settings the store takes from `[worker]`.
#[derive(Clone, Debug)]
pub struct StoreSettings {
    pub tiers: Vec<TierConfig>,
    /// Where the worker keeps its own files (pinned ids).
    pub home: PathBuf,
    pub promote_after_hits: u32,
    pub page_ttl_secs: u64,
    pub priority_mem_base: u64,
    pub priority_mem_step: u64,
}

impl StoreSettings {
    pub fn from_config(wc: &WorkerConfig) -> StoreSettings {
        StoreSettings {
            tiers: wc.effective_tiers(),
            home: wc.cache_dir.clone(),
            promote_after_hits: wc.promote_after_hits,
            page_ttl_secs: wc.page_ttl_secs,
            priority_mem_base: wc.priority_mem_base.0,
            priority_mem_step: wc.priority_mem_step.0,
        }
    }

    /// One tier of `capacity` bytes in `dir` (tests, tools).
    pub fn single(dir: &Path, capacity: u64) -> StoreSettings {
        let wc = WorkerConfig {
            cache_dir: dir.to_path_buf(),
            cache_capacity: strata_common::config::ByteSize(capacity),
            ..WorkerConfig::default()
        };
        StoreSettings::from_config(&wc)
    }
}

struct Inner {
    tiers: Vec<TierInfo>,
    settings: StoreSettings,
    index: Mutex<Index>,
    tier_counters: Vec<TierCounters>,
    stats: StoreStats,
    priorities: [PriorityCounters; 9],
    pressure: AtomicBool,
    mem_available: AtomicU64,
    inflight: AtomicUsize,
    promote_tx: tokio::sync::mpsc::Sender<PageKey>,
    promote_rx: Mutex<Option<tokio::sync::mpsc::Receiver<PageKey>>>,
}

/// The tiered page store. Cheap to clone; clones share one store.
#[derive(Clone)]
pub struct PageStore {
    inner: Arc<Inner>,
}

/// Snapshot of usage over all tiers.
#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    pub capacity: u64,
    pub used: u64,
    pub pinned: u64,
    pub pages: u64,
}

/// Counts a user read in flight while alive (promotion backs off meanwhile).
pub struct IoGuard(Arc<Inner>);

impl Drop for IoGuard {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn file_name(k: &PageKey, crc: u32, flags: u8) -> String {
    format!(
        "{}_{}_{}_{crc:08x}_{flags}",
        k.cache_id.to_hex(),
        k.block,
        k.page
    )
}

fn parse_name(name: &str) -> Option<(PageKey, u32, u8)> {
    let mut it = name.split('_');
    let cache_id = CacheId::from_hex(it.next()?)?;
    let block = it.next()?.parse().ok()?;
    let page = it.next()?.parse().ok()?;
    let crc_hex = it.next()?;
    if crc_hex.len() != 8 {
        return None;
    }
    let crc = u32::from_str_radix(crc_hex, 16).ok()?;
    let flags: u8 = it.next()?.parse().ok()?;
    if it.next().is_some() || flags > (FLAG_USER_PIN | FLAG_SOLE) {
        return None;
    }
    Some((
        PageKey {
            cache_id,
            block,
            page,
        },
        crc,
        flags,
    ))
}

/// Names of the first page-store layout (`<id>_<block>_<page>[.pin]`, no
/// checksum); such pages are checksummed and renamed at start-up.
fn parse_legacy_name(name: &str) -> Option<(PageKey, u8)> {
    let (base, flags) = match name.strip_suffix(".pin") {
        Some(b) => (b, FLAG_SOLE),
        None => (name, 0),
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
        flags,
    ))
}

/// The plan a placement made under the index lock, carried out after it.
#[derive(Default)]
struct Plan {
    /// Files of dropped pages.
    drops: Vec<PathBuf>,
    /// Pages to copy down (or up), deepest first.
    moves: Vec<Move>,
}

struct Move {
    key: PageKey,
    from: PathBuf,
    to: (u8, u8),
    size: u64,
    crc: u32,
    kind: MoveKind,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum MoveKind {
    Demote,
    Spill,
    Promote,
}

enum MoveError {
    Corrupt,
    Io(std::io::Error),
}

fn is_full(err: &std::io::Error) -> bool {
    err.kind() == ErrorKind::StorageFull || err.raw_os_error() == Some(libc::ENOSPC)
}

impl PageStore {
    /// Opens the store: creates the tier directories and indexes the pages
    /// already in them.
    pub fn open(settings: StoreSettings) -> Result<PageStore, StoreError> {
        if settings.tiers.is_empty() {
            return Err(StoreError::Config("no tier configured".into()));
        }
        let page_count_hint = 1024;
        let mut tiers = Vec::new();
        let mut index = Index {
            pages: BTreeMap::new(),
            tiers: Vec::new(),
            pinned_ids: load_pinned_ids(&settings.home),
            mem_by_id: HashMap::new(),
        };
        for t in &settings.tiers {
            if t.dirs.len() > u8::MAX as usize {
                return Err(StoreError::Config(format!(
                    "the {} tier lists more than 255 directories",
                    t.medium.name()
                )));
            }
            for d in &t.dirs {
                std::fs::create_dir_all(d.join("pages")).map_err(|err| StoreError::Io {
                    dir: d.display().to_string(),
                    op: "create",
                    err,
                })?;
                if t.medium == Medium::Mem && !is_tmpfs(d) {
                    tracing::warn!(
                        dir = %d.display(),
                        "MEM tier directory is not on tmpfs: its pages live on disk \
                         (use a directory under /dev/shm or a tmpfs mount)"
                    );
                }
            }
            tiers.push(TierInfo {
                medium: t.medium,
                policy: t.policy,
                dirs: t.dirs.clone(),
            });
            let cap_pages = (t.quota.0 * t.dirs.len() as u64 / (1 << 20)).max(page_count_hint);
            index.tiers.push(TierIndex {
                dirs: t
                    .dirs
                    .iter()
                    .map(|_| DirIndex {
                        capacity: t.quota.0,
                        ..DirIndex::default()
                    })
                    .collect(),
                policy: new_policy(t.policy, cap_pages as usize),
                pages: 0,
                pinned: 0,
            });
        }
        if tiers.len() > 8 {
            return Err(StoreError::Config("at most 8 tiers".into()));
        }
        let (tx, rx) = tokio::sync::mpsc::channel(4096);
        let inner = Inner {
            tier_counters: tiers.iter().map(|_| TierCounters::default()).collect(),
            tiers,
            settings,
            index: Mutex::new(index),
            stats: StoreStats::default(),
            priorities: Default::default(),
            pressure: AtomicBool::new(false),
            mem_available: AtomicU64::new(0),
            inflight: AtomicUsize::new(0),
            promote_tx: tx,
            promote_rx: Mutex::new(Some(rx)),
        };
        let store = PageStore {
            inner: Arc::new(inner),
        };
        store.scan()?;
        Ok(store)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        self.inner.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn path_at(&self, k: &PageKey, tier: u8, dir: u8, crc: u32, flags: u8) -> PathBuf {
        let hex = k.cache_id.to_hex();
        self.inner.tiers[tier as usize].dirs[dir as usize]
            .join("pages")
            .join(&hex[..2])
            .join(file_name(k, crc, flags))
    }

    fn path_of(&self, k: &PageKey, m: &Meta) -> PathBuf {
        self.path_at(k, m.tier, m.dir, m.crc, m.flags)
    }

    fn is_mem(&self, tier: u8) -> bool {
        self.inner.tiers[tier as usize].medium == Medium::Mem
    }

    /// Indexes every page file; removes temporary files and duplicates.
    fn scan(&self) -> Result<(), StoreError> {
        let mut idx = self.lock();
        for (t, tier) in self.inner.tiers.iter().enumerate() {
            for (d, dir) in tier.dirs.iter().enumerate() {
                let io = |op, err| StoreError::Io {
                    dir: dir.display().to_string(),
                    op,
                    err,
                };
                let pages_dir = dir.join("pages");
                for sub in std::fs::read_dir(&pages_dir).map_err(|e| io("scan", e))? {
                    let sub = sub.map_err(|e| io("scan", e))?;
                    if !sub.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                        continue;
                    }
                    for f in std::fs::read_dir(sub.path()).map_err(|e| io("scan", e))? {
                        let f = f.map_err(|e| io("scan", e))?;
                        let name = f.file_name().to_string_lossy().into_owned();
                        let Ok(md) = f.metadata() else { continue };
                        let cached_at = md
                            .modified()
                            .ok()
                            .and_then(|m| m.duration_since(UNIX_EPOCH).ok())
                            .map(|d| d.as_secs())
                            .unwrap_or_else(now_secs);
                        let (key, crc, flags, verified) = match parse_name(&name) {
                            Some((k, c, fl)) => (k, c, fl, false),
                            None => match parse_legacy_name(&name) {
                                Some((k, fl)) => match std::fs::read(f.path()) {
                                    Ok(data) => {
                                        let crc = crc32c::crc32c(&data);
                                        let to = f.path().with_file_name(file_name(&k, crc, fl));
                                        if std::fs::rename(f.path(), &to).is_err() {
                                            continue;
                                        }
                                        (k, crc, fl, true)
                                    }
                                    Err(_) => continue,
                                },
                                None => {
                                    // Leftover temporary files from a crash.
                                    let _ = std::fs::remove_file(f.path());
                                    continue;
                                }
                            },
                        };
                        if idx.pages.contains_key(&key) {
                            // A crash mid-move left two copies: keep the faster one.
                            let _ = std::fs::remove_file(f.path());
                            continue;
                        }
                        let flags = if idx.pinned_ids.contains(&key.cache_id) {
                            flags | FLAG_USER_PIN
                        } else {
                            flags
                        };
                        let meta = Meta {
                            size: md.len(),
                            crc,
                            flags,
                            tier: t as u8,
                            dir: d as u8,
                            moving: None,
                            verified,
                            hits: 0,
                            cached_at,
                        };
                        self.attach(&mut idx, key, meta);
                    }
                }
            }
        }
        if !idx.pages.is_empty() {
            tracing::info!(pages = idx.pages.len(), "page store reopened");
        }
        Ok(())
    }

    /// Adds a page at its location to the tier accounting.
    fn attach(&self, idx: &mut Index, k: PageKey, m: Meta) {
        let t = m.tier as usize;
        let tier = &mut idx.tiers[t];
        tier.dirs[m.dir as usize].used += m.size;
        tier.pages += 1;
        if m.pinned() {
            tier.pinned += m.size;
        } else {
            tier.policy.insert(k);
        }
        if self.is_mem(m.tier) {
            *idx.mem_by_id.entry(k.cache_id).or_default() += m.size;
        }
        idx.pages.insert(k, m);
    }

    /// Removes a page from the tier accounting (the entry stays in `pages`).
    fn detach(&self, idx: &mut Index, k: &PageKey, m: &Meta) {
        let tier = &mut idx.tiers[m.tier as usize];
        let dir = &mut tier.dirs[m.dir as usize];
        dir.used = dir.used.saturating_sub(m.size);
        tier.pages = tier.pages.saturating_sub(1);
        if m.pinned() {
            tier.pinned = tier.pinned.saturating_sub(m.size);
        } else {
            tier.policy.remove(k);
        }
        if self.is_mem(m.tier)
            && let Some(b) = idx.mem_by_id.get_mut(&k.cache_id)
        {
            *b = b.saturating_sub(m.size);
            if *b == 0 {
                idx.mem_by_id.remove(&k.cache_id);
            }
        }
    }

    /// Removes a page entirely; returns its file to delete.
    fn remove(&self, idx: &mut Index, k: &PageKey) -> Option<PathBuf> {
        let m = *idx.pages.get(k)?;
        if let Some((t, d)) = m.moving {
            // The mover finds the entry gone and deletes its copy.
            let dir = &mut idx.tiers[t as usize].dirs[d as usize];
            dir.reserved = dir.reserved.saturating_sub(m.size);
        } else {
            self.detach(idx, k, &m);
        }
        idx.pages.remove(k);
        Some(self.path_of(k, &m))
    }

    /// Finds room for `need` bytes in tier `t`, demoting (or, in the last
    /// tier, dropping) that tier's policy victims; reserves it and returns
    /// the directory. `None` when the rest of the tier is pinned or moving.
    fn make_room(&self, idx: &mut Index, t: usize, need: u64, plan: &mut Plan) -> Option<u8> {
        loop {
            let (d, free) = idx.tiers[t]
                .dirs
                .iter()
                .enumerate()
                .map(|(i, x)| (i, x.free()))
                .max_by_key(|&(_, f)| f)?;
            if free >= need {
                idx.tiers[t].dirs[d].reserved += need;
                return Some(d as u8);
            }
            let victim = idx.tiers[t].policy.evict()?;
            let Some(m) = idx.pages.get(&victim).copied() else {
                continue;
            };
            self.detach(idx, &victim, &m);
            self.inner.tier_counters[t]
                .evictions
                .fetch_add(1, Ordering::Relaxed);
            let from = self.path_of(&victim, &m);
            let below = if t + 1 < idx.tiers.len() {
                self.make_room(idx, t + 1, m.size, plan)
            } else {
                None
            };
            match below {
                Some(d2) => {
                    let to = ((t + 1) as u8, d2);
                    if let Some(e) = idx.pages.get_mut(&victim) {
                        e.moving = Some(to);
                    }
                    plan.moves.push(Move {
                        key: victim,
                        from,
                        to,
                        size: m.size,
                        crc: m.crc,
                        kind: MoveKind::Demote,
                    });
                }
                None => {
                    idx.pages.remove(&victim);
                    plan.drops.push(from);
                    self.inner.stats.evictions.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Carries out a plan: deletes dropped pages, then copies moved pages
    /// (deepest first, so room is freed before it is used).
    fn execute(&self, plan: Plan) {
        for p in plan.drops {
            let _ = std::fs::remove_file(p);
        }
        for mv in plan.moves {
            let res = self.copy_page(&mv);
            self.finish_move(&mv, res);
        }
    }

    /// Copies a page's file to a temporary name in its destination,
    /// checking its crc32c on the way.
    fn copy_page(&self, mv: &Move) -> Result<PathBuf, MoveError> {
        let mut data = Vec::with_capacity(mv.size as usize);
        std::fs::File::open(&mv.from)
            .and_then(|mut f| f.read_to_end(&mut data))
            .map_err(MoveError::Io)?;
        if data.len() as u64 != mv.size || crc32c::crc32c(&data) != mv.crc {
            return Err(MoveError::Corrupt);
        }
        let dest = self.path_at(&mv.key, mv.to.0, mv.to.1, mv.crc, 0);
        let tmp = dest.with_extension(format!("tmp{}", rand::random::<u32>()));
        let r = tmp
            .parent()
            .map(std::fs::create_dir_all)
            .unwrap_or(Ok(()))
            .and_then(|_| self.write_file(&tmp, &data, mv.to.0));
        match r {
            Ok(()) => Ok(tmp),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(MoveError::Io(e))
            }
        }
    }

    /// Writes a page file. On disk tiers the kernel is told to start
    /// writing it back at once, and under memory pressure the write waits
    /// for the disk: dirty page cache counts against the worker's memory
    /// limit and cannot be dropped until written, so letting it pile up on a
    /// busy disk would bring on the OOM killer that spilling avoids.
    fn write_file(&self, path: &Path, data: &[u8], tier: u8) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::fd::AsRawFd;
        let mut f = std::fs::File::create(path)?;
        f.write_all(data)?;
        if !self.is_mem(tier) {
            if self.memory_pressure() {
                f.sync_data()?;
            } else {
                // SAFETY: plain syscall on a descriptor we own; it only
                // starts writeback, and failure is harmless.
                unsafe {
                    libc::sync_file_range(f.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
                }
            }
        }
        Ok(())
    }

    /// Completes (or undoes) a move under the lock.
    fn finish_move(&self, mv: &Move, res: Result<PathBuf, MoveError>) {
        let mut idx = self.lock();
        let current = idx.pages.get(&mv.key).copied();
        let Some(m) = current.filter(|m| m.moving == Some(mv.to) && m.crc == mv.crc) else {
            // Freed or replaced while it moved; its reservation was released.
            drop(idx);
            if let Ok(tmp) = res {
                let _ = std::fs::remove_file(tmp);
            }
            return;
        };
        let (t, d) = mv.to;
        {
            let dir = &mut idx.tiers[t as usize].dirs[d as usize];
            dir.reserved = dir.reserved.saturating_sub(m.size);
        }
        let landed = match res {
            Ok(tmp) => {
                let dest = self.path_at(&mv.key, t, d, m.crc, m.flags);
                match std::fs::rename(&tmp, &dest) {
                    Ok(()) => Ok(()),
                    Err(e) => {
                        let _ = std::fs::remove_file(&tmp);
                        Err(MoveError::Io(e))
                    }
                }
            }
            Err(e) => Err(e),
        };
        match landed {
            Ok(()) => {
                let moved = Meta {
                    tier: t,
                    dir: d,
                    moving: None,
                    verified: true,
                    hits: 0,
                    ..m
                };
                self.attach(&mut idx, mv.key, moved);
                let from_tier = m.tier as usize;
                let c = &self.inner.tier_counters;
                match mv.kind {
                    MoveKind::Demote => {
                        c[from_tier].demotions.fetch_add(1, Ordering::Relaxed);
                    }
                    MoveKind::Spill => {
                        c[from_tier].demotions.fetch_add(1, Ordering::Relaxed);
                        c[from_tier].spills.fetch_add(1, Ordering::Relaxed);
                    }
                    MoveKind::Promote => {
                        c[t as usize].promotions.fetch_add(1, Ordering::Relaxed);
                    }
                }
                drop(idx);
                let _ = std::fs::remove_file(&mv.from);
            }
            Err(MoveError::Io(e)) if m.pinned() => {
                // Pinned data stays where it is rather than being lost.
                tracing::warn!(error = %e, page = ?mv.key, "pinned page could not move; kept in place");
                let back = Meta { moving: None, ..m };
                self.attach(&mut idx, mv.key, back);
            }
            Err(e) => {
                idx.pages.remove(&mv.key);
                if matches!(e, MoveError::Corrupt) {
                    self.inner
                        .stats
                        .corrupt_pages
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(page = ?mv.key, file = %mv.from.display(), "corrupt page dropped");
                } else {
                    self.inner.stats.evictions.fetch_add(1, Ordering::Relaxed);
                }
                drop(idx);
                let _ = std::fs::remove_file(&mv.from);
            }
        }
    }

    /// Counts a user read in flight until the guard drops.
    pub fn io_guard(&self) -> IoGuard {
        self.inner.inflight.fetch_add(1, Ordering::Relaxed);
        IoGuard(self.inner.clone())
    }

    pub fn stats(&self) -> &StoreStats {
        &self.inner.stats
    }

    /// The first tier's first directory (where the worker keeps its id).
    pub fn home(&self) -> &Path {
        &self.inner.settings.home
    }

    pub fn usage(&self) -> Usage {
        let i = self.lock();
        let mut u = Usage {
            pages: i.pages.len() as u64,
            ..Usage::default()
        };
        for t in &i.tiers {
            u.pinned += t.pinned;
            for d in &t.dirs {
                u.capacity += d.capacity;
                u.used += d.used;
            }
        }
        u
    }

    /// Per-tier figures for the heartbeat and `strata admin report`.
    pub fn tier_stats(&self) -> Vec<pb::TierStats> {
        let i = self.lock();
        i.tiers
            .iter()
            .zip(&self.inner.tiers)
            .zip(&self.inner.tier_counters)
            .map(|((ti, info), c)| pb::TierStats {
                medium: info.medium.name().into(),
                policy: info.policy.name().into(),
                capacity_bytes: ti.dirs.iter().map(|d| d.capacity).sum(),
                used_bytes: ti.dirs.iter().map(|d| d.used).sum(),
                pages: ti.pages,
                hits: c.hits.load(Ordering::Relaxed),
                misses: c.misses.load(Ordering::Relaxed),
                evictions: c.evictions.load(Ordering::Relaxed),
                promotions: c.promotions.load(Ordering::Relaxed),
                demotions: c.demotions.load(Ordering::Relaxed),
                spills: c.spills.load(Ordering::Relaxed),
                pinned_bytes: ti.pinned,
            })
            .collect()
    }

    pub fn priority_stats(&self) -> Vec<pb::PriorityStats> {
        self.inner
            .priorities
            .iter()
            .enumerate()
            .map(|(p, c)| pb::PriorityStats {
                priority: p as u32,
                mem_bytes: c.mem_bytes.load(Ordering::Relaxed),
                disk_bytes: c.disk_bytes.load(Ordering::Relaxed),
            })
            .collect()
    }

    pub fn pinned_files(&self) -> u64 {
        self.lock().pinned_ids.len() as u64
    }

    pub fn has_mem_tier(&self) -> bool {
        self.inner.tiers.iter().any(|t| t.medium == Medium::Mem)
    }

    pub fn memory_pressure(&self) -> bool {
        self.inner.pressure.load(Ordering::Relaxed)
    }

    pub fn set_memory(&self, available: u64, pressure: bool) {
        self.inner.mem_available.store(available, Ordering::Relaxed);
        self.inner.pressure.store(pressure, Ordering::Relaxed);
    }

    pub fn memory_available(&self) -> u64 {
        self.inner.mem_available.load(Ordering::Relaxed)
    }

    /// User reads in flight right now.
    pub fn busy(&self) -> usize {
        self.inner.inflight.load(Ordering::Relaxed)
    }

    /// The queue of pages to promote; the first caller gets it.
    pub fn take_promotion_queue(&self) -> Option<tokio::sync::mpsc::Receiver<PageKey>> {
        self.inner
            .promote_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// Where a page lives now: (tier index, medium), or `None`.
    pub fn location(&self, k: &PageKey) -> Option<(usize, Medium)> {
        let i = self.lock();
        i.pages
            .get(k)
            .map(|m| (m.tier as usize, self.inner.tiers[m.tier as usize].medium))
    }

    /// Records a lookup: tier counters, policy, promotion. Returns the path,
    /// the size, the crc and whether the file was already verified.
    fn lookup(&self, k: &PageKey) -> Option<(PathBuf, u64, u32, bool)> {
        let mut idx = self.lock();
        let promote_after = self.inner.settings.promote_after_hits;
        let c = &self.inner.tier_counters;
        let Some(m) = idx.pages.get_mut(k) else {
            for tc in c {
                tc.misses.fetch_add(1, Ordering::Relaxed);
            }
            return None;
        };
        m.hits = m.hits.saturating_add(1);
        let want_promotion =
            m.tier > 0 && promote_after > 0 && m.hits >= promote_after && m.moving.is_none();
        if want_promotion {
            m.hits = 0;
        }
        let m = *m;
        c[m.tier as usize].hits.fetch_add(1, Ordering::Relaxed);
        for tc in &c[..m.tier as usize] {
            tc.misses.fetch_add(1, Ordering::Relaxed);
        }
        if m.moving.is_none() && !m.pinned() {
            idx.tiers[m.tier as usize].policy.access(k);
        }
        drop(idx);
        if want_promotion {
            let _ = self.inner.promote_tx.try_send(*k);
        }
        Some((self.path_of(k, &m), m.size, m.crc, m.verified))
    }

    /// The file of a cached page a client on this host may read directly:
    /// only pages whose bytes were checked (or written by this process) and
    /// that are not moving. Counts as a hit.
    pub fn local_path(&self, k: &PageKey) -> Option<PathBuf> {
        let mut idx = self.lock();
        let m = *idx.pages.get(k)?;
        if m.moving.is_some() || !m.verified {
            return None;
        }
        if !m.pinned() {
            idx.tiers[m.tier as usize].policy.access(k);
        }
        self.inner.tier_counters[m.tier as usize]
            .hits
            .fetch_add(1, Ordering::Relaxed);
        self.inner.stats.hits.fetch_add(1, Ordering::Relaxed);
        Some(self.path_of(k, &m))
    }

    /// Drops a page whose file failed its checksum.
    fn drop_corrupt(&self, k: &PageKey, crc: u32) {
        let path = {
            let mut idx = self.lock();
            match idx.pages.get(k) {
                Some(m) if m.crc == crc => self.remove(&mut idx, k),
                _ => None,
            }
        };
        if let Some(p) = path {
            self.inner
                .stats
                .corrupt_pages
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(page = ?k, file = %p.display(), "corrupt page dropped; it will be refetched");
            let _ = std::fs::remove_file(p);
        }
    }

    fn mark_verified(&self, k: &PageKey, crc: u32) {
        if let Some(m) = self.lock().pages.get_mut(k)
            && m.crc == crc
        {
            m.verified = true;
        }
    }

    /// Opens a cached page for zero-copy sending, with its length; `None` on
    /// a miss. A page not yet verified since start-up is read and checked
    /// against its crc32c first; a corrupt one is dropped and reported as a
    /// miss, so the caller refetches it.
    pub async fn open_page(&self, k: &PageKey) -> Option<(std::fs::File, u64)> {
        for attempt in 0..2 {
            let Some((path, size, crc, verified)) = self.lookup(k) else {
                self.inner.stats.misses.fetch_add(1, Ordering::Relaxed);
                return None;
            };
            // A verified page needs an open and an fstat, cheap enough to do
            // here; checking a page's crc reads it whole, off the runtime.
            let opened = if verified {
                open_checked(&path, size, crc, verified)
            } else {
                tokio::task::spawn_blocking(move || open_checked(&path, size, crc, verified))
                    .await
                    .unwrap_or_else(|e| Err(OpenError::Io(std::io::Error::other(e.to_string()))))
            };
            match opened {
                Ok((f, len, checked)) => {
                    if checked {
                        self.mark_verified(k, crc);
                    }
                    self.inner.stats.hits.fetch_add(1, Ordering::Relaxed);
                    return Some((f, len));
                }
                Err(OpenError::Corrupt) => {
                    self.drop_corrupt(k, crc);
                    break;
                }
                // Moved to another tier between lookup and open: look again.
                Err(OpenError::Io(e)) if e.kind() == ErrorKind::NotFound && attempt == 0 => {}
                Err(OpenError::Io(_)) => {
                    // The file vanished (deleted by hand, disk trouble): forget it.
                    let p = {
                        let mut idx = self.lock();
                        match idx.pages.get(k) {
                            Some(m) if m.crc == crc && m.moving.is_none() => {
                                self.remove(&mut idx, k)
                            }
                            _ => None,
                        }
                    };
                    drop(p);
                    break;
                }
            }
        }
        self.inner.stats.misses.fetch_add(1, Ordering::Relaxed);
        None
    }

    /// Reads a cached page, or `None` on a miss.
    pub async fn get(&self, k: &PageKey) -> Option<Bytes> {
        let (f, len) = self.open_page(k).await?;
        tokio::task::spawn_blocking(move || {
            let mut buf = Vec::with_capacity(len as usize);
            let mut f = f;
            f.read_to_end(&mut buf).ok().map(|_| Bytes::from(buf))
        })
        .await
        .ok()
        .flatten()
    }

    pub fn contains(&self, k: &PageKey) -> bool {
        self.lock().pages.contains_key(k)
    }

    /// Stores a page in the fastest tier that may take it.
    pub async fn put(&self, k: PageKey, data: Bytes, opts: PutOpts) -> Result<(), StoreError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.put_blocking(k, data, opts))
            .await
            .unwrap_or_else(|e| {
                Err(StoreError::Io {
                    dir: "(page store)".into(),
                    op: "write",
                    err: std::io::Error::other(e.to_string()),
                })
            })
    }

    fn all_dirs(&self) -> String {
        self.inner
            .tiers
            .iter()
            .flat_map(|t| t.dirs.iter().map(|d| d.display().to_string()))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn put_blocking(&self, k: PageKey, data: Bytes, opts: PutOpts) -> Result<(), StoreError> {
        let size = data.len() as u64;
        let crc = crc32c::crc32c(&data);
        let settings = &self.inner.settings;
        let mut plan = Plan::default();
        let (tier, dir, flags) = {
            let mut idx = self.lock();
            let mut flags = if opts.sole { FLAG_SOLE } else { 0 };
            if idx.pinned_ids.contains(&k.cache_id) {
                flags |= FLAG_USER_PIN;
            }
            if let Some(m) = idx.pages.get(&k)
                && m.crc == crc
                && (m.flags & flags) == flags
            {
                return Ok(());
            }
            let budget_ok = match opts.priority {
                Some(p) => {
                    let budget = settings.priority_mem_base
                        + u64::from(p.min(8)) * settings.priority_mem_step;
                    idx.mem_by_id.get(&k.cache_id).copied().unwrap_or(0) + size <= budget
                }
                None => true,
            };
            let pressure = self.memory_pressure();
            let mut target = None;
            for t in 0..idx.tiers.len() {
                if self.is_mem(t as u8) && (pressure || !budget_ok) {
                    continue;
                }
                if let Some(d) = self.make_room(&mut idx, t, size, &mut plan) {
                    target = Some((t as u8, d));
                    break;
                }
            }
            let Some((t, d)) = target else {
                drop(idx);
                self.execute(plan);
                return Err(StoreError::Full {
                    dirs: self.all_dirs(),
                    need: size,
                });
            };
            (t, d, flags)
        };
        self.execute(plan);
        let path = self.path_at(&k, tier, dir, crc, flags);
        let tmp = path.with_extension(format!("tmp{}", rand::random::<u32>()));
        let written = tmp
            .parent()
            .map(std::fs::create_dir_all)
            .unwrap_or(Ok(()))
            .and_then(|_| self.write_file(&tmp, &data, tier))
            .and_then(|_| std::fs::rename(&tmp, &path));
        let mut idx = self.lock();
        {
            let d = &mut idx.tiers[tier as usize].dirs[dir as usize];
            d.reserved = d.reserved.saturating_sub(size);
        }
        if let Err(err) = written {
            drop(idx);
            let _ = std::fs::remove_file(&tmp);
            let dir_path = self.inner.tiers[tier as usize].dirs[dir as usize]
                .display()
                .to_string();
            return Err(if is_full(&err) {
                StoreError::Full {
                    dirs: dir_path,
                    need: size,
                }
            } else {
                StoreError::Io {
                    dir: dir_path,
                    op: "write",
                    err,
                }
            });
        }
        let old = idx
            .pages
            .contains_key(&k)
            .then(|| self.remove(&mut idx, &k))
            .flatten()
            .filter(|p| *p != path);
        let meta = Meta {
            size,
            crc,
            flags,
            tier,
            dir,
            moving: None,
            verified: true,
            hits: 0,
            cached_at: now_secs(),
        };
        self.attach(&mut idx, k, meta);
        drop(idx);
        if let Some(p) = opts.priority {
            let c = &self.inner.priorities[p.min(8) as usize];
            if self.is_mem(tier) {
                c.mem_bytes.fetch_add(size, Ordering::Relaxed);
            } else {
                c.disk_bytes.fetch_add(size, Ordering::Relaxed);
            }
        }
        if let Some(p) = old {
            let _ = std::fs::remove_file(p);
        }
        Ok(())
    }

    /// Moves a page one tier up (the promotion task calls this).
    pub fn promote(&self, k: &PageKey) {
        let mut plan = Plan::default();
        {
            let mut idx = self.lock();
            let Some(m) = idx.pages.get(k).copied() else {
                return;
            };
            if m.tier == 0 || m.moving.is_some() {
                return;
            }
            let up = m.tier as usize - 1;
            if self.is_mem(up as u8) && self.memory_pressure() {
                return;
            }
            self.detach(&mut idx, k, &m);
            match self.make_room(&mut idx, up, m.size, &mut plan) {
                Some(d) => {
                    if let Some(e) = idx.pages.get_mut(k) {
                        e.moving = Some((up as u8, d));
                    }
                    // Victims demoted from `up` go first, then this page.
                    plan.moves.push(Move {
                        key: *k,
                        from: self.path_of(k, &m),
                        to: (up as u8, d),
                        size: m.size,
                        crc: m.crc,
                        kind: MoveKind::Promote,
                    });
                }
                None => self.attach(&mut idx, *k, m),
            }
        }
        self.execute(plan);
    }

    /// Moves up to `want` bytes of MEM pages to the next tier (policy
    /// victims first, then pinned pages); returns the bytes moved.
    pub fn spill(&self, want: u64) -> u64 {
        let mut plan = Plan::default();
        let mut moved = 0;
        {
            let mut idx = self.lock();
            for t in 0..idx.tiers.len() {
                if !self.is_mem(t as u8) {
                    continue;
                }
                let has_below = t + 1 < idx.tiers.len();
                while moved < want {
                    let victim = match idx.tiers[t].policy.evict() {
                        Some(v) => Some(v),
                        None => idx
                            .pages
                            .iter()
                            .find(|(_, m)| m.tier as usize == t && m.moving.is_none())
                            .map(|(k, _)| *k),
                    };
                    let Some(victim) = victim else { break };
                    let Some(m) = idx.pages.get(&victim).copied() else {
                        continue;
                    };
                    self.detach(&mut idx, &victim, &m);
                    let from = self.path_of(&victim, &m);
                    let below = if has_below {
                        self.make_room(&mut idx, t + 1, m.size, &mut plan)
                    } else {
                        None
                    };
                    match below {
                        Some(d2) => {
                            if let Some(e) = idx.pages.get_mut(&victim) {
                                e.moving = Some(((t + 1) as u8, d2));
                            }
                            plan.moves.push(Move {
                                key: victim,
                                from,
                                to: ((t + 1) as u8, d2),
                                size: m.size,
                                crc: m.crc,
                                kind: MoveKind::Spill,
                            });
                        }
                        None if !m.pinned() => {
                            idx.pages.remove(&victim);
                            plan.drops.push(from);
                            self.inner.tier_counters[t]
                                .spills
                                .fetch_add(1, Ordering::Relaxed);
                            self.inner.stats.evictions.fetch_add(1, Ordering::Relaxed);
                        }
                        None => {
                            // Nowhere to put pinned data: it stays.
                            self.attach(&mut idx, victim, m);
                            break;
                        }
                    }
                    moved += m.size;
                }
            }
        }
        self.execute(plan);
        moved
    }

    /// Drops unpinned pages cached more than `page_ttl_secs` ago; returns
    /// how many.
    pub fn expire(&self) -> u64 {
        let ttl = self.inner.settings.page_ttl_secs;
        if ttl == 0 {
            return 0;
        }
        let now = now_secs();
        let paths: Vec<PathBuf> = {
            let mut idx = self.lock();
            let old: Vec<PageKey> = idx
                .pages
                .iter()
                .filter(|(_, m)| !m.pinned() && m.moving.is_none() && m.cached_at + ttl <= now)
                .map(|(k, _)| *k)
                .collect();
            old.iter()
                .filter_map(|k| self.remove(&mut idx, k))
                .collect()
        };
        for p in &paths {
            let _ = std::fs::remove_file(p);
        }
        let n = paths.len() as u64;
        self.inner
            .stats
            .expired_pages
            .fetch_add(n, Ordering::Relaxed);
        n
    }

    fn keys_of(idx: &Index, id: CacheId) -> Vec<PageKey> {
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
        idx.pages.range(lo..=hi).map(|(k, _)| *k).collect()
    }

    /// Drops one page unless it is pinned (by a user or as the only copy);
    /// returns whether it was dropped.
    pub async fn drop_unpinned(&self, k: &PageKey) -> bool {
        let p = {
            let mut idx = self.lock();
            match idx.pages.get(k) {
                Some(m) if !m.pinned() && !idx.pinned_ids.contains(&k.cache_id) => {
                    self.remove(&mut idx, k)
                }
                _ => None,
            }
        };
        match p {
            Some(p) => {
                let _ = tokio::task::spawn_blocking(move || std::fs::remove_file(p)).await;
                true
            }
            None => false,
        }
    }

    /// Drops one page.
    pub async fn free_page(&self, k: &PageKey) {
        let p = {
            let mut idx = self.lock();
            self.remove(&mut idx, k)
        };
        if let Some(p) = p {
            let _ = tokio::task::spawn_blocking(move || std::fs::remove_file(p)).await;
        }
    }

    /// Drops every page of `id` (pinned or not) and its pin; returns how many.
    pub async fn free(&self, id: CacheId) -> u64 {
        let (paths, unpinned) = {
            let mut idx = self.lock();
            let unpinned = idx.pinned_ids.remove(&id);
            let keys = Self::keys_of(&idx, id);
            let paths: Vec<PathBuf> = keys
                .iter()
                .filter_map(|k| self.remove(&mut idx, k))
                .collect();
            (paths, unpinned.then(|| idx.pinned_ids.clone()))
        };
        let n = paths.len() as u64;
        let home = self.inner.settings.home.clone();
        let _ = tokio::task::spawn_blocking(move || {
            for p in paths {
                let _ = std::fs::remove_file(p);
            }
            if let Some(ids) = unpinned {
                let _ = save_pinned_ids(&home, &ids);
            }
        })
        .await;
        n
    }

    /// Pins or unpins every page of `id`, now and later; returns the pages
    /// changed.
    pub async fn pin(&self, id: CacheId, pinned: bool) -> Result<u64, StoreError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.pin_blocking(id, pinned))
            .await
            .unwrap_or_else(|e| {
                Err(StoreError::Io {
                    dir: "(page store)".into(),
                    op: "pin",
                    err: std::io::Error::other(e.to_string()),
                })
            })
    }

    fn pin_blocking(&self, id: CacheId, pinned: bool) -> Result<u64, StoreError> {
        let mut idx = self.lock();
        let changed_set = if pinned {
            idx.pinned_ids.insert(id)
        } else {
            idx.pinned_ids.remove(&id)
        };
        if changed_set {
            save_pinned_ids(&self.inner.settings.home, &idx.pinned_ids).map_err(|err| {
                StoreError::Io {
                    dir: self.inner.settings.home.display().to_string(),
                    op: "save pinned ids",
                    err,
                }
            })?;
        }
        Ok(self.retag(&mut idx, id, |f| {
            if pinned {
                f | FLAG_USER_PIN
            } else {
                f & !FLAG_USER_PIN
            }
        }))
    }

    /// The bytes of `id` reached the UFS: its pages are no longer the only
    /// copy and may be evicted (user pins stay); returns the pages changed.
    pub async fn release_sole(&self, id: CacheId) -> u64 {
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut idx = me.lock();
            me.retag(&mut idx, id, |f| f & !FLAG_SOLE)
        })
        .await
        .unwrap_or(0)
    }

    /// Changes the flags of every page of `id` (kept in the page file
    /// names); returns the pages changed.
    fn retag(&self, idx: &mut Index, id: CacheId, change: impl Fn(u8) -> u8) -> u64 {
        let mut n = 0;
        for k in Self::keys_of(idx, id) {
            let Some(m) = idx.pages.get(&k).copied() else {
                continue;
            };
            let flags = change(m.flags);
            if flags == m.flags {
                continue;
            }
            if m.moving.is_some() {
                // The mover names the file after the flags it finds at the end.
                if let Some(e) = idx.pages.get_mut(&k) {
                    e.flags = flags;
                }
                n += 1;
                continue;
            }
            let from = self.path_of(&k, &m);
            let new = Meta { flags, ..m };
            if std::fs::rename(&from, self.path_of(&k, &new)).is_err() {
                continue;
            }
            self.detach(idx, &k, &m);
            self.attach(idx, k, new);
            n += 1;
        }
        n
    }

    /// Moves every page of `from` to `to`, dropping the MUST_CACHE flag (a
    /// CACHE_THROUGH write learns its final identity only once the UFS
    /// returns the fingerprint).
    pub async fn rekey(&self, from: CacheId, to: CacheId) -> u64 {
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut idx = me.lock();
            let pin_to = idx.pinned_ids.contains(&to);
            let mut moved = 0;
            for k in Self::keys_of(&idx, from) {
                let Some(m) = idx.pages.get(&k).copied() else {
                    continue;
                };
                let Some(old_path) = me.remove(&mut idx, &k) else {
                    continue;
                };
                if m.moving.is_some() {
                    continue;
                }
                let nk = PageKey { cache_id: to, ..k };
                let new = Meta {
                    flags: if pin_to { FLAG_USER_PIN } else { 0 },
                    ..m
                };
                let np = me.path_of(&nk, &new);
                let ok = np
                    .parent()
                    .map(std::fs::create_dir_all)
                    .unwrap_or(Ok(()))
                    .and_then(|_| std::fs::rename(&old_path, &np));
                if ok.is_ok() {
                    if let Some(prev) = idx
                        .pages
                        .contains_key(&nk)
                        .then(|| me.remove(&mut idx, &nk))
                        .flatten()
                        && prev != np
                    {
                        let _ = std::fs::remove_file(prev);
                    }
                    me.attach(&mut idx, nk, new);
                    moved += 1;
                } else {
                    let _ = std::fs::remove_file(&old_path);
                }
            }
            moved
        })
        .await
        .unwrap_or(0)
    }
}

enum OpenError {
    Corrupt,
    Io(std::io::Error),
}

/// Opens a page file; unless already verified, reads it whole and checks its
/// length and crc32c. Returns the file, its length and whether it was checked.
fn open_checked(
    path: &Path,
    size: u64,
    crc: u32,
    verified: bool,
) -> Result<(std::fs::File, u64, bool), OpenError> {
    let mut f = std::fs::File::open(path).map_err(OpenError::Io)?;
    let len = f.metadata().map_err(OpenError::Io)?.len();
    if len != size {
        return Err(OpenError::Corrupt);
    }
    if !verified {
        let mut data = Vec::with_capacity(len as usize);
        f.read_to_end(&mut data).map_err(OpenError::Io)?;
        if crc32c::crc32c(&data) != crc {
            return Err(OpenError::Corrupt);
        }
        f.seek(std::io::SeekFrom::Start(0)).map_err(OpenError::Io)?;
    }
    Ok((f, len, !verified))
}

fn is_tmpfs(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct we pass; the path is a
    // valid NUL-terminated string.
    unsafe {
        let mut s: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut s) == 0 && s.f_type == libc::TMPFS_MAGIC
    }
}

const PINNED_IDS_FILE: &str = "pinned-ids";

fn load_pinned_ids(home: &Path) -> BTreeSet<CacheId> {
    std::fs::read_to_string(home.join(PINNED_IDS_FILE))
        .map(|s| {
            s.lines()
                .filter_map(|l| CacheId::from_hex(l.trim()))
                .collect()
        })
        .unwrap_or_default()
}

fn save_pinned_ids(home: &Path, ids: &BTreeSet<CacheId>) -> std::io::Result<()> {
    std::fs::create_dir_all(home)?;
    let text: String = ids.iter().map(|i| format!("{}\n", i.to_hex())).collect();
    let tmp = home.join(format!("{PINNED_IDS_FILE}.tmp"));
    std::fs::write(&tmp, text)?;
    std::fs::rename(tmp, home.join(PINNED_IDS_FILE))
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
    use strata_common::config::ByteSize;

    fn key(id: u128, page: u32) -> PageKey {
        PageKey {
            cache_id: CacheId(id),
            block: 0,
            page,
        }
    }

    fn page(byte: u8) -> Bytes {
        Bytes::from(vec![byte; 1000])
    }

    fn tiered(root: &Path, quotas: &[(Medium, u64)]) -> StoreSettings {
        StoreSettings {
            tiers: quotas
                .iter()
                .enumerate()
                .map(|(i, (m, q))| TierConfig {
                    medium: *m,
                    dirs: vec![root.join(format!("t{i}"))],
                    quota: ByteSize(*q),
                    policy: PolicyKind::Lru,
                })
                .collect(),
            home: root.to_path_buf(),
            promote_after_hits: 2,
            page_ttl_secs: 0,
            priority_mem_base: 2000,
            priority_mem_step: 1000,
        }
    }

    fn tier_of(s: &PageStore, k: &PageKey) -> Option<usize> {
        s.location(k).map(|(t, _)| t)
    }

    #[tokio::test]
    async fn eviction_demotes_through_the_tiers_and_survives_restart() {
        let dir = tempfile::tempdir().unwrap();
        let settings = tiered(
            dir.path(),
            &[
                (Medium::Mem, 2000),
                (Medium::Ssd, 2000),
                (Medium::Hdd, 2000),
            ],
        );
        {
            let s = PageStore::open(settings.clone()).unwrap();
            for p in 0..7u32 {
                s.put(key(1, p), page(p as u8), PutOpts::default())
                    .await
                    .unwrap();
            }
            // Newest in MEM, older ones pushed down a tier at a time, the
            // oldest dropped from the last tier.
            assert_eq!(tier_of(&s, &key(1, 6)), Some(0));
            assert_eq!(tier_of(&s, &key(1, 5)), Some(0));
            assert_eq!(tier_of(&s, &key(1, 4)), Some(1));
            assert_eq!(tier_of(&s, &key(1, 3)), Some(1));
            assert_eq!(tier_of(&s, &key(1, 2)), Some(2));
            assert_eq!(tier_of(&s, &key(1, 1)), Some(2));
            assert_eq!(tier_of(&s, &key(1, 0)), None);
            let ts = s.tier_stats();
            assert_eq!(ts[0].demotions, 5);
            assert_eq!(ts[1].demotions, 3);
            assert_eq!(ts[2].evictions, 1);
            assert_eq!(s.stats().evictions.load(Ordering::Relaxed), 1);
            assert_eq!(s.usage().used, 6000);
        }
        let s = PageStore::open(settings).unwrap();
        assert_eq!(s.usage().pages, 6);
        for p in 1..7u32 {
            let got = s.get(&key(1, p)).await.expect("page after restart");
            assert_eq!(got, page(p as u8));
        }
        assert_eq!(tier_of(&s, &key(1, 2)), Some(2));
        assert_eq!(s.stats().corrupt_pages.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn corrupt_or_torn_pages_are_dropped_never_served() {
        let dir = tempfile::tempdir().unwrap();
        let settings = StoreSettings::single(dir.path(), 10_000);
        let files = {
            let s = PageStore::open(settings.clone()).unwrap();
            s.put(key(1, 0), page(1), PutOpts::default()).await.unwrap();
            s.put(key(1, 1), page(2), PutOpts::default()).await.unwrap();
            s.put(key(1, 2), page(3), PutOpts::default()).await.unwrap();
            let idx = s.lock();
            [0, 1, 2].map(|p| s.path_of(&key(1, p), &idx.pages[&key(1, p)]))
        };
        // A flipped byte (same length) and a torn (short) page.
        let mut b = std::fs::read(&files[0]).unwrap();
        b[500] ^= 0xff;
        std::fs::write(&files[0], b).unwrap();
        std::fs::write(&files[1], vec![2u8; 10]).unwrap();
        let s = PageStore::open(settings).unwrap();
        assert!(s.get(&key(1, 0)).await.is_none());
        assert!(s.get(&key(1, 1)).await.is_none());
        assert_eq!(s.get(&key(1, 2)).await.unwrap(), page(3));
        assert_eq!(s.stats().corrupt_pages.load(Ordering::Relaxed), 2);
        assert!(!s.contains(&key(1, 0)) && !files[0].exists());
        // Refetched bytes are cached again.
        s.put(key(1, 0), page(1), PutOpts::default()).await.unwrap();
        assert_eq!(s.get(&key(1, 0)).await.unwrap(), page(1));
    }

    #[tokio::test]
    async fn pinned_pages_are_never_evicted_and_pins_persist() {
        let dir = tempfile::tempdir().unwrap();
        let settings = StoreSettings::single(dir.path(), 3000);
        {
            let s = PageStore::open(settings.clone()).unwrap();
            let sole = PutOpts {
                sole: true,
                priority: None,
            };
            s.put(key(1, 0), page(1), sole).await.unwrap();
            assert_eq!(s.pin(CacheId(2), true).await.unwrap(), 0);
            s.put(key(2, 0), page(2), PutOpts::default()).await.unwrap();
            for p in 0..5 {
                s.put(key(3, p), page(3), PutOpts::default()).await.unwrap();
            }
            assert!(s.contains(&key(1, 0)) && s.contains(&key(2, 0)));
            assert_eq!(s.usage().pinned, 2000);
            assert_eq!(s.pinned_files(), 1);
        }
        let s = PageStore::open(settings).unwrap();
        assert_eq!(s.usage().pinned, 2000, "pins survive a restart");
        s.put(key(2, 1), page(2), PutOpts::default()).await.unwrap();
        // Everything pinned: a new page finds no room.
        let e = s
            .put(key(4, 0), page(4), PutOpts::default())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("full"), "{e}");
        assert_eq!(s.pin(CacheId(2), false).await.unwrap(), 2);
        s.put(key(4, 0), page(4), PutOpts::default()).await.unwrap();
        assert!(s.contains(&key(1, 0)), "MUST_CACHE data stays");
        assert_eq!(s.get(&key(1, 0)).await.unwrap(), page(1));
    }

    #[tokio::test]
    async fn hot_pages_are_promoted() {
        let dir = tempfile::tempdir().unwrap();
        let s = PageStore::open(tiered(
            dir.path(),
            &[(Medium::Mem, 1000), (Medium::Ssd, 3000)],
        ))
        .unwrap();
        let mut queue = s.take_promotion_queue().unwrap();
        s.put(key(1, 0), page(1), PutOpts::default()).await.unwrap();
        s.put(key(1, 1), page(2), PutOpts::default()).await.unwrap();
        assert_eq!(tier_of(&s, &key(1, 0)), Some(1));
        s.get(&key(1, 0)).await.unwrap();
        assert!(queue.try_recv().is_err(), "one read is not enough");
        s.get(&key(1, 0)).await.unwrap();
        let k = queue.try_recv().unwrap();
        s.promote(&k);
        assert_eq!(tier_of(&s, &key(1, 0)), Some(0));
        assert_eq!(tier_of(&s, &key(1, 1)), Some(1), "swapped down");
        let ts = s.tier_stats();
        assert_eq!(ts[0].promotions, 1);
        assert_eq!(ts[0].hits, 0);
        assert_eq!(ts[1].hits, 2);
        assert_eq!(ts[0].misses, 2);
        assert_eq!(s.get(&key(1, 0)).await.unwrap(), page(1));
        assert_eq!(s.usage().used, 2000);
    }

    #[tokio::test]
    async fn spill_moves_mem_pages_down_and_pressure_skips_mem() {
        let dir = tempfile::tempdir().unwrap();
        let s = PageStore::open(tiered(
            dir.path(),
            &[(Medium::Mem, 4000), (Medium::Ssd, 10_000)],
        ))
        .unwrap();
        let sole = PutOpts {
            sole: true,
            priority: None,
        };
        s.put(key(1, 0), page(1), sole).await.unwrap();
        for p in 1..4 {
            s.put(key(1, p), page(p as u8 + 1), PutOpts::default())
                .await
                .unwrap();
        }
        assert_eq!(s.spill(u64::MAX), 4000);
        for p in 0..4 {
            assert_eq!(tier_of(&s, &key(1, p)), Some(1));
            assert_eq!(s.get(&key(1, p)).await.unwrap(), page(p as u8 + 1));
        }
        let ts = s.tier_stats();
        assert_eq!((ts[0].spills, ts[0].used_bytes), (4, 0));
        assert_eq!(
            ts[1].pinned_bytes, 1000,
            "pinned data spilled, still pinned"
        );
        s.set_memory(0, true);
        s.put(key(2, 0), page(9), PutOpts::default()).await.unwrap();
        assert_eq!(tier_of(&s, &key(2, 0)), Some(1));
        s.set_memory(1 << 30, false);
        s.put(key(2, 1), page(9), PutOpts::default()).await.unwrap();
        assert_eq!(tier_of(&s, &key(2, 1)), Some(0));
    }

    #[tokio::test]
    async fn priority_budgets_cap_mem_per_file() {
        let dir = tempfile::tempdir().unwrap();
        let s = PageStore::open(tiered(
            dir.path(),
            &[(Medium::Mem, 100_000), (Medium::Ssd, 100_000)],
        ))
        .unwrap();
        for (id, prio) in [(1u128, 0u8), (2, 3)] {
            for p in 0..6 {
                let o = PutOpts {
                    sole: false,
                    priority: Some(prio),
                };
                s.put(key(id, p), page(1), o).await.unwrap();
            }
        }
        let in_mem = |id| {
            (0..6)
                .filter(|p| tier_of(&s, &key(id, *p)) == Some(0))
                .count()
        };
        // base 2000 + priority × 1000 bytes of 1000-byte pages.
        assert_eq!(in_mem(1), 2);
        assert_eq!(in_mem(2), 5);
        let ps = s.priority_stats();
        assert_eq!((ps[0].mem_bytes, ps[0].disk_bytes), (2000, 4000));
        assert_eq!((ps[3].mem_bytes, ps[3].disk_bytes), (5000, 1000));
    }

    #[tokio::test]
    async fn ttl_expires_unpinned_pages() {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = StoreSettings::single(dir.path(), 10_000);
        settings.page_ttl_secs = 1;
        let s = PageStore::open(settings).unwrap();
        s.put(key(1, 0), page(1), PutOpts::default()).await.unwrap();
        let sole = PutOpts {
            sole: true,
            priority: None,
        };
        s.put(key(2, 0), page(2), sole).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
        assert_eq!(s.expire(), 1);
        assert!(!s.contains(&key(1, 0)));
        assert!(s.contains(&key(2, 0)));
        assert_eq!(s.stats().expired_pages.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn rekey_and_free() {
        let dir = tempfile::tempdir().unwrap();
        let s = PageStore::open(StoreSettings::single(dir.path(), 10_000)).unwrap();
        s.put(key(1, 0), page(1), PutOpts::default()).await.unwrap();
        s.put(key(1, 1), page(2), PutOpts::default()).await.unwrap();
        assert_eq!(s.rekey(CacheId(1), CacheId(9)).await, 2);
        assert_eq!(s.get(&key(9, 1)).await.unwrap(), page(2));
        assert!(!s.contains(&key(1, 0)));
        assert_eq!(s.free(CacheId(9)).await, 2);
        assert_eq!(s.usage().used, 0);
    }
}
