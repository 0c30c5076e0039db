//! Data-management jobs (load, free, persist, cp) and TTLs, run by the
//! leader. A job's state and progress live in the replicated state machine:
//! a new leader picks up every unfinished job and resumes it after the files
//! its predecessor checkpointed as done. The data itself moves between the
//! workers and the UFS; the leader only tells workers which blocks to cache
//! (through the same SDK clients use), so it never carries the bytes of a
//! load.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use md5::{Digest, Md5};
use strata_client::{Client, ClientError, FileInfo, WriteOptions};
use strata_common::{Config, NsPath, now_ms};
use strata_meta::{
    Attrs, Command, Job, JobKind, JobProgress, JobState, MetaError, Ttl, TtlAction, XattrFlag,
};
use strata_proto::pb;
use tokio::sync::{Notify, Semaphore};

use crate::error::MasterError;
use crate::namespace::Namespace;

/// How often a running job writes its progress into the replicated state.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// Attempts per block before a file counts as failed (about 10 s of
/// backoff: a worker restart or a failover is ridden out).
const BLOCK_ATTEMPTS: u32 = 7;
/// Highest replication bound `strata fs set-replication` accepts.
const MAX_REPLICATION: u8 = 16;
/// Attempts to persist one ASYNC_THROUGH file before its job fails.
const PERSIST_ATTEMPTS: u32 = 8;
/// File errors quoted in a job's message.
const ERRORS_KEPT: usize = 5;

/// Why a job run stopped early.
enum Stop {
    /// Leadership lost or the job was cancelled: not a failure of the job.
    Interrupted,
    Failed(String),
}

impl From<ClientError> for Stop {
    fn from(e: ClientError) -> Self {
        Stop::Failed(e.to_string())
    }
}

pub fn job_info(j: &Job) -> pb::JobInfo {
    let (dst, verify) = match &j.kind {
        JobKind::Copy { dst } => (dst.clone(), false),
        JobKind::Load { verify } => (String::new(), *verify),
        _ => (String::new(), false),
    };
    let p = &j.progress;
    pb::JobInfo {
        id: j.id,
        kind: j.kind.name().into(),
        path: j.path.clone(),
        dst,
        verify,
        state: match j.state {
            JobState::Queued => pb::JobState::JobQueued,
            JobState::Running => pb::JobState::JobRunning,
            JobState::Completed => pb::JobState::JobCompleted,
            JobState::Failed => pb::JobState::JobFailed,
            JobState::Cancelled => pb::JobState::JobCancelled,
        } as i32,
        created_ms: j.created_ms,
        updated_ms: j.updated_ms,
        message: j.message.clone(),
        runs: j.runs,
        files_total: p.files_total,
        bytes_total: p.bytes_total,
        files_done: p.files_done,
        bytes_done: p.bytes_done,
        files_failed: p.files_failed,
        ufs_pages: p.ufs_pages,
        cached_pages: p.cached_pages,
        verified: p.verified,
        run_ms: p.run_ms,
    }
}

impl Namespace {
    pub async fn submit_job(&self, req: pb::SubmitJobRequest) -> Result<pb::JobInfo, MasterError> {
        let path = NsPath::parse(&req.path)?;
        let kind = match req.kind.as_str() {
            "load" => JobKind::Load { verify: req.verify },
            "free" => JobKind::Free,
            "persist" => JobKind::Persist,
            "cp" => {
                let dst = NsPath::parse(&req.dst)?;
                if dst.to_string().starts_with(&format!("{}/", path)) || dst == path {
                    return Err(MasterError::Invalid {
                        path: dst.to_string(),
                        msg: format!("cannot copy {path} into itself"),
                    });
                }
                JobKind::Copy {
                    dst: dst.to_string(),
                }
            }
            other => {
                return Err(MasterError::Invalid {
                    path: path.to_string(),
                    msg: format!("unknown job kind {other:?}; use load, free, persist or cp"),
                });
            }
        };
        // Fails now, with the path named, rather than in the background.
        self.resolve(&path).await?;
        let out = self
            .apply_final(Command::SubmitJob {
                kind,
                path: path.to_string(),
                created_ms: now_ms(),
            })
            .await?;
        let id = out
            .job
            .ok_or_else(|| MasterError::Internal("job submission recorded no id".into()))?;
        self.jobs_changed.notify_one();
        self.job_info(id)
    }

