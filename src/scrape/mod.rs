//! Queue depth of self-hosted nodes (vLLM, SGLang), scraped from their Prometheus
//! `/metrics`, and what a pick counts of it.
//!
//! **Why.** A self-hosted inference server accepts far more requests than it runs: the
//! rest wait in its scheduler's queue, where no latency estimate sees them until they
//! come back slow. Its own gauges say how deep that queue is now; llm-d and the SGLang
//! router balance on them. Polling them every 15 s proved too slow (see
//! `shared/LESSONS.md`): the default here is every second.
//!
//! **Who scrapes.** One worker: the holder of the region-wide health-check lease
//! (`Balancer::health_lease`), whose timer (`resty.rsbalancer.scrape`) fetches every
//! node's `/metrics` of each pool with a `scrape` section every `scrape_ms`, reads at
//! most `max_bytes` of body and hands it to [`report`] (the `queue_report` method of
//! the mlua handle; `report.rs`, a policy over the pool's public API, while this file
//! is node state that the pick path and `node::reset` use). The figures go to the node's shared slot, so every worker counts
//! them on its next pick.
//!
//! **Parsing** ([`parse`]) reads the Prometheus text exposition line by line with no
//! allocation: comments and unknown metrics are skipped, label sets are skipped
//! honouring quoted `}` and escapes, the value is the first token after them (a
//! timestamp after it is ignored). A metric's samples are summed over their label
//! sets (one per `model_name` when a server hosts several models); the KV-cache usage
//! takes the largest instead (a ratio does not add). Every value passes one clamp,
//! [`clamp`]: NaN and negatives count as 0, counts are capped at [`MAX_COUNT`], the
//! usage at 1. Names read:
//!
//! | figure   | vLLM                                                     | SGLang                   |
//! |----------|----------------------------------------------------------|--------------------------|
//! | waiting  | `vllm:num_requests_waiting`                              | `sglang:num_queue_reqs`  |
//! | running  | `vllm:num_requests_running`                              | `sglang:num_running_reqs`|
//! | KV usage | `vllm:kv_cache_usage_perc` (older: `gpu_cache_usage_perc`)| `sglang:token_usage`     |
//!
//! `kind` `vllm` or `sglang` reads only that family; `auto` (default) reads both.
//!
//! **Cost.** A pick counts a node's *load* as its in-flight tries (ours, exact, shared
//! by every worker) plus its **backlog**: the requests waiting in its queue at the
//! scrape that were not our own tries. Our tries in flight at the scrape beyond those
//! it was running are taken to be in its queue, so
//!
//! ```text
//! backlog = waiting - max(0, ours_at_scrape - running)      (never below 0)
//! ```
//!
//! (`waiting` as is when the node sends no running count). This is the correction for
//! the tries sent since the scrape: those are in our live in-flight count and not in
//! the scraped figures, while the ones the scrape already saw are not counted twice. A
//! gateway alone in front of a node thus sees a backlog near 0 and behaves as without
//! scraping; a node that other clients fill up gets a backlog of their waiting
//! requests. `p2c_ewma` compares `latency x (1 + load x mean weight / weight)`,
//! `least_conn` compares `load / weight` ([`crate::select::NodeView::load`]); the other
//! algorithms follow weights or keys and ignore it.
//!
//! **Staleness.** The backlog counts until three scrape intervals after the scrape that
//! measured it ([`crate::config::ScrapeConfig::fresh_ms`]), then it is 0: a node whose
//! figures are old, or that never sent any, is picked exactly as without scraping and
//! is flagged `stale`. A failed scrape (no connection, a status other than 200, a body
//! too long or with none of the metrics) never cools, ejects or takes a node down: it
//! is counted, flagged `failing`, and leaves the last figures to age out. The lease
//! holder logs each transition (figures fresh / stale, scrapes failing / working) once.
//!
//! **KV-cache usage** is read and shown, not used in the cost: vLLM allocates KV blocks
//! greedily, so a busy node near 100% is normal, and a node that cannot admit more
//! shows it in its waiting queue, which the cost counts already.
//!
//! **The pick path** reads one word per candidate ([`queued`]), a Relaxed load of the
//! cache line its eligibility check loads anyway: no lock, no allocation.
//!
//! ```
//! use rsbalancer::config::ScrapeKind;
//! use rsbalancer::scrape::{backlog, parse};
//!
//! let text = b"# TYPE vllm:num_requests_waiting gauge\n\
//!     vllm:num_requests_waiting{model_name=\"a\"} 7\n\
//!     vllm:num_requests_waiting{model_name=\"b\"} 5\n\
//!     vllm:num_requests_running{model_name=\"a\"} 16\n";
//! let f = parse(text, ScrapeKind::Auto);
//! assert_eq!((f.waiting, f.running), (Some(12), Some(16)));
//! // 20 of our tries were in flight: 4 of them wait in its queue, 8 others do too.
//! assert_eq!(backlog(&f, 20), 8);
//! ```

