//! Sliding windows of two counters in one word per bucket: the retry budget's
//! requests and retries of a pool over the last `window_ms` (`BUDGET_BUCKETS` buckets
//! per tally row; `crate::retry::headroom` decides), and each node's recent tries and
//! failed or 429 ones (`RECENT_BUCKETS`, for the status page). `crate::tally` sums the
//! rows.
//!
//! Each bucket is one 64-bit word holding a 16-bit bucket tag and two 24-bit
//! counters, so recording is a single store (a worker's own row) or a single CAS (the
//! shared row), and a stale bucket is reset by whoever first writes into it.
//!
//! **Reserved retries** ([`Quota`]). The retry check runs on every pick, and the exact
//! answer sums the current bucket of every tally row. Within one bucket period the
//! window's requests only grow (so what it allows only grows) and its retries grow
//! only by the retries picked. So a worker that finds headroom `H` (what the budget
//! allows, rounded down, less the retries counted) may take some of it for itself:
//! it adds `q <= H / rows` retries to the shared row's current bucket at once, and
//! then answers "yes" without summing while it has reserved retries left; each retry
//! it picks takes one of them instead of being counted again. Every other worker's
//! sum sees the reservation as retries already made, so together the workers never
//! pass the budget by more than the exact check does (it too lets every request in
//! flight that was told "yes" retry; `rows` bounds what simultaneous reservations,
//! each of `H / rows` of the same `H`, can take). The reservation is taken on the
//! retry picked, not on the "yes" answered: a "yes" is answered on most requests and
//! turns into a retry on few, and only a picked retry is what the budget counts.
//! Reserved retries left when the period ends are given back (subtracted from the
//! bucket they were added to) by the worker's first check of a later period (a
//! worker that summed that bucket before then counts them until its next period:
//! stricter, never looser). Only a worker's own tables reserve (the owner thread's
//! copy of a handle with a worker row), so at most one quota per worker row. A
//! worker reserves only after [`Quota::EXACT_CHECKS`] exact checks in a period, and
//! only as many as it took in the previous period (at least one, doubling while it
//! runs out within a period): a worker that checks fewer times a bucket period never
//! reserves and every check of it stays exact, a worker that never retries holds one
//! reserved retry at most, and a headroom below `rows` reserves nothing (a tight
//! budget is checked exactly, as without reservations). What a worker that stops
//! checking (idle, exiting, reconfigured) still holds is counted as retries until
//! the window forgets its bucket.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::shm::layout::BUDGET_BUCKETS;
use crate::writer::Writer;

const COUNT_MAX: u64 = (1 << 24) - 1;

fn bucket_of<const N: usize>(now_ms: u64, window_ms: u32) -> u64 {
    now_ms / (window_ms as u64 / N as u64).max(1)
}

fn unpack(word: u64) -> (u64, u64, u64) {
    (word >> 48, (word >> 24) & COUNT_MAX, word & COUNT_MAX)
}

fn pack(tag: u64, first: u64, second: u64) -> u64 {
    ((tag & 0xffff) << 48) | (first.min(COUNT_MAX) << 24) | second.min(COUNT_MAX)
}

/// Add `first` and `second` to the current bucket of one row of a window of `N`
/// buckets over `window_ms`, written as `writer`.
pub fn add<const N: usize>(
    buckets: &[AtomicU64; N],
    now_ms: u64,
    window_ms: u32,
    (first, second): (u64, u64),
    writer: Writer,
) {
    let b = bucket_of::<N>(now_ms, window_ms);
    let cell = &buckets[(b % N as u64) as usize];
    let tag = b & 0xffff;
    let next = |w: u64| {
        // The common case in one add: the current bucket, both counters and both
        // amounts below 2^23, so neither sum reaches the 24-bit cap.
        if w >> 48 == tag && w & HALF_FULL == 0 && (first | second) < 1 << 23 {
            return w + (first << 24) + second;
        }
        let (t, a, z) = unpack(w);
        let (a, z) = if t == tag { (a, z) } else { (0, 0) };
        pack(tag, a + first, z + second)
    };
    writer.update(cell, next);
}

/// The top bit of each counter of a bucket word.
const HALF_FULL: u64 = (1 << 47) | (1 << 23);

/// Count one request (`retry == false`) or one retry in the current bucket of one
/// row of a retry budget, written as `writer`. The per-request path keeps a
/// [`BucketAt`] and calls [`record_at`]; this is the tests' reference.
#[cfg(test)]
pub fn record(
    buckets: &[AtomicU64; BUDGET_BUCKETS],
    now_ms: u64,
    window_ms: u32,
    retry: bool,
    writer: Writer,
) {
    record_at(buckets, &BucketAt::of(now_ms, window_ms), retry, writer);
}

