//! `strata bench ...`: every figure is printed next to baselines measured in
//! the same run on the same bytes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Subcommand;
use futures::StreamExt;
use strata_client::{Client, FileInfo};
use strata_common::Config;
use strata_common::size::format_size;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use xxhash_rust::xxh3::Xxh3;

#[derive(Subcommand)]
pub enum BenchCmd {
    /// Read a file set through the SDK cold and warm, next to a direct UFS
    /// read and a plain loopback TCP stream of the same number of bytes.
    Read {
        /// A file or directory in the namespace (under a mount).
        #[arg(long)]
        path: String,
        /// Parallel readers (a single file is split into this many ranges).
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Hash every byte and check all runs read identical data.
        #[arg(long)]
        verify: bool,
        /// Warm and loopback runs are repeated this many times; the median is reported.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// Random positional reads and sequential page reads of a warm file on
    /// this host through the SDK (short-circuit and TCP), next to `pread` of
    /// a local copy and of the worker's page files.
    Local(crate::bench_local::LocalArgs),
    /// Many concurrent read streams of mixed-size files (e.g. 10 and 1000)
    /// with the same total bytes: throughput, failures, worker RSS.
    Streams(crate::bench_streams::StreamsArgs),
    /// Replay access traces (Zipf, scan + hot set, loop) against every
    /// eviction policy and Belady's optimal, at several cache sizes.
    Cache(crate::bench_cache::CacheArgs),
    /// GET a cached file through a running `strata gateway` with N streams,
    /// next to the same GETs from the S3 store behind it and a plain
    /// loopback TCP stream of the same bytes. Keys from `[gateway]`.
    Gateway(GatewayBench),
    /// Metadata operations per second (create, stat, open, list, rename,
    /// delete) with N client tasks against a running cluster.
    Meta(crate::bench_meta::MetaArgs),
    /// A model release: N concurrent cold readers of one file; completion
    /// p50/p99, UFS bytes fetched, next to one warm read.
    Fanout(crate::bench_fanout::FanoutArgs),
}

/// A small deterministic generator (xorshift64*), one per reader.
pub(crate) struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// An `io`-aligned offset with `io` bytes inside a file of `size` bytes.
    pub fn offset(&mut self, size: u64, io: u64) -> u64 {
        (self.next() % (size / io)) * io
    }
}

#[derive(Clone)]
struct Task {
    file: FileInfo,
    off: u64,
    len: u64,
}

struct RunResult {
    secs: f64,
    bytes: u64,
    /// Per-task hashes (order of tasks), when verifying.
    hashes: Vec<u64>,
}

fn split(files: &[FileInfo], threads: usize) -> Vec<Task> {
    let mut tasks = Vec::new();
    for f in files {
        let parts = if files.len() >= threads {
            1
        } else {
            threads.div_ceil(files.len())
        } as u64;
        let step = f.size.div_ceil(parts).max(1);
        let mut off = 0;
        while off < f.size {
            let len = step.min(f.size - off);
            tasks.push(Task {
                file: f.clone(),
                off,
                len,
            });
            off += len;
        }
    }
    tasks
}

/// Runs `tasks` on `threads` workers; each task's bytes come from `read`.
async fn run_tasks<F, Fut>(
    tasks: &[Task],
    threads: usize,
    verify: bool,
    read: F,
) -> anyhow::Result<RunResult>
where
    F: Fn(Task) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<
            Output = anyhow::Result<futures::stream::BoxStream<'static, anyhow::Result<Bytes>>>,
        > + Send,
{
    let queue = Arc::new(Mutex::new((0..tasks.len()).collect::<Vec<_>>()));
    let hashes = Arc::new(Mutex::new(vec![0u64; tasks.len()]));
    let tasks = Arc::new(tasks.to_vec());
    let started = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..threads.max(1) {
        let (queue, hashes, tasks, read) =
            (queue.clone(), hashes.clone(), tasks.clone(), read.clone());
        handles.push(tokio::spawn(async move {
            let mut bytes = 0u64;
            loop {
                let next = queue
                    .lock()
                    .map_err(|_| anyhow::anyhow!("queue poisoned"))?
                    .pop();
                let Some(i) = next else { break };
                let t = tasks[i].clone();
                let want = t.len;
                let mut s = read(t).await?;
                let mut h = Xxh3::new();
                let mut got = 0u64;
                while let Some(chunk) = s.next().await {
                    let chunk = chunk?;
                    if verify {
                        h.update(&chunk);
                    }
                    got += chunk.len() as u64;
                }
                if got != want {
                    bail!("short read: wanted {want} bytes, got {got}");
                }
                bytes += got;
                hashes.lock().map_err(|_| anyhow::anyhow!("poisoned"))?[i] = h.digest();
            }
            anyhow::Ok(bytes)
        }));
    }
    let mut bytes = 0;
    for h in handles {
        bytes += h.await??;
    }
    let secs = started.elapsed().as_secs_f64();
    let hashes = hashes
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    Ok(RunResult {
        secs,
        bytes,
        hashes,
    })
}

