//! The canary split through the public Rust API, in one process: config validation
//! (errors name the field and the value), what `configure` stores in the pool's
//! shared slot and what a reload keeps, and the tick's rollback and ramp over real
//! reports in a real shared region. The pure decision (`canary::decide`) is unit-tested
//! with injected time in `src/canary.rs`; the split per request is tested in real nginx
//! by `tests/nginx_canary.rs`.
//!
//! No assertion is on elapsed time; the ramp test polls the tick until the coarse
//! clock reaches the 1 s step.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rsbalancer::balancer::Balancer;
use rsbalancer::canary::{self, CanaryEvent};
use rsbalancer::config::{CanaryKey, Config};
use serde_json::{json, Value};

mod common;
use common::{race, racers};

/// Pools "p" (primary: a, b) and "c" (canary: x, y); `canary` is p's canary block.
fn doc(canary: Value) -> Value {
    json!({ "shm": { "max_nodes": 16, "max_pools": 4, "max_workers": 4 }, "pools": {
        "p": { "nodes": [ { "id": "a", "addr": "127.0.0.1:1" }, { "id": "b", "addr": "127.0.0.1:2" } ],
               "outlier": { "consecutive_failures": 0 }, "window_ms": 2000,
               "canary": canary },
        "c": { "nodes": [ { "id": "x", "addr": "127.0.0.1:3" }, { "id": "y", "addr": "127.0.0.1:4" } ],
               "outlier": { "consecutive_failures": 0 }, "window_ms": 2000 }
    } })
}

fn err(v: Value) -> String {
    Config::from_value(v).unwrap_err().to_string()
}

fn cfg(canary: Value) -> Config {
    Config::from_value(doc(canary)).unwrap()
}

#[test]
fn a_full_canary_block_loads_with_defaults() {
    let c = cfg(json!({ "pool": "c", "share": 0.05, "key": "header:X-User-Id",
                        "ramp": { "step": 0.2, "every_s": 86400 }, "rollback": {} }));
    let k = c.pools["p"].canary.as_ref().unwrap();
    assert_eq!(k.key, CanaryKey::Header("X-User-Id".into()));
    assert_eq!(k.ramp.as_ref().unwrap().max, 1.0);
    let rb = k.rollback.as_ref().unwrap();
    assert_eq!((rb.margin, rb.min_requests), (0.05, 100));
    // Defaults: share 0, key random; and every key form round-trips through JSON.
    let c = cfg(json!({ "pool": "c" }));
    let k = c.pools["p"].canary.as_ref().unwrap();
    assert_eq!((k.share, &k.key), (0.0, &CanaryKey::Random));
    for key in ["random", "addr", "header:X-User", "cookie:sid.v2"] {
        let c = cfg(json!({ "pool": "c", "key": key }));
        let text = serde_json::to_string(&c).unwrap();
        assert!(text.contains(&format!("\"key\":\"{key}\"")), "{text}");
        assert_eq!(Config::from_json(&text).unwrap(), c);
    }
}