/// Where a retry budget's current bucket is: its index and tag, for every moment of
/// its bucket period (`from_ms..until_ms`) of a window of `window_ms`. A caller that
/// records on every request keeps one and recomputes it ([`BucketAt::of`]) only when
/// the clock leaves the period, rather than dividing on every call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BucketAt {
    /// The bucket period (what [`period`] gives for every moment of it).
    period: u64,
    from_ms: u64,
    /// 0 (the default): covers no moment.
    until_ms: u64,
    window_ms: u32,
    index: usize,
    tag: u64,
}

impl BucketAt {
    /// The current bucket of a retry budget's window of `window_ms` at `now_ms`.
    pub fn of(now_ms: u64, window_ms: u32) -> BucketAt {
        let b = bucket_of::<BUDGET_BUCKETS>(now_ms, window_ms);
        let len = (window_ms as u64 / BUDGET_BUCKETS as u64).max(1);
        BucketAt {
            period: b,
            from_ms: b * len,
            until_ms: (b + 1) * len,
            window_ms,
            index: (b % BUDGET_BUCKETS as u64) as usize,
            tag: b & 0xffff,
        }
    }

    /// The bucket period: `now_ms` divided by the bucket length.
    pub fn period(&self) -> u64 {
        self.period
    }

    /// The current bucket's counters (requests, retries) of `buckets` for a moment
    /// this bucket covers, 0s for a stale bucket: one load.
    #[inline]
    pub fn current(&self, buckets: &[AtomicU64; BUDGET_BUCKETS]) -> (u64, u64) {
        let w = buckets[self.index].load(Ordering::Relaxed);
        if w >> 48 == self.tag {
            ((w >> 24) & COUNT_MAX, w & COUNT_MAX)
        } else {
            (0, 0)
        }
    }

    /// Is this the current bucket at `now_ms` of a window of `window_ms`?
    #[inline]
    pub fn covers(&self, now_ms: u64, window_ms: u32) -> bool {
        now_ms >= self.from_ms && now_ms < self.until_ms && window_ms == self.window_ms
    }
}

/// Count one request (`retry == false`) or one retry in the bucket `at` of one row
/// of a retry budget (the current one, [`BucketAt::covers`]), written as `writer`;
/// it saturates as [`add`] does, and a stale bucket starts again from that one count.
#[inline]
pub fn record_at(buckets: &[AtomicU64; BUDGET_BUCKETS], at: &BucketAt, retry: bool, writer: Writer) {
    let (tag, shift) = (at.tag, if retry { 0 } else { 24 });
    writer.update(&buckets[at.index], |w| {
        if w >> 48 != tag {
            (tag << 48) | (1 << shift)
        } else if (w >> shift) & COUNT_MAX < COUNT_MAX {
            w + (1 << shift)
        } else {
            w
        }
    });
}

/// Add `n` to (`give_back`: take `n` from, down to 0) the retries of bucket `at` of
/// one row, atomically (the shared row, [`Writer::Shared`]); a stale bucket starts
/// again from `n` (nothing to take back from it).
fn move_retries(buckets: &[AtomicU64; BUDGET_BUCKETS], at: &BucketAt, n: u64, give_back: bool) {
    let tag = at.tag;
    Writer::Shared.update(&buckets[at.index], |w| {
        let (t, q, r) = unpack(w);
        match (t == tag, give_back) {
            (true, false) => pack(tag, q, r + n),
            (true, true) => pack(tag, q, r.saturating_sub(n)),
            (false, false) => pack(tag, 0, n),
            (false, true) => w,
        }
    });
}

/// One process's reserved retries of one pool's retry budget (see the module doc):
/// kept with its tables, counted in the shared row's bucket of one period.
#[derive(Clone, Copy, Debug, Default)]
pub struct Quota {
    /// The bucket the reservation was added to (in the shared row): its period is the
    /// quota's.
    at: BucketAt,
    /// Reserved retries not taken yet.
    left: u32,
    /// Reserved retries taken in this period.
    taken: u32,
    /// Exact checks made in this period.
    checks: u32,
    /// The next reservation's size at most (0: not sized yet, 1).
    size: u32,
}

