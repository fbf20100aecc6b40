//! What cluster mode (`crate::cluster`) tells the request path about the rest of the
//! fleet, one word per question in the node's shared slot.
//!
//! **Concurrency shares.** Without a cluster, a node's learned concurrency limit
//! (`crate::limit`) caps this gateway's tries on it. With one, every gateway learns
//! the *fleet's* limit (its AIMD sees the fleet's tries in flight: its own plus the
//! others', [`remote_inflight`]), and the cluster sync hands each gateway a share of
//! it by demand, the shares adding up to at most the limit (`crate::cluster`'s
//! design). The share caps this gateway's tries where the learned limit capped them
//! ([`cap`]: one more load on the pick path, no lock). Each share carries until when
//! it counts: a gateway whose sync stops (Redis down, its thread gone) falls back to
//! its own learned limit once that passes, so a stale share never wedges it.
//!
//! A share of 0 (a gateway without demand, or one whose peers hold the whole limit
//! for now) lets no try through: every request the cap refuses (a pick passed over,
//! [`under_cap`]; an arrival queued or refused at admission, [`note_refused`]) is
//! demand the next round publishes, and so is every request still waiting in the
//! admission queue while the node is at its cap ([`demand`]: waiters refuse nothing
//! more, yet their gateway must go on asking); a gateway with demand asks for at least one try
//! ([`want`]), and the peers give back down to their part by demand as their tries
//! finish. So a gateway whose requests come back gets a share within about two
//! rounds, and no share of 0 lasts while it has demand and the node a try to spare.
//!
//! **Budgets.** The other gateways' part of a node's token and request window
//! ([`remote_budget`]): what the pick-time reservation counts besides this gateway's
//! own window (`crate::headroom`), until it goes stale.
//!
//! Word of [`NodeSlot::fleet`]: bits 0..32 the time it counts until (coarse
//! monotonic ms, wrapping), 32..48 the share + 1 (0: no fleet limit known),
//! 48..64 the other gateways' tries in flight.

use std::sync::atomic::Ordering;

use crate::limit::{self, LIMIT_ONE};
use crate::shm::layout::NodeSlot;

/// Largest share and remote in-flight count a word holds.
pub const SHARE_MAX: u32 = 0xfffe;

/// Whether a wrapped 32-bit deadline is still ahead of `now`.
fn ahead(until: u32, now: u64) -> bool {
    (until.wrapping_sub(now as u32) as i32) > 0
}

/// The word for a share (`None`: no fleet limit) and the others' tries in flight,
/// counting until `until` (coarse ms).
pub fn pack(share: Option<u32>, remote_inflight: u32, until: u64) -> u64 {
    let s = share.map_or(0, |s| s.min(SHARE_MAX) as u64 + 1);
    ((remote_inflight.min(0xffff) as u64) << 48) | (s << 32) | (until as u32 as u64)
}

/// (share, remote in flight) of a live word; `None` once stale or never written.
fn live(word: u64, now: u64) -> Option<(Option<u32>, u32)> {
    if word == 0 || !ahead(word as u32, now) {
        return None;
    }
    let s = ((word >> 32) & 0xffff) as u32;
    Some((s.checked_sub(1), (word >> 48) as u32))
}

/// The limit (fixed point, 0: none) that caps this gateway's tries on the node now:
/// its fleet share while one counts (at most its own learned limit; a share of 0 is
/// the smallest limit there is, which takes no try), else its own learned limit.
/// Inlined: every pick asks it of every candidate.
#[inline(always)]
pub fn cap(n: &NodeSlot, now: u64) -> u64 {
    let own = n.limit.load(Ordering::Relaxed);
    match live(n.fleet.load(Ordering::Relaxed), now) {
        Some((Some(share), _)) => {
            let s = (share as u64 * LIMIT_ONE).max(1);
            if own == 0 {
                s
            } else {
                s.min(own)
            }
        }
        _ => own,
    }
}

/// [`cap`] with the node's in-flight count: may one more try start? Counts a refusal
/// in `fleet_skips` (the unmet demand the sync publishes).
pub fn under_cap(n: &NodeSlot, cap: u64, inflight: u32) -> bool {
    if limit::under_limit(cap, inflight) {
        return true;
    }
    n.fleet_skips.fetch_add(1, Ordering::Relaxed);
    false
}

