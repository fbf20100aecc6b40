//! Admission: priority classes, a shared priority queue, and shedding.
//!
//! When offered load exceeds what a pool's nodes can take, `admit()` (access phase)
//! decides who goes on, who waits and who is turned away, instead of letting every
//! request bounce off busy nodes (429 → retry → 429 ...).
//!
//! **Capacity.** What a pool can take at once is the sum of its available nodes'
//! learned concurrency limits (AIMD on capacity 429s, `NodeSlot::limit`): nodes cooling
//! down, ejected, down or draining do not count. While some available node has no
//! learned limit, capacity is unlimited and nobody queues: queueing starts once the
//! nodes have said (with 429s) how much they take. When no node is available at all
//! (every one cooling / ejected / down), the request is answered at once with the
//! pool's `no_node_status` and the soonest moment a node returns, as before.
//!
//! **Admitted count.** `QueuePool::admitted` counts requests admitted and not yet
//! released (the log phase releases). A slot is *reserved* with a CAS that only
//! succeeds while `admitted < capacity`, before anyone is let through, so several
//! dispatchers racing for one freed slot cannot overshoot it. Each worker also keeps
//! its share of the count (`Region::admit_share`), so that the admissions of a worker
//! killed with SIGKILL are subtracted when nginx starts its replacement
//! (`Region::reap_dead_workers`), exactly like node in-flight counts.
//!
//! **Queue.** A fixed array of `shm.queue_slots` entries per pool in the shared region,
//! visible to every worker. An entry's state and ticket live in one word (ticket << 8 |
//! state), so each transition (claim, publish, admit, evict, time out, leave) is one
//! CAS that also proves the entry still holds that ticket: a reused entry can never be
//! mistaken for its previous waiter. Tickets come from one counter per pool, so ticket
//! order is arrival order.
//!
//! **Who goes first.** The best waiter has the highest *effective* priority: its
//! priority plus one level per `aging_ms` waited, capped at 10 (aging: a low class is
//! promoted while it waits, so it is not starved forever; SGLang's gateway does the
//! same); ties are broken by ticket (FIFO). Waiters do not each scan the queue: a
//! waiter polls its own entry (O(1): one atomic load) every 1-2 ms. The *dispatcher*,
//! whoever sees a free slot (the request releasing its admission in the log phase, an
//! arrival, or a polling waiter), reserves a slot, scans the pool's entries once
//! (O(entries in use), up to the high-water mark) for the best waiter, and flips it to
//! ADMITTED; the waiter takes the admission over on its next poll. So the scan runs
//! once per freed slot, not once per waiter per poll, and a waiter is released as soon
//! as a slot frees anywhere in the pool (any worker).
//!
//! **Probe slots.** AIMD raises a node's limit by one after `increase_every × limit`
//! successes at it: a guess that the node takes one more, which costs the request
//! that tests it a 429 when wrong (and, every node being full, no retry). Capacity is
//! therefore counted twice ([`Cap`]): `probe` sums the limits, `safe` counts each node
//! only up to the highest concurrency it has answered a success at since its last
//! refusal ([`node::note_served`], [`node::note_refused`]). Slots up to `safe` go to the best
//! waiter; a slot between `safe` and `probe` goes to the *lowest*-ranked one. (Which
//! request p2c then places on the probed node is p2c's choice, so this lowers the top
//! class's share of probe 429s; it does not remove it.)
//!
//! **Bounds.** Each priority belongs to a class (`classes[i].min_priority`), with its
//! own `max_wait_ms` and `max_queue`; the pool has a `max_queue` for all classes. A
//! waiter whose wait runs out leaves with 429 (timeout). When the pool's queue is
//! full, an arrival evicts the lowest-priority (then youngest) waiter of a lower
//! priority, which answers 429 on its next poll; with none lower, the arrival is
//! refused. Every refusal carries a `Retry-After` estimated from the queue: waiters
//! ahead / slots released per second over the last second, 1 to 60 s.
//!
//! **Emergency.** When the pool's `emergency` has the ACTIVE bit, a request whose
//! priority is below `shed_below` is refused at once (counted in `shed_total` and in the
//! sliding window as `Shed`), as is every other refusal of admission.
//!
//! **Dead waiters.** An entry carries its owner's pid and worker slot. When a worker is
//! reaped, its entries are freed (a waiting one leaves the queue, an admitted one not
//! yet taken over gives its slot back). An entry left older than its class's
//! `max_wait_ms` + [`GRACE_MS`] (its owner would have timed out long ago) is freed by
//! whichever scan sees it, so it can never block the head of the queue. A client that
//! disconnects while waiting leaves the queue (`leave`), counted in
//! `queue_aborted_total`.
//!
//! Every function takes `now` (coarse monotonic ms): the unit tests drive time by hand.

pub mod fleet;
pub mod queue;

use std::sync::atomic::{AtomicU32, Ordering};

use crate::balancer::{Balancer, Error};
use crate::limit::LIMIT_ONE;
use crate::node;
use crate::shm::clock;
use crate::shm::layout::emergency;
use crate::shm::Region;

