//! `pools.P.scrape`: scraping self-hosted nodes' Prometheus `/metrics` for their queue
//! depth (vLLM, SGLang). Off when absent. What is done with the figures:
//! [`crate::scrape`]; the timer that fetches them: `resty.rsbalancer.scrape`.

use serde::{Deserialize, Serialize};

use super::{check_range, ConfigError};

/// Which metric names a scrape reads (see [`crate::scrape`] for the names).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScrapeKind {
    /// `vllm:*` names.
    Vllm,
    /// `sglang:*` names.
    Sglang,
    /// Either family, whichever the node exposes.
    #[default]
    Auto,
}

/// A pool's `scrape` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScrapeConfig {
    pub kind: ScrapeKind,
    /// Request path, starting with "/".
    pub path: String,
    /// Port of the metrics endpoint when it is not the node's (default: the node's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u32>,
    /// How often each node is scraped, 100..=60000 ms. Figures older than three
    /// intervals are ignored (and flagged stale).
    pub scrape_ms: u32,
    /// Connect, send and read the whole response, 10..=60000 ms.
    pub timeout_ms: u32,
    /// Longest response body read, 1024..=1048576 bytes; a longer one fails the scrape.
    pub max_bytes: u32,
}

impl Default for ScrapeConfig {
    fn default() -> Self {
        ScrapeConfig {
            kind: ScrapeKind::Auto,
            path: "/metrics".into(),
            port: None,
            scrape_ms: 1_000,
            timeout_ms: 1_000,
            max_bytes: 1 << 20,
        }
    }
}

impl ScrapeConfig {
    /// Figures older than this are ignored: three intervals.
    pub fn fresh_ms(&self) -> u32 {
        self.scrape_ms.saturating_mul(3)
    }

    /// `path` is `pools.NAME.scrape`.
    pub(crate) fn validate(&self, path: &str) -> Result<(), ConfigError> {
        if !self.path.starts_with('/')
            || self
                .path
                .bytes()
                .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        {
            return Err(ConfigError::new(
                format!("{path}.path"),
                format!("{:?} must start with \"/\" and contain no spaces", self.path),
            ));
        }
        if let Some(port) = self.port {
            check_range(path, "port", port, 1..=65_535)?;
        }
        check_range(path, "scrape_ms", self.scrape_ms, 100..=60_000)?;
        check_range(path, "timeout_ms", self.timeout_ms, 10..=60_000)?;
        check_range(path, "max_bytes", self.max_bytes, 1_024..=1 << 20)
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use serde_json::json;

    fn with(scrape: serde_json::Value) -> Result<Config, crate::config::ConfigError> {
        Config::from_value(json!({ "pools": { "llm": {
            "nodes": [{ "id": "a", "addr": "127.0.0.1:1" }],
            "scrape": scrape,
        } } }))
    }

    #[test]
    fn defaults_and_kinds() {
        let c = with(json!({})).unwrap();
        let s = c.pools["llm"].scrape.as_ref().unwrap();
        assert_eq!(
            (s.scrape_ms, s.fresh_ms(), s.path.as_str()),
            (1000, 3000, "/metrics")
        );
        assert_eq!(s.kind, super::ScrapeKind::Auto);
        let c = with(json!({ "kind": "sglang", "port": 30001, "scrape_ms": 250 })).unwrap();
        let s = c.pools["llm"].scrape.as_ref().unwrap();
        assert_eq!(
            (s.kind, s.port, s.fresh_ms()),
            (super::ScrapeKind::Sglang, Some(30001), 750)
        );
        assert!(Config::from_value(json!({ "pools": { "llm": {
            "nodes": [{ "id": "a", "addr": "127.0.0.1:1" }] } } }))
        .unwrap()
        .pools["llm"]
            .scrape
            .is_none());
    }

    #[test]
    fn bad_values_name_the_field_and_the_value() {
        for (v, field, says) in [
            (json!({ "scrape_ms": 50 }), "scrape_ms", "50"),
            (json!({ "timeout_ms": 0 }), "timeout_ms", "0"),
            (json!({ "max_bytes": 2_000_000 }), "max_bytes", "2000000"),
            (json!({ "port": 70000 }), "port", "70000"),
            (json!({ "path": "metrics" }), "path", "metrics"),
            (json!({ "path": "/m x" }), "path", "/m x"),
        ] {
            let e = with(v.clone()).unwrap_err();
            assert_eq!(e.path, format!("pools.llm.scrape.{field}"), "{v}");
            assert!(e.to_string().contains(says), "{v}: {e}");
        }
        let e = with(json!({ "kind": "tgi" })).unwrap_err();
        assert!(e.to_string().contains("tgi"), "{e}");
        let e = with(json!({ "interval_ms": 10 })).unwrap_err();
        assert!(
            e.to_string().contains("interval_ms"),
            "unknown keys are errors: {e}"
        );
    }
}
