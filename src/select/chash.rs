//! Weighted consistent hashing on a ring (Karger et al., "Consistent hashing and random
//! trees", STOC 1997), as nginx's `hash ... consistent` and ketama.
//!
//! Every node places points on a 64-bit ring; a request key hashes to a position, and
//! the first point at or after it (clockwise, wrapping) names the node. Node `i` gets
//! `max(1, round(points * weight_i / max_weight))` points, and a point's position depends
//! only on the node's stable key ([`Candidate::key`]) and the point's number, so when a
//! node leaves only the keys it owned move (to their next node clockwise), and when it
//! comes back they return. Lookup is a binary search, O(log points).
//!
//! Ineligible nodes are skipped by walking on clockwise to the first eligible node, so a
//! request retried after a failure lands on the same "next" node from every worker. The
//! walk asks the view directly for a few points, then snapshots eligibility once (O(n))
//! and continues over the snapshot: bounded by the number of points, and `None` as soon
//! as the snapshot shows no eligible node.
//!
//! Why: request affinity (caches, sessions) with minimal remapping when the pool
//! changes. Weights are taken at build time only: `set_weights` does not move points, so
//! affinity stays stable while effective weights fluctuate. Note that point counts are
//! relative to the heaviest node, so removing or reweighting the heaviest node rescales
//! the others' points.
//!
//! Request keys are hashed with [`hash_key`]: FNV-1a 64 followed by splitmix64's
//! finalizer, deterministic across processes, runs and platforms.

use super::{sane_weight, Candidate, NodeView};

/// Ring points looked up through the view directly before eligibility is snapshotted.
const DIRECT_STEPS: usize = 16;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// splitmix64's finalizer: a bijective mixer with full avalanche.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// 64-bit hash of a chash request key: FNV-1a 64, then splitmix64's finalizer (FNV alone
/// mixes its last bytes poorly into the high bits). Deterministic across processes and
/// runs: never change it, or every key remaps.
pub fn hash_key(key: &[u8]) -> u64 {
    let fnv = key
        .iter()
        .fold(FNV_OFFSET, |h, &b| (h ^ u64::from(b)).wrapping_mul(FNV_PRIME));
    mix64(fnv)
}

/// Ring position of point number `point` of the node whose key is `node_key`.
fn point_hash(node_key: u64, point: u32) -> u64 {
    let mut bytes = [0u8; 12];
    bytes[..8].copy_from_slice(&node_key.to_le_bytes());
    bytes[8..].copy_from_slice(&point.to_le_bytes());
    hash_key(&bytes)
}

/// Candidate indices of the points in `nodes` (parallel to the sorted `hashes`),
/// clockwise from the first point at or after `key_hash`, wrapping, once around.
fn clockwise<'a>(hashes: &[u64], nodes: &'a [u32], key_hash: u64) -> impl Iterator<Item = usize> + 'a {
    let start = hashes.partition_point(|&h| h < key_hash);
    let (before, after) = nodes.split_at(start);
    after.iter().chain(before).map(|&i| i as usize)
}

/// A weighted consistent-hash ring over the candidates.
#[derive(Clone, Debug)]
pub struct ChashRing {
    /// Point positions, sorted ascending.
    hashes: Vec<u64>,
    /// Candidate index of each point, parallel to `hashes`.
    nodes: Vec<u32>,
    /// Number of candidates.
    len: usize,
    /// Points of the heaviest node, kept to rebuild on a length change.
    points: u32,
    /// Eligibility snapshot for long walks (reused, no allocation per pick).
    scratch: Vec<bool>,
}

impl ChashRing {
    /// Builds the ring: O(P log P) for P points in total.
    pub fn new(cands: &[Candidate], points: u32) -> Self {
        let weights: Vec<f64> = cands.iter().map(|c| sane_weight(c.weight)).collect();
        let max_weight = weights.iter().copied().fold(0.0, f64::max);
        // (position, node key, index): sorting by key on equal positions makes the ring
        // independent of the candidates' order even on a hash collision.
        let mut ring: Vec<(u64, u64, u32)> = Vec::new();
        for (i, (c, w)) in cands.iter().zip(&weights).enumerate() {
            let count = (f64::from(points) * w / max_weight).round().max(1.0) as u32;
            ring.extend((0..count).map(|p| (point_hash(c.key, p), c.key, i as u32)));
        }
        ring.sort_unstable();
        ChashRing {
            hashes: ring.iter().map(|p| p.0).collect(),
            nodes: ring.iter().map(|p| p.2).collect(),
            len: cands.len(),
            points,
            scratch: vec![false; cands.len()],
        }
    }

