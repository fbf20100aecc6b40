//! Smooth weighted round robin, as in nginx's `ngx_http_upstream_round_robin.c`.
//!
//! Each peer has a `current` value. On every pick, every eligible peer's `current` grows
//! by its effective weight, the eligible peer with the largest `current` is chosen (the
//! first one on ties), and the chosen peer's `current` drops by the total weight of the
//! eligible peers. Over a period of `sum(weights)` picks each peer is chosen exactly its
//! weight's worth of times, and the picks of a heavy peer are interleaved with the others
//! rather than bunched: weights {5, 1, 1} give `a a b a c a a`. O(n) per pick, like nginx.
//!
//! Why: it is the deterministic, well-known nginx behaviour, and the smooth interleaving
//! avoids bursts on heavy nodes. `round_robin` pools use [`Stride`](super::Stride)
//! instead, the same proportions and smoothness in O(log n) per pick; this one stays
//! as the reference those are tested against, and for callers that want nginx's exact
//! order. [`Swrr::new_with_offset`] starts a worker at a random point of the cycle, as
//! every worker starting from the same all-zero state would send its first requests to
//! the same node (an ingress-nginx bug).

use super::{sane_weight, AllEligible, NodeView};

/// Smooth weighted round-robin state.
#[derive(Clone, Debug)]
pub struct Swrr {
    weights: Vec<f64>,
    current: Vec<f64>,
}

impl Swrr {
    /// A fresh state (all `current` zero), as nginx starts.
    pub fn new(weights: &[f64]) -> Self {
        Swrr {
            weights: weights.iter().map(|&w| sane_weight(w)).collect(),
            current: vec![0.0; weights.len()],
        }
    }

    /// The state after `k` picks with every node eligible, from a fresh start.
    /// O(k * n); `Selector::build` uses a random `k` in `[0, n)`.
    pub fn new_with_offset(weights: &[f64], k: usize) -> Self {
        let mut swrr = Swrr::new(weights);
        for _ in 0..k {
            swrr.pick(&AllEligible);
        }
        swrr
    }

    /// Replaces the effective weights, keeping each node's `current` so that the
    /// rotation goes on where it was. A list of another length (a contract violation)
    /// is followed by truncating or zero-padding `current`.
    pub fn set_weights(&mut self, weights: &[f64]) {
        self.weights = weights.iter().map(|&w| sane_weight(w)).collect();
        self.current.resize(weights.len(), 0.0);
    }

    /// Number of candidates.
    pub fn len(&self) -> usize {
        self.weights.len()
    }

    /// True when there are no candidates.
    pub fn is_empty(&self) -> bool {
        self.weights.is_empty()
    }

