//! The DNS source (`discovery.dns`), with the `hickory-resolver` crate.
//!
//! - **A / AAAA** (`name`, `port`): one node per address, id `ip:port`, the section's
//!   `weight`.
//! - **SRV** (`name`): one node per record, id `target:port` (`ip:port` when that is
//!   longer than an id may be), the record's weight as the node's weight (0 counts as
//!   1), and its priority as the tier: the records of the lowest priority are
//!   primaries, all others backups (rsbalancer has two tiers). Each target is resolved
//!   (A, else AAAA).
//! - **Names** (no `name`): the host names of the pool's own nodes (and of those
//!   waiting in `unresolved`) resolve again; a node whose name answers with another
//!   address moves there with its id, weight and state. A name that fails keeps its
//!   node's last address; only when every name fails is the round a failure.
//!
//! The next round comes when the shortest TTL of the answer runs out, kept within
//! `min_ttl_s..=max_ttl_s`; a name that does not exist or has no record of the type
//! is an empty answer (see `on_empty`), retried after `min_ttl_s`. Queries go to the
//! nameservers of /etc/resolv.conf, or to `nameservers`, over UDP (TCP when a reply is
//! truncated), each with `timeout_ms` and two attempts. The resolver's own cache is
//! off (the TTLs decide when to ask). It runs on a current-thread tokio runtime owned
//! by the pool's thread: no thread pool, nothing in nginx's workers but that thread.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use hickory_resolver::config::{
    NameServerConfig, NameServerConfigGroup, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::rr::{RData, RecordType};
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::{ResolveError, TokioResolver};

use super::run::{Answer, Source};
use crate::config::discovery::{DnsDiscovery, DnsType};
use crate::config::NodeConfig;
use crate::topology::PoolTopo;

/// Most records used from one answer, and SRV targets resolved per round.
const MAX_RECORDS: usize = 1_024;

pub struct DnsSource {
    cfg: DnsDiscovery,
    /// Built on the first query (on the pool's thread).
    state: Option<(tokio::runtime::Runtime, TokioResolver)>,
}

impl DnsSource {
    pub fn new(cfg: DnsDiscovery) -> DnsSource {
        DnsSource { cfg, state: None }
    }

    fn ttl(&self, secs: u32) -> Duration {
        Duration::from_secs(secs.clamp(self.cfg.min_ttl_s, self.cfg.max_ttl_s).into())
    }
}

/// A resolver for `cfg`: its nameservers, else /etc/resolv.conf's; no cache.
pub fn resolver(cfg: &DnsDiscovery) -> Result<TokioResolver, String> {
    let servers = cfg.nameserver_addrs();
    let mut builder = if servers.is_empty() {
        TokioResolver::builder_tokio().map_err(|e| format!("resolv.conf: {e}"))?
    } else {
        let mut group = NameServerConfigGroup::new();
        for s in servers {
            group.push(NameServerConfig::new(s, Protocol::Udp));
            group.push(NameServerConfig::new(s, Protocol::Tcp));
        }
        TokioResolver::builder_with_config(
            ResolverConfig::from_parts(None, Vec::new(), group),
            TokioConnectionProvider::default(),
        )
    };
    let o: &mut ResolverOpts = builder.options_mut();
    o.cache_size = 0;
    o.timeout = Duration::from_millis(cfg.timeout_ms.into());
    o.attempts = 2;
    o.use_hosts_file = if cfg.nameservers.is_empty() {
        ResolveHosts::Auto
    } else {
        ResolveHosts::Never
    };
    Ok(builder.build())
}

/// A short text of a resolver error.
fn short(e: &ResolveError) -> String {
    let s = e.to_string();
    s.split(", ").next().unwrap_or(&s).to_string()
}

/// The first address of `ips`, IPv4 preferred (as a config's `host:port` resolves).
fn prefer_v4(ips: impl Iterator<Item = IpAddr>) -> Option<IpAddr> {
    let all: Vec<IpAddr> = ips.collect();
    all.iter().find(|a| a.is_ipv4()).or(all.first()).copied()
}

