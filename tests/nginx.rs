//! End-to-end tests: the library inside real nginx (2 workers), in front of mock LLM
//! nodes. Run with `make test-nginx` (`RSB_LUA_SO=... cargo test --no-default-features
//! --test nginx -- --test-threads=1`). They need nginx with lua-nginx-module and a built
//! `rsbalancer.so`, and fail (never skip) without them: see tests/support/mod.rs.
//!
//! The gateway is the demo template `nginx-conf/demo/gateway.conf`; the mock nodes run
//! `nginx-conf/demo/lua/mock_llm.lua`. No assertion depends on wall-clock time; the
//! only waits are polls with generous limits (nginx starting, reloading, respawning).

mod support;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{json, Value};
use support::*;

/// A pool config for the gateway's pool "llm"; tests add pool settings to
/// `v["pools"]["llm"]`.
fn pool_json(algorithm: &str, nodes: &[(&str, String, u32)]) -> Value {
    let nodes: Vec<Value> = nodes
        .iter()
        .map(|(id, addr, weight)| json!({ "id": id, "addr": addr, "weight": weight }))
        .collect();
    json!({ "pools": { "llm": { "algorithm": algorithm, "nodes": nodes } } })
}

/// A retry policy that never refuses a retry for budget reasons, for tests about which
/// node a retry goes to. (The default budget, 20% of requests + 3/s, rightly refuses
/// most retries when a burst of first tries all fail at once.)
fn generous_retries(max_tries: u32, non_idempotent: bool) -> Value {
    json!({ "budget_ratio": 1.0, "min_per_s": 10000, "max_tries": max_tries,
            "non_idempotent": non_idempotent })
}

/// `n` chat completions from `threads` threads: (status, X-Node, X-Worker, X-Upstream-Addr).
fn load(g: &Gateway, n: usize, threads: usize) -> Vec<(u16, String, String, String)> {
    run_parallel(n, threads, |_| {
        let r = g.chat();
        let h = |name: &str| r.header(name).unwrap_or("").to_string();
        (r.status, h("X-Node"), h("X-Worker"), h("X-Upstream-Addr"))
    })
}

/// Stats fetched concurrently until answers from at least two different workers came
/// back (a lone client tends to land on the same worker); returns them all.
fn stats_from_both_workers(g: &Gateway) -> Vec<(String, Value)> {
    let mut all = Vec::new();
    for _ in 0..20 {
        let batch = run_parallel(16, 16, |_| {
            let r = get(g.port, "/rsbalancer/stats");
            assert_eq!(r.status, 200, "stats: {}", r.text());
            (r.header("X-Worker").unwrap_or("").to_string(), r.json())
        });
        all.extend(batch);
        let workers: HashSet<&str> = all.iter().map(|(w, _)| w.as_str()).collect();
        if workers.len() >= 2 {
            return all;
        }
    }
    panic!("320 stats requests were all answered by one worker");
}

/// The counters of a stats document (no time-dependent fields such as `state`).
fn counters(stats: &Value) -> BTreeMap<String, Vec<u64>> {
    const FIELDS: [&str; 7] = [
        "weight",
        "inflight",
        "picks",
        "requests",
        "failures",
        "busy",
        "latency_sum_us",
    ];
    stats
        .as_object()
        .expect("stats object")
        .keys()
        .map(|id| (id.clone(), FIELDS.iter().map(|f| stat(stats, id, f)).collect()))
        .collect()
}

fn assert_share(counts: &BTreeMap<String, usize>, total: usize, node: &str, want_pct: f64, tol_pct: f64) {
    let got = *counts.get(node).unwrap_or(&0) as f64 * 100.0 / total as f64;
    assert!(
        (got - want_pct).abs() <= tol_pct,
        "node {node}: {got:.1}% of {total} requests, want {want_pct}% ± {tol_pct} (counts {counts:?})"
    );
}

fn sum(stats: &Value, ids: &[&str], field: &str) -> u64 {
    ids.iter().map(|id| stat(stats, id, field)).sum()
}

/// `chash` routes of `n` chat completions from 8 threads, request `i` keyed by
/// `X-Session: user-<i % keys>`: per key, the nodes that answered and the workers that
/// routed it. Every request must succeed at its first try.
fn chash_routes(g: &Gateway, keys: usize, n: usize) -> BTreeMap<usize, (HashSet<String>, HashSet<String>)> {
    let results = run_parallel(n, 8, |i| {
        let key = i % keys;
        let session = format!("user-{key}");
        let r = http_with(
            g.port,
            "POST",
            "/v1/chat/completions",
            &[("X-Session", &session)],
            Some(CHAT_BODY),
        )
        .expect("chat request");
        let h = |name: &str| r.header(name).unwrap_or("").to_string();
        (key, r.status, h("X-Node"), h("X-Worker"), h("X-Upstream-Addr"))
    });
    let mut routes: BTreeMap<usize, (HashSet<String>, HashSet<String>)> = BTreeMap::new();
    for (key, status, node, worker, tried) in results {
        assert!(
            status == 200 && !tried.contains(','),
            "user-{key}: {status} via {tried}"
        );
        let e = routes.entry(key).or_default();
        e.0.insert(node);
        e.1.insert(worker);
    }
    routes
}

/// Each key's one node; panics if a key reached several, or too few keys were routed by
/// both workers for the claim to mean "across workers".
fn chash_homes(routes: &BTreeMap<usize, (HashSet<String>, HashSet<String>)>) -> BTreeMap<usize, String> {
    let split: Vec<_> = routes.iter().filter(|(_, (nodes, _))| nodes.len() != 1).collect();
    assert!(
        split.is_empty(),
        "keys that reached more than one node: {split:?}"
    );
    let both = routes.values().filter(|(_, workers)| workers.len() == 2).count();
    assert!(
        both >= routes.len() / 10,
        "only {both} of {} keys were routed by both workers",
        routes.len()
    );
    routes
        .iter()
        .map(|(&k, (nodes, _))| (k, nodes.iter().next().unwrap().clone()))
        .collect()
}

