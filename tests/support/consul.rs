//! A **stand-in for a Consul agent** (Debian has no Consul server): a small HTTP server,
//! run on a thread of the test process, that implements the parts of Consul's HTTP API
//! rsbalancer's Consul discovery uses. Written from Consul's API documentation
//! (developer.hashicorp.com/consul/api-docs: "Health", "Agent / Service", "Agent /
//! Check", "Blocking Queries", "ACLs"), not from Consul's code. It is NOT Consul: one
//! agent that is also the catalog, one node, no Raft, no gossip. What it does:
//!
//! - `PUT /v1/agent/service/register`: a service definition as the agent API takes it
//!   (`Name`, `ID` (default: the name), `Tags`, `Address` (empty: the node's address is
//!   used by readers), `Port`, `Meta`, `Weights` (default `{"Passing":1,"Warning":1}`),
//!   `Check` or `Checks`). Keys match case-insensitively and with or without
//!   underscores, as Consul's decoder does (so the lower-case `service` block of an
//!   agent config file, the seed's form, registers as `consul services register`
//!   would send it). Registering an existing ID replaces it.
//! - Checks, run by the stand-in itself as an agent runs them: `Args` (a script: exit
//!   0 passing, 1 warning, anything else or over `Timeout` critical; refused unless
//!   the stand-in is started with script checks on, as an agent refuses them without
//!   `enable_local_script_checks`), `HTTP` (GET: 2xx passing, 429 warning, anything
//!   else or over `Timeout` (default 10 s) critical), `TTL` (`PUT
//!   /v1/agent/check/pass|warn|fail/<check id>`; critical when the TTL runs out). A new
//!   check starts `critical` (or its `Status`). Differences: the first run is at once
//!   (an agent staggers it within the interval), and output changes never bump the
//!   index (only status changes, as an agent syncs them at once).
//! - `PUT /v1/agent/service/deregister/<id>` and `PUT
//!   /v1/agent/service/maintenance/<id>?enable=true|false` (a critical
//!   `_service_maintenance:<id>` check while on).
//! - `GET /v1/health/service/<name>` with `passing` (only instances whose every check,
//!   the node's `serfHealth` included, passes), `tag` (repeatable: all must be
//!   present), `dc` (another datacenter: 500 "No path to datacenter"), and blocking
//!   queries: `index=N` answers at once when the service's index is above N, else
//!   holds the request until it is or `wait` (default 5m, at most 10m, plus up to
//!   wait/16 of jitter) elapses; `X-Consul-Index` on every answer. The index of a
//!   service is the raft index of its last change (register, deregister, a check's
//!   status), the global index for a name never seen; it never goes backwards except
//!   through the stand-in's own [`Standin::set_index`]. `filter` is refused (400).
//!   Bodies over 2 KiB go out chunked, as Go's HTTP server sends them.
//! - ACLs: started with a token, every request must carry it (`X-Consul-Token`,
//!   `Authorization: Bearer`, or `?token=`): else 403 "ACL not found".
//!
//! Stand-in-only controls (Rust methods, not HTTP): the health queries seen (their
//! count and query strings), the last token, [`Standin::set_index`] (to make an index go backwards, as
//! a snapshot restore does), [`Standin::stop`] and [`Standin::restart`] (an agent
//! that goes away and comes back empty, as one without a data dir does).

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

/// How the stand-in agent is set up.
#[derive(Clone, Debug)]
pub struct StandinOptions {
    /// The node name and address readers see (`Node.Node`, `Node.Address`).
    pub node: String,
    pub node_address: String,
    pub datacenter: String,
    /// ACL token every request must carry; none: ACLs off.
    pub token: Option<String>,
    /// Allow `Args` checks (`enable_local_script_checks` of an agent).
    pub script_checks: bool,
    /// The raft index the stand-in starts at.
    pub start_index: u64,
}

