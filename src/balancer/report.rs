//! The outcome of one try fed back: in-flight, statistics, peak EWMA, learned
//! limits, cooldowns and ejection; active health-check results.

use super::*;
use std::sync::atomic::AtomicI32;

use crate::shm::layout::latency_bucket;
use crate::shm::NodeRow;

/// What a reported try does to a node's latency estimate.
pub(super) enum Feed {
    Sample(f64),
    /// Leave it as it is.
    Skip,
    /// Forget it: the node was just taken out and returns as unknown.
    Forget,
}

/// Index into `NodeTally::status_class`: 0 no response, 1..=5 the status class.
pub(super) fn status_class(status: u32) -> usize {
    // The common answer first, without the division.
    if status.wrapping_sub(200) < 100 {
        return 2;
    }
    if status == 0 {
        0
    } else {
        (status / 100).clamp(1, 5) as usize
    }
}

pub(super) fn reset_if_set(cell: &AtomicU32) {
    // Skip the store on the common path so a healthy node's line is not dirtied twice.
    if cell.load(Ordering::Relaxed) != 0 {
        cell.store(0, Ordering::Relaxed);
    }
}

/// A report's arguments.
#[derive(Clone, Copy)]
struct Reported {
    node: u32,
    status: u32,
    latency_us: u32,
    retry_after_ms: u32,
}

/// A reported try, as the failure and 429 path needs it.
struct Try {
    slot: u32,
    status: u32,
    retry_after_ms: u32,
    /// The node's in-flight count before this try gave its own back.
    inflight: u32,
    now: u64,
}

#[cold]
fn unknown_node(node: u32) -> Error {
    Error::Invalid(format!("unknown node slot {node}"))
}

/// Feed `sample` to node `n`'s peak EWMA: one CAS on the packed (cost, stamp) word; a
/// lost race retries with the winner's value, so no sample is dropped. No store when
/// the word stays the same (no time passed and the sample is not a new peak).
fn feed(n: &NodeSlot, sample: f64, now: u64, tau: u32) {
    let _ = n.ewma.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |word| {
        let (cost, stamp) = load::unpack(word);
        let next = load::pack(load::observe(cost, stamp, sample, now, tau), now);
        (next != word).then_some(next)
    });
}

impl Balancer {
    /// Report the outcome of one try handed out by `pick`: `status` is the HTTP status
    /// (0 when no response came: connect error, timeout, reset; 499 when the client
    /// left first, which only releases the try), `latency_us` the time to the
    /// response, `retry_after_ms` the server's Retry-After (0 if none).
    ///
    /// Updates, exactly once per try: in-flight, counters, the peak EWMA (failures and
    /// 429s as penalties), the learned concurrency limit, 429 cooldowns (quota) and
    /// outlier ejection (consecutive failures).
    pub fn report(&self, node: u32, status: u32, latency_us: u32, retry_after_ms: u32) -> Result<(), Error> {
        let worker = self.worker_slot();
        let r = Reported {
            node,
            status,
            latency_us,
            retry_after_ms,
        };
        // One copy of the body per writer, so that its statistics do not test it at
        // every add.
        match self.tally(worker) {
            (row, Writer::Owned) => self.report_as(Writer::Owned, row, worker, r),
            (row, Writer::Shared) => self.report_as(Writer::Shared, row, worker, r),
        }
    }

