//! End-to-end tests of rounds (docs/balancing.md "Rounds": a busy request waits or moves, never
//! fails) inside real nginx (2 workers) in front of mock LLM nodes.
//!
//! The gateway is the demo template `nginx-conf/demo/gateway.conf`: `/v1/` and the
//! named location `@rsb_round` both include `nginx-conf/snippets/rsbalancer-proxy.conf`, whose
//! `error_page 502 504 = @rsb_round;` catches the end of a round. Every request is a
//! `POST /v1/chat/completions`.
//!
//! Run with `make build` then `RSB_LUA_SO=$PWD/build/lib/rsbalancer.so cargo test
//! --no-default-features --test nginx_rounds -- --test-threads=1`. They need nginx with
//! lua-nginx-module and fail (never skip) without them: see tests/support/mod.rs.
//!
//! No assertion depends on how long something took: a test that needs a node to come
//! back changes it from another thread, and the client waits for its answer.

mod support;

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{json, Value};
use support::*;

/// One test at a time: the load tests need the machine.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn node(id: &str, m: &MockNode) -> Value {
    json!({ "id": id, "addr": m.addr(), "weight": 1 })
}

/// A config with the one pool "llm"; `extra` is merged into the pool.
fn pool(nodes: Vec<Value>, extra: Value) -> Value {
    let mut p = json!({ "algorithm": "p2c_ewma", "nodes": nodes, "slow_start_ms": 0 });
    if let Value::Object(m) = extra {
        for (k, v) in m {
            p[k] = v;
        }
    }
    json!({ "pools": { "llm": p } })
}

fn received(m: &MockNode) -> u64 {
    get(m.port, "/mock/state").json()["received"]
        .as_u64()
        .expect("received")
}

/// The addresses a response says were tried, round by round (" : " separates rounds).
fn rounds_of(r: &Response) -> Vec<Vec<String>> {
    r.header("X-Upstream-Addr")
        .unwrap_or("")
        .split(" : ")
        .map(|round| {
            round
                .split(',')
                .map(|a| a.trim().to_string())
                .filter(|a| !a.is_empty())
                .collect()
        })
        .collect()
}

/// A gateway-made 429: Retry-After (whole seconds >= 1), the reason in X-RSB-Admission,
/// an OpenAI-shaped body whose code is the reason, naming no pool.
fn assert_gateway_429(r: &Response, reason: Option<&str>) {
    assert_eq!(r.status, 429, "{}", r.text());
    let ra: u64 = r
        .header("Retry-After")
        .unwrap_or_else(|| panic!("429 without Retry-After: {r:?}"))
        .parse()
        .expect("Retry-After in whole seconds");
    assert!(ra >= 1, "{r:?}");
    let why = r.header("X-RSB-Admission").expect("X-RSB-Admission").to_string();
    if let Some(want) = reason {
        assert_eq!(why, want, "{}", r.text());
    }
    let body = r.json();
    assert_eq!(body["error"]["type"], "rate_limit_error", "{body}");
    assert_eq!(body["error"]["code"], json!(why), "{body}");
    assert!(
        body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(
        !r.text().contains("llm"),
        "the answer names the pool: {}",
        r.text()
    );
}

/// Node `a` answers every chat 429, node `b` is drained: no node can take a request
/// but `a`, which refuses it. `extra` is merged into the pool config.
struct Refusing {
    a: MockNode,
    b: MockNode,
    g: Gateway,
    _mocks: Nginx,
}

fn refusing_and_drained(dir: &TestDir, extra: Value) -> Refusing {
    refusing_and_drained_with(dir, extra, |c| c)
}

/// [`refusing_and_drained`] with the gateway config passed through `edit`.
fn refusing_and_drained_with(dir: &TestDir, extra: Value, edit: impl FnOnce(String) -> String) -> Refusing {
    let mut a = MockNode::new("a", 5);
    a.fail = "429".into();
    let b = MockNode::new("b", 5);
    let mocks = start_mocks(dir, &[a.clone(), b.clone()]);
    let g = start_gateway_with(dir, &pool(vec![node("a", &a), node("b", &b)], extra), edit);
    drain(&g, "b", true);
    Refusing {
        a,
        b,
        g,
        _mocks: mocks,
    }
}

/// Node `a` answers every chat 429; node `b` is drained and comes back (undrained from
/// another thread) while the client waits: the request's first round ends busy (a
/// refused, b out), the second waits for b and is answered there, within one client
/// request. Before rounds the client got a's 429.
#[test]
fn busy_try_is_requeued_and_succeeds_on_another_node() {
    let _s = serial();
    let dir = TestDir::new("rounds-requeue");
    let Refusing { a, b, g, _mocks } = refusing_and_drained(&dir, json!({}));

    let r = std::thread::scope(|s| {
        let client = s.spawn(|| g.chat());
        // b comes back once the request is waiting (a has refused it by then).
        wait_until(Duration::from_secs(10), "a to refuse the request", || {
            received(&a) >= 1
        });
        std::thread::sleep(Duration::from_millis(100));
        drain(&g, "b", false);
        client.join().unwrap()
    });
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("X-Node"), Some("b"), "{r:?}");
    let rounds = rounds_of(&r);
    assert!(rounds.len() >= 2, "one round only: {r:?}");
    assert_eq!(rounds[0][0], a.addr(), "{r:?}");
    assert_eq!(rounds.last().unwrap(), &vec![b.addr()], "{r:?}");
    assert_eq!(received(&a), 1, "a was tried again");
    assert_eq!(received(&b), 1);
    let st = quiesce(&g);
    assert_eq!(stat(&st, "b", "requests"), 1, "{st}");
}

