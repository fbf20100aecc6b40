//! The sync thread of the worker holding the cluster lease, and its rounds with Redis
//! (the design: the module documentation of `crate::cluster`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redis::{Commands, Connection};

use crate::admin::{self, PoolState};
use crate::balancer::Balancer;
use crate::config::ClusterConfig;
use crate::emergency::Transition;
use crate::shm::clock;

use super::emergency::Detector;

/// Alerts the fleet's detector won in the sync thread, for the lease holder's Lua
/// timer to deliver (webhooks are sent from nginx's event loop).
type Outbox = Arc<parking_lot::Mutex<Vec<Transition>>>;

/// Largest pool state read from Redis (bytes): a value from outside.
const MAX_STATE: usize = 4 << 20;
/// Most cooldowns taken from Redis in one round.
const MAX_COOLDOWNS: isize = 10_000;

/// The sync thread of this process, while it holds the cluster lease.
pub struct Running {
    stop: Arc<AtomicBool>,
    shared: Arc<parking_lot::Mutex<Option<String>>>,
    alerts: Outbox,
    handle: Option<JoinHandle<()>>,
    /// What the last `poll` reported: `Some(None)` up, `Some(Some(err))` down.
    reported: Option<Option<String>>,
}

impl Running {
    /// Start the thread for `b` (whose process holds the cluster lease).
    pub fn start(b: Arc<Balancer>, cfg: ClusterConfig) -> std::io::Result<Running> {
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(parking_lot::Mutex::new(None));
        let alerts = Outbox::default();
        let (s, e, a) = (stop.clone(), shared.clone(), alerts.clone());
        let handle = std::thread::Builder::new()
            .name("rsb-cluster".into())
            .spawn(move || run(&b, cfg, &s, &e, &a))?;
        Ok(Running {
            stop,
            shared,
            alerts,
            handle: Some(handle),
            reported: None,
        })
    }

    /// The emergency transitions this gateway won for the fleet since the last call,
    /// to announce (log line and webhooks).
    pub fn take_alerts(&self) -> Vec<Transition> {
        std::mem::take(&mut *self.alerts.lock())
    }

    /// Whether the thread still runs (it ends when the lease is lost).
    pub fn alive(&self) -> bool {
        self.handle.as_ref().is_some_and(|h| !h.is_finished())
    }

