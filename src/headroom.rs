//! Provider headroom and token/request budgets: whether a node's rate limits leave
//! room for one more request, kept in its shared slot for every worker.
//!
//! **Headroom** (providers that say): OpenAI answers with
//! `x-ratelimit-remaining-{requests,tokens}` and `x-ratelimit-reset-{requests,tokens}`,
//! Anthropic with `anthropic-ratelimit-{requests,tokens}-{remaining,reset}`
//! (`crate::headers` parses them). Each dimension is one word per node: what is left
//! and when it resets (`(left + 1) << 40 | reset_ms`, coarse monotonic ms; 0 when the
//! node never said). A response is a snapshot taken when the node answered; picks made
//! since were not in it, so every pick takes its share off the word (1 request, the
//! request's token estimate) with a CAS that refuses to go below zero. A new snapshot
//! only ever lowers what is left before the known reset (the later of the two resets
//! is kept): responses reach the log phase out of order (a stream ends minutes after
//! its headers were sent), and a late one must not give back what picks since took.
//! Once the reset has passed, the word says nothing until the next response.
//! A node is passed over while fewer requests than 1 or fewer tokens than the
//! request's estimate are left; nothing left at all ([`out_until`]) is a time the
//! node is out for every request, which `crate::node` adds to its availability; the
//! report of a response saying 0 also starts a cooldown until the reset.
//!
//! **Budgets** (providers that do not say, such as DeepSeek): per node `tpm` and
//! `rpm` in the config. A sliding window of [`BUDGET_SLOTS`] buckets of [`BUCKET_MS`]
//! (10 s) counts the tokens and requests reserved on the node; a bucket leaves the
//! window 60 to 70 s after its reservations were made, never sooner (conservative: the
//! provider's 60 s window always holds less than ours). One word (`budget_used`)
//! holds the window's totals, and a reservation is one CAS on it that re-checks the
//! limits: it succeeds while fewer than `tpm` tokens and `rpm` requests are reserved,
//! so however many workers race, the window never holds more than `tpm` plus one
//! request's estimate (the last reservation let in below the limit). The totals and
//! the buckets move together: whoever changes a bucket (reserve, settle, or expire a
//! stale one, found by the once-per-period sweep or by the next write into it)
//! applies the same change to the totals, so they never drift.
//!
//! **In a fleet** (cluster mode, `crate::cluster`), every gateway counts its own
//! window as above, and the sync round publishes it and reads the sum of the other
//! gateways' (`crate::fleet::remote_budget`, valid for two sync intervals): the CAS
//! re-checks the limits against this gateway's totals plus that sum. The others'
//! part is up to a round or two old, so the fleet's window may pass the limit by what
//! the other gateways reserve between their round and this gateway's next (docs/
//! cluster.md); once the sync stops, the others' part goes stale and each gateway
//! counts alone again. Headroom words learned at another gateway are merged into this
//! one's with [`note`] (by the sync thread, never on the request path).
//!
//! A try's reservation is settled when it is reported ([`settle`]): a served try
//! keeps its estimate, or is corrected to the tokens the node counted (`usage`) when
//! they are known; a try refused (429), failed or cut off gives its tokens back (the
//! node did not spend them; its request stays counted, as providers count refused
//! requests against RPM). A bucket already out of the window is left alone.
//!
//! Nothing here allocates or locks: loads, and CAS loops on the node's own words.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::fleet;
pub use crate::shm::layout::BUDGET_SLOTS;
use crate::shm::layout::{flags, NodeSlot};

/// Width (ms) of a budget window bucket.
pub const BUCKET_MS: u64 = 10_000;
/// The provider-side window budgets model (ms).
pub const WINDOW_MS: u64 = 60_000;
const _: () = assert!((BUDGET_SLOTS as u64 - 1) * BUCKET_MS >= WINDOW_MS);

/// Largest count a headroom word keeps (more is "plenty").
pub const LEFT_MAX: u64 = (1 << 24) - 2;
const STAMP_MASK: u64 = (1 << 40) - 1;
const AMOUNT_MASK: u64 = (1 << 40) - 1;
const TAG_MASK: u64 = (1 << 24) - 1;
/// `tpm`, `rpm` accepted by the config.
pub const TPM_MAX: u32 = 1_000_000_000;
pub const RPM_MAX: u32 = 1_000_000;

