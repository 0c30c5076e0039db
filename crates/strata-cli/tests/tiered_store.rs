//! The worker's tiered block store, end to end: a MEM tier on tmpfs over an
//! SSD tier, with real `strata` processes and a real S3 server on loopback.
//! Restart survival under kill -9, checksums on disk, priority budgets,
//! pinning, and spilling under a real cgroup memory limit.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use strata_testkit::ClusterOptions;

/// Tier directories owned by a test: MEM on /dev/shm (tmpfs), SSD in /tmp.
struct TierDirs {
    mem: tempfile::TempDir,
    ssd: tempfile::TempDir,
}

impl TierDirs {
    fn new() -> TierDirs {
        TierDirs {
            mem: tempfile::tempdir_in("/dev/shm").expect("tmpfs dir in /dev/shm"),
            ssd: tempfile::tempdir().expect("ssd dir"),
        }
    }

    fn spec(&self, mem: &str, ssd: &str) -> String {
        format!(
            "MEM:{}:{mem}:lru; SSD:{}:{ssd}:arc",
            self.mem.path().display(),
            self.ssd.path().display()
        )
    }

    fn page_files(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for sub in std::fs::read_dir(dir.join("pages"))
            .into_iter()
            .flatten()
            .flatten()
        {
            for f in std::fs::read_dir(sub.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                out.push(f.path());
            }
        }
        out.sort();
        out
    }
}

fn opts(env: Vec<(&str, String)>) -> ClusterOptions {
    ClusterOptions {
        env: env.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        ..Default::default()
    }
}

/// Reads `path` with `strata fs cat` in a loop on two threads until told to
/// stop (at most 200 rounds each). Every read that succeeds must return the
/// right bytes; reads that fail while the worker is down are counted.
struct Readers {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<Result<(), String>>>,
}

