//! The S3 gateway with real S3 clients: boto3 (and the aws CLI when
//! present) and OpenDAL, against a `strata gateway` process over a cluster
//! whose /s3 directory is an S3 bucket on loopback.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use common::*;
use strata_testkit::ClusterOptions;

const KEY: &str = "gw-test-key";
const SECRET: &str = "gw-test-secret";

/// S3 bucket names have at least 3 characters: the test bucket is also
/// mounted at /gwbucket and served as bucket "gwbucket".
fn mount_gw_bucket(env: &Env) {
    ok(env
        .cluster
        .cli(&["fs", "mount", "/gwbucket", &env.s3.uri(BUCKET)])
        .unwrap());
}

struct GatewayProc {
    child: Child,
    endpoint: String,
}

impl GatewayProc {
    fn start(master: &str) -> GatewayProc {
        let mut child = Command::new(strata_bin())
            .args(["--master", master, "gateway", "--listen", "127.0.0.1:0"])
            .env("STRATA_GATEWAY_ACCESS_KEY", KEY)
            .env("STRATA_GATEWAY_SECRET_KEY", SECRET)
            .env("STRATA_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .expect("strata gateway");
        let out = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(out).read_line(&mut line).unwrap();
        let endpoint = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| panic!("no endpoint in {line:?}"))
            .to_string();
        GatewayProc { child, endpoint }
    }
}

