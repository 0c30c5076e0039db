//! Test and benchmark utilities: a real S3-compatible server (s3s-fs) on
//! loopback, a latency-injecting TCP proxy that makes it look remote, and a harness that runs `strata` processes on ephemeral ports
//! and temp dirs and cleans everything up on drop. Not used by production
//! code.

pub mod cluster;
mod fast_fs;
pub mod ha;
pub mod proxy;
pub mod s3;

pub use cluster::{Cluster, ClusterOptions};
pub use ha::HaCluster;
pub use proxy::{LatencyProxy, ProxyOptions};
pub use s3::S3Server;