/// The SRV node id: `target:port` when it fits an id, else `ip:port`.
pub fn srv_id(target: &str, port: u16, addr: SocketAddr) -> String {
    let t = target.trim_end_matches('.');
    let id = format!("{t}:{port}");
    if id.len() <= 64 {
        id
    } else {
        format!("{}:{}", addr.ip(), addr.port())
    }
}

/// SRV records (priority, weight, port, target, address) as nodes: the lowest
/// priority primary, the others backup.
pub fn srv_nodes(records: &[(u16, u16, u16, String, SocketAddr)]) -> Vec<NodeConfig> {
    let Some(top) = records.iter().map(|r| r.0).min() else {
        return Vec::new();
    };
    records
        .iter()
        .map(|(prio, weight, port, target, addr)| {
            super::found(
                srv_id(target, *port, *addr),
                *addr,
                u32::from(*weight).max(1),
                *prio != top,
            )
        })
        .collect()
}

impl Source for DnsSource {
    fn name(&self) -> &'static str {
        "dns"
    }

    fn retry_after(&self) -> Duration {
        Duration::from_secs(self.cfg.min_ttl_s.into())
    }

    fn query(&mut self, pool: &PoolTopo, _stop: &AtomicBool) -> Result<Answer, String> {
        if self.state.is_none() {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("runtime: {e}"))?;
            let r = {
                let _g = rt.enter();
                resolver(&self.cfg)?
            };
            self.state = Some((rt, r));
        }
        let (rt, r) = self.state.as_ref().expect("built above");
        let cfg = &self.cfg;
        let (nodes, ttl) = match &cfg.name {
            Some(name) => rt.block_on(records(r, cfg, name))?,
            None => rt.block_on(names(r, pool, cfg))?,
        };
        Ok(Answer {
            nodes,
            next: self.ttl(ttl),
        })
    }
}

/// The address of `host` (IPv4 preferred; `None`: no address) and its TTL (s).
async fn address(r: &TokioResolver, host: &str) -> Result<(Option<IpAddr>, u32), ResolveError> {
    let ips = r.lookup_ip(host).await?;
    let ttl = ips
        .as_lookup()
        .records()
        .iter()
        .map(|r| r.ttl())
        .min()
        .unwrap_or(u32::MAX);
    Ok((prefer_v4(ips.iter()), ttl))
}

/// A/AAAA or SRV records of `name`: the nodes and the shortest TTL (s).
async fn records(
    r: &TokioResolver,
    cfg: &DnsDiscovery,
    name: &str,
) -> Result<(Vec<NodeConfig>, u32), String> {
    let kind = match cfg.kind {
        DnsType::A => RecordType::A,
        DnsType::Aaaa => RecordType::AAAA,
        DnsType::Srv => RecordType::SRV,
    };
    let lookup = match r.lookup(name, kind).await {
        Ok(l) => l,
        Err(e) if e.is_no_records_found() => return Ok((Vec::new(), cfg.min_ttl_s)),
        Err(e) => return Err(short(&e)),
    };
    let mut ttl = u32::MAX;
    let port = cfg.port.unwrap_or(0) as u16;
    let mut nodes = Vec::new();
    let mut srv = Vec::new();
    for rec in lookup.records().iter().take(MAX_RECORDS) {
        ttl = ttl.min(rec.ttl());
        match rec.data() {
            RData::A(a) if cfg.kind == DnsType::A => {
                let addr = SocketAddr::new(IpAddr::V4(a.0), port);
                nodes.push(super::found(addr.to_string(), addr, cfg.weight, false));
            }
            RData::AAAA(a) if cfg.kind == DnsType::Aaaa => {
                let addr = SocketAddr::new(IpAddr::V6(a.0), port);
                nodes.push(super::found(format!("{}:{port}", a.0), addr, cfg.weight, false));
            }
            RData::SRV(s) if cfg.kind == DnsType::Srv => {
                let target = s.target().to_utf8();
                let ip = match address(r, &target).await {
                    Ok((ip, t)) => {
                        ttl = ttl.min(t);
                        ip
                    }
                    // A target without an address is left out this round.
                    Err(e) if e.is_no_records_found() => continue,
                    Err(e) => return Err(format!("{target}: {}", short(&e))),
                };
                let Some(ip) = ip else { continue };
                srv.push((
                    s.priority(),
                    s.weight(),
                    s.port(),
                    target,
                    SocketAddr::new(ip, s.port()),
                ));
            }
            _ => {}
        }
    }
    if cfg.kind == DnsType::Srv {
        nodes = srv_nodes(&srv);
    }
    Ok((nodes, if ttl == u32::MAX { cfg.min_ttl_s } else { ttl }))
}

