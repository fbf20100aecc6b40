//! Power of two choices over weighted samples, with a peak-EWMA latency cost.
//!
//! Draw two distinct eligible candidates with probability ∝ weight (alias tables), and
//! keep the cheaper one, where `cost = latency * (1 + load / (weight / mean weight))`
//! and `load` is the node's in-flight tries plus the queue its scraped `/metrics` show
//! beyond them (`NodeView::load`, `crate::scrape`; just the in-flight tries when the
//! pool does not scrape or the figures are stale).
//! This is Mitzenmacher's "power of two choices" (The Power of Two Choices in Randomized
//! Load Balancing, 2001) with the cost Finagle's `P2CPeakEwma` balancer uses (Linkerd
//! too): latency estimate times outstanding load, `latency * (inflight + 1)`, which it
//! equals when weights are equal. With unequal weights the load is counted per unit of
//! relative capacity instead of dividing the whole cost by the weight: the latter would
//! count the weight twice (draw and cost), so that an idle pool of weights 1:2:3 gives
//! the heaviest node every comparison (measured: shares 0 / .15 / .85). Here an idle
//! pool ties, a tie keeps the first draw, and shares follow the weights exactly.
//!
//! Why: comparing just two random nodes already avoids the worst ones exponentially
//! better than one random choice, in O(1) per pick and with no coordination between
//! workers; unlike picking the global minimum it does not make every worker herd on the
//! same "best" node between two updates of the shared counters. Drawing by weight (and
//! keeping the first draw on a tie) keeps the configured proportions for nodes that
//! perform alike.
//!
//! Sampling two *distinct* nodes: the second draw is redrawn when it hits the first. To
//! keep that O(1) expected even when one node holds most of the weight, a second alias
//! table over every node but the heaviest is used when the first draw is the heaviest
//! node; any other first node holds at most half the weight, so a redraw fails with
//! probability ≤ 1/2. After [`MAX_DRAWS`] failed draws (also through ineligible nodes) an
//! O(n) weighted scan gives the same distribution.
//!
//! Slow nodes as overflow: a pass that leaves the slow nodes out
//! ([`NodeView::slow_left_out`]) draws from a second pair of tables in which they weigh
//! 0 ([`P2cEwma::set_slow`], rebuilt at each refresh while some node is slow), so it
//! costs two draws however much weight they hold; redrawing them instead made one pick
//! in two redraw its first candidate in a gateway with one slow node of three, and one
//! in eight end in the O(n) scan. The costs keep every node's own weight.

use super::{sane_weight, weighted_scan, without_slow, AliasTable, NodeView, MAX_DRAWS};
use rand::Rng;

/// Power-of-two-choices selection with a latency × load cost.
/// Relative cost difference below which two nodes count as equally good.
pub const TIE_BAND: f64 = 0.05;

#[derive(Clone, Debug)]
pub struct P2cEwma {
    weights: Vec<f64>,
    /// Per node, the mean weight over its weight: its load counts times this, per unit
    /// of relative capacity (kept, so that a pick multiplies instead of dividing).
    per_capacity: Vec<f64>,
    draws: Draws,
    /// The draws of a pass that leaves the slow nodes out
    /// ([`NodeView::slow_left_out`]): their weights as 0 (the costs keep every
    /// node's own). `None` when no node is slow.
    fast: Option<Box<Draws>>,
    /// The candidate the last [`P2cEwma::pick_noting`] compared with its choice and
    /// did not choose (eligible when asked), if it had two.
    other: Option<usize>,
}

/// The alias tables the two candidates are drawn from.
#[derive(Clone, Debug)]
struct Draws {
    table: AliasTable,
    /// Index of a node of maximal weight (0 when empty).
    heaviest: usize,
    /// Alias table over every node but `heaviest`; its index `j` means node `j` below
    /// `heaviest` and node `j + 1` from it on.
    without_heaviest: AliasTable,
}

