//! The status read model: every pool and node with its live state, as one JSON
//! document, for admin reads (`GET /rsbalancer/`), `status_json()` and the status page.
//!
//! A node with a provider shows it (scheme, Host, header names and the variables they
//! are read from, model): the topology holds no header value, so neither does this.
//!
//! It only reads: the topology through the pool's API, node state through
//! [`crate::node`], the admission queue through [`crate::admission::status_json`], and
//! the canary and emergency words of each pool's shared slot, and each node's recent
//! window (tries per second and success share over about a minute) through
//! [`crate::tally`], and its stream signals (`stream`: TTFT, time per token, queue
//! before the first token, completion tokens, cut streams). Adding a field for operators means adding it here (and to the
//! page that shows it).

use std::sync::atomic::Ordering;

use serde_json::{json, Value};

use crate::balancer::{Balancer, Error};
use crate::node;
use crate::params::PARTS;
use crate::select::Algorithm;
use crate::shm::clock;
use crate::shm::layout::{emergency, RECENT_WINDOW_MS};
use crate::shm::Region;
use crate::tally;

/// A node's recent window: tries per second and the share that succeeded (neither
/// failed nor 429; null without tries) over about the last minute, rounded for
/// display, with the counts they come from.
fn recent(region: &Region, slot: u32, now: u64) -> Value {
    let (tries, bad) = tally::node_recent(region, slot, now);
    let window_s = RECENT_WINDOW_MS as f64 / 1000.0;
    let success = (tries > 0).then(|| (1.0 - bad.min(tries) as f64 / tries as f64) * 1000.0);
    json!({
        "window_s": window_s,
        "tries": tries,
        "failed_or_429": bad,
        "rate": (tries as f64 / window_s * 10.0).round() / 10.0,
        "success": success.map(|s| s.round() / 1000.0),
    })
}

fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

/// A node's stream signals (`crate::stream`): its estimates in ms as last measured
/// (null when never), completion tokens from usage and cut streams.
fn stream(region: &Region, slot: u32) -> Value {
    let n = region.node(slot).expect("topology slot in range");
    let ms = |w: &std::sync::atomic::AtomicU64| {
        let us = crate::load::unpack(w.load(Ordering::Relaxed)).0 as f64;
        (us > 0.0).then(|| round1(us / 1000.0))
    };
    json!({
        "ttft_ms": ms(&n.ttft),
        "time_per_token_ms": ms(&n.tpot),
        "queue_ms": ms(&n.preamble),
        "completion_tokens": tally::node_counts(region, slot).completion_tokens,
        "stream_failures": n.stream_failures.load(Ordering::Relaxed),
    })
}

/// Every pool and node with its live state. Effective weights are this process's.
pub fn of(b: &Balancer) -> Result<Value, Error> {
    let topo = b.topology()?;
    let region = b.region();
    let effective = b.effective_weights()?;
    let now = clock::now_ms();
    let pools: serde_json::Map<String, Value> = topo
        .pools
        .iter()
        .map(|p| {
            let ps = region.pool(p.slot).expect("topology slot in range");
            let nodes: Vec<Value> = p
                .nodes
                .iter()
                .map(|n| {
                    let mut v = serde_json::to_value(node::stats(region, n.slot)).expect("stats serialize");
                    v["id"] = n.id.clone().into();
                    v["addr"] = n.addr.to_string().into();
                    let w = effective.get(&n.slot).copied().unwrap_or(0.0);
                    v["effective_weight"] = ((w * 100.0).round() / 100.0).into();
                    v["recent"] = recent(region, n.slot, now);
                    // Scraped queue figures, for the pools that scrape (`crate::scrape`).
                    if let (Some(s), Some(slot)) = (&p.policy.scrape, region.node(n.slot)) {
                        v["queue"] = serde_json::to_value(crate::scrape::snapshot(slot, now, s.fresh_ms()))
                            .expect("snapshot serializes");
                    }
                    v["stream"] = stream(region, n.slot);
                    // Header names and variable names, never a value.
                    if let Some(p) = &n.provider {
                        v["provider"] = serde_json::to_value(p).expect("provider serializes");
                    }
                    v
                })
                .collect();
            let (requests, retries) = tally::pool_counts(region, p.slot);
            let prefix = (p.policy.algorithm == Algorithm::Prefix).then(|| {
                let (hits, spills, nokey) = tally::prefix_counts(region, p.slot);
                json!({ "hits": hits, "spills": spills, "nokey": nokey,
                        "load_factor": p.policy.prefix.load_factor,
                        "min_bytes": p.policy.prefix.min_bytes })
            });
            let e = ps.emergency.load(Ordering::Relaxed);
            let mode = if e & emergency::FORCED_ON != 0 {
                "on"
            } else if e & emergency::FORCED_OFF != 0 {
                "off"
            } else {
                "auto"
            };
            let pool = json!({
                "algorithm": p.policy.algorithm,
                "requests": requests,
                "retries": retries,
                "retries_denied": ps.retries_denied.load(Ordering::Relaxed),
                "no_node": ps.no_node_total.load(Ordering::Relaxed),
                "prefix": prefix,
                "admission": crate::admission::status_json(region, p.slot),
                "nodes": nodes,
                "canary_share": ps.canary_share.load(Ordering::Relaxed) as f64 / PARTS as f64,
                "canary_rolled_back": ps.canary_rolled_back.load(Ordering::Relaxed) != 0,
                "emergency": { "mode": mode, "active": e & emergency::ACTIVE != 0 },
                "mean_completion_tokens": round1(f64::from_bits(ps.mean_tokens.load(Ordering::Relaxed))),
            });
            (p.name.clone(), pool)
        })
        .collect();
    let mut doc = json!({
        "generation": b.generation(),
        "reclaimed_tries": region.header().reclaimed_tries.load(Ordering::Relaxed),
        "pools": pools,
    });
    if topo.cluster.is_some() {
        doc["cluster"] = json!(b.cluster_stats());
    }
    crate::discovery::add_status(b, &topo, &mut doc);
    Ok(doc)
}
