//! Shared helpers for the cluster tests: real `strata` processes, a real S3
//! server (s3s-fs) on 127.0.0.1, and an independent S3 client (OpenDAL via
//! strata-ufs) to change objects behind Strata's back.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Output;

use strata_testkit::{Cluster, ClusterOptions, S3Server};

pub fn strata_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_strata"))
}

pub struct Env {
    pub s3: S3Server,
    pub cluster: Cluster,
}

pub const BUCKET: &str = "bkt";

/// An S3 server with bucket `bkt`, and a cluster with it mounted at /s3.
pub fn start(opts: ClusterOptions) -> Env {
    let s3 = S3Server::start().expect("s3 server");
    s3.create_bucket(BUCKET).expect("bucket");
    let mut opts = opts;
    opts.mounts.insert(0, format!("/s3={}", s3.uri(BUCKET)));
    let cluster = Cluster::start(&strata_bin(), opts).expect("cluster");
    Env { s3, cluster }
}

/// A direct S3 client for the test bucket, independent of the cluster.
pub fn s3_client(s3: &S3Server) -> strata_ufs::Ufs {
    let uri = strata_ufs::UfsUri::parse(&s3.uri(BUCKET), &BTreeMap::new()).expect("uri");
    strata_ufs::open(&uri).expect("open s3")
}

pub async fn s3_put(ufs: &strata_ufs::Ufs, path: &str, data: &[u8]) {
    let mut w = ufs.writer(path).await.expect("writer");
    w.write(bytes::Bytes::copy_from_slice(data))
        .await
        .expect("write");
    w.close().await.expect("close");
}

pub async fn pinned_bytes(c: &strata_client::Client) -> u64 {
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    c.workers()
        .await
        .expect("workers")
        .iter()
        .filter_map(|w| w.stats.clone())
        .map(|s| s.pinned_bytes)
        .sum()
}

pub fn client(c: &Cluster) -> strata_client::Client {
    strata_client::Client::new(&c.master_addr, Default::default()).expect("client")
}

pub fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "command failed: stdout={} stderr={}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Expects failure; returns stderr.
pub fn fails(out: Output) -> String {
    assert!(
        !out.status.success(),
        "command unexpectedly succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Sum of UFS bytes read by all workers, from `strata admin report`'s source.
/// Waits for a heartbeat first: the harness runs workers with 100 ms heartbeats.
pub async fn ufs_bytes_read(c: &strata_client::Client) -> u64 {
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    c.workers()
        .await
        .expect("workers")
        .iter()
        .filter_map(|w| w.stats.clone())
        .map(|s| s.ufs_bytes_read)
        .sum()
}

/// The first worker's stats, after a heartbeat.
pub async fn worker_stats(c: &strata_client::Client) -> strata_proto::pb::WorkerStats {
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    c.workers()
        .await
        .expect("workers")
        .into_iter()
        .find(|w| w.live)
        .and_then(|w| w.stats)
        .expect("a live worker with stats")
}
