//! The emergency detector judged on the fleet's counts, with one alert per transition
//! for the whole fleet (the design: the module documentation of `crate::cluster`).
//!
//! Each round the sync thread publishes each pool's window totals of this gateway
//! (`<prefix>win`, a hash of `pool|gateway` to `unix_ms requests busy failures shed`),
//! reads every gateway's, and sums those written within one fleet lease. The detector
//! ([`crate::emergency::decide`], the same pure function a lone gateway uses) runs on
//! the sums, against the fleet's state (`<prefix>emerg`, a hash of pool to `1` or `0`).
//! A transition it decides is a compare-and-set on that hash (a Lua script run by
//! Redis): the gateway whose set succeeds performs it and alerts; every other gateway
//! finds the fleet's state changed and adopts it without alerting. So the fleet sends
//! exactly one alert per transition, however many gateways reach the same verdict in
//! the same interval. The gateways' workers leave their pools to this detector while
//! the sync is live ([`crate::emergency::fleet_judges`]); when it is not, each gateway
//! judges alone again, on its own counts.

use std::collections::HashMap;

use redis::Connection;

use crate::balancer::Balancer;
use crate::emergency::{self, Decision, Params, Transition};
use crate::shm::layout::emergency::{ACTIVE, FORCED_OFF, FORCED_ON};
use crate::tally;
use crate::window::Totals;

/// Most window entries (`pool|gateway`) read in one round: a value from outside.
const MAX_ENTRIES: usize = 100_000;

/// Compare-and-set of a pool's fleet state: sets `ARGV[3]` when the state is absent or
/// `ARGV[2]`; returns 1 when it did.
const CAS: &str = "local c = redis.call('HGET', KEYS[1], ARGV[1]) \
    if c == false or c == ARGV[2] then redis.call('HSET', KEYS[1], ARGV[1], ARGV[3]) return 1 end \
    return 0";

/// The fleet detector's memory in the sync thread.
#[derive(Default)]
pub(super) struct Detector {
    /// Per pool, since when (monotonic ms) the fleet's ratio has been calm.
    calm: HashMap<String, u64>,
}

/// One pool's line in `<prefix>win`: `unix_ms requests busy failures shed`.
fn encode(unix_ms: u64, t: &Totals) -> String {
    format!("{unix_ms} {} {} {} {}", t.requests, t.busy, t.failures, t.shed)
}

/// The time and totals of a `<prefix>win` line, or None when it is not one.
fn decode(v: &str) -> Option<(u64, Totals)> {
    let mut it = v.split(' ').map(|f| f.parse::<u64>().ok());
    let (at, requests, busy, failures, shed) =
        (it.next()??, it.next()??, it.next()??, it.next()??, it.next()??);
    if it.next().is_some() {
        return None;
    }
    // Bounded: one gateway's window holds far fewer than 2^40 tries.
    let c = |n: u64| n.min(1 << 40);
    Some((
        at,
        Totals {
            requests: c(requests),
            busy: c(busy),
            failures: c(failures),
            shed: c(shed),
        },
    ))
}

/// Per pool, the sum of the totals written within `fresh_ms` of `now_unix`, and how
/// many gateways wrote them; plus the stale fields (gateways gone), to delete.
fn sum(
    entries: &HashMap<String, String>,
    now_unix: u64,
    fresh_ms: u64,
) -> (HashMap<&str, (Totals, u64)>, Vec<&str>) {
    let mut out: HashMap<&str, (Totals, u64)> = HashMap::new();
    let mut stale = Vec::new();
    for (field, v) in entries {
        let Some((pool, _gateway)) = field.rsplit_once('|') else {
            stale.push(field.as_str());
            continue;
        };
        match decode(v) {
            Some((at, t)) if at + fresh_ms >= now_unix => {
                let e = out.entry(pool).or_default();
                e.0.requests += t.requests;
                e.0.busy += t.busy;
                e.0.failures += t.failures;
                e.0.shed += t.shed;
                e.1 += 1;
            }
            _ => stale.push(field.as_str()),
        }
    }
    (out, stale)
}

