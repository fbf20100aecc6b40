//! End-to-end tests of emergency mode (docs/overload.md: "Emergency mode") inside real nginx (2
//! workers) in front of mock LLM nodes: pool "llm" (primaries a, b) whose backup pool is
//! "spare" (node s), alerts POSTed to a webhook receiver run by the test (a
//! `TcpListener` thread that records every request and answers 200, or 500 for the first
//! N).
//!
//! Run with `make build` then
//! `RSB_LUA_SO=$PWD/build/lib/rsbalancer.so cargo test --no-default-features --test
//! nginx_emergency -- --test-threads=1`. They need nginx with lua-nginx-module and fail
//! (never skip) without them: see tests/support/mod.rs.
//!
//! The gateway is the demo template `nginx-conf/demo/gateway.conf` plus one test
//! location, `/test/emergency?pool=&mode=`, calling `set_emergency` of
//! `resty.rsbalancer` (what the admin API calls) once per mode of a comma-separated
//! list. Both workers run the detector every
//! second: "exactly one alert per transition" is checked at the receiver, after waiting
//! several more ticks for a duplicate to show up. Backup-pool traffic is counted at the
//! spare mock (`received`), not from the gateway's accounting. No assertion depends on
//! how long something took, but for the webhook's spacing and retry backoff: lower
//! bounds, with upper bounds generous enough for a loaded machine; waits are polls with
//! generous limits.

mod support;

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::webhook::{Hit, Receiver};
use support::*;

/// One test at a time (see tests/nginx_policy.rs).
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

// ----------------------------------------------------------------------------------
// Gateway

/// The pools: "llm" (a, b) with emergency mode, "spare" (s) its backup pool.
fn pools(a: &MockNode, b: &MockNode, s: &MockNode, hook: &Receiver, emergency: Value) -> Value {
    let mut e = json!({
        "enter_busy_ratio": 0.5,
        "exit_busy_ratio": 0.1,
        "min_requests": 10,
        "healthy_window_ms": 2000,
        "backup_pool": "spare",
        "webhooks": [{ "url": hook.url(), "timeout_ms": 2000, "retries": 3, "min_interval_ms": 100 }]
    });
    if let Value::Object(m) = emergency {
        for (k, v) in m {
            e[k] = v;
        }
    }
    json!({ "pools": {
        "llm": {
            "algorithm": "p2c_ewma",
            "nodes": [{ "id": "a", "addr": a.addr() }, { "id": "b", "addr": b.addr() }],
            "window_ms": 3000,
            "slow_start_ms": 0,
            "retry": { "min_per_s": 1000 },
            // Every 429 rests the node briefly (no learned limit to wait out afterwards).
            "limit": { "enabled": false },
            "cooldown": { "base_ms": 200, "max_ms": 1000 },
            "emergency": e
        },
        "spare": {
            "nodes": [{ "id": "s", "addr": s.addr() }],
            "slow_start_ms": 0
        }
    } })
}

/// The test location (see the module documentation).
const TEST_LOCATION: &str = r#"
        location = /test/emergency {
            content_by_lua_block {
                -- One mode, or several separated by commas: set in order, by this worker.
                for mode in string.gmatch(ngx.var.arg_mode, "[^,]+") do
                    local ok, err = require("resty.rsbalancer").set_emergency(ngx.var.arg_pool, mode)
                    if not ok then
                        return ngx.say("error: " .. tostring(err))
                    end
                end
                ngx.say("ok")
            }
        }
"#;

/// The demo gateway with the test location.
fn start(dir: &TestDir, json: &Value) -> Gateway {
    start_gateway_with(dir, json, |text| {
        let anchor = "        location = /rsbalancer/stats {";
        assert!(text.contains(anchor), "gateway.conf has no {anchor:?}");
        text.replacen(anchor, &format!("{TEST_LOCATION}\n{anchor}"), 1)
    })
}

/// A test's set-up: mocks a, b (pool "llm") and s (pool "spare"), a webhook receiver
/// failing its first `fail_first` requests, and the gateway with `pools(..)` (with
/// `emergency` merged), passed through `edit`. Fields drop in order: gateway first.
struct Rig {
    g: Gateway,
    hook: Receiver,
    _mocks: Nginx,
    a: MockNode,
    b: MockNode,
    s: MockNode,
    _dir: TestDir,
}

