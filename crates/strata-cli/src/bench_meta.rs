//! `strata bench meta`: metadata operations per second against a running
//! cluster, in the spirit of mdtest and Alluxio's StressMasterBench. Each
//! phase runs N client tasks over their own directory; every operation is
//! checked (a failed one is counted and reported, never skipped silently).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::bail;
use clap::Args;
use strata_client::{Client, WriteOptions, WriteType};
use strata_common::Config;

#[derive(Args, Clone)]
pub struct MetaArgs {
    /// Concurrent client tasks.
    #[arg(long, default_value_t = 32)]
    pub threads: usize,
    /// Files created (and then renamed and deleted) per run.
    #[arg(long, default_value_t = 20_000)]
    pub files: usize,
    /// Stat and open operations per file (stats/s need more operations
    /// than creates to be measured well).
    #[arg(long, default_value_t = 5)]
    pub reads_per_file: usize,
    /// Phases to run, comma separated: create,stat,open,list,rename,delete.
    #[arg(long, default_value = "create,stat,open,list,rename,delete")]
    pub phases: String,
    /// Namespace directory the bench works in (a fresh subdirectory per run).
    #[arg(long, default_value = "/bench-meta")]
    pub dir: String,
    /// Which masters answer reads: leader, any, any-stale (client.read_from).
    #[arg(long)]
    pub read_from: Option<String>,
    /// Keep the files (skips nothing; only the final clean-up).
    #[arg(long)]
    pub keep: bool,
}

struct Phase {
    name: &'static str,
    ops: u64,
    errors: u64,
    secs: f64,
    first_error: Option<String>,
}

/// Runs `op(task, i)` for i in 0..n split over `threads` tasks.
async fn run_phase<F, Fut>(name: &'static str, threads: usize, n: usize, op: F) -> Phase
where
    F: Fn(usize, usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send,
{
    let op = Arc::new(op);
    let errors = Arc::new(AtomicU64::new(0));
    let first = Arc::new(std::sync::Mutex::new(None));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..threads {
        let (op, errors, first) = (op.clone(), errors.clone(), first.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = t;
            while i < n {
                if let Err(e) = op(t, i).await {
                    errors.fetch_add(1, Ordering::Relaxed);
                    first
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get_or_insert(e);
                }
                i += threads;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let first_error = first.lock().unwrap_or_else(|p| p.into_inner()).take();
    Phase {
        name,
        ops: n as u64,
        errors: errors.load(Ordering::Relaxed),
        secs: start.elapsed().as_secs_f64(),
        first_error,
    }
}

pub async fn run(cfg: &Config, a: MetaArgs) -> anyhow::Result<()> {
    if a.threads == 0 || a.files == 0 {
        bail!("--threads and --files must be at least 1");
    }
    let mut cfg = cfg.clone();
    if let Some(r) = &a.read_from {
        cfg.client.read_from = r.clone();
    }
    let c: Client = crate::client(&cfg)?;
    let masters = c.list_masters().await?;
    let root = format!(
        "{}/run-{}",
        a.dir.trim_end_matches('/'),
        strata_common::now_ms()
    );
    for t in 0..a.threads {
        c.mkdir(&format!("{root}/t{t}"), true).await?;
    }
    let threads = a.threads;
    let n = a.files;
    let file = {
        let root = root.clone();
        move |t: usize, i: usize| format!("{root}/t{t}/f{i}")
    };
    let phases: Vec<String> = strata_common::config::split_list(&a.phases);
    println!(
        "strata bench meta: {} masters (leader {}), {} client tasks, {} files, reads from {}",
        masters.masters.len(),
        masters.leader_addr,
        threads,
        n,
        cfg.client.read_from
    );
    let mut results = Vec::new();
    for p in &phases {
        let c = c.clone();
        let f = file.clone();
        let r = match p.as_str() {
            "create" => {
                run_phase("create", threads, n, move |t, i| {
                    let (c, path) = (c.clone(), f(t, i));
                    async move {
                        let opts = WriteOptions {
                            write_type: WriteType::MustCache,
                            ..Default::default()
                        };
                        c.write_file(&path, b"", opts)
                            .await
                            .map(drop)
                            .map_err(|e| e.to_string())
                    }
                })
                .await
            }
            "stat" => {
                run_phase("stat", threads, n * a.reads_per_file, move |_, i| {
                    let k = i % n;
                    let (c, path) = (c.clone(), f(k % threads, k));
                    async move {
                        match c.stat(&path).await {
                            Ok(i) if !i.is_dir => Ok(()),
                            Ok(_) => Err(format!("{path}: a directory")),
                            Err(e) => Err(e.to_string()),
                        }
                    }
                })
                .await
            }
            "open" => {
                run_phase("open", threads, n * a.reads_per_file, move |_, i| {
                    let k = i % n;
                    let (c, path) = (c.clone(), f(k % threads, k));
                    async move { c.open(&path).await.map(drop).map_err(|e| e.to_string()) }
                })
                .await
            }
            "list" => {
                let root = root.clone();
                let per = n.div_ceil(threads);
                run_phase("list", threads, threads * 20, move |t, _| {
                    let (c, dir) = (c.clone(), format!("{root}/t{t}"));
                    async move {
                        match c.list(&dir).await {
                            Ok(l) if l.len() + 1 >= per => Ok(()),
                            Ok(l) => Err(format!("{dir}: {} entries, expected ~{per}", l.len())),
                            Err(e) => Err(e.to_string()),
                        }
                    }
                })
                .await
            }
            "rename" => {
                run_phase("rename", threads, n, move |t, i| {
                    let (c, path) = (c.clone(), f(t, i));
                    async move {
                        c.rename(&path, &format!("{path}.r"))
                            .await
                            .map_err(|e| e.to_string())
                    }
                })
                .await
            }
            "delete" => {
                let renamed = phases.iter().any(|p| p == "rename");
                run_phase("delete", threads, n, move |t, i| {
                    let c = c.clone();
                    let path = if renamed {
                        format!("{}.r", f(t, i))
                    } else {
                        f(t, i)
                    };
                    async move {
                        c.delete(&path, false)
                            .await
                            .map(drop)
                            .map_err(|e| e.to_string())
                    }
                })
                .await
            }
            other => bail!("unknown phase {other:?} (create,stat,open,list,rename,delete)"),
        };
        println!(
            "{:<8} {:>9} ops {:>8.2} s {:>10.0} ops/s {:>8.1} µs/op/task  errors {}{}",
            r.name,
            r.ops,
            r.secs,
            r.ops as f64 / r.secs,
            r.secs * 1e6 * threads as f64 / r.ops as f64,
            r.errors,
            r.first_error
                .as_ref()
                .map(|e| format!(" (first: {e})"))
                .unwrap_or_default()
        );
        results.push(r);
    }
    if !a.keep {
        c.delete(&root, true).await?;
    }
    let errors: u64 = results.iter().map(|r| r.errors).sum();
    if errors > 0 {
        bail!("{errors} operations failed");
    }
    Ok(())
}
