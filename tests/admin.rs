//! Run-time changes (`src/admin.rs`): adding and removing nodes as all-or-nothing
//! reconfigurations, the refusals (and that a refusal changes nothing), state that
//! survives a change (weights, drains, counters), what a reload resets, and the extra
//! fields of `status()`.

use std::collections::HashSet;

use rsbalancer::admin::AdminError;
use rsbalancer::balancer::Balancer;
use rsbalancer::config::{Config, NodeConfig};
use rsbalancer::status;
use serde_json::{json, Value};

/// One pool "p" of `nodes` (id, port, weight, backup) in a region of `max_nodes` slots,
/// slow start off (states do not move with the clock).
fn config(max_nodes: u32, nodes: &[(&str, u16, u32, bool)]) -> Config {
    let nodes: Vec<Value> = nodes
        .iter()
        .map(|(id, port, w, b)| json!({ "id": id, "addr": format!("127.0.0.1:{port}"), "weight": w, "backup": b }))
        .collect();
    Config::from_value(json!({
        "shm": { "max_nodes": max_nodes, "max_pools": 4, "max_workers": 4, "config_bytes": 65536 },
        "pools": { "p": { "algorithm": "weighted_random", "slow_start_ms": 0, "nodes": nodes } }
    }))
    .expect("valid config")
}

fn three() -> Config {
    config(
        16,
        &[
            ("a", 9001, 10, false),
            ("b", 9002, 20, false),
            ("c", 9003, 5, true),
        ],
    )
}

fn node(id: &str, addr: &str, weight: u32) -> NodeConfig {
    NodeConfig {
        id: id.into(),
        addr: addr.into(),
        weight,
        ..Default::default()
    }
}

fn ids(b: &Balancer) -> Vec<String> {
    let t = b.topology().unwrap();
    t.pool("p").unwrap().nodes.iter().map(|n| n.id.clone()).collect()
}

/// Everything a refused change must leave as it was: generation, topology text
/// (ids, slots, addresses) and the status document.
fn snapshot(b: &Balancer) -> (u64, String, Value) {
    let t = b.topology().unwrap();
    let mut st = status::of(b).unwrap();
    st["generation"] = Value::Null;
    (b.generation(), serde_json::to_string(&*t).unwrap(), st)
}

/// Distinct nodes picked in `n` picks of pool "p" (each reported at once).
fn picked(b: &Balancer, n: usize) -> HashSet<u32> {
    let pool = b.pool_index("p").unwrap();
    (0..n)
        .map(|_| {
            let s = b.pick(pool, b"", &[]).unwrap();
            b.report(s, 200, 1000, 0).unwrap();
            s
        })
        .collect()
}

#[test]
fn add_node_is_picked_and_keeps_everything_else() {
    let b = Balancer::create(&three()).unwrap();
    let a = b.node_index("p", "a").unwrap();
    b.set_weight(a, 77).unwrap();
    b.set_draining(b.node_index("p", "b").unwrap(), true).unwrap();
    let before = b.node_stats(a).unwrap();
    let picks_a = before.picks;

    let d = rsbalancer::admin::add_node(&b, "p", node("d", "127.0.0.1:9004", 40)).unwrap();
    assert_eq!(ids(&b), ["a", "b", "c", "d"]);
    assert_eq!(b.node_index("p", "d").unwrap(), d);
    assert_eq!(b.node_stats(d).unwrap().weight, 40);
    // Other nodes keep their slot, live weight, counters and drain.
    assert_eq!(b.node_index("p", "a").unwrap(), a);
    let after = b.node_stats(a).unwrap();
    assert_eq!((after.weight, after.picks), (77, picks_a));
    let st = status::of(&b).unwrap();
    let nodes = st["pools"]["p"]["nodes"].as_array().unwrap();
    assert_eq!(nodes[1]["draining"], json!(true), "{st}");
    assert_eq!(nodes[1]["state"], json!("draining"), "{st}");
    assert_eq!(nodes[3]["addr"], json!("127.0.0.1:9004"));
    // The new node takes picks; the drained one none.
    let got = picked(&b, 400);
    assert!(got.contains(&d), "new node never picked");
    assert!(
        !got.contains(&b.node_index("p", "b").unwrap()),
        "drained node picked"
    );
}

