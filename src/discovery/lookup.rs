//! Name lookups off nginx's event loop, for the admin API's node addition.
//!
//! `host:port` is resolved as a config file's node address is (the system resolver,
//! so /etc/hosts and /etc/resolv.conf count), but on a short-lived thread: the worker
//! that asked polls [`poll`] between `ngx.sleep`s and serves other requests meanwhile,
//! then adds the node with the address found (`crate::admin::add_node` does no lookup
//! for a node whose address is resolved). At most [`MAX_PENDING`] lookups run at once
//! in a process; answers not collected are dropped with the next lookup.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

/// Most lookups in flight per process.
pub const MAX_PENDING: usize = 32;

type Answer = Option<Result<SocketAddr, String>>;

static PENDING: Mutex<Option<HashMap<u64, Answer>>> = Mutex::new(None);
static NEXT: AtomicU64 = AtomicU64::new(1);

/// Start resolving `addr` (`ip:port`, `[v6]:port` or `host:port`); returns a ticket
/// for [`poll`], or an error when too many lookups are in flight.
pub fn start(addr: &str) -> Result<u64, String> {
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    {
        let mut p = PENDING.lock();
        let p = p.get_or_insert_with(HashMap::new);
        if p.values().filter(|a| a.is_none()).count() >= MAX_PENDING {
            return Err(format!("{MAX_PENDING} name lookups are in flight: try again"));
        }
        // Answers nobody collected (their worker gave up): dropped.
        p.retain(|_, a| a.is_none());
        p.insert(id, None);
    }
    let addr = addr.to_string();
    let spawned = std::thread::Builder::new()
        .name("rsb-lookup".into())
        .spawn(move || {
            let r = crate::config::resolve_addr(&addr);
            if let Some(slot) = PENDING.lock().as_mut().and_then(|p| p.get_mut(&id)) {
                *slot = Some(r);
            }
        });
    if let Err(e) = spawned {
        if let Some(p) = PENDING.lock().as_mut() {
            p.remove(&id);
        }
        return Err(format!("cannot start a lookup: {e}"));
    }
    Ok(id)
}

/// The answer of lookup `id` once it is there (and then forgotten); `None` while it
/// runs, or for an unknown ticket.
pub fn poll(id: u64) -> Answer {
    let mut p = PENDING.lock();
    let p = p.as_mut()?;
    match p.get(&id) {
        Some(Some(_)) => p.remove(&id).flatten(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait(id: u64) -> Result<SocketAddr, String> {
        for _ in 0..500 {
            if let Some(r) = poll(id) {
                return r;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("lookup {id} did not end");
    }

    #[test]
    fn a_lookup_answers_once() {
        let id = start("127.0.0.1:8000").unwrap();
        assert_eq!(wait(id), Ok("127.0.0.1:8000".parse().unwrap()));
        assert_eq!(poll(id), None, "collected");
        let id = start("localhost:8001").unwrap();
        assert_eq!(wait(id).unwrap().port(), 8001);
        let id = start("no-port").unwrap();
        assert!(wait(id).unwrap_err().contains("no port"));
    }
}