impl Default for StandinOptions {
    fn default() -> Self {
        StandinOptions {
            node: "standin-node".into(),
            node_address: "127.0.0.1".into(),
            datacenter: "dc1".into(),
            token: None,
            script_checks: true,
            start_index: 10,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Kind {
    Script(Vec<String>),
    Http(String),
    Ttl(Duration),
    /// Maintenance mode: critical until removed.
    Maint,
}

#[derive(Clone, Debug)]
struct Check {
    id: String,
    name: String,
    kind: Kind,
    interval: Duration,
    timeout: Duration,
    status: String,
    output: String,
    next_run: Instant,
    running: bool,
    /// TTL checks: when the TTL runs out.
    ttl_end: Option<Instant>,
    create_index: u64,
    modify_index: u64,
}

#[derive(Clone, Debug)]
struct Service {
    id: String,
    name: String,
    tags: Vec<String>,
    address: String,
    port: u64,
    meta: Map<String, Value>,
    weights: (u64, u64),
    checks: Vec<Check>,
    create_index: u64,
    modify_index: u64,
}

#[derive(Default)]
struct State {
    index: u64,
    services: BTreeMap<String, Service>,
    /// Per service name, the index of its last change.
    by_name: HashMap<String, u64>,
    health_queries: u64,
    last_query: String,
    /// The last 1000 health queries' path and query string.
    queries: std::collections::VecDeque<String>,
    last_token: Option<String>,
}

struct Shared {
    opts: StandinOptions,
    state: Mutex<State>,
    changed: Condvar,
    stop: AtomicBool,
}

impl Shared {
    /// A change to service `name`: the next raft index, blocked queries woken.
    fn bump(&self, st: &mut State, name: &str) -> u64 {
        st.index += 1;
        let i = st.index;
        st.by_name.insert(name.to_string(), i);
        self.changed.notify_all();
        i
    }
}

/// A running stand-in agent (see the module documentation); stopped when dropped.
pub struct Standin {
    pub port: u16,
    opts: StandinOptions,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Standin {
    /// A stand-in on a free port.
    pub fn start(opts: StandinOptions) -> Standin {
        Standin::start_on(super::free_port(), opts)
    }

    fn start_on(port: u16, opts: StandinOptions) -> Standin {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("consul stand-in: bind 127.0.0.1:{port}: {e}"));
        listener.set_nonblocking(true).expect("nonblocking listener");
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                index: opts.start_index,
                ..State::default()
            }),
            opts: opts.clone(),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let (s1, s2) = (shared.clone(), shared.clone());
        let accept = std::thread::spawn(move || accept_loop(&listener, &s1));
        let checks = std::thread::spawn(move || check_loop(&s2));
        Standin {
            port,
            opts,
            shared,
            threads: vec![accept, checks],
        }
    }

    /// `host:port` of the agent's HTTP API.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Stops the agent: the listener closes, blocked queries are cut (their clients
    /// see the connection close without an answer). Idempotent.
    pub fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.changed.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    /// Starts it again on the same port, empty (no services), its index back at the
    /// start index: an agent restarted without its data.
    pub fn restart(&mut self) {
        self.stop();
        *self = Standin::start_on(self.port, self.opts.clone());
    }

    /// Health queries answered so far (`GET /v1/health/service/...`).
    pub fn health_queries(&self) -> u64 {
        self.shared.state.lock().unwrap().health_queries
    }

    /// The path and query string of the last health query.
    pub fn last_query(&self) -> String {
        self.shared.state.lock().unwrap().last_query.clone()
    }

    /// The last 1000 health queries (path and query string), oldest first.
    pub fn queries(&self) -> Vec<String> {
        self.shared
            .state
            .lock()
            .unwrap()
            .queries
            .iter()
            .cloned()
            .collect()
    }

    /// The ACL token the last health query carried (none: `None`).
    pub fn last_token(&self) -> Option<String> {
        self.shared.state.lock().unwrap().last_token.clone()
    }

    /// The current raft index.
    pub fn index(&self) -> u64 {
        self.shared.state.lock().unwrap().index
    }

    /// Sets the raft index (every service's index at most this): an index that goes
    /// backwards, as after a snapshot restore. Stand-in only.
    pub fn set_index(&self, index: u64) {
        let mut st = self.shared.state.lock().unwrap();
        st.index = index;
        for v in st.by_name.values_mut() {
            *v = (*v).min(index);
        }
        self.shared.changed.notify_all();
    }

    /// `PUT` to the agent API with the stand-in's token; returns (status, body).
    pub fn put(&self, path: &str, body: &str) -> (u16, String) {
        let mut headers = Vec::new();
        if let Some(t) = &self.opts.token {
            headers.push(("X-Consul-Token", t.as_str()));
        }
        let r = super::http_with(self.port, "PUT", path, &headers, Some(body))
            .unwrap_or_else(|e| panic!("consul stand-in PUT {path}: {e}"));
        (r.status, r.text())
    }

    /// Registers a service definition (agent API form); panics unless 200.
    pub fn register(&self, def: &Value) {
        let (status, body) = self.put("/v1/agent/service/register", &def.to_string());
        assert_eq!(status, 200, "consul stand-in register {def}: {body}");
    }

    /// Deregisters a service instance by ID; panics unless 200.
    pub fn deregister(&self, id: &str) {
        let (status, body) = self.put(&format!("/v1/agent/service/deregister/{id}"), "");
        assert_eq!(status, 200, "consul stand-in deregister {id}: {body}");
    }

    /// `PUT /v1/agent/check/<pass|warn|fail>/<check id>` (TTL checks).
    pub fn ttl(&self, verb: &str, check: &str) {
        let (status, body) = self.put(&format!("/v1/agent/check/{verb}/{check}"), "");
        assert_eq!(status, 200, "consul stand-in check {verb} {check}: {body}");
    }

    /// The status of a check (`service:<id>` for a service's single check).
    pub fn check_status(&self, check: &str) -> Option<String> {
        let st = self.shared.state.lock().unwrap();
        st.services
            .values()
            .flat_map(|s| &s.checks)
            .find(|c| c.id == check)
            .map(|c| c.status.clone())
    }
}

impl Drop for Standin {
    fn drop(&mut self) {
        self.stop();
    }
}

// ----------------------------------------------------------------------------------
// Service definitions

/// The value of `key` in `obj`, matching as Consul's decoder does: case-insensitively,
/// and `check_id` for `CheckID`.
fn field<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    let norm = |s: &str| s.replace('_', "").to_ascii_lowercase();
    let want = norm(key);
    obj.iter().find(|(k, _)| norm(k) == want).map(|(_, v)| v)
}