#[test]
fn add_node_refusals_change_nothing() {
    let b = Balancer::create(&three()).unwrap();
    let before = snapshot(&b);
    let cases: Vec<(&str, NodeConfig, &str, &str)> = vec![
        (
            "p",
            node("a", "127.0.0.1:9009", 1),
            "conflict",
            "node \"a\" already exists in pool \"p\"",
        ),
        (
            "nope",
            node("d", "127.0.0.1:9009", 1),
            "not_found",
            "unknown pool \"nope\"",
        ),
        (
            "p",
            node("d", "127.0.0.1:9009", 0),
            "invalid",
            "weight: 0 is out of range 1..=10000",
        ),
        (
            "p",
            node("d", "127.0.0.1:9009", 10001),
            "invalid",
            "weight: 10001 is out of range",
        ),
        (
            "p",
            node("bad id", "127.0.0.1:9009", 1),
            "invalid",
            "id: invalid id \"bad id\"",
        ),
        ("p", node("d", "127.0.0.1", 1), "invalid", "addr: "),
        ("p", node("d", "no-such-host.invalid:80", 1), "invalid", "addr: "),
    ];
    for (pool, n, kind, msg) in cases {
        let what = format!("add {n:?} to {pool}");
        let e = rsbalancer::admin::add_node(&b, pool, n).expect_err(&what);
        assert_eq!(e.kind(), kind, "{what}: {e}");
        assert!(e.to_string().starts_with(msg), "{what}: {e}");
        assert_eq!(snapshot(&b), before, "{what} changed something");
    }
    // The address error names the value.
    let e = rsbalancer::admin::add_node(&b, "p", node("d", "no-such-host.invalid:80", 1)).unwrap_err();
    assert!(e.to_string().contains("no-such-host.invalid"), "{e}");
}

#[test]
fn add_node_refused_when_capacity_is_exhausted() {
    let b = Balancer::create(&config(2, &[("a", 9001, 1, false), ("b", 9002, 1, false)])).unwrap();
    let before = snapshot(&b);
    let e = rsbalancer::admin::add_node(&b, "p", node("c", "127.0.0.1:9003", 1)).unwrap_err();
    assert!(matches!(e, AdminError::Conflict(_)), "{e:?}");
    assert!(e.to_string().contains("shm.max_nodes"), "{e}");
    assert_eq!(snapshot(&b), before);
    // A removed node's slot is kept for a grace period (a late report must not land on
    // a stranger): the region stays full until it ends.
    rsbalancer::admin::remove_node(&b, "p", "b").unwrap();
    let e = rsbalancer::admin::add_node(&b, "p", node("c", "127.0.0.1:9003", 1)).unwrap_err();
    assert!(matches!(e, AdminError::Conflict(_)), "{e:?}");
    assert!(e.to_string().contains("no free node slot"), "{e}");
    assert_eq!(ids(&b), ["a"]);
}

#[test]
fn remove_node_stops_picks_and_lets_in_flight_finish() {
    let b = Balancer::create(&three()).unwrap();
    let pool = b.pool_index("p").unwrap();
    let a = b.node_index("p", "a").unwrap();
    let bb = b.node_index("p", "b").unwrap();
    // A try in flight on "a" when it is removed.
    let inflight = loop {
        let s = b.pick(pool, b"", &[]).unwrap();
        if s == a {
            break s;
        }
        b.report(s, 200, 1000, 0).unwrap();
    };
    b.set_weight(bb, 99).unwrap();
    rsbalancer::admin::remove_node(&b, "p", "a").unwrap();
    assert_eq!(ids(&b), ["b", "c"]);
    assert_eq!(b.node_stats(bb).unwrap().weight, 99, "live weight lost");
    assert!(b.node_index("p", "a").is_err());
    let got = picked(&b, 300);
    assert!(!got.contains(&a), "removed node picked");
    // Its try in flight is still reported, and the count comes back to zero.
    b.report(inflight, 200, 1000, 0).unwrap();
}

#[test]
fn remove_node_refusals_change_nothing() {
    let b = Balancer::create(&config(16, &[("a", 9001, 1, false), ("c", 9003, 1, true)])).unwrap();
    let before = snapshot(&b);
    let e = rsbalancer::admin::remove_node(&b, "p", "a").unwrap_err();
    assert_eq!(e.kind(), "conflict", "{e}");
    assert!(e.to_string().contains("without a primary"), "{e}");
    let e = rsbalancer::admin::remove_node(&b, "p", "zz").unwrap_err();
    assert_eq!(
        (e.kind(), e.to_string().as_str()),
        ("not_found", "unknown node \"zz\" in pool \"p\"")
    );
    let e = rsbalancer::admin::remove_node(&b, "q", "a").unwrap_err();
    assert_eq!(e.kind(), "not_found", "{e}");
    assert_eq!(snapshot(&b), before);
    // The backup may go; then the last primary may not.
    rsbalancer::admin::remove_node(&b, "p", "c").unwrap();
    assert_eq!(
        rsbalancer::admin::remove_node(&b, "p", "a").unwrap_err().kind(),
        "conflict"
    );
}