/// Consistent hashing by a request header in real nginx: a key reaches the same node
/// whichever worker routes it, every node holds a share of the keys, and when the 2nd of
/// 4 nodes is removed through the admin API only its keys move (spread over the others);
/// every other key stays on its node, in both workers.
#[test]
fn chash_by_header_is_sticky_across_workers_and_a_removal_moves_only_its_keys() {
    const KEYS: usize = 200;
    let dir = TestDir::new("chash");
    let nodes: Vec<MockNode> = ["a", "b", "c", "d"]
        .iter()
        .map(|id| MockNode::new(id, 2))
        .collect();
    let _mocks = start_mocks(&dir, &nodes);
    let list: Vec<(&str, String, u32)> = nodes.iter().map(|m| (m.name.as_str(), m.addr(), 1)).collect();
    let mut cfg = pool_json("chash", &list);
    cfg["pools"]["llm"]["slow_start_ms"] = json!(0);
    let g = start_gateway_with(&dir, &cfg, |text| {
        let call = r#"rsbalancer.balance("llm")"#;
        assert!(text.contains(call), "gateway.conf has no {call}");
        text.replacen(call, r#"rsbalancer.balance("llm", ngx.var.http_x_session)"#, 1)
    });

    let before = chash_homes(&chash_routes(&g, KEYS, KEYS * 8));
    let held = count(before.values().map(String::as_str));
    for m in &nodes {
        let n = held.get(&m.name).copied().unwrap_or(0);
        assert!(
            n >= KEYS / 10,
            "node {} holds {n} of {KEYS} keys: {held:?}",
            m.name
        );
    }

    let r = http(g.port, "DELETE", "/rsbalancer/pools/llm/nodes/b", None).expect("admin DELETE");
    assert_eq!(r.status, 200, "{}", r.text());
    let after = chash_homes(&chash_routes(&g, KEYS, KEYS * 8));
    let moved: Vec<_> = before
        .iter()
        .filter(|&(k, home)| home != "b" && after[k] != *home)
        .map(|(k, home)| format!("user-{k}: {home} -> {}", after[k]))
        .collect();
    assert!(
        moved.is_empty(),
        "{} keys of staying nodes moved: {moved:?}",
        moved.len()
    );
    let heirs = count(
        before
            .iter()
            .filter(|&(_, home)| home == "b")
            .map(|(k, _)| after[k].as_str()),
    );
    assert!(
        !heirs.contains_key("b"),
        "the removed node still served: {heirs:?}"
    );
    assert!(heirs.len() >= 2, "b's keys went to one node only: {heirs:?}");
}

#[test]
fn weighted_random_follows_weights_across_both_workers() {
    let dir = TestDir::new("weights");
    // Equally fast nodes, 20 ms each: weighted_random scales weights by a latency factor
    // (peak EWMA against the pool median), and nginx measures upstream times in whole
    // milliseconds; at 20 ms a 1 ms jitter moves a weight by 5% at most (at 5 ms, 20%).
    let nodes = [
        MockNode::new("a", 20),
        MockNode::new("b", 20),
        MockNode::new("c", 20),
    ];
    let _mocks = start_mocks(&dir, &nodes);
    let g = start_gateway(
        &dir,
        &pool_json(
            "weighted_random",
            &[
                ("a", nodes[0].addr(), 30),
                ("b", nodes[1].addr(), 50),
                ("c", nodes[2].addr(), 20),
            ],
        ),
    );

    let n = 2000;
    let results = load(&g, n, 8);
    let bad: Vec<_> = results.iter().filter(|r| r.0 != 200).collect();
    assert!(
        bad.is_empty(),
        "{} requests failed, e.g. {:?}",
        bad.len(),
        bad.first()
    );
    let by_node = count(results.iter().map(|r| r.1.as_str()));
    eprintln!("shares: {by_node:?}");
    assert_share(&by_node, n, "a", 30.0, 4.0);
    assert_share(&by_node, n, "b", 50.0, 4.0);
    assert_share(&by_node, n, "c", 20.0, 4.0);

    // Both workers served, so the shares above are those of the two together.
    let by_worker = count(results.iter().map(|r| r.2.as_str()));
    assert!(
        by_worker.len() >= 2,
        "one worker served everything: {by_worker:?}"
    );
    let workers: Vec<String> = g.nginx.workers().iter().map(|p| p.to_string()).collect();
    for w in by_worker.keys() {
        assert!(
            workers.contains(w),
            "X-Worker {w} is not a worker of the gateway ({workers:?})"
        );
    }

    // One shared region: every worker reports the same numbers, which account for
    // every request exactly once, with nothing left in flight.
    quiesce(&g);
    let answers = stats_from_both_workers(&g);
    let (w0, first) = &answers[0];
    for (w, s) in &answers {
        assert_eq!(
            counters(s),
            counters(first),
            "stats of worker {w} differ from worker {w0}: {s} {first}"
        );
    }
    for id in ["a", "b", "c"] {
        assert_eq!(
            stat(first, id, "requests"),
            by_node[id] as u64,
            "requests of {id}: {first}"
        );
        assert_eq!(stat(first, id, "picks"), stat(first, id, "requests"), "{first}");
    }
    assert_eq!(sum(first, &["a", "b", "c"], "requests"), n as u64, "{first}");
    assert_eq!(sum(first, &["a", "b", "c"], "failures"), 0, "{first}");
    assert_eq!(inflight(first), 0, "{first}");
}

#[test]
fn retry_skips_the_refused_node_within_the_request() {
    let dir = TestDir::new("retry");
    let nodes = [MockNode::new("a", 2), MockNode::new("b", 2)];
    let closed = free_port(); // nothing listens there: connection refused
    let dead_addr = format!("127.0.0.1:{closed}");
    let _mocks = start_mocks(&dir, &nodes);
    let mut cfg = pool_json(
        "weighted_random",
        &[
            ("dead", dead_addr.clone(), 100),
            ("a", nodes[0].addr(), 10),
            ("b", nodes[1].addr(), 10),
        ],
    );
    cfg["pools"]["llm"]["retry"] = generous_retries(3, false);
    let g = start_gateway(&dir, &cfg);

    let n = 300;
    let results = load(&g, n, 8);
    for (status, node, _, upstreams) in &results {
        assert_eq!(
            *status,
            200,
            "a request failed (tried {upstreams})\n{}",
            g.nginx.diagnostics()
        );
        assert!(
            node == "a" || node == "b",
            "answered by {node:?} (tried {upstreams})"
        );
        let tried: Vec<&str> = upstreams.split(", ").collect();
        let unique: HashSet<&str> = tried.iter().copied().collect();
        assert_eq!(
            unique.len(),
            tried.len(),
            "a node was tried twice in one request: {upstreams}"
        );
    }
    // Requests that met the dead node first, then succeeded elsewhere in the same request.
    let retried = results
        .iter()
        .filter(|r| r.3.starts_with(&format!("{dead_addr}, ")))
        .count();
    assert!(retried > 0, "no request tried the dead node: {results:?}");

    let s = quiesce(&g);
    assert_eq!(
        stat(&s, "dead", "failures") as usize,
        retried,
        "failures of the dead node: {s}"
    );
    assert_eq!(stat(&s, "dead", "requests"), stat(&s, "dead", "failures"), "{s}");
    assert_eq!(sum(&s, &["a", "b"], "requests"), n as u64, "{s}");
    assert_eq!(sum(&s, &["a", "b"], "failures"), 0, "{s}");
}

#[test]
fn busy_and_failing_nodes_are_retried_on_another_node() {
    let dir = TestDir::new("busy");
    let mut unavailable = MockNode::new("unavailable", 1);
    unavailable.fail = "503".into();
    let mut quota = MockNode::new("quota", 1);
    quota.quota_rps = 1.0;
    quota.quota_burst = 1;
    let mut closing = MockNode::new("closing", 1);
    closing.fail = "close".into();
    let ok = MockNode::new("ok", 1);
    let nodes = [unavailable, quota, closing, ok];
    let _mocks = start_mocks(&dir, &nodes);
    let mut cfg = pool_json(
        "weighted_random",
        &[
            ("unavailable", nodes[0].addr(), 30),
            ("quota", nodes[1].addr(), 30),
            ("closing", nodes[2].addr(), 30),
            ("ok", nodes[3].addr(), 10),
        ],
    );
    // Up to every node once; a POST whose connection was closed may be repeated.
    cfg["pools"]["llm"]["retry"] = generous_retries(4, true);
    let g = start_gateway(&dir, &cfg);

    let n = 200;
    let results = load(&g, n, 4);
    for (status, node, _, upstreams) in &results {
        assert_eq!(
            *status,
            200,
            "a request failed (tried {upstreams})\n{}",
            g.nginx.diagnostics()
        );
        assert!(
            node == "ok" || node == "quota",
            "answered by {node:?} (tried {upstreams})"
        );
    }
    let s = quiesce(&g);
    assert!(
        stat(&s, "unavailable", "failures") > 0,
        "503s not counted as failures: {s}"
    );
    assert_eq!(
        stat(&s, "unavailable", "failures"),
        stat(&s, "unavailable", "requests"),
        "{s}"
    );
    assert!(
        stat(&s, "closing", "failures") > 0,
        "closed connections not counted: {s}"
    );
    // Every 429 is counted against the node (as busy, or as a failure while the wrapper
    // bug shown by `post_answered_429_is_retried_and_counted_as_busy` stands).
    assert!(
        stat(&s, "quota", "busy") + stat(&s, "quota", "failures") > 0,
        "429s not counted: {s}"
    );
    let served: u64 = ["quota", "ok"]
        .iter()
        .map(|id| stat(&s, id, "requests") - stat(&s, id, "busy") - stat(&s, id, "failures"))
        .sum();
    assert_eq!(served, n as u64, "{s}");

    // The mocks' own in-flight counters (across their workers) are back to 0 as well.
    for node in &nodes {
        mock_state_idle(node.port);
    }
}

/// By default a POST that may have reached a node (here: the node dropped the
/// connection after reading the request) is not sent to another node: a chat
/// completion must not run twice. Requests that never met that node are unaffected.
#[test]
fn post_is_not_repeated_after_a_dropped_connection_by_default() {
    let dir = TestDir::new("no-repeat");
    let mut closing = MockNode::new("closing", 1);
    closing.fail = "close".into();
    let ok = MockNode::new("ok", 1);
    let nodes = [closing, ok];
    let _mocks = start_mocks(&dir, &nodes);
    let mut cfg = pool_json(
        "weighted_random",
        &[("closing", nodes[0].addr(), 50), ("ok", nodes[1].addr(), 50)],
    );
    cfg["pools"]["llm"]["retry"] = generous_retries(3, false);
    let g = start_gateway(&dir, &cfg);

    let results = load(&g, 100, 4);
    let mut dropped = 0;
    for (status, node, _, upstreams) in &results {
        if upstreams.contains(&nodes[0].addr()) {
            dropped += 1;
            // The wrapper ends such a request in the balancer with NGX_BUSY, which nginx
            // answers with 502 ("no live upstreams", a " : " entry in $upstream_addr).
            assert_eq!(*status, 502, "tried {upstreams}: answered by {node:?}");
            assert!(
                !upstreams.contains(&nodes[1].addr()),
                "the POST was repeated on another node: {upstreams}"
            );
        } else {
            assert_eq!((*status, node.as_str()), (200, "ok"), "tried {upstreams}");
        }
    }
    assert!(dropped > 0, "no request met the closing node: {results:?}");
    let s = quiesce(&g);
    assert_eq!(stat(&s, "closing", "failures"), dropped, "{s}");
}

/// Regression: with the default retry policy (`non_idempotent: false`) a POST answered
/// 429 is retried on another node within the same client request, and the 429 is
/// reported as "busy" (cooldown, Retry-After, learned limit), not as a failure.
/// On the retry call nginx's `get_last_failure()` says `"failed", 429`: the wrapper
/// must keep the code rather than read "failed" as "no response".
#[test]
fn post_answered_429_is_retried_and_counted_as_busy() {
    let dir = TestDir::new("busy-429");
    let mut quota = MockNode::new("quota", 1);
    quota.quota_rps = 0.1;
    quota.quota_burst = 1;
    let ok = MockNode::new("ok", 1);
    let nodes = [quota, ok];
    let _mocks = start_mocks(&dir, &nodes);
    let mut cfg = pool_json(
        "weighted_random",
        &[("quota", nodes[0].addr(), 90), ("ok", nodes[1].addr(), 10)],
    );
    cfg["pools"]["llm"]["retry"] = generous_retries(3, false);
    // Spend the quota node's one token directly: the gateway's first try on it is a
    // 429. (Served first through the gateway, its cold first answer could be slow
    // enough for the balancer to rank it a slow node and send it nothing more.)
    let spent = post(nodes[0].port, "/v1/chat/completions", CHAT_BODY);
    assert_eq!(spent.status, 200, "{}", spent.text());
    let g = start_gateway(&dir, &cfg);
    let results = load(&g, 20, 1);
    assert!(
        results.iter().all(|r| r.0 == 200),
        "a 429 was not retried on the other node: {results:?}"
    );
    let s = quiesce(&g);
    assert!(stat(&s, "quota", "busy") > 0, "no 429 counted as busy: {s}");
    assert_eq!(stat(&s, "quota", "failures"), 0, "429s counted as failures: {s}");
}

#[test]
fn set_weight_changes_the_distribution_in_every_worker() {
    let dir = TestDir::new("set-weight");
    let nodes = [MockNode::new("a", 5), MockNode::new("b", 5)];
    let _mocks = start_mocks(&dir, &nodes);
    let g = start_gateway(
        &dir,
        &pool_json(
            "weighted_random",
            &[("a", nodes[0].addr(), 50), ("b", nodes[1].addr(), 50)],
        ),
    );
    // Both workers have built their tables with the initial weights.
    let before = load(&g, 200, 8);
    assert!(before.iter().all(|r| r.0 == 200), "{before:?}");
    assert_eq!(count(before.iter().map(|r| r.2.as_str())).len(), 2, "{before:?}");
    assert_eq!(count(before.iter().map(|r| r.1.as_str())).len(), 2, "{before:?}");

    // The admin location validates its input.
    assert_eq!(g.set_weight("a", 0).status, 400);
    assert_eq!(g.set_weight("nosuch", 5).status, 404);
    assert_eq!(get(g.port, "/rsbalancer/weight?node=a&weight=5").status, 405);

    let r = g.set_weight("a", 1);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), json!({ "pool": "llm", "node": "a", "weight": 1 }));
    for (w, s) in stats_from_both_workers(&g) {
        assert_eq!(stat(&s, "a", "weight"), 1, "worker {w}: {s}");
        assert_eq!(stat(&s, "b", "weight"), 50, "worker {w}: {s}");
    }

    // a now has 1/51 of the weight (2%), in each worker.
    let after = load(&g, 1000, 8);
    assert!(after.iter().all(|r| r.0 == 200), "{after:?}");
    let mut per_worker: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for (_, node, worker, _) in &after {
        let e = per_worker.entry(worker.as_str()).or_default();
        e.1 += 1;
        if node == "a" {
            e.0 += 1;
        }
    }
    assert!(
        per_worker.len() >= 2,
        "one worker served everything: {per_worker:?}"
    );
    for (w, (a, total)) in &per_worker {
        assert!(
            *a as f64 <= *total as f64 * 0.10,
            "worker {w}: a served {a} of {total} after its weight went 50 -> 1"
        );
    }
}

