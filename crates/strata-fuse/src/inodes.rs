//! Kernel inode numbers for namespace paths. Numbers are handed out on first
//! sight and dropped when the kernel forgets them; a rename moves the paths
//! of an inode and everything below it.

use std::collections::HashMap;

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

    /// The inode number of a known path.
    pub fn ino_of(&self, path: &str) -> Option<u64> {
        self.by_path.get(path).copied()
    }

    pub fn path(&self, ino: u64) -> Option<String> {
        self.by_ino.get(&ino).map(|n| n.path.clone())
    }

    /// The inode of `path`, created if new; `lookup` counts a kernel lookup.
    pub fn ino_for(&mut self, path: &str, lookup: bool) -> u64 {
        let ino = match self.by_path.get(path) {
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
                i
            }
        };
        if lookup && let Some(n) = self.by_ino.get_mut(&ino) {
            n.lookups += 1;
        }
        ino
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
        if gone
            && let Some(node) = self.by_ino.remove(&ino)
            && self.by_path.get(&node.path) == Some(&ino)
        {
            self.by_path.remove(&node.path);
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
        }
    }

    /// `src` (and everything below it) is now at `dst`.
    pub fn rename(&mut self, src: &str, dst: &str) {
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
}
