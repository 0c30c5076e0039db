//! The gRPC face of the master: decode, call [`Namespace`], map errors once.

use std::sync::Arc;

use strata_common::NsPath;
use strata_proto::pb::{self, master_server::Master};
use tonic::{Request, Response, Status};

use crate::namespace::Namespace;

pub struct MasterService {
    ns: Arc<Namespace>,
}

impl MasterService {
    pub fn new(ns: Arc<Namespace>) -> Self {
        MasterService { ns }
    }
}

fn path(p: &str) -> Result<NsPath, Status> {
    NsPath::parse(p).map_err(|e| Status::invalid_argument(e.to_string()))
}

type R<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl Master for MasterService {
    async fn get_file_info(&self, req: Request<pb::PathRequest>) -> R<pb::FileInfo> {
        let p = path(&req.get_ref().path)?;
        Ok(Response::new(self.ns.stat(&p).await?))
    }

    async fn list_status(&self, req: Request<pb::PathRequest>) -> R<pb::ListResponse> {
        let p = path(&req.get_ref().path)?;
        Ok(Response::new(pb::ListResponse {
            entries: self.ns.list(&p).await?,
        }))
    }

    async fn create_directory(&self, req: Request<pb::MkdirRequest>) -> R<pb::FileInfo> {
        let r = req.into_inner();
        let p = path(&r.path)?;
        Ok(Response::new(self.ns.mkdir(&p, r.recursive).await?))
    }

    async fn create_file(&self, req: Request<pb::CreateFileRequest>) -> R<pb::FileInfo> {
        let r = req.into_inner();
        let p = path(&r.path)?;
        let wt = pb::WriteType::try_from(r.write_type).unwrap_or(pb::WriteType::MustCache);
        Ok(Response::new(
            self.ns
                .create_file(&p, wt, r.overwrite, r.recursive)
                .await?,
        ))
    }

    async fn complete_file(&self, req: Request<pb::CompleteFileRequest>) -> R<pb::FileInfo> {
        Ok(Response::new(
            self.ns.complete_file(req.into_inner()).await?,
        ))
    }

    async fn delete(&self, req: Request<pb::DeleteRequest>) -> R<pb::DeleteResponse> {
        let r = req.into_inner();
        let p = path(&r.path)?;
        Ok(Response::new(self.ns.delete(&p, r.recursive).await?))
    }

    async fn rename(&self, req: Request<pb::RenameRequest>) -> R<pb::Empty> {
        let r = req.into_inner();
        self.ns.rename(&path(&r.src)?, &path(&r.dst)?).await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn mount(&self, req: Request<pb::MountRequest>) -> R<pb::MountInfo> {
        Ok(Response::new(self.ns.mount(req.into_inner()).await?))
    }

    async fn unmount(&self, req: Request<pb::PathRequest>) -> R<pb::Empty> {
        self.ns.unmount(&path(&req.get_ref().path)?).await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn list_mounts(&self, _req: Request<pb::Empty>) -> R<pb::MountList> {
        Ok(Response::new(pb::MountList {
            mounts: self.ns.mounts()?,
        }))
    }

    async fn get_mount(&self, req: Request<pb::MountIdRequest>) -> R<pb::MountInfo> {
        Ok(Response::new(self.ns.mount_by_id(req.get_ref().id)?))
    }

    async fn sync(&self, req: Request<pb::PathRequest>) -> R<pb::SyncResponse> {
        let p = path(&req.get_ref().path)?;
        Ok(Response::new(self.ns.sync(&p).await?))
    }

    async fn namespace_version(&self, _req: Request<pb::Empty>) -> R<pb::VersionResponse> {
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
        }))
    }

    async fn heartbeat(&self, req: Request<pb::HeartbeatRequest>) -> R<pb::HeartbeatResponse> {
        let r = req.into_inner();
        let known = self.ns.membership.heartbeat(r.worker_id, r.stats);
        Ok(Response::new(pb::HeartbeatResponse { reregister: !known }))
    }

    async fn list_workers(&self, _req: Request<pb::Empty>) -> R<pb::WorkerList> {
        Ok(Response::new(pb::WorkerList {
            workers: self.ns.membership.list(),
        }))
    }
}
