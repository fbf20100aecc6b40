//! Emergency mode: the seed's contingency plan ("when the service stays busy for five
//! minutes: shed non-critical requests, bring in the backup cluster, alert the
//! operators"), per pool.
//!
//! **Signal.** The pool's sliding window ([`crate::window`], `window_ms` wide, the
//! seed's 5 minutes by default) counts tries, 429s and requests shed by admission.
//! The overload detector is a pure function, [`decide`], of those totals, the pool's
//! state and the time:
//! - *enter* when at least `min_requests` were offered in the window (an idle window
//!   says nothing) and the seed's busy ratio `(429s + shed) / (tries + shed)` reaches
//!   `enter_busy_ratio`;
//! - *exit* once the ratio has stayed below `exit_busy_ratio` (< enter: hysteresis, so
//!   a ratio hovering at the threshold does not flap) for `healthy_window_ms`. While in
//!   emergency the exit ratio leaves out shed requests (`429s / tries`): shedding is the
//!   mode's own doing, and counting it would hold the pool in emergency for as long as
//!   it sheds. A window with fewer than `min_requests` is not judged either way: the
//!   pool's nodes may be resting (cooldown) while the backup pool serves, and that is
//!   no evidence of recovery.
//!
//! **Effects** (read by the request path from the pool's shared slot): admission sheds
//! priorities below `shed_below` (the admission queue reads `PoolSlot::shed_below`
//! while `emergency` has `ACTIVE`), and the pool's `backup_pool` takes the requests no
//! node of the pool can take (the balancer's spill, used by `pick`, `may_retry` and
//! `available`). The backup pool also serves, outside emergency, when every node of the
//! pool is down (health checks) or ejected: that is a dead pool, not an overloaded one.
//!
//! **One alert per transition, without a lease.** Every nginx worker runs the detector
//! once a second ([`Balancer::emergency_tick`]) over the shared window. Transitions are
//! compare-and-swaps on `PoolSlot::emergency` (`0 -> ACTIVE` to enter, `ACTIVE -> 0` to
//! exit), so exactly one worker wins each and only the winner reports it for alerting.
//! An operator's forced change is reported by the call that made it
//! ([`Balancer::force_emergency`]: the previous bits come from the same atomic update).
//! Forced states win: the detector never touches a pool with `FORCED_ON` or
//! `FORCED_OFF`; `auto` hands the pool back in the state it is in. The time the ratio
//! has been calm is kept per process (each worker sees the same shared window, so each
//! reaches the same verdict within a tick; a restarted worker only starts counting
//! afresh while the others still decide).
//!
//! **In a fleet** (cluster mode), while the sync with Redis is live, the workers leave
//! the detector to the fleet's ([`fleet_judges`]; `crate::cluster`), which runs the
//! same [`decide`] on the sum of every gateway's window and wins each transition with
//! a compare-and-set in Redis, so the fleet alerts once per transition.

use std::sync::atomic::Ordering;

use serde::Serialize;

use crate::balancer::{Balancer, EmergencyMode, Error, PoolTopo};
pub use crate::config::emergency::{parse_url, WebhookConfig};
pub use crate::config::EmergencyConfig;
use crate::node;
use crate::shm::layout::emergency::{ACTIVE, FORCED_OFF, FORCED_ON};
use crate::tally;
use crate::window::Totals;

/// The detector's thresholds for one pool.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Params {
    pub enter: f64,
    pub exit: f64,
    pub min_requests: u64,
    pub healthy_window_ms: u64,
}

impl Params {
    pub fn new(c: &EmergencyConfig, window_ms: u32) -> Params {
        Params {
            enter: c.enter_busy_ratio,
            exit: c.exit_busy_ratio,
            min_requests: c.min_requests as u64,
            healthy_window_ms: c.healthy_window_ms.unwrap_or(window_ms) as u64,
        }
    }
}

