//! End-to-end tests of prefix affinity with a load guard (`"algorithm": "prefix"`,
//! README "Prefix affinity") inside real nginx (2 workers) in front of 4 mock LLM
//! nodes: the key read from each chat body in `admit()`, one ring for all workers,
//! the bounded-load walk on the shared in-flight counts, and the counters in
//! `/rsbalancer/status` and `/metrics`.
//!
//! Run with `make build` then `RSB_LUA_SO=$PWD/build/lib/rsbalancer.so cargo test
//! --no-default-features --test nginx_prefix -- --test-threads=1`.
//!
//! Where requests go is deterministic (node ids and prompt texts fix the ring and the
//! keys); no assertion depends on how long something took.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::sync::{Mutex, MutexGuard};

use serde_json::{json, Value};
use support::*;

fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

const IDS: [&str; 4] = ["a", "b", "c", "d"];

struct Setup {
    mocks: Vec<MockNode>,
    g: Gateway,
    _nginx: Nginx,
}

/// 4 mock nodes answering after `latency_ms`, behind a gateway whose pool "llm" uses
/// `prefix` with `prefix` as its section (learned limits off: only the load guard and
/// eligibility move a key).
fn setup(dir: &TestDir, latency_ms: u32, prefix: Value) -> Setup {
    let mocks: Vec<MockNode> = IDS.iter().map(|id| MockNode::new(id, latency_ms)).collect();
    let nginx = start_mocks(dir, &mocks);
    let nodes: Vec<Value> = mocks
        .iter()
        .map(|m| json!({ "id": m.name, "addr": m.addr(), "weight": 1 }))
        .collect();
    let config = json!({ "pools": { "llm": {
        "algorithm": "prefix", "nodes": nodes, "slow_start_ms": 0,
        "limit": { "enabled": false }, "prefix": prefix,
    } } });
    let g = start_gateway(dir, &config);
    Setup {
        mocks,
        g,
        _nginx: nginx,
    }
}

fn message(role: &str, content: &str) -> Value {
    json!({ "role": role, "content": content })
}

/// The body of turn `turns` (1..) of conversation `conv` under system prompt `system`:
/// every turn resends the turns before it with their answers, as chat clients do.
fn turn_body(system: &str, conv: usize, turns: usize) -> String {
    let mut msgs = vec![message("system", system)];
    for t in 0..turns {
        msgs.push(message(
            "user",
            &format!("Conversation {conv}, question {t}: what is {conv} times {t}?"),
        ));
        if t + 1 < turns {
            msgs.push(message("assistant", &format!("{}", conv * t)));
        }
    }
    json!({ "model": "mock-llm", "messages": msgs }).to_string()
}

/// POSTs a chat body; (status, X-Node, X-Worker).
fn send(g: &Gateway, body: &str) -> (u16, String, String) {
    let r = post(g.port, "/v1/chat/completions", body);
    let h = |name: &str| r.header(name).unwrap_or("").to_string();
    assert_eq!(r.status, 200, "{r:?}");
    (r.status, h("X-Node"), h("X-Worker"))
}

/// The pool's `prefix` counters in `/rsbalancer/status`.
fn prefix_status(g: &Gateway) -> Value {
    let r = get(g.port, "/rsbalancer/status");
    assert_eq!(r.status, 200, "{}", r.text());
    let p = r.json()["pools"]["llm"]["prefix"].clone();
    assert!(p.is_object(), "no prefix in /rsbalancer/status: {}", r.text());
    p
}

/// The value of one sample of `/metrics` (the pool's counter `name`).
fn metric(g: &Gateway, name: &str) -> f64 {
    let text = get(g.port, "/metrics").text();
    let line = text
        .lines()
        .find(|l| l.starts_with(name) && l.contains("pool=\"llm\""))
        .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{text}"));
    line.rsplit(' ').next().unwrap().parse().expect("a number")
}

fn mock_state(m: &MockNode) -> Value {
    get(m.port, "/mock/state").json()
}

/// Every turn of 24 conversations (3 turns each, 4 at a time) lands on its
/// conversation's node, whichever worker takes it; the conversations use every node.
/// `load_factor` 16 (4 x the number of nodes) makes the bound `4 (T + 1)` for `T`
/// tries in flight when the pick summed them: the node's own count, read a moment
/// later, is at most `T + 3` (the 3 other clients' picks in between, in the other
/// worker), below the bound: affinity alone decides, whatever the overlap of the 4
/// clients. (`load_factor` 4, a bound of `T + 1`, let such a pick spill.)
#[test]
fn every_turn_of_a_conversation_lands_on_one_node_from_both_workers() {
    let _s = serial();
    let dir = TestDir::new("prefix-turns");
    let s = setup(&dir, 5, json!({ "min_bytes": 64, "load_factor": 16.0 }));
    let system = "You are a careful assistant. Answer in one short sentence.";
    let (convs, turns) = (24, 3);
    let results = run_parallel(convs, 4, |conv| {
        (1..=turns)
            .map(|t| send(&s.g, &turn_body(system, conv, t)))
            .collect::<Vec<_>>()
    });
    let mut homes = BTreeMap::new();
    let mut workers = HashSet::new();
    for (conv, tries) in results.iter().enumerate() {
        let nodes: HashSet<&str> = tries.iter().map(|t| t.1.as_str()).collect();
        assert_eq!(nodes.len(), 1, "conversation {conv} moved: {tries:?}");
        *homes.entry(tries[0].1.clone()).or_insert(0) += 1;
        workers.extend(tries.iter().map(|t| t.2.clone()));
    }
    assert!(workers.len() >= 2, "one worker served everything: {workers:?}");
    assert_eq!(homes.len(), 4, "conversations did not use every node: {homes:?}");
    quiesce(&s.g);
    let p = prefix_status(&s.g);
    let n = (convs * turns) as u64;
    assert_eq!(p["hits"], json!(n), "{p}");
    assert_eq!(
        (p["spills"].as_u64(), p["nokey"].as_u64()),
        (Some(0), Some(0)),
        "{p}"
    );
    assert_eq!(metric(&s.g, "rsbalancer_pool_prefix_hits_total"), n as f64);
}

