//! The mlua module, `require "rsbalancer"`: the control plane.
//!
//! Per-request calls go through LuaJIT's FFI (`lua/resty/rsbalancer.lua`), which
//! JIT-compiles; Lua C functions like these cannot be compiled and would stitch the
//! trace. This module loads configuration (JSON text or a Lua table), hands the
//! FFI a pointer to the balancer, and serves admin reads and writes.
//!
//! Balancers are kept in a process-wide registry by name. nginx runs `init_by_lua`
//! again in the master on every reload, with a fresh Lua VM: finding the region
//! there by name is what keeps learned state across reloads. The library is linked
//! with `-z nodelete`, so the registry survives the old VM unloading the module.
//!
//! Errors: misuse (wrong argument types, out-of-range values) raises
//! `bad argument #n to 'fn' (...)`; runtime failures return `nil, err`.

use std::collections::HashMap;
use std::sync::Arc;

use mlua::prelude::*;
use mlua::{LightUserData, UserData, UserDataMethods, Value};
use parking_lot::Mutex;

use crate::balancer::{Balancer, EmergencyMode, Error, WEIGHT_RANGE};
use crate::config::{Config, ConfigError};

mod admin;
mod canary;
mod cluster;
mod discovery;

static REGISTRY: Mutex<Option<HashMap<String, Arc<Balancer>>>> = Mutex::new(None);

struct LuaBalancer(Arc<Balancer>);

/// Serialize absent values as absent (nil), not as mlua's `null` sentinel.
fn plain() -> mlua::SerializeOptions {
    mlua::SerializeOptions::new()
        .serialize_none_to_null(false)
        .serialize_unit_to_null(false)
}

fn bad_argument(pos: usize, func: &str, msg: impl std::fmt::Display) -> LuaError {
    LuaError::runtime(format!("bad argument #{pos} to '{func}' ({msg})"))
}

/// `Ok(v)` as `v`, an error as `nil, err`.
fn nil_err<T: IntoLua>(lua: &Lua, r: Result<T, Error>) -> LuaResult<LuaMultiValue> {
    match r {
        Ok(v) => (v,).into_lua_multi(lua),
        Err(e) => (Value::Nil, e.to_string()).into_lua_multi(lua),
    }
}

/// Whole numbers become JSON integers (Lua 5.1 numbers are all doubles).
fn integral(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Number(n) => {
            if let Some(f) = n.as_f64().filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15) {
                if n.as_i64().is_none() && n.as_u64().is_none() {
                    *v = serde_json::Value::from(f as i64);
                }
            }
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(integral),
        serde_json::Value::Object(o) => o.values_mut().for_each(integral),
        _ => {}
    }
}

/// Tables nested deeper than this are refused (a table that contains itself).
const MAX_DEPTH: usize = 32;

