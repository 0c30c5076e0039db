//! The gRPC face of the master: decode, call [`Namespace`], map errors once.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use strata_common::NsPath;
use strata_proto::pb::{self, master_server::Master};
use tonic::{Request, Response, Status};

use crate::namespace::{Namespace, REQUEST_ID};
use crate::raft;

// A call retried with the same request id (after a timeout or a failover)
// is applied once and answered with the first application's result.
use strata_proto::masters::{READ_HEADER, REQUEST_ID_HEADER};

fn request_id<T>(r: &Request<T>) -> Option<u128> {
    let v = r.metadata().get(REQUEST_ID_HEADER)?.to_str().ok()?;
    u128::from_str_radix(v, 16).ok()
}

pub struct MasterService {
    ns: Arc<Namespace>,
    /// Becomes true when the master shuts down (ends open streams).
    shutdown: tokio::sync::watch::Receiver<bool>,
    /// Request ids of membership changes this master completed lately: a
    /// retry of one (its answer was lost) is answered as a success.
    membership_done: std::sync::Mutex<std::collections::VecDeque<u128>>,
}

impl MasterService {
    pub fn new(ns: Arc<Namespace>, shutdown: tokio::sync::watch::Receiver<bool>) -> Self {
        MasterService {
            ns,
            shutdown,
            membership_done: Default::default(),
        }
    }
}

fn path(p: &str) -> Result<NsPath, Status> {
    NsPath::parse(p).map_err(|e| Status::invalid_argument(e.to_string()))
}

type R<T> = Result<Response<T>, Status>;

impl MasterService {
    /// Before a read: see [`raft::ReadIndex::read_barrier`].
    async fn read<T>(&self, r: &Request<T>) -> Result<(), Status> {
        let stale = r
            .metadata()
            .get(READ_HEADER)
            .is_some_and(|v| v.as_bytes() == b"stale");
        self.ns
            .reads
            .read_barrier(&self.ns.raft, stale)
            .await
            .map_err(Status::from)
    }

    /// Before a mutation: this master must be the ready leader. Returns the
    /// request id.
    async fn lead<T>(&self, r: &Request<T>) -> Result<Option<u128>, Status> {
        self.ns.reads.ensure_leader(&self.ns.raft).await?;
        Ok(request_id(r))
    }

    /// [`MasterService::lead`], and the output of the request if it was
    /// applied already.
    async fn write<T>(
        &self,
        r: &Request<T>,
    ) -> Result<(Option<u128>, Option<strata_meta::Output>), Status> {
        let rid = self.lead(r).await?;
        Ok((rid, self.replayed(rid)?))
    }

    async fn replayed_info(&self, out: strata_meta::Output) -> Result<pb::FileInfo, Status> {
        let id = out
            .inode
            .ok_or_else(|| Status::internal("replayed call recorded no inode"))?;
        Ok(self.ns.stat_inode(id).await?)
    }

    fn masters(&self) -> pb::MasterList {
        let m = self.ns.raft.metrics().borrow().clone();
        let voters: std::collections::BTreeSet<u64> =
            m.membership_config.membership().voter_ids().collect();
        let members = raft::members(&self.ns.raft);
        let leader_addr = m
            .current_leader
            .and_then(|l| members.get(&l).cloned())
            .unwrap_or_default();
        pb::MasterList {
            masters: members
                .iter()
                .map(|(id, addr)| pb::MasterInfo {
                    id: *id,
                    addr: addr.clone(),
                    role: if Some(*id) == m.current_leader {
                        "leader"
                    } else if voters.contains(id) {
                        "follower"
                    } else {
                        "learner"
                    }
                    .into(),
                })
                .collect(),
            leader_id: m.current_leader.unwrap_or(0),
            leader_addr,
            term: m.current_term,
            last_applied: m.last_applied.map(|l| l.index).unwrap_or(0),
            inodes: self.ns.store.inode_count().unwrap_or(0),
            lease_reads: self.ns.reads.lease_reads.load(Ordering::Relaxed),
            read_index_reads: self.ns.reads.read_index_reads.load(Ordering::Relaxed),
        }
    }

