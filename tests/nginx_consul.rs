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

// ----------------------------------------------------------------------------------
// The gateway with a Consul pool (the stand-in in Consul's place)

/// The seed's service definition (section 3.2 of the article the project grew from),
/// word for word: an agent config file's `service` block.
const SEED_DEFINITION: &str = r#"{
  "service": {
    "name": "deepseek-api",
    "tags": ["v1.2"],
    "port": 8080,
    "check": {
      "args": ["/bin/check_api"],
      "interval": "10s",
      "timeout": "2s"
    }
  }
}"#;

/// The seed's definition as `consul services register <file>` sends it to the agent
/// (the `service` block), with the two values a test machine must change: the port
/// (the mock node's, not 8080) and the check script (`check_api` written by the test,
/// which asks the mock node's /health as the seed's `/bin/check_api` asks the API).
/// `id`, when given, is added: two instances on one agent need distinct IDs.
fn seed_service(dir: &TestDir, mock: &MockNode, id: Option<&str>) -> serde_json::Value {
    let file: serde_json::Value = serde_json::from_str(SEED_DEFINITION).unwrap();
    let mut svc = file["service"].clone();
    svc["port"] = json!(mock.port);
    let script = dir.write(
        &format!("check_api_{}", mock.name),
        &format!(
            "#!/bin/sh\n# The seed's /bin/check_api for mock node {name}: passing while its /health answers 2xx.\n\
             exec curl -sf --max-time 2 -o /dev/null http://127.0.0.1:{port}/health || exit 2\n",
            name = mock.name,
            port = mock.port
        ),
    );
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    svc["check"]["args"] = json!([script.display().to_string()]);
    if let Some(id) = id {
        svc["id"] = json!(id);
    }
    svc
}

/// A service definition in the agent API's form, with a TTL check the test moves
/// (`Standin::ttl`), passing from the start.
fn ttl_service(id: &str, mock: &MockNode, extra: serde_json::Value) -> serde_json::Value {
    let mut def = json!({
        "Name": "deepseek-api", "ID": id, "Tags": ["v1.2"], "Port": mock.port,
        "Check": {"TTL": "300s", "Status": "passing"}
    });
    for (k, v) in extra.as_object().unwrap() {
        def[k] = v.clone();
    }
    def
}

/// Pool "llm" fed by the stand-in, with `consul` fields over the defaults.
fn consul_pool(c: &Standin, consul: serde_json::Value) -> serde_json::Value {
    let mut section = json!({
        "address": c.addr(), "service": "deepseek-api", "tags": ["v1.2"], "wait_s": 5,
        "min_interval_ms": 200
    });
    for (k, v) in consul.as_object().unwrap() {
        section[k] = v.clone();
    }
    json!({ "pools": { "llm": {
        "algorithm": "p2c_ewma",
        "slow_start_ms": 1000,
        "no_node_status": 503,
        "discovery": { "consul": section }
    } } })
}

/// `GET /rsbalancer/status` (JSON).
fn status(g: &Gateway) -> serde_json::Value {
    let r = get(g.port, "/rsbalancer/status");
    assert_eq!(r.status, 200, "status: {}", r.text());
    r.json()
}

/// The node ids of pool "llm", sorted.
fn node_ids(g: &Gateway) -> Vec<String> {
    let st = status(g);
    let mut ids: Vec<String> = st["pools"]["llm"]["nodes"]
        .as_array()
        .map(|a| a.iter().map(|n| n["id"].as_str().unwrap().to_string()).collect())
        .unwrap_or_default();
    ids.sort();
    ids
}

/// Waits until pool "llm" holds exactly `want` (any order).
fn wait_nodes(g: &Gateway, want: &[&str], timeout_s: u64) {
    let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    want.sort();
    let mut got = Vec::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(timeout_s) {
        got = node_ids(g);
        if got == want {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "pool llm holds {got:?}, not {want:?}, after {timeout_s} s; status: {}\n{}",
        status(g)["pools"]["llm"]["discovery"],
        g.nginx.diagnostics()
    );
}

fn node_of<'a>(st: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    st["pools"]["llm"]["nodes"]
        .as_array()
        .and_then(|a| a.iter().find(|n| n["id"] == id))
        .unwrap_or_else(|| panic!("no node {id} in {st}"))
}

