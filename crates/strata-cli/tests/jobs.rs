//! Data-management jobs and TTLs against a real S3 server: preload with
//! progress and verification, free, cancel, a throttling and a failing UFS,
//! TTL actions, and a load that survives the death of the master leader.

mod common;

use std::time::{Duration, Instant};

use common::*;
use strata_client::{Client, JobState};
use strata_testkit::{ClusterOptions, HaCluster, LatencyProxy, ProxyOptions, S3Server};

/// Files of 1 KiB to 3 MiB under `dir` in the test bucket; returns the total.
async fn dataset(s3: &S3Server, dir: &str, n: usize) -> u64 {
    let ufs = s3_client(s3);
    let mut total = 0;
    for i in 0..n {
        let len = match i % 4 {
            0 => 1 << 10,
            1 => 100 << 10,
            2 => (1 << 20) + 7,
            _ => 3 << 20,
        };
        s3_put(&ufs, &format!("{dir}/f{i:03}.bin"), &pattern(len, i as u64)).await;
        total += len as u64;
    }
    total
}

async fn wait_job(c: &Client, id: u64, limit: Duration) -> strata_client::JobInfo {
    let t = Instant::now();
    loop {
        let j = c.job(id).await.expect("job status");
        let s = JobState::try_from(j.state).unwrap();
        if matches!(
            s,
            JobState::JobCompleted | JobState::JobFailed | JobState::JobCancelled
        ) {
            return j;
        }
        assert!(
            t.elapsed() < limit,
            "job {id} still {s:?} after {limit:?}: {j:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn load_job_caches_each_byte_once_verifies_and_reports_errors() {
    let env = start(ClusterOptions::default());
    let total = dataset(&env.s3, "ds", 12).await;
    let c = client(&env.cluster);
    let before = ufs_bytes_read(&c).await;
    let out = ok(env
        .cluster
        .cli(&["job", "load", "/s3/ds", "--wait", "--verify"])
        .unwrap());
    assert!(out.contains("state:      completed"), "{out}");
    assert!(out.contains("files:      12/12 done, 0 failed"), "{out}");
    assert!(out.contains("verified:   12 files"), "{out}");
    let fetched = ufs_bytes_read(&c).await - before;
    assert!(
        fetched >= total && fetched as f64 <= total as f64 * 1.01,
        "UFS bytes {fetched} for a {total}-byte dataset"
    );

    // Loading again fetches nothing; the front end reports it.
    let out = ok(env.cluster.cli(&["fs", "load", "/s3/ds"]).unwrap());
    assert!(out.contains("loaded 12 files"), "{out}");
    assert!(out.contains(" 0 pages fetched from the UFS"), "{out}");
    assert_eq!(ufs_bytes_read(&c).await - before, fetched);

    let ls = ok(env.cluster.cli(&["job", "ls"]).unwrap());
    assert_eq!(ls.matches("completed").count(), 2, "{ls}");

    // Bad input: a missing path, an unknown job, cancelling a finished job.
    let err = fails(
        env.cluster
            .cli(&["job", "load", "/s3/missing", "--wait"])
            .unwrap(),
    );
    assert!(
        err.contains("/s3/missing") && err.contains("no such file"),
        "{err}"
    );
    let err = fails(env.cluster.cli(&["job", "status", "9999"]).unwrap());
    assert!(
        err.contains("job 9999") && err.contains("no such job"),
        "{err}"
    );
    let err = fails(env.cluster.cli(&["job", "cancel", "1"]).unwrap());
    assert!(err.contains("completed already"), "{err}");

    // Free drops the pages of persisted files; pinned files stay.
    ok(env.cluster.cli(&["fs", "pin", "/s3/ds/f003.bin"]).unwrap());
    let out = ok(env.cluster.cli(&["fs", "free", "/s3/ds"]).unwrap());
    assert!(out.contains("1 pinned files kept"), "{out}");
    let stat = ok(env.cluster.cli(&["fs", "stat", "/s3/ds/f003.bin"]).unwrap());
    assert!(stat.contains("pinned:        yes"), "{stat}");
    let mid = ufs_bytes_read(&c).await;
    c.read_file("/s3/ds/f003.bin").await.unwrap();
    assert_eq!(ufs_bytes_read(&c).await, mid, "pinned file still cached");
    c.read_file("/s3/ds/f002.bin").await.unwrap();
    assert!(ufs_bytes_read(&c).await > mid, "freed file fetched again");
}

#[tokio::test(flavor = "multi_thread")]
async fn cp_and_persist_jobs_move_data_through_the_cache() {
    let env = start(ClusterOptions::default());
    dataset(&env.s3, "src", 3).await;
    let c = client(&env.cluster);
    // A directory copied within the mount lands in the bucket too.
    let out = ok(env
        .cluster
        .cli(&["job", "cp", "/s3/src", "/s3/dst", "--wait"])
        .unwrap());
    assert!(out.contains("state:      completed"), "{out}");
    for i in 0..3u64 {
        let len = match i % 4 {
            0 => 1 << 10,
            1 => 100 << 10,
            _ => (1 << 20) + 7,
        };
        let want = pattern(len, i);
        let name = format!("f{i:03}.bin");
        assert!(c.read_file(&format!("/s3/dst/{name}")).await.unwrap() == want);
        let on_s3 = std::fs::read(env.s3.root.join(BUCKET).join("dst").join(&name)).unwrap();
        assert!(on_s3 == want, "{name} in the bucket");
    }
    // A file copied out of the mount is cache-only; persisting a cache-only
    // file under the mount writes it to the bucket.
    ok(env
        .cluster
        .cli(&[
            "job",
            "cp",
            "/s3/src/f001.bin",
            "/scratch/one.bin",
            "--wait",
        ])
        .unwrap());
    assert!(c.read_file("/scratch/one.bin").await.unwrap() == pattern(100 << 10, 1));
    let data = pattern(300 << 10, 42);
    c.write_file(
        "/s3/cached/only.bin",
        &data,
        strata_client::WriteOptions {
            write_type: strata_client::WriteType::MustCache,
            recursive: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(!env.s3.root.join(BUCKET).join("cached/only.bin").exists());
    let out = ok(env
        .cluster
        .cli(&["job", "persist", "/s3/cached", "--wait"])
        .unwrap());
    assert!(out.contains("1 files written to the UFS"), "{out}");
    assert!(std::fs::read(env.s3.root.join(BUCKET).join("cached/only.bin")).unwrap() == data);
    let f = c.stat("/s3/cached/only.bin").await.unwrap();
    assert_eq!(
        f.persist_state,
        strata_client::PersistState::Persisted as i32
    );
    // Its cached pages stayed valid: reading it costs the UFS nothing.
    let before = ufs_bytes_read(&c).await;
    assert!(c.read_file("/s3/cached/only.bin").await.unwrap() == data);
    assert_eq!(ufs_bytes_read(&c).await, before);
    // Copying a directory into itself is refused.
    let err = fails(
        env.cluster
            .cli(&["job", "cp", "/s3/src", "/s3/src/sub"])
            .unwrap(),
    );
    assert!(err.contains("into itself"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_throttling_ufs_is_ridden_out() {
    let Env { s3, cluster } = start(ClusterOptions::default());
    let total = dataset(&s3, "th", 4).await;
    let c = client(&cluster);
    c.list("/s3/th").await.unwrap();
    s3.throttle(3);
    let j = c
        .submit_job("/s3/th", strata_client::JobSpec::Load { verify: false })
        .await
        .unwrap();
    let j = wait_job(&c, j.id, Duration::from_secs(120)).await;
    assert_eq!(j.state, JobState::JobCompleted as i32, "{j:?}");
    assert_eq!(s3.throttled_left(), 0, "the 503s were answered");
    assert_eq!(j.bytes_done, total);
    let out = ok(cluster.cli(&["job", "status", &j.id.to_string()]).unwrap());
    assert!(out.contains("completed"), "{out}");
}

/// An S3 server behind a proxy that carries `conn_bandwidth` bytes per
/// second per connection; returns it, the proxy and the mount URI.
fn slow_store(conn_bandwidth: u64) -> (S3Server, LatencyProxy, String) {
    let s3 = S3Server::start().expect("s3");
    s3.create_bucket(BUCKET).unwrap();
    let proxy = LatencyProxy::start(
        "127.0.0.1:0",
        &s3.addr.to_string(),
        ProxyOptions {
            latency: Duration::from_millis(1),
            conn_bandwidth: Some(conn_bandwidth),
        },
    )
    .unwrap();
    let uri = s3
        .uri(BUCKET)
        .replace(&s3.endpoint(), &format!("http://{}", proxy.addr));
    (s3, proxy, uri)
}

/// Polls a job until `done(status)`; panics after a minute.
async fn until(c: &Client, id: u64, done: impl Fn(&strata_client::JobInfo) -> bool) {
    let t = Instant::now();
    loop {
        let s = c.job(id).await.unwrap();
        if done(&s) {
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "no progress: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_ufs_that_dies_mid_job_fails_it_clearly_and_keeps_what_was_loaded() {
    let (s3, _proxy, uri) = slow_store(1 << 20);
    let ufs = s3_client(&s3);
    for i in 0..8u64 {
        s3_put(&ufs, &format!("ds/f{i}.bin"), &pattern(1 << 20, i)).await;
    }
    let ha = HaCluster::start(
        &strata_bin(),
        1,
        1,
        vec![("STRATA_MASTER_JOB_PER_UFS".into(), "1".into())],
    )
    .expect("cluster");
    ok(ha.cli(&["fs", "mount", "/s3", &uri]).unwrap());
    let c = Client::new(&ha.master_list(), Default::default()).unwrap();
    let j = c
        .submit_job("/s3/ds", strata_client::JobSpec::Load { verify: false })
        .await
        .unwrap();
    until(&c, j.id, |s| s.files_done >= 2).await;
    drop(s3);
    let s = wait_job(&c, j.id, Duration::from_secs(180)).await;
    assert_eq!(s.state, JobState::JobFailed as i32, "{s:?}");
    assert!(
        s.files_done >= 2 && s.files_failed >= 1 && s.message.contains("/s3/ds/f"),
        "the failure names the files: {s:?}"
    );
    // What was loaded before the store died is still served.
    for i in 0..2u64 {
        let got = c.read_file(&format!("/s3/ds/f{i}.bin")).await.unwrap();
        assert!(got == pattern(1 << 20, i));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_load_rides_out_a_worker_restart_without_refetching() {
    let (s3, proxy, uri) = slow_store(2 << 20);
    let ufs = s3_client(&s3);
    let (files, size) = (16u64, 1u64 << 20);
    for i in 0..files {
        s3_put(&ufs, &format!("ds/f{i:02}.bin"), &pattern(size as usize, i)).await;
    }
    let mut ha = HaCluster::start(
        &strata_bin(),
        1,
        1,
        vec![("STRATA_MASTER_JOB_PER_UFS".into(), "2".into())],
    )
    .expect("cluster");
    ok(ha.cli(&["fs", "mount", "/s3", &uri]).unwrap());
    let c = Client::new(&ha.master_list(), Default::default()).unwrap();
    c.list("/s3/ds").await.unwrap();
    let before = proxy.bytes_down();
    let j = c
        .submit_job("/s3/ds", strata_client::JobSpec::Load { verify: false })
        .await
        .unwrap();
    until(&c, j.id, |s| s.files_done >= files / 4).await;
    ha.kill_worker(0).unwrap();
    ha.restart_worker(0).unwrap();
    let s = wait_job(&c, j.id, Duration::from_secs(120)).await;
    assert_eq!(s.state, JobState::JobCompleted as i32, "{s:?}");
    // Loads in flight at the kill (at most 2 blocks) are fetched again;
    // completed blocks are not: the restarted worker serves its cache.
    let fetched = proxy.bytes_down() - before;
    let total = files * size;
    assert!(
        fetched <= total + 2 * size + 64 * 1024,
        "{fetched} bytes fetched for {total}"
    );
    let after = proxy.bytes_down();
    for i in 0..files {
        let got = c.read_file(&format!("/s3/ds/f{i:02}.bin")).await.unwrap();
        assert!(got == pattern(size as usize, i));
    }
    assert_eq!(proxy.bytes_down(), after, "everything was cached");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancelled_load_stops_fetching() {
    let (s3, proxy, uri) = slow_store(2 << 20);
    let cluster = strata_testkit::Cluster::start(
        &strata_bin(),
        ClusterOptions {
            mounts: vec![format!("/slow={uri}")],
            env: vec![
                ("STRATA_MASTER_JOB_PER_UFS".into(), "2".into()),
                ("STRATA_WORKER_UFS_READ_CONCURRENCY".into(), "1".into()),
            ],
            ..Default::default()
        },
    )
    .unwrap();
    let ufs = s3_client(&s3);
    for i in 0..10 {
        s3_put(&ufs, &format!("big/f{i}.bin"), &pattern(4 << 20, i)).await;
    }
    let c = client(&cluster);
    let j = c
        .submit_job("/slow/big", strata_client::JobSpec::Load { verify: false })
        .await
        .unwrap();
    until(&c, j.id, |s| s.bytes_done > 0).await;
    let s = c.job(j.id).await.unwrap();
    assert!(s.bytes_done < s.bytes_total, "cancel comes too late: {s:?}");
    let out = ok(cluster.cli(&["job", "cancel", &j.id.to_string()]).unwrap());
    assert!(out.contains("cancelled"), "{out}");
    // Loads already on the wire finish; nothing new starts.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let a = proxy.bytes_down();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(proxy.bytes_down(), a, "fetching went on after the cancel");
    assert!(
        a < 40 << 20,
        "cancelled job fetched the whole dataset ({a} bytes)"
    );
    let s = c.job(j.id).await.unwrap();
    assert_eq!(s.state, JobState::JobCancelled as i32, "{s:?}");
    assert!(s.message.contains("cancelled by a user"), "{s:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn ttls_free_or_delete_when_they_expire_and_refuse_pinned_paths() {
    let env = start(ClusterOptions {
        env: vec![("STRATA_MASTER_TTL_CHECK_INTERVAL_SECS".into(), "1".into())],
        ..Default::default()
    });
    let ufs = s3_client(&env.s3);
    for n in ["a", "b", "c"] {
        s3_put(&ufs, &format!("t/{n}"), &pattern(300 << 10, 7)).await;
    }
    let c = client(&env.cluster);
    c.read_file("/s3/t/b").await.unwrap();

    let out = ok(env
        .cluster
        .cli(&["fs", "ttl", "/s3/t/a", "2s", "--action", "delete"])
        .unwrap());
    assert!(out.contains("/s3/t/a: delete at"), "{out}");
    let stat = ok(env.cluster.cli(&["fs", "stat", "/s3/t/a"]).unwrap());
    assert!(stat.contains("ttl:           2 s, then delete"), "{stat}");
    ok(env.cluster.cli(&["fs", "ttl", "/s3/t/b", "2s"]).unwrap());

    ok(env.cluster.cli(&["fs", "pin", "/s3/t/c"]).unwrap());
    let err = fails(env.cluster.cli(&["fs", "ttl", "/s3/t/c", "1h"]).unwrap());
    assert!(
        err.contains("/s3/t/c") && err.contains("is pinned"),
        "{err}"
    );
    let err = fails(env.cluster.cli(&["fs", "ttl", "/s3/t/c", "soon"]).unwrap());
    assert!(err.contains("\"soon\""), "{err}");

    let before = ufs_bytes_read(&c).await;
    let t = Instant::now();
    loop {
        let gone =
            !env.s3.root.join(BUCKET).join("t/a").exists() && c.stat("/s3/t/a").await.is_err();
        let b = c.stat("/s3/t/b").await.unwrap();
        let freed = c.jobs().await.unwrap().iter().any(|j| {
            j.kind == "free" && j.path == "/s3/t/b" && j.state == JobState::JobCompleted as i32
        });
        if gone && freed && b.ttl_ms == 0 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "TTLs did not act: gone {gone}, freed {freed}, {b:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // b stays, uncached; c stays pinned.
    c.read_file("/s3/t/b").await.unwrap();
    assert!(ufs_bytes_read(&c).await > before, "b was freed");
    assert!(c.stat("/s3/t/c").await.unwrap().pinned);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_load_survives_the_death_of_the_leader_without_refetching() {
    let (s3, proxy, uri) = slow_store(2 << 20);
    let ufs = s3_client(&s3);
    let (files, size) = (24u64, 1u64 << 20);
    for i in 0..files {
        s3_put(&ufs, &format!("ds/f{i:02}.bin"), &pattern(size as usize, i)).await;
    }
    let mut ha = HaCluster::start(
        &strata_bin(),
        3,
        2,
        vec![
            ("STRATA_MASTER_JOB_PER_UFS".into(), "2".into()),
            ("STRATA_WORKER_UFS_READ_CONCURRENCY".into(), "1".into()),
        ],
    )
    .expect("HA cluster");
    ok(ha.cli(&["fs", "mount", "/s3", &uri]).unwrap());
    let c = Client::new(&ha.master_list(), Default::default()).unwrap();
    assert_eq!(c.list("/s3/ds").await.unwrap().len(), files as usize);
    let before = proxy.bytes_down();
    let j = c
        .submit_job("/s3/ds", strata_client::JobSpec::Load { verify: false })
        .await
        .unwrap();
    until(&c, j.id, |s| s.files_done >= files / 4).await;
    let s = c.job(j.id).await.unwrap();
    assert!(
        s.files_done < files,
        "the load ended before the kill: {s:?}"
    );
    let leader = ha.wait_leader(Duration::from_secs(5)).unwrap();
    ha.kill_master(leader).unwrap();
    let s = wait_job(&c, j.id, Duration::from_secs(120)).await;
    assert_eq!(s.state, JobState::JobCompleted as i32, "{s:?}");
    assert!(s.runs >= 2, "a second leader resumed it: {s:?}");
    assert_eq!((s.files_done, s.bytes_done), (files, files * size));
    let fetched = proxy.bytes_down() - before;
    let total = files * size;
    assert!(
        fetched as f64 <= total as f64 * 1.01 + 64.0 * 1024.0,
        "{fetched} bytes fetched for {total} (completed blocks fetched again?)"
    );
    // Everything is cached: reading it all costs the UFS nothing.
    let after = proxy.bytes_down();
    for i in 0..files {
        c.read_file(&format!("/s3/ds/f{i:02}.bin")).await.unwrap();
    }
    assert_eq!(proxy.bytes_down(), after);
}

#[tokio::test(flavor = "multi_thread")]
async fn async_through_data_reaches_the_ufs_though_a_replica_holder_dies() {
    let (s3, _proxy, uri) = slow_store(2 << 20);
    // The persist starts 3 s after the write, when the worker is dead but
    // not yet declared dead (master.worker_timeout_ms is 10 s): it must
    // read the blocks that worker owned from their replicas.
    let mut ha = HaCluster::start(
        &strata_bin(),
        3,
        3,
        vec![("STRATA_MASTER_PERSIST_DELAY_MS".into(), "3000".into())],
    )
    .expect("HA cluster");
    ok(ha
        .cli(&["fs", "mount", "/s3", &uri, "--block-size", "4MiB"])
        .unwrap());
    let c = Client::new(&ha.master_list(), Default::default()).unwrap();
    let data = pattern((12 << 20) + 333, 9);
    let info = c
        .write_file(
            "/s3/async/model.bin",
            &data,
            strata_client::WriteOptions {
                write_type: strata_client::WriteType::AsyncThrough,
                recursive: true,
                ..Default::default()
            },
        )
        .await
        .expect("async write");
    assert_eq!(
        info.persist_state,
        strata_client::PersistState::ToBePersisted as i32
    );
    let stat = ok(ha.cli(&["fs", "stat", "/s3/async/model.bin"]).unwrap());
    assert!(stat.contains("to-be-persisted"), "{stat}");
    // Every byte is on two workers: the write was acknowledged after both.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let workers = c.workers().await.unwrap();
    let pinned: Vec<(String, u64)> = workers
        .iter()
        .map(|w| {
            (
                w.data_addr.clone(),
                w.stats.as_ref().map_or(0, |s| s.pinned_bytes),
            )
        })
        .collect();
    let total: u64 = pinned.iter().map(|p| p.1).sum();
    assert!(total >= 2 * data.len() as u64, "replicas: {pinned:?}");
    // Kill the worker holding the most of it, before the persist runs.
    let victim = pinned.iter().max_by_key(|p| p.1).unwrap().0.clone();
    let i = ha
        .worker_addrs
        .iter()
        .position(|a| *a == victim)
        .expect("victim is one of ours");
    ha.kill_worker(i).unwrap();

    let t = Instant::now();
    loop {
        let f = c.stat("/s3/async/model.bin").await.unwrap();
        if f.persist_state == strata_client::PersistState::Persisted as i32 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(90),
            "not persisted: {f:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let on_s3 = std::fs::read(s3.root.join(BUCKET).join("async/model.bin")).unwrap();
    assert!(on_s3 == data, "the UFS copy differs from what was written");
    let jobs = c.jobs().await.unwrap();
    let j = jobs
        .iter()
        .find(|j| j.path == "/s3/async/model.bin")
        .unwrap();
    assert_eq!(j.state, JobState::JobCompleted as i32, "{j:?}");
    // And it still reads back, from the surviving replicas.
    assert!(c.read_file("/s3/async/model.bin").await.unwrap() == data);
}

#[tokio::test(flavor = "multi_thread")]
async fn workers_that_join_fetch_from_their_peers_not_the_ufs() {
    let s3 = S3Server::start().expect("s3");
    s3.create_bucket(BUCKET).unwrap();
    let proxy =
        LatencyProxy::start("127.0.0.1:0", &s3.addr.to_string(), ProxyOptions::default()).unwrap();
    let uri = s3
        .uri(BUCKET)
        .replace(&s3.endpoint(), &format!("http://{}", proxy.addr));
    let ufs = s3_client(&s3);
    let (files, size) = (16u64, 1u64 << 20);
    for i in 0..files {
        s3_put(&ufs, &format!("ds/f{i:02}.bin"), &pattern(size as usize, i)).await;
    }
    let mut ha = HaCluster::start(&strata_bin(), 1, 1, vec![]).expect("cluster");
    ok(ha
        .cli(&[
            "fs",
            "mount",
            "/s3",
            &uri,
            "--block-size",
            "256KiB",
            "--page-size",
            "64KiB",
        ])
        .unwrap());
    let c = Client::new(&ha.master_list(), Default::default()).unwrap();
    // A cache-only file, and the dataset loaded, all on the one worker.
    let only = pattern(3 << 20, 77);
    c.write_file(
        "/cache-only/f.bin",
        &only,
        strata_client::WriteOptions {
            write_type: strata_client::WriteType::MustCache,
            recursive: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    ok(ha.cli(&["job", "load", "/s3/ds", "--wait"]).unwrap());
    let loaded = proxy.bytes_down();
    assert!(loaded >= files * size, "{loaded}");

    // Two workers join: they now own most blocks, and have none of them.
    ha.add_worker().unwrap();
    ha.add_worker().unwrap();
    // Their peer lists refresh every 3 s.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let out = ok(ha.cli(&["job", "load", "/s3/ds", "--wait"]).unwrap());
    assert!(out.contains("state:      completed"), "{out}");
    for i in 0..files {
        let got = c.read_file(&format!("/s3/ds/f{i:02}.bin")).await.unwrap();
        assert!(got == pattern(size as usize, i), "f{i:02} differs");
    }
    assert!(c.read_file("/cache-only/f.bin").await.unwrap() == only);
    assert_eq!(
        proxy.bytes_down(),
        loaded,
        "blocks that moved to new workers were fetched from the UFS again"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let peer: u64 = c
        .workers()
        .await
        .unwrap()
        .iter()
        .filter_map(|w| w.stats.as_ref())
        .map(|s| s.peer_bytes_read)
        .sum();
    assert!(peer >= (files * size) / 3, "peer bytes {peer}");
}

#[tokio::test(flavor = "multi_thread")]
async fn replication_bounds_and_hot_blocks_spread_reads_over_workers() {
    let s3 = S3Server::start().expect("s3");
    s3.create_bucket(BUCKET).unwrap();
    let proxy =
        LatencyProxy::start("127.0.0.1:0", &s3.addr.to_string(), ProxyOptions::default()).unwrap();
    let uri = s3
        .uri(BUCKET)
        .replace(&s3.endpoint(), &format!("http://{}", proxy.addr));
    let ufs = s3_client(&s3);
    let rep = pattern(4 << 20, 5);
    let hot = pattern(1 << 20, 6);
    s3_put(&ufs, "rep/a.bin", &rep).await;
    s3_put(&ufs, "hot/h.bin", &hot).await;
    let ha = HaCluster::start(
        &strata_bin(),
        1,
        3,
        vec![
            ("STRATA_WORKER_HOT_BLOCK_READS_PER_SEC".into(), "5".into()),
            ("STRATA_WORKER_IDLE_REPLICA_SECS".into(), "2".into()),
        ],
    )
    .expect("cluster");
    ok(ha
        .cli(&[
            "fs",
            "mount",
            "/s3",
            &uri,
            "--block-size",
            "1MiB",
            "--page-size",
            "256KiB",
        ])
        .unwrap());
    let c = Client::new(
        &ha.master_list(),
        strata_common::config::ClientConfig {
            short_circuit: false,
            ..Default::default()
        },
    )
    .unwrap();
    let served = |c: Client| async move {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        c.workers()
            .await
            .unwrap()
            .iter()
            .map(|w| {
                let s = w.stats.clone().unwrap_or_default();
                (s.used_bytes, s.bytes_served)
            })
            .collect::<Vec<_>>()
    };

    // Workers learn about each other every 3 s.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    // A minimum of 2: the load caches every block on two workers, the
    // second copy coming from the first, not from the UFS.
    let out = ok(ha
        .cli(&["fs", "set-replication", "/s3/rep", "--min", "2"])
        .unwrap());
    assert!(out.contains("replication min 2"), "{out}");
    let stat = ok(ha.cli(&["fs", "stat", "/s3/rep/a.bin"]).unwrap());
    assert!(stat.contains("replication:   min 2, max 0"), "{stat}");
    let err = fails(
        ha.cli(&[
            "fs",
            "set-replication",
            "/s3/rep",
            "--min",
            "3",
            "--max",
            "2",
        ])
        .unwrap(),
    );
    assert!(
        err.contains("/s3/rep") && err.contains("above the maximum"),
        "{err}"
    );
    let before = proxy.bytes_down();
    ok(ha.cli(&["job", "load", "/s3/rep", "--wait"]).unwrap());
    let fetched = proxy.bytes_down() - before;
    assert!(
        fetched < (rep.len() as u64) * 11 / 10,
        "UFS bytes {fetched}"
    );
    let used: u64 = served(c.clone()).await.iter().map(|s| s.0).sum();
    assert!(used >= 2 * rep.len() as u64, "cached bytes {used}");
    let before = proxy.bytes_down();
    for _ in 0..4 {
        assert!(c.read_file("/s3/rep/a.bin").await.unwrap() == rep);
    }
    assert_eq!(
        proxy.bytes_down(),
        before,
        "reads of the replicas were cached"
    );

    // A hot block: read 60 times, its owner asks readers to spread.
    let before_served = served(c.clone()).await;
    let before = proxy.bytes_down();
    for _ in 0..60 {
        assert!(c.read_file("/s3/hot/h.bin").await.unwrap() == hot);
    }
    let after = served(c.clone()).await;
    let busy = after
        .iter()
        .zip(&before_served)
        .filter(|(a, b)| a.1 - b.1 >= hot.len() as u64)
        .count();
    assert!(
        busy >= 2,
        "reads of a hot block stayed on one worker: {before_served:?} -> {after:?}"
    );
    let fetched = proxy.bytes_down() - before;
    assert!(
        fetched < (hot.len() as u64) * 11 / 10,
        "the extra replicas came from the UFS: {fetched} bytes"
    );
    // Once nobody reads the hot block, its extra replicas are dropped; the
    // copies the minimum replication asked for stay.
    let t = Instant::now();
    loop {
        let used: u64 = served(c.clone()).await.iter().map(|s| s.0).sum();
        if used == 2 * rep.len() as u64 + hot.len() as u64 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "extra replicas stayed: {used} bytes cached"
        );
    }
}

/// A rewrite left unfinished (its writer neither closes nor aborts it, as
/// when the writer dies) is removed after `master.unfinished_ttl_secs`
/// with its cache-only pages; the file keeps its complete version, and a
/// close that comes after all fails.
#[tokio::test(flavor = "multi_thread")]
async fn rewrites_left_unfinished_are_removed_with_their_pages() {
    let env = start(ClusterOptions {
        env: vec![
            ("STRATA_MASTER_TTL_CHECK_INTERVAL_SECS".into(), "1".into()),
            ("STRATA_MASTER_UNFINISHED_TTL_SECS".into(), "3".into()),
        ],
        ..Default::default()
    });
    let c = client(&env.cluster);
    let opts = |overwrite| strata_client::WriteOptions {
        write_type: strata_client::WriteType::MustCache,
        overwrite,
        ..Default::default()
    };
    c.mkdir("/scratch", false).await.unwrap();
    let mut w = c.create("/scratch/f", opts(false)).await.unwrap();
    w.write(b"version one").await.unwrap();
    w.close().await.unwrap();
    let pinned = || async {
        c.workers()
            .await
            .unwrap()
            .iter()
            .map(|w| w.stats.as_ref().map_or(0, |s| s.pinned_bytes))
            .sum::<u64>()
    };
    let base = pinned().await;
    let started = Instant::now();
    let mut w = c.create("/scratch/f", opts(true)).await.unwrap();
    w.write(&pattern(8 << 20, 5)).await.unwrap();
    let t = Instant::now();
    while pinned().await < base + (4 << 20) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "pages never reached the worker"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Readers see the complete version meanwhile.
    assert_eq!(c.stat("/scratch/f").await.unwrap().size, 11);
    let t = Instant::now();
    while pinned().await >= base + (4 << 20) {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the unfinished version's pages were not freed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Not before the 3 s are over.
    let after = started.elapsed();
    assert!(after >= Duration::from_secs(3), "removed after {after:?}");
    assert!(w.close().await.is_err(), "a removed version completed");
    assert_eq!(
        &c.read_file("/scratch/f").await.unwrap()[..],
        b"version one"
    );
}
