//! Service discovery's framework (`src/discovery`) on a real region, without nginx
//! or DNS: an empty discovery pool, answers applied as one reconfiguration (nodes
//! that stay keep their slot and what was learned, new ones join, removed ones
//! leave), `on_empty`, failures kept with their status, and a reload that keeps the
//! discovered nodes.

use rsbalancer::balancer::{Balancer, Error};
use rsbalancer::config::{Config, NodeConfig};
use rsbalancer::discovery::{self, found};
use rsbalancer::{node, status};
use serde_json::json;

fn config(on_empty: &str) -> Config {
    Config::from_value(json!({
        "shm": { "max_nodes": 16, "max_pools": 4, "max_workers": 4, "config_bytes": 65536 },
        "pools": { "p": {
            "algorithm": "weighted_random", "slow_start_ms": 0, "no_node_status": 503,
            "discovery": { "dns": { "name": "llm.test", "port": 8000 }, "on_empty": on_empty }
        } }
    }))
    .expect("valid config")
}

fn n(id: &str, addr: &str, weight: u32) -> NodeConfig {
    found(id.into(), addr.parse().unwrap(), weight, false)
}

fn ids(b: &Balancer) -> Vec<String> {
    let t = b.topology().unwrap();
    t.pool("p").unwrap().nodes.iter().map(|n| n.id.clone()).collect()
}

#[test]
fn an_empty_discovery_pool_answers_no_node_then_fills_in() {
    let b = Balancer::create(&config("keep")).unwrap();
    assert!(ids(&b).is_empty());
    let pool = b.pool_index("p").unwrap();
    assert!(matches!(b.pick(pool, b"", &[]), Err(Error::NoNode { .. })));
    let a = discovery::apply(
        &b,
        "p",
        vec![n("a", "127.0.0.1:8001", 3), n("b", "127.0.0.1:8002", 1)],
        "dns",
    )
    .unwrap();
    assert_eq!(a.added, ["a", "b"]);
    assert_eq!(ids(&b), ["a", "b"]);
    let slot = b.pick(pool, b"", &[]).unwrap();
    b.report(slot, 200, 1000, 0).unwrap();
    let st = status::of(&b).unwrap();
    assert_eq!(st["pools"]["p"]["discovery"]["nodes"], 2);
    assert_eq!(st["pools"]["p"]["discovery"]["up"], true);
    assert_eq!(st["pools"]["p"]["discovery"]["source"], "dns");
}

/// a (weight 7) and c: the second answer of `nodes_that_stay_keep_their_slot_and_state`.
fn a_and_c() -> Vec<NodeConfig> {
    vec![n("a", "127.0.0.1:8001", 7), n("c", "127.0.0.1:8003", 1)]
}

#[test]
fn nodes_that_stay_keep_their_slot_and_state() {
    let b = Balancer::create(&config("keep")).unwrap();
    discovery::apply(
        &b,
        "p",
        vec![n("a", "127.0.0.1:8001", 1), n("b", "127.0.0.1:8002", 1)],
        "dns",
    )
    .unwrap();
    let a = b.node_index("p", "a").unwrap();
    let bslot = b.node_index("p", "b").unwrap();
    for _ in 0..5 {
        // A pick raises the in-flight count; the report of each is what we keep.
        b.report(a, 200, 2_000, 0).ok();
    }
    let before = node::stats(b.region(), a);
    assert!(before.requests > 0);
    let gen = b.generation();
    // b leaves, c joins, a stays with another weight.
    let r = discovery::apply(&b, "p", a_and_c(), "dns").unwrap();
    assert_eq!(
        (r.added.clone(), r.removed.clone(), r.updated.clone()),
        (vec!["c".into()], vec!["b".into()], vec!["a".into()])
    );
    assert_eq!(b.generation(), gen + 1, "one reconfiguration");
    assert_eq!(b.node_index("p", "a").unwrap(), a, "same slot");
    let after = node::stats(b.region(), a);
    assert_eq!(after.requests, before.requests);
    assert_eq!(after.weight, 7);
    assert!(b.node_index("p", "b").is_err());
    assert_ne!(
        b.node_index("p", "c").unwrap(),
        bslot,
        "a removed slot is not reused at once"
    );
    // The same answer again changes nothing.
    let g = b.generation();
    let r = discovery::apply(&b, "p", a_and_c(), "dns").unwrap();
    assert!(!r.changed());
    assert_eq!(b.generation(), g);
}

#[test]
fn an_empty_answer_keeps_the_pool_unless_told_to_empty_it() {
    let b = Balancer::create(&config("keep")).unwrap();
    discovery::apply(&b, "p", vec![n("a", "127.0.0.1:8001", 1)], "dns").unwrap();
    let r = discovery::apply(&b, "p", Vec::new(), "dns").unwrap();
    assert!(r.kept_on_empty);
    assert_eq!(ids(&b), ["a"]);

    let b = Balancer::create(&config("empty")).unwrap();
    discovery::apply(&b, "p", vec![n("a", "127.0.0.1:8001", 1)], "dns").unwrap();
    let r = discovery::apply(&b, "p", Vec::new(), "dns").unwrap();
    assert_eq!(r.removed, ["a"]);
    assert!(ids(&b).is_empty());
    let pool = b.pool_index("p").unwrap();
    assert!(matches!(b.pick(pool, b"", &[]), Err(Error::NoNode { .. })));
}

