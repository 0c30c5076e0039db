//! [`UnderStorage`] over OpenDAL.

use std::ops::Range;
use std::sync::Once;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt, TryStreamExt};
use opendal::layers::{RetryLayer, TimeoutLayer};
use opendal::{ErrorKind, Operator};

use crate::error::{UfsError, UfsErrorKind};
use crate::uri::{Scheme, UfsUri};
use crate::{UfsStatus, UfsWriter, UnderStorage};

/// Installs the TLS provider and HTTP transport once per process. We build
/// rustls on `ring` rather than the default aws-lc, which needs a long C build.
fn init_http() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
        opendal_http_transport_reqwest::install_default();
    });
}

pub struct OpendalUfs {
    uri: UfsUri,
    op: Operator,
    /// Same backend without retries, for fast-failing checks.
    probe: Operator,
    describe: String,
    /// Whether the store can refuse a read whose ETag changed.
    read_if_match: bool,
}

impl OpendalUfs {
    pub fn new(uri: &UfsUri) -> Result<Self, UfsError> {
        init_http();
        let describe = uri.display();
        let map_build = |e: opendal::Error| {
            UfsError::new(
                UfsErrorKind::InvalidUri,
                &describe,
                format!("cannot configure: {e}"),
            )
        };
        let base = match uri.scheme {
            Scheme::File => {
                // OpenDAL would create a missing root; a mount of a typo must
                // fail instead.
                match std::fs::metadata(&uri.root) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        return Err(UfsError::new(
                            UfsErrorKind::InvalidUri,
                            &describe,
                            "is not a directory",
                        ));
                    }
                    Err(e) => {
                        return Err(UfsError::new(
                            UfsErrorKind::NotFound,
                            &describe,
                            format!("directory does not exist ({e})"),
                        ));
                    }
                }
                let b = opendal::services::Fs::default().root(&uri.root);
                Operator::new(b).map_err(map_build)?
            }
            Scheme::S3 => {
                let o = &uri.options;
                let mut b = opendal::services::S3::default()
                    .bucket(&uri.bucket)
                    .root(&format!("/{}", uri.root))
                    .endpoint(&uri.endpoint())
                    .region(
                        o.get("region")
                            .map(String::as_str)
                            .or(std::env::var("AWS_REGION").ok().as_deref())
                            .unwrap_or("us-east-1"),
                    )
                    // Never probe the EC2 metadata address: Strata must only
                    // talk to the endpoints it was given.
                    .disable_ec2_metadata();
                if o.get("path_style").map(|v| v == "false") == Some(true) {
                    b = b.enable_virtual_host_style();
                }
                if o.get("anonymous").map(|v| v == "true") == Some(true) {
                    b = b.skip_signature().disable_config_load();
                }
                if let (Some(k), Some(s)) = (o.get("access_key_id"), o.get("secret_access_key")) {
                    b = b
                        .access_key_id(k)
                        .secret_access_key(s)
                        .disable_config_load();
                    if let Some(t) = o.get("session_token") {
                        b = b.session_token(t);
                    }
                }
                Operator::new(b).map_err(map_build)?
            }
        };
        let op = base
            .clone()
            .layer(
                TimeoutLayer::new()
                    .with_timeout(Duration::from_secs(60))
                    .with_io_timeout(Duration::from_secs(30)),
            )
            .layer(
                RetryLayer::new()
                    .with_max_times(4)
                    .with_min_delay(Duration::from_millis(100))
                    .with_max_delay(Duration::from_secs(4))
                    .with_jitter(),
            );
        let probe = base.layer(TimeoutLayer::new().with_timeout(Duration::from_secs(10)));
        let read_if_match = op.info().capability().read_with_if_match;
        Ok(OpendalUfs {
            uri: uri.clone(),
            op,
            probe,
            describe,
            read_if_match,
        })
    }

    fn target(&self, path: &str) -> String {
        match self.uri.scheme {
            Scheme::File => format!("file://{}", join_abs(&self.uri.root, path)),
            Scheme::S3 => format!(
                "s3://{}/{} at {}",
                self.uri.bucket,
                join_abs(&self.uri.root, path).trim_start_matches('/'),
                self.uri.endpoint()
            ),
        }
    }

    fn err(&self, path: &str, e: opendal::Error) -> UfsError {
        classify(self.target(path), e)
    }
}

