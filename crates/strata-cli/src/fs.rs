//! `strata fs ...`: file-system commands over the SDK.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::{Subcommand, ValueEnum};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use strata_client::{Client, FileInfo, JobSpec, MountOptions, WriteOptions, WriteType};
use strata_common::Config;
use strata_common::size::{format_size, parse_size};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Clone, Copy, ValueEnum)]
pub enum WriteTypeArg {
    /// Cache only; the bytes are pinned on the workers and never reach the UFS.
    MustCache,
    /// Write the UFS before returning, and keep a cached copy.
    CacheThrough,
    /// Write the UFS only.
    Through,
    /// Cache on `client.async_replicas` workers, then write the UFS in the
    /// background (`strata fs stat` shows when it is persisted).
    AsyncThrough,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum TtlActionArg {
    /// Drop the cached pages; the file stays.
    Free,
    /// Delete the path from the namespace and the UFS.
    Delete,
}

/// Parses `30s`, `15m`, `12h`, `7d` or plain seconds into milliseconds.
pub(crate) fn parse_duration_ms(s: &str) -> anyhow::Result<u64> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num.parse().with_context(|| {
        format!("duration {s:?}: expected a number and a unit (30s, 15m, 12h, 7d)")
    })?;
    let ms = match unit {
        "ms" => 1.0,
        "s" => 1e3,
        "m" => 60e3,
        "h" => 3600e3,
        "d" => 86_400e3,
        _ => bail!("duration {s:?}: unknown unit {unit:?}; use ms, s, m, h or d"),
    };
    let v = n * ms;
    if !(1.0..1e15).contains(&v) {
        bail!("duration {s:?}: must be between 1 ms and about 30000 years");
    }
    Ok(v as u64)
}

#[derive(Subcommand)]
pub enum FsCmd {
    /// List a directory.
    Ls {
        #[arg(default_value = "/")]
        path: String,
        /// Long format: kind, size, persistence, mtime.
        #[arg(short = 'l', long)]
        long: bool,
    },
    /// Show a file's or directory's metadata.
    Stat { path: String },
    /// Print a file to standard output.
    Cat { path: String },
    /// Copy a file from Strata to a local path ("-" for stdout).
    Get { path: String, local: PathBuf },
    /// Copy a local file ("-" for stdin) into Strata.
    Put {
        local: PathBuf,
        path: String,
        #[arg(long, value_enum, default_value = "cache-through")]
        write_type: WriteTypeArg,
        /// Replace an existing file.
        #[arg(long)]
        overwrite: bool,
        /// 0..=8: how much of the file the workers keep in memory
        /// (worker.priority_mem_base + priority × worker.priority_mem_step).
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=8))]
        priority: u8,
    },
    /// Create a directory.
    Mkdir {
        path: String,
        /// Create parents as needed.
        #[arg(short = 'p', long)]
        parents: bool,
    },
    /// Remove a file, or a directory with -r.
    Rm {
        path: String,
        #[arg(short = 'r', long)]
        recursive: bool,
    },
    /// Rename or move.
    Mv { src: String, dst: String },
    /// Total size and file count below a path.
    Du { path: String },
    /// Mount a UFS, or list mounts when called without arguments.
    Mount {
        path: Option<String>,
        /// file:///abs/dir or s3://bucket[/prefix][?endpoint=...]
        uri: Option<String>,
        /// UFS option KEY=VALUE (endpoint, region, path_style, access_key_id, ...).
        #[arg(long = "option", short = 'o', value_name = "KEY=VALUE")]
        options: Vec<String>,
        #[arg(long)]
        read_only: bool,
        /// Seconds before a listing is re-validated (-1 never, 0 always).
        #[arg(long, allow_hyphen_values = true)]
        sync_interval: Option<i64>,
        #[arg(long, value_name = "SIZE")]
        block_size: Option<String>,
        #[arg(long, value_name = "SIZE")]
        page_size: Option<String>,
        /// Create the UFS directory if it does not exist (file:// only).
        #[arg(long)]
        create: bool,
    },
    /// Remove a mount (cached data stays until evicted or freed).
    Unmount { path: String },
    /// Re-validate a path against the UFS now.
    Sync { path: String },
    /// Cache every file below a path on the workers (a `strata job load`
    /// that is waited for).
    Load {
        path: String,
        /// Compare the cached bytes with the UFS afterwards.
        #[arg(long)]
        verify: bool,
    },
    /// Drop cached pages of every persisted, unpinned file below a path (a
    /// `strata job free` that is waited for).
    Free { path: String },
    /// Set a path's time to live: when it expires, its cached data is freed
    /// or the path is deleted (from the UFS too). `--clear` removes it.
    Ttl {
        path: String,
        /// e.g. 30s, 15m, 12h, 7d (required unless --clear).
        duration: Option<String>,
        #[arg(long, value_enum, default_value = "free")]
        action: TtlActionArg,
        #[arg(long, conflicts_with = "duration")]
        clear: bool,
    },
    /// Replication bounds for a path and everything below it: reads are
    /// spread over at least MIN workers of each block's ranking (and loads
    /// cache it on MIN workers); hot blocks spread over at most MAX. 0
    /// clears a bound.
    SetReplication {
        path: String,
        #[arg(long)]
        min: Option<u32>,
        #[arg(long)]
        max: Option<u32>,
    },
    /// Cache every file below a path and keep it cached: pinned pages are
    /// never evicted (they still move between tiers).
    Pin { path: String },
    /// Let the pages of every file below a path be evicted again.
    Unpin { path: String },
}

