//! Chaos tests: the gateway (the demo template `nginx-conf/demo/gateway.conf`, 2
//! workers, admission on with three priority classes) under a bounded client load
//! while its workers are killed with SIGKILL, while it reloads, and while a reload
//! fails; and the reproduction of issue 17.1 (probe admissions leaking until the pool
//! is wedged).
//!
//! Every test asserts on every response, and that nothing leaks: once idle, every
//! node's in-flight count, the pool's `admitted` count and its queue entries are 0
//! (read from `GET /rsbalancer/status`, the JSON the admin API serves).
//!
//! The load: client threads on loopback, one request per connection
//! (`Connection: close`), `X-Priority` cycling over the three classes, for a bounded
//! time and count. What a client may get:
//! - 200;
//! - when the load is above the nodes' capacity (the kill test only), a 429 with a
//!   `Retry-After` of at least 1 s: the gateway's documented answer to overload (an
//!   admission refusal, `X-RSB-Admission: timeout | queue_full | evicted | shed`, or
//!   the pool at its learned limits), which a client handles by retrying later;
//! - no response at all (reset, empty or cut reply) only on a connection that a
//!   killed worker held: the test counts those connections (the killed worker is
//!   stopped with SIGSTOP, its sockets on the gateway port counted from /proc, then
//!   it is SIGKILLed) and the failures must not exceed them.
//!
//! In the kill test the mock nodes cancel a request whose gateway connection closes
//! (`lua_check_client_abort on`: 499, their in-flight count released), as LLM servers
//! that abort a generation on disconnect do. With nodes that go on serving a killed
//! worker's tries, the worker that replaces it frees their slots at once while the
//! nodes are still busy with them: for up to one response time the gateway sends the
//! nodes more than their caps, and a request whose retry of a node's 429 then finds
//! no node gets a 502 (or the node's 429 without Retry-After): seen in each of 4 runs.
//!
//! No assertion depends on how long something took; waits are polls with generous
//! limits. Run with `make build` then `RSB_LUA_SO=$PWD/build/lib/rsbalancer.so cargo
//! test --no-default-features --test nginx_chaos -- --test-threads=1`; they need nginx
//! with lua-nginx-module and fail (never skip) without them.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;

/// Three classes: 1-3 wait at most 0.5 s, 4-7 at most 5 s, 8-10 at most 20 s.
fn three_classes() -> Value {
    json!({
        "enabled": true, "untrusted_max": 10, "aging_ms": 0, "max_queue": 64,
        "classes": [
            { "min_priority": 1, "max_wait_ms": 500, "max_queue": 16 },
            { "min_priority": 4, "max_wait_ms": 5000, "max_queue": 16 },
            { "min_priority": 8, "max_wait_ms": 20000, "max_queue": 32 }
        ]
    })
}

/// Pool "llm" over `nodes` (id, mock, weight) with admission `admission`.
/// `increase_every` 100: fewer AIMD probes beyond the mocks' fixed caps (see
/// tests/nginx_admission.rs).
fn pool(nodes: &[(&str, &MockNode, u32)], admission: Value) -> Value {
    let nodes: Vec<Value> = nodes
        .iter()
        .map(|(id, m, w)| json!({ "id": id, "addr": m.addr(), "weight": w }))
        .collect();
    json!({ "pools": { "llm": {
        "algorithm": "p2c_ewma",
        "slow_start_ms": 0,
        "limit": { "increase_every": 100 },
        "nodes": nodes,
        "admission": admission,
    } } })
}

/// Mock nodes named `names`, each answering after `latency_ms`, 429 beyond `cap`.
fn mocks(names: &[&str], latency_ms: u32, cap: u32) -> Vec<MockNode> {
    names
        .iter()
        .map(|n| {
            let mut m = MockNode::new(n, latency_ms);
            m.max_conc = cap;
            m
        })
        .collect()
}

fn status(g: &Gateway) -> Value {
    let r = get(g.port, "/rsbalancer/status");
    assert_eq!(r.status, 200, "status: {}", r.text());
    r.json()
}

