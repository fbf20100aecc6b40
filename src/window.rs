//! A pool's sliding window of outcomes, shared by every worker: what the overload
//! detector (emergency mode) and the canary rollback judge a pool by.
//!
//! `WINDOW_BUCKETS` buckets, each covering `window_ms / WINDOW_BUCKETS` of time and
//! tagged with its period number, in every tally row (`crate::tally`: one row per
//! worker, one shared). A writer whose period differs from the bucket's tag resets the
//! bucket (the only writer of its row with plain stores; writers of the shared row
//! claim it with a CAS on the tag); readers sum, over the rows, the buckets whose tag
//! lies in the last `WINDOW_BUCKETS` periods. In the shared row a few events racing a
//! bucket reset can be lost or land in the fresh period: fine for a ratio judged over
//! minutes.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::shm::layout::{WindowBucket, WINDOW_BUCKETS};
use crate::writer::Writer;

/// What one event adds to the window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// A try answered with a success (or a non-5xx, non-429 status).
    Ok,
    /// A try that failed: no response or 5xx.
    Failure,
    /// A try answered 429.
    Busy,
    /// A request shed or refused by admission (no try made).
    Shed,
}

/// Sums over the window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub requests: u64,
    pub failures: u64,
    pub busy: u64,
    pub shed: u64,
}

impl Totals {
    /// Share of tries that succeeded (1.0 with no tries).
    pub fn success_rate(&self) -> f64 {
        if self.requests == 0 {
            1.0
        } else {
            1.0 - (self.failures + self.busy).min(self.requests) as f64 / self.requests as f64
        }
    }

    /// The seed's busy ratio: (429s + shed) / (tries + shed); 0 with no traffic.
    pub fn busy_ratio(&self) -> f64 {
        let offered = self.requests + self.shed;
        if offered == 0 {
            0.0
        } else {
            (self.busy + self.shed) as f64 / offered as f64
        }
    }
}

fn period(now_ms: u64, window_ms: u32) -> u64 {
    // +1 so that a zeroed bucket (tag 0) never matches a real period.
    now_ms / (window_ms as u64 / WINDOW_BUCKETS as u64).max(1) + 1
}

