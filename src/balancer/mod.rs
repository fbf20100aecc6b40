//! The balancer: one shared region plus this process's selection tables.
//!
//! Shared (in the region): every node's counters, learned latency, in-flight count,
//! base weight and availability, and the active topology as JSON text. Local (in
//! each worker): the selectors built from that topology, a random generator, and
//! the effective weights, refreshed every `refresh_ms` from the shared counters.
//!
//! A change of topology or weight bumps the region's generation; a worker notices on
//! its next pick (one atomic load) and rebuilds (topology) or refreshes (weights).
//! `pick` and `report` never take the shared lock and never allocate.
//!
//! The pool layer, in files: this one (the handle, its errors, worker slots, lookups
//! and operator changes of one node or pool), `configure` (loading a config, slot
//! assignment, staging), `local` (this process's tables), `pick` (choosing, the
//! retry check, availability) and `report` (feedback from a try, health results).
//! Below it: the node state ([`crate::node`]), the slot parameters
//! ([`crate::params`]), statistics and the shared region; above it, the policies
//! (admission, canary, emergency, admin) and the read models use its public API.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

pub use crate::ask::{Ask, BodyFacts};
use crate::budget;
use crate::config::{Config, ConfigError, PoolConfig, Secrets};
use crate::headroom;
use crate::health::{self, Flip};
use crate::limit::{self, Busy};
use crate::load;
use crate::node;
use crate::notice::{self, Notice, Reason};
use crate::params;
use crate::retry;
use crate::select::{hash_key, Algorithm, Candidate, NodeView, PrefixOutcome, Selector, NO_KEY};
use crate::shm::layout::{emergency, flags, Capacity, NodeSlot, PoolSlot, RECENT_WINDOW_MS};
use crate::shm::owned::Owned;
use crate::shm::{clock, fork, saturating_sub, LockGuard, Region, ShmError};
use crate::tally::{self, Writer};
use crate::window::{self, Event};

mod configure;
mod limits;
mod local;
mod pick;
mod report;
mod signals;

pub use limits::Left;
use local::*;
pub use pick::{PICK_RETRY_MAX_TRIES, SLOW_WAITING_MS};

/// How long a configuration change waits for the shared lock.
const LOCK_TIMEOUT: Duration = Duration::from_secs(5);
/// A removed node's slot is reused only after this long with nothing in flight, so a
/// late report cannot land on a stranger.
const SLOT_REUSE_GRACE_MS: u64 = 60_000;
/// Base weights accepted at run time, as in the config.
pub use crate::abi::WEIGHT_RANGE;
const NO_WORKER: u32 = u32::MAX;

/// What went wrong, for Lua (`nil, err` or `error`) and C (a result code).
#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    /// The configuration was refused; nothing was changed.
    Config(ConfigError),
    /// The shared region could not be mapped, locked or written.
    Shm(ShmError),
    /// A bad argument: unknown pool or node, weight out of range.
    Invalid(String),
    /// No node of the pool can take a try now (all tried, cooling or ejected).
    NoNode { pool: String },
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Config(e) => write!(f, "{e}"),
            Error::Shm(e) => write!(f, "{e}"),
            Error::Invalid(e) => write!(f, "{e}"),
            Error::NoNode { pool } => write!(f, "no available node in pool \"{pool}\""),
        }
    }
}

impl std::error::Error for Error {}

impl From<ConfigError> for Error {
    fn from(e: ConfigError) -> Self {
        Error::Config(e)
    }
}

impl From<ShmError> for Error {
    fn from(e: ShmError) -> Self {
        Error::Shm(e)
    }
}

pub use crate::node::NodeStats;

/// The cluster sync's figures (`crate::cluster`), shared by the gateway's workers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ClusterStats {
    /// The last exchange with Redis succeeded.
    pub up: bool,
    /// Gateways alive in the fleet at the last sync.
    pub gateways: u64,
    /// Sync rounds that succeeded, and that failed.
    pub syncs: u64,
    pub errors: u64,
    /// Cooldowns taken from the fleet (learned at another gateway).
    pub cooldowns_in: u64,
    /// Time since the last round that succeeded (ms); `None` before the first.
    pub last_ok_age_ms: Option<u64>,
}
pub use crate::topology::{NodeTopo, PoolTopo, Topology};

/// Who decides whether a pool is in emergency mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EmergencyMode {
    /// The overload detector.
    Auto,
    /// An operator, forcing it on.
    On,
    /// An operator, forcing it off.
    Off,
}

