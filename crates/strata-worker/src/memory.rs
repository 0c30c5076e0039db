//! How much memory the worker may still use: the host's `MemAvailable`, or
//! the room left under its cgroup's limit (and every ancestor's), whichever
//! is smaller, plus the kernel's memory pressure stall figure (PSI) where it
//! exists. The MEM tier lives on tmpfs, whose pages are charged to the
//! worker's cgroup and cannot be reclaimed without swap: when the room runs
//! out, the kernel's OOM killer acts. The watch loop in `lib.rs` spills MEM
//! pages to disk well before that.

use std::path::{Path, PathBuf};

/// What one look at memory found.
#[derive(Clone, Copy, Debug, Default)]
pub struct MemoryReading {
    /// Bytes the worker may still use; `None` if nothing could be read.
    pub available: Option<u64>,
    /// `some avg10` of the memory PSI (percent of time stalled), if present.
    pub psi_some_avg10: Option<f64>,
}

/// Limits at or above this are "no limit" (cgroup v1 reports 2^63 - page).
const UNLIMITED: u64 = 1 << 60;

pub fn read() -> MemoryReading {
    let host = host_available();
    let cg = cgroup_available();
    let available = match (host, cg) {
        (Some(h), Some(c)) => Some(h.min(c)),
        (h, c) => h.or(c),
    };
    MemoryReading {
        available,
        psi_some_avg10: psi_some_avg10(),
    }
}

fn host_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    meminfo_field(&text, "MemAvailable:")
}

/// This process's resident set and its peak (VmRSS, VmHWM), in bytes.
pub fn process_rss() -> (u64, u64) {
    let Ok(text) = std::fs::read_to_string("/proc/self/status") else {
        return (0, 0);
    };
    (
        meminfo_field(&text, "VmRSS:").unwrap_or(0),
        meminfo_field(&text, "VmHWM:").unwrap_or(0),
    )
}

fn meminfo_field(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

fn stat_field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

fn read_u64(p: &Path) -> Option<u64> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

/// The worker's memory cgroup directory and whether it is cgroup v2.
fn cgroup_dir() -> Option<(PathBuf, bool)> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    // cgroup v1: "4:memory:/a/b" (the controller list may hold several).
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
        if ctrls.split(',').any(|c| c == "memory") {
            let base = Path::new("/sys/fs/cgroup/memory");
            if base.is_dir() {
                return Some((base.join(path.trim_start_matches('/')), false));
            }
        }
    }
    // cgroup v2: "0::/a/b".
    let path = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    let base = Path::new("/sys/fs/cgroup");
    base.join("cgroup.controllers")
        .exists()
        .then(|| (base.join(path.trim_start_matches('/')), true))
}

/// Room left under the tightest memory limit on the way to the root.
fn cgroup_available() -> Option<u64> {
    let (dir, v2) = cgroup_dir()?;
    let root = if v2 {
        Path::new("/sys/fs/cgroup")
    } else {
        Path::new("/sys/fs/cgroup/memory")
    };
    let mut best: Option<u64> = None;
    let mut cur = Some(dir.as_path());
    while let Some(d) = cur {
        if !d.starts_with(root) {
            break;
        }
        if let Some(room) = cgroup_room(d, v2) {
            best = Some(best.map_or(room, |b| b.min(room)));
        }
        if d == root {
            break;
        }
        cur = d.parent();
    }
    best
}

fn cgroup_room(d: &Path, v2: bool) -> Option<u64> {
    let (limit, usage, keys) = if v2 {
        let max = std::fs::read_to_string(d.join("memory.max")).ok()?;
        let limit = match max.trim() {
            "max" => return None,
            v => v.parse::<u64>().ok()?,
        };
        (
            limit,
            read_u64(&d.join("memory.current"))?,
            ["inactive_file", "file_dirty", "file_writeback"],
        )
    } else {
        (
            read_u64(&d.join("memory.limit_in_bytes"))?,
            read_u64(&d.join("memory.usage_in_bytes"))?,
            ["total_inactive_file", "total_dirty", "total_writeback"],
        )
    };
    if limit >= UNLIMITED {
        return None;
    }
    // Clean inactive page cache is reclaimed before anyone is killed: it is
    // room. Dirty pages and pages under writeback are not, until the disk
    // has taken them (a busy disk is exactly when that matters).
    let stat = std::fs::read_to_string(d.join("memory.stat")).unwrap_or_default();
    let field = |k: &str| stat_field(&stat, k).unwrap_or(0);
    let reclaimable = field(keys[0]).saturating_sub(field(keys[1]) + field(keys[2]));
    Some(limit.saturating_sub(usage.saturating_sub(reclaimable)))
}

fn psi_some_avg10() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/pressure/memory").ok()?;
    let line = text.lines().find(|l| l.starts_with("some "))?;
    line.split_whitespace()
        .find_map(|f| f.strip_prefix("avg10="))
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_meminfo_and_stat() {
        let mi = "MemTotal:       24000000 kB\nMemAvailable:   1000 kB\n";
        assert_eq!(meminfo_field(mi, "MemAvailable:"), Some(1000 * 1024));
        let st = "cache 5\ntotal_inactive_file 4096\ninactive_file 1\n";
        assert_eq!(stat_field(st, "total_inactive_file"), Some(4096));
        assert_eq!(stat_field(st, "inactive_file"), Some(1));
        assert_eq!(stat_field(st, "missing"), None);
    }

    #[test]
    fn reads_this_machine() {
        // Every Linux host has /proc/meminfo.
        let r = read();
        assert!(r.available.is_some_and(|a| a > 0), "{r:?}");
    }
}
