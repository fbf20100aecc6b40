//! Choosing a node for one try, the retry check, and "can this pool take a request
//! now": over this process's tables and the shared node slots.

use super::*;

/// How long (ms) a poll of `slow_wait_ms` marks a pool as having requests waiting for
/// a faster node: a little over the 1-2 ms between polls and the coarse clock's tick.
pub const SLOW_WAITING_MS: u64 = 10;

/// Tries `Balancer::pick_retry` checks at most (its stack copy of them).
pub const PICK_RETRY_MAX_TRIES: usize = 64;

/// The tries of a request, for the retry check: `before`, then `last` (the one just
/// picked, kept apart so that it is not copied after them).
#[derive(Clone, Copy)]
struct Tries<'a> {
    before: &'a [u32],
    last: Option<u32>,
}

impl Tries<'_> {
    fn len(&self) -> usize {
        self.before.len() + usize::from(self.last.is_some())
    }

    /// A plain loop over `before`: a request has tried a few slots, where the slice
    /// search's vector set-up costs more than it saves (about 12 instructions a slot
    /// of the retry check's scan, `before` empty on most requests).
    fn contains(&self, slot: &u32) -> bool {
        self.last == Some(*slot) || self.before.iter().any(|b| b == slot)
    }
}

/// One pick's request, as every pool and pass it looks at sees it.
#[derive(Clone, Copy)]
struct Want<'a> {
    ask: &'a Ask<'a>,
    /// Slots the request may not go to (its tries first).
    tried: &'a [u32],
    now: u64,
    prefer: Prefer,
    /// Slow nodes as overflow and the backups too (`pick`); without it only the
    /// primaries that are not slow (`pick_fast`).
    overflow: bool,
}

impl<'a> Want<'a> {
    fn new(ask: &'a Ask<'a>, tried: &'a [u32], now: u64, prefer: Prefer, overflow: bool) -> Self {
        Want {
            ask,
            tried,
            now,
            prefer,
            overflow,
        }
    }
}

/// What a pick within one pool (`pick_in`) learnt besides its answer.
#[derive(Clone, Copy, Default)]
struct Notes {
    /// No node could take the try: the pool to try next (its backup pool in play).
    spill: Option<u32>,
    /// A node of the pool other than the one picked and not in the request's `tried`
    /// was eligible as the pick looked (`Selector::other_eligible`): the retry
    /// check's "some untried node is free" needs no scan.
    other_free: bool,
    /// The pick was made in the pool itself (not its backup pool), which brought the
    /// pool's `budget_at` to the pick's now: the retry check need not ask again.
    budget_at_now: bool,
}

/// What `pick_in` takes of a process's tables besides the pool's own and its random
/// generator: their fork epoch (`Local::fork_epoch`) and whether they are the owner
/// thread's copy (`crate::shm::owned`).
type At = (u64, bool);

/// `NoNode` for pool slot `pool`, named as this process's tables have it.
#[cold]
fn no_node(l: &Local, pool: u32) -> Error {
    let name = l
        .pools
        .get(pool as usize)
        .and_then(Option::as_ref)
        .map_or_else(String::new, |p| p.name.clone());
    Error::NoNode { pool: name }
}

impl Balancer {
    /// Choose a node of `pool` for one try, skipping the slots in `tried`. The node's
    /// in-flight count is raised; `report` must be called exactly once for it. A pick
    /// with an empty `tried` counts as a request, any other as a retry, in the pool's
    /// retry budget.
    pub fn pick(&self, pool: u32, key: &[u8], tried: &[u32]) -> Result<u32, Error> {
        self.pick_with(pool, &Ask::key(key), tried, Prefer::Confirmed)
    }

    /// [`pick`](Self::pick), choosing first among nodes with a confirmed free slot
    /// (`Prefer::Confirmed`) or at their probe (`Prefer::Probe`: a request the
    /// admission queue let in above the confirmed capacity), then among the others;
    /// `ask` is what the request costs (`crate::ask`).
    pub fn pick_with(&self, pool: u32, ask: &Ask, tried: &[u32], prefer: Prefer) -> Result<u32, Error> {
        self.with_tables(|l, owner, now| {
            self.pick_spill(
                l,
                owner,
                pool,
                Want::new(ask, tried, now, prefer, true),
                &mut Notes::default(),
            )
        })
    }

