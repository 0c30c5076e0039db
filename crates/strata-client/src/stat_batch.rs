//! Stats of concurrent callers travel together: a stat joins a queue, and
//! up to [`MAX_DRIVERS`] background tasks send what is queued as one
//! `GetFileInfos` call (one read barrier and one RPC for the lot), then
//! the next lot, until the queue is empty. A lone stat goes out at once as
//! an ordinary `GetFileInfo`; nothing waits for a batch to fill.

use std::sync::Mutex;

use tokio::sync::oneshot;

use crate::{Client, ClientError, FileInfo, Result, pb};

/// Batches in flight at once (and so tasks sending them).
const MAX_DRIVERS: usize = 8;
/// Most stats in one call (the master accepts up to 1024).
const MAX_BATCH: usize = 512;

type Waiter = (String, oneshot::Sender<Result<FileInfo>>);

#[derive(Default)]
pub(crate) struct StatBatcher {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    pending: Vec<Waiter>,
    drivers: usize,
    /// The masters do not know GetFileInfos (an older version): stat one
    /// path at a time.
    unsupported: bool,
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Gives a driver's slot back even if its task panics.
struct Slot<'a>(&'a StatBatcher);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        lock(&self.0.state).drivers -= 1;
    }
}

impl Client {
    /// Queues a stat of the (already normalised) `path`.
    pub(crate) async fn stat_batched(&self, path: String) -> Result<FileInfo> {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut s = lock(&self.inner.stats.state);
            s.pending.push((path, tx));
            let start = s.drivers < MAX_DRIVERS;
            if start {
                s.drivers += 1;
            }
            start
        };
        if start {
            // A task of its own: a caller that stops waiting must not
            // strand the stats of others.
            let c = self.clone();
            tokio::spawn(async move { c.drive_stats().await });
        }
        rx.await
            .unwrap_or_else(|_| Err(ClientError::Other("a batched stat was dropped".into())))
    }

    async fn drive_stats(&self) {
        let b = &self.inner.stats;
        let _slot = Slot(b);
        loop {
            let (batch, unsupported) = {
                let mut s = lock(&b.state);
                if s.pending.is_empty() {
                    return;
                }
                let n = s.pending.len().min(MAX_BATCH);
                (s.pending.drain(..n).collect::<Vec<_>>(), s.unsupported)
            };
            if batch.len() == 1 || unsupported {
                for (path, tx) in batch {
                    let _ = tx.send(self.stat_one(&path).await);
                }
                continue;
            }
            let req = pb::PathsRequest {
                paths: batch.iter().map(|(p, _)| p.clone()).collect(),
            };
            match self
                .master_read(req, |mut c, r| async move { c.get_file_infos(r).await })
                .await
            {
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
                        lock(&b.state).unsupported = true;
                    }
                    for (path, tx) in batch {
                        let _ = tx.send(self.stat_one(&path).await);
                    }
                }
            }
        }
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