fn bar(total: u64, msg: &str) -> ProgressBar {
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb.set_message(msg.to_string());
    pb
}

fn persist_name(i: &FileInfo) -> &'static str {
    match i.persist_state {
        1 => "persisted",
        2 => "not-persisted",
        3 => "to-be-persisted",
        _ => "-",
    }
}

/// Formats milliseconds since the Unix epoch as `YYYY-MM-DD HH:MM:SS` UTC.
pub(crate) fn format_time_ms(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil-from-days (proleptic Gregorian); also right before 1970.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn print_stat(i: &FileInfo) {
    println!("path:          {}", i.path);
    println!(
        "kind:          {}",
        if i.is_dir { "directory" } else { "file" }
    );
    if !i.is_dir {
        println!("size:          {} ({})", i.size, format_size(i.size));
        println!("fingerprint:   {}", i.fingerprint);
        println!("cache id:      {}", i.cache_id);
        println!("block size:    {}", format_size(i.block_size));
        println!("page size:     {}", format_size(i.page_size));
        println!("complete:      {}", i.complete);
    }
    println!("persistence:   {}", persist_name(i));
    println!(
        "mtime:         {} UTC ({} ms)",
        format_time_ms(i.mtime_ms),
        i.mtime_ms
    );
    println!("inode:         {}", i.id);
    if i.mount_id != 0 {
        println!("mount id:      {}", i.mount_id);
        println!("ufs path:      {}", i.ufs_path);
    }
    if i.is_mount_point {
        println!("mount point:   yes");
    }
    if i.pinned {
        println!("pinned:        yes");
    }
    if i.replication_min > 0 || i.replication_max > 0 {
        println!(
            "replication:   min {}, max {}",
            i.replication_min, i.replication_max
        );
    }
    if i.ttl_ms > 0 {
        println!(
            "ttl:           {} s, then {} (at {} UTC)",
            i.ttl_ms / 1000,
            ttl_action_name(i),
            format_time_ms(i.ttl_expires_ms)
        );
    }
    let mut names: Vec<&String> = i.xattrs.keys().collect();
    names.sort();
    for n in names {
        let v = &i.xattrs[n];
        match std::str::from_utf8(v) {
            Ok(t) if !t.chars().any(char::is_control) => println!("xattr:         {n}={t:?}"),
            _ => println!(
                "xattr:         {n}=0x{}",
                v.iter().map(|b| format!("{b:02x}")).collect::<String>()
            ),
        }
    }
}

fn ttl_action_name(i: &FileInfo) -> &'static str {
    if i.ttl_action == strata_proto::pb::TtlAction::TtlDelete as i32 {
        "delete"
    } else {
        "free"
    }
}

