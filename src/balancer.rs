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

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::budget;
use crate::config::{Config, ConfigError, EwmaConfig, RetryConfig};
use crate::health::{self, Busy, Flip};
use crate::load;
use crate::node;
use crate::params;
use crate::retry;
use crate::select::{hash_key, Algorithm, Candidate, NodeView, Selector};
use crate::shm::layout::{emergency, flags, Capacity, NodeSlot, PoolSlot, LATENCY_BOUNDS_MS};
use crate::shm::owned::Owned;
use crate::shm::{clock, fork, saturating_sub, LockGuard, Region, ShmError};
use crate::tally::{self, Writer};
use crate::window::{self, Event};

/// How long a configuration change waits for the shared lock.
const LOCK_TIMEOUT: Duration = Duration::from_secs(5);
/// A removed node's slot is reused only after this long with nothing in flight, so a
/// late report cannot land on a stranger.
const SLOT_REUSE_GRACE_MS: u64 = 60_000;
/// Base weights accepted at run time, as in the config.
pub const WEIGHT_RANGE: std::ops::RangeInclusive<u32> = 1..=10_000;
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
pub use crate::topology::{NodeTopo, PoolTopo, Topology};

/// What a reported try does to a node's latency estimate.
enum Feed {
    Sample(f64),
    /// Leave it as it is.
    Skip,
    /// Forget it: the node was just taken out and returns as unknown.
    Forget,
}

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

/// Why a request may not try once more.
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

fn local_pool(pools: &mut [Option<LocalPool>], pool: u32) -> Result<&mut LocalPool, Error> {
    pools
        .get_mut(pool as usize)
        .and_then(Option::as_mut)
        .ok_or_else(|| Error::Invalid(format!("unknown pool index {pool}")))
}

/// How long (ms) a poll of `slow_wait_ms` marks a pool as having requests waiting for
/// a faster node: a little over the 1-2 ms between polls and the coarse clock's tick.
pub const SLOW_WAITING_MS: u64 = 10;

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
}

struct Local {
    generation: u64,
    config_version: u64,
    topo: Arc<Topology>,
    /// Indexed by pool slot.
    pools: Vec<Option<LocalPool>>,
    by_name: HashMap<String, u32>,
    rng: SmallRng,
    fork_epoch: u64,
}

impl Local {
    /// Tables that the first `sync` fills.
    fn empty() -> Local {
        Local {
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

struct LocalPool {
    name: String,
    algorithm: Algorithm,
    retry: RetryConfig,
    ewma: EwmaConfig,
    slow_start_ms: u32,
    refresh_ms: u32,
    next_refresh_ms: u64,
    /// Median latency of the primaries (µs): idle nodes decay toward it.
    reference_us: f64,
    /// Whether `reference_us` comes from samples (else it is `default_rtt_ms`).
    sampled: bool,
    /// Whether some node had a learned concurrency limit at the last refresh: only
    /// then do picks tell confirmed slots from probes (see [`Prefer`]).
    limited: bool,
    /// `limit.slow_factor` (0: off): see [`Tier::slow_extra_us`].
    slow_factor: f64,
    primary: Tier,
    backup: Tier,
}

struct Tier {
    slots: Vec<u32>,
    cands: Vec<Candidate>,
    /// Smoothed success share per node, and the counters seen at the last refresh.
    success: Vec<f64>,
    seen: Vec<Seen>,
    /// Smoothed mean latency (µs) of each node's served tries between refreshes; 0
    /// until it has served one.
    mean_us: Vec<f64>,
    /// Per node, at the last refresh: how much slower (µs) its mean latency is than
    /// the fastest primary's in service, if at least `slow_factor` times as slow;
    /// else 0. A slow node takes a try only when no other node of its tier can.
    slow_extra_us: Vec<f64>,
    selector: Selector,
}

/// How selection sees the shared slots of one tier for one request.
struct View<'a> {
    region: &'a Region,
    slots: &'a [u32],
    tried: &'a [u32],
    now_ms: u64,
    tau_ms: u32,
    reference_us: f64,
    /// Only nodes with (`Some(true)`) or without (`Some(false)`) a confirmed free
    /// slot, see [`confirmed_slot`]; `None`: any.
    confirmed: Option<bool>,
    /// Leave out the slow nodes (`Tier::slow_extra_us` not 0).
    slow_extra_us: Option<&'a [f64]>,
}

impl View<'_> {
    fn node(&self, i: usize) -> &NodeSlot {
        // Tier slots come from the topology, whose slots are all < max_nodes.
        self.region.node(self.slots[i]).expect("topology slot in range")
    }
}

impl NodeView for View<'_> {
    fn eligible(&self, i: usize) -> bool {
        let slot = self.slots[i];
        if self.tried.contains(&slot) || self.slow_extra_us.is_some_and(|x| x[i] > 0.0) {
            return false;
        }
        let n = self.node(i);
        // The limit and in-flight count loaded once for both questions.
        let (limit, inflight) = (
            n.limit.load(Ordering::Relaxed),
            n.inflight.load(Ordering::Relaxed),
        );
        node::available_with(n, self.now_ms, limit, inflight)
            && self
                .confirmed
                .is_none_or(|want| node::confirmed_slot(self.region, slot, limit, inflight) == want)
    }

    fn inflight(&self, i: usize) -> u32 {
        self.node(i).inflight.load(Ordering::Relaxed)
    }

