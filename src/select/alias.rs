//! Weighted random selection in O(1) per pick with Vose's alias method.
//!
//! The alias method (Walker 1974; the numerically stable construction is Vose, "A
//! linear algorithm for generating random numbers with a given distribution", IEEE TSE
//! 1991) turns n weights into n slots, each holding a probability and an alias. A draw
//! picks a slot uniformly and keeps it with the slot's probability, else takes its alias:
//! one random number and one table access, whatever n is, after an O(n) build.
//!
//! Why: `weighted_random` is the cheapest algorithm that spreads load ∝ weight with no
//! shared state between workers, and [`P2cEwma`](super::P2cEwma) samples its two
//! candidates with the same table. Ineligible nodes are handled by rejection (redraw),
//! bounded by [`MAX_DRAWS`]; after that an O(n) weighted scan over the eligible nodes
//! gives the same conditional distribution.

use super::{sane_weight, weighted_scan, without_slow, NodeView, MAX_DRAWS};
use rand::Rng;

/// One slot of the table: keep `index` with probability `keep / 2^32`, else take
/// `alias`. Eight bytes, so that a table of a large pool takes half the cache lines.
#[derive(Clone, Copy, Debug)]
struct Slot {
    /// The slot's probability in units of 2^-32: a draw compares 32 random bits with
    /// it, so the integer draw needs no float conversion. A slot that keeps itself
    /// always has itself as alias (its `keep`, `u32::MAX`, then does not matter).
    keep: u32,
    alias: u32,
}

/// 2^32: a probability of 1 in [`Slot::keep`]'s units.
const ONE: f64 = 4_294_967_296.0;

/// A slot's probability in [`Slot::keep`]'s units, rounded to the nearest (no libm
/// call: a refresh rebuilds the tables of every pool); at most `u32::MAX`, 2^-32
/// short of 1.
fn keep_of(prob: f64) -> u32 {
    (prob.clamp(0.0, 1.0) * ONE + 0.5).min(u32::MAX as f64) as u32
}

/// Vose's alias table over a list of weights.
#[derive(Clone, Debug, Default)]
pub struct AliasTable {
    slots: Vec<Slot>,
}

impl AliasTable {
    /// Builds the table in O(n). Weights are clamped like every selector's (see
    /// [`MIN_WEIGHT`](super::MIN_WEIGHT)).
    pub fn new(weights: &[f64]) -> Self {
        let n = weights.len();
        let weights: Vec<f64> = weights.iter().map(|&w| sane_weight(w)).collect();
        let total: f64 = weights.iter().sum();
        // Scaled so that the average slot is exactly 1.
        let mut scaled: Vec<f64> = weights.iter().map(|w| w * n as f64 / total).collect();
        let mut slots: Vec<Slot> = (0..n)
            .map(|i| Slot {
                keep: u32::MAX,
                alias: i as u32,
            })
            .collect();
        let (mut small, mut large): (Vec<usize>, Vec<usize>) = (0..n).partition(|&i| scaled[i] < 1.0);
        while let (Some(&s), Some(&l)) = (small.last(), large.last()) {
            small.pop();
            slots[s] = Slot {
                keep: keep_of(scaled[s]),
                alias: l as u32,
            };
            // Vose's stable update: the large one gives away what the small one lacks.
            scaled[l] = (scaled[l] + scaled[s]) - 1.0;
            if scaled[l] < 1.0 {
                large.pop();
                small.push(l);
            }
        }
        // Whatever is left over (only through rounding) is ~1 and keeps itself.
        AliasTable { slots }
    }

    /// Number of weights the table was built from.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// True when built from no weights.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// An index drawn with probability ∝ weight, or `None` for an empty table.
    ///
    /// One random 64-bit word serves for both steps, in integers only: its high 32
    /// bits times n (the high half of the product, Lemire's multiply-shift) pick the
    /// slot, its low 32 bits are the coin flipped against the slot's probability.
    /// The slot's bias (at most n / 2^32) and the coin's resolution (2^-32) are far
    /// below what any sample could show.
    #[inline]
    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> Option<usize> {
        let n = self.slots.len();
        if n == 0 {
            return None;
        }
        let r = rng.next_u64();
        // Below n: (2^32 - 1) * n >> 32 < n (a table has fewer than 2^32 slots).
        let i = (((r >> 32) * n as u64) >> 32) as usize;
        let slot = self.slots[i];
        Some(if (r as u32) < slot.keep {
            i
        } else {
            slot.alias as usize
        })
    }