use std::sync::atomic::Ordering;

use serde::Serialize;

use crate::config::ScrapeKind;
use crate::shm::layout::NodeSlot;

mod report;
pub use report::report;

/// Largest count (waiting, running) believed from a scrape.
pub const MAX_COUNT: u32 = 1_000_000;

/// What one scrape found; `None`: the node did not send that metric.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Figures {
    pub waiting: Option<u32>,
    pub running: Option<u32>,
    /// KV-cache usage, 0..=1.
    pub kv_usage: Option<f64>,
}

impl Figures {
    /// None of the metrics was in the response.
    pub fn is_empty(&self) -> bool {
        self.waiting.is_none() && self.running.is_none() && self.kv_usage.is_none()
    }
}

#[derive(Clone, Copy)]
enum Metric {
    Waiting,
    Running,
    Kv,
}

fn metric(name: &[u8], kind: ScrapeKind) -> Option<Metric> {
    let (vllm, sglang) = (kind != ScrapeKind::Sglang, kind != ScrapeKind::Vllm);
    match name {
        b"vllm:num_requests_waiting" if vllm => Some(Metric::Waiting),
        b"vllm:num_requests_running" if vllm => Some(Metric::Running),
        b"vllm:kv_cache_usage_perc" | b"vllm:gpu_cache_usage_perc" if vllm => Some(Metric::Kv),
        b"sglang:num_queue_reqs" if sglang => Some(Metric::Waiting),
        b"sglang:num_running_reqs" if sglang => Some(Metric::Running),
        b"sglang:token_usage" if sglang => Some(Metric::Kv),
        _ => None,
    }
}

/// The one clamp every scraped value passes: NaN and negatives are 0, anything above
/// `max` (+Inf too) is `max`.
pub fn clamp(v: f64, max: f64) -> f64 {
    if v.is_nan() || v <= 0.0 {
        0.0
    } else {
        v.min(max)
    }
}

/// The rest of a sample line after its `{...}` label set, or `None` when the set is
/// not closed. Quoted values may hold `}` and backslash escapes.
fn after_labels(s: &[u8]) -> Option<&[u8]> {
    let (mut quoted, mut escaped) = (false, false);
    for (i, &b) in s.iter().enumerate().skip(1) {
        if escaped {
            escaped = false;
        } else if quoted {
            match b {
                b'\\' => escaped = true,
                b'"' => quoted = false,
                _ => {}
            }
        } else if b == b'"' {
            quoted = true;
        } else if b == b'}' {
            return Some(&s[i + 1..]);
        }
    }
    None
}

/// The value of a sample line from just after its metric name.
fn sample(rest: &[u8]) -> Option<f64> {
    let rest = if rest.first() == Some(&b'{') {
        after_labels(rest)?
    } else {
        rest
    };
    let token = rest.trim_ascii_start().split(u8::is_ascii_whitespace).next()?;
    std::str::from_utf8(token).ok()?.parse::<f64>().ok()
}

