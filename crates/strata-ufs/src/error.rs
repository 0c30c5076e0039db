use std::fmt;

/// Classified UFS failure; the kind decides retries and error codes upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UfsErrorKind {
    NotFound,
    PermissionDenied,
    /// The endpoint could not be reached (connection refused, DNS, timeout).
    Unreachable,
    /// The object no longer matches the expected fingerprint.
    Stale,
    AlreadyExists,
    InvalidUri,
    Unsupported,
    Other,
}

#[derive(Clone, Debug, thiserror::Error)]
pub struct UfsError {
    pub kind: UfsErrorKind,
    /// What was being touched: `s3://bucket/key at http://host:port`.
    pub target: String,
    pub message: String,
}

impl UfsError {
    pub fn new(kind: UfsErrorKind, target: impl Into<String>, message: impl Into<String>) -> Self {
        UfsError {
            kind,
            target: target.into(),
            message: message.into(),
        }
    }

    fn hint(&self) -> &'static str {
        match self.kind {
            UfsErrorKind::NotFound => "check the path, or run `strata fs sync` if it was removed",
            UfsErrorKind::PermissionDenied => {
                "check the mount's credentials (access_key_id/secret_access_key options or AWS_* variables)"
            }
            UfsErrorKind::Unreachable => {
                "check that the endpoint is up and reachable from this host"
            }
            UfsErrorKind::Stale => {
                "the object changed in the UFS; it is re-read after `strata fs sync`"
            }
            UfsErrorKind::AlreadyExists => "choose another path or remove the existing one",
            UfsErrorKind::InvalidUri => {
                "use file:///abs/dir or s3://bucket[/prefix]?endpoint=http://host:port&region=..."
            }
            UfsErrorKind::Unsupported => "this under storage does not support the operation",
            UfsErrorKind::Other => "see the message; retry if the store was busy",
        }
    }
}

impl fmt::Display for UfsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} ({})", self.target, self.message, self.hint())
    }
}
