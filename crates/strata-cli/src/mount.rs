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
    let Ok(abs) = std::fs::canonicalize(mountpoint) else {
        return false;
    };
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = abs.to_string_lossy();
    text.lines().any(|l| {
        l.split(' ')
            .nth(4)
            .is_some_and(|mp| mp.replace("\\040", " ") == want)
    })
}

pub async fn run(cfg: &Config, args: MountArgs) -> anyhow::Result<()> {
    strata_fuse::check_mount_point(&args.mountpoint)?;
    if !args.foreground {
        return daemonize(&args);
    }
    keep_read_buffers();
    let mut cfg = cfg.clone();
    if let Some(d) = &args.local_cache_dir {
        cfg.client.local_cache_dir =
            std::path::absolute(d).with_context(|| format!("--local-cache-dir {}", d.display()))?;
    }
    if let Some(c) = &args.local_cache_capacity {
        cfg.client.local_cache_capacity.0 = strata_common::size::parse_size(c)
            .with_context(|| format!("--local-cache-capacity {c}"))?;
    }
    let client = crate::client(&cfg)?;
    let opts = FuseOptions {
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
    };
    let fs = StrataFs::new(client, tokio::runtime::Handle::current(), opts).await?;
    let session = fs.mount(&args.mountpoint)?;
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
                tokio::task::spawn_blocking(move || session.umount_and_join())
                    .await
                    .context("unmounting")?
                    .context("unmounting")?;
                println!("unmounted {}", args.mountpoint.display());
                return Ok(());
            }
            _ = tokio::time::sleep(Duration::from_millis(300)) => {
                if !is_mounted(&args.mountpoint) {
                    let _ = tokio::task::spawn_blocking(move || session.join()).await;
                    println!("{} was unmounted", args.mountpoint.display());
                    return Ok(());
                }
            }
        }
    }
}

/// Every FUSE read-ahead window is a fresh buffer of up to 8 MiB. glibc
/// serves those from `mmap` or trims them back to the kernel once freed,
/// so each window was faulted in and zeroed again (a quarter of the
/// daemon's time in a profile); keeping freed memory for reuse avoids that.
fn keep_read_buffers() {
    // SAFETY: mallopt only adjusts allocator parameters; called before the
    // daemon starts its threads.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 20);
    }
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
