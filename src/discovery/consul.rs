//! Consul as a pool's node source: the instances of one service that pass their
//! health checks, followed with Consul's blocking queries.
//!
//! **The query.** `GET /v1/health/service/<service>?passing&tag=..&dc=..&index=N&wait=Ws`
//! to the local agent (plain HTTP/1.1 over a `TcpStream` with timeouts, one connection
//! per query, the ACL token in `X-Consul-Token`). With `index` the agent holds the
//! request until the service changes (an instance registered or gone, a check's
//! status changed) or `wait` elapses, then answers with the whole current list and
//! `X-Consul-Index`. One query per change, none in between: a node that fails its
//! Consul check leaves the pool about as soon as the agent knows.
//!
//! **Index rules** (Consul's "Blocking Queries, Implementation Details"), in
//! [`next_index`]: an index lower than the last one (a snapshot restore, an agent
//! restarted empty) resets the loop to 0, so the next query answers at once instead
//! of waiting for a number the agent may never reach; otherwise the index is used, at
//! least 1 (an index of 0 from a buggy agent would make every query answer at once).
//! After a failed query the index is reset too (the agent may have restarted), after
//! the framework's backoff (1 s doubling, at most 30 s). Answers that come faster
//! than `min_interval_ms` are rate limited by a token bucket holding 2 ([`Bucket`]):
//! a burst of changes comes through at once, churn degrades into polling.
//!
//! **Where it runs.** On the pool's thread of the worker holding the discovery lease
//! ([`ConsulSource`] is the framework's `Source`): the query may be held for
//! `wait_s`, so the socket is read with short timeouts and the query ends within
//! [`STOP_POLL`] of the framework's stop (lease lost, reload, section changed).
//! nginx's event loop never waits on Consul.
//!
//! **The answer** is parsed in [`parse`], every value from outside bounded there: the
//! body (at most [`MAX_BODY`] bytes, at most [`MAX_INSTANCES`] entries), ids, addresses,
//! ports, weights. An instance becomes a node:
//! - id `<Service.ID>@<Node.Node>` (a service ID is unique per agent only; the seed's
//!   definition has none, so every instance's ID is the service name), made of
//!   `[A-Za-z0-9._:@-]` and at most 64 bytes: other bytes become `_`, and an id that
//!   had to change is shortened and marked with a hash of the original so two
//!   instances never share one;
//! - address `Service.Address`, or `Node.Address` when empty (Consul's rule: the
//!   seed's definition gives none), an IP literal (an instance with a host name is
//!   skipped and counted: resolving is DNS discovery's work), and `Service.Port`
//!   (1..=65535, else skipped);
//! - weight from `Service.Meta[weight_meta]`, else a tag `<weight_meta>=N`, else
//!   `Weights.Passing` (1 unless set), clamped to 1..=10000;
//! - skipped when any of its checks is not `passing` (the query asks for `passing`;
//!   checked again, defensively), when it lacks a configured tag, when it belongs to
//!   another service, or when its id repeats. An answer whose instances were all
//!   skipped is a failure naming the first reason (the last known set stays, and the
//!   status says why) rather than an empty answer.
//!
//! The set then goes through the same all-or-nothing reconfiguration as every other
//! source (`crate::discovery`): nodes that stay keep what the balancer learned, new
//! ones start slow, removed ones finish their tries.

use std::collections::HashSet;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::run::{Answer, Source};
use crate::config::consul::ConsulDiscovery;
use crate::topology::PoolTopo;

/// Largest answer read (bytes).
pub const MAX_BODY: usize = 8 << 20;
/// Most instances an answer may list (the shared region's largest node count).
pub const MAX_INSTANCES: usize = 65_536;
/// Longest response head (status line and headers).
const MAX_HEAD: usize = 16 << 10;

/// One instance, as a node of the pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsulNode {
    pub id: String,
    pub addr: SocketAddr,
    pub weight: u32,
}

