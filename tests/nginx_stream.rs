//! End-to-end tests of the stream signals (`rsbalancer::stream`: time to first token,
//! usage tokens, cut streams, the TTFT + time-per-token cost model) inside real nginx
//! (2 workers) in front of mock LLM nodes that behave like the providers: DeepSeek's
//! `: keep-alive` comments while a request is queued, OpenAI's usage chunk when
//! `stream_options.include_usage` is set, usage in JSON replies.
//!
//! The gateway is the demo template `nginx-conf/demo/gateway.conf`, whose locations
//! include `nginx-conf/snippets/rsbalancer-proxy.conf` (with the `body_filter()` line).
//!
//! Run with `make build` then `RSB_LUA_SO=$PWD/build/lib/rsbalancer.so cargo test
//! --no-default-features --test nginx_stream -- --test-threads=1`. They need nginx with
//! lua-nginx-module and fail (never skip) without them: see tests/support/mod.rs.
//!
//! No assertion depends on how long something took: timings only order two nodes whose
//! knobs differ by hundreds of milliseconds in the same direction.

mod support;

use std::sync::{Mutex, MutexGuard};

use serde_json::{json, Value};
use support::*;

fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A config with the one pool "llm" of `nodes` (id = mock name); `extra` is merged.
fn pool(nodes: &[&MockNode], extra: Value) -> Value {
    let nodes: Vec<Value> = nodes
        .iter()
        .map(|m| json!({ "id": m.name, "addr": m.addr(), "weight": 1 }))
        .collect();
    let mut p = json!({ "algorithm": "p2c_ewma", "nodes": nodes, "slow_start_ms": 0 });
    if let Value::Object(m) = extra {
        for (k, v) in m {
            p[k] = v;
        }
    }
    json!({ "pools": { "llm": p } })
}

/// Sends `n` requests with `body` to node `id` only (the others drained meanwhile).
fn to_node(g: &Gateway, ids: &[&str], id: &str, n: usize, body: &str) -> Vec<Response> {
    for &o in ids.iter().filter(|&&o| o != id) {
        drain(g, o, true);
    }
    let out: Vec<Response> = (0..n)
        .map(|_| post(g.port, "/v1/chat/completions", body))
        .collect();
    for &o in ids.iter().filter(|&&o| o != id) {
        drain(g, o, false);
    }
    quiesce(g);
    out
}