/// A pool config error stops nginx from starting, and the message names the field.
///
/// Not `nginx -t`: lua-nginx-module does not run `init_by_lua` under `-t`
/// (`ngx_http_lua_init` returns at once when `ngx_test_config` is set), so `nginx -t`
/// accepts any pool config. The check comes when nginx starts or reloads (see the
/// reload test).
#[test]
fn bad_pool_config_stops_nginx_naming_the_field() {
    let dir = TestDir::new("bad-config");
    let port = free_port();
    let cfg = pool_json(
        "weighted_random",
        &[("a", "127.0.0.1:9".into(), 10), ("b", "127.0.0.1:10".into(), 0)],
    );
    let (conf, _) = write_gateway(&dir, port, &cfg);
    let (status, stderr) = nginx_start_expecting_failure(&dir, &conf);
    assert!(!status.success(), "{status}");
    assert!(
        stderr.contains("pools.llm.nodes[1].weight"),
        "stderr does not name the field:\n{stderr}"
    );
    assert!(stderr.contains("0 is out of range 1..=10000"), "{stderr}");
    assert!(!port_open(port), "something listens on {port}");

    // The config itself is well-formed: only the pool config is wrong.
    let out = nginx_test_config(dir.path(), &conf);
    assert!(
        out.status.success(),
        "nginx -t:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn reload_with_bad_config_keeps_serving_and_good_reload_keeps_counters() {
    let dir = TestDir::new("reload");
    let nodes = [
        MockNode::new("a", 2),
        MockNode::new("b", 2),
        MockNode::new("c", 2),
    ];
    let _mocks = start_mocks(&dir, &nodes);
    let all = [
        ("a", nodes[0].addr(), 30),
        ("b", nodes[1].addr(), 50),
        ("c", nodes[2].addr(), 20),
    ];
    let g = start_gateway(&dir, &pool_json("weighted_random", &all));
    assert!(load(&g, 300, 8).iter().all(|r| r.0 == 200));
    let s1 = quiesce(&g);
    assert_eq!(sum(&s1, &["a", "b", "c"], "requests"), 300, "{s1}");

    // A bad config: nginx refuses the reload and the old workers go on serving.
    let workers = g.nginx.workers();
    let log_len = g.nginx.error_log().len();
    let bad = r#"{"pools":{"llm":{"nodes":[{"id":"a","addr":"127.0.0.1:1","weight":0}]}}}"#;
    std::fs::write(&g.json, bad).unwrap();
    g.nginx.signal(libc::SIGHUP);
    let mut refused = String::new();
    wait_until(
        Duration::from_secs(10),
        "the refused reload in the error log",
        || {
            refused = g.nginx.error_log()[log_len..].to_string();
            refused.contains("init_by_lua error")
        },
    );
    assert!(
        refused.contains("pools.llm.nodes[0].weight"),
        "reload error: {refused}"
    );
    let after_bad = load(&g, 100, 4);
    assert!(after_bad.iter().all(|r| r.0 == 200), "{after_bad:?}");
    assert_eq!(
        g.nginx.workers(),
        workers,
        "the workers changed on a refused reload"
    );
    let s2 = quiesce(&g);
    assert_eq!(sum(&s2, &["a", "b", "c"], "requests"), 400, "{s2}");

    // A good config without c: new workers; a and b keep their counters; c gets nothing.
    std::fs::write(&g.json, pool_json("weighted_random", &all[..2]).to_string()).unwrap();
    g.nginx.signal(libc::SIGHUP);
    g.nginx.wait_workers(2, &workers);
    let s3 = g.stats();
    assert!(s3.get("c").is_none(), "c still listed after the reload: {s3}");
    for id in ["a", "b"] {
        assert_eq!(
            stat(&s3, id, "requests"),
            stat(&s2, id, "requests"),
            "{id} reset by the reload: {s3}"
        );
    }
    let c_served = get(nodes[2].port, "/mock/state").json()["served"].clone();
    let results = load(&g, 300, 8);
    assert!(results.iter().all(|r| r.0 == 200 && r.1 != "c"), "{results:?}");
    let by_node = count(results.iter().map(|r| r.1.as_str()));
    let s4 = quiesce(&g);
    for id in ["a", "b"] {
        let want = stat(&s2, id, "requests") + *by_node.get(id).unwrap_or(&0) as u64;
        assert_eq!(stat(&s4, id, "requests"), want, "{id}: {s4}");
    }
    assert_eq!(
        get(nodes[2].port, "/mock/state").json()["served"],
        c_served,
        "c got traffic"
    );
}

/// Issue 17: nginx runs `init_by_lua` before it knows whether a reload succeeds. A
/// reload refused after it (here: a `listen` on a port already in use) must leave the
/// running gateway exactly as it was: the old workers keep routing to the old pool
/// config's nodes, with their counters. (It once applied the new config anyway: the
/// old workers switched to the new nodes, the old nodes' counters gone.)
#[test]
fn reload_refused_by_nginx_leaves_the_old_pool_config_live() {
    let dir = TestDir::new("reload-refused");
    let nodes = [
        MockNode::new("a", 2),
        MockNode::new("b", 2),
        MockNode::new("c", 2),
    ];
    let _mocks = start_mocks(&dir, &nodes);
    let ab = [("a", nodes[0].addr(), 50), ("b", nodes[1].addr(), 50)];
    let g = start_gateway(&dir, &pool_json("weighted_random", &ab));
    assert!(load(&g, 100, 4).iter().all(|r| r.0 == 200));
    let s1 = quiesce(&g);
    assert_eq!(sum(&s1, &["a", "b"], "requests"), 100, "{s1}");

    // The new pool config is valid (only c); the new nginx.conf cannot bind.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_port = busy.local_addr().unwrap().port();
    let conf = std::fs::read_to_string(g.nginx.conf()).unwrap();
    let own = format!("listen 127.0.0.1:{};", g.port);
    assert!(conf.contains(&own), "no `{own}` in the gateway config");
    let refused_conf = conf.replacen(&own, &format!("{own} listen 127.0.0.1:{busy_port};"), 1);
    std::fs::write(g.nginx.conf(), &refused_conf).unwrap();
    let only_c = [("c", nodes[2].addr(), 10)];
    std::fs::write(&g.json, pool_json("weighted_random", &only_c).to_string()).unwrap();
    let workers = g.nginx.workers();
    let log_len = g.nginx.error_log().len();
    g.nginx.signal(libc::SIGHUP);
    wait_until(
        Duration::from_secs(10),
        "the refused reload in the error log",
        || g.nginx.error_log()[log_len..].contains("Address already in use"),
    );
    let after = load(&g, 100, 4);
    assert!(
        after.iter().all(|r| r.0 == 200 && (r.1 == "a" || r.1 == "b")),
        "the refused reload's pool config is live: {after:?}"
    );
    assert_eq!(
        g.nginx.workers(),
        workers,
        "the workers changed on a refused reload"
    );
    let s2 = quiesce(&g);
    assert!(s2.get("c").is_none(), "c is listed after a refused reload: {s2}");
    assert_eq!(sum(&s2, &["a", "b"], "requests"), 200, "counters lost: {s2}");
    assert_eq!(
        get(nodes[2].port, "/mock/state").json()["received"],
        0,
        "c got traffic"
    );

    // The same pool config with a good nginx.conf: live in the new workers.
    std::fs::write(g.nginx.conf(), &conf).unwrap();
    g.nginx.signal(libc::SIGHUP);
    g.nginx.wait_workers(2, &workers);
    let results = load(&g, 50, 4);
    assert!(results.iter().all(|r| r.0 == 200 && r.1 == "c"), "{results:?}");
    drop(busy);
}

/// Sets the flag when dropped.
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

#[test]
fn killed_worker_leaves_no_inflight_behind() {
    let dir = TestDir::new("kill9");
    let nodes = [
        MockNode::new("a", 100),
        MockNode::new("b", 100),
        MockNode::new("c", 100),
    ];
    let _mocks = start_mocks(&dir, &nodes);
    let g = start_gateway(
        &dir,
        &pool_json(
            "least_conn",
            &[
                ("a", nodes[0].addr(), 30),
                ("b", nodes[1].addr(), 50),
                ("c", nodes[2].addr(), 20),
            ],
        ),
    );
    let victim = g.nginx.workers()[0];

    let stop = AtomicBool::new(false);
    let sent = AtomicUsize::new(0);
    std::thread::scope(|s| {
        // Stops the load on every way out of this scope, panics included.
        let _stop = SetOnDrop(&stop);
        for _ in 0..16 {
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    // Requests on the killed worker fail; that is expected.
                    let _ = http(g.port, "POST", "/v1/chat/completions", Some(CHAT_BODY));
                    sent.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        // Kill a worker while both have requests in flight.
        wait_until(Duration::from_secs(10), "requests in flight", || {
            inflight(&g.stats()) >= 12
        });
        signal(victim, libc::SIGKILL);
        let respawned = g.nginx.wait_workers(2, &[victim]);
        assert!(!respawned.contains(&victim));
        // More traffic, on the new worker too, then stop.
        let until = sent.load(Ordering::Relaxed) + 200;
        wait_until(Duration::from_secs(20), "traffic after the respawn", || {
            sent.load(Ordering::Relaxed) >= until
        });
    });

    // Every try handed out is accounted for: those of the killed worker by the worker
    // that replaced it (they were picked, never reported: `reclaimed_tries`), the
    // others by their log phase (quiesce: nothing left in flight).
    quiesce(&g);
    let status = get(g.port, "/rsbalancer/status").json();
    assert!(
        status["reclaimed_tries"].as_u64().unwrap_or(0) > 0,
        "the killed worker had no try in flight: {status}"
    );
    let log = g.nginx.error_log();
    assert!(
        log.contains(&format!("{victim} exited on signal 9")),
        "no sign of the kill in the error log:\n{log}"
    );
    // And the gateway serves as before.
    let r = g.chat();
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn demo_configs_serve_chat_stream_stats_and_weights() {
    let dir = TestDir::new("demo");
    let (pa, pb, pc, pg) = (free_port(), free_port(), free_port(), free_port());
    let demo = repo().join("nginx-conf/demo");
    let json = dir.path().join("rsbalancer.json");
    let mut vars = gateway_vars(&dir, pg, &json);
    vars.extend([
        ("DEMO", demo.display().to_string()),
        ("PORT_A", pa.to_string()),
        ("PORT_B", pb.to_string()),
        ("PORT_C", pc.to_string()),
    ]);
    for name in ["mock-nodes.conf", "gateway.conf", "rsbalancer.json"] {
        let text = std::fs::read_to_string(demo.join(name)).unwrap();
        dir.write(name, &render(&text, &vars));
    }
    let demo_json: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let weights: Vec<u64> = demo_json["pools"]["llm"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["weight"].as_u64().unwrap())
        .collect();
    assert_eq!(weights, [30, 50, 20]);

    let _mocks = Nginx::start(
        &dir,
        "mocks",
        &dir.path().join("mock-nodes.conf"),
        &dir.path().join("mock-nodes-error.log"),
        &[pa, pb, pc],
    );
    let gw = Nginx::start(
        &dir,
        "gateway",
        &dir.path().join("gateway.conf"),
        &dir.path().join("gateway-error.log"),
        &[pg],
    );
    gw.wait_workers(2, &[]);
    // c is the slow node (1.5 s): keep it out of the way.
    let r = post(pg, "/rsbalancer/weight?node=c&weight=1", "");
    assert_eq!(r.status, 200, "{}", r.text());

    let r = post(pg, "/v1/chat/completions", CHAT_BODY);
    assert_eq!(r.status, 200, "{}\n{}", r.text(), gw.diagnostics());
    let node = r.header("X-Node").expect("X-Node").to_string();
    assert!(["a", "b", "c"].contains(&node.as_str()), "{node}");
    assert!(r.header("X-Worker").is_some());
    let body = r.json();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "mock-llm");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert!(body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .contains(&node));
    assert!(body["usage"]["total_tokens"].as_u64().unwrap() > 0);
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));

    let r = post(pg, "/v1/chat/completions", STREAM_BODY);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("Content-Type"), Some("text/event-stream"));
    let text = r.text();
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert!(events.len() > 3, "{text}");
    assert_eq!(*events.last().unwrap(), "data: [DONE]");
    let mut content = String::new();
    for e in &events[..events.len() - 1] {
        let chunk: Value = serde_json::from_str(e.strip_prefix("data: ").expect("data: line")).unwrap();
        assert_eq!(chunk["object"], "chat.completion.chunk");
        content.push_str(chunk["choices"][0]["delta"]["content"].as_str().unwrap_or(""));
    }
    assert!(content.starts_with("Hello from mock node"), "{content}");

    let r = get(pg, "/rsbalancer/stats");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("Content-Type"), Some("application/json"));
    r.json();
    let mut s = Value::Null;
    wait_until(Duration::from_secs(10), "no request in flight", || {
        s = get(pg, "/rsbalancer/stats").json();
        inflight(&s) == 0
    });
    assert_eq!(stat(&s, "c", "weight"), 1);
    assert_eq!(
        ["a", "b", "c"]
            .iter()
            .map(|id| stat(&s, id, "requests"))
            .sum::<u64>(),
        2,
        "{s}"
    );
}

