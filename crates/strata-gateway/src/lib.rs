//! The S3-compatible gateway: S3 requests (through `s3s`, SigV4 checked
//! against the configured keys) answered from the Strata namespace with the
//! SDK. Buckets are the namespace's top-level directories; object keys are
//! paths below them. It owns the S3 mapping and error codes; it knows
//! nothing about workers or pages.

mod access;
mod drain;
mod listing;
mod meta_cache;
mod multipart;
mod objmeta;
mod throttle;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::StreamExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::dto::*;
use s3s::service::S3ServiceBuilder;
use s3s::{S3, S3Error, S3ErrorCode, S3Request, S3Response, S3Result, s3_error};
use strata_client::{Client, ClientError, FileInfo, MountOptions, Reader, WriteOptions, Writer};
use strata_common::config::GatewayConfig;
use tokio::net::TcpListener;

pub use listing::{After, Page, page};

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("cannot listen on {addr}: {err} (is another gateway running? use --listen)")]
    Bind { addr: String, err: std::io::Error },
    #[error(
        "no access key configured: set gateway.access_key and gateway.secret_key \
         (anonymous access is off)"
    )]
    NoKeys,
}

/// The object metadata a PutObject, CopyObject or CreateMultipartUpload
/// input carries (their fields share names); moves them out of `$input`.
macro_rules! object_meta {
    ($input:ident, $tagging:expr) => {
        objmeta::ObjectMeta {
            metadata: $input.metadata,
            content_type: $input.content_type,
            content_encoding: $input.content_encoding,
            content_disposition: $input.content_disposition,
            content_language: $input.content_language,
            cache_control: $input.cache_control,
            tagging: $tagging,
        }
    };
}

/// A bucket listing (objects sorted by key) and the part of it in use.
type ListingPart = (Arc<Vec<(String, FileInfo)>>, std::ops::Range<usize>);

/// The S3 service over a Strata client.
pub struct Gateway {
    client: Client,
    uploads: multipart::Uploads,
    meta: Arc<meta_cache::MetaCache>,
    /// Cache id -> blocks below this index already prewarmed (S3 clients
    /// fetch large objects as many ranged GETs; each extends the prewarm).
    /// A read from offset 0 starts over; entries older than a minute are
    /// forgotten (the blocks may have been evicted or freed since).
    prewarmed: std::sync::Mutex<std::collections::HashMap<String, (u64, std::time::Instant)>>,
    /// The access policy, when requests are checked against one: keys
    /// limited to some buckets see only those in ListBuckets.
    access: Option<Arc<access::Access>>,
    /// `gateway.bucket_ufs`: where CreateBucket puts new buckets (empty:
    /// nowhere).
    bucket_ufs: String,
}

impl Gateway {
    /// A gateway keeping multipart parts in `upload_dir` and metadata for
    /// up to `metadata_ttl` (zero: no metadata cache).
    pub fn new(client: Client, upload_dir: PathBuf, metadata_ttl: Duration) -> Gateway {
        Gateway {
            meta: meta_cache::MetaCache::new(client.clone(), metadata_ttl),
            client,
            uploads: multipart::Uploads::new(upload_dir),
            prewarmed: Default::default(),
            access: None,
            bucket_ufs: String::new(),
        }
    }

    /// The UFS directory of a bucket CreateBucket makes: `bucket` below
    /// `gateway.bucket_ufs` (before its query, if it has one).
    fn bucket_uri(&self, bucket: &str) -> String {
        let (base, query) = match self.bucket_ufs.split_once('?') {
            Some((b, q)) => (b, format!("?{q}")),
            None => (self.bucket_ufs.as_str(), String::new()),
        };
        format!("{}/{bucket}{query}", base.trim_end_matches('/'))
    }

    /// The mount at `/bucket`, if it is one, and whether CreateBucket made
    /// it (DeleteBucket removes only those).
    async fn bucket_mount(&self, bucket: &str, path: &str) -> Result<Option<bool>, ClientError> {
        // Compared without the query, where the master hides secrets.
        let base = |u: &str| u.split('?').next().unwrap_or_default().to_string();
        let ours = base(&self.bucket_uri(bucket));
        Ok(self
            .client
            .mounts()
            .await?
            .iter()
            .find(|m| m.path == path)
            .map(|m| !self.bucket_ufs.is_empty() && base(&m.ufs_uri) == ours))
    }

    /// Real-time prewarm for a GET that ends at `end`: the blocks after it
    /// are loaded on their owners, each block once per object version.
    fn prewarm_after(&self, reader: &Reader, start: u64, end: u64) {
        let id = reader.info().cache_id.clone();
        let mut m = self.prewarmed.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() > 10_000 {
            m.clear();
        }
        let before = match m.get(&id) {
            Some((upto, at)) if start > 0 && at.elapsed() < Duration::from_secs(60) => *upto,
            _ => 0,
        };
        let now = reader.prewarm_after(end, before);
        m.insert(id, (now, std::time::Instant::now()));
    }

    /// `stat` through the metadata cache.
    async fn stat(&self, path: &str) -> Result<FileInfo, ClientError> {
        match self.meta.stat(path) {
            Some(Some(i)) => return Ok(i),
            Some(None) => return Err(ClientError::NotFound(format!("{path}: not found"))),
            None => {}
        }
        let epoch = self.meta.epoch();
        let r = self.client.stat(path).await;
        match &r {
            Ok(i) => self.meta.put_stat(path, Some(i.clone()), epoch),
            Err(e) if e.is_not_found() => self.meta.put_stat(path, None, epoch),
            Err(_) => {}
        }
        r
    }

    /// Forgets what the cache knows of `bucket` and `key` after a write.
    fn changed(&self, bucket: &str, key: Option<&str>) {
        match ns_path(bucket, key) {
            Ok(p) => self.meta.invalidate(bucket, &p),
            Err(_) => self.meta.clear(),
        }
    }
}

/// Conditional request headers (RFC 7232 as S3 applies them).
#[derive(Default)]
struct Conditions<'a> {
    if_match: Option<&'a ETagCondition>,
    if_none_match: Option<&'a ETagCondition>,
    if_modified_since: Option<&'a Timestamp>,
    if_unmodified_since: Option<&'a Timestamp>,
}

fn unix_secs(t: &Timestamp) -> i64 {
    time::OffsetDateTime::from(t.clone()).unix_timestamp()
}

fn etag_matches(cond: &ETagCondition, info: &FileInfo) -> bool {
    match cond {
        ETagCondition::Any => true,
        ETagCondition::ETag(e) => e.value() == etag(info).value(),
    }
}

impl Conditions<'_> {
    /// `Ok` if the request goes ahead. A failed If-Match or
    /// If-Unmodified-Since is 412; a matching If-None-Match or an
    /// unmodified If-Modified-Since is 304 (`not_modified_is_412` turns
    /// those into 412 too, as for copy sources).
    fn check(&self, info: &FileInfo, not_modified_is_412: bool) -> S3Result<()> {
        let mtime = info.mtime_ms.max(0) / 1000;
        let precondition = || {
            S3Error::with_message(
                S3ErrorCode::PreconditionFailed,
                format!("{}: a precondition does not hold", info.path),
            )
        };
        let not_modified = || {
            if not_modified_is_412 {
                precondition()
            } else {
                s3_error!(NotModified)
            }
        };
        if let Some(m) = self.if_match
            && !etag_matches(m, info)
        {
            return Err(precondition());
        }
        if self.if_match.is_none()
            && let Some(t) = self.if_unmodified_since
            && mtime > unix_secs(t)
        {
            return Err(precondition());
        }
        if let Some(m) = self.if_none_match
            && etag_matches(m, info)
        {
            return Err(not_modified());
        }
        if self.if_none_match.is_none()
            && let Some(t) = self.if_modified_since
            && mtime <= unix_secs(t)
        {
            return Err(not_modified());
        }
        Ok(())
    }
}

