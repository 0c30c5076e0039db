//! A highly available cluster of real processes on 127.0.0.1: N masters
//! (each `strata master` with its own data directory) and M workers. Masters
//! can be killed with SIGKILL, stopped with SIGSTOP, wiped, restarted, added
//! and removed; everything is killed and removed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::cluster::{field, strata_command, wait_line};

pub struct MasterProc {
    pub id: u64,
    pub addr: String,
    pub data_dir: PathBuf,
    child: Option<Child>,
    stopped: bool,
}

impl MasterProc {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }
}

pub struct HaCluster {
    bin: PathBuf,
    pub dir: tempfile::TempDir,
    pub masters: Vec<MasterProc>,
    pub worker_addrs: Vec<String>,
    workers: Vec<Child>,
    env: Vec<(String, String)>,
    next_id: u64,
}

/// Passes a child's stderr through to this process's and keeps its last
/// lines, returned when the child's stderr closes.
fn tee_stderr(child: &mut Child) -> std::thread::JoinHandle<Vec<String>> {
    let err = child.stderr.take();
    std::thread::spawn(move || {
        let mut last = std::collections::VecDeque::new();
        let Some(err) = err else {
            return Vec::new();
        };
        for line in std::io::BufRead::lines(std::io::BufReader::new(err)) {
            let Ok(l) = line else { break };
            eprintln!("{l}");
            if last.len() == 20 {
                last.pop_front();
            }
            last.push_back(l);
        }
        last.into()
    })
}

/// Sends SIGSTOP (true) or SIGCONT (false) to process `pid`.
fn pause_pid(pid: u32, pause: bool) -> anyhow::Result<()> {
    signal_pid(pid, if pause { "-STOP" } else { "-CONT" })
}

/// Sends `sig` (as `kill` spells it: `-STOP`, `-TERM`, ...) to `pid`.
fn signal_pid(pid: u32, sig: &str) -> anyhow::Result<()> {
    let st = Command::new("kill")
        .arg(sig)
        .arg(pid.to_string())
        .status()?;
    if !st.success() {
        bail!("kill {sig} {pid} failed");
    }
    Ok(())
}

/// A free port on 127.0.0.1 (bound and released; loopback only) for a
/// process started later. Taken below the kernel's ephemeral range
/// (`net.ipv4.ip_local_port_range`), so that no port the kernel hands to
/// another process meanwhile (a `:0` bind of a parallel test, an outgoing
/// connection) can be this one, as a `:0` reservation could be.
pub fn free_addr() -> anyhow::Result<String> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(32768);
    let (lo, hi) = (
        ephemeral_start.saturating_sub(12_000).max(1024),
        ephemeral_start,
    );
    if hi > lo + 1000 {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            ^ (u64::from(std::process::id()) << 20);
        for _ in 0..200 {
            let n = seed.wrapping_add(SEQ.fetch_add(1, Ordering::Relaxed).wrapping_mul(7919));
            let port = lo + n.wrapping_mul(0x9E37_79B9_7F4A_7C15) % (hi - lo);
            if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port as u16)) {
                return Ok(l.local_addr()?.to_string());
            }
        }
    }
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.to_string())
}

impl HaCluster {
    /// Starts `masters` masters forming one cluster and `workers` workers.
    pub fn start(
        bin: &Path,
        masters: usize,
        workers: usize,
        env: Vec<(String, String)>,
    ) -> anyhow::Result<HaCluster> {
        let dir = tempfile::tempdir()?;
        let mut c = HaCluster {
            bin: bin.to_path_buf(),
            dir,
            masters: Vec::new(),
            worker_addrs: Vec::new(),
            workers: Vec::new(),
            env,
            next_id: 1,
        };
        let mut members = Vec::new();
        for _ in 0..masters {
            let id = c.next_id;
            c.next_id += 1;
            let addr = free_addr()?;
            members.push(format!("{id}={addr}"));
            c.masters.push(MasterProc {
                id,
                addr,
                data_dir: c.dir.path().join(format!("master-{id}")),
                child: None,
                stopped: false,
            });
        }
        let initial = members.join(",");
        for i in 0..c.masters.len() {
            c.spawn_master(i, Some(&initial))?;
        }
        c.wait_leader(Duration::from_secs(30))?;
        for _ in 0..workers {
            c.spawn_worker()?;
        }
        c.wait_workers_live(workers, Duration::from_secs(30))?;
        Ok(c)
    }

