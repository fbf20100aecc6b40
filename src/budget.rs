//! The retry budget's sliding window: requests and retries of a pool over the last
//! `window_ms`, in `BUDGET_BUCKETS` buckets per tally row (`crate::tally` sums the
//! rows; `crate::retry::allows` decides).
//!
//! Each bucket is one 64-bit word holding a 16-bit bucket tag and two 24-bit
//! counters, so recording is a single store (a worker's own row) or a single CAS (the
//! shared row), and a stale bucket is reset by whoever first writes into it.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::shm::layout::BUDGET_BUCKETS;
use crate::writer::Writer;

const COUNT_MAX: u64 = (1 << 24) - 1;

fn bucket_of(now_ms: u64, window_ms: u32) -> u64 {
    now_ms / (window_ms as u64 / BUDGET_BUCKETS as u64).max(1)
}

fn unpack(word: u64) -> (u64, u64, u64) {
    (word >> 48, (word >> 24) & COUNT_MAX, word & COUNT_MAX)
}

fn pack(tag: u64, requests: u64, retries: u64) -> u64 {
    ((tag & 0xffff) << 48) | (requests.min(COUNT_MAX) << 24) | retries.min(COUNT_MAX)
}

/// Count one request (`retry == false`) or one retry in the current bucket of one
/// row, written as `writer`.
pub fn record(
    buckets: &[AtomicU64; BUDGET_BUCKETS],
    now_ms: u64,
    window_ms: u32,
    retry: bool,
    writer: Writer,
) {
    let b = bucket_of(now_ms, window_ms);
    let cell = &buckets[(b % BUDGET_BUCKETS as u64) as usize];
    let tag = b & 0xffff;
    let next = |w: u64| {
        let (t, req, ret) = unpack(w);
        let (req, ret) = if t == tag { (req, ret) } else { (0, 0) };
        if retry {
            pack(tag, req, ret + 1)
        } else {
            pack(tag, req + 1, ret)
        }
    };
    writer.update(cell, next);
}

/// (requests, retries) over the window ending now.
pub fn totals(buckets: &[AtomicU64; BUDGET_BUCKETS], now_ms: u64, window_ms: u32) -> (u64, u64) {
    let cur = bucket_of(now_ms, window_ms) & 0xffff;
    let mut sum = (0, 0);
    for cell in buckets {
        let (t, req, ret) = unpack(cell.load(Ordering::Relaxed));
        // A bucket counts if its tag is one of the last BUDGET_BUCKETS periods.
        if (cur.wrapping_sub(t) & 0xffff) < BUDGET_BUCKETS as u64 && (req | ret) != 0 {
            sum.0 += req;
            sum.1 += ret;
        }
    }
    sum
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
