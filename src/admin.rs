//! Run-time changes to the topology (the admin API's add and remove) and the extra
//! state the admin API and status page show.
//!
//! Adding or removing a node is a reconfiguration, not a patch of the shared slots:
//! under one hold of the shared lock the running configuration is rebuilt from the
//! active [`Topology`] (with every node's live base weight, and the addresses resolved
//! when each node was added, so no DNS lookup happens for nodes that stay), changed,
//! validated exactly as a config file is, and loaded with [`Balancer::configure`]'s
//! machinery. So a change is all-or-nothing: a refused change leaves the region as it
//! was, and an accepted one keeps every other node's slot, counters and learned state,
//! as a reload does. Drained nodes stay drained across it. A new node's address is
//! resolved (and checked) before the lock is taken.
//!
//! Run-time changes last until the next `nginx -s reload`, which loads the config file
//! again: weights, drains and added or removed nodes are then those of the file.
//!
//! ```
//! use rsbalancer::{balancer::Balancer, config::{Config, NodeConfig}};
//! let cfg = Config::from_json(r#"{"pools": {"llm": {"nodes": [
//!     {"id": "a", "addr": "127.0.0.1:8001"}]}}}"#).unwrap();
//! let b = Balancer::create(&cfg).unwrap();
//! let node = NodeConfig { id: "b".into(), addr: "127.0.0.1:8002".into(), weight: 5, ..Default::default() };
//! rsbalancer::admin::add_node(&b, "llm", node).unwrap();
//! rsbalancer::admin::remove_node(&b, "llm", "a").unwrap();
//! assert_eq!(b.topology().unwrap().pool("llm").unwrap().nodes[0].id, "b");
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;

use crate::balancer::{Balancer, EmergencyMode, Error, PoolTopo, Topology};
use crate::config::{Config, ConfigError, NodeConfig, PoolConfig, ShmConfig};
use crate::shm::layout::{emergency as emergency_bits, flags};
use crate::shm::Region;

pub mod body;

/// Why a run-time change was refused, classed for an HTTP answer.
#[derive(Debug, Clone, PartialEq)]
pub enum AdminError {
    /// Unknown pool or node (404).
    NotFound(String),
    /// Valid, but impossible now: the id exists, capacity is exhausted, the pool would
    /// be left without a primary node (409).
    Conflict(String),
    /// A bad value; the message names the field and the value (400).
    Invalid(String),
    /// The shared region could not be locked or written (500).
    Failed(Error),
}

impl AdminError {
    /// `not_found`, `conflict`, `invalid` or `failed`.
    pub fn kind(&self) -> &'static str {
        match self {
            AdminError::NotFound(_) => "not_found",
            AdminError::Conflict(_) => "conflict",
            AdminError::Invalid(_) => "invalid",
            AdminError::Failed(_) => "failed",
        }
    }
}

