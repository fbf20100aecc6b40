//! One node's state in its shared slot: the one owner of the questions every layer
//! asks about a node.
//!
//! - "May a new try start on it now?" ([`available`]): not cooling (a quota 429),
//!   not ejected (consecutive failures), not down (active health checks), not drained
//!   by an operator, and under its learned concurrency limit.
//! - "Is it out for now, whatever its load?" ([`taken_out`]): what capacity counts.
//! - "When is it back?" ([`back_in_ms`]): the soonest moment a node out for a known
//!   time (cooling, ejected, at its limit) may take a try.
//! - "What state is it in?" ([`state`]), for status pages and metrics.
//! - The highest concurrency it answered a success at ([`note_served`],
//!   [`note_refused`]): a learned limit above it is an AIMD probe, not a confirmed
//!   slot ([`confirmed_slot`]).
//!
//! Everything reads the slot's atomics (Relaxed: each is a value in itself, no other
//! memory is published through them) and takes `now` from the caller, so the pick
//! path, admission, the emergency detector and the read models agree on one answer.

use std::sync::atomic::{AtomicU32, Ordering};

use serde::Serialize;

use crate::fleet;
use crate::headroom;
use crate::limit;
use crate::load;
use crate::shm::layout::{flags, NodeSlot};
use crate::shm::Region;
use crate::tally;

/// How long (ms) a node that is only at its concurrency limit is assumed to take to
/// free a slot, when a caller needs a number.
pub const AT_LIMIT_MS: u64 = 1_000;

/// May a new try start on this node now? (Not cooling, not ejected, not down, not
/// draining, under its learned concurrency limit.)
#[inline]
pub fn available(n: &NodeSlot, now: u64) -> bool {
    available_with(n, now, fleet::cap(n, now), n.inflight.load(Ordering::Relaxed))
}

/// [`available`], asked for a request that wants a try now (a pick, the admission
/// check): a node at its cap counts the refusal as this gateway's unmet demand
/// (`fleet::under_cap`), which cluster mode's shares follow.
pub fn available_for_try(n: &NodeSlot, now: u64) -> bool {
    let (cap, inflight) = (fleet::cap(n, now), n.inflight.load(Ordering::Relaxed));
    fleet::under_cap(n, cap, inflight) && available_with(n, now, cap, inflight)
}

/// [`available`] with the node's cap ([`fleet::cap`]: its learned limit, or its fleet
/// share in cluster mode) and in-flight count already loaded.
pub fn available_with(n: &NodeSlot, now: u64, limit: u64, inflight: u32) -> bool {
    available_flags(n, n.flags.load(Ordering::Relaxed), now, limit, inflight)
}

/// [`available_with`] with the node's flags word already loaded (the pick's one load
/// of it for every question it asks).
#[inline]
pub fn available_flags(n: &NodeSlot, f: u32, now: u64, limit: u64, inflight: u32) -> bool {
    !taken_out_flags(n, f, now) && limit::under_limit(limit, inflight)
}

/// Is the node out for now (cooling, ejected, down, draining, or without provider
/// headroom or budget for any request: `crate::headroom`)? Its limit is not looked
/// at: a node at its limit still counts towards capacity.
pub fn taken_out(n: &NodeSlot, now: u64) -> bool {
    taken_out_flags(n, n.flags.load(Ordering::Relaxed), now)
}

/// [`taken_out`] with the node's flags word `f` already loaded. Inlined: every pick
/// asks it of every candidate.
#[inline(always)]
pub fn taken_out_flags(n: &NodeSlot, f: u32, now: u64) -> bool {
    now < n.cooldown_until_ms.load(Ordering::Relaxed)
        || now < n.ejected_until_ms.load(Ordering::Relaxed)
        || f & (flags::DOWN | flags::DRAINING) != 0
        || (f & headroom::FLAGS != 0 && headroom::out_for_all_until(n, f, now).is_some())
}

/// Is the node down or ejected: failing, as opposed to busy or resting?
pub fn failing(n: &NodeSlot, now: u64) -> bool {
    n.flags.load(Ordering::Relaxed) & flags::DOWN != 0 || now < n.ejected_until_ms.load(Ordering::Relaxed)
}

