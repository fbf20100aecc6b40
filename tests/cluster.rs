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

/// Budgets and headroom (`cluster::budgets`) through the script in a real Redis:
/// each gateway's reservations count at the others, and headroom records merge by
/// the lower remaining while they run.
#[test]
fn budgets_and_headroom_records_reach_every_gateway() {
    use rsbalancer::balancer::Left;
    use rsbalancer::{fleet, headroom, shm::clock};
    let redis = Redis::start();
    let cfg = |g: &str| {
        Config::from_value(json!({
            "shm": { "max_nodes": 16, "max_pools": 2, "max_workers": 4, "config_bytes": 65536 },
            "cluster": { "redis": format!("redis://127.0.0.1:{}", redis.port), "sync_ms": 50, "gateway": g },
            "pools": { "llm": { "nodes": [
                { "id": "a", "addr": "127.0.0.1:9001", "tpm": 10000, "rpm": 100 },
                { "id": "b", "addr": "127.0.0.1:9002" }
            ] } }
        }))
        .expect("valid config")
    };
    let gws: Vec<Gateway> = ["A", "B", "C"].iter().map(|g| Gateway::start(&cfg(g))).collect();
    fn node<'a>(g: &'a Gateway, id: &str) -> &'a rsbalancer::shm::layout::NodeSlot {
        g.b.region().node(g.slot(id)).unwrap()
    }
    // Reservations: 5 at A (100 tokens each), 2 at B.
    for (g, k) in [(&gws[0], 5), (&gws[1], 2)] {
        for _ in 0..k {
            assert!(headroom::take_share(node(g, "a"), 100, clock::now_ms()));
        }
    }
    let remote = |g: &Gateway| fleet::remote_budget(node(g, "a"), clock::now_ms());
    wait_for("the others' windows at every gateway", || {
        remote(&gws[0]) == (200, 2) && remote(&gws[1]) == (500, 5) && remote(&gws[2]) == (700, 7)
    });
    // Headroom: A learns 5 requests left for 30 s, C then 3: every gateway keeps 3.
    let left = |n: u64| {
        Some(Left {
            remaining: n,
            reset_ms: 30_000,
        })
    };
    let said = |g: &Gateway| g.b.node_stats(g.slot("b")).unwrap().headroom.remaining_requests;
    gws[0].b.note_headroom(gws[0].slot("b"), left(5), None).unwrap();
    wait_for("A's record at B and C", || {
        said(&gws[1]) == Some(5) && said(&gws[2]) == Some(5)
    });
    gws[2].b.note_headroom(gws[2].slot("b"), left(3), None).unwrap();
    wait_for("C's lower record everywhere", || {
        gws.iter().all(|g| said(g) == Some(3))
    });
    // A later snapshot saying more gives nothing back before the reset.
    gws[1].b.note_headroom(gws[1].slot("b"), left(50), None).unwrap();
    let seen = gws[0].synced();
    wait_for("a few rounds", || gws[0].synced() > seen + 3);
    assert!(gws.iter().all(|g| said(g) == Some(3)));
    // The record in Redis, merged by the script (not only by each gateway's words).
    let mut conn = ::redis::Client::open(format!("redis://127.0.0.1:{}", redis.port))
        .unwrap()
        .get_connection()
        .unwrap();
    let rec: String = ::redis::cmd("HGET")
        .arg("rsb:hr")
        .arg("llm/b|r")
        .query(&mut conn)
        .unwrap();
    assert!(rec.starts_with("3 "), "{rec}");
    let bud: std::collections::HashMap<String, String> = ::redis::cmd("HGETALL")
        .arg("rsb:bud:llm/a")
        .query(&mut conn)
        .unwrap();
    assert_eq!(bud.len(), 3, "one field per gateway: {bud:?}");
    assert!(bud["A"].ends_with(" 500 5"), "{bud:?}");
    // A record already in Redis (another gateway's, written there directly) and a
    // higher one published by A: the script keeps the lower, which A then takes in.
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let _: () = ::redis::cmd("HSET")
        .arg("rsb:hr")
        .arg("llm/a|t")
        .arg(format!("7000 {}", unix + 60_000))
        .query(&mut conn)
        .unwrap();
    gws[0]
        .b
        .note_headroom(
            gws[0].slot("a"),
            None,
            Some(Left {
                remaining: 9_000,
                reset_ms: 30_000,
            }),
        )
        .unwrap();
    let tokens = |g: &Gateway| g.b.node_stats(g.slot("a")).unwrap().headroom.remaining_tokens;
    wait_for("the lower record at A", || tokens(&gws[0]) == Some(7_000));
    let ttl: i64 = ::redis::cmd("PTTL")
        .arg("rsb:bud:llm/a")
        .query(&mut conn)
        .unwrap();
    assert!(ttl > 0, "the budget hash expires: {ttl}");
    // Nothing said of a: no record for it.
    assert_eq!(
        gws[1]
            .b
            .node_stats(gws[1].slot("a"))
            .unwrap()
            .headroom
            .remaining_requests,
        None
    );
}