pub async fn run(cfg: &Config, cmd: FsCmd) -> anyhow::Result<()> {
    let c = crate::client(cfg)?;
    match cmd {
        FsCmd::Ls { path, long } => {
            for e in c.list(&path).await? {
                if long {
                    println!(
                        "{:<4} {:>14} {:<15} {:>19}  {}{}",
                        if e.is_dir { "dir" } else { "file" },
                        e.size,
                        persist_name(&e),
                        format_time_ms(e.mtime_ms),
                        e.path,
                        if e.is_dir { "/" } else { "" }
                    );
                } else {
                    println!("{}{}", e.name, if e.is_dir { "/" } else { "" });
                }
            }
        }
        FsCmd::Stat { path } => print_stat(&c.stat(&path).await?),
        FsCmd::Cat { path } => {
            let r = c.open(&path).await?;
            let mut s = Box::pin(r.stream(0));
            let mut out = tokio::io::stdout();
            while let Some(chunk) = s.next().await {
                out.write_all(&chunk?).await?;
            }
            out.flush().await?;
        }
        FsCmd::Get { path, local } => get(&c, &path, &local).await?,
        FsCmd::Put {
            local,
            path,
            write_type,
            overwrite,
            priority,
        } => {
            let wt = match write_type {
                WriteTypeArg::MustCache => WriteType::MustCache,
                WriteTypeArg::CacheThrough => WriteType::CacheThrough,
                WriteTypeArg::Through => WriteType::Through,
                WriteTypeArg::AsyncThrough => WriteType::AsyncThrough,
            };
            put(
                &c,
                &local,
                &path,
                WriteOptions {
                    write_type: wt,
                    overwrite,
                    recursive: true,
                    priority,
                },
            )
            .await?
        }
        FsCmd::Mkdir { path, parents } => {
            c.mkdir(&path, parents).await?;
        }
        FsCmd::Rm { path, recursive } => {
            let n = c.delete(&path, recursive).await?;
            if recursive {
                println!("removed {n} entries");
            }
        }
        FsCmd::Mv { src, dst } => c.rename(&src, &dst).await?,
        FsCmd::Du { path } => {
            let files = c.list_files_recursive(&path).await?;
            let total: u64 = files.iter().map(|f| f.size).sum();
            println!(
                "{} ({total} bytes) in {} files  {path}",
                format_size(total),
                files.len()
            );
        }
        FsCmd::Mount {
            path,
            uri,
            options,
            read_only,
            sync_interval,
            block_size,
            page_size,
            create,
        } => match (path, uri) {
            (None, None) => {
                for m in c.mounts().await? {
                    println!(
                        "{:<24} {}  (sync {}s, block {}, page {}{})",
                        m.path,
                        m.ufs_uri,
                        m.sync_interval,
                        format_size(m.block_size),
                        format_size(m.page_size),
                        if m.read_only { ", read-only" } else { "" }
                    );
                }
            }
            (Some(p), Some(u)) => {
                let mut opts = BTreeMap::new();
                for o in options {
                    let (k, v) = o
                        .split_once('=')
                        .with_context(|| format!("--option {o:?}: expected KEY=VALUE"))?;
                    opts.insert(k.to_string(), v.to_string());
                }
                let m = c
                    .mount(
                        &p,
                        &u,
                        MountOptions {
                            options: opts,
                            read_only,
                            sync_interval,
                            block_size: block_size.map(|s| parse_size(&s)).transpose()?,
                            page_size: page_size.map(|s| parse_size(&s)).transpose()?,
                            create_root: create,
                        },
                    )
                    .await?;
                println!("mounted {} -> {}", m.path, m.ufs_uri);
            }
            _ => bail!(
                "usage: strata fs mount /NS_PATH UFS_URI [--option K=V]...  (or no arguments to list)"
            ),
        },
        FsCmd::Unmount { path } => c.unmount(&path).await?,
        FsCmd::Sync { path } => {
            let r = c.sync(&path).await?;
            println!(
                "synced {} directories, {} entries changed",
                r.directories_synced, r.files_changed
            );
        }
        FsCmd::Load { path, verify } => {
            let started = Instant::now();
            let j = c.submit_job(&path, JobSpec::Load { verify }).await?;
            let j = crate::job::wait(&c, j.id).await?;
            let secs = started.elapsed().as_secs_f64();
            println!(
                "loaded {} files, {} in {secs:.2}s ({}/s); {} pages fetched from the UFS, {} already cached{} (job {})",
                j.files_done,
                format_size(j.bytes_done),
                format_size((j.bytes_done as f64 / secs.max(1e-9)) as u64),
                j.ufs_pages,
                j.cached_pages,
                if verify {
                    format!("; {} files verified", j.verified)
                } else {
                    String::new()
                },
                j.id
            );
        }
        FsCmd::Free { path } => {
            let j = c.submit_job(&path, JobSpec::Free).await?;
            let j = crate::job::wait(&c, j.id).await?;
            println!("freed {} cached pages ({})", j.cached_pages, j.message);
        }
        FsCmd::Ttl {
            path,
            duration,
            action,
            clear,
        } => {
            let mut req = strata_proto::pb::SetAttributesRequest {
                path: path.clone(),
                clear_ttl: clear,
                ..Default::default()
            };
            if !clear {
                let Some(d) = duration else {
                    bail!(
                        "usage: strata fs ttl PATH DURATION [--action free|delete]  (or --clear)"
                    );
                };
                req.ttl_ms = parse_duration_ms(&d)?;
                req.ttl_action = match action {
                    TtlActionArg::Free => strata_proto::pb::TtlAction::TtlFree,
                    TtlActionArg::Delete => strata_proto::pb::TtlAction::TtlDelete,
                } as i32;
            }
            let i = c.set_attributes(req).await?;
            if i.ttl_ms == 0 {
                println!("{}: no TTL", i.path);
            } else {
                println!(
                    "{}: {} at {} UTC",
                    i.path,
                    ttl_action_name(&i),
                    format_time_ms(i.ttl_expires_ms)
                );
            }
        }
        FsCmd::SetReplication { path, min, max } => {
            if min.is_none() && max.is_none() {
                bail!("usage: strata fs set-replication PATH [--min N] [--max M]");
            }
            let i = c
                .set_attributes(strata_proto::pb::SetAttributesRequest {
                    path,
                    replication_min: min,
                    replication_max: max,
                    ..Default::default()
                })
                .await?;
            println!(
                "{}: replication min {}, max {}",
                i.path,
                i.replication_min,
                if i.replication_max == 0 {
                    "unbounded (worker.hot_block_max_replicas)".to_string()
                } else {
                    i.replication_max.to_string()
                }
            );
        }
        FsCmd::Pin { path } => {
            // Pin first, so pages loaded next are pinned as they land.
            c.set_attributes(strata_proto::pb::SetAttributesRequest {
                path: path.clone(),
                pinned: Some(true),
                ..Default::default()
            })
            .await?;
            let (files, _) = c.pin(&path, true).await?;
            let pb = bar(0, "loading");
            let p = c
                .load(&path, |p| {
                    pb.set_length(p.bytes_total);
                    pb.set_position(p.bytes_done);
                })
                .await;
            pb.finish_and_clear();
            let p = p?;
            println!(
                "pinned {files} files ({} cached; {} pages fetched from the UFS)",
                format_size(p.bytes_done),
                p.ufs_pages
            );
        }
        FsCmd::Unpin { path } => {
            c.set_attributes(strata_proto::pb::SetAttributesRequest {
                path: path.clone(),
                pinned: Some(false),
                ..Default::default()
            })
            .await?;
            let (files, pages) = c.pin(&path, false).await?;
            println!("unpinned {files} files ({pages} cached pages)");
        }
    }
    Ok(())
}

