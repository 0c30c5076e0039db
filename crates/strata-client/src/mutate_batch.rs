//! Namespace mutations (mkdir, create, complete, delete, rename) of
//! concurrent callers travel together ([`crate::batch`]) as `Mutate` calls
//! to the leader, which applies a batch's mutations at once so that they
//! share Raft rounds. Each mutation keeps its own request id, so a batch
//! retried through a failover applies each one once. A master without
//! `Mutate` (an older version) gets one call per mutation.

use std::sync::atomic::{AtomicBool, Ordering};

use pb::mutation::Op;

use crate::batch::Queue;
use crate::{Client, ClientError, FileInfo, Result, pb};

/// Batches in flight at once (and so tasks sending them).
const MAX_DRIVERS: usize = 8;
/// Most mutations in one call (the master accepts up to 1024).
const MAX_BATCH: usize = 512;

#[derive(Default)]
pub(crate) struct MutationBatcher {
    queue: Queue<pb::Mutation, pb::MutationResult>,
    /// The leader does not know `Mutate`: one call per mutation.
    unsupported: AtomicBool,
}

impl Client {
    /// Applies one namespace mutation on the leader (with a request id of
    /// its own), in a batch with those of concurrent callers.
    pub(crate) async fn mutate(&self, op: Op) -> Result<pb::MutationResult> {
        let m = pb::Mutation {
            request_id: strata_proto::masters::request_id_bytes(self.inner.masters.request_id()),
            op: Some(op),
        };
        let b = &self.inner.mutations;
        if b.unsupported.load(Ordering::Relaxed) {
            return self.mutate_one(m).await;
        }
        let (rx, start) = b.queue.push(m, MAX_DRIVERS);
        if start {
            let c = self.clone();
            tokio::spawn(async move { c.drive_mutations().await });
        }
        crate::batch::answer(rx, "namespace change").await
    }

    /// [`Client::mutate`] for the mutations that answer with file info.
    pub(crate) async fn mutate_info(&self, op: Op) -> Result<FileInfo> {
        self.mutate(op).await?.info.ok_or_else(|| {
            ClientError::Other("the master's answer to a change carried no file info".into())
        })
    }

    async fn drive_mutations(&self) {
        let b = &self.inner.mutations;
        let mut driver = b.queue.driver();
        while let Some(batch) = driver.next(MAX_BATCH) {
            if b.unsupported.load(Ordering::Relaxed) {
                self.mutate_each(batch).await;
                continue;
            }
            let mutations: Vec<pb::Mutation> = batch.iter().map(|(m, _)| m.clone()).collect();
            let set = &self.inner.masters;
            let r = set
                .call(true, |mut c| {
                    let req = pb::MutationBatch {
                        mutations: mutations.clone(),
                    };
                    async move { c.mutate(req).await }
                })
                .await;
            match r {
                Ok(r) if r.results.len() == batch.len() => {
                    let leader = set
                        .leader()
                        .unwrap_or_else(|| self.inner.master_addr.clone());
                    for ((_, tx), r) in batch.into_iter().zip(r.results) {
                        let _ = tx.send(if r.code == 0 {
                            Ok(r)
                        } else {
                            Err(ClientError::from_status(
                                tonic::Status::new(tonic::Code::from(r.code), r.message),
                                &leader,
                            ))
                        });
                    }
                }
                Ok(r) => {
                    let e = format!(
                        "the master answered {} of {} namespace changes",
                        r.results.len(),
                        batch.len()
                    );
                    for (_, tx) in batch {
                        let _ = tx.send(Err(ClientError::Other(e.clone())));
                    }
                }
                Err(e) if e.status.code() == tonic::Code::Unimplemented => {
                    tracing::info!(master = %e.addr, "the leader has no Mutate call: one call per change");
                    b.unsupported.store(true, Ordering::Relaxed);
                    self.mutate_each(batch).await;
                }
                Err(e) => {
                    for (_, tx) in batch {
                        let _ = tx.send(Err(ClientError::from_status(e.status.clone(), &e.addr)));
                    }
                }
            }
        }
    }

    /// Each mutation of `batch` as its own call, all at once.
    async fn mutate_each(
        &self,
        batch: Vec<crate::batch::Waiter<pb::Mutation, pb::MutationResult>>,
    ) {
        futures::future::join_all(batch.into_iter().map(|(m, tx)| async move {
            let _ = tx.send(self.mutate_one(m).await);
        }))
        .await;
    }

    /// One mutation as its own call, with its request id in the header.
    async fn mutate_one(&self, m: pb::Mutation) -> Result<pb::MutationResult> {
        let rid = strata_proto::masters::request_id_from_bytes(&m.request_id)
            .ok()
            .flatten()
            .unwrap_or_else(|| self.inner.masters.request_id());
        let mut out = pb::MutationResult::default();
        match m.op {
            Some(Op::Mkdir(r)) => {
                let call = |mut c: MasterClient, r| async move { c.create_directory(r).await };
                out.info = Some(self.master_write_as(rid, r, call).await?);
            }
            Some(Op::CreateFile(r)) => {
                let call = |mut c: MasterClient, r| async move { c.create_file(r).await };
                out.info = Some(self.master_write_as(rid, r, call).await?);
            }
            Some(Op::CompleteFile(r)) => {
                let call = |mut c: MasterClient, r| async move { c.complete_file(r).await };
                out.info = Some(self.master_write_as(rid, r, call).await?);
            }
            Some(Op::Delete(r)) => {
                let call = |mut c: MasterClient, r| async move { c.delete(r).await };
                out.deleted = Some(self.master_write_as(rid, r, call).await?);
            }
            Some(Op::Rename(r)) => {
                let call = |mut c: MasterClient, r| async move { c.rename(r).await };
                self.master_write_as(rid, r, call).await?;
            }
            None => {
                return Err(ClientError::Other(
                    "a namespace change without an operation".into(),
                ));
            }
        }
        Ok(out)
    }
}

type MasterClient = crate::MasterClient<tonic::transport::Channel>;
