//! Token and request budgets counted fleet-wide, and provider headroom shared: the
//! sync round's part that publishes what this gateway knows of its nodes' rate limits
//! and takes back what the rest of the fleet knows (the words the request path reads:
//! `crate::fleet::remote_budget` and the headroom words of `crate::headroom`).
//!
//! **Budgets** (`tpm`, `rpm`). Every gateway counts its own window of reservations on
//! a node (`crate::headroom`). Each round it writes that window into the node's hash
//! `<prefix>bud:<pool>/<node>` (one field per gateway: "unix_ms tokens requests") and
//! reads the sum of the other gateways' fields, which `set_remote_budget` stores for
//! two sync intervals: every reservation's CAS then checks this gateway's window plus
//! that sum against the limits. A field older than the fleet's lease is dropped (a
//! dead gateway's use stops counting), and the hash expires after the lease when
//! nobody writes it. The bound: a reservation at another gateway reaches this one at
//! its next round after that gateway's next round, so the fleet's window passes the
//! limit by at most what the other gateways reserve within two sync intervals (plus
//! one request's estimate per gateway, as alone).
//!
//! **Headroom.** What a node's rate-limit headers said at this gateway (what is left
//! of requests and tokens, and until when: the live headroom words, less the picks
//! made here since) is merged into the hash `<prefix>hr` (field `<pool>/<node>|r` or
//! `|t`: "left reset_unix_ms") by the rule of [`merge`], and every live record of the
//! hash comes back into every gateway's words (`Balancer::note_fleet_headroom`), where
//! picks take their share off it: a node that said "0 left until T" at one gateway is
//! passed over by all of them until T, within a round. Records whose reset passed are
//! deleted, and the hash expires at the latest reset it holds.
//!
//! One `EVAL` per round for both, whatever the number of nodes, atomic in Redis (also
//! when no node here has a budget or said anything: this gateway still learns what
//! the fleet's nodes said). Nothing here runs on the request
//! path: the sync thread writes shared memory, requests read it.

use redis::Connection;

use crate::balancer::{Balancer, Left};
use crate::fleet;
use crate::headroom;
use crate::shm::clock;

/// The fleet's record of one headroom dimension: what is left, until when (Unix ms).
pub type Record = (u64, u64);

/// Merge a gateway's record `new` into the fleet's `stored` at `now` (Unix ms): the
/// rule the script applies (its unit tests run this), the same as a gateway's own
/// words follow (`crate::headroom::note`). A stored record whose reset passed says
/// nothing: `new` replaces it. While it runs, the lower remaining is kept with the
/// later reset: responses arrive out of order, picks since a snapshot only ever
/// lower what is left, and a node that said 0 takes nothing until its reset. So the
/// fleet keeps what one gateway seeing every response would keep. (A rule laxer
/// than the words' own would not hold: every gateway takes the record into its
/// words and publishes them again.)
#[cfg_attr(not(test), allow(dead_code))]
pub fn merge(stored: Option<Record>, new: Record, now: u64) -> Record {
    match stored {
        Some((left, reset)) if reset > now => (left.min(new.0), reset.max(new.1)),
        _ => new,
    }
}

/// The furthest reset a record from Redis (a value from outside) may name: a day
/// (the pool's `cooldown.max_retry_after_ms` caps it further). Its remaining is
/// clamped as a headroom word's, and the budget sums by `fleet::set_remote_budget`.
const MAX_RESET_MS: u64 = 86_400_000;

/// Most headroom records taken from Redis in one round (a value from outside).
const MAX_RECORDS: usize = 20_000;

/// A record's reset comes into this gateway's words this much earlier than Redis
/// says (ms). Resets cross between the Unix clock (Redis) and the coarse monotonic
/// one (the words) every round, a few ms off each time; every gateway publishes its
/// words again and the merge keeps the later reset, so without this margin those
/// errors would add up round after round and push a reset ever later. With it, a
/// record taken in is always earlier than the one it came from, and the record in
/// Redis stays where the gateway that heard the response put it.
const CLOCK_SLOP_MS: u64 = 20;

