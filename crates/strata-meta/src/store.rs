//! redb-backed state: tables for inodes, directory entries and mounts.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, Table, TableDefinition};
use strata_common::InodeId;

use crate::command::{Command, Output, UfsEntry};
use crate::jobs::{ATTRS, JOBS};
use crate::{Inode, MetaError, MountEntry, PersistState, ROOT_ID};

pub(crate) const INODES: TableDefinition<u64, &[u8]> = TableDefinition::new("inodes");
pub(crate) const CHILDREN: TableDefinition<(u64, &str), u64> = TableDefinition::new("children");
pub(crate) const MOUNTS: TableDefinition<u64, &[u8]> = TableDefinition::new("mounts");
pub(crate) const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
pub(crate) const REPL: TableDefinition<&str, &[u8]> = TableDefinition::new("replication");
pub(crate) const REQUESTS: TableDefinition<u128, &[u8]> = TableDefinition::new("requests");
pub(crate) const REQUEST_AGE: TableDefinition<u64, u128> = TableDefinition::new("request_age");

const NEXT_INODE: &str = "next_inode";
const NEXT_MOUNT: &str = "next_mount";
pub(crate) const APPLIED: &str = "applied_commands";

pub struct MetaStore {
    pub(crate) db: Database,
    pub(crate) path: PathBuf,
}

pub(crate) fn enc<T: serde::Serialize>(v: &T) -> Vec<u8> {
    // Serialising plain structs to a Vec cannot fail.
    postcard::to_allocvec(v).unwrap_or_default()
}

