//! Service discovery: a pool's nodes taken from a source (DNS here; Consul beside it)
//! instead of, or besides, a static list.
//!
//! **Who asks.** One worker per gateway holds the discovery lease (a pid and an end
//! time in the region's header, renewed by a Lua timer every second, taken over when
//! the holder dies, stalls or belongs to an nginx generation a reload replaced, like
//! the health-check and cluster leases). That worker runs one thread per discovery
//! pool ([`run`]); the thread may block on the network, nginx's event loop never does.
//! What a thread learns it writes into the shared region, where every worker sees it.
//!
//! **One source, one contract** ([`Source`]). A source answers with the nodes it found
//! (plain [`NodeConfig`]s, resolved: [`found`] builds one) and when to ask again, or
//! fails with a short reason. The framework does the rest, the same for every source:
//!
//! - [`apply`] makes the pool's node set what the source found, through ONE
//!   all-or-nothing reconfiguration under the shared lock, the machinery of the admin
//!   API (`crate::admin`): nodes that stay (same id) keep their slot and everything
//!   learned (EWMA, limits, cooldowns, counters, drains), with the address, weight and
//!   backup tier the source gives now; new nodes start in slow start; removed nodes
//!   are picked no more and finish the tries in flight. Unlike the admin API, a
//!   discovery pool may be left without nodes or without a primary: requests then get
//!   the pool's no-node answer (`no_node_status`, 429 or 503, with Retry-After).
//! - An empty answer leaves the pool as it is unless `on_empty` is `empty`: an empty
//!   answer is more often a broken zone or registry than a fleet that really left.
//! - [`failed`] keeps the last known set and records the failure; the first failure
//!   after a success (and the first success after failures) makes one log line.
//! - The source's status lives in the pool's slot (last success, answers, errors,
//!   consecutive failures, node count, the last error's text): `/metrics`
//!   (`rsbalancer_discovery_*`), `/rsbalancer/status` and the status page show it.
//!
//! **Reloads.** A config file names no nodes for a pool whose source gives them; a
//! reload carries the running ones over ([`keep`]), so they keep their state and the
//! pool is never empty for a moment.
//!
//! **Run-time changes.** The admin API may add or remove nodes of a discovery pool;
//! the source's next answer decides again (as Consul's catalog would). An operator's
//! drain survives answers; a weight set by hand lasts until the source gives another.

use std::sync::atomic::{fence, Ordering};

use crate::admin::{self, AdminError};
use crate::balancer::{Balancer, Topology};
use crate::config::discovery::OnEmpty;
use crate::config::NodeConfig;
use crate::shm::clock;
use crate::shm::layout::PoolSlot;
use crate::topology::PoolTopo;

pub mod consul;
pub mod dns;
pub mod keep;
pub mod lookup;
pub mod run;

pub use run::{Answer, Source};

/// Most nodes taken from one answer (the rest are left out): a value from outside.
pub const MAX_FOUND: usize = 4_096;

/// A node as a source found it: `id` (1..=64 bytes of `[A-Za-z0-9._:@-]`), its
/// address, its weight (clamped to 1..=10000) and tier. Host header and SNI default to
/// the address; set `host_header` (and other provider fields) on the result when the
/// source knows a name.
pub fn found(id: String, addr: std::net::SocketAddr, weight: u32, backup: bool) -> NodeConfig {
    let (lo, hi) = (*crate::abi::WEIGHT_RANGE.start(), *crate::abi::WEIGHT_RANGE.end());
    NodeConfig {
        id,
        addr: addr.to_string(),
        weight: weight.clamp(lo, hi),
        backup,
        resolved: Some(addr),
        ..NodeConfig::default()
    }
}

/// What [`apply`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Applied {
    /// Ids of the nodes that joined, left, or stayed with another address, weight or
    /// tier.
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub updated: Vec<String>,
    /// The answer was empty and the pool kept its nodes (`on_empty: keep`).
    pub kept_on_empty: bool,
    /// The source had been failing before this answer.
    pub recovered: bool,
    /// Nodes in the pool now.
    pub nodes: usize,
}

impl Applied {
    /// Whether the node set changed.
    pub fn changed(&self) -> bool {
        !(self.added.is_empty() && self.removed.is_empty() && self.updated.is_empty())
    }

