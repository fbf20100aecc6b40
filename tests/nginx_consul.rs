//! Consul discovery end to end: a real nginx (2 workers, the real module, the demo
//! gateway) whose pool's nodes come from Consul, mock LLM nodes behind it, and the
//! **Consul stand-in** of `tests/support/consul.rs` in place of a Consul agent
//! (Debian has no Consul server; the stand-in implements the part of Consul's HTTP
//! API used, from Consul's documentation, and runs the checks as an agent does).

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::consul::{Standin, StandinOptions};
use support::*;

/// A health query to the stand-in: (status, X-Consul-Index, body).
fn health(c: &Standin, query: &str, token: Option<&str>) -> (u16, u64, serde_json::Value) {
    let headers: Vec<(&str, &str)> = token.map(|t| ("X-Consul-Token", t)).into_iter().collect();
    let r = http_with(
        c.port,
        "GET",
        &format!("/v1/health/service/{query}"),
        &headers,
        None,
    )
    .expect("stand-in health query");
    let index = r
        .header("X-Consul-Index")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let body = if r.status == 200 {
        r.json()
    } else {
        json!(r.text())
    };
    (r.status, index, body)
}

/// The stand-in itself behaves as Consul's documentation says (no nginx here): a
/// blocking query holds until a change, `passing` and `tag` filter, the index only
/// grows, TTL checks move the status, deregistered instances leave.
#[test]
fn consul_standin_follows_the_documented_api() {
    let c = Standin::start(StandinOptions::default());
    c.register(&json!({
        "Name": "svc", "ID": "svc-1", "Tags": ["v1", "blue"], "Port": 9001,
        "Check": {"TTL": "30s", "Status": "passing"}
    }));
    c.register(
        &json!({"Name": "svc", "ID": "svc-2", "Tags": ["v1"], "Port": 9002,
                       "Check": {"TTL": "30s"}}),
    );
    let (st, i1, all) = health(&c, "svc", None);
    assert_eq!(st, 200);
    assert_eq!(all.as_array().unwrap().len(), 2);
    let (_, _, passing) = health(&c, "svc?passing", None);
    assert_eq!(
        passing.as_array().unwrap().len(),
        1,
        "svc-2's check starts critical"
    );
    assert_eq!(passing[0]["Service"]["ID"], "svc-1");
    assert_eq!(passing[0]["Node"]["Address"], "127.0.0.1");
    assert_eq!(passing[0]["Service"]["Address"], "");
    let (_, _, blue) = health(&c, "svc?tag=blue&tag=v1", None);
    assert_eq!(blue.as_array().unwrap().len(), 1);
    // A blocking query at the current index holds until a change.
    let t0 = Instant::now();
    let (held, (_, i2, after)) = std::thread::scope(|s| {
        let h = s.spawn(|| health(&c, &format!("svc?passing&index={i1}&wait=20s"), None));
        std::thread::sleep(Duration::from_millis(300));
        let held = !h.is_finished();
        c.ttl("pass", "service:svc-2");
        (held, h.join().unwrap())
    });
    assert!(held, "the blocking query answered before any change");
    assert!(
        t0.elapsed() < Duration::from_secs(15),
        "the change did not wake the query"
    );
    assert!(i2 > i1);
    assert_eq!(after.as_array().unwrap().len(), 2);
    // A query with an old index answers at once; wait elapses with no change.
    let (_, i3, _) = health(&c, &format!("svc?index={i1}&wait=10s"), None);
    assert_eq!(i3, i2);
    let (_, i4, _) = health(&c, &format!("svc?index={i2}&wait=100ms"), None);
    assert_eq!(i4, i2);
    c.deregister("svc-1");
    let (_, i5, left) = health(&c, "svc?passing", None);
    assert!(i5 > i2);
    assert_eq!(left.as_array().unwrap().len(), 1);
    assert_eq!(health(&c, "svc?dc=elsewhere", None).0, 500);
}

#[test]
fn consul_standin_checks_acl_tokens() {
    let c = Standin::start(StandinOptions {
        token: Some("s3cret".into()),
        ..StandinOptions::default()
    });
    c.register(&json!({"Name": "svc", "Port": 1}));
    assert_eq!(health(&c, "svc", None).0, 403);
    assert_eq!(health(&c, "svc", Some("wrong")).0, 403);
    assert_eq!(health(&c, "svc", Some("s3cret")).0, 200);
    assert_eq!(c.last_token().as_deref(), Some("s3cret"));
}