impl MetaStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<MetaStore, MetaError> {
        let path = dir.join("meta.redb");
        let store_err = |msg: String| MetaError::Store {
            path: path.display().to_string(),
            msg,
        };
        std::fs::create_dir_all(dir)
            .map_err(|e| store_err(format!("cannot create directory: {e}")))?;
        let db = Database::create(&path).map_err(|e| store_err(e.to_string()))?;
        let s = MetaStore { db, path };
        s.init()?;
        Ok(s)
    }

    pub(crate) fn err(&self, e: impl std::fmt::Display) -> MetaError {
        MetaError::Store {
            path: self.path.display().to_string(),
            msg: e.to_string(),
        }
    }

    fn init(&self) -> Result<(), MetaError> {
        let tx = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut inodes = tx.open_table(INODES).map_err(|e| self.err(e))?;
            tx.open_table(CHILDREN).map_err(|e| self.err(e))?;
            tx.open_table(MOUNTS).map_err(|e| self.err(e))?;
            tx.open_table(REPL).map_err(|e| self.err(e))?;
            tx.open_table(REQUESTS).map_err(|e| self.err(e))?;
            tx.open_table(REQUEST_AGE).map_err(|e| self.err(e))?;
            tx.open_table(JOBS).map_err(|e| self.err(e))?;
            tx.open_table(ATTRS).map_err(|e| self.err(e))?;
            let mut counters = tx.open_table(COUNTERS).map_err(|e| self.err(e))?;
            if inodes.get(ROOT_ID).map_err(|e| self.err(e))?.is_none() {
                let root = Inode {
                    id: ROOT_ID,
                    parent: ROOT_ID,
                    name: String::new(),
                    is_dir: true,
                    size: 0,
                    mtime_ms: 0,
                    mode: 0o755,
                    fingerprint: String::new(),
                    persist: PersistState::NotPersisted,
                    complete: true,
                    generation: 0,
                    mount_id: 0,
                    synced_ms: None,
                    is_mount_point: false,
                };
                inodes
                    .insert(ROOT_ID, enc(&root).as_slice())
                    .map_err(|e| self.err(e))?;
                counters
                    .insert(NEXT_INODE, ROOT_ID + 1)
                    .map_err(|e| self.err(e))?;
                counters.insert(NEXT_MOUNT, 1).map_err(|e| self.err(e))?;
                counters.insert(APPLIED, 0).map_err(|e| self.err(e))?;
            }
        }
        tx.commit().map_err(|e| self.err(e))
    }

    /// A consistent view for several reads (one read transaction: cheaper
    /// than a transaction per lookup when walking a path).
    pub fn view(&self) -> Result<MetaView<'_>, MetaError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        Ok(MetaView {
            store: self,
            inodes: tx.open_table(INODES).map_err(|e| self.err(e))?,
            children: tx.open_table(CHILDREN).map_err(|e| self.err(e))?,
        })
    }

    pub fn inode(&self, id: InodeId) -> Result<Option<Inode>, MetaError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = tx.open_table(INODES).map_err(|e| self.err(e))?;
        let v = t.get(id).map_err(|e| self.err(e))?;
        v.map(|g| postcard::from_bytes(g.value()).map_err(|e| self.err(e)))
            .transpose()
    }

    pub fn lookup(&self, parent: InodeId, name: &str) -> Result<Option<Inode>, MetaError> {
        let id = {
            let tx = self.db.begin_read().map_err(|e| self.err(e))?;
            let t = tx.open_table(CHILDREN).map_err(|e| self.err(e))?;
            let v = t.get((parent, name)).map_err(|e| self.err(e))?;
            v.map(|g| g.value())
        };
        match id {
            Some(id) => self.inode(id),
            None => Ok(None),
        }
    }

    /// New versions of files started before `before_ms` that are neither
    /// complete nor listed under their name: rewrites whose writer died
    /// (a live writer completes its version or removes it). A scan of
    /// every inode.
    pub fn abandoned_versions(&self, before_ms: i64) -> Result<Vec<Inode>, MetaError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let ct = tx.open_table(CHILDREN).map_err(|e| self.err(e))?;
        let it = tx.open_table(INODES).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for kv in it.iter().map_err(|e| self.err(e))? {
            let (_, v) = kv.map_err(|e| self.err(e))?;
            let ino: Inode = postcard::from_bytes(v.value()).map_err(|e| self.err(e))?;
            if ino.is_dir || ino.complete || ino.mtime_ms >= before_ms {
                continue;
            }
            let listed = ct
                .get((ino.parent, ino.name.as_str()))
                .map_err(|e| self.err(e))?
                .map(|g| g.value());
            if listed != Some(ino.id) {
                out.push(ino);
            }
        }
        Ok(out)
    }

    pub fn children(&self, parent: InodeId) -> Result<Vec<Inode>, MetaError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let ct = tx.open_table(CHILDREN).map_err(|e| self.err(e))?;
        let it = tx.open_table(INODES).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for kv in ct
            .range((parent, "")..(parent + 1, ""))
            .map_err(|e| self.err(e))?
        {
            let (_, v) = kv.map_err(|e| self.err(e))?;
            if let Some(g) = it.get(v.value()).map_err(|e| self.err(e))? {
                out.push(postcard::from_bytes(g.value()).map_err(|e| self.err(e))?);
            }
        }
        Ok(out)
    }

    /// Up to `limit` children of `parent` in key order, where a child's
    /// key is its name, with `/` after it for a directory (the order of
    /// object keys in an S3 listing), from the first key after `after`.
    /// Costs the entries returned and the directories among the prefixes
    /// of `after`, not the whole directory.
    pub fn children_page(
        &self,
        parent: InodeId,
        after: &str,
        limit: usize,
    ) -> Result<Vec<Inode>, MetaError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let ct = tx.open_table(CHILDREN).map_err(|e| self.err(e))?;
        let it = tx.open_table(INODES).map_err(|e| self.err(e))?;
        let inode = |id: u64| -> Result<Option<Inode>, MetaError> {
            it.get(id)
                .map_err(|e| self.err(e))?
                .map(|g| postcard::from_bytes(g.value()).map_err(|e| self.err(e)))
                .transpose()
        };
        // Names come in name order; a directory's key sorts after the
        // names that extend its name with a byte below '/' ("d-1" and
        // "d.x" come before "d/"), so directories wait here until the
        // names pass their key. The last is the smallest: each is a prefix
        // of the ones pushed after it.
        let mut waiting: Vec<Inode> = Vec::new();
        // Directories named at or before `after` whose key sorts after it:
        // `after` itself, and its prefixes followed by a byte below '/'.
        let b = after.as_bytes();
        let cands = (1..b.len())
            .filter(|&i| b[i] < b'/')
            .map(|i| &after[..i])
            .chain((!after.is_empty() && !after.ends_with('/')).then_some(after));
        for name in cands {
            if let Some(id) = ct.get((parent, name)).map_err(|e| self.err(e))?
                && let Some(ino) = inode(id.value())?
                && ino.is_dir
            {
                waiting.push(ino);
            }
        }
        let key_of = |i: &Inode| format!("{}/", i.name);
        let mut out = Vec::new();
        for kv in ct
            .range((parent, after)..(parent + 1, ""))
            .map_err(|e| self.err(e))?
        {
            if out.len() >= limit {
                break;
            }
            let (k, v) = kv.map_err(|e| self.err(e))?;
            let name = k.value().1;
            if name == after {
                continue;
            }
            while waiting.last().is_some_and(|d| key_of(d).as_str() < name) {
                out.extend(waiting.pop());
            }
            if let Some(ino) = inode(v.value())? {
                if ino.is_dir {
                    waiting.push(ino);
                } else {
                    out.push(ino);
                }
            }
        }
        while let Some(d) = waiting.pop() {
            out.push(d);
        }
        out.truncate(limit);
        Ok(out)
    }

    pub fn mount(&self, id: u64) -> Result<Option<MountEntry>, MetaError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = tx.open_table(MOUNTS).map_err(|e| self.err(e))?;
        let v = t.get(id).map_err(|e| self.err(e))?;
        v.map(|g| postcard::from_bytes(g.value()).map_err(|e| self.err(e)))
            .transpose()
    }

    pub fn mounts(&self) -> Result<Vec<MountEntry>, MetaError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = tx.open_table(MOUNTS).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for kv in t.iter().map_err(|e| self.err(e))? {
            let (_, v) = kv.map_err(|e| self.err(e))?;
            out.push(postcard::from_bytes(v.value()).map_err(|e| self.err(e))?);
        }
        Ok(out)
    }

    /// Number of commands applied since the store was created.
    pub fn applied(&self) -> Result<u64, MetaError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = tx.open_table(COUNTERS).map_err(|e| self.err(e))?;
        Ok(t.get(APPLIED)
            .map_err(|e| self.err(e))?
            .map(|g| g.value())
            .unwrap_or(0))
    }

    /// Applies one command atomically and durably. On error nothing changes.
    pub fn apply(&self, cmd: &Command) -> Result<Output, MetaError> {
        let tx = self.db.begin_write().map_err(|e| self.err(e))?;
        let out = {
            let mut t = Tables::open(&tx, self)?;
            let out = t.apply(cmd)?;
            let n = t.counter(APPLIED)?;
            t.set_counter(APPLIED, n + 1)?;
            out
        };
        tx.commit().map_err(|e| self.err(e))?;
        Ok(out)
    }
}

