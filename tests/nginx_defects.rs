//! End-to-end regression tests of issue 17's smaller defects that only real nginx
//! shows: what the client gets when a node answers 429/503 without Retry-After and
//! the pool cannot retry (`header_filter()`), and how a node that closes mid-stream is
//! counted (`body_filter()` + `log()`). Real nginx (2 workers, the demo gateway
//! `nginx-conf/demo/gateway.conf`) in front of mock LLM nodes
//! (`nginx-conf/demo/lua/mock_llm.lua`).
//!
//! Run with `make build` then `RSB_LUA_SO=$PWD/build/lib/rsbalancer.so cargo test
//! --no-default-features --test nginx_defects -- --test-threads=1`. They need nginx
//! with lua-nginx-module and fail (never skip) without them. No assertion depends on
//! how long something took; waits are polls with generous limits.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::{json, Value};
use support::*;

/// A one-node pool "llm" on `node`, with `extra` merged into the pool's settings.
fn one_node(node: &MockNode, extra: Value) -> Value {
    let mut pool = json!({
        "algorithm": "round_robin",
        "slow_start_ms": 0,
        "nodes": [{ "id": node.name, "addr": node.addr() }],
        // Outlier ejection off: each test counts the node's failures itself.
        "outlier": { "consecutive_failures": 0 },
    });
    for (k, v) in extra.as_object().expect("extra is an object") {
        pool[k] = v.clone();
    }
    json!({ "pools": { "llm": pool } })
}

fn mock_set(node: &MockNode, query: &str) {
    let r = post(node.port, &format!("/mock/set?{query}"), "");
    assert_eq!(
        r.status,
        200,
        "mock {} /mock/set?{query}: {}",
        node.name,
        r.text()
    );
}

fn retry_after(r: &Response) -> u64 {
    let v = r
        .header("Retry-After")
        .unwrap_or_else(|| panic!("{} without Retry-After: {:?}", r.status, r.headers));
    v.parse()
        .unwrap_or_else(|_| panic!("Retry-After {v:?} is not whole seconds"))
}

#[test]
fn node_429_or_503_without_retry_after_reaches_the_client_with_one() {
    let dir = TestDir::new("defects-retry-after");
    let node = MockNode::new("q", 1);
    let _mocks = start_mocks(&dir, std::slice::from_ref(&node));
    // One node: no retry is possible, the node's own answer goes to the client. No
    // learned limit, so a 429 means "quota": the node cools for at least base_ms (5 s).
    let cfg = one_node(
        &node,
        json!({
            "limit": { "enabled": false },
            "cooldown": { "base_ms": 5000, "max_ms": 60000 },
        }),
    );
    let g = start_gateway(&dir, &cfg);

    // A 503 with no Retry-After: the node can still take the next request (ejection
    // is off), so the soonest a node is back is now: 1 s, the least.
    mock_set(&node, "fail=503");
    for _ in 0..2 {
        let r = g.chat();
        assert_eq!(r.status, 503, "{}", r.text());
        assert_eq!(
            r.header("X-Node"),
            Some("q"),
            "not the node's own 503: {:?}",
            r.headers
        );
        assert_eq!(retry_after(&r), 1, "{:?}", r.headers);
    }

    // A 429 with no Retry-After: counted before the header goes out, so the client is
    // told when the cooling node is back (>= base_ms), not to come back at once.
    mock_set(&node, "fail=429&retry_after=0");
    let r = g.chat();
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(
        r.header("X-Node"),
        Some("q"),
        "not the node's own 429: {:?}",
        r.headers
    );
    let secs = retry_after(&r);
    assert!(
        (5..=60).contains(&secs),
        "Retry-After {secs}: the node cools for 5..=60 s"
    );
    // The next request finds no node and is answered by admit(), as before.
    let r = g.chat();
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(
        r.header("X-Node"),
        None,
        "the cooling node was tried: {:?}",
        r.headers
    );
    assert!(retry_after(&r) >= 1);

    // Every try was reported exactly once (the 429 in header_filter, not again in log).
    let s = quiesce(&g);
    assert_eq!(stat(&s, "q", "requests"), 3, "{s}");
    assert_eq!(stat(&s, "q", "failures"), 2, "{s}");
    assert_eq!(stat(&s, "q", "busy"), 1, "{s}");
    assert!(
        !g.nginx.error_log().contains("rsbalancer: report"),
        "{}",
        g.nginx.error_log()
    );
}

/// A streamed chat completion read to the end of the connection: (status line, the
/// raw bytes after the header).
fn stream_raw(port: u16) -> (String, Vec<u8>) {
    let body = r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw); // a reset after a truncated body is no test failure
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header in {:?}", String::from_utf8_lossy(&raw)));
    let head = String::from_utf8_lossy(&raw[..end]).to_string();
    let status = head.lines().next().unwrap_or_default().to_string();
    (status, raw[end + 4..].to_vec())
}

#[test]
fn node_closing_mid_stream_counts_as_its_failure_not_a_client_leaving() {
    let dir = TestDir::new("defects-cut-stream");
    let node = MockNode::new("cut", 1);
    let _mocks = start_mocks(&dir, std::slice::from_ref(&node));
    let g = start_gateway(&dir, &one_node(&node, json!({})));

    // The node sends the header and 2 chunks of its SSE stream, then drops the
    // connection: the client gets a 200 with a body that never ends.
    mock_set(&node, "cut_after=2");
    for _ in 0..3 {
        let (status, body) = stream_raw(g.port);
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        let text = String::from_utf8_lossy(&body);
        assert!(text.contains("data: "), "no chunk came: {text:?}");
        assert!(!text.contains("[DONE]"), "the stream was not cut: {text:?}");
        assert!(
            !text.ends_with("0\r\n\r\n"),
            "the body has its last chunk: {text:?}"
        );
    }
    let s = quiesce(&g);
    assert_eq!(stat(&s, "cut", "requests"), 3, "{s}");
    assert_eq!(
        stat(&s, "cut", "failures"),
        3,
        "a stream cut short by the node counted as a success: {s}"
    );

    // Complete streams still count as successes.
    mock_set(&node, "cut_after=");
    for _ in 0..2 {
        let (status, body) = stream_raw(g.port);
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        let text = String::from_utf8_lossy(&body);
        assert!(text.contains("[DONE]") && text.ends_with("0\r\n\r\n"), "{text:?}");
    }
    let r = g.chat(); // and a plain (not streamed) completion
    assert_eq!(r.status, 200, "{}", r.text());
    let s = quiesce(&g);
    assert_eq!(stat(&s, "cut", "requests"), 6, "{s}");
    assert_eq!(
        stat(&s, "cut", "failures"),
        3,
        "a complete response counted as a failure: {s}"
    );

    // A client that leaves mid-stream blames no node: slow chunks, read the first
    // bytes, hang up.
    mock_set(&node, "chunk_ms=300");
    let body = r#"{"model":"m","stream":true,"messages":[]}"#;
    let mut c = TcpStream::connect(("127.0.0.1", g.port)).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        c,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut first = [0u8; 64];
    let n = c.read(&mut first).expect("first bytes");
    assert!(
        first[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&first[..n])
    );
    drop(c);
    let s = quiesce(&g);
    assert_eq!(stat(&s, "cut", "requests"), 7, "{s}");
    assert_eq!(
        stat(&s, "cut", "failures"),
        3,
        "a client leaving counted as the node's failure: {s}"
    );
}
