//! Emergency mode on a real shared region, without nginx: the detector's transitions
//! (compare-and-swap, one winner among handles), forced states, and the backup pool in
//! `pick`, `may_retry` and `available`. Time is injected into `emergency_tick`.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use rsbalancer::balancer::{Balancer, EmergencyMode, Error, RetryDenied};
use rsbalancer::config::Config;
use rsbalancer::shm::clock;
use rsbalancer::shm::layout::emergency::{ACTIVE, FORCED_OFF, FORCED_ON};
use serde_json::{json, Value};

mod common;
use common::{race, racers};

/// Pool "llm" (a, b) with an emergency section (merged with `emergency`) whose backup
/// pool is "spare" (s); a 60 s window so that injected times stay inside it.
fn config(emergency: Value) -> Config {
    let mut e = json!({
        "enter_busy_ratio": 0.5, "exit_busy_ratio": 0.1, "min_requests": 10,
        "healthy_window_ms": 1000, "backup_pool": "spare", "shed_below": 5
    });
    if let Value::Object(m) = emergency {
        for (k, v) in m {
            e[k] = v;
        }
    }
    Config::from_value(json!({
        "shm": { "max_nodes": 16, "max_pools": 4, "max_workers": 4, "config_bytes": 65536 },
        "pools": {
            "llm": {
                "nodes": [{ "id": "a", "addr": "127.0.0.1:9001" }, { "id": "b", "addr": "127.0.0.1:9002" }],
                "window_ms": 60000,
                "retry": { "min_per_s": 1000 },
                "cooldown": { "quota_after": 1000 },
                "health": { "unhealthy": 1, "healthy": 1 },
                "emergency": e
            },
            "spare": { "nodes": [{ "id": "s", "addr": "127.0.0.1:9003" }] }
        }
    }))
    .expect("valid config")
}

/// `n` tries of pool `pool` answered `status` (no Retry-After).
fn tries(b: &Balancer, pool: u32, n: usize, status: u32) {
    for _ in 0..n {
        let node = b.pick(pool, b"", &[]).unwrap();
        b.report(node, status, 1_000, 0).unwrap();
    }
}

#[test]
fn configure_stores_shed_below_and_backup_pool() {
    let b = Balancer::create(&config(json!({}))).unwrap();
    let (llm, spare) = (b.pool_index("llm").unwrap(), b.pool_index("spare").unwrap());
    let ps = b.region().pool(llm).unwrap();
    assert_eq!(ps.shed_below.load(Ordering::Relaxed), 5);
    assert_eq!(ps.backup_pool.load(Ordering::Relaxed), spare + 1);
    let sp = b.region().pool(spare).unwrap();
    assert_eq!(
        sp.shed_below.load(Ordering::Relaxed),
        1,
        "no emergency section: shed nothing"
    );
    assert_eq!(sp.backup_pool.load(Ordering::Relaxed), 0);
    // A reload without the section takes the backup pool away, and ends an emergency
    // the detector started (nothing else would).
    ps.emergency.store(ACTIVE, Ordering::Relaxed);
    let mut c = config(json!({}));
    c.pools.get_mut("llm").unwrap().emergency = None;
    b.configure(&c).unwrap();
    assert_eq!(ps.backup_pool.load(Ordering::Relaxed), 0);
    assert_eq!(ps.shed_below.load(Ordering::Relaxed), 1);
    let won = rsbalancer::emergency::emergency_tick(&b, clock::now_ms()).unwrap();
    assert_eq!(won.len(), 1);
    assert_eq!((won[0].event, won[0].forced), ("exit", false));
    assert_eq!(ps.emergency.load(Ordering::Relaxed), 0);
    assert!(rsbalancer::emergency::emergency_tick(&b, clock::now_ms())
        .unwrap()
        .is_empty());
}

