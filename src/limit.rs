//! What a 429 means, and the concurrency limit learned from them (AIMD). Pure
//! functions; the pool applies them to the shared node slots (`crate::balancer`).
//!
//! **429 is backpressure, not death.** LLM endpoints answer 429 for two reasons:
//! - *busy at capacity*: too many concurrent requests. The node still serves, just
//!   fewer at once. We learn a per-node concurrency limit (AIMD, as TCP congestion
//!   control and Netflix's concurrency-limits do): on such a 429 the limit drops to
//!   the concurrency that was refused minus one; every `increase_every * limit`
//!   successes at the limit raise it by one. A node at its limit is skipped, not
//!   ejected.
//! - *quota exhausted*: a Retry-After long enough to matter, or 429s that keep coming
//!   at the lowest limit. The node cools down (see [`crate::retry::cooldown_ms`]).
//!
//! Either way the 429 counts against the node: a busy 429 as twice the node's mean
//! served latency, a quota 429 by resting it (it returns in slow start, its estimate
//! forgotten). Neither is a fast sample and neither ejects the node (ejection is for
//! connect errors, timeouts and 5xx).

/// Fixed-point scale of `NodeSlot::limit`.
pub const LIMIT_ONE: u64 = 1 << 16;

/// What a 429 means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Busy {
    /// At capacity: lower the concurrency limit.
    Capacity,
    /// Quota spent: cool the node down.
    Quota,
}

/// Classify a 429.
/// - `retry_after_ms`: the server's Retry-After (0 if none);
/// - `strikes`: consecutive 429s including this one;
/// - `limit`: the current learned limit (fixed point, 0 = none);
/// - `limits_enabled`, `limit_min`, `quota_retry_after_ms`, `quota_after`: policy.
pub fn classify_429(
    retry_after_ms: u32,
    strikes: u32,
    limit: u64,
    limits_enabled: bool,
    limit_min: u32,
    quota_retry_after_ms: u32,
    quota_after: u32,
) -> Busy {
    if retry_after_ms > 0 && retry_after_ms >= quota_retry_after_ms {
        return Busy::Quota;
    }
    if !limits_enabled {
        return Busy::Quota;
    }
    let at_floor = limit != 0 && limit <= limit_min as u64 * LIMIT_ONE;
    if at_floor && strikes >= quota_after {
        return Busy::Quota;
    }
    Busy::Capacity
}

/// The limit after a capacity 429 that came with `inflight` tries outstanding
/// (this one included): the node refused the `inflight`-th concurrent request.
pub fn limit_after_busy(limit: u64, inflight: u32, min: u32, max: u32) -> u64 {
    let refused_at = (inflight.saturating_sub(1)).clamp(min, max) as u64 * LIMIT_ONE;
    if limit == 0 {
        refused_at
    } else {
        limit.min(refused_at).max(min as u64 * LIMIT_ONE)
    }
}

/// The limit after a success that came with `inflight` tries outstanding (this one
/// included): +1 per `increase_every * limit` successes, only while the limit is
/// actually in use (otherwise it would grow without evidence).
pub fn limit_after_success(limit: u64, inflight: u32, increase_every: u32, max: u32) -> u64 {
    let whole = (limit / LIMIT_ONE).max(1);
    if limit == 0 || (inflight as u64) < whole {
        return limit;
    }
    let step = (LIMIT_ONE / (whole * increase_every.max(1) as u64)).max(1);
    (limit + step).min(max as u64 * LIMIT_ONE)
}

/// May one more try start on a node with this limit and in-flight count?
pub fn under_limit(limit: u64, inflight: u32) -> bool {
    limit == 0 || (inflight as u64) * LIMIT_ONE + LIMIT_ONE <= limit
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: u64 = LIMIT_ONE;

    #[test]
    fn retry_after_long_enough_means_quota() {
        assert_eq!(classify_429(5_000, 1, 0, true, 1, 2_000, 3), Busy::Quota);
        assert_eq!(classify_429(1_000, 1, 0, true, 1, 2_000, 3), Busy::Capacity);
        assert_eq!(classify_429(0, 1, 0, true, 1, 2_000, 3), Busy::Capacity);
        // quota_retry_after_ms 0: any Retry-After is quota.
        assert_eq!(classify_429(1, 1, 0, true, 1, 0, 3), Busy::Quota);
    }

    #[test]
    fn repeated_429_at_the_floor_means_quota() {
        assert_eq!(classify_429(0, 2, L, true, 1, 2_000, 3), Busy::Capacity);
        assert_eq!(classify_429(0, 3, L, true, 1, 2_000, 3), Busy::Quota);
        assert_eq!(classify_429(0, 9, 4 * L, true, 1, 2_000, 3), Busy::Capacity);
        assert_eq!(classify_429(0, 1, 0, false, 1, 2_000, 3), Busy::Quota);
    }

    #[test]
    fn aimd() {
        // First busy 429 at 9 in flight: limit 8.
        let l = limit_after_busy(0, 9, 1, 1000);
        assert_eq!(l, 8 * L);
        assert!(under_limit(l, 7) && !under_limit(l, 8));
        // Never below min, never raised by a 429.
        assert_eq!(limit_after_busy(l, 1, 1, 1000), L);
        assert_eq!(limit_after_busy(l, 50, 1, 1000), l);
        // 8 * 4 = 32 successes at the limit raise it by about one.
        let mut x = l;
        for _ in 0..32 {
            x = limit_after_success(x, 8, 4, 1000);
        }
        assert!((9 * L - 64..=9 * L).contains(&x), "{}", x as f64 / L as f64);
        // Successes below the limit do not raise it.
        assert_eq!(limit_after_success(l, 3, 4, 1000), l);
        // Capped by max; no limit stays no limit.
        assert_eq!(limit_after_success(1000 * L, 1000, 4, 1000), 1000 * L);
        assert_eq!(limit_after_success(0, 100, 4, 1000), 0);
        assert!(under_limit(0, u32::MAX));
    }
}
