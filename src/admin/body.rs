//! The admin API's request bodies, parsed and validated in one place.
//!
//! `resty.rsbalancer.admin` hands the raw body of every changing route to [`parse`]
//! (through the mlua module's `admin_body`) and applies only what comes back. A body
//! is refused whole, before anything is applied, when it is over [`MAX_BODY`] bytes
//! (413), is not one JSON object, repeats a key, has a key the route does not know,
//! lacks a required key, or holds a value of the wrong type or out of range (400).
//! Every refusal names the key and the value. The bounds live here and nowhere else:
//! a weight is an integer 1..=10000, a canary share a number 0..=1, a mode one of
//! `on`, `off`, `auto`. Node ids and addresses are checked afterwards by the config
//! validation a run-time change goes through ([`crate::admin`]), as in a config file.
//!
//! The object is read as a list of members rather than a map, so that a repeated key
//! is seen (serde_json's `Value` keeps the last one silently).
//!
//! ```
//! use rsbalancer::admin::body::{parse, Request, Route};
//! assert_eq!(
//!     parse(Route::Node, br#"{"weight": 5}"#),
//!     Ok(Request::Node { weight: Some(5), drain: None })
//! );
//! let e = parse(Route::Node, br#"{"weight": 5, "weight": 7}"#).unwrap_err();
//! assert_eq!((e.status, e.message.as_str()), (400, "duplicate key \"weight\""));
//! ```

use std::fmt;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

use crate::balancer::EmergencyMode;

/// The largest body accepted, in bytes; a larger one is refused with 413.
pub const MAX_BODY: usize = 16384;

/// Bounds of a node weight, as in a config file.
pub use crate::abi::WEIGHT_RANGE as WEIGHT;

/// The admin routes that take a body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// `PUT pools/<pool>/nodes/<id>`: `{"weight"}` and/or `{"drain"}`.
    Node,
    /// `POST pools/<pool>/nodes`: `{"id", "addr" [, "weight"] [, "backup"]}`, and a
    /// provider's `host`, `scheme`, `tls_verify`, `model` and `headers` (values from
    /// variables only: `{"Name": {"env": "VAR" [, "prefix": "Bearer "]}}`).
    AddNode,
    /// `PUT pools/<pool>/canary`: `{"share"}`.
    Canary,
    /// `PUT pools/<pool>/emergency`: `{"mode"}`.
    Emergency,
}

impl Route {
    /// Every route, in the order of [`Route::name`]'s names.
    pub const ALL: [Route; 4] = [Route::Node, Route::AddNode, Route::Canary, Route::Emergency];

    /// `node`, `add_node`, `canary` or `emergency`.
    pub fn name(self) -> &'static str {
        match self {
            Route::Node => "node",
            Route::AddNode => "add_node",
            Route::Canary => "canary",
            Route::Emergency => "emergency",
        }
    }

    /// The route of a [`Route::name`].
    pub fn from_name(name: &str) -> Option<Route> {
        Route::ALL.into_iter().find(|r| r.name() == name)
    }

    /// The keys the route knows (sorted, as error messages list them), with their kinds.
    fn spec(self) -> &'static [(&'static str, Kind)] {
        match self {
            Route::Node => &[("drain", Kind::Bool), ("weight", Kind::Weight)],
            Route::AddNode => &[
                ("addr", Kind::Str),
                ("backup", Kind::Bool),
                ("headers", Kind::Headers),
                ("host", Kind::Str),
                ("id", Kind::Str),
                ("model", Kind::Str),
                ("scheme", Kind::Str),
                ("tls_verify", Kind::Bool),
                ("weight", Kind::Weight),
            ],
            Route::Canary => &[("share", Kind::Share)],
            Route::Emergency => &[("mode", Kind::Mode)],
        }
    }

    fn required(self) -> &'static [&'static str] {
        match self {
            Route::Node => &[],
            Route::AddNode => &["id", "addr"],
            Route::Canary => &["share"],
            Route::Emergency => &["mode"],
        }
    }
}