/// The status JSON of node `id` of pool "llm".
fn node_status(g: &Gateway, id: &str) -> Value {
    let s = get(g.port, "/rsbalancer/status").json();
    s["pools"]["llm"]["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .find(|n| n["id"] == id)
        .cloned()
        .unwrap_or_else(|| panic!("node {id} in {s}"))
}

fn body_text(r: &Response) -> String {
    assert_eq!(r.status, 200, "{}", r.text());
    r.text()
}

/// One mock node "a" behind a gateway whose pool has `extra` merged in.
struct One {
    a: MockNode,
    g: Gateway,
    _mocks: Nginx,
    _dir: TestDir,
}

fn one_node(name: &str, extra: Value) -> One {
    let dir = TestDir::new(name);
    let a = MockNode::new("a", 0);
    let _mocks = start_mocks(&dir, std::slice::from_ref(&a));
    let g = start_gateway(&dir, &pool(&[&a], extra));
    One {
        a,
        g,
        _mocks,
        _dir: dir,
    }
}

const STREAM_USAGE: &str = r#"{"model":"mock-llm","stream":true,"stream_options":{"include_usage":true},"max_tokens":5,"messages":[{"role":"user","content":"Say hello."}]}"#;
const JSON_7: &str =
    r#"{"model":"mock-llm","max_tokens":7,"messages":[{"role":"user","content":"Say hello."}]}"#;

#[test]
fn ttft_is_measured_from_the_first_content_event_not_the_keep_alives() {
    let _s = serial();
    let dir = TestDir::new("stream-ttft");
    let fast = MockNode::new("fast", 0);
    let mut queued = MockNode::new("queued", 0);
    queued.server_extra = "set $mock_preamble_ms 400;".into();
    let _mocks = start_mocks(&dir, &[fast.clone(), queued.clone()]);
    let g = &start_gateway(&dir, &pool(&[&fast, &queued], json!({})));
    let ids = ["fast", "queued"];
    for id in ids {
        for r in to_node(g, &ids, id, 3, STREAM_BODY) {
            let t = body_text(&r);
            assert!(t.ends_with("data: [DONE]\n\n"), "{t}");
            if id == "queued" {
                assert!(
                    t.starts_with(": keep-alive"),
                    "the client sees the keep-alives: {t}"
                );
            }
        }
    }
    let (f, q) = (node_status(g, "fast"), node_status(g, "queued"));
    let ttft = |n: &Value| {
        n["stream"]["ttft_ms"]
            .as_f64()
            .unwrap_or_else(|| panic!("ttft in {n}"))
    };
    // Both nodes sent their headers at once: only the first content event tells them apart.
    assert!(ttft(&q) > ttft(&f), "queued {q}\nfast {f}");
    let queue_ms = q["stream"]["queue_ms"].as_f64().expect("queue_ms");
    assert!(queue_ms > 0.0, "{q}");
    assert!(f["stream"]["queue_ms"].as_f64().unwrap_or(0.0) < queue_ms, "{f}");
    assert_eq!(q["stream"]["stream_failures"], 0, "{q}");
    // Visible in /metrics too.
    let m = get(g.port, "/metrics").text();
    assert!(
        m.contains("rsbalancer_node_ttft_seconds{pool=\"llm\",node=\"queued\""),
        "{m}"
    );
    assert!(
        m.contains("rsbalancer_node_queue_before_first_token_seconds"),
        "{m}"
    );
}

#[test]
fn tokens_are_counted_from_usage_in_json_and_in_streams() {
    let _s = serial();
    let One { g, .. } = &one_node("stream-tokens", json!({}));
    for _ in 0..2 {
        assert!(body_text(&g.chat_with(JSON_7)).contains("\"completion_tokens\":7"));
    }
    for _ in 0..3 {
        let t = body_text(&g.chat_with(STREAM_USAGE));
        // The client asked for usage: it gets the usage chunk.
        assert!(t.contains("\"choices\":[],\"usage\""), "{t}");
    }
    // A stream without usage counts no token (and is no failure).
    body_text(&g.chat_with(STREAM_BODY));
    quiesce(g);
    let s = node_status(g, "a");
    assert_eq!(s["stream"]["completion_tokens"], 2 * 7 + 3 * 5, "{s}");
    assert_eq!(s["stream"]["stream_failures"], 0, "{s}");
    assert_eq!(s["failures"], 0, "{s}");
    // (No time per token asserted here: 5 tokens 5 ms apart may reach a busy gateway
    // in one read, which measures none. The cost-model test below needs it.)
    let st = get(g.port, "/rsbalancer/status").json();
    let mean = st["pools"]["llm"]["mean_completion_tokens"]
        .as_f64()
        .expect("mean");
    assert!((5.0..=7.0).contains(&mean), "{st}");
    let m = get(g.port, "/metrics").text();
    assert!(
        m.contains("rsbalancer_node_completion_tokens_total{pool=\"llm\",node=\"a\",arm=\"primary\"} 29"),
        "{m}"
    );
}

#[test]
fn include_usage_is_added_and_its_chunk_dropped_for_a_client_that_did_not_ask() {
    let _s = serial();
    let One { a, g, .. } = &one_node("stream-add-usage", json!({ "stream": { "add_usage": true } }));
    let t = body_text(&g.chat_with(STREAM_BODY));
    assert!(!t.contains("\"usage\""), "the client did not ask for usage: {t}");
    assert!(t.ends_with("data: [DONE]\n\n"), "{t}");
    assert!(t.contains("\"finish_reason\":\"stop\""), "{t}");
    assert_eq!(
        mock_state_idle(a.port)["last_include_usage"],
        true,
        "the node was asked"
    );
    // A client that asked keeps its chunk.
    let t = body_text(&g.chat_with(STREAM_USAGE));
    assert!(t.contains("\"choices\":[],\"usage\""), "{t}");
    // One that said no is left alone.
    let no = STREAM_USAGE.replace("\"include_usage\":true", "\"include_usage\":false");
    let t = body_text(&g.chat_with(&no));
    assert!(!t.contains("\"usage\""), "{t}");
    assert_eq!(mock_state_idle(a.port)["last_include_usage"], false);
    quiesce(g);
    // Tokens of the first two (10 each: no max_tokens in the first, 5 in the second).
    let s = node_status(g, "a");
    assert_eq!(s["stream"]["completion_tokens"], 10 + 5, "{s}");
}

#[test]
fn a_stream_without_done_or_finish_reason_is_a_failure_of_its_node() {
    let _s = serial();
    let One { a, g, .. } = &one_node("stream-cut", json!({ "outlier": { "consecutive_failures": 0 } }));
    body_text(&g.chat_with(STREAM_BODY));
    quiesce(g);
    assert_eq!(node_status(g, "a")["failures"], 0);
    mock_set(a, "no_done=1");
    let t = body_text(&g.chat_with(STREAM_BODY));
    assert!(!t.contains("[DONE]"), "{t}");
    quiesce(g);
    let s = node_status(g, "a");
    assert_eq!(
        (s["failures"].as_u64(), s["stream"]["stream_failures"].as_u64()),
        (Some(1), Some(1)),
        "{s}"
    );
    // A JSON answer is not a stream: no [DONE] to miss.
    body_text(&g.chat_with(JSON_7));
    quiesce(g);
    assert_eq!(node_status(g, "a")["stream"]["stream_failures"], 1);
    let m = get(g.port, "/metrics").text();
    assert!(
        m.contains("rsbalancer_node_stream_failures_total{pool=\"llm\",node=\"a\",arm=\"primary\"} 1"),
        "{m}"
    );
}

#[test]
fn a_node_with_long_answers_is_not_treated_as_slow_against_one_with_a_slow_first_token() {
    let _s = serial();
    let dir = TestDir::new("stream-cost");
    // long: first token at once, 300 tokens at 2 ms; queued: 400 ms of keep-alives,
    // then 3 tokens at 5 ms. Whole answers: long is the slower; per token and to the
    // first token, the faster.
    let mut long = MockNode::new("long", 0);
    long.chunk_ms = 2;
    long.server_extra = "set $mock_tokens 300;".into();
    let mut queued = MockNode::new("queued", 0);
    queued.server_extra = "set $mock_preamble_ms 400; set $mock_tokens 3;".into();
    let _mocks = start_mocks(&dir, &[long.clone(), queued.clone()]);
    let g = &start_gateway(
        &dir,
        &pool(&[&long, &queued], json!({ "stream": { "add_usage": true } })),
    );
    let ids = ["long", "queued"];
    // Both measured first.
    for id in ids {
        to_node(g, &ids, id, 2, STREAM_BODY);
    }
    let before: Vec<u64> = ids
        .iter()
        .map(|id| node_status(g, id)["requests"].as_u64().unwrap())
        .collect();
    for _ in 0..12 {
        body_text(&g.chat_with(STREAM_BODY));
    }
    quiesce(g);
    let (l, q) = (node_status(g, "long"), node_status(g, "queued"));
    let mean = |n: &Value| n["latency_sum_us"].as_f64().unwrap() / n["requests"].as_f64().unwrap();
    // By whole-response latency the long node is the slower (so plain peak EWMA, and
    // the slow-node check at its default factor 2, would send the traffic to queued)...
    assert!(mean(&l) > mean(&q), "long {l}\nqueued {q}");
    // ...but the cost model sends it the most.
    let picks = [
        l["requests"].as_u64().unwrap() - before[0],
        q["requests"].as_u64().unwrap() - before[1],
    ];
    assert!(picks[0] > picks[1], "picks {picks:?}\nlong {l}\nqueued {q}");
}