/// The run with the median time.
fn median(mut runs: Vec<RunResult>) -> RunResult {
    runs.sort_by(|a, b| a.secs.total_cmp(&b.secs));
    let mid = runs.len() / 2;
    runs.swap_remove(mid)
}

async fn ufs_bytes_read(c: &Client) -> u64 {
    c.workers()
        .await
        .map(|ws| {
            ws.iter()
                .filter_map(|w| w.stats.clone())
                .map(|s| s.ufs_bytes_read)
                .sum()
        })
        .unwrap_or(0)
}

/// A plain TCP stream over loopback: `threads` connections carrying `total`
/// bytes from a memory buffer, read into buffers and dropped. It is the
/// ceiling of the network path the data protocol runs on.
async fn loopback_tcp(
    total: u64,
    threads: usize,
    sample: Bytes,
    verify: bool,
) -> anyhow::Result<RunResult> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let per = total.div_ceil(threads as u64);
    let server = tokio::spawn(async move {
        let mut hs = Vec::new();
        for _ in 0..threads {
            let (mut s, _) = listener.accept().await?;
            let sample = sample.clone();
            hs.push(tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let mut left = per;
                while left > 0 {
                    let n = (sample.len() as u64).min(left) as usize;
                    s.write_all(&sample[..n]).await?;
                    left -= n as u64;
                }
                s.shutdown().await?;
                anyhow::Ok(())
            }));
        }
        for h in hs {
            h.await??;
        }
        anyhow::Ok(())
    });
    let started = Instant::now();
    let mut hs = Vec::new();
    for _ in 0..threads {
        hs.push(tokio::spawn(async move {
            let mut s = tokio::net::TcpStream::connect(addr).await?;
            let _ = s.set_nodelay(true);
            let mut h = Xxh3::new();
            let mut got = 0u64;
            loop {
                // A fresh buffer per megabyte, as the SDK hands out `Bytes`.
                let mut buf = bytes::BytesMut::with_capacity(1 << 20);
                let n = s.read_buf(&mut buf).await?;
                if n == 0 {
                    break;
                }
                if verify {
                    h.update(&buf);
                }
                got += n as u64;
            }
            anyhow::Ok(got)
        }));
    }
    let mut bytes = 0;
    for h in hs {
        bytes += h.await??;
    }
    let secs = started.elapsed().as_secs_f64();
    server.await??;
    Ok(RunResult {
        secs,
        bytes,
        hashes: Vec::new(),
    })
}

