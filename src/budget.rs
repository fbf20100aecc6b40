//! Sliding windows of two counters in one word per bucket: the retry budget's
//! requests and retries of a pool over the last `window_ms` (`BUDGET_BUCKETS` buckets
//! per tally row; `crate::retry::allows` decides), and each node's recent tries and
//! failed or 429 ones (`RECENT_BUCKETS`, for the status page). `crate::tally` sums the
//! rows.
//!
//! Each bucket is one 64-bit word holding a 16-bit bucket tag and two 24-bit
//! counters, so recording is a single store (a worker's own row) or a single CAS (the
//! shared row), and a stale bucket is reset by whoever first writes into it.

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
