//! Random call sequences against one shared region, every call through the C ABI
//! (`rsbalancer::ffi::rsb_*`, `include/rsbalancer.h`; the `unsafe` is all in
//! [`c`]), checked after every step:
//!
//! - each node's in-flight count equals the picks this harness has not reported yet
//!   (so it never wraps below 0);
//! - the pool's admitted count is at least the admissions held here and at most those
//!   plus the queue entries not yet resolved, and right after an admission it is within
//!   the pool's capacity;
//! - the queue holds no more entries than this harness has outstanding;
//! - at the end, with every pick reported, every admission released and every queue
//!   entry left, all of those counts are back to 0;
//! - misuse the ABI must survive: NULL out-pointers, and NULL `key` / `tried` / names
//!   with a non-zero length, answer `RSB_NULL_ARGUMENT` and write nothing (no output,
//!   no count); bogus pool, node and queue entry indexes, priorities and weights answer
//!   `RSB_INVALID_ARGUMENT`; no call answers `RSB_PANIC`.
//!
//! State the ABI has no getter for (a node's in-flight counter without its tally, a
//! pool's admitted count and queue length) is read through the Rust API on the same
//! handle ([`c::Handle::rust`]).
//!
//! One region (2 pools: `q` with admission, `p` without) is kept for 1000 inputs,
//! idle between two, so learned state (limits, cooldowns, ejections, budgets) carries
//! over; `RSB_FUZZ_FRESH=1` makes a new one for each input (to replay a crash input
//! alone), `RSB_FUZZ_TRACE=1` prints every step.
#![no_main]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use rsbalancer::abi::WEIGHT_RANGE;
use rsbalancer::admission::{capacity, Verdict};
use rsbalancer::shm::clock;

#[path = "abi/c.rs"]
mod c;
use c::rsb_result::{self, RSB_INVALID_ARGUMENT, RSB_NO_NODE, RSB_NULL_ARGUMENT, RSB_OK, RSB_SHM};
use c::{Buf, Handle, UNSET, UNSET64};

const CONFIG: &str = r#"{
  "shm": { "max_nodes": 8, "max_pools": 2, "max_workers": 2, "config_bytes": 16384, "queue_slots": 128 },
  "pools": {
    "q": {
      "slow_start_ms": 0,
      "limit": { "max": 4 },
      "cooldown": { "base_ms": 5, "max_ms": 20 },
      "outlier": { "consecutive_failures": 3, "base_ms": 5, "max_ms": 20 },
      "admission": { "enabled": true, "max_queue": 4, "aging_ms": 0,
        "classes": [ { "min_priority": 1, "max_wait_ms": 5, "max_queue": 2 },
                     { "min_priority": 6, "max_wait_ms": 50, "max_queue": 4 } ] },
      "nodes": [ { "id": "a", "addr": "127.0.0.1:9001" },
                 { "id": "b", "addr": "127.0.0.1:9002", "weight": 3 },
                 { "id": "c", "addr": "127.0.0.1:9003", "backup": true } ] },
    "p": {
      "algorithm": "chash", "chash_points": 16, "admission": { "enabled": false },
      "nodes": [ { "id": "d", "addr": "127.0.0.1:9004" },
                 { "id": "e", "addr": "127.0.0.1:9005" } ] }
  }
}"#;

/// Statuses a node may answer, and 0 (connect error / timeout).
const STATUSES: [u32; 9] = [0, 200, 201, 400, 429, 500, 502, 503, 504];

/// The region's `shm.max_pools`, `shm.max_nodes` and `shm.queue_slots`: indexes from
/// these up name nothing.
const MAX_POOLS: u32 = 2;
const MAX_NODES: u32 = 8;
const QUEUE_SLOTS: u32 = 128;

/// Verdicts that hold an admission (`rsb_admit_release` due).
const GO: u32 = Verdict::Go as u32;
const GO_PROBE: u32 = Verdict::GoProbe as u32;
const QUEUED: u32 = Verdict::Queued as u32;
const WAIT: u32 = Verdict::Wait as u32;

