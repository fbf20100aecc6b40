//! The shared region's layout: one versioned `#[repr(C)]` header followed by fixed
//! arrays of cache-line-aligned slots.
//!
//! ```text
//! Header | PoolSlot x max_pools | NodeSlot x max_nodes | WorkerSlot x max_workers
//!        | in-flight share: AtomicU32 x max_workers x max_nodes (row per worker)
//!        | config text: 2 x config_bytes (double buffer, flipped by `active_text`)
//!        | QueueEntry x max_pools x max_waiters (admission queue, pool-major)
//!        | QueuePool x max_pools (admission parameters and counters)
//!        | admission share: AtomicU32 x max_workers x max_pools (row per worker)
//!        | served concurrency: AtomicU32 x max_nodes (highest concurrency answered OK)
//!        | NodeTally x (max_workers + 1) x max_nodes (row per worker, then the shared row)
//!        | PoolTally x (max_workers + 1) x max_pools (same rows)
//! ```
//!
//! Tallies are the statistics every try adds to (status classes, latency histogram,
//! requests, the retry budget and the sliding window). Each attached worker has its own
//! row, which only that worker's owning thread writes, with a plain load and store
//! instead of a locked read-modify-write: a try costs a few nanoseconds less for
//! each counter, and no two workers write the same cache line. Processes or threads
//! without a row of their own add to the shared row atomically. Readers sum the rows
//! (`crate::tally`). A killed worker's row keeps its counts; its successor (same
//! `ngx.worker.id()`, same row) goes on from them.
//!
//! Every field is an atomic or a plain value written once before the region is shared,
//! so an all-zero mapping is a valid (empty) region and a process that dies between two
//! stores leaves nothing that a reader could misinterpret. Slots are handed out as `&`
//! references only; all mutation goes through atomics.

use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64};

/// "RSBALNCR" little-endian.
pub const MAGIC: u64 = u64::from_le_bytes(*b"RSBALNCR");
/// Bumped whenever any struct in this file changes shape.
pub const LAYOUT_VERSION: u32 = 17;

/// Node flags (`NodeSlot::flags`).
pub mod flags {
    /// The slot belongs to a node of the active configuration.
    pub const IN_USE: u32 = 1;
    /// The node only serves when no primary of its pool can.
    pub const BACKUP: u32 = 1 << 1;
    /// The node left the configuration; the slot is reused once nothing is in flight.
    pub const REMOVED: u32 = 1 << 2;
    /// Active health checks found the node down.
    pub const DOWN: u32 = 1 << 3;
    /// An operator is draining the node: no new tries, in-flight ones finish.
    pub const DRAINING: u32 = 1 << 4;
    /// The node has a token or request budget (`tpm`, `rpm`): picks look at its
    /// window (`crate::headroom`).
    pub const BUDGET: u32 = 1 << 5;
    /// The node sent rate-limit headers: picks look at its headroom words
    /// (`crate::headroom`). Learned, so it survives a reload (like `DOWN`).
    pub const HEADROOM: u32 = 1 << 6;
}

/// `PoolSlot::emergency` bits.
pub mod emergency {
    /// The pool is in emergency mode (shedding, backup pool in).
    pub const ACTIVE: u32 = 1;
    /// An operator forced emergency mode on.
    pub const FORCED_ON: u32 = 1 << 1;
    /// An operator forced emergency mode off.
    pub const FORCED_OFF: u32 = 1 << 2;
}

/// Buckets of a pool's sliding statistics window (`PoolSlot::window`).
pub const WINDOW_BUCKETS: usize = 10;

/// Upper bounds (ms) of the per-node upstream latency histogram; the last bucket
/// (index `LATENCY_BOUNDS_MS.len()`) is `+Inf`.
pub const LATENCY_BOUNDS_MS: [u32; 15] = [
    5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000, 120_000, 300_000,
];

/// `LATENCY_BOUNDS_MS` in microseconds (the largest, 300 s, is below `u32::MAX`).
const LATENCY_BOUNDS_US: [u32; LATENCY_BOUNDS_MS.len()] = {
    let mut us = [0; LATENCY_BOUNDS_MS.len()];
    let mut i = 0;
    while i < us.len() {
        us[i] = LATENCY_BOUNDS_MS[i] * 1000;
        i += 1;
    }
    us
};

