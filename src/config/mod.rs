//! Pool configuration: what the balancer is told to balance.
//!
//! A [`Config`] sizes the shared-memory region ([`ShmConfig`]) and names the upstream
//! pools ([`PoolConfig`]), each with its algorithm, its nodes and the tuning of its
//! latency estimate. It arrives as JSON text (a file or a string) or as a Lua table
//! turned into a [`serde_json::Value`], and is parsed, validated and resolved here, once,
//! before anything touches shared memory. One pool:
//!
//! ```json
//! {
//!   "pools": {
//!     "deepseek": {
//!       "algorithm": "p2c_ewma",
//!       "nodes": [
//!         { "id": "a", "addr": "10.0.0.1:8000", "weight": 2 },
//!         { "id": "b", "addr": "gpu-b.internal:8000" },
//!         { "id": "spare", "addr": "[fd00::7]:8000", "backup": true }
//!       ],
//!       "ewma": { "decay_ms": 10000, "penalty_ms": 5000 },
//!       "slow_start_ms": 30000
//!     }
//!   }
//! }
//! ```
//!
//! Every field but `pools`, a pool's `nodes` and a node's `id` and `addr` has a default.
//! A node may also say how its provider is spoken to (Host, scheme, headers such as an
//! API key read from the environment, model name): [`provider`].
//!
//! Unknown keys are errors, at every level. A misspelt key (`"wieght": 5`) would
//! otherwise be dropped without a word and the default used in its place: a config that
//! loads but does not do what its author wrote is worse than one that is refused with
//! the path of the offending key. Likewise every number has a range, every name a
//! character set, and every address must resolve, so that a bad config fails at load
//! time rather than as odd balancing later. Errors ([`ConfigError`]) name the path
//! (`pools.deepseek.nodes[1].weight`) and the value. Every section is an object (an
//! array in its place is refused, not read as the fields by position), and an integer
//! field takes a number with a zero fraction (`5.0`) but not `5.5`: both at one place,
//! [`crate::strict`], for JSON text and Lua tables alike. Bytes that are not UTF-8
//! are refused naming the field they are in.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::ops::RangeInclusive;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::select::Algorithm;
use crate::strict::Strict;

pub(crate) mod admission;
mod canary;
mod check;
pub mod cluster;
pub mod consul;
pub mod discovery;
pub mod emergency;
mod policies;
pub use admission::{AdmissionConfig, ClassConfig};
use canary::validate_canaries;
pub use canary::{CanaryConfig, CanaryKey, RampConfig, RollbackConfig};
use check::{check_host_header, resolve, serde_error, valid_name};
pub(crate) use check::{check_range, check_ratio};
pub use cluster::ClusterConfig;
pub use discovery::DiscoveryConfig;
pub use emergency::EmergencyConfig;
pub mod provider;
pub mod scrape;
pub use provider::{HeaderRef, HeaderSource, Provider, Scheme, Secret, Secrets};
pub use scrape::{ScrapeConfig, ScrapeKind};

/// Why a config was refused: where (`pools.deepseek.nodes[1].weight`, or `config` for
/// the document as a whole) and what is wrong, naming the value.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl ConfigError {
    pub(crate) fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

impl std::error::Error for ConfigError {}

/// The whole configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub shm: ShmConfig,
    /// Pools by name; names are 1..=64 bytes of `[A-Za-z0-9._-]`.
    pub pools: BTreeMap<String, PoolConfig>,
    /// Several gateways sharing one view through Redis; off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterConfig>,
}

/// Sizes of the shared-memory region, fixed when it is created.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShmConfig {
    /// Node slots, over all pools (1..=65536).
    pub max_nodes: u32,
    /// Pool slots (1..=4096).
    pub max_pools: u32,
    /// nginx worker slots for in-flight accounting (1..=1024).
    pub max_workers: u32,
    /// Bytes kept for the config text (4096..=67108864).
    pub config_bytes: u32,
    /// Admission queue entries per pool (1..=65536): waiters of a pool at once.
    pub queue_slots: u32,
}

impl Default for ShmConfig {
    fn default() -> Self {
        ShmConfig {
            max_nodes: 4096,
            max_pools: 64,
            max_workers: 64,
            config_bytes: 1 << 20,
            queue_slots: 256,
        }
    }
}

/// One upstream pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    #[serde(default)]
    pub algorithm: Algorithm,
    /// Required and non-empty, with at least one node that is not a backup; may be
    /// empty (or absent) in a pool whose `discovery` source gives the nodes.
    #[serde(default)]
    pub nodes: Vec<NodeConfig>,
    #[serde(default)]
    pub ewma: EwmaConfig,
    /// Ramp-up time of a node that (re)joins, 0..=3600000; 0 turns it off.
    #[serde(default = "default_slow_start_ms")]
    pub slow_start_ms: u32,
    /// How often a worker recomputes effective weights, 10..=60000.
    #[serde(default = "default_refresh_ms")]
    pub refresh_ms: u32,
    /// Points per unit of weight on the chash ring, 1..=10000.
    #[serde(default = "default_chash_points")]
    pub chash_points: u32,
    #[serde(default)]
    pub retry: RetryConfig,
    #[serde(default)]
    pub cooldown: CooldownConfig,
    #[serde(default)]
    pub limit: LimitConfig,
    #[serde(default)]
    pub outlier: OutlierConfig,
    /// Active health checks; off when absent.
    #[serde(default)]
    pub health: Option<HealthConfig>,
    /// Status answered when no node can take a request (429 or 503).
    #[serde(default = "default_no_node_status")]
    pub no_node_status: u32,
    /// Width of the sliding window of outcomes (overload detection, canary
    /// rollback), 1000..=3600000; the seed's 5 minutes by default.
    #[serde(default = "default_window_ms")]
    pub window_ms: u32,
    /// Canary split: a share of this pool's requests goes to another pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<CanaryConfig>,
    /// Emergency mode (overload detector, shedding, backup pool, alerts); off when
    /// absent. See [`crate::emergency`].
    #[serde(default)]
    pub emergency: Option<EmergencyConfig>,
    /// Priorities and the admission queue (`admit()`); off by default.
    #[serde(default)]
    pub admission: AdmissionConfig,
    /// Reading requests' token cost from their bodies (`crate::ask`).
    #[serde(default)]
    pub tokens: crate::ask::TokensPolicy,
    /// Queue depth scraped from self-hosted nodes' `/metrics`; off when absent. See
    /// [`crate::scrape`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scrape: Option<ScrapeConfig>,
    /// Stream signals (`crate::stream`): `add_usage`.
    #[serde(default)]
    pub stream: crate::stream::StreamPolicy,
    /// Prefix keys and the load guard of `"algorithm": "prefix"` (`crate::prefix`).
    #[serde(default)]
    pub prefix: crate::prefix::PrefixPolicy,
    /// Where the nodes come from besides `nodes` (`crate::discovery`); absent: the
    /// static list only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discovery: Option<DiscoveryConfig>,
}

fn default_window_ms() -> u32 {
    300_000
}

fn default_no_node_status() -> u32 {
    429
}