fn str_field(obj: &Map<String, Value>, key: &str) -> Result<String, String> {
    match field(obj, key) {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(v) => Err(format!("{key}: expected a string, got {v}")),
    }
}

/// A Go duration: `10s`, `2s`, `1m30s`, `500ms`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let mut total = 0f64;
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    if rest == "0" {
        return Some(Duration::ZERO);
    }
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let value: f64 = rest[..n].parse().ok()?;
        rest = &rest[n..];
        let (unit, len) = [
            ("ns", 1e-9),
            ("us", 1e-6),
            ("ms", 1e-3),
            ("s", 1.0),
            ("m", 60.0),
            ("h", 3600.0),
        ]
        .iter()
        .find(|(u, _)| rest.starts_with(u))
        .map(|(u, f)| (*f, u.len()))?;
        total += value * unit;
        rest = &rest[len..];
    }
    Some(Duration::from_secs_f64(total))
}

fn duration_field(obj: &Map<String, Value>, key: &str) -> Result<Option<Duration>, String> {
    match field(obj, key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => parse_duration(s)
            .map(Some)
            .ok_or_else(|| format!("{key}: invalid duration {s:?}")),
        // Go's time.Duration in JSON: nanoseconds.
        Some(Value::Number(n)) => Ok(n.as_u64().map(Duration::from_nanos)),
        Some(v) => Err(format!("{key}: invalid duration {v}")),
    }
}