#[test]
fn bad_canary_blocks_name_the_field_and_value() {
    let cases: Vec<(Value, &str)> = vec![
        (json!({ "pool": "nope" }), "pools.p.canary.pool: \"nope\": no pool of that name"),
        (json!({ "pool": "p" }), "pools.p.canary.pool: \"p\" is this pool itself"),
        (json!({ "pool": "c", "share": 1.5 }), "pools.p.canary.share: 1.5 is out of range 0..=1"),
        (json!({ "pool": "c", "share": -0.1 }), "pools.p.canary.share: -0.1 is out of range 0..=1"),
        (
            json!({ "pool": "c", "ramp": { "step": 0, "every_s": 60 } }),
            "pools.p.canary.ramp.step: 0 is out of range 0.0001..=1",
        ),
        (
            json!({ "pool": "c", "ramp": { "step": 0.1, "every_s": 0 } }),
            "pools.p.canary.ramp.every_s: 0 is out of range 1..=31536000",
        ),
        (
            json!({ "pool": "c", "share": 0.5, "ramp": { "step": 0.1, "every_s": 1, "max": 0.4 } }),
            "pools.p.canary.ramp.max: 0.4 is below the canary's share (0.5)",
        ),
        (
            json!({ "pool": "c", "rollback": { "margin": 2 } }),
            "pools.p.canary.rollback.margin: 2 is out of range 0..=1",
        ),
        (
            json!({ "pool": "c", "rollback": { "min_requests": 0 } }),
            "pools.p.canary.rollback.min_requests: 0 is out of range 1..=100000000",
        ),
        (
            json!({ "pool": "c", "key": "sticky" }),
            "pools.p.canary.key: \"sticky\" is not a canary key: expected \"random\", \"header:<Name>\", \"cookie:<name>\" or \"addr\"",
        ),
        (
            json!({ "pool": "c", "key": "header:X User" }),
            "pools.p.canary.key: \"header:X User\": invalid header name \"X User\": must be 1..=64 bytes of [A-Za-z0-9_-]",
        ),
    ];
    for (block, want) in cases {
        assert_eq!(err(doc(block.clone())), want, "{block}");
    }
    let e = err(doc(json!({ "pool": "c", "shar": 0.1 })));
    assert!(e.starts_with("pools.p.canary: unknown field `shar`"), "{e}");
    let e = err(doc(json!({ "pool": "c", "ramp": { "step": 0.1 } })));
    assert!(
        e.starts_with("pools.p.canary.ramp: missing field `every_s`"),
        "{e}"
    );
}

#[test]
fn canaries_do_not_chain_or_share_a_canary() {
    let mut d = doc(json!({ "pool": "c" }));
    d["pools"]["c"]["canary"] = json!({ "pool": "q" });
    d["pools"]["q"] = json!({ "nodes": [ { "id": "z", "addr": "127.0.0.1:5" } ] });
    assert_eq!(
        err(d),
        "pools.p.canary.pool: \"c\" has a canary itself (\"q\"): canaries do not chain"
    );
    let mut d = doc(json!({ "pool": "c" }));
    d["pools"]["q"] = json!({ "nodes": [ { "id": "z", "addr": "127.0.0.1:5" } ], "canary": { "pool": "c" } });
    assert_eq!(
        err(d),
        "pools.q.canary.pool: \"c\" is already the canary of pool \"p\""
    );
}

fn canary_of(b: &Balancer, pool: &str) -> (Option<u32>, u32) {
    rsbalancer::canary::canary(b, b.pool_index(pool).unwrap()).unwrap()
}

/// The refusal names the pool, as the admin API's 409 shows it (it said "pool index 1").
#[test]
fn a_share_for_a_pool_without_canary_is_refused_naming_the_pool() {
    let b = Balancer::create(&cfg(json!({ "pool": "c" }))).unwrap();
    let c = b.pool_index("c").unwrap();
    let e = b.set_canary_share(c, 1000).unwrap_err().to_string();
    assert!(e.contains("pool \"c\" has no canary"), "{e}");
    assert!(!e.contains("index"), "{e}");
    assert_eq!(canary_of(&b, "c"), (None, 0), "nothing stored");
}