/// A Lua config value as JSON, or an error naming its path (`pools.p.nodes[0].weight`,
/// array items counted from 0 as in every config error) and what is wrong with it:
/// a value of a type JSON has no place for (a function, userdata), a string that is
/// not UTF-8, a number that is not finite, a table that mixes array items and keys or
/// has keys that are neither strings nor 1..n. An empty table is an empty object.
/// Whole numbers are left as they come: the config's integer fields take 5.0 as 5
/// (`crate::strict`).
fn lua_json(v: &Value, path: &mut String, depth: usize) -> Result<serde_json::Value, ConfigError> {
    let here = |path: &String| {
        if path.is_empty() {
            "config".to_string()
        } else {
            path.clone()
        }
    };
    let bad = |path: &String, msg: String| Err(ConfigError::new(here(path), msg));
    Ok(match v {
        Value::Nil => serde_json::Value::Null,
        Value::LightUserData(u) if u.0.is_null() => serde_json::Value::Null, // cjson.null
        Value::Boolean(b) => serde_json::Value::Bool(*b),
        Value::Integer(i) => serde_json::Value::from(*i),
        Value::Number(n) => match serde_json::Number::from_f64(*n) {
            Some(n) => serde_json::Value::Number(n),
            None => return bad(path, format!("{n} is not a finite number")),
        },
        Value::String(s) => match s.to_str() {
            Ok(s) => serde_json::Value::String(s.to_string()),
            Err(_) => return bad(path, format!("{:?} is not valid UTF-8", s.to_string_lossy())),
        },
        Value::Table(t) => {
            if depth >= MAX_DEPTH {
                return bad(
                    path,
                    format!("tables nested deeper than {MAX_DEPTH} levels (a table that contains itself?)"),
                );
            }
            let len = t.raw_len();
            let mut pairs = Vec::new();
            for pair in t.pairs::<Value, Value>() {
                pairs.push(pair.map_err(|e| ConfigError::new(here(path), e.to_string()))?);
            }
            let base = path.len();
            if len > 0 && pairs.len() == len {
                // Keys exactly 1..len: an array.
                let mut items = vec![serde_json::Value::Null; len];
                for (k, item) in &pairs {
                    let i = match k {
                        Value::Integer(i) => *i as usize,
                        Value::Number(n) => *n as usize,
                        _ => unreachable!("a table of raw length n with n pairs has keys 1..n"),
                    };
                    path.push_str(&format!("[{}]", i - 1));
                    items[i - 1] = lua_json(item, path, depth + 1)?;
                    path.truncate(base);
                }
                serde_json::Value::Array(items)
            } else {
                let mut map = serde_json::Map::new();
                for (k, item) in &pairs {
                    let Value::String(key) = k else {
                        let what = if len > 0 {
                            "array items and keys mixed"
                        } else {
                            "a key"
                        };
                        return bad(
                            path,
                            format!(
                                "{what}: {} key {:?} (keys are strings, or 1..n for an array)",
                                k.type_name(),
                                k.to_string().unwrap_or_default()
                            ),
                        );
                    };
                    let Ok(key) = key.to_str() else {
                        return bad(
                            path,
                            format!("key {:?} is not valid UTF-8", key.to_string_lossy()),
                        );
                    };
                    if !path.is_empty() {
                        path.push('.');
                    }
                    path.push_str(&key);
                    let value = lua_json(item, path, depth + 1)?;
                    path.truncate(base);
                    map.insert(key.to_string(), value);
                }
                serde_json::Value::Object(map)
            }
        }
        other => {
            return bad(
                path,
                format!(
                    "a {} is not a config value (expected a string, number, boolean or table)",
                    other.type_name()
                ),
            )
        }
    })
}

/// A config from JSON text or a Lua table. A value of the wrong type is an argument
/// error; a bad config (a bad field anywhere in a table, bytes that are not UTF-8 in
/// JSON text) is `Err`, naming the field.
fn config_arg(v: Value, pos: usize, func: &str) -> LuaResult<Result<Config, Error>> {
    match v {
        Value::String(s) => Ok(Config::from_json_bytes(&s.as_bytes()).map_err(Error::Config)),
        Value::Table(_) => Ok(lua_json(&v, &mut String::new(), 0)
            .and_then(Config::from_value)
            .map_err(Error::Config)),
        other => Err(bad_argument(
            pos,
            func,
            format!("config JSON string or table expected, got {}", other.type_name()),
        )),
    }
}

fn weight_arg(w: i64, pos: usize, func: &str) -> LuaResult<u32> {
    u32::try_from(w)
        .ok()
        .filter(|w| WEIGHT_RANGE.contains(w))
        .ok_or_else(|| {
            bad_argument(
                pos,
                func,
                format!(
                    "weight {w} is out of range {}..={}",
                    WEIGHT_RANGE.start(),
                    WEIGHT_RANGE.end()
                ),
            )
        })
}

/// A config checked against the running region and numbered, not yet live
/// (`Balancer::stage`): what `init()` keeps for `init_worker()` to apply.
struct LuaStage {
    cfg: Config,
    seq: u64,
}

