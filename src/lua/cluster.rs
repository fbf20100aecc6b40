//! mlua methods of cluster mode (`crate::cluster`): the timer's tick, which holds the
//! cluster lease and runs the sync thread in the worker that holds it.

use std::collections::HashMap;

use mlua::prelude::*;
use mlua::{UserDataMethods, Value};
use parking_lot::Mutex;

use super::LuaBalancer;
use crate::cluster::Running;

/// This process's sync thread per balancer handle (at most one runs per region: the
/// lease holder's).
static RUNNING: Mutex<Option<HashMap<usize, Running>>> = Mutex::new(None);

pub(super) fn add_methods<M: UserDataMethods<LuaBalancer>>(m: &mut M) {
    // cluster_sync_ms() -> the `cluster.sync_ms` of the running config, or nil when
    // it has no cluster section.
    m.add_method("cluster_sync_ms", |_, this, ()| {
        Ok(this
            .0
            .topology()
            .ok()
            .and_then(|t| t.cluster.as_ref().map(|c| c.sync_ms)))
    });
    // cluster_tick() -> line, alerts: a line for the error log when Redis became
    // reachable or unreachable (else nil), and the emergency transitions this gateway
    // won for the fleet since the last tick (a list of transitions, as
    // `emergency_tick` returns them, or nil). Takes or renews the cluster lease (three
    // sync intervals) and runs the sync thread while this process holds it.
    m.add_method("cluster_tick", |lua, this, ()| {
        let Some(cfg) = this.0.topology().ok().and_then(|t| t.cluster.clone()) else {
            return Ok(LuaMultiValue::new());
        };
        let key = std::sync::Arc::as_ptr(&this.0) as usize;
        let mut all = RUNNING.lock();
        let all = all.get_or_insert_with(HashMap::new);
        if !this.0.cluster_lease(u64::from(cfg.sync_ms) * 3) {
            all.remove(&key);
            return Ok(LuaMultiValue::new());
        }
        if !all.get(&key).is_some_and(Running::alive) {
            match Running::start(this.0.clone(), cfg) {
                Ok(r) => {
                    all.insert(key, r);
                }
                Err(e) => {
                    return format!("cluster: cannot start the sync thread: {e}").into_lua_multi(lua);
                }
            }
        }
        let Some(r) = all.get_mut(&key) else {
            return Ok(LuaMultiValue::new());
        };
        let line = match r.poll(&this.0) {
            Some(line) => line.into_lua(lua)?,
            None => Value::Nil,
        };
        let won = r.take_alerts();
        let alerts = if won.is_empty() {
            Value::Nil
        } else {
            let t = lua.create_table()?;
            for tr in &won {
                t.push(super::transition_table(lua, tr)?)?;
            }
            Value::Table(t)
        };
        (line, alerts).into_lua_multi(lua)
    });
}