#[test]
fn detector_enters_once_across_handles_and_exits_after_the_healthy_window() {
    let b1 = Balancer::create(&config(json!({}))).unwrap();
    let b2 = Balancer::attach(Arc::clone(b1.region()));
    let pool = b1.pool_index("llm").unwrap();
    let ps = b1.region().pool(pool).unwrap();
    let now = clock::now_ms();
    tries(&b1, pool, 9, 429);
    assert!(
        rsbalancer::emergency::emergency_tick(&b1, now)
            .unwrap()
            .is_empty(),
        "9 requests: not judged"
    );
    tries(&b1, pool, 1, 429);
    let won: Vec<_> = [&b1, &b2, &b1, &b2]
        .iter()
        .flat_map(|b| rsbalancer::emergency::emergency_tick(b, now).unwrap())
        .collect();
    assert_eq!(won.len(), 1, "exactly one handle wins the entry: {won:?}");
    let t = &won[0];
    assert_eq!((t.pool.as_str(), t.event, t.forced), ("llm", "enter", false));
    assert_eq!(t.busy_ratio, 1.0);
    assert_eq!((t.counts.requests, t.counts.busy), (10, 10));
    assert_eq!(t.backup_pool.as_deref(), Some("spare"));
    assert_eq!(t.shed_below, 5);
    let ids: Vec<&str> = t.nodes.iter().map(|n| n.id.as_str()).collect();
    assert_eq!(ids, ["a", "b"]);
    let body: Value = serde_json::from_str(&t.to_json()).unwrap();
    assert_eq!(body["event"], "enter");
    assert_eq!(body["nodes"][0]["id"], "a");
    assert!(body["nodes"][0]["state"].is_string() && body["time"].as_f64().unwrap() > 1.0e9);
    assert!(
        t.log_line().contains("pool llm entered emergency mode"),
        "{}",
        t.log_line()
    );
    assert_eq!(ps.emergency.load(Ordering::Relaxed), ACTIVE);
    assert_eq!(ps.emergency_entries_total.load(Ordering::Relaxed), 1);
    assert_eq!(ps.emergency_since_ms.load(Ordering::Relaxed), now);

    // Recovery: 10 busy of 210 tries (0.048 < 0.1), calm from `now`; exit 1 s later.
    tries(&b1, pool, 200, 200);
    assert!(rsbalancer::emergency::emergency_tick(&b1, now)
        .unwrap()
        .is_empty());
    assert!(rsbalancer::emergency::emergency_tick(&b2, now + 500)
        .unwrap()
        .is_empty());
    assert!(rsbalancer::emergency::emergency_tick(&b1, now + 999)
        .unwrap()
        .is_empty());
    let won: Vec<_> = [&b2, &b1, &b2]
        .iter()
        .flat_map(|b| rsbalancer::emergency::emergency_tick(b, now + 1_000).unwrap())
        .collect();
    assert_eq!(won.len(), 1, "exactly one handle wins the exit: {won:?}");
    assert_eq!(won[0].event, "exit");
    assert!(won[0].reason.contains("< 0.1 for 1000 ms"), "{}", won[0].reason);
    assert_eq!(ps.emergency.load(Ordering::Relaxed), 0);
    // Hysteresis: a ratio between exit and enter does not enter again.
    tries(&b1, pool, 40, 429); // 50 of 250: 0.2
    assert!(rsbalancer::emergency::emergency_tick(&b1, now + 2_000)
        .unwrap()
        .is_empty());
}

/// Handles in threads released together at the moment the detector decides to enter,
/// round after round (the test puts the pool back out of emergency in between): each
/// round exactly one wins. (A load-then-store in place of the compare-and-swap let
/// two win in some rounds.)
#[test]
fn racing_detectors_enter_exactly_once() {
    const ROUNDS: usize = 20_000;
    let b = Balancer::create(&config(json!({}))).unwrap();
    let pool = b.pool_index("llm").unwrap();
    let ps = b.region().pool(pool).unwrap();
    tries(&b, pool, 10, 429);
    let now = clock::now_ms();
    let handles: Vec<Balancer> = (0..racers())
        .map(|_| Balancer::attach(Arc::clone(b.region())))
        .collect();
    let rounds = race(
        &handles,
        ROUNDS,
        |_| ps.emergency.store(0, Ordering::Release),
        |h| rsbalancer::emergency::emergency_tick(h, now).unwrap().len(),
    );
    let won: Vec<usize> = rounds.iter().map(|r| r.iter().sum()).collect();
    let bad: Vec<(usize, usize)> = won.iter().copied().enumerate().filter(|&(_, w)| w != 1).collect();
    assert!(
        bad.is_empty(),
        "(round, winners) of rounds without exactly one winner: {bad:?}"
    );
    assert_eq!(ps.emergency_entries_total.load(Ordering::Relaxed), ROUNDS as u64);
    assert_eq!(ps.emergency.load(Ordering::Relaxed), ACTIVE);
}

