//! Cluster mode's budgets and headroom end to end (docs/cluster.md, "Token and
//! request budgets" and "Provider headroom"): three nginx gateways (2 workers each,
//! the demo template) in front of mock nodes, with and without a `cluster` section (a
//! real `redis-server` that the test starts).
//!
//! Run with `make build` then `RSB_LUA_SO=$PWD/build/lib/rsbalancer.so cargo test
//! --no-default-features --test nginx_fleet_budgets -- --test-threads=1`. They need
//! nginx with lua-nginx-module and redis-server, and fail (never skip) without them.
//!
//! No assertion depends on how long something took: each waits for a state and gives
//! up only after a generous bound, when something is broken. The budget's bound is
//! the documented one, counted in requests from how the clients pace themselves.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::fleet::{metric, pool_node, start_three, GATEWAYS};
use support::redis::Redis;
use support::*;

const PATIENCE: Duration = Duration::from_secs(30);
/// Node a's request budget per minute.
const RPM: u64 = 30;
/// Sequential clients per gateway.
const CLIENTS: usize = 2;
/// Requests each client sends.
const REQUESTS: usize = 30;
/// The mock's latency (ms): each client has at most one request in flight, so it
/// reserves at most one try per `LATENCY_MS` (refusals take no reservation).
const LATENCY_MS: u32 = 100;
const SYNC_MS: u32 = 100;
/// The documented bound: the fleet's window passes the budget by at most what the
/// other gateways reserve within two sync intervals, plus one request per gateway.
/// Each gateway's clients reserve at most `CLIENTS * (2 * SYNC_MS / LATENCY_MS + 1)`
/// in two intervals; counted for all three gateways (a little more than the others'
/// part at any one).
const SLACK: u64 =
    (GATEWAYS.len() * CLIENTS * (2 * SYNC_MS / LATENCY_MS + 1) as usize + GATEWAYS.len()) as u64;

fn config(redis: Option<&Redis>, gateway: &str, nodes: Vec<Value>) -> Value {
    let mut c = json!({
        "pools": { "llm": { "algorithm": "round_robin", "nodes": nodes, "slow_start_ms": 0 } }
    });
    if let Some(r) = redis {
        c["cluster"] = json!({
            "redis": format!("redis://127.0.0.1:{}", r.port), "sync_ms": SYNC_MS, "gateway": gateway
        });
    }
    c
}

fn received(m: &MockNode) -> u64 {
    get(m.port, "/mock/state").json()["received"]
        .as_u64()
        .expect("received")
}

fn chat(g: &Gateway, max_tokens: u32) -> Response {
    let body = format!(
        r#"{{"model":"mock-llm","max_tokens":{max_tokens},"messages":[{{"role":"user","content":"Say hello."}}]}}"#
    );
    post(g.port, "/v1/chat/completions", &body)
}

struct Fleet {
    gws: Vec<Gateway>,
    nodes: Vec<MockNode>,
    _mocks: Nginx,
    _dirs: Vec<TestDir>,
    redis: Option<Redis>,
}

/// Mock nodes (`LATENCY_MS`) with their extra config fields (`tpm`, `rpm`), and three
/// gateways A, B, C, in a fleet over a Redis of their own when `cluster`.
fn fleet(name: &str, cluster: bool, nodes: &[(&str, Value)]) -> Fleet {
    let redis = cluster.then(Redis::start);
    let mdir = TestDir::new(&format!("fleetwin-mocks-{name}"));
    let mocks: Vec<MockNode> = nodes.iter().map(|(n, _)| MockNode::new(n, LATENCY_MS)).collect();
    let nginx = start_mocks(&mdir, &mocks);
    let entries: Vec<Value> = mocks
        .iter()
        .zip(nodes)
        .map(|(m, (_, extra))| {
            let mut n = json!({ "id": m.name, "addr": m.addr() });
            if let Value::Object(e) = extra {
                for (k, v) in e {
                    n[k] = v.clone();
                }
            }
            n
        })
        .collect();
    let (gws, mut dirs) = start_three(&format!("fleetwin-{name}"), cluster, PATIENCE, |g| {
        config(redis.as_ref(), g, entries.clone())
    });
    dirs.push(mdir);
    Fleet {
        gws,
        nodes: mocks,
        _mocks: nginx,
        _dirs: dirs,
        redis,
    }
}

/// `REQUESTS` requests from each of `CLIENTS` sequential clients per gateway, all at
/// once. Returns the statuses.
fn load(f: &Fleet) -> Vec<u16> {
    let ports: Vec<u16> = f
        .gws
        .iter()
        .flat_map(|g| std::iter::repeat_n(g.port, CLIENTS))
        .collect();
    run_parallel(ports.len(), ports.len(), |i| {
        (0..REQUESTS)
            .map(|_| post(ports[i], "/v1/chat/completions", CHAT_BODY).status)
            .collect::<Vec<u16>>()
    })
    .concat()
}

/// The requests node a took from the whole fleet under [`load`], within one window
/// (the load takes a few seconds; a window is 60 s).
fn fleet_total(f: &Fleet) -> u64 {
    let statuses = load(f);
    assert!(
        statuses.iter().all(|&s| s == 200 || s == 429 || s == 503),
        "{statuses:?}"
    );
    let a = received(&f.nodes[0]);
    eprintln!(
        "node a took {a} requests (rpm {RPM}, slack {SLACK}); {} answered 200",
        statuses.iter().filter(|&&s| s == 200).count()
    );
    a
}

