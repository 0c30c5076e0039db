//! Registration and heartbeats: capacity and usage, never block lists.
//! Every master gets them, not only the leader, so a newly elected leader
//! already knows every live worker. The member list comes back in the
//! leader's replies; masters that join or leave are followed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use strata_proto::masters::MasterSet;
use strata_proto::pb;
use tokio::sync::watch;

use crate::Shared;

pub async fn run(
    id: u64,
    data_addr: String,
    masters: Arc<MasterSet>,
    shared: Arc<Shared>,
    interval_ms: u64,
    mut stop: watch::Receiver<bool>,
) {
    let mut beating: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
    loop {
        let want = masters.addrs();
        beating.retain(|addr, task| {
            let keep = want.contains(addr) && !task.is_finished();
            if !keep {
                task.abort();
            }
            keep
        });
        for addr in want {
            beating.entry(addr.clone()).or_insert_with(|| {
                tokio::spawn(beat(
                    addr,
                    id,
                    data_addr.clone(),
                    masters.clone(),
                    shared.clone(),
                    interval_ms,
                ))
            });
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(interval_ms)) => {}
            _ = crate::stopped(&mut stop) => {
                for (_, t) in beating {
                    t.abort();
                }
                return;
            }
        }
    }
}

/// Registers with one master and heartbeats it until aborted.
async fn beat(
    addr: String,
    id: u64,
    data_addr: String,
    masters: Arc<MasterSet>,
    shared: Arc<Shared>,
    interval_ms: u64,
) {
    let Some(mut client) = masters.client(&addr) else {
        tracing::warn!(%addr, "invalid master address; not heartbeating it");
        return;
    };
    let mut registered = false;
    let mut warned = false;
    loop {
        let stats = shared.stats();
        let res = if registered {
            let mut req = tonic::Request::new(pb::HeartbeatRequest {
                worker_id: id,
                stats: Some(stats),
            });
            req.set_timeout(Duration::from_millis(interval_ms.max(500) * 2));
            client.heartbeat(req).await.map(|r| {
                let r = r.into_inner();
                if r.leader {
                    masters.set_members(&r.masters);
                }
                !r.reregister
            })
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
                    tracing::warn!(worker = id, master = %addr, error = %s.message(), "cannot reach a master; retrying");
                    warned = true;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(interval_ms)).await;
    }
}
