//! `strata bench cache`: replays synthetic access traces against every
//! eviction policy the block store offers, at several cache sizes, and prints
//! each hit ratio next to Belady's optimal on the same trace.

use clap::Args;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use strata_worker::policy::{PolicyKind, belady_hits, new_policy_with, simulate};

#[derive(Args)]
pub struct CacheArgs {
    /// Distinct pages in the Zipf traces.
    #[arg(long, default_value_t = 50_000)]
    items: u64,
    /// Accesses per trace.
    #[arg(long, default_value_t = 500_000)]
    accesses: usize,
    /// Cache sizes, as percentages of the distinct pages.
    #[arg(long, value_delimiter = ',', default_value = "1,5,10,25")]
    sizes: Vec<f64>,
    /// LRFU decay per access (smaller weighs frequency more).
    #[arg(long, default_value_t = strata_worker::policy::DEFAULT_LRFU_LAMBDA)]
    lrfu_lambda: f64,
    /// Random seed (traces are reproducible).
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

/// Samples ranks 0..n with probability proportional to 1 / (rank+1)^s.
struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: u64, s: f64) -> Zipf {
        let mut acc = 0.0;
        let mut cdf = Vec::with_capacity(n as usize);
        for r in 1..=n {
            acc += 1.0 / (r as f64).powf(s);
            cdf.push(acc);
        }
        for v in &mut cdf {
            *v /= acc;
        }
        Zipf { cdf }
    }
    fn sample(&self, rng: &mut StdRng) -> u64 {
        let u: f64 = rng.random();
        self.cdf.partition_point(|&c| c < u) as u64
    }
}

/// A named trace and the number of distinct pages cache sizes refer to.
struct Trace {
    name: String,
    keys: Vec<u64>,
    distinct: u64,
}

/// Scatters ranks over the key space so hot keys are not numerically adjacent.
fn scatter(rank: u64) -> u64 {
    rank.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

fn zipf_trace(a: &CacheArgs, s: f64, rng: &mut StdRng) -> Trace {
    let z = Zipf::new(a.items, s);
    Trace {
        name: format!("zipf {s}"),
        keys: (0..a.accesses).map(|_| scatter(z.sample(rng))).collect(),
        distinct: a.items,
    }
}

/// A hot set read over and over, interrupted by long one-pass scans of pages
/// never read again (a batch job sweeping a dataset past a serving cache).
fn scan_hot_trace(a: &CacheArgs, rng: &mut StdRng) -> Trace {
    let hot = (a.items / 20).max(1);
    let scan_len = a.items / 5;
    let mut keys = Vec::with_capacity(a.accesses);
    let mut next_scan = 1u64 << 40;
    while keys.len() < a.accesses {
        for _ in 0..scan_len * 2 {
            keys.push(scatter(rng.random_range(0..hot)));
        }
        for _ in 0..scan_len {
            keys.push(next_scan);
            next_scan += 1;
        }
    }
    keys.truncate(a.accesses);
    Trace {
        name: "scan + hot set".into(),
        keys,
        distinct: a.items,
    }
}

/// A sequential loop over more pages than the largest cache (an epoch over
/// a dataset that does not fit).
fn loop_trace(a: &CacheArgs) -> Trace {
    let max_pct = a.sizes.iter().cloned().fold(1.0, f64::max);
    let len = ((a.items as f64 * max_pct / 100.0) * 1.25).ceil().max(2.0) as u64;
    Trace {
        name: format!("loop of {len}"),
        keys: (0..a.accesses as u64).map(|i| i % len).collect(),
        distinct: a.items,
    }
}

pub fn run(a: CacheArgs) -> anyhow::Result<()> {
    if a.items == 0 || a.accesses == 0 {
        anyhow::bail!("--items and --accesses must be positive");
    }
    if let Some(bad) = a.sizes.iter().find(|s| !(**s > 0.0 && **s <= 100.0)) {
        anyhow::bail!("cache size {bad}% is not in (0, 100]");
    }
    let mut rng = StdRng::seed_from_u64(a.seed);
    let traces = vec![
        zipf_trace(&a, 0.8, &mut rng),
        zipf_trace(&a, 1.0, &mut rng),
        zipf_trace(&a, 1.2, &mut rng),
        scan_hot_trace(&a, &mut rng),
        loop_trace(&a),
    ];
    println!(
        "hit ratios, {} accesses per trace over {} distinct pages (seed {})",
        a.accesses, a.items, a.seed
    );
    print!("{:<16} {:>8} {:>8}", "trace", "cache%", "pages");
    for k in PolicyKind::ALL {
        print!(" {:>8}", k.name());
    }
    println!(" {:>8}", "optimal");
    for t in &traces {
        for pct in &a.sizes {
            let cap = ((t.distinct as f64 * pct / 100.0).round() as usize).max(1);
            let n = t.keys.len() as f64;
            print!("{:<16} {:>7}% {:>8}", t.name, pct, cap);
            for k in PolicyKind::ALL {
                let mut p = new_policy_with::<u64>(k, cap, a.lrfu_lambda);
                let hits = simulate(p.as_mut(), &t.keys, cap);
                print!(" {:>7.2}%", 100.0 * hits as f64 / n);
            }
            let opt = belady_hits(&t.keys, cap);
            println!(" {:>7.2}%", 100.0 * opt as f64 / n);
        }
    }
    Ok(())
}