/// What [`parse`] made of an answer.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Parsed {
    pub nodes: Vec<ConsulNode>,
    /// Instances left out, and why the first was.
    pub skipped: usize,
    pub first_skip: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Entry {
    #[serde(rename = "Node")]
    node: NodeInfo,
    #[serde(rename = "Service")]
    service: ServiceInfo,
    #[serde(rename = "Checks")]
    checks: Vec<CheckInfo>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct NodeInfo {
    #[serde(rename = "Node")]
    node: String,
    #[serde(rename = "Address")]
    address: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ServiceInfo {
    #[serde(rename = "ID")]
    id: String,
    #[serde(rename = "Service")]
    service: String,
    #[serde(rename = "Tags")]
    tags: Option<Vec<String>>,
    #[serde(rename = "Address")]
    address: String,
    #[serde(rename = "Port")]
    port: u64,
    #[serde(rename = "Meta")]
    meta: Option<std::collections::BTreeMap<String, String>>,
    #[serde(rename = "Weights")]
    weights: Option<Weights>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Weights {
    #[serde(rename = "Passing")]
    passing: u64,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct CheckInfo {
    #[serde(rename = "CheckID")]
    id: String,
    #[serde(rename = "Status")]
    status: String,
}

/// Node ids allow these bytes besides ASCII letters and digits.
const ID_EXTRA: &[u8] = b"._:@-";
const ID_MAX: usize = 64;

/// The node id of an instance: `<service id>@<node>`, in the id alphabet, at most 64
/// bytes; an id that had to change ends in `.` and 16 hex digits of a hash of the
/// original, so that distinct instances keep distinct ids.
pub fn node_id(service_id: &str, node: &str) -> String {
    let raw = format!("{service_id}@{node}");
    let clean: String = raw
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || ID_EXTRA.contains(&b) {
                b as char
            } else {
                '_'
            }
        })
        .collect();
    if clean == raw && raw.len() <= ID_MAX {
        return raw;
    }
    let h = raw.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let keep = &clean[..clean.len().min(ID_MAX - 17)];
    format!("{keep}.{h:016x}")
}

/// A weight as text (`"30"`), clamped to the weight range; `None` when not a number.
fn weight_of(text: &str) -> Option<u32> {
    let t = text.trim();
    if t.is_empty() || t.len() > 20 || !t.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let v = t.parse::<u64>().unwrap_or(u64::MAX);
    Some(clamp_weight(v))
}

fn clamp_weight(v: u64) -> u32 {
    let r = crate::abi::WEIGHT_RANGE;
    v.clamp(u64::from(*r.start()), u64::from(*r.end())) as u32
}

/// Parses the body of a health query for `cfg`'s service (see the module
/// documentation for every rule). An error (not JSON, not a list, too large) keeps
/// the last known set; a skipped instance does not.
pub fn parse(body: &[u8], cfg: &ConsulDiscovery) -> Result<Parsed, String> {
    if body.len() > MAX_BODY {
        return Err(format!("answer of {} bytes: more than {MAX_BODY}", body.len()));
    }
    let entries: Vec<serde_json::Value> =
        serde_json::from_slice(body).map_err(|e| format!("answer is not a JSON list: {e}"))?;
    if entries.len() > MAX_INSTANCES {
        return Err(format!(
            "answer lists {} instances: more than {MAX_INSTANCES}",
            entries.len()
        ));
    }
    let mut out = Parsed::default();
    let mut seen = HashSet::new();
    let tag_prefix = format!("{}=", cfg.weight_meta);
    for v in entries {
        let skip = |out: &mut Parsed, why: String| {
            out.skipped += 1;
            if out.first_skip.is_none() {
                out.first_skip = Some(why);
            }
        };
        let e: Entry = match serde_json::from_value(v) {
            Ok(e) => e,
            Err(e) => {
                skip(&mut out, format!("an entry not shaped like Consul's: {e}"));
                continue;
            }
        };
        let s = &e.service;
        let who = || format!("{:.64}@{:.64}", s.id, e.node.node);
        if s.service != cfg.service {
            skip(&mut out, format!("{}: service {:.64}", who(), s.service));
            continue;
        }
        let tags = s.tags.as_deref().unwrap_or_default();
        if let Some(t) = cfg.tags.iter().find(|t| !tags.contains(t)) {
            skip(&mut out, format!("{}: no tag {t}", who()));
            continue;
        }
        if let Some(c) = e.checks.iter().find(|c| c.status != "passing") {
            skip(
                &mut out,
                format!("{}: check {:.64} is {:.16}", who(), c.id, c.status),
            );
            continue;
        }
        let host = if s.address.is_empty() {
            &e.node.address
        } else {
            &s.address
        };
        let Ok(ip) = host.parse::<IpAddr>() else {
            skip(
                &mut out,
                format!("{}: address {host:.64} is not an IP address", who()),
            );
            continue;
        };
        let port = match u16::try_from(s.port) {
            Ok(p @ 1..) => p,
            _ => {
                skip(&mut out, format!("{}: port {}", who(), s.port));
                continue;
            }
        };
        if s.id.is_empty() || e.node.node.is_empty() {
            skip(&mut out, format!("{}: no service ID or node name", who()));
            continue;
        }
        let id = node_id(&s.id, &e.node.node);
        if !seen.insert(id.clone()) {
            skip(&mut out, format!("{id}: listed twice"));
            continue;
        }
        let weight = s
            .meta
            .as_ref()
            .and_then(|m| m.get(&cfg.weight_meta))
            .and_then(|w| weight_of(w))
            .or_else(|| tags.iter().find_map(|t| weight_of(t.strip_prefix(&tag_prefix)?)))
            .or_else(|| s.weights.as_ref().map(|w| clamp_weight(w.passing)))
            .unwrap_or(1);
        out.nodes.push(ConsulNode {
            id,
            addr: SocketAddr::new(ip, port),
            weight,
        });
    }
    Ok(out)
}

/// The index of the next query after an answer carrying `got` (`X-Consul-Index`), the
/// last being `prev`: 0 when it went backwards (restart the loop), else at least 1.
pub fn next_index(prev: u64, got: u64) -> u64 {
    if got < prev {
        0
    } else {
        got.max(1)
    }
}

/// A token bucket holding 2 that refills one token per `every`: how long the loop
/// waits before its next query.
#[derive(Debug, Clone)]
pub struct Bucket {
    every: Duration,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    pub fn new(every: Duration, now: Instant) -> Bucket {
        Bucket {
            every,
            tokens: 2.0,
            at: now,
        }
    }

    /// Takes a token at `now`: how long to wait for it first (zero when one was left).
    pub fn take(&mut self, now: Instant) -> Duration {
        if self.every.is_zero() {
            return Duration::ZERO;
        }
        let per = self.every.as_secs_f64();
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed / per).min(2.0);
        self.at = now;
        self.tokens -= 1.0;
        if self.tokens >= 0.0 {
            return Duration::ZERO;
        }
        // The token is borrowed: the wait repays it.
        Duration::from_secs_f64(-self.tokens * per)
    }
}

/// Percent-encodes a query value (all but RFC 3986's unreserved bytes).
fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// The path and query of a health query at `index`.
pub fn query_path(cfg: &ConsulDiscovery, index: u64) -> String {
    let mut q = format!("/v1/health/service/{}?passing", enc(&cfg.service));
    for t in &cfg.tags {
        q.push_str(&format!("&tag={}", enc(t)));
    }
    if let Some(dc) = &cfg.datacenter {
        q.push_str(&format!("&dc={}", enc(dc)));
    }
    if index > 0 {
        q.push_str(&format!("&index={index}&wait={}s", cfg.wait_s));
    }
    q
}

/// A reply: `X-Consul-Index` (0 when absent) and the body.
#[derive(Debug)]
pub struct Reply {
    pub index: u64,
    pub body: Vec<u8>,
}

/// How often a held query looks at `stop` (the framework wants a source to end within
/// a few seconds of it).
pub const STOP_POLL: Duration = Duration::from_millis(250);

/// One health query at `index` (blocking when > 0), with `token` as `X-Consul-Token`;
/// gives up when `stop` is set.
pub fn query(
    cfg: &ConsulDiscovery,
    token: Option<&str>,
    index: u64,
    stop: &AtomicBool,
) -> Result<Reply, String> {
    let timeout = Duration::from_millis(cfg.timeout_ms.into());
    // Short texts: the status keeps 48 bytes of the last one.
    let agent = |e: std::io::Error| format!("agent: {e}");
    let addr = cfg
        .address
        .to_socket_addrs()
        .map_err(agent)?
        .next()
        .ok_or_else(|| format!("agent {}: no address", cfg.address))?;
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(agent)?;
    // Consul holds a blocking query up to wait + wait/16.
    let hold = if index > 0 {
        let w = Duration::from_secs(cfg.wait_s.into());
        w + w / 16
    } else {
        Duration::ZERO
    };
    let deadline = Instant::now() + hold + timeout;
    s.set_read_timeout(Some(STOP_POLL)).map_err(agent)?;
    s.set_write_timeout(Some(timeout)).map_err(agent)?;
    let mut req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: rsbalancer\r\nAccept: application/json\r\nConnection: close\r\n",
        query_path(cfg, index),
        cfg.address
    );
    if let Some(t) = token {
        req.push_str(&format!("X-Consul-Token: {t}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).map_err(agent)?;
    let limit = MAX_HEAD + MAX_BODY + 64 * 1024;
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                raw.extend_from_slice(&buf[..n]);
                if raw.len() > limit {
                    return Err(format!("answer of more than {MAX_BODY} bytes"));
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) =>
            {
                if stop.load(Ordering::Relaxed) {
                    return Err("stopped".into());
                }
                if Instant::now() >= deadline {
                    return Err(format!("agent: no answer within {:?}", hold + timeout));
                }
            }
            Err(e) => return Err(agent(e)),
        }
    }
    if raw.is_empty() {
        return Err("agent: closed without an answer".into());
    }
    read_response(&raw)
}

/// Reads a whole HTTP/1.1 response (`Content-Length`, chunked or up to the close): a
/// 200's `X-Consul-Index` and body, or an error naming the status and the start of
/// the body.
pub fn read_response(raw: &[u8]) -> Result<Reply, String> {
    let end = raw
        .windows(4)
        .take(MAX_HEAD)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no complete response head")?;
    let head = String::from_utf8_lossy(&raw[..end]);
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or("bad status line")?;
    let (mut index, mut length, mut chunked) = (0u64, None, false);
    for l in lines {
        let Some((k, v)) = l.split_once(':') else { continue };
        let (k, v) = (k.trim(), v.trim());
        if k.eq_ignore_ascii_case("x-consul-index") {
            index = v
                .parse()
                .map_err(|_| format!("X-Consul-Index {v:.32} is not a number"))?;
        } else if k.eq_ignore_ascii_case("content-length") {
            length = Some(v.parse::<usize>().map_err(|_| "bad Content-Length")?);
        } else if k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked") {
            chunked = true;
        }
    }
    let rest = &raw[end + 4..];
    let body = if chunked {
        dechunk(rest)?
    } else if let Some(n) = length {
        rest.get(..n)
            .ok_or("body shorter than its Content-Length")?
            .to_vec()
    } else {
        rest.to_vec()
    };
    if body.len() > MAX_BODY {
        return Err(format!("answer of more than {MAX_BODY} bytes"));
    }
    if status != 200 {
        let text: String = String::from_utf8_lossy(&body[..body.len().min(120)])
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        return Err(format!("HTTP {status}: {}", text.trim()));
    }
    Ok(Reply { index, body })
}

