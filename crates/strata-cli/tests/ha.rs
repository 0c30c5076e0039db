//! Highly available metadata: 3 masters as separate processes on loopback,
//! killed with SIGKILL, stopped with SIGSTOP, wiped, corrupted and replaced,
//! while a client keeps working. Every acknowledged write must survive.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use strata_client::{Client, WriteOptions, WriteType};
use strata_testkit::HaCluster;

fn cluster(workers: usize, env: &[(&str, &str)]) -> HaCluster {
    let env = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    HaCluster::start(&common::strata_bin(), 3, workers, env).expect("HA cluster")
}

fn client(c: &HaCluster) -> Client {
    Client::new(&c.master_list(), Default::default()).expect("client")
}

fn cache_only() -> WriteOptions {
    WriteOptions {
        write_type: WriteType::MustCache,
        recursive: true,
        ..Default::default()
    }
}

/// What a workload got acknowledged, and every error it saw.
#[derive(Default)]
struct Log {
    dirs: Vec<String>,
    files: Vec<(String, Vec<u8>)>,
    errors: Vec<String>,
    /// When each acknowledged write finished.
    acks: Vec<Instant>,
}

/// Mixed metadata + data workload until `stop`: mkdir, small file writes,
/// stats and reads of earlier writes. Bounded by `max_ops`.
async fn workload(c: Client, prefix: String, stop: Arc<AtomicBool>, max_ops: usize) -> Log {
    let mut log = Log::default();
    for i in 0..max_ops {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        if i % 4 == 3 {
            let path = format!("{prefix}/f{i}");
            let data = format!("file {i} of {prefix}").repeat(50).into_bytes();
            match c.write_file(&path, &data, cache_only()).await {
                Ok(_) => {
                    log.files.push((path, data));
                    log.acks.push(Instant::now());
                }
                Err(e) => log.errors.push(format!("write {path}: {e}")),
            }
        } else if i % 4 == 2 && !log.files.is_empty() {
            let (p, d) = &log.files[i % log.files.len()];
            match c.read_file(p).await {
                Ok(b) if b.as_ref() == d.as_slice() => {}
                Ok(_) => log.errors.push(format!("read {p}: wrong bytes")),
                Err(e) => log.errors.push(format!("read {p}: {e}")),
            }
        } else {
            let path = format!("{prefix}/d{i}");
            match c.mkdir(&path, true).await {
                Ok(_) => {
                    log.dirs.push(path);
                    log.acks.push(Instant::now());
                }
                Err(e) => log.errors.push(format!("mkdir {path}: {e}")),
            }
        }
    }
    log
}

/// Every acknowledged directory and file is there with its bytes.
async fn check_all_present(c: &Client, log: &Log) {
    for d in &log.dirs {
        let info = c.stat(d).await.unwrap_or_else(|e| panic!("{d} lost: {e}"));
        assert!(info.is_dir, "{d}");
    }
    for (p, data) in &log.files {
        let got = c
            .read_file(p)
            .await
            .unwrap_or_else(|e| panic!("{p} lost: {e}"));
        assert_eq!(got.as_ref(), data.as_slice(), "{p}");
    }
}

fn leader(c: &HaCluster) -> u64 {
    c.wait_leader(Duration::from_secs(30)).expect("leader")
}

