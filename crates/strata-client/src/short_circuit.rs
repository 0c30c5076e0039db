//! Short-circuit reads: a client on the same host as a page's worker reads
//! the cached page file directly instead of over TCP. The worker says which
//! files hold verified pages (`Locate`); open files are kept (a few
//! thousand) and dropped once the worker has deleted them (evicted or
//! moved), after which the page is located again or read over the network.
//!
//! A page file's bytes never change under its name (the name carries the
//! page's checksum and the key carries the object's fingerprint), so a read
//! from a file the worker has just unlinked still returns the right bytes;
//! the link count is checked (on every read of a page or more, at most once
//! per [`RECHECK`] for smaller ones) only so that kept descriptors do not
//! pin disk space the worker freed.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use strata_common::ids::PageKey;

/// Open page files kept per client (1 MiB pages: a 4 GiB working set).
const MAX_OPEN: usize = 4096;
/// How often a kept file's link count is checked.
const RECHECK: Duration = Duration::from_secs(1);

/// An open page file and, once a streaming read asked for one, a mapping
/// of all of it that later streams reuse (mapping a 1 MiB page file and
/// unmapping it again took 29 % of a gateway's CPU while it streamed a
/// warm object). Dropped with the last reference: when the file leaves
/// the open-file table and no frame over the mapping is left.
pub(crate) struct PageFile {
    file: std::fs::File,
    map: Mutex<Option<Arc<Mapping>>>,
}

impl PageFile {
    pub(crate) fn new(file: std::fs::File) -> PageFile {
        PageFile {
            file,
            map: Mutex::new(None),
        }
    }
}

impl std::ops::Deref for PageFile {
    type Target = std::fs::File;
    fn deref(&self) -> &std::fs::File {
        &self.file
    }
}

struct OpenPage {
    file: Arc<PageFile>,
    /// Milliseconds since `ShortCircuit::epoch` of the last link-count check.
    checked_ms: AtomicU64,
}

pub(crate) struct ShortCircuit {
    files: Mutex<HashMap<PageKey, Arc<OpenPage>>>,
    epoch: Instant,
}

impl Default for ShortCircuit {
    fn default() -> Self {
        ShortCircuit {
            files: Mutex::new(HashMap::new()),
            epoch: Instant::now(),
        }
    }
}

/// True if a worker at `addr` runs on this host (loopback address).
pub(crate) fn is_local(addr: &str) -> bool {
    addr.parse::<SocketAddr>()
        .map(|a| match a.ip() {
            IpAddr::V4(v) => v.is_loopback(),
            IpAddr::V6(v) => v.is_loopback(),
        })
        .unwrap_or(false)
}

impl ShortCircuit {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PageKey, Arc<OpenPage>>> {
        self.files.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// An open, still-linked file for the page, if known. With `recheck`
    /// (large reads, where an fstat costs nothing in comparison) the link
    /// count is checked now; otherwise at most once per [`RECHECK`].
    pub(crate) fn get(&self, k: &PageKey, recheck: bool) -> Option<Arc<PageFile>> {
        let p = self.lock().get(k).cloned()?;
        let now = self.now_ms();
        if recheck
            || now.saturating_sub(p.checked_ms.load(Ordering::Relaxed))
                >= RECHECK.as_millis() as u64
        {
            // Deleted by the worker (evicted, moved to another tier): its
            // bytes are still right, but keeping it would pin freed space.
            if p.file.metadata().map(|m| m.nlink() == 0).unwrap_or(true) {
                self.lock().remove(k);
                return None;
            }
            p.checked_ms.store(now, Ordering::Relaxed);
        }
        Some(p.file.clone())
    }

    pub(crate) fn insert(&self, k: PageKey, path: &str) -> Option<Arc<PageFile>> {
        let file = std::fs::File::open(path).ok()?;
        // Each page file is read in place: no kernel read-ahead (a 4 KiB
        // read of a page on disk would otherwise pull in much more).
        // SAFETY: an advisory call on a descriptor we own; errors are harmless.
        unsafe {
            libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM);
        }
        let file = Arc::new(PageFile::new(file));
        let page = Arc::new(OpenPage {
            file: file.clone(),
            checked_ms: AtomicU64::new(self.now_ms()),
        });
        let mut m = self.lock();
        if m.len() >= MAX_OPEN {
            // Drop an arbitrary eighth (hash order) rather than everything.
            let victims: Vec<PageKey> = m.keys().take(MAX_OPEN / 8).copied().collect();
            for v in victims {
                m.remove(&v);
            }
        }
        m.insert(k, page);
        Some(file)
    }
}

