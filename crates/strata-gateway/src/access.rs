//! Who may do what: access keys with per-bucket read / write permissions,
//! a request-rate limit per key (`governor`), and virtual-host addressing.

use std::collections::{HashMap, HashSet};
use std::num::NonZeroU32;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use s3s::access::{S3Access, S3AccessContext};
use s3s::host::{S3Host, VirtualHost};
use s3s::{S3Error, S3ErrorCode, S3Result, s3_error};
use strata_common::config::GatewayKey;

use crate::throttle::Limits;

/// Buckets a key may use.
#[derive(Debug)]
enum Perms {
    All,
    Some {
        read: HashSet<String>,
        write: HashSet<String>,
    },
}

impl Perms {
    fn allows(&self, bucket: &str, write: bool) -> bool {
        let has = |s: &HashSet<String>| s.contains("*") || s.contains(bucket);
        match self {
            Perms::All => true,
            Perms::Some { read, write: w } => has(w) || (!write && has(read)),
        }
    }
}

/// The gateway's access policy.
pub struct Access {
    keys: HashMap<String, Perms>,
    live: Arc<Limits>,
    /// The rate the limiters were built for, and one limiter per key
    /// (rebuilt when the live rate changes).
    limits: RwLock<(u32, HashMap<String, DefaultDirectRateLimiter>)>,
}

fn limiters<'a>(
    keys: impl Iterator<Item = &'a String>,
    rate: u32,
) -> HashMap<String, DefaultDirectRateLimiter> {
    match NonZeroU32::new(rate) {
        Some(rate) => keys
            .map(|k| (k.clone(), RateLimiter::direct(Quota::per_second(rate))))
            .collect(),
        None => HashMap::new(),
    }
}

impl Access {
    /// `main` has every permission; `extra` keys only their buckets.
    pub fn new(main: &str, extra: &[GatewayKey], live: Arc<Limits>) -> Access {
        let mut keys = HashMap::new();
        keys.insert(main.to_string(), Perms::All);
        for k in extra {
            keys.insert(
                k.access_key.clone(),
                Perms::Some {
                    read: k.read.iter().cloned().collect(),
                    write: k.write.iter().cloned().collect(),
                },
            );
        }
        let rate = live.requests_per_sec.load(Ordering::Relaxed);
        let limits = RwLock::new((rate, limiters(keys.keys(), rate)));
        Access { keys, live, limits }
    }

    /// Whether ListBuckets shows `bucket` to `key`: keys limited to some
    /// buckets see only those.
    pub fn may_see(&self, key: &str, bucket: &str) -> bool {
        self.keys.get(key).is_some_and(|p| p.allows(bucket, false))
    }

    /// False when `key` is over its request rate.
    fn admit(&self, key: &str) -> bool {
        let rate = self.live.requests_per_sec.load(Ordering::Relaxed);
        {
            let l = self.limits.read().unwrap_or_else(|p| p.into_inner());
            if l.0 == rate {
                return l.1.get(key).is_none_or(|l| l.check().is_ok());
            }
        }
        let mut l = self.limits.write().unwrap_or_else(|p| p.into_inner());
        if l.0 != rate {
            *l = (rate, limiters(self.keys.keys(), rate));
        }
        l.1.get(key).is_none_or(|l| l.check().is_ok())
    }
}

/// Operations that change the namespace.
fn is_write(op: &str) -> bool {
    matches!(
        op,
        "PutObject"
            | "PostObject"
            | "CopyObject"
            | "DeleteObject"
            | "DeleteObjects"
            | "CreateMultipartUpload"
            | "UploadPart"
            | "UploadPartCopy"
            | "CompleteMultipartUpload"
            | "AbortMultipartUpload"
            | "CreateBucket"
            | "DeleteBucket"
            | "PutObjectTagging"
            | "DeleteObjectTagging"
    )
}

/// The bucket named by an `x-amz-copy-source` header (`[/]bucket/key`).
fn copy_source_bucket(v: &str) -> Option<String> {
    let v = v.trim_start_matches('/');
    let b = v.split('/').next()?;
    (!b.is_empty()).then(|| b.to_string())
}