    fn base_cmd(&self) -> Command {
        strata_command(&self.bin, self.dir.path(), &self.env)
    }

    fn spawn_master(&mut self, i: usize, initial: Option<&str>) -> anyhow::Result<()> {
        let m = &self.masters[i];
        let mut cmd = self.base_cmd();
        cmd.arg("master")
            .arg("--node-id")
            .arg(m.id.to_string())
            .arg("--listen")
            .arg(&m.addr)
            .arg("--data-dir")
            .arg(&m.data_dir);
        match initial {
            Some(members) => {
                cmd.arg("--initial-members").arg(members);
            }
            None => {
                cmd.arg("--join");
            }
        }
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().context("spawning strata master")?;
        let stderr = tee_stderr(&mut child);
        if let Err(e) = wait_line(&mut child, &["listening on"], Duration::from_secs(30)) {
            // A master that refuses to start says why on stderr: the error
            // carries it (after the process has exited and it was read).
            let _ = child.kill();
            let _ = child.wait();
            let said = stderr.join().unwrap_or_default();
            return Err(e.context(format!(
                "master {} said: {}",
                self.masters[i].id,
                said.join("\n")
            )));
        }
        self.masters[i].child = Some(child);
        self.masters[i].stopped = false;
        Ok(())
    }

    /// Starts a new worker, or (with `again`) worker `i` again on its
    /// address and cache directory.
    fn spawn_worker_at(&mut self, again: Option<usize>) -> anyhow::Result<()> {
        let n = again.unwrap_or(self.workers.len());
        let addr = match again {
            Some(i) => self.worker_addrs[i].clone(),
            None => "127.0.0.1:0".to_string(),
        };
        let mut cmd = self.base_cmd();
        cmd.arg("worker")
            .env("STRATA_MASTER", self.master_list())
            .env("STRATA_WORKER_DATA_ADDR", addr)
            .env(
                "STRATA_WORKER_CACHE_DIR",
                self.dir.path().join(format!("worker-{n}")),
            )
            .env("STRATA_WORKER_CACHE_CAPACITY", "1GiB")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().context("spawning strata worker")?;
        let lines = wait_line(&mut child, &["serving data on"], Duration::from_secs(30))?;
        let addr = field(&lines, "serving data on")?;
        match again {
            Some(i) => {
                self.worker_addrs[i] = addr;
                self.workers[i] = child;
            }
            None => {
                self.worker_addrs.push(addr);
                self.workers.push(child);
            }
        }
        Ok(())
    }

    fn spawn_worker(&mut self) -> anyhow::Result<()> {
        self.spawn_worker_at(None)
    }

    /// Starts killed worker `i` again (same address, same cache directory).
    pub fn restart_worker(&mut self, i: usize) -> anyhow::Result<()> {
        self.spawn_worker_at(Some(i))
    }

