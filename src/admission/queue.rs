//! The admission queue in the shared region: entries, tickets, dispatch, and the
//! per-worker admission shares (the design: `crate::admission`). It knows the shared
//! region and the admission config only, not the balancer, so the shared-memory
//! layer can hand it the workers it reaps.

use std::sync::atomic::{AtomicU32, Ordering};

use crate::shm::layout::{
    bucket_of, entry, PoolSlot, PoolTally, QueueEntry, QueuePool, PRIORITIES, QUEUE_WAIT_BOUNDS_MS,
};
use crate::shm::{saturating_sub, Region};
use crate::tally::Writer;
use crate::window::{self, Event};

/// An entry older than its max wait by this much has lost its owner: anyone frees it.
pub const GRACE_MS: u64 = 5_000;
/// Capacity when some available node has no learned limit.
pub const UNLIMITED: u32 = u32::MAX;

/// What a pool can take at once. `probe` is the sum of the learned limits; `safe`
/// counts each node only up to the highest concurrency it has answered a success at.
/// The difference is the AIMD probe: a limit that just grew by one is a guess that
/// costs a 429 when wrong, so a slot above `safe` goes to the *lowest*-ranked waiter,
/// and the best waiters are only given confirmed slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cap {
    pub safe: u32,
    pub probe: u32,
}

impl Cap {
    /// Both capacities together ([`UNLIMITED`] stays unlimited).
    pub fn plus(self, o: Cap) -> Cap {
        let add = |a: u32, b: u32| {
            if a == UNLIMITED || b == UNLIMITED {
                UNLIMITED
            } else {
                a.saturating_add(b).min(UNLIMITED - 1)
            }
        };
        Cap {
            safe: add(self.safe, o.safe),
            probe: add(self.probe, o.probe),
        }
    }
}

impl From<u32> for Cap {
    fn from(n: u32) -> Cap {
        Cap { safe: n, probe: n }
    }
}
/// Most admissions one dispatch makes (bounds the work of one call).
const DISPATCH_MAX: u32 = 64;
/// Stale entries are looked for at most this often when no slot is free (when one is,
/// every dispatch scan frees those it passes).
const SWEEP_EVERY_MS: u64 = 100;

/// What an arrival or a poll comes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Go on: an admission is held (release it in the log phase).
    Go,
    /// Go on into a probe slot (see [`Cap`]): as `Go`, and the try should go to a node
    /// at its probe, so that it, not a better-ranked request, meets a refusal.
    GoProbe,
    /// Waiting in entry `entry` with `ticket`: poll again.
    Queued { entry: u32, ticket: u64 },
    /// Still waiting.
    Wait,
    /// Refused: queue (or class) full.
    Full,
    /// Refused: waited `max_wait_ms` (or the entry was reclaimed).
    TimedOut,
    /// Refused: pushed out by a higher-priority arrival.
    Evicted,
}

fn pack(ticket: u64, state: u64) -> u64 {
    (ticket << 8) | state
}

fn state_of(word: u64) -> u64 {
    word & 0xff
}

fn ticket_of(word: u64) -> u64 {
    word >> 8
}

fn pidx(priority: u32) -> usize {
    (priority.clamp(1, PRIORITIES as u32) - 1) as usize
}

/// One pool's queue: its parameters and counters, its pool slot, its entries.
pub struct Queue<'a> {
    pub qp: &'a QueuePool,
    pub ps: &'a PoolSlot,
    pub entries: &'a [QueueEntry],
    /// The pool's statistics in the shared tally row (refusals are counted there).
    pub tally: &'a PoolTally,
}

/// A waiting entry as a dispatcher sees it.
struct Candidate {
    index: usize,
    word: u64,
    priority: u32,
    enqueued_ms: u64,
}

impl<'a> Queue<'a> {
    /// The queue of pool `p` in `region`.
    pub fn of(region: &'a Region, p: u32) -> Option<Queue<'a>> {
        Some(Queue {
            qp: region.queue_pool(p)?,
            ps: region.pool(p)?,
            entries: region.queue_entries(p)?,
            tally: region.pool_tally(region.capacity().max_workers, p)?,
        })
    }

    /// `Err` naming `index` when it is not an entry of this queue (a caller's bug:
    /// an entry from `rsb_admit` is always in range).
    pub fn check_entry(&self, index: u32) -> Result<(), String> {
        if (index as usize) < self.entries.len() {
            return Ok(());
        }
        Err(format!(
            "queue entry {index} is out of range 0..{}",
            self.entries.len()
        ))
    }

    fn in_use(&self) -> &'a [QueueEntry] {
        // Relaxed: a bound on the entries to scan, raised before an entry is published;
        // each entry's word (Acquire) is what publishes its fields. A stale bound only
        // skips an entry for one scan, as a scan racing its publication would.
        let hw = (self.qp.high_water.load(Ordering::Relaxed) as usize).min(self.entries.len());
        &self.entries[..hw]
    }

