//! Load metrics: what a node costs, computed from numbers in its shared slot.
//!
//! **Peak EWMA** (Finagle's `PeakEwma`, used by Linkerd and tower): the estimate jumps
//! to any sample above it (a latency peak is believed at once) and otherwise decays
//! toward new samples with weight `w = exp(-dt/tau)`, so recovery is smooth. Three
//! corrections over the Lua ports (see `shared/LESSONS.md`):
//!
//! - failures and 429s are never fed as samples (a refused connection is fast): the
//!   caller feeds a *penalty* instead, `max(penalty, Retry-After)` capped;
//! - an idle node does not decay toward zero (which made dead nodes attractive again in
//!   ingress-nginx) but toward the pool's reference latency (median of its nodes);
//! - a node with no sample yet is assumed to cost the reference latency.
//!
//! The estimate and its timestamp share one 64-bit word (`f32` microseconds, `u32`
//! milliseconds) so an update is a single compare-and-swap. The timestamp wraps; the
//! signed difference keeps `dt` right for gaps up to 24.8 days (a longer idle gap only
//! decays less than it should), and a stamp a few ms ahead of this worker's clock read
//! (another worker just updated it) counts as no time.
//!
//! **Effective weight** = base weight x slow-start ramp x success factor, and for the
//! algorithms that do not look at latency themselves (all but `p2c_ewma`, whose cost
//! already weighs latency against load) x a latency factor `clamp(1.5 ref / cost, 0.1, 1)`.
//! This is the seed's "weights adjusted by response time", made to decay sanely.

/// Pack a cost (µs) and a time (ms) into one word.
pub fn pack(cost_us: f32, now_ms: u64) -> u64 {
    ((cost_us.to_bits() as u64) << 32) | (now_ms as u32 as u64)
}

/// Unpack a word into (cost µs, time ms low 32 bits). Cost 0 means "no sample yet".
pub fn unpack(word: u64) -> (f32, u32) {
    (f32::from_bits((word >> 32) as u32), word as u32)
}

/// Decay weight for the time from `stamp` to `now_ms` with time constant `tau_ms`. A
/// stamp slightly in the future (another worker updated the word after this one read
/// the clock) counts as no time at all, not as a 49-day gap.
#[inline]
fn decay(now_ms: u64, stamp: u32, tau_ms: u32) -> f64 {
    decay_over(elapsed_ms(now_ms, stamp), tau_ms)
}

/// Decay weight for `dt` ms (from [`elapsed_ms`]) with time constant `tau_ms`.
#[inline]
fn decay_over(dt: i32, tau_ms: u32) -> f64 {
    if dt == 0 {
        // Reports of a busy node often come within one tick of the coarse clock.
        return 1.0;
    }
    exp_neg(dt as f64 / tau_ms.max(1) as f64)
}

/// Milliseconds from `stamp` to `now_ms`, 0 for a stamp ahead of it (see [`decay`]).
#[inline]
fn elapsed_ms(now_ms: u64, stamp: u32) -> i32 {
    ((now_ms as u32).wrapping_sub(stamp) as i32).max(0)
}

/// `exp(-x)` for `x >= 0`. Below 1/64 (a gap under 156 ms at the default 10 s decay:
/// a node with traffic) a Taylor series to `x^4`, whose error (under `x^5 / 120`,
/// about 1e-11) is far below the `f32` the estimate is kept in; libm's `exp` above.
fn exp_neg(x: f64) -> f64 {
    if x < 1.0 / 64.0 {
        1.0 - x * (1.0 - x * (0.5 - x * (1.0 / 6.0 - x * (1.0 / 24.0))))
    } else {
        (-x).exp()
    }
}

/// The new estimate after a sample (peak EWMA update). `cost == 0` means no history.
pub fn observe(cost: f32, stamp: u32, sample_us: f64, now_ms: u64, tau_ms: u32) -> f32 {
    let cost = cost as f64;
    if cost <= 0.0 || sample_us > cost {
        return sample_us as f32;
    }
    let w = decay(now_ms, stamp, tau_ms);
    (cost * w + sample_us * (1.0 - w)) as f32
}

/// The new estimate after a sample, without the peak's jump: a plain time-weighted
/// EWMA (for figures where one long sample is noise, not news: time per token).
pub fn smooth(cost: f32, stamp: u32, sample_us: f64, now_ms: u64, tau_ms: u32) -> f32 {
    if cost <= 0.0 {
        return sample_us as f32;
    }
    let w = decay(now_ms, stamp, tau_ms);
    (cost as f64 * w + sample_us * (1.0 - w)) as f32
}