/// This gateway's demand on a node for a sync round: its tries in flight, the
/// requests the fleet cap refused since the last round (`unmet`: picks passed over,
/// arrivals queued or refused at admission), and, while the node is at its cap
/// (`cap`, as [`cap`] gives it), the requests `waiting` in its pool's admission queue
/// now. A waiter is demand for as long as it waits, not only in the round it arrived:
/// a gateway at a share of 0 whose requests all wait in its queue refuses nothing
/// more (its queue holds them), and counting them once would have it publish no
/// demand from the next round on, ask for nothing and keep its share of 0 while its
/// queue waits for a slot that never comes.
pub fn demand(inflight: u32, cap: u64, unmet: u64, waiting: u32) -> u64 {
    let queued = if limit::under_limit(cap, inflight) {
        0
    } else {
        u64::from(waiting)
    };
    (u64::from(inflight) + unmet.min(1 << 40) + queued).min(1 << 40)
}

/// The other gateways' tries in flight on the node, while the last round's word
/// counts (0 without a cluster): what the AIMD adds to this gateway's own.
pub fn remote_inflight(n: &NodeSlot, now: u64) -> u32 {
    live(n.fleet.load(Ordering::Relaxed), now).map_or(0, |(_, r)| r)
}

/// The learned limit after a capacity 429 that came with `inflight` of this
/// gateway's tries outstanding (`crate::limit::limit_after_busy`). In cluster mode
/// (the last round's word counts) the limit is the fleet's and so is the concurrency
/// the node refused: this gateway's tries plus the others' as of the last round. That
/// count may be up to a round old, so within a round a refusal lowers the limit by
/// at most a tenth of the fleet's (at least one try) below what the round said, and a
/// first limit is learned once per round: the refusals of one burst lower it once
/// (not to the floor, where repeated 429s would read as a spent quota), and the next
/// round goes on from there.
pub fn after_busy(n: &NodeSlot, now: u64, l: u64, inflight: u32, (min, max): (u32, u32)) -> u64 {
    let Some((_, remote)) = live(n.fleet.load(Ordering::Relaxed), now) else {
        return limit::limit_after_busy(l, inflight, min, max);
    };
    let est = limit::limit_after_busy(l, inflight.saturating_add(remote), min, max);
    let fleet = n.fleet_limit.load(Ordering::Relaxed);
    if l == 0 {
        return est;
    }
    if fleet == 0 {
        return l;
    }
    let lowest = fleet.saturating_sub((fleet / 10).max(LIMIT_ONE));
    est.max(lowest).min(l).max(min as u64 * LIMIT_ONE)
}

/// This gateway's share while one counts (`None`: no cluster, no fleet limit, or
/// stale).
pub fn share(n: &NodeSlot, now: u64) -> Option<u32> {
    live(n.fleet.load(Ordering::Relaxed), now).and_then(|(s, _)| s)
}

/// Store what a sync round learned: the share (`None`: no fleet limit), the others'
/// tries in flight, the fleet's limit (fixed point as `NodeSlot::limit`, 0: none) and
/// until when the share counts. The learned limit becomes the fleet's, plus what it
/// moved here since the round read it (`sent`): the next round publishes that move.
pub fn set_share(
    n: &NodeSlot,
    share: Option<u32>,
    remote_inflight: u32,
    (fleet_limit, sent): (u64, u64),
    until: u64,
) {
    // Relaxed: each word is a value of its own.
    n.fleet
        .store(pack(share, remote_inflight, until), Ordering::Relaxed);
    n.fleet_limit.store(fleet_limit, Ordering::Relaxed);
    if fleet_limit > 0 {
        let _ = n.limit.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| {
            Some((fleet_limit as i128 + l as i128 - sent as i128).max(LIMIT_ONE as i128) as u64)
        });
    }
}

/// The other gateways' budget use (tokens, requests) in the window while it counts.
pub fn remote_budget(n: &NodeSlot, now: u64) -> (u64, u64) {
    if now >= n.fleet_budget_until.load(Ordering::Relaxed) {
        return (0, 0);
    }
    let w = n.fleet_budget.load(Ordering::Relaxed);
    (w & ((1 << 40) - 1), w >> 40)
}