    /// A line for the error log, or `None` when nothing worth one happened.
    pub fn line(&self, pool: &str, source: &str) -> Option<String> {
        let mut parts = Vec::new();
        if self.recovered {
            parts.push("answers again".to_string());
        }
        if self.changed() {
            let list = |sign: char, ids: &[String]| -> String {
                ids.iter().map(|i| format!(" {sign}{i}")).collect()
            };
            parts.push(format!(
                "nodes{}{}{}",
                list('+', &self.added),
                list('-', &self.removed),
                list('~', &self.updated)
            ));
        }
        if self.kept_on_empty {
            parts.push("empty answer: the last known nodes are kept (on_empty: keep)".into());
        }
        if parts.is_empty() {
            return None;
        }
        Some(format!(
            "discovery: pool {pool} ({source}): {} ({} nodes)",
            parts.join("; "),
            self.nodes
        ))
    }
}

/// The change from `current` to `found`, by id: (added, removed, updated).
pub fn diff(current: &[NodeConfig], found: &[NodeConfig]) -> (Vec<String>, Vec<String>, Vec<String>) {
    let mut added = Vec::new();
    let mut updated = Vec::new();
    for f in found {
        match current.iter().find(|c| c.id == f.id) {
            None => added.push(f.id.clone()),
            Some(c)
                if c.resolved != f.resolved
                    || (f.weight != 0 && c.weight != f.weight)
                    || c.backup != f.backup =>
            {
                updated.push(f.id.clone())
            }
            Some(_) => {}
        }
    }
    let removed = current
        .iter()
        .filter(|c| !found.iter().any(|f| f.id == c.id))
        .map(|c| c.id.clone())
        .collect();
    (added, removed, updated)
}

/// The answer as used: duplicates by id dropped (the first kept), at most
/// [`MAX_FOUND`] nodes.
pub fn dedup(found: Vec<NodeConfig>) -> Vec<NodeConfig> {
    let mut out: Vec<NodeConfig> = Vec::with_capacity(found.len().min(MAX_FOUND));
    for f in found {
        if out.len() == MAX_FOUND {
            break;
        }
        if !out.iter().any(|o| o.id == f.id) {
            out.push(f);
        }
    }
    out
}

fn unknown_pool(pool: &str) -> AdminError {
    AdminError::NotFound(format!("unknown pool \"{pool}\""))
}

/// Make `pool`'s node set what source `source` found (see the module documentation).
/// A found node of weight 0 that is in the pool keeps its running weight (a source
/// that knows addresses only, such as node names re-resolved):
/// one all-or-nothing reconfiguration, none when nothing changed. Records the answer
/// in the pool's status. A refused change (the region is full, a bad node) is an
/// error and changes nothing; the caller records it with [`failed`].
pub fn apply(b: &Balancer, pool: &str, found: Vec<NodeConfig>, source: &str) -> Result<Applied, AdminError> {
    let _ = source;
    let topo = b.topology()?;
    let p = topo.pool(pool).ok_or_else(|| unknown_pool(pool))?;
    let ps = b.region().pool(p.slot).ok_or_else(|| unknown_pool(pool))?;
    let found = dedup(found);
    let on_empty = p.policy.discovery.as_ref().map_or(OnEmpty::Keep, |d| d.on_empty);
    let mut out = Applied::default();
    if found.is_empty() && on_empty == OnEmpty::Keep && !p.nodes.is_empty() {
        out.kept_on_empty = true;
        out.nodes = p.nodes.len();
        out.recovered = record_answer(ps, p.nodes.len());
        return Ok(out);
    }
    let current = admin::pool_config(b.region(), p).nodes;
    let (added, removed, updated) = diff(&current, &found);
    let waiting = crate::config::discovery::unresolved(&p.policy).any(|u| found.iter().any(|f| f.id == u.id));
    if added.is_empty() && removed.is_empty() && updated.is_empty() && !waiting {
        out.nodes = found.len();
        out.recovered = record_answer(ps, found.len());
        return Ok(out);
    }
    let mut done = None;
    admin::change(
        b,
        |t: &Topology| t.pool(pool).map(|_| ()).ok_or_else(|| unknown_pool(pool)),
        |cfg| {
            let pc = cfg.pools.get_mut(pool).ok_or_else(|| unknown_pool(pool))?;
            // Under the lock, from the running config: a node that stays keeps its
            // provider fields (and the header values this process kept for it).
            let running = std::mem::take(&mut pc.nodes);
            pc.nodes = found
                .iter()
                .map(|f| match running.iter().find(|r| r.id == f.id) {
                    Some(r) => NodeConfig {
                        addr: f.addr.clone(),
                        resolved: f.resolved,
                        weight: if f.weight == 0 { r.weight } else { f.weight },
                        backup: f.backup,
                        ..r.clone()
                    },
                    None => f.clone(),
                })
                .collect();
            let now_in: Vec<String> = pc.nodes.iter().map(|n| n.id.clone()).collect();
            if let Some(dns) = pc.discovery.as_mut().and_then(|d| d.dns.as_mut()) {
                dns.unresolved.retain(|u| !now_in.contains(&u.id));
            }
            done = Some(diff(&running, &pc.nodes));
            cfg.validate()
                .map_err(|e| admin::validation_error(e, &format!("pools.{pool}.nodes")))
        },
    )?;
    let (added, removed, updated) = done.unwrap_or((added, removed, updated));
    out.added = added;
    out.removed = removed;
    out.updated = updated;
    out.nodes = found.len();
    out.recovered = record_answer(ps, found.len());
    Ok(out)
}

