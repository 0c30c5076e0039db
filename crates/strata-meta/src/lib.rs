//! The namespace state machine: inodes, the directory tree and the mount
//! table, changed only by explicit [`Command`]s applied in order by
//! [`MetaStore::apply`] and persisted in redb. Applying the same commands to
//! an empty store always yields the same state, which is what lets the master
//! replicate the command log with Raft. This crate does no I/O other than its
//! own store: no network, no UFS calls, no clocks (times arrive in commands).

mod command;
mod jobs;
mod replicated;
mod store;
mod xattr;

pub use command::{Command, Output, UfsEntry};
pub use jobs::{Attrs, Job, JobKind, JobProgress, JobState, KEEP_FINISHED_JOBS, Ttl, TtlAction};
pub use replicated::LoggedCommand;
pub use store::{MetaStore, MetaView};
pub use xattr::{
    XATTR_NAME_MAX, XATTR_TOTAL_MAX, XATTR_VALUE_MAX, XattrFlag, check_xattr, check_xattr_set,
};

use serde::{Deserialize, Serialize};
use strata_common::InodeId;

pub const ROOT_ID: InodeId = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PersistState {
    Persisted,
    NotPersisted,
    ToBePersisted,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WriteType {
    MustCache,
    CacheThrough,
    Through,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inode {
    pub id: InodeId,
    pub parent: InodeId,
    pub name: String,
    pub is_dir: bool,
    pub size: u64,
    pub mtime_ms: i64,
    pub mode: u32,
    /// UFS fingerprint of the bytes (ETag or size-mtime); empty if none.
    pub fingerprint: String,
    pub persist: PersistState,
    /// False while a writer has the file open.
    pub complete: bool,
    /// Bumped whenever the file's bytes are replaced.
    pub generation: u64,
    /// Mount this inode lives under (0: none, the root's own namespace).
    pub mount_id: u64,
    /// For directories under a mount: when the UFS listing was last merged.
    pub synced_ms: Option<i64>,
    pub is_mount_point: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountEntry {
    pub id: u64,
    /// Inode of the mount point directory.
    pub inode: InodeId,
    pub path: String,
    pub ufs_uri: String,
    pub options: Vec<(String, String)>,
    pub read_only: bool,
    /// Seconds: -1 never re-validate, 0 always.
    pub sync_interval: i64,
    pub block_size: u64,
    pub page_size: u64,
}

/// Errors from the state machine. A command that fails changes nothing.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum MetaError {
    #[error("no such inode {0}")]
    NoInode(InodeId),
    #[error("{0:?} already exists in the directory")]
    Exists(String),
    #[error("inode {0} is not a directory")]
    NotDir(InodeId),
    #[error("directory inode {0} is not empty")]
    NotEmpty(InodeId),
    #[error("no extended attribute {0:?}")]
    NoXattr(String),
    #[error("invalid command: {0}")]
    Invalid(String),
    #[error("metadata store at {path}: {msg} (check the disk and permissions of master.data_dir)")]
    Store { path: String, msg: String },
}

impl MetaError {
    /// True when the store itself failed (disk, corruption), as opposed to a
    /// command that the state rejects.
    pub fn is_store(&self) -> bool {
        matches!(self, MetaError::Store { .. })
    }
}
