//! Selection: given the candidates of one tier of a pool (primaries or backups) and a
//! live view of their state, choose one.
//!
//! Selection knows nothing of shared memory, Lua or time: the balancer builds a
//! [`Selector`] from a snapshot of effective weights, and passes a [`NodeView`] that
//! answers "may this node serve this request?" and "what is its load?" from the shared
//! slots. Health filters, selection chooses.
//!
//! INTERFACE CONTRACT (implemented in the submodules):
//! - `Selector::build(algorithm, candidates, rng)` builds per-worker tables.
//! - `Selector::set_weights(candidates)` refreshes effective weights without losing
//!   round-robin progress (same slots, same order as built; chash ignores it).
//! - `Selector::pick(rng, view, key_hash)` returns the index into `candidates` of an
//!   eligible node, or `None` when no candidate is eligible.
//!
//! ALGORITHMS (one submodule each, all behind [`Selector`]):
//! - [`WeightedRandom`] (`weighted_random`): a draw with probability ∝ weight, O(1) with
//!   Vose's alias table ([`AliasTable`]).
//! - [`Stride`] (`round_robin`): smooth weighted round robin by stride scheduling,
//!   O(log n), started at a random offset per worker ([`Swrr`], nginx's own, is the
//!   O(n) reference it is tested against).
//! - [`LeastConn`] (`least_conn`): fewest in-flight requests per unit of weight, ties
//!   broken by a weighted random choice.
//! - [`P2cEwma`] (`p2c_ewma`): power of two choices over weighted samples, comparing
//!   `latency * (inflight + 1) / weight`.
//! - [`ChashRing`] (`chash`): a weighted consistent-hash ring (Karger) on a request key
//!   hashed with [`hash_key`].
//! - [`PrefixRing`] (`prefix`): the same ring with bounded loads (Mirrokni et al.) on a
//!   prompt-prefix key (`crate::prefix`), p2c for requests without one.
//!
//! COMMON RULES:
//! - A returned index is always `< len()` and was eligible when the view was asked.
//! - Random algorithms try at most [`MAX_DRAWS`] random draws, then fall back to an O(n)
//!   scan over the eligible candidates with the same (conditional) distribution, so a
//!   pick never loops forever and the bounded retries do not bias it.
//! - Weights are expected finite and > 0; anything else is clamped into the range
//!   [`MIN_WEIGHT`]`..=`[`MAX_WEIGHT`] (NaN becomes `MIN_WEIGHT`) instead of poisoning
//!   the tables.
//! - Nothing here allocates per pick, panics on any input, or uses `unsafe`.

mod alias;
mod chash;
mod least_conn;
mod p2c;
mod prefix;
mod stride;
mod swrr;

pub use alias::{AliasTable, WeightedRandom};
pub use chash::{hash_key, ChashRing};
pub use least_conn::LeastConn;
pub use p2c::P2cEwma;
pub use prefix::{Outcome as PrefixOutcome, PrefixRing, DEFAULT_LOAD_FACTOR, NO_KEY};
pub use stride::Stride;
pub use swrr::Swrr;

use rand::Rng;

/// One node of a tier, as the selector sees it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Candidate {
    /// Stable identity of the node (its shared-memory slot); used by chash to place
    /// ring points so that a node keeps its points when others come and go.
    pub key: u64,
    /// Effective weight, finite and > 0.
    pub weight: f64,
}

