//! The discovery families (`crate::discovery`): one sample per pool with a
//! `discovery` section, labelled with the pool and the source.

use super::text::{family, labels, sample, Kind, Num};
use crate::balancer::{Balancer, Topology};
use crate::discovery::Status;

type Figure = (&'static str, Kind, &'static str, fn(&Status) -> Num);

const FAMILIES: [Figure; 6] = [
    (
        "rsbalancer_discovery_up",
        Kind::Gauge,
        "1 while the pool's discovery source answered and has not failed since; 0: the pool keeps its last known nodes.",
        |s| u64::from(s.up).into(),
    ),
    (
        "rsbalancer_discovery_nodes",
        Kind::Gauge,
        "Nodes in the source's last answer used.",
        |s| s.nodes.into(),
    ),
    (
        "rsbalancer_discovery_answers_total",
        Kind::Counter,
        "Answers of the pool's discovery source.",
        |s| s.answers.into(),
    ),
    (
        "rsbalancer_discovery_errors_total",
        Kind::Counter,
        "Failed queries of the pool's discovery source (and answers the pool refused).",
        |s| s.errors.into(),
    ),
    (
        "rsbalancer_discovery_consecutive_failures",
        Kind::Gauge,
        "Failures of the pool's discovery source since its last answer.",
        |s| s.failing.into(),
    ),
    (
        "rsbalancer_discovery_last_success_age_seconds",
        Kind::Gauge,
        "Seconds since the pool's discovery source last answered; -1 when it never has.",
        |s| s.last_success_age_s.unwrap_or(-1.0).into(),
    ),
];

/// Writes the discovery families; nothing when no pool has a `discovery` section.
pub(super) fn write(out: &mut String, b: &Balancer, topo: &Topology) {
    let all: Vec<(String, Status)> = topo
        .pools
        .iter()
        .filter_map(|p| {
            let s = crate::discovery::status(b, p)?;
            Some((labels(&[("pool", &p.name), ("source", s.source)]), s))
        })
        .collect();
    if all.is_empty() {
        return;
    }
    for (name, kind, help, f) in FAMILIES {
        family(out, name, kind, help);
        for (l, s) in &all {
            sample(out, name, l, "", f(s));
        }
    }
}
