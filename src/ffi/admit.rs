//! The admission queue's calls: arrive, poll, leave, release (`crate::admit`).

use super::*;

/// Admission of one request of `priority` (1..=10) to pool `pool` (access phase).
/// `*out_verdict`: 0 go (an admission is held: call `rsb_admit_release` when the
/// request ends), 1 go (queueing off, nothing to release), 2 queued (`*out_entry` and
/// `*out_value` = ticket: call `rsb_admit_poll` until it decides), 4 no node can take
/// it (`*out_value` = ms until one may), 5 shed (emergency), 6 queue full;
/// refusals carry a Retry-After in ms in `*out_value`.
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
            crate::admit::admit(b, pool, priority),
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

/// Poll a queued request (`entry`, `ticket` from `rsb_admit`). `*out_verdict`: 0 go
/// (an admission is held), 9 go into a probe slot (as 0; pick with
/// `rsb_pick_prefer(..., 1, ...)`), 3 still waiting, 7 waited too long, 8 evicted by a
/// higher priority; refusals carry a Retry-After in ms in `*out_value`. An `entry`
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
            crate::admit::admit_poll(b, pool, entry, ticket),
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
        answer(crate::admit::admit_leave(b, pool, entry, ticket), |left| {
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
        crate::admit::admit_release(b, pool).map_or_else(fail, |_| rsb_result::RSB_OK)
    })
}