/// Live state of candidates, by index into the candidate list.
pub trait NodeView {
    /// False when the node must not be picked for this request (already tried by it,
    /// cooling down, ejected, draining).
    fn eligible(&self, idx: usize) -> bool;
    /// Requests in flight to the node, counted across all workers.
    fn inflight(&self, idx: usize) -> u32;
    /// Current latency estimate (peak EWMA, already decayed), in microseconds, > 0.
    fn latency(&self, idx: usize) -> f64;
    /// Requests known to wait at the node besides our in-flight tries (its scraped
    /// queue, `crate::scrape`); 0 when unknown.
    fn queued(&self, _idx: usize) -> u32 {
        0
    }
    /// The load the cost-driven algorithms (`p2c_ewma`, `least_conn`) compare:
    /// in-flight tries plus the queue [`NodeView::queued`] knows of.
    fn load(&self, idx: usize) -> u32 {
        self.inflight(idx).saturating_add(self.queued(idx))
    }
    /// [`NodeView::latency`] and [`NodeView::load`] together, what `p2c_ewma` compares
    /// (a view may answer both from one look-up of the node).
    fn latency_load(&self, idx: usize) -> (f64, u32) {
        (self.latency(idx), self.load(idx))
    }
    /// [`NodeView::latency_load`] of a node that is [`NodeView::eligible`], `None` for
    /// one that is not: what `p2c_ewma` asks of each candidate (a view may answer both
    /// from one look-up of the node, and its load from the in-flight count that its
    /// eligibility already read).
    fn eligible_latency_load(&self, idx: usize) -> Option<(f64, u32)> {
        if self.eligible(idx) {
            Some(self.latency_load(idx))
        } else {
            None
        }
    }
    /// True when the node is out of service for every request for a while (cooling,
    /// ejected, draining, down), not just for this one: `round_robin` and `least_conn`
    /// then set it aside until their next refresh instead of meeting it on every pick.
    /// Only ever asked of a node that is not [`NodeView::eligible`]; false by default.
    fn out(&self, _idx: usize) -> bool {
        false
    }
    /// True in a pass that leaves the slow nodes out (slow nodes as overflow: their
    /// eligibility is false in it): `weighted_random` and `p2c_ewma` then draw from
    /// tables without the nodes [`Selector::set_slow`] marked. False by default.
    fn slow_left_out(&self) -> bool {
        false
    }
    /// A hint that node `idx` is about to be asked of: a view over shared memory may
    /// start loading it. Does nothing by default.
    fn prefetch(&self, _idx: usize) {}
}

/// The algorithms a pool can use.
///
/// The default is `P2cEwma` (derived with `#[default]`, which clippy's `derivable_impls`
/// asks for; same behaviour as a hand-written `impl Default`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    WeightedRandom,
    RoundRobin,
    LeastConn,
    #[default]
    P2cEwma,
    Chash,
    Prefix,
}

/// Random draws a random algorithm tries before it falls back to an O(n) scan.
pub const MAX_DRAWS: usize = 8;

/// Ring points of a node of maximal weight, as used by callers by default.
pub const DEFAULT_CHASH_POINTS: u32 = 160;

/// Smallest weight a selector works with; smaller, non-positive and NaN weights become it.
pub const MIN_WEIGHT: f64 = 1e-9;

/// Largest weight a selector works with; larger (and infinite) weights become it.
pub const MAX_WEIGHT: f64 = 1e12;

/// A weight clamped into the range [`MIN_WEIGHT`]`..=`[`MAX_WEIGHT`], so that sums,
/// ratios and alias tables stay finite whatever the caller passed.
pub(crate) fn sane_weight(weight: f64) -> f64 {
    if weight.is_nan() {
        MIN_WEIGHT
    } else {
        weight.clamp(MIN_WEIGHT, MAX_WEIGHT)
    }
}

/// `weights` with the slow ones (`slow[i]`) at 0, for the tables of a pass that leaves
/// them out; `None` when none is slow.
pub(crate) fn without_slow(weights: &[f64], slow: &[bool]) -> Option<Vec<f64>> {
    let any = slow.iter().take(weights.len()).any(|&s| s);
    any.then(|| {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| if slow.get(i) == Some(&true) { 0.0 } else { w })
            .collect()
    })
}

/// Sanitised weights of `cands`, in order.
pub(crate) fn weights_of(cands: &[Candidate]) -> Vec<f64> {
    cands.iter().map(|c| sane_weight(c.weight)).collect()
}

