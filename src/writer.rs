//! How a statistic is added to a tally row (`crate::tally`): by the row's only
//! writer with a plain load and store, or by one of several writers atomically.
//! Below every statistics module (tally rows, the sliding window, the retry
//! budget's ring), which all write through it.

use std::sync::atomic::{AtomicU64, Ordering};

/// How the caller adds to a tally row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Writer {
    /// The only writer of its row: plain load and store.
    Owned,
    /// One of several writers of the shared row: atomic add.
    Shared,
}

impl Writer {
    /// Add `v` to `c`.
    #[inline]
    pub fn add(self, c: &AtomicU64, v: u64) {
        // Relaxed: statistics; nothing is published through them.
        match self {
            Writer::Owned => c.store(c.load(Ordering::Relaxed).wrapping_add(v), Ordering::Relaxed),
            Writer::Shared => {
                c.fetch_add(v, Ordering::Relaxed);
            }
        }
    }

    /// Replace `c`'s value `v` with `f(v)`: a load and a store, or a CAS loop that
    /// applies `f` exactly once to the value it replaces.
    #[inline]
    pub fn update(self, c: &AtomicU64, f: impl Fn(u64) -> u64) {
        // Relaxed: statistics; nothing is published through them.
        match self {
            Writer::Owned => c.store(f(c.load(Ordering::Relaxed)), Ordering::Relaxed),
            Writer::Shared => {
                let _ = c.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| Some(f(v)));
            }
        }
    }
}
