//! The replicated state machine: committed entries applied to
//! [`strata_meta::MetaStore`], with the last applied log id and membership
//! stored in the same transactions; snapshots are whole-store exports.
//!
//! A snapshot lives in a file of its own (`raft-snapshot-<id>.data`), named
//! by `raft-snapshot.meta`: it is written from one read transaction through
//! a buffer, sent in chunks read from the file, received into a file and
//! imported from it a window at a time, so memory stays flat however large
//! the namespace is.

use std::io::{Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::fs::File;
use tokio::io::AsyncWriteExt;

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

/// The format before snapshots had files of their own (read once, to
/// convert it).
#[derive(Serialize, Deserialize)]
struct LegacySnapshotFile {
    meta: SnapshotMeta<u64, BasicNode>,
    data: Vec<u8>,
}

/// `raft-snapshot.meta`: the current snapshot and the file holding it.
#[derive(Serialize, Deserialize)]
struct SnapshotIndex {
    meta: SnapshotMeta<u64, BasicNode>,
    file: String,
}

pub struct StateMachine {
    store: Arc<MetaStore>,
    dir: PathBuf,
    since_flush: u64,
    /// The file a snapshot from the leader is being received into.
    receiving: Option<PathBuf>,
}

fn any(e: impl std::fmt::Display) -> AnyError {
    AnyError::error(e.to_string())
}

impl StateMachine {
    pub fn new(store: Arc<MetaStore>, dir: &std::path::Path) -> Self {
        StateMachine {
            store,
            dir: dir.to_path_buf(),
            since_flush: 0,
            receiving: None,
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
            dir: self.dir.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<File>, SErr> {
        let path = self.dir.join(format!(
            "raft-snapshot-incoming-{}.tmp",
            strata_common::now_ms()
        ));
        let f = tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .await
            .map_err(|e| {
                StorageIOError::write_snapshot(None, any(format!("{}: {e}", path.display())))
            })?;
        self.receiving = Some(path);
        Ok(Box::new(f))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, BasicNode>,
        mut snapshot: Box<File>,
    ) -> Result<(), SErr> {
        let sig = meta.signature();
        let fail = |e: AnyError| SErr::from(StorageIOError::write_snapshot(Some(sig.clone()), e));
        snapshot
            .flush()
            .await
            .map_err(|e| fail(any(format!("received snapshot: {e}"))))?;
        let received = self.receiving.take();
        let store = self.store.clone();
        let dir = self.dir.clone();
        let meta = meta.clone();
        let file = snapshot.into_std().await;
        tokio::task::spawn_blocking(move || -> Result<(), AnyError> {
            let mut file = file;
            file.sync_all().map_err(any)?;
            file.rewind().map_err(any)?;
            store
                .import_from(std::io::BufReader::with_capacity(1 << 20, &file))
                .map_err(any)?;
            let name = data_name(&meta);
            match received {
                Some(p) => std::fs::rename(&p, dir.join(&name))
                    .map_err(|e| any(format!("{}: {e}", p.display())))?,
                None => {
                    // Not received through begin_receiving_snapshot: copy it.
                    file.rewind().map_err(any)?;
                    let mut out = std::fs::File::create(dir.join(&name)).map_err(any)?;
                    std::io::copy(&mut file, &mut out).map_err(any)?;
                    out.sync_all().map_err(any)?;
                }
            }
            set_current(&dir, &meta, &name)
        })
        .await
        .map_err(|e| fail(any(e)))?
        .map_err(fail)
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, SErr> {
        let dir = self.dir.clone();
        let current = tokio::task::spawn_blocking(move || current_snapshot(&dir))
            .await
            .map_err(|e| StorageIOError::read_snapshot(None, any(e)))?
            .map_err(|e| StorageIOError::read_snapshot(None, e))?;
        let Some(index) = current else {
            return Ok(None);
        };
        let path = self.dir.join(&index.file);
        let f = File::open(&path).await.map_err(|e| {
            StorageIOError::read_snapshot(
                Some(index.meta.signature()),
                any(format!("{}: {e}", path.display())),
            )
        })?;
        Ok(Some(Snapshot {
            meta: index.meta,
            snapshot: Box::new(f),
        }))
    }
}

/// The data file of snapshot `meta`.
fn data_name(meta: &SnapshotMeta<u64, BasicNode>) -> String {
    format!("raft-snapshot-{}.data", meta.snapshot_id)
}

/// Makes `name` the current snapshot (an atomic rename of the index) and
/// removes every other snapshot file.
fn set_current(
    dir: &Path,
    meta: &SnapshotMeta<u64, BasicNode>,
    name: &str,
) -> Result<(), AnyError> {
    let index = SnapshotIndex {
        meta: meta.clone(),
        file: name.to_string(),
    };
    let bytes = postcard::to_allocvec(&index).map_err(any)?;
    let path = dir.join("raft-snapshot.meta");
    let tmp = path.with_extension("meta.tmp");
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| any(format!("{}: {e}", path.display())))?;
    // Older snapshots, abandoned receptions and builds; a sender still
    // reading one keeps it open until it is done.
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            let old = n.starts_with("raft-snapshot-") && n != name;
            if old || n == "raft-snapshot.bin" {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    Ok(())
}

/// The current snapshot, if any (a snapshot kept in the older one-file
/// format is converted first).
fn current_snapshot(dir: &Path) -> Result<Option<SnapshotIndex>, AnyError> {
    let path = dir.join("raft-snapshot.meta");
    match std::fs::read(&path) {
        Ok(b) => {
            return postcard::from_bytes(&b).map(Some).map_err(|e| {
                any(format!(
                    "snapshot index {} cannot be decoded: {e}",
                    path.display()
                ))
            });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(any(format!("{}: {e}", path.display()))),
    }
    let legacy = dir.join("raft-snapshot.bin");
    let b = match std::fs::read(&legacy) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(any(format!("{}: {e}", legacy.display()))),
    };
    let old: LegacySnapshotFile = postcard::from_bytes(&b).map_err(|e| {
        any(format!(
            "snapshot {} cannot be decoded: {e}",
            legacy.display()
        ))
    })?;
    let name = data_name(&old.meta);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(dir.join(&name))?;
        f.write_all(&old.data)?;
        f.sync_all()
    };
    write().map_err(|e| any(format!("converting {}: {e}", legacy.display())))?;
    set_current(dir, &old.meta, &name)?;
    Ok(Some(SnapshotIndex {
        meta: old.meta,
        file: name,
    }))
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

pub struct SnapshotBuilder {
    store: Arc<MetaStore>,
    dir: PathBuf,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, SErr> {
        let store = self.store.clone();
        let dir = self.dir.clone();
        let (meta, path) = tokio::task::spawn_blocking(
            move || -> Result<(SnapshotMeta<u64, BasicNode>, PathBuf), AnyError> {
                // The applied id and membership come from the export's own
                // read transaction, so they describe exactly the exported
                // state.
                let started = std::time::Instant::now();
                let tmp = dir.join(format!(
                    "raft-snapshot-building-{}.tmp",
                    strata_common::now_ms()
                ));
                let file = std::fs::File::create(&tmp)
                    .map_err(|e| any(format!("{}: {e}", tmp.display())))?;
                let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
                let repl = store.export_to(&mut out).map_err(any)?;
                let file = out.into_inner().map_err(|e| any(e.error()))?;
                let bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
                let exported = started.elapsed();
                file.sync_all().map_err(any)?;
                let get = |k: &str| repl.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
                let (last_log_id, membership) = decode_applied(get(APPLIED), get(MEMBERSHIP))?;
                let meta = SnapshotMeta {
                    last_log_id,
                    last_membership: membership,
                    snapshot_id: format!(
                        "{}-{}",
                        last_log_id.map(|l| l.index).unwrap_or(0),
                        strata_common::now_ms()
                    ),
                };
                let name = data_name(&meta);
                std::fs::rename(&tmp, dir.join(&name))
                    .map_err(|e| any(format!("{}: {e}", tmp.display())))?;
                set_current(&dir, &meta, &name)?;
                tracing::info!(
                    index = last_log_id.map(|l| l.index).unwrap_or(0),
                    bytes,
                    export_ms = exported.as_millis() as u64,
                    total_ms = started.elapsed().as_millis() as u64,
                    "snapshot built"
                );
                Ok((meta, dir.join(name)))
            },
        )
        .await
        .map_err(|e| StorageIOError::write_snapshot(None, any(e)))?
        .map_err(|e| StorageIOError::write_snapshot(None, e))?;
        let f = File::open(&path).await.map_err(|e| {
            StorageIOError::write_snapshot(None, any(format!("{}: {e}", path.display())))
        })?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(f),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_in_the_older_one_file_format_is_converted() {
        let dir = std::env::temp_dir().join(format!("strata-snap-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        assert!(current_snapshot(&dir).unwrap().is_none(), "no snapshot yet");
        let meta = SnapshotMeta {
            last_log_id: Some(LogId::new(openraft::CommittedLeaderId::new(3, 1), 42)),
            last_membership: Membership::default(),
            snapshot_id: "42-7".into(),
        };
        let data = b"STRMETA1 whatever the store exported".to_vec();
        let legacy = LegacySnapshotFile {
            meta: meta.clone(),
            data: data.clone(),
        };
        std::fs::write(
            dir.join("raft-snapshot.bin"),
            postcard::to_allocvec(&legacy).unwrap(),
        )
        .unwrap();
        let index = current_snapshot(&dir).unwrap().expect("converted");
        assert_eq!(index.meta, meta);
        assert_eq!(std::fs::read(dir.join(&index.file)).unwrap(), data);
        assert!(
            !dir.join("raft-snapshot.bin").exists(),
            "the old file is gone"
        );
        // Read again: from the new index, the same snapshot.
        let again = current_snapshot(&dir).unwrap().unwrap();
        assert_eq!((again.meta, again.file), (meta, index.file));
        // A damaged index is an error, not an empty state.
        std::fs::write(dir.join("raft-snapshot.meta"), b"\xff\xff").unwrap();
        assert!(current_snapshot(&dir).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
