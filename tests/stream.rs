//! The stream-signal cost model (`rsbalancer::stream`) through the pool's API: the
//! slow-node check and p2c judge a node by its time to first token and time per
//! token, not by the length of the answers it happened to serve.

use std::time::Duration;

use rsbalancer::balancer::{Ask, Balancer, Prefer};
use rsbalancer::stream::{Signals, USAGE};
use serde_json::json;

mod common;
use common::{config, pick_exactly, slots};

/// One served stream on `node`: TTFT `ttft_ms`, then `tokens` at `tpot_ms` each.
fn stream(b: &Balancer, pool: u32, node: u32, all: &[u32], ttft_ms: u32, tpot_ms: u32, tokens: u32) {
    pick_exactly(b, pool, node, all);
    let latency_us = (ttft_ms + tpot_ms * tokens) * 1000;
    let s = Signals {
        ttft_us: ttft_ms * 1000,
        queue_us: 0,
        out_tokens: tokens,
        flags: USAGE,
    };
    b.report_llm(node, 200, latency_us, 0, &s).unwrap();
}

/// Plain reports of the same answers (no stream signals: a node without them).
fn plain(b: &Balancer, pool: u32, node: u32, all: &[u32], ttft_ms: u32, tpot_ms: u32, tokens: u32) {
    pick_exactly(b, pool, node, all);
    b.report(node, 200, (ttft_ms + tpot_ms * tokens) * 1000, 0)
        .unwrap();
}

type Feed = fn(&Balancer, u32, u32, &[u32], u32, u32, u32);

/// Which nodes `pick_fast` (primaries that are not slow) can pick, each tried alone
/// (the other excluded), after every node served answers as given by `(ttft_ms,
/// tpot_ms, tokens)`.
fn not_slow(feed: Feed, answers: &[(u32, u32, u32)]) -> Vec<usize> {
    let ids = ["a", "b"];
    let b = Balancer::create(&config(
        json!({ "algorithm": "p2c_ewma", "slow_start_ms": 0, "refresh_ms": 10,
                "limit": { "slow_factor": 2 } }),
        &ids,
    ))
    .unwrap();
    let pool = b.pool_index("p").unwrap();
    let all = slots(&b, &ids);
    for _ in 0..4 {
        for (i, &(ttft, tpot, tokens)) in answers.iter().enumerate() {
            for _ in 0..5 {
                feed(&b, pool, all[i], &all, ttft, tpot, tokens);
            }
        }
        std::thread::sleep(Duration::from_millis(20)); // past refresh_ms
    }
    (0..all.len())
        .filter(|&i| {
            let others: Vec<u32> = all.iter().copied().filter(|&s| s != all[i]).collect();
            match b.pick_fast(pool, &Ask::default(), &others, Prefer::Confirmed) {
                Ok(n) => {
                    b.report(n, 499, 0, 0).unwrap(); // released, says nothing of the node
                    true
                }
                Err(_) => false,
            }
        })
        .collect()
}

#[test]
fn a_node_that_served_long_answers_is_not_slow() {
    // a: fast TTFT (100 ms), 10 ms/token, 500-token answers (5.1 s each);
    // b: TTFT 300 ms, 10 ms/token, 10-token answers (0.4 s each).
    let answers = [(100, 10, 500), (300, 10, 10)];
    // Whole-response latency: a is 12x as slow as b, so it is set apart.
    assert_eq!(not_slow(plain, &answers), [1], "whole latency");
    // The cost model: for the pool's mean answer a is the faster one; neither is slow.
    assert_eq!(not_slow(stream, &answers), [0, 1], "cost model");
}

#[test]
fn a_node_with_a_slow_first_token_is_slow() {
    // Same answers, same time per token; b takes 3 s to its first token.
    let answers = [(100, 10, 50), (3000, 10, 50)];
    assert_eq!(not_slow(stream, &answers), [0], "cost model");
    // By whole latency too (0.6 s vs 3.5 s).
    assert_eq!(not_slow(plain, &answers), [0], "whole latency");
}

#[test]
fn p2c_prefers_the_node_with_the_better_model_for_long_requests() {
    // a: TTFT 2 s, 1 ms/token; b: TTFT 100 ms, 30 ms/token. For 10 tokens b is
    // predicted faster (0.4 s vs 2.01 s); for 1000, a (3 s vs 30.1 s).
    let ids = ["a", "b"];
    let b = Balancer::create(&config(
        json!({ "algorithm": "p2c_ewma", "slow_start_ms": 0, "limit": { "slow_factor": 0 } }),
        &ids,
    ))
    .unwrap();
    let pool = b.pool_index("p").unwrap();
    let all = slots(&b, &ids);
    for _ in 0..5 {
        stream(&b, pool, all[0], &all, 2000, 1, 100);
        stream(&b, pool, all[1], &all, 100, 30, 100);
    }
    let picks = |max_tokens: u32| {
        let ask = Ask {
            key: b"",
            tokens: 0,
            max_tokens,
        };
        let mut n_a = 0;
        for _ in 0..100 {
            let n = b.pick_with(pool, &ask, &[], Prefer::Confirmed).unwrap();
            b.report(n, 499, 0, 0).unwrap();
            n_a += (n == all[0]) as u32;
        }
        n_a
    };
    // Two nodes, p2c over both, nothing in flight: the cheaper one every time.
    assert_eq!(picks(10), 0);
    assert_eq!(picks(1000), 100);
}
