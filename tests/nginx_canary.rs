//! End-to-end tests of the canary split (docs/overload.md, "Canary split") inside real nginx (2
//! workers) in front of mock LLM nodes: pool "llm" (primary: p1, p2) sends a share of
//! its requests to pool "llm_canary" (c1, c2).
//!
//! Run with `make build` then `RSB_LUA_SO=$PWD/build/lib/rsbalancer.so cargo test
//! --no-default-features --test nginx_canary -- --test-threads=1`. Like the other
//! nginx tests they need nginx with lua-nginx-module and fail (never skip) without them.
//!
//! The gateway config is written here (`GATEWAY`): the demo's `/v1/` location plus
//! two test locations, `POST /canary/share?share=x` (`set_canary_share` in whichever
//! worker takes the connection) and `GET /canary/state` (`canary_state`). Requests are
//! counted where they land, at the mock nodes (`received` in `/mock/state`) and by the
//! node that answered (`X-Node`).
//!
//! Statistical checks use a binomial tolerance of 4.5 standard deviations (a false
//! failure about once in 150,000 runs), stated at each. No assertion depends on how
//! long something took: waits poll the gateway's state with generous limits.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;

/// One test at a time: shares under load need the machine.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

const GATEWAY: &str = r#"# Canary test gateway, written by tests/nginx_canary.rs.
@USER@
load_module @MODULES@/ndk_http_module.so;
load_module @MODULES@/ngx_http_lua_module.so;
worker_processes 2;
pid @RUNTIME@/gateway.pid;
error_log @RUNTIME@/gateway-error.log notice;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path @RUNTIME@/tmp/client_body;
    proxy_temp_path       @RUNTIME@/tmp/proxy;
    fastcgi_temp_path     @RUNTIME@/tmp/fastcgi;
    uwsgi_temp_path       @RUNTIME@/tmp/uwsgi;
    scgi_temp_path        @RUNTIME@/tmp/scgi;
    lua_package_path  "@REPO@/lua/?.lua;@REPO@/nginx-conf/demo/lua/?.lua;;";
    lua_package_cpath "@LIBDIR@/?.so;;";
    init_by_lua_block {
        require("resty.rsbalancer").init("@CONFIG@")
        require("rsb_admin")
    }
    init_worker_by_lua_block { require("resty.rsbalancer").init_worker() }
    upstream llm {
        server 0.0.0.1;
        balancer_by_lua_block { require("resty.rsbalancer").balance("llm") }
        keepalive 64;
    }
    server {
        listen 127.0.0.1:@PORT@;
        add_header X-Worker $pid always;
        location /v1/ {
            access_by_lua_block { require("resty.rsbalancer").admit("llm") }
            proxy_next_upstream error timeout http_429 http_502 http_503 http_504 non_idempotent;
            proxy_next_upstream_tries 4;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass http://llm;
            header_filter_by_lua_block {
                ngx.header["X-Rsb-Arm"] = require("resty.rsbalancer").arm()
            }
            log_by_lua_block { require("resty.rsbalancer").log() }
        }
        location = /canary/share {
            content_by_lua_block {
                local ok, err = require("resty.rsbalancer").set_canary_share("llm", tonumber(ngx.var.arg_share))
                ngx.say(require("rsb_admin").encode({ ok = ok or false, err = err }))
            }
        }
        location = /canary/state {
            content_by_lua_block {
                local st, err = require("resty.rsbalancer").canary_state("llm")
                ngx.say(require("rsb_admin").encode({ state = st, err = err }))
            }
        }
    }
}
"#;

/// A test's nginx pair: mocks (p1, p2 primary; c1, c2 canary) and the gateway.
struct Setup {
    mocks: Vec<MockNode>,
    _mock_nginx: Nginx,
    gateway: Nginx,
    port: u16,
    json: PathBuf,
    window_ms: u32,
    _dir: TestDir,
}