    /// `report`, adding to tally row `row` as `writer`, for worker `worker`.
    #[inline(always)]
    fn report_as(&self, writer: Writer, row: u32, worker: Option<u32>, r: Reported) -> Result<(), Error> {
        let Reported {
            node,
            status,
            latency_us,
            retry_after_ms,
        } = r;
        // The node's slot, its tally row, its served concurrency and this worker's
        // share from one check.
        let Some(NodeRow {
            slot: n,
            tally: nt,
            served,
            share,
        }) = self
            .region
            .node_row(row, node, worker)
            .filter(|r| r.slot.flags.load(Ordering::Relaxed) & (flags::IN_USE | flags::REMOVED) != 0)
        else {
            return Err(unknown_node(node));
        };
        // Counted before the in-flight count goes back, so that a reader who sees no
        // try in flight sees every reported one (`requests` = picks - in flight).
        let class = status_class(status);
        writer.add(&nt.status_class[class], 1);
        // A node removed since its pick still gets its in-flight count back. The value
        // before is the concurrency this answer came at (this try included). Given
        // back here rather than when the report ends: one atomic step makes that value
        // exact when several workers report at once, which the learned limit needs
        // (deferred, concurrent 429s each counted the others' tries and learned a
        // higher limit). Statistics below may lag a reader who sees none in flight.
        let inflight = saturating_sub(&n.inflight, 1);
        if let Some(share) = share {
            saturating_sub(share, 1);
        }
        let pool = n.pool.load(Ordering::Relaxed);
        let Some((ps, pt)) = self.region.pool_row(row, pool) else {
            return Ok(());
        };
        if load::is_cancelled(status) {
            return Ok(());
        }
        let now = clock::now_ms();
        // From the class: no response and 5xx (`load::is_failure`) are classes 0 and 5.
        let event = match class {
            0 | 5 => Event::Failure,
            4 if status == 429 => Event::Busy,
            _ => Event::Ok,
        };
        window::record(
            &pt.window,
            now,
            ps.window_ms.load(Ordering::Relaxed),
            event,
            writer,
        );
        budget::add(
            &nt.recent,
            now,
            RECENT_WINDOW_MS,
            (1, (event != Event::Ok) as u64),
            writer,
        );
        let tau = ps.decay_ms.load(Ordering::Relaxed);
        if event != Event::Ok {
            let t = Try {
                slot: node,
                status,
                retry_after_ms,
                inflight,
                now,
            };
            match self.unserved(n, ps, event, &t) {
                Feed::Sample(sample) => {
                    feed(n, sample, now, tau);
                    // A failure or a 429 costs a node with stream signals too.
                    signals::penalize(n, sample, now, tau);
                }
                // A node taken out for a while (cooldown, ejection) comes back as
                // unknown: costed at the pool median and ramped up by slow start, rather
                // than carrying a penalty that would keep p2c from ever trying it again.
                Feed::Forget => {
                    n.ewma.store(0, Ordering::Relaxed);
                    signals::forget(n);
                }
                Feed::Skip => {}
            }
            return Ok(());
        }
        // A served try (`Shed` is never the outcome of a try): the common path, kept
        // to loads of words that stay 0 on a healthy node, plus its statistics.
        let b = latency_bucket(latency_us);
        writer.add(&nt.latency_hist[b], 1);
        node::note_served(served, inflight);
        writer.add(&nt.latency_sum_us, latency_us as u64);
        reset_if_set(&n.consecutive_failures);
        reset_if_set(&n.consecutive_busy);
        if n.out_since_ms.load(Ordering::Relaxed) != 0 {
            self.notice_back(node, n, now);
        }
        if n.limit.load(Ordering::Relaxed) != 0 {
            let (every, max) = (
                ps.limit_increase_every.load(Ordering::Relaxed),
                ps.limit_max.load(Ordering::Relaxed),
            );
            let fleet_inflight = inflight + crate::fleet::remote_inflight(n, now);
            let _ = n.limit.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| {
                Some(limit::limit_after_success(l, fleet_inflight, every, max))
            });
        }
        if n.ejections.load(Ordering::Relaxed) != 0
            && now
                > n.ejected_until_ms.load(Ordering::Relaxed) + ps.eject_max_ms.load(Ordering::Relaxed) as u64
        {
            n.ejections.store(0, Ordering::Relaxed);
        }
        feed(n, load::served_us(latency_us), now, tau);
        Ok(())
    }

    /// A try that failed (no response, 5xx) or was answered 429: strikes, cooldowns,
    /// ejection and the learned limit; what its node's latency estimate takes from it.
    /// Off the served path so that path stays short.
    #[cold]
    #[inline(never)]
    fn unserved(&self, n: &NodeSlot, ps: &PoolSlot, event: Event, t: &Try) -> Feed {
        let &Try {
            slot: node,
            status,
            retry_after_ms,
            inflight,
            now,
        } = t;
        // The one place a node's Retry-After is bounded by the pool's policy: every use
        // below (quota or capacity, the cooldown, the penalty) sees the capped value.
        let retry_after_ms = retry_after_ms.min(ps.max_retry_after_ms.load(Ordering::Relaxed));
        let penalty_ms = ps.penalty_ms.load(Ordering::Relaxed);
        let cap_ms = ps.penalty_cap_ms.load(Ordering::Relaxed);
        if event == Event::Failure {
            let strikes = n.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
            let mut rested = false;
            if status == 503 && retry_after_ms > 0 {
                // An overloaded node that says when to come back: rest it that long.
                self.cool_down(node, n, ps, now, 1, Reason::Overloaded { retry_after_ms });
                rested = true;
            }
            let after = ps.eject_after.load(Ordering::Relaxed);
            if after > 0 && strikes >= after {
                rested |= self.eject(node, n, ps, now, strikes);
            }
            return if rested {
                Feed::Forget
            } else {
                Feed::Sample(load::sample_us(status, 0, retry_after_ms, penalty_ms, cap_ms))
            };
        }
        n.busy.fetch_add(1, Ordering::Relaxed);
        let strikes = n.consecutive_busy.fetch_add(1, Ordering::Relaxed) + 1;
        let limit = n.limit.load(Ordering::Relaxed);
        let kind = limit::classify_429(
            retry_after_ms,
            strikes,
            limit,
            ps.limit_enabled.load(Ordering::Relaxed) != 0,
            ps.limit_min.load(Ordering::Relaxed),
            ps.quota_retry_after_ms.load(Ordering::Relaxed),
            ps.quota_after.load(Ordering::Relaxed),
        );
        match kind {
            Busy::Quota => {
                let why = Reason::Quota {
                    retry_after_ms,
                    strikes,
                };
                self.cool_down(node, n, ps, now, strikes, why);
                Feed::Forget
            }
            Busy::Capacity => {
                node::note_refused(&self.region, node, inflight);
                let (min, max) = (
                    ps.limit_min.load(Ordering::Relaxed),
                    ps.limit_max.load(Ordering::Relaxed),
                );
                let _ = n.limit.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| {
                    Some(crate::fleet::after_busy(n, now, l, inflight, (min, max)))
                });
                // Counts against the cost as twice the node's mean served latency (at
                // most the penalty), not as a failure: the node is fine, just full. The
                // mean, not the estimate, so that repeated 429s do not compound.
                let c = tally::node_counts(&self.region, node);
                match c.latency_sum_us.checked_div(c.served()) {
                    Some(mean) if mean > 0 => {
                        Feed::Sample((2.0 * mean as f64).min(penalty_ms as f64 * 1000.0))
                    }
                    _ => Feed::Skip,
                }
            }
        }
    }

    /// Rest a node whose quota is spent (or that is overloaded, `why`); it comes back
    /// in slow start. The report that starts the cooldown announces it.
    pub(super) fn cool_down(
        &self,
        slot: u32,
        n: &NodeSlot,
        ps: &PoolSlot,
        now: u64,
        strikes: u32,
        why: Reason,
    ) {
        let retry_after_ms = match why {
            Reason::Quota { retry_after_ms, .. } | Reason::Overloaded { retry_after_ms } => retry_after_ms,
            _ => 0,
        };
        let ms = {
            let mut l = self.local.lock();
            retry::cooldown_ms(
                &mut l.rng,
                strikes,
                retry_after_ms,
                ps.honor_retry_after.load(Ordering::Relaxed) != 0,
                ps.cooldown_base_ms.load(Ordering::Relaxed),
                ps.cooldown_max_ms.load(Ordering::Relaxed),
            )
        };
        let until = now + ms as u64;
        // fetch_max: concurrent reports from other workers only ever lengthen it.
        let before = n.cooldown_until_ms.fetch_max(until, Ordering::Relaxed);
        if before < now {
            n.cooldowns_total.fetch_add(1, Ordering::Relaxed);
            self.notice_out(slot, n, now, notice::Kind::Cooling, why, ms as u64);
        }
        n.started_ms.fetch_max(until, Ordering::Relaxed);
    }

    /// Nodes cooling now (quota 429s): `(pool, node id, until)`, `until` in ms of the
    /// coarse monotonic clock. What the fleet sync publishes (`crate::cluster`).
    pub fn cooling(&self) -> Result<Vec<(String, String, u64)>, Error> {
        let now = clock::now_ms();
        let topo = self.topology()?;
        let mut out = Vec::new();
        for p in &topo.pools {
            for nt in &p.nodes {
                let until = self
                    .region
                    .node(nt.slot)
                    .map_or(0, |n| n.cooldown_until_ms.load(Ordering::Relaxed));
                if until > now {
                    out.push((p.name.clone(), nt.id.clone(), until));
                }
            }
        }
        Ok(out)
    }

    /// Cool node `slot` for `for_ms` from now, a cooldown another gateway learned
    /// (`crate::cluster`), unless it already cools longer: never shortened. `for_ms`
    /// is capped at the pool's `cooldown.max_retry_after_ms` (a value from outside).
    /// True when this lengthened it.
    pub fn cool_from_fleet(&self, slot: u32, for_ms: u64) -> Result<bool, Error> {
        let n = self.live_node(slot)?;
        let cap = self
            .region
            .pool(n.pool.load(Ordering::Relaxed))
            .map_or(60_000, |ps| ps.max_retry_after_ms.load(Ordering::Relaxed)) as u64;
        let now = clock::now_ms();
        let for_ms = for_ms.min(cap);
        let until = now + for_ms;
        let before = n.cooldown_until_ms.fetch_max(until, Ordering::Relaxed);
        if before >= until {
            return Ok(false);
        }
        if before < now {
            self.region
                .header()
                .cluster_cooldowns_in
                .fetch_add(1, Ordering::Relaxed);
            self.notice_out(slot, n, now, notice::Kind::Cooling, Reason::Fleet, for_ms);
        }
        n.started_ms.fetch_max(until, Ordering::Relaxed);
        Ok(true)
    }

    /// Record one cluster sync round: whether it succeeded and, if so, the gateways
    /// the fleet counts now.
    pub fn record_cluster_round(&self, ok: bool, gateways: u64) {
        let h = self.region.header();
        if ok {
            h.cluster_syncs.fetch_add(1, Ordering::Relaxed);
            h.cluster_gateways.store(gateways, Ordering::Relaxed);
            h.cluster_last_ok_ms.store(clock::now_ms(), Ordering::Relaxed);
        } else {
            h.cluster_errors.fetch_add(1, Ordering::Relaxed);
        }
        h.cluster_up.store(u32::from(ok), Ordering::Relaxed);
    }

    /// The cluster sync's figures (all 0 without a `cluster` section).
    pub fn cluster_stats(&self) -> ClusterStats {
        let h = self.region.header();
        ClusterStats {
            up: h.cluster_up.load(Ordering::Relaxed) != 0,
            gateways: h.cluster_gateways.load(Ordering::Relaxed),
            syncs: h.cluster_syncs.load(Ordering::Relaxed),
            errors: h.cluster_errors.load(Ordering::Relaxed),
            cooldowns_in: h.cluster_cooldowns_in.load(Ordering::Relaxed),
            last_ok_age_ms: match h.cluster_last_ok_ms.load(Ordering::Relaxed) {
                0 => None,
                t => Some(clock::now_ms().saturating_sub(t)),
            },
        }
    }

    /// Node `slot` was just taken out by this process (it won the transition): it is
    /// out since now unless it already was, and the error log hears of it once.
    fn notice_out(&self, slot: u32, n: &NodeSlot, now: u64, kind: notice::Kind, why: Reason, for_ms: u64) {
        // Relaxed: a value of its own; the swap in `notice_back` decides who announces.
        let _ = n
            .out_since_ms
            .compare_exchange(0, now.max(1), Ordering::Relaxed, Ordering::Relaxed);
        self.notify(slot, n, now, kind, why, for_ms);
    }

    /// A served try on node `slot`, which was out (the caller saw its "out since" set):
    /// if it is not out now, the one report that swaps that back to 0 announces it is
    /// back.
    #[cold]
    #[inline(never)]
    fn notice_back(&self, slot: u32, n: &NodeSlot, now: u64) {
        if n.out_since_ms.load(Ordering::Relaxed) == 0 || node::taken_out(n, now) {
            // Not out, or still out (a try picked before it went out).
            return;
        }
        // Relaxed: the one swap that sees the non-zero value announces; nothing else
        // rides on the word.
        let since = n.out_since_ms.swap(0, Ordering::Relaxed);
        if since != 0 {
            let out_ms = now.saturating_sub(since);
            self.notify(slot, n, now, notice::Kind::Back, Reason::Served { out_ms }, 0);
        }
    }

    /// Queue a notice for this process's log timer, unless the node's rate limit for
    /// `kind` (shared by every worker) suppresses it.
    fn notify(&self, slot: u32, n: &NodeSlot, now: u64, kind: notice::Kind, why: Reason, for_ms: u64) {
        let word = &n.notices[kind as usize];
        // Relaxed: the word is the whole state of the limit; the successful update's
        // previous value decides, whoever raced it.
        let Ok(prev) = word.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| {
            Some(notice::admit(w, now, notice::INTERVAL_MS).0)
        }) else {
            return;
        };
        if let Some(suppressed) = notice::admit(prev, now, notice::INTERVAL_MS).1 {
            self.notices.lock().push(Notice {
                kind,
                slot,
                reason: why,
                for_ms,
                suppressed,
            });
        }
    }

    /// The node transitions this process announced since the last call, and how many
    /// it dropped for want of room ([`notice::QUEUE_MAX`]): for a timer to log.
    pub fn take_notices(&self) -> (Vec<Notice>, u64) {
        self.notices.lock().take()
    }

    /// Eject a node after consecutive failures, unless that would eject more than the
    /// pool's `max_ejected_percent` of its tier. Only one reporter ejects it. True when
    /// the node is ejected now.
    pub(super) fn eject(&self, slot: u32, n: &NodeSlot, ps: &PoolSlot, now: u64, strikes: u32) -> bool {
        let current = n.ejected_until_ms.load(Ordering::Relaxed);
        if current > now {
            return true;
        }
        let mut l = self.local.lock();
        // Any handle may report (not only the one that picked): bring its tables up to
        // date so the tier it counts is the current one.
        if self.sync(&mut l).is_err() {
            return false;
        }
        let Local { pools, rng, .. } = &mut *l;
        let Some(p) = pools
            .get(n.pool.load(Ordering::Relaxed) as usize)
            .and_then(Option::as_ref)
        else {
            return false;
        };
        let tier = if p.backup.slots.contains(&slot) {
            &p.backup
        } else {
            &p.primary
        };
        let ejected = tier
            .slots
            .iter()
            .filter(|&&s| {
                self.region
                    .node(s)
                    .is_some_and(|x| x.ejected_until_ms.load(Ordering::Relaxed) > now)
            })
            .count();
        let max_pct = ps.eject_max_percent.load(Ordering::Relaxed) as usize;
        if (ejected + 1) * 100 > max_pct * tier.slots.len() {
            return false;
        }
        let k = n.ejections.load(Ordering::Relaxed);
        let ms = retry::ejection_ms(
            rng,
            k,
            ps.eject_base_ms.load(Ordering::Relaxed),
            ps.eject_max_ms.load(Ordering::Relaxed),
        );
        let until = now + ms as u64;
        let won = n
            .ejected_until_ms
            .compare_exchange(current, until, Ordering::Relaxed, Ordering::Relaxed);
        if won.is_ok() {
            n.ejections.fetch_add(1, Ordering::Relaxed);
            n.ejections_total.fetch_add(1, Ordering::Relaxed);
            n.consecutive_failures.store(0, Ordering::Relaxed);
            n.started_ms.fetch_max(until, Ordering::Relaxed);
            drop(l);
            self.notice_out(
                slot,
                n,
                now,
                notice::Kind::Ejected,
                Reason::Failures { strikes },
                ms as u64,
            );
        }
        // Ejected, by us or by a concurrent reporter.
        n.ejected_until_ms.load(Ordering::Relaxed) > now
    }

    /// Take or renew the region-wide health-check lease for `ttl_ms`. True when this
    /// process holds it; a holder that died or let it expire is replaced.
    pub fn health_lease(&self, ttl_ms: u64) -> bool {
        let h = self.region.header();
        lease(&h.health_pid, &h.health_until_ms, ttl_ms)
    }

    /// Take or renew the region-wide cluster-sync lease (`crate::cluster`), as
    /// [`health_lease`](Self::health_lease).
    pub fn cluster_lease(&self, ttl_ms: u64) -> bool {
        let h = self.region.header();
        lease(&h.cluster_pid, &h.cluster_until_ms, ttl_ms)
    }

    /// Take or renew the region-wide discovery lease (`crate::discovery`), as
    /// [`health_lease`](Self::health_lease).
    pub fn discovery_lease(&self, ttl_ms: u64) -> bool {
        let h = self.region.header();
        lease(&h.discovery_pid, &h.discovery_until_ms, ttl_ms)
    }

    /// Whether this process holds the discovery lease now (not renewing it).
    pub fn holds_discovery_lease(&self) -> bool {
        let h = self.region.header();
        h.discovery_pid.load(Ordering::Acquire) == std::process::id() as i32
            && clock::now_ms() < h.discovery_until_ms.load(Ordering::Acquire)
    }

    /// Whether this process holds the cluster-sync lease now (not renewing it).
    pub fn holds_cluster_lease(&self) -> bool {
        let h = self.region.header();
        h.cluster_pid.load(Ordering::Acquire) == std::process::id() as i32
            && clock::now_ms() < h.cluster_until_ms.load(Ordering::Acquire)
    }

    /// Record one active probe of a node; returns whether it flipped up or down.
    pub fn health_report(&self, node: u32, passed: bool) -> Result<Flip, Error> {
        let n = self.live_node(node)?;
        let topo = self.topology()?;
        let h = topo
            .pool_of(node)
            .and_then(|p| p.policy.health.clone())
            .unwrap_or_default();
        let (ok, fail) = if passed {
            n.health_fail.store(0, Ordering::Relaxed);
            (n.health_ok.fetch_add(1, Ordering::Relaxed) + 1, 0)
        } else {
            n.health_ok.store(0, Ordering::Relaxed);
            (0, n.health_fail.fetch_add(1, Ordering::Relaxed) + 1)
        };
        let down = n.flags.load(Ordering::Relaxed) & flags::DOWN != 0;
        let flip = health::health_flip(down, passed, ok, fail, h.healthy, h.unhealthy);
        match flip {
            // Release (both arms) pairs with the Acquire flag loads (`live_node`,
            // `reusable`); DOWN is read on its own on the pick path (Relaxed): nothing
            // rides on it.
            Flip::Up => {
                n.flags.fetch_and(!flags::DOWN, Ordering::Release);
                n.started_ms.store(clock::now_ms(), Ordering::Relaxed);
            }
            Flip::Down => {
                n.flags.fetch_or(flags::DOWN, Ordering::Release);
            }
            Flip::None => {}
        }
        Ok(flip)
    }
}

