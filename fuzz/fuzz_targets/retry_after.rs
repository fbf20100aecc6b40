//! The Retry-After header parser (`rsbalancer::headers::retry_after_ms`:
//! delay-seconds with an optional fraction, or an HTTP-date, clamped to `cap_ms`):
//! never panics, and the result is never above `cap_ms`.
//!
//! Not in `fuzz/Cargo.toml`'s [[bin]] list until `rsbalancer::headers` lands on main
//! (see the comment there).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 12 {
        return;
    }
    let (head, value) = data.split_at(12);
    let now_unix_ms = u64::from_le_bytes(head[..8].try_into().unwrap());
    let cap_ms = u32::from_le_bytes(head[8..12].try_into().unwrap());
    if let Some(ms) = rsbalancer::headers::retry_after_ms(value, now_unix_ms, cap_ms) {
        assert!(ms <= cap_ms, "{ms} ms over the cap of {cap_ms} ms");
    }
});
