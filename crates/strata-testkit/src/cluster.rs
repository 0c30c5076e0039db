//! Runs real `strata` processes on 127.0.0.1 with ephemeral ports and a temp
//! directory; kills them and removes the directory on drop.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// `/NS_PATH=UFS_URI` mounts made at start.
    pub mounts: Vec<String>,
    pub cache_capacity: String,
    /// Run master and worker as two processes instead of `strata local`.
    pub separate_processes: bool,
    /// Extra environment for the server processes.
    pub env: Vec<(String, String)>,
    /// A memory cgroup directory the server processes are moved into right
    /// after they start (memory-pressure tests).
    pub cgroup: Option<PathBuf>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            mounts: Vec::new(),
            cache_capacity: "1GiB".into(),
            separate_processes: false,
            env: Vec::new(),
            cgroup: None,
        }
    }
}

pub struct Cluster {
    bin: PathBuf,
    pub dir: tempfile::TempDir,
    pub master_addr: String,
    pub worker_addr: String,
    procs: Vec<Child>,
    opts: ClusterOptions,
}

/// Reads a child's stdout on a thread; waits for a line with `marker`.
pub(crate) fn wait_line(
    child: &mut Child,
    markers: &[&str],
    timeout: Duration,
) -> anyhow::Result<Vec<String>> {
    let out = child.stdout.take().context("child has no stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(l) = line else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + timeout;
    let mut lines = Vec::new();
    let mut found = 0;
    while found < markers.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => {
                if markers.iter().any(|m| l.contains(m)) {
                    found += 1;
                }
                lines.push(l);
            }
            Err(_) => {
                let status = child.try_wait().ok().flatten();
                bail!(
                    "process did not print {markers:?} within {timeout:?} (exit: {status:?}); output so far: {lines:?}"
                );
            }
        }
    }
    // Keep draining so the child never blocks on a full pipe.
    std::thread::spawn(move || while rx.recv().is_ok() {});
    Ok(lines)
}

