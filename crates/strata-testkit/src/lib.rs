//! Test and benchmark utilities: a real S3-compatible server (s3s-fs) on
//! loopback, and a harness that runs `strata` processes on ephemeral ports
//! and temp dirs and cleans everything up on drop. Not used by production
//! code.

pub mod cluster;
pub mod s3;

pub use cluster::{Cluster, ClusterOptions};
pub use s3::S3Server;
