//! Prefix affinity with a load guard: consistent hashing with bounded loads (Mirrokni,
//! Thorup and Zadimoghaddam, "Consistent Hashing with Bounded Loads", SODA 2018), on
//! the same weighted ring as `chash` ([`ChashRing`]), keyed by the request's prompt
//! prefix (`crate::prefix`), with power of two choices ([`P2cEwma`]) for requests
//! that have no key.
//!
//! A key's *home* is the owner of the first ring point at or after the key's hash. The
//! walk goes clockwise from there over distinct nodes and takes the first that is
//! eligible (not tried by this request, not cooling, ejected, down, draining or at its
//! learned limit: the view says) and under its load bound:
//!
//! ```text
//! inflight_i < ceil(c * (T + 1) * w_i / W)
//! ```
//!
//! where `T` is the tier's requests in flight (all workers, before this one), `w_i` the
//! node's configured weight, `W` the tier's total and `c` the pool's
//! `prefix.load_factor` (1.25 by default). With equal weights this is the paper's
//! `ceil(c * (m + 1) / n)`: no node carries more than `c` times the mean load plus one,
//! and since the bounds add up to at least `c * (T + 1) > T`, some node is always under
//! its bound. A node over it *passes the key on* to the next node of the ring, so a hot
//! conversation (or a flood of requests with one prefix) spills to the same few next
//! nodes from every worker, whose caches warm in turn, instead of piling up on one
//! engine while the others idle (prime-rl PR#3255). When every eligible node is over
//! its bound (nodes taken out of service leave their share of `W` unusable), the
//! eligible node with the least in flight per unit of weight takes it.
//!
//! Why: an inference engine with a prefix cache (vLLM's automatic prefix caching,
//! SGLang's radix cache) answers a prompt whose leading blocks it has computed before
//! without recomputing them: sending every turn of a conversation to one node saves
//! most of its prompt processing. Plain consistent hashing gives that affinity but
//! lets one popular key overload its node; pure load balancing spreads a
//! conversation's turns over every node's cache.
//!
//! One ring for all workers: every worker builds the ring from the shared topology
//! (node ids and configured weights, rebuilt when the generation changes), so the
//! rings are identical and a key has the same home and the same spill order in every
//! nginx worker; the loads the bound compares are the shared in-flight counts.
//!
//! Cost per pick with a key: one O(n) sum of the tier's in-flight counts (n relaxed
//! loads; LLM pools have a handful to a few dozen nodes), a binary search, and a walk
//! that asks each distinct node once (usually the home only). Without a key: p2c, O(1).
//! Nothing allocates: the marks of visited nodes are an epoch-stamped array.
//!
//! Each pick records what happened ([`Outcome`]) for the pool's counters.

use super::{sane_weight, Candidate, ChashRing, NodeView, P2cEwma};
use rand::Rng;

/// The `key_hash` that means "this request has no key": picked by load alone.
/// (`crate::balancer` maps a real key whose hash is 0 to 1.)
pub const NO_KEY: u64 = 0;

/// Default of `prefix.load_factor`.
pub const DEFAULT_LOAD_FACTOR: f64 = 1.25;

/// What the last pick did with its key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Outcome {
    /// No pick made yet, or it found no node.
    #[default]
    None,
    /// The key's home node took it.
    Hit,
    /// The load guard passed it on (some node before the one that took it was over its
    /// bound), or every eligible node was over its bound.
    Spill,
    /// Another node took it only because the nodes before were not eligible (a retry
    /// after the home failed, the home cooling or ejected).
    Moved,
    /// The request had no key: picked by load.
    NoKey,
}

/// Prefix affinity on a ring with bounded loads, per tier.
#[derive(Clone, Debug)]
pub struct PrefixRing {
    ring: ChashRing,
    p2c: P2cEwma,
    /// Configured weight share `w_i / W` of each candidate.
    share: Vec<f64>,
    load_factor: f64,
    /// `seen[i] == epoch`: node `i` was visited by the current walk.
    seen: Vec<u32>,
    epoch: u32,
    outcome: Outcome,
}

impl PrefixRing {
    /// Builds the ring (`points` for the heaviest node, as `chash`) and p2c tables.
    pub fn new(cands: &[Candidate], points: u32) -> Self {
        let weights: Vec<f64> = cands.iter().map(|c| sane_weight(c.weight)).collect();
        let total: f64 = weights.iter().sum();
        PrefixRing {
            ring: ChashRing::new(cands, points),
            p2c: P2cEwma::new(&weights),
            share: weights.iter().map(|w| w / total).collect(),
            load_factor: DEFAULT_LOAD_FACTOR,
            seen: vec![0; cands.len()],
            epoch: 0,
            outcome: Outcome::None,
        }
    }

