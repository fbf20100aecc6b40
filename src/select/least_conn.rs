//! Weighted least connections, as nginx's `least_conn`, in O(log n) per pick.
//!
//! The eligible node with the fewest in-flight requests per unit of weight,
//! `inflight(i) / weight(i)`, wins (nginx's `ngx_http_upstream_least_conn_module`
//! compares `conns / weight` the same way). In-flight counts come from the shared view,
//! so they cover every worker. A node's count includes the queue its scraped
//! `/metrics` show beyond our tries (`NodeView::load`, `crate::scrape`), so a node other
//! clients keep busy counts as busy.
//!
//! Ties are broken by a weighted random choice among the tied nodes rather than nginx's
//! "first, then round robin": an idle pool then spreads ∝ weight, and workers that all
//! see the same counts do not herd on index 0. Exact ties are meaningful here because
//! IEEE division is correctly rounded: two quotients that are equal as real numbers are
//! equal as `f64`.
//!
//! How it is O(log n): each worker keeps a tournament tree (a segment tree) over the
//! scores it last saw. Each inner entry holds the smallest score below it and the total
//! weight of the leaves at that score, so one uniform draw walks down to a node of
//! least score, weighted among the ties, in O(log n). The scores are a cache of shared
//! counts that other workers change, so every pick verifies: it re-reads the score of
//! the node it walked to and, if it moved, corrects that leaf (O(log n)) and walks again;
//! a node that is not eligible for this request is set aside for the pick (and put
//! back after it), or until the next refresh when it is out of service for everyone
//! ([`NodeView::out`]).
//! What can be missed is a node whose count another worker lowered since this one last
//! read it: each pick re-reads [`FRESH_PER_PICK`] leaves in turn, and every leaf is
//! re-read at the first pick after each refresh of the weights (`refresh_ms`), so
//! pools of up to [`FRESH_PER_PICK`] nodes are exact on every pick and larger ones are
//! at most `n / FRESH_PER_PICK` picks or one refresh behind on such a node. After
//! [`MAX_PROBES`] walks without an answer, the pick falls back to the exact O(n) scan
//! ([`LeastConn::pick_scan`], the reference the tree is tested against).

use super::{sane_weight, NodeView};
use rand::Rng;

/// Leaves each pick re-reads from the view, in turn.
pub const FRESH_PER_PICK: usize = 4;

/// Walks a pick makes before it falls back to the O(n) scan.
pub const MAX_PROBES: usize = 16;

/// Weighted least-in-flight selection.
#[derive(Clone, Debug)]
pub struct LeastConn {
    weights: Vec<f64>,
    /// Number of leaves (a power of two ≥ n); entry `k`'s children are `2k`, `2k + 1`,
    /// leaf `i` is entry `leaves + i`, entry 0 is unused.
    leaves: usize,
    /// Per entry: the least score below it (`INFINITY` for a leaf set aside or past
    /// n), and the total weight of the leaves below it at that score.
    tree: Vec<(f64, f64)>,
    /// Next leaf to re-read.
    cursor: usize,
    /// Every leaf must be re-read before the next pick (built, or new weights).
    resync: bool,
}

impl LeastConn {
    /// Keeps the weights; the tree is filled at the first pick.
    pub fn new(weights: &[f64]) -> Self {
        let n = weights.len();
        let leaves = n.next_power_of_two();
        LeastConn {
            weights: weights.iter().map(|&w| sane_weight(w)).collect(),
            leaves,
            tree: vec![(f64::INFINITY, 0.0); 2 * leaves],
            cursor: 0,
            resync: true,
        }
    }

