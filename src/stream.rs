//! Stream signals of LLM nodes: time to first token, output tokens, whether a stream
//! ended as it should, and the cost model they feed.
//!
//! An LLM answer's latency is not one number: a node that queues a request holds it
//! open (DeepSeek sends `: keep-alive` comments or blank lines until it starts), then
//! streams one token after another. The whole-response latency mixes the node's speed
//! with the answer's length: a node that happened to get long answers looks slow.
//! What a node does is better told by two figures, as the latency predictors of
//! llm-d and the Gateway API Inference Extension do:
//!
//! - **TTFT**, time to first token: from the try's pick to the first SSE `data:` event
//!   with content (not a comment, not a blank line, not `[DONE]`). The part of it the
//!   node spent sending keep-alive comments before that event is its **queue** figure.
//! - **TPOT**, time per output token: (whole latency − TTFT) / completion tokens, the
//!   tokens read from `usage` in the stream's final chunk. Only streams feed it (a
//!   JSON answer has no first-token time to subtract); JSON answers feed the token
//!   counts only.
//!
//! The **cost model**: a request's predicted latency on a node is
//! `TTFT + TPOT × expected tokens`, the expected tokens being the request's
//! `max_tokens` when it names one, else the pool's recent mean completion tokens.
//! p2c compares that figure (times in-flight + 1) for nodes that have sent these
//! signals, and the slow-node check compares nodes by it for the pool's mean answer,
//! so that a node is judged by its speed, not by the length of what it was asked;
//! nodes that never sent them keep the whole-response peak EWMA (`crate::load`).
//!
//! The Lua side (`body_filter()`) finds the first content event per chunk only until
//! it is seen ([`first_content`]); after it a chunk costs one branch and two table
//! writes (the two latest non-empty chunks are kept by reference), and the tail is
//! read once, at the end of the body ([`parse_tail`]): usage, `finish_reason`,
//! `[DONE]`. A stream (`Content-Type: text/event-stream`, 2xx, for a request whose
//! body has `"stream": true`: another event stream need not end so) whose body ends
//! without `[DONE]` and without a `finish_reason` was cut by its node: it is reported
//! as a failure of the node (502) and counted in `stream_failures`.
//!
//! With the pool option `stream.add_usage` (default off: the request body is the
//! client's), a streamed request that did not set `stream_options.include_usage` gets
//! it added ([`add_include_usage`], every other byte kept), and the extra usage-only
//! chunk (`"choices":[]`) is removed from what the client receives.
//!
//! Everything read from a body is bounded here: at most [`TAIL_BYTES`] of the tail are
//! looked at, and token counts are capped at [`crate::ask::MAX_TOKENS`].
//!
//! ```
//! use rsbalancer::stream::{first_content, parse_tail};
//! assert_eq!(first_content(b": keep-alive\n\n\n"), None);
//! assert_eq!(first_content(b": keep-alive\n\ndata: {\"choices\":[]}\n\n"), Some(14));
//! let t = parse_tail(b"data: {\"choices\":[{\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":12}}\n\ndata: [DONE]\n\n");
//! assert_eq!((t.prompt_tokens, t.completion_tokens, t.finished, t.done), (Some(9), Some(12), true, true));
//! ```

use crate::abi::SignalFlag;
use crate::ask::MAX_TOKENS;
use crate::model::{is_key, top_members, BodyError};

/// Bytes of a body's end that [`parse_tail`] reads (the Lua side passes at most this
/// much of each of the last two chunks: a usage chunk may straddle two buffers).
pub const TAIL_BYTES: usize = 4096;

/// `Signals::flags`: `out_tokens` holds the answer's `usage.completion_tokens`.
pub const USAGE: u32 = SignalFlag::Usage as u32;
/// `Signals::flags`: a stream that ended without `[DONE]` or a `finish_reason`.
pub const CUT: u32 = SignalFlag::Cut as u32;