/// Record an answer with `nodes` nodes; true when the source had been failing.
fn record_answer(ps: &PoolSlot, nodes: usize) -> bool {
    ps.discovery_ok_ms
        .store(clock::now_ms().max(1), Ordering::Relaxed);
    ps.discovery_answers.fetch_add(1, Ordering::Relaxed);
    ps.discovery_nodes.store(nodes as u32, Ordering::Relaxed);
    ps.discovery_failing.swap(0, Ordering::Relaxed) != 0
}

/// Record a failure of `pool`'s source `source` (unreachable, timeout, a refused
/// change): the pool keeps its last known nodes. Returns a line for the error log for
/// the first failure after a success (or the first ever), else `None`.
pub fn failed(b: &Balancer, pool: &str, source: &str, err: &str) -> Option<String> {
    let topo = b.topology().ok()?;
    let p = topo.pool(pool)?;
    let ps = b.region().pool(p.slot)?;
    ps.discovery_errors.fetch_add(1, Ordering::Relaxed);
    write_error(ps, err);
    let before = ps.discovery_failing.fetch_add(1, Ordering::Relaxed);
    (before == 0).then(|| {
        format!(
            "discovery: pool {pool} ({source}) failed: {err}; the pool keeps its {} last known nodes",
            p.nodes.len()
        )
    })
}

/// Bytes of a failure's text kept in the region.
pub const ERROR_BYTES: usize = 48;

/// Store `err` (cut to [`ERROR_BYTES`] at a character boundary) under the seqlock.
fn write_error(ps: &PoolSlot, err: &str) {
    let mut cut = err.len().min(ERROR_BYTES);
    while !err.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut bytes = [0u8; ERROR_BYTES];
    bytes[..cut].copy_from_slice(&err.as_bytes()[..cut]);
    // Odd while writing. Relaxed RMW, then a Release fence: a reader that sees any of
    // the words below also sees the odd sequence (pairs with its Acquire fence).
    ps.discovery_error_seq.fetch_add(1, Ordering::Relaxed);
    fence(Ordering::Release);
    for (w, chunk) in ps.discovery_error.iter().zip(bytes.chunks(8)) {
        w.store(
            u64::from_le_bytes(chunk.try_into().expect("8 bytes")),
            Ordering::Relaxed,
        );
    }
    // Release pairs with the reader's Acquire load of the sequence: an even sequence
    // read there comes with the words written before it.
    ps.discovery_error_seq.fetch_add(1, Ordering::Release);
}

/// The last failure's text, or `None` (none yet, or a write kept racing the read).
fn read_error(ps: &PoolSlot) -> Option<String> {
    for _ in 0..4 {
        // Acquire pairs with the Release increment that ended the last write.
        let s1 = ps.discovery_error_seq.load(Ordering::Acquire);
        if s1 == 0 {
            return None;
        }
        if s1 % 2 == 1 {
            std::hint::spin_loop();
            continue;
        }
        let mut bytes = [0u8; ERROR_BYTES];
        for (w, chunk) in ps.discovery_error.iter().zip(bytes.chunks_mut(8)) {
            chunk.copy_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
        }
        // Acquire fence pairs with the writer's Release fence: a word of a newer write
        // read above makes the sequence load below see that write's odd value.
        fence(Ordering::Acquire);
        if ps.discovery_error_seq.load(Ordering::Relaxed) == s1 {
            let end = bytes.iter().position(|&b| b == 0).unwrap_or(ERROR_BYTES);
            return Some(String::from_utf8_lossy(&bytes[..end]).into_owned());
        }
    }
    None
}

