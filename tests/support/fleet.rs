//! What the cluster suites share: three gateways A, B, C in front of the same mock
//! nodes, in a fleet over a Redis of their own or each alone, and how a test reads
//! a gateway's metrics and node entries.

use std::time::Duration;

use serde_json::Value;

use super::{get, start_gateway, wait_until, Gateway, TestDir};

/// The gateways' names, in the order [`start_three`] returns them.
pub const GATEWAYS: [&str; 3] = ["A", "B", "C"];

/// The value of the first sample of metric `name` (with or without labels) in a
/// gateway's `/metrics`.
pub fn metric(g: &Gateway, name: &str) -> Option<f64> {
    let text = get(g.port, "/metrics").text();
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Node `id`'s entry in pool `llm` of a gateway's `/rsbalancer/status`.
pub fn pool_node(g: &Gateway, id: &str) -> Value {
    let r = get(g.port, "/rsbalancer/status");
    assert_eq!(r.status, 200, "status: {}", r.text());
    let nodes = r.json()["pools"]["llm"]["nodes"]
        .as_array()
        .expect("nodes")
        .clone();
    nodes
        .into_iter()
        .find(|n| n["id"] == id)
        .unwrap_or_else(|| panic!("no node {id} in the status"))
}

/// Gateways A, B, C, each with `config(its name)` in a directory `{tag}-{name}`;
/// with `fleet`, once each sees a fleet of 3 with its sync up (within `patience`).
pub fn start_three(
    tag: &str,
    fleet: bool,
    patience: Duration,
    config: impl Fn(&str) -> Value,
) -> (Vec<Gateway>, Vec<TestDir>) {
    let dirs: Vec<TestDir> = GATEWAYS
        .iter()
        .map(|g| TestDir::new(&format!("{tag}-{g}")))
        .collect();
    let gws: Vec<Gateway> = dirs
        .iter()
        .zip(GATEWAYS)
        .map(|(d, g)| start_gateway(d, &config(g)))
        .collect();
    if fleet {
        for g in &gws {
            wait_until(patience, "the gateway in a fleet of 3", || {
                metric(g, "rsbalancer_cluster_gateways") == Some(3.0)
                    && metric(g, "rsbalancer_cluster_up") == Some(1.0)
            });
        }
    }
    (gws, dirs)
}
