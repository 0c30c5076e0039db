//! `strata-ha-bench failover STRATA_BIN [ROUNDS]` and
//! `strata-ha-bench follower-reads STRATA_BIN [CPU_PERCENT] [SECONDS] [TASKS] [PERIOD_MS] [ROUNDS]`:
//! benchmarks of the replicated masters that need to kill and confine real
//! master processes (3 masters and a worker on 127.0.0.1, temp dirs).
//!
//! failover: a mixed metadata + data workload runs while the leader is
//! killed with SIGKILL ROUNDS times (it is restarted after each round); the
//! time from each kill to the first acknowledged write, the client-visible
//! errors, and a final check of every acknowledged write are reported.
//!
//! follower-reads: each master is confined to CPU_PERCENT of one core (its
//! own cgroup's cpu.max, enforced over periods of PERIOD_MS, default 10);
//! stat throughput is measured with reads sent to the leader only and then
//! spread over all masters, in the same run, by TASKS concurrent stat calls
//! (default 128). Each of ROUNDS rounds (default 3) gives every mode
//! SECONDS seconds in one-second slices, the modes taking turns, so that a
//! slow spell of the machine weighs on all three rather than on one; each
//! round's ratios and their medians are reported.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use strata_client::{Client, WriteOptions, WriteType};
use strata_testkit::HaCluster;

