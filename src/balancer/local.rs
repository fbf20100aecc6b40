//! This process's tables: the selectors built from the shared topology, refreshed
//! from the shared counters, and rebuilt when the generation changes.

use super::*;

pub(super) struct Local {
    pub(super) generation: u64,
    pub(super) config_version: u64,
    pub(super) topo: Arc<Topology>,
    /// Indexed by pool slot.
    pub(super) pools: Vec<Option<LocalPool>>,
    pub(super) by_name: HashMap<String, u32>,
    pub(super) rng: SmallRng,
    pub(super) fork_epoch: u64,
    /// The owner thread's copy (`crate::shm::owned`): the one copy of a handle that
    /// reserves retries (`crate::budget::Quota`), so that a worker row has one
    /// reserving copy.
    pub(super) owner_copy: bool,
}

impl Local {
    /// Tables that the first `sync` fills (`owner_copy`: the owner thread's copy).
    pub(super) fn empty(owner_copy: bool) -> Local {
        Local {
            owner_copy,
            generation: u64::MAX,
            config_version: u64::MAX,
            topo: Arc::new(Topology::default()),
            pools: Vec::new(),
            by_name: HashMap::new(),
            rng: os_rng(),
            fork_epoch: fork::epoch(),
        }
    }
}

pub(super) struct LocalPool {
    pub(super) name: String,
    /// The pool's slot.
    pub(super) slot: u32,
    /// The pool's config as loaded (`PoolTopo::policy`).
    pub(super) policy: PoolConfig,
    pub(super) next_refresh_ms: u64,
    /// Median latency of the primaries (µs): idle nodes decay toward it.
    pub(super) reference_us: f64,
    /// Whether `reference_us` comes from samples (else it is `default_rtt_ms`).
    pub(super) sampled: bool,
    /// `policy.slow_factor() > 0`: slow nodes are set apart (asked on every pick).
    pub(super) slow_apart: bool,
    /// Whether some node had a learned concurrency limit at the last refresh: only
    /// then do picks tell confirmed slots from probes (see [`Prefer`]).
    pub(super) limited: bool,
    /// References of the stream-signal cost model (`crate::stream`).
    pub(super) llm: Llm,
    pub(super) primary: Tier,
    pub(super) backup: Tier,
    /// The retry budget's window before its current bucket, as this process last
    /// summed it (`crate::tally::budget_totals_at`).
    pub(super) budget_past: tally::BudgetPast,
    /// The retry budget's current bucket, as the last pick found it.
    pub(super) budget_at: budget::BucketAt,
    /// The retries this process reserved in the retry budget (`crate::budget::Quota`):
    /// while it holds one, the retry check answers without summing the rows.
    pub(super) budget_quota: budget::Quota,
}

/// A pool's stream-signal references, from the last refresh: what a node without
/// an estimate of its own is costed at, as `reference_us` is for the peak EWMA.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Llm {
    /// Median TTFT estimate of the primaries that have one (µs).
    pub(super) ttft_ref_us: f64,
    /// Median time-per-token estimate of the primaries that have one (µs; 0: none).
    pub(super) tpot_ref_us: f64,
}

impl Llm {
    /// The cost model (`crate::stream::predicted_us`): node `n`'s predicted latency
    /// for `expected()` output tokens (asked only of a node with stream signals);
    /// `None` when it never sent a first token.
    #[inline(always)]
    pub(super) fn predicted(
        &self,
        n: &NodeSlot,
        now: u64,
        tau: u32,
        expected: impl FnOnce() -> f64,
    ) -> Option<f64> {
        let ttft = n.ttft.load(Ordering::Relaxed);
        if ttft == 0 {
            return None;
        }
        Some(self.predicted_from(ttft, n, now, tau, expected))
    }