impl Detector {
    /// One round: publish, sum, judge, and return the transitions this gateway won
    /// for the fleet (to alert).
    pub(super) fn round(
        &mut self,
        b: &Balancer,
        conn: &mut Connection,
        key: impl Fn(&str) -> String,
        gateway: &str,
        now_unix: u64,
        lease_ms: u64,
    ) -> Result<Vec<Transition>, String> {
        let topo = b.topology().map_err(|e| e.to_string())?;
        let now = crate::shm::clock::now_ms();
        let pools: Vec<_> = topo
            .pools
            .iter()
            .filter_map(|p| Some((p, p.policy.emergency.as_ref()?)))
            .collect();
        if pools.is_empty() {
            return Ok(Vec::new());
        }
        let (win, emerg) = (key("win"), key("emerg"));
        let mut pipe = redis::pipe();
        for (p, _) in &pools {
            let t = tally::pool_window(b.region(), p.slot, now);
            pipe.hset(&win, format!("{}|{gateway}", p.name), encode(now_unix, &t))
                .ignore();
            let bits = b
                .region()
                .pool(p.slot)
                .map_or(0, |ps| ps.emergency.load(std::sync::atomic::Ordering::Acquire));
            if bits & (FORCED_ON | FORCED_OFF) != 0 {
                // An operator's forced state is the fleet's (shared as admin state);
                // the record follows it, so that `auto` hands back the same state.
                pipe.hset(&emerg, &p.name, if bits & ACTIVE != 0 { "1" } else { "0" })
                    .ignore();
            }
        }
        pipe.hgetall(&win).hgetall(&emerg);
        let (entries, states): (HashMap<String, String>, HashMap<String, String>) =
            pipe.query(conn).map_err(|e| e.to_string())?;
        if entries.len() > MAX_ENTRIES {
            return Err(format!(
                "{win} holds {} entries (most {MAX_ENTRIES})",
                entries.len()
            ));
        }
        let (sums, stale) = sum(&entries, now_unix, lease_ms);
        if !stale.is_empty() {
            redis::cmd("HDEL")
                .arg(&win)
                .arg(&stale)
                .exec(conn)
                .map_err(|e| e.to_string())?;
        }
        let mut won = Vec::new();
        for (p, cfg) in pools {
            let bits = b
                .region()
                .pool(p.slot)
                .map_or(0, |ps| ps.emergency.load(std::sync::atomic::Ordering::Acquire));
            if bits & (FORCED_ON | FORCED_OFF) != 0 {
                self.calm.remove(&p.name);
                continue;
            }
            let local = bits & ACTIVE != 0;
            let fleet = match states.get(&p.name).map(String::as_str) {
                Some("1") => true,
                Some("0") => false,
                _ => local,
            };
            let (t, gateways) = sums.get(p.name.as_str()).copied().unwrap_or_default();
            let params = Params::new(cfg, p.policy.window_ms);
            let mut since = self.calm.get(&p.name).copied();
            let d = emergency::decide(fleet, &t, &mut since, now, &params);
            match since {
                Some(s) => self.calm.insert(p.name.clone(), s),
                None => self.calm.remove(&p.name),
            };
            let target = match d {
                Decision::Hold => fleet,
                Decision::Enter { .. } | Decision::Exit { .. } => {
                    let (from, to) = if fleet { ("1", "0") } else { ("0", "1") };
                    let set: i64 = redis::cmd("EVAL")
                        .arg(CAS)
                        .arg(1)
                        .arg(&emerg)
                        .arg(&p.name)
                        .arg(from)
                        .arg(to)
                        .query(conn)
                        .map_err(|e| e.to_string())?;
                    if set == 1 {
                        // This gateway won the fleet's transition: it alerts.
                        if let Some(tr) = emergency::fleet_transition(b, &p.name, &d, t, gateways, now)
                            .map_err(|e| e.to_string())?
                        {
                            won.push(tr);
                        }
                        continue;
                    }
                    // Another gateway set it first: the state is already `to`.
                    !fleet
                }
            };
            if target != local {
                emergency::adopt(b, p.slot, target, now);
            }
        }
        Ok(won)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(requests: u64, busy: u64, failures: u64, shed: u64) -> Totals {
        Totals {
            requests,
            busy,
            failures,
            shed,
        }
    }

    #[test]
    fn lines_round_trip_and_bad_ones_are_refused() {
        let x = t(10, 3, 1, 2);
        assert_eq!(decode(&encode(5, &x)), Some((5, x)));
        for bad in ["", "1 2 3 4", "1 2 3 4 5 6", "1 2 x 4 5", "-1 2 3 4 5"] {
            assert_eq!(decode(bad), None, "{bad:?}");
        }
        let (_, big) = decode(&format!("1 {} 0 0 0", u64::MAX)).unwrap();
        assert_eq!(big.requests, 1 << 40);
    }

    #[test]
    fn sums_fresh_entries_per_pool_and_names_stale_ones() {
        let mut e = HashMap::new();
        e.insert("llm|A".to_string(), encode(1_000, &t(10, 5, 0, 1)));
        e.insert("llm|B".to_string(), encode(900, &t(20, 1, 1, 0)));
        e.insert("llm|C".to_string(), encode(100, &t(99, 99, 0, 0)));
        e.insert("other|A".to_string(), encode(1_000, &t(1, 0, 0, 0)));
        e.insert("garbage".to_string(), "x".to_string());
        let (sums, mut stale) = sum(&e, 1_000, 500);
        assert_eq!(sums["llm"], (t(30, 6, 1, 1), 2));
        assert_eq!(sums["other"], (t(1, 0, 0, 0), 1));
        stale.sort();
        assert_eq!(stale, vec!["garbage", "llm|C"]);
    }
}