#[test]
fn configure_stores_the_split_and_a_reload_keeps_the_live_share() {
    let b = Balancer::create(&cfg(json!({ "pool": "c", "share": 0.2 }))).unwrap();
    let (p, c) = (b.pool_index("p").unwrap(), b.pool_index("c").unwrap());
    assert_eq!(canary_of(&b, "p"), (Some(c), 2000));
    assert_eq!(canary_of(&b, "c"), (None, 0), "the canary has no canary");
    let ps = b.region().pool(p).unwrap();
    assert_eq!(ps.canary_pool.load(Ordering::Relaxed), c + 1);

    // Changed live, then a reload with the same canary block: the live share stays.
    b.set_canary_share(p, 3500).unwrap();
    b.configure(&cfg(json!({ "pool": "c", "share": 0.2 }))).unwrap();
    assert_eq!(canary_of(&b, "p"), (Some(c), 3500));
    // A rollback survives an unrelated reload too.
    ps.canary_rolled_back.store(1, Ordering::Relaxed);
    ps.canary_share.store(0, Ordering::Relaxed);
    let mut other = doc(json!({ "pool": "c", "share": 0.2 }));
    other["pools"]["p"]["slow_start_ms"] = json!(1000);
    b.configure(&Config::from_value(other).unwrap()).unwrap();
    assert_eq!(canary_of(&b, "p"), (Some(c), 0));
    assert_eq!(ps.canary_rolled_back.load(Ordering::Relaxed), 1);

    // A changed block starts over from its share and clears the rollback.
    b.configure(&cfg(json!({ "pool": "c", "share": 0.3 }))).unwrap();
    assert_eq!(canary_of(&b, "p"), (Some(c), 3000));
    assert_eq!(ps.canary_rolled_back.load(Ordering::Relaxed), 0);
    let st = rsbalancer::canary::canary_state(&b, "p").unwrap().unwrap();
    assert_eq!(
        (st.canary.as_str(), st.share, st.key.as_str()),
        ("c", 0.3, "random")
    );

    // No block: no split.
    let mut none = doc(Value::Null);
    none["pools"]["p"].as_object_mut().unwrap().remove("canary");
    b.configure(&Config::from_value(none).unwrap()).unwrap();
    assert_eq!(canary_of(&b, "p"), (None, 0));
    assert_eq!(rsbalancer::canary::canary_state(&b, "p").unwrap(), None);
    assert!(rsbalancer::canary::canary(&b, 999).is_err());
}

/// A balancer with p's canary block `block`, and p's pool index, once the coarse clock
/// has left the window bucket in which the block was loaded (200 ms buckets here):
/// rollback judges canary outcomes from the next bucket on.
fn judged_from_now(block: Value) -> (Balancer, u32) {
    let b = Balancer::create(&cfg(block)).unwrap();
    let p = b.pool_index("p").unwrap();
    std::thread::sleep(Duration::from_millis(250));
    (b, p)
}

/// `n` tries on pool `pool`, each reported with `status`.
fn traffic(b: &Balancer, pool: &str, n: usize, status: u32) {
    let idx = b.pool_index(pool).unwrap();
    for _ in 0..n {
        let node = b.pick(idx, b"", &[]).unwrap();
        b.report(node, status, 50_000, 0).unwrap();
    }
}

#[test]
fn tick_rolls_back_a_failing_canary_once_and_says_why() {
    let block = json!({ "pool": "c", "share": 0.2, "rollback": { "margin": 0.1, "min_requests": 20 } });
    let (b, p) = judged_from_now(block);
    traffic(&b, "p", 80, 200);
    traffic(&b, "c", 19, 500);
    assert_eq!(
        rsbalancer::canary::canary_tick(&b).unwrap(),
        vec![],
        "19 tries < min_requests 20"
    );
    traffic(&b, "c", 1, 500);
    let events = rsbalancer::canary::canary_tick(&b).unwrap();
    assert_eq!(events.len(), 1, "{events:?}");
    let e = &events[0];
    assert!(e.rollback);
    assert_eq!(e.pool, "p");
    assert!(
        e.message.starts_with(
            "pool p canary c ROLLED BACK (share 20.00% -> 0): canary success rate 0.0% of 20 tries is below the primary's 100.0% of 80 tries minus the margin 10.0%"
        ),
        "{}",
        e.message
    );
    assert_eq!(canary_of(&b, "p").1, 0);
    let ps = b.region().pool(p).unwrap();
    assert_eq!(ps.canary_rolled_back.load(Ordering::Relaxed), 1);
    assert_eq!(ps.canary_rollbacks_total.load(Ordering::Relaxed), 1);
    assert_eq!(
        rsbalancer::canary::canary_tick(&b).unwrap(),
        vec![],
        "rolled back once"
    );

    // Re-enabled by hand: the failures that rolled it back are not judged again.
    b.set_canary_share(p, 2000).unwrap();
    assert_eq!(rsbalancer::canary::canary_tick(&b).unwrap(), vec![]);
    assert_eq!(canary_of(&b, "p").1, 2000);
    assert_eq!(ps.canary_rollbacks_total.load(Ordering::Relaxed), 1);
}