/// The latency histogram's bucket of `latency_us`: `bucket_of(&LATENCY_BOUNDS_MS, _)`
/// against bounds already in microseconds (the report path).
pub fn latency_bucket(latency_us: u32) -> usize {
    LATENCY_BOUNDS_US.partition_point(|&bound| bound < latency_us)
}

/// Upper bounds (ms) of a pool's admission-queue wait histogram; the last bucket
/// (index `QUEUE_WAIT_BOUNDS_MS.len()`) is `+Inf`.
pub const QUEUE_WAIT_BOUNDS_MS: [u32; 13] = [
    5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000,
];

/// The bucket of a histogram with upper bounds `bounds_ms` (Prometheus' `le`: the
/// first bound the value does not exceed; `bounds_ms.len()` for `+Inf`) that
/// `value_us` microseconds fall in.
pub fn bucket_of(bounds_ms: &[u32], value_us: u64) -> usize {
    bounds_ms.partition_point(|&bound| (bound as u64) * 1000 < value_us)
}

/// One bucket of a pool's sliding window: what the overload detector and the canary
/// rollback compare. `tag` is the bucket's period number; a writer that finds an old
/// tag resets the counters (a few events racing the reset may be lost: a statistic).
#[repr(C)]
pub struct WindowBucket {
    pub tag: AtomicU64,
    /// Tries reported (cancelled ones excluded).
    pub requests: AtomicU64,
    /// Tries that failed: no response or 5xx.
    pub failures: AtomicU64,
    /// Tries answered 429.
    pub busy: AtomicU64,
    /// Requests shed or refused by admission.
    pub shed: AtomicU64,
}

/// Buckets of a pool's retry-budget window.
pub const BUDGET_BUCKETS: usize = 10;

/// Buckets and width (ms) of each node's recent window (`NodeTally::recent`): its
/// tries and failed or 429 ones over about the last minute, for the status page.
pub const RECENT_BUCKETS: usize = 8;
pub const RECENT_WINDOW_MS: u32 = 60_000;

#[repr(C, align(64))]
pub struct Header {
    pub magic: u64,
    pub layout_version: u32,
    pub max_pools: u32,
    pub max_nodes: u32,
    pub max_workers: u32,
    pub config_bytes: u32,
    pub _reserved0: u32,
    /// Bumped (Release) after any change workers must notice: topology, weights.
    pub generation: AtomicU64,
    /// Bumped (Release) after the active config text changed; `Balancer::sync` reads it
    /// (Acquire) to decide whether to read the text, which it does under the lock.
    pub config_version: AtomicU64,
    /// Which of the two text buffers is active (0 or 1); written under the lock.
    pub active_text: AtomicU32,
    /// Length of each text buffer's content; written under the lock.
    pub text_len: [AtomicU32; 2],
    /// pid of the process holding the writer lock, 0 when free.
    pub lock_owner: AtomicI32,
    /// Times the lock was taken over from a dead holder.
    pub lock_steals: AtomicU64,
    /// pid of the process running active health checks, 0 when none.
    pub health_pid: AtomicI32,
    pub _pad0: u32,
    /// The health-check lease ends at this time (ms) unless renewed.
    pub health_until_ms: AtomicU64,
    /// In-flight tries of dead workers given back by `reap_dead_workers`.
    pub reclaimed_tries: AtomicU64,
    /// One past the highest worker row ever attached: readers sum tally rows
    /// `0..tally_rows` and the shared row.
    pub tally_rows: AtomicU32,
    pub _pad1: u32,
    /// The last config stage numbered (`Balancer::stage`): nginx's master stages a
    /// reload's config in `init_by_lua`, before it knows the reload succeeds.
    pub stage_seq: AtomicU64,
    /// The stage that is live (`Balancer::apply_stage`, run by the first worker of the
    /// new generation); workers of an older stage keep the tables they began with.
    pub applied_stage: AtomicU64,
    /// Service discovery (`crate::discovery`): pid of the worker whose threads run the
    /// pools' sources (a lease, as for health checks), 0 when none, and when its lease
    /// ends (ms).
    pub discovery_pid: AtomicI32,
    pub _pad_discovery: u32,
    pub discovery_until_ms: AtomicU64,
    /// Cluster sync (`crate::cluster`): pid of the worker whose thread talks to Redis
    /// (a lease, as for health checks), 0 when none, and when its lease ends (ms).
    pub cluster_pid: AtomicI32,
    /// 1 while the last exchange with Redis succeeded (`rsbalancer_cluster_up`).
    pub cluster_up: AtomicU32,
    pub cluster_until_ms: AtomicU64,
    /// Gateways alive in the fleet at the last sync (this one included).
    pub cluster_gateways: AtomicU64,
    /// Sync rounds that succeeded and that failed.
    pub cluster_syncs: AtomicU64,
    pub cluster_errors: AtomicU64,
    /// When the last round succeeded (ms, coarse monotonic).
    pub cluster_last_ok_ms: AtomicU64,
    /// Cooldowns this gateway took from the fleet (learned at another gateway).
    pub cluster_cooldowns_in: AtomicU64,
}

