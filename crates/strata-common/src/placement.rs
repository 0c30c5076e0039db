//! Block placement by weighted rendezvous (highest-random-weight) hashing.
//! Every party computes the same owners from the same worker list, so the
//! master keeps no per-block location table, and a worker joining or leaving
//! moves only the blocks it gains or loses (~1/N).

use crate::ids::WorkerId;

/// What placement needs to know about a live worker.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    pub id: WorkerId,
    /// Relative weight, normally the cache capacity in bytes.
    pub weight: u64,
}

fn mix(a: u64, b: u64) -> u64 {
    // splitmix64 over the pair: cheap and well distributed.
    let mut z = a ^ b.rotate_left(32) ^ 0x9E37_79B9_7F4A_7C15;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Score of worker for key: `-weight / ln(u)` with `u` uniform in (0, 1),
/// which makes the chance of winning proportional to the weight.
fn score(key: u64, c: &Candidate) -> f64 {
    let h = mix(key, c.id);
    let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    let w = c.weight.max(1) as f64;
    -w / u.ln()
}

/// The `r` owners of `key`, best first.
pub fn owners(key: u64, workers: &[Candidate], r: usize) -> Vec<WorkerId> {
    let mut scored: Vec<(f64, WorkerId)> = workers.iter().map(|c| (score(key, c), c.id)).collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    scored.into_iter().take(r).map(|(_, id)| id).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ws(n: u64) -> Vec<Candidate> {
        (1..=n).map(|id| Candidate { id, weight: 100 }).collect()
    }

    #[test]
    fn weights_shift_share() {
        let mut w = ws(2);
        w[0].weight = 300;
        let first = (0..20_000u64).filter(|k| owners(*k, &w, 1)[0] == 1).count();
        // expect ~75 %
        assert!((14_000..16_000).contains(&first), "{first}");
    }

    proptest! {
        #[test]
        fn removing_a_worker_moves_only_its_keys(n in 2u64..8, keys in proptest::collection::vec(any::<u64>(), 1..200)) {
            let all = ws(n);
            let without: Vec<_> = all.iter().filter(|c| c.id != n).cloned().collect();
            for k in keys {
                let before = owners(k, &all, 1)[0];
                let after = owners(k, &without, 1)[0];
                if before != n { prop_assert_eq!(before, after); }
            }
        }

        #[test]
        fn owners_are_distinct_and_bounded(n in 1u64..8, r in 1usize..5, k in any::<u64>()) {
            let o = owners(k, &ws(n), r);
            prop_assert_eq!(o.len(), r.min(n as usize));
            let mut d = o.clone(); d.sort(); d.dedup();
            prop_assert_eq!(d.len(), o.len());
        }
    }
}