/// The deadline ends a request's rounds: with a refusing and b drained for good, the
/// request waits until `retry.deadline_ms` and gets 429 + Retry-After, "deadline".
#[test]
fn deadline_ends_the_rounds_with_429_and_retry_after() {
    let _s = serial();
    let dir = TestDir::new("rounds-deadline");
    let Refusing { b, g, _mocks, .. } =
        refusing_and_drained(&dir, json!({ "retry": { "deadline_ms": 500 } }));
    let r = g.chat();
    assert_gateway_429(&r, Some("deadline"));
    assert_eq!(received(&b), 0);
    quiesce(&g);
}

/// With `retry.rounds: 0` a busy try ends the request as before rounds: the node's own
/// 429 reaches the client (its Retry-After added by header_filter()).
#[test]
fn rounds_off_passes_the_nodes_429_through() {
    let _s = serial();
    let dir = TestDir::new("rounds-off");
    let Refusing { g, _mocks, .. } = refusing_and_drained(&dir, json!({ "retry": { "rounds": 0 } }));
    let r = g.chat();
    assert_eq!(r.status, 429, "{r:?}");
    assert_eq!(r.header("X-Node"), Some("a"), "not the node's own answer: {r:?}");
    assert_eq!(rounds_of(&r).len(), 1, "{r:?}");
    quiesce(&g);
}

/// A POST whose try may have reached the node (it dropped the connection after reading
/// the request) is not sent again, in this round or another: the client gets a 502 in
/// OpenAI's shape. One whose try sent nothing (connection refused) is sent again.
#[test]
fn post_is_requeued_only_after_busy_or_nothing_sent() {
    let _s = serial();
    let dir = TestDir::new("rounds-post");
    let mut dropper = MockNode::new("dropper", 5);
    dropper.fail = "close".into();
    let b = MockNode::new("b", 5);
    let _mocks = start_mocks(&dir, &[dropper.clone(), b.clone()]);
    let g = start_gateway(
        &dir,
        &pool(vec![node("dropper", &dropper), node("b", &b)], json!({})),
    );
    drain(&g, "b", true);
    let r = g.chat();
    assert_eq!(r.status, 502, "{r:?}");
    assert_eq!(r.header("X-RSB-Admission"), Some("upstream_failed"), "{r:?}");
    assert_eq!(r.json()["error"]["type"], "server_error", "{}", r.text());
    assert_eq!(received(&dropper), 1);
    assert_eq!(received(&b), 0);
    quiesce(&g);

    // Nothing listens on `closed`: the try sends nothing, so the request may move on.
    let dir2 = TestDir::new("rounds-post-refused");
    let closed = MockNode::new("closed", 5); // never started
    let b2 = MockNode::new("b", 5);
    let _mocks2 = start_mocks(&dir2, std::slice::from_ref(&b2));
    let g2 = start_gateway(
        &dir2,
        &pool(vec![node("closed", &closed), node("b", &b2)], json!({})),
    );
    drain(&g2, "b", true);
    let r = std::thread::scope(|s| {
        let client = s.spawn(|| g2.chat());
        wait_until(Duration::from_secs(10), "the refused try", || {
            g2.stats()["closed"]["failures"].as_u64().unwrap_or(0) >= 1
        });
        drain(&g2, "b", false);
        client.join().unwrap()
    });
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("X-Node"), Some("b"), "{r:?}");
    quiesce(&g2);
}