    /// [`Llm::predicted`] for a node that sent a first token (`ttft`: its word), out
    /// of the pick's line: most pools have no stream signals.
    #[inline(never)]
    fn predicted_from(
        &self,
        ttft: u64,
        n: &NodeSlot,
        now: u64,
        tau: u32,
        expected: impl FnOnce() -> f64,
    ) -> f64 {
        let t = load::current(ttft, now, tau, self.ttft_ref_us);
        let p = load::current(n.tpot.load(Ordering::Relaxed), now, tau, self.tpot_ref_us);
        crate::stream::predicted_us(t, p, expected())
    }

    /// The references as the primaries' estimates stand (medians, not decayed).
    pub(super) fn of(region: &Region, slots: &[u32]) -> Llm {
        let median = |f: fn(&NodeSlot) -> &AtomicU64| {
            let mut v: Vec<f64> = slots
                .iter()
                .filter_map(|&s| region.node(s))
                .map(|n| load::unpack(f(n).load(Ordering::Relaxed)).0 as f64)
                .filter(|&c| c > 0.0)
                .collect();
            load::median(&mut v).unwrap_or(0.0)
        };
        Llm {
            ttft_ref_us: median(|n| &n.ttft),
            tpot_ref_us: median(|n| &n.tpot),
        }
    }
}

pub(super) struct Tier {
    pub(super) slots: Vec<u32>,
    pub(super) cands: Vec<Candidate>,
    /// Smoothed success share per node, and the counters seen at the last refresh.
    pub(super) success: Vec<f64>,
    pub(super) seen: Vec<Seen>,
    /// Smoothed mean latency (µs) of each node's served tries between refreshes (for a
    /// node with stream signals, its predicted latency for the pool's mean answer at
    /// each refresh it served in); 0 until it has served one.
    pub(super) mean_us: Vec<f64>,
    /// Per node, at the last refresh: how much slower (µs) its mean latency is than
    /// the fastest primary's in service, if at least `slow_factor` times as slow;
    /// else 0. A slow node takes a try only when no other node of its tier can.
    pub(super) slow_extra_us: Vec<f64>,
    pub(super) selector: Selector,
}

/// How selection sees the shared slots of one tier for one request.
pub(super) struct View<'a> {
    pub(super) region: &'a Region,
    pub(super) slots: &'a [u32],
    pub(super) tried: &'a [u32],
    /// What the request costs (`crate::ask`): its tokens against the nodes'
    /// provider headroom and budgets (`crate::headroom`).
    pub(super) ask: &'a Ask<'a>,
    /// Nodes this pick chose whose headroom or budget another pick took first
    /// (`headroom::take_share`): passed over by the pick's next draws.
    pub(super) refused: Refused,
    pub(super) now_ms: u64,
    pub(super) tau_ms: u32,
    pub(super) reference_us: f64,
    /// The pool's stream-signal references and the request's expected output tokens
    /// (its `max_tokens`, else pool `pool`'s mean): the cost model's inputs. The
    /// expected tokens are read when a node with stream signals first asks
    /// ([`View::expected`]): most pools have none.
    pub(super) llm: Llm,
    pub(super) pool: u32,
    pub(super) expected: std::cell::Cell<Option<f64>>,
    /// Only nodes with (`Some(true)`) or without (`Some(false)`) a confirmed free
    /// slot, see [`confirmed_slot`]; `None`: any.
    pub(super) confirmed: Option<bool>,
    /// Leave out the slow nodes (`Tier::slow_extra_us` not 0).
    pub(super) slow_extra_us: Option<&'a [f64]>,
}

/// Up to [`Refused::MAX`] slots a pick passed over after choosing them.
#[derive(Default)]
pub(super) struct Refused {
    n: std::cell::Cell<usize>,
    slots: [std::cell::Cell<u32>; Refused::MAX],
}

impl Refused {
    /// Re-draws a pick makes after its choices are refused, at most.
    pub(super) const MAX: usize = 4;

    /// Forget every slot (a new pass).
    pub(super) fn clear(&self) {
        self.n.set(0);
    }

    /// Note `slot`; false when the list is full (the pick gives up on the pass).
    pub(super) fn add(&self, slot: u32) -> bool {
        let k = self.n.get();
        if k >= Self::MAX {
            return false;
        }
        self.slots[k].set(slot);
        self.n.set(k + 1);
        true
    }

