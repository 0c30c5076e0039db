//! What a replicated log needs from the store: a command applied together
//! with opaque replication state (last applied log id, membership) in one
//! transaction, request ids that make a retried command apply once, and
//! whole-state snapshots. The store does not know which consensus library
//! writes the opaque state.

use redb::{Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, WriteTransaction};
use serde::{Deserialize, Serialize};

use crate::command::{Command, Output};
use crate::jobs::{ATTRS, JOBS};
use crate::store::{
    APPLIED, CHILDREN, COUNTERS, INODES, MOUNTS, REPL, REQUEST_AGE, REQUESTS, Tables, enc,
};
use crate::{MetaError, MetaStore};

/// One committed log entry as the store applies it.
pub struct LoggedCommand<'a> {
    /// Position in the log: strictly increasing over applied commands and
    /// the same on every replica (orders request-id expiry). A log entry
    /// carrying several commands gives each its own (the master uses
    /// `log index << 16 | position in the entry`).
    pub index: u64,
    /// `None` for entries that change only replication state (blank entries,
    /// membership changes).
    pub command: Option<&'a Command>,
    /// Client request id. A command whose id was applied before is not
    /// applied again; the first application's output is returned.
    pub request: Option<u128>,
    /// Opaque key/values stored in the same transaction.
    pub state: &'a [(&'a str, Vec<u8>)],
}

/// Request ids are remembered for this span of positions (about a million
/// log entries with the master's numbering): far longer than any client
/// keeps retrying one call.
const REQUEST_WINDOW: u64 = 1 << 36;
/// Old request ids are expired when a position crosses a multiple of this.
const EXPIRE_EVERY: u64 = 1 << 26;
const SNAPSHOT_MAGIC: &[u8; 8] = b"STRMETA1";

