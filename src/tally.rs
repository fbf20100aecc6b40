//! Statistics in tally rows: writing one row, reading the sum of them.
//!
//! Every try adds to counters that the pick and report paths never read back: status
//! classes, the latency histogram, request and retry totals, the retry budget and the
//! sliding window. With one shared set of atomics, each of those adds is a locked
//! read-modify-write (about 4 ns here), and all workers write the same cache lines.
//! So each attached worker gets a row of its own (`crate::shm::layout`), which only its
//! owner thread writes: an add there is a plain load and store ([`Writer::Owned`]).
//! Everybody else (a process that never attached a worker slot, another thread of
//! the process) adds to the shared row atomically ([`Writer::Shared`]). Readers
//! (metrics, stats, the overload detector, the retry budget) sum the rows in use.
//!
//! A worker killed between the load and the store of an add loses that one count; its
//! row keeps everything before it, and its successor continues the same row.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::shm::layout::{LATENCY_BOUNDS_MS, RECENT_WINDOW_MS};
use crate::shm::Region;
use crate::window::{self, Totals};
pub use crate::writer::Writer;

/// A node's statistics summed over the rows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeCounts {
    /// Reported tries by status class (see `NodeTally::status_class`).
    pub status_class: [u64; 6],
    /// Served tries by latency bucket.
    pub latency_hist: [u64; LATENCY_BOUNDS_MS.len() + 1],
    /// Sum of served tries' latencies, microseconds.
    pub latency_sum_us: u64,
    /// Completion tokens reported by the node's answers (`usage`).
    pub completion_tokens: u64,
}

impl NodeCounts {
    /// Tries reported, whatever the outcome.
    pub fn requests(&self) -> u64 {
        self.status_class.iter().sum()
    }

    /// Reported failures: no response (status 0) or 5xx.
    pub fn failures(&self) -> u64 {
        self.status_class[0] + self.status_class[5]
    }

    /// Served tries (the histogram's count).
    pub fn served(&self) -> u64 {
        self.latency_hist.iter().sum()
    }
}