    fn membership_retry(&self, rid: Option<u128>) -> bool {
        rid.is_some_and(|id| {
            self.membership_done
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&id)
        })
    }

    fn membership_changed(&self, rid: Option<u128>) {
        if let Some(id) = rid {
            let mut d = self
                .membership_done
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if d.len() >= 64 {
                d.pop_front();
            }
            d.push_back(id);
        }
    }

    fn master_addrs(&self) -> Vec<String> {
        raft::members(&self.ns.raft).into_values().collect()
    }

    /// A failed membership change, mapped like any failed write.
    fn raft_err(&self, e: WriteError) -> Status {
        Status::from(raft::write_error(&self.ns.reads, &self.ns.raft, e))
    }

    /// A membership change (it appends to the log), with every follower
    /// read lease withdrawn first: see [`raft::with_leases_withdrawn`].
    async fn change_members<T: Send + 'static>(
        &self,
        change: impl std::future::Future<Output = Result<T, WriteError>> + Send + 'static,
    ) -> Result<T, Status> {
        raft::with_leases_withdrawn(&self.ns.reads, change)
            .await?
            .map_err(|e| self.raft_err(e))
    }
}

/// How openraft reports a failed write (or membership change).
type WriteError =
    openraft::error::RaftError<u64, openraft::error::ClientWriteError<u64, openraft::BasicNode>>;

/// Most mutations one `Mutate` call may carry.
const MAX_BATCH_MUTATIONS: usize = 1024;

// Each namespace mutation, as a single call and as a member of a `Mutate`
// batch applies it (the caller has checked that this master leads).
impl MasterService {
    /// The output of request `rid` if it was applied already.
    fn replayed(&self, rid: Option<u128>) -> Result<Option<strata_meta::Output>, Status> {
        match rid {
            Some(id) => Ok(self.ns.replayed(id)?),
            None => Ok(None),
        }
    }

    async fn mkdir(&self, rid: Option<u128>, r: pb::MkdirRequest) -> Result<pb::FileInfo, Status> {
        if let Some(out) = self.replayed(rid)? {
            return self.replayed_info(out).await;
        }
        let p = path(&r.path)?;
        Ok(REQUEST_ID
            .scope(rid, self.ns.mkdir(&p, r.recursive))
            .await?)
    }

    async fn create(
        &self,
        rid: Option<u128>,
        r: pb::CreateFileRequest,
    ) -> Result<pb::FileInfo, Status> {
        if let Some(out) = self.replayed(rid)? {
            return self.replayed_info(out).await;
        }
        let p = path(&r.path)?;
        let wt = pb::WriteType::try_from(r.write_type).unwrap_or(pb::WriteType::MustCache);
        Ok(REQUEST_ID
            .scope(
                rid,
                self.ns
                    .create_file(&p, wt, r.overwrite, r.recursive, r.complete_empty),
            )
            .await?)
    }

    async fn complete(
        &self,
        rid: Option<u128>,
        r: pb::CompleteFileRequest,
    ) -> Result<pb::FileInfo, Status> {
        if let Some(out) = self.replayed(rid)? {
            return self.replayed_info(out).await;
        }
        Ok(REQUEST_ID.scope(rid, self.ns.complete_file(r)).await?)
    }

    async fn remove(
        &self,
        rid: Option<u128>,
        r: pb::DeleteRequest,
    ) -> Result<pb::DeleteResponse, Status> {
        if let Some(out) = self.replayed(rid)? {
            return Ok(Namespace::delete_response(&out.removed));
        }
        if r.unfinished_id != 0 {
            return Ok(REQUEST_ID
                .scope(rid, self.ns.delete_unfinished(r.unfinished_id))
                .await?);
        }
        let p = path(&r.path)?;
        Ok(REQUEST_ID
            .scope(rid, self.ns.delete(&p, r.recursive))
            .await?)
    }