/// A valid body, typed.
#[derive(Clone, Debug, PartialEq)]
pub enum Request {
    /// At least one of the two is set.
    Node {
        weight: Option<u32>,
        drain: Option<bool>,
    },
    AddNode {
        id: String,
        addr: String,
        weight: Option<u32>,
        backup: Option<bool>,
        /// The provider keys given (`host`, `scheme`, `tls_verify`, `model`,
        /// `headers`), their shapes checked; their values are checked by the config
        /// validation, as in a config file.
        provider: serde_json::Map<String, Value>,
    },
    /// 0.0..=1.0.
    Canary {
        share: f64,
    },
    Emergency {
        mode: EmergencyMode,
    },
}

/// A refused body: the HTTP status (400 or 413) and a message naming the key and value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BodyError {
    pub status: u16,
    pub message: String,
}

impl fmt::Display for BodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for BodyError {}

fn invalid(message: impl Into<String>) -> BodyError {
    BodyError {
        status: 400,
        message: message.into(),
    }
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Bool,
    Str,
    Weight,
    Share,
    Mode,
    /// An object of header name -> a string or `{"env" [, "prefix"]}` (strings).
    Headers,
}

/// One checked value.
enum Checked {
    Bool(bool),
    Str(String),
    Uint(u32),
    Num(f64),
    Mode(EmergencyMode),
    Json(Value),
}

/// The JSON type of a value, as refusals name it.
fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// A number as refusals show it: whole numbers without a fraction (`5`, not `5.0`).
fn show_number(n: &serde_json::Number) -> String {
    match n.as_f64() {
        Some(f) if n.is_f64() && f.fract() == 0.0 && f.abs() < 1e15 => format!("{}", f as i64),
        _ => n.to_string(),
    }
}

impl Kind {
    fn check(self, key: &str, v: Value) -> Result<Checked, BodyError> {
        let wrong = |want: &str, v: &Value| invalid(format!("{key}: {want} expected, got {}", type_name(v)));
        match (self, v) {
            (Kind::Bool, Value::Bool(b)) => Ok(Checked::Bool(b)),
            (Kind::Str, Value::String(s)) => Ok(Checked::Str(s)),
            (Kind::Weight, Value::Number(n)) => {
                let f = n.as_f64().unwrap_or(f64::NAN);
                if f.fract() != 0.0 {
                    return Err(invalid(format!("{key}: integer expected, got {n}")));
                }
                if !(f >= *WEIGHT.start() as f64 && f <= *WEIGHT.end() as f64) {
                    return Err(invalid(format!(
                        "{key}: {} is out of range {}..={}",
                        show_number(&n),
                        WEIGHT.start(),
                        WEIGHT.end()
                    )));
                }
                Ok(Checked::Uint(f as u32))
            }
            (Kind::Weight, v) => Err(wrong("integer", &v)),
            (Kind::Share, Value::Number(n)) => {
                let f = n.as_f64().unwrap_or(f64::NAN);
                if !(0.0..=1.0).contains(&f) {
                    return Err(invalid(format!(
                        "{key}: {} is out of range 0..1",
                        show_number(&n)
                    )));
                }
                Ok(Checked::Num(f))
            }
            (Kind::Share, v) => Err(wrong("number", &v)),
            (Kind::Mode, Value::String(s)) => match s.as_str() {
                "on" => Ok(Checked::Mode(EmergencyMode::On)),
                "off" => Ok(Checked::Mode(EmergencyMode::Off)),
                "auto" => Ok(Checked::Mode(EmergencyMode::Auto)),
                _ => Err(invalid(format!(
                    "{key}: \"on\", \"off\" or \"auto\" expected, got {s:?}"
                ))),
            },
            (Kind::Mode, v) => Err(wrong("string", &v)),
            (Kind::Headers, Value::Object(m)) => {
                for (name, h) in &m {
                    let shaped = match h {
                        Value::String(_) => true,
                        Value::Object(r) => {
                            r.get("env").is_some_and(Value::is_string)
                                && r.iter()
                                    .all(|(k, v)| (k == "env" || k == "prefix") && v.is_string())
                        }
                        _ => false,
                    };
                    // The value is not shown: it may be a key.
                    if !shaped {
                        return Err(invalid(format!(
                            "{key}.{name}: {{\"env\": \"VAR\" [, \"prefix\": \"...\"]}} expected"
                        )));
                    }
                }
                Ok(Checked::Json(Value::Object(m)))
            }
            (Kind::Headers, v) => Err(wrong("object", &v)),
            (Kind::Bool, v) => Err(wrong("boolean", &v)),
            (Kind::Str, v) => Err(wrong("string", &v)),
        }
    }
}

