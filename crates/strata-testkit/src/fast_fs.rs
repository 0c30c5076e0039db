//! The S3 service the test server runs: s3s-fs, with GET bodies streamed in
//! chunks of a chosen size (default 256 KiB) instead of s3s-fs's 4 KiB, so
//! the server is not what a benchmark measures (at 4 KiB per chunk it spends
//! a core per ~130 MiB/s). Every other operation is s3s-fs's own.

use std::path::PathBuf;

use s3s::dto::*;
use s3s::{S3, S3Request, S3Response, S3Result};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

/// Default GET body chunk.
pub const GET_CHUNK: usize = 256 << 10;

pub struct FastFs {
    inner: s3s_fs::FileSystem,
    root: PathBuf,
    chunk: usize,
    /// GETs still to be refused with 503 SlowDown (throttling tests).
    pub(crate) throttle: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl FastFs {
    pub fn new(root: &std::path::Path, chunk: usize) -> anyhow::Result<FastFs> {
        Ok(FastFs {
            chunk: chunk.max(1),
            inner: s3s_fs::FileSystem::new(root).map_err(|e| anyhow::anyhow!("s3s-fs: {e:?}"))?,
            root: root.to_path_buf(),
            throttle: Default::default(),
        })
    }
}

#[async_trait::async_trait]
impl S3 for FastFs {
    async fn get_object(
        &self,
        req: S3Request<GetObjectInput>,
    ) -> S3Result<S3Response<GetObjectOutput>> {
        use std::sync::atomic::Ordering;
        if self
            .throttle
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(s3s::s3_error!(SlowDown, "throttled by the test server"));
        }
        let (bucket, key, range) = (
            req.input.bucket.clone(),
            req.input.key.clone(),
            req.input.range,
        );
        let mut resp = self.inner.get_object(req).await?;
        let len = resp.output.content_length.unwrap_or(0).max(0) as u64;
        // s3s-fs checked the bucket, key and range; stream the same bytes.
        let path = self.root.join(&bucket).join(&key);
        let mut file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| s3s::s3_error!(e, InternalError))?;
        let file_len = file
            .metadata()
            .await
            .map_err(|e| s3s::s3_error!(e, InternalError))?
            .len();
        let start = match range {
            Some(Range::Int { first, .. }) => first,
            Some(Range::Suffix { length }) => file_len.saturating_sub(length),
            None => 0,
        };
        file.seek(std::io::SeekFrom::Start(start))
            .await
            .map_err(|e| s3s::s3_error!(e, InternalError))?;
        let stream = tokio_util::io::ReaderStream::with_capacity(file.take(len), self.chunk);
        resp.output.body = Some(StreamingBlob::wrap(stream));
        Ok(resp)
    }

    async fn create_bucket(
        &self,
        req: S3Request<CreateBucketInput>,
    ) -> S3Result<S3Response<CreateBucketOutput>> {
        self.inner.create_bucket(req).await
    }

    async fn copy_object(
        &self,
        req: S3Request<CopyObjectInput>,
    ) -> S3Result<S3Response<CopyObjectOutput>> {
        self.inner.copy_object(req).await
    }

    async fn delete_bucket(
        &self,
        req: S3Request<DeleteBucketInput>,
    ) -> S3Result<S3Response<DeleteBucketOutput>> {
        self.inner.delete_bucket(req).await
    }

    async fn delete_object(
        &self,
        req: S3Request<DeleteObjectInput>,
    ) -> S3Result<S3Response<DeleteObjectOutput>> {
        self.inner.delete_object(req).await
    }

    async fn delete_objects(
        &self,
        req: S3Request<DeleteObjectsInput>,
    ) -> S3Result<S3Response<DeleteObjectsOutput>> {
        self.inner.delete_objects(req).await
    }

    async fn get_bucket_location(
        &self,
        req: S3Request<GetBucketLocationInput>,
    ) -> S3Result<S3Response<GetBucketLocationOutput>> {
        self.inner.get_bucket_location(req).await
    }

    async fn head_bucket(
        &self,
        req: S3Request<HeadBucketInput>,
    ) -> S3Result<S3Response<HeadBucketOutput>> {
        self.inner.head_bucket(req).await
    }

    async fn head_object(
        &self,
        req: S3Request<HeadObjectInput>,
    ) -> S3Result<S3Response<HeadObjectOutput>> {
        self.inner.head_object(req).await
    }

    async fn list_buckets(
        &self,
        req: S3Request<ListBucketsInput>,
    ) -> S3Result<S3Response<ListBucketsOutput>> {
        self.inner.list_buckets(req).await
    }

    async fn list_objects(
        &self,
        req: S3Request<ListObjectsInput>,
    ) -> S3Result<S3Response<ListObjectsOutput>> {
        self.inner.list_objects(req).await
    }

    async fn list_objects_v2(
        &self,
        req: S3Request<ListObjectsV2Input>,
    ) -> S3Result<S3Response<ListObjectsV2Output>> {
        self.inner.list_objects_v2(req).await
    }

    async fn put_object(
        &self,
        req: S3Request<PutObjectInput>,
    ) -> S3Result<S3Response<PutObjectOutput>> {
        self.inner.put_object(req).await
    }

    async fn create_multipart_upload(
        &self,
        req: S3Request<CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<CreateMultipartUploadOutput>> {
        self.inner.create_multipart_upload(req).await
    }

    async fn upload_part(
        &self,
        req: S3Request<UploadPartInput>,
    ) -> S3Result<S3Response<UploadPartOutput>> {
        self.inner.upload_part(req).await
    }

    async fn upload_part_copy(
        &self,
        req: S3Request<UploadPartCopyInput>,
    ) -> S3Result<S3Response<UploadPartCopyOutput>> {
        self.inner.upload_part_copy(req).await
    }

    async fn list_parts(
        &self,
        req: S3Request<ListPartsInput>,
    ) -> S3Result<S3Response<ListPartsOutput>> {
        self.inner.list_parts(req).await
    }

    async fn complete_multipart_upload(
        &self,
        req: S3Request<CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
        self.inner.complete_multipart_upload(req).await
    }

    async fn abort_multipart_upload(
        &self,
        req: S3Request<AbortMultipartUploadInput>,
    ) -> S3Result<S3Response<AbortMultipartUploadOutput>> {
        self.inner.abort_multipart_upload(req).await
    }
}
