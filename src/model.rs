//! Rewriting the `"model"` of a JSON request body for one provider (a node's
//! `model`, `crate::config::provider`): the top-level `"model"` member's string value
//! is replaced and every other byte is kept as it was (no re-serialisation: key order,
//! whitespace, number spellings and escapes elsewhere reach the node untouched).
//!
//! The body is checked whole as JSON (RFC 8259: UTF-8, one object, nesting at most
//! [`MAX_DEPTH`], at most [`MAX_BODY`] bytes); a `"model"` nested deeper (a tool's
//! parameters, a message's content) is not the request's and is left alone. A key
//! spelt with escapes (`"mod\u0065l"`) is the same key. When the object holds
//! `"model"` more than once, every top-level one is replaced.
//!
//! ```
//! use rsbalancer::model::rewrite_model;
//! let body = br#"{"model": "deepseek-chat", "messages": [{"role": "user", "content": "hi"}]}"#;
//! let r = rewrite_model(body, "deepseek-ai/DeepSeek-V3").unwrap();
//! assert_eq!(r.body, br#"{"model": "deepseek-ai/DeepSeek-V3", "messages": [{"role": "user", "content": "hi"}]}"#);
//! assert_eq!(r.previous.as_deref(), Some("deepseek-chat"));
//! ```

use std::fmt;
use std::ops::Range;

/// Bodies larger than this are refused (32 MiB).
pub const MAX_BODY: usize = 32 << 20;
/// Arrays and objects nested deeper than this are refused.
pub const MAX_DEPTH: usize = 128;

/// The rewritten body and the model it named before (`None`: it named none, and is
/// returned unchanged).
#[derive(Debug, Clone, PartialEq)]
pub struct Rewritten {
    pub body: Vec<u8>,
    pub previous: Option<String>,
}

/// Why a body cannot be rewritten: what is wrong and at which byte.
#[derive(Debug, Clone, PartialEq)]
pub struct BodyError(String);

impl fmt::Display for BodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BodyError {}

/// Replace the body's top-level `"model"` string with `model`.
pub fn rewrite_model(body: &[u8], model: &str) -> Result<Rewritten, BodyError> {
    let mut spans: Vec<Range<usize>> = Vec::new();
    top_members(body, "rewrite its model", &mut |key, value| {
        if is_key(key, "model") {
            if body[value.start] != b'"' {
                return Err(BodyError("the request's \"model\" is not a string".into()));
            }
            spans.push(value);
        }
        Ok(())
    })?;
    let Some(last) = spans.last() else {
        return Ok(Rewritten {
            body: body.to_vec(),
            previous: None,
        });
    };
    // The last member wins, as in most JSON parsers.
    let previous = decode(&body[last.clone()]);
    let quoted = serde_json::to_string(model).expect("a str serializes");
    let mut out = Vec::with_capacity(body.len() + spans.len() * quoted.len());
    let mut at = 0;
    for s in &spans {
        out.extend_from_slice(&body[at..s.start]);
        out.extend_from_slice(quoted.as_bytes());
        at = s.end;
    }
    out.extend_from_slice(&body[at..]);
    Ok(Rewritten {
        body: out,
        previous: Some(previous),
    })
}

/// What [`top_members`] calls with each member: its key token and its value's range.
pub type Visit<'v> = dyn FnMut(&[u8], Range<usize>) -> Result<(), BodyError> + 'v;

/// Check `body` whole as one JSON object (at most [`MAX_BODY`] bytes of UTF-8,
/// nesting at most [`MAX_DEPTH`]) and call `visit` with each top-level member: its key
/// token (quotes and escapes included: see [`is_key`]) and its value's byte range.
/// `purpose` ends the refusals' sentences ("...: cannot <purpose>").
pub fn top_members(body: &[u8], purpose: &str, visit: &mut Visit) -> Result<(), BodyError> {
    if body.len() > MAX_BODY {
        return Err(BodyError(format!(
            "request body of {} bytes: at most {MAX_BODY} are read: cannot {purpose}",
            body.len()
        )));
    }
    if let Err(e) = std::str::from_utf8(body) {
        return Err(BodyError(format!(
            "request body is not UTF-8 (byte {})",
            e.valid_up_to()
        )));
    }
    let mut p = Parser { s: body, i: 0 };
    p.ws();
    if p.peek() != Some(b'{') {
        return Err(BodyError(format!(
            "request body is not a JSON object: cannot {purpose}"
        )));
    }
    p.object(1, Some(visit))?;
    p.ws();
    if p.i != body.len() {
        return p.err("trailing characters");
    }
    Ok(())
}

