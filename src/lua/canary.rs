//! mlua methods of the canary split (`crate::canary`): the timer's tick and a state
//! read for admin pages. The per-request read of the share goes through the FFI
//! (`rsb_canary`), not through here.

use mlua::prelude::*;
use mlua::{UserDataMethods, Value};

use super::{nil_err, plain, LuaBalancer};

pub(super) fn add_methods<M: UserDataMethods<LuaBalancer>>(m: &mut M) {
    // canary_tick() -> { {pool=, rollback=bool, message=}, ... } | nil, err
    m.add_method("canary_tick", |lua, this, ()| {
        match crate::canary::canary_tick(&this.0) {
            Ok(events) => (lua.to_value_with(&events, plain())?,).into_lua_multi(lua),
            Err(e) => (Value::Nil, e.to_string()).into_lua_multi(lua),
        }
    });
    // canary_state(pool) -> {canary=, share=, key=, rolled_back=, rollbacks=,
    // ramp_next_in_ms=} | false (no canary) | nil, err
    m.add_method("canary_state", |lua, this, pool: String| {
        let r = crate::canary::canary_state(&this.0, &pool).and_then(|st| match st {
            Some(st) => lua
                .to_value_with(&st, plain())
                .map_err(|e| crate::balancer::Error::Invalid(e.to_string())),
            None => Ok(Value::Boolean(false)),
        });
        nil_err(lua, r)
    });
}
