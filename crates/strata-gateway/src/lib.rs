//! The S3-compatible gateway: S3 requests (through `s3s`, SigV4 checked
//! against the configured keys) answered from the Strata namespace with the
//! SDK. Buckets are the namespace's top-level directories; object keys are
//! paths below them. It owns the S3 mapping and error codes; it knows
//! nothing about workers or pages.

mod listing;

use std::net::SocketAddr;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use futures::StreamExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::dto::*;
use s3s::service::S3ServiceBuilder;
use s3s::{S3, S3Error, S3ErrorCode, S3Request, S3Response, S3Result, s3_error};
use strata_client::{Client, ClientError, FileInfo, WriteOptions};
use tokio::net::TcpListener;

pub use listing::{Page, page};

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

/// The S3 service over a Strata client.
pub struct Gateway {
    client: Client,
}

impl Gateway {
    pub fn new(client: Client) -> Gateway {
        Gateway { client }
    }
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
        match self.client.stat(&ns_path(bucket, None)?).await {
            Ok(b) if b.is_dir => Ok(()),
            Ok(_) => Err(s3_error!(NoSuchBucket)),
            Err(e) => Err(s3_err(e, true)),
        }
    }

    async fn file(&self, bucket: &str, key: &str) -> S3Result<FileInfo> {
        // A missing bucket is NoSuchBucket, a missing key NoSuchKey.
        self.check_bucket(bucket).await?;
        let info = self
            .client
            .stat(&ns_path(bucket, Some(key))?)
            .await
            .map_err(|e| s3_err(e, false))?;
        if info.is_dir {
            return Err(s3_error!(NoSuchKey));
        }
        Ok(info)
    }
}

#[async_trait::async_trait]
impl S3 for Gateway {
    async fn list_buckets(
        &self,
        _req: S3Request<ListBucketsInput>,
    ) -> S3Result<S3Response<ListBucketsOutput>> {
        let entries = self.client.list("/").await.map_err(|e| s3_err(e, true))?;
        let buckets = entries
            .iter()
            .filter(|e| e.is_dir)
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
        self.client
            .mkdir(&ns_path(&req.input.bucket, None)?, false)
            .await
            .map_err(|e| s3_err(e, true))?;
        Ok(S3Response::new(CreateBucketOutput::default()))
    }

