//! End-to-end tests of provider headroom and token/request budgets (README
//! "Provider headroom and budgets") inside real nginx (2 workers) in front of mock
//! nodes that behave like the providers: OpenAI's `x-ratelimit-*` headers (duration
//! resets), Anthropic's `anthropic-ratelimit-*` (RFC 3339 resets), `retry-after-ms`,
//! and a DeepSeek-like node with a hidden per-minute limit and no headers
//! (`limit_style` and friends in nginx-conf/demo/lua/mock_llm.lua).
//!
//! Run with `make build` then `RSB_LUA_SO=$PWD/build/lib/rsbalancer.so cargo test
//! --no-default-features --test nginx_headroom -- --test-threads=1`. They need nginx
//! with lua-nginx-module and fail (never skip) without them: see tests/support/mod.rs.
//!
//! No assertion depends on how long something took: resets are several seconds
//! long, and "used again after the reset" is waited for.

mod support;

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{json, Value};
use support::*;

fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Slow nodes are not set apart (`slow_factor` 0): a node's cold first answer (20 ms
/// against 5 ms) would rank it slow and keep these tests' requests from it.
fn config(nodes: Vec<Value>) -> Value {
    json!({ "pools": { "llm": { "algorithm": "round_robin", "nodes": nodes, "slow_start_ms": 0,
                                "limit": { "slow_factor": 0.0 } } } })
}

fn received(m: &MockNode) -> u64 {
    get(m.port, "/mock/state").json()["received"]
        .as_u64()
        .expect("received")
}

/// A chat body of about `prompt_bytes` bytes asking for `max_tokens`.
fn body(max_tokens: u32) -> String {
    format!(
        r#"{{"model":"mock-llm","max_tokens":{max_tokens},"messages":[{{"role":"user","content":"Say hello."}}]}}"#
    )
}

fn chat(g: &Gateway, max_tokens: u32) -> Response {
    post(g.port, "/v1/chat/completions", &body(max_tokens))
}

/// Sends small requests until `m` has received one more than `before` (at most 40).
fn until_received(g: &Gateway, m: &MockNode, before: u64) {
    for _ in 0..40 {
        let r = chat(g, 10);
        assert_eq!(r.status, 200, "{}", r.text());
        if received(m) > before {
            // The gateway reads the answer's headers in its log phase, after the
            // client has the answer: wait until that try is reported.
            quiesce(g);
            return;
        }
    }
    panic!("{} never received a request", m.name);
}

/// Two mock nodes a and b (5 ms) behind a gateway (round robin); `a_knobs` set on a
/// (`/mock/set`), `budgets` merged into the nodes' configs (`tpm`, `rpm`).
struct Setup {
    a: MockNode,
    b: MockNode,
    g: Gateway,
    _mocks: Nginx,
    _dir: TestDir,
}

fn setup(name: &str, latency_ms: u32, knobs: [&str; 2], budgets: [Value; 2]) -> Setup {
    let dir = TestDir::new(name);
    let (a, b) = (MockNode::new("a", latency_ms), MockNode::new("b", latency_ms));
    let mocks = start_mocks(&dir, &[a.clone(), b.clone()]);
    for (m, k) in [(&a, knobs[0]), (&b, knobs[1])] {
        if !k.is_empty() {
            mock_set(m, k);
        }
    }
    let nodes = [(&a, &budgets[0]), (&b, &budgets[1])]
        .iter()
        .map(|(m, extra)| {
            let mut n = json!({ "id": m.name, "addr": m.addr() });
            if let Value::Object(e) = extra {
                for (k, v) in e {
                    n[k] = v.clone();
                }
            }
            n
        })
        .collect();
    let g = start_gateway(&dir, &config(nodes));
    Setup {
        a,
        b,
        g,
        _mocks: mocks,
        _dir: dir,
    }
}

