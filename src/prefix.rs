//! The prefix-affinity key of a request (the `prefix` algorithm, `crate::select`): a
//! 64-bit hash of the part of its prompt that every later turn of the same
//! conversation begins with, read from the JSON body at admission.
//!
//! An inference engine's prefix cache (vLLM, SGLang) reuses the computation of a
//! prompt's leading tokens when it has seen them before; a chat client re-sends the
//! whole conversation on every turn, so turn 2's `messages` begin with turn 1's. The
//! key is taken from what turn 1 already holds, so that every turn gets the same key:
//!
//! - chat (`messages`): the leading `system` / `developer` messages (at most
//!   `max_bytes` of their content together) and the first message of any other role
//!   (at most `max_bytes` of its content). The key always reaches into that first
//!   non-system message, so conversations that share a system prompt, however long, get
//!   different keys (one shared system prompt pinning every request to one engine is
//!   vllm production-stack#957), and not the first message alone (sglang#26263 hashed
//!   only the first message: every conversation with one system prompt collided).
//!   A body whose messages are all system messages has no key.
//! - completions (`prompt` as one string): its first `min_bytes` bytes. A prompt is
//!   not structured into turns; prompts that begin alike (few-shot preambles) share
//!   their home node, whose cache holds that preamble, and the load guard spreads them
//!   when they are many.
//!
//! A request whose usable prefix (the content bytes counted above) is shorter than
//! `min_bytes` gets no key and is balanced by load alone: a short prompt gains little
//! from a cache, and hashing it would scatter nothing but pin popular greetings.
//! Whether a request has a key is decided by turn 1's part, so every turn of a
//! conversation either has the same key or none.
//!
//! What is hashed is the raw JSON text of each counted message's `role` and `content`
//! values (escapes and all), not the decoded strings: no decoding and no allocation,
//! and one client serializes the same message the same way on every turn (the OpenAI
//! SDKs resend the list they were given). Two clients that escape the same text
//! differently get different keys: a cache miss, not an error. Other members of a
//! message (`name`, `tool_calls`) and of the body (`model`, sampling parameters) are
//! not part of the key.
//!
//! The work is bounded: the body is checked whole (`crate::model`), then at most
//! `2 * max_bytes` bytes are hashed (FNV-1a 64, finished with `chash`'s mixer).
//!
//! ```
//! use rsbalancer::prefix::{key, PrefixPolicy};
//! let p = PrefixPolicy { min_bytes: 16, ..PrefixPolicy::default() };
//! let sys = r#"{"role":"system","content":"You are a terse assistant."}"#;
//! let turn1 = format!(r#"{{"messages":[{sys},{{"role":"user","content":"Name a prime."}}]}}"#);
//! let turn2 = format!(r#"{{"messages":[{sys},{{"role":"user","content":"Name a prime."}},{{"role":"assistant","content":"7"}},{{"role":"user","content":"Another."}}]}}"#);
//! let other = format!(r#"{{"messages":[{sys},{{"role":"user","content":"Name a color."}}]}}"#);
//! assert!(key(turn1.as_bytes(), &p).is_some());
//! assert_eq!(key(turn1.as_bytes(), &p), key(turn2.as_bytes(), &p));
//! assert_ne!(key(turn1.as_bytes(), &p), key(other.as_bytes(), &p));
//! ```

use crate::model::{is_key, items, members, top_members};
use crate::select::hash_key;

/// Largest `min_bytes` / `max_bytes`.
pub const MAX_PREFIX_BYTES: u32 = 1 << 20;

/// A pool's `prefix` section: how keys are read and how far the load guard lets one
/// node go (used by pools with `"algorithm": "prefix"`; its ranges are checked in
/// `crate::config`).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrefixPolicy {
    /// A request with fewer usable prefix bytes has no key, 1..=`max_bytes`.
    pub min_bytes: u32,
    /// Content bytes hashed of the system messages together, and of the first other
    /// message, 64..=[`MAX_PREFIX_BYTES`].
    pub max_bytes: u32,
    /// `c` of the load bound: a node with `c x` its weight's share of the tier's
    /// in-flight requests (plus this one) passes the key on, 1.0..=100.
    pub load_factor: f64,
}