/// A discovery pool's source status, as `/metrics` and the status page show it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Status {
    pub source: &'static str,
    /// Answered at least once, and not failing since the last answer.
    pub up: bool,
    /// Nodes of the last answer used.
    pub nodes: u32,
    pub answers: u64,
    pub errors: u64,
    /// Failures since the last answer.
    pub failing: u32,
    /// Seconds since the last answer; `None`: never answered.
    pub last_success_age_s: Option<f64>,
    pub last_error: Option<String>,
}

/// The status of `p`'s source, or `None` when the pool has no `discovery`.
pub fn status(b: &Balancer, p: &PoolTopo) -> Option<Status> {
    let d = p.policy.discovery.as_ref()?;
    let ps = b.region().pool(p.slot)?;
    let ok_ms = ps.discovery_ok_ms.load(Ordering::Relaxed);
    let failing = ps.discovery_failing.load(Ordering::Relaxed);
    Some(Status {
        source: d.source_name(),
        up: ok_ms != 0 && failing == 0,
        nodes: ps.discovery_nodes.load(Ordering::Relaxed),
        answers: ps.discovery_answers.load(Ordering::Relaxed),
        errors: ps.discovery_errors.load(Ordering::Relaxed),
        failing,
        last_success_age_s: (ok_ms != 0).then(|| clock::now_ms().saturating_sub(ok_ms) as f64 / 1000.0),
        last_error: read_error(ps),
    })
}

/// Add each discovery pool's status to a status document (`crate::status`), as
/// `pools.<name>.discovery`.
pub fn add_status(b: &Balancer, topo: &Topology, doc: &mut serde_json::Value) {
    for p in &topo.pools {
        if let Some(s) = status(b, p) {
            doc["pools"][&p.name]["discovery"] = serde_json::to_value(s).expect("status serializes");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, addr: &str, weight: u32) -> NodeConfig {
        found(id.into(), addr.parse().unwrap(), weight, false)
    }

    #[test]
    fn diff_tells_added_removed_and_updated_by_id() {
        let current = [
            node("a", "10.0.0.1:80", 1),
            node("b", "10.0.0.2:80", 1),
            node("c", "10.0.0.3:80", 1),
        ];
        let found = [
            node("a", "10.0.0.1:80", 1),
            node("b", "10.0.0.9:80", 1),
            node("d", "10.0.0.4:80", 1),
        ];
        let (a, r, u) = diff(&current, &found);
        assert_eq!(
            (a, r, u),
            (
                vec!["d".to_string()],
                vec!["c".to_string()],
                vec!["b".to_string()]
            )
        );
        let (a, r, u) = diff(&current, &current);
        assert!(a.is_empty() && r.is_empty() && u.is_empty());
    }

    #[test]
    fn found_clamps_weight_and_dedup_keeps_the_first() {
        assert_eq!(node("a", "10.0.0.1:80", 0).weight, 1);
        assert_eq!(node("a", "10.0.0.1:80", 1 << 20).weight, 10_000);
        let d = dedup(vec![
            node("a", "10.0.0.1:80", 1),
            node("a", "10.0.0.2:80", 1),
            node("b", "10.0.0.2:80", 1),
        ]);
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].resolved, Some("10.0.0.1:80".parse().unwrap()));
        let many: Vec<NodeConfig> = (0..MAX_FOUND + 10)
            .map(|i| node(&format!("n{i}"), "10.0.0.1:80", 1))
            .collect();
        assert_eq!(dedup(many).len(), MAX_FOUND);
    }

    #[test]
    fn the_log_line_says_what_changed() {
        let a = Applied {
            added: vec!["x".into()],
            removed: vec!["y".into()],
            recovered: true,
            nodes: 2,
            ..Applied::default()
        };
        assert_eq!(
            a.line("p", "dns").unwrap(),
            "discovery: pool p (dns): answers again; nodes +x -y (2 nodes)"
        );
        assert_eq!(Applied::default().line("p", "dns"), None);
    }
}
