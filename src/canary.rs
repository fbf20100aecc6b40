//! Canary split: a pool sends a share of its requests to a second pool (the canary),
//! raises that share on a schedule, and drops it to zero when the canary does worse.
//!
//! **The split** is decided per request in Lua (`lua/resty/rsbalancer/canary.lua`):
//! the request's bucket, `crc32(key) mod 10,000` for a sticky key or a random draw,
//! goes to the canary when it is below the share (parts per 10,000). Comparing a
//! fixed bucket with the share makes stickiness monotone: raising the share only
//! moves users from the primary to the canary, never back and forth. The share lives
//! in the pool's shared slot ([`PoolSlot::canary_share`]) and is read on every request
//! through [`Balancer::canary`] (`rsb_canary`: two atomic loads, no lock), so a
//! change made by any process (admin API, ramp, rollback) applies to the next request
//! of every worker.
//!
//! **Ramp and rollback** are judged by [`decide`], a pure function of the time, the
//! canary block, the slot's state and the sliding windows (`crate::window`) of both
//! pools, so it is tested with injected time and made-up totals. Every worker runs a
//! timer that calls [`Balancer::canary_tick`] about once a second; there is no lease:
//! each action is claimed with a compare-and-swap on a slot word (the ramp word for a
//! step, `canary_rolled_back` for a rollback), so exactly one worker applies it and
//! logs it, however many tick at once.
//!
//! - Ramp: `canary_ramp` packs the time of the next step with the share the ramp set
//!   last. A step adds `step` (capped at `max`; reaching it ends the ramp). It writes
//!   the share first, then the ramp word (the claim), and ticks read the ramp word
//!   first, so no tick sees a step's ramp word with the share from before it; a share
//!   already at a due step's value is that step under way (taken again, reported
//!   once). Any other share that differs from the one the ramp set (changed by hand, or
//!   rolled back) ends the ramp: the operator, or the rollback, has the last word.
//! - Rollback (Envoy's outlier detection by success rate, between two pools): when the
//!   canary made at least `min_requests` tries in its window and its success rate
//!   (neither 5xx, no response nor 429) is below the primary's minus `margin`, the
//!   share drops to 0, `canary_rolled_back` is set and the reason is logged. Only
//!   canary outcomes after `canary_since_ms` count (the last rollback, or the last
//!   change of the canary block), so re-enabling a fixed canary is not judged by the
//!   failures that rolled it back.
//!
//! **Reload** (`configure`): a pool whose canary block is unchanged keeps its live
//! share, rollback state and ramp progress; a changed block starts over from its
//! `share`; a removed block turns the split off.

use std::sync::atomic::Ordering;

use serde::Serialize;

use crate::balancer::{Balancer, Error};
use crate::config::CanaryConfig;
pub use crate::params::{initial_ramp, pack_ramp, parts, unpack_ramp, PARTS};
use crate::shm::clock;
use crate::shm::layout::PoolSlot;
use crate::tally;
use crate::window::Totals;

/// What [`decide`] reads from a pool's slot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct State {
    /// Parts per 10,000.
    pub share: u32,
    pub rolled_back: bool,
    /// The ramp word (0: no ramp running).
    pub ramp: u64,
}

impl State {
    /// The ramp word first: a step writes the share before the ramp word, so a ramp
    /// word of a step always comes with that step's share (or a later one), never with
    /// the share from before it.
    pub fn load(ps: &PoolSlot) -> State {
        // Acquire pairs with the Release of the ramp word in `canary_tick` (a step's
        // exchange, a rollback's store): that step's share, or the rollback's share and
        // flag, are visible below. The configure's stores ride on the generation.
        let ramp = ps.canary_ramp.load(Ordering::Acquire);
        State {
            // Acquire pairs with the rollback's Release store of the share in
            // `canary_tick`: a share of 0 from a rollback comes with its flag.
            share: ps.canary_share.load(Ordering::Acquire),
            // Relaxed: the last load; it publishes nothing, the two above order it.
            rolled_back: ps.canary_rolled_back.load(Ordering::Relaxed) != 0,
            ramp,
        }
    }
}