fn llm(st: &Value) -> &Value {
    &st["pools"]["llm"]
}

/// node id -> its entry in a status document.
fn nodes(st: &Value) -> BTreeMap<String, Value> {
    llm(st)["nodes"]
        .as_array()
        .expect("status nodes")
        .iter()
        .map(|n| (n["id"].as_str().unwrap().to_string(), n.clone()))
        .collect()
}

fn num(v: &Value, field: &str) -> u64 {
    v[field]
        .as_f64()
        .unwrap_or_else(|| panic!("{field} missing in {v}")) as u64
}

/// Waits (15 s at most) until nothing is in flight, admitted or queued; returns the
/// status then. A leak never clears, and fails here.
fn assert_idle(g: &Gateway, what: &str) -> Value {
    let idle = |st: &Value| {
        let a = &llm(st)["admission"];
        nodes(st).values().all(|n| n["inflight"] == json!(0))
            && a["admitted"] == json!(0)
            && a["queue_len"] == json!(0)
            && a["waiting_by_priority"]
                .as_array()
                .is_some_and(|w| w.iter().all(|c| c == &json!(0)))
    };
    let start = Instant::now();
    loop {
        let st = status(g);
        if idle(&st) {
            return st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "{what}: still in flight, admitted or queued 15 s after the load: {st}\n{}",
            g.nginx.diagnostics()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// `n` concurrent priority-5 requests until every node has a learned limit.
fn learn_limits(g: &Gateway, n: usize) {
    for _ in 0..20 {
        let st = status(g);
        if nodes(&st).values().all(|n| n["limit"].as_f64() > Some(0.0)) {
            return;
        }
        run_parallel(n, n, |_| chat(g.port, 5));
    }
    panic!("no limit learned after 20 bursts: {}", status(g));
}

/// One chat completion with `X-Priority: prio` on a new connection.
fn chat(port: u16, prio: u32) -> Result<Response, String> {
    let p = prio.to_string();
    http_with(
        port,
        "POST",
        "/v1/chat/completions",
        &[("X-Priority", &p)],
        Some(CHAT_BODY),
    )
    .map_err(|e| e.to_string())
}

/// (priority, outcome) of one request of the load.
type Outcome = (u32, Result<Response, String>);

/// Runs `clients` client threads (priorities cycling 9, 5, 2) while `during` runs,
/// and at most `limit` in all (then each thread stops; at most 2,000 requests each).
/// Returns what `during` returned and every outcome.
fn with_load<R>(
    g: &Gateway,
    clients: usize,
    limit: Duration,
    during: impl FnOnce() -> R,
) -> (R, Vec<Outcome>) {
    const PRIORITIES: [u32; 3] = [9, 5, 2];
    let stop = AtomicBool::new(false);
    let out = Mutex::new(Vec::new());
    let start = Instant::now();
    let r = thread::scope(|s| {
        struct StopOnDrop<'a>(&'a AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        // Stops the load on every way out of this scope, panics included.
        let _stop = StopOnDrop(&stop);
        for c in 0..clients {
            let (stop, out, port) = (&stop, &out, g.port);
            s.spawn(move || {
                let prio = PRIORITIES[c % 3];
                let mut mine = Vec::new();
                while !stop.load(Ordering::Relaxed) && start.elapsed() < limit && mine.len() < 2000 {
                    mine.push((prio, chat(port, prio)));
                }
                out.lock().unwrap().extend(mine);
            });
        }
        // Let the load reach both workers before `during` acts.
        thread::sleep(Duration::from_millis(500));
        during()
    });
    (r, out.into_inner().unwrap())
}

/// Counts of (status, X-RSB-Admission) and of transport errors, for messages.
fn summary(outcomes: &[Outcome]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for (_, o) in outcomes {
        let k = match o {
            Ok(r) => format!("{} {}", r.status, r.header("X-RSB-Admission").unwrap_or("")),
            Err(_) => "no response".to_string(),
        };
        *m.entry(k).or_insert(0) += 1;
    }
    m
}

/// Asserts every response is a 200, or (with `overload`) a 429 with a Retry-After of
/// at least 1 s; returns the transport errors.
fn check_responses(outcomes: &[Outcome], overload: bool) -> Vec<String> {
    let sum = summary(outcomes);
    let mut errors = Vec::new();
    for (prio, o) in outcomes {
        match o {
            Ok(r) if r.status == 200 => {}
            Ok(r) if overload && r.status == 429 => {
                let ra = r.header("Retry-After").and_then(|v| v.parse::<u64>().ok());
                assert!(
                    ra.is_some_and(|s| s >= 1),
                    "a 429 without a Retry-After >= 1 (priority {prio}): {:?} {}; all: {sum:?}",
                    r.headers,
                    r.text()
                );
                let why = r.header("X-RSB-Admission").unwrap_or("");
                assert!(
                    ["", "timeout", "queue_full", "evicted", "shed"].contains(&why),
                    "429 X-RSB-Admission {why:?} (priority {prio}): {}; all: {sum:?}",
                    r.text()
                );
            }
            Ok(r) => panic!(
                "priority {prio}: {} {:?} {}; all: {sum:?}",
                r.status,
                r.headers,
                r.text()
            ),
            Err(e) => errors.push(e.clone()),
        }
    }
    errors
}

/// Tries each node of the gateway got from its start to `st` (gateway's count) and
/// what the mock node received (every try the gateway sent it): equal for every node
/// when counters are kept across whatever happened.
fn assert_counters_kept(st: &Value, base: &BTreeMap<String, Value>, mocks: &[&MockNode]) {
    let now = nodes(st);
    for m in mocks {
        let received = mock_state_idle(m.port)["received"].as_u64().unwrap();
        let n = now
            .get(&m.name)
            .unwrap_or_else(|| panic!("node {} not in the status: {st}", m.name));
        let b = base.get(&m.name).map_or(0, |b| num(b, "requests"));
        assert!(
            num(n, "requests") >= b,
            "node {}: requests went down from {b}: {n}",
            m.name
        );
        assert_eq!(
            num(n, "requests"),
            received,
            "node {}: the gateway's count of tries is not what the node received: {n}",
            m.name
        );
        assert_eq!(num(n, "picks"), num(n, "requests"), "node {}: {n}", m.name);
    }
}

/// Sockets of process `pid` on local port `port` of 127.0.0.1, other than listening
/// ones: the client connections it holds (accepted; the listen queue belongs to no
/// worker). Read from /proc: `pid`'s socket inodes, matched in its /proc/net/tcp.
fn client_connections(pid: i32, port: u16) -> usize {
    let inodes: HashSet<u64> = fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/fd: {e}"))
        .flatten()
        .filter_map(|e| fs::read_link(e.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            l.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect();
    let tcp = fs::read_to_string(format!("/proc/{pid}/net/tcp")).expect("/proc/<pid>/net/tcp");
    let local = format!("0100007F:{port:04X}");
    tcp.lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 9
                && f[1] == local
                && f[3] != "0A"
                && f[9].parse::<u64>().is_ok_and(|i| inodes.contains(&i))
        })
        .count()
}

// ----------------------------------------------------------------------------------

/// Issue 17.1: `rsb_admit` may admit a request into a probe slot at once (verdict 9,
/// GoProbe); that admission must be held and released like any other, never answered
/// as a refusal. The reproduction: one node taking 1 request at a time (300
/// ms), admission on, `slow_start_ms` 0; 2 concurrent requests, 4 sequential, then 2
/// concurrent twice (the 4 successes at the learned limit 1 make AIMD probe a limit
/// of 2, which admission hands out as a probe slot). Before the fix, the probe
/// admissions were answered 429 `refused` and never released: `admitted` stayed at 2
/// on an idle node and every later request waited its class's max wait and got 429
/// `timeout`.
#[test]
fn probe_admission_at_arrival_is_held_and_released() {
    let dir = TestDir::new("chaos-probe");
    let mut a = MockNode::new("a", 300);
    a.max_conc = 1;
    let _mocks = start_mocks(&dir, std::slice::from_ref(&a));
    let cfg = json!({ "pools": { "llm": {
        "slow_start_ms": 0,
        "nodes": [ { "id": "a", "addr": a.addr(), "weight": 1 } ],
        "admission": { "enabled": true,
                       "classes": [ { "min_priority": 1, "max_wait_ms": 3000, "max_queue": 16 } ] },
    } } });
    let g = start_gateway(&dir, &cfg);
    let port = g.port;
    let mut all = Vec::new();
    all.extend(run_parallel(2, 2, |_| chat(port, 5)));
    for _ in 0..4 {
        all.push(chat(port, 5));
    }
    for _ in 0..2 {
        all.extend(run_parallel(2, 2, |_| chat(port, 5)));
    }
    let st = status(&g);
    for r in &all {
        let r = r.as_ref().unwrap_or_else(|e| panic!("no response: {e}"));
        let why = r.header("X-RSB-Admission").unwrap_or("");
        assert_ne!(
            why,
            "refused",
            "a probe admission answered as a refusal: {} {st}",
            r.text()
        );
        // 429s from the node itself while no limit is learned yet (1 node: no retry).
        assert!(
            r.status == 200 || (r.status == 429 && why.is_empty()),
            "{} {why:?} {}; {st}",
            r.status,
            r.text()
        );
    }
    // The learning pair's 429 and the probe's: AIMD tried a limit of 2 (a probe slot).
    assert!(
        num(&llm(&st)["nodes"][0], "busy") >= 2,
        "AIMD did not probe a limit of 2, so no probe slot was handed out: {st}"
    );
    let mut last = Value::Null;
    let idle = (0..250).any(|_| {
        last = llm(&status(&g))["admission"].clone();
        let done = last["admitted"] == json!(0) && last["queue_len"] == json!(0);
        if !done {
            thread::sleep(Duration::from_millis(20));
        }
        done
    });
    assert!(idle, "admissions leaked: the node is idle, yet {last}");
    let r = chat(port, 5).expect("a response");
    assert_eq!(
        (r.status, r.header("X-RSB-Admission")),
        (200, None),
        "an idle pool serves: {}",
        r.text()
    );
}

/// kill -9 of a worker, 6 times (each worker in turn, 0.5 s apart) during 12
/// clients' load at 1.5x the nodes' capacity: each client gets a 200 or a 429 with Retry-After, except on
/// connections the killed workers held; once idle, nothing is in flight, admitted or
/// queued, the replacements reclaimed the dead workers' tries, and the pool serves
/// its full capacity again.
#[test]
fn killed_workers_during_load_leak_nothing() {
    let dir = TestDir::new("chaos-kill");
    let ms = mocks(&["a", "b"], 150, 4);
    let _mocks = start_mocks_with(&dir, &ms, "lua_check_client_abort on;");
    let g = start_gateway(
        &dir,
        &pool(&[("a", &ms[0], 1), ("b", &ms[1], 1)], three_classes()),
    );
    learn_limits(&g, 17);

    let (kills, outcomes) = with_load(&g, 12, Duration::from_secs(25), || {
        let mut kills: Vec<(i32, usize)> = Vec::new();
        for k in 0..6 {
            let victim = g.nginx.wait_workers(2, &[])[k % 2];
            wait_until(
                Duration::from_secs(10),
                "client connections on the worker to kill",
                || client_connections(victim, g.port) >= 2,
            );
            // Stopped, it accepts nothing more while its connections are counted.
            signal(victim, libc::SIGSTOP);
            let held = client_connections(victim, g.port);
            signal(victim, libc::SIGKILL);
            kills.push((victim, held));
            g.nginx.wait_workers(2, &[victim]);
            thread::sleep(Duration::from_millis(500));
        }
        kills
    });
    let killed: Vec<i32> = kills.iter().map(|k| k.0).collect();
    let held: usize = kills.iter().map(|k| k.1).sum();
    let errors = check_responses(&outcomes, true);
    let sum = summary(&outcomes);
    assert!(
        errors.len() <= held,
        "{} requests got no response, more than the {held} connections the killed workers \
         held ({kills:?}): {errors:?}; all: {sum:?}",
        errors.len()
    );
    assert!(
        sum.get("200 ").copied().unwrap_or(0) * 2 > outcomes.len(),
        "most requests are served: {sum:?}"
    );
    g.nginx.wait_workers(2, &killed);
    let st = assert_idle(&g, "after the kills");
    assert!(
        num(&st, "reclaimed_tries") > 0,
        "the killed workers had no try in flight: {st}"
    );
    let log = g.nginx.error_log();
    for v in &killed {
        assert!(
            log.contains(&format!("{v} exited on signal 9")),
            "no sign of killing {v} in the error log"
        );
    }
    for m in &ms {
        mock_state_idle(m.port);
    }
    // Full capacity again: the nodes' learned limits at once, top class.
    let cap: u64 = nodes(&st).values().map(|n| num(n, "limit")).sum();
    assert!(cap >= 2, "limits: {st}");
    let after = run_parallel(cap as usize, cap as usize, |_| chat(g.port, 9));
    for r in &after {
        let r = r.as_ref().expect("a response after the kills");
        assert_eq!(r.status, 200, "{} {}", r.text(), status(&g));
    }
    eprintln!("kills {kills:?}: {} requests, {sum:?}", outcomes.len());
    assert_idle(&g, "after the last requests");
}

/// 5 reloads (SIGHUP) during 6 clients' load below the nodes' capacity, 3 of them
/// changing node a's weight: every request is served; once idle nothing leaks; both
/// nodes keep their counters (the gateway's count of tries still equals what each
/// node received since the start) and their learned limits; a has the last weight.
#[test]
fn reloads_during_load_fail_nothing_and_keep_counters() {
    let dir = TestDir::new("chaos-reload");
    let ms = mocks(&["a", "b"], 100, 4);
    let _mocks = start_mocks(&dir, &ms);
    let cfg = |wa: u32| pool(&[("a", &ms[0], wa), ("b", &ms[1], 1)], three_classes());
    let g = start_gateway(&dir, &cfg(1));
    learn_limits(&g, 17);
    let before = assert_idle(&g, "after learning the limits");
    let weights = [2, 2, 3, 3, 5];
    let (_, outcomes) = with_load(&g, 6, Duration::from_secs(25), || {
        let mut last = 1;
        for w in weights {
            if w != last {
                fs::write(&g.json, cfg(w).to_string()).unwrap();
                last = w;
            }
            let old = g.nginx.wait_workers(2, &[]);
            g.nginx.signal(libc::SIGHUP);
            g.nginx.wait_workers(2, &old);
            thread::sleep(Duration::from_millis(500));
        }
    });
    let errors = check_responses(&outcomes, false);
    assert!(
        errors.is_empty(),
        "requests failed: {errors:?}; all: {:?}",
        summary(&outcomes)
    );
    assert!(outcomes.len() >= 20, "too little load: {:?}", summary(&outcomes));
    let st = assert_idle(&g, "after the reloads");
    assert_counters_kept(&st, &nodes(&before), &[&ms[0], &ms[1]]);
    let now = nodes(&st);
    for (id, n) in &now {
        assert!(
            n["limit"].as_f64() > Some(0.0),
            "node {id} lost its learned limit: {st}"
        );
    }
    assert_eq!(num(&now["a"], "weight"), 5, "a has the last weight: {st}");
    assert_eq!(num(&now["b"], "weight"), 1, "{st}");
    eprintln!(
        "{} requests over 5 reloads: {:?}",
        outcomes.len(),
        summary(&outcomes)
    );
}

/// A reload nginx refuses (a second `listen` on a port in use) that also brings a new
/// pool config (nodes c and d instead of a and b), during 6 clients' load: the old
/// workers go on, every request is served by the OLD nodes only (c and d receive
/// nothing), the status still shows a and b with their counters, nothing leaks.
///
/// Fails while `init()` applies a pool config to the shared region before nginx
/// knows whether the reload succeeds (issue 17.3).
#[test]
fn failed_reload_during_load_keeps_the_old_config() {
    let dir = TestDir::new("chaos-badreload");
    let ms = mocks(&["a", "b", "c", "d"], 100, 4);
    let _mocks = start_mocks(&dir, &ms);
    let g = start_gateway(
        &dir,
        &pool(&[("a", &ms[0], 1), ("b", &ms[1], 1)], three_classes()),
    );
    learn_limits(&g, 17);
    let before = assert_idle(&g, "after learning the limits");
    let workers = g.nginx.wait_workers(2, &[]);
    let busy = TcpListener::bind("127.0.0.1:0").expect("bind a busy port");
    let busy_port = busy.local_addr().unwrap().port();
    let log_len = g.nginx.error_log().len();
    let (refused, outcomes) = with_load(&g, 6, Duration::from_secs(25), || {
        fs::write(
            &g.json,
            pool(&[("c", &ms[2], 1), ("d", &ms[3], 1)], three_classes()).to_string(),
        )
        .unwrap();
        let conf = fs::read_to_string(g.nginx.conf()).unwrap();
        let listen = format!("listen 127.0.0.1:{};", g.port);
        assert!(conf.contains(&listen), "no `{listen}` in the gateway config");
        let bad = conf.replace(
            &listen,
            &format!("{listen}\n        listen 127.0.0.1:{busy_port};"),
        );
        fs::write(g.nginx.conf(), bad).unwrap();
        g.nginx.signal(libc::SIGHUP);
        let mut log = String::new();
        wait_until(
            Duration::from_secs(15),
            "the refused reload in the error log",
            || {
                log = g.nginx.error_log()[log_len..].to_string();
                log.contains("still could not bind()")
            },
        );
        // Load on after the refusal too.
        thread::sleep(Duration::from_millis(1500));
        log
    });
    drop(busy);
    assert!(
        refused.contains(&format!("127.0.0.1:{busy_port}")),
        "the reload failed on the busy port: {refused}"
    );
    assert_eq!(
        g.nginx.workers(),
        workers,
        "the workers changed on a refused reload"
    );
    let new_nodes: Vec<u64> = ms[2..]
        .iter()
        .map(|m| mock_state_idle(m.port)["received"].as_u64().unwrap())
        .collect();
    let by_node = count(
        outcomes
            .iter()
            .filter_map(|(_, o)| o.as_ref().ok())
            .map(|r| r.header("X-Node").unwrap_or("")),
    );
    assert_eq!(
        new_nodes,
        [0, 0],
        "the refused reload's nodes c and d received requests (responses by node: {by_node:?}); \
         status: {}",
        status(&g)
    );
    let errors = check_responses(&outcomes, false);
    assert!(
        errors.is_empty(),
        "requests failed: {errors:?}; all: {:?}",
        summary(&outcomes)
    );
    assert!(outcomes.len() >= 20, "too little load: {by_node:?}");
    for (node, n) in &by_node {
        assert!(
            ["a", "b"].contains(&node.as_str()),
            "{n} served by {node:?}: {by_node:?}"
        );
    }
    let st = assert_idle(&g, "after the refused reload");
    let ids: Vec<String> = nodes(&st).into_keys().collect();
    assert_eq!(ids, ["a", "b"], "the status shows the old nodes: {st}");
    assert_counters_kept(&st, &nodes(&before), &[&ms[0], &ms[1]]);
    for (id, n) in nodes(&st) {
        assert!(
            n["limit"].as_f64() > Some(0.0),
            "node {id} lost its learned limit: {st}"
        );
    }
}
