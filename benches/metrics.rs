//! Benchmark of `/metrics` rendering (`rsbalancer::metrics::render`) at 3 and 1,000
//! nodes.
//!
//! ```text
//! cargo bench --no-default-features --bench metrics [-- --dump FILE]
//! ```
//!
//! A plain `fn main` (`harness = false` in Cargo.toml). For each size, one balancer
//! with one `p2c_ewma` pool of that many nodes, every node given traffic first (picks and reports
//! with 2xx, 429, 5xx and no-response outcomes spread over the latency buckets), then
//! `RUNS` renders into a reused buffer; prints the median, min and max time per
//! render and the size of the exposition. Rendering is what a scrape costs the worker
//! that serves it (plus copying the text into Lua and sending it); nothing is added
//! to the request path. `--dump FILE` writes the 1,000-node exposition, e.g. for
//! `promtool check metrics < FILE`.

use std::hint::black_box;
use std::time::Instant;

use rsbalancer::balancer::Balancer;
use rsbalancer::config::Config;

const SIZES: [usize; 2] = [3, 1_000];
const RUNS: usize = 31;

fn main() {
    for nodes in SIZES {
        bench(nodes);
    }
}

fn bench(nodes_n: usize) {
    let nodes: Vec<String> = (0..nodes_n)
        .map(|i| {
            format!(
                r#"{{"id": "node-{i}", "addr": "127.0.0.1:{}", "weight": {}}}"#,
                10_000 + i,
                1 + i % 10
            )
        })
        .collect();
    let json = format!(
        r#"{{"pools": {{"llm": {{"algorithm": "p2c_ewma", "nodes": [{}]}}}}}}"#,
        nodes.join(",")
    );
    let b = Balancer::create(&Config::from_json(&json).expect("config")).expect("balancer");
    let pool = b.pool_index("llm").unwrap();
    for i in 0..nodes_n * 20 {
        let node = b.pick(pool, b"", &[]).expect("pick");
        let status = match i % 20 {
            0 => 429,
            1 => 503,
            2 => 0,
            _ => 200,
        };
        b.report(node, status, ((i * 7919) % 2_000_000) as u32, 0)
            .unwrap();
    }
    // Some tries left in flight.
    for _ in 0..nodes_n.div_ceil(10) {
        b.pick(pool, b"", &[]).unwrap();
    }
    let mut out = String::new();
    rsbalancer::metrics::render(&b, &mut out).unwrap();
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args
        .iter()
        .position(|a| a == "--dump")
        .filter(|_| nodes_n == 1_000)
    {
        let path = args.get(i + 1).expect("--dump FILE");
        std::fs::write(path, &out).expect("write dump");
        println!("wrote {path}");
    }
    let (bytes, lines) = (out.len(), out.lines().count());
    let mut times = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        out.clear();
        let t = Instant::now();
        rsbalancer::metrics::render(black_box(&b), &mut out).unwrap();
        times.push(t.elapsed().as_secs_f64() * 1e3);
        black_box(&out);
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "metrics render, {nodes_n} nodes in one pool: median {:.3} ms (min {:.3}, max {:.3}) over {RUNS} renders; {bytes} bytes, {lines} lines per exposition",
        times[RUNS / 2],
        times[0],
        times[RUNS - 1],
    );
}