    async fn move_path(&self, rid: Option<u128>, r: pb::RenameRequest) -> Result<(), Status> {
        if self.replayed(rid)?.is_none() {
            let (src, dst) = (path(&r.src)?, path(&r.dst)?);
            REQUEST_ID.scope(rid, self.ns.rename(&src, &dst)).await?;
        }
        Ok(())
    }

    /// One member of a `Mutate` batch.
    async fn mutation(&self, m: pb::Mutation) -> Result<pb::MutationResult, Status> {
        use pb::mutation::Op;
        let rid = strata_proto::masters::request_id_from_bytes(&m.request_id)
            .map_err(Status::invalid_argument)?;
        let mut out = pb::MutationResult::default();
        match m.op {
            Some(Op::Mkdir(r)) => out.info = Some(self.mkdir(rid, r).await?),
            Some(Op::CreateFile(r)) => out.info = Some(self.create(rid, r).await?),
            Some(Op::CompleteFile(r)) => out.info = Some(self.complete(rid, r).await?),
            Some(Op::Delete(r)) => out.deleted = Some(self.remove(rid, r).await?),
            Some(Op::Rename(r)) => self.move_path(rid, r).await?,
            None => {
                return Err(Status::invalid_argument(
                    "a mutation without an operation (a newer client?)",
                ));
            }
        }
        Ok(out)
    }
}

/// Most paths one GetFileInfos call (or one StatStream batch) may carry.
const MAX_BATCH_PATHS: usize = 1024;
/// Batches of one StatStream answered at once.
const STAT_STREAM_DEPTH: usize = 32;
/// A StatStream with no batch for this long is ended by the master.
const STAT_STREAM_IDLE: std::time::Duration = std::time::Duration::from_secs(30);

/// Each path's stat, or the error a single GetFileInfo would have given.
async fn stat_paths(ns: &Namespace, paths: &[String]) -> Result<Vec<pb::FileInfoResult>, Status> {
    if paths.len() > MAX_BATCH_PATHS {
        return Err(Status::invalid_argument(format!(
            "{} paths in one stat batch; at most {MAX_BATCH_PATHS}",
            paths.len()
        )));
    }
    let mut results = Vec::with_capacity(paths.len());
    for p in paths {
        let r = match path(p) {
            Ok(p) => ns.stat(&p).await.map_err(Status::from),
            Err(e) => Err(e),
        };
        results.push(match r {
            Ok(info) => pb::FileInfoResult {
                info: Some(info),
                code: 0,
                message: String::new(),
            },
            Err(s) => pb::FileInfoResult {
                info: None,
                code: s.code() as i32,
                message: s.message().to_string(),
            },
        });
    }
    Ok(results)
}

