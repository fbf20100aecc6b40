//! The stream signals' calls (`crate::stream`): what `body_filter()` asks of an
//! answer's chunks (the first content event until it is seen; the usage-only event to
//! drop; the tail, once, at its end), and the report of a try with its signals.

use super::*;
use crate::abi::SignalFlag;
use crate::stream::{self, Signals};

/// What a try's answer said beyond its status (`rsb_report_llm`): time to its first
/// content event and the part of it spent in keep-alive comments (µs, 0: none), its
/// `usage.completion_tokens`, and `enum rsb_signal_flag` bits (`RSB_SIGNAL_FLAG_USAGE`:
/// `out_tokens` is known; `RSB_SIGNAL_FLAG_CUT`: a stream cut short).
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct rsb_signals {
    pub ttft_us: u32,
    pub queue_us: u32,
    pub out_tokens: u32,
    pub flags: u32,
}

/// What `rsb_answer_tail` read at an answer's end: `usage.prompt_tokens` and
/// `usage.completion_tokens` (0 when absent), and `RSB_SIGNAL_FLAG_USAGE` (completion
/// tokens found), `_FINISHED` (a `finish_reason`), `_DONE` (`data: [DONE]`).
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct rsb_tail {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub flags: u32,
}

/// `rsb_report` with the try's stream signals (`*signals`, see `rsb_signals`): one
/// call per try. A stream cut short is reported with the status the caller gives (502)
/// and counted in the node's stream failures.
///
/// # Safety
/// `b` a live handle; `signals` points to a readable `rsb_signals`.
#[no_mangle]
pub unsafe extern "C" fn rsb_report_llm(
    b: *const Balancer,
    node: u32,
    status: u32,
    latency_us: u32,
    retry_after_ms: u32,
    signals: *const rsb_signals,
) -> rsb_result {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let Some(b) = (unsafe { handle(b) }) else {
            return null("balancer");
        };
        if signals.is_null() {
            return null("signals");
        }
        // SAFETY: non-null (checked above), readable by contract.
        let s = unsafe { *signals };
        let s = Signals {
            ttft_us: s.ttft_us,
            queue_us: s.queue_us,
            out_tokens: s.out_tokens,
            flags: s.flags,
        };
        b.report_llm(node, status, latency_us, retry_after_ms, &s)
            .map_or_else(fail, |_| rsb_result::RSB_OK)
    })
}

/// Where the first SSE content event of `chunk` begins (`crate::stream::first_content`:
/// a `data:` line whose payload is neither empty nor `[DONE]`): `*out_offset` is its
/// offset, or `UINT64_MAX` when the chunk holds only comments and blank lines.
///
/// # Safety
/// `chunk` points to `len` bytes; `out_offset` writable.
#[no_mangle]
pub unsafe extern "C" fn rsb_sse_first(chunk: *const c_char, len: usize, out_offset: *mut u64) -> rsb_result {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let Some(chunk) = (unsafe { bytes(chunk, len) }) else {
            return null("chunk");
        };
        if out_offset.is_null() {
            return null("out_offset");
        }
        let at = stream::first_content(chunk).map_or(u64::MAX, |a| a as u64);
        // SAFETY: non-null and writable by contract.
        unsafe { *out_offset = at };
        rsb_result::RSB_OK
    })
}

/// The usage-only SSE event in `chunk` (`"choices":[]`, what
/// `stream_options.include_usage` adds): `out_range[0]` its first byte,
/// `out_range[1]` one past its blank line; `RSB_NO_NODE` when the chunk holds none
/// whole (`out_range` untouched).
///
/// # Safety
/// `chunk` points to `len` bytes; `out_range` to two writable u64s.
#[no_mangle]
pub unsafe extern "C" fn rsb_usage_event(
    chunk: *const c_char,
    len: usize,
    out_range: *mut u64,
) -> rsb_result {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let Some(chunk) = (unsafe { bytes(chunk, len) }) else {
            return null("chunk");
        };
        if out_range.is_null() {
            return null("out_range");
        }
        match stream::usage_event(chunk) {
            Some(r) => {
                // SAFETY: non-null, two writable u64s by contract.
                unsafe {
                    *out_range = r.start as u64;
                    *out_range.add(1) = r.end as u64;
                }
                rsb_result::RSB_OK
            }
            None => rsb_result::RSB_NO_NODE,
        }
    })
}

/// Read an answer's end (`crate::stream::parse_parts`): the usage, `finish_reason`
/// and `[DONE]` in the last `TAIL_BYTES` (4096) of each of its last two non-empty
/// buffers, `prev` then `last` (either may be empty).
///
/// # Safety
/// `prev` points to `prev_len` bytes, `last` to `last_len`; `out` writable.
#[no_mangle]
pub unsafe extern "C" fn rsb_answer_tail(
    prev: *const c_char,
    prev_len: usize,
    last: *const c_char,
    last_len: usize,
    out: *mut rsb_tail,
) -> rsb_result {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let (Some(prev), Some(last)) = (unsafe { bytes(prev, prev_len) }, unsafe { bytes(last, last_len) })
        else {
            return null("prev or last");
        };
        if out.is_null() {
            return null("out");
        }
        let t = stream::parse_parts(prev, last);
        let bit = |on: bool, f: SignalFlag| if on { f as u32 } else { 0 };
        let r = rsb_tail {
            prompt_tokens: t.prompt_tokens.unwrap_or(0),
            completion_tokens: t.completion_tokens.unwrap_or(0),
            flags: bit(t.completion_tokens.is_some(), SignalFlag::Usage)
                | bit(t.finished, SignalFlag::Finished)
                | bit(t.done, SignalFlag::Done),
        };
        // SAFETY: non-null (checked above) and writable by contract.
        unsafe { out.write(r) };
        rsb_result::RSB_OK
    })
}