fn rig(name: &str, fail_first: usize, emergency: Value, edit: impl FnOnce(&mut Value)) -> Rig {
    let dir = TestDir::new(name);
    let (a, b, s) = (
        MockNode::new("a", 5),
        MockNode::new("b", 5),
        MockNode::new("s", 5),
    );
    let mocks = start_mocks(&dir, &[a.clone(), b.clone(), s.clone()]);
    let hook = Receiver::start(fail_first);
    let mut json = pools(&a, &b, &s, &hook, emergency);
    edit(&mut json);
    Rig {
        g: start(&dir, &json),
        hook,
        _mocks: mocks,
        a,
        b,
        s,
        _dir: dir,
    }
}

fn set_emergency(g: &Gateway, mode: &str) {
    let r = get(g.port, &format!("/test/emergency?pool=llm&mode={mode}"));
    assert_eq!((r.status, r.text().trim()), (200, "ok"), "set_emergency {mode}");
}

/// A chat completion with `X-Priority: p`.
fn chat_with_priority(g: &Gateway, p: &str) -> Response {
    http_with(
        g.port,
        "POST",
        "/v1/chat/completions",
        &[("X-Priority", p)],
        Some(CHAT_BODY),
    )
    .expect("chat request")
}

/// Tries the mock received (health checks and /mock/* aside).
fn received(m: &MockNode) -> u64 {
    let st = get(m.port, "/mock/state").json();
    st["received"]
        .as_u64()
        .unwrap_or_else(|| panic!("no `received` in {st}"))
}