/// See [`MetaStore::view`].
pub struct MetaView<'s> {
    store: &'s MetaStore,
    inodes: redb::ReadOnlyTable<u64, &'static [u8]>,
    children: redb::ReadOnlyTable<(u64, &'static str), u64>,
}

impl MetaView<'_> {
    pub fn inode(&self, id: InodeId) -> Result<Option<Inode>, MetaError> {
        let v = self.inodes.get(id).map_err(|e| self.store.err(e))?;
        v.map(|g| postcard::from_bytes(g.value()).map_err(|e| self.store.err(e)))
            .transpose()
    }

    pub fn lookup(&self, parent: InodeId, name: &str) -> Result<Option<Inode>, MetaError> {
        let id = self
            .children
            .get((parent, name))
            .map_err(|e| self.store.err(e))?
            .map(|g| g.value());
        match id {
            Some(id) => self.inode(id),
            None => Ok(None),
        }
    }
}

pub(crate) struct Tables<'t> {
    pub(crate) inodes: Table<'t, u64, &'static [u8]>,
    pub(crate) children: Table<'t, (u64, &'static str), u64>,
    pub(crate) mounts: Table<'t, u64, &'static [u8]>,
    pub(crate) counters: Table<'t, &'static str, u64>,
    pub(crate) jobs: Table<'t, u64, &'static [u8]>,
    pub(crate) attrs: Table<'t, u64, &'static [u8]>,
    pub(crate) store: &'t MetaStore,
}

