//! Wire formats: the gRPC control plane (generated from `proto/strata.proto`)
//! and the dedicated binary data protocol ([`data`]). It owns encoding and
//! decoding only; it knows nothing of namespaces, caches or storage.

pub mod data;
pub mod masters;

#[allow(clippy::all)]
pub mod pb {
    tonic::include_proto!("strata.v1");
}
