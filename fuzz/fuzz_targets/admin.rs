//! The admin API's body parser (`rsbalancer::admin::body::parse`, what
//! `resty.rsbalancer.admin` hands every changing route's body to): never panics; a
//! refusal is 400 or 413 and says what is wrong; an accepted body is one JSON object
//! with no repeated key, every value within its bounds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rsbalancer::admin::body::{parse, Request, Route, MAX_BODY, WEIGHT};

fuzz_target!(|data: &[u8]| {
    let Some((&r, body)) = data.split_first() else {
        return;
    };
    let route = Route::ALL[r as usize % Route::ALL.len()];
    match parse(route, body) {
        Err(e) => {
            assert!(e.status == 400 || e.status == 413, "status {}", e.status);
            assert_eq!(e.status == 413, body.len() > MAX_BODY, "{e}");
            assert!(!e.message.is_empty());
        }
        Ok(req) => {
            assert!(body.len() <= MAX_BODY);
            // One object, each key once: serde_json's map (which keeps the last of a
            // repeated key) has as many keys as the request has fields set.
            let v: serde_json::Value = serde_json::from_slice(body).expect("accepted body is JSON");
            let keys = v.as_object().expect("accepted body is an object").len();
            let set = match &req {
                Request::Node { weight, drain } => weight.is_some() as usize + drain.is_some() as usize,
                Request::AddNode {
                    weight,
                    backup,
                    provider,
                    ..
                } => 2 + weight.is_some() as usize + backup.is_some() as usize + provider.len(),
                Request::Canary { .. } | Request::Emergency { .. } => 1,
            };
            assert_eq!(keys, set, "{req:?}");
            match req {
                Request::Node { weight, drain } => {
                    assert!(weight.is_some() || drain.is_some());
                    assert!(weight.is_none_or(|w| WEIGHT.contains(&w)));
                }
                Request::AddNode { weight, .. } => assert!(weight.is_none_or(|w| WEIGHT.contains(&w))),
                Request::Canary { share } => assert!((0.0..=1.0).contains(&share)),
                Request::Emergency { .. } => {}
            }
        }
    }
});