/// Store the other gateways' budget use, counting until `until` (coarse ms).
pub fn set_remote_budget(n: &NodeSlot, tokens: u64, requests: u64, until: u64) {
    let w = (requests.min((1 << 24) - 1) << 40) | tokens.min((1 << 40) - 1);
    n.fleet_budget.store(w, Ordering::Relaxed);
    n.fleet_budget_until.store(until, Ordering::Relaxed);
}

/// Clear a slot's fleet words (a new node took it).
pub fn reset(n: &NodeSlot) {
    for w in [
        &n.fleet,
        &n.fleet_skips,
        &n.fleet_limit,
        &n.fleet_budget,
        &n.fleet_budget_until,
    ] {
        w.store(0, Ordering::Relaxed);
    }
}

/// What the fleet words say of one node, for the read models (cluster mode only:
/// every field is absent or 0 without it).
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Figures {
    /// This gateway's share of the node's fleet-wide concurrency limit, while one
    /// counts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fleet_share: Option<u32>,
    /// The node's fleet-wide concurrency limit as of the last round (0: none known).
    #[serde(skip_serializing_if = "is_zero")]
    pub fleet_limit: f64,
    /// The other gateways' tries in flight on the node, while the last round counts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fleet_remote_inflight: Option<u32>,
    /// The other gateways' tokens and requests in the node's budget window, while
    /// they count.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fleet_budget_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fleet_budget_requests: Option<u64>,
}

fn is_zero(v: &f64) -> bool {
    *v == 0.0
}

pub fn figures(n: &NodeSlot, now: u64) -> Figures {
    let live = live(n.fleet.load(Ordering::Relaxed), now);
    let budget_live = now < n.fleet_budget_until.load(Ordering::Relaxed);
    let (t, r) = remote_budget(n, now);
    Figures {
        fleet_share: live.and_then(|(s, _)| s),
        fleet_limit: n.fleet_limit.load(Ordering::Relaxed) as f64 / LIMIT_ONE as f64,
        fleet_remote_inflight: live.map(|(_, r)| r),
        fleet_budget_tokens: budget_live.then_some(t),
        fleet_budget_requests: budget_live.then_some(r),
    }
}

/// Each gateway's share of a fleet limit of `limit` tries by its `demands` (one
/// entry per gateway, in the same order at every gateway): by demand, rounded down,
/// what rounding left going one each to the largest remainders (ties: the earlier
/// gateway); then a gateway with demand but no try takes one from the largest share
/// (while the limit lasts: with fewer tries than such gateways, the highest demands
/// get one). The shares add up to the limit when some gateway has demand, and a
/// gateway without demand gets 0.
pub fn shares(limit: u32, demands: &[u64]) -> Vec<u32> {
    let mut out = vec![0u32; demands.len()];
    let active: Vec<usize> = (0..demands.len()).filter(|&i| demands[i] > 0).collect();
    if active.is_empty() || limit == 0 {
        return out;
    }
    if (limit as usize) < active.len() {
        let mut by_demand = active;
        by_demand.sort_by(|&a, &b| demands[b].cmp(&demands[a]).then(a.cmp(&b)));
        for &i in by_demand.iter().take(limit as usize) {
            out[i] = 1;
        }
        return out;
    }
    let total: u128 = active.iter().map(|&i| demands[i] as u128).sum();
    let mut given = 0u128;
    let mut remainders = Vec::with_capacity(active.len());
    for &i in &active {
        let exact = limit as u128 * demands[i] as u128;
        out[i] = (exact / total) as u32;
        given += exact / total;
        remainders.push((exact % total, i));
    }
    remainders.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for &(_, i) in remainders.iter().take((limit as u128 - given) as usize) {
        out[i] += 1;
    }
    // The floor of one try per gateway with demand, taken from the largest share
    // (there is one above 1: the limit is at least the number of such gateways).
    for &i in &active {
        if out[i] == 0 {
            let big = (0..out.len())
                .max_by_key(|&j| (out[j], usize::MAX - j))
                .unwrap_or(i);
            out[big] -= 1;
            out[i] = 1;
        }
    }
    out
}