/// A page file, the offset in it and the bytes to read there.
pub(crate) type Part = (Arc<PageFile>, u64, u64);

/// Reads of at least this many bytes (over more than one page file) that
/// must wait for the disk are spread over [`READERS`] threads: one page
/// file at a time reads about 450-550 MiB/s from a disk whose page cache
/// was dropped, four at once 1.6-2.4 GiB/s (docs/benchmarks.md,
/// "Out-of-order requests and page files read in parallel").
const PARALLEL_MIN: u64 = 2 << 20;
/// Threads reading page files of one read at once (the calling thread is
/// one of them).
const READERS: usize = 4;

type Uninit = std::mem::MaybeUninit<u8>;

/// Reads spread over several threads so far (tests check that they were).
#[cfg(test)]
static PARALLEL_READS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Where one page file's bytes go: the file, the offset in it, the
/// destination (its length is what is left to read).
type Place<'a> = (&'a std::fs::File, u64, &'a mut [Uninit]);

/// How far a read that must not wait got.
enum NoWait {
    /// All of it was in memory.
    Done,
    /// This many bytes were; the rest must come from the disk.
    Cold(usize),
    /// The file system cannot tell (tmpfs, a MEM tier: memory anyway).
    Unsupported,
}

/// preadv2 of `dst.len()` bytes at `at` (with no `flags`, a plain read).
fn pread_raw(f: &std::fs::File, at: u64, dst: &mut [Uninit], flags: libc::c_int) -> isize {
    let iov = libc::iovec {
        iov_base: dst.as_mut_ptr().cast(),
        iov_len: dst.len(),
    };
    // SAFETY: one iovec over `dst`, `dst.len()` writable bytes; the kernel
    // writes at most that many and returns how many.
    unsafe { libc::preadv2(f.as_raw_fd(), &iov, 1, at as libc::off_t, flags) }
}

/// Reads all of `dst` at `at` of `f`, waiting for the disk as needed.
fn pread_all(f: &std::fs::File, at: u64, dst: &mut [Uninit]) -> Option<()> {
    let mut done = 0usize;
    while done < dst.len() {
        let n = pread_raw(f, at + done as u64, &mut dst[done..], 0);
        if n <= 0 {
            return None;
        }
        done += n as usize;
    }
    Some(())
}

/// Direct reads need the file offset, the buffer and the length aligned to
/// the file system's block (4 KiB here and on every common disk).
const DIRECT_ALIGN: usize = 4096;
/// Direct reads are for large parts only: a small read would pay an
/// `open` more than it saves.
const DIRECT_MIN: usize = 256 << 10;

/// Reads all of `dst` at `at` of `f`, which is not in memory, as part of
/// a large read (a sequential reader's window): with `O_DIRECT` where the
/// offset, the buffer and the length allow, so the disk writes straight
/// into `dst`. That saves filling the page cache with the page file and
/// copying out of it (four readers: 11-14 % of a CPU busy in the kernel
/// instead of 69-122 %), and the mount does not keep the same bytes twice
/// (its own file's pages hold them). Reads of less than [`PARALLEL_MIN`]
/// never come here: a direct read costs a second `open` of the page file,
/// more than it saves on a small read. Otherwise, or if the direct read
/// fails, a plain read.
fn pread_cold(f: &std::fs::File, at: u64, dst: &mut [Uninit]) -> Option<()> {
    if dst.len() >= DIRECT_MIN
        && at.is_multiple_of(DIRECT_ALIGN as u64)
        && (dst.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN)
        && dst.len().is_multiple_of(DIRECT_ALIGN)
        && let Ok(direct) = open_direct(f)
        && pread_all(&direct, at, dst).is_some()
    {
        return Some(());
    }
    pread_all(f, at, dst)
}