#[test]
fn tick_leaves_a_healthy_canary_alone() {
    let block = json!({ "pool": "c", "share": 0.2, "rollback": { "margin": 0.05, "min_requests": 20 } });
    let (b, p) = judged_from_now(block);
    // Both arms see the same 10% of failures: the canary is not worse.
    for _ in 0..10 {
        traffic(&b, "p", 9, 200);
        traffic(&b, "p", 1, 503);
        traffic(&b, "c", 9, 200);
        traffic(&b, "c", 1, 503);
    }
    assert_eq!(rsbalancer::canary::canary_tick(&b).unwrap(), vec![]);
    assert_eq!(canary_of(&b, "p").1, 2000);
    // A canary failing while its share is 0 (turned off by hand) is not rolled back...
    b.set_canary_share(p, 0).unwrap();
    traffic(&b, "c", 10, 500);
    assert_eq!(rsbalancer::canary::canary_tick(&b).unwrap(), vec![]);
    // ... but it is once on again: the judge saw those tries (20% failed now).
    b.set_canary_share(p, 2000).unwrap();
    let events = rsbalancer::canary::canary_tick(&b).unwrap();
    assert!(events.len() == 1 && events[0].rollback, "{events:?}");
}

/// Ticks (as the workers' timers do) until p's share is `parts`; returns the events.
fn tick_until_share(b: &Balancer, parts: u32) -> Vec<CanaryEvent> {
    let mut log = Vec::new();
    let start = Instant::now();
    while canary_of(b, "p").1 != parts {
        assert!(start.elapsed() < Duration::from_secs(20), "no ramp step: {log:?}");
        log.extend(rsbalancer::canary::canary_tick(b).unwrap());
        std::thread::sleep(Duration::from_millis(50));
    }
    log
}

#[test]
fn tick_ramps_the_share_and_a_hand_set_share_stops_it() {
    let block = json!({ "pool": "c", "share": 0.1, "ramp": { "step": 0.25, "every_s": 1, "max": 0.5 } });
    let b = Balancer::create(&cfg(block)).unwrap();
    let p = b.pool_index("p").unwrap();
    let log = tick_until_share(&b, 3500);
    assert_eq!(log.len(), 1, "{log:?}");
    assert!(!log[0].rollback);
    assert_eq!(
        log[0].message,
        "pool p canary c share 10.00% -> 35.00% (ramp; next step in 1 s)"
    );
    let st = rsbalancer::canary::canary_state(&b, "p").unwrap().unwrap();
    assert!(st.ramp_next_in_ms.is_some(), "{st:?}");

    // By hand: the ramp stops (once, with a notice) and the share stays.
    b.set_canary_share(p, 2000).unwrap();
    let events = rsbalancer::canary::canary_tick(&b).unwrap();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(
        events[0].message,
        "pool p canary c ramp stopped: the share was set to 20.00% by hand"
    );
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(rsbalancer::canary::canary_tick(&b).unwrap(), vec![]);
    assert_eq!(canary_of(&b, "p").1, 2000);
    assert_eq!(
        rsbalancer::canary::canary_state(&b, "p")
            .unwrap()
            .unwrap()
            .ramp_next_in_ms,
        None
    );
}

#[test]
fn ramp_reaches_its_max_and_ends() {
    let block = json!({ "pool": "c", "share": 0.3, "ramp": { "step": 0.5, "every_s": 1, "max": 0.6 } });
    let b = Balancer::create(&cfg(block)).unwrap();
    let log = tick_until_share(&b, 6000);
    assert_eq!(
        log.iter().map(|e| e.message.as_str()).collect::<Vec<_>>(),
        vec!["pool p canary c share 30.00% -> 60.00% (ramp; ramp complete)"]
    );
    assert_eq!(
        rsbalancer::canary::canary_state(&b, "p")
            .unwrap()
            .unwrap()
            .ramp_next_in_ms,
        None
    );
}

