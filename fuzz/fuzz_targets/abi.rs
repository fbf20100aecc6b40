//! Random call sequences against one shared region, through the `Balancer` API that
//! the C ABI (`src/ffi`) wraps one to one, checked after every step:
//!
//! - each node's in-flight count equals the picks this harness has not reported yet
//!   (so it never wraps below 0);
//! - the pool's admitted count is at least the admissions held here and at most those
//!   plus the queue entries not yet resolved, and right after an admission it is within
//!   the pool's capacity;
//! - the queue holds no more entries than this harness has outstanding;
//! - at the end, with every pick reported, every admission released and every queue
//!   entry left, all of those counts are back to 0.
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
use rsbalancer::admit::{capacity, Verdict};
use rsbalancer::balancer::{Balancer, Prefer};
use rsbalancer::config::Config;
use rsbalancer::shm::clock;

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
      "algorithm": "chash", "chash_points": 16,
      "nodes": [ { "id": "d", "addr": "127.0.0.1:9004" },
                 { "id": "e", "addr": "127.0.0.1:9005" } ] }
  }
}"#;

/// Statuses a node may answer, and 0 (connect error / timeout).
const STATUSES: [u32; 9] = [0, 200, 201, 400, 429, 500, 502, 503, 504];

struct Harness {
    b: Balancer,
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
    fn new(b: Balancer) -> Harness {
        let pools = [b.pool_index("q").unwrap(), b.pool_index("p").unwrap()];
        let nodes = [
            ["a", "b", "c"].map(|id| b.node_index("q", id).unwrap()).to_vec(),
            ["d", "e"].map(|id| b.node_index("p", id).unwrap()).to_vec(),
        ];
        Harness {
            b,
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

    /// A node slot: one of ours, or (rarely) one out of range.
    fn node(&self, u: &mut Unstructured) -> Result<u32> {
        let all: Vec<u32> = self.all_nodes().collect();
        Ok(match u.int_in_range(0..=all.len())? {
            k if k < all.len() => all[k],
            _ => u.arbitrary()?,
        })
    }

    fn tried(&self, u: &mut Unstructured) -> Result<Vec<u32>> {
        let n = u.int_in_range(0..=3)?;
        (0..n).map(|_| self.node(u)).collect()
    }

    fn picked(&mut self, r: std::result::Result<u32, rsbalancer::balancer::Error>, pool: usize) {
        if let Ok(node) = r {
            assert!(
                self.nodes[pool].contains(&node),
                "picked {node}, not of pool {pool}"
            );
            *self.outstanding.entry(node).or_default() += 1;
            self.open.push(node);
        }
    }

    fn report(&mut self, k: usize, status: u32, latency_us: u32, retry_after_ms: u32) {
        let node = self.open.swap_remove(k);
        self.b
            .report(node, status, latency_us, retry_after_ms)
            .expect("report of a picked node");
        *self.outstanding.get_mut(&node).unwrap() -= 1;
    }

    /// A verdict that holds an admission (or a queue entry).
    fn verdict(&mut self, v: Verdict, entry: u32, ticket: u64) {
        match v {
            Verdict::Go | Verdict::GoProbe => self.held += 1,
            Verdict::Queued => self.queued.push((entry, ticket)),
            _ => {}
        }
    }

    fn step(&mut self, u: &mut Unstructured) -> Result<()> {
        let pool = u.int_in_range(0..=1)?;
        let p = self.pools[pool];
        let op = u.int_in_range(0..=12)?;
        if trace() {
            eprintln!(
                "step: pool {pool} op {op} held {} queued {:?} open {:?}",
                self.held, self.queued, self.open
            );
        }
        match op {
            0 => {
                let key: Vec<u8> = u.arbitrary()?;
                let tried = self.tried(u)?;
                let r = self.b.pick(p, &key, &tried);
                self.picked(r, pool);
            }
            1 => {
                let key: Vec<u8> = u.arbitrary()?;
                let tried = self.tried(u)?;
                let prefer = if u.arbitrary()? {
                    Prefer::Probe
                } else {
                    Prefer::Confirmed
                };
                let r = self.b.pick_with(p, &key, &tried, prefer);
                self.picked(r, pool);
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
                // A report for a node with nothing in flight must not wrap its count.
                let node = self.node(u)?;
                if self.outstanding.get(&node).copied().unwrap_or(0) == 0 {
                    let _ = self.b.report(node, 200, 1000, 0);
                }
            }
            5 => {
                let priority = u.int_in_range(0..=11)?;
                let r = rsbalancer::admit::admit(&self.b, p, priority);
                if trace() {
                    eprintln!("  admit({priority}) = {r:?}");
                }
                if let Ok((v, entry, ticket)) = r {
                    if pool == 0 {
                        if matches!(v, Verdict::Go | Verdict::GoProbe) {
                            self.check_capacity();
                        }
                        self.verdict(v, entry, ticket);
                    } else {
                        // Queueing is off there: nothing is held.
                        assert!(
                            matches!(v, Verdict::Pass | Verdict::NoNode | Verdict::Shed),
                            "{v:?}"
                        );
                    }
                }
            }
            6 if !self.queued.is_empty() => {
                let k = u.choose_index(self.queued.len())?;
                let (entry, ticket) = self.queued[k];
                let (v, _) = rsbalancer::admit::admit_poll(&self.b, self.pools[0], entry, ticket).expect("poll");
                if trace() {
                    eprintln!("  poll({entry}, {ticket}) = {v:?}");
                }
                if v != Verdict::Wait {
                    self.queued.swap_remove(k);
                    self.verdict(v, entry, ticket);
                }
            }
            7 if !self.queued.is_empty() => {
                let k = u.choose_index(self.queued.len())?;
                let (entry, ticket) = self.queued.swap_remove(k);
                rsbalancer::admit::admit_leave(&self.b, self.pools[0], entry, ticket).expect("leave");
            }
            8 if self.held > 0 => {
                rsbalancer::admit::admit_release(&self.b, self.pools[0]).expect("release");
                self.held -= 1;
            }
            9 => {
                let node = self.node(u)?;
                let _ = self.b.set_weight(node, u.int_in_range(0..=10_001)?);
            }
            10 => {
                let tried = self.tried(u)?;
                let _ = self.b.may_retry(p, &tried, u.arbitrary()?);
            }
            11 => {
                let _ = self.b.available(p);
                let _ = self.b.slow_wait_ms(p);
            }
            12 => {
                let _ = self.b.attach_worker(u.int_in_range(0..=3)?);
            }
            // Bogus entries and pools answer errors or refusals, never change a count.
            _ => {
                let _ = rsbalancer::admit::admit_poll(&self.b, u.arbitrary()?, u.arbitrary()?, u.arbitrary()?);
                let _ = self
                    .b
                    .admit_leave(p, u.int_in_range(128..=u32::MAX)?, u.arbitrary()?);
            }
        }
        Ok(())
    }

    fn check_capacity(&self) {
        let (admitted, _) = rsbalancer::admit::admission_state(&self.b, self.pools[0]).unwrap();
        let slots: &[u32] = &self.nodes[0];
        if let Ok(cap) = capacity(self.b.region(), &[slots], clock::now_ms()) {
            let total = cap.safe.saturating_add(cap.probe);
            assert!(admitted <= total, "admitted {admitted} > capacity {cap:?}");
        }
    }

    fn check(&self) {
        for node in self.all_nodes() {
            // The slot's counter, as `node_stats` reads it (without its tally, which is
            // slow to compute after every step).
            let inflight = self
                .b
                .region()
                .node(node)
                .unwrap()
                .inflight
                .load(Ordering::Relaxed);
            let want = self.outstanding.get(&node).copied().unwrap_or(0);
            assert_eq!(inflight, want, "in-flight of node {node}");
        }
        let (admitted, waiting) = rsbalancer::admit::admission_state(&self.b, self.pools[0]).unwrap();
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
            rsbalancer::admit::admit_leave(&self.b, self.pools[0], entry, ticket).unwrap();
        }
        for _ in 0..std::mem::take(&mut self.held) {
            rsbalancer::admit::admit_release(&self.b, self.pools[0]).unwrap();
        }
        for node in self.all_nodes() {
            assert_eq!(self.b.node_stats(node).unwrap().inflight, 0, "node {node} idle");
        }
        assert_eq!(
            rsbalancer::admit::admission_state(&self.b, self.pools[0]).unwrap(),
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
static KEPT: Mutex<Option<Balancer>> = Mutex::new(None);

fn balancer() -> Balancer {
    static CFG: OnceLock<Config> = OnceLock::new();
    static FRESH: OnceLock<bool> = OnceLock::new();
    let cfg = CFG.get_or_init(|| Config::from_json(CONFIG).expect("the harness config is valid"));
    static USES: AtomicU32 = AtomicU32::new(0);
    let fresh = *FRESH.get_or_init(|| std::env::var_os("RSB_FUZZ_FRESH").is_some());
    // A new one every 1000 inputs all the same: a long Retry-After can cool a node of
    // the kept one for days.
    let kept = match fresh || USES.fetch_add(1, Ordering::Relaxed).is_multiple_of(1000) {
        true => None,
        false => KEPT.lock().unwrap().take(),
    };
    kept.unwrap_or_else(|| Balancer::create(cfg).expect("region"))
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
    *KEPT.lock().unwrap() = Some(h.b);
});