/// Per-pool shared parameters and counters. The report path reads its policy
/// parameters from here (copied from the config by `configure`) so that it never
/// needs a worker's local tables.
#[repr(C, align(64))]
pub struct PoolSlot {
    pub in_use: AtomicU32,
    /// Peak-EWMA time constant, milliseconds.
    pub decay_ms: AtomicU32,
    /// Latency (ms) a failure or a quota 429 counts as.
    pub penalty_ms: AtomicU32,
    /// Upper bound (ms) of a penalty, even with a longer Retry-After.
    pub penalty_cap_ms: AtomicU32,
    /// `limit.*`: learned concurrency limits on (1) or off (0), bounds, increase pace.
    pub limit_enabled: AtomicU32,
    pub limit_min: AtomicU32,
    pub limit_max: AtomicU32,
    pub limit_increase_every: AtomicU32,
    /// `cooldown.*`.
    pub quota_retry_after_ms: AtomicU32,
    pub quota_after: AtomicU32,
    pub cooldown_base_ms: AtomicU32,
    pub cooldown_max_ms: AtomicU32,
    pub honor_retry_after: AtomicU32,
    /// `outlier.*`.
    pub eject_after: AtomicU32,
    pub eject_base_ms: AtomicU32,
    pub eject_max_ms: AtomicU32,
    // --- line 2 ----------------------------------------------------------------
    pub eject_max_percent: AtomicU32,
    /// `retry.budget_ratio` as `f32` bits.
    pub budget_ratio: AtomicU32,
    pub budget_min_per_s: AtomicU32,
    pub budget_window_ms: AtomicU32,
    /// `cooldown.max_retry_after_ms`: the longest Retry-After a node is believed.
    pub max_retry_after_ms: AtomicU32,
    pub _pad_ra: u32,
    /// Recent mean completion tokens of the pool's answers (`crate::stream`): `f64`
    /// bits, an average over about the last 16 answers that reported usage; 0: none yet.
    pub mean_tokens: AtomicU64,
    /// Retries refused by the budget.
    pub retries_denied: AtomicU64,
    /// Requests or retries that found no node able to serve.
    pub no_node_total: AtomicU64,
    pub slow_start_ms: AtomicU32,
    /// Latency (ms) assumed for a node without samples.
    pub default_rtt_ms: AtomicU32,
    /// Requests are waiting for a faster node of this pool (`limit.slow_factor`) until
    /// this time (ms): each of their polls pushes it on.
    pub slow_waiting_until_ms: AtomicU64,
    // --- lines 3-4: the fleet's admission queue as the cluster sync last saw it
    // (was: the retry-budget window, now in `PoolTally`) ----------------------------
    pub fleet: FleetView,
    // --- line 5: canary and emergency control ----------------------------------
    /// Canary pool slot + 1 (0: no canary).
    pub canary_pool: AtomicU32,
    /// Share of requests sent to the canary, in parts per 10,000.
    pub canary_share: AtomicU32,
    /// 1 after an automatic rollback set the share to zero.
    pub canary_rolled_back: AtomicU32,
    /// `emergency::*` bits.
    pub emergency: AtomicU32,
    /// In emergency, requests of a priority below this are shed.
    pub shed_below: AtomicU32,
    /// Backup pool slot + 1 brought in during emergency (0: none).
    pub backup_pool: AtomicU32,
    /// Requests waiting in the admission queue now.
    pub queue_len: AtomicU32,
    /// Width (ms) of the sliding window (`WINDOW_BUCKETS` buckets of `window_ms / 10`).
    pub window_ms: AtomicU32,
    pub emergency_since_ms: AtomicU64,
    pub emergency_entries_total: AtomicU64,
    /// Requests refused by admission: shed in emergency, queue full, wait too long.
    pub shed_total: AtomicU64,
    pub canary_rollbacks_total: AtomicU64,
    // --- line 6: admission queue counters ----------------------------------------
    pub queue_admitted_total: AtomicU64,
    pub queue_timeouts_total: AtomicU64,
    pub queue_evicted_total: AtomicU64,
    pub queue_aborted_total: AtomicU64,
    pub queue_wait_ms_sum: AtomicU64,
    pub _reserved3: [AtomicU64; 3],
    // --- lines 7-8: the admission queue's wait histogram; lines 8-13 unused (were:
    // the sliding window; now in `PoolTally`) ---------------------------------------
    /// Requests admitted from the queue by the time they waited (`QUEUE_WAIT_BOUNDS_MS`,
    /// then +Inf); not cumulative. Their waits add up to `queue_wait_ms_sum`.
    pub queue_wait_hist: [AtomicU64; QUEUE_WAIT_BOUNDS_MS.len() + 1],
    // Service discovery (`crate::discovery`), written by the thread of the lease
    // holder that runs the pool's source (11 words).
    /// When the source last answered (ms, coarse monotonic); 0: never.
    pub discovery_ok_ms: AtomicU64,
    /// Answers and failed queries of the source.
    pub discovery_answers: AtomicU64,
    pub discovery_errors: AtomicU64,
    /// Nodes of the last answer used; consecutive failures since the last answer.
    pub discovery_nodes: AtomicU32,
    pub discovery_failing: AtomicU32,
    /// The last failure's text (up to 48 bytes of UTF-8, zero-padded), guarded by
    /// `discovery_error_seq` (odd while being written: a reader retries or gives up).
    pub discovery_error_seq: AtomicU64,
    pub discovery_error: [AtomicU64; 6],
    pub _reserved_window: [AtomicU64; 5 * WINDOW_BUCKETS - QUEUE_WAIT_BOUNDS_MS.len() - 1 - 11],
    /// Canary ramp (`crate::canary`): the next step's time (ms, coarse monotonic) in
    /// the high 48 bits, the share the ramp set last in the low 16; 0: no ramp running.
    pub canary_ramp: AtomicU64,
    /// Rollback judges only canary outcomes after this time (ms): when the canary
    /// block last changed, or the last rollback.
    pub canary_since_ms: AtomicU64,
    pub _reserved4: [AtomicU64; 4],
}

