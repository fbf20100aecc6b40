//! What a node's rate-limit headers said (`crate::headroom`), and the settling of a
//! try's token reservation: the report path's half of headroom and budgets.

use super::*;

/// One dimension (requests or tokens) of a node's rate-limit headers: what is left
/// and in how many ms it resets (both already parsed and bounded by `crate::headers`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Left {
    pub remaining: u64,
    pub reset_ms: u32,
}

impl Balancer {
    /// A node's response said how many `requests` and `tokens` it has left, and when
    /// each resets: kept in its slot for every worker's picks (`crate::headroom`).
    /// Nothing left of either starts a cooldown until its reset (never shortening
    /// one already running). Resets are capped by the pool's
    /// `cooldown.max_retry_after_ms`.
    pub fn note_headroom(
        &self,
        node: u32,
        requests: Option<Left>,
        tokens: Option<Left>,
    ) -> Result<(), Error> {
        let Some((n, ps, cap)) = self.headroom_node(node, requests.or(tokens).is_some())? else {
            return Ok(());
        };
        let now = clock::now_ms();
        let mut spent_ms = None;
        for (w, l) in [(&n.headroom_requests, requests), (&n.headroom_tokens, tokens)] {
            let Some(l) = l else { continue };
            let reset_ms = l.reset_ms.min(cap);
            headroom::note(w, l.remaining, reset_ms, now);
            if l.remaining == 0 && reset_ms > 0 {
                spent_ms = spent_ms.max(Some(reset_ms));
            }
        }
        if let Some(retry_after_ms) = spent_ms {
            let strikes = n.consecutive_busy.load(Ordering::Relaxed).max(1);
            self.cool_down(
                node,
                n,
                ps,
                now,
                strikes,
                Reason::Quota {
                    retry_after_ms,
                    strikes,
                },
            );
        }
        Ok(())
    }

    /// The fleet's record of a node's headroom (cluster mode: what another gateway's
    /// responses said, merged in Redis by `crate::cluster`): merged into this
    /// gateway's words as a response's would be, resets capped the same way. No
    /// cooldown starts (the fleet shares those on their own); a node with nothing
    /// left is out until the reset all the same (`crate::headroom::out_until`).
    pub fn note_fleet_headroom(
        &self,
        node: u32,
        requests: Option<Left>,
        tokens: Option<Left>,
    ) -> Result<(), Error> {
        let Some((n, _, cap)) = self.headroom_node(node, requests.or(tokens).is_some())? else {
            return Ok(());
        };
        let now = clock::now_ms();
        for (w, l) in [(&n.headroom_requests, requests), (&n.headroom_tokens, tokens)] {
            if let Some(l) = l {
                headroom::note(w, l.remaining, l.reset_ms.min(cap), now);
            }
        }
        Ok(())
    }

    /// A node that said something (`said`) of its headroom: its slot, its pool's and
    /// the pool's cap on resets, with the node marked as one whose picks look at its
    /// headroom words. `None` when nothing was said or the pool is gone.
    fn headroom_node(&self, node: u32, said: bool) -> Result<Option<(&NodeSlot, &PoolSlot, u32)>, Error> {
        let n = self.live_node(node)?;
        let Some(ps) = self.region.pool(n.pool.load(Ordering::Relaxed)).filter(|_| said) else {
            return Ok(None);
        };
        if n.flags.load(Ordering::Relaxed) & flags::HEADROOM == 0 {
            // Release pairs with the Acquire flag loads (`live_node`, `reusable`);
            // the pick path reads HEADROOM on its own (Relaxed).
            n.flags.fetch_or(flags::HEADROOM, Ordering::Release);
        }
        Ok(Some((n, ps, ps.max_retry_after_ms.load(Ordering::Relaxed))))
    }

    /// Settle the token reservation of a try on `node` picked `age_ms` ago: from the
    /// `reserved` estimate to the `actual` tokens it cost (the response's `usage`;
    /// 0 for a try refused or failed). No-op for a node without a budget.
    pub fn settle_tokens(&self, node: u32, reserved: u32, actual: u32, age_ms: u64) -> Result<(), Error> {
        let n = self
            .region
            .node(node)
            .filter(|n| n.flags.load(Ordering::Relaxed) & (flags::IN_USE | flags::REMOVED) != 0)
            .ok_or_else(|| Error::Invalid(format!("unknown node slot {node}")))?;
        headroom::settle(n, reserved, actual, age_ms, clock::now_ms());
        Ok(())
    }
}