/// Assert that `rc` is one of `want` (never `RSB_PANIC`), with the last error.
#[track_caller]
fn expect(rc: rsb_result, want: &[rsb_result], what: &str) {
    if !want.contains(&rc) {
        let (_, msg) = c::last_error(512);
        panic!(
            "{what}: {rc:?}, want one of {want:?} (last error: {})",
            String::from_utf8_lossy(&msg)
        );
    }
}

/// Misuse is rare (1 in 16), so that most sequences go deep.
fn misuse(u: &mut Unstructured) -> Result<bool> {
    u.ratio(1, 16)
}

/// An out-pointer mask for a call with `outs` outputs: 0 (all given) or, on misuse,
/// some of them NULL.
fn nulls(u: &mut Unstructured, outs: u8) -> Result<u8> {
    Ok(match misuse(u)? {
        true => u.int_in_range(1..=(1u8 << outs) - 1)?,
        false => 0,
    })
}

/// `v` as an input, or (on misuse) NULL with a non-zero length.
fn buf<'a, T>(u: &mut Unstructured, v: &'a [T]) -> Result<Buf<'a, T>> {
    Ok(match misuse(u)? {
        true => Buf::Null(u.int_in_range(1..=64)?),
        false => Buf::Slice(v),
    })
}

struct Harness {
    h: Handle,
    pools: [u32; 2],
    /// Node slots of each pool.
    nodes: [Vec<u32>; 2],
    /// Picks not reported yet, per node slot.
    outstanding: HashMap<u32, u32>,
    /// Open picks in order (a node can be picked twice).
    open: Vec<u32>,
    /// Admissions held (Go / GoProbe not released yet) of pool `q`.
    held: u32,
    /// Queue entries (entry, ticket) not resolved yet.
    queued: Vec<(u32, u64)>,
}

impl Harness {
    fn new(h: Handle) -> Harness {
        let pool = |name: &str| {
            let (rc, p) = h.pool_index(Buf::Slice(name.as_bytes()), 0);
            expect(rc, &[RSB_OK], "rsb_pool_index");
            p
        };
        let node = |pool: &str, id: &str| {
            let (rc, n) = h.node_index(Buf::Slice(pool.as_bytes()), Buf::Slice(id.as_bytes()), 0);
            expect(rc, &[RSB_OK], "rsb_node_index");
            n
        };
        let pools = [pool("q"), pool("p")];
        let nodes = [
            ["a", "b", "c"].map(|id| node("q", id)).to_vec(),
            ["d", "e"].map(|id| node("p", id)).to_vec(),
        ];
        Harness {
            h,
            pools,
            nodes,
            outstanding: HashMap::new(),
            open: Vec::new(),
            held: 0,
            queued: Vec::new(),
        }
    }