impl Drop for GatewayProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn python_has_boto3() -> bool {
    Command::new("python3")
        .args(["-c", "import boto3"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Runs a boto3 script with `s3` (a client for the gateway) and `bad` (one
/// with a wrong secret) defined; returns stdout.
fn boto3(endpoint: &str, script: &str) -> String {
    let prelude = format!(
        r#"
import boto3, botocore, json, urllib.request
from botocore.config import Config
cfg = Config(s3={{"addressing_style": "path"}}, retries={{"max_attempts": 1}}, signature_version="s3v4")
s3 = boto3.client("s3", endpoint_url="{endpoint}", aws_access_key_id="{KEY}",
                  aws_secret_access_key="{SECRET}", region_name="us-east-1", config=cfg)
bad = boto3.client("s3", endpoint_url="{endpoint}", aws_access_key_id="{KEY}",
                   aws_secret_access_key="wrong", region_name="us-east-1", config=cfg)
def code(f):
    try:
        f()
        return "ok"
    except botocore.exceptions.ClientError as e:
        return e.response["Error"]["Code"]
"#
    );
    let out = Command::new("python3")
        .args(["-c", &format!("{prelude}\n{script}")])
        .env_remove("AWS_CA_BUNDLE")
        .env_remove("AWS_PROFILE")
        .env("NO_PROXY", "127.0.0.1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "boto3 script failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn boto3_reads_writes_lists_and_is_refused_bad_input() {
    if !python_has_boto3() {
        eprintln!("SKIPPED: python3 has no boto3 (pip install boto3)");
        return;
    }
    let env = start(ClusterOptions::default());
    let s3 = s3_client(&env.s3);
    let data = pattern(3 << 20, 4);
    s3_put(&s3, "dir/a.bin", &data).await;
    s3_put(&s3, "dir/sub/b.txt", b"bee").await;
    s3_put(&s3, "top.txt", b"top").await;
    mount_gw_bucket(&env);
    let gw = GatewayProc::start(&env.cluster.master_addr);
    let out = boto3(
        &gw.endpoint,
        r#"
print("buckets", [b["Name"] for b in s3.list_buckets()["Buckets"]])
r = s3.list_objects_v2(Bucket="gwbucket", Delimiter="/")
print("top", [o["Key"] for o in r.get("Contents", [])], [p["Prefix"] for p in r.get("CommonPrefixes", [])])
r = s3.list_objects_v2(Bucket="gwbucket", Prefix="dir/")
print("dir", [(o["Key"], o["Size"]) for o in r["Contents"]])
r = s3.list_objects_v2(Bucket="gwbucket", MaxKeys=1)
r2 = s3.list_objects_v2(Bucket="gwbucket", MaxKeys=5, ContinuationToken=r["NextContinuationToken"])
print("paged", r["IsTruncated"], [o["Key"] for o in r["Contents"]], [o["Key"] for o in r2["Contents"]])
body = s3.get_object(Bucket="gwbucket", Key="dir/a.bin", Range="bytes=1048570-1048579")["Body"].read()
print("range", body.hex())
print("head", s3.head_object(Bucket="gwbucket", Key="dir/a.bin")["ContentLength"])
s3.put_object(Bucket="gwbucket", Key="new/obj.txt", Body=b"hello gateway")
print("put", s3.get_object(Bucket="gwbucket", Key="new/obj.txt")["Body"].read().decode())
url = s3.generate_presigned_url("get_object", Params={"Bucket": "gwbucket", "Key": "top.txt"}, ExpiresIn=60)
try:
    print("presigned", urllib.request.urlopen(url).read().decode())
except urllib.error.HTTPError as e:
    print("presigned", e.code, e.read().decode(), url)
s3.delete_object(Bucket="gwbucket", Key="new/obj.txt")
print("deleted", code(lambda: s3.head_object(Bucket="gwbucket", Key="new/obj.txt")))
print("nokey", code(lambda: s3.get_object(Bucket="gwbucket", Key="missing")))
print("nobucket", code(lambda: s3.list_objects_v2(Bucket="nobucket")))
print("badsig", code(lambda: bad.list_buckets()))
print("dotdot", code(lambda: s3.put_object(Bucket="gwbucket", Key="a/../../etc", Body=b"x")))
print("badrange", code(lambda: s3.get_object(Bucket="gwbucket", Key="top.txt", Range="bytes=100-200")))
"#,
    );
    let line = |p: &str| {
        out.lines()
            .find(|l| l.starts_with(p))
            .unwrap_or_else(|| panic!("no {p:?} in {out}"))
            .to_string()
    };
    assert_eq!(line("buckets"), "buckets ['gwbucket', 's3']");
    assert_eq!(line("top"), "top ['top.txt'] ['dir/']");
    assert_eq!(
        line("dir"),
        format!("dir [('dir/a.bin', {}), ('dir/sub/b.txt', 3)]", 3 << 20)
    );
    assert_eq!(
        line("paged"),
        "paged True ['dir/a.bin'] ['dir/sub/b.txt', 'top.txt']"
    );
    let expect: String = data[1048570..1048580]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(line("range"), format!("range {expect}"));
    assert_eq!(line("head"), format!("head {}", 3 << 20));
    assert_eq!(line("put"), "put hello gateway");
    assert_eq!(line("presigned"), "presigned top");
    assert_eq!(line("deleted"), "deleted 404");
    assert_eq!(line("nokey"), "nokey NoSuchKey");
    assert_eq!(line("nobucket"), "nobucket NoSuchBucket");
    assert_eq!(line("badsig"), "badsig SignatureDoesNotMatch");
    assert_ne!(line("dotdot"), "dotdot ok");
    assert_eq!(line("badrange"), "badrange InvalidRange");
    // What boto3 wrote is in the namespace and the bucket behind it.
    let c = client(&env.cluster);
    assert!(
        c.stat("/gwbucket/new/obj.txt")
            .await
            .unwrap_err()
            .is_not_found()
    );
    assert!(c.stat("/etc").await.unwrap_err().is_not_found());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_large_object_streams_both_ways() {
    if !python_has_boto3() {
        eprintln!("SKIPPED: python3 has no boto3 (pip install boto3)");
        return;
    }
    let env = start(ClusterOptions::default());
    mount_gw_bucket(&env);
    let gw = GatewayProc::start(&env.cluster.master_addr);
    let out = boto3(
        &gw.endpoint,
        r#"
import hashlib, os
blob = os.urandom(40 << 20)
s3.put_object(Bucket="gwbucket", Key="big.bin", Body=blob)
got = s3.get_object(Bucket="gwbucket", Key="big.bin")["Body"].read()
print("same", hashlib.sha256(got).hexdigest() == hashlib.sha256(blob).hexdigest(), len(got))
"#,
    );
    assert!(out.contains(&format!("same True {}", 40 << 20)), "{out}");
    let c = client(&env.cluster);
    assert_eq!(c.stat("/gwbucket/big.bin").await.unwrap().size, 40 << 20);
    // The same object through the other mount of the same bucket.
    c.sync("/s3").await.unwrap();
    assert_eq!(c.stat("/s3/big.bin").await.unwrap().size, 40 << 20);
}

#[tokio::test(flavor = "multi_thread")]
async fn aws_cli_copies_lists_and_reads_ranges() {
    let has_aws = Command::new("aws")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_aws {
        eprintln!("SKIPPED: the aws CLI is not installed");
        return;
    }
    let env = start(ClusterOptions::default());
    mount_gw_bucket(&env);
    let gw = GatewayProc::start(&env.cluster.master_addr);
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(3 << 20, 31);
    std::fs::write(dir.path().join("in.bin"), &data).unwrap();
    let aws = |args: &[&str]| {
        let out = Command::new("aws")
            .args(["--endpoint-url", &gw.endpoint, "--region", "us-east-1"])
            .args(args)
            .env("AWS_ACCESS_KEY_ID", KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET)
            .env_remove("AWS_CA_BUNDLE")
            .env_remove("AWS_PROFILE")
            .env("NO_PROXY", "127.0.0.1")
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "aws {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // Below the CLI's 8 MiB multipart threshold: one PUT.
    aws(&["s3", "cp", "in.bin", "s3://gwbucket/cli/in.bin"]);
    let ls = aws(&["s3", "ls", "s3://gwbucket/cli/"]);
    assert!(
        ls.contains("in.bin") && ls.contains(&(3 << 20).to_string()),
        "{ls}"
    );
    aws(&["s3", "cp", "s3://gwbucket/cli/in.bin", "out.bin"]);
    assert_eq!(std::fs::read(dir.path().join("out.bin")).unwrap(), data);
    aws(&[
        "s3api",
        "get-object",
        "--bucket",
        "gwbucket",
        "--key",
        "cli/in.bin",
        "--range",
        "bytes=100-199",
        "part.bin",
    ]);
    assert_eq!(
        std::fs::read(dir.path().join("part.bin")).unwrap(),
        &data[100..200]
    );
    aws(&["s3", "rm", "s3://gwbucket/cli/in.bin"]);
    let c = client(&env.cluster);
    assert!(
        c.stat("/gwbucket/cli/in.bin")
            .await
            .unwrap_err()
            .is_not_found()
    );
}