    /// `f` over this process's tables, locked (`owner`: the owner thread's copy,
    /// `crate::shm::owned`), at the coarse clock's now: how each pick begins.
    #[inline(always)]
    fn with_tables<R>(&self, f: impl FnOnce(&mut Local, bool, u64) -> R) -> R {
        let now = clock::now_ms();
        let mut l = self.local.lock();
        let owner = l.is_owner_copy() || self.local.is_owner();
        f(&mut l, owner, now)
    }

    /// [`pick_with`](Self::pick_with) (or [`pick_fast`](Self::pick_fast) with
    /// `fast_only`) and then [`may_retry`](Self::may_retry) for the request that has
    /// tried the first `ntries` slots of `tried` and now the picked one, `elapsed_ms`
    /// after it began: one lock of this process's tables, one clock read. The picked
    /// slot and the retry check's answer.
    #[allow(clippy::too_many_arguments)]
    pub fn pick_retry(
        &self,
        pool: u32,
        ask: &Ask,
        tried: &[u32],
        ntries: usize,
        (prefer, fast_only): (Prefer, bool),
        elapsed_ms: u32,
    ) -> Result<(u32, Result<(), RetryDenied>), Error> {
        if ntries > tried.len() || ntries >= PICK_RETRY_MAX_TRIES {
            return Err(Error::Invalid(format!(
                "ntries {ntries} is not below {PICK_RETRY_MAX_TRIES} and ntried {}",
                tried.len()
            )));
        }
        self.with_tables(|l, owner, now| {
            let want = Want::new(ask, tried, now, prefer, !fast_only);
            let mut notes = Notes::default();
            let slot = self.pick_spill(l, owner, pool, want, &mut notes)?;
            let tries = Tries {
                before: &tried[..ntries],
                last: Some(slot),
            };
            // Synced by the pick, under the same lock.
            Ok((slot, self.retry_check(l, pool, tries, elapsed_ms, now, notes)))
        })
    }

    /// `pick_with` over locked tables: the pool, then its backup pool when it has one
    /// in play (emergency, dead pool); `NoNode` counted when neither has a node. Without
    /// `want.overflow` (`pick_fast`), the pool alone, and `NoNode` is not counted.
    #[inline(always)]
    fn pick_spill(
        &self,
        l: &mut Local,
        owner: bool,
        pool: u32,
        want: Want,
        notes: &mut Notes,
    ) -> Result<u32, Error> {
        self.sync(l)?;
        let Local {
            pools,
            rng,
            fork_epoch,
            ..
        } = l;
        let at = (*fork_epoch, owner);
        if let Some(slot) = self.pick_in(local_pool(pools, pool)?, rng, at, want, notes) {
            return Ok(slot);
        }
        // No node of the pool can take it: its backup pool may (emergency, dead pool).
        if let Some(bp) = notes.spill {
            if let Some(slot) = self.pick_in_spill(pools, rng, at, bp, want) {
                return Ok(slot);
            }
        }
        if want.overflow {
            if let Some(ps) = self.region.pool(pool) {
                ps.no_node_total.fetch_add(1, Ordering::Relaxed);
            }
        }
        Err(no_node(l, pool))
    }

    /// `pick_in` of the backup pool a pool spills to (out of the common path's line).
    #[inline(never)]
    fn pick_in_spill(
        &self,
        pools: &mut [Option<LocalPool>],
        rng: &mut SmallRng,
        at: At,
        pool: u32,
        want: Want,
    ) -> Option<u32> {
        let p = local_pool(pools, pool).ok()?;
        self.pick_in(p, rng, at, want, &mut Notes::default())
    }

