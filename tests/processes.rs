//! Cross-process behaviour over one shared region, with real forks (no nginx): the
//! parent creates the region as the nginx master does, children inherit it as workers
//! do, and they pick, report, die and reconfigure concurrently.
//!
//! Children signal success through their exit code (0) and their readiness through
//! [`Signal`]s; a child that panics exits with `PANIC_EXIT_CODE`, and a `Child` dropped
//! by a failing test is killed and reaped, so no test leaves processes behind.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rsbalancer::balancer::Balancer;
use rsbalancer::config::Config;
use rsbalancer::shm::process::{fork_child, Child, Signal};
use serde_json::{json, Value};

mod common;
use common::{expect_signal, node_list, park, HANDSHAKE};

fn config(pool: Value) -> Config {
    Config::from_value(json!({
        "shm": { "max_nodes": 32, "max_pools": 4, "max_workers": 8, "config_bytes": 65536 },
        "pools": { "p": pool }
    }))
    .expect("valid config")
}

fn nodes(ids: &[&str]) -> Value {
    let primaries: Vec<(&str, bool)> = ids.iter().map(|&id| (id, false)).collect();
    node_list(&primaries)
}

fn slot(b: &Balancer, id: &str) -> u32 {
    b.node_index("p", id).expect("node exists")
}

fn total_inflight(b: &Balancer, slots: &[u32]) -> u32 {
    slots.iter().map(|&s| b.node_stats(s).unwrap().inflight).sum()
}

/// splitmix64: the deterministic "random" status sequence both sides can recompute.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// (status, latency µs) of try `k` of worker `w`: 70% 200, 10% each 429, 503, 0.
fn outcome(w: u32, k: u32) -> (u32, u32) {
    let h = mix(((w as u64) << 32) | k as u64);
    let status = match h % 10 {
        0 => 429,
        1 => 503,
        2 => 0,
        _ => 200,
    };
    (status, 500 + ((h >> 8) % 20_000) as u32)
}

#[test]
fn four_workers_count_exactly() {
    const WORKERS: u32 = 4;
    const TRIES: u32 = 25_000;
    // This test is about counting, so the policies that take nodes out for a while
    // are neutralised and every pick succeeds: no ejection, a concurrency limit that
    // is never reached (a 429 without Retry-After is "busy at capacity"), and never
    // enough consecutive 429s to count as a spent quota.
    let b = Balancer::create(&config(json!({
        "algorithm": "p2c_ewma",
        "slow_start_ms": 0,
        "outlier": { "consecutive_failures": 0 },
        "limit": { "min": 100000, "max": 100000 },
        "cooldown": { "quota_after": 1000 },
        "nodes": nodes(&["a", "b", "c", "d", "e"])
    })))
    .unwrap();
    let pool = b.pool_index("p").unwrap();
    let slots: Vec<u32> = ["a", "b", "c", "d", "e"].iter().map(|id| slot(&b, id)).collect();
    let go = Signal::new().unwrap();

    let children: Vec<Child> = (0..WORKERS)
        .map(|w| {
            fork_child(|| {
                assert_eq!(b.attach_worker(w).unwrap(), w);
                assert_eq!(go.recv(HANDSHAKE).unwrap(), Some(1), "start signal");
                for k in 0..TRIES {
                    let node = b.pick(pool, b"", &[]).unwrap();
                    let (status, latency) = outcome(w, k);
                    b.report(node, status, latency, 0).unwrap();
                }
                0
            })
            .unwrap()
        })
        .collect();
    // Start them together, for as much contention on the shared lines as possible.
    for _ in 0..WORKERS {
        go.send(1).unwrap();
    }
    for c in children {
        let pid = c.pid();
        assert_eq!(c.wait().unwrap(), 0, "worker {pid} failed");
    }

    let (mut want_failures, mut want_busy, mut want_latency) = (0u64, 0u64, 0u64);
    for w in 0..WORKERS {
        for k in 0..TRIES {
            match outcome(w, k) {
                (429, _) => want_busy += 1,
                (0 | 503, _) => want_failures += 1,
                (_, latency) => want_latency += latency as u64,
            }
        }
    }
    let stats: Vec<_> = slots.iter().map(|&s| b.node_stats(s).unwrap()).collect();
    for (s, st) in slots.iter().zip(&stats) {
        assert_eq!(st.inflight, 0, "node {s}: {st:?}");
        assert_eq!(st.picks, st.requests, "node {s}: every pick was reported: {st:?}");
    }
    let total = (WORKERS * TRIES) as u64;
    assert_eq!(stats.iter().map(|s| s.picks).sum::<u64>(), total);
    assert_eq!(stats.iter().map(|s| s.requests).sum::<u64>(), total);
    assert_eq!(stats.iter().map(|s| s.failures).sum::<u64>(), want_failures);
    assert_eq!(stats.iter().map(|s| s.busy).sum::<u64>(), want_busy);
    assert_eq!(stats.iter().map(|s| s.latency_sum_us).sum::<u64>(), want_latency);
    // Every worker's per-node shares went back to zero as well.
    let r = b.region();
    for w in 0..WORKERS {
        for &s in &slots {
            assert_eq!(
                r.share(w, s).unwrap().load(Ordering::Relaxed),
                0,
                "share({w}, {s})"
            );
        }
    }
}