/// Count one event at `now_ms` in one row's buckets, written as `writer`.
pub fn record(
    buckets: &[WindowBucket; WINDOW_BUCKETS],
    now_ms: u64,
    window_ms: u32,
    event: Event,
    writer: Writer,
) {
    let p = period(now_ms, window_ms);
    let b = &buckets[(p % WINDOW_BUCKETS as u64) as usize];
    // Relaxed: the tag is compared (and is the CAS's expected value) only; nothing is
    // read after it: the counters are stored to or added to (read-modify-writes).
    let tag = b.tag.load(Ordering::Relaxed);
    if tag != p {
        if tag > p {
            // A writer with a later clock already moved on; this event is too old.
            return;
        }
        let zero = || {
            for c in [&b.requests, &b.failures, &b.busy, &b.shed] {
                c.store(0, Ordering::Relaxed);
            }
        };
        match writer {
            Writer::Owned => {
                zero();
                // Release pairs with the Acquire in `totals_since`: a reader that sees the
                // new tag sees the zeroed counters.
                b.tag.store(p, Ordering::Release);
            }
            Writer::Shared => {
                // AcqRel, kept in doubt: the Acquire half keeps the zeroing below after
                // the tag change; the Release half pairs with `totals_since` but covers
                // nothing (the zeroing comes after it, so a reader may briefly see the
                // new tag with the old counts, as it may see counts of a racing add).
                // The failure value is only compared: Relaxed.
                if b.tag
                    .compare_exchange(tag, p, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
                {
                    zero();
                }
            }
        }
    }
    let add = |c: &AtomicU64| writer.add(c, 1);
    match event {
        Event::Ok => add(&b.requests),
        Event::Failure => {
            add(&b.requests);
            add(&b.failures);
        }
        Event::Busy => {
            add(&b.requests);
            add(&b.busy);
        }
        Event::Shed => add(&b.shed),
    }
}

/// Sums over the window ending at `now_ms`, counting only buckets that began after
/// `since_ms` (0: all of them): what the canary rollback judges after a change.
pub fn totals_since(
    buckets: &[WindowBucket; WINDOW_BUCKETS],
    now_ms: u64,
    window_ms: u32,
    since_ms: u64,
) -> Totals {
    let cur = period(now_ms, window_ms);
    // The bucket holding `since_ms` mixes events from before it: skip it too.
    let after = if since_ms == 0 {
        0
    } else {
        period(since_ms, window_ms)
    };
    let mut t = Totals::default();
    for b in buckets {
        // Acquire pairs with the Release tag store in `record` (an owned row): the
        // counters read below were zeroed for this period.
        let tag = b.tag.load(Ordering::Acquire);
        if tag <= after || tag > cur || cur - tag >= WINDOW_BUCKETS as u64 {
            continue;
        }
        t.requests += b.requests.load(Ordering::Relaxed);
        t.failures += b.failures.load(Ordering::Relaxed);
        t.busy += b.busy.load(Ordering::Relaxed);
        t.shed += b.shed.load(Ordering::Relaxed);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn totals(buckets: &[WindowBucket; WINDOW_BUCKETS], now_ms: u64, window_ms: u32) -> Totals {
        totals_since(buckets, now_ms, window_ms, 0)
    }

    fn buckets() -> [WindowBucket; WINDOW_BUCKETS] {
        std::array::from_fn(|_| WindowBucket {
            tag: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            busy: AtomicU64::new(0),
            shed: AtomicU64::new(0),
        })
    }

    #[test]
    fn counts_events_within_the_window() {
        let b = buckets();
        for e in [Event::Ok, Event::Ok, Event::Failure, Event::Busy, Event::Shed] {
            record(&b, 5_000, 10_000, e, Writer::Shared);
        }
        let t = totals(&b, 5_500, 10_000);
        assert_eq!(
            t,
            Totals {
                requests: 4,
                failures: 1,
                busy: 1,
                shed: 1
            }
        );
        assert!((t.success_rate() - 0.5).abs() < 1e-9);
        assert!((t.busy_ratio() - 2.0 / 5.0).abs() < 1e-9);
    }

    #[test]
    fn old_buckets_fall_out_and_are_reused() {
        let b = buckets();
        record(&b, 1_000, 10_000, Event::Busy, Writer::Shared);
        assert_eq!(
            totals(&b, 10_500, 10_000).busy,
            1,
            "9.5 s later: still in the 10 s window"
        );
        assert_eq!(totals(&b, 11_000, 10_000).busy, 0, "10 s later: out");
        // The same bucket index, one full turn later: reset, not added to.
        record(&b, 11_000, 10_000, Event::Ok, Writer::Shared);
        let t = totals(&b, 11_000, 10_000);
        assert_eq!((t.requests, t.busy), (1, 0));
    }

    #[test]
    fn empty_window_is_healthy() {
        let t = totals(&buckets(), 1_000_000, 300_000);
        assert_eq!(t.success_rate(), 1.0);
        assert_eq!(t.busy_ratio(), 0.0);
    }

    #[test]
    fn totals_since_skips_buckets_begun_before() {
        let b = buckets();
        record(&b, 1_000, 10_000, Event::Failure, Writer::Shared); // bucket [1000, 2000)
        record(&b, 2_500, 10_000, Event::Ok, Writer::Shared); // bucket [2000, 3000)
        record(&b, 3_000, 10_000, Event::Ok, Writer::Shared); // bucket [3000, 4000)
        assert_eq!(totals_since(&b, 3_500, 10_000, 0).requests, 3);
        assert_eq!(
            totals_since(&b, 3_500, 10_000, 1_999).requests,
            2,
            "[2000..) only"
        );
        let t = totals_since(&b, 3_500, 10_000, 2_000);
        assert_eq!(
            (t.requests, t.failures),
            (1, 0),
            "the bucket holding `since` is skipped"
        );
        assert_eq!(totals_since(&b, 3_500, 10_000, 3_200).requests, 0);
    }

    #[test]
    fn an_owned_row_counts_and_resets_like_the_shared_one() {
        let b = buckets();
        for e in [Event::Ok, Event::Failure, Event::Busy, Event::Shed] {
            record(&b, 5_000, 10_000, e, Writer::Owned);
        }
        assert_eq!(
            totals(&b, 5_500, 10_000),
            Totals {
                requests: 3,
                failures: 1,
                busy: 1,
                shed: 1
            }
        );
        record(&b, 15_000, 10_000, Event::Ok, Writer::Owned); // same index, next turn
        let t = totals(&b, 15_000, 10_000);
        assert_eq!((t.requests, t.failures, t.busy, t.shed), (1, 0, 0, 0));
        record(&b, 5_000, 10_000, Event::Busy, Writer::Owned); // late: dropped
        assert_eq!(totals(&b, 15_000, 10_000).busy, 0);
    }

    #[test]
    fn late_event_does_not_reset_a_newer_bucket() {
        let b = buckets();
        record(&b, 20_000, 10_000, Event::Ok, Writer::Shared);
        record(&b, 10_000, 10_000, Event::Busy, Writer::Shared); // same index, one turn earlier
        let t = totals(&b, 20_000, 10_000);
        assert_eq!((t.requests, t.busy), (1, 0));
    }
}