/// Which free slots a pick tries first (then the others).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prefer {
    /// Confirmed slots: the node has served that concurrency before. The default: a
    /// node at its probe (a learned limit just raised) takes a try only when no node
    /// has a confirmed slot, so probes happen when the pool is saturated anyway.
    Confirmed,
    /// Probe slots first: for a request the admission queue let in above the
    /// confirmed capacity (its lowest-ranked waiter), so that it, not a better-ranked
    /// request, is the one to find out whether the node takes one more.
    Probe,
}

/// Why a request may not try once more (`rsb_retry_denied` in C).
/// cbindgen:rename-all=QualifiedScreamingSnakeCase
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum RetryDenied {
    /// `retry.max_tries` reached.
    MaxTries = 1,
    /// `retry.deadline_ms` passed.
    Deadline = 2,
    /// The pool's retry budget is spent.
    Budget = 3,
    /// No node that this request has not tried can take it now.
    NoNode = 4,
}

/// A handle on a shared region plus this process's tables.
pub struct Balancer {
    region: Arc<Region>,
    /// This process's tables: lock-free for the thread that uses the handle first
    /// (an nginx worker's only thread), locked for any other.
    local: Owned<Local>,
    /// This handle's worker slot, tagged with the fork epoch it was claimed in (high 32
    /// bits), so a forked child never uses its parent's slot.
    worker: AtomicU64,
    /// Per pool slot, a moment policies remember between their ticks on this handle
    /// (the overload detector's "calm since", `crate::emergency`): kept with the
    /// handle so that it lives and dies with it; its meaning is the policy's.
    calm_since: parking_lot::Mutex<HashMap<u32, u64>>,
    /// The config stage this process serves (`apply_stage`); 0 when the handle was
    /// only ever configured directly. Inherited across fork, like everything here.
    stage: AtomicU64,
    /// This process's header values of the nodes' providers, kept from every config
    /// loaded here (never in the region; `crate::config::provider`).
    secrets: Secrets,
    /// Node transitions this process won, until a timer logs them
    /// ([`Balancer::take_notices`]); taken only when a transition happens.
    notices: parking_lot::Mutex<notice::Queue>,
}

impl Balancer {
    /// Map a new region sized by `cfg.shm` and load `cfg` into it.
    pub fn create(cfg: &Config) -> Result<Balancer, Error> {
        let cap = Capacity {
            max_pools: cfg.shm.max_pools,
            max_nodes: cfg.shm.max_nodes,
            max_workers: cfg.shm.max_workers,
            config_bytes: cfg.shm.config_bytes,
            max_waiters: cfg.shm.queue_slots,
        };
        let b = Balancer::attach(Arc::new(Region::create(cap)?));
        b.configure(cfg)?;
        Ok(b)
    }

    /// Another handle on an existing region (same process or inherited across fork).
    pub fn attach(region: Arc<Region>) -> Balancer {
        // A dead worker's admissions and queue entries go back with its in-flight shares.
        region.set_reaper(crate::admission::queue::reap_owner);
        Balancer {
            region,
            local: Owned::new(Local::empty(true), Local::empty(false)),
            worker: AtomicU64::new(NO_WORKER as u64),
            calm_since: Default::default(),
            stage: AtomicU64::new(0),
            secrets: Secrets::default(),
            notices: Default::default(),
        }
    }

    pub fn region(&self) -> &Arc<Region> {
        &self.region
    }

    /// The header values of the providers of the configs loaded in this process.
    pub fn secrets(&self) -> &Secrets {
        &self.secrets
    }

    /// Claim this process's worker slot (nginx: `ngx.worker.id()`), reclaiming the
    /// in-flight shares of dead workers first. Returns the slot used.
    pub fn attach_worker(&self, want: u32) -> Result<u32, Error> {
        if let Some(current) = self.worker_slot() {
            // One slot per handle: a second call keeps the first (its shares stay valid).
            self.region.reap_dead_workers();
            return Ok(current);
        }
        let w = self.region.attach_worker(want)?;
        self.worker
            .store((fork::epoch() << 32) | w as u64, Ordering::Relaxed);
        Ok(w)
    }

    /// This handle's worker slot in this process, if it claimed one.
    fn worker_slot(&self) -> Option<u32> {
        self.worker_slot_at(fork::epoch())
    }

    /// [`worker_slot`](Self::worker_slot) with the fork epoch known (the tables'
    /// `Local::fork_epoch`, which `sync` has just checked).
    fn worker_slot_at(&self, epoch: u64) -> Option<u32> {
        let v = self.worker.load(Ordering::Relaxed);
        let w = v as u32;
        (w != NO_WORKER && v >> 32 == epoch & 0xffff_ffff).then_some(w)
    }