impl<'t> Tables<'t> {
    /// The namespace tables of a write transaction.
    pub(crate) fn open(
        tx: &'t redb::WriteTransaction,
        store: &'t MetaStore,
    ) -> Result<Tables<'t>, MetaError> {
        Ok(Tables {
            inodes: tx.open_table(INODES).map_err(|e| store.err(e))?,
            children: tx.open_table(CHILDREN).map_err(|e| store.err(e))?,
            mounts: tx.open_table(MOUNTS).map_err(|e| store.err(e))?,
            counters: tx.open_table(COUNTERS).map_err(|e| store.err(e))?,
            jobs: tx.open_table(JOBS).map_err(|e| store.err(e))?,
            attrs: tx.open_table(ATTRS).map_err(|e| store.err(e))?,
            store,
        })
    }

    fn e(&self, e: impl std::fmt::Display) -> MetaError {
        self.store.err(e)
    }

    pub(crate) fn counter(&self, k: &str) -> Result<u64, MetaError> {
        Ok(self
            .counters
            .get(k)
            .map_err(|e| self.e(e))?
            .map(|g| g.value())
            .unwrap_or(0))
    }

    pub(crate) fn set_counter(&mut self, k: &str, v: u64) -> Result<(), MetaError> {
        self.counters.insert(k, v).map_err(|e| self.store.err(e))?;
        Ok(())
    }

    fn next_id(&mut self, k: &str) -> Result<u64, MetaError> {
        let id = self.counter(k)?;
        self.set_counter(k, id + 1)?;
        Ok(id)
    }

    pub(crate) fn get_inode(&self, id: InodeId) -> Result<Inode, MetaError> {
        self.get(id)
    }

    fn get(&self, id: InodeId) -> Result<Inode, MetaError> {
        let g = self
            .inodes
            .get(id)
            .map_err(|e| self.e(e))?
            .ok_or(MetaError::NoInode(id))?;
        postcard::from_bytes(g.value()).map_err(|e| self.e(e))
    }

    fn put(&mut self, ino: &Inode) -> Result<(), MetaError> {
        self.inodes
            .insert(ino.id, enc(ino).as_slice())
            .map_err(|e| self.store.err(e))?;
        Ok(())
    }

    fn child(&self, parent: InodeId, name: &str) -> Result<Option<InodeId>, MetaError> {
        Ok(self
            .children
            .get((parent, name))
            .map_err(|e| self.e(e))?
            .map(|g| g.value()))
    }

    fn child_ids(&self, parent: InodeId) -> Result<Vec<(String, InodeId)>, MetaError> {
        let mut out = Vec::new();
        for kv in self
            .children
            .range((parent, "")..(parent + 1, ""))
            .map_err(|e| self.e(e))?
        {
            let (k, v) = kv.map_err(|e| self.e(e))?;
            out.push((k.value().1.to_string(), v.value()));
        }
        Ok(out)
    }

    fn dir(&self, id: InodeId) -> Result<Inode, MetaError> {
        let d = self.get(id)?;
        if !d.is_dir {
            return Err(MetaError::NotDir(id));
        }
        Ok(d)
    }

    #[allow(clippy::too_many_arguments)]
    fn create(
        &mut self,
        parent: &Inode,
        name: &str,
        is_dir: bool,
        mtime_ms: i64,
        persist: PersistState,
        complete: bool,
        synced_ms: Option<i64>,
    ) -> Result<Inode, MetaError> {
        validate_name(name)?;
        if self.child(parent.id, name)?.is_some() {
            return Err(MetaError::Exists(name.to_string()));
        }
        let ino = self.new_inode(parent, name, is_dir, mtime_ms, persist, complete, synced_ms)?;
        self.put(&ino)?;
        self.link(&ino)?;
        Ok(ino)
    }

    /// A new inode under `parent` with a fresh id, neither stored nor
    /// linked yet.
    #[allow(clippy::too_many_arguments)]
    fn new_inode(
        &mut self,
        parent: &Inode,
        name: &str,
        is_dir: bool,
        mtime_ms: i64,
        persist: PersistState,
        complete: bool,
        synced_ms: Option<i64>,
    ) -> Result<Inode, MetaError> {
        Ok(Inode {
            id: self.next_id(NEXT_INODE)?,
            parent: parent.id,
            name: name.to_string(),
            is_dir,
            size: 0,
            mtime_ms,
            mode: if is_dir { 0o755 } else { 0o644 },
            fingerprint: String::new(),
            persist,
            complete,
            generation: 1,
            mount_id: parent.mount_id,
            synced_ms,
            is_mount_point: false,
        })
    }

    /// Puts `ino` under its name in its parent directory.
    fn link(&mut self, ino: &Inode) -> Result<(), MetaError> {
        self.children
            .insert((ino.parent, ino.name.as_str()), ino.id)
            .map_err(|e| self.store.err(e))?;
        Ok(())
    }

    /// True if `ino` is what its parent lists under its name (false for
    /// the new version of a file being rewritten, until it is complete).
    fn is_linked(&self, ino: &Inode) -> Result<bool, MetaError> {
        Ok(self.child(ino.parent, &ino.name)? == Some(ino.id))
    }

    /// Removes `id` and its subtree; returns what was removed.
    fn remove_tree(&mut self, id: InodeId, removed: &mut Vec<Inode>) -> Result<(), MetaError> {
        let ino = self.get(id)?;
        if ino.is_dir {
            for (_, c) in self.child_ids(id)? {
                self.remove_tree(c, removed)?;
            }
        }
        // A new version not yet in place is not listed under the name.
        if self.is_linked(&ino)? {
            self.children
                .remove((ino.parent, ino.name.as_str()))
                .map_err(|e| self.store.err(e))?;
        }
        self.inodes.remove(id).map_err(|e| self.store.err(e))?;
        self.drop_attrs(id)?;
        removed.push(ino);
        Ok(())
    }

    fn is_ancestor(&self, anc: InodeId, mut id: InodeId) -> Result<bool, MetaError> {
        loop {
            if id == anc {
                return Ok(true);
            }
            if id == ROOT_ID {
                return Ok(false);
            }
            id = self.get(id)?.parent;
        }
    }

    pub(crate) fn apply(&mut self, cmd: &Command) -> Result<Output, MetaError> {
        let mut out = Output::default();
        match cmd {
            Command::Mkdir {
                parent,
                name,
                mtime_ms,
                synced_ms,
            } => {
                let p = self.dir(*parent)?;
                let persist = if p.mount_id != 0 {
                    PersistState::Persisted
                } else {
                    PersistState::NotPersisted
                };
                let d = self.create(&p, name, true, *mtime_ms, persist, true, *synced_ms)?;
                out.inode = Some(d.id);
            }
            Command::CreateFile {
                parent,
                name,
                mtime_ms,
                persist,
                overwrite,
            } => {
                let p = self.dir(*parent)?;
                let mut xattrs = Default::default();
                let f = if let Some(old) = self.child(p.id, name)? {
                    let o = self.get(old)?;
                    if !*overwrite || o.is_dir {
                        return Err(MetaError::Exists(name.clone()));
                    }
                    // Rewriting a file (O_TRUNC) keeps its extended
                    // attributes; an S3 PUT replaces them at completion.
                    xattrs = self.attrs_of(old)?.xattrs;
                    // The new version is written beside the old one, which
                    // stays what the name shows (to readers, listings and
                    // stats) until the new one is complete and takes its
                    // place; a write that fails leaves the old one as it was.
                    let mut f =
                        self.new_inode(&p, name, false, *mtime_ms, *persist, false, None)?;
                    f.mode = o.mode;
                    f.generation = o.generation + 1;
                    self.put(&f)?;
                    f
                } else {
                    self.create(&p, name, false, *mtime_ms, *persist, false, None)?
                };
                out.inode = Some(f.id);
                if !xattrs.is_empty() {
                    let a = crate::Attrs {
                        xattrs,
                        ..Default::default()
                    };
                    self.set_attrs_raw(f.id, &a)?;
                }
            }
            Command::CreateEmptyFile {
                parent,
                name,
                mtime_ms,
                overwrite,
            } => {
                out = self.apply(&Command::CreateFile {
                    parent: *parent,
                    name: name.clone(),
                    mtime_ms: *mtime_ms,
                    persist: PersistState::NotPersisted,
                    overwrite: *overwrite,
                })?;
                let id = out
                    .inode
                    .ok_or_else(|| MetaError::Invalid(format!("{name}: not created")))?;
                let generation = self.get(id)?.generation;
                let done = self.apply(&Command::CompleteFile {
                    id,
                    generation,
                    size: 0,
                    fingerprint: String::new(),
                    mtime_ms: *mtime_ms,
                    xattrs: None,
                })?;
                out.removed.extend(done.removed);
            }
            Command::CompleteFile {
                id,
                generation,
                size,
                fingerprint,
                mtime_ms,
                xattrs,
            } => {
                let mut f = self.get(*id)?;
                if f.is_dir || f.generation != *generation {
                    return Err(MetaError::Invalid(format!(
                        "inode {id} generation {generation} is not an open file"
                    )));
                }
                if let Some(x) = xattrs {
                    crate::xattr::check_xattr_set(x)?;
                }
                if !self.is_linked(&f)? {
                    // A new version written beside the old one: it takes
                    // the name now, replacing whatever file holds it (the
                    // last writer to complete wins, as with S3).
                    self.dir(f.parent)?;
                    if let Some(cur) = self.child(f.parent, &f.name)? {
                        if self.get(cur)?.is_dir {
                            return Err(MetaError::Exists(f.name.clone()));
                        }
                        self.remove_tree(cur, &mut out.removed)?;
                    }
                    self.link(&f)?;
                }
                f.size = *size;
                f.fingerprint = fingerprint.clone();
                f.mtime_ms = *mtime_ms;
                f.complete = true;
                if !fingerprint.is_empty() {
                    f.persist = PersistState::Persisted;
                }
                self.put(&f)?;
                out.inode = Some(f.id);
                if let Some(x) = xattrs {
                    self.replace_xattrs(f.id, x)?;
                }
                if f.persist == PersistState::ToBePersisted {
                    // ASYNC_THROUGH: the background write is queued with
                    // the file, so no leader change can forget it.
                    let path = self.path_of(f.id)?;
                    out.job = Some(self.submit_job(
                        &crate::JobKind::PersistFile { inode: f.id },
                        &path,
                        *mtime_ms,
                    )?);
                }
            }
            Command::Delete { id } => {
                if *id == ROOT_ID {
                    return Err(MetaError::Invalid("the root cannot be deleted".into()));
                }
                self.remove_tree(*id, &mut out.removed)?;
            }
            Command::Rename {
                id,
                new_parent,
                new_name,
                mtime_ms,
            } => {
                validate_name(new_name)?;
                let mut ino = self.get(*id)?;
                let np = self.dir(*new_parent)?;
                if ino.is_dir && self.is_ancestor(*id, np.id)? {
                    return Err(MetaError::Invalid(
                        "cannot move a directory below itself".into(),
                    ));
                }
                if self.child(np.id, new_name)?.is_some() {
                    return Err(MetaError::Exists(new_name.clone()));
                }
                self.children
                    .remove((ino.parent, ino.name.as_str()))
                    .map_err(|e| self.store.err(e))?;
                ino.parent = np.id;
                ino.name = new_name.clone();
                ino.mtime_ms = *mtime_ms;
                self.put(&ino)?;
                self.children
                    .insert((np.id, new_name.as_str()), ino.id)
                    .map_err(|e| self.store.err(e))?;
                out.inode = Some(ino.id);
            }
            Command::SyncDir {
                dir,
                synced_ms,
                entries,
            } => {
                let mut d = self.dir(*dir)?;
                let existing = self.child_ids(d.id)?;
                let mut seen = std::collections::HashSet::new();
                for en in entries {
                    if validate_name(&en.name).is_err() {
                        // A UFS name the namespace cannot represent is skipped.
                        continue;
                    }
                    seen.insert(en.name.as_str());
                    match self.child(d.id, &en.name)? {
                        None => {
                            self.add_ufs_entry(&d, en, &mut out)?;
                        }
                        Some(cid) => {
                            let mut c = self.get(cid)?;
                            if c.is_mount_point
                                || !c.complete
                                || c.persist != PersistState::Persisted
                            {
                                continue;
                            }
                            if c.is_dir != en.is_dir {
                                self.remove_tree(cid, &mut out.removed)?;
                                self.add_ufs_entry(&d, en, &mut out)?;
                            } else if !c.is_dir && c.fingerprint != en.fingerprint {
                                c.size = en.size;
                                c.mtime_ms = en.mtime_ms;
                                c.fingerprint = en.fingerprint.clone();
                                c.generation += 1;
                                self.put(&c)?;
                                out.changed += 1;
                            }
                        }
                    }
                }
                for (name, cid) in existing {
                    if seen.contains(name.as_str()) {
                        continue;
                    }
                    let c = self.get(cid)?;
                    if c.is_mount_point || !c.complete || c.persist != PersistState::Persisted {
                        continue;
                    }
                    self.remove_tree(cid, &mut out.removed)?;
                }
                d.synced_ms = Some(*synced_ms);
                self.put(&d)?;
                out.inode = Some(d.id);
            }
            Command::Invalidate { dir } => {
                let mut d = self.dir(*dir)?;
                d.synced_ms = None;
                self.put(&d)?;
                out.inode = Some(d.id);
            }
            Command::AddMount {
                parent,
                name,
                mtime_ms,
                mount,
            } => {
                let p = self.dir(*parent)?;
                if p.mount_id != 0 {
                    return Err(MetaError::Invalid(
                        "cannot mount inside another mount".into(),
                    ));
                }
                let mount_id = self.next_id(NEXT_MOUNT)?;
                let mut d = self.create(
                    &p,
                    name,
                    true,
                    *mtime_ms,
                    PersistState::Persisted,
                    true,
                    None,
                )?;
                d.mount_id = mount_id;
                d.is_mount_point = true;
                self.put(&d)?;
                let m = MountEntry {
                    id: mount_id,
                    inode: d.id,
                    ..mount.clone()
                };
                self.mounts
                    .insert(mount_id, enc(&m).as_slice())
                    .map_err(|e| self.store.err(e))?;
                out.inode = Some(d.id);
            }
            Command::SubmitJob {
                kind,
                path,
                created_ms,
            } => {
                out.job = Some(self.submit_job(kind, path, *created_ms)?);
            }
            Command::UpdateJob {
                id,
                state,
                progress,
                message,
                new_run,
                updated_ms,
            } => {
                self.update_job(
                    *id,
                    *state,
                    progress.as_ref(),
                    message.as_deref(),
                    *new_run,
                    *updated_ms,
                )?;
                out.job = Some(*id);
            }
            Command::Persisted {
                id,
                generation,
                fingerprint,
            } => {
                let mut f = self.get(*id)?;
                if f.is_dir || !f.complete || f.generation != *generation {
                    return Err(MetaError::Invalid(format!(
                        "inode {id} generation {generation} changed while it was persisted"
                    )));
                }
                f.persist = PersistState::Persisted;
                f.fingerprint = fingerprint.clone();
                self.put(&f)?;
                out.inode = Some(f.id);
                let mut a = self.attrs_of(f.id)?;
                a.inode_cache_id = true;
                self.set_attrs(f.id, &a)?;
            }
            Command::SetAttrs { id, attrs } => {
                self.set_attrs(*id, attrs)?;
                out.inode = Some(*id);
            }
            Command::SetXattrs {
                id,
                set,
                remove,
                flag,
            } => {
                self.set_xattrs(*id, set, remove, *flag)?;
                out.inode = Some(*id);
            }
            Command::RemoveMount { mount_id } => {
                let g = self
                    .mounts
                    .get(*mount_id)
                    .map_err(|e| self.e(e))?
                    .ok_or_else(|| MetaError::Invalid(format!("no mount {mount_id}")))?;
                let m: MountEntry = postcard::from_bytes(g.value()).map_err(|e| self.e(e))?;
                drop(g);
                self.remove_tree(m.inode, &mut out.removed)?;
                self.mounts
                    .remove(*mount_id)
                    .map_err(|e| self.store.err(e))?;
            }
        }
        Ok(out)
    }

    fn add_ufs_entry(
        &mut self,
        d: &Inode,
        en: &UfsEntry,
        out: &mut Output,
    ) -> Result<(), MetaError> {
        let mut c = self.create(
            d,
            &en.name,
            en.is_dir,
            en.mtime_ms,
            PersistState::Persisted,
            true,
            None,
        )?;
        if !en.is_dir {
            c.size = en.size;
            c.fingerprint = en.fingerprint.clone();
            self.put(&c)?;
        }
        out.changed += 1;
        Ok(())
    }
}

