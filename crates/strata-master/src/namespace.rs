//! Namespace operations: path resolution with lazy UFS sync, and every
//! user-visible metadata call, each turned into `strata_meta::Command`s.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use strata_common::{CacheId, Config, NsPath, now_ms};
use strata_meta::{
    Command, Inode, MetaError, MetaStore, MountEntry, PersistState, ROOT_ID, UfsEntry,
};
use strata_proto::pb;
use strata_ufs::{Ufs, UfsError, UfsErrorKind, UfsUri};

use crate::error::MasterError;
use crate::raft::{self, Raft, ReadIndex};
use crate::workers::Membership;

tokio::task_local! {
    /// The client's request id for the call being served: the command that
    /// completes the call is logged with it, so a retried call applies once.
    pub static REQUEST_ID: Option<u128>;
}

/// A resolved path: the inode and, when it lies under a mount, the mount and
/// the path relative to the mount's UFS root.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub path: NsPath,
    pub inode: Inode,
    pub mount: Option<MountEntry>,
    pub rel: String,
}

pub struct Namespace {
    pub(crate) store: Arc<MetaStore>,
    pub(crate) raft: Raft,
    pub(crate) reads: Arc<ReadIndex>,
    proposer: raft::Proposer,
    config: Config,
    ufs: Mutex<HashMap<u64, Ufs>>,
    /// Serialises check-then-apply sequences (one writer at a time).
    write_lock: tokio::sync::Mutex<()>,
    /// One UFS listing per directory at a time.
    sync_locks: Mutex<HashMap<u64, Arc<tokio::sync::Mutex<()>>>>,
    pub membership: Membership,
    /// Wakes the job runner (a job was submitted or cancelled).
    pub(crate) jobs_changed: Arc<tokio::sync::Notify>,
}

fn join_rel(rel: &str, name: &str) -> String {
    strata_ufs::join(rel, name)
}

impl Namespace {
    pub fn new(
        config: &Config,
        store: Arc<MetaStore>,
        raft: Raft,
        reads: Arc<ReadIndex>,
    ) -> Result<Self, MasterError> {
        Ok(Namespace {
            store,
            proposer: raft::Proposer::start(raft.clone(), reads.clone()),
            raft,
            reads,
            config: config.clone(),
            ufs: Mutex::new(HashMap::new()),
            write_lock: tokio::sync::Mutex::new(()),
            sync_locks: Mutex::new(HashMap::new()),
            membership: Membership::new(config.master.worker_timeout_ms),
            jobs_changed: Arc::new(tokio::sync::Notify::new()),
        })
    }

    /// Commits a command through Raft (a majority has it in its log) and
    /// returns what applying it produced on this master.
    async fn commit(
        &self,
        command: Command,
        request_id: Option<u128>,
    ) -> Result<strata_meta::Output, MasterError> {
        self.proposer
            .propose(raft::Item {
                command,
                request_id,
            })
            .await
    }

    /// A command on the way to completing a call (e.g. a UFS listing merged
    /// while resolving a path).
    pub(crate) async fn apply(&self, cmd: Command) -> Result<strata_meta::Output, MasterError> {
        self.commit(cmd, None).await
    }

    /// The command that completes the call: logged with the request id.
    pub(crate) async fn apply_final(
        &self,
        cmd: Command,
    ) -> Result<strata_meta::Output, MasterError> {
        let rid = REQUEST_ID.try_with(|r| *r).ok().flatten();
        self.commit(cmd, rid).await
    }

    /// What a request id's call produced, if it was applied already.
    pub fn replayed(&self, rid: u128) -> Result<Option<strata_meta::Output>, MasterError> {
        Ok(self.store.replayed(rid)?)
    }

    /// A file or directory's info by inode (to answer a replayed call).
    pub async fn stat_inode(&self, id: u64) -> Result<pb::FileInfo, MasterError> {
        let p = self.path_of(id)?;
        let info = self.stat(&p).await?;
        if info.id == id {
            return Ok(info);
        }
        // The new version of a file being rewritten: the name still shows
        // the old one.
        let (pr, _) = self.resolve_parent(&p).await?;
        let ino = self.store.inode(id)?.ok_or_else(|| MasterError::NotFound {
            path: format!("inode {id}"),
        })?;
        let r = self.child_resolved(&pr, ino)?;
        Ok(self.file_info(&r))
    }

