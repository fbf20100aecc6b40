//! Cluster mode end to end: three nginx gateways (2 workers each, the demo template)
//! in front of the same mock LLM nodes, sharing one view through a real
//! `redis-server` that the test starts (`support::redis`).
//!
//! Run with `make build` then `RSB_LUA_SO=$PWD/build/lib/rsbalancer.so cargo test
//! --no-default-features --test nginx_cluster -- --test-threads=1`. They need nginx with
//! lua-nginx-module and redis-server, and fail (never skip) without them.
//!
//! No assertion depends on how long something took: each waits for a state and gives
//! up only after a generous bound, when something is broken.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::redis::Redis;
use support::*;

const PATIENCE: Duration = Duration::from_secs(20);

fn config(redis: &Redis, gateway: &str, nodes: &[&MockNode]) -> Value {
    let nodes: Vec<Value> = nodes
        .iter()
        .zip(["a", "b", "c"])
        .map(|(m, id)| json!({ "id": id, "addr": m.addr(), "weight": 10 }))
        .collect();
    json!({
        "cluster": { "redis": format!("redis://127.0.0.1:{}", redis.port), "sync_ms": 100, "gateway": gateway },
        "pools": { "llm": { "algorithm": "p2c_ewma", "nodes": nodes, "slow_start_ms": 0 } }
    })
}

fn status(g: &Gateway) -> Value {
    let r = get(g.port, "/rsbalancer/status");
    assert_eq!(r.status, 200, "status: {}", r.text());
    r.json()
}

fn node_state(g: &Gateway, id: &str) -> String {
    let s = status(g);
    let nodes = s["pools"]["llm"]["nodes"].as_array().expect("nodes").clone();
    let n = nodes.iter().find(|n| n["id"] == id).expect("node");
    n["state"].as_str().unwrap_or("").to_string()
}