/// The policy as s3s holds it; the gateway keeps another handle to filter
/// ListBuckets.
pub struct Shared(pub Arc<Access>);

#[async_trait::async_trait]
impl S3Access for Shared {
    async fn check(&self, cx: &mut S3AccessContext<'_>) -> S3Result<()> {
        self.0.check(cx).await
    }
}

impl Access {
    async fn check(&self, cx: &mut S3AccessContext<'_>) -> S3Result<()> {
        let Some(cred) = cx.credentials() else {
            return Err(s3_error!(
                AccessDenied,
                "anonymous access is off: sign requests with an access key"
            ));
        };
        let key = cred.access_key.clone();
        let Some(perms) = self.keys.get(&key) else {
            return Err(s3_error!(InvalidAccessKeyId));
        };
        if !self.admit(&key) {
            return Err(S3Error::with_message(
                S3ErrorCode::SlowDown,
                format!("access key {key} is over gateway.requests_per_sec; retry with backoff"),
            ));
        }
        let op = cx.s3_op().name();
        if let Some(bucket) = cx.s3_path().get_bucket_name()
            && !perms.allows(bucket, is_write(op))
        {
            return Err(S3Error::with_message(
                S3ErrorCode::AccessDenied,
                format!("access key {key} may not {op} in bucket {bucket}"),
            ));
        }
        if matches!(op, "CopyObject" | "UploadPartCopy")
            && let Some(src) = cx
                .headers()
                .get("x-amz-copy-source")
                .and_then(|v| v.to_str().ok())
                .and_then(copy_source_bucket)
            && !perms.allows(&src, false)
        {
            return Err(S3Error::with_message(
                S3ErrorCode::AccessDenied,
                format!("access key {key} may not read bucket {src}"),
            ));
        }
        Ok(())
    }
}

/// Virtual-host-style addressing under one base domain (`BUCKET.DOMAIN`);
/// any other host (an IP address, `localhost`) is path-style.
pub struct Domain(pub String);

impl S3Host for Domain {
    fn parse_host_header<'a>(&'a self, host: &'a str) -> S3Result<VirtualHost<'a>> {
        let name = host.rsplit_once(':').map_or(host, |(h, p)| {
            if p.chars().all(|c| c.is_ascii_digit()) {
                h
            } else {
                host
            }
        });
        if let Some(bucket) = name
            .strip_suffix(self.0.as_str())
            .and_then(|b| b.strip_suffix('.'))
            .filter(|b| !b.is_empty())
        {
            return Ok(VirtualHost::new(self.0.as_str()).with_bucket(bucket));
        }
        Ok(VirtualHost::new(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permissions() {
        let a = Access::new(
            "root",
            &[GatewayKey {
                access_key: "ro".into(),
                secret_key: "s".into(),
                read: vec!["data".into()],
                write: vec!["scratch".into()],
            }],
            Arc::new(Limits::new(0, 0, 0)),
        );
        let ro = &a.keys["ro"];
        assert!(ro.allows("data", false));
        assert!(!ro.allows("data", true));
        assert!(ro.allows("scratch", true) && ro.allows("scratch", false));
        assert!(!ro.allows("other", false));
        assert!(a.keys["root"].allows("other", true));
        assert!(a.may_see("ro", "data") && a.may_see("ro", "scratch"));
        assert!(!a.may_see("ro", "other") && !a.may_see("nobody", "data"));
        assert!(a.may_see("root", "other"));
        assert!(is_write("UploadPart") && !is_write("GetObject"));
        assert_eq!(copy_source_bucket("/src/a/b").as_deref(), Some("src"));
        assert_eq!(copy_source_bucket("src/a").as_deref(), Some("src"));
    }

    #[test]
    fn virtual_hosts() {
        let d = Domain("s3.example".into());
        assert_eq!(
            d.parse_host_header("bkt.s3.example:9000").unwrap().bucket(),
            Some("bkt")
        );
        assert_eq!(
            d.parse_host_header("bkt.s3.example").unwrap().bucket(),
            Some("bkt")
        );
        assert_eq!(d.parse_host_header("s3.example").unwrap().bucket(), None);
        assert_eq!(
            d.parse_host_header("localhost:9000").unwrap().bucket(),
            None
        );
    }
}
