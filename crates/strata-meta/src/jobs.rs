//! Data-management jobs and per-path attributes (TTL, pin), kept in the
//! replicated state so a new leader resumes what the old one was doing.

use std::collections::BTreeMap;

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use strata_common::InodeId;

use crate::MetaError;
use crate::store::{MetaStore, Tables, enc};

pub(crate) const JOBS: TableDefinition<u64, &[u8]> = TableDefinition::new("jobs");
pub(crate) const ATTRS: TableDefinition<u64, &[u8]> = TableDefinition::new("attrs");
pub(crate) const NEXT_JOB: &str = "next_job";
/// Inodes with replication bounds.
const REPLICATED_PATHS: &str = "replicated_paths";

/// Finished jobs kept for `strata job ls` / `status`; older ones are dropped
/// when new jobs are submitted.
pub const KEEP_FINISHED_JOBS: usize = 1000;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobKind {
    /// Cache every block of the files below the path on its owner worker.
    Load { verify: bool },
    /// Drop the cached pages of persisted files below the path.
    Free,
    /// Write files that exist only in the cache to the UFS.
    Persist,
    /// Copy the files below the path to `dst` (through the cache).
    Copy { dst: String },
    /// Write one ASYNC_THROUGH file to the UFS (queued when it is closed;
    /// follows the inode through renames).
    PersistFile { inode: InodeId },
}

