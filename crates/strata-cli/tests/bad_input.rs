//! Bad input and faults: each gets a clear error naming the path or host,
//! no panic, no hang, and nothing else is lost.

mod common;

use std::time::Duration;

use common::*;
use strata_client::{ClientError, WriteOptions, WriteType};
use strata_proto::data::{ErrorCode, Message, ReadSpec, Source, read_message, write_message};
use strata_testkit::ClusterOptions;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_paths_and_malformed_paths() {
    let env = start(ClusterOptions::default());
    let c = &env.cluster;
    let err = fails(c.cli(&["fs", "stat", "/s3/no/such/file"]).unwrap());
    assert!(
        err.contains("/s3/no/such/file: no such file or directory"),
        "{err}"
    );
    let err = fails(c.cli(&["fs", "cat", "/nowhere"]).unwrap());
    assert!(err.contains("/nowhere"), "{err}");

    for (p, why) in [
        ("/s3/a/../b", "'..'"),
        ("/s3//b", "empty segment"),
        ("s3/b", "absolute"),
        ("/s3/./b", "'.'"),
    ] {
        let err = fails(c.cli(&["fs", "ls", p]).unwrap());
        assert!(
            err.contains(&format!("{p:?}")) && err.contains(why),
            "{p}: {err}"
        );
    }
    // The master validates too, whatever a client sends.
    let mut raw =
        strata_proto::pb::master_client::MasterClient::connect(format!("http://{}", c.master_addr))
            .await
            .unwrap();
    for p in ["/s3/../etc", "/a//b", "", "/x\0y"] {
        let st = raw
            .get_file_info(strata_proto::pb::PathRequest { path: p.into() })
            .await
            .unwrap_err();
        assert_eq!(st.code(), tonic::Code::InvalidArgument, "{p:?}");
        assert!(st.message().contains("invalid path"), "{}", st.message());
    }
    // Mount URIs with traversal are refused.
    let err = fails(c.cli(&["fs", "mount", "/t", "file:///tmp/../etc"]).unwrap());
    assert!(err.contains("'..'"), "{err}");
    // Nothing was lost: the mount still works.
    let sdk = client(c);
    sdk.write_file("/s3/ok", b"fine", Default::default())
        .await
        .unwrap();
    assert_eq!(&sdk.read_file("/s3/ok").await.unwrap()[..], b"fine");
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_endpoint_and_wrong_credentials() {
    let env = start(ClusterOptions::default());
    let c = &env.cluster;
    let port = free_port();
    let uri =
        format!("s3://bkt?endpoint=http://127.0.0.1:{port}&access_key_id=a&secret_access_key=b");
    let started = std::time::Instant::now();
    let err = fails(c.cli(&["fs", "mount", "/down", &uri]).unwrap());
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "mount check must not hang"
    );
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    assert!(
        err.contains("reachable") || err.contains("refused"),
        "{err}"
    );
    assert!(err.contains("/down"), "{err}");

    let wrong = format!(
        "s3://bkt?endpoint={}&access_key_id=strata-test-key&secret_access_key=wrong",
        env.s3.endpoint()
    );
    let err = fails(c.cli(&["fs", "mount", "/wrong", &wrong]).unwrap());
    assert!(
        err.contains("credentials") && err.contains(&env.s3.endpoint()),
        "{err}"
    );
    assert!(
        !err.contains("secret_access_key=wrong"),
        "secrets are not echoed: {err}"
    );

    let err = fails(
        c.cli(&["fs", "mount", "/missing", "file:///definitely/not/here"])
            .unwrap(),
    );
    assert!(
        err.contains("/definitely/not/here") && err.contains("does not exist"),
        "{err}"
    );
    assert!(!std::path::Path::new("/definitely/not/here").exists());

    // Failed mounts left nothing behind.
    let mounts = ok(c.cli(&["fs", "mount"]).unwrap());
    assert_eq!(mounts.lines().count(), 1, "{mounts}");
    assert!(mounts.contains("secret_access_key=****"), "{mounts}");
}

