//! The threads of the worker holding the discovery lease: one per discovery pool,
//! each asking its [`Source`] and applying the answers (the design: the module
//! documentation of `crate::discovery`).
//!
//! [`Runner::tick`] is called by a Lua timer every second in every worker: it takes or
//! renews the lease, starts a thread for each discovery pool of the running topology
//! (again when the pool's `discovery` section changed, or its thread ended), stops the
//! threads of pools that left, and hands back the log lines the threads wrote. A worker
//! that loses the lease, or belongs to an nginx generation a reload replaced, stops its
//! threads: each checks the lease between two waits of at most 100 ms.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::balancer::Balancer;
use crate::config::{DiscoveryConfig, NodeConfig};
use crate::topology::PoolTopo;

/// How long the lease lasts without renewal (ms): five ticks of the Lua timer.
pub const LEASE_MS: u64 = 5_000;
/// Most log lines kept between two ticks (the rest are counted, not kept).
const MAX_LINES: usize = 64;
/// Longest wait after failures (s).
const MAX_BACKOFF_S: u64 = 30;

/// One answer of a source.
#[derive(Debug, Clone, Default)]
pub struct Answer {
    /// The nodes found (resolved; `crate::discovery::found` builds them).
    pub nodes: Vec<NodeConfig>,
    /// When to ask again (a DNS answer's TTL; zero for a source whose query itself
    /// waits for a change, such as Consul's blocking queries).
    pub next: Duration,
}

/// A discovery source. Runs on a thread of the lease holder: it may block, within its
/// own timeouts, and should return within a few seconds of `stop` being set (a
/// blocking query should wait at most a few seconds at a time, or poll `stop`).
pub trait Source: Send {
    /// The `source` label of the metrics and log lines.
    fn name(&self) -> &'static str;
    /// Ask once; `pool` is the pool as running now. `Err` carries a short reason
    /// (it is shown in the status, cut to 48 bytes).
    fn query(&mut self, pool: &PoolTopo, stop: &AtomicBool) -> Result<Answer, String>;
    /// The wait after a first failure (doubled after each further one, at most 30 s).
    fn retry_after(&self) -> Duration {
        Duration::from_secs(1)
    }
}

/// The source of a pool's `discovery` section, or `None` when it names none that
/// this build knows.
pub fn source_for(pool: &str, d: &DiscoveryConfig) -> Option<Box<dyn Source>> {
    let _ = pool;
    if let Some(dns) = &d.dns {
        return Some(Box::new(super::dns::DnsSource::new(dns.clone())));
    }
    if let Some(c) = &d.consul {
        return Some(Box::new(super::consul::ConsulSource::new(c.clone())));
    }
    None
}

/// The wait after `failing` consecutive failures: `base` doubled each time, at most
/// 30 s.
pub fn backoff(base: Duration, failing: u32) -> Duration {
    let factor = 1u32 << failing.saturating_sub(1).min(5);
    (base.max(Duration::from_millis(500)) * factor).min(Duration::from_secs(MAX_BACKOFF_S))
}

struct Thread {
    /// The pool's `discovery` section as JSON, when the thread started.
    fingerprint: String,
    stop: Arc<AtomicBool>,
    handle: JoinHandle<()>,
}