    pub fn job_info(&self, id: u64) -> Result<pb::JobInfo, MasterError> {
        match self.store.job(id)? {
            Some(j) => Ok(job_info(&j)),
            None => Err(MasterError::Invalid {
                path: format!("job {id}"),
                msg: "no such job (finished jobs beyond the last 1000 are dropped)".into(),
            }),
        }
    }

    pub fn list_jobs(&self) -> Result<Vec<pb::JobInfo>, MasterError> {
        Ok(self.store.jobs()?.iter().map(job_info).collect())
    }

    pub async fn cancel_job(&self, id: u64) -> Result<pb::JobInfo, MasterError> {
        let j = self.job_info(id)?;
        self.apply_final(Command::UpdateJob {
            id,
            state: JobState::Cancelled,
            progress: None,
            message: Some("cancelled by a user".into()),
            new_run: false,
            updated_ms: now_ms(),
        })
        .await
        .map_err(|e| match e {
            MasterError::Meta(MetaError::Invalid(msg)) => MasterError::Invalid {
                path: format!("job {id} ({} {})", j.kind, j.path),
                msg,
            },
            e => e,
        })?;
        self.jobs_changed.notify_one();
        self.job_info(id)
    }

    pub async fn set_attributes(
        &self,
        req: pb::SetAttributesRequest,
    ) -> Result<pb::FileInfo, MasterError> {
        let path = NsPath::parse(&req.path)?;
        let r = self.resolve(&path).await?;
        if !req.xattr_set.is_empty() || !req.xattr_remove.is_empty() {
            let flag = match pb::XattrFlag::try_from(req.xattr_flag) {
                Ok(pb::XattrFlag::XattrCreate) => XattrFlag::Create,
                Ok(pb::XattrFlag::XattrReplace) => XattrFlag::Replace,
                _ => XattrFlag::Any,
            };
            self.apply_final(Command::SetXattrs {
                id: r.inode.id,
                set: req.xattr_set.clone().into_iter().collect(),
                remove: req.xattr_remove.clone(),
                flag,
            })
            .await
            .map_err(|e| match e {
                MasterError::Meta(MetaError::NoXattr(name)) => MasterError::NoXattr {
                    path: path.to_string(),
                    name,
                },
                MasterError::Meta(MetaError::Exists(name)) => MasterError::Exists {
                    path: format!("{path}: extended attribute {name:?}"),
                },
                MasterError::Meta(MetaError::Invalid(msg)) => MasterError::Invalid {
                    path: path.to_string(),
                    msg,
                },
                e => e,
            })?;
            let only_xattrs = !req.clear_ttl
                && req.ttl_ms == 0
                && req.pinned.is_none()
                && req.replication_min.is_none()
                && req.replication_max.is_none();
            if only_xattrs {
                return self.stat(&path).await;
            }
        }
        let mut a = self.store.attrs(r.inode.id)?;
        if req.clear_ttl {
            a.ttl = None;
        } else if req.ttl_ms > 0 {
            let action = match pb::TtlAction::try_from(req.ttl_action) {
                Ok(pb::TtlAction::TtlDelete) => TtlAction::Delete,
                Ok(pb::TtlAction::TtlFree) => TtlAction::Free,
                _ => {
                    return Err(MasterError::Invalid {
                        path: path.to_string(),
                        msg: "TTL action must be free or delete".into(),
                    });
                }
            };
            if action == TtlAction::Delete && path.is_root() {
                return Err(MasterError::Invalid {
                    path: "/".into(),
                    msg: "the root cannot be deleted, so it cannot take a delete TTL".into(),
                });
            }
            a.ttl = Some(Ttl {
                set_ms: now_ms(),
                ttl_ms: req.ttl_ms,
                action,
            });
        }
        if let Some(p) = req.pinned {
            a.pinned = p;
        }
        let bound = |v: u32, what: &str| -> Result<u8, MasterError> {
            u8::try_from(v)
                .ok()
                .filter(|n| *n <= MAX_REPLICATION)
                .ok_or_else(|| MasterError::Invalid {
                    path: path.to_string(),
                    msg: format!("{what} replication {v} is above {MAX_REPLICATION}"),
                })
        };
        if let Some(v) = req.replication_min {
            a.replication_min = bound(v, "minimum")?;
        }
        if let Some(v) = req.replication_max {
            a.replication_max = bound(v, "maximum")?;
        }
        if a.replication_max > 0 && a.replication_min > a.replication_max {
            return Err(MasterError::Invalid {
                path: path.to_string(),
                msg: format!(
                    "minimum replication {} is above the maximum {}",
                    a.replication_min, a.replication_max
                ),
            });
        }
        if a.pinned && a.ttl.is_some_and(|t| t.action == TtlAction::Free) {
            return Err(MasterError::Invalid {
                path: path.to_string(),
                msg: "is pinned, so a TTL that frees it would never act; unpin it first \
                      (`strata fs unpin`) or use `--action delete`"
                    .into(),
            });
        }
        self.apply_final(Command::SetAttrs {
            id: r.inode.id,
            attrs: a,
        })
        .await?;
        self.stat(&path).await
    }