fn parse_check(
    opts: &StandinOptions,
    def: &Map<String, Value>,
    id: String,
    default_name: &str,
    index: u64,
) -> Result<Check, String> {
    let args = match field(def, "Args").or_else(|| field(def, "ScriptArgs")) {
        Some(Value::Array(a)) if !a.is_empty() => Some(
            a.iter()
                .map(|v| v.as_str().map(str::to_string).ok_or("Args: expected strings"))
                .collect::<Result<Vec<_>, _>>()?,
        ),
        _ => None,
    };
    let http = str_field(def, "HTTP")?;
    let ttl = duration_field(def, "TTL")?;
    let interval = duration_field(def, "Interval")?;
    let timeout = duration_field(def, "Timeout")?.unwrap_or(Duration::from_secs(10));
    let kind = match (args, http.is_empty(), ttl) {
        (Some(a), true, None) => {
            if !opts.script_checks {
                return Err("Scripts are disabled on this agent; to enable, configure \
                            'enable_script_checks' or 'enable_local_script_checks' to true"
                    .into());
            }
            Kind::Script(a)
        }
        (None, false, None) => Kind::Http(http),
        (None, true, Some(t)) => Kind::Ttl(t),
        _ => {
            return Err("Invalid check: must have exactly one of Args, HTTP or TTL \
                        (the stand-in runs no other kinds)"
                .into())
        }
    };
    let interval = match (&kind, interval) {
        (Kind::Ttl(_), _) => Duration::from_secs(1),
        (_, Some(i)) if i >= Duration::from_millis(10) => i,
        _ => return Err("Interval must be > 10ms".into()),
    };
    let status = match str_field(def, "Status")?.as_str() {
        "" => "critical".to_string(),
        s @ ("passing" | "warning" | "critical") => s.to_string(),
        s => return Err(format!("Status: invalid {s:?}")),
    };
    let name = match str_field(def, "Name")? {
        n if n.is_empty() => default_name.to_string(),
        n => n,
    };
    let now = Instant::now();
    Ok(Check {
        id,
        name,
        ttl_end: match &kind {
            Kind::Ttl(t) => Some(now + *t),
            _ => None,
        },
        kind,
        interval,
        timeout,
        status,
        output: String::new(),
        next_run: now,
        running: false,
        create_index: index,
        modify_index: index,
    })
}

fn parse_service(opts: &StandinOptions, body: &[u8], index: u64) -> Result<Service, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("Request decode failed: {e}"))?;
    let def = v.as_object().ok_or("Request decode failed: not an object")?;
    let name = str_field(def, "Name")?;
    if name.is_empty() {
        return Err("Missing service name".into());
    }
    let id = match str_field(def, "ID")? {
        i if i.is_empty() => name.clone(),
        i => i,
    };
    let tags = match field(def, "Tags") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|t| t.as_str().map(str::to_string).ok_or("Tags: expected strings"))
            .collect::<Result<_, _>>()?,
        Some(v) => return Err(format!("Tags: expected an array, got {v}")),
    };
    let port = match field(def, "Port") {
        None | Some(Value::Null) => 0,
        Some(v) => v
            .as_u64()
            .filter(|p| *p <= 65535)
            .ok_or(format!("Port: invalid {v}"))?,
    };
    let meta = match field(def, "Meta") {
        Some(Value::Object(m)) => m.clone(),
        _ => Map::new(),
    };
    let weights = match field(def, "Weights") {
        Some(Value::Object(w)) => (
            field(w, "Passing").and_then(Value::as_u64).unwrap_or(1),
            field(w, "Warning").and_then(Value::as_u64).unwrap_or(1),
        ),
        _ => (1, 1),
    };
    let default_check = format!("Service '{name}' check");
    let mut checks = Vec::new();
    if let Some(Value::Object(c)) = field(def, "Check") {
        let cid = match str_field(c, "CheckID")? {
            i if i.is_empty() => format!("service:{id}"),
            i => i,
        };
        checks.push(parse_check(opts, c, cid, &default_check, index)?);
    }
    if let Some(Value::Array(list)) = field(def, "Checks") {
        for (n, c) in list.iter().enumerate() {
            let c = c.as_object().ok_or("Checks: expected objects")?;
            let cid = match str_field(c, "CheckID")? {
                i if i.is_empty() => format!("service:{id}:{}", n + 1),
                i => i,
            };
            checks.push(parse_check(opts, c, cid, &default_check, index)?);
        }
    }
    Ok(Service {
        id,
        name,
        tags,
        address: str_field(def, "Address")?,
        port,
        meta,
        weights,
        checks,
        create_index: index,
        modify_index: index,
    })
}