impl UserData for LuaStage {}

/// Create the named balancer with `cfg` live at once (nginx's first start), or, when
/// this process already has it (a reload: the master keeps the region), stage `cfg`
/// without applying it.
fn stage(name: &str, cfg: Config) -> Result<(Arc<Balancer>, LuaStage), Error> {
    let mut reg = REGISTRY.lock();
    let map = reg.get_or_insert_with(HashMap::new);
    if let Some(b) = map.get(name) {
        let seq = b.stage(&cfg)?;
        return Ok((b.clone(), LuaStage { cfg, seq }));
    }
    let (b, seq) = Balancer::create_staged(&cfg)?;
    let b = Arc::new(b);
    map.insert(name.to_string(), b.clone());
    Ok((b, LuaStage { cfg, seq }))
}

/// `balancer, stage` or `nil, err`.
fn staged(lua: &Lua, r: Result<(Arc<Balancer>, LuaStage), Error>) -> LuaResult<LuaMultiValue> {
    match r {
        Ok((b, st)) => (LuaBalancer(b), st).into_lua_multi(lua),
        Err(e) => (Value::Nil, e.to_string()).into_lua_multi(lua),
    }
}

/// Create the named balancer, or reconfigure it if this process already has it.
fn shared(name: &str, cfg: Config) -> Result<Arc<Balancer>, Error> {
    let mut reg = REGISTRY.lock();
    let map = reg.get_or_insert_with(HashMap::new);
    if let Some(b) = map.get(name) {
        b.configure(&cfg)?;
        return Ok(b.clone());
    }
    let b = Arc::new(Balancer::create(&cfg)?);
    map.insert(name.to_string(), b.clone());
    Ok(b)
}