// ---------------------------------------------------------------------------------
// Headroom words

fn pack(left: u64, reset_ms: u64) -> u64 {
    ((left.min(LEFT_MAX) + 1) << 40) | (reset_ms & STAMP_MASK)
}

/// What is left and when it resets, while the word is live (said, not reset yet).
fn live(word: u64, now: u64) -> Option<(u64, u64)> {
    let left = word >> 40;
    let reset = word & STAMP_MASK;
    (left != 0 && now < reset).then(|| (left - 1, reset))
}

/// A response said `remaining` is left until `reset_in_ms` from `now`.
pub fn note(w: &AtomicU64, remaining: u64, reset_in_ms: u32, now: u64) {
    let reset = now + reset_in_ms as u64;
    // Relaxed: the word is a value of its own.
    let _ = w.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |cur| {
        Some(match live(cur, now) {
            Some((left, r)) => pack(left.min(remaining), r.max(reset)),
            None => pack(remaining, reset),
        })
    });
}

/// What is left and when it resets (coarse ms), while a response's word is live:
/// what the cluster sync publishes to the fleet.
pub fn said(w: &AtomicU64, now: u64) -> Option<(u64, u64)> {
    live(w.load(Ordering::Relaxed), now)
}

/// What is left now; `None` when nothing is known (never said, or reset since).
pub fn left(w: &AtomicU64, now: u64) -> Option<u64> {
    live(w.load(Ordering::Relaxed), now).map(|(l, _)| l)
}

/// Take `need` off a live word; false (nothing taken) when less is left.
fn take(w: &AtomicU64, need: u64, now: u64) -> bool {
    let mut cur = w.load(Ordering::Relaxed);
    loop {
        let Some((left, reset)) = live(cur, now) else {
            return true;
        };
        if left < need {
            return false;
        }
        match w.compare_exchange_weak(
            cur,
            pack(left - need, reset),
            Ordering::Relaxed,
            Ordering::Relaxed,
        ) {
            Ok(_) => return true,
            Err(v) => cur = v,
        }
    }
}

/// Give back what [`take`] took, while the word is live.
fn give(w: &AtomicU64, n: u64, now: u64) {
    let _ = w.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |cur| {
        live(cur, now).map(|(left, reset)| pack(left + n, reset))
    });
}

/// When a node with nothing left of a dimension gets some back (its reset).
pub fn out_until(n: &NodeSlot, now: u64) -> Option<u64> {
    [&n.headroom_requests, &n.headroom_tokens]
        .iter()
        .filter_map(|w| live(w.load(Ordering::Relaxed), now))
        .filter(|&(left, _)| left == 0)
        .map(|(_, reset)| reset)
        .max()
}

/// Tokens a request needs left: its estimate, at least 1.
fn need_tokens(tokens: u32) -> u64 {
    tokens.max(1) as u64
}

// ---------------------------------------------------------------------------------
// Budget window

fn period(now: u64) -> u64 {
    now / BUCKET_MS
}

fn is_live(tag: u64, cur: u64) -> bool {
    (cur.wrapping_sub(tag) & TAG_MASK) < BUDGET_SLOTS as u64
}

fn bucket(word: u64) -> (u64, u64) {
    (word >> 40, word & AMOUNT_MASK)
}

fn bucket_word(tag: u64, amount: u64) -> u64 {
    ((tag & TAG_MASK) << 40) | amount.min(AMOUNT_MASK)
}

/// (tpm, rpm) of a node; 0: no limit.
pub fn limits(n: &NodeSlot) -> (u64, u64) {
    let w = n.budget_limits.load(Ordering::Relaxed);
    (w & 0xffff_ffff, w >> 32)
}

/// Store a node's configured budget.
pub fn set_limits(n: &NodeSlot, tpm: u32, rpm: u32) {
    n.budget_limits
        .store(((rpm as u64) << 32) | tpm as u64, Ordering::Relaxed);
}

fn used(n: &NodeSlot) -> (u64, u64) {
    let w = n.budget_used.load(Ordering::Relaxed);
    (w & AMOUNT_MASK, w >> 40)
}

