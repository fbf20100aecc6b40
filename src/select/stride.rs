//! Smooth weighted round robin in O(log n) per pick: stride scheduling over a heap.
//!
//! Each node `i` has a stride `1 / weight(i)` and a pass (the virtual time of its next
//! turn). A pick takes the node with the smallest pass (ties: lower index) and moves
//! its pass one stride on; a 4-ary heap ordered by pass finds it in O(log n). Every
//! node is then picked ∝ weight, and its picks are evenly spaced in virtual time, so
//! a heavy node's turns are interleaved with the others' instead of bunched: the
//! smoothness of nginx's smooth weighted round robin ([`Swrr`](super::Swrr), which is
//! O(n) per pick), in another order. Stride scheduling is Waldspurger and Weihl,
//! "Stride Scheduling: Deterministic Proportional-Share Resource Management" (1995),
//! the deadline-ordered weighted round robin. Measured figures: docs/benchmarks.md.
//!
//! Initial passes are spread by the golden ratio (`frac(i * φ) * stride`), so nodes of
//! equal weight do not all fall due at the same virtual time: weights {5, 1, 1} give
//! `a a c a a b a` per period of 7 (nginx's gives `a a b a c a a`).
//!
//! Eligibility: a pick looks at the heap's smallest passes first (a bounded best-first
//! walk of [`MAX_PROBES`] heap entries), and falls back to an O(n) scan for the
//! eligible node with the smallest pass when all of those are ineligible. A skipped
//! node keeps its pass, as nginx's keeps its `current`; when it is next picked its pass
//! starts from the virtual clock (the pass of the last pick), so a node back from a
//! long absence gets its share again without a burst of make-up turns. A node that is
//! out of service for every request ([`NodeView::out`]: cooling, ejected, draining)
//! loses its turn when the walk meets it (its pass moves one stride on), so that many
//! nodes out at once do not push every pick into the scan.
//!
//! New weights ([`Stride::set_weights`]) keep every pass, so the rotation goes on where
//! it was; a pass more than one new stride ahead of the virtual clock is pulled back to
//! it (a node whose weight grew, as in slow start, is not held back by its old stride).
//!
//! Each worker process runs its own rotation, started `k` picks in (`k` random in
//! `[0, n)`, [`Stride::new_with_offset`]), so workers do not all start at node 1.

use super::{sane_weight, AllEligible, NodeView};

/// Heap entries a pick examines before it falls back to a scan.
pub const MAX_PROBES: usize = 16;

/// 1/φ: spreads the initial passes of nodes of equal weight.
const PHASE: f64 = 0.618_033_988_749_894_9;

/// Children per heap entry. A 4-ary heap is half as deep as a binary one for the same
/// comparisons per pick, and an entry's four children (16 bytes each) share one cache
/// line: at 1,000 nodes a pick's sift moves 5 entries instead of 10.
const ARITY: usize = 4;
const _: () = assert!(
    ARITY == 4,
    "sift_down compares a full set of children as two pairs"
);

/// A heap entry: the node's pass as an order key above its index, so that one integer
/// comparison orders entries by pass, then by index.
type Entry = u128;

fn entry(pass: f64, i: usize) -> Entry {
    (u128::from(order_key(pass)) << 32) | i as u128
}

fn node_of(e: Entry) -> usize {
    e as u32 as usize
}

/// `x`'s place in `f64::total_cmp`'s order, as an unsigned integer: a value with the
/// sign bit clear gets it set, a negative one has every bit flipped.
fn order_key(x: f64) -> u64 {
    let b = x.to_bits();
    if b >> 63 == 0 {
        b | 1 << 63
    } else {
        !b
    }
}

/// Stride-scheduling round-robin state.
#[derive(Clone, Debug, Default)]
pub struct Stride {
    stride: Vec<f64>,
    /// Each node's pass.
    pass: Vec<f64>,
    /// A 4-ary min-heap of entries ([`entry`]: the pass kept inline, no indirection on
    /// the comparisons of a sift).
    heap: Vec<Entry>,
    /// Position of each node in `heap`.
    pos: Vec<u32>,
    /// The virtual clock: the pass at which the last pick was made.
    clock: f64,
}

