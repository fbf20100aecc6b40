//! The fleet-wide admission queue end to end (cluster mode: docs/cluster.md, "The
//! fleet's queue"): two nginx gateways A and B (2 workers each, the demo template) in
//! front of one mock node, sharing a real `redis-server` that the test starts.
//!
//! The node takes 2 requests at once; each gateway's learned limit is capped at 1
//! (`limit.max`; `limit.fleet` off: each gateway keeps its own), so the fleet never
//! sends it more than it takes, and each gateway has
//! one slot (the learning bursts' 429s at that floor are not taken for a spent quota:
//! `cooldown.quota_after`). A long request (`mock_hold_ms`) holds a gateway's slot while others queue
//! behind it. The node numbers its requests as they arrive (`X-Mock-Seq`): the order
//! the gateways let them through.
//!
//! Run with `make build` then `RSB_LUA_SO=$PWD/build/lib/rsbalancer.so cargo test
//! --no-default-features --test nginx_fleet_queue -- --test-threads=1`. They need nginx
//! with lua-nginx-module and redis-server, and fail (never skip) without them.
//!
//! No assertion depends on how long something took: each waits for a state (the
//! status document, Redis) and gives up only after a generous bound.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::Duration;

use ::redis::Commands;
use serde_json::{json, Value};
use support::redis::Redis;
use support::*;

const PATIENCE: Duration = Duration::from_secs(30);
/// How long a holding request keeps its gateway's slot: longer than the setup of a
/// scenario (checked: the setup ends by asserting that both holds still run).
const HOLD_MS: u64 = 6_000;
/// The fleet's queue of pool llm.
const QUEUE: &str = "rsb:q:llm";

fn config(redis: Option<&Redis>, gateway: &str, a: &MockNode) -> Value {
    let mut c = json!({ "pools": { "llm": {
        "algorithm": "p2c_ewma",
        "slow_start_ms": 0,
        "limit": { "max": 1, "increase_every": 100, "fleet": false },
        "cooldown": { "quota_after": 1000 },
        "nodes": [ { "id": "a", "addr": a.addr(), "weight": 1 } ],
        "admission": { "enabled": true, "untrusted_max": 10, "aging_ms": 0, "classes": [
            { "min_priority": 1, "max_wait_ms": 20000, "max_queue": 16 } ] },
    } } });
    if let Some(r) = redis {
        c["cluster"] =
            json!({ "redis": format!("redis://127.0.0.1:{}", r.port), "sync_ms": 100, "gateway": gateway });
    }
    c
}

/// A reply: status, Retry-After, and the node's X-Mock-Seq (0 when none).
#[derive(Debug)]
struct Reply {
    status: u16,
    retry_after: Option<u64>,
    seq: u64,
}

/// One chat completion with `X-Priority: prio` on a fresh connection, held `hold_ms`
/// at the node when given. Status 0: no response (the gateway was killed).
fn chat(port: u16, prio: u32, hold_ms: Option<u64>) -> Reply {
    let none = Reply {
        status: 0,
        retry_after: None,
        seq: 0,
    };
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return none;
    };
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let body = match hold_ms {
        Some(ms) => format!(
            r#"{{"model":"mock-llm","mock_hold_ms":{ms},"messages":[{{"role":"user","content":"Hold."}}]}}"#
        ),
        None => CHAT_BODY.to_string(),
    };
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\
         X-Priority: {prio}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    if s.write_all(req.as_bytes()).is_err() {
        return none;
    }
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw);
    let head = text.split("\r\n\r\n").next().unwrap_or("");
    let header = |name: &str| {
        head.lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
            .and_then(|(_, v)| v.trim().parse().ok())
    };
    Reply {
        status: text.split(' ').nth(1).and_then(|v| v.parse().ok()).unwrap_or(0),
        retry_after: header("Retry-After"),
        seq: header("X-Mock-Seq").unwrap_or(0),
    }
}

fn admission(g: &Gateway) -> Value {
    let r = get(g.port, "/rsbalancer/status");
    assert_eq!(r.status, 200, "status: {}", r.text());
    r.json()["pools"]["llm"]["admission"].clone()
}

fn wait_admission(g: &Gateway, what: &str, cond: impl Fn(&Value) -> bool) {
    let mut last = Value::Null;
    wait_until(PATIENCE, what, || {
        last = admission(g);
        cond(&last)
    });
}