/// Chat requests from `threads` clients until `stop`: (status, X-Node) of each.
fn load(g: &Gateway, threads: usize, stop: &std::sync::atomic::AtomicBool) -> Vec<(u16, String)> {
    use std::sync::atomic::Ordering;
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut out = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let r = g.chat();
                        out.push((r.status, r.header("X-Node").unwrap_or_default().to_string()));
                    }
                    out
                })
            })
            .collect();
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    })
}

fn ok_share(results: &[(u16, String)]) -> (usize, usize) {
    (results.iter().filter(|(s, _)| *s == 200).count(), results.len())
}

/// The seed's service definition works as given (its check a script run every 10 s
/// with a 2 s timeout, no address: the agent's node address is used): registered,
/// the instance joins an empty pool and serves; its check failing takes it out;
/// passing again brings it back; deregistered, it leaves.
#[test]
fn consul_seed_definition_joins_leaves_on_a_failing_check_and_on_deregister() {
    let dir = TestDir::new("consul-seed");
    let mocks_def = [MockNode::new("a", 20), MockNode::new("b", 20)];
    let _mocks = start_mocks(&dir, &mocks_def);
    // The Consul stand-in (not Consul): script checks on, as an agent needs
    // `enable_local_script_checks` for the seed's `args` check.
    let consul = Standin::start(StandinOptions::default());
    let g = start_gateway(&dir, &consul_pool(&consul, json!({})));
    assert_eq!(node_ids(&g), Vec::<String>::new(), "the pool starts empty");
    assert_eq!(g.chat().status, 503, "an empty pool answers its no-node status");

    consul.register(&seed_service(&dir, &mocks_def[0], None));
    consul.register(&seed_service(&dir, &mocks_def[1], Some("deepseek-api-b")));
    let (a, b) = ("deepseek-api@standin-node", "deepseek-api-b@standin-node");
    wait_nodes(&g, &[a, b], 20);
    let st = status(&g);
    assert_eq!(
        node_of(&st, a)["addr"],
        json!(mocks_def[0].addr()),
        "the node's address and the port"
    );
    let served = run_parallel(40, 4, |_| g.chat());
    assert!(
        served.iter().all(|r| r.status == 200),
        "{:?}",
        served.iter().map(|r| r.status).collect::<Vec<_>>()
    );

    // b's /health fails: its script check goes critical within an interval (10 s).
    mock_set(&mocks_def[1], "health_fail=503");
    wait_nodes(&g, &[a], 30);
    assert_eq!(
        consul.check_status("service:deepseek-api-b").as_deref(),
        Some("critical")
    );
    let after = run_parallel(20, 4, |_| g.chat());
    assert!(after
        .iter()
        .all(|r| r.status == 200 && r.header("X-Node") == Some("a")));
    mock_set(&mocks_def[1], "health_fail=");
    wait_nodes(&g, &[a, b], 30);

    consul.deregister("deepseek-api-b");
    wait_nodes(&g, &[a], 20);
    let d = &status(&g)["pools"]["llm"]["discovery"];
    assert_eq!(
        (d["source"].as_str(), d["up"].as_bool()),
        (Some("consul"), Some(true)),
        "{d}"
    );
}

