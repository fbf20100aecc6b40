//! The provider headroom header parsers (`rsbalancer::headers::{count, reset_ms,
//! millis}`: remaining counts, OpenAI durations and RFC 3339 resets,
//! `retry-after-ms`): never panic, and never return more than their cap.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 12 {
        return;
    }
    let (head, value) = data.split_at(12);
    let now_unix_ms = u64::from_le_bytes(head[..8].try_into().unwrap());
    let cap = u32::from_le_bytes(head[8..12].try_into().unwrap());
    if let Some(ms) = rsbalancer::headers::reset_ms(value, now_unix_ms, cap) {
        assert!(ms <= cap, "reset {ms} ms over the cap of {cap} ms");
    }
    if let Some(ms) = rsbalancer::headers::millis(value, cap) {
        assert!(ms <= cap, "retry-after-ms {ms} over the cap of {cap}");
    }
    if let Some(n) = rsbalancer::headers::count(value, cap as u64) {
        assert!(n <= cap as u64, "count {n} over the cap of {cap}");
    }
});