fn dechunk(mut b: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let eol = b
            .windows(2)
            .take(64)
            .position(|w| w == b"\r\n")
            .ok_or("bad chunk size line")?;
        let size_text = std::str::from_utf8(&b[..eol]).map_err(|_| "bad chunk size")?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| "bad chunk size")?;
        b = &b[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if size > MAX_BODY || out.len() + size > MAX_BODY {
            return Err(format!("answer of more than {MAX_BODY} bytes"));
        }
        let chunk = b.get(..size).ok_or("truncated chunk")?;
        out.extend_from_slice(chunk);
        b = b.get(size + 2..).ok_or("truncated chunk")?;
    }
}

/// An ACL token as it may go into a header: 1..=512 visible ASCII bytes (a CR or LF
/// would add headers of its own). The reason names no byte of the token.
fn check_token(t: &str) -> Result<(), &'static str> {
    if t.is_empty() || t.len() > 512 || !t.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("not 1..=512 visible ASCII bytes");
    }
    Ok(())
}

/// The Consul source of one pool: the loop's index and rate limit between queries.
pub struct ConsulSource {
    cfg: ConsulDiscovery,
    index: u64,
    bucket: Option<Bucket>,
}

impl ConsulSource {
    pub fn new(cfg: ConsulDiscovery) -> ConsulSource {
        ConsulSource {
            cfg,
            index: 0,
            bucket: None,
        }
    }