/// Nodes come and go while clients send requests, and none fails: a new instance
/// joins (and is used), one whose check fails leaves, a deregistered one leaves with
/// its requests in flight finished, one comes back. What the balancer learned of the
/// nodes that stay survives every change: b, cooling down after a quota 429 with
/// Retry-After, is still cooling after two reconfigurations.
#[test]
fn consul_nodes_come_and_go_under_load_without_a_failed_request() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = TestDir::new("consul-load");
    let m = [
        MockNode::new("a", 60),
        MockNode::new("b", 60),
        MockNode::new("c", 60),
        MockNode::new("d", 60),
    ];
    let _mocks = start_mocks(&dir, &m);
    let consul = Standin::start(StandinOptions::default()); // the Consul stand-in
    for (id, mock) in [("a", &m[0]), ("b", &m[1]), ("c", &m[2])] {
        consul.register(&ttl_service(id, mock, json!({})));
    }
    let g = start_gateway(&dir, &consul_pool(&consul, json!({})));
    let id = |n: &str| format!("{n}@standin-node");
    wait_nodes(&g, &[&id("a"), &id("b"), &id("c")], 20);

    // b answers one 429 with a long Retry-After: it cools down (learned state).
    mock_set(&m[1], "fail=429&retry_after=120");
    wait_until(Duration::from_secs(10), "b cooling down", || {
        g.chat();
        node_of(&status(&g), &id("b"))["state"] == "cooling"
    });
    mock_set(&m[1], "fail=");
    let requests_a = node_of(&status(&g), &id("a"))["requests"].as_u64().unwrap();

    let stop = AtomicBool::new(false);
    let results = std::thread::scope(|s| {
        let h = s.spawn(|| load(&g, 6, &stop));
        std::thread::sleep(Duration::from_millis(500));
        consul.register(&ttl_service("d", &m[3], json!({})));
        wait_nodes(&g, &[&id("a"), &id("b"), &id("c"), &id("d")], 20);
        wait_until(Duration::from_secs(20), "d serving", || {
            node_of(&status(&g), &id("d"))["requests"].as_u64().unwrap_or(0) > 0
        });
        consul.ttl("fail", "service:c");
        wait_nodes(&g, &[&id("a"), &id("b"), &id("d")], 20);
        // Learned state kept across both changes.
        let st = status(&g);
        assert_eq!(
            node_of(&st, &id("b"))["state"],
            "cooling",
            "b's cooldown was lost: {st}"
        );
        assert!(node_of(&st, &id("a"))["requests"].as_u64().unwrap() >= requests_a);
        consul.deregister("a");
        wait_nodes(&g, &[&id("b"), &id("d")], 20);
        consul.ttl("pass", "service:c");
        wait_nodes(&g, &[&id("b"), &id("c"), &id("d")], 20);
        std::thread::sleep(Duration::from_millis(1500));
        stop.store(true, Ordering::Relaxed);
        h.join().unwrap()
    });
    let (ok, all) = ok_share(&results);
    let bad: Vec<_> = results.iter().filter(|(s, _)| *s != 200).take(10).collect();
    assert_eq!(ok, all, "{} of {all} requests failed, e.g. {bad:?}", all - ok);
    assert!(all > 50, "only {all} requests under load");
    assert!(
        results.iter().any(|(_, n)| n == "d"),
        "the new node d never served"
    );
    quiesce(&g);
}

