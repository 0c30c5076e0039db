//! `strata local`: a master and a worker in one process.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use strata_common::Config;
use strata_common::size::parse_size;

#[derive(Args)]
pub struct LocalArgs {
    /// Data directory (master metadata and worker cache below it).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Mount a UFS: /NS_PATH=UFS_URI (repeatable), e.g.
    /// /data=file:///srv/data or /bucket=s3://bucket?endpoint=http://127.0.0.1:9000
    #[arg(long = "mount", value_name = "/NS_PATH=UFS_URI")]
    mounts: Vec<String>,
    /// Master gRPC address (default from config: 127.0.0.1:19998).
    #[arg(long, value_name = "HOST:PORT")]
    master_addr: Option<String>,
    /// Worker data address (default from config: 127.0.0.1:29999).
    #[arg(long, value_name = "HOST:PORT")]
    worker_addr: Option<String>,
    /// Worker cache capacity, e.g. 4GiB.
    #[arg(long, value_name = "SIZE")]
    cache_capacity: Option<String>,
    /// Also serve S3 (the `[gateway]` section; keys required) on
    /// gateway.listen, or on HOST:PORT when given.
    #[arg(long, value_name = "HOST:PORT", num_args = 0..=1, default_missing_value = "")]
    gateway: Option<String>,
}

pub async fn run(mut cfg: Config, args: LocalArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    if let Some(d) = &args.data_dir {
        cfg.master.data_dir = d.join("master");
        cfg.worker.cache_dir = d.join("worker");
        cfg.gateway.upload_dir = d.join("gateway-uploads");
    }
    if let Some(a) = &args.master_addr {
        cfg.master.rpc_addr = a.clone();
    }
    if let Some(a) = &args.worker_addr {
        cfg.worker.data_addr = a.clone();
    }
    if let Some(c) = &args.cache_capacity {
        cfg.worker.cache_capacity.0 = parse_size(c)?;
    }
    let mut parsed = Vec::new();
    for m in &args.mounts {
        let (p, u) = m
            .split_once('=')
            .with_context(|| format!("--mount {m:?}: expected /NS_PATH=UFS_URI"))?;
        parsed.push((p.to_string(), u.to_string()));
    }
    let master = strata_master::start(&cfg).await?;
    // The worker and clients dial the address the master actually bound.
    cfg.cluster.master = master.addr.to_string();
    let worker = strata_worker::start(&cfg).await?;
    let client = crate::client(&cfg)?;
    // Ready means the worker is registered and serving.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if client
            .workers()
            .await
            .map(|w| w.iter().any(|w| w.live))
            .unwrap_or(false)
        {
            break;
        }
        if Instant::now() > deadline {
            bail!("the worker did not register with the master within 10s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let existing = client.mounts().await?;
    for (p, u) in parsed {
        match existing.iter().find(|m| m.path == p) {
            Some(m) if m.ufs_uri == strata_ufs::redact_uri(&u) => {}
            Some(m) => bail!(
                "--mount {p}={u}: {p} is already mounted from {} (kept in {}); \
                 unmount it with `strata fs unmount {p}` or pick another path",
                m.ufs_uri,
                cfg.master.data_dir.display()
            ),
            None => {
                client
                    .mount(&p, &u, Default::default())
                    .await
                    .with_context(|| format!("--mount {p}={u}"))?;
            }
        }
    }
    if args.gateway.is_some() && cfg.gateway.bucket_ufs.is_empty() {
        // New buckets live beside the rest of this instance's data (the
        // master's directory sits in it, also with --data-dir).
        let base = cfg
            .master
            .data_dir
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let dir = std::path::absolute(base.join("buckets"))
            .with_context(|| format!("{}: cannot resolve the bucket directory", base.display()))?;
        cfg.gateway.bucket_ufs = format!("file://{}", dir.display());
    }
    let gateway = match &args.gateway {
        Some(listen) => Some(
            strata_gateway::serve(
                client.clone(),
                &cfg.gateway,
                Some(listen.as_str()).filter(|l| !l.is_empty()),
            )
            .await?,
        ),
        None => None,
    };
    println!(
        "strata local is ready in {:.2}s",
        started.elapsed().as_secs_f64()
    );
    println!("  master (gRPC):  {}", master.addr);
    println!("  worker (data):  {}", worker.data_addr);
    println!("  metadata:       {}", cfg.master.data_dir.display());
    println!(
        "  cache:          {} ({} capacity)",
        cfg.worker.cache_dir.display(),
        strata_common::size::format_size(cfg.worker.cache_capacity.0)
    );
    if let Some(g) = &gateway {
        println!("  S3 gateway:     http://{}", g.addr);
        println!("  new buckets:    {}", cfg.gateway.bucket_ufs);
    }
    for m in client.mounts().await? {
        println!("  mount:          {} -> {}", m.path, m.ufs_uri);
    }
    println!(
        "Try: strata --master {} fs ls /   (Ctrl-C to stop)",
        master.addr
    );
    crate::wait_for_signal_reloading(gateway.as_ref()).await;
    println!("stopping");
    if let Some(g) = gateway {
        g.stop();
    }
    worker.stop().await;
    master.stop().await;
    Ok(())
}
