//! Registration and heartbeats: capacity and usage, never block lists.

use std::sync::Arc;
use std::time::Duration;

use strata_proto::pb::{self, master_client::MasterClient};
use tokio::sync::watch;

use crate::Shared;

pub async fn run(
    id: u64,
    data_addr: String,
    channel: tonic::transport::Channel,
    shared: Arc<Shared>,
    interval_ms: u64,
    mut stop: watch::Receiver<bool>,
) {
    let mut client = MasterClient::new(channel);
    let mut registered = false;
    let mut warned = false;
    loop {
        let stats = shared.stats();
        let res = if registered {
            client
                .heartbeat(pb::HeartbeatRequest {
                    worker_id: id,
                    stats: Some(stats),
                })
                .await
                .map(|r| !r.into_inner().reregister)
        } else {
            client
                .register_worker(pb::RegisterWorkerRequest {
                    worker_id: id,
                    data_addr: data_addr.clone(),
                    capacity_bytes: stats.capacity_bytes,
                    used_bytes: stats.used_bytes,
                    hostname: std::env::var("HOSTNAME").unwrap_or_default(),
                })
                .await
                .map(|_| true)
        };
        match res {
            Ok(ok) => {
                registered = ok;
                warned = false;
                if !ok {
                    continue;
                }
            }
            Err(s) => {
                registered = false;
                if !warned {
                    tracing::warn!(worker = id, error = %s.message(), "cannot reach the master; retrying");
                    warned = true;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(interval_ms)) => {}
            _ = crate::stopped(&mut stop) => return,
        }
    }
}
