//! `strata bench streams`: many concurrent read streams of mixed-size files
//! against the workers, at several stream counts with the same total bytes;
//! aggregate throughput, failures and worker memory (RSS) per count.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use futures::StreamExt;
use strata_client::{Client, FileInfo, WriteOptions, WriteType};
use strata_common::Config;
use strata_common::config::ByteSize;
use strata_common::size::{format_size, parse_size};

use crate::bench::Rng;

#[derive(clap::Args)]
pub struct StreamsArgs {
    /// A directory in the namespace whose files are read (all of them are
    /// loaded into the cache first).
    #[arg(long)]
    path: String,
    /// Write a mixed set of files (4 KiB to 64 MiB) of about this total size
    /// into `--path` first, e.g. `1GiB`. They are kept for later runs.
    #[arg(long)]
    create: Option<String>,
    /// Stream counts to run, in order.
    #[arg(long, value_delimiter = ',', default_value = "10,1000")]
    streams: Vec<usize>,
    /// Seconds each run lasts; the first quarter is warm-up (connections
    /// opened, buffers allocated) and is not counted.
    #[arg(long, default_value_t = 20.0)]
    seconds: f64,
}

/// File sizes of the generated set and each size's share of its bytes.
const MIX: [(u64, u64); 6] = [
    (4 << 10, 1),
    (64 << 10, 4),
    (1 << 20, 15),
    (4 << 20, 25),
    (16 << 20, 25),
    (64 << 20, 30),
];

