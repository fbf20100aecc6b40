//! The admission queue's calls: arrive, poll, leave, release (`crate::admission`).

use super::*;

/// Admission of one request of `priority` (`RSB_PRIORITY_MIN..=RSB_PRIORITY_MAX`) to
/// pool `pool` (access phase). `*out_verdict` (`enum rsb_verdict`): `RSB_VERDICT_GO`
/// (an admission is held: call `rsb_admit_release` when the request ends),
/// `RSB_VERDICT_PASS` (queueing off, nothing to release), `RSB_VERDICT_QUEUED`
/// (`*out_entry` and `*out_value` = ticket: call `rsb_admit_poll` until it decides),
/// `RSB_VERDICT_NO_NODE` (`*out_value` = ms until a node may take it),
/// `RSB_VERDICT_SHED` (emergency), `RSB_VERDICT_FULL` (queue full); refusals carry a
/// Retry-After in ms in `*out_value`.
///
/// # Safety
/// `b` a live handle; `out_verdict`, `out_entry`, `out_value` writable.
#[no_mangle]
pub unsafe extern "C" fn rsb_admit(
    b: *const Balancer,
    pool: u32,
    priority: u32,
    out_verdict: *mut u32,
    out_entry: *mut u32,
    out_value: *mut u64,
) -> rsb_result {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let Some(b) = (unsafe { handle(b) }) else {
            return null("balancer");
        };
        if out_verdict.is_null() || out_entry.is_null() || out_value.is_null() {
            return null("out_verdict, out_entry or out_value");
        }
        answer(
            crate::admission::admit(b, pool, priority),
            |(verdict, entry, value)| {
                // SAFETY: non-null and writable by contract.
                unsafe {
                    *out_verdict = verdict as u32;
                    *out_entry = entry;
                    *out_value = value;
                }
            },
        )
    })
}

/// Poll a queued request (`entry`, `ticket` from `rsb_admit`). `*out_verdict`:
/// `RSB_VERDICT_GO` (an admission is held), `RSB_VERDICT_GO_PROBE` (as go, into a probe
/// slot: pick with `RSB_PREFER_PROBE`), `RSB_VERDICT_WAIT` (still waiting),
/// `RSB_VERDICT_TIMED_OUT` (waited too long), `RSB_VERDICT_EVICTED` (pushed out by a
/// higher priority); refusals carry a Retry-After in ms in `*out_value`. An `entry`
/// that is not one of the pool's queue entries: `RSB_INVALID_ARGUMENT`.
///
/// # Safety
/// `b` a live handle; `out_verdict` and `out_value` writable.
#[no_mangle]
pub unsafe extern "C" fn rsb_admit_poll(
    b: *const Balancer,
    pool: u32,
    entry: u32,
    ticket: u64,
    out_verdict: *mut u32,
    out_value: *mut u64,
) -> rsb_result {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let Some(b) = (unsafe { handle(b) }) else {
            return null("balancer");
        };
        if out_verdict.is_null() || out_value.is_null() {
            return null("out_verdict or out_value");
        }
        answer(
            crate::admission::admit_poll(b, pool, entry, ticket),
            |(verdict, value)| {
                // SAFETY: non-null and writable by contract.
                unsafe {
                    *out_verdict = verdict as u32;
                    *out_value = value;
                }
            },
        )
    })
}

/// The client of a queued request left: take it out of the queue (a slot it was
/// given goes to the next waiter). `*out_left` is 1 if it was still queued. An
/// `entry` that is not one of the pool's queue entries: `RSB_INVALID_ARGUMENT`.
///
/// # Safety
/// `b` a live handle; `out_left` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn rsb_admit_leave(
    b: *const Balancer,
    pool: u32,
    entry: u32,
    ticket: u64,
    out_left: *mut u32,
) -> rsb_result {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let Some(b) = (unsafe { handle(b) }) else {
            return null("balancer");
        };
        answer(crate::admission::admit_leave(b, pool, entry, ticket), |left| {
            if !out_left.is_null() {
                // SAFETY: non-null and writable by contract.
                unsafe { *out_left = left as u32 };
            }
        })
    })
}

/// Release the admission of a request that ended (log phase); the best waiter of the
/// pool takes the slot.
///
/// # Safety
/// `b` a live handle.
#[no_mangle]
pub unsafe extern "C" fn rsb_admit_release(b: *const Balancer, pool: u32) -> rsb_result {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let Some(b) = (unsafe { handle(b) }) else {
            return null("balancer");
        };
        crate::admission::admit_release(b, pool).map_or_else(fail, |_| rsb_result::RSB_OK)
    })
}