#[test]
fn mock_nodes_behave_like_busy_llm_endpoints() {
    let dir = TestDir::new("mocks");
    let mut capped = MockNode::new("capped", 1000);
    capped.max_conc = 2;
    capped.retry_after = 7;
    let mut quota = MockNode::new("quota", 0);
    quota.quota_rps = 0.1; // a token every 10 s
    quota.quota_burst = 3;
    let plain = MockNode::new("plain", 0);
    let _mocks = start_mocks(&dir, &[capped.clone(), quota.clone(), plain.clone()]);

    // Concurrency cap, counted across the mock's two workers.
    let results = run_parallel(8, 8, |_| post(capped.port, "/v1/chat/completions", CHAT_BODY));
    let ok = results.iter().filter(|r| r.status == 200).count();
    let busy: Vec<_> = results.iter().filter(|r| r.status == 429).collect();
    assert!(
        (1..=2).contains(&ok),
        "{ok} of 8 concurrent requests passed a cap of 2"
    );
    assert_eq!(ok + busy.len(), 8);
    assert_eq!(busy[0].header("Retry-After"), Some("7"));
    assert_eq!(busy[0].header("X-Node"), Some("capped"));
    assert_eq!(busy[0].json()["error"]["code"], "rate_limit_exceeded");
    let st = mock_state_idle(capped.port);
    assert_eq!(
        (st["served"].clone(), st["rejected"].clone()),
        (json!(ok), json!(8 - ok)),
        "{st}"
    );

    // Token bucket: 3 at once, then 429 with Retry-After in seconds.
    let statuses: Vec<Response> = (0..6)
        .map(|_| post(quota.port, "/v1/chat/completions", CHAT_BODY))
        .collect();
    let passed = statuses.iter().filter(|r| r.status == 200).count();
    assert_eq!(passed, 3, "burst of 3: {passed} of 6 passed");
    let limited = statuses.iter().find(|r| r.status == 429).expect("a 429");
    let ra: u64 = limited
        .header("Retry-After")
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert!((1..=10).contains(&ra), "Retry-After {ra}");

    // Runtime knobs: 503, closed connections, and back.
    let r = post(plain.port, "/mock/set?fail=503", "");
    assert_eq!(r.status, 200, "{}", r.text());
    let r = post(plain.port, "/v1/chat/completions", CHAT_BODY);
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error"]["type"], "server_error");
    post(plain.port, "/mock/set?fail=close", "");
    let e = http(plain.port, "POST", "/v1/chat/completions", Some(CHAT_BODY));
    assert!(e.is_err(), "a response from a closing node: {e:?}");
    post(plain.port, "/mock/set?fail=", "");
    assert_eq!(get(plain.port, "/health").status, 200);
    assert_eq!(get(plain.port, "/v1/chat/completions").status, 405);
    assert_eq!(get(plain.port, "/nope").status, 404);
    mock_state_idle(plain.port);
}

