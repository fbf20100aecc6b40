//! Stream signals fed back (`crate::stream`): a node's time to first token, time per
//! output token and queueing before the first token, its completion tokens and cut
//! streams, and the pool's mean completion tokens. Atomics only: one CAS per packed
//! estimate, as the peak EWMA's.

use super::*;
use crate::stream::{self, Signals};

/// A CAS update of a packed (estimate, stamp) word with `f(cost, stamp)`.
fn update(word: &AtomicU64, now: u64, f: impl Fn(f32, u32) -> f32) {
    let _ = word.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| {
        let (cost, stamp) = load::unpack(w);
        Some(load::pack(f(cost, stamp), now))
    });
}

/// A failure or 429 penalty (`sample_us`) for a node whose cost comes from its stream
/// signals: its TTFT estimate takes it as the peak EWMA takes it. Nothing for a node
/// that has none.
pub(super) fn penalize(n: &NodeSlot, sample_us: f64, now: u64, tau: u32) {
    if n.ttft.load(Ordering::Relaxed) != 0 {
        update(&n.ttft, now, |c, s| load::observe(c, s, sample_us, now, tau));
    }
}

/// The node comes back as unknown (see `Feed::Forget`): its TTFT is measured anew.
pub(super) fn forget(n: &NodeSlot) {
    if n.ttft.load(Ordering::Relaxed) != 0 {
        n.ttft.store(0, Ordering::Relaxed);
    }
}

impl Balancer {
    /// `report`, then the try's stream signals (`crate::stream::Signals`): a stream cut
    /// short is counted (its status, 502, is the caller's); a 2xx feeds the TTFT (peak
    /// EWMA), queue and time-per-token (smoothed) estimates and the token counts.
    /// Signals a node did not send (0, flags unset) change nothing.
    pub fn report_llm(
        &self,
        node: u32,
        status: u32,
        latency_us: u32,
        retry_after_ms: u32,
        s: &Signals,
    ) -> Result<(), Error> {
        self.report(node, status, latency_us, retry_after_ms)?;
        let n = self.region.node(node).expect("reported node slot in range");
        if s.flags & stream::CUT != 0 {
            n.stream_failures.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        if !(200..300).contains(&status) {
            return Ok(());
        }
        let Some(ps) = self.region.pool(n.pool.load(Ordering::Relaxed)) else {
            return Ok(());
        };
        let now = clock::now_ms();
        let tau = ps.decay_ms.load(Ordering::Relaxed);
        let ttft = s.ttft_us.min(latency_us.max(1));
        if ttft > 0 {
            update(&n.ttft, now, |c, st| load::observe(c, st, ttft as f64, now, tau));
            let queue = s.queue_us.min(ttft) as f64;
            update(&n.preamble, now, |c, st| {
                load::smooth(c, st, queue.max(1.0), now, tau)
            });
        }
        if s.flags & stream::USAGE != 0 {
            let tokens = s.out_tokens.min(crate::ask::MAX_TOKENS);
            let (row, writer) = self.tally(self.worker_slot());
            if let Some(nt) = self.region.node_tally(row, node) {
                writer.add(&nt.completion_tokens, tokens as u64);
            }
            let _ = ps
                .mean_tokens
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |m| {
                    Some(stream::next_mean(f64::from_bits(m), tokens).to_bits())
                });
            if let Some(tpot) = stream::tpot_sample(latency_us, ttft, tokens) {
                update(&n.tpot, now, |c, st| load::smooth(c, st, tpot, now, tau));
            }
        }
        Ok(())
    }
}