/// Add signed amounts to the totals word, saturating at 0 and at the field widths.
fn add_used(n: &NodeSlot, tokens: i64, requests: i64) {
    let _ = n
        .budget_used
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| {
            let (t, r) = (w & AMOUNT_MASK, w >> 40);
            let t = t.saturating_add_signed(tokens).min(AMOUNT_MASK);
            let r = r.saturating_add_signed(requests).min((1 << 24) - 1);
            Some((r << 40) | t)
        });
}

fn under(used: (u64, u64), (tpm, rpm): (u64, u64)) -> bool {
    (tpm == 0 || used.0 < tpm) && (rpm == 0 || used.1 < rpm)
}

/// This gateway's use plus the other gateways' (`remote`, cluster mode: what the last
/// sync round read, `crate::fleet::remote_budget`; (0, 0) without a cluster or once
/// stale).
fn plus((t, r): (u64, u64), remote: (u64, u64)) -> (u64, u64) {
    (t.saturating_add(remote.0), r.saturating_add(remote.1))
}

/// Sum of the live buckets: (tokens, requests) in the window now.
pub fn window(n: &NodeSlot, now: u64) -> (u64, u64) {
    let cur = period(now) & TAG_MASK;
    let sum = |cells: &[AtomicU64; BUDGET_SLOTS]| {
        cells
            .iter()
            .map(|c| bucket(c.load(Ordering::Relaxed)))
            .filter(|&(tag, a)| a != 0 && is_live(tag, cur))
            .map(|(_, a)| a)
            .sum::<u64>()
    };
    (sum(&n.budget_tokens), sum(&n.budget_requests))
}

/// Zero a stale bucket (its period has left the window), taking its amount off the
/// totals: only the CAS winner does.
fn expire(cell: &AtomicU64, cur: u64, tokens: bool, n: &NodeSlot) {
    let mut w = cell.load(Ordering::Relaxed);
    loop {
        let (tag, a) = bucket(w);
        if a == 0 || is_live(tag, cur) {
            return;
        }
        match cell.compare_exchange_weak(w, bucket_word(tag, 0), Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => {
                let a = a as i64;
                if tokens {
                    add_used(n, -a, 0)
                } else {
                    add_used(n, 0, -a)
                }
                return;
            }
            Err(v) => w = v,
        }
    }
}

/// Once per period per node: expire the buckets that left the window.
fn sweep(n: &NodeSlot, now: u64) {
    let cur = period(now);
    let s = n.budget_swept.load(Ordering::Relaxed);
    if s >= cur
        || n.budget_swept
            .compare_exchange(s, cur, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
    {
        return;
    }
    let tag = cur & TAG_MASK;
    for c in &n.budget_tokens {
        expire(c, tag, true, n);
    }
    for c in &n.budget_requests {
        expire(c, tag, false, n);
    }
}

/// Add `x` to the bucket of period `p` (which must be live), replacing a stale one
/// (its amount leaves the totals); `x` goes into the totals by the caller.
fn add_bucket(n: &NodeSlot, p: u64, x: u64, tokens: bool) {
    let cells = if tokens {
        &n.budget_tokens
    } else {
        &n.budget_requests
    };
    let cell = &cells[(p % BUDGET_SLOTS as u64) as usize];
    let tag = p & TAG_MASK;
    let mut w = cell.load(Ordering::Relaxed);
    loop {
        let (t, a) = bucket(w);
        let (next, stale) = if t == tag {
            (bucket_word(tag, a + x), 0)
        } else {
            (bucket_word(tag, x), a)
        };
        match cell.compare_exchange_weak(w, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => {
                if stale != 0 {
                    let s = stale as i64;
                    if tokens {
                        add_used(n, -s, 0)
                    } else {
                        add_used(n, 0, -s)
                    }
                }
                return;
            }
            Err(v) => w = v,
        }
    }
}

/// Does the node's budget take one more request now? (No budget: yes.)
pub fn budget_fits(n: &NodeSlot, now: u64) -> bool {
    let lim = limits(n);
    if lim == (0, 0) {
        return true;
    }
    // The totals may still hold buckets nobody swept (an idle node): then the window.
    let remote = fleet::remote_budget(n, now);
    under(plus(used(n), remote), lim) || under(plus(window(n, now), remote), lim)
}

/// Reserve `tokens` and one request on the node's budget: one CAS on the totals that
/// re-checks the limits. False (nothing reserved) when the window is full.
pub fn reserve(n: &NodeSlot, tokens: u32, now: u64) -> bool {
    let lim = limits(n);
    if lim == (0, 0) {
        return true;
    }
    sweep(n, now);
    let x = tokens as u64;
    let remote = fleet::remote_budget(n, now);
    let won = n
        .budget_used
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| {
            let (t, r) = (w & AMOUNT_MASK, w >> 40);
            under(plus((t, r), remote), lim)
                .then(|| (((r + 1).min((1 << 24) - 1)) << 40) | (t + x).min(AMOUNT_MASK))
        })
        .is_ok();
    if won {
        let p = period(now);
        add_bucket(n, p, x, true);
        add_bucket(n, p, 1, false);
    }
    won
}

