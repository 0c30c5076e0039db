//! The `strata` binary: argument parsing and wiring only. Servers live in
//! `strata-master` / `strata-worker`, client logic in `strata-client`.

mod admin;
mod bench;
mod bench_cache;
mod bench_fanout;
mod bench_local;
mod bench_meta;
mod bench_streams;
mod fs;
mod job;
mod local;
mod mount;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use strata_common::Config;

/// mimalloc instead of glibc malloc: the masters' create and stat paths
/// spent ~17 % of their CPU in glibc's malloc/free (many small, short-lived
/// allocations per RPC); with mimalloc a 3-master cluster takes ~30 % more
/// creates per second (docs/benchmarks.md). Large read buffers (the FUSE
/// daemon's 8 MiB windows) are kept for reuse as well, which glibc needed
/// `mallopt` for.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "strata",
    version,
    about = "Strata: a distributed cache over object stores and file systems"
)]
struct Cli {
    /// Configuration file (default: $STRATA_CONFIG, else ./strata.toml if present).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Master address HOST:PORT (overrides cluster.master; env STRATA_MASTER).
    #[arg(long, global = true, value_name = "HOST:PORT")]
    master: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a master (namespace, mount table, worker membership).
    Master(MasterArgs),
    /// Run a worker (page cache, data server).
    Worker,
    /// Run a master and a worker in one process, for a first run and tests.
    Local(local::LocalArgs),
    /// File-system commands.
    #[command(subcommand)]
    Fs(fs::FsCmd),
    /// Data-management jobs: load, free, persist, cp; ls, status, cancel.
    #[command(subcommand)]
    Job(job::JobCmd),
    /// Cluster administration.
    #[command(subcommand)]
    Admin(admin::AdminCmd),
    /// Benchmarks with same-run baselines.
    #[command(subcommand)]
    Bench(bench::BenchCmd),
    /// Mount the namespace with FUSE (see docs/fuse-semantics.md).
    Mount(mount::MountArgs),
    /// Serve the namespace over S3 (see docs/s3-compatibility.md).
    Gateway {
        /// Address to listen on (default: gateway.listen).
        #[arg(long, value_name = "HOST:PORT")]
        listen: Option<String>,
    },
    /// Unmount a `strata mount`.
    Umount { mountpoint: PathBuf },
    /// Print the effective configuration (file + environment) as TOML.
    Config,
}

