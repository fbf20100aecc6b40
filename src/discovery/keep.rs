//! What a reload keeps of a discovery pool: the nodes its source found.
//!
//! A config file names no nodes for a pool whose source gives them (`discovery.dns`
//! with a name): loaded as written, a reload would empty the pool until the source's
//! next answer, and every node would come back in a fresh slot with nothing learned.
//! So the nodes running in such a pool are carried into the new config (same ids, so
//! same slots and learned state) and the source goes on from there. The same for the
//! nodes of a pool whose names re-resolve that did not resolve at this load but ran.

use std::borrow::Cow;
use std::sync::atomic::Ordering;

use crate::config::{Config, NodeConfig};
use crate::shm::Region;
use crate::topology::{NodeTopo, Topology};

/// A running node as config: live base weight, the address resolved when it was
/// added, its provider fields (header values are kept in process memory, never in
/// the topology: they are not read again).
pub fn node_config(region: &Region, n: &NodeTopo) -> NodeConfig {
    let mut c = NodeConfig {
        id: n.id.clone(),
        addr: format!("{}:{}", n.host, n.addr.port()),
        weight: region
            .node(n.slot)
            .map_or(1, |s| s.weight.load(Ordering::Relaxed)),
        backup: n.backup,
        resolved: Some(n.addr),
        resolved_headers: Some(Vec::new()),
        tpm: n.tpm,
        rpm: n.rpm,
        ..NodeConfig::default()
    };
    if let Some(p) = &n.provider {
        c.set_provider(p);
    }
    c
}

/// `cfg` with the running nodes of its discovery pools carried over from `old`
/// (see the module documentation); `cfg` itself when there is nothing to carry.
pub fn carry_over<'a>(region: &Region, old: &Topology, cfg: &'a Config) -> Cow<'a, Config> {
    let wanted = |name: &str| -> Vec<NodeConfig> {
        let (Some(pc), Some(op)) = (cfg.pools.get(name), old.pool(name)) else {
            return Vec::new();
        };
        let Some(d) = &pc.discovery else { return Vec::new() };
        let waiting: Vec<&str> = d
            .dns
            .as_ref()
            .map(|dns| dns.unresolved.iter().map(|n| n.id.as_str()).collect())
            .unwrap_or_default();
        op.nodes
            .iter()
            .filter(|n| !pc.nodes.iter().any(|c| c.id == n.id))
            .filter(|n| d.owns_nodes() || waiting.contains(&n.id.as_str()))
            .map(|n| node_config(region, n))
            .collect()
    };
    let carried: Vec<(String, Vec<NodeConfig>)> = cfg
        .pools
        .keys()
        .map(|name| (name.clone(), wanted(name)))
        .filter(|(_, nodes)| !nodes.is_empty())
        .collect();
    if carried.is_empty() {
        return Cow::Borrowed(cfg);
    }
    let mut out = cfg.clone();
    for (name, nodes) in carried {
        let pc = out.pools.get_mut(&name).expect("pool of cfg");
        if let Some(dns) = pc.discovery.as_mut().and_then(|d| d.dns.as_mut()) {
            dns.unresolved.retain(|u| !nodes.iter().any(|n| n.id == u.id));
        }
        pc.nodes.extend(nodes);
    }
    Cow::Owned(out)
}
