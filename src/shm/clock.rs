//! The one clock every process shares: `CLOCK_MONOTONIC_COARSE` in milliseconds.
//!
//! It is system-wide (all workers agree on it), never jumps with wall-clock changes,
//! and reading it through the vDSO costs a few nanoseconds, which the per-request
//! path can afford. Its resolution (a few ms) is far below the time scales it drives
//! (EWMA decay of seconds, cooldowns, slow start).

/// Coarse monotonic time in milliseconds.
pub fn now_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; clock_gettime only writes to it.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    debug_assert_eq!(rc, 0);
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}