pub use crate::config::{AdmissionConfig, ClassConfig};
pub use queue::{reap_owner, status_json, Cap, Queue, Step, GRACE_MS, UNLIMITED};

// ------------------------------------------------------------------------------------
// The balancer's view: capacity from the nodes, verdicts for the C ABI

/// What `admit` / `admit_poll` tell the caller (stable numbers: the C ABI's
/// `rsb_verdict`, e.g. `RSB_VERDICT_GO_PROBE`).
/// cbindgen:rename-all=QualifiedScreamingSnakeCase
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Verdict {
    /// Go on; an admission is held: release it (`admit_release`) in the log phase.
    Go = 0,
    /// Go on; queueing is off for the pool, nothing to release.
    Pass = 1,
    /// Queued: poll with the entry and ticket.
    Queued = 2,
    /// Still waiting: poll again.
    Wait = 3,
    /// No node can take a request now (cooling, ejected, down): answer `no_node_status`.
    NoNode = 4,
    /// Shed: emergency mode and a priority below `shed_below`.
    Shed = 5,
    /// Queue or class full.
    Full = 6,
    /// Waited too long.
    TimedOut = 7,
    /// Pushed out by a higher-priority arrival.
    Evicted = 8,
    /// As go, into a probe slot: pick with `RSB_PREFER_PROBE` (`Prefer::Probe`).
    GoProbe = 9,
}

/// Concurrent requests the nodes `slots` can take (see [`Cap`]): the available
/// nodes' learned limits ([`UNLIMITED`] if one has none); `Err(ms)` when no node is
/// available, with the soonest moment one may be (1 s when unknown).
pub fn capacity(region: &Region, slots: &[&[u32]], now: u64) -> Result<Cap, u64> {
    let (mut safe, mut probe, mut any, mut soonest) = (0u64, 0u64, false, u64::MAX);
    for &s in slots.iter().flat_map(|t| t.iter()) {
        let Some(n) = region.node(s) else { continue };
        if node::taken_out(n, now) {
            if let Some(ms) = node::back_in_ms(n, now) {
                soonest = soonest.min(ms);
            }
            continue;
        }
        any = true;
        let limit = crate::fleet::cap(n, now);
        if limit == 0 {
            return Ok(UNLIMITED.into());
        }
        let whole = limit / LIMIT_ONE;
        probe += whole;
        safe += whole.min(region.served(s).map_or(0, |c| c.load(Ordering::Relaxed) as u64));
    }
    if !any {
        return Err(if soonest == u64::MAX { 1000 } else { soonest });
    }
    let clamp = |v: u64| v.min(UNLIMITED as u64 - 1) as u32;
    Ok(Cap {
        safe: clamp(safe),
        probe: clamp(probe),
    })
}

fn queue(b: &Balancer, pool: u32) -> Result<Queue<'_>, Error> {
    b.live_pool(pool)?;
    Queue::of(b.region(), pool).ok_or_else(|| Error::Invalid(format!("unknown pool index {pool}")))
}

/// The queue of a pool slot whether or not the pool is still configured: requests
/// admitted before a reload removed their pool must still give their slot back
/// (or a new pool given this slot would start with phantom admissions).
fn any_queue(b: &Balancer, pool: u32) -> Result<Queue<'_>, Error> {
    Queue::of(b.region(), pool).ok_or_else(|| Error::Invalid(format!("unknown pool index {pool}")))
}

/// Capacity for dispatching; 0 (nobody dispatched) for a pool without nodes now.
fn dispatch_capacity(b: &Balancer, pool: u32, now: u64) -> Cap {
    match pool_capacity(b, pool, now) {
        Ok(Ok(cap)) => cap,
        _ => Cap::from(0),
    }
}

/// The pool's capacity, plus its backup pool's while that is in play (emergency, or
/// every node of the pool down or ejected: `Balancer::with_serving_slots`), since
/// the balancer then sends it the tries this pool's nodes cannot take.
fn pool_capacity(b: &Balancer, pool: u32, now: u64) -> Result<Result<Cap, u64>, Error> {
    let region = b.region();
    let (own, extra) = b.with_serving_slots(pool, now, |own, spill| {
        (
            capacity(region, &own, now),
            spill.map(|b| capacity(region, &b, now)),
        )
    })?;
    let Some(extra) = extra else {
        return Ok(own);
    };
    Ok(match (own, extra) {
        (Ok(a), Ok(b)) => Ok(a.plus(b)),
        (Ok(c), Err(_)) | (Err(_), Ok(c)) => Ok(c),
        (Err(x), Err(y)) => Err(x.min(y)),
    })
}

fn share(b: &Balancer, pool: u32) -> Option<&AtomicU32> {
    b.worker_index().and_then(|w| b.region().admit_share(w, pool))
}