impl Stride {
    /// A fresh rotation.
    pub fn new(weights: &[f64]) -> Self {
        let n = weights.len();
        let stride: Vec<f64> = weights.iter().map(|&w| 1.0 / sane_weight(w)).collect();
        let pass: Vec<f64> = stride
            .iter()
            .enumerate()
            .map(|(i, s)| (i as f64 * PHASE).fract() * s)
            .collect();
        let mut st = Stride {
            heap: pass.iter().enumerate().map(|(i, &p)| entry(p, i)).collect(),
            stride,
            pass,
            pos: (0..n as u32).collect(),
            clock: 0.0,
        };
        st.heapify();
        st
    }

    /// The rotation after `k` picks with every node eligible, from a fresh start.
    /// O(k log n); `Selector::build` uses a random `k` in `[0, n)`.
    pub fn new_with_offset(weights: &[f64], k: usize) -> Self {
        let mut st = Stride::new(weights);
        for _ in 0..k {
            st.pick(&AllEligible);
        }
        st
    }

    /// Replaces the weights, keeping the passes (see the module docs). A list of
    /// another length (a contract violation) starts a fresh rotation.
    pub fn set_weights(&mut self, weights: &[f64]) {
        if weights.len() != self.stride.len() {
            *self = Stride::new(weights);
            return;
        }
        // Passes relative to the clock, so that they stay small however long it runs.
        let clock = self.clock;
        for ((s, p), &w) in self.stride.iter_mut().zip(&mut self.pass).zip(weights) {
            *s = 1.0 / sane_weight(w);
            *p = (*p - clock).min(*s);
        }
        for e in &mut self.heap {
            let i = node_of(*e);
            *e = entry(self.pass[i], i);
        }
        self.clock = 0.0;
        self.heapify();
    }

    /// Number of candidates.
    pub fn len(&self) -> usize {
        self.stride.len()
    }

    /// True when there are no candidates.
    pub fn is_empty(&self) -> bool {
        self.stride.is_empty()
    }

    /// The next eligible node of the rotation, or `None` when none is eligible.
    pub fn pick<V: NodeView + ?Sized>(&mut self, view: &V) -> Option<usize> {
        let top = node_of(*self.heap.first()?);
        // The common case: the node due first is eligible.
        let i = if view.eligible(top) {
            top
        } else {
            self.walk(view).or_else(|| self.scan(view))?
        };
        self.advance(i);
        Some(i)
    }

    /// Moves node `i`'s pass one stride past the virtual clock's.
    fn advance(&mut self, i: usize) {
        self.clock = self.clock.max(self.pass[i]);
        self.set_pass(i, self.clock + self.stride[i]);
    }

    /// Sets node `i`'s pass to `pass`, at least its current one, and restores the heap.
    fn set_pass(&mut self, i: usize, pass: f64) {
        self.pass[i] = pass;
        let at = self.pos[i] as usize;
        self.heap[at] = entry(pass, i);
        self.sift_down(at);
    }

