//! Multipart uploads. Parts are kept as files under `gateway.upload_dir`
//! (`<bucket>/<upload id>/`, with the object key in `key` and each part in
//! `<number>.<md5 hex>`) until CompleteMultipartUpload streams them, in
//! order, into one namespace file. Nothing of an unfinished upload appears
//! in the namespace or the UFS; an upload survives a gateway restart.
//! Uploads are local to the gateway that received them.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use base64::Engine;
use bytes::Bytes;
use futures::{Stream, StreamExt};
use md5::{Digest, Md5};
use s3s::{S3Error, S3ErrorCode, S3Result, s3_error};
use tokio::io::AsyncWriteExt;

/// Highest part number S3 accepts.
pub const MAX_PART: i32 = 10_000;
/// Smallest size of every part but the last (as in S3).
pub const MIN_PART_SIZE: u64 = 5 << 20;

pub struct Uploads {
    dir: PathBuf,
}

/// A stored part.
#[derive(Debug, Clone)]
pub struct PartFile {
    pub number: i32,
    pub md5: String,
    pub size: u64,
    pub modified: SystemTime,
    pub path: PathBuf,
}

/// An upload in progress.
pub struct UploadInfo {
    pub key: String,
    pub id: String,
    pub initiated: SystemTime,
}

fn io_err(what: &str, e: std::io::Error) -> S3Error {
    S3Error::with_message(
        S3ErrorCode::InternalError,
        format!("{what}: {e} (check gateway.upload_dir)"),
    )
}

fn no_upload(id: &str) -> S3Error {
    S3Error::with_message(
        S3ErrorCode::NoSuchUpload,
        format!("upload {id} does not exist (completed, aborted, or never created)"),
    )
}

/// An upload id: 32 hex digits from the process's random hasher keys.
fn new_id() -> String {
    let mut out = String::new();
    for i in 0..2u64 {
        let mut h = RandomState::new().build_hasher();
        h.write_u64(i);
        h.write_u128(
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
        );
        out.push_str(&format!("{:016x}", h.finish()));
    }
    out
}

/// The base64 MD5 a `Content-MD5` header must carry for `digest`.
fn b64(digest: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(digest)
}

/// Checks a `Content-MD5` header against the digest of what arrived.
pub fn check_md5(header: Option<&str>, digest: &[u8]) -> S3Result<()> {
    match header {
        None => Ok(()),
        Some(h)
            if base64::engine::general_purpose::STANDARD
                .decode(h.trim())
                .is_err() =>
        {
            Err(s3_error!(InvalidDigest))
        }
        Some(h) if h.trim() != b64(digest) => Err(S3Error::with_message(
            S3ErrorCode::BadDigest,
            "the Content-MD5 you specified did not match what we received",
        )),
        Some(_) => Ok(()),
    }
}

impl Uploads {
    pub fn new(dir: PathBuf) -> Uploads {
        Uploads { dir }
    }

    fn upload_dir(&self, bucket: &str, id: &str) -> S3Result<PathBuf> {
        if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(no_upload(id));
        }
        Ok(self.dir.join(bucket).join(id))
    }

    /// Starts an upload; `meta` (the object's attributes, encoded) is kept
    /// beside the parts until Complete.
    pub async fn create(&self, bucket: &str, key: &str, meta: &str) -> S3Result<String> {
        let id = new_id();
        let d = self.upload_dir(bucket, &id)?;
        tokio::fs::create_dir_all(&d)
            .await
            .map_err(|e| io_err(&format!("creating {}", d.display()), e))?;
        tokio::fs::write(d.join("meta"), meta.as_bytes())
            .await
            .map_err(|e| io_err("recording the upload's metadata", e))?;
        tokio::fs::write(d.join("key"), key.as_bytes())
            .await
            .map_err(|e| io_err("recording the upload's key", e))?;
        Ok(id)
    }

    /// The directory of upload `id`, which must be for `key`.
    pub async fn open(&self, bucket: &str, key: &str, id: &str) -> S3Result<PathBuf> {
        let d = self.upload_dir(bucket, id)?;
        match tokio::fs::read(d.join("key")).await {
            Ok(k) if k == key.as_bytes() => Ok(d),
            _ => Err(no_upload(id)),
        }
    }

    /// The attributes recorded when the upload was created (none for
    /// uploads created before they were recorded).
    pub async fn meta(&self, dir: &Path) -> S3Result<String> {
        match tokio::fs::read_to_string(dir.join("meta")).await {
            Ok(s) => Ok(s),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
            Err(e) => Err(io_err("reading the upload's metadata", e)),
        }
    }

    pub async fn parts(&self, dir: &Path) -> S3Result<Vec<PartFile>> {
        let mut out = Vec::new();
        let mut rd = tokio::fs::read_dir(dir)
            .await
            .map_err(|e| io_err("listing parts", e))?;
        while let Some(e) = rd
            .next_entry()
            .await
            .map_err(|e| io_err("listing parts", e))?
        {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some((n, md5)) = name.split_once('.') else {
                continue;
            };
            let (Ok(number), true) = (n.parse::<i32>(), md5.len() == 32) else {
                continue;
            };
            let Ok(meta) = e.metadata().await else {
                continue;
            };
            out.push(PartFile {
                number,
                md5: md5.to_string(),
                size: meta.len(),
                modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                path: e.path(),
            });
        }
        out.sort_by_key(|p| p.number);
        Ok(out)
    }

    /// Stores part `number` from `body`, replacing an earlier upload of the
    /// same number; returns its MD5 (hex), the part's ETag.
    pub async fn write_part<S, E>(
        &self,
        dir: &Path,
        number: i32,
        mut body: S,
        content_md5: Option<&str>,
    ) -> S3Result<String>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        if !(1..=MAX_PART).contains(&number) {
            return Err(S3Error::with_message(
                S3ErrorCode::InvalidArgument,
                format!("part number {number} is not in 1..={MAX_PART}"),
            ));
        }
        let tmp = dir.join(format!(".{number:05}.{}", new_id()));
        let mut f = tokio::fs::File::create(&tmp)
            .await
            .map_err(|e| io_err("storing a part", e))?;
        let mut h = Md5::new();
        let res: S3Result<()> = async {
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| {
                    S3Error::with_message(
                        S3ErrorCode::IncompleteBody,
                        format!("part {number} was cut short: {e}"),
                    )
                })?;
                h.update(&chunk);
                f.write_all(&chunk)
                    .await
                    .map_err(|e| io_err("storing a part", e))?;
            }
            f.flush().await.map_err(|e| io_err("storing a part", e))?;
            Ok(())
        }
        .await;
        let digest = h.finalize();
        let res = res.and_then(|()| check_md5(content_md5, &digest));
        if let Err(e) = res {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e);
        }
        let md5 = hex::encode(digest);
        for old in self.parts(dir).await? {
            if old.number == number {
                let _ = tokio::fs::remove_file(&old.path).await;
            }
        }
        tokio::fs::rename(&tmp, dir.join(format!("{number:05}.{md5}")))
            .await
            .map_err(|e| io_err("storing a part", e))?;
        Ok(md5)
    }

    pub async fn list(&self, bucket: &str) -> Vec<UploadInfo> {
        let mut out = Vec::new();
        let Ok(mut rd) = tokio::fs::read_dir(self.dir.join(bucket)).await else {
            return out;
        };
        while let Ok(Some(e)) = rd.next_entry().await {
            let id = e.file_name().to_string_lossy().into_owned();
            let Ok(key) = tokio::fs::read_to_string(e.path().join("key")).await else {
                continue;
            };
            let initiated = e
                .metadata()
                .await
                .and_then(|m| m.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH);
            out.push(UploadInfo { key, id, initiated });
        }
        out.sort_by(|a, b| (&a.key, &a.id).cmp(&(&b.key, &b.id)));
        out
    }

    pub async fn remove(&self, dir: &Path) {
        if let Err(e) = tokio::fs::remove_dir_all(dir).await {
            tracing::warn!(dir = %dir.display(), "removing a finished upload: {e}");
        }
    }
}