/// A JSON object's members in order, refusing a repeated key; anything but an object
/// is `NotObject`.
enum Members {
    Object(Vec<(String, Value)>),
    NotObject,
}

impl<'de> Deserialize<'de> for Members {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Members;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members, A::Error> {
                let mut out: Vec<(String, Value)> = Vec::new();
                while let Some(k) = map.next_key::<String>()? {
                    if out.iter().any(|(seen, _)| *seen == k) {
                        return Err(de::Error::custom(DuplicateKey(k)));
                    }
                    out.push((k, map.next_value()?));
                }
                Ok(Members::Object(out))
            }
            // Any other JSON value is read whole (so that the text is still checked to
            // be JSON) and refused as "not an object" afterwards.
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Members, A::Error> {
                while seq.next_element::<de::IgnoredAny>()?.is_some() {}
                Ok(Members::NotObject)
            }
            fn visit_bool<E>(self, _: bool) -> Result<Members, E> {
                Ok(Members::NotObject)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Members, E> {
                Ok(Members::NotObject)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Members, E> {
                Ok(Members::NotObject)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Members, E> {
                Ok(Members::NotObject)
            }
            fn visit_str<E>(self, _: &str) -> Result<Members, E> {
                Ok(Members::NotObject)
            }
            fn visit_unit<E>(self) -> Result<Members, E> {
                Ok(Members::NotObject)
            }
        }
        d.deserialize_any(V)
    }
}

/// The message of a repeated key, recognised again after serde_json wraps it.
struct DuplicateKey(String);

impl fmt::Display for DuplicateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "duplicate key {:?}", self.0)
    }
}

/// Parses and validates the body of `route`. See the module documentation.
pub fn parse(route: Route, body: &[u8]) -> Result<Request, BodyError> {
    if body.len() > MAX_BODY {
        return Err(BodyError {
            status: 413,
            message: format!(
                "request body of {} bytes is over the limit of {MAX_BODY}",
                body.len()
            ),
        });
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(invalid("a JSON object body is required"));
    }
    let members = match serde_json::from_slice::<Members>(body) {
        Ok(Members::Object(m)) => m,
        Ok(Members::NotObject) => return Err(invalid("body must be a JSON object")),
        Err(e) => {
            let text = e.to_string();
            return Err(invalid(match text.strip_prefix("duplicate key ") {
                // serde_json appends " at line L column C": the key is what matters.
                Some(_) => text
                    .rsplit_once(" at line ")
                    .map_or(text.as_str(), |(m, _)| m)
                    .to_string(),
                None => format!("invalid JSON: {text}"),
            }));
        }
    };
    let spec = route.spec();
    let mut checked: Vec<(&str, Checked)> = Vec::with_capacity(members.len());
    for (key, v) in members {
        let Some(&(name, kind)) = spec.iter().find(|(k, _)| *k == key) else {
            let allowed: Vec<&str> = spec.iter().map(|(k, _)| *k).collect();
            return Err(invalid(format!(
                "unknown key {key:?} (allowed: {})",
                allowed.join(", ")
            )));
        };
        checked.push((name, kind.check(name, v)?));
    }
    if let Some(k) = route
        .required()
        .iter()
        .find(|k| !checked.iter().any(|(n, _)| n == *k))
    {
        return Err(invalid(format!("missing key \"{k}\"")));
    }
    if checked.is_empty() {
        let keys: Vec<&str> = spec.iter().map(|(k, _)| *k).collect();
        return Err(invalid(format!(
            "empty body: expected one of {}",
            keys.join(", ")
        )));
    }
    Ok(build(route, checked))
}

