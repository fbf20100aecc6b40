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
use support::fleet::{metric, start_three};
use support::redis::Redis;
use support::webhook::Receiver;
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

fn received(m: &MockNode) -> u64 {
    get(m.port, "/mock/state").json()["received"]
        .as_u64()
        .expect("received")
}

/// Three mock nodes a, b, c (`latency_ms` each) and three gateways A, B, C in separate
/// directories (each its own nginx, region and logs) sharing `redis`, all in the fleet.
struct Fleet {
    gws: Vec<Gateway>,
    nodes: Vec<MockNode>,
    _mocks: Nginx,
    _dirs: Vec<TestDir>,
    redis: Redis,
}

fn fleet(name: &str, latency_ms: u32) -> Fleet {
    fleet_with(name, latency_ms, |_| {})
}

/// [`fleet`] with each gateway's config passed through `edit`.
fn fleet_with(name: &str, latency_ms: u32, edit: impl Fn(&mut Value)) -> Fleet {
    let redis = Redis::start();
    let mdir = TestDir::new(&format!("cluster-mocks-{name}"));
    let nodes: Vec<MockNode> = ["a", "b", "c"]
        .iter()
        .map(|n| MockNode::new(n, latency_ms))
        .collect();
    let mocks = start_mocks(&mdir, &nodes);
    let refs: Vec<&MockNode> = nodes.iter().collect();
    let (gws, mut dirs) = start_three(&format!("cluster-{name}"), true, PATIENCE, |g| {
        let mut c = config(&redis, g, &refs);
        edit(&mut c);
        c
    });
    dirs.push(mdir);
    Fleet {
        gws,
        nodes,
        _mocks: mocks,
        _dirs: dirs,
        redis,
    }
}

#[test]
fn a_quota_429_at_one_gateway_cools_the_node_at_all() {
    let f = fleet("cool", 10);
    let (gws, b) = (&f.gws, &f.nodes[1]);

    // Node b's quota is spent: 429 with Retry-After 30 s. Only gateway A sends to it.
    mock_set(b, "fail=429&retry_after=30");
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
    mock_set(b, "fail=");
    let before = received(b);
    for g in &gws[1..] {
        for _ in 0..30 {
            let r = g.chat();
            assert_eq!(r.status, 200, "{}", r.text());
            assert_ne!(r.header("X-Node"), Some("b"));
        }
    }
    assert_eq!(received(b), before, "B or C sent a try to the node A saw cooling");
    for g in &gws[1..] {
        assert!(metric(g, "rsbalancer_cluster_cooldowns_in_total").unwrap_or(0.0) >= 1.0);
    }
}