fn load(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// Node slot `n`'s statistics.
pub fn node_counts(region: &Region, n: u32) -> NodeCounts {
    let mut sum = NodeCounts::default();
    for t in region.tally_rows().filter_map(|row| region.node_tally(row, n)) {
        for (s, c) in sum.status_class.iter_mut().zip(&t.status_class) {
            *s += load(c);
        }
        for (s, c) in sum.latency_hist.iter_mut().zip(&t.latency_hist) {
            *s += load(c);
        }
        sum.latency_sum_us += load(&t.latency_sum_us);
        sum.completion_tokens += load(&t.completion_tokens);
    }
    sum
}

/// Pool slot `p`'s (requests, retries) picked.
pub fn pool_counts(region: &Region, p: u32) -> (u64, u64) {
    region
        .tally_rows()
        .filter_map(|row| region.pool_tally(row, p))
        .fold((0, 0), |(q, r), t| {
            (q + load(&t.requests_total), r + load(&t.retries_total))
        })
}

/// Pool slot `p`'s prefix-affinity picks: (home node, passed on by the load guard,
/// without a key).
pub fn prefix_counts(region: &Region, p: u32) -> (u64, u64, u64) {
    region
        .tally_rows()
        .filter_map(|row| region.pool_tally(row, p))
        .fold((0, 0, 0), |(h, s, n), t| {
            (
                h + load(&t.prefix_hits_total),
                s + load(&t.prefix_spills_total),
                n + load(&t.prefix_nokey_total),
            )
        })
}

/// Pool slot `p`'s sliding window ending at `now_ms`, counting only buckets begun
/// after `since_ms` (0: all).
pub fn window_totals(region: &Region, p: u32, now_ms: u64, window_ms: u32, since_ms: u64) -> Totals {
    region
        .tally_rows()
        .filter_map(|row| region.pool_tally(row, p))
        .map(|t| window::totals_since(&t.window, now_ms, window_ms, since_ms))
        .fold(Totals::default(), |a, b| Totals {
            requests: a.requests + b.requests,
            failures: a.failures + b.failures,
            busy: a.busy + b.busy,
            shed: a.shed + b.shed,
        })
}

/// Pool slot `p`'s sliding window over its configured width, ending at `now_ms`.
pub fn pool_window(region: &Region, p: u32, now_ms: u64) -> Totals {
    let width = region
        .pool(p)
        .map_or(0, |ps| ps.window_ms.load(Ordering::Relaxed));
    window_totals(region, p, now_ms, width, 0)
}

/// Pool slot `p`'s retry-budget window: (requests, retries).
pub fn budget_totals(region: &Region, p: u32, now_ms: u64, window_ms: u32) -> (u64, u64) {
    region
        .tally_rows()
        .filter_map(|row| region.pool_tally(row, p))
        .map(|t| crate::budget::totals(&t.budget, now_ms, window_ms))
        .fold((0, 0), |(q, r), (a, b)| (q + a, r + b))
}

/// How many tally rows may hold counts: the worker rows ever attached and the shared
/// row (what [`budget_totals_at`] sums over).
#[inline]
pub fn rows(region: &Region) -> u32 {
    region.tally_rows().size_hint().0 as u32
}

/// One process's sums of a pool's retry-budget window without its current bucket
/// (`crate::budget::past`), for the bucket period, window and rows they were summed
/// for: the retry check asks on every request, and these change only when the window
/// moves on (a writer racing the bucket boundary with an older clock is missed
/// until the next period).
#[derive(Clone, Copy, Debug, Default)]
pub struct BudgetPast {
    key: Option<(u64, u32, u32)>,
    sums: (u64, u64),
}

/// [`budget_totals`] for the retry check on every request: the buckets before the
/// current one summed once per bucket period (kept in `past`), and the current bucket
/// `at` (one that covers `now_ms`, `crate::budget::BucketAt`) read in each row, one
/// load per row.
pub fn budget_totals_at(
    region: &Region,
    p: u32,
    now_ms: u64,
    window_ms: u32,
    at: &crate::budget::BucketAt,
    past: &mut BudgetPast,
) -> (u64, u64) {
    let key = (at.period(), window_ms, rows(region));
    if past.key != Some(key) {
        past.sums = region
            .pool_tallies(p)
            .map(|t| crate::budget::past(&t.budget, now_ms, window_ms))
            .fold((0, 0), |(q, r), (a, b)| (q + a, r + b));
        past.key = Some(key);
    }
    let mut sum = past.sums;
    for t in region.pool_tallies(p) {
        let (a, b) = at.current(&t.budget);
        sum.0 += a;
        sum.1 += b;
    }
    sum
}

/// Zero node slot `n`'s statistics in every row (a new node takes the slot).
/// Node slot `n`'s recent window (about the last [`RECENT_WINDOW_MS`]): (tries,
/// failed or 429).
pub fn node_recent(region: &Region, n: u32, now_ms: u64) -> (u64, u64) {
    region
        .tally_rows()
        .filter_map(|row| region.node_tally(row, n))
        .map(|t| crate::budget::totals(&t.recent, now_ms, RECENT_WINDOW_MS))
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
}

pub fn reset_node(region: &Region, n: u32) {
    for t in region.tally_rows().filter_map(|row| region.node_tally(row, n)) {
        for c in t.status_class.iter().chain(&t.latency_hist).chain(&t.recent) {
            c.store(0, Ordering::Relaxed);
        }
        t.latency_sum_us.store(0, Ordering::Relaxed);
        t.completion_tokens.store(0, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::BucketAt;
    use crate::shm::layout::Capacity;

    #[test]
    fn budget_totals_at_sums_what_budget_totals_sums() {
        let r = Region::create(Capacity {
            max_pools: 3,
            max_nodes: 1,
            max_workers: 4,
            config_bytes: 4096,
            max_waiters: 1,
        })
        .unwrap();
        r.attach_worker(0).unwrap();
        r.attach_worker(2).unwrap();
        let rows: Vec<u32> = r.tally_rows().collect();
        // Every row, each pool, the same cells as `pool_tally` gives; none past the pools.
        for p in 0..3 {
            let walked: Vec<*const _> = r.pool_tallies(p).map(|t| t as *const _).collect();
            let looked: Vec<*const _> = rows
                .iter()
                .filter_map(|&row| r.pool_tally(row, p))
                .map(|t| t as *const _)
                .collect();
            assert_eq!(walked, looked);
        }
        assert_eq!(r.pool_tallies(3).count(), 0);
        let (window, mut past) = (10_000, BudgetPast::default());
        let mut now = 50_000;
        for i in 0..400u64 {
            now += 37;
            let row = rows[(i % rows.len() as u64) as usize];
            let t = r.pool_tally(row, 1).unwrap();
            crate::budget::record(&t.budget, now, window, i % 3 == 0, Writer::Shared);
            let at = BucketAt::of(now, window);
            assert_eq!(
                budget_totals_at(&r, 1, now, window, &at, &mut past),
                budget_totals(&r, 1, now, window)
            );
        }
    }
}
