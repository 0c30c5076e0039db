//! `strata mount` / `strata umount`: the FUSE mount (`strata-fuse`), in the
//! foreground or as a daemon.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use strata_common::Config;
use strata_fuse::{FuseOptions, StrataFs};

#[derive(Args)]
pub struct MountArgs {
    /// Empty local directory to mount on.
    pub mountpoint: PathBuf,
    /// Namespace directory shown at the mount point.
    #[arg(long, default_value = "/")]
    pub path: String,
    /// Stay in the foreground (default: detach once mounted).
    #[arg(long, short)]
    pub foreground: bool,
    /// How files created through the mount are written.
    #[arg(long, value_enum, default_value = "cache-through")]
    pub write_type: MountWriteType,
    /// Seconds the kernel caches attributes and name lookups.
    #[arg(long, default_value_t = 1.0)]
    pub attr_timeout: f64,
    /// Threads reading FUSE requests.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// The kernel's read-ahead for the mount, e.g. 4MiB (the kernel's own
    /// default, 128KiB, keeps a sequential reader waiting on one request at
    /// a time). Setting it needs root; otherwise the kernel's default
    /// stays. 0 leaves the kernel's default.
    #[arg(long, default_value = "4MiB")]
    pub read_ahead: String,
    /// Let other users access the mount (needs user_allow_other in /etc/fuse.conf
    /// unless run as root).
    #[arg(long)]
    pub allow_other: bool,
    /// Log file of the daemon (default: /tmp/strata-mount-<pid>.log).
    #[arg(long)]
    pub log: Option<PathBuf>,
    /// Heavy-client mode: keep the pages this host reads in this local
    /// directory (an NVMe disk, say) and read them from it afterwards
    /// (`client.local_cache_dir`; a relative path is taken from the
    /// current directory).
    #[arg(long)]
    pub local_cache_dir: Option<PathBuf>,
    /// Most bytes the local cache directory holds, e.g. 500GiB
    /// (`client.local_cache_capacity`, default 10GiB).
    #[arg(long)]
    pub local_cache_capacity: Option<String>,
    /// Read files through the daemon even when the local cache directory
    /// holds a complete copy (by default such files are handed to the
    /// kernel with FUSE passthrough, Linux 6.9 or later, and read at
    /// local-disk speed).
    #[arg(long)]
    pub no_passthrough: bool,
    /// Mount read-only: every change fails with EROFS, and attributes stay
    /// cached across reads (fewer requests per file for read-mostly
    /// workloads such as training data).
    #[arg(long)]
    pub read_only: bool,
    /// With --read-only: the kernel opens files without asking the daemon
    /// (FUSE no_open), which saves a round trip at every open and close of
    /// a file (many small files); pages stay cached until a file's size or
    /// modification time changes; no passthrough.
    #[arg(long, requires = "read_only")]
    pub no_open: bool,
    /// Keep the mount alive across daemon crashes: a small supervisor
    /// process holds the kernel connection and starts a new daemon on it
    /// when one dies (in-flight reads are answered by the new daemon;
    /// needs Linux 6.9 or later; see docs/fuse-semantics.md).
    #[arg(long)]
    pub restartable: bool,
    /// (Internal) serve the kernel connection on this descriptor.
    #[arg(long, hide = true, requires = "state_dir")]
    pub serve_fd: Option<i32>,
    /// (Internal) state directory of a restartable mount.
    #[arg(long, hide = true)]
    pub state_dir: Option<PathBuf>,
    /// (Internal) how many daemons served this mount before this one.
    #[arg(long, hide = true, default_value_t = 0)]
    pub generation: u64,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum MountWriteType {
    MustCache,
    CacheThrough,
    Through,
    AsyncThrough,
}

/// True if `mountpoint` is a mount point right now.
pub fn is_mounted(mountpoint: &Path) -> bool {
    strata_fuse::mounted_at(mountpoint).is_some()
}

fn fuse_options(args: &MountArgs) -> FuseOptions {
    FuseOptions {
        root: args.path.clone(),
        attr_ttl: Duration::from_secs_f64(args.attr_timeout.max(0.0)),
        entry_ttl: Duration::from_secs_f64(args.attr_timeout.max(0.0)),
        threads: args.threads.max(1),
        write_type: match args.write_type {
            MountWriteType::MustCache => strata_client::WriteType::MustCache,
            MountWriteType::CacheThrough => strata_client::WriteType::CacheThrough,
            MountWriteType::Through => strata_client::WriteType::Through,
            MountWriteType::AsyncThrough => strata_client::WriteType::AsyncThrough,
        },
        allow_other: args.allow_other,
        // A restarted daemon cannot know the I/O mode of the handles its
        // predecessor opened, which passthrough needs (fuse-semantics.md).
        passthrough: !args.no_passthrough && !args.restartable && args.serve_fd.is_none(),
        read_only: args.read_only,
        no_open: args.no_open,
    }
}

/// The file system of a daemon: its client, checked against the namespace.
async fn file_system(cfg: &Config, args: &MountArgs) -> anyhow::Result<StrataFs> {
    let mut cfg = cfg.clone();
    if let Some(d) = &args.local_cache_dir {
        cfg.client.local_cache_dir =
            std::path::absolute(d).with_context(|| format!("--local-cache-dir {}", d.display()))?;
    }
    if let Some(c) = &args.local_cache_capacity {
        cfg.client.local_cache_capacity.0 = strata_common::size::parse_size(c)
            .with_context(|| format!("--local-cache-capacity {c}"))?;
    }
    // Not `crate::client`: a mount asked for its local cache directory
    // fails rather than run without it, after waiting a little for a
    // process that is letting it go (the daemon a restartable mount
    // replaces, a command finishing).
    let deadline = Instant::now() + Duration::from_secs(2);
    let client = loop {
        match strata_client::Client::new(&cfg.cluster.master, cfg.client.clone()) {
            Err(strata_client::ClientError::LocalCacheInUse { .. })
                if Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            other => break other?,
        }
    };
    Ok(StrataFs::new(
        client,
        tokio::runtime::Handle::current(),
        fuse_options(args),
    )
    .await?)
}

pub async fn run(cfg: &Config, args: MountArgs) -> anyhow::Result<()> {
    if let Some(fd) = args.serve_fd {
        return serve(cfg, &args, fd).await;
    }
    strata_fuse::check_mount_point(&args.mountpoint)?;
    let read_ahead = read_ahead_kib(&args)?;
    if !args.foreground {
        return daemonize(&args);
    }
    if args.restartable {
        return supervise(&args).await;
    }
    let fs = file_system(cfg, &args).await?;
    let session = fs.mount(&args.mountpoint)?;
    set_read_ahead(&args.mountpoint, read_ahead);
    println!(
        "mounted {} at {} (pid {}); unmount with `strata umount {}`",
        args.path,
        args.mountpoint.display(),
        std::process::id(),
        args.mountpoint.display()
    );
    // Until a signal, or until someone unmounts it from outside.
    let signal = crate::wait_for_signal();
    tokio::pin!(signal);
    loop {
        tokio::select! {
            _ = &mut signal => {
                // Unmounting goes by path: not if our connection is gone
                // already (unmounted from outside, and perhaps something
                // else mounted there since).
                if session.guard.is_finished() {
                    let _ = tokio::task::spawn_blocking(move || strata_fuse::join_unmounted(session)).await;
                    println!("{} was unmounted", args.mountpoint.display());
                    return Ok(());
                }
                tokio::task::spawn_blocking(move || session.umount_and_join())
                    .await
                    .context("unmounting")?
                    .context("unmounting")?;
                println!("unmounted {}", args.mountpoint.display());
                return Ok(());
            }
            _ = tokio::time::sleep(Duration::from_millis(300)) => {
                // The session ends when the kernel drops the connection
                // (after `fusermount3 -uz`, even if another file system is
                // mounted at the same path since).
                if session.guard.is_finished() || !is_mounted(&args.mountpoint) {
                    let _ = tokio::task::spawn_blocking(move || strata_fuse::join_unmounted(session)).await;
                    println!("{} was unmounted", args.mountpoint.display());
                    return Ok(());
                }
            }
        }
    }
}

/// `--read-ahead` in KiB.
fn read_ahead_kib(args: &MountArgs) -> anyhow::Result<u32> {
    let bytes = strata_common::size::parse_size(&args.read_ahead)
        .with_context(|| format!("--read-ahead {}", args.read_ahead))?;
    if bytes != 0 && !(4 << 10..=1 << 30).contains(&bytes) {
        bail!(
            "--read-ahead {}: from 4KiB to 1GiB, or 0 for the kernel's default",
            args.read_ahead
        );
    }
    Ok((bytes >> 10) as u32)
}

/// Applies `--read-ahead` in the background once the mount answers (its
/// first request waits for the master); a failure leaves the kernel's
/// default and is only logged.
fn set_read_ahead(mountpoint: &Path, kib: u32) {
    if kib == 0 {
        return;
    }
    let mp = mountpoint.to_path_buf();
    tokio::task::spawn_blocking(move || match strata_fuse::set_read_ahead(&mp, kib) {
        Ok(()) => tracing::debug!("kernel read-ahead {kib} KiB"),
        Err(e) => tracing::info!(
            "kept the kernel's read-ahead for {} (128 KiB): {e}",
            mp.display()
        ),
    });
}

/// A restartable mount's supervisor: mounts, keeps the kernel connection,
/// and runs daemons on it (`strata mount --serve-fd`) one after another
/// until the file system is unmounted or a signal arrives.
async fn supervise(args: &MountArgs) -> anyhow::Result<()> {
    use std::os::fd::{AsFd, AsRawFd};
    let dev = strata_fuse::restart::mount_fd(
        &args.mountpoint,
        &strata_fuse::restart::mount_options(&fuse_options(args)),
    )?;
    let state = std::env::temp_dir().join(format!("strata-mount-{}.state", std::process::id()));
    let result = async {
        let init = strata_fuse::restart::read_init(dev.as_fd()).context("reading FUSE INIT")?;
        std::fs::create_dir_all(&state).with_context(|| format!("creating {}", state.display()))?;
        std::fs::write(state.join("init"), &init)
            .with_context(|| format!("writing {}", state.display()))?;
        println!(
            "mounted {} at {} (restartable; supervisor pid {}); unmount with `strata umount {}`",
            args.path,
            args.mountpoint.display(),
            std::process::id(),
            args.mountpoint.display()
        );
        run_daemons(args, dev.as_raw_fd(), &state).await
    }
    .await;
    // Only a supervisor that gives up unmounts here (on success the mount
    // is gone already, and the path may hold a new mount by now).
    if result.is_err() && strata_fuse::restart::connected(dev.as_raw_fd()) {
        let _ = strata_fuse::restart::unmount(&args.mountpoint);
    }
    let _ = std::fs::remove_dir_all(&state);
    result
}

async fn run_daemons(args: &MountArgs, dev: i32, state: &Path) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt as _;
    let exe = std::env::current_exe().context("finding the strata binary")?;
    let argv: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--restartable")
        .collect();
    let signal = crate::wait_for_signal();
    tokio::pin!(signal);
    let mut quick_deaths = 0u32;
    for generation in 0u64.. {
        let started = Instant::now();
        let child = std::process::Command::new(&exe)
            .args(&argv)
            .args(["--serve-fd", &dev.to_string(), "--generation"])
            .arg(generation.to_string())
            .arg("--state-dir")
            .arg(state)
            // Its own process group: a Ctrl-C in the terminal stops the
            // supervisor, which unmounts; the daemon then ends by itself.
            .process_group(0)
            .spawn()
            .context("starting the mount daemon")?;
        let pid = child.id();
        println!("daemon {generation} started (pid {pid})");
        let mut child = child;
        let mut exited = tokio::task::spawn_blocking(move || child.wait());
        tokio::select! {
            _ = &mut signal => {
                strata_fuse::restart::unmount(&args.mountpoint)
                    .with_context(|| format!("unmounting {}", args.mountpoint.display()))?;
                if tokio::time::timeout(Duration::from_secs(10), &mut exited).await.is_err() {
                    // SAFETY: kill(2) of our own child, which has not been reaped.
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                    let _ = exited.await;
                }
                println!("unmounted {}", args.mountpoint.display());
                return Ok(());
            }
            status = &mut exited => {
                let status = status
                    .context("waiting for the mount daemon")?
                    .context("waiting for the mount daemon")?;
                // Our own connection, not the path: after `strata umount`
                // and a new mount at the same path, the path is mounted
                // again, but not by us.
                if !strata_fuse::restart::connected(dev) {
                    println!("{} was unmounted", args.mountpoint.display());
                    return Ok(());
                }
                eprintln!(
                    "mount daemon {generation} (pid {pid}) exited ({status}) while {} is \
                     mounted; starting a new one",
                    args.mountpoint.display()
                );
                // A daemon that dies right after it starts (a request that
                // crashes it is sent again to the next one) must not be
                // restarted for ever.
                quick_deaths = if started.elapsed() < Duration::from_secs(1) {
                    quick_deaths + 1
                } else {
                    0
                };
                if quick_deaths >= 5 {
                    bail!(
                        "the mount daemon died 5 times within 1 s of starting; unmounting {} \
                         (see the errors above)",
                        args.mountpoint.display()
                    );
                }
                // A daemon that keeps dying at start is given a moment more each time.
                tokio::time::sleep(Duration::from_millis(
                    200 * u64::from(quick_deaths.saturating_sub(1)),
                ))
                .await;
            }
        }
    }
    Ok(())
}