/// A `strata` command for a test cluster: no config or master from the
/// caller's environment, quiet logs, fast heartbeats, run in `dir`.
pub(crate) fn strata_command(bin: &Path, dir: &Path, env: &[(String, String)]) -> Command {
    let mut cmd = Command::new(bin);
    cmd.env_remove("STRATA_CONFIG")
        .env_remove("STRATA_MASTER")
        .env("STRATA_LOG", "warn,openraft=off,s3s=off")
        // Fresh usage figures at the master within a tenth of a second.
        .env("STRATA_WORKER_HEARTBEAT_INTERVAL_MS", "100")
        .current_dir(dir);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

pub(crate) fn field(lines: &[String], key: &str) -> anyhow::Result<String> {
    lines
        .iter()
        .find_map(|l| {
            l.split_once(key)
                .map(|(_, v)| v.split_whitespace().next().unwrap_or("").to_string())
        })
        .with_context(|| format!("no {key:?} in {lines:?}"))
}

impl Cluster {
    /// Starts a cluster from the `strata` binary at `bin`.
    pub fn start(bin: &Path, opts: ClusterOptions) -> anyhow::Result<Cluster> {
        let dir = tempfile::tempdir()?;
        let mut c = Cluster {
            bin: bin.to_path_buf(),
            dir,
            master_addr: String::new(),
            worker_addr: String::new(),
            procs: Vec::new(),
            opts,
        };
        c.boot()?;
        Ok(c)
    }

    fn base_cmd(&self) -> Command {
        strata_command(&self.bin, self.dir.path(), &self.opts.env)
    }

    fn boot(&mut self) -> anyhow::Result<()> {
        let data = self.dir.path().join("data");
        if self.opts.separate_processes {
            let mut m = self.base_cmd();
            m.arg("master")
                .env("STRATA_MASTER_RPC_ADDR", self.master_addr_or_any())
                .env("STRATA_MASTER_DATA_DIR", data.join("master"))
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit());
            let mut mp = m.spawn().context("spawning strata master")?;
            let lines = wait_line(&mut mp, &["listening on"], Duration::from_secs(20))?;
            self.procs.push(mp);
            self.master_addr = field(&lines, "listening on")?;
            let mut w = self.base_cmd();
            w.arg("worker")
                .env("STRATA_MASTER", &self.master_addr)
                .env("STRATA_WORKER_DATA_ADDR", self.worker_addr_or_any())
                .env("STRATA_WORKER_CACHE_DIR", data.join("worker"))
                .env("STRATA_WORKER_CACHE_CAPACITY", &self.opts.cache_capacity)
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit());
            let mut wp = w.spawn().context("spawning strata worker")?;
            self.enter_cgroup(&wp)?;
            let lines = wait_line(&mut wp, &["serving data on"], Duration::from_secs(20))?;
            self.procs.push(wp);
            self.worker_addr = field(&lines, "serving data on")?;
            self.wait_worker_live()?;
            for m in self.opts.mounts.clone() {
                let (p, u) = m.split_once('=').context("mount is /PATH=URI")?;
                let out = self.cli(&["fs", "mount", p, u])?;
                if !out.status.success() {
                    bail!("mount failed: {}", String::from_utf8_lossy(&out.stderr));
                }
            }
        } else {
            let mut cmd = self.base_cmd();
            cmd.arg("local")
                .arg("--data-dir")
                .arg(&data)
                .arg("--master-addr")
                .arg(self.master_addr_or_any())
                .arg("--worker-addr")
                .arg(self.worker_addr_or_any())
                .arg("--cache-capacity")
                .arg(&self.opts.cache_capacity);
            for m in &self.opts.mounts {
                cmd.arg("--mount").arg(m);
            }
            cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
            let mut p = cmd.spawn().context("spawning strata local")?;
            self.enter_cgroup(&p)?;
            let lines = wait_line(&mut p, &["Try:"], Duration::from_secs(30))?;
            self.procs.push(p);
            self.master_addr = field(&lines, "master (gRPC):")?;
            self.worker_addr = field(&lines, "worker (data):")?;
        }
        Ok(())
    }

    fn enter_cgroup(&self, child: &Child) -> anyhow::Result<()> {
        if let Some(cg) = &self.opts.cgroup {
            std::fs::write(cg.join("cgroup.procs"), child.id().to_string())
                .with_context(|| format!("moving pid {} into {}", child.id(), cg.display()))?;
        }
        Ok(())
    }

    /// Process ids of the server processes.
    pub fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(|p| p.id()).collect()
    }

    /// True while every server process is running (none was killed, by us
    /// or by the kernel's OOM killer).
    pub fn alive(&mut self) -> bool {
        !self.procs.is_empty()
            && self
                .procs
                .iter_mut()
                .all(|p| matches!(p.try_wait(), Ok(None)))
    }

    // After a restart the same ports are reused, so clients keep working.
    fn master_addr_or_any(&self) -> String {
        if self.master_addr.is_empty() {
            "127.0.0.1:0".into()
        } else {
            self.master_addr.clone()
        }
    }

    fn worker_addr_or_any(&self) -> String {
        if self.worker_addr.is_empty() {
            "127.0.0.1:0".into()
        } else {
            self.worker_addr.clone()
        }
    }

    fn wait_worker_live(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = self.cli(&["admin", "report"])?;
            if String::from_utf8_lossy(&out.stdout).contains("1 live") {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "worker never became live: {}",
                    String::from_utf8_lossy(&out.stdout)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `strata --master ADDR ARGS...` and returns its output.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<Output> {
        let mut cmd = self.base_cmd();
        cmd.arg("--master").arg(&self.master_addr).args(args);
        Ok(cmd.stdin(Stdio::null()).output()?)
    }

    /// Like [`Cluster::cli`] with stdin from `input`.
    pub fn cli_with_stdin(&self, args: &[&str], input: &[u8]) -> anyhow::Result<Output> {
        use std::io::Write;
        let mut cmd = self.base_cmd();
        cmd.arg("--master").arg(&self.master_addr).args(args);
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        child.stdin.take().context("stdin")?.write_all(input)?;
        Ok(child.wait_with_output()?)
    }

    /// Kills every process with SIGKILL (as a crash would).
    pub fn kill(&mut self) {
        for mut p in self.procs.drain(..) {
            let _ = p.kill();
            let _ = p.wait();
        }
    }

    /// Kills and starts the processes again on the same ports and data.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.boot()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.kill();
    }
}