/// The estimate as seen at `now_ms` without a new sample: decayed toward `reference_us`.
/// Inlined into the pick up to the decay itself.
#[inline(always)]
pub fn current(word: u64, now_ms: u64, tau_ms: u32, reference_us: f64) -> f64 {
    let (cost, stamp) = unpack(word);
    if cost <= 0.0 {
        return reference_us;
    }
    // Stamped within this tick (a node with traffic): no decay, the estimate itself.
    let dt = elapsed_ms(now_ms, stamp);
    if dt == 0 {
        return cost as f64;
    }
    decayed(cost, dt, tau_ms, reference_us)
}

/// [`current`] for an estimate stamped `dt` ms before this tick.
fn decayed(cost: f32, dt: i32, tau_ms: u32, reference_us: f64) -> f64 {
    let w = decay_over(dt, tau_ms);
    cost as f64 * w + reference_us * (1.0 - w)
}

/// What a try counts as, by status: `Ok(latency)` for a served answer, `Err(penalty)`
/// for a failure (status 0 = no response, or 5xx) or a 429.
pub fn sample_us(status: u32, latency_us: u32, retry_after_ms: u32, penalty_ms: u32, cap_ms: u32) -> f64 {
    if is_failure(status) || status == 429 {
        let ms = penalty_ms.max(retry_after_ms).min(cap_ms.max(penalty_ms));
        ms as f64 * 1000.0
    } else {
        served_us(latency_us)
    }
}

/// What a served try counts as: its latency, at least 1 µs (0 means no sample).
pub fn served_us(latency_us: u32) -> f64 {
    latency_us.max(1) as f64
}

/// No response at all (status 0: connect error, timeout, reset) or a server error.
pub fn is_failure(status: u32) -> bool {
    status == 0 || status >= 500
}

/// The client went away (nginx's 499) before the node answered: the try says nothing
/// about the node, so it only releases its in-flight count.
pub fn is_cancelled(status: u32) -> bool {
    status == 499
}

/// Slow-start ramp: from 10% to 100% of the weight, linearly over `window_ms`.
pub fn slow_start(now_ms: u64, started_ms: u64, window_ms: u32) -> f64 {
    if window_ms == 0 {
        return 1.0;
    }
    let age = now_ms.saturating_sub(started_ms) as f64;
    (age / window_ms as f64).clamp(0.1, 1.0)
}

/// A node up to this many times slower than the reference keeps its full weight:
/// latency estimates are noisy (a peak EWMA takes every spike at once), and letting
/// that noise move weights would blur the configured shares.
pub const LATENCY_TOLERANCE: f64 = 1.5;

/// Latency factor for weight-driven algorithms: nodes slower than the reference (by
/// more than [`LATENCY_TOLERANCE`]) lose weight in proportion, never below 10%.
pub fn latency_factor(cost_us: f64, reference_us: f64) -> f64 {
    if cost_us <= 0.0 || reference_us <= 0.0 {
        return 1.0;
    }
    (LATENCY_TOLERANCE * reference_us / cost_us).clamp(0.1, 1.0)
}

/// Success factor: the smoothed share of good tries in the recent refresh windows,
/// never below 10% (ejection, not weight, takes dead nodes out).
pub fn success_factor(prev: f64, tries: u64, bad: u64) -> f64 {
    if tries == 0 {
        return prev;
    }
    let ok = 1.0 - (bad.min(tries) as f64 / tries as f64);
    (0.5 * prev + 0.5 * ok).clamp(0.1, 1.0)
}

