//! Provider headroom and token budgets over the C ABI (`crate::headroom`): a node's
//! rate-limit headers, a try's token reservation settled, `retry-after-ms`.

use super::*;
use crate::balancer::Left;
use crate::headers;

/// A node's rate-limit response headers, as text (`len` bytes at each pointer; NULL
/// with 0 for a header the response did not have): what is left of its requests and
/// tokens (`x-ratelimit-remaining-*`, `anthropic-ratelimit-*-remaining`) and when
/// each resets (`x-ratelimit-reset-*`: a duration such as `6m0s`;
/// `anthropic-ratelimit-*-reset`: an RFC 3339 time).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct rsb_headroom {
    pub remaining_requests: *const c_char,
    pub remaining_requests_len: usize,
    pub reset_requests: *const c_char,
    pub reset_requests_len: usize,
    pub remaining_tokens: *const c_char,
    pub remaining_tokens_len: usize,
    pub reset_tokens: *const c_char,
    pub reset_tokens_len: usize,
}

/// A reset assumed when a node says what is left but not when it resets (ms).
pub const DEFAULT_RESET_MS: u32 = 1_000;

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One dimension: a remaining count that parses (else none), and its reset (else
/// [`DEFAULT_RESET_MS`]).
fn left(remaining: Option<&[u8]>, reset: Option<&[u8]>, now_unix: u64) -> Option<Left> {
    let remaining = headers::count(remaining?, crate::headroom::LEFT_MAX)?;
    let reset_ms = reset
        .filter(|r| !r.is_empty())
        .and_then(|r| headers::reset_ms(r, now_unix, headers::RETRY_AFTER_MAX_MS))
        .unwrap_or(DEFAULT_RESET_MS);
    Some(Left { remaining, reset_ms })
}

/// Note what node `node`'s response said of its rate limits (`*h`), for every
/// worker's picks: a node with fewer requests left than 1, or fewer tokens than a
/// request's estimate, is passed over until the reset; nothing left starts a
/// cooldown until it. Values that do not parse are ignored.
///
/// # Safety
/// `b` a live handle; `h` points to a readable `rsb_headroom` whose pointers each
/// point to their length of readable bytes (NULL allowed with length 0).
#[no_mangle]
pub unsafe extern "C" fn rsb_note_headroom(
    b: *const Balancer,
    node: u32,
    h: *const rsb_headroom,
) -> rsb_result {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let Some(b) = (unsafe { handle(b) }) else {
            return null("balancer");
        };
        if h.is_null() {
            return null("headroom");
        }
        // SAFETY: non-null and readable by contract.
        let h = unsafe { *h };
        // SAFETY: each pointer with its length, by contract.
        let (rr, xr, rt, xt) = unsafe {
            (
                bytes(h.remaining_requests, h.remaining_requests_len),
                bytes(h.reset_requests, h.reset_requests_len),
                bytes(h.remaining_tokens, h.remaining_tokens_len),
                bytes(h.reset_tokens, h.reset_tokens_len),
            )
        };
        let now = now_unix_ms();
        let requests = left(rr.filter(|v| !v.is_empty()), xr, now);
        let tokens = left(rt.filter(|v| !v.is_empty()), xt, now);
        b.note_headroom(node, requests, tokens)
            .map_or_else(fail, |_| rsb_result::RSB_OK)
    })
}

/// Settle the token reservation of a try on `node` picked `age_ms` ago: from the
/// `reserved` estimate it was picked with to the `actual` tokens it cost (the
/// response's usage; 0 for a try refused or failed). No-op for a node without
/// `tpm`.
///
/// # Safety
/// `b` a live handle.
#[no_mangle]
pub unsafe extern "C" fn rsb_settle(
    b: *const Balancer,
    node: u32,
    reserved: u32,
    actual: u32,
    age_ms: u32,
) -> rsb_result {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let Some(b) = (unsafe { handle(b) }) else {
            return null("balancer");
        };
        b.settle_tokens(node, reserved, actual, age_ms as u64)
            .map_or_else(fail, |_| rsb_result::RSB_OK)
    })
}

/// Parse a response's `retry-after-ms` value (`len` bytes at `value`): whole
/// milliseconds, a fraction rounding up, saturating at one day. Anything else answers
/// `RSB_INVALID_ARGUMENT` with nothing written.
///
/// # Safety
/// `value` points to `len` readable bytes (NULL allowed when `len` is 0); `out_ms`
/// writable.
#[no_mangle]
pub unsafe extern "C" fn rsb_retry_after_ms_value(
    value: *const c_char,
    len: usize,
    out_ms: *mut u32,
) -> rsb_result {
    // SAFETY: forwarded caller contract.
    unsafe {
        parse_ms(value, len, out_ms, "retry-after-ms", |v| {
            headers::millis(v, headers::RETRY_AFTER_MAX_MS)
        })
    }
}
