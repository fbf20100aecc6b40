//! Micro-benchmark of the selection algorithms: nanoseconds per pick.
//!
//! Run with:
//!
//! ```text
//! cargo bench --bench select --no-default-features
//! ```
//!
//! (`--no-default-features` leaves out the Lua module, which needs the host's LuaJIT
//! symbols.) This is a plain `fn main` (`harness = false` in Cargo.toml), using only
//! `std::time::Instant` and `std::hint::black_box`.
//!
//! For each algorithm and pool size (8, 100, 1000, 4096, 10000 candidates, weights 1..=10, all
//! eligible, varied in-flight counts and latencies) it times 5 runs and prints the median
//! ns per pick. A run is 1M picks. The build time of each selector is printed too.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rsbalancer::select::{hash_key, Algorithm, Candidate, NodeView, Selector, DEFAULT_CHASH_POINTS};
use std::hint::black_box;
use std::time::Instant;

const SIZES: [usize; 5] = [8, 100, 1000, 4096, 10_000];
const RUNS: usize = 5;
const PICKS: usize = 1_000_000;

const ALGORITHMS: [(Algorithm, &str); 5] = [
    (Algorithm::WeightedRandom, "weighted_random"),
    (Algorithm::RoundRobin, "round_robin"),
    (Algorithm::LeastConn, "least_conn"),
    (Algorithm::P2cEwma, "p2c_ewma"),
    (Algorithm::Chash, "chash"),
];

/// A view over plain vectors, standing in for the shared-memory slots.
struct BenchView {
    eligible: Vec<bool>,
    inflight: Vec<u32>,
    latency: Vec<f64>,
}

impl NodeView for BenchView {
    fn eligible(&self, idx: usize) -> bool {
        self.eligible[idx]
    }
    fn inflight(&self, idx: usize) -> u32 {
        self.inflight[idx]
    }
    fn latency(&self, idx: usize) -> f64 {
        self.latency[idx]
    }
}

fn main() {
    let mut rng = SmallRng::seed_from_u64(0x5e1ec7);
    // Request keys for chash, hashed up front.
    let keys: Vec<u64> = (0..4096u32)
        .map(|i| hash_key(format!("/item/{i}").as_bytes()))
        .collect();

    println!(
        "{:<16} {:>6} {:>10} {:>12} {:>12}",
        "algorithm", "n", "picks/run", "build (µs)", "ns/pick"
    );
    for (alg, name) in ALGORITHMS {
        for n in SIZES {
            let cands: Vec<Candidate> = (0..n)
                .map(|i| Candidate {
                    key: i as u64,
                    weight: (1 + i % 10) as f64,
                })
                .collect();
            let view = BenchView {
                eligible: vec![true; n],
                inflight: (0..n).map(|_| rng.random_range(0..8)).collect(),
                latency: (0..n).map(|_| rng.random_range(500.0..5000.0)).collect(),
            };

            let t = Instant::now();
            let mut sel = Selector::build(alg, &cands, DEFAULT_CHASH_POINTS, &mut rng);
            let build_us = t.elapsed().as_secs_f64() * 1e6;

            let picks = PICKS;
            let mut runs: Vec<f64> = (0..RUNS)
                .map(|_| {
                    let t = Instant::now();
                    for p in 0..picks {
                        let key = keys[p % keys.len()];
                        black_box(sel.pick(&mut rng, black_box(&view), black_box(key)));
                    }
                    t.elapsed().as_nanos() as f64 / picks as f64
                })
                .collect();
            runs.sort_by(f64::total_cmp);
            println!(
                "{:<16} {:>6} {:>10} {:>12.1} {:>12.1}",
                name,
                n,
                picks,
                build_us,
                runs[RUNS / 2]
            );
        }
    }
}