    #[inline]
    fn contains(&self, slot: u32) -> bool {
        self.n.get() > 0 && self.slots[..self.n.get()].iter().any(|c| c.get() == slot)
    }
}

impl View<'_> {
    #[inline]
    pub(super) fn node(&self, i: usize) -> &NodeSlot {
        // Tier slots come from the topology, whose slots are all < max_nodes.
        self.region.node(self.slots[i]).expect("topology slot in range")
    }

    /// The request's expected output tokens: its `max_tokens`, else the pool's mean
    /// as the first call read it.
    fn expected(&self) -> f64 {
        if let Some(e) = self.expected.get() {
            return e;
        }
        let mean = self
            .region
            .pool(self.pool)
            .map_or(0.0, |ps| f64::from_bits(ps.mean_tokens.load(Ordering::Relaxed)));
        let e = crate::stream::expected_tokens(self.ask.max_tokens, mean);
        self.expected.set(Some(e));
        e
    }

    /// [`NodeView::latency`] of node `n`.
    #[inline(always)]
    fn latency_of(&self, n: &NodeSlot) -> f64 {
        if let Some(p) = self
            .llm
            .predicted(n, self.now_ms, self.tau_ms, || self.expected())
        {
            return p;
        }
        load::current(
            n.ewma.load(Ordering::Relaxed),
            self.now_ms,
            self.tau_ms,
            self.reference_us,
        )
    }

    /// Node `i` and its in-flight count when it is [`NodeView::eligible`]: the one
    /// look-up of the node that eligibility and the cost (`eligible_latency_load`)
    /// share.
    #[inline(always)]
    fn eligible_node(&self, i: usize) -> Option<(&NodeSlot, u32)> {
        let slot = self.slots[i];
        if (!self.tried.is_empty() && self.tried.contains(&slot))
            || self.slow_extra_us.is_some_and(|x| x[i] > 0.0)
            || self.refused.contains(slot)
        {
            return None;
        }
        // Tier slots come from the topology, whose slots are all < max_nodes.
        let n = self.region.node(slot).expect("topology slot in range");
        // One load of the flags word for every question below.
        let f = n.flags.load(Ordering::Relaxed);
        // Provider headroom and budgets first (only for a node that has either), so
        // that a node passed over for them is counted as such.
        if !headroom::room(n, f, self.ask.tokens, self.now_ms) {
            return None;
        }
        // The limit and in-flight count loaded once for both questions.
        let (limit, inflight) = (
            crate::fleet::cap(n, self.now_ms),
            n.inflight.load(Ordering::Relaxed),
        );
        // At its cap: counted as this gateway's unmet demand (`crate::fleet`).
        let ok = crate::fleet::under_cap(n, limit, inflight)
            && node::available_flags(n, f, self.now_ms, limit, inflight)
            && self
                .confirmed
                .is_none_or(|want| node::confirmed_slot(self.region, slot, limit, inflight) == want);
        ok.then_some((n, inflight))
    }

    /// [`NodeView::latency_load`] of node `n` with `inflight` tries in flight.
    #[inline(always)]
    fn latency_load_of(&self, n: &NodeSlot, inflight: u32) -> (f64, u32) {
        let load = inflight.saturating_add(crate::scrape::queued(n, self.now_ms));
        (self.latency_of(n), load)
    }
}

