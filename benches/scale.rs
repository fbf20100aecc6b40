//! A 10,000-node pool: shared memory per node, pick + report cost, and the time a
//! reconfiguration of the whole pool takes.
//!
//! ```text
//! cargo bench --no-default-features --bench scale
//! ```
//!
//! Prints, for `RSB_SCALE_NODES` nodes (default 10,000) in one pool:
//! - bytes of shared memory per node: the mapping's size at `max_nodes` = 2N less its
//!   size at N, over N (node slot, per-worker in-flight shares, tally rows; the config
//!   text is sized by `shm.config_bytes`, reported on its own);
//! - the first configure (validation, slot assignment, the config text written), a
//!   reconfiguration with every weight changed, and one replacing every node id; each
//!   followed by the first pick, which rebuilds this process's tables from the text;
//! - ns per pick + report through the Rust API for every algorithm (median of 5 runs).
//!
//! Timings are printed, never asserted (a bench, not a test).

use rsbalancer::balancer::Balancer;
use rsbalancer::config::Config;
use rsbalancer::shm::layout::Capacity;
use std::time::Instant;

const RUNS: usize = 5;
const PAIRS: usize = 200_000;

fn config(algorithm: &str, n: usize, weight: impl Fn(usize) -> u32, prefix: &str) -> Config {
    let nodes: Vec<String> = (0..n)
        .map(|i| {
            format!(
                r#"{{"id":"{prefix}{i}","addr":"10.{}.{}.{}:8000","weight":{}}}"#,
                i / 65536,
                (i / 256) % 256,
                i % 256,
                weight(i)
            )
        })
        .collect();
    let json = format!(
        r#"{{"shm":{{"max_nodes":{},"config_bytes":{}}},"pools":{{"p":{{"algorithm":"{algorithm}","slow_start_ms":0,"nodes":[{}]}}}}}}"#,
        2 * n,
        16 << 20,
        nodes.join(",")
    );
    Config::from_json(&json).expect("bench config")
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let n: usize = std::env::var("RSB_SCALE_NODES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000);

    let shm = config("p2c_ewma", 1, |_| 1, "n").shm;
    let cap = |nodes: u32| Capacity {
        max_pools: shm.max_pools,
        max_nodes: nodes,
        max_workers: shm.max_workers,
        config_bytes: 16 << 20,
        max_waiters: shm.queue_slots,
    };
    let (a, b) = (cap(n as u32).offsets().total, cap(2 * n as u32).offsets().total);
    let c = cap(n as u32);
    println!("scale bench: {n} nodes in one pool");
    println!(
        "shared memory: {:.0} bytes per node ({} workers' shares and tally rows included); \
         mapping at max_nodes {n}: {:.1} MiB, of which config text 2 x {} MiB",
        (b - a) as f64 / n as f64,
        c.max_workers,
        a as f64 / (1 << 20) as f64,
        c.config_bytes >> 20
    );

    let t = Instant::now();
    let cfg = config("p2c_ewma", n, |i| 1 + (i % 10) as u32, "n");
    println!("config parse + validate: {:.1} ms", ms(t));
    let t = Instant::now();
    let bal = Balancer::create(&cfg).expect("create");
    println!("create (map + first configure): {:.1} ms", ms(t));
    bal.attach_worker(0).expect("worker slot");
    let pool = bal.pool_index("p").unwrap();
    let t = Instant::now();
    let s = bal.pick(pool, b"", &[]).unwrap();
    bal.report(s, 200, 1000, 0).unwrap();
    println!("first pick (builds this process's tables): {:.1} ms", ms(t));

    let reweighted = config("p2c_ewma", n, |i| 1 + ((i + 3) % 10) as u32, "n");
    let t = Instant::now();
    bal.configure(&reweighted).expect("configure");
    let conf = ms(t);
    let t = Instant::now();
    let s = bal.pick(pool, b"", &[]).unwrap();
    bal.report(s, 200, 1000, 0).unwrap();
    println!(
        "reconfigure, every weight changed: {conf:.1} ms; first pick after: {:.1} ms",
        ms(t)
    );

    let renamed = config("p2c_ewma", n, |i| 1 + (i % 10) as u32, "m");
    let t = Instant::now();
    bal.configure(&renamed).expect("configure");
    let conf = ms(t);
    let t = Instant::now();
    let s = bal.pick(pool, b"", &[]).unwrap();
    bal.report(s, 200, 1000, 0).unwrap();
    println!(
        "reconfigure, every node replaced: {conf:.1} ms; first pick after: {:.1} ms",
        ms(t)
    );

    println!("\n{:<16} {:>14}", "algorithm", "ns/pick+report");
    for alg in [
        "weighted_random",
        "p2c_ewma",
        "round_robin",
        "least_conn",
        "chash",
    ] {
        let bal = Balancer::create(&config(alg, n, |i| 1 + (i % 10) as u32, "n")).expect("create");
        bal.attach_worker(0).expect("worker slot");
        let pool = bal.pool_index("p").unwrap();
        let keys: Vec<Vec<u8>> = (0..1024).map(|i| format!("k{i}").into_bytes()).collect();
        let run = |pairs: usize| {
            let t = Instant::now();
            for i in 0..pairs {
                let s = bal.pick(pool, &keys[i & 1023], &[]).unwrap();
                bal.report(s, 200, 50_000, 0).unwrap();
            }
            t.elapsed().as_nanos() as f64 / pairs as f64
        };
        run(PAIRS / 4);
        let ns = median((0..RUNS).map(|_| run(PAIRS)).collect());
        println!("{alg:<16} {ns:>14.1}");
    }
}
