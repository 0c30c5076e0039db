//! The data path under concurrency, with the UFS behind a latency-injecting
//! proxy that counts every byte the S3 server sends.

mod common;

use common::*;
use strata_testkit::{Cluster, ClusterOptions, LatencyProxy, ProxyOptions, S3Server};

struct RemoteEnv {
    s3: S3Server,
    proxy: LatencyProxy,
    cluster: Cluster,
}

/// An S3 server reached through a proxy adding `latency_ms` each way,
/// mounted at /slow.
fn remote(latency_ms: u64) -> RemoteEnv {
    let s3 = S3Server::start().expect("s3 server");
    s3.create_bucket(BUCKET).expect("bucket");
    let proxy = LatencyProxy::start(
        "127.0.0.1:0",
        &s3.addr.to_string(),
        ProxyOptions {
            latency: std::time::Duration::from_millis(latency_ms),
            conn_bandwidth: None,
        },
    )
    .expect("proxy");
    let uri = s3
        .uri(BUCKET)
        .replace(&s3.endpoint(), &format!("http://{}", proxy.addr));
    let cluster = Cluster::start(
        &strata_bin(),
        ClusterOptions {
            mounts: vec![format!("/slow={uri}")],
            ..Default::default()
        },
    )
    .expect("cluster");
    RemoteEnv { s3, proxy, cluster }
}

#[tokio::test(flavor = "multi_thread")]
async fn hundred_concurrent_cold_readers_fetch_each_byte_once() {
    let env = remote(5);
    let size = 16 << 20;
    let data = std::sync::Arc::new(pattern(size, 3));
    s3_put(&s3_client(&env.s3), "one/file.bin", &data).await;
    let c = client(&env.cluster);
    // Listing and stat go through the proxy too: count from here on.
    assert_eq!(
        c.stat("/slow/one/file.bin").await.unwrap().size,
        size as u64
    );
    let before = env.proxy.bytes_down();
    let readers: Vec<_> = (0..100)
        .map(|_| {
            let (c, data) = (c.clone(), data.clone());
            tokio::spawn(async move {
                let got = c.read_file("/slow/one/file.bin").await.expect("read");
                assert!(got[..] == data[..], "wrong bytes");
            })
        })
        .collect();
    for r in readers {
        r.await.expect("reader");
    }
    let served = env.proxy.bytes_down() - before;
    // Each byte once, plus HTTP headers of one GET per page.
    assert!(
        served >= size as u64 && served < size as u64 + (64 << 10),
        "the S3 server sent {served} bytes for a {size}-byte file read by 100 readers"
    );
    assert_eq!(ufs_bytes_read(&c).await, size as u64);
}

#[tokio::test(flavor = "multi_thread")]
async fn short_circuit_reads_come_from_page_files_and_survive_their_deletion() {
    let env = start(ClusterOptions::default());
    let data = pattern(5 << 20, 12);
    s3_put(&s3_client(&env.s3), "sc.bin", &data).await;
    let c = client(&env.cluster);
    // Cold: nothing is cached, so nothing can be read locally.
    assert_eq!(&c.read_file("/s3/sc.bin").await.unwrap()[..], &data[..]);
    let served = worker_stats(&c).await.bytes_served;
    assert_eq!(served, 5 << 20, "the cold read came over TCP");
    // Warm, same host: positional reads come from the page files.
    let r = c.open("/s3/sc.bin").await.unwrap();
    assert_eq!(&r.read_at(0, 5 << 20).await.unwrap()[..], &data[..]);
    let part = r.read_at((2 << 20) - 7, 4096).await.unwrap();
    assert_eq!(&part[..], &data[(2 << 20) - 7..(2 << 20) + 4089]);
    assert_eq!(
        worker_stats(&c).await.bytes_served,
        served,
        "no bytes over TCP"
    );
    // The page files vanish under the reader: it falls back to the network
    // (the worker refetches from S3) and still returns the right bytes.
    let pages = env.cluster.dir.path().join("data/worker/pages");
    for sub in std::fs::read_dir(&pages).unwrap().flatten() {
        for f in std::fs::read_dir(sub.path()).unwrap().flatten() {
            std::fs::remove_file(f.path()).unwrap();
        }
    }
    // Descriptors already open still read the (immutable) bytes.
    assert_eq!(&r.read_at(0, 5 << 20).await.unwrap()[..], &data[..]);
    // Once the client notices the files are gone (link count, checked at
    // most once a second) it reads over the network and the worker
    // refetches from S3.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(&r.read_at(0, 5 << 20).await.unwrap()[..], &data[..]);
    let st = worker_stats(&c).await;
    assert_eq!(
        st.ufs_bytes_read,
        10 << 20,
        "refetched once after the deletion"
    );
}