    /// Paths pinned with `strata fs pin` (a file below one is pinned).
    fn pinned_paths(&self) -> Result<Vec<String>, MasterError> {
        let mut out = Vec::new();
        for (id, a) in self.store.all_attrs()? {
            if a.pinned
                && let Ok(p) = self.path_of(id)
            {
                out.push(p.to_string());
            }
        }
        Ok(out)
    }
}

fn is_below(path: &str, roots: &[String]) -> bool {
    roots
        .iter()
        .any(|r| r == "/" || path == r || path.starts_with(&format!("{r}/")))
}

/// Runs jobs and TTL checks while this master leads.
pub struct JobRunner {
    ns: Arc<Namespace>,
    config: Config,
    node_id: u64,
    client: Client,
    running: Mutex<HashMap<u64, tokio::task::AbortHandle>>,
}

impl JobRunner {
    pub fn start(ns: Arc<Namespace>, config: &Config, me: &str) -> Result<(), MasterError> {
        // Jobs move data between the UFS and the workers: no heavy-client
        // copy on the master's host (and no clash with a mount there that
        // uses the configured directory).
        let mut client_cfg = config.client.clone();
        client_cfg.local_cache_dir = Default::default();
        let client = Client::new(me, client_cfg)
            .map_err(|e| MasterError::Internal(format!("job client: {e}")))?;
        let r = Arc::new(JobRunner {
            ns,
            config: config.clone(),
            node_id: config.master.node_id,
            client,
            running: Mutex::new(HashMap::new()),
        });
        tokio::spawn(r.run());
        Ok(())
    }

    fn is_leader(&self) -> bool {
        self.ns.raft.metrics().borrow().current_leader == Some(self.node_id)
    }