/// This process's discovery threads (they run only while it holds the lease).
#[derive(Default)]
pub struct Runner {
    threads: HashMap<String, Thread>,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Runner {
    /// Take or renew the lease and keep one thread per discovery pool (see the module
    /// documentation); returns the log lines written since the last tick.
    pub fn tick(&mut self, b: &Arc<Balancer>) -> Vec<String> {
        let Ok(topo) = b.topology() else {
            return self.take_lines();
        };
        let wanted: Vec<&PoolTopo> = topo
            .pools
            .iter()
            .filter(|p| p.policy.discovery.is_some())
            .collect();
        if b.superseded() {
            // A reload's new workers take over at once: a lease of 0 ms has ended.
            if b.holds_discovery_lease() {
                b.discovery_lease(0);
            }
            self.stop_all();
            return self.take_lines();
        }
        if wanted.is_empty() || !b.discovery_lease(LEASE_MS) {
            self.stop_all();
            return self.take_lines();
        }
        self.threads.retain(|name, t| {
            let keep = !t.handle.is_finished() && wanted.iter().any(|p| &p.name == name);
            if !keep {
                t.stop.store(true, Ordering::Relaxed);
            }
            keep
        });
        for p in wanted {
            let d = p.policy.discovery.as_ref().expect("filtered");
            let fingerprint = serde_json::to_string(d).unwrap_or_default();
            if self
                .threads
                .get(&p.name)
                .is_some_and(|t| t.fingerprint == fingerprint)
            {
                continue;
            }
            if let Some(old) = self.threads.remove(&p.name) {
                old.stop.store(true, Ordering::Relaxed);
            }
            let Some(source) = source_for(&p.name, d) else {
                continue;
            };
            let stop = Arc::new(AtomicBool::new(false));
            let (b2, s2, lines, pool) = (b.clone(), stop.clone(), self.lines.clone(), p.name.clone());
            match std::thread::Builder::new()
                .name("rsb-discovery".into())
                .spawn(move || run(&b2, &pool, source, &s2, &lines))
            {
                Ok(handle) => {
                    self.threads.insert(
                        p.name.clone(),
                        Thread {
                            fingerprint,
                            stop,
                            handle,
                        },
                    );
                }
                Err(e) => push(
                    &self.lines,
                    format!("discovery: pool {}: cannot start its thread: {e}", p.name),
                ),
            }
        }
        self.take_lines()
    }

    fn stop_all(&mut self) {
        for (_, t) in self.threads.drain() {
            t.stop.store(true, Ordering::Relaxed);
        }
    }

    fn take_lines(&self) -> Vec<String> {
        std::mem::take(&mut *self.lines.lock())
    }

    /// Pools with a thread running in this process.
    pub fn running(&self) -> usize {
        self.threads.values().filter(|t| !t.handle.is_finished()).count()
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        self.stop_all();
    }
}

fn push(lines: &Mutex<Vec<String>>, line: String) {
    let mut l = lines.lock();
    if l.len() < MAX_LINES {
        l.push(line);
    }
}

/// The thread of one pool: ask, apply, wait; until stopped or the lease is lost.
fn run(b: &Balancer, pool: &str, mut source: Box<dyn Source>, stop: &AtomicBool, lines: &Mutex<Vec<String>>) {
    let name = source.name();
    let alive = || !stop.load(Ordering::Relaxed) && b.holds_discovery_lease() && !b.superseded();
    let mut failing = 0u32;
    while alive() {
        let Some(p) = b.topology().ok().and_then(|t| t.pool(pool).cloned()) else {
            return;
        };
        let outcome = source.query(&p, stop).and_then(|a| {
            super::apply(b, pool, a.nodes, name)
                .map(|r| (r, a.next))
                .map_err(|e| e.to_string())
        });
        let wait = match outcome {
            Ok((applied, next)) => {
                failing = 0;
                if let Some(line) = applied.line(pool, name) {
                    push(lines, line);
                }
                next
            }
            Err(e) if !alive() => {
                let _ = e;
                return;
            }
            Err(e) => {
                failing += 1;
                if let Some(line) = super::failed(b, pool, name, &e) {
                    push(lines, line);
                }
                backoff(source.retry_after(), failing)
            }
        };
        let until = Instant::now() + wait;
        while alive() && Instant::now() < until {
            std::thread::sleep(
                until
                    .saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(100)),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_thirty_seconds() {
        let s = Duration::from_secs;
        assert_eq!(backoff(s(1), 1), s(1));
        assert_eq!(backoff(s(1), 2), s(2));
        assert_eq!(backoff(s(1), 4), s(8));
        assert_eq!(backoff(s(1), 40), s(30));
        assert_eq!(backoff(s(0), 1), Duration::from_millis(500));
    }
}