/// Move a settled try's tokens in the bucket of its pick (`age_ms` ago) from
/// `reserved` to `actual`, and the totals with it. A bucket that left the window
/// already left the totals: nothing to do.
pub fn settle(n: &NodeSlot, reserved: u32, actual: u32, age_ms: u64, now: u64) {
    if reserved == actual || limits(n) == (0, 0) {
        return;
    }
    let p = period(now.saturating_sub(age_ms));
    let tag = p & TAG_MASK;
    let cell = &n.budget_tokens[(p % BUDGET_SLOTS as u64) as usize];
    let delta = actual as i64 - reserved as i64;
    let mut w = cell.load(Ordering::Relaxed);
    loop {
        let (t, a) = bucket(w);
        if t != tag || !is_live(tag, period(now) & TAG_MASK) {
            return;
        }
        let next = a.saturating_add_signed(delta);
        match cell.compare_exchange_weak(w, bucket_word(tag, next), Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => {
                add_used(n, next as i64 - a as i64, 0);
                return;
            }
            Err(v) => w = v,
        }
    }
}

/// Undo a reservation made a moment ago (its pick fell through): its tokens and
/// its request.
fn unreserve(n: &NodeSlot, tokens: u32, now: u64) {
    settle(n, tokens, 0, 0, now);
    let p = period(now);
    let cell = &n.budget_requests[(p % BUDGET_SLOTS as u64) as usize];
    let tag = p & TAG_MASK;
    let ok = cell.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| {
        let (t, a) = bucket(w);
        (t == tag && a > 0).then(|| bucket_word(tag, a - 1))
    });
    if ok.is_ok() {
        add_used(n, 0, -1);
    }
}

/// When (coarse ms) the budget of a full node takes a request again: the end of the
/// first bucket whose leaving brings the window under its limits. `None` when it
/// is not full.
pub fn budget_free_at(n: &NodeSlot, now: u64) -> Option<u64> {
    let lim = limits(n);
    if budget_fits(n, now) {
        return None;
    }
    let cur = period(now);
    let (mut t, mut r) = window(n, now);
    let remote = fleet::remote_budget(n, now);
    for p in cur.saturating_sub(BUDGET_SLOTS as u64 - 1)..=cur {
        let i = (p % BUDGET_SLOTS as u64) as usize;
        let tag = p & TAG_MASK;
        for (cells, sum) in [(&n.budget_tokens, &mut t), (&n.budget_requests, &mut r)] {
            let (bt, a) = bucket(cells[i].load(Ordering::Relaxed));
            if bt == tag {
                *sum = sum.saturating_sub(a);
            }
        }
        if under(plus((t, r), remote), lim) {
            return Some((p + BUDGET_SLOTS as u64) * BUCKET_MS);
        }
    }
    if remote != (0, 0) {
        // The other gateways' use alone fills it: their buckets leave on their own
        // clocks, which this gateway learns one round at a time; look again at the
        // next period.
        return Some((cur + 1) * BUCKET_MS);
    }
    Some((cur + BUDGET_SLOTS as u64) * BUCKET_MS)
}

// ---------------------------------------------------------------------------------
// What the node layer and the pick ask

/// Does the node have room for a request of `tokens` (0: unknown) now? True for a
/// node with neither headroom words nor a budget (one flag test, already loaded).
/// Counts a refusal in the node's skip counters.
#[inline]
pub fn room(n: &NodeSlot, node_flags: u32, tokens: u32, now: u64) -> bool {
    node_flags & FLAGS == 0 || room_slow(n, node_flags, tokens, now)
}

