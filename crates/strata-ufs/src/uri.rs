//! Mount URIs: `file:///abs/dir` and
//! `s3://bucket[/prefix][?endpoint=...&region=...&path_style=true&...]`.
//! Query parameters and mount options are the same keys; options win.

use std::collections::BTreeMap;

use crate::error::{UfsError, UfsErrorKind};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    File,
    S3,
}

/// Keys a mount accepts, for validation and docs.
pub const S3_OPTION_KEYS: &[&str] = &[
    "endpoint",
    "region",
    "path_style",
    "access_key_id",
    "secret_access_key",
    "session_token",
    "anonymous",
];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UfsUri {
    pub scheme: Scheme,
    /// Bucket for s3; empty for file.
    pub bucket: String,
    /// Root inside the bucket or the absolute directory, no trailing '/'.
    pub root: String,
    pub options: BTreeMap<String, String>,
}

impl UfsUri {
    pub fn parse(uri: &str, extra: &BTreeMap<String, String>) -> Result<Self, UfsError> {
        let bad = |m: &str| UfsError::new(UfsErrorKind::InvalidUri, uri, m.to_string());
        let (base, query) = match uri.split_once('?') {
            Some((b, q)) => (b, Some(q)),
            None => (uri, None),
        };
        let mut options = BTreeMap::new();
        if let Some(q) = query {
            for kv in q.split('&').filter(|s| !s.is_empty()) {
                let (k, v) = kv.split_once('=').unwrap_or((kv, "true"));
                options.insert(k.to_string(), percent_decode(v));
            }
        }
        for (k, v) in extra {
            options.insert(k.clone(), v.clone());
        }
        if let Some(rest) = base.strip_prefix("file://") {
            if !rest.starts_with('/') {
                return Err(bad("file URIs need an absolute path: file:///abs/dir"));
            }
            if rest.split('/').any(|s| s == "..") {
                return Err(bad("the path may not contain '..'"));
            }
            let root = rest.trim_end_matches('/');
            return Ok(UfsUri {
                scheme: Scheme::File,
                bucket: String::new(),
                root: if root.is_empty() {
                    "/".into()
                } else {
                    root.into()
                },
                options,
            });
        }
        if let Some(rest) = base.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(bad("missing bucket: s3://bucket[/prefix]"));
            }
            if prefix.split('/').any(|s| s == "..") {
                return Err(bad("the prefix may not contain '..'"));
            }
            for k in options.keys() {
                if !S3_OPTION_KEYS.contains(&k.as_str()) {
                    return Err(bad(&format!(
                        "unknown s3 option {k:?}; known: {}",
                        S3_OPTION_KEYS.join(", ")
                    )));
                }
            }
            return Ok(UfsUri {
                scheme: Scheme::S3,
                bucket: bucket.to_string(),
                root: prefix.trim_matches('/').to_string(),
                options,
            });
        }
        Err(bad("unsupported scheme; use file:// or s3://"))
    }

    pub fn endpoint(&self) -> String {
        self.options
            .get("endpoint")
            .cloned()
            .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok())
            .unwrap_or_else(|| "https://s3.amazonaws.com".into())
    }

    /// The URI without credentials, for messages and listings.
    pub fn display(&self) -> String {
        match self.scheme {
            Scheme::File => format!("file://{}", self.root),
            Scheme::S3 => {
                let p = if self.root.is_empty() {
                    String::new()
                } else {
                    format!("/{}", self.root)
                };
                format!("s3://{}{} at {}", self.bucket, p, self.endpoint())
            }
        }
    }

    /// Identity of an object, independent of where it is mounted.
    pub fn object_identity(&self, rel: &str) -> String {
        let full = join_root(&self.root, rel);
        match self.scheme {
            Scheme::File => format!("file://{full}"),
            Scheme::S3 => {
                let ep = self.endpoint();
                let host = ep
                    .trim_start_matches("https://")
                    .trim_start_matches("http://")
                    .trim_end_matches('/');
                format!(
                    "s3://{host}/{}/{}",
                    self.bucket,
                    full.trim_start_matches('/')
                )
            }
        }
    }
}

/// The URI with secret option values replaced by `****`, for display.
pub fn redact_uri(uri: &str) -> String {
    let Some((base, q)) = uri.split_once('?') else {
        return uri.to_string();
    };
    let parts: Vec<String> = q
        .split('&')
        .map(|kv| match kv.split_once('=') {
            Some((k, _)) if k.contains("secret") || k.contains("token") => format!("{k}=****"),
            _ => kv.to_string(),
        })
        .collect();
    format!("{base}?{}", parts.join("&"))
}

fn join_root(root: &str, rel: &str) -> String {
    match (root.trim_end_matches('/'), rel) {
        (r, "") => r.to_string(),
        ("", x) => x.to_string(),
        (r, x) => format!("{r}/{x}"),
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_identifies() {
        let none = BTreeMap::new();
        let f = UfsUri::parse("file:///srv/data/", &none).unwrap();
        assert_eq!(f.root, "/srv/data");
        assert_eq!(f.object_identity("a/b"), "file:///srv/data/a/b");
        let s = UfsUri::parse(
            "s3://bkt/pre/fix?endpoint=http%3A%2F%2F127.0.0.1:9000&region=us-east-1",
            &none,
        )
        .unwrap();
        assert_eq!(s.bucket, "bkt");
        assert_eq!(s.root, "pre/fix");
        assert_eq!(s.endpoint(), "http://127.0.0.1:9000");
        assert_eq!(s.object_identity("k"), "s3://127.0.0.1:9000/bkt/pre/fix/k");
        // The same object mounted through a different prefix has one identity.
        let t = UfsUri::parse("s3://bkt?endpoint=http://127.0.0.1:9000", &none).unwrap();
        assert_eq!(t.object_identity("pre/fix/k"), s.object_identity("k"));
        assert_eq!(
            redact_uri("s3://b?endpoint=x&secret_access_key=abc&region=r"),
            "s3://b?endpoint=x&secret_access_key=****&region=r"
        );
        for bad in [
            "http://x",
            "file://rel",
            "s3://",
            "s3://b?nope=1",
            "file:///a/../b",
        ] {
            let e = UfsUri::parse(bad, &none).unwrap_err();
            assert_eq!(e.kind, UfsErrorKind::InvalidUri, "{bad}");
            assert!(
                e.to_string().contains(bad.split('?').next().unwrap()),
                "{e}"
            );
        }
    }
}