/// One record of a snapshot; a snapshot is the magic followed by records.
#[derive(Serialize, Deserialize)]
enum Rec<'a> {
    Inode(u64, &'a [u8]),
    Child(u64, &'a str, u64),
    Mount(u64, &'a [u8]),
    Counter(&'a str, u64),
    Repl(&'a str, &'a [u8]),
    Request(u128, &'a [u8]),
    Age(u64, u128),
    Job(u64, &'a [u8]),
    Attr(u64, &'a [u8]),
    /// Last record: how many came before it (a cut snapshot is detected).
    End(u64),
}

impl MetaStore {
    fn write_tx(&self, durable: bool) -> Result<WriteTransaction, MetaError> {
        let mut tx = self.db.begin_write().map_err(|e| self.err(e))?;
        if !durable {
            tx.set_durability(Durability::None)
                .map_err(|e| self.err(e))?;
        }
        Ok(tx)
    }

    fn put_state(&self, tx: &WriteTransaction, state: &[(&str, Vec<u8>)]) -> Result<(), MetaError> {
        let mut t = tx.open_table(REPL).map_err(|e| self.err(e))?;
        for (k, v) in state {
            t.insert(*k, v.as_slice()).map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// Opaque replication state stored by [`MetaStore::apply_logged`].
    pub fn repl_state(&self, key: &str) -> Result<Option<Vec<u8>>, MetaError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = tx.open_table(REPL).map_err(|e| self.err(e))?;
        Ok(t.get(key)
            .map_err(|e| self.err(e))?
            .map(|g| g.value().to_vec()))
    }

    /// The output recorded for a request id, if that request was applied.
    pub fn replayed(&self, request: u128) -> Result<Option<Output>, MetaError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = tx.open_table(REQUESTS).map_err(|e| self.err(e))?;
        let v = t.get(request).map_err(|e| self.err(e))?;
        v.map(|g| postcard::from_bytes(g.value()).map_err(|e| self.err(e)))
            .transpose()
    }

    /// Applies a committed entry. The outer error is a store failure (the
    /// entry must not count as applied); the inner one a command the state
    /// rejected, which is still recorded as applied so every replica moves
    /// past it the same way. With `durable` false the commit is not synced:
    /// the replicated log is the durable record, and [`MetaStore::flush`]
    /// makes everything applied so far durable.
    pub fn apply_logged(
        &self,
        e: &LoggedCommand<'_>,
        durable: bool,
    ) -> Result<Result<Output, MetaError>, MetaError> {
        match self.try_batch(std::slice::from_ref(e), durable)? {
            Ok(mut outs) => Ok(Ok(outs.pop().unwrap_or_default())),
            Err(err) => {
                // Nothing of the command was committed; the entry still is.
                let tx = self.write_tx(durable)?;
                self.put_state(&tx, e.state)?;
                tx.commit().map_err(|err| self.err(err))?;
                Ok(Err(err))
            }
        }
    }

    /// Applies a run of committed entries in one transaction. If any
    /// command is rejected, the run is applied again entry by entry (so a
    /// rejected command changes nothing and the others still apply).
    pub fn apply_logged_batch(
        &self,
        entries: &[LoggedCommand<'_>],
        durable: bool,
    ) -> Result<Vec<Result<Output, MetaError>>, MetaError> {
        match self.try_batch(entries, durable)? {
            Ok(outs) => Ok(outs.into_iter().map(Ok).collect()),
            Err(_) => {
                let last = entries.len().saturating_sub(1);
                entries
                    .iter()
                    .enumerate()
                    .map(|(i, e)| self.apply_logged(e, durable && i == last))
                    .collect()
            }
        }
    }

    /// The whole run in one transaction. The inner error is the first
    /// command the state rejected (nothing is committed then).
    #[allow(clippy::type_complexity)]
    fn try_batch(
        &self,
        entries: &[LoggedCommand<'_>],
        durable: bool,
    ) -> Result<Result<Vec<Output>, MetaError>, MetaError> {
        let tx = self.write_tx(durable)?;
        let mut outs = Vec::with_capacity(entries.len());
        {
            let mut t = Tables::open(&tx, self)?;
            let mut req = tx.open_table(REQUESTS).map_err(|e| self.err(e))?;
            let mut age = tx.open_table(REQUEST_AGE).map_err(|e| self.err(e))?;
            let mut repl = tx.open_table(REPL).map_err(|e| self.err(e))?;
            let mut applied = t.counter(APPLIED)?;
            for e in entries {
                let replayed = match (e.request, e.command) {
                    (Some(rid), Some(_)) => match req.get(rid).map_err(|x| self.err(x))? {
                        Some(g) => Some(
                            postcard::from_bytes::<Output>(g.value()).map_err(|x| self.err(x))?,
                        ),
                        None => None,
                    },
                    _ => None,
                };
                let out = match (replayed, e.command) {
                    (Some(out), _) => out,
                    (None, None) => Output::default(),
                    (None, Some(cmd)) => match t.apply(cmd) {
                        Ok(out) => {
                            applied += 1;
                            if let Some(rid) = e.request {
                                req.insert(rid, enc(&out).as_slice())
                                    .map_err(|x| self.err(x))?;
                                age.insert(e.index, rid).map_err(|x| self.err(x))?;
                            }
                            out
                        }
                        Err(err) if err.is_store() => return Err(err),
                        Err(err) => return Ok(Err(err)),
                    },
                };
                for (k, v) in e.state {
                    repl.insert(*k, v.as_slice()).map_err(|x| self.err(x))?;
                }
                outs.push(out);
            }
            t.set_counter(APPLIED, applied)?;
        }
        tx.commit().map_err(|e| self.err(e))?;
        // Expire old request ids now and then (outside the hot path).
        if let Some(last) = entries.last()
            && entries.iter().any(|e| e.index.is_multiple_of(EXPIRE_EVERY))
            && last.index > REQUEST_WINDOW
        {
            self.expire_requests(last.index - REQUEST_WINDOW, durable)?;
        }
        Ok(Ok(outs))
    }

    fn expire_requests(&self, cutoff: u64, durable: bool) -> Result<(), MetaError> {
        let tx = self.write_tx(durable)?;
        {
            let mut req = tx.open_table(REQUESTS).map_err(|e| self.err(e))?;
            let mut age = tx.open_table(REQUEST_AGE).map_err(|e| self.err(e))?;
            let old: Vec<(u64, u128)> = age
                .range(..cutoff)
                .map_err(|e| self.err(e))?
                .filter_map(|kv| kv.ok().map(|(k, v)| (k.value(), v.value())))
                .collect();
            for (i, r) in old {
                age.remove(i).map_err(|e| self.err(e))?;
                req.remove(r).map_err(|e| self.err(e))?;
            }
        }
        tx.commit().map_err(|e| self.err(e))
    }

    /// Makes every commit so far durable.
    pub fn flush(&self) -> Result<(), MetaError> {
        let tx = self.write_tx(true)?;
        tx.commit().map_err(|e| self.err(e))
    }

    /// The whole state as one consistent byte string (see
    /// [`MetaStore::export_to`]), and the replication state it contains.
    #[allow(clippy::type_complexity)]
    pub fn export(&self) -> Result<(Vec<u8>, Vec<(String, Vec<u8>)>), MetaError> {
        let mut out = Vec::new();
        let repl = self.export_to(&mut out)?;
        Ok((out, repl))
    }

    /// Writes the whole state to `out` from one read transaction (writers
    /// are not blocked while it is written, and memory stays flat however
    /// large the namespace), and returns the opaque replication state it
    /// contains.
    #[allow(clippy::type_complexity)]
    pub fn export_to(
        &self,
        out: &mut dyn std::io::Write,
    ) -> Result<Vec<(String, Vec<u8>)>, MetaError> {
        self.flush()?;
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let io = |e: std::io::Error| MetaError::Invalid(format!("writing a snapshot: {e}"));
        out.write_all(SNAPSHOT_MAGIC).map_err(io)?;
        let mut n = 0u64;
        // Each record is encoded into one reused buffer and written whole
        // (postcard's own writer makes a call per byte).
        let mut scratch = Vec::with_capacity(4096);
        let mut push = |r: Rec<'_>, out: &mut dyn std::io::Write| -> Result<(), MetaError> {
            scratch.clear();
            scratch =
                postcard::to_extend(&r, std::mem::take(&mut scratch)).map_err(|e| self.err(e))?;
            out.write_all(&scratch).map_err(io)?;
            n += 1;
            Ok(())
        };
        macro_rules! dump {
            ($table:expr, |$k:ident, $v:ident| $rec:expr) => {{
                let t = tx.open_table($table).map_err(|e| self.err(e))?;
                for kv in t.iter().map_err(|e| self.err(e))? {
                    let (k, v) = kv.map_err(|e| self.err(e))?;
                    let ($k, $v) = (k.value(), v.value());
                    push($rec, &mut *out)?;
                }
            }};
        }
        dump!(INODES, |k, v| Rec::Inode(k, v));
        dump!(CHILDREN, |k, v| Rec::Child(k.0, k.1, v));
        dump!(MOUNTS, |k, v| Rec::Mount(k, v));
        dump!(COUNTERS, |k, v| Rec::Counter(k, v));
        let mut repl = Vec::new();
        dump!(REPL, |k, v| {
            repl.push((k.to_string(), v.to_vec()));
            Rec::Repl(k, v)
        });
        dump!(REQUESTS, |k, v| Rec::Request(k, v));
        dump!(REQUEST_AGE, |k, v| Rec::Age(k, v));
        dump!(JOBS, |k, v| Rec::Job(k, v));
        dump!(ATTRS, |k, v| Rec::Attr(k, v));
        postcard::to_io(&Rec::End(n), &mut *out).map_err(|e| self.err(e))?;
        out.flush().map_err(io)?;
        Ok(repl)
    }

    /// Replaces the whole state with a snapshot made by [`MetaStore::export`].
    /// A damaged snapshot changes nothing.
    pub fn import(&self, bytes: &[u8]) -> Result<(), MetaError> {
        self.import_from(bytes)
    }

    /// Replaces the whole state with a snapshot read from `src` (as written
    /// by [`MetaStore::export_to`]), a window at a time. A damaged or
    /// truncated snapshot changes nothing.
    pub fn import_from(&self, mut src: impl std::io::Read) -> Result<(), MetaError> {
        let bad = |msg: &str| MetaError::Invalid(format!("snapshot: {msg}"));
        let io = |e: std::io::Error| MetaError::Invalid(format!("reading a snapshot: {e}"));
        let mut magic = [0u8; 8];
        src.read_exact(&mut magic)
            .map_err(|_| bad("not a Strata metadata snapshot"))?;
        if &magic != SNAPSHOT_MAGIC {
            return Err(bad("not a Strata metadata snapshot"));
        }
        // A window over the stream: records are decoded from `buf[pos..]`;
        // when one is cut off, what is left moves to the front and more
        // is read (the window grows for a record larger than itself).
        let mut buf = vec![0u8; 1 << 20];
        let (mut pos, mut len, mut eof) = (0usize, 0usize, false);
        let tx = self.write_tx(true)?;
        {
            let mut inodes = tx.open_table(INODES).map_err(|e| self.err(e))?;
            let mut children = tx.open_table(CHILDREN).map_err(|e| self.err(e))?;
            let mut mounts = tx.open_table(MOUNTS).map_err(|e| self.err(e))?;
            let mut counters = tx.open_table(COUNTERS).map_err(|e| self.err(e))?;
            let mut repl = tx.open_table(REPL).map_err(|e| self.err(e))?;
            let mut req = tx.open_table(REQUESTS).map_err(|e| self.err(e))?;
            let mut age = tx.open_table(REQUEST_AGE).map_err(|e| self.err(e))?;
            let mut jobs = tx.open_table(JOBS).map_err(|e| self.err(e))?;
            let mut attrs = tx.open_table(ATTRS).map_err(|e| self.err(e))?;
            let e = |e: redb::Error| self.err(e);
            inodes.retain(|_, _| false).map_err(|x| e(x.into()))?;
            children.retain(|_, _| false).map_err(|x| e(x.into()))?;
            mounts.retain(|_, _| false).map_err(|x| e(x.into()))?;
            counters.retain(|_, _| false).map_err(|x| e(x.into()))?;
            repl.retain(|_, _| false).map_err(|x| e(x.into()))?;
            req.retain(|_, _| false).map_err(|x| e(x.into()))?;
            age.retain(|_, _| false).map_err(|x| e(x.into()))?;
            jobs.retain(|_, _| false).map_err(|x| e(x.into()))?;
            attrs.retain(|_, _| false).map_err(|x| e(x.into()))?;
            let mut n = 0u64;
            loop {
                let (r, used) = match postcard::take_from_bytes::<Rec<'_>>(&buf[pos..len]) {
                    Ok((r, tail)) => (r, len - pos - tail.len()),
                    Err(postcard::Error::DeserializeUnexpectedEnd) if !eof => {
                        buf.copy_within(pos..len, 0);
                        len -= pos;
                        pos = 0;
                        if len == buf.len() {
                            buf.resize(buf.len() * 2, 0);
                        }
                        let got = loop {
                            match src.read(&mut buf[len..]) {
                                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                                other => break other.map_err(io)?,
                            }
                        };
                        eof = got == 0;
                        len += got;
                        continue;
                    }
                    Err(_) if eof && pos == len => return Err(bad("truncated (no end record)")),
                    Err(_) => return Err(bad("truncated or corrupt")),
                };
                pos += used;
                n += 1;
                let res = match r {
                    Rec::End(count) if count + 1 == n => {
                        let mut more = [0u8; 1];
                        if pos < len || src.read(&mut more).map_err(io)? > 0 {
                            return Err(bad("data after the end record"));
                        }
                        break;
                    }
                    Rec::End(_) => return Err(bad("record count mismatch")),
                    Rec::Inode(k, v) => inodes.insert(k, v).map(drop),
                    Rec::Child(p, n, v) => children.insert((p, n), v).map(drop),
                    Rec::Mount(k, v) => mounts.insert(k, v).map(drop),
                    Rec::Counter(k, v) => counters.insert(k, v).map(drop),
                    Rec::Repl(k, v) => repl.insert(k, v).map(drop),
                    Rec::Request(k, v) => req.insert(k, v).map(drop),
                    Rec::Age(k, v) => age.insert(k, v).map(drop),
                    Rec::Job(k, v) => jobs.insert(k, v).map(drop),
                    Rec::Attr(k, v) => attrs.insert(k, v).map(drop),
                };
                res.map_err(|x| e(x.into()))?;
            }
        }
        tx.commit().map_err(|e| self.err(e))
    }

    /// Number of inodes (for reports).
    pub fn inode_count(&self) -> Result<u64, MetaError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = tx.open_table(INODES).map_err(|e| self.err(e))?;
        t.len().map_err(|e| self.err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mkdir(name: &str) -> Command {
        Command::Mkdir {
            parent: crate::ROOT_ID,
            name: name.into(),
            mtime_ms: 1,
            synced_ms: None,
        }
    }

    #[test]
    fn retried_requests_apply_once_and_rejected_commands_still_advance_state() {
        let d = tempfile::tempdir().unwrap();
        let s = MetaStore::open(d.path()).unwrap();
        let cmd = mkdir("a");
        let st = |i: u64| vec![("applied", i.to_le_bytes().to_vec())];
        let first = s
            .apply_logged(
                &LoggedCommand {
                    index: 1,
                    command: Some(&cmd),
                    request: Some(7),
                    state: &st(1),
                },
                false,
            )
            .unwrap()
            .unwrap();
        // The same request again: same output, no second directory, no error.
        let again = s
            .apply_logged(
                &LoggedCommand {
                    index: 2,
                    command: Some(&cmd),
                    request: Some(7),
                    state: &st(2),
                },
                false,
            )
            .unwrap()
            .unwrap();
        assert_eq!(first, again);
        assert_eq!(s.children(crate::ROOT_ID).unwrap().len(), 1);
        // A different request for the same name is rejected by the state,
        // and the replication state still moves.
        let err = s
            .apply_logged(
                &LoggedCommand {
                    index: 3,
                    command: Some(&cmd),
                    request: Some(8),
                    state: &st(3),
                },
                true,
            )
            .unwrap()
            .unwrap_err();
        assert!(matches!(err, MetaError::Exists(_)), "{err}");
        assert_eq!(
            s.repl_state("applied").unwrap(),
            Some(3u64.to_le_bytes().to_vec())
        );
    }

    #[test]
    fn a_batch_with_a_rejected_command_applies_the_others() {
        let d = tempfile::tempdir().unwrap();
        let s = MetaStore::open(d.path()).unwrap();
        let (a, b) = (mkdir("a"), mkdir("b"));
        let st = |i: u64| vec![("applied", i.to_le_bytes().to_vec())];
        let (s1, s2, s3, s4) = (st(1), st(2), st(3), st(4));
        let batch = [
            LoggedCommand {
                index: 1,
                command: Some(&a),
                request: Some(1),
                state: &s1,
            },
            LoggedCommand {
                index: 2,
                command: None,
                request: None,
                state: &s2,
            },
            LoggedCommand {
                index: 3,
                command: Some(&a),
                request: Some(2),
                state: &s3,
            },
            LoggedCommand {
                index: 4,
                command: Some(&b),
                request: Some(1),
                state: &s4,
            },
        ];
        let out = s.apply_logged_batch(&batch, false).unwrap();
        assert!(out[0].is_ok() && out[1].is_ok());
        assert!(matches!(out[2], Err(MetaError::Exists(_))));
        // Request 1 again (with another command): the first output, no "b".
        assert_eq!(out[3].as_ref().unwrap(), out[0].as_ref().unwrap());
        assert_eq!(s.children(crate::ROOT_ID).unwrap().len(), 1);
        assert_eq!(
            s.repl_state("applied").unwrap(),
            Some(4u64.to_le_bytes().to_vec())
        );
        // A clean batch goes through the one-transaction path.
        let (c, e) = (mkdir("c"), mkdir("e"));
        let (s5, s6) = (st(5), st(6));
        let out = s
            .apply_logged_batch(
                &[
                    LoggedCommand {
                        index: 5,
                        command: Some(&c),
                        request: None,
                        state: &s5,
                    },
                    LoggedCommand {
                        index: 6,
                        command: Some(&e),
                        request: Some(9),
                        state: &s6,
                    },
                ],
                true,
            )
            .unwrap();
        assert!(out.iter().all(|o| o.is_ok()));
        assert_eq!(s.children(crate::ROOT_ID).unwrap().len(), 3);
        assert!(s.replayed(9).unwrap().is_some());
        assert_eq!(s.applied().unwrap(), 3);
    }

    #[test]
    fn snapshots_round_trip_and_damaged_ones_change_nothing() {
        let d = tempfile::tempdir().unwrap();
        let s = MetaStore::open(d.path()).unwrap();
        for (i, n) in ["a", "b", "c"].iter().enumerate() {
            s.apply_logged(
                &LoggedCommand {
                    index: i as u64 + 1,
                    command: Some(&mkdir(n)),
                    request: Some(i as u128),
                    state: &[("k", vec![i as u8])],
                },
                false,
            )
            .unwrap()
            .unwrap();
        }
        let (snap, repl) = s.export().unwrap();
        assert_eq!(repl, [("k".to_string(), vec![2])]);
        let d2 = tempfile::tempdir().unwrap();
        let t = MetaStore::open(d2.path()).unwrap();
        t.apply(&mkdir("other")).unwrap();
        assert!(t.import(&snap[..snap.len() - 3]).is_err());
        assert_eq!(t.children(crate::ROOT_ID).unwrap().len(), 1);
        t.import(&snap).unwrap();
        let names: Vec<String> = t
            .children(crate::ROOT_ID)
            .unwrap()
            .into_iter()
            .map(|i| i.name)
            .collect();
        assert_eq!(names, ["a", "b", "c"]);
        assert_eq!(t.repl_state("k").unwrap(), Some(vec![2]));
        assert!(t.replayed(1).unwrap().is_some());
        assert_eq!(t.applied().unwrap(), s.applied().unwrap());
        assert!(t.import(b"garbage").is_err());
    }
}