/// Most rounds a request may take after its first: nginx allows a request ten internal
/// redirects (`error_page` to a named location is one), and a config may use a few.
pub const MAX_ROUNDS: u32 = 8;

/// When a failed try may be retried on another node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    /// Retries allowed as a share of requests over the window, 0.0..=1.0 (Envoy, Finagle).
    pub budget_ratio: f64,
    /// Retries per second always allowed, whatever the ratio, 0..=10000.
    pub min_per_s: u32,
    /// Sliding window of the budget, 1000..=60000 ms.
    pub window_ms: u32,
    /// Tries per request including the first, 1..=16 (nginx's proxy_next_upstream_tries
    /// still caps it).
    pub max_tries: u32,
    /// No retry starts later than this after the request began, 1..=3600000 ms.
    pub deadline_ms: u32,
    /// Retry POST/PATCH/LOCK requests after a failure that may have reached the node
    /// (timeouts, 502/504). 429, 503 and tries that sent nothing are always retryable.
    pub non_idempotent: bool,
    /// Extra rounds a busy request may take, 0..=8 (0: off). A round ends when every
    /// node the request could still go to is busy (429, 503, or none free when the
    /// balancer runs); the request then waits for a slot (the admission queue when it
    /// is on, else a free node) and is sent again, rebuilt, to a node it has not tried.
    /// Needs the nginx side: `error_page 502 504 = @rsb_round;` (docs/balancing.md, "Rounds").
    pub rounds: u32,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            budget_ratio: 0.2,
            min_per_s: 3,
            window_ms: 10_000,
            max_tries: 3,
            deadline_ms: 60_000,
            non_idempotent: false,
            rounds: 3,
        }
    }
}

/// How a node that answers 429 because its quota is spent is rested.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CooldownConfig {
    /// First backoff without Retry-After, 1..=3600000 ms.
    pub base_ms: u32,
    /// Longest cooldown the backoff (no Retry-After) reaches, 1..=86400000 ms.
    pub max_ms: u32,
    /// Use the node's Retry-After (never shortened by jitter).
    pub honor_retry_after: bool,
    /// The longest Retry-After a node is believed, 1000..=86400000 ms (default one
    /// hour): a larger value (or a date further ahead) counts as this long. A cooldown
    /// never lasts longer than `max(max_ms, max_retry_after_ms)`.
    pub max_retry_after_ms: u32,
    /// A 429 whose Retry-After is at least this long means "quota", 0..=3600000 ms
    /// (0: any Retry-After does).
    pub quota_retry_after_ms: u32,
    /// Consecutive 429s at the lowest concurrency limit that mean "quota", 1..=1000.
    pub quota_after: u32,
}

impl Default for CooldownConfig {
    fn default() -> Self {
        CooldownConfig {
            base_ms: 1_000,
            max_ms: 60_000,
            honor_retry_after: true,
            max_retry_after_ms: 3_600_000,
            quota_retry_after_ms: 2_000,
            quota_after: 3,
        }
    }
}

/// The per-node concurrency limit learned from "busy" 429s (AIMD).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitConfig {
    pub enabled: bool,
    /// Lowest limit, 1..=100000.
    pub min: u32,
    /// Highest limit, 1..=100000, >= min.
    pub max: u32,
    /// Successes at the limit needed to raise it by one, per unit of limit, 1..=1000.
    pub increase_every: u32,
    /// Slow nodes as overflow, 0 (off) or 1.5..=100: a node whose mean latency (of its
    /// recent served tries) is at least `slow_factor` times the fastest primary's takes
    /// a try only when no faster node can (all at their learned limits or
    /// unavailable), and `admit()` waits for a faster node's slot up to the difference
    /// in latency first. Absent: [`DEFAULT_SLOW_FACTOR`], except with `chash`, where
    /// the key decides the node (0); [`Config::validate`] writes that value in, so the
    /// loaded config always carries a number (read it through
    /// [`PoolConfig::slow_factor`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slow_factor: Option<f64>,
    /// Cluster mode: the learned limit is the fleet's, split across the gateways by
    /// demand (`crate::cluster`'s shares; default). `false`: each gateway learns and
    /// keeps its own, as without a cluster.
    #[serde(skip_serializing_if = "provider::is_true")]
    pub fleet: bool,
}

/// `limit.slow_factor` when the config leaves it out (all algorithms but `chash`).
/// Issue 11's busy storm (`scripts/bench-gateway.sh defaults`): with slow nodes not
/// set apart, a 6x slower node set the p99 of the pool defaults.
pub const DEFAULT_SLOW_FACTOR: f64 = 2.0;

impl Default for LimitConfig {
    fn default() -> Self {
        LimitConfig {
            enabled: true,
            min: 1,
            max: 10_000,
            increase_every: 4,
            slow_factor: None,
            fleet: true,
        }
    }
}

/// Passive outlier ejection of nodes that fail (connect errors, timeouts, 5xx).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutlierConfig {
    /// Consecutive failures that eject a node, 1..=1000; 0 turns ejection off.
    pub consecutive_failures: u32,
    /// First ejection time; doubles with each ejection, 1..=3600000 ms.
    pub base_ms: u32,
    /// Longest ejection, 1..=86400000 ms.
    pub max_ms: u32,
    /// Never eject more than this share of a pool's primaries, 0..=100.
    pub max_ejected_percent: u32,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        OutlierConfig {
            consecutive_failures: 5,
            base_ms: 10_000,
            max_ms: 300_000,
            max_ejected_percent: 50,
        }
    }
}

/// Active HTTP health checks, run by one worker (a lease in shared memory).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConfig {
    /// Request path, starting with "/".
    pub path: String,
    /// Host header (default: the node's host): `host[:port]`, checked (no control
    /// characters: they would inject headers into every probe).
    pub host: Option<String>,
    /// Statuses that count as healthy.
    pub statuses: Vec<u32>,
    /// 100..=3600000 ms, jittered by up to 10%.
    pub interval_ms: u32,
    /// 10..=600000 ms.
    pub timeout_ms: u32,
    /// Consecutive passes that bring a node back, 1..=100.
    pub healthy: u32,
    /// Consecutive failures that take a node out, 1..=100.
    pub unhealthy: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            path: "/health".into(),
            host: None,
            statuses: vec![200],
            interval_ms: 10_000,
            timeout_ms: 2_000,
            healthy: 2,
            unhealthy: 3,
        }
    }
}

fn default_slow_start_ms() -> u32 {
    30_000
}

fn default_refresh_ms() -> u32 {
    100
}

fn default_chash_points() -> u32 {
    160
}

impl Default for PoolConfig {
    /// Defaults for everything; `nodes` is empty, which validation refuses.
    fn default() -> Self {
        PoolConfig {
            algorithm: Algorithm::default(),
            nodes: Vec::new(),
            ewma: EwmaConfig::default(),
            slow_start_ms: default_slow_start_ms(),
            refresh_ms: default_refresh_ms(),
            chash_points: default_chash_points(),
            retry: RetryConfig::default(),
            cooldown: CooldownConfig::default(),
            limit: LimitConfig::default(),
            outlier: OutlierConfig::default(),
            health: None,
            no_node_status: default_no_node_status(),
            window_ms: default_window_ms(),
            canary: None,
            emergency: None,
            admission: AdmissionConfig::default(),
            tokens: crate::ask::TokensPolicy::default(),
            scrape: None,
            stream: crate::stream::StreamPolicy::default(),
            prefix: crate::prefix::PrefixPolicy::default(),
            discovery: None,
        }
    }
}

