//! Kernel inode numbers for namespace paths. Numbers are handed out on first
//! sight and dropped when the kernel forgets them; a rename moves the paths
//! of an inode and everything below it.
//!
//! A restartable mount (`strata mount --restartable`) also appends every
//! change to a journal file, so a daemon started on the same kernel
//! connection after a crash knows the numbers the kernel still holds.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::Path;

pub const ROOT: u64 = 1;

struct Node {
    path: String,
    lookups: u64,
    /// Permission bits set through the mount (kept for the mount's life).
    mode: Option<u16>,
}

pub struct Inodes {
    by_ino: HashMap<u64, Node>,
    by_path: HashMap<String, u64>,
    next: u64,
    journal: Option<Journal>,
    /// File handles open for writing, from this daemon and earlier ones
    /// of the mount (journaled only for restartable mounts).
    writers: std::collections::HashSet<u64>,
    /// Numbers handed out by listings (which the kernel does not count),
    /// oldest first. Past `max_unreferenced` the oldest is dropped if the
    /// kernel never looked it up, so listing huge trees does not grow the
    /// table for the mount's life.
    unreferenced: std::collections::VecDeque<u64>,
    max_unreferenced: usize,
}

/// Listed-but-never-looked-up numbers kept (a later lookup of a dropped
/// one gets a new number; only `ls -i` of the old listing would tell).
const MAX_UNREFERENCED: usize = 100_000;

/// Records appended since the journal was last rewritten.
struct Journal {
    file: std::fs::File,
    path: std::path::PathBuf,
    records: usize,
}

/// One journal record: `op` byte, then `ino` (u64 LE), then a
/// length-prefixed string (u32 LE + bytes) whose meaning depends on `op`.
const NEW: u8 = b'N';
const FORGET: u8 = b'F';
const MODE: u8 = b'M';
const RENAME: u8 = b'R';
const UNLINK: u8 = b'U';
const WRITER: u8 = b'W';
const CLOSED: u8 = b'C';

fn record(op: u8, ino: u64, a: &str, b: &str) -> Vec<u8> {
    let mut r = Vec::with_capacity(17 + a.len() + b.len());
    r.push(op);
    r.extend_from_slice(&ino.to_le_bytes());
    for s in [a, b] {
        r.extend_from_slice(&(s.len() as u32).to_le_bytes());
        r.extend_from_slice(s.as_bytes());
    }
    r
}

/// Parses a journal; a torn last record (the daemon died while writing
/// it) ends the list.
fn parse(mut buf: &[u8]) -> Vec<(u8, u64, String, String)> {
    fn take<'a>(buf: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if buf.len() < n {
            return None;
        }
        let (a, b) = buf.split_at(n);
        *buf = b;
        Some(a)
    }
    fn string(buf: &mut &[u8]) -> Option<String> {
        let n = u32::from_le_bytes(take(buf, 4)?.try_into().ok()?) as usize;
        String::from_utf8(take(buf, n)?.to_vec()).ok()
    }
    let mut out = Vec::new();
    while !buf.is_empty() {
        let Some(rec) = (|| {
            let op = take(&mut buf, 1)?[0];
            let ino = u64::from_le_bytes(take(&mut buf, 8)?.try_into().ok()?);
            Some((op, ino, string(&mut buf)?, string(&mut buf)?))
        })() else {
            break;
        };
        out.push(rec);
    }
    out
}

fn parent_of(path: &str) -> &str {
    match path.rfind('/') {
        Some(0) | None => "/",
        Some(i) => &path[..i],
    }
}

impl Inodes {
    pub fn new(root: String) -> Inodes {
        let mut i = Inodes {
            by_ino: HashMap::new(),
            by_path: HashMap::new(),
            next: ROOT + 1,
            journal: None,
            writers: Default::default(),
            unreferenced: Default::default(),
            max_unreferenced: MAX_UNREFERENCED,
        };
        i.by_path.insert(root.clone(), ROOT);
        i.by_ino.insert(
            ROOT,
            Node {
                path: root,
                lookups: 1,
                mode: None,
            },
        );
        i
    }