/// Saturation: three capped nodes (429 at once over the cap) under 2.5x their total
/// capacity in closed-loop clients, with the default pool config and again with the
/// admission queue on. Every response is a node's 200 or a 429 with Retry-After: no
/// 502 or 500 made by the gateway for "busy". Nothing is left in flight after.
#[test]
fn saturating_load_gets_no_5xx_only_answers_or_429_with_retry_after() {
    let _s = serial();
    for admission in [false, true] {
        let dir = TestDir::new("rounds-saturate");
        let mut nodes = Vec::new();
        for (name, cap) in [("a", 4), ("b", 4), ("c", 2)] {
            let mut m = MockNode::new(name, 60);
            m.max_conc = cap;
            nodes.push(m);
        }
        let _mocks = start_mocks(&dir, &nodes);
        let list = nodes.iter().map(|m| node(&m.name, m)).collect();
        let extra = if admission {
            json!({ "admission": { "enabled": true } })
        } else {
            json!({})
        };
        let g = start_gateway(&dir, &pool(list, extra));
        let results = run_parallel(600, 25, |_| g.chat());
        let mut by_status: BTreeMap<u16, usize> = BTreeMap::new();
        for r in &results {
            *by_status.entry(r.status).or_default() += 1;
            match r.status {
                200 => {}
                429 if r.header("X-RSB-Admission").is_some() => assert_gateway_429(r, None),
                429 => assert!(
                    r.header("Retry-After").is_some(),
                    "node 429 without Retry-After: {r:?}"
                ),
                _ => panic!("admission={admission}: {} {r:?}\nall: {by_status:?}", r.status),
            }
        }
        assert!(
            by_status.get(&200).copied().unwrap_or(0) > 0,
            "admission={admission}: {by_status:?}"
        );
        eprintln!("admission={admission}: {by_status:?}");
        let st = quiesce(&g);
        assert_eq!(inflight(&st), 0, "{st}");
    }
}

/// A location without the `error_page` to `@rsb_round` (a config written before
/// rounds) while the pool has rounds: the busy round ends in nginx's 502, and the
/// error log says what is missing, once.
#[test]
fn rounds_without_their_location_say_so_in_the_error_log() {
    let _s = serial();
    let dir = TestDir::new("rounds-missing");
    let snippet = repo().join("nginx-conf/snippets/rsbalancer-proxy.conf");
    let proxy = std::fs::read_to_string(&snippet).unwrap();
    let line = "error_page 502 504 = @rsb_round;";
    assert!(proxy.contains(line), "rsbalancer-proxy.conf changed");
    let copy = dir.write("proxy-no-rounds.conf", &proxy.replace(line, ""));
    let snippet = snippet.display().to_string();
    // /v1/ only: @rsb_round keeps the snippet (a request never gets there).
    let Refusing { g, _mocks, .. } = refusing_and_drained_with(&dir, json!({}), |c| {
        assert!(
            c.contains(&snippet),
            "the demo gateway no longer includes {snippet}"
        );
        c.replacen(&snippet, &copy.display().to_string(), 1)
    });
    for _ in 0..3 {
        assert_eq!(g.chat().status, 502);
    }
    let log = g.nginx.error_log();
    let says = "has retry.rounds but a busy round ended in nginx's 502";
    let n = log.matches(says).count();
    assert!(
        (1..=2).contains(&n),
        "{n} warnings (one per worker at most):\n{log}"
    );
    quiesce(&g);
}