/// One StatStream batch: its read barrier, then its stats.
async fn stat_batch(ns: &Namespace, b: pb::StatBatch) -> pb::StatBatchReply {
    let r = match ns.reads.read_barrier(&ns.raft, b.stale).await {
        Ok(()) => stat_paths(ns, &b.paths).await,
        Err(e) => Err(Status::from(e)),
    };
    match r {
        Ok(results) => pb::StatBatchReply {
            seq: b.seq,
            results,
            ..Default::default()
        },
        Err(s) => pb::StatBatchReply {
            seq: b.seq,
            results: Vec::new(),
            code: s.code() as i32,
            message: s.message().to_string(),
            leader: s
                .metadata()
                .get(crate::LEADER_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string(),
        },
    }
}

#[tonic::async_trait]
impl Master for MasterService {
    async fn get_file_info(&self, req: Request<pb::PathRequest>) -> R<pb::FileInfo> {
        self.read(&req).await?;
        let p = path(&req.get_ref().path)?;
        Ok(Response::new(self.ns.stat(&p).await?))
    }

    async fn get_file_infos(&self, req: Request<pb::PathsRequest>) -> R<pb::FileInfosResponse> {
        self.read(&req).await?;
        let results = stat_paths(&self.ns, &req.get_ref().paths).await?;
        Ok(Response::new(pb::FileInfosResponse { results }))
    }

    type StatStreamStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::StatBatchReply, Status>> + Send>>;

    async fn stat_stream(
        &self,
        req: Request<tonic::Streaming<pb::StatBatch>>,
    ) -> R<Self::StatStreamStream> {
        use futures::StreamExt;
        let mut batches = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(STAT_STREAM_DEPTH);
        let ns = self.ns.clone();
        let mut shutdown = self.shutdown.clone();
        // Batches are answered concurrently (each after its own read
        // barrier), at most STAT_STREAM_DEPTH at a time per stream. The
        // stream ends when the client ends it, when this master shuts down
        // (an open stream must not hold up its graceful shutdown) and after
        // STAT_STREAM_IDLE without a batch (a client that went quiet); the
        // batches already taken are answered first.
        tokio::spawn(async move {
            let depth = Arc::new(tokio::sync::Semaphore::new(STAT_STREAM_DEPTH));
            loop {
                let stopping = async {
                    // A dropped sender is no signal: wait on.
                    if shutdown.wait_for(|v| *v).await.is_err() {
                        std::future::pending::<()>().await;
                    }
                };
                let next = tokio::select! {
                    _ = stopping => break,
                    n = tokio::time::timeout(STAT_STREAM_IDLE, batches.next()) => n,
                };
                let Ok(Some(Ok(b))) = next else { break };
                let Ok(permit) = depth.clone().acquire_owned().await else {
                    break;
                };
                let (ns, tx) = (ns.clone(), tx.clone());
                tokio::spawn(async move {
                    let _ = tx.send(Ok(stat_batch(&ns, b).await)).await;
                    drop(permit);
                });
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn list_status(&self, req: Request<pb::PathRequest>) -> R<pb::ListResponse> {
        self.read(&req).await?;
        let p = path(&req.get_ref().path)?;
        Ok(Response::new(pb::ListResponse {
            entries: self.ns.list(&p).await?,
        }))
    }

    async fn list_page(&self, req: Request<pb::ListPageRequest>) -> R<pb::ListResponse> {
        self.read(&req).await?;
        let r = req.get_ref();
        let p = path(&r.path)?;
        let limit = match r.limit {
            0 => 1000,
            n => n.min(10_000) as usize,
        };
        Ok(Response::new(pb::ListResponse {
            entries: self.ns.list_page(&p, &r.start_after, limit).await?,
        }))
    }

    async fn create_directory(&self, req: Request<pb::MkdirRequest>) -> R<pb::FileInfo> {
        let rid = self.lead(&req).await?;
        Ok(Response::new(self.mkdir(rid, req.into_inner()).await?))
    }

    async fn create_file(&self, req: Request<pb::CreateFileRequest>) -> R<pb::FileInfo> {
        let rid = self.lead(&req).await?;
        Ok(Response::new(self.create(rid, req.into_inner()).await?))
    }

    async fn complete_file(&self, req: Request<pb::CompleteFileRequest>) -> R<pb::FileInfo> {
        let rid = self.lead(&req).await?;
        Ok(Response::new(self.complete(rid, req.into_inner()).await?))
    }

    async fn delete(&self, req: Request<pb::DeleteRequest>) -> R<pb::DeleteResponse> {
        let rid = self.lead(&req).await?;
        Ok(Response::new(self.remove(rid, req.into_inner()).await?))
    }

    async fn rename(&self, req: Request<pb::RenameRequest>) -> R<pb::Empty> {
        let rid = self.lead(&req).await?;
        self.move_path(rid, req.into_inner()).await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn mutate(&self, req: Request<pb::MutationBatch>) -> R<pb::MutationBatchReply> {
        let batch = req.into_inner().mutations;
        if batch.len() > MAX_BATCH_MUTATIONS {
            return Err(Status::invalid_argument(format!(
                "{} mutations in one batch; at most {MAX_BATCH_MUTATIONS}",
                batch.len()
            )));
        }
        self.ns.reads.ensure_leader(&self.ns.raft).await?;
        // All at once, so that their commands share Raft rounds.
        let done = futures::future::join_all(batch.into_iter().map(|m| self.mutation(m))).await;
        let mut results = Vec::with_capacity(done.len());
        for r in done {
            results.push(match r {
                Ok(r) => r,
                // Leadership lost midway: the whole batch goes to the new
                // leader (each mutation's request id makes that safe).
                Err(s) if strata_proto::masters::is_failover(&s) => return Err(s),
                Err(s) => pb::MutationResult {
                    code: s.code() as i32,
                    message: s.message().to_string(),
                    ..Default::default()
                },
            });
        }
        Ok(Response::new(pb::MutationBatchReply { results }))
    }

    async fn mount(&self, req: Request<pb::MountRequest>) -> R<pb::MountInfo> {
        let (rid, replayed) = self.write(&req).await?;
        if let Some(out) = replayed {
            let inode = out.inode.unwrap_or(0);
            return Ok(Response::new(self.ns.mount_by_inode(inode)?));
        }
        let info = REQUEST_ID
            .scope(rid, self.ns.mount(req.into_inner()))
            .await?;
        Ok(Response::new(info))
    }

    async fn unmount(&self, req: Request<pb::PathRequest>) -> R<pb::Empty> {
        let (rid, replayed) = self.write(&req).await?;
        if replayed.is_none() {
            let p = path(&req.get_ref().path)?;
            REQUEST_ID.scope(rid, self.ns.unmount(&p)).await?;
        }
        Ok(Response::new(pb::Empty {}))
    }

    async fn list_mounts(&self, req: Request<pb::Empty>) -> R<pb::MountList> {
        self.read(&req).await?;
        Ok(Response::new(pb::MountList {
            mounts: self.ns.mounts()?,
        }))
    }

    async fn get_mount(&self, req: Request<pb::MountIdRequest>) -> R<pb::MountInfo> {
        self.read(&req).await?;
        Ok(Response::new(self.ns.mount_by_id(req.get_ref().id)?))
    }

    async fn sync(&self, req: Request<pb::PathRequest>) -> R<pb::SyncResponse> {
        self.ns.reads.ensure_leader(&self.ns.raft).await?;
        let p = path(&req.get_ref().path)?;
        Ok(Response::new(self.ns.sync(&p).await?))
    }

    async fn namespace_version(&self, req: Request<pb::Empty>) -> R<pb::VersionResponse> {
        self.read(&req).await?;
        Ok(Response::new(pb::VersionResponse {
            version: self.ns.version()?,
        }))
    }

    async fn register_worker(
        &self,
        req: Request<pb::RegisterWorkerRequest>,
    ) -> R<pb::RegisterWorkerResponse> {
        self.ns.membership.register(req.get_ref());
        Ok(Response::new(pb::RegisterWorkerResponse {
            heartbeat_interval_ms: 1000,
            masters: self.master_addrs(),
        }))
    }

    async fn heartbeat(&self, req: Request<pb::HeartbeatRequest>) -> R<pb::HeartbeatResponse> {
        let r = req.into_inner();
        let known = self.ns.membership.heartbeat(r.worker_id, r.stats);
        let leader = self.ns.raft.metrics().borrow().state == openraft::ServerState::Leader;
        Ok(Response::new(pb::HeartbeatResponse {
            reregister: !known,
            masters: self.master_addrs(),
            leader,
        }))
    }

    async fn list_workers(&self, _req: Request<pb::Empty>) -> R<pb::WorkerList> {
        Ok(Response::new(pb::WorkerList {
            workers: self.ns.membership.list(),
        }))
    }

    async fn list_masters(&self, _req: Request<pb::Empty>) -> R<pb::MasterList> {
        Ok(Response::new(self.masters()))
    }

    async fn add_master(&self, req: Request<pb::AddMasterRequest>) -> R<pb::MasterList> {
        let rid = self.lead(&req).await?;
        if self.membership_retry(rid) {
            return Ok(Response::new(self.masters()));
        }
        let r = req.into_inner();
        if r.id == 0 || r.addr.is_empty() {
            return Err(Status::invalid_argument(
                "a master needs an id (1 or more) and an address HOST:PORT",
            ));
        }
        let is_voter = |id: u64| {
            self.ns
                .raft
                .metrics()
                .borrow()
                .membership_config
                .membership()
                .voter_ids()
                .any(|v| v == id)
        };
        match raft::members(&self.ns.raft).get(&r.id) {
            // A retried call (its first attempt's answer was lost): the
            // same master at the same address is not an error.
            Some(a) if *a == r.addr && is_voter(r.id) => {
                return Ok(Response::new(self.masters()));
            }
            Some(a) if *a == r.addr => {}
            Some(a) => {
                return Err(Status::already_exists(format!(
                    "master id {} is already a member (at {a}); ids are never reused",
                    r.id
                )));
            }
            None => {
                // As a learner first: it receives the log (or a snapshot)
                // and only counts towards the quorum once it has caught up.
                let (raft, node, id) = (
                    self.ns.raft.clone(),
                    openraft::BasicNode::new(&r.addr),
                    r.id,
                );
                self.change_members(async move { raft.add_learner(id, node, true).await })
                    .await?;
            }
        }
        let (raft, id) = (self.ns.raft.clone(), r.id);
        self.change_members(async move {
            raft.change_membership(openraft::ChangeMembers::AddVoterIds([id].into()), false)
                .await
        })
        .await?;
        tracing::info!(id = r.id, addr = %r.addr, "master added");
        self.membership_changed(rid);
        Ok(Response::new(self.masters()))
    }

    async fn remove_master(&self, req: Request<pb::RemoveMasterRequest>) -> R<pb::MasterList> {
        let rid = self.lead(&req).await?;
        if self.membership_retry(rid) {
            return Ok(Response::new(self.masters()));
        }
        let id = req.get_ref().id;
        let members = raft::members(&self.ns.raft);
        if !members.contains_key(&id) {
            return Err(Status::not_found(format!(
                "master id {id} is not a member (members: {members:?})"
            )));
        }
        if members.len() == 1 {
            return Err(Status::failed_precondition(
                "cannot remove the last master; add its replacement first",
            ));
        }
        let raft = self.ns.raft.clone();
        self.change_members(async move {
            raft.change_membership(openraft::ChangeMembers::RemoveVoters([id].into()), false)
                .await
        })
        .await?;
        tracing::info!(id, "master removed");
        self.membership_changed(rid);
        Ok(Response::new(self.masters()))
    }

    async fn submit_job(&self, req: Request<pb::SubmitJobRequest>) -> R<pb::JobInfo> {
        let (rid, replayed) = self.write(&req).await?;
        if let Some(out) = replayed {
            let id = out
                .job
                .ok_or_else(|| Status::internal("replayed call recorded no job"))?;
            return Ok(Response::new(self.ns.job_info(id)?));
        }
        let info = REQUEST_ID
            .scope(rid, self.ns.submit_job(req.into_inner()))
            .await?;
        Ok(Response::new(info))
    }

    async fn get_job(&self, req: Request<pb::JobIdRequest>) -> R<pb::JobInfo> {
        self.read(&req).await?;
        Ok(Response::new(self.ns.job_info(req.get_ref().id)?))
    }

    async fn list_jobs(&self, req: Request<pb::Empty>) -> R<pb::JobList> {
        self.read(&req).await?;
        Ok(Response::new(pb::JobList {
            jobs: self.ns.list_jobs()?,
        }))
    }

    async fn cancel_job(&self, req: Request<pb::JobIdRequest>) -> R<pb::JobInfo> {
        let (rid, replayed) = self.write(&req).await?;
        let id = req.get_ref().id;
        if replayed.is_none() {
            REQUEST_ID.scope(rid, self.ns.cancel_job(id)).await?;
        }
        Ok(Response::new(self.ns.job_info(id)?))
    }

    async fn set_attributes(&self, req: Request<pb::SetAttributesRequest>) -> R<pb::FileInfo> {
        let (rid, replayed) = self.write(&req).await?;
        if let Some(out) = replayed {
            return Ok(Response::new(self.replayed_info(out).await?));
        }
        let info = REQUEST_ID
            .scope(rid, self.ns.set_attributes(req.into_inner()))
            .await?;
        Ok(Response::new(info))
    }
}