/// What to do with a canary now.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Decision {
    Hold,
    /// Drop the share to 0: the canary's success rate is too far below the primary's.
    Rollback {
        canary_rate: f64,
        primary_rate: f64,
    },
    /// A ramp step: the share becomes `to`; `ramp` is the new ramp word (0: done).
    Step {
        to: u32,
        ramp: u64,
    },
    /// The ramp ends without a step: the share is no longer the one it set.
    EndRamp,
}

/// Decide on one canary at `now_ms` (see the module documentation). `primary` is the
/// primary pool's window, `canary` the canary pool's since `canary_since_ms`.
pub fn decide(now_ms: u64, c: &CanaryConfig, st: &State, primary: &Totals, canary: &Totals) -> Decision {
    if let Some(rb) = &c.rollback {
        if st.share > 0 && !st.rolled_back && canary.requests >= rb.min_requests as u64 {
            let (canary_rate, primary_rate) = (canary.success_rate(), primary.success_rate());
            if canary_rate < primary_rate - rb.margin {
                return Decision::Rollback {
                    canary_rate,
                    primary_rate,
                };
            }
        }
    }
    if st.ramp == 0 {
        return Decision::Hold;
    }
    let (next_ms, set) = unpack_ramp(st.ramp);
    let Some(r) = c.ramp.as_ref().filter(|_| !st.rolled_back) else {
        return Decision::EndRamp;
    };
    let max = parts(r.max);
    let to = (set + parts(r.step)).min(max);
    let due = now_ms >= next_ms;
    // A share already at the due step's `to` is that step under way in another process
    // (it writes the share, then the ramp word), or left half done by a process that
    // died in between: take it (again); the ramp word's compare-and-swap decides who
    // reports it. Any other share than the ramp's was set by hand.
    if st.share != set && !(due && st.share == to) {
        return Decision::EndRamp;
    }
    if !due {
        return Decision::Hold;
    }
    let ramp = if to >= max {
        0
    } else {
        pack_ramp(now_ms + r.every_s as u64 * 1000, to)
    };
    Decision::Step { to, ramp }
}

/// Something a tick did, for the error log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CanaryEvent {
    pub pool: String,
    /// A rollback (log at error level); else a ramp step or end (notice).
    pub rollback: bool,
    pub message: String,
}

/// A pool's canary as it stands, for admin reads.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CanaryState {
    /// The canary pool's name.
    pub canary: String,
    /// 0.0..=1.0.
    pub share: f64,
    pub key: String,
    pub rolled_back: bool,
    pub rollbacks: u64,
    /// Milliseconds until the next ramp step (absent: no ramp running).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ramp_next_in_ms: Option<u64>,
}

fn percent(parts: u32) -> String {
    format!("{:.2}%", parts as f64 / 100.0)
}

fn rate(totals: &Totals) -> String {
    format!(
        "{:.1}% of {} tries",
        totals.success_rate() * 100.0,
        totals.requests
    )
}

/// Pool `pool`'s canary pool slot (None: no canary) and share in parts per 10,000.
/// Per request: atomic loads only, no lock, no allocation.
pub fn canary(b: &Balancer, pool: u32) -> Result<(Option<u32>, u32), Error> {
    let live = |p: &&PoolSlot| p.in_use.load(Ordering::Acquire) != 0;
    // Acquire pairs with the Release store of `in_use` in `Balancer::configure`
    // (`apply`): the canary fields read below were stored before it.
    let ps = b
        .region()
        .pool(pool)
        .filter(live)
        .ok_or_else(|| Error::Invalid(format!("unknown pool index {pool}")))?;
    let c = ps.canary_pool.load(Ordering::Relaxed);
    match c.checked_sub(1) {
        Some(slot) if b.region().pool(slot).filter(live).is_some() => {
            Ok((Some(slot), ps.canary_share.load(Ordering::Relaxed).min(PARTS)))
        }
        _ => Ok((None, 0)),
    }
}

