//! The active topology: every pool with its policy and its nodes' stable slots,
//! stored as JSON text in the shared region so that every worker rebuilds the same
//! tables from it (`crate::balancer`). Slot numbers are stable for a (pool, node id)
//! across reconfigurations.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::config::{PoolConfig, Provider};

/// The active topology, stored as JSON in the region so every worker rebuilds the
/// same tables. Slot numbers are stable for a (pool, node id) across reconfigurations.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Topology {
    pub pools: Vec<PoolTopo>,
    /// The `cluster` section as loaded (`crate::cluster`); absent: no fleet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<crate::config::ClusterConfig>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PoolTopo {
    pub name: String,
    pub slot: u32,
    /// The pool's validated config as loaded: its policy, the one copy every layer
    /// reads (its `nodes` list is left empty: the nodes, with their stable slots and
    /// resolved addresses, are `nodes` below).
    pub policy: PoolConfig,
    pub nodes: Vec<NodeTopo>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeTopo {
    pub id: String,
    /// Host as written in the config (for SNI and the Host header).
    pub host: String,
    /// Address resolved when the config was loaded.
    pub addr: SocketAddr,
    pub slot: u32,
    pub backup: bool,
    /// The node's provider (Host, scheme, header names and variables, model); never
    /// a header's value. Absent for a plain node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<Provider>,
    /// The node's token and request budgets per minute (`crate::headroom`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpm: Option<u32>,
}

impl PoolTopo {
    /// The pool as one object: its config's fields, with `name`, `slot` and `nodes`
    /// (ids, addresses, slots) from the topology. What the Lua side reads
    /// (`balancer:pool_config(name)`).
    pub fn flat(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(&self.policy).expect("config serializes");
        v["name"] = self.name.clone().into();
        v["slot"] = self.slot.into();
        v["nodes"] = serde_json::to_value(&self.nodes).expect("nodes serialize");
        v
    }
}

impl Topology {
    pub(crate) fn parse(text: &[u8]) -> Topology {
        if text.is_empty() {
            return Topology::default();
        }
        // The text was written by `configure` from this same type; a parse failure
        // would mean a corrupted region, which we treat as empty rather than crash.
        serde_json::from_slice(text).unwrap_or_default()
    }

    pub fn pool(&self, name: &str) -> Option<&PoolTopo> {
        self.pools.iter().find(|p| p.name == name)
    }

    /// The pool that node slot `slot` belongs to.
    pub fn pool_of(&self, slot: u32) -> Option<&PoolTopo> {
        self.pools.iter().find(|p| p.nodes.iter().any(|x| x.slot == slot))
    }
}
