//! A pool's `discovery` section: where its nodes come from when they are not (only) a
//! static list (`crate::discovery` runs the sources).
//!
//! ```json
//! "discovery": { "dns": { "name": "llm.service.internal", "type": "A", "port": 8000 } }
//! "discovery": { "dns": { "name": "_llm._tcp.internal", "type": "SRV" }, "on_empty": "keep" }
//! "discovery": { "dns": { "min_ttl_s": 30 } }
//! ```
//!
//! Exactly one source. With a source that gives the whole node set (`dns` with a
//! `name`), the pool's `nodes` may be empty: the pool starts empty and fills in from
//! the first answer; nodes given are the set until the first answer replaces it. `dns` without a `name` re-resolves the host names of the pool's own
//! `nodes` by their DNS TTLs (a provider such as `api.deepseek.com` moving to other
//! addresses); a node whose name does not resolve at load does not stop nginx: it is
//! kept in `dns.unresolved` and joins when its name resolves.

use serde::{Deserialize, Serialize};

use super::check::check_range;
use super::{ConfigError, NodeConfig};

/// Most nameservers in `dns.nameservers`.
pub const MAX_NAMESERVERS: usize = 8;

/// The `discovery` section of a pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscoveryConfig {
    /// DNS: a name's A, AAAA or SRV records, or the pool's own node names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<DnsDiscovery>,
    /// Consul: the passing instances of a service (`crate::discovery::consul`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consul: Option<super::consul::ConsulDiscovery>,
    /// What an answer with no node does: `keep` (default) the last known set, or
    /// `empty` the pool.
    #[serde(default)]
    pub on_empty: OnEmpty,
}

/// What an empty answer does to a pool that has nodes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnEmpty {
    /// The pool keeps its nodes (an empty answer is more often a broken registry or
    /// zone than a fleet that really left).
    #[default]
    Keep,
    /// The pool is emptied: requests get the pool's no-node answer.
    Empty,
}

/// The record type a `dns` source asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum DnsType {
    #[default]
    A,
    #[serde(rename = "AAAA")]
    Aaaa,
    #[serde(rename = "SRV")]
    Srv,
}

/// `discovery.dns`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsDiscovery {
    /// The name whose records are the pool's nodes (1..=253 bytes of
    /// `[A-Za-z0-9._-]`). Absent: the host names of the pool's `nodes` re-resolve.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `A` (default), `AAAA` or `SRV`.
    #[serde(default, rename = "type")]
    pub kind: DnsType,
    /// The nodes' port with `A` and `AAAA` (1..=65535, required there); SRV records
    /// carry their own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u32>,
    /// The nodes' weight with `A` and `AAAA`, 1..=10000 (SRV records carry theirs).
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// An answer is used at least this long (s), 1..=86400, even with a shorter TTL.
    #[serde(default = "default_min_ttl_s")]
    pub min_ttl_s: u32,
    /// ... and at most this long, min_ttl_s..=86400, even with a longer TTL.
    #[serde(default = "default_max_ttl_s")]
    pub max_ttl_s: u32,
    /// Nameservers (`ip:port` or `ip`, port 53) to ask instead of those of
    /// /etc/resolv.conf; at most 8.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    /// Timeout of one query, 100..=30000 ms.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u32,
    /// Without `name`: the pool's nodes whose name did not resolve at load, written
    /// by the loader (they join when their name resolves).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unresolved: Vec<NodeConfig>,
}

fn default_weight() -> u32 {
    1
}
fn default_min_ttl_s() -> u32 {
    5
}
fn default_max_ttl_s() -> u32 {
    300
}
fn default_timeout_ms() -> u32 {
    2_000
}

