//! Retries that do not storm: the retry budget's decision and jittered backoff.
//!
//! **Budget** (Finagle's `RetryBudget`, Envoy's retry budget): retries may be at most
//! `ratio` of the requests seen over a sliding window, plus a floor of `min_per_s`
//! per second so that a quiet pool can still retry. The window is pool-wide, summed
//! over the tally rows (`crate::budget` keeps it). A broad `proxy_next_upstream`
//! list stays safe: nginx offers the retry, the budget decides.
//!
//! **Backoff** (AWS "Exponential Backoff and Jitter"): a quota 429 without
//! Retry-After that is the n-th consecutive 429 of the node (busy ones included: they
//! led up to it) rests it for a random time in
//! `[base, min(cap, base * 2^(n-1))]` — full jitter above the base, so that nodes
//! cooled together do not all return at once. A server's Retry-After is honoured as a
//! floor: jitter only ever lengthens it.

use rand::Rng;

/// Would one more retry stay within the budget?
pub fn allows(requests: u64, retries: u64, ratio: f64, min_per_s: u32, window_ms: u32) -> bool {
    let floor = min_per_s as f64 * window_ms as f64 / 1000.0;
    let allowed = (ratio * requests as f64).max(floor);
    (retries + 1) as f64 <= allowed
}

/// How many more retries the budget allows: what it allows, rounded down, less
/// `retries` (0: none; above 0 exactly when [`allows`]). What a worker may reserve a
/// share of (`crate::budget::Quota`).
pub fn headroom(requests: u64, retries: u64, ratio: f64, min_per_s: u32, window_ms: u32) -> u64 {
    let floor = min_per_s as f64 * window_ms as f64 / 1000.0;
    let allowed = (ratio * requests as f64).max(floor);
    // `as` saturates (and takes NaN to 0): an integer k is at most `allowed` exactly
    // when it is at most its floor.
    (allowed.floor() as u64).saturating_sub(retries)
}

/// Cooldown after the `strikes`-th consecutive quota 429 (`strikes >= 1`).
pub fn cooldown_ms<R: Rng + ?Sized>(
    rng: &mut R,
    strikes: u32,
    retry_after_ms: u32,
    honor_retry_after: bool,
    base_ms: u32,
    max_ms: u32,
) -> u32 {
    if honor_retry_after && retry_after_ms > 0 {
        let jitter = rng.random_range(0..=retry_after_ms / 10);
        return retry_after_ms
            .saturating_add(jitter)
            .min(max_ms.max(retry_after_ms));
    }
    let exp = (base_ms as u64) << (strikes.saturating_sub(1)).min(20);
    let hi = exp.min(max_ms as u64) as u32;
    rng.random_range(base_ms.min(hi)..=hi)
}

/// Ejection time after `ejections` earlier ones: doubling from `base`, capped,
/// lengthened by up to 10% jitter (still capped).
pub fn ejection_ms<R: Rng + ?Sized>(rng: &mut R, ejections: u32, base_ms: u32, max_ms: u32) -> u32 {
    let exp = ((base_ms as u64) << ejections.min(20)).min(max_ms as u64) as u32;
    exp.saturating_add(rng.random_range(0..=exp / 10)).min(max_ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::SeedableRng;

    #[test]
    fn budget_ratio_and_floor() {
        // 20% of 1000 requests: 200 retries allowed, the 201st not.
        assert!(allows(1000, 199, 0.2, 0, 10_000));
        assert!(!allows(1000, 200, 0.2, 0, 10_000));
        // Floor: 3/s over 10 s = 30 retries even with no requests.
        assert!(allows(0, 29, 0.2, 3, 10_000));
        assert!(!allows(0, 30, 0.2, 3, 10_000));
        assert!(!allows(0, 0, 0.0, 0, 10_000));
    }

    #[test]
    fn headroom_is_above_zero_exactly_when_the_budget_allows() {
        assert_eq!(headroom(1000, 150, 0.2, 0, 10_000), 50);
        assert_eq!(headroom(1000, 250, 0.2, 0, 10_000), 0);
        assert_eq!(headroom(0, 10, 0.2, 3, 10_000), 20);
        assert_eq!(headroom(7, 0, 0.5, 0, 10_000), 3, "3.5 rounds down");
        for requests in 0..60 {
            for retries in 0..40 {
                for (ratio, floor, window) in [
                    (0.2, 0, 10_000),
                    (0.5, 1, 1_500),
                    (1.0, 3, 1_000),
                    (0.0, 0, 10_000),
                ] {
                    assert_eq!(
                        headroom(requests, retries, ratio, floor, window) > 0,
                        allows(requests, retries, ratio, floor, window),
                        "{requests} {retries} {ratio} {floor} {window}"
                    );
                }
            }
        }
    }

    #[test]
    fn cooldown_honours_retry_after_as_a_floor() {
        let mut rng = SmallRng::seed_from_u64(7);
        for _ in 0..1000 {
            let d = cooldown_ms(&mut rng, 1, 5_000, true, 1_000, 60_000);
            assert!((5_000..=5_500).contains(&d), "{d}");
        }
        // Capped by max_ms only when the server asks for less than the cap.
        assert_eq!(cooldown_ms(&mut rng, 1, 90_000, true, 1_000, 60_000), 90_000);
        // Not honoured: backoff.
        let d = cooldown_ms(&mut rng, 1, 5_000, false, 1_000, 60_000);
        assert_eq!(d, 1_000);
    }

    #[test]
    fn backoff_grows_with_full_jitter_and_cap() {
        let mut rng = SmallRng::seed_from_u64(1);
        for strikes in 1..=10u32 {
            let hi = (1_000u32 << (strikes - 1)).min(60_000);
            let samples: Vec<u32> = (0..500)
                .map(|_| cooldown_ms(&mut rng, strikes, 0, true, 1_000, 60_000))
                .collect();
            assert!(samples.iter().all(|d| (1_000..=hi).contains(d)));
            if strikes >= 3 {
                // Jittered: not all the same.
                assert!(samples.iter().any(|&d| d != samples[0]));
            }
        }
    }

    #[test]
    fn ejection_doubles_and_caps() {
        let mut rng = SmallRng::seed_from_u64(3);
        let d0 = ejection_ms(&mut rng, 0, 10_000, 300_000);
        assert!((10_000..=11_000).contains(&d0));
        let d2 = ejection_ms(&mut rng, 2, 10_000, 300_000);
        assert!((40_000..=44_000).contains(&d2));
        assert_eq!(ejection_ms(&mut rng, 30, 10_000, 300_000), 300_000);
    }
}