impl Draws {
    /// Both tables of `weights` (O(n)).
    fn new(weights: &[f64]) -> Self {
        let weights: Vec<f64> = weights.iter().map(|&w| sane_weight(w)).collect();
        let heaviest = weights
            .iter()
            .enumerate()
            .fold(0, |best, (i, &w)| if w > weights[best] { i } else { best });
        let rest: Vec<f64> = weights
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != heaviest)
            .map(|(_, &w)| w)
            .collect();
        Draws {
            table: AliasTable::new(&weights),
            heaviest,
            without_heaviest: AliasTable::new(&rest),
        }
    }
}

impl P2cEwma {
    /// Builds both alias tables (O(n)).
    pub fn new(weights: &[f64]) -> Self {
        let weights: Vec<f64> = weights.iter().map(|&w| sane_weight(w)).collect();
        let mean = if weights.is_empty() {
            1.0
        } else {
            weights.iter().sum::<f64>() / weights.len() as f64
        };
        P2cEwma {
            per_capacity: weights.iter().map(|&w| mean / w).collect(),
            draws: Draws::new(&weights),
            fast: None,
            weights,
            other: None,
        }
    }

    /// Marks the slow nodes (`slow[i]`), which a pass that leaves them out then never
    /// draws: two draws per pick however much weight they hold, instead of redraws and
    /// an O(n) scan. Cleared by [`set_weights`](Self::set_weights).
    pub fn set_slow(&mut self, slow: &[bool]) {
        self.fast = without_slow(&self.weights, slow).map(|w| Box::new(Draws::new(&w)));
    }

    /// Replaces the weights and rebuilds the tables (O(n)).
    pub fn set_weights(&mut self, weights: &[f64]) {
        *self = P2cEwma::new(weights);
    }

    /// Number of candidates.
    pub fn len(&self) -> usize {
        self.weights.len()
    }

    /// True when there are no candidates.
    pub fn is_empty(&self) -> bool {
        self.weights.is_empty()
    }

    /// The cheaper of two distinct eligible nodes drawn by weight; the only eligible node
    /// when there is one; `None` when there is none.
    pub fn pick<R: Rng + ?Sized, V: NodeView + ?Sized>(&self, rng: &mut R, view: &V) -> Option<usize> {
        self.pick_pair(rng, view).map(|(chosen, _)| chosen)
    }

    /// [`pick`](Self::pick), noting the candidate it compared with its choice and did
    /// not choose ([`other`](Self::other)).
    #[inline]
    pub fn pick_noting<R: Rng + ?Sized, V: NodeView + ?Sized>(
        &mut self,
        rng: &mut R,
        view: &V,
    ) -> Option<usize> {
        let picked = self.pick_pair(rng, view);
        self.other = picked.and_then(|(_, other)| other);
        picked.map(|(chosen, _)| chosen)
    }

    /// The candidate the last [`pick_noting`](Self::pick_noting) compared with its
    /// choice and did not choose: eligible when it was asked, so some node other than
    /// the chosen one could take the request then. `None` when it had only one.
    pub fn other(&self) -> Option<usize> {
        self.other
    }

    /// The chosen candidate and the other one of the pair (`None`: only one eligible).
    ///
    /// One 64-bit random number gives both draws, a 32-bit half each
    /// ([`AliasTable::at`]); a redraw takes a new one. Each candidate's eligibility and
    /// cost come from one question to the view ([`NodeView::eligible_latency_load`]).
    #[inline(always)]
    fn pick_pair<R: Rng + ?Sized, V: NodeView + ?Sized>(
        &self,
        rng: &mut R,
        view: &V,
    ) -> Option<(usize, Option<usize>)> {
        if self.weights.is_empty() {
            return None;
        }
        let d = self.draws_for(view);
        let r = rng.next_u64();
        // The second candidate's likely node (its first draw, unless the first
        // candidate is the heaviest or is drawn again) starts loading while the first
        // is asked of: in a large pool both are cache misses, which then overlap.
        view.prefetch(d.table.at(r as u32));
        let (a, cost_a) = self.first(d, rng, view, (r >> 32) as u32)?;
        let Some((b, cost_b)) = self.second(d, rng, view, a, r as u32) else {
            return Some((a, None));
        };
        // Costs within TIE_BAND of each other are a tie: latency estimates carry noise
        // (and float rounding), and letting a 0.01% difference decide would send every
        // pick of a lightly loaded pool to whichever node is marginally cheaper.
        Some(if cost_b * (1.0 + TIE_BAND) < cost_a {
            (b, Some(a))
        } else {
            (a, Some(b))
        })
    }