#[test]
fn example_openai_conf_passes_nginx_t() {
    let dir = TestDir::new("example");
    std::fs::create_dir_all(dir.path().join("logs")).unwrap();
    let pool = |weight: u32| {
        pool_json(
            "p2c_ewma",
            &[
                ("east", "127.0.0.1:8443".into(), weight),
                ("west", "127.0.0.1:9443".into(), 1),
            ],
        )
        .to_string()
        .replace("\"llm\"", "\"openai\"")
    };
    let json = dir.write("openai.json", &pool(1));
    let text = std::fs::read_to_string(repo().join("nginx-conf/example-openai.conf")).unwrap();
    for needle in [
        "proxy_ssl_server_name on;",
        "proxy_ssl_name ",
        "proxy_set_header Host ",
        "perl_require rsbalancer-openai.pm;",
    ] {
        assert!(text.contains(needle), "example-openai.conf lacks {needle}");
    }
    // The one-line Perl module the example asks for, pointing at this test's files.
    let conf = example_conf(&dir, &text, "rsbalancer-openai", &json);
    let conf = dir.write("example-openai.conf", &conf);
    let out = nginx_test_config(dir.path(), &conf);
    assert!(
        out.status.success(),
        "nginx -t:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A bad pool config fails `nginx -t` itself, naming the field and the value.
    dir.write("openai.json", &pool(0));
    let out = nginx_test_config(dir.path(), &conf);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "nginx -t passed a weight of 0:\n{err}");
    assert!(
        err.contains("pools.openai.nodes[0].weight: 0 is out of range 1..=10000"),
        "nginx -t does not name the field:\n{err}"
    );
}

