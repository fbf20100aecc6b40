//! The queue families of scraped nodes (`crate::scrape`): one sample per node of a
//! pool with a `scrape` section, none for other nodes. The scraped figures (waiting,
//! running, KV-cache usage) are written only while they are fresh and were sent: a
//! stale figure is no figure, so Prometheus marks the series stale rather than keep
//! a value the balancer ignores. The backlog, the stale flag and the failure count
//! are always written for a scraped node.

use super::text::{family, sample, Kind, Num};
use crate::scrape::Snapshot;

type Figure = (&'static str, Kind, &'static str, fn(&Snapshot) -> Option<Num>);

const FAMILIES: [Figure; 6] = [
    (
        "rsbalancer_node_queue_waiting",
        Kind::Gauge,
        "Requests the node said wait in its queue at the last scrape (vllm:num_requests_waiting, sglang:num_queue_reqs); absent when stale.",
        |s| fresh(s, s.waiting.map(Num::from)),
    ),
    (
        "rsbalancer_node_queue_running",
        Kind::Gauge,
        "Requests the node said it runs at the last scrape; absent when stale.",
        |s| fresh(s, s.running.map(Num::from)),
    ),
    (
        "rsbalancer_node_kv_cache_usage",
        Kind::Gauge,
        "KV-cache usage the node reported at the last scrape, 0..1; absent when stale.",
        |s| fresh(s, s.kv_cache_usage.map(Num::from)),
    ),
    (
        "rsbalancer_node_queue_backlog",
        Kind::Gauge,
        "Queued requests that are not ours, which p2c_ewma and least_conn add to the node's in-flight count now (0 when stale).",
        |s| Some(s.backlog.into()),
    ),
    (
        "rsbalancer_node_queue_stale",
        Kind::Gauge,
        "1 when the node's queue figures are absent or older than three scrape intervals (ignored), else 0.",
        |s| Some(u64::from(s.stale).into()),
    ),
    (
        "rsbalancer_node_queue_scrape_failures_total",
        Kind::Counter,
        "Scrapes of the node's metrics that failed (no connection, a status other than 200, no queue metrics in the body).",
        |s| Some(s.scrape_failures.into()),
    ),
];

fn fresh(s: &Snapshot, v: Option<Num>) -> Option<Num> {
    v.filter(|_| !s.stale)
}

/// Writes the queue families for `nodes` (labels, snapshot): only scraped nodes; no
/// family at all when no pool scrapes.
pub(super) fn write(out: &mut String, nodes: &[(&str, Snapshot)]) {
    if nodes.is_empty() {
        return;
    }
    for (name, kind, help, f) in FAMILIES {
        family(out, name, kind, help);
        for (labels, s) in nodes {
            if let Some(v) = f(s) {
                sample(out, name, labels, "", v);
            }
        }
    }
}