/// Admission of one request of `priority` (1..=10) to `pool`, in the access phase.
/// Returns the verdict and, for `Queued`, (entry, ticket); for refusals (0, the
/// Retry-After in ms). Never allocates, never takes the shared lock.
pub fn admit(b: &Balancer, pool: u32, priority: u32) -> Result<(Verdict, u32, u64), Error> {
    if !crate::abi::PRIORITY_RANGE.contains(&priority) {
        return Err(Error::Invalid(format!(
            "priority {priority} is out of range 1..=10"
        )));
    }
    let now = clock::now_ms();
    let q = queue(b, pool)?;
    let ps = q.ps;
    // Acquire pairs with the Release of the transitions in `emergency_tick` and
    // `force_emergency`: the `shed_below` of the config the detector judged by is
    // visible with ACTIVE.
    if ps.emergency.load(Ordering::Acquire) & emergency::ACTIVE != 0
        && priority < ps.shed_below.load(Ordering::Relaxed)
    {
        q.refused(now);
        return Ok((Verdict::Shed, 0, q.retry_after_ms(now)));
    }
    // Acquire pairs with the Release in `params::store_admission`: the queue's
    // parameters are visible once it is on.
    if q.qp.enabled.load(Ordering::Acquire) == 0 {
        // Queueing off: go on when some node can take a try now, as before.
        return Ok(match b.available(pool) {
            Ok(()) => (Verdict::Pass, 0, 0),
            Err(ms) => (Verdict::NoNode, 0, ms),
        });
    }
    let cap = match pool_capacity(b, pool, now)? {
        Ok(cap) => cap,
        Err(ms) => return Ok((Verdict::NoNode, 0, ms)),
    };
    let me = std::process::id() as i32;
    let worker = b.worker_index().unwrap_or(u32::MAX);
    let step = q.enter(priority, cap, now, me, worker, share(b, pool));
    if matches!(step, Step::Queued { .. } | Step::Full) {
        note_fleet_refusal(b, pool, now);
    }
    Ok(verdict(&q, step, now))
}

/// An arrival that could not go at once: in cluster mode, demand on the pool's nodes
/// at their fleet share (`crate::fleet::note_refused`), so a gateway whose share is
/// 0 asks for one at the next sync round.
fn note_fleet_refusal(b: &Balancer, pool: u32, now: u64) {
    let region = b.region();
    let _ = b.with_serving_slots(pool, now, |own, spill| {
        let slots = own.into_iter().chain(spill.into_iter().flatten()).flatten();
        crate::fleet::note_refused(slots.filter_map(|&s| region.node(s)), now);
    });
}

fn verdict(q: &Queue<'_>, step: Step, now: u64) -> (Verdict, u32, u64) {
    let refuse = |v: Verdict| {
        q.refused(now);
        (v, 0, q.retry_after_ms(now))
    };
    match step {
        Step::Go => (Verdict::Go, 0, 0),
        Step::GoProbe => (Verdict::GoProbe, 0, 0),
        Step::Queued { entry, ticket } => (Verdict::Queued, entry, ticket),
        Step::Wait => (Verdict::Wait, 0, 0),
        Step::Full => refuse(Verdict::Full),
        Step::TimedOut => refuse(Verdict::TimedOut),
        Step::Evicted => refuse(Verdict::Evicted),
    }
}

/// Poll a queued request: `Go`, `Wait`, or a refusal with its Retry-After (ms).
pub fn admit_poll(b: &Balancer, pool: u32, entry: u32, ticket: u64) -> Result<(Verdict, u64), Error> {
    let now = clock::now_ms();
    let q = any_queue(b, pool)?;
    q.check_entry(entry).map_err(Error::Invalid)?;
    // No node at all (everyone cooling): capacity 0, the waiter keeps its place.
    // A pool removed by a reload: nobody is dispatched, waiters time out.
    let cap = dispatch_capacity(b, pool, now);
    let step = q.poll(entry, ticket, cap, now, share(b, pool));
    let (v, _, ms) = verdict(&q, step, now);
    Ok((v, ms))
}

/// The client of a queued request left. True if it was still in the queue.
pub fn admit_leave(b: &Balancer, pool: u32, entry: u32, ticket: u64) -> Result<bool, Error> {
    let now = clock::now_ms();
    let q = any_queue(b, pool)?;
    q.check_entry(entry).map_err(Error::Invalid)?;
    let cap = dispatch_capacity(b, pool, now);
    Ok(q.leave(entry, ticket, cap, now))
}

/// Release the admission of a request that finished (log phase); the best waiter
/// takes its slot.
pub fn admit_release(b: &Balancer, pool: u32) -> Result<(), Error> {
    let now = clock::now_ms();
    let q = any_queue(b, pool)?;
    let cap = dispatch_capacity(b, pool, now);
    q.release(share(b, pool), cap, now);
    Ok(())
}

/// Admission counters of a pool: (admitted now, waiting now).
pub fn admission_state(b: &Balancer, pool: u32) -> Result<(u32, u32), Error> {
    let q = queue(b, pool)?;
    Ok((
        q.qp.admitted.load(Ordering::Relaxed),
        q.ps.queue_len.load(Ordering::Relaxed),
    ))
}