    /// Removes an abandoned write: inode `id` if it is still an unfinished
    /// file, else nothing (it completed, or something else removed it). A
    /// writer that fails removes its own version this way, never what the
    /// path holds by then (another writer's file, or the old version of a
    /// file it was rewriting).
    pub async fn delete_unfinished(&self, id: u64) -> Result<pb::DeleteResponse, MasterError> {
        match self.store.inode(id)? {
            Some(i) if !i.is_dir && !i.complete => {}
            _ => return Ok(Self::delete_response(&[])),
        }
        match self.apply_final(Command::Delete { id }).await {
            Ok(out) => Ok(Self::delete_response(&out.removed)),
            Err(MasterError::Meta(MetaError::NoInode(_))) => Ok(Self::delete_response(&[])),
            Err(e) => Err(e),
        }
    }

    /// A mount's info by its mount point's inode (to answer a replayed call).
    pub fn mount_by_inode(&self, inode: u64) -> Result<pb::MountInfo, MasterError> {
        let m = self
            .store
            .mounts()?
            .into_iter()
            .find(|m| m.inode == inode)
            .ok_or_else(|| MasterError::Internal("mount row missing".into()))?;
        Ok(mount_info(&m, false))
    }

    /// The reply to a delete, from what it removed.
    pub fn delete_response(removed: &[Inode]) -> pb::DeleteResponse {
        let unpersisted = removed
            .iter()
            .filter(|i| !i.is_dir && i.persist != PersistState::Persisted)
            .map(|i| CacheId::for_inode(i.id, i.generation).to_hex())
            .collect();
        pb::DeleteResponse {
            inodes_removed: removed.len() as u64,
            unpersisted_cache_ids: unpersisted,
        }
    }

    fn ufs_for(&self, mount: &MountEntry) -> Result<Ufs, MasterError> {
        let mut map = self.ufs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(u) = map.get(&mount.id) {
            return Ok(u.clone());
        }
        let opts: BTreeMap<String, String> = mount.options.iter().cloned().collect();
        let uri = UfsUri::parse(&mount.ufs_uri, &opts).map_err(|err| MasterError::Ufs {
            path: mount.path.clone(),
            err,
        })?;
        let u = strata_ufs::open(&uri).map_err(|err| MasterError::Ufs {
            path: mount.path.clone(),
            err,
        })?;
        map.insert(mount.id, u.clone());
        Ok(u)
    }

    /// Replication bounds of an inode: its own, else the nearest directory
    /// above it that has them.
    fn replication_of(&self, i: &Inode, own: &strata_meta::Attrs) -> (u8, u8) {
        if own.replication_min > 0 || own.replication_max > 0 {
            return (own.replication_min, own.replication_max);
        }
        if !self.store.has_replication_attrs() {
            return (0, 0);
        }
        let mut id = i.parent;
        let mut cur = i.id;
        while cur != strata_meta::ROOT_ID {
            let a = self.store.attrs(id).unwrap_or_default();
            if a.replication_min > 0 || a.replication_max > 0 {
                return (a.replication_min, a.replication_max);
            }
            cur = id;
            id = match self.store.inode(id) {
                Ok(Some(p)) => p.parent,
                _ => break,
            };
        }
        (0, 0)
    }

    /// The UFS of a mount, by mount id.
    pub(crate) fn ufs_by_mount_id(&self, id: u64) -> Result<Ufs, MasterError> {
        let m = self.store.mount(id)?.ok_or_else(|| MasterError::Invalid {
            path: format!("mount {id}"),
            msg: "no such mount (unmounted meanwhile?)".into(),
        })?;
        self.ufs_for(&m)
    }

    fn mount_of(&self, ino: &Inode) -> Result<Option<MountEntry>, MasterError> {
        if ino.mount_id == 0 {
            return Ok(None);
        }
        Ok(self.store.mount(ino.mount_id)?)
    }

    fn needs_sync(&self, dir: &Inode, mount: &MountEntry) -> bool {
        match dir.synced_ms {
            None => true,
            Some(t) => match mount.sync_interval {
                -1 => false,
                0 => true,
                secs => now_ms() - t >= secs * 1000,
            },
        }
    }

    /// Lists `dir` from the UFS and merges it, if its listing is stale.
    async fn ensure_synced(
        &self,
        dir: &Inode,
        path: &NsPath,
        mount: &MountEntry,
        rel: &str,
        force: bool,
    ) -> Result<Inode, MasterError> {
        Ok(self.sync_dir(dir, path, mount, rel, force).await?.0)
    }