    fn all_nodes(&self) -> impl Iterator<Item = u32> + '_ {
        self.nodes.iter().flatten().copied()
    }

    fn ours(&self, node: u32) -> bool {
        self.all_nodes().any(|n| n == node)
    }

    /// A node slot: one of ours, or (rarely) one that names no node.
    fn node(&self, u: &mut Unstructured) -> Result<u32> {
        let all: Vec<u32> = self.all_nodes().collect();
        Ok(match u.int_in_range(0..=all.len())? {
            k if k < all.len() => all[k],
            _ => loop {
                let n = u.int_in_range(0..=u32::MAX)?;
                if !self.ours(n) {
                    break n;
                }
                if u.is_empty() {
                    break MAX_NODES;
                }
            },
        })
    }

    fn tried(&self, u: &mut Unstructured) -> Result<Vec<u32>> {
        let n = u.int_in_range(0..=3)?;
        (0..n).map(|_| self.node(u)).collect()
    }

    /// The pool argument: ours (`Some(index)`) or, rarely, a bogus index.
    fn pool(&self, u: &mut Unstructured, pool: usize) -> Result<(Option<usize>, u32)> {
        Ok(match misuse(u)? {
            true => (None, u.int_in_range(MAX_POOLS..=u32::MAX)?),
            false => (Some(pool), self.pools[pool]),
        })
    }

    /// The outcome of `rsb_pick` / `rsb_pick_prefer`: with a NULL argument
    /// (`misused`), a bogus pool or a bogus `prefer`, a refusal with nothing written.
    fn picked(
        &mut self,
        (rc, node): (rsb_result, u32),
        pool: Option<usize>,
        misused: bool,
        bad_prefer: bool,
    ) {
        // Either refusal when a NULL argument and a bogus one come together.
        let want: &[rsb_result] = match (misused, pool.is_none() || bad_prefer) {
            (true, true) => &[RSB_NULL_ARGUMENT, RSB_INVALID_ARGUMENT],
            (true, false) => &[RSB_NULL_ARGUMENT],
            (false, true) => &[RSB_INVALID_ARGUMENT],
            (false, false) => &[RSB_OK, RSB_NO_NODE, RSB_INVALID_ARGUMENT],
        };
        expect(rc, want, "rsb_pick");
        if rc != RSB_OK {
            return assert_eq!(node, UNSET, "rsb_pick answered {rc:?} but wrote");
        }
        let pool = pool.unwrap();
        assert!(
            self.nodes[pool].contains(&node),
            "picked {node}, not of pool {pool}"
        );
        *self.outstanding.entry(node).or_default() += 1;
        self.open.push(node);
    }

    fn report(&mut self, k: usize, status: u32, latency_us: u32, retry_after_ms: u32) {
        let node = self.open.swap_remove(k);
        let rc = self.h.report(node, status, latency_us, retry_after_ms);
        expect(rc, &[RSB_OK], "rsb_report of a picked node");
        *self.outstanding.get_mut(&node).unwrap() -= 1;
    }

    /// A verdict that holds an admission (or a queue entry).
    fn verdict(&mut self, v: u32, entry: u32, ticket: u64) {
        match v {
            GO | GO_PROBE => self.held += 1,
            QUEUED => self.queued.push((entry, ticket)),
            _ => {}
        }
    }

    fn step(&mut self, u: &mut Unstructured) -> Result<()> {
        let pool = u.int_in_range(0..=1)?;
        let op = u.int_in_range(0..=15)?;
        if trace() {
            eprintln!(
                "step: pool {pool} op {op} held {} queued {:?} open {:?}",
                self.held, self.queued, self.open
            );
        }
        match op {
            0 | 1 => {
                let (key_v, tried_v): (Vec<u8>, _) = (u.arbitrary()?, self.tried(u)?);
                let (key, tried) = (buf(u, &key_v)?, buf(u, &tried_v)?);
                let (known, p) = self.pool(u, pool)?;
                let out = nulls(u, 1)?;
                let misused = key.null_nonempty() || tried.null_nonempty() || out != 0;
                let prefer = match op {
                    0 => None,
                    _ => Some(u.int_in_range(0..=4)?),
                };
                let r = self.h.pick(p, key, tried, prefer, out);
                if trace() {
                    eprintln!("  pick({p}, {key:?}, {tried:?}, {prefer:?}, nulls {out}) = {r:?}");
                }
                self.picked(r, known, misused, prefer == Some(4));
            }
            2 | 3 if !self.open.is_empty() => {
                let k = u.choose_index(self.open.len())?;
                let status = *u.choose(&STATUSES)?;
                let latency_us = u.int_in_range(0..=2_000_000)?;
                // Mostly short, so that the kept region's nodes come back soon.
                let retry_after_ms = match u.int_in_range(0..=15)? {
                    0..=9 => 0,
                    10..=14 => u.int_in_range(1..=30)?,
                    _ => u.arbitrary()?,
                };
                self.report(k, status, latency_us, retry_after_ms);
            }
            4 => {
                // A report for a node with nothing in flight must not wrap its count;
                // one for a slot that names no node is refused.
                let node = self.node(u)?;
                if !self.ours(node) {
                    let rc = self.h.report(node, 200, 1000, 0);
                    expect(rc, &[RSB_INVALID_ARGUMENT], "rsb_report of a bogus node");
                } else if self.outstanding.get(&node).copied().unwrap_or(0) == 0 {
                    expect(
                        self.h.report(node, 200, 1000, 0),
                        &[RSB_OK],
                        "rsb_report, idle node",
                    );
                }
            }
            5 => {
                let priority = u.int_in_range(0..=11)?;
                let (known, p) = self.pool(u, pool)?;
                let out = nulls(u, 3)?;
                let (rc, (v, entry, value)) = self.h.admit(p, priority, out);
                if trace() {
                    eprintln!("  admit({p}, {priority}, nulls {out}) = {rc:?} {v} {entry} {value}");
                }
                if out != 0 {
                    expect(rc, &[RSB_NULL_ARGUMENT], "rsb_admit with a NULL out-pointer");
                } else if known.is_none() || !(1..=10).contains(&priority) {
                    expect(rc, &[RSB_INVALID_ARGUMENT], "rsb_admit, bogus pool or priority");
                }
                if rc != RSB_OK {
                    assert_eq!(
                        (v, entry, value),
                        (UNSET, UNSET, UNSET64),
                        "rsb_admit {rc:?} wrote"
                    );
                    return Ok(());
                }
                if known == Some(0) {
                    if matches!(v, GO | GO_PROBE) {
                        self.check_capacity();
                    }
                    self.verdict(v, entry, value);
                } else {
                    // Queueing is off there: nothing is held.
                    let ok = [Verdict::Pass, Verdict::NoNode, Verdict::Shed].map(|v| v as u32);
                    assert!(ok.contains(&v), "verdict {v} of pool p");
                }
            }
            6 if !self.queued.is_empty() => {
                let k = u.choose_index(self.queued.len())?;
                let (entry, ticket) = self.queued[k];
                let out = nulls(u, 2)?;
                let (rc, (v, value)) = self.h.admit_poll(self.pools[0], entry, ticket, out);
                if trace() {
                    eprintln!("  poll({entry}, {ticket}, nulls {out}) = {rc:?} {v} {value}");
                }
                if out != 0 {
                    expect(rc, &[RSB_NULL_ARGUMENT], "rsb_admit_poll with a NULL out-pointer");
                    assert_eq!((v, value), (UNSET, UNSET64), "rsb_admit_poll {rc:?} wrote");
                    return Ok(());
                }
                expect(rc, &[RSB_OK], "rsb_admit_poll");
                if v != WAIT {
                    self.queued.swap_remove(k);
                    self.verdict(v, entry, ticket);
                }
            }
            7 if !self.queued.is_empty() => {
                let k = u.choose_index(self.queued.len())?;
                let (entry, ticket) = self.queued.swap_remove(k);
                // Its out-pointer may be NULL.
                let out = nulls(u, 1)?;
                let (rc, left) = self.h.admit_leave(self.pools[0], entry, ticket, out);
                expect(rc, &[RSB_OK], "rsb_admit_leave");
                let want: &[u32] = if out != 0 { &[UNSET] } else { &[0, 1] };
                assert!(want.contains(&left), "rsb_admit_leave wrote {left}");
            }
            8 if self.held > 0 => {
                expect(
                    self.h.admit_release(self.pools[0]),
                    &[RSB_OK],
                    "rsb_admit_release",
                );
                self.held -= 1;
            }
            9 => {
                let node = self.node(u)?;
                let weight = u.int_in_range(*WEIGHT_RANGE.start() - 1..=*WEIGHT_RANGE.end() + 1)?;
                let want = match self.ours(node) && WEIGHT_RANGE.contains(&weight) {
                    true => RSB_OK,
                    false => RSB_INVALID_ARGUMENT,
                };
                expect(self.h.set_weight(node, weight), &[want], "rsb_set_weight");
            }
            10 => {
                let tried_v = self.tried(u)?;
                let tried = buf(u, &tried_v)?;
                let (_, p) = self.pool(u, pool)?;
                let out = nulls(u, 1)?;
                let (rc, denied) = self.h.may_retry(p, tried, u.arbitrary()?, out);
                if tried.null_nonempty() || out != 0 {
                    expect(rc, &[RSB_NULL_ARGUMENT], "rsb_may_retry with a NULL argument");
                    assert_eq!(denied, UNSET, "rsb_may_retry {rc:?} wrote");
                } else {
                    expect(rc, &[RSB_OK], "rsb_may_retry");
                    assert!(denied <= 4, "rsb_may_retry denied {denied}");
                }
            }
            11 => {
                let (known, p) = self.pool(u, pool)?;
                let out = nulls(u, 1)?;
                let (rc, wait) = self.h.available(p, out);
                match (out, known) {
                    (1, _) => expect(rc, &[RSB_NULL_ARGUMENT], "rsb_available, NULL out"),
                    (_, None) => expect(rc, &[RSB_INVALID_ARGUMENT], "rsb_available, bogus pool"),
                    _ => expect(rc, &[RSB_OK, RSB_NO_NODE], "rsb_available"),
                }
                match rc {
                    RSB_OK => assert_eq!(wait, 0, "rsb_available OK with a wait"),
                    RSB_NO_NODE => assert_ne!(wait, UNSET64, "rsb_available NO_NODE, no wait"),
                    _ => assert_eq!(wait, UNSET64, "rsb_available {rc:?} wrote"),
                }
                let out = nulls(u, 2)?;
                let (rc, [ms, others]) = self.h.slow_wait(p, out);
                match (out, known) {
                    (1..=3, _) => expect(rc, &[RSB_NULL_ARGUMENT], "rsb_slow_wait, NULL out"),
                    (_, None) => expect(rc, &[RSB_INVALID_ARGUMENT], "rsb_slow_wait, bogus pool"),
                    _ => expect(rc, &[RSB_OK], "rsb_slow_wait"),
                }
                if rc == RSB_OK {
                    assert!(ms != UNSET && others <= 1, "rsb_slow_wait wrote {ms}, {others}");
                } else {
                    assert_eq!((ms, others), (UNSET, UNSET), "rsb_slow_wait {rc:?} wrote");
                }
            }
            12 => {
                let out = nulls(u, 1)?;
                let (rc, slot) = self.h.attach_worker(u.int_in_range(0..=3)?, out);
                expect(rc, &[RSB_OK, RSB_INVALID_ARGUMENT, RSB_SHM], "rsb_attach_worker");
                if rc != RSB_OK || out != 0 {
                    assert_eq!(slot, UNSET, "rsb_attach_worker {rc:?} (nulls {out}) wrote");
                } else {
                    assert_ne!(slot, UNSET, "rsb_attach_worker OK wrote nothing");
                }
            }
            13 => {
                let node = self.node(u)?;
                let out = nulls(u, 1)?;
                let (rc, stats) = self.h.node_stats(node, out);
                if out != 0 {
                    expect(rc, &[RSB_NULL_ARGUMENT], "rsb_node_get_stats, NULL out");
                } else if !self.ours(node) {
                    expect(rc, &[RSB_INVALID_ARGUMENT], "rsb_node_get_stats, bogus node");
                } else {
                    expect(rc, &[RSB_OK], "rsb_node_get_stats");
                    let s = stats.expect("rsb_node_get_stats OK wrote nothing");
                    let want = self.outstanding.get(&node).copied().unwrap_or(0);
                    assert_eq!(s.inflight, want, "rsb_node_get_stats in-flight of {node}");
                    assert!(s.picks >= u64::from(want), "picks {} < in flight {want}", s.picks);
                }
                if rc != RSB_OK {
                    assert!(stats.is_none(), "rsb_node_get_stats {rc:?} wrote");
                }
            }
            14 => {
                // Bogus entries and pools answer errors or refusals, never change a count.
                let (pool, entry, ticket) = (u.arbitrary()?, u.arbitrary()?, u.arbitrary()?);
                let (rc, (v, value)) = self.h.admit_poll(pool, entry, ticket, 0);
                expect(rc, &[RSB_OK, RSB_INVALID_ARGUMENT], "rsb_admit_poll, bogus");
                if rc == RSB_OK {
                    // A stale or foreign ticket on a live entry: no admission is given.
                    assert!(
                        !matches!(v, GO | GO_PROBE),
                        "rsb_admit_poll of a bogus ticket let in"
                    );
                } else {
                    assert_eq!((v, value), (UNSET, UNSET64), "rsb_admit_poll {rc:?} wrote");
                }
                let entry = u.int_in_range(QUEUE_SLOTS..=u32::MAX)?;
                let (rc, left) = self.h.admit_leave(self.pools[0], entry, u.arbitrary()?, 0);
                expect(rc, &[RSB_INVALID_ARGUMENT], "rsb_admit_leave, entry out of range");
                assert_eq!(left, UNSET, "rsb_admit_leave {rc:?} wrote");
                self.last_error(u)?;
            }
            15 => self.misc(u)?,
            _ => {}
        }
        Ok(())
    }

    /// `rsb_last_error` right after a refusal: a message, truncated to the buffer.
    fn last_error(&self, u: &mut Unstructured) -> Result<()> {
        let (len, _) = c::last_error(0);
        assert!(len > 0, "no message after RSB_INVALID_ARGUMENT");
        let cap = u.int_in_range(1..=len + 1)?;
        let (again, msg) = c::last_error(cap);
        assert_eq!(again, len, "rsb_last_error length changed");
        assert_eq!(
            msg.len(),
            len.min(cap - 1),
            "rsb_last_error wrote {msg:?} into {cap}"
        );
        Ok(())
    }

    /// Lookups by name and `rsb_retry_after_ms`, with NULL and bogus arguments, and
    /// `rsb_balancer_new` with a NULL out-pointer.
    fn misc(&self, u: &mut Unstructured) -> Result<()> {
        let (name_v, id_v): (Vec<u8>, Vec<u8>) = (u.arbitrary()?, u.arbitrary()?);
        let (name, id) = (buf(u, &name_v)?, buf(u, &id_v)?);
        let out = nulls(u, 1)?;
        let known = |n: Buf<u8>, names: &[&str]| match n {
            Buf::Slice(s) => names.iter().any(|k| k.as_bytes() == s),
            Buf::Null(_) => false,
        };
        let (rc, p) = self.h.pool_index(name, out);
        if name.null_nonempty() || out != 0 {
            expect(rc, &[RSB_NULL_ARGUMENT], "rsb_pool_index, NULL argument");
        } else if !known(name, &["q", "p"]) {
            expect(rc, &[RSB_INVALID_ARGUMENT], "rsb_pool_index, unknown name");
        } else {
            expect(rc, &[RSB_OK], "rsb_pool_index");
            assert!(self.pools.contains(&p), "rsb_pool_index gave {p}");
        }
        if rc != RSB_OK {
            assert_eq!(p, UNSET, "rsb_pool_index {rc:?} wrote");
        }
        let (rc, n) = self.h.node_index(name, id, out);
        if name.null_nonempty() || id.null_nonempty() || out != 0 {
            expect(rc, &[RSB_NULL_ARGUMENT], "rsb_node_index, NULL argument");
        } else if !known(id, &["a", "b", "c", "d", "e"]) {
            expect(rc, &[RSB_INVALID_ARGUMENT], "rsb_node_index, unknown node");
        } else {
            expect(rc, &[RSB_OK, RSB_INVALID_ARGUMENT], "rsb_node_index");
        }
        match rc {
            RSB_OK => assert!(self.ours(n), "rsb_node_index gave {n}"),
            _ => assert_eq!(n, UNSET, "rsb_node_index {rc:?} wrote"),
        }
        let (rc, ms) = c::retry_after_ms(id, out);
        if id.null_nonempty() || out != 0 {
            expect(rc, &[RSB_NULL_ARGUMENT], "rsb_retry_after_ms, NULL argument");
        } else {
            expect(rc, &[RSB_OK, RSB_INVALID_ARGUMENT], "rsb_retry_after_ms");
        }
        match rc {
            RSB_OK => assert!(ms <= 86_400_000, "rsb_retry_after_ms gave {ms}"),
            _ => assert_eq!(ms, UNSET, "rsb_retry_after_ms {rc:?} wrote"),
        }
        let rc = Handle::new_null_out(name);
        expect(rc, &[RSB_NULL_ARGUMENT], "rsb_balancer_new, NULL out");
        Ok(())
    }

    fn check_capacity(&self) {
        let b = self.h.rust();
        let (admitted, _) = rsbalancer::admission::admission_state(b, self.pools[0]).unwrap();
        let slots: &[u32] = &self.nodes[0];
        if let Ok(cap) = capacity(b.region(), &[slots], clock::now_ms()) {
            let total = cap.safe.saturating_add(cap.probe);
            assert!(admitted <= total, "admitted {admitted} > capacity {cap:?}");
        }
    }

    fn check(&self) {
        let b = self.h.rust();
        for node in self.all_nodes() {
            // The slot's counter, as `rsb_node_get_stats` reads it (without its tally,
            // which is slow to compute after every step).
            let inflight = b.region().node(node).unwrap().inflight.load(Ordering::Relaxed);
            let want = self.outstanding.get(&node).copied().unwrap_or(0);
            assert_eq!(inflight, want, "in-flight of node {node}");
        }
        let (admitted, waiting) = rsbalancer::admission::admission_state(b, self.pools[0]).unwrap();
        let open = self.queued.len() as u32;
        assert!(
            admitted >= self.held && admitted <= self.held + open,
            "admitted {admitted}, held {}, queue entries open {open}",
            self.held
        );
        assert!(waiting <= open, "queue length {waiting}, entries open {open}");
    }

    /// Report, release and leave everything: every count must be back to 0.
    fn drain(&mut self) {
        while !self.open.is_empty() {
            self.report(0, 200, 1000, 0);
        }
        for (entry, ticket) in std::mem::take(&mut self.queued) {
            let (rc, _) = self.h.admit_leave(self.pools[0], entry, ticket, 0);
            expect(rc, &[RSB_OK], "rsb_admit_leave (drain)");
        }
        for _ in 0..std::mem::take(&mut self.held) {
            expect(
                self.h.admit_release(self.pools[0]),
                &[RSB_OK],
                "rsb_admit_release (drain)",
            );
        }
        for node in self.all_nodes() {
            let (rc, stats) = self.h.node_stats(node, 0);
            expect(rc, &[RSB_OK], "rsb_node_get_stats (drain)");
            assert_eq!(stats.unwrap().inflight, 0, "node {node} idle");
        }
        assert_eq!(
            rsbalancer::admission::admission_state(self.h.rust(), self.pools[0]).unwrap(),
            (0, 0),
            "admission idle"
        );
    }
}

