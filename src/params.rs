//! A pool's configuration written into its shared slot, where the per-request paths
//! read it without any worker's tables: the report path's policy (peak EWMA, learned
//! limits, cooldowns, ejection, retry budget), the admission queue's class table, the
//! canary split and ramp, and emergency shedding with its backup pool.
//!
//! One module owns every such store, called by the pool's configure under the shared
//! lock ([`store_pool`]); the policies (`crate::admission`, `crate::canary`,
//! `crate::emergency`) read what it wrote. A config value reaches its slot word here
//! and nowhere else.

use std::sync::atomic::{AtomicU32, Ordering};

use crate::config::{AdmissionConfig, CanaryConfig};
use crate::shm::layout::{PoolSlot, QueuePool, PRIORITIES};
use crate::shm::Region;
use crate::topology::{PoolTopo, Topology};

/// Write pool `p` of the new topology `new` into its slots; `old` is the topology
/// being replaced (a canary block that did not change keeps its live share and ramp).
pub fn store_pool(region: &Region, old: &Topology, new: &Topology, p: &PoolTopo, now: u64) {
    let ps = region.pool(p.slot).expect("topology slot in range");
    store_policy(ps, p);
    let canary_slot = p
        .policy
        .canary
        .as_ref()
        .and_then(|c| new.pool(&c.pool))
        .map(|c| c.slot);
    store_canary(ps, old.pool(&p.name), p, canary_slot, now);
    if let Some(qp) = region.queue_pool(p.slot) {
        store_admission(qp, &p.policy.admission);
    }
    store_emergency(ps, p, &|name| new.pool(name).map(|q| q.slot));
}

/// Copy a pool's policy into its shared slot, where the report path reads it.
fn store_policy(ps: &PoolSlot, p: &PoolTopo) {
    let set = |cell: &AtomicU32, v: u32| cell.store(v, Ordering::Relaxed);
    set(&ps.decay_ms, p.policy.ewma.decay_ms);
    set(&ps.penalty_ms, p.policy.ewma.penalty_ms);
    set(&ps.penalty_cap_ms, p.policy.ewma.penalty_cap_ms);
    set(&ps.limit_enabled, p.policy.limit.enabled as u32);
    set(&ps.limit_min, p.policy.limit.min);
    set(&ps.limit_max, p.policy.limit.max);
    set(&ps.limit_increase_every, p.policy.limit.increase_every);
    set(&ps.quota_retry_after_ms, p.policy.cooldown.quota_retry_after_ms);
    set(&ps.quota_after, p.policy.cooldown.quota_after);
    set(&ps.cooldown_base_ms, p.policy.cooldown.base_ms);
    set(&ps.cooldown_max_ms, p.policy.cooldown.max_ms);
    set(&ps.honor_retry_after, p.policy.cooldown.honor_retry_after as u32);
    set(&ps.max_retry_after_ms, p.policy.cooldown.max_retry_after_ms);
    set(&ps.eject_after, p.policy.outlier.consecutive_failures);
    set(&ps.eject_base_ms, p.policy.outlier.base_ms);
    set(&ps.eject_max_ms, p.policy.outlier.max_ms);
    set(&ps.eject_max_percent, p.policy.outlier.max_ejected_percent);
    set(&ps.budget_ratio, (p.policy.retry.budget_ratio as f32).to_bits());
    set(&ps.budget_min_per_s, p.policy.retry.min_per_s);
    set(&ps.budget_window_ms, p.policy.retry.window_ms);
    set(&ps.slow_start_ms, p.policy.slow_start_ms);
    set(&ps.default_rtt_ms, p.policy.ewma.default_rtt_ms);
    set(&ps.window_ms, p.policy.window_ms);
}