    /// Replaces the weights; every leaf is re-read at the next pick.
    pub fn set_weights(&mut self, weights: &[f64]) {
        if weights.len() != self.weights.len() {
            *self = LeastConn::new(weights);
            return;
        }
        for (w, &new) in self.weights.iter_mut().zip(weights) {
            *w = sane_weight(new);
        }
        self.resync = true;
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
    /// `None` when none is eligible. O(log n); see the module docs for what it may miss.
    pub fn pick<R: Rng + ?Sized, V: NodeView + ?Sized>(&mut self, rng: &mut R, view: &V) -> Option<usize> {
        let n = self.weights.len();
        if n == 0 {
            return None;
        }
        if self.resync {
            for i in 0..n {
                self.tree[self.leaves + i].0 = self.score(view, i);
                self.tree[self.leaves + i].1 = self.weights[i];
            }
            for k in (1..self.leaves).rev() {
                self.combine(k);
            }
            self.resync = false;
        }
        for _ in 0..FRESH_PER_PICK.min(n) {
            let i = self.cursor;
            self.cursor = if i + 1 >= n { 0 } else { i + 1 };
            self.set(i, self.score(view, i));
        }
        // Nodes set aside for this pick only, with their scores.
        let mut aside = [(0usize, 0.0f64); MAX_PROBES];
        let mut naside = 0;
        let mut chosen = None;
        for _ in 0..MAX_PROBES {
            if self.tree[1].0 == f64::INFINITY {
                break;
            }
            let i = self.descend(rng);
            let score = self.score(view, i);
            if score != self.tree[self.leaves + i].0 {
                self.set(i, score);
                continue;
            }
            if view.eligible(i) {
                chosen = Some(i);
                break;
            }
            if !view.out(i) {
                aside[naside] = (i, score);
                naside += 1;
            }
            self.set(i, f64::INFINITY);
        }
        for &(i, score) in &aside[..naside] {
            self.set(i, score);
        }
        if chosen.is_none() {
            // The exact answer; every leaf is re-read at the next pick.
            self.resync = true;
            return self.pick_scan(rng, view);
        }
        // The chosen leaf is left as read: the try the caller starts on it (if it
        // does) is seen by the next pick's verification.
        chosen
    }

    /// [`pick`](Self::pick) by an O(n) scan of every node: one pass of weighted
    /// reservoir sampling over the nodes of least score. Exact; the reference.
    pub fn pick_scan<R: Rng + ?Sized, V: NodeView + ?Sized>(&self, rng: &mut R, view: &V) -> Option<usize> {
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

    fn score<V: NodeView + ?Sized>(&self, view: &V, i: usize) -> f64 {
        f64::from(view.load(i)) / self.weights[i]
    }

    /// Walks from the root to a leaf of least score, weighted among the ties.
    fn descend<R: Rng + ?Sized>(&self, rng: &mut R) -> usize {
        let mut u = rng.random::<f64>() * self.tree[1].1;
        let mut k = 1;
        // Without branches: among tied idle nodes each step is a coin toss, which a
        // branch predictor would miss half the time.
        while k < self.leaves {
            let (target, (lm, lt), rm) = (self.tree[k].0, self.tree[2 * k], self.tree[2 * k + 1].0);
            let (l_tied, r_tied) = (lm == target, rm == target);
            // Left when only it holds the least score, or both do and u falls in its share.
            let left = l_tied & (!r_tied | (u < lt));
            // Going right past a left share of the ties: u moves past it.
            u -= lt * f64::from(u8::from(l_tied & !left));
            k = 2 * k + usize::from(!left);
        }
        k - self.leaves
    }

    /// Sets leaf `i`'s score and updates the entries above it.
    fn set(&mut self, i: usize, score: f64) {
        let mut k = self.leaves + i;
        if self.tree[k].0 == score {
            return;
        }
        self.tree[k].0 = score;
        while k > 1 {
            k /= 2;
            let before = self.tree[k];
            self.combine(k);
            // Nothing above changes once an entry is as it was.
            if self.tree[k] == before {
                return;
            }
        }
    }

    /// Entry `k` from its children: the lesser score, and the weight of the child or
    /// children that hold it (without branches, as `descend`).
    fn combine(&mut self, k: usize) {
        let ((lm, lt), (rm, rt)) = (self.tree[2 * k], self.tree[2 * k + 1]);
        let (l_less, r_less) = (lm < rm, rm < lm);
        let least = if r_less { rm } else { lm };
        self.tree[k] = (
            least,
            lt * f64::from(u8::from(!r_less)) + rt * f64::from(u8::from(!l_less)),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{chi_square, OutView, TestView};
    use super::*;
    use rand::rngs::SmallRng;
    use rand::SeedableRng;

    #[test]
    fn least_conn_picks_lowest_inflight_per_weight() {
        let mut rng = SmallRng::seed_from_u64(21);
        let mut lc = LeastConn::new(&[1.0, 4.0, 2.0]);
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
        let mut lc = LeastConn::new(&[1.0, 1.0]);
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
        let mut lc = LeastConn::new(&weights);
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
        let mut lc = LeastConn::new(&weights);
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
        let mut lc = LeastConn::new(&[3.0, 6.0]);
        let mut view = TestView::idle(2);
        view.inflight = vec![1, 2];
        let mut seen = [false; 2];
        for _ in 0..200 {
            seen[lc.pick(&mut rng, &view).unwrap()] = true;
        }
        assert_eq!(seen, [true, true]);
    }

    /// The tree against the O(n) reference on random states: same node, or one of the
    /// same least score; and set-aside nodes come back.
    #[test]
    fn least_conn_tree_matches_the_scan_on_random_states() {
        let mut rng = SmallRng::seed_from_u64(25);
        for round in 0..300 {
            let n = rng.random_range(1..300);
            let weights: Vec<f64> = (0..n).map(|_| rng.random_range(1..10) as f64).collect();
            let mut lc = LeastConn::new(&weights);
            let mut view = TestView::idle(n);
            for _ in 0..20 {
                let density = [0.02, 0.5, 0.95, 1.0][round % 4];
                for i in 0..n {
                    view.eligible[i] = rng.random::<f64>() < density;
                    if rng.random::<f64>() < 0.3 {
                        view.inflight[i] = rng.random_range(0..6);
                    }
                }
                // A refresh every few picks, as the balancer's.
                if rng.random::<f64>() < 0.2 {
                    lc.set_weights(&weights);
                }
                // Changes since the tree last read them are only promised to be seen
                // after a refresh; the reference is compared after one.
                lc.set_weights(&weights);
                let got = lc.pick(&mut rng, &view);
                let want = lc.pick_scan(&mut rng, &view);
                match (got, want) {
                    (None, None) => {}
                    (Some(g), Some(w)) => {
                        assert!(view.eligible[g]);
                        let score = |i: usize| f64::from(view.inflight[i]) / weights[i];
                        assert_eq!(score(g), score(w), "n={n}: {g} vs {w}");
                    }
                    other => panic!("n={n}: {other:?}"),
                }
            }
        }
    }

    /// Without a refresh in between: a node whose count rose is never chosen over a
    /// lower one (every pick verifies), and a node that falls is seen within
    /// n / FRESH_PER_PICK picks.
    #[test]
    fn least_conn_tree_sees_changes_between_refreshes() {
        let mut rng = SmallRng::seed_from_u64(26);
        let n = 64;
        let weights = vec![1.0; n];
        let mut lc = LeastConn::new(&weights);
        let mut view = TestView::idle(n);
        view.inflight = vec![5; n];
        view.inflight[7] = 1;
        assert_eq!(lc.pick(&mut rng, &view), Some(7));
        // 7 rises above the others: never picked again.
        view.inflight[7] = 9;
        for _ in 0..50 {
            assert_ne!(lc.pick(&mut rng, &view), Some(7));
        }
        // 30 falls to 0: found within n / FRESH_PER_PICK picks.
        view.inflight[30] = 0;
        let k = (0..=n / FRESH_PER_PICK)
            .position(|_| lc.pick(&mut rng, &view) == Some(30))
            .expect("the fall is seen");
        assert!(k <= n / FRESH_PER_PICK);
    }

    /// Nodes out of service are set aside until the next refresh; nodes only
    /// ineligible for one request (tried) are put back after the pick.
    #[test]
    fn least_conn_tree_sets_aside_and_restores() {
        let mut rng = SmallRng::seed_from_u64(27);
        let n = 100;
        let mut lc = LeastConn::new(&vec![1.0; n]);
        let mut view = TestView::idle(n);
        view.inflight = vec![3; n];
        // 40 idle nodes out of service: more than MAX_PROBES, so the first pick scans.
        let out: Vec<bool> = (0..n).map(|i| i < 40).collect();
        for i in 0..40 {
            view.inflight[i] = 0;
            view.eligible[i] = false;
        }
        view.inflight[50] = 1;
        for _ in 0..20 {
            assert_eq!(lc.pick(&mut rng, &OutView(&view, &out)), Some(50));
        }
        // Tried: 50 ineligible for one request only.
        view.eligible[50] = false;
        let other = lc.pick(&mut rng, &OutView(&view, &out)).unwrap();
        assert!(other >= 40 && other != 50);
        view.eligible[50] = true;
        assert_eq!(lc.pick(&mut rng, &OutView(&view, &out)), Some(50));
        // Back in service: seen at the next refresh.
        for i in 0..40 {
            view.eligible[i] = true;
        }
        let no_out = vec![false; n];
        lc.set_weights(&vec![1.0; n]);
        assert!(lc.pick(&mut rng, &OutView(&view, &no_out)).unwrap() < 40);
    }
}
