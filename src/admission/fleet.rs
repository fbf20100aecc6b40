//! The fleet's say in local admission (cluster mode, `crate::cluster`): a local
//! waiter is not given a slot while a waiter of a *higher* priority waits at another
//! gateway of the fleet.
//!
//! **The rule.** The sync thread of the gateway brings into shared memory, per pool,
//! the waiters of the other gateways by priority: their count and the oldest one's
//! arrival ([`FleetView::ahead`], a word per priority, read lock-free). Before a
//! dispatcher gives a confirmed slot to its best local waiter of priority `p`, queued
//! at `t`, it asks [`holds`]: does some remote waiter have a strictly higher
//! *effective* priority (its priority plus one level per `aging_ms` waited, capped at
//! 10, exactly as the local queue ranks its own)? If so, the slot stays free and the
//! waiter waits on; it is served when the better remote waiters are gone (served,
//! timed out or left: the next round's view says so) or the view lapses. An arrival
//! that finds such a remote waiter queues instead of going at once, so a stream of
//! low-priority arrivals cannot overtake a high-priority waiter elsewhere either.
//!
//! Per priority, the oldest remote waiter has the highest effective priority, so one
//! word per priority is enough for an exact answer under aging (for the waiters the
//! sync read: the fleet's head, `crate::cluster` bounds how many).
//!
//! **Only a higher priority holds a slot.** Among equals, a local waiter goes even if
//! an older one waits elsewhere: without a transfer of capacity between gateways,
//! holding the slot for it would leave the slot idle for up to a sync interval at
//! each turn and serve nobody sooner. A slot kept for a higher class does serve it
//! sooner: the nodes' freed concurrency is taken by the gateway holding the class
//! (its learned limits and, with limits split by demand, its share).
//!
//! **Stale views cannot hold anyone for long.** The view holds until
//! [`FleetView::until_ms`] (a few sync intervals after the round that wrote it), and
//! the sync thread clears it when a round fails: with Redis down, a dead sync thread
//! or a stalled one, the local queue alone decides again within that bound. A dead
//! gateway's entries leave Redis with their lease (`crate::cluster`), so they hold
//! waiters elsewhere for at most the lease plus one round.
//!
//! Every function takes `now` (coarse monotonic ms).

use std::sync::atomic::Ordering;

use crate::shm::layout::{FleetView, PRIORITIES};

/// Largest count a word of [`FleetView::ahead`] holds.
pub const COUNT_MAX: u64 = 0xffff;

/// The word of one priority: the oldest remote arrival (coarse monotonic ms) and how
/// many wait; 0 when none.
pub fn pack(oldest_ms: u64, count: u64) -> u64 {
    if count == 0 {
        return 0;
    }
    ((oldest_ms.min((1 << 47) - 1) + 1) << 16) | count.min(COUNT_MAX)
}

/// (oldest arrival, count) of a word of [`FleetView::ahead`]; `None` for 0.
pub fn unpack(word: u64) -> Option<(u64, u64)> {
    let count = word & COUNT_MAX;
    (count > 0 && word >> 16 > 0).then(|| ((word >> 16) - 1, count))
}

/// Priority after aging: one level per `aging_ms` waited since `since`, capped at 10.
pub fn effective(priority: u32, since: u64, aging_ms: u64, now: u64) -> u32 {
    if aging_ms == 0 {
        return priority;
    }
    let gained = now.saturating_sub(since) / aging_ms;
    (u64::from(priority) + gained).min(PRIORITIES as u64) as u32
}

/// Whether a remote waiter of `words` (index priority - 1, see [`pack`]) outranks a
/// local one of `priority` queued at `since`: a strictly higher effective priority.
pub fn outranked(words: &[u64; PRIORITIES], priority: u32, since: u64, aging_ms: u64, now: u64) -> bool {
    let mine = effective(priority, since, aging_ms, now);
    words.iter().enumerate().any(|(i, &w)| {
        unpack(w).is_some_and(|(oldest, _)| effective(i as u32 + 1, oldest, aging_ms, now) > mine)
    })
}

