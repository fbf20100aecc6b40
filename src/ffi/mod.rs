//! The C ABI: `include/rsbalancer.h`, generated from this file by cbindgen.
//!
//! Conventions (after rustls-ffi):
//! - every symbol and type starts with `rsb_`; handles are opaque (`rsb_balancer`);
//! - every function returns an `rsb_result` (0 = `RSB_OK`) and writes its outputs
//!   only on success; the message of the last failure in this thread is available from
//!   `rsb_last_error`;
//! - no panic crosses the boundary: every body runs inside [`guard`], which turns a
//!   panic into `RSB_PANIC`;
//! - at most 8 arguments per function (LuaJIT's FFI on arm64 mishandles more);
//! - node and pool arguments are slot indices from `rsb_pool_index` / `rsb_pick`.

#![allow(non_camel_case_types)]

use std::cell::RefCell;
use std::ffi::{c_char, c_int};
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::abi::PreferFlag;
use crate::balancer::{Ask, Balancer, Error, Prefer};

mod admission;
mod headroom;
mod request;
mod stream;

use crate::config::Config;
pub use admission::*;
pub use headroom::*;
pub use request::*;
pub use stream::*;

/// Result codes. Stable numbers: new codes are only ever appended.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum rsb_result {
    RSB_OK = 0,
    /// A required pointer argument was NULL.
    RSB_NULL_ARGUMENT = 1,
    /// An argument is out of range or names no pool / node.
    RSB_INVALID_ARGUMENT = 2,
    /// The configuration was refused (the message names the field and value).
    RSB_CONFIG = 3,
    /// No node of the pool can take a try now.
    RSB_NO_NODE = 4,
    /// Shared memory could not be mapped, locked or written.
    RSB_SHM = 5,
    /// A bug: a panic was caught at the boundary.
    RSB_PANIC = 6,
}

/// Live numbers of one node (a copy).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct rsb_node_stats {
    pub weight: u32,
    pub inflight: u32,
    /// Tries reported plus tries in flight.
    pub picks: u64,
    pub requests: u64,
    pub failures: u64,
    pub busy: u64,
    pub latency_sum_us: u64,
    pub ewma_us: f64,
    pub backup: c_int,
}

thread_local! {
    static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
}

fn set_error(msg: String) {
    LAST_ERROR.with(|e| *e.borrow_mut() = msg);
}

/// The answer to a failure, with its message kept for `rsb_last_error`. Out of line,
/// as is [`null`]: the entries inline their bodies, whose common path stays short.
#[cold]
#[inline(never)]
fn fail(e: Error) -> rsb_result {
    let code = match &e {
        Error::Config(_) => rsb_result::RSB_CONFIG,
        Error::Shm(_) => rsb_result::RSB_SHM,
        Error::Invalid(_) => rsb_result::RSB_INVALID_ARGUMENT,
        Error::NoNode { .. } => rsb_result::RSB_NO_NODE,
    };
    set_error(e.to_string());
    code
}

/// Hand the value of `result` to `write` (which stores the outputs) and answer
/// `RSB_OK`, or answer its error with nothing written: the end of every function
/// with outputs.
fn answer<T>(result: Result<T, Error>, write: impl FnOnce(T)) -> rsb_result {
    result.map_or_else(fail, |v| {
        write(v);
        rsb_result::RSB_OK
    })
}

/// [`answer`] for a function with one output, stored in `*out`.
///
/// # Safety
/// `out` non-null and writable.
unsafe fn put<T>(out: *mut T, result: Result<T, Error>) -> rsb_result {
    // SAFETY: forwarded caller contract.
    answer(result, |v| unsafe { *out = v })
}

/// Run an ABI body, turning a panic into `RSB_PANIC` with its message kept. Inlined
/// into each entry, so that the body's arguments stay in registers (a call to it
/// stored them into the closure and loaded them back: ~20 instructions a call).
#[inline(always)]
fn guard(body: impl FnOnce() -> rsb_result) -> rsb_result {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or_else(panicked)
}

/// `guard`'s answer to a panic, out of every entry's path.
#[cold]
#[inline(never)]
fn panicked(p: Box<dyn std::any::Any + Send>) -> rsb_result {
    let msg = p
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    set_error(format!("internal error (panic): {msg}"));
    rsb_result::RSB_PANIC
}

#[cold]
#[inline(never)]
fn null(what: &str) -> rsb_result {
    set_error(format!("{what} is NULL"));
    rsb_result::RSB_NULL_ARGUMENT
}

/// Borrow `len` bytes at `ptr` (NULL allowed when `len` is 0).
///
/// # Safety
/// When `len > 0`, `ptr` must point to `len` readable bytes valid for `'a`.
unsafe fn bytes<'a>(ptr: *const c_char, len: usize) -> Option<&'a [u8]> {
    if len == 0 {
        return Some(&[]);
    }
    if ptr.is_null() {
        return None;
    }
    // SAFETY: non-null and, by the caller's contract, `len` readable bytes.
    Some(unsafe { std::slice::from_raw_parts(ptr.cast::<u8>(), len) })
}