    /// The tally row this call adds statistics to, given this handle's worker slot,
    /// and how (`crate::tally`): the worker's own row from the thread that owns this
    /// handle's tables, else the shared row.
    fn tally(&self, worker: Option<u32>) -> (u32, Writer) {
        self.tally_as(worker, self.local.is_owner())
    }

    /// [`tally`](Self::tally) with the answer to "is this the owner thread?" known.
    fn tally_as(&self, worker: Option<u32>, owner: bool) -> (u32, Writer) {
        match worker {
            Some(w) if owner => (w, Writer::Owned),
            _ => (self.region.capacity().max_workers, Writer::Shared),
        }
    }

    /// Release this process's worker slot, folding its shares back.
    pub fn detach_worker(&self) {
        if let Some(w) = self.worker_slot() {
            self.worker.store(NO_WORKER as u64, Ordering::Relaxed);
            self.region.detach_worker(w);
        }
    }

    /// The generation this region is at (changes with any topology or weight change).
    pub fn generation(&self) -> u64 {
        // Acquire pairs with the Release in `bump` (the caller only shows the number).
        self.region.header().generation.load(Ordering::Acquire)
    }

    /// The shared word [`generation`](Self::generation) reads, for `rsb_generation_word`:
    /// it lives as long as the region, which this handle keeps mapped.
    pub fn generation_word(&self) -> *const u64 {
        self.region.header().generation.as_ptr()
    }

    /// The active topology (rebuilding local tables if it changed).
    pub fn topology(&self) -> Result<Arc<Topology>, Error> {
        let mut l = self.local.lock();
        self.sync(&mut l)?;
        Ok(l.topo.clone())
    }

    /// Pool slot of a pool name.
    pub fn pool_index(&self, name: &str) -> Result<u32, Error> {
        let mut l = self.local.lock();
        self.sync(&mut l)?;
        l.by_name
            .get(name)
            .copied()
            .ok_or_else(|| Error::Invalid(format!("unknown pool \"{name}\"")))
    }

    /// Node slot of a node id in a pool.
    pub fn node_index(&self, pool: &str, id: &str) -> Result<u32, Error> {
        let topo = self.topology()?;
        let p = topo
            .pool(pool)
            .ok_or_else(|| Error::Invalid(format!("unknown pool \"{pool}\"")))?;
        p.nodes
            .iter()
            .find(|n| n.id == id)
            .map(|n| n.slot)
            .ok_or_else(|| Error::Invalid(format!("unknown node \"{id}\" in pool \"{pool}\"")))
    }

    /// Live numbers of a node slot.
    pub fn node_stats(&self, node: u32) -> Result<NodeStats, Error> {
        self.live_node(node)?;
        Ok(node::stats(&self.region, node))
    }

    fn live_node(&self, node: u32) -> Result<&NodeSlot, Error> {
        self.region
            .node(node)
            // Acquire pairs with the Release of IN_USE in `apply`: the node's fields.
            .filter(|n| n.flags.load(Ordering::Acquire) & flags::IN_USE != 0)
            .ok_or_else(|| Error::Invalid(format!("unknown node slot {node}")))
    }

    /// Change a node's base weight; every worker uses it on its next pick.
    pub fn set_weight(&self, node: u32, weight: u32) -> Result<(), Error> {
        if !WEIGHT_RANGE.contains(&weight) {
            return Err(Error::Invalid(format!(
                "weight {weight} is out of range {}..={}",
                WEIGHT_RANGE.start(),
                WEIGHT_RANGE.end()
            )));
        }
        let guard = self.region.lock(LOCK_TIMEOUT)?;
        self.live_node(node)?.weight.store(weight, Ordering::Relaxed);
        self.bump(&guard);
        Ok(())
    }

    /// Set the share of `pool`'s requests sent to its canary pool, in parts per
    /// 10,000 (0..=10000); refused for a pool without a canary. Clears a previous
    /// automatic rollback. Takes effect in every
    /// worker at its next request (the share is read from the shared slot).
    pub fn set_canary_share(&self, pool: u32, parts: u32) -> Result<(), Error> {
        if parts > crate::params::PARTS {
            return Err(Error::Invalid(format!(
                "canary share {parts} is out of range 0..=10000 (parts per 10,000)"
            )));
        }
        let ps = self.live_pool(pool)?;
        if ps.canary_pool.load(Ordering::Relaxed) == 0 {
            let name = self.topology().ok().and_then(|t| {
                let p = t.pools.iter().find(|p| p.slot == pool)?;
                Some(format!("pool \"{}\"", p.name))
            });
            return Err(Error::Invalid(format!(
                "{} has no canary (configure one with \"canary\": {{\"pool\": ...}})",
                name.unwrap_or_else(|| format!("pool index {pool}"))
            )));
        }
        ps.canary_share.store(parts, Ordering::Relaxed);
        ps.canary_rolled_back.store(0, Ordering::Relaxed);
        Ok(())
    }

