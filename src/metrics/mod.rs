//! Prometheus text exposition (format 0.0.4) of the shared counters: what `/metrics`
//! serves (`lua/resty/rsbalancer/metrics.lua`).
//!
//! **Cost.** Rendering reads the atomics the balancer already updates on every pick
//! and report (Relaxed loads) and adds nothing to the request path: no counter, lock
//! or allocation exists for metrics' sake (the mistake of Kong's Prometheus plugin,
//! which spent 10.9% CPU in `shdict:incr`). It takes no shared lock unless the
//! topology changed since this process last looked (then [`Balancer::local_view`]
//! reads the new topology under the shared lock once, as the next pick would), and
//! this process's local mutex for the effective weights, which in an nginx worker
//! nobody else holds. Each node's and pool's fields are loaded once into a snapshot,
//! then written family by family (the text format wants a family's samples together).
//! Counters are read one by one, not as an atomic snapshot: a scrape racing a report
//! may see the status class of a try and not yet its histogram bucket. Prometheus'
//! `rate()` does not care.
//!
//! **Names** follow Prometheus conventions: prefix `rsbalancer_`, counters end in
//! `_total`, times in seconds, ratios in 0..1. Node series carry `pool`, `node` and
//! `arm` labels; pool series `pool` and `arm`. `arm` is `canary` for a pool that some
//! other pool sends a canary share to (its `canary_pool`), `primary` otherwise, so the
//! 429 rate and latency of both arms of a canary compare directly.
//!
//! **Load imbalance.** "Spread of load between nodes relative to their weights": for
//! the primaries of a pool that can take tries now (not cooling, ejected, down or
//! draining; backups serve only when no primary can, so they are left out), with
//! load share `l_i` and effective-weight share `s_i`,
//!
//! ```text
//! imbalance = max_i |l_i - s_i| / s_i
//! ```
//!
//! the largest relative deviation of any node from its share: 0.3 means some node
//! carries 30% more or less than its weight says (the seed's "node load difference >
//! 30%"). Effective weights, not base weights, because they are what the balancer
//! aims for (slow start, recent success and, for the weight-driven algorithms,
//! latency scale them). Two load measures, because neither serves both purposes:
//!
//! - `rsbalancer_pool_load_imbalance` (this module): `l_i` = share of the tries in
//!   flight now. Instant, and exact at high concurrency, but noisy when few tries are
//!   in flight (one try on a 20%-weight node reads as 400%); it is 0 when none is.
//! - `rsbalancer:pool_load_imbalance:rate5m` (recording rule in
//!   `nginx-conf/prometheus/`): `l_i` = the node's share of the pool's tries over the
//!   last 5 minutes (`rate()` of `rsbalancer_node_requests_total`), against
//!   `rsbalancer_node_weight_share` (exported here). The cumulative counters are the
//!   only per-node history the region keeps, so a windowed share is best computed by
//!   Prometheus; this is the one the alert uses. With `p2c_ewma` a node slower than
//!   its peers legitimately gets less than its weight (the cost weighs latency), so
//!   the alert also reads as "a node is persistently slower than the rest".
//!
//! **Request success.** A request fails when its last try failed; every retry follows
//! a failed try, so failed requests = failed or 429 tries - retries. The recording
//! rule `rsbalancer:pool_request_success:ratio_rate5m` builds on that (plus shed
//! requests, `rsbalancer_pool_shed_total`), from counters the balancer keeps anyway.
//! A request that `admit()` answers at once because no node can serve is counted
//! only where admission counts it in `shed_total`.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;

use crate::balancer::{Balancer, Error};
use crate::load;
use crate::node;
use crate::shm::clock;
use crate::shm::layout::{emergency, flags, LATENCY_BOUNDS_MS, QUEUE_WAIT_BOUNDS_MS};
use crate::{tally, window};

mod discovery;
mod fleet;
mod llm;
mod queue;
mod shares;
mod text;
use llm::*;
use text::*;

/// The `Content-Type` of the exposition.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Node states, in `rsbalancer_node_state{state=...}` (one is 1, the others 0).
pub const NODE_STATES: [&str; 6] = ["healthy", "slow_start", "cooling", "ejected", "down", "draining"];

/// Labels of `rsbalancer_node_requests_total{class=...}`, by `NodeSlot::status_class` index.
const CLASSES: [&str; 6] = ["no_response", "1xx", "2xx", "3xx", "4xx", "5xx"];

/// Everything rendered about one node, loaded once.
struct NodeSnap {
    labels: String,
    /// Index into the pool snapshots.
    pool: usize,
    addr: String,
    backup: bool,
    state: &'static str,
    inflight: u32,
    picks: u64,
    failures: u64,
    busy: u64,
    class: [u64; 6],
    hist: [u64; LATENCY_BOUNDS_MS.len() + 1],
    hist_sum_us: u64,
    ewma_s: f64,
    limit: f64,
    weight: u32,
    effective: f64,
    /// Share of the pool's primary effective weight among nodes that can take tries
    /// now (0 for backups and for nodes that cannot).
    weight_share: f64,
    cooldown_s: f64,
    ejection_s: f64,
    cooldowns: u64,
    ejections: u64,
    /// Scraped queue state (`crate::scrape`); `None` when its pool does not scrape.
    queue: Option<crate::scrape::Snapshot>,
    /// Provider headroom and budget (`crate::headroom`).
    headroom: crate::headroom::Figures,
    /// Cluster mode's shares (`crate::fleet`).
    fleet: crate::fleet::Figures,
    /// Stream signals (`crate::stream`): estimates in seconds (0: never measured).
    ttft_s: f64,
    tpot_s: f64,
    queue_s: f64,
    completion_tokens: u64,
    stream_failures: u64,
}

impl NodeSnap {
    fn available(&self) -> bool {
        matches!(self.state, "healthy" | "slow_start")
    }
}

