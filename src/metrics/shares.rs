//! Cluster mode's per-node families (`crate::fleet`), written only for the nodes that
//! have a fleet figure (none without a cluster).

use super::{node_gauges, NodeSnap};

type Get = fn(&crate::fleet::Figures) -> Option<f64>;

const GAUGES: [(&str, &str, Get); 5] = [
    (
        "rsbalancer_node_fleet_share",
        "This gateway's share of the node's fleet-wide concurrency limit (cluster mode: the fleet's limit split by the gateways' demand); absent while none counts (no cluster, no limit learned, Redis unreachable for two sync intervals).",
        |f| f.fleet_share.map(f64::from),
    ),
    (
        "rsbalancer_node_fleet_limit",
        "The node's fleet-wide concurrency limit as of the last sync round (the lowest learned by a gateway with demand).",
        |f| (f.fleet_limit != 0.0).then_some(f.fleet_limit),
    ),
    (
        "rsbalancer_node_fleet_remote_inflight",
        "The other gateways' tries in flight on the node as of the last sync round.",
        |f| f.fleet_remote_inflight.map(f64::from),
    ),
    (
        "rsbalancer_node_fleet_budget_tokens",
        "The other gateways' tokens in the node's budget window as of the last sync round.",
        |f| f.fleet_budget_tokens.map(|v| v as f64),
    ),
    (
        "rsbalancer_node_fleet_budget_requests",
        "The other gateways' requests in the node's budget window as of the last sync round.",
        |f| f.fleet_budget_requests.map(|v| v as f64),
    ),
];

pub(super) fn write(out: &mut String, nodes: &[NodeSnap]) {
    for (name, help, get) in GAUGES {
        let rows = nodes.iter().filter_map(|n| get(&n.fleet).map(|v| (n, v)));
        node_gauges(out, name, help, rows);
    }
}