/// When (ms from `now`) may this node take a try again? `Some(0)` when it may now;
/// for a node cooling, ejected or out of headroom or budget, until that ends (at
/// least 1); for one only at its limit, [`AT_LIMIT_MS`]; `None` when nobody knows
/// (down, drained).
pub fn back_in_ms(n: &NodeSlot, now: u64) -> Option<u64> {
    let f = n.flags.load(Ordering::Relaxed);
    if f & (flags::DOWN | flags::DRAINING) != 0 {
        return None;
    }
    let until = n
        .cooldown_until_ms
        .load(Ordering::Relaxed)
        .max(n.ejected_until_ms.load(Ordering::Relaxed))
        .max(headroom::out_for_all_until(n, f, now).unwrap_or(0));
    if until > now {
        return Some(until - now);
    }
    if available(n, now) {
        Some(0)
    } else {
        Some(AT_LIMIT_MS)
    }
}

/// The soonest of [`back_in_ms`] over `slots`, or `default_ms` when none is known.
pub fn soonest_back_ms(
    region: &Region,
    slots: impl IntoIterator<Item = u32>,
    now: u64,
    default_ms: u64,
) -> u64 {
    slots
        .into_iter()
        .filter_map(|s| region.node(s).and_then(|n| back_in_ms(n, now)))
        .min()
        .unwrap_or(default_ms)
}

/// Has this node a *confirmed* free slot: no learned limit, or fewer tries in flight
/// than the highest concurrency it has answered a success at (`Region::served`)? A
/// learned limit above that is a probe (AIMD's additive increase): on a node that is
/// really full, the try that takes it gets a 429 and, every node being busy, no retry.
pub fn confirmed_slot(region: &Region, slot: u32, limit: u64, inflight: u32) -> bool {
    limit == 0
        || region
            .served(slot)
            .is_none_or(|c| inflight < c.load(Ordering::Relaxed))
}

/// A new node took slot `node`: it has served nothing yet.
pub fn forget_served(region: &Region, node: u32) {
    if let Some(c) = region.served(node) {
        c.store(0, Ordering::Relaxed);
    }
}

/// `node` refused (capacity 429) its `inflight`-th concurrent try: it has served at
/// most one less since (report path).
pub fn note_refused(region: &Region, node: u32, inflight: u32) {
    if let Some(c) = region.served(node) {
        let below = inflight.saturating_sub(1);
        if c.load(Ordering::Relaxed) > below {
            c.fetch_min(below, Ordering::Relaxed);
        }
    }
}

/// A try on `node` succeeded with `inflight` tries outstanding (itself included):
/// the node has served that concurrency (report path: one load, rarely a store).
/// `served` is the node's word (`Region::served`).
pub fn note_served(served: &AtomicU32, inflight: u32) {
    if inflight > served.load(Ordering::Relaxed) {
        served.fetch_max(inflight, Ordering::Relaxed);
    }
}

/// Fresh state for a slot taken by a new node (its statistics rows and served
/// concurrency included).
pub fn reset(region: &Region, slot: u32, now: u64) {
    let Some(s) = region.node(slot) else { return };
    s.inflight.store(0, Ordering::Relaxed);
    s.consecutive_failures.store(0, Ordering::Relaxed);
    s.consecutive_busy.store(0, Ordering::Relaxed);
    s.ewma.store(0, Ordering::Relaxed);
    for w in [&s.ttft, &s.tpot, &s.preamble, &s.stream_failures] {
        w.store(0, Ordering::Relaxed);
    }
    s.busy.store(0, Ordering::Relaxed);
    s.started_ms.store(now, Ordering::Relaxed);
    s.cooldown_until_ms.store(0, Ordering::Relaxed);
    s.ejected_until_ms.store(0, Ordering::Relaxed);
    s.removed_ms.store(0, Ordering::Relaxed);
    s.limit.store(0, Ordering::Relaxed);
    for c in [&s.ejections, &s.health_ok, &s.health_fail] {
        c.store(0, Ordering::Relaxed);
    }
    s.cooldowns_total.store(0, Ordering::Relaxed);
    s.ejections_total.store(0, Ordering::Relaxed);
    s.out_since_ms.store(0, Ordering::Relaxed);
    for w in &s.notices {
        w.store(0, Ordering::Relaxed);
    }
    crate::scrape::reset(s);
    s.flags.store(0, Ordering::Relaxed);
    headroom::reset(s);
    fleet::reset(s);
    tally::reset_node(region, slot);
    forget_served(region, slot);
}

