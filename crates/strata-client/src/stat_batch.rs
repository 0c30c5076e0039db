//! Stats of concurrent callers travel together ([`crate::batch`]): up to
//! [`MAX_DRIVERS`] batches in flight, each with one read barrier for the
//! lot. Batches go to a master on a
//! long-lived `StatStream` kept per master (one message each way instead
//! of a gRPC call per batch); a master without it gets `GetFileInfos`
//! calls (or `GetFileInfo`, one path at a time, if it lacks that too).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};

use crate::batch::Queue;
use crate::{Client, ClientError, FileInfo, Result, pb};

/// Batches in flight at once (and so tasks sending them). Few and large
/// beats many and small: each batch costs a master a receive, a wake-up
/// and a send whatever its size. Measured with 128 stats in flight against
/// 3 masters each held to 15 % of a core (docs/benchmarks.md, "Follower
/// reads under equal CPU caps"): 8 batches gave 2.42× the leader alone,
/// 4 gave 2.71×, 2 gave 3.01×; uncapped, with 1024 in flight, 4 did best
/// (87–124 k stats/s against 80–87 k with 2 and 76–97 k with 8).
const MAX_DRIVERS: usize = 4;
/// Most stats in one call (the master accepts up to 1024).
const MAX_BATCH: usize = 512;

#[derive(Default)]
pub(crate) struct StatBatcher {
    queue: Queue<String, FileInfo>,
    /// The masters do not know GetFileInfos (an older version): stat one
    /// path at a time.
    unsupported: AtomicBool,
    /// The open stat stream to each master.
    streams: Mutex<HashMap<String, Arc<StatStream>>>,
    /// Masters that answered `Unimplemented` to a stream (older versions).
    no_stream: Mutex<HashSet<String>>,
}

type Reply = std::result::Result<pb::StatBatchReply, tonic::Status>;

/// One open `StatStream`: batches out on `tx`, answers matched by seq.
struct StatStream {
    tx: mpsc::Sender<pb::StatBatch>,
    seq: AtomicU64,
    /// Batches sent and not yet answered; `None` once the stream ended.
    waiting: Mutex<Option<HashMap<u64, oneshot::Sender<Reply>>>>,
}

/// Batches one stream carries unanswered (the master answers up to 32 at
/// once; the client has at most [`MAX_DRIVERS`] out).
const STREAM_QUEUE: usize = 64;