/// Call `visit` with the range (within `array`) of each item of `array`, a JSON array
/// already checked whole (a value from [`top_members`]), until it returns false.
pub fn items(array: &[u8], visit: &mut dyn FnMut(Range<usize>) -> bool) -> Result<(), BodyError> {
    let mut p = Parser { s: array, i: 0 };
    p.expect(b'[')?;
    p.ws();
    if p.peek() == Some(b']') {
        return Ok(());
    }
    loop {
        p.ws();
        let v0 = p.i;
        p.value(1)?;
        if !visit(v0..p.i) || p.closes(b']')? {
            return Ok(());
        }
    }
}

/// Call `visit` with the key token and value range (within `object`) of each member of
/// `object`, a JSON object already checked whole (as [`items`]).
pub fn members(object: &[u8], visit: &mut Visit) -> Result<(), BodyError> {
    Parser { s: object, i: 0 }.object(1, Some(visit))
}

/// Whether a key token (quotes included, as [`top_members`] passes it) names `name`,
/// also when spelt with escapes (`"mod\u0065l"`).
pub fn is_key(token: &[u8], name: &str) -> bool {
    let plain = token.len() == name.len() + 2 && &token[1..token.len() - 1] == name.as_bytes();
    plain || (token.contains(&b'\\') && decode(token) == name)
}