/// Threads with a handle each, released together at the moment a canary tick decides:
/// `rounds` rounds, `reset` putting the pool back before each. The events of each round.
fn racing_ticks(b: &Balancer, rounds: usize, reset: impl FnMut(usize)) -> Vec<Vec<CanaryEvent>> {
    let handles: Vec<Balancer> = (0..racers())
        .map(|_| Balancer::attach(b.region().clone()))
        .collect();
    race(&handles, rounds, reset, |h| {
        rsbalancer::canary::canary_tick(h).unwrap()
    })
    .into_iter()
    .map(|r| r.into_iter().flatten().collect())
    .collect()
}

/// Rounds where other than exactly one event was reported: (round, their messages).
fn not_once(rounds: &[Vec<CanaryEvent>]) -> Vec<(usize, Vec<&str>)> {
    rounds
        .iter()
        .enumerate()
        .filter(|(_, e)| e.len() != 1)
        .map(|(i, e)| (i, e.iter().map(|e| e.message.as_str()).collect()))
        .collect()
}

/// Exactly one of the racing workers rolls a failing canary back, each round (the
/// test re-arms it). (A load-then-store of the rollback flag in place of the
/// compare-and-swap let two roll back in some rounds.)
#[test]
fn racing_ticks_roll_back_exactly_once() {
    const ROUNDS: usize = 20_000;
    let mut d = doc(json!({ "pool": "c", "share": 0.2, "rollback": { "margin": 0.1, "min_requests": 20 } }));
    // A long window: the tries below stay in it for the whole test.
    d["pools"]["p"]["window_ms"] = json!(600_000);
    d["pools"]["c"]["window_ms"] = json!(600_000);
    let b = Balancer::create(&Config::from_value(d).unwrap()).unwrap();
    let p = b.pool_index("p").unwrap();
    traffic(&b, "p", 80, 200);
    traffic(&b, "c", 20, 500);
    let ps = b.region().pool(p).unwrap();
    let rounds = racing_ticks(&b, ROUNDS, |_| {
        ps.canary_rolled_back.store(0, Ordering::Release);
        // Judge the canary's tries since the clock's start (a rollback restarts it).
        ps.canary_since_ms.store(0, Ordering::Relaxed);
        ps.canary_share.store(2000, Ordering::Release);
    });
    assert_eq!(
        not_once(&rounds),
        vec![],
        "(round, events) of rounds without exactly one rollback"
    );
    assert!(rounds.iter().flatten().all(|e| e.rollback));
    assert_eq!(ps.canary_rollbacks_total.load(Ordering::Relaxed), ROUNDS as u64);
    assert_eq!(canary_of(&b, "p").1, 0);
}

/// Exactly one of the racing workers takes each ramp step (the test sets the step due
/// again before each round). (A load-then-store of the ramp word let two step.)
#[test]
fn racing_ticks_take_a_ramp_step_exactly_once() {
    const ROUNDS: usize = 20_000;
    let block = json!({ "pool": "c", "share": 0.1, "ramp": { "step": 0.1, "every_s": 3600, "max": 0.9 } });
    let b = Balancer::create(&cfg(block)).unwrap();
    let p = b.pool_index("p").unwrap();
    let ps = b.region().pool(p).unwrap();
    let rounds = racing_ticks(&b, ROUNDS, |_| {
        ps.canary_share.store(1000, Ordering::Release);
        // Due since the clock's first millisecond, from the share 10%.
        ps.canary_ramp
            .store(canary::pack_ramp(1, 1000), Ordering::Release);
    });
    assert_eq!(
        not_once(&rounds),
        vec![],
        "(round, events) of rounds without exactly one step"
    );
    for e in rounds.iter().flatten() {
        assert_eq!(
            e.message,
            "pool p canary c share 10.00% -> 20.00% (ramp; next step in 3600 s)"
        );
    }
    assert_eq!(canary_of(&b, "p").1, 2000);
}
