//! A pool's policy sections checked: statuses, retry, cooldown, limit, tokens,
//! outlier ejection and health checks (every range and its message).

use super::*;

impl PoolConfig {
    pub(super) fn validate_policies(&self, path: &str) -> Result<(), ConfigError> {
        if self.no_node_status != 429 && self.no_node_status != 503 {
            return Err(ConfigError::new(
                format!("{path}.no_node_status"),
                format!("{} must be 429 or 503", self.no_node_status),
            ));
        }
        let r = &self.retry;
        let rp = format!("{path}.retry");
        check_ratio(&rp, "budget_ratio", r.budget_ratio, 1.0)?;
        check_range(&rp, "min_per_s", r.min_per_s, 0..=10_000)?;
        check_range(&rp, "window_ms", r.window_ms, 1_000..=60_000)?;
        check_range(&rp, "max_tries", r.max_tries, 1..=16)?;
        check_range(&rp, "deadline_ms", r.deadline_ms, 1..=3_600_000)?;
        check_range(&rp, "rounds", r.rounds, 0..=MAX_ROUNDS)?;
        let c = &self.cooldown;
        let cp = format!("{path}.cooldown");
        check_range(&cp, "base_ms", c.base_ms, 1..=3_600_000)?;
        check_range(&cp, "max_ms", c.max_ms, c.base_ms..=86_400_000)?;
        check_range(&cp, "quota_retry_after_ms", c.quota_retry_after_ms, 0..=3_600_000)?;
        check_range(
            &cp,
            "max_retry_after_ms",
            c.max_retry_after_ms,
            1_000..=crate::headers::RETRY_AFTER_MAX_MS,
        )?;
        check_range(&cp, "quota_after", c.quota_after, 1..=1_000)?;
        let l = &self.limit;
        let lp = format!("{path}.limit");
        check_range(&lp, "min", l.min, 1..=100_000)?;
        check_range(&lp, "max", l.max, l.min..=100_000)?;
        check_range(&lp, "increase_every", l.increase_every, 1..=1_000)?;
        if let Some(f) = l.slow_factor.filter(|&f| f != 0.0 && !(1.5..=100.0).contains(&f)) {
            return Err(ConfigError::new(
                format!("{lp}.slow_factor"),
                format!("{f} is out of range: 0 (off) or 1.5..=100"),
            ));
        }
        let tp = format!("{path}.tokens");
        let t = &self.tokens;
        check_range(
            &tp,
            "default_max_tokens",
            t.default_max_tokens,
            0..=crate::ask::MAX_TOKENS,
        )?;
        check_range(&tp, "max_estimate", t.max_estimate, 1..=crate::ask::MAX_TOKENS)?;
        let pp = format!("{path}.prefix");
        let x = &self.prefix;
        check_range(
            &pp,
            "max_bytes",
            x.max_bytes,
            64..=crate::prefix::MAX_PREFIX_BYTES,
        )?;
        check_range(&pp, "min_bytes", x.min_bytes, 1..=x.max_bytes)?;
        if !(1.0..=100.0).contains(&x.load_factor) {
            return Err(ConfigError::new(
                format!("{pp}.load_factor"),
                format!("{} is out of range 1.0..=100", x.load_factor),
            ));
        }
        let o = &self.outlier;
        let op = format!("{path}.outlier");
        check_range(&op, "consecutive_failures", o.consecutive_failures, 0..=1_000)?;
        check_range(&op, "base_ms", o.base_ms, 1..=3_600_000)?;
        check_range(&op, "max_ms", o.max_ms, o.base_ms..=86_400_000)?;
        check_range(&op, "max_ejected_percent", o.max_ejected_percent, 0..=100)?;
        if let Some(h) = &self.health {
            let hp = format!("{path}.health");
            if !h.path.starts_with('/')
                || h.path
                    .bytes()
                    .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
            {
                return Err(ConfigError::new(
                    format!("{hp}.path"),
                    format!("{:?} must start with \"/\" and contain no spaces", h.path),
                ));
            }
            if let Some(host) = &h.host {
                check_host_header(&format!("{hp}.host"), host)?;
            }
            if h.statuses.is_empty() || h.statuses.iter().any(|s| !(100..=599).contains(s)) {
                return Err(ConfigError::new(
                    format!("{hp}.statuses"),
                    format!("{:?} must be a non-empty list of statuses 100..=599", h.statuses),
                ));
            }
            check_range(&hp, "interval_ms", h.interval_ms, 100..=3_600_000)?;
            check_range(&hp, "timeout_ms", h.timeout_ms, 10..=600_000)?;
            check_range(&hp, "healthy", h.healthy, 1..=100)?;
            check_range(&hp, "unhealthy", h.unhealthy, 1..=100)?;
        }
        Ok(())
    }
}
