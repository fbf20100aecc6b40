//! The fleet-wide admission queue: each gateway mirrors its waiters into one Redis
//! sorted set per pool, and brings the fleet's head back into shared memory, where
//! local admission reads it (`crate::admission::fleet`).
//!
//! **Keys** (under the cluster prefix, per pool):
//! - `q:<pool>`: sorted set of the fleet's waiters, member `<gateway>/<ticket>`,
//!   scored by [`score`]: (10 - priority) × 10^13 + arrival in Unix ms, so that the
//!   lowest score is the highest priority, then the oldest (Unix ms stay below 10^13
//!   until the year 2286; the largest score, 10^14, is exact in a double);
//! - `q:<pool>:gw`: sorted set of the gateways with waiters, scored by their lease
//!   end (Unix ms), renewed by every round;
//! - `q:<pool>:gw:<gateway>`: set of that gateway's members, so that a lapsed
//!   gateway's entries are found without a scan of the queue.
//!
//! **One round per pool** is one call of a Lua script ([`SCRIPT`], atomic in Redis):
//! it removes the entries of gateways whose lease ran out (whoever runs it first), adds
//! this gateway's new waiters and removes those that stopped waiting (admitted,
//! timed out, evicted, gone), renews this gateway's lease, and returns the queue's
//! length and its head (the [`HEAD`] best entries with their scores). A gateway killed
//! with SIGKILL leaves entries behind for at most its lease ([`lease_ms`]); the next
//! round of any other gateway then removes them. A gateway whose lease lapsed while it
//! lived (stalled, Redis restarted empty) finds its lease gone, and sends all its
//! waiters again at once.
//!
//! **The view.** From the head, the thread writes per pool, per priority, the count
//! and the oldest arrival of the *other* gateways' waiters into `PoolSlot::fleet`
//! (arrivals converted to this gateway's monotonic clock), valid for one lease. A
//! round that fails clears every view ([`forget`]); a sync thread that stops lets it
//! lapse. Requests never talk to Redis: they read the view (a few atomic loads).
//!
//! **Consistency.** The view is at most one round old; an entry reaches the fleet
//! within one round of its arrival, and leaves it within one round of being served.
//! Arrival order across gateways is by their Unix clocks (keep them in NTP sync; it
//! matters only to aging, since only a higher effective priority holds a slot).
//! Redis Cluster is not supported (the script names the gateways' sets itself);
//! standalone and Sentinel are.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;

use redis::Connection;

use crate::admission::{fleet, Queue};
use crate::balancer::Balancer;
use crate::shm::clock;
use crate::shm::layout::PRIORITIES;

/// Entries of the fleet's head read each round, per pool (bounds the reply).
pub const HEAD: usize = 128;
/// Score weight of one priority step: above any Unix time in ms before 2286.
pub const STEP: u64 = 10_000_000_000_000;

/// The script of one pool's round. KEYS: queue, leases, this gateway's set.
/// ARGV: now (Unix ms), lease end, gateway, fresh (1: drop this gateway's old
/// entries first), head size, number of additions, then score and member of each
/// addition, then the members to remove. Returns {lost, queue length, head}: lost is
/// 1 when this gateway's lease was gone (its entries purged) and it was not fresh.
pub const SCRIPT: &str = r"
local q, gw, mine = KEYS[1], KEYS[2], KEYS[3]
local now, lease, me, fresh = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local head, nadd = tonumber(ARGV[5]), tonumber(ARGV[6])
local dead = redis.call('ZRANGEBYSCORE', gw, '-inf', now, 'LIMIT', 0, 64)
for _, g in ipairs(dead) do
  local set = q .. ':gw:' .. g
  for _, m in ipairs(redis.call('SMEMBERS', set)) do redis.call('ZREM', q, m) end
  redis.call('DEL', set)
  redis.call('ZREM', gw, g)
end
local lost = 0
if fresh == '1' then
  for _, m in ipairs(redis.call('SMEMBERS', mine)) do redis.call('ZREM', q, m) end
  redis.call('DEL', mine)
elseif not redis.call('ZSCORE', gw, me) then
  lost = 1
end
redis.call('ZADD', gw, lease, me)
local i = 7
for _ = 1, nadd do
  redis.call('ZADD', q, ARGV[i], ARGV[i + 1])
  redis.call('SADD', mine, ARGV[i + 1])
  i = i + 2
end
while i <= #ARGV do
  redis.call('ZREM', q, ARGV[i])
  redis.call('SREM', mine, ARGV[i])
  i = i + 1