fn metric(g: &Gateway, name: &str) -> Option<f64> {
    let text = get(g.port, "/metrics").text();
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

fn redis_conn(r: &Redis) -> ::redis::Connection {
    ::redis::Client::open(format!("redis://127.0.0.1:{}", r.port))
        .unwrap()
        .get_connection()
        .expect("connect to the test's redis")
}

/// The members of the fleet's queue, best first.
fn members(r: &Redis) -> Vec<String> {
    redis_conn(r).zrange(QUEUE, 0, -1).expect("ZRANGE")
}

/// Gateways A and B in front of node a (2 at once), each with its limit of a learned
/// (1); with `cluster`, sharing a Redis of their own.
struct Pair {
    gws: Vec<Gateway>,
    redis: Option<Redis>,
    _mocks: Nginx,
    _dirs: Vec<TestDir>,
}

fn pair(name: &str, cluster: bool) -> Pair {
    let redis = cluster.then(Redis::start);
    let mdir = TestDir::new(&format!("fq-mocks-{name}"));
    let mut a = MockNode::new("a", 200);
    a.max_conc = 2;
    let mocks = start_mocks(&mdir, std::slice::from_ref(&a));
    let mut dirs: Vec<TestDir> = ["A", "B"]
        .iter()
        .map(|g| TestDir::new(&format!("fq-{name}-{g}")))
        .collect();
    let gws: Vec<Gateway> = dirs
        .iter()
        .zip(["A", "B"])
        .map(|(d, g)| start_gateway(d, &config(redis.as_ref(), g, &a)))
        .collect();
    for g in &gws {
        if cluster {
            wait_until(PATIENCE, "the gateway in a fleet of 2", || {
                metric(g, "rsbalancer_cluster_gateways") == Some(2.0)
                    && metric(g, "rsbalancer_cluster_up") == Some(1.0)
            });
        }
        // Bursts of 6 at a node that takes 2: it refuses some, the limit is learned
        // (and capped at 1).
        let port = g.port;
        let mut bursts = 0;
        while limits(g) != [1.0] {
            bursts += 1;
            assert!(bursts < 20, "no limit learned: {:?}", limits(g));
            run_parallel(6, 6, |_| chat(port, 5, None));
        }
        wait_admission(g, "the learning burst released", |a| {
            a["admitted"] == json!(0) && a["queue_len"] == json!(0)
        });
    }
    mock_set(&a, "latency_ms=300");
    dirs.push(mdir);
    Pair {
        gws,
        redis,
        _mocks: mocks,
        _dirs: dirs,
    }
}

/// Holds `g`'s slot with a request of priority 10, above any waiter elsewhere
/// (joined by the caller), then queues `n` requests of `prio` one after the other (so
/// that their order is known).
fn hold_and_queue<'s>(
    s: &'s thread::Scope<'s, '_>,
    g: &Gateway,
    hold_ms: u64,
    prio: u32,
    n: u64,
) -> (
    thread::ScopedJoinHandle<'s, Reply>,
    Vec<thread::ScopedJoinHandle<'s, Reply>>,
) {
    let port = g.port;
    let hold = s.spawn(move || chat(port, 10, Some(hold_ms)));
    wait_admission(g, "the slot held", |a| a["admitted"] == json!(1));
    let waiters = (1..=n)
        .map(|i| {
            let w = s.spawn(move || chat(port, prio, None));
            wait_admission(g, "a waiter queued", |a| a["queue_len"] == json!(i));
            w
        })
        .collect();
    (hold, waiters)
}

fn join(hs: Vec<thread::ScopedJoinHandle<'_, Reply>>) -> Vec<Reply> {
    hs.into_iter().map(|h| h.join().unwrap()).collect()
}

/// A holds its slot and queues 3 of priority 1, B then holds its slot and queues 3 of
/// priority 9. Returns the node's arrival ranks of A's and B's waiters.
fn low_at_a_then_high_at_b(p: &Pair) -> (Vec<u64>, Vec<u64>) {
    let (a, b) = (&p.gws[0], &p.gws[1]);
    thread::scope(|s| {
        let (hold_a, lows) = hold_and_queue(s, a, HOLD_MS, 1, 3);
        if let Some(r) = &p.redis {
            wait_until(PATIENCE, "A's waiters in the fleet's queue", || {
                members(r).len() == 3
            });
        }
        let (hold_b, highs) = hold_and_queue(s, b, HOLD_MS, 9, 3);
        if p.redis.is_some() {
            wait_admission(a, "A to see B's waiters", |x| {
                x["fleet"]["elsewhere_by_priority"][8] == json!(3)
            });
        }
        for (g, who) in [(a, "A"), (b, "B")] {
            let st = admission(g);
            assert!(
                st["admitted"] == json!(1) && st["queue_len"] == json!(3),
                "{who}'s hold ended before the setup did (raise HOLD_MS): {st}"
            );
        }
        let (lows, highs) = (join(lows), join(highs));
        for r in join(vec![hold_a, hold_b]).iter().chain(&lows).chain(&highs) {
            assert_eq!(r.status, 200, "{r:?}");
        }
        let seqs = |rs: &[Reply]| rs.iter().map(|r| r.seq).collect::<Vec<_>>();
        (seqs(&lows), seqs(&highs))
    })
}

