//! `strata admin ...`

use clap::Subcommand;
use strata_common::Config;
use strata_common::size::format_size;

#[derive(Subcommand)]
pub enum AdminCmd {
    /// Workers, capacity, usage and cache hit ratio.
    Report,
    /// The metadata masters (Raft members): list, add, remove.
    #[command(subcommand)]
    Masters(MastersCmd),
}

#[derive(Subcommand)]
pub enum MastersCmd {
    /// Members, their roles and the leader.
    List,
    /// Add a master started with `strata master --join --node-id ID`; it
    /// catches up as a learner, then becomes a voter.
    Add {
        /// Its member id (unique; never reuse the id of a removed master).
        id: u64,
        /// Its address HOST:PORT.
        addr: String,
    },
    /// Remove a master from the cluster (stop its process afterwards).
    Remove { id: u64 },
}

fn print_masters(l: &strata_client::MasterList) {
    println!(
        "leader: {} ({})   term: {}   applied index: {}   inodes: {}",
        l.leader_id,
        if l.leader_addr.is_empty() {
            "none"
        } else {
            &l.leader_addr
        },
        l.term,
        l.last_applied,
        l.inodes
    );
    if l.lease_reads + l.read_index_reads > 0 {
        println!(
            "linearizable read calls answered by this master as a follower: {} under a read lease, {} after asking for a read index",
            l.lease_reads, l.read_index_reads
        );
    }
    println!("{:<6} {:<24} {:<10}", "id", "address", "role");
    for m in &l.masters {
        println!("{:<6} {:<24} {:<10}", m.id, m.addr, m.role);
    }
}

pub async fn run(cfg: &Config, cmd: AdminCmd) -> anyhow::Result<()> {
    let c = crate::client(cfg)?;
    match cmd {
        AdminCmd::Masters(m) => {
            let l = match m {
                MastersCmd::List => c.list_masters().await?,
                MastersCmd::Add { id, addr } => c.add_master(id, &addr).await?,
                MastersCmd::Remove { id } => c.remove_master(id).await?,
            };
            print_masters(&l);
        }
        AdminCmd::Report => {
            let workers = c.workers().await?;
            let mounts = c.mounts().await?;
            let live = workers.iter().filter(|w| w.live).count();
            let (mut cap, mut used, mut hits, mut misses, mut ufs) = (0, 0, 0, 0, 0);
            for w in &workers {
                let s = w.stats.clone().unwrap_or_default();
                if w.live {
                    cap += s.capacity_bytes;
                    used += s.used_bytes;
                }
                hits += s.hits;
                misses += s.misses;
                ufs += s.ufs_bytes_read;
            }
            println!("master:          {}", c.master_addr());
            println!("mounts:          {}", mounts.len());
            println!("workers:         {live} live / {} known", workers.len());
            println!("capacity:        {}", format_size(cap));
            println!(
                "used:            {} ({:.1}%)",
                format_size(used),
                100.0 * used as f64 / cap.max(1) as f64
            );
            let ratio = if hits + misses == 0 {
                "n/a".to_string()
            } else {
                format!("{:.1}%", 100.0 * hits as f64 / (hits + misses) as f64)
            };
            println!("cache hit ratio: {ratio} ({hits} page hits, {misses} misses)");
            println!("read from UFS:   {} ({ufs} bytes)", format_size(ufs));
            println!();
            println!(
                "{:<20} {:<22} {:>5} {:>12} {:>12} {:>9} {:>10}",
                "worker", "data address", "live", "capacity", "used", "hit%", "evictions"
            );
            for w in &workers {
                let s = w.stats.clone().unwrap_or_default();
                let hr = if s.hits + s.misses == 0 {
                    "n/a".to_string()
                } else {
                    format!("{:.1}", 100.0 * s.hits as f64 / (s.hits + s.misses) as f64)
                };
                println!(
                    "{:<20} {:<22} {:>5} {:>12} {:>12} {:>9} {:>10}",
                    w.worker_id,
                    w.data_addr,
                    if w.live { "yes" } else { "no" },
                    format_size(s.capacity_bytes),
                    format_size(s.used_bytes),
                    hr,
                    s.evictions
                );
            }
            for w in &workers {
                let s = w.stats.clone().unwrap_or_default();
                print_tiers(w.worker_id, &s);
            }
        }
    }
    Ok(())
}

/// The per-tier table of one worker, its memory watch and priority budgets.
fn print_tiers(worker: u64, s: &strata_proto::pb::WorkerStats) {
    println!();
    let mem = if s.memory_available_bytes == 0 {
        "unknown".to_string()
    } else {
        format_size(s.memory_available_bytes)
    };
    println!(
        "worker {worker}: process RSS {} (peak {}); memory available {mem}{}; {} pinned files; {} corrupt pages dropped; {} pages expired",
        format_size(s.rss_bytes),
        format_size(s.peak_rss_bytes),
        if s.memory_pressure {
            " (UNDER PRESSURE: spilling)"
        } else {
            ""
        },
        s.pinned_files,
        s.corrupt_pages,
        s.expired_pages
    );
    println!(
        "  {:<5} {:<6} {:>11} {:>11} {:>11} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8}",
        "tier",
        "policy",
        "capacity",
        "used",
        "pinned",
        "pages",
        "hits",
        "misses",
        "evicted",
        "promoted",
        "demoted",
        "spilled"
    );
    for t in &s.tiers {
        println!(
            "  {:<5} {:<6} {:>11} {:>11} {:>11} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8}",
            t.medium,
            t.policy,
            format_size(t.capacity_bytes),
            format_size(t.used_bytes),
            format_size(t.pinned_bytes),
            t.pages,
            t.hits,
            t.misses,
            t.evictions,
            t.promotions,
            t.demotions,
            t.spills
        );
    }
    let written: Vec<_> = s
        .priorities
        .iter()
        .filter(|p| p.mem_bytes + p.disk_bytes > 0)
        .collect();
    if !written.is_empty() {
        println!("  written by priority (bytes kept in MEM / sent to disk tiers):");
        for p in written {
            println!(
                "    priority {}: {} MEM, {} disk",
                p.priority,
                format_size(p.mem_bytes),
                format_size(p.disk_bytes)
            );
        }
    }
}