    async fn delete_bucket(
        &self,
        req: S3Request<DeleteBucketInput>,
    ) -> S3Result<S3Response<DeleteBucketOutput>> {
        let path = ns_path(&req.input.bucket, None)?;
        match self.client.delete(&path, false).await {
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
        let root = ns_path(&input.bucket, None)?;
        let files = self
            .client
            .list_files_recursive(&root)
            .await
            .map_err(|e| s3_err(e, true))?;
        let mut objs: Vec<(String, FileInfo)> = files
            .into_iter()
            .filter(|f| !f.is_dir)
            .filter_map(|f| {
                let key = f.path.strip_prefix(&format!("{root}/"))?.to_string();
                Some((key, f))
            })
            .collect();
        objs.sort_by(|a, b| a.0.cmp(&b.0));
        let keys: Vec<String> = objs.iter().map(|(k, _)| k.clone()).collect();
        let prefix = input.prefix.clone().unwrap_or_default();
        let max_keys = input.max_keys.unwrap_or(1000).clamp(0, 1000) as usize;
        let after = match (
            input.continuation_token.as_deref(),
            input.start_after.as_deref(),
        ) {
            (Some(t), Some(s)) => Some(t.max(s).to_string()),
            (t, s) => t.or(s).map(str::to_string),
        };
        let p = page(
            &keys,
            &prefix,
            input.delimiter.as_deref(),
            after.as_deref(),
            max_keys,
        );
        let contents: Vec<Object> = p
            .objects
            .iter()
            .map(|&i| {
                let (k, f) = &objs[i];
                Object {
                    key: Some(k.clone()),
                    size: Some(f.size as i64),
                    e_tag: Some(etag(f)),
                    last_modified: Some(modified(f)),
                    ..Default::default()
                }
            })
            .collect();
        let prefixes: Vec<CommonPrefix> = p
            .common_prefixes
            .iter()
            .map(|c| CommonPrefix {
                prefix: Some(c.clone()),
            })
            .collect();
        Ok(S3Response::new(ListObjectsV2Output {
            name: Some(input.bucket),
            prefix: Some(prefix),
            delimiter: input.delimiter,
            max_keys: Some(max_keys as i32),
            key_count: Some((contents.len() + prefixes.len()) as i32),
            continuation_token: input.continuation_token,
            start_after: input.start_after,
            is_truncated: Some(p.next.is_some()),
            next_continuation_token: p.next,
            contents: Some(contents),
            common_prefixes: Some(prefixes),
            ..Default::default()
        }))
    }

    async fn head_object(
        &self,
        req: S3Request<HeadObjectInput>,
    ) -> S3Result<S3Response<HeadObjectOutput>> {
        let info = self.file(&req.input.bucket, &req.input.key).await?;
        Ok(S3Response::new(HeadObjectOutput {
            content_length: Some(info.size as i64),
            e_tag: Some(etag(&info)),
            last_modified: Some(modified(&info)),
            accept_ranges: Some("bytes".into()),
            ..Default::default()
        }))
    }

    async fn get_object(
        &self,
        req: S3Request<GetObjectInput>,
    ) -> S3Result<S3Response<GetObjectOutput>> {
        let input = req.input;
        let info = self.file(&input.bucket, &input.key).await?;
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
        let reader = self.client.open_info(info).map_err(|e| s3_err(e, false))?;
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
            ..Default::default()
        }))
    }

    async fn put_object(
        &self,
        req: S3Request<PutObjectInput>,
    ) -> S3Result<S3Response<PutObjectOutput>> {
        let input = req.input;
        self.check_bucket(&input.bucket).await?;
        let path = ns_path(&input.bucket, Some(&input.key))?;
        let opts = WriteOptions {
            overwrite: true,
            recursive: true,
            ..Default::default()
        };
        let mut w = self
            .client
            .create(&path, opts)
            .await
            .map_err(|e| s3_err(e, false))?;
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
                if let Err(e) = w.write(&chunk).await {
                    w.abort().await;
                    return Err(s3_err(e, false));
                }
            }
        }
        let info = w.close().await.map_err(|e| s3_err(e, false))?;
        Ok(S3Response::new(PutObjectOutput {
            e_tag: Some(etag(&info)),
            ..Default::default()
        }))
    }

    async fn delete_object(
        &self,
        req: S3Request<DeleteObjectInput>,
    ) -> S3Result<S3Response<DeleteObjectOutput>> {
        let path = ns_path(&req.input.bucket, Some(&req.input.key))?;
        match self.client.delete(&path, false).await {
            // Deleting a missing key succeeds in S3.
            Ok(_) => Ok(S3Response::new(DeleteObjectOutput::default())),
            Err(e) if e.is_not_found() => Ok(S3Response::new(DeleteObjectOutput::default())),
            Err(e) => Err(s3_err(e, false)),
        }
    }
}

/// A running gateway.
pub struct GatewayHandle {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl GatewayHandle {
    pub fn stop(self) {
        self.task.abort();
    }
}

/// Serves S3 on `listen` with SigV4 checked against one access key.
pub async fn serve(
    client: Client,
    listen: &str,
    access_key: &str,
    secret_key: &str,
) -> Result<GatewayHandle, GatewayError> {
    if access_key.is_empty() || secret_key.is_empty() {
        return Err(GatewayError::NoKeys);
    }
    let mut b = S3ServiceBuilder::new(Gateway::new(client));
    b.set_auth(SimpleAuth::from_single(access_key, secret_key));
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
    let task = tokio::spawn(async move {
        let http = ConnBuilder::new(TokioExecutor::new());
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            let _ = sock.set_nodelay(true);
            let conn = http
                .serve_connection(TokioIo::new(sock), service.clone())
                .into_owned();
            tokio::spawn(async move {
                let _ = conn.await;
            });
        }
    });
    Ok(GatewayHandle { addr, task })
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