    /// Best-first walk of the heap from its root: the eligible node with the smallest
    /// pass among the first [`MAX_PROBES`] entries in pass order, if any.
    fn walk<V: NodeView + ?Sized>(&mut self, view: &V) -> Option<usize> {
        // Frontier of heap positions; each probe removes one and adds up to ARITY.
        let mut frontier = [0u32; MAX_PROBES * (ARITY - 1) + 2];
        let mut len = usize::from(!self.heap.is_empty());
        let mut bumped = [0u32; MAX_PROBES];
        let mut nbumped = 0;
        let mut found = None;
        for _ in 0..MAX_PROBES {
            if len == 0 {
                break;
            }
            let (k, _) = frontier[..len]
                .iter()
                .enumerate()
                .min_by_key(|&(_, &at)| self.heap[at as usize])
                .expect("frontier not empty");
            let at = frontier[k] as usize;
            frontier[k] = frontier[len - 1];
            len -= 1;
            let i = node_of(self.heap[at]);
            if view.eligible(i) {
                found = Some(i);
                break;
            }
            if view.out(i) {
                bumped[nbumped] = i as u32;
                nbumped += 1;
            }
            for child in ARITY * at + 1..(ARITY * at + 1 + ARITY).min(self.heap.len()) {
                frontier[len] = child as u32;
                len += 1;
            }
        }
        // Nodes out of service lose the turn they were due (after the walk: moving
        // them reorders the heap under the frontier).
        for &i in &bumped[..nbumped] {
            let i = i as usize;
            self.set_pass(i, self.pass[i].max(self.clock) + self.stride[i]);
        }
        found
    }

    /// The eligible node with the smallest `(pass, index)`: O(n).
    fn scan<V: NodeView + ?Sized>(&self, view: &V) -> Option<usize> {
        self.heap
            .iter()
            .copied()
            .filter(|&e| view.eligible(node_of(e)))
            .min()
            .map(node_of)
    }

    /// Moves the entry at `at` down to its place: each smaller child moves up into the
    /// hole, and the entry is written once, where it stops.
    fn sift_down(&mut self, mut at: usize) {
        let e = self.heap[at];
        let n = self.heap.len();
        loop {
            let first = ARITY * at + 1;
            let (k, least) = if first + ARITY <= n {
                // Every child there (all but the last parent): one bounds check.
                let kids: &[Entry; ARITY] =
                    self.heap[first..first + ARITY].try_into().expect("ARITY entries");
                // Branch-free: which child is least is a coin toss a predictor misses.
                let (a, b) = (usize::from(kids[1] < kids[0]), 2 + usize::from(kids[3] < kids[2]));
                let k = if kids[b] < kids[a] { b } else { a };
                (k, kids[k])
            } else if first < n {
                let kids = &self.heap[first..];
                let k = (1..kids.len()).fold(0, |k, c| if kids[c] < kids[k] { c } else { k });
                (k, kids[k])
            } else {
                break;
            };
            if least > e {
                break;
            }
            self.heap[at] = least;
            self.pos[node_of(least)] = at as u32;
            at = first + k;
        }
        self.heap[at] = e;
        self.pos[node_of(e)] = at as u32;
    }