/// The queue figures of a Prometheus text exposition (see the module documentation).
/// Linear in the text, no allocation; anything it does not understand is skipped.
pub fn parse(text: &[u8], kind: ScrapeKind) -> Figures {
    let (mut waiting, mut running, mut kv) = (None::<f64>, None::<f64>, None::<f64>);
    let count = f64::from(MAX_COUNT);
    for line in text.split(|&b| b == b'\n') {
        let line = line.trim_ascii();
        if line.first().is_none_or(|&b| b == b'#') {
            continue;
        }
        let end = line
            .iter()
            .position(|&b| b == b'{' || b.is_ascii_whitespace())
            .unwrap_or(line.len());
        let Some(m) = metric(&line[..end], kind) else {
            continue;
        };
        let Some(v) = sample(&line[end..]) else { continue };
        match m {
            Metric::Waiting => waiting = Some(clamp(waiting.unwrap_or(0.0) + clamp(v, count), count)),
            Metric::Running => running = Some(clamp(running.unwrap_or(0.0) + clamp(v, count), count)),
            Metric::Kv => kv = Some(kv.unwrap_or(0.0).max(clamp(v, 1.0))),
        }
    }
    Figures {
        waiting: waiting.map(|v| v as u32),
        running: running.map(|v| v as u32),
        kv_usage: kv,
    }
}

/// The node's waiting requests that are not our own tries (module documentation):
/// what a pick adds to its in-flight count while the figures are fresh.
pub fn backlog(f: &Figures, ours_at_scrape: u32) -> u32 {
    let Some(waiting) = f.waiting else { return 0 };
    match f.running {
        Some(running) => waiting.saturating_sub(ours_at_scrape.saturating_sub(running)),
        None => waiting,
    }
}

/// The backlog a pick at `now_ms` counts for node `n`: 0 when there is none or it is
/// older than three scrape intervals. One Relaxed load: the pick path.
#[inline]
pub fn queued(n: &NodeSlot, now_ms: u64) -> u32 {
    let w = n.queue.load(Ordering::Relaxed);
    let until = w as u32;
    if (until.wrapping_sub(now_ms as u32) as i32) > 0 {
        (w >> 32) as u32
    } else {
        0
    }
}

// `NodeSlot::queue_figures`: a count not sent.
const ABSENT: u32 = u32::MAX;
// `NodeSlot::queue_info`: KV usage in ppm (all ones: not sent), then state bits.
const KV_MASK: u64 = (1 << 21) - 1;
/// The last scrape failed.
const FAILING: u64 = 1 << 24;
/// The figures were fresh at the last scrape (what the last transition announced).
const FRESH: u64 = 1 << 25;
const FAILURE_ONE: u64 = 1 << 32;

/// Fresh state for a slot taken by a new node: never scraped.
pub fn reset(n: &NodeSlot) {
    for w in [&n.queue, &n.queue_scraped_ms, &n.queue_figures, &n.queue_info] {
        w.store(0, Ordering::Relaxed);
    }
}

/// What a scrape changed, for the lease holder to log once per transition.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Events {
    /// `Some(true)`: the figures are fresh again (or for the first time);
    /// `Some(false)`: they became stale.
    pub fresh: Option<bool>,
    /// `Some(true)`: scrapes started failing; `Some(false)`: they work again.
    pub failing: Option<bool>,
}

