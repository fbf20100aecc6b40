//! mlua methods of service discovery (`crate::discovery`): the timer's tick, which
//! holds the discovery lease and runs the pools' source threads in the worker that
//! holds it.

use std::collections::HashMap;

use mlua::UserDataMethods;
use parking_lot::Mutex;

use super::LuaBalancer;
use crate::discovery::run::Runner;

/// This process's discovery threads per balancer handle.
static RUNNERS: Mutex<Option<HashMap<usize, Runner>>> = Mutex::new(None);

pub(super) fn add_methods<M: UserDataMethods<LuaBalancer>>(m: &mut M) {
    // has_discovery() -> whether some pool of the running config has a `discovery`
    // section (the timer is started only then).
    m.add_method("has_discovery", |_, this, ()| {
        Ok(this
            .0
            .topology()
            .is_ok_and(|t| t.pools.iter().any(|p| p.policy.discovery.is_some())))
    });
    // discovery_tick() -> an array of lines for the error log (sources that failed or
    // answered again, node sets that changed). Takes or renews the discovery lease and
    // keeps one thread per discovery pool while this process holds it.
    m.add_method("discovery_tick", |lua, this, ()| {
        let key = std::sync::Arc::as_ptr(&this.0) as usize;
        let lines = {
            let mut all = RUNNERS.lock();
            let all = all.get_or_insert_with(HashMap::new);
            all.entry(key).or_default().tick(&this.0)
        };
        lua.create_sequence_from(lines)
    });
}