/// Sends chat completions one at a time until `cond` holds (checked after each);
/// returns the statuses. Panics after `secs`.
fn drive(g: &Gateway, secs: u64, what: &str, mut cond: impl FnMut() -> bool) -> Vec<u16> {
    let start = Instant::now();
    let mut statuses = Vec::new();
    loop {
        statuses.push(g.chat().status);
        if cond() {
            return statuses;
        }
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "timed out after {secs} s ({} requests) waiting for {what}\n{}",
            statuses.len(),
            g.nginx.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits (polling) until the receiver holds `n` delivered alerts.
fn wait_delivered(g: &Gateway, hook: &Receiver, n: usize, what: &str) {
    let start = Instant::now();
    while hook.delivered().len() < n {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}: delivered {:?}\n{}",
            hook.hits(),
            g.nginx.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Lets several detector ticks (1 s each, in both workers) pass, so that a duplicate
/// alert would arrive before the count is checked.
fn let_ticks_pass() {
    std::thread::sleep(Duration::from_millis(3_500));
}

fn count(log: &str, needle: &str) -> usize {
    log.matches(needle).count()
}

// ----------------------------------------------------------------------------------
// Tests

/// The seed's contingency plan, end to end: overload (the primaries answer 429) enters
/// emergency with one "enter" alert and one error-log line; the backup pool then takes
/// the requests the primaries cannot; the end of the overload leaves emergency after the
/// healthy window with one "exit" alert, and the backup pool gets nothing more. Before
/// the overload it got nothing either.
#[test]
fn overload_enters_emergency_and_recovery_leaves_it_with_one_alert_each() {
    let _serial = serial();
    let r = rig("emergency-overload", 0, json!({}), |_| {});
    let (g, hook, a, b, s) = (&r.g, &r.hook, &r.a, &r.b, &r.s);

    // Calm: the primaries serve everything, the backup pool nothing, no alert.
    for i in 0..40 {
        let r = g.chat();
        assert_eq!(r.status, 200, "calm request {i}: {}", r.text());
    }
    assert_eq!(received(s), 0, "the backup pool got traffic outside emergency");
    let_ticks_pass();
    assert!(
        hook.hits().is_empty(),
        "alerts without a transition: {:?}",
        hook.hits()
    );

    // Overload: every chat request to a primary is answered 429.
    for m in [a, b] {
        mock_set(m, "fail=429");
    }
    drive(g, 60, "an \"enter\" alert", || !hook.events("enter").is_empty());
    let enter = hook.events("enter")[0].clone();
    assert_eq!(enter["pool"], "llm");
    assert_eq!(enter["forced"], false);
    assert_eq!(enter["backup_pool"], "spare");
    assert!(enter["busy_ratio"].as_f64().unwrap() >= 0.5, "{enter}");
    assert!(enter["counts"]["requests"].as_u64().unwrap() >= 10, "{enter}");
    assert!(enter["counts"]["busy"].as_u64().unwrap() >= 5, "{enter}");
    assert!(
        enter["reason"].as_str().unwrap().contains("busy ratio"),
        "{enter}"
    );
    let ids: Vec<&str> = enter["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["a", "b"], "{enter}");
    for n in enter["nodes"].as_array().unwrap() {
        assert!(
            n["state"].is_string() && n["inflight"].is_u64() && n["limit"].is_number(),
            "{n}"
        );
    }
    let first = &hook.hits()[0];
    assert_eq!(
        (first.method.as_str(), first.path.as_str()),
        ("POST", "/hooks/rsb")
    );
    assert_eq!(first.content_type, "application/json");
    assert!(
        g.nginx.error_log().contains("[warn]")
            && count(
                &g.nginx.error_log(),
                "rsbalancer: pool llm entered emergency mode"
            ) == 1,
        "no warn line for the entry\n{}",
        g.nginx.diagnostics()
    );

    // In emergency the backup pool serves what the primaries refuse.
    let before = received(s);
    let statuses = drive(g, 30, "the backup pool to serve", || received(s) >= before + 5);
    assert!(
        statuses.contains(&200),
        "no request served in emergency: {statuses:?}"
    );

    // The overload ends: after the healthy window, one "exit" alert.
    for m in [a, b] {
        mock_set(m, "fail=");
    }
    drive(g, 90, "an \"exit\" alert", || !hook.events("exit").is_empty());
    let exit = hook.events("exit")[0].clone();
    assert_eq!(
        (exit["pool"].as_str(), exit["forced"].as_bool()),
        (Some("llm"), Some(false))
    );
    assert!(exit["busy_ratio"].as_f64().unwrap() < 0.1, "{exit}");
    assert!(
        count(&g.nginx.error_log(), "rsbalancer: pool llm left emergency mode") == 1,
        "no notice line for the exit\n{}",
        g.nginx.diagnostics()
    );

    // Out of emergency with the primaries up: no more backup traffic.
    drive(g, 30, "the primaries to serve again", || g.chat().status == 200);
    let spare_after = received(s);
    for i in 0..40 {
        let r = g.chat();
        assert_eq!(r.status, 200, "request {i} after the exit: {}", r.text());
    }
    assert_eq!(
        received(s),
        spare_after,
        "the backup pool got traffic after the exit"
    );

    let_ticks_pass();
    assert_eq!(hook.events("enter").len(), 1, "enter alerts: {:?}", hook.hits());
    assert_eq!(hook.events("exit").len(), 1, "exit alerts: {:?}", hook.hits());
    assert_eq!(hook.hits().len(), 2, "every alert delivered at the first attempt");
}

/// Forcing emergency on and off through `set_emergency` (what the admin API calls)
/// produces one alert each with reason "forced"; forcing the state it is already in, or
/// handing it back ("auto"), produces none. The receiver fails the first delivery
/// (500): it is retried and arrives.
#[test]
fn forced_on_and_off_alert_once_each_and_a_failed_delivery_is_retried() {
    let _serial = serial();
    let r = rig(
        "emergency-forced",
        1,
        json!({ "min_requests": 1000000, "shed_below": 5 }),
        |_| {},
    );
    let (g, hook, s) = (&r.g, &r.hook, &r.s);

    set_emergency(g, "on");
    wait_delivered(g, hook, 1, "the forced \"enter\" alert");
    let hits = hook.hits();
    assert_eq!(hits[0].answered, 500, "{hits:?}");
    assert_eq!(hits[1].answered, 200, "{hits:?}");
    assert_eq!(hits[0].body, hits[1].body, "the retry sends the same alert");
    let enter = &hits[1].body;
    assert_eq!(
        (
            enter["event"].as_str(),
            enter["reason"].as_str(),
            enter["forced"].as_bool()
        ),
        (Some("enter"), Some("forced"), Some(true))
    );
    set_emergency(g, "on"); // already on: no transition

    // Forced on with the primaries up: they still serve everything of priority 5 and
    // up (the demo's default for a request without X-Priority is 5); priorities below
    // shed_below 5 are shed at once by admit(), counted, never sent to a node.
    let (ra, rb) = (received(&r.a), received(&r.b));
    for i in 0..20 {
        assert_eq!(g.chat().status, 200, "request {i} in forced emergency");
    }
    for i in 0..10 {
        let low = chat_with_priority(g, "2");
        assert_eq!(
            (low.status, low.header("X-RSB-Admission")),
            (429, Some("shed")),
            "priority 2, request {i}: {}",
            low.text()
        );
        assert!(
            low.header("Retry-After").is_some(),
            "a shed request says when to retry"
        );
        assert_eq!(chat_with_priority(g, "5").status, 200, "priority 5, request {i}");
    }
    assert_eq!(
        received(&r.a) + received(&r.b) - ra - rb,
        30,
        "every request but the shed ones reached a node, once"
    );
    assert_eq!(received(s), 0, "primaries up: the backup pool is not used");

    set_emergency(g, "off");
    assert_eq!(
        chat_with_priority(g, "2").status,
        200,
        "out of emergency nothing is shed"
    );
    wait_delivered(g, hook, 2, "the forced \"exit\" alert");
    set_emergency(g, "auto"); // hands it back as it is: off, no transition
    let_ticks_pass();
    let delivered = hook.delivered();
    assert_eq!(delivered.len(), 2, "{:?}", hook.hits());
    assert_eq!(
        (delivered[1]["event"].as_str(), delivered[1]["reason"].as_str()),
        (Some("exit"), Some("forced"))
    );
    let log = g.nginx.error_log();
    assert_eq!(
        count(&log, "rsbalancer: pool llm entered emergency mode: forced"),
        1,
        "{log}"
    );
    assert_eq!(
        count(&log, "rsbalancer: pool llm left emergency mode: forced"),
        1,
        "{log}"
    );
    assert_eq!(count(&log, "retrying"), 1, "one failed attempt logged\n{log}");
}

/// Outside emergency the backup pool serves only when every primary is down (active
/// health checks), and stops as soon as one is back. No emergency alert: a dead pool is
/// not an overloaded one.
#[test]
fn backup_pool_serves_when_every_primary_is_down_outside_emergency() {
    let _serial = serial();
    let r = rig("emergency-down", 0, json!({}), |json| {
        json["pools"]["llm"]["health"] =
            json!({ "path": "/health", "interval_ms": 200, "timeout_ms": 100, "healthy": 2, "unhealthy": 2 });
    });
    let (g, hook, a, b, s) = (&r.g, &r.hook, &r.a, &r.b, &r.s);

    mock_set(a, "health_fail=503");
    let start_wait = Instant::now();
    while g.stats()["a"]["state"] != "down" {
        assert!(
            start_wait.elapsed() < Duration::from_secs(30),
            "a never went down"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    for i in 0..20 {
        assert_eq!(g.chat().status, 200, "request {i} with one primary down");
    }
    assert_eq!(received(s), 0, "one primary up: the backup pool is not used");

    mock_set(b, "health_fail=503");
    let before = received(s);
    drive(g, 30, "the backup pool to serve", || received(s) >= before + 10);
    for m in [a, b] {
        mock_set(m, "health_fail=");
    }
    drive(g, 30, "a primary to serve again", || {
        let st = g.stats();
        st["a"]["state"] != "down" || st["b"]["state"] != "down"
    });
    let spare = received(s);
    for i in 0..20 {
        assert_eq!(g.chat().status, 200, "request {i} with the primaries back");
    }
    assert_eq!(received(s), spare, "a primary is up: no more backup traffic");
    assert!(
        hook.hits().is_empty(),
        "no emergency alert expected: {:?}",
        hook.hits()
    );
}

/// Receiver arrivals: the time of `hits[k]` since `from`, in ms.
fn arrivals_ms(hits: &[Hit], from: Instant) -> Vec<u128> {
    hits.iter()
        .map(|h| h.at.duration_since(from).as_millis())
        .collect()
}

/// Alerts from one worker to one webhook start `min_interval_ms` apart: four forced
/// transitions made by one request (so by one worker, at one moment `t`) are delivered
/// in order, the k-th no earlier than `t` + k intervals (nginx's timers never fire
/// early; 5 ms of rounding allowed), and each at least the interval after the one before
/// but for a timer's lateness (200 ms allowed). Without the spacing they would arrive
/// within milliseconds.
#[test]
fn webhook_alerts_of_one_worker_are_spaced_by_min_interval() {
    const INTERVAL_MS: u128 = 1000;
    let _serial = serial();
    let r = rig("emergency-spacing", 0, json!({ "min_requests": 1000000 }), |j| {
        j["pools"]["llm"]["emergency"]["webhooks"][0]["min_interval_ms"] = json!(INTERVAL_MS as u64);
    });
    let (g, hook) = (&r.g, &r.hook);
    let t = Instant::now();
    set_emergency(g, "on,off,on,off");
    wait_delivered(g, hook, 4, "four forced alerts");
    let hits = hook.hits();
    let events: Vec<&str> = hits
        .iter()
        .map(|h| h.body["event"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(events, ["enter", "exit", "enter", "exit"], "{hits:?}");
    let at = arrivals_ms(&hits, t);
    eprintln!("alerts arrived at {at:?} ms after the request");
    for k in 1..at.len() {
        assert!(
            at[k] + 5 >= k as u128 * INTERVAL_MS,
            "alert {k} arrived {} ms after the request, before {k} intervals of {INTERVAL_MS} ms: {at:?}",
            at[k]
        );
        assert!(
            at[k] - at[k - 1] + 200 >= INTERVAL_MS,
            "alerts {} and {k} arrived {} ms apart, min_interval_ms {INTERVAL_MS}: {at:?}",
            k - 1,
            at[k] - at[k - 1]
        );
    }
    let_ticks_pass();
    assert_eq!(hook.hits().len(), 4, "{:?}", hook.hits());
}

/// A failed delivery is retried after 0.5 s, then 1 s, then 2 s: with the receiver
/// failing the first 3 attempts, the 4th (`retries` 3) delivers, and the gaps between
/// arrivals are at least those (a retry's timer starts after the failed attempt's
/// answer, so no allowance beyond 20 ms of clock rounding) and below the next doubling
/// (an allowance of up to 0.9 times the backoff for a timer's lateness).
#[test]
fn failed_webhook_deliveries_back_off_half_a_second_then_doubling() {
    let _serial = serial();
    let r = rig("emergency-backoff", 3, json!({ "min_requests": 1000000 }), |_| {});
    let (g, hook) = (&r.g, &r.hook);
    set_emergency(g, "on");
    wait_delivered(g, hook, 1, "the forced \"enter\" alert, at its 4th attempt");
    let hits = hook.hits();
    let answered: Vec<u16> = hits.iter().map(|h| h.answered).collect();
    assert_eq!(answered, [500, 500, 500, 200], "{hits:?}");
    assert!(hits.iter().all(|h| h.body == hits[0].body), "one alert: {hits:?}");
    let at = arrivals_ms(&hits, hits[0].at);
    eprintln!("attempts arrived at {at:?} ms after the first");
    for (k, backoff) in [500u128, 1000, 2000].into_iter().enumerate() {
        let gap = at[k + 1] - at[k];
        assert!(
            gap + 20 >= backoff && gap < backoff * 19 / 10,
            "retry {} came {gap} ms after attempt {k}, want a backoff of {backoff} ms: {at:?}",
            k + 1
        );
    }
    let log = g.nginx.error_log();
    assert_eq!(count(&log, "retrying"), 3, "{log}");
    assert_eq!(count(&log, "delivered to"), 1, "{log}");
}