pub async fn run(cfg: &Config, cmd: BenchCmd) -> anyhow::Result<()> {
    let (path, threads, verify, rounds) = match cmd {
        BenchCmd::Read {
            path,
            threads,
            verify,
            rounds,
        } => (path, threads, verify, rounds),
        BenchCmd::Cache(a) => return crate::bench_cache::run(a),
        BenchCmd::Local(a) => return crate::bench_local::run(cfg, a).await,
        BenchCmd::Streams(a) => return crate::bench_streams::run(cfg, a).await,
        BenchCmd::Gateway(g) => return gateway(cfg, g).await,
        BenchCmd::Meta(a) => return crate::bench_meta::run(cfg, a).await,
        BenchCmd::Fanout(a) => return crate::bench_fanout::run(cfg, a).await,
    };
    // Workers report usage with their heartbeat; wait one out before reading counters.
    let settle = std::time::Duration::from_millis(cfg.worker.heartbeat_interval_ms * 3 / 2 + 100);
    // The SDK rows measure the data protocol over TCP (the remote-client
    // path); `strata bench local` measures short-circuit reads.
    let mut tcp_cfg = cfg.clone();
    tcp_cfg.client.short_circuit = false;
    let cfg = &tcp_cfg;
    let c = crate::client(cfg)?;
    let files = c.list_files_recursive(&path).await?;
    if files.is_empty() {
        bail!("{path}: no files to read");
    }
    let mut mounts = BTreeMap::new();
    for f in &files {
        if f.mount_id == 0 || f.persist_state != strata_client::PersistState::Persisted as i32 {
            bail!(
                "{}: not a persisted file under a mount; the bench compares against the UFS",
                f.path
            );
        }
        if let std::collections::btree_map::Entry::Vacant(e) = mounts.entry(f.mount_id) {
            let m = c.mount_details(f.mount_id).await?;
            let opts: BTreeMap<String, String> = m.options.into_iter().collect();
            let uri = strata_ufs::UfsUri::parse(&m.ufs_uri, &opts)?;
            e.insert(strata_ufs::open(&uri)?);
        }
    }
    let total: u64 = files.iter().map(|f| f.size).sum();
    let tasks = split(&files, threads);
    println!(
        "bench read {path}: {} file(s), {} ({} bytes), {threads} reader(s), {} task(s)",
        files.len(),
        format_size(total),
        total,
        tasks.len()
    );

    // Cold: nothing of these files cached.
    c.free(&path).await?;
    let sdk = |c: Client| {
        move |t: Task| {
            let c = c.clone();
            async move {
                let r = c.open(&t.file.path).await?;
                let s = r
                    .stream_range(t.off, t.len)
                    .map(|b| b.map_err(anyhow::Error::from));
                anyhow::Ok(s.boxed())
            }
        }
    };
    tokio::time::sleep(settle).await;
    let u0 = ufs_bytes_read(&c).await;
    let cold = run_tasks(&tasks, threads, verify, sdk(c.clone()))
        .await
        .context("cold SDK read")?;
    tokio::time::sleep(settle).await;
    let u1 = ufs_bytes_read(&c).await;
    let mut warms = Vec::new();
    for _ in 0..rounds.max(1) {
        let w = run_tasks(&tasks, threads, verify, sdk(c.clone()))
            .await
            .context("warm SDK read")?;
        if verify && w.hashes != cold.hashes {
            bail!("verification failed: a warm read returned different bytes than the cold read");
        }
        warms.push(w);
    }
    tokio::time::sleep(settle).await;
    let u2 = ufs_bytes_read(&c).await;
    let warm = median(warms);

    let mounts = Arc::new(mounts);
    let direct = run_tasks(&tasks, threads, verify, move |t: Task| {
        let mounts = mounts.clone();
        async move {
            let ufs = mounts
                .get(&t.file.mount_id)
                .context("mount vanished")?
                .clone();
            let path = t.file.ufs_path.clone();
            let s = ufs.read_stream(&path, t.off..t.off + t.len).await?;
            anyhow::Ok(s.map(|b| b.map_err(anyhow::Error::from)).boxed())
        }
    })
    .await
    .context("direct UFS read")?;

    let first = &files[0];
    let sample = c
        .open(&first.path)
        .await?
        .read_at(0, (16 << 20).min(first.size))
        .await?;
    let mut tcps = Vec::new();
    for _ in 0..rounds.max(1) {
        tcps.push(loopback_tcp(total, threads.max(1), sample.clone(), verify).await?);
    }
    let tcp = median(tcps);

    if verify {
        if cold.hashes != warm.hashes || warm.hashes != direct.hashes {
            bail!("verification failed: cold, warm and direct reads returned different bytes");
        }
        println!(
            "verify: cold, warm and direct UFS reads returned identical bytes (xxh3 per range)"
        );
    }

    let rate = |r: &RunResult| r.bytes as f64 / r.secs.max(1e-9);
    let mib = |r: &RunResult| rate(r) / (1 << 20) as f64;
    println!();
    println!(
        "{:<28} {:>9} {:>11} {:>14} {:>16} {:>14}",
        "run", "seconds", "MiB/s", "x direct UFS", "% loopback TCP", "UFS bytes read"
    );
    let row = |name: &str, r: &RunResult, ufs: Option<u64>| {
        println!(
            "{:<28} {:>9.3} {:>11.1} {:>14.2} {:>15.1}% {:>14}",
            name,
            r.secs,
            mib(r),
            rate(r) / rate(&direct),
            100.0 * rate(r) / rate(&tcp),
            ufs.map(|u| u.to_string()).unwrap_or_else(|| "-".into())
        );
    };
    row("direct UFS read", &direct, None);
    row("strata cold read (SDK)", &cold, Some(u1 - u0));
    row(
        &format!("strata warm read (SDK) x{rounds}"),
        &warm,
        Some(u2 - u1),
    );
    row(&format!("loopback TCP (baseline) x{rounds}"), &tcp, None);
    println!();
    println!("(warm and loopback rows: median of {rounds} runs; UFS bytes from worker counters)");
    println!(
        "warm/direct = {:.2}x, warm/loopback TCP = {:.1}%",
        rate(&warm) / rate(&direct),
        100.0 * rate(&warm) / rate(&tcp)
    );
    Ok(())
}