    /// The tables to draw from for `view`: without the slow nodes in a pass that
    /// leaves them out, when some are marked ([`set_slow`](Self::set_slow)).
    #[inline(always)]
    fn draws_for<V: NodeView + ?Sized>(&self, view: &V) -> &Draws {
        match &self.fast {
            Some(fast) if view.slow_left_out() => fast,
            _ => &self.draws,
        }
    }

    /// Node `i`'s cost when it is eligible, `None` when it is not.
    ///
    /// cost = latency x (1 + load / relative capacity), load = in flight + queued,
    /// where a node's relative capacity is its weight over the mean weight. With equal
    /// weights this is Finagle's latency x (in-flight + 1); with unequal ones an idle
    /// pool ties and the tie goes to the first draw, itself drawn by weight, so shares
    /// follow the weights until load (in flight per unit of capacity) or latency says
    /// otherwise.
    #[inline(always)]
    fn cost_if_eligible<V: NodeView + ?Sized>(&self, view: &V, i: usize) -> Option<f64> {
        let (latency, load) = view.eligible_latency_load(i)?;
        Some(self.cost(i, latency, load))
    }

    /// The cost of node `i` at `latency` and `load` (see [`cost_if_eligible`](Self::cost_if_eligible)).
    #[inline(always)]
    fn cost(&self, i: usize, latency: f64, load: u32) -> f64 {
        latency * (1.0 + f64::from(load) * self.per_capacity[i])
    }

    /// The first candidate, ∝ weight among the eligible nodes, and its cost: the first
    /// draw from `bits`, up to [`MAX_DRAWS`] in all, then a weighted scan.
    #[inline(always)]
    fn first<R: Rng + ?Sized, V: NodeView + ?Sized>(
        &self,
        d: &Draws,
        rng: &mut R,
        view: &V,
        bits: u32,
    ) -> Option<(usize, f64)> {
        let i = d.table.at(bits);
        if let Some(cost) = self.cost_if_eligible(view, i) {
            return Some((i, cost));
        }
        self.first_again(d, rng, view)
    }

    /// [`first`](Self::first) after its first draw was not eligible.
    #[inline(never)]
    fn first_again<R: Rng + ?Sized, V: NodeView + ?Sized>(
        &self,
        d: &Draws,
        rng: &mut R,
        view: &V,
    ) -> Option<(usize, f64)> {
        for _ in 1..MAX_DRAWS {
            let i = d.table.at(rng.next_u32());
            if let Some(cost) = self.cost_if_eligible(view, i) {
                return Some((i, cost));
            }
        }
        self.scan(rng, view, None)
    }

    /// A second candidate other than `first`, ∝ weight among the other eligible nodes,
    /// and its cost; `None` when `first` is the only eligible node. The first draw from
    /// `bits`, up to [`MAX_DRAWS`] in all (a draw of `first` counts), then a weighted
    /// scan.
    #[inline(always)]
    fn second<R: Rng + ?Sized, V: NodeView + ?Sized>(
        &self,
        d: &Draws,
        rng: &mut R,
        view: &V,
        first: usize,
        bits: u32,
    ) -> Option<(usize, f64)> {
        // One node: no other (and `without_heaviest` would be empty).
        if self.weights.len() < 2 {
            return None;
        }
        let mut bits = bits;
        for k in 0..MAX_DRAWS {
            if k > 0 {
                bits = rng.next_u32();
            }
            let i = if first == d.heaviest {
                let j = d.without_heaviest.at(bits);
                j + usize::from(j >= d.heaviest)
            } else {
                d.table.at(bits)
            };
            if i != first {
                if let Some(cost) = self.cost_if_eligible(view, i) {
                    return Some((i, cost));
                }
            }
        }
        self.scan(rng, view, Some(first))
    }