/// What the detector concluded.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Stay as is.
    Hold,
    /// Enter emergency: the busy ratio reached the threshold.
    Enter { ratio: f64 },
    /// Leave emergency: the ratio stayed below the exit threshold long enough.
    Exit { ratio: f64 },
}

/// The overload detector: a pure function of the window's totals `t` at `now_ms`,
/// whether the pool is `active`, and `calm_since` (when the ratio last fell below the
/// exit threshold during this emergency; updated here, `None` outside emergency).
pub fn decide(active: bool, t: &Totals, calm_since: &mut Option<u64>, now_ms: u64, p: &Params) -> Decision {
    let offered = t.requests + t.shed;
    if !active {
        *calm_since = None;
        let ratio = t.busy_ratio();
        if offered >= p.min_requests && ratio >= p.enter {
            return Decision::Enter { ratio };
        }
        return Decision::Hold;
    }
    if offered < p.min_requests {
        // Too little traffic to say the nodes recovered (they may be resting while the
        // backup pool serves): hold, and keep the calm clock as it is.
        return Decision::Hold;
    }
    let ratio = exit_ratio(t);
    if ratio >= p.exit {
        *calm_since = None;
        return Decision::Hold;
    }
    let since = *calm_since.get_or_insert(now_ms);
    if now_ms.saturating_sub(since) >= p.healthy_window_ms {
        *calm_since = None;
        return Decision::Exit { ratio };
    }
    Decision::Hold
}

/// The ratio judged in emergency: 429s per try (shed requests left out).
fn exit_ratio(t: &Totals) -> f64 {
    if t.requests == 0 {
        0.0
    } else {
        t.busy.min(t.requests) as f64 / t.requests as f64
    }
}

/// Window counts in an alert.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Counts {
    pub window_ms: u32,
    pub requests: u64,
    pub busy: u64,
    pub failures: u64,
    pub shed: u64,
    pub entries_total: u64,
    pub shed_total: u64,
}

/// One node in an alert.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AlertNode {
    pub id: String,
    pub state: &'static str,
    pub inflight: u32,
    /// Learned concurrency limit (0: none learned).
    pub limit: f64,
    pub backup: bool,
}

/// A transition of a pool into or out of emergency: what the alert says.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Transition {
    pub pool: String,
    /// "enter" or "exit".
    pub event: &'static str,
    /// "forced" for an operator's change, else the detector's reading.
    pub reason: String,
    /// Whether an operator forced it.
    pub forced: bool,
    /// The busy ratio judged (the seed's on entry; 429s per try in emergency).
    pub busy_ratio: f64,
    pub counts: Counts,
    pub shed_below: u32,
    pub backup_pool: Option<String>,
    pub nodes: Vec<AlertNode>,
    /// Unix time, seconds.
    pub time: f64,
    /// Judged on the counts of this many gateways of a fleet (cluster mode), whose
    /// sums `counts` are; absent when judged by this gateway alone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fleet_gateways: Option<u64>,
}

impl Transition {
    /// The alert body (JSON).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("transition serializes")
    }

    /// One line for the error log.
    pub fn log_line(&self) -> String {
        let what = if self.event == "enter" { "entered" } else { "left" };
        let backup = match (&self.backup_pool, self.event) {
            (Some(b), "enter") if self.shed_below > 1 => {
                format!(
                    "; backup pool {b} in, shedding priorities below {}",
                    self.shed_below
                )
            }
            (Some(b), "enter") => format!("; backup pool {b} in"),
            (Some(b), _) => format!("; backup pool {b} out"),
            _ => String::new(),
        };
        format!(
            "pool {} {what} emergency mode: {} (window {} ms: {} tries, {} busy, {} shed){backup}",
            self.pool,
            self.reason,
            self.counts.window_ms,
            self.counts.requests,
            self.counts.busy,
            self.counts.shed
        )
    }
}