end
local ttl = 10 * (tonumber(lease) - tonumber(now))
for _, k in ipairs({q, gw, mine}) do redis.call('PEXPIRE', k, ttl) end
return {lost, redis.call('ZCARD', q), redis.call('ZRANGE', q, 0, head - 1, 'WITHSCORES')}
";

/// Score of a waiter of `priority` (1..=10) that arrived at `arrival_unix_ms`.
pub fn score(priority: u32, arrival_unix_ms: u64) -> u64 {
    let p = priority.clamp(1, PRIORITIES as u32);
    u64::from(PRIORITIES as u32 - p) * STEP + arrival_unix_ms.min(STEP - 1)
}

/// (priority, arrival Unix ms) of a score read from Redis; `None` when it is not one
/// that [`score`] makes (a value from outside).
pub fn decode(score: f64) -> Option<(u32, u64)> {
    if !score.is_finite() || score < 0.0 || score >= (PRIORITIES as u64 * STEP) as f64 {
        return None;
    }
    let s = score as u64;
    Some((PRIORITIES as u32 - (s / STEP) as u32, s % STEP))
}

/// How long an entry outlives its gateway's last round (and how long a view holds):
/// five sync intervals, at least one second.
pub fn lease_ms(sync_ms: u32) -> u64 {
    (5 * u64::from(sync_ms)).max(1_000)
}

/// Per priority (index priority - 1), the count and oldest arrival (Unix ms) of the
/// head's entries that are not `own` (members `<own>/...`); entries that do not
/// parse are skipped.
pub fn summarize(head: &[(String, f64)], own: &str) -> [(u64, u64); PRIORITIES] {
    let mut out = [(0u64, u64::MAX); PRIORITIES];
    for (member, s) in head {
        if member.split_once('/').is_some_and(|(g, _)| g == own) {
            continue;
        }
        let Some((p, arrival)) = decode(*s) else { continue };
        let o = &mut out[p as usize - 1];
        o.0 += 1;
        o.1 = o.1.min(arrival);
    }
    out
}

/// The script's answer: lost, the queue's length, its head (member, score).
type Reply = (u8, u64, Vec<(String, f64)>);

/// What this gateway's thread last mirrored, per pool name: its members' tickets.
#[derive(Default)]
pub struct Mirror {
    pools: HashMap<String, HashSet<u64>>,
    /// The script's SHA1 as Redis named it (`SCRIPT LOAD`): rounds send `EVALSHA`.
    sha: Option<String>,
}

/// Clear every pool's view: the local queue alone decides (a round failed).
pub fn forget(b: &Balancer) {
    let Ok(topo) = b.topology() else { return };
    for p in &topo.pools {
        if let Some(ps) = b.region().pool(p.slot) {
            // Release, as every store of `until_ms` (see `FleetView`).
            ps.fleet.until_ms.store(0, Ordering::Release);
        }
    }
}

impl Mirror {
    fn sha(&mut self, conn: &mut Connection) -> Result<String, String> {
        if let Some(s) = &self.sha {
            return Ok(s.clone());
        }
        let sha: String = redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(SCRIPT)
            .query(conn)
            .map_err(|e| format!("loading the fleet queue's script: {e}"))?;
        self.sha = Some(sha.clone());
        Ok(sha)
    }

