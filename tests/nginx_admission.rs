//! End-to-end tests of priorities and the admission queue (docs/overload.md: "Priorities and
//! admission queue") inside real nginx (2 workers, the demo gateway
//! `nginx-conf/demo/gateway.conf`: `admit("llm", { untrusted = ngx.var.http_x_priority })`
//! with `lua_check_client_abort on`) in front of mock LLM nodes with known concurrency
//! caps (`nginx-conf/demo/lua/mock_llm.lua`: 429 beyond the cap).
//!
//! Run with `make build` then `RSB_LUA_SO=$PWD/build/lib/rsbalancer.so cargo test
//! --no-default-features --test nginx_admission -- --test-threads=1`. They need nginx
//! with lua-nginx-module and fail (never skip) without them.
//!
//! No assertion depends on how long something took. Waits are polls of the gateway's
//! shared state (`/rsbalancer/status`: admitted, queue_len, counters) with generous
//! limits. Order is checked by the order in which responses complete while one slot
//! serves one request at a time. Goodput is measured, not timed: the time the nodes
//! spent serving successful requests (the gateway's `$upstream_response_time`)
//! against the nodes' capacity × the time the load ran, so a slow machine slows both
//! sides of the ratio.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;

fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A pool "llm" over `mocks` with admission `admission` (merged into the defaults).
///
/// `limit.increase_every` is 100 (default 4): every `increase_every × limit` successes
/// at its learned limit, AIMD tries one request more on a node (a probe for added
/// capacity); on these fixed-capacity mocks every probe is refused with a 429 that the
/// request it landed on cannot retry (every node is full). Admission hands probe slots
/// to the lowest-ranked waiter, but which request p2c places on the probed node is not
/// its choice: with the default pace, ~2.5% of requests of any class meet a probe here
/// (docs/overload.md: "Priorities and admission queue"). These tests are about the queue.
fn config(mocks: &[&MockNode], admission: Value) -> Value {
    let nodes: Vec<Value> = mocks
        .iter()
        .map(|m| json!({ "id": m.name, "addr": m.addr(), "weight": 1 }))
        .collect();
    json!({ "pools": { "llm": {
        "algorithm": "p2c_ewma",
        "slow_start_ms": 0,
        "limit": { "increase_every": 100 },
        "nodes": nodes,
        "admission": admission,
    } } })
}

fn admission(g: &Gateway) -> Value {
    let r = get(g.port, "/rsbalancer/status");
    assert_eq!(r.status, 200, "status: {}", r.text());
    r.json()["pools"]["llm"]["admission"].clone()
}

/// One chat completion with `X-Priority: prio` on a fresh connection: (status,
/// Retry-After, X-RSB-Admission). Status 0: no response.
fn chat(port: u16, prio: u32) -> (u16, Option<u64>, String) {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return (0, None, String::new());
    };
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\
         X-Priority: {prio}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{CHAT_BODY}",
        CHAT_BODY.len()
    );
    if s.write_all(req.as_bytes()).is_err() {
        return (0, None, String::new());
    }
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw);
    let status = text.split(' ').nth(1).and_then(|v| v.parse().ok()).unwrap_or(0);
    let header = |name: &str| {
        text.split("\r\n\r\n")
            .next()
            .unwrap_or("")
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_string())
    };
    (
        status,
        header("Retry-After").and_then(|v| v.parse().ok()),
        header("X-RSB-Admission").unwrap_or_default(),
    )
}

/// Sends `n` requests at once (priority 5) so that the nodes refuse some and the
/// gateway learns their limits; waits until every node has one.
fn learn_limits(g: &Gateway, n: usize) {
    let port = g.port;
    let mut tries = 0;
    while limits(g).contains(&0.0) {
        tries += 1;
        assert!(
            tries < 20,
            "no limit learned after {tries} bursts: {:?}",
            limits(g)
        );
        run_parallel(n, n, |_| chat(port, 5));
    }
}

