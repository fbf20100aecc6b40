//! Provider headroom and token/request budgets through the public API on a real
//! shared region (`note_headroom`, `pick_with`, `settle_tokens`, `available`,
//! `report`): a node with nothing left is out until its reset, one with too few
//! tokens is passed over for big requests only, budgets reserve at pick and settle
//! at report, and a second 429 never shortens a cooldown.
//!
//! No assertion is on elapsed time: resets and windows are seconds long and every
//! check runs well inside them, or reads the moment the balancer computed.

use rsbalancer::balancer::{Ask, Balancer, Error, Left, Prefer};
use rsbalancer::config::Config;
use rsbalancer::shm::clock;
use serde_json::{json, Value};

mod common;
use common::{config, shm, slots};

fn ask(tokens: u32) -> Ask<'static> {
    Ask {
        tokens,
        ..Ask::key(b"")
    }
}

fn pick(b: &Balancer, tokens: u32) -> Result<u32, Error> {
    b.pick_with(0, &ask(tokens), &[], Prefer::Confirmed)
}

fn left(remaining: u64, reset_ms: u32) -> Option<Left> {
    Some(Left { remaining, reset_ms })
}

fn budget_config(nodes: Value) -> Config {
    Config::from_value(json!({ "shm": shm(), "pools": { "p": {
        "algorithm": "round_robin", "nodes": nodes } } }))
    .expect("valid config")
}

#[test]
fn nothing_left_is_a_cooldown_until_the_reset() {
    let b = Balancer::create(&config(json!({ "algorithm": "round_robin" }), &["a", "b"])).unwrap();
    let s = slots(&b, &["a", "b"]);
    let t0 = clock::now_ms();
    b.note_headroom(s[0], left(0, 30_000), left(5_000, 1_000))
        .unwrap();
    let t1 = clock::now_ms();
    for _ in 0..20 {
        let n = pick(&b, 100).unwrap();
        assert_eq!(n, s[1], "a said it has no request left");
        b.report(n, 200, 1_000, 0).unwrap();
    }
    let st = b.node_stats(s[0]).unwrap();
    assert_eq!(st.state, "cooling");
    assert!(
        st.cooldown_until_ms >= t0 + 30_000 && st.cooldown_until_ms <= t1 + 33_000,
        "until the reset (plus jitter): {st:?}"
    );
    assert_eq!(st.headroom.remaining_requests, Some(0));
    // Every node out: available() says until when, and picks find none.
    b.note_headroom(s[1], left(0, 20_000), None).unwrap();
    let ms = b.available(0).unwrap_err();
    assert!((19_000..=22_000).contains(&ms), "{ms}");
    assert!(matches!(pick(&b, 1), Err(Error::NoNode { .. })));
}

#[test]
fn too_few_tokens_skip_big_requests_only() {
    let b = Balancer::create(&config(json!({ "algorithm": "round_robin" }), &["a", "b"])).unwrap();
    let s = slots(&b, &["a", "b"]);
    b.note_headroom(s[0], left(100, 30_000), left(1_000, 30_000))
        .unwrap();
    for _ in 0..10 {
        let n = pick(&b, 5_000).unwrap();
        assert_eq!(n, s[1], "5000 tokens do not fit a's 1000");
        b.report(n, 200, 1_000, 0).unwrap();
    }
    // With b excluded, a small request goes to a, a big one finds no node.
    for _ in 0..5 {
        let n = b.pick_with(0, &ask(100), &[s[1]], Prefer::Confirmed).unwrap();
        assert_eq!(n, s[0], "a small request fits a");
        b.report(n, 200, 1_000, 0).unwrap();
    }
    assert!(matches!(
        b.pick_with(0, &ask(5_000), &[s[1]], Prefer::Confirmed),
        Err(Error::NoNode { .. })
    ));
    let st = b.node_stats(s[0]).unwrap();
    assert_eq!(
        st.headroom.remaining_tokens,
        Some(1_000 - 5 * 100),
        "picks take their share"
    );
    assert_eq!(st.headroom.remaining_requests, Some(95));
    assert!(st.headroom.headroom_skips > 0);
    assert_ne!(st.state, "cooling");
}

#[test]
fn a_second_429_never_shortens_a_cooldown() {
    let b = Balancer::create(&config(
        json!({ "algorithm": "round_robin", "cooldown": { "max_ms": 60_000 } }),
        &["a", "b"],
    ))
    .unwrap();
    let s = slots(&b, &["a", "b"]);
    let n = rsbalancer_pick_exactly(&b, s[0], s[1]);
    b.report(n, 429, 1_000, 20_000).unwrap();
    let first = b.node_stats(s[0]).unwrap().cooldown_until_ms;
    assert!(first >= clock::now_ms() + 15_000, "{first}");
    // A try picked before the cooldown answers 429 with a shorter Retry-After.
    let n = b.pick(0, b"", &[s[1]]);
    assert!(n.is_err(), "a is cooling");
    b.region()
        .node(s[0])
        .unwrap()
        .inflight
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    b.report(s[0], 429, 1_000, 1_000).unwrap();
    let second = b.node_stats(s[0]).unwrap().cooldown_until_ms;
    assert!(second >= first, "never shortened: {second} < {first}");
    // A longer one extends it.
    b.region()
        .node(s[0])
        .unwrap()
        .inflight
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    b.report(s[0], 429, 1_000, 40_000).unwrap();
    let third = b.node_stats(s[0]).unwrap().cooldown_until_ms;
    assert!(third > first + 15_000, "extended: {third} vs {first}");
    // And headroom's own "nothing left" never shortens it either.
    b.note_headroom(s[0], left(0, 2_000), None).unwrap();
    assert_eq!(b.node_stats(s[0]).unwrap().cooldown_until_ms, third);
}

