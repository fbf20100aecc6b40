//! The readers of LLM answers and the include_usage rewrite (`rsbalancer::stream`):
//! never panic on any bytes; `first_content` points at a `data:` line start;
//! `parse_parts` of two short pieces reads what `parse_tail` reads of them joined;
//! `usage_event` is a range of the chunk holding `"choices":[]`; a body
//! `add_include_usage` rewrites is still one JSON object (when serde_json parses the
//! original as one), with `stream_options.include_usage` true and every other
//! member as it was.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rsbalancer::stream::{
    add_include_usage, first_content, parse_parts, parse_tail, usage_event, TAIL_BYTES,
};
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    if let Some(at) = first_content(data) {
        assert!(data[at..].starts_with(b"data:"));
        assert!(at == 0 || data[at - 1] == b'\n');
    }
    let cut = data.first().map_or(0, |&c| c as usize).min(data.len());
    let (prev, last) = data.split_at(cut);
    if prev.len() <= TAIL_BYTES && last.len() <= TAIL_BYTES {
        assert_eq!(parse_parts(prev, last), parse_tail(data));
    }
    if let Some(r) = usage_event(data) {
        assert!(r.start < r.end && r.end <= data.len());
        assert!(data[r.clone()].windows(12).any(|w| w == b"\"choices\":[]"));
    }
    if let Ok(Some(body)) = add_include_usage(data) {
        let Ok(before) = serde_json::from_slice::<serde_json::Map<String, Value>>(data) else {
            return; // a body beyond serde_json (see the model target): compared no further
        };
        let mut after: serde_json::Map<String, Value> =
            serde_json::from_slice(&body).expect("the rewritten body is JSON");
        let opts = after.remove("stream_options").expect("stream_options");
        assert_eq!(opts["include_usage"], Value::Bool(true));
        let mut before = before;
        if let Some(Value::Object(mut o)) = before.remove("stream_options") {
            let mut a = opts.as_object().unwrap().clone();
            a.remove("include_usage");
            o.remove("include_usage");
            assert_eq!(a, o);
        }
        assert_eq!(before, after);
    }
});