    /// Sets `c` of the load bound (finite, at least 1; anything else becomes the default).
    pub fn with_load_factor(mut self, c: f64) -> Self {
        self.load_factor = if c.is_finite() && c >= 1.0 {
            c
        } else {
            DEFAULT_LOAD_FACTOR
        };
        self
    }

    /// Affinity stays on the build-time weights (as `chash`); p2c for keyless requests
    /// follows the effective ones. A list of another length rebuilds everything.
    pub fn set_weights(&mut self, cands: &[Candidate]) {
        if cands.len() != self.share.len() {
            *self = PrefixRing::new(cands, self.ring.points()).with_load_factor(self.load_factor);
            return;
        }
        self.p2c.set_weights(&super::weights_of(cands));
    }

    /// Number of candidates.
    pub fn len(&self) -> usize {
        self.share.len()
    }

    /// True when there are no candidates.
    pub fn is_empty(&self) -> bool {
        self.share.is_empty()
    }

    /// What the last [`pick`](Self::pick) did.
    pub fn outcome(&self) -> Outcome {
        self.outcome
    }

    /// The node for a request whose key hashes to `key_hash` ([`NO_KEY`]: by load).
    pub fn pick<R: Rng + ?Sized, V: NodeView + ?Sized>(
        &mut self,
        rng: &mut R,
        view: &V,
        key_hash: u64,
    ) -> Option<usize> {
        if key_hash == NO_KEY {
            let got = self.p2c.pick(rng, view);
            self.outcome = if got.is_some() {
                Outcome::NoKey
            } else {
                Outcome::None
            };
            return got;
        }
        let (got, outcome) = self.walk(view, key_hash);
        self.outcome = outcome;
        got
    }