fn rsbalancer_pick_exactly(b: &Balancer, target: u32, other: u32) -> u32 {
    let n = b.pick(0, b"", &[other]).unwrap();
    assert_eq!(n, target);
    n
}

#[test]
fn tpm_budget_reserves_at_pick_and_answers_when_full() {
    let b = Balancer::create(&budget_config(json!([
        { "id": "a", "addr": "127.0.0.1:9001", "tpm": 1_000 }
    ])))
    .unwrap();
    let a = slots(&b, &["a"])[0];
    let mut granted = 0;
    let mut picked = Vec::new();
    while let Ok(n) = pick(&b, 300) {
        granted += 300;
        picked.push(n);
        assert!(granted <= 1_000 + 300, "overshoot");
    }
    assert_eq!(granted, 1_200, "under 1000 reserved, one more estimate fits");
    let st = b.node_stats(a).unwrap();
    assert_eq!((st.headroom.tpm, st.headroom.budget_tokens_used), (1_000, 1_200));
    assert!(st.headroom.budget_skips > 0);
    // Out for every request until the window's first bucket leaves: 60-70 s.
    let ms = b.available(0).unwrap_err();
    assert!((50_000..=71_000).contains(&ms), "{ms}");
    assert!(st.unavailable_ms > 50_000, "{st:?}");
    // Two tries were refused (429): their tokens come back, their requests stay.
    for &n in &picked[..2] {
        b.settle_tokens(n, 300, 0, 0).unwrap();
        b.report(n, 429, 1_000, 0).unwrap();
    }
    let st = b.node_stats(a).unwrap();
    assert_eq!(
        (st.headroom.budget_tokens_used, st.headroom.budget_requests_used),
        (600, 4)
    );
    // A served one that used more than estimated (usage): the window holds that.
    b.settle_tokens(picked[2], 300, 900, 0).unwrap();
    assert_eq!(b.node_stats(a).unwrap().headroom.budget_tokens_used, 1_200);
    assert!(pick(&b, 1).is_err());
}

#[test]
fn rpm_budget_counts_requests() {
    let b = Balancer::create(&budget_config(json!([
        { "id": "a", "addr": "127.0.0.1:9001", "rpm": 3 },
        { "id": "b", "addr": "127.0.0.1:9002" }
    ])))
    .unwrap();
    let s = slots(&b, &["a", "b"]);
    let on_a = (0..10)
        .filter(|_| match b.pick_with(0, &ask(0), &[s[1]], Prefer::Confirmed) {
            Ok(n) => {
                b.report(n, 200, 1_000, 0).unwrap();
                true
            }
            Err(_) => false,
        })
        .count();
    assert_eq!(on_a, 3, "a takes its 3 requests per minute");
    assert_eq!(pick(&b, 0).unwrap(), s[1], "b takes the rest");
    assert_eq!(b.node_stats(s[0]).unwrap().headroom.budget_requests_used, 3);
}

#[test]
fn budgets_are_validated_with_their_field_names() {
    for (node, field) in [
        (json!({ "id": "a", "addr": "127.0.0.1:9001", "tpm": 0 }), "tpm"),
        (
            json!({ "id": "a", "addr": "127.0.0.1:9001", "rpm": 2_000_000 }),
            "rpm",
        ),
    ] {
        let err = Config::from_value(json!({ "pools": { "p": { "nodes": [node] } } }))
            .and_then(|mut c| c.validate().map(|_| c))
            .unwrap_err()
            .to_string();
        assert!(err.contains(&format!("pools.p.nodes[0].{field}")), "{err}");
    }
}

#[test]
fn workers_in_several_processes_never_overshoot_a_tpm_by_more_than_one_estimate() {
    use rsbalancer::shm::process::{fork_child, Signal};
    const WORKERS: u32 = 4;
    const EST: u32 = 777;
    let b = Balancer::create(&budget_config(json!([
        { "id": "a", "addr": "127.0.0.1:9001", "tpm": 10_000 }
    ])))
    .unwrap();
    let a = slots(&b, &["a"])[0];
    let go = Signal::new().unwrap();
    let children: Vec<_> = (0..WORKERS)
        .map(|w| {
            let (b, go) = (&b, &go);
            fork_child(move || {
                b.attach_worker(w).unwrap();
                assert_eq!(go.recv(common::HANDSHAKE).unwrap(), Some(1));
                // Picks that reserved: the exit status (at most 13 fit).
                (0..200).filter(|_| pick(b, EST).is_ok()).count() as i32
            })
            .unwrap()
        })
        .collect();
    for _ in 0..WORKERS {
        go.send(1).unwrap();
    }
    let granted: u64 = children
        .into_iter()
        .map(|c| c.wait().unwrap() as u64 * EST as u64)
        .sum();
    assert!(
        (10_000..10_000 + EST as u64).contains(&granted),
        "{granted} tokens granted against a tpm of 10000"
    );
    assert_eq!(b.node_stats(a).unwrap().headroom.budget_tokens_used, granted);
}
