//! The per-request calls (what LuaJIT's FFI calls on every request: pick, report,
//! the retry check) and the reads and writes of one node or pool.

use super::*;

/// One request as `rsb_pick_ask` sees it (`crate::ask`): its consistent-hashing or
/// affinity key (`key_len` bytes at `key`; NULL with 0 for none), its estimated
/// tokens and its completion limit (`rsb_inspect`; 0 when unknown).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct rsb_ask {
    pub key: *const c_char,
    pub key_len: usize,
    pub tokens: u32,
    pub max_tokens: u32,
}

/// What `rsb_inspect` read from a request body.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct rsb_body {
    /// The body's length (saturating).
    pub bytes: u32,
    /// Its completion limit (`max_completion_tokens` or `max_tokens`, times `n`);
    /// 0 when it names none.
    pub max_tokens: u32,
    /// The pool's estimate of the request's tokens (prompt and completion), >= 1.
    pub tokens: u32,
    /// 1: `"stream": true`.
    pub stream: u32,
    /// `stream_options.include_usage`: 0 absent, 1 false, 2 true.
    pub include_usage: u32,
    /// 16: `key` holds the request's prefix-affinity key (a `prefix` pool, a usable
    /// prefix: `crate::prefix`) as lowercase hex, to pass as its pick key; 0: none.
    pub key_len: u32,
    pub key: [c_char; 16],
}

/// Pick a node of pool `pool` for one try, skipping the `ntried` slots in `tried`.
/// `key` is the consistent-hashing key (ignored by other algorithms; may be NULL
/// with `key_len` 0). On success `*out_node` is the node's slot and its in-flight
/// count is raised: call `rsb_report` exactly once for it.
///
/// # Safety
/// `b` a live handle; `key` points to `key_len` bytes; `tried` to `ntried` u32s;
/// `out_node` writable.
#[no_mangle]
pub unsafe extern "C" fn rsb_pick(
    b: *const Balancer,
    pool: u32,
    key: *const c_char,
    key_len: usize,
    tried: *const u32,
    ntried: usize,
    out_node: *mut u32,
) -> rsb_result {
    let ask = rsb_ask {
        key,
        key_len,
        tokens: 0,
        max_tokens: 0,
    };
    // SAFETY: forwarded caller contract.
    guard(|| unsafe {
        pick(
            b,
            pool,
            ask,
            tried,
            ntried,
            (Prefer::Confirmed, false),
            out_node,
            None,
        )
    })
}

/// The body of `rsb_pick`, `rsb_pick_prefer`, `rsb_pick_ask` and (with `retry`: its
/// `ntries` and `elapsed_ms`) `rsb_pick_retry`, run inside their `guard`.
///
/// # Safety
/// As `rsb_pick`, with `ask.key` pointing to `ask.key_len` bytes; with `retry`,
/// `out_node` points to two writable u32s.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn pick(
    b: *const Balancer,
    pool: u32,
    ask: rsb_ask,
    tried: *const u32,
    ntried: usize,
    (prefer, fast_only): (Prefer, bool),
    out_node: *mut u32,
    retry: Option<(usize, u32)>,
) -> rsb_result {
    // SAFETY: forwarded caller contract.
    let (Some(b), Some(key)) = (unsafe { handle(b) }, unsafe { bytes(ask.key, ask.key_len) }) else {
        return null("balancer or key");
    };
    // SAFETY: forwarded caller contract.
    let Some(tried) = (unsafe { u32s(tried, ntried) }) else {
        return null("tried");
    };
    if out_node.is_null() {
        return null("out_node");
    }
    let ask = Ask {
        key,
        tokens: ask.tokens,
        max_tokens: ask.max_tokens,
    };
    if let Some((ntries, elapsed_ms)) = retry {
        let picked = b.pick_retry(pool, &ask, tried, ntries, (prefer, fast_only), elapsed_ms);
        return answer(picked, |(slot, may)| {
            let denied = may.err().map_or(0, |d| d as u32);
            // SAFETY: `out_node` is non-null (checked above) and points to two
            // writable u32s by contract.
            unsafe {
                out_node.write(slot);
                out_node.add(1).write(denied);
            }
        });
    }
    let picked = if fast_only {
        b.pick_fast(pool, &ask, tried, prefer)
    } else {
        b.pick_with(pool, &ask, tried, prefer)
    };
    // SAFETY: `out_node` is non-null (checked above) and writable by contract.
    unsafe { put(out_node, picked) }
}

