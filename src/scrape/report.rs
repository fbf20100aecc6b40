//! Recording one scrape of a node (`resty.rsbalancer.scrape` calls it through the
//! mlua handle's `queue_report`): finds the node's pool and its `scrape` section in
//! the topology, parses the body and stores the figures (`super::record`).

use std::sync::atomic::Ordering;

use super::{parse, record, Events};
use crate::balancer::{Balancer, Error};
use crate::shm::clock;
use crate::shm::layout::flags;

/// Record a scrape of node `node` (a slot) of a pool with a `scrape` section: `body`
/// the response body of a 200, `None` when the scrape failed. A body with none of the
/// metrics counts as a failure (the error says so). Never changes the node's health,
/// cooldown or ejection.
pub fn report(b: &Balancer, node: u32, body: Option<&[u8]>) -> Result<(Events, Option<&'static str>), Error> {
    let topo = b.topology()?;
    let cfg = topo
        .pool_of(node)
        .and_then(|p| p.policy.scrape.clone())
        .ok_or_else(|| Error::Invalid(format!("node slot {node} is in no pool with a scrape section")))?;
    let n = b
        .region()
        .node(node)
        // Acquire pairs with the Release of IN_USE in `apply`.
        .filter(|n| n.flags.load(Ordering::Acquire) & flags::IN_USE != 0)
        .ok_or_else(|| Error::Invalid(format!("unknown node slot {node}")))?;
    let figures = body.map(|t| parse(t, cfg.kind)).filter(|f| !f.is_empty());
    let why = (body.is_some() && figures.is_none()).then_some("no queue metrics in the response");
    let events = record(n, figures.as_ref(), clock::now_ms(), cfg.fresh_ms());
    Ok((events, why))
}