    /// Like `ensure_synced`, also returning how many entries changed.
    async fn sync_dir(
        &self,
        dir: &Inode,
        path: &NsPath,
        mount: &MountEntry,
        rel: &str,
        force: bool,
    ) -> Result<(Inode, u64), MasterError> {
        if !force && !self.needs_sync(dir, mount) {
            return Ok((dir.clone(), 0));
        }
        let lock = {
            let mut m = self.sync_locks.lock().unwrap_or_else(|p| p.into_inner());
            m.entry(dir.id).or_default().clone()
        };
        let started = now_ms();
        let _g = lock.lock().await;
        // Someone else may have synced while we waited.
        let current = self
            .store
            .inode(dir.id)?
            .ok_or_else(|| MasterError::NotFound {
                path: path.to_string(),
            })?;
        if let Some(t) = current.synced_ms
            && (t >= started || (!force && !self.needs_sync(&current, mount)))
        {
            return Ok((current, 0));
        }
        let ufs = self.ufs_for(mount)?;
        let listing = match ufs.list(rel).await {
            Ok(l) => l,
            Err(err) if current.synced_ms.is_some() && err.kind == UfsErrorKind::Unreachable => {
                // Serve the last good listing while the store is unreachable.
                tracing::warn!(%path, %err, "UFS unreachable; serving cached metadata");
                return Ok((current, 0));
            }
            Err(err) => {
                return Err(MasterError::Ufs {
                    path: path.to_string(),
                    err,
                });
            }
        };
        let entries = listing
            .into_iter()
            .map(|s| UfsEntry {
                name: s.name,
                is_dir: s.is_dir,
                size: s.size,
                mtime_ms: s.mtime_ms,
                fingerprint: s.fingerprint,
            })
            .collect();
        let _w = self.write_lock.lock().await;
        let out = self
            .apply(Command::SyncDir {
                dir: dir.id,
                synced_ms: now_ms(),
                entries,
            })
            .await?;
        let changed = out.changed + out.removed.len() as u64;
        Ok((self.store.inode(dir.id)?.unwrap_or(current), changed))
    }

    /// Resolves a path, listing directories from the UFS on the way as needed.
    pub async fn resolve(&self, path: &NsPath) -> Result<Resolved, MasterError> {
        // One read view for the walk; a new one after a directory is
        // re-listed from the UFS (which changes the store).
        let mut view = self.store.view()?;
        let mut cur = view
            .inode(ROOT_ID)?
            .ok_or_else(|| MasterError::Internal("root inode missing".into()))?;
        let mut cur_path = NsPath::root();
        let mut mount: Option<MountEntry> = None;
        let mut rel = String::new();
        for seg in path.segments() {
            if !cur.is_dir {
                return Err(MasterError::NotDir {
                    path: cur_path.to_string(),
                });
            }
            if let Some(m) = &mount
                && self.needs_sync(&cur, m)
            {
                drop(view);
                cur = self.ensure_synced(&cur, &cur_path, m, &rel, false).await?;
                view = self.store.view()?;
            }
            let child = view
                .lookup(cur.id, seg)?
                .ok_or_else(|| MasterError::NotFound {
                    path: path.to_string(),
                })?;
            cur_path = cur_path.join(seg)?;
            if child.is_mount_point {
                mount = self.mount_of(&child)?;
                rel = String::new();
            } else if mount.is_some() {
                rel = join_rel(&rel, seg);
            }
            cur = child;
        }
        Ok(Resolved {
            path: cur_path,
            inode: cur,
            mount,
            rel,
        })
    }

    async fn resolve_parent(&self, path: &NsPath) -> Result<(Resolved, String), MasterError> {
        let parent = path.parent().ok_or_else(|| MasterError::Invalid {
            path: path.to_string(),
            msg: "the root has no parent".into(),
        })?;
        let name = path.name().unwrap_or_default().to_string();
        let mut r = self.resolve(&parent).await?;
        if !r.inode.is_dir {
            return Err(MasterError::NotDir {
                path: parent.to_string(),
            });
        }
        if let Some(m) = &r.mount {
            r.inode = self
                .ensure_synced(&r.inode, &r.path, m, &r.rel, false)
                .await?;
        }
        Ok((r, name))
    }

