//! Commands: every change to the namespace, as data.

use serde::{Deserialize, Serialize};
use strata_common::InodeId;

use crate::jobs::{Attrs, JobKind, JobProgress, JobState};
use crate::{MountEntry, PersistState};

/// One entry of a UFS directory listing, as merged by [`Command::SyncDir`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UfsEntry {
    pub name: String,
    pub is_dir: bool,
    pub size: u64,
    pub mtime_ms: i64,
    pub fingerprint: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    Mkdir {
        parent: InodeId,
        name: String,
        mtime_ms: i64,
        /// Set for directories that exist in the UFS already.
        synced_ms: Option<i64>,
    },
    CreateFile {
        parent: InodeId,
        name: String,
        mtime_ms: i64,
        persist: PersistState,
        /// Replace an existing file of that name.
        overwrite: bool,
    },
    CompleteFile {
        id: InodeId,
        generation: u64,
        size: u64,
        fingerprint: String,
        mtime_ms: i64,
        /// Replaces the file's extended attributes (an object's metadata);
        /// `None` keeps them.
        xattrs: Option<Vec<(String, Vec<u8>)>>,
    },
    /// Removes an inode and everything below it.
    Delete {
        id: InodeId,
    },
    Rename {
        id: InodeId,
        new_parent: InodeId,
        new_name: String,
        mtime_ms: i64,
    },
    /// Merges a UFS listing into a directory: adds what is new, updates files
    /// whose fingerprint changed (new generation), removes persisted entries
    /// that vanished. Unpersisted and incomplete files are kept.
    SyncDir {
        dir: InodeId,
        synced_ms: i64,
        entries: Vec<UfsEntry>,
    },
    /// Marks a directory as needing re-validation on next access.
    Invalidate {
        dir: InodeId,
    },
    AddMount {
        parent: InodeId,
        name: String,
        mtime_ms: i64,
        mount: MountEntry,
    },
    RemoveMount {
        mount_id: u64,
    },
    /// Queues a job; the output names its id.
    SubmitJob {
        kind: JobKind,
        path: String,
        created_ms: i64,
    },
    /// Moves a job on (refused once it is finished, so a cancel sticks).
    UpdateJob {
        id: u64,
        state: JobState,
        progress: Option<JobProgress>,
        message: Option<String>,
        /// A leader starts (or resumes) running it.
        new_run: bool,
        updated_ms: i64,
    },
    /// A file that lived only in the cache was written to the UFS.
    Persisted {
        id: InodeId,
        generation: u64,
        fingerprint: String,
    },
    /// Replaces an inode's attributes (TTL, pin, replication; its
    /// extended attributes are kept).
    SetAttrs {
        id: InodeId,
        attrs: Attrs,
    },
    /// Removes, then sets, extended attributes of one inode (all or nothing).
    SetXattrs {
        id: InodeId,
        set: Vec<(String, Vec<u8>)>,
        remove: Vec<String>,
        flag: crate::XattrFlag,
    },
    /// An empty, complete, cache-only file in one command: `CreateFile`
    /// then `CompleteFile` of size 0 (`touch`, an empty object). Last in
    /// the enum, so log entries written before it existed still decode.
    CreateEmptyFile {
        parent: InodeId,
        name: String,
        mtime_ms: i64,
        overwrite: bool,
    },
}

/// What applying a command produced.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Output {
    /// The inode created or changed, if any.
    pub inode: Option<InodeId>,
    /// Inodes removed (with their subtree).
    pub removed: Vec<crate::Inode>,
    /// Files whose content changed (SyncDir).
    pub changed: u64,
    /// The job submitted or updated.
    pub job: Option<u64>,
}