/// What the fleet's admission queue holds for one pool, as the cluster sync thread
/// last read it from Redis (`crate::cluster`, `crate::admission::fleet`): the
/// waiters of the *other* gateways, by priority. All zero: no view (no cluster, Redis
/// down, the view lapsed); the local queue alone decides. Written by the sync thread
/// only; `until_ms` last (Release), so a reader that sees it valid (Acquire) sees the
/// round's words (or a later round's: each word is whole, two rounds may mix).
#[repr(C)]
pub struct FleetView {
    /// The view holds until this time (coarse monotonic ms); past it, it is ignored.
    pub until_ms: AtomicU64,
    /// Waiters in the whole fleet's queue of the pool (this gateway's included).
    pub waiting: AtomicU32,
    /// Of them, waiters at other gateways.
    pub elsewhere: AtomicU32,
    /// Per priority (index priority - 1), the waiters at other gateways among the
    /// fleet's head that the sync read: (oldest arrival as coarse monotonic ms + 1)
    /// << 16 | their count (at most 65,535); 0: none.
    pub ahead: [AtomicU64; PRIORITIES],
    /// Times a dispatch kept a free slot for a better waiter at another gateway.
    pub holds: AtomicU64,
    pub _spare: [AtomicU64; 3],
}

/// One upstream node. The first cache line holds what every request writes; the
/// second what configuration and state transitions write. Between them the two hold
/// all that a pick reads of a candidate (`p2c_ewma` reads two candidates per pick:
/// two lines each, not four, in a pool too large for the L1 cache).
#[repr(C, align(64))]
pub struct NodeSlot {
    // --- line 1: per request ---------------------------------------------------
    /// Tries picked and not yet reported, across all workers. Never below zero.
    pub inflight: AtomicU32,
    /// Consecutive failures (connect error, timeout, 5xx); reset by a success.
    pub consecutive_failures: AtomicU32,
    /// Peak-EWMA state: high 32 bits the cost in microseconds as `f32` bits, low 32
    /// bits the coarse monotonic time of the last update in milliseconds (wrapping).
    /// One word so that an update is a single CAS.
    pub ewma: AtomicU64,
    /// Stream signals (`crate::stream`), each packed like `ewma` (`f32` µs, `u32` ms
    /// stamp; 0: never measured). Time to first token: peak EWMA from the try's pick
    /// to its first SSE event with content.
    pub ttft: AtomicU64,
    /// Time per output token (µs per completion token after the first), smoothed.
    pub tpot: AtomicU64,
    /// Time a stream spent in keep-alive comments or blank lines before its first
    /// token (a node queueing the request: its "preamble"), smoothed.
    pub preamble: AtomicU64,
    /// Reported 429s.
    pub busy: AtomicU64,
    /// Streams that ended without `[DONE]` or a `finish_reason` (reported as failures).
    pub stream_failures: AtomicU64,
    pub consecutive_busy: AtomicU32,
    pub _pad1: u32,
    // --- line 2: configuration and state, what a pick reads besides line 1 ----------
    /// Pool slot index this node belongs to.
    pub pool: AtomicU32,
    /// `flags::*`.
    pub flags: AtomicU32,
    /// Base weight (configured or set at run time).
    pub weight: AtomicU32,
    pub _pad2: u32,
    /// Start of the slow-start ramp (ms, coarse monotonic).
    pub started_ms: AtomicU64,
    /// No new tries before this time (ms): 429 cooldown.
    pub cooldown_until_ms: AtomicU64,
    /// No new tries before this time (ms): outlier ejection, health.
    pub ejected_until_ms: AtomicU64,
    /// Learned concurrency limit, fixed point 48.16; 0 = none learned (unlimited).
    pub limit: AtomicU64,
    /// Scraped queue (`crate::scrape`), read on every pick: the node's backlog not
    /// made of our own tries (high 32 bits) and until when it counts (low 32 bits,
    /// coarse monotonic ms, wrapping); 0: none. One word, one store, one load.
    pub queue: AtomicU64,
    /// This gateway's share of the node's fleet-wide concurrency limit, the other
    /// gateways' tries in flight on it, and until when both count (written by the
    /// cluster sync thread each round; `crate::fleet::pack`); 0: no share.
    pub fleet: AtomicU64,
    // --- line 3: ejection, health and scrapes --------------------------------------
    /// When the last successful scrape of the node ended (ms, coarse monotonic); 0:
    /// never.
    pub queue_scraped_ms: AtomicU64,
    /// Ejections so far (the next one lasts longer).
    pub ejections: AtomicU32,
    /// Consecutive passing / failing active probes.
    pub health_ok: AtomicU32,
    pub health_fail: AtomicU32,
    pub _pad3: u32,
    pub cooldowns_total: AtomicU64,
    pub ejections_total: AtomicU64,
    /// Since when (ms, coarse monotonic) the node is out after a cooldown or an
    /// ejection began; 0 when it is not, or its first served try since was noticed
    /// (`crate::notice`: the report that swaps it back to 0 announces "back").
    pub out_since_ms: AtomicU64,
    /// Scraped figures for display (`crate::scrape`): requests waiting (high 32 bits)
    /// and running (low 32 bits); `u32::MAX`: the node did not send it.
    pub queue_figures: AtomicU64,
    /// Scraped KV-cache usage in parts per million (low 21 bits; all ones: not sent),
    /// the scrape state bits (`crate::scrape`), and failed scrapes (high 32 bits).
    pub queue_info: AtomicU64,
    // --- line 4: transition notices; lines 5-6 unused (were: status classes and the
    // latency histogram, now in `NodeTally`) -------------------------------------------
    /// Per `crate::notice::Kind`: the rate limit's word (`crate::notice::admit`).
    pub notices: [AtomicU64; crate::notice::KINDS],
    // --- provider headroom and budgets (`crate::headroom`) ---------------------------
    /// Requests the provider said are left (`x-ratelimit-remaining-requests`, less our
    /// picks since) and when that resets: `(left + 1) << 40 | reset_ms` (coarse
    /// monotonic); 0: nothing known.
    pub headroom_requests: AtomicU64,
    /// The same for tokens (`x-ratelimit-remaining-tokens`).
    pub headroom_tokens: AtomicU64,
    /// Configured budget: `rpm << 32 | tpm` (each 0: none).
    pub budget_limits: AtomicU64,
    /// Reserved in the window: `requests << 40 | tokens`; the one word every
    /// reservation CASes against the limits.
    pub budget_used: AtomicU64,
    /// The last window period whose stale buckets were swept.
    pub budget_swept: AtomicU64,
    /// Window buckets (`crate::headroom::BUCKET_MS` each): `period tag << 40 | amount`.
    pub budget_tokens: [AtomicU64; BUDGET_SLOTS],
    pub budget_requests: [AtomicU64; BUDGET_SLOTS],
    /// Times a pick passed the node over for want of provider headroom / budget.
    pub headroom_skips: AtomicU64,
    pub budget_skips: AtomicU64,
    // --- last line: cluster mode's shares of the fleet (`crate::fleet`), the removal --
    /// When the node left the configuration (ms).
    pub removed_ms: AtomicU64,
    /// Times a pick found the node at its cap (learned limit or fleet share): the
    /// unmet part of this gateway's demand that the sync publishes.
    pub fleet_skips: AtomicU64,
    /// The fleet's limit of the node as of the last round (fixed point as `limit`; 0:
    /// none), for display.
    pub fleet_limit: AtomicU64,
    /// The other gateways' part of the node's budget window (`crate::fleet`):
    /// `requests << 40 | tokens`, and until when it counts (coarse ms); 0: none.
    pub fleet_budget: AtomicU64,
    pub fleet_budget_until: AtomicU64,
    pub _reserved_fleet: [AtomicU64; 3],
}