/// What one try's answer said beyond its status and latency (`rsb_report_llm`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Signals {
    /// Time from the pick to the first content event (µs); 0: not a stream, or none.
    pub ttft_us: u32,
    /// Of that, the time after the first body bytes, which were keep-alive comments or
    /// blank lines (µs); 0 when the first bytes were the first token.
    pub queue_us: u32,
    /// `usage.completion_tokens` (with [`USAGE`]).
    pub out_tokens: u32,
    /// [`USAGE`], [`CUT`].
    pub flags: u32,
}

/// A pool's stream options (`stream` in a pool's config).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamPolicy {
    /// Ask nodes for `usage` in streams whose request does not
    /// (`stream_options.include_usage: true` added in `admit()`), and remove that
    /// extra chunk from what the client receives. Off by default.
    pub add_usage: bool,
}

/// The offset of the first SSE `data:` line (at a line start) whose payload is not
/// empty and not `[DONE]`: the first token event. `None` when the chunk holds only
/// comments (`: keep-alive`), blank lines, other fields or empty events.
pub fn first_content(chunk: &[u8]) -> Option<usize> {
    let mut at = 0;
    while at < chunk.len() {
        let end = chunk[at..]
            .iter()
            .position(|&c| c == b'\n')
            .map_or(chunk.len(), |p| at + p);
        let line = &chunk[at..end];
        if let Some(payload) = line.strip_prefix(b"data:") {
            let payload = payload.trim_ascii();
            if !payload.is_empty() && payload != b"[DONE]" {
                return Some(at);
            }
        }
        at = end + 1;
    }
    None
}

/// What the end of an answer says.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tail {
    /// `usage.prompt_tokens` of the last `usage` object.
    pub prompt_tokens: Option<u32>,
    /// `usage.completion_tokens` of the last `usage` object.
    pub completion_tokens: Option<u32>,
    /// A `finish_reason` with a string value (not `null`).
    pub finished: bool,
    /// A `data: [DONE]` line.
    pub done: bool,
}

impl Tail {
    /// A stream that ended as streams should: `[DONE]` or a `finish_reason`.
    pub fn complete(&self) -> bool {
        self.done || self.finished
    }
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    hay.get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

fn rfind(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).rposition(|w| w == needle)
}

fn skip_ws(s: &[u8], mut i: usize) -> usize {
    while i < s.len() && s[i].is_ascii_whitespace() {
        i += 1;
    }
    i
}

/// After a key ending at `i` (just past its closing quote): the start of its value.
fn value_at(s: &[u8], i: usize) -> Option<usize> {
    let i = skip_ws(s, i);
    (s.get(i) == Some(&b':')).then(|| skip_ws(s, i + 1))
}

/// A whole number at `i`, capped at [`MAX_TOKENS`].
fn number_at(s: &[u8], i: usize) -> Option<u32> {
    let digits = s.get(i..)?.iter().take_while(|c| c.is_ascii_digit()).count();
    if digits == 0 {
        return None;
    }
    let v = s[i..i + digits]
        .iter()
        .fold(0u64, |v, &d| (v * 10 + (d - b'0') as u64).min(MAX_TOKENS as u64));
    Some(v as u32)
}

/// The number of member `key` (quoted) in `obj`, searched from `from`.
fn member_number(s: &[u8], key: &[u8], from: usize) -> Option<u32> {
    let k = find(s, key, from)?;
    number_at(s, value_at(s, k + key.len())?)
}