/// The flags that say a node has headroom words or a budget: without either, every
/// question here has its answer in one flag test (inlined where it is asked).
pub const FLAGS: u32 = flags::HEADROOM | flags::BUDGET;

/// [`room`] for a node with headroom words or a budget.
#[inline(never)]
fn room_slow(n: &NodeSlot, node_flags: u32, tokens: u32, now: u64) -> bool {
    if node_flags & flags::HEADROOM != 0 {
        let short = left(&n.headroom_requests, now).is_some_and(|l| l < 1)
            || left(&n.headroom_tokens, now).is_some_and(|l| l < need_tokens(tokens));
        if short {
            n.headroom_skips.fetch_add(1, Ordering::Relaxed);
            return false;
        }
    }
    if node_flags & flags::BUDGET != 0 && !budget_fits(n, now) {
        n.budget_skips.fetch_add(1, Ordering::Relaxed);
        return false;
    }
    true
}

/// Take a picked request's share of the node's headroom and budget (CAS each, so
/// racing workers cannot both take the last of it). False, with nothing taken, when
/// another pick took it first: the node is not for this request.
#[inline]
pub fn take_share(n: &NodeSlot, tokens: u32, now: u64) -> bool {
    let f = n.flags.load(Ordering::Relaxed);
    f & FLAGS == 0 || take_share_slow(n, f, tokens, now)
}

/// [`take_share`] for a node whose flags `f` say it has headroom words or a budget.
#[inline(never)]
fn take_share_slow(n: &NodeSlot, f: u32, tokens: u32, now: u64) -> bool {
    if f & flags::BUDGET != 0 && !reserve(n, tokens, now) {
        n.budget_skips.fetch_add(1, Ordering::Relaxed);
        return false;
    }
    if f & flags::HEADROOM != 0 {
        let need = need_tokens(tokens);
        if !take(&n.headroom_requests, 1, now) {
            n.headroom_skips.fetch_add(1, Ordering::Relaxed);
            if f & flags::BUDGET != 0 {
                unreserve(n, tokens, now);
            }
            return false;
        }
        if !take(&n.headroom_tokens, need, now) {
            give(&n.headroom_requests, 1, now);
            n.headroom_skips.fetch_add(1, Ordering::Relaxed);
            if f & flags::BUDGET != 0 {
                unreserve(n, tokens, now);
            }
            return false;
        }
    }
    true
}

/// When a node out of headroom or budget for every request comes back (coarse ms);
/// `None` when it is not out.
pub fn out_for_all_until(n: &NodeSlot, f: u32, now: u64) -> Option<u64> {
    if f & (flags::HEADROOM | flags::BUDGET) == 0 {
        return None;
    }
    let hr = if f & flags::HEADROOM != 0 {
        out_until(n, now)
    } else {
        None
    };
    let b = if f & flags::BUDGET != 0 {
        budget_free_at(n, now)
    } else {
        None
    };
    hr.max(b)
}

/// Clear a slot's headroom and budget state (a new node took it).
pub fn reset(n: &NodeSlot) {
    for w in [
        &n.headroom_requests,
        &n.headroom_tokens,
        &n.budget_used,
        &n.budget_swept,
        &n.headroom_skips,
        &n.budget_skips,
    ] {
        w.store(0, Ordering::Relaxed);
    }
    for w in n.budget_tokens.iter().chain(&n.budget_requests) {
        w.store(0, Ordering::Relaxed);
    }
}

/// Live figures of one node for the read models.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Figures {
    /// Requests / tokens the provider said are left (less picks since); `None`: not said.
    pub remaining_requests: Option<u64>,
    pub remaining_tokens: Option<u64>,
    /// Configured budget (0: none) and what the window holds.
    pub tpm: u64,
    pub rpm: u64,
    pub budget_tokens_used: u64,
    pub budget_requests_used: u64,
    pub headroom_skips: u64,
    pub budget_skips: u64,
}