/// One daemon of a restartable mount, on the descriptor its supervisor
/// passed.
async fn serve(cfg: &Config, args: &MountArgs, fd: i32) -> anyhow::Result<()> {
    use std::os::fd::FromRawFd;
    let state = args
        .state_dir
        .clone()
        .context("--serve-fd needs --state-dir")?;
    let init = std::fs::read(state.join("init"))
        .with_context(|| format!("reading {}", state.join("init").display()))?;
    let ready = state.join("ready");
    let first = !ready.exists();
    let fs = file_system(cfg, args)
        .await?
        .restartable(&state, args.generation)?;
    // SAFETY: the supervisor passed this open descriptor for us to own.
    let dev = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let read_ahead = read_ahead_kib(args)?;
    let session = fs.serve(dev, &init, first)?;
    if first {
        std::fs::write(&ready, b"").with_context(|| format!("writing {}", ready.display()))?;
        set_read_ahead(&args.mountpoint, read_ahead);
    }
    println!(
        "daemon {} serving {} at {} (pid {})",
        args.generation,
        args.path,
        args.mountpoint.display(),
        std::process::id()
    );
    // Until the file system is unmounted (the kernel then ends the session).
    let _ = tokio::task::spawn_blocking(move || session.join()).await;
    Ok(())
}

