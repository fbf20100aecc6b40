//! Admission through the balancer over a real shared region, without nginx: emergency
//! shedding, queueing off / on, and (with real forks) kill -9 of a process that holds
//! admissions and queue entries while another process keeps its own.

use std::sync::atomic::Ordering;

use rsbalancer::admission::Verdict;
use rsbalancer::balancer::Balancer;
use rsbalancer::limit::LIMIT_ONE;
use rsbalancer::shm::layout::emergency;
use rsbalancer::shm::process::{fork_child, Signal};
use serde_json::json;

mod common;
use common::{config, expect_signal, park};

/// One node "a" with a learned limit of `limit` (as if it had refused the next one),
/// admission as given.
fn balancer(limit: u64, admission: serde_json::Value) -> (Balancer, u32) {
    let b = Balancer::create(&config(
        json!({ "slow_start_ms": 0, "admission": admission }),
        &["a"],
    ))
    .unwrap();
    let pool = b.pool_index("p").unwrap();
    let node = b.node_index("p", "a").unwrap();
    b.region()
        .node(node)
        .unwrap()
        .limit
        .store(limit * LIMIT_ONE, Ordering::Relaxed);
    b.region()
        .served(node)
        .unwrap()
        .store(limit as u32, Ordering::Relaxed);
    (b, pool)
}

fn queueing() -> serde_json::Value {
    json!({ "enabled": true, "classes": [ { "min_priority": 1, "max_wait_ms": 60000, "max_queue": 16 } ] })
}

#[test]
fn emergency_sheds_below_the_configured_priority() {
    let (b, pool) = balancer(4, queueing());
    let ps = b.region().pool(pool).unwrap();
    ps.shed_below.store(5, Ordering::Relaxed);
    assert_eq!(
        rsbalancer::admission::admit(&b, pool, 3).unwrap().0,
        Verdict::Go,
        "not in emergency: nobody is shed"
    );
    rsbalancer::admission::admit_release(&b, pool).unwrap();
    ps.emergency.store(emergency::ACTIVE, Ordering::Release);
    let (v, _, retry_ms) = rsbalancer::admission::admit(&b, pool, 4).unwrap();
    assert_eq!(v, Verdict::Shed);
    assert!(
        retry_ms >= 1000 && retry_ms % 1000 == 0,
        "Retry-After in whole seconds: {retry_ms}"
    );
    assert_eq!(
        rsbalancer::admission::admit(&b, pool, 5).unwrap().0,
        Verdict::Go,
        "5 is not below shed_below 5"
    );
    assert_eq!(ps.shed_total.load(Ordering::Relaxed), 1);
    let t = rsbalancer::tally::pool_window(b.region(), pool, rsbalancer::shm::clock::now_ms());
    assert_eq!(t.shed, 1);
    // Shedding applies with queueing off too.
    let (b2, pool2) = balancer(4, json!({ "enabled": false }));
    let ps2 = b2.region().pool(pool2).unwrap();
    ps2.shed_below.store(5, Ordering::Relaxed);
    ps2.emergency.store(emergency::ACTIVE, Ordering::Release);
    assert_eq!(
        rsbalancer::admission::admit(&b2, pool2, 1).unwrap().0,
        Verdict::Shed
    );
    assert_eq!(
        rsbalancer::admission::admit(&b2, pool2, 9).unwrap().0,
        Verdict::Pass
    );
}

#[test]
fn queueing_off_answers_at_once_as_before() {
    let (b, pool) = balancer(1, json!({ "enabled": false }));
    assert_eq!(
        rsbalancer::admission::admit(&b, pool, 5).unwrap().0,
        Verdict::Pass
    );
    let node = b.pick(pool, b"", &[]).unwrap();
    // The node is at its limit: no queue, refuse at once with a wait.
    let (v, _, ms) = rsbalancer::admission::admit(&b, pool, 5).unwrap();
    assert_eq!((v, ms), (Verdict::NoNode, 1000));
    b.report(node, 200, 1000, 0).unwrap();
    assert_eq!(
        rsbalancer::admission::admission_state(&b, pool).unwrap(),
        (0, 0),
        "nothing counted"
    );
    assert!(
        rsbalancer::admission::admit(&b, pool, 0).is_err()
            && rsbalancer::admission::admit(&b, pool, 11).is_err(),
        "priority 1..=10"
    );
}