    /// The ACL token, read from this worker's environment at every query (nginx
    /// passes a variable to its workers only when nginx.conf names it with `env`).
    fn token(&self) -> Result<Option<String>, String> {
        match &self.cfg.token_env {
            None => Ok(None),
            Some(var) => {
                let t =
                    std::env::var(var).map_err(|_| format!("token_env {var} unset (add `env {var};`)"))?;
                check_token(&t).map_err(|m| format!("token_env {var}: {m}"))?;
                Ok(Some(t))
            }
        }
    }

    fn ask(&mut self, stop: &AtomicBool) -> Result<Answer, String> {
        let token = self.token()?;
        let reply = query(&self.cfg, token.as_deref(), self.index, stop)?;
        let parsed = parse(&reply.body, &self.cfg)?;
        if parsed.nodes.is_empty() && parsed.skipped > 0 {
            // Instances there, none usable: say why rather than look empty.
            return Err(parsed.first_skip.unwrap_or_default());
        }
        self.index = next_index(self.index, reply.index);
        let now = Instant::now();
        let every = Duration::from_millis(self.cfg.min_interval_ms.into());
        let next = self
            .bucket
            .get_or_insert_with(|| Bucket::new(every, now))
            .take(now);
        Ok(Answer {
            nodes: parsed
                .nodes
                .into_iter()
                .map(|n| super::found(n.id, n.addr, n.weight, false))
                .collect(),
            next,
        })
    }
}