/// Buckets of a node's token and request budget window (`NodeSlot::budget_tokens`).
pub const BUDGET_SLOTS: usize = 7;

/// Per-row statistics of one node (see the module documentation for rows).
#[repr(C, align(64))]
pub struct NodeTally {
    /// Reported tries by status class: index 0 no response, 1..=5 the 1xx..5xx class
    /// (statuses of 600 and above count as 5xx; a client abort, 499, as 4xx). Every
    /// reported try lands in exactly one class: the source of `requests`.
    pub status_class: [AtomicU64; 6],
    /// Sum of the latencies of served tries, microseconds.
    pub latency_sum_us: AtomicU64,
    /// Completion tokens of answers that reported `usage` (`crate::stream`).
    pub completion_tokens: AtomicU64,
    /// Served tries (not failed, not 429, not cancelled) by latency bucket
    /// (`LATENCY_BOUNDS_MS`, then +Inf); not cumulative. Their sum is `latency_sum_us`.
    pub latency_hist: [AtomicU64; LATENCY_BOUNDS_MS.len() + 1],
    /// Recent window (`crate::budget`): per bucket, reported tries and those that
    /// failed or were answered 429 (cancelled ones excluded).
    pub recent: [AtomicU64; RECENT_BUCKETS],
}

/// Per-row statistics of one pool.
#[repr(C, align(64))]
pub struct PoolTally {
    /// Requests (first tries) picked.
    pub requests_total: AtomicU64,
    /// Retries picked.
    pub retries_total: AtomicU64,
    /// `prefix` pools: picks that went to the key's home node, that the load guard
    /// passed on, and of requests without a key (`crate::select::PrefixOutcome`).
    pub prefix_hits_total: AtomicU64,
    pub prefix_spills_total: AtomicU64,
    pub prefix_nokey_total: AtomicU64,
    pub _pad: [AtomicU64; 3],
    /// Retry-budget window; each word: bucket tag (16 bits) | requests (24 bits) |
    /// retries (24 bits).
    pub budget: [AtomicU64; BUDGET_BUCKETS],
    pub _pad2: [AtomicU64; 6],
    /// Sliding window of outcomes (`crate::window`).
    pub window: [WindowBucket; WINDOW_BUCKETS],
    pub _pad3: [AtomicU64; 6],
}