    fn heapify(&mut self) {
        for at in (0..self.heap.len() / ARITY + 1).rev() {
            if at < self.heap.len() {
                self.sift_down(at);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{chi_square, OutView, TestView};
    use super::super::Swrr;
    use super::*;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    fn sequence(st: &mut Stride, view: &TestView, len: usize) -> Vec<usize> {
        (0..len).map(|_| st.pick(view).unwrap()).collect()
    }

    #[test]
    fn stride_sequence_5_1_1_is_smooth_and_periodic() {
        let mut st = Stride::new(&[5.0, 1.0, 1.0]);
        let view = TestView::idle(3);
        let expected = [0, 0, 2, 0, 0, 1, 0];
        assert_eq!(sequence(&mut st, &view, 7), expected);
        assert_eq!(sequence(&mut st, &view, 7), expected);
    }

    #[test]
    fn stride_offset_is_a_shift_of_the_same_sequence() {
        let view = TestView::idle(3);
        let reference = sequence(&mut Stride::new(&[5.0, 1.0, 1.0]), &view, 14);
        for k in 0..3 {
            let mut shifted = Stride::new_with_offset(&[5.0, 1.0, 1.0], k);
            assert_eq!(sequence(&mut shifted, &view, 7), reference[k..k + 7]);
        }
    }

    #[test]
    fn stride_skips_ineligible_and_keeps_their_turn() {
        let mut st = Stride::new(&[1.0, 1.0, 1.0]);
        let mut view = TestView::idle(3);
        let first = sequence(&mut st, &view, 3);
        assert_eq!(
            first
                .iter()
                .copied()
                .collect::<std::collections::BTreeSet<_>>()
                .len(),
            3
        );
        view.eligible[1] = false;
        let got = sequence(&mut st, &view, 4);
        assert!(got.iter().all(|&i| i != 1), "{got:?}");
        assert_eq!(got.iter().filter(|&&i| i == 0).count(), 2, "{got:?}");
        view.eligible = vec![false; 3];
        assert_eq!(st.pick(&view), None);
        // Back: node 1 gets its share again, without a burst of make-up turns.
        view.eligible = vec![true; 3];
        let back = sequence(&mut st, &view, 30);
        // Its one pending turn, then its share.
        assert!(
            (10..=11).contains(&back.iter().filter(|&&i| i == 1).count()),
            "{back:?}"
        );
        assert!(back[..4].iter().filter(|&&i| i == 1).count() <= 2, "{back:?}");
    }

    /// Same proportions as nginx's smooth WRR over whole periods, and as smooth: in
    /// every window of picks each node's count is within 2 of its share.
    #[test]
    fn stride_matches_swrr_proportions_and_smoothness() {
        use rand::rngs::SmallRng;
        use rand::{Rng, SeedableRng};
        let mut rng = SmallRng::seed_from_u64(5);
        for _ in 0..50 {
            let n = rng.random_range(1..40);
            let weights: Vec<f64> = (0..n).map(|_| rng.random_range(1..20) as f64).collect();
            let total: f64 = weights.iter().sum();
            let period = total as usize;
            let view = TestView::idle(n);
            let mut st = Stride::new_with_offset(&weights, rng.random_range(0..n));
            let mut nginx = Swrr::new(&weights);
            let (mut a, mut b) = (vec![0usize; n], vec![0usize; n]);
            let seq = sequence(&mut st, &view, 3 * period + 8);
            for k in 0..period {
                a[seq[k]] += 1;
                b[nginx.pick(&view).unwrap()] += 1;
            }
            assert_eq!(a, b, "{weights:?}");
            for win in [1, 7, period / 2 + 1] {
                for start in 0..period {
                    let mut c = vec![0usize; n];
                    for &i in &seq[start..start + win] {
                        c[i] += 1;
                    }
                    for (i, &ci) in c.iter().enumerate() {
                        let share = win as f64 * weights[i] / total;
                        assert!(
                            (ci as f64 - share).abs() < 2.0,
                            "{weights:?} window {win} at {start}: {c:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn stride_set_weights_keeps_progress_and_changes_proportions() {
        let view = TestView::idle(3);
        let mut st = Stride::new(&[1.0, 1.0, 1.0]);
        let first = st.pick(&view).unwrap();
        st.set_weights(&[1.0, 1.0, 1.0]);
        // The rotation goes on: the first node is not picked again before the others.
        let next = sequence(&mut st, &view, 2);
        assert!(!next.contains(&first), "{first} then {next:?}");
        st.set_weights(&[3.0, 1.0, 1.0]);
        let mut counts = [0; 3];
        for i in sequence(&mut st, &view, 500) {
            counts[i] += 1;
        }
        for (c, want) in counts.iter().zip([300i32, 100, 100]) {
            assert!((c - want).abs() <= 1, "{counts:?}");
        }
    }

    #[test]
    fn stride_grown_weight_is_not_held_back() {
        // Slow start: a node at a tiny weight, then at full weight, gets its share at
        // once rather than after its old, huge stride.
        let view = TestView::idle(2);
        let mut st = Stride::new(&[1.0, 1e-6]);
        sequence(&mut st, &view, 10);
        st.set_weights(&[1.0, 1.0]);
        let seq = sequence(&mut st, &view, 10);
        assert_eq!(seq.iter().filter(|&&i| i == 1).count(), 5, "{seq:?}");
    }

    #[test]
    fn stride_fractional_weights_stay_proportional() {
        let weights = [0.7, 2.1, 1.4];
        let view = TestView::idle(3);
        let mut st = Stride::new(&weights);
        let mut counts = [0u64; 3];
        for i in sequence(&mut st, &view, 42_000) {
            counts[i] += 1;
        }
        for (c, expected) in counts.iter().zip([7000, 21000, 14000]) {
            assert!(c.abs_diff(expected) <= 2, "{counts:?}");
        }
        assert!(chi_square(&counts, &weights) < 1.0);
    }

    /// Many nodes ineligible at once, beyond the walk: the scan still finds the rest,
    /// and nodes out of service lose their turns instead of blocking the walk.
    #[test]
    fn stride_many_ineligible_falls_back_to_the_scan() {
        let n = 200;
        let mut st = Stride::new(&vec![1.0; n]);
        let mut view = TestView::idle(n);
        for i in 0..150 {
            view.eligible[i] = false;
        }
        for _ in 0..400 {
            assert!(st.pick(&view).unwrap() >= 150);
        }
        let marks: Vec<bool> = (0..n).map(|i| i < 150).collect();
        let out = OutView(&view, &marks);
        let mut counts = vec![0; n];
        for _ in 0..5000 {
            counts[st.pick(&out).unwrap()] += 1;
        }
        assert!(counts[..150].iter().all(|&c| c == 0));
        assert!(counts[150..].iter().all(|&c| c == 100), "{:?}", &counts[150..]);
    }

    /// The rotation as the module docs define it, with no heap: each pick takes the
    /// eligible node with the smallest (pass, index) and moves its pass one stride past
    /// the clock; new weights keep passes relative to the clock, capped at one stride.
    struct Reference {
        stride: Vec<f64>,
        pass: Vec<f64>,
        clock: f64,
    }

    impl Reference {
        fn new(weights: &[f64]) -> Self {
            let stride: Vec<f64> = weights.iter().map(|&w| 1.0 / w).collect();
            let pass = stride
                .iter()
                .enumerate()
                .map(|(i, s)| (i as f64 * PHASE).fract() * s)
                .collect();
            Reference {
                stride,
                pass,
                clock: 0.0,
            }
        }

        fn pick(&mut self, eligible: &[bool]) -> Option<usize> {
            let i = (0..self.pass.len())
                .filter(|&i| eligible[i])
                .min_by(|&a, &b| self.pass[a].total_cmp(&self.pass[b]).then(a.cmp(&b)))?;
            self.clock = self.clock.max(self.pass[i]);
            self.pass[i] = self.clock + self.stride[i];
            Some(i)
        }

        fn set_weights(&mut self, weights: &[f64]) {
            for (i, &w) in weights.iter().enumerate() {
                self.stride[i] = 1.0 / w;
                self.pass[i] = (self.pass[i] - self.clock).min(self.stride[i]);
            }
            self.clock = 0.0;
        }
    }

    #[test]
    fn stride_heap_picks_what_the_reference_rotation_picks() {
        let mut rng = SmallRng::seed_from_u64(7);
        for n in [1, 2, 3, 5, 17, 64, 301] {
            let mut weights: Vec<f64> = (0..n).map(|_| rng.random_range(1..=20) as f64).collect();
            let mut st = Stride::new(&weights);
            let mut reference = Reference::new(&weights);
            let mut view = TestView::idle(n);
            for step in 0..3_000 {
                if step % 50 == 0 {
                    // A new eligibility: from all nodes to most of them out.
                    let out = rng.random_range(0.0..0.95);
                    for e in &mut view.eligible {
                        *e = rng.random::<f64>() >= out;
                    }
                }
                if step % 700 == 699 {
                    for w in &mut weights {
                        *w = rng.random_range(1..=20) as f64;
                    }
                    st.set_weights(&weights);
                    reference.set_weights(&weights);
                }
                assert_eq!(
                    st.pick(&view),
                    reference.pick(&view.eligible),
                    "n {n}, step {step}"
                );
            }
        }
    }
}