// ----------------------------------------------------------------------------------
// Running checks

fn check_loop(sh: &Arc<Shared>) {
    while !sh.stop.load(Ordering::SeqCst) {
        let now = Instant::now();
        let mut due = Vec::new();
        {
            let mut st = sh.state.lock().unwrap();
            let mut expired = Vec::new();
            for s in st.services.values_mut() {
                for c in &mut s.checks {
                    match &c.kind {
                        Kind::Ttl(_) if c.ttl_end.is_some_and(|e| now >= e) && c.status != "critical" => {
                            expired.push((s.id.clone(), c.id.clone()));
                        }
                        Kind::Ttl(_) | Kind::Maint => {}
                        kind if !c.running && now >= c.next_run => {
                            c.running = true;
                            c.next_run = now + c.interval;
                            due.push((s.id.clone(), c.id.clone(), kind.clone(), c.timeout));
                        }
                        _ => {}
                    }
                }
            }
            for (sid, cid) in expired {
                set_status(sh, &mut st, &sid, &cid, "critical", "TTL expired");
            }
        }
        for (sid, cid, kind, timeout) in due {
            let sh = sh.clone();
            std::thread::spawn(move || {
                let (status, output) = match kind {
                    Kind::Script(args) => run_script(&args, timeout),
                    Kind::Http(url) => run_http(&url, timeout),
                    _ => unreachable!(),
                };
                let mut st = sh.state.lock().unwrap();
                set_status(&sh, &mut st, &sid, &cid, status, &output);
                if let Some(c) = st
                    .services
                    .get_mut(&sid)
                    .and_then(|s| s.checks.iter_mut().find(|c| c.id == cid))
                {
                    c.running = false;
                }
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A check's new status; a change bumps its service's index.
fn set_status(sh: &Shared, st: &mut State, sid: &str, cid: &str, status: &str, output: &str) {
    let Some(s) = st.services.get_mut(sid) else {
        return;
    };
    let Some(c) = s.checks.iter_mut().find(|c| c.id == cid) else {
        return;
    };
    c.output = output.to_string();
    if c.status == status {
        return;
    }
    c.status = status.to_string();
    let name = s.name.clone();
    let i = sh.bump(st, &name);
    let s = st.services.get_mut(sid).expect("found above");
    s.checks
        .iter_mut()
        .find(|c| c.id == cid)
        .expect("found above")
        .modify_index = i;
}

fn run_script(args: &[String], timeout: Duration) -> (&'static str, String) {
    let child = Command::new(&args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return ("critical", format!("cannot run {:?}: {e}", args[0])),
    };
    let end = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(st)) => {
                return match st.code() {
                    Some(0) => ("passing", "exit 0".into()),
                    Some(1) => ("warning", "exit 1".into()),
                    c => ("critical", format!("exit {c:?}")),
                }
            }
            Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return ("critical", format!("Timed out ({timeout:?}) running check"));
            }
        }
    }
}

fn run_http(url: &str, timeout: Duration) -> (&'static str, String) {
    let Some(rest) = url.strip_prefix("http://") else {
        return ("critical", format!("stand-in: only http:// checks: {url}"));
    };
    let (hostport, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")));
    let attempt = || -> std::io::Result<u16> {
        let addr = std::net::ToSocketAddrs::to_socket_addrs(hostport)?
            .next()
            .ok_or_else(|| std::io::Error::other("no address"))?;
        let mut s = TcpStream::connect_timeout(&addr, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: {hostport}\r\nUser-Agent: Consul Health Check\r\nConnection: close\r\n\r\n")?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line)?;
        line.split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))
    };
    match attempt() {
        Ok(code) if (200..300).contains(&code) => ("passing", format!("HTTP GET {url}: {code}")),
        Ok(429) => ("warning", format!("HTTP GET {url}: 429 Too Many Requests")),
        Ok(code) => ("critical", format!("HTTP GET {url}: {code}")),
        Err(e) => ("critical", format!("Get {url}: {e}")),
    }
}

// ----------------------------------------------------------------------------------
// The HTTP server

fn accept_loop(listener: &TcpListener, sh: &Arc<Shared>) {
    let mut conns: Vec<JoinHandle<()>> = Vec::new();
    while !sh.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((s, _)) => {
                let sh = sh.clone();
                conns.push(std::thread::spawn(move || {
                    let _ = serve(s, &sh);
                }));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
        conns.retain(|c| !c.is_finished());
    }
    for c in conns {
        let _ = c.join();
    }
}

struct Request {
    method: String,
    path: String,
    query: Vec<(String, String)>,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz");
                match u8::from_str_radix(hex, 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn read_request(s: &mut TcpStream) -> std::io::Result<Option<Request>> {
    let mut r = BufReader::new(s.try_clone()?);
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let target = parts.next().unwrap_or_default().to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 {
            return Ok(None);
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let len = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = vec![0; len.min(1 << 20)];
    r.read_exact(&mut body)?;
    let (path, qs) = target.split_once('?').unwrap_or((&target, ""));
    let query = qs
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (unescape(k), unescape(v))
        })
        .collect();
    Ok(Some(Request {
        method,
        path: unescape(path),
        query,
        headers,
        body,
    }))
}

fn respond(s: &mut TcpStream, status: u16, headers: &[(&str, String)], body: &str) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Internal Server Error",
    };
    let mut out = format!("HTTP/1.1 {status} {reason}\r\nConnection: close\r\n");
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    if body.len() > 2048 {
        // Go's HTTP server sends a body it did not buffer whole in chunks.
        out.push_str("Transfer-Encoding: chunked\r\n\r\n");
        for chunk in body.as_bytes().chunks(1500) {
            out.push_str(&format!("{:x}\r\n", chunk.len()));
            out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
            out.push_str("\r\n");
        }
        out.push_str("0\r\n\r\n");
    } else {
        out.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    }
    s.write_all(out.as_bytes())
}