/// Borrow `len` u32s at `ptr` (NULL allowed when `len` is 0).
///
/// # Safety
/// When `len > 0`, `ptr` must point to `len` readable, aligned u32s valid for `'a`.
unsafe fn u32s<'a>(ptr: *const u32, len: usize) -> Option<&'a [u32]> {
    if len == 0 {
        return Some(&[]);
    }
    if ptr.is_null() {
        return None;
    }
    // SAFETY: non-null and, by the caller's contract, `len` readable u32s.
    Some(unsafe { std::slice::from_raw_parts(ptr, len) })
}

fn utf8<'a>(b: &'a [u8], what: &str) -> Result<&'a str, rsb_result> {
    std::str::from_utf8(b).map_err(|_| {
        set_error(format!("{what} is not UTF-8"));
        rsb_result::RSB_INVALID_ARGUMENT
    })
}

/// Borrow the handle behind `b`.
///
/// # Safety
/// `b` must be NULL or a live handle from `rsb_balancer_new` (or the mlua module).
unsafe fn handle<'a>(b: *const Balancer) -> Option<&'a Balancer> {
    // SAFETY: by the caller's contract the pointer is NULL or valid for reads.
    unsafe { b.as_ref() }
}

macro_rules! try_rsb {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(code) => return code,
        }
    };
}

fn parse_config(json: &[u8]) -> Result<Config, rsb_result> {
    let text = utf8(json, "config")?;
    Config::from_json(text).map_err(|e| fail(Error::Config(e)))
}

/// Create a balancer with a new shared region from a JSON config (see docs/configuration.md).
/// Create it before forking: children share the region.
///
/// # Safety
/// `json` must point to `len` readable bytes; `out` must be writable.
#[no_mangle]
pub unsafe extern "C" fn rsb_balancer_new(
    json: *const c_char,
    len: usize,
    out: *mut *mut Balancer,
) -> rsb_result {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let Some(text) = (unsafe { bytes(json, len) }) else {
            return null("json");
        };
        if out.is_null() {
            return null("out");
        }
        let cfg = try_rsb!(parse_config(text));
        let created = Balancer::create(&cfg).map(|b| Box::into_raw(Box::new(b)));
        // SAFETY: `out` is non-null (checked above) and writable by contract.
        unsafe { put(out, created) }
    })
}

/// Free a balancer from `rsb_balancer_new`. NULL is a no-op. Other processes that
/// share the region keep it.
///
/// # Safety
/// `b` must be NULL or a handle from `rsb_balancer_new` not yet freed; handles
/// obtained from the Lua module are borrowed and must not be freed.
#[no_mangle]
pub unsafe extern "C" fn rsb_balancer_free(b: *mut Balancer) {
    let _ = guard(|| {
        if !b.is_null() {
            // SAFETY: created by Box::into_raw in rsb_balancer_new, freed once.
            drop(unsafe { Box::from_raw(b) });
        }
        rsb_result::RSB_OK
    });
}

/// Replace the configuration. Nodes whose (pool, id) remain keep their learned state.
/// On error nothing changes.
///
/// # Safety
/// `b` a live handle; `json` points to `len` readable bytes.
#[no_mangle]
pub unsafe extern "C" fn rsb_configure(b: *const Balancer, json: *const c_char, len: usize) -> rsb_result {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let (Some(b), Some(text)) = (unsafe { handle(b) }, unsafe { bytes(json, len) }) else {
            return null("balancer or json");
        };
        let cfg = try_rsb!(parse_config(text));
        b.configure(&cfg).map_or_else(fail, |_| rsb_result::RSB_OK)
    })
}

/// Claim a worker slot (nginx: `ngx.worker.id()`) for in-flight accounting,
/// reclaiming what dead workers left. `out_slot` may be NULL.
///
/// # Safety
/// `b` a live handle; `out_slot` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn rsb_attach_worker(
    b: *const Balancer,
    worker: u32,
    out_slot: *mut u32,
) -> rsb_result {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let Some(b) = (unsafe { handle(b) }) else {
            return null("balancer");
        };
        answer(b.attach_worker(worker), |w| {
            if !out_slot.is_null() {
                // SAFETY: non-null and writable by contract.
                unsafe { *out_slot = w };
            }
        })
    })
}

/// Index of a pool by name.
///
/// # Safety
/// `b` a live handle; `name` points to `len` bytes; `out` writable.
#[no_mangle]
pub unsafe extern "C" fn rsb_pool_index(
    b: *const Balancer,
    name: *const c_char,
    len: usize,
    out: *mut u32,
) -> rsb_result {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let (Some(b), Some(name)) = (unsafe { handle(b) }, unsafe { bytes(name, len) }) else {
            return null("balancer or name");
        };
        if out.is_null() {
            return null("out");
        }
        let name = try_rsb!(utf8(name, "pool name"));
        // SAFETY: `out` is non-null (checked above) and writable by contract.
        unsafe { put(out, b.pool_index(name)) }
    })
}