/// One nginx worker (or any attached process) owning a row of in-flight shares.
#[repr(C, align(64))]
pub struct WorkerSlot {
    /// Owner pid, 0 when free.
    pub pid: AtomicI32,
    pub _pad: u32,
    pub attached_ms: AtomicU64,
    pub _reserved: [AtomicU64; 6],
}

const _: () = {
    assert!(std::mem::size_of::<Header>() == 192);
    assert!(std::mem::size_of::<PoolSlot>() == 832);
    assert!(std::mem::size_of::<FleetView>() == 128);
    assert!(std::mem::size_of::<NodeSlot>() == 448);
    assert!(std::mem::offset_of!(NodeSlot, pool) == 64);
    // What a pick reads of a candidate: lines 1 and 2 (see `NodeSlot`).
    assert!(std::mem::offset_of!(NodeSlot, ttft) < 64);
    assert!(std::mem::offset_of!(NodeSlot, fleet) < 128);
    assert!(std::mem::size_of::<WorkerSlot>() == 64);
    assert!(std::mem::size_of::<NodeTally>() == 256);
    assert!(std::mem::size_of::<PoolTally>() == 640);
    assert!(std::mem::align_of::<NodeSlot>() == 64);
};

/// Admission queue entry states (`QueueEntry::word`, low 8 bits; the ticket is above).
pub mod entry {
    /// Unused.
    pub const FREE: u64 = 0;
    /// Claimed by an arrival that is filling in its fields.
    pub const INIT: u64 = 1;
    /// Waiting for a slot.
    pub const WAITING: u64 = 2;
    /// Given a slot by a dispatcher; the owner takes it over on its next poll.
    pub const ADMITTED: u64 = 3;
    /// Pushed out by a higher-priority arrival; the owner answers 429 and frees it.
    pub const EVICTED: u64 = 4;
    /// Like `ADMITTED`, into a probe slot (above the nodes' confirmed concurrency):
    /// its try goes to a node at its probe (`Prefer::Probe`).
    pub const ADMITTED_PROBE: u64 = 5;
}