/// The pool config: "llm" (p1, p2) with the canary block `canary`, "llm_canary" (c1, c2).
fn pools(mocks: &[MockNode], canary: &Value, window_ms: u32) -> Value {
    let node = |m: &MockNode| json!({ "id": m.name, "addr": m.addr() });
    json!({ "pools": {
        "llm": { "algorithm": "round_robin", "nodes": [node(&mocks[0]), node(&mocks[1])],
                 "window_ms": window_ms, "canary": canary },
        "llm_canary": { "algorithm": "round_robin", "nodes": [node(&mocks[2]), node(&mocks[3])],
                        "window_ms": window_ms }
    } })
}

const PRIMARY: [&str; 2] = ["p1", "p2"];
const CANARY: [&str; 2] = ["c1", "c2"];

/// Starts the mocks and a gateway whose pool "llm" has the canary block `canary`;
/// `window_ms` for both pools.
fn setup(name: &str, canary: Value, window_ms: u32) -> Setup {
    let dir = TestDir::new(name);
    let mocks: Vec<MockNode> = PRIMARY
        .iter()
        .chain(&CANARY)
        .map(|n| MockNode::new(n, 2))
        .collect();
    let mock_nginx = start_mocks(&dir, &mocks);
    let cfg = pools(&mocks, &canary, window_ms);
    let port = free_port();
    let json_path = dir.write("rsbalancer.json", &serde_json::to_string_pretty(&cfg).unwrap());
    let conf = dir.write(
        "gateway.conf",
        &render(GATEWAY, &gateway_vars(&dir, port, &json_path)),
    );
    let gateway = Nginx::start(
        &dir,
        "gateway",
        &conf,
        &dir.path().join("gateway-error.log"),
        &[port],
    );
    gateway.wait_workers(2, &[]);
    Setup {
        mocks,
        _mock_nginx: mock_nginx,
        gateway,
        port,
        json: json_path,
        window_ms,
        _dir: dir,
    }
}

/// What a chat completion through the gateway came back with.
#[derive(Debug, Clone)]
struct Reply {
    status: u16,
    /// X-Node: the mock that answered.
    node: String,
    /// X-Rsb-Arm: "primary" or "canary" (`arm()`).
    arm: String,
    worker: String,
}

impl Reply {
    fn on_canary(&self) -> bool {
        CANARY.contains(&self.node.as_str())
    }
}

/// `POST /v1/chat/completions` with extra request headers; only the head of the
/// response is read (the support client cannot send headers).
fn chat_with(port: u16, headers: &[(&str, &str)]) -> Reply {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the gateway");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n",
        CHAT_BODY.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(CHAT_BODY);
    s.write_all(req.as_bytes()).expect("send");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read the response");
    let text = String::from_utf8_lossy(&raw);
    let head = text.split("\r\n\r\n").next().unwrap_or_default();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad response: {text}"));
    let mut h: BTreeMap<String, String> = BTreeMap::new();
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            h.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let get = |k: &str| h.get(k).cloned().unwrap_or_default();
    Reply {
        status,
        node: get("x-node"),
        arm: get("x-rsb-arm"),
        worker: get("x-worker"),
    }
}

fn chat(port: u16) -> Reply {
    chat_with(port, &[])
}

impl Setup {
    fn received(&self, names: &[&str]) -> u64 {
        self.mocks
            .iter()
            .filter(|m| names.contains(&m.name.as_str()))
            .map(|m| {
                let st = mock_state_idle(m.port);
                st["received"]
                    .as_u64()
                    .unwrap_or_else(|| panic!("no `received` in {st}"))
            })
            .sum()
    }

    fn state(&self) -> Value {
        let r = get(self.port, "/canary/state");
        assert_eq!(r.status, 200, "/canary/state: {}", r.text());
        r.json()["state"].clone()
    }

    fn set_share(&self, share: f64) {
        let r = post(self.port, &format!("/canary/share?share={share}"), "");
        assert_eq!(r.status, 200, "/canary/share: {}", r.text());
        assert_eq!(r.json()["ok"], json!(true), "set_canary_share: {}", r.text());
    }