impl std::fmt::Display for AdminError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AdminError::NotFound(m) | AdminError::Conflict(m) | AdminError::Invalid(m) => f.write_str(m),
            AdminError::Failed(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for AdminError {}

/// An error of the reconfiguration itself. The rebuilt config was valid, so a config
/// error there is one of capacity (node slots, config bytes): a conflict.
impl From<Error> for AdminError {
    fn from(e: Error) -> Self {
        match e {
            Error::Config(c) => AdminError::Conflict(c.to_string()),
            Error::Invalid(m) => AdminError::Invalid(m),
            other => AdminError::Failed(other),
        }
    }
}

/// A config error of the rebuilt config: capacities (`shm.*`) are conflicts, anything
/// else names a field of the new node (`pools.P.nodes[k].weight` becomes `weight`).
pub(crate) fn validation_error(e: ConfigError, node_path: &str) -> AdminError {
    if e.path.starts_with("shm.") {
        return AdminError::Conflict(e.to_string());
    }
    match e.path.strip_prefix(node_path) {
        Some(field) => AdminError::Invalid(format!("{}: {}", field.trim_start_matches('.'), e.message)),
        None => AdminError::Invalid(e.to_string()),
    }
}

/// The running configuration, rebuilt from the active topology and the live weights.
pub(crate) fn running_config(region: &Region, topo: &Topology) -> Config {
    let cap = region.capacity();
    let pools: BTreeMap<String, PoolConfig> = topo
        .pools
        .iter()
        .map(|p| (p.name.clone(), pool_config(region, p)))
        .collect();
    Config {
        shm: ShmConfig {
            max_nodes: cap.max_nodes,
            max_pools: cap.max_pools,
            max_workers: cap.max_workers,
            config_bytes: cap.config_bytes,
            queue_slots: cap.max_waiters,
        },
        pools,
        cluster: topo.cluster.clone(),
    }
}

/// A pool's config as running: its policy as loaded, with its nodes as they are now
/// (live base weights, the addresses resolved when each was added).
pub(crate) fn pool_config(region: &Region, p: &PoolTopo) -> PoolConfig {
    PoolConfig {
        nodes: p
            .nodes
            .iter()
            .map(|n| crate::discovery::keep::node_config(region, n))
            .collect(),
        ..p.policy.clone()
    }
}

fn unknown_pool(pool: &str) -> AdminError {
    AdminError::NotFound(format!("unknown pool \"{pool}\""))
}

/// Add a node to `pool` (it starts in slow start with nothing learned). Refused
/// with nothing changed when the pool is unknown, the id exists, a field is
/// invalid or the address does not resolve, or the region has no room. Returns the
/// new node's slot.
pub fn add_node(b: &Balancer, pool: &str, node: NodeConfig) -> Result<u32, AdminError> {
    let topo = b.topology()?;
    let p = topo.pool(pool).ok_or_else(|| unknown_pool(pool))?;
    // A literal value would live in this worker's memory only; a variable is read by
    // every worker from its own environment (nginx's `env VAR;`).
    if let Some((name, _)) = node.headers.iter().find(|(_, h)| h.env().is_none()) {
        return Err(AdminError::Invalid(format!(
            "headers.{name}: a literal value cannot be set at run time (the other workers could not read it): use {{\"env\": \"VAR\"}} with nginx's `env VAR;`"
        )));
    }
    // The node alone first (as a primary of a throwaway pool, without the blocks
    // that name other pools): its fields and its address, resolved here, outside
    // the shared lock.
    let mut alone = Config::default();
    alone.pools.insert(
        pool.to_string(),
        PoolConfig {
            nodes: vec![NodeConfig {
                backup: false,
                ..node.clone()
            }],
            canary: None,
            emergency: None,
            ..pool_config(b.region(), p)
        },
    );
    alone
        .validate()
        .map_err(|e| validation_error(e, &format!("pools.{pool}.nodes[0]")))?;
    let resolved = alone.pools[pool].nodes[0].resolved;
    let resolved_headers = alone.pools[pool].nodes[0].resolved_headers.clone();
    let id = node.id.clone();
    let check = |t: &Topology| -> Result<(), AdminError> {
        let p = t.pool(pool).ok_or_else(|| unknown_pool(pool))?;
        if p.nodes.iter().any(|n| n.id == id) {
            return Err(AdminError::Conflict(format!(
                "node \"{id}\" already exists in pool \"{pool}\""
            )));
        }
        Ok(())
    };
    change(b, check, |cfg| {
        let pc = cfg.pools.get_mut(pool).ok_or_else(|| unknown_pool(pool))?;
        let k = pc.nodes.len();
        pc.nodes.push(NodeConfig {
            resolved,
            resolved_headers,
            ..node
        });
        cfg.validate()
            .map_err(|e| validation_error(e, &format!("pools.{pool}.nodes[{k}]")))
    })?;
    Ok(b.node_index(pool, &id)?)
}

/// Remove a node from `pool`: it is picked no more, tries in flight on it finish
/// and are reported. Refused with nothing changed when the pool or node is unknown
/// or the pool would be left without a primary node.
pub fn remove_node(b: &Balancer, pool: &str, id: &str) -> Result<(), AdminError> {
    let check = |t: &Topology| -> Result<(), AdminError> {
        let p = t.pool(pool).ok_or_else(|| unknown_pool(pool))?;
        if !p.nodes.iter().any(|n| n.id == id) {
            return Err(AdminError::NotFound(format!(
                "unknown node \"{id}\" in pool \"{pool}\""
            )));
        }
        if !p.nodes.iter().any(|n| n.id != id && !n.backup) {
            return Err(AdminError::Conflict(format!(
                "removing \"{id}\" would leave pool \"{pool}\" without a primary (non-backup) node"
            )));
        }
        Ok(())
    };
    change(b, check, |cfg| {
        if let Some(pc) = cfg.pools.get_mut(pool) {
            pc.nodes.retain(|n| n.id != id);
        }
        cfg.validate().map_err(|e| validation_error(e, "-"))
    })
}

/// A pool's run-time state as the fleet shares it (`crate::cluster`): its nodes as
/// running (live base weights; provider fields, header variables but never their
/// values) and the ids of the drained ones.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolState {
    pub nodes: Vec<NodeConfig>,
    pub drained: BTreeSet<String>,
    /// Emergency mode as an operator forced it (`on`, `off`); absent: the detector's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emergency: Option<EmergencyMode>,
    /// The canary share as an operator or a rollback left it; absent: no canary, or
    /// its ramp is running (a ramp's steps follow the same schedule at every gateway
    /// and stay local; a share set by hand or a rollback ends it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<CanaryShare>,
}

