//! The active topology: every pool with its policy and its nodes' stable slots,
//! stored as JSON text in the shared region so that every worker rebuilds the same
//! tables from it (`crate::balancer`). Slot numbers are stable for a (pool, node id)
//! across reconfigurations.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::config::{
    AdmissionConfig, CanaryConfig, CooldownConfig, EmergencyConfig, EwmaConfig, HealthConfig, LimitConfig,
    OutlierConfig, RetryConfig,
};
use crate::select::Algorithm;

/// The active topology, stored as JSON in the region so every worker rebuilds the
/// same tables. Slot numbers are stable for a (pool, node id) across reconfigurations.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Topology {
    pub pools: Vec<PoolTopo>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PoolTopo {
    pub name: String,
    pub slot: u32,
    pub algorithm: Algorithm,
    pub ewma: EwmaConfig,
    pub slow_start_ms: u32,
    pub refresh_ms: u32,
    pub chash_points: u32,
    pub retry: RetryConfig,
    pub cooldown: CooldownConfig,
    pub limit: LimitConfig,
    pub outlier: OutlierConfig,
    pub health: Option<HealthConfig>,
    pub no_node_status: u32,
    pub window_ms: u32,
    pub nodes: Vec<NodeTopo>,
    #[serde(default)]
    pub canary: Option<CanaryConfig>,
    pub emergency: Option<EmergencyConfig>,
    pub admission: AdmissionConfig,
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
}