fn metric(g: &Gateway, name: &str) -> Option<f64> {
    let text = get(g.port, "/metrics").text();
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

fn received(m: &MockNode) -> u64 {
    get(m.port, "/mock/state").json()["received"]
        .as_u64()
        .expect("received")
}

/// Three gateways in separate directories (each its own nginx, region and logs).
fn fleet(redis: &Redis, nodes: &[&MockNode]) -> (Vec<TestDir>, Vec<Gateway>) {
    let dirs: Vec<TestDir> = ["A", "B", "C"]
        .iter()
        .map(|g| TestDir::new(&format!("cluster-{g}")))
        .collect();
    let gws: Vec<Gateway> = dirs
        .iter()
        .zip(["A", "B", "C"])
        .map(|(d, name)| start_gateway(d, &config(redis, name, nodes)))
        .collect();
    for g in &gws {
        wait_until(PATIENCE, "the gateway in a fleet of 3", || {
            metric(g, "rsbalancer_cluster_gateways") == Some(3.0)
                && metric(g, "rsbalancer_cluster_up") == Some(1.0)
        });
    }
    (dirs, gws)
}

#[test]
fn a_quota_429_at_one_gateway_cools_the_node_at_all() {
    let redis = Redis::start();
    let mdir = TestDir::new("cluster-mocks-1");
    let (a, b, c) = (
        MockNode::new("a", 10),
        MockNode::new("b", 10),
        MockNode::new("c", 10),
    );
    let _mocks = start_mocks(&mdir, &[a.clone(), b.clone(), c.clone()]);
    let (_dirs, gws) = fleet(&redis, &[&a, &b, &c]);

    // Node b's quota is spent: 429 with Retry-After 30 s. Only gateway A sends to it.
    mock_set(&b, "fail=429&retry_after=30");
    wait_until(PATIENCE, "A to see b's quota 429", || {
        let r = gws[0].chat();
        assert_eq!(r.status, 200, "A's client got {}: {}", r.status, r.text());
        node_state(&gws[0], "b") == "cooling"
    });
    for g in &gws[1..] {
        wait_until(PATIENCE, "the fleet's cooldown of b", || {
            node_state(g, "b") == "cooling"
        });
    }
    // b is fine again, but B and C know it cools: none of their tries goes to it.
    mock_set(&b, "fail=");
    let before = received(&b);
    for g in &gws[1..] {
        for _ in 0..30 {
            let r = g.chat();
            assert_eq!(r.status, 200, "{}", r.text());
            assert_ne!(r.header("X-Node"), Some("b"));
        }
    }
    assert_eq!(
        received(&b),
        before,
        "B or C sent a try to the node A saw cooling"
    );
    for g in &gws[1..] {
        assert!(metric(g, "rsbalancer_cluster_cooldowns_in_total").unwrap_or(0.0) >= 1.0);
    }
}

#[test]
fn a_weight_set_at_one_gateway_is_used_by_all_and_survives_a_reload() {
    let redis = Redis::start();
    let mdir = TestDir::new("cluster-mocks-2");
    let (a, b, c) = (
        MockNode::new("a", 10),
        MockNode::new("b", 10),
        MockNode::new("c", 10),
    );
    let _mocks = start_mocks(&mdir, &[a.clone(), b.clone(), c.clone()]);
    let (_dirs, gws) = fleet(&redis, &[&a, &b, &c]);

    let r = gws[0].set_weight("c", 77);
    assert_eq!(r.status, 200, "{}", r.text());
    wait_until(PATIENCE, "C to use A's weight", || {
        stat(&gws[2].stats(), "c", "weight") == 77
    });

    // C reloads its (unchanged) file, which says 10: the fleet's 77 comes back.
    let old = gws[2].nginx.workers();
    gws[2].nginx.signal(libc_sighup());
    gws[2].nginx.wait_workers(2, &old);
    wait_until(PATIENCE, "C's weight after its reload", || {
        stat(&gws[2].stats(), "c", "weight") == 77
    });
}

#[test]
fn redis_killed_under_load_fails_no_request_and_the_fleet_resyncs() {
    let mut redis = Redis::start();
    let mdir = TestDir::new("cluster-mocks-3");
    let (a, b, c) = (
        MockNode::new("a", 20),
        MockNode::new("b", 20),
        MockNode::new("c", 20),
    );
    let _mocks = start_mocks(&mdir, &[a.clone(), b.clone(), c.clone()]);
    let (_dirs, gws) = fleet(&redis, &[&a, &b, &c]);
    let ports: Vec<u16> = gws.iter().map(|g| g.port).collect();

    let load = std::thread::spawn(move || {
        let mut failed = Vec::new();
        for i in 0..300 {
            let r = post(ports[i % 3], "/v1/chat/completions", CHAT_BODY);
            if r.status != 200 {
                failed.push((ports[i % 3], r.status, r.text()));
            }
        }
        failed
    });
    std::thread::sleep(Duration::from_millis(300));
    redis.kill();
    for g in &gws {
        wait_until(PATIENCE, "the gateway to see Redis down", || {
            metric(g, "rsbalancer_cluster_up") == Some(0.0)
        });
    }
    // An admin change while Redis is away is kept, and shared when it returns.
    assert_eq!(gws[0].set_weight("a", 33).status, 200);
    let failed = load.join().unwrap();
    assert!(
        failed.is_empty(),
        "requests failed while Redis was down: {failed:?}"
    );
    for g in &gws {
        assert!(
            g.nginx.error_log().contains("Redis unreachable"),
            "no log line of the outage"
        );
    }

    redis.restart();
    for g in &gws {
        wait_until(PATIENCE, "the gateway to see Redis back", || {
            metric(g, "rsbalancer_cluster_up") == Some(1.0)
        });
        wait_until(PATIENCE, "A's change made while Redis was down", || {
            stat(&g.stats(), "a", "weight") == 33
        });
    }
}

fn libc_sighup() -> i32 {
    1
}