/// One waiter of a pool's admission queue. `word` = ticket << 8 | state, so every
/// transition is one CAS that also proves the entry still belongs to that ticket
/// (no ABA across reuse). The other fields are written by the owner between claiming
/// the entry (FREE -> INIT) and publishing it (INIT -> WAITING, Release).
#[repr(C, align(64))]
pub struct QueueEntry {
    pub word: AtomicU64,
    /// When it joined the queue (coarse monotonic ms).
    pub enqueued_ms: AtomicU64,
    /// 1..=10.
    pub priority: AtomicU32,
    /// Owner process.
    pub pid: AtomicI32,
    /// Owner's worker slot (for diagnostics; reaping goes by `pid`).
    pub worker: AtomicU32,
    pub _pad: u32,
    pub _reserved: [AtomicU64; 4],
}

/// Number of priorities (1..=10).
pub const PRIORITIES: usize = crate::abi::Priority::Max as usize;

/// Per-pool admission state: parameters copied from the config by `configure`, and
/// the counters the queue works with. Four cache lines.
#[repr(C, align(64))]
pub struct QueuePool {
    // --- line 1: hot counters ----------------------------------------------------
    /// Requests admitted and not yet released (log phase), across all workers.
    pub admitted: AtomicU32,
    /// One past the highest entry index ever claimed: scans stop there.
    pub high_water: AtomicU32,
    /// Last ticket handed out.
    pub seq: AtomicU64,
    /// Releases per second, two buckets: second (32 bits) << 32 | count (32 bits).
    pub releases: [AtomicU64; 2],
    /// Last time (ms) a scan looked for stale entries.
    pub swept_ms: AtomicU64,
    pub _reserved0: [AtomicU64; 3],
    // --- line 2: parameters --------------------------------------------------------
    /// Queueing on (1) or off (0).
    pub enabled: AtomicU32,
    /// A waiter gains one priority level per `aging_ms` waited (0: no aging).
    pub aging_ms: AtomicU32,
    /// Waiters allowed in the pool's queue, all classes together.
    pub max_queue: AtomicU32,
    pub _pad1: u32,
    /// Longest wait of each priority (index priority - 1), ms.
    pub max_wait_ms: [AtomicU32; PRIORITIES],
    pub _pad2: [u32; 2],
    // --- lines 3-4: classes and waiting counts ------------------------------------
    /// Class (index) of each priority.
    pub class_of: [AtomicU32; PRIORITIES],
    /// Waiters allowed per class.
    pub class_max_queue: [AtomicU32; PRIORITIES],
    /// Waiting entries per priority (index priority - 1).
    pub waiting: [AtomicU32; PRIORITIES],
    pub _pad3: [u32; 2],
}