#[derive(clap::Args)]
pub struct GatewayBench {
    /// A file under a mount; read as bucket = first path segment.
    #[arg(long)]
    path: String,
    /// The gateway's S3 endpoint.
    #[arg(long, default_value = "http://127.0.0.1:29998")]
    endpoint: String,
    /// Parallel GET streams, each reading one range of the file.
    #[arg(long, default_value_t = 1)]
    streams: usize,
    /// Runs per row; the median is reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Instead: drop the file from the cache and time one cold GET
    /// through the gateway (prewarm is the gateway's client.prewarm_blocks).
    #[arg(long)]
    cold: bool,
    /// Also write this many 10 KiB objects next to the file and compare
    /// GET operations per second through the gateway and from the store.
    #[arg(long, default_value_t = 0)]
    small_objects: usize,
}

/// `strata bench gateway`.
async fn gateway(cfg: &Config, b: GatewayBench) -> anyhow::Result<()> {
    let GatewayBench {
        path,
        endpoint,
        streams,
        rounds,
        cold,
        small_objects,
    } = b;
    let (path, endpoint) = (path.as_str(), endpoint.as_str());
    let (ak, sk) = (&cfg.gateway.access_key, &cfg.gateway.secret_key);
    if ak.is_empty() || sk.is_empty() {
        bail!(
            "set gateway.access_key and gateway.secret_key (or STRATA_GATEWAY_ACCESS_KEY/_SECRET_KEY) to the gateway's keys"
        );
    }
    let c = crate::client(cfg)?;
    let info = c.stat(path).await?;
    if info.is_dir || info.mount_id == 0 {
        bail!("{path}: not a file under a mount; the bench compares against the UFS");
    }
    let trimmed = path.trim_start_matches('/');
    let (bucket, key) = trimmed
        .split_once('/')
        .with_context(|| format!("{path}: expected /BUCKET/KEY"))?;
    let uri = format!(
        "s3://{bucket}?endpoint={endpoint}&access_key_id={ak}&secret_access_key={sk}&region=us-east-1"
    );
    let gw = strata_ufs::open(&strata_ufs::UfsUri::parse(&uri, &BTreeMap::new())?)?;
    let m = c.mount_details(info.mount_id).await?;
    let opts: BTreeMap<String, String> = m.options.into_iter().collect();
    let direct = strata_ufs::open(&strata_ufs::UfsUri::parse(&m.ufs_uri, &opts)?)?;
    if cold {
        c.free(path).await?;
        let t = split(std::slice::from_ref(&info), 1);
        let r = run_tasks(&t, 1, false, gateway_get(gw.clone(), key.to_string())).await?;
        println!(
            "cold GET of {path} ({}) through {endpoint}: {:.1} s, {:.1} MiB/s",
            format_size(info.size),
            r.secs,
            r.bytes as f64 / r.secs.max(1e-9) / (1 << 20) as f64
        );
        return Ok(());
    }
    c.load(path, |_| {}).await?;
    let tasks = split(std::slice::from_ref(&info), streams);
    println!(
        "bench gateway {path}: {} via {endpoint}, {streams} stream(s), {rounds} round(s); warm (loaded first)",
        format_size(info.size)
    );
    let via = gateway_get;
    // The same GETs from the leanest client there is: one plain HTTP/1.1
    // GET of a presigned URL per stream, its body read as the loopback
    // baseline reads its stream (the S3 SDK row above it splits each
    // stream into 8 MiB ranged GETs, as S3 SDKs do).
    let hour = std::time::Duration::from_secs(3600);
    // Only plain-HTTP endpoints (the client speaks no TLS); otherwise, or
    // where a store cannot presign, those rows are left out.
    let presign = |ufs: strata_ufs::Ufs, key: String| async move {
        ufs.presign_read(&key, hour)
            .await
            .ok()
            .flatten()
            .filter(|p| p.url.starts_with("http://"))
    };
    let plain = match (
        presign(gw.clone(), key.to_string()).await,
        presign(direct.clone(), info.ufs_path.clone()).await,
    ) {
        (Some(g), Some(d)) => Some((Arc::new(g), Arc::new(d))),
        _ => None,
    };
    let sample = c
        .open(path)
        .await?
        .read_at(0, (16 << 20).min(info.size))
        .await?;
    let (mut g, mut d, mut pg, mut pd, mut t) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds.max(1) {
        g.push(run_tasks(&tasks, streams, false, via(gw.clone(), key.to_string())).await?);
        d.push(
            run_tasks(
                &tasks,
                streams,
                false,
                via(direct.clone(), info.ufs_path.clone()),
            )
            .await?,
        );
        if let Some((pgw, pdirect)) = &plain {
            pg.push(run_tasks(&tasks, streams, false, presigned_get(pgw.clone())).await?);
            pd.push(run_tasks(&tasks, streams, false, presigned_get(pdirect.clone())).await?);
        }
        t.push(loopback_tcp(info.size, streams.max(1), sample.clone(), false).await?);
    }
    let (g, d, t) = (median(g), median(d), median(t));
    let rate = |r: &RunResult| r.bytes as f64 / r.secs.max(1e-9);
    println!();
    println!(
        "{:<48} {:>11} {:>10} {:>15}",
        "run", "MiB/s", "x store", "% loopback TCP"
    );
    // Each client's gateway row against the store read by the same client.
    let mut clients = vec![("S3 SDK", g, d)];
    if plain.is_some() {
        clients.push(("plain HTTP GET", median(pg), median(pd)));
    }
    for (client, g, d) in &clients {
        for (what, r) in [
            ("GET through strata gateway", g),
            ("GET from the S3 store behind it", d),
        ] {
            println!(
                "{:<48} {:>11.1} {:>10.2} {:>14.1}%",
                format!("{what} ({client})"),
                rate(r) / (1 << 20) as f64,
                rate(r) / rate(d),
                100.0 * rate(r) / rate(&t)
            );
        }
    }
    println!(
        "{:<48} {:>11.1} {:>10} {:>14.1}%",
        "loopback TCP (baseline)",
        rate(&t) / (1 << 20) as f64,
        "",
        100.0
    );
    println!(
        "(median of {} rounds; x store: against the store read by the same client)",
        rounds.max(1)
    );
    if small_objects > 0 {
        small_gets(&c, &info, key, &gw, &direct, small_objects, streams).await?;
    }
    Ok(())
}