    /// What a request body costs in `pool`: its facts (`crate::ask::inspect`), its
    /// token estimate by the pool's `tokens` policy, and, in a `prefix` pool, its
    /// prefix key (`crate::prefix::key`; `None` without a usable prefix). `Invalid`
    /// for a body that is not one JSON object.
    pub fn inspect(&self, pool: u32, body: &[u8]) -> Result<(BodyFacts, u32, Option<u64>), Error> {
        let facts = crate::ask::inspect(body).map_err(|e| Error::Invalid(e.to_string()))?;
        let (tokens, prefix) = {
            let mut l = self.local.lock();
            self.sync(&mut l)?;
            let p = local_pool(&mut l.pools, pool)?;
            let prefix = (p.policy.algorithm == Algorithm::Prefix).then_some(p.policy.prefix);
            (facts.tokens(&p.policy.tokens), prefix)
        };
        // The body's second pass (prefix pools only), outside the lock.
        let key = prefix.and_then(|p| crate::prefix::key(body, &p));
        Ok((facts, tokens, key))
    }

    /// [`pick_with`](Self::pick_with) among the primaries that are not slow
    /// (`limit.slow_factor`) only, and with `Prefer::Confirmed` only into confirmed
    /// slots (no AIMD probe): `NoNode` when none of them can take a try now, without
    /// counting it. What `admit()` uses to hold a faster node's slot before
    /// the balancer phase rather than race other requests to it.
    pub fn pick_fast(&self, pool: u32, ask: &Ask, tried: &[u32], prefer: Prefer) -> Result<u32, Error> {
        self.with_tables(|l, owner, now| {
            self.pick_spill(
                l,
                owner,
                pool,
                Want::new(ask, tried, now, prefer, false),
                &mut Notes::default(),
            )
        })
    }