impl Readers {
    fn start(master: &str, path: &str, expected: Arc<Vec<u8>>) -> Readers {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let threads = (0..2)
            .map(|_| {
                let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
                let (master, path, expected) =
                    (master.to_string(), path.to_string(), expected.clone());
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let out = Command::new(strata_bin())
                            .args(["--master", &master, "fs", "cat", &path])
                            .env("STRATA_LOG", "off")
                            .env("STRATA_CLIENT_IO_TIMEOUT_SECS", "2")
                            .output()
                            .map_err(|e| e.to_string())?;
                        if out.status.success() {
                            if out.stdout != *expected {
                                return Err(format!(
                                    "a read returned {} wrong bytes",
                                    out.stdout.len()
                                ));
                            }
                            ok.fetch_add(1, Ordering::Relaxed);
                        } else {
                            failed.fetch_add(1, Ordering::Relaxed);
                            std::thread::sleep(Duration::from_millis(50));
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        Readers {
            stop,
            ok,
            failed,
            threads,
        }
    }

    fn wait_ok(&self, at_least: u64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.ok.load(Ordering::Relaxed) < at_least && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join()
                .expect("reader thread")
                .expect("reader saw wrong bytes");
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn kill9_under_reads_then_cached_pages_are_served_without_ufs_reads() {
    let dirs = TierDirs::new();
    let mut env = start(opts(vec![(
        "STRATA_WORKER_TIERS",
        dirs.spec("12MiB", "256MiB"),
    )]));
    let s3 = s3_client(&env.s3);
    let data = Arc::new(pattern(40 << 20, 11));
    s3_put(&s3, "hot/obj", &data).await;
    ok(env.cluster.cli(&["fs", "load", "/s3/hot/obj"]).unwrap());
    let c = client(&env.cluster);
    let st = worker_stats(&c).await;
    assert_eq!(st.ufs_bytes_read, 40 << 20);
    let (mem, ssd) = (&st.tiers[0], &st.tiers[1]);
    assert_eq!((mem.medium.as_str(), ssd.medium.as_str()), ("MEM", "SSD"));
    assert_eq!(mem.used_bytes, 12 << 20, "MEM full");
    assert_eq!(ssd.used_bytes, 28 << 20, "the rest demoted to SSD");
    assert_eq!(mem.demotions, 28);

    // kill -9 while two readers are reading, then start again.
    let readers = Readers::start(&env.cluster.master_addr, "/s3/hot/obj", data.clone());
    readers.wait_ok(2);
    env.cluster.restart().unwrap();
    let ok_before = readers.ok.load(Ordering::Relaxed);
    readers.wait_ok(ok_before + 4);
    let (reads_ok, reads_failed) = readers.finish();
    assert!(
        reads_ok >= ok_before + 4,
        "readers recovered after the restart"
    );
    eprintln!("reads: {reads_ok} correct, {reads_failed} failed while the worker was down");

    let c = client(&env.cluster);
    assert_eq!(&c.read_file("/s3/hot/obj").await.unwrap()[..], &data[..]);
    let st = worker_stats(&c).await;
    assert_eq!(
        st.ufs_bytes_read, 0,
        "restarted worker read nothing from S3"
    );
    assert_eq!(st.corrupt_pages, 0);
    assert_eq!(st.tiers[0].used_bytes + st.tiers[1].used_bytes, 40 << 20);
    assert!(st.tiers[1].hits > 0, "SSD pages served after the restart");

    // A page damaged on disk while the worker is down is dropped and
    // refetched, never served.
    env.cluster.kill();
    let victim = TierDirs::page_files(dirs.ssd.path())
        .into_iter()
        .next()
        .expect("an SSD page");
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[4096] ^= 0x5a;
    std::fs::write(&victim, bytes).unwrap();
    env.cluster.restart().unwrap();
    let c = client(&env.cluster);
    assert_eq!(&c.read_file("/s3/hot/obj").await.unwrap()[..], &data[..]);
    let st = worker_stats(&c).await;
    assert_eq!(st.corrupt_pages, 1);
    assert_eq!(
        st.ufs_bytes_read,
        1 << 20,
        "only the corrupt page was refetched"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn priority_budgets_keep_their_mem_share() {
    let dirs = TierDirs::new();
    let env = start(opts(vec![
        ("STRATA_WORKER_TIERS", dirs.spec("256MiB", "256MiB")),
        ("STRATA_WORKER_PRIORITY_MEM_BASE", "4MiB".into()),
        ("STRATA_WORKER_PRIORITY_MEM_STEP", "2MiB".into()),
    ]));
    let local = tempfile::tempdir().unwrap();
    let file = local.path().join("shuffle.bin");
    let data = pattern(24 << 20, 5);
    std::fs::write(&file, &data).unwrap();
    let f = file.to_str().unwrap();
    for (p, dst) in [("0", "/s3/shuffle/p0"), ("8", "/s3/shuffle/p8")] {
        ok(env
            .cluster
            .cli(&["fs", "put", "--priority", p, f, dst])
            .unwrap());
    }
    let bad = fails(
        env.cluster
            .cli(&["fs", "put", "--priority", "9", f, "/s3/shuffle/p9"])
            .unwrap(),
    );
    assert!(bad.contains("9") && bad.contains("0..=8"), "{bad}");

    let c = client(&env.cluster);
    let st = worker_stats(&c).await;
    let p = |n: usize| (st.priorities[n].mem_bytes, st.priorities[n].disk_bytes);
    // base 4 MiB + priority × 2 MiB in MEM, the rest on disk.
    assert_eq!(p(0), (4 << 20, 20 << 20));
    assert_eq!(p(8), (20 << 20, 4 << 20));
    assert_eq!(st.tiers[0].used_bytes, 24 << 20);
    assert_eq!(st.tiers[1].used_bytes, 24 << 20);
    let report = ok(env.cluster.cli(&["admin", "report"]).unwrap());
    assert!(
        report.contains("priority 8: 20.0 MiB MEM, 4.0 MiB disk"),
        "{report}"
    );
    assert!(report.contains("MEM") && report.contains("SSD"), "{report}");
    for dst in ["/s3/shuffle/p0", "/s3/shuffle/p8"] {
        assert_eq!(&c.read_file(dst).await.unwrap()[..], &data[..]);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn pinned_files_stay_cached_until_unpinned() {
    let env = start(ClusterOptions {
        cache_capacity: "24MiB".into(),
        ..Default::default()
    });
    let s3 = s3_client(&env.s3);
    let a = pattern(8 << 20, 1);
    s3_put(&s3, "a", &a).await;
    s3_put(&s3, "b", &pattern(20 << 20, 2)).await;
    let out = ok(env.cluster.cli(&["fs", "pin", "/s3/a"]).unwrap());
    assert!(out.contains("pinned 1 files"), "{out}");
    let c = client(&env.cluster);
    assert_eq!(pinned_bytes(&c).await, 8 << 20);
    // Loading 20 MiB into the 16 MiB left evicts, but never the pinned file.
    ok(env.cluster.cli(&["fs", "load", "/s3/b"]).unwrap());
    let before = ufs_bytes_read(&c).await;
    assert_eq!(&c.read_file("/s3/a").await.unwrap()[..], &a[..]);
    assert_eq!(
        ufs_bytes_read(&c).await,
        before,
        "pinned file served from cache"
    );

    let out = ok(env.cluster.cli(&["fs", "unpin", "/s3/a"]).unwrap());
    assert!(out.contains("unpinned 1 files (8 cached pages)"), "{out}");
    assert_eq!(pinned_bytes(&c).await, 0);
    // Now b's pages push a's out.
    ok(env.cluster.cli(&["fs", "load", "/s3/b"]).unwrap());
    let st = worker_stats(&c).await;
    assert!(st.evictions > 0);
    let err = fails(env.cluster.cli(&["fs", "pin", "/s3/missing"]).unwrap());
    assert!(err.contains("/s3/missing"), "{err}");
}

/// A memory cgroup made for one test, removed on drop.
struct Cgroup {
    dir: PathBuf,
}

impl Cgroup {
    /// A child of this process's memory cgroup with `limit` bytes, or
    /// `None` (with the reason) where cgroups cannot be made.
    fn create(limit: u64) -> Result<Cgroup, String> {
        let text = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| e.to_string())?;
        let v1 = text.lines().find_map(|l| {
            let mut p = l.splitn(3, ':');
            let (_, ctrls, path) = (p.next()?, p.next()?, p.next()?);
            ctrls
                .split(',')
                .any(|c| c == "memory")
                .then(|| path.to_string())
        });
        let (base, v2) = match v1 {
            Some(p) => (
                Path::new("/sys/fs/cgroup/memory").join(p.trim_start_matches('/')),
                false,
            ),
            None => {
                let p = text
                    .lines()
                    .find_map(|l| l.strip_prefix("0::"))
                    .ok_or("no cgroup")?;
                (
                    Path::new("/sys/fs/cgroup").join(p.trim_start_matches('/')),
                    true,
                )
            }
        };
        let dir = base.join(format!(
            "strata-test-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
        let cg = Cgroup { dir };
        let file = if v2 {
            "memory.max"
        } else {
            "memory.limit_in_bytes"
        };
        std::fs::write(cg.dir.join(file), limit.to_string())
            .map_err(|e| format!("setting {file}: {e}"))?;
        Ok(cg)
    }

    /// Memory figures of the cgroup, for failure messages.
    fn summary(&self) -> String {
        let stat = std::fs::read_to_string(self.dir.join("memory.stat")).unwrap_or_default();
        let keep = [
            "total_rss ",
            "total_shmem ",
            "total_cache ",
            "total_dirty ",
            "total_writeback ",
            "anon ",
            "shmem ",
            "file_dirty ",
        ];
        let max =
            std::fs::read_to_string(self.dir.join("memory.max_usage_in_bytes")).unwrap_or_default();
        let figures: Vec<&str> = stat
            .lines()
            .filter(|l| keep.iter().any(|k| l.starts_with(k)))
            .collect();
        format!("max usage {}; {}", max.trim(), figures.join(", "))
    }

    fn oom_kills(&self) -> u64 {
        for (file, key) in [
            ("memory.oom_control", "oom_kill "),
            ("memory.events", "oom_kill "),
        ] {
            if let Ok(t) = std::fs::read_to_string(self.dir.join(file))
                && let Some(v) = t.lines().find_map(|l| l.strip_prefix(key))
            {
                return v.trim().parse().unwrap_or(0);
            }
        }
        0
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // The processes are gone by now; the kernel may take a moment.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0)
}

/// Loads a 384 MiB object into a 1 GiB MEM tier while the worker runs in a
/// cgroup limited to 256 MiB. Tmpfs pages count against the limit and
/// cannot be reclaimed, so without the memory watch the kernel OOM-kills
/// the worker (checked first, as a control); with a 128 MiB floor the worker
/// spills MEM pages to SSD, survives, and every byte reads back.
#[tokio::test(flavor = "multi_thread")]
async fn memory_pressure_spills_to_disk_instead_of_oom() {
    let size: usize = 384 << 20;
    let data = pattern(size, 21);
    let mut runs = Vec::new();
    for floor in ["0", "128MiB"] {
        let cg = match Cgroup::create(256 << 20) {
            Ok(cg) => cg,
            Err(why) => {
                eprintln!("SKIPPED: cannot create a memory cgroup here ({why})");
                return;
            }
        };
        let dirs = TierDirs::new();
        let mut env = start(ClusterOptions {
            env: vec![
                ("STRATA_WORKER_TIERS".into(), dirs.spec("1GiB", "1GiB")),
                ("STRATA_WORKER_MEMORY_FLOOR".into(), floor.into()),
                ("STRATA_WORKER_MEMORY_CHECK_INTERVAL_MS".into(), "50".into()),
                // The control run's process is killed: do not wait 30 s
                // for a master that will not come back.
                ("STRATA_CLIENT_FAILOVER_TIMEOUT_SECS".into(), "5".into()),
            ],
            cgroup: Some(cg.dir.clone()),
            ..Default::default()
        });
        let s3 = s3_client(&env.s3);
        s3_put(&s3, "big", &data).await;
        let load = env.cluster.cli(&["fs", "load", "/s3/big"]).unwrap();
        let alive = env.cluster.alive();
        let oom = cg.oom_kills();
        if floor == "0" {
            // The control: nothing watches memory, the kernel kills.
            assert!(
                !alive || oom > 0,
                "without a floor the worker should have been OOM-killed (load: {:?})",
                String::from_utf8_lossy(&load.stderr)
            );
            runs.push(format!("floor 0: OOM kills {oom}, worker alive: {alive}"));
        } else {
            assert!(
                load.status.success(),
                "load failed: {} (OOM kills {oom}; {})",
                String::from_utf8_lossy(&load.stderr),
                cg.summary()
            );
            assert!(alive, "worker survived");
            assert_eq!(oom, 0, "no OOM kill in the cgroup");
            let c = client(&env.cluster);
            let before = worker_stats(&c).await;
            assert!(before.tiers[0].spills > 0, "MEM pages spilled");
            assert_eq!(
                before.tiers[0].used_bytes + before.tiers[1].used_bytes,
                size as u64
            );
            assert_eq!(&c.read_file("/s3/big").await.unwrap()[..], &data[..]);
            let after = worker_stats(&c).await;
            assert_eq!(
                after.ufs_bytes_read, before.ufs_bytes_read,
                "read back from cache"
            );
            assert_eq!(after.corrupt_pages, 0);
            runs.push(format!(
                "floor 128MiB: spilled {} pages, MEM {} MiB, SSD {} MiB, alive",
                before.tiers[0].spills,
                before.tiers[0].used_bytes >> 20,
                before.tiers[1].used_bytes >> 20
            ));
        }
        drop(env);
        drop(dirs);
        drop(cg);
    }
    eprintln!("{}", runs.join("; "));
}