/// A's low-priority waiters came first, but B's high-priority ones reach the node
/// before any of them: A keeps its freed slot while better waiters wait at B.
#[test]
fn the_fleet_serves_the_highest_priority_first_across_gateways() {
    let p = pair("order", true);
    let (lows, highs) = low_at_a_then_high_at_b(&p);
    let last_high = *highs.iter().max().unwrap();
    let first_low = *lows.iter().min().unwrap();
    assert!(
        last_high < first_low,
        "B's priority-9 waiters arrived at the node at {highs:?}, A's earlier priority-1 ones at {lows:?}"
    );
    assert!(
        metric(&p.gws[0], "rsbalancer_cluster_queue_holds_total").unwrap_or(0.0) >= 1.0,
        "A kept no slot free"
    );
    let r = p.redis.as_ref().unwrap();
    wait_until(PATIENCE, "the fleet's queue empty", || members(r).is_empty());
    assert_eq!(metric(&p.gws[1], "rsbalancer_cluster_queue_waiting"), Some(0.0));
}

/// The same scenario without the cluster section: each gateway serves its own queue,
/// and A's first low-priority waiter reaches the node before B's last high one.
#[test]
fn without_a_cluster_each_gateway_serves_its_own_queue() {
    let p = pair("alone", false);
    let (lows, highs) = low_at_a_then_high_at_b(&p);
    assert!(
        lows.iter().min() < highs.iter().max(),
        "A's waiters arrived at {lows:?}, B's at {highs:?}"
    );
}

/// A gateway killed with SIGKILL (master and workers) while its high-priority waiters
/// are in the fleet's queue: after its lease, they are gone from Redis (only B's are
/// left) and B's low-priority waiters, which they outranked, are served.
#[test]
fn a_killed_gateway_leaves_no_entry_behind_after_its_lease() {
    let mut p = pair("kill", true);
    let r = p.redis.take().unwrap();
    thread::scope(|s| {
        let (a, b) = (&p.gws[0], &p.gws[1]);
        let (_hold_a, _highs) = hold_and_queue(s, a, HOLD_MS, 9, 3);
        wait_until(PATIENCE, "A's waiters in the fleet's queue", || {
            members(&r).len() == 3
        });
        let (hold_b, lows) = hold_and_queue(s, b, 2 * HOLD_MS, 1, 3);
        wait_until(PATIENCE, "both gateways' waiters in the fleet's queue", || {
            members(&r).len() == 6
        });
        wait_admission(b, "B to see A's waiters", |x| {
            x["fleet"]["elsewhere_by_priority"][8] == json!(3)
        });
        let nginx = &a.nginx;
        for pid in nginx.workers().into_iter().chain([nginx.pid()]) {
            signal(pid, 9);
        }
        wait_until(PATIENCE, "A's entries gone from Redis", || {
            let m = members(&r);
            m.len() == 3 && m.iter().all(|x| x.starts_with("B/"))
        });
        let st = admission(b);
        assert_eq!(
            (st["admitted"].clone(), st["queue_len"].clone()),
            (json!(1), json!(3)),
            "B's hold ended before A's entries left (raise HOLD_MS): {st}"
        );
        for w in join(lows).iter().chain([&hold_b.join().unwrap()]) {
            assert_eq!(w.status, 200, "{w:?}");
        }
    });
    wait_until(PATIENCE, "the fleet's queue empty", || members(&r).is_empty());
}

/// Redis killed while A keeps its slot for B's better waiters (B's slot held long):
/// A's waiters are then served at once, B's after its hold, requests sent during the
/// outage too; no client request fails.
#[test]
fn redis_killed_while_requests_wait_fails_no_request() {
    let mut p = pair("redis", true);
    let mut r = p.redis.take().unwrap();
    let (a, b) = (&p.gws[0], &p.gws[1]);
    thread::scope(|s| {
        let (hold_b, highs) = hold_and_queue(s, b, 3 * HOLD_MS, 9, 3);
        wait_admission(a, "A to see B's waiters", |x| {
            x["fleet"]["elsewhere_by_priority"][8] == json!(3)
        });
        let (hold_a, lows) = hold_and_queue(s, a, 1_000, 1, 3);
        wait_admission(a, "A to keep its freed slot", |x| {
            x["fleet"]["holds"].as_u64() >= Some(1) && x["admitted"] == json!(0)
        });
        r.kill();
        wait_until(PATIENCE, "A to see Redis down", || {
            metric(a, "rsbalancer_cluster_up") == Some(0.0)
        });
        let during: Vec<_> = (0..4)
            .map(|i| {
                let port = p.gws[i % 2].port;
                s.spawn(move || chat(port, 3, None))
            })
            .collect();
        let lows = join(lows);
        let st = admission(b);
        assert_eq!(
            st["admitted"],
            json!(1),
            "A's waiters were served only after B's hold ended (raise its hold): {st}"
        );
        for w in lows
            .iter()
            .chain(&join(highs))
            .chain(&join(during))
            .chain(&join(vec![hold_a, hold_b]))
        {
            assert!(
                w.status == 200 || (w.status == 429 && w.retry_after.is_some()),
                "{w:?}"
            );
        }
        assert!(lows.iter().all(|w| w.status == 200), "{lows:?}");
    });
    assert!(a.nginx.error_log().contains("Redis unreachable"));
}