    /// The draws' fallback: a weighted scan of the eligible nodes other than `except`,
    /// and the cost of the one it finds.
    #[inline(never)]
    fn scan<R: Rng + ?Sized, V: NodeView + ?Sized>(
        &self,
        rng: &mut R,
        view: &V,
        except: Option<usize>,
    ) -> Option<(usize, f64)> {
        let i = weighted_scan(rng, &self.weights, view, except)?;
        let (latency, load) = view.latency_load(i);
        Some((i, self.cost(i, latency, load)))
    }

    /// Two distinct eligible nodes drawn without replacement, ∝ weight, as the pick
    /// draws them: the second is `None` when only one node is eligible; `None` when
    /// none is.
    #[cfg(test)]
    fn draw_pair<R: Rng + ?Sized, V: NodeView + ?Sized>(
        &self,
        rng: &mut R,
        view: &V,
    ) -> Option<(usize, Option<usize>)> {
        let r = rng.next_u64();
        let d = self.draws_for(view);
        let (a, _) = self.first(d, rng, view, (r >> 32) as u32)?;
        Some((a, self.second(d, rng, view, a, r as u32).map(|(b, _)| b)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{chi_square, slow_pass, TestView};
    use super::*;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;

    #[test]
    fn p2c_prefers_the_lower_cost_of_two() {
        let mut rng = SmallRng::seed_from_u64(31);
        let p2c = P2cEwma::new(&[1.0, 1.0]);
        let mut view = TestView::idle(2);
        // Node 0: 1000 * (0 + 1) = 1000; node 1: 300 * (3 + 1) = 1200.
        view.latency = vec![1000.0, 300.0];
        view.inflight = vec![0, 3];
        for _ in 0..200 {
            assert_eq!(p2c.pick(&mut rng, &view), Some(0));
        }
        // One more request in flight on node 0: 2000 > 1200.
        view.inflight[0] = 1;
        for _ in 0..200 {
            assert_eq!(p2c.pick(&mut rng, &view), Some(1));
        }
        // In-flight counts per unit of relative capacity (weight / mean 2.5): node 0 at
        // weight 4 costs 1000 * (1 + 1 * 2.5/4) = 1625 < node 1's 300 * (1 + 3 * 2.5) = 2550.
        let p2c = P2cEwma::new(&[4.0, 1.0]);
        for _ in 0..200 {
            assert_eq!(p2c.pick(&mut rng, &view), Some(0));
        }
    }

    #[test]
    fn p2c_counts_the_scraped_queue_as_load() {
        let mut rng = SmallRng::seed_from_u64(35);
        let p2c = P2cEwma::new(&[1.0, 1.0]);
        let mut view = TestView::idle(2);
        // Equal latency and in-flight counts; node 0's queue makes it dearer:
        // 1000 x (1 + 1 + 20) against 1000 x (1 + 1).
        view.inflight = vec![1, 1];
        view.queued = vec![20, 0];
        for _ in 0..200 {
            assert_eq!(p2c.pick(&mut rng, &view), Some(1));
        }
        // Without it they tie and the draw decides: both get picks.
        view.queued = vec![0, 0];
        let zeros = (0..400).filter(|_| p2c.pick(&mut rng, &view) == Some(0)).count();
        assert!((100..300).contains(&zeros), "{zeros}");
    }

    #[test]
    fn p2c_near_equal_costs_are_a_tie() {
        // 1% apart: a tie, so shares follow the weights instead of herding on node 1.
        let mut rng = SmallRng::seed_from_u64(34);
        let p2c = P2cEwma::new(&[3.0, 1.0]);
        let mut view = TestView::idle(2);
        view.latency = vec![1000.0, 990.0];
        let mut counts = [0u64; 2];
        for _ in 0..40_000 {
            counts[p2c.pick(&mut rng, &view).unwrap()] += 1;
        }
        let x2 = chi_square(&counts, &[3.0, 1.0]);
        assert!(x2 < 10.828, "chi-square {x2}, counts {counts:?}");
    }

    #[test]
    fn p2c_idle_pool_follows_weights() {
        // Equal latency, nothing in flight: every comparison ties, the tie keeps the
        // first draw (by weight), so shares are the weights' (chi-square, df=2,
        // critical value 13.816 at p=0.001).
        let mut rng = SmallRng::seed_from_u64(33);
        let weights = [1.0, 2.0, 3.0];
        let p2c = P2cEwma::new(&weights);
        let view = TestView::idle(3);
        let mut counts = [0u64; 3];
        for _ in 0..60_000 {
            counts[p2c.pick(&mut rng, &view).unwrap()] += 1;
        }
        let x2 = chi_square(&counts, &weights);
        assert!(x2 < 13.816, "chi-square {x2}, counts {counts:?}");
    }

    #[test]
    fn p2c_slow_node_gets_much_less_than_its_share() {
        // Closed-loop simulation: 16 clients, each sends its next request as soon as the
        // previous one completes; a request to node i takes latency[i] µs ± 50%. Node 0
        // is 5x slower than the other four, all of equal weight (a 20% share).
        let latency = [5000.0, 1000.0, 1000.0, 1000.0, 1000.0];
        let mut rng = SmallRng::seed_from_u64(32);
        let p2c = P2cEwma::new(&[1.0; 5]);
        let mut view = TestView::idle(5);
        view.latency = latency.to_vec();
        let mut counts = [0u64; 5];
        // Completion events: (time µs, node).
        let mut events: BinaryHeap<Reverse<(u64, usize)>> = BinaryHeap::new();
        let mut send = |now: u64, view: &mut TestView, events: &mut BinaryHeap<_>| {
            let i = p2c.pick(&mut rng, view).unwrap();
            counts[i] += 1;
            view.inflight[i] += 1;
            let took = latency[i] * rng.random_range(0.5..1.5);
            events.push(Reverse((now + took as u64, i)));
        };
        for _ in 0..16 {
            send(0, &mut view, &mut events);
        }
        for _ in 0..50_000 {
            let Reverse((now, i)) = events.pop().unwrap();
            view.inflight[i] -= 1;
            send(now, &mut view, &mut events);
        }
        let total: u64 = counts.iter().sum();
        let slow_share = counts[0] as f64 / total as f64;
        assert!(slow_share < 0.07, "slow share {slow_share}, counts {counts:?}");
        // The fast nodes share the rest about evenly.
        for &c in &counts[1..] {
            let share = c as f64 / total as f64;
            assert!((0.22..0.28).contains(&share), "counts {counts:?}");
        }
    }

    #[test]
    fn p2c_pairs_are_drawn_without_replacement_by_weight() {
        // With one dominant node, the pair distribution must still be exact:
        // P(a, b) = w_a / W * w_b / (W - w_a).
        let weights = [100.0, 1.0, 2.0, 3.0];
        let total: f64 = weights.iter().sum();
        let mut rng = SmallRng::seed_from_u64(33);
        let p2c = P2cEwma::new(&weights);
        assert_eq!(p2c.draws.heaviest, 0);
        let view = TestView::idle(4);
        let mut counts = vec![0u64; 16];
        let mut expected = vec![0.0; 16];
        for a in 0..4 {
            for b in 0..4 {
                if a != b {
                    expected[a * 4 + b] = weights[a] / total * weights[b] / (total - weights[a]);
                }
            }
        }
        for _ in 0..200_000 {
            let (a, b) = p2c.draw_pair(&mut rng, &view).unwrap();
            counts[a * 4 + b.unwrap()] += 1;
        }
        let (obs, exp): (Vec<u64>, Vec<f64>) = counts
            .iter()
            .zip(&expected)
            .filter(|&(_, &e)| e > 0.0)
            .map(|(&c, &e)| (c, e))
            .unzip();
        // 12 cells, df = 11, critical value 31.264 at p = 0.001.
        let chi2 = chi_square(&obs, &exp);
        assert!(chi2 < 31.264, "chi2 = {chi2}, counts {counts:?}");
    }

    #[test]
    fn p2c_notes_the_other_candidate() {
        let mut rng = SmallRng::seed_from_u64(36);
        let mut p2c = P2cEwma::new(&[1.0, 1.0, 1.0]);
        let mut view = TestView::idle(3);
        for _ in 0..100 {
            let chosen = p2c.pick_noting(&mut rng, &view).unwrap();
            let other = p2c.other().unwrap();
            assert_ne!(chosen, other);
        }
        // One eligible node: no other; none: neither.
        view.eligible = vec![false, true, false];
        assert_eq!(p2c.pick_noting(&mut rng, &view), Some(1));
        assert_eq!(p2c.other(), None);
        view.eligible[1] = false;
        assert_eq!(p2c.pick_noting(&mut rng, &view), None);
        assert_eq!(p2c.other(), None);
    }

    /// One slow node holding two thirds of the weight: a pass that leaves it out asks
    /// of two candidates per pick (no redraw past it) and chooses the others by
    /// weight (idle, equal latencies: ties keep the first draw); without `set_slow`
    /// the same pass redraws.
    #[test]
    fn p2c_pass_without_slow_nodes_draws_two() {
        let weights = [1.0, 8.0, 1.0, 2.0];
        let slow = [false, true, false, false];
        let picks = 30_000u64;
        let mut p = P2cEwma::new(&weights);
        let run = |p: &mut P2cEwma, seed| {
            slow_pass(&slow, picks, seed, |rng, v| {
                let chosen = p.pick_noting(rng, v).unwrap();
                assert!(p.other().is_some_and(|o| !slow[o]));
                chosen
            })
        };
        let (_, asked) = run(&mut p, 6);
        assert!(asked > picks * 3, "redraws past the slow node: {asked}");
        p.set_slow(&slow);
        let (counts, asked) = run(&mut p, 7);
        // Two per pick but for the rare second candidate that MAX_DRAWS redraws of the
        // first leave to the scan (odds (1/4)^8 for a first of weight 1).
        assert!(asked <= 2 * picks + picks / 1000, "two draws per pick: {asked}");
        assert_eq!(counts[1], 0);
        let fast = [counts[0], counts[2], counts[3]];
        assert!(chi_square(&fast, &[1.0, 1.0, 2.0]) < 13.816, "{counts:?}");
    }

    #[test]
    fn p2c_single_eligible_and_none() {
        let mut rng = SmallRng::seed_from_u64(34);
        let p2c = P2cEwma::new(&[5.0, 1.0, 1.0]);
        let mut view = TestView::idle(3);
        view.eligible = vec![false, false, true];
        for _ in 0..100 {
            assert_eq!(p2c.pick(&mut rng, &view), Some(2));
        }
        view.eligible[2] = false;
        assert_eq!(p2c.pick(&mut rng, &view), None);
        let one = P2cEwma::new(&[1.0]);
        assert_eq!(one.pick(&mut rng, &TestView::idle(1)), Some(0));
    }

    #[test]
    fn p2c_set_weights_changes_sampling() {
        let mut rng = SmallRng::seed_from_u64(35);
        let mut p2c = P2cEwma::new(&[1.0, 1.0, 1.0]);
        p2c.set_weights(&[1.0, 1.0, 50.0]);
        assert_eq!(p2c.draws.heaviest, 2);
        // Equal costs except weight: the heavy node wins whenever it is drawn, which
        // is nearly always.
        let view = TestView::idle(3);
        let heavy = (0..1000).filter(|_| p2c.pick(&mut rng, &view) == Some(2)).count();
        assert!(heavy > 950, "{heavy}");
    }
}
