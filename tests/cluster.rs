//! Cluster mode (`rsbalancer::cluster`) against a real `redis-server`, started here:
//! several gateways, each a balancer with a shared region of its own and the sync
//! thread the lease holder runs, share cooldowns and admin changes; a gateway that
//! starts takes the fleet's state; Redis going away fails nothing and is merged
//! with when it returns. (tests/nginx_cluster.rs runs the same with nginx gateways.)
//!
//! No assertion is on elapsed time: each waits for a state, giving up after a
//! generous bound only when something is broken.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rsbalancer::balancer::{Balancer, EmergencyMode};
use rsbalancer::cluster::Running;
use rsbalancer::config::Config;
use rsbalancer::emergency::set_emergency_mode;
use serde_json::json;

mod support;
use support::redis::{Redis, Sentinel};

/// Generous: reached only when something is broken.
const PATIENCE: Duration = Duration::from_secs(20);

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < PATIENCE, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn config(port: u16, gateway: &str, weights: [u32; 3]) -> Config {
    Config::from_value(json!({
        "shm": { "max_nodes": 16, "max_pools": 2, "max_workers": 4, "config_bytes": 65536 },
        "cluster": { "redis": format!("redis://127.0.0.1:{port}"), "sync_ms": 50, "gateway": gateway },
        "pools": { "llm": { "nodes": [
            { "id": "a", "addr": "127.0.0.1:9001", "weight": weights[0] },
            { "id": "b", "addr": "127.0.0.1:9002", "weight": weights[1] },
            { "id": "c", "addr": "127.0.0.1:9003", "weight": weights[2] }
        ] } }
    }))
    .expect("valid config")
}

/// One gateway: its region, its sync thread, and a lease renewer standing in for the
/// nginx timer that renews the lease (`bal:cluster_tick()`).
struct Gateway {
    b: Arc<Balancer>,
    _sync: Running,
    stop: Arc<AtomicBool>,
}