impl UserData for LuaBalancer {
    fn add_methods<M: UserDataMethods<Self>>(m: &mut M) {
        // The `rsb_balancer *` for LuaJIT's FFI. Valid while this object lives.
        m.add_method("handle", |_, this, ()| {
            Ok(LightUserData(Arc::as_ptr(&this.0) as *mut std::ffi::c_void))
        });
        m.add_method("configure", |lua, this, cfg: Value| {
            let cfg = config_arg(cfg, 1, "configure")?;
            nil_err(lua, cfg.and_then(|c| this.0.configure(&c)).map(|_| true))
        });
        m.add_method("attach_worker", |lua, this, id: u32| {
            nil_err(lua, this.0.attach_worker(id))
        });
        // apply_stage(stage) -> true (applied now) | false (already live) | nil, err.
        m.add_method("apply_stage", |lua, this, st: mlua::UserDataRef<LuaStage>| {
            nil_err(lua, this.0.apply_stage(st.seq, &st.cfg))
        });
        m.add_method("stage_is_live", |_, this, st: mlua::UserDataRef<LuaStage>| {
            Ok(this.0.stage_is_live(st.seq))
        });
        m.add_method("generation", |_, this, ()| Ok(this.0.generation()));
        m.add_method("pool_names", |lua, this, ()| {
            let r = this
                .0
                .topology()
                .map(|t| t.pools.iter().map(|p| p.name.clone()).collect::<Vec<_>>());
            nil_err(lua, r)
        });
        // A pool's configuration as loaded (policies included), or nil, err.
        m.add_method("pool_config", |lua, this, name: String| {
            let r = this.0.topology().and_then(|t| {
                t.pool(&name)
                    .cloned()
                    .ok_or_else(|| Error::Invalid(format!("unknown pool \"{name}\"")))
            });
            match r {
                Ok(p) => (lua.to_value_with(&p.flat(), plain())?,).into_lua_multi(lua),
                Err(e) => (Value::Nil, e.to_string()).into_lua_multi(lua),
            }
        });
        m.add_method("health_lease", |_, this, ttl_ms: u64| {
            Ok(this.0.health_lease(ttl_ms))
        });
        // Record one probe: returns "up", "down" or false (no change), or nil, err.
        m.add_method("health_report", |lua, this, (node, passed): (u32, bool)| {
            let r = this.0.health_report(node, passed).map(|f| match f {
                crate::health::Flip::Up => Value::String(lua.create_string("up").expect("alloc")),
                crate::health::Flip::Down => Value::String(lua.create_string("down").expect("alloc")),
                crate::health::Flip::None => Value::Boolean(false),
            });
            nil_err(lua, r)
        });
        // Record a scrape of a node's /metrics (`crate::scrape::report`): `body` the
        // body of a 200, nil when the scrape failed. Returns what changed, for one log
        // line per transition: "fresh" | "stale" | false, "failing" | "working" |
        // false, and why the body counts as a failure (or nil); or nil, err.
        m.add_method(
            "queue_report",
            |lua, this, (node, body): (u32, Option<mlua::String>)| {
                let bytes = body.as_ref().map(|s| s.as_bytes());
                let r = crate::scrape::report(&this.0, node, bytes.as_deref());
                let word = |flip: Option<bool>, yes: &str, no: &str| -> LuaResult<Value> {
                    Ok(match flip {
                        Some(f) => Value::String(lua.create_string(if f { yes } else { no })?),
                        None => Value::Boolean(false),
                    })
                };
                match r {
                    Ok((e, why)) => (
                        word(e.fresh, "fresh", "stale")?,
                        word(e.failing, "failing", "working")?,
                        why,
                    )
                        .into_lua_multi(lua),
                    Err(e) => (Value::Nil, e.to_string()).into_lua_multi(lua),
                }
            },
        );
        m.add_method("pool_index", |lua, this, name: String| {
            nil_err(lua, this.0.pool_index(&name))
        });
        m.add_method("node_index", |lua, this, (pool, id): (String, String)| {
            nil_err(lua, this.0.node_index(&pool, &id))
        });
        // Nodes of a pool: { {id=, host=, ip=, port=, slot=, backup=}, ... }
        m.add_method("nodes", |lua, this, pool: String| {
            let r = this.0.topology().and_then(|t| {
                t.pool(&pool)
                    .map(|p| p.nodes.clone())
                    .ok_or_else(|| Error::Invalid(format!("unknown pool \"{pool}\"")))
            });
            let r = r.map(|nodes| {
                let t = lua.create_table()?;
                for n in nodes {
                    let e = lua.create_table()?;
                    e.set("id", n.id)?;
                    e.set("host", n.host)?;
                    e.set("ip", n.addr.ip().to_string())?;
                    e.set("port", n.addr.port())?;
                    e.set("slot", n.slot)?;
                    e.set("backup", n.backup)?;
                    t.push(e)?;
                }
                Ok::<_, LuaError>(t)
            });
            match r {
                Ok(t) => (t?,).into_lua_multi(lua),
                Err(e) => (Value::Nil, e.to_string()).into_lua_multi(lua),
            }
        });
        // What the proxy path sends each node of a pool, by node slot:
        // { [slot] = {scheme=, host=, tls_verify=, headers={{name, value}, ...},
        //   missing={name, ...}, model=} }, or nil, err. Header values are secrets:
        // this is the one read that has them (`resty.rsbalancer.provider`).
        m.add_method(
            "node_requests",
            |lua, this, pool: String| match crate::provider::requests(&this.0, &pool) {
                Ok(list) => (node_requests(lua, list)?,).into_lua_multi(lua),
                Err(e) => (Value::Nil, e.to_string()).into_lua_multi(lua),
            },
        );
        // The mlua path of the per-request calls (the FFI path is the fast one).
        m.add_method(
            "pick",
            |lua, this, (pool, key, tried): (u32, Option<LuaString>, Option<Vec<u32>>)| {
                let key = key.as_ref().map(|k| k.as_bytes().to_vec()).unwrap_or_default();
                nil_err(lua, this.0.pick(pool, &key, tried.as_deref().unwrap_or(&[])))
            },
        );
        m.add_method(
            "report",
            |lua, this, (node, status, latency_s, retry_after_s): (u32, u32, f64, Option<f64>)| {
                if latency_s.is_nan() || latency_s < 0.0 {
                    return Err(bad_argument(
                        3,
                        "report",
                        format!("latency {latency_s} is negative"),
                    ));
                }
                let us = (latency_s * 1e6).min(u32::MAX as f64) as u32;
                let ra = (retry_after_s.unwrap_or(0.0).max(0.0) * 1e3).min(u32::MAX as f64) as u32;
                nil_err(lua, this.0.report(node, status, us, ra).map(|_| true))
            },
        );
        m.add_method(
            "set_weight",
            |lua, this, (pool, id, weight): (String, String, i64)| {
                let weight = weight_arg(weight, 3, "set_weight")?;
                nil_err(
                    lua,
                    this.0
                        .node_index(&pool, &id)
                        .and_then(|n| this.0.set_weight(n, weight))
                        .map(|_| true),
                )
            },
        );
        // set_canary_share(pool, share 0..1)
        m.add_method("set_canary_share", |lua, this, (pool, share): (String, f64)| {
            if !(0.0..=1.0).contains(&share) {
                return Err(bad_argument(
                    2,
                    "set_canary_share",
                    format!("share 0..1 expected, got {share}"),
                ));
            }
            let parts = crate::params::parts(share);
            nil_err(
                lua,
                this.0
                    .pool_index(&pool)
                    .and_then(|p| this.0.set_canary_share(p, parts))
                    .map(|_| true),
            )
        });
        // set_emergency(pool, "on" | "off" | "auto")
        m.add_method("set_emergency", |lua, this, (pool, mode): (String, String)| {
            let mode = match mode.as_str() {
                "on" => EmergencyMode::On,
                "off" => EmergencyMode::Off,
                "auto" => EmergencyMode::Auto,
                other => {
                    return Err(bad_argument(
                        2,
                        "set_emergency",
                        format!("\"on\", \"off\" or \"auto\" expected, got \"{other}\""),
                    ))
                }
            };
            // true, plus the transition (for the alert) when the pool's state changed.
            let r = this
                .0
                .pool_index(&pool)
                .and_then(|p| crate::emergency::force_emergency(&this.0, p, mode));
            match r {
                Ok(Some(t)) => (true, transition_table(lua, &t)?).into_lua_multi(lua),
                Ok(None) => (true,).into_lua_multi(lua),
                Err(e) => (Value::Nil, e.to_string()).into_lua_multi(lua),
            }
        });
        // set_draining(pool, id, bool)
        m.add_method(
            "set_draining",
            |lua, this, (pool, id, on): (String, String, bool)| {
                nil_err(
                    lua,
                    this.0
                        .node_index(&pool, &id)
                        .and_then(|n| this.0.set_draining(n, on))
                        .map(|_| true),
                )
            },
        );
        // Run the overload detector once: { transition, ... } this process won (each
        // transition is won by exactly one process), or nil, err.
        m.add_method("emergency_tick", |lua, this, ()| {
            let r = crate::emergency::emergency_tick(&this.0, crate::shm::clock::now_ms());
            match r {
                Ok(list) => {
                    let t = lua.create_table()?;
                    for tr in &list {
                        t.push(transition_table(lua, tr)?)?;
                    }
                    (t,).into_lua_multi(lua)
                }
                Err(e) => (Value::Nil, e.to_string()).into_lua_multi(lua),
            }
        });
        // take_notices() -> { line, ... }, dropped: the node transitions this process
        // announced since the last call (`crate::notice`), as error-log lines, and how
        // many it had no room for. For the log timer (`resty.rsbalancer`).
        m.add_method("take_notices", |lua, this, ()| {
            let (list, dropped) = this.0.take_notices();
            let topo = this.0.topology().ok();
            let lines = lua.create_table()?;
            for n in &list {
                let found = topo.as_ref().and_then(|t| {
                    t.pools.iter().find_map(|p| {
                        p.nodes
                            .iter()
                            .find(|x| x.slot == n.slot)
                            .map(|x| (p.name.clone(), x.id.clone(), x.addr.to_string()))
                    })
                });
                let (pool, id, addr) =
                    found.unwrap_or_else(|| ("?".into(), format!("slot {}", n.slot), "?".into()));
                lines.push(n.line(&pool, &id, &addr))?;
            }
            Ok((lines, dropped))
        });
        // Every pool and node with live state, as JSON text (admin API, status page).
        m.add_method("status_json", |lua, this, ()| {
            nil_err(lua, crate::status::of(&this.0).map(|v| v.to_string()))
        });
        // State of a pool's nodes: { [id] = {weight=, inflight=, requests=, ...} }
        m.add_method("stats", |lua, this, pool: String| {
            let r = this.0.topology().and_then(|t| {
                let p = t
                    .pool(&pool)
                    .ok_or_else(|| Error::Invalid(format!("unknown pool \"{pool}\"")))?;
                let region = this.0.region();
                Ok(p.nodes
                    .iter()
                    .map(|n| (n.id.clone(), crate::node::stats(region, n.slot)))
                    .collect::<Vec<_>>())
            });
            match r {
                Ok(list) => {
                    let t = lua.create_table()?;
                    for (id, s) in list {
                        t.set(id, lua.to_value_with(&s, plain())?)?;
                    }
                    (t,).into_lua_multi(lua)
                }
                Err(e) => (Value::Nil, e.to_string()).into_lua_multi(lua),
            }
        });
        canary::add_methods(m);
        cluster::add_methods(m);
        discovery::add_methods(m);
        // Prometheus text exposition of every pool and node (`/metrics`), or nil, err.
        m.add_method("metrics", |lua, this, ()| {
            let mut text = String::with_capacity(64 * 1024);
            let r = crate::metrics::render(&this.0, &mut text).map(|_| text);
            nil_err(lua, r)
        });
        admin::add_methods(m);
    }
}