/// A task's bytes as a stream, as `run_tasks` takes them.
type TaskStream = futures::stream::BoxStream<'static, anyhow::Result<Bytes>>;
type TaskFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<TaskStream>> + Send>>;

/// Reads a task's range of `key` from `ufs` as a stream.
fn gateway_get(
    ufs: strata_ufs::Ufs,
    key: String,
) -> impl Fn(Task) -> TaskFuture + Clone + Send + 'static {
    move |t: Task| {
        let (ufs, key) = (ufs.clone(), key.clone());
        Box::pin(async move {
            let s = ufs.read_stream(&key, t.off..t.off + t.len).await?;
            anyhow::Ok(s.map(|b| b.map_err(anyhow::Error::from)).boxed())
        })
    }
}

/// Reads a task's range with one plain HTTP/1.1 GET of a presigned URL,
/// the body read into buffers of up to 1 MiB and dropped, as the loopback
/// baseline reads its stream.
fn presigned_get(
    get: Arc<strata_ufs::PresignedGet>,
) -> impl Fn(Task) -> TaskFuture + Clone + Send + 'static {
    move |t: Task| {
        let get = get.clone();
        Box::pin(async move {
            use http_body_util::BodyExt;
            let uri: http::Uri = get
                .url
                .parse()
                .with_context(|| format!("bad URL {}", get.url))?;
            let authority = uri
                .authority()
                .with_context(|| format!("no host in {}", get.url))?
                .clone();
            let port = authority.port_u16().unwrap_or(80);
            let host = authority
                .host()
                .trim_start_matches('[')
                .trim_end_matches(']');
            let sock = tokio::net::TcpStream::connect((host, port))
                .await
                .with_context(|| format!("cannot connect to {authority}"))?;
            let _ = sock.set_nodelay(true);
            let (mut send, conn) = hyper::client::conn::http1::Builder::new()
                .read_buf_exact_size(Some(1 << 20))
                .handshake::<_, http_body_util::Empty<Bytes>>(hyper_util::rt::TokioIo::new(sock))
                .await?;
            tokio::spawn(conn);
            let mut req = http::Request::get(uri.path_and_query().map_or("/", |p| p.as_str()))
                .header(http::header::HOST, authority.as_str())
                .header(
                    http::header::RANGE,
                    format!("bytes={}-{}", t.off, t.off + t.len.max(1) - 1),
                );
            for (k, v) in &get.headers {
                if !k.eq_ignore_ascii_case("host") {
                    req = req.header(k.as_str(), v.as_str());
                }
            }
            let resp = send
                .send_request(req.body(http_body_util::Empty::new())?)
                .await?;
            if !resp.status().is_success() {
                bail!("GET {authority}{}: {}", uri.path(), resp.status());
            }
            let body = resp.into_body();
            let s = futures::stream::unfold(body, |mut b| async move {
                loop {
                    match b.frame().await? {
                        Ok(f) => {
                            if let Ok(d) = f.into_data() {
                                return Some((Ok(d), b));
                            }
                        }
                        Err(e) => return Some((Err(anyhow::Error::from(e)), b)),
                    }
                }
            });
            anyhow::Ok(s.boxed())
        })
    }
}

