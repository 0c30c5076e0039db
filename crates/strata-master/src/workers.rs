//! Worker membership: soft state rebuilt from registrations and heartbeats
//! (a restarted master learns every worker within one heartbeat).

use std::collections::HashMap;
use std::sync::Mutex;

use strata_common::{WorkerId, now_ms};
use strata_proto::pb;

struct Entry {
    data_addr: String,
    hostname: String,
    stats: pb::WorkerStats,
    last_ms: i64,
}

pub struct Membership {
    workers: Mutex<HashMap<WorkerId, Entry>>,
    timeout_ms: i64,
}

impl Membership {
    pub fn new(timeout_ms: u64) -> Self {
        Membership {
            workers: Mutex::new(HashMap::new()),
            timeout_ms: timeout_ms as i64,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<WorkerId, Entry>> {
        // A poisoned lock only means a panic elsewhere; the map is still valid.
        self.workers.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn register(&self, r: &pb::RegisterWorkerRequest) {
        let stats = pb::WorkerStats {
            capacity_bytes: r.capacity_bytes,
            used_bytes: r.used_bytes,
            ..Default::default()
        };
        self.lock().insert(
            r.worker_id,
            Entry {
                data_addr: r.data_addr.clone(),
                hostname: r.hostname.clone(),
                stats,
                last_ms: now_ms(),
            },
        );
        tracing::info!(worker = r.worker_id, addr = %r.data_addr, "worker registered");
    }

    /// Returns false when the worker is unknown (it must register).
    pub fn heartbeat(&self, id: WorkerId, stats: Option<pb::WorkerStats>) -> bool {
        let mut w = self.lock();
        match w.get_mut(&id) {
            Some(e) => {
                if let Some(s) = stats {
                    e.stats = s;
                }
                e.last_ms = now_ms();
                true
            }
            None => false,
        }
    }

    pub fn list(&self) -> Vec<pb::WorkerInfo> {
        let now = now_ms();
        let mut out: Vec<_> = self
            .lock()
            .iter()
            .map(|(id, e)| pb::WorkerInfo {
                worker_id: *id,
                data_addr: e.data_addr.clone(),
                hostname: e.hostname.clone(),
                stats: Some(e.stats.clone()),
                last_heartbeat_ms: e.last_ms,
                live: now - e.last_ms <= self.timeout_ms,
            })
            .collect();
        out.sort_by_key(|w| w.worker_id);
        out
    }
}