fn node_requests(lua: &Lua, list: Vec<crate::provider::NodeRequest>) -> LuaResult<LuaTable> {
    let t = lua.create_table()?;
    for r in list {
        let e = lua.create_table()?;
        e.set("scheme", r.scheme.as_str())?;
        e.set("host", r.host)?;
        e.set("tls_verify", r.tls_verify)?;
        let headers = lua.create_table()?;
        for (name, value) in &r.headers {
            headers.push(lua.create_sequence_from([name.as_str(), value.expose()])?)?;
        }
        e.set("headers", headers)?;
        e.set("missing", r.missing)?;
        e.set("model", r.model)?;
        t.raw_set(r.slot, e)?;
    }
    Ok(t)
}

/// An emergency transition for Lua: { pool=, event=, reason=, forced=, log=, body= }
/// (`body`: the alert JSON, `log`: the error-log line).
fn transition_table(lua: &Lua, t: &crate::emergency::Transition) -> LuaResult<LuaTable> {
    let e = lua.create_table()?;
    e.set("pool", t.pool.as_str())?;
    e.set("event", t.event)?;
    e.set("reason", t.reason.as_str())?;
    e.set("forced", t.forced)?;
    e.set("log", t.log_line())?;
    e.set("body", t.to_json())?;
    Ok(e)
}