/// Tuning of the peak-EWMA latency estimate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EwmaConfig {
    /// Time constant (tau) of the decay, 100..=600000.
    pub decay_ms: u32,
    /// Latency assumed for a node without samples, 1..=600000.
    pub default_rtt_ms: u32,
    /// Latency a failure or a 429 counts as, 1..=600000.
    pub penalty_ms: u32,
    /// Ceiling of the penalised estimate, 1..=3600000 and >= `penalty_ms`.
    pub penalty_cap_ms: u32,
}

impl Default for EwmaConfig {
    fn default() -> Self {
        EwmaConfig {
            decay_ms: 10_000,
            default_rtt_ms: 500,
            penalty_ms: 5_000,
            penalty_cap_ms: 300_000,
        }
    }
}

/// One node of a pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// 1..=64 bytes of `[A-Za-z0-9._:@-]`, unique within the pool.
    pub id: String,
    /// `ip:port`, `[v6]:port` or `host:port`, port 1..=65535.
    pub addr: String,
    /// 1..=10000.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Used only when no primary node of the pool can serve.
    #[serde(default)]
    pub backup: bool,
    /// Host header and TLS SNI, `host[:port]` (default: the host part of `addr`).
    #[serde(default, rename = "host", skip_serializing_if = "Option::is_none")]
    pub host_header: Option<String>,
    /// `http` (default) or `https`.
    #[serde(default, skip_serializing_if = "is_http")]
    pub scheme: Scheme,
    /// Verify the node's certificate (against the gateway's CA bundle); default true.
    #[serde(default = "provider::default_true", skip_serializing_if = "provider::is_true")]
    pub tls_verify: bool,
    /// Request headers set for this node: name -> a literal or `{"env": "VAR"}`
    /// (secrets: see [`provider`]); at most 16.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, HeaderSource>,
    /// The JSON body's top-level `"model"` is rewritten to this for this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Token budget per minute, 1..=1,000,000,000: requests' token estimates are
    /// reserved in a sliding 60 s window shared by all workers (`crate::headroom`),
    /// for providers that send no rate-limit headers. Absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<u32>,
    /// Request budget per minute, 1..=1,000,000, in the same window. Absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpm: Option<u32>,
    /// `addr` resolved, filled by [`Config::validate`].
    #[serde(skip)]
    pub resolved: Option<SocketAddr>,
    /// The headers' values (`headers` in order), read by [`Config::validate`] from
    /// this process's environment; never serialized.
    #[serde(skip)]
    pub resolved_headers: Option<Vec<(String, Secret)>>,
}

fn is_http(s: &Scheme) -> bool {
    *s == Scheme::Http
}

fn default_weight() -> u32 {
    1
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            id: String::new(),
            addr: String::new(),
            weight: default_weight(),
            backup: false,
            host_header: None,
            scheme: Scheme::Http,
            tls_verify: true,
            headers: BTreeMap::new(),
            model: None,
            tpm: None,
            rpm: None,
            resolved: None,
            resolved_headers: None,
        }
    }
}

impl NodeConfig {
    /// The host part of `addr` as written, for the TLS SNI and the Host header: the
    /// name, the IPv4 address, or the IPv6 address with its brackets (`[::1]`).
    pub fn host(&self) -> &str {
        match self.addr.rsplit_once(':') {
            Some((host, _)) => host,
            None => &self.addr,
        }
    }
}

impl Config {
    /// Parses, validates and resolves JSON text.
    pub fn from_json(text: &str) -> Result<Config, ConfigError> {
        Config::from_json_bytes(text.as_bytes())
    }

    /// Same as [`Config::from_json`], from bytes that may not be UTF-8: invalid UTF-8
    /// in a string is refused naming the field it is in.
    pub fn from_json_bytes(text: &[u8]) -> Result<Config, ConfigError> {
        let mut de = serde_json::Deserializer::from_slice(text);
        let mut config: Config = serde_path_to_error::deserialize(Strict(&mut de)).map_err(serde_error)?;
        de.end().map_err(|e| ConfigError::new("config", e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Same as [`Config::from_json`], from a JSON value (a Lua table, converted).
    pub fn from_value(v: serde_json::Value) -> Result<Config, ConfigError> {
        let mut config: Config = serde_path_to_error::deserialize(Strict(v)).map_err(serde_error)?;
        config.validate()?;
        Ok(config)
    }

    /// Reads a JSON file, then as [`Config::from_json`].
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read(path)
            .map_err(|e| ConfigError::new(path.display().to_string(), format!("cannot read: {e}")))?;
        Config::from_json_bytes(&text)
    }

    /// Checks ranges, names, duplicates and capacity, then reads every node's header
    /// values not read yet from the environment (`resolved_headers`) and resolves
    /// every node's address not resolved yet into `resolved`. Name resolution comes last, so that a config with a
    /// plain mistake is refused without waiting on DNS.
    pub fn validate(&mut self) -> Result<(), ConfigError> {
        self.shm.validate()?;
        if let Some(c) = &self.cluster {
            c.validate()?;
        }
        if self.pools.is_empty() {
            return Err(ConfigError::new("pools", "at least one pool is required"));
        }
        for (name, pool) in &self.pools {
            if !valid_name(name, b"._-") {
                return Err(ConfigError::new(
                    "pools",
                    format!("invalid pool name {name:?}: must be 1..=64 bytes of [A-Za-z0-9._-]"),
                ));
            }
            pool.validate(&format!("pools.{name}"))?;
            if let Some(e) = &pool.emergency {
                e.validate(
                    &format!("pools.{name}.emergency"),
                    name,
                    pool.window_ms,
                    &self.pools,
                )?;
            }
            pool.admission
                .validate(&format!("pools.{name}.admission"), self.shm.queue_slots)?;
            if let Some(s) = &pool.scrape {
                s.validate(&format!("pools.{name}.scrape"))?;
            }
        }
        validate_canaries(&self.pools)?;
        let pools = self.pools.len();
        if pools > self.shm.max_pools as usize {
            return Err(ConfigError::new(
                "shm.max_pools",
                format!(
                    "{} is too small: the config has {pools} pools",
                    self.shm.max_pools
                ),
            ));
        }
        let nodes: usize = self.pools.values().map(|p| p.nodes.len()).sum();
        if nodes > self.shm.max_nodes as usize {
            return Err(ConfigError::new(
                "shm.max_nodes",
                format!(
                    "{} is too small: the pools have {nodes} nodes in all",
                    self.shm.max_nodes
                ),
            ));
        }
        for (name, pool) in &mut self.pools {
            for (i, node) in pool.nodes.iter_mut().enumerate() {
                node.resolve_headers(&format!("pools.{name}.nodes[{i}]"))?;
            }
        }
        for (name, pool) in &mut self.pools {
            // The defaults that depend on other fields, written in.
            pool.limit.slow_factor = Some(pool.slow_factor());
            // A node resolved already (a run-time change rebuilding the running config)
            // keeps its address: no DNS lookup for nodes that are not new.
            let mut unresolved = Vec::new();
            for (i, node) in pool
                .nodes
                .iter_mut()
                .enumerate()
                .filter(|(_, n)| n.resolved.is_none())
            {
                match resolve(&node.addr) {
                    Ok(addr) => node.resolved = Some(addr),
                    // Names that re-resolve (`discovery.dns` without a name): a name
                    // that does not resolve yet joins when it does.
                    Err(_) if pool.discovery.as_ref().is_some_and(|d| d.refreshes_names()) => {
                        unresolved.push(node.id.clone())
                    }
                    Err(m) => return Err(ConfigError::new(format!("pools.{name}.nodes[{i}].addr"), m)),
                }
            }
            discovery::set_aside(pool, &unresolved);
        }
        Ok(())
    }
}

/// Resolves a node address (`ip:port`, `[v6]:port` or `host:port`) as a config's
/// are (the system resolver; IPv4 preferred); the error names `addr`. Blocks: call it
/// off nginx's event loop (`crate::discovery::lookup`).
pub fn resolve_addr(addr: &str) -> Result<SocketAddr, String> {
    resolve(addr)
}

impl ShmConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        check_range("shm", "max_nodes", self.max_nodes, 1..=65_536)?;
        check_range("shm", "max_pools", self.max_pools, 1..=4_096)?;
        check_range("shm", "max_workers", self.max_workers, 1..=1_024)?;
        check_range("shm", "config_bytes", self.config_bytes, 4_096..=67_108_864)?;
        check_range("shm", "queue_slots", self.queue_slots, 1..=65_536)
    }
}

