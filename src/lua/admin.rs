//! The admin part of the mlua module: adding and removing nodes, the state as a Lua
//! table, and JSON for `resty.rsbalancer.admin` (Debian's lua-nginx-module ships no
//! lua-cjson, so the admin API decodes and encodes with serde_json through here).
//!
//! Conventions as in the parent module: misuse raises `bad argument #n to 'fn' (...)`;
//! runtime failures return `nil, err` — here `nil, err, kind` with `kind` one of
//! `not_found`, `conflict`, `invalid`, `failed`, so the HTTP API can choose its status.

use mlua::prelude::*;
use mlua::{UserDataMethods, Value};

use super::{bad_argument, integral, plain, LuaBalancer};
use crate::admin::body::{parse, Request, Route, MAX_BODY};
use crate::admin::AdminError;
use crate::balancer::{EmergencyMode, Error};
use crate::config::NodeConfig;

/// `Ok(v)` as `v`, an error as `nil, err, kind`.
fn nil_err_kind<T: IntoLua>(lua: &Lua, r: Result<T, AdminError>) -> LuaResult<LuaMultiValue> {
    match r {
        Ok(v) => (v,).into_lua_multi(lua),
        Err(e) => (Value::Nil, e.to_string(), e.kind()).into_lua_multi(lua),
    }
}

/// A node table `{id=, addr=, weight=, backup=}`: wrong types or unknown keys raise.
fn node_arg(lua: &Lua, v: Value, pos: usize, func: &str) -> LuaResult<NodeConfig> {
    if !v.is_table() {
        return Err(bad_argument(
            pos,
            func,
            format!("node table expected, got {}", v.type_name()),
        ));
    }
    let mut json: serde_json::Value = lua.from_value(v).map_err(|e| bad_argument(pos, func, e))?;
    integral(&mut json);
    serde_path_to_error::deserialize(json).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            bad_argument(pos, func, inner)
        } else {
            bad_argument(pos, func, format!("{path}: {inner}"))
        }
    })
}

pub(super) fn add_methods<M: UserDataMethods<LuaBalancer>>(m: &mut M) {
    // add_node(pool, {id=, addr=, weight=, backup=} [, resolved]) -> slot | nil, err,
    // kind. `resolved` ("ip:port", from lookup_poll) spares the lookup of `addr`.
    m.add_method(
        "add_node",
        |lua, this, (pool, node, resolved): (String, Value, Option<String>)| {
            let mut node = node_arg(lua, node, 2, "add_node")?;
            if let Some(r) = resolved {
                node.resolved =
                    Some(r.parse().map_err(|_| {
                        bad_argument(3, "add_node", format!("an ip:port expected, got {r:?}"))
                    })?);
            }
            nil_err_kind(lua, crate::admin::add_node(&this.0, &pool, node))
        },
    );
    // lookup_start(addr) -> ticket | nil, err: resolve a node address on a thread
    // (`crate::discovery::lookup`).
    m.add_method(
        "lookup_start",
        |lua, _, addr: String| match crate::discovery::lookup::start(&addr) {
            Ok(id) => (id,).into_lua_multi(lua),
            Err(e) => (Value::Nil, e).into_lua_multi(lua),
        },
    );
    // lookup_poll(ticket) -> "ip:port" | nil, err | nil (still running)
    m.add_method(
        "lookup_poll",
        |lua, _, id: u64| match crate::discovery::lookup::poll(id) {
            Some(Ok(a)) => (a.to_string(),).into_lua_multi(lua),
            Some(Err(e)) => (Value::Nil, e).into_lua_multi(lua),
            None => ().into_lua_multi(lua),
        },
    );
    // remove_node(pool, id) -> true | nil, err, kind
    m.add_method("remove_node", |lua, this, (pool, id): (String, String)| {
        nil_err_kind(lua, crate::admin::remove_node(&this.0, &pool, &id).map(|()| true))
    });
    // state([pool]) -> { generation=, pools={ [name]={...} } } or one pool's table |
    // nil, err, kind
    m.add_method("state", |lua, this, pool: Option<String>| {
        let r = crate::status::of(&this.0)
            .map_err(AdminError::from)
            .and_then(|mut v| match &pool {
                None => Ok(v),
                Some(p) => match v["pools"].get_mut(p.as_str()) {
                    Some(pv) => Ok(pv.take()),
                    None => Err(AdminError::NotFound(format!("unknown pool \"{p}\""))),
                },
            });
        match r {
            Ok(v) => (lua.to_value_with(&v, plain())?,).into_lua_multi(lua),
            Err(e) => nil_err_kind::<Value>(lua, Err(e)),
        }
    });
}