/// The script of one round. `KEYS`: the budget hashes, then the headroom hash.
/// `ARGV`: this gateway, now (Unix ms), the lease (ms), the number of budget keys,
/// then per budget key this gateway's tokens and requests in the window, then per
/// headroom record this gateway holds its field (`pool/node|r` or `|t`), left and
/// reset (Unix ms). Returns per budget key the others' tokens and requests, then one
/// row of the fleet's live headroom records: field, left, reset, ...
const SCRIPT: &str = r"
local me, now, ttl, nb = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local out = {}
for k = 1, nb do
  local t, r = 0, 0
  local all = redis.call('HGETALL', KEYS[k])
  for i = 1, #all, 2 do
    if all[i] ~= me then
      local at, ot, orq = string.match(all[i + 1], '^(%d+) (%d+) (%d+)$')
      if at and tonumber(at) + ttl > now then
        t, r = t + tonumber(ot), r + tonumber(orq)
      else
        redis.call('HDEL', KEYS[k], all[i])
      end
    end
  end
  redis.call('HSET', KEYS[k], me, ARGV[2] .. ' ' .. ARGV[3 + 2 * k] .. ' ' .. ARGV[4 + 2 * k])
  redis.call('PEXPIRE', KEYS[k], ttl)
  out[#out + 1] = {string.format('%d', t), string.format('%d', r)}
end
local hr = KEYS[nb + 1]
local function parse(v)
  if not v then return nil end
  local l, r = string.match(v, '^(%d+) (%d+)$')
  return tonumber(l), tonumber(r)
end
for a = 5 + 2 * nb, #ARGV, 3 do
  local f, left, reset = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local sl, sr = parse(redis.call('HGET', hr, f))
  if sl and sr > now then left, reset = math.min(sl, left), math.max(sr, reset) end
  if reset > now then redis.call('HSET', hr, f, string.format('%d %d', left, reset)) end
end
local all, live, last = redis.call('HGETALL', hr), {}, 0
for i = 1, #all, 2 do
  local l, r = parse(all[i + 1])
  if l and r > now then
    live[#live + 1] = all[i]
    live[#live + 1] = string.format('%d', l)
    live[#live + 1] = string.format('%d', r)
    if r > last then last = r end
  else
    redis.call('HDEL', hr, all[i])
  end
end
if last > now then redis.call('PEXPIREAT', hr, string.format('%d', last)) end
out[#out + 1] = live
return out
";

/// What the budgets part keeps between rounds: nothing yet (the type keeps the
/// round's call line in `sync` the same as its siblings').
#[derive(Default)]
pub(super) struct Budgets;

/// A headroom word as the fleet's record: (left, reset in Unix ms).
fn record(w: &std::sync::atomic::AtomicU64, now_mono: u64, now_unix: u64) -> Option<Record> {
    headroom::said(w, now_mono).map(|(left, reset)| (left, now_unix + (reset - now_mono)))
}

/// A record read back from Redis, clamped, its reset [`CLOCK_SLOP_MS`] earlier;
/// `None` when that passed.
fn parse_record(left: u64, reset: u64, now_unix: u64) -> Option<Left> {
    let reset_ms = reset.saturating_sub(now_unix + CLOCK_SLOP_MS);
    (reset_ms > 0).then(|| Left {
        remaining: left.min(headroom::LEFT_MAX),
        reset_ms: reset_ms.min(MAX_RESET_MS) as u32,
    })
}

impl Budgets {
    /// Publish this gateway's windows and headroom, take the fleet's in.
    pub(super) fn round(
        &mut self,
        b: &Balancer,
        conn: &mut Connection,
        prefix: &str,
        gateway: &str,
        (_, lease_ms, valid_ms): (u64, u64, u64),
    ) -> Result<(), String> {
        let topo = b.topology().map_err(|e| e.to_string())?;
        let region = b.region();
        // Both clocks read together: resets cross between them.
        let (now, now_unix) = (clock::now_ms(), super::sync::unix_ms());
        let (mut budgeted, mut said) = (Vec::new(), Vec::new());
        for p in &topo.pools {
            for nt in &p.nodes {
                let Some(n) = region.node(nt.slot) else { continue };
                if headroom::limits(n) != (0, 0) {
                    let key = format!("{prefix}bud:{}/{}", p.name, nt.id);
                    budgeted.push((nt.slot, key, headroom::window(n, now)));
                }
                for (w, dim) in [(&n.headroom_requests, 'r'), (&n.headroom_tokens, 't')] {
                    if let Some((left, reset)) = record(w, now, now_unix) {
                        said.push((format!("{}/{}|{dim}", p.name, nt.id), left, reset));
                    }
                }
            }
        }
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(SCRIPT).arg(budgeted.len() + 1);
        for (_, key, _) in &budgeted {
            cmd.arg(key);
        }
        cmd.arg(format!("{prefix}hr"));
        cmd.arg(gateway).arg(now_unix).arg(lease_ms).arg(budgeted.len());
        for (_, _, (t, r)) in &budgeted {
            cmd.arg(*t).arg(*r);
        }
        for (field, left, reset) in &said {
            cmd.arg(field).arg(*left).arg(*reset);
        }
        let mut rows: Vec<Vec<String>> = cmd.query(conn).map_err(|e| e.to_string())?;
        let records = rows.pop().unwrap_or_default();
        if rows.len() != budgeted.len() {
            return Err(format!(
                "budgets: {} rows for {} nodes",
                rows.len(),
                budgeted.len()
            ));
        }
        let until = clock::now_ms() + valid_ms;
        for ((slot, ..), row) in budgeted.iter().zip(&rows) {
            let num = |i: usize| row.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            if let Some(n) = region.node(*slot) {
                fleet::set_remote_budget(n, num(0), num(1), until);
            }
        }
        for rec in records.chunks_exact(3).take(MAX_RECORDS) {
            let Some(((pool, id), dim)) = rec[0]
                .rsplit_once('|')
                .and_then(|(m, d)| Some((m.split_once('/')?, d)))
            else {
                continue;
            };
            let (Ok(left), Ok(reset)) = (rec[1].parse::<u64>(), rec[2].parse::<u64>()) else {
                continue;
            };
            let (Ok(slot), Some(l)) = (b.node_index(pool, id), parse_record(left, reset, now_unix)) else {
                continue;
            };
            let (rq, tk) = match dim {
                "r" => (Some(l), None),
                "t" => (None, Some(l)),
                _ => continue,
            };
            // A node removed since the topology was read: nothing to do.
            let _ = b.note_fleet_headroom(slot, rq, tk);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_keeps_the_lower_remaining_until_the_reset() {
        let now = 1_000_000;
        // Nothing stored, or stored and reset: the new record.
        assert_eq!(merge(None, (5, now + 10_000), now), (5, now + 10_000));
        assert_eq!(merge(Some((0, now)), (50, now + 10_000), now), (50, now + 10_000));
        // While it runs: the lower remaining, the later reset, in either order.
        assert_eq!(
            merge(Some((10, now + 10_000)), (3, now + 10_500), now),
            (3, now + 10_500)
        );
        assert_eq!(
            merge(Some((3, now + 10_500)), (10, now + 10_000), now),
            (3, now + 10_500)
        );
        // An older snapshot with an earlier reset gives nothing back.
        assert_eq!(
            merge(Some((0, now + 30_000)), (100, now + 5_000), now),
            (0, now + 30_000)
        );
    }

    #[test]
    fn a_later_reset_replaces_the_record_once_it_passed() {
        let now = 1_000_000;
        let stored = Some((2, now + 5_000));
        assert_eq!(merge(stored, (100, now + 60_000), now), (2, now + 60_000));
        assert_eq!(merge(stored, (0, now + 60_000), now), (0, now + 60_000));
        assert_eq!(
            merge(stored, (100, now + 60_000), now + 5_000),
            (100, now + 60_000)
        );
        // Merging is order-free while the record runs (every gateway's rounds
        // interleave differently).
        let (x, y, z) = ((7, now + 1_000), (3, now + 9_000), (5, now + 4_000));
        let one = merge(Some(merge(Some(x), y, now)), z, now);
        let two = merge(Some(merge(Some(z), x, now)), y, now);
        assert_eq!(one, two);
        assert_eq!(one, (3, now + 9_000));
    }

    #[test]
    fn records_from_redis_are_clamped() {
        let now = 1_000;
        assert_eq!(parse_record(5, 999, now), None, "reset passed");
        assert_eq!(
            parse_record(5, now + CLOCK_SLOP_MS, now),
            None,
            "within the margin"
        );
        assert_eq!(
            parse_record(5, 2_000 + CLOCK_SLOP_MS, now),
            Some(Left {
                remaining: 5,
                reset_ms: 1_000
            })
        );
        assert_eq!(
            parse_record(u64::MAX, u64::MAX, now),
            Some(Left {
                remaining: headroom::LEFT_MAX,
                reset_ms: MAX_RESET_MS as u32
            })
        );
    }
}