#[test]
fn no_node_at_all_is_answered_at_once_even_with_queueing() {
    let (b, pool) = balancer(1, queueing());
    let node = b.node_index("p", "a").unwrap();
    let until = rsbalancer::shm::clock::now_ms() + 30_000;
    b.region()
        .node(node)
        .unwrap()
        .cooldown_until_ms
        .store(until, Ordering::Relaxed);
    let (v, _, ms) = rsbalancer::admission::admit(&b, pool, 9).unwrap();
    assert_eq!(v, Verdict::NoNode);
    assert!(
        (29_000..=30_000).contains(&ms),
        "wait until the cooldown ends: {ms}"
    );
}

#[test]
fn queued_request_goes_when_a_slot_is_released() {
    let (b, pool) = balancer(1, queueing());
    assert_eq!(rsbalancer::admission::admit(&b, pool, 5).unwrap().0, Verdict::Go);
    let (v, entry, ticket) = rsbalancer::admission::admit(&b, pool, 5).unwrap();
    assert_eq!(v, Verdict::Queued);
    assert_eq!(
        rsbalancer::admission::admit_poll(&b, pool, entry, ticket)
            .unwrap()
            .0,
        Verdict::Wait
    );
    rsbalancer::admission::admit_release(&b, pool).unwrap();
    assert_eq!(
        rsbalancer::admission::admit_poll(&b, pool, entry, ticket)
            .unwrap()
            .0,
        Verdict::Go
    );
    assert_eq!(rsbalancer::admission::admission_state(&b, pool).unwrap(), (1, 0));
    rsbalancer::admission::admit_release(&b, pool).unwrap();
    assert_eq!(rsbalancer::admission::admission_state(&b, pool).unwrap(), (0, 0));
}

/// A process holding 2 admissions and 3 queue entries is killed with SIGKILL while
/// another keeps 1 admission: reaping gives back exactly the dead one's.
#[test]
fn killed_process_admissions_and_entries_are_reclaimed() {
    let (b, pool) = balancer(3, queueing());
    let ready = Signal::new().unwrap();
    let (ready_b, go_b) = (Signal::new().unwrap(), Signal::new().unwrap());
    let mut survivor = fork_child(|| {
        b.attach_worker(2).unwrap();
        assert_eq!(rsbalancer::admission::admit(&b, pool, 5).unwrap().0, Verdict::Go);
        ready_b.send(1).unwrap();
        // Keep the admission until told, then release it.
        assert_eq!(go_b.recv(common::HANDSHAKE).unwrap(), Some(1));
        rsbalancer::admission::admit_release(&b, pool).unwrap();
        0
    })
    .unwrap();
    expect_signal(&ready_b, &mut survivor, "survivor admitted");
    let mut victim = fork_child(|| {
        b.attach_worker(1).unwrap();
        assert_eq!(rsbalancer::admission::admit(&b, pool, 5).unwrap().0, Verdict::Go);
        assert_eq!(rsbalancer::admission::admit(&b, pool, 5).unwrap().0, Verdict::Go);
        for _ in 0..3 {
            assert_eq!(
                rsbalancer::admission::admit(&b, pool, 7).unwrap().0,
                Verdict::Queued
            );
        }
        ready.send(1).unwrap();
        park()
    })
    .unwrap();
    expect_signal(&ready, &mut victim, "victim admitted and queued");
    assert_eq!(rsbalancer::admission::admission_state(&b, pool).unwrap(), (3, 3));
    victim.kill(libc::SIGKILL).unwrap();
    assert_eq!(victim.wait().unwrap(), 128 + libc::SIGKILL);
    // What nginx does when it starts the replacement worker.
    assert_eq!(b.region().reap_dead_workers(), 1);
    assert_eq!(
        rsbalancer::admission::admission_state(&b, pool).unwrap(),
        (1, 0),
        "only the survivor's admission left"
    );
    // The freed slots serve at once.
    assert_eq!(rsbalancer::admission::admit(&b, pool, 5).unwrap().0, Verdict::Go);
    assert_eq!(rsbalancer::admission::admit(&b, pool, 5).unwrap().0, Verdict::Go);
    assert_eq!(
        rsbalancer::admission::admit(&b, pool, 5).unwrap().0,
        Verdict::Queued
    );
    go_b.send(1).unwrap();
    assert_eq!(survivor.wait().unwrap(), 0);
}