fn validate_name(name: &str) -> Result<(), MetaError> {
    if name.is_empty()
        || name == "."
        || name == ".."
        || name.contains('/')
        || name.contains('\0')
        || name.len() > 255
    {
        return Err(MetaError::Invalid(format!("invalid name {name:?}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mkdir(s: &MetaStore, parent: u64, name: &str) -> u64 {
        s.apply(&Command::Mkdir {
            parent,
            name: name.into(),
            mtime_ms: 1,
            synced_ms: None,
        })
        .unwrap()
        .inode
        .unwrap()
    }

    fn entry(name: &str, fp: &str) -> UfsEntry {
        UfsEntry {
            name: name.into(),
            is_dir: false,
            size: 3,
            mtime_ms: 5,
            fingerprint: fp.into(),
        }
    }

    #[test]
    fn pages_of_children_come_in_key_order_from_any_point() {
        let dir = tempfile::tempdir().unwrap();
        let s = MetaStore::open(dir.path()).unwrap();
        let d = mkdir(&s, ROOT_ID, "top");
        // Names that sort differently once directories get their '/'.
        let dirs = ["d", "d-1", "a", "d.x.y", "z"];
        let files = ["d-", "d-0", "d-1.txt", "d.x", "d0", "a-b", "d.x.y.z", "b"];
        for n in dirs {
            mkdir(&s, d, n);
        }
        for n in files {
            s.apply(&Command::CreateEmptyFile {
                parent: d,
                name: n.into(),
                mtime_ms: 1,
                overwrite: false,
            })
            .unwrap();
        }
        let key = |i: &Inode| {
            if i.is_dir {
                format!("{}/", i.name)
            } else {
                i.name.clone()
            }
        };
        let mut all: Vec<String> = s.children(d).unwrap().iter().map(key).collect();
        all.sort();
        assert_eq!(all.len(), dirs.len() + files.len());
        let mut starts: Vec<String> = all.clone();
        starts.extend(["", "d", "d-", "d-1/x", "d.", "d.x.y/q", "c", "zz"].map(String::from));
        for start in &starts {
            for limit in 1..5 {
                // Page from `start` to the end, each page after the last
                // key of the one before.
                let mut got = Vec::new();
                let mut after = start.clone();
                loop {
                    let page: Vec<String> = s
                        .children_page(d, &after, limit)
                        .unwrap()
                        .iter()
                        .map(key)
                        .collect();
                    assert!(page.len() <= limit);
                    got.extend(page.iter().cloned());
                    match page.last() {
                        Some(l) if page.len() == limit => after = l.clone(),
                        _ => break,
                    }
                }
                let want: Vec<String> = all.iter().filter(|k| *k > start).cloned().collect();
                assert_eq!(got, want, "after {start:?}, {limit} a page");
            }
        }
    }

    #[test]
    fn an_empty_file_is_created_complete_in_one_command() {
        let dir = tempfile::tempdir().unwrap();
        let s = MetaStore::open(dir.path()).unwrap();
        let touch = |overwrite| Command::CreateEmptyFile {
            parent: ROOT_ID,
            name: "e".into(),
            mtime_ms: 7,
            overwrite,
        };
        let out = s.apply(&touch(false)).unwrap();
        let f = s.inode(out.inode.unwrap()).unwrap().unwrap();
        assert!(f.complete && !f.is_dir);
        assert_eq!((f.size, f.mtime_ms, f.generation), (0, 7, 1));
        assert_eq!(f.persist, PersistState::NotPersisted);
        assert!(matches!(s.apply(&touch(false)), Err(MetaError::Exists(_))));
        // Overwriting replaces the file with a new generation.
        let out = s.apply(&touch(true)).unwrap();
        assert_eq!(out.removed.len(), 1);
        let g = s.inode(out.inode.unwrap()).unwrap().unwrap();
        assert_eq!((g.generation, g.complete), (2, true));
        // Under a file, nothing is created.
        assert!(
            s.apply(&Command::CreateEmptyFile {
                parent: g.id,
                name: "x".into(),
                mtime_ms: 1,
                overwrite: false,
            })
            .is_err()
        );
        assert_eq!(s.children(ROOT_ID).unwrap().len(), 1);
    }

    #[test]
    fn a_rewritten_file_keeps_its_old_version_until_the_new_one_is_complete() {
        let dir = tempfile::tempdir().unwrap();
        let s = MetaStore::open(dir.path()).unwrap();
        let create = |overwrite| Command::CreateFile {
            parent: ROOT_ID,
            name: "f".into(),
            mtime_ms: 1,
            persist: PersistState::NotPersisted,
            overwrite,
        };
        let complete = |id: u64, generation: u64, size: u64| Command::CompleteFile {
            id,
            generation,
            size,
            fingerprint: String::new(),
            mtime_ms: 2,
            xattrs: None,
        };
        let at_name = || s.lookup(ROOT_ID, "f").unwrap().map(|i| (i.id, i.size));
        let v1 = s.apply(&create(false)).unwrap().inode.unwrap();
        // A brand-new file is listed while it is written.
        assert_eq!(at_name(), Some((v1, 0)));
        s.apply(&complete(v1, 1, 10)).unwrap();
        // Two rewrites start; the name still shows version 1.
        let a = s.apply(&create(true)).unwrap();
        let b = s.apply(&create(true)).unwrap();
        let (a, b) = (a.inode.unwrap(), b.inode.unwrap());
        assert!(s.apply(&create(false)).is_err());
        assert_eq!(at_name(), Some((v1, 10)));
        assert_eq!(s.children(ROOT_ID).unwrap().len(), 1);
        // The first to complete takes the name (version 1 goes)...
        let out = s.apply(&complete(b, 2, 20)).unwrap();
        assert_eq!(out.removed.iter().map(|i| i.id).collect::<Vec<_>>(), [v1]);
        assert_eq!(at_name(), Some((b, 20)));
        // ...a rewrite that fails is dropped without touching it...
        let c = s.apply(&create(true)).unwrap().inode.unwrap();
        s.apply(&Command::Delete { id: c }).unwrap();
        assert_eq!(at_name(), Some((b, 20)));
        assert!(s.inode(c).unwrap().is_none());
        // ...and the last to complete wins.
        s.apply(&complete(a, 2, 30)).unwrap();
        assert_eq!(at_name(), Some((a, 30)));
        assert!(s.inode(b).unwrap().is_none());
        assert_eq!(s.children(ROOT_ID).unwrap().len(), 1);
        // A new version whose directory went away cannot complete.
        let d = mkdir(&s, ROOT_ID, "d");
        let mk = |name: &str| Command::CreateFile {
            parent: d,
            name: name.into(),
            mtime_ms: 1,
            persist: PersistState::NotPersisted,
            overwrite: true,
        };
        let x1 = s.apply(&mk("x")).unwrap().inode.unwrap();
        s.apply(&complete(x1, 1, 1)).unwrap();
        let x2 = s.apply(&mk("x")).unwrap().inode.unwrap();
        s.apply(&Command::Delete { id: d }).unwrap();
        assert!(s.apply(&complete(x2, 2, 1)).is_err());
        // Found as abandoned (its directory is gone), then removed.
        let ids = |before| {
            s.abandoned_versions(before)
                .unwrap()
                .iter()
                .map(|i| i.id)
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(2), [x2]);
        s.apply(&Command::Delete { id: x2 }).unwrap();
        assert_eq!(ids(i64::MAX), Vec::<u64>::new());
        // Rewrites left unfinished are abandoned once old enough; a new
        // file being written (listed) and completed versions are not.
        let old = s.apply(&create(true)).unwrap().inode.unwrap();
        let recent = s
            .apply(&Command::CreateFile {
                parent: ROOT_ID,
                name: "f".into(),
                mtime_ms: 100,
                persist: PersistState::NotPersisted,
                overwrite: true,
            })
            .unwrap()
            .inode
            .unwrap();
        s.apply(&Command::CreateFile {
            parent: ROOT_ID,
            name: "new".into(),
            mtime_ms: 1,
            persist: PersistState::NotPersisted,
            overwrite: false,
        })
        .unwrap();
        assert_eq!(ids(50), [old]);
        assert_eq!(ids(200), [old, recent]);
        let generation = s.inode(old).unwrap().unwrap().generation;
        s.apply(&complete(old, generation, 5)).unwrap();
        assert_eq!(ids(200), [recent]);
    }

    #[test]
    fn persists_across_reopen_and_rejects_bad_commands() {
        let dir = tempfile::tempdir().unwrap();
        let a;
        {
            let s = MetaStore::open(dir.path()).unwrap();
            a = mkdir(&s, ROOT_ID, "a");
            mkdir(&s, a, "b");
            assert!(matches!(
                s.apply(&Command::Mkdir {
                    parent: a,
                    name: "b".into(),
                    mtime_ms: 1,
                    synced_ms: None
                }),
                Err(MetaError::Exists(_))
            ));
            assert!(
                s.apply(&Command::Mkdir {
                    parent: a,
                    name: "..".into(),
                    mtime_ms: 1,
                    synced_ms: None
                })
                .is_err()
            );
            // moving a dir below itself fails and changes nothing
            let b = s.lookup(a, "b").unwrap().unwrap().id;
            assert!(
                s.apply(&Command::Rename {
                    id: a,
                    new_parent: b,
                    new_name: "x".into(),
                    mtime_ms: 2
                })
                .is_err()
            );
            assert_eq!(s.lookup(ROOT_ID, "a").unwrap().unwrap().id, a);
        }
        let s = MetaStore::open(dir.path()).unwrap();
        assert_eq!(s.children(a).unwrap().len(), 1);
        assert_eq!(s.applied().unwrap(), 2);
    }

    #[test]
    fn sync_dir_merges_listing() {
        let dir = tempfile::tempdir().unwrap();
        let s = MetaStore::open(dir.path()).unwrap();
        let d = mkdir(&s, ROOT_ID, "d");
        s.apply(&Command::SyncDir {
            dir: d,
            synced_ms: 10,
            entries: vec![entry("x", "e1"), entry("y", "e1")],
        })
        .unwrap();
        // a local unpersisted file survives a sync that does not list it
        s.apply(&Command::CreateFile {
            parent: d,
            name: "local".into(),
            mtime_ms: 1,
            persist: PersistState::NotPersisted,
            overwrite: false,
        })
        .unwrap();
        let out = s
            .apply(&Command::SyncDir {
                dir: d,
                synced_ms: 20,
                entries: vec![entry("x", "e2")],
            })
            .unwrap();
        assert_eq!(out.changed, 1);
        assert_eq!(out.removed.len(), 1);
        let x = s.lookup(d, "x").unwrap().unwrap();
        assert_eq!((x.fingerprint.as_str(), x.generation), ("e2", 2));
        assert!(s.lookup(d, "y").unwrap().is_none());
        assert!(s.lookup(d, "local").unwrap().is_some());
        assert_eq!(s.inode(d).unwrap().unwrap().synced_ms, Some(20));
    }

    #[test]
    fn replaying_commands_is_deterministic() {
        let cmds = vec![
            Command::Mkdir {
                parent: ROOT_ID,
                name: "a".into(),
                mtime_ms: 1,
                synced_ms: None,
            },
            Command::CreateFile {
                parent: 2,
                name: "f".into(),
                mtime_ms: 1,
                persist: PersistState::NotPersisted,
                overwrite: false,
            },
            Command::CompleteFile {
                id: 3,
                generation: 1,
                size: 9,
                fingerprint: "".into(),
                mtime_ms: 2,
                xattrs: None,
            },
            Command::Rename {
                id: 3,
                new_parent: ROOT_ID,
                new_name: "g".into(),
                mtime_ms: 3,
            },
            Command::Delete { id: 2 },
        ];
        let snap = |s: &MetaStore| (s.children(ROOT_ID).unwrap(), s.applied().unwrap());
        let d1 = tempfile::tempdir().unwrap();
        let d2 = tempfile::tempdir().unwrap();
        let (s1, s2) = (
            MetaStore::open(d1.path()).unwrap(),
            MetaStore::open(d2.path()).unwrap(),
        );
        for c in &cmds {
            s1.apply(c).unwrap();
            s2.apply(c).unwrap();
        }
        assert_eq!(snap(&s1), snap(&s2));
        assert_eq!(s1.children(ROOT_ID).unwrap()[0].name, "g");
    }
}