#[test]
fn forced_states_win_and_are_reported_once() {
    let b = Balancer::create(&config(json!({}))).unwrap();
    let pool = b.pool_index("llm").unwrap();
    let ps = b.region().pool(pool).unwrap();
    let now = clock::now_ms();
    let t = rsbalancer::emergency::force_emergency(&b, pool, EmergencyMode::On)
        .unwrap()
        .expect("a transition");
    assert_eq!((t.event, t.forced, t.reason.as_str()), ("enter", true, "forced"));
    assert!(
        rsbalancer::emergency::force_emergency(&b, pool, EmergencyMode::On)
            .unwrap()
            .is_none(),
        "already on"
    );
    assert_eq!(ps.emergency.load(Ordering::Relaxed), ACTIVE | FORCED_ON);
    assert_eq!(ps.emergency_entries_total.load(Ordering::Relaxed), 1);
    // Calm traffic: the detector would leave, but the pool is forced on.
    tries(&b, pool, 50, 200);
    assert!(rsbalancer::emergency::emergency_tick(&b, now).unwrap().is_empty());
    assert!(rsbalancer::emergency::emergency_tick(&b, now + 5_000)
        .unwrap()
        .is_empty());
    assert_eq!(ps.emergency.load(Ordering::Relaxed), ACTIVE | FORCED_ON);
    let t = rsbalancer::emergency::force_emergency(&b, pool, EmergencyMode::Off)
        .unwrap()
        .expect("a transition");
    assert_eq!((t.event, t.forced), ("exit", true));
    // Overload while forced off: the detector stays out.
    tries(&b, pool, 100, 429);
    assert!(rsbalancer::emergency::emergency_tick(&b, now + 6_000)
        .unwrap()
        .is_empty());
    assert_eq!(ps.emergency.load(Ordering::Relaxed), FORCED_OFF);
    // "auto" hands the pool back as it is (no transition); the detector then enters.
    assert!(
        rsbalancer::emergency::force_emergency(&b, pool, EmergencyMode::Auto)
            .unwrap()
            .is_none()
    );
    assert_eq!(ps.emergency.load(Ordering::Relaxed), 0);
    let won = rsbalancer::emergency::emergency_tick(&b, now + 7_000).unwrap();
    assert_eq!(won.len(), 1);
    assert_eq!((won[0].event, won[0].forced), ("enter", false));
    assert_eq!(ps.emergency_entries_total.load(Ordering::Relaxed), 2);
    assert!(matches!(
        rsbalancer::emergency::force_emergency(&b, 3, EmergencyMode::On),
        Err(Error::Invalid(_))
    ));
}

#[test]
fn backup_pool_takes_spill_only_in_emergency_or_when_every_node_is_down() {
    let b = Balancer::create(&config(json!({ "min_requests": 1000 }))).unwrap();
    let pool = b.pool_index("llm").unwrap();
    let spare = b.node_index("spare", "s").unwrap();
    let (a, bb) = (
        b.node_index("llm", "a").unwrap(),
        b.node_index("llm", "b").unwrap(),
    );
    let primaries = [a, bb];
    // Primaries up: never the backup pool, in emergency or not.
    for mode in [EmergencyMode::Off, EmergencyMode::On] {
        rsbalancer::emergency::force_emergency(&b, pool, mode).unwrap();
        for _ in 0..50 {
            let n = b.pick(pool, b"", &[]).unwrap();
            assert!(primaries.contains(&n), "{mode:?}: picked {n}");
            b.report(n, 200, 1_000, 0).unwrap();
        }
    }
    // Both primaries tried: only in emergency does the request spill over.
    rsbalancer::emergency::force_emergency(&b, pool, EmergencyMode::Off).unwrap();
    assert!(matches!(b.pick(pool, b"", &primaries), Err(Error::NoNode { .. })));
    assert_eq!(b.may_retry(pool, &[a], 0), Ok(()));
    assert_eq!(b.may_retry(pool, &primaries, 0), Err(RetryDenied::NoNode));
    rsbalancer::emergency::force_emergency(&b, pool, EmergencyMode::On).unwrap();
    assert_eq!(b.may_retry(pool, &primaries, 0), Ok(()));
    let n = b.pick(pool, b"", &primaries).unwrap();
    assert_eq!(n, spare);
    b.report(n, 200, 1_000, 0).unwrap();
    // Primaries resting (quota cooldown): admission still admits in emergency only.
    for &p in &primaries {
        let got = b.pick(
            pool,
            b"",
            &primaries.iter().copied().filter(|&x| x != p).collect::<Vec<_>>(),
        );
        assert_eq!(got, Ok(p));
        b.report(p, 429, 1_000, 30_000).unwrap();
    }
    assert_eq!(b.available(pool), Ok(()));
    assert_eq!(b.pick(pool, b"", &[]), Ok(spare));
    b.report(spare, 200, 1_000, 0).unwrap();
    rsbalancer::emergency::force_emergency(&b, pool, EmergencyMode::Off).unwrap();
    assert!(
        b.available(pool).is_err(),
        "cooling primaries, no emergency: no backup pool"
    );
    assert!(matches!(b.pick(pool, b"", &[]), Err(Error::NoNode { .. })));
    // Every primary down (health checks): the backup pool serves, emergency or not.
    let c = Balancer::create(&config(json!({}))).unwrap();
    let pool = c.pool_index("llm").unwrap();
    let spare = c.node_index("spare", "s").unwrap();
    let a = c.node_index("llm", "a").unwrap();
    let bb = c.node_index("llm", "b").unwrap();
    c.health_report(a, false).unwrap();
    assert_ne!(c.pick(pool, b"", &[]), Ok(spare), "one primary still up");
    c.health_report(bb, false).unwrap();
    assert_eq!(c.available(pool), Ok(()));
    let n = c.pick(pool, b"", &[]).unwrap();
    assert_eq!(n, spare);
    c.report(n, 200, 1_000, 0).unwrap();
    assert_eq!(
        c.region().pool(pool).unwrap().emergency.load(Ordering::Relaxed),
        0
    );
    c.health_report(a, true).unwrap();
    let n = c.pick(pool, b"", &[]).unwrap();
    assert_eq!(n, a, "back up: the primary again");
    c.report(n, 200, 1_000, 0).unwrap();
}