    /// Comma-separated addresses of every master ever started here that is
    /// still a member (what a client is configured with).
    pub fn master_list(&self) -> String {
        self.masters
            .iter()
            .map(|m| m.addr.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Runs `strata --master LIST ARGS...`.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<Output> {
        let mut cmd = self.base_cmd();
        cmd.arg("--master").arg(self.master_list()).args(args);
        Ok(cmd.stdin(Stdio::null()).output()?)
    }

    /// Like [`HaCluster::cli`] but asking one master only.
    pub fn cli_at(&self, addr: &str, args: &[&str]) -> anyhow::Result<Output> {
        let mut cmd = self.base_cmd();
        cmd.arg("--master").arg(addr).args(args);
        Ok(cmd.stdin(Stdio::null()).output()?)
    }

    /// The leader's id as a running master sees it (0: none).
    pub fn leader_seen_by(&self, addr: &str) -> Option<u64> {
        let out = self.cli_at(addr, &["admin", "masters", "list"]).ok()?;
        let s = String::from_utf8_lossy(&out.stdout);
        let rest = s.strip_prefix("leader: ")?;
        rest.split_whitespace().next()?.parse().ok()
    }

    /// Waits until a leader is elected and known to a running master.
    pub fn wait_leader(&self, timeout: Duration) -> anyhow::Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            for m in self.masters.iter().filter(|m| m.running() && !m.stopped) {
                if let Some(l) = self.leader_seen_by(&m.addr)
                    && l != 0
                    && self
                        .masters
                        .iter()
                        .any(|x| x.id == l && x.running() && !x.stopped)
                {
                    return Ok(l);
                }
            }
            if Instant::now() > deadline {
                bail!("no leader elected within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn wait_workers_live(&self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.cli(&["admin", "report"])?;
            if String::from_utf8_lossy(&out.stdout).contains(&format!("{n} live")) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "workers never became live: {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn index(&self, id: u64) -> anyhow::Result<usize> {
        self.masters
            .iter()
            .position(|m| m.id == id)
            .with_context(|| format!("no master {id}"))
    }

    /// SIGKILLs a master (as a crash would).
    pub fn kill_master(&mut self, id: u64) -> anyhow::Result<()> {
        let i = self.index(id)?;
        if let Some(mut c) = self.masters[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        Ok(())
    }

    /// Asks a master to stop (SIGTERM, as an orchestrator does) and waits up
    /// to `limit` for it to exit; returns how long it took. A master still
    /// running after `limit` is killed and the hang reported.
    pub fn terminate_master(&mut self, id: u64, limit: Duration) -> anyhow::Result<Duration> {
        let i = self.index(id)?;
        let Some(mut c) = self.masters[i].child.take() else {
            bail!("master {id} is not running");
        };
        let t = Instant::now();
        signal_pid(c.id(), "-TERM")?;
        while t.elapsed() < limit {
            if c.try_wait()?.is_some() {
                return Ok(t.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
        bail!("master {id} did not exit within {limit:?} of SIGTERM");
    }

    /// Starts one more worker and waits until the masters see it live.
    pub fn add_worker(&mut self) -> anyhow::Result<()> {
        self.spawn_worker()?;
        self.wait_workers_live(self.workers.len(), Duration::from_secs(30))
    }

    /// Kills worker `i` (SIGKILL) and reaps it.
    pub fn kill_worker(&mut self, i: usize) -> anyhow::Result<()> {
        let w = self.workers.get_mut(i).context("no such worker")?;
        w.kill()?;
        let _ = w.wait();
        Ok(())
    }

    /// Sends SIGSTOP (true) or SIGCONT (false) to worker `i`.
    pub fn pause_worker(&mut self, i: usize, pause: bool) -> anyhow::Result<()> {
        let pid = self.workers.get(i).context("no such worker")?.id();
        pause_pid(pid, pause)
    }

    /// Starts a killed master again on its address and data directory.
    pub fn restart_master(&mut self, id: u64) -> anyhow::Result<()> {
        let i = self.index(id)?;
        let initial: Vec<String> = self
            .masters
            .iter()
            .map(|m| format!("{}={}", m.id, m.addr))
            .collect();
        self.spawn_master(i, Some(&initial.join(",")))
    }

    /// Sends SIGSTOP (true) or SIGCONT (false) to a master.
    pub fn pause_master(&mut self, id: u64, pause: bool) -> anyhow::Result<()> {
        let i = self.index(id)?;
        let pid = self.masters[i].pid().context("master not running")?;
        pause_pid(pid, pause)?;
        self.masters[i].stopped = pause;
        Ok(())
    }

    /// Starts a new master with `--join` and adds it with
    /// `strata admin masters add`; returns its id.
    pub fn add_master(&mut self) -> anyhow::Result<u64> {
        let id = self.next_id;
        self.next_id += 1;
        let addr = free_addr()?;
        self.masters.push(MasterProc {
            id,
            addr: addr.clone(),
            data_dir: self.dir.path().join(format!("master-{id}")),
            child: None,
            stopped: false,
        });
        let i = self.masters.len() - 1;
        self.spawn_master(i, None)?;
        let out = self.cli(&["admin", "masters", "add", &id.to_string(), &addr])?;
        if !out.status.success() {
            bail!(
                "adding master {id} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(id)
    }

    /// Removes a master from the cluster and stops its process.
    pub fn remove_master(&mut self, id: u64) -> anyhow::Result<()> {
        let out = self.cli(&["admin", "masters", "remove", &id.to_string()])?;
        if !out.status.success() {
            bail!(
                "removing master {id} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        self.kill_master(id)?;
        let i = self.index(id)?;
        self.masters.remove(i);
        Ok(())
    }
}

impl Drop for HaCluster {
    fn drop(&mut self) {
        for m in &mut self.masters {
            if let Some(mut c) = m.child.take() {
                if m.stopped {
                    let _ = Command::new("kill")
                        .arg("-CONT")
                        .arg(c.id().to_string())
                        .status();
                }
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        for mut w in self.workers.drain(..) {
            let _ = w.kill();
            let _ = w.wait();
        }
    }
}