/// One O(n) pass of weighted reservoir sampling: an eligible index other than `exclude`,
/// with probability ∝ weight among those, or `None` when there is none.
///
/// This is the fallback of the random algorithms once [`MAX_DRAWS`] draws have failed;
/// it has exactly the distribution the draws were rejection-sampling, so the fallback
/// does not skew proportions.
pub(crate) fn weighted_scan<R: Rng + ?Sized, V: NodeView + ?Sized>(
    rng: &mut R,
    weights: &[f64],
    view: &V,
    exclude: Option<usize>,
) -> Option<usize> {
    let mut chosen = None;
    let mut total = 0.0;
    for (i, &w) in weights.iter().enumerate() {
        if Some(i) == exclude || !view.eligible(i) {
            continue;
        }
        total += w;
        if chosen.is_none() || rng.random::<f64>() * total < w {
            chosen = Some(i);
        }
    }
    chosen
}

/// A view where every node is eligible: what the round robins pre-advance their
/// state with.
pub(crate) struct AllEligible;

impl NodeView for AllEligible {
    fn eligible(&self, _idx: usize) -> bool {
        true
    }
    fn inflight(&self, _idx: usize) -> u32 {
        0
    }
    fn latency(&self, _idx: usize) -> f64 {
        1.0
    }
}

/// Per-worker selection state for one tier of a pool: one variant per [`Algorithm`].
#[derive(Clone, Debug)]
pub enum Selector {
    WeightedRandom(WeightedRandom),
    RoundRobin(Stride),
    LeastConn(LeastConn),
    P2cEwma(P2cEwma),
    Chash(ChashRing),
    Prefix(PrefixRing),
}

impl Selector {
    /// Builds the tables of `alg` for `cands`.
    ///
    /// `chash_points` is the number of ring points of the heaviest node (callers use
    /// [`DEFAULT_CHASH_POINTS`]); other algorithms ignore it. `rng` is used by
    /// `round_robin` only: its state is pre-advanced by a random number of picks `k` in
    /// `[0, n)` so that workers built at the same moment do not all start at the same
    /// node (see [`Stride::new_with_offset`] for exact sequences).
    pub fn build<R: Rng + ?Sized>(
        alg: Algorithm,
        cands: &[Candidate],
        chash_points: u32,
        rng: &mut R,
    ) -> Selector {
        let weights = weights_of(cands);
        match alg {
            Algorithm::WeightedRandom => Selector::WeightedRandom(WeightedRandom::new(&weights)),
            Algorithm::RoundRobin => {
                let k = if weights.is_empty() {
                    0
                } else {
                    rng.random_range(0..weights.len())
                };
                Selector::RoundRobin(Stride::new_with_offset(&weights, k))
            }
            Algorithm::LeastConn => Selector::LeastConn(LeastConn::new(&weights)),
            Algorithm::P2cEwma => Selector::P2cEwma(P2cEwma::new(&weights)),
            Algorithm::Chash => Selector::Chash(ChashRing::new(cands, chash_points)),
            Algorithm::Prefix => Selector::Prefix(PrefixRing::new(cands, chash_points)),
        }
    }

    /// The algorithm this selector implements.
    pub fn algorithm(&self) -> Algorithm {
        match self {
            Selector::WeightedRandom(_) => Algorithm::WeightedRandom,
            Selector::RoundRobin(_) => Algorithm::RoundRobin,
            Selector::LeastConn(_) => Algorithm::LeastConn,
            Selector::P2cEwma(_) => Algorithm::P2cEwma,
            Selector::Chash(_) => Algorithm::Chash,
            Selector::Prefix(_) => Algorithm::Prefix,
        }
    }