#[test]
fn gateways_alone_spend_the_budget_once_each() {
    let f = fleet("alone", false, &[("a", json!({ "rpm": RPM }))]);
    let total = fleet_total(&f);
    assert!(
        total > RPM + SLACK,
        "three gateways alone kept node a at {total} <= {} requests",
        RPM + SLACK
    );
}

#[test]
fn the_fleet_counts_one_budget() {
    let f = fleet("shared", true, &[("a", json!({ "rpm": RPM }))]);
    let total = fleet_total(&f);
    assert!(
        total <= RPM + SLACK,
        "the fleet sent node a {total} requests in one window (rpm {RPM}, bound {SLACK} over)"
    );
    assert!(total >= RPM, "the budget was not spent: {total}");
    // Every gateway sees the others' part of the window.
    for g in &f.gws {
        wait_until(PATIENCE, "the others' use at a gateway", || {
            pool_node(g, "a")["fleet_budget_requests"]
                .as_u64()
                .is_some_and(|r| r > 0)
        });
        assert!(metric(g, "rsbalancer_node_fleet_budget_requests").is_some());
    }
}

/// Sends small requests through `g` until `m` has received one more than `before`.
fn until_received(g: &Gateway, m: &MockNode, before: u64) {
    wait_until(PATIENCE, &format!("{} to receive a request", m.name), || {
        let r = chat(g, 10);
        assert_eq!(r.status, 200, "{}", r.text());
        received(m) > before
    });
}

#[test]
fn a_node_out_of_requests_at_one_gateway_is_skipped_by_all_until_its_reset() {
    let f = fleet("zero", true, &[("a", Value::Null), ("b", Value::Null)]);
    let (a, gws) = (&f.nodes[0], &f.gws);
    // a says "no request left, reset in 8 s" (x-ratelimit-reset-requests: 8.000s).
    mock_set(
        a,
        "limit_style=openai&rpm_limit=1000&tpm_limit=1000000&hdr_remaining_requests=0&hdr_reset_requests=%2B8",
    );
    until_received(&gws[0], a, 0);
    mock_set(a, "hdr_remaining_requests=");
    let seen = received(a);
    for g in &gws[1..] {
        wait_until(PATIENCE, "the record at B and C", || {
            pool_node(g, "a")["remaining_requests"] == 0
        });
    }
    for _ in 0..10 {
        for g in &gws[1..] {
            let r = chat(g, 10);
            assert_eq!(r.status, 200, "{}", r.text());
        }
    }
    assert_eq!(received(a), seen, "a try reached a before its reset");
    // After the reset a is used again, from B.
    until_received(&gws[1], a, seen);
}

#[test]
fn too_few_tokens_at_one_gateway_skip_big_requests_at_all() {
    let f = fleet("tokens", true, &[("a", Value::Null), ("b", Value::Null)]);
    let (a, gws) = (&f.nodes[0], &f.gws);
    mock_set(
        a,
        "limit_style=openai&rpm_limit=1000&tpm_limit=1000000&hdr_remaining_tokens=400&hdr_reset_tokens=%2B60",
    );
    until_received(&gws[0], a, 0);
    for g in &gws[1..] {
        wait_until(PATIENCE, "the record at B and C", || {
            pool_node(g, "a")["remaining_tokens"]
                .as_u64()
                .is_some_and(|t| t <= 400)
        });
    }
    let seen = received(a);
    // About 25 prompt tokens + 2000: more than a's 400. No cooldown here: only the
    // record keeps them off a.
    for _ in 0..10 {
        for g in &gws[1..] {
            let r = chat(g, 2_000);
            assert_eq!(r.status, 200, "{}", r.text());
        }
    }
    assert_eq!(received(a), seen, "a big request reached a");
    // Small ones still do, at B and at C.
    until_received(&gws[1], a, seen);
    until_received(&gws[2], a, received(a));
}

#[test]
fn redis_killed_fails_no_request_and_each_gateway_goes_on_alone() {
    let mut f = fleet(
        "redis",
        true,
        &[("a", json!({ "rpm": 100_000, "tpm": 100_000_000 }))],
    );
    let ports: Vec<u16> = f.gws.iter().map(|g| g.port).collect();
    let send = |n: usize| -> Vec<(u16, u16)> {
        (0..n)
            .map(|i| {
                (
                    ports[i % 3],
                    post(ports[i % 3], "/v1/chat/completions", CHAT_BODY).status,
                )
            })
            .filter(|&(_, s)| s != 200)
            .collect()
    };
    assert_eq!(send(30), vec![], "requests failed with Redis up");
    let others = |g: &Gateway| pool_node(g, "a")["fleet_budget_requests"].as_u64();
    for g in &f.gws {
        wait_until(PATIENCE, "the others' use at each gateway", || {
            others(g).is_some_and(|r| r > 0)
        });
    }
    let failed = std::thread::scope(|s| {
        let load = s.spawn(|| send(60));
        std::thread::sleep(Duration::from_millis(300));
        f.redis.as_mut().expect("redis").kill();
        load.join().unwrap()
    });
    assert_eq!(failed, vec![], "requests failed while Redis went away");
    for g in &f.gws {
        wait_until(PATIENCE, "each gateway alone", || {
            metric(g, "rsbalancer_cluster_up") == Some(0.0) && others(g).is_none()
        });
    }
    let before: Vec<u64> = f
        .gws
        .iter()
        .map(|g| pool_node(g, "a")["budget_requests_used"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(send(30), vec![], "requests failed with Redis down");
    for (g, b) in f.gws.iter().zip(before) {
        let now = pool_node(g, "a")["budget_requests_used"].as_u64().unwrap_or(0);
        assert!(now > b, "the gateway counts its own window alone: {b} -> {now}");
    }
}
