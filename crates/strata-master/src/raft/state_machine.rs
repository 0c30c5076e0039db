//! The replicated state machine: committed entries applied to
//! [`strata_meta::MetaStore`], with the last applied log id and membership
//! stored in the same transactions; snapshots are whole-store exports.

use std::io::Cursor;
use std::path::PathBuf;
use std::sync::Arc;

use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{
    AnyError, BasicNode, Entry, EntryPayload, LogId, OptionalSend, StorageError, StorageIOError,
    StoredMembership,
};
use serde::{Deserialize, Serialize};
use strata_meta::{LoggedCommand, MetaStore};

use super::{Response, TypeConfig};

const APPLIED: &str = "raft_applied";
const MEMBERSHIP: &str = "raft_membership";
/// Applied entries between durable commits of the state machine (the log
/// is durable already; this bounds how much a restart replays).
const FLUSH_EVERY: u64 = 4096;

type SErr = StorageError<u64>;
type Membership = StoredMembership<u64, BasicNode>;

#[derive(Serialize, Deserialize)]
struct SnapshotFile {
    meta: SnapshotMeta<u64, BasicNode>,
    data: Vec<u8>,
}

pub struct StateMachine {
    store: Arc<MetaStore>,
    snapshot_path: PathBuf,
    since_flush: u64,
}

fn any(e: impl std::fmt::Display) -> AnyError {
    AnyError::error(e.to_string())
}

impl StateMachine {
    pub fn new(store: Arc<MetaStore>, dir: &std::path::Path) -> Self {
        StateMachine {
            store,
            snapshot_path: dir.join("raft-snapshot.bin"),
            since_flush: 0,
        }
    }