impl PoolConfig {
    /// `limit.slow_factor` as it applies: the configured value, else
    /// [`DEFAULT_SLOW_FACTOR`] (0 with `chash` and `prefix`: the key decides the node).
    pub fn slow_factor(&self) -> f64 {
        self.limit.slow_factor.unwrap_or(match self.algorithm {
            Algorithm::Chash | Algorithm::Prefix => 0.0,
            _ => DEFAULT_SLOW_FACTOR,
        })
    }

    /// Everything but address resolution; `path` is `pools.NAME`.
    fn validate(&self, path: &str) -> Result<(), ConfigError> {
        check_range(path, "slow_start_ms", self.slow_start_ms, 0..=3_600_000)?;
        check_range(path, "refresh_ms", self.refresh_ms, 10..=60_000)?;
        check_range(path, "chash_points", self.chash_points, 1..=10_000)?;
        check_range(path, "window_ms", self.window_ms, 1_000..=3_600_000)?;
        self.ewma.validate(&format!("{path}.ewma"))?;
        self.validate_policies(path)?;

        let nodes_path = format!("{path}.nodes");
        if let Some(d) = &self.discovery {
            d.validate(&format!("{path}.discovery"))?;
        }
        if self.nodes.is_empty() && self.discovery.is_none() {
            return Err(ConfigError::new(nodes_path, "at least one node is required"));
        }
        if !self.nodes.is_empty() && self.nodes.iter().all(|n| n.backup) {
            return Err(ConfigError::new(
                nodes_path,
                "every node is a backup: at least one must not be",
            ));
        }
        let mut ids = HashSet::new();
        for (i, node) in self.nodes.iter().enumerate() {
            let node_path = format!("{nodes_path}[{i}]");
            if !valid_name(&node.id, b"._:@-") {
                return Err(ConfigError::new(
                    format!("{node_path}.id"),
                    format!(
                        "invalid id {:?}: must be 1..=64 bytes of [A-Za-z0-9._:@-]",
                        node.id
                    ),
                ));
            }
            if !ids.insert(node.id.as_str()) {
                return Err(ConfigError::new(
                    format!("{node_path}.id"),
                    format!("duplicate id {:?}", node.id),
                ));
            }
            check_range(&node_path, "weight", node.weight, crate::abi::WEIGHT_RANGE)?;
            if let Some(tpm) = node.tpm {
                check_range(&node_path, "tpm", tpm, 1..=crate::headroom::TPM_MAX)?;
            }
            if let Some(rpm) = node.rpm {
                check_range(&node_path, "rpm", rpm, 1..=crate::headroom::RPM_MAX)?;
            }
            node.validate_provider(&node_path)?;
        }
        Ok(())
    }
}