/// `rsb_pick`, choosing first among nodes with a confirmed free slot (`prefer` without
/// `RSB_PREFER_PROBE`, what `rsb_pick` does) or among nodes at their probe (with it: a
/// request that `rsb_admit` / `rsb_admit_poll` let in with `RSB_VERDICT_GO_PROBE`, into
/// a probe slot), then among the others. With `RSB_PREFER_NOT_SLOW`, only primaries
/// that are not slow (`limit.slow_factor`) are looked at, and `RSB_NO_NODE` means none
/// of them can take a try now (not counted as a request without a node). Other bits
/// (`enum rsb_prefer`): `RSB_INVALID_ARGUMENT`.
///
/// # Safety
/// As `rsb_pick`.
#[no_mangle]
pub unsafe extern "C" fn rsb_pick_prefer(
    b: *const Balancer,
    pool: u32,
    key: *const c_char,
    key_len: usize,
    tried: *const u32,
    ntried: usize,
    prefer: u32,
    out_node: *mut u32,
) -> rsb_result {
    let ask = rsb_ask {
        key,
        key_len,
        tokens: 0,
        max_tokens: 0,
    };
    // SAFETY: forwarded caller contract.
    unsafe { rsb_pick_ask(b, pool, &ask, tried, ntried, prefer, out_node) }
}

/// `rsb_pick_prefer` for a request known by more than its key (`rsb_ask`: its token
/// estimate and completion limit, from `rsb_inspect`).
///
/// # Safety
/// As `rsb_pick`; `ask` points to a readable `rsb_ask` whose `key` points to
/// `key_len` bytes.
#[no_mangle]
pub unsafe extern "C" fn rsb_pick_ask(
    b: *const Balancer,
    pool: u32,
    ask: *const rsb_ask,
    tried: *const u32,
    ntried: usize,
    prefer: u32,
    out_node: *mut u32,
) -> rsb_result {
    // SAFETY: forwarded caller contract.
    guard(|| unsafe { pick_ask(b, pool, ask, tried, ntried, prefer, out_node, None) })
}

/// The body of `rsb_pick_ask` and `rsb_pick_retry` (`retry` as for `pick`), run
/// inside their `guard`. Out of line, so that each entry's closure is only a call
/// to it: `catch_unwind` then inlines into the entry and the arguments go in
/// registers, where a larger closure was stored to memory and loaded back.
///
/// # Safety
/// As `pick`, with `ask` pointing to a readable `rsb_ask`.
#[allow(clippy::too_many_arguments)]
#[inline(never)]
unsafe fn pick_ask(
    b: *const Balancer,
    pool: u32,
    ask: *const rsb_ask,
    tried: *const u32,
    ntried: usize,
    prefer: u32,
    out_node: *mut u32,
    retry: Option<(usize, u32)>,
) -> rsb_result {
    if prefer & !PreferFlag::ALL != 0 {
        return fail(Error::Invalid(format!("prefer {prefer} is not 0..=3")));
    }
    if ask.is_null() {
        return null("ask");
    }
    // SAFETY: non-null (checked above), readable by contract.
    let ask = unsafe { *ask };
    let probe = prefer & PreferFlag::Probe as u32 != 0;
    let choice = (
        if probe { Prefer::Probe } else { Prefer::Confirmed },
        prefer & PreferFlag::NotSlow as u32 != 0,
    );
    // SAFETY: forwarded caller contract.
    unsafe { pick(b, pool, ask, tried, ntried, choice, out_node, retry) }
}

/// `rsb_pick_ask` and then `rsb_may_retry` for the try it picked, in one call: what
/// `balance()` asks on every request (pick a node, then ask whether nginx may be
/// granted one more try should this one fail). `tried` holds the request's `ntries`
/// tries, then the other slots it may not go to (`ntried` in all, `ntries <= ntried`,
/// `ntries < 64`). On `RSB_OK`, `out[0]` is the picked slot (as `*out_node`) and
/// `out[1]` the retry check over the first `ntries` slots of `tried` and the picked one,
/// `elapsed_ms` after the request began (as `rsb_may_retry`'s `*out_denied`: 0 when it
/// may). Any other result is `rsb_pick_ask`'s, and `out[1]` is untouched.
///
/// # Safety
/// As `rsb_pick_ask`; `out` points to two writable u32s.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn rsb_pick_retry(
    b: *const Balancer,
    pool: u32,
    ask: *const rsb_ask,
    tried: *const u32,
    ntried: usize,
    ntries: usize,
    prefer: u32,
    elapsed_ms: u32,
    out: *mut u32,
) -> rsb_result {
    // SAFETY: forwarded caller contract (`out` is checked for NULL there; `ntries`
    // against `ntried` and `PICK_RETRY_MAX_TRIES` by `Balancer::pick_retry`).
    guard(|| unsafe {
        pick_ask(
            b,
            pool,
            ask,
            tried,
            ntried,
            prefer,
            out,
            Some((ntries, elapsed_ms)),
        )
    })
}