/// A `bytes=a-b` copy-source range against an object of `len` bytes.
fn copy_range(r: Option<&str>, len: u64) -> S3Result<std::ops::Range<u64>> {
    let Some(r) = r else { return Ok(0..len) };
    let bad = || {
        S3Error::with_message(
            S3ErrorCode::InvalidArgument,
            format!("x-amz-copy-source-range {r:?} must be bytes=FIRST-LAST within the object"),
        )
    };
    let (a, b) = r
        .trim()
        .strip_prefix("bytes=")
        .and_then(|x| x.split_once('-'))
        .ok_or_else(bad)?;
    let (a, b): (u64, u64) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
    if a > b || b >= len {
        return Err(bad());
    }
    Ok(a..b + 1)
}

/// A key or bucket name must be a clean relative path: no `..`, no empty
/// or `.` segments, no NUL.
fn ns_path(bucket: &str, key: Option<&str>) -> S3Result<String> {
    let bad = |s: &str| {
        s.is_empty() || s.split('/').any(|seg| seg == ".." || seg == ".") || s.contains('\0')
    };
    if bad(bucket) || bucket.contains('/') {
        return Err(s3_error!(InvalidBucketName));
    }
    match key {
        None => Ok(format!("/{bucket}")),
        Some(k) => {
            let k = k.trim_start_matches('/');
            if bad(k) || k.split('/').any(str::is_empty) && !k.ends_with('/') {
                return Err(S3Error::with_message(
                    S3ErrorCode::InvalidArgument,
                    format!(
                        "object key {k:?} is not a clean path (no '..', '.' or empty segments)"
                    ),
                ));
            }
            Ok(format!("/{bucket}/{}", k.trim_end_matches('/')))
        }
    }
}

/// SDK errors to S3 error codes, in one place.
fn s3_err(e: ClientError, bucket_level: bool) -> S3Error {
    let msg = e.to_string();
    let code = if e.is_not_found() {
        if bucket_level {
            S3ErrorCode::NoSuchBucket
        } else {
            S3ErrorCode::NoSuchKey
        }
    } else {
        match &e {
            ClientError::AlreadyExists(_) => S3ErrorCode::BucketAlreadyOwnedByYou,
            ClientError::InvalidArgument(_) => S3ErrorCode::InvalidArgument,
            ClientError::PermissionDenied(_) => S3ErrorCode::AccessDenied,
            ClientError::FailedPrecondition(_) => S3ErrorCode::InvalidRequest,
            ClientError::Changed { .. } => S3ErrorCode::PreconditionFailed,
            _ => S3ErrorCode::ServiceUnavailable,
        }
    };
    S3Error::with_message(code, msg)
}

/// MD5 of nothing: the ETag of an empty object.
const EMPTY_MD5: &str = "d41d8cd98f00b204e9800998ecf8427e";

/// A directory as its S3 marker object `dir/`: empty, with the ETag of
/// an empty object.
fn marker(dir: FileInfo) -> FileInfo {
    FileInfo {
        size: 0,
        fingerprint: EMPTY_MD5.into(),
        ..dir
    }
}

fn etag(info: &FileInfo) -> ETag {
    let v = if info.fingerprint.is_empty() {
        info.cache_id.clone()
    } else {
        info.fingerprint.trim_matches('"').to_string()
    };
    ETag::Strong(v)
}

fn modified(info: &FileInfo) -> Timestamp {
    Timestamp::from(UNIX_EPOCH + Duration::from_millis(info.mtime_ms.max(0) as u64))
}

impl Gateway {
    /// `NoSuchBucket` unless the bucket is a namespace directory.
    async fn check_bucket(&self, bucket: &str) -> S3Result<()> {
        match self.stat(&ns_path(bucket, None)?).await {
            Ok(b) if b.is_dir => Ok(()),
            Ok(_) => Err(s3_error!(NoSuchBucket)),
            Err(e) => Err(s3_err(e, true)),
        }
    }

    async fn file(&self, bucket: &str, key: &str) -> S3Result<FileInfo> {
        // A missing bucket is NoSuchBucket, a missing key NoSuchKey.
        self.check_bucket(bucket).await?;
        let info = self
            .stat(&ns_path(bucket, Some(key))?)
            .await
            .map_err(|e| s3_err(e, false))?;
        // `dir/` is the directory itself, as an empty marker object (what
        // S3A, rclone and consoles create for a folder); `dir` and a file
        // asked for as `file/` are not objects.
        match (info.is_dir, key.ends_with('/')) {
            (true, true) => Ok(marker(info)),
            (false, false) => Ok(info),
            _ => Err(s3_error!(NoSuchKey)),
        }
    }