impl JobKind {
    pub fn name(&self) -> &'static str {
        match self {
            JobKind::Load { .. } => "load",
            JobKind::Free => "free",
            JobKind::Persist => "persist",
            JobKind::Copy { .. } => "cp",
            JobKind::PersistFile { .. } => "persist",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobState {
    Queued,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            JobState::Completed | JobState::Failed | JobState::Cancelled
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Completed => "completed",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}

/// Progress, checkpointed into the replicated state while a job runs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobProgress {
    pub files_total: u64,
    pub bytes_total: u64,
    pub files_done: u64,
    pub bytes_done: u64,
    /// Files that could not be processed (the job then ends as failed).
    pub files_failed: u64,
    /// Pages the workers fetched from the UFS for this job.
    pub ufs_pages: u64,
    /// Pages that were cached already.
    pub cached_pages: u64,
    /// The first `resume_from` files (in path order) are done: a job resumed
    /// by a new leader starts after them.
    pub resume_from: u64,
    /// Files whose cached bytes were checked against the UFS (`--verify`).
    pub verified: u64,
    /// Milliseconds spent running, over all runs.
    pub run_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub id: u64,
    pub kind: JobKind,
    pub path: String,
    pub state: JobState,
    pub created_ms: i64,
    pub updated_ms: i64,
    pub progress: JobProgress,
    /// Why it failed, or the first file errors.
    pub message: String,
    /// How many times a leader started it (more than 1: resumed).
    pub runs: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TtlAction {
    /// Drop the cached pages; the file stays (and stays in the UFS).
    Free,
    /// Delete the path from the namespace (and from the UFS, as `rm` does).
    Delete,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ttl {
    /// When the TTL was set; the path expires at `set_ms + ttl_ms`.
    pub set_ms: i64,
    pub ttl_ms: u64,
    pub action: TtlAction,
}

impl Ttl {
    pub fn expires_ms(&self) -> i64 {
        self.set_ms
            .saturating_add(self.ttl_ms.min(i64::MAX as u64) as i64)
    }
}

/// Per-inode attributes beyond the namespace entry itself.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attrs {
    pub ttl: Option<Ttl>,
    /// Set by `strata fs pin`: a free (job or TTL) leaves the path alone.
    pub pinned: bool,
    /// The file was written to the UFS from the cache: its cached pages
    /// stay keyed (and placed) by inode and generation, not by UFS object.
    pub inode_cache_id: bool,
    /// `strata fs set-replication`: bounds for the path and what is below
    /// it (0: not set).
    pub replication_min: u8,
    pub replication_max: u8,
    /// Extended attributes (`user.*` names from FUSE; S3 user metadata,
    /// content type and tags from the gateway). Changed only by
    /// [`crate::Command::SetXattrs`] and `CompleteFile`.
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

/// The attribute record as stored before extended attributes existed.
#[derive(Deserialize)]
struct AttrsV1 {
    ttl: Option<Ttl>,
    pinned: bool,
    inode_cache_id: bool,
    replication_min: u8,
    replication_max: u8,
}

/// Decodes a stored attribute record (either layout).
pub(crate) fn decode_attrs(b: &[u8]) -> Result<Attrs, postcard::Error> {
    postcard::from_bytes::<Attrs>(b).or_else(|e| match postcard::from_bytes::<AttrsV1>(b) {
        Ok(v) => Ok(Attrs {
            ttl: v.ttl,
            pinned: v.pinned,
            inode_cache_id: v.inode_cache_id,
            replication_min: v.replication_min,
            replication_max: v.replication_max,
            xattrs: BTreeMap::new(),
        }),
        Err(_) => Err(e),
    })
}

impl Attrs {
    pub fn is_empty(&self) -> bool {
        *self == Attrs::default()
    }
}

impl Tables<'_> {
    pub(crate) fn job(&self, id: u64) -> Result<Job, MetaError> {
        let g = self
            .jobs
            .get(id)
            .map_err(|e| self.store.err(e))?
            .ok_or_else(|| MetaError::Invalid(format!("no job {id}")))?;
        postcard::from_bytes(g.value()).map_err(|e| self.store.err(e))
    }

    pub(crate) fn put_job(&mut self, j: &Job) -> Result<(), MetaError> {
        self.jobs
            .insert(j.id, enc(j).as_slice())
            .map_err(|e| self.store.err(e))?;
        Ok(())
    }

    pub(crate) fn submit_job(
        &mut self,
        kind: &JobKind,
        path: &str,
        created_ms: i64,
    ) -> Result<u64, MetaError> {
        let mut id = self.counter(NEXT_JOB)?;
        if id == 0 {
            id = 1;
        }
        self.set_counter(NEXT_JOB, id + 1)?;
        self.put_job(&Job {
            id,
            kind: kind.clone(),
            path: path.to_string(),
            state: JobState::Queued,
            created_ms,
            updated_ms: created_ms,
            progress: JobProgress::default(),
            message: String::new(),
            runs: 0,
        })?;
        // Drop the oldest finished jobs beyond the retention count.
        let mut finished = Vec::new();
        for kv in self.jobs.iter().map_err(|e| self.store.err(e))? {
            let (k, v) = kv.map_err(|e| self.store.err(e))?;
            let j: Job = postcard::from_bytes(v.value()).map_err(|e| self.store.err(e))?;
            if j.state.is_finished() {
                finished.push(k.value());
            }
        }
        if finished.len() > KEEP_FINISHED_JOBS {
            for k in &finished[..finished.len() - KEEP_FINISHED_JOBS] {
                self.jobs.remove(*k).map_err(|e| self.store.err(e))?;
            }
        }
        Ok(id)
    }

    pub(crate) fn update_job(
        &mut self,
        id: u64,
        state: JobState,
        progress: Option<&JobProgress>,
        message: Option<&str>,
        new_run: bool,
        updated_ms: i64,
    ) -> Result<(), MetaError> {
        let mut j = self.job(id)?;
        if j.state.is_finished() {
            return Err(MetaError::Invalid(format!(
                "job {id} is {} already",
                j.state.name()
            )));
        }
        j.state = state;
        if let Some(p) = progress {
            j.progress = p.clone();
        }
        if let Some(m) = message {
            j.message = m.to_string();
        }
        if new_run {
            j.runs += 1;
        }
        j.updated_ms = updated_ms;
        self.put_job(&j)
    }

    /// The namespace path of an inode (for job listings).
    pub(crate) fn path_of(&self, mut id: InodeId) -> Result<String, MetaError> {
        let mut parts = Vec::new();
        while id != crate::ROOT_ID {
            let i = self.get_inode(id)?;
            parts.push(i.name);
            id = i.parent;
        }
        parts.reverse();
        Ok(format!("/{}", parts.join("/")))
    }

    /// Replaces an inode's TTL, pin and replication attributes; its
    /// extended attributes are kept (they change only by their own command).
    pub(crate) fn set_attrs(&mut self, id: InodeId, a: &Attrs) -> Result<(), MetaError> {
        self.get_inode(id)?;
        let old = self.attrs_of(id)?;
        let a = Attrs {
            xattrs: old.xattrs,
            ..a.clone()
        };
        self.set_attrs_raw(id, &a)
    }

    pub(crate) fn set_attrs_raw(&mut self, id: InodeId, a: &Attrs) -> Result<(), MetaError> {
        let old = self.attrs_of(id)?;
        self.count_replicated(&old, a)?;
        if a.is_empty() {
            self.attrs.remove(id).map_err(|e| self.store.err(e))?;
        } else {
            self.attrs
                .insert(id, enc(a).as_slice())
                .map_err(|e| self.store.err(e))?;
        }
        Ok(())
    }

    pub(crate) fn attrs_of(&self, id: InodeId) -> Result<Attrs, MetaError> {
        let v = self.attrs.get(id).map_err(|e| self.store.err(e))?;
        Ok(
            v.map(|g| decode_attrs(g.value()).map_err(|e| self.store.err(e)))
                .transpose()?
                .unwrap_or_default(),
        )
    }

    fn count_replicated(&mut self, old: &Attrs, new: &Attrs) -> Result<(), MetaError> {
        let has = |a: &Attrs| a.replication_min > 0 || a.replication_max > 0;
        if has(old) != has(new) {
            let n = self.counter(REPLICATED_PATHS)?;
            let n = if has(new) { n + 1 } else { n.saturating_sub(1) };
            self.set_counter(REPLICATED_PATHS, n)?;
        }
        Ok(())
    }

    pub(crate) fn drop_attrs(&mut self, id: InodeId) -> Result<(), MetaError> {
        let old = self.attrs_of(id)?;
        self.count_replicated(&old, &Attrs::default())?;
        self.attrs.remove(id).map_err(|e| self.store.err(e))?;
        Ok(())
    }
}

impl MetaStore {
    pub fn job(&self, id: u64) -> Result<Option<Job>, MetaError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = tx.open_table(JOBS).map_err(|e| self.err(e))?;
        let v = t.get(id).map_err(|e| self.err(e))?;
        v.map(|g| postcard::from_bytes(g.value()).map_err(|e| self.err(e)))
            .transpose()
    }

    /// Every kept job, oldest first.
    pub fn jobs(&self) -> Result<Vec<Job>, MetaError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = tx.open_table(JOBS).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for kv in t.iter().map_err(|e| self.err(e))? {
            let (_, v) = kv.map_err(|e| self.err(e))?;
            out.push(postcard::from_bytes(v.value()).map_err(|e| self.err(e))?);
        }
        Ok(out)
    }