/// Read what a request body costs in pool `pool` (`crate::ask`): `*out` gets its
/// length, completion limit, the pool's token estimate and whether it streams, and in
/// a `prefix` pool its prefix-affinity key (`crate::prefix`).
/// `RSB_INVALID_ARGUMENT` (`rsb_last_error` says why) for a body that is not one JSON
/// object of at most 32 MiB; `*out` is then untouched.
///
/// # Safety
/// `b` a live handle; `body` points to `len` bytes; `out` writable.
#[no_mangle]
pub unsafe extern "C" fn rsb_inspect(
    b: *const Balancer,
    pool: u32,
    body: *const c_char,
    len: usize,
    out: *mut rsb_body,
) -> rsb_result {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let (Some(b), Some(body)) = (unsafe { handle(b) }, unsafe { bytes(body, len) }) else {
            return null("balancer or body");
        };
        if out.is_null() {
            return null("out");
        }
        match b.inspect(pool, body) {
            Ok((f, tokens, key)) => {
                let hex = key.map(crate::prefix::hex).unwrap_or_default();
                let r = rsb_body {
                    bytes: f.bytes,
                    max_tokens: f.max_tokens.unwrap_or(0),
                    tokens,
                    stream: u32::from(f.stream),
                    include_usage: f.include_usage.map_or(0, |u| 1 + u32::from(u)),
                    key_len: if key.is_some() { 16 } else { 0 },
                    key: hex.map(|b| b as c_char),
                };
                // SAFETY: `out` is non-null (checked above) and writable by contract.
                unsafe { out.write(r) };
                rsb_result::RSB_OK
            }
            Err(e) => fail(e),
        }
    })
}

/// Report the outcome of one try from `rsb_pick`: `status` the HTTP status or 0 when
/// no response came (connect error, timeout), `latency_us` the response time,
/// `retry_after_ms` the server's Retry-After (0 if none).
///
/// # Safety
/// `b` a live handle.
#[no_mangle]
pub unsafe extern "C" fn rsb_report(
    b: *const Balancer,
    node: u32,
    status: u32,
    latency_us: u32,
    retry_after_ms: u32,
) -> rsb_result {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let Some(b) = (unsafe { handle(b) }) else {
            return null("balancer");
        };
        match b.report(node, status, latency_us, retry_after_ms) {
            Ok(()) => rsb_result::RSB_OK,
            Err(e) => report_failed(e),
        }
    })
}

/// `rsb_report`'s error answer, out of its path (an unknown slot is a caller's bug).
#[cold]
#[inline(never)]
fn report_failed(e: Error) -> rsb_result {
    fail(e)
}

/// May a request that has tried the `ntried` slots in `tried` try once more,
/// `elapsed_ms` after it began? `*out_denied` is 0 when it may, else why not (`enum
/// rsb_retry_denied`): `RSB_RETRY_DENIED_MAX_TRIES`, `_DEADLINE`, `_BUDGET` (retry
/// budget spent), `_NO_NODE` (no untried node available).
/// Budget refusals are counted; the retry itself is counted by its `rsb_pick`.
///
/// # Safety
/// `b` a live handle; `tried` points to `ntried` u32s; `out_denied` writable.
#[no_mangle]
pub unsafe extern "C" fn rsb_may_retry(
    b: *const Balancer,
    pool: u32,
    tried: *const u32,
    ntried: usize,
    elapsed_ms: u32,
    out_denied: *mut u32,
) -> rsb_result {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let Some(b) = (unsafe { handle(b) }) else {
            return null("balancer");
        };
        // SAFETY: forwarded caller contract.
        let Some(tried) = (unsafe { u32s(tried, ntried) }) else {
            return null("tried");
        };
        if out_denied.is_null() {
            return null("out_denied");
        }
        let denied = b.may_retry(pool, tried, elapsed_ms).err().map_or(0, |d| d as u32);
        // SAFETY: non-null and writable by contract.
        unsafe { *out_denied = denied };
        rsb_result::RSB_OK
    })
}