    /// PutObject of `dir/`: an empty body makes the directory (and its
    /// parents); a directory that exists already is left as it is.
    async fn put_marker(
        &self,
        bucket: &str,
        key: &str,
        body: Option<StreamingBlob>,
    ) -> S3Result<S3Response<PutObjectOutput>> {
        self.check_bucket(bucket).await?;
        if let Some(mut body) = body {
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| {
                    S3Error::with_message(S3ErrorCode::IncompleteBody, e.to_string())
                })?;
                if !chunk.is_empty() {
                    return Err(S3Error::with_message(
                        S3ErrorCode::InvalidArgument,
                        format!(
                            "{key:?} ends in '/', which names a directory here: a directory \
                             marker must be empty"
                        ),
                    ));
                }
            }
        }
        let path = ns_path(bucket, Some(key))?;
        let res = match self.client.stat(&path).await {
            Ok(i) if i.is_dir => Ok(()),
            Ok(_) => Err(S3Error::with_message(
                S3ErrorCode::InvalidArgument,
                format!(
                    "{key:?}: a file named {:?} exists there",
                    key.trim_end_matches('/')
                ),
            )),
            Err(e) if e.is_not_found() => {
                self.client
                    .mkdir(&path, true)
                    .await
                    .map(|_| ())
                    .or_else(|e| match e {
                        // Another request made it meanwhile.
                        ClientError::AlreadyExists(_) => Ok(()),
                        e => Err(s3_err(e, false)),
                    })
            }
            Err(e) => Err(s3_err(e, false)),
        };
        self.changed(bucket, Some(key));
        res?;
        Ok(S3Response::new(PutObjectOutput {
            e_tag: Some(ETag::Strong(EMPTY_MD5.into())),
            ..Default::default()
        }))
    }

    /// Deletes one key: a file, or the marker `dir/` of an empty directory.
    /// A key naming nothing, a non-empty directory's marker or a directory
    /// without its `/` is no object, and deleting it succeeds (as in S3).
    async fn delete_key(&self, bucket: &str, key: &str) -> S3Result<()> {
        let path = ns_path(bucket, Some(key))?;
        let is_object = match self.client.stat(&path).await {
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
            Ok(i) if i.is_dir != key.ends_with('/') => Ok(false),
            Ok(i) if i.is_dir => self.client.list(&path).await.map(|e| e.is_empty()),
            Ok(_) => Ok(true),
        };
        let res = match is_object {
            Ok(true) => self.client.delete(&path, false).await.map(|_| ()),
            Ok(false) => Ok(()),
            Err(e) => Err(e),
        }
        .map_err(|e| s3_err(e, false));
        self.changed(bucket, Some(key));
        match res {
            Err(e) if *e.code() == S3ErrorCode::NoSuchKey => Ok(()),
            r => r,
        }
    }

    /// Lists (and caches) the objects of `bucket` whose keys start with
    /// `dir` (empty, or a prefix ending in `/`: the directory a listing's
    /// prefix names, so that listing one directory of a large bucket lists
    /// that subtree only), sorted by key.
    async fn objects(&self, bucket: &str, dir: &str) -> S3Result<Arc<Vec<(String, FileInfo)>>> {
        let root = ns_path(bucket, None)?;
        self.check_bucket(bucket).await?;
        let epoch = self.meta.epoch();
        // Files only: a directory shows as a common prefix while it holds
        // something. An empty one is not listed (the namespace keeps
        // directories a PUT created after their last object is deleted,
        // which S3 would not show), though HEAD and GET of its marker
        // `dir/` find it.
        let top = match dir.strip_suffix('/') {
            Some(d) => match ns_path(bucket, Some(d)) {
                Ok(p) => p,
                // No object can have a key under an invalid path.
                Err(_) => return Ok(Arc::default()),
            },
            None => root.clone(),
        };
        let files = match self.client.list_files_recursive(&top).await {
            Ok(f) => f,
            // A prefix under a missing path or under a file: no objects.
            Err(e)
                if !dir.is_empty()
                    && (e.is_not_found() || matches!(e, ClientError::FailedPrecondition(_))) =>
            {
                Vec::new()
            }
            Err(e) => return Err(s3_err(e, true)),
        };
        let mut objs: Vec<(String, FileInfo)> = files
            .into_iter()
            .filter(|f| !f.is_dir)
            .filter_map(|f| {
                let key = f.path.strip_prefix(&format!("{root}/"))?.to_string();
                Some((key, f))
            })
            .collect();
        objs.sort_by(|a, b| a.0.cmp(&b.0));
        let objs = Arc::new(objs);
        self.meta.put_list(bucket, dir, objs.clone(), epoch);
        Ok(objs)
    }

    /// The part under `dir` of a fresh cached listing of `dir` or of a
    /// directory above it (so a client walking a tree level by level lists
    /// it once).
    fn cached_objects(&self, bucket: &str, dir: &str) -> Option<ListingPart> {
        let mut above = Some(dir);
        while let Some(d) = above {
            if let Some(l) = self.meta.list(bucket, d) {
                let lo = l.partition_point(|(k, _)| k.as_str() < dir);
                let hi = lo + l[lo..].partition_point(|(k, _)| k.starts_with(dir));
                return Some((l, lo..hi));
            }
            // "a/b/" -> "a/" -> "" -> done.
            above = (!d.is_empty()).then(|| listing::dir_of(&d[..d.len() - 1]));
        }
        None
    }

    /// The objects one page needs, found by [`listing::walk`].
    async fn walk_objects(
        &self,
        bucket: &str,
        prefix: &str,
        slash: bool,
        after: After<'_>,
        max_keys: usize,
    ) -> S3Result<Vec<(String, FileInfo)>> {
        let root = ns_path(bucket, None)?;
        self.check_bucket(bucket).await?;
        let list = |dir: String, start: String, n: usize| {
            let path = if dir.is_empty() {
                root.clone()
            } else {
                format!("{root}/{dir}")
            };
            async move {
                match self.client.list_page(&path, &start, n as u32).await {
                    // Listing a file answers the file: no directory there.
                    Ok(es) if es.len() == 1 && !es[0].is_dir && es[0].path == path => Ok(None),
                    Ok(es) => Ok(Some(
                        es.into_iter()
                            .map(|e| (e.name.clone(), e.is_dir, e))
                            .collect(),
                    )),
                    Err(
                        ClientError::NotFound(_)
                        | ClientError::FailedPrecondition(_)
                        | ClientError::InvalidArgument(_),
                    ) => Ok(None),
                    Err(e) => Err(s3_err(e, true)),
                }
            }
        };
        // Enough entries for the page and the one after it that tells it
        // is truncated, in one call to the master where they are in one
        // directory.
        let chunk = (max_keys + 2).clamp(100, 1000);
        listing::walk(list, prefix, slash, after, max_keys, chunk).await
    }

    /// One page of a bucket listing: objects with their keys, and prefixes.
    async fn list_page(
        &self,
        bucket: &str,
        prefix: &str,
        delimiter: Option<&str>,
        after: After<'_>,
        max_keys: usize,
    ) -> S3Result<(Vec<Object>, Vec<CommonPrefix>, Option<String>)> {
        let dir = listing::dir_of(prefix);
        let walked;
        let listing;
        let objs: &[(String, FileInfo)] = match self.cached_objects(bucket, dir) {
            Some((l, range)) => {
                listing = l;
                &listing[range]
            }
            // A later page with no cached listing at hand (the namespace
            // changed since the first page), or any page of a gateway that
            // caches nothing: walk from where the page starts instead of
            // listing the whole subtree (which a first page lists, and
            // caches, for the pages after it).
            None if (!matches!(after, After::Start) || !self.meta.caches())
                && delimiter.is_none_or(|d| d.is_empty() || d == "/") =>
            {
                walked = self
                    .walk_objects(bucket, prefix, delimiter == Some("/"), after, max_keys)
                    .await?;
                &walked
            }
            None => {
                listing = self.objects(bucket, dir).await?;
                &listing[..]
            }
        };
        let p = page(objs, |o| o.0.as_str(), prefix, delimiter, after, max_keys);
        let contents = p
            .objects
            .iter()
            .map(|&i| {
                let (k, f) = &objs[i];
                Object {
                    key: Some(k.clone()),
                    size: Some(f.size as i64),
                    e_tag: Some(etag(f)),
                    last_modified: Some(modified(f)),
                    storage_class: Some(ObjectStorageClass::from_static(
                        ObjectStorageClass::STANDARD,
                    )),
                    ..Default::default()
                }
            })
            .collect();
        let prefixes = p
            .common_prefixes
            .iter()
            .map(|c| CommonPrefix {
                prefix: Some(c.clone()),
            })
            .collect();
        Ok((contents, prefixes, p.next))
    }

    /// Opens the object a copy names, after its conditions.
    async fn copy_source(&self, src: &CopySource, cond: Conditions<'_>) -> S3Result<Reader> {
        let CopySource::Bucket {
            bucket,
            key,
            version_id,
        } = src
        else {
            return Err(S3Error::with_message(
                S3ErrorCode::NotImplemented,
                "copy sources must be bucket/key (access points are not supported)",
            ));
        };
        if version_id.as_deref().is_some_and(|v| v != "null") {
            return Err(S3Error::with_message(
                S3ErrorCode::NoSuchVersion,
                "the gateway keeps one version of each object (version id \"null\")",
            ));
        }
        let info = self.file(bucket, key).await?;
        cond.check(&info, true)?;
        self.client.open_info(info).map_err(|e| s3_err(e, false))
    }

    /// A writer for `bucket/key` (bucket must exist).
    async fn create(&self, bucket: &str, key: &str) -> S3Result<(String, Writer)> {
        self.check_bucket(bucket).await?;
        if key.ends_with('/') {
            return Err(S3Error::with_message(
                S3ErrorCode::InvalidArgument,
                format!(
                    "{key:?} ends in '/', which names a directory here: only an empty \
                     PutObject (a directory marker) can be written to such a key"
                ),
            ));
        }
        let path = ns_path(bucket, Some(key))?;
        let opts = WriteOptions {
            overwrite: true,
            recursive: true,
            ..Default::default()
        };
        let w = self
            .client
            .create(&path, opts)
            .await
            .map_err(|e| s3_err(e, false))?;
        Ok((path, w))
    }
}