/// Read the usage, `finish_reason` and `[DONE]` from the end of an answer (an SSE
/// stream's last events, or a JSON body's end). Only the last [`TAIL_BYTES`] x 2
/// bytes are looked at; a field cut off at the start of that window is not seen.
pub fn parse_tail(tail: &[u8]) -> Tail {
    let tail = &tail[tail.len().saturating_sub(2 * TAIL_BYTES)..];
    let mut t = Tail {
        done: find(tail, b"data: [DONE]", 0).is_some() || find(tail, b"data:[DONE]", 0).is_some(),
        ..Tail::default()
    };
    // The last usage object (a stream's final chunk; in a JSON body, the only one).
    let mut end = tail.len();
    while let Some(u) = rfind(&tail[..end], b"\"usage\"") {
        if let Some(v) = value_at(tail, u + 7).filter(|&v| tail.get(v) == Some(&b'{')) {
            let close = find(tail, b"}", v).unwrap_or(tail.len());
            let obj = &tail[..close];
            t.prompt_tokens = member_number(obj, b"\"prompt_tokens\"", v);
            t.completion_tokens = member_number(obj, b"\"completion_tokens\"", v);
            break;
        }
        end = u;
    }
    let mut from = 0;
    while let Some(f) = find(tail, b"\"finish_reason\"", from) {
        from = f + 15;
        if value_at(tail, from).is_some_and(|v| tail.get(v) == Some(&b'"')) {
            t.finished = true;
            break;
        }
    }
    t
}

/// [`parse_tail`] over the end of two consecutive pieces of a body (the last two
/// buffers of an answer: its final event may straddle them), at most [`TAIL_BYTES`]
/// of each, joined on the stack (no allocation).
pub fn parse_parts(prev: &[u8], last: &[u8]) -> Tail {
    let mut buf = [0u8; 2 * TAIL_BYTES];
    let last = &last[last.len().saturating_sub(TAIL_BYTES)..];
    let keep = (2 * TAIL_BYTES - last.len()).min(prev.len());
    let prev = &prev[prev.len() - keep..];
    buf[..prev.len()].copy_from_slice(prev);
    buf[prev.len()..prev.len() + last.len()].copy_from_slice(last);
    parse_tail(&buf[..prev.len() + last.len()])
}

/// The byte range of a usage-only SSE event (`"choices":[]`, what
/// `stream_options.include_usage` adds) in `chunk`: from its `data:` line to the end
/// of its blank line. `None` when the chunk holds none (or only part of one).
pub fn usage_event(chunk: &[u8]) -> Option<std::ops::Range<usize>> {
    let c = find(chunk, b"\"choices\":[]", 0)?;
    let start = rfind(&chunk[..c], b"data:")?;
    if start > 0 && chunk[start - 1] != b'\n' {
        return None;
    }
    let end = find(chunk, b"\n\n", c)
        .map(|e| e + 2)
        .or_else(|| find(chunk, b"\r\n\r\n", c).map(|e| e + 4))?;
    Some(start..end)
}

