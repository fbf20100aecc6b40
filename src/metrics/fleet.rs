//! The fleet-wide admission queue's families (cluster mode: `crate::cluster`,
//! `crate::admission::fleet`), per pool that queues, from its `PoolSlot::fleet` view.

use std::sync::atomic::Ordering;

use super::text::*;
use crate::balancer::Balancer;
use crate::shm::clock;
use crate::shm::layout::{FleetView, PoolSlot};

/// One figure of the fleet's queue, from the pool's slot at `now`.
type FleetFigure = fn(&PoolSlot, u64) -> u64;

/// The pool's view of the fleet's queue while it is valid (Acquire pairs with the sync
/// thread's Release store of `until_ms`).
fn fresh(ps: &PoolSlot, now: u64) -> Option<&FleetView> {
    (now < ps.fleet.until_ms.load(Ordering::Acquire)).then_some(&ps.fleet)
}

/// The fleet-wide admission queue of each pool that queues (cluster mode:
/// `crate::cluster::queue`, `PoolSlot::fleet`).
pub(super) fn write_fleet_queue(out: &mut String, b: &Balancer) {
    let Ok(topo) = b.topology() else { return };
    let now = clock::now_ms();
    let region = b.region();
    let pools: Vec<(String, &PoolSlot)> = topo
        .pools
        .iter()
        .filter(|p| {
            region
                .queue_pool(p.slot)
                .is_some_and(|q| q.enabled.load(Ordering::Relaxed) != 0)
        })
        .filter_map(|p| Some((labels(&[("pool", &p.name)]), region.pool(p.slot)?)))
        .collect();
    let figures: [(&str, Kind, &str, FleetFigure); 3] = [
        (
            "rsbalancer_cluster_queue_waiting",
            Kind::Gauge,
            "Requests waiting in the fleet's admission queue of the pool, all gateways (this gateway's own when it has no fresh view of the fleet).",
            |ps, now| match fresh(ps, now) {
                Some(v) => v.waiting.load(Ordering::Relaxed).into(),
                None => ps.queue_len.load(Ordering::Relaxed).into(),
            },
        ),
        (
            "rsbalancer_cluster_queue_elsewhere",
            Kind::Gauge,
            "Of them, requests waiting at other gateways (0 without a fresh view).",
            |ps, now| fresh(ps, now).map_or(0, |v| v.elsewhere.load(Ordering::Relaxed).into()),
        ),
        (
            "rsbalancer_cluster_queue_holds_total",
            Kind::Counter,
            "Slots freed here and kept free because a higher priority waited at another gateway.",
            |ps, _| ps.fleet.holds.load(Ordering::Relaxed),
        ),
    ];
    for (name, kind, help, f) in figures {
        family(out, name, kind, help);
        for (l, ps) in &pools {
            sample(out, name, l, "", f(ps, now));
        }
    }
}