    /// `nginx -s reload` with the canary block `canary`; waits for the new workers.
    fn reload(&self, canary: Value) {
        let old = self.gateway.workers();
        let cfg = pools(&self.mocks, &canary, self.window_ms);
        std::fs::write(&self.json, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
        self.gateway.signal(libc::SIGHUP);
        self.gateway.wait_workers(2, &old);
    }

    fn mock(&self, name: &str) -> &MockNode {
        self.mocks.iter().find(|m| m.name == name).unwrap()
    }

    /// Lines of the gateway's error log containing `needle`.
    fn log_lines(&self, needle: &str) -> Vec<String> {
        self.gateway
            .error_log()
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_string)
            .collect()
    }
}

/// `k` successes in `n` draws at probability `p`: within 4.5 standard deviations.
fn assert_binomial(k: u64, n: u64, p: f64, what: &str) {
    let mean = n as f64 * p;
    let sd = (n as f64 * p * (1.0 - p)).sqrt();
    assert!(
        (k as f64 - mean).abs() <= 4.5 * sd,
        "{what}: {k} of {n}, expected {mean:.0} ± {:.0} (4.5 sd at p = {p})",
        4.5 * sd
    );
}

/// CRC-32 (IEEE, as zlib and nginx's `ngx_crc32_short`).
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// The arm a sticky key must land on at `share` (parts per 10,000).
fn predicted_canary(key: &str, share: u32) -> bool {
    crc32(key.as_bytes()) % 10_000 < share
}

#[test]
fn random_split_sends_the_share_to_the_canary() {
    let _g = serial();
    let s = setup(
        "canary-random",
        json!({ "pool": "llm_canary", "share": 0.2 }),
        5000,
    );
    const N: usize = 2000;
    let replies = run_parallel(N, 8, |_| chat(s.port));
    let bad: Vec<&Reply> = replies.iter().filter(|r| r.status != 200).collect();
    assert!(bad.is_empty(), "{} failed, e.g. {:?}", bad.len(), bad.first());
    // The arm header agrees with the node that answered.
    for r in &replies {
        let want = if r.on_canary() { "canary" } else { "primary" };
        assert_eq!(r.arm, want, "{r:?}");
    }
    let workers: BTreeSet<&str> = replies.iter().map(|r| r.worker.as_str()).collect();
    assert_eq!(workers.len(), 2, "both workers served: {workers:?}");
    // Counted where the requests landed: one try each, none lost.
    let (canary, primary) = (s.received(&CANARY), s.received(&PRIMARY));
    assert_eq!(canary + primary, N as u64);
    assert_eq!(canary, replies.iter().filter(|r| r.on_canary()).count() as u64);
    assert_binomial(canary, N as u64, 0.2, "requests on the canary at share 0.2");
}

