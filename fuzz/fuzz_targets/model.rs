//! The model rewrite (`rsbalancer::model::rewrite_model`): never panics; what it
//! accepts serde_json parses as an object, with `"model"` now the new name and every
//! other member as it was; what serde_json parses as an object it accepts, unless a
//! top-level `"model"` is not a string or the nesting is at the bound. (JSON numbers
//! are not bounded, serde_json's f64 is; the grammar allows an unpaired surrogate
//! escape, serde_json refuses it: such bodies are compared no further.)
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = (n as usize % 32).min(rest.len());
    let (model, body) = rest.split_at(n);
    let model = String::from_utf8_lossy(model);
    let parsed = serde_json::from_slice::<serde_json::Map<String, Value>>(body);
    let beyond_serde = |e: &serde_json::Error| {
        let m = e.to_string();
        m.starts_with("number out of range") || m.contains("surrogate") || m.contains("hex escape")
    };
    if parsed.as_ref().is_err_and(beyond_serde) {
        let _ = rsbalancer::model::rewrite_model(body, &model);
        return;
    }
    let parsed = parsed.ok();
    match rsbalancer::model::rewrite_model(body, &model) {
        Ok(r) => {
            let before = parsed.expect("accepted a body serde_json refuses as an object");
            let mut after: serde_json::Map<String, Value> =
                serde_json::from_slice(&r.body).expect("the rewritten body is JSON");
            match &r.previous {
                Some(p) => {
                    assert_eq!(before.get("model"), Some(&Value::String(p.clone())));
                    assert_eq!(after.get("model"), Some(&Value::String(model.to_string())));
                }
                None => assert_eq!(r.body, body),
            }
            let mut before = before;
            before.remove("model");
            after.remove("model");
            assert_eq!(before, after, "members other than model changed");
        }
        Err(e) => {
            if parsed.is_some() {
                let e = e.to_string();
                assert!(
                    e.contains("\"model\" is not a string") || e.contains("nested deeper"),
                    "refused an object serde_json takes: {e}"
                );
            }
        }
    }
});