impl EwmaConfig {
    fn validate(&self, path: &str) -> Result<(), ConfigError> {
        check_range(path, "decay_ms", self.decay_ms, 100..=600_000)?;
        check_range(path, "default_rtt_ms", self.default_rtt_ms, 1..=600_000)?;
        check_range(path, "penalty_ms", self.penalty_ms, 1..=600_000)?;
        check_range(path, "penalty_cap_ms", self.penalty_cap_ms, 1..=3_600_000)?;
        if self.penalty_cap_ms < self.penalty_ms {
            return Err(ConfigError::new(
                format!("{path}.penalty_cap_ms"),
                format!(
                    "{} is less than penalty_ms ({})",
                    self.penalty_cap_ms, self.penalty_ms
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn base() -> Value {
        json!({
            "pools": {
                "deepseek": {
                    "nodes": [
                        { "id": "a", "addr": "127.0.0.1:8000" },
                        { "id": "b", "addr": "127.0.0.2:8000", "weight": 3 }
                    ]
                }
            }
        })
    }

    /// `base()` with the value at JSON pointer `ptr` replaced (its parent must exist).
    fn with(ptr: &str, v: Value) -> Value {
        let mut doc = base();
        let (parent, key) = ptr.rsplit_once('/').unwrap();
        match doc.pointer_mut(parent).unwrap() {
            Value::Object(m) => {
                m.insert(key.to_string(), v);
            }
            Value::Array(a) => a[key.parse::<usize>().unwrap()] = v,
            _ => panic!("{parent} is not a container"),
        }
        doc
    }

    fn err(v: Value) -> String {
        Config::from_value(v).unwrap_err().to_string()
    }

    #[test]
    fn defaults_filled() {
        let c = Config::from_value(base()).unwrap();
        assert_eq!(c.shm, ShmConfig::default());
        assert_eq!(c.shm.max_nodes, 4096);
        assert_eq!(c.shm.max_pools, 64);
        assert_eq!(c.shm.max_workers, 64);
        assert_eq!(c.shm.config_bytes, 1_048_576);
        let p = &c.pools["deepseek"];
        assert_eq!(p.algorithm, Algorithm::P2cEwma);
        assert_eq!(p.slow_start_ms, 30_000);
        assert_eq!(p.refresh_ms, 100);
        assert_eq!(p.chash_points, 160);
        assert_eq!(p.ewma, EwmaConfig::default());
        assert_eq!(p.ewma.decay_ms, 10_000);
        assert_eq!(p.ewma.default_rtt_ms, 500);
        assert_eq!(p.ewma.penalty_ms, 5_000);
        assert_eq!(p.ewma.penalty_cap_ms, 300_000);
        assert_eq!(p.nodes[0].weight, 1);
        assert_eq!(p.nodes[1].weight, 3);
        assert!(!p.nodes[0].backup);
        assert_eq!(p.nodes[0].resolved, Some("127.0.0.1:8000".parse().unwrap()));
    }

    /// Slow nodes as overflow are on by default (factor 2), written into the loaded
    /// config; off by default with `chash` (its key decides the node); an explicit
    /// value, 0 included, is kept whatever the algorithm.
    #[test]
    fn slow_factor_default_depends_on_algorithm() {
        let c = Config::from_value(base()).unwrap();
        let p = &c.pools["deepseek"];
        assert_eq!((p.limit.slow_factor, p.slow_factor()), (Some(2.0), 2.0));
        let c = Config::from_value(with("/pools/deepseek/algorithm", json!("chash"))).unwrap();
        assert_eq!(c.pools["deepseek"].limit.slow_factor, Some(0.0));
        for alg in ["p2c_ewma", "chash", "least_conn"] {
            for f in [0.0, 3.0] {
                let mut v = base();
                v["pools"]["deepseek"]["algorithm"] = json!(alg);
                v["pools"]["deepseek"]["limit"] = json!({ "slow_factor": f });
                let c = Config::from_value(v).unwrap();
                assert_eq!(c.pools["deepseek"].slow_factor(), f, "{alg} {f}");
            }
        }
        // Not validated (a hand-built config): the same answer, from the algorithm.
        let mut p = PoolConfig::default();
        assert_eq!(p.slow_factor(), DEFAULT_SLOW_FACTOR);
        p.algorithm = Algorithm::Chash;
        assert_eq!(p.slow_factor(), 0.0);
    }

    #[test]
    fn all_fields_parse() {
        let text = r#"{
            "shm": { "max_nodes": 10, "max_pools": 2, "max_workers": 8, "config_bytes": 8192 },
            "pools": {
                "p-1.x_y": {
                    "algorithm": "chash",
                    "nodes": [
                        { "id": "n1:a@b", "addr": "127.0.0.1:1", "weight": 10000, "backup": false },
                        { "id": "n2", "addr": "127.0.0.1:65535", "backup": true }
                    ],
                    "ewma": { "decay_ms": 100, "default_rtt_ms": 1, "penalty_ms": 7, "penalty_cap_ms": 7 },
                    "slow_start_ms": 0, "refresh_ms": 10, "chash_points": 10000
                }
            }
        }"#;
        let c = Config::from_json(text).unwrap();
        assert_eq!(c.shm.max_workers, 8);
        let p = &c.pools["p-1.x_y"];
        assert_eq!(p.algorithm, Algorithm::Chash);
        assert!(p.nodes[1].backup);
        assert_eq!(p.ewma.penalty_cap_ms, 7);
        assert_eq!(p.slow_start_ms, 0);
    }

    #[test]
    fn algorithms_parse() {
        for (name, alg) in [
            ("weighted_random", Algorithm::WeightedRandom),
            ("round_robin", Algorithm::RoundRobin),
            ("least_conn", Algorithm::LeastConn),
            ("p2c_ewma", Algorithm::P2cEwma),
            ("chash", Algorithm::Chash),
        ] {
            let c = Config::from_value(with("/pools/deepseek/algorithm", json!(name))).unwrap();
            assert_eq!(c.pools["deepseek"].algorithm, alg);
        }
        let e = err(with("/pools/deepseek/algorithm", json!("fastest")));
        assert!(
            e.starts_with("pools.deepseek.algorithm: unknown variant `fastest`"),
            "{e}"
        );
    }

    #[test]
    fn range_errors_name_path_and_value() {
        let cases: &[(&str, u64, &str)] = &[
            ("/shm/max_nodes", 0, "shm.max_nodes: 0 is out of range 1..=65536"),
            (
                "/shm/max_nodes",
                65_537,
                "shm.max_nodes: 65537 is out of range 1..=65536",
            ),
            ("/shm/max_pools", 0, "shm.max_pools: 0 is out of range 1..=4096"),
            (
                "/shm/max_pools",
                4_097,
                "shm.max_pools: 4097 is out of range 1..=4096",
            ),
            (
                "/shm/max_workers",
                0,
                "shm.max_workers: 0 is out of range 1..=1024",
            ),
            (
                "/shm/max_workers",
                1_025,
                "shm.max_workers: 1025 is out of range 1..=1024",
            ),
            (
                "/shm/config_bytes",
                4_095,
                "shm.config_bytes: 4095 is out of range 4096..=67108864",
            ),
            (
                "/shm/config_bytes",
                67_108_865,
                "shm.config_bytes: 67108865 is out of range 4096..=67108864",
            ),
            (
                "/pools/deepseek/slow_start_ms",
                3_600_001,
                "pools.deepseek.slow_start_ms: 3600001 is out of range 0..=3600000",
            ),
            (
                "/pools/deepseek/limit/slow_factor",
                1,
                "pools.deepseek.limit.slow_factor: 1 is out of range: 0 (off) or 1.5..=100",
            ),
            (
                "/pools/deepseek/limit/slow_factor",
                101,
                "pools.deepseek.limit.slow_factor: 101 is out of range: 0 (off) or 1.5..=100",
            ),
            (
                "/pools/deepseek/refresh_ms",
                9,
                "pools.deepseek.refresh_ms: 9 is out of range 10..=60000",
            ),
            (
                "/pools/deepseek/refresh_ms",
                60_001,
                "pools.deepseek.refresh_ms: 60001 is out of range 10..=60000",
            ),
            (
                "/pools/deepseek/chash_points",
                0,
                "pools.deepseek.chash_points: 0 is out of range 1..=10000",
            ),
            (
                "/pools/deepseek/chash_points",
                10_001,
                "pools.deepseek.chash_points: 10001 is out of range 1..=10000",
            ),
            (
                "/pools/deepseek/ewma/decay_ms",
                99,
                "pools.deepseek.ewma.decay_ms: 99 is out of range 100..=600000",
            ),
            (
                "/pools/deepseek/ewma/decay_ms",
                600_001,
                "pools.deepseek.ewma.decay_ms: 600001 is out of range 100..=600000",
            ),
            (
                "/pools/deepseek/ewma/default_rtt_ms",
                0,
                "pools.deepseek.ewma.default_rtt_ms: 0 is out of range 1..=600000",
            ),
            (
                "/pools/deepseek/ewma/default_rtt_ms",
                600_001,
                "pools.deepseek.ewma.default_rtt_ms: 600001 is out of range 1..=600000",
            ),
            (
                "/pools/deepseek/ewma/penalty_ms",
                0,
                "pools.deepseek.ewma.penalty_ms: 0 is out of range 1..=600000",
            ),
            (
                "/pools/deepseek/ewma/penalty_ms",
                600_001,
                "pools.deepseek.ewma.penalty_ms: 600001 is out of range 1..=600000",
            ),
            (
                "/pools/deepseek/ewma/penalty_cap_ms",
                0,
                "pools.deepseek.ewma.penalty_cap_ms: 0 is out of range 1..=3600000",
            ),
            (
                "/pools/deepseek/ewma/penalty_cap_ms",
                3_600_001,
                "pools.deepseek.ewma.penalty_cap_ms: 3600001 is out of range 1..=3600000",
            ),
            (
                "/pools/deepseek/ewma/penalty_cap_ms",
                4_999,
                "pools.deepseek.ewma.penalty_cap_ms: 4999 is less than penalty_ms (5000)",
            ),
            (
                "/pools/deepseek/nodes/1/weight",
                0,
                "pools.deepseek.nodes[1].weight: 0 is out of range 1..=10000",
            ),
            (
                "/pools/deepseek/nodes/1/weight",
                10_001,
                "pools.deepseek.nodes[1].weight: 10001 is out of range 1..=10000",
            ),
        ];
        for &(ptr, value, want) in cases {
            let mut doc = base();
            let obj = doc.as_object_mut().unwrap();
            obj.insert("shm".into(), json!({}));
            obj["pools"]["deepseek"]
                .as_object_mut()
                .unwrap()
                .insert("ewma".into(), json!({}));
            obj["pools"]["deepseek"]
                .as_object_mut()
                .unwrap()
                .insert("limit".into(), json!({}));
            let (parent, key) = ptr.rsplit_once('/').unwrap();
            match doc.pointer_mut(parent).unwrap() {
                Value::Object(m) => {
                    m.insert(key.into(), json!(value));
                }
                _ => unreachable!(),
            }
            assert_eq!(err(doc), want, "{ptr} = {value}");
        }
    }

    #[test]
    fn out_of_u32_is_a_serde_error_with_path() {
        let e = err(with("/pools/deepseek/refresh_ms", json!(5_000_000_000u64)));
        assert!(
            e.starts_with("pools.deepseek.refresh_ms: invalid value: integer `5000000000`"),
            "{e}"
        );
        let e = err(with("/pools/deepseek/nodes/0/weight", json!(-1)));
        assert!(
            e.starts_with("pools.deepseek.nodes[0].weight: invalid value: integer `-1`"),
            "{e}"
        );
    }

    #[test]
    fn prefix_ranges_name_the_field() {
        let pool = "/pools/deepseek/prefix";
        for (v, want) in [
            (
                json!({"load_factor": 0.5}),
                "pools.deepseek.prefix.load_factor: 0.5 is out of range 1.0..=100",
            ),
            (
                json!({"max_bytes": 10}),
                "pools.deepseek.prefix.max_bytes: 10 is out of range",
            ),
            (
                json!({"min_bytes": 20000}),
                "pools.deepseek.prefix.min_bytes: 20000 is out of range 1..=16384",
            ),
        ] {
            let e = err(with(pool, v));
            assert!(e.starts_with(want), "{e}");
        }
        assert!(Config::from_value(with(pool, json!({"min_bytes": 64, "load_factor": 2.0}))).is_ok());
    }

    #[test]
    fn unknown_keys_refused_at_every_level() {
        let e = err(with("/pool", json!({})));
        assert!(
            e.starts_with("config: unknown field `pool`, expected one of `shm`, `pools`, `cluster`"),
            "{e}"
        );
        let e = err(with("/shm", json!({ "max_node": 1 })));
        assert!(e.starts_with("shm: unknown field `max_node`"), "{e}");
        let e = err(with("/pools/deepseek/algo", json!("chash")));
        assert!(e.starts_with("pools.deepseek: unknown field `algo`"), "{e}");
        let e = err(with("/pools/deepseek/ewma", json!({ "decay": 100 })));
        assert!(e.starts_with("pools.deepseek.ewma: unknown field `decay`"), "{e}");
        let e = err(with("/pools/deepseek/nodes/0/wieght", json!(5)));
        assert_eq!(
            e,
            "pools.deepseek.nodes[0]: unknown field `wieght`, expected one of `id`, `addr`, `weight`, `backup`, `host`, `scheme`, `tls_verify`, `headers`, `model`, `tpm`, `rpm`"
        );
        let e = err(with("/pools/deepseek/nodes/0/resolved", json!("127.0.0.1:1")));
        assert!(
            e.starts_with("pools.deepseek.nodes[0]: unknown field `resolved`"),
            "{e}"
        );
    }

    #[test]
    fn unknown_key_in_json_text_has_path_and_no_position() {
        let text = r#"{"pools":{"deepseek":{"nodes":[{"id":"a","addr":"127.0.0.1:1","wieght":2}]}}}"#;
        let e = Config::from_json(text).unwrap_err();
        assert_eq!(e.path, "pools.deepseek.nodes[0]");
        assert_eq!(
            e.message,
            "unknown field `wieght`, expected one of `id`, `addr`, `weight`, `backup`, `host`, `scheme`, `tls_verify`, `headers`, `model`, `tpm`, `rpm`"
        );
    }

    #[test]
    fn duplicate_ids_refused() {
        let mut doc = base();
        doc["pools"]["deepseek"]["nodes"]
            .as_array_mut()
            .unwrap()
            .push(json!({ "id": "a", "addr": "127.0.0.3:8000" }));
        assert_eq!(err(doc), "pools.deepseek.nodes[2].id: duplicate id \"a\"");
    }

    #[test]
    fn same_id_in_two_pools_allowed() {
        let mut doc = base();
        doc["pools"]["other"] = doc["pools"]["deepseek"].clone();
        let c = Config::from_value(doc).unwrap();
        assert_eq!(c.pools.len(), 2);
    }

    #[test]
    fn empty_nodes_refused() {
        let e = err(with("/pools/deepseek/nodes", json!([])));
        assert_eq!(e, "pools.deepseek.nodes: at least one node is required");
    }

    #[test]
    fn missing_required_fields_refused() {
        // `nodes` may be left out with a `discovery` section only.
        let e = err(json!({ "pools": { "deepseek": {} } }));
        assert_eq!(e, "pools.deepseek.nodes: at least one node is required");
        let e = err(with("/pools/deepseek/nodes/0", json!({ "addr": "127.0.0.1:1" })));
        assert_eq!(e, "pools.deepseek.nodes[0]: missing field `id`");
        let e = err(with("/pools/deepseek/nodes/0", json!({ "id": "a" })));
        assert_eq!(e, "pools.deepseek.nodes[0]: missing field `addr`");
        let e = err(json!({}));
        assert_eq!(e, "config: missing field `pools`");
    }

    #[test]
    fn no_pools_refused() {
        assert_eq!(
            err(json!({ "pools": {} })),
            "pools: at least one pool is required"
        );
    }

    #[test]
    fn only_backup_pool_refused() {
        let doc = json!({ "pools": { "p": { "nodes": [
            { "id": "a", "addr": "127.0.0.1:1", "backup": true },
            { "id": "b", "addr": "127.0.0.1:2", "backup": true }
        ] } } });
        assert_eq!(
            err(doc),
            "pools.p.nodes: every node is a backup: at least one must not be"
        );
    }

    #[test]
    fn bad_pool_names_refused() {
        let long = "p".repeat(65);
        for name in ["", "a b", "a/b", "pööl", long.as_str()] {
            let mut doc = base();
            let pool = doc["pools"]["deepseek"].clone();
            doc["pools"] = json!({ name: pool });
            let e = Config::from_value(doc).unwrap_err();
            assert_eq!(e.path, "pools", "{name:?}");
            assert!(e.message.contains(&format!("{name:?}")), "{e}");
        }
        let ok = "A-z_0.9".to_string() + &"p".repeat(57);
        assert_eq!(ok.len(), 64);
        let mut doc = base();
        let pool = doc["pools"]["deepseek"].clone();
        doc["pools"] = json!({ ok.clone(): pool });
        assert!(Config::from_value(doc).is_ok());
    }

    #[test]
    fn bad_ids_refused() {
        let long = "n".repeat(65);
        for id in ["", "a b", "a/b", "a#b", "ü", long.as_str()] {
            let e = Config::from_value(with("/pools/deepseek/nodes/1/id", json!(id))).unwrap_err();
            assert_eq!(e.path, "pools.deepseek.nodes[1].id", "{id:?}");
            assert!(e.message.contains(&format!("{id:?}")), "{e}");
        }
        let ok = "Az09._:@-".to_string() + &"n".repeat(55);
        assert!(Config::from_value(with("/pools/deepseek/nodes/1/id", json!(ok))).is_ok());
    }

    #[test]
    fn ip_v6_and_localhost_resolve() {
        let doc = json!({ "pools": { "p": { "nodes": [
            { "id": "v4", "addr": "10.1.2.3:80" },
            { "id": "v6", "addr": "[::1]:8080" },
            { "id": "name", "addr": "localhost:8080" }
        ] } } });
        let c = Config::from_value(doc).unwrap();
        let n = &c.pools["p"].nodes;
        assert_eq!(n[0].resolved, Some("10.1.2.3:80".parse().unwrap()));
        assert_eq!(n[1].resolved, Some("[::1]:8080".parse().unwrap()));
        let local = n[2].resolved.unwrap();
        assert!(local.ip().is_loopback(), "{local}");
        assert_eq!(local.port(), 8080);
        assert_eq!(n[0].host(), "10.1.2.3");
        assert_eq!(n[1].host(), "[::1]");
        assert_eq!(n[2].host(), "localhost");
    }

    #[test]
    fn unresolvable_host_refused() {
        let e = Config::from_value(with(
            "/pools/deepseek/nodes/1/addr",
            json!("nosuchhost.invalid:80"),
        ))
        .unwrap_err();
        assert_eq!(e.path, "pools.deepseek.nodes[1].addr");
        assert!(
            e.message
                .starts_with("\"nosuchhost.invalid:80\" does not resolve: "),
            "{e}"
        );
    }

    #[test]
    fn bad_addresses_refused() {
        let cases = [
            ("127.0.0.1:0", "\"127.0.0.1:0\": port 0 is out of range 1..=65535"),
            ("[::1]:0", "\"[::1]:0\": port 0 is out of range 1..=65535"),
            (
                "127.0.0.1:70000",
                "\"127.0.0.1:70000\": port 70000 is out of range 1..=65535",
            ),
            (
                "localhost:70000",
                "\"localhost:70000\": port 70000 is out of range 1..=65535",
            ),
            (
                "localhost",
                "\"localhost\" has no port (expected ip:port, [v6]:port or host:port)",
            ),
            (
                "127.0.0.1",
                "\"127.0.0.1\" has no port (expected ip:port, [v6]:port or host:port)",
            ),
            ("localhost:", "\"localhost:\": invalid port \"\""),
            ("localhost:http", "\"localhost:http\": invalid port \"http\""),
            ("localhost:+80", "\"localhost:+80\": invalid port \"+80\""),
            (":80", "\":80\" has no host"),
            (
                "::1:80",
                "\"::1:80\": an IPv6 address must be in brackets, as in [::1]:80",
            ),
            ("[nope]:80", "\"[nope]:80\": [nope] is not an IPv6 address"),
        ];
        for (addr, want) in cases {
            let e = Config::from_value(with("/pools/deepseek/nodes/0/addr", json!(addr))).unwrap_err();
            assert_eq!(e.path, "pools.deepseek.nodes[0].addr", "{addr}");
            assert_eq!(e.message, want, "{addr}");
        }
    }

    #[test]
    fn wrong_types_refused() {
        let e = err(with("/pools/deepseek/nodes/1/weight", json!("3")));
        assert_eq!(
            e,
            "pools.deepseek.nodes[1].weight: invalid type: string \"3\", expected u32"
        );
        let e = err(with("/pools/deepseek/nodes/0/backup", json!(1)));
        assert!(
            e.starts_with("pools.deepseek.nodes[0].backup: invalid type: integer `1`"),
            "{e}"
        );
        let e = err(with("/pools/deepseek/nodes", json!({})));
        assert!(e.starts_with("pools.deepseek.nodes: invalid type: map"), "{e}");
        let e = err(json!("pools"));
        assert_eq!(
            e,
            "config: invalid type: string \"pools\", expected struct Config"
        );

        let text = r#"{"pools":{"deepseek":{"nodes":[{"id":"a","addr":"127.0.0.1:1","weight":"3"}]}}}"#;
        let e = Config::from_json(text).unwrap_err();
        assert_eq!(
            e.to_string(),
            "pools.deepseek.nodes[0].weight: invalid type: string \"3\", expected u32"
        );
    }

    #[test]
    fn invalid_utf8_in_json_text_names_the_field() {
        let text = b"{\"pools\":{\"deepseek\":{\"nodes\":[{\"id\":\"a\xff\",\"addr\":\"127.0.0.1:1\"}]}}}";
        let e = Config::from_json_bytes(text).unwrap_err();
        assert_eq!(e.path, "pools.deepseek.nodes[0].id");
        assert!(e.message.starts_with("invalid unicode code point"), "{e}");
        let dir = std::env::temp_dir().join(format!("rsbalancer-utf8-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("bad.json");
        std::fs::write(&file, text).unwrap();
        let e = Config::from_file(&file).unwrap_err();
        assert_eq!(e.path, "pools.deepseek.nodes[0].id", "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn health_host_must_be_a_host_and_port() {
        let bad = [
            "a\r\nX-Evil: 1",
            "a\nb",
            "a\tb",
            "a b",
            "",
            "a/b",
            "h\u{fc}",
            "host:",
            "host:0",
            "host:70000",
            "host:http",
            "[nope]:80",
            "[::1",
            "::1",
            "a:b:c",
        ];
        for host in bad {
            let e = Config::from_value(with("/pools/deepseek/health", json!({ "host": host }))).unwrap_err();
            assert_eq!(e.path, "pools.deepseek.health.host", "{host:?}");
            assert!(
                e.message
                    .starts_with(&format!("{host:?} is not a valid host[:port]")),
                "{e}"
            );
        }
        for host in [
            "api.example.com",
            "gpu_1.internal:8000",
            "10.0.0.1",
            "10.0.0.1:80",
            "[::1]",
            "[fd00::7]:443",
        ] {
            let c = Config::from_value(with("/pools/deepseek/health", json!({ "host": host }))).unwrap();
            assert_eq!(
                c.pools["deepseek"].health.as_ref().unwrap().host.as_deref(),
                Some(host)
            );
        }
    }

    #[test]
    fn arrays_in_place_of_objects_refused() {
        // serde's derived structs take a sequence as their fields by position.
        let cases = [
            ("/shm", json!([8, 4])),
            ("/pools/deepseek/ewma", json!([1000])),
            ("/pools/deepseek/retry", json!([0.5])),
            ("/pools/deepseek/health", json!(["/h"])),
            ("/pools/deepseek/admission", json!([true])),
            ("/pools/deepseek/nodes/0", json!(["a", "127.0.0.1:1"])),
        ];
        for (ptr, v) in cases {
            let e = Config::from_value(with(ptr, v)).unwrap_err();
            let want = ptr[1..].replace('/', ".").replace(".0", "[0]");
            assert_eq!(e.path, want, "{ptr}");
            assert!(
                e.message.starts_with("invalid type: sequence, expected struct"),
                "{e}"
            );
        }
        let e = Config::from_value(with(
            "/pools/deepseek",
            json!([[{ "id": "a", "addr": "127.0.0.1:1" }]]),
        ))
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "pools.deepseek: invalid type: sequence, expected struct PoolConfig"
        );
        let e =
            Config::from_json(r#"[{}, {"p": {"nodes": [{"id": "a", "addr": "127.0.0.1:1"}]}}]"#).unwrap_err();
        assert_eq!(
            e.to_string(),
            "config: invalid type: sequence, expected struct Config"
        );
        let e = Config::from_json(r#"{"pools": [{"nodes": []}]}"#).unwrap_err();
        assert_eq!(e.path, "pools");
    }

    #[test]
    fn whole_floats_are_integers_fractions_refused() {
        let c = Config::from_value(with("/pools/deepseek/nodes/1/weight", json!(5.0))).unwrap();
        assert_eq!(c.pools["deepseek"].nodes[1].weight, 5);
        let text = r#"{"shm":{"max_nodes":8.0},"pools":{"deepseek":{"slow_start_ms":0.0,
            "health":{"statuses":[200.0,204]},"nodes":[{"id":"a","addr":"127.0.0.1:1","weight":1e1}]}}}"#;
        let c = Config::from_json(text).unwrap();
        assert_eq!(c.shm.max_nodes, 8);
        assert_eq!(c.pools["deepseek"].slow_start_ms, 0);
        assert_eq!(c.pools["deepseek"].nodes[0].weight, 10);
        assert_eq!(
            c.pools["deepseek"].health.as_ref().unwrap().statuses,
            vec![200, 204]
        );
        assert_eq!(
            err(with("/pools/deepseek/nodes/1/weight", json!(5.5))),
            "pools.deepseek.nodes[1].weight: invalid type: floating point `5.5`, expected u32"
        );
        let e = Config::from_json(&text.replace("8.0", "8.25")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "shm.max_nodes: invalid type: floating point `8.25`, expected u32"
        );
        // Range checks still apply to the integer: 1e10 does not fit a u32, -1.0 is negative.
        let e = err(with("/pools/deepseek/refresh_ms", json!(1e10)));
        assert!(
            e.starts_with("pools.deepseek.refresh_ms: invalid value: integer `10000000000`"),
            "{e}"
        );
        let e = err(with("/pools/deepseek/nodes/0/weight", json!(-1.0)));
        assert!(
            e.starts_with("pools.deepseek.nodes[0].weight: invalid value: integer `-1`"),
            "{e}"
        );
        // Float fields still take fractions.
        let c = Config::from_value(with("/pools/deepseek/retry", json!({ "budget_ratio": 0.5 }))).unwrap();
        assert_eq!(c.pools["deepseek"].retry.budget_ratio, 0.5);
    }

    #[test]
    fn totals_above_shm_limits_refused() {
        let mut doc = with("/shm", json!({ "max_nodes": 3 }));
        doc["pools"]["other"] = doc["pools"]["deepseek"].clone();
        assert_eq!(
            err(doc.clone()),
            "shm.max_nodes: 3 is too small: the pools have 4 nodes in all"
        );
        doc["shm"] = json!({ "max_nodes": 4 });
        assert!(Config::from_value(doc.clone()).is_ok());
        doc["shm"] = json!({ "max_pools": 1 });
        assert_eq!(err(doc), "shm.max_pools: 1 is too small: the config has 2 pools");
    }

    #[test]
    fn json_syntax_errors_are_useful() {
        let text = "{\n  \"pools\": {\n    \"deepseek\": {\n      \"nodes\": [ { \"id\": \"a\" \"addr\": \"x:1\" } ]\n";
        let e = Config::from_json(text).unwrap_err();
        assert_eq!(e.path, "pools.deepseek.nodes[0]");
        assert_eq!(e.message, "expected `,` or `}` at line 4 column 30");

        let e = Config::from_json("").unwrap_err();
        assert_eq!(
            e.to_string(),
            "config: EOF while parsing a value at line 1 column 0"
        );

        let text = r#"{"pools":{"deepseek":{"nodes":[{"id":"a","addr":"127.0.0.1:1"}]}}} x"#;
        let e = Config::from_json(text).unwrap_err();
        assert_eq!(e.to_string(), "config: trailing characters at line 1 column 68");
    }

    #[test]
    fn from_file_reads_and_reports() {
        let dir = std::env::temp_dir().join(format!("rsbalancer-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.json");
        std::fs::write(&good, base().to_string()).unwrap();
        let c = Config::from_file(&good).unwrap();
        assert_eq!(c.pools["deepseek"].nodes.len(), 2);

        let missing = dir.join("missing.json");
        let e = Config::from_file(&missing).unwrap_err();
        assert_eq!(e.path, missing.display().to_string());
        assert!(e.message.starts_with("cannot read: "), "{e}");
        assert!(e.message.contains("No such file"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn serialize_round_trips() {
        let c = Config::from_value(base()).unwrap();
        let text = serde_json::to_string(&c).unwrap();
        assert!(!text.contains("resolved"), "{text}");
        assert_eq!(Config::from_json(&text).unwrap(), c);
    }

    #[test]
    fn host_is_as_written() {
        let node = |addr: &str| NodeConfig {
            id: "n".into(),
            addr: addr.into(),
            ..NodeConfig::default()
        };
        assert_eq!(node("gpu-1.internal:8000").host(), "gpu-1.internal");
        assert_eq!(node("[fd00::1]:443").host(), "[fd00::1]");
        assert_eq!(node("10.0.0.1:80").host(), "10.0.0.1");
        assert_eq!(node("nohost").host(), "nohost");
    }

    #[test]
    fn validate_fills_resolved_on_hand_built_config() {
        let mut c = Config::default();
        c.pools.insert(
            "p".into(),
            PoolConfig {
                nodes: vec![NodeConfig {
                    id: "a".into(),
                    addr: "127.0.0.1:9".into(),
                    ..NodeConfig::default()
                }],
                ..PoolConfig::default()
            },
        );
        c.validate().unwrap();
        assert_eq!(
            c.pools["p"].nodes[0].resolved,
            Some("127.0.0.1:9".parse().unwrap())
        );
    }
}