    async fn run(self: Arc<Self>) {
        let wake: Arc<Notify> = self.ns.jobs_changed.clone();
        let ttl_every = Duration::from_secs(self.config.master.ttl_check_interval_secs.max(1));
        let mut last_ttl: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
            if !self.is_leader() {
                self.stop_all();
                continue;
            }
            if self.ns.reads.ensure_leader(&self.ns.raft).await.is_err() {
                continue;
            }
            if let Err(e) = self.schedule() {
                tracing::warn!(error = %e, "job scheduling failed; retrying");
            }
            if last_ttl.is_none_or(|t| t.elapsed() >= ttl_every) {
                last_ttl = Some(Instant::now());
                if let Err(e) = self.check_ttls().await {
                    tracing::warn!(error = %e, "TTL check failed; retrying next interval");
                }
                if let Err(e) = self.check_abandoned().await {
                    tracing::warn!(error = %e, "sweep of abandoned writes failed; retrying next interval");
                }
            }
        }
    }

    fn stop_all(&self) {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        for (id, h) in running.drain() {
            tracing::info!(job = id, "no longer the leader: job handed over");
            h.abort();
        }
    }

    fn schedule(self: &Arc<Self>) -> Result<(), MasterError> {
        let jobs = self.ns.store.jobs()?;
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        running.retain(|_, h| !h.is_finished());
        for j in jobs {
            if j.state.is_finished() {
                // Cancelled while running here: stop the work.
                if let Some(h) = running.remove(&j.id) {
                    h.abort();
                }
                continue;
            }
            if running.contains_key(&j.id) || running.len() >= self.config.master.job_max_running {
                continue;
            }
            let id = j.id;
            let me = self.clone();
            let h = tokio::spawn(async move { me.run_job(j).await });
            running.insert(id, h.abort_handle());
        }
        Ok(())
    }

    async fn update(
        &self,
        id: u64,
        state: JobState,
        p: Option<&JobProgress>,
        message: Option<String>,
        new_run: bool,
    ) -> Result<(), MasterError> {
        self.ns
            .apply_final(Command::UpdateJob {
                id,
                state,
                progress: p.cloned(),
                message,
                new_run,
                updated_ms: now_ms(),
            })
            .await
            .map(drop)
    }

    async fn run_job(self: Arc<Self>, j: Job) {
        if self
            .update(j.id, JobState::Running, None, None, true)
            .await
            .is_err()
        {
            return;
        }
        tracing::info!(job = j.id, kind = j.kind.name(), path = %j.path, run = j.runs + 1, "job started");
        let mut run = Run {
            runner: &self,
            job: &j,
            p: j.progress.clone(),
            started: Instant::now(),
            base_ms: j.progress.run_ms,
            last_checkpoint: Instant::now(),
            errors: Vec::new(),
        };
        let res = match &j.kind {
            JobKind::Load { verify } => run.load(*verify).await,
            JobKind::Free => run.free().await,
            JobKind::Persist => run.persist().await,
            JobKind::Copy { dst } => run.copy(dst).await,
            JobKind::PersistFile { inode } => run.persist_inode(*inode).await,
        };
        run.p.run_ms = run.base_ms + run.started.elapsed().as_millis() as u64;
        let (state, message) = match res {
            Err(Stop::Interrupted) => return,
            Err(Stop::Failed(m)) => (JobState::Failed, m),
            Ok(note) if run.p.files_failed == 0 => (JobState::Completed, note),
            Ok(_) => (
                JobState::Failed,
                format!(
                    "{} of {} files failed: {}",
                    run.p.files_failed,
                    run.p.files_total,
                    run.errors.join("; ")
                ),
            ),
        };
        let p = run.p.clone();
        tracing::info!(job = j.id, state = state.name(), %message, "job ended");
        let _ = self
            .update(j.id, state, Some(&p), Some(message), false)
            .await;
    }

    /// Removes new versions of files that were never completed nor
    /// listed for `master.unfinished_ttl_secs` (rewrites whose writer
    /// died), and frees their cache-only pages.
    async fn check_abandoned(&self) -> Result<(), MasterError> {
        let ttl = self.config.master.unfinished_ttl_secs;
        if ttl == 0 {
            return Ok(());
        }
        let before = (now_ms() as i64).saturating_sub(ttl.saturating_mul(1000) as i64);
        for ino in self.ns.store.abandoned_versions(before)? {
            tracing::info!(
                inode = ino.id,
                name = %ino.name,
                "removing a version of a file left unfinished by its writer"
            );
            let r = self.ns.delete_unfinished(ino.id).await?;
            self.client.free_removed(&r).await;
        }
        Ok(())
    }

    async fn check_ttls(&self) -> Result<(), MasterError> {
        let now = now_ms();
        for (id, a) in self.ns.store.all_attrs()? {
            let Some(ttl) = a.ttl else { continue };
            if ttl.expires_ms() > now {
                continue;
            }
            let Ok(path) = self.ns.path_of(id) else {
                continue;
            };
            match ttl.action {
                TtlAction::Delete => {
                    tracing::info!(%path, "TTL expired: deleting");
                    match self.ns.delete(&path, true).await {
                        Ok(_) | Err(MasterError::NotFound { .. }) => {}
                        Err(e) => {
                            tracing::warn!(%path, error = %e, "TTL delete failed; retrying later");
                            continue;
                        }
                    }
                }
                TtlAction::Free => {
                    tracing::info!(%path, "TTL expired: freeing cached data");
                    self.ns
                        .apply(Command::SubmitJob {
                            kind: JobKind::Free,
                            path: path.to_string(),
                            created_ms: now,
                        })
                        .await?;
                    // The TTL has acted; the file stays without one.
                    self.ns
                        .apply(Command::SetAttrs {
                            id,
                            attrs: Attrs { ttl: None, ..a },
                        })
                        .await?;
                    self.ns.jobs_changed.notify_one();
                }
            }
        }
        Ok(())
    }
}