/// Starts `strata mount --foreground` detached (own session, output to a log
/// file) and returns once the mount is up, or with the daemon's error.
fn daemonize(args: &MountArgs) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().context("finding the strata binary")?;
    let log = args.log.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("strata-mount-{}.log", std::process::id()))
    });
    let out = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let mut cmd = std::process::Command::new(exe);
    let mut argv: Vec<String> = std::env::args().skip(1).collect();
    argv.push("--foreground".into());
    cmd.args(&argv)
        .stdin(std::process::Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    // SAFETY: setsid is async-signal-safe; it detaches the daemon from the
    // caller's terminal and process group.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting the mount daemon")?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if is_mounted(&args.mountpoint) {
            println!(
                "mounted {} at {} (daemon pid {}, log {})",
                args.path,
                args.mountpoint.display(),
                child.id(),
                log.display()
            );
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            bail!("the mount daemon exited ({status}): {}", text.trim());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!(
                "{} was not mounted within 20 s; see {}",
                args.mountpoint.display(),
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `strata umount MOUNTPOINT`.
pub fn umount(mountpoint: &Path) -> anyhow::Result<()> {
    if !is_mounted(mountpoint) {
        bail!("{} is not mounted", mountpoint.display());
    }
    let try_cmd = |prog: &str, args: &[&std::ffi::OsStr]| {
        std::process::Command::new(prog)
            .args(args)
            .output()
            .map(|o| {
                (
                    o.status.success(),
                    String::from_utf8_lossy(&o.stderr).into_owned(),
                )
            })
    };
    let mp = mountpoint.as_os_str();
    let (ok, err) = match try_cmd("fusermount3", &["-u".as_ref(), mp]) {
        Ok((true, _)) => (true, String::new()),
        _ => try_cmd("umount", &[mp]).unwrap_or((false, "umount not found".into())),
    };
    if !ok {
        bail!(
            "cannot unmount {}: {} (files still open? close them, or use `umount -l`)",
            mountpoint.display(),
            err.trim()
        );
    }
    // The daemon notices and exits on its own.
    let deadline = Instant::now() + Duration::from_secs(5);
    while is_mounted(mountpoint) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("unmounted {}", mountpoint.display());
    Ok(())
}