impl NodeView for View<'_> {
    #[inline(always)]
    fn eligible(&self, i: usize) -> bool {
        self.eligible_node(i).is_some()
    }

    /// Eligibility and cost from one look-up of the node, the load from the in-flight
    /// count eligibility read.
    #[inline(always)]
    fn eligible_latency_load(&self, i: usize) -> Option<(f64, u32)> {
        let (n, inflight) = self.eligible_node(i)?;
        Some(self.latency_load_of(n, inflight))
    }

    fn inflight(&self, i: usize) -> u32 {
        self.node(i).inflight.load(Ordering::Relaxed)
    }

    /// The cost model's predicted latency for nodes with stream signals, else the
    /// whole-response peak EWMA.
    fn latency(&self, i: usize) -> f64 {
        self.latency_of(self.node(i))
    }

    /// Both from one look-up of the node.
    #[inline(always)]
    fn latency_load(&self, i: usize) -> (f64, u32) {
        let n = self.node(i);
        self.latency_load_of(n, n.inflight.load(Ordering::Relaxed))
    }

    fn queued(&self, i: usize) -> u32 {
        crate::scrape::queued(self.node(i), self.now_ms)
    }

    fn out(&self, i: usize) -> bool {
        node::taken_out(self.node(i), self.now_ms)
    }

    fn slow_left_out(&self) -> bool {
        self.slow_extra_us.is_some()
    }

    #[inline(always)]
    fn prefetch(&self, i: usize) {
        if let Some(&slot) = self.slots.get(i) {
            self.region.prefetch_node(slot);
        }
    }
}

pub(super) fn os_rng() -> SmallRng {
    let mut seed = rand::rngs::OsRng;
    SmallRng::try_from_rng(&mut seed)
        .unwrap_or_else(|_| SmallRng::seed_from_u64(std::process::id() as u64 ^ clock::now_ms()))
}

pub(super) fn local_pool(pools: &mut [Option<LocalPool>], pool: u32) -> Result<&mut LocalPool, Error> {
    pools
        .get_mut(pool as usize)
        .and_then(Option::as_mut)
        .ok_or_else(|| Error::Invalid(format!("unknown pool index {pool}")))
}

/// The least a node's mean latency must exceed the fastest primary's by for it to be
/// set apart as slow (µs), whatever the ratio: nodes that answer within a millisecond
/// or two of each other are alike (0.2 ms against 0.1 ms is twice as slow, and noise).
/// A wait for a faster node polls every 1-2 ms, so it could not win back less; and a
/// pick that draws such a node only to pass it over wastes work on every request.
pub(super) const SLOW_MIN_EXTRA_US: f64 = 5_000.0;

impl LocalPool {
    /// Recompute the reference latency and every node's effective weight.
    /// Mark the nodes whose mean latency is at least `slow_factor` times the fastest
    /// primary's in service and at least [`SLOW_MIN_EXTRA_US`] more; with
    /// `slow_factor` 0, none. Mean latencies of served
    /// tries, not the peak EWMA: a peak estimate keeps a fast node's rare slow answer
    /// for seconds, which would hide a node that is slow on every answer.
    pub(super) fn classify_slow(&mut self, region: &Region, now: u64) {
        let factor = self.policy.slow_factor();
        if factor <= 0.0 {
            return;
        }
        // The fastest primary in service (one cooling, ejected or down does not count).
        let p = &self.primary;
        let fastest = p
            .slots
            .iter()
            .zip(&p.mean_us)
            .filter(|&(&s, &m)| m > 0.0 && region.node(s).is_some_and(|n| !node::taken_out(n, now)))
            .map(|(_, &m)| m)
            .fold(f64::INFINITY, f64::min);
        for tier in [&mut self.primary, &mut self.backup] {
            for (extra, &m) in tier.slow_extra_us.iter_mut().zip(&tier.mean_us) {
                *extra = if m > 0.0 && m >= factor * fastest && m - fastest >= SLOW_MIN_EXTRA_US {
                    m - fastest
                } else {
                    0.0
                };
            }
            // The selector's tables for the pass that leaves them out (kept until the
            // next refresh rebuilds the weights).
            if tier.slow_extra_us.iter().any(|&x| x > 0.0) {
                let slow: Vec<bool> = tier.slow_extra_us.iter().map(|&x| x > 0.0).collect();
                tier.selector.set_slow(&slow);
            }
        }
    }