/// Everything rendered about one pool, loaded once.
struct PoolSnap {
    labels: String,
    algorithm: String,
    requests: u64,
    retries: u64,
    retries_denied: u64,
    no_node: u64,
    /// `prefix` pools: (home, spilled, no key) picks.
    prefix: (u64, u64, u64),
    shed: u64,
    queue_len: u32,
    queue_admitted: u64,
    queue_timeouts: u64,
    queue_evicted: u64,
    queue_aborted: u64,
    queue_wait_s: f64,
    queue_wait_hist: [u64; QUEUE_WAIT_BOUNDS_MS.len() + 1],
    emergency_active: bool,
    emergency_mode: &'static str,
    emergency_entries: u64,
    canary: Option<String>,
    canary_share: f64,
    canary_rolled_back: u32,
    canary_rollbacks: u64,
    window: window::Totals,
    window_s: f64,
    inflight_imbalance: f64,
    mean_tokens: f64,
}

/// Renders every pool and node of `b` as Prometheus text exposition, appended to `out`.
pub fn render(b: &Balancer, out: &mut String) -> Result<(), Error> {
    let (topo, local) = b.local_view()?;
    let region = b.region();
    let now = clock::now_ms();
    let eff: HashMap<u32, f64> = local.iter().flat_map(|p| p.weights.iter().copied()).collect();
    let local: HashMap<u32, &crate::balancer::LocalPoolView> = local.iter().map(|p| (p.slot, p)).collect();
    // Pools some other pool sends a canary share to.
    let canaries: HashSet<u32> = topo
        .pools
        .iter()
        .filter_map(|p| region.pool(p.slot))
        .map(|ps| ps.canary_pool.load(Ordering::Relaxed))
        .filter(|&c| c != 0)
        .map(|c| c - 1)
        .collect();
    let name_of: HashMap<u32, &str> = topo.pools.iter().map(|p| (p.slot, p.name.as_str())).collect();

    let mut pools = Vec::with_capacity(topo.pools.len());
    let mut nodes = Vec::new();
    for p in &topo.pools {
        let Some(ps) = region.pool(p.slot) else { continue };
        let arm = if canaries.contains(&p.slot) {
            "canary"
        } else {
            "primary"
        };
        let pool_labels = labels(&[("pool", &p.name), ("arm", arm)]);
        let (reference_us, decay_ms) = local.get(&p.slot).map_or(
            (
                p.policy.ewma.default_rtt_ms as f64 * 1000.0,
                p.policy.ewma.decay_ms,
            ),
            |l| (l.reference_us, l.decay_ms),
        );
        let first = nodes.len();
        for n in &p.nodes {
            let Some(slot) = region.node(n.slot) else { continue };
            let (st, counts) = node::stats_and_counts(region, n.slot);
            let draining = slot.flags.load(Ordering::Relaxed) & flags::DRAINING != 0;
            let state = match st.state {
                "healthy" | "slow_start" if draining => "draining",
                s => s,
            };
            let ewma_us = load::current(slot.ewma.load(Ordering::Relaxed), now, decay_ms, reference_us);
            let rem = |until: u64| until.saturating_sub(now) as f64 / 1000.0;
            nodes.push(NodeSnap {
                labels: labels(&[("pool", &p.name), ("node", &n.id), ("arm", arm)]),
                pool: pools.len(),
                addr: n.addr.to_string(),
                backup: n.backup,
                state,
                inflight: st.inflight,
                picks: st.picks,
                failures: st.failures,
                busy: st.busy,
                class: counts.status_class,
                hist: counts.latency_hist,
                hist_sum_us: counts.latency_sum_us,
                ewma_s: ewma_us / 1e6,
                limit: st.limit,
                weight: st.weight,
                effective: eff.get(&n.slot).copied().unwrap_or(st.weight as f64),
                weight_share: 0.0,
                cooldown_s: rem(st.cooldown_until_ms),
                ejection_s: rem(st.ejected_until_ms),
                cooldowns: st.cooldowns,
                ejections: st.ejections,
                queue: p
                    .policy
                    .scrape
                    .as_ref()
                    .map(|s| crate::scrape::snapshot(slot, now, s.fresh_ms())),
                headroom: st.headroom,
                fleet: st.fleet,
                ttft_s: secs(&slot.ttft),
                tpot_s: secs(&slot.tpot),
                queue_s: secs(&slot.preamble),
                completion_tokens: counts.completion_tokens,
                stream_failures: slot.stream_failures.load(Ordering::Relaxed),
            });
        }
        let inflight_imbalance = shares(&mut nodes[first..]);
        let e = ps.emergency.load(Ordering::Relaxed);
        let canary = ps.canary_pool.load(Ordering::Relaxed);
        let (requests, retries) = tally::pool_counts(region, p.slot);
        pools.push(PoolSnap {
            labels: pool_labels,
            algorithm: serde_json::to_value(p.policy.algorithm)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            requests,
            retries,
            retries_denied: ps.retries_denied.load(Ordering::Relaxed),
            no_node: ps.no_node_total.load(Ordering::Relaxed),
            prefix: tally::prefix_counts(region, p.slot),
            shed: ps.shed_total.load(Ordering::Relaxed),
            queue_len: ps.queue_len.load(Ordering::Relaxed),
            queue_admitted: ps.queue_admitted_total.load(Ordering::Relaxed),
            queue_timeouts: ps.queue_timeouts_total.load(Ordering::Relaxed),
            queue_evicted: ps.queue_evicted_total.load(Ordering::Relaxed),
            queue_aborted: ps.queue_aborted_total.load(Ordering::Relaxed),
            queue_wait_s: ps.queue_wait_ms_sum.load(Ordering::Relaxed) as f64 / 1000.0,
            queue_wait_hist: std::array::from_fn(|i| ps.queue_wait_hist[i].load(Ordering::Relaxed)),
            emergency_active: e & emergency::ACTIVE != 0,
            emergency_mode: if e & emergency::FORCED_ON != 0 {
                "on"
            } else if e & emergency::FORCED_OFF != 0 {
                "off"
            } else {
                "auto"
            },
            emergency_entries: ps.emergency_entries_total.load(Ordering::Relaxed),
            canary: (canary != 0)
                .then(|| name_of.get(&(canary - 1)).map(|s| s.to_string()))
                .flatten(),
            canary_share: ps.canary_share.load(Ordering::Relaxed) as f64 / crate::params::PARTS as f64,
            canary_rolled_back: ps.canary_rolled_back.load(Ordering::Relaxed),
            canary_rollbacks: ps.canary_rollbacks_total.load(Ordering::Relaxed),
            window: tally::pool_window(region, p.slot, now),
            window_s: ps.window_ms.load(Ordering::Relaxed) as f64 / 1000.0,
            inflight_imbalance,
            mean_tokens: f64::from_bits(ps.mean_tokens.load(Ordering::Relaxed)),
        });
    }
    write_globals(out, b);
    write_nodes(out, &nodes, &pools);
    write_pools(out, &pools);
    discovery::write(out, b, &topo);
    Ok(())
}

