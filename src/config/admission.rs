//! `pools.P.admission`: priority classes and the admission queue's bounds (the queue
//! itself: `crate::admission`).

use serde::{Deserialize, Serialize};

use super::{check_range, ConfigError};
use crate::abi::PRIORITY_RANGE;
use crate::shm::layout::PRIORITIES;

/// `pools.P.admission`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdmissionConfig {
    /// Queue requests when the pool is at capacity (else: answer at once, as without).
    /// On by default: a request that finds every node at its learned limit waits for
    /// a slot instead of being turned away (and a busy round waits here too).
    pub enabled: bool,
    /// Priority of a request that names none, 1..=10.
    pub default_priority: u32,
    /// Highest priority an untrusted value (a client header) may claim, 1..=10.
    pub untrusted_max: u32,
    /// A waiter gains one priority level per `aging_ms` waited, 0..=3600000 (0: off).
    pub aging_ms: u32,
    /// Waiters of the pool at once, all classes, 1..=`shm.queue_slots`.
    pub max_queue: u32,
    /// Classes by ascending `min_priority`; the first starts at 1.
    pub classes: Vec<ClassConfig>,
}

/// One priority class: priorities `min_priority` up to the next class's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassConfig {
    pub min_priority: u32,
    /// Longest wait in the queue, 1..=600000 ms; then 429.
    pub max_wait_ms: u32,
    /// Waiters of this class at once, 1..=`max_queue`.
    pub max_queue: u32,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        AdmissionConfig {
            enabled: true,
            default_priority: 5,
            untrusted_max: 5,
            aging_ms: 5_000,
            max_queue: 128,
            classes: vec![ClassConfig {
                min_priority: 1,
                max_wait_ms: 10_000,
                max_queue: 128,
            }],
        }
    }
}

impl AdmissionConfig {
    /// `path` is `pools.NAME.admission`.
    pub fn validate(&self, path: &str, queue_slots: u32) -> Result<(), ConfigError> {
        check_range(path, "default_priority", self.default_priority, PRIORITY_RANGE)?;
        check_range(path, "untrusted_max", self.untrusted_max, PRIORITY_RANGE)?;
        check_range(path, "aging_ms", self.aging_ms, 0..=3_600_000)?;
        check_range(path, "max_queue", self.max_queue, 1..=queue_slots)
            .map_err(|e| ConfigError::new(e.path, format!("{} (shm.queue_slots)", e.message)))?;
        if self.classes.is_empty() || self.classes.len() > PRIORITIES {
            return Err(ConfigError::new(
                format!("{path}.classes"),
                format!("{} classes: 1..=10 expected", self.classes.len()),
            ));
        }
        let mut prev = 0;
        for (i, c) in self.classes.iter().enumerate() {
            let cp = format!("{path}.classes[{i}]");
            check_range(&cp, "min_priority", c.min_priority, PRIORITY_RANGE)?;
            if (i == 0 && c.min_priority != 1) || (i > 0 && c.min_priority <= prev) {
                return Err(ConfigError::new(
                    format!("{cp}.min_priority"),
                    format!(
                        "{}: the first class must start at 1 and each next one above the previous ({prev})",
                        c.min_priority
                    ),
                ));
            }
            prev = c.min_priority;
            check_range(&cp, "max_wait_ms", c.max_wait_ms, 1..=600_000)?;
            check_range(&cp, "max_queue", c.max_queue, 1..=self.max_queue)?;
        }
        Ok(())
    }

    /// Index of the class of priority `p` (1..=10).
    pub fn class_of(&self, p: u32) -> usize {
        self.classes
            .iter()
            .rposition(|c| c.min_priority <= p)
            .unwrap_or(0)
    }
}

/// An enabled admission config with `classes` as (min_priority, max_wait_ms,
/// max_queue): for the unit tests of the config and of the queue.
#[cfg(test)]
pub(crate) fn cfg(aging_ms: u32, max_queue: u32, classes: &[(u32, u32, u32)]) -> AdmissionConfig {
    AdmissionConfig {
        enabled: true,
        aging_ms,
        max_queue,
        classes: classes
            .iter()
            .map(|&(min_priority, max_wait_ms, max_queue)| ClassConfig {
                min_priority,
                max_wait_ms,
                max_queue,
            })
            .collect(),
        ..AdmissionConfig::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_errors_name_the_field() {
        let bad = |c: AdmissionConfig| c.validate("pools.p.admission", 256).unwrap_err().to_string();
        let c = AdmissionConfig {
            default_priority: 11,
            ..AdmissionConfig::default()
        };
        assert_eq!(
            bad(c),
            "pools.p.admission.default_priority: 11 is out of range 1..=10"
        );
        let c = AdmissionConfig {
            max_queue: 300,
            ..AdmissionConfig::default()
        };
        assert!(bad(c).starts_with("pools.p.admission.max_queue: 300 is out of range 1..=256"));
        let c = cfg(0, 8, &[(2, 100, 8)]);
        assert!(bad(c).starts_with("pools.p.admission.classes[0].min_priority: 2"));
        let c = cfg(0, 8, &[(1, 100, 8), (1, 100, 8)]);
        assert!(bad(c).starts_with("pools.p.admission.classes[1].min_priority: 1"));
        let c = cfg(0, 8, &[(1, 100, 9)]);
        assert_eq!(
            bad(c),
            "pools.p.admission.classes[0].max_queue: 9 is out of range 1..=8"
        );
        let c = cfg(0, 8, &[]);
        assert_eq!(bad(c), "pools.p.admission.classes: 0 classes: 1..=10 expected");
    }
}