    /// The waiting entries: (ticket, priority, queued at). What the cluster sync
    /// mirrors into the fleet's queue (`crate::cluster`); not for the request path.
    pub fn waiting(&self) -> impl Iterator<Item = (u64, u32, u64)> + 'a {
        self.in_use().iter().filter_map(|e| {
            // Acquire pairs with the Release INIT -> WAITING in `enter`: the fields
            // read below are this ticket's.
            let w = e.word.load(Ordering::Acquire);
            (state_of(w) == entry::WAITING).then(|| {
                (
                    ticket_of(w),
                    e.priority.load(Ordering::Relaxed),
                    e.enqueued_ms.load(Ordering::Relaxed),
                )
            })
        })
    }

    /// Reserve one slot if `admitted < cap`. Two reservers can never both take the
    /// last slot: each try is one compare-exchange on the count.
    pub fn reserve(&self, cap: u32) -> bool {
        // Relaxed: the atomicity of the read-modify-write is what orders reservations
        // (one modification order per cell), not the memory ordering; the count is the
        // only data, the entries' words carry everything else.
        self.qp
            .admitted
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |a| {
                (a < cap).then_some(a + 1)
            })
            .is_ok()
    }

    fn unreserve(&self) {
        saturating_sub(&self.qp.admitted, 1);
    }

    fn max_wait_ms(&self, priority: u32) -> u64 {
        self.qp.max_wait_ms[pidx(priority)].load(Ordering::Relaxed) as u64
    }

    fn aging_ms(&self) -> u64 {
        self.qp.aging_ms.load(Ordering::Relaxed).into()
    }

    /// Priority after aging, capped at 10.
    fn effective(&self, priority: u32, enqueued_ms: u64, now: u64) -> u32 {
        super::fleet::effective(priority, enqueued_ms, self.aging_ms(), now)
    }

    /// Whether a better waiter at another gateway holds a slot back from a local one
    /// of `priority` queued at `since` (cluster mode: `crate::admission::fleet`).
    fn fleet_holds(&self, priority: u32, since: u64, now: u64) -> bool {
        super::fleet::holds(&self.ps.fleet, priority, since, self.aging_ms(), now)
    }

    /// Bookkeeping of an entry that stops waiting.
    fn left_waiting(&self, priority: u32) {
        saturating_sub(&self.qp.waiting[pidx(priority)], 1);
        saturating_sub(&self.ps.queue_len, 1);
    }

    fn waiting_in_class(&self, class: u32) -> u32 {
        (0..PRIORITIES)
            .filter(|&i| self.qp.class_of[i].load(Ordering::Relaxed) == class)
            .map(|i| self.qp.waiting[i].load(Ordering::Relaxed))
            .sum()
    }

    /// A request of `priority` arrives at `now`, the pool able to take `cap` at once.
    /// Goes on at once when nobody waits and a slot is free; else joins the queue
    /// (evicting a lower priority when the queue is full). `share` is the caller's
    /// admission share, raised with every admission it takes.
    pub fn enter(
        &self,
        priority: u32,
        cap: impl Into<Cap>,
        now: u64,
        pid: i32,
        worker: u32,
        share: Option<&AtomicU32>,
    ) -> Step {
        let cap = cap.into();
        // Relaxed: the queue length is a count read on its own (a hint whether anyone
        // waits); entries are found through their words.
        if self.ps.queue_len.load(Ordering::Relaxed) == 0
            && !self.fleet_holds(priority, now, now)
            && self.reserve(cap.safe)
        {
            if let Some(s) = share {
                s.fetch_add(1, Ordering::Relaxed);
            }
            return Step::Go;
        }
        let i = pidx(priority);
        let class = self.qp.class_of[i].load(Ordering::Relaxed);
        let class_max = self.qp.class_max_queue[class as usize % PRIORITIES].load(Ordering::Relaxed);
        if self.waiting_in_class(class) >= class_max && !self.evict_below(priority, Some(class)) {
            return Step::Full;
        }
        if self.ps.queue_len.load(Ordering::Relaxed) >= self.qp.max_queue.load(Ordering::Relaxed)
            && !self.evict_below(priority, None)
        {
            return Step::Full;
        }
        let mut ticket = self.qp.seq.fetch_add(1, Ordering::Relaxed) + 1;
        for (k, e) in self.entries.iter().enumerate() {
            // Relaxed: a pre-check; the claiming CAS below synchronizes.
            let w = e.word.load(Ordering::Relaxed);
            if state_of(w) != entry::FREE {
                continue;
            }
            // AcqRel: the Acquire half pairs with the Release of the transition that
            // freed the entry (`poll`, `leave`, `reclaim`), so the previous owner's
            // reads of the fields come before our stores below.
            if e.word
                .compare_exchange(w, pack(ticket, entry::INIT), Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
            {
                continue;
            }
            e.enqueued_ms.store(now, Ordering::Relaxed);
            e.priority.store(priority, Ordering::Relaxed);
            e.pid.store(pid, Ordering::Relaxed);
            e.worker.store(worker, Ordering::Relaxed);
            // Relaxed: a bound only (see `in_use`).
            self.qp.high_water.fetch_max(k as u32 + 1, Ordering::Relaxed);
            // Counted before it is published, so a dispatcher that admits it at once
            // never decrements a count that does not include it yet.
            self.qp.waiting[i].fetch_add(1, Ordering::Relaxed);
            // Relaxed: a count (see `enter`'s first check).
            self.ps.queue_len.fetch_add(1, Ordering::Relaxed);
            // Release: the fields and counts above are visible to whoever sees it
            // WAITING (the Acquire loads of the word in `best`, `evict_below`, `sweep`,
            // `poll`, `leave` and `reap_owner`).
            if e.word
                .compare_exchange(
                    pack(ticket, entry::INIT),
                    pack(ticket, entry::WAITING),
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_err()
            {
                // Reclaimed under us (a reaper took the previous owner's pid for ours).
                self.left_waiting(priority);
                ticket = self.qp.seq.fetch_add(1, Ordering::Relaxed) + 1;
                continue;
            }
            self.dispatch(cap, now);
            return match self.poll(k as u32, ticket, cap, now, share) {
                Step::Wait => Step::Queued {
                    entry: k as u32,
                    ticket,
                },
                other => other,
            };
        }
        Step::Full
    }

    /// Evict the lowest-priority, youngest waiter below `priority` (of `class` only, if
    /// given: to make room in a full class). True if one was.
    fn evict_below(&self, priority: u32, class: Option<u32>) -> bool {
        for _ in 0..4 {
            let mut victim: Option<(usize, u64, u32)> = None;
            for (k, e) in self.in_use().iter().enumerate() {
                // Acquire pairs with the Release INIT -> WAITING in `enter`: the
                // priority read below is the waiter's.
                let w = e.word.load(Ordering::Acquire);
                if state_of(w) != entry::WAITING {
                    continue;
                }
                let p = e.priority.load(Ordering::Relaxed);
                if p >= priority
                    || class.is_some_and(|c| self.qp.class_of[pidx(p)].load(Ordering::Relaxed) != c)
                {
                    continue;
                }
                let better =
                    victim.is_none_or(|(_, vw, vp)| p < vp || (p == vp && ticket_of(w) > ticket_of(vw)));
                if better {
                    victim = Some((k, w, p));
                }
            }
            let Some((k, w, p)) = victim else { return false };
            if self.entries[k]
                .word
                .compare_exchange(
                    w,
                    pack(ticket_of(w), entry::EVICTED),
                    // AcqRel, kept in doubt: the Release pairs with the owner's Acquire
                    // load in `poll`, though it publishes no field (the verdict is the
                    // word itself).
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_ok()
            {
                self.left_waiting(p);
                self.ps.queue_evicted_total.fetch_add(1, Ordering::Relaxed);
                return true;
            }
        }
        false
    }

    /// The best (or, `worst`, the lowest-ranked) waiting entry at `now`, freeing the
    /// stale entries it passes.
    fn best(&self, now: u64, worst: bool) -> Option<Candidate> {
        let mut best: Option<(u32, Candidate)> = None;
        for (k, e) in self.in_use().iter().enumerate() {
            // Acquire pairs with the Release INIT -> WAITING in `enter`: the fields read
            // below are this ticket's.
            let w = e.word.load(Ordering::Acquire);
            let st = state_of(w);
            if st == entry::FREE || st == entry::INIT {
                continue;
            }
            let priority = e.priority.load(Ordering::Relaxed);
            let enqueued_ms = e.enqueued_ms.load(Ordering::Relaxed);
            if now > enqueued_ms + self.max_wait_ms(priority) + GRACE_MS {
                self.reclaim(e, w, priority);
                continue;
            }
            if st != entry::WAITING {
                continue;
            }
            let eff = self.effective(priority, enqueued_ms, now);
            let better = best.as_ref().is_none_or(|(be, bc)| {
                let ahead = eff > *be || (eff == *be && ticket_of(w) < ticket_of(bc.word));
                ahead != worst
            });
            if better {
                best = Some((
                    eff,
                    Candidate {
                        index: k,
                        word: w,
                        priority,
                        enqueued_ms,
                    },
                ));
            }
        }
        best.map(|(_, c)| c)
    }

    /// Free an entry whose owner is gone (dead, or silent far past its deadline).
    fn reclaim(&self, e: &QueueEntry, w: u64, priority: u32) {
        if e.word
            .compare_exchange(
                w,
                pack(ticket_of(w), entry::FREE),
                // Release pairs with the claiming CAS (Acquire) in `enter`: our reads of
                // the fields come before the next owner's stores.
                Ordering::AcqRel,
                Ordering::Relaxed,
            )
            .is_err()
        {
            return;
        }
        match state_of(w) {
            entry::WAITING => {
                self.left_waiting(priority);
                self.ps.queue_aborted_total.fetch_add(1, Ordering::Relaxed);
            }
            // Given a slot the owner never took over: give it back.
            entry::ADMITTED | entry::ADMITTED_PROBE => self.unreserve(),
            _ => {}
        }
    }

    /// Free stale entries (at most every `SWEEP_EVERY_MS`, by one caller at a time):
    /// an admission given to a vanished owner must come back even when no slot frees.
    fn sweep(&self, now: u64) {
        let last = self.qp.swept_ms.load(Ordering::Relaxed);
        if now < last + SWEEP_EVERY_MS
            || self
                .qp
                .swept_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        for e in self.in_use() {
            // Acquire pairs with the Release INIT -> WAITING in `enter` (fields below).
            let w = e.word.load(Ordering::Acquire);
            if state_of(w) == entry::FREE || state_of(w) == entry::INIT {
                continue;
            }
            let priority = e.priority.load(Ordering::Relaxed);
            if now > e.enqueued_ms.load(Ordering::Relaxed) + self.max_wait_ms(priority) + GRACE_MS {
                self.reclaim(e, w, priority);
            }
        }
    }

    /// Admit the best waiters while confirmed slots are free, then the lowest-ranked
    /// into a probe slot (see [`Cap`]). Returns how many were admitted.
    pub fn dispatch(&self, cap: impl Into<Cap>, now: u64) -> u32 {
        self.dispatch_held(cap.into(), now).0
    }

    /// As `dispatch`, and whether a confirmed slot was kept free for a better waiter
    /// at another gateway (the best local one is outranked there: `fleet_holds`).
    fn dispatch_held(&self, cap: Cap, now: u64) -> (u32, bool) {
        self.sweep(now);
        // While the fleet holds the slots, every waiter's poll comes here: without
        // aging, the best local priority is known from the counts, so the answer
        // costs a few loads instead of a reservation and a scan.
        if self.aging_ms() == 0 && self.qp.admitted.load(Ordering::Relaxed) < cap.safe {
            let top = (0..PRIORITIES)
                .rev()
                .find(|&i| self.qp.waiting[i].load(Ordering::Relaxed) > 0);
            if top.is_some_and(|i| self.fleet_holds(i as u32 + 1, now, now)) {
                return (0, true);
            }
        }
        let mut admitted = 0;
        for _ in 0..2 * DISPATCH_MAX {
            // Relaxed: a count, read on its own (see `enter`).
            if admitted >= DISPATCH_MAX || self.ps.queue_len.load(Ordering::Relaxed) == 0 {
                break;
            }
            let worst = if self.reserve(cap.safe) {
                false
            } else if self.reserve(cap.probe) {
                true
            } else {
                break;
            };
            let Some(c) = self.best(now, worst) else {
                self.unreserve();
                break;
            };
            if !worst && self.fleet_holds(c.priority, c.enqueued_ms, now) {
                self.unreserve();
                return (admitted, true);
            }
            let e = &self.entries[c.index];
            if e.word
                .compare_exchange(
                    c.word,
                    pack(
                        ticket_of(c.word),
                        if worst {
                            entry::ADMITTED_PROBE
                        } else {
                            entry::ADMITTED
                        },
                    ),
                    // AcqRel, kept in doubt: the Release pairs with the waiter's Acquire
                    // load in `poll`, though no field rides on it (the slot is the count).
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_ok()
            {
                self.left_waiting(c.priority);
                self.ps.queue_admitted_total.fetch_add(1, Ordering::Relaxed);
                let waited_ms = now.saturating_sub(c.enqueued_ms);
                self.ps.queue_wait_ms_sum.fetch_add(waited_ms, Ordering::Relaxed);
                // Counts, read on their own (`/metrics`): Relaxed, no lock.
                self.ps.queue_wait_hist[bucket_of(&QUEUE_WAIT_BOUNDS_MS, waited_ms * 1000)]
                    .fetch_add(1, Ordering::Relaxed);
                admitted += 1;
            } else {
                // It left, timed out or was taken by another dispatcher: try again.
                self.unreserve();
            }
        }
        (admitted, false)
    }

    /// A waiter's poll of its own entry: admitted (its admission now counts in
    /// `share`), evicted, timed out, or still waiting — in which case it dispatches if
    /// a slot is free (capacity can come back without a release: a cooldown ends).
    pub fn poll(
        &self,
        index: u32,
        ticket: u64,
        cap: impl Into<Cap>,
        now: u64,
        share: Option<&AtomicU32>,
    ) -> Step {
        let cap = cap.into();
        let Some(e) = self.entries.get(index as usize) else {
            return Step::TimedOut;
        };
        let mut dispatched = false;
        for _ in 0..8 {
            // Acquire pairs with the Release of `dispatch` (ADMITTED), `evict_below`
            // (EVICTED) and `enter` (WAITING, the fields read below).
            let w = e.word.load(Ordering::Acquire);
            if ticket_of(w) != ticket {
                return Step::TimedOut;
            }
            match state_of(w) {
                st @ (entry::ADMITTED | entry::ADMITTED_PROBE) => {
                    if let Some(s) = share {
                        s.fetch_add(1, Ordering::Relaxed);
                    }
                    // Release pairs with the claiming CAS (Acquire) in `enter`, as in
                    // `reclaim`.
                    if e.word
                        .compare_exchange(w, pack(ticket, entry::FREE), Ordering::AcqRel, Ordering::Relaxed)
                        .is_ok()
                    {
                        return if st == entry::ADMITTED_PROBE {
                            Step::GoProbe
                        } else {
                            Step::Go
                        };
                    }
                    // Reclaimed as stale meanwhile (its slot given back): not ours.
                    if let Some(s) = share {
                        saturating_sub(s, 1);
                    }
                }
                entry::EVICTED => {
                    // Release pairs with the claiming CAS in `enter`, as in `reclaim`.
                    let _ = e.word.compare_exchange(
                        w,
                        pack(ticket, entry::FREE),
                        Ordering::AcqRel,
                        Ordering::Relaxed,
                    );
                    return Step::Evicted;
                }
                entry::WAITING => {
                    let priority = e.priority.load(Ordering::Relaxed);
                    let deadline = e.enqueued_ms.load(Ordering::Relaxed) + self.max_wait_ms(priority);
                    if now >= deadline {
                        // Release pairs with the claiming CAS in `enter`, as in `reclaim`.
                        if e.word
                            .compare_exchange(
                                w,
                                pack(ticket, entry::FREE),
                                Ordering::AcqRel,
                                Ordering::Relaxed,
                            )
                            .is_ok()
                        {
                            self.left_waiting(priority);
                            self.ps.queue_timeouts_total.fetch_add(1, Ordering::Relaxed);
                            return Step::TimedOut;
                        }
                        continue;
                    }
                    if dispatched || self.dispatch(cap, now) == 0 {
                        return Step::Wait;
                    }
                    dispatched = true;
                }
                _ => return Step::TimedOut,
            }
        }
        Step::Wait
    }

    /// The client of entry `index` left: take it out of the queue (an admission it was
    /// given and had not taken over goes to the next waiter). True if it was queued.
    pub fn leave(&self, index: u32, ticket: u64, cap: impl Into<Cap>, now: u64) -> bool {
        let cap = cap.into();
        let Some(e) = self.entries.get(index as usize) else {
            return false;
        };
        loop {
            // Acquire pairs with the Release INIT -> WAITING in `enter` (the priority).
            let w = e.word.load(Ordering::Acquire);
            let st = state_of(w);
            if ticket_of(w) != ticket
                || !matches!(
                    st,
                    entry::WAITING | entry::ADMITTED | entry::ADMITTED_PROBE | entry::EVICTED
                )
            {
                return false;
            }
            // Read before the entry is freed: once FREE, the next owner may store its own.
            let priority = e.priority.load(Ordering::Relaxed);
            // Release pairs with the claiming CAS (Acquire) in `enter`, as in `reclaim`.
            if e.word
                .compare_exchange(w, pack(ticket, entry::FREE), Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
            {
                continue;
            }
            match st {
                entry::WAITING => self.left_waiting(priority),
                entry::ADMITTED | entry::ADMITTED_PROBE => {
                    self.unreserve();
                    self.dispatch(cap, now);
                }
                _ => return false,
            }
            self.ps.queue_aborted_total.fetch_add(1, Ordering::Relaxed);
            return true;
        }
    }

    /// A request admitted by this pool finished (log phase): give its slot to the best
    /// waiter, if any.
    pub fn release(&self, share: Option<&AtomicU32>, cap: impl Into<Cap>, now: u64) {
        let cap = cap.into();
        if let Some(s) = share {
            saturating_sub(s, 1);
        }
        self.unreserve();
        self.note_release(now);
        // Relaxed: a count, read on its own (see `enter`).
        if self.ps.queue_len.load(Ordering::Relaxed) > 0 && self.dispatch_held(cap, now).1 {
            // Counted here, once per slot freed, not at each waiter's poll.
            self.ps.fleet.holds.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn note_release(&self, now: u64) {
        let sec = now / 1000;
        let b = &self.qp.releases[(sec & 1) as usize];
        let _ = b.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| {
            Some(if w >> 32 == sec & 0xffff_ffff {
                w + 1
            } else {
                ((sec & 0xffff_ffff) << 32) | 1
            })
        });
    }

    /// Slots released per second: the last full second, or the current one if higher.
    pub fn release_rate(&self, now: u64) -> u64 {
        let sec = now / 1000;
        let count = |s: u64| {
            let w = self.qp.releases[(s & 1) as usize].load(Ordering::Relaxed);
            if w >> 32 == s & 0xffff_ffff {
                w & 0xffff_ffff
            } else {
                0
            }
        };
        count(sec.wrapping_sub(1)).max(count(sec))
    }

    /// Retry-After for a refused request (ms, whole seconds, 1..=60 s): the time for
    /// the waiters ahead plus this one to go at the recent release rate.
    pub fn retry_after_ms(&self, now: u64) -> u64 {
        let ahead = self.ps.queue_len.load(Ordering::Relaxed) as u64 + 1;
        let rate = self.release_rate(now).max(1);
        ahead.div_ceil(rate).clamp(1, 60) * 1000
    }

    /// Count a refusal: `shed_total` and the sliding window.
    pub fn refused(&self, now: u64) {
        self.ps.shed_total.fetch_add(1, Ordering::Relaxed);
        window::record(
            &self.tally.window,
            now,
            self.ps.window_ms.load(Ordering::Relaxed),
            Event::Shed,
            Writer::Shared,
        );
    }
}

/// Give back what worker slot `w` (owner `pid`, dead or detaching) held in every pool:
/// its admission shares and its queue entries. Called by `Region::reap_dead_workers`
/// and `Region::detach_worker`.
pub fn reap_owner(region: &Region, w: u32, pid: i32) {
    for p in 0..region.capacity().max_pools {
        let Some(q) = Queue::of(region, p) else { continue };
        if let Some(share) = region.admit_share(w, p) {
            // Relaxed: the share is a count and the swap's value the only data (as in
            // `Region::release_shares`).
            let held = share.swap(0, Ordering::Relaxed);
            if held > 0 {
                saturating_sub(&q.qp.admitted, held);
            }
        }
        for e in q.in_use() {
            // Acquire pairs with the Release INIT -> WAITING in `enter`: the pid and
            // priority read below are this ticket's.
            let word = e.word.load(Ordering::Acquire);
            if state_of(word) != entry::FREE && e.pid.load(Ordering::Relaxed) == pid {
                q.reclaim(e, word, e.priority.load(Ordering::Relaxed));
            }
        }
    }
}

/// A pool's admission state for status pages: admitted and waiting now, totals.
pub fn status_json(region: &Region, pool: u32) -> serde_json::Value {
    let Some(q) = Queue::of(region, pool) else {
        return serde_json::Value::Null;
    };
    let ld = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let waiting: Vec<u32> = q.qp.waiting.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    serde_json::json!({
        "enabled": q.qp.enabled.load(Ordering::Relaxed) != 0,
        "admitted": q.qp.admitted.load(Ordering::Relaxed),
        "queue_len": q.ps.queue_len.load(Ordering::Relaxed),
        "waiting_by_priority": waiting,
        "queue_admitted": ld(&q.ps.queue_admitted_total),
        "queue_timeouts": ld(&q.ps.queue_timeouts_total),
        "queue_evicted": ld(&q.ps.queue_evicted_total),
        "queue_aborted": ld(&q.ps.queue_aborted_total),
        "queue_wait_ms_sum": ld(&q.ps.queue_wait_ms_sum),
        "shed": ld(&q.ps.shed_total),
        "fleet": super::fleet::status_json(&q.ps.fleet, crate::shm::clock::now_ms()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::admission::cfg;
    use crate::config::AdmissionConfig;
    use crate::params::store_admission;
    use crate::shm::layout::Capacity;

    fn region() -> Region {
        Region::create(Capacity {
            max_pools: 2,
            max_nodes: 4,
            max_workers: 4,
            config_bytes: 4096,
            max_waiters: 8,
        })
        .unwrap()
    }

    fn queue<'a>(r: &'a Region, c: &AdmissionConfig) -> Queue<'a> {
        let q = Queue::of(r, 0).unwrap();
        store_admission(q.qp, c);
        q
    }

    fn queued(s: Step) -> (u32, u64) {
        match s {
            Step::Queued { entry, ticket } => (entry, ticket),
            other => panic!("expected Queued, got {other:?}"),
        }
    }

    #[test]
    fn goes_at_once_while_slots_are_free_then_queues() {
        let r = region();
        let q = queue(&r, &cfg(0, 8, &[(1, 1000, 8)]));
        let share = AtomicU32::new(0);
        assert_eq!(q.enter(5, 2, 0, 1, 0, Some(&share)), Step::Go);
        assert_eq!(q.enter(5, 2, 0, 1, 0, Some(&share)), Step::Go);
        let (e, t) = queued(q.enter(5, 2, 0, 1, 0, Some(&share)));
        assert_eq!(
            (
                q.qp.admitted.load(Ordering::Relaxed),
                share.load(Ordering::Relaxed)
            ),
            (2, 2)
        );
        assert_eq!(q.ps.queue_len.load(Ordering::Relaxed), 1);
        assert_eq!(q.poll(e, t, 2, 10, Some(&share)), Step::Wait);
        q.release(Some(&share), 2, 20);
        assert_eq!(q.poll(e, t, 2, 21, Some(&share)), Step::Go);
        assert_eq!(
            (
                q.qp.admitted.load(Ordering::Relaxed),
                share.load(Ordering::Relaxed)
            ),
            (2, 2)
        );
        assert_eq!(q.ps.queue_len.load(Ordering::Relaxed), 0);
        assert_eq!(q.ps.queue_admitted_total.load(Ordering::Relaxed), 1);
        assert_eq!(q.ps.queue_wait_ms_sum.load(Ordering::Relaxed), 20);
        // One wait of 20 ms: the histogram's `le 25 ms` bucket (not cumulative).
        let hist: Vec<u64> =
            q.ps.queue_wait_hist
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect();
        let mut want = vec![0; QUEUE_WAIT_BOUNDS_MS.len() + 1];
        want[2] = 1;
        assert_eq!(hist, want);
    }

    #[test]
    fn unlimited_capacity_never_queues() {
        let r = region();
        let q = queue(&r, &cfg(0, 8, &[(1, 1000, 8)]));
        for _ in 0..100 {
            assert_eq!(q.enter(1, UNLIMITED, 0, 1, 0, None), Step::Go);
        }
    }

    #[test]
    fn higher_class_first_fifo_within_a_class() {
        let r = region();
        let q = queue(&r, &cfg(0, 8, &[(1, 10_000, 8)]));
        assert_eq!(q.enter(5, 1, 0, 1, 0, None), Step::Go);
        let low1 = queued(q.enter(2, 1, 1, 1, 0, None));
        let low2 = queued(q.enter(2, 1, 2, 1, 0, None));
        let high1 = queued(q.enter(8, 1, 3, 1, 0, None));
        let high2 = queued(q.enter(8, 1, 4, 1, 0, None));
        let mut order = Vec::new();
        for k in 0..4u64 {
            q.release(None, 1, 10 + k);
            for (name, (e, t)) in [("low1", low1), ("low2", low2), ("high1", high1), ("high2", high2)] {
                if !order.contains(&name) && q.poll(e, t, 1, 10 + k, None) == Step::Go {
                    order.push(name);
                }
            }
        }
        assert_eq!(order, ["high1", "high2", "low1", "low2"]);
    }

    #[test]
    fn aging_promotes_a_long_waiter() {
        let r = region();
        // One level per 100 ms: a priority-2 waiter of 700 ms counts as 9.
        let q = queue(&r, &cfg(100, 8, &[(1, 10_000, 8)]));
        assert_eq!(q.enter(5, 1, 0, 1, 0, None), Step::Go);
        let low = queued(q.enter(2, 1, 0, 1, 0, None));
        let high = queued(q.enter(8, 1, 650, 1, 0, None));
        q.release(None, 1, 700);
        assert_eq!(q.poll(low.0, low.1, 1, 700, None), Step::Go, "aged 2+7 = 9 > 8");
        assert_eq!(q.poll(high.0, high.1, 1, 700, None), Step::Wait);
        // Equal effective priorities: the older ticket goes first.
        let r2 = region();
        let q2 = queue(&r2, &cfg(100, 8, &[(1, 10_000, 8)]));
        assert_eq!(q2.enter(5, 1, 0, 1, 0, None), Step::Go);
        let old = queued(q2.enter(2, 1, 0, 1, 0, None));
        let young = queued(q2.enter(8, 1, 600, 1, 0, None));
        q2.release(None, 1, 600);
        assert_eq!(q2.poll(young.0, young.1, 1, 600, None), Step::Wait);
        assert_eq!(
            q2.poll(old.0, old.1, 1, 600, None),
            Step::Go,
            "2+6 = 8 ties, older ticket wins"
        );
    }

    #[test]
    fn waits_are_bounded_per_class() {
        let r = region();
        let q = queue(&r, &cfg(0, 8, &[(1, 100, 8), (6, 1000, 8)]));
        assert_eq!(q.enter(5, 1, 0, 1, 0, None), Step::Go);
        let low = queued(q.enter(3, 1, 0, 1, 0, None));
        let high = queued(q.enter(7, 1, 0, 1, 0, None));
        assert_eq!(q.poll(low.0, low.1, 1, 99, None), Step::Wait);
        assert_eq!(q.poll(low.0, low.1, 1, 100, None), Step::TimedOut);
        assert_eq!(q.poll(high.0, high.1, 1, 100, None), Step::Wait);
        assert_eq!(q.poll(high.0, high.1, 1, 1000, None), Step::TimedOut);
        assert_eq!(q.ps.queue_timeouts_total.load(Ordering::Relaxed), 2);
        assert_eq!(q.ps.queue_len.load(Ordering::Relaxed), 0);
        // A timed-out ticket stays refused even once its entry is reused.
        let again = queued(q.enter(7, 1, 1000, 1, 0, None));
        assert_eq!(again.0, low.0, "the first free entry is reused");
        assert_eq!(q.poll(low.0, low.1, 1, 1001, None), Step::TimedOut);
    }

    #[test]
    fn full_queue_evicts_the_lowest_youngest_for_a_higher_arrival() {
        let r = region();
        let q = queue(&r, &cfg(0, 3, &[(1, 10_000, 3)]));
        assert_eq!(q.enter(5, 1, 0, 1, 0, None), Step::Go);
        let a = queued(q.enter(2, 1, 1, 1, 0, None));
        let b = queued(q.enter(2, 1, 2, 1, 0, None));
        let c = queued(q.enter(4, 1, 3, 1, 0, None));
        assert_eq!(
            q.enter(2, 1, 4, 1, 0, None),
            Step::Full,
            "no lower priority to evict"
        );
        let d = queued(q.enter(6, 1, 5, 1, 0, None));
        assert_eq!(
            q.poll(b.0, b.1, 1, 6, None),
            Step::Evicted,
            "lowest priority, youngest"
        );
        assert_eq!(q.poll(a.0, a.1, 1, 6, None), Step::Wait);
        assert_eq!(q.poll(c.0, c.1, 1, 6, None), Step::Wait);
        assert_eq!(q.poll(d.0, d.1, 1, 6, None), Step::Wait);
        assert_eq!(q.ps.queue_evicted_total.load(Ordering::Relaxed), 1);
        assert_eq!(q.ps.queue_len.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn a_full_class_refuses_its_own_arrivals_only() {
        let r = region();
        let q = queue(&r, &cfg(0, 8, &[(1, 10_000, 1), (5, 10_000, 8)]));
        assert_eq!(q.enter(5, 1, 0, 1, 0, None), Step::Go);
        let two = queued(q.enter(2, 1, 0, 1, 0, None));
        assert_eq!(
            q.enter(2, 1, 0, 1, 0, None),
            Step::Full,
            "class full, nobody lower in it"
        );
        let three = queued(q.enter(3, 1, 0, 1, 0, None));
        assert_eq!(
            q.poll(two.0, two.1, 1, 1, None),
            Step::Evicted,
            "made room in its class"
        );
        let four = queued(q.enter(4, 1, 0, 1, 0, None));
        assert_eq!(q.poll(three.0, three.1, 1, 1, None), Step::Evicted);
        // The other class has room of its own: nobody is evicted for it.
        let nine = queued(q.enter(9, 1, 0, 1, 0, None));
        assert_eq!(q.poll(four.0, four.1, 1, 1, None), Step::Wait);
        assert_eq!(q.poll(nine.0, nine.1, 1, 1, None), Step::Wait);
    }

    #[test]
    fn released_slots_are_never_overshot() {
        let r = region();
        let q = queue(&r, &cfg(0, 8, &[(1, 10_000, 8)]));
        for _ in 0..3 {
            assert_eq!(q.enter(5, 3, 0, 1, 0, None), Step::Go);
        }
        let waiters: Vec<_> = (0..6).map(|_| queued(q.enter(5, 3, 0, 1, 0, None))).collect();
        // Everyone dispatches at once: only the one freed slot is given out.
        q.release(None, 3, 1);
        for _ in 0..3 {
            q.dispatch(3, 1);
        }
        let gone = waiters
            .iter()
            .filter(|&&(e, t)| q.poll(e, t, 3, 1, None) == Step::Go)
            .count();
        assert_eq!(gone, 1);
        assert_eq!(q.qp.admitted.load(Ordering::Relaxed), 3);
        // A lower capacity (a node's limit fell) admits nobody until below it.
        q.release(None, 2, 2);
        assert_eq!(q.dispatch(2, 2), 0);
        assert_eq!(q.qp.admitted.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn probe_slots_go_to_the_lowest_ranked_waiter() {
        let r = region();
        let q = queue(&r, &cfg(0, 8, &[(1, 10_000, 8)]));
        assert_eq!(q.enter(5, 2, 0, 1, 0, None), Step::Go);
        assert_eq!(q.enter(5, 2, 0, 1, 0, None), Step::Go);
        // Nodes confirmed for 1 concurrent request, limits say 2: the second slot is a
        // probe of whether the node takes one more.
        let cap = Cap { safe: 1, probe: 2 };
        let low = queued(q.enter(2, cap, 1, 1, 0, None));
        let mid = queued(q.enter(5, cap, 2, 1, 0, None));
        let high = queued(q.enter(9, cap, 3, 1, 0, None));
        q.release(None, cap, 4);
        assert_eq!(q.poll(high.0, high.1, cap, 4, None), Step::Wait);
        assert_eq!(q.poll(mid.0, mid.1, cap, 4, None), Step::Wait);
        assert_eq!(
            q.poll(low.0, low.1, cap, 4, None),
            Step::GoProbe,
            "the probe goes to the lowest, which is told so (its try prefers a probe slot)"
        );
        // A confirmed slot goes to the best.
        let cap = Cap { safe: 2, probe: 2 };
        q.release(None, cap, 5);
        assert_eq!(q.poll(mid.0, mid.1, cap, 5, None), Step::Wait);
        assert_eq!(q.poll(high.0, high.1, cap, 5, None), Step::Go);
    }

    #[test]
    fn racing_dispatchers_respect_capacity() {
        let r = region();
        let q = queue(&r, &cfg(0, 8, &[(1, 60_000, 8)]));
        let cap = 4;
        let waiters: Vec<_> = std::iter::repeat_with(|| q.enter(5, 0, 0, 1, 0, None))
            .take(8)
            .map(queued)
            .collect();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..100 {
                        q.dispatch(cap, 1);
                    }
                });
            }
        });
        assert_eq!(q.qp.admitted.load(Ordering::Relaxed), cap);
        let went = waiters
            .iter()
            .filter(|&&(e, t)| q.poll(e, t, cap, 1, None) == Step::Go)
            .count();
        assert_eq!(went, cap as usize);
        assert_eq!(q.ps.queue_len.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn stale_entries_do_not_block_the_head() {
        let r = region();
        let q = queue(&r, &cfg(0, 8, &[(1, 100, 8)]));
        assert_eq!(q.enter(5, 1, 0, 1, 0, None), Step::Go);
        // A waiter whose owner vanished (never polls again), then a live one.
        let _dead = queued(q.enter(9, 1, 0, 77, 1, None));
        let live = queued(q.enter(5, 1, 5_000, 1, 0, None));
        q.release(None, 1, 5_101);
        assert_eq!(
            q.poll(live.0, live.1, 1, 5_101, None),
            Step::Go,
            "the stale head was freed"
        );
        assert_eq!(q.ps.queue_len.load(Ordering::Relaxed), 0);
        assert_eq!(q.ps.queue_aborted_total.load(Ordering::Relaxed), 1);
        // An admission given to an owner that never takes it over comes back too.
        let ghost = queued(q.enter(5, 1, 6_000, 77, 1, None));
        q.release(None, 1, 6_001);
        assert_eq!(q.qp.admitted.load(Ordering::Relaxed), 1, "given to the ghost");
        let _ = ghost;
        assert_eq!(
            q.enter(5, 1, 11_200, 1, 0, None),
            Step::Go,
            "the ghost's slot was reclaimed for the next arrival"
        );
        assert_eq!(q.qp.admitted.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn reaping_an_owner_frees_its_entries_and_admissions() {
        let r = region();
        let q = queue(&r, &cfg(0, 8, &[(1, 10_000, 8)]));
        let share = r.admit_share(1, 0).unwrap();
        assert_eq!(q.enter(5, 2, 0, 77, 1, Some(share)), Step::Go);
        assert_eq!(q.enter(5, 2, 0, 1, 0, None), Step::Go);
        let _given = queued(q.enter(5, 2, 0, 77, 1, Some(share)));
        let _waiting = queued(q.enter(5, 2, 0, 77, 1, Some(share)));
        // The live request finishes: its slot goes to 77's first waiter, which never
        // takes it over.
        q.release(None, 2, 1);
        assert_eq!(q.qp.admitted.load(Ordering::Relaxed), 2);
        assert_eq!(q.ps.queue_len.load(Ordering::Relaxed), 1);
        reap_owner(&r, 1, 77);
        assert_eq!(share.load(Ordering::Relaxed), 0);
        assert_eq!(q.ps.queue_len.load(Ordering::Relaxed), 0);
        assert_eq!(
            q.qp.admitted.load(Ordering::Relaxed),
            0,
            "share and given slot back"
        );
        assert!(q
            .in_use()
            .iter()
            .all(|e| state_of(e.word.load(Ordering::Relaxed)) == entry::FREE));
    }

    #[test]
    fn leave_takes_a_waiter_out_and_passes_a_given_slot_on() {
        let r = region();
        let q = queue(&r, &cfg(0, 8, &[(1, 10_000, 8)]));
        assert_eq!(q.enter(5, 1, 0, 1, 0, None), Step::Go);
        let a = queued(q.enter(5, 1, 0, 1, 0, None));
        let b = queued(q.enter(5, 1, 0, 1, 0, None));
        assert!(q.leave(a.0, a.1, 1, 1));
        assert!(!q.leave(a.0, a.1, 1, 1), "only once");
        assert_eq!(q.ps.queue_len.load(Ordering::Relaxed), 1);
        let c = queued(q.enter(5, 1, 2, 1, 0, None));
        q.release(None, 1, 3); // b is given the slot ...
        assert!(q.leave(b.0, b.1, 1, 4)); // ... but its client is gone: c gets it
        assert_eq!(q.poll(c.0, c.1, 1, 4, None), Step::Go);
        assert_eq!(q.qp.admitted.load(Ordering::Relaxed), 1);
        assert_eq!(q.ps.queue_aborted_total.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_better_waiter_elsewhere_keeps_freed_slots_and_arrivals_wait() {
        use crate::admission::fleet::pack;
        let r = region();
        let q = queue(&r, &cfg(0, 8, &[(1, 10_000, 8)]));
        let v = &q.ps.fleet;
        assert_eq!(q.enter(5, 1, 0, 1, 0, None), Step::Go);
        let low = queued(q.enter(2, 1, 1, 1, 0, None));
        // The sync thread: two priority-7 waiters at other gateways, view valid to 1000.
        v.ahead[6].store(pack(0, 2), Ordering::Relaxed);
        v.elsewhere.store(2, Ordering::Relaxed);
        v.until_ms.store(1_000, Ordering::Release);
        q.release(None, 1, 10);
        assert_eq!(q.poll(low.0, low.1, 1, 11, None), Step::Wait, "the slot is kept");
        assert_eq!(q.qp.admitted.load(Ordering::Relaxed), 0);
        assert_eq!(v.holds.load(Ordering::Relaxed), 1, "counted once per freed slot");
        // An arrival of a lower priority than theirs queues, even with the slot free;
        // a higher one goes, and so does an equal one (no FIFO across gateways).
        let mid = queued(q.enter(6, 1, 12, 1, 0, None));
        assert_eq!(q.enter(8, 1, 13, 1, 0, None), Step::Go);
        q.release(None, 1, 14);
        assert_eq!(q.enter(7, 1, 15, 1, 0, None), Step::Go, "equal: not held");
        q.release(None, 1, 16);
        // The view lapses (no round since): the local queue alone decides again.
        assert_eq!(q.poll(low.0, low.1, 1, 999, None), Step::Wait);
        assert_eq!(
            q.poll(mid.0, mid.1, 1, 1_000, None),
            Step::Go,
            "the best local first"
        );
        q.release(None, 1, 1_001);
        assert_eq!(q.poll(low.0, low.1, 1, 1_002, None), Step::Go);
    }

    #[test]
    fn retry_after_follows_the_release_rate() {
        let r = region();
        let q = queue(&r, &cfg(0, 8, &[(1, 10_000, 8)]));
        assert_eq!(q.retry_after_ms(0), 1000);
        for _ in 0..4 {
            q.enter(5, 1, 0, 1, 0, None);
        }
        for k in 0..2 {
            q.qp.admitted.fetch_add(1, Ordering::Relaxed);
            q.release(None, 1, 1_000 + k);
        }
        // 2 releases in the last second; queue_len waiting + this one.
        let waiting = q.ps.queue_len.load(Ordering::Relaxed) as u64;
        assert_eq!(q.retry_after_ms(2_500), (waiting + 1).div_ceil(2).max(1) * 1000);
        assert_eq!(q.release_rate(5_000), 0, "old buckets do not count");
    }
}