/// 10 KiB objects written next to `info` (through Strata, so in the store
/// too) and read whole, `streams` at a time, three passes: GETs per second
/// through the gateway and straight from the store.
async fn small_gets(
    c: &Client,
    info: &FileInfo,
    key: &str,
    gw: &strata_ufs::Ufs,
    direct: &strata_ufs::Ufs,
    n: usize,
    streams: usize,
) -> anyhow::Result<()> {
    let ns_dir = format!("{}/bench-small-10k", parent_of(&info.path));
    let key_dir = format!("{}bench-small-10k", parent_of_key(key));
    let ufs_dir = format!("{}bench-small-10k", parent_of_key(&info.ufs_path));
    let body = vec![7u8; 10 << 10];
    eprintln!("writing {n} 10 KiB objects under {ns_dir}");
    for i in 0..n {
        let p = format!("{ns_dir}/o{i:06}");
        if c.stat(&p).await.is_err() {
            c.write_file(&p, &body, Default::default()).await?;
        }
    }
    c.load(&ns_dir, |_| {}).await?;
    let ops = |ufs: strata_ufs::Ufs, dir: String| async move {
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let total = 3 * n;
        let started = Instant::now();
        let mut hs = Vec::new();
        for _ in 0..streams.max(1) {
            let (ufs, dir, next) = (ufs.clone(), dir.clone(), next.clone());
            hs.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= total {
                        return anyhow::Ok(());
                    }
                    let b = ufs
                        .read(&format!("{dir}/o{:06}", i % n), 0..10 << 10, None)
                        .await?;
                    if b.len() != 10 << 10 {
                        bail!("object {} has {} bytes", i % n, b.len());
                    }
                }
            }));
        }
        for h in hs {
            h.await??;
        }
        anyhow::Ok(total as f64 / started.elapsed().as_secs_f64())
    };
    let g = ops(gw.clone(), key_dir).await?;
    let d = ops(direct.clone(), ufs_dir).await?;
    println!(
        "\n10 KiB GETs, {streams} at a time: gateway {g:.0} ops/s, store {d:.0} ops/s ({:.2}x)",
        g / d
    );
    Ok(())
}

fn parent_of(p: &str) -> &str {
    p.rsplit_once('/').map_or("", |(a, _)| a)
}

/// `a/b/c` -> `a/b/`; `c` -> ``.
fn parent_of_key(k: &str) -> String {
    k.rsplit_once('/')
        .map_or(String::new(), |(a, _)| format!("{a}/"))
}