pub fn figures(n: &NodeSlot, now: u64) -> Figures {
    let (tpm, rpm) = limits(n);
    let (t, r) = window(n, now);
    Figures {
        remaining_requests: left(&n.headroom_requests, now),
        remaining_tokens: left(&n.headroom_tokens, now),
        tpm,
        rpm,
        budget_tokens_used: t,
        budget_requests_used: r,
        headroom_skips: n.headroom_skips.load(Ordering::Relaxed),
        budget_skips: n.budget_skips.load(Ordering::Relaxed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shm::layout::Capacity;
    use crate::shm::Region;

    fn region() -> Region {
        Region::create(Capacity {
            max_pools: 1,
            max_nodes: 2,
            max_workers: 2,
            config_bytes: 4096,
            max_waiters: 4,
        })
        .unwrap()
    }

    const T0: u64 = 1_000_000;

    #[test]
    fn a_snapshot_lowers_what_is_left_until_its_reset() {
        let w = AtomicU64::new(0);
        assert_eq!(left(&w, T0), None, "never said");
        note(&w, 10, 2_000, T0);
        assert_eq!(left(&w, T0), Some(10));
        // A late, older snapshot saying more does not give back what picks took.
        assert!(take(&w, 4, T0));
        note(&w, 10, 1_000, T0 + 10);
        assert_eq!(left(&w, T0 + 10), Some(6));
        note(&w, 3, 500, T0 + 20);
        assert_eq!(left(&w, T0 + 20), Some(3));
        // The later reset is kept: still live after the shorter one.
        assert_eq!(left(&w, T0 + 1_999), Some(3));
        assert_eq!(left(&w, T0 + 2_000), None, "reset: nothing known");
        note(&w, 50, 1_000, T0 + 2_000);
        assert_eq!(left(&w, T0 + 2_001), Some(50));
        assert!(!take(&w, 51, T0 + 2_001));
        assert!(take(&w, 50, T0 + 2_001));
        assert!(!take(&w, 1, T0 + 2_001));
        give(&w, 1, T0 + 2_001);
        assert_eq!(left(&w, T0 + 2_001), Some(1));
        note(&w, u64::MAX, 1, T0 + 5_000);
        assert_eq!(left(&w, T0 + 5_000), Some(LEFT_MAX), "clamped");
    }

    #[test]
    fn room_skips_short_nodes_per_request_size() {
        let r = region();
        let n = r.node(0).unwrap();
        assert!(room(n, 0, 5_000, T0), "no flags: always");
        n.flags.store(flags::HEADROOM, Ordering::Relaxed);
        note(&n.headroom_tokens, 1_000, 5_000, T0);
        note(&n.headroom_requests, 100, 5_000, T0);
        let f = flags::HEADROOM;
        assert!(!room(n, f, 5_000, T0), "a big request does not fit");
        assert!(room(n, f, 500, T0), "a small one does");
        assert!(take_share(n, 500, T0));
        assert_eq!(left(&n.headroom_tokens, T0), Some(500));
        assert_eq!(left(&n.headroom_requests, T0), Some(99));
        assert!(!take_share(n, 600, T0));
        assert_eq!(left(&n.headroom_requests, T0), Some(99), "given back");
        assert_eq!(out_for_all_until(n, f, T0), None);
        note(&n.headroom_requests, 0, 2_000, T0 + 1);
        assert_eq!(out_for_all_until(n, f, T0 + 1), Some(T0 + 5_000));
        assert!(!room(n, f, 1, T0 + 1));
        assert!(room(n, f, 1, T0 + 5_000), "after the reset");
        assert_eq!(n.headroom_skips.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn budget_reserves_never_pass_the_limit_by_more_than_one_estimate() {
        let r = region();
        let n = r.node(0).unwrap();
        set_limits(n, 1_000, 0);
        n.flags.store(flags::BUDGET, Ordering::Relaxed);
        let mut now = T0;
        let mut granted = 0;
        for _ in 0..100 {
            if take_share(n, 300, now) {
                granted += 300;
            }
            now += 100;
        }
        assert_eq!(granted, 1_200, "999 left room for one more estimate");
        assert_eq!(window(n, now), (1_200, 4));
        assert!(!budget_fits(n, now));
        // The window's first bucket leaves 60-70 s after it was filled.
        let free = budget_free_at(n, now).unwrap();
        assert_eq!(free, (T0 / BUCKET_MS + BUDGET_SLOTS as u64) * BUCKET_MS);
        assert!((T0 + WINDOW_MS..=T0 + WINDOW_MS + BUCKET_MS).contains(&free));
        assert!(!budget_fits(n, free - 1));
        assert!(budget_fits(n, free));
        // An idle node's stale totals are swept by the next reservation.
        assert!(take_share(n, 300, free));
        assert_eq!(used(n), (300, 1));
        assert_eq!(window(n, free), (300, 1));
    }

    #[test]
    fn a_fleet_counts_the_other_gateways_use_until_it_goes_stale() {
        let r = region();
        let n = r.node(0).unwrap();
        set_limits(n, 1_000, 10);
        n.flags.store(flags::BUDGET, Ordering::Relaxed);
        // The others hold 900 tokens of the window: one 300 fits (900 < 1000), not two.
        fleet::set_remote_budget(n, 900, 2, T0 + 200);
        assert!(budget_fits(n, T0));
        assert!(take_share(n, 300, T0));
        assert!(!take_share(n, 1, T0));
        assert_eq!(window(n, T0), (300, 1), "only this gateway's own use is local");
        // Full: free once this gateway's bucket leaves; full because of the others
        // alone: looked at again at the next period.
        let p = T0 / BUCKET_MS;
        assert_eq!(budget_free_at(n, T0), Some((p + BUDGET_SLOTS as u64) * BUCKET_MS));
        fleet::set_remote_budget(n, 1_000, 2, T0 + 200);
        assert_eq!(budget_free_at(n, T0), Some((p + 1) * BUCKET_MS));
        // The others' requests count too.
        fleet::set_remote_budget(n, 0, 9, T0 + 200);
        assert!(!take_share(n, 0, T0 + 1), "1 + 9 requests: rpm 10 reached");
        // Stale (Redis down, sync gone): alone again.
        assert!(take_share(n, 300, T0 + 200));
        assert_eq!(window(n, T0 + 200), (600, 2));
        assert_eq!(budget_free_at(n, T0 + 200), None);
    }

    #[test]
    fn rpm_counts_requests() {
        let r = region();
        let n = r.node(0).unwrap();
        set_limits(n, 0, 3);
        n.flags.store(flags::BUDGET, Ordering::Relaxed);
        let ok = (0..10).filter(|_| take_share(n, 0, T0)).count();
        assert_eq!(ok, 3);
        assert_eq!(window(n, T0), (0, 3));
    }

    #[test]
    fn settle_reconciles_and_gives_back() {
        let r = region();
        let n = r.node(0).unwrap();
        set_limits(n, 1_000, 0);
        n.flags.store(flags::BUDGET, Ordering::Relaxed);
        assert!(take_share(n, 800, T0));
        assert!(take_share(n, 200, T0));
        assert!(!take_share(n, 100, T0 + 1), "800 + 200 is the limit");
        // The first try used 150 tokens (usage), the second was refused (429): 0.
        settle(n, 800, 150, 5_000, T0 + 5_000);
        settle(n, 200, 0, 4_000, T0 + 5_000);
        assert_eq!(used(n), (150, 2), "the requests stay counted");
        assert_eq!(window(n, T0 + 5_000), (150, 2));
        // More than the estimate: the window holds what the node counted.
        assert!(take_share(n, 100, T0 + 6_000));
        settle(n, 100, 2_000, 1_000, T0 + 7_000);
        assert_eq!(used(n), (2_150, 3));
        assert!(!budget_fits(n, T0 + 7_000));
        // A settle whose bucket left the window changes nothing.
        let later = T0 + 80_000;
        settle(n, 100, 0, 74_000, later);
        assert!(take_share(n, 10, later));
        assert_eq!(used(n), (10, 1));
    }

    #[test]
    fn racing_reservations_from_threads_stay_within_one_estimate() {
        let r = region();
        let n = r.node(0).unwrap();
        set_limits(n, 10_000, 0);
        n.flags.store(flags::BUDGET, Ordering::Relaxed);
        let granted = AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..1_000 {
                        if take_share(n, 777, T0) {
                            granted.fetch_add(777, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        let g = granted.load(Ordering::Relaxed);
        assert!((10_000..10_000 + 777).contains(&g), "{g}");
        assert_eq!(used(n).0, g);
        assert_eq!(window(n, T0).0, g);
    }
}
