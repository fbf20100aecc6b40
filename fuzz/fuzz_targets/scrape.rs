//! The Prometheus text parser of queue scrapes (`rsbalancer::scrape::parse`): never
//! panics on any body, and every figure it returns is within its clamp (counts at
//! most `MAX_COUNT`, the KV-cache usage in 0..=1); the backlog never exceeds the
//! waiting count. The first byte picks the kind, the next four our in-flight count.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rsbalancer::config::ScrapeKind;
use rsbalancer::scrape::{backlog, parse, MAX_COUNT};

fuzz_target!(|data: &[u8]| {
    if data.len() < 5 {
        return;
    }
    let kind = match data[0] % 3 {
        0 => ScrapeKind::Vllm,
        1 => ScrapeKind::Sglang,
        _ => ScrapeKind::Auto,
    };
    let ours = u32::from_le_bytes(data[1..5].try_into().unwrap());
    let f = parse(&data[5..], kind);
    assert!(f.waiting.is_none_or(|w| w <= MAX_COUNT), "{f:?}");
    assert!(f.running.is_none_or(|r| r <= MAX_COUNT), "{f:?}");
    assert!(f.kv_usage.is_none_or(|u| (0.0..=1.0).contains(&u)), "{f:?}");
    assert!(backlog(&f, ours) <= f.waiting.unwrap_or(0), "{f:?}");
});