#[test]
fn a_failure_keeps_the_nodes_and_is_logged_once() {
    let b = Balancer::create(&config("keep")).unwrap();
    discovery::apply(&b, "p", vec![n("a", "127.0.0.1:8001", 1)], "dns").unwrap();
    let first = discovery::failed(&b, "p", "dns", "timed out talking to 127.0.0.1:1");
    assert!(first.unwrap().contains("keeps its 1 last known nodes"));
    assert_eq!(
        discovery::failed(&b, "p", "dns", "again"),
        None,
        "one line per transition"
    );
    assert_eq!(ids(&b), ["a"]);
    let st = status::of(&b).unwrap();
    let d = &st["pools"]["p"]["discovery"];
    assert_eq!(d["up"], false);
    assert_eq!(d["failing"], 2);
    assert_eq!(d["errors"], 2);
    assert_eq!(d["last_error"], "again");
    let text = {
        let mut s = String::new();
        rsbalancer::metrics::render(&b, &mut s).unwrap();
        s
    };
    assert!(
        text.contains("rsbalancer_discovery_up{pool=\"p\",source=\"dns\"} 0"),
        "{text}"
    );
    assert!(text.contains("rsbalancer_discovery_errors_total{pool=\"p\",source=\"dns\"} 2"));
    let r = discovery::apply(&b, "p", vec![n("a", "127.0.0.1:8001", 1)], "dns").unwrap();
    assert!(r.recovered);
    assert!(r.line("p", "dns").unwrap().contains("answers again"));
    assert_eq!(status::of(&b).unwrap()["pools"]["p"]["discovery"]["up"], true);
}

#[test]
fn a_long_error_is_cut_at_a_character_boundary() {
    let b = Balancer::create(&config("keep")).unwrap();
    let long = "é".repeat(40);
    discovery::failed(&b, "p", "dns", &long);
    let st = status::of(&b).unwrap();
    let got = st["pools"]["p"]["discovery"]["last_error"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(got, "é".repeat(24));
}

#[test]
fn a_reload_keeps_the_discovered_nodes_and_their_slots() {
    let cfg = config("keep");
    let b = Balancer::create(&cfg).unwrap();
    discovery::apply(&b, "p", vec![n("a", "127.0.0.1:8001", 4)], "dns").unwrap();
    let a = b.node_index("p", "a").unwrap();
    b.configure(&cfg).unwrap();
    assert_eq!(ids(&b), ["a"]);
    assert_eq!(b.node_index("p", "a").unwrap(), a);
    assert_eq!(node::stats(b.region(), a).weight, 4);
}

#[test]
fn nodes_whose_names_do_not_resolve_wait_in_unresolved() {
    let cfg = Config::from_value(json!({
        "pools": { "p": {
            "nodes": [
                { "id": "a", "addr": "127.0.0.1:8001" },
                { "id": "gone", "addr": "no-such-host.invalid:8002" }
            ],
            "discovery": { "dns": { "min_ttl_s": 1 } }
        } }
    }))
    .expect("a name that does not resolve does not refuse the config");
    let p = &cfg.pools["p"];
    assert_eq!(p.nodes.len(), 1);
    let d = p.discovery.as_ref().unwrap().dns.as_ref().unwrap();
    assert_eq!(d.unresolved[0].id, "gone");
    // Without discovery the same name refuses the config, naming the field.
    let e = Config::from_value(json!({ "pools": { "p": { "nodes": [
        { "id": "a", "addr": "127.0.0.1:8001" },
        { "id": "gone", "addr": "no-such-host.invalid:8002" }
    ] } } }))
    .unwrap_err();
    assert_eq!(e.path, "pools.p.nodes[1].addr");
    // It joins when it resolves: the source's answer names it.
    let b = Balancer::create(&cfg).unwrap();
    let mut joined = n("gone", "127.0.0.1:8002", 1);
    joined.addr = "no-such-host.invalid:8002".into();
    discovery::apply(&b, "p", vec![n("a", "127.0.0.1:8001", 1), joined], "dns").unwrap();
    assert_eq!(ids(&b), ["a", "gone"]);
    let t = b.topology().unwrap();
    let d = t
        .pool("p")
        .unwrap()
        .policy
        .discovery
        .clone()
        .unwrap()
        .dns
        .unwrap();
    assert!(d.unresolved.is_empty(), "no longer waiting");
    assert_eq!(t.pool("p").unwrap().nodes[1].host, "no-such-host.invalid");
}

#[test]
fn a_found_node_of_weight_zero_moves_and_keeps_its_running_weight() {
    let b = Balancer::create(&config("keep")).unwrap();
    discovery::apply(&b, "p", vec![n("a", "127.0.0.1:8001", 6)], "dns").unwrap();
    let slot = b.node_index("p", "a").unwrap();
    let mut moved = n("a", "127.0.0.2:8001", 1);
    moved.weight = 0;
    let r = discovery::apply(&b, "p", vec![moved], "dns").unwrap();
    assert_eq!(r.updated, ["a"]);
    assert_eq!(b.node_index("p", "a").unwrap(), slot);
    assert_eq!(node::stats(b.region(), slot).weight, 6);
    let t = b.topology().unwrap();
    assert_eq!(
        t.pool("p").unwrap().nodes[0].addr,
        "127.0.0.2:8001".parse().unwrap()
    );
}