#[test]
fn remaining_zero_rests_the_node_until_its_reset() {
    let _s = serial();
    let Setup { a, g, .. } = &setup(
        "headroom-zero",
        5,
        [
            "limit_style=openai&rpm_limit=1000&tpm_limit=1000000&hdr_remaining_requests=0&hdr_reset_requests=%2B6",
            "",
        ],
        [Value::Null, Value::Null],
    );
    until_received(g, a, 0);
    // a said "no request left, reset in 6 s" (x-ratelimit-reset-requests: 6.000s).
    mock_set(a, "hdr_remaining_requests=");
    let seen = received(a);
    let st = g.stats();
    assert_eq!(st["a"]["state"], "cooling", "{st}");
    assert_eq!(st["a"]["remaining_requests"], 0, "{st}");
    for _ in 0..10 {
        let r = chat(g, 10);
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(received(a), seen, "no try went to a before its reset");
    // After the reset a is used again.
    wait_until(Duration::from_secs(30), "a used again after its reset", || {
        let r = chat(g, 10);
        assert_eq!(r.status, 200, "{}", r.text());
        received(a) > seen
    });
}

/// A node that sends no rate-limit headers is read only at a probe, every 256th of its
/// responses per worker (lua/resty/rsbalancer.lua, note_headroom): once it starts
/// sending them they are seen within that many responses of each of the 2 workers.
#[test]
fn a_node_that_starts_sending_headers_is_seen_at_a_probe() {
    let _s = serial();
    let Setup { a, g, .. } = &setup("headroom-late", 1, ["", ""], [Value::Null, Value::Null]);
    // More than enough answers without headers for every worker to stop reading a's.
    for _ in 0..40 {
        let r = chat(g, 10);
        assert_eq!(r.status, 200, "{}", r.text());
    }
    mock_set(
        a,
        "limit_style=openai&rpm_limit=1000&tpm_limit=1000000&hdr_remaining_requests=0&hdr_reset_requests=%2B60",
    );
    let start = received(a);
    let bound = 2 * 256 + 16;
    loop {
        for _ in 0..16 {
            let r = chat(g, 10);
            assert_eq!(r.status, 200, "{}", r.text());
        }
        quiesce(g);
        let st = g.stats();
        if st["a"]["state"] == "cooling" {
            assert_eq!(st["a"]["remaining_requests"], 0, "{st}");
            break;
        }
        let sent = received(a) - start;
        assert!(
            sent <= bound,
            "a's headers unread after {sent} of its answers: {st}"
        );
    }
}

fn too_few_tokens_skip_big_requests(style: &str) {
    let _s = serial();
    let knobs = format!(
        "limit_style={style}&rpm_limit=1000&tpm_limit=1000000&hdr_remaining_tokens=400&hdr_reset_tokens=%2B60"
    );
    let Setup { a, g, .. } = &setup(
        &format!("headroom-tokens-{style}"),
        5,
        [&knobs, ""],
        [Value::Null, Value::Null],
    );
    until_received(g, a, 0);
    let st = g.stats();
    assert_eq!(st["a"]["remaining_tokens"], 400, "{st}");
    let m = get(g.port, "/metrics").text();
    assert!(
        m.lines()
            .any(|l| l.starts_with("rsbalancer_node_remaining_tokens{")
                && l.contains("node=\"a\"")
                && l.ends_with(" 400")),
        "remaining tokens in /metrics:\n{m}"
    );
    let seen = received(a);
    // About 25 prompt tokens + 2000: more than a's 400.
    for _ in 0..10 {
        let r = chat(g, 2_000);
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(received(a), seen, "no big request went to a");
    assert!(stat(&g.stats(), "a", "headroom_skips") > 0);
    // Small ones (about 35 tokens) still do.
    until_received(g, a, seen);
}

#[test]
fn openai_too_few_tokens_skip_big_requests_only() {
    too_few_tokens_skip_big_requests("openai");
}

#[test]
fn anthropic_too_few_tokens_skip_big_requests_only() {
    too_few_tokens_skip_big_requests("anthropic");
}

#[test]
fn retry_after_ms_rests_the_node() {
    let _s = serial();
    // A hidden limit of one request a minute, refused with retry-after-ms only.
    let Setup { a, g, .. } = &setup(
        "headroom-ra-ms",
        5,
        ["limit_style=hidden&rpm_limit=1&ra_ms=1", ""],
        [Value::Null, Value::Null],
    );
    for _ in 0..6 {
        let r = chat(g, 10);
        assert_eq!(r.status, 200, "the 429 is retried on b: {}", r.text());
    }
    let st = get(a.port, "/mock/state").json();
    assert!(st["window_rejected"].as_u64().unwrap() >= 1, "{st}");
    let s = g.stats();
    assert_eq!(s["a"]["state"], "cooling", "{s}");
    assert!(
        stat(&s, "a", "unavailable_ms") > 20_000,
        "rested per retry-after-ms: {s}"
    );
}

#[test]
fn budgets_keep_hidden_limits_and_answer_429_when_spent() {
    let _s = serial();
    // DeepSeek-like: no headers, a hidden limit per minute, 429 once it is reached.
    let Setup { a, b, g, .. } = &setup(
        "headroom-budgets",
        20,
        [
            "limit_style=hidden&tpm_limit=1500",
            "limit_style=hidden&rpm_limit=4",
        ],
        [json!({ "tpm": 1500 }), json!({ "rpm": 4 })],
    );
    let estimate = body(100).len() as u64 / 4 + 100;
    let answers = run_parallel(40, 8, |_| chat(g, 100));
    for r in &answers {
        assert!(
            r.status == 200 || r.status == 429,
            "never a 5xx: {} {}",
            r.status,
            r.text()
        );
        if r.status == 429 {
            let secs: u64 = r
                .header("Retry-After")
                .expect("Retry-After")
                .parse()
                .expect("whole seconds");
            assert!((1..=70).contains(&secs), "until a bucket leaves: {secs}");
            assert!(r.header("X-RSB-Admission").is_some(), "a gateway answer");
        }
    }
    let ok = answers.iter().filter(|r| r.status == 200).count() as u64;
    let sa = mock_state_idle(a.port);
    let sb = mock_state_idle(b.port);
    assert_eq!(sa["window_rejected"], 0, "no 429 from a: {sa}");
    assert_eq!(sb["window_rejected"], 0, "no 429 from b: {sb}");
    let max_t = sa["max_window_tokens"].as_u64().unwrap();
    assert!(
        max_t <= 1500 + estimate,
        "a's window {max_t} over TPM + one estimate"
    );
    assert!(max_t >= 1500, "a's budget was used: {max_t}");
    assert_eq!(sb["max_window_requests"], 4, "b took its rpm: {sb}");
    assert_eq!(
        ok,
        sa["received"].as_u64().unwrap() + sb["received"].as_u64().unwrap()
    );
    assert!(ok < 40, "some were refused");
    let s = quiesce(g);
    assert!(stat(&s, "a", "budget_tokens_used") >= 1500, "{s}");
    assert_eq!(stat(&s, "b", "budget_requests_used"), 4, "{s}");
    // Visible in /metrics and /rsbalancer/status.
    let m = get(g.port, "/metrics").text();
    let line = |name: &str, node: &str| {
        m.lines()
            .find(|l| l.starts_with(&format!("{name}{{")) && l.contains(&format!("node=\"{node}\"")))
            .unwrap_or_else(|| panic!("{name} of {node} missing:\n{m}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse::<f64>()
            .unwrap()
    };
    assert_eq!(line("rsbalancer_node_budget_tpm", "a"), 1500.0);
    assert!(line("rsbalancer_node_budget_tokens_used", "a") >= 1500.0);
    assert_eq!(line("rsbalancer_node_budget_requests_used", "b"), 4.0);
    assert!(
        line("rsbalancer_node_budget_skips_total", "a") + line("rsbalancer_node_budget_skips_total", "b")
            > 0.0
    );
    let st = http_with(
        g.port,
        "GET",
        "/rsbalancer/status",
        &[("Accept", "application/json")],
        None,
    )
    .expect("status")
    .json();
    let nodes = st["pools"]["llm"]["nodes"].as_array().expect("nodes");
    let a_st = nodes.iter().find(|n| n["id"] == "a").expect("a");
    assert_eq!(a_st["tpm"], 1500, "{a_st}");
    assert!(
        a_st["unavailable_ms"].as_u64().unwrap() > 0,
        "a is out of budget: {a_st}"
    );
}

/// A budgeted node's reservation is settled with what the answer's `usage` says it
/// cost (the body filter reads it, `log()` settles): requests asking for up to 5,000
/// tokens that use a few dozen leave a few dozen each in the window, not 5,000.
#[test]
fn usage_settles_the_reservation_of_a_budgeted_node() {
    let _s = serial();
    let Setup { a, b, g, .. } = &setup(
        "headroom-usage",
        5,
        ["tokens=7", "tokens=7"],
        [json!({ "tpm": 1_000_000 }), json!({ "tpm": 1_000_000 })],
    );
    let estimate = body(5000).len() as u64 / 4 + 5000;
    for _ in 0..10 {
        let r = chat(g, 5000);
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(
            r.text().contains("\"usage\""),
            "the mock reports usage: {}",
            r.text()
        );
    }
    let s = quiesce(g);
    let served = received(a) + received(b);
    assert_eq!(served, 10);
    let used = stat(&s, "a", "budget_tokens_used") + stat(&s, "b", "budget_tokens_used");
    assert!(used > 0, "the window holds what was used: {s}");
    assert!(
        used < served * estimate / 10,
        "the window holds {used} tokens for {served} answers of 7 tokens: estimates ({estimate} each) were kept, not settled with usage: {s}"
    );
}
