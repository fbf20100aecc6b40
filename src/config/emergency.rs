//! `pools.P.emergency`: the overload detector's thresholds, the backup pool and the
//! alert webhooks (the detector itself: `crate::emergency`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{check_range, check_ratio, ConfigError, PoolConfig};

/// A pool's `emergency` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmergencyConfig {
    /// Busy ratio at which the pool enters emergency, 0..=1 (exclusive of 0).
    pub enter_busy_ratio: f64,
    /// Busy ratio below which it may leave, 0..=1 and below `enter_busy_ratio`.
    pub exit_busy_ratio: f64,
    /// Requests the window must hold before it is judged, 1..=1000000.
    pub min_requests: u32,
    /// In emergency, requests of a priority below this are shed, 1..=11 (1: none).
    pub shed_below: u32,
    /// The pool brought in during emergency (must exist, not this pool).
    pub backup_pool: Option<String>,
    /// How long the ratio must stay below `exit_busy_ratio` before the pool leaves,
    /// 1000..=86400000 ms; default the pool's `window_ms`.
    pub healthy_window_ms: Option<u32>,
    /// Where alerts are POSTed (JSON).
    pub webhooks: Vec<WebhookConfig>,
}

impl Default for EmergencyConfig {
    fn default() -> Self {
        EmergencyConfig {
            enter_busy_ratio: 0.3,
            exit_busy_ratio: 0.1,
            min_requests: 20,
            shed_below: 1,
            backup_pool: None,
            healthy_window_ms: None,
            webhooks: Vec::new(),
        }
    }
}

/// One alert receiver.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookConfig {
    /// `http://host[:port][/path]` (plain HTTP: alerts go to a local relay or an
    /// internal receiver).
    pub url: String,
    /// Per attempt: connect, send and read the status line, 10..=600000 ms.
    pub timeout_ms: u32,
    /// Attempts after the first, with exponential backoff, 0..=20.
    pub retries: u32,
    /// Rate limit: at least this long between two deliveries to this receiver from one
    /// worker, 0..=3600000 ms. Alerts are delayed, never dropped.
    pub min_interval_ms: u32,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            url: String::new(),
            timeout_ms: 2_000,
            retries: 3,
            min_interval_ms: 1_000,
        }
    }
}

impl EmergencyConfig {
    /// `path` is `pools.NAME.emergency`; `pool` the pool's name; `pools` all pools.
    pub(crate) fn validate(
        &self,
        path: &str,
        pool: &str,
        window_ms: u32,
        pools: &BTreeMap<String, PoolConfig>,
    ) -> Result<(), ConfigError> {
        check_ratio(path, "enter_busy_ratio", self.enter_busy_ratio, 1.0)?;
        if self.enter_busy_ratio == 0.0 {
            return Err(ConfigError::new(
                format!("{path}.enter_busy_ratio"),
                "0 must be above 0 (the pool would always be in emergency)",
            ));
        }
        check_ratio(path, "exit_busy_ratio", self.exit_busy_ratio, 1.0)?;
        if self.exit_busy_ratio >= self.enter_busy_ratio {
            return Err(ConfigError::new(
                format!("{path}.exit_busy_ratio"),
                format!(
                    "{} must be below enter_busy_ratio ({})",
                    self.exit_busy_ratio, self.enter_busy_ratio
                ),
            ));
        }
        check_range(path, "min_requests", self.min_requests, 1..=1_000_000)?;
        check_range(path, "shed_below", self.shed_below, 1..=11)?;
        check_range(
            path,
            "healthy_window_ms",
            self.healthy_window_ms.unwrap_or(window_ms),
            1_000..=86_400_000,
        )?;
        if let Some(b) = &self.backup_pool {
            let field = format!("{path}.backup_pool");
            if b == pool {
                return Err(ConfigError::new(field, format!("{b:?} is this pool itself")));
            }
            if !pools.contains_key(b) {
                return Err(ConfigError::new(
                    field,
                    format!("{b:?} is not a pool of this config"),
                ));
            }
        }
        for (i, w) in self.webhooks.iter().enumerate() {
            let wp = format!("{path}.webhooks[{i}]");
            parse_url(&w.url).map_err(|m| ConfigError::new(format!("{wp}.url"), m))?;
            check_range(&wp, "timeout_ms", w.timeout_ms, 10..=600_000)?;
            check_range(&wp, "retries", w.retries, 0..=20)?;
            check_range(&wp, "min_interval_ms", w.min_interval_ms, 0..=3_600_000)?;
        }
        Ok(())
    }
}

/// Host, port and path of an `http://host[:port][/path]` URL; the message names it.
pub fn parse_url(url: &str) -> Result<(String, u16, String), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url:?} must start with http:// (https is not supported)"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if path
        .bytes()
        .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err(format!("{url:?}: the path contains spaces or control characters"));
    }
    let (host, port) = if authority.starts_with('[') {
        // [v6] or [v6]:port
        let end = authority.find(']').map_or(authority.len(), |i| i + 1);
        (&authority[..end], authority[end..].strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let port = match port {
        None => 80,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| format!("{url:?}: invalid port {p:?}"))?,
    };
    let ok = |b: u8| b.is_ascii_alphanumeric() || b"-._[]:".contains(&b);
    if host.is_empty() || !host.bytes().all(ok) {
        return Err(format!("{url:?}: invalid host {host:?}"));
    }
    Ok((host.to_string(), port, path.to_string()))
}
