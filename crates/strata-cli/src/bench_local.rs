//! `strata bench local`: reads of a warm file on this host, next to the
//! same reads of local files measured in the same run.
//!
//! - random positional reads (4 KiB by default) through the SDK, with
//!   short-circuit reads and over TCP, next to `pread` of a local copy;
//! - sequential 1-page reads through the SDK's short-circuit path, next to
//!   `pread` of the worker's own page files (the same bytes, no Strata code).

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use strata_client::{Client, Reader};
use strata_common::Config;
use strata_common::size::{format_size, parse_size};
use tokio::io::AsyncWriteExt;

use crate::bench::Rng;

#[derive(clap::Args)]
pub struct LocalArgs {
    /// A file in the namespace; it is loaded into the cache first.
    #[arg(long)]
    path: String,
    /// Directory for the local copy the SDK is compared with (removed after).
    #[arg(long, default_value = "/tmp")]
    local_dir: PathBuf,
    /// Concurrent readers for the random reads.
    #[arg(long, default_value_t = 8)]
    threads: usize,
    /// Seconds each random-read row runs.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Bytes per random read.
    #[arg(long, default_value = "4KiB")]
    io_size: String,
}

fn row(name: &str, value: f64, unit: &str, base: f64) {
    println!(
        "{name:<52} {value:>12.0} {unit:<6} {:>7.1} %",
        100.0 * value / base
    );
}

pub async fn run(cfg: &Config, a: LocalArgs) -> anyhow::Result<()> {
    let io = parse_size(&a.io_size)?;
    let threads = a.threads.max(1);
    let secs = Duration::from_secs_f64(a.seconds.max(0.1));
    let client = crate::client(cfg)?;
    let r = client.open(&a.path).await?;
    let size = r.len();
    if io == 0 || size < io {
        bail!(
            "{}: {size} bytes is smaller than one {io}-byte read",
            a.path
        );
    }
    eprintln!("loading {} ({}) into the cache", a.path, format_size(size));
    client.load(&a.path, |_| {}).await?;

    let copy = a
        .local_dir
        .join(format!("strata-bench-local-{}.bin", std::process::id()));
    let _cleanup = RemoveOnDrop(copy.clone());
    {
        let mut f = tokio::fs::File::create(&copy)
            .await
            .with_context(|| format!("creating the local copy {}", copy.display()))?;
        let mut s = r.stream(0);
        while let Some(b) = s.next().await {
            f.write_all(&b?).await?;
        }
        f.flush().await?;
    }
    let local = Arc::new(std::fs::File::open(&copy)?);
    // Both sides warm: the copy's pages are in the page cache after a pass.
    let _ = seq_pread(&local, size, 1 << 20, Duration::ZERO)?;

    // Correctness first: the rows below read what the local copy holds.
    let sc_client = client_with(cfg, true)?;
    let tcp_client = client_with(cfg, false)?;
    let sc_reader = sc_client.open(&a.path).await?;
    let tcp_reader = tcp_client.open(&a.path).await?;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for _ in 0..64 {
        let off = rng.offset(size, io);
        let mut want = vec![0u8; io as usize];
        local.read_exact_at(&mut want, off)?;
        for (name, rd) in [("short-circuit", &sc_reader), ("TCP", &tcp_reader)] {
            let got = rd.read_at(off, io).await?;
            if got[..] != want[..] {
                bail!("{name} read at {off} differs from the local copy");
            }
        }
    }

    println!(
        "\nrandom {}-byte reads of {} ({}), {threads} readers, {:.1} s per row",
        io,
        a.path,
        format_size(size),
        secs.as_secs_f64()
    );
    println!("{:<52} {:>12} {:<6} {:>9}", "", "", "", "of pread");
    let base = random_pread(&local, size, io, threads, secs);
    row("pread of a local copy (page cache)", base, "IOPS", base);
    let sc = random_sdk(&sc_reader, size, io, threads, secs).await?;
    row("SDK read_into, short-circuit", sc, "IOPS", base);
    let tcp = random_sdk(&tcp_reader, size, io, threads, secs).await?;
    row("SDK read_into over TCP (loopback)", tcp, "IOPS", base);

    // Sequential page-sized reads: the worker's page files read directly,
    // against the same bytes through the SDK's short-circuit path.
    let page = r.info().page_size.max(4096);
    let files = sc_reader.local_page_files().await?;
    let pages = size.div_ceil(page);
    println!(
        "\nsequential {}-byte reads, one reader ({} of {pages} pages in local page files)",
        page,
        files.len()
    );
    if (files.len() as u64) < pages {
        println!("  not every page is in a local page file; the short-circuit row is skipped");
        return Ok(());
    }
    let opened: Vec<(u64, std::fs::File)> = files
        .iter()
        .map(|(off, p)| Ok((*off, std::fs::File::open(p).with_context(|| p.clone())?)))
        .collect::<anyhow::Result<_>>()?;
    let pread_files = seq_page_files(&opened, size, page, secs)?;
    println!("{:<52} {:>12} {:<6} {:>9}", "", "", "", "of pread");
    row(
        "pread of the worker's page files",
        pread_files / 1048576.0,
        "MiB/s",
        pread_files / 1048576.0,
    );
    let sdk = seq_sdk(&sc_reader, size, page, secs).await?;
    row(
        "SDK read_into, short-circuit",
        sdk / 1048576.0,
        "MiB/s",
        pread_files / 1048576.0,
    );
    let copy_seq = seq_pread(&local, size, page, secs)?;
    row(
        "pread of the local copy (context)",
        copy_seq / 1048576.0,
        "MiB/s",
        pread_files / 1048576.0,
    );
    Ok(())
}