    /// The next eligible node of the rotation, or `None` when none is eligible.
    /// Ineligible nodes neither gain nor lose `current`, as in nginx.
    pub fn pick<V: NodeView + ?Sized>(&mut self, view: &V) -> Option<usize> {
        let mut best: Option<usize> = None;
        let mut best_current = 0.0;
        let mut total = 0.0;
        for (i, (cur, &w)) in self.current.iter_mut().zip(&self.weights).enumerate() {
            if !view.eligible(i) {
                continue;
            }
            *cur += w;
            total += w;
            if best.is_none() || *cur > best_current {
                best = Some(i);
                best_current = *cur;
            }
        }
        let best = best?;
        self.current[best] -= total;
        Some(best)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::TestView;
    use super::*;

    fn sequence(swrr: &mut Swrr, view: &TestView, len: usize) -> Vec<usize> {
        (0..len).map(|_| swrr.pick(view).unwrap()).collect()
    }

    #[test]
    fn swrr_exact_nginx_sequence_5_1_1() {
        let mut swrr = Swrr::new_with_offset(&[5.0, 1.0, 1.0], 0);
        let view = TestView::idle(3);
        // a a b a c a a, twice: the period is the total weight.
        let expected = [0, 0, 1, 0, 2, 0, 0];
        assert_eq!(sequence(&mut swrr, &view, 7), expected);
        assert_eq!(sequence(&mut swrr, &view, 7), expected);
    }

    #[test]
    fn swrr_offset_is_a_shift_of_the_same_sequence() {
        let view = TestView::idle(3);
        let mut base = Swrr::new(&[5.0, 1.0, 1.0]);
        let reference = sequence(&mut base, &view, 14);
        for k in 0..3 {
            let mut shifted = Swrr::new_with_offset(&[5.0, 1.0, 1.0], k);
            assert_eq!(sequence(&mut shifted, &view, 7), reference[k..k + 7]);
        }
    }

    #[test]
    fn swrr_random_offset_changes_first_pick_not_proportions() {
        use super::super::{testutil::cands, Algorithm, Selector};
        use rand::rngs::SmallRng;
        use rand::SeedableRng;

        let weights = [5.0, 1.0, 1.0];
        let view = TestView::idle(3);
        let mut first_picks = std::collections::BTreeSet::new();
        for seed in 0..32 {
            let mut rng = SmallRng::seed_from_u64(seed);
            let mut sel = Selector::build(Algorithm::RoundRobin, &cands(&weights), 0, &mut rng);
            let mut counts = [0; 3];
            for n in 0..7 {
                let i = sel.pick(&mut rng, &view, 0).unwrap();
                if n == 0 {
                    first_picks.insert(i);
                }
                counts[i] += 1;
            }
            // Whatever the offset, a full period has the exact proportions.
            assert_eq!(counts, [5, 1, 1], "seed {seed}");
        }
        // The selector's rotation (`Stride`: a a c a a b a) started at offsets 0, 1, 2
        // begins with a, a, c: both must show up across seeds.
        assert_eq!(first_picks.into_iter().collect::<Vec<_>>(), [0, 2]);
    }

    #[test]
    fn swrr_equal_weights_offsets_cover_every_start() {
        use super::super::{testutil::cands, Algorithm, Selector};
        use rand::rngs::SmallRng;
        use rand::SeedableRng;

        let view = TestView::idle(4);
        let mut starts = [0; 4];
        for seed in 0..200 {
            let mut rng = SmallRng::seed_from_u64(seed);
            let mut sel = Selector::build(Algorithm::RoundRobin, &cands(&[1.0; 4]), 0, &mut rng);
            starts[sel.pick(&mut rng, &view, 0).unwrap()] += 1;
        }
        assert!(starts.iter().all(|&s| s > 20), "{starts:?}");
    }

    #[test]
    fn swrr_skips_ineligible_and_keeps_their_state() {
        let mut swrr = Swrr::new(&[1.0, 1.0, 1.0]);
        let mut view = TestView::idle(3);
        view.eligible[1] = false;
        assert_eq!(sequence(&mut swrr, &view, 4), [0, 2, 0, 2]);
        view.eligible = vec![false; 3];
        assert_eq!(swrr.pick(&view), None);
        view.eligible[1] = true;
        assert_eq!(sequence(&mut swrr, &view, 3), [1, 1, 1]);
    }

    #[test]
    fn swrr_set_weights_keeps_progress_and_changes_proportions() {
        let view = TestView::idle(3);
        let mut swrr = Swrr::new(&[1.0, 1.0, 1.0]);
        assert_eq!(swrr.pick(&view), Some(0));
        // Same weights again: the rotation goes on instead of restarting at 0.
        swrr.set_weights(&[1.0, 1.0, 1.0]);
        assert_eq!(swrr.pick(&view), Some(1));
        assert_eq!(swrr.pick(&view), Some(2));
        // New weights: the next period follows them exactly.
        swrr.set_weights(&[3.0, 1.0, 1.0]);
        let mut counts = [0; 3];
        for i in sequence(&mut swrr, &view, 500) {
            counts[i] += 1;
        }
        assert_eq!(counts, [300, 100, 100]);
    }

    #[test]
    fn swrr_fractional_weights_stay_proportional() {
        let weights = [0.7, 2.1, 1.4];
        let view = TestView::idle(3);
        let mut swrr = Swrr::new(&weights);
        let mut counts = [0u32; 3];
        for i in sequence(&mut swrr, &view, 42_000) {
            counts[i] += 1;
        }
        // Exactly 7000, 21000, 14000 up to float rounding at period boundaries.
        for (c, expected) in counts.iter().zip([7000, 21000, 14000]) {
            assert!(c.abs_diff(expected) <= 2, "{counts:?}");
        }
    }
}