/// One run of one job on this leader.
struct Run<'a> {
    runner: &'a JobRunner,
    job: &'a Job,
    p: JobProgress,
    started: Instant,
    base_ms: u64,
    last_checkpoint: Instant,
    errors: Vec<String>,
}

impl Run<'_> {
    fn client(&self) -> &Client {
        &self.runner.client
    }

    fn file_failed(&mut self, f: &FileInfo, e: impl std::fmt::Display) {
        self.p.files_failed += 1;
        if self.errors.len() < ERRORS_KEPT {
            self.errors.push(format!("{}: {e}", f.path));
        }
    }

    /// Writes progress into the replicated state now and then; stops the
    /// run if the job was cancelled or this master no longer leads.
    async fn checkpoint(&mut self) -> Result<(), Stop> {
        if self.last_checkpoint.elapsed() < CHECKPOINT_EVERY {
            return Ok(());
        }
        self.last_checkpoint = Instant::now();
        self.p.run_ms = self.base_ms + self.started.elapsed().as_millis() as u64;
        self.runner
            .update(self.job.id, JobState::Running, Some(&self.p), None, false)
            .await
            .map_err(|_| Stop::Interrupted)
    }

    /// The files below the job's path, in path order, with totals set and
    /// the files a previous run finished counted as done.
    async fn files(&mut self) -> Result<Vec<FileInfo>, Stop> {
        let files = self.client().list_files_recursive(&self.job.path).await?;
        self.p.files_total = files.len() as u64;
        self.p.bytes_total = files.iter().map(|f| f.size).sum();
        let start = (self.p.resume_from as usize).min(files.len());
        self.p.resume_from = start as u64;
        self.p.files_done = start as u64;
        self.p.bytes_done = files[..start].iter().map(|f| f.size).sum();
        self.p.files_failed = 0;
        Ok(files)
    }

    async fn load(&mut self, verify: bool) -> Result<String, Stop> {
        let files = self.files().await?;
        let start = self.p.resume_from as usize;
        let cfg = &self.runner.config.master;
        let chunk = self.runner.config.client.read_chunk.0.max(1);
        let mut remaining = vec![0u32; files.len()];
        let mut tasks = Vec::new();
        for (i, f) in files.iter().enumerate().skip(start) {
            let r = self.client().open_info(f.clone())?;
            let mut off = 0;
            while off < f.size {
                let end = (off + chunk.max(f.page_size))
                    .min(r.block_end(off))
                    .min(f.size);
                tasks.push((i, r.clone(), off, end - off, f.mount_id));
                remaining[i] += 1;
                off = end;
            }
        }
        let worker_sems: Mutex<HashMap<String, Arc<Semaphore>>> = Mutex::new(HashMap::new());
        let ufs_sems: Mutex<HashMap<u64, Arc<Semaphore>>> = Mutex::new(HashMap::new());
        let per_worker = cfg.job_per_worker.max(1);
        let per_ufs = cfg.job_per_ufs.max(1);
        let workers = self.client().workers().await.map(|w| w.len()).unwrap_or(1);
        let parallel = (per_worker * workers.max(1)).clamp(1, 1024);
        let (worker_sems, ufs_sems) = (&worker_sems, &ufs_sems);
        let mut results = futures::stream::iter(tasks)
            .map(|(i, r, off, len, mount)| async move {
                let _u = sem(ufs_sems, mount, per_ufs).acquire_owned().await;
                let mut last: Option<ClientError> = None;
                for attempt in 0..BLOCK_ATTEMPTS {
                    if last.as_ref().is_some_and(|e| attempt >= attempts_for(e)) {
                        break;
                    }
                    if attempt > 0 {
                        let ms = (200u64 << attempt).min(2000);
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                    }
                    let owner = match r.owner_of(off).await {
                        Ok(o) => o,
                        Err(e) => {
                            last = Some(e);
                            continue;
                        }
                    };
                    let _w = sem(worker_sems, owner, per_worker).acquire_owned().await;
                    let min = r.info().replication_min as usize;
                    let res = match r.load_range(off, len).await {
                        // A path with a minimum replication is cached on
                        // that many workers of each block's ranking.
                        Ok((c, u)) if min > 1 => {
                            r.load_replicas(off, len, min).await.map(|x| (c, u + x))
                        }
                        other => other,
                    };
                    match res {
                        Ok((c, u)) => return (i, len, Ok((c, u))),
                        Err(e) => last = Some(e),
                    }
                }
                let e = last.unwrap_or_else(|| ClientError::Other("load failed".into()));
                (i, len, Err(e))
            })
            .buffer_unordered(parallel);
        let mut failed = vec![false; files.len()];
        let mut done = vec![false; files.len()];
        for (i, f) in files.iter().enumerate().skip(start) {
            if f.size == 0 {
                done[i] = true;
                self.p.files_done += 1;
            }
        }
        while let Some((i, len, res)) = results.next().await {
            match res {
                Ok((c, u)) => {
                    self.p.cached_pages += c;
                    self.p.ufs_pages += u;
                    self.p.bytes_done += len;
                }
                Err(e) => {
                    if !failed[i] {
                        failed[i] = true;
                        self.file_failed(&files[i], e);
                    }
                }
            }
            remaining[i] -= 1;
            if remaining[i] == 0 && !failed[i] {
                done[i] = true;
                self.p.files_done += 1;
            }
            let mut w = self.p.resume_from as usize;
            while w < files.len() && done[w] {
                w += 1;
            }
            self.p.resume_from = w as u64;
            self.checkpoint().await?;
        }
        if verify {
            self.verify(&files, &failed).await?;
        }
        Ok(format!(
            "{} pages fetched from the UFS, {} already cached{}",
            self.p.ufs_pages,
            self.p.cached_pages,
            if verify {
                format!("; {} files verified against the UFS", self.p.verified)
            } else {
                String::new()
            }
        ))
    }

    /// Compares each loaded file's cached bytes with the UFS: with the
    /// object's MD5 ETag where it has one, else with the UFS bytes.
    async fn verify(&mut self, files: &[FileInfo], failed: &[bool]) -> Result<(), Stop> {
        for (i, f) in files.iter().enumerate() {
            if failed[i] || f.mount_id == 0 {
                continue;
            }
            let cached = match self.digest_cached(f).await {
                Ok(d) => d,
                Err(e) => {
                    self.file_failed(f, format!("verify: reading the cached copy: {e}"));
                    continue;
                }
            };
            let etag = f.fingerprint.trim_matches('"');
            let expected = if etag.len() == 32 && etag.bytes().all(|b| b.is_ascii_hexdigit()) {
                Ok(etag.to_ascii_lowercase())
            } else {
                self.digest_ufs(f).await
            };
            match expected {
                Ok(e) if e == cached => self.p.verified += 1,
                Ok(e) => self.file_failed(
                    f,
                    format!("verify: cached MD5 {cached} differs from the UFS's {e}"),
                ),
                Err(e) => self.file_failed(f, format!("verify: reading the UFS: {e}")),
            }
            self.checkpoint().await?;
        }
        Ok(())
    }

    async fn digest_cached(&self, f: &FileInfo) -> Result<String, ClientError> {
        let r = self.client().open_info(f.clone())?;
        let mut h = Md5::new();
        let mut s = Box::pin(r.stream(0));
        while let Some(b) = s.try_next().await? {
            h.update(&b);
        }
        Ok(hex(&h.finalize()))
    }

    async fn digest_ufs(&self, f: &FileInfo) -> Result<String, MasterError> {
        let ufs = self.runner.ns.ufs_by_mount_id(f.mount_id)?;
        let path = NsPath::parse(&f.path)?;
        let ufs_err = |err| MasterError::Ufs {
            path: path.to_string(),
            err,
        };
        let mut s = ufs
            .read_stream(&f.ufs_path, 0..f.size)
            .await
            .map_err(ufs_err)?;
        let mut h = Md5::new();
        while let Some(b) = s.try_next().await.map_err(ufs_err)? {
            h.update(&b);
        }
        Ok(hex(&h.finalize()))
    }

    async fn free(&mut self) -> Result<String, Stop> {
        let files = self.files().await?;
        let pinned = self
            .runner
            .ns
            .pinned_paths()
            .map_err(|e| Stop::Failed(e.to_string()))?;
        let (mut kept_pinned, mut kept_unpersisted) = (0u64, 0u64);
        for (i, f) in files.iter().enumerate().skip(self.p.resume_from as usize) {
            if is_below(&f.path, &pinned) {
                kept_pinned += 1;
            } else if f.persist_state != pb::PersistState::Persisted as i32 {
                kept_unpersisted += 1;
            } else {
                self.p.cached_pages += self.client().free_file(f).await;
            }
            self.p.files_done += 1;
            self.p.bytes_done += f.size;
            self.p.resume_from = i as u64 + 1;
            self.checkpoint().await?;
        }
        let mut note = format!("{} cached pages dropped", self.p.cached_pages);
        if kept_pinned > 0 {
            note += &format!("; {kept_pinned} pinned files kept (unpin them to free)");
        }
        if kept_unpersisted > 0 {
            note += &format!(
                "; {kept_unpersisted} files kept because they are not in the UFS yet \
                 (persist them first)"
            );
        }
        Ok(note)
    }

    async fn persist(&mut self) -> Result<String, Stop> {
        let files = self.files().await?;
        let mut written = 0u64;
        for (i, f) in files.iter().enumerate().skip(self.p.resume_from as usize) {
            if f.persist_state != pb::PersistState::Persisted as i32 && f.complete {
                match self.runner.ns.persist_file(&self.runner.client, f).await {
                    Ok(()) => written += 1,
                    Err(e) => self.file_failed(f, e),
                }
            }
            self.p.files_done += 1;
            self.p.bytes_done += f.size;
            self.p.resume_from = i as u64 + 1;
            self.checkpoint().await?;
        }
        Ok(format!("{written} files written to the UFS"))
    }

    /// Persists one ASYNC_THROUGH file, retrying with backoff: a worker
    /// that died holding one replica is only declared dead after
    /// `master.worker_timeout_ms`, and reads move to the next replica.
    async fn persist_inode(&mut self, inode: u64) -> Result<String, Stop> {
        let ns = &self.runner.ns;
        let due = self.job.created_ms + self.runner.config.master.persist_delay_ms as i64;
        let wait = due - now_ms();
        if wait > 0 {
            tokio::time::sleep(Duration::from_millis(wait as u64)).await;
        }
        let path = match ns.path_of(inode) {
            Ok(p) => p,
            Err(_) => return Ok("the file was deleted before it was persisted".into()),
        };
        let mut delay = Duration::from_millis(500);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let f = match self.client().stat(&path.to_string()).await {
                Ok(f) => f,
                Err(ClientError::NotFound(_)) => {
                    return Ok("the file was deleted before it was persisted".into());
                }
                Err(e) => return Err(e.into()),
            };
            self.p.files_total = 1;
            self.p.bytes_total = f.size;
            if f.id != inode || f.persist_state == pb::PersistState::Persisted as i32 {
                self.p.files_done = 1;
                return Ok("persisted already".into());
            }
            match ns.persist_file(self.client(), &f).await {
                Ok(()) => {
                    self.p.files_done = 1;
                    self.p.bytes_done = f.size;
                    return Ok(format!(
                        "written to the UFS{}",
                        if attempt > 1 {
                            format!(" after {attempt} attempts")
                        } else {
                            String::new()
                        }
                    ));
                }
                Err(e) if attempt >= PERSIST_ATTEMPTS => {
                    self.file_failed(&f, &e);
                    return Ok(String::new());
                }
                Err(e) => {
                    tracing::warn!(path = %f.path, attempt, error = %e, "persist failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(8));
                    self.checkpoint().await?;
                }
            }
        }
    }

    async fn copy(&mut self, dst: &str) -> Result<String, Stop> {
        let files = self.files().await?;
        let src_root = self.job.path.trim_end_matches('/').to_string();
        let src_is_file = files.len() == 1 && files[0].path == src_root;
        let dst_is_dir = matches!(self.client().stat(dst).await, Ok(i) if i.is_dir);
        // Write through to the UFS where the destination is mounted.
        let mounted = {
            let mut p = NsPath::parse(dst).map_err(|e| Stop::Failed(e.to_string()))?;
            loop {
                match self.client().stat(&p.to_string()).await {
                    Ok(i) => break i.mount_id != 0,
                    Err(_) => match p.parent() {
                        Some(q) => p = q,
                        None => break false,
                    },
                }
            }
        };
        let opts = WriteOptions {
            write_type: if mounted {
                pb::WriteType::CacheThrough
            } else {
                pb::WriteType::MustCache
            },
            overwrite: true,
            recursive: true,
            priority: 0,
        };
        for (i, f) in files.iter().enumerate().skip(self.p.resume_from as usize) {
            let target = if src_is_file {
                if dst_is_dir {
                    format!("{}/{}", dst.trim_end_matches('/'), f.name)
                } else {
                    dst.to_string()
                }
            } else {
                let rel = f.path.strip_prefix(&src_root).unwrap_or(&f.path);
                format!(
                    "{}/{}",
                    dst.trim_end_matches('/'),
                    rel.trim_start_matches('/')
                )
            };
            if let Err(e) = self.copy_one(f, &target, opts).await {
                self.file_failed(f, format!("copy to {target}: {e}"));
            }
            self.p.files_done += 1;
            self.p.bytes_done += f.size;
            self.p.resume_from = i as u64 + 1;
            self.checkpoint().await?;
        }
        Ok(format!("{} files copied to {dst}", self.p.files_done))
    }

    async fn copy_one(
        &self,
        f: &FileInfo,
        target: &str,
        opts: WriteOptions,
    ) -> Result<(), ClientError> {
        let r = self.client().open_info(f.clone())?;
        let mut w = self.client().create(target, opts).await?;
        let mut s = Box::pin(r.stream(0));
        loop {
            match s.try_next().await {
                Ok(Some(b)) => {
                    if let Err(e) = w.write(&b).await {
                        w.abort().await;
                        return Err(e);
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    w.abort().await;
                    return Err(e);
                }
            }
        }
        w.close().await.map(drop)
    }
}