/// The share this gateway asks for of a fleet limit of `whole` tries: its part by
/// demand ([`shares`]) of its own demand now and the others' as the last round read
/// them (`others`: (gateway, demand)), each gateway in name order as every gateway
/// computes it. A gateway with demand asks for at least one try, whatever the split
/// says (more gateways with demand than tries): the grant (`crate::cluster`'s
/// script: at most what the others do not hold) keeps the sum within the limit, and
/// a refusal by the fleet cap counts as demand, so no gateway with demand settles at
/// 0 while the node has a try free.
pub fn want(whole: u32, others: &[(&str, u64)], me: &str, demand: u64) -> u32 {
    let mut all: Vec<(&str, u64)> = others.iter().filter(|&&(g, _)| g != me).copied().collect();
    all.push((me, demand));
    all.sort_unstable();
    let d: Vec<u64> = all.iter().map(|&(_, d)| d).collect();
    let i = all.iter().position(|&(g, _)| g == me).unwrap_or(0);
    let fair = shares(whole, &d)[i];
    if demand > 0 {
        fair.max(1)
    } else {
        fair
    }
}

/// What the grant script (`crate::cluster::shares`) gives a gateway asking for
/// `want` of `whole` tries while the others hold `held` (their grants, or their
/// tries in flight if more): the model its unit tests run.
pub fn grant(want: u32, whole: u32, held: u32) -> u32 {
    want.min(whole.saturating_sub(held))
}