    pub fn attrs(&self, id: InodeId) -> Result<Attrs, MetaError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = tx.open_table(ATTRS).map_err(|e| self.err(e))?;
        let v = t.get(id).map_err(|e| self.err(e))?;
        Ok(v.map(|g| decode_attrs(g.value()).map_err(|e| self.err(e)))
            .transpose()?
            .unwrap_or_default())
    }

    /// True when some inode has replication bounds (a cheap check before
    /// looking for them up a path).
    pub fn has_replication_attrs(&self) -> bool {
        let count = || -> Result<u64, MetaError> {
            let tx = self.db.begin_read().map_err(|e| self.err(e))?;
            let t = tx
                .open_table(crate::store::COUNTERS)
                .map_err(|e| self.err(e))?;
            Ok(t.get(REPLICATED_PATHS)
                .map_err(|e| self.err(e))?
                .map(|g| g.value())
                .unwrap_or(0))
        };
        count().map(|n| n > 0).unwrap_or(true)
    }

    /// Every inode with attributes.
    pub fn all_attrs(&self) -> Result<Vec<(InodeId, Attrs)>, MetaError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = tx.open_table(ATTRS).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for kv in t.iter().map_err(|e| self.err(e))? {
            let (k, v) = kv.map_err(|e| self.err(e))?;
            out.push((k.value(), decode_attrs(v.value()).map_err(|e| self.err(e))?));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Command, PersistState, ROOT_ID};

    fn update(id: u64, state: JobState) -> Command {
        Command::UpdateJob {
            id,
            state,
            progress: None,
            message: None,
            new_run: state == JobState::Running,
            updated_ms: 2,
        }
    }

    #[test]
    fn a_finished_job_cannot_be_moved_on_and_survives_a_snapshot() {
        let d = tempfile::tempdir().unwrap();
        let s = MetaStore::open(d.path()).unwrap();
        let id = s
            .apply(&Command::SubmitJob {
                kind: JobKind::Load { verify: false },
                path: "/data".into(),
                created_ms: 1,
            })
            .unwrap()
            .job
            .unwrap();
        s.apply(&update(id, JobState::Running)).unwrap();
        s.apply(&update(id, JobState::Cancelled)).unwrap();
        // A runner that had not seen the cancel yet must not revive it.
        let e = s.apply(&update(id, JobState::Completed)).unwrap_err();
        assert!(e.to_string().contains("cancelled already"), "{e}");
        let j = s.job(id).unwrap().unwrap();
        assert_eq!((j.state, j.runs), (JobState::Cancelled, 1));
        assert!(s.apply(&update(99, JobState::Running)).is_err());

        let (bytes, _) = s.export().unwrap();
        let d2 = tempfile::tempdir().unwrap();
        let s2 = MetaStore::open(d2.path()).unwrap();
        s2.import(&bytes).unwrap();
        assert_eq!(s2.jobs().unwrap(), vec![j]);
        // Ids keep counting after a snapshot.
        let next = s2
            .apply(&Command::SubmitJob {
                kind: JobKind::Free,
                path: "/".into(),
                created_ms: 3,
            })
            .unwrap()
            .job
            .unwrap();
        assert_eq!(next, id + 1);
    }

    #[test]
    fn attributes_follow_their_inode_and_vanish_with_it() {
        let d = tempfile::tempdir().unwrap();
        let s = MetaStore::open(d.path()).unwrap();
        let f = s
            .apply(&Command::CreateFile {
                parent: ROOT_ID,
                name: "f".into(),
                mtime_ms: 1,
                persist: PersistState::NotPersisted,
                overwrite: false,
            })
            .unwrap()
            .inode
            .unwrap();
        let a = Attrs {
            ttl: Some(Ttl {
                set_ms: 10,
                ttl_ms: 5,
                action: TtlAction::Free,
            }),
            pinned: true,
            inode_cache_id: false,
            replication_min: 0,
            replication_max: 0,
            xattrs: BTreeMap::new(),
        };
        s.apply(&Command::SetAttrs {
            id: f,
            attrs: a.clone(),
        })
        .unwrap();
        assert_eq!(s.attrs(f).unwrap(), a);
        assert_eq!(a.ttl.unwrap().expires_ms(), 15);
        assert!(
            s.apply(&Command::SetAttrs {
                id: 12345,
                attrs: a.clone()
            })
            .is_err()
        );
        s.apply(&Command::Delete { id: f }).unwrap();
        assert!(s.all_attrs().unwrap().is_empty());
    }
}
