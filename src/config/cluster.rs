//! The `cluster` section: several gateways sharing one view through Redis
//! (`crate::cluster`). Absent: every gateway is on its own, as before.
//!
//! ```json
//! "cluster": { "redis": "redis://10.0.0.5:6379/0", "password_env": "RSB_REDIS_PASSWORD",
//!              "prefix": "rsb:", "sync_ms": 100 }
//! "cluster": { "sentinels": ["10.0.0.5:26379", "10.0.0.6:26379"], "master": "mymaster" }
//! ```
//!
//! The password is named by an environment variable, never written in the file (the
//! same policy as a provider's API key); the URL may hold no password either.

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// Redis as the gateways' shared engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// A standalone Redis: `redis://host:port[/db]` (no user or password in it).
    pub redis: Option<String>,
    /// Sentinels (`host:port`) that know the master named `master`; instead of `redis`.
    pub sentinels: Vec<String>,
    /// The master's name at the sentinels.
    pub master: Option<String>,
    /// The database number with sentinels, 0..=15.
    pub db: u32,
    /// Environment variable holding Redis's password (AUTH); none when absent.
    pub password_env: Option<String>,
    /// Prefix of every key, 1..=64 bytes of `[A-Za-z0-9:._-]`.
    pub prefix: String,
    /// How often the gateway syncs with Redis, 10..=60000 ms.
    pub sync_ms: u32,
    /// Connect, read and write timeout of one Redis exchange, 5..=10000 ms.
    pub timeout_ms: u32,
    /// This gateway's name in the fleet (status, keys); default: the host name and
    /// nginx's master pid. 1..=64 bytes of `[A-Za-z0-9:._-]`.
    pub gateway: Option<String>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            redis: None,
            sentinels: Vec::new(),
            master: None,
            db: 0,
            password_env: None,
            prefix: "rsb:".into(),
            sync_ms: 100,
            timeout_ms: 200,
            gateway: None,
        }
    }
}

fn name_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b":._-".contains(&b))
}

impl ClusterConfig {
    /// Checks every field; errors name the field (`cluster.<field>`) and the value.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |f: &str, m: String| Err(ConfigError::new(format!("cluster.{f}"), m));
        match (&self.redis, self.sentinels.is_empty()) {
            (Some(_), false) => {
                return bad(
                    "sentinels",
                    "give either redis or sentinels (with master), not both".into(),
                )
            }
            (None, true) => return bad("redis", "missing: a redis URL or sentinels is required".into()),
            _ => {}
        }
        if let Some(url) = &self.redis {
            let Some(rest) = url.strip_prefix("redis://") else {
                return bad("redis", format!("{url:?} must start with redis://"));
            };
            if rest.contains('@') {
                return bad(
                    "redis",
                    "the URL must hold no user or password: name the password's variable in cluster.password_env".into(),
                );
            }
            let hostport = rest.split('/').next().unwrap_or("");
            if hostport.is_empty() || hostport.bytes().any(|b| b.is_ascii_whitespace()) {
                return bad("redis", format!("{url:?} has no host"));
            }
        }
        for s in &self.sentinels {
            if s.rsplit_once(':')
                .and_then(|(h, p)| (!h.is_empty()).then_some(p.parse::<u16>().ok())?)
                .is_none()
            {
                return bad("sentinels", format!("{s:?} is not host:port"));
            }
        }
        if !self.sentinels.is_empty() && self.master.as_deref().is_none_or(|m| !name_ok(m)) {
            return bad(
                "master",
                format!("{:?}: the master's name is required with sentinels", self.master),
            );
        }
        if self.db > 15 {
            return bad("db", format!("{} is out of range 0..=15", self.db));
        }
        if let Some(v) = &self.password_env {
            if v.is_empty() || !v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return bad(
                    "password_env",
                    format!("{v:?} is not an environment variable name"),
                );
            }
        }
        if !name_ok(&self.prefix) {
            return bad(
                "prefix",
                format!("{:?} must be 1..=64 bytes of [A-Za-z0-9:._-]", self.prefix),
            );
        }
        if !(10..=60_000).contains(&self.sync_ms) {
            return bad("sync_ms", format!("{} is out of range 10..=60000", self.sync_ms));
        }
        if !(5..=10_000).contains(&self.timeout_ms) {
            return bad(
                "timeout_ms",
                format!("{} is out of range 5..=10000", self.timeout_ms),
            );
        }
        if let Some(g) = &self.gateway {
            if !name_ok(g) {
                return bad(
                    "gateway",
                    format!("{g:?} must be 1..=64 bytes of [A-Za-z0-9:._-]"),
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(v: serde_json::Value) -> String {
        let c: ClusterConfig = serde_json::from_value(v).unwrap();
        let e = c.validate().unwrap_err();
        format!("{}: {}", e.path, e.message)
    }

    #[test]
    fn refusals_name_the_field() {
        assert!(err(serde_json::json!({})).starts_with("cluster.redis: missing"));
        assert!(err(serde_json::json!({"redis": "http://x"})).starts_with("cluster.redis: \"http://x\""));
        assert!(err(serde_json::json!({"redis": "redis://u:pw@x:6379"})).contains("no user or password"));
        assert!(
            err(serde_json::json!({"redis": "redis://x", "sentinels": ["a:1"]}))
                .starts_with("cluster.sentinels")
        );
        assert!(err(serde_json::json!({"sentinels": ["a"]})).starts_with("cluster.sentinels: \"a\""));
        assert!(err(serde_json::json!({"sentinels": ["a:26379"]})).starts_with("cluster.master"));
        assert!(
            err(serde_json::json!({"redis": "redis://x", "sync_ms": 5})).starts_with("cluster.sync_ms: 5")
        );
        assert!(err(serde_json::json!({"redis": "redis://x", "prefix": "a b"})).starts_with("cluster.prefix"));
        assert!(
            err(serde_json::json!({"redis": "redis://x", "password_env": "A-B"}))
                .starts_with("cluster.password_env")
        );
    }

    #[test]
    fn accepts_standalone_and_sentinels() {
        let c: ClusterConfig =
            serde_json::from_value(serde_json::json!({"redis": "redis://127.0.0.1:6379/2"})).unwrap();
        assert_eq!(c.validate(), Ok(()));
        assert_eq!((c.sync_ms, c.prefix.as_str()), (100, "rsb:"));
        let c: ClusterConfig = serde_json::from_value(
            serde_json::json!({"sentinels": ["127.0.0.1:26379"], "master": "m", "db": 1}),
        )
        .unwrap();
        assert_eq!(c.validate(), Ok(()));
    }
}