/// A string token (quotes included) as its text.
fn decode(token: &[u8]) -> String {
    serde_json::from_slice(token).unwrap_or_default()
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn err<T>(&self, what: &str) -> Result<T, BodyError> {
        Err(BodyError(format!(
            "request body is not JSON: {what} at byte {}",
            self.i
        )))
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.s.get(self.i) {
            self.i += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn expect(&mut self, b: u8) -> Result<(), BodyError> {
        if self.peek() != Some(b) {
            return self.err(&format!("expected '{}'", b as char));
        }
        self.i += 1;
        Ok(())
    }

    /// An object at `depth`; with `visit`, called with each member's key token and
    /// value range.
    fn object(&mut self, depth: usize, mut visit: Option<&mut Visit>) -> Result<(), BodyError> {
        self.expect(b'{')?;
        self.ws();
        if self.peek() == Some(b'}') {
            self.i += 1;
            return Ok(());
        }
        loop {
            self.ws();
            let k0 = self.i;
            self.string()?;
            let key = k0..self.i;
            self.ws();
            self.expect(b':')?;
            self.ws();
            let v0 = self.i;
            self.value(depth)?;
            if let Some(visit) = visit.as_deref_mut() {
                visit(&self.s[key], v0..self.i)?;
            }
            if self.closes(b'}')? {
                return Ok(());
            }
        }
    }

    /// After a member or an item: `,` (false: another follows) or `close` (true).
    fn closes(&mut self, close: u8) -> Result<bool, BodyError> {
        self.ws();
        match self.peek() {
            Some(b',') => self.i += 1,
            Some(c) if c == close => {
                self.i += 1;
                return Ok(true);
            }
            _ => return self.err(&format!("expected ',' or '{}'", close as char)),
        }
        Ok(false)
    }

    fn value(&mut self, depth: usize) -> Result<(), BodyError> {
        match self.peek() {
            Some(b'"') => self.string(),
            Some(b'{' | b'[') if depth >= MAX_DEPTH => {
                self.err(&format!("nested deeper than {MAX_DEPTH} levels"))
            }
            Some(b'{') => self.object(depth + 1, None),
            Some(b'[') => {
                self.i += 1;
                self.ws();
                if self.peek() == Some(b']') {
                    self.i += 1;
                    return Ok(());
                }
                loop {
                    self.ws();
                    self.value(depth + 1)?;
                    if self.closes(b']')? {
                        return Ok(());
                    }
                }
            }
            Some(b't') => self.literal(b"true"),
            Some(b'f') => self.literal(b"false"),
            Some(b'n') => self.literal(b"null"),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(_) => self.err("expected a value"),
            None => self.err("unexpected end"),
        }
    }

    fn literal(&mut self, word: &[u8]) -> Result<(), BodyError> {
        if self.s[self.i..].starts_with(word) {
            self.i += word.len();
            return Ok(());
        }
        self.err("expected a value")
    }

    fn digits(&mut self) -> usize {
        let start = self.i;
        while let Some(b'0'..=b'9') = self.peek() {
            self.i += 1;
        }
        self.i - start
    }

    fn number(&mut self) -> Result<(), BodyError> {
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        match self.peek() {
            Some(b'0') => self.i += 1,
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => return self.err("bad number"),
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            if self.digits() == 0 {
                return self.err("bad number");
            }
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.i += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            if self.digits() == 0 {
                return self.err("bad number");
            }
        }
        Ok(())
    }

    /// A string token; the body is UTF-8 already, so only escapes and control
    /// characters need checking.
    fn string(&mut self) -> Result<(), BodyError> {
        self.expect(b'"')?;
        loop {
            match self.peek() {
                None => return self.err("unterminated string"),
                Some(b'"') => {
                    self.i += 1;
                    return Ok(());
                }
                Some(b'\\') => {
                    self.i += 1;
                    match self.peek() {
                        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => self.i += 1,
                        Some(b'u') => {
                            let hex = self.s.get(self.i + 1..self.i + 5);
                            if !hex.is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) {
                                return self.err("bad \\u escape");
                            }
                            self.i += 5;
                        }
                        _ => return self.err("bad escape"),
                    }
                }
                Some(0..=0x1f) => return self.err("control character in a string"),
                Some(_) => self.i += 1,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rw(body: &str, model: &str) -> Result<String, String> {
        rewrite_model(body.as_bytes(), model)
            .map(|r| String::from_utf8(r.body).unwrap())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn replaces_only_the_value() {
        let body = "{ \"messages\" : [ {\"role\":\"user\",\"content\":\"x\"} ],\n\t\"model\"\t:\t\"a\" , \"n\": 1.50e+3 }";
        assert_eq!(
            rw(body, "b/c").unwrap(),
            "{ \"messages\" : [ {\"role\":\"user\",\"content\":\"x\"} ],\n\t\"model\"\t:\t\"b/c\" , \"n\": 1.50e+3 }"
        );
        let r = rewrite_model(body.as_bytes(), "b").unwrap();
        assert_eq!(r.previous.as_deref(), Some("a"));
    }

    #[test]
    fn nested_models_are_left_alone() {
        let body =
            r#"{"tools":[{"model":"keep"}],"meta":{"model":"keep"},"model":"x","s":"\"model\": \"keep\""}"#;
        assert_eq!(
            rw(body, "y").unwrap(),
            r#"{"tools":[{"model":"keep"}],"meta":{"model":"keep"},"model":"y","s":"\"model\": \"keep\""}"#
        );
    }

    #[test]
    fn escapes_and_unicode() {
        // The new name is JSON-escaped; the old one decoded; an escaped key matches.
        assert_eq!(
            rw(r#"{"model":"a"}"#, "q\"uo\\te\n").unwrap(),
            r#"{"model":"q\"uo\\te\n"}"#
        );
        assert_eq!(
            rw(r#"{"mod\u0065l":"a\u00e9"}"#, "ü").unwrap(),
            r#"{"mod\u0065l":"ü"}"#
        );
        let r = rewrite_model(r#"{"model":"a\u00e9\"b"}"#.as_bytes(), "x").unwrap();
        assert_eq!(r.previous.as_deref(), Some("aé\"b"));
        assert_eq!(
            rw("{\"é\":\"ü\",\"model\":\"日本\"}", "x").unwrap(),
            "{\"é\":\"ü\",\"model\":\"x\"}"
        );
        // "models" and "Model" are other keys.
        assert_eq!(
            rw(r#"{"models":"a","Model":"b"}"#, "x").unwrap(),
            r#"{"models":"a","Model":"b"}"#
        );
    }

    #[test]
    fn no_model_is_unchanged_duplicates_all_replaced() {
        let r = rewrite_model(b" {} ", "x").unwrap();
        assert_eq!((r.body.as_slice(), r.previous), (&b" {} "[..], None));
        assert_eq!(
            rw(r#"{"model":"a","model":"b"}"#, "x").unwrap(),
            r#"{"model":"x","model":"x"}"#
        );
        assert_eq!(
            rewrite_model(br#"{"model":"a","model":"b"}"#, "x")
                .unwrap()
                .previous
                .as_deref(),
            Some("b")
        );
    }

    #[test]
    fn refusals() {
        let cases = [
            (
                "[1]",
                "request body is not a JSON object: cannot rewrite its model",
            ),
            ("", "request body is not a JSON object: cannot rewrite its model"),
            (
                "\"model\"",
                "request body is not a JSON object: cannot rewrite its model",
            ),
            (r#"{"model":1}"#, "the request's \"model\" is not a string"),
            (r#"{"model":null}"#, "the request's \"model\" is not a string"),
            (
                r#"{"model":"a"} x"#,
                "request body is not JSON: trailing characters at byte 14",
            ),
            (
                r#"{"model":"a""#,
                "request body is not JSON: expected ',' or '}' at byte 12",
            ),
            (
                r#"{"model":"a\q"}"#,
                "request body is not JSON: bad escape at byte 12",
            ),
            (
                r#"{"a":01}"#,
                "request body is not JSON: expected ',' or '}' at byte 6",
            ),
            (r#"{"a":1.}"#, "request body is not JSON: bad number at byte 7"),
            (
                r#"{"a":tru}"#,
                "request body is not JSON: expected a value at byte 5",
            ),
            (
                r#"{"a":[1,]}"#,
                "request body is not JSON: expected a value at byte 8",
            ),
            (
                r#"{"a":"\u12"}"#,
                "request body is not JSON: bad \\u escape at byte 7",
            ),
            (
                "{\"a\":\"\n\"}",
                "request body is not JSON: control character in a string at byte 6",
            ),
            (r#"{a:1}"#, "request body is not JSON: expected '\"' at byte 1"),
        ];
        for (body, want) in cases {
            assert_eq!(rw(body, "x").unwrap_err(), want, "{body:?}");
        }
        let e = rewrite_model(b"{\"model\":\"\xff\"}", "x").unwrap_err();
        assert_eq!(e.to_string(), "request body is not UTF-8 (byte 10)");
        let deep = "[".repeat(MAX_DEPTH) + &"]".repeat(MAX_DEPTH);
        let e = rw(&format!("{{\"a\":{deep}}}"), "x").unwrap_err();
        assert!(e.contains("nested deeper than 128 levels"), "{e}");
        let ok = "[".repeat(MAX_DEPTH - 1) + &"]".repeat(MAX_DEPTH - 1);
        assert!(rw(&format!("{{\"a\":{ok}}}"), "x").is_ok());
        let big = vec![b' '; MAX_BODY + 1];
        assert!(rewrite_model(&big, "x")
            .unwrap_err()
            .to_string()
            .starts_with("request body of"));
    }

    #[test]
    fn agrees_with_serde_json_on_validity() {
        let bodies = [
            r#"{"a":[1,-0,0.5,1e5,-2E-3,true,false,null,{"b":{}},[]],"model":"m"}"#,
            r#"{"a":"\ud83d\ude00","model":"m"}"#,
            r#"{"a":-,"model":"m"}"#,
            r#"{"a":1,}"#,
            r#"{,}"#,
            r#"{"a" 1}"#,
        ];
        for b in bodies {
            let ours = rewrite_model(b.as_bytes(), "x").is_ok();
            let theirs = serde_json::from_str::<serde_json::Value>(b).is_ok();
            assert_eq!(ours, theirs, "{b}");
            if ours {
                let v: serde_json::Value =
                    serde_json::from_slice(&rewrite_model(b.as_bytes(), "x").unwrap().body).unwrap();
                assert_eq!(v["model"], "x");
            }
        }
    }
}