/// Slot of the node `id` in pool `pool` (by name).
///
/// # Safety
/// `b` a live handle; `pool`/`id` point to `pool_len`/`id_len` bytes; `out` writable.
#[no_mangle]
pub unsafe extern "C" fn rsb_node_index(
    b: *const Balancer,
    pool: *const c_char,
    pool_len: usize,
    id: *const c_char,
    id_len: usize,
    out: *mut u32,
) -> rsb_result {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let (Some(b), Some(pool), Some(id)) =
            (unsafe { handle(b) }, unsafe { bytes(pool, pool_len) }, unsafe {
                bytes(id, id_len)
            })
        else {
            return null("balancer, pool or id");
        };
        if out.is_null() {
            return null("out");
        }
        let (pool, id) = (try_rsb!(utf8(pool, "pool name")), try_rsb!(utf8(id, "node id")));
        // SAFETY: `out` is non-null (checked above) and writable by contract.
        unsafe { put(out, b.node_index(pool, id)) }
    })
}

/// The region's generation: changes with every topology or weight change. 0 for NULL.
///
/// # Safety
/// `b` NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn rsb_generation(b: *const Balancer) -> u64 {
    // SAFETY: forwarded caller contract.
    unsafe { handle(b) }.map_or(0, Balancer::generation)
}

/// Where the region's generation ([`rsb_generation`]) is kept: an aligned 64-bit word
/// in shared memory, valid as long as the handle, so that a caller can check it on
/// every request without a call (an aligned 64-bit load; on a change, ask
/// `rsb_generation`, which orders the reads of the new topology after it). NULL for
/// NULL.
///
/// # Safety
/// `b` NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn rsb_generation_word(b: *const Balancer) -> *const u64 {
    // SAFETY: forwarded caller contract.
    unsafe { handle(b) }.map_or(std::ptr::null(), Balancer::generation_word)
}

/// Copy the last error message of this thread into `buf` (NUL-terminated, truncated
/// to `cap - 1` bytes). Returns the message's full length; `buf` may be NULL to ask.
///
/// # Safety
/// `buf` NULL or writable for `cap` bytes.
#[no_mangle]
pub unsafe extern "C" fn rsb_last_error(buf: *mut c_char, cap: usize) -> usize {
    LAST_ERROR.with(|e| {
        let msg = e.borrow();
        if !buf.is_null() && cap > 0 {
            let n = msg.len().min(cap - 1);
            // SAFETY: `buf` is writable for `cap > n` bytes by contract.
            unsafe {
                std::ptr::copy_nonoverlapping(msg.as_ptr(), buf.cast::<u8>(), n);
                *buf.add(n) = 0;
            }
        }
        msg.len()
    })
}

/// Parse a response's `Retry-After` value (`len` bytes at `value`): delay-seconds
/// (a fraction allowed) or an HTTP-date, as milliseconds from now, saturating at
/// one day (86,400,000 ms). A date in the past gives 0. Anything else
/// (empty, `inf`, `-1`, `1e9`, a bad date) answers `RSB_INVALID_ARGUMENT` with nothing
/// written. The pool's `cooldown.max_retry_after_ms` is applied by `rsb_report`.
///
/// # Safety
/// `value` points to `len` readable bytes (NULL allowed when `len` is 0);
/// `out_ms` writable.
#[no_mangle]
pub unsafe extern "C" fn rsb_retry_after_ms(
    value: *const c_char,
    len: usize,
    out_ms: *mut u32,
) -> rsb_result {
    // SAFETY: forwarded caller contract.
    unsafe {
        parse_ms(value, len, out_ms, "Retry-After", |v| {
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            crate::headers::retry_after_ms(v, now_ms, crate::headers::RETRY_AFTER_MAX_MS)
        })
    }
}

/// A header value (`len` bytes at `value`) parsed into milliseconds by `parse`,
/// written to `out_ms`; `RSB_INVALID_ARGUMENT` (nothing written) when it is not a
/// `what` value.
///
/// # Safety
/// `value` points to `len` readable bytes (NULL allowed when `len` is 0); `out_ms`
/// writable.
unsafe fn parse_ms(
    value: *const c_char,
    len: usize,
    out_ms: *mut u32,
    what: &str,
    parse: impl FnOnce(&[u8]) -> Option<u32>,
) -> rsb_result {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let Some(v) = (unsafe { bytes(value, len) }) else {
            return null("value");
        };
        if out_ms.is_null() {
            return null("out_ms");
        }
        let parsed = parse(v).ok_or_else(|| Error::Invalid(format!("not a {what} value")));
        // SAFETY: `out_ms` is non-null (checked above) and writable by contract.
        unsafe { put(out_ms, parsed) }
    })
}

/// The library version, a static NUL-terminated string.
#[no_mangle]
pub extern "C" fn rsb_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}