fn unix_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Run the overload detector over every pool with an `emergency` section at
/// `now_ms` (coarse monotonic, [`crate::shm::clock::now_ms`]) and perform the
/// transitions it decides. Returns the transitions this call won (each exactly once
/// across all processes), for alerting. Any process may call it at any time.
pub fn emergency_tick(b: &Balancer, now_ms: u64) -> Result<Vec<Transition>, Error> {
    let topo = b.topology()?;
    let region = b.region();
    let mut out = Vec::new();
    let mut calm = b.calm_since().lock();
    let fleet = fleet_judges(b);
    for p in &topo.pools {
        let ps = region.pool(p.slot).expect("topology slot in range");
        // Acquire pairs with the Release of the transitions below and in
        // `force_emergency` (kept in doubt: the decision reads counters only).
        let bits = ps.emergency.load(Ordering::Acquire);
        let Some(cfg) = &p.policy.emergency else {
            calm.remove(&p.slot);
            // A reload took the section away while the detector had the pool in
            // emergency: nothing would ever end it.
            if bits == ACTIVE
                && ps
                    .emergency
                    // AcqRel pairs with the Acquire loads of the word (here, `admission::admit`,
                    // `spill_target`); the failure value is unused: Relaxed.
                    .compare_exchange(ACTIVE, 0, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
            {
                let t = tally::pool_window(b.region(), p.slot, now_ms);
                let reason = "the pool has no emergency section any more".to_string();
                out.push(transition(
                    b,
                    p,
                    &topo.pools,
                    "exit",
                    reason,
                    false,
                    exit_ratio(&t),
                    t,
                ));
            }
            continue;
        };
        // Forced states win; in a fleet whose sync is live, the fleet's detector
        // decides (`crate::cluster`), on the counts of every gateway.
        if bits & (FORCED_ON | FORCED_OFF) != 0 || fleet {
            calm.remove(&p.slot);
            continue;
        }
        let t = tally::pool_window(b.region(), p.slot, now_ms);
        let params = Params::new(cfg, p.policy.window_ms);
        let mut since = calm.get(&p.slot).copied();
        let decision = decide(bits & ACTIVE != 0, &t, &mut since, now_ms, &params);
        match since {
            Some(s) => calm.insert(p.slot, s),
            None => calm.remove(&p.slot),
        };
        let Some((enter, reason, ratio)) = verdict(&decision, &t, &params) else {
            continue;
        };
        let (from, to, event) = if enter {
            (0, ACTIVE, "enter")
        } else {
            (ACTIVE, 0, "exit")
        };
        // Exactly one process wins each transition; a forced change in between
        // makes the exchange fail. Release pairs with the Acquire loads of the word
        // in `admission::admit` and `spill_target`: this process synced to the
        // topology it judged (`topology()`), so a reader that sees ACTIVE also sees
        // that config's `shed_below`. The failure value is unused.
        if ps
            .emergency
            .compare_exchange(from, to, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            continue;
        }
        if to == ACTIVE {
            ps.emergency_since_ms.store(now_ms, Ordering::Relaxed);
            ps.emergency_entries_total.fetch_add(1, Ordering::Relaxed);
        }
        out.push(transition(b, p, &topo.pools, event, reason, false, ratio, t));
    }
    Ok(out)
}

/// Force emergency mode on or off for `pool`, or hand it back to the detector.
/// Forcing on enters emergency at once; forcing off leaves it at once.
pub fn set_emergency_mode(b: &Balancer, pool: u32, mode: EmergencyMode) -> Result<(), Error> {
    force_emergency(b, pool, mode).map(|_| ())
}

/// Force emergency mode on or off for `pool`, or hand it back to the detector
/// (`Auto`, which keeps the current state). Returns the transition when the pool's
/// state changed (for alerting), `None` when it did not.
pub fn force_emergency(b: &Balancer, pool: u32, mode: EmergencyMode) -> Result<Option<Transition>, Error> {
    let ps = b
        .region()
        .pool(pool)
        // Acquire pairs with the Release store of `in_use` in `Balancer::configure`.
        .filter(|p| p.in_use.load(Ordering::Acquire) != 0)
        .ok_or_else(|| Error::Invalid(format!("unknown pool index {pool}")))?;
    let now = crate::shm::clock::now_ms();
    let before = ps
        .emergency
        // AcqRel as in `emergency_tick`'s transitions (Release pairs with the loads
        // in `admission::admit` and `spill_target`). A failed try's value only
        // feeds the next try: Relaxed.
        .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |e| {
            Some(match mode {
                EmergencyMode::Auto => e & ACTIVE,
                EmergencyMode::On => ACTIVE | FORCED_ON,
                EmergencyMode::Off => FORCED_OFF,
            })
        })
        .unwrap_or_else(|e| e);
    let was = before & ACTIVE != 0;
    let now_active = match mode {
        EmergencyMode::Auto => was,
        EmergencyMode::On => true,
        EmergencyMode::Off => false,
    };
    if was == now_active {
        return Ok(None);
    }
    if now_active {
        ps.emergency_since_ms.store(now, Ordering::Relaxed);
        ps.emergency_entries_total.fetch_add(1, Ordering::Relaxed);
    }
    let topo = b.topology()?;
    let Some(p) = topo.pools.iter().find(|p| p.slot == pool) else {
        return Ok(None);
    };
    let t = tally::pool_window(b.region(), pool, now);
    let event = if now_active { "enter" } else { "exit" };
    let ratio = if now_active {
        t.busy_ratio()
    } else {
        exit_ratio(&t)
    };
    Ok(Some(transition(
        b,
        p,
        &topo.pools,
        event,
        "forced".into(),
        true,
        ratio,
        t,
    )))
}