impl DiscoveryConfig {
    /// The source's name (the `source` label of the metrics): `dns`.
    pub fn source_name(&self) -> &'static str {
        if self.dns.is_some() {
            "dns"
        } else if self.consul.is_some() {
            "consul"
        } else {
            "none"
        }
    }

    /// Whether the source gives the pool's whole node set (then `nodes` is empty and
    /// the pool starts empty), rather than the addresses of its configured nodes.
    pub fn owns_nodes(&self) -> bool {
        self.dns.as_ref().is_some_and(|d| d.name.is_some()) || self.consul.is_some()
    }

    /// Whether the source re-resolves the names of the pool's own nodes.
    pub fn refreshes_names(&self) -> bool {
        self.dns.as_ref().is_some_and(|d| d.name.is_none())
    }

    /// Checks every field; `path` is `pools.NAME.discovery`.
    pub fn validate(&self, path: &str) -> Result<(), ConfigError> {
        let sources = [self.dns.is_some(), self.consul.is_some()]
            .iter()
            .filter(|&&s| s)
            .count();
        if sources != 1 {
            return Err(ConfigError::new(
                path,
                format!("{sources} sources given: exactly one is required (dns or consul)"),
            ));
        }
        if let Some(d) = &self.dns {
            d.validate(&format!("{path}.dns"))?;
        }
        if let Some(c) = &self.consul {
            c.validate(&format!("{path}.consul"))?;
        }
        Ok(())
    }
}

impl DnsDiscovery {
    fn validate(&self, path: &str) -> Result<(), ConfigError> {
        let bad = |f: &str, m: String| Err(ConfigError::new(format!("{path}.{f}"), m));
        if let Some(name) = &self.name {
            let ok = (1..=253).contains(&name.len())
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
            if !ok {
                return bad(
                    "name",
                    format!("{name:?} is not a DNS name (1..=253 bytes of [A-Za-z0-9._-])"),
                );
            }
            match (self.kind, self.port) {
                (DnsType::Srv, Some(p)) => {
                    return bad(
                        "port",
                        format!("{p}: SRV records carry their own port; leave it out"),
                    )
                }
                (DnsType::A | DnsType::Aaaa, None) => {
                    return bad("port", "missing: A and AAAA records need the nodes' port".into())
                }
                _ => {}
            }
        } else {
            if self.kind != DnsType::A {
                return bad(
                    "type",
                    format!(
                        "{:?} needs a name (without one, the nodes' own names re-resolve)",
                        self.kind
                    ),
                );
            }
            if let Some(p) = self.port {
                return bad(
                    "port",
                    format!("{p} needs a name (the nodes' addresses carry their ports)"),
                );
            }
        }
        if let Some(p) = self.port {
            check_range(path, "port", p, 1..=65_535)?;
        }
        check_range(path, "weight", self.weight, crate::abi::WEIGHT_RANGE)?;
        check_range(path, "min_ttl_s", self.min_ttl_s, 1..=86_400)?;
        check_range(path, "max_ttl_s", self.max_ttl_s, self.min_ttl_s..=86_400)?;
        check_range(path, "timeout_ms", self.timeout_ms, 100..=30_000)?;
        if self.nameservers.len() > MAX_NAMESERVERS {
            return bad(
                "nameservers",
                format!("{} given: at most {MAX_NAMESERVERS}", self.nameservers.len()),
            );
        }
        for (i, ns) in self.nameservers.iter().enumerate() {
            if nameserver(ns).is_none() {
                return bad(
                    &format!("nameservers[{i}]"),
                    format!("{ns:?} is not an ip, ip:port or [v6]:port"),
                );
            }
        }
        Ok(())
    }

    /// The nameservers as socket addresses (port 53 when none is given).
    pub fn nameserver_addrs(&self) -> Vec<std::net::SocketAddr> {
        self.nameservers.iter().filter_map(|s| nameserver(s)).collect()
    }
}

/// The nodes of `pool` waiting for their name to resolve (`dns.unresolved`).
pub fn unresolved(pool: &super::PoolConfig) -> impl Iterator<Item = &NodeConfig> {
    pool.discovery
        .iter()
        .flat_map(|d| d.dns.iter())
        .flat_map(|d| d.unresolved.iter())
}

