//! A pool's `discovery.consul` section: the pool's nodes are the instances of a Consul
//! service that pass their health checks (`crate::discovery::consul`).
//!
//! ```json
//! "discovery": { "consul": {
//!     "address": "127.0.0.1:8500", "service": "deepseek-api", "tags": ["v1.2"],
//!     "datacenter": "dc1", "token_env": "CONSUL_HTTP_TOKEN", "weight_meta": "weight" } }
//! ```
//!
//! The ACL token is named by an environment variable, never written in the file (the
//! same policy as a provider's API key and Redis's password); the worker that runs the
//! queries reads it, so nginx.conf needs `env CONSUL_HTTP_TOKEN;`.

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// Where and what to ask Consul for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsulDiscovery {
    /// The local Consul agent's HTTP API, `host:port` (plain HTTP).
    pub address: String,
    /// The service name: 1..=128 bytes of `[A-Za-z0-9._-]`.
    pub service: String,
    /// Only instances carrying every one of these tags (at most 16, each 1..=128
    /// printable ASCII bytes).
    pub tags: Vec<String>,
    /// The datacenter to ask (`dc=`); the agent's own when absent.
    pub datacenter: Option<String>,
    /// Environment variable holding the ACL token (`X-Consul-Token`); none when absent.
    pub token_env: Option<String>,
    /// The service meta key holding an instance's weight (also read from a tag
    /// `<weight_meta>=N`), 1..=128 bytes of `[A-Za-z0-9_-]`.
    pub weight_meta: String,
    /// How long one blocking query may wait for a change, 1..=600 s.
    pub wait_s: u32,
    /// Connect and write timeout of a query, and how long past `wait_s` (plus
    /// Consul's jitter of wait/16) an answer may take, 100..=60000 ms.
    pub timeout_ms: u32,
    /// When answers come faster than this, the loop slows to one query per this
    /// interval (a token bucket holding 2: a burst of changes still comes through
    /// at once), 0..=60000 ms; 0 turns the limit off.
    pub min_interval_ms: u32,
}

impl Default for ConsulDiscovery {
    fn default() -> Self {
        ConsulDiscovery {
            address: "127.0.0.1:8500".into(),
            service: String::new(),
            tags: Vec::new(),
            datacenter: None,
            token_env: None,
            weight_meta: "weight".into(),
            wait_s: 30,
            timeout_ms: 2_000,
            min_interval_ms: 1_000,
        }
    }
}

fn name_ok(s: &str, max: usize, extra: &[u8]) -> bool {
    !s.is_empty() && s.len() <= max && s.bytes().all(|b| b.is_ascii_alphanumeric() || extra.contains(&b))
}

/// Most tags a filter may name.
pub const MAX_TAGS: usize = 16;

