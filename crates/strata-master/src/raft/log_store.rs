//! The Raft log and vote in their own redb file (`raft-log.redb` in
//! `master.data_dir`). One writer thread owns every write: appends queue up
//! while it syncs, and all that queued are written in one fsync'ed
//! transaction (group commit). `append` returns at once and openraft is told
//! when the entries are durable; until then reads are served from memory.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{AnyError, Entry, LogId, OptionalSend, StorageError, StorageIOError, Vote};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};

use super::TypeConfig;

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const VOTE: &str = "vote";
const PURGED: &str = "purged";

type SErr = StorageError<u64>;
type TxFn = Box<dyn FnOnce(&WriteTransaction) -> Result<(), redb::Error> + Send>;

/// Work for the writer thread, applied in the order it was queued.
enum Op {
    Append {
        seq: u64,
        entries: Vec<(u64, Vec<u8>)>,
        done: LogFlushed<TypeConfig>,
    },
    Write {
        f: TxFn,
        done: tokio::sync::oneshot::Sender<Result<(), String>>,
    },
}

/// Entries appended but not yet durable: (queue sequence, entry).
type Pending = BTreeMap<u64, (u64, Entry<TypeConfig>)>;

#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
    path: Arc<PathBuf>,
    pending: Arc<Mutex<Pending>>,
    queue: mpsc::Sender<Op>,
    seq: Arc<std::sync::atomic::AtomicU64>,
}

fn any(path: &Path, e: impl std::fmt::Display) -> AnyError {
    AnyError::error(format!("Raft log {}: {e}", path.display()))
}