impl Source for ConsulSource {
    fn name(&self) -> &'static str {
        "consul"
    }

    /// One health query: blocking on the last index, at once on the first (or after a
    /// reset). A failure resets the index: the agent may have restarted.
    fn query(&mut self, _pool: &PoolTopo, stop: &AtomicBool) -> Result<Answer, String> {
        self.ask(stop).inspect_err(|_| self.index = 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cfg() -> ConsulDiscovery {
        ConsulDiscovery {
            service: "deepseek-api".into(),
            ..ConsulDiscovery::default()
        }
    }

    fn entry(node: &str, node_addr: &str, id: &str, addr: &str, port: u64) -> serde_json::Value {
        json!({
            "Node": {"ID": "x", "Node": node, "Address": node_addr, "Datacenter": "dc1"},
            "Service": {"ID": id, "Service": "deepseek-api", "Tags": ["v1.2"], "Address": addr,
                        "Port": port, "Meta": {}, "Weights": {"Passing": 1, "Warning": 1}},
            "Checks": [
                {"CheckID": "serfHealth", "Status": "passing"},
                {"CheckID": format!("service:{id}"), "Status": "passing"}
            ]
        })
    }

    fn parse_v(v: serde_json::Value, c: &ConsulDiscovery) -> Parsed {
        parse(v.to_string().as_bytes(), c).unwrap()
    }

    #[test]
    fn the_seeds_definition_gives_a_node_at_the_agents_address() {
        // Registered with no ID and no Address: ID is the name, the node's address used.
        let p = parse_v(
            json!([entry("gpu-1", "10.0.0.7", "deepseek-api", "", 8080)]),
            &cfg(),
        );
        assert_eq!(
            p.nodes,
            [ConsulNode {
                id: "deepseek-api@gpu-1".into(),
                addr: "10.0.0.7:8080".parse().unwrap(),
                weight: 1
            }]
        );
        assert_eq!(p.skipped, 0);
    }

    #[test]
    fn service_address_wins_and_ipv6_works() {
        let p = parse_v(json!([entry("n", "10.0.0.7", "a", "fd00::9", 8000)]), &cfg());
        assert_eq!(p.nodes[0].addr, "[fd00::9]:8000".parse().unwrap());
    }

    #[test]
    fn weight_from_meta_then_tag_then_weights_clamped() {
        let c = cfg();
        let mut e = entry("n", "10.0.0.1", "a", "", 1);
        e["Service"]["Meta"] = json!({"weight": "30"});
        e["Service"]["Tags"] = json!(["weight=5"]);
        e["Service"]["Weights"]["Passing"] = json!(7);
        assert_eq!(parse_v(json!([e.clone()]), &c).nodes[0].weight, 30);
        e["Service"]["Meta"] = json!({"weight": "thirty"});
        assert_eq!(parse_v(json!([e.clone()]), &c).nodes[0].weight, 5);
        e["Service"]["Tags"] = json!([]);
        assert_eq!(parse_v(json!([e.clone()]), &c).nodes[0].weight, 7);
        e["Service"]["Meta"] = json!({"weight": "99999999999999999999"});
        assert_eq!(parse_v(json!([e.clone()]), &c).nodes[0].weight, 10_000);
        e["Service"]["Meta"] = json!({"weight": "0"});
        assert_eq!(parse_v(json!([e.clone()]), &c).nodes[0].weight, 1);
        e["Service"]["Meta"] = json!({"w": "40"});
        let c2 = ConsulDiscovery {
            weight_meta: "w".into(),
            ..cfg()
        };
        assert_eq!(parse_v(json!([e.clone()]), &c2).nodes[0].weight, 40);
        e["Service"]["Weights"] = json!(null);
        e["Service"]["Meta"] = json!(null);
        assert_eq!(parse_v(json!([e]), &c).nodes[0].weight, 1);
    }

    #[test]
    fn failing_checks_tags_services_and_bad_addresses_are_skipped() {
        let mut c = cfg();
        c.tags = vec!["v1.2".into()];
        let mut critical = entry("n", "10.0.0.1", "a", "", 1);
        critical["Checks"][1]["Status"] = json!("critical");
        let mut warning = entry("n", "10.0.0.1", "b", "", 1);
        warning["Checks"][0]["Status"] = json!("warning");
        let mut untagged = entry("n", "10.0.0.1", "c", "", 1);
        untagged["Service"]["Tags"] = json!(["v1.1"]);
        let mut other = entry("n", "10.0.0.1", "d", "", 1);
        other["Service"]["Service"] = json!("other");
        let named = entry("n", "consul.internal", "e", "", 1);
        let no_port = entry("n", "10.0.0.1", "f", "", 0);
        let big_port = entry("n", "10.0.0.1", "g", "", 70_000);
        let good = entry("n", "10.0.0.1", "h", "", 9);
        let twice = entry("n", "10.0.0.2", "h", "", 9);
        let p = parse_v(
            json!([critical, warning, untagged, other, named, no_port, big_port, good, twice, 5]),
            &c,
        );
        assert_eq!(p.nodes.len(), 1, "{p:?}");
        assert_eq!(p.nodes[0].id, "h@n");
        assert_eq!(p.skipped, 9);
        assert_eq!(p.first_skip.as_deref(), Some("a@n: check service:a is critical"));
    }

    #[test]
    fn ids_stay_in_the_alphabet_and_distinct() {
        assert_eq!(node_id("api-1", "gpu.1"), "api-1@gpu.1");
        let a = node_id("svc/1", "n");
        let b = node_id("svc 1", "n");
        assert_ne!(a, b);
        for id in [&a, &b, &node_id(&"x".repeat(300), &"é".repeat(50))] {
            assert!(
                id.len() <= 64
                    && id
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || ID_EXTRA.contains(&b)),
                "{id}"
            );
        }
        assert!(a.starts_with("svc_1@n."));
    }

    #[test]
    fn bad_answers_are_errors() {
        let c = cfg();
        assert!(parse(b"{}", &c).unwrap_err().contains("not a JSON list"));
        assert!(parse(b"[", &c).is_err());
        assert!(parse(&vec![b' '; MAX_BODY + 1], &c)
            .unwrap_err()
            .contains("bytes"));
        assert_eq!(parse(b"[]", &c).unwrap(), Parsed::default());
        // Missing sections are defaults, and then skipped, not errors.
        let p = parse(br#"[{"Service": {"Service": "deepseek-api"}}]"#, &c).unwrap();
        assert_eq!((p.nodes.len(), p.skipped), (0, 1));
    }

    #[test]
    fn index_resets_when_it_goes_backwards_and_is_never_zero() {
        assert_eq!(next_index(0, 12), 12);
        assert_eq!(next_index(12, 12), 12);
        assert_eq!(next_index(12, 40), 40);
        assert_eq!(next_index(40, 3), 0);
        assert_eq!(next_index(0, 0), 1);
        assert_eq!(next_index(5, 0), 0);
        assert_eq!(next_index(0, 1), 1);
    }

    #[test]
    fn bucket_lets_two_through_then_paces() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut b = Bucket::new(s, t0);
        assert_eq!(b.take(t0), Duration::ZERO);
        assert_eq!(b.take(t0), Duration::ZERO);
        assert_eq!(b.take(t0), s);
        // The wait was served: the next one waits another interval.
        assert_eq!(b.take(t0 + s), s);
        // A quiet spell refills both tokens.
        let later = t0 + 10 * s;
        assert_eq!(b.take(later), Duration::ZERO);
        assert_eq!(b.take(later), Duration::ZERO);
        let mut off = Bucket::new(Duration::ZERO, t0);
        for _ in 0..5 {
            assert_eq!(off.take(t0), Duration::ZERO);
        }
    }

    #[test]
    fn tokens_that_would_break_the_header_are_refused() {
        assert!(check_token("b1gs3cr3t-0000-4f5e-9a1b-123456789abc").is_ok());
        for bad in ["", "a\r\nX-Evil: 1", "a b", "\u{e9}", &"x".repeat(513)] {
            assert!(check_token(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn query_path_encodes_values() {
        let mut c = cfg();
        assert_eq!(query_path(&c, 0), "/v1/health/service/deepseek-api?passing");
        c.tags = vec!["v1.2".into(), "a=b&c".into()];
        c.datacenter = Some("dc2".into());
        assert_eq!(
            query_path(&c, 7),
            "/v1/health/service/deepseek-api?passing&tag=v1.2&tag=a%3Db%26c&dc=dc2&index=7&wait=30s"
        );
    }

    #[test]
    fn responses_are_read_whole_or_refused() {
        let a =
            read_response(b"HTTP/1.1 200 OK\r\nX-Consul-Index: 42\r\nContent-Length: 2\r\n\r\n[]").unwrap();
        assert_eq!((a.index, a.body.as_slice()), (42, &b"[]"[..]));
        let a = read_response(b"HTTP/1.1 200 OK\r\nx-consul-index: 7\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n[\r\n1\r\n]\r\n0\r\n\r\n").unwrap();
        assert_eq!((a.index, a.body.as_slice()), (7, &b"[]"[..]));
        let a = read_response(b"HTTP/1.1 200 OK\r\n\r\n[1]").unwrap();
        assert_eq!((a.index, a.body.as_slice()), (0, &b"[1]"[..]));
        assert_eq!(
            read_response(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 13\r\n\r\nACL not found").unwrap_err(),
            "HTTP 403: ACL not found"
        );
        assert!(read_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n[]").is_err());
        assert!(read_response(b"HTTP/1.1 200 OK\r\nX-Consul-Index: -1\r\n\r\n[]").is_err());
        assert!(read_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n").is_err());
        assert!(read_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n[]").is_err());
        assert!(read_response(b"garbage").is_err());
    }
}