    fn latency(&self, i: usize) -> f64 {
        let word = self.node(i).ewma.load(Ordering::Relaxed);
        load::current(word, self.now_ms, self.tau_ms, self.reference_us)
    }
}

fn os_rng() -> SmallRng {
    let mut seed = rand::rngs::OsRng;
    SmallRng::try_from_rng(&mut seed)
        .unwrap_or_else(|_| SmallRng::seed_from_u64(std::process::id() as u64 ^ clock::now_ms()))
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
        region.set_reaper(crate::admit::queue::reap_owner);
        Balancer {
            region,
            local: Owned::new(Local::empty(), Local::empty()),
            worker: AtomicU64::new(NO_WORKER as u64),
            calm_since: Default::default(),
            stage: AtomicU64::new(0),
        }
    }

    pub fn region(&self) -> &Arc<Region> {
        &self.region
    }

    /// Load a new configuration: nodes whose (pool, id) remain keep their slot and
    /// everything learned; new nodes start in slow start; removed nodes stop being
    /// picked at once. All checks run before anything is changed.
    pub fn configure(&self, cfg: &Config) -> Result<(), Error> {
        self.check_capacity(cfg)?;
        let guard = self.region.lock(LOCK_TIMEOUT)?;
        let old = Topology::parse(&self.region.read_text(&guard));
        self.commit(&guard, &old, cfg, 0)
    }

    /// [`Balancer::create`] for nginx's master at its first start: the config is live
    /// at once (no worker runs yet) as stage 1 (see [`Balancer::stage`]).
    pub fn create_staged(cfg: &Config) -> Result<(Balancer, u64), Error> {
        let b = Balancer::create(cfg)?;
        let h = b.region.header();
        let seq = h.stage_seq.fetch_add(1, Ordering::AcqRel) + 1;
        h.applied_stage.store(seq, Ordering::Release);
        b.stage.store(seq, Ordering::Relaxed);
        Ok((b, seq))
    }

    /// Check `cfg` against the running region as [`Balancer::configure`] would (every
    /// field, capacities, free slots, the text size) without changing anything, and
    /// number it: the stage that [`Balancer::apply_stage`] makes live later.
    ///
    /// Why: nginx runs `init_by_lua` in the master during a reload before it knows
    /// whether the reload succeeds (a `listen` on a busy port, a bad log path). A
    /// config applied there would be live in the old workers even when the reload is
    /// then refused. Staged, it goes live when the first new worker starts, and the
    /// old workers finish on the tables they began with.
    pub fn stage(&self, cfg: &Config) -> Result<u64, Error> {
        self.check_capacity(cfg)?;
        let guard = self.region.lock(LOCK_TIMEOUT)?;
        let old = Topology::parse(&self.region.read_text(&guard));
        self.plan(&old, cfg, clock::now_ms())?;
        drop(guard);
        Ok(self.region.header().stage_seq.fetch_add(1, Ordering::AcqRel) + 1)
    }

    /// Make stage `seq` (numbered by [`Balancer::stage`] for `cfg`) live, unless it or
    /// a later stage already is; from now on this process serves stage `seq`. True
    /// when this call applied it (the first new worker), false when another had.
    pub fn apply_stage(&self, seq: u64, cfg: &Config) -> Result<bool, Error> {
        self.stage.store(seq, Ordering::Relaxed);
        let guard = self.region.lock(LOCK_TIMEOUT)?;
        let applied = &self.region.header().applied_stage;
        if applied.load(Ordering::Acquire) >= seq {
            return Ok(false);
        }
        let old = Topology::parse(&self.region.read_text(&guard));
        self.commit(&guard, &old, cfg, 0)?;
        // Release pairs with the Acquire in `superseded`: a process that sees the new
        // stage also sees the topology written above.
        applied.store(seq, Ordering::Release);
        Ok(true)
    }

    /// Is stage `seq` (or a later one) live?
    pub fn stage_is_live(&self, seq: u64) -> bool {
        self.region.header().applied_stage.load(Ordering::Acquire) >= seq
    }

    /// Has a later stage than this process's gone live? Then this process belongs to
    /// an nginx generation that is shutting down: it keeps the tables it has.
    fn superseded(&self) -> bool {
        let mine = self.stage.load(Ordering::Relaxed);
        mine != 0 && self.region.header().applied_stage.load(Ordering::Acquire) > mine
    }

    /// The region's capacities are fixed: a config must ask for the same.
    fn check_capacity(&self, cfg: &Config) -> Result<(), Error> {
        let cap = self.region.capacity();
        for (field, want, have) in [
            ("shm.max_nodes", cfg.shm.max_nodes, cap.max_nodes),
            ("shm.max_pools", cfg.shm.max_pools, cap.max_pools),
            ("shm.max_workers", cfg.shm.max_workers, cap.max_workers),
            ("shm.config_bytes", cfg.shm.config_bytes, cap.config_bytes),
            ("shm.queue_slots", cfg.shm.queue_slots, cap.max_waiters),
        ] {
            if want != have {
                return Err(Error::Config(ConfigError {
                    path: field.into(),
                    message: format!(
                        "{want} differs from the running region's {have}; capacities are fixed until nginx restarts"
                    ),
                }));
            }
        }
        Ok(())
    }

    /// Like [`Balancer::configure`], with the config built from the active topology
    /// under the same hold of the shared lock, so that concurrent run-time changes
    /// (`crate::admin`) never lose one another. Node flags in `keep` (besides `DOWN`)
    /// survive the change.
    pub(crate) fn reconfigure(
        &self,
        keep: u32,
        build: impl FnOnce(&Topology) -> Result<Config, Error>,
    ) -> Result<(), Error> {
        let guard = self.region.lock(LOCK_TIMEOUT)?;
        let old = Topology::parse(&self.region.read_text(&guard));
        let cfg = build(&old)?;
        self.commit(&guard, &old, &cfg, keep)
    }

    /// Assign slots, check the size, write slot state and the topology text, bump.
    fn commit(&self, guard: &LockGuard<'_>, old: &Topology, cfg: &Config, keep: u32) -> Result<(), Error> {
        let now = clock::now_ms();
        let (new, text) = self.plan(old, cfg, now)?;
        self.apply(guard, old, &new, cfg, now, keep);
        self.region.write_text(guard, &text)?;
        self.bump(guard);
        Ok(())
    }

    /// The new topology and its text, checked to fit, without touching the region.
    fn plan(&self, old: &Topology, cfg: &Config, now: u64) -> Result<(Topology, Vec<u8>), Error> {
        let cap = self.region.capacity();
        let new = self.assign_slots(old, cfg, now)?;
        let text = serde_json::to_vec(&new).expect("topology serializes");
        if text.len() > cap.config_bytes as usize {
            return Err(Error::Config(ConfigError {
                path: "shm.config_bytes".into(),
                message: format!(
                    "{} is too small: this config needs {} bytes in shared memory",
                    cap.config_bytes,
                    text.len()
                ),
            }));
        }
        Ok((new, text))
    }

    /// Choose stable slots for the new topology, without touching the region.
    fn assign_slots(&self, old: &Topology, cfg: &Config, now: u64) -> Result<Topology, Error> {
        let cap = self.region.capacity();
        let mut pool_taken = vec![false; cap.max_pools as usize];
        let mut node_taken = vec![false; cap.max_nodes as usize];
        let old_pool: HashMap<&str, &PoolTopo> = old.pools.iter().map(|p| (p.name.as_str(), p)).collect();
        let mut keep_node: HashMap<(&str, &str), u32> = HashMap::new();
        for (name, pc) in &cfg.pools {
            if let Some(op) = old_pool.get(name.as_str()) {
                pool_taken[op.slot as usize] = true;
                for on in &op.nodes {
                    if pc.nodes.iter().any(|n| n.id == on.id) {
                        node_taken[on.slot as usize] = true;
                        keep_node.insert((name.as_str(), on.id.as_str()), on.slot);
                    }
                }
            }
        }
        // Nodes of the old topology stay reserved (REMOVED) until their grace ends.
        let old_slots: std::collections::HashSet<u32> = old
            .pools
            .iter()
            .flat_map(|p| p.nodes.iter().map(|n| n.slot))
            .collect();
        let reusable = |i: u32| -> bool {
            let n = self.region.node(i).expect("in range");
            let f = n.flags.load(Ordering::Acquire);
            if f & flags::REMOVED != 0 {
                return n.inflight.load(Ordering::Acquire) == 0
                    && now.saturating_sub(n.removed_ms.load(Ordering::Relaxed)) >= SLOT_REUSE_GRACE_MS;
            }
            // IN_USE but absent from the active topology: left by a writer that died.
            !old_slots.contains(&i)
        };
        let mut next_free = {
            let mut cursor = 0u32;
            move |taken: &mut Vec<bool>| -> Option<u32> {
                // Prefer never-used slots, then reusable removed ones.
                let fresh = (cursor..cap.max_nodes).find(|&i| {
                    !taken[i as usize]
                        && self
                            .region
                            .node(i)
                            .expect("in range")
                            .flags
                            .load(Ordering::Acquire)
                            == 0
                });
                let pick = fresh.or_else(|| (0..cap.max_nodes).find(|&i| !taken[i as usize] && reusable(i)));
                if let Some(i) = pick {
                    taken[i as usize] = true;
                    cursor = i;
                }
                pick
            }
        };
        let mut pools = Vec::new();
        for (name, pc) in &cfg.pools {
            let slot = match old_pool.get(name.as_str()) {
                Some(op) => op.slot,
                None => {
                    let i = (0..cap.max_pools)
                        .find(|&i| !pool_taken[i as usize])
                        .ok_or_else(|| {
                            Error::Config(ConfigError {
                                path: "shm.max_pools".into(),
                                message: format!("{} pool slots are all in use", cap.max_pools),
                            })
                        })?;
                    pool_taken[i as usize] = true;
                    i
                }
            };
            let mut nodes = Vec::new();
            for (k, nc) in pc.nodes.iter().enumerate() {
                let slot = match keep_node.get(&(name.as_str(), nc.id.as_str())) {
                    Some(&s) => s,
                    None => next_free(&mut node_taken).ok_or_else(|| {
                        Error::Config(ConfigError {
                            path: format!("pools.{name}.nodes[{k}]"),
                            message: format!(
                                "no free node slot: shm.max_nodes {} is exhausted (removed nodes free theirs {} s after their last request)",
                                cap.max_nodes,
                                SLOT_REUSE_GRACE_MS / 1000
                            ),
                        })
                    })?,
                };
                nodes.push(NodeTopo {
                    id: nc.id.clone(),
                    host: nc.host().to_string(),
                    addr: nc.resolved.ok_or_else(|| {
                        Error::Invalid(format!(
                            "pools.{name}.nodes[{k}].addr: not resolved (config not validated)"
                        ))
                    })?,
                    slot,
                    backup: nc.backup,
                });
            }
            pools.push(PoolTopo {
                name: name.clone(),
                slot,
                algorithm: pc.algorithm,
                ewma: pc.ewma.clone(),
                slow_start_ms: pc.slow_start_ms,
                refresh_ms: pc.refresh_ms,
                chash_points: pc.chash_points,
                retry: pc.retry.clone(),
                cooldown: pc.cooldown.clone(),
                limit: pc.limit.clone(),
                outlier: pc.outlier.clone(),
                health: pc.health.clone(),
                no_node_status: pc.no_node_status,
                window_ms: pc.window_ms,
                nodes,
                canary: pc.canary.clone(),
                emergency: pc.emergency.clone(),
                admission: pc.admission.clone(),
            });
        }
        Ok(Topology { pools })
    }

    /// Write slot state for the new topology (lock held).
    fn apply(&self, _g: &LockGuard<'_>, old: &Topology, new: &Topology, cfg: &Config, now: u64, keep: u32) {
        let r = &self.region;
        for p in &old.pools {
            if new.pool(&p.name).is_none() {
                r.pool(p.slot)
                    .expect("in range")
                    .in_use
                    .store(0, Ordering::Release);
            }
            for n in &p.nodes {
                let gone = new
                    .pool(&p.name)
                    .is_none_or(|np| np.nodes.iter().all(|x| x.slot != n.slot));
                if gone {
                    let s = r.node(n.slot).expect("in range");
                    s.removed_ms.store(now, Ordering::Relaxed);
                    s.flags.store(flags::REMOVED, Ordering::Release);
                }
            }
        }
        let old_slots: std::collections::HashSet<u32> = old
            .pools
            .iter()
            .flat_map(|p| p.nodes.iter().map(|n| n.slot))
            .collect();
        for p in &new.pools {
            let pc = &cfg.pools[&p.name];
            let ps = r.pool(p.slot).expect("in range");
            params::store_pool(r, old, new, p, now);
            ps.in_use.store(1, Ordering::Release);
            for (n, nc) in p.nodes.iter().zip(&pc.nodes) {
                let s = r.node(n.slot).expect("in range");
                if !old_slots.contains(&n.slot) {
                    node::reset(r, n.slot, now);
                }
                s.pool.store(p.slot, Ordering::Relaxed);
                s.weight.store(nc.weight, Ordering::Relaxed);
                // A cooldown learned under an older (or no) cap ends by this config's.
                let longest = p.cooldown.max_ms.max(p.cooldown.max_retry_after_ms) as u64;
                s.cooldown_until_ms.fetch_min(now + longest, Ordering::Relaxed);
                // Health (DOWN) is learned state and survives a reload; flags in `keep`
                // (DRAINING, for a run-time change) survive too.
                let down = s.flags.load(Ordering::Relaxed) & (flags::DOWN | keep);
                let f = flags::IN_USE | down | if n.backup { flags::BACKUP } else { 0 };
                s.flags.store(f, Ordering::Release);
            }
        }
    }

    fn bump(&self, _g: &LockGuard<'_>) {
        // Release: slot and text writes above are visible to a worker that sees the new
        // generation with Acquire in `sync`.
        self.region.header().generation.fetch_add(1, Ordering::Release);
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
        let v = self.worker.load(Ordering::Relaxed);
        let w = v as u32;
        (w != NO_WORKER && v >> 32 == fork::epoch() & 0xffff_ffff).then_some(w)
    }

    /// The tally row this call adds statistics to, given this handle's worker slot,
    /// and how (`crate::tally`): the worker's own row from the thread that owns this
    /// handle's tables, else the shared row.
    fn tally(&self, worker: Option<u32>) -> (u32, Writer) {
        match worker {
            Some(w) if self.local.is_owner() => (w, Writer::Owned),
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
        self.region.header().generation.load(Ordering::Acquire)
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
            .filter(|n| n.flags.load(Ordering::Acquire) & flags::IN_USE != 0)
            .ok_or_else(|| Error::Invalid(format!("unknown node slot {node}")))
    }

    /// Choose a node of `pool` for one try, skipping the slots in `tried`. The node's
    /// in-flight count is raised; `report` must be called exactly once for it. A pick
    /// with an empty `tried` counts as a request, any other as a retry, in the pool's
    /// retry budget.
    pub fn pick(&self, pool: u32, key: &[u8], tried: &[u32]) -> Result<u32, Error> {
        self.pick_with(pool, key, tried, Prefer::Confirmed)
    }

    /// [`pick`](Self::pick), choosing first among nodes with a confirmed free slot
    /// (`Prefer::Confirmed`) or at their probe (`Prefer::Probe`: a request the
    /// admission queue let in above the confirmed capacity), then among the others.
    pub fn pick_with(&self, pool: u32, key: &[u8], tried: &[u32], prefer: Prefer) -> Result<u32, Error> {
        let now = clock::now_ms();
        let mut spill = None;
        let err = match self.pick_in(pool, key, tried, now, prefer, &mut spill, true) {
            Err(e @ Error::NoNode { .. }) => e,
            other => return other,
        };
        // No node of the pool can take it: its backup pool may (emergency, dead pool).
        if let Some(bp) = spill {
            if let Ok(slot) = self.pick_in(bp, key, tried, now, prefer, &mut None, true) {
                return Ok(slot);
            }
        }
        if let Some(ps) = self.region.pool(pool) {
            ps.no_node_total.fetch_add(1, Ordering::Relaxed);
        }
        Err(err)
    }

    /// [`pick_with`](Self::pick_with) among the primaries that are not slow
    /// (`limit.slow_factor`) only, and with `Prefer::Confirmed` only into confirmed
    /// slots (no AIMD probe): `NoNode` when none of them can take a try now, without
    /// counting it. What `admit()` uses to hold a faster node's slot before
    /// the balancer phase rather than race other requests to it.
    pub fn pick_fast(&self, pool: u32, key: &[u8], tried: &[u32], prefer: Prefer) -> Result<u32, Error> {
        self.pick_in(pool, key, tried, clock::now_ms(), prefer, &mut None, false)
    }

    /// `pick` within one pool; on `NoNode`, `spill` is the pool to try next. Without
    /// `overflow`, only the primaries that are not slow are looked at.
    #[allow(clippy::too_many_arguments)]
    fn pick_in(
        &self,
        pool: u32,
        key: &[u8],
        tried: &[u32],
        now: u64,
        prefer: Prefer,
        spill: &mut Option<u32>,
        overflow: bool,
    ) -> Result<u32, Error> {
        let mut l = self.local.lock();
        self.sync(&mut l)?;
        let Local { pools, rng, .. } = &mut *l;
        let p = local_pool(pools, pool)?;
        // Until some primary has a latency sample, refresh on every pick: otherwise the
        // first node to report would look far cheaper than the unsampled ones (costed at
        // `default_rtt_ms`) and take all traffic until the next refresh.
        if now >= p.next_refresh_ms || !p.sampled {
            p.refresh(&self.region, now);
        }
        let ps = self.region.pool(pool).expect("local pool slot in range");
        let key_hash = if p.algorithm == Algorithm::Chash {
            hash_key(key)
        } else {
            0
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
        let speed_passes: &[bool] = match (overflow, p.slow_factor > 0.0) {
            (false, _) => &[true],
            (true, true) => &[true, false],
            (true, false) => &[false],
        };
        let tiers: &[bool] = if overflow { &[false, true] } else { &[false] };
        let passes = tiers.iter().flat_map(|&backup| {
            speed_passes
                .iter()
                .flat_map(move |&fast_only| confirmed_passes.iter().map(move |&c| (backup, fast_only, c)))
        });
        for (backup, fast_only, confirmed) in passes {
            let tier = if backup { &mut p.backup } else { &mut p.primary };
            let view = View {
                region: &self.region,
                slots: &tier.slots,
                tried,
                now_ms: now,
                tau_ms: p.ewma.decay_ms,
                reference_us: p.reference_us,
                confirmed,
                slow_extra_us: fast_only.then_some(&tier.slow_extra_us[..]),
            };
            if let Some(i) = tier.selector.pick(rng, &view, key_hash) {
                let slot = tier.slots[i];
                let worker = self.worker_slot();
                self.acquire(slot, worker);
                let (row, writer) = self.tally(worker);
                let retry = !tried.is_empty();
                let t = self
                    .region
                    .pool_tally(row, pool)
                    .expect("local pool slot in range");
                budget::record(&t.budget, now, p.retry.window_ms, retry, writer);
                writer.add(
                    if retry {
                        &t.retries_total
                    } else {
                        &t.requests_total
                    },
                    1,
                );
                return Ok(slot);
            }
        }
        if overflow {
            *spill = spill_target(&self.region, ps, &[&p.primary.slots, &p.backup.slots], now);
        }
        Err(Error::NoNode { pool: p.name.clone() })
    }

    fn acquire(&self, slot: u32, worker: Option<u32>) {
        let n = self.region.node(slot).expect("picked slot in range");
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
    /// after it began? Checks the pool's `max_tries`, deadline, retry budget, and that
    /// some node not yet tried could take it now. Nothing is recorded except budget
    /// refusals; the retry itself is counted by the `pick` that makes it.
    pub fn may_retry(&self, pool: u32, tried: &[u32], elapsed_ms: u32) -> Result<(), RetryDenied> {
        let now = clock::now_ms();
        let mut l = self.local.lock();
        self.sync(&mut l).map_err(|_| RetryDenied::NoNode)?;
        let p = local_pool(&mut l.pools, pool).map_err(|_| RetryDenied::NoNode)?;
        if tried.len() >= p.retry.max_tries as usize {
            return Err(RetryDenied::MaxTries);
        }
        if elapsed_ms >= p.retry.deadline_ms {
            return Err(RetryDenied::Deadline);
        }
        let ps = self.region.pool(pool).expect("local pool slot in range");
        let free = |t: &Tier| {
            t.slots
                .iter()
                .any(|s| !tried.contains(s) && self.region.node(*s).is_some_and(|n| node::available(n, now)))
        };
        let (p, spill) = self
            .serving(&l.pools, pool, now)
            .map_err(|_| RetryDenied::NoNode)?;
        let any =
            free(&p.primary) || free(&p.backup) || spill.is_some_and(|b| free(&b.primary) || free(&b.backup));
        if !any {
            return Err(RetryDenied::NoNode);
        }
        let p = local_pool(&mut l.pools, pool).map_err(|_| RetryDenied::NoNode)?;
        let (requests, retries) = tally::budget_totals(&self.region, pool, now, p.retry.window_ms);
        if !retry::allows(
            requests,
            retries,
            p.retry.budget_ratio,
            p.retry.min_per_s,
            p.retry.window_ms,
        ) {
            ps.retries_denied.fetch_add(1, Ordering::Relaxed);
            return Err(RetryDenied::Budget);
        }
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
            slots
                .iter()
                .any(|&s| self.region.node(s).is_some_and(|n| node::available(n, now)))
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
        if p.slow_factor <= 0.0 {
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
            .map_or(429, |p| p.no_node_status)
    }

    /// Report the outcome of one try handed out by `pick`: `status` is the HTTP status
    /// (0 when no response came: connect error, timeout, reset; 499 when the client
    /// left first, which only releases the try), `latency_us` the time to the
    /// response, `retry_after_ms` the server's Retry-After (0 if none).
    ///
    /// Updates, exactly once per try: in-flight, counters, the peak EWMA (failures and
    /// 429s as penalties), the learned concurrency limit, 429 cooldowns (quota) and
    /// outlier ejection (consecutive failures).
    pub fn report(&self, node: u32, status: u32, latency_us: u32, retry_after_ms: u32) -> Result<(), Error> {
        let n = self
            .region
            .node(node)
            .filter(|n| n.flags.load(Ordering::Relaxed) & (flags::IN_USE | flags::REMOVED) != 0)
            .ok_or_else(|| Error::Invalid(format!("unknown node slot {node}")))?;
        // A node removed since its pick still gets its in-flight count back. The value
        // before is the concurrency this answer came at (this try included).
        let inflight = saturating_sub(&n.inflight, 1);
        let worker = self.worker_slot();
        if let Some(share) = worker.and_then(|w| self.region.share(w, node)) {
            saturating_sub(share, 1);
        }
        let (row, writer) = self.tally(worker);
        let nt = self.region.node_tally(row, node).expect("node slot in range");
        writer.add(&nt.status_class[status_class(status)], 1);
        let pool = n.pool.load(Ordering::Relaxed);
        let (Some(ps), Some(pt)) = (self.region.pool(pool), self.region.pool_tally(row, pool)) else {
            return Ok(());
        };
        if load::is_cancelled(status) {
            return Ok(());
        }
        // The one place a node's Retry-After is bounded by the pool's policy: every use
        // below (quota or capacity, the cooldown, the penalty) sees the capped value.
        let retry_after_ms = retry_after_ms.min(ps.max_retry_after_ms.load(Ordering::Relaxed));
        let now = clock::now_ms();
        let event = if load::is_failure(status) {
            Event::Failure
        } else if status == 429 {
            Event::Busy
        } else {
            Event::Ok
        };
        window::record(
            &pt.window,
            now,
            ps.window_ms.load(Ordering::Relaxed),
            event,
            writer,
        );
        let penalty_ms = ps.penalty_ms.load(Ordering::Relaxed);
        let cap_ms = ps.penalty_cap_ms.load(Ordering::Relaxed);
        let sample: Feed = match event {
            Event::Failure => {
                let strikes = n.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
                let mut rested = false;
                if status == 503 && retry_after_ms > 0 {
                    // An overloaded node that says when to come back: rest it that long.
                    self.cool_down(n, ps, now, 1, retry_after_ms);
                    rested = true;
                }
                let after = ps.eject_after.load(Ordering::Relaxed);
                if after > 0 && strikes >= after {
                    rested |= self.eject(node, n, ps, now);
                }
                if rested {
                    Feed::Forget
                } else {
                    Feed::Sample(load::sample_us(
                        status,
                        latency_us,
                        retry_after_ms,
                        penalty_ms,
                        cap_ms,
                    ))
                }
            }
            Event::Busy => {
                n.busy.fetch_add(1, Ordering::Relaxed);
                let strikes = n.consecutive_busy.fetch_add(1, Ordering::Relaxed) + 1;
                let limit = n.limit.load(Ordering::Relaxed);
                let kind = health::classify_429(
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
                        self.cool_down(n, ps, now, strikes, retry_after_ms);
                        Feed::Forget
                    }
                    Busy::Capacity => {
                        node::note_refused(&self.region, node, inflight);
                        let (min, max) = (
                            ps.limit_min.load(Ordering::Relaxed),
                            ps.limit_max.load(Ordering::Relaxed),
                        );
                        let _ = n.limit.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| {
                            Some(health::limit_after_busy(l, inflight, min, max))
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
            // A served try (`Shed` is never the outcome of a try).
            Event::Ok | Event::Shed => {
                // Prometheus buckets are `le`: the first bound the latency does not exceed.
                let b = LATENCY_BOUNDS_MS.partition_point(|&bound| (bound as u64) * 1000 < latency_us as u64);
                writer.add(&nt.latency_hist[b], 1);
                node::note_served(&self.region, node, inflight);
                writer.add(&nt.latency_sum_us, latency_us as u64);
                reset_if_set(&n.consecutive_failures);
                reset_if_set(&n.consecutive_busy);
                if n.limit.load(Ordering::Relaxed) != 0 {
                    let (every, max) = (
                        ps.limit_increase_every.load(Ordering::Relaxed),
                        ps.limit_max.load(Ordering::Relaxed),
                    );
                    let _ = n.limit.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| {
                        Some(health::limit_after_success(l, inflight, every, max))
                    });
                }
                if n.ejections.load(Ordering::Relaxed) != 0
                    && now
                        > n.ejected_until_ms.load(Ordering::Relaxed)
                            + ps.eject_max_ms.load(Ordering::Relaxed) as u64
                {
                    n.ejections.store(0, Ordering::Relaxed);
                }
                Feed::Sample(load::sample_us(status, latency_us, 0, penalty_ms, cap_ms))
            }
        };
        match sample {
            Feed::Sample(sample) => {
                let tau = ps.decay_ms.load(Ordering::Relaxed);
                // One CAS on the packed (cost, stamp) word; a lost race retries with the
                // winner's value, so no sample is dropped.
                let _ = n.ewma.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |word| {
                    let (cost, stamp) = load::unpack(word);
                    Some(load::pack(load::observe(cost, stamp, sample, now, tau), now))
                });
            }
            // A node taken out for a while (cooldown, ejection) comes back as unknown:
            // costed at the pool median and ramped up by slow start, rather than carrying
            // a penalty that would keep p2c from ever trying it again.
            Feed::Forget => n.ewma.store(0, Ordering::Relaxed),
            Feed::Skip => {}
        }
        Ok(())
    }

    /// Rest a node whose quota is spent; it comes back in slow start.
    fn cool_down(&self, n: &NodeSlot, ps: &PoolSlot, now: u64, strikes: u32, retry_after_ms: u32) {
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
        }
        n.started_ms.fetch_max(until, Ordering::Relaxed);
    }

    /// Eject a node after consecutive failures, unless that would eject more than the
    /// pool's `max_ejected_percent` of its tier. Only one reporter ejects it. True when
    /// the node is ejected now.
    fn eject(&self, slot: u32, n: &NodeSlot, ps: &PoolSlot, now: u64) -> bool {
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
        }
        // Ejected, by us or by a concurrent reporter.
        n.ejected_until_ms.load(Ordering::Relaxed) > now
    }

    /// Take or renew the region-wide health-check lease for `ttl_ms`. True when this
    /// process holds it; a holder that died or let it expire is replaced.
    pub fn health_lease(&self, ttl_ms: u64) -> bool {
        let h = self.region.header();
        let me = std::process::id() as i32;
        let now = clock::now_ms();
        let owner = h.health_pid.load(Ordering::Acquire);
        let expired = now >= h.health_until_ms.load(Ordering::Acquire);
        let take = owner == me
            || ((owner == 0 || expired || !crate::shm::pid_alive(owner))
                && h.health_pid
                    .compare_exchange(owner, me, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok());
        if take {
            h.health_until_ms.store(now + ttl_ms, Ordering::Release);
        }
        take
    }

    /// Record one active probe of a node; returns whether it flipped up or down.
    pub fn health_report(&self, node: u32, passed: bool) -> Result<Flip, Error> {
        let n = self.live_node(node)?;
        let topo = self.topology()?;
        let h = topo
            .pools
            .iter()
            .find(|p| p.nodes.iter().any(|x| x.slot == node))
            .and_then(|p| p.health.clone())
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
        if parts > 10_000 {
            return Err(Error::Invalid(format!(
                "canary share {parts} is out of range 0..=10000 (parts per 10,000)"
            )));
        }
        let ps = self.live_pool(pool)?;
        if ps.canary_pool.load(Ordering::Relaxed) == 0 {
            return Err(Error::Invalid(format!(
                "pool index {pool} has no canary (configure one with \"canary\": {{\"pool\": ...}})"
            )));
        }
        ps.canary_share.store(parts, Ordering::Relaxed);
        ps.canary_rolled_back.store(0, Ordering::Relaxed);
        Ok(())
    }

    /// Force emergency mode on or off for `pool`, or hand it back to the detector.
    /// Forcing on enters emergency at once; forcing off leaves it at once.
    pub fn set_emergency_mode(&self, pool: u32, mode: EmergencyMode) -> Result<(), Error> {
        self.force_emergency(pool, mode).map(|_| ())
    }

    /// Drain a node (`true`: no new tries, those in flight finish) or put it back.
    pub fn set_draining(&self, node: u32, draining: bool) -> Result<(), Error> {
        let n = self.live_node(node)?;
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

    /// Run `f` on the node slots of `pool` (primaries, backups) as this process's
    /// tables have them: for code outside this module that looks at every node of a
    /// pool (admission capacity). No allocation.
    /// `pool`'s tables and, while its backup pool is in play (`spill_target`), that
    /// pool's: the nodes that may serve a request for `pool` now. The one place the
    /// spill is decided for the retry check, `available` and admission's capacity
    /// (the pick asks `spill_target` itself, only after its own pool failed).
    fn serving<'l>(
        &self,
        pools: &'l [Option<LocalPool>],
        pool: u32,
        now: u64,
    ) -> Result<(&'l LocalPool, Option<&'l LocalPool>), Error> {
        let p = pools
            .get(pool as usize)
            .and_then(Option::as_ref)
            .ok_or_else(|| Error::Invalid(format!("unknown pool index {pool}")))?;
        let ps = self.region.pool(pool).expect("local pool slot in range");
        let spill = spill_target(&self.region, ps, &[&p.primary.slots, &p.backup.slots], now)
            .filter(|&b| b != pool)
            .and_then(|b| pools.get(b as usize).and_then(Option::as_ref));
        Ok((p, spill))
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

    /// This handle's worker slot in this process, if it claimed one.
    pub(crate) fn worker_index(&self) -> Option<u32> {
        self.worker_slot()
    }

    pub(crate) fn live_pool(&self, pool: u32) -> Result<&PoolSlot, Error> {
        self.region
            .pool(pool)
            .filter(|p| p.in_use.load(Ordering::Acquire) != 0)
            .ok_or_else(|| Error::Invalid(format!("unknown pool index {pool}")))
    }

    /// Bring local tables up to the region's generation.
    fn sync(&self, l: &mut Local) -> Result<(), Error> {
        let epoch = fork::epoch();
        if l.fork_epoch != epoch {
            l.rng = os_rng();
            l.fork_epoch = epoch;
        }
        let h = self.region.header();
        let generation = h.generation.load(Ordering::Acquire);
        if generation == l.generation {
            return Ok(());
        }
        // A process of an older stage (an nginx worker shutting down after a reload)
        // keeps the tables it has, so its requests finish on the config they began with.
        let frozen = l.config_version != u64::MAX && self.superseded();
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

    fn rebuild(&self, l: &mut Local, topo: Topology) {
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
                    selector: Selector::build(p.algorithm, &cands, p.chash_points, rng),
                    cands,
                }
            };
            let primary = tier(false, &mut l.rng);
            let backup = tier(true, &mut l.rng);
            l.by_name.insert(p.name.clone(), p.slot);
            l.pools[p.slot as usize] = Some(LocalPool {
                name: p.name.clone(),
                algorithm: p.algorithm,
                retry: p.retry.clone(),
                ewma: p.ewma.clone(),
                slow_start_ms: p.slow_start_ms,
                refresh_ms: p.refresh_ms,
                next_refresh_ms: 0,
                reference_us: p.ewma.default_rtt_ms as f64 * 1000.0,
                sampled: false,
                limited: false,
                slow_factor: p.limit.slow_factor,
                primary,
                backup,
            });
        }
        l.topo = Arc::new(topo);
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

impl LocalPool {
    /// Recompute the reference latency and every node's effective weight.
    /// Mark the nodes whose mean latency is at least `slow_factor` times the fastest
    /// primary's in service; with `slow_factor` 0, none. Mean latencies of served
    /// tries, not the peak EWMA: a peak estimate keeps a fast node's rare slow answer
    /// for seconds, which would hide a node that is slow on every answer.
    fn classify_slow(&mut self, region: &Region, now: u64) {
        let factor = self.slow_factor;
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
                *extra = if m > 0.0 && m >= factor * fastest {
                    m - fastest
                } else {
                    0.0
                };
            }
        }
    }

    fn refresh(&mut self, region: &Region, now: u64) {
        let tau = self.ewma.decay_ms;
        let default_us = self.ewma.default_rtt_ms as f64 * 1000.0;
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
        let latency_weighted = !matches!(self.algorithm, Algorithm::P2cEwma | Algorithm::Chash);
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
                    let mean =
                        now_seen.latency_sum_us.saturating_sub(was.latency_sum_us) as f64 / served as f64;
                    let old = tier.mean_us[i];
                    tier.mean_us[i] = if old > 0.0 { 0.7 * old + 0.3 * mean } else { mean };
                }
                tier.seen[i] = now_seen;
                let Some(n) = region.node(slot) else { continue };
                let mut w = n.weight.load(Ordering::Relaxed).max(1) as f64
                    * load::slow_start(now, n.started_ms.load(Ordering::Relaxed), self.slow_start_ms)
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
            t.slots.iter().any(|&s| {
                region
                    .node(s)
                    .is_some_and(|n| n.limit.load(Ordering::Relaxed) != 0)
            })
        });
        self.next_refresh_ms = now + self.refresh_ms as u64;
    }
}