const _: () = {
    assert!(std::mem::size_of::<QueueEntry>() == 64);
    assert!(std::mem::size_of::<QueuePool>() == 256);
    assert!(std::mem::offset_of!(QueuePool, enabled) == 64);
};

/// Capacities of a region, fixed when it is created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub max_pools: u32,
    pub max_nodes: u32,
    pub max_workers: u32,
    pub config_bytes: u32,
    /// Admission queue entries per pool (`shm.queue_slots`).
    pub max_waiters: u32,
}

/// Byte offsets of each array inside the mapping.
#[derive(Clone, Copy, Debug)]
pub struct Offsets {
    pub pools: usize,
    pub nodes: usize,
    pub workers: usize,
    pub shares: usize,
    pub text: usize,
    pub queue: usize,
    pub queue_pools: usize,
    pub admit_shares: usize,
    pub served: usize,
    pub node_tallies: usize,
    pub pool_tallies: usize,
    pub total: usize,
}

fn align_up(n: usize, a: usize) -> usize {
    n.div_ceil(a) * a
}

impl Capacity {
    pub fn offsets(&self) -> Offsets {
        let pools = std::mem::size_of::<Header>();
        let nodes = pools + self.max_pools as usize * std::mem::size_of::<PoolSlot>();
        let workers = nodes + self.max_nodes as usize * std::mem::size_of::<NodeSlot>();
        let shares = workers + self.max_workers as usize * std::mem::size_of::<WorkerSlot>();
        let text = align_up(
            shares + self.max_workers as usize * self.max_nodes as usize * 4,
            64,
        );
        let queue = align_up(text + 2 * self.config_bytes as usize, 64);
        let queue_pools =
            queue + self.max_pools as usize * self.max_waiters as usize * std::mem::size_of::<QueueEntry>();
        let admit_shares = queue_pools + self.max_pools as usize * std::mem::size_of::<QueuePool>();
        let served = align_up(
            admit_shares + self.max_workers as usize * self.max_pools as usize * 4,
            64,
        );
        let node_tallies = align_up(served + self.max_nodes as usize * 4, 64);
        let pool_tallies = node_tallies
            + self.tally_rows() as usize * self.max_nodes as usize * std::mem::size_of::<NodeTally>();
        let total = align_up(
            pool_tallies
                + self.tally_rows() as usize * self.max_pools as usize * std::mem::size_of::<PoolTally>(),
            4096,
        );
        Offsets {
            pools,
            nodes,
            workers,
            shares,
            text,
            queue,
            queue_pools,
            admit_shares,
            served,
            node_tallies,
            pool_tallies,
            total,
        }
    }

    /// Tally rows: one per worker slot, then the shared row (index `max_workers`).
    pub fn tally_rows(&self) -> u32 {
        self.max_workers + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_le_their_bound() {
        let bounds = [5, 10];
        assert_eq!(bucket_of(&bounds, 0), 0);
        assert_eq!(bucket_of(&bounds, 5_000), 0, "le: the bound itself is in");
        assert_eq!(bucket_of(&bounds, 5_001), 1);
        assert_eq!(bucket_of(&bounds, 10_000), 1);
        assert_eq!(bucket_of(&bounds, 10_001), 2, "+Inf");
        for us in [
            0,
            1,
            4_999,
            5_000,
            5_001,
            99_999,
            100_000,
            100_001,
            299_999_999,
            300_000_000,
        ]
        .into_iter()
        .chain([300_000_001, u32::MAX])
        {
            assert_eq!(
                latency_bucket(us),
                bucket_of(&LATENCY_BOUNDS_MS, us as u64),
                "{us} µs"
            );
        }
        assert_eq!(
            bucket_of(&QUEUE_WAIT_BOUNDS_MS, u64::MAX),
            QUEUE_WAIT_BOUNDS_MS.len()
        );
    }
}
