//! What one request asks of a node: its consistent-hashing or affinity key and the
//! tokens it will cost, read from its JSON body once, at admission (`admit()` in the
//! access phase: the balancer phase cannot read a request body).
//!
//! The body of an OpenAI-style completion request says how much it may cost before
//! any node sees it: its length (prompt tokens are about a quarter of the prompt's
//! bytes, for English text and code with the tokenizers of the common models) and
//! `max_tokens` (or the newer `max_completion_tokens`), times `n` choices. That
//! estimate is what token budgets reserve at pick and what provider headroom is
//! checked against, and `max_tokens` is what the latency model multiplies the
//! per-token time by. Every figure is bounded here, in one place: a body's numbers
//! are the client's, and a `max_tokens` of 10^30 must not overflow a budget.
//!
//! Whether the client streams (`stream`) and asked for usage in the stream
//! (`stream_options.include_usage`) is read too, for the stream signals.
//!
//! ```
//! use rsbalancer::ask::{inspect, TokensPolicy};
//! let body = br#"{"model":"deepseek-chat","max_tokens":500,"stream":true,"messages":[{"role":"user","content":"hello there, model"}]}"#;
//! let f = inspect(body).unwrap();
//! assert_eq!((f.max_tokens, f.stream, f.include_usage), (Some(500), true, None));
//! assert_eq!(f.tokens(&TokensPolicy::default()), body.len() as u32 / 4 + 500);
//! ```

use crate::model::{is_key, top_members, BodyError};

/// The largest `max_tokens` (and estimate) taken from a body: far above any model's
/// context, far below what could overflow a sum of many in a 32-bit budget word.
pub const MAX_TOKENS: u32 = 10_000_000;
/// The largest `n` (choices) counted.
pub const MAX_CHOICES: u32 = 128;
/// Bytes of prompt counted as one token in the estimate.
pub const BYTES_PER_TOKEN: u32 = 4;

/// One request as a pick sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ask<'a> {
    /// Consistent-hashing (or affinity) key; empty for none.
    pub key: &'a [u8],
    /// Estimated tokens the request costs (prompt and completion), 0 when unknown.
    pub tokens: u32,
    /// Completion tokens it may produce (`max_tokens` x `n`), 0 when unknown.
    pub max_tokens: u32,
}

impl<'a> Ask<'a> {
    /// A request known only by its key.
    pub const fn key(key: &'a [u8]) -> Self {
        Ask {
            key,
            tokens: 0,
            max_tokens: 0,
        }
    }
}

/// What a request body says of its cost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BodyFacts {
    /// The body's length in bytes (saturating at `u32::MAX`).
    pub bytes: u32,
    /// `max_completion_tokens`, else `max_tokens`, times `n`, at most [`MAX_TOKENS`];
    /// `None` when the body gives none (or not a whole number >= 0).
    pub max_tokens: Option<u32>,
    /// `"stream": true`.
    pub stream: bool,
    /// `stream_options.include_usage`, when the body says.
    pub include_usage: Option<bool>,
}

/// How a pool turns body facts into a token estimate (`tokens` in a pool's config).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TokensPolicy {
    /// Read the JSON body of POST requests in `admit()` (an estimate of their tokens
    /// and their `max_tokens`); off: every request's cost is unknown.
    pub inspect_body: bool,
    /// Completion tokens assumed for a request whose body names no `max_tokens`,
    /// 0..=[`MAX_TOKENS`] (checked in `crate::config`).
    pub default_max_tokens: u32,
    /// Upper bound of one request's estimate, 1..=[`MAX_TOKENS`].
    pub max_estimate: u32,
}

impl Default for TokensPolicy {
    fn default() -> Self {
        TokensPolicy {
            inspect_body: true,
            default_max_tokens: 1024,
            max_estimate: 1_000_000,
        }
    }
}

impl BodyFacts {
    /// Estimated tokens of the whole request: prompt bytes / [`BYTES_PER_TOKEN`] plus
    /// its completion limit (the policy's default when it names none), at least 1 and
    /// at most the policy's `max_estimate`.
    pub fn tokens(&self, policy: &TokensPolicy) -> u32 {
        let out = self.max_tokens.unwrap_or(policy.default_max_tokens);
        (self.bytes / BYTES_PER_TOKEN)
            .saturating_add(out)
            .clamp(1, policy.max_estimate.max(1))
    }
}