/// The typed request of checked members (every required key present).
fn build(route: Route, checked: Vec<(&str, Checked)>) -> Request {
    let (mut weight, mut drain, mut backup, mut share) = (None, None, None, 0.0);
    let (mut id, mut addr, mut mode) = (String::new(), String::new(), EmergencyMode::Auto);
    let mut provider = serde_json::Map::new();
    for (key, c) in checked {
        match (key, c) {
            ("host" | "scheme" | "model", Checked::Str(s)) => {
                provider.insert(key.into(), Value::String(s));
            }
            ("tls_verify", Checked::Bool(b)) => {
                provider.insert(key.into(), Value::Bool(b));
            }
            ("headers", Checked::Json(v)) => {
                provider.insert(key.into(), v);
            }
            ("weight", Checked::Uint(w)) => weight = Some(w),
            ("drain", Checked::Bool(b)) => drain = Some(b),
            ("backup", Checked::Bool(b)) => backup = Some(b),
            ("share", Checked::Num(s)) => share = s,
            ("id", Checked::Str(s)) => id = s,
            ("addr", Checked::Str(s)) => addr = s,
            (_, Checked::Mode(m)) => mode = m,
            _ => unreachable!("a key checked with another kind"),
        }
    }
    match route {
        Route::Node => Request::Node { weight, drain },
        Route::AddNode => Request::AddNode {
            id,
            addr,
            weight,
            backup,
            provider,
        },
        Route::Canary => Request::Canary { share },
        Route::Emergency => Request::Emergency { mode },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(route: Route, body: &str) -> (u16, String) {
        let e = parse(route, body.as_bytes()).unwrap_err();
        (e.status, e.message)
    }

    #[test]
    fn valid_bodies() {
        assert_eq!(
            parse(Route::Node, br#"{"drain": true, "weight": 5.0}"#),
            Ok(Request::Node {
                weight: Some(5),
                drain: Some(true)
            })
        );
        assert_eq!(
            parse(
                Route::AddNode,
                br#"{"id": "x", "addr": "127.0.0.1:1", "backup": false}"#
            ),
            Ok(Request::AddNode {
                id: "x".into(),
                addr: "127.0.0.1:1".into(),
                weight: None,
                backup: Some(false),
                provider: Default::default(),
            })
        );
        let body = br#"{"id": "x", "addr": "a:443", "scheme": "https", "host": "h", "tls_verify": false,
            "model": "m", "headers": {"Authorization": {"env": "K", "prefix": "Bearer "}, "X-A": "lit"}}"#;
        let Ok(Request::AddNode { provider, .. }) = parse(Route::AddNode, body) else {
            panic!("refused")
        };
        assert_eq!(
            Value::Object(provider),
            serde_json::json!({ "scheme": "https", "host": "h", "tls_verify": false, "model": "m",
                "headers": {"Authorization": {"env": "K", "prefix": "Bearer "}, "X-A": "lit"} })
        );
        assert_eq!(
            parse(Route::Canary, br#"{"share": 0}"#),
            Ok(Request::Canary { share: 0.0 })
        );
        assert_eq!(
            parse(Route::Emergency, br#" {"mode": "off"} "#),
            Ok(Request::Emergency {
                mode: EmergencyMode::Off
            })
        );
    }

    #[test]
    fn duplicate_keys_are_refused_naming_the_key() {
        for (route, body, key) in [
            (Route::Node, r#"{"weight":5,"weight":7}"#, "weight"),
            (Route::Node, r#"{"drain":true,"weight":5,"drain":false}"#, "drain"),
            (
                Route::AddNode,
                r#"{"id":"a","addr":"127.0.0.1:1","id":"b"}"#,
                "id",
            ),
            (Route::Canary, r#"{"share":0.1,"share":0.1}"#, "share"),
            (Route::Emergency, r#"{"mode":"on","mode":"off"}"#, "mode"),
        ] {
            assert_eq!(
                err(route, body),
                (400, format!("duplicate key \"{key}\"")),
                "{body}"
            );
        }
    }

    #[test]
    fn refusals_name_the_key_and_value() {
        let cases = [
            (
                Route::Node,
                r#"{"weight": 0}"#,
                "weight: 0 is out of range 1..=10000",
            ),
            (
                Route::Node,
                r#"{"weight": 1e5}"#,
                "weight: 100000 is out of range 1..=10000",
            ),
            (
                Route::Node,
                r#"{"weight": -3}"#,
                "weight: -3 is out of range 1..=10000",
            ),
            (
                Route::Node,
                r#"{"weight": 2.5}"#,
                "weight: integer expected, got 2.5",
            ),
            (
                Route::Node,
                r#"{"weight": "5"}"#,
                "weight: integer expected, got string",
            ),
            (
                Route::Node,
                r#"{"weight": null}"#,
                "weight: integer expected, got null",
            ),
            (
                Route::Node,
                r#"{"weight": 5, "drain": "yes"}"#,
                "drain: boolean expected, got string",
            ),
            (
                Route::Node,
                r#"{"weight": 5, "colour": 1}"#,
                "unknown key \"colour\" (allowed: drain, weight)",
            ),
            (Route::Node, "{}", "empty body: expected one of drain, weight"),
            (Route::Node, "[5]", "body must be a JSON object"),
            (Route::Node, "\"x\"", "body must be a JSON object"),
            (Route::Node, "", "a JSON object body is required"),
            (Route::AddNode, r#"{"id": "x"}"#, "missing key \"addr\""),
            (
                Route::AddNode,
                r#"{"id": "x", "addr": "a:1", "headers": ["sk-1"]}"#,
                "headers: object expected, got array",
            ),
            (
                Route::AddNode,
                r#"{"id": "x", "addr": "a:1", "headers": {"A": {"env": "K", "value": "sk-1"}}}"#,
                "headers.A: {\"env\": \"VAR\" [, \"prefix\": \"...\"]} expected",
            ),
            (
                Route::AddNode,
                r#"{"id": "x", "addr": "a:1", "headers": {"A": {"prefix": "sk-1"}}}"#,
                "headers.A: {\"env\": \"VAR\" [, \"prefix\": \"...\"]} expected",
            ),
            (
                Route::AddNode,
                r#"{"id": "x", "addr": "a:1", "tls_verify": "no"}"#,
                "tls_verify: boolean expected, got string",
            ),
            (
                Route::AddNode,
                r#"{"id": "x", "addr": "a:1", "backup": 1}"#,
                "backup: boolean expected, got number",
            ),
            (
                Route::AddNode,
                r#"{"id": ["x"], "addr": "a:1"}"#,
                "id: string expected, got array",
            ),
            (
                Route::Canary,
                r#"{"share": 1.5}"#,
                "share: 1.5 is out of range 0..1",
            ),
            (
                Route::Canary,
                r#"{"share": "half"}"#,
                "share: number expected, got string",
            ),
            (Route::Canary, "{}", "missing key \"share\""),
            (
                Route::Emergency,
                r#"{"mode": "maybe"}"#,
                "mode: \"on\", \"off\" or \"auto\" expected, got \"maybe\"",
            ),
            (
                Route::Emergency,
                r#"{"mode": {}}"#,
                "mode: string expected, got object",
            ),
        ];
        for (route, body, msg) in cases {
            assert_eq!(err(route, body), (400, msg.to_string()), "{body}");
        }
        let (status, msg) = err(Route::Node, r#"{"weight": 5"#);
        assert_eq!(status, 400);
        assert!(msg.starts_with("invalid JSON: "), "{msg}");
        // Invalid UTF-8 is invalid JSON, not a panic.
        let e = parse(Route::AddNode, b"{\"id\": \"\xff\", \"addr\": \"a:1\"}").unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.message.starts_with("invalid JSON: "), "{e}");
    }

    #[test]
    fn size_bound() {
        // Exactly the bound is accepted (whitespace pads it), one byte more is 413.
        let at = format!("{:<width$}", r#"{"weight": 5}"#, width = MAX_BODY);
        assert_eq!(at.len(), MAX_BODY);
        assert!(parse(Route::Node, at.as_bytes()).is_ok());
        let over = format!("{at} ");
        let e = parse(Route::Node, over.as_bytes()).unwrap_err();
        assert_eq!(e.status, 413, "{e}");
        assert!(e.message.contains("over the limit of 16384"), "{e}");
    }

    #[test]
    fn route_names_round_trip() {
        for r in Route::ALL {
            assert_eq!(Route::from_name(r.name()), Some(r));
        }
        assert_eq!(Route::from_name("nodes"), None);
    }
}
