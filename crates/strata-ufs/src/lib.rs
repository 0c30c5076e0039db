//! Under storage (UFS): one trait, [`UnderStorage`], over Apache OpenDAL's
//! `fs` and `s3` services. It owns URI parsing, credentials, retries with
//! backoff and error classification; it knows nothing of the namespace or the
//! cache.

mod error;
mod opendal_ufs;
mod uri;

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::BoxStream;

pub use error::{UfsError, UfsErrorKind};
pub use opendal_ufs::OpendalUfs;
pub use uri::{Scheme, UfsUri, redact_uri};

/// What the UFS says about one object or directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UfsStatus {
    /// Name of the entry (last path segment, no trailing '/').
    pub name: String,
    pub is_dir: bool,
    pub size: u64,
    pub mtime_ms: i64,
    /// ETag where the store has one, else "size-mtime". Empty for directories.
    pub fingerprint: String,
}

/// Streams bytes into a new UFS object.
pub trait UfsWriter: Send {
    fn write(&mut self, data: Bytes) -> BoxFuture<'_, Result<(), UfsError>>;
    /// Completes the object and returns its status (with the new fingerprint).
    fn close(self: Box<Self>) -> BoxFuture<'static, Result<UfsStatus, UfsError>>;
    /// Abandons the object; nothing becomes visible.
    fn abort(self: Box<Self>) -> BoxFuture<'static, Result<(), UfsError>>;
}

/// One mounted under storage. Paths are relative to the mount's root, use
/// '/' separators and never start with '/'; "" is the root.
pub trait UnderStorage: Send + Sync {
    /// Human description for errors, e.g. `s3://bucket/prefix at http://127.0.0.1:9000`.
    fn describe(&self) -> &str;
    /// Canonical identity of an object: equal for the same object however it is mounted.
    fn object_identity(&self, path: &str) -> String;
    fn stat<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<UfsStatus, UfsError>>;
    /// Direct children of a directory ("" for the root).
    fn list<'a>(&'a self, dir: &'a str) -> BoxFuture<'a, Result<Vec<UfsStatus>, UfsError>>;
    /// Reads `range`; with `fingerprint`, fails with `Stale` if the object changed.
    fn read<'a>(
        &'a self,
        path: &'a str,
        range: Range<u64>,
        fingerprint: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Bytes, UfsError>>;
    /// Streams `range` of an object in chunks (one GET, no buffering of the whole range).
    fn read_stream<'a>(
        &'a self,
        path: &'a str,
        range: Range<u64>,
    ) -> BoxFuture<'a, Result<BoxStream<'static, Result<Bytes, UfsError>>, UfsError>>;
    fn writer<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<Box<dyn UfsWriter>, UfsError>>;
    fn mkdir<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<(), UfsError>>;
    /// Deletes a file, or a directory and everything below it.
    fn delete<'a>(&'a self, path: &'a str, is_dir: bool) -> BoxFuture<'a, Result<(), UfsError>>;
    fn rename<'a>(
        &'a self,
        from: &'a str,
        to: &'a str,
        is_dir: bool,
    ) -> BoxFuture<'a, Result<(), UfsError>>;
    /// Cheap reachability and credential check used when mounting.
    fn check<'a>(&'a self) -> BoxFuture<'a, Result<(), UfsError>>;
    /// A GET of `path` that any plain HTTP client can send until `expire`
    /// has passed (an S3 presigned URL); `None` where the store has none.
    fn presign_read<'a>(
        &'a self,
        _path: &'a str,
        _expire: std::time::Duration,
    ) -> BoxFuture<'a, Result<Option<PresignedGet>, UfsError>> {
        Box::pin(async { Ok(None) })
    }
}

/// A presigned GET: the URL and the headers to send with it.
#[derive(Clone, Debug)]
pub struct PresignedGet {
    pub url: String,
    pub headers: Vec<(String, String)>,
}

pub type Ufs = Arc<dyn UnderStorage>;

/// Opens the under storage for a mount URI plus options.
pub fn open(uri: &UfsUri) -> Result<Ufs, UfsError> {
    Ok(Arc::new(OpendalUfs::new(uri)?))
}

/// Joins a mount-relative directory and a name.
pub fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{}/{name}", dir.trim_end_matches('/'))
    }
}