impl Default for PrefixPolicy {
    fn default() -> Self {
        PrefixPolicy {
            min_bytes: 1024,
            max_bytes: 16384,
            load_factor: crate::select::DEFAULT_LOAD_FACTOR,
        }
    }
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Streaming FNV-1a 64; parts are separated by a byte that JSON text cannot hold
/// unescaped (0x00), so that moving bytes between parts changes the hash.
struct Fnv(u64);

impl Fnv {
    fn part(&mut self, bytes: &[u8]) {
        for &b in bytes.iter().chain(&[0u8]) {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(FNV_PRIME);
        }
    }
}

/// The request's prefix key, or `None` when it has no usable prefix of at least
/// `min_bytes` (or is not a JSON object: the node judges it).
pub fn key(body: &[u8], policy: &PrefixPolicy) -> Option<u64> {
    let (mut messages, mut prompt) = (None, None);
    top_members(body, "read its prefix", &mut |k, v| {
        if is_key(k, "messages") && body[v.start] == b'[' {
            messages = Some(v);
        } else if is_key(k, "prompt") && body[v.start] == b'"' {
            prompt = Some(v);
        }
        Ok(())
    })
    .ok()?;
    let max = policy.max_bytes as usize;
    let min = policy.min_bytes as usize;
    let mut h = Fnv(FNV_OFFSET);
    if let Some(m) = messages {
        let used = chat(&body[m], max, &mut h)?;
        return (used >= min).then(|| finish(h));
    }
    // A string token: its text is between the quotes.
    let text = &body[prompt?];
    let text = &text[1..text.len() - 1];
    if text.len() < min {
        return None;
    }
    h.part(b"prompt");
    h.part(&text[..min]);
    Some(finish(h))
}

/// Hashes the leading system messages and the first other message of a `messages`
/// array into `h`; the content bytes counted, or `None` without a non-system message.
fn chat(array: &[u8], max: usize, h: &mut Fnv) -> Option<usize> {
    let (mut system, mut first) = (0usize, None);
    let mut bad = false;
    items(array, &mut |item| {
        let msg = &array[item];
        if msg.first() != Some(&b'{') {
            bad = true;
            return false;
        }
        let (mut role, mut content) = (None, None);
        let ok = members(msg, &mut |k, v| {
            if is_key(k, "role") {
                role = Some(v);
            } else if is_key(k, "content") {
                content = Some(v);
            }
            Ok(())
        });
        let (Ok(()), Some(role)) = (ok, role) else {
            bad = true;
            return false;
        };
        let role = &msg[role];
        let content = content.map_or(&b""[..], |c| &msg[c]);
        if is_key(role, "system") || is_key(role, "developer") {
            let take = content.len().min(max - system);
            h.part(role);
            h.part(&content[..take]);
            system += take;
            true
        } else {
            let take = content.len().min(max);
            h.part(role);
            h.part(&content[..take]);
            first = Some(take);
            false
        }
    })
    .ok()?;
    if bad {
        return None;
    }
    first.map(|f| system + f)
}

/// The key as picks use it: mixed, never [`crate::select::NO_KEY`].
fn finish(h: Fnv) -> u64 {
    hash_key(&h.0.to_le_bytes()).max(1)
}

/// `key` as the 16 lowercase hex digits that Lua keeps as the request's key.
pub fn hex(key: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = b"0123456789abcdef"[(key >> (60 - 4 * i)) as usize & 15];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pol(min: u32, max: u32) -> PrefixPolicy {
        PrefixPolicy {
            min_bytes: min,
            max_bytes: max,
            ..PrefixPolicy::default()
        }
    }

    fn msg(role: &str, content: &str) -> String {
        format!(r#"{{"role":"{role}","content":"{content}"}}"#)
    }

    fn chat_body(msgs: &[String]) -> Vec<u8> {
        format!(r#"{{"model":"m","stream":true,"messages":[{}]}}"#, msgs.join(",")).into_bytes()
    }

    #[test]
    fn every_turn_of_a_conversation_has_the_same_key() {
        let p = pol(10, 4096);
        let mut conv = vec![msg("system", "be brief"), msg("user", "first question here")];
        let k1 = key(&chat_body(&conv), &p).expect("a key");
        for t in 0..5 {
            conv.push(msg("assistant", &format!("answer {t}")));
            conv.push(msg("user", &format!("follow-up {t}")));
            assert_eq!(key(&chat_body(&conv), &p), Some(k1), "turn {}", t + 2);
        }
        // Other members of the body do not matter.
        let mut b = String::from_utf8(chat_body(&conv)).unwrap();
        b = b.replace(r#""model":"m","stream":true"#, r#""temperature":0.2"#);
        assert_eq!(key(b.as_bytes(), &p), Some(k1));
    }

    #[test]
    fn a_shared_system_prompt_alone_does_not_collide() {
        let p = pol(64, 1024);
        let long = "x".repeat(100_000);
        let a = key(&chat_body(&[msg("system", &long), msg("user", "about cats")]), &p);
        let b = key(&chat_body(&[msg("system", &long), msg("user", "about dogs")]), &p);
        assert!(a.is_some() && b.is_some());
        assert_ne!(a, b);
        // Several system or developer messages count as one system part.
        let c = key(
            &chat_body(&[
                msg("system", &long),
                msg("developer", "rules"),
                msg("user", "about cats"),
            ]),
            &p,
        );
        assert!(c.is_some() && c != a);
        // Only system messages: no key.
        assert_eq!(key(&chat_body(&[msg("system", &long)]), &p), None);
    }

    #[test]
    fn the_first_user_message_is_not_the_whole_key() {
        // sglang#26263: hashing only the first message made every conversation with
        // one system prompt collide; here two system prompts with one question differ.
        let p = pol(8, 1024);
        let a = key(
            &chat_body(&[msg("system", "persona A"), msg("user", "hello there")]),
            &p,
        );
        let b = key(
            &chat_body(&[msg("system", "persona B"), msg("user", "hello there")]),
            &p,
        );
        assert_ne!(a, b);
        // Moving bytes between role and content changes the key.
        let c = key(&chat_body(&[msg("user", "ab"), msg("user", "x")]), &pol(1, 64));
        let d = key(&chat_body(&[msg("user", "a"), msg("user", "bx")]), &pol(1, 64));
        assert_ne!(c, d);
    }

    #[test]
    fn short_prefixes_have_no_key_and_long_ones_are_capped() {
        let p = pol(100, 200);
        // "hi" (4 bytes with quotes) + "be brief": far below 100.
        assert_eq!(
            key(&chat_body(&[msg("system", "be brief"), msg("user", "hi")]), &p),
            None
        );
        let long = "y".repeat(150);
        assert!(key(&chat_body(&[msg("user", &long)]), &p).is_some());
        // Past max_bytes, the content is not read: a difference there is not seen.
        let a = format!("{}A", "z".repeat(300));
        let b = format!("{}B", "z".repeat(300));
        assert_eq!(
            key(&chat_body(&[msg("user", &a)]), &p),
            key(&chat_body(&[msg("user", &b)]), &p)
        );
    }

    #[test]
    fn completions_prompt_is_keyed_by_its_first_min_bytes() {
        let p = pol(20, 4096);
        let pre = "Translate to French: ";
        let a = format!(r#"{{"prompt":"{pre}cat"}}"#);
        let b = format!(r#"{{"prompt":"{pre}dog and more"}}"#);
        assert!(key(a.as_bytes(), &p).is_some());
        assert_eq!(key(a.as_bytes(), &p), key(b.as_bytes(), &p));
        assert_eq!(key(br#"{"prompt":"short"}"#, &p), None);
        // A prompt that is not one string (token ids, a batch) has no key.
        assert_eq!(
            key(br#"{"prompt":[1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17]}"#, &p),
            None
        );
    }

    #[test]
    fn odd_bodies_have_no_key_and_never_panic() {
        let p = pol(1, 64);
        for bad in [
            &b""[..],
            b"[]",
            b"{",
            b"{}",
            br#"{"messages":"x"}"#,
            br#"{"messages":[]}"#,
            br#"{"messages":[1,2]}"#,
            br#"{"messages":[{"content":"no role"}]}"#,
            br#"{"prompt":""}"#,
        ] {
            assert_eq!(key(bad, &p), None, "{}", String::from_utf8_lossy(bad));
        }
        // A message without content still anchors the key on its role.
        assert!(key(br#"{"messages":[{"role":"user","content":null}]}"#, &p).is_some());
        assert!(key(br#"{"messages":[{"role":"user"}]}"#, &pol(4, 64)).is_none());
        // Escaped role spellings are the same role.
        let a = key(
            br#"{"messages":[{"role":"sys\u0074em","content":"s"},{"role":"user","content":"q"}]}"#,
            &p,
        );
        let b = key(
            br#"{"messages":[{"role":"system","content":"s"},{"role":"user","content":"q"}]}"#,
            &p,
        );
        assert!(a.is_some() && b.is_some());
    }

    #[test]
    fn hex_is_fixed_width() {
        assert_eq!(&hex(0), b"0000000000000000");
        assert_eq!(&hex(0x0123_4567_89ab_cdef), b"0123456789abcdef");
        assert_eq!(&hex(u64::MAX), b"ffffffffffffffff");
    }
}