/// A child that attaches as worker `w`, picks `n` tries without reporting them, says
/// so on `ready` and waits to be killed.
fn holder(b: &Balancer, pool: u32, w: u32, n: u32, ready: &Signal) -> Child {
    fork_child(|| {
        assert_eq!(b.attach_worker(w).unwrap(), w);
        for _ in 0..n {
            b.pick(pool, b"", &[]).unwrap();
        }
        ready.send(1).unwrap();
        park()
    })
    .unwrap()
}

#[test]
fn killed_worker_inflight_is_reclaimed() {
    let b = Balancer::create(&config(json!({
        "algorithm": "least_conn",
        "nodes": nodes(&["a", "b", "c"])
    })))
    .unwrap();
    let pool = b.pool_index("p").unwrap();
    let slots: Vec<u32> = ["a", "b", "c"].iter().map(|id| slot(&b, id)).collect();
    let ready = Signal::new().unwrap();
    let r = b.region();

    // A worker dies with 50 tries in flight; the next process to attach reclaims them.
    let mut child = holder(&b, pool, 3, 50, &ready);
    expect_signal(&ready, &mut child, "first worker");
    assert_eq!(total_inflight(&b, &slots), 50);
    assert_eq!(r.worker(3).unwrap().pid.load(Ordering::Relaxed), child.pid());
    child.kill(libc::SIGKILL).unwrap();
    assert_eq!(child.wait().unwrap(), 128 + libc::SIGKILL);
    assert_eq!(
        total_inflight(&b, &slots),
        50,
        "nothing reclaims before an attach"
    );
    // The parent attaches through a handle of its own: the children below are forked
    // from `b`, which must stay unattached for them to claim slots of their own.
    let parent = Balancer::attach(b.region().clone());
    assert_eq!(parent.attach_worker(0).unwrap(), 0);
    assert_eq!(total_inflight(&b, &slots), 0);
    assert_eq!(
        r.worker(3).unwrap().pid.load(Ordering::Relaxed),
        0,
        "dead slot freed"
    );
    for &s in &slots {
        assert_eq!(r.share(3, s).unwrap().load(Ordering::Relaxed), 0);
    }

    // Respawn: nginx starts a new worker with the dead one's id; its own attach
    // reclaims the dead worker's shares and takes the same slot.
    let mut child = holder(&b, pool, 3, 50, &ready);
    expect_signal(&ready, &mut child, "second worker");
    assert_eq!(total_inflight(&b, &slots), 50);
    child.kill(libc::SIGKILL).unwrap();
    assert_eq!(child.wait().unwrap(), 128 + libc::SIGKILL);
    let mut respawned = fork_child(|| {
        assert_eq!(b.attach_worker(3).unwrap(), 3, "same slot as the dead worker");
        ready.send(1).unwrap();
        park()
    })
    .unwrap();
    expect_signal(&ready, &mut respawned, "respawned worker");
    assert_eq!(total_inflight(&b, &slots), 0);
    assert_eq!(r.worker(3).unwrap().pid.load(Ordering::Relaxed), respawned.pid());
    respawned.kill(libc::SIGKILL).unwrap();
    respawned.wait().unwrap();
}