    /// `pick` within one pool `p`, its process's tables synced (`rng` and `at` of
    /// them); `None` when no node can take the try, and then
    /// `notes.spill` is the pool to try next. Without `want.overflow`, only the
    /// primaries that are not slow are looked at.
    #[inline(always)]
    fn pick_in(
        &self,
        p: &mut LocalPool,
        rng: &mut SmallRng,
        at: At,
        want: Want,
        notes: &mut Notes,
    ) -> Option<u32> {
        let Want {
            ask,
            tried,
            now,
            prefer,
            overflow,
        } = want;
        let (fork_epoch, owner) = at;
        let pool = p.slot;
        // Until some primary has a latency sample, refresh on every pick: otherwise the
        // first node to report would look far cheaper than the unsampled ones (costed at
        // `default_rtt_ms`) and take all traffic until the next refresh.
        if now >= p.next_refresh_ms || !p.sampled {
            p.refresh(&self.region, now);
        }
        let key_hash = match p.policy.algorithm {
            Algorithm::Chash => hash_key(ask.key),
            // No key: picked by load. A real key never hashes to NO_KEY.
            Algorithm::Prefix if ask.key.is_empty() => NO_KEY,
            Algorithm::Prefix => hash_key(ask.key).max(1),
            _ => 0,
        };
        // Passes, each tier in turn: with slow nodes as overflow, the others first;
        // with learned limits, confirmed free slots (or, for `Prefer::Probe`, probes)
        // first. Without either, one pass per tier. Without `overflow` (`pick_fast`)
        // a `Confirmed` pick takes no probe: a refused probe would leave its request
        // nothing but the slow node, so probes are left to requests that overflow
        // anyway (and to the ones the queue admits as probes).
        let first = prefer == Prefer::Confirmed;
        let confirmed_passes: &[Option<bool>] = match (p.limited, overflow || !first) {
            (false, _) => &[None],
            (true, true) => &[Some(first), Some(!first)],
            (true, false) => &[Some(true)],
        };
        let speed_passes: &[bool] = match (overflow, p.slow_apart) {
            (false, _) => &[true],
            (true, true) => &[true, false],
            (true, false) => &[false],
        };
        let tiers: &[bool] = if overflow { &[false, true] } else { &[false] };
        for &backup in tiers {
            let tier = if backup { &mut p.backup } else { &mut p.primary };
            if tier.slots.is_empty() {
                continue;
            }
            // One view per tier; each pass sets what it leaves out.
            let mut view = View {
                region: &self.region,
                slots: &tier.slots,
                tried,
                ask,
                now_ms: now,
                tau_ms: p.policy.ewma.decay_ms,
                reference_us: p.reference_us,
                llm: p.llm,
                pool,
                expected: Default::default(),
                confirmed: None,
                slow_extra_us: None,
                refused: Refused::default(),
            };
            for &fast_only in speed_passes {
                for &confirmed in confirmed_passes {
                    view.confirmed = confirmed;
                    view.slow_extra_us = fast_only.then_some(&tier.slow_extra_us[..]);
                    view.refused.clear();
                    // A node whose headroom or budget another worker took since the
                    // view said it had room is passed over, and the pass draws again.
                    let chosen = loop {
                        let Some(i) = tier.selector.pick(rng, &view, key_hash) else {
                            break None;
                        };
                        let n = view.node(i);
                        if headroom::take_share(n, ask.tokens, now) {
                            break Some((tier.slots[i], n));
                        }
                        if !view.refused.add(tier.slots[i]) {
                            break None;
                        }
                    };
                    let Some((slot, n)) = chosen else { continue };
                    // `sync` (the caller's) has checked the epoch against the process's.
                    let worker = self.worker_slot_at(fork_epoch);
                    self.acquire(n, slot, worker);
                    let (row, writer) = self.tally_as(worker, owner);
                    let retry = !tried.is_empty();
                    let t = self
                        .region
                        .pool_tally(row, pool)
                        .expect("local pool slot in range");
                    let window_ms = p.policy.retry.window_ms;
                    if !p.budget_at.covers(now, window_ms) {
                        p.budget_at = budget::BucketAt::of(now, window_ms);
                    }
                    notes.budget_at_now = true;
                    // A retry this process reserved is counted already.
                    if !(retry && p.budget_quota.take(&p.budget_at)) {
                        budget::record_at(&t.budget, &p.budget_at, retry, writer);
                    }
                    writer.add(
                        if retry {
                            &t.retries_total
                        } else {
                            &t.requests_total
                        },
                        1,
                    );
                    let affinity = match tier.selector.prefix_outcome() {
                        PrefixOutcome::Hit => Some(&t.prefix_hits_total),
                        PrefixOutcome::Spill => Some(&t.prefix_spills_total),
                        PrefixOutcome::NoKey => Some(&t.prefix_nokey_total),
                        PrefixOutcome::Moved | PrefixOutcome::None => None,
                    };
                    if let Some(counter) = affinity {
                        writer.add(counter, 1);
                    }
                    notes.other_free = tier.selector.other_eligible().is_some();
                    return Some(slot);
                }
            }
        }
        if overflow {
            let ps = self.region.pool(pool).expect("local pool slot in range");
            notes.spill = spill_target(&self.region, ps, &[&p.primary.slots, &p.backup.slots], now);
        }
        None
    }