#[mlua::lua_module(skip_memory_check)]
fn rsbalancer(lua: &Lua) -> LuaResult<LuaTable> {
    let m = lua.create_table()?;
    m.set("version", env!("CARGO_PKG_VERSION"))?;
    // rsbalancer.new(config) -> balancer | nil, err : a balancer with its own region.
    m.set(
        "new",
        lua.create_function(|lua, cfg: Value| {
            let cfg = config_arg(cfg, 1, "new")?;
            nil_err(
                lua,
                cfg.and_then(|c| Balancer::create(&c))
                    .map(|b| LuaBalancer(Arc::new(b))),
            )
        })?,
    )?;
    // rsbalancer.shared(name, config) -> balancer | nil, err : created once per
    // process and reconfigured on later calls (nginx reload keeps learned state).
    m.set(
        "shared",
        lua.create_function(|lua, (name, cfg): (String, Value)| {
            let cfg = config_arg(cfg, 2, "shared")?;
            nil_err(lua, cfg.and_then(|c| shared(&name, c)).map(LuaBalancer))
        })?,
    )?;
    // rsbalancer.stage(name, config) -> balancer, stage | nil, err : what init() uses.
    // The first call in a process creates the region with the config live; later ones
    // (reloads) check the config against the region and stage it for
    // balancer:apply_stage(stage), which init_worker() calls.
    m.set(
        "stage",
        lua.create_function(|lua, (name, cfg): (String, Value)| {
            let cfg = config_arg(cfg, 2, "stage")?;
            staged(lua, cfg.and_then(|c| stage(&name, c)))
        })?,
    )?;
    m.set(
        "stage_file",
        lua.create_function(|lua, (name, path): (String, String)| {
            let r = Config::from_file(std::path::Path::new(&path))
                .map_err(Error::Config)
                .and_then(|c| stage(&name, c));
            staged(lua, r)
        })?,
    )?;
    // rsbalancer.read_config(path) -> JSON text | nil, err (validated).
    m.set(
        "check_file",
        lua.create_function(|lua, path: String| {
            nil_err(
                lua,
                Config::from_file(std::path::Path::new(&path))
                    .map(|_| true)
                    .map_err(Error::Config),
            )
        })?,
    )?;
    m.set(
        "load_file",
        lua.create_function(|lua, (name, path): (String, String)| {
            let r = Config::from_file(std::path::Path::new(&path))
                .map_err(Error::Config)
                .and_then(|c| shared(&name, c))
                .map(LuaBalancer);
            nil_err(lua, r)
        })?,
    )?;
    // rsbalancer.rewrite_model(body, model) -> new body, previous model (nil when the
    // body named none) | nil, err: the JSON body's top-level "model" replaced, every
    // other byte as it was (`crate::model`).
    m.set(
        "rewrite_model",
        lua.create_function(|lua, (body, model): (Value, Value)| {
            let (Value::String(body), Value::String(model)) = (&body, &model) else {
                let (pos, v) = if body.is_string() { (2, &model) } else { (1, &body) };
                return Err(bad_argument(
                    pos,
                    "rewrite_model",
                    format!("string expected, got {}", v.type_name()),
                ));
            };
            let model = model
                .to_str()
                .map_err(|_| bad_argument(2, "rewrite_model", "model is not UTF-8"))?;
            match crate::model::rewrite_model(&body.as_bytes(), &model) {
                Ok(r) => (lua.create_string(&r.body)?, r.previous).into_lua_multi(lua),
                Err(e) => (Value::Nil, e.to_string()).into_lua_multi(lua),
            }
        })?,
    )?;
    // rsbalancer.add_include_usage(body) -> new body | false (none needed) | nil, err:
    // a streamed request's body asking for usage in the stream (`crate::stream`).
    m.set(
        "add_include_usage",
        lua.create_function(|lua, body: Value| {
            let Value::String(body) = &body else {
                return Err(bad_argument(
                    1,
                    "add_include_usage",
                    format!("string expected, got {}", body.type_name()),
                ));
            };
            match crate::stream::add_include_usage(&body.as_bytes()) {
                Ok(Some(b)) => lua.create_string(&b)?.into_lua_multi(lua),
                Ok(None) => false.into_lua_multi(lua),
                Err(e) => (Value::Nil, e.to_string()).into_lua_multi(lua),
            }
        })?,
    )?;
    admin::register(lua, &m)?;
    Ok(m)
}