/// A request refused (or queued) at admission because the pool's nodes are at their
/// caps: every node of `slots` at its fleet share counts it as unmet demand, as a
/// pick refused there does ([`under_cap`]). Nothing without a live share.
pub fn note_refused<'a>(nodes: impl Iterator<Item = &'a NodeSlot>, now: u64) {
    for n in nodes {
        if let Some((Some(s), _)) = live(n.fleet.load(Ordering::Relaxed), now) {
            if n.inflight.load(Ordering::Relaxed) >= s {
                n.fleet_skips.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shm::layout::Capacity;
    use crate::shm::Region;

    #[test]
    fn shares_add_up_to_the_limit_for_any_demands() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..20_000 {
            let limit = (next() % 40) as u32;
            let n = 1 + (next() % 6) as usize;
            let demands: Vec<u64> = (0..n)
                .map(|_| match next() % 4 {
                    0 => 0,
                    1 => next() % 3,
                    2 => next() % 1_000,
                    _ => next() >> (next() % 64),
                })
                .collect();
            let s = shares(limit, &demands);
            let sum: u32 = s.iter().sum();
            let active = demands.iter().filter(|&&d| d > 0).count();
            if active == 0 {
                assert_eq!(sum, 0);
            } else {
                assert_eq!(sum, limit, "{limit} {demands:?} -> {s:?}");
            }
            for (d, s) in demands.iter().zip(&s) {
                if *d == 0 {
                    assert_eq!(*s, 0, "no demand, no share");
                } else if limit as usize >= active {
                    assert!(*s >= 1, "every gateway with demand gets one try");
                }
            }
        }
    }

    #[test]
    fn shares_round_down_and_hand_out_the_remainder() {
        assert_eq!(shares(10, &[1, 1, 1]), vec![4, 3, 3], "ties: the earlier gateway");
        assert_eq!(shares(10, &[5, 0, 5]), vec![5, 0, 5]);
        assert_eq!(shares(10, &[8, 1, 1]), vec![8, 1, 1]);
        assert_eq!(shares(10, &[100, 1, 0]), vec![9, 1, 0], "the floor of one");
        assert_eq!(shares(10, &[7]), vec![10], "one gateway takes it all");
        assert_eq!(shares(10, &[0, 0]), vec![0, 0]);
        assert_eq!(shares(2, &[1, 5, 3]), vec![0, 1, 1], "fewer tries than gateways");
        assert_eq!(shares(0, &[1, 2]), vec![0, 0]);
        assert_eq!(shares(7, &[u64::MAX, u64::MAX]), vec![4, 3]);
        assert_eq!(shares(3, &[1_000, 1, 1]), vec![1, 1, 1]);
        assert_eq!(shares(4, &[1_000, 1, 1]), vec![2, 1, 1]);
    }

    /// Rounds of the share protocol for two gateways (A then B each round, as the
    /// sync threads interleave), each with its `demand` (requests wanting a try):
    /// tries in flight are at most the share, what the share refuses is unmet demand.
    fn rounds(whole: u32, demand: [u64; 2], state: &mut [(u32, u32, u64); 2], n: usize) -> Vec<[u32; 2]> {
        let names = ["A", "B"];
        let mut seen = Vec::new();
        for _ in 0..n {
            for g in 0..2 {
                let o = 1 - g;
                // (share, inflight, published demand)
                let inflight = (state[g].0 as u64).min(demand[g]) as u32;
                let d = inflight as u64 + demand[g].saturating_sub(state[g].0 as u64);
                let w = want(whole, &[(names[o], state[o].2)], names[g], d);
                let held = state[o].0.max(state[o].1);
                let s = grant(w, whole, held);
                state[g] = (s, inflight, d);
                assert!(s + held <= whole.max(held), "over the limit: {state:?}");
            }
            seen.push([state[0].0, state[1].0]);
        }
        seen
    }

    #[test]
    fn waiters_at_the_cap_are_demand_in_every_round_they_wait() {
        let one = LIMIT_ONE;
        // A share of 0 (cap: the smallest limit), nothing in flight, 8 queued: the
        // queue is the demand, round after round, with no new refusal.
        for _ in 0..3 {
            assert_eq!(demand(0, 1, 0, 8), 8);
        }
        // With it, a gateway whose requests only wait asks for a try and gets the
        // one the others gave back; counted once (the old demand: 0 after the round
        // of the arrival) it asked for nothing and kept its share of 0.
        assert_eq!(want(10, &[("A", 9), ("B", 9)], "C", demand(0, 1, 0, 8)), 3);
        assert_eq!(want(10, &[("A", 9), ("B", 9)], "C", 0), 0);
        // At its share: in flight, refusals and waiters add up.
        assert_eq!(demand(3, 3 * one, 2, 5), 10);
        // Below the cap (or no cap), the waiters wait for something else (a higher
        // priority elsewhere): not demand on this node.
        assert_eq!(demand(1, 3 * one, 0, 5), 1);
        assert_eq!(demand(4, 0, 0, 5), 4);
        assert_eq!(demand(u32::MAX, 1, u64::MAX, u32::MAX), 1 << 40, "bounded");
    }

    #[test]
    fn capacity_moves_to_the_demand_within_a_few_rounds() {
        // A alone busy: it takes the whole limit.
        let mut st = [(0, 0, 0); 2];
        let r = rounds(10, [50, 0], &mut st, 3);
        assert_eq!(r.last(), Some(&[10, 0]));
        // B's requests arrive while A stays busy: B's refusals are demand, A gives
        // back down to its fair share as its tries finish.
        let r = rounds(10, [50, 50], &mut st, 4);
        assert!(r[2][1] > 0, "B still at 0 after 3 rounds: {r:?}");
        assert_eq!(r.last(), Some(&[5, 5]), "{r:?}");
        // The demand moves from A to B entirely.
        let r = rounds(10, [0, 50], &mut st, 3);
        assert_eq!(r.last(), Some(&[0, 10]), "{r:?}");
        // And back, with the limit smaller than the gateways: never both at 0.
        let mut st = [(1, 1, 1), (0, 0, 0)];
        let r = rounds(1, [50, 50], &mut st, 6);
        assert!(r.iter().all(|s| s[0] + s[1] == 1), "{r:?}");
        // No demand, no share; demand, at least one.
        assert_eq!(want(10, &[("B", 9)], "A", 0), 0);
        assert_eq!(want(2, &[("B", 90), ("C", 90)], "A", 1), 1);
    }

    fn region() -> Region {
        Region::create(Capacity {
            max_pools: 1,
            max_nodes: 1,
            max_workers: 1,
            config_bytes: 4096,
            max_waiters: 1,
        })
        .unwrap()
    }

    #[test]
    fn a_share_caps_until_it_goes_stale() {
        let r = region();
        let n = r.node(0).unwrap();
        let now = 5_000;
        let one = LIMIT_ONE;
        assert_eq!(cap(n, now), 0, "no limit, no share: unlimited");
        set_share(n, Some(3), 7, (10 * one, 0), now + 200);
        assert_eq!(cap(n, now), 3 * one);
        assert_eq!(
            n.limit.load(Ordering::Relaxed),
            10 * one,
            "the fleet's limit taken"
        );
        assert_eq!((remote_inflight(n, now), share(n, now)), (7, Some(3)));
        assert!(under_cap(n, cap(n, now), 2) && !under_cap(n, cap(n, now), 3));
        assert_eq!(n.fleet_skips.load(Ordering::Relaxed), 1);
        // Stale: this gateway's own learned limit again.
        assert_eq!(cap(n, now + 200), 10 * one);
        assert_eq!((remote_inflight(n, now + 200), share(n, now + 200)), (0, None));
        // A share of 0 takes no try (and is not "no limit").
        set_share(n, Some(0), 0, (10 * one, 10 * one), now + 200);
        assert_eq!(cap(n, now), 1);
        assert!(!limit::under_limit(cap(n, now), 0));
        // A 429 here after the round read 10: the fleet's 12 less that move.
        n.limit.store(6 * one, Ordering::Relaxed);
        set_share(n, Some(8), 0, (12 * one, 10 * one), now + 200);
        assert_eq!(n.limit.load(Ordering::Relaxed), 8 * one);
        assert_eq!(cap(n, now), 8 * one);
        // A lower learned limit caps below the share; never below one try.
        n.limit.store(2 * one, Ordering::Relaxed);
        assert_eq!(cap(n, now), 2 * one);
        set_share(n, Some(8), 0, (one, 9 * one), now + 200);
        assert_eq!(n.limit.load(Ordering::Relaxed), one);
        // No fleet limit: the learned limit caps, the others' tries still count.
        set_share(n, None, 5, (0, 0), now + 200);
        assert_eq!((cap(n, now), remote_inflight(n, now)), (one, 5));
        // Wrapping deadlines.
        let w = pack(Some(1), 0, u32::MAX as u64 + 10);
        assert!(live(w, u32::MAX as u64 - 5).is_some());
        assert!(live(w, u32::MAX as u64 + 10).is_none());
        reset(n);
        assert_eq!(share(n, now), None);
    }

    #[test]
    fn a_429_in_a_fleet_lowers_the_limit_a_bounded_step_per_round() {
        let r = region();
        let n = r.node(0).unwrap();
        let one = LIMIT_ONE;
        // Alone: the concurrency refused less one.
        assert_eq!(after_busy(n, 0, 10 * one, 4, (1, 100)), 3 * one);
        // A first limit in a fleet: with the others' tries.
        set_share(n, Some(3), 6, (0, 0), 200);
        assert_eq!(after_busy(n, 0, 0, 4, (1, 100)), 9 * one);
        assert_eq!(
            after_busy(n, 0, 9 * one, 1, (1, 100)),
            9 * one,
            "once until a round"
        );
        // The fleet's limit is 10: one refusal with few tries known lowers it to 9 at
        // most, whatever the estimate; a round at 40 lets it fall to 36.
        set_share(n, Some(3), 2, (10 * one, 10 * one), 200);
        assert_eq!(after_busy(n, 0, 10 * one, 1, (1, 100)), 9 * one);
        assert_eq!(after_busy(n, 0, 9 * one, 1, (1, 100)), 9 * one, "once per round");
        assert_eq!(
            after_busy(n, 0, 10 * one, 20, (1, 100)),
            10 * one,
            "an estimate above: kept"
        );
        set_share(n, Some(3), 2, (40 * one, 40 * one), 200);
        assert_eq!(after_busy(n, 0, 40 * one, 3, (1, 100)), 36 * one);
        set_share(n, Some(3), 0, (one, one), 200);
        assert_eq!(after_busy(n, 0, one, 1, (1, 100)), one, "never below min");
    }

    #[test]
    fn remote_budget_counts_until_stale() {
        let r = region();
        let n = r.node(0).unwrap();
        assert_eq!(remote_budget(n, 0), (0, 0));
        set_remote_budget(n, 1_234, 5, 1_000);
        assert_eq!(remote_budget(n, 999), (1_234, 5));
        assert_eq!(remote_budget(n, 1_000), (0, 0));
    }
}