/// Store one scrape's outcome in `n` at `now`: its figures (`None`: the scrape
/// failed), fresh for `fresh_ms`. Written by the lease holder only; the queue word is
/// one store, so a pick sees the old backlog or the new one, never a mix.
pub fn record(n: &NodeSlot, figures: Option<&Figures>, now: u64, fresh_ms: u32) -> Events {
    let kv = figures.map(|f| {
        f.kv_usage
            .map_or(KV_MASK, |u| (clamp(u, 1.0) * 1e6).round() as u64)
    });
    if let Some(f) = figures {
        let ours = n.inflight.load(Ordering::Relaxed);
        let until = now.wrapping_add(u64::from(fresh_ms)) as u32;
        n.queue.store(
            (u64::from(backlog(f, ours)) << 32) | u64::from(until),
            Ordering::Relaxed,
        );
        let count = |c: Option<u32>| u64::from(c.unwrap_or(ABSENT));
        n.queue_figures
            .store((count(f.waiting) << 32) | count(f.running), Ordering::Relaxed);
        n.queue_scraped_ms.store(now.max(1), Ordering::Relaxed);
    }
    let fresh = is_fresh(n, now, fresh_ms);
    let update = |w: u64| {
        let w = match kv {
            Some(kv) => (w & !KV_MASK & !FAILING) | kv,
            None => (w | FAILING).wrapping_add(FAILURE_ONE),
        };
        Some(if fresh { w | FRESH } else { w & !FRESH })
    };
    // Relaxed: the word is its own fact; nothing else is published with it.
    let prev = n
        .queue_info
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, update)
        .unwrap_or_else(|w| w);
    let flip = |bit: u64, now_set: bool| (((prev & bit) != 0) != now_set).then_some(now_set);
    Events {
        fresh: flip(FRESH, fresh),
        failing: flip(FAILING, figures.is_none()),
    }
}

fn is_fresh(n: &NodeSlot, now: u64, fresh_ms: u32) -> bool {
    let at = n.queue_scraped_ms.load(Ordering::Relaxed);
    at != 0 && now.saturating_sub(at) < u64::from(fresh_ms)
}

/// A node's scraped state for display (status JSON, page, `/metrics`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Snapshot {
    /// Last figures scraped (also when stale); absent: never sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub running: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kv_cache_usage: Option<f64>,
    /// What a pick adds to the node's in-flight count now (0 when stale).
    pub backlog: u32,
    /// No figures, or older than three scrape intervals: ignored.
    pub stale: bool,
    /// The last scrape failed.
    pub failing: bool,
    /// Since the last successful scrape; absent: none yet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub age_ms: Option<u64>,
    pub scrape_failures: u64,
}

