//! Node transition notices: one error-log line when a node is taken out (cooling
//! after 429s or a 503 with Retry-After, ejected after consecutive failures) and when
//! it is back (its first served try after that).
//!
//! **Who notices.** Every transition already has exactly one winner among the
//! workers: the report whose `fetch_max` starts a cooldown, the report whose CAS
//! ejects the node, the report that swaps the node's "out since" word back to 0. Only
//! that worker makes a notice, in its report path, into a bounded queue of its own
//! process (`Balancer::take_notices`), which a timer of that worker drains into the
//! error log (`resty.rsbalancer` `init_worker`): the log phase never formats, sleeps
//! or writes a log line for it. Health-check flips (down, up) are noticed by the
//! worker holding the health lease and logged by `resty.rsbalancer.health`.
//!
//! **Rate limit.** At most one line per node and kind per [`INTERVAL_MS`], across all
//! workers: each node slot keeps, per kind, the time of its last line and how many
//! were suppressed since ([`admit`] on one shared word); the next line says how many.
//! A worker also keeps at most [`QUEUE_MAX`] notices between two drains and counts
//! the rest. A flood of failures is one ejection (the node is out, its later
//! failures eject nothing), so it is one line.

/// Lines per node and kind: at most one per this many milliseconds.
pub const INTERVAL_MS: u64 = 10_000;

/// Notices a process keeps between two drains; more are counted, not kept.
pub const QUEUE_MAX: usize = 64;

/// The kinds of transition, each rate-limited on its own (`NodeSlot::notices` index).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Cooling = 0,
    Ejected = 1,
    Back = 2,
}

/// Kinds, for the size of `NodeSlot::notices`.
pub const KINDS: usize = 3;

/// Why a node was taken out or is back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// A 429 taken as a spent quota: with a Retry-After (ms, 0 if none), the
    /// consecutive 429s so far.
    Quota { retry_after_ms: u32, strikes: u32 },
    /// A 503 with a Retry-After (ms).
    Overloaded { retry_after_ms: u32 },
    /// Consecutive failures (no response or 5xx).
    Failures { strikes: u32 },
    /// A try served after the node was out for `out_ms`.
    Served { out_ms: u64 },
    /// A cooldown another gateway of the fleet learned (`crate::cluster`).
    Fleet,
}

/// One transition of the node in slot `slot`, for `for_ms` (0 for `Back`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Notice {
    pub kind: Kind,
    pub slot: u32,
    pub reason: Reason,
    pub for_ms: u64,
    /// Lines of this node and kind suppressed since the last one.
    pub suppressed: u32,
}

const COUNT_BITS: u32 = 16;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;

/// The rate limit on one shared word: the time (ms) of the last line in the high 48
/// bits, the lines suppressed since in the low 16 (saturating). Returns the word to
/// store and, when a line may be written now, how many were suppressed before it.
/// A zero word means no line yet.
pub fn admit(word: u64, now_ms: u64, interval_ms: u64) -> (u64, Option<u32>) {
    let last = word >> COUNT_BITS;
    let suppressed = word & COUNT_MASK;
    if word == 0 || now_ms >= last.saturating_add(interval_ms) {
        // now_ms is coarse monotonic time: 48 bits last ~8,900 years.
        ((now_ms.max(1) << COUNT_BITS), Some(suppressed as u32))
    } else {
        (word + (suppressed < COUNT_MASK) as u64, None)
    }
}

fn secs(ms: u64) -> String {
    format!("{:.1} s", ms as f64 / 1000.0)
}

impl Notice {
    /// The error-log line (without the "rsbalancer: " prefix the caller adds), naming
    /// the node's pool, id and address.
    pub fn line(&self, pool: &str, id: &str, addr: &str) -> String {
        let what = match self.kind {
            Kind::Cooling => format!("cooling for {}", secs(self.for_ms)),
            Kind::Ejected => format!("ejected for {}", secs(self.for_ms)),
            Kind::Back => "back".to_string(),
        };
        let why = match self.reason {
            Reason::Quota {
                retry_after_ms: 0,
                strikes,
            } => format!("{strikes} consecutive 429s at its lowest concurrency limit (quota)"),
            Reason::Quota {
                retry_after_ms,
                strikes,
            } => format!(
                "429 with Retry-After {} (quota; {strikes} consecutive 429s)",
                secs(retry_after_ms as u64)
            ),
            Reason::Overloaded { retry_after_ms } => {
                format!("503 with Retry-After {}", secs(retry_after_ms as u64))
            }
            Reason::Failures { strikes } => {
                format!("{strikes} consecutive failures (no response or 5xx)")
            }
            Reason::Served { out_ms } => format!("served a try after {} out", secs(out_ms)),
            Reason::Fleet => "cooldown learned at another gateway of the fleet".to_string(),
        };
        let mut s = format!("pool {pool} node {id} ({addr}) {what}: {why}");
        if self.suppressed > 0 {
            s.push_str(&format!(
                " ({} earlier {} line{} of this node suppressed)",
                self.suppressed,
                self.kind.name(),
                if self.suppressed == 1 { "" } else { "s" }
            ));
        }
        s
    }
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Cooling => "cooling",
            Kind::Ejected => "ejected",
            Kind::Back => "back",
        }
    }
}