impl Quota {
    /// Exact checks a process makes in a bucket period before it reserves retries.
    pub const EXACT_CHECKS: u32 = 4;
    /// The most retries one reservation takes.
    const MAX_SIZE: u32 = 1 << 20;

    /// Does this quota hold a reserved retry in bucket `at` (the current one)? Then
    /// one more retry is within the budget without summing it.
    #[inline(always)]
    pub fn holds(&self, at: &BucketAt) -> bool {
        self.left != 0 && self.at.period == at.period
    }

    /// A retry is picked in bucket `at` (the current one): take one reserved retry
    /// for it when the quota holds one (true: the retry is counted already).
    #[inline(always)]
    pub fn take(&mut self, at: &BucketAt) -> bool {
        if !self.holds(at) {
            return false;
        }
        self.left -= 1;
        self.taken += 1;
        true
    }

    /// Before an exact check in bucket `at` (the current one): a quota of an earlier
    /// period gives back what is left of its reservation to `shared` (the shared row
    /// it was added to) and starts afresh, sized by what it took. First, so that the
    /// check's sum (and the past it keeps for the period) no longer counts it.
    #[inline]
    pub fn roll(&mut self, at: &BucketAt, shared: &[AtomicU64; BUDGET_BUCKETS]) {
        if self.at.period == at.period && self.at.until_ms != 0 {
            return;
        }
        if self.left != 0 {
            move_retries(shared, &self.at, self.left.into(), true);
        }
        *self = Quota {
            at: *at,
            size: self.taken.clamp(1, Self::MAX_SIZE),
            ..Quota::default()
        };
    }

    /// An exact check in bucket `at` (the current one, after [`roll`](Self::roll))
    /// found the budget's `headroom` (what it allows, rounded down, less the retries
    /// counted; 0: none) over `rows` tally rows. With `reserving` (the caller is the
    /// one copy of a handle's tables that reserves, and the handle has a worker row:
    /// at most one reserving quota per row), from the
    /// period's [`EXACT_CHECKS`](Self::EXACT_CHECKS)-th exact check on, reserve up to
    /// `headroom / rows` retries in `shared` (the shared row). Called only when the
    /// quota does not [`hold`](Self::holds) a retry.
    #[inline]
    pub fn reserve(
        &mut self,
        at: &BucketAt,
        headroom: u64,
        (rows, reserving): (u32, bool),
        shared: &[AtomicU64; BUDGET_BUCKETS],
    ) {
        self.checks = self.checks.saturating_add(1);
        if !reserving || self.checks < Self::EXACT_CHECKS {
            return;
        }
        let q = (headroom / u64::from(rows.max(1))).min(u64::from(self.size)) as u32;
        if q == 0 {
            return;
        }
        move_retries(shared, at, q.into(), false);
        self.left = q;
        self.size = self.size.saturating_mul(2).min(Self::MAX_SIZE);
    }
}

/// The two counters' sums over the window ending now: (requests, retries) of a
/// retry budget, (tries, failed or 429) of a node's recent window.
pub fn totals<const N: usize>(buckets: &[AtomicU64; N], now_ms: u64, window_ms: u32) -> (u64, u64) {
    let cur = bucket_of::<N>(now_ms, window_ms) & 0xffff;
    let mut sum = (0, 0);
    for cell in buckets {
        let (t, a, z) = unpack(cell.load(Ordering::Relaxed));
        // A bucket counts if its tag is one of the last N periods.
        if (cur.wrapping_sub(t) & 0xffff) < N as u64 && (a | z) != 0 {
            sum.0 += a;
            sum.1 += z;
        }
    }
    sum
}

/// `totals` in two parts: the current bucket's counters, and the sums of the other
/// buckets inside the window. Writers add to the current bucket only, so the second
/// part stays the same until the window moves to the next bucket (`crate::tally`'s
/// retry check keeps it per bucket period and then reads one word per row).
/// (The retry check reads it through [`BucketAt::current`]; this is the tests'
/// reference.)
#[cfg(test)]
pub fn current<const N: usize>(buckets: &[AtomicU64; N], now_ms: u64, window_ms: u32) -> (u64, u64) {
    let b = bucket_of::<N>(now_ms, window_ms);
    let (t, a, z) = unpack(buckets[(b % N as u64) as usize].load(Ordering::Relaxed));
    if t == b & 0xffff {
        (a, z)
    } else {
        (0, 0)
    }
}