#[test]
fn lock_of_killed_holder_is_taken_over() {
    let mut cfg = config(json!({ "nodes": nodes(&["a", "b"]) }));
    let b = Balancer::create(&cfg).unwrap();
    let a = slot(&b, "a");
    let h = b.region().header();
    let ready = Signal::new().unwrap();

    let mut child = fork_child(|| {
        let _guard = b.region().lock(Duration::from_secs(5)).unwrap();
        ready.send(1).unwrap();
        park()
    })
    .unwrap();
    expect_signal(&ready, &mut child, "lock holder");
    assert_eq!(h.lock_owner.load(Ordering::Relaxed), child.pid());
    let steals = h.lock_steals.load(Ordering::Relaxed);
    child.kill(libc::SIGKILL).unwrap();
    assert_eq!(child.wait().unwrap(), 128 + libc::SIGKILL);

    // Both calls wait at most the balancer's lock timeout: Ok means the lock was free
    // or taken over, not waited out.
    cfg.pools.get_mut("p").unwrap().nodes[1].weight = 7;
    b.configure(&cfg).unwrap();
    assert_eq!(b.node_stats(slot(&b, "b")).unwrap().weight, 7);
    b.set_weight(a, 3).unwrap();
    assert_eq!(b.node_stats(a).unwrap().weight, 3);
    assert_eq!(h.lock_steals.load(Ordering::Relaxed), steals + 1);
    assert_eq!(h.lock_owner.load(Ordering::Relaxed), 0, "released after use");
}

#[test]
fn weight_set_in_one_process_used_by_another() {
    let b = Balancer::create(&config(json!({
        "algorithm": "weighted_random",
        "slow_start_ms": 0,
        "nodes": nodes(&["light", "heavy"])
    })))
    .unwrap();
    let pool = b.pool_index("p").unwrap();
    let (light, heavy) = (slot(&b, "light"), slot(&b, "heavy"));
    let (ready, go) = (Signal::new().unwrap(), Signal::new().unwrap());

    let mut child = fork_child(|| {
        b.attach_worker(1).unwrap();
        let count = |n: u32| {
            let mut on_heavy = 0;
            for _ in 0..n {
                let node = b.pick(pool, b"", &[]).unwrap();
                b.report(node, 200, 1000, 0).unwrap();
                on_heavy += u32::from(node == heavy);
            }
            on_heavy
        };
        // 1:1 → binomial(2000, 1/2): mean 1000, sd 22; ±200 is 9 sd.
        let before = count(2000);
        if !(800..=1200).contains(&before) {
            return 2;
        }
        ready.send(1).unwrap();
        if go.recv(HANDSHAKE).unwrap() != Some(1) {
            return 3;
        }
        // 1:99 → expected 99%; 95% is 40 sd below.
        let after = count(10_000);
        if after < 9_500 {
            return 4;
        }
        0
    })
    .unwrap();
    expect_signal(&ready, &mut child, "child at 1:1");
    b.set_weight(light, 1).unwrap();
    b.set_weight(heavy, 99).unwrap();
    go.send(1).unwrap();
    assert_eq!(
        child.wait().unwrap(),
        0,
        "2: not 1:1 before, 4: < 95% on heavy after"
    );
}

