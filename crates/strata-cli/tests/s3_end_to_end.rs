//! A cluster over a real S3 server: reads, writes, listing, staleness,
//! restart. Each test runs its own S3 server and `strata local` process.

mod common;

use std::time::Duration;

use common::*;
use strata_client::{WriteOptions, WriteType};
use strata_testkit::ClusterOptions;

#[tokio::test(flavor = "multi_thread")]
async fn cli_roundtrip_over_s3() {
    let env = start(ClusterOptions::default());
    let c = &env.cluster;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("in.bin");
    let data = pattern(3 << 20 | 12345, 1);
    std::fs::write(&src, &data).unwrap();

    ok(
        c.cli(&["fs", "put", src.to_str().unwrap(), "/s3/a/b/in.bin"])
            .unwrap(),
    );
    // The object is in the bucket, byte for byte.
    let on_s3 = std::fs::read(env.s3.root.join("bkt/a/b/in.bin")).unwrap();
    assert_eq!(on_s3, data);

    let out = dir.path().join("out.bin");
    ok(
        c.cli(&["fs", "get", "/s3/a/b/in.bin", out.to_str().unwrap()])
            .unwrap(),
    );
    assert_eq!(std::fs::read(&out).unwrap(), data);

    let ls = ok(c.cli(&["fs", "ls", "/s3/a/b"]).unwrap());
    assert_eq!(ls.trim(), "in.bin");
    let stat = ok(c.cli(&["fs", "stat", "/s3/a/b/in.bin"]).unwrap());
    assert!(
        stat.contains(&format!("size:          {}", data.len())),
        "{stat}"
    );
    assert!(stat.contains("persisted"), "{stat}");

    ok(c.cli(&["fs", "mv", "/s3/a/b/in.bin", "/s3/a/moved.bin"])
        .unwrap());
    assert!(env.s3.root.join("bkt/a/moved.bin").exists());
    assert!(!env.s3.root.join("bkt/a/b/in.bin").exists());
    let cat = c.cli(&["fs", "cat", "/s3/a/moved.bin"]).unwrap();
    assert_eq!(cat.stdout, data);

    let du = ok(c.cli(&["fs", "du", "/s3"]).unwrap());
    assert!(
        du.contains(&format!("({} bytes) in 1 files", data.len())),
        "{du}"
    );

    ok(c.cli(&["fs", "rm", "/s3/a/moved.bin"]).unwrap());
    assert!(!env.s3.root.join("bkt/a/moved.bin").exists());
    let err = fails(c.cli(&["fs", "stat", "/s3/a/moved.bin"]).unwrap());
    assert!(
        err.contains("/s3/a/moved.bin") && err.contains("no such file"),
        "{err}"
    );

    let report = ok(c.cli(&["admin", "report"]).unwrap());
    assert!(report.contains("1 live"), "{report}");
    assert!(report.contains("cache hit ratio"), "{report}");
}