/// A packed stream-signal estimate (`NodeSlot::ttft` and the like) in seconds, as
/// last measured (not decayed); 0 when never measured.
fn secs(word: &std::sync::atomic::AtomicU64) -> f64 {
    load::unpack(word.load(Ordering::Relaxed)).0 as f64 / 1e6
}

/// Fills each primary's weight share (among the primaries that can take tries now)
/// and returns the pool's in-flight imbalance (see the module documentation).
fn shares(nodes: &mut [NodeSnap]) -> f64 {
    let live = |n: &NodeSnap| !n.backup && n.available();
    let total_w: f64 = nodes.iter().filter(|n| live(n)).map(|n| n.effective).sum();
    let total_f: u64 = nodes.iter().filter(|n| live(n)).map(|n| n.inflight as u64).sum();
    let mut worst = 0.0f64;
    for n in nodes.iter_mut().filter(|n| live(n)) {
        if total_w <= 0.0 {
            break;
        }
        n.weight_share = n.effective / total_w;
        if total_f > 0 && n.weight_share > 0.0 {
            let load = n.inflight as f64 / total_f as f64;
            worst = worst.max((load - n.weight_share).abs() / n.weight_share);
        }
    }
    worst
}

fn write_globals(out: &mut String, b: &Balancer) {
    let h = b.region().header();
    family(
        out,
        "rsbalancer_info",
        Kind::Gauge,
        "rsbalancer library version (always 1).",
    );
    sample(
        out,
        "rsbalancer_info",
        &labels(&[("version", env!("CARGO_PKG_VERSION"))]),
        "",
        1u64,
    );
    family(
        out,
        "rsbalancer_config_generation",
        Kind::Gauge,
        "Generation of the shared configuration (bumped by every topology or weight change).",
    );
    sample(out, "rsbalancer_config_generation", "", "", b.generation());
    family(
        out,
        "rsbalancer_shm_lock_steals_total",
        Kind::Counter,
        "Times the shared writer lock was taken over from a dead holder.",
    );
    sample(
        out,
        "rsbalancer_shm_lock_steals_total",
        "",
        "",
        h.lock_steals.load(Ordering::Relaxed),
    );
    if b.topology().is_ok_and(|t| t.cluster.is_some()) {
        let c = b.cluster_stats();
        let figures: [(&str, Kind, &str, u64); 5] = [
            (
                "rsbalancer_cluster_up",
                Kind::Gauge,
                "1 while this gateway's last sync with Redis succeeded; 0: it goes on alone.",
                c.up.into(),
            ),
            (
                "rsbalancer_cluster_gateways",
                Kind::Gauge,
                "Gateways alive in the fleet at the last sync, this one included.",
                c.gateways,
            ),
            (
                "rsbalancer_cluster_syncs_total",
                Kind::Counter,
                "Sync rounds with Redis that succeeded.",
                c.syncs,
            ),
            (
                "rsbalancer_cluster_errors_total",
                Kind::Counter,
                "Sync rounds with Redis that failed (unreachable, slow, refused).",
                c.errors,
            ),
            (
                "rsbalancer_cluster_cooldowns_in_total",
                Kind::Counter,
                "Node cooldowns taken from the fleet (learned at another gateway).",
                c.cooldowns_in,
            ),
        ];
        for (name, kind, help, v) in figures {
            family(out, name, kind, help);
            sample(out, name, "", "", v);
        }
        fleet::write_fleet_queue(out, b);
    }
}

const NODE_COUNTERS: [Field<NodeSnap>; 7] = [
    (
        "rsbalancer_node_headroom_skips_total",
        Kind::Counter,
        "Times a pick passed the node over because its provider's rate-limit headers left too few requests or tokens for the request.",
        |n| n.headroom.headroom_skips.into(),
    ),
    (
        "rsbalancer_node_budget_skips_total",
        Kind::Counter,
        "Times a pick passed the node over because its tpm/rpm budget window was full.",
        |n| n.headroom.budget_skips.into(),
    ),
    (
        "rsbalancer_node_429_total",
        Kind::Counter,
        "Tries the node answered with 429 (busy or quota spent).",
        |n| n.busy.into(),
    ),
    (
        "rsbalancer_node_errors_total",
        Kind::Counter,
        "Failed tries: no response or a 5xx status.",
        |n| n.failures.into(),
    ),
    (
        "rsbalancer_node_picks_total",
        Kind::Counter,
        "Tries handed to the node by the balancer.",
        |n| n.picks.into(),
    ),
    (
        "rsbalancer_node_cooldowns_total",
        Kind::Counter,
        "Cooldowns the node entered (quota 429s, 503 with Retry-After).",
        |n| n.cooldowns.into(),
    ),
    (
        "rsbalancer_node_ejections_total",
        Kind::Counter,
        "Outlier ejections of the node.",
        |n| n.ejections.into(),
    ),
];