/// Copies `range` of `r` into `w`; aborts `w` on failure.
async fn copy_into(r: &Reader, range: std::ops::Range<u64>, mut w: Writer) -> S3Result<FileInfo> {
    let mut s = Box::pin(r.stream_range(range.start, range.end - range.start));
    while let Some(chunk) = s.next().await {
        let res = match chunk {
            Ok(c) => w.write(&c).await,
            Err(e) => Err(e),
        };
        if let Err(e) = res {
            w.abort().await;
            return Err(s3_err(e, false));
        }
    }
    w.close().await.map_err(|e| s3_err(e, false))
}

#[async_trait::async_trait]
impl S3 for Gateway {
    async fn list_buckets(
        &self,
        req: S3Request<ListBucketsInput>,
    ) -> S3Result<S3Response<ListBucketsOutput>> {
        let entries = self.client.list("/").await.map_err(|e| s3_err(e, true))?;
        let key = req.credentials.as_ref().map(|c| c.access_key.as_str());
        let buckets = entries
            .iter()
            .filter(|e| e.is_dir)
            .filter(|e| match (&self.access, key) {
                (Some(a), Some(k)) => a.may_see(k, &e.name),
                (Some(_), None) => false,
                (None, _) => true,
            })
            .map(|e| Bucket {
                name: Some(e.name.clone()),
                creation_date: Some(modified(e)),
                ..Default::default()
            })
            .collect();
        Ok(S3Response::new(ListBucketsOutput {
            buckets: Some(buckets),
            ..Default::default()
        }))
    }

    async fn head_bucket(
        &self,
        req: S3Request<HeadBucketInput>,
    ) -> S3Result<S3Response<HeadBucketOutput>> {
        self.check_bucket(&req.input.bucket).await?;
        Ok(S3Response::new(HeadBucketOutput::default()))
    }

    async fn get_bucket_location(
        &self,
        req: S3Request<GetBucketLocationInput>,
    ) -> S3Result<S3Response<GetBucketLocationOutput>> {
        self.client
            .stat(&ns_path(&req.input.bucket, None)?)
            .await
            .map_err(|e| s3_err(e, true))?;
        Ok(S3Response::new(GetBucketLocationOutput::default()))
    }

    async fn create_bucket(
        &self,
        req: S3Request<CreateBucketInput>,
    ) -> S3Result<S3Response<CreateBucketOutput>> {
        let bucket = &req.input.bucket;
        let path = ns_path(bucket, None)?;
        if self.bucket_ufs.is_empty() {
            // S3 clients ask to create the bucket they are about to write
            // to: an existing one is answered as AWS answers its owner.
            return match self.client.stat(&path).await {
                Ok(_) => Err(s3_error!(BucketAlreadyOwnedByYou)),
                Err(e) if e.is_not_found() => Err(S3Error::with_message(
                    S3ErrorCode::InvalidRequest,
                    format!(
                        "bucket {bucket:?} does not exist and this gateway creates no buckets: \
                         set gateway.bucket_ufs to a UFS URI under which new buckets get \
                         their own directory, or mount one with \
                         `strata fs mount /{bucket} URI`"
                    ),
                )),
                Err(e) => Err(s3_err(e, true)),
            };
        }
        let res = self
            .client
            .mount(
                &path,
                &self.bucket_uri(bucket),
                MountOptions {
                    create_root: true,
                    ..Default::default()
                },
            )
            .await;
        self.meta.clear();
        res.map_err(|e| s3_err(e, true))?;
        Ok(S3Response::new(CreateBucketOutput::default()))
    }

    async fn delete_bucket(
        &self,
        req: S3Request<DeleteBucketInput>,
    ) -> S3Result<S3Response<DeleteBucketOutput>> {
        let bucket = &req.input.bucket;
        let path = ns_path(bucket, None)?;
        let res = match self.bucket_mount(bucket, &path).await {
            // A bucket CreateBucket made: unmounted once it holds no
            // object (empty directories are not objects); its UFS
            // directory stays.
            Ok(Some(true)) => {
                self.meta.clear();
                let (objects, _, _) = self.list_page(bucket, "", None, After::Start, 1).await?;
                if objects.is_empty() {
                    self.client.unmount(&path).await.map(|_| 0)
                } else {
                    Err(ClientError::FailedPrecondition(format!(
                        "{path}: not empty"
                    )))
                }
            }
            Ok(Some(false)) => {
                return Err(S3Error::with_message(
                    S3ErrorCode::AccessDenied,
                    format!(
                        "bucket {bucket:?} is a mount an administrator made; \
                         remove it with `strata fs unmount {path}`"
                    ),
                ));
            }
            Ok(None) => self.client.delete(&path, false).await,
            Err(e) => Err(e),
        };
        self.meta.clear();
        match res {
            Ok(_) => Ok(S3Response::new(DeleteBucketOutput::default())),
            Err(ClientError::FailedPrecondition(m)) if m.contains("not empty") => {
                Err(s3_error!(BucketNotEmpty))
            }
            Err(e) => Err(s3_err(e, true)),
        }
    }

    async fn list_objects_v2(
        &self,
        req: S3Request<ListObjectsV2Input>,
    ) -> S3Result<S3Response<ListObjectsV2Output>> {
        let input = req.input;
        let prefix = input.prefix.clone().unwrap_or_default();
        let max_keys = input.max_keys.unwrap_or(1000).clamp(0, 1000) as usize;
        // S3 ignores start-after once a continuation token is given.
        let after = match (&input.continuation_token, &input.start_after) {
            (Some(t), _) => After::Entry(t),
            (None, Some(s)) => After::Key(s),
            (None, None) => After::Start,
        };
        let (contents, prefixes, next) = self
            .list_page(
                &input.bucket,
                &prefix,
                input.delimiter.as_deref(),
                after,
                max_keys,
            )
            .await?;
        Ok(S3Response::new(ListObjectsV2Output {
            name: Some(input.bucket),
            prefix: Some(prefix),
            delimiter: input.delimiter,
            max_keys: Some(max_keys as i32),
            key_count: Some((contents.len() + prefixes.len()) as i32),
            continuation_token: input.continuation_token,
            start_after: input.start_after,
            is_truncated: Some(next.is_some()),
            next_continuation_token: next,
            contents: Some(contents),
            common_prefixes: Some(prefixes),
            ..Default::default()
        }))
    }