async fn get(c: &Client, path: &str, local: &PathBuf) -> anyhow::Result<()> {
    let r = c.open(path).await?;
    let to_stdout = local.as_os_str() == "-";
    let pb = if to_stdout {
        ProgressBar::hidden()
    } else {
        bar(r.len(), "get")
    };
    let mut out: Box<dyn tokio::io::AsyncWrite + Unpin + Send> = if to_stdout {
        Box::new(tokio::io::stdout())
    } else {
        let tmp = local.with_extension("strata-part");
        Box::new(
            tokio::fs::File::create(&tmp)
                .await
                .with_context(|| format!("cannot create {}", tmp.display()))?,
        )
    };
    let mut s = Box::pin(r.stream(0));
    while let Some(chunk) = s.next().await {
        let chunk = chunk?;
        out.write_all(&chunk).await?;
        pb.inc(chunk.len() as u64);
    }
    out.flush().await?;
    drop(out);
    pb.finish_and_clear();
    if !to_stdout {
        // Only a complete copy appears under the requested name.
        tokio::fs::rename(local.with_extension("strata-part"), local)
            .await
            .with_context(|| format!("cannot rename into {}", local.display()))?;
    }
    Ok(())
}

async fn put(c: &Client, local: &PathBuf, path: &str, opts: WriteOptions) -> anyhow::Result<()> {
    let from_stdin = local.as_os_str() == "-";
    let (mut input, len): (Box<dyn tokio::io::AsyncRead + Unpin + Send>, u64) = if from_stdin {
        (Box::new(tokio::io::stdin()), 0)
    } else {
        let f = tokio::fs::File::open(local)
            .await
            .with_context(|| format!("cannot open {}", local.display()))?;
        let len = f.metadata().await.map(|m| m.len()).unwrap_or(0);
        (Box::new(f), len)
    };
    let pb = if from_stdin {
        ProgressBar::hidden()
    } else {
        bar(len, "put")
    };
    let mut w = c.create(path, opts).await?;
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let n = match input.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                w.abort().await;
                return Err(anyhow::anyhow!("reading {}: {e}", local.display()));
            }
        };
        if let Err(e) = w.write(&buf[..n]).await {
            w.abort().await;
            return Err(e.into());
        }
        pb.inc(n as u64);
    }
    let info = w.close().await?;
    pb.finish_and_clear();
    let _ = std::io::stdout().flush();
    println!(
        "wrote {} ({} bytes, {})",
        info.path,
        info.size,
        persist_name(&info)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::format_time_ms;

    #[test]
    fn formats_utc_timestamps() {
        assert_eq!(format_time_ms(0), "1970-01-01 00:00:00");
        assert_eq!(format_time_ms(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(format_time_ms(1_795_337_865_894), "2026-11-22 08:57:45");
        assert_eq!(format_time_ms(-1000), "1969-12-31 23:59:59");
    }
}