    pub fn file_info(&self, r: &Resolved) -> pb::FileInfo {
        let i = &r.inode;
        let (block_size, page_size) = match &r.mount {
            Some(m) => (m.block_size, m.page_size),
            None => (
                self.config.master.block_size.0,
                self.config.master.page_size.0,
            ),
        };
        let attrs = self.store.attrs(i.id).unwrap_or_default();
        let cache_id = if i.is_dir {
            String::new()
        } else if i.persist == PersistState::Persisted
            && !i.fingerprint.is_empty()
            && !attrs.inode_cache_id
        {
            match r.mount.as_ref().map(|m| self.ufs_for(m)) {
                Some(Ok(u)) => {
                    CacheId::for_ufs_object(&u.object_identity(&r.rel), &i.fingerprint).to_hex()
                }
                _ => CacheId::for_inode(i.id, i.generation).to_hex(),
            }
        } else {
            CacheId::for_inode(i.id, i.generation).to_hex()
        };
        let ttl = attrs.ttl;
        let (replication_min, replication_max) = self.replication_of(i, &attrs);
        pb::FileInfo {
            ttl_ms: ttl.map(|t| t.ttl_ms).unwrap_or(0),
            ttl_action: match ttl.map(|t| t.action) {
                None => pb::TtlAction::Unspecified,
                Some(strata_meta::TtlAction::Free) => pb::TtlAction::TtlFree,
                Some(strata_meta::TtlAction::Delete) => pb::TtlAction::TtlDelete,
            } as i32,
            ttl_expires_ms: ttl.map(|t| t.expires_ms()).unwrap_or(0),
            pinned: attrs.pinned,
            replication_min: replication_min.into(),
            replication_max: replication_max.into(),
            xattrs: attrs.xattrs.into_iter().collect(),
            id: i.id,
            path: r.path.to_string(),
            name: i.name.clone(),
            is_dir: i.is_dir,
            size: i.size,
            mtime_ms: i.mtime_ms,
            mode: i.mode,
            fingerprint: i.fingerprint.clone(),
            cache_id,
            block_size,
            page_size,
            mount_id: r.mount.as_ref().map(|m| m.id).unwrap_or(0),
            ufs_path: r.rel.clone(),
            persist_state: match i.persist {
                PersistState::Persisted => pb::PersistState::Persisted,
                PersistState::NotPersisted => pb::PersistState::NotPersisted,
                PersistState::ToBePersisted => pb::PersistState::ToBePersisted,
            } as i32,
            complete: i.complete,
            generation: i.generation,
            is_mount_point: i.is_mount_point,
        }
    }

    fn child_resolved(&self, parent: &Resolved, child: Inode) -> Result<Resolved, MasterError> {
        let path = parent.path.join(&child.name)?;
        let (mount, rel) = if child.is_mount_point {
            (self.mount_of(&child)?, String::new())
        } else if parent.mount.is_some() {
            (parent.mount.clone(), join_rel(&parent.rel, &child.name))
        } else {
            (None, String::new())
        };
        Ok(Resolved {
            path,
            inode: child,
            mount,
            rel,
        })
    }

    /// Commands applied so far: changes with every namespace mutation.
    pub fn version(&self) -> Result<u64, MasterError> {
        Ok(self.store.applied()?)
    }

    pub async fn stat(&self, path: &NsPath) -> Result<pb::FileInfo, MasterError> {
        let r = self.resolve(path).await?;
        Ok(self.file_info(&r))
    }

    pub async fn list(&self, path: &NsPath) -> Result<Vec<pb::FileInfo>, MasterError> {
        match self.listed(path).await? {
            Ok(dir) => self.infos(&dir, self.store.children(dir.inode.id)?),
            Err(file) => Ok(vec![file]),
        }
    }

    /// Up to `limit` children of directory `path` in key order (a
    /// directory's key is its name and '/'), after `start_after`; a file
    /// lists itself on the first page.
    pub async fn list_page(
        &self,
        path: &NsPath,
        start_after: &str,
        limit: usize,
    ) -> Result<Vec<pb::FileInfo>, MasterError> {
        match self.listed(path).await? {
            Ok(dir) => self.infos(
                &dir,
                self.store.children_page(dir.inode.id, start_after, limit)?,
            ),
            Err(file) if start_after.is_empty() => Ok(vec![file]),
            Err(_) => Ok(Vec::new()),
        }
    }

    /// `path` for a listing: a directory, synced with its UFS if mounted
    /// from one, or (`Err`) a file's info.
    async fn listed(&self, path: &NsPath) -> Result<Result<Resolved, pb::FileInfo>, MasterError> {
        let mut r = self.resolve(path).await?;
        if !r.inode.is_dir {
            return Ok(Err(self.file_info(&r)));
        }
        if let Some(m) = &r.mount {
            r.inode = self
                .ensure_synced(&r.inode, &r.path, m, &r.rel, false)
                .await?;
        }
        Ok(Ok(r))
    }