    /// An index drawn with probability ∝ weight from 32 random bits (the table must not
    /// be empty): what lets one 64-bit random number give two draws
    /// ([`P2cEwma`](super::P2cEwma)'s pair).
    ///
    /// `bits * n` is the draw scaled to `[0, n)` in 32.32 fixed point: its integer part
    /// (the high half, Lemire's multiply-shift) picks the slot and its fraction (the
    /// low half) is the coin flipped against the slot's probability, as a float draw
    /// `u * n` would split into `floor` and the rest. Given the slot, the fractions of
    /// the `bits` that land in it step by `n` across `[0, 2^32)`, so the coin is
    /// uniform and independent of the slot up to `n / 2^32`, the order of the slot's
    /// own bias: far below what any sample could show.
    #[inline(always)]
    pub fn at(&self, bits: u32) -> usize {
        let x = u64::from(bits) * self.slots.len() as u64;
        // Below n: (2^32 - 1) * n >> 32 < n.
        let i = (x >> 32) as usize;
        let slot = self.slots[i];
        if (x as u32) < slot.keep {
            i
        } else {
            slot.alias as usize
        }
    }
}

/// The `weighted_random` algorithm: a weighted draw among the eligible candidates.
#[derive(Clone, Debug)]
pub struct WeightedRandom {
    weights: Vec<f64>,
    table: AliasTable,
    /// The table of a pass that leaves the slow nodes out
    /// ([`NodeView::slow_left_out`]): their weights as 0. `None` when no node is slow.
    fast: Option<AliasTable>,
}

impl WeightedRandom {
    /// Builds the alias table for `weights` (O(n)).
    pub fn new(weights: &[f64]) -> Self {
        WeightedRandom {
            weights: weights.iter().map(|&w| sane_weight(w)).collect(),
            table: AliasTable::new(weights),
            fast: None,
        }
    }

    /// Marks the slow nodes (`slow[i]`), which a pass that leaves them out then never
    /// draws: one draw per pick however much weight they hold, instead of redraws and
    /// an O(n) scan. Cleared by [`set_weights`](Self::set_weights).
    pub fn set_slow(&mut self, slow: &[bool]) {
        self.fast = without_slow(&self.weights, slow).map(|w| AliasTable::new(&w));
    }

    /// Replaces the weights and rebuilds the table (O(n)).
    pub fn set_weights(&mut self, weights: &[f64]) {
        *self = WeightedRandom::new(weights);
    }

    /// Number of candidates.
    pub fn len(&self) -> usize {
        self.weights.len()
    }

    /// True when there are no candidates.
    pub fn is_empty(&self) -> bool {
        self.weights.is_empty()
    }