    /// Set the canary share as another gateway of the fleet left it (`crate::cluster`):
    /// by hand, or 0 with `rolled_back` by a rollback. Like [`Self::set_canary_share`],
    /// it ends a ramp running here.
    pub fn share_canary(&self, pool: u32, parts: u32, rolled_back: bool) -> Result<(), Error> {
        self.set_canary_share(pool, parts)?;
        if rolled_back {
            let ps = self.live_pool(pool)?;
            ps.canary_rolled_back.store(1, Ordering::Release);
        }
        Ok(())
    }

    /// Drain a node (`true`: no new tries, those in flight finish) or put it back.
    pub fn set_draining(&self, node: u32, draining: bool) -> Result<(), Error> {
        let n = self.live_node(node)?;
        // Release pairs with the Acquire flag loads (`live_node`, `reusable`); nothing
        // rides on DRAINING itself, which the pick path reads on its own (Relaxed).
        if draining {
            n.flags.fetch_or(flags::DRAINING, Ordering::Release);
        } else {
            n.flags.fetch_and(!flags::DRAINING, Ordering::Release);
        }
        Ok(())
    }

    pub(crate) fn calm_since(&self) -> &parking_lot::Mutex<HashMap<u32, u64>> {
        &self.calm_since
    }

    /// This handle's worker slot in this process, if it claimed one.
    pub(crate) fn worker_index(&self) -> Option<u32> {
        self.worker_slot()
    }

    pub(crate) fn live_pool(&self, pool: u32) -> Result<&PoolSlot, Error> {
        self.region
            .pool(pool)
            // Acquire pairs with the Release of `in_use` in `apply`: the slot's parameters.
            .filter(|p| p.in_use.load(Ordering::Acquire) != 0)
            .ok_or_else(|| Error::Invalid(format!("unknown pool index {pool}")))
    }

    /// This process's effective weight of every node slot of the active topology (base
    /// weight × slow start × success share × latency factor, as its selectors use
    /// them; refreshed first when due). Worker-local: other workers' may differ a little.
    pub fn effective_weights(&self) -> Result<HashMap<u32, f64>, Error> {
        let now = clock::now_ms();
        let mut l = self.local.lock();
        self.sync(&mut l)?;
        let mut out = HashMap::new();
        for p in l.pools.iter_mut().flatten() {
            if now >= p.next_refresh_ms {
                p.refresh(&self.region, now);
            }
            for tier in [&p.primary, &p.backup] {
                out.extend(tier.slots.iter().zip(&tier.cands).map(|(&s, c)| (s, c.weight)));
            }
        }
        Ok(out)
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.detach_worker();
    }
}

/// One pool as this process's tables see it, for `/metrics` (`crate::metrics`).
#[derive(Clone, Debug)]
pub struct LocalPoolView {
    /// Pool slot.
    pub slot: u32,
    /// Reference latency (µs) idle nodes decay toward: the median of the primaries.
    pub reference_us: f64,
    /// Peak-EWMA time constant (ms).
    pub decay_ms: u32,
    /// (node slot, effective weight) of every node, primaries then backups.
    pub weights: Vec<(u32, f64)>,
}

impl Balancer {
    /// The active topology and, per pool, the effective weights and reference latency
    /// this process selects with. Pools due a refresh (`refresh_ms`) are refreshed
    /// first, as `pick` would, so a worker that serves no traffic reports current
    /// weights. Takes this process's local mutex (never contended in an nginx worker)
    /// and the shared lock only when the topology changed since the last call.
    pub fn local_view(&self) -> Result<(Arc<Topology>, Vec<LocalPoolView>), Error> {
        let now = clock::now_ms();
        let mut l = self.local.lock();
        self.sync(&mut l)?;
        let mut out = Vec::new();
        for (slot, p) in l.pools.iter_mut().enumerate() {
            let Some(p) = p else { continue };
            if now >= p.next_refresh_ms {
                p.refresh(&self.region, now);
            }
            let weights = [&p.primary, &p.backup]
                .iter()
                .flat_map(|t| t.slots.iter().copied().zip(t.cands.iter().map(|c| c.weight)))
                .collect();
            out.push(LocalPoolView {
                slot: slot as u32,
                reference_us: p.reference_us,
                decay_ms: p.policy.ewma.decay_ms,
                weights,
            });
        }
        Ok((l.topo.clone(), out))
    }
}