/// Why a batch came back without an answer: the stream it went on had
/// ended (the master's idle limit, a restart); another stream may work.
const STREAM_ENDED: &str = "the stat stream ended";

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Client {
    /// Queues a stat of the (already normalised) `path`.
    pub(crate) async fn stat_batched(&self, path: String) -> Result<FileInfo> {
        let (rx, start) = self.inner.stats.queue.push(path, MAX_DRIVERS);
        if start {
            let c = self.clone();
            tokio::spawn(async move { c.drive_stats().await });
        }
        crate::batch::answer(rx, "stat").await
    }

    async fn drive_stats(&self) {
        let b = &self.inner.stats;
        let mut driver = b.queue.driver();
        while let Some(batch) = driver.next(MAX_BATCH) {
            if b.unsupported.load(Ordering::Relaxed) {
                for (path, tx) in batch {
                    let _ = tx.send(self.stat_one(&path).await);
                }
                continue;
            }
            let paths: Vec<String> = batch.iter().map(|(p, _)| p.clone()).collect();
            match self.stat_many(paths).await {
                Ok(resp) if resp.results.len() == batch.len() => {
                    for ((_, tx), r) in batch.into_iter().zip(resp.results) {
                        let _ = tx.send(match (r.code, r.info) {
                            (0, Some(info)) => Ok(info),
                            (code, _) => Err(ClientError::from_status(
                                tonic::Status::new(tonic::Code::from(code), r.message),
                                &self.inner.master_addr,
                            )),
                        });
                    }
                }
                Ok(resp) => {
                    let e = format!(
                        "the master answered {} of {} stats",
                        resp.results.len(),
                        batch.len()
                    );
                    for (_, tx) in batch {
                        let _ = tx.send(Err(ClientError::Other(e.clone())));
                    }
                }
                Err(e) => {
                    // An older master without GetFileInfos, or a failure:
                    // each stat on its own gets its own precise answer.
                    let text = e.to_string().to_ascii_lowercase();
                    if text.contains("unimplemented") || text.contains("not implemented") {
                        b.unsupported.store(true, Ordering::Relaxed);
                    }
                    for (path, tx) in batch {
                        let _ = tx.send(self.stat_one(&path).await);
                    }
                }
            }
        }
    }

    /// Stats of `paths` on one master chosen by the read mode (retried
    /// through failovers like any read): on its stat stream, else as a
    /// `GetFileInfos` call.
    async fn stat_many(&self, paths: Vec<String>) -> Result<pb::FileInfosResponse> {
        let set = &self.inner.masters;
        let stale = set.read_from() == strata_proto::masters::ReadFrom::AnyStale;
        set.call_at(false, |addr, c| {
            let paths = paths.clone();
            async move {
                if !lock(&self.inner.stats.no_stream).contains(&addr) {
                    match self.stat_on_stream(&addr, c.clone(), &paths, stale).await {
                        Err(s) if s.code() == tonic::Code::Unimplemented => {
                            tracing::info!(master = %addr, "the master has no stat stream: one call per batch");
                            lock(&self.inner.stats.no_stream).insert(addr.clone());
                        }
                        r => return r,
                    }
                }
                let mut c = c;
                c.get_file_infos(set.request(pb::PathsRequest { paths }, None))
                    .await
            }
        })
        .await
        .map_err(|e| self.call_err(e))
    }

    /// One batch on the stream to `addr` (opened if there is none). A
    /// batch that finds its stream ended goes once more on a new one.
    async fn stat_on_stream(
        &self,
        addr: &str,
        client: crate::MasterClient<tonic::transport::Channel>,
        paths: &[String],
        stale: bool,
    ) -> std::result::Result<tonic::Response<pb::FileInfosResponse>, tonic::Status> {
        let b = &self.inner.stats;
        for attempt in 0..2 {
            let kept = lock(&b.streams).get(addr).cloned();
            let stream = match kept {
                Some(s) => s,
                None => {
                    let s = StatStream::open(client.clone()).await?;
                    // Another batch may have opened one meanwhile: keep
                    // that one (this one ends when `s` is dropped).
                    lock(&b.streams)
                        .entry(addr.to_string())
                        .or_insert(s)
                        .clone()
                }
            };
            let reply = match stream.send(paths.to_vec(), stale).await {
                Ok(r) => r,
                Err(s) => {
                    // Forget this stream (unless another took its place).
                    let mut m = lock(&b.streams);
                    if m.get(addr).is_some_and(|x| Arc::ptr_eq(x, &stream)) {
                        m.remove(addr);
                    }
                    drop(m);
                    if attempt == 0 && s.message() == STREAM_ENDED {
                        continue;
                    }
                    return Err(s);
                }
            };
            if reply.code != 0 {
                let mut s = tonic::Status::new(tonic::Code::from(reply.code), reply.message);
                if !reply.leader.is_empty()
                    && let Ok(v) = reply.leader.parse()
                {
                    s.metadata_mut()
                        .insert(strata_proto::masters::LEADER_HEADER, v);
                }
                return Err(s);
            }
            return Ok(tonic::Response::new(pb::FileInfosResponse {
                results: reply.results,
            }));
        }
        Err(tonic::Status::unavailable(STREAM_ENDED))
    }

    /// One stat as its own call.
    pub(crate) async fn stat_one(&self, path: &str) -> Result<FileInfo> {
        self.master_read(
            pb::PathRequest {
                path: path.to_string(),
            },
            |mut c, r| async move { c.get_file_info(r).await },
        )
        .await
    }
}

impl StatStream {
    /// Opens a stream on `client`'s connection; a task hands each answer to
    /// the batch waiting for it and, when the stream ends, fails the rest.
    async fn open(
        mut client: crate::MasterClient<tonic::transport::Channel>,
    ) -> std::result::Result<Arc<Self>, tonic::Status> {
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        let out =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (b, rx)) });
        let mut answers = client.stat_stream(out).await?.into_inner();
        let s = Arc::new(StatStream {
            tx,
            seq: AtomicU64::new(0),
            waiting: Mutex::new(Some(HashMap::new())),
        });
        let weak = Arc::downgrade(&s);
        tokio::spawn(async move {
            let end = loop {
                match answers.message().await {
                    Ok(Some(r)) => {
                        let Some(s) = weak.upgrade() else { return };
                        let w = lock(&s.waiting).as_mut().and_then(|m| m.remove(&r.seq));
                        if let Some(w) = w {
                            let _ = w.send(Ok(r));
                        }
                    }
                    Ok(None) => break tonic::Status::unavailable(STREAM_ENDED),
                    Err(e) => break e,
                }
            };
            if let Some(s) = weak.upgrade() {
                let left = lock(&s.waiting).take().unwrap_or_default();
                for (_, w) in left {
                    let _ = w.send(Err(end.clone()));
                }
            }
        });
        Ok(s)
    }

    async fn send(&self, paths: Vec<String>, stale: bool) -> Reply {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = oneshot::channel();
        match lock(&self.waiting).as_mut() {
            Some(m) => m.insert(seq, tx),
            None => return Err(tonic::Status::unavailable(STREAM_ENDED)),
        };
        if self
            .tx
            .send(pb::StatBatch { seq, paths, stale })
            .await
            .is_err()
        {
            if let Some(m) = lock(&self.waiting).as_mut() {
                m.remove(&seq);
            }
            return Err(tonic::Status::unavailable(STREAM_ENDED));
        }
        rx.await
            .unwrap_or_else(|_| Err(tonic::Status::unavailable(STREAM_ENDED)))
    }
}