    /// Refreshes effective weights (same candidates, same order as built).
    ///
    /// Round robin keeps its progress (the `current` values); the alias tables are
    /// rebuilt in O(n); chash ignores new weights so that affinity stays stable.
    pub fn set_weights(&mut self, cands: &[Candidate]) {
        match self {
            Selector::WeightedRandom(s) => s.set_weights(&weights_of(cands)),
            Selector::RoundRobin(s) => s.set_weights(&weights_of(cands)),
            Selector::LeastConn(s) => s.set_weights(&weights_of(cands)),
            Selector::P2cEwma(s) => s.set_weights(&weights_of(cands)),
            Selector::Chash(s) => s.set_weights(cands),
            Selector::Prefix(s) => s.set_weights(cands),
        }
    }

    /// Marks the slow nodes (`slow[i]`, by candidate index) for the passes that leave
    /// them out ([`NodeView::slow_left_out`]): `weighted_random` and `p2c_ewma` keep
    /// tables without them, so that such a pass draws once per candidate however much
    /// weight the slow nodes hold. The other algorithms ignore it (they meet a slow node
    /// as an ineligible one). [`set_weights`](Self::set_weights) clears it.
    pub fn set_slow(&mut self, slow: &[bool]) {
        match self {
            Selector::WeightedRandom(s) => s.set_slow(slow),
            Selector::P2cEwma(s) => s.set_slow(slow),
            _ => {}
        }
    }

    /// Sets `prefix.load_factor` (other algorithms ignore it).
    pub fn with_load_factor(self, c: f64) -> Selector {
        match self {
            Selector::Prefix(s) => Selector::Prefix(s.with_load_factor(c)),
            other => other,
        }
    }

    /// What the last pick of a prefix selector did with its key (`None` for others).
    pub fn prefix_outcome(&self) -> PrefixOutcome {
        match self {
            Selector::Prefix(s) => s.outcome(),
            _ => PrefixOutcome::None,
        }
    }

    /// A candidate the last pick found eligible besides the one it chose (`p2c_ewma`'s
    /// other draw), `None` when it knows of none: what the retry check's "some
    /// untried node is free" can take as its answer without a scan.
    pub fn other_eligible(&self) -> Option<usize> {
        match self {
            Selector::P2cEwma(s) => s.other(),
            _ => None,
        }
    }

    /// Index into the candidate list of an eligible node, or `None` when none is
    /// eligible. `key_hash` (see [`hash_key`]) is used by chash and prefix only
    /// (prefix: [`NO_KEY`] for a request without a key). Inlined into the pick
    /// (`crate::balancer`), so that the view it asks stays in the pick's registers
    /// and frame: a call cost about 30 instructions a pick.
    #[inline(always)]
    pub fn pick<R: Rng + ?Sized, V: NodeView + ?Sized>(
        &mut self,
        rng: &mut R,
        view: &V,
        key_hash: u64,
    ) -> Option<usize> {
        match self {
            Selector::WeightedRandom(s) => s.pick(rng, view),
            Selector::RoundRobin(s) => s.pick(view),
            Selector::LeastConn(s) => s.pick(rng, view),
            Selector::P2cEwma(s) => s.pick_noting(rng, view),
            Selector::Chash(s) => s.pick(view, key_hash),
            Selector::Prefix(s) => s.pick(rng, view, key_hash),
        }
    }

    /// Number of candidates.
    pub fn len(&self) -> usize {
        match self {
            Selector::WeightedRandom(s) => s.len(),
            Selector::RoundRobin(s) => s.len(),
            Selector::LeastConn(s) => s.len(),
            Selector::P2cEwma(s) => s.len(),
            Selector::Chash(s) => s.len(),
            Selector::Prefix(s) => s.len(),
        }
    }

    /// True when built from no candidates (every pick is then `None`).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Helpers shared by the tests of the submodules.
#[cfg(test)]
pub(crate) mod testutil {
    use super::{Candidate, NodeView};