    /// Count a try on node `n` (slot `slot`) in flight, in its total and in `worker`'s
    /// share of it.
    fn acquire(&self, n: &NodeSlot, slot: u32, worker: Option<u32>) {
        // Relaxed: counters; no other memory is published through them.
        n.inflight.fetch_add(1, Ordering::Relaxed);
        // The worker's share stays an atomic add even on the owner thread: any thread
        // of the process may report a try another picked, and every one must be given
        // back exactly once if the process dies.
        if let Some(share) = worker.and_then(|w| self.region.share(w, slot)) {
            share.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// May the request that has tried `tried` (in order) try once more, `elapsed_ms`
    /// after it began? Checks the pool's `max_tries`, deadline, retry budget, then that
    /// some node not yet tried could take it now (`NoNode`, last: a request with rounds
    /// left waits for one). Nothing is recorded except budget
    /// refusals; the retry itself is counted by the `pick` that makes it.
    pub fn may_retry(&self, pool: u32, tried: &[u32], elapsed_ms: u32) -> Result<(), RetryDenied> {
        let now = clock::now_ms();
        let mut l = self.local.lock();
        let tries = Tries {
            before: tried,
            last: None,
        };
        self.sync(&mut l).map_err(|_| RetryDenied::NoNode)?;
        self.retry_check(&mut l, pool, tries, elapsed_ms, now, Notes::default())
    }

    /// [`may_retry`](Self::may_retry) over locked, synced tables at `now`; `notes`
    /// from the pick just made in the same tables at the same now, if any
    /// ([`Notes::other_free`]: a node not in `tried` is known to be free, so the nodes
    /// need no scan; [`Notes::budget_at_now`]). Inlined into both callers (a request's
    /// pick makes one call of it).
    #[inline(always)]
    fn retry_check(
        &self,
        l: &mut Local,
        pool: u32,
        tried: Tries,
        elapsed_ms: u32,
        now: u64,
        notes: Notes,
    ) -> Result<(), RetryDenied> {
        let (epoch, owner_copy) = (l.fork_epoch, l.owner_copy);
        let p = local_pool(&mut l.pools, pool).map_err(|_| RetryDenied::NoNode)?;
        if tried.len() >= p.policy.retry.max_tries as usize {
            return Err(RetryDenied::MaxTries);
        }
        if elapsed_ms >= p.policy.retry.deadline_ms {
            return Err(RetryDenied::Deadline);
        }
        // The budget before the nodes: a busy request that finds no node free now waits
        // for one in a new round (`retry.rounds`), which only the budget may refuse.
        let window_ms = p.policy.retry.window_ms;
        if !(notes.budget_at_now || p.budget_at.covers(now, window_ms)) {
            p.budget_at = budget::BucketAt::of(now, window_ms);
        }
        // A retry this process reserved is within the budget (`crate::budget::Quota`).
        if !p.budget_quota.holds(&p.budget_at) {
            let reserving = owner_copy && self.worker_slot_at(epoch).is_some();
            self.budget_check(p, pool, now, reserving)?;
        }
        if notes.other_free {
            return Ok(());
        }
        let free = |t: &Tier| self.untried_free(t, &tried, now);
        // `p` is `pool`'s tables, as `serving` would give them. The backup pool only
        // when no node of the pool's own is free (no side effects: the answer is
        // `serving`'s).
        if free(&p.primary) || free(&p.backup) {
            return Ok(());
        }
        let p = l.pools[pool as usize].as_ref().ok_or(RetryDenied::NoNode)?;
        if self
            .spill_of(&l.pools, p, now)
            .is_some_and(|b| free(&b.primary) || free(&b.backup))
        {
            return Ok(());
        }
        Err(RetryDenied::NoNode)
    }

    /// Can some node of tier `t` that `tried` does not hold take a try at `now`? A
    /// plain loop: inlined into the retry check, where an iterator's `any` was not.
    #[inline(always)]
    fn untried_free(&self, t: &Tier, tried: &Tries, now: u64) -> bool {
        for s in &t.slots {
            if !tried.contains(s) && self.region.node(*s).is_some_and(|n| node::available(n, now)) {
                return true;
            }
        }
        false
    }

    /// The retry budget's exact check for local pool `p` (slot `pool`) at `now`, its
    /// current bucket in `p.budget_at`: the window summed over the tally rows, a
    /// refusal counted in `retries_denied`. A quota of an earlier period is given back
    /// first and, when `reserving` (the owner thread's copy of a handle with a worker
    /// row: one such copy per row), retries are reserved from the headroom found
    /// (`crate::budget::Quota`).
    #[inline(never)]
    fn budget_check(
        &self,
        p: &mut LocalPool,
        pool: u32,
        now: u64,
        reserving: bool,
    ) -> Result<(), RetryDenied> {
        let cap = self.region.capacity();
        let shared = self
            .region
            .pool_tally(cap.max_workers, pool)
            .expect("local pool slot in range");
        p.budget_quota.roll(&p.budget_at, &shared.budget);
        let r = &p.policy.retry;
        let (requests, retries) = tally::budget_totals_at(
            &self.region,
            pool,
            now,
            r.window_ms,
            &p.budget_at,
            &mut p.budget_past,
        );
        let headroom = retry::headroom(requests, retries, r.budget_ratio, r.min_per_s, r.window_ms);
        if headroom == 0 {
            let ps = self.region.pool(pool).expect("local pool slot in range");
            ps.retries_denied.fetch_add(1, Ordering::Relaxed);
            return Err(RetryDenied::Budget);
        }
        let rows = tally::rows(&self.region);
        p.budget_quota
            .reserve(&p.budget_at, headroom, (rows, reserving), &shared.budget);
        Ok(())
    }

    /// Can some node of the pool (primary or backup) take a request now? If not,
    /// `Err(ms)`: the soonest moment one may (a cooldown or ejection ending; one second
    /// when the nodes are only at their concurrency limits).
    pub fn available(&self, pool: u32) -> Result<(), u64> {
        let now = clock::now_ms();
        let mut l = self.local.lock();
        if self.sync(&mut l).is_err() {
            return Err(1000);
        }
        let Ok((p, spill)) = self.serving(&l.pools, pool, now) else {
            return Err(node::AT_LIMIT_MS);
        };
        let any = |slots: &[u32]| {
            slots.iter().any(|&s| {
                self.region
                    .node(s)
                    .is_some_and(|n| node::available_for_try(n, now))
            })
        };
        if any(&p.primary.slots) || any(&p.backup.slots) {
            return Ok(());
        }
        let mut soonest = node::soonest_back_ms(
            &self.region,
            p.primary.slots.iter().chain(&p.backup.slots).copied(),
            now,
            u64::MAX,
        );
        // The backup pool's nodes count when it is in play (`crate::emergency`).
        if let Some(b) = spill {
            if any(&b.primary.slots) || any(&b.backup.slots) {
                return Ok(());
            }
            let slots = b.primary.slots.iter().chain(&b.backup.slots).copied();
            soonest = soonest.min(node::soonest_back_ms(&self.region, slots, now, u64::MAX));
        }
        Err(if soonest == u64::MAX {
            node::AT_LIMIT_MS
        } else {
            soonest
        })
    }

    /// How long (ms) to go on waiting for a faster node rather than send the request
    /// to a slow one (`limit.slow_factor`): 0 when some primary that is not slow can
    /// take a try now, when no primary can at all (the backups, admission and the pick
    /// deal with that), or when slow nodes are not set apart; otherwise the smallest
    /// latency difference (ms, rounded up) among the slow primaries that could take it.
    /// `admit()` waits while it has waited less than this.
    ///
    /// Also says whether other requests were waiting for a faster node of the pool
    /// (polled within the last [`SLOW_WAITING_MS`]): a newcomer lets them poll first,
    /// so that it does not take the slot they wait for. A result above 0 counts the
    /// caller as waiting.
    pub fn slow_wait_ms(&self, pool: u32) -> Result<(u32, bool), Error> {
        let now = clock::now_ms();
        let mut l = self.local.lock();
        self.sync(&mut l)?;
        let p = local_pool(&mut l.pools, pool)?;
        if p.policy.slow_factor() <= 0.0 {
            return Ok((0, false));
        }
        let ps = self.region.pool(pool).expect("local pool slot in range");
        let others = now < ps.slow_waiting_until_ms.load(Ordering::Relaxed);
        if now >= p.next_refresh_ms {
            p.refresh(&self.region, now);
        }
        let mut wait_us = f64::INFINITY;
        for (&s, &extra) in p.primary.slots.iter().zip(&p.primary.slow_extra_us) {
            if !self.region.node(s).is_some_and(|n| node::available(n, now)) {
                continue;
            }
            if extra <= 0.0 {
                return Ok((0, others));
            }
            wait_us = wait_us.min(extra);
        }
        if !wait_us.is_finite() {
            return Ok((0, others));
        }
        ps.slow_waiting_until_ms
            .fetch_max(now + SLOW_WAITING_MS, Ordering::Relaxed);
        Ok(((wait_us / 1000.0).ceil().min(u32::MAX as f64) as u32, others))
    }

    /// The status to answer when no node can take a request (429 or 503).
    pub fn no_node_status(&self, pool: u32) -> u32 {
        let Ok(topo) = self.topology() else { return 429 };
        topo.pools
            .iter()
            .find(|p| p.slot == pool)
            .map_or(429, |p| p.policy.no_node_status)
    }
}