    /// Inode numbers kept in the journal `path`: the numbers a former
    /// daemon of this mount handed out are read back (and never forgotten
    /// again, since the kernel's lookup counts are unknown), then the
    /// journal is rewritten with just them and kept up to date.
    pub fn with_journal(root: String, path: &Path) -> std::io::Result<Inodes> {
        let mut i = Inodes::new(root);
        let mut buf = Vec::new();
        match std::fs::File::open(path) {
            Ok(mut f) => {
                f.read_to_end(&mut buf)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        for (op, ino, a, b) in parse(&buf) {
            match op {
                NEW => {
                    i.by_path.insert(a.clone(), ino);
                    i.by_ino.insert(
                        ino,
                        Node {
                            path: a,
                            lookups: u64::MAX / 2,
                            mode: None,
                        },
                    );
                    i.next = i.next.max(ino + 1);
                }
                FORGET => {
                    if let Some(n) = i.by_ino.remove(&ino)
                        && i.by_path.get(&n.path) == Some(&ino)
                    {
                        i.by_path.remove(&n.path);
                    }
                }
                MODE => i.set_mode(ino, a.parse().unwrap_or(0o644)),
                RENAME => i.rename(&a, &b),
                UNLINK => i.unlinked(&a),
                WRITER => {
                    i.writers.insert(ino);
                }
                CLOSED => {
                    i.writers.remove(&ino);
                }
                _ => break,
            }
        }
        i.journal = Some(Journal {
            file: std::fs::File::create(path)?,
            path: path.to_path_buf(),
            records: 0,
        });
        i.rewrite_journal()?;
        Ok(i)
    }

    /// Replaces the journal with one record per live inode.
    fn rewrite_journal(&mut self) -> std::io::Result<()> {
        let Some(j) = &self.journal else {
            return Ok(());
        };
        let mut buf = Vec::new();
        for (ino, n) in &self.by_ino {
            if *ino == ROOT {
                continue;
            }
            buf.extend(record(NEW, *ino, &n.path, ""));
            if let Some(m) = n.mode {
                buf.extend(record(MODE, *ino, &m.to_string(), ""));
            }
        }
        for fh in &self.writers {
            buf.extend(record(WRITER, *fh, "", ""));
        }
        let tmp = j.path.with_extension("new");
        std::fs::write(&tmp, &buf)?;
        std::fs::rename(&tmp, &j.path)?;
        let file = std::fs::OpenOptions::new().append(true).open(&j.path)?;
        self.journal = Some(Journal {
            file,
            path: j.path.clone(),
            records: self.by_ino.len() + self.writers.len(),
        });
        Ok(())
    }

    /// File handle `fh` is open for writing.
    pub fn writer_opened(&mut self, fh: u64) {
        if self.journal.is_some() {
            self.writers.insert(fh);
            self.log(WRITER, fh, "", "");
        }
    }

    /// File handle `fh` is released; true if it was open for writing.
    pub fn writer_closed(&mut self, fh: u64) -> bool {
        let was = self.writers.remove(&fh);
        if was {
            self.log(CLOSED, fh, "", "");
        }
        was
    }

    /// True if `fh` is open for writing (possibly by an earlier daemon).
    pub fn is_writer(&self, fh: u64) -> bool {
        self.writers.contains(&fh)
    }

    /// Appends one record (one `write(2)`, so a daemon killed right after
    /// it returns still leaves it in the file).
    fn log(&mut self, op: u8, ino: u64, a: &str, b: &str) {
        let Some(j) = &mut self.journal else {
            return;
        };
        if let Err(e) = j.file.write_all(&record(op, ino, a, b)) {
            tracing::warn!("inode journal {}: {e}", j.path.display());
        }
        j.records += 1;
        if j.records > 2 * (self.by_ino.len() + self.writers.len()) + 10_000
            && let Err(e) = self.rewrite_journal()
        {
            tracing::warn!("rewriting the inode journal: {e}");
        }
    }

    /// The inode number of a known path.
    pub fn ino_of(&self, path: &str) -> Option<u64> {
        self.by_path.get(path).copied()
    }

    pub fn path(&self, ino: u64) -> Option<String> {
        self.by_ino.get(&ino).map(|n| n.path.clone())
    }

    /// The inode of `path`, created if new, that a lookup will count soon
    /// (a `create` in progress): never dropped as listed-only meanwhile.
    /// If that lookup does not come, [`Inodes::not_counted`].
    pub fn ino_held(&mut self, path: &str) -> u64 {
        self.ino_made(path, false)
    }

    /// The number `ino_held` gave will not be counted after all.
    pub fn not_counted(&mut self, ino: u64) {
        if self.by_ino.get(&ino).is_some_and(|n| n.lookups == 0) {
            self.unreferenced.push_back(ino);
        }
    }

    /// Takes back one lookup counted by [`Inodes::ino_for`] that the
    /// kernel did not receive after all (a listing entry that did not fit).
    pub fn uncount(&mut self, ino: u64) {
        if let Some(n) = self.by_ino.get_mut(&ino) {
            n.lookups = n.lookups.saturating_sub(1);
            if n.lookups == 0 {
                self.unreferenced.push_back(ino);
            }
        }
    }

    /// The inode of `path`, created if new; `lookup` counts a kernel lookup.
    pub fn ino_for(&mut self, path: &str, lookup: bool) -> u64 {
        let ino = self.ino_made(path, !lookup);
        if lookup && let Some(n) = self.by_ino.get_mut(&ino) {
            n.lookups += 1;
        }
        ino
    }

    /// The inode of `path`, created if new (and then queued to be dropped
    /// unless counted, if `queue`).
    fn ino_made(&mut self, path: &str, queue: bool) -> u64 {
        match self.by_path.get(path) {
            Some(&i) => i,
            None => {
                let i = self.next;
                self.next += 1;
                self.by_path.insert(path.to_string(), i);
                self.by_ino.insert(
                    i,
                    Node {
                        path: path.to_string(),
                        lookups: 0,
                        mode: None,
                    },
                );
                self.log(NEW, i, path, "");
                if queue {
                    self.unreferenced.push_back(i);
                    if self.unreferenced.len() > self.max_unreferenced
                        && let Some(old) = self.unreferenced.pop_front()
                        && self.by_ino.get(&old).is_some_and(|n| n.lookups == 0)
                    {
                        self.drop_node(old);
                    }
                }
                i
            }
        }
    }

    fn drop_node(&mut self, ino: u64) {
        if let Some(node) = self.by_ino.remove(&ino) {
            if self.by_path.get(&node.path) == Some(&ino) {
                self.by_path.remove(&node.path);
            }
            self.log(FORGET, ino, "", "");
        }
    }

    /// Inode numbers known.
    #[cfg(test)]
    pub fn count(&self) -> usize {
        self.by_ino.len()
    }

    pub fn forget(&mut self, ino: u64, n: u64) {
        if ino == ROOT {
            return;
        }
        let gone = match self.by_ino.get_mut(&ino) {
            Some(node) => {
                node.lookups = node.lookups.saturating_sub(n);
                node.lookups == 0
            }
            None => false,
        };
        if gone {
            self.drop_node(ino);
        }
    }

    pub fn parent_ino(&self, ino: u64) -> u64 {
        if ino == ROOT {
            return ROOT;
        }
        self.by_ino
            .get(&ino)
            .and_then(|n| self.by_path.get(parent_of(&n.path)).copied())
            .unwrap_or(ROOT)
    }

    pub fn mode(&self, ino: u64) -> Option<u16> {
        self.by_ino.get(&ino).and_then(|n| n.mode)
    }

    pub fn set_mode(&mut self, ino: u64, mode: u16) {
        if let Some(n) = self.by_ino.get_mut(&ino) {
            n.mode = Some(mode);
            self.log(MODE, ino, &mode.to_string(), "");
        }
    }

    /// `src` (and everything below it) is now at `dst`.
    pub fn rename(&mut self, src: &str, dst: &str) {
        self.log(RENAME, 0, src, dst);
        // A file replaced by the rename loses its name.
        if let Some(old) = self.by_path.remove(dst)
            && let Some(n) = self.by_ino.get_mut(&old)
        {
            n.path = format!("{dst}\u{0}replaced");
        }
        let prefix = format!("{src}/");
        let moved: Vec<(String, u64)> = self
            .by_path
            .iter()
            .filter(|(p, _)| p.as_str() == src || p.starts_with(&prefix))
            .map(|(p, i)| (p.clone(), *i))
            .collect();
        for (p, i) in moved {
            self.by_path.remove(&p);
            let np = format!("{dst}{}", &p[src.len()..]);
            if let Some(n) = self.by_ino.get_mut(&i) {
                n.path = np.clone();
            }
            self.by_path.insert(np, i);
        }
    }

    /// `path` was removed: a new file there gets a new inode.
    pub fn unlinked(&mut self, path: &str) {
        self.log(UNLINK, 0, path, "");
        if let Some(i) = self.by_path.remove(path)
            && let Some(n) = self.by_ino.get_mut(&i)
        {
            n.path = format!("{path}\u{0}deleted");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listed_names_never_looked_up_are_dropped_past_a_bound() {
        let mut i = Inodes::new("/d".into());
        i.max_unreferenced = 10;
        let kept = i.ino_for("/d/kept", false);
        i.ino_for("/d/kept", true);
        let unlinked = i.ino_for("/d/gone", false);
        i.unlinked("/d/gone");
        let first = i.ino_for("/d/f0", false);
        for n in 1..100 {
            i.ino_for(&format!("/d/f{n}"), false);
        }
        // The root, the looked-up name and the last 10 listed ones.
        assert_eq!(i.count(), 1 + 1 + 10);
        assert_eq!(i.ino_of("/d/kept"), Some(kept));
        assert!(i.path(unlinked).is_none() && i.path(first).is_none());
        assert!(i.ino_of("/d/f0").is_none());
        assert_ne!(i.ino_for("/d/f0", true), first, "a new number");
        assert_eq!(
            i.ino_of("/d/f99").and_then(|n| i.path(n)).as_deref(),
            Some("/d/f99")
        );
    }

    #[test]
    fn lookup_forget_rename() {
        let mut i = Inodes::new("/data".into());
        let a = i.ino_for("/data/a", true);
        let b = i.ino_for("/data/a/b", true);
        assert_eq!(i.ino_for("/data/a", false), a);
        assert_eq!(i.parent_ino(b), a);
        assert_eq!(i.parent_ino(a), ROOT);
        i.rename("/data/a", "/data/z");
        assert_eq!(i.path(b).unwrap(), "/data/z/b");
        assert_eq!(i.ino_for("/data/z/b", false), b);
        i.forget(b, 1);
        assert!(i.path(b).is_none());
        i.unlinked("/data/z");
        assert_ne!(i.ino_for("/data/z", false), a);
        assert!(i.path(a).unwrap().contains("deleted"));
    }

    #[test]
    fn a_journal_brings_back_the_numbers_the_kernel_holds() {
        let dir = std::env::temp_dir().join(format!("strata-inodes-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let j = dir.join("inodes");
        let _ = std::fs::remove_file(&j);
        let (a, b, c, gone);
        {
            let mut i = Inodes::with_journal("/".into(), &j).unwrap();
            a = i.ino_for("/a", true);
            b = i.ino_for("/a/b", true);
            c = i.ino_for("/c", true);
            gone = i.ino_for("/d", true);
            i.set_mode(b, 0o600);
            i.rename("/a", "/z");
            i.forget(gone, 1);
            i.unlinked("/c");
            i.writer_opened(7);
            i.writer_opened(8);
            assert!(i.writer_closed(8));
        }
        // A torn record at the end (a daemon killed mid-write) is ignored.
        let mut f = std::fs::OpenOptions::new().append(true).open(&j).unwrap();
        f.write_all(&[NEW, 1, 2]).unwrap();
        drop(f);
        let mut i = Inodes::with_journal("/".into(), &j).unwrap();
        assert_eq!(i.path(a).unwrap(), "/z");
        assert_eq!(i.path(b).unwrap(), "/z/b");
        assert_eq!(i.mode(b), Some(0o600));
        assert!(i.is_writer(7) && !i.is_writer(8));
        assert!(i.path(c).unwrap().contains("deleted"));
        assert!(i.path(gone).is_none());
        // Numbers are not reused, and reloaded ones are never forgotten.
        let new = i.ino_for("/new", true);
        assert!(new > gone);
        i.forget(a, 1000);
        assert_eq!(i.path(a).unwrap(), "/z");
        // The rewritten journal alone gives the same table.
        drop(i);
        let i = Inodes::with_journal("/".into(), &j).unwrap();
        assert_eq!(i.path(b).unwrap(), "/z/b");
        assert_eq!(i.path(new).unwrap(), "/new");
        assert!(i.is_writer(7));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