fn client_with(cfg: &Config, short_circuit: bool) -> anyhow::Result<Client> {
    let mut c = cfg.clone();
    c.client.short_circuit = short_circuit;
    crate::client(&c)
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Random `io`-byte preads of `f` by `threads` OS threads for `secs`: IOPS.
fn random_pread(f: &Arc<std::fs::File>, size: u64, io: u64, threads: usize, secs: Duration) -> f64 {
    let ops = AtomicU64::new(0);
    let started = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let (f, ops) = (f.clone(), &ops);
            s.spawn(move || {
                let mut rng = Rng(0x1234_5678 + t as u64 * 7919);
                let mut buf = vec![0u8; io as usize];
                let mut n = 0u64;
                while started.elapsed() < secs {
                    for _ in 0..64 {
                        if f.read_exact_at(&mut buf, rng.offset(size, io)).is_err() {
                            return;
                        }
                        n += 1;
                    }
                }
                ops.fetch_add(n, Ordering::Relaxed);
            });
        }
    });
    ops.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

/// The same through the SDK: `threads` tasks calling `read_at`.
async fn random_sdk(
    r: &Reader,
    size: u64,
    io: u64,
    threads: usize,
    secs: Duration,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut hs = Vec::new();
    for t in 0..threads {
        let r = r.clone();
        hs.push(tokio::spawn(async move {
            let mut rng = Rng(0x1234_5678 + t as u64 * 7919);
            let mut buf = vec![0u8; io as usize];
            let mut n = 0u64;
            while started.elapsed() < secs {
                for _ in 0..64 {
                    let got = r.read_into(rng.offset(size, io), &mut buf).await?;
                    if got as u64 != io {
                        bail!("short read: {got} of {io} bytes");
                    }
                    n += 1;
                }
            }
            anyhow::Ok(n)
        }));
    }
    let mut ops = 0;
    for h in hs {
        ops += h.await??;
    }
    Ok(ops as f64 / started.elapsed().as_secs_f64())
}

/// A page-aligned buffer: the fastest destination for a baseline pread.
struct Aligned {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl Aligned {
    fn new(len: u64) -> Aligned {
        let layout =
            std::alloc::Layout::from_size_align(len.max(1) as usize, 4096).expect("buffer layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        Aligned { ptr, layout }
    }

    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` holds `layout.size()` initialised bytes we own.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

/// Passes over `f` in `chunk`-byte preads into one buffer until `secs`
/// (at least one pass): bytes per second.
fn seq_pread(f: &std::fs::File, size: u64, chunk: u64, secs: Duration) -> anyhow::Result<f64> {
    let mut al = Aligned::new(chunk);
    let buf = al.as_mut();
    let started = Instant::now();
    let mut bytes = 0u64;
    loop {
        let mut off = 0;
        while off < size {
            let n = chunk.min(size - off) as usize;
            f.read_exact_at(&mut buf[..n], off)?;
            off += n as u64;
        }
        bytes += size;
        if started.elapsed() >= secs {
            break;
        }
    }
    Ok(bytes as f64 / started.elapsed().as_secs_f64())
}

/// Passes over the page files in file order, each page read whole.
fn seq_page_files(
    files: &[(u64, std::fs::File)],
    size: u64,
    page: u64,
    secs: Duration,
) -> anyhow::Result<f64> {
    let mut al = Aligned::new(page);
    let buf = al.as_mut();
    let started = Instant::now();
    let mut bytes = 0u64;
    loop {
        for (off, f) in files {
            let n = page.min(size - off) as usize;
            f.read_exact_at(&mut buf[..n], 0)?;
        }
        bytes += size;
        if started.elapsed() >= secs {
            break;
        }
    }
    Ok(bytes as f64 / started.elapsed().as_secs_f64())
}

/// Passes over the file in `chunk`-byte SDK reads into one caller buffer
/// (`read_into`, as a FUSE reply or an application buffer would be).
async fn seq_sdk(r: &Reader, size: u64, chunk: u64, secs: Duration) -> anyhow::Result<f64> {
    let mut al = Aligned::new(chunk);
    let started = Instant::now();
    let mut bytes = 0u64;
    loop {
        let mut off = 0;
        while off < size {
            let n = r.read_into(off, al.as_mut()).await?;
            if n == 0 {
                bail!("empty read at {off}");
            }
            off += n as u64;
        }
        bytes += size;
        if started.elapsed() >= secs {
            break;
        }
    }
    Ok(bytes as f64 / started.elapsed().as_secs_f64())
}