/// The other part of `totals`: the buckets of the window before the current one.
pub fn past<const N: usize>(buckets: &[AtomicU64; N], now_ms: u64, window_ms: u32) -> (u64, u64) {
    let cur = bucket_of::<N>(now_ms, window_ms) & 0xffff;
    let mut sum = (0, 0);
    for cell in buckets {
        let (t, a, z) = unpack(cell.load(Ordering::Relaxed));
        let age = cur.wrapping_sub(t) & 0xffff;
        if age >= 1 && age < N as u64 {
            sum.0 += a;
            sum.1 += z;
        }
    }
    sum
}

/// The bucket period `now_ms` falls in (what `current` and `past` depend on; the
/// retry check keeps it in a [`BucketAt`]). The tests' reference.
#[cfg(test)]
pub fn period<const N: usize>(now_ms: u64, window_ms: u32) -> u64 {
    bucket_of::<N>(now_ms, window_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buckets() -> [AtomicU64; BUDGET_BUCKETS] {
        std::array::from_fn(|_| AtomicU64::new(0))
    }

    #[test]
    fn window_counts_and_forgets() {
        for w in [Writer::Shared, Writer::Owned] {
            let b = buckets();
            for i in 0..100 {
                record(&b, 1_000 + i, 10_000, false, w);
            }
            for _ in 0..7 {
                record(&b, 1_500, 10_000, true, w);
            }
            assert_eq!(totals(&b, 2_000, 10_000), (100, 7), "{w:?}");
            // 9.9 s later the first bucket is still inside the window...
            assert_eq!(totals(&b, 10_900, 10_000), (100, 7), "{w:?}");
            // ...and one bucket later it has left it.
            assert_eq!(totals(&b, 11_000, 10_000), (0, 0), "{w:?}");
            // A stale bucket is reset by the next write into it.
            record(&b, 11_000, 10_000, true, w);
            assert_eq!(totals(&b, 11_000, 10_000), (0, 1), "{w:?}");
        }
    }

    #[test]
    fn record_at_a_kept_bucket_writes_what_add_writes() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::SmallRng::seed_from_u64(15);
        for w in [Writer::Shared, Writer::Owned] {
            let (kept, added) = (buckets(), buckets());
            let mut at = BucketAt::default();
            let mut now = 0u64;
            for _ in 0..20_000 {
                now += rng.random_range(0..40);
                let window = if rng.random_range(0..500) == 0 {
                    20_000
                } else {
                    10_000
                };
                let retry = rng.random_bool(0.3);
                if !at.covers(now, window) {
                    at = BucketAt::of(now, window);
                }
                assert_eq!(at, BucketAt::of(now, window));
                assert_eq!(at.period(), period::<BUDGET_BUCKETS>(now, window));
                record_at(&kept, &at, retry, w);
                add(&added, now, window, ((!retry) as u64, retry as u64), w);
                assert_eq!(at.current(&kept), current(&added, now, window));
            }
            let words = |b: &[AtomicU64; BUDGET_BUCKETS]| {
                b.iter().map(|c| c.load(Ordering::Relaxed)).collect::<Vec<_>>()
            };
            assert_eq!(words(&kept), words(&added), "{w:?}");
        }
        // Both halves saturate at their maximum, the other half still counting.
        let b = buckets();
        let at = BucketAt::of(0, 10_000);
        b[at.index].store(pack(at.tag, COUNT_MAX, COUNT_MAX - 1), Ordering::Relaxed);
        record_at(&b, &at, false, Writer::Owned);
        record_at(&b, &at, true, Writer::Owned);
        assert_eq!(
            unpack(b[at.index].load(Ordering::Relaxed)),
            (at.tag, COUNT_MAX, COUNT_MAX)
        );
        record_at(&b, &at, true, Writer::Shared);
        assert_eq!(
            unpack(b[at.index].load(Ordering::Relaxed)),
            (at.tag, COUNT_MAX, COUNT_MAX)
        );
    }

    #[test]
    fn a_node_window_counts_both_counters_of_one_event() {
        let b: [AtomicU64; 8] = std::array::from_fn(|_| AtomicU64::new(0));
        // 8 buckets of 7.5 s over 60 s: a served try, then a failed one a bucket later.
        add(&b, 0, 60_000, (1, 0), Writer::Owned);
        add(&b, 8_000, 60_000, (1, 1), Writer::Shared);
        assert_eq!(totals(&b, 59_999, 60_000), (2, 1));
        assert_eq!(totals(&b, 60_000, 60_000), (1, 1), "the first bucket left");
        assert_eq!(totals(&b, 67_500, 60_000), (0, 0));
    }

    #[test]
    fn counters_stop_at_their_cap() {
        for w in [Writer::Owned, Writer::Shared] {
            let b: [AtomicU64; 8] = std::array::from_fn(|_| AtomicU64::new(0));
            // Up to just below half full (the one-add path), then across it and to the cap.
            add(&b, 0, 60_000, ((1 << 23) - 2, 5), w);
            add(&b, 0, 60_000, (1, 1), w);
            assert_eq!(totals(&b, 0, 60_000), ((1 << 23) - 1, 6), "{w:?}");
            add(&b, 0, 60_000, (1, 0), w);
            add(&b, 0, 60_000, (1 << 23, 1 << 24), w);
            add(&b, 0, 60_000, (5, 5), w);
            assert_eq!(totals(&b, 0, 60_000), (COUNT_MAX, COUNT_MAX), "{w:?}");
            // A new period starts the bucket afresh.
            add(&b, 60_000, 60_000, (1, 0), w);
            assert_eq!(current(&b, 60_000, 60_000), (1, 0), "{w:?}");
        }
    }

    #[test]
    fn current_and_past_add_up_to_the_totals() {
        let b = buckets();
        for i in 0..50u64 {
            record(&b, i * 300, 10_000, i % 3 == 0, Writer::Owned);
        }
        for now in [0, 999, 1_000, 5_500, 14_700, 14_999, 15_000, 30_000] {
            let (c, p) = (current(&b, now, 10_000), past(&b, now, 10_000));
            assert_eq!((c.0 + p.0, c.1 + p.1), totals(&b, now, 10_000), "at {now}");
        }
        // A write into the current bucket leaves the past alone.
        let before = past(&b, 14_700, 10_000);
        record(&b, 14_700, 10_000, true, Writer::Shared);
        assert_eq!(past(&b, 14_700, 10_000), before);
        assert_eq!(period::<BUDGET_BUCKETS>(14_700, 10_000), 14);
    }

    /// A quota past its exact checks, for tests: `checks` already made.
    fn warmed(at: &BucketAt, shared: &[AtomicU64; BUDGET_BUCKETS], size: u32) -> Quota {
        let mut q = Quota::default();
        q.roll(at, shared);
        q.checks = Quota::EXACT_CHECKS;
        q.size = size;
        q
    }

    #[test]
    fn a_quota_reserves_a_share_and_gives_back_what_is_left() {
        let shared = buckets();
        let at = BucketAt::of(5_000, 10_000);
        let mut q = Quota::default();
        q.roll(&at, &shared);
        // The first exact checks of a period reserve nothing, whatever the headroom.
        for _ in 1..Quota::EXACT_CHECKS {
            q.reserve(&at, 1_000, (3, true), &shared);
            assert!(!q.holds(&at));
        }
        // A process without a worker row never reserves.
        let mut other = warmed(&at, &shared, 100);
        other.reserve(&at, 1_000, (3, false), &shared);
        assert!(!other.holds(&at));
        // Then one retry (nothing taken last period), twice as many the next time.
        q.reserve(&at, 1_000, (3, true), &shared);
        assert_eq!((q.left, at.current(&shared)), (1, (0, 1)));
        assert!(q.take(&at));
        assert!(!q.holds(&at) && !q.take(&at), "used up: the next check sums");
        q.reserve(&at, 1_000, (3, true), &shared);
        assert_eq!((q.left, at.current(&shared)), (2, (0, 3)));
        assert!(q.take(&at));
        // The next period: the quota no longer holds, and its left-over goes back.
        let next = BucketAt::of(6_000, 10_000);
        assert!(q.holds(&at) && !q.holds(&next) && !q.take(&next));
        q.roll(&next, &shared);
        assert_eq!(at.current(&shared), (0, 2), "the two retries taken stay counted");
        assert_eq!(
            (q.left, q.taken, q.checks, q.size),
            (0, 0, 0, 2),
            "sized by the two taken"
        );
        // A tight budget (headroom below the rows) reserves nothing: every check exact.
        let mut q = warmed(&next, &shared, 64);
        q.reserve(&next, 2, (3, true), &shared);
        assert!(!q.holds(&next));
        q.reserve(&next, 3, (3, true), &shared);
        assert_eq!(q.left, 1, "a third of 3");
        // A reservation in a bucket since reused gives nothing back to its new period.
        let later = BucketAt::of(16_000, 10_000);
        assert_eq!(later.index, next.index);
        record_at(&shared, &later, true, Writer::Shared);
        q.roll(&later, &shared);
        assert_eq!(later.current(&shared), (0, 1));
    }

    #[test]
    fn simultaneous_reservations_share_one_headroom() {
        // Workers 0..w (rows w + 1): all sum the same window and reserve from that
        // headroom before any sees another's reservation; then each takes every retry
        // it reserved. Together they never take more than the headroom.
        for w in 1..=8u32 {
            for h in 0..200u64 {
                let shared = buckets();
                let at = BucketAt::of(0, 10_000);
                let mut taken = 0;
                for _ in 0..w {
                    let mut q = warmed(&at, &shared, Quota::MAX_SIZE);
                    q.reserve(&at, h, (w + 1, true), &shared);
                    while q.take(&at) {
                        taken += 1;
                    }
                }
                assert!(taken <= h, "{w} workers, headroom {h}: {taken}");
                assert_eq!(at.current(&shared).1, taken);
            }
        }
    }

    #[test]
    fn reservations_keep_every_retry_within_the_budget() {
        use rand::{Rng, SeedableRng};
        // Workers with their own rows and quotas over one window: requests, checks
        // (exact sums or a reserved retry) and the retries they allow, picked at once;
        // now and then all workers sum first and then reserve. Every retry picked stays
        // within what the budget allows over the retries really made (a mirror window
        // that knows no reservations).
        let (ratio, floor, window) = (0.2, 1, 10_000);
        let (mut all, mut all_reserved) = (0, 0);
        for seed in 0..20u64 {
            let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
            let w = rng.random_range(1..=4usize);
            // How often a "yes" is followed by a retry: the budget binds at about 0.7.
            let pick = rng.random_range(0.2..0.9);
            let rows: Vec<[AtomicU64; BUDGET_BUCKETS]> = (0..=w).map(|_| buckets()).collect();
            let real = buckets();
            let mut quotas = vec![Quota::default(); w];
            let (mut now, mut retries, mut reserved) = (0u64, 0u64, 0u64);
            let sum = |rows: &[[AtomicU64; BUDGET_BUCKETS]], now| {
                rows.iter()
                    .map(|r| totals(r, now, window))
                    .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
            };
            let headroom = |(q, r)| crate::retry::headroom(q, r, ratio, floor, window);
            for _ in 0..30_000 {
                now += rng.random_range(0..4);
                let at = BucketAt::of(now, window);
                let me = rng.random_range(0..w);
                if rng.random_bool(0.002) {
                    // Simultaneous: one sum for all, then every worker reserves from it.
                    for q in &mut quotas {
                        q.roll(&at, &rows[w]);
                    }
                    let h = headroom(sum(&rows, now));
                    for q in quotas.iter_mut().filter(|q| !q.holds(&at)) {
                        if h > 0 {
                            q.reserve(&at, h, (w as u32 + 1, true), &rows[w]);
                        }
                    }
                    continue;
                }
                if rng.random_bool(0.7) {
                    record_at(&rows[me], &at, false, Writer::Owned);
                    record_at(&real, &at, false, Writer::Owned);
                    continue;
                }
                let q = &mut quotas[me];
                let yes = q.holds(&at) || {
                    q.roll(&at, &rows[w]);
                    let h = headroom(sum(&rows, now));
                    if h > 0 {
                        q.reserve(&at, h, (w as u32 + 1, true), &rows[w]);
                    }
                    h > 0
                };
                if !yes || !rng.random_bool(pick) {
                    continue;
                }
                if q.take(&at) {
                    reserved += 1;
                } else {
                    record_at(&rows[me], &at, true, Writer::Owned);
                }
                record_at(&real, &at, true, Writer::Owned);
                retries += 1;
                let (q, r) = totals(&real, now, window);
                assert!(
                    crate::retry::headroom(q, r - 1, ratio, floor, window) > 0,
                    "seed {seed}: retry {retries} at {now}: {r} retries of {q} requests"
                );
            }
            all += retries;
            all_reserved += reserved;
        }
        assert!(all_reserved > all / 4, "{all_reserved} of {all} retries reserved");
    }

    #[test]
    fn tag_wrap_does_not_resurrect_old_buckets() {
        let b = buckets();
        record(&b, 0, 10_000, false, Writer::Shared);
        // 65536 bucket periods later the tag wraps to the same value, but the bucket's
        // index is the same too and it is reset on write; reading alone sees tag equal:
        // that is the one accepted imprecision (an idle pool for 18 hours).
        let later = 65_536 * 1_000 + 10 * 1_000;
        assert_eq!(totals(&b, later, 10_000), (0, 0));
    }
}