#[test]
fn reload_seen_by_a_child_forked_earlier() {
    let b = Balancer::create(&config(json!({
        "algorithm": "round_robin",
        "slow_start_ms": 0,
        "nodes": nodes(&["a", "b", "c"])
    })))
    .unwrap();
    let pool = b.pool_index("p").unwrap();
    let (ready, go) = (Signal::new().unwrap(), Signal::new().unwrap());

    let mut child = fork_child(|| {
        b.attach_worker(2).unwrap();
        let c = b.node_index("p", "c").unwrap();
        let seen = |n: u32| {
            let mut set = HashSet::new();
            for _ in 0..n {
                let node = b.pick(pool, b"", &[]).unwrap();
                b.report(node, 200, 1000, 0).unwrap();
                set.insert(node);
            }
            set
        };
        let before = seen(300);
        if before.len() != 3 || !before.contains(&c) {
            return 2;
        }
        ready.send(1).unwrap();
        if go.recv(HANDSHAKE).unwrap() != Some(1) {
            return 3;
        }
        // The first pick after the reload already uses the new topology.
        let after = seen(300);
        if after.contains(&c) {
            return 4;
        }
        let Ok(d) = b.node_index("p", "d") else {
            return 5;
        };
        if after.len() != 3 || !after.contains(&d) {
            return 6;
        }
        0
    })
    .unwrap();
    expect_signal(&ready, &mut child, "child on the old topology");
    let c = slot(&b, "c");
    b.configure(&config(json!({
        "algorithm": "round_robin",
        "slow_start_ms": 0,
        "nodes": nodes(&["a", "b", "d"])
    })))
    .unwrap();
    assert_ne!(slot(&b, "d"), c, "a removed slot is not reused at once");
    assert!(b.node_index("p", "c").is_err());
    go.send(1).unwrap();
    assert_eq!(
        child.wait().unwrap(),
        0,
        "4: removed node picked, 5/6: new node unknown or never picked"
    );
}

/// The in-flight shares worker slot `w` holds over `slots`.
fn row(b: &Balancer, w: u32, slots: &[u32]) -> u32 {
    slots
        .iter()
        .map(|&s| b.region().share(w, s).unwrap().load(Ordering::Relaxed))
        .sum()
}

/// Regression: a child forked from a process whose handle had already claimed a worker
/// slot got the parent's slot back from `attach_worker`; its tries were booked on the
/// parent's row, so when it was killed nothing reclaimed them.
#[test]
fn forked_child_claims_its_own_worker_slot() {
    let b = Balancer::create(&config(json!({
        "algorithm": "least_conn",
        "nodes": nodes(&["a", "b", "c"])
    })))
    .unwrap();
    let pool = b.pool_index("p").unwrap();
    let slots: Vec<u32> = ["a", "b", "c"].iter().map(|id| slot(&b, id)).collect();
    let r = b.region();
    let me = std::process::id() as i32;
    assert_eq!(b.attach_worker(0).unwrap(), 0);
    let mine = b.pick(pool, b"", &[]).unwrap();
    assert_eq!(row(&b, 0, &slots), 1, "the parent's try is on its row");

    let ready = Signal::new().unwrap();
    let mut child = fork_child(|| {
        assert_eq!(
            b.attach_worker(3).unwrap(),
            3,
            "the child claims a slot of its own, not its parent's 0"
        );
        for _ in 0..5 {
            b.pick(pool, b"", &[]).unwrap();
        }
        ready.send(1).unwrap();
        park()
    })
    .unwrap();
    expect_signal(&ready, &mut child, "forked worker");
    assert_eq!(r.worker(3).unwrap().pid.load(Ordering::Relaxed), child.pid());
    assert_eq!(r.worker(0).unwrap().pid.load(Ordering::Relaxed), me);
    assert_eq!((row(&b, 0, &slots), row(&b, 3, &slots)), (1, 5));
    assert_eq!(total_inflight(&b, &slots), 6);

    child.kill(libc::SIGKILL).unwrap();
    assert_eq!(child.wait().unwrap(), 128 + libc::SIGKILL);
    // Another handle's attach reaps the dead child's row, and only that.
    let other = Balancer::attach(r.clone());
    assert_eq!(other.attach_worker(1).unwrap(), 1);
    assert_eq!(total_inflight(&b, &slots), 1, "the child's 5 tries reclaimed");
    assert_eq!(r.worker(3).unwrap().pid.load(Ordering::Relaxed), 0);
    assert_eq!(row(&b, 3, &slots), 0);
    assert_eq!(r.worker(0).unwrap().pid.load(Ordering::Relaxed), me);
    b.report(mine, 200, 1000, 0).unwrap();
    assert_eq!(total_inflight(&b, &slots), 0);
    assert_eq!(row(&b, 0, &slots), 0);
}