/// A process's notices between two drains: at most [`QUEUE_MAX`], the rest counted.
#[derive(Debug, Default)]
pub struct Queue {
    items: Vec<Notice>,
    dropped: u64,
}

impl Queue {
    pub fn push(&mut self, n: Notice) {
        if self.items.len() < QUEUE_MAX {
            self.items.push(n);
        } else {
            self.dropped += 1;
        }
    }

    /// The notices kept and how many were dropped since the last take; empties it.
    pub fn take(&mut self) -> (Vec<Notice>, u64) {
        (std::mem::take(&mut self.items), std::mem::take(&mut self.dropped))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_then_the_count() {
        let (w, ok) = admit(0, 5_000, 10_000);
        assert_eq!(ok, Some(0));
        let (w, ok) = admit(w, 5_001, 10_000);
        assert_eq!(ok, None);
        let (w, ok) = admit(w, 14_999, 10_000);
        assert_eq!(ok, None);
        let (w, ok) = admit(w, 15_000, 10_000);
        assert_eq!(ok, Some(2), "two suppressed in between");
        let (_, ok) = admit(w, 15_000, 10_000);
        assert_eq!(ok, None, "the count starts again");
    }

    #[test]
    fn the_suppressed_count_saturates() {
        let mut w = admit(0, 1, 10).0;
        for _ in 0..70_000 {
            w = admit(w, 2, 10).0;
        }
        assert_eq!(admit(w, 11, 10).1, Some(65_535));
    }

    #[test]
    fn a_first_line_at_time_zero_still_limits() {
        let (w, ok) = admit(0, 0, 10_000);
        assert_eq!(ok, Some(0));
        assert_ne!(w, 0);
        assert_eq!(admit(w, 5, 10_000).1, None);
    }

    #[test]
    fn lines_name_the_node_the_reason_and_the_time() {
        let cooling = Notice {
            kind: Kind::Cooling,
            slot: 3,
            reason: Reason::Quota {
                retry_after_ms: 2_000,
                strikes: 1,
            },
            for_ms: 2_000,
            suppressed: 0,
        };
        let node = "pool llm node a (127.0.0.1:9001)";
        for (n, want) in [
            (
                cooling,
                "cooling for 2.0 s: 429 with Retry-After 2.0 s (quota; 1 consecutive 429s)",
            ),
            (
                Notice {
                    reason: Reason::Quota {
                        retry_after_ms: 0,
                        strikes: 4,
                    },
                    for_ms: 1_500,
                    ..cooling
                },
                "cooling for 1.5 s: 4 consecutive 429s at its lowest concurrency limit (quota)",
            ),
            (
                Notice {
                    reason: Reason::Overloaded { retry_after_ms: 5_000 },
                    for_ms: 5_400,
                    ..cooling
                },
                "cooling for 5.4 s: 503 with Retry-After 5.0 s",
            ),
            (
                Notice {
                    kind: Kind::Ejected,
                    reason: Reason::Failures { strikes: 5 },
                    for_ms: 30_000,
                    suppressed: 4,
                    ..cooling
                },
                "ejected for 30.0 s: 5 consecutive failures (no response or 5xx) (4 earlier ejected lines of this node suppressed)",
            ),
            (
                Notice {
                    kind: Kind::Back,
                    reason: Reason::Served { out_ms: 1_240 },
                    for_ms: 0,
                    suppressed: 1,
                    ..cooling
                },
                "back: served a try after 1.2 s out (1 earlier back line of this node suppressed)",
            ),
        ] {
            assert_eq!(n.line("llm", "a", "127.0.0.1:9001"), format!("{node} {want}"));
        }
    }

    #[test]
    fn the_queue_is_bounded() {
        let mut q = Queue::default();
        let n = Notice {
            kind: Kind::Back,
            slot: 0,
            reason: Reason::Served { out_ms: 1 },
            for_ms: 0,
            suppressed: 0,
        };
        for _ in 0..QUEUE_MAX + 5 {
            q.push(n);
        }
        let (items, dropped) = q.take();
        assert_eq!((items.len(), dropped), (QUEUE_MAX, 5));
        assert_eq!(q.take(), (Vec::new(), 0));
    }
}
