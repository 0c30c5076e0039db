//! Shared vocabulary: namespace paths, cache identities, block/page geometry,
//! rendezvous placement and configuration. It knows nothing about networking,
//! storage engines or processes.

pub mod config;
pub mod geometry;
pub mod ids;
pub mod path;
pub mod placement;
pub mod size;
pub mod xattr;

pub use config::Config;
pub use geometry::Geometry;
pub use ids::{CacheId, InodeId, WorkerId};
pub use path::NsPath;

/// Errors from the shared vocabulary: bad paths, bad sizes, bad configuration.
#[derive(Debug, thiserror::Error)]
pub enum CommonError {
    #[error("invalid path {path:?}: {reason}")]
    InvalidPath { path: String, reason: &'static str },
    #[error(
        "invalid size {value:?}: {reason} (use a number with an optional unit, e.g. 64MiB, 10GiB)"
    )]
    InvalidSize { value: String, reason: &'static str },
    #[error("configuration {origin}: {msg}")]
    Config { origin: String, msg: String },
}

/// Milliseconds since the Unix epoch; the one clock every component stamps with.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
