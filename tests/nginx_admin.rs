//! End-to-end tests of the admin API and status page (`lua/resty/rsbalancer/admin.lua`,
//! docs/api.md "Admin API", docs/operations.md "Status page") in real nginx with 2 workers, mounted as the demo
//! gateway mounts it (`location /rsbalancer/`), in front of mock LLM nodes.
//!
//! Run with `make build` then
//! `RSB_LUA_SO=$PWD/build/lib/rsbalancer.so cargo test --no-default-features --test
//! nginx_admin -- --test-threads=1`. Needs nginx with lua-nginx-module and Debian's
//! `chromium`; fails (never skips) without them.
//!
//! "Every worker sees it" is checked where the traffic lands: after each change a
//! burst of parallel requests is answered by both workers (X-Worker), and the node
//! that served each one (X-Node) and the mocks' own received counts show the change in
//! effect in both. No assertion is on elapsed time.
//!
//! A reload (`nginx -s reload`) puts the config file's nodes, weights and drains back.
//!
//! The status page test renders the page in headless Chromium (`--dump-dom`) while
//! the state is held still (tries held in flight on a slow node), compares every node
//! row with the admin JSON fetched just before and after, and saves a screenshot
//! (`target/screenshots/status.png`, path printed).

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;

/// One test at a time: loads and shares need the machine.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

const TOKEN: &str = "s3cret-admin-token-0123456789";

fn node(id: &str, m: &MockNode, weight: u32) -> Value {
    json!({ "id": id, "addr": m.addr(), "weight": weight })
}

/// Pool "llm" of `nodes`, weighted_random, slow start off (states and effective
/// weights do not move with the clock).
fn llm(nodes: Vec<Value>) -> Value {
    json!({ "algorithm": "weighted_random", "slow_start_ms": 0, "nodes": nodes })
}

/// An admin request with extra headers; panics on a transport error.
fn admin_with(
    g: &Gateway,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Response {
    http_with(g.port, method, path, headers, body).unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

fn admin(g: &Gateway, method: &str, path: &str, body: Option<&str>) -> Response {
    admin_with(g, method, path, &[], body)
}

/// An admin change that must succeed (200 or 201).
fn change(g: &Gateway, method: &str, path: &str, body: &str) -> Value {
    let r = admin(g, method, path, Some(body));
    assert!(
        r.status == 200 || r.status == 201,
        "{method} {path} {body}: {} {}",
        r.status,
        r.text()
    );
    r.json()
}

/// GET of the admin state (JSON).
fn state(g: &Gateway) -> Value {
    let r = admin_with(g, "GET", "/rsbalancer/", &[("Accept", "application/json")], None);
    assert_eq!(r.status, 200, "state: {}", r.text());
    r.json()
}

fn received(m: &MockNode) -> u64 {
    let st = get(m.port, "/mock/state").json();
    st["received"]
        .as_u64()
        .unwrap_or_else(|| panic!("no `received` in {st}"))
}

/// `n` chat completions from 8 threads, all of which must succeed: (X-Node, X-Worker).
fn burst(g: &Gateway, n: usize) -> Vec<(String, String)> {
    let out = run_parallel(n, 8, |_| {
        let r = g.chat();
        let h = |k: &str| r.header(k).unwrap_or("").to_string();
        (r.status, h("X-Node"), h("X-Worker"))
    });
    let bad: Vec<_> = out.iter().filter(|r| r.0 != 200).collect();
    assert!(
        bad.is_empty(),
        "{} of {n} failed, e.g. {:?}",
        bad.len(),
        bad.first()
    );
    out.into_iter().map(|(_, node, w)| (node, w)).collect()
}

/// Per worker: how many requests each node served. Panics unless both workers served.
fn by_worker(results: &[(String, String)], g: &Gateway) -> BTreeMap<String, BTreeMap<String, usize>> {
    let mut m: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    for (node, w) in results {
        *m.entry(w.clone()).or_default().entry(node.clone()).or_insert(0) += 1;
    }
    let workers: Vec<String> = g.nginx.workers().iter().map(|p| p.to_string()).collect();
    assert!(m.len() >= 2, "one worker served everything: {m:?}");
    for w in m.keys() {
        assert!(
            workers.contains(w),
            "X-Worker {w} is not a gateway worker ({workers:?})"
        );
    }
    m
}

/// Every worker sent at least `min_share` of its requests to `id`.
fn assert_worker_share(m: &BTreeMap<String, BTreeMap<String, usize>>, id: &str, min_share: f64) {
    for (w, nodes) in m {
        let total: usize = nodes.values().sum();
        let got = nodes.get(id).copied().unwrap_or(0);
        assert!(
            got as f64 >= min_share * total as f64,
            "worker {w}: {got} of {total} requests to {id}, expected at least {:.0}%: {nodes:?}",
            min_share * 100.0
        );
    }
}

fn assert_none_to(results: &[(String, String)], id: &str) {
    let n = results.iter().filter(|(node, _)| node == id).count();
    assert_eq!(n, 0, "{n} requests went to {id}");
}

/// The node `id` of pool "llm" in a state document.
fn node_state<'a>(st: &'a Value, id: &str) -> &'a Value {
    st["pools"]["llm"]["nodes"]
        .as_array()
        .and_then(|a| a.iter().find(|n| n["id"] == id))
        .unwrap_or_else(|| panic!("no node {id} in {st}"))
}