/// A node's counters as a refresh saw them.
#[derive(Clone, Copy, Debug, Default)]
struct Seen {
    /// Tries reported.
    tries: u64,
    /// Tries that failed or were refused with 429.
    bad: u64,
    /// Served tries, and the sum of their latencies.
    served: u64,
    latency_sum_us: u64,
}

impl Seen {
    fn of(region: &Region, slot: u32) -> Seen {
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

/// Index into `NodeTally::status_class`: 0 no response, 1..=5 the status class.
fn status_class(status: u32) -> usize {
    if status == 0 {
        0
    } else {
        (status / 100).clamp(1, 5) as usize
    }
}

fn reset_if_set(cell: &AtomicU32) {
    // Skip the store on the common path so a healthy node's line is not dirtied twice.
    if cell.load(Ordering::Relaxed) != 0 {
        cell.store(0, Ordering::Relaxed);
    }
}

/// The pool whose nodes may take a try no node of this pool can: its backup pool
/// while in emergency, or while every node of `nodes` (the pool's slots) is down or
/// ejected. No allocation, no lock: called on the request path when a pick fails.
fn spill_target(region: &Region, ps: &PoolSlot, nodes: &[&[u32]], now_ms: u64) -> Option<u32> {
    let backup = ps.backup_pool.load(Ordering::Relaxed);
    if backup == 0 {
        return None;
    }
    if ps.emergency.load(Ordering::Acquire) & emergency::ACTIVE != 0 {
        return Some(backup - 1);
    }
    let dead = nodes
        .iter()
        .flat_map(|t| t.iter())
        .all(|&s| region.node(s).is_none_or(|n| node::failing(n, now_ms)));
    dead.then_some(backup - 1)
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
                decay_ms: p.ewma.decay_ms,
                weights,
            });
        }
        Ok((l.topo.clone(), out))
    }
}