pub async fn run(cfg: &Config, a: StreamsArgs) -> anyhow::Result<()> {
    // One request in flight per stream, 1 MiB each: N streams are N
    // connections on the worker, and the bench's own buffers stay small.
    let mut c = cfg.clone();
    c.client.read_ahead_blocks = 1;
    c.client.read_chunk = ByteSize(1 << 20);
    c.client.prewarm_blocks = 0;
    // Streams go to the worker over TCP even on its host.
    c.client.short_circuit = false;
    // Each stream keeps its connection, as separate client processes would.
    c.client.pool_idle_per_worker = a.streams.iter().copied().max().unwrap_or(1);
    let client = crate::client(&c)?;
    if let Some(total) = &a.create {
        create_set(&client, &a.path, parse_size(total)?).await?;
    }
    let files: Vec<FileInfo> = client
        .list_files_recursive(&a.path)
        .await?
        .into_iter()
        .filter(|f| f.size > 0)
        .collect();
    if files.is_empty() {
        bail!(
            "{}: no files to read; add --create 1GiB to write a mixed set there",
            a.path
        );
    }
    let set_bytes: u64 = files.iter().map(|f| f.size).sum();
    eprintln!(
        "loading {} files ({}) under {} into the cache",
        files.len(),
        format_size(set_bytes),
        a.path
    );
    client.load(&a.path, |_| {}).await?;
    let workers = client
        .workers()
        .await?
        .into_iter()
        .filter(|w| w.live)
        .count();
    let run_for = Duration::from_secs_f64(a.seconds.max(1.0));
    println!(
        "\n{} files ({}, 4 KiB to 64 MiB), {workers} worker(s), whole files picked at random, \
         {:.0} s per run of which the last {:.0} s are counted",
        files.len(),
        format_size(set_bytes),
        run_for.as_secs_f64(),
        run_for.as_secs_f64() * 0.75
    );
    println!(
        "{:>8} {:>11} {:>10} {:>9} {:>13} {:>14} {:>9}",
        "streams", "MiB/s", "files", "failures", "worker RSS", "peak (VmHWM)", "vs first"
    );
    let files = Arc::new(files);
    let mut first = None;
    for &n in &a.streams {
        let rss_before = worker_rss(&client).await.0;
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = {
            let (client, stop) = (client.clone(), stop.clone());
            tokio::spawn(async move {
                let mut max = 0;
                while !stop.load(Ordering::Relaxed) {
                    max = max.max(worker_rss(&client).await.0);
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                max
            })
        };
        let r = run_streams(&client, files.clone(), n, run_for).await;
        stop.store(true, Ordering::Relaxed);
        let sampled = sampler.await.unwrap_or(0);
        // Heartbeats carry the worker's stats: wait for one after the run.
        tokio::time::sleep(Duration::from_millis(
            cfg.worker.heartbeat_interval_ms.saturating_mul(2).max(500),
        ))
        .await;
        let (rss_after, peak) = worker_rss(&client).await;
        let rate = r.bytes as f64 / r.secs / 1048576.0;
        let base = *first.get_or_insert(rate);
        println!(
            "{n:>8} {rate:>11.1} {:>10} {:>9} {:>13} {:>14} {:>8.1}%",
            r.files,
            r.failures,
            format_size(sampled.max(rss_before).max(rss_after)),
            format_size(peak),
            100.0 * rate / base
        );
        if let Some(e) = r.first_error {
            println!("         first failure: {e}");
        }
    }
    println!(
        "\nworker RSS: the largest value the worker reported during the run (heartbeats); \
         peak: the process's high-water mark since it started"
    );
    Ok(())
}

/// (RSS now, peak RSS) of the largest live worker, from its last heartbeat.
async fn worker_rss(c: &Client) -> (u64, u64) {
    c.workers()
        .await
        .map(|ws| {
            ws.iter()
                .filter(|w| w.live)
                .filter_map(|w| w.stats.as_ref())
                .fold((0, 0), |(a, b), s| {
                    (a.max(s.rss_bytes), b.max(s.peak_rss_bytes))
                })
        })
        .unwrap_or((0, 0))
}

struct StreamsResult {
    secs: f64,
    bytes: u64,
    files: u64,
    failures: u64,
    first_error: Option<String>,
}

async fn run_streams(
    c: &Client,
    files: Arc<Vec<FileInfo>>,
    n: usize,
    run_for: Duration,
) -> StreamsResult {
    let started = Instant::now();
    let count_from = started + run_for / 4;
    let stop_at = started + run_for;
    let bytes = Arc::new(AtomicU64::new(0));
    let done_files = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(std::sync::Mutex::new(None));
    let mut hs = Vec::new();
    for i in 0..n {
        let (c, files, bytes, done_files, failures, first_error) = (
            c.clone(),
            files.clone(),
            bytes.clone(),
            done_files.clone(),
            failures.clone(),
            first_error.clone(),
        );
        hs.push(tokio::spawn(async move {
            let mut rng = Rng(0x9E37_79B9 ^ (i as u64 + 1).wrapping_mul(0x1000_0001));
            while Instant::now() < stop_at {
                let f = &files[(rng.next() % files.len() as u64) as usize];
                match read_whole(&c, f, count_from, stop_at, &bytes).await {
                    Ok(true) => {
                        done_files.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(false) => {}
                    Err(e) => {
                        failures.fetch_add(1, Ordering::Relaxed);
                        let mut fe = first_error.lock().unwrap_or_else(|p| p.into_inner());
                        fe.get_or_insert(format!("{}: {e:#}", f.path));
                    }
                }
            }
        }));
    }
    for h in hs {
        if h.await.is_err() {
            failures.fetch_add(1, Ordering::Relaxed);
        }
    }
    let first_error = first_error.lock().unwrap_or_else(|p| p.into_inner()).take();
    StreamsResult {
        secs: stop_at.saturating_duration_since(count_from).as_secs_f64(),
        bytes: bytes.load(Ordering::Relaxed),
        files: done_files.load(Ordering::Relaxed),
        failures: failures.load(Ordering::Relaxed),
        first_error,
    }
}

/// Reads a whole file, adding the bytes that arrive between `count_from`
/// and `stop_at` to `counted`; stops early at `stop_at`. True if the file
/// was read to its end (and had the right length).
async fn read_whole(
    c: &Client,
    f: &FileInfo,
    count_from: Instant,
    stop_at: Instant,
    counted: &AtomicU64,
) -> anyhow::Result<bool> {
    let r = c.open_info(f.clone())?;
    let mut s = r.stream(0);
    let mut got = 0u64;
    while let Some(b) = s.next().await {
        let n = b?.len() as u64;
        got += n;
        let now = Instant::now();
        if now >= stop_at {
            return Ok(false);
        }
        if now >= count_from {
            counted.fetch_add(n, Ordering::Relaxed);
        }
    }
    if got != f.size {
        bail!("read {got} of {} bytes", f.size);
    }
    Ok(true)
}

/// Writes about `total` bytes of files with the sizes of [`MIX`].
async fn create_set(c: &Client, dir: &str, total: u64) -> anyhow::Result<()> {
    let weight: u64 = MIX.iter().map(|m| m.1).sum();
    let mut n = 0u64;
    for (size, share) in MIX {
        let count = (total * share / weight / size).max(1);
        let body: Vec<u8> = (0..size)
            .map(|i| (i.wrapping_mul(31) ^ size) as u8)
            .collect();
        for i in 0..count {
            let path = format!("{}/f{:05}-{}", dir.trim_end_matches('/'), i, size);
            let opts = WriteOptions {
                write_type: WriteType::CacheThrough,
                overwrite: true,
                ..Default::default()
            };
            c.write_file(&path, &body, opts).await?;
            n += 1;
        }
    }
    eprintln!("wrote {n} files under {dir}");
    Ok(())
}