/// A streamed request's body with `stream_options.include_usage: true` added, every
/// other byte kept: into an existing `stream_options` object, or as a new last
/// member. `Ok(None)` when it needs none (not streamed, `include_usage` already set
/// either way, or a `stream_options` that is not an object). The body is checked
/// whole as JSON (`crate::model`).
pub fn add_include_usage(body: &[u8]) -> Result<Option<Vec<u8>>, BodyError> {
    let (mut stream, mut options, mut has_usage) = (false, None, false);
    top_members(body, "ask for usage", &mut |key, value| {
        let v = &body[value.clone()];
        if is_key(key, "stream") {
            stream = v == b"true";
        } else if is_key(key, "stream_options") {
            options = Some(value.clone());
            if v.first() == Some(&b'{') {
                top_members(v, "ask for usage", &mut |k, _| {
                    has_usage |= is_key(k, "include_usage");
                    Ok(())
                })?;
            }
        }
        Ok(())
    })?;
    if !stream || has_usage {
        return Ok(None);
    }
    let mut out = Vec::with_capacity(body.len() + 40);
    match options {
        Some(r) if body[r.start] == b'{' => {
            let inner_empty = body[r.start + 1..r.end - 1].trim_ascii().is_empty();
            out.extend_from_slice(&body[..r.start + 1]);
            out.extend_from_slice(br#""include_usage":true"#);
            if !inner_empty {
                out.push(b',');
            }
            out.extend_from_slice(&body[r.start + 1..]);
        }
        Some(_) => return Ok(None),
        None => {
            // A streamed body has at least one member: add ours after the last.
            let close = body.iter().rposition(|&c| c == b'}').expect("a JSON object");
            out.extend_from_slice(&body[..close]);
            out.extend_from_slice(br#","stream_options":{"include_usage":true}"#);
            out.extend_from_slice(&body[close..]);
        }
    }
    Ok(Some(out))
}

/// The smoothing of a pool's mean completion tokens: each answer weighs 1/16.
const MEAN_WEIGHT: f64 = 1.0 / 16.0;

/// A pool's mean completion tokens after an answer of `tokens` (`mean` 0: none yet).
pub fn next_mean(mean: f64, tokens: u32) -> f64 {
    if mean <= 0.0 {
        tokens as f64
    } else {
        mean + (tokens as f64 - mean) * MEAN_WEIGHT
    }
}

/// The time per output token of one stream: what came after the first token, per
/// completion token. `None` without tokens or with a TTFT not below the latency.
pub fn tpot_sample(latency_us: u32, ttft_us: u32, tokens: u32) -> Option<f64> {
    (tokens > 0 && ttft_us > 0 && latency_us > ttft_us).then(|| (latency_us - ttft_us) as f64 / tokens as f64)
}

/// The cost model: a request's predicted latency (µs) on a node with time to first
/// token `ttft_us` and time per output token `tpot_us`, for `expected` tokens.
pub fn predicted_us(ttft_us: f64, tpot_us: f64, expected: f64) -> f64 {
    ttft_us + tpot_us * expected
}

/// Tokens a request is expected to produce: its `max_tokens`, else the pool's mean.
pub fn expected_tokens(max_tokens: u32, mean: f64) -> f64 {
    if max_tokens > 0 {
        max_tokens as f64
    } else {
        mean.max(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_content_skips_keep_alives_and_done() {
        assert_eq!(first_content(b""), None);
        assert_eq!(first_content(b"\n\n\n"), None);
        assert_eq!(first_content(b": keep-alive\n\n: keep-alive\n\n"), None);
        assert_eq!(first_content(b"data: [DONE]\n\n"), None);
        assert_eq!(first_content(b"data:\n\ndata:   \n\n"), None);
        assert_eq!(first_content(b"event: x\ndata: {\"a\":1}\n\n"), Some(9));
        assert_eq!(first_content(b"data:{\"a\":1}"), Some(0));
        // "data:" inside a comment or mid-line is not a field.
        assert_eq!(first_content(b": data: x\n\n"), None);
        assert_eq!(first_content(b"\r\n\r\ndata: {}\r\n\r\n"), Some(4));
    }

    #[test]
    fn tail_reads_usage_finish_and_done() {
        let t = parse_tail(br#"{"id":"x","choices":[{"message":{"content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":10,"total_tokens":15}}"#);
        assert_eq!(
            t,
            Tail {
                prompt_tokens: Some(5),
                completion_tokens: Some(10),
                finished: true,
                done: false
            }
        );
        assert!(t.complete());
        let t =
            parse_tail(b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"},\"finish_reason\":null}]}\n\n");
        assert_eq!(t, Tail::default());
        assert!(!t.complete());
        // usage: null in every chunk, the object in the last.
        let t = parse_tail(b"data: {\"choices\":[],\"usage\":null}\n\ndata: {\"choices\":[],\"usage\": {\"completion_tokens\" : 7,\"prompt_tokens\":3}}\n\ndata: [DONE]\n\n");
        assert_eq!(
            (t.prompt_tokens, t.completion_tokens, t.done, t.finished),
            (Some(3), Some(7), true, false)
        );
        // Bounded numbers.
        let t = parse_tail(br#"{"usage":{"completion_tokens":99999999999999999999999}}"#);
        assert_eq!(t.completion_tokens, Some(MAX_TOKENS));
        // Only the end is read.
        let mut long = br#"{"usage":{"completion_tokens":5}}"#.to_vec();
        long.extend(std::iter::repeat_n(b' ', 3 * TAIL_BYTES));
        assert_eq!(parse_tail(&long).completion_tokens, None);
    }

    #[test]
    fn parts_join_a_straddling_usage_chunk() {
        let t = parse_parts(
            b"xx data: {\"choices\":[],\"usage\":{\"prompt_to",
            b"kens\":4,\"completion_tokens\":6}}\n\ndata: [DONE]\n\n",
        );
        assert_eq!(
            (t.prompt_tokens, t.completion_tokens, t.done),
            (Some(4), Some(6), true)
        );
        let big = vec![b'x'; 3 * TAIL_BYTES];
        assert_eq!(parse_parts(&big, &big), Tail::default());
        assert!(parse_parts(b"", b"data: [DONE]").done);
    }

    #[test]
    fn usage_event_is_found_whole() {
        let c = b"data: {\"choices\":[{\"finish_reason\":\"stop\"}]}\n\ndata: {\"choices\":[],\"usage\":{\"completion_tokens\":3}}\n\ndata: [DONE]\n\n";
        let r = usage_event(c).unwrap();
        let mut out = c[..r.start].to_vec();
        out.extend_from_slice(&c[r.end..]);
        assert_eq!(
            out,
            b"data: {\"choices\":[{\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n"
        );
        assert_eq!(usage_event(b"data: {\"choices\":[],\"usage\":{}"), None);
        assert_eq!(usage_event(b"data: {\"choices\":[{}]}\n\n"), None);
    }

    #[test]
    fn include_usage_is_added_byte_preserving() {
        let add = |b: &[u8]| {
            add_include_usage(b)
                .unwrap()
                .map(|v| String::from_utf8(v).unwrap())
        };
        assert_eq!(
            add(br#"{"model":"m", "stream": true }"#).as_deref(),
            Some(r#"{"model":"m", "stream": true ,"stream_options":{"include_usage":true}}"#)
        );
        assert_eq!(
            add(br#"{"stream":true,"stream_options":{}}"#).as_deref(),
            Some(r#"{"stream":true,"stream_options":{"include_usage":true}}"#)
        );
        assert_eq!(
            add(br#"{"stream":true,"stream_options":{"x":1}}"#).as_deref(),
            Some(r#"{"stream":true,"stream_options":{"include_usage":true,"x":1}}"#)
        );
        assert_eq!(
            add(br#"{"stream":true,"stream_options":{"include_usage":false}}"#),
            None
        );
        assert_eq!(add(br#"{"stream":false}"#), None);
        assert_eq!(add(br#"{"stream":true,"stream_options":null}"#), None);
        assert!(add_include_usage(b"{\"stream\":true").is_err());
        // The result is still what ask::inspect reads as asking for usage.
        let b = add_include_usage(br#"{"stream":true,"max_tokens":5}"#)
            .unwrap()
            .unwrap();
        assert_eq!(crate::ask::inspect(&b).unwrap().include_usage, Some(true));
    }

    #[test]
    fn cost_model_prefers_fast_tokens_over_short_history() {
        // Node A served long answers: 400 ms TTFT, 10 ms/token; node B short ones,
        // 3 s TTFT, 10 ms/token. For a 100-token request A is predicted faster.
        let e = expected_tokens(0, 100.0);
        assert!(predicted_us(400e3, 10e3, e) < predicted_us(3e6, 10e3, e));
        assert_eq!(expected_tokens(50, 100.0), 50.0);
        assert_eq!(tpot_sample(1_100_000, 100_000, 100), Some(10_000.0));
        assert_eq!(tpot_sample(100, 200, 100), None);
        assert_eq!(tpot_sample(1000, 0, 100), None);
        assert_eq!(next_mean(0.0, 100), 100.0);
        assert_eq!(next_mean(100.0, 116), 101.0);
    }
}