    /// Ignored, so that affinity stays stable: points are placed from the weights given
    /// at build time. Only a list of another length (a contract violation) rebuilds the
    /// ring, to keep picks in bounds.
    pub fn set_weights(&mut self, cands: &[Candidate]) {
        if cands.len() != self.len {
            *self = ChashRing::new(cands, self.points);
        }
    }

    /// Number of candidates.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when there are no candidates.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Points of the heaviest node, as built.
    pub(super) fn points(&self) -> u32 {
        self.points
    }

    /// Total number of points on the ring.
    pub fn point_count(&self) -> usize {
        self.hashes.len()
    }

    /// Candidate indices of the ring's points clockwise from `key_hash` (the first point
    /// at or after it, wrapping), once around: a node appears once per point it owns.
    pub(super) fn clockwise(&self, key_hash: u64) -> impl Iterator<Item = usize> + '_ {
        clockwise(&self.hashes, &self.nodes, key_hash)
    }

    /// The node of the first point at or after `key_hash` (wrapping), walking on
    /// clockwise past ineligible nodes; `None` when none is eligible.
    pub fn pick<V: NodeView + ?Sized>(&mut self, view: &V, key_hash: u64) -> Option<usize> {
        let mut clockwise = clockwise(&self.hashes, &self.nodes, key_hash);
        // Usual case: the owner or one of the next few points is eligible.
        for i in clockwise.by_ref().take(DIRECT_STEPS) {
            if view.eligible(i) {
                return Some(i);
            }
        }
        // Long walk: ask the view once per node, not once per point.
        let mut any = false;
        for (i, e) in self.scratch.iter_mut().enumerate() {
            *e = view.eligible(i);
            any |= *e;
        }
        if !any {
            return None;
        }
        clockwise.find(|&i| self.scratch[i])
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::TestView;
    use super::*;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    fn ring_of(keys: &[u64], weights: &[f64], points: u32) -> (Vec<Candidate>, ChashRing) {
        let cands: Vec<Candidate> = keys
            .iter()
            .zip(weights)
            .map(|(&key, &weight)| Candidate { key, weight })
            .collect();
        let ring = ChashRing::new(&cands, points);
        (cands, ring)
    }

    #[test]
    fn hash_key_is_pinned() {
        // These values must never change: they decide where every key lands.
        assert_eq!(hash_key(b""), mix64(FNV_OFFSET));
        assert_eq!(hash_key(b"a"), mix64(0xaf63_dc4c_8601_ec8c));
        assert_eq!(hash_key(b"/index.html"), 0xf6ad_651c_57d6_4427);
        assert_ne!(hash_key(b"user:1"), hash_key(b"user:2"));
    }

    #[test]
    fn chash_point_counts_follow_weights() {
        let (_, ring) = ring_of(&[1, 2, 3], &[10.0, 5.0, 0.01], 160);
        let mut counts = [0; 3];
        for &n in &ring.nodes {
            counts[n as usize] += 1;
        }
        assert_eq!(counts, [160, 80, 1]);
        assert!(ring.hashes.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn chash_same_key_same_node() {
        let mut rng = SmallRng::seed_from_u64(41);
        let keys: Vec<u64> = (100..110).collect();
        let (cands, mut ring) = ring_of(&keys, &[1.0; 10], 160);
        let view = TestView::idle(10);
        // Candidates given in another order: same node (by key) for every request key.
        let mut reversed = cands.clone();
        reversed.reverse();
        let mut ring_rev = ChashRing::new(&reversed, 160);
        for _ in 0..10_000 {
            let h: u64 = rng.random();
            let a = ring.pick(&view, h).unwrap();
            assert_eq!(ring.pick(&view, h), Some(a));
            let b = ring_rev.pick(&view, h).unwrap();
            assert_eq!(cands[a].key, reversed[b].key);
        }
    }

    #[test]
    fn chash_removing_one_of_ten_moves_only_its_keys() {
        let mut rng = SmallRng::seed_from_u64(42);
        let keys: Vec<u64> = (100..110).collect();
        let (cands, mut full) = ring_of(&keys, &[1.0; 10], 160);
        let removed = 4;
        let kept: Vec<Candidate> = cands
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != removed)
            .map(|(_, &c)| c)
            .collect();
        let mut smaller = ChashRing::new(&kept, 160);
        let (view10, view9) = (TestView::idle(10), TestView::idle(9));
        let trials = 100_000;
        let mut moved = 0;
        for _ in 0..trials {
            let h: u64 = rng.random();
            let before = cands[full.pick(&view10, h).unwrap()].key;
            let after = kept[smaller.pick(&view9, h).unwrap()].key;
            if before == cands[removed].key {
                moved += 1;
            } else {
                // Exact: every key that was not on the removed node stays where it was.
                assert_eq!(before, after, "key hash {h:#x} moved");
            }
        }
        // Roughly its 10% share.
        let share = moved as f64 / trials as f64;
        assert!((0.07..0.13).contains(&share), "share {share}");
    }

    #[test]
    fn chash_respects_weights() {
        let mut rng = SmallRng::seed_from_u64(43);
        let weights = [1.0, 2.0, 3.0, 4.0];
        // 1000 points for the heaviest node, 250 for the lightest: the ring's own
        // placement noise (~1/sqrt(points)) stays well inside the tolerance.
        let (_, mut ring) = ring_of(&[7, 8, 9, 10], &weights, 1000);
        let view = TestView::idle(4);
        let trials = 200_000;
        let mut counts = [0u32; 4];
        for _ in 0..trials {
            counts[ring.pick(&view, rng.random()).unwrap()] += 1;
        }
        for (c, w) in counts.iter().zip(&weights) {
            let share = f64::from(*c) / f64::from(trials);
            let want = w / 10.0;
            assert!((share - want).abs() < 0.15 * want, "{counts:?}");
        }
    }

    #[test]
    fn chash_skips_ineligible_to_the_next_node_on_the_ring() {
        let mut rng = SmallRng::seed_from_u64(44);
        let keys: Vec<u64> = (100..110).collect();
        let (_, mut ring) = ring_of(&keys, &[1.0; 10], 160);
        let mut view = TestView::idle(10);
        for _ in 0..2000 {
            let h: u64 = rng.random();
            let owner = ring.pick(&view, h).unwrap();
            // The expected successor: the first point after h of another node.
            let start = ring.hashes.partition_point(|&x| x < h);
            let successor = (0..ring.point_count())
                .map(|s| ring.nodes[(start + s) % ring.point_count()] as usize)
                .find(|&i| i != owner)
                .unwrap();
            view.eligible[owner] = false;
            assert_eq!(ring.pick(&view, h), Some(successor));
            view.eligible[owner] = true;
        }
    }

    #[test]
    fn chash_long_walk_and_none() {
        // Only one node of 50 eligible: the walk passes the direct steps and uses the
        // snapshot; with none eligible the answer is None.
        let mut rng = SmallRng::seed_from_u64(45);
        let keys: Vec<u64> = (0..50).collect();
        let (_, mut ring) = ring_of(&keys, &[1.0; 50], 160);
        let mut view = TestView::idle(50);
        view.eligible = vec![false; 50];
        view.eligible[17] = true;
        for _ in 0..1000 {
            assert_eq!(ring.pick(&view, rng.random()), Some(17));
        }
        view.eligible[17] = false;
        assert_eq!(ring.pick(&view, rng.random()), None);
    }

    #[test]
    fn chash_wraps_around_and_ignores_set_weights() {
        let (cands, mut ring) = ring_of(&[1, 2, 3], &[1.0, 1.0, 1.0], 8);
        let view = TestView::idle(3);
        let last = *ring.hashes.last().unwrap();
        let first_node = Some(ring.nodes[0] as usize);
        // Past the last point: back to the first one.
        if last < u64::MAX {
            assert_eq!(ring.pick(&view, last + 1), first_node);
            assert_eq!(ring.pick(&view, u64::MAX), first_node);
        }
        assert_eq!(
            ring.pick(&view, last),
            Some(ring.nodes[ring.nodes.len() - 1] as usize)
        );
        assert_eq!(ring.pick(&view, 0), first_node);
        let before = ring.hashes.clone();
        let mut heavier = cands.clone();
        heavier[0].weight = 100.0;
        ring.set_weights(&heavier);
        assert_eq!(ring.hashes, before);
    }
}
