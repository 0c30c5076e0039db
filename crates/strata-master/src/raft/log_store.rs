//! The Raft log and vote in their own redb file (`raft-log.redb` in
//! `master.data_dir`). Every append is one fsync'ed transaction; openraft
//! hands over all entries that queued up meanwhile, so concurrent writes
//! share an fsync (group commit).

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{AnyError, Entry, LogId, OptionalSend, StorageError, StorageIOError, Vote};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::TypeConfig;

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const VOTE: &str = "vote";
const PURGED: &str = "purged";

type SErr = StorageError<u64>;

#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
    path: Arc<PathBuf>,
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
        Ok(LogStore {
            db: Arc::new(db),
            path: Arc::new(path),
        })
    }

    fn meta<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>, AnyError> {
        let e = |x: redb::Error| any(&self.path, x);
        let tx = self.db.begin_read().map_err(|x| e(x.into()))?;
        let t = tx.open_table(META).map_err(|x| e(x.into()))?;
        let v = t.get(key).map_err(|x| e(x.into()))?;
        v.map(|g| postcard::from_bytes(g.value()).map_err(|x| any(&self.path, x)))
            .transpose()
    }

    /// Runs a durable write transaction off the async threads.
    async fn write<F>(&self, f: F) -> Result<(), AnyError>
    where
        F: FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error> + Send + 'static,
    {
        let db = self.db.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let tx = db.begin_write().map_err(|e| any(&path, e))?;
            f(&tx).map_err(|e| any(&path, e))?;
            tx.commit().map_err(|e| any(&path, e))
        })
        .await
        .map_err(|e| AnyError::error(format!("Raft log write task: {e}")))?
    }

    fn entries(&self, lo: u64, hi: Bound<u64>) -> Result<Vec<Entry<TypeConfig>>, AnyError> {
        let e = |x: redb::Error| any(&self.path, x);
        let tx = self.db.begin_read().map_err(|x| e(x.into()))?;
        let t = tx.open_table(LOG).map_err(|x| e(x.into()))?;
        let mut out = Vec::new();
        for kv in t
            .range::<u64>((Bound::Included(lo), hi))
            .map_err(|x| e(x.into()))?
        {
            let (k, v) = kv.map_err(|x| e(x.into()))?;
            let ent: Entry<TypeConfig> = postcard::from_bytes(v.value()).map_err(|x| {
                any(
                    &self.path,
                    format!(
                        "entry {} cannot be decoded ({x}): the log is damaged",
                        k.value()
                    ),
                )
            })?;
            out.push(ent);
        }
        Ok(out)
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
        let mut enc = Vec::new();
        for ent in entries {
            let v = postcard::to_allocvec(&ent)
                .map_err(|e| StorageIOError::write_logs(AnyError::new(&e)))?;
            enc.push((ent.log_id.index, v));
        }
        let r = self
            .write(move |tx| {
                let mut t = tx.open_table(LOG)?;
                for (i, v) in &enc {
                    t.insert(*i, v.as_slice())?;
                }
                Ok(())
            })
            .await;
        match r {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(StorageIOError::write_logs(e).into())
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> Result<(), SErr> {
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
