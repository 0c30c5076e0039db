use strata_meta::MetaError;
use strata_ufs::{UfsError, UfsErrorKind};
use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum MasterError {
    #[error("{path}: no such file or directory")]
    NotFound { path: String },
    #[error("{path}: already exists")]
    Exists { path: String },
    #[error("{path}: not a directory")]
    NotDir { path: String },
    #[error("{path}: is a directory")]
    IsDir { path: String },
    #[error("{path}: directory not empty (use recursive delete)")]
    NotEmpty { path: String },
    #[error("{path}: {msg}")]
    Invalid { path: String, msg: String },
    #[error("{path}: no extended attribute {name:?}")]
    NoXattr { path: String, name: String },
    #[error("{0}")]
    Path(#[from] strata_common::CommonError),
    #[error("{path}: under storage error: {err}")]
    Ufs { path: String, err: UfsError },
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error("cannot listen on {addr}: {msg} (is another master running? set master.rpc_addr)")]
    Bind { addr: String, msg: String },
    #[error("internal error: {0}")]
    Internal(String),
    /// This master is not the Raft leader (or not yet ready to serve as
    /// one); clients retry at `leader` when it is known.
    #[error("master {me} is not the leader{}; retry at the leader", leader.as_ref().map(|l| format!(" (the leader is {l})")).unwrap_or_else(|| " (no leader elected yet)".into()))]
    NotLeader { me: String, leader: Option<String> },
    #[error(
        "metadata replication: {0} (the masters may have lost their quorum; check `strata admin masters list`)"
    )]
    Raft(String),
}

pub use strata_proto::masters::LEADER_HEADER;

impl From<MasterError> for Status {
    fn from(e: MasterError) -> Status {
        let code = match &e {
            MasterError::NotFound { .. } | MasterError::NoXattr { .. } => Code::NotFound,
            MasterError::Exists { .. } => Code::AlreadyExists,
            MasterError::NotDir { .. }
            | MasterError::IsDir { .. }
            | MasterError::NotEmpty { .. } => Code::FailedPrecondition,
            MasterError::Invalid { .. } | MasterError::Path(_) => Code::InvalidArgument,
            MasterError::Ufs { err, .. } => match err.kind {
                UfsErrorKind::NotFound => Code::NotFound,
                UfsErrorKind::PermissionDenied => Code::PermissionDenied,
                UfsErrorKind::Unreachable => Code::Unavailable,
                UfsErrorKind::InvalidUri => Code::InvalidArgument,
                UfsErrorKind::AlreadyExists => Code::AlreadyExists,
                UfsErrorKind::Unsupported => Code::Unimplemented,
                _ => Code::Internal,
            },
            MasterError::Meta(MetaError::Exists(_)) => Code::AlreadyExists,
            MasterError::Meta(MetaError::NoInode(_)) => Code::NotFound,
            MasterError::Meta(MetaError::Invalid(_)) => Code::InvalidArgument,
            MasterError::Meta(_) | MasterError::Bind { .. } | MasterError::Internal(_) => {
                Code::Internal
            }
            MasterError::NotLeader { .. } | MasterError::Raft(_) => Code::Unavailable,
        };
        let mut status = Status::new(code, e.to_string());
        if let MasterError::NotLeader {
            leader: Some(l), ..
        } = &e
            && let Ok(v) = l.parse()
        {
            status.metadata_mut().insert(LEADER_HEADER, v);
        }
        status
    }
}