/// Regression: two handles of one process asking for the same worker id shared one
/// slot, so dropping either folded back the other's tries in flight too.
#[test]
fn two_handles_in_one_process_get_their_own_slots() {
    let b = Balancer::create(&config(json!({
        "algorithm": "least_conn",
        "nodes": nodes(&["a", "b", "c"])
    })))
    .unwrap();
    let pool = b.pool_index("p").unwrap();
    let slots: Vec<u32> = ["a", "b", "c"].iter().map(|id| slot(&b, id)).collect();
    let r = b.region();
    let me = std::process::id() as i32;
    let h1 = Balancer::attach(r.clone());
    let h2 = Balancer::attach(r.clone());
    let w1 = h1.attach_worker(1).unwrap();
    let w2 = h2.attach_worker(1).unwrap();
    assert_eq!(w1, 1);
    assert_ne!(w2, w1, "the second handle gets a slot of its own");
    // Asking again keeps each handle's slot.
    assert_eq!(h1.attach_worker(2).unwrap(), w1);
    assert_eq!(h2.attach_worker(1).unwrap(), w2);

    let held: Vec<u32> = (0..3).map(|_| h1.pick(pool, b"", &[]).unwrap()).collect();
    for _ in 0..2 {
        h2.pick(pool, b"", &[]).unwrap();
    }
    assert_eq!((row(&b, w1, &slots), row(&b, w2, &slots)), (3, 2));
    assert_eq!(total_inflight(&b, &slots), 5);

    drop(h2);
    assert_eq!(
        total_inflight(&b, &slots),
        3,
        "dropping h2 folds back its own 2 tries only"
    );
    assert_eq!(r.worker(w2).unwrap().pid.load(Ordering::Relaxed), 0);
    assert_eq!(r.worker(w1).unwrap().pid.load(Ordering::Relaxed), me);
    assert_eq!((row(&b, w1, &slots), row(&b, w2, &slots)), (3, 0));
    for node in held {
        h1.report(node, 200, 1000, 0).unwrap();
    }
    assert_eq!(total_inflight(&b, &slots), 0);
    assert_eq!(row(&b, w1, &slots), 0);
}

/// Regression: `reap_dead_workers` took a reaper's marker (the negated pid of the
/// process folding a dead slot back) for a dead owner, so a slot being reaped by a
/// live process could be reaped twice. Only a dead reaper's marker is replaced.
#[test]
fn reaper_markers_of_live_processes_are_left_alone() {
    let b = Balancer::create(&config(json!({ "nodes": nodes(&["a", "b"]) }))).unwrap();
    let r = b.region();
    let a = slot(&b, "a");
    let me = std::process::id() as i32;
    let cell = &r.worker(2).unwrap().pid;

    // This process's own marker.
    cell.store(-me, Ordering::SeqCst);
    assert_eq!(r.reap_dead_workers(), 0);
    assert_eq!(cell.load(Ordering::SeqCst), -me, "own marker left in place");

    // Another live process's marker, which also keeps the slot from being claimed.
    let ready = Signal::new().unwrap();
    let mut live = fork_child(|| {
        ready.send(1).unwrap();
        park()
    })
    .unwrap();
    expect_signal(&ready, &mut live, "live reaper");
    cell.store(-live.pid(), Ordering::SeqCst);
    assert_eq!(r.reap_dead_workers(), 0);
    assert_eq!(cell.load(Ordering::SeqCst), -live.pid());
    let h = Balancer::attach(r.clone());
    assert_ne!(h.attach_worker(2).unwrap(), 2, "a slot being reaped is not free");
    live.kill(libc::SIGKILL).unwrap();
    live.wait().unwrap();

    // The marker of a reaper that died half-way: the slot is reaped, its shares
    // folded back.
    let dead = fork_child(|| 0).unwrap();
    let dead_pid = dead.pid();
    assert_eq!(dead.wait().unwrap(), 0);
    cell.store(-dead_pid, Ordering::SeqCst);
    r.share(2, a).unwrap().store(4, Ordering::SeqCst);
    r.node(a).unwrap().inflight.fetch_add(4, Ordering::SeqCst);
    assert_eq!(r.reap_dead_workers(), 1);
    assert_eq!(cell.load(Ordering::SeqCst), 0);
    assert_eq!(r.share(2, a).unwrap().load(Ordering::SeqCst), 0);
    assert_eq!(b.node_stats(a).unwrap().inflight, 0);
}