/// A second descriptor of an open file, with `O_DIRECT` (through
/// `/proc/self/fd`, which also reaches a file the worker has unlinked).
fn open_direct(f: &std::fs::File) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(format!("/proc/self/fd/{}", f.as_raw_fd()))
}

/// Reads what of `dst` at `at` is in memory, without waiting for the disk.
fn pread_resident(f: &std::fs::File, at: u64, dst: &mut [Uninit]) -> Option<NoWait> {
    let mut done = 0usize;
    while done < dst.len() {
        let n = pread_raw(f, at + done as u64, &mut dst[done..], libc::RWF_NOWAIT);
        if n > 0 {
            done += n as usize;
            continue;
        }
        if n == 0 {
            return None;
        }
        return match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::EAGAIN) => Some(NoWait::Cold(done)),
            Some(libc::EOPNOTSUPP) if done == 0 => Some(NoWait::Unsupported),
            _ => None,
        };
    }
    Some(NoWait::Done)
}

/// Reads each part into its place in `dst` (exactly their total length);
/// all of it is written when this returns `Some`. What is in memory is
/// copied on this thread; once a page file must be read from the disk,
/// that one and the rest of a large read are read by several threads at
/// once, in file order, directly where they can be ([`pread_cold`]).
fn pread_parts(parts: &[Part], dst: &mut [Uninit]) -> Option<()> {
    let total: u64 = parts.iter().map(|p| p.2).sum();
    if total != dst.len() as u64 {
        return None;
    }
    let mut places: Vec<Place> = Vec::with_capacity(parts.len());
    let mut rest = dst;
    for (f, skip, take) in parts {
        let (here, after) = rest.split_at_mut(*take as usize);
        places.push((&f.file, *skip, here));
        rest = after;
    }
    let mut places = places.into_iter();
    let mut cold: Vec<Place> = Vec::new();
    for (f, at, d) in places.by_ref() {
        match pread_resident(f, at, d)? {
            NoWait::Done => {}
            NoWait::Cold(n) => {
                cold.push((f, at + n as u64, &mut d[n..]));
                break;
            }
            NoWait::Unsupported => {
                pread_all(f, at, d)?;
                return places.try_for_each(|(f, at, d)| pread_all(f, at, d));
            }
        }
    }
    cold.extend(places);
    let left: usize = cold.iter().map(|p| p.2.len()).sum();
    if (left as u64) < PARALLEL_MIN || cold.len() < 2 {
        return cold
            .into_iter()
            .try_for_each(|(f, at, d)| pread_all(f, at, d));
    }
    let threads = READERS.min(cold.len());
    let queue = Mutex::new(cold.into_iter());
    let failed = std::sync::atomic::AtomicBool::new(false);
    let work = || {
        while !failed.load(Ordering::Relaxed) {
            let Some((f, at, d)) = queue.lock().unwrap_or_else(|e| e.into_inner()).next() else {
                return;
            };
            if pread_cold(f, at, d).is_none() {
                failed.store(true, Ordering::Relaxed);
            }
        }
    };
    #[cfg(test)]
    PARALLEL_READS.fetch_add(1, Ordering::Relaxed);
    std::thread::scope(|s| {
        for _ in 1..threads {
            s.spawn(work);
        }
        work();
    });
    (!failed.load(Ordering::Relaxed)).then_some(())
}

/// Reads each part in order into `dst` (exactly their total length).
pub(crate) fn read_pages_into(parts: &[Part], dst: &mut [u8]) -> Option<()> {
    // SAFETY: the same memory seen as possibly uninitialised; only
    // initialised bytes (from pread) are ever written through it.
    let dst =
        unsafe { std::slice::from_raw_parts_mut(dst.as_mut_ptr().cast::<Uninit>(), dst.len()) };
    pread_parts(parts, dst)
}