    fn read_applied(store: &MetaStore) -> Result<(Option<LogId<u64>>, Membership), AnyError> {
        decode_applied(
            store.repl_state(APPLIED).map_err(any)?,
            store.repl_state(MEMBERSHIP).map_err(any)?,
        )
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId<u64>>, Membership), SErr> {
        Self::read_applied(&self.store).map_err(|e| StorageIOError::read_state_machine(e).into())
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, SErr>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        let store = self.store.clone();
        let n = entries.len() as u64;
        self.since_flush += n;
        let flush = self.since_flush >= FLUSH_EVERY;
        if flush {
            self.since_flush = 0;
        }
        // openraft's error type is large; it is returned once, on failure.
        #[allow(clippy::result_large_err)]
        let apply = move || -> Result<Vec<Response>, SErr> {
            // Per entry: its replication state (stored with its last
            // command) and its commands.
            let mut states = Vec::with_capacity(entries.len());
            for ent in &entries {
                let enc_id = postcard::to_allocvec(&ent.log_id)
                    .map_err(|e| StorageIOError::apply(ent.log_id, any(e)))?;
                let mut state = vec![(APPLIED, enc_id)];
                if let EntryPayload::Membership(m) = &ent.payload {
                    let sm = Membership::new(Some(ent.log_id), m.clone());
                    let b = postcard::to_allocvec(&sm)
                        .map_err(|e| StorageIOError::apply(ent.log_id, any(e)))?;
                    state.push((MEMBERSHIP, b));
                }
                states.push(state);
            }
            let mut logged: Vec<LoggedCommand<'_>> = Vec::new();
            let mut counts = Vec::with_capacity(entries.len());
            for (ent, state) in entries.iter().zip(&states) {
                let base = ent.log_id.index << 16;
                match &ent.payload {
                    EntryPayload::Normal(req) if !req.items.is_empty() => {
                        let n = req.items.len();
                        for (i, item) in req.items.iter().enumerate() {
                            logged.push(LoggedCommand {
                                index: base | i as u64,
                                command: Some(&item.command),
                                request: item.request_id,
                                state: if i + 1 == n { state } else { &[] },
                            });
                        }
                        counts.push(n);
                    }
                    _ => {
                        logged.push(LoggedCommand {
                            index: base,
                            command: None,
                            request: None,
                            state,
                        });
                        counts.push(0);
                    }
                }
            }
            let first = entries.first().map(|e| e.log_id);
            let mut outs = store
                .apply_logged_batch(&logged, flush)
                .map_err(|e| match first {
                    Some(id) => SErr::from(StorageIOError::apply(id, any(e))),
                    None => SErr::from(StorageIOError::write_state_machine(any(e))),
                })?
                .into_iter();
            Ok(counts
                .into_iter()
                .map(|n| {
                    if n == 0 {
                        outs.next();
                        Vec::new()
                    } else {
                        outs.by_ref().take(n).collect()
                    }
                })
                .collect())
        };
        tokio::task::spawn_blocking(apply)
            .await
            .map_err(|e| StorageIOError::write_state_machine(any(e)))?
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            store: self.store.clone(),
            snapshot_path: self.snapshot_path.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, SErr> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), SErr> {
        let data = snapshot.into_inner();
        let store = self.store.clone();
        let path = self.snapshot_path.clone();
        let file = SnapshotFile {
            meta: meta.clone(),
            data,
        };
        let sig = meta.signature();
        tokio::task::spawn_blocking(move || -> Result<(), AnyError> {
            store.import(&file.data).map_err(any)?;
            save_snapshot(&path, &file)
        })
        .await
        .map_err(|e| StorageIOError::write_snapshot(Some(sig.clone()), any(e)))?
        .map_err(|e| StorageIOError::write_snapshot(Some(sig), e).into())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, SErr> {
        let path = self.snapshot_path.clone();
        let f = tokio::task::spawn_blocking(move || -> Result<Option<SnapshotFile>, AnyError> {
            match std::fs::read(&path) {
                Ok(b) => Ok(Some(postcard::from_bytes(&b).map_err(|e| {
                    any(format!(
                        "snapshot {} cannot be decoded: {e}",
                        path.display()
                    ))
                })?)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(any(format!("{}: {e}", path.display()))),
            }
        })
        .await
        .map_err(|e| StorageIOError::read_snapshot(None, any(e)))?
        .map_err(|e| StorageIOError::read_snapshot(None, e))?;
        Ok(f.map(|f| Snapshot {
            meta: f.meta,
            snapshot: Box::new(Cursor::new(f.data)),
        }))
    }
}

fn decode_applied(
    applied: Option<Vec<u8>>,
    membership: Option<Vec<u8>>,
) -> Result<(Option<LogId<u64>>, Membership), AnyError> {
    let applied = match applied {
        Some(b) => Some(postcard::from_bytes(&b).map_err(any)?),
        None => None,
    };
    let membership = match membership {
        Some(b) => postcard::from_bytes(&b).map_err(any)?,
        None => Membership::default(),
    };
    Ok((applied, membership))
}

fn save_snapshot(path: &std::path::Path, f: &SnapshotFile) -> Result<(), AnyError> {
    let tmp = path.with_extension("tmp");
    let bytes = postcard::to_allocvec(f).map_err(any)?;
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| any(format!("{}: {e}", path.display())))
}

pub struct SnapshotBuilder {
    store: Arc<MetaStore>,
    snapshot_path: PathBuf,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, SErr> {
        let store = self.store.clone();
        let path = self.snapshot_path.clone();
        let file = tokio::task::spawn_blocking(move || -> Result<SnapshotFile, AnyError> {
            // The applied id and membership come from the export's own read
            // transaction, so they describe exactly the exported state.
            let started = std::time::Instant::now();
            let (data, repl) = store.export().map_err(any)?;
            let exported = started.elapsed();
            let get = |k: &str| repl.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
            let (last_log_id, membership) = decode_applied(get(APPLIED), get(MEMBERSHIP))?;
            let snapshot_id = format!(
                "{}-{}",
                last_log_id.map(|l| l.index).unwrap_or(0),
                strata_common::now_ms()
            );
            let file = SnapshotFile {
                meta: SnapshotMeta {
                    last_log_id,
                    last_membership: membership,
                    snapshot_id,
                },
                data,
            };
            save_snapshot(&path, &file)?;
            tracing::info!(
                index = last_log_id.map(|l| l.index).unwrap_or(0),
                bytes = file.data.len(),
                export_ms = exported.as_millis() as u64,
                total_ms = started.elapsed().as_millis() as u64,
                "snapshot built"
            );
            Ok(file)
        })
        .await
        .map_err(|e| StorageIOError::write_snapshot(None, any(e)))?
        .map_err(|e| StorageIOError::write_snapshot(None, e))?;
        Ok(Snapshot {
            meta: file.meta,
            snapshot: Box::new(Cursor::new(file.data)),
        })
    }
}