/// A pool's canary share in a [`PoolState`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CanaryShare {
    /// Parts per 10,000 (0..=10000; more is clamped).
    pub share: u32,
    /// Whether a rollback set it to 0.
    pub rolled_back: bool,
}

/// `pool`'s run-time state now.
pub fn pool_state(b: &Balancer, pool: &str) -> Result<PoolState, AdminError> {
    let topo = b.topology()?;
    let p = topo.pool(pool).ok_or_else(|| unknown_pool(pool))?;
    let drained = p
        .nodes
        .iter()
        .filter(|n| {
            b.region()
                .node(n.slot)
                .is_some_and(|s| s.flags.load(Ordering::Relaxed) & flags::DRAINING != 0)
        })
        .map(|n| n.id.clone())
        .collect();
    let e = b
        .region()
        .pool(p.slot)
        .map_or(0, |ps| ps.emergency.load(Ordering::Relaxed));
    let emergency = if e & emergency_bits::FORCED_ON != 0 {
        Some(EmergencyMode::On)
    } else if e & emergency_bits::FORCED_OFF != 0 {
        Some(EmergencyMode::Off)
    } else {
        None
    };
    let canary = b
        .region()
        .pool(p.slot)
        .filter(|ps| {
            ps.canary_pool.load(Ordering::Relaxed) != 0 && ps.canary_ramp.load(Ordering::Acquire) == 0
        })
        .map(|ps| CanaryShare {
            share: ps.canary_share.load(Ordering::Acquire),
            rolled_back: ps.canary_rolled_back.load(Ordering::Acquire) != 0,
        });
    Ok(PoolState {
        nodes: pool_config(b.region(), p).nodes,
        drained,
        emergency,
        canary,
    })
}

/// Make `pool` what `state` says, through the same all-or-nothing changes as the admin
/// API: nodes it lacks are added (slow start), nodes it does not name removed (their
/// tries in flight finish), then weights and drains set. Nodes are told apart by id:
/// a node that keeps its id keeps its address and learned state. Returns whether
/// anything changed; stops at the first change refused (say, the region is full).
pub fn apply_state(b: &Balancer, pool: &str, state: &PoolState) -> Result<bool, AdminError> {
    let now = pool_state(b, pool)?;
    let mut changed = false;
    // Additions first: a pool must keep a primary node at every step.
    for n in &state.nodes {
        if !now.nodes.iter().any(|c| c.id == n.id) {
            add_node(b, pool, n.clone())?;
            changed = true;
        }
    }
    for c in &now.nodes {
        if !state.nodes.iter().any(|n| n.id == c.id) {
            remove_node(b, pool, &c.id)?;
            changed = true;
        }
    }
    for n in &state.nodes {
        let slot = b.node_index(pool, &n.id)?;
        if now.nodes.iter().any(|c| c.id == n.id && c.weight != n.weight) {
            b.set_weight(slot, n.weight)?;
            changed = true;
        }
        let drain = state.drained.contains(&n.id);
        if drain != now.drained.contains(&n.id) {
            b.set_draining(slot, drain)?;
            changed = true;
        }
    }
    if state.emergency != now.emergency {
        let mode = state.emergency.unwrap_or(EmergencyMode::Auto);
        crate::emergency::set_emergency_mode(b, b.pool_index(pool)?, mode)?;
        changed = true;
    }
    if let Some(c) = state.canary.filter(|c| Some(*c) != now.canary) {
        b.share_canary(
            b.pool_index(pool)?,
            c.share.min(crate::params::PARTS),
            c.rolled_back,
        )?;
        changed = true;
    }
    Ok(changed)
}

/// `check` the active topology (before the lock, for a quick refusal, and again
/// under it), `edit` the running config rebuilt from it, and load the result; drained
/// nodes stay drained.
pub(crate) fn change(
    b: &Balancer,
    check: impl Fn(&Topology) -> Result<(), AdminError>,
    edit: impl FnOnce(&mut Config) -> Result<(), AdminError>,
) -> Result<(), AdminError> {
    check(&*b.topology()?)?;
    let mut refused = None;
    let r = b.reconfigure(flags::DRAINING, |old| {
        let built = check(old).and_then(|()| {
            let mut cfg = running_config(b.region(), old);
            edit(&mut cfg)?;
            Ok(cfg)
        });
        built.map_err(|e| {
            let msg = e.to_string();
            refused = Some(e);
            Error::Invalid(msg)
        })
    });
    match refused {
        Some(e) => Err(e),
        None => r.map_err(AdminError::from),
    }
}