/// Waits until every running master reports the same inode count and
/// applied index as the leader (all caught up).
fn wait_converged(c: &HaCluster) -> Vec<(u64, String)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut seen = Vec::new();
        for m in c.masters.iter().filter(|m| m.running()) {
            let out = c
                .cli_at(&m.addr, &["admin", "masters", "list"])
                .expect("cli");
            let s = String::from_utf8_lossy(&out.stdout).to_string();
            let first = s.lines().next().unwrap_or("").to_string();
            let inodes = first.rsplit("inodes: ").next().unwrap_or("").to_string();
            seen.push((m.id, inodes));
        }
        if seen.windows(2).all(|w| w[0].1 == w[1].1) && !seen.is_empty() {
            return seen;
        }
        if Instant::now() > deadline {
            panic!("masters never converged: {seen:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_during_a_workload_loses_no_acknowledged_write() {
    let mut c = cluster(1, &[]);
    let cl = client(&c);
    let stop = Arc::new(AtomicBool::new(false));
    let task = tokio::spawn(workload(cl.clone(), "/ha".into(), stop.clone(), 20_000));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let old = leader(&c);
    let killed_at = Instant::now();
    c.kill_master(old).expect("kill");
    let new = tokio::task::block_in_place(|| leader(&c));
    assert_ne!(new, old);
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let log = task.await.expect("workload");
    assert!(
        log.errors.is_empty(),
        "client-visible errors: {:?}",
        log.errors
    );
    let first_after = log
        .acks
        .iter()
        .find(|t| **t > killed_at)
        .expect("writes resumed after the kill");
    eprintln!(
        "failover: first acknowledged write {:?} after the kill; {} dirs and {} files acknowledged",
        first_after.duration_since(killed_at),
        log.dirs.len(),
        log.files.len()
    );
    assert!(
        log.dirs.len() > 20 && log.files.len() > 5,
        "too little work done"
    );
    check_all_present(&cl, &log).await;
    // The killed master comes back as a follower and catches up.
    tokio::task::block_in_place(|| {
        c.restart_master(old).expect("restart");
        wait_converged(&c);
    });
    assert_eq!(leader(&c), new, "the restarted master must not take over");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_leader_is_replaced_and_steps_down_when_it_wakes() {
    let mut c = cluster(1, &[]);
    let cl = client(&c);
    cl.mkdir("/before", true).await.expect("mkdir");
    let old = leader(&c);
    // SIGSTOP: the old leader is cut off from the others (a minority of one)
    // and still believes it leads when it wakes.
    c.pause_master(old, true).expect("stop");
    let stop = Arc::new(AtomicBool::new(false));
    let task = tokio::spawn(workload(
        cl.clone(),
        "/stopped".into(),
        stop.clone(),
        20_000,
    ));
    let new = tokio::task::block_in_place(|| leader(&c));
    assert_ne!(new, old);
    tokio::time::sleep(Duration::from_secs(2)).await;
    c.pause_master(old, false).expect("cont");
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let log = task.await.expect("workload");
    assert!(
        log.errors.is_empty(),
        "client-visible errors: {:?}",
        log.errors
    );
    assert!(!log.dirs.is_empty());
    // No split brain: every master names the same leader, the new one.
    tokio::task::block_in_place(|| {
        wait_converged(&c);
        for m in &c.masters {
            assert_eq!(c.leader_seen_by(&m.addr), Some(new), "master {}", m.id);
        }
    });
    // A write sent to the old leader only is redirected, not applied there alone.
    let at_old = Client::new(&c.masters[(old - 1) as usize].addr, Default::default()).unwrap();
    at_old
        .mkdir("/via-old", true)
        .await
        .expect("redirected write");
    check_all_present(&cl, &log).await;
    cl.stat("/before").await.expect("earlier write kept");
    cl.stat("/via-old").await.expect("redirected write visible");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_or_corrupted_follower_catches_up_from_a_snapshot() {
    // Small snapshot interval: the log is compacted, so a master that lost
    // its data must be sent a snapshot.
    let mut c = cluster(1, &[("STRATA_MASTER_RAFT_SNAPSHOT_EVERY", "50")]);
    let cl = client(&c);
    let l = leader(&c);
    let follower = c.masters.iter().find(|m| m.id != l).unwrap().id;
    let other = c
        .masters
        .iter()
        .find(|m| m.id != l && m.id != follower)
        .unwrap()
        .id;
    let stop = Arc::new(AtomicBool::new(false));
    let log = workload(cl.clone(), "/w1".into(), stop.clone(), 400).await;
    assert!(log.errors.is_empty(), "{:?}", log.errors);

    // Wiped data directory.
    c.kill_master(follower).unwrap();
    let dir = c
        .masters
        .iter()
        .find(|m| m.id == follower)
        .unwrap()
        .data_dir
        .clone();
    std::fs::remove_dir_all(&dir).unwrap();
    let log2 = workload(cl.clone(), "/w2".into(), stop.clone(), 200).await;
    assert!(log2.errors.is_empty(), "{:?}", log2.errors);
    tokio::task::block_in_place(|| {
        c.restart_master(follower).expect("restart wiped");
        wait_converged(&c);
    });

    // Corrupted log tail on another follower: garbage over the end of its
    // Raft log file. It either recovers (redb rolls back to its last good
    // commit) or refuses to start naming the file and the way out; the
    // cluster keeps serving either way and loses nothing.
    c.kill_master(other).unwrap();
    let odir = c
        .masters
        .iter()
        .find(|m| m.id == other)
        .unwrap()
        .data_dir
        .clone();
    let log_file = odir.join("raft-log.redb");
    let len = std::fs::metadata(&log_file).unwrap().len();
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&log_file)
            .unwrap();
        f.seek(SeekFrom::Start(len.saturating_sub(4096))).unwrap();
        f.write_all(&[0xA5; 4096]).unwrap();
    }
    let log3 = workload(cl.clone(), "/w3".into(), stop.clone(), 100).await;
    assert!(log3.errors.is_empty(), "{:?}", log3.errors);
    let restarted = tokio::task::block_in_place(|| c.restart_master(other));
    match restarted {
        Ok(()) => {
            let seen = tokio::task::block_in_place(|| wait_converged(&c));
            eprintln!("master with a damaged log tail recovered and caught up: {seen:?}");
        }
        Err(e) => {
            let msg = format!("{e:#}");
            eprintln!("master with a damaged log tail refused to start: {msg}");
            assert!(
                msg.contains("raft-log.redb") || msg.contains("Raft log"),
                "a master with a damaged log must say which file: {msg}"
            );
        }
    }
    for l in [&log, &log2, &log3] {
        check_all_present(&cl, l).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_masters_replaced_one_by_one_under_a_read_workload() {
    let mut c = cluster(1, &[]);
    let cl = client(&c);
    cl.write_file("/model/weights.bin", &vec![7u8; 300_000], cache_only())
        .await
        .expect("write");
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let cl = cl.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let (mut ok, mut errors) = (0u64, Vec::new());
            while !stop.load(Ordering::Relaxed) && ok < 1_000_000 {
                match cl.read_file("/model/weights.bin").await {
                    Ok(b) if b.len() == 300_000 => ok += 1,
                    Ok(b) => errors.push(format!("short read {}", b.len())),
                    Err(e) => errors.push(e.to_string()),
                }
                match cl.list("/model").await {
                    Ok(l) if l.len() == 1 => {}
                    Ok(l) => errors.push(format!("listing of {} entries", l.len())),
                    Err(e) => errors.push(e.to_string()),
                }
            }
            (ok, errors)
        })
    };
    let old: Vec<u64> = c.masters.iter().map(|m| m.id).collect();
    for id in old {
        tokio::task::block_in_place(|| {
            let new = c.add_master().expect("add");
            c.remove_master(id).expect("remove");
            eprintln!("replaced master {id} by {new}");
        });
        // Clients re-read the member list every 3 s (docs/ARCHITECTURE.md);
        // an operator replaces the next master after that.
        tokio::time::sleep(Duration::from_secs(4)).await;
    }
    // Only new masters now, at new addresses; the client and the worker
    // were configured with the old ones.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let (ok, errors) = reader.await.unwrap();
    assert!(
        errors.is_empty(),
        "read errors during replacement: {errors:?}"
    );
    assert!(ok > 10, "only {ok} reads");
    let masters = cl.list_masters().await.expect("masters");
    assert_eq!(masters.masters.len(), 3);
    assert!(masters.masters.iter().all(|m| m.id > 3), "{masters:?}");
    let workers = cl.workers().await.expect("workers");
    assert!(
        workers.iter().any(|w| w.live),
        "the worker follows the new masters: {workers:?}"
    );
    cl.mkdir("/after", true)
        .await
        .expect("write after replacement");
    let b = cl.read_file("/model/weights.bin").await.expect("read");
    assert_eq!(b.len(), 300_000);
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_stats_share_calls_and_each_gets_its_own_answer() {
    let c = cluster(0, &[]);
    let client = client(&c);
    for i in 0..50 {
        client
            .write_file(&format!("/st/f{i}"), b"", cache_only())
            .await
            .unwrap();
    }
    client.mkdir("/st/dir", false).await.unwrap();
    // 600 stats at once (more than one call carries), from every master:
    // existing files, missing ones, a directory, a path through a file,
    // and a path that does not parse.
    let mut tasks = Vec::new();
    for i in 0..600usize {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let path = match i % 6 {
                0 | 1 => format!("/st/f{}", i % 50),
                2 => format!("/st/missing{i}"),
                3 => "/st/dir".to_string(),
                4 => format!("/st/f{}/below", i % 50),
                _ => "relative/path".to_string(),
            };
            (i, path.clone(), client.stat(&path).await)
        }));
    }
    for t in tasks {
        let (i, path, r) = t.await.unwrap();
        match i % 6 {
            0 | 1 => {
                let info = r.unwrap_or_else(|e| panic!("{path}: {e}"));
                assert_eq!(info.path, path);
                assert!(!info.is_dir);
            }
            2 => assert!(r.as_ref().is_err_and(|e| e.is_not_found()), "{path}: {r:?}"),
            3 => assert!(r.unwrap().is_dir),
            _ => assert!(r.is_err(), "{path}: {r:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_master_answers_reads_with_the_writes_acknowledged_before() {
    let c = cluster(0, &[]);
    let writer = client(&c);
    // Reads spread over all three masters (the default, linearizable);
    // a follower answers only once it has applied what the leader had
    // committed when the read arrived, so each write is seen by the very
    // next stat, whichever master answers it.
    let reader = client(&c);
    for i in 0..150 {
        let path = format!("/rw/f{i}");
        writer
            .write_file(&path, b"", cache_only())
            .await
            .expect("write");
        for _ in 0..3 {
            let info = reader
                .stat(&path)
                .await
                .unwrap_or_else(|e| panic!("{path} acknowledged but not seen: {e}"));
            assert_eq!(info.path, path);
        }
    }
}

/// Linearizable read calls master `addr` answered as a follower: under a
/// read lease, and after asking the leader for a read index.
async fn follower_reads(addr: &str) -> (u64, u64) {
    let mut m = strata_proto::pb::master_client::MasterClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    let l = m
        .list_masters(strata_proto::pb::Empty {})
        .await
        .expect("list masters")
        .into_inner();
    (l.lease_reads, l.read_index_reads)
}

/// Stats `path` from every master in turn for a little longer than the
/// leader waits after a write before it grants read leases again.
async fn read_for_a_while(reader: &Client, path: &str) {
    let t = Instant::now();
    for _ in 0..5000 {
        if t.elapsed() > Duration::from_millis(250) {
            break;
        }
        reader.stat(path).await.expect("stat");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_answer_under_read_leases_and_see_each_write_acknowledged_before() {
    let mut c = cluster(0, &[]);
    let writer = client(&c);
    let reader = client(&c);
    writer
        .write_file("/lease/f0", b"", cache_only())
        .await
        .expect("write");
    let leader_id = tokio::task::block_in_place(|| leader(&c));
    let followers: Vec<(u64, String)> = c
        .masters
        .iter()
        .filter(|m| m.id != leader_id)
        .map(|m| (m.id, m.addr.clone()))
        .collect();
    // Reads spread over the masters while nothing is written: the
    // followers get read leases and answer from their own state. Then a
    // write: the leader withdraws the leases before it logs it, so the very
    // next stats, whichever master answers them, see it.
    for i in 1..=25 {
        read_for_a_while(&reader, &format!("/lease/f{}", i - 1)).await;
        let path = format!("/lease/f{i}");
        writer
            .write_file(&path, b"", cache_only())
            .await
            .expect("write");
        for _ in 0..3 {
            reader
                .stat(&path)
                .await
                .unwrap_or_else(|e| panic!("{path} acknowledged but not seen: {e}"));
        }
    }
    for (id, addr) in &followers {
        let (leased, asked) = follower_reads(addr).await;
        eprintln!("follower {id}: {leased} read calls under a lease, {asked} by read index");
        assert!(
            leased > 0,
            "follower {id} answered no read under a lease ({asked} by read index)"
        );
    }
    // A follower holding a lease is stopped: the next write waits for its
    // lease to run out (it cannot give it back), no longer; once it runs
    // again it answers reads with that write.
    read_for_a_while(&reader, "/lease/f0").await;
    let (stopped, _) = followers[0].clone();
    c.pause_master(stopped, true).expect("stop");
    let t = Instant::now();
    writer
        .write_file("/lease/while-stopped", b"", cache_only())
        .await
        .expect("write while a lease holder is stopped");
    let took = t.elapsed();
    c.pause_master(stopped, false).expect("cont");
    eprintln!("write with a stopped lease holder took {took:?}");
    assert!(
        took < Duration::from_secs(3),
        "a write waited {took:?} for a stopped follower's lease"
    );
    for _ in 0..6 {
        reader
            .stat("/lease/while-stopped")
            .await
            .expect("the write is seen by every master");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_stopped_with_sigterm_exits_while_followers_hold_read_streams() {
    let mut c = cluster(0, &[]);
    let cl = client(&c);
    cl.write_file("/t/a", b"", cache_only())
        .await
        .expect("write");
    // Linearizable reads from every master: both followers open their
    // read-index streams to the leader, and the client a stat stream to
    // each master.
    for _ in 0..30 {
        cl.stat("/t/a").await.expect("stat");
    }
    let leader =
        tokio::task::block_in_place(|| c.wait_leader(Duration::from_secs(10))).expect("leader");
    // Neither the followers' streams nor the client's must hold the
    // leader's graceful shutdown (it ends them as it steps down or shuts
    // down, long before their idle limits).
    let took = tokio::task::block_in_place(|| c.terminate_master(leader, Duration::from_secs(8)))
        .expect("the leader exits after SIGTERM");
    eprintln!("leader {leader} exited {took:?} after SIGTERM");
    // The two left elect a leader and serve reads and writes.
    cl.mkdir("/t/after", true)
        .await
        .expect("write after the leader left");
    cl.stat("/t/a").await.expect("read after the leader left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_changes_share_batches_and_each_is_applied_once_through_a_failover() {
    let mut c = cluster(0, &[]);
    let cl = client(&c);
    // Mixed changes at once (more than one batch carries): each gets its
    // own answer, errors included.
    for i in 0..20 {
        cl.write_file(&format!("/mb/old{i}"), b"", cache_only())
            .await
            .unwrap();
    }
    let mut tasks = Vec::new();
    for i in 0..700usize {
        let cl = cl.clone();
        tasks.push(tokio::spawn(async move {
            let r = match i % 7 {
                0 => cl.mkdir(&format!("/mb/d{i}"), false).await.map(|_| ()),
                1 => cl
                    .write_file(&format!("/mb/f{i}"), b"", cache_only())
                    .await
                    .map(|_| ()),
                2 => {
                    let opts = WriteOptions {
                        overwrite: false,
                        ..cache_only()
                    };
                    cl.write_file(&format!("/mb/old{}", i % 20), b"", opts)
                        .await
                        .map(|_| ())
                }
                3 => cl
                    .delete(&format!("/mb/missing{i}"), false)
                    .await
                    .map(|_| ()),
                4 => {
                    cl.rename(&format!("/mb/missing{i}"), &format!("/mb/to{i}"))
                        .await
                }
                5 => cl
                    .mkdir(&format!("/mb/old{}/below", i % 20), false)
                    .await
                    .map(|_| ()),
                _ => cl
                    .mkdir(&format!("/mb/deep{i}/a/b"), true)
                    .await
                    .map(|_| ()),
            };
            (i, r)
        }));
    }
    for t in tasks {
        let (i, r) = t.await.unwrap();
        match i % 7 {
            0 | 1 | 6 => r.unwrap_or_else(|e| panic!("change {i}: {e}")),
            2 => assert!(
                matches!(r, Err(strata_client::ClientError::AlreadyExists(_))),
                "create over an existing file {i}: {r:?}"
            ),
            3 | 4 => assert!(r.as_ref().is_err_and(|e| e.is_not_found()), "{i}: {r:?}"),
            _ => assert!(r.is_err(), "mkdir below a file {i}: {r:?}"),
        }
    }
    for i in (0..700).step_by(7) {
        assert!(cl.stat(&format!("/mb/d{i}")).await.unwrap().is_dir);
        assert!(!cl.stat(&format!("/mb/f{}", i + 1)).await.unwrap().is_dir);
        assert!(
            cl.stat(&format!("/mb/deep{}/a/b", i + 6))
                .await
                .unwrap()
                .is_dir
        );
    }

    // Creates, renames and deletes from 48 tasks while the leader is
    // killed: a batch cut off by the kill is sent again to the new leader,
    // and a change applied twice would fail (the create finds its file,
    // the rename or delete finds nothing), so every change must succeed.
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for t in 0..48usize {
        let (cl, stop) = (cl.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let opts = WriteOptions {
                overwrite: false,
                ..cache_only()
            };
            let (mut kept, mut errors) = (Vec::new(), Vec::new());
            for i in 0..5000usize {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let (f, g) = (format!("/mc/t{t}/f{i}"), format!("/mc/t{t}/g{i}"));
                let r = async {
                    cl.write_file(&f, b"", opts).await?;
                    cl.rename(&f, &g).await?;
                    if i % 3 == 0 {
                        cl.delete(&g, false).await?;
                        Ok::<bool, strata_client::ClientError>(false)
                    } else {
                        Ok(true)
                    }
                }
                .await;
                match r {
                    Ok(true) => kept.push(g),
                    Ok(false) => {}
                    Err(e) => errors.push(format!("{f}: {e}")),
                }
            }
            (t, kept, errors)
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let old = leader(&c);
    c.kill_master(old).expect("kill");
    let new = tokio::task::block_in_place(|| leader(&c));
    assert_ne!(new, old);
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for task in tasks {
        let (t, kept, errors) = task.await.unwrap();
        assert!(errors.is_empty(), "task {t}: {errors:?}");
        let listed: std::collections::BTreeSet<String> = cl
            .list(&format!("/mc/t{t}"))
            .await
            .unwrap_or_default()
            .into_iter()
            .map(|e| e.path)
            .collect();
        let kept: std::collections::BTreeSet<String> = kept.into_iter().collect();
        assert_eq!(
            listed, kept,
            "task {t}: what is listed is what was acknowledged"
        );
        total += kept.len();
    }
    eprintln!("{total} files created, renamed and kept across the failover");
    assert!(total > 200, "too little work done ({total})");
}