fn main() -> anyhow::Result<()> {
    let usage = "usage: strata-ha-bench failover STRATA_BIN [ROUNDS] | \
                 follower-reads STRATA_BIN [CPU_PERCENT] [SECONDS] [TASKS] [PERIOD_MS] [ROUNDS] | \
                 gen-namespace MASTER_DATA_DIR FILES [FILES_PER_DIR]";
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("gen-namespace") {
        let (Some(dir), Some(files)) = (args.get(1), args.get(2)) else {
            bail!("{usage}");
        };
        let per_dir = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(1000);
        return gen_namespace(std::path::Path::new(dir), files.parse()?, per_dir);
    }
    let (Some(mode), Some(bin)) = (args.first(), args.get(1)) else {
        bail!("{usage}");
    };
    let bin =
        std::fs::canonicalize(bin).with_context(|| format!("{bin}: no such strata binary"))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match mode.as_str() {
        "failover" => {
            let rounds = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(20);
            rt.block_on(failover(&bin, rounds))
        }
        "follower-reads" => {
            let pct: u64 = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(25);
            let secs: u64 = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(10);
            let tasks: usize = args.get(4).map(|s| s.parse()).transpose()?.unwrap_or(128);
            if secs == 0 {
                bail!(
                    "SECONDS must be at least 1 (each mode reads for that many one-second slices)"
                );
            }
            let period_ms: u64 = args.get(5).map(|s| s.parse()).transpose()?.unwrap_or(10);
            if !(1..=1000).contains(&period_ms) {
                bail!("PERIOD_MS must be 1 to 1000 (cgroup cpu.max periods), not {period_ms}");
            }
            let rounds: usize = args.get(6).map(|s| s.parse()).transpose()?.unwrap_or(3);
            if rounds == 0 {
                bail!("ROUNDS must be at least 1");
            }
            rt.block_on(follower_reads(&bin, pct, secs, tasks, period_ms, rounds))
        }
        _ => bail!("{usage}"),
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Builds a namespace of `files` empty MUST_CACHE files (`/ns/dN/fM`,
/// `per_dir` to a directory) directly in a master's metadata store, through
/// the same state-machine commands a master applies (CreateFile and
/// CompleteFile, in batches of one transaction), without Raft or RPCs: a
/// large namespace in minutes instead of hours, for measuring what a master
/// does with it (memory, bytes per inode, snapshots, a new master joining).
/// The directory must hold no master yet; a master started on it forms a
/// new cluster over this state.
fn gen_namespace(dir: &std::path::Path, files: u64, per_dir: u64) -> anyhow::Result<()> {
    use strata_meta::{Command, LoggedCommand, MetaStore, PersistState, ROOT_ID};
    if dir.join("raft-log.redb").exists() {
        bail!("{} already holds a master's log", dir.display());
    }
    std::fs::create_dir_all(dir)?;
    let store = MetaStore::open(dir)?;
    let started = Instant::now();
    let mut index = 0u64;
    let mut apply = |cmds: &[Command]| -> anyhow::Result<Vec<u64>> {
        let entries: Vec<LoggedCommand<'_>> = cmds
            .iter()
            .map(|c| {
                index += 1;
                LoggedCommand {
                    index,
                    command: Some(c),
                    request: None,
                    state: &[],
                }
            })
            .collect();
        let outs = store.apply_logged_batch(&entries, false)?;
        outs.into_iter()
            .map(|o| Ok(o?.inode.unwrap_or(0)))
            .collect()
    };
    let now = 1_796_000_000_000i64;
    let ns = apply(&[Command::Mkdir {
        parent: ROOT_ID,
        name: "ns".into(),
        mtime_ms: now,
        synced_ms: None,
    }])?[0];
    let dirs = files.div_ceil(per_dir.max(1));
    let mut made = 0u64;
    for d in 0..dirs {
        let dir_id = apply(&[Command::Mkdir {
            parent: ns,
            name: format!("d{d}"),
            mtime_ms: now,
            synced_ms: None,
        }])?[0];
        let n = per_dir.min(files - made);
        let creates: Vec<Command> = (0..n)
            .map(|f| Command::CreateFile {
                parent: dir_id,
                name: format!("f{f}"),
                mtime_ms: now,
                persist: PersistState::NotPersisted,
                overwrite: false,
            })
            .collect();
        let ids = apply(&creates)?;
        let completes: Vec<Command> = ids
            .into_iter()
            .map(|id| Command::CompleteFile {
                id,
                generation: 1,
                size: 0,
                fingerprint: String::new(),
                mtime_ms: now,
                xattrs: None,
            })
            .collect();
        apply(&completes)?;
        made += n;
        if d % 500 == 0 || made == files {
            eprintln!(
                "gen-namespace: {made} files in {:.1} s",
                started.elapsed().as_secs_f64()
            );
        }
    }
    store.flush()?;
    println!(
        "gen-namespace: {made} files in {dirs} directories, {} inodes, in {:.1} s",
        store.inode_count()?,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn cache_only() -> WriteOptions {
    WriteOptions {
        write_type: WriteType::MustCache,
        recursive: true,
        ..Default::default()
    }
}

#[derive(Default)]
struct Acks {
    dirs: Vec<String>,
    files: Vec<(String, Vec<u8>)>,
    errors: Vec<String>,
}

async fn failover(bin: &std::path::Path, rounds: usize) -> anyhow::Result<()> {
    let mut c = HaCluster::start(bin, 3, 1, Vec::new())?;
    let client = Client::new(&c.master_list(), Default::default())?;
    let acks = Arc::new(Mutex::new(Acks::default()));
    // (start, end) in µs since `epoch` of every acknowledged write.
    let acked: Arc<Mutex<Vec<(u64, u64)>>> = Arc::default();
    let epoch = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let workload = {
        let (client, acks, acked, stop) =
            (client.clone(), acks.clone(), acked.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0u64;
            // Bounded: at most ten million operations.
            while !stop.load(Ordering::Relaxed) && i < 10_000_000 {
                i += 1;
                let started = epoch.elapsed().as_micros() as u64;
                let r = if i.is_multiple_of(3) {
                    let path = format!("/failover/f{i}");
                    let data = format!("{i}").repeat(100).into_bytes();
                    client
                        .write_file(&path, &data, cache_only())
                        .await
                        .map(|_| acks.lock().unwrap().files.push((path, data)))
                } else if i % 3 == 1 {
                    let path = format!("/failover/d{i}");
                    client
                        .mkdir(&path, true)
                        .await
                        .map(|_| acks.lock().unwrap().dirs.push(path))
                } else {
                    client.stat("/failover").await.map(drop)
                };
                match r {
                    Ok(()) if i % 3 != 2 => acked
                        .lock()
                        .unwrap()
                        .push((started, epoch.elapsed().as_micros() as u64)),
                    Ok(()) => {}
                    Err(e) => acks.lock().unwrap().errors.push(e.to_string()),
                }
            }
        })
    };
    let mut times = Vec::new();
    for round in 1..=rounds {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let leader = client.list_masters().await?.leader_id;
        let killed = epoch.elapsed().as_micros() as u64;
        tokio::task::block_in_place(|| c.kill_master(leader))?;
        // The first write that was *sent* after the kill and acknowledged
        // (a write in flight at the kill may be answered just before it).
        let deadline = Instant::now() + Duration::from_secs(60);
        let first = loop {
            let found = acked
                .lock()
                .unwrap()
                .iter()
                .rev()
                .take_while(|(s, _)| *s > killed)
                .last()
                .map(|(_, e)| *e);
            if let Some(e) = found {
                break e;
            }
            if Instant::now() > deadline {
                bail!("round {round}: no write acknowledged within 60 s of killing the leader");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let dt = (first - killed) as f64 / 1e6;
        println!(
            "round {round:>2}: killed leader {leader}, first acknowledged write after {dt:.3} s"
        );
        times.push(dt);
        tokio::task::block_in_place(|| c.restart_master(leader))?;
    }
    stop.store(true, Ordering::Relaxed);
    workload.await?;
    let acks = std::mem::take(&mut *acks.lock().unwrap());
    for d in &acks.dirs {
        let i = client.stat(d).await.with_context(|| format!("{d} lost"))?;
        if !i.is_dir {
            bail!("{d} is no longer a directory");
        }
    }
    for (p, data) in &acks.files {
        let got = client
            .read_file(p)
            .await
            .with_context(|| format!("{p} lost"))?;
        if got.as_ref() != data.as_slice() {
            bail!("{p}: different bytes");
        }
    }
    times.sort_by(f64::total_cmp);
    println!(
        "failover over {rounds} kills: min {:.3} s, median {:.3} s, max {:.3} s; \
         {} directories and {} files acknowledged, all present; {} client-visible errors",
        times[0],
        times[times.len() / 2],
        times[times.len() - 1],
        acks.dirs.len(),
        acks.files.len(),
        acks.errors.len()
    );
    for e in acks.errors.iter().take(5) {
        println!("  error: {e}");
    }
    Ok(())
}

/// A CPU cgroup per master capping it at a share of one core (cgroup v2
/// `cpu.max`, or v1 `cpu.cfs_quota_us`), removed on drop.
struct CpuCaps {
    dirs: Vec<PathBuf>,
    pids: Vec<u32>,
    /// Where processes go back to before a directory is removed.
    parent_procs: PathBuf,
}

impl CpuCaps {
    /// Each pid in its own cgroup, held to `percent` of one core over
    /// periods of `period_ms`.
    fn new(pids: &[u32], percent: u64, period_ms: u64) -> anyhow::Result<CpuCaps> {
        let v2 = std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
        let root = if v2 {
            PathBuf::from("/sys/fs/cgroup")
        } else {
            PathBuf::from("/sys/fs/cgroup/cpu")
        };
        if !root.join("cgroup.procs").exists() {
            bail!("no CPU cgroup hierarchy at {}", root.display());
        }
        if v2 {
            std::fs::write(root.join("cgroup.subtree_control"), "+cpu")
                .context("enabling the cpu controller in /sys/fs/cgroup")?;
        }
        let mut caps = CpuCaps {
            dirs: Vec::new(),
            pids: pids.to_vec(),
            parent_procs: root.join("cgroup.procs"),
        };
        // A short period keeps a capped master from running in long bursts
        // and then stalling every request for the rest of the period.
        let period = period_ms * 1000;
        let quota = period * percent / 100;
        if quota < 1000 {
            bail!(
                "{percent}% of a {period_ms} ms period is under 1 ms, the shortest quota \
                 cgroups accept: use a longer period or a larger share"
            );
        }
        for (i, pid) in pids.iter().enumerate() {
            let d = root.join(format!("strata-ha-bench-{}-{i}", std::process::id()));
            std::fs::create_dir(&d).with_context(|| format!("creating {}", d.display()))?;
            caps.dirs.push(d.clone());
            if v2 {
                std::fs::write(d.join("cpu.max"), format!("{quota} {period}"))?;
            } else {
                std::fs::write(d.join("cpu.cfs_period_us"), period.to_string())?;
                std::fs::write(d.join("cpu.cfs_quota_us"), quota.to_string())?;
            }
            std::fs::write(d.join("cgroup.procs"), pid.to_string())
                .with_context(|| format!("moving pid {pid} into {}", d.display()))?;
        }
        Ok(caps)
    }

    /// CPU time used so far by each capped process (µs, from
    /// `/proc/PID/stat`: user + system time of all its threads).
    fn usage_us(&self) -> Vec<u64> {
        self.pids.iter().map(|p| cpu_us(&p.to_string())).collect()
    }
}

/// User + system CPU time of process `pid` ("self" for this one), in µs.
fn cpu_us(pid: &str) -> u64 {
    let tick_us = 1_000_000 / 100; // USER_HZ
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime and
    // stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    f.iter().sum::<u64>() * tick_us
}

/// What one read mode achieved over its slices of a round: calls, wall
/// time, and CPU time of each master and of this process.
#[derive(Default)]
struct Phase {
    ops: u64,
    secs: f64,
    masters_us: Vec<u64>,
    client_us: u64,
}

impl Phase {
    fn rate(&self) -> f64 {
        self.ops as f64 / self.secs.max(1e-9)
    }

    fn report(&self, what: &str) {
        let share = |us: u64| us as f64 / 1e6 / self.secs.max(1e-9) * 100.0;
        let shares: Vec<String> = self
            .masters_us
            .iter()
            .map(|u| format!("{:.1}%", share(*u)))
            .collect();
        println!(
            "{what}: {:.0} stats/s; CPU per master {}; client {:.0}% of a core",
            self.rate(),
            shares.join(" / "),
            share(self.client_us)
        );
    }
}

impl Drop for CpuCaps {
    fn drop(&mut self) {
        for d in &self.dirs {
            if let Ok(pids) = std::fs::read_to_string(d.join("cgroup.procs")) {
                for p in pids.lines() {
                    let _ = std::fs::write(&self.parent_procs, p);
                }
            }
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// Runs `tasks` concurrent stat loops on `client` for `secs` seconds and adds
/// the calls, time and CPU used to `phase` (a failed stat fails the run).
async fn stat_slice(
    caps: &CpuCaps,
    client: &Client,
    files: &Arc<[String]>,
    secs: f64,
    tasks: usize,
    phase: &mut Phase,
) -> anyhow::Result<()> {
    let ops = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let (masters, me, t) = (caps.usage_us(), cpu_us("self"), Instant::now());
    let until = t + Duration::from_secs_f64(secs);
    let n = tasks;
    let mut handles = Vec::new();
    for k in 0..n {
        let (client, ops, errors, files) =
            (client.clone(), ops.clone(), errors.clone(), files.clone());
        handles.push(tokio::spawn(async move {
            let mut i = k;
            while Instant::now() < until {
                match client.stat(&files[i % files.len()]).await {
                    Ok(_) => ops.fetch_add(1, Ordering::Relaxed),
                    Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                };
                i += n;
            }
        }));
    }
    for h in handles {
        h.await?;
    }
    phase.secs += t.elapsed().as_secs_f64();
    phase.client_us += cpu_us("self").saturating_sub(me);
    let used = caps.usage_us();
    phase.masters_us.resize(used.len(), 0);
    for (i, (a, b)) in used.iter().zip(&masters).enumerate() {
        phase.masters_us[i] += a.saturating_sub(*b);
    }
    phase.ops += ops.load(Ordering::Relaxed);
    let e = errors.load(Ordering::Relaxed);
    if e > 0 {
        bail!("{e} stats failed");
    }
    Ok(())
}

async fn follower_reads(
    bin: &std::path::Path,
    percent: u64,
    secs: u64,
    tasks: usize,
    period_ms: u64,
    rounds: usize,
) -> anyhow::Result<()> {
    let c = HaCluster::start(bin, 3, 1, Vec::new())?;
    let client = Client::new(&c.master_list(), Default::default())?;
    let mut files = Vec::new();
    for i in 0..2000 {
        let p = format!("/reads/d{}/f{i}", i % 20);
        client.write_file(&p, b"", cache_only()).await?;
        files.push(p);
    }
    let pids: Vec<u32> = c.masters.iter().filter_map(|m| m.pid()).collect();
    let caps = CpuCaps::new(&pids, percent, period_ms)?;
    let addrs = c.master_list();
    const MODES: [&str; 3] = ["leader", "any", "any-stale"];
    let mut clients = Vec::new();
    for mode in MODES {
        let cfg = strata_common::config::ClientConfig {
            read_from: mode.into(),
            ..Default::default()
        };
        let client = Client::new(&addrs, cfg)?;
        client.stat(&files[0]).await?;
        clients.push(client);
    }
    let files: Arc<[String]> = files.into();
    let (mut lin, mut stale) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        // The modes take turns in slices of a second (each slice's turn
        // order rotated), so a slow spell of the machine falls on all three
        // rather than on one.
        let mut phases: [Phase; 3] = Default::default();
        for slice in 0..secs as usize {
            for k in 0..MODES.len() {
                let m = (slice + k) % MODES.len();
                stat_slice(&caps, &clients[m], &files, 1.0, tasks, &mut phases[m])
                    .await
                    .with_context(|| format!("reads from {}", MODES[m]))?;
            }
        }
        for (mode, p) in MODES.iter().zip(&phases) {
            p.report(mode);
        }
        let (leader, any, st) = (phases[0].rate(), phases[1].rate(), phases[2].rate());
        lin.push(any / leader);
        stale.push(st / leader);
        println!(
            "round {round}: stats/s with each master held to {percent}% of a core \
             ({period_ms} ms periods), {tasks} calls in flight, modes alternating each second: \
             leader only {leader:.0}; \
             all 3 masters (linearizable) {any:.0} = {:.2}x; all 3 (bounded staleness) {st:.0} = {:.2}x",
            any / leader,
            st / leader
        );
    }
    println!(
        "median of {rounds} rounds: all 3 masters (linearizable) {:.2}x the leader alone; \
         all 3 (bounded staleness) {:.2}x",
        median(&mut lin),
        median(&mut stale)
    );
    Ok(())
}