fn wait_admission(g: &Gateway, what: &str, cond: impl Fn(&Value) -> bool) {
    let mut last = Value::Null;
    wait_until(Duration::from_secs(30), what, || {
        last = admission(g);
        cond(&last)
    });
}

/// One mock node "a" capped at `cap` concurrent requests, and a gateway queueing with
/// `admission` that has learned the node's limit. Fields drop in order: gateway,
/// mocks, then the directory.
struct OneNode {
    g: Gateway,
    _mocks: Nginx,
    a: MockNode,
    _dir: TestDir,
}

fn one_node(name: &str, cap: u32, admission: Value) -> OneNode {
    let dir = TestDir::new(name);
    let mut a = MockNode::new("a", 50);
    a.max_conc = cap;
    let mocks = start_mocks(&dir, std::slice::from_ref(&a));
    let g = start_gateway(&dir, &config(&[&a], admission));
    learn_limits(&g, 3 * cap as usize + 1);
    assert_eq!(
        limits(&g),
        vec![cap as f64],
        "the limit learned is the node's cap"
    );
    OneNode {
        g,
        _mocks: mocks,
        a,
        _dir: dir,
    }
}

/// One class, waits up to 60 s.
fn one_class() -> Value {
    json!({ "enabled": true, "classes": [ { "min_priority": 1, "max_wait_ms": 60000, "max_queue": 16 } ] })
}

// ----------------------------------------------------------------------------------