const NODE_GAUGES: [Field<NodeSnap>; 8] = [
    (
        "rsbalancer_node_latency_ewma_seconds",
        Kind::Gauge,
        "Peak-EWMA latency estimate the balancer costs the node at now (failures and 429s count as penalties; an idle node decays toward the pool median).",
        |n| n.ewma_s.into(),
    ),
    (
        "rsbalancer_node_inflight",
        Kind::Gauge,
        "Tries in flight to the node, across all workers.",
        |n| n.inflight.into(),
    ),
    (
        "rsbalancer_node_concurrency_limit",
        Kind::Gauge,
        "Concurrency limit learned from 429s (0: none learned, unlimited).",
        |n| n.limit.into(),
    ),
    (
        "rsbalancer_node_weight",
        Kind::Gauge,
        "Base weight (configured or set at run time).",
        |n| n.weight.into(),
    ),
    (
        "rsbalancer_node_effective_weight",
        Kind::Gauge,
        "Weight the balancer selects with: base weight x slow start x recent success (x latency factor for the weight-driven algorithms).",
        |n| n.effective.into(),
    ),
    (
        "rsbalancer_node_weight_share",
        Kind::Gauge,
        "The node's share of its pool's effective weight among primaries that can take tries now (0 for backups and unavailable nodes).",
        |n| n.weight_share.into(),
    ),
    (
        "rsbalancer_node_cooldown_remaining_seconds",
        Kind::Gauge,
        "Time left in the node's 429 cooldown (0 when none).",
        |n| n.cooldown_s.into(),
    ),
    (
        "rsbalancer_node_ejection_remaining_seconds",
        Kind::Gauge,
        "Time left in the node's outlier ejection (0 when none).",
        |n| n.ejection_s.into(),
    ),
];

/// One gauge family over the nodes that have a value (`rows`); nothing when none has.
fn node_gauges<'a>(
    out: &mut String,
    name: &str,
    help: &str,
    rows: impl Iterator<Item = (&'a NodeSnap, impl Into<text::Num>)>,
) {
    let mut rows = rows.peekable();
    if rows.peek().is_none() {
        return;
    }
    text::family(out, name, text::Kind::Gauge, help);
    for (n, v) in rows {
        text::sample(out, name, node_labels(n), "", v);
    }
}

fn node_labels(n: &NodeSnap) -> &str {
    &n.labels
}

fn pool_labels(p: &PoolSnap) -> &str {
    &p.labels
}

fn write_nodes(out: &mut String, nodes: &[NodeSnap], pools: &[PoolSnap]) {
    family(
        out,
        "rsbalancer_node_info",
        Kind::Gauge,
        "A node of the active configuration (always 1): address and tier.",
    );
    for n in nodes {
        let extra = labels(&[
            ("addr", &n.addr),
            ("backup", if n.backup { "true" } else { "false" }),
            ("algorithm", &pools[n.pool].algorithm),
        ]);
        sample(out, "rsbalancer_node_info", &n.labels, &extra, 1u64);
    }
    labelled_family(
        out,
        nodes,
        node_labels,
        (
            "rsbalancer_node_requests_total",
            Kind::Counter,
            "Tries reported for the node, by outcome: status class, or no_response (connect error, timeout, reset). A try the client abandoned counts as 4xx (nginx's 499).",
        ),
        "class",
        &CLASSES,
        |n, i| n.class[i].into(),
    );
    simple_families(out, nodes, node_labels, &NODE_COUNTERS);
    histogram_family(
        out,
        nodes,
        node_labels,
        (
            "rsbalancer_node_upstream_latency_seconds",
            "Time to the node's response of the tries it served (not failed, not 429).",
        ),
        &LATENCY_BOUNDS_MS,
        |n| (&n.hist, n.hist_sum_us as f64 / 1e6),
    );
    simple_families(out, nodes, node_labels, &NODE_GAUGES);
    let scraped: Vec<(&str, crate::scrape::Snapshot)> = nodes
        .iter()
        .filter_map(|n| Some((n.labels.as_str(), n.queue?)))
        .collect();
    queue::write(out, &scraped);
    write_headroom(out, nodes);
    shares::write(out, nodes);
    simple_families(out, nodes, node_labels, &NODE_STREAM);
    labelled_family(
        out,
        nodes,
        node_labels,
        (
            "rsbalancer_node_state",
            Kind::Gauge,
            "Node state: 1 for the current one (healthy, slow_start, cooling after 429s, ejected after failures, down by health checks, draining).",
        ),
        "state",
        &NODE_STATES,
        |n, i| ((n.state == NODE_STATES[i]) as u64).into(),
    );
}