/// Can some node of pool `pool` take a request now? `RSB_OK` if so; `RSB_NO_NODE`
/// if not, with `*out_wait_ms` the soonest a node may (for a Retry-After);
/// `RSB_INVALID_ARGUMENT` for a pool index that is not a configured pool.
///
/// # Safety
/// `b` a live handle; `out_wait_ms` writable.
#[no_mangle]
pub unsafe extern "C" fn rsb_available(b: *const Balancer, pool: u32, out_wait_ms: *mut u64) -> rsb_result {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let Some(b) = (unsafe { handle(b) }) else {
            return null("balancer");
        };
        if out_wait_ms.is_null() {
            return null("out_wait_ms");
        }
        if let Err(e) = b.live_pool(pool) {
            return fail(e);
        }
        let (code, wait) = match b.available(pool) {
            Ok(()) => (rsb_result::RSB_OK, 0),
            Err(ms) => (rsb_result::RSB_NO_NODE, ms),
        };
        // SAFETY: non-null and writable by contract.
        unsafe { *out_wait_ms = wait };
        code
    })
}

/// How long (ms) `admit()` should go on waiting for a faster node before sending the
/// request to a slow one (`limit.slow_factor`); 0: go on now. `*out_others` is 1 when
/// other requests were already waiting for one (a newcomer lets them poll first), else
/// 0. See `Balancer::slow_wait_ms`.
///
/// # Safety
/// `b` a live handle; `out_ms` and `out_others` writable.
#[no_mangle]
pub unsafe extern "C" fn rsb_slow_wait(
    b: *const Balancer,
    pool: u32,
    out_ms: *mut u32,
    out_others: *mut u32,
) -> rsb_result {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let Some(b) = (unsafe { handle(b) }) else {
            return null("balancer");
        };
        if out_ms.is_null() || out_others.is_null() {
            return null("out_ms or out_others");
        }
        answer(b.slow_wait_ms(pool), |(ms, others)| {
            // SAFETY: both are non-null (checked above) and writable by contract.
            unsafe {
                *out_ms = ms;
                *out_others = others as u32;
            }
        })
    })
}

/// Set a node's base weight (`RSB_WEIGHT_MIN..=RSB_WEIGHT_MAX`); every process uses it on its next pick.
///
/// # Safety
/// `b` a live handle.
#[no_mangle]
pub unsafe extern "C" fn rsb_set_weight(b: *const Balancer, node: u32, weight: u32) -> rsb_result {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let Some(b) = (unsafe { handle(b) }) else {
            return null("balancer");
        };
        b.set_weight(node, weight)
            .map_or_else(fail, |_| rsb_result::RSB_OK)
    })
}

/// Copy a node's live numbers into `*out`.
///
/// # Safety
/// `b` a live handle; `out` writable.
#[no_mangle]
pub unsafe extern "C" fn rsb_node_get_stats(
    b: *const Balancer,
    node: u32,
    out: *mut rsb_node_stats,
) -> rsb_result {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let Some(b) = (unsafe { handle(b) }) else {
            return null("balancer");
        };
        if out.is_null() {
            return null("out");
        }
        let stats = b.node_stats(node).map(|s| rsb_node_stats {
            weight: s.weight,
            inflight: s.inflight,
            picks: s.picks,
            requests: s.requests,
            failures: s.failures,
            busy: s.busy,
            latency_sum_us: s.latency_sum_us,
            ewma_us: s.ewma_us,
            backup: s.backup as c_int,
        });
        // SAFETY: `out` is non-null (checked above) and writable by contract.
        unsafe { put(out, stats) }
    })
}

/// Pool `pool`'s canary split: `*out_pool` the canary pool's slot (`UINT32_MAX` when
/// the pool has no canary), `*out_share` the share of requests to send it, in parts
/// per `RSB_SHARE_PARTS` (10,000). Read from shared memory on every call (no lock): a change
/// by any process applies at once. The arm of a request is the canary when its bucket
/// (`crc32(key) % RSB_SHARE_PARTS` for a sticky key, else a random draw) is below the share.
///
/// # Safety
/// `b` a live handle; `out_pool` and `out_share` writable.
#[no_mangle]
pub unsafe extern "C" fn rsb_canary(
    b: *const Balancer,
    pool: u32,
    out_pool: *mut u32,
    out_share: *mut u32,
) -> rsb_result {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let Some(b) = (unsafe { handle(b) }) else {
            return null("balancer");
        };
        if out_pool.is_null() {
            return null("out_pool");
        }
        if out_share.is_null() {
            return null("out_share");
        }
        answer(crate::canary::canary(b, pool), |(slot, share)| {
            // SAFETY: non-null and writable by contract.
            unsafe {
                *out_pool = slot.unwrap_or(u32::MAX);
                *out_share = share;
            }
        })
    })
}
