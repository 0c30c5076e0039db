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
    /// Config file and multipart staging; removed with the gateway.
    _dir: tempfile::TempDir,
}

impl GatewayProc {
    fn start(master: &str) -> GatewayProc {
        Self::start_with(master, "")
    }

    /// A gateway with `config` (TOML, e.g. a `[gateway]` section) on top of
    /// the test keys.
    fn start_with(master: &str, config: &str) -> GatewayProc {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let cfg = dir.join("strata.toml");
        std::fs::write(&cfg, config).unwrap();
        let mut child = Command::new(strata_bin())
            .args(["--master", master, "gateway", "--listen", "127.0.0.1:0"])
            .env("STRATA_CONFIG", &cfg)
            .env("STRATA_GATEWAY_UPLOAD_DIR", dir.join("uploads"))
            .env("STRATA_GATEWAY_ACCESS_KEY", KEY)
            .env("STRATA_GATEWAY_SECRET_KEY", SECRET)
            .env("STRATA_LOG", "warn,s3s=off")
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
        GatewayProc {
            child,
            endpoint,
            _dir: tmp,
        }
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
/// A cluster with the test bucket mounted and a gateway process in front
/// of it; `None` (the test is skipped) without boto3.
fn boto3_gateway() -> Option<(Env, GatewayProc)> {
    if !python_has_boto3() {
        eprintln!("SKIPPED: python3 has no boto3 (pip install boto3)");
        return None;
    }
    let env = start(ClusterOptions::default());
    mount_gw_bucket(&env);
    let gw = GatewayProc::start(&env.cluster.master_addr);
    Some((env, gw))
}

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

/// Listings with prefixes that name a directory, a missing path, a path
/// under a file, and a start-after inside a common prefix.
const SCOPED_LISTINGS: &str = r#"
def scoped(s3):
    def ls(prefix, **kw):
        r = s3.list_objects_v2(Bucket="gwbucket", Prefix=prefix, **kw)
        return [o["Key"] for o in r.get("Contents", [])] + [p["Prefix"] for p in r.get("CommonPrefixes", [])]
    def paged(**kw):
        out, tok = [], None
        while True:
            args = dict(Bucket="gwbucket", MaxKeys=1, **kw)
            if tok:
                args["ContinuationToken"] = tok
            r = s3.list_objects_v2(**args)
            out += [o["Key"] for o in r.get("Contents", [])] + [p["Prefix"] for p in r.get("CommonPrefixes", [])]
            if not r.get("IsTruncated"):
                return out
            tok = r["NextContinuationToken"]
    return (ls("dir/sub/", Delimiter="/"), ls("dir/s"), ls("dir/", Delimiter="/"), ls("to"), ls("missing/dir/"),
            ls("top.txt/"), ls("dir/a.bin/x"), ls("", Delimiter="/", StartAfter="dir/a.bin"),
            paged(), paged(Delimiter="/"), paged(Prefix="dir/", Delimiter="/"))
"#;

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
        &format!(
            "{SCOPED_LISTINGS}{}",
            r#"
print("buckets", [b["Name"] for b in s3.list_buckets()["Buckets"]])
r = s3.list_objects_v2(Bucket="gwbucket", Delimiter="/")
print("top", [o["Key"] for o in r.get("Contents", [])], [p["Prefix"] for p in r.get("CommonPrefixes", [])])
r = s3.list_objects_v2(Bucket="gwbucket", Prefix="dir/")
print("dir", [(o["Key"], o["Size"]) for o in r["Contents"]])
r = s3.list_objects_v2(Bucket="gwbucket", MaxKeys=1)
r2 = s3.list_objects_v2(Bucket="gwbucket", MaxKeys=5, ContinuationToken=r["NextContinuationToken"])
print("paged", r["IsTruncated"], [o["Key"] for o in r["Contents"]], [o["Key"] for o in r2["Contents"]])
print("scoped", *scoped(s3))
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
"#
        ),
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
    // A prefix with a directory part lists that directory's subtree; one
    // under a missing path or under a file lists nothing; a start-after
    // inside a common prefix still lists the prefix.
    let scoped = "scoped ['dir/sub/b.txt'] ['dir/sub/b.txt'] ['dir/a.bin', 'dir/sub/'] ['top.txt'] [] [] [] ['top.txt', 'dir/'] \
                  ['dir/a.bin', 'dir/sub/b.txt', 'top.txt'] ['dir/', 'top.txt'] ['dir/a.bin', 'dir/sub/']";
    assert_eq!(line("scoped"), scoped);
    // The same from a gateway without the metadata cache (above, most
    // listings were cut from the cached listing of the whole bucket; here
    // each lists its own directory, and pages after the first walk the
    // tree from where the last one ended; an empty directory `new/` is
    // left by the writes above and is not listed).
    let uncached = GatewayProc::start_with(
        &env.cluster.master_addr,
        "[gateway]\nmetadata_ttl_secs = 0\n",
    );
    let out2 = boto3(
        &uncached.endpoint,
        &format!("{SCOPED_LISTINGS}print(\"scoped\", *scoped(s3))\n"),
    );
    assert_eq!(out2.trim(), scoped, "{out2}");
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
async fn object_metadata_and_tags_are_kept_copied_and_replaced() {
    let Some((env, gw)) = boto3_gateway() else {
        return;
    };
    let out = boto3(
        &gw.endpoint,
        r#"
B = "gwbucket"
s3.put_object(Bucket=B, Key="m/a.txt", Body=b"alpha", Metadata={"Color": "blue", "n": "1"},
              ContentType="text/plain", CacheControl="max-age=60", Tagging="team=ml&stage=raw%20data")
h = s3.head_object(Bucket=B, Key="m/a.txt")
print("head", sorted(h["Metadata"].items()), h["ContentType"], h["CacheControl"])
g = s3.get_object(Bucket=B, Key="m/a.txt")
print("get", sorted(g["Metadata"].items()), g["ContentType"], g.get("TagCount"), g["Body"].read().decode())
t = s3.get_object_tagging(Bucket=B, Key="m/a.txt")["TagSet"]
print("tags", sorted((x["Key"], x["Value"]) for x in t))
s3.put_object_tagging(Bucket=B, Key="m/a.txt", Tagging={"TagSet": [{"Key": "k", "Value": "v&w"}]})
print("retagged", [(x["Key"], x["Value"]) for x in s3.get_object_tagging(Bucket=B, Key="m/a.txt")["TagSet"]])
print("meta kept", sorted(s3.head_object(Bucket=B, Key="m/a.txt")["Metadata"].items()))
s3.copy_object(Bucket=B, Key="m/copy.txt", CopySource={"Bucket": B, "Key": "m/a.txt"})
c = s3.head_object(Bucket=B, Key="m/copy.txt")
print("copy", sorted(c["Metadata"].items()), c["ContentType"],
      [(x["Key"], x["Value"]) for x in s3.get_object_tagging(Bucket=B, Key="m/copy.txt")["TagSet"]])
s3.copy_object(Bucket=B, Key="m/repl.txt", CopySource={"Bucket": B, "Key": "m/a.txt"},
               MetadataDirective="REPLACE", Metadata={"other": "x"}, ContentType="application/json",
               TaggingDirective="REPLACE", Tagging="")
r = s3.head_object(Bucket=B, Key="m/repl.txt")
print("replaced", sorted(r["Metadata"].items()), r["ContentType"],
      s3.get_object_tagging(Bucket=B, Key="m/repl.txt")["TagSet"])
print("self-copy plain", code(lambda: s3.copy_object(Bucket=B, Key="m/a.txt", CopySource={"Bucket": B, "Key": "m/a.txt"})))
s3.copy_object(Bucket=B, Key="m/a.txt", CopySource={"Bucket": B, "Key": "m/a.txt"},
               MetadataDirective="REPLACE", Metadata={"color": "red"})
s = s3.head_object(Bucket=B, Key="m/a.txt")
print("selfcopied", sorted(s["Metadata"].items()), s.get("ContentType"),
      [(x["Key"], x["Value"]) for x in s3.get_object_tagging(Bucket=B, Key="m/a.txt")["TagSet"]],
      s3.get_object(Bucket=B, Key="m/a.txt")["Body"].read().decode())
s3.delete_object_tagging(Bucket=B, Key="m/a.txt")
print("untagged", s3.get_object_tagging(Bucket=B, Key="m/a.txt")["TagSet"])
u = s3.create_multipart_upload(Bucket=B, Key="m/mp.bin", Metadata={"part": "yes"}, ContentType="application/x-test", Tagging="mp=1")
p = s3.upload_part(Bucket=B, Key="m/mp.bin", UploadId=u["UploadId"], PartNumber=1, Body=b"z" * 1000)
s3.complete_multipart_upload(Bucket=B, Key="m/mp.bin", UploadId=u["UploadId"],
                             MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": p["ETag"]}]})
m = s3.head_object(Bucket=B, Key="m/mp.bin")
print("multipart", sorted(m["Metadata"].items()), m["ContentType"],
      [(x["Key"], x["Value"]) for x in s3.get_object_tagging(Bucket=B, Key="m/mp.bin")["TagSet"]])
s3.put_object(Bucket=B, Key="m/mp.bin", Body=b"new")
print("overwritten", s3.head_object(Bucket=B, Key="m/mp.bin")["Metadata"],
      s3.get_object_tagging(Bucket=B, Key="m/mp.bin")["TagSet"])
print("too large", code(lambda: s3.put_object(Bucket=B, Key="m/big.txt", Body=b"x", Metadata={"k": "v" * 2100})))
many = "&".join("k%d=v" % i for i in range(11))
print("too many tags", code(lambda: s3.put_object(Bucket=B, Key="m/tags.txt", Body=b"x", Tagging=many)))
print("dup tags", code(lambda: s3.put_object_tagging(Bucket=B, Key="m/copy.txt",
      Tagging={"TagSet": [{"Key": "a", "Value": "1"}, {"Key": "a", "Value": "2"}]})))
print("no such key", code(lambda: s3.get_object_tagging(Bucket=B, Key="m/none")))
# Refused before its body is read, request after request on kept-alive
# connections: every client sees the S3 error, never a bare status or a
# reset connection (boto3 sends these with Expect: 100-continue).
import collections, http.client, time, urllib.parse
print("refused in a row", sorted(collections.Counter(code(lambda: s3.put_object(
    Bucket=B, Key="m/tags.txt", Body=b"x", Tagging=many)) for _ in range(300)).items()))
# The same without Expect, the body arriving after the answer: the
# connection is still usable for the next request.
u = urllib.parse.urlparse(s3.meta.endpoint_url)
conn = http.client.HTTPConnection(u.hostname, u.port)
answers = []
for _ in range(3):
    conn.putrequest("PUT", "/" + B + "/m/anon.txt")
    conn.putheader("Content-Length", "5")
    conn.endheaders()
    time.sleep(0.05)
    conn.send(b"hello")
    r = conn.getresponse()
    body = r.read().decode()
    answers.append((r.status, "<Code>AccessDenied</Code>" in body, r.getheader("Connection")))
print("late bodies", answers)
print("after bad", [o["Key"] for o in s3.list_objects_v2(Bucket=B, Prefix="m/")["Contents"]],
      [(x["Key"], x["Value"]) for x in s3.get_object_tagging(Bucket=B, Key="m/copy.txt")["TagSet"]])
"#,
    );
    let line = |p: &str| {
        out.lines()
            .find(|l| l.starts_with(p))
            .unwrap_or_else(|| panic!("no {p:?} in {out}"))
            .to_string()
    };
    assert_eq!(
        line("head"),
        "head [('color', 'blue'), ('n', '1')] text/plain max-age=60"
    );
    assert_eq!(
        line("get"),
        "get [('color', 'blue'), ('n', '1')] text/plain 2 alpha"
    );
    assert_eq!(line("tags"), "tags [('stage', 'raw data'), ('team', 'ml')]");
    assert_eq!(line("retagged"), "retagged [('k', 'v&w')]");
    assert_eq!(
        line("meta kept"),
        "meta kept [('color', 'blue'), ('n', '1')]"
    );
    assert_eq!(
        line("copy"),
        "copy [('color', 'blue'), ('n', '1')] text/plain [('k', 'v&w')]"
    );
    assert_eq!(
        line("replaced"),
        "replaced [('other', 'x')] application/json []"
    );
    assert_eq!(line("self-copy plain"), "self-copy plain InvalidRequest");
    assert_eq!(
        line("selfcopied"),
        "selfcopied [('color', 'red')] binary/octet-stream [('k', 'v&w')] alpha"
    );
    assert_eq!(line("untagged"), "untagged []");
    assert_eq!(
        line("multipart"),
        "multipart [('part', 'yes')] application/x-test [('mp', '1')]"
    );
    assert_eq!(line("overwritten"), "overwritten {} []");
    assert_eq!(line("too large"), "too large MetadataTooLarge");
    assert_eq!(line("too many tags"), "too many tags InvalidTag");
    assert_eq!(line("dup tags"), "dup tags InvalidTag");
    assert_eq!(line("no such key"), "no such key NoSuchKey");
    assert_eq!(
        line("refused in a row"),
        "refused in a row [('InvalidTag', 300)]"
    );
    assert_eq!(
        line("late bodies"),
        "late bodies [(403, True, None), (403, True, None), (403, True, None)]"
    );
    assert_eq!(
        line("after bad"),
        "after bad ['m/a.txt', 'm/copy.txt', 'm/mp.bin', 'm/repl.txt'] [('k', 'v&w')]"
    );
    // The metadata is the file's extended attributes in the namespace.
    let c = client(&env.cluster);
    let f = c.stat("/gwbucket/m/copy.txt").await.unwrap();
    assert_eq!(f.xattrs.get("user.s3.meta.color").unwrap(), b"blue");
    assert_eq!(f.xattrs.get("user.s3.tagging").unwrap(), b"k=v%26w");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_large_object_streams_both_ways() {
    let Some((env, gw)) = boto3_gateway() else {
        return;
    };
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

/// Multipart uploads (with UploadPartCopy, ListParts, ListMultipartUploads,
/// abort and bad completions), CopyObject, conditional GETs, Content-MD5,
/// DeleteObjects, ListObjects v1 and ListObjectVersions through boto3.
#[tokio::test(flavor = "multi_thread")]
async fn boto3_multipart_copy_conditions_and_batch_delete() {
    let Some((_env, gw)) = boto3_gateway() else {
        return;
    };
    let out = boto3(
        &gw.endpoint,
        r#"
import hashlib, os, datetime, base64
B = "gwbucket"
p1, p2 = os.urandom(5 << 20), os.urandom(1 << 20)
mp = s3.create_multipart_upload(Bucket=B, Key="mp/obj.bin")
uid = mp["UploadId"]
e1 = s3.upload_part(Bucket=B, Key="mp/obj.bin", UploadId=uid, PartNumber=1, Body=p1)["ETag"]
e2 = s3.upload_part(Bucket=B, Key="mp/obj.bin", UploadId=uid, PartNumber=2, Body=p2)["ETag"]
print("etag1", e1.strip('"') == hashlib.md5(p1).hexdigest())
print("parts", [(p["PartNumber"], p["Size"]) for p in s3.list_parts(Bucket=B, Key="mp/obj.bin", UploadId=uid)["Parts"]])
print("uploads", [(u["Key"], u["UploadId"] == uid) for u in s3.list_multipart_uploads(Bucket=B).get("Uploads", [])])
print("hidden", [o["Key"] for o in s3.list_objects_v2(Bucket=B).get("Contents", [])])
print("badetag", code(lambda: s3.complete_multipart_upload(Bucket=B, Key="mp/obj.bin", UploadId=uid,
    MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": '"00000000000000000000000000000000"'}]})))
print("order", code(lambda: s3.complete_multipart_upload(Bucket=B, Key="mp/obj.bin", UploadId=uid,
    MultipartUpload={"Parts": [{"PartNumber": 2, "ETag": e2}, {"PartNumber": 1, "ETag": e1}]})))
s3.complete_multipart_upload(Bucket=B, Key="mp/obj.bin", UploadId=uid,
    MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": e1}, {"PartNumber": 2, "ETag": e2}]})
got = s3.get_object(Bucket=B, Key="mp/obj.bin")["Body"].read()
print("assembled", got == p1 + p2)
print("gone", code(lambda: s3.list_parts(Bucket=B, Key="mp/obj.bin", UploadId=uid)))
# Small parts other than the last are refused; abort removes an upload.
u2 = s3.create_multipart_upload(Bucket=B, Key="mp/small.bin")["UploadId"]
a = s3.upload_part(Bucket=B, Key="mp/small.bin", UploadId=u2, PartNumber=1, Body=b"a")["ETag"]
b = s3.upload_part(Bucket=B, Key="mp/small.bin", UploadId=u2, PartNumber=2, Body=b"b")["ETag"]
print("small", code(lambda: s3.complete_multipart_upload(Bucket=B, Key="mp/small.bin", UploadId=u2,
    MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": a}, {"PartNumber": 2, "ETag": b}]})))
s3.abort_multipart_upload(Bucket=B, Key="mp/small.bin", UploadId=u2)
print("aborted", code(lambda: s3.upload_part(Bucket=B, Key="mp/small.bin", UploadId=u2, PartNumber=3, Body=b"c")))
print("nosmall", code(lambda: s3.head_object(Bucket=B, Key="mp/small.bin")))
# UploadPartCopy of a range of the assembled object.
u3 = s3.create_multipart_upload(Bucket=B, Key="mp/copy.bin")["UploadId"]
c1 = s3.upload_part_copy(Bucket=B, Key="mp/copy.bin", UploadId=u3, PartNumber=1,
    CopySource={"Bucket": B, "Key": "mp/obj.bin"}, CopySourceRange="bytes=100-199")["CopyPartResult"]["ETag"]
s3.complete_multipart_upload(Bucket=B, Key="mp/copy.bin", UploadId=u3, MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": c1}]})
print("partcopy", s3.get_object(Bucket=B, Key="mp/copy.bin")["Body"].read() == got[100:200])
# CopyObject, and its source conditions.
s3.copy_object(Bucket=B, Key="copies/obj.bin", CopySource={"Bucket": B, "Key": "mp/obj.bin"})
print("copied", s3.get_object(Bucket=B, Key="copies/obj.bin")["Body"].read() == got)
print("copyif", code(lambda: s3.copy_object(Bucket=B, Key="copies/x", CopySource={"Bucket": B, "Key": "mp/obj.bin"}, CopySourceIfMatch='"nope"')))
print("copymissing", code(lambda: s3.copy_object(Bucket=B, Key="copies/y", CopySource={"Bucket": B, "Key": "nothing"})))
# Conditional GETs.
etag = s3.head_object(Bucket=B, Key="mp/obj.bin")["ETag"]
future = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=1)
past = datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc)
print("ifmatch", code(lambda: s3.get_object(Bucket=B, Key="mp/obj.bin", IfMatch=etag)))
print("ifmatchbad", code(lambda: s3.get_object(Bucket=B, Key="mp/obj.bin", IfMatch='"other"')))
print("ifnonematch", code(lambda: s3.get_object(Bucket=B, Key="mp/obj.bin", IfNoneMatch=etag)))
print("ifmodified", code(lambda: s3.get_object(Bucket=B, Key="mp/obj.bin", IfModifiedSince=future)))
print("ifmodifiedpast", code(lambda: s3.get_object(Bucket=B, Key="mp/obj.bin", IfModifiedSince=past)))
print("ifunmodified", code(lambda: s3.head_object(Bucket=B, Key="mp/obj.bin", IfUnmodifiedSince=past)))
print("stable", s3.head_object(Bucket=B, Key="mp/obj.bin")["ETag"] == etag)
# Content-MD5: right is accepted, wrong is refused and writes nothing.
body = b"checked body"
md5 = base64.b64encode(hashlib.md5(body).digest()).decode()
print("md5ok", code(lambda: s3.put_object(Bucket=B, Key="md5/ok", Body=body, ContentMD5=md5)))
print("md5bad", code(lambda: s3.put_object(Bucket=B, Key="md5/bad", Body=body, ContentMD5=base64.b64encode(b"0" * 16).decode())))
print("md5none", code(lambda: s3.head_object(Bucket=B, Key="md5/bad")))
# ListObjects v1 with a marker, ListObjectVersions, DeleteObjects.
r = s3.list_objects(Bucket=B, Prefix="mp/", MaxKeys=1)
r2 = s3.list_objects(Bucket=B, Prefix="mp/", Marker=r["Contents"][-1]["Key"])
print("v1", r["IsTruncated"], [o["Key"] for o in r["Contents"]] + [o["Key"] for o in r2["Contents"]])
v = s3.list_object_versions(Bucket=B, Prefix="copies/")
print("versions", [(x["Key"], x["VersionId"], x["IsLatest"]) for x in v["Versions"]])
d = s3.delete_objects(Bucket=B, Delete={"Objects": [{"Key": "mp/copy.bin"}, {"Key": "copies/obj.bin"}, {"Key": "never"}]})
print("deleted", sorted(x["Key"] for x in d.get("Deleted", [])), d.get("Errors", []))
print("left", [o["Key"] for o in s3.list_objects_v2(Bucket=B).get("Contents", [])])
"#,
    );
    let line = |p: &str| {
        out.lines()
            .find(|l| l.split_whitespace().next() == Some(p))
            .unwrap_or_else(|| panic!("no {p:?} in {out}"))
            .to_string()
    };
    for (k, v) in [
        ("etag1", "True"),
        ("parts", &format!("[(1, {}), (2, {})]", 5 << 20, 1 << 20)),
        ("uploads", "[('mp/obj.bin', True)]"),
        ("hidden", "[]"),
        ("badetag", "InvalidPart"),
        ("order", "InvalidPartOrder"),
        ("assembled", "True"),
        ("gone", "NoSuchUpload"),
        ("small", "EntityTooSmall"),
        ("aborted", "NoSuchUpload"),
        ("nosmall", "404"),
        ("partcopy", "True"),
        ("copied", "True"),
        ("copyif", "PreconditionFailed"),
        ("copymissing", "NoSuchKey"),
        ("ifmatch", "ok"),
        ("ifmatchbad", "PreconditionFailed"),
        ("ifnonematch", "304"),
        ("ifmodified", "304"),
        ("ifmodifiedpast", "ok"),
        ("ifunmodified", "412"),
        ("stable", "True"),
        ("md5ok", "ok"),
        ("md5bad", "BadDigest"),
        ("md5none", "404"),
        ("v1", "True ['mp/copy.bin', 'mp/obj.bin']"),
        ("versions", "[('copies/obj.bin', 'null', True)]"),
        ("deleted", "['copies/obj.bin', 'mp/copy.bin', 'never'] []"),
        ("left", "['md5/ok', 'mp/obj.bin']"),
    ] {
        assert_eq!(line(k), format!("{k} {v}"), "{out}");
    }
}

/// Restricted keys see only their buckets; a key over its request rate
/// gets SlowDown; bandwidth limits hold per connection and in total.
#[tokio::test(flavor = "multi_thread")]
async fn keys_permissions_rate_and_bandwidth_limits() {
    if !python_has_boto3() {
        eprintln!("SKIPPED: python3 has no boto3 (pip install boto3)");
        return;
    }
    let env = start(ClusterOptions::default());
    mount_gw_bucket(&env);
    let c = client(&env.cluster);
    c.mkdir("/scratch", false).await.unwrap();
    let gw = GatewayProc::start_with(
        &env.cluster.master_addr,
        r#"
[gateway]
conn_bandwidth = "4MiB"
max_bandwidth = "6MiB"
requests_per_sec = 10

[[gateway.keys]]
access_key = "reader"
secret_key = "reader-secret"
read = ["gwbucket"]
write = []
"#,
    );
    let out = boto3(
        &gw.endpoint,
        r#"
import os, time, threading
B = "gwbucket"
ro = boto3.client("s3", endpoint_url=s3.meta.endpoint_url, aws_access_key_id="reader",
                  aws_secret_access_key="reader-secret", region_name="us-east-1", config=cfg)
s3.put_object(Bucket=B, Key="blob", Body=os.urandom(8 << 20))
print("roget", code(lambda: ro.head_object(Bucket=B, Key="blob")))
print("roput", code(lambda: ro.put_object(Bucket=B, Key="x", Body=b"x")))
print("rodel", code(lambda: ro.delete_object(Bucket=B, Key="blob")))
print("roother", code(lambda: ro.list_objects_v2(Bucket="scratch")))
print("rocopy", code(lambda: ro.copy_object(Bucket=B, Key="c", CopySource={"Bucket": B, "Key": "blob"})))
print("robuckets", ",".join(b["Name"] for b in ro.list_buckets()["Buckets"]))
print("buckets", ",".join(b["Name"] for b in s3.list_buckets()["Buckets"]))
# One connection held to 4 MiB/s: 8 MiB take at least ~1.8 s.
t = time.time(); n = len(s3.get_object(Bucket=B, Key="blob")["Body"].read()); dt = time.time() - t
print("conn_rate", n, round(n / dt / (1 << 20), 2))
# Three connections at once, 6 MiB/s in total.
sess = [boto3.client("s3", endpoint_url=s3.meta.endpoint_url, aws_access_key_id=s3._request_signer._credentials.access_key,
        aws_secret_access_key=s3._request_signer._credentials.secret_key, region_name="us-east-1", config=cfg) for _ in range(3)]
got = [0, 0, 0]
def get(i):
    got[i] = len(sess[i].get_object(Bucket=B, Key="blob")["Body"].read())
ths = [threading.Thread(target=get, args=(i,)) for i in range(3)]
t = time.time()
[x.start() for x in ths]; [x.join() for x in ths]
dt = time.time() - t
print("total_rate", sum(got), round(sum(got) / dt / (1 << 20), 2))
# 100 requests as fast as possible against 10/s: some are refused.
codes = []
def burst(c):
    for _ in range(25):
        codes.append(code(lambda: c.get_bucket_location(Bucket=B)))
ths = [threading.Thread(target=burst, args=(sess[i % 3],)) for i in range(4)]
[x.start() for x in ths]; [x.join() for x in ths]
print("slowdown", codes.count("SlowDown") > 0, codes.count("ok") > 0, sorted(set(codes)))
time.sleep(1.2)
print("recovered", code(lambda: s3.head_object(Bucket=B, Key="blob")))
"#,
    );
    let line = |p: &str| {
        out.lines()
            .find(|l| l.split_whitespace().next() == Some(p))
            .unwrap_or_else(|| panic!("no {p:?} in {out}"))
            .to_string()
    };
    assert_eq!(line("roget"), "roget ok", "{out}");
    assert_eq!(line("roput"), "roput AccessDenied", "{out}");
    assert_eq!(line("rodel"), "rodel AccessDenied", "{out}");
    assert_eq!(line("roother"), "roother AccessDenied", "{out}");
    assert_eq!(line("rocopy"), "rocopy AccessDenied", "{out}");
    // ListBuckets shows a restricted key its buckets only.
    assert_eq!(line("robuckets"), "robuckets gwbucket", "{out}");
    assert_eq!(line("buckets"), "buckets gwbucket,s3,scratch", "{out}");
    // Limits are upper bounds: the transfer must not beat them by > 10 %.
    let rate = |l: String| -> (u64, f64) {
        let v: Vec<&str> = l.split_whitespace().collect();
        (v[1].parse().unwrap(), v[2].parse().unwrap())
    };
    let (n, r) = rate(line("conn_rate"));
    assert_eq!(n, 8 << 20);
    assert!(
        r <= 4.0 * 1.1,
        "one connection ran at {r} MiB/s over a 4 MiB/s limit"
    );
    let (n, r) = rate(line("total_rate"));
    assert_eq!(n, 3 * (8 << 20));
    assert!(
        r <= 6.0 * 1.1,
        "three connections ran at {r} MiB/s over a 6 MiB/s limit"
    );
    assert!(line("slowdown").starts_with("slowdown True True"), "{out}");
    assert_eq!(line("recovered"), "recovered ok", "{out}");
    // Nothing the read-only key tried changed the namespace.
    assert!(c.stat("/gwbucket/x").await.unwrap_err().is_not_found());
    assert!(c.stat("/gwbucket/c").await.unwrap_err().is_not_found());
    assert_eq!(c.stat("/gwbucket/blob").await.unwrap().size, 8 << 20);
}

/// Bad requests get the error AWS S3 gives (or the closest the namespace
/// allows, see docs/s3-compatibility.md) and change nothing.
#[tokio::test(flavor = "multi_thread")]
async fn limits_change_while_the_gateway_runs() {
    if !python_has_boto3() {
        eprintln!("SKIPPED: python3 has no boto3 (pip install boto3)");
        return;
    }
    let env = start(ClusterOptions::default());
    mount_gw_bucket(&env);
    let gw = GatewayProc::start_with(
        &env.cluster.master_addr,
        "[gateway]\nconn_bandwidth = \"4MiB\"\n",
    );
    let cfg = gw._dir.path().join("strata.toml");
    let script = r#"
import os, time, signal, threading
B = "gwbucket"
def reload(text):
    open(CFG, "w").write(text)
    os.kill(PID, signal.SIGHUP)
    time.sleep(0.5)
def rate():
    t = time.time(); n = len(s3.get_object(Bucket=B, Key="blob")["Body"].read())
    return round(n / (time.time() - t) / (1 << 20), 2)
# Without retries (botocore retries SlowDown), 4 threads of 25 requests.
once = Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1}, signature_version="s3v4")
def burst():
    codes = []
    def run():
        c = boto3.client("s3", endpoint_url=s3.meta.endpoint_url, aws_access_key_id=s3._request_signer._credentials.access_key,
                         aws_secret_access_key=s3._request_signer._credentials.secret_key, region_name="us-east-1", config=once)
        for _ in range(25):
            codes.append(code(lambda: c.get_bucket_location(Bucket=B)))
    ths = [threading.Thread(target=run) for _ in range(4)]
    [t.start() for t in ths]; [t.join() for t in ths]
    return codes.count("SlowDown")
s3.put_object(Bucket=B, Key="blob", Body=os.urandom(8 << 20))
print("first", rate(), burst())
# The same client (its pooled connection stays open) after a reload.
reload('[gateway]\nconn_bandwidth = "12MiB"\nrequests_per_sec = 10\n')
print("reloaded", rate(), burst())
time.sleep(1.2)
reload("[gateway]\n")
print("unlimited", burst())
reload("[gateway]\nconn_bandwidth = 'not a size'\n")
print("bad config", code(lambda: s3.head_object(Bucket=B, Key="blob")))
"#
    .replace("CFG", &format!("{:?}", cfg.display().to_string()))
    .replace("PID", &gw.child.id().to_string());
    let out = boto3(&gw.endpoint, &script);
    let line = |p: &str| -> Vec<f64> {
        out.lines()
            .find(|l| l.starts_with(p))
            .unwrap_or_else(|| panic!("no {p:?} in {out}"))
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect()
    };
    eprintln!("{out}");
    let first = line("first");
    let reloaded = line("reloaded");
    // Limits are upper bounds (not beaten by more than 10 %); the reload
    // must show: the same connection runs faster, and requests are counted.
    assert!(first[0] <= 4.0 * 1.1, "{out}");
    assert_eq!(first[1], 0.0, "no request limit at start: {out}");
    assert!(reloaded[0] <= 12.0 * 1.1, "{out}");
    assert!(
        reloaded[0] > first[0] * 1.5,
        "the new limit did not apply: {out}"
    );
    assert!(reloaded[1] > 0.0, "10 requests/s after the reload: {out}");
    assert_eq!(line("unlimited"), [0.0], "{out}");
    assert!(out.contains("bad config ok"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_s3_errors_and_change_nothing() {
    let Some((env, gw)) = boto3_gateway() else {
        return;
    };
    let out = boto3(
        &gw.endpoint,
        &format!(
            r#"
import hashlib, base64, time, re
from botocore.awsrequest import AWSRequest
from botocore.auth import S3SigV4Auth
from botocore.credentials import Credentials
B = "gwbucket"
s3.put_object(Bucket=B, Key="keep.txt", Body=b"keep")

def raw(method, path, body=b"", headers=None):
    url = s3.meta.endpoint_url + path
    h = dict(headers or {{}})
    h["x-amz-content-sha256"] = hashlib.sha256(body).hexdigest()
    req = AWSRequest(method=method, url=url, data=body, headers=h)
    S3SigV4Auth(Credentials("{KEY}", "{SECRET}"), "s3", "us-east-1").add_auth(req)
    r = urllib.request.Request(url, data=body or None, method=method, headers=dict(req.headers))
    try:
        resp = urllib.request.urlopen(r)
        return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")

def show(name, res):
    status, body = res
    m = re.search(r"<Code>([^<]*)</Code>", body)
    print(name, status, m.group(1) if m else "-")

url = s3.generate_presigned_url("get_object", Params={{"Bucket": B, "Key": "keep.txt"}}, ExpiresIn=1)
time.sleep(2.5)
try:
    urllib.request.urlopen(url)
    print("expired", 200, "-")
except urllib.error.HTTPError as e:
    m = re.search(r"<Code>([^<]*)</Code>", e.read().decode())
    print("expired", e.code, m.group(1) if m else "-")
bad = b"<Delete><Object><Key>keep.txt</Key>"
show("badxml", raw("POST", "/gwbucket?delete", bad, {{"Content-MD5": base64.b64encode(hashlib.md5(bad).digest()).decode()}}))
uid = s3.create_multipart_upload(Bucket=B, Key="mp")["UploadId"]
show("badcomplete", raw("POST", "/gwbucket/mp?uploadId=" + uid, b"<CompleteMultipartUpload><Part>"))
show("bigheader", raw("GET", "/gwbucket/keep.txt", b"", {{"x-amz-meta-big": "a" * 100000}}))
show("nul", raw("PUT", "/gwbucket/a%00b", b"x"))
show("utf8", raw("PUT", "/gwbucket/a%FFb", b"x"))
show("dotdot", raw("PUT", "/gwbucket/a/../../escape", b"x"))
show("range", raw("GET", "/gwbucket/keep.txt", b"", {{"Range": "bytes=10-20"}}))
show("ok", raw("GET", "/gwbucket/keep.txt"))
post = s3.generate_presigned_post(B, "posted.txt")
bnd = "strataformboundary"
part = lambda name, v, extra="": ("--" + bnd + '\r\nContent-Disposition: form-data; name="' + name + '"' + extra + "\r\n\r\n").encode() + v + b"\r\n"
form = b"".join(part(k, v.encode()) for k, v in post["fields"].items()) + part("file", b"form", '; filename="x"') + ("--" + bnd + "--\r\n").encode()
req = urllib.request.Request(post["url"], data=form, method="POST", headers={{"Content-Type": "multipart/form-data; boundary=" + bnd}})
try:
    show("formpost", (urllib.request.urlopen(req).status, ""))
except urllib.error.HTTPError as e:
    show("formpost", (e.code, e.read().decode(errors="replace")))
print("left", [o["Key"] for o in s3.list_objects_v2(Bucket=B).get("Contents", [])])
"#
        ),
    );
    let line = |p: &str| {
        out.lines()
            .find(|l| l.split_whitespace().next() == Some(p))
            .unwrap_or_else(|| panic!("no {p:?} in {out}"))
            .to_string()
    };
    for (k, v) in [
        ("expired", "403 AccessDenied"),
        ("badxml", "400 MalformedXML"),
        ("badcomplete", "400 MalformedXML"),
        ("bigheader", "400 RequestHeaderSectionTooLarge"),
        ("nul", "400 InvalidArgument"),
        ("utf8", "400 InvalidURI"),
        ("dotdot", "400 InvalidArgument"),
        ("range", "416 InvalidRange"),
        ("ok", "200 -"),
        ("formpost", "501 NotImplemented"),
        ("left", "['keep.txt']"),
    ] {
        assert_eq!(line(k), format!("{k} {v}"), "{out}");
    }
    let c = client(&env.cluster);
    assert!(c.stat("/escape").await.unwrap_err().is_not_found());
    assert_eq!(c.stat("/gwbucket/keep.txt").await.unwrap().size, 4);
}

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Runs `cmd`, failing the test with its output if it fails; returns stdout.
fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The aws CLI uploads a 1 GiB file with multipart (8 MiB parts, 10 at a
/// time), reads it back byte-identical, and syncs a directory both ways.
#[tokio::test(flavor = "multi_thread")]
async fn aws_cli_multipart_upload_of_one_gib_and_sync() {
    if !have("aws") {
        eprintln!("SKIPPED: the aws CLI is not installed");
        return;
    }
    let env = start(ClusterOptions::default());
    mount_gw_bucket(&env);
    let gw = GatewayProc::start(&env.cluster.master_addr);
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.bin");
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&big).unwrap());
        for i in 0..64u64 {
            f.write_all(&pattern(16 << 20, 1000 + i)).unwrap();
        }
    }
    std::fs::create_dir_all(dir.path().join("tree/sub")).unwrap();
    for (name, len) in [
        ("tree/a.txt", 10),
        ("tree/sub/b.bin", 3 << 20),
        ("tree/c", 0),
    ] {
        std::fs::write(dir.path().join(name), pattern(len, len as u64)).unwrap();
    }
    let aws = |args: &[&str]| {
        run_ok(
            Command::new("aws")
                .args(["--endpoint-url", &gw.endpoint, "--region", "us-east-1"])
                .args(args)
                .env("AWS_ACCESS_KEY_ID", KEY)
                .env("AWS_SECRET_ACCESS_KEY", SECRET)
                .env_remove("AWS_CA_BUNDLE")
                .env_remove("AWS_PROFILE")
                .env("NO_PROXY", "127.0.0.1")
                .current_dir(dir.path()),
        )
    };
    aws(&["s3", "cp", "big.bin", "s3://gwbucket/big.bin"]);
    let c = client(&env.cluster);
    assert_eq!(c.stat("/gwbucket/big.bin").await.unwrap().size, 1 << 30);
    aws(&["s3", "cp", "s3://gwbucket/big.bin", "back.bin"]);
    run_ok(
        Command::new("cmp")
            .arg(&big)
            .arg(dir.path().join("back.bin")),
    );
    aws(&["s3", "sync", "tree", "s3://gwbucket/tree"]);
    aws(&["s3", "sync", "s3://gwbucket/tree", "tree2"]);
    for name in ["a.txt", "sub/b.bin", "c"] {
        assert_eq!(
            std::fs::read(dir.path().join("tree").join(name)).unwrap(),
            std::fs::read(dir.path().join("tree2").join(name)).unwrap(),
            "{name}"
        );
    }
    // A second sync has nothing to do.
    let again = aws(&["s3", "sync", "tree", "s3://gwbucket/tree"]);
    assert!(again.trim().is_empty(), "{again}");
    // No multipart leftovers.
    let ups = aws(&["s3api", "list-multipart-uploads", "--bucket", "gwbucket"]);
    assert!(!ups.contains("UploadId"), "{ups}");
}

/// rclone (as an S3 client, multipart forced with small chunks) and an
/// s3fs-fuse mount of a gateway bucket.
#[tokio::test(flavor = "multi_thread")]
async fn rclone_and_s3fs_work_against_the_gateway() {
    let env = start(ClusterOptions::default());
    mount_gw_bucket(&env);
    let gw = GatewayProc::start(&env.cluster.master_addr);
    let c = client(&env.cluster);
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(12 << 20, 77);
    std::fs::create_dir_all(dir.path().join("src")).unwrap();
    std::fs::write(dir.path().join("src/big.bin"), &data).unwrap();
    std::fs::write(dir.path().join("src/small.txt"), b"small").unwrap();
    if have("rclone") {
        let rclone = |args: &[&str]| {
            run_ok(
                Command::new("rclone")
                    .args(args)
                    .args(["--s3-upload-cutoff", "5M", "--s3-chunk-size", "5M"])
                    .env("RCLONE_CONFIG", "/dev/null")
                    .env_remove("AWS_CA_BUNDLE")
                    .env("RCLONE_CONFIG_GW_TYPE", "s3")
                    .env("RCLONE_CONFIG_GW_PROVIDER", "Other")
                    .env("RCLONE_CONFIG_GW_ENDPOINT", &gw.endpoint)
                    .env("RCLONE_CONFIG_GW_ACCESS_KEY_ID", KEY)
                    .env("RCLONE_CONFIG_GW_SECRET_ACCESS_KEY", SECRET)
                    .env("RCLONE_CONFIG_GW_REGION", "us-east-1")
                    .env("RCLONE_CONFIG_GW_FORCE_PATH_STYLE", "true")
                    .env("NO_PROXY", "127.0.0.1")
                    .current_dir(dir.path()),
            )
        };
        rclone(&["copy", "src", "gw:gwbucket/rc"]);
        let ls = rclone(&["ls", "gw:gwbucket/rc"]);
        assert!(
            ls.contains("big.bin") && ls.contains(&(12 << 20).to_string()),
            "{ls}"
        );
        let part = rclone(&[
            "cat",
            "gw:gwbucket/rc/small.txt",
            "--offset",
            "1",
            "--count",
            "3",
        ]);
        assert_eq!(part, "mal");
        rclone(&["copy", "gw:gwbucket/rc", "back"]);
        assert_eq!(
            std::fs::read(dir.path().join("back/big.bin")).unwrap(),
            data
        );
        rclone(&["check", "src", "gw:gwbucket/rc"]);
        rclone(&["delete", "gw:gwbucket/rc/small.txt"]);
        assert!(
            c.stat("/gwbucket/rc/small.txt")
                .await
                .unwrap_err()
                .is_not_found()
        );
        assert_eq!(c.stat("/gwbucket/rc/big.bin").await.unwrap().size, 12 << 20);
    } else {
        eprintln!("SKIPPED (rclone part): rclone is not installed");
    }
    if have("s3fs") && std::path::Path::new("/dev/fuse").exists() {
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let pw = dir.path().join("passwd");
        std::fs::write(&pw, format!("{KEY}:{SECRET}\n")).unwrap();
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        run_ok(
            Command::new("s3fs")
                .arg("gwbucket")
                .arg(&mnt)
                .arg("-o")
                .arg(format!(
                    "url={},use_path_request_style,passwd_file={},endpoint=us-east-1,\
                     sigv4,stat_cache_expire=1",
                    gw.endpoint,
                    pw.display()
                ))
                .env("NO_PROXY", "127.0.0.1")
                .env_remove("AWS_CA_BUNDLE"),
        );
        let unmount = Unmount(mnt.clone());
        // s3fs answers once its first request went through.
        let mut listed = false;
        for _ in 0..100 {
            if std::fs::read_dir(&mnt).is_ok() {
                listed = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert!(listed, "the s3fs mount did not come up");
        std::fs::write(mnt.join("from-s3fs.bin"), &data).unwrap();
        assert_eq!(std::fs::read(mnt.join("from-s3fs.bin")).unwrap(), data);
        assert_eq!(
            c.stat("/gwbucket/from-s3fs.bin").await.unwrap().size,
            12 << 20
        );
        c.write_file(
            "/gwbucket/from-strata.txt",
            b"via strata",
            Default::default(),
        )
        .await
        .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1100));
        assert_eq!(
            std::fs::read(mnt.join("from-strata.txt")).unwrap(),
            b"via strata"
        );
        drop(unmount);
    } else {
        eprintln!("SKIPPED (s3fs part): s3fs or /dev/fuse is missing");
    }
}

/// Unmounts a FUSE mount point when dropped (also when a test fails).
struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("fusermount3").arg("-u").arg(&self.0).status();
    }
}

/// HEAD/LIST answers are cached, yet a write through another Strata client
/// and a `strata fs sync` of a change made in the UFS show through the
/// gateway within a second.
#[tokio::test(flavor = "multi_thread")]
async fn metadata_cache_follows_namespace_changes() {
    let Some((env, gw)) = boto3_gateway() else {
        return;
    };
    let c = client(&env.cluster);
    let out = boto3(
        &gw.endpoint,
        r#"
s3.put_object(Bucket="gwbucket", Key="m/obj", Body=b"abc")
print("before", s3.head_object(Bucket="gwbucket", Key="m/obj")["ContentLength"])
print("missing", code(lambda: s3.head_object(Bucket="gwbucket", Key="m/ext")))
"#,
    );
    assert!(
        out.contains("before 3") && out.contains("missing 404"),
        "{out}"
    );
    let opts = strata_client::WriteOptions {
        overwrite: true,
        ..Default::default()
    };
    c.write_file("/gwbucket/m/obj", b"hello", opts)
        .await
        .unwrap();
    s3_put(&s3_client(&env.s3), "m/ext", b"external").await;
    c.sync("/gwbucket").await.unwrap();
    let out = boto3(
        &gw.endpoint,
        r#"
import time
t = time.time()
while s3.head_object(Bucket="gwbucket", Key="m/obj")["ContentLength"] != 5 and time.time() - t < 5:
    time.sleep(0.05)
print("after", s3.head_object(Bucket="gwbucket", Key="m/obj")["ContentLength"], time.time() - t < 1.0)
print("synced", s3.head_object(Bucket="gwbucket", Key="m/ext")["ContentLength"])
print("listed", [o["Key"] for o in s3.list_objects_v2(Bucket="gwbucket", Prefix="m/")["Contents"]])
print("body", s3.get_object(Bucket="gwbucket", Key="m/obj")["Body"].read().decode())
"#,
    );
    for want in [
        "after 5 True",
        "synced 8",
        "listed ['m/ext', 'm/obj']",
        "body hello",
    ] {
        assert!(out.lines().any(|l| l == want), "no {want:?} in {out}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_overwrite_takes_effect_only_when_it_completes() {
    let Some((env, gw)) = boto3_gateway() else {
        return;
    };
    let out = boto3(
        &gw.endpoint,
        r#"
import http.client, time, urllib.parse
B = "gwbucket"
s3.put_object(Bucket=B, Key="obj", Body=b"old version")
def get():
    try:
        return s3.get_object(Bucket=B, Key="obj")["Body"].read().decode()
    except botocore.exceptions.ClientError as e:
        return e.response["Error"]["Code"]
def listed():
    return [(o["Key"], o["Size"]) for o in s3.list_objects_v2(Bucket=B).get("Contents", [])]
# A PUT refused for a wrong Content-MD5 leaves the old object.
print("baddigest", code(lambda: s3.put_object(Bucket=B, Key="obj", Body=b"new", ContentMD5="1B2M2Y8AsgTpgAmY7PhCfg==")), get())
# A PUT in progress (half its body sent): GET, HEAD and LIST show the old object.
url = s3.generate_presigned_url("put_object", Params={"Bucket": B, "Key": "obj"}, ExpiresIn=60)
u = urllib.parse.urlsplit(url)
slow = http.client.HTTPConnection(u.hostname, u.port)
slow.putrequest("PUT", u.path + "?" + u.query, skip_accept_encoding=True)
slow.putheader("Content-Length", str(1 << 20))
slow.endheaders()
slow.send(b"a" * (1 << 19))
time.sleep(1.0)
print("during", get(), s3.head_object(Bucket=B, Key="obj")["ContentLength"], listed())
# Another PUT completes meanwhile; then the slow one's client goes away.
s3.put_object(Bucket=B, Key="obj", Body=b"second writer")
slow.sock.close()
slow.close()
time.sleep(1.5)
print("after", get(), listed())
"#,
    );
    eprintln!("{out}");
    assert!(out.contains("baddigest BadDigest old version"), "{out}");
    assert!(out.contains("during old version 11 [('obj', 11)]"), "{out}");
    assert!(out.contains("after second writer [('obj', 13)]"), "{out}");
    let c = client(&env.cluster);
    assert_eq!(c.stat("/gwbucket/obj").await.unwrap().size, 13);
}

#[tokio::test(flavor = "multi_thread")]
async fn directory_markers_as_s3a_and_consoles_write_them() {
    let Some((_env, gw)) = boto3_gateway() else {
        return;
    };
    let out = boto3(
        &gw.endpoint,
        r#"
B = "gwbucket"
def keys(prefix):
    return [o["Key"] for o in s3.list_objects_v2(Bucket=B, Prefix=prefix).get("Contents", [])]
# What S3A's mkdirs and a job commit do.
s3.put_object(Bucket=B, Key="out/_temporary/0/", Body=b"")
h = s3.head_object(Bucket=B, Key="out/_temporary/0/")
print("marker", h["ContentLength"], h["ETag"], repr(s3.get_object(Bucket=B, Key="out/_temporary/0/")["Body"].read()))
print("nodir", code(lambda: s3.head_object(Bucket=B, Key="out/_temporary/0")))
print("listedempty", keys("out/"))
s3.put_object(Bucket=B, Key="out/_temporary/0/part-0", Body=b"data")
print("under", s3.get_object(Bucket=B, Key="out/_temporary/0/part-0")["Body"].read().decode())
print("listed", keys("out/"))
print("prefixes", [p["Prefix"] for p in s3.list_objects_v2(Bucket=B, Prefix="out/", Delimiter="/").get("CommonPrefixes", [])])
# Deleting a directory's name or a non-empty directory's marker removes nothing.
print("delname", code(lambda: s3.delete_object(Bucket=B, Key="out")), code(lambda: s3.delete_object(Bucket=B, Key="out/_temporary/0/")), keys("out/"))
# A file asked for as a directory is no object, and is not deleted as one.
s3.put_object(Bucket=B, Key="f.txt", Body=b"file")
print("fileslash", code(lambda: s3.head_object(Bucket=B, Key="f.txt/")), code(lambda: s3.delete_object(Bucket=B, Key="f.txt/")), keys("f.txt"))
print("notempty", code(lambda: s3.put_object(Bucket=B, Key="x/", Body=b"content")))
s3.put_object(Bucket=B, Key="empty/", Body=b"")
s3.put_object(Bucket=B, Key="empty/", Body=b"")
print("again", code(lambda: s3.head_object(Bucket=B, Key="empty/")))
s3.delete_object(Bucket=B, Key="empty/")
print("deleted", code(lambda: s3.head_object(Bucket=B, Key="empty/")))
"#,
    );
    eprintln!("{out}");
    for want in [
        "marker 0 \"d41d8cd98f00b204e9800998ecf8427e\" b''",
        "nodir 404",
        "listedempty []",
        "under data",
        "listed ['out/_temporary/0/part-0']",
        "prefixes ['out/_temporary/']",
        "delname ok ok ['out/_temporary/0/part-0']",
        "fileslash 404 ok ['f.txt']",
        "notempty InvalidArgument",
        "again ok",
        "deleted 404",
    ] {
        assert!(out.lines().any(|l| l == want), "no {want:?} in {out}");
    }
}

/// CreateBucket with `gateway.bucket_ufs` mounts a directory of its own
/// for the new bucket, which takes writes like any other; DeleteBucket
/// unmounts it once it holds no object. Without `bucket_ufs` a new bucket
/// is refused with a message naming the setting, and an existing one is
/// answered BucketAlreadyOwnedByYou.
#[tokio::test(flavor = "multi_thread")]
async fn create_bucket_gives_new_buckets_a_ufs_directory() {
    let Some((env, plain)) = boto3_gateway() else {
        return;
    };
    let ufs = tempfile::tempdir().unwrap();
    let root = ufs.path().join("buckets");
    let gw = GatewayProc::start_with(
        &env.cluster.master_addr,
        &format!("[gateway]\nbucket_ufs = \"file://{}\"\n", root.display()),
    );
    let out = boto3(
        &gw.endpoint,
        r#"
print("create", code(lambda: s3.create_bucket(Bucket="fresh")))
print("again", code(lambda: s3.create_bucket(Bucket="fresh")))
s3.put_object(Bucket="fresh", Key="dir/obj", Body=b"kept in the UFS")
print("body", s3.get_object(Bucket="fresh", Key="dir/obj")["Body"].read().decode())
print("listed", sorted(b["Name"] for b in s3.list_buckets()["Buckets"]))
print("full", code(lambda: s3.delete_bucket(Bucket="fresh")))
"#,
    );
    for want in [
        "create ok",
        "again BucketAlreadyOwnedByYou",
        "body kept in the UFS",
        "listed ['fresh', 'gwbucket', 's3']",
        "full BucketNotEmpty",
    ] {
        assert!(out.lines().any(|l| l == want), "no {want:?} in {out}");
    }
    // Written through to the bucket's own directory.
    assert_eq!(
        std::fs::read(root.join("fresh/dir/obj")).unwrap(),
        b"kept in the UFS"
    );
    let c = client(&env.cluster);
    let mount = c.mounts().await.unwrap();
    assert!(
        mount.iter().any(|m| m.path == "/fresh"),
        "no mount /fresh in {mount:?}"
    );
    let out = boto3(
        &gw.endpoint,
        r#"
s3.delete_object(Bucket="fresh", Key="dir/obj")
print("emptied", code(lambda: s3.delete_bucket(Bucket="fresh")))
print("gone", code(lambda: s3.head_bucket(Bucket="fresh")))
print("mounted", code(lambda: s3.delete_bucket(Bucket="gwbucket")))
"#,
    );
    for want in ["emptied ok", "gone 404", "mounted AccessDenied"] {
        assert!(out.lines().any(|l| l == want), "no {want:?} in {out}");
    }
    assert!(
        !c.mounts().await.unwrap().iter().any(|m| m.path == "/fresh"),
        "/fresh still mounted"
    );
    // A gateway without `bucket_ufs`: no new buckets, and the reason.
    let out = boto3(
        &plain.endpoint,
        r#"
try:
    s3.create_bucket(Bucket="other")
    print("other ok")
except botocore.exceptions.ClientError as e:
    print("other", e.response["Error"]["Code"], "bucket_ufs" in e.response["Error"]["Message"])
print("existing", code(lambda: s3.create_bucket(Bucket="gwbucket")))
"#,
    );
    for want in [
        "other InvalidRequest True",
        "existing BucketAlreadyOwnedByYou",
    ] {
        assert!(out.lines().any(|l| l == want), "no {want:?} in {out}");
    }
    assert!(c.stat("/other").await.is_err(), "/other was created");
}