/// Reads `take` bytes at `skip` of each page file, in order, into one
/// buffer that is not zeroed first.
pub(crate) fn read_pages(parts: &[Part]) -> Option<Bytes> {
    let total = parts.iter().map(|p| p.2).sum::<u64>() as usize;
    if total as u64 >= PARALLEL_MIN {
        // Aligned, so that pages from the disk can be read directly.
        let mut out = Aligned::new(total)?;
        pread_parts(parts, out.uninit())?;
        return Some(Bytes::from_owner(out));
    }
    let mut out: Vec<u8> = Vec::with_capacity(total);
    pread_parts(parts, &mut out.spare_capacity_mut()[..total])?;
    // SAFETY: pread_parts wrote all `total` bytes.
    unsafe { out.set_len(total) };
    Some(Bytes::from(out))
}

/// A buffer aligned for direct reads; its bytes count as written once
/// handed to `Bytes` (only after `pread_parts` wrote all of them).
struct Aligned {
    ptr: std::ptr::NonNull<u8>,
    layout: std::alloc::Layout,
}

// SAFETY: the buffer is owned by this value alone; shared access only reads.
unsafe impl Send for Aligned {}
// SAFETY: as above.
unsafe impl Sync for Aligned {}

impl Aligned {
    fn new(len: usize) -> Option<Aligned> {
        if len == 0 {
            return None;
        }
        let layout = std::alloc::Layout::from_size_align(len, DIRECT_ALIGN).ok()?;
        // SAFETY: a layout of non-zero size.
        let ptr = std::ptr::NonNull::new(unsafe { std::alloc::alloc(layout) })?;
        Some(Aligned { ptr, layout })
    }

    fn uninit(&mut self) -> &mut [Uninit] {
        // SAFETY: `layout.size()` bytes owned by this value, seen as
        // possibly uninitialised.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().cast(), self.layout.size()) }
    }
}