/// Move the nodes of `pool` named in `ids` (their names did not resolve) to
/// `discovery.dns.unresolved`, where the source finds them.
pub(super) fn set_aside(pool: &mut super::PoolConfig, ids: &[String]) {
    if ids.is_empty() {
        return;
    }
    let Some(dns) = pool.discovery.as_mut().and_then(|d| d.dns.as_mut()) else {
        return;
    };
    let (out, keep): (Vec<NodeConfig>, Vec<NodeConfig>) = std::mem::take(&mut pool.nodes)
        .into_iter()
        .partition(|n| ids.contains(&n.id));
    pool.nodes = keep;
    for n in out {
        if !dns.unresolved.iter().any(|u| u.id == n.id) {
            dns.unresolved.push(n);
        }
    }
}

/// `ip`, `ip:port` or `[v6]:port` (port 1..=65535; 53 when absent).
fn nameserver(s: &str) -> Option<std::net::SocketAddr> {
    use std::net::{IpAddr, SocketAddr};
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(SocketAddr::new(ip, 53));
    }
    s.parse::<SocketAddr>().ok().filter(|a| a.port() != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use serde_json::json;

    fn load(pool: serde_json::Value) -> Result<Config, ConfigError> {
        Config::from_value(json!({ "pools": { "p": pool } }))
    }

    #[test]
    fn a_discovery_pool_may_start_empty() {
        let c = load(json!({ "discovery": { "dns": { "name": "llm.internal", "port": 8000 } } })).unwrap();
        let p = &c.pools["p"];
        assert!(p.nodes.is_empty());
        let d = p.discovery.as_ref().unwrap();
        assert!(d.owns_nodes());
        assert_eq!(d.on_empty, OnEmpty::Keep);
        assert_eq!(d.dns.as_ref().unwrap().kind, DnsType::A);
    }

    #[test]
    fn a_pool_without_discovery_still_needs_nodes() {
        let e = load(json!({})).unwrap_err();
        assert_eq!(e.path, "pools.p.nodes");
    }

    #[test]
    fn bad_fields_are_named() {
        let cases = [
            (
                json!({ "dns": { "name": "x", "port": 80 }, "on_empty": "drop" }),
                "pools.p.discovery.on_empty",
            ),
            (
                json!({ "dns": { "name": "bad name", "port": 80 } }),
                "pools.p.discovery.dns.name",
            ),
            (json!({ "dns": { "name": "x" } }), "pools.p.discovery.dns.port"),
            (
                json!({ "dns": { "name": "x", "type": "SRV", "port": 80 } }),
                "pools.p.discovery.dns.port",
            ),
            (
                json!({ "dns": { "name": "x", "port": 70000 } }),
                "pools.p.discovery.dns.port",
            ),
            (
                json!({ "dns": { "name": "x", "port": 80, "min_ttl_s": 0 } }),
                "pools.p.discovery.dns.min_ttl_s",
            ),
            (
                json!({ "dns": { "name": "x", "port": 80, "min_ttl_s": 60, "max_ttl_s": 30 } }),
                "pools.p.discovery.dns.max_ttl_s",
            ),
            (
                json!({ "dns": { "name": "x", "port": 80, "nameservers": ["127.0.0.1:0"] } }),
                "pools.p.discovery.dns.nameservers[0]",
            ),
            (
                json!({ "dns": { "name": "x", "port": 80, "ttl": 5 } }),
                "pools.p.discovery.dns",
            ),
            (json!({}), "pools.p.discovery"),
            (json!({ "dns": { "type": "SRV" } }), "pools.p.discovery.dns.type"),
        ];
        for (d, path) in cases {
            let e = load(json!({ "discovery": d })).unwrap_err();
            assert_eq!(e.path, path, "{d}: {e}");
        }
    }

    #[test]
    fn nameservers_take_a_default_port() {
        let d: DnsDiscovery = serde_json::from_value(json!({
            "name": "x", "port": 1, "nameservers": ["127.0.0.1", "127.0.0.1:5353", "[::1]:54"]
        }))
        .unwrap();
        let got: Vec<String> = d.nameserver_addrs().iter().map(|a| a.to_string()).collect();
        assert_eq!(got, ["127.0.0.1:53", "127.0.0.1:5353", "[::1]:54"]);
    }
}