    async fn list_objects(
        &self,
        req: S3Request<ListObjectsInput>,
    ) -> S3Result<S3Response<ListObjectsOutput>> {
        let input = req.input;
        let prefix = input.prefix.clone().unwrap_or_default();
        let max_keys = input.max_keys.unwrap_or(1000).clamp(0, 1000) as usize;
        let (contents, prefixes, next) = self
            .list_page(
                &input.bucket,
                &prefix,
                input.delimiter.as_deref(),
                input.marker.as_deref().map_or(After::Start, After::Entry),
                max_keys,
            )
            .await?;
        Ok(S3Response::new(ListObjectsOutput {
            name: Some(input.bucket),
            prefix: Some(prefix),
            delimiter: input.delimiter,
            marker: input.marker,
            max_keys: Some(max_keys as i32),
            is_truncated: Some(next.is_some()),
            next_marker: next,
            contents: Some(contents),
            common_prefixes: Some(prefixes),
            ..Default::default()
        }))
    }

    /// Unversioned: every object is its only version, id "null".
    async fn list_object_versions(
        &self,
        req: S3Request<ListObjectVersionsInput>,
    ) -> S3Result<S3Response<ListObjectVersionsOutput>> {
        let input = req.input;
        let prefix = input.prefix.clone().unwrap_or_default();
        let max_keys = input.max_keys.unwrap_or(1000).clamp(0, 1000) as usize;
        let (contents, prefixes, next) = self
            .list_page(
                &input.bucket,
                &prefix,
                input.delimiter.as_deref(),
                input
                    .key_marker
                    .as_deref()
                    .map_or(After::Start, After::Entry),
                max_keys,
            )
            .await?;
        let versions = contents
            .into_iter()
            .map(|o| ObjectVersion {
                key: o.key,
                size: o.size,
                e_tag: o.e_tag,
                last_modified: o.last_modified,
                is_latest: Some(true),
                version_id: Some("null".into()),
                ..Default::default()
            })
            .collect();
        Ok(S3Response::new(ListObjectVersionsOutput {
            name: Some(input.bucket),
            prefix: Some(prefix),
            delimiter: input.delimiter,
            key_marker: input.key_marker,
            max_keys: Some(max_keys as i32),
            is_truncated: Some(next.is_some()),
            next_key_marker: next.clone(),
            next_version_id_marker: next.map(|_| "null".into()),
            versions: Some(versions),
            common_prefixes: Some(prefixes),
            ..Default::default()
        }))
    }

    async fn head_object(
        &self,
        req: S3Request<HeadObjectInput>,
    ) -> S3Result<S3Response<HeadObjectOutput>> {
        let input = &req.input;
        let info = self.file(&input.bucket, &input.key).await?;
        Conditions {
            if_match: input.if_match.as_ref(),
            if_none_match: input.if_none_match.as_ref(),
            if_modified_since: input.if_modified_since.as_ref(),
            if_unmodified_since: input.if_unmodified_since.as_ref(),
        }
        .check(&info, false)?;
        let m = objmeta::stored(&info.xattrs);
        Ok(S3Response::new(HeadObjectOutput {
            content_length: Some(info.size as i64),
            e_tag: Some(etag(&info)),
            last_modified: Some(modified(&info)),
            accept_ranges: Some("bytes".into()),
            metadata: m.metadata,
            content_type: m.content_type,
            content_encoding: m.content_encoding,
            content_disposition: m.content_disposition,
            content_language: m.content_language,
            cache_control: m.cache_control,
            ..Default::default()
        }))
    }