    fn walk<V: NodeView + ?Sized>(&mut self, view: &V, key_hash: u64) -> (Option<usize>, Outcome) {
        let n = self.share.len();
        let total: u64 = (0..n).map(|i| u64::from(view.inflight(i))).sum();
        let room = self.load_factor * (total + 1) as f64;
        self.epoch = self.epoch.wrapping_add(1);
        if self.epoch == 0 {
            self.seen.fill(0);
            self.epoch = 1;
        }
        let (mut visited, mut guarded) = (0, false);
        // Fallback: the eligible node with the least in flight per unit of weight.
        let mut best: Option<(f64, usize)> = None;
        for i in self.ring.clockwise(key_hash) {
            if self.seen[i] == self.epoch {
                continue;
            }
            self.seen[i] = self.epoch;
            visited += 1;
            if view.eligible(i) {
                let inflight = view.inflight(i);
                if f64::from(inflight) < (room * self.share[i]).ceil() {
                    let outcome = match (visited, guarded) {
                        (1, _) => Outcome::Hit,
                        (_, true) => Outcome::Spill,
                        _ => Outcome::Moved,
                    };
                    return (Some(i), outcome);
                }
                guarded = true;
                let relative = f64::from(inflight + 1) / self.share[i];
                if best.is_none_or(|(b, _)| relative < b) {
                    best = Some((relative, i));
                }
            }
            if visited == n {
                break;
            }
        }
        match best {
            Some((_, i)) => (Some(i), Outcome::Spill),
            None => (None, Outcome::None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{cands, TestView};
    use super::*;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    fn ring(n: usize) -> PrefixRing {
        PrefixRing::new(&cands(&vec![1.0; n]), 160)
    }

    /// Distinct nodes of the ring clockwise from `h`.
    fn order(r: &PrefixRing, h: u64) -> Vec<usize> {
        let mut out = Vec::new();
        for i in r.ring.clockwise(h) {
            if !out.contains(&i) {
                out.push(i);
            }
        }
        out
    }

    #[test]
    fn idle_pool_sends_a_key_home_like_chash() {
        let mut rng = SmallRng::seed_from_u64(1);
        let cs = cands(&[1.0; 5]);
        let (mut p, mut c) = (PrefixRing::new(&cs, 160), ChashRing::new(&cs, 160));
        let view = TestView::idle(5);
        for _ in 0..2000 {
            let h = rng.random::<u64>() | 1;
            assert_eq!(p.pick(&mut rng, &view, h), c.pick(&view, h));
            assert_eq!(p.outcome(), Outcome::Hit);
        }
    }

    #[test]
    fn bound_is_c_times_mean_plus_one() {
        // 4 equal nodes, 20 in flight elsewhere: bound ceil(1.25 * 21 / 4) = 7.
        let mut rng = SmallRng::seed_from_u64(2);
        let mut p = ring(4);
        let h = 0x1234_5678_9abc_def1;
        let o = order(&p, h);
        let mut view = TestView::idle(4);
        view.inflight[o[0]] = 6;
        view.inflight[o[1]] = 7;
        view.inflight[o[2]] = 4;
        view.inflight[o[3]] = 3;
        assert_eq!(p.pick(&mut rng, &view, h), Some(o[0]));
        assert_eq!(p.outcome(), Outcome::Hit);
        // Home at its bound: passed on; the next is at its bound too: on again.
        view.inflight[o[0]] = 7;
        view.inflight[o[2]] = 3;
        assert_eq!(p.pick(&mut rng, &view, h), Some(o[2]));
        assert_eq!(p.outcome(), Outcome::Spill);
    }

    #[test]
    fn a_hot_key_never_piles_up_on_its_home() {
        // One key, requests arriving while none finishes: every node's load stays
        // within ceil(c * (T + 1) / n), and they fill in ring order.
        let mut rng = SmallRng::seed_from_u64(3);
        for c in [1.0, 1.25, 2.0] {
            let mut p = ring(6).with_load_factor(c);
            let h = 0xfeed_beef_0000_0001;
            let mut view = TestView::idle(6);
            for t in 0..300u32 {
                let i = p.pick(&mut rng, &view, h).unwrap();
                view.inflight[i] += 1;
                let bound = (c * f64::from(t + 1) / 6.0).ceil() as u32;
                assert!(
                    view.inflight.iter().all(|&x| x <= bound),
                    "c={c} t={t} {:?}",
                    view.inflight
                );
            }
            let o = order(&p, h);
            assert!(view.inflight[o[0]] >= view.inflight[o[5]]);
        }
    }

    #[test]
    fn ineligible_nodes_move_the_key_without_counting_a_spill() {
        let mut rng = SmallRng::seed_from_u64(4);
        let mut p = ring(5);
        let h = 77;
        let o = order(&p, h);
        let mut view = TestView::idle(5);
        view.eligible[o[0]] = false;
        assert_eq!(p.pick(&mut rng, &view, h), Some(o[1]));
        assert_eq!(p.outcome(), Outcome::Moved);
        view.eligible = vec![false; 5];
        assert_eq!(p.pick(&mut rng, &view, h), None);
        assert_eq!(p.outcome(), Outcome::None);
    }

    #[test]
    fn all_over_their_bound_takes_the_least_loaded_eligible() {
        // Two of four nodes out of service, their share of W unusable: the two left
        // carry everything and are both over their bounds.
        let mut rng = SmallRng::seed_from_u64(5);
        let mut p = ring(4);
        let h = 99;
        let o = order(&p, h);
        let mut view = TestView::idle(4);
        view.eligible[o[2]] = false;
        view.eligible[o[3]] = false;
        view.inflight[o[0]] = 9;
        view.inflight[o[1]] = 8;
        assert_eq!(p.pick(&mut rng, &view, h), Some(o[1]));
        assert_eq!(p.outcome(), Outcome::Spill);
    }

    #[test]
    fn weights_scale_the_bound() {
        // Weights 3:1, 8 in flight: bounds ceil(1.25 * 9 * 3/4) = 9 and ceil(2.8) = 3.
        let mut rng = SmallRng::seed_from_u64(6);
        let mut p = PrefixRing::new(&cands(&[3.0, 1.0]), 160);
        let mut view = TestView::idle(2);
        let h = (0..1000)
            .map(|_| rng.random::<u64>() | 1)
            .find(|&h| order(&p, h)[0] == 1)
            .unwrap();
        view.inflight = vec![6, 2];
        assert_eq!(p.pick(&mut rng, &view, h), Some(1));
        view.inflight = vec![5, 3];
        assert_eq!(p.pick(&mut rng, &view, h), Some(0));
        assert_eq!(p.outcome(), Outcome::Spill);
    }

    #[test]
    fn no_key_is_balanced_by_load() {
        let mut rng = SmallRng::seed_from_u64(7);
        let mut p = ring(4);
        let mut view = TestView::idle(4);
        view.inflight = vec![50, 50, 50, 0];
        let mut counts = [0u32; 4];
        for _ in 0..1000 {
            counts[p.pick(&mut rng, &view, NO_KEY).unwrap()] += 1;
            assert_eq!(p.outcome(), Outcome::NoKey);
        }
        // p2c: the idle node wins every comparison it is drawn into (7/16 of draws).
        assert!(counts[3] > 350, "{counts:?}");
    }

    #[test]
    fn bad_load_factor_becomes_the_default_and_epochs_wrap() {
        let mut p = ring(3).with_load_factor(f64::NAN);
        assert_eq!(p.load_factor, DEFAULT_LOAD_FACTOR);
        p = p.with_load_factor(0.5);
        assert_eq!(p.load_factor, DEFAULT_LOAD_FACTOR);
        let mut rng = SmallRng::seed_from_u64(8);
        p.epoch = u32::MAX - 1;
        let view = TestView::idle(3);
        for _ in 0..4 {
            assert!(p.pick(&mut rng, &view, 5).is_some());
        }
        assert!(p.epoch >= 1 && p.epoch < 10);
    }
}
