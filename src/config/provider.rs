//! A node's provider (`pools.P.nodes[i].host`, `scheme`, `tls_verify`, `headers`,
//! `model`): what the gateway sends a node that is not a plain self-hosted server, so
//! that one pool can hold DeepSeek's own API and another OpenAI-compatible provider of
//! the same model, each with its own Host, TLS name, API key and model name.
//!
//! ```json
//! { "id": "deepseek", "addr": "api.deepseek.com:443", "scheme": "https",
//!   "headers": { "Authorization": { "env": "DEEPSEEK_API_KEY", "prefix": "Bearer " } },
//!   "model": "deepseek-chat" }
//! ```
//!
//! Header values are secrets. A value is a literal string or `{"env": "VAR"}` (with an
//! optional `prefix`, an auth scheme such as `"Bearer "`), resolved where the config is
//! loaded: `init_by_lua` runs in nginx's master, which has the whole environment, and
//! the workers inherit the values through fork (they themselves only see variables
//! named by nginx's `env` directive). Resolved values live in process memory only
//! ([`Secrets`]): the shared region's topology text, every read model and every error
//! message keep header names and variable names, never a value. A [`Secret`] prints
//! as `<redacted>` and has no `Display` nor `Serialize`.

use std::collections::HashMap;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserializer, Serializer};

use super::*;

/// Headers per node, at most.
pub const MAX_HEADERS: usize = 16;
/// A header value (prefix included), at most.
pub const MAX_HEADER_VALUE: usize = 4096;
/// A model name, in bytes.
pub const MODEL_LEN: RangeInclusive<usize> = 1..=256;

/// How the gateway talks to a node: `"http"` (default) or `"https"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    #[default]
    Http,
    Https,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// A resolved header value: never printed, never serialized.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Secret {
        Secret(value)
    }

    /// The value itself, for the request to the node (and nothing else).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Where a header's value comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum HeaderSource {
    /// Written in the config (a secret all the same).
    Literal(Secret),
    /// An environment variable of the process that loads the config, after `prefix`.
    Env { env: String, prefix: String },
}

impl HeaderSource {
    /// The variable's name, for an `env` value.
    pub fn env(&self) -> Option<&str> {
        match self {
            HeaderSource::Literal(_) => None,
            HeaderSource::Env { env, .. } => Some(env),
        }
    }
}