/// Our fallback fingerprint ("size-mtime") is not an ETag a server knows.
fn is_size_mtime(fp: &str) -> bool {
    match fp.split_once('-') {
        Some((a, b)) => {
            a.bytes().all(|c| c.is_ascii_digit())
                && b.trim_start_matches('-')
                    .bytes()
                    .all(|c| c.is_ascii_digit())
        }
        None => false,
    }
}

fn join_abs(root: &str, rel: &str) -> String {
    if rel.is_empty() {
        root.to_string()
    } else {
        format!("{}/{rel}", root.trim_end_matches('/'))
    }
}

pub(crate) fn classify(target: String, e: opendal::Error) -> UfsError {
    // The root cause ("Connection refused", an S3 error code) is at the end
    // of the source chain; OpenDAL's own text carries the operation.
    let mut cause = String::new();
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(&e);
    while let Some(s) = src {
        cause = s.to_string();
        src = s.source();
    }
    let text = format!("{e:#} {cause}");
    let lower = text.to_ascii_lowercase();
    let kind = match e.kind() {
        ErrorKind::NotFound => UfsErrorKind::NotFound,
        _ if lower.contains("nosuchbucket") => UfsErrorKind::NotFound,
        ErrorKind::PermissionDenied => UfsErrorKind::PermissionDenied,
        ErrorKind::ConditionNotMatch => UfsErrorKind::Stale,
        ErrorKind::AlreadyExists => UfsErrorKind::AlreadyExists,
        ErrorKind::Unsupported => UfsErrorKind::Unsupported,
        _ if lower.contains("credential") => UfsErrorKind::PermissionDenied,
        _ if lower.contains("connect")
            || lower.contains("sending request")
            || lower.contains("dns")
            || lower.contains("timed out")
            || lower.contains("timeout") =>
        {
            UfsErrorKind::Unreachable
        }
        // Some servers answer a bad signature with 400 rather than 403.
        _ if lower.contains("signaturedoesnotmatch")
            || lower.contains("invalidaccesskeyid")
            || lower.contains("accessdenied") =>
        {
            UfsErrorKind::PermissionDenied
        }
        _ => UfsErrorKind::Other,
    };
    // Keep messages readable: the kind, the operation and the root cause.
    let message = if cause.is_empty() || e.message().contains(&cause) {
        format!("{}: {}", e.kind(), e.message())
    } else {
        format!("{}: {} ({cause})", e.kind(), e.message())
    };
    let message: String = message.chars().take(500).collect();
    UfsError::new(kind, target, message)
}

fn status_of(name: &str, meta: &opendal::Metadata) -> UfsStatus {
    let is_dir = meta.is_dir();
    let mtime_ms = meta
        .last_modified()
        .map(|t| t.into_inner().as_millisecond())
        .unwrap_or(0);
    let size = if is_dir { 0 } else { meta.content_length() };
    let fingerprint = if is_dir {
        String::new()
    } else {
        match meta.etag() {
            Some(e) if !e.is_empty() => e.trim_matches('"').to_string(),
            _ => format!("{size}-{mtime_ms}"),
        }
    };
    UfsStatus {
        name: name
            .trim_end_matches('/')
            .rsplit('/')
            .next()
            .unwrap_or("")
            .to_string(),
        is_dir,
        size,
        mtime_ms,
        fingerprint,
    }
}

struct OpendalWriter {
    w: opendal::Writer,
    op: Operator,
    path: String,
    target: String,
    /// On a local file system: the hidden file beside `path` the bytes go
    /// to, renamed over `path` when complete (an object store's upload
    /// completes atomically by itself).
    part: Option<String>,
}

