//! Cluster mode: several gateways (each an nginx with its own shared region) share one
//! view of their pools through Redis.
//!
//! **Off the request path.** Requests read and write shared memory only, as without a
//! cluster. In each gateway one worker holds the cluster lease (as one holds the
//! health-check lease: renewed by its timer, taken over when it dies or stalls), and a
//! thread of that worker talks to Redis every `sync_ms` with the `redis` crate's
//! blocking client: the thread may block, nginx's event loop never does. What the
//! thread learns it writes into the shared region, where every worker sees it.
//!
//! **What one round does** (one pipelined round trip, plus one for changes):
//! - renews this gateway's entry in the fleet (`<prefix>gws`, a sorted set scored by
//!   the entry's expiry: a gateway that dies drops out after its lease) and counts
//!   the gateways alive;
//! - publishes the quota cooldowns this gateway learned (`<prefix>cool`, a sorted set
//!   of `pool/node` scored by the cooldown's end in Unix ms, written with `ZADD GT` so
//!   that a cooldown only ever lengthens, whichever gateway writes), and takes every
//!   cooldown still running from it: a quota 429 seen by one gateway cools the node
//!   at all of them within one interval, and the first to see it is the only one that
//!   spends a request on it;
//! - splits each node's learned concurrency limit across the fleet by demand
//!   (`shares`, one `EVAL` that grants atomically, so the shares never add up to more
//!   than the limit; the words the request path reads: `crate::fleet`). The limit
//!   is the fleet's: lowered by a 429 at any gateway, raised by the AIMD increases
//!   all gateways earn; a dead gateway's entry is dropped once its `gws` lease ends;
//!   a share counts two `sync_ms`, after which the gateway is capped by its own
//!   learned limit again;
//! - counts token and request budgets (`tpm`, `rpm`) fleet-wide and shares what the
//!   providers' rate-limit headers said ([`budgets`]: one `EVAL`; the words the
//!   request path reads: `crate::fleet::remote_budget` and the headroom words);
//! - shares the operators' changes: each pool's run-time state (its nodes with their
//!   weights, the drained ones, an operator's forced emergency mode:
//!   [`crate::admin::PoolState`]) lives in the hash
//!   `<prefix>state`, with a change counter `<prefix>state:seq`. A gateway whose state
//!   differs from what it last wrote or read has had an admin change: it writes its
//!   state (last writer wins, per pool). One whose counter is behind reads the hash and
//!   applies the pools that changed through the same all-or-nothing changes as the
//!   admin API. So a weight set at one gateway is used by all, and outlives a reload
//!   or restart of any: a starting gateway takes the fleet's state rather than
//!   pushing its file's, unless its file changed (the pool's file state has another
//!   fingerprint than `<prefix>base` records), in which case the new file wins and
//!   the fleet follows.
//! - mirrors each pool's admission queue into the fleet's (`<prefix>q:<pool>`, a
//!   sorted set by priority then arrival, entries leased per gateway) and brings the
//!   fleet's head back into shared memory, where local admission keeps a freed slot
//!   for a higher priority waiting at another gateway: [`queue`] (Redis) and
//!   `crate::admission::fleet` (the rule);
//! - judges the pools' emergency mode on the fleet's counts, with one alert per
//!   transition for the whole fleet (`emergency`).
//!
//! **Consistency.** Eventual, within about one `sync_ms` (100 ms by default), like
//! nginx Plus's `zone_sync`, and cheaper than LiteLLM's re-read of Redis on the
//! request path: a gateway may route a few requests on what it knew before the last
//! round. Cooldowns merge by maximum (never shortened), admin state by last writer.
//!
//! **Redis down or slow.** A round that fails or exceeds `timeout_ms` marks the
//! gateway down (`rsbalancer_cluster_up 0`) and drops the connection; the lease holder
//! logs the transition once. Requests go on with what the region knows: no request
//! waits on Redis or fails because of it. When Redis returns, the next round merges:
//! cooldowns by maximum, and admin changes made meanwhile are written (this gateway's
//! state differs from what it last wrote).

mod budgets;
mod emergency;
pub mod queue;
mod shares;
mod sync;

pub use sync::{gateway_name, Running};