    /// A plain in-memory [`NodeView`].
    #[derive(Clone, Debug)]
    pub struct TestView {
        pub eligible: Vec<bool>,
        pub inflight: Vec<u32>,
        pub latency: Vec<f64>,
        /// Scraped queues (`NodeView::queued`).
        pub queued: Vec<u32>,
    }

    impl TestView {
        /// `n` idle, eligible nodes with equal latency.
        pub fn idle(n: usize) -> Self {
            TestView {
                eligible: vec![true; n],
                inflight: vec![0; n],
                latency: vec![1000.0; n],
                queued: vec![0; n],
            }
        }
    }

    impl NodeView for TestView {
        fn eligible(&self, idx: usize) -> bool {
            self.eligible[idx]
        }
        fn inflight(&self, idx: usize) -> u32 {
            self.inflight[idx]
        }
        fn latency(&self, idx: usize) -> f64 {
            self.latency[idx]
        }
        fn queued(&self, idx: usize) -> u32 {
            self.queued[idx]
        }
    }

    /// A pass over a [`TestView`] that leaves out the nodes marked slow
    /// ([`NodeView::slow_left_out`]), counting the eligibility questions asked.
    pub struct SlowView<'a> {
        pub view: &'a TestView,
        pub slow: &'a [bool],
        pub asked: std::cell::Cell<u64>,
    }