/// The agent goes away: the pool keeps its last known nodes, requests go on, and the
/// failure shows in the status and /metrics. The agent comes back empty (restarted,
/// its index starting over): the loop starts again from index 0 and the pool follows
/// what the agent knows now.
#[test]
fn consul_agent_down_keeps_the_last_known_nodes_then_follows_the_restarted_agent() {
    let dir = TestDir::new("consul-down");
    let m = [MockNode::new("a", 20), MockNode::new("b", 20)];
    let _mocks = start_mocks(&dir, &m);
    let mut consul = Standin::start(StandinOptions {
        start_index: 500,
        ..StandinOptions::default()
    }); // the Consul stand-in
    consul.register(&ttl_service("a", &m[0], json!({})));
    consul.register(&ttl_service("b", &m[1], json!({})));
    let g = start_gateway(&dir, &consul_pool(&consul, json!({})));
    let (a, b) = ("a@standin-node", "b@standin-node");
    wait_nodes(&g, &[a, b], 20);

    consul.stop();
    wait_until(Duration::from_secs(20), "the failure in the status", || {
        status(&g)["pools"]["llm"]["discovery"]["up"] == json!(false)
    });
    let d = status(&g)["pools"]["llm"]["discovery"].clone();
    assert!(
        d["last_error"].as_str().unwrap_or_default().contains("agent"),
        "{d}"
    );
    let metrics = get(g.port, "/metrics").text();
    assert!(
        metrics.contains(r#"rsbalancer_discovery_up{pool="llm",source="consul"} 0"#),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("discovery"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(node_ids(&g), [a, b], "the last known nodes are kept");
    let served = run_parallel(20, 4, |_| g.chat());
    assert!(served.iter().all(|r| r.status == 200));
    // One line in the error log (written at the lease holder's next tick).
    wait_until(Duration::from_secs(10), "the failure in the error log", || {
        g.nginx
            .error_log()
            .contains("discovery: pool llm (consul) failed")
    });

    // Back, empty, its index at 500 again (below what the gateway saw).
    consul.restart();
    consul.register(&ttl_service("b", &m[1], json!({})));
    wait_nodes(&g, &[b], 20);
    assert!(consul.index() < 510);
    let metrics = get(g.port, "/metrics").text();
    assert!(metrics.contains(r#"rsbalancer_discovery_up{pool="llm",source="consul"} 1"#));
    wait_until(Duration::from_secs(10), "the recovery in the error log", || {
        g.nginx
            .error_log()
            .contains("discovery: pool llm (consul): answers again")
    });
    assert_eq!(
        g.nginx
            .error_log()
            .matches("discovery: pool llm (consul) failed")
            .count(),
        1,
        "one line per outage, not one per failed query"
    );
}

/// The agent's index goes backwards without an outage (a snapshot restored): the
/// next answer carries a lower `X-Consul-Index`, and the gateway starts its loop
/// again from index 0 (a query without `index`) instead of waiting for the old
/// number; changes then arrive again.
#[test]
fn consul_index_going_backwards_restarts_the_loop() {
    let dir = TestDir::new("consul-index");
    let m = [
        MockNode::new("a", 20),
        MockNode::new("b", 20),
        MockNode::new("c", 20),
    ];
    let _mocks = start_mocks(&dir, &m);
    let consul = Standin::start(StandinOptions {
        start_index: 900,
        ..StandinOptions::default()
    }); // the Consul stand-in
    consul.register(&ttl_service("a", &m[0], json!({})));
    let g = start_gateway(&dir, &consul_pool(&consul, json!({"wait_s": 1})));
    wait_nodes(&g, &["a@standin-node"], 20);
    let fresh = |c: &Standin| c.queries().iter().filter(|q| !q.contains("index=")).count();
    let before = fresh(&consul);
    wait_until(Duration::from_secs(10), "a blocking query", || {
        consul.last_query().contains("index=90")
    });
    consul.set_index(5);
    consul.register(&ttl_service("b", &m[1], json!({})));
    wait_nodes(&g, &["a@standin-node", "b@standin-node"], 20);
    wait_until(Duration::from_secs(10), "a query from index 0", || {
        fresh(&consul) > before
    });
    wait_until(
        Duration::from_secs(10),
        "a blocking query at the new index",
        || consul.last_query().contains("index=6&"),
    );
    consul.register(&ttl_service("c", &m[2], json!({})));
    wait_nodes(&g, &["a@standin-node", "b@standin-node", "c@standin-node"], 20);
}

/// Weights from the service's meta, a `weight=N` tag, or Consul's Weights.Passing;
/// the tag filter keeps other versions out; the ACL token, read from the worker's
/// environment (`env` in nginx.conf), goes with every query.
#[test]
fn consul_weights_tags_and_acl_token() {
    let dir = TestDir::new("consul-weights");
    let m = [
        MockNode::new("a", 20),
        MockNode::new("b", 20),
        MockNode::new("c", 20),
        MockNode::new("d", 20),
    ];
    let _mocks = start_mocks(&dir, &m);
    let consul = Standin::start(StandinOptions {
        token: Some("consul-acl-token-1".into()),
        ..StandinOptions::default()
    }); // the Consul stand-in, with ACLs on
    consul.register(&ttl_service("a", &m[0], json!({"Meta": {"weight": "30"}})));
    consul.register(&ttl_service("b", &m[1], json!({"Tags": ["v1.2", "weight=5"]})));
    consul.register(&ttl_service(
        "c",
        &m[2],
        json!({"Weights": {"Passing": 7, "Warning": 1}}),
    ));
    consul.register(&ttl_service(
        "d",
        &m[3],
        json!({"Tags": ["v1.1"], "Meta": {"weight": "50"}}),
    ));
    std::env::set_var("RSB_TEST_CONSUL_TOKEN", "consul-acl-token-1");
    let g = start_gateway_with(
        &dir,
        &consul_pool(
            &consul,
            json!({"token_env": "RSB_TEST_CONSUL_TOKEN", "datacenter": "dc1"}),
        ),
        |conf| format!("env RSB_TEST_CONSUL_TOKEN;\n{conf}"),
    );
    wait_nodes(&g, &["a@standin-node", "b@standin-node", "c@standin-node"], 20);
    let st = status(&g);
    let w = |id: &str| node_of(&st, id)["weight"].as_u64().unwrap();
    assert_eq!(
        (w("a@standin-node"), w("b@standin-node"), w("c@standin-node")),
        (30, 5, 7)
    );
    assert_eq!(consul.last_token().as_deref(), Some("consul-acl-token-1"));
    let q = consul.last_query();
    assert!(
        q.contains("passing") && q.contains("tag=v1.2") && q.contains("dc=dc1"),
        "{q}"
    );
    // Shares follow the weights (p2c draws by weight): a (30) takes more than b (5).
    let answered: Vec<String> = run_parallel(200, 4, |_| g.chat())
        .iter()
        .map(|r| r.header("X-Node").unwrap_or("?").to_string())
        .collect();
    let tally = count(answered.iter().map(String::as_str));
    assert!(!tally.contains_key("d"), "d (tag v1.1) served: {tally:?}");
    assert!(tally.get("a") > tally.get("b"), "{tally:?}");
}

/// A wrong or missing token: the agent refuses (403), the failure shows in the
/// status, and the pool stays as it was (empty here: no-node status).
#[test]
fn consul_refused_token_is_a_visible_failure() {
    let dir = TestDir::new("consul-acl");
    let m = [MockNode::new("a", 20)];
    let _mocks = start_mocks(&dir, &m);
    let consul = Standin::start(StandinOptions {
        token: Some("right".into()),
        ..StandinOptions::default()
    }); // the Consul stand-in, with ACLs on
    consul.register(&ttl_service("a", &m[0], json!({})));
    std::env::set_var("RSB_TEST_CONSUL_WRONG", "wrong");
    let g = start_gateway_with(
        &dir,
        &consul_pool(&consul, json!({"token_env": "RSB_TEST_CONSUL_WRONG"})),
        |conf| format!("env RSB_TEST_CONSUL_WRONG;\n{conf}"),
    );
    wait_until(Duration::from_secs(20), "the 403 in the status", || {
        status(&g)["pools"]["llm"]["discovery"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("403"))
    });
    assert_eq!(node_ids(&g), Vec::<String>::new());
    assert_eq!(g.chat().status, 503);
}

/// The client alone against the stand-in (no nginx): a blocking query holds until a
/// change, a stop ends it within the poll interval, a large answer comes chunked,
/// and an index that went backwards restarts the loop.
#[test]
fn consul_client_blocks_stops_and_resets_its_index() {
    use rsbalancer::config::consul::ConsulDiscovery;
    use rsbalancer::discovery::consul::{next_index, parse, query};
    use std::sync::atomic::{AtomicBool, Ordering};
    let consul = Standin::start(StandinOptions::default()); // the Consul stand-in
    let cfg = ConsulDiscovery {
        address: consul.addr(),
        service: "svc".into(),
        wait_s: 30,
        ..ConsulDiscovery::default()
    };
    for i in 0..40 {
        consul.register(&json!({"Name": "svc", "ID": format!("svc-{i}"), "Port": 1000 + i,
                                 "Check": {"TTL": "300s", "Status": "passing"}}));
    }
    let never = AtomicBool::new(false);
    let r = query(&cfg, None, 0, &never).unwrap();
    assert!(r.body.len() > 2048, "a chunked answer");
    assert_eq!(parse(&r.body, &cfg).unwrap().nodes.len(), 40);
    let idx = r.index;
    // Held until a change.
    let (r2, elapsed) = std::thread::scope(|s| {
        let h = s.spawn(|| {
            let t = Instant::now();
            (query(&cfg, None, idx, &never), t.elapsed())
        });
        std::thread::sleep(Duration::from_millis(400));
        consul.deregister("svc-0");
        h.join().unwrap()
    });
    let r2 = r2.unwrap();
    assert!(
        elapsed >= Duration::from_millis(300),
        "answered before the change"
    );
    assert_eq!(parse(&r2.body, &cfg).unwrap().nodes.len(), 39);
    // A stop ends a held query.
    let stop = AtomicBool::new(false);
    let t = Instant::now();
    let e = std::thread::scope(|s| {
        let h = s.spawn(|| query(&cfg, None, r2.index, &stop));
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
        h.join().unwrap()
    });
    assert_eq!(e.unwrap_err(), "stopped");
    assert!(t.elapsed() < Duration::from_secs(5));
    // The index goes backwards: reset to 0, and the next query answers at once.
    consul.set_index(3);
    let cfg_short = ConsulDiscovery {
        wait_s: 1,
        ..cfg.clone()
    };
    let r3 = query(&cfg_short, None, r2.index, &never).unwrap();
    assert_eq!(r3.index, 3);
    assert_eq!(next_index(r2.index, r3.index), 0);
    let t = Instant::now();
    let r4 = query(&cfg, None, 0, &never).unwrap();
    assert!(t.elapsed() < Duration::from_secs(2) && r4.index == 3);
}