impl ConsulDiscovery {
    /// Checks every field; errors name the field (`<path>.<field>`) and the value.
    pub fn validate(&self, path: &str) -> Result<(), ConfigError> {
        let bad = |f: &str, m: String| Err(ConfigError::new(format!("{path}.{f}"), m));
        let host_ok = self.address.rsplit_once(':').is_some_and(|(h, p)| {
            let h = h.strip_prefix('[').and_then(|v| v.strip_suffix(']')).unwrap_or(h);
            name_ok(h, 253, b".-:") && matches!(p.parse::<u16>(), Ok(1..))
        });
        if !host_ok {
            return bad(
                "address",
                format!(
                    "{:?} is not host:port (a name, IPv4 or [IPv6] address; port 1..=65535)",
                    self.address
                ),
            );
        }
        if !name_ok(&self.service, 128, b"._-") {
            return bad(
                "service",
                format!("{:?} must be 1..=128 bytes of [A-Za-z0-9._-]", self.service),
            );
        }
        if self.tags.len() > MAX_TAGS {
            return bad("tags", format!("{} tags: at most {MAX_TAGS}", self.tags.len()));
        }
        for t in &self.tags {
            if t.is_empty() || t.len() > 128 || !t.bytes().all(|b| b.is_ascii_graphic()) {
                return bad("tags", format!("{t:?} must be 1..=128 printable ASCII bytes"));
            }
        }
        if let Some(dc) = &self.datacenter {
            if !name_ok(dc, 64, b"._-") {
                return bad(
                    "datacenter",
                    format!("{dc:?} must be 1..=64 bytes of [A-Za-z0-9._-]"),
                );
            }
        }
        if let Some(v) = &self.token_env {
            if !name_ok(v, 128, b"_") || v.as_bytes()[0].is_ascii_digit() {
                return bad("token_env", format!("{v:?} is not an environment variable name"));
            }
        }
        if !name_ok(&self.weight_meta, 128, b"_-") {
            return bad(
                "weight_meta",
                format!("{:?} must be 1..=128 bytes of [A-Za-z0-9_-]", self.weight_meta),
            );
        }
        super::check_range(path, "wait_s", self.wait_s, 1..=600)?;
        super::check_range(path, "timeout_ms", self.timeout_ms, 100..=60_000)?;
        super::check_range(path, "min_interval_ms", self.min_interval_ms, 0..=60_000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err(v: serde_json::Value) -> String {
        let c: ConsulDiscovery = serde_json::from_value(v).unwrap();
        c.validate("pools.p.discovery.consul").unwrap_err().to_string()
    }

    #[test]
    fn defaults_and_a_full_section() {
        let c: ConsulDiscovery = serde_json::from_value(json!({"service": "deepseek-api"})).unwrap();
        assert_eq!(c.validate("x"), Ok(()));
        assert_eq!(
            (c.address.as_str(), c.wait_s, c.weight_meta.as_str()),
            ("127.0.0.1:8500", 30, "weight")
        );
        let c: ConsulDiscovery = serde_json::from_value(json!({
            "address": "[::1]:8500", "service": "a.b-c_d", "tags": ["v1.2", "weight=3"],
            "datacenter": "dc-2", "token_env": "CONSUL_HTTP_TOKEN", "weight_meta": "w_1",
            "wait_s": 600, "timeout_ms": 100, "min_interval_ms": 0
        }))
        .unwrap();
        assert_eq!(c.validate("x"), Ok(()));
        assert!(serde_json::from_value::<ConsulDiscovery>(json!({"service": "a", "wait": 1})).is_err());
    }

    #[test]
    fn refusals_name_the_field_and_value() {
        let p = "pools.p.discovery.consul";
        assert_eq!(
            err(json!({})),
            format!("{p}.service: \"\" must be 1..=128 bytes of [A-Za-z0-9._-]")
        );
        assert!(err(json!({"service": "a/b"})).starts_with(&format!("{p}.service: \"a/b\"")));
        assert!(err(json!({"service": "a", "address": "consul"}))
            .starts_with(&format!("{p}.address: \"consul\"")));
        assert!(err(json!({"service": "a", "address": "h:0"})).starts_with(&format!("{p}.address")));
        assert!(err(json!({"service": "a", "address": "a b:1"})).starts_with(&format!("{p}.address")));
        assert!(err(json!({"service": "a", "tags": ["a b"]})).starts_with(&format!("{p}.tags: \"a b\"")));
        assert!(err(json!({"service": "a", "tags": [""]})).starts_with(&format!("{p}.tags")));
        let many: Vec<String> = (0..17).map(|i| format!("t{i}")).collect();
        assert!(err(json!({"service": "a", "tags": many})).starts_with(&format!("{p}.tags: 17 tags")));
        assert!(err(json!({"service": "a", "datacenter": "d c"})).starts_with(&format!("{p}.datacenter")));
        assert!(
            err(json!({"service": "a", "token_env": "1X"})).starts_with(&format!("{p}.token_env: \"1X\""))
        );
        assert!(err(json!({"service": "a", "weight_meta": "a.b"})).starts_with(&format!("{p}.weight_meta")));
        assert_eq!(
            err(json!({"service": "a", "wait_s": 0})),
            format!("{p}.wait_s: 0 is out of range 1..=600")
        );
        assert!(err(json!({"service": "a", "timeout_ms": 99})).starts_with(&format!("{p}.timeout_ms: 99")));
        assert!(err(json!({"service": "a", "min_interval_ms": 60001}))
            .starts_with(&format!("{p}.min_interval_ms")));
    }
}
