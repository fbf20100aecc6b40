//! Weighted least connections, as nginx's `least_conn`.
//!
//! The eligible node with the fewest in-flight requests per unit of weight,
//! `inflight(i) / weight(i)`, wins (nginx's `ngx_http_upstream_least_conn_module`
//! compares `conns / weight` the same way). In-flight counts come from the shared view,
//! so they cover every worker. O(n) per pick. A node's count includes the queue its
//! scraped `/metrics` show beyond our tries (`NodeView::load`, `crate::scrape`), so a
//! node other clients keep busy counts as busy.
//!
//! Ties are broken by a weighted random choice among the tied nodes (one pass of weighted
//! reservoir sampling) rather than nginx's "first, then round robin": an idle pool then
//! spreads ∝ weight, and workers that all see the same counts do not herd on index 0.
//! Exact ties are meaningful here because IEEE division is correctly rounded: two
//! quotients that are equal as real numbers are equal as `f64`.

use super::{sane_weight, NodeView};
use rand::Rng;

/// Weighted least-in-flight selection.
#[derive(Clone, Debug)]
pub struct LeastConn {
    weights: Vec<f64>,
}

impl LeastConn {
    /// Keeps the weights; there is no table to build.
    pub fn new(weights: &[f64]) -> Self {
        LeastConn {
            weights: weights.iter().map(|&w| sane_weight(w)).collect(),
        }
    }

    /// Replaces the weights.
    pub fn set_weights(&mut self, weights: &[f64]) {
        *self = LeastConn::new(weights);
    }

    /// Number of candidates.
    pub fn len(&self) -> usize {
        self.weights.len()
    }

    /// True when there are no candidates.
    pub fn is_empty(&self) -> bool {
        self.weights.is_empty()
    }

    /// The eligible node minimising `inflight / weight` (weighted random among ties), or
    /// `None` when none is eligible.
    pub fn pick<R: Rng + ?Sized, V: NodeView + ?Sized>(&self, rng: &mut R, view: &V) -> Option<usize> {
        let mut chosen = None;
        let mut best = f64::INFINITY;
        // Total weight of the nodes tied at `best` so far.
        let mut tied = 0.0;
        for (i, &w) in self.weights.iter().enumerate() {
            if !view.eligible(i) {
                continue;
            }
            let score = f64::from(view.load(i)) / w;
            if chosen.is_none() || score < best {
                chosen = Some(i);
                best = score;
                tied = w;
            } else if score == best {
                tied += w;
                if rng.random::<f64>() * tied < w {
                    chosen = Some(i);
                }
            }
        }
        chosen
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{chi_square, TestView};
    use super::*;
    use rand::rngs::SmallRng;
    use rand::SeedableRng;

    #[test]
    fn least_conn_picks_lowest_inflight_per_weight() {
        let mut rng = SmallRng::seed_from_u64(21);
        let lc = LeastConn::new(&[1.0, 4.0, 2.0]);
        let mut view = TestView::idle(3);
        // Scores 3/1 = 3, 8/4 = 2, 5/2 = 2.5.
        view.inflight = vec![3, 8, 5];
        for _ in 0..100 {
            assert_eq!(lc.pick(&mut rng, &view), Some(1));
        }
        // The best one ineligible: next best.
        view.eligible[1] = false;
        for _ in 0..100 {
            assert_eq!(lc.pick(&mut rng, &view), Some(2));
        }
    }

    #[test]
    fn least_conn_counts_the_scraped_queue() {
        let mut rng = SmallRng::seed_from_u64(23);
        let lc = LeastConn::new(&[1.0, 1.0]);
        let mut view = TestView::idle(2);
        // Node 0 has fewer of our tries but a queue of others': (1 + 5) > 4.
        view.inflight = vec![1, 4];
        view.queued = vec![5, 0];
        for _ in 0..100 {
            assert_eq!(lc.pick(&mut rng, &view), Some(1));
        }
        view.queued = vec![0, 0];
        for _ in 0..100 {
            assert_eq!(lc.pick(&mut rng, &view), Some(0));
        }
    }

    #[test]
    fn least_conn_idle_ties_spread_by_weight_chi_square() {
        // All idle: every node ties at 0, the choice must be ∝ weight.
        // df = 3, critical value 16.266 at p = 0.001.
        let weights = [10.0, 20.0, 30.0, 40.0];
        let mut rng = SmallRng::seed_from_u64(22);
        let lc = LeastConn::new(&weights);
        let view = TestView::idle(4);
        let mut counts = vec![0u64; 4];
        for _ in 0..100_000 {
            counts[lc.pick(&mut rng, &view).unwrap()] += 1;
        }
        let chi2 = chi_square(&counts, &weights);
        assert!(chi2 < 16.266, "chi2 = {chi2}, counts {counts:?}");
    }

    #[test]
    fn least_conn_ties_only_among_the_minimum() {
        // Scores: 1/1 = 1, 2/2 = 1, 0/1 = 0, 0/3 = 0, 5/1 = 5: only nodes 2 and 3 tie
        // at the minimum, 1:3 by weight. df = 1, critical value 10.828 at p = 0.001.
        let weights = [1.0, 2.0, 1.0, 3.0, 1.0];
        let mut rng = SmallRng::seed_from_u64(23);
        let lc = LeastConn::new(&weights);
        let mut view = TestView::idle(5);
        view.inflight = vec![1, 2, 0, 0, 5];
        let mut counts = vec![0u64; 5];
        for _ in 0..100_000 {
            counts[lc.pick(&mut rng, &view).unwrap()] += 1;
        }
        assert_eq!((counts[0], counts[1], counts[4]), (0, 0, 0));
        let chi2 = chi_square(&counts[2..4], &weights[2..4]);
        assert!(chi2 < 10.828, "chi2 = {chi2}, counts {counts:?}");
    }

    #[test]
    fn least_conn_equal_ratios_tie_exactly() {
        // 1/3 and 2/6 are the same real number, so they must tie as f64 too.
        let mut rng = SmallRng::seed_from_u64(24);
        let lc = LeastConn::new(&[3.0, 6.0]);
        let mut view = TestView::idle(2);
        view.inflight = vec![1, 2];
        let mut seen = [false; 2];
        for _ in 0..200 {
            seen[lc.pick(&mut rng, &view).unwrap()] = true;
        }
        assert_eq!(seen, [true, true]);
    }
}
