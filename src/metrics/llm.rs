//! The LLM signals' families: provider headroom and budgets (`crate::headroom`) and
//! stream signals (`crate::stream`), written only for the nodes that have them.

use super::text::*;
use super::{NodeSnap, PoolSnap};

/// Headroom and budget gauges, for the nodes that have them only: what a provider said
/// is left (less picks since), and a budgeted node's limits and window.
pub(super) fn write_headroom(out: &mut String, nodes: &[NodeSnap]) {
    type Get = fn(&crate::headroom::Figures) -> Option<u64>;
    let budgeted = |h: &crate::headroom::Figures| h.tpm != 0 || h.rpm != 0;
    let gauges: [(&str, &str, Get); 6] = [
        (
            "rsbalancer_node_remaining_requests",
            "Requests the node's provider said are left (x-ratelimit-remaining-requests, anthropic-ratelimit-requests-remaining), less the picks since; only while its reset has not passed.",
            |h| h.remaining_requests,
        ),
        (
            "rsbalancer_node_remaining_tokens",
            "Tokens the node's provider said are left, less the estimates of the picks since; only while its reset has not passed.",
            |h| h.remaining_tokens,
        ),
        (
            "rsbalancer_node_budget_tpm",
            "The node's configured token budget per minute (nodes with a budget).",
            |h| (h.tpm != 0).then_some(h.tpm),
        ),
        (
            "rsbalancer_node_budget_rpm",
            "The node's configured request budget per minute (nodes with a budget).",
            |h| (h.rpm != 0).then_some(h.rpm),
        ),
        (
            "rsbalancer_node_budget_tokens_used",
            "Tokens reserved on the node in its budget window (60-70 s; estimates at pick, settled with usage at report).",
            |h| Some(h.budget_tokens_used),
        ),
        (
            "rsbalancer_node_budget_requests_used",
            "Requests reserved on the node in its budget window (60-70 s).",
            |h| Some(h.budget_requests_used),
        ),
    ];
    for (i, (name, help, get)) in gauges.iter().enumerate() {
        let only_budgeted = i >= 4;
        let rows = nodes
            .iter()
            .filter(|n| !only_budgeted || budgeted(&n.headroom))
            .filter_map(|n| get(&n.headroom).map(|v| (n, v)));
        super::node_gauges(out, name, help, rows);
    }
}

/// Stream signals (`crate::stream`): 0 / absent growth for nodes that send none.
pub(super) const NODE_STREAM: [Field<NodeSnap>; 5] = [
    (
        "rsbalancer_node_ttft_seconds",
        Kind::Gauge,
        "Time to first token (peak EWMA, from the pick to the first SSE event with content) of the node's streams; 0 before the first.",
        |n| n.ttft_s.into(),
    ),
    (
        "rsbalancer_node_time_per_token_seconds",
        Kind::Gauge,
        "Time per output token of the node's streams (smoothed; from usage); 0 before the first.",
        |n| n.tpot_s.into(),
    ),
    (
        "rsbalancer_node_queue_before_first_token_seconds",
        Kind::Gauge,
        "Time the node's streams spent in keep-alive comments before their first token (smoothed): the node queueing requests.",
        |n| n.queue_s.into(),
    ),
    (
        "rsbalancer_node_completion_tokens_total",
        Kind::Counter,
        "Completion tokens the node's answers reported in usage.",
        |n| n.completion_tokens.into(),
    ),
    (
        "rsbalancer_node_stream_failures_total",
        Kind::Counter,
        "Streams that ended without [DONE] or a finish_reason (each also counts as a failed try).",
        |n| n.stream_failures.into(),
    ),
];

pub(super) const POOL_STREAM: [Field<PoolSnap>; 1] = [(
    "rsbalancer_pool_mean_completion_tokens",
    Kind::Gauge,
    "Recent mean completion tokens of the pool's answers (from usage): the cost model's expected tokens for a request without max_tokens.",
    |p| p.mean_tokens.into(),
)];