#[test]
fn sticky_header_keeps_each_user_on_one_arm() {
    let _g = serial();
    let s = setup(
        "canary-sticky",
        json!({ "pool": "llm_canary", "share": 0.2, "key": "header:X-User" }),
        5000,
    );
    const USERS: usize = 300;
    const EACH: usize = 3;
    let users: Vec<String> = (0..USERS).map(|i| format!("user-{i}")).collect();
    let arms = |share: u32| -> BTreeMap<String, bool> {
        let replies = run_parallel(USERS * EACH, 8, |i| {
            let u = &users[i % USERS];
            (u.clone(), chat_with(s.port, &[("X-User", u)]))
        });
        let mut arm: BTreeMap<String, BTreeSet<bool>> = BTreeMap::new();
        for (u, r) in &replies {
            assert_eq!(r.status, 200, "{u}: {r:?}");
            arm.entry(u.clone()).or_default().insert(r.on_canary());
        }
        arm.into_iter()
            .map(|(u, seen)| {
                assert_eq!(seen.len(), 1, "user {u} landed on both arms");
                let on = *seen.iter().next().unwrap();
                assert_eq!(
                    on,
                    predicted_canary(&u, share),
                    "user {u}: crc32 % 10000 = {}, share {share}",
                    crc32(u.as_bytes()) % 10_000
                );
                (u, on)
            })
            .collect()
    };
    let at_20 = arms(2000);
    let canary_users = at_20.values().filter(|&&c| c).count() as u64;
    assert_binomial(
        canary_users,
        USERS as u64,
        0.2,
        "users on the canary at share 0.2",
    );
    assert_eq!(
        s.received(&CANARY),
        canary_users * EACH as u64,
        "every request of a canary user, and no other, reached the canary"
    );

    // Raising the share live only moves users from the primary to the canary.
    s.set_share(0.5);
    let at_50 = arms(5000);
    for (u, &was) in &at_20 {
        assert!(
            !was || at_50[u],
            "user {u} moved from the canary back to the primary"
        );
    }
    let canary_users = at_50.values().filter(|&&c| c).count() as u64;
    assert_binomial(
        canary_users,
        USERS as u64,
        0.5,
        "users on the canary at share 0.5",
    );

    // Without the key: a random draw at the share.
    let before = s.received(&CANARY);
    const N: usize = 600;
    let replies = run_parallel(N, 8, |_| chat(s.port));
    assert!(replies.iter().all(|r| r.status == 200));
    assert_binomial(
        s.received(&CANARY) - before,
        N as u64,
        0.5,
        "keyless requests on the canary at share 0.5",
    );
}

#[test]
fn a_live_share_change_applies_in_both_workers() {
    let _g = serial();
    let s = setup("canary-live", json!({ "pool": "llm_canary", "share": 0.0 }), 5000);
    let batch = |n: usize| run_parallel(n, 8, |_| chat(s.port));
    let r = batch(100);
    assert!(
        r.iter().all(|r| r.status == 200 && !r.on_canary()),
        "share 0: {r:?}"
    );
    assert_eq!(s.received(&CANARY), 0);

    // Set in one worker (whichever takes the admin request): both follow at once.
    s.set_share(1.0);
    let r = batch(200);
    assert!(
        r.iter().all(|r| r.status == 200 && r.on_canary()),
        "share 1: {r:?}"
    );
    let workers: BTreeSet<&str> = r.iter().map(|r| r.worker.as_str()).collect();
    assert_eq!(workers.len(), 2, "both workers served: {workers:?}");
    assert_eq!(s.received(&CANARY), 200);
    assert_eq!(s.state()["share"], json!(1));

    s.set_share(0.0);
    let r = batch(200);
    assert!(
        r.iter().all(|r| r.status == 200 && !r.on_canary()),
        "share 0 again: {r:?}"
    );
    assert_eq!(s.received(&CANARY), 200, "no request reached the canary");
}

/// Sends batches of chat completions until `done(state)` holds; panics after `secs`.
fn drive_until(s: &Setup, secs: u64, what: &str, mut done: impl FnMut(&Value) -> bool) -> usize {
    let start = Instant::now();
    let mut sent = 0;
    loop {
        let st = s.state();
        if done(&st) {
            return sent;
        }
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "timed out after {secs} s ({sent} requests) waiting for {what}; state {st}\n{}",
            s.gateway.diagnostics()
        );
        run_parallel(40, 8, |_| chat(s.port));
        sent += 40;
    }
}

