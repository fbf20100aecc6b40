//! Helpers shared by the integration tests that run without nginx (`balancer`,
//! `processes`, `policy`): config builders, a pick of one chosen node, and the
//! handshakes with forked children.
//!
//! Each test crate uses only some of them.
#![allow(dead_code)]

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