/// The latency a try is reported with is the node's response time, measured in the
/// log phase both on the fast path (one try answered 2xx: time since the pick) and
/// through $upstream_response_time (a retried request). A mock answering after
/// 150 ms can never be measured below 150 ms minus nginx's 1 ms clock granularity;
/// the upper bound is loose (a busy machine slows the gateway, not the mock's sleep
/// below) but catches a latency in the wrong unit or taken from the wrong try.
#[test]
fn reported_latency_is_the_nodes_response_time() {
    let dir = TestDir::new("latency");
    let slow = MockNode::new("slow", 150);
    let mut quota = MockNode::new("quota", 1);
    quota.quota_rps = 0.1;
    quota.quota_burst = 1;
    let nodes = [slow, quota];
    let _mocks = start_mocks(&dir, &nodes);
    let mut cfg = pool_json(
        "weighted_random",
        &[("slow", nodes[0].addr(), 50), ("quota", nodes[1].addr(), 50)],
    );
    cfg["pools"]["llm"]["retry"] = generous_retries(3, false);
    let g = start_gateway(&dir, &cfg);
    let results = load(&g, 40, 4);
    assert!(results.iter().all(|r| r.0 == 200), "{results:?}");
    let s = quiesce(&g);
    let served = stat(&s, "slow", "requests") - stat(&s, "slow", "failures") - stat(&s, "slow", "busy");
    assert!(served >= 20, "the slow node served {served} of 40: {s}");
    let mean_ms = stat(&s, "slow", "latency_sum_us") as f64 / served as f64 / 1000.0;
    assert!(
        (149.0..3000.0).contains(&mean_ms),
        "mean reported latency of a 150 ms node: {mean_ms:.1} ms ({s})"
    );
}