    async fn get_object(
        &self,
        req: S3Request<GetObjectInput>,
    ) -> S3Result<S3Response<GetObjectOutput>> {
        let input = req.input;
        let info = self.file(&input.bucket, &input.key).await?;
        Conditions {
            if_match: input.if_match.as_ref(),
            if_none_match: input.if_none_match.as_ref(),
            if_modified_since: input.if_modified_since.as_ref(),
            if_unmodified_since: input.if_unmodified_since.as_ref(),
        }
        .check(&info, false)?;
        let len = info.size;
        let (range, content_range) = match input.range {
            Some(r) => {
                let rr = r.check(len)?;
                let cr = format!("bytes {}-{}/{len}", rr.start, rr.end.saturating_sub(1));
                (rr, Some(cr))
            }
            None => (0..len, None),
        };
        let e_tag = etag(&info);
        let last_modified = modified(&info);
        let m = objmeta::stored(&info.xattrs);
        let tag_count = m.tag_count();
        if info.is_dir {
            // A directory marker: an empty object.
            return Ok(S3Response::new(GetObjectOutput {
                body: Some(StreamingBlob::from(s3s::Body::empty())),
                content_length: Some(0),
                e_tag: Some(e_tag),
                last_modified: Some(last_modified),
                ..Default::default()
            }));
        }
        let reader = self.client.open_info(info).map_err(|e| s3_err(e, false))?;
        self.prewarm_after(&reader, range.start, range.end);
        // Streamed from the SDK reader through a small channel (the body must
        // be Sync; the reader's stream is not): memory stays bounded whatever
        // the object size.
        let mut src = reader.stream_range(range.start, range.end - range.start);
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
        tokio::spawn(async move {
            while let Some(item) = src.next().await {
                let item = item.map_err(|e| std::io::Error::other(e.to_string()));
                let stop = item.is_err();
                if tx.send(item).await.is_err() || stop {
                    break;
                }
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        Ok(S3Response::new(GetObjectOutput {
            body: Some(StreamingBlob::wrap(stream)),
            content_length: Some((range.end - range.start) as i64),
            content_range,
            e_tag: Some(e_tag),
            last_modified: Some(last_modified),
            accept_ranges: Some("bytes".into()),
            metadata: m.metadata,
            content_type: m.content_type,
            content_encoding: m.content_encoding,
            content_disposition: m.content_disposition,
            content_language: m.content_language,
            cache_control: m.cache_control,
            tag_count,
            ..Default::default()
        }))
    }

    async fn put_object(
        &self,
        req: S3Request<PutObjectInput>,
    ) -> S3Result<S3Response<PutObjectOutput>> {
        let mut input = req.input;
        if input.key.ends_with('/') {
            return self
                .put_marker(&input.bucket, &input.key, input.body.take())
                .await;
        }
        let xattrs = object_meta!(input, input.tagging).to_xattrs()?;
        let (path, mut w) = self.create(&input.bucket, &input.key).await?;
        w.set_xattrs(xattrs);
        let mut h = <md5::Md5 as md5::Digest>::new();
        if let Some(mut body) = input.body {
            while let Some(chunk) = body.next().await {
                let chunk: Bytes = match chunk {
                    Ok(c) => c,
                    Err(e) => {
                        w.abort().await;
                        return Err(S3Error::with_message(
                            S3ErrorCode::IncompleteBody,
                            format!("upload of {path} was cut short: {e}"),
                        ));
                    }
                };
                md5::Digest::update(&mut h, &chunk);
                if let Err(e) = w.write(&chunk).await {
                    w.abort().await;
                    return Err(s3_err(e, false));
                }
            }
        }
        // A wrong Content-MD5 leaves nothing behind (the new file is
        // dropped before it replaces an existing one).
        if let Err(e) =
            multipart::check_md5(input.content_md5.as_deref(), &md5::Digest::finalize(h))
        {
            w.abort().await;
            return Err(e);
        }
        let info = w.close().await.map_err(|e| s3_err(e, false));
        self.changed(&input.bucket, Some(&input.key));
        let info = info?;
        Ok(S3Response::new(PutObjectOutput {
            e_tag: Some(etag(&info)),
            ..Default::default()
        }))
    }

    async fn copy_object(
        &self,
        req: S3Request<CopyObjectInput>,
    ) -> S3Result<S3Response<CopyObjectOutput>> {
        let input = req.input;
        let r = self
            .copy_source(
                &input.copy_source,
                Conditions {
                    if_match: input.copy_source_if_match.as_ref(),
                    if_none_match: input.copy_source_if_none_match.as_ref(),
                    if_modified_since: input.copy_source_if_modified_since.as_ref(),
                    if_unmodified_since: input.copy_source_if_unmodified_since.as_ref(),
                },
            )
            .await?;
        let dst = ns_path(&input.bucket, Some(&input.key))?;
        let replace_meta = input
            .metadata_directive
            .as_ref()
            .is_some_and(|d| d.as_str() == MetadataDirective::REPLACE);
        let replace_tags = input
            .tagging_directive
            .as_ref()
            .is_some_and(|d| d.as_str() == TaggingDirective::REPLACE);
        let src = &r.info().xattrs;
        let mut xattrs: Vec<(String, Vec<u8>)> = if replace_meta {
            object_meta!(input, None).to_xattrs()?
        } else {
            src.iter()
                .filter(|(k, _)| k.as_str() != objmeta::TAGGING)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
        if replace_tags {
            let t = objmeta::parse_tagging(input.tagging.as_deref().unwrap_or(""))?;
            if !t.is_empty() {
                xattrs.push((
                    objmeta::TAGGING.into(),
                    objmeta::encode_tags(&t).into_bytes(),
                ));
            }
        } else if let Some(t) = src.get(objmeta::TAGGING) {
            xattrs.push((objmeta::TAGGING.into(), t.clone()));
        }
        let info = if r.info().path == dst {
            // Copying an object onto itself changes only its metadata (S3
            // refuses it unless something is replaced).
            if !replace_meta && !replace_tags {
                return Err(S3Error::with_message(
                    S3ErrorCode::InvalidRequest,
                    "copying an object onto itself must change its metadata \
                     (x-amz-metadata-directive: REPLACE)",
                ));
            }
            let remove: Vec<String> = src
                .keys()
                .filter(|k| !xattrs.iter().any(|(n, _)| n == *k))
                .cloned()
                .collect();
            let info = self
                .client
                .set_xattrs(&dst, xattrs, remove, strata_client::XattrFlag::XattrAny)
                .await;
            self.changed(&input.bucket, Some(&input.key));
            info.map_err(|e| s3_err(e, false))?
        } else {
            let (_, mut w) = self.create(&input.bucket, &input.key).await?;
            w.set_xattrs(xattrs);
            let info = copy_into(&r, 0..r.len(), w).await;
            self.changed(&input.bucket, Some(&input.key));
            info?
        };
        Ok(S3Response::new(CopyObjectOutput {
            copy_object_result: Some(CopyObjectResult {
                e_tag: Some(etag(&info)),
                last_modified: Some(modified(&info)),
                ..Default::default()
            }),
            ..Default::default()
        }))
    }

    async fn delete_objects(
        &self,
        req: S3Request<DeleteObjectsInput>,
    ) -> S3Result<S3Response<DeleteObjectsOutput>> {
        let input = req.input;
        self.check_bucket(&input.bucket).await?;
        if input.delete.objects.len() > 1000 {
            return Err(S3Error::with_message(
                S3ErrorCode::MalformedXML,
                "DeleteObjects takes at most 1000 keys",
            ));
        }
        let quiet = input.delete.quiet.unwrap_or(false);
        let (mut deleted, mut errors) = (Vec::new(), Vec::new());
        for o in input.delete.objects {
            // Cached metadata is dropped after the delete, so a listing
            // fetched meanwhile is not kept.
            let res = self.delete_key(&input.bucket, &o.key).await;
            match res {
                Ok(()) if quiet => {}
                Ok(()) => deleted.push(DeletedObject {
                    key: Some(o.key),
                    ..Default::default()
                }),
                Err(e) => errors.push(Error {
                    code: Some(e.code().as_str().to_string()),
                    message: e.message().map(str::to_string),
                    key: Some(o.key),
                    ..Default::default()
                }),
            }
        }
        Ok(S3Response::new(DeleteObjectsOutput {
            deleted: Some(deleted),
            errors: Some(errors),
            ..Default::default()
        }))
    }

    async fn create_multipart_upload(
        &self,
        req: S3Request<CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<CreateMultipartUploadOutput>> {
        let input = req.input;
        self.check_bucket(&input.bucket).await?;
        ns_path(&input.bucket, Some(&input.key))?;
        let xattrs = object_meta!(input, input.tagging).to_xattrs()?;
        let id = self
            .uploads
            .create(&input.bucket, &input.key, &objmeta::encode_lines(&xattrs))
            .await?;
        Ok(S3Response::new(CreateMultipartUploadOutput {
            bucket: Some(input.bucket),
            key: Some(input.key),
            upload_id: Some(id),
            ..Default::default()
        }))
    }

    async fn upload_part(
        &self,
        req: S3Request<UploadPartInput>,
    ) -> S3Result<S3Response<UploadPartOutput>> {
        let input = req.input;
        let dir = self
            .uploads
            .open(&input.bucket, &input.key, &input.upload_id)
            .await?;
        let body = input.body.ok_or_else(|| {
            S3Error::with_message(S3ErrorCode::IncompleteBody, "part has no body")
        })?;
        let md5 = self
            .uploads
            .write_part(&dir, input.part_number, body, input.content_md5.as_deref())
            .await?;
        Ok(S3Response::new(UploadPartOutput {
            e_tag: Some(ETag::Strong(md5)),
            ..Default::default()
        }))
    }

    async fn upload_part_copy(
        &self,
        req: S3Request<UploadPartCopyInput>,
    ) -> S3Result<S3Response<UploadPartCopyOutput>> {
        let input = req.input;
        let dir = self
            .uploads
            .open(&input.bucket, &input.key, &input.upload_id)
            .await?;
        let r = self
            .copy_source(
                &input.copy_source,
                Conditions {
                    if_match: input.copy_source_if_match.as_ref(),
                    if_none_match: input.copy_source_if_none_match.as_ref(),
                    if_modified_since: input.copy_source_if_modified_since.as_ref(),
                    if_unmodified_since: input.copy_source_if_unmodified_since.as_ref(),
                },
            )
            .await?;
        let range = copy_range(input.copy_source_range.as_deref(), r.len())?;
        let body = Box::pin(r.stream_range(range.start, range.end - range.start));
        let md5 = self
            .uploads
            .write_part(&dir, input.part_number, body, None)
            .await?;
        Ok(S3Response::new(UploadPartCopyOutput {
            copy_part_result: Some(CopyPartResult {
                e_tag: Some(ETag::Strong(md5)),
                last_modified: Some(Timestamp::from(SystemTime::now())),
                ..Default::default()
            }),
            ..Default::default()
        }))
    }

    async fn complete_multipart_upload(
        &self,
        req: S3Request<CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
        let input = req.input;
        let dir = self
            .uploads
            .open(&input.bucket, &input.key, &input.upload_id)
            .await?;
        let wanted: Vec<(i32, Option<String>)> = input
            .multipart_upload
            .and_then(|m| m.parts)
            .unwrap_or_default()
            .into_iter()
            .map(|p| {
                (
                    p.part_number.unwrap_or(0),
                    p.e_tag.map(|e| e.value().to_string()),
                )
            })
            .collect();
        let stored = self.uploads.parts(&dir).await?;
        let parts = multipart::select_parts(&stored, &wanted)?;
        let xattrs = objmeta::decode_lines(&self.uploads.meta(&dir).await?);
        let (path, mut w) = self.create(&input.bucket, &input.key).await?;
        w.set_xattrs(xattrs);
        for p in &parts {
            let res = async {
                let mut f = tokio::fs::File::open(&p.path).await?;
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    let n = tokio::io::AsyncReadExt::read(&mut f, &mut buf).await?;
                    if n == 0 {
                        return Ok::<(), std::io::Error>(());
                    }
                    w.write(&buf[..n]).await.map_err(std::io::Error::other)?;
                }
            }
            .await;
            if let Err(e) = res {
                w.abort().await;
                return Err(S3Error::with_message(
                    S3ErrorCode::InternalError,
                    format!("assembling {path} from part {}: {e}", p.number),
                ));
            }
        }
        let info = w.close().await.map_err(|e| s3_err(e, false));
        self.changed(&input.bucket, Some(&input.key));
        let info = info?;
        self.uploads.remove(&dir).await;
        Ok(S3Response::new(CompleteMultipartUploadOutput {
            bucket: Some(input.bucket),
            key: Some(input.key),
            e_tag: Some(etag(&info)),
            ..Default::default()
        }))
    }

    async fn abort_multipart_upload(
        &self,
        req: S3Request<AbortMultipartUploadInput>,
    ) -> S3Result<S3Response<AbortMultipartUploadOutput>> {
        let input = req.input;
        let dir = self
            .uploads
            .open(&input.bucket, &input.key, &input.upload_id)
            .await?;
        self.uploads.remove(&dir).await;
        Ok(S3Response::new(AbortMultipartUploadOutput::default()))
    }

    async fn list_parts(
        &self,
        req: S3Request<ListPartsInput>,
    ) -> S3Result<S3Response<ListPartsOutput>> {
        let input = req.input;
        let dir = self
            .uploads
            .open(&input.bucket, &input.key, &input.upload_id)
            .await?;
        let max = input.max_parts.unwrap_or(1000).clamp(1, 1000) as usize;
        let marker = input.part_number_marker.unwrap_or(0);
        let all: Vec<_> = self
            .uploads
            .parts(&dir)
            .await?
            .into_iter()
            .filter(|p| p.number > marker)
            .collect();
        let truncated = all.len() > max;
        let page = &all[..all.len().min(max)];
        let next = truncated.then(|| page.last().map(|p| p.number)).flatten();
        let parts = page
            .iter()
            .map(|p| Part {
                part_number: Some(p.number),
                size: Some(p.size as i64),
                e_tag: Some(ETag::Strong(p.md5.clone())),
                last_modified: Some(Timestamp::from(p.modified)),
                ..Default::default()
            })
            .collect();
        Ok(S3Response::new(ListPartsOutput {
            bucket: Some(input.bucket),
            key: Some(input.key),
            upload_id: Some(input.upload_id),
            max_parts: Some(max as i32),
            part_number_marker: input.part_number_marker,
            is_truncated: Some(truncated),
            next_part_number_marker: next,
            parts: Some(parts),
            ..Default::default()
        }))
    }

    async fn list_multipart_uploads(
        &self,
        req: S3Request<ListMultipartUploadsInput>,
    ) -> S3Result<S3Response<ListMultipartUploadsOutput>> {
        let input = req.input;
        self.check_bucket(&input.bucket).await?;
        let prefix = input.prefix.clone().unwrap_or_default();
        let max = input.max_uploads.unwrap_or(1000).clamp(1, 1000) as usize;
        let after = (
            input.key_marker.clone().unwrap_or_default(),
            input.upload_id_marker.clone().unwrap_or_default(),
        );
        let all: Vec<_> = self
            .uploads
            .list(&input.bucket)
            .await
            .into_iter()
            .filter(|u| u.key.starts_with(&prefix))
            .filter(|u| (u.key.clone(), u.id.clone()) > after)
            .collect();
        let truncated = all.len() > max;
        let page = &all[..all.len().min(max)];
        let uploads = page
            .iter()
            .map(|u| MultipartUpload {
                key: Some(u.key.clone()),
                upload_id: Some(u.id.clone()),
                initiated: Some(Timestamp::from(u.initiated)),
                ..Default::default()
            })
            .collect();
        let last = page.last().filter(|_| truncated);
        Ok(S3Response::new(ListMultipartUploadsOutput {
            bucket: Some(input.bucket),
            prefix: Some(prefix),
            key_marker: input.key_marker,
            upload_id_marker: input.upload_id_marker,
            max_uploads: Some(max as i32),
            is_truncated: Some(truncated),
            next_key_marker: last.map(|u| u.key.clone()),
            next_upload_id_marker: last.map(|u| u.id.clone()),
            uploads: Some(uploads),
            ..Default::default()
        }))
    }

    async fn get_object_tagging(
        &self,
        req: S3Request<GetObjectTaggingInput>,
    ) -> S3Result<S3Response<GetObjectTaggingOutput>> {
        let input = &req.input;
        let info = self.file(&input.bucket, &input.key).await?;
        Ok(S3Response::new(GetObjectTaggingOutput {
            tag_set: objmeta::tag_set(&info.xattrs),
            ..Default::default()
        }))
    }

    async fn put_object_tagging(
        &self,
        req: S3Request<PutObjectTaggingInput>,
    ) -> S3Result<S3Response<PutObjectTaggingOutput>> {
        let input = req.input;
        let tags = objmeta::tags_of(&input.tagging.tag_set)?;
        let info = self.file(&input.bucket, &input.key).await?;
        let (set, remove) = if tags.is_empty() {
            (vec![], vec![objmeta::TAGGING.to_string()])
        } else {
            (
                vec![(
                    objmeta::TAGGING.to_string(),
                    objmeta::encode_tags(&tags).into_bytes(),
                )],
                vec![],
            )
        };
        let res = self
            .client
            .set_xattrs(&info.path, set, remove, strata_client::XattrFlag::XattrAny)
            .await;
        self.changed(&input.bucket, Some(&input.key));
        res.map_err(|e| s3_err(e, false))?;
        Ok(S3Response::new(PutObjectTaggingOutput::default()))
    }

    async fn delete_object_tagging(
        &self,
        req: S3Request<DeleteObjectTaggingInput>,
    ) -> S3Result<S3Response<DeleteObjectTaggingOutput>> {
        let input = req.input;
        let info = self.file(&input.bucket, &input.key).await?;
        let res = self
            .client
            .set_xattrs(
                &info.path,
                vec![],
                vec![objmeta::TAGGING.to_string()],
                strata_client::XattrFlag::XattrAny,
            )
            .await;
        self.changed(&input.bucket, Some(&input.key));
        res.map_err(|e| s3_err(e, false))?;
        Ok(S3Response::new(DeleteObjectTaggingOutput::default()))
    }

    async fn delete_object(
        &self,
        req: S3Request<DeleteObjectInput>,
    ) -> S3Result<S3Response<DeleteObjectOutput>> {
        self.check_bucket(&req.input.bucket).await?;
        self.delete_key(&req.input.bucket, &req.input.key).await?;
        Ok(S3Response::new(DeleteObjectOutput::default()))
    }
}

/// Header bytes S3 accepts in one request (names, values and separators).
const MAX_HEADER_BYTES: usize = 8 << 10;

fn header_bytes(h: &http::HeaderMap) -> usize {
    h.iter().map(|(k, v)| k.as_str().len() + v.len() + 4).sum()
}

fn header_too_large() -> http::Response<s3s::Body> {
    error_response(
        http::StatusCode::BAD_REQUEST,
        "RequestHeaderSectionTooLarge",
        "Your request header section exceeds the maximum allowed size (8 KiB).",
    )
}

/// A browser-form upload (`POST /bucket` with `multipart/form-data`).
/// It is refused before the S3 layer, which would otherwise read the whole
/// form into memory before checking the key's permissions.
fn is_form_upload(parts: &http::request::Parts) -> bool {
    parts.method == http::Method::POST
        && parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.trim_start()
                    .to_ascii_lowercase()
                    .starts_with("multipart/form-data")
            })
}

fn error_response(
    status: http::StatusCode,
    code: &str,
    message: &str,
) -> http::Response<s3s::Body> {
    let xml = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code>\
         <Message>{message}</Message></Error>"
    );
    let mut r = http::Response::new(s3s::Body::from(xml));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/xml"),
    );
    r
}