impl AsRef<[u8]> for Aligned {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: only read after `pread_parts` initialised every byte.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

/// A read-only shared mapping of part of a page file, unmapped when the
/// last `Bytes` over it is dropped. Page files are written under a
/// temporary name and renamed into place, never changed or truncated where
/// they are, so the mapped bytes stay valid (an evicted file is unlinked;
/// its inode lives on while mapped).
struct Mapping {
    ptr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is read-only and owned by this value alone.
unsafe impl Send for Mapping {}
// SAFETY: as above; shared access only reads.
unsafe impl Sync for Mapping {}

impl AsRef<[u8]> for Mapping {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `ptr` maps `len` readable bytes until `drop`.
        unsafe { std::slice::from_raw_parts(self.ptr.cast::<u8>(), self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what mmap returned and asked for.
        unsafe { libc::munmap(self.ptr, self.len) };
        LIVE_MAPS.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Parts at least this long are mapped rather than copied.
const MAP_MIN: u64 = 256 << 10;
/// Most mappings alive at once in the process (each page file part is
/// one; the kernel's default limit is 65 530 per process, which other
/// allocations need too); beyond it parts are copied.
const MAX_MAPS: usize = 4096;
static LIVE_MAPS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Maps `len` bytes of `f` from the page-aligned `start`; `None` unless
/// every page of it is in memory once mapped (a page that would have to
/// be read from disk later could fail there, and a failed read of a
/// mapping kills the process where `pread` returns an error).
fn map_resident(f: &std::fs::File, start: u64, len: usize, page: usize) -> Option<Mapping> {
    let m = map_file(f, start, len)?;
    resident(&m, 0, len, page).then_some(m)
}

/// A read-only mapping of `len` bytes of `f` from the page-aligned
/// `start`, with the pages in memory mapped at once (and the others read);
/// `None` if [`MAX_MAPS`] are alive or `mmap` fails.
fn map_file(f: &std::fs::File, start: u64, len: usize) -> Option<Mapping> {
    if LIVE_MAPS.fetch_add(1, Ordering::Relaxed) >= MAX_MAPS {
        LIVE_MAPS.fetch_sub(1, Ordering::Relaxed);
        return None;
    }
    // SAFETY: a fresh read-only mapping of `len` bytes of an open file
    // at a page-aligned offset; the kernel picks the address.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED | libc::MAP_POPULATE,
            f.as_raw_fd(),
            start as libc::off_t,
        )
    };
    if ptr == libc::MAP_FAILED {
        LIVE_MAPS.fetch_sub(1, Ordering::Relaxed);
        return None;
    }
    Some(Mapping { ptr, len })
}

/// A frame's hold on a page file's kept mapping.
struct Shared(Arc<Mapping>);

impl AsRef<[u8]> for Shared {
    fn as_ref(&self) -> &[u8] {
        (*self.0).as_ref()
    }
}

/// Whether every page of `len` bytes at `at` of a mapping is in memory.
fn resident(m: &Mapping, at: usize, len: usize, page: usize) -> bool {
    let start = at - at % page;
    let span = at + len - start;
    let mut v = vec![0u8; span.div_ceil(page)];
    // SAFETY: `start..start + span` lies inside the mapping (`at + len <=
    // m.len`), page-aligned; `v` has one byte per page of it.
    let r = unsafe { libc::mincore(m.ptr.cast::<u8>().add(start).cast(), span, v.as_mut_ptr()) };
    r == 0 && v.iter().all(|b| b & 1 == 1)
}

/// The parts as frames that borrow the page cache instead of copies of it:
/// a stream that hands its frames to a socket then copies each byte once
/// instead of twice. Each page file is mapped whole once, on first use,
/// and later frames slice that mapping as long as the bytes they cover
/// are in memory; a part whose file cannot be kept mapped gets a mapping
/// of its own. Short parts, and parts not in memory, are read as usual.
/// `None` if any part cannot be read.
pub(crate) fn map_pages(parts: &[Part]) -> Option<Vec<Bytes>> {
    // SAFETY: plain sysconf query.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    let mut out = Vec::with_capacity(parts.len());
    for part in parts {
        let frame = if part.2 >= MAP_MIN {
            map_part(part, page)?
        } else {
            None
        };
        out.push(match frame {
            Some(b) => b,
            None => read_pages(std::slice::from_ref(part))?,
        });
    }
    Some(out)
}

/// A frame over a mapping of `part` (the page file's kept one, else one
/// of its own) if every byte of it is in memory; `Some(None)`: copy it
/// instead; `None`: the file cannot be read.
fn map_part(part: &Part, page: u64) -> Option<Option<Bytes>> {
    let (f, skip, take) = part;
    // A file shorter than expected would fault when read: it is copied
    // (and fails) instead.
    let size = f.metadata().ok()?.len();
    if size < skip + take {
        return Some(None);
    }
    let kept = {
        let mut k = f.map.lock().unwrap_or_else(|p| p.into_inner());
        if k.is_none() {
            *k = map_file(f, 0, size as usize).map(Arc::new);
        }
        k.clone()
    };
    if let Some(m) = kept.filter(|m| skip + take <= m.len as u64) {
        return Some(
            resident(&m, *skip as usize, *take as usize, page as usize).then(|| {
                Bytes::from_owner(Shared(m)).slice(*skip as usize..(skip + take) as usize)
            }),
        );
    }
    let start = skip - skip % page;
    Some(
        map_resident(f, start, (skip + take - start) as usize, page as usize)
            .map(|m| Bytes::from_owner(m).slice((skip - start) as usize..)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_files_read_in_parallel_land_in_order() {
        let dir = tempfile::tempdir().unwrap();
        // Five 1 MiB page files of different bytes: reads of 2 MiB and
        // more over several of them go to several threads.
        let pages: Vec<(Vec<u8>, Arc<PageFile>)> = (0..5u32)
            .map(|n| {
                let data: Vec<u8> = (0..(1u32 << 20))
                    .map(|i| ((i * 7 + n * 13) % 251) as u8)
                    .collect();
                let path = dir.path().join(format!("p{n}"));
                std::fs::write(&path, &data).unwrap();
                (
                    data,
                    Arc::new(PageFile::new(std::fs::File::open(&path).unwrap())),
                )
            })
            .collect();
        let part = |n: usize, skip: u64, take: u64| -> Part { (pages[n].1.clone(), skip, take) };
        let want = |parts: &[Part]| -> Vec<u8> {
            parts
                .iter()
                .flat_map(|(f, skip, take)| {
                    let n = pages.iter().position(|p| Arc::ptr_eq(&p.1, f)).unwrap();
                    pages[n].0[*skip as usize..(*skip + *take) as usize].to_vec()
                })
                .collect()
        };
        for parts in [
            // A window from the middle of one page to the middle of another.
            vec![
                part(0, 4097, (1 << 20) - 4097),
                part(1, 0, 1 << 20),
                part(2, 0, 1 << 20),
                part(3, 0, 123),
            ],
            // All five whole, out of file order (the parts' order rules).
            vec![
                part(4, 0, 1 << 20),
                part(2, 0, 1 << 20),
                part(0, 0, 1 << 20),
                part(3, 0, 1 << 20),
                part(1, 0, 1 << 20),
            ],
            // Small reads stay on the calling thread.
            vec![part(1, 10, 100), part(2, 0, 1000)],
        ] {
            // Cold: the page files' bytes leave the page cache first.
            for (_, f) in &pages {
                f.sync_all().unwrap();
                // SAFETY: advisory call on an open descriptor.
                unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            }
            let cold = matches!(
                pread_resident(&pages[0].1, 0, &mut [Uninit::uninit(); 4096]),
                Some(NoWait::Cold(0))
            );
            let before = PARALLEL_READS.load(Ordering::Relaxed);
            assert_eq!(&read_pages(&parts).unwrap()[..], &want(&parts)[..]);
            let mut dst = vec![0u8; want(&parts).len()];
            read_pages_into(&parts, &mut dst).unwrap();
            assert_eq!(dst, want(&parts));
            // Large reads from the disk (where the file system tells what
            // is in memory, as ext4 and xfs do; tmpfs does not) went to
            // several threads.
            if cold && parts.len() > 2 {
                assert!(PARALLEL_READS.load(Ordering::Relaxed) > before);
            }
        }
        // A part past the end of its file fails the whole read, and a
        // destination of the wrong length is refused.
        let bad = vec![
            part(0, 0, 1 << 20),
            part(1, 1 << 19, 1 << 20),
            part(2, 0, 1 << 20),
        ];
        assert!(read_pages(&bad).is_none());
        assert!(read_pages_into(&bad, &mut vec![0u8; 3 << 20]).is_none());
        assert!(read_pages_into(&[part(0, 0, 1 << 20)], &mut vec![0u8; 1000]).is_none());
    }

    #[test]
    fn mapped_frames_hold_the_same_bytes_as_copies() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
        let path = dir.path().join("p");
        std::fs::write(&path, &data).unwrap();
        let f = Arc::new(PageFile::new(std::fs::File::open(&path).unwrap()));
        // Unaligned and aligned starts, a short part (copied), the whole file.
        let parts: Vec<Part> = vec![
            (f.clone(), 12345, 300 << 10),
            (f.clone(), 4096, 512 << 10),
            (f.clone(), 7, 100),
            (f.clone(), 0, 1 << 20),
        ];
        let frames = map_pages(&parts).unwrap();
        assert_eq!(frames.len(), 4);
        for ((_, skip, take), b) in parts.iter().zip(&frames) {
            assert_eq!(&b[..], &data[*skip as usize..(*skip + *take) as usize]);
        }
        // The three long parts are slices of one mapping of the whole file
        // (the short one a copy), which later reads reuse...
        assert_eq!(LIVE_MAPS.load(Ordering::Relaxed), 1);
        let again = map_pages(&parts[1..2]).unwrap();
        assert_eq!(&again[0][..], &data[4096..4096 + (512 << 10)]);
        assert_eq!(LIVE_MAPS.load(Ordering::Relaxed), 1);
        // ...and that stays readable after the file is unlinked (as an
        // evicted page is).
        std::fs::remove_file(&path).unwrap();
        assert_eq!(&frames[3][..], &data[..]);
        // A part past the end of the file fails instead of faulting.
        assert!(map_pages(&[(f.clone(), 1 << 19, 1 << 20)]).is_none());
        // Unmapped once the file is let go and no frame is left.
        drop((frames, again, parts, f));
        assert_eq!(LIVE_MAPS.load(Ordering::Relaxed), 0);
    }
}