/// The admin state fetched until two different workers answered; all of them.
fn states_from_both_workers(g: &Gateway) -> Vec<Value> {
    let mut all = Vec::new();
    let mut workers = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let batch = run_parallel(16, 16, |_| {
            let r = admin_with(g, "GET", "/rsbalancer/", &[("Accept", "application/json")], None);
            assert_eq!(r.status, 200, "state: {}", r.text());
            (r.header("X-Worker").unwrap_or("").to_string(), r.json())
        });
        for (w, v) in batch {
            workers.insert(w);
            all.push(v);
        }
        if workers.len() >= 2 {
            return all;
        }
    }
    panic!("320 state requests were all answered by one worker");
}

/// Polls the state until `cond` holds; panics after 10 s.
fn wait_state(g: &Gateway, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let s = state(g);
        if cond(&s) {
            return s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}: {s}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn notices(g: &Gateway) -> Vec<String> {
    g.nginx
        .error_log()
        .lines()
        .filter(|l| l.contains("[notice]") && l.contains("rsbalancer admin: "))
        .map(str::to_string)
        .collect()
}

fn assert_notice(g: &Gateway, text: &str) {
    let n = notices(g);
    assert!(
        n.iter().any(|l| l.contains(text)),
        "no notice line with {text:?} in the error log; admin notices: {n:#?}"
    );
}

#[test]
fn admin_changes_reach_every_worker() {
    let _serial = serial();
    let dir = TestDir::new("admin-workers");
    let mocks = [
        MockNode::new("a", 5),
        MockNode::new("b", 5),
        MockNode::new("c", 5),
        MockNode::new("d", 5),
    ];
    let _m = start_mocks(&dir, &mocks);
    let cfg = json!({ "pools": { "llm": llm(vec![
        node("a", &mocks[0], 1), node("b", &mocks[1], 1), node("c", &mocks[2], 1)]) } });
    let g = start_gateway(&dir, &cfg);

    // Weight: a 10000, b and c 1. Expected share of a 99.98%; each worker >= 90%.
    let r = change(&g, "PUT", "/rsbalancer/pools/llm/nodes/a", r#"{"weight": 10000}"#);
    assert_eq!(r["weight"], json!(10000), "{r}");
    let m = by_worker(&burst(&g, 400), &g);
    eprintln!("after weight a=10000: {m:?}");
    assert_worker_share(&m, "a", 0.9);
    for st in states_from_both_workers(&g) {
        assert_eq!(node_state(&st, "a")["weight"], json!(10000));
    }
    assert_notice(
        &g,
        "weight of node a in pool llm set to 10000 (was 1) by 127.0.0.1",
    );

    // Drain b and c: every worker sends everything to a.
    change(&g, "PUT", "/rsbalancer/pools/llm/nodes/b", r#"{"drain": true}"#);
    change(
        &g,
        "PUT",
        "/rsbalancer/pools/llm/nodes/c",
        r#"{"drain": true, "weight": 3}"#,
    );
    let (rb, rc) = (received(&mocks[1]), received(&mocks[2]));
    let res = burst(&g, 200);
    by_worker(&res, &g);
    assert_none_to(&res, "b");
    assert_none_to(&res, "c");
    assert_eq!(
        (received(&mocks[1]), received(&mocks[2])),
        (rb, rc),
        "drained nodes got requests"
    );
    assert_notice(&g, "draining node c in pool llm by 127.0.0.1");
    let st = state(&g);
    assert_eq!(node_state(&st, "c")["state"], json!("draining"));
    assert_eq!(node_state(&st, "c")["weight"], json!(3));

    // A try in flight on a when a is drained finishes there; no new one starts on a.
    mock_set(&mocks[0], "latency_ms=3000");
    let slow = std::thread::spawn({
        let port = g.port;
        move || post(port, "/v1/chat/completions", CHAT_BODY)
    });
    wait_state(&g, "a try in flight on a", |s| {
        node_state(s, "a")["inflight"] == json!(1)
    });
    change(&g, "PUT", "/rsbalancer/pools/llm/nodes/b", r#"{"drain": false}"#);
    change(&g, "PUT", "/rsbalancer/pools/llm/nodes/a", r#"{"drain": true}"#);
    let ra = received(&mocks[0]);
    let res = burst(&g, 200);
    by_worker(&res, &g);
    assert!(
        res.iter().all(|(n, _)| n == "b"),
        "only b may serve now: {:?}",
        count(res.iter().map(|r| r.0.as_str()))
    );
    assert_eq!(received(&mocks[0]), ra, "drained node a got new requests");
    let done = slow.join().expect("slow request thread");
    assert_eq!(
        (done.status, done.header("X-Node")),
        (200, Some("a")),
        "{}",
        done.text()
    );
    mock_set(&mocks[0], "latency_ms=default");
    wait_state(&g, "a idle", |s| node_state(s, "a")["inflight"] == json!(0));

    // Add d with a high weight: every worker sends it nearly everything.
    let body = json!({ "id": "d", "addr": mocks[3].addr(), "weight": 10000 }).to_string();
    let r = admin(&g, "POST", "/rsbalancer/pools/llm/nodes", Some(&body));
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(
        (r.json()["id"].clone(), r.json()["weight"].clone()),
        (json!("d"), json!(10000))
    );
    let m = by_worker(&burst(&g, 400), &g);
    eprintln!("after adding d: {m:?}");
    assert_worker_share(&m, "d", 0.9);
    assert_notice(
        &g,
        &format!("added node d ({}, weight 10000) to pool llm", mocks[3].addr()),
    );
    // The other nodes kept their run-time weights and drains across the change.
    let st = state(&g);
    assert_eq!(node_state(&st, "a")["weight"], json!(10000));
    assert_eq!(node_state(&st, "a")["draining"], json!(true));

    // Remove d: no worker sends it anything more.
    let r = admin(&g, "DELETE", "/rsbalancer/pools/llm/nodes/d", None);
    assert_eq!(r.status, 200, "{}", r.text());
    let rd = received(&mocks[3]);
    let res = burst(&g, 200);
    by_worker(&res, &g);
    assert_none_to(&res, "d");
    assert_eq!(received(&mocks[3]), rd, "removed node d got requests");
    for st in states_from_both_workers(&g) {
        let ids: Vec<&str> = st["pools"]["llm"]["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["a", "b", "c"], "{st}");
    }
    assert_notice(&g, "removed node d from pool llm by 127.0.0.1");

    // The changes show in the old stats endpoint too (one shared region), and in
    // /metrics, whichever worker renders it.
    assert_eq!(stat(&g.stats(), "a", "weight"), 10000);
    for _ in 0..8 {
        let m = get(g.port, "/metrics");
        assert_eq!(m.status, 200, "{}", m.text());
        let text = m.text();
        for want in [
            r#"rsbalancer_node_weight{pool="llm",node="a",arm="primary"} 10000"#,
            r#"rsbalancer_node_state{pool="llm",node="a",arm="primary",state="draining"} 1"#,
            r#"rsbalancer_node_state{pool="llm",node="b",arm="primary",state="draining"} 0"#,
        ] {
            assert!(
                text.lines().any(|l| l == want),
                "/metrics lacks `{want}`:\n{}",
                text.lines()
                    .filter(|l| l.contains("node=\"a\"") || l.contains("node=\"b\""))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        assert!(!text.contains(r#"node="d""#), "removed node d still in /metrics");
    }
}

#[test]
fn bad_admin_input_is_refused_and_changes_nothing() {
    let _serial = serial();
    let dir = TestDir::new("admin-bad");
    let mocks = [MockNode::new("a", 5), MockNode::new("b", 5)];
    let _m = start_mocks(&dir, &mocks);
    // Exactly as many node slots as nodes: any addition finds the region full.
    let cfg = json!({
        "shm": { "max_nodes": 4, "max_pools": 4, "max_workers": 8, "config_bytes": 65536 },
        "pools": {
            // "solo" is llm's canary (share 0 until the end of the test).
            "llm": { "algorithm": "weighted_random", "slow_start_ms": 0, "canary": { "pool": "solo" },
                     "nodes": [node("a", &mocks[0], 30), node("b", &mocks[1], 50)] },
            "solo": llm(vec![node("s", &mocks[0], 1),
                             json!({ "id": "t", "addr": mocks[1].addr(), "backup": true })]),
        }
    });
    let g = start_gateway(&dir, &cfg);
    let before = state(&g);
    let big = format!(r#"{{"weight": 5, "pad": "{}"}}"#, "x".repeat(20_000));
    // One byte over the documented bound (16 KiB), in whitespace, without a bad key:
    // refused for its size alone.
    let over = padded(r#"{"weight": 5}"#, 16_385);
    let cases: Vec<(&str, &str, Option<&str>, u16, &str)> = vec![
        (
            "PUT",
            "pools/llm/nodes/a",
            Some(r#"{"weight": 0}"#),
            400,
            "weight: 0 is out of range 1..=10000",
        ),
        (
            "PUT",
            "pools/llm/nodes/a",
            Some(r#"{"weight": 2.5}"#),
            400,
            "weight: integer expected, got 2.5",
        ),
        (
            "PUT",
            "pools/llm/nodes/a",
            Some(r#"{"weight": "5"}"#),
            400,
            "weight: integer expected, got string",
        ),
        (
            "PUT",
            "pools/llm/nodes/a",
            Some(r#"{"weight": null}"#),
            400,
            "weight: integer expected, got null",
        ),
        // The valid weight is not applied when another key is bad.
        (
            "PUT",
            "pools/llm/nodes/a",
            Some(r#"{"weight": 5, "drain": "yes"}"#),
            400,
            "drain: boolean expected, got string",
        ),
        (
            "PUT",
            "pools/llm/nodes/a",
            Some(r#"{"weight": 5, "colour": 1}"#),
            400,
            "unknown key \"colour\" (allowed: drain, weight)",
        ),
        ("PUT", "pools/llm/nodes/a", Some("{}"), 400, "empty body"),
        (
            "PUT",
            "pools/llm/nodes/a",
            Some("[5]"),
            400,
            "body must be a JSON object",
        ),
        (
            "PUT",
            "pools/llm/nodes/a",
            Some(r#"{"weight": 5"#),
            400,
            "invalid JSON",
        ),
        (
            "PUT",
            "pools/llm/nodes/a",
            None,
            400,
            "a JSON object body is required",
        ),
        ("PUT", "pools/llm/nodes/a", Some(&big), 413, "over the limit"),
        (
            "PUT",
            "pools/llm/nodes/a",
            Some(&over),
            413,
            "over the limit of 16384",
        ),
        (
            "PUT",
            "pools/llm/nodes/a",
            Some(r#"{"weight": 5, "weight": 7}"#),
            400,
            "duplicate key \"weight\"",
        ),
        (
            "POST",
            "pools/llm/nodes",
            Some(r#"{"id": "x", "addr": "127.0.0.1:1", "id": "y"}"#),
            400,
            "duplicate key \"id\"",
        ),
        (
            "PUT",
            "pools/llm/emergency",
            Some(r#"{"mode": "on", "mode": "off"}"#),
            400,
            "duplicate key \"mode\"",
        ),
        (
            "PUT",
            "pools/llm/nodes/zz",
            Some(r#"{"weight": 5}"#),
            404,
            "unknown node \"zz\" in pool \"llm\"",
        ),
        (
            "PUT",
            "pools/nope/nodes/a",
            Some(r#"{"weight": 5}"#),
            404,
            "unknown pool \"nope\"",
        ),
        (
            "POST",
            "pools/llm/nodes",
            Some(r#"{"id": "a", "addr": "127.0.0.1:1"}"#),
            409,
            "node \"a\" already exists in pool \"llm\"",
        ),
        (
            "POST",
            "pools/llm/nodes",
            Some(r#"{"id": "x"}"#),
            400,
            "missing key \"addr\"",
        ),
        (
            "POST",
            "pools/llm/nodes",
            Some(r#"{"id": "x", "addr": "127.0.0.1"}"#),
            400,
            "addr: ",
        ),
        (
            "POST",
            "pools/llm/nodes",
            Some(r#"{"id": "bad id", "addr": "127.0.0.1:1"}"#),
            400,
            "id: invalid id \"bad id\"",
        ),
        (
            "POST",
            "pools/llm/nodes",
            Some(r#"{"id": "x", "addr": "no-such-host.invalid:80"}"#),
            400,
            "no-such-host.invalid",
        ),
        (
            "POST",
            "pools/llm/nodes",
            Some(r#"{"id": "x", "addr": "127.0.0.1:1", "weight": 0}"#),
            400,
            "weight: 0 is out of range",
        ),
        (
            "POST",
            "pools/llm/nodes",
            Some(r#"{"id": "x", "addr": "127.0.0.1:1", "backup": 1}"#),
            400,
            "backup: boolean expected, got number",
        ),
        (
            "POST",
            "pools/llm/nodes",
            Some(r#"{"id": "x", "addr": "127.0.0.1:1"}"#),
            409,
            "shm.max_nodes",
        ),
        (
            "POST",
            "pools/nope/nodes",
            Some(r#"{"id": "x", "addr": "127.0.0.1:1"}"#),
            404,
            "unknown pool \"nope\"",
        ),
        ("DELETE", "pools/llm/nodes/zz", None, 404, "unknown node \"zz\""),
        ("DELETE", "pools/solo/nodes/s", None, 409, "without a primary"),
        (
            "PUT",
            "pools/llm/canary",
            Some(r#"{"share": 1.5}"#),
            400,
            "share: 1.5 is out of range 0..1",
        ),
        (
            "PUT",
            "pools/llm/canary",
            Some(r#"{"share": "half"}"#),
            400,
            "share: number expected, got string",
        ),
        (
            "PUT",
            "pools/solo/canary",
            Some(r#"{"share": 0.1}"#),
            409,
            "pool \"solo\" has no canary",
        ),
        (
            "PUT",
            "pools/llm/emergency",
            Some(r#"{"mode": "maybe"}"#),
            400,
            "mode: \"on\", \"off\" or \"auto\" expected, got \"maybe\"",
        ),
        (
            "PUT",
            "pools/llm/emergency",
            Some(r#"{"mode": "on", "why": "x"}"#),
            400,
            "unknown key \"why\"",
        ),
        (
            "GET",
            "pools/llm/canary",
            None,
            405,
            "GET not allowed here (allowed: PUT)",
        ),
        (
            "POST",
            "pools/llm/nodes/a",
            Some("{}"),
            405,
            "allowed: GET, PUT, DELETE",
        ),
        ("DELETE", "", None, 405, "allowed: GET"),
        ("GET", "pools/nope", None, 404, "unknown pool \"nope\""),
        ("GET", "nope", None, 404, "no admin route /rsbalancer/nope"),
    ];
    for (method, path, body, status, msg) in &cases {
        let url = format!("/rsbalancer/{path}");
        let r = admin(&g, method, &url, *body);
        let what = format!("{method} {url} {}", body.map_or("", |b| &b[..b.len().min(80)]));
        assert_eq!(r.status, *status, "{what}: {}", r.text());
        assert_eq!(r.header("Content-Type"), Some("application/json"), "{what}");
        let err = r.json()["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: no error in {}", r.text()))
            .to_string();
        assert!(
            err.contains(msg),
            "{what}: error {err:?} does not contain {msg:?}"
        );
        if *status == 405 {
            assert!(r.header("Allow").is_some(), "{what}: no Allow header");
        }
    }
    // Nothing changed, in any worker: same generation, weights, drains, nodes.
    for st in states_from_both_workers(&g) {
        assert_eq!(st, before, "a refused request changed the state");
    }
    assert_eq!(
        notices(&g),
        Vec::<String>::new(),
        "refused requests logged changes"
    );

    // The valid versions go through and show in the state of every worker.
    let r = change(&g, "PUT", "/rsbalancer/pools/llm/canary", r#"{"share": 0.2}"#);
    assert_eq!(r["canary_share"], json!(0.2), "{r}");
    change(&g, "PUT", "/rsbalancer/pools/llm/emergency", r#"{"mode": "on"}"#);
    for st in states_from_both_workers(&g) {
        let p = &st["pools"]["llm"];
        assert_eq!(
            (p["canary_share"].clone(), p["emergency"]["mode"].clone()),
            (json!(0.2), json!("on")),
            "{st}"
        );
    }
    assert_notice(&g, "canary share of pool llm set to 0.2 (was 0) by 127.0.0.1");
    assert_notice(&g, "emergency mode of pool llm set to on (was auto) by 127.0.0.1");

    // Bodies up to the bound are read, also those nginx spooled to a temp file (over
    // client_body_buffer_size, 8 KiB by default): 12 KiB, 16 KiB - 1 and exactly 16 KiB.
    for (len, weight) in [(12_288, 12), (16_383, 13), (16_384, 14)] {
        let body = padded(&format!(r#"{{"weight": {weight}}}"#), len);
        let r = change(&g, "PUT", "/rsbalancer/pools/llm/nodes/a", &body);
        assert_eq!(r["weight"], json!(weight), "a body of {len} bytes: {r}");
    }
    for st in states_from_both_workers(&g) {
        assert_eq!(node_state(&st, "a")["weight"], json!(14), "{st}");
    }
}

/// `json` followed by spaces up to `len` bytes.
fn padded(json: &str, len: usize) -> String {
    format!("{json:<len$}")
}

/// Starts the demo gateway with `token` added to the admin location.
fn start_gateway_with_token(dir: &TestDir, cfg: &Value, token: &str) -> Gateway {
    let port = free_port();
    let (conf, json_path) = write_gateway(dir, port, cfg);
    let text = std::fs::read_to_string(&conf).unwrap();
    let plain = r#"serve({ prefix = "/rsbalancer/" })"#;
    assert!(
        text.contains(plain),
        "gateway.conf no longer mounts the admin API as {plain}"
    );
    let text = text.replace(
        plain,
        &format!(r#"serve({{ prefix = "/rsbalancer/", token = "{token}" }})"#),
    );
    let conf = dir.write("gateway.conf", &text);
    start_gateway_conf(dir, port, &conf, json_path)
}

#[test]
fn admin_token_is_enforced() {
    let _serial = serial();
    let dir = TestDir::new("admin-token");
    let mocks = [MockNode::new("a", 5), MockNode::new("b", 5)];
    let _m = start_mocks(&dir, &mocks);
    let cfg = json!({ "pools": { "llm": llm(vec![node("a", &mocks[0], 30), node("b", &mocks[1], 50)]) } });
    let g = start_gateway_with_token(&dir, &cfg, TOKEN);
    let good = format!("Bearer {TOKEN}");
    let wrong_same_len = format!("Bearer {}X", &TOKEN[..TOKEN.len() - 1]);
    let prefix_only = format!("Bearer {}", &TOKEN[..10]);
    let longer = format!("Bearer {TOKEN}0");

    for (method, path, body) in [
        ("GET", "/rsbalancer/", None),
        ("GET", "/rsbalancer/pools/llm", None),
        ("PUT", "/rsbalancer/pools/llm/nodes/a", Some(r#"{"weight": 7}"#)),
        ("DELETE", "/rsbalancer/pools/llm/nodes/b", None),
    ] {
        let r = admin(&g, method, path, body);
        assert_eq!(r.status, 401, "{method} {path} without a token: {}", r.text());
        assert_eq!(r.header("WWW-Authenticate"), Some(r#"Bearer realm="rsbalancer""#));
        assert!(
            r.json()["error"].as_str().unwrap().contains("bearer token"),
            "{}",
            r.text()
        );
        for bad in [
            &wrong_same_len,
            &prefix_only,
            &longer,
            &format!("Basic {TOKEN}"),
            &TOKEN.to_string(),
        ] {
            let r = admin_with(&g, method, path, &[("Authorization", bad)], body);
            assert_eq!(r.status, 401, "{method} {path} with {bad:?}: {}", r.text());
        }
    }
    let r = admin_with(
        &g,
        "GET",
        "/rsbalancer/",
        &[("Authorization", &wrong_same_len)],
        None,
    );
    assert_eq!(
        r.header("WWW-Authenticate"),
        Some(r#"Bearer realm="rsbalancer", error="invalid_token""#)
    );
    // Nothing changed by the refused writes.
    let st = admin_with(&g, "GET", "/rsbalancer/", &[("Authorization", &good)], None);
    assert_eq!(st.status, 200, "{}", st.text());
    let st = st.json();
    assert_eq!(node_state(&st, "a")["weight"], json!(30));
    assert_eq!(st["pools"]["llm"]["nodes"].as_array().unwrap().len(), 2);
    assert!(notices(&g).is_empty(), "{:?}", notices(&g));

    // With the token (any case of the scheme), the change goes through.
    let r = admin_with(
        &g,
        "PUT",
        "/rsbalancer/pools/llm/nodes/a",
        &[("Authorization", &format!("bearer {TOKEN}"))],
        Some(r#"{"weight": 7}"#),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["weight"], json!(7));
    assert_notice(&g, "weight of node a in pool llm set to 7 (was 30)");

    // The status page's HTML holds no state and is served without the token; its
    // script sends the token, from the URL fragment.
    // Which of page and JSON each Accept gets (JSON always wants the token).
    let browser = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8";
    for (path, accept, page) in [
        ("/rsbalancer/status", Some("text/html"), true),
        ("/rsbalancer/status", Some(browser), true),
        ("/rsbalancer/status", Some("*/*"), false),
        ("/rsbalancer/status", Some("application/json"), false),
        (
            "/rsbalancer/status",
            Some("application/json, text/html;q=0.9"),
            false,
        ),
        (
            "/rsbalancer/status",
            Some("text/html, application/json;q=0.9"),
            true,
        ),
        ("/rsbalancer/status", None, false),
        ("/rsbalancer/", Some(browser), true),
        ("/rsbalancer/", Some("*/*"), false),
        ("/rsbalancer/", Some("application/json"), false),
        ("/rsbalancer/", None, false),
    ] {
        let headers: Vec<(&str, &str)> = accept.map(|a| ("Accept", a)).into_iter().collect();
        let r = admin_with(&g, "GET", path, &headers, None);
        let what = format!("GET {path} Accept {accept:?}");
        if page {
            assert_eq!(r.status, 200, "{what}: {}", r.text());
            assert!(
                r.header("Content-Type").unwrap().starts_with("text/html"),
                "{what}"
            );
            assert!(r
                .header("Content-Security-Policy")
                .unwrap()
                .contains("default-src 'none'"));
            assert!(
                !r.text().contains(&mocks[0].addr()),
                "{what}: the page carries state"
            );
        } else {
            assert_eq!(r.status, 401, "{what}: {}", r.text());
            let mut h = headers.clone();
            h.push(("Authorization", &good));
            let r = admin_with(&g, "GET", path, &h, None);
            assert_eq!(r.status, 200, "{what}: {}", r.text());
            assert_eq!(r.json()["pools"]["llm"]["nodes"][0]["id"], json!("a"), "{what}");
        }
    }
    let url = format!("http://127.0.0.1:{}/rsbalancer/status", g.port);
    let without = chromium_dom(&url);
    assert!(
        without.contains("a token is needed"),
        "no token prompt:\n{without}"
    );
    assert!(rows(&without).is_empty());
    let with = chromium_dom(&format!("{url}#token={TOKEN}"));
    let ids: Vec<String> = rows(&with).iter().map(|r| r["id"].clone()).collect();
    assert_eq!(ids, ["a", "b"], "rows with the token:\n{with}");
}

// ----------------------------------------------------------------------------------
// Chromium

/// Debian's `chromium`: panics (fails the test) when it is missing.
fn chromium() -> PathBuf {
    let candidates = ["/usr/bin/chromium", "/usr/bin/chromium-browser"];
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "chromium not found ({candidates:?}): the status page test needs it. Install \
                 it with `make deps` (Debian 12 package `chromium`)."
            )
        })
}

/// Headless Chromium on `url` with `args`; returns stdout. Panics when it fails.
fn run_chromium(url: &str, args: &[&str]) -> String {
    let profile = tempdir("chromium-profile");
    let out = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .output()
        .expect("run chromium");
    let _ = std::fs::remove_dir_all(&profile);
    assert!(
        out.status.success(),
        "chromium {args:?} {url} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn tempdir(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("rsb-{name}-{}-{:?}", std::process::id(), Instant::now()));
    std::fs::create_dir_all(&p).expect("create temp dir");
    p
}

/// The DOM of `url` after its scripts ran (`--dump-dom`).
fn chromium_dom(url: &str) -> String {
    run_chromium(url, &["--dump-dom"])
}

/// Text of an HTML fragment: tags dropped, the entities the page can produce decoded.
fn text_of(html: &str) -> String {
    let mut out = String::new();
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => in_tag = true,
            '>' => in_tag = false,
            c if !in_tag => out.push(c),
            _ => {}
        }
    }
    out.replace("&amp;", "&")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&nbsp;", " ")
}

/// The node rows of a dumped status page: per row, cell class (`c-<name>`) -> text,
/// plus "pool" (the enclosing section's data-pool).
fn rows(dom: &str) -> Vec<BTreeMap<String, String>> {
    let mut out = Vec::new();
    for section in dom.split("<section ").skip(1) {
        let pool = section
            .split("data-pool=\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .unwrap_or_default()
            .to_string();
        for tr in section.split("<tr class=\"node\"").skip(1) {
            let tr = tr.split("</tr>").next().unwrap_or_default();
            let mut row = BTreeMap::new();
            row.insert("pool".to_string(), pool.clone());
            for td in tr.split("<td class=\"c-").skip(1) {
                let (name, rest) = td.split_once('"').unwrap_or_default();
                let name = name.split(' ').next().unwrap_or_default();
                let inner = rest.split_once('>').map_or("", |x| x.1);
                let inner = inner.rsplit_once("</td>").map_or(inner, |x| x.0);
                row.insert(name.to_string(), text_of(inner).trim().to_string());
            }
            // The id cell also holds the "backup" tag.
            if let Some(id) = row.get("id").cloned() {
                let backup = id.ends_with(" backup");
                row.insert("id".into(), id.trim_end_matches(" backup").to_string());
                row.insert("backup".into(), backup.to_string());
            }
            out.push(row);
        }
    }
    out
}

/// What the page must show for a node of the admin JSON.
fn expected_row(pool: &str, n: &Value) -> BTreeMap<String, String> {
    // The whole tries a learned limit lets in (8.7 -> 8), no fraction.
    let limit = n["limit"].as_f64().unwrap().floor() as u64;
    let limit = if limit > 0 {
        group(limit)
    } else {
        "\u{2014}".to_string()
    };
    let recent = &n["recent"];
    let dash = || "\u{2014}".to_string();
    let rate = if recent["tries"].as_u64().unwrap() > 0 {
        one_decimal(recent["rate"].as_f64().unwrap())
    } else {
        dash()
    };
    let success = recent["success"]
        .as_f64()
        .map_or_else(dash, |s| format!("{}%", one_decimal(s * 100.0)));
    let mut m = BTreeMap::new();
    m.insert("pool".into(), pool.to_string());
    m.insert("id".into(), n["id"].as_str().unwrap().to_string());
    m.insert("addr".into(), n["addr"].as_str().unwrap().to_string());
    m.insert("state".into(), n["state"].as_str().unwrap().to_string());
    m.insert("weight".into(), group(n["weight"].as_u64().unwrap()));
    m.insert(
        "inflight".into(),
        format!("{} / {limit}", n["inflight"].as_u64().unwrap()),
    );
    m.insert("backup".into(), n["backup"].as_bool().unwrap().to_string());
    m.insert("requests".into(), group(n["requests"].as_u64().unwrap()));
    m.insert("failures".into(), group(n["failures"].as_u64().unwrap()));
    m.insert("rate".into(), rate);
    m.insert("success".into(), success);
    m
}

/// 1234.56 -> "1,234.6", 2.0 -> "2" (the page's en-US format, at most one decimal).
fn one_decimal(v: f64) -> String {
    let tenths = (v * 10.0).round() as u64;
    match tenths % 10 {
        0 => group(tenths / 10),
        d => format!("{}.{d}", group(tenths / 10)),
    }
}

/// 12345 -> "12,345" (the page's en-US number format).
fn group(v: u64) -> String {
    let s = v.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Every node of every pool, as the page must show them.
fn expected_rows(st: &Value) -> Vec<BTreeMap<String, String>> {
    let mut out = Vec::new();
    let pools = st["pools"].as_object().unwrap();
    let mut names: Vec<&String> = pools.keys().collect();
    names.sort();
    for name in names {
        for n in pools[name]["nodes"].as_array().unwrap() {
            out.push(expected_row(name, n));
        }
    }
    out
}

fn screenshot_path() -> PathBuf {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target"))
        .join("screenshots");
    std::fs::create_dir_all(&dir).expect("create target/screenshots");
    dir.join("status.png")
}

fn assert_png(path: &Path) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("no screenshot at {}: {e}", path.display()));
    assert!(
        bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
        "{} is not a PNG",
        path.display()
    );
    // IHDR: width and height, big-endian, at bytes 16..24.
    let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    assert_eq!((w, h), (1280, 900), "screenshot size");
}

#[test]
fn status_page_in_chromium_shows_the_admin_state() {
    let _serial = serial();
    let dir = TestDir::new("admin-page");
    let mocks = [
        MockNode::new("a", 5),
        MockNode::new("b", 8),
        MockNode::new("c", 5),
    ];
    let _m = start_mocks(&dir, &mocks);
    let cfg = json!({ "pools": {
        "llm": { "algorithm": "p2c_ewma", "slow_start_ms": 0, "nodes": [
            node("a", &mocks[0], 30), node("b", &mocks[1], 50),
            json!({ "id": "c", "addr": mocks[2].addr(), "weight": 20, "backup": true }) ] },
        "batch": llm(vec![node("x", &mocks[0], 1), node("y", &mocks[2], 2)]),
    } });
    // A canary to give llm a share to show (batch; share 0 until set below).
    let mut cfg = cfg;
    cfg["pools"]["llm"]["canary"] = json!({ "pool": "batch" });
    let g = start_gateway(&dir, &cfg);
    // Some traffic first, so that the page has latencies and counts to show.
    for (node, _) in burst(&g, 40) {
        assert!(
            node == "a" || node == "b",
            "backup c served with a and b up: {node}"
        );
    }
    wait_state(&g, "no try in flight", |s| {
        ["a", "b", "c"]
            .iter()
            .all(|id| node_state(s, id)["inflight"] == json!(0))
    });
    mock_set(&mocks[1], "latency_ms=30000");
    // Hold two tries in flight on the slow node b (a drained, c a backup), so the page
    // has something in flight to show and the state stays still while it renders.
    change(&g, "PUT", "/rsbalancer/pools/llm/nodes/a", r#"{"drain": true}"#);
    let held: Vec<_> = (0..2)
        .map(|_| {
            let port = g.port;
            std::thread::spawn(move || http(port, "POST", "/v1/chat/completions", Some(CHAT_BODY)))
        })
        .collect();
    wait_state(&g, "2 tries in flight on b", |s| {
        node_state(s, "b")["inflight"] == json!(2)
    });
    change(
        &g,
        "PUT",
        "/rsbalancer/pools/batch/nodes/y",
        r#"{"weight": 1234}"#,
    );
    change(&g, "PUT", "/rsbalancer/pools/llm/canary", r#"{"share": 0.25}"#);

    let url = format!("http://127.0.0.1:{}/rsbalancer/status", g.port);
    let mut compared = false;
    for attempt in 1..=3 {
        let before = state(&g);
        let dom = chromium_dom(&url);
        let after = state(&g);
        let want = expected_rows(&before);
        if want != expected_rows(&after) {
            eprintln!("attempt {attempt}: the state moved while the page rendered; again");
            continue;
        }
        let got = rows(&dom);
        let shown: Vec<BTreeMap<String, String>> = got
            .iter()
            .map(|r| {
                r.iter()
                    .filter(|(k, _)| want[0].contains_key(k.as_str()))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .collect();
        assert_eq!(shown, want, "the page's rows differ from the admin JSON\n{dom}");
        // The other columns are there, with numbers where numbers belong.
        for r in &got {
            for col in ["effective", "ewma", "cooldown", "busy"] {
                assert!(r.contains_key(col), "no {col} column in {r:?}");
            }
            assert!(
                r["effective"].replace(',', "").parse::<f64>().is_ok(),
                "effective weight {r:?}"
            );
        }
        let b = got.iter().find(|r| r["id"] == "b").unwrap();
        assert_eq!(b["inflight"], "2 / \u{2014}");
        assert!(b["ewma"].ends_with(" ms"), "no EWMA shown for b: {b:?}");
        assert_eq!(got.iter().find(|r| r["id"] == "a").unwrap()["state"], "draining");
        assert!(dom.contains("canary 25%"), "pool facts missing");
        // Per node over the last minute: a and b served the burst, every try fine.
        for id in ["a", "b"] {
            let r = got.iter().find(|r| r["id"] == id).unwrap();
            assert_eq!(r["success"], "100%", "{r:?}");
            assert_ne!(r["rate"], "\u{2014}", "{r:?}");
        }
        assert_eq!(got.iter().find(|r| r["id"] == "c").unwrap()["rate"], "\u{2014}");
        // Each pool's admission queue, as the JSON says (llm: the two held tries).
        for (pool, section) in dom.split("<section ").skip(1).map(|s| {
            let name = s.split("data-pool=\"").nth(1).unwrap().split('"').next().unwrap();
            (name.to_string(), s)
        }) {
            let a = &before["pools"][&pool]["admission"];
            let line = section
                .split("<div class=\"admission\">")
                .nth(1)
                .and_then(|s| s.split("</div>").next())
                .unwrap_or_else(|| panic!("no admission line for {pool}:\n{section}"));
            let want = format!(
                "queue {} waiting \u{b7} {} admitted now \u{b7} {} admitted from the queue \u{b7} {} timeouts",
                a["queue_len"], a["admitted"], a["queue_admitted"], a["queue_timeouts"]
            );
            assert!(line.starts_with(&want), "{pool}: {line:?}, want {want:?}");
        }
        assert_eq!(before["pools"]["llm"]["admission"]["admitted"], json!(2));
        assert!(
            dom.contains(&format!("generation {}", before["generation"])),
            "generation not shown"
        );
        compared = true;
        break;
    }
    assert!(compared, "the state never held still for a page render");

    let shot = screenshot_path();
    let _ = std::fs::remove_file(&shot);
    run_chromium(
        &url,
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1280,900",
            "--hide-scrollbars",
        ],
    );
    assert_png(&shot);
    println!("status page screenshot: {}", shot.display());
    eprintln!("status page screenshot: {}", shot.display());

    // The page fetched the state: the admin location served JSON to Chromium.
    let log = std::fs::read_to_string(dir.path().join("gateway-access.log")).unwrap_or_default();
    assert!(
        log.lines()
            .any(|l| l.contains("\"GET /rsbalancer/ HTTP/1.1\" 200")),
        "no JSON fetch in the access log"
    );

    drop(g);
    for h in held {
        let _ = h.join();
    }
}

#[test]
fn reload_replaces_run_time_changes_with_the_file() {
    let _serial = serial();
    let dir = TestDir::new("admin-reload");
    let mocks = [
        MockNode::new("a", 5),
        MockNode::new("b", 5),
        MockNode::new("c", 5),
    ];
    let _m = start_mocks(&dir, &mocks);
    let cfg = json!({ "pools": { "llm": llm(vec![node("a", &mocks[0], 30), node("b", &mocks[1], 50)]) } });
    let g = start_gateway(&dir, &cfg);
    change(
        &g,
        "PUT",
        "/rsbalancer/pools/llm/nodes/a",
        r#"{"weight": 9, "drain": true}"#,
    );
    let body = json!({ "id": "c", "addr": mocks[2].addr() }).to_string();
    change(&g, "POST", "/rsbalancer/pools/llm/nodes", &body);
    change(&g, "DELETE", "/rsbalancer/pools/llm/nodes/b", "");
    let st = state(&g);
    let ids: Vec<&str> = st["pools"]["llm"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["a", "c"]);

    // nginx -s reload: the file's nodes, weights and (no) drains again.
    let old = g.nginx.workers();
    g.nginx.signal(libc::SIGHUP);
    g.nginx.wait_workers(2, &old);
    let st = wait_state(&g, "the file's nodes after the reload", |s| {
        s["pools"]["llm"]["nodes"]
            .as_array()
            .is_some_and(|a| a.len() == 2 && a[1]["id"] == "b")
    });
    let a = node_state(&st, "a");
    assert_eq!(
        (a["weight"].clone(), a["draining"].clone(), a["state"].clone()),
        (json!(30), json!(false), json!("healthy")),
        "{st}"
    );
    assert_eq!(node_state(&st, "b")["weight"], json!(50));
    let res = burst(&g, 100);
    assert_none_to(&res, "c");
    assert!(
        res.iter().any(|(n, _)| n == "a"),
        "a (no longer drained) got nothing"
    );
}
