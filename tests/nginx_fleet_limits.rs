//! Cluster mode's concurrency shares end to end: three nginx gateways (2 workers each,
//! the demo template) in front of one mock node that takes 10 concurrent requests and
//! answers 429 beyond, with and without a `cluster` section (a real `redis-server`
//! that the test starts).
//!
//! Run with `make build` then `RSB_LUA_SO=$PWD/build/lib/rsbalancer.so cargo test
//! --no-default-features --test nginx_fleet_limits -- --test-threads=1`. They need
//! nginx with lua-nginx-module and redis-server, and fail (never skip) without them.
//!
//! No assertion depends on how long something took: each waits for a state and gives
//! up only after a generous bound, when something is broken.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::{json, Value};
use support::fleet::{metric, pool_node, start_three};
use support::redis::Redis;
use support::*;

const PATIENCE: Duration = Duration::from_secs(30);
/// The node's capacity: its 11th concurrent request gets 429.
const CAP: u64 = 10;
/// Client threads per gateway.
const CLIENTS: usize = 8;

fn config(redis: Option<&Redis>, gateway: &str, node: &MockNode) -> Value {
    let mut c = json!({
        "pools": { "llm": {
            "algorithm": "p2c_ewma",
            "nodes": [{ "id": "a", "addr": node.addr(), "weight": 10 }],
            "slow_start_ms": 0
        } }
    });
    if let Some(r) = redis {
        c["cluster"] = json!({
            "redis": format!("redis://127.0.0.1:{}", r.port), "sync_ms": 100, "gateway": gateway
        });
    }
    c
}

fn mock_state(m: &MockNode) -> Value {
    get(m.port, "/mock/state").json()
}

struct Fleet {
    gws: Vec<Gateway>,
    node: MockNode,
    _mocks: Nginx,
    _dirs: Vec<TestDir>,
    _redis: Option<Redis>,
}

/// The fleet's slack: its AIMD probe (one try above the limit learned).
const PROBES: u64 = 1;

/// Node a (latency 100 ms, `CAP` concurrent requests, refusals after 50 ms) and three gateways A, B, C, in
/// a fleet over a Redis of their own when `cluster`.
fn fleet(name: &str, cluster: bool) -> Fleet {
    let redis = cluster.then(Redis::start);
    let mdir = TestDir::new(&format!("fleetcap-mocks-{name}"));
    let mut node = MockNode::new("a", 100);
    node.max_conc = CAP as u32;
    let mocks = start_mocks(&mdir, std::slice::from_ref(&node));
    // A refusal takes 50 ms: tries sent beyond the limit stay in flight a while.
    mock_set(&node, "busy_ms=50");
    let (gws, mut dirs) = start_three(&format!("fleetcap-{name}"), cluster, PATIENCE, |g| {
        config(redis.as_ref(), g, &node)
    });
    dirs.push(mdir);
    Fleet {
        gws,
        node,
        _mocks: mocks,
        _dirs: dirs,
        _redis: redis,
    }
}

/// `rounds` requests from each of `CLIENTS` clients per gateway at `ports`, all at
/// once; a client whose request was refused waits 20 ms before its next one.
/// Returns how many got 200.
fn load(ports: &[u16], rounds: usize) -> usize {
    let clients: Vec<u16> = ports
        .iter()
        .flat_map(|&p| std::iter::repeat_n(p, CLIENTS))
        .collect();
    let ok = run_parallel(clients.len(), clients.len(), |i| {
        let mut ok = 0;
        for _ in 0..rounds {
            // A gateway killed under load drops its clients' connections.
            let r = http(clients[i], "POST", "/v1/chat/completions", Some(CHAT_BODY));
            if r.is_ok_and(|r| r.status == 200) {
                ok += 1;
            } else {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        ok
    });
    ok.iter().sum()
}

/// The most requests node a had in flight at once after the gateways learned its
/// limit: a first load to learn it, then the peak of a second.
fn learned_peak(f: &Fleet) -> u64 {
    let ports: Vec<u16> = f.gws.iter().map(|g| g.port).collect();
    assert!(load(&ports, 25) > 0, "nothing served while learning");
    mock_set(&f.node, "reset_peak=1");
    let before = mock_state(&f.node)["rejected"].as_u64().unwrap();
    assert!(load(&ports, 25) > 0, "nothing served");
    let s = mock_state(&f.node);
    eprintln!(
        "peak {} rejected while measuring {}; limits {:?}",
        s["peak_inflight"],
        s["rejected"].as_u64().unwrap() - before,
        f.gws
            .iter()
            .map(|g| (
                pool_node(g, "a")["limit"].clone(),
                pool_node(g, "a")["fleet_share"].clone()
            ))
            .collect::<Vec<_>>()
    );
    s["peak_inflight"].as_u64().expect("peak_inflight")
}

#[test]
fn three_gateways_without_a_cluster_overshoot_the_nodes_limit() {
    let f = fleet("alone", false);
    let peak = learned_peak(&f);
    assert!(
        peak > CAP,
        "three gateways learning alone kept node a at {peak} <= {CAP} concurrent requests"
    );
}

#[test]
fn the_fleet_shares_the_nodes_limit_and_stays_within_it() {
    let f = fleet("shared", true);
    let peak = learned_peak(&f);
    assert!(
        peak <= CAP + PROBES,
        "the fleet sent node a {peak} concurrent requests (limit {CAP})"
    );
    for g in &f.gws {
        let a = pool_node(g, "a");
        assert!(a["fleet_share"].is_u64(), "no share at a gateway: {a}");
        assert!(metric(g, "rsbalancer_node_fleet_share").is_some());
    }
}

#[test]
fn a_gateway_killed_leaves_no_share_behind_after_its_lease() {
    let f = fleet("kill", true);
    let ports: Vec<u16> = f.gws.iter().map(|g| g.port).collect();
    assert!(load(&ports, 10) > 0, "nothing served while learning");
    let stop = AtomicBool::new(false);
    let share = |n: &Value| n["fleet_share"].as_u64();
    let limit = |n: &Value| n["fleet_limit"].as_f64().unwrap_or(0.0).floor() as u64;
    /// Stops the load when dropped, also when an assertion below fails (the scope
    /// would otherwise wait for the load thread forever).
    struct Stop<'a>(&'a AtomicBool);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    std::thread::scope(|s| {
        let _stop = Stop(&stop);
        // Load through all three; C is killed under it, holding a share and tries.
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                load(&ports, 2);
            }
        });
        let c = &f.gws[2];
        wait_until(PATIENCE, "C to hold a share with tries in flight", || {
            let n = pool_node(c, "a");
            share(&n).is_some_and(|s| s > 0) && n["inflight"].as_u64().is_some_and(|i| i > 0)
        });
        for pid in std::iter::once(c.nginx.pid()).chain(c.nginx.workers()) {
            signal(pid, libc::SIGKILL);
        }
        let (a, b) = (&f.gws[0], &f.gws[1]);
        let mut last = Value::Null;
        wait_until(PATIENCE, "A's and B's shares to add up to the limit", || {
            let (na, nb) = (pool_node(a, "a"), pool_node(b, "a"));
            let whole = limit(&na) > 0
                && limit(&na) == limit(&nb)
                && share(&na)
                    .zip(share(&nb))
                    .is_some_and(|(x, y)| x + y == limit(&na));
            last = json!([na, nb]);
            whole
        });
        eprintln!("after C's lease: {last}");
        stop.store(true, Ordering::Relaxed);
    });
}