/// A decision to change state: whether it enters, the reason for the log and alert,
/// and the busy ratio judged; None for `Hold`.
fn verdict(d: &Decision, t: &Totals, params: &Params) -> Option<(bool, String, f64)> {
    match *d {
        Decision::Hold => None,
        Decision::Enter { ratio } => Some((
            true,
            format!(
                "busy ratio {ratio:.3} >= {} ({} busy + {} shed of {} offered)",
                params.enter,
                t.busy,
                t.shed,
                t.requests + t.shed
            ),
            ratio,
        )),
        Decision::Exit { ratio } => Some((
            false,
            format!(
                "busy ratio {ratio:.3} < {} for {} ms",
                params.exit, params.healthy_window_ms
            ),
            ratio,
        )),
    }
}

/// Whether the fleet's detector judges this gateway's pools: a `cluster` section
/// whose sync succeeded within three sync intervals. Otherwise (no cluster, Redis down,
/// the sync thread stalled) each gateway judges alone, as without a cluster.
pub fn fleet_judges(b: &Balancer) -> bool {
    let Some(sync_ms) = b
        .topology()
        .ok()
        .and_then(|t| t.cluster.as_ref().map(|c| u64::from(c.sync_ms)))
    else {
        return false;
    };
    let st = b.cluster_stats();
    st.up && st.last_ok_age_ms.is_some_and(|age| age <= 3 * sync_ms)
}

/// Set pool slot `pool`'s detector state to the fleet's (`active` or not) without an
/// alert: another gateway won that transition and alerted for the fleet. Forced
/// states are left alone. Returns whether the state changed here.
pub fn adopt(b: &Balancer, pool: u32, active: bool, now_ms: u64) -> bool {
    let Some(ps) = b.region().pool(pool) else {
        return false;
    };
    let (from, to) = if active { (0, ACTIVE) } else { (ACTIVE, 0) };
    // AcqRel as in `emergency_tick`'s transitions; the failure value is unused.
    let won = ps
        .emergency
        .compare_exchange(from, to, Ordering::AcqRel, Ordering::Relaxed)
        .is_ok();
    if won && active {
        ps.emergency_since_ms.store(now_ms, Ordering::Relaxed);
        ps.emergency_entries_total.fetch_add(1, Ordering::Relaxed);
    }
    won
}