/// Take or renew a region-wide lease (`owner` pid, `until` ms) for `ttl_ms`: true when
/// this process holds it; a holder that died or let it expire is replaced.
fn lease(owner_word: &AtomicI32, until: &AtomicU64, ttl_ms: u64) -> bool {
    let me = std::process::id() as i32;
    let now = clock::now_ms();
    // Acquire pairs with the CAS and the Release renewal below (another process's):
    // the owner and the lease's end are values only, nothing else rides on them.
    let owner = owner_word.load(Ordering::Acquire);
    let expired = now >= until.load(Ordering::Acquire);
    let take = owner == me
        || ((owner == 0 || expired || !crate::shm::pid_alive(owner))
            && owner_word
                // AcqRel, though only the winner matters: it pairs with the loads above.
                .compare_exchange(owner, me, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok());
    if take {
        // Release pairs with the Acquire loads above: the claim comes with its end.
        until.store(now + ttl_ms, Ordering::Release);
    }
    take
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The 2xx shortcut gives the division's class, and the report's event from the
    /// class is `load::is_failure`'s verdict, for every status nginx can report.
    #[test]
    fn status_class_and_its_event_match_the_status() {
        for status in 0..=1_000u32 {
            let class = status_class(status);
            let divided = if status == 0 {
                0
            } else {
                (status / 100).clamp(1, 5) as usize
            };
            assert_eq!(class, divided, "{status}");
            assert_eq!(matches!(class, 0 | 5), load::is_failure(status), "{status}");
        }
    }
}