const POOL_FIELDS: [Field<PoolSnap>; 25] = [
    (
        "rsbalancer_pool_requests_total",
        Kind::Counter,
        "Requests that got a first try (a node picked).",
        |p| p.requests.into(),
    ),
    (
        "rsbalancer_pool_retries_total",
        Kind::Counter,
        "Retries granted and picked (each follows a failed or 429 try).",
        |p| p.retries.into(),
    ),
    (
        "rsbalancer_pool_retries_denied_total",
        Kind::Counter,
        "Retries refused because the pool's retry budget was spent.",
        |p| p.retries_denied.into(),
    ),
    (
        "rsbalancer_pool_no_node_total",
        Kind::Counter,
        "Picks (first tries or retries) that found no node able to serve.",
        |p| p.no_node.into(),
    ),
    (
        "rsbalancer_pool_prefix_hits_total",
        Kind::Counter,
        "Prefix affinity: picks that went to the request key's home node.",
        |p| p.prefix.0.into(),
    ),
    (
        "rsbalancer_pool_prefix_spills_total",
        Kind::Counter,
        "Prefix affinity: picks the load guard passed on past a node above load_factor x its share of the in-flight requests.",
        |p| p.prefix.1.into(),
    ),
    (
        "rsbalancer_pool_prefix_nokey_total",
        Kind::Counter,
        "Prefix affinity: picks of requests without a usable prefix (shorter than min_bytes), balanced by load.",
        |p| p.prefix.2.into(),
    ),
    (
        "rsbalancer_pool_shed_total",
        Kind::Counter,
        "Requests refused by admission: shed in emergency, queue full, waited too long.",
        |p| p.shed.into(),
    ),
    (
        "rsbalancer_pool_queue_admitted_total",
        Kind::Counter,
        "Requests admitted from the admission queue.",
        |p| p.queue_admitted.into(),
    ),
    (
        "rsbalancer_pool_queue_timeouts_total",
        Kind::Counter,
        "Requests that waited in the admission queue too long.",
        |p| p.queue_timeouts.into(),
    ),
    (
        "rsbalancer_pool_queue_evicted_total",
        Kind::Counter,
        "Low-priority requests evicted from the admission queue.",
        |p| p.queue_evicted.into(),
    ),
    (
        "rsbalancer_pool_queue_aborted_total",
        Kind::Counter,
        "Queued requests whose client went away.",
        |p| p.queue_aborted.into(),
    ),
    (
        "rsbalancer_pool_queue_wait_seconds_total",
        Kind::Counter,
        "Total time requests waited in the admission queue (the sum of rsbalancer_pool_queue_wait_seconds, kept for existing dashboards).",
        |p| p.queue_wait_s.into(),
    ),
    (
        "rsbalancer_pool_queue_length",
        Kind::Gauge,
        "Requests waiting in the admission queue now.",
        |p| p.queue_len.into(),
    ),
    (
        "rsbalancer_pool_emergency",
        Kind::Gauge,
        "1 while the pool is in emergency mode.",
        |p| (p.emergency_active as u64).into(),
    ),
    (
        "rsbalancer_pool_emergency_entries_total",
        Kind::Counter,
        "Times the pool entered emergency mode.",
        |p| p.emergency_entries.into(),
    ),
    (
        "rsbalancer_pool_canary_rolled_back",
        Kind::Gauge,
        "1 after an automatic rollback set the canary share to 0 (until an operator sets it again).",
        |p| p.canary_rolled_back.into(),
    ),
    (
        "rsbalancer_pool_canary_rollbacks_total",
        Kind::Counter,
        "Automatic rollbacks of the pool's canary.",
        |p| p.canary_rollbacks.into(),
    ),
    (
        "rsbalancer_pool_window_seconds",
        Kind::Gauge,
        "Width of the pool's sliding window (the window_* gauges).",
        |p| p.window_s.into(),
    ),
    (
        "rsbalancer_pool_window_tries",
        Kind::Gauge,
        "Tries reported in the sliding window.",
        |p| p.window.requests.into(),
    ),
    (
        "rsbalancer_pool_window_failed_tries",
        Kind::Gauge,
        "Failed tries (no response or 5xx) in the sliding window.",
        |p| p.window.failures.into(),
    ),
    (
        "rsbalancer_pool_window_429_tries",
        Kind::Gauge,
        "Tries answered 429 in the sliding window.",
        |p| p.window.busy.into(),
    ),
    (
        "rsbalancer_pool_window_shed_requests",
        Kind::Gauge,
        "Requests shed or refused by admission in the sliding window.",
        |p| p.window.shed.into(),
    ),
    (
        "rsbalancer_pool_window_success_ratio",
        Kind::Gauge,
        "Share of the sliding window's tries that succeeded (neither failed nor 429; 1 with no tries).",
        |p| p.window.success_rate().into(),
    ),
    (
        "rsbalancer_pool_load_imbalance",
        Kind::Gauge,
        "Largest relative deviation of a primary's share of the tries in flight from its effective-weight share, among primaries that can take tries (0 with nothing in flight).",
        |p| p.inflight_imbalance.into(),
    ),
];

const EMERGENCY_MODES: [&str; 3] = ["auto", "on", "off"];