/// Median of a list (mean of the two middle values for even lengths); `None` when
/// empty.
pub fn median(values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let (mid, odd) = (values.len() / 2, values.len() % 2 == 1);
    let (low, m, _) = values.select_nth_unstable_by(mid, |a, b| a.total_cmp(b));
    let m = *m;
    if odd {
        return Some(m);
    }
    let below = low.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Some((below + m) / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_is_taken_at_once() {
        let c = observe(100_000.0, 0, 900_000.0, 10, 10_000);
        assert_eq!(c, 900_000.0);
    }

    #[test]
    fn lower_sample_decays_with_exp() {
        // dt = tau: w = e^-1.
        let c = observe(1_000_000.0, 0, 0.0 + 1.0, 10_000, 10_000) as f64;
        let want = 1_000_000.0 * (-1.0f64).exp() + 1.0 * (1.0 - (-1.0f64).exp());
        assert!((c - want).abs() < 1.0, "{c} vs {want}");
        // dt = 0: no change.
        assert_eq!(observe(5000.0, 7, 1.0, 7, 10_000), 5000.0);
    }

    #[test]
    fn short_gaps_decay_as_exp_does() {
        for i in 0..=2000 {
            let x = i as f64 / 64_000.0;
            let (got, want) = (exp_neg(x), (-x).exp());
            assert!((got - want).abs() <= 1e-11 * want, "x {x}: {got} vs {want}");
        }
        for x in [1.0 / 64.0, 0.1, 1.0, 30.0, 800.0] {
            assert_eq!(exp_neg(x), (-x).exp());
        }
        // Through `observe`: a gap of 20 ms at tau 10 s, as the libm figure.
        let c = observe(1_000_000.0, 1000, 1000.0, 1020, 10_000) as f64;
        let w = (-0.002f64).exp();
        let want = 1_000_000.0 * w + 1000.0 * (1.0 - w);
        assert!((c - want).abs() < 0.1, "{c} vs {want}");
    }

    #[test]
    fn stamp_slightly_ahead_is_no_time() {
        // Another worker stamped the word 4 ms after this one read the clock.
        let c = observe(5e6, 1004, 5000.0, 1000, 10_000);
        assert_eq!(c, 5e6);
        assert!((current(pack(5e6, 1004), 1000, 10_000, 6000.0) - 5e6).abs() < 1.0);
    }

    #[test]
    fn first_sample_is_taken_as_is() {
        assert_eq!(observe(0.0, 0, 1234.0, 99, 10_000), 1234.0);
    }

    #[test]
    fn idle_decays_toward_reference_not_zero() {
        let w = pack(5_000_000.0, 1000);
        let ref_us = 200_000.0;
        let long_after = current(w, 1000 + 600_000, 10_000, ref_us);
        assert!((long_after - ref_us).abs() < 1.0);
        assert_eq!(current(0, 5, 10_000, ref_us), ref_us);
        let fast = pack(1000.0, 0);
        assert!((current(fast, 600_000, 10_000, ref_us) - ref_us).abs() < 1.0);
    }

    #[test]
    fn timestamps_wrap() {
        let near_wrap = u32::MAX as u64 - 5;
        let w = pack(1000.0, near_wrap);
        let after = near_wrap + 10; // crosses 2^32
        let (_, stamp) = unpack(w);
        assert_eq!((after as u32).wrapping_sub(stamp), 10);
    }

    #[test]
    fn failures_and_429_are_penalties_not_fast_samples() {
        assert_eq!(sample_us(0, 50, 0, 5000, 300_000), 5_000_000.0);
        assert_eq!(sample_us(503, 50, 0, 5000, 300_000), 5_000_000.0);
        assert_eq!(sample_us(429, 50, 20_000, 5000, 300_000), 20_000_000.0);
        assert_eq!(sample_us(429, 50, 900_000, 5000, 300_000), 300_000_000.0);
        assert_eq!(sample_us(200, 50, 0, 5000, 300_000), 50.0);
        assert_eq!(sample_us(404, 0, 0, 5000, 300_000), 1.0);
    }

    #[test]
    fn factors() {
        assert_eq!(slow_start(0, 0, 0), 1.0);
        assert_eq!(slow_start(0, 0, 1000), 0.1);
        assert_eq!(slow_start(500, 0, 1000), 0.5);
        assert_eq!(slow_start(5000, 0, 1000), 1.0);
        assert_eq!(latency_factor(600.0, 100.0), 0.25);
        assert_eq!(latency_factor(140.0, 100.0), 1.0);
        assert_eq!(latency_factor(50.0, 100.0), 1.0);
        assert_eq!(latency_factor(1e9, 100.0), 0.1);
        assert_eq!(success_factor(1.0, 0, 0), 1.0);
        assert_eq!(success_factor(1.0, 10, 10), 0.5);
        assert_eq!(success_factor(0.1, 10, 10), 0.1);
        let mut v = vec![3.0, 1.0, 2.0];
        assert_eq!(median(&mut v), Some(2.0));
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&mut []), None);
    }
}