/// Marks the hidden files of writes in progress on a local file system
/// (`.NAME.strata-part-ID` beside NAME); listings skip them.
const PART_MARK: &str = ".strata-part-";

/// A part file this old (by modification time) belongs to no live write;
/// the listing of its directory removes it.
const STALE_PART_MS: i64 = 24 * 3600 * 1000;

fn is_part_file(name: &str) -> bool {
    name.starts_with('.') && name.contains(PART_MARK)
}

/// A fresh name for the part file of a write to `path`.
fn part_path(path: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let id = format!(
        "{:x}-{:x}-{:x}",
        std::process::id(),
        nanos,
        SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let (dir, name) = match path.rsplit_once('/') {
        Some((d, n)) => (format!("{d}/"), n),
        None => (String::new(), path),
    };
    // At most 64 bytes of the name, so a part file's name stays within
    // NAME_MAX (255) for every name that fits.
    let mut cut = name.len().min(64);
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{dir}.{}{PART_MARK}{id}", &name[..cut])
}

impl UfsWriter for OpendalWriter {
    fn write(&mut self, data: Bytes) -> BoxFuture<'_, Result<(), UfsError>> {
        async move {
            self.w
                .write(data)
                .await
                .map_err(|e| classify(self.target.clone(), e))
        }
        .boxed()
    }

    fn close(mut self: Box<Self>) -> BoxFuture<'static, Result<UfsStatus, UfsError>> {
        async move {
            if let Err(e) = self.w.close().await {
                if let Some(part) = &self.part {
                    let _ = self.op.delete(part).await;
                }
                return Err(classify(self.target.clone(), e));
            }
            if let Some(part) = &self.part {
                // rename(2): readers see the old file or the new one, whole.
                if let Err(e) = self.op.rename(part, &self.path).await {
                    let _ = self.op.delete(part).await;
                    return Err(classify(self.target.clone(), e));
                }
            }
            // Stat for the authoritative fingerprint (fs has no ETag; S3
            // multipart ETags differ from single-part ones).
            let meta = self
                .op
                .stat(&self.path)
                .await
                .map_err(|e| classify(self.target.clone(), e))?;
            Ok(status_of(&self.path, &meta))
        }
        .boxed()
    }

    fn abort(mut self: Box<Self>) -> BoxFuture<'static, Result<(), UfsError>> {
        async move {
            match self.part.take() {
                // The fs service cannot abort a plain write: drop what was
                // written instead. `path` itself was never touched.
                Some(part) => {
                    drop(self.w);
                    match self.op.delete(&part).await {
                        Ok(()) => Ok(()),
                        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
                        Err(e) => Err(classify(self.target.clone(), e)),
                    }
                }
                None => self
                    .w
                    .abort()
                    .await
                    .map_err(|e| classify(self.target.clone(), e)),
            }
        }
        .boxed()
    }
}

impl UnderStorage for OpendalUfs {
    fn describe(&self) -> &str {
        &self.describe
    }

    fn object_identity(&self, path: &str) -> String {
        self.uri.object_identity(path)
    }

    fn stat<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<UfsStatus, UfsError>> {
        async move {
            match self.op.stat(path).await {
                Ok(m) => Ok(status_of(path, &m)),
                Err(e) if e.kind() == ErrorKind::NotFound && !path.is_empty() => {
                    // Object stores have no directory objects: a prefix with
                    // children is a directory.
                    let dir = format!("{path}/");
                    let mut entries = self
                        .op
                        .list_with(&dir)
                        .limit(1)
                        .await
                        .map_err(|e| self.err(path, e))?;
                    entries.retain(|en| en.path() != dir);
                    if entries.is_empty() {
                        Err(self.err(path, e))
                    } else {
                        Ok(UfsStatus {
                            name: path.rsplit('/').next().unwrap_or("").to_string(),
                            is_dir: true,
                            size: 0,
                            mtime_ms: 0,
                            fingerprint: String::new(),
                        })
                    }
                }
                Err(e) => Err(self.err(path, e)),
            }
        }
        .boxed()
    }

