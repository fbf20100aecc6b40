//! Learned concurrency limits split across the fleet by demand: the sync round's
//! part that publishes this gateway's demand for each limited node and takes its
//! share of the node's fleet-wide limit (the design: the module documentation of
//! `crate::cluster`, "Concurrency shares"; the words in shared memory:
//! `crate::fleet`).
//!
//! One `EVAL` per round, whatever the number of nodes: the script runs atomically in
//! Redis, so however the gateways' rounds interleave, the shares it grants never add
//! up to more than the node's fleet limit.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use redis::Connection;

use crate::balancer::Balancer;
use crate::fleet::{self, SHARE_MAX};
use crate::limit::LIMIT_ONE;
use crate::shm::clock;

/// The script of one round. `KEYS[1]` the fleet (`<prefix>gws`), then one hash per
/// node (`<prefix>share:<pool>/<node>`): field `~` the node's fleet limit (fixed
/// point as `NodeSlot::limit`), a field per gateway "demand inflight held". `ARGV`:
/// this gateway, now (Unix ms), the hashes' time to live (ms), then per node its
/// demand, its learned limit now, the fleet limit it took last round (its base), its
/// tries in flight, the share it wants, and the pool's `limit.max` (fixed point).
///
/// Per node it merges this gateway's learning into the fleet limit: a limit lower
/// than its base (or any, without a base: a gateway that just joined) is a 429
/// learned here, and the fleet's becomes the lower of the two;
/// a higher one is AIMD increases earned here, added to the fleet's (so the fleet
/// raises it at the pace one gateway seeing all the traffic would). It drops the
/// fields of gateways no longer in the fleet, grants `min(want, limit - what the
/// others hold)`, and records what this gateway holds: its grant, or its tries in
/// flight if more (tries started under a larger share still run). Returns per node:
/// the grant (-1: no fleet limit), the fleet limit, the others' tries in flight, then
/// each other gateway's name and demand.
const SCRIPT: &str = r"
local live = {}
for _, g in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[2], '+inf')) do live[g] = true end
local me, ttl, out = ARGV[1], ARGV[3], {}
for k = 2, #KEYS do
  local a = 4 + (k - 2) * 6
  local d, l, base, inf = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local want, max = tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5])
  local all = redis.call('HGETALL', KEYS[k])
  local others, held, remote, f = {}, 0, 0, 0
  for i = 1, #all, 2 do
    local g = all[i]
    if g == '~' then
      f = tonumber(all[i + 1]) or 0
    elseif g ~= me then
      if live[g] then
        local od, oi, oh = string.match(all[i + 1], '^(%d+) (%d+) (%d+)$')
        if od then
          held, remote = held + tonumber(oh), remote + tonumber(oi)
          others[#others + 1] = g
          others[#others + 1] = od
        end
      else
        redis.call('HDEL', KEYS[k], g)
      end
    end
  end
  if l > 0 then
    if f == 0 or ((base == 0 or l < base) and l < f) then
      f = l
    elseif l > base and base > 0 then
      f = math.min(f + (l - base), max)
    end
    redis.call('HSET', KEYS[k], '~', string.format('%d', f))
  end
  local grant, h = -1, inf
  if f > 0 then
    grant = math.max(0, math.min(want, math.floor(f / 65536) - held))
    h = math.max(grant, inf)
  end
  redis.call('HSET', KEYS[k], me, string.format('%d %d %d', d, inf, h))
  redis.call('PEXPIRE', KEYS[k], ttl)
  local row = {tostring(grant), string.format('%d', f), tostring(remote)}
  for _, v in ipairs(others) do row[#row + 1] = v end
  out[#out + 1] = row
end
return out
";
const _: () = assert!(LIMIT_ONE == 65_536);

/// What the shares keep between rounds.
#[derive(Default)]
pub(super) struct Shares {
    /// Per node slot, its `fleet_skips` as the last round read it.
    skips: HashMap<u32, u64>,
    /// Per `pool/node`, what the last round saw: the other gateways' demands and the
    /// fleet limit it took (this round asks for its part of that limit by its demand
    /// now and theirs: `fleet::want`).
    seen: HashMap<String, (Vec<(String, u64)>, u64)>,
}

/// Most gateways a node's hash answers with (a value from outside).
const MAX_GATEWAYS: usize = 1_000;

impl Shares {
    /// Publish this gateway's demand on every node whose pool learns limits, and take
    /// its shares into the shared region (each counting for `valid_ms`).
    pub(super) fn round(
        &mut self,
        b: &Balancer,
        conn: &mut Connection,
        keys: (&str, &str),
        gateway: &str,
        (now_unix, ttl_ms, valid_ms): (u64, u64, u64),
    ) -> Result<(), String> {
        let (gws, prefix) = keys;
        let topo = b.topology().map_err(|e| e.to_string())?;
        let region = b.region();
        let mut nodes = Vec::new();
        for p in topo
            .pools
            .iter()
            .filter(|p| p.policy.limit.enabled && p.policy.limit.fleet)
        {
            let max = u64::from(p.policy.limit.max) * LIMIT_ONE;
            // Requests waiting in the pool's admission queue (`fleet::demand`).
            let waiting = region
                .pool(p.slot)
                .map_or(0, |ps| ps.queue_len.load(Ordering::Relaxed));
            for nt in &p.nodes {
                if let Some(n) = region.node(nt.slot) {
                    nodes.push((format!("{}/{}", p.name, nt.id), nt.slot, n, (max, waiting)));
                }
            }
        }
        if nodes.is_empty() {
            return Ok(());
        }
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(SCRIPT).arg(nodes.len() + 1).arg(gws);
        for (member, ..) in &nodes {
            cmd.arg(format!("{prefix}share:{member}"));
        }
        cmd.arg(gateway).arg(now_unix).arg(ttl_ms);
        let mut sent = Vec::with_capacity(nodes.len());
        for (member, slot, n, (max, waiting)) in &nodes {
            let inflight = n.inflight.load(Ordering::Relaxed);
            let skips = n.fleet_skips.load(Ordering::Relaxed);
            let unmet = skips.saturating_sub(self.skips.get(slot).copied().unwrap_or(skips));
            self.skips.insert(*slot, skips);
            let demand = fleet::demand(inflight, fleet::cap(n, clock::now_ms()), unmet, *waiting);
            let limit = n.limit.load(Ordering::Relaxed);
            sent.push((demand, limit));
            let (want, base) = match self.seen.get(member) {
                Some((others, limit)) if *limit > 0 => {
                    let others: Vec<(&str, u64)> = others.iter().map(|(g, d)| (g.as_str(), *d)).collect();
                    let whole = (limit / LIMIT_ONE).min(SHARE_MAX as u64) as u32;
                    (fleet::want(whole, &others, gateway, demand), *limit)
                }
                Some((_, limit)) => (SHARE_MAX, *limit),
                None => (SHARE_MAX, 0),
            };
            cmd.arg(demand)
                .arg(limit)
                .arg(base)
                .arg(inflight)
                .arg(want)
                .arg(max);
        }
        let rows: Vec<Vec<String>> = cmd.query(conn).map_err(|e| e.to_string())?;
        let until = clock::now_ms() + valid_ms;
        for ((member, _, n, _), (row, (_, limit_sent))) in nodes.iter().zip(rows.iter().zip(sent)) {
            let num = |i: usize| row.get(i).and_then(|v| v.parse::<i64>().ok()).unwrap_or(0);
            let (grant, limit, remote) = (num(0), num(1).max(0) as u64, num(2).clamp(0, u32::MAX as i64));
            let share = (grant >= 0).then(|| grant.min(SHARE_MAX as i64) as u32);
            fleet::set_share(n, share, remote as u32, (limit, limit_sent), until);
            let others = row
                .get(3..)
                .unwrap_or_default()
                .chunks_exact(2)
                .take(MAX_GATEWAYS)
                .map(|c| (c[0].clone(), c[1].parse().unwrap_or(0)))
                .collect();
            self.seen.insert(
                member.clone(),
                (others, if limit > 0 { limit } else { limit_sent }),
            );
        }
        Ok(())
    }
}