#[test]
fn a_weight_set_at_one_gateway_is_used_by_all_and_survives_a_reload() {
    let f = fleet("weight", 10);
    let gws = &f.gws;

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
    let mut f = fleet("redis", 20);
    let ports: Vec<u16> = f.gws.iter().map(|g| g.port).collect();

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
    f.redis.kill();
    for g in &f.gws {
        wait_until(PATIENCE, "the gateway to see Redis down", || {
            metric(g, "rsbalancer_cluster_up") == Some(0.0)
        });
    }
    // An admin change while Redis is away is kept, and shared when it returns.
    assert_eq!(f.gws[0].set_weight("a", 33).status, 200);
    let failed = load.join().unwrap();
    assert!(
        failed.is_empty(),
        "requests failed while Redis was down: {failed:?}"
    );
    for g in &f.gws {
        assert!(
            g.nginx.error_log().contains("Redis unreachable"),
            "no log line of the outage"
        );
    }

    f.redis.restart();
    for g in &f.gws {
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

fn emergency_active(g: &Gateway) -> bool {
    status(g)["pools"]["llm"]["emergency"]["active"] == true
}

/// Sends chat requests to the gateways in turn until `cond` holds; panics after a
/// generous bound.
fn drive_fleet(gws: &[Gateway], what: &str, mut cond: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    for i in 0.. {
        gws[i % gws.len()].chat();
        if i % gws.len() == gws.len() - 1 && cond() {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "timed out waiting for {what}\n{}",
            gws[0].nginx.diagnostics()
        );
    }
}

/// The overload detector judges the fleet's counts, and the fleet sends exactly one
/// alert per transition: 15 refused requests at each of three gateways (2 workers
/// each, each running the detector; one try per request) are too few for any gateway
/// alone (`min_requests` 40) and enough for the fleet: it enters emergency with one
/// "enter" alert naming the three gateways whose counts it summed, every gateway
/// follows, and the recovery leaves it with one "exit" alert.
#[test]
fn the_fleet_enters_and_leaves_emergency_with_one_alert_per_transition() {
    let hook = Receiver::start(0);
    let url = hook.url();
    let f = fleet_with("emergency", 5, |c| {
        let p = &mut c["pools"]["llm"];
        p["window_ms"] = json!(5000);
        p["retry"] = json!({ "max_tries": 1, "rounds": 0 });
        p["limit"] = json!({ "enabled": false });
        p["cooldown"] = json!({ "base_ms": 200, "max_ms": 1000 });
        p["emergency"] = json!({
            "enter_busy_ratio": 0.5, "exit_busy_ratio": 0.1, "min_requests": 40,
            "healthy_window_ms": 2000,
            "webhooks": [{ "url": url, "timeout_ms": 2000, "retries": 3, "min_interval_ms": 0 }]
        });
    });
    let gws = &f.gws;

    for m in &f.nodes {
        mock_set(m, "fail=429");
    }
    drive_fleet(gws, "every gateway in emergency", || {
        gws.iter().all(emergency_active)
    });
    std::thread::sleep(Duration::from_millis(3_500)); // ticks enough for a duplicate
    let enters = hook.events("enter");
    assert_eq!(enters.len(), 1, "enter alerts: {:?}", hook.hits());
    let e = &enters[0];
    assert_eq!(e["fleet_gateways"], 3, "{e}");
    assert!(
        e["reason"].as_str().unwrap().starts_with("fleet busy ratio"),
        "{e}"
    );
    // 45 offered in all (one try per request), at most 15 at any gateway.
    let offered = e["counts"]["requests"].as_u64().unwrap() + e["counts"]["shed"].as_u64().unwrap();
    assert!((40..=45).contains(&offered), "{e}");

    for m in &f.nodes {
        mock_set(m, "fail=");
    }
    drive_fleet(gws, "every gateway out of emergency", || {
        gws.iter().all(|g| !emergency_active(g))
    });
    std::thread::sleep(Duration::from_millis(3_500));
    let exits = hook.events("exit");
    assert_eq!(exits.len(), 1, "exit alerts: {:?}", hook.hits());
    assert_eq!(exits[0]["fleet_gateways"], 3, "{}", exits[0]);
    assert_eq!(hook.events("enter").len(), 1, "alerts: {:?}", hook.hits());
    let lines: usize = gws
        .iter()
        .map(|g| {
            g.nginx
                .error_log()
                .matches("rsbalancer: pool llm entered emergency mode")
                .count()
        })
        .sum();
    assert_eq!(lines, 1, "one gateway logs the fleet's entry");
}

fn canary_share(g: &Gateway) -> Option<f64> {
    status(g)["pools"]["llm"]["canary_share"].as_f64()
}

/// A canary share set by hand at one gateway (the admin API) is the fleet's: B and C
/// send the same share to the canary, and C keeps it through its reload.
#[test]
fn a_canary_share_set_at_one_gateway_is_the_fleets() {
    let f = fleet_with("canary", 5, |c| {
        let addr = c["pools"]["llm"]["nodes"][2]["addr"].clone();
        c["pools"]["llm"]["canary"] = json!({ "pool": "llm_canary", "share": 0 });
        c["pools"]["llm_canary"] = json!({ "nodes": [{ "id": "k", "addr": addr }], "slow_start_ms": 0 });
    });
    let gws = &f.gws;
    for g in gws {
        assert_eq!(canary_share(g), Some(0.0), "{}", status(g));
    }
    let r = http(
        gws[0].port,
        "PUT",
        "/rsbalancer/pools/llm/canary",
        Some(r#"{"share": 0.25}"#),
    )
    .expect("admin request");
    assert_eq!(r.status, 200, "{}", r.text());
    for g in &gws[1..] {
        wait_until(PATIENCE, "the fleet's canary share", || {
            canary_share(g) == Some(0.25)
        });
    }
    let old = gws[2].nginx.workers();
    gws[2].nginx.signal(libc_sighup());
    gws[2].nginx.wait_workers(2, &old);
    std::thread::sleep(Duration::from_millis(500));
    wait_until(PATIENCE, "C's canary share after its reload", || {
        canary_share(&gws[2]) == Some(0.25)
    });
}