/// `healthy | cooling | ejected | down | draining | slow_start`: the first that
/// applies, in that order of precedence (down over ejected over cooling ...).
pub fn state(region: &Region, n: &NodeSlot, now: u64) -> &'static str {
    let f = n.flags.load(Ordering::Relaxed);
    if f & flags::DOWN != 0 {
        "down"
    } else if now < n.ejected_until_ms.load(Ordering::Relaxed) {
        "ejected"
    } else if now < n.cooldown_until_ms.load(Ordering::Relaxed) {
        "cooling"
    } else if f & flags::DRAINING != 0 {
        "draining"
    } else if now
        < n.started_ms.load(Ordering::Relaxed)
            + region
                .pool(n.pool.load(Ordering::Relaxed))
                .map_or(0, |p| p.slow_start_ms.load(Ordering::Relaxed) as u64)
    {
        "slow_start"
    } else {
        "healthy"
    }
}

/// Live numbers of one node, read from its slot.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct NodeStats {
    pub weight: u32,
    pub inflight: u32,
    pub picks: u64,
    pub requests: u64,
    pub failures: u64,
    pub busy: u64,
    pub latency_sum_us: u64,
    /// Peak-EWMA estimate in microseconds (0 before the first sample).
    pub ewma_us: f64,
    pub backup: bool,
    pub cooldown_until_ms: u64,
    pub ejected_until_ms: u64,
    /// Learned concurrency limit (0 = none learned).
    pub limit: f64,
    /// healthy | cooling | ejected | down | draining | slow_start ([`state`])
    pub state: &'static str,
    /// Milliseconds until the node may take tries again (0 when it may).
    pub unavailable_ms: u64,
    pub cooldowns: u64,
    pub ejections: u64,
    /// Drained by an operator: no new tries, those in flight finish.
    pub draining: bool,
    /// Provider headroom and budget (`crate::headroom`).
    #[serde(flatten)]
    pub headroom: headroom::Figures,
    /// Cluster mode's shares of the fleet (`crate::fleet`).
    #[serde(flatten)]
    pub fleet: fleet::Figures,
}

/// Copy the live numbers out of node slot `slot` (which must be in range).
pub fn stats(region: &Region, slot: u32) -> NodeStats {
    stats_and_counts(region, slot).0
}

/// [`stats`], with the statistics summed over the tally rows.
pub fn stats_and_counts(region: &Region, slot: u32) -> (NodeStats, tally::NodeCounts) {
    let n = region.node(slot).expect("node slot in range");
    let counts = tally::node_counts(region, slot);
    let now = crate::shm::clock::now_ms();
    let cooldown_until_ms = n.cooldown_until_ms.load(Ordering::Relaxed);
    let ejected_until_ms = n.ejected_until_ms.load(Ordering::Relaxed);
    let f = n.flags.load(Ordering::Relaxed);
    let inflight = n.inflight.load(Ordering::Relaxed);
    let stats = NodeStats {
        limit: n.limit.load(Ordering::Relaxed) as f64 / limit::LIMIT_ONE as f64,
        state: state(region, n, now),
        unavailable_ms: cooldown_until_ms
            .max(ejected_until_ms)
            .max(headroom::out_for_all_until(n, f, now).unwrap_or(0))
            .saturating_sub(now),
        cooldowns: n.cooldowns_total.load(Ordering::Relaxed),
        ejections: n.ejections_total.load(Ordering::Relaxed),
        weight: n.weight.load(Ordering::Relaxed),
        inflight,
        picks: counts.requests() + inflight as u64,
        requests: counts.requests(),
        failures: counts.failures(),
        busy: n.busy.load(Ordering::Relaxed),
        latency_sum_us: counts.latency_sum_us,
        ewma_us: load::unpack(n.ewma.load(Ordering::Relaxed)).0 as f64,
        backup: f & flags::BACKUP != 0,
        cooldown_until_ms,
        ejected_until_ms,
        draining: f & flags::DRAINING != 0,
        headroom: headroom::figures(n, now),
        fleet: fleet::figures(n, now),
    };
    (stats, counts)
}