/// A running gateway.
pub struct GatewayHandle {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
    limits: Arc<throttle::Limits>,
}

impl GatewayHandle {
    pub fn stop(self) {
        self.task.abort();
    }

    /// Applies the bandwidth and request-rate limits of `cfg` to every
    /// connection, open or new (keys and permissions stay as started);
    /// returns a one-line description of the limits now in force.
    pub fn reload_limits(&self, cfg: &GatewayConfig) -> String {
        self.limits.set(
            cfg.max_bandwidth.0,
            cfg.conn_bandwidth.0,
            cfg.requests_per_sec,
        );
        let bw = |v: u64| {
            if v == 0 {
                "unlimited".to_string()
            } else {
                format!("{:.1} MiB/s", v as f64 / (1u64 << 20) as f64)
            }
        };
        format!(
            "gateway limits: max_bandwidth {}, conn_bandwidth {}, requests_per_sec {}",
            bw(cfg.max_bandwidth.0),
            bw(cfg.conn_bandwidth.0),
            if cfg.requests_per_sec == 0 {
                "unlimited".to_string()
            } else {
                cfg.requests_per_sec.to_string()
            }
        )
    }
}

/// Serves S3 on `listen` (default `cfg.listen`) with SigV4 checked against
/// the configured access keys, their bucket permissions and rate limits.
pub async fn serve(
    client: Client,
    cfg: &GatewayConfig,
    listen: Option<&str>,
) -> Result<GatewayHandle, GatewayError> {
    let listen = listen.unwrap_or(&cfg.listen);
    if cfg.access_key.is_empty() || cfg.secret_key.is_empty() {
        return Err(GatewayError::NoKeys);
    }
    let limits = Arc::new(throttle::Limits::new(
        cfg.max_bandwidth.0,
        cfg.conn_bandwidth.0,
        cfg.requests_per_sec,
    ));
    let policy = Arc::new(access::Access::new(
        &cfg.access_key,
        &cfg.keys,
        limits.clone(),
    ));
    let mut gateway = Gateway::new(
        client,
        cfg.upload_dir.clone(),
        Duration::from_secs(cfg.metadata_ttl_secs),
    );
    gateway.access = Some(policy.clone());
    gateway.bucket_ufs = cfg.bucket_ufs.clone();
    let mut b = S3ServiceBuilder::new(gateway);
    let mut auth = SimpleAuth::from_single(cfg.access_key.as_str(), cfg.secret_key.as_str());
    for k in &cfg.keys {
        auth.register(k.access_key.clone(), k.secret_key.as_str().into());
    }
    b.set_auth(auth);
    b.set_access(access::Shared(policy));
    if !cfg.domain.is_empty() {
        b.set_host(access::Domain(cfg.domain.clone()));
    }
    let service = b.build();
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|err| GatewayError::Bind {
            addr: listen.to_string(),
            err,
        })?;
    let addr = listener.local_addr().map_err(|err| GatewayError::Bind {
        addr: listen.to_string(),
        err,
    })?;
    let conn_limits = limits.clone();
    // Requests whose headers exceed what S3 accepts are answered before
    // they reach the S3 layer.
    let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let s3 = service.clone();
        async move {
            let expects_continue = req
                .headers()
                .get(http::header::EXPECT)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
            let (parts, body) = req.into_parts();
            let body = drain::Tracked::new(body);
            let resp = if header_bytes(&parts.headers) > MAX_HEADER_BYTES {
                Ok(header_too_large())
            } else if is_form_upload(&parts) {
                Ok(error_response(
                    http::StatusCode::NOT_IMPLEMENTED,
                    "NotImplemented",
                    "POST object (browser form) uploads are not supported by this gateway; \
                     use PUT (PutObject) or a multipart upload.",
                ))
            } else {
                let req = http::Request::from_parts(parts, s3s::Body::http_body(body.clone()));
                s3.call(req).await
            };
            let keep_alive = drain::finish(body, expects_continue).await;
            resp.map(|mut r| {
                if !keep_alive {
                    r.headers_mut().insert(
                        http::header::CONNECTION,
                        http::HeaderValue::from_static("close"),
                    );
                }
                r
            })
        }
    });
    let task = tokio::spawn(async move {
        let http = ConnBuilder::new(TokioExecutor::new());
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            let _ = sock.set_nodelay(true);
            let io = throttle::Throttled::new(sock, conn_limits.clone());
            let conn = http
                .serve_connection(TokioIo::new(io), service.clone())
                .into_owned();
            tokio::spawn(async move {
                let _ = conn.await;
            });
        }
    });
    Ok(GatewayHandle { addr, task, limits })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_must_be_clean_paths() {
        assert_eq!(ns_path("b", Some("a/c.txt")).unwrap(), "/b/a/c.txt");
        assert_eq!(ns_path("b", None).unwrap(), "/b");
        for bad in ["../x", "a/../b", "a//b", "./a", "a\0b", ""] {
            assert!(ns_path("b", Some(bad)).is_err(), "{bad:?}");
        }
        assert!(ns_path("..", None).is_err());
        assert!(ns_path("a/b", None).is_err());
    }
}