fn write_pools(out: &mut String, pools: &[PoolSnap]) {
    simple_families(out, pools, pool_labels, &POOL_FIELDS);
    simple_families(out, pools, pool_labels, &POOL_STREAM);
    histogram_family(
        out,
        pools,
        pool_labels,
        (
            "rsbalancer_pool_queue_wait_seconds",
            "Time requests admitted from the admission queue waited in it (requests let on at once are not in it).",
        ),
        &QUEUE_WAIT_BOUNDS_MS,
        |p| (&p.queue_wait_hist, p.queue_wait_s),
    );
    labelled_family(
        out,
        pools,
        pool_labels,
        (
            "rsbalancer_pool_emergency_mode",
            Kind::Gauge,
            "Who decides emergency mode: auto (the overload detector) or an operator forcing it on or off; 1 for the current one.",
        ),
        "mode",
        &EMERGENCY_MODES,
        |p, i| ((p.emergency_mode == EMERGENCY_MODES[i]) as u64).into(),
    );
    family(
        out,
        "rsbalancer_pool_canary_share_ratio",
        Kind::Gauge,
        "Share of the pool's requests sent to its canary pool (label canary), 0..1.",
    );
    for p in pools {
        let c = labels(&[("canary", p.canary.as_deref().unwrap_or(""))]);
        sample(
            out,
            "rsbalancer_pool_canary_share_ratio",
            &p.labels,
            &c,
            p.canary_share,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    /// Parsed exposition: (metric name, labels sorted, value).
    type Samples = Vec<(String, Vec<(String, String)>, String)>;

    /// A strict parser of the subset of the text format `render` writes: checks that
    /// every sample belongs to the family declared just before it and that label values
    /// are properly escaped. Returns the samples and the (family, type) list.
    fn parse(text: &str) -> (Samples, Vec<(String, String)>) {
        let mut families: Vec<(String, String)> = Vec::new();
        let mut samples = Vec::new();
        let mut help_for = String::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                help_for = rest.split(' ').next().unwrap().to_string();
                assert!(
                    families.iter().all(|(f, _)| *f != help_for),
                    "family {help_for} declared twice"
                );
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert_eq!(name, help_for, "TYPE without HELP just before");
                families.push((name.to_string(), kind.to_string()));
                continue;
            }
            let (name, rest) = match line.find(['{', ' ']) {
                Some(i) => line.split_at(i),
                None => panic!("bad line {line:?}"),
            };
            let (fam, kind) = families.last().expect("sample before any TYPE");
            let ok = name == fam
                || (kind == "histogram"
                    && [
                        format!("{fam}_bucket"),
                        format!("{fam}_sum"),
                        format!("{fam}_count"),
                    ]
                    .contains(&name.to_string()));
            assert!(ok, "sample {name} outside its family ({fam})");
            let mut labels = Vec::new();
            let value;
            if let Some(body) = rest.strip_prefix('{') {
                let mut chars = body.chars().peekable();
                loop {
                    let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
                    assert_eq!(chars.next(), Some('"'), "label {key} of {line:?}");
                    let mut v = String::new();
                    loop {
                        match chars.next().expect("unterminated label value") {
                            '\\' => match chars.next() {
                                Some('\\') => v.push('\\'),
                                Some('"') => v.push('"'),
                                Some('n') => v.push('\n'),
                                other => panic!("bad escape {other:?} in {line:?}"),
                            },
                            '"' => break,
                            '\n' => panic!("raw newline in a label value"),
                            c => v.push(c),
                        }
                    }
                    labels.push((key, v));
                    match chars.next() {
                        Some(',') => continue,
                        Some('}') => break,
                        other => panic!("unexpected {other:?} in {line:?}"),
                    }
                }
                let rest: String = chars.collect();
                value = rest.strip_prefix(' ').expect("space before value").to_string();
            } else {
                value = rest.trim_start().to_string();
            }
            assert!(
                value == "NaN" || value == "+Inf" || value == "-Inf" || value.parse::<f64>().is_ok(),
                "bad value {value:?} in {line:?}"
            );
            labels.sort();
            samples.push((name.to_string(), labels, value));
        }
        (samples, families)
    }

    fn value(samples: &Samples, name: &str, want: &[(&str, &str)]) -> f64 {
        let hits: Vec<&String> = samples
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && want
                        .iter()
                        .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|(_, _, v)| v)
            .collect();
        assert_eq!(hits.len(), 1, "{name}{want:?}: {} samples", hits.len());
        hits[0].parse().unwrap()
    }

    fn balancer(json: &str) -> Balancer {
        Balancer::create(&Config::from_json(json).unwrap()).unwrap()
    }

    const TWO_POOLS: &str = r#"{"shm": {"max_nodes": 16, "max_pools": 4, "max_workers": 2, "config_bytes": 65536},
        "pools": {
          "llm":  {"algorithm": "weighted_random", "slow_start_ms": 0,
                   "nodes": [{"id": "a", "addr": "127.0.0.1:9001", "weight": 3},
                             {"id": "b", "addr": "127.0.0.1:9002", "weight": 1},
                             {"id": "z", "addr": "127.0.0.1:9003", "backup": true}]},
          "next": {"nodes": [{"id": "n1", "addr": "127.0.0.1:9011"}]}
        }}"#;

    fn render_text(b: &Balancer) -> String {
        let mut s = String::new();
        render(b, &mut s).unwrap();
        s
    }

    #[test]
    fn queue_families_only_for_scraped_pools_figures_only_when_fresh() {
        let json = TWO_POOLS.replace(
            r#""algorithm": "weighted_random","#,
            r#""algorithm": "p2c_ewma", "scrape": {"scrape_ms": 60000},"#,
        );
        let b = balancer(&json);
        let a = b.node_index("llm", "a").unwrap();
        let bb = b.node_index("llm", "b").unwrap();
        let body = b"vllm:num_requests_waiting{model_name=\"m\"} 9\nvllm:num_requests_running 2\n\
                     vllm:kv_cache_usage_perc 0.25\n";
        crate::scrape::report(&b, a, Some(body)).unwrap();
        crate::scrape::report(&b, bb, None).unwrap();
        let (s, _) = parse(&render_text(&b));
        let a_labels = [("pool", "llm"), ("node", "a")];
        assert_eq!(value(&s, "rsbalancer_node_queue_waiting", &a_labels), 9.0);
        assert_eq!(value(&s, "rsbalancer_node_queue_running", &a_labels), 2.0);
        assert_eq!(value(&s, "rsbalancer_node_kv_cache_usage", &a_labels), 0.25);
        assert_eq!(value(&s, "rsbalancer_node_queue_backlog", &a_labels), 9.0);
        assert_eq!(value(&s, "rsbalancer_node_queue_stale", &a_labels), 0.0);
        let b_labels = [("pool", "llm"), ("node", "b")];
        assert_eq!(value(&s, "rsbalancer_node_queue_stale", &b_labels), 1.0);
        assert_eq!(
            value(&s, "rsbalancer_node_queue_scrape_failures_total", &b_labels),
            1.0
        );
        let has = |name: &str, node: &str| {
            s.iter()
                .any(|(n, l, _)| n == name && l.iter().any(|(k, v)| k == "node" && v == node))
        };
        assert!(
            !has("rsbalancer_node_queue_waiting", "b"),
            "never scraped: no figure"
        );
        assert!(
            !has("rsbalancer_node_queue_stale", "n1"),
            "pool without scrape: no series"
        );
        // The status document shows the same.
        let st = crate::status::of(&b).unwrap();
        let q = &st["pools"]["llm"]["nodes"][0]["queue"];
        assert_eq!(
            (q["waiting"].as_u64(), q["stale"].as_bool()),
            (Some(9), Some(false))
        );
        assert!(st["pools"]["next"]["nodes"][0].get("queue").is_none());
    }

    #[test]
    fn counts_statuses_latencies_and_retries_exactly() {
        let b = balancer(TWO_POOLS);
        let pool = b.pool_index("llm").unwrap();
        let a = b.node_index("llm", "a").unwrap();
        let bb = b.node_index("llm", "b").unwrap();
        // Reports on chosen slots (pick raises in-flight; report releases it).
        for (node, status, ms) in [
            (a, 200, 3),       // le 0.005
            (a, 200, 40),      // le 0.05
            (a, 429, 7),       // busy: no histogram sample
            (bb, 503, 120),    // failed: no histogram sample
            (bb, 0, 0),        // no response: no histogram sample
            (a, 200, 400_000), // +Inf
        ] {
            b.report(node, status, ms * 1000, 0).unwrap();
        }
        b.pick(pool, b"", &[]).unwrap();
        b.pick(pool, b"", &[a]).unwrap();
        let (s, families) = parse(&render_text(&b));
        let na = [("pool", "llm"), ("node", "a"), ("arm", "primary")];
        let nb = [("pool", "llm"), ("node", "b"), ("arm", "primary")];
        let with = |base: &[(&'static str, &'static str)], k: &'static str, v: &'static str| {
            let mut l = base.to_vec();
            l.push((k, v));
            l
        };
        assert_eq!(
            value(&s, "rsbalancer_node_requests_total", &with(&na, "class", "2xx")),
            3.0
        );
        assert_eq!(
            value(&s, "rsbalancer_node_requests_total", &with(&na, "class", "4xx")),
            1.0
        );
        assert_eq!(
            value(&s, "rsbalancer_node_requests_total", &with(&na, "class", "5xx")),
            0.0
        );
        assert_eq!(
            value(&s, "rsbalancer_node_requests_total", &with(&nb, "class", "5xx")),
            1.0
        );
        assert_eq!(
            value(
                &s,
                "rsbalancer_node_requests_total",
                &with(&nb, "class", "no_response")
            ),
            1.0
        );
        assert_eq!(value(&s, "rsbalancer_node_429_total", &na), 1.0);
        assert_eq!(value(&s, "rsbalancer_node_errors_total", &nb), 2.0);
        let bucket = |base: &[(&'static str, &'static str)], le: &'static str| {
            value(
                &s,
                "rsbalancer_node_upstream_latency_seconds_bucket",
                &with(base, "le", le),
            )
        };
        assert_eq!(bucket(&na, "0.005"), 1.0);
        assert_eq!(bucket(&na, "0.01"), 1.0, "the 429 is not a served try");
        assert_eq!(bucket(&na, "0.05"), 2.0, "cumulative");
        assert_eq!(bucket(&na, "300"), 2.0);
        assert_eq!(bucket(&na, "+Inf"), 3.0);
        assert_eq!(bucket(&nb, "+Inf"), 0.0, "failures are not served tries");
        assert_eq!(
            value(&s, "rsbalancer_node_upstream_latency_seconds_count", &na),
            3.0
        );
        assert_eq!(
            value(&s, "rsbalancer_node_upstream_latency_seconds_count", &nb),
            0.0
        );
        let sum = value(&s, "rsbalancer_node_upstream_latency_seconds_sum", &na);
        assert!((sum - 400.043).abs() < 1e-9, "sum {sum}");
        let p = [("pool", "llm"), ("arm", "primary")];
        assert_eq!(value(&s, "rsbalancer_pool_requests_total", &p), 1.0);
        assert_eq!(value(&s, "rsbalancer_pool_retries_total", &p), 1.0);
        assert_eq!(value(&s, "rsbalancer_pool_window_tries", &p), 6.0);
        assert_eq!(value(&s, "rsbalancer_pool_window_failed_tries", &p), 2.0);
        assert_eq!(value(&s, "rsbalancer_pool_window_429_tries", &p), 1.0);
        let inflight: f64 = ["a", "b", "z"]
            .iter()
            .map(|id| value(&s, "rsbalancer_node_inflight", &[("pool", "llm"), ("node", id)]))
            .sum();
        assert_eq!(inflight, 2.0, "the two picks are in flight");
        // Every family is declared once with its type; counters end in _total.
        for (f, kind) in &families {
            assert!(f.starts_with("rsbalancer_"), "{f}");
            assert_eq!(kind == "counter", f.ends_with("_total"), "{f} is a {kind}");
        }
    }

    #[test]
    fn queue_wait_is_a_histogram_per_pool() {
        let b = balancer(TWO_POOLS);
        let ps = b.region().pool(b.pool_index("llm").unwrap()).unwrap();
        // Waits of 20 ms, 20 ms and 90 s (as the queue's dispatch records them).
        for (ms, bucket) in [(20, 2), (20, 2), (90_000, QUEUE_WAIT_BOUNDS_MS.len())] {
            ps.queue_wait_hist[bucket].fetch_add(1, Ordering::Relaxed);
            ps.queue_wait_ms_sum.fetch_add(ms, Ordering::Relaxed);
        }
        let (s, families) = parse(&render_text(&b));
        assert!(families.contains(&(
            "rsbalancer_pool_queue_wait_seconds".to_string(),
            "histogram".to_string()
        )));
        let p = |le: &'static str| [("pool", "llm"), ("arm", "primary"), ("le", le)];
        let bucket = |le| value(&s, "rsbalancer_pool_queue_wait_seconds_bucket", &p(le));
        assert_eq!(bucket("0.01"), 0.0);
        assert_eq!(bucket("0.025"), 2.0);
        assert_eq!(bucket("60"), 2.0, "cumulative");
        assert_eq!(bucket("+Inf"), 3.0);
        let pool = [("pool", "llm"), ("arm", "primary")];
        assert_eq!(value(&s, "rsbalancer_pool_queue_wait_seconds_count", &pool), 3.0);
        let sum = value(&s, "rsbalancer_pool_queue_wait_seconds_sum", &pool);
        assert!((sum - 90.04).abs() < 1e-9, "sum {sum}");
        assert_eq!(value(&s, "rsbalancer_pool_queue_wait_seconds_total", &pool), sum);
        let next = [("pool", "next"), ("arm", "primary"), ("le", "+Inf")];
        assert_eq!(value(&s, "rsbalancer_pool_queue_wait_seconds_bucket", &next), 0.0);
    }

    #[test]
    fn state_weights_and_imbalance() {
        let b = balancer(TWO_POOLS);
        let pool = b.pool_index("llm").unwrap();
        let a = b.node_index("llm", "a").unwrap();
        let bn = b.node_index("llm", "b").unwrap();
        let s = parse(&render_text(&b)).0;
        let na = [("pool", "llm"), ("node", "a")];
        let nb = [("pool", "llm"), ("node", "b")];
        let nz = [("pool", "llm"), ("node", "z")];
        assert_eq!(value(&s, "rsbalancer_node_weight", &na), 3.0);
        assert_eq!(value(&s, "rsbalancer_node_effective_weight", &na), 3.0);
        assert_eq!(value(&s, "rsbalancer_node_weight_share", &na), 0.75);
        assert_eq!(value(&s, "rsbalancer_node_weight_share", &nb), 0.25);
        assert_eq!(value(&s, "rsbalancer_node_weight_share", &nz), 0.0, "backup");
        let st = |s: &Samples, n: &[(&str, &str)], state: &'static str| {
            let mut l = n.to_vec();
            l.push(("state", state));
            value(s, "rsbalancer_node_state", &l)
        };
        assert_eq!(st(&s, &na, "healthy"), 1.0);
        assert_eq!(st(&s, &na, "cooling"), 0.0);
        let p = [("pool", "llm")];
        assert_eq!(value(&s, "rsbalancer_pool_load_imbalance", &p), 0.0, "idle");

        // In flight: 2 tries on b (share 0.25) and none on a: b carries 100% of the
        // load, (1 - 0.25) / 0.25 = 3; a carries 0, |0 - 0.75| / 0.75 = 1.
        b.pick(pool, b"", &[a]).unwrap();
        b.pick(pool, b"", &[a]).unwrap();
        let s = parse(&render_text(&b)).0;
        assert_eq!(value(&s, "rsbalancer_pool_load_imbalance", &p), 3.0);

        // A quota 429 (long Retry-After) cools b down: it leaves the shares.
        b.report(bn, 429, 1000, 30_000).unwrap();
        b.report(bn, 200, 1000, 0).unwrap();
        let s = parse(&render_text(&b)).0;
        assert_eq!(st(&s, &nb, "cooling"), 1.0);
        assert_eq!(st(&s, &nb, "healthy"), 0.0);
        let rem = value(&s, "rsbalancer_node_cooldown_remaining_seconds", &nb);
        assert!(rem > 0.0 && rem <= 33.0, "cooldown remaining {rem}");
        assert_eq!(value(&s, "rsbalancer_node_cooldowns_total", &nb), 1.0);
        assert_eq!(value(&s, "rsbalancer_node_weight_share", &na), 1.0);
        assert_eq!(value(&s, "rsbalancer_node_weight_share", &nb), 0.0);

        // Draining a itself: a state of its own, out of the shares too.
        b.set_draining(a, true).unwrap();
        let s = parse(&render_text(&b)).0;
        assert_eq!(st(&s, &na, "draining"), 1.0);
        assert_eq!(value(&s, "rsbalancer_node_weight_share", &na), 0.0);
    }

    #[test]
    fn arm_label_marks_canary_pools_and_labels_are_escaped() {
        let b = balancer(TWO_POOLS);
        let llm = b.pool_index("llm").unwrap();
        let next = b.pool_index("next").unwrap();
        let ps = b.region().pool(llm).unwrap();
        ps.canary_pool.store(next + 1, Ordering::Relaxed);
        b.set_canary_share(llm, 500).unwrap();
        let (s, _) = parse(&render_text(&b));
        assert_eq!(
            value(
                &s,
                "rsbalancer_pool_requests_total",
                &[("pool", "next"), ("arm", "canary")]
            ),
            0.0
        );
        assert_eq!(
            value(
                &s,
                "rsbalancer_node_inflight",
                &[("pool", "next"), ("node", "n1"), ("arm", "canary")]
            ),
            0.0
        );
        assert_eq!(
            value(
                &s,
                "rsbalancer_pool_canary_share_ratio",
                &[("pool", "llm"), ("arm", "primary"), ("canary", "next")]
            ),
            0.05
        );
        // Escaping (names in configs cannot hold these; the writer must still cope).
        let mut out = String::new();
        sample(&mut out, "m", &labels(&[("k", "a\"b\\c\nd")]), "", 1u64);
        assert_eq!(out, "m{k=\"a\\\"b\\\\c\\nd\"} 1\n");
        let (s, _) = parse(&format!("# HELP m x\n# TYPE m gauge\n{out}"));
        assert_eq!(s[0].1, vec![("k".to_string(), "a\"b\\c\nd".to_string())]);
        let mut v = String::new();
        for f in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 0.25, 1e-7] {
            write_num(&mut v, Num::F(f));
            v.push(' ');
        }
        assert_eq!(v, "NaN +Inf -Inf 0.25 0.0000001 ");
    }

    /// Every metric name the shipped rules and dashboard use is one `render` writes
    /// (or a recording rule defines): a rename cannot silently break them.
    #[test]
    fn rules_and_dashboard_use_rendered_names() {
        let b = balancer(TWO_POOLS);
        let (_, families) = parse(&render_text(&b));
        let mut known: HashSet<String> = HashSet::new();
        for (f, kind) in &families {
            known.insert(f.clone());
            if kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    known.insert(format!("{f}{suffix}"));
                }
            }
        }
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("nginx-conf/prometheus");
        let recording = std::fs::read_to_string(dir.join("rsbalancer.rules.yml")).unwrap();
        for line in recording.lines() {
            if let Some(r) = line.trim().strip_prefix("- record: ") {
                known.insert(r.trim().to_string());
            }
        }
        let mut checked = 0;
        for file in [
            "rsbalancer.rules.yml",
            "rsbalancer.alerts.yml",
            "grafana-dashboard.json",
        ] {
            let text = std::fs::read_to_string(dir.join(file)).unwrap();
            for (i, _) in text.match_indices("rsbalancer") {
                let name: String = text[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
                    .collect();
                if !(name.starts_with("rsbalancer_") || name.starts_with("rsbalancer:")) {
                    continue; // prose, file names, the job name
                }
                let name = name.trim_end_matches(':');
                assert!(
                    known.contains(name),
                    "{file} uses {name}, which /metrics does not have"
                );
                checked += 1;
            }
        }
        assert!(checked > 30, "only {checked} metric references found");
    }
}