    /// One round of every pool that queues (or had waiters mirrored): see the module
    /// documentation. `prefix` and `gateway` from the cluster config.
    pub fn round(
        &mut self,
        b: &Balancer,
        conn: &mut Connection,
        prefix: &str,
        gateway: &str,
        sync_ms: u32,
        now_unix: u64,
    ) -> Result<(), String> {
        let topo = b.topology().map_err(|e| e.to_string())?;
        let lease = lease_ms(sync_ms);
        for p in &topo.pools {
            let Some(q) = Queue::of(b.region(), p.slot) else {
                continue;
            };
            let on = q.qp.enabled.load(Ordering::Relaxed) != 0;
            if !on && !self.pools.contains_key(&p.name) {
                q.ps.fleet.until_ms.store(0, Ordering::Release);
                continue;
            }
            let now_mono = clock::now_ms();
            let waiting: HashMap<u64, (u32, u64)> = if on {
                q.waiting().map(|(t, p, at)| (t, (p, at))).collect()
            } else {
                HashMap::new()
            };
            let key = format!("{prefix}q:{}", p.name);
            let mut fresh = !self.pools.contains_key(&p.name);
            for _ in 0..3 {
                let sha = self.sha(conn)?;
                let had = self.pools.entry(p.name.clone()).or_default();
                if fresh {
                    had.clear();
                }
                let mut inv = redis::cmd("EVALSHA");
                inv.arg(sha)
                    .arg(3)
                    .arg(&key)
                    .arg(format!("{key}:gw"))
                    .arg(format!("{key}:gw:{gateway}"))
                    .arg(now_unix)
                    .arg(now_unix + lease)
                    .arg(gateway)
                    .arg(u8::from(fresh))
                    .arg(HEAD);
                let adds: Vec<(&u64, &(u32, u64))> =
                    waiting.iter().filter(|(t, _)| !had.contains(t)).collect();
                inv.arg(adds.len());
                for (t, &(prio, at)) in &adds {
                    let arrival = now_unix.saturating_sub(now_mono.saturating_sub(at));
                    inv.arg(score(prio, arrival)).arg(format!("{gateway}/{t}"));
                }
                for t in had.iter().filter(|t| !waiting.contains_key(t)) {
                    inv.arg(format!("{gateway}/{t}"));
                }
                let reply: redis::RedisResult<Reply> = inv.query(conn);
                let (lost, len, head) = match reply {
                    Ok(r) => r,
                    Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                        // A restarted Redis forgot it: load it again (nothing was done).
                        self.sha = None;
                        continue;
                    }
                    Err(e) => return Err(format!("fleet queue of pool {}: {e}", p.name)),
                };
                *had = waiting.keys().copied().collect();
                if lost == 1 && !fresh {
                    // Our entries were purged: send them all again, now.
                    fresh = true;
                    continue;
                }
                let v = &q.ps.fleet;
                let own = had.len() as u64;
                for (i, (n, oldest)) in summarize(&head, gateway).into_iter().enumerate() {
                    let mono = now_mono.saturating_sub(now_unix.saturating_sub(oldest));
                    // Relaxed: published by the Release store of `until_ms` below.
                    v.ahead[i].store(fleet::pack(mono, n), Ordering::Relaxed);
                }
                let clamp = |n: u64| n.min(u64::from(u32::MAX)) as u32;
                v.waiting.store(clamp(len), Ordering::Relaxed);
                v.elsewhere
                    .store(clamp(len.saturating_sub(own)), Ordering::Relaxed);
                // Release: the words above are visible to whoever sees the view valid.
                v.until_ms.store(clock::now_ms() + lease, Ordering::Release);
                break;
            }
            if !on {
                self.pools.remove(&p.name);
                q.ps.fleet.until_ms.store(0, Ordering::Release);
            }
        }
        let live: HashSet<&str> = topo.pools.iter().map(|p| p.name.as_str()).collect();
        self.pools.retain(|name, _| live.contains(name.as_str()));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_order_by_priority_then_arrival() {
        let now = 1_796_000_000_000; // 2026 in Unix ms
        assert!(score(9, now + 5_000) < score(8, now), "higher priority first");
        assert!(score(5, now) < score(5, now + 1), "then the older");
        assert_eq!(score(10, now), now);
        assert_eq!(score(1, 0), 9 * STEP);
        assert_eq!(score(0, now), score(1, now), "priorities are clamped");
        assert_eq!(score(11, now), score(10, now));
        // Exact in a double (Redis's score) up to the largest.
        let top = score(1, STEP - 1);
        assert_eq!(top as f64 as u64, top);
        for (p, t) in [(1, now), (5, 0), (10, now + 123), (1, STEP - 1)] {
            assert_eq!(decode(score(p, t) as f64), Some((p, t)));
        }
    }

    #[test]
    fn scores_from_outside_are_checked() {
        assert_eq!(decode(f64::NAN), None);
        assert_eq!(decode(-1.0), None);
        assert_eq!(decode(f64::INFINITY), None);
        assert_eq!(decode((10 * STEP) as f64), None);
        assert_eq!(decode(1.5), Some((10, 1)), "a fraction is truncated");
    }

    #[test]
    fn the_summary_leaves_this_gateway_out() {
        let head = vec![
            ("B/1".to_string(), score(9, 2_000) as f64),
            ("A/7".to_string(), score(9, 1_000) as f64),
            ("B/2".to_string(), score(9, 1_500) as f64),
            ("C/4".to_string(), score(3, 500) as f64),
            ("B/junk".to_string(), f64::NAN),
            ("AB/3".to_string(), score(2, 100) as f64),
        ];
        let s = summarize(&head, "A");
        assert_eq!(
            s[8],
            (2, 1_500),
            "B's two of priority 9, oldest 1500 (A's own left out)"
        );
        assert_eq!(s[2], (1, 500));
        assert_eq!(s[1], (1, 100), "a gateway named AB is not A");
        assert_eq!(s.iter().map(|x| x.0).sum::<u64>(), 4);
    }

    #[test]
    fn leases_are_five_rounds_at_least_a_second() {
        assert_eq!(lease_ms(100), 1_000);
        assert_eq!(lease_ms(1_000), 5_000);
    }
}