/// The pool's own nodes (and those waiting for their name) with their names
/// resolved again.
async fn names(
    r: &TokioResolver,
    pool: &PoolTopo,
    cfg: &DnsDiscovery,
) -> Result<(Vec<NodeConfig>, u32), String> {
    let mut out = Vec::new();
    let mut ttl = u32::MAX;
    let (mut asked, mut errors, mut last) = (0, 0, String::new());
    let running = pool.nodes.iter().map(|n| {
        (
            // Weight 0: the node keeps its running weight (`crate::discovery::apply`).
            NodeConfig {
                id: n.id.clone(),
                addr: format!("{}:{}", n.host, n.addr.port()),
                resolved: Some(n.addr),
                weight: 0,
                backup: n.backup,
                ..NodeConfig::default()
            },
            true,
        )
    });
    let waiting = cfg.unresolved.iter().map(|n| (n.clone(), false));
    for (mut node, present) in running.chain(waiting).take(MAX_RECORDS) {
        let host = node.host().to_string();
        let Some(port) = node
            .addr
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
        else {
            continue;
        };
        if host.starts_with('[') || host.parse::<IpAddr>().is_ok() {
            if present {
                out.push(node);
            }
            continue;
        }
        asked += 1;
        match address(r, &host).await {
            Ok((ip, t)) => {
                ttl = ttl.min(t);
                match ip {
                    Some(ip) => node.resolved = Some(SocketAddr::new(ip, port)),
                    None if !present => continue,
                    None => {}
                }
            }
            Err(e) => {
                if !e.is_no_records_found() {
                    errors += 1;
                    last = format!("{host}: {}", short(&e));
                }
                if !present {
                    continue;
                }
            }
        }
        if !present {
            // Header values were read when the config was loaded and are kept in
            // process memory: not read again (the topology has no values).
            node.resolved_headers = Some(Vec::new());
        }
        out.push(node);
    }
    // Every name failed (not one answered, even with "no such name"): the
    // nameservers are down, not the names.
    if asked > 0 && errors == asked {
        return Err(last);
    }
    Ok((out, if ttl == u32::MAX { cfg.min_ttl_s } else { ttl }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn srv_priorities_become_tiers_and_weights_weights() {
        let a: SocketAddr = "10.0.0.1:8000".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:8001".parse().unwrap();
        let c: SocketAddr = "10.0.0.3:8002".parse().unwrap();
        let nodes = srv_nodes(&[
            (20, 5, 8002, "c.example.".into(), c),
            (10, 30, 8000, "a.example.".into(), a),
            (10, 0, 8001, "b.example.".into(), b),
        ]);
        let got: Vec<(&str, u32, bool)> = nodes
            .iter()
            .map(|n| (n.id.as_str(), n.weight, n.backup))
            .collect();
        assert_eq!(
            got,
            [
                ("c.example:8002", 5, true),
                ("a.example:8000", 30, false),
                ("b.example:8001", 1, false)
            ]
        );
        assert_eq!(nodes[1].resolved, Some(a));
        assert!(srv_nodes(&[]).is_empty());
    }

    #[test]
    fn a_long_srv_target_falls_back_to_the_address_as_id() {
        let a: SocketAddr = "10.0.0.1:8000".parse().unwrap();
        let long = format!("{}.example.", "x".repeat(70));
        assert_eq!(srv_id(&long, 8000, a), "10.0.0.1:8000");
    }

    #[test]
    fn ipv4_is_preferred() {
        let ips: Vec<IpAddr> = vec!["::1".parse().unwrap(), "127.0.0.2".parse().unwrap()];
        assert_eq!(prefer_v4(ips.into_iter()), Some("127.0.0.2".parse().unwrap()));
        assert_eq!(prefer_v4(std::iter::empty()), None);
    }
}