/// Offered concurrency 1.5× the nodes' capacity in three classes (X-Priority 9, 5,
/// 2; 4 closed-loop clients each): the top class is served (≥ 99.9%), the low class
/// is shed first (more refused than the middle one, which is refused no more than
/// the low), refusals are 429 with a Retry-After, and the nodes stay busy: the time
/// they spent on successful requests is ≥ 95% of capacity × the loaded time.
#[test]
fn over_capacity_top_class_served_low_class_shed_goodput_kept() {
    let _s = serial();
    let dir = TestDir::new("adm-load");
    let mut a = MockNode::new("a", 300);
    a.max_conc = 4;
    let mut b = MockNode::new("b", 300);
    b.max_conc = 4;
    let capacity = 8.0;
    let _mocks = start_mocks(&dir, &[a.clone(), b.clone()]);
    let g = start_gateway(
        &dir,
        &config(
            &[&a, &b],
            json!({
                "enabled": true, "untrusted_max": 10, "aging_ms": 0, "max_queue": 64,
                "classes": [
                    { "min_priority": 1, "max_wait_ms": 500, "max_queue": 16 },
                    { "min_priority": 4, "max_wait_ms": 5000, "max_queue": 16 },
                    { "min_priority": 8, "max_wait_ms": 60000, "max_queue": 32 }
                ]
            }),
        ),
    );
    learn_limits(&g, 16);
    assert_eq!(
        limits(&g),
        vec![4.0, 4.0],
        "the limits learned are the nodes' caps"
    );

    let run = Duration::from_secs(14);
    let warm = Duration::from_secs(2);
    let classes = [9u32, 5, 2];
    let start = Instant::now();
    // (class, status, reason, retry_after, completed at)
    let results: Vec<(u32, u16, String, Option<u64>, Duration)> = thread::scope(|s| {
        let handles: Vec<_> = (0..12)
            .map(|c| {
                let prio = classes[c % 3];
                let port = g.port;
                s.spawn(move || {
                    let mut out = Vec::new();
                    while start.elapsed() < run {
                        let (st, ra, why) = chat(port, prio);
                        out.push((prio, st, why, ra, start.elapsed()));
                    }
                    out
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    let loaded = start.elapsed().min(run) - warm;

    let tally = |prio: u32| {
        let all: Vec<_> = results.iter().filter(|r| r.0 == prio && r.4 >= warm).collect();
        let ok = all.iter().filter(|r| r.1 == 200).count();
        (all.len(), ok)
    };
    let (high_n, high_ok) = tally(9);
    let (mid_n, mid_ok) = tally(5);
    let (low_n, low_ok) = tally(2);
    let refused = |n: usize, ok: usize| (n - ok) as f64 / n.max(1) as f64;
    let failed_high: Vec<_> = results
        .iter()
        .filter(|r| r.0 == 9 && r.4 >= warm && r.1 != 200)
        .map(|r| format!("{} {}", r.1, r.2))
        .collect();
    let summary = format!(
        "high {high_ok}/{high_n} (failed: {failed_high:?}), mid {mid_ok}/{mid_n}, low {low_ok}/{low_n}; limits {:?}; admission {}",
        limits(&g),
        admission(&g)
    );
    assert!(high_n >= 20, "too few top-class requests to judge: {summary}");
    assert!(
        high_ok as f64 >= 0.999 * high_n as f64,
        "top class below 99.9%: {summary}"
    );
    assert!(
        refused(low_n, low_ok) > refused(mid_n, mid_ok) && refused(low_n, low_ok) > 0.0,
        "the low class is shed first: {summary}"
    );
    assert!(refused(mid_n, mid_ok) >= refused(high_n, high_ok), "{summary}");
    for r in results.iter().filter(|r| r.1 != 200) {
        assert_eq!(r.1, 429, "a refusal is a 429: {r:?}");
        assert!(
            r.3.is_some_and(|s| s >= 1),
            "a refusal carries Retry-After: {r:?}"
        );
        assert!(
            ["timeout", "queue_full", "evicted", ""].contains(&r.2.as_str()),
            "reason {r:?}"
        );
    }

    // Goodput: node time spent on successes against capacity × the loaded window
    // [warm, run] (every client sends until `run`, so the nodes are offered 1.5× their
    // capacity throughout). A success occupied a slot for its try's
    // $upstream_response_time (mean from the gateway's access log) just before it
    // completed; only the part of that inside the window counts.
    let log = std::fs::read_to_string(dir.path().join("gateway-access.log")).unwrap();
    let times: Vec<f64> = log
        .lines()
        .filter(|l| l.contains("POST /v1/chat/completions") && l.contains("\" 200 "))
        .filter_map(|l| l.split("time=[").nth(1)?.split(']').next())
        .filter_map(|t| t.rsplit([',', ':']).next()?.trim().parse::<f64>().ok())
        .collect();
    assert!(!times.is_empty(), "no successes in the access log");
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    let (w0, w1) = (warm.as_secs_f64(), run.as_secs_f64());
    let busy: f64 = results
        .iter()
        .filter(|r| r.1 == 200)
        .map(|r| {
            let end = r.4.as_secs_f64();
            (end.min(w1) - (end - mean).max(w0)).max(0.0)
        })
        .sum();
    let ok_in_window = results
        .iter()
        .filter(|r| r.1 == 200 && r.4 >= warm && r.4 <= run)
        .count();
    let share = busy / (capacity * loaded.as_secs_f64());
    assert!(
        share >= 0.95,
        "goodput {:.1}% of capacity: {ok_in_window} successes x {:.0} ms over {:.1} s x {capacity} slots; {summary}",
        share * 100.0,
        mean * 1000.0,
        loaded.as_secs_f64()
    );
    eprintln!("goodput {:.1}% of capacity; {summary}", share * 100.0);
    wait_admission(&g, "admitted and queue back to 0", |a| {
        a["admitted"] == json!(0) && a["queue_len"] == json!(0)
    });
}

/// Hold the one slot, queue a low then a high priority, free the slot: the high one
/// goes first. With aging, a low waiter that waited long enough goes before a high one
/// that came later.
#[test]
fn queue_order_and_aging() {
    let _s = serial();
    for aging in [false, true] {
        let t = one_node(
            "adm-order",
            1,
            json!({
                "enabled": true, "untrusted_max": 10,
                "aging_ms": if aging { 150 } else { 0 },
                "classes": [ { "min_priority": 1, "max_wait_ms": 60000, "max_queue": 16 } ]
            }),
        );
        let (g, a) = (&t.g, &t.a);
        // Learning the limit may have queued some of its burst: count from here.
        wait_admission(g, "the learning burst released", |a| a["admitted"] == json!(0));
        let queued_before = admission(g)["queue_admitted"].as_u64().unwrap();
        mock_set(
            a,
            if aging {
                "latency_ms=4000"
            } else {
                "latency_ms=1500"
            },
        );
        let port = g.port;
        let order = Mutex::new(Vec::new());
        thread::scope(|s| {
            let hold = s.spawn(|| chat(port, 5));
            wait_admission(g, "the slot held", |a| a["admitted"] == json!(1));
            let order = &order;
            s.spawn(move || {
                let r = chat(port, 1);
                order.lock().unwrap().push(("low", r.0));
            });
            wait_admission(g, "low queued", |a| a["queue_len"] == json!(1));
            if aging {
                // One level per 150 ms: after 1.4 s the priority-1 waiter ranks 10,
                // above the priority-8 arrival (the held slot frees at 4 s).
                thread::sleep(Duration::from_millis(1400));
            }
            s.spawn(move || {
                let r = chat(port, 8);
                order.lock().unwrap().push(("high", r.0));
            });
            wait_admission(g, "high queued", |a| a["queue_len"] == json!(2));
            assert_eq!(hold.join().unwrap().0, 200);
        });
        let order = order.into_inner().unwrap();
        let want = if aging {
            [("low", 200), ("high", 200)]
        } else {
            [("high", 200), ("low", 200)]
        };
        assert_eq!(order, want, "aging {aging}: {}", admission(g));
        wait_admission(g, "all released", |a| a["admitted"] == json!(0));
        let st = admission(g);
        assert_eq!(
            st["queue_admitted"].as_u64().unwrap() - queued_before,
            2,
            "only the two that waited: {st}"
        );
        // /metrics: the queue's waits as a histogram, the same counts as the status.
        let text = get(g.port, "/metrics").text();
        let wait = |series: &str| -> f64 {
            let prefix = format!("rsbalancer_pool_queue_wait_seconds_{series}");
            text.lines()
                .find(|l| l.starts_with(&prefix) && l.contains("pool=\"llm\""))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {prefix} of llm in /metrics:\n{text}"))
        };
        assert_eq!(wait("count"), st["queue_admitted"].as_f64().unwrap(), "{st}");
        assert_eq!(
            wait("bucket{pool=\"llm\",arm=\"primary\",le=\"+Inf\"}"),
            wait("count")
        );
        let sum_ms = wait("sum") * 1000.0;
        let want_ms = st["queue_wait_ms_sum"].as_f64().unwrap();
        assert!(
            (sum_ms - want_ms).abs() < 1e-6,
            "sum {sum_ms} ms, status {want_ms} ms"
        );
    }
}

/// A client that disconnects while queued leaves the queue: queue_len back to 0,
/// counted as aborted, and the node never sees its request.
#[test]
fn client_disconnect_leaves_the_queue() {
    let _s = serial();
    let t = one_node("adm-abort", 1, one_class());
    let (g, a) = (&t.g, &t.a);
    mock_set(a, "latency_ms=1500");
    let received = |m: &MockNode| get(m.port, "/mock/state").json()["received"].as_u64().unwrap();
    let port = g.port;
    let before = received(a);
    thread::scope(|s| {
        let hold = s.spawn(|| chat(port, 5));
        wait_admission(g, "the slot held", |a| a["admitted"] == json!(1));
        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let req = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{CHAT_BODY}",
            CHAT_BODY.len()
        );
        c.write_all(req.as_bytes()).unwrap();
        wait_admission(g, "the request queued", |a| a["queue_len"] == json!(1));
        drop(c);
        wait_admission(g, "it left the queue", |a| {
            a["queue_len"] == json!(0) && a["queue_aborted"] == json!(1)
        });
        assert_eq!(hold.join().unwrap().0, 200);
        assert_eq!(
            received(a),
            before + 1,
            "the node saw the held request only, never the one that left"
        );
    });
    wait_admission(g, "nothing admitted", |a| a["admitted"] == json!(0));
    assert_eq!(chat(port, 5).0, 200, "the pool still serves");
}

/// kill -9 of the workers while they hold admitted and queued requests: once nginx
/// has started their replacements, nothing is left admitted or queued, and the pool
/// serves its full capacity again.
#[test]
fn killed_workers_leak_no_admission_or_queue_entry() {
    let _s = serial();
    let t = one_node("adm-kill", 2, one_class());
    let (g, a) = (&t.g, &t.a);
    mock_set(a, "latency_ms=5000");
    let port = g.port;
    let workers = g.nginx.wait_workers(2, &[]);
    thread::scope(|s| {
        let clients: Vec<_> = (0..6).map(|_| s.spawn(move || chat(port, 5))).collect();
        wait_admission(g, "requests admitted and queued", |a| {
            a["admitted"].as_u64() >= Some(1) && a["queue_len"].as_u64() >= Some(3)
        });
        for &w in &workers {
            signal(w, libc::SIGKILL);
        }
        g.nginx.wait_workers(2, &workers);
        for c in clients {
            let _ = c.join();
        }
    });
    // A new worker reaps the dead ones when it attaches; requests still running at the
    // node end on their own (their gateway side is gone).
    wait_admission(g, "nothing left admitted or queued", |a| {
        a["admitted"] == json!(0) && a["queue_len"] == json!(0)
    });
    mock_set(a, "latency_ms=200");
    let _ = mock_state_idle(a.port);
    let r = run_parallel(2, 2, |_| chat(port, 5));
    assert!(
        r.iter().all(|x| x.0 == 200),
        "both slots serve again: {r:?} {}",
        admission(g)
    );
    wait_admission(g, "both released", |a| a["admitted"] == json!(0));
}

/// A full queue evicts its lowest-priority, youngest waiter for a higher-priority
/// arrival (429, `X-RSB-Admission: evicted`, Retry-After), and refuses an arrival
/// with nobody lower to evict (`queue_full`).
#[test]
fn full_queue_evicts_the_lowest_for_a_higher_arrival() {
    let _s = serial();
    let t = one_node(
        "adm-evict",
        1,
        json!({ "enabled": true, "untrusted_max": 10, "aging_ms": 0, "max_queue": 2,
                "classes": [ { "min_priority": 1, "max_wait_ms": 60000, "max_queue": 2 } ] }),
    );
    let (g, a) = (&t.g, &t.a);
    mock_set(a, "latency_ms=2000");
    let port = g.port;
    thread::scope(|s| {
        let hold = s.spawn(|| chat(port, 5));
        wait_admission(g, "the slot held", |a| a["admitted"] == json!(1));
        let older = s.spawn(|| chat(port, 2));
        wait_admission(g, "first low queued", |a| a["queue_len"] == json!(1));
        let younger = s.spawn(|| chat(port, 2));
        wait_admission(g, "second low queued", |a| a["queue_len"] == json!(2));
        let refused = chat(port, 2);
        assert_eq!(
            (refused.0, refused.2.as_str()),
            (429, "queue_full"),
            "nobody lower to evict"
        );
        assert!(refused.1.is_some_and(|s| s >= 1), "Retry-After: {refused:?}");
        let high = s.spawn(|| chat(port, 9));
        let evicted = younger.join().unwrap();
        assert_eq!(
            (evicted.0, evicted.2.as_str()),
            (429, "evicted"),
            "the youngest low waiter"
        );
        assert!(evicted.1.is_some_and(|s| s >= 1), "Retry-After: {evicted:?}");
        assert_eq!(hold.join().unwrap().0, 200);
        assert_eq!(high.join().unwrap().0, 200);
        assert_eq!(older.join().unwrap().0, 200);
    });
    let st = admission(g);
    assert_eq!(st["queue_evicted"], json!(1), "{st}");
}