    fn list<'a>(&'a self, dir: &'a str) -> BoxFuture<'a, Result<Vec<UfsStatus>, UfsError>> {
        async move {
            let prefix = if dir.is_empty() {
                String::new()
            } else {
                format!("{}/", dir.trim_end_matches('/'))
            };
            let entries = self.op.list(&prefix).await.map_err(|e| self.err(dir, e))?;
            let mut out = Vec::with_capacity(entries.len());
            for en in entries {
                let p = en.path();
                if p == prefix || p.is_empty() || p == "/" {
                    continue;
                }
                if self.uri.scheme == Scheme::File
                    && is_part_file(p.trim_end_matches('/').rsplit('/').next().unwrap_or(""))
                {
                    // Not listed; one a day old was left by a writer that
                    // died (a live one finishes or aborts long before).
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as i64);
                    if let Ok(m) = self.op.stat(p).await
                        && let Some(t) = m.last_modified()
                        && now - t.into_inner().as_millisecond() > STALE_PART_MS
                    {
                        let _ = self.op.delete(p).await;
                    }
                    continue;
                }
                let mut st = status_of(p, en.metadata());
                // fs listings may omit sizes and times, and some S3 servers
                // list without ETags; stat such files so the fingerprint is
                // the same one a later stat (the stale check) computes.
                let incomplete = match self.uri.scheme {
                    Scheme::File => true,
                    Scheme::S3 => en.metadata().etag().is_none(),
                };
                if !st.is_dir
                    && incomplete
                    && let Ok(m) = self.op.stat(p).await
                {
                    st = status_of(p, &m);
                }
                if st.name.is_empty() {
                    continue;
                }
                out.push(st);
            }
            Ok(out)
        }
        .boxed()
    }

    fn read<'a>(
        &'a self,
        path: &'a str,
        range: Range<u64>,
        fingerprint: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Bytes, UfsError>> {
        async move {
            if range.is_empty() {
                return Ok(Bytes::new());
            }
            let mut req = self.op.read_with(path).range(range.clone());
            match fingerprint {
                Some(fp) if self.read_if_match && !is_size_mtime(fp) => {
                    req = req.if_match(&format!("\"{fp}\""));
                }
                Some(fp) => {
                    // No conditional reads (fs): compare a fresh stat.
                    let st = self.op.stat(path).await.map_err(|e| self.err(path, e))?;
                    let now = status_of(path, &st);
                    if now.fingerprint != fp {
                        return Err(UfsError::new(
                            UfsErrorKind::Stale,
                            self.target(path),
                            format!(
                                "object changed (fingerprint {fp} is now {})",
                                now.fingerprint
                            ),
                        ));
                    }
                }
                None => {}
            }
            let buf = req.await.map_err(|e| self.err(path, e))?;
            let bytes = buf.to_bytes();
            if (bytes.len() as u64) < range.end - range.start {
                return Err(UfsError::new(
                    UfsErrorKind::Stale,
                    self.target(path),
                    format!(
                        "short read: wanted {} bytes at {}, got {} (object truncated?)",
                        range.end - range.start,
                        range.start,
                        bytes.len()
                    ),
                ));
            }
            Ok(bytes)
        }
        .boxed()
    }

    fn read_stream<'a>(
        &'a self,
        path: &'a str,
        range: Range<u64>,
    ) -> BoxFuture<'a, Result<BoxStream<'static, Result<Bytes, UfsError>>, UfsError>> {
        async move {
            let target = self.target(path);
            let r = self
                .op
                .reader_with(path)
                .chunk(8 << 20)
                .await
                .map_err(|e| self.err(path, e))?;
            let s = r
                .into_bytes_stream(range)
                .await
                .map_err(|e| self.err(path, e))?;
            let t2 = target.clone();
            Ok(
                s.map_err(move |e| UfsError::new(UfsErrorKind::Other, t2.clone(), e.to_string()))
                    .boxed(),
            )
        }
        .boxed()
    }

    fn presign_read<'a>(
        &'a self,
        path: &'a str,
        expire: std::time::Duration,
    ) -> BoxFuture<'a, Result<Option<crate::PresignedGet>, UfsError>> {
        async move {
            if !self.op.info().capability().presign_read {
                return Ok(None);
            }
            let r = self
                .op
                .presign_read(path, expire)
                .await
                .map_err(|e| self.err(path, e))?;
            let headers = r
                .header()
                .iter()
                .filter_map(|(k, v)| Some((k.to_string(), v.to_str().ok()?.to_string())))
                .collect();
            Ok(Some(crate::PresignedGet {
                url: r.uri().to_string(),
                headers,
            }))
        }
        .boxed()
    }

    fn writer<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<Box<dyn UfsWriter>, UfsError>> {
        async move {
            let part = (self.uri.scheme == Scheme::File).then(|| part_path(path));
            let w = self
                .op
                .writer_with(part.as_deref().unwrap_or(path))
                .chunk(8 << 20)
                .concurrent(4)
                .await
                .map_err(|e| self.err(path, e))?;
            Ok(Box::new(OpendalWriter {
                w,
                op: self.op.clone(),
                path: path.to_string(),
                target: self.target(path),
                part,
            }) as Box<dyn UfsWriter>)
        }
        .boxed()
    }

    fn mkdir<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<(), UfsError>> {
        async move {
            if path.is_empty() {
                return Ok(());
            }
            self.op
                .create_dir(&format!("{}/", path.trim_end_matches('/')))
                .await
                .map_err(|e| self.err(path, e))
        }
        .boxed()
    }

    fn delete<'a>(&'a self, path: &'a str, is_dir: bool) -> BoxFuture<'a, Result<(), UfsError>> {
        async move {
            if is_dir {
                self.op
                    .delete_with(&format!("{}/", path.trim_end_matches('/')))
                    .recursive(true)
                    .await
                    .map_err(|e| self.err(path, e))
            } else {
                self.op.delete(path).await.map_err(|e| self.err(path, e))
            }
        }
        .boxed()
    }

    fn rename<'a>(
        &'a self,
        from: &'a str,
        to: &'a str,
        is_dir: bool,
    ) -> BoxFuture<'a, Result<(), UfsError>> {
        async move {
            if is_dir && self.uri.scheme == Scheme::File {
                // OpenDAL's fs service renames files only; a directory is
                // one rename(2) on the local file system.
                let (f, t) = (join_abs(&self.uri.root, from), join_abs(&self.uri.root, to));
                if let Some(parent) = std::path::Path::new(&t).parent() {
                    tokio::fs::create_dir_all(parent).await.map_err(|e| {
                        UfsError::new(UfsErrorKind::Other, self.target(to), e.to_string())
                    })?;
                }
                return tokio::fs::rename(&f, &t).await.map_err(|e| {
                    let kind = match e.kind() {
                        std::io::ErrorKind::NotFound => UfsErrorKind::NotFound,
                        std::io::ErrorKind::PermissionDenied => UfsErrorKind::PermissionDenied,
                        _ => UfsErrorKind::Other,
                    };
                    UfsError::new(kind, self.target(from), format!("renaming to {t}: {e}"))
                });
            }
            let cap = self.op.info().capability();
            if cap.rename {
                let (f, t) = if is_dir {
                    (format!("{from}/"), format!("{to}/"))
                } else {
                    (from.to_string(), to.to_string())
                };
                return self.op.rename(&f, &t).await.map_err(|e| self.err(from, e));
            }
            if is_dir {
                return Err(UfsError::new(
                    UfsErrorKind::Unsupported,
                    self.target(from),
                    "renaming a directory in an object store would copy every object; not supported",
                ));
            }
            self.op.copy(from, to).await.map_err(|e| self.err(from, e))?;
            self.op.delete(from).await.map_err(|e| self.err(from, e))
        }
        .boxed()
    }

    fn check<'a>(&'a self) -> BoxFuture<'a, Result<(), UfsError>> {
        async move {
            let res = self.probe.list_with("").limit(1).await;
            match res {
                Ok(_) => Ok(()),
                Err(e) if e.kind() == ErrorKind::NotFound && self.uri.scheme == Scheme::File => {
                    Err(UfsError::new(
                        UfsErrorKind::NotFound,
                        self.describe.clone(),
                        "directory does not exist",
                    ))
                }
                Err(e) => Err(classify(self.describe.clone(), e)),
            }
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// The names `list` shows in directory `d`.
    async fn names(ufs: &OpendalUfs) -> Vec<String> {
        ufs.list("d")
            .await
            .unwrap()
            .into_iter()
            .map(|s| s.name)
            .collect()
    }

    async fn write(w: &mut Box<dyn UfsWriter>, data: &[u8]) {
        w.write(Bytes::copy_from_slice(data)).await.unwrap();
    }

    /// On a local file system a write replaces the file only when it
    /// completes: readers see the old bytes until then, an aborted write
    /// leaves them, and no part file shows in listings or stays behind.
    #[tokio::test]
    async fn local_writes_replace_the_file_only_when_complete() {
        let dir = tempfile::tempdir().unwrap();
        let uri = UfsUri::parse(
            &format!("file://{}", dir.path().display()),
            &BTreeMap::new(),
        )
        .unwrap();
        let ufs = OpendalUfs::new(&uri).unwrap();
        let file = dir.path().join("d/f.bin");
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, b"old").unwrap();

        let mut w = ufs.writer("d/f.bin").await.unwrap();
        write(&mut w, b"half of a new version").await;
        assert_eq!(std::fs::read(&file).unwrap(), b"old", "during the write");
        assert_eq!(names(&ufs).await, ["f.bin"], "the part file is not listed");
        w.abort().await.unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"old", "after an abort");
        assert_eq!(
            std::fs::read_dir(file.parent().unwrap()).unwrap().count(),
            1
        );

        let mut w = ufs.writer("d/f.bin").await.unwrap();
        write(&mut w, b"new ").await;
        write(&mut w, b"version").await;
        let st = w.close().await.unwrap();
        assert_eq!(st.size, 11);
        assert_eq!(std::fs::read(&file).unwrap(), b"new version");
        assert_eq!(
            std::fs::read_dir(file.parent().unwrap()).unwrap().count(),
            1
        );

        // A new file in the top directory, and one into a new directory.
        let mut w = ufs.writer("top").await.unwrap();
        write(&mut w, b"t").await;
        w.close().await.unwrap();
        let mut w = ufs.writer("new/dir/x").await.unwrap();
        write(&mut w, b"x").await;
        w.close().await.unwrap();
        assert_eq!(std::fs::read(dir.path().join("top")).unwrap(), b"t");
        assert_eq!(std::fs::read(dir.path().join("new/dir/x")).unwrap(), b"x");
        assert!(is_part_file(".x.strata-part-1-2-3") && !is_part_file("x.strata-part-1"));
        // Part files of writers that died: one older than a day is removed
        // by the listing of its directory, a recent one is left alone.
        let d = dir.path().join("d");
        for (name, age_h) in [(".old.strata-part-1", 25), (".new.strata-part-2", 1)] {
            let f = std::fs::File::create(d.join(name)).unwrap();
            let t = std::time::SystemTime::now() - std::time::Duration::from_secs(age_h * 3600);
            f.set_modified(t).unwrap();
        }
        assert_eq!(names(&ufs).await, ["f.bin"]);
        assert!(!d.join(".old.strata-part-1").exists());
        assert!(d.join(".new.strata-part-2").exists());
        // A name of 255 bytes (NAME_MAX) can still be written.
        let long = "n".repeat(255);
        let mut w = ufs.writer(&long).await.unwrap();
        write(&mut w, b"long").await;
        w.close().await.unwrap();
        assert_eq!(std::fs::read(dir.path().join(&long)).unwrap(), b"long");
    }
}