#[tokio::test(flavor = "multi_thread")]
async fn warm_reads_come_from_the_cache_and_survive_restart() {
    let mut env = start(ClusterOptions::default());
    let s3 = s3_client(&env.s3);
    let data = pattern(5 << 20, 2);
    s3_put(&s3, "data/big.bin", &data).await;

    let c = client(&env.cluster);
    let before = ufs_bytes_read(&c).await;
    assert_eq!(
        &c.read_file("/s3/data/big.bin").await.unwrap()[..],
        &data[..]
    );
    let after_cold = ufs_bytes_read(&c).await;
    assert_eq!(
        after_cold - before,
        data.len() as u64,
        "cold read fetched each byte once"
    );
    assert_eq!(
        &c.read_file("/s3/data/big.bin").await.unwrap()[..],
        &data[..]
    );
    let after_warm = ufs_bytes_read(&c).await;
    assert_eq!(after_warm, after_cold, "warm read touched the UFS");

    // Positional read across a page boundary.
    let r = c.open("/s3/data/big.bin").await.unwrap();
    let part = r.read_at((1 << 20) - 10, 100).await.unwrap();
    assert_eq!(&part[..], &data[(1 << 20) - 10..(1 << 20) + 90]);

    // kill -9 and restart on the same ports: namespace and cache survive.
    env.cluster.restart().unwrap();
    let c = client(&env.cluster);
    assert_eq!(ufs_bytes_read(&c).await, 0, "fresh worker counters");
    assert_eq!(
        &c.read_file("/s3/data/big.bin").await.unwrap()[..],
        &data[..]
    );
    assert_eq!(
        ufs_bytes_read(&c).await,
        0,
        "restarted worker served its cached pages"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn changed_object_is_never_served_stale_after_sync() {
    let env = start(ClusterOptions::default());
    let s3 = s3_client(&env.s3);
    s3_put(&s3, "m/obj", b"version one").await;
    let c = client(&env.cluster);
    assert_eq!(&c.read_file("/s3/m/obj").await.unwrap()[..], b"version one");

    // Changed behind the cache, same length.
    s3_put(&s3, "m/obj", b"version two").await;
    let out = ok(env.cluster.cli(&["fs", "sync", "/s3/m"]).unwrap());
    assert!(out.contains("1 entries changed"), "{out}");
    assert_eq!(&c.read_file("/s3/m/obj").await.unwrap()[..], b"version two");

    // A mount with sync interval 0 re-validates on every access.
    let uri = env.s3.uri(BUCKET);
    ok(env
        .cluster
        .cli(&["fs", "mount", "/always", &uri, "--sync-interval", "0"])
        .unwrap());
    assert_eq!(
        &c.read_file("/always/m/obj").await.unwrap()[..],
        b"version two"
    );
    s3_put(&s3, "m/obj", b"version three, longer").await;
    assert_eq!(
        &c.read_file("/always/m/obj").await.unwrap()[..],
        b"version three, longer"
    );

    // The same object mounted twice is one cache entry.
    let a = c.stat("/s3/m/obj").await.unwrap();
    c.sync("/s3/m").await.unwrap();
    let a2 = c.stat("/s3/m/obj").await.unwrap();
    let b = c.stat("/always/m/obj").await.unwrap();
    assert_ne!(
        a.cache_id, a2.cache_id,
        "new fingerprint, new cache identity"
    );
    assert_eq!(a2.cache_id, b.cache_id);
}

#[tokio::test(flavor = "multi_thread")]
async fn short_sync_interval_picks_up_changes() {
    let env = start(ClusterOptions::default());
    let s3 = s3_client(&env.s3);
    s3_put(&s3, "t/obj", b"before").await;
    let uri = env.s3.uri(BUCKET);
    ok(env
        .cluster
        .cli(&["fs", "mount", "/fast", &uri, "--sync-interval", "1"])
        .unwrap());
    let c = client(&env.cluster);
    assert_eq!(&c.read_file("/fast/t/obj").await.unwrap()[..], b"before");
    s3_put(&s3, "t/obj", b"after!").await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(&c.read_file("/fast/t/obj").await.unwrap()[..], b"after!");
}

#[tokio::test(flavor = "multi_thread")]
async fn write_types() {
    let env = start(ClusterOptions::default());
    let c = client(&env.cluster);
    let data = pattern(2 << 20 | 7, 3);
    for (wt, path, in_ufs) in [
        (WriteType::MustCache, "/s3/w/must", false),
        (WriteType::CacheThrough, "/s3/w/through-cached", true),
        (WriteType::Through, "/s3/w/through", true),
    ] {
        let opts = WriteOptions {
            write_type: wt,
            ..Default::default()
        };
        let info = c.write_file(path, &data, opts).await.unwrap();
        assert_eq!(info.size, data.len() as u64);
        let ufs_file = env
            .s3
            .root
            .join("bkt")
            .join(path.trim_start_matches("/s3/"));
        assert_eq!(ufs_file.exists(), in_ufs, "{path}");
        assert_eq!(&c.read_file(path).await.unwrap()[..], &data[..], "{path}");
    }
    // CACHE_THROUGH leaves the bytes cached: reading them costs no UFS bytes.
    let before = ufs_bytes_read(&c).await;
    c.read_file("/s3/w/through-cached").await.unwrap();
    assert_eq!(ufs_bytes_read(&c).await, before);
    // A MUST_CACHE file outside any mount, and empty files.
    c.write_file(
        "/scratch/x",
        b"only cached",
        WriteOptions {
            write_type: WriteType::MustCache,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        &c.read_file("/scratch/x").await.unwrap()[..],
        b"only cached"
    );
    c.write_file("/s3/w/empty", b"", Default::default())
        .await
        .unwrap();
    assert_eq!(c.read_file("/s3/w/empty").await.unwrap().len(), 0);
    // Writing through outside a mount is refused with a reason.
    let e = c
        .write_file(
            "/scratch/y",
            b"z",
            WriteOptions {
                write_type: WriteType::Through,
                ..Default::default()
            },
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("/scratch/y") && e.contains("not under a mount"),
        "{e}"
    );
    // Removing a directory tree frees pinned pages too.
    assert_eq!(c.delete("/scratch", true).await.unwrap(), 2);
    let pinned = pinned_bytes(&c).await;
    assert!(
        pinned >= data.len() as u64,
        "the /s3/w/must pages stay pinned"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn load_and_free() {
    let env = start(ClusterOptions::default());
    let s3 = s3_client(&env.s3);
    for i in 0..5 {
        s3_put(&s3, &format!("ds/f{i}"), &pattern(700_000 + i, i as u64)).await;
    }
    let c = &env.cluster;
    let out = ok(c.cli(&["fs", "load", "/s3/ds"]).unwrap());
    assert!(out.contains("loaded 5 files"), "{out}");
    assert!(out.contains("pages fetched from the UFS"), "{out}");
    let sdk = client(c);
    let before = ufs_bytes_read(&sdk).await;
    for i in 0..5 {
        sdk.read_file(&format!("/s3/ds/f{i}")).await.unwrap();
    }
    assert_eq!(
        ufs_bytes_read(&sdk).await,
        before,
        "loaded data is served from the cache"
    );
    let out = ok(c.cli(&["fs", "free", "/s3/ds"]).unwrap());
    assert!(out.contains("freed 5 cached pages"), "{out}");
    sdk.read_file("/s3/ds/f0").await.unwrap();
    assert!(
        ufs_bytes_read(&sdk).await > before,
        "freed data is fetched again"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn separate_master_and_worker_processes() {
    let env = start(ClusterOptions {
        separate_processes: true,
        ..Default::default()
    });
    let c = client(&env.cluster);
    c.write_file("/s3/p/x", b"from separate processes", Default::default())
        .await
        .unwrap();
    assert_eq!(
        &c.read_file("/s3/p/x").await.unwrap()[..],
        b"from separate processes"
    );
    let ws = c.workers().await.unwrap();
    assert_eq!(ws.len(), 1);
    assert_eq!(ws[0].data_addr, env.cluster.worker_addr);
}
