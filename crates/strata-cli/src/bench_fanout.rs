//! `strata bench fanout`: a model release. N readers open one cold file at
//! once (as N inference containers would); reports their completion times
//! (p50 / p99 / max), the bytes the workers fetched from the UFS for it, and
//! one warm read of the same file in the same run as the baseline.

use std::time::Instant;

use futures::StreamExt;
use strata_client::Client;
use strata_common::Config;
use strata_common::size::format_size;

#[derive(clap::Args)]
pub struct FanoutArgs {
    /// A file under a mount (persisted, so it can be dropped from the cache).
    #[arg(long)]
    path: String,
    /// Concurrent cold readers.
    #[arg(long, default_value_t = 50)]
    readers: usize,
}

async fn ufs_bytes(c: &Client) -> anyhow::Result<u64> {
    // Worker stats arrive with heartbeats.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    Ok(c.workers()
        .await?
        .iter()
        .filter_map(|w| w.stats.as_ref())
        .map(|s| s.ufs_bytes_read)
        .sum())
}

/// Reads the whole file as a stream, dropping the bytes; returns seconds.
async fn read_all(c: &Client, path: &str) -> anyhow::Result<(f64, u64)> {
    let t = Instant::now();
    let r = c.open(path).await?;
    let mut s = Box::pin(r.stream(0));
    let mut n = 0u64;
    while let Some(b) = s.next().await {
        n += b?.len() as u64;
    }
    Ok((t.elapsed().as_secs_f64(), n))
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub async fn run(cfg: &Config, a: FanoutArgs) -> anyhow::Result<()> {
    let mut cc = cfg.clone();
    // Each reader is its own client (its own connections), as separate
    // containers would be; short-circuit off so all go over TCP.
    cc.client.short_circuit = false;
    let admin = crate::client(&cc)?;
    let f = admin.stat(&a.path).await?;
    anyhow::ensure!(
        f.persist_state == strata_client::PersistState::Persisted as i32,
        "{} is not persisted in a UFS; the fan-out needs a file it can drop from the cache",
        a.path
    );
    admin.free_file(&f).await;
    let before = ufs_bytes(&admin).await?;
    let t = Instant::now();
    let tasks: Vec<_> = (0..a.readers)
        .map(|_| {
            let cc = cc.clone();
            let path = a.path.clone();
            tokio::spawn(async move {
                let c = crate::client(&cc)?;
                read_all(&c, &path).await
            })
        })
        .collect();
    let mut times = Vec::new();
    for t in tasks {
        let (s, n) = t.await??;
        anyhow::ensure!(n == f.size, "a reader got {n} of {} bytes", f.size);
        times.push(s);
    }
    let wall = t.elapsed().as_secs_f64();
    let fetched = ufs_bytes(&admin).await? - before;
    times.sort_by(f64::total_cmp);
    let (warm, _) = read_all(&admin, &a.path).await?;
    println!(
        "fan-out of {} ({}) to {} cold readers",
        a.path,
        format_size(f.size),
        a.readers
    );
    println!(
        "  completion  p50 {:.2}s  p99 {:.2}s  max {:.2}s  (all done in {wall:.2}s, {}/s delivered)",
        pct(&times, 0.5),
        pct(&times, 0.99),
        times[times.len() - 1],
        format_size((f.size as f64 * a.readers as f64 / wall) as u64)
    );
    println!(
        "  UFS bytes   {} = {:.3} x the file",
        format_size(fetched),
        fetched as f64 / f.size.max(1) as f64
    );
    println!(
        "  one warm read of the same file: {warm:.2}s ({}/s); p50 cold reader / warm read = {:.1}x",
        format_size((f.size as f64 / warm) as u64),
        pct(&times, 0.5) / warm
    );
    Ok(())
}
