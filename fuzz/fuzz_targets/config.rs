//! The config parser and validator (`Config::from_json`, and `Config::from_value`, the
//! Lua-table path): never panics, and a refusal names a field.
//!
//! Node addresses whose host is a name are rewritten to 127.0.0.1 first (keeping the
//! port as written): validation resolves names, and a fuzzer must not query DNS.
#![no_main]

use std::net::IpAddr;

use libfuzzer_sys::fuzz_target;
use rsbalancer::config::Config;
use serde_json::Value;

/// Does `addr` (`host:port`) have a host that would be looked up in DNS?
fn needs_dns(addr: &str) -> bool {
    match addr.rsplit_once(':') {
        Some((host, _)) => {
            !host.is_empty()
                && !host.starts_with('[')
                && !host.contains(':')
                && host != "localhost"
                && host.parse::<IpAddr>().is_err()
        }
        None => false,
    }
}

/// Rewrites every `"addr"` string that needs DNS; true if one did.
fn without_dns(v: &mut Value) -> bool {
    match v {
        Value::Object(o) => {
            let mut changed = false;
            for (k, x) in o.iter_mut() {
                if let (true, Value::String(s)) = (k == "addr", &mut *x) {
                    if needs_dns(s) {
                        let port = s.rsplit_once(':').map_or("", |(_, p)| p).to_string();
                        *s = format!("127.0.0.1:{port}");
                        changed = true;
                    }
                } else {
                    changed |= without_dns(x);
                }
            }
            changed
        }
        Value::Array(a) => a.iter_mut().fold(false, |c, x| without_dns(x) | c),
        _ => false,
    }
}

fn named(r: Result<Config, rsbalancer::config::ConfigError>) {
    if let Err(e) = r {
        assert!(!e.path.is_empty(), "an error naming no field: {e}");
        assert!(!e.message.is_empty(), "an error without a message: {e}");
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match serde_json::from_str::<Value>(text) {
        Ok(mut v) => {
            if without_dns(&mut v) {
                named(Config::from_json(&v.to_string()));
            } else {
                named(Config::from_json(text));
            }
            named(Config::from_value(v));
        }
        // Not JSON: no address to resolve.
        Err(_) => named(Config::from_json(text)),
    }
});