/// Read a request body's cost figures; the body must be one JSON object (checked whole,
/// as for a model rewrite). Members that are not where or what is expected (a string
/// `max_tokens`, a nested `stream`) are ignored, not refused: the node judges them.
pub fn inspect(body: &[u8]) -> Result<BodyFacts, BodyError> {
    let mut f = BodyFacts {
        bytes: u32::try_from(body.len()).unwrap_or(u32::MAX),
        ..BodyFacts::default()
    };
    let (mut max_tokens, mut max_completion, mut n) = (None, None, 1);
    top_members(body, "read its tokens", &mut |key, value| {
        let v = &body[value];
        if is_key(key, "max_tokens") {
            max_tokens = whole(v);
        } else if is_key(key, "max_completion_tokens") {
            max_completion = whole(v);
        } else if is_key(key, "n") {
            n = whole(v).unwrap_or(1).clamp(1, MAX_CHOICES);
        } else if is_key(key, "stream") {
            f.stream = v == b"true";
        } else if is_key(key, "stream_options") && v.first() == Some(&b'{') {
            // Already checked as part of the body: an object of its own.
            top_members(v, "read its tokens", &mut |k, r| {
                if is_key(k, "include_usage") {
                    f.include_usage = match &v[r] {
                        b"true" => Some(true),
                        b"false" => Some(false),
                        _ => None,
                    };
                }
                Ok(())
            })?;
        }
        Ok(())
    })?;
    f.max_tokens = max_completion
        .or(max_tokens)
        .map(|t| t.saturating_mul(n).min(MAX_TOKENS));
    Ok(f)
}

/// A JSON number that is a whole number >= 0 (`512`, `512.0`, `5e2`), at most
/// [`MAX_TOKENS`]; `None` for anything else.
fn whole(v: &[u8]) -> Option<u32> {
    if !matches!(v.first(), Some(b'0'..=b'9')) {
        return None;
    }
    let x: f64 = std::str::from_utf8(v).ok()?.parse().ok()?;
    (x.fract() == 0.0).then(|| x.min(MAX_TOKENS as f64) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(body: &str) -> BodyFacts {
        inspect(body.as_bytes()).unwrap()
    }

    #[test]
    fn reads_limits_stream_and_usage() {
        let f = facts(r#"{"max_tokens":100,"stream":true,"stream_options":{"include_usage":false}}"#);
        assert_eq!(
            (f.max_tokens, f.stream, f.include_usage),
            (Some(100), true, Some(false))
        );
        // The newer name wins over the older; n multiplies.
        let f = facts(r#"{"max_completion_tokens":300,"max_tokens":100,"n":3}"#);
        assert_eq!(f.max_tokens, Some(900));
        let f = facts(r#"{"max_tokens":100,"max_completion_tokens":300}"#);
        assert_eq!(f.max_tokens, Some(300));
        let f = facts(r#"{"stream_options":{"include_usage":true},"stream":false}"#);
        assert_eq!((f.stream, f.include_usage), (false, Some(true)));
        // Nested members are not the request's.
        let f = facts(r#"{"messages":[{"max_tokens":5,"stream":true}],"tools":{"n":9}}"#);
        assert_eq!(
            f,
            BodyFacts {
                bytes: f.bytes,
                ..BodyFacts::default()
            }
        );
    }

    #[test]
    fn client_numbers_are_bounded() {
        for (v, want) in [
            ("512", Some(512)),
            ("512.0", Some(512)),
            ("5e2", Some(500)),
            ("0", Some(0)),
            ("1e300", Some(MAX_TOKENS)),
            ("-5", None),
            ("1.5", None),
            ("\"100\"", None),
            ("null", None),
            ("[1]", None),
        ] {
            let f = facts(&format!(r#"{{"max_tokens":{v}}}"#));
            assert_eq!(f.max_tokens, want, "{v}");
        }
        let f = facts(r#"{"max_tokens":9000000,"n":1000}"#);
        assert_eq!(f.max_tokens, Some(MAX_TOKENS));
        let f = facts(r#"{"max_tokens":10,"n":-1}"#);
        assert_eq!(f.max_tokens, Some(10));
    }

    #[test]
    fn estimate_is_bounded() {
        let p = TokensPolicy::default();
        let f = BodyFacts {
            bytes: 4000,
            max_tokens: Some(200),
            ..BodyFacts::default()
        };
        assert_eq!(f.tokens(&p), 1200);
        let f = BodyFacts {
            bytes: 4000,
            max_tokens: None,
            ..BodyFacts::default()
        };
        assert_eq!(f.tokens(&p), 1000 + 1024);
        let f = BodyFacts {
            bytes: u32::MAX,
            max_tokens: Some(MAX_TOKENS),
            ..BodyFacts::default()
        };
        assert_eq!(f.tokens(&p), p.max_estimate);
        let f = BodyFacts::default();
        let zero = TokensPolicy {
            default_max_tokens: 0,
            ..p.clone()
        };
        assert_eq!(f.tokens(&zero), 1);
    }

    #[test]
    fn not_an_object_is_refused() {
        for bad in ["[]", "{", "{\"max_tokens\":1} x", "\"s\""] {
            assert!(inspect(bad.as_bytes()).is_err(), "{bad}");
        }
    }
}
