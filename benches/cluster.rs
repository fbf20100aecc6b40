//! Cluster benchmark: three gateways (nginx, 2 workers each, the demo template) in front
//! of the same mock LLM nodes, with cluster mode (a real `redis-server`) and without,
//! at 80% and 1.5x the nodes' capacity.
//!
//! ```text
//! cargo bench --no-default-features --bench cluster [-- --quick]
//! ```
//!
//! The nodes: three mocks (nginx-conf/demo/lua/mock_llm.lua) capped at `CAP` requests
//! in flight each (429 without Retry-After beyond), `LATENCY_MS` per answer: capacity
//! is 3 × CAP slots, 3 × CAP / latency requests per second. Closed-loop clients, spread
//! evenly over the three gateways, POST chat completions for `SECS` seconds each run;
//! the pool runs its defaults (`p2c_ewma`, learned limits, rounds). Contenders run back
//! to back in one process (same machine state), each with fresh nginx instances and,
//! for cluster mode, a fresh Redis.
//!
//! Printed per load and contender: fleet success (2xx share of client requests), node
//! 429s (answers over a cap, from the mocks' own counts) per client request, tries per
//! client request (requests the nodes received / client requests), goodput (2xx per
//! second as a share of capacity), and for cluster mode the Redis commands processed
//! per client request (`INFO stats`, `total_commands_processed`).

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::redis::Redis;
use support::*;

const CAP: u32 = 8;
const LATENCY_MS: u32 = 50;

struct Outcome {
    requests: u64,
    ok: u64,
    node_429: u64,
    tries: u64,
    secs: f64,
    redis_cmds: Option<u64>,
}

fn config(redis: Option<&Redis>, gateway: &str, nodes: &[MockNode]) -> Value {
    let nodes: Vec<Value> = nodes
        .iter()
        .map(|m| json!({ "id": m.name, "addr": m.addr(), "weight": 10 }))
        .collect();
    let mut c = json!({ "pools": { "llm": { "algorithm": "p2c_ewma", "nodes": nodes } } });
    if let Some(r) = redis {
        c["cluster"] = json!({ "redis": format!("redis://127.0.0.1:{}", r.port), "gateway": gateway });
    }
    c
}

fn mock_counts(m: &MockNode) -> (u64, u64) {
    let s = get(m.port, "/mock/state").json();
    (
        s["received"].as_u64().unwrap_or(0),
        s["rejected"].as_u64().unwrap_or(0),
    )
}

fn redis_commands(r: &Redis) -> u64 {
    let client = ::redis::Client::open(format!("redis://127.0.0.1:{}", r.port)).expect("redis url");
    let mut c = client.get_connection().expect("connect to redis");
    let info: String = ::redis::cmd("INFO").arg("stats").query(&mut c).expect("INFO");
    info.lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn run(name: &str, cluster: bool, clients: usize, secs: u64) -> Outcome {
    let redis = cluster.then(Redis::start);
    let mdir = TestDir::new(&format!("bench-cluster-mocks-{name}"));
    let nodes: Vec<MockNode> = ["a", "b", "c"]
        .iter()
        .map(|n| {
            let mut m = MockNode::new(n, LATENCY_MS);
            m.max_conc = CAP;
            m
        })
        .collect();
    let _mocks = start_mocks(&mdir, &nodes);
    let dirs: Vec<TestDir> = ["A", "B", "C"]
        .iter()
        .map(|g| TestDir::new(&format!("bench-cluster-{name}-{g}")))
        .collect();
    let gws: Vec<Gateway> = dirs
        .iter()
        .zip(["A", "B", "C"])
        .map(|(d, g)| start_gateway(d, &config(redis.as_ref(), g, &nodes)))
        .collect();
    if cluster {
        for g in &gws {
            wait_until(Duration::from_secs(20), "the fleet of 3", || {
                get(g.port, "/metrics")
                    .text()
                    .lines()
                    .any(|l| l == "rsbalancer_cluster_gateways 3")
            });
        }
    }
    let before: Vec<(u64, u64)> = nodes.iter().map(mock_counts).collect();
    let cmds0 = redis.as_ref().map(redis_commands);
    let (requests, ok) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let ports: Vec<u16> = gws.iter().map(|g| g.port).collect();
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    let threads: Vec<_> = (0..clients)
        .map(|i| {
            let (requests, ok, port) = (requests.clone(), ok.clone(), ports[i % ports.len()]);
            std::thread::spawn(move || {
                while Instant::now() < deadline {
                    let r = post(port, "/v1/chat/completions", CHAT_BODY);
                    requests.fetch_add(1, Ordering::Relaxed);
                    if r.status == 200 {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("client thread");
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cmds = redis.as_ref().map(redis_commands);
    let after: Vec<(u64, u64)> = nodes.iter().map(mock_counts).collect();
    let (tries, node_429) = before
        .iter()
        .zip(&after)
        .fold((0, 0), |(t, r), (b, a)| (t + a.0 - b.0, r + a.1 - b.1));
    Outcome {
        requests: requests.load(Ordering::Relaxed),
        ok: ok.load(Ordering::Relaxed),
        node_429,
        tries,
        secs: elapsed,
        redis_cmds: cmds.zip(cmds0).map(|(a, b)| a - b),
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let secs = if quick { 4 } else { 10 };
    let slots = 3 * CAP;
    let capacity_rps = f64::from(slots) * 1000.0 / f64::from(LATENCY_MS);
    println!(
        "cluster: 3 gateways x 2 workers, 3 nodes capped at {CAP} in flight, {LATENCY_MS} ms each \
         ({slots} slots, {capacity_rps:.0} req/s), {secs} s per run"
    );
    println!(
        "{:<6} {:<10} {:>8} {:>9} {:>12} {:>10} {:>9} {:>14}",
        "load", "contender", "clients", "success", "node 429/req", "tries/req", "goodput", "redis cmd/req"
    );
    for (load, factor) in [("80%", 0.8), ("1.5x", 1.5)] {
        let clients = (f64::from(slots) * factor).round() as usize;
        for (contender, cluster) in [("alone", false), ("cluster", true)] {
            let o = run(
                &format!("{load}-{contender}").replace('%', "pct"),
                cluster,
                clients,
                secs,
            );
            let per = |n: u64| n as f64 / o.requests.max(1) as f64;
            println!(
                "{:<6} {:<10} {:>8} {:>8.1}% {:>12.3} {:>10.2} {:>8.1}% {:>14}",
                load,
                contender,
                clients,
                100.0 * per(o.ok),
                per(o.node_429),
                per(o.tries),
                100.0 * o.ok as f64 / o.secs / capacity_rps,
                o.redis_cmds.map_or("-".to_string(), |c| format!("{:.2}", per(c)))
            );
        }
    }
}