    /// A line for the error log when Redis became reachable or unreachable since the
    /// last call (the first call reports the first round's outcome once it has one).
    pub fn poll(&mut self, b: &Balancer) -> Option<String> {
        let st = b.cluster_stats();
        if st.syncs == 0 && st.errors == 0 {
            return None;
        }
        let now = if st.up {
            None
        } else {
            Some(self.shared.lock().clone().unwrap_or_default())
        };
        if self.reported.as_ref() == Some(&now) || (self.reported.is_none() && now.is_none()) {
            self.reported = Some(now);
            return None;
        }
        let was_down = matches!(self.reported, Some(Some(_)));
        self.reported = Some(now.clone());
        match now {
            Some(err) if !was_down => Some(format!(
                "cluster: Redis unreachable ({err}): this gateway goes on alone with what it knows"
            )),
            Some(_) => None,
            None => Some("cluster: Redis reachable again: state merged with the fleet".into()),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// This gateway's default name: the host name and nginx's master pid (the worker's
/// parent).
pub fn gateway_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host: String = host
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || ".-".contains(*c))
        .take(48)
        .collect();
    format!(
        "{}:{}",
        if host.is_empty() { "gateway" } else { &host },
        std::os::unix::process::parent_id()
    )
}

fn run(
    b: &Balancer,
    cfg: ClusterConfig,
    stop: &AtomicBool,
    error: &parking_lot::Mutex<Option<String>>,
    alerts: &Outbox,
) {
    let every = Duration::from_millis(cfg.sync_ms.into());
    let mut s = Sync::new(cfg);
    // A reload's new workers take over: the old generation's thread stops at once,
    // before it could take the reload's reset of weights for an operator's change.
    while !stop.load(Ordering::Relaxed) && b.holds_cluster_lease() && !b.superseded() {
        let t0 = Instant::now();
        match s.round(b, alerts) {
            Ok(gateways) => {
                b.record_cluster_round(true, gateways);
                *error.lock() = None;
            }
            Err(e) => {
                s.conn = None;
                super::queue::forget(b);
                b.record_cluster_round(false, 0);
                *error.lock() = Some(e);
            }
        }
        std::thread::sleep(every.saturating_sub(t0.elapsed()));
    }
}

struct Sync {
    cfg: ClusterConfig,
    gateway: String,
    conn: Option<Connection>,
    /// The state counter as last seen (`<prefix>state:seq`).
    seen_seq: Option<i64>,
    /// Per pool, its state as this gateway last wrote or applied it (JSON).
    last: HashMap<String, String>,
    /// Per `pool/node`, the end (Unix ms) of the cooldown last published.
    published: HashMap<String, u64>,
    /// Per pool, the fingerprint of its state as the file loaded it (the first round
    /// after this thread started: nginx's start or reload).
    file_fp: HashMap<String, String>,
    /// Concurrency shares (`super::shares`).
    shares: super::shares::Shares,
    /// Budgets and headroom (`super::budgets`).
    budgets: super::budgets::Budgets,
    /// The fleet's emergency detector.
    detector: Detector,
    /// This gateway's waiters as mirrored into the fleet's queue (`super::queue`).
    queue: super::queue::Mirror,
}

pub(super) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// FNV-1a of a pool's state text: what `<prefix>base` records of a file's state.
fn fingerprint(text: &str) -> String {
    let h = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    format!("{h:016x}")
}

impl Sync {
    fn new(cfg: ClusterConfig) -> Sync {
        let gateway = cfg.gateway.clone().unwrap_or_else(gateway_name);
        Sync {
            cfg,
            gateway,
            conn: None,
            seen_seq: None,
            last: HashMap::new(),
            published: HashMap::new(),
            file_fp: HashMap::new(),
            shares: Default::default(),
            budgets: Default::default(),
            detector: Detector::default(),
            queue: Default::default(),
        }
    }

    fn key(&self, k: &str) -> String {
        format!("{}{k}", self.cfg.prefix)
    }

    fn connect(&self) -> Result<Connection, String> {
        let timeout = Duration::from_millis(self.cfg.timeout_ms.into());
        let password = match &self.cfg.password_env {
            Some(var) => Some(std::env::var(var).map_err(|_| {
                format!("cluster.password_env: {var} is not set in this worker's environment (add `env {var};` to nginx.conf)")
            })?),
            None => None,
        };
        let client = if let Some(url) = &self.cfg.redis {
            let info =
                redis::IntoConnectionInfo::into_connection_info(url.as_str()).map_err(|e| e.to_string())?;
            let info = match &password {
                Some(p) => {
                    let rs = info.redis_settings().clone().set_password(p);
                    info.set_redis_settings(rs)
                }
                None => info,
            };
            redis::Client::open(info).map_err(|e| e.to_string())?
        } else {
            let addrs = self.cfg.sentinels.iter().filter_map(|s| {
                let (h, p) = s.rsplit_once(':')?;
                Some(redis::ConnectionAddr::Tcp(h.to_string(), p.parse().ok()?))
            });
            let master = self.cfg.master.clone().unwrap_or_default();
            let mut builder = redis::sentinel::SentinelClientBuilder::new(
                addrs,
                master,
                redis::sentinel::SentinelServerType::Master,
            )
            .map_err(|e| e.to_string())?
            .set_client_to_redis_db(i64::from(self.cfg.db));
            if let Some(p) = &password {
                builder = builder.set_client_to_redis_password(p);
            }
            let mut sc = builder.build().map_err(|e| e.to_string())?;
            sc.get_client().map_err(|e| format!("sentinels: {e}"))?
        };
        let conn = client
            .get_connection_with_timeout(timeout)
            .map_err(|e| e.to_string())?;
        conn.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
        conn.set_write_timeout(Some(timeout)).map_err(|e| e.to_string())?;
        Ok(conn)
    }