/// The fleet's detector won a transition of `pool` for the whole fleet: perform it
/// here and return the alert (whose counts are the fleet's `t`, summed over
/// `gateways`).
pub fn fleet_transition(
    b: &Balancer,
    pool: &str,
    d: &Decision,
    t: Totals,
    gateways: u64,
    now_ms: u64,
) -> Result<Option<Transition>, Error> {
    let topo = b.topology()?;
    let Some(p) = topo.pool(pool) else {
        return Ok(None);
    };
    let Some(cfg) = &p.policy.emergency else {
        return Ok(None);
    };
    let params = Params::new(cfg, p.policy.window_ms);
    let Some((active, reason, ratio)) = verdict(d, &t, &params) else {
        return Ok(None);
    };
    let event = if active { "enter" } else { "exit" };
    let reason = format!("fleet {reason} at {gateways} gateways");
    adopt(b, p.slot, active, now_ms);
    let mut tr = transition(b, p, &topo.pools, event, reason, false, ratio, t);
    tr.fleet_gateways = Some(gateways);
    Ok(Some(tr))
}

#[allow(clippy::too_many_arguments)]
fn transition(
    b: &Balancer,
    p: &PoolTopo,
    pools: &[PoolTopo],
    event: &'static str,
    reason: String,
    forced: bool,
    busy_ratio: f64,
    t: Totals,
) -> Transition {
    let region = b.region();
    let ps = region.pool(p.slot).expect("topology slot in range");
    let backup = ps.backup_pool.load(Ordering::Relaxed);
    let nodes = p
        .nodes
        .iter()
        .map(|n| {
            let s = node::stats(region, n.slot);
            AlertNode {
                id: n.id.clone(),
                state: s.state,
                inflight: s.inflight,
                limit: s.limit,
                backup: n.backup,
            }
        })
        .collect();
    Transition {
        pool: p.name.clone(),
        event,
        reason,
        forced,
        busy_ratio,
        counts: Counts {
            window_ms: ps.window_ms.load(Ordering::Relaxed),
            requests: t.requests,
            busy: t.busy,
            failures: t.failures,
            shed: t.shed,
            entries_total: ps.emergency_entries_total.load(Ordering::Relaxed),
            shed_total: ps.shed_total.load(Ordering::Relaxed),
        },
        shed_below: ps.shed_below.load(Ordering::Relaxed),
        backup_pool: (backup != 0)
            .then(|| {
                pools
                    .iter()
                    .find(|q| q.slot == backup - 1)
                    .map(|q| q.name.clone())
            })
            .flatten(),
        nodes,
        time: unix_time(),
        fleet_gateways: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> Params {
        Params {
            enter: 0.3,
            exit: 0.1,
            min_requests: 10,
            healthy_window_ms: 5_000,
        }
    }

    fn totals(requests: u64, busy: u64, shed: u64) -> Totals {
        Totals {
            requests,
            failures: 0,
            busy,
            shed,
        }
    }

    #[test]
    fn enters_at_the_threshold_only_with_enough_requests() {
        let p = params();
        let mut calm = None;
        assert_eq!(
            decide(false, &totals(9, 9, 0), &mut calm, 0, &p),
            Decision::Hold,
            "idle window"
        );
        assert_eq!(
            decide(false, &totals(100, 29, 0), &mut calm, 0, &p),
            Decision::Hold
        );
        assert_eq!(
            decide(false, &totals(100, 30, 0), &mut calm, 0, &p),
            Decision::Enter { ratio: 0.3 }
        );
        // Shed requests count as busy and as offered: (10 + 20) / (80 + 20).
        assert_eq!(
            decide(false, &totals(80, 10, 20), &mut calm, 0, &p),
            Decision::Enter { ratio: 0.3 }
        );
        // Few tries but many shed: offered is what counts.
        assert!(matches!(
            decide(false, &totals(2, 0, 20), &mut calm, 0, &p),
            Decision::Enter { .. }
        ));
    }

    #[test]
    fn exits_only_after_a_healthy_window_below_the_exit_ratio() {
        let p = params();
        let mut calm = None;
        // Between exit and enter: hysteresis, stay.
        assert_eq!(
            decide(true, &totals(100, 20, 0), &mut calm, 1_000, &p),
            Decision::Hold
        );
        assert_eq!(calm, None);
        // Calm from t = 2000.
        assert_eq!(
            decide(true, &totals(100, 5, 0), &mut calm, 2_000, &p),
            Decision::Hold
        );
        assert_eq!(calm, Some(2_000));
        assert_eq!(
            decide(true, &totals(100, 5, 0), &mut calm, 6_999, &p),
            Decision::Hold
        );
        assert_eq!(
            decide(true, &totals(100, 5, 0), &mut calm, 7_000, &p),
            Decision::Exit { ratio: 0.05 }
        );
        assert_eq!(calm, None);
    }

    #[test]
    fn a_relapse_restarts_the_healthy_window() {
        let p = params();
        let mut calm = None;
        decide(true, &totals(100, 0, 0), &mut calm, 0, &p);
        assert_eq!(
            decide(true, &totals(100, 50, 0), &mut calm, 4_000, &p),
            Decision::Hold
        );
        assert_eq!(calm, None);
        assert_eq!(
            decide(true, &totals(100, 0, 0), &mut calm, 5_000, &p),
            Decision::Hold
        );
        assert_eq!(
            decide(true, &totals(100, 0, 0), &mut calm, 9_999, &p),
            Decision::Hold
        );
        assert!(matches!(
            decide(true, &totals(100, 0, 0), &mut calm, 10_000, &p),
            Decision::Exit { .. }
        ));
    }

    #[test]
    fn in_emergency_shed_requests_do_not_hold_the_pool() {
        let p = params();
        let mut calm = None;
        // Half the offered load shed, no 429s from the nodes: calm.
        assert_eq!(decide(true, &totals(50, 0, 50), &mut calm, 0, &p), Decision::Hold);
        assert!(matches!(
            decide(true, &totals(50, 0, 50), &mut calm, 5_000, &p),
            Decision::Exit { ratio } if ratio == 0.0
        ));
    }

    #[test]
    fn an_idle_window_holds_emergency() {
        let p = params();
        let mut calm = None;
        assert_eq!(decide(true, &totals(3, 0, 0), &mut calm, 0, &p), Decision::Hold);
        assert_eq!(
            decide(true, &totals(0, 0, 0), &mut calm, 60_000, &p),
            Decision::Hold
        );
        assert_eq!(calm, None, "an idle window starts no calm period");
        // Calm with traffic, then idle: the calm period started is kept.
        decide(true, &totals(100, 0, 0), &mut calm, 70_000, &p);
        assert_eq!(
            decide(true, &totals(0, 0, 0), &mut calm, 80_000, &p),
            Decision::Hold
        );
        assert_eq!(calm, Some(70_000));
    }

    #[test]
    fn outside_emergency_the_calm_clock_is_cleared() {
        let p = params();
        let mut calm = Some(123);
        assert_eq!(
            decide(false, &totals(100, 0, 0), &mut calm, 0, &p),
            Decision::Hold
        );
        assert_eq!(calm, None);
    }

    #[test]
    fn urls_parse() {
        assert_eq!(
            parse_url("http://127.0.0.1:9000/hook").unwrap(),
            ("127.0.0.1".into(), 9000, "/hook".into())
        );
        assert_eq!(
            parse_url("http://alerts.internal").unwrap(),
            ("alerts.internal".into(), 80, "/".into())
        );
        assert_eq!(
            parse_url("http://[::1]:81/a?b=c").unwrap(),
            ("[::1]".into(), 81, "/a?b=c".into())
        );
        for bad in [
            "https://x/",
            "ftp://x",
            "http://",
            "http://h:0/",
            "http://h:99999/",
            "http://h/a b",
            "http://a b/",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    fn config(emergency: serde_json::Value) -> Result<crate::config::Config, String> {
        crate::config::Config::from_value(serde_json::json!({
            "pools": {
                "llm": {
                    "nodes": [{ "id": "a", "addr": "127.0.0.1:8000" }],
                    "window_ms": 4000,
                    "emergency": emergency
                },
                "spare": { "nodes": [{ "id": "s", "addr": "127.0.0.1:8001" }] }
            }
        }))
        .map_err(|e| e.to_string())
    }

    #[test]
    fn config_defaults_and_fields() {
        let c = config(serde_json::json!({})).unwrap();
        let e = c.pools["llm"].emergency.clone().unwrap();
        assert_eq!(e, EmergencyConfig::default());
        assert_eq!(
            Params::new(&e, 4000).healthy_window_ms,
            4000,
            "defaults to window_ms"
        );
        let c = config(serde_json::json!({
            "enter_busy_ratio": 0.5, "exit_busy_ratio": 0.2, "min_requests": 5, "shed_below": 4,
            "backup_pool": "spare", "healthy_window_ms": 2000,
            "webhooks": [{ "url": "http://127.0.0.1:9/x", "timeout_ms": 100, "retries": 1, "min_interval_ms": 0 }]
        }))
        .unwrap();
        let e = c.pools["llm"].emergency.clone().unwrap();
        assert_eq!(e.backup_pool.as_deref(), Some("spare"));
        assert_eq!(e.webhooks[0].retries, 1);
        assert_eq!(Params::new(&e, 4000).healthy_window_ms, 2000);
        assert!(c.pools["spare"].emergency.is_none());
    }

    #[test]
    fn config_errors_name_pool_field_and_value() {
        let cases = [
            (
                serde_json::json!({ "backup_pool": "nope" }),
                "pools.llm.emergency.backup_pool: \"nope\" is not a pool",
            ),
            (
                serde_json::json!({ "backup_pool": "llm" }),
                "pools.llm.emergency.backup_pool: \"llm\" is this pool itself",
            ),
            (
                serde_json::json!({ "enter_busy_ratio": 1.5 }),
                "pools.llm.emergency.enter_busy_ratio: 1.5 is out of range",
            ),
            (
                serde_json::json!({ "enter_busy_ratio": 0.0 }),
                "pools.llm.emergency.enter_busy_ratio: 0 must be above 0",
            ),
            (
                serde_json::json!({ "enter_busy_ratio": 0.3, "exit_busy_ratio": 0.3 }),
                "pools.llm.emergency.exit_busy_ratio: 0.3 must be below enter_busy_ratio (0.3)",
            ),
            (
                serde_json::json!({ "shed_below": 12 }),
                "pools.llm.emergency.shed_below: 12 is out of range 1..=11",
            ),
            (
                serde_json::json!({ "shed_below": 0 }),
                "pools.llm.emergency.shed_below: 0 is out of range 1..=11",
            ),
            (
                serde_json::json!({ "min_requests": 0 }),
                "pools.llm.emergency.min_requests: 0 is out of range",
            ),
            (
                serde_json::json!({ "healthy_window_ms": 10 }),
                "pools.llm.emergency.healthy_window_ms: 10 is out of range",
            ),
            (
                serde_json::json!({ "webhooks": [{ "url": "https://x/" }] }),
                "pools.llm.emergency.webhooks[0].url: \"https://x/\" must start with http://",
            ),
            (
                serde_json::json!({ "webhooks": [{ "url": "http://x/", "retries": 50 }] }),
                "pools.llm.emergency.webhooks[0].retries: 50 is out of range 0..=20",
            ),
            (
                serde_json::json!({ "enter": 0.3 }),
                "pools.llm.emergency: unknown field `enter`",
            ),
        ];
        for (v, want) in cases {
            let got = config(v.clone()).unwrap_err();
            assert!(got.starts_with(want), "{v}: got {got:?}, want {want:?}...");
        }
    }
}