    pub(super) fn refresh(&mut self, region: &Region, now: u64) {
        let tau = self.policy.ewma.decay_ms;
        let default_us = self.policy.ewma.default_rtt_ms as f64 * 1000.0;
        // The reference is the median of the nodes' last estimates as they stand (not
        // decayed: decaying them toward anything here would feed back into itself).
        let mut sampled: Vec<f64> = self
            .primary
            .slots
            .iter()
            .filter_map(|&s| region.node(s))
            .map(|n| load::unpack(n.ewma.load(Ordering::Relaxed)).0 as f64)
            .filter(|&c| c > 0.0)
            .collect();
        self.sampled = !sampled.is_empty();
        self.reference_us = load::median(&mut sampled).unwrap_or(default_us);
        self.llm = Llm::of(region, &self.primary.slots);
        let llm = self.llm;
        let mean_tokens = region
            .pool(self.slot)
            .map_or(0.0, |ps| f64::from_bits(ps.mean_tokens.load(Ordering::Relaxed)));
        let latency_weighted = !matches!(
            self.policy.algorithm,
            Algorithm::P2cEwma | Algorithm::Chash | Algorithm::Prefix
        );
        // Since the last refresh (`next_refresh_ms` is that refresh's time + refresh_ms).
        let since_ms = now.saturating_sub(self.next_refresh_ms.saturating_sub(self.policy.refresh_ms as u64));
        let idle_keep = (-(since_ms as f64) / tau.max(1) as f64).exp();
        for tier in [&mut self.primary, &mut self.backup] {
            for (i, &slot) in tier.slots.iter().enumerate() {
                let (now_seen, was) = (Seen::of(region, slot), tier.seen[i]);
                tier.success[i] = load::success_factor(
                    tier.success[i],
                    now_seen.tries.saturating_sub(was.tries),
                    now_seen.bad.saturating_sub(was.bad),
                );
                let served = now_seen.served.saturating_sub(was.served);
                if served > 0 {
                    // With stream signals, the node's predicted latency for the pool's
                    // mean answer (`crate::stream`): its speed, not the length of the
                    // answers it happened to get. Else its mean served latency.
                    let mean = region
                        .node(slot)
                        .and_then(|n| llm.predicted(n, now, tau, || mean_tokens))
                        .unwrap_or_else(|| {
                            now_seen.latency_sum_us.saturating_sub(was.latency_sum_us) as f64 / served as f64
                        });
                    let old = tier.mean_us[i];
                    tier.mean_us[i] = if old > 0.0 { 0.7 * old + 0.3 * mean } else { mean };
                } else if tier.slow_extra_us[i] > 0.0 {
                    // A slow node that served nothing (no faster node was full) would
                    // keep its mean, and so stay slow and unserved, for ever: its
                    // excess over the fastest decays with `decay_ms` (as an idle node's
                    // peak EWMA does toward the median), so that after a while it is
                    // tried again and measured anew. A node 5x as slow as the fastest,
                    // at factor 2: about 14 s with the default 10 s.
                    tier.mean_us[i] -= tier.slow_extra_us[i] * (1.0 - idle_keep);
                }
                tier.seen[i] = now_seen;
                let Some(n) = region.node(slot) else { continue };
                let mut w = n.weight.load(Ordering::Relaxed).max(1) as f64
                    * load::slow_start(
                        now,
                        n.started_ms.load(Ordering::Relaxed),
                        self.policy.slow_start_ms,
                    )
                    * tier.success[i];
                if latency_weighted {
                    let cost = load::current(n.ewma.load(Ordering::Relaxed), now, tau, self.reference_us);
                    w *= load::latency_factor(cost, self.reference_us);
                }
                tier.cands[i].weight = w;
            }
            tier.selector.set_weights(&tier.cands);
        }
        self.classify_slow(region, now);
        self.limited = [&self.primary, &self.backup].iter().any(|t| {
            t.slots
                .iter()
                .any(|&s| region.node(s).is_some_and(|n| crate::fleet::cap(n, now) != 0))
        });
        self.next_refresh_ms = now + self.policy.refresh_ms as u64;
    }
}