/// The parts a CompleteMultipartUpload names, checked against those stored:
/// ascending numbers, each stored with a matching ETag, all but the last at
/// least 5 MiB.
pub fn select_parts(
    stored: &[PartFile],
    wanted: &[(i32, Option<String>)],
) -> S3Result<Vec<PartFile>> {
    if wanted.is_empty() {
        return Err(S3Error::with_message(
            S3ErrorCode::MalformedXML,
            "CompleteMultipartUpload lists no parts",
        ));
    }
    let mut out = Vec::with_capacity(wanted.len());
    let mut last = 0;
    for (n, etag) in wanted {
        if *n <= last {
            return Err(s3_error!(InvalidPartOrder));
        }
        last = *n;
        let Some(p) = stored.iter().find(|p| p.number == *n) else {
            return Err(S3Error::with_message(
                S3ErrorCode::InvalidPart,
                format!("part {n} was not uploaded"),
            ));
        };
        if let Some(e) = etag
            && e.trim_matches('"') != p.md5
        {
            return Err(S3Error::with_message(
                S3ErrorCode::InvalidPart,
                format!("part {n}: ETag {e} does not match the uploaded part"),
            ));
        }
        out.push(p.clone());
    }
    if let Some(small) = out[..out.len() - 1].iter().find(|p| p.size < MIN_PART_SIZE) {
        return Err(S3Error::with_message(
            S3ErrorCode::EntityTooSmall,
            format!(
                "part {} is {} bytes; every part but the last must be at least 5 MiB",
                small.number, small.size
            ),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(n: i32, size: u64) -> PartFile {
        PartFile {
            number: n,
            md5: format!("{n:032x}"),
            size,
            modified: SystemTime::UNIX_EPOCH,
            path: PathBuf::new(),
        }
    }

    #[test]
    fn completion_checks_parts() {
        let stored = vec![part(1, 5 << 20), part(2, 5 << 20), part(3, 10)];
        assert_eq!(
            select_parts(&stored, &[(1, None), (3, None)])
                .unwrap()
                .len(),
            2
        );
        assert!(select_parts(&stored, &[(2, None), (1, None)]).is_err());
        assert!(select_parts(&stored, &[(4, None)]).is_err());
        assert!(select_parts(&stored, &[(3, None), (4, None)]).is_err());
        assert!(select_parts(&stored, &[(1, Some("\"bad\"".into()))]).is_err());
        let ok = format!("\"{:032x}\"", 2);
        assert!(select_parts(&stored, &[(2, Some(ok))]).is_ok());
        // A small part that is not the last.
        let small = vec![part(1, 10), part(2, 10)];
        assert!(select_parts(&small, &[(1, None), (2, None)]).is_err());
        assert!(select_parts(&stored, &[]).is_err());
    }

    #[test]
    fn content_md5() {
        let d = Md5::digest(b"hello");
        assert!(check_md5(Some("XUFAKrxLKna5cZ2REBfFkg=="), &d).is_ok());
        assert!(check_md5(Some("AAAAAAAAAAAAAAAAAAAAAA=="), &d).is_err());
        assert!(check_md5(Some("not base64!"), &d).is_err());
        assert!(check_md5(None, &d).is_ok());
    }
}