/// `RSB_FUZZ_TRACE=1`: print every step (to replay a crash input).
fn trace() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("RSB_FUZZ_TRACE").is_some())
}

/// The region the previous input left idle, kept: creating one per input would cost
/// more than all of an input's calls (a new one every 1000 inputs, or for each input
/// with `RSB_FUZZ_FRESH` set).
static KEPT: Mutex<Option<Handle>> = Mutex::new(None);

fn balancer() -> Handle {
    static FRESH: OnceLock<bool> = OnceLock::new();
    static USES: AtomicU32 = AtomicU32::new(0);
    let fresh = *FRESH.get_or_init(|| std::env::var_os("RSB_FUZZ_FRESH").is_some());
    // A new one every 1000 inputs all the same: a long Retry-After can cool a node of
    // the kept one for days. The old one is freed (`rsb_balancer_free`) on drop.
    let kept = match fresh || USES.fetch_add(1, Ordering::Relaxed).is_multiple_of(1000) {
        true => None,
        false => KEPT.lock().unwrap().take(),
    };
    kept.unwrap_or_else(|| {
        drop(KEPT.lock().unwrap().take());
        let (rc, h) = Handle::new(CONFIG);
        expect(rc, &[RSB_OK], "rsb_balancer_new");
        h.expect("rsb_balancer_new OK wrote no handle")
    })
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let mut h = Harness::new(balancer());
    for _ in 0..64 {
        if u.is_empty() || h.step(&mut u).is_err() {
            break;
        }
        h.check();
    }
    h.drain();
    *KEPT.lock().unwrap() = Some(h.h);
});