/// A valid admin body as a Lua table of its keys (absent keys are nil).
fn request_table(lua: &Lua, r: Request) -> LuaResult<LuaTable> {
    let t = lua.create_table()?;
    match r {
        Request::Node { weight, drain } => {
            t.set("weight", weight)?;
            t.set("drain", drain)?;
        }
        Request::AddNode {
            id,
            addr,
            weight,
            backup,
            provider,
        } => {
            t.set("id", id)?;
            t.set("addr", addr)?;
            t.set("weight", weight)?;
            t.set("backup", backup)?;
            for (k, v) in provider {
                t.set(k, lua.to_value_with(&v, plain())?)?;
            }
        }
        Request::Canary { share } => t.set("share", share)?,
        Request::Emergency { mode } => t.set(
            "mode",
            match mode {
                EmergencyMode::On => "on",
                EmergencyMode::Off => "off",
                EmergencyMode::Auto => "auto",
            },
        )?,
    }
    Ok(t)
}

/// Adds `admin_body`, `admin_body_max`, `json_decode`, `json_encode` and `null` to the module table.
pub(super) fn register(lua: &Lua, m: &LuaTable) -> LuaResult<()> {
    // admin_body(route, text) -> table | nil, err, status (400 or 413): the body of an
    // admin route ("node", "add_node", "canary", "emergency"), parsed and validated
    // whole by `crate::admin::body::parse`. An unknown route raises.
    m.set(
        "admin_body",
        lua.create_function(|lua, (route, text): (LuaString, LuaString)| {
            let name = route.to_string_lossy();
            let route = Route::from_name(&name).ok_or_else(|| {
                let names: Vec<&str> = Route::ALL.iter().map(|r| r.name()).collect();
                bad_argument(
                    1,
                    "admin_body",
                    format!("route {} expected, got {name:?}", names.join(", ")),
                )
            })?;
            match parse(route, &text.as_bytes()) {
                Ok(r) => (request_table(lua, r)?,).into_lua_multi(lua),
                Err(e) => (Value::Nil, e.message, e.status).into_lua_multi(lua),
            }
        })?,
    )?;
    // json_decode(text) -> value | nil, err. JSON null is `rsbalancer.null`, so a key
    // set to null is present (and refused by type checks) rather than absent.
    m.set(
        "json_decode",
        lua.create_function(|lua, text: LuaString| {
            let r = serde_json::from_slice::<serde_json::Value>(&text.as_bytes())
                .map_err(|e| Error::Invalid(format!("invalid JSON: {e}")));
            match r {
                Ok(v) => (lua.to_value(&v)?,).into_lua_multi(lua),
                Err(e) => (Value::Nil, e.to_string()).into_lua_multi(lua),
            }
        })?,
    )?;
    // json_encode(value) -> text | nil, err (whole numbers as integers).
    m.set(
        "json_encode",
        lua.create_function(|lua, v: Value| {
            let r = lua
                .from_value::<serde_json::Value>(v)
                .map(|mut j| {
                    integral(&mut j);
                    j.to_string()
                })
                .map_err(|e| Error::Invalid(format!("cannot encode as JSON: {e}")));
            match r {
                Ok(s) => (s,).into_lua_multi(lua),
                Err(e) => (Value::Nil, e.to_string()).into_lua_multi(lua),
            }
        })?,
    )?;
    m.set("admin_body_max", MAX_BODY)?;
    m.set("null", lua.null())?;
    Ok(())
}
