//! `strata job`: data-management jobs run by the master leader.

use std::time::Duration;

use anyhow::bail;
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use strata_client::{Client, JobInfo, JobSpec, JobState};
use strata_common::size::format_size;

#[derive(Subcommand)]
pub enum JobCmd {
    /// Cache every file below a path on its owner workers (preload).
    Load {
        path: String,
        /// Wait for the job, with a progress bar.
        #[arg(long)]
        wait: bool,
        /// After loading, compare each file's cached bytes with the UFS
        /// (its MD5 ETag, or the UFS bytes where there is none).
        #[arg(long)]
        verify: bool,
    },
    /// Drop the cached pages of every persisted, unpinned file below a path.
    Free {
        path: String,
        #[arg(long)]
        wait: bool,
    },
    /// Write files that exist only in the cache to the UFS of their mount.
    Persist {
        path: String,
        #[arg(long)]
        wait: bool,
    },
    /// Copy a file or directory to another path (through the cache).
    Cp {
        src: String,
        dst: String,
        #[arg(long)]
        wait: bool,
    },
    /// List jobs (unfinished ones and the last 1000 finished).
    Ls,
    /// Show a job; with --wait, follow it to the end.
    Status {
        id: u64,
        #[arg(long)]
        wait: bool,
    },
    /// Cancel a queued or running job.
    Cancel { id: u64 },
}

fn state(j: &JobInfo) -> JobState {
    JobState::try_from(j.state).unwrap_or(JobState::Unspecified)
}

fn state_name(j: &JobInfo) -> &'static str {
    match state(j) {
        JobState::JobQueued => "queued",
        JobState::JobRunning => "running",
        JobState::JobCompleted => "completed",
        JobState::JobFailed => "failed",
        JobState::JobCancelled => "cancelled",
        JobState::Unspecified => "unknown",
    }
}

fn finished(j: &JobInfo) -> bool {
    matches!(
        state(j),
        JobState::JobCompleted | JobState::JobFailed | JobState::JobCancelled
    )
}

fn target(j: &JobInfo) -> String {
    if j.dst.is_empty() {
        j.path.clone()
    } else {
        format!("{} -> {}", j.path, j.dst)
    }
}

fn print_job(j: &JobInfo) {
    println!("job:        {} ({} {})", j.id, j.kind, target(j));
    println!("state:      {}", state_name(j));
    println!(
        "files:      {}/{} done, {} failed",
        j.files_done, j.files_total, j.files_failed
    );
    println!(
        "bytes:      {} / {}",
        format_size(j.bytes_done),
        format_size(j.bytes_total)
    );
    if j.kind == "load" {
        println!(
            "pages:      {} fetched from the UFS, {} already cached",
            j.ufs_pages, j.cached_pages
        );
    }
    if j.verify {
        println!("verified:   {} files", j.verified);
    }
    let secs = j.run_ms as f64 / 1000.0;
    if secs > 0.0 {
        println!(
            "time:       {secs:.1}s ({}/s)",
            format_size((j.bytes_done as f64 / secs) as u64)
        );
    }
    if j.runs > 1 {
        println!("runs:       {} (resumed after a master change)", j.runs);
    }
    println!(
        "created:    {} UTC",
        crate::fs::format_time_ms(j.created_ms)
    );
    if !j.message.is_empty() {
        println!("message:    {}", j.message);
    }
}

/// Polls a job until it finishes, drawing files, bytes, rate and ETA on
/// standard error when it is a terminal. Fails if the job did not complete.
pub async fn wait(c: &Client, id: u64) -> anyhow::Result<JobInfo> {
    let pb = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
    pb.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let j = loop {
        match c.job(id).await {
            Ok(j) => {
                pb.set_length(j.bytes_total);
                pb.set_position(j.bytes_done);
                pb.set_message(format!(
                    "{} {}: {}/{} files",
                    j.kind, j.path, j.files_done, j.files_total
                ));
                if finished(&j) {
                    break j;
                }
            }
            // The client has ridden out a failover already
            // (client.failover_timeout_secs); an error here persists.
            Err(e) => {
                pb.finish_and_clear();
                return Err(anyhow::Error::from(e).context(format!(
                    "job {id} may still run; see `strata job status {id}`"
                )));
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    pb.finish_and_clear();
    match state(&j) {
        JobState::JobCompleted => Ok(j),
        _ => bail!(
            "job {} ({} {}) {}: {}",
            j.id,
            j.kind,
            target(&j),
            state_name(&j),
            j.message
        ),
    }
}

pub async fn submit(c: &Client, path: &str, spec: JobSpec, wait_for: bool) -> anyhow::Result<()> {
    let j = c.submit_job(path, spec).await?;
    if !wait_for {
        println!(
            "job {} queued ({} {}); follow it with `strata job status {} --wait`",
            j.id,
            j.kind,
            target(&j),
            j.id
        );
        return Ok(());
    }
    let j = wait(c, j.id).await?;
    print_job(&j);
    Ok(())
}

pub async fn run(c: &Client, cmd: JobCmd) -> anyhow::Result<()> {
    match cmd {
        JobCmd::Load { path, wait, verify } => {
            submit(c, &path, JobSpec::Load { verify }, wait).await
        }
        JobCmd::Free { path, wait } => submit(c, &path, JobSpec::Free, wait).await,
        JobCmd::Persist { path, wait } => submit(c, &path, JobSpec::Persist, wait).await,
        JobCmd::Cp { src, dst, wait } => submit(c, &src, JobSpec::Copy { dst }, wait).await,
        JobCmd::Ls => {
            let jobs = c.jobs().await?;
            if jobs.is_empty() {
                println!("no jobs");
            }
            for j in jobs {
                let pct = if j.bytes_total > 0 {
                    j.bytes_done as f64 * 100.0 / j.bytes_total as f64
                } else if finished(&j) {
                    100.0
                } else {
                    0.0
                };
                println!(
                    "{:>5}  {:<7} {:<9} {:>5.1}%  {:>6}/{:<6} files  {}",
                    j.id,
                    j.kind,
                    state_name(&j),
                    pct,
                    j.files_done,
                    j.files_total,
                    target(&j)
                );
            }
            Ok(())
        }
        JobCmd::Status { id, wait: w } => {
            let j = if w {
                match wait(c, id).await {
                    Ok(j) => j,
                    Err(e) => {
                        if let Ok(j) = c.job(id).await {
                            print_job(&j);
                        }
                        return Err(e);
                    }
                }
            } else {
                c.job(id).await?
            };
            print_job(&j);
            Ok(())
        }
        JobCmd::Cancel { id } => {
            let j = c.cancel_job(id).await?;
            println!(
                "job {} ({} {}) {}",
                j.id,
                j.kind,
                target(&j),
                state_name(&j)
            );
            Ok(())
        }
    }
}