    /// An eligible index drawn with probability ∝ weight among the eligible ones, or
    /// `None` when none is eligible. O(1) expected unless ineligible nodes hold most of
    /// the weight, in which case it ends with an O(n) scan. Inlined, as
    /// [`Selector::pick`](super::Selector::pick) is.
    #[inline(always)]
    pub fn pick<R: Rng + ?Sized, V: NodeView + ?Sized>(&self, rng: &mut R, view: &V) -> Option<usize> {
        let table = match &self.fast {
            Some(fast) if view.slow_left_out() => fast,
            _ => &self.table,
        };
        for _ in 0..MAX_DRAWS {
            let i = table.sample(rng)?;
            if view.eligible(i) {
                return Some(i);
            }
        }
        weighted_scan(rng, &self.weights, view, None)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{chi_square, slow_pass, TestView};
    use super::*;
    use rand::rngs::SmallRng;
    use rand::SeedableRng;

    /// Chi-square critical values at p = 0.001 by degrees of freedom (1..=4).
    const CHI2_P001: [f64; 5] = [f64::NAN, 10.828, 13.816, 16.266, 18.467];

    fn counts(weights: &[f64], view: &TestView, picks: usize, seed: u64) -> Vec<u64> {
        let mut rng = SmallRng::seed_from_u64(seed);
        let wr = WeightedRandom::new(weights);
        let mut counts = vec![0u64; weights.len()];
        for _ in 0..picks {
            counts[wr.pick(&mut rng, view).unwrap()] += 1;
        }
        counts
    }

    /// One slow node holding two thirds of the weight: a pass that leaves it out draws
    /// once per pick from the table without it, the others in proportion; without
    /// `set_slow` (and after `set_weights`) the same pass redraws; a pass that takes
    /// it draws it by its weight.
    #[test]
    fn weighted_random_pass_without_slow_nodes_draws_once() {
        let weights = [1.0, 8.0, 1.0, 2.0];
        let slow = [false, true, false, false];
        let all = TestView::idle(4);
        let picks = 30_000u64;
        let mut wr = WeightedRandom::new(&weights);
        let run =
            |wr: &WeightedRandom, seed| slow_pass(&slow, picks, seed, |rng, v| wr.pick(rng, v).unwrap());
        let (_, asked) = run(&wr, 3);
        assert!(asked > picks * 2, "redraws past the slow node: {asked}");
        wr.set_slow(&slow);
        let (counts, asked) = run(&wr, 4);
        assert_eq!(asked, picks, "one draw per pick");
        assert_eq!(counts[1], 0);
        let fast = [counts[0], counts[2], counts[3]];
        assert!(chi_square(&fast, &[1.0, 1.0, 2.0]) < CHI2_P001[2], "{counts:?}");
        // The pass that takes slow nodes still draws the slow one by its weight.
        let mut rng = SmallRng::seed_from_u64(5);
        let mut counts = vec![0u64; 4];
        for _ in 0..picks {
            counts[wr.pick(&mut rng, &all).unwrap()] += 1;
        }
        assert!(chi_square(&counts, &weights) < CHI2_P001[3], "{counts:?}");
        wr.set_weights(&weights);
        assert!(
            wr.fast.is_none(),
            "new weights: slow nodes marked again by the refresh"
        );
    }

    #[test]
    fn alias_table_slots_reconstruct_the_weights() {
        let weights = [30.0, 50.0, 20.0, 0.5, 7.25];
        let table = AliasTable::new(&weights);
        let n = weights.len() as f64;
        let total: f64 = weights.iter().sum();
        // The mass of index i: its own slot's prob plus what other slots alias to it.
        let mut mass = vec![0.0; weights.len()];
        for (i, slot) in table.slots.iter().enumerate() {
            let prob = slot.keep as f64 / ONE;
            mass[i] += prob / n;
            mass[slot.alias as usize] += (1.0 - prob) / n;
        }
        // Exact up to the coin's resolution, 2^-32 per slot.
        for (m, w) in mass.iter().zip(&weights) {
            assert!((m - w / total).abs() < 1e-9, "{m} vs {}", w / total);
        }
    }

    #[test]
    fn alias_table_at_splits_32_bits_into_slot_and_coin() {
        // Every 2^12-th value of the 32 bits, evenly spread: the share of each index
        // must be its weight's, up to the grid's resolution (n / 2^20 per slot).
        let weights = [30.0, 50.0, 20.0, 0.5, 7.25];
        let table = AliasTable::new(&weights);
        let total: f64 = weights.iter().sum();
        let mut counts = [0u64; 5];
        for k in 0u32..1 << 20 {
            counts[table.at((k << 12) | 0x800)] += 1;
        }
        for (c, w) in counts.iter().zip(&weights) {
            let share = *c as f64 / (1u64 << 20) as f64;
            assert!((share - w / total).abs() < 2e-5, "{share} vs {}", w / total);
        }
        // The extremes stay in range.
        assert!(table.at(0) < 5 && table.at(u32::MAX) < 5);
    }

    #[test]
    fn weighted_random_chi_square_100k() {
        // df = 2, critical value 13.816 at p = 0.001.
        let weights = [30.0, 50.0, 20.0];
        let c = counts(&weights, &TestView::idle(3), 100_000, 11);
        let chi2 = chi_square(&c, &weights);
        assert!(chi2 < CHI2_P001[2], "chi2 = {chi2}, counts {c:?}");
    }

    #[test]
    fn weighted_random_with_ineligible_keeps_conditional_proportions() {
        // The heavy node is ineligible, so the draws often fail and the scan fallback
        // runs too: the remaining nodes must still come out ∝ weight.
        let weights = [1000.0, 30.0, 50.0, 20.0];
        let mut view = TestView::idle(4);
        view.eligible[0] = false;
        let c = counts(&weights, &view, 100_000, 12);
        assert_eq!(c[0], 0);
        // df = 2, critical value 13.816 at p = 0.001.
        let chi2 = chi_square(&c[1..], &weights[1..]);
        assert!(chi2 < CHI2_P001[2], "chi2 = {chi2}, counts {c:?}");
    }

    #[test]
    fn weighted_random_set_weights_changes_proportions() {
        let mut rng = SmallRng::seed_from_u64(13);
        let view = TestView::idle(4);
        let mut wr = WeightedRandom::new(&[1.0, 1.0, 1.0, 1.0]);
        wr.set_weights(&[10.0, 20.0, 30.0, 40.0]);
        let mut c = vec![0u64; 4];
        for _ in 0..100_000 {
            c[wr.pick(&mut rng, &view).unwrap()] += 1;
        }
        // df = 3, critical value 16.266 at p = 0.001.
        let chi2 = chi_square(&c, &[10.0, 20.0, 30.0, 40.0]);
        assert!(chi2 < CHI2_P001[3], "chi2 = {chi2}, counts {c:?}");
    }

    #[test]
    fn alias_table_empty_and_single() {
        let mut rng = SmallRng::seed_from_u64(14);
        assert_eq!(AliasTable::new(&[]).sample(&mut rng), None);
        let one = AliasTable::new(&[3.0]);
        for _ in 0..100 {
            assert_eq!(one.sample(&mut rng), Some(0));
        }
    }
}
