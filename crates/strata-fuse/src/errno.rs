//! SDK errors to POSIX errno, in one place.

use fuser::Errno;
use strata_client::ClientError;
use strata_proto::data::ErrorCode;

pub fn to_errno(e: &ClientError) -> Errno {
    match e {
        ClientError::NotFound(_) => Errno::ENOENT,
        ClientError::AlreadyExists(_) => Errno::EEXIST,
        ClientError::InvalidArgument(m) if m.contains("across mounts") => Errno::EXDEV,
        ClientError::InvalidArgument(m) if m.contains("read-only") => Errno::EROFS,
        ClientError::InvalidArgument(_) => Errno::EINVAL,
        ClientError::PermissionDenied(_) => Errno::EACCES,
        ClientError::FailedPrecondition(m) => {
            if m.contains("not empty") {
                Errno::ENOTEMPTY
            } else if m.contains("is a directory") {
                Errno::EISDIR
            } else if m.contains("not a directory") {
                Errno::ENOTDIR
            } else {
                Errno::EPERM
            }
        }
        ClientError::Changed { .. } => Errno::ESTALE,
        ClientError::Worker { code, .. } => match code {
            ErrorCode::NotFound => Errno::ENOENT,
            ErrorCode::CacheFull => Errno::ENOSPC,
            ErrorCode::Stale => Errno::ESTALE,
            ErrorCode::PermissionDenied => Errno::EACCES,
            _ => Errno::EIO,
        },
        _ => Errno::EIO,
    }
}