/// Copy a pool's admission parameters into its shared slot (configure, lock held).
pub fn store_admission(qp: &QueuePool, cfg: &AdmissionConfig) {
    let set = |cell: &AtomicU32, v: u32| cell.store(v, Ordering::Relaxed);
    set(&qp.aging_ms, cfg.aging_ms);
    set(&qp.max_queue, cfg.max_queue);
    for p in 1..=PRIORITIES as u32 {
        let c = cfg.class_of(p);
        let i = p as usize - 1;
        set(&qp.class_of[i], c as u32);
        set(&qp.max_wait_ms[i], cfg.classes[c].max_wait_ms);
    }
    for (i, cell) in qp.class_max_queue.iter().enumerate() {
        set(cell, cfg.classes.get(i).map_or(0, |c| c.max_queue));
    }
    // Release pairs with the Acquire in `admission::admit`: the parameters above are
    // visible to whoever sees queueing on.
    qp.enabled.store(cfg.enabled as u32, Ordering::Release);
}

// ------------------------------------------------------------------------------------
// The queue

/// Shares are kept in parts per 10,000.
pub const PARTS: u32 = crate::abi::Share::Parts as u32;

/// A share (0.0..=1.0) in parts per 10,000.
pub fn parts(share: f64) -> u32 {
    (share.clamp(0.0, 1.0) * PARTS as f64).round() as u32
}

/// The ramp word: the next step's time (ms) and the share the ramp set last.
pub fn pack_ramp(next_ms: u64, share: u32) -> u64 {
    (next_ms << 16) | share as u64 & 0xffff
}

/// Inverse of [`pack_ramp`].
pub fn unpack_ramp(word: u64) -> (u64, u32) {
    (word >> 16, (word & 0xffff) as u32)
}

/// The ramp word a canary block starts with (0: no ramp, or nothing left to ramp).
pub fn initial_ramp(c: &CanaryConfig, now_ms: u64) -> u64 {
    match &c.ramp {
        Some(r) if parts(c.share) < parts(r.max) => {
            pack_ramp(now_ms + r.every_s as u64 * 1000, parts(c.share))
        }
        _ => 0,
    }
}

/// Write a pool's canary fields for a new configuration (`configure`, lock held):
/// `old` is the pool as it was (None: a new pool), `canary_slot` the canary pool's
/// slot in the new topology.
fn store_canary(ps: &PoolSlot, old: Option<&PoolTopo>, new: &PoolTopo, canary_slot: Option<u32>, now: u64) {
    let relaxed = Ordering::Relaxed;
    if old.is_none() {
        // A new pool, maybe in a slot another pool left.
        ps.canary_rollbacks_total.store(0, relaxed);
    }
    let Some((c, slot)) = new.policy.canary.as_ref().zip(canary_slot) else {
        ps.canary_pool.store(0, relaxed);
        ps.canary_share.store(0, relaxed);
        ps.canary_rolled_back.store(0, relaxed);
        ps.canary_ramp.store(0, relaxed);
        ps.canary_since_ms.store(0, relaxed);
        return;
    };
    ps.canary_pool.store(slot + 1, relaxed);
    if old.and_then(|o| o.policy.canary.as_ref()) == Some(c) {
        return; // unchanged: keep the live share, rollback state and ramp progress
    }
    ps.canary_share.store(parts(c.share), relaxed);
    ps.canary_rolled_back.store(0, relaxed);
    ps.canary_ramp.store(initial_ramp(c, now), relaxed);
    ps.canary_since_ms.store(now, relaxed);
}

/// Store a pool's shedding threshold and backup pool in its slot (configure, lock
/// held). `slot_of` maps pool names to slots of the new topology.
fn store_emergency(ps: &PoolSlot, p: &PoolTopo, slot_of: &dyn Fn(&str) -> Option<u32>) {
    let e = p.policy.emergency.as_ref();
    ps.shed_below
        .store(e.map_or(1, |e| e.shed_below), Ordering::Relaxed);
    let backup = e
        .and_then(|e| e.backup_pool.as_deref())
        .and_then(slot_of)
        .map_or(0, |s| s + 1);
    ps.backup_pool.store(backup, Ordering::Relaxed);
}