/// How many attempts a block load gets after failing with `e`: errors of
/// the data itself are final, a UFS that did not answer was retried by the
/// worker already (once more here), anything else (a worker restarting, a
/// connection lost, a failover) is retried with backoff.
fn attempts_for(e: &ClientError) -> u32 {
    use strata_proto::data::ErrorCode;
    match e {
        ClientError::Changed { .. } | ClientError::NotFound(_) => 1,
        ClientError::Worker { code, .. } => match code {
            ErrorCode::UfsUnavailable => 2,
            ErrorCode::BadRequest
            | ErrorCode::NotFound
            | ErrorCode::Stale
            | ErrorCode::DataLost
            | ErrorCode::PermissionDenied => 1,
            _ => BLOCK_ATTEMPTS,
        },
        _ => BLOCK_ATTEMPTS,
    }
}

/// The semaphore for `k` in `m`, made with `n` permits on first use.
fn sem<K: std::hash::Hash + Eq>(
    m: &Mutex<HashMap<K, Arc<Semaphore>>>,
    k: K,
    n: usize,
) -> Arc<Semaphore> {
    m.lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(k)
        .or_insert_with(|| Arc::new(Semaphore::new(n)))
        .clone()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Namespace {
    /// Writes a file that exists only in the cache to its mount's UFS and
    /// records it as persisted (its cached pages stay valid).
    pub(crate) async fn persist_file(
        &self,
        client: &Client,
        f: &FileInfo,
    ) -> Result<(), MasterError> {
        let path = NsPath::parse(&f.path)?;
        if f.mount_id == 0 {
            return Err(MasterError::Invalid {
                path: path.to_string(),
                msg: "is not under a mount, so there is no UFS to persist it to".into(),
            });
        }
        let ufs = self.ufs_by_mount_id(f.mount_id)?;
        let ufs_err = |err| MasterError::Ufs {
            path: path.to_string(),
            err,
        };
        let r = client
            .open_info(f.clone())
            .map_err(|e| MasterError::Internal(e.to_string()))?;
        let mut w = ufs.writer(&f.ufs_path).await.map_err(ufs_err)?;
        let mut s = Box::pin(r.stream(0));
        loop {
            match s.try_next().await {
                Ok(Some(b)) => {
                    if let Err(e) = w.write(b).await {
                        let _ = w.abort().await;
                        return Err(ufs_err(e));
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = w.abort().await;
                    return Err(MasterError::Invalid {
                        path: path.to_string(),
                        msg: format!("reading the cached copy: {e}"),
                    });
                }
            }
        }
        let st = w.close().await.map_err(ufs_err)?;
        self.apply(Command::Persisted {
            id: f.id,
            generation: f.generation,
            fingerprint: st.fingerprint,
        })
        .await?;
        // The cached pages keep their identity; they may be evicted now.
        client.mark_persisted(f).await;
        Ok(())
    }
}
