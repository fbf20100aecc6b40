//! `pools.P.canary`: the canary split, its ramp and automatic rollback (the split
//! itself: `crate::canary`).

use super::*;

// ----------------------------------------------------------------------------------
// Canary split (`pools.P.canary`; the mechanics are in `crate::canary`)

/// `pools.P.canary`: send a share of P's requests to another pool, the canary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CanaryConfig {
    /// The canary pool: another pool of this config that has no canary itself and is
    /// the canary of no other pool.
    pub pool: String,
    /// Share of requests sent to the canary, 0.0..=1.0 (resolution 1/10,000); 0 by
    /// default (set it live, or let `ramp` raise it).
    #[serde(default)]
    pub share: f64,
    /// How a request's arm is chosen: "random" (default), "header:<Name>",
    /// "cookie:<name>" or "addr" (the client address).
    #[serde(default)]
    pub key: CanaryKey,
    /// Raise the share on a schedule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ramp: Option<RampConfig>,
    /// Drop the share to zero when the canary does worse than the primary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback: Option<RollbackConfig>,
}

/// What keeps a user on one arm: nothing (`Random`), or a request key whose hash
/// decides (a request without the key falls back to a random draw).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum CanaryKey {
    #[default]
    Random,
    /// A request header, by name (`X-User-Id`).
    Header(String),
    /// A cookie, by name.
    Cookie(String),
    /// The client address (`$binary_remote_addr`).
    Addr,
}

impl TryFrom<String> for CanaryKey {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        let named = |name: &str, extra: &[u8], what: &str| {
            if valid_name(name, extra) {
                Ok(name.to_string())
            } else {
                Err(format!(
                    "{s:?}: invalid {what} name {name:?}: must be 1..=64 bytes of [A-Za-z0-9{}]",
                    String::from_utf8_lossy(extra)
                ))
            }
        };
        match s.split_once(':') {
            None if s == "random" => Ok(CanaryKey::Random),
            None if s == "addr" => Ok(CanaryKey::Addr),
            Some(("header", name)) => named(name, b"_-", "header").map(CanaryKey::Header),
            Some(("cookie", name)) => named(name, b"._-", "cookie").map(CanaryKey::Cookie),
            _ => Err(format!(
                "{s:?} is not a canary key: expected \"random\", \"header:<Name>\", \"cookie:<name>\" or \"addr\""
            )),
        }
    }
}

impl From<CanaryKey> for String {
    fn from(k: CanaryKey) -> String {
        match k {
            CanaryKey::Random => "random".into(),
            CanaryKey::Header(n) => format!("header:{n}"),
            CanaryKey::Cookie(n) => format!("cookie:{n}"),
            CanaryKey::Addr => "addr".into(),
        }
    }
}

/// `pools.P.canary.ramp`: add `step` to the share every `every_s` seconds up to `max`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RampConfig {
    /// Share added at each step, 0.0001..=1.0.
    pub step: f64,
    /// Seconds between steps, 1..=31536000.
    pub every_s: u32,
    /// Where the ramp stops, share..=1.0 (default 1.0).
    #[serde(default = "default_ramp_max")]
    pub max: f64,
}

fn default_ramp_max() -> f64 {
    1.0
}

/// `pools.P.canary.rollback`: automatic rollback of a canary that does worse.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RollbackConfig {
    /// Roll back when the canary's success rate over the window is below the
    /// primary's minus this, 0.0..=1.0.
    pub margin: f64,
    /// ... and the canary arm made at least this many tries in it, 1..=100000000.
    pub min_requests: u32,
}

impl Default for RollbackConfig {
    fn default() -> Self {
        RollbackConfig {
            margin: 0.05,
            min_requests: 100,
        }
    }
}

impl CanaryConfig {
    /// Ranges; `path` is `pools.NAME.canary`.
    fn validate(&self, path: &str) -> Result<(), ConfigError> {
        check_ratio(path, "share", self.share, 1.0)?;
        if let Some(r) = &self.ramp {
            let rp = format!("{path}.ramp");
            if !(r.step.is_finite() && (0.0001..=1.0).contains(&r.step)) {
                return Err(ConfigError::new(
                    format!("{rp}.step"),
                    format!("{} is out of range 0.0001..=1", r.step),
                ));
            }
            check_range(&rp, "every_s", r.every_s, 1..=31_536_000)?;
            check_ratio(&rp, "max", r.max, 1.0)?;
            if r.max < self.share {
                return Err(ConfigError::new(
                    format!("{rp}.max"),
                    format!("{} is below the canary's share ({})", r.max, self.share),
                ));
            }
        }
        if let Some(rb) = &self.rollback {
            let rbp = format!("{path}.rollback");
            check_ratio(&rbp, "margin", rb.margin, 1.0)?;
            check_range(&rbp, "min_requests", rb.min_requests, 1..=100_000_000)?;
        }
        Ok(())
    }
}

/// Every canary block: its ranges, and that its pool exists, is not the pool itself,
/// has no canary of its own (no chains) and is the canary of one pool only (so its
/// outcomes, which rollback judges, come from one primary).
pub(super) fn validate_canaries(pools: &BTreeMap<String, PoolConfig>) -> Result<(), ConfigError> {
    let mut canary_of: BTreeMap<&str, &str> = BTreeMap::new();
    for (name, pool) in pools {
        let Some(c) = &pool.canary else { continue };
        let path = format!("pools.{name}.canary");
        c.validate(&path)?;
        let refuse = |message: String| Err(ConfigError::new(format!("{path}.pool"), message));
        if c.pool == *name {
            return refuse(format!("{:?} is this pool itself", c.pool));
        }
        let Some(target) = pools.get(&c.pool) else {
            return refuse(format!("{:?}: no pool of that name", c.pool));
        };
        if let Some(tc) = &target.canary {
            return refuse(format!(
                "{:?} has a canary itself ({:?}): canaries do not chain",
                c.pool, tc.pool
            ));
        }
        if let Some(other) = canary_of.insert(c.pool.as_str(), name.as_str()) {
            return refuse(format!("{:?} is already the canary of pool {other:?}", c.pool));
        }
    }
    Ok(())
}
