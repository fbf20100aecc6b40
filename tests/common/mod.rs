//! Helpers shared by the integration tests that run without nginx (`balancer`,
//! `processes`, `policy`, `emergency`, `canary`): config builders, a pick of one
//! chosen node, the handshakes with forked children, and a start line for racing
//! threads.
//!
//! Each test crate uses only some of them.
#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rsbalancer::balancer::Balancer;
use rsbalancer::config::Config;
use rsbalancer::shm::process::{Child, Signal};
use serde_json::{json, Value};

/// Generous: only reached when something is broken.
pub const HANDSHAKE: Duration = Duration::from_secs(30);

/// A small region: 16 nodes, 4 pools, 4 workers.
pub fn shm() -> Value {
    json!({ "max_nodes": 16, "max_pools": 4, "max_workers": 4, "config_bytes": 65536 })
}

/// `(id, backup)` pairs as a pool's `nodes` array, on ports 9001, 9002, ...
pub fn node_list(nodes: &[(&str, bool)]) -> Value {
    nodes
        .iter()
        .enumerate()
        .map(|(i, (id, backup))| {
            json!({ "id": id, "addr": format!("127.0.0.1:{}", 9001 + i), "backup": backup })
        })
        .collect()
}

/// A config with one pool `p`: `pool` holds everything but `nodes`.
pub fn config_with(shm: Value, mut pool: Value, nodes: &[(&str, bool)]) -> Config {
    pool["nodes"] = node_list(nodes);
    Config::from_value(json!({ "shm": shm, "pools": { "p": pool } })).expect("valid config")
}

/// [`config_with`] on the small region, every node a primary.
pub fn config(pool: Value, nodes: &[&str]) -> Config {
    let nodes: Vec<(&str, bool)> = nodes.iter().map(|&id| (id, false)).collect();
    config_with(shm(), pool, &nodes)
}

/// Slots of nodes of pool `p`.
pub fn slots(b: &Balancer, ids: &[&str]) -> Vec<u32> {
    ids.iter().map(|id| b.node_index("p", id).unwrap()).collect()
}

/// Pick exactly `target` (by excluding every other slot of `all`).
pub fn pick_exactly(b: &Balancer, pool: u32, target: u32, all: &[u32]) -> u32 {
    let tried: Vec<u32> = all.iter().copied().filter(|&s| s != target).collect();
    let node = b.pick(pool, b"", &tried).unwrap();
    assert_eq!(node, target);
    node
}

/// Block until `sig` delivers a byte from `child`, failing the test at once if the
/// child ends first (a failed assertion in it) or on timeout.
pub fn expect_signal(sig: &Signal, child: &mut Child, what: &str) -> u8 {
    let start = Instant::now();
    while start.elapsed() < HANDSHAKE {
        if let Some(byte) = sig.recv(Duration::from_millis(50)).expect("pipe works") {
            return byte;
        }
        if let Some(code) = child.try_wait().expect("waitpid works") {
            panic!("{what} ended with code {code} before signalling");
        }
    }
    panic!("timed out waiting for {what}")
}

/// A child that never ends by itself (killed by the test, or by `Child`'s drop).
pub fn park() -> ! {
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// How many threads to race: one per core (2 at least). More would not run at once;
/// they would only take turns.
pub fn racers() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8))
}

/// Spin until `until` holds, yielding the core every `yield_every` spins; false when it
/// still does not after [`HANDSHAKE`].
fn spin_until(until: impl Fn() -> bool, yield_every: u32) -> bool {
    let (start, mut spins) = (Instant::now(), 0u32);
    while !until() {
        spins = spins.wrapping_add(1);
        if spins % yield_every == 0 {
            std::thread::yield_now();
            if start.elapsed() > HANDSHAKE {
                return false;
            }
        }
        std::hint::spin_loop();
    }
    true
}

/// Race `call` on every handle of `handles` (see [`racers`]), `rounds` times: this
/// thread takes the first handle, one spawned thread each other one. Before each round
/// `reset` runs here while the others wait at the start line; then all start at once:
/// they spin on one atomic (a `Barrier`'s wake-ups are tens of µs apart), and with no
/// more threads than cores none waits for a core, so they reach the code under test
/// together. Returns, per round, what each call returned (this thread's first).
pub fn race<H: Sync, T: Send>(
    handles: &[H],
    rounds: usize,
    mut reset: impl FnMut(usize),
    call: impl Fn(&H) -> T + Sync,
) -> Vec<Vec<T>> {
    let (first, others) = handles.split_first().expect("a handle to race");
    let (go, ready) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let (mine, theirs) = std::thread::scope(|s| {
        let threads: Vec<_> = others
            .iter()
            .map(|h| {
                let (go, ready, call) = (&go, &ready, &call);
                s.spawn(move || {
                    (1..=rounds)
                        .map(|r| {
                            ready.fetch_add(1, Ordering::AcqRel);
                            while !spin_until(|| go.load(Ordering::Acquire) >= r, 1 << 12) {}
                            call(h)
                        })
                        .collect::<Vec<T>>()
                })
            })
            .collect();
        let mut mine = Vec::with_capacity(rounds);
        for r in 1..=rounds {
            // Every racer is at the start line (and done with the previous round).
            if !spin_until(|| ready.load(Ordering::Acquire) == r * others.len(), 1 << 12) {
                // A racer panicked: release the others so that the scope can end.
                go.store(usize::MAX, Ordering::Release);
                panic!("round {r}: a racing thread never reached the start line");
            }
            reset(r - 1);
            go.store(r, Ordering::Release);
            mine.push(call(first));
        }
        let theirs: Vec<Vec<T>> = threads.into_iter().map(|t| t.join().expect("racer")).collect();
        (mine, theirs)
    });
    let mut by_round: Vec<Vec<T>> = mine.into_iter().map(|t| vec![t]).collect();
    for results in theirs {
        for (round, t) in by_round.iter_mut().zip(results) {
            round.push(t);
        }
    }
    by_round
}