    /// One round; returns the gateways alive in the fleet.
    fn round(&mut self, b: &Balancer, alerts: &Outbox) -> Result<u64, String> {
        if self.conn.is_none() {
            self.conn = Some(self.connect()?);
            // A new connection may be to a Redis that restarted empty or to another
            // master: read the fleet's state again (its change counter may have
            // started over) and publish again what this gateway knows.
            self.seen_seq = None;
            self.published.clear();
        }
        let now_unix = unix_ms();
        let now_mono = clock::now_ms();
        let lease_ms = (u64::from(self.cfg.sync_ms) * 10).max(2_000);
        // Cooldowns learned here since the last round, in Unix time.
        let mut out = Vec::new();
        for (pool, id, until) in b.cooling().map_err(|e| e.to_string())? {
            let end = now_unix + (until - now_mono);
            let member = format!("{pool}/{id}");
            if self.published.get(&member).is_none_or(|&p| end > p + 50) {
                out.push((member, end));
            }
        }
        let (gws, cool, state_seq) = (self.key("gws"), self.key("cool"), self.key("state:seq"));
        let mut pipe = redis::pipe();
        pipe.zadd(&gws, &self.gateway, now_unix + lease_ms).ignore();
        pipe.zrembyscore(&gws, "-inf", now_unix).ignore();
        pipe.zcard(&gws);
        for (member, end) in &out {
            pipe.cmd("ZADD")
                .arg(&cool)
                .arg("GT")
                .arg(*end)
                .arg(member)
                .ignore();
        }
        pipe.zrembyscore(&cool, "-inf", now_unix).ignore();
        pipe.cmd("ZRANGEBYSCORE")
            .arg(&cool)
            .arg(format!("({now_unix}"))
            .arg("+inf")
            .arg("WITHSCORES")
            .arg("LIMIT")
            .arg(0)
            .arg(MAX_COOLDOWNS);
        pipe.get(&state_seq);
        let conn = self.conn.as_mut().expect("connected above");
        let (gateways, running, seq): (u64, Vec<(String, f64)>, Option<i64>) =
            pipe.query(conn).map_err(|e| e.to_string())?;
        for (member, end) in out {
            self.published.insert(member, end);
        }
        self.published.retain(|_, &mut end| end > now_unix);
        for (member, end) in running {
            let Some((pool, id)) = member.split_once('/') else {
                continue;
            };
            let Ok(slot) = b.node_index(pool, id) else {
                continue;
            };
            if end.is_finite() && end > now_unix as f64 {
                let _ = b.cool_from_fleet(slot, (end - now_unix as f64) as u64);
            }
        }
        let (conn, prefix) = (self.conn.as_mut().expect("connected"), self.cfg.prefix.as_str());
        let times = (now_unix, lease_ms, 2 * u64::from(self.cfg.sync_ms));
        self.shares.round(b, conn, (&gws, prefix), &self.gateway, times)?;
        let conn = self.conn.as_mut().expect("connected");
        self.budgets.round(b, conn, prefix, &self.gateway, times)?;
        self.sync_state(b, seq)?;
        let prefix = self.cfg.prefix.clone();
        let conn = self.conn.as_mut().expect("connected above");
        let won = self.detector.round(
            b,
            conn,
            |k| format!("{prefix}{k}"),
            &self.gateway,
            now_unix,
            lease_ms,
        )?;
        alerts.lock().extend(won);
        let conn = self.conn.as_mut().expect("connected above");
        self.queue.round(
            b,
            conn,
            &self.cfg.prefix,
            &self.gateway,
            self.cfg.sync_ms,
            unix_ms(),
        )?;
        Ok(gateways)
    }