/// A request admitted before a reload removed its pool still gives its slot back, so
/// a pool given that slot later does not start with phantom admissions.
#[test]
fn admission_of_a_removed_pool_is_released() {
    let (b, pool) = balancer(2, queueing());
    assert_eq!(rsbalancer::admission::admit(&b, pool, 5).unwrap().0, Verdict::Go);
    let other = rsbalancer::config::Config::from_value(json!({
        "shm": common::shm(),
        "pools": { "q": { "nodes": common::node_list(&[("x", false)]) } }
    }))
    .unwrap();
    b.configure(&other).unwrap();
    assert!(b.pool_index("p").is_err(), "the pool is gone");
    assert_eq!(b.pool_index("q").unwrap(), pool, "its slot went to the new pool");
    rsbalancer::admission::admit_release(&b, pool).unwrap();
    let q = rsbalancer::admission::Queue::of(b.region(), pool).unwrap();
    assert_eq!(q.qp.admitted.load(Ordering::Relaxed), 0);
}

/// In emergency, the backup pool's capacity counts for admission: the balancer sends
/// it the tries the pool's own nodes cannot take, so requests go on rather than wait.
#[test]
fn emergency_backup_pool_adds_its_capacity() {
    let cfg = rsbalancer::config::Config::from_value(json!({ "shm": common::shm(), "pools": {
        "p": { "slow_start_ms": 0, "admission": queueing(),
               "emergency": { "backup_pool": "spare" },
               "nodes": [{ "id": "a", "addr": "127.0.0.1:9001" }] },
        "spare": { "slow_start_ms": 0, "nodes": [{ "id": "s", "addr": "127.0.0.1:9002" }] } } }))
    .unwrap();
    let b = Balancer::create(&cfg).unwrap();
    let pool = b.pool_index("p").unwrap();
    for (p, id) in [("p", "a"), ("spare", "s")] {
        let n = b.node_index(p, id).unwrap();
        b.region()
            .node(n)
            .unwrap()
            .limit
            .store(LIMIT_ONE, Ordering::Relaxed);
        b.region().served(n).unwrap().store(1, Ordering::Relaxed);
    }
    assert_eq!(rsbalancer::admission::admit(&b, pool, 5).unwrap().0, Verdict::Go);
    let (v, entry, ticket) = rsbalancer::admission::admit(&b, pool, 5).unwrap();
    assert_eq!(v, Verdict::Queued, "outside emergency only a's one slot counts");
    b.region()
        .pool(pool)
        .unwrap()
        .emergency
        .store(emergency::ACTIVE, Ordering::Release);
    assert_eq!(
        rsbalancer::admission::admit_poll(&b, pool, entry, ticket)
            .unwrap()
            .0,
        Verdict::Go,
        "in emergency the spare pool's slot counts too"
    );
    assert_eq!(rsbalancer::admission::admission_state(&b, pool).unwrap(), (2, 0));
}