/// A literal serializes as `"<redacted>"`: a config is never written back with its
/// secrets.
impl Serialize for HeaderSource {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            HeaderSource::Literal(_) => s.serialize_str("<redacted>"),
            HeaderSource::Env { env, prefix } => EnvRef {
                env: env.clone(),
                prefix: prefix.clone(),
            }
            .serialize(s),
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EnvRef {
    env: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    prefix: String,
}

impl<'de> Deserialize<'de> for HeaderSource {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = HeaderSource;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a header value: a string or {\"env\": \"VAR\" [, \"prefix\": \"Bearer \"]}")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<HeaderSource, E> {
                Ok(HeaderSource::Literal(Secret(v.to_string())))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<HeaderSource, A::Error> {
                let r = EnvRef::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(HeaderSource::Env {
                    env: r.env,
                    prefix: r.prefix,
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// One header of a node as the topology and the read models show it: its name, and
/// the variable (and auth-scheme prefix) its value is read from; `env` absent for a
/// literal. Never the value.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HeaderRef {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prefix: String,
}

/// A node's provider without its secrets: what the shared topology keeps.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Provider {
    /// Host header and TLS SNI.
    pub host: String,
    pub scheme: Scheme,
    pub tls_verify: bool,
    pub headers: Vec<HeaderRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

pub(super) fn default_true() -> bool {
    true
}

pub(super) fn is_true(v: &bool) -> bool {
    *v
}

/// Header names the gateway owns (framing, routing): a node may not set them.
const RESERVED: [&str; 5] = [
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "upgrade",
];

/// An HTTP token (RFC 9110 tchar), 1..=64 bytes.
fn is_token(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// A header value: at most [`MAX_HEADER_VALUE`] bytes, no control character but tab.
fn value_ok(v: &str) -> bool {
    v.len() <= MAX_HEADER_VALUE && v.bytes().all(|b| b == b'\t' || !(b.is_ascii_control()))
}

/// A portable environment variable name, 1..=128 bytes of `[A-Za-z0-9_]`, not
/// starting with a digit.
fn is_env_name(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && !name.as_bytes()[0].is_ascii_digit()
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

impl NodeConfig {
    /// Does the node set anything of a provider?
    pub fn has_provider(&self) -> bool {
        self.host_header.is_some()
            || self.scheme != Scheme::Http
            || !self.tls_verify
            || !self.headers.is_empty()
            || self.model.is_some()
    }

    /// The node's provider as the topology keeps it (no values), or `None` for a
    /// plain node.
    pub fn provider(&self) -> Option<Provider> {
        self.has_provider().then(|| Provider {
            host: self
                .host_header
                .clone()
                .unwrap_or_else(|| self.host().to_string()),
            scheme: self.scheme,
            tls_verify: self.tls_verify,
            headers: self
                .headers
                .iter()
                .map(|(name, src)| HeaderRef {
                    name: name.clone(),
                    env: src.env().map(str::to_string),
                    prefix: match src {
                        HeaderSource::Env { prefix, .. } => prefix.clone(),
                        HeaderSource::Literal(_) => String::new(),
                    },
                })
                .collect(),
            model: self.model.clone(),
        })
    }

    /// The provider fields' checks (not the environment); `path` is the node's.
    pub(super) fn validate_provider(&self, path: &str) -> Result<(), ConfigError> {
        if let Some(host) = &self.host_header {
            check_host_header(&format!("{path}.host"), host)?;
        }
        if let Some(model) = &self.model {
            if !MODEL_LEN.contains(&model.len()) || model.chars().any(char::is_control) {
                return Err(ConfigError::new(
                    format!("{path}.model"),
                    format!(
                        "{model:?} must be {}..={} bytes without control characters",
                        MODEL_LEN.start(),
                        MODEL_LEN.end()
                    ),
                ));
            }
        }
        let hp = format!("{path}.headers");
        if self.headers.len() > MAX_HEADERS {
            return Err(ConfigError::new(
                hp,
                format!("{} headers: at most {MAX_HEADERS}", self.headers.len()),
            ));
        }
        let mut seen = HashSet::new();
        for (name, src) in &self.headers {
            let at = format!("{hp}.{name}");
            if !is_token(name) {
                return Err(ConfigError::new(
                    hp,
                    format!("invalid header name {name:?}: must be 1..=64 bytes of an HTTP token"),
                ));
            }
            let lower = name.to_ascii_lowercase();
            if RESERVED.contains(&lower.as_str()) {
                return Err(ConfigError::new(
                    hp,
                    format!(
                        "header {name:?} cannot be set per node (the Host header is the node's \"host\"; {} are the gateway's)",
                        RESERVED[1..].join(", ")
                    ),
                ));
            }
            if !seen.insert(lower) {
                return Err(ConfigError::new(
                    hp,
                    format!("header {name:?} is given twice (names are case-insensitive)"),
                ));
            }
            match src {
                // The value is not shown: it may be a key.
                HeaderSource::Literal(v) if !value_ok(v.expose()) => {
                    return Err(ConfigError::new(
                        at,
                        format!(
                            "the value is longer than {MAX_HEADER_VALUE} bytes or holds a control character (CR, LF, NUL)"
                        ),
                    ))
                }
                // Not shown: a key written here by mistake would be echoed.
                HeaderSource::Env { env, .. } if !is_env_name(env) => {
                    return Err(ConfigError::new(
                        format!("{at}.env"),
                        format!(
                            "a {}-byte value that is not an environment variable name ([A-Za-z_][A-Za-z0-9_]*, 1..=128 bytes)",
                            env.len()
                        ),
                    ))
                }
                HeaderSource::Env { prefix, .. }
                    if prefix.len() > 32
                        || !prefix.bytes().all(|b| b == b' ' || (b.is_ascii_graphic() && b != b'"')) =>
                {
                    return Err(ConfigError::new(
                        format!("{at}.prefix"),
                        format!(
                            "a {}-byte value: must be at most 32 bytes of printable ASCII (an auth scheme, as \"Bearer \")",
                            prefix.len()
                        ),
                    ))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Read the headers' values (environment variables of this process) into
    /// `resolved_headers`, unless done already. A variable that is not set, or whose
    /// value cannot be a header value, refuses the config naming the field and the
    /// variable, never the value.
    pub(super) fn resolve_headers(&mut self, path: &str) -> Result<(), ConfigError> {
        if self.resolved_headers.is_some() {
            return Ok(());
        }
        let mut out = Vec::with_capacity(self.headers.len());
        for (name, src) in &self.headers {
            let value = match src {
                HeaderSource::Literal(v) => v.clone(),
                HeaderSource::Env { env, prefix } => Secret(format!(
                    "{prefix}{}",
                    read_env(&format!("{path}.headers.{name}"), env)?
                )),
            };
            out.push((name.clone(), value));
        }
        self.resolved_headers = Some(out);
        Ok(())
    }
}

/// `VAR`'s value, checked as a header value; the error names `path` and the variable.
pub(crate) fn read_env(path: &str, env: &str) -> Result<String, ConfigError> {
    let err = |what: &str| {
        ConfigError::new(
            format!("{path}.env"),
            format!("environment variable {env:?} {what}"),
        )
    };
    let v = std::env::var_os(env).ok_or_else(|| {
        err("is not set (nginx workers see only the variables named by an `env` directive)")
    })?;
    let v = v.into_string().map_err(|_| err("is not valid UTF-8"))?;
    if v.is_empty() || !value_ok(&v) {
        return Err(err(&format!(
            "is empty, longer than {MAX_HEADER_VALUE} bytes or holds a control character (CR, LF, NUL)"
        )));
    }
    Ok(v)
}

/// Where a node's header values are kept: (pool, node id, header name).
type SecretKey = (String, String, String);

/// This process's resolved header values, by (pool, node id, header name), each with
/// the source it was read from ([`HeaderRef`]), so a value read for one source is
/// never sent for another (a node removed and added back with another variable).
/// Filled whenever a config is loaded in this process (the master, then inherited by
/// the workers through fork; a run-time `add_node` in the worker that runs it) and
/// never emptied: a stale entry is one no topology names any more.
#[derive(Default)]
pub struct Secrets {
    map: parking_lot::Mutex<HashMap<SecretKey, (HeaderRef, Secret)>>,
}

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secrets({} values, redacted)", self.map.lock().len())
    }
}

impl Secrets {
    /// Keep every resolved header value of `cfg`.
    pub fn remember(&self, cfg: &Config) {
        let mut map = self.map.lock();
        for (pool, pc) in &cfg.pools {
            for node in pc.nodes.iter().chain(super::discovery::unresolved(pc)) {
                let (Some(values), Some(p)) = (&node.resolved_headers, node.provider()) else {
                    continue;
                };
                for ((name, value), r) in values.iter().zip(p.headers) {
                    debug_assert_eq!(name, &r.name);
                    map.insert((pool.clone(), node.id.clone(), name.clone()), (r, value.clone()));
                }
            }
        }
    }

    /// The value of header `h` of node `id` in `pool`: the one kept for that source,
    /// else (an `env` header added at run time by another worker) this process's
    /// environment variable, else `None`.
    pub fn value(&self, pool: &str, id: &str, h: &HeaderRef) -> Option<Secret> {
        let key = (pool.to_string(), id.to_string(), h.name.clone());
        if let Some((r, v)) = self.map.lock().get(&key) {
            if r == h {
                return Some(v.clone());
            }
        }
        let env = h.env.as_deref()?;
        let v = read_env("-", env).ok()?;
        Some(Secret(format!("{}{v}", h.prefix)))
    }
}

impl NodeConfig {
    /// Set the provider fields from the topology's `p` (a node rebuilt from the active
    /// topology: literal values are left empty, they are not read again).
    pub fn set_provider(&mut self, p: &Provider) {
        self.host_header = Some(p.host.clone());
        self.scheme = p.scheme;
        self.tls_verify = p.tls_verify;
        self.model = p.model.clone();
        self.headers = p
            .headers
            .iter()
            .map(|h| {
                let src = match &h.env {
                    Some(env) => HeaderSource::Env {
                        env: env.clone(),
                        prefix: h.prefix.clone(),
                    },
                    None => HeaderSource::Literal(Secret::default()),
                };
                (h.name.clone(), src)
            })
            .collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn doc(node: Value) -> Value {
        let mut n = json!({ "id": "a", "addr": "127.0.0.1:8000" });
        n.as_object_mut()
            .unwrap()
            .extend(node.as_object().unwrap().clone());
        json!({ "pools": { "p": { "nodes": [ { "id": "z", "addr": "127.0.0.1:1" }, n ] } } })
    }

    fn err(node: Value) -> ConfigError {
        Config::from_value(doc(node)).unwrap_err()
    }

    #[test]
    fn provider_fields_load_and_show_no_values() {
        std::env::set_var("RSB_TEST_KEY_OK", "sk-secret-1");
        let c = Config::from_value(doc(json!({
            "host": "api.example.com", "scheme": "https", "tls_verify": false, "model": "m/x",
            "headers": { "Authorization": { "env": "RSB_TEST_KEY_OK", "prefix": "Bearer " },
                         "X-Org": "org-secret-2" }
        })))
        .unwrap();
        let n = &c.pools["p"].nodes[1];
        let values: Vec<(&str, &str)> = n
            .resolved_headers
            .as_ref()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.as_str(), v.expose()))
            .collect();
        assert_eq!(
            values,
            [("Authorization", "Bearer sk-secret-1"), ("X-Org", "org-secret-2")]
        );
        let p = n.provider().unwrap();
        assert_eq!(
            (p.host.as_str(), p.scheme, p.tls_verify),
            ("api.example.com", Scheme::Https, false)
        );
        let shown =
            serde_json::to_string(&p).unwrap() + &format!("{n:?}{c:?}") + &serde_json::to_string(&c).unwrap();
        assert!(!shown.contains("secret"), "{shown}");
        assert!(shown.contains("RSB_TEST_KEY_OK"), "{shown}");
        // A plain node has no provider; defaults: the host of addr, http, verify.
        assert_eq!(c.pools["p"].nodes[0].provider(), None);
        let c = Config::from_value(doc(json!({ "model": "m" }))).unwrap();
        let p = c.pools["p"].nodes[1].provider().unwrap();
        assert_eq!(
            (p.host.as_str(), p.scheme, p.tls_verify),
            ("127.0.0.1", Scheme::Http, true)
        );
    }

    #[test]
    fn bad_provider_fields_are_named() {
        let long = "v".repeat(MAX_HEADER_VALUE + 1);
        let many: serde_json::Map<String, Value> = (0..17).map(|i| (format!("X-{i}"), json!("v"))).collect();
        let cases = [
            (
                json!({ "scheme": "ftp" }),
                "pools.p.nodes[1].scheme",
                "unknown variant `ftp`",
            ),
            (
                json!({ "tls_verify": "yes" }),
                "pools.p.nodes[1].tls_verify",
                "invalid type: string",
            ),
            (
                json!({ "host": "a b" }),
                "pools.p.nodes[1].host",
                "\"a b\" is not a valid host",
            ),
            (
                json!({ "host": "a\r\nX: y" }),
                "pools.p.nodes[1].host",
                "is not a valid host",
            ),
            (
                json!({ "model": "" }),
                "pools.p.nodes[1].model",
                "\"\" must be 1..=256 bytes",
            ),
            (
                json!({ "model": "m".repeat(257) }),
                "pools.p.nodes[1].model",
                "must be 1..=256 bytes",
            ),
            (
                json!({ "model": "a\nb" }),
                "pools.p.nodes[1].model",
                "without control characters",
            ),
            (
                json!({ "headers": { "Bad Name": "v" } }),
                "pools.p.nodes[1].headers",
                "invalid header name \"Bad Name\"",
            ),
            (
                json!({ "headers": { "host": "v" } }),
                "pools.p.nodes[1].headers",
                "header \"host\" cannot be set per node",
            ),
            (
                json!({ "headers": { "Content-Length": "1" } }),
                "pools.p.nodes[1].headers",
                "\"Content-Length\" cannot be set",
            ),
            (
                json!({ "headers": { "Transfer-Encoding": "x" } }),
                "pools.p.nodes[1].headers",
                "cannot be set",
            ),
            (
                json!({ "headers": { "Connection": "x" } }),
                "pools.p.nodes[1].headers",
                "cannot be set",
            ),
            (
                json!({ "headers": { "X-A": "1", "x-a": "2" } }),
                "pools.p.nodes[1].headers",
                "is given twice",
            ),
            (
                json!({ "headers": Value::Object(many) }),
                "pools.p.nodes[1].headers",
                "17 headers: at most 16",
            ),
            (
                json!({ "headers": { "X-A": "sk-1\r\nX-Evil: 1" } }),
                "pools.p.nodes[1].headers.X-A",
                "control character",
            ),
            (
                json!({ "headers": { "X-A": long } }),
                "pools.p.nodes[1].headers.X-A",
                "longer than 4096",
            ),
            (
                json!({ "headers": { "X-A": 5 } }),
                "pools.p.nodes[1].headers.X-A",
                "invalid type: integer `5`, expected a header value",
            ),
            (
                json!({ "headers": { "X-A": { "envv": "K" } } }),
                "pools.p.nodes[1].headers.X-A",
                "unknown field `envv`",
            ),
            (
                json!({ "headers": { "X-A": {} } }),
                "pools.p.nodes[1].headers.X-A",
                "missing field `env`",
            ),
            (
                json!({ "headers": { "X-A": { "env": "1K" } } }),
                "pools.p.nodes[1].headers.X-A.env",
                "a 2-byte value that is not an environment variable name",
            ),
            (
                json!({ "headers": { "X-A": { "env": "sk-1" } } }),
                "pools.p.nodes[1].headers.X-A.env",
                "a 4-byte value that is not an environment variable name",
            ),
            (
                json!({ "headers": { "X-A": { "env": "K", "prefix": "Bearer sk-1\n" } } }),
                "pools.p.nodes[1].headers.X-A.prefix",
                "a 12-byte value: must be at most 32 bytes",
            ),
            (
                json!({ "headers": { "X-A": { "env": "RSB_TEST_NOT_SET" } } }),
                "pools.p.nodes[1].headers.X-A.env",
                "environment variable \"RSB_TEST_NOT_SET\" is not set",
            ),
            (json!({ "sni": "x" }), "pools.p.nodes[1]", "unknown field `sni`"),
        ];
        for (node, path, msg) in cases {
            let e = err(node.clone());
            assert_eq!(e.path, path, "{node}: {e}");
            assert!(e.message.contains(msg), "{node}: {e}");
            assert!(!e.to_string().contains("sk-1"), "{e}");
        }
        std::env::set_var("RSB_TEST_KEY_CRLF", "sk-2\r\nX-Evil: 1");
        let e = err(json!({ "headers": { "X-A": { "env": "RSB_TEST_KEY_CRLF" } } }));
        assert_eq!(e.path, "pools.p.nodes[1].headers.X-A.env");
        assert!(
            e.message
                .starts_with("environment variable \"RSB_TEST_KEY_CRLF\" is empty, longer"),
            "{e}"
        );
        assert!(!e.to_string().contains("sk-2"), "{e}");
    }

    #[test]
    fn secrets_kept_by_source() {
        std::env::set_var("RSB_TEST_KEY_S", "sk-3");
        let c = Config::from_value(doc(json!({
            "headers": { "X-Lit": "lit", "X-Env": { "env": "RSB_TEST_KEY_S", "prefix": "T " } }
        })))
        .unwrap();
        let s = Secrets::default();
        s.remember(&c);
        let p = c.pools["p"].nodes[1].provider().unwrap();
        let get = |h: &HeaderRef| s.value("p", "a", h).map(|v| v.expose().to_string());
        assert_eq!(get(&p.headers[0]).as_deref(), Some("T sk-3"));
        assert_eq!(get(&p.headers[1]).as_deref(), Some("lit"));
        // Another source for the same name: read anew (env), or nothing (a literal
        // this process never loaded).
        std::env::set_var("RSB_TEST_KEY_T", "sk-4");
        let other = HeaderRef {
            name: "X-Env".into(),
            env: Some("RSB_TEST_KEY_T".into()),
            prefix: String::new(),
        };
        assert_eq!(get(&other).as_deref(), Some("sk-4"));
        let lit = HeaderRef {
            name: "X-Lit".into(),
            env: None,
            prefix: String::new(),
        };
        assert_eq!(s.value("p", "b", &lit), None);
        assert!(!format!("{s:?}").contains("sk-"));
    }
}