/// Run the ramp and rollback of every canary once (each worker's timer calls this
/// about once a second); returns what was done, for the error log.
pub fn canary_tick(b: &Balancer) -> Result<Vec<CanaryEvent>, Error> {
    let now = clock::now_ms();
    let topo = b.topology()?;
    let mut events = Vec::new();
    for p in &topo.pools {
        let Some(c) = &p.policy.canary else { continue };
        let Some(cp) = topo.pool(&c.pool) else { continue };
        let region = b.region();
        let (Some(ps), Some(cs)) = (region.pool(p.slot), region.pool(cp.slot)) else {
            continue;
        };
        let st = State::load(ps);
        let primary = tally::pool_window(region, p.slot, now);
        let canary = tally::window_totals(
            region,
            cp.slot,
            now,
            cs.window_ms.load(Ordering::Relaxed),
            ps.canary_since_ms.load(Ordering::Relaxed),
        );
        let event = |rollback: bool, message: String| CanaryEvent {
            pool: p.name.clone(),
            rollback,
            message,
        };
        match decide(now, c, &st, &primary, &canary) {
            Decision::Hold => {}
            Decision::Rollback {
                canary_rate,
                primary_rate,
            } => {
                // One process wins the flag and does the rest. AcqRel, kept in
                // doubt: the flag decides the winner; the two Release stores below
                // are what publish it.
                if ps
                    .canary_rolled_back
                    .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
                {
                    // Release pairs with the share's Acquire in `State::load`.
                    ps.canary_share.store(0, Ordering::Release);
                    // Release pairs with the ramp word's Acquire in `State::load`: a
                    // reader that sees the ramp cleared by the rollback also sees the
                    // share of 0 and the flag (Relaxed let it see them stale).
                    ps.canary_ramp.store(0, Ordering::Release);
                    ps.canary_since_ms.store(now, Ordering::Relaxed);
                    ps.canary_rollbacks_total.fetch_add(1, Ordering::Relaxed);
                    let margin = c.rollback.as_ref().map_or(0.0, |r| r.margin);
                    events.push(event(
                        true,
                        format!(
                            "pool {} canary {} ROLLED BACK (share {} -> 0): canary success rate {} is below the primary's {} minus the margin {:.1}% ({:.1}% < {:.1}%) over the last {} ms",
                            p.name,
                            c.pool,
                            percent(st.share),
                            rate(&canary),
                            rate(&primary),
                            margin * 100.0,
                            canary_rate * 100.0,
                            (primary_rate - margin) * 100.0,
                            cs.window_ms.load(Ordering::Relaxed)
                        ),
                    ));
                }
            }
            Decision::Step { to, ramp } => {
                // The share, then the ramp word (see `State::load`); the ramp word's
                // exchange is the claim: one process reports each step. The share's
                // AcqRel is kept in doubt (its Release pairs with the share's Acquire
                // in `State::load`, publishing nothing before it); the ramp word's
                // Release pairs with the ramp's Acquire in `State::load` and
                // publishes the share.
                if ps
                    .canary_share
                    .compare_exchange(st.share, to, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
                    && ps
                        .canary_ramp
                        .compare_exchange(st.ramp, ramp, Ordering::AcqRel, Ordering::Relaxed)
                        .is_ok()
                {
                    let next = if ramp == 0 {
                        "ramp complete".to_string()
                    } else {
                        format!("next step in {} s", c.ramp.as_ref().map_or(0, |r| r.every_s))
                    };
                    events.push(event(
                        false,
                        format!(
                            "pool {} canary {} share {} -> {} (ramp; {next})",
                            p.name,
                            c.pool,
                            percent(unpack_ramp(st.ramp).1),
                            percent(to)
                        ),
                    ));
                }
            }
            Decision::EndRamp => {
                // AcqRel: the Release pairs with the ramp's Acquire in `State::load`,
                // as a step's does (it publishes nothing new: the share was set by
                // hand or by the rollback, each with its own Release).
                if ps
                    .canary_ramp
                    .compare_exchange(st.ramp, 0, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
                    && !st.rolled_back
                {
                    events.push(event(
                        false,
                        format!(
                            "pool {} canary {} ramp stopped: the share was set to {} by hand",
                            p.name,
                            c.pool,
                            percent(st.share)
                        ),
                    ));
                }
            }
        }
    }
    Ok(events)
}

/// Pool `name`'s canary as it stands (None: the pool has none).
pub fn canary_state(b: &Balancer, name: &str) -> Result<Option<CanaryState>, Error> {
    let topo = b.topology()?;
    let p = topo
        .pool(name)
        .ok_or_else(|| Error::Invalid(format!("unknown pool \"{name}\"")))?;
    let Some(c) = &p.policy.canary else {
        return Ok(None);
    };
    let ps = b.region().pool(p.slot).expect("topology slot in range");
    let st = State::load(ps);
    let now = clock::now_ms();
    Ok(Some(CanaryState {
        canary: c.pool.clone(),
        share: st.share as f64 / PARTS as f64,
        key: c.key.clone().into(),
        rolled_back: st.rolled_back,
        rollbacks: ps.canary_rollbacks_total.load(Ordering::Relaxed),
        ramp_next_in_ms: (st.ramp != 0).then(|| unpack_ramp(st.ramp).0.saturating_sub(now)),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{CanaryKey, RampConfig, RollbackConfig};

    fn canary(share: f64, ramp: Option<(f64, u32, f64)>, rollback: Option<(f64, u32)>) -> CanaryConfig {
        CanaryConfig {
            pool: "c".into(),
            share,
            key: CanaryKey::Random,
            ramp: ramp.map(|(step, every_s, max)| RampConfig { step, every_s, max }),
            rollback: rollback.map(|(margin, min_requests)| RollbackConfig { margin, min_requests }),
        }
    }

    fn totals(requests: u64, failures: u64, busy: u64) -> Totals {
        Totals {
            requests,
            failures,
            busy,
            shed: 0,
        }
    }

    fn state(share: u32, ramp: u64) -> State {
        State {
            share,
            rolled_back: false,
            ramp,
        }
    }

    const OK: Totals = Totals {
        requests: 1000,
        failures: 0,
        busy: 0,
        shed: 0,
    };

    #[test]
    fn parts_and_ramp_word_round_trip() {
        assert_eq!(parts(0.2), 2000);
        assert_eq!(parts(0.00005), 1);
        assert_eq!(parts(1.0), PARTS);
        assert_eq!(parts(7.0), PARTS, "clamped");
        let w = pack_ramp(123_456_789_012, 9_999);
        assert_eq!(unpack_ramp(w), (123_456_789_012, 9_999));
        assert_eq!(unpack_ramp(0), (0, 0));
    }

    #[test]
    fn rollback_when_canary_below_primary_minus_margin() {
        let c = canary(0.2, None, Some((0.05, 50)));
        let st = state(2000, 0);
        // 20% failures (5xx) against a clean primary.
        let d = decide(0, &c, &st, &OK, &totals(100, 20, 0));
        assert_eq!(
            d,
            Decision::Rollback {
                canary_rate: 0.8,
                primary_rate: 1.0
            }
        );
        // 429s count as failures too.
        assert!(matches!(
            decide(0, &c, &st, &OK, &totals(100, 0, 10)),
            Decision::Rollback { .. }
        ));
    }

    #[test]
    fn no_rollback_for_a_healthy_canary_or_within_margin() {
        let c = canary(0.2, None, Some((0.05, 50)));
        let st = state(2000, 0);
        assert_eq!(decide(0, &c, &st, &OK, &totals(500, 0, 0)), Decision::Hold);
        // 4% worse: within the 5% margin.
        assert_eq!(decide(0, &c, &st, &OK, &totals(100, 4, 0)), Decision::Hold);
        // Both equally bad: the canary is not to blame.
        assert_eq!(
            decide(0, &c, &st, &totals(1000, 300, 0), &totals(100, 30, 0)),
            Decision::Hold
        );
    }

    #[test]
    fn no_rollback_below_min_requests_or_when_inactive() {
        let c = canary(0.2, None, Some((0.05, 50)));
        let dead = totals(49, 49, 0);
        assert_eq!(decide(0, &c, &state(2000, 0), &OK, &dead), Decision::Hold);
        let dead = totals(50, 50, 0);
        assert!(matches!(
            decide(0, &c, &state(2000, 0), &OK, &dead),
            Decision::Rollback { .. }
        ));
        // Share 0 (off by hand) or already rolled back: nothing to roll back.
        assert_eq!(decide(0, &c, &state(0, 0), &OK, &dead), Decision::Hold);
        let rolled = State {
            rolled_back: true,
            ..state(2000, 0)
        };
        assert_eq!(decide(0, &c, &rolled, &OK, &dead), Decision::Hold);
        // No rollback block: never.
        assert_eq!(
            decide(0, &canary(0.2, None, None), &state(2000, 0), &OK, &dead),
            Decision::Hold
        );
    }

    #[test]
    fn ramp_steps_on_schedule_up_to_max() {
        // 5%, +20% every day, up to 50%.
        let c = canary(0.05, Some((0.2, 86_400, 0.5)), None);
        let t0 = 1_000_000;
        let day = 86_400_000;
        let mut ramp = initial_ramp(&c, t0);
        assert_eq!(unpack_ramp(ramp), (t0 + day, 500));
        let mut share = 500;
        let mut steps = vec![];
        let mut now = t0;
        while ramp != 0 {
            assert_eq!(
                decide(now + day - 1, &c, &state(share, ramp), &OK, &OK),
                Decision::Hold,
                "not before the step is due"
            );
            now += day;
            match decide(now, &c, &state(share, ramp), &OK, &OK) {
                Decision::Step { to, ramp: r } => {
                    steps.push(to);
                    share = to;
                    ramp = r;
                    if r != 0 {
                        assert_eq!(unpack_ramp(r), (now + day, to));
                    }
                }
                d => panic!("{d:?}"),
            }
        }
        assert_eq!(steps, vec![2500, 4500, 5000]);
        assert_eq!(
            decide(now + 10 * day, &c, &state(share, 0), &OK, &OK),
            Decision::Hold
        );
    }

    #[test]
    fn ramp_ends_when_the_share_changed_or_rolled_back() {
        let c = canary(0.05, Some((0.2, 60, 1.0)), Some((0.05, 10)));
        let ramp = initial_ramp(&c, 0);
        assert_eq!(decide(60_000, &c, &state(900, ramp), &OK, &OK), Decision::EndRamp);
        let rolled = State {
            rolled_back: true,
            ..state(500, ramp)
        };
        assert_eq!(decide(0, &c, &rolled, &OK, &OK), Decision::EndRamp);
        // A failing canary is rolled back rather than ramped up.
        assert!(matches!(
            decide(60_000, &c, &state(500, ramp), &OK, &totals(10, 10, 0)),
            Decision::Rollback { .. }
        ));
    }

    /// Regression: a tick that read the ramp word of a step another process was taking
    /// (the share not yet written) took the old share for a hand-set one and ended the
    /// ramp. Now the share is written first and a share at the due step's value is that
    /// step, taken again (the ramp word's exchange lets one report it).
    #[test]
    fn a_share_at_the_due_steps_value_is_that_step_not_a_hand_change() {
        let c = canary(0.05, Some((0.2, 60, 1.0)), None);
        let ramp = initial_ramp(&c, 0);
        let step = decide(60_000, &c, &state(500, ramp), &OK, &OK);
        assert_eq!(
            step,
            Decision::Step {
                to: 2500,
                ramp: pack_ramp(120_000, 2500)
            }
        );
        assert_eq!(decide(60_000, &c, &state(2500, ramp), &OK, &OK), step);
        // Before the step is due, or at another share, it was set by hand.
        assert_eq!(
            decide(59_999, &c, &state(2500, ramp), &OK, &OK),
            Decision::EndRamp
        );
        assert_eq!(
            decide(60_000, &c, &state(2400, ramp), &OK, &OK),
            Decision::EndRamp
        );
    }

    #[test]
    fn no_ramp_when_share_already_at_max() {
        assert_eq!(initial_ramp(&canary(0.5, Some((0.1, 1, 0.5)), None), 7), 0);
        assert_eq!(initial_ramp(&canary(0.5, None, None), 7), 0);
    }
}
