use strata_proto::data::ErrorCode;
use tonic::{Code, Status};

/// Every failure the SDK reports. Messages name the path or host involved.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error(
        "cannot reach the master at {addr}: {msg} (is `strata master` or `strata local` running? set --master or STRATA_MASTER)"
    )]
    MasterUnavailable { addr: String, msg: String },
    #[error("{0}")]
    UfsUnavailable(String),
    #[error(
        "no live workers are registered with the master at {0}; start `strata worker` (or `strata local`)"
    )]
    NoWorkers(String),
    #[error("worker {addr}: {msg}")]
    Worker {
        addr: String,
        code: ErrorCode,
        msg: String,
    },
    #[error("data connection to worker {addr}: {msg}")]
    Connection { addr: String, msg: String },
    #[error("{path} changed in the under storage while it was being read; read it again")]
    Changed { path: String },
    #[error("the master does not offer this call (an older version; upgrade it): {0}")]
    Unimplemented(String),
    /// `client.local_cache_dir` is used by another process (one process
    /// at a time may use a directory).
    #[error(
        "client.local_cache_dir {dir}: in use by {holder} (one process at a time may use a local \
         cache directory: stop that process, or give this one its own directory)"
    )]
    LocalCacheInUse { dir: String, holder: String },
    #[error("master: {0}")]
    Other(String),
}

impl ClientError {
    pub(crate) fn from_status(s: Status, master: &str) -> Self {
        let msg = s.message().to_string();
        match s.code() {
            Code::NotFound => ClientError::NotFound(msg),
            Code::AlreadyExists => ClientError::AlreadyExists(msg),
            Code::InvalidArgument => ClientError::InvalidArgument(msg),
            Code::PermissionDenied => ClientError::PermissionDenied(msg),
            Code::FailedPrecondition => ClientError::FailedPrecondition(msg),
            Code::Unavailable if msg.contains("under storage") => ClientError::UfsUnavailable(msg),
            Code::Unavailable | Code::DeadlineExceeded | Code::Unknown
                if !msg.contains(':') || msg.contains("transport") || msg.contains("connect") =>
            {
                ClientError::MasterUnavailable {
                    addr: master.to_string(),
                    msg,
                }
            }
            Code::Unavailable => ClientError::UfsUnavailable(msg),
            Code::Unimplemented => ClientError::Unimplemented(msg),
            _ => ClientError::Other(msg),
        }
    }

    /// True for a missing path.
    pub fn is_not_found(&self) -> bool {
        matches!(self, ClientError::NotFound(_))
            || matches!(
                self,
                ClientError::Worker {
                    code: ErrorCode::NotFound,
                    ..
                }
            )
    }
}
