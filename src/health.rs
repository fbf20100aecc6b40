//! Active health checks: when consecutive probe results flip a node down or back up
//! (`health.healthy` passes bring a down node back, `health.unhealthy` failures take
//! it down). Pure functions; the pool applies them to the shared node slots, and the
//! Lua timers (`resty.rsbalancer.health`) run the probes.

/// Result of one active probe on the health counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flip {
    None,
    /// The node just became healthy (back in slow start).
    Up,
    /// The node just went down.
    Down,
}

/// Apply a probe result: `ok`/`fail` are the consecutive counts after this probe.
pub fn health_flip(down: bool, passed: bool, ok: u32, fail: u32, healthy: u32, unhealthy: u32) -> Flip {
    match (down, passed) {
        (true, true) if ok >= healthy => Flip::Up,
        (false, false) if fail >= unhealthy => Flip::Down,
        _ => Flip::None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_thresholds() {
        assert_eq!(health_flip(false, false, 0, 2, 2, 3), Flip::None);
        assert_eq!(health_flip(false, false, 0, 3, 2, 3), Flip::Down);
        assert_eq!(health_flip(true, false, 0, 9, 2, 3), Flip::None);
        assert_eq!(health_flip(true, true, 1, 0, 2, 3), Flip::None);
        assert_eq!(health_flip(true, true, 2, 0, 2, 3), Flip::Up);
        assert_eq!(health_flip(false, true, 5, 0, 2, 3), Flip::None);
    }
}
