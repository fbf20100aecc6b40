//! The prefix-affinity key (`rsbalancer::prefix::key`): never panics on any body and
//! any policy; a body serde_json refuses as an object has no key; a key is never
//! `NO_KEY`; and appending a turn (an assistant answer and a user question) to a chat
//! body that has a key keeps it (one with only system messages has none, and gets one).
#![no_main]

use libfuzzer_sys::fuzz_target;
use rsbalancer::prefix::{key, PrefixPolicy};
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Some((&[a, b], body)) = data.split_first_chunk::<2>() else {
        return;
    };
    let max_bytes = 64 + u32::from(b) * 16;
    let policy = PrefixPolicy {
        min_bytes: (u32::from(a) + 1).min(max_bytes),
        max_bytes,
        load_factor: 1.25,
    };
    let k = key(body, &policy);
    if k.is_some() && serde_json::from_slice::<serde_json::Map<String, Value>>(body).is_err() {
        // The grammar allows what serde_json's f64 and surrogate checks refuse.
        let e = serde_json::from_slice::<Value>(body)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.starts_with("number out of range") || e.contains("surrogate") || e.contains("hex escape"),
            "a key for a body that is not an object: {e}"
        );
    }
    assert_ne!(k, Some(rsbalancer::select::NO_KEY));
    let Ok(Value::Object(mut obj)) = serde_json::from_slice::<Value>(body) else {
        return;
    };
    let Some(Value::Array(msgs)) = obj.get_mut("messages") else {
        return;
    };
    msgs.push(serde_json::json!({ "role": "assistant", "content": "an answer" }));
    msgs.push(serde_json::json!({ "role": "user", "content": "and then?" }));
    // Re-serialised: a key over the same raw text needs the same spelling, so only a
    // body that serialises as it came is compared.
    let same = serde_json::to_vec(&serde_json::from_slice::<Value>(body).unwrap()).unwrap();
    if k.is_some() && same == body {
        let next = serde_json::to_vec(&obj).unwrap();
        assert_eq!(key(&next, &policy), k, "a later turn changed the key");
    }
});