/// 40 conversations whose 20 KB system prompt is the same (far past `max_bytes`) and
/// whose first questions differ: they spread over all 4 nodes, none taking half
/// (vllm production-stack#957: one shared system prompt routed everything to one
/// node).
#[test]
fn conversations_sharing_a_long_system_prompt_spread_over_all_nodes() {
    let _s = serial();
    let dir = TestDir::new("prefix-system");
    // A `load_factor` above the default: the previous request's try may still count
    // as in flight (its log phase runs after the client has its answer), which the
    // default bound would take for load and spill past the home node.
    let s = setup(
        &dir,
        5,
        json!({ "min_bytes": 1024, "max_bytes": 4096, "load_factor": 16.0 }),
    );
    let system = "Follow the style guide. ".repeat(850);
    let results = run_parallel(40, 1, |conv| send(&s.g, &turn_body(&system, conv, 1)));
    let mut by_node = BTreeMap::new();
    for r in &results {
        *by_node.entry(r.1.clone()).or_insert(0) += 1;
    }
    assert_eq!(by_node.len(), 4, "{by_node:?}");
    assert!(by_node.values().all(|&c| c < 20), "{by_node:?}");
    quiesce(&s.g);
    let p = prefix_status(&s.g);
    assert_eq!(p["hits"], json!(40), "{p}");
}

/// One conversation sent by 16 clients at once, 3 times each, to nodes that take 300 ms:
/// the key's home never has more than `ceil(1.25 x 16 / 4) = 5` requests in flight (6:
/// the two workers may both take its last place at the same moment; 7 as the mock
/// counts: it counts a request until its own log phase, which a descheduled mock worker
/// may run after the gateway has already reported that try and sent the next one), and
/// the rest spill on along the ring instead of piling up on one engine (prime-rl
/// PR#3255).
#[test]
fn a_hot_key_spills_along_the_ring_instead_of_piling_up() {
    let _s = serial();
    let dir = TestDir::new("prefix-hot");
    let s = setup(&dir, 300, json!({ "min_bytes": 32, "load_factor": 1.25 }));
    let body = turn_body("Summarize.", 7, 2);
    let results = run_parallel(48, 16, |_| send(&s.g, &body));
    let served: HashSet<&str> = results.iter().map(|r| r.1.as_str()).collect();
    quiesce(&s.g);
    let peaks: Vec<u64> = s
        .mocks
        .iter()
        .map(|m| mock_state(m)["peak_inflight"].as_u64().expect("peak_inflight"))
        .collect();
    eprintln!("peaks {peaks:?}, served by {served:?}");
    assert!(
        peaks.iter().all(|&p| p <= 7),
        "a node went past c x mean + 2: {peaks:?}"
    );
    assert!(served.len() >= 3, "the key did not spill on: {served:?}");
    let p = prefix_status(&s.g);
    let (hits, spills) = (p["hits"].as_u64().unwrap(), p["spills"].as_u64().unwrap());
    assert!(hits >= 5 && spills >= 16, "{p}");
    assert_eq!(hits + spills, 48, "{p}");
    assert_eq!(metric(&s.g, "rsbalancer_pool_prefix_spills_total"), spills as f64);
}

/// Requests with less than `min_bytes` of prompt have no key: they are balanced by
/// load over every node and counted as "nokey".
#[test]
fn requests_shorter_than_min_bytes_are_balanced_by_load() {
    let _s = serial();
    let dir = TestDir::new("prefix-short");
    let s = setup(&dir, 20, json!({ "min_bytes": 1024 }));
    let results = run_parallel(80, 8, |_| send(&s.g, CHAT_BODY));
    let served: HashSet<&str> = results.iter().map(|r| r.1.as_str()).collect();
    assert_eq!(served.len(), 4, "{served:?}");
    quiesce(&s.g);
    let p = prefix_status(&s.g);
    assert_eq!(
        (p["hits"].as_u64(), p["nokey"].as_u64()),
        (Some(0), Some(80)),
        "{p}"
    );
    assert_eq!(metric(&s.g, "rsbalancer_pool_prefix_nokey_total"), 80.0);
}