/// Whether `view` (valid at `now`) holds a slot back from a local waiter of
/// `priority` queued at `since`. No allocation, no lock: a few atomic loads, one when
/// the view is empty or lapsed.
pub fn holds(view: &FleetView, priority: u32, since: u64, aging_ms: u64, now: u64) -> bool {
    // Acquire pairs with the sync thread's Release store of `until_ms`, made after the
    // round's words: a valid view shows them.
    if now >= view.until_ms.load(Ordering::Acquire) || view.elsewhere.load(Ordering::Relaxed) == 0 {
        return false;
    }
    // Relaxed: each word is whole on its own (see `FleetView`).
    let words: [u64; PRIORITIES] = std::array::from_fn(|i| view.ahead[i].load(Ordering::Relaxed));
    outranked(&words, priority, since, aging_ms, now)
}

/// A pool's view for the status document (`admission.fleet`): `null` without one.
pub fn status_json(view: &FleetView, now: u64) -> serde_json::Value {
    let until = view.until_ms.load(Ordering::Acquire);
    if until == 0 {
        return serde_json::Value::Null;
    }
    let elsewhere: Vec<u64> = view
        .ahead
        .iter()
        .map(|w| unpack(w.load(Ordering::Relaxed)).map_or(0, |(_, n)| n))
        .collect();
    serde_json::json!({
        "valid": now < until,
        "waiting": view.waiting.load(Ordering::Relaxed),
        "elsewhere": view.elsewhere.load(Ordering::Relaxed),
        "elsewhere_by_priority": elsewhere,
        "holds": view.holds.load(Ordering::Relaxed),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(entries: &[(u32, u64, u64)]) -> [u64; PRIORITIES] {
        let mut w = [0; PRIORITIES];
        for &(p, oldest, n) in entries {
            w[p as usize - 1] = pack(oldest, n);
        }
        w
    }

    #[test]
    fn words_round_trip() {
        assert_eq!(pack(123, 0), 0);
        assert_eq!(unpack(0), None);
        assert_eq!(unpack(pack(0, 1)), Some((0, 1)), "arrival 0 is not 'none'");
        assert_eq!(unpack(pack(987_654_321, 7)), Some((987_654_321, 7)));
        assert_eq!(unpack(pack(5, 1 << 40)), Some((5, COUNT_MAX)), "counts saturate");
    }

    #[test]
    fn only_a_strictly_higher_priority_holds() {
        let w = words(&[(9, 100, 3)]);
        assert!(outranked(&w, 1, 0, 0, 1000));
        assert!(outranked(&w, 8, 0, 0, 1000));
        assert!(
            !outranked(&w, 9, 500, 0, 1000),
            "equal priority, younger: no hold"
        );
        assert!(!outranked(&w, 10, 500, 0, 1000));
        assert!(!outranked(&words(&[]), 1, 0, 0, 1000), "nobody elsewhere");
    }

    #[test]
    fn aging_counts_on_both_sides() {
        // One level per 100 ms. A priority-2 local waiter of 700 ms ranks 9; a remote
        // priority-8 waiter of 50 ms ranks 8: no hold.
        let w = words(&[(8, 950, 1)]);
        assert!(!outranked(&w, 2, 300, 100, 1000));
        // The remote one waited long too: 8 + 3 = 10 > 9.
        let w = words(&[(8, 700, 1)]);
        assert!(outranked(&w, 2, 300, 100, 1000));
        // The remote low class aged past the local high one.
        let w = words(&[(1, 0, 1)]);
        assert!(outranked(&w, 5, 990, 100, 1000), "1 + 10 capped at 10 > 5");
        assert!(!outranked(&w, 5, 990, 0, 1000), "without aging 1 < 5");
    }

    #[test]
    fn a_lapsed_or_empty_view_holds_nobody() {
        let v: FleetView = FleetView {
            until_ms: 0.into(),
            waiting: 0.into(),
            elsewhere: 0.into(),
            ahead: std::array::from_fn(|_| 0.into()),
            holds: 0.into(),
            _spare: std::array::from_fn(|_| 0.into()),
        };
        v.ahead[9].store(pack(10, 2), Ordering::Relaxed);
        v.elsewhere.store(2, Ordering::Relaxed);
        assert!(!holds(&v, 1, 0, 0, 100), "until 0: no view");
        v.until_ms.store(200, Ordering::Release);
        assert!(holds(&v, 1, 0, 0, 100));
        assert!(!holds(&v, 1, 0, 0, 200), "lapsed at until_ms");
        v.elsewhere.store(0, Ordering::Relaxed);
        assert!(!holds(&v, 1, 0, 0, 100), "nobody elsewhere");
    }
}