    /// Share the pools' run-time state (admin changes) with the fleet.
    fn sync_state(&mut self, b: &Balancer, seq: Option<i64>) -> Result<(), String> {
        let (state, base, state_seq) = (self.key("state"), self.key("base"), self.key("state:seq"));
        let topo = b.topology().map_err(|e| e.to_string())?;
        let first = self.last.is_empty();
        let conn = self.conn.as_mut().expect("connected");
        if first || seq != self.seen_seq {
            let remote: HashMap<String, String> = conn.hgetall(&state).map_err(|e| e.to_string())?;
            let bases: HashMap<String, String> = if first {
                conn.hgetall(&base).map_err(|e| e.to_string())?
            } else {
                HashMap::new()
            };
            for p in &topo.pools {
                if first {
                    let local = local_state(b, &p.name)?;
                    self.file_fp.insert(p.name.clone(), fingerprint(&local));
                }
                let Some(text) = remote.get(&p.name) else {
                    // Redis lost it (restarted empty): this gateway's state seeds it.
                    self.last.remove(&p.name);
                    continue;
                };
                let local = local_state(b, &p.name)?;
                // A starting gateway takes the fleet's state only when it loaded the
                // file the fleet's state grew from; a pending local change wins.
                let take = if first {
                    bases.get(&p.name) == self.file_fp.get(&p.name)
                } else {
                    self.last.get(&p.name) == Some(&local)
                };
                if take && *text != local && text.len() <= MAX_STATE {
                    match serde_json::from_str::<PoolState>(text) {
                        Ok(s) => {
                            if let Err(e) = admin::apply_state(b, &p.name, &s) {
                                return Err(format!("applying the fleet's state of pool {}: {e}", p.name));
                            }
                        }
                        Err(e) => {
                            return Err(format!("the fleet's state of pool {} is not valid: {e}", p.name))
                        }
                    }
                    self.last.insert(p.name.clone(), local_state(b, &p.name)?);
                } else if take {
                    self.last.insert(p.name.clone(), local);
                }
            }
            self.seen_seq = seq;
        }
        for p in &topo.pools {
            let local = local_state(b, &p.name)?;
            if self.last.get(&p.name) == Some(&local) || b.superseded() {
                continue;
            }
            let mut pipe = redis::pipe();
            pipe.hset(&state, &p.name, &local).ignore();
            if let Some(fp) = self.file_fp.get(&p.name) {
                // The file state this pool's fleet state grew from: a new file (first
                // round) replaces it; a re-seed after Redis lost it sets it back.
                if first {
                    pipe.hset(&base, &p.name, fp).ignore();
                } else {
                    pipe.hset_nx(&base, &p.name, fp).ignore();
                }
            }
            pipe.incr(&state_seq, 1);
            let (n,): (i64,) = pipe.query(conn).map_err(|e| e.to_string())?;
            self.seen_seq = Some(n);
            self.last.insert(p.name.clone(), local);
        }
        Ok(())
    }
}

fn local_state(b: &Balancer, pool: &str) -> Result<String, String> {
    let s = admin::pool_state(b, pool).map_err(|e| e.to_string())?;
    Ok(serde_json::to_string(&s).expect("a pool state serializes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_is_stable_and_tells_texts_apart() {
        assert_eq!(fingerprint("a"), fingerprint("a"));
        assert_ne!(fingerprint("a"), fingerprint("b"));
        assert_eq!(fingerprint("").len(), 16);
    }

    #[test]
    fn default_gateway_name_is_host_and_master_pid() {
        let g = gateway_name();
        let (host, pid) = g.rsplit_once(':').unwrap();
        assert!(!host.is_empty());
        assert_eq!(pid.parse::<u32>().unwrap(), std::os::unix::process::parent_id());
    }
}