#[test]
fn reload_resets_run_time_changes() {
    let cfg = three();
    let b = Balancer::create(&cfg).unwrap();
    let a = b.node_index("p", "a").unwrap();
    b.set_weight(a, 500).unwrap();
    b.set_draining(a, true).unwrap();
    rsbalancer::admin::add_node(&b, "p", node("d", "127.0.0.1:9004", 3)).unwrap();
    rsbalancer::admin::remove_node(&b, "p", "b").unwrap();
    assert_eq!(ids(&b), ["a", "c", "d"]);
    // nginx -s reload: the file's config again.
    b.configure(&cfg).unwrap();
    assert_eq!(ids(&b), ["a", "b", "c"]);
    assert_eq!(b.node_index("p", "a").unwrap(), a, "a kept its slot");
    let s = b.node_stats(a).unwrap();
    assert_eq!((s.weight, s.draining), (10, false));
}

#[test]
fn concurrent_adds_from_two_handles_both_land() {
    let b1 = std::sync::Arc::new(Balancer::create(&config(64, &[("a", 9001, 1, false)])).unwrap());
    let b2 = std::sync::Arc::new(Balancer::attach(b1.region().clone()));
    std::thread::scope(|s| {
        for (k, b) in [&b1, &b2].into_iter().enumerate() {
            s.spawn(move || {
                for i in 0..10 {
                    let id = format!("n{k}-{i}");
                    rsbalancer::admin::add_node(
                        b,
                        "p",
                        node(&id, &format!("127.0.0.1:{}", 10000 + k * 100 + i), 1),
                    )
                    .unwrap();
                }
            });
        }
    });
    // Each add rebuilt the topology under the lock: none lost another's node.
    assert_eq!(ids(&b1).len(), 21);
    assert_eq!(ids(&b2).len(), 21);
}

#[test]
fn status_shows_admin_fields() {
    // `three()` plus a canary pool "q" for "p" (a share needs a canary to go to).
    let mut v = serde_json::to_value(three()).unwrap();
    v["pools"]["p"]["canary"] = json!({ "pool": "q" });
    v["pools"]["q"] = json!({ "nodes": [{ "id": "x", "addr": "127.0.0.1:9009" }] });
    let b = Balancer::create(&Config::from_value(v).expect("valid config")).unwrap();
    let pool = b.pool_index("p").unwrap();
    b.set_canary_share(pool, 2500).unwrap();
    rsbalancer::emergency::set_emergency_mode(&b, pool, rsbalancer::balancer::EmergencyMode::On).unwrap();
    b.set_draining(b.node_index("p", "c").unwrap(), true).unwrap();
    let st = status::of(&b).unwrap();
    let p = &st["pools"]["p"];
    assert_eq!(p["canary_share"], json!(0.25), "{st}");
    assert_eq!(p["emergency"], json!({ "mode": "on", "active": true }), "{st}");
    let nodes = p["nodes"].as_array().unwrap();
    // Equal success, no latency factor without samples: effective = base weight.
    let eff: Vec<f64> = nodes
        .iter()
        .map(|n| n["effective_weight"].as_f64().unwrap())
        .collect();
    assert_eq!(eff, [10.0, 20.0, 5.0], "{st}");
    assert_eq!(nodes[2]["draining"], json!(true));
    assert_eq!(nodes[0]["draining"], json!(false));
    for n in nodes {
        for f in [
            "weight",
            "inflight",
            "limit",
            "ewma_us",
            "state",
            "unavailable_ms",
            "backup",
        ] {
            assert!(!n[f].is_null(), "{f} missing in {n}");
        }
    }
    rsbalancer::emergency::set_emergency_mode(&b, pool, rsbalancer::balancer::EmergencyMode::Off).unwrap();
    assert_eq!(
        status::of(&b).unwrap()["pools"]["p"]["emergency"]["mode"],
        json!("off")
    );
}

/// A pool whose config names other pools (its canary, its emergency backup pool)
/// takes added and removed nodes like any other, and keeps those blocks.
#[test]
fn add_and_remove_on_a_pool_naming_other_pools() {
    let mut v = serde_json::to_value(three()).unwrap();
    v["pools"]["p"]["canary"] = json!({ "pool": "q" });
    v["pools"]["p"]["emergency"] = json!({ "backup_pool": "r" });
    v["pools"]["q"] = json!({ "nodes": [{ "id": "x", "addr": "127.0.0.1:9009" }] });
    v["pools"]["r"] = json!({ "nodes": [{ "id": "y", "addr": "127.0.0.1:9010" }] });
    let b = Balancer::create(&Config::from_value(v).expect("valid config")).unwrap();
    rsbalancer::admin::add_node(&b, "p", node("d", "127.0.0.1:9004", 3)).unwrap();
    assert!(matches!(
        rsbalancer::admin::add_node(&b, "p", node("d", "127.0.0.1:9005", 3)),
        Err(AdminError::Conflict(_))
    ));
    rsbalancer::admin::remove_node(&b, "p", "a").unwrap();
    let topo = b.topology().unwrap();
    let p = topo.pool("p").unwrap();
    assert_eq!(p.policy.canary.as_ref().map(|c| c.pool.as_str()), Some("q"));
    assert_eq!(
        p.policy.emergency.as_ref().and_then(|e| e.backup_pool.as_deref()),
        Some("r")
    );
}