/// `n`'s scraped state at `now`, figures older than `fresh_ms` flagged stale.
pub fn snapshot(n: &NodeSlot, now: u64, fresh_ms: u32) -> Snapshot {
    let at = n.queue_scraped_ms.load(Ordering::Relaxed);
    let figures = n.queue_figures.load(Ordering::Relaxed);
    let info = n.queue_info.load(Ordering::Relaxed);
    let count = |c: u32| (at != 0 && c != ABSENT).then_some(c);
    let kv = info & KV_MASK;
    Snapshot {
        waiting: count((figures >> 32) as u32),
        running: count(figures as u32),
        kv_cache_usage: (at != 0 && kv != KV_MASK).then(|| kv as f64 / 1e6),
        backlog: queued(n, now),
        stale: !is_fresh(n, now, fresh_ms),
        failing: info & FAILING != 0,
        age_ms: (at != 0).then(|| now.saturating_sub(at)),
        scrape_failures: info >> 32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VLLM: &[u8] = b"# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine=\"0\",model_name=\"llama\"} 16.0
vllm:num_requests_running{engine=\"0\",model_name=\"qwen\"} 4.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine=\"0\",model_name=\"llama\"} 30.0
vllm:num_requests_waiting{engine=\"0\",model_name=\"qwen\"} 2.0
vllm:num_requests_waiting_by_reason{reason=\"capacity\"} 99
vllm:kv_cache_usage_perc{engine=\"0\",model_name=\"llama\"} 0.75
vllm:kv_cache_usage_perc{engine=\"0\",model_name=\"qwen\"} 0.5
vllm:prompt_tokens_total{model_name=\"llama\"} 12345
";

    #[test]
    fn vllm_sums_counts_over_label_sets_and_takes_the_largest_usage() {
        let f = parse(VLLM, ScrapeKind::Vllm);
        assert_eq!(
            f,
            Figures {
                waiting: Some(32),
                running: Some(20),
                kv_usage: Some(0.75)
            }
        );
        assert_eq!(parse(VLLM, ScrapeKind::Auto), f);
        assert!(
            parse(VLLM, ScrapeKind::Sglang).is_empty(),
            "kind restricts the names"
        );
    }

    #[test]
    fn older_vllm_and_sglang_names() {
        let old = b"vllm:gpu_cache_usage_perc{model_name=\"m\"} 0.25\nvllm:num_requests_waiting 3\n";
        let f = parse(old, ScrapeKind::Auto);
        assert_eq!((f.waiting, f.running, f.kv_usage), (Some(3), None, Some(0.25)));
        let sg = b"# TYPE sglang:num_queue_reqs gauge\nsglang:num_queue_reqs{model_name=\"m\"} 9\n\
                   sglang:num_running_reqs{model_name=\"m\"} 64\nsglang:token_usage{model_name=\"m\"} 0.9\n\
                   sglang:gen_throughput{model_name=\"m\"} 1000\n";
        let f = parse(sg, ScrapeKind::Sglang);
        assert_eq!((f.waiting, f.running, f.kv_usage), (Some(9), Some(64), Some(0.9)));
        assert!(parse(sg, ScrapeKind::Vllm).is_empty());
    }

    #[test]
    fn labels_timestamps_and_whitespace() {
        let t = b"vllm:num_requests_waiting{model_name=\"a}b\\\"c\",x=\"\\\\\"} 4 1712345678000\r\n\
                  \tvllm:num_requests_waiting   6\n\
                  vllm:num_requests_waiting{model_name=\"unterminated 100\n\
                  vllm:num_requests_waitingX 100\n\
                  vllm:num_requests_waiting{} 1\n";
        assert_eq!(parse(t, ScrapeKind::Auto).waiting, Some(11));
    }

    #[test]
    fn nan_negative_and_huge_are_clamped_in_one_place() {
        let t = b"vllm:num_requests_waiting NaN\nvllm:num_requests_waiting -5\n\
                  vllm:num_requests_running +Inf\nvllm:num_requests_running 1e300\n\
                  vllm:kv_cache_usage_perc 75\n";
        let f = parse(t, ScrapeKind::Auto);
        assert_eq!(f.waiting, Some(0));
        assert_eq!(f.running, Some(MAX_COUNT));
        assert_eq!(f.kv_usage, Some(1.0));
        let t =
            b"vllm:num_requests_waiting -Inf\nvllm:kv_cache_usage_perc NaN\nvllm:num_requests_waiting abc\n";
        let f = parse(t, ScrapeKind::Auto);
        assert_eq!((f.waiting, f.kv_usage), (Some(0), Some(0.0)));
        assert_eq!(clamp(f64::NAN, 1.0), 0.0);
        assert_eq!(clamp(-1.0, 1.0), 0.0);
        assert_eq!(clamp(f64::INFINITY, 5.0), 5.0);
    }

    #[test]
    fn garbage_and_empty_bodies_have_no_figures() {
        assert!(parse(b"", ScrapeKind::Auto).is_empty());
        assert!(parse(b"<html>not metrics</html>\n\x00\xff\xfe", ScrapeKind::Auto).is_empty());
        assert!(parse(b"# vllm:num_requests_waiting 5", ScrapeKind::Auto).is_empty());
        assert!(parse(b"vllm:num_requests_waiting", ScrapeKind::Auto).is_empty());
        // Many label sets cannot overflow the sum.
        let many = "vllm:num_requests_waiting 900000\n".repeat(50);
        assert_eq!(parse(many.as_bytes(), ScrapeKind::Auto).waiting, Some(MAX_COUNT));
    }

    #[test]
    fn backlog_leaves_out_our_own_tries() {
        let f = |w, r| Figures {
            waiting: w,
            running: r,
            kv_usage: None,
        };
        // Others' queue: all counted.
        assert_eq!(backlog(&f(Some(50), Some(8)), 0), 50);
        // Only us: 20 in flight, 8 running, 12 waiting: nothing but ours.
        assert_eq!(backlog(&f(Some(12), Some(8)), 20), 0);
        // Ours beyond the node's figures (sent just before the scrape): not below 0.
        assert_eq!(backlog(&f(Some(2), Some(8)), 40), 0);
        // Ours all running: the waiting ones are others'.
        assert_eq!(backlog(&f(Some(7), Some(8)), 5), 7);
        assert_eq!(backlog(&f(Some(7), None), 5), 7, "no running figure: as sent");
        assert_eq!(backlog(&f(None, Some(8)), 0), 0, "no waiting figure: none");
    }

    #[test]
    fn record_counts_until_three_intervals_then_is_stale() {
        let r = crate::shm::Region::create(crate::shm::layout::Capacity {
            max_pools: 1,
            max_nodes: 1,
            max_workers: 1,
            config_bytes: 4096,
            max_waiters: 1,
        })
        .expect("region");
        let n = r.node(0).expect("slot");
        let t0 = 10_000;
        assert_eq!(queued(n, t0), 0, "never scraped");
        let s = snapshot(n, t0, 3000);
        assert!(s.stale && !s.failing && s.waiting.is_none() && s.age_ms.is_none());

        n.inflight.store(3, Ordering::Relaxed);
        let f = Figures {
            waiting: Some(40),
            running: Some(1),
            kv_usage: Some(0.5),
        };
        let e = record(n, Some(&f), t0, 3000);
        assert_eq!(
            e,
            Events {
                fresh: Some(true),
                failing: None
            }
        );
        assert_eq!(queued(n, t0), 38, "40 waiting, 2 of them ours");
        assert_eq!(queued(n, t0 + 2999), 38);
        let s = snapshot(n, t0 + 1000, 3000);
        assert_eq!(
            (s.waiting, s.running, s.kv_cache_usage),
            (Some(40), Some(1), Some(0.5))
        );
        assert!(!s.stale && !s.failing);
        assert_eq!(s.age_ms, Some(1000));

        // A failed scrape leaves the figures to age out; the failure is announced once.
        let e = record(n, None, t0 + 1000, 3000);
        assert_eq!(
            e,
            Events {
                fresh: None,
                failing: Some(true)
            }
        );
        assert_eq!(record(n, None, t0 + 2000, 3000), Events::default());
        assert_eq!(queued(n, t0 + 2000), 38);
        // Three intervals after the scrape: ignored and flagged, announced once.
        assert_eq!(queued(n, t0 + 3000), 0);
        let e = record(n, None, t0 + 3000, 3000);
        assert_eq!(
            e,
            Events {
                fresh: Some(false),
                failing: None
            }
        );
        let s = snapshot(n, t0 + 3000, 3000);
        assert!(s.stale && s.failing);
        assert_eq!((s.scrape_failures, s.backlog, s.waiting), (3, 0, Some(40)));

        // Back: both transitions at once.
        let e = record(n, Some(&Figures::default()), t0 + 4000, 3000);
        assert_eq!(
            e,
            Events {
                fresh: Some(true),
                failing: Some(false)
            }
        );
        let s = snapshot(n, t0 + 4000, 3000);
        assert_eq!(
            (s.waiting, s.running, s.kv_cache_usage, s.backlog),
            (None, None, None, 0)
        );

        // Far in the wrapped future of the 32-bit stamp: still not counted.
        record(n, Some(&f), t0 + 5000, 3000);
        assert_eq!(queued(n, t0 + 5000 + (1 << 31) + 10), 0);
        reset(n);
        assert_eq!(snapshot(n, t0, 3000), snapshot(n, t0 + 1, 3000));
        assert_eq!(queued(n, t0 + 5000), 0);
    }
}