impl Gateway {
    fn start(cfg: &Config) -> Gateway {
        let b = Arc::new(Balancer::create(cfg).unwrap());
        let ttl = u64::from(cfg.cluster.as_ref().unwrap().sync_ms) * 3;
        assert!(b.cluster_lease(ttl));
        let stop = Arc::new(AtomicBool::new(false));
        let (b2, s2) = (b.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s2.load(Ordering::Relaxed) {
                b2.cluster_lease(ttl);
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let sync = Running::start(b.clone(), cfg.cluster.clone().unwrap()).unwrap();
        Gateway { b, _sync: sync, stop }
    }

    fn slot(&self, id: &str) -> u32 {
        self.b.node_index("llm", id).unwrap()
    }

    fn weight(&self, id: &str) -> u32 {
        self.b.node_stats(self.slot(id)).unwrap().weight
    }

    fn cooling(&self, id: &str) -> bool {
        self.b
            .cooling()
            .unwrap()
            .iter()
            .any(|(p, n, _)| p == "llm" && n == id)
    }

    fn synced(&self) -> u64 {
        self.b.cluster_stats().syncs
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A quota 429 (Retry-After 30 s) answered to gateway A's try.
fn quota_429(g: &Gateway, id: &str) {
    let pool = g.b.pool_index("llm").unwrap();
    let all: Vec<u32> = ["a", "b", "c"].iter().map(|n| g.slot(n)).collect();
    let others: Vec<u32> = all.iter().copied().filter(|&s| s != g.slot(id)).collect();
    let node = g.b.pick(pool, b"", &others).unwrap();
    assert_eq!(node, g.slot(id));
    g.b.report(node, 429, 5_000, 30_000).unwrap();
    assert!(
        g.cooling(id),
        "a 429 with Retry-After 30 s cools the node at the gateway that saw it"
    );
}

#[test]
fn cooldowns_and_weights_reach_every_gateway() {
    let redis = Redis::start();
    let a = Gateway::start(&config(redis.port, "A", [30, 50, 20]));
    let b = Gateway::start(&config(redis.port, "B", [30, 50, 20]));
    let c = Gateway::start(&config(redis.port, "C", [30, 50, 20]));
    wait_for("three gateways in the fleet", || {
        [&a, &b, &c]
            .iter()
            .all(|g| g.b.cluster_stats().up && g.b.cluster_stats().gateways == 3)
    });
    assert!(!b.cooling("b") && !c.cooling("b"));

    quota_429(&a, "b");
    wait_for("A's cooldown of b at B and C", || {
        b.cooling("b") && c.cooling("b")
    });
    // B and C took it from the fleet; they never tried b.
    assert!(b.b.cluster_stats().cooldowns_in >= 1 && c.b.cluster_stats().cooldowns_in >= 1);
    let pool = b.b.pool_index("llm").unwrap();
    for _ in 0..50 {
        let n = b.b.pick(pool, b"", &[]).unwrap();
        assert_ne!(n, b.slot("b"), "B picked the node A saw cooling");
        b.b.report(n, 200, 1_000, 0).unwrap();
    }
    // A cooldown is never shortened by the fleet: C's own longer one stays.
    let until = |g: &Gateway| {
        g.b.cooling()
            .unwrap()
            .into_iter()
            .find(|(_, n, _)| n == "b")
            .unwrap()
            .2
    };
    let before = until(&c);
    let s = c.synced();
    wait_for("two more rounds at C", || c.synced() >= s + 2);
    assert!(until(&c) >= before);

    // An operator's weight at A is used by B and C.
    a.b.set_weight(a.slot("c"), 77).unwrap();
    a.b.set_draining(a.slot("a"), true).unwrap();
    wait_for("A's weight and drain at B and C", || {
        b.weight("c") == 77 && c.weight("c") == 77 && b.b.node_stats(b.slot("a")).unwrap().draining
    });

    // Emergency mode forced at A is forced at B and C; handed back to the detector too.
    let mode =
        |g: &Gateway| rsbalancer::status::of(&g.b).unwrap()["pools"]["llm"]["emergency"]["mode"].clone();
    let pool = a.b.pool_index("llm").unwrap();
    set_emergency_mode(&a.b, pool, EmergencyMode::On).unwrap();
    wait_for("A's forced emergency at B and C", || {
        mode(&b) == "on" && mode(&c) == "on"
    });
    set_emergency_mode(&a.b, pool, EmergencyMode::Auto).unwrap();
    wait_for("the detector back in charge at B and C", || {
        mode(&b) == "auto" && mode(&c) == "auto"
    });
}

#[test]
fn a_starting_gateway_takes_the_fleets_state_unless_its_file_changed() {
    let redis = Redis::start();
    let a = Gateway::start(&config(redis.port, "A", [30, 50, 20]));
    wait_for("A's first round", || a.synced() >= 1);
    a.b.set_weight(a.slot("a"), 5).unwrap();
    let s = a.synced();
    wait_for("A's change written", || a.synced() >= s + 2);

    // C (re)starts from the same file: the fleet's state wins over the file's.
    let c = Gateway::start(&config(redis.port, "C", [30, 50, 20]));
    wait_for("C takes the fleet's weight", || c.weight("a") == 5);
    drop(c);

    // D starts from a changed file: the file wins, and the fleet follows it.
    let d = Gateway::start(&config(redis.port, "D", [40, 50, 20]));
    wait_for("D's first round", || d.synced() >= 2);
    assert_eq!(d.weight("a"), 40);
    wait_for("A follows D's new file", || a.weight("a") == 40);
}

#[test]
fn redis_down_fails_nothing_and_state_is_merged_when_it_returns() {
    let mut redis = Redis::start();
    let a = Gateway::start(&config(redis.port, "A", [30, 50, 20]));
    let b = Gateway::start(&config(redis.port, "B", [30, 50, 20]));
    wait_for("both up", || {
        a.b.cluster_stats().up && b.b.cluster_stats().up && b.synced() >= 2
    });

    redis.kill();
    wait_for("both see Redis down", || {
        !a.b.cluster_stats().up && !b.b.cluster_stats().up
    });
    // Requests go on from shared memory.
    let pool = a.b.pool_index("llm").unwrap();
    for _ in 0..100 {
        let n = a.b.pick(pool, b"", &[]).unwrap();
        a.b.report(n, 200, 1_000, 0).unwrap();
    }
    // What A learns meanwhile reaches B once Redis is back.
    a.b.set_weight(a.slot("b"), 9).unwrap();
    quota_429(&a, "c");

    redis.restart();
    wait_for("both up again", || {
        a.b.cluster_stats().up && b.b.cluster_stats().up
    });
    wait_for("A's weight and cooldown at B", || {
        b.weight("b") == 9 && b.cooling("c")
    });
}

#[test]
fn through_a_sentinel() {
    let redis = Redis::start();
    let sentinel = Sentinel::start(&redis);
    let mut cfg = config(redis.port, "A", [30, 50, 20]);
    let c = cfg.cluster.as_mut().unwrap();
    c.redis = None;
    c.sentinels = vec![format!("127.0.0.1:{}", sentinel.port)];
    c.master = Some("mymaster".into());
    let a = Gateway::start(&cfg);
    // B talks to the master directly: the same data.
    let b = Gateway::start(&config(redis.port, "B", [30, 50, 20]));
    wait_for("A up through the sentinel", || {
        a.b.cluster_stats().up && a.synced() >= 2
    });
    a.b.set_weight(a.slot("b"), 61).unwrap();
    wait_for("A's weight, written through the sentinel's master, at B", || {
        b.weight("b") == 61
    });
}