#[tokio::test(flavor = "multi_thread")]
async fn object_deleted_behind_the_cache() {
    let env = start(ClusterOptions::default());
    let s3 = s3_client(&env.s3);
    let data = pattern(3 << 20, 9);
    s3_put(&s3, "gone/obj", &data).await;
    s3_put(&s3, "gone/other", b"still here").await;
    let c = client(&env.cluster);
    // Cache only the first page.
    let r = c.open("/s3/gone/obj").await.unwrap();
    assert_eq!(&r.read_at(0, 100).await.unwrap()[..], &data[..100]);
    s3.delete("gone/obj", false).await.unwrap();
    // Uncached pages cannot be fetched: a clear error naming the object.
    let err = c.read_file("/s3/gone/obj").await.unwrap_err();
    assert!(err.is_not_found(), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("/s3/gone/obj") && msg.contains("bkt/gone/obj"),
        "{msg}"
    );
    // After a sync the namespace agrees with the UFS.
    c.sync("/s3/gone").await.unwrap();
    assert!(c.stat("/s3/gone/obj").await.unwrap_err().is_not_found());
    assert_eq!(
        &c.read_file("/s3/gone/other").await.unwrap()[..],
        b"still here"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn full_cache_directory() {
    let env = start(ClusterOptions {
        cache_capacity: "4MiB".into(),
        ..Default::default()
    });
    let c = client(&env.cluster);
    let must = WriteOptions {
        write_type: WriteType::MustCache,
        ..Default::default()
    };
    let first = pattern(3 << 20, 1);
    c.write_file("/s3/pinned-1", &first, must).await.unwrap();
    // Only 1 MiB is left and pinned pages cannot be evicted.
    let err = c
        .write_file("/s3/pinned-2", &pattern(3 << 20, 2), must)
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(
            err,
            ClientError::Worker {
                code: ErrorCode::CacheFull,
                ..
            }
        ),
        "{msg}"
    );
    assert!(
        msg.contains("full") && msg.contains("cache directory") && msg.contains("/s3/pinned-2"),
        "{msg}"
    );
    // The failed file is gone, the first is intact.
    assert!(c.stat("/s3/pinned-2").await.unwrap_err().is_not_found());
    assert_eq!(&c.read_file("/s3/pinned-1").await.unwrap()[..], &first[..]);
    // A persisted file larger than the free space still reads correctly.
    let s3 = s3_client(&env.s3);
    let big = pattern(6 << 20, 3);
    s3_put(&s3, "big", &big).await;
    c.sync("/s3").await.unwrap();
    assert_eq!(&c.read_file("/s3/big").await.unwrap()[..], &big[..]);
    assert_eq!(&c.read_file("/s3/pinned-1").await.unwrap()[..], &first[..]);
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_and_truncated_data_frames() {
    let env = start(ClusterOptions::default());
    let addr = env.cluster.worker_addr.clone();
    let timeout = Duration::from_secs(10);

    // Garbage: the worker answers with an error frame and closes.
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let m = tokio::time::timeout(timeout, read_message(&mut s))
        .await
        .unwrap()
        .unwrap();
    match m {
        Message::Error { code, message } => {
            assert_eq!(code, ErrorCode::BadRequest);
            assert!(message.contains("bad magic"), "{message}");
        }
        other => panic!("expected an error frame, got {other:?}"),
    }
    let mut rest = Vec::new();
    let n = tokio::time::timeout(timeout, s.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n, 0, "connection closed after a bad frame");

    // A header announcing an oversized payload is refused before any allocation.
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut f = Message::WriteEnd.encode().to_vec();
    f[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes());
    s.write_all(&f).await.unwrap();
    match tokio::time::timeout(timeout, read_message(&mut s))
        .await
        .unwrap()
        .unwrap()
    {
        Message::Error { message, .. } => assert!(message.contains("exceeds"), "{message}"),
        other => panic!("expected an error frame, got {other:?}"),
    }

    // A truncated frame followed by EOF: the worker gives up, no hang.
    let spec = ReadSpec {
        cache_id: 1,
        source: Source::Ufs,
        mount_id: 1,
        ufs_path: "x".into(),
        fingerprint: "y".into(),
        file_len: 10,
        block_size: 1 << 20,
        page_size: 1 << 20,
        offset: 0,
        len: 10,
    };
    let full = Message::Read(spec.clone()).encode();
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    s.write_all(&full[..full.len() - 7]).await.unwrap();
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(timeout, s.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    let (m, _) = Message::decode(&rest).unwrap().expect("an error frame");
    assert!(
        matches!(m, Message::Error { ref message, .. } if message.contains("closed inside a frame")),
        "{m:?}"
    );

    // A well-formed request with nonsense geometry gets a typed error and the
    // connection stays usable.
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let bad = ReadSpec {
        page_size: 3,
        ..spec
    };
    write_message(&mut s, &Message::Read(bad)).await.unwrap();
    match tokio::time::timeout(timeout, read_message(&mut s))
        .await
        .unwrap()
        .unwrap()
    {
        Message::Error { code, message } => {
            assert_eq!(code, ErrorCode::BadRequest);
            assert!(message.contains("page size"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    write_message(&mut s, &Message::Free { cache_id: 5 })
        .await
        .unwrap();
    assert!(matches!(
        tokio::time::timeout(timeout, read_message(&mut s))
            .await
            .unwrap()
            .unwrap(),
        Message::End { .. }
    ));

    // The worker still serves real clients.
    let c = client(&env.cluster);
    c.write_file("/s3/after", b"still serving", Default::default())
        .await
        .unwrap();
    assert_eq!(
        &c.read_file("/s3/after").await.unwrap()[..],
        b"still serving"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn no_master_is_a_clear_error() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(strata_bin())
        .args(["--master", &format!("127.0.0.1:{port}"), "fs", "ls", "/"])
        .env_remove("STRATA_MASTER")
        .current_dir(dir.path())
        .output()
        .unwrap();
    let err = fails(out);
    assert!(
        err.contains(&format!("127.0.0.1:{port}")) && err.contains("is `strata master`"),
        "{err}"
    );
}