    /// The infos of `children` of directory `dir`.
    fn infos(
        &self,
        dir: &Resolved,
        children: Vec<Inode>,
    ) -> Result<Vec<pb::FileInfo>, MasterError> {
        children
            .into_iter()
            .map(|c| Ok(self.file_info(&self.child_resolved(dir, c)?)))
            .collect()
    }

    fn check_writable(&self, r: &Resolved) -> Result<(), MasterError> {
        if let Some(m) = &r.mount
            && m.read_only
        {
            return Err(MasterError::Invalid {
                path: r.path.to_string(),
                msg: format!("mount {} is read-only", m.path),
            });
        }
        Ok(())
    }

    fn ufs_err(path: &NsPath) -> impl Fn(UfsError) -> MasterError + '_ {
        move |err| MasterError::Ufs {
            path: path.to_string(),
            err,
        }
    }

    pub async fn mkdir(&self, path: &NsPath, recursive: bool) -> Result<pb::FileInfo, MasterError> {
        if path.is_root() {
            return Err(MasterError::Exists { path: "/".into() });
        }
        let parent = path.parent().unwrap_or_else(NsPath::root);
        if recursive {
            match self.resolve(&parent).await {
                Ok(_) => {}
                Err(MasterError::NotFound { .. }) => {
                    REQUEST_ID
                        .scope(None, Box::pin(self.mkdir(&parent, true)))
                        .await?;
                }
                Err(e) => return Err(e),
            }
            if let Ok(r) = self.resolve(path).await
                && r.inode.is_dir
            {
                return Ok(self.file_info(&r));
            }
        }
        let (pr, name) = self.resolve_parent(path).await?;
        self.check_writable(&pr)?;
        let rel = join_rel(&pr.rel, &name);
        if let Some(m) = &pr.mount {
            let ufs = self.ufs_for(m)?;
            ufs.mkdir(&rel).await.map_err(Self::ufs_err(path))?;
        }
        // No writer lock: the state machine checks again in log order, so
        // concurrent creates in one directory commit together.
        if let Some(existing) = self.store.lookup(pr.inode.id, &name)? {
            // Another request made it meanwhile (concurrent writers under
            // one new directory): fine for `mkdir -p`.
            if recursive && existing.is_dir {
                return self.stat(path).await;
            }
            return Err(MasterError::Exists {
                path: path.to_string(),
            });
        }
        let r = self
            .apply_final(Command::Mkdir {
                parent: pr.inode.id,
                name,
                mtime_ms: now_ms(),
                synced_ms: pr.mount.as_ref().map(|_| now_ms()),
            })
            .await;
        match r {
            Ok(_) => {}
            Err(MasterError::Meta(MetaError::Exists(_))) => {
                // Lost a race with another creator of the same name.
                if recursive
                    && let Ok(r) = self.resolve(path).await
                    && r.inode.is_dir
                {
                    return Ok(self.file_info(&r));
                }
                return Err(MasterError::Exists {
                    path: path.to_string(),
                });
            }
            Err(e) => return Err(e),
        }
        self.stat(path).await
    }

    pub async fn create_file(
        &self,
        path: &NsPath,
        write_type: pb::WriteType,
        overwrite: bool,
        recursive: bool,
        complete_empty: bool,
    ) -> Result<pb::FileInfo, MasterError> {
        if complete_empty
            && !matches!(
                write_type,
                pb::WriteType::MustCache | pb::WriteType::Unspecified
            )
        {
            return Err(MasterError::Invalid {
                path: path.to_string(),
                msg: "only a MUST_CACHE file can be created complete and empty in one call; \
                      other write types need their UFS object written through a worker"
                    .into(),
            });
        }
        if recursive
            && let Some(p) = path.parent()
            && let Err(MasterError::NotFound { .. }) = self.resolve(&p).await
        {
            REQUEST_ID.scope(None, self.mkdir(&p, true)).await?;
        }
        let (pr, name) = self.resolve_parent(path).await?;
        self.check_writable(&pr)?;
        let persist = match write_type {
            pb::WriteType::MustCache | pb::WriteType::Unspecified => PersistState::NotPersisted,
            pb::WriteType::CacheThrough | pb::WriteType::Through | pb::WriteType::AsyncThrough => {
                if pr.mount.is_none() {
                    return Err(MasterError::Invalid {
                        path: path.to_string(),
                        msg: "not under a mount, so there is no UFS to write through to; \
                              write with MUST_CACHE or under a mounted path"
                            .into(),
                    });
                }
                PersistState::ToBePersisted
            }
        };
        if let Some(old) = self.store.lookup(pr.inode.id, &name)? {
            if old.is_dir {
                return Err(MasterError::IsDir {
                    path: path.to_string(),
                });
            }
            if !overwrite {
                return Err(MasterError::Exists {
                    path: path.to_string(),
                });
            }
        }
        let cmd = if complete_empty {
            Command::CreateEmptyFile {
                parent: pr.inode.id,
                name: name.clone(),
                mtime_ms: now_ms(),
                overwrite,
            }
        } else {
            Command::CreateFile {
                parent: pr.inode.id,
                name: name.clone(),
                mtime_ms: now_ms(),
                persist,
                overwrite,
            }
        };
        let out = self.apply_final(cmd).await.map_err(|e| match e {
            MasterError::Meta(MetaError::Exists(_)) => MasterError::Exists {
                path: path.to_string(),
            },
            e => e,
        })?;
        let ino = out
            .inode
            .and_then(|id| self.store.inode(id).ok().flatten())
            .ok_or_else(|| MasterError::NotFound {
                path: path.to_string(),
            })?;
        let r = self.child_resolved(&pr, ino)?;
        Ok(self.file_info(&r))
    }

    pub async fn complete_file(
        &self,
        req: pb::CompleteFileRequest,
    ) -> Result<pb::FileInfo, MasterError> {
        let out = self
            .apply_final(Command::CompleteFile {
                id: req.id,
                generation: req.generation,
                size: req.size,
                fingerprint: req.fingerprint,
                mtime_ms: if req.mtime_ms > 0 {
                    req.mtime_ms
                } else {
                    now_ms()
                },
                xattrs: req.set_xattrs.then(|| req.xattrs.into_iter().collect()),
            })
            .await?;
        if out.job.is_some() {
            self.jobs_changed.notify_one();
        }
        let path = self.path_of(req.id)?;
        self.stat(&path).await
    }

    /// Rebuilds an inode's path by walking parents.
    pub(crate) fn path_of(&self, mut id: u64) -> Result<NsPath, MasterError> {
        let mut names = Vec::new();
        while id != ROOT_ID {
            let i = self.store.inode(id)?.ok_or_else(|| MasterError::NotFound {
                path: format!("inode {id}"),
            })?;
            names.push(i.name);
            id = i.parent;
        }
        let mut p = NsPath::root();
        for n in names.iter().rev() {
            p = p.join(n)?;
        }
        Ok(p)
    }

    pub async fn delete(
        &self,
        path: &NsPath,
        recursive: bool,
    ) -> Result<pb::DeleteResponse, MasterError> {
        if path.is_root() {
            return Err(MasterError::Invalid {
                path: "/".into(),
                msg: "the root cannot be deleted".into(),
            });
        }
        let mut r = self.resolve(path).await?;
        if r.inode.is_mount_point {
            return Err(MasterError::Invalid {
                path: path.to_string(),
                msg: "is a mount point; use `strata fs unmount`".into(),
            });
        }
        self.check_writable(&r)?;
        if r.inode.is_dir {
            if let Some(m) = &r.mount {
                r.inode = self
                    .ensure_synced(&r.inode, &r.path, m, &r.rel, false)
                    .await?;
            }
            let children = self.store.children(r.inode.id)?;
            if !recursive && !children.is_empty() {
                return Err(MasterError::NotEmpty {
                    path: path.to_string(),
                });
            }
            if has_mount_below(&self.store, r.inode.id)? {
                return Err(MasterError::Invalid {
                    path: path.to_string(),
                    msg: "contains a mount point; unmount it first".into(),
                });
            }
        }
        if let Some(m) = &r.mount
            && (r.inode.is_dir || r.inode.persist == PersistState::Persisted)
        {
            let ufs = self.ufs_for(m)?;
            match ufs.delete(&r.rel, r.inode.is_dir).await {
                Ok(()) => {}
                Err(e) if e.kind == UfsErrorKind::NotFound => {}
                Err(err) => {
                    return Err(MasterError::Ufs {
                        path: path.to_string(),
                        err,
                    });
                }
            }
        }
        // Batched with other commands; a concurrent delete of the same
        // inode makes this one "not found".
        let out = self
            .apply_final(Command::Delete { id: r.inode.id })
            .await
            .map_err(|e| match e {
                MasterError::Meta(MetaError::NoInode(_)) => MasterError::NotFound {
                    path: path.to_string(),
                },
                e => e,
            })?;
        Ok(Self::delete_response(&out.removed))
    }

    pub async fn rename(&self, src: &NsPath, dst: &NsPath) -> Result<(), MasterError> {
        let r = self.resolve(src).await?;
        if r.inode.is_mount_point {
            return Err(MasterError::Invalid {
                path: src.to_string(),
                msg: "is a mount point; unmount and mount again elsewhere".into(),
            });
        }
        if dst.starts_with(src) {
            return Err(MasterError::Invalid {
                path: dst.to_string(),
                msg: format!("cannot move {src} below itself"),
            });
        }
        let (pr, name) = self.resolve_parent(dst).await?;
        self.check_writable(&r)?;
        self.check_writable(&pr)?;
        if pr.mount.as_ref().map(|m| m.id) != r.mount.as_ref().map(|m| m.id) {
            return Err(MasterError::Invalid {
                path: dst.to_string(),
                msg: format!("cannot rename across mounts (from {src}); copy and delete instead"),
            });
        }
        if self.store.lookup(pr.inode.id, &name)?.is_some() {
            return Err(MasterError::Exists {
                path: dst.to_string(),
            });
        }
        if let Some(m) = &r.mount
            && (r.inode.is_dir || r.inode.persist == PersistState::Persisted)
        {
            let ufs = self.ufs_for(m)?;
            ufs.rename(&r.rel, &join_rel(&pr.rel, &name), r.inode.is_dir)
                .await
                .map_err(Self::ufs_err(src))?;
        }
        self.apply_final(Command::Rename {
            id: r.inode.id,
            new_parent: pr.inode.id,
            new_name: name,
            mtime_ms: now_ms(),
        })
        .await
        .map_err(|e| match e {
            MasterError::Meta(MetaError::Exists(_)) => MasterError::Exists {
                path: dst.to_string(),
            },
            MasterError::Meta(MetaError::NoInode(_)) => MasterError::NotFound {
                path: src.to_string(),
            },
            e => e,
        })?;
        Ok(())
    }

    pub async fn mount(&self, req: pb::MountRequest) -> Result<pb::MountInfo, MasterError> {
        let path = NsPath::parse(&req.path)?;
        let opts: BTreeMap<String, String> = req.options.clone().into_iter().collect();
        let uri = UfsUri::parse(&req.ufs_uri, &opts).map_err(Self::ufs_err(&path))?;
        let block_size = req.block_size.unwrap_or(self.config.master.block_size.0);
        let page_size = req.page_size.unwrap_or(self.config.master.page_size.0);
        strata_common::Geometry::new(block_size, page_size).map_err(|e| MasterError::Invalid {
            path: path.to_string(),
            msg: e.to_string(),
        })?;
        let sync_interval = req
            .sync_interval
            .unwrap_or(self.config.master.sync_interval);
        if sync_interval < -1 {
            return Err(MasterError::Invalid {
                path: path.to_string(),
                msg: "sync interval is -1 (never), 0 (always) or a number of seconds".into(),
            });
        }
        if req.create_root && uri.scheme == strata_ufs::Scheme::File {
            tokio::fs::create_dir_all(&uri.root)
                .await
                .map_err(|e| MasterError::Ufs {
                    path: path.to_string(),
                    err: UfsError::new(
                        UfsErrorKind::Other,
                        uri.display(),
                        format!("cannot create the directory: {e}"),
                    ),
                })?;
        }
        let ufs = strata_ufs::open(&uri).map_err(Self::ufs_err(&path))?;
        let timeout = Duration::from_secs(self.config.master.mount_check_timeout_secs);
        match tokio::time::timeout(timeout, ufs.check()).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                return Err(MasterError::Ufs {
                    path: path.to_string(),
                    err,
                });
            }
            Err(_) => {
                return Err(MasterError::Ufs {
                    path: path.to_string(),
                    err: UfsError::new(
                        UfsErrorKind::Unreachable,
                        uri.display(),
                        format!("no answer within {}s", timeout.as_secs()),
                    ),
                });
            }
        }
        let (pr, name) = self.resolve_parent(&path).await?;
        if pr.mount.is_some() {
            return Err(MasterError::Invalid {
                path: path.to_string(),
                msg: "cannot mount inside another mount".into(),
            });
        }
        let _w = self.write_lock.lock().await;
        if self.store.lookup(pr.inode.id, &name)?.is_some() {
            return Err(MasterError::Exists {
                path: path.to_string(),
            });
        }
        let mut options: Vec<(String, String)> = opts.into_iter().collect();
        options.sort();
        let out = self
            .apply_final(Command::AddMount {
                parent: pr.inode.id,
                name,
                mtime_ms: now_ms(),
                mount: MountEntry {
                    id: 0,
                    inode: 0,
                    path: path.to_string(),
                    ufs_uri: req.ufs_uri.clone(),
                    options,
                    read_only: req.read_only,
                    sync_interval,
                    block_size,
                    page_size,
                },
            })
            .await?;
        let ino = out
            .inode
            .ok_or_else(|| MasterError::Internal("mount created no inode".into()))?;
        let m = self
            .store
            .mounts()?
            .into_iter()
            .find(|m| m.inode == ino)
            .ok_or_else(|| MasterError::Internal("mount row missing".into()))?;
        tracing::info!(path = %m.path, uri = %uri.display(), "mounted");
        Ok(mount_info(&m, false))
    }

    pub async fn unmount(&self, path: &NsPath) -> Result<(), MasterError> {
        let _w = self.write_lock.lock().await;
        let m = self
            .store
            .mounts()?
            .into_iter()
            .find(|m| m.path == path.as_str())
            .ok_or_else(|| MasterError::Invalid {
                path: path.to_string(),
                msg: "is not a mount point (see `strata fs mount` with no arguments)".into(),
            })?;
        self.apply_final(Command::RemoveMount { mount_id: m.id })
            .await?;
        self.ufs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&m.id);
        Ok(())
    }

    pub fn mounts(&self) -> Result<Vec<pb::MountInfo>, MasterError> {
        Ok(self
            .store
            .mounts()?
            .iter()
            .map(|m| mount_info(m, false))
            .collect())
    }

    /// Mount with credentials, for workers.
    pub fn mount_by_id(&self, id: u64) -> Result<pb::MountInfo, MasterError> {
        let m = self.store.mount(id)?.ok_or_else(|| MasterError::NotFound {
            path: format!("mount {id}"),
        })?;
        Ok(mount_info(&m, true))
    }

    /// Forces re-validation of `path` (a file's parent, or a directory and
    /// every directory below it that was listed before).
    pub async fn sync(&self, path: &NsPath) -> Result<pb::SyncResponse, MasterError> {
        let target = match self.resolve(path).await {
            Ok(r) => r,
            Err(MasterError::NotFound { .. }) => {
                // The path may have appeared in the UFS: sync the closest parent.
                let parent = path.parent().ok_or_else(|| MasterError::NotFound {
                    path: path.to_string(),
                })?;
                return Box::pin(self.sync(&parent)).await;
            }
            Err(e) => return Err(e),
        };
        let start = if target.inode.is_dir {
            target
        } else {
            let p = target.path.parent().unwrap_or_else(NsPath::root);
            self.resolve(&p).await?
        };
        let mut resp = pb::SyncResponse::default();
        let mut stack = vec![start];
        while let Some(r) = stack.pop() {
            if let Some(m) = r.mount.clone()
                && (r.inode.synced_ms.is_some() || resp.directories_synced == 0)
            {
                let (_, changed) = self.sync_dir(&r.inode, &r.path, &m, &r.rel, true).await?;
                resp.directories_synced += 1;
                resp.files_changed += changed;
            }
            for c in self.store.children(r.inode.id)? {
                if c.is_dir && (c.synced_ms.is_some() || c.is_mount_point) {
                    stack.push(self.child_resolved(&r, c)?);
                }
            }
        }
        Ok(resp)
    }
}

fn has_mount_below(store: &MetaStore, id: u64) -> Result<bool, MasterError> {
    for c in store.children(id)? {
        if c.is_mount_point || (c.is_dir && has_mount_below(store, c.id)?) {
            return Ok(true);
        }
    }
    Ok(false)
}

fn mount_info(m: &MountEntry, with_secrets: bool) -> pb::MountInfo {
    pb::MountInfo {
        id: m.id,
        path: m.path.clone(),
        ufs_uri: if with_secrets {
            m.ufs_uri.clone()
        } else {
            strata_ufs::redact_uri(&m.ufs_uri)
        },
        options: m
            .options
            .iter()
            .map(|(k, v)| {
                let secret = k.contains("secret") || k.contains("token");
                let v = if secret && !with_secrets {
                    "****".to_string()
                } else {
                    v.clone()
                };
                (k.clone(), v)
            })
            .collect(),
        read_only: m.read_only,
        sync_interval: m.sync_interval,
        block_size: m.block_size,
        page_size: m.page_size,
    }
}
