//! Data-management jobs (run by the master leader) and path attributes.

use strata_common::CacheId;
use strata_proto::pb::{self, JobInfo};

use crate::{Client, Result, parse_path};

/// What a job does; see `strata job --help`.
#[derive(Clone, Debug)]
pub enum JobSpec {
    Load { verify: bool },
    Free,
    Persist,
    Copy { dst: String },
}

impl Client {
    /// Queues a job on the leader; returns it as queued.
    pub async fn submit_job(&self, path: &str, spec: JobSpec) -> Result<JobInfo> {
        let p = parse_path(path)?;
        let (kind, dst, verify) = match spec {
            JobSpec::Load { verify } => ("load", String::new(), verify),
            JobSpec::Free => ("free", String::new(), false),
            JobSpec::Persist => ("persist", String::new(), false),
            JobSpec::Copy { dst } => ("cp", parse_path(&dst)?.to_string(), false),
        };
        let req = pb::SubmitJobRequest {
            kind: kind.into(),
            path: p.to_string(),
            dst,
            verify,
        };
        self.master_write(req, |mut c, r| async move { c.submit_job(r).await })
            .await
    }

    pub async fn job(&self, id: u64) -> Result<JobInfo> {
        self.master_read(pb::JobIdRequest { id }, |mut c, r| async move {
            c.get_job(r).await
        })
        .await
    }

    /// Every job the masters keep (the last 1000 finished ones and all
    /// unfinished), oldest first.
    pub async fn jobs(&self) -> Result<Vec<JobInfo>> {
        self.master_read(pb::Empty {}, |mut c, r| async move { c.list_jobs(r).await })
            .await
            .map(|l| l.jobs)
    }

    /// Cancels a queued or running job.
    pub async fn cancel_job(&self, id: u64) -> Result<JobInfo> {
        self.master_write(pb::JobIdRequest { id }, |mut c, r| async move {
            c.cancel_job(r).await
        })
        .await
    }

    /// Sets or clears a path's TTL and pin flag.
    pub async fn set_attributes(&self, req: pb::SetAttributesRequest) -> Result<pb::FileInfo> {
        let mut req = req;
        req.path = parse_path(&req.path)?.to_string();
        self.master_write(req, |mut c, r| async move { c.set_attributes(r).await })
            .await
    }

    /// Removes, then sets, extended attributes of a path (all or nothing);
    /// `flag` as `setxattr(2)`: a missing name with `XattrReplace` is
    /// `NotFound`, an existing one with `XattrCreate` `AlreadyExists`.
    pub async fn set_xattrs(
        &self,
        path: &str,
        set: impl IntoIterator<Item = (String, Vec<u8>)>,
        remove: Vec<String>,
        flag: pb::XattrFlag,
    ) -> Result<pb::FileInfo> {
        self.set_attributes(pb::SetAttributesRequest {
            path: path.to_string(),
            xattr_set: set.into_iter().collect(),
            xattr_remove: remove,
            xattr_flag: flag as i32,
            ..Default::default()
        })
        .await
    }

    /// Tells every live worker that a file's cached pages are in the UFS
    /// now (no longer the only copy, so evictable); returns the pages.
    pub async fn mark_persisted(&self, f: &pb::FileInfo) -> u64 {
        match CacheId::from_hex(&f.cache_id) {
            Some(id) => {
                self.tell_every_worker(&strata_proto::data::Message::Persisted { cache_id: id.0 })
                    .await
            }
            None => 0,
        }
    }

    /// Drops a file's cached pages on every live worker; returns how many.
    pub async fn free_file(&self, f: &pb::FileInfo) -> u64 {
        match CacheId::from_hex(&f.cache_id) {
            Some(id) => self.free_everywhere(id).await,
            None => 0,
        }
    }
}