fn serve(mut s: TcpStream, sh: &Arc<Shared>) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let Some(req) = read_request(&mut s)? else {
        return Ok(());
    };
    let token = req
        .header("X-Consul-Token")
        .map(str::to_string)
        .or_else(|| {
            req.header("Authorization")
                .and_then(|a| a.strip_prefix("Bearer "))
                .map(str::to_string)
        })
        .or_else(|| req.param("token").map(str::to_string));
    if let Some(want) = &sh.opts.token {
        if token.as_deref() != Some(want.as_str()) {
            return respond(&mut s, 403, &[], "ACL not found");
        }
    }
    let (status, headers, body) = route(sh, &req, token);
    if sh.stop.load(Ordering::SeqCst) {
        // Stopped while the query was held: the connection closes with no answer.
        return Ok(());
    }
    respond(&mut s, status, &headers, &body)
}

type Answer = (u16, Vec<(&'static str, String)>, String);

fn route(sh: &Shared, req: &Request, token: Option<String>) -> Answer {
    let plain = |status: u16, body: &str| {
        (
            status,
            vec![("Content-Type", "text/plain".to_string())],
            body.to_string(),
        )
    };
    let p = req.path.as_str();
    if let Some(name) = p.strip_prefix("/v1/health/service/") {
        if req.method != "GET" {
            return plain(405, "method not allowed");
        }
        return health_service(sh, req, name, token);
    }
    if req.method != "PUT" {
        return plain(
            405,
            "method not allowed (the stand-in's agent endpoints take PUT)",
        );
    }
    let mut st = sh.state.lock().unwrap();
    if p == "/v1/agent/service/register" {
        let next = st.index + 1;
        return match parse_service(&sh.opts, &req.body, next) {
            Ok(svc) => {
                let name = svc.name.clone();
                if let Some(old) = st.services.get(&svc.id) {
                    let old_name = old.name.clone();
                    if old_name != name {
                        sh.bump(&mut st, &old_name);
                    }
                }
                st.services.insert(svc.id.clone(), svc);
                sh.bump(&mut st, &name);
                plain(200, "")
            }
            Err(e) => plain(400, &e),
        };
    }
    if let Some(id) = p.strip_prefix("/v1/agent/service/deregister/") {
        return match st.services.remove(id) {
            Some(svc) => {
                sh.bump(&mut st, &svc.name);
                plain(200, "")
            }
            None => plain(404, &format!("Unknown service ID {id:?}")),
        };
    }
    if let Some(id) = p.strip_prefix("/v1/agent/service/maintenance/") {
        let on = match req.param("enable") {
            Some("true") => true,
            Some("false") => false,
            _ => return plain(400, "Missing value for enable"),
        };
        let next = st.index + 1;
        let Some(svc) = st.services.get_mut(id) else {
            return plain(404, &format!("Unknown service ID {id:?}"));
        };
        let cid = format!("_service_maintenance:{id}");
        svc.checks.retain(|c| c.id != cid);
        if on {
            let now = Instant::now();
            svc.checks.push(Check {
                id: cid,
                name: "Service Maintenance Mode".into(),
                kind: Kind::Maint,
                interval: Duration::from_secs(1),
                timeout: Duration::from_secs(1),
                status: "critical".into(),
                output: req.param("reason").unwrap_or_default().to_string(),
                next_run: now,
                running: false,
                ttl_end: None,
                create_index: next,
                modify_index: next,
            });
        }
        let name = svc.name.clone();
        sh.bump(&mut st, &name);
        return plain(200, "");
    }
    for (verb, status) in [("pass", "passing"), ("warn", "warning"), ("fail", "critical")] {
        if let Some(cid) = p.strip_prefix(&format!("/v1/agent/check/{verb}/")) {
            let found = st.services.values_mut().find_map(|s| {
                let id = s.id.clone();
                s.checks.iter_mut().find(|c| c.id == cid).map(|c| (id, c))
            });
            let Some((sid, c)) = found else {
                return plain(404, &format!("Unknown check ID {cid:?}"));
            };
            let Kind::Ttl(ttl) = c.kind else {
                return plain(500, &format!("CheckID {cid:?} does not have associated TTL"));
            };
            c.ttl_end = Some(Instant::now() + ttl);
            let note = req.param("note").unwrap_or_default().to_string();
            set_status(sh, &mut st, &sid, cid, status, &note);
            return plain(200, "");
        }
    }
    plain(
        404,
        "not found (the stand-in implements only part of Consul's API)",
    )
}

fn health_service(sh: &Shared, req: &Request, name: &str, token: Option<String>) -> Answer {
    let plain = |status: u16, body: &str| {
        (
            status,
            vec![("Content-Type", "text/plain".to_string())],
            body.to_string(),
        )
    };
    if req.param("filter").is_some() {
        return plain(400, "stand-in: the filter parameter is not implemented");
    }
    if let Some(dc) = req.param("dc") {
        if dc != sh.opts.datacenter {
            return plain(500, "No path to datacenter");
        }
    }
    let passing = req.param("passing").is_some_and(|v| v != "false" && v != "0");
    let tags: Vec<&str> = req
        .query
        .iter()
        .filter(|(k, _)| k == "tag")
        .map(|(_, v)| v.as_str())
        .collect();
    let wait = req
        .param("wait")
        .and_then(parse_duration)
        .unwrap_or(Duration::from_secs(300))
        .min(Duration::from_secs(600));
    let index: u64 = match req.param("index").map(str::parse) {
        None => 0,
        Some(Ok(i)) => i,
        Some(Err(_)) => return plain(400, "Invalid index"),
    };
    let mut st = sh.state.lock().unwrap();
    st.health_queries += 1;
    st.last_query = match req.query.is_empty() {
        true => req.path.clone(),
        false => format!(
            "{}?{}",
            req.path,
            req.query
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join("&")
        ),
    };
    st.last_token = token;
    let q = st.last_query.clone();
    if st.queries.len() == 1000 {
        st.queries.pop_front();
    }
    st.queries.push_back(q);
    let current = |st: &State| *st.by_name.get(name).unwrap_or(&st.index);
    if index > 0 {
        // Jitter of up to wait/16, from the clock's nanoseconds.
        let nanos = u64::from(Instant::now().elapsed().subsec_nanos())
            ^ u64::from(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .subsec_nanos(),
            );
        let jitter = wait / 16 * (nanos % 1000) as u32 / 1000;
        let end = Instant::now() + wait + jitter;
        while current(&st) <= index && !sh.stop.load(Ordering::SeqCst) {
            let now = Instant::now();
            if now >= end {
                break;
            }
            st = sh.changed.wait_timeout(st, end - now).unwrap().0;
        }
    }
    let serf = json!({
        "Node": sh.opts.node, "CheckID": "serfHealth", "Name": "Serf Health Status",
        "Status": "passing", "Notes": "", "Output": "Agent alive and reachable",
        "ServiceID": "", "ServiceName": "", "ServiceTags": [], "Type": "",
        "CreateIndex": 1, "ModifyIndex": 1
    });
    let mut out = Vec::new();
    for s in st.services.values().filter(|s| s.name == name) {
        if !tags.iter().all(|t| s.tags.iter().any(|have| have == t)) {
            continue;
        }
        if passing && s.checks.iter().any(|c| c.status != "passing") {
            continue;
        }
        let mut checks = vec![serf.clone()];
        checks.extend(s.checks.iter().map(|c| {
            json!({
                "Node": sh.opts.node, "CheckID": c.id, "Name": c.name, "Status": c.status,
                "Notes": "", "Output": c.output, "ServiceID": s.id, "ServiceName": s.name,
                "ServiceTags": s.tags,
                "Type": match c.kind { Kind::Script(_) => "script", Kind::Http(_) => "http", Kind::Ttl(_) => "ttl", Kind::Maint => "" },
                "CreateIndex": c.create_index, "ModifyIndex": c.modify_index
            })
        }));
        out.push(json!({
            "Node": {
                "ID": "40e4a748-2192-161a-0510-9bf59fe950b5",
                "Node": sh.opts.node,
                "Address": sh.opts.node_address,
                "Datacenter": sh.opts.datacenter,
                "TaggedAddresses": {"lan": sh.opts.node_address, "wan": sh.opts.node_address},
                "Meta": {"consul-network-segment": ""},
                "CreateIndex": 1, "ModifyIndex": 1
            },
            "Service": {
                "ID": s.id, "Service": s.name, "Tags": s.tags, "Address": s.address,
                "Meta": s.meta, "Port": s.port,
                "Weights": {"Passing": s.weights.0, "Warning": s.weights.1},
                "EnableTagOverride": false,
                "CreateIndex": s.create_index, "ModifyIndex": s.modify_index
            },
            "Checks": checks
        }));
    }
    let headers = vec![
        ("Content-Type", "application/json".to_string()),
        ("Vary", "Accept-Encoding".to_string()),
        ("X-Consul-Index", current(&st).to_string()),
        ("X-Consul-Knownleader", "true".to_string()),
        ("X-Consul-Lastcontact", "0".to_string()),
    ];
    (200, headers, Value::Array(out).to_string())
}