#[test]
fn failing_canary_is_rolled_back_and_the_log_says_why() {
    let _g = serial();
    let s = setup(
        "canary-rollback",
        json!({ "pool": "llm_canary", "share": 0.5,
                "rollback": { "margin": 0.1, "min_requests": 20 } }),
        3000,
    );
    for c in CANARY {
        let r = post(s.mock(c).port, "/mock/set?fail=503", "");
        assert_eq!(r.status, 200, "{}", r.text());
    }
    drive_until(&s, 60, "the rollback", |st| st["rolled_back"] == json!(true));
    let st = s.state();
    assert_eq!(st["share"], json!(0), "{st}");
    assert_eq!(st["rollbacks"], json!(1), "{st}");
    let lines = s.log_lines("ROLLED BACK");
    assert_eq!(lines.len(), 1, "one worker rolls back and logs it: {lines:?}");
    let l = &lines[0];
    assert!(l.contains("[error]"), "{l}");
    assert!(
        l.contains(
            "pool llm canary llm_canary ROLLED BACK (share 50.00% -> 0): canary success rate 0.0% of "
        ),
        "{l}"
    );
    assert!(l.contains("is below the primary's 100.0% of "), "{l}");

    // Rolled back: no request reaches the canary any more.
    let before = s.received(&CANARY);
    let r = run_parallel(200, 8, |_| chat(s.port));
    assert!(r.iter().all(|r| r.status == 200 && !r.on_canary()));
    assert_eq!(s.received(&CANARY), before);
}

#[test]
fn healthy_canary_ramps_up_and_is_not_rolled_back() {
    let _g = serial();
    let s = setup(
        "canary-healthy",
        json!({ "pool": "llm_canary", "share": 0.1,
                "ramp": { "step": 0.1, "every_s": 1, "max": 0.4 },
                "rollback": { "margin": 0.1, "min_requests": 20 } }),
        3000,
    );
    // Traffic while the ramp runs its three steps (the timer ticks meanwhile).
    drive_until(&s, 60, "the ramp to reach 40%", |st| st["share"] == json!(0.4));
    // And some more at the top, across further ticks.
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        let r = run_parallel(40, 8, |_| chat(s.port));
        assert!(r.iter().all(|r| r.status == 200), "{r:?}");
    }
    let st = s.state();
    assert_eq!(st["rolled_back"], json!(false), "{st}");
    assert_eq!(st["rollbacks"], json!(0), "{st}");
    assert_eq!(st["share"], json!(0.4), "{st}");
    assert!(st.get("ramp_next_in_ms").is_none(), "ramp complete: {st}");
    assert!(s.received(&CANARY) > 20, "the canary served");
    assert_eq!(s.log_lines("ROLLED BACK"), Vec::<String>::new());
    // Each step logged once, at notice level, by one worker.
    let steps = s.log_lines("canary llm_canary share");
    let want = [
        "share 10.00% -> 20.00% (ramp; next step in 1 s)",
        "share 20.00% -> 30.00% (ramp; next step in 1 s)",
        "share 30.00% -> 40.00% (ramp; ramp complete)",
    ];
    assert_eq!(steps.len(), want.len(), "{steps:?}");
    for (l, w) in steps.iter().zip(want) {
        assert!(l.contains("[notice]") && l.contains(w), "{l} (want {w})");
    }
}

#[test]
fn reload_keeps_the_live_share_unless_the_canary_block_changed() {
    let _g = serial();
    let block = json!({ "pool": "llm_canary", "share": 0.2 });
    let s = setup("canary-reload", block.clone(), 5000);
    s.set_share(0.6);
    // The same block: the live share stays, in the new workers too.
    s.reload(block);
    assert_eq!(s.state()["share"], json!(0.6));
    const N: usize = 600;
    let before = s.received(&CANARY);
    let r = run_parallel(N, 8, |_| chat(s.port));
    assert!(r.iter().all(|r| r.status == 200), "{r:?}");
    assert_binomial(
        s.received(&CANARY) - before,
        N as u64,
        0.6,
        "canary requests after a reload with the same block",
    );
    // A changed block starts over from its share.
    s.reload(json!({ "pool": "llm_canary", "share": 0.05 }));
    assert_eq!(s.state()["share"], json!(0.05));
    // No block: no split.
    s.reload(Value::Null);
    assert_eq!(s.state(), json!(false));
    let before = s.received(&CANARY);
    run_parallel(100, 8, |_| chat(s.port));
    assert_eq!(s.received(&CANARY), before);
}