    impl NodeView for SlowView<'_> {
        fn eligible(&self, i: usize) -> bool {
            self.asked.set(self.asked.get() + 1);
            !self.slow[i] && self.view.eligible(i)
        }
        fn inflight(&self, i: usize) -> u32 {
            self.view.inflight(i)
        }
        fn latency(&self, i: usize) -> f64 {
            self.view.latency(i)
        }
        fn slow_left_out(&self) -> bool {
            true
        }
    }

    /// `picks` picks by `pick` over idle nodes in a pass that leaves out those marked in
    /// `slow`: how often each node was chosen, and the eligibility questions asked.
    pub fn slow_pass<const N: usize>(
        slow: &[bool; N],
        picks: u64,
        seed: u64,
        mut pick: impl FnMut(&mut rand::rngs::SmallRng, &SlowView) -> usize,
    ) -> ([u64; N], u64) {
        use rand::SeedableRng;
        let all = TestView::idle(N);
        let view = SlowView {
            view: &all,
            slow,
            asked: std::cell::Cell::new(0),
        };
        let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
        let mut counts = [0u64; N];
        for _ in 0..picks {
            counts[pick(&mut rng, &view)] += 1;
        }
        (counts, view.asked.get())
    }

    /// A [`TestView`] whose nodes marked in `.1` are out of service
    /// ([`NodeView::out`]).
    pub struct OutView<'a>(pub &'a TestView, pub &'a [bool]);

    impl NodeView for OutView<'_> {
        fn eligible(&self, i: usize) -> bool {
            self.0.eligible(i)
        }
        fn inflight(&self, i: usize) -> u32 {
            self.0.inflight(i)
        }
        fn latency(&self, i: usize) -> f64 {
            self.0.latency(i)
        }
        fn out(&self, i: usize) -> bool {
            self.1[i]
        }
    }

    /// Candidates with keys 0.. and the given weights.
    pub fn cands(weights: &[f64]) -> Vec<Candidate> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| Candidate {
                key: i as u64,
                weight,
            })
            .collect()
    }

    /// Pearson's chi-square statistic of observed counts against weights.
    pub fn chi_square(counts: &[u64], weights: &[f64]) -> f64 {
        let n: u64 = counts.iter().sum();
        let total: f64 = weights.iter().sum();
        counts
            .iter()
            .zip(weights)
            .map(|(&c, &w)| {
                let expected = n as f64 * w / total;
                (c as f64 - expected).powi(2) / expected
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::{cands, TestView};
    use super::*;
    use rand::rngs::SmallRng;
    use rand::SeedableRng;

    const ALL: [Algorithm; 6] = [
        Algorithm::WeightedRandom,
        Algorithm::RoundRobin,
        Algorithm::LeastConn,
        Algorithm::P2cEwma,
        Algorithm::Chash,
        Algorithm::Prefix,
    ];

    #[test]
    fn eligibility_is_always_respected() {
        let mut rng = SmallRng::seed_from_u64(1);
        for alg in ALL {
            for n in [1usize, 2, 3, 7, 50] {
                let weights: Vec<f64> = (0..n).map(|i| 1.0 + (i % 5) as f64 * 10.0).collect();
                let cs = cands(&weights);
                let mut sel = Selector::build(alg, &cs, DEFAULT_CHASH_POINTS, &mut rng);
                assert_eq!(sel.len(), n);
                let mut view = TestView::idle(n);
                for round in 0..200 {
                    // Random masks, biased towards few eligible nodes.
                    let density = [0.0, 0.05, 0.3, 0.9][round % 4];
                    for i in 0..n {
                        view.eligible[i] = rng.random::<f64>() < density;
                        view.inflight[i] = rng.random_range(0..4);
                        view.latency[i] = rng.random_range(100.0..5000.0);
                    }
                    let eligible: Vec<usize> = (0..n).filter(|&i| view.eligible[i]).collect();
                    for _ in 0..20 {
                        let got = {
                            let key = rng.random();
                            sel.pick(&mut rng, &view, key)
                        };
                        match eligible.len() {
                            0 => assert_eq!(got, None, "{alg:?} n={n}"),
                            1 => assert_eq!(got, Some(eligible[0]), "{alg:?} n={n}"),
                            _ => {
                                let i = got.expect("some node is eligible");
                                assert!(view.eligible[i], "{alg:?} n={n} picked ineligible {i}");
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn default_algorithm_is_p2c_ewma() {
        assert_eq!(Algorithm::default(), Algorithm::P2cEwma);
    }

    #[test]
    fn empty_selector_picks_none() {
        let mut rng = SmallRng::seed_from_u64(2);
        for alg in ALL {
            let mut sel = Selector::build(alg, &[], DEFAULT_CHASH_POINTS, &mut rng);
            assert!(sel.is_empty());
            assert_eq!(sel.algorithm(), alg);
            assert_eq!(sel.pick(&mut rng, &TestView::idle(0), 42), None);
            sel.set_weights(&[]);
            assert_eq!(sel.pick(&mut rng, &TestView::idle(0), 42), None);
        }
    }

    #[test]
    fn bad_weights_are_clamped_not_fatal() {
        let mut rng = SmallRng::seed_from_u64(3);
        let weird = [f64::NAN, -1.0, 0.0, f64::INFINITY, 1e300, 5e-324];
        for alg in ALL {
            let cs = cands(&weird);
            let mut sel = Selector::build(alg, &cs, DEFAULT_CHASH_POINTS, &mut rng);
            let view = TestView::idle(weird.len());
            for _ in 0..1000 {
                let i = {
                    let key = rng.random();
                    sel.pick(&mut rng, &view, key)
                }
                .expect("all eligible");
                assert!(i < weird.len());
            }
            sel.set_weights(&cs);
            assert!(sel.pick(&mut rng, &view, 7).is_some());
        }
    }

    #[test]
    fn set_weights_with_another_length_stays_in_bounds() {
        // A contract violation, but it must not make a pick index out of range.
        let mut rng = SmallRng::seed_from_u64(4);
        for alg in ALL {
            let mut sel = Selector::build(alg, &cands(&[1.0; 5]), 16, &mut rng);
            sel.set_weights(&cands(&[1.0; 3]));
            assert_eq!(sel.len(), 3);
            let view = TestView::idle(3);
            for _ in 0..500 {
                assert!(
                    {
                        let key = rng.random();
                        sel.pick(&mut rng, &view, key)
                    }
                    .unwrap()
                        < 3
                );
            }
        }
    }
}