/// The snippets of `nginx-conf/snippets/` as a user adds them to an nginx of their own:
/// a minimal `http {}` / `server {}` (2 workers) including `rsbalancer-http.conf` (the
/// pool config named by RSBALANCER_CONFIG, `upstream rsbalancer` taking the pool from
/// `$rsb_pool`) and `rsbalancer-proxy.conf` in `/v1/` and `@rsb_round`, with the pool
/// named "chat" (nothing in the snippets says "llm"). A chat completion and a stream
/// are served; a chat whose first round ends busy (node a answers 429, b is drained
/// until the request waits) is served by b in a later round, within one client request.
#[test]
fn snippets_in_a_minimal_config_serve_chat_stream_and_a_busy_round() {
    let dir = TestDir::new("snippets");
    let mut a = MockNode::new("a", 5);
    a.fail = "429".into();
    let b = MockNode::new("b", 5);
    let _mocks = start_mocks(&dir, &[a.clone(), b.clone()]);
    let cfg = json!({ "pools": { "chat": { "algorithm": "p2c_ewma", "slow_start_ms": 0,
        "nodes": [ { "id": "a", "addr": a.addr(), "weight": 1 },
                   { "id": "b", "addr": b.addr(), "weight": 1 } ] } } });
    let json_path = dir.write("pool.json", &cfg.to_string());
    let port = free_port();
    let snippets = repo().join("nginx-conf/snippets");
    let conf = format!(
        r#"{head}
    access_log {d}/snippets-access.log;
    # This checkout in place of the installed files.
    lua_package_path  "{repo}/lua/?.lua;;";
    lua_package_cpath "{lib}/?.so;;";
    include {snippets}/rsbalancer-http.conf;
    server {{
        listen 127.0.0.1:{port};
        set $rsb_pool chat;
        recursive_error_pages on;
        add_header X-Upstream-Addr $upstream_addr always;
        location /v1/ {{
            access_by_lua_block {{ rsbalancer.admit(ngx.var.rsb_pool) }}
            include {snippets}/rsbalancer-proxy.conf;
            proxy_pass http://rsbalancer;
        }}
        location @rsb_round {{
            access_by_lua_block {{ rsbalancer.round(ngx.var.rsb_pool) }}
            include {snippets}/rsbalancer-proxy.conf;
            proxy_pass http://rsbalancer;
        }}
        location /rsbalancer/ {{
            allow 127.0.0.1;
            deny all;
            content_by_lua_block {{ require("resty.rsbalancer.admin").serve({{ prefix = "/rsbalancer/" }}) }}
        }}
    }}
}}
"#,
        head = conf_head(&dir, "snippets", "info"),
        d = dir.path().display(),
        repo = repo().display(),
        lib = dir.lib_dir().display(),
        snippets = snippets.display(),
    );
    let conf = dir.write("snippets.conf", &conf);
    // rsbalancer-http.conf reads the pool config path from nginx's environment.
    std::env::set_var("RSBALANCER_CONFIG", &json_path);
    let ngx = Nginx::start(
        &dir,
        "snippets",
        &conf,
        &dir.path().join("snippets-error.log"),
        &[port],
    );
    std::env::remove_var("RSBALANCER_CONFIG");
    ngx.wait_workers(2, &[]);
    let diag = || ngx.diagnostics();
    let received = |m: &MockNode| {
        get(m.port, "/mock/state").json()["received"]
            .as_u64()
            .expect("received")
    };

    // First (a never tried yet, so not cooling down), a busy round: b drained, a
    // refuses; b comes back while the client waits.
    let admin = |on: bool| {
        let r = http(
            port,
            "PUT",
            "/rsbalancer/pools/chat/nodes/b",
            Some(&format!(r#"{{"drain": {on}}}"#)),
        )
        .expect("admin PUT");
        assert_eq!(r.status, 200, "drain b {on}: {}", r.text());
    };
    admin(true);
    let a_before = received(&a);
    let b_before = received(&b);
    let r = std::thread::scope(|s| {
        let client = s.spawn(|| post(port, "/v1/chat/completions", CHAT_BODY));
        wait_until(Duration::from_secs(10), "a to refuse the request", || {
            received(&a) > a_before
        });
        std::thread::sleep(Duration::from_millis(100));
        admin(false);
        client.join().unwrap()
    });
    assert_eq!(r.status, 200, "{r:?}\n{}", diag());
    assert_eq!(r.header("X-Node"), Some("b"), "{r:?}");
    let rounds: Vec<&str> = r.header("X-Upstream-Addr").unwrap_or("").split(" : ").collect();
    assert!(rounds.len() >= 2, "one round only: {r:?}");
    assert_eq!(
        rounds[0].split(',').next().unwrap_or("").trim(),
        a.addr(),
        "{r:?}"
    );
    assert_eq!(rounds.last().unwrap().trim(), b.addr(), "{r:?}");
    assert_eq!(received(&b), b_before + 1, "b served more than once");

    // A chat: b serves it (a, if tried, refuses and the round's retry goes to b).
    let r = post(port, "/v1/chat/completions", CHAT_BODY);
    assert_eq!(r.status, 200, "{}\n{}", r.text(), diag());
    assert_eq!(r.header("X-Node"), Some("b"), "{r:?}");
    assert!(
        r.json()["choices"][0]["message"]["content"].is_string(),
        "{}",
        r.text()
    );
    // A stream, chunk by chunk to the end.
    let r = post(port, "/v1/chat/completions", STREAM_BODY);
    assert_eq!(r.status, 200, "{}\n{}", r.text(), diag());
    assert!(r.text().contains("data: [DONE]"), "{}", r.text());
}