/// A node's counters as a refresh saw them.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Seen {
    /// Tries reported.
    pub(super) tries: u64,
    /// Tries that failed or were refused with 429.
    pub(super) bad: u64,
    /// Served tries, and the sum of their latencies.
    pub(super) served: u64,
    pub(super) latency_sum_us: u64,
}

impl Seen {
    pub(super) fn of(region: &Region, slot: u32) -> Seen {
        let Some(n) = region.node(slot) else {
            return Seen::default();
        };
        let c = tally::node_counts(region, slot);
        Seen {
            tries: c.requests(),
            bad: c.failures() + n.busy.load(Ordering::Relaxed),
            served: c.served(),
            latency_sum_us: c.latency_sum_us,
        }
    }
}

/// The pool whose nodes may take a try no node of this pool can: its backup pool
/// while in emergency, or while every node of `nodes` (the pool's slots) is down or
/// ejected. No allocation, no lock: called on the request path when a pick fails.
#[inline]
pub(super) fn spill_target(region: &Region, ps: &PoolSlot, nodes: &[&[u32]], now_ms: u64) -> Option<u32> {
    let backup = ps.backup_pool.load(Ordering::Relaxed);
    if backup == 0 {
        return None;
    }
    // Acquire pairs with the Release of the transitions in `emergency_tick` and
    // `force_emergency`; nothing is read after it but node flags (read on their own).
    if ps.emergency.load(Ordering::Acquire) & emergency::ACTIVE != 0 {
        return Some(backup - 1);
    }
    let dead = nodes
        .iter()
        .flat_map(|t| t.iter())
        .all(|&s| region.node(s).is_none_or(|n| node::failing(n, now_ms)));
    dead.then_some(backup - 1)
}