#[derive(clap::Args)]
struct MasterArgs {
    /// Raft member id (master.node_id).
    #[arg(long)]
    node_id: Option<u64>,
    /// First members of a new cluster, ID=HOST:PORT,... (master.initial_members).
    #[arg(long, value_name = "ID=HOST:PORT,...")]
    initial_members: Option<String>,
    /// Wait to be added with `strata admin masters add` (master.join).
    #[arg(long)]
    join: bool,
    /// Listen address (master.rpc_addr).
    #[arg(long, value_name = "HOST:PORT")]
    listen: Option<String>,
    /// Metadata directory (master.data_dir).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

fn init_logs(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("STRATA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// The configuration file given on the command line (re-read on SIGHUP).
static CONFIG_PATH: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();

/// Waits for SIGINT or SIGTERM. With a gateway, SIGHUP meanwhile re-reads
/// the configuration and applies its bandwidth and request-rate limits
/// (environment overrides still win, as at start).
async fn wait_for_signal_reloading(gateway: Option<&strata_gateway::GatewayHandle>) {
    #[cfg(unix)]
    if let Some(g) = gateway
        && let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
    {
        let stop = wait_for_signal();
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = hup.recv() => {
                    let path = CONFIG_PATH.get().cloned().flatten();
                    match Config::load(path.as_deref()) {
                        Ok(c) => {
                            // Not println!: stdout may be closed by now.
                            let msg = g.reload_limits(&c.gateway);
                            tracing::warn!("SIGHUP: reloaded {msg}");
                        }
                        Err(e) => tracing::error!(
                            "SIGHUP: the configuration could not be read again, limits unchanged: {e}"
                        ),
                    }
                }
            }
        }
    }
    #[cfg(not(unix))]
    let _ = gateway;
    wait_for_signal().await
}

fn load_config(cli: &Cli) -> anyhow::Result<Config> {
    let _ = CONFIG_PATH.set(cli.config.clone());
    let mut cfg = Config::load(cli.config.as_deref())?;
    if let Some(m) = &cli.master {
        cfg.cluster.master = m.clone();
    }
    Ok(cfg)
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// Servers and benchmarks hold a socket per client stream and a file per
/// open page: lift the soft descriptor limit to the hard one.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    raise_fd_limit();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("strata: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("strata: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let server = matches!(
        cli.cmd,
        Cmd::Master(_) | Cmd::Worker | Cmd::Local(_) | Cmd::Mount(_) | Cmd::Gateway { .. }
    );
    if !server {
        // `strata fs ls | head` should end quietly, as other tools do, not
        // panic on a closed pipe (Rust ignores SIGPIPE by default).
        // SAFETY: restoring the default disposition of one signal.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    // s3s logs every refused S3 request (a client's error) at ERROR level;
    // STRATA_LOG=s3s=debug brings those back.
    init_logs(if server {
        "info,s3s=off,openraft=off"
    } else {
        "warn,s3s=off,openraft=off"
    });
    let cfg = load_config(&cli)?;
    match cli.cmd {
        Cmd::Master(a) => {
            let mut cfg = cfg;
            if let Some(id) = a.node_id {
                cfg.master.node_id = id;
            }
            if let Some(m) = a.initial_members {
                cfg.master.initial_members = m;
            }
            if a.join {
                cfg.master.join = true;
            }
            if let Some(l) = a.listen {
                cfg.master.rpc_addr = l;
            }
            if let Some(d) = a.data_dir {
                cfg.master.data_dir = d;
            }
            let m = strata_master::start(&cfg).await?;
            println!(
                "strata master {} listening on {}",
                cfg.master.node_id, m.addr
            );
            wait_for_signal().await;
            m.stop().await;
            Ok(())
        }
        Cmd::Worker => {
            let w = strata_worker::start(&cfg)
                .await
                .context("starting the worker")?;
            println!(
                "strata worker {} serving data on {} (master {})",
                w.id, w.data_addr, cfg.cluster.master
            );
            wait_for_signal().await;
            w.stop().await;
            Ok(())
        }
        Cmd::Local(args) => local::run(cfg, args).await,
        Cmd::Fs(c) => fs::run(&cfg, c).await,
        Cmd::Admin(c) => admin::run(&cfg, c).await,
        Cmd::Job(c) => job::run(&client(&cfg)?, c).await,
        Cmd::Bench(c) => bench::run(&cfg, c).await,
        Cmd::Mount(a) => mount::run(&cfg, a).await,
        Cmd::Gateway { listen } => {
            let g = strata_gateway::serve(client(&cfg)?, &cfg.gateway, listen.as_deref()).await?;
            println!(
                "strata gateway serving S3 on http://{} (master {})",
                g.addr, cfg.cluster.master
            );
            wait_for_signal_reloading(Some(&g)).await;
            g.stop();
            Ok(())
        }
        Cmd::Umount { mountpoint } => mount::umount(&mountpoint),
        Cmd::Config => {
            print!("{}", cfg.to_toml());
            Ok(())
        }
    }
}

/// A client for a command; if another process (a mount) uses the
/// configured `client.local_cache_dir`, the command runs without it.
pub(crate) fn client(cfg: &Config) -> anyhow::Result<strata_client::Client> {
    match strata_client::Client::new(&cfg.cluster.master, cfg.client.clone()) {
        Err(strata_client::ClientError::LocalCacheInUse { dir, holder }) => {
            eprintln!(
                "warning: client.local_cache_dir {dir} is in use by {holder}; \
                 running without it"
            );
            let mut client = cfg.client.clone();
            client.local_cache_dir = Default::default();
            Ok(strata_client::Client::new(&cfg.cluster.master, client)?)
        }
        other => Ok(other?),
    }
}