/// Pages evicted while a slow reader streams them: the reader still gets
/// every byte right (from the descriptor the worker holds, or refetched).
#[tokio::test(flavor = "multi_thread")]
async fn pages_evicted_while_being_read_are_served_correctly() {
    let env = start(ClusterOptions {
        cache_capacity: "24MiB".into(),
        ..Default::default()
    });
    let s3 = s3_client(&env.s3);
    let a = pattern(16 << 20, 21);
    let b = pattern(20 << 20, 22);
    s3_put(&s3, "a.bin", &a).await;
    s3_put(&s3, "b.bin", &b).await;
    let mut cfg = strata_common::Config::default().client;
    // Over TCP, one 1 MiB request at a time, so the reader is slow.
    cfg.short_circuit = false;
    cfg.read_ahead_blocks = 1;
    cfg.read_chunk = strata_common::config::ByteSize(1 << 20);
    let slow = strata_client::Client::new(&env.cluster.master_addr, cfg).unwrap();
    let c = client(&env.cluster);
    c.load("/s3/a.bin", |_| {}).await.unwrap();
    let r = slow.open("/s3/a.bin").await.unwrap();
    let mut s = Box::pin(r.stream(0));
    let mut got = Vec::new();
    let mut loaded_b = false;
    while let Some(chunk) = futures::StreamExt::next(&mut s).await {
        got.extend_from_slice(&chunk.unwrap());
        if !loaded_b && got.len() >= 4 << 20 {
            // 20 MiB more in a 24 MiB cache evicts most of a.bin under the reader.
            c.load("/s3/b.bin", |_| {}).await.unwrap();
            loaded_b = true;
        }
    }
    assert!(got == a, "the stream returned different bytes");
    let st = worker_stats(&c).await;
    assert!(st.evictions > 0, "nothing was evicted: {st:?}");
    // b.bin is intact too.
    assert!(c.read_file("/s3/b.bin").await.unwrap() == b);
}

fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// A client that stops reading mid-stream holds only what the socket
/// buffers hold on the worker; a reset mid-frame costs nothing; other
/// clients are served all along.
#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_reader_and_a_reset_mid_frame_do_not_hold_the_worker() {
    use strata_proto::data::{Message, ReadSpec, Source, write_message};
    use tokio::io::AsyncWriteExt;

    let env = start(ClusterOptions::default());
    let size = 64 << 20;
    let data = pattern(size, 14);
    s3_put(&s3_client(&env.s3), "big.bin", &data).await;
    ok(env.cluster.cli(&["fs", "load", "/s3/big.bin"]).unwrap());
    let c = client(&env.cluster);
    let info = c.stat("/s3/big.bin").await.unwrap();
    let pid = env.cluster.pids()[0];
    let spec = ReadSpec {
        cache_id: u128::from_str_radix(&info.cache_id, 16).unwrap(),
        source: Source::Ufs,
        mount_id: info.mount_id,
        ufs_path: info.ufs_path.clone(),
        fingerprint: info.fingerprint.clone(),
        file_len: info.size,
        block_size: info.block_size,
        page_size: info.page_size,
        offset: 0,
        len: info.size,
    };
    let rss_before = rss_bytes(pid);
    // Ask for 64 MiB and read nothing.
    let mut stalled = tokio::net::TcpStream::connect(&env.cluster.worker_addr)
        .await
        .unwrap();
    write_message(&mut stalled, &Message::Read(spec.clone()))
        .await
        .unwrap();
    stalled.flush().await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    // Others are served meanwhile, byte-exact (over TCP and short-circuit).
    let r = c.open("/s3/big.bin").await.unwrap();
    let mut s = r.stream(0);
    let mut got = Vec::with_capacity(size);
    while let Some(b) = futures::StreamExt::next(&mut s).await {
        got.extend_from_slice(&b.unwrap());
    }
    assert!(got == data, "streamed bytes differ");
    assert_eq!(&c.read_file("/s3/big.bin").await.unwrap()[..], &data[..]);
    let grown = rss_bytes(pid).saturating_sub(rss_before);
    assert!(
        grown < 32 << 20,
        "the worker grew by {} MiB while a reader stalled on a 64 MiB read",
        grown >> 20
    );
    drop(stalled);
    // Half a frame, then the connection goes away.
    let mut half = tokio::net::TcpStream::connect(&env.cluster.worker_addr)
        .await
        .unwrap();
    let frame = Message::Read(spec).encode();
    half.write_all(&frame[..frame.len() / 2]).await.unwrap();
    drop(half);
    assert_eq!(&c.read_file("/s3/big.bin").await.unwrap()[..], &data[..]);
    assert_eq!(ufs_bytes_read(&c).await, size as u64, "nothing refetched");
}