impl Balancer {
    /// Run `f` on the node slots of `pool` (primaries, backups) as this process's
    /// tables have them: for code outside this module that looks at every node of a
    /// pool (admission capacity). No allocation.
    /// `pool`'s tables and, while its backup pool is in play (`spill_target`), that
    /// pool's: the nodes that may serve a request for `pool` now. The one place the
    /// spill is decided for the retry check, `available` and admission's capacity
    /// (the pick asks `spill_target` itself, only after its own pool failed).
    pub(super) fn serving<'l>(
        &self,
        pools: &'l [Option<LocalPool>],
        pool: u32,
        now: u64,
    ) -> Result<(&'l LocalPool, Option<&'l LocalPool>), Error> {
        let p = pools
            .get(pool as usize)
            .and_then(Option::as_ref)
            .ok_or_else(|| Error::Invalid(format!("unknown pool index {pool}")))?;
        Ok((p, self.spill_of(pools, p, now)))
    }

    /// The second half of [`serving`](Self::serving): local pool `p`'s backup pool's
    /// tables while it is in play.
    #[inline]
    pub(super) fn spill_of<'l>(
        &self,
        pools: &'l [Option<LocalPool>],
        p: &LocalPool,
        now: u64,
    ) -> Option<&'l LocalPool> {
        let ps = self.region.pool(p.slot).expect("local pool slot in range");
        spill_target(&self.region, ps, &[&p.primary.slots, &p.backup.slots], now)
            .filter(|&b| b != p.slot)
            .and_then(|b| pools.get(b as usize).and_then(Option::as_ref))
    }

    /// [`Balancer::serving`] as slot lists: `f(own tiers, backup pool's tiers)`.
    pub(crate) fn with_serving_slots<R>(
        &self,
        pool: u32,
        now: u64,
        f: impl FnOnce([&[u32]; 2], Option<[&[u32]; 2]>) -> R,
    ) -> Result<R, Error> {
        let mut l = self.local.lock();
        self.sync(&mut l)?;
        let (p, spill) = self.serving(&l.pools, pool, now)?;
        Ok(f(
            [&p.primary.slots, &p.backup.slots],
            spill.map(|b| [&b.primary.slots[..], &b.backup.slots[..]]),
        ))
    }

    /// Bring local tables up to the region's generation.
    #[inline]
    pub(super) fn sync(&self, l: &mut Local) -> Result<(), Error> {
        // The per-request case, inlined: same process, same generation. Acquire as in
        // `sync_changed`.
        if l.fork_epoch == fork::epoch()
            && self.region.header().generation.load(Ordering::Acquire) == l.generation
        {
            return Ok(());
        }
        self.sync_changed(l)
    }

    /// [`sync`](Self::sync) after a fork or a generation change.
    #[inline(never)]
    fn sync_changed(&self, l: &mut Local) -> Result<(), Error> {
        let epoch = fork::epoch();
        if l.fork_epoch != epoch {
            l.rng = os_rng();
            l.fork_epoch = epoch;
            // The parent's reserved retries are the parent's to take and give back.
            for p in l.pools.iter_mut().flatten() {
                p.budget_quota = budget::Quota::default();
            }
        }
        let h = self.region.header();
        // Acquire pairs with the Release in `bump`: the slot and text writes of the
        // configure that moved the generation are visible below.
        let generation = h.generation.load(Ordering::Acquire);
        if generation == l.generation {
            return Ok(());
        }
        // A process of an older stage (an nginx worker shutting down after a reload)
        // keeps the tables it has, so its requests finish on the config they began with.
        let frozen = l.config_version != u64::MAX && self.superseded();
        // Both pair with the Release in `Region::write_text`; the text itself is read
        // under the lock, and the generation's Acquire above already covers it.
        if !frozen && h.config_version.load(Ordering::Acquire) != l.config_version {
            let guard = self.region.lock(LOCK_TIMEOUT)?;
            let version = h.config_version.load(Ordering::Acquire);
            let topo = Topology::parse(&self.region.read_text(&guard));
            drop(guard);
            self.rebuild(l, topo);
            l.config_version = version;
        }
        let now = clock::now_ms();
        for p in l.pools.iter_mut().flatten() {
            p.refresh(&self.region, now);
        }
        l.generation = generation;
        Ok(())
    }

    pub(super) fn rebuild(&self, l: &mut Local, topo: Topology) {
        let cap = self.region.capacity();
        l.pools = (0..cap.max_pools).map(|_| None).collect();
        l.by_name.clear();
        for p in &topo.pools {
            let tier = |backup: bool, rng: &mut SmallRng| {
                let nodes: Vec<&NodeTopo> = p.nodes.iter().filter(|n| n.backup == backup).collect();
                let cands: Vec<Candidate> = nodes
                    .iter()
                    .map(|n| Candidate {
                        key: hash_key(n.id.as_bytes()),
                        weight: self
                            .region
                            .node(n.slot)
                            .map_or(1, |s| s.weight.load(Ordering::Relaxed))
                            .max(1) as f64,
                    })
                    .collect();
                Tier {
                    slots: nodes.iter().map(|n| n.slot).collect(),
                    success: vec![1.0; nodes.len()],
                    seen: nodes.iter().map(|n| Seen::of(&self.region, n.slot)).collect(),
                    mean_us: vec![0.0; nodes.len()],
                    slow_extra_us: vec![0.0; nodes.len()],
                    selector: Selector::build(p.policy.algorithm, &cands, p.policy.chash_points, rng)
                        .with_load_factor(p.policy.prefix.load_factor),
                    cands,
                }
            };
            let primary = tier(false, &mut l.rng);
            let backup = tier(true, &mut l.rng);
            l.by_name.insert(p.name.clone(), p.slot);
            l.pools[p.slot as usize] = Some(LocalPool {
                name: p.name.clone(),
                slot: p.slot,
                policy: p.policy.clone(),
                next_refresh_ms: 0,
                reference_us: p.policy.ewma.default_rtt_ms as f64 * 1000.0,
                sampled: false,
                slow_apart: p.policy.slow_factor() > 0.0,
                limited: false,
                llm: Llm::default(),
                primary,
                backup,
                budget_past: tally::BudgetPast::default(),
                budget_at: budget::BucketAt::default(),
                budget_quota: budget::Quota::default(),
            });
        }
        l.topo = Arc::new(topo);
    }
}