impl LogStore {
    /// Opens the log in `dir`. A log file that redb cannot open is reported
    /// with the way out: a master whose log is lost rejoins as a new member.
    pub fn open(dir: &Path) -> Result<LogStore, String> {
        let path = dir.join("raft-log.redb");
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let db = Database::create(&path).map_err(|e| {
            format!(
                "cannot open the Raft log {}: {e}; if the file is damaged, remove this \
                 master from the cluster (`strata admin masters remove ID`), delete its \
                 data directory and add it back: it catches up from the others",
                path.display()
            )
        })?;
        let tx = db.begin_write().map_err(|e| e.to_string())?;
        tx.open_table(LOG).map_err(|e| e.to_string())?;
        tx.open_table(META).map_err(|e| e.to_string())?;
        tx.commit().map_err(|e| e.to_string())?;
        let db = Arc::new(db);
        let pending = Arc::new(Mutex::new(Pending::new()));
        let (queue, rx) = mpsc::channel();
        {
            let (db, pending, path) = (db.clone(), pending.clone(), path.clone());
            std::thread::Builder::new()
                .name("raft-log".into())
                .spawn(move || writer(db, pending, path, rx))
                .map_err(|e| format!("cannot start the Raft log writer: {e}"))?;
        }
        Ok(LogStore {
            db,
            path: Arc::new(path),
            pending,
            queue,
            seq: Arc::new(std::sync::atomic::AtomicU64::new(1)),
        })
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn meta<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>, AnyError> {
        let e = |x: redb::Error| any(&self.path, x);
        let tx = self.db.begin_read().map_err(|x| e(x.into()))?;
        let t = tx.open_table(META).map_err(|x| e(x.into()))?;
        let v = t.get(key).map_err(|x| e(x.into()))?;
        v.map(|g| postcard::from_bytes(g.value()).map_err(|x| any(&self.path, x)))
            .transpose()
    }

    /// Queues a write after every earlier one and waits until it is durable.
    async fn write<F>(&self, f: F) -> Result<(), AnyError>
    where
        F: FnOnce(&WriteTransaction) -> Result<(), redb::Error> + Send + 'static,
    {
        let (done, rx) = tokio::sync::oneshot::channel();
        self.queue
            .send(Op::Write {
                f: Box::new(f),
                done,
            })
            .map_err(|_| any(&self.path, "the log writer has stopped"))?;
        rx.await
            .map_err(|_| any(&self.path, "the log writer has stopped"))?
            .map_err(|e| any(&self.path, e))
    }

    fn entries(&self, lo: u64, hi: Bound<u64>) -> Result<Vec<Entry<TypeConfig>>, AnyError> {
        // Pending first: an entry leaves it only after it is in the file.
        let mut out: BTreeMap<u64, Entry<TypeConfig>> = self
            .pending()
            .range((Bound::Included(lo), hi))
            .map(|(k, (_, e))| (*k, e.clone()))
            .collect();
        let e = |x: redb::Error| any(&self.path, x);
        let tx = self.db.begin_read().map_err(|x| e(x.into()))?;
        let t = tx.open_table(LOG).map_err(|x| e(x.into()))?;
        for kv in t
            .range::<u64>((Bound::Included(lo), hi))
            .map_err(|x| e(x.into()))?
        {
            let (k, v) = kv.map_err(|x| e(x.into()))?;
            if out.contains_key(&k.value()) {
                continue;
            }
            let ent: Entry<TypeConfig> = postcard::from_bytes(v.value()).map_err(|x| {
                any(
                    &self.path,
                    format!(
                        "entry {} cannot be decoded ({x}): the log is damaged",
                        k.value()
                    ),
                )
            })?;
            out.insert(k.value(), ent);
        }
        Ok(out.into_values().collect())
    }
}

/// The writer thread: drains the queue, writes everything in one
/// transaction, syncs once, then reports completion in order.
fn writer(db: Arc<Database>, pending: Arc<Mutex<Pending>>, path: PathBuf, rx: mpsc::Receiver<Op>) {
    while let Ok(first) = rx.recv() {
        let mut ops = vec![first];
        while let Ok(op) = rx.try_recv() {
            ops.push(op);
            if ops.len() >= 4096 {
                break;
            }
        }
        let result = (|| -> Result<Vec<Result<(), String>>, redb::Error> {
            let tx = db.begin_write()?;
            let mut results = Vec::with_capacity(ops.len());
            for op in ops.iter_mut() {
                match op {
                    Op::Append { entries, .. } => {
                        let mut t = tx.open_table(LOG)?;
                        for (i, v) in entries.iter() {
                            t.insert(*i, v.as_slice())?;
                        }
                        results.push(Ok(()));
                    }
                    Op::Write { f, .. } => {
                        let f = std::mem::replace(f, Box::new(|_| Ok(())));
                        results.push(f(&tx).map_err(|e| e.to_string()));
                    }
                }
            }
            tx.commit()?;
            tracing::debug!(ops = results.len(), "raft log commit");
            Ok(results)
        })();
        let results = match result {
            Ok(r) => r,
            Err(e) => {
                let msg = format!("Raft log {}: {e}", path.display());
                tracing::error!(%msg, "cannot write the Raft log");
                ops.iter().map(|_| Err(msg.clone())).collect()
            }
        };
        let mut p = pending.lock().unwrap_or_else(|p| p.into_inner());
        let mut done = Vec::new();
        for (op, r) in ops.into_iter().zip(results) {
            match op {
                Op::Append {
                    seq,
                    entries,
                    done: cb,
                } => {
                    if r.is_ok() {
                        for (i, _) in &entries {
                            if p.get(i).is_some_and(|(s, _)| *s == seq) {
                                p.remove(i);
                            }
                        }
                    }
                    done.push((cb, r));
                }
                Op::Write { done: tx, .. } => {
                    let _ = tx.send(r);
                }
            }
        }
        drop(p);
        for (cb, r) in done {
            cb.log_io_completed(r.map_err(std::io::Error::other));
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, SErr> {
        let lo = match range.start_bound() {
            Bound::Included(&x) => x,
            Bound::Excluded(&x) => x + 1,
            Bound::Unbounded => 0,
        };
        let hi = range.end_bound().cloned();
        let s = self.clone();
        tokio::task::spawn_blocking(move || s.entries(lo, hi))
            .await
            .map_err(|e| StorageIOError::read_logs(AnyError::error(e)))?
            .map_err(|e| StorageIOError::read_logs(e).into())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, SErr> {
        let purged: Option<LogId<u64>> = self.meta(PURGED).map_err(StorageIOError::read_logs)?;
        let last = {
            let e = |x: redb::Error| StorageIOError::read_logs(any(&self.path, x));
            let tx = self.db.begin_read().map_err(|x| e(x.into()))?;
            let t = tx.open_table(LOG).map_err(|x| e(x.into()))?;
            let last = t.last().map_err(|x| e(x.into()))?;
            match last {
                Some((_, v)) => {
                    let ent: Entry<TypeConfig> = postcard::from_bytes(v.value())
                        .map_err(|x| StorageIOError::read_logs(any(&self.path, x)))?;
                    Some(ent.log_id)
                }
                None => None,
            }
        };
        let pending_last = self.pending().values().next_back().map(|(_, e)| e.log_id);
        let last = match (last, pending_last) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        Ok(LogState {
            last_purged_log_id: purged,
            last_log_id: last.or(purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), SErr> {
        let v = postcard::to_allocvec(vote)
            .map_err(|e| StorageIOError::write_vote(AnyError::new(&e)))?;
        self.write(move |tx| {
            tx.open_table(META)?.insert(VOTE, v.as_slice())?;
            Ok(())
        })
        .await
        .map_err(|e| StorageIOError::write_vote(e).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, SErr> {
        self.meta(VOTE)
            .map_err(|e| StorageIOError::read_vote(e).into())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), SErr>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let seq = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut enc = Vec::new();
        {
            let mut p = self.pending();
            for ent in entries {
                let v = postcard::to_allocvec(&ent)
                    .map_err(|e| StorageIOError::write_logs(AnyError::new(&e)))?;
                enc.push((ent.log_id.index, v));
                p.insert(ent.log_id.index, (seq, ent));
            }
        }
        self.queue
            .send(Op::Append {
                seq,
                entries: enc,
                done: callback,
            })
            .map_err(|_| {
                StorageIOError::write_logs(any(&self.path, "the log writer has stopped"))
            })?;
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> Result<(), SErr> {
        self.pending().retain(|i, _| *i < log_id.index);
        self.write(move |tx| {
            let mut t = tx.open_table(LOG)?;
            t.retain_in(log_id.index.., |_, _| false)?;
            Ok(())
        })
        .await
        .map_err(|e| StorageIOError::write_logs(e).into())
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> Result<(), SErr> {
        let v = postcard::to_allocvec(&log_id)
            .map_err(|e| StorageIOError::write_logs(AnyError::new(&e)))?;
        self.pending().retain(|i, _| *i > log_id.index);
        self.write(move |tx| {
            tx.open_table(META)?.insert(PURGED, v.as_slice())?;
            let mut t = tx.open_table(LOG)?;
            t.retain_in(..=log_id.index, |_, _| false)?;
            Ok(())
        })
        .await
        .map_err(|e| StorageIOError::write_logs(e).into())
    }
}
