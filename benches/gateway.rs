//! End-to-end gateway benchmark: rsbalancer inside nginx against nginx's own upstream
//! and the seed article's pure-Lua balancer, on 127.0.0.1.
//!
//! ```text
//! scripts/bench-gateway.sh                 (what `make bench` runs after the micro benches)
//! cargo bench --no-default-features --bench gateway [-- --quick] [overhead] [storm] [defaults] [quota] [metrics] [overload] [openloop]
//! ```
//!
//! It starts and stops its own nginx instances (`worker_processes 2` each): one for the
//! upstream nodes, one per gateway contender, on free ports, in a temp directory that
//! holds a snapshot of the library and the Lua files (so a `make build` running at the
//! same time changes nothing here). Every nginx is stopped at the end, on a panic, and
//! on SIGINT / SIGTERM / SIGHUP (the load loops stop, destructors run); should this
//! process die outright, each nginx master gets SIGTERM from the kernel
//! (PR_SET_PDEATHSIG). Configs are templates in `benches/nginx/`.
//!
//! Scenarios (contenders of a scenario run back to back, in rotating order per round):
//!
//! 1. `overhead`: three static nginx servers answering a small 200, weights 30/50/20,
//!    upstream keepalive. Requests/s and latency through nginx's native `upstream`,
//!    rsbalancer (`p2c_ewma`, `weighted_random`; balance + log) and the seed's Lua
//!    weighted random in balancer_by_lua. Load: `wrk` (one thread, keep-alive; C and
//!    epoll, so the load generator takes as little of the 2 CPUs as possible away from
//!    nginx), or this file's own client when wrk is missing. The gateway's workers are
//!    pinned to CPU 0, nodes and wrk to CPU 1 (`RSB_BENCH_PIN=0`: no pinning), so the
//!    gateway is what limits req/s. Besides req/s, the CPU time the gateway's workers
//!    spent per request (/proc utime + stime), which depends less on what else runs.
//! 2. `storm`: mock LLM nodes (nginx-conf/demo/lua/mock_llm.lua) with concurrency caps
//!    8 / 16 / 8, node c 5x slower (250 ms vs 50 ms), 429 without Retry-After when over
//!    the cap. Closed loop of round(0.8 x sum of caps) = 26 clients POSTing
//!    /v1/chat/completions. Contenders, weights = caps: native (nginx's default
//!    max_fails=1 fail_timeout=10s), native with max_fails=0 (what nginx does when 429s
//!    do not disable servers), the seed with set_more_tries(3), rsbalancer p2c_ewma
//!    with admit + balance + log (pool defaults otherwise).
//!    `defaults` (printed as 2b): issue 11's storm, as a new user runs it: caps 20 /
//!    40 / 10, node c 250 ms against 40 ms, 56 clients (0.8 x the 70 slots: a slow
//!    node's slot counts as one, as in `storm`), weights = caps. rsbalancer runs its
//!    pool defaults (nothing under `limit`), once more without weights (all 1), and
//!    once with `limit.slow_factor` 0 (slow nodes not set apart).
//! 3. `quota`: the same but node a has no concurrency cap and is quota-style instead: a
//!    token bucket of 60 req/s (burst 20), 429 with Retry-After when empty. Its weight
//!    stays 8 (its nominal size); clients = 0.8 x effective capacity (60/s x 50 ms + 16
//!    + 8) = 22.
//!
//! 4. `metrics`: the overhead scenario's rsbalancer `p2c_ewma` gateway measured with
//!    and without a `GET /metrics` every second (a thread on the load generator's CPU,
//!    one request per second on a fresh connection, like `curl`), in alternating order
//!    over the same rounds. Prints both req/s, their ratio (target: scraping costs at
//!    most 1%) and the scrapes' size and time.
//!
//! 5. `overload`: offered load over capacity with priority classes. Mock nodes with caps
//!    8 / 16 / 8, all 100 ms (32 slots = 320 req/s); 48 closed-loop clients (1.5x),
//!    a third each sending `X-Priority` 9, 5 and 2, no pause after a refusal (the retry
//!    storm). Contenders: native (default and max_fails=0), the seed, rsbalancer with
//!    the admission queue (classes 1-3 / 4-7 / 8-10 waiting up to 1 / 5 / 30 s) at the
//!    default `limit.increase_every` 4 and at 100. Goodput (2xx/s as a share of 320),
//!    429 share per class, end-to-end p50/p99 per class, and the time each request
//!    spent in the gateway outside any node (`$request_time` minus the
//!    `$upstream_response_time`s: the queue wait), p50/p99 per class.
//!
//! 6. `openloop`: the `overload` nodes (320 req/s) under an open loop: Poisson arrivals
//!    at a fixed rate (`RSB_BENCH_OPEN_X` x capacity, default 1.5), 20% `X-Priority` 9,
//!    30% 5, 50% 2, whatever the gateway answers and however late. The generator (see
//!    `open_loop`) sends each request at its scheduled time on an idle keep-alive
//!    connection (a new thread and connection when none is idle), measures latency from
//!    the scheduled time (no coordinated omission) and reports how late it sent.
//!    Contenders: native, the seed, rsbalancer with the `overload` admission queue. Per
//!    class: success, 5xx, 429 share, goodput, end-to-end and queue-wait p50/p99, next
//!    to the targets; a breakdown of non-2xx answers by status and source
//!    (`X-RSB-Admission` reason, a node's own answer, nginx) and the error-log lines.
//!
//! Load generator for 2, 3 and 5: std threads, one keep-alive HTTP/1.1 `TcpStream` each,
//! closed loop, every request's status and latency recorded. Each request carries an
//! `X-Bench-Id` (run, phase, client, sequence) that the gateway forwards on every try;
//! the mock nodes log it for each request they receive, so upstream attempts per
//! client request are counted exactly at the nodes (429s included), and cross-checked
//! against the gateway's `$upstream_status` list. A warm-up phase is reported apart.
//!
//! Nothing is asserted about speed: the bench prints tables. It panics (fails loudly)
//! when nginx, its Lua module, wrk's output or the library is missing, or when a
//! contender does not start or does not answer its first request.
//!
//! Environment: `RSB_BENCH_QUICK=1` (or `--quick`) for a short smoke run;
//! `RSB_BENCH_ROUNDS` (storm, quota), `RSB_BENCH_OVERHEAD_ROUNDS`, `RSB_BENCH_OVERHEAD_S`,
//! `RSB_BENCH_STORM_S`, `RSB_BENCH_WARM_S`;
//! `RSB_BENCH_NATIVE_NOFAIL=0` drops the extra "native, max_fails=0" contender;
//! `RSB_BENCH_FAIL_PAUSE_MS=n` makes storm/quota clients pause n ms after a non-2xx;
//! `RSB_BENCH_PIN=0` does not pin the overhead scenario's processes to CPUs;
//! `RSB_BENCH_OPEN_S` (openloop: measured seconds), `RSB_BENCH_OPEN_X` (its offered load
//! as a multiple of capacity, 1.5), `RSB_BENCH_OPEN_TIMEOUT_S` (longest wait for one
//! answer, 15), `RSB_BENCH_OPEN_CONNS` (most connections, 2048), `RSB_BENCH_OPEN_NICE`
//! (nice value of the generator threads, -10, when allowed);
//! `RSB_BENCH_KEEP=1` keeps the run directory (configs, logs); `NGINX`, `NGINX_MODULES`,
//! `RSB_LUA_SO`, `WRK` locate the tools.

// Until Cargo.toml declares this bench with `harness = false`, cargo builds it as a
// libtest bench (cfg(test)), where `main` is never called: keep that build warning-free.
#![cfg_attr(test, allow(dead_code, unused_imports))]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

#[path = "../tests/support/proc.rs"]
mod proc;
use proc::*;

// ------------------------------------------------------------------------------------
// Stop flag: signals, watchdog

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_sig: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn stopping() -> bool {
    STOP.load(Ordering::Relaxed)
}

/// Panics (which stops every nginx through the destructors) once a stop was asked.
fn check_stop() {
    if stopping() {
        panic!("gateway bench: interrupted (signal or watchdog); stopping every nginx");
    }
}

fn install_signal_handlers() {
    // SAFETY: the handler only stores to an atomic (async-signal-safe); prctl has no
    // memory arguments.
    unsafe {
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::signal(sig, on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t);
        }
        // cargo (our parent) killed: we get SIGTERM and clean up.
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong);
    }
}

// ------------------------------------------------------------------------------------
// Options and environment

struct Opts {
    quick: bool,
    overhead: bool,
    storm: bool,
    defaults: bool,
    quota: bool,
    metrics: bool,
    overload: bool,
    openloop: bool,
    rounds_overhead: usize,
    rounds_storm: usize,
    overhead_s: u64,
    warm_s: f64,
    storm_s: f64,
    native_nofail: bool,
    fail_pause_ms: u64,
    pin: bool,
    keep: bool,
}

fn env_num(name: &str, default: f64) -> f64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

fn env_flag(name: &str, default: bool) -> bool {
    match std::env::var(name) {
        Ok(v) => !(v.is_empty() || v == "0" || v == "false" || v == "no"),
        Err(_) => default,
    }
}

impl Opts {
    fn parse() -> Opts {
        let mut quick = env_flag("RSB_BENCH_QUICK", false);
        let mut picked = Vec::new();
        for a in std::env::args().skip(1) {
            match a.as_str() {
                "--bench" => {} // cargo bench passes it to harness = false targets
                "--quick" => quick = true,
                "overhead" | "storm" | "defaults" | "quota" | "metrics" | "overload" | "openloop" => {
                    picked.push(a)
                }
                other if other.starts_with('-') => {} // other libtest-style flags
                other => {
                    panic!("unknown argument {other:?} (scenarios: overhead storm defaults quota metrics overload openloop)")
                }
            }
        }
        let all = picked.is_empty();
        let has = |s: &str| all || picked.iter().any(|p| p == s);
        Opts {
            quick,
            overhead: has("overhead"),
            storm: has("storm"),
            defaults: has("defaults"),
            quota: has("quota"),
            metrics: has("metrics"),
            overload: has("overload"),
            openloop: has("openloop"),
            rounds_overhead: env_num("RSB_BENCH_OVERHEAD_ROUNDS", if quick { 1.0 } else { 5.0 }) as usize,
            rounds_storm: env_num("RSB_BENCH_ROUNDS", if quick { 1.0 } else { 3.0 }) as usize,
            overhead_s: env_num("RSB_BENCH_OVERHEAD_S", if quick { 2.0 } else { 3.0 }) as u64,
            warm_s: env_num("RSB_BENCH_WARM_S", if quick { 1.0 } else { 2.0 }),
            storm_s: env_num("RSB_BENCH_STORM_S", if quick { 3.0 } else { 7.0 }),
            native_nofail: env_flag("RSB_BENCH_NATIVE_NOFAIL", true),
            fail_pause_ms: env_num("RSB_BENCH_FAIL_PAUSE_MS", 0.0) as u64,
            pin: env_flag("RSB_BENCH_PIN", true),
            keep: env_flag("RSB_BENCH_KEEP", false),
        }
    }
}

struct Env {
    repo: PathBuf,
    nginx: PathBuf,
    modules: PathBuf,
    lua_so: PathBuf,
    wrk: Option<PathBuf>,
    user_line: &'static str,
}

fn find_in_path(name: &str, extra: &[&str]) -> Option<PathBuf> {
    let mut c: Vec<PathBuf> = extra.iter().map(PathBuf::from).collect();
    if let Some(path) = std::env::var_os("PATH") {
        c.extend(std::env::split_paths(&path).map(|d| d.join(name)));
    }
    c.into_iter().find(|p| p.is_file())
}

impl Env {
    fn locate() -> Env {
        // RSB_REPO: the checkout to take templates, Lua files and the library from
        // (default: the one this bench was built from).
        let repo = std::env::var_os("RSB_REPO")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
        let nginx = match std::env::var_os("NGINX") {
            Some(p) => PathBuf::from(p),
            None => find_in_path("nginx", &["/usr/sbin/nginx"]).unwrap_or_else(|| {
                panic!(
                    "gateway bench: nginx not found ($NGINX, /usr/sbin/nginx, PATH). Install it \
                     with `make deps` (Debian 12: nginx-core libnginx-mod-http-lua \
                     lua-resty-core luajit2)."
                )
            }),
        };
        assert!(
            nginx.is_file(),
            "gateway bench: nginx {} is not a file",
            nginx.display()
        );
        let modules = std::env::var_os("NGINX_MODULES")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/usr/lib/nginx/modules"));
        for m in ["ndk_http_module.so", "ngx_http_lua_module.so"] {
            assert!(
                modules.join(m).is_file(),
                "gateway bench: {} missing (Debian: libnginx-mod-http-lua; or set NGINX_MODULES)",
                modules.join(m).display()
            );
        }
        let lua_so = std::env::var_os("RSB_LUA_SO")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo.join("build/lib/rsbalancer.so"));
        assert!(
            lua_so.is_file(),
            "gateway bench: the Lua module {} is missing: run `make build` first",
            lua_so.display()
        );
        let wrk = match std::env::var_os("WRK") {
            Some(p) => Some(PathBuf::from(p)),
            None => find_in_path("wrk", &[]),
        };
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        Env {
            repo,
            nginx,
            modules,
            lua_so,
            wrk,
            // Started as root, nginx would run its workers as nobody.
            user_line: if root { "user root;" } else { "" },
        }
    }

    fn template(&self, name: &str) -> String {
        let p = self.repo.join("benches/nginx").join(name);
        fs::read_to_string(&p).unwrap_or_else(|e| panic!("read template {}: {e}", p.display()))
    }

    fn nginx_version(&self) -> String {
        Command::new(&self.nginx)
            .arg("-v")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_string())
            .unwrap_or_else(|e| format!("? ({e})"))
    }
}

// ------------------------------------------------------------------------------------
// Run directory

struct RunDir {
    path: PathBuf,
    keep: bool,
}

fn set_mode(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let _ = fs::set_permissions(p, fs::Permissions::from_mode(mode));
}

fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap_or_else(|e| panic!("mkdir {}: {e}", to.display()));
    set_mode(to, 0o755);
    for e in fs::read_dir(from).unwrap_or_else(|e| panic!("read {}: {e}", from.display())) {
        let e = e.expect("dir entry");
        let p = e.path();
        let dst = to.join(e.file_name());
        if p.is_dir() {
            copy_tree(&p, &dst);
        } else {
            fs::copy(&p, &dst).unwrap_or_else(|e| panic!("copy {}: {e}", p.display()));
            set_mode(&dst, 0o644);
        }
    }
}

impl RunDir {
    fn new(env: &Env, keep: bool) -> RunDir {
        let path = std::env::temp_dir().join(format!("rsb-gwbench-{}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(path.join("tmp")).expect("create run dir");
        set_mode(&path, 0o755);
        set_mode(&path.join("tmp"), 0o755);
        // Snapshot of everything nginx loads, so a concurrent `make build` or edit does
        // not change (or crash) a running contender.
        let lua = path.join("lua");
        copy_tree(&env.repo.join("lua"), &lua);
        for (src, name) in [
            (env.repo.join("nginx-conf/demo/lua/mock_llm.lua"), "mock_llm.lua"),
            (
                env.repo.join("benches/nginx/seed_balancer.lua"),
                "seed_balancer.lua",
            ),
        ] {
            fs::copy(&src, lua.join(name)).unwrap_or_else(|e| panic!("copy {}: {e}", src.display()));
            set_mode(&lua.join(name), 0o644);
        }
        let lib = path.join("lib");
        fs::create_dir_all(&lib).expect("mkdir lib");
        set_mode(&lib, 0o755);
        fs::copy(&env.lua_so, lib.join("rsbalancer.so")).expect("copy rsbalancer.so");
        set_mode(&lib.join("rsbalancer.so"), 0o755);
        RunDir { path, keep }
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path.join(name);
        fs::write(&p, text).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        set_mode(&p, 0o644);
        p
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if thread::panicking() || self.keep {
            eprintln!("gateway bench: configs and logs kept in {}", self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

// ------------------------------------------------------------------------------------
// nginx processes

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: i32) -> f64 {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let Some((_, rest)) = stat.rsplit_once(") ") else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 / hz
}

/// One nginx (master + 2 workers) started by the bench; stopped on drop.
struct Nginx {
    name: String,
    child: Option<Child>,
    error_log: PathBuf,
    stderr: PathBuf,
}

impl Nginx {
    /// Writes `conf` as `<name>.conf`, starts it in the foreground, waits for every
    /// port and for 2 workers. Panics (with the error log) if it does not start.
    fn start(env: &Env, run: &RunDir, name: &str, conf: &str, ports: &[u16]) -> Nginx {
        check_stop();
        let conf_path = run.write(&format!("{name}.conf"), conf);
        let stderr = run.path.join(format!("{name}.stderr"));
        let mut cmd = Command::new(&env.nginx);
        cmd.arg("-p")
            .arg(&run.path)
            .arg("-c")
            .arg(&conf_path)
            .arg("-e")
            .arg(run.path.join(format!("{name}-error.log")))
            .arg("-g")
            .arg("daemon off; master_process on;")
            // nginx reads $NGINX as a list of inherited listening sockets (binary
            // upgrade); scripts/bench-gateway.sh exports NGINX as the binary's path.
            .env_remove("NGINX")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&stderr).expect("create stderr file"));
        // SAFETY: prctl/getppid are async-signal-safe; nothing else runs in the child.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::getppid() == 1 {
                    return Err(io::Error::other("parent already exited"));
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("gateway bench: cannot spawn {}: {e}", env.nginx.display()));
        let mut n = Nginx {
            name: name.to_string(),
            child: Some(child),
            error_log: run.path.join(format!("{name}-error.log")),
            stderr,
        };
        let start = Instant::now();
        let mut pending: Vec<u16> = ports.to_vec();
        loop {
            pending.retain(|&p| !port_open(p));
            let workers = children(n.pid())
                .iter()
                .filter(|(_, c)| c.starts_with("nginx: worker process"))
                .count();
            if pending.is_empty() && workers >= 2 {
                break;
            }
            if let Some(status) = n.child.as_mut().unwrap().try_wait().expect("try_wait") {
                n.child = None;
                panic!(
                    "gateway bench: {name} nginx exited ({status}) before listening on {pending:?}\n{}",
                    n.diagnostics()
                );
            }
            if start.elapsed() > Duration::from_secs(15) || stopping() {
                let d = n.diagnostics();
                n.stop();
                panic!("gateway bench: {name} nginx not ready after 15 s (ports {pending:?})\n{d}");
            }
            thread::sleep(Duration::from_millis(20));
        }
        n
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    /// CPU seconds used so far by the workers (the master does no request work).
    fn workers_cpu(&self) -> f64 {
        children(self.pid()).iter().map(|(p, _)| cpu_seconds(*p)).sum()
    }

    fn diagnostics(&self) -> String {
        let stderr = fs::read_to_string(&self.stderr).unwrap_or_default();
        let log = fs::read_to_string(&self.error_log).unwrap_or_default();
        let tail: Vec<&str> = log
            .lines()
            .rev()
            .take(25)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        format!(
            "--- {} stderr:\n{stderr}--- {} error log tail ({}):\n{}",
            self.name,
            self.name,
            self.error_log.display(),
            tail.join("\n")
        )
    }

    /// Error-log lines at level [error] or worse (for the notes under a table).
    fn error_lines(&self) -> Vec<String> {
        fs::read_to_string(&self.error_log)
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                l.contains("[error]")
                    || l.contains("[crit]")
                    || l.contains("[alert]")
                    || l.contains("[emerg]")
            })
            .map(str::to_string)
            .collect()
    }

    /// SIGTERM (fast shutdown), SIGKILL after 5 s, then SIGKILL any worker left.
    fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            stop_nginx(child, &self.name);
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if thread::panicking() && self.child.is_some() {
            eprintln!("{}", self.diagnostics());
        }
        self.stop();
    }
}

// ------------------------------------------------------------------------------------
// HTTP/1.1 keep-alive client

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    close: bool,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

struct Conn {
    r: BufReader<TcpStream>,
    w: TcpStream,
    line: String,
}

impl Conn {
    fn open(port: u16, timeout: Duration) -> io::Result<Conn> {
        let s = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(2))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        Ok(Conn {
            w: s.try_clone()?,
            r: BufReader::with_capacity(16 * 1024, s),
            line: String::new(),
        })
    }

    fn read_line(&mut self) -> io::Result<&str> {
        self.line.clear();
        let n = self.r.read_line(&mut self.line)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed"));
        }
        Ok(self.line.trim_end_matches(['\r', '\n']))
    }

    /// Sends `req` (a complete request) and reads one response.
    fn round_trip(&mut self, req: &[u8], keep_headers: bool) -> io::Result<Response> {
        self.w.write_all(req)?;
        let status_line = self.read_line()?.to_string();
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad status line {status_line:?}"),
                )
            })?;
        let mut headers = Vec::new();
        let (mut len, mut chunked, mut close) = (None, false, false);
        loop {
            let l = self.read_line()?;
            if l.is_empty() {
                break;
            }
            let Some((k, v)) = l.split_once(':') else { continue };
            let (k, v) = (k.trim(), v.trim());
            if k.eq_ignore_ascii_case("content-length") {
                len = v.parse::<usize>().ok();
            } else if k.eq_ignore_ascii_case("transfer-encoding") {
                chunked = v.eq_ignore_ascii_case("chunked");
            } else if k.eq_ignore_ascii_case("connection") {
                close = v.eq_ignore_ascii_case("close");
            }
            if keep_headers {
                headers.push((k.to_string(), v.to_string()));
            }
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                let size_line = self.read_line()?.to_string();
                let size = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
                    .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
                if size == 0 {
                    while !self.read_line()?.is_empty() {}
                    break;
                }
                let start = body.len();
                body.resize(start + size, 0);
                self.r.read_exact(&mut body[start..])?;
                self.read_line()?;
            }
        } else if let Some(n) = len {
            body.resize(n, 0);
            self.r.read_exact(&mut body)?;
        } else if status >= 200 && status != 204 && status != 304 {
            self.r.read_to_end(&mut body)?;
            close = true;
        }
        Ok(Response {
            status,
            headers,
            body,
            close,
        })
    }
}

fn request_bytes(method: &str, path: &str, port: u16, id: &str, body: &str) -> Vec<u8> {
    let mut s = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: rsb-gwbench\r\n");
    if !id.is_empty() {
        let _ = write!(s, "X-Bench-Id: {id}\r\n");
    }
    if !body.is_empty() || method == "POST" {
        let _ = write!(
            s,
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        );
    }
    s.push_str("\r\n");
    s.push_str(body);
    s.into_bytes()
}

/// One request on a fresh connection (smoke tests, status reads).
fn one_request(port: u16, method: &str, path: &str, body: &str, id: &str) -> io::Result<Response> {
    let mut c = Conn::open(port, Duration::from_secs(10))?;
    c.round_trip(&request_bytes(method, path, port, id, body), true)
}

const CHAT_BODY: &str =
    r#"{"model":"mock-llm","messages":[{"role":"user","content":"Say hello in one line."}],"max_tokens":16}"#;

// ------------------------------------------------------------------------------------
// Closed-loop load

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    Warm,
    Measure,
}

#[derive(Clone, Copy, Debug)]
struct Sample {
    phase: Phase,
    client: u16,
    seq: u32,
    /// 0: no response (connect error, reset, timeout).
    status: u16,
    latency_us: u64,
}

struct LoadSpec {
    port: u16,
    method: &'static str,
    path: &'static str,
    body: &'static str,
    clients: usize,
    warm: Duration,
    measure: Duration,
    /// Run tag in X-Bench-Id: "<tag>.<w|m>.<client>.<seq>".
    tag: String,
    /// Pin the client threads to this CPU.
    cpu: Option<usize>,
    /// Hard bound per client, whatever the duration.
    max_per_client: u32,
    /// Pause of a client after a non-2xx answer (0: none, a pure closed loop).
    fail_pause: Duration,
    /// `X-Priority` header of each client's requests (none if `None`).
    priority: Option<fn(usize) -> u32>,
}

/// N clients, each with one keep-alive connection, each sending its next request as
/// soon as the previous one is answered, until warm + measure has passed.
fn closed_loop(spec: &LoadSpec) -> Vec<Sample> {
    let barrier = Arc::new(Barrier::new(spec.clients + 1));
    let start = Arc::new(Mutex::new(Instant::now()));
    let mut handles = Vec::new();
    for client in 0..spec.clients {
        let barrier = barrier.clone();
        let start = start.clone();
        let (port, method, path, body, tag) =
            (spec.port, spec.method, spec.path, spec.body, spec.tag.clone());
        let (warm, total, max) = (spec.warm, spec.warm + spec.measure, spec.max_per_client);
        let fail_pause = spec.fail_pause;
        let cpu = spec.cpu;
        let prio_header = spec.priority.map(|p| format!("X-Priority: {}\r\n", p(client)));
        handles.push(
            thread::Builder::new()
                .name(format!("client-{client}"))
                .stack_size(256 * 1024)
                .spawn(move || {
                    if let Some(cpu) = cpu {
                        let _ = bind_to_cpu(cpu);
                    }
                    let mut out = Vec::with_capacity(4096);
                    let mut conn: Option<Conn> = None;
                    barrier.wait();
                    let t0 = *start.lock().unwrap();
                    let mut seq = 0u32;
                    while seq < max && !stopping() {
                        let t = Instant::now();
                        let since = t - t0;
                        if since >= total {
                            break;
                        }
                        let phase = if since < warm { Phase::Warm } else { Phase::Measure };
                        let id = if tag.is_empty() {
                            String::new()
                        } else {
                            format!(
                                "{tag}.{}.{client}.{seq}",
                                if phase == Phase::Warm { 'w' } else { 'm' }
                            )
                        };
                        let mut req = request_bytes(method, path, port, &id, body);
                        if let Some(h) = &prio_header {
                            // After the request line.
                            let at = req.windows(2).position(|w| w == b"\r\n").map_or(0, |i| i + 2);
                            req.splice(at..at, h.bytes());
                        }
                        if conn.is_none() {
                            match Conn::open(port, Duration::from_secs(30)) {
                                Ok(c) => conn = Some(c),
                                Err(_) => {
                                    out.push(Sample {
                                        phase,
                                        client: client as u16,
                                        seq,
                                        status: 0,
                                        latency_us: t.elapsed().as_micros() as u64,
                                    });
                                    seq += 1;
                                    thread::sleep(Duration::from_millis(5));
                                    continue;
                                }
                            }
                        }
                        let c = conn.as_mut().unwrap();
                        let (status, close) = match c.round_trip(&req, false) {
                            Ok(r) => (r.status, r.close),
                            Err(_) => (0, true),
                        };
                        out.push(Sample {
                            phase,
                            client: client as u16,
                            seq,
                            status,
                            latency_us: t.elapsed().as_micros() as u64,
                        });
                        seq += 1;
                        if close {
                            conn = None;
                        }
                        if !(200..300).contains(&status) && !fail_pause.is_zero() {
                            thread::sleep(fail_pause);
                        }
                    }
                    out
                })
                .expect("spawn client thread"),
        );
    }
    *start.lock().unwrap() = Instant::now() + Duration::from_millis(20);
    barrier.wait();
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.join().expect("client thread panicked"));
    }
    all
}

fn percentile(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64
}

fn median(v: &mut [f64]) -> f64 {
    let mut w: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    if w.is_empty() {
        return f64::NAN;
    }
    w.sort_by(|a, b| a.total_cmp(b));
    let m = w.len() / 2;
    if w.len() % 2 == 1 {
        w[m]
    } else {
        (w[m - 1] + w[m]) / 2.0
    }
}

fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter()
        .filter(|x| !x.is_nan())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        })
}

// ------------------------------------------------------------------------------------
// Scenario 1: overhead

#[derive(Clone)]
enum Kind {
    /// nginx upstream; extra text after each `server ... weight=w`.
    Native { server_extra: &'static str },
    /// The seed's Lua weighted random; more tries granted on the first try.
    Seed { more_tries: u32 },
    /// rsbalancer with this algorithm; admit in the access phase or not; slow nodes
    /// as overflow (`limit.slow_factor`, 0: off) and `limit.increase_every`, each
    /// `None` for the pool default (the key left out of the config); with
    /// `equal_weights`, the nodes' weights left out (all 1).
    Rsb {
        algorithm: &'static str,
        admit: bool,
        slow_factor: Option<f64>,
        increase_every: Option<u32>,
        equal_weights: bool,
    },
    /// rsbalancer p2c_ewma with the admission queue on (priority from X-Priority),
    /// `limit.increase_every` as given.
    RsbQueue { increase_every: u32 },
}

#[derive(Clone)]
struct Contender {
    label: &'static str,
    kind: Kind,
}

struct Node {
    name: &'static str,
    port: u16,
    weight: u32,
}

/// Renders and starts one gateway contender in front of `nodes`; returns it and its port.
fn start_gateway(
    env: &Env,
    run: &RunDir,
    inst: &str,
    c: &Contender,
    nodes: &[Node],
    access_log: bool,
    affinity: &str,
) -> (Nginx, u16) {
    let port = free_port();
    let log = if access_log {
        format!(
            "{}/{inst}-access.log {} buffer=256k flush=200ms",
            run.path.display(),
            // The over-capacity scenario logs the time spent outside nodes (queueing).
            if inst.starts_with("overload") || inst.starts_with("openloop") {
                "benchq"
            } else {
                "bench"
            }
        )
    } else {
        "off".to_string()
    };
    let luadir = run.path.join("lua").display().to_string();
    let mut vars: Vec<(&str, String)> = vec![
        ("USER", env.user_line.to_string()),
        ("MODULES", env.modules.display().to_string()),
        ("RUNTIME", run.path.display().to_string()),
        ("NAME", inst.to_string()),
        ("AFFINITY", affinity.to_string()),
        ("PORT", port.to_string()),
        ("ACCESS_LOG", log),
        ("LUADIR", luadir),
    ];
    let template = match &c.kind {
        Kind::Native { server_extra } => {
            let mut s = String::new();
            for n in nodes {
                let _ = writeln!(
                    s,
                    "        server 127.0.0.1:{} weight={}{server_extra};",
                    n.port, n.weight
                );
            }
            vars.push(("SERVERS", s));
            "gateway-native.conf"
        }
        Kind::Seed { more_tries } => {
            let items: Vec<String> = nodes
                .iter()
                .map(|n| {
                    format!(
                        "{{ name = \"{}\", host = \"127.0.0.1\", port = {}, weight = {} }}",
                        n.name, n.port, n.weight
                    )
                })
                .collect();
            vars.push(("SEED_NODES", format!("{{ {} }}", items.join(", "))));
            vars.push(("MORE_TRIES", more_tries.to_string()));
            "gateway-seed.conf"
        }
        Kind::Rsb {
            algorithm,
            admit,
            slow_factor,
            increase_every,
            equal_weights,
        } => {
            let admit = if *admit {
                "            access_by_lua_block { rsbalancer.admit(\"llm\") }"
            } else {
                ""
            };
            let mut pool = json!({ "algorithm": algorithm });
            if let Some(f) = slow_factor {
                pool["limit"]["slow_factor"] = json!(f);
            }
            if let Some(k) = increase_every {
                pool["limit"]["increase_every"] = json!(k);
            }
            let ones: Vec<Node>;
            let nodes = if *equal_weights {
                ones = nodes
                    .iter()
                    .map(|n| Node {
                        name: n.name,
                        port: n.port,
                        weight: 1,
                    })
                    .collect();
                &ones[..]
            } else {
                nodes
            };
            rsb_config(run, inst, nodes, pool, admit, &mut vars)
        }
        Kind::RsbQueue { increase_every } => rsb_config(
            run,
            inst,
            nodes,
            json!({
                "algorithm": "p2c_ewma",
                "limit": { "increase_every": increase_every },
                "admission": overload_admission(),
            }),
            "            lua_check_client_abort on;\n            access_by_lua_block { rsbalancer.admit(\"llm\", { untrusted = ngx.var.http_x_priority }) }",
            &mut vars,
        ),
    };
    let conf = render(&env.template(template), &vars);
    let n = Nginx::start(env, run, inst, &conf, &[port]);
    (n, port)
}

/// Writes the pool config of an rsbalancer contender (`pool` plus `nodes`) and sets
/// the template's CONFIG, LIBDIR and ADMIT; returns the template's name.
fn rsb_config(
    run: &RunDir,
    inst: &str,
    nodes: &[Node],
    mut pool: Value,
    admit: &str,
    vars: &mut Vec<(&str, String)>,
) -> &'static str {
    pool["nodes"] = nodes
        .iter()
        .map(|n| json!({ "id": n.name, "addr": format!("127.0.0.1:{}", n.port), "weight": n.weight }))
        .collect();
    let cfg = json!({ "pools": { "llm": pool } });
    let cfg_path = run.write(
        &format!("{inst}.json"),
        &serde_json::to_string_pretty(&cfg).unwrap(),
    );
    vars.push(("CONFIG", cfg_path.display().to_string()));
    vars.push(("LIBDIR", run.path.join("lib").display().to_string()));
    vars.push(("ADMIT", admit.to_string()));
    "gateway-rsb.conf"
}

fn start_static_nodes(
    env: &Env,
    run: &RunDir,
    inst: &str,
    names: &[(&'static str, u32)],
    affinity: &str,
) -> (Nginx, Vec<Node>) {
    let nodes: Vec<Node> = names
        .iter()
        .map(|&(name, weight)| Node {
            name,
            port: free_port(),
            weight,
        })
        .collect();
    let mut servers = String::new();
    for n in &nodes {
        let _ = write!(
            servers,
            "    server {{\n        listen 127.0.0.1:{} backlog=4096;\n        location / {{ return 200 \"ok {}\\n\"; }}\n    }}\n",
            n.port, n.name
        );
    }
    let conf = render(
        &env.template("static-nodes.conf"),
        &[
            ("USER", env.user_line.to_string()),
            ("RUNTIME", run.path.display().to_string()),
            ("NAME", inst.to_string()),
            ("AFFINITY", affinity.to_string()),
            ("SERVERS", servers),
        ],
    );
    let ports: Vec<u16> = nodes.iter().map(|n| n.port).collect();
    (Nginx::start(env, run, inst, &conf, &ports), nodes)
}

/// CPU placement of the overhead scenario: the gateway's 2 workers on CPU 0, the static
/// nodes and the load generator on CPU 1, so that the gateway is the bottleneck and
/// req/s compares gateways rather than how the kernel shared 2 CPUs among 5 processes.
struct Pin {
    gateway: &'static str,
    nodes: &'static str,
    load_cpu: Option<usize>,
}

impl Pin {
    fn choose(o: &Opts) -> Pin {
        let cpus = thread::available_parallelism().map_or(1, |n| n.get());
        if o.pin && cpus >= 2 {
            Pin {
                gateway: "worker_cpu_affinity 01 01;",
                nodes: "worker_cpu_affinity 10 10;",
                load_cpu: Some(1),
            }
        } else {
            Pin {
                gateway: "",
                nodes: "",
                load_cpu: None,
            }
        }
    }
}

/// Binds the calling thread (or, in a pre_exec hook, the child) to one CPU.
fn bind_to_cpu(cpu: usize) -> io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET and sched_setaffinity
    // only touch that local set.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

struct Throughput {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    requests: u64,
    errors: u64,
}

/// Parses "1.23ms" / "456.00us" / "1.02s" into milliseconds.
fn wrk_ms(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, mult) = if let Some(v) = s.strip_suffix("us") {
        (v, 0.001)
    } else if let Some(v) = s.strip_suffix("ms") {
        (v, 1.0)
    } else if let Some(v) = s.strip_suffix('s') {
        (v, 1000.0)
    } else if let Some(v) = s.strip_suffix('m') {
        (v, 60_000.0)
    } else {
        return None;
    };
    num.trim().parse::<f64>().ok().map(|v| v * mult)
}

fn run_wrk(wrk: &Path, port: u16, conns: usize, secs: u64, cpu: Option<usize>) -> Throughput {
    check_stop();
    let url = format!("http://127.0.0.1:{port}/");
    let mut cmd = Command::new(wrk);
    if let Some(cpu) = cpu {
        use std::os::unix::process::CommandExt;
        // SAFETY: sched_setaffinity is async-signal-safe; nothing else runs in the child.
        unsafe {
            cmd.pre_exec(move || bind_to_cpu(cpu));
        }
    }
    let mut child = cmd
        .args([
            "-t1",
            &format!("-c{conns}"),
            &format!("-d{secs}s"),
            "--latency",
            "--timeout",
            "5s",
            &url,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("gateway bench: cannot run {}: {e}", wrk.display()));
    let deadline = Instant::now() + Duration::from_secs(secs + 15);
    loop {
        if child.try_wait().expect("wait wrk").is_some() {
            break;
        }
        if Instant::now() > deadline || stopping() {
            let _ = child.kill();
            let _ = child.wait();
            check_stop();
            panic!("gateway bench: wrk did not finish within {} s", secs + 15);
        }
        thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("wrk output");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut t = Throughput {
        rps: f64::NAN,
        p50_ms: f64::NAN,
        p99_ms: f64::NAN,
        requests: 0,
        errors: 0,
    };
    for line in text.lines() {
        let l = line.trim();
        if let Some(v) = l.strip_prefix("Requests/sec:") {
            t.rps = v.trim().parse().unwrap_or(f64::NAN);
        } else if let Some(v) = l.strip_prefix("50%") {
            t.p50_ms = wrk_ms(v).unwrap_or(f64::NAN);
        } else if let Some(v) = l.strip_prefix("99%") {
            t.p99_ms = wrk_ms(v).unwrap_or(f64::NAN);
        } else if l.contains("requests in") {
            t.requests = l
                .split_whitespace()
                .next()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
        } else if let Some(v) = l.strip_prefix("Non-2xx or 3xx responses:") {
            t.errors += v.trim().parse::<u64>().unwrap_or(0);
        } else if let Some(v) = l.strip_prefix("Socket errors:") {
            t.errors += v
                .split(',')
                .filter_map(|p| p.split_whitespace().last().and_then(|n| n.parse::<u64>().ok()))
                .sum::<u64>();
        }
    }
    assert!(
        t.rps.is_finite() && t.p99_ms.is_finite(),
        "gateway bench: cannot parse wrk output (exit {}):\n{text}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    t
}

fn run_own_client(port: u16, conns: usize, secs: u64, cpu: Option<usize>) -> Throughput {
    let samples = closed_loop(&LoadSpec {
        port,
        method: "GET",
        path: "/",
        body: "",
        clients: conns,
        warm: Duration::ZERO,
        measure: Duration::from_secs(secs),
        tag: String::new(),
        cpu,
        max_per_client: 5_000_000,
        fail_pause: Duration::ZERO,
        priority: None,
    });
    let mut lat: Vec<u64> = samples.iter().map(|s| s.latency_us).collect();
    lat.sort_unstable();
    Throughput {
        rps: samples.len() as f64 / secs as f64,
        p50_ms: percentile(&lat, 0.50) / 1000.0,
        p99_ms: percentile(&lat, 0.99) / 1000.0,
        requests: samples.len() as u64,
        errors: samples.iter().filter(|s| !(200..300).contains(&s.status)).count() as u64,
    }
}

/// One measurement: throughput and latency from the load generator, plus the CPU time
/// the gateway's workers used per request (the machine may be shared: CPU per request
/// does not depend on how much CPU the gateway got, throughput does).
fn measure_load(
    env: &Env,
    gw: &Nginx,
    port: u16,
    conns: usize,
    secs: u64,
    cpu: Option<usize>,
) -> (Throughput, f64) {
    let cpu0 = gw.workers_cpu();
    let t = match &env.wrk {
        Some(w) => run_wrk(w, port, conns, secs, cpu),
        None => run_own_client(port, conns, secs, cpu),
    };
    let used = gw.workers_cpu() - cpu0;
    let us = if t.requests > 0 {
        used * 1e6 / t.requests as f64
    } else {
        f64::NAN
    };
    (t, us)
}

fn overhead(env: &Env, run: &RunDir, o: &Opts) {
    const CONNS: usize = 32;
    let weights = [("a", 30), ("b", 50), ("c", 20)];
    let contenders = [
        Contender {
            label: "native upstream (weighted rr)",
            kind: Kind::Native { server_extra: "" },
        },
        Contender {
            label: "rsbalancer p2c_ewma",
            kind: Kind::Rsb {
                algorithm: "p2c_ewma",
                admit: false,
                slow_factor: None,
                increase_every: None,
                equal_weights: false,
            },
        },
        Contender {
            label: "rsbalancer weighted_random",
            kind: Kind::Rsb {
                algorithm: "weighted_random",
                admit: false,
                slow_factor: None,
                increase_every: None,
                equal_weights: false,
            },
        },
        Contender {
            label: "seed Lua weighted random",
            kind: Kind::Seed { more_tries: 0 },
        },
    ];
    let tool = match &env.wrk {
        Some(w) => format!("wrk -t1 -c{CONNS} (keep-alive), {}", w.display()),
        None => format!("own client, {CONNS} keep-alive connections (wrk not found)"),
    };
    println!();
    println!("== 1. overhead: 3 static nodes (return 200), weights 30/50/20, upstream keepalive 64, gateway access_log off");
    println!(
        "   {tool}; GET /; {} s per run, {} round(s), contenders in rotating order",
        o.overhead_s, o.rounds_overhead
    );
    println!("   rsbalancer: balance + log (no admit); seed: pick + set_current_peer only");
    let pin = Pin::choose(o);
    match pin.load_cpu {
        Some(cpu) => println!(
            "   pinned: gateway workers on CPU 0 (`{}`), static nodes and load generator on CPU {cpu} (RSB_BENCH_PIN=0: no pinning)",
            pin.gateway
        ),
        None => println!("   not pinned: gateway, nodes and load generator share the CPUs"),
    }
    let (_nodes_ngx, nodes) = start_static_nodes(env, run, "ovh-nodes", &weights, pin.nodes);
    let mut gws = Vec::new();
    for (i, c) in contenders.iter().enumerate() {
        let (n, port) = start_gateway(env, run, &format!("ovh-gw{i}"), c, &nodes, false, pin.gateway);
        let r = one_request(port, "GET", "/", "", "")
            .unwrap_or_else(|e| panic!("{}: smoke request: {e}\n{}", c.label, n.diagnostics()));
        assert!(
            r.status == 200 && r.body.starts_with(b"ok "),
            "{}: smoke request got {} {:?}\n{}",
            c.label,
            r.status,
            String::from_utf8_lossy(&r.body),
            n.diagnostics()
        );
        gws.push((n, port));
    }
    let measure = |gw: &Nginx, port: u16, secs: u64| measure_load(env, gw, port, CONNS, secs, pin.load_cpu);
    // Warm-up: JIT traces, keepalive pools.
    for (n, port) in &gws {
        let _ = measure(n, *port, 1);
    }
    let mut results: Vec<Vec<(Throughput, f64)>> = contenders.iter().map(|_| Vec::new()).collect();
    for round in 0..o.rounds_overhead {
        for k in 0..contenders.len() {
            let i = (k + round) % contenders.len();
            results[i].push(measure(&gws[i].0, gws[i].1, o.overhead_s));
        }
    }
    let (mut native_rps, mut native_cpu) = (f64::NAN, f64::NAN);
    println!();
    println!(
        "   {:<30} {:>9} {:>15} {:>9} {:>8} {:>8} {:>10} {:>9} {:>6}",
        "contender", "req/s", "min..max", "vs native", "p50 ms", "p99 ms", "gw CPU us", "CPU ratio", "errors"
    );
    for (i, c) in contenders.iter().enumerate() {
        let mut rps: Vec<f64> = results[i].iter().map(|t| t.0.rps).collect();
        let mut p50: Vec<f64> = results[i].iter().map(|t| t.0.p50_ms).collect();
        let mut p99: Vec<f64> = results[i].iter().map(|t| t.0.p99_ms).collect();
        let mut cpu: Vec<f64> = results[i].iter().map(|t| t.1).collect();
        let errors: u64 = results[i].iter().map(|t| t.0.errors).sum();
        let (lo, hi) = min_max(&rps);
        let m = median(&mut rps);
        let cpu_m = median(&mut cpu);
        if i == 0 {
            native_rps = m;
            native_cpu = cpu_m;
        }
        println!(
            "   {:<30} {:>9.0} {:>15} {:>8.1}% {:>8.3} {:>8.3} {:>10.1} {:>8.1}% {:>6}",
            c.label,
            m,
            format!("{lo:.0}..{hi:.0}"),
            100.0 * m / native_rps,
            median(&mut p50),
            median(&mut p99),
            cpu_m,
            100.0 * native_cpu / cpu_m,
            errors
        );
    }
    println!("   medians over rounds. gw CPU us: CPU time of the gateway's 2 workers per request (/proc utime+stime);");
    println!("   CPU ratio: native's CPU per request / the contender's: its relative req/s when the gateway alone limits throughput.");
    println!("   Target: rsbalancer >= 95% of native's req/s.");
    for (i, (n, _)) in gws.iter().enumerate() {
        let errs = n.error_lines();
        if !errs.is_empty() {
            println!(
                "   ! {}: {} error-log lines, first: {}",
                contenders[i].label,
                errs.len(),
                errs[0]
            );
        }
    }
}

// ------------------------------------------------------------------------------------
// Scenarios 2 and 3: busy storm, quota node

#[derive(Clone)]
struct MockSpec {
    name: &'static str,
    latency_ms: u32,
    max_conc: u32,
    quota_rps: u32,
    quota_burst: u32,
    weight: u32,
}

struct StormScenario {
    key: &'static str,
    title: String,
    nodes: Vec<MockSpec>,
    clients: usize,
}

fn storm_scenarios(which: &str) -> StormScenario {
    const FAST: u32 = 50;
    const SLOW: u32 = 250; // 5x
    let node = |name, latency_ms, max_conc, quota_rps, quota_burst, weight| MockSpec {
        name,
        latency_ms,
        max_conc,
        quota_rps,
        quota_burst,
        weight,
    };
    match which {
        "storm" => {
            let nodes = vec![
                node("a", FAST, 8, 0, 0, 8),
                node("b", FAST, 16, 0, 0, 16),
                node("c", SLOW, 8, 0, 0, 8),
            ];
            let cap: u32 = nodes.iter().map(|n| n.max_conc).sum();
            let clients = (0.8 * cap as f64).round() as usize;
            StormScenario {
                key: "storm",
                title: format!(
                    "== 2. busy storm: caps a=8 b=16 c=8 (c {SLOW} ms, a/b {FAST} ms), 429 without Retry-After over the cap; {clients} clients = 0.8 x {cap}"
                ),
                nodes,
                clients,
            }
        }
        "defaults" => {
            // Issue 11's storm: caps 20 / 40 / 10, c about 6x slower (250 ms vs 40 ms).
            // Capacity counts concurrency slots, a slow node's as any other's (what the
            // nodes can hold at once, as in `storm`): 70, so 56 clients. In requests/s
            // the nodes serve 20/0.04 + 40/0.04 + 10/0.25 = 1540; 56 clients answered
            // in 40 ms would ask for 1400 (91%), so the fast nodes' 60 slots are nearly
            // full and a balancer that lets a request onto c costs it 250 ms.
            let nodes = vec![
                node("a", 40, 20, 0, 0, 20),
                node("b", 40, 40, 0, 0, 40),
                node("c", SLOW, 10, 0, 0, 10),
            ];
            let cap: u32 = nodes.iter().map(|n| n.max_conc).sum();
            let clients = (0.8 * cap as f64).round() as usize;
            StormScenario {
                key: "defaults",
                title: format!(
                    "== 2b. busy storm, pool defaults (issue 11): caps a=20 b=40 c=10 (c {SLOW} ms, a/b 40 ms), 429 without Retry-After over the cap; {clients} clients = 0.8 x {cap}"
                ),
                nodes,
                clients,
            }
        }
        _ => {
            // a: no concurrency cap; a token bucket of 60 req/s (burst 20) instead, 429 +
            // Retry-After when empty. Its weight stays its nominal size (8, as in the
            // storm: what an operator who sized it by GPUs would write), but what it can
            // really serve is 60/s x 50 ms = 3 requests in flight; clients = 0.8 x that
            // effective capacity.
            let nodes = vec![
                node("a", FAST, 0, 60, 20, 8),
                node("b", FAST, 16, 0, 0, 16),
                node("c", SLOW, 8, 0, 0, 8),
            ];
            let cap = 60.0 * FAST as f64 / 1000.0 + 16.0 + 8.0;
            let clients = (0.8 * cap).round() as usize;
            StormScenario {
                key: "quota",
                title: format!(
                    "== 3. quota node: a = token bucket 60 req/s burst 20 (429 + Retry-After when empty, no cap; {FAST} ms), b cap 16 ({FAST} ms), c cap 8 ({SLOW} ms); {clients} clients = 0.8 x {cap} (a counts 60/s x {FAST} ms)"
                ),
                nodes,
                clients,
            }
        }
    }
}

fn start_mocks(env: &Env, run: &RunDir, inst: &str, specs: &[MockSpec]) -> (Nginx, Vec<Node>, PathBuf) {
    let nodes: Vec<Node> = specs
        .iter()
        .map(|s| Node {
            name: s.name,
            port: free_port(),
            weight: s.weight,
        })
        .collect();
    let attempts = run.path.join(format!("{inst}-attempts.log"));
    let mut servers = String::new();
    for (s, n) in specs.iter().zip(&nodes) {
        // Tries on /v1/ (the client requests) are logged for the attempt counts.
        let v1 = format!(
            r#"        location /v1/ {{
            access_log {} attempts;
            content_by_lua_block {{ require("mock_llm").handle() }}
            log_by_lua_block {{ require("mock_llm").log() }}
        }}
"#,
            attempts.display()
        );
        let vars = MockVars {
            name: s.name,
            latency_ms: s.latency_ms,
            chunk_ms: 0,
            max_conc: s.max_conc,
            retry_after: 0,
            quota_rps: s.quota_rps as f64,
            quota_burst: s.quota_burst,
            fail: "",
        };
        servers.push_str(&mock_server(n.port, &vars, " backlog=4096", &v1));
    }
    let conf = render(
        &env.template("mock-nodes.conf"),
        &[
            ("USER", env.user_line.to_string()),
            ("MODULES", env.modules.display().to_string()),
            ("RUNTIME", run.path.display().to_string()),
            ("NAME", inst.to_string()),
            ("AFFINITY", String::new()),
            ("LUADIR", run.path.join("lua").display().to_string()),
            ("SERVERS", servers),
        ],
    );
    let ports: Vec<u16> = nodes.iter().map(|n| n.port).collect();
    let ngx = Nginx::start(env, run, inst, &conf, &ports);
    for n in &nodes {
        let r = one_request(n.port, "GET", "/health", "", "")
            .unwrap_or_else(|e| panic!("mock {} /health: {e}\n{}", n.name, ngx.diagnostics()));
        assert_eq!(r.status, 200, "mock {} /health\n{}", n.name, ngx.diagnostics());
    }
    (ngx, nodes, attempts)
}

/// Per-request attempts at the nodes: id -> [(node index, status)].
fn read_attempts(path: &Path, nodes: &[Node]) -> HashMap<String, Vec<(usize, u16)>> {
    let by_port: HashMap<u16, usize> = nodes.iter().enumerate().map(|(i, n)| (n.port, i)).collect();
    let mut out: HashMap<String, Vec<(usize, u16)>> = HashMap::new();
    for line in fs::read_to_string(path).unwrap_or_default().lines() {
        let mut f = line.split(' ');
        let (Some(port), Some(status), Some(id)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let (Ok(port), Ok(status)) = (port.parse::<u16>(), status.parse::<u16>()) else {
            continue;
        };
        let Some(&i) = by_port.get(&port) else { continue };
        out.entry(id.to_string()).or_default().push((i, status));
    }
    out
}

/// Tries per request as the gateway logged them ($upstream_status entries): id -> n.
fn read_gateway_tries(path: &Path) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for line in fs::read_to_string(path).unwrap_or_default().lines() {
        let Some(id) = line.split(' ').next() else {
            continue;
        };
        // '<id> <status> [<addrs>] [<statuses>] <time>'
        let Some(st) = line.rsplit_once(" [").map(|(_, r)| r) else {
            continue;
        };
        let st = st.split(']').next().unwrap_or("");
        let n = st
            .split([',', ':'])
            .map(str::trim)
            .filter(|s| !s.is_empty() && *s != "-")
            .count();
        out.insert(id.to_string(), n);
    }
    out
}

#[derive(Default, Clone)]
struct NodeTally {
    tries: u64,
    ok: u64,
    busy: u64,
}

#[derive(Default)]
struct PhaseStats {
    requests: u64,
    ok: u64,
    attempts: u64,
    /// Requests for which the mock log has no line at all (answered by the gateway).
    zero_try: u64,
    gw_tries: u64,
    statuses: BTreeMap<u16, u64>,
    lat: Vec<u64>,
    lat_ok: Vec<u64>,
    nodes: Vec<NodeTally>,
}

struct StormRun {
    warm: PhaseStats,
    meas: PhaseStats,
    measure_s: f64,
    status_end: Option<Value>,
    timeline: Vec<(f64, Value)>,
    gw_errors: Vec<String>,
}

fn analyse(
    samples: &[Sample],
    tag: &str,
    attempts: &HashMap<String, Vec<(usize, u16)>>,
    gw: &HashMap<String, usize>,
    n_nodes: usize,
) -> (PhaseStats, PhaseStats) {
    let mut w = PhaseStats {
        nodes: vec![NodeTally::default(); n_nodes],
        ..Default::default()
    };
    let mut m = PhaseStats {
        nodes: vec![NodeTally::default(); n_nodes],
        ..Default::default()
    };
    for s in samples {
        let (p, c) = match s.phase {
            Phase::Warm => (&mut w, 'w'),
            Phase::Measure => (&mut m, 'm'),
        };
        let id = format!("{tag}.{c}.{}.{}", s.client, s.seq);
        p.requests += 1;
        *p.statuses.entry(s.status).or_default() += 1;
        p.lat.push(s.latency_us);
        if (200..300).contains(&s.status) {
            p.ok += 1;
            p.lat_ok.push(s.latency_us);
        }
        match attempts.get(&id) {
            Some(tries) => {
                p.attempts += tries.len() as u64;
                for &(i, st) in tries {
                    let t = &mut p.nodes[i];
                    t.tries += 1;
                    if (200..300).contains(&st) {
                        t.ok += 1;
                    } else if st == 429 {
                        t.busy += 1;
                    }
                }
            }
            None => p.zero_try += 1,
        }
        p.gw_tries += *gw.get(&id).unwrap_or(&0) as u64;
    }
    for p in [&mut w, &mut m] {
        p.lat.sort_unstable();
        p.lat_ok.sort_unstable();
    }
    (w, m)
}

fn get_status(port: u16) -> Option<Value> {
    let r = one_request(port, "GET", "/rsbalancer/status", "", "").ok()?;
    if r.status != 200 {
        return None;
    }
    serde_json::from_slice(&r.body).ok()
}

fn storm_run(
    env: &Env,
    run: &RunDir,
    sc: &StormScenario,
    c: &Contender,
    ci: usize,
    round: usize,
    o: &Opts,
) -> StormRun {
    check_stop();
    let inst = format!("{}-r{round}-c{ci}", sc.key);
    let (mut mocks, nodes, attempts_log) = start_mocks(env, run, &format!("{inst}-nodes"), &sc.nodes);
    let (mut gw, port) = start_gateway(env, run, &format!("{inst}-gw"), c, &nodes, true, "");
    let r = one_request(port, "POST", "/v1/chat/completions", CHAT_BODY, "smoke")
        .unwrap_or_else(|e| panic!("{}: smoke request: {e}\n{}", c.label, gw.diagnostics()));
    assert!(
        r.status == 200 && r.header("X-Node").is_some(),
        "{}: smoke request answered {} {}\n{}",
        c.label,
        r.status,
        String::from_utf8_lossy(&r.body),
        gw.diagnostics()
    );
    let is_rsb = matches!(c.kind, Kind::Rsb { .. });
    if is_rsb {
        assert!(
            get_status(port).is_some(),
            "{}: /rsbalancer/status does not answer JSON\n{}",
            c.label,
            gw.diagnostics()
        );
    }
    // rsbalancer's shared state, sampled once a second while the load runs.
    let done = Arc::new(AtomicBool::new(false));
    let sampler = is_rsb.then(|| {
        let done = done.clone();
        thread::spawn(move || {
            let t0 = Instant::now();
            let mut out = Vec::new();
            let mut next = 1.0;
            while !done.load(Ordering::Relaxed) && !stopping() && t0.elapsed() < Duration::from_secs(600) {
                if t0.elapsed().as_secs_f64() >= next {
                    if let Some(v) = get_status(port) {
                        out.push((t0.elapsed().as_secs_f64(), v));
                    }
                    next += 1.0;
                }
                thread::sleep(Duration::from_millis(20));
            }
            out
        })
    });
    let tag = format!("{}r{round}c{ci}", sc.key);
    let warm = Duration::from_secs_f64(o.warm_s);
    let measure = Duration::from_secs_f64(o.storm_s);
    let samples = closed_loop(&LoadSpec {
        port,
        method: "POST",
        path: "/v1/chat/completions",
        body: CHAT_BODY,
        clients: sc.clients,
        warm,
        measure,
        tag: tag.clone(),
        cpu: None,
        max_per_client: 200_000,
        fail_pause: Duration::from_millis(o.fail_pause_ms),
        priority: None,
    });
    done.store(true, Ordering::Relaxed);
    let timeline = sampler.map(|h| h.join().unwrap_or_default()).unwrap_or_default();
    let status_end = if is_rsb { get_status(port) } else { None };
    check_stop();
    // Every try has been answered (closed loop: each client waited for its response);
    // stopping nginx flushes nothing more but makes sure the last log lines are written.
    thread::sleep(Duration::from_millis(200));
    let gw_errors = gw.error_lines();
    gw.stop();
    mocks.stop();
    let attempts = read_attempts(&attempts_log, &nodes);
    let gw_tries = read_gateway_tries(&run.path.join(format!("{inst}-gw-access.log")));
    let (w, m) = analyse(&samples, &tag, &attempts, &gw_tries, nodes.len());
    if !o.keep {
        // A fast-failing contender writes hundreds of thousands of lines per run.
        let _ = fs::remove_file(&attempts_log);
        let _ = fs::remove_file(run.path.join(format!("{inst}-gw-access.log")));
    }
    StormRun {
        warm: w,
        meas: m,
        measure_s: measure.as_secs_f64(),
        status_end,
        timeline,
        gw_errors,
    }
}

fn fmt_statuses(s: &BTreeMap<u16, u64>) -> String {
    let v: Vec<String> = s
        .iter()
        .filter(|(k, _)| !(200..300).contains(*k))
        .map(|(k, v)| {
            if *k == 0 {
                format!("io-err:{v}")
            } else {
                format!("{k}:{v}")
            }
        })
        .collect();
    if v.is_empty() {
        "-".into()
    } else {
        v.join(" ")
    }
}

/// `v` with `prec` decimals, or "-" when it is not a number (nothing to measure).
fn num(v: f64, prec: usize) -> String {
    if v.is_finite() {
        format!("{v:.prec$}")
    } else {
        "-".into()
    }
}

fn pct(a: u64, b: u64) -> f64 {
    if b == 0 {
        f64::NAN
    } else {
        100.0 * a as f64 / b as f64
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        f64::NAN
    } else {
        a as f64 / b as f64
    }
}

fn f(v: &Value, k: &str) -> f64 {
    v.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN)
}

fn print_status(v: &Value, indent: &str) {
    let Some(pool) = v.pointer("/pools/llm") else {
        println!("{indent}(no pool llm in status: {v})");
        return;
    };
    println!(
        "{indent}pool llm: requests {} retries {} retries_denied {} no_node {}",
        f(pool, "requests"),
        f(pool, "retries"),
        f(pool, "retries_denied"),
        f(pool, "no_node")
    );
    println!(
        "{indent}{:<4} {:>6} {:<10} {:>7} {:>5} {:>7} {:>7} {:>6} {:>6} {:>9} {:>9} {:>9} {:>10} {:>5}",
        "node",
        "weight",
        "state",
        "limit",
        "infl",
        "picks",
        "tries",
        "429s",
        "fails",
        "ewma ms",
        "mean ms",
        "cooldowns",
        "unavail ms",
        "ejct"
    );
    for n in pool.get("nodes").and_then(Value::as_array).into_iter().flatten() {
        let ok = f(n, "requests") - f(n, "busy") - f(n, "failures");
        let limit = f(n, "limit");
        println!(
            "{indent}{:<4} {:>6} {:<10} {:>7} {:>5} {:>7} {:>7} {:>6} {:>6} {:>9.1} {:>9.1} {:>9} {:>10} {:>5}",
            n.get("id").and_then(Value::as_str).unwrap_or("?"),
            f(n, "weight"),
            n.get("state").and_then(Value::as_str).unwrap_or("?"),
            if limit > 0.0 { format!("{limit:.2}") } else { "none".into() },
            f(n, "inflight"),
            f(n, "picks"),
            f(n, "requests"),
            f(n, "busy"),
            f(n, "failures"),
            f(n, "ewma_us") / 1000.0,
            if ok > 0.0 { f(n, "latency_sum_us") / ok / 1000.0 } else { f64::NAN },
            f(n, "cooldowns"),
            f(n, "unavailable_ms"),
            f(n, "ejections"),
        );
    }
}

fn print_timeline(tl: &[(f64, Value)], warm_s: f64, indent: &str) {
    for (t, v) in tl {
        let Some(pool) = v.pointer("/pools/llm") else {
            continue;
        };
        let mut line = format!("{indent}t={:>4.1}s{} ", t, if *t < warm_s { "w" } else { " " });
        for n in pool.get("nodes").and_then(Value::as_array).into_iter().flatten() {
            let limit = f(n, "limit");
            let state = n.get("state").and_then(Value::as_str).unwrap_or("?");
            let _ = write!(
                line,
                "| {} lim {:>5} in {:>2} ewma {:>6.0}ms {:<8} ",
                n.get("id").and_then(Value::as_str).unwrap_or("?"),
                if limit > 0.0 {
                    format!("{limit:.1}")
                } else {
                    "-".into()
                },
                f(n, "inflight"),
                f(n, "ewma_us") / 1000.0,
                if state == "healthy" { "" } else { state },
            );
        }
        let _ = write!(
            line,
            "| retries {} denied {} no_node {}",
            f(pool, "retries"),
            f(pool, "retries_denied"),
            f(pool, "no_node")
        );
        println!("{line}");
    }
}

/// What the scenario itself forces, whatever the balancer: with every client always in
/// flight (closed loop) and the fast nodes full at their caps / quotas (nominal
/// latencies), the clients left over must sit on the slow node unless the gateway
/// makes them wait. Returns a note when that share exceeds 1% (then p99 >= the slow
/// node's latency for any balancer that answers every request at once).
fn slow_share_floor(sc: &StormScenario) -> Option<String> {
    let slow = sc.nodes.iter().max_by_key(|n| n.latency_ms)?;
    let (mut fast_rate, mut fast_inflight) = (0.0, 0.0);
    for n in sc.nodes.iter().filter(|n| n.latency_ms < slow.latency_ms) {
        let lat = n.latency_ms as f64 / 1000.0;
        let mut rate = f64::INFINITY;
        if n.max_conc > 0 {
            rate = rate.min(n.max_conc as f64 / lat);
        }
        if n.quota_rps > 0 {
            rate = rate.min(n.quota_rps as f64);
        }
        if !rate.is_finite() {
            return None; // an uncapped fast node can take everyone
        }
        fast_rate += rate;
        fast_inflight += rate * lat;
    }
    let excess = sc.clients as f64 - fast_inflight;
    if excess <= 0.0 {
        return None;
    }
    let slow_rate = excess / (slow.latency_ms as f64 / 1000.0);
    let share = 100.0 * slow_rate / (fast_rate + slow_rate);
    (share > 1.0).then(|| {
        format!(
            "   floor: the fast nodes hold {fast_inflight:.0} requests at their caps/quotas, so {excess:.0} of the {} clients are always on {} ({} ms) unless\n   the gateway makes them wait: >= {share:.1}% of requests take >= {} ms, i.e. p99 >= {} ms for any balancer that answers every request at once",
            sc.clients, slow.name, slow.latency_ms, slow.latency_ms, slow.latency_ms
        )
    })
}

/// The contenders rsbalancer is compared with: native nginx (nginx's default
/// max_fails=1, and max_fails=0 unless RSB_BENCH_NATIVE_NOFAIL=0), the seed with
/// set_more_tries(3).
fn baselines(o: &Opts) -> Vec<Contender> {
    let mut v = vec![Contender {
        label: "native upstream",
        kind: Kind::Native { server_extra: "" },
    }];
    if o.native_nofail {
        v.push(Contender {
            label: "native, max_fails=0",
            kind: Kind::Native {
                server_extra: " max_fails=0",
            },
        });
    }
    v.push(Contender {
        label: "seed Lua + set_more_tries(3)",
        kind: Kind::Seed { more_tries: 3 },
    });
    v
}

fn storm(env: &Env, run: &RunDir, o: &Opts, which: &str) {
    let sc = storm_scenarios(which);
    let weights: Vec<String> = sc.nodes.iter().map(|n| n.weight.to_string()).collect();
    let weights = weights.join(":");
    let mut contenders = baselines(o);
    // Slow nodes as overflow (`limit.slow_factor` 2), with the default AIMD probing and
    // with rare probes (`increase_every` 100, the README's advice for nodes of fixed
    // capacity: each refused probe is retried, on the slow node when the fast ones are
    // full).
    let rsb = |slow_factor, increase_every, equal_weights| Kind::Rsb {
        algorithm: "p2c_ewma",
        admit: true,
        slow_factor,
        increase_every,
        equal_weights,
    };
    if sc.key == "defaults" {
        // The issue's storm as a new user runs it: the pool config's defaults (weights
        // by caps, as the other contenders; and with no weights at all), and slow
        // nodes as overflow turned off (0: the default before issue 11).
        contenders.push(Contender {
            label: "rsbalancer defaults",
            kind: rsb(None, None, false),
        });
        contenders.push(Contender {
            label: "rsb. defaults, no weights",
            kind: rsb(None, None, true),
        });
        contenders.push(Contender {
            label: "rsb. slow_factor 0",
            kind: rsb(Some(0.0), None, false),
        });
    } else {
        for (label, increase_every) in [
            ("rsbalancer slow_factor 2", 4),
            ("rsb. slow_factor 2, incr. 100", 100),
        ] {
            contenders.push(Contender {
                label,
                kind: rsb(Some(2.0), Some(increase_every), false),
            });
        }
    }
    println!();
    println!("{}", sc.title);
    println!(
        "   POST /v1/chat/completions, closed loop, keep-alive; weights {weights} for every contender; warm-up {:.0} s (reported apart) + {:.0} s measured; {} round(s), fresh nodes and gateway per run",
        o.warm_s, o.storm_s, o.rounds_storm
    );
    if o.fail_pause_ms > 0 {
        println!(
            "   clients pause {} ms after each non-2xx answer (RSB_BENCH_FAIL_PAUSE_MS)",
            o.fail_pause_ms
        );
    }
    println!("   native/seed: proxy_next_upstream error timeout http_429 http_502 http_503 http_504 non_idempotent; proxy_next_upstream_tries 4;");
    println!("   native keeps nginx's default max_fails=1 fail_timeout=10s (a 429 is a failed attempt); rsbalancer: pool defaults (retry.max_tries 3, budget 20% + 3/s)");
    let mut runs: Vec<Vec<StormRun>> = contenders.iter().map(|_| Vec::new()).collect();
    for round in 0..o.rounds_storm {
        for k in 0..contenders.len() {
            let i = (k + round) % contenders.len();
            runs[i].push(storm_run(env, run, &sc, &contenders[i], i, round, o));
        }
    }

    println!();
    println!("   measured phase, median over rounds (min..max):");
    println!(
        "   {:<29} {:>7} {:>6} {:>6} {:>17} {:>16} {:>7} {:>7} {:>7}  client non-2xx (all rounds)",
        "contender", "reqs", "req/s", "2xx/s", "2xx %", "tries/req", "p50 ms", "p99 ms", "p99 2xx",
    );
    let mut native_p99: Vec<(&str, f64)> = Vec::new();
    for (i, c) in contenders.iter().enumerate() {
        let rs = &runs[i];
        let col = |g: &dyn Fn(&StormRun) -> f64| -> (f64, f64, f64) {
            let mut v: Vec<f64> = rs.iter().map(g).collect();
            let (lo, hi) = min_max(&v);
            (median(&mut v), lo, hi)
        };
        let reqs = col(&|r| r.meas.requests as f64);
        let rps = col(&|r| r.meas.requests as f64 / r.measure_s);
        let ok = col(&|r| pct(r.meas.ok, r.meas.requests));
        let goodput = col(&|r| r.meas.ok as f64 / r.measure_s);
        let att = col(&|r| ratio(r.meas.attempts, r.meas.requests));
        let p50 = col(&|r| percentile(&r.meas.lat, 0.5) / 1000.0);
        let p99 = col(&|r| percentile(&r.meas.lat, 0.99) / 1000.0);
        let p99ok = col(&|r| percentile(&r.meas.lat_ok, 0.99) / 1000.0);
        if matches!(c.kind, Kind::Native { .. }) {
            native_p99.push((c.label, p99.0));
        }
        let mut statuses = BTreeMap::new();
        for r in rs {
            for (k, v) in &r.meas.statuses {
                *statuses.entry(*k).or_insert(0) += v;
            }
        }
        println!(
            "   {:<29} {:>7.0} {:>6.0} {:>6.0} {:>17} {:>16} {:>7} {:>7} {:>7}  {}",
            c.label,
            reqs.0,
            rps.0,
            goodput.0,
            format!("{:.2} ({:.1}..{:.1})", ok.0, ok.1, ok.2),
            format!("{:.3} ({:.2}..{:.2})", att.0, att.1, att.2),
            num(p50.0, 0),
            num(p99.0, 0),
            num(p99ok.0, 0),
            fmt_statuses(&statuses)
        );
    }
    println!("   tries/req: tries that reached a node (its own log, 429s included) per client request; p99: all client requests, p99 2xx: successes only");
    println!("   closed loop without think time: a gateway that fails fast is asked again at once, so fast failures multiply (see 2xx/s, the goodput)");
    let halves: Vec<String> = native_p99
        .iter()
        .map(|(l, p)| format!("{l} {p:.0} ms -> {:.0} ms", p / 2.0))
        .collect();
    println!(
        "   targets for rsbalancer: 2xx >= 99.9%, tries/req <= 1.02, p99 <= half of native's ({})",
        halves.join("; ")
    );
    if let Some(floor) = slow_share_floor(&sc) {
        println!("{floor}");
    }

    println!();
    println!("   per node, all measured rounds: tries (share) / 2xx / 429 at the node; requests answered without any try; gateway-log tries vs node-log tries");
    for (i, c) in contenders.iter().enumerate() {
        let mut tally = vec![NodeTally::default(); sc.nodes.len()];
        let (mut total, mut zero, mut reqs, mut gw) = (0u64, 0u64, 0u64, 0u64);
        for r in &runs[i] {
            for (t, x) in tally.iter_mut().zip(&r.meas.nodes) {
                t.tries += x.tries;
                t.ok += x.ok;
                t.busy += x.busy;
            }
            total += r.meas.attempts;
            zero += r.meas.zero_try;
            reqs += r.meas.requests;
            gw += r.meas.gw_tries;
        }
        let mut line = format!("   {:<29}", c.label);
        for (s, t) in sc.nodes.iter().zip(&tally) {
            let _ = write!(
                line,
                " {}: {:>6} ({:>4}%) {:>6} / {:>5} |",
                s.name,
                t.tries,
                num(pct(t.tries, total), 1),
                t.ok,
                t.busy
            );
        }
        let _ = write!(line, " no try {zero}/{reqs} | gw-log {gw} vs {total}");
        println!("{line}");
    }

    println!();
    println!(
        "   warm-up phase (first {:.0} s of each run, cold balancer state), median over rounds:",
        o.warm_s
    );
    for (i, c) in contenders.iter().enumerate() {
        let mut ok: Vec<f64> = runs[i].iter().map(|r| pct(r.warm.ok, r.warm.requests)).collect();
        let mut att: Vec<f64> = runs[i]
            .iter()
            .map(|r| ratio(r.warm.attempts, r.warm.requests))
            .collect();
        let mut p99: Vec<f64> = runs[i]
            .iter()
            .map(|r| percentile(&r.warm.lat, 0.99) / 1000.0)
            .collect();
        let mut statuses = BTreeMap::new();
        for r in &runs[i] {
            for (k, v) in &r.warm.statuses {
                *statuses.entry(*k).or_insert(0) += v;
            }
        }
        println!(
            "   {:<29} 2xx {:>6}%  tries/req {:>5}  p99 {:>5} ms  non-2xx {}",
            c.label,
            num(median(&mut ok), 2),
            num(median(&mut att), 3),
            num(median(&mut p99), 0),
            fmt_statuses(&statuses)
        );
    }

    for (i, c) in contenders.iter().enumerate() {
        let errs: usize = runs[i].iter().map(|r| r.gw_errors.len()).sum();
        if errs > 0 {
            let first = runs[i].iter().flat_map(|r| r.gw_errors.iter()).next().unwrap();
            println!(
                "   ! {} gateway error log: {errs} [error] lines, e.g. {}",
                c.label, first
            );
        }
    }

    for (i, c) in contenders.iter().enumerate() {
        if !matches!(c.kind, Kind::Rsb { .. }) {
            continue;
        }
        let Some(last) = runs[i].last() else { continue };
        println!();
        println!(
            "   {} shared state, last round, sampled every second (w = warm-up):",
            c.label
        );
        print_timeline(&last.timeline, o.warm_s, "   ");
        if let Some(v) = &last.status_end {
            println!("   at the end (status_json):");
            print_status(v, "     ");
        }
    }
}

// ------------------------------------------------------------------------------------
// Scenario 4: overhead with /metrics scraped every second

/// What a scraper thread saw: (seconds per scrape, bytes) of each scrape.
fn scrape_every_second(port: u16, stop: &AtomicBool, cpu: Option<usize>) -> Vec<(f64, usize)> {
    if let Some(cpu) = cpu {
        let _ = bind_to_cpu(cpu);
    }
    let mut seen = Vec::new();
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) && !stopping() {
        if Instant::now() >= next {
            let t = Instant::now();
            let r =
                one_request(port, "GET", "/metrics", "", "").unwrap_or_else(|e| panic!("GET /metrics: {e}"));
            assert_eq!(
                r.status,
                200,
                "GET /metrics: {}",
                String::from_utf8_lossy(&r.body)
            );
            seen.push((t.elapsed().as_secs_f64(), r.body.len()));
            next += Duration::from_secs(1);
        }
        thread::sleep(Duration::from_millis(10));
    }
    seen
}

fn metrics_overhead(env: &Env, run: &RunDir, o: &Opts) {
    const CONNS: usize = 32;
    let pin = Pin::choose(o);
    println!();
    println!("== 4. metrics: the overhead scenario's rsbalancer p2c_ewma gateway, with and without GET /metrics every second");
    println!(
        "   {} s per run, {} round(s) of each, alternating order; the scraper is a thread on the load generator's CPU",
        o.overhead_s, o.rounds_overhead
    );
    let (_nodes_ngx, nodes) = start_static_nodes(
        env,
        run,
        "mtr-nodes",
        &[("a", 30), ("b", 50), ("c", 20)],
        pin.nodes,
    );
    let c = Contender {
        label: "rsbalancer p2c_ewma",
        kind: Kind::Rsb {
            algorithm: "p2c_ewma",
            admit: false,
            slow_factor: None,
            increase_every: None,
            equal_weights: false,
        },
    };
    let (gw, port) = start_gateway(env, run, "mtr-gw", &c, &nodes, false, pin.gateway);
    let r = one_request(port, "GET", "/metrics", "", "")
        .unwrap_or_else(|e| panic!("GET /metrics: {e}\n{}", gw.diagnostics()));
    assert!(
        r.status == 200 && String::from_utf8_lossy(&r.body).contains("rsbalancer_pool_requests_total"),
        "GET /metrics: {} {}\n{}",
        r.status,
        String::from_utf8_lossy(&r.body),
        gw.diagnostics()
    );
    let measure = |scrape: bool| -> ((Throughput, f64), Vec<(f64, usize)>) {
        let stop = AtomicBool::new(false);
        thread::scope(|s| {
            let scraper = scrape.then(|| s.spawn(|| scrape_every_second(port, &stop, pin.load_cpu)));
            let t = measure_load(env, &gw, port, CONNS, o.overhead_s, pin.load_cpu);
            stop.store(true, Ordering::Relaxed);
            let seen = scraper.map(|h| h.join().expect("scraper")).unwrap_or_default();
            (t, seen)
        })
    };
    let _ = measure(false); // warm-up: JIT traces, keepalive pools
    let (mut off, mut on, mut scrapes) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..o.rounds_overhead {
        for scrape in [round % 2 == 1, round % 2 == 0] {
            let (t, seen) = measure(scrape);
            if scrape {
                on.push(t);
                scrapes.extend(seen);
            } else {
                off.push(t);
            }
        }
    }
    println!();
    println!(
        "   {:<26} {:>9} {:>15} {:>8} {:>8} {:>10} {:>6}",
        "run", "req/s", "min..max", "p50 ms", "p99 ms", "gw CPU us", "errors"
    );
    let row = |label: &str, runs: &[(Throughput, f64)]| -> (f64, f64) {
        let mut rps: Vec<f64> = runs.iter().map(|t| t.0.rps).collect();
        let mut p50: Vec<f64> = runs.iter().map(|t| t.0.p50_ms).collect();
        let mut p99: Vec<f64> = runs.iter().map(|t| t.0.p99_ms).collect();
        let mut cpu: Vec<f64> = runs.iter().map(|t| t.1).collect();
        let (lo, hi) = min_max(&rps);
        let (m, c) = (median(&mut rps), median(&mut cpu));
        println!(
            "   {:<26} {:>9.0} {:>15} {:>8.3} {:>8.3} {:>10.2} {:>6}",
            label,
            m,
            format!("{lo:.0}..{hi:.0}"),
            median(&mut p50),
            median(&mut p99),
            c,
            runs.iter().map(|t| t.0.errors).sum::<u64>()
        );
        (m, c)
    };
    let (rps_off, cpu_off) = row("no scraping", &off);
    let (rps_on, cpu_on) = row("GET /metrics every second", &on);
    let mut secs: Vec<f64> = scrapes.iter().map(|s| s.0 * 1e3).collect();
    let bytes = scrapes.last().map_or(0, |s| s.1);
    println!(
        "   with scraping / without: req/s {:.1}%, gw CPU per request {:.1}%   (target: req/s >= 99%)",
        100.0 * rps_on / rps_off,
        100.0 * cpu_on / cpu_off
    );
    println!(
        "   {} scrapes, {} bytes each, median {:.2} ms per scrape (client side, under load)",
        scrapes.len(),
        bytes,
        median(&mut secs)
    );
}

// ------------------------------------------------------------------------------------
// Scenario 5: over capacity, priority classes

/// X-Priority of the clients, round robin: top, middle, low class.
const OVERLOAD_CLASSES: [u32; 3] = [9, 5, 2];
const OVERLOAD_LATENCY_MS: u32 = 100;

fn overload_priority(client: usize) -> u32 {
    OVERLOAD_CLASSES[client % OVERLOAD_CLASSES.len()]
}

/// The admission config of the rsbalancer contenders: low class (1-3) waits up to
/// 1 s, middle (4-7) 5 s, top (8-10) 30 s; clients may claim any priority.
fn overload_admission() -> Value {
    json!({
        "enabled": true, "untrusted_max": 10, "max_queue": 128,
        "classes": [
            { "min_priority": 1, "max_wait_ms": 1000, "max_queue": 64 },
            { "min_priority": 4, "max_wait_ms": 5000, "max_queue": 64 },
            { "min_priority": 8, "max_wait_ms": 30000, "max_queue": 128 }
        ]
    })
}

#[derive(Default, Clone)]
struct ClassStats {
    requests: u64,
    ok: u64,
    busy: u64,
    other: u64,
    /// End-to-end latency of successes, µs.
    lat_ok: Vec<u64>,
    /// Time a request spent in the gateway outside any node (queue wait), µs.
    wait: Vec<u64>,
}

struct OverloadRun {
    classes: Vec<ClassStats>,
    measure_s: f64,
    admission: Option<Value>,
}

/// `$request_time` minus the sum of `$upstream_response_time`, per request id (µs).
fn read_waits(path: &Path) -> HashMap<String, u64> {
    let mut out = HashMap::new();
    for line in fs::read_to_string(path).unwrap_or_default().lines() {
        let mut f = line.splitn(4, ' ');
        let (Some(id), Some(_status), Some(total), Some(ups)) = (f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        let Ok(total) = total.parse::<f64>() else { continue };
        let upstream: f64 = ups
            .trim_matches(['[', ']'])
            .split([',', ':'])
            .filter_map(|t| t.trim().parse::<f64>().ok())
            .sum();
        out.insert(id.to_string(), ((total - upstream).max(0.0) * 1e6) as u64);
    }
    out
}

/// Mock nodes `specs` and gateway contender `c` in front of them, as instance `inst`
/// (its access log with the queue-wait format), after one smoke request answered 200:
/// (nodes nginx, nodes, their attempts log, gateway nginx, gateway port).
fn start_over_capacity(
    env: &Env,
    run: &RunDir,
    inst: &str,
    specs: &[MockSpec],
    c: &Contender,
) -> (Nginx, Vec<Node>, PathBuf, Nginx, u16) {
    let (mocks, nodes, attempts_log) = start_mocks(env, run, &format!("{inst}-nodes"), specs);
    let (gw, port) = start_gateway(env, run, &format!("{inst}-gw"), c, &nodes, true, "");
    let r = one_request(port, "POST", "/v1/chat/completions", CHAT_BODY, "smoke")
        .unwrap_or_else(|e| panic!("{}: smoke request: {e}\n{}", c.label, gw.diagnostics()));
    assert!(
        r.status == 200,
        "{}: smoke request answered {}\n{}",
        c.label,
        r.status,
        gw.diagnostics()
    );
    (mocks, nodes, attempts_log, gw, port)
}

fn overload_run(
    env: &Env,
    run: &RunDir,
    specs: &[MockSpec],
    c: &Contender,
    ci: usize,
    round: usize,
    o: &Opts,
) -> OverloadRun {
    check_stop();
    let inst = format!("overload-r{round}-c{ci}");
    let (mut mocks, _nodes, attempts_log, mut gw, port) = start_over_capacity(env, run, &inst, specs, c);
    let clients = (1.5 * specs.iter().map(|s| s.max_conc).sum::<u32>() as f64).round() as usize;
    let tag = format!("ovr{round}c{ci}");
    let samples = closed_loop(&LoadSpec {
        port,
        method: "POST",
        path: "/v1/chat/completions",
        body: CHAT_BODY,
        clients,
        warm: Duration::from_secs_f64(o.warm_s),
        measure: Duration::from_secs_f64(o.storm_s),
        tag: tag.clone(),
        cpu: None,
        max_per_client: 200_000,
        fail_pause: Duration::from_millis(o.fail_pause_ms),
        priority: Some(overload_priority),
    });
    let admission = matches!(c.kind, Kind::RsbQueue { .. })
        .then(|| get_status(port).and_then(|v| v.pointer("/pools/llm/admission").cloned()))
        .flatten();
    thread::sleep(Duration::from_millis(300));
    gw.stop();
    mocks.stop();
    let log = run.path.join(format!("{inst}-gw-access.log"));
    let waits = read_waits(&log);
    let mut classes = vec![ClassStats::default(); OVERLOAD_CLASSES.len()];
    for smp in samples.iter().filter(|x| x.phase == Phase::Measure) {
        let k = smp.client as usize % OVERLOAD_CLASSES.len();
        let cs = &mut classes[k];
        cs.requests += 1;
        match smp.status {
            200..=299 => {
                cs.ok += 1;
                cs.lat_ok.push(smp.latency_us);
            }
            429 => cs.busy += 1,
            _ => cs.other += 1,
        }
        if let Some(&w) = waits.get(&format!("{tag}.m.{}.{}", smp.client, smp.seq)) {
            cs.wait.push(w);
        }
    }
    for cs in &mut classes {
        cs.lat_ok.sort_unstable();
        cs.wait.sort_unstable();
    }
    if !o.keep {
        let _ = fs::remove_file(&attempts_log);
        let _ = fs::remove_file(&log);
    }
    OverloadRun {
        classes,
        measure_s: o.storm_s,
        admission,
    }
}

/// The nodes of the over-capacity scenarios: caps 8 / 16 / 8, all
/// OVERLOAD_LATENCY_MS, weights = caps.
fn overload_nodes() -> Vec<MockSpec> {
    let node = |name, max_conc| MockSpec {
        name,
        latency_ms: OVERLOAD_LATENCY_MS,
        max_conc,
        quota_rps: 0,
        quota_burst: 0,
        weight: max_conc,
    };
    vec![node("a", 8), node("b", 16), node("c", 8)]
}

fn overload(env: &Env, run: &RunDir, o: &Opts) {
    let specs = overload_nodes();
    let slots: u32 = specs.iter().map(|s| s.max_conc).sum();
    let capacity_rps = slots as f64 * 1000.0 / OVERLOAD_LATENCY_MS as f64;
    let mut contenders = baselines(o);
    for (label, increase_every) in [
        ("rsbalancer + admission", 4),
        ("rsbalancer + adm., incr_every 100", 100),
    ] {
        contenders.push(Contender {
            label,
            kind: Kind::RsbQueue { increase_every },
        });
    }
    let clients = (1.5 * slots as f64).round() as usize;
    println!();
    println!(
        "== 5. over capacity: caps a=8 b=16 c=8 ({OVERLOAD_LATENCY_MS} ms each, 429 without Retry-After over the cap) = {slots} slots = {capacity_rps:.0} req/s; {clients} clients = 1.5 x {slots}, X-Priority 9 / 5 / 2 ({} each)",
        clients / 3
    );
    println!(
        "   closed loop, keep-alive, no pause after a refusal; warm-up {:.0} s + {:.0} s measured; {} round(s); rsbalancer: admission classes 1-3 max wait 1 s, 4-7 5 s, 8-10 30 s",
        o.warm_s, o.storm_s, o.rounds_storm
    );
    let mut runs: Vec<Vec<OverloadRun>> = contenders.iter().map(|_| Vec::new()).collect();
    for round in 0..o.rounds_storm {
        for k in 0..contenders.len() {
            let i = (k + round) % contenders.len();
            runs[i].push(overload_run(env, run, &specs, &contenders[i], i, round, o));
        }
    }
    println!();
    println!("   measured phase, all rounds together; goodput = 2xx/s / capacity; 429 and latency per class (top / middle / low)");
    println!(
        "   {:<34} {:>6} {:>6} {:>8} {:>20} {:>9} {:>24} {:>24} {:>20}",
        "contender",
        "req/s",
        "2xx/s",
        "goodput",
        "429 % top/mid/low",
        "other",
        "e2e p50/p99 ms top",
        "e2e p50/p99 ms low",
        "wait p50/p99 ms top"
    );
    for (i, c) in contenders.iter().enumerate() {
        let rs = &runs[i];
        let secs: f64 = rs.iter().map(|r| r.measure_s).sum();
        let mut cls = vec![ClassStats::default(); OVERLOAD_CLASSES.len()];
        for r in rs {
            for (t, x) in cls.iter_mut().zip(&r.classes) {
                t.requests += x.requests;
                t.ok += x.ok;
                t.busy += x.busy;
                t.other += x.other;
                t.lat_ok.extend(&x.lat_ok);
                t.wait.extend(&x.wait);
            }
        }
        for t in &mut cls {
            t.lat_ok.sort_unstable();
            t.wait.sort_unstable();
        }
        let reqs: u64 = cls.iter().map(|t| t.requests).sum();
        let ok: u64 = cls.iter().map(|t| t.ok).sum();
        let other: u64 = cls.iter().map(|t| t.other).sum();
        let busy: Vec<String> = cls.iter().map(|t| num(pct(t.busy, t.requests), 1)).collect();
        let p = |v: &[u64], q: f64| num(percentile(v, q) / 1000.0, 0);
        println!(
            "   {:<34} {:>6.0} {:>6.0} {:>7}% {:>20} {:>9} {:>24} {:>24} {:>20}",
            c.label,
            reqs as f64 / secs,
            ok as f64 / secs,
            num(100.0 * ok as f64 / secs / capacity_rps, 1),
            busy.join(" / "),
            other,
            format!("{} / {}", p(&cls[0].lat_ok, 0.5), p(&cls[0].lat_ok, 0.99)),
            format!("{} / {}", p(&cls[2].lat_ok, 0.5), p(&cls[2].lat_ok, 0.99)),
            format!("{} / {}", p(&cls[0].wait, 0.5), p(&cls[0].wait, 0.99)),
        );
        let detail: Vec<String> = OVERLOAD_CLASSES
            .iter()
            .zip(&cls)
            .map(|(prio, t)| {
                format!(
                    "prio {prio}: {} reqs, 2xx {}%, wait p50/p99 {}/{} ms",
                    t.requests,
                    num(pct(t.ok, t.requests), 2),
                    p(&t.wait, 0.5),
                    p(&t.wait, 0.99)
                )
            })
            .collect();
        println!("   {:<34} {}", "", detail.join(" | "));
        if let Some(a) = rs.last().and_then(|r| r.admission.as_ref()) {
            println!("   {:<34} admission counters (last round): {a}", "");
        }
    }
    println!("   wait: $request_time minus the time at nodes ($upstream_response_time), i.e. the time queued in the gateway");
    println!("   targets for rsbalancer: goodput >= 95% of capacity, < 1% 429 for the top class");
}

// ------------------------------------------------------------------------------------

fn main() {
    install_signal_handlers();
    let o = Opts::parse();
    let budget = Duration::from_secs(env_num("RSB_BENCH_MAX_S", 1200.0) as u64);
    thread::spawn(move || {
        thread::sleep(budget);
        eprintln!("gateway bench: watchdog: {budget:?} passed, stopping");
        STOP.store(true, Ordering::SeqCst);
    });
    let env = Env::locate();
    let run = RunDir::new(&env, o.keep);
    let t0 = Instant::now();
    println!("gateway bench (benches/gateway.rs)");
    println!(
        "   {}; {} CPUs; load average {}; library snapshot of {}",
        env.nginx_version(),
        thread::available_parallelism().map_or(0, |n| n.get()),
        fs::read_to_string("/proc/loadavg")
            .map(|s| s.split(' ').take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_default(),
        env.lua_so.display()
    );
    println!(
        "   every nginx: worker_processes 2, 127.0.0.1, run dir {}",
        run.path.display()
    );
    if o.quick {
        println!("   QUICK run: short durations, one round; numbers are indicative only");
    }
    if o.overhead {
        overhead(&env, &run, &o);
    }
    if o.storm {
        storm(&env, &run, &o, "storm");
    }
    if o.defaults {
        storm(&env, &run, &o, "defaults");
    }
    if o.quota {
        storm(&env, &run, &o, "quota");
    }
    if o.metrics {
        metrics_overhead(&env, &run, &o);
    }
    if o.overload {
        overload(&env, &run, &o);
    }
    if o.openloop {
        open_loop::openloop(&env, &run, &o);
    }
    println!();
    println!("gateway bench: done in {:.0} s", t0.elapsed().as_secs_f64());
}

// ------------------------------------------------------------------------------------
// Scenario 6: open loop (Poisson arrivals at a fixed rate) over capacity, priority classes

mod open_loop {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};
    use std::collections::VecDeque;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Condvar;

    /// The classes: (X-Priority, share of the arrivals), top class first.
    const CLASSES: [(u32, f64); 3] = [(9, 0.2), (5, 0.3), (2, 0.5)];
    /// A request sent later than this after its arrival time counts as late.
    const LATE_US: u64 = 10_000;
    /// Connections (one thread each) opened before the first arrival.
    const PRESPAWN: usize = 64;

    /// The scenario's knobs (environment; `--quick` shortens the defaults).
    struct OpenOpts {
        /// Measured seconds per run (RSB_BENCH_OPEN_S).
        measure_s: f64,
        /// Offered load as a multiple of capacity (RSB_BENCH_OPEN_X).
        x: f64,
        /// Warm-up seconds before the measured phase, reported apart (RSB_BENCH_WARM_S).
        warm_s: f64,
        /// Rounds (RSB_BENCH_ROUNDS).
        rounds: usize,
        /// Longest wait for one response (RSB_BENCH_OPEN_TIMEOUT_S): an answer not
        /// complete by then counts as no answer; it also bounds the drain at the end.
        timeout: Duration,
        /// Most connections (= sender threads) open at once (RSB_BENCH_OPEN_CONNS).
        max_conns: usize,
        /// Keep the access and attempts logs (RSB_BENCH_KEEP).
        keep: bool,
        /// Nice value of the generator's threads (RSB_BENCH_OPEN_NICE, -10).
        nice: i32,
    }

    impl OpenOpts {
        fn from(o: &Opts) -> OpenOpts {
            let x = env_num("RSB_BENCH_OPEN_X", 1.5);
            assert!(x > 0.0 && x <= 20.0, "RSB_BENCH_OPEN_X={x}: expected 0 < x <= 20");
            OpenOpts {
                measure_s: env_num("RSB_BENCH_OPEN_S", if o.quick { 4.0 } else { 10.0 }).clamp(1.0, 600.0),
                x,
                warm_s: o.warm_s,
                rounds: o.rounds_storm.max(1),
                timeout: Duration::from_secs_f64(env_num("RSB_BENCH_OPEN_TIMEOUT_S", 15.0).clamp(1.0, 120.0)),
                max_conns: (env_num("RSB_BENCH_OPEN_CONNS", 2048.0) as usize).clamp(PRESPAWN, 8192),
                keep: o.keep,
                nice: env_num("RSB_BENCH_OPEN_NICE", -10.0).clamp(-20.0, 19.0) as i32,
            }
        }
    }

    /// One scheduled request: arrival time from the start (µs), class index.
    #[derive(Clone, Copy)]
    struct Arrival {
        at_us: u64,
        class: u8,
    }

    /// Poisson arrivals at `rate`/s over `secs`: exponential gaps, classes drawn with
    /// `CLASSES`' shares. Seeded, so every contender of a round gets the same sequence.
    fn poisson(rate: f64, secs: f64, seed: u64) -> Vec<Arrival> {
        let mut rng = SmallRng::seed_from_u64(seed);
        let cap = (rate * secs * 2.0) as usize + 1000;
        let mut out = Vec::with_capacity(cap / 2);
        let mut t = 0.0f64;
        while out.len() < cap {
            // 1 - U is in (0, 1]: ln never sees 0.
            t += -(1.0 - rng.random::<f64>()).ln() / rate;
            if t >= secs {
                break;
            }
            let u: f64 = rng.random();
            let (mut class, mut acc) = (CLASSES.len() - 1, 0.0);
            for (k, (_, share)) in CLASSES.iter().enumerate() {
                acc += share;
                if u < acc {
                    class = k;
                    break;
                }
            }
            out.push(Arrival {
                at_us: (t * 1e6) as u64,
                class: class as u8,
            });
        }
        out
    }

    /// Where a non-2xx answer came from.
    #[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
    enum Source {
        /// rsbalancer's admission (its `X-RSB-Admission` reason).
        Admission(String),
        /// A node's own answer, passed on by the gateway (it has `X-Node`).
        Node,
        /// nginx itself (no node answered, e.g. 502 "no live upstreams").
        Gateway,
    }

    impl Source {
        fn label(&self) -> String {
            match self {
                Source::Admission(r) => format!("admission {r}"),
                Source::Node => "a node's own".into(),
                Source::Gateway => "nginx".into(),
            }
        }
    }

    struct OpenSample {
        index: u32,
        /// 0: no answer (connect error, reset, timeout).
        status: u16,
        /// Send time minus scheduled arrival time, µs.
        lag_us: u64,
        /// When a sender took the request, minus its arrival time, µs: the generator's
        /// own lateness (the rest of `lag_us` is waiting for a new connection).
        pickup_us: u64,
        /// End of the response minus scheduled arrival time, µs.
        latency_us: u64,
        source: Source,
    }

    struct Generated {
        samples: Vec<OpenSample>,
        /// Sender threads (= connections) used.
        conns: usize,
        /// Arrivals that found every connection busy with `max_conns` open.
        starved: u64,
        /// Arrivals never sent (a stop was asked).
        unsent: usize,
        /// Arrivals the dispatcher itself queued > LATE_US late, and the worst lateness
        /// (µs): the dispatching thread did not run on time (a busy or stalled machine).
        dispatch_late: (u64, u64),
    }

    struct Jobs {
        queue: VecDeque<(u32, Instant)>,
        done: bool,
    }

    struct Shared {
        jobs: Mutex<Jobs>,
        ready: Condvar,
        /// Requests queued or being answered.
        busy: AtomicUsize,
        requests: Vec<Vec<u8>>,
        port: u16,
        timeout: Duration,
        /// Nice value of the generator's threads (0: as the process).
        nice: i32,
    }

    /// Sets the calling thread's nice value (Linux: per thread); returns the previous
    /// one. The generator is the reference clock: it runs at a higher priority (RSB_BENCH_OPEN_NICE,
    /// default -10; needs root or CAP_SYS_NICE, silently left as is otherwise) so that
    /// the gateway and nodes it loads, on the same 2 CPUs, delay its sends less. It uses
    /// little CPU (a few % of one core), so this takes little from anything else. With
    /// the kernel's autogroup on (sched_autogroup_enabled), nice only ranks threads of
    /// the same session: other sessions busy on the machine still delay the dispatcher
    /// (then reported as "queued late by the dispatcher").
    fn boost_thread(nice: i32) -> i32 {
        // SAFETY: gettid/getpriority/setpriority take no pointers; they act on this thread.
        unsafe {
            let tid = libc::gettid() as libc::id_t;
            let old = libc::getpriority(libc::PRIO_PROCESS, tid);
            if nice != old {
                libc::setpriority(libc::PRIO_PROCESS, tid, nice);
            }
            old
        }
    }

    /// One sender: a keep-alive connection (opened before its first job) and a loop that
    /// takes the next due request, sends it, reads the answer and records it. Stops when
    /// the queue is empty and the dispatcher is done (or a stop was asked).
    fn sender(sh: &Shared) -> Vec<OpenSample> {
        boost_thread(sh.nice);
        let mut out = Vec::new();
        let mut conn = Conn::open(sh.port, sh.timeout).ok();
        loop {
            let job = {
                let mut j = sh.jobs.lock().unwrap();
                loop {
                    if let Some(job) = j.queue.pop_front() {
                        break Some(job);
                    }
                    if j.done || stopping() {
                        break None;
                    }
                    j = sh.ready.wait_timeout(j, Duration::from_millis(100)).unwrap().0;
                }
            };
            let Some((index, due)) = job else { break };
            let taken = Instant::now();
            if conn.is_none() {
                conn = Conn::open(sh.port, sh.timeout).ok();
            }
            let sent = Instant::now();
            let answer = conn
                .as_mut()
                .map(|c| c.round_trip(&sh.requests[index as usize], true));
            let (status, source) = match answer {
                Some(Ok(r)) => {
                    if r.close {
                        conn = None;
                    }
                    let source = match (r.header("X-RSB-Admission"), r.header("X-Node")) {
                        (Some(reason), _) => Source::Admission(reason.to_string()),
                        (None, Some(_)) => Source::Node,
                        (None, None) => Source::Gateway,
                    };
                    (r.status, source)
                }
                _ => {
                    conn = None;
                    (0, Source::Gateway)
                }
            };
            out.push(OpenSample {
                index,
                status,
                lag_us: sent.saturating_duration_since(due).as_micros() as u64,
                pickup_us: taken.saturating_duration_since(due).as_micros() as u64,
                latency_us: due.elapsed().as_micros() as u64,
                source,
            });
            sh.busy.fetch_sub(1, Ordering::SeqCst);
        }
        out
    }

    /// The open-loop generator. The calling thread is the dispatcher: it sleeps until
    /// each arrival's time, queues the request and wakes a sender; it never waits for a
    /// response. A sender holds one request at a time, so whenever more requests are
    /// queued or in progress than there are senders, the dispatcher starts one more
    /// (with its own connection) at once: a request due is sent on time however many
    /// earlier ones are still unanswered, up to `max_conns` connections (beyond that an
    /// arrival waits for a free sender and counts as `starved`). Each sample's latency
    /// runs from the scheduled arrival time, not from the send; `lag_us` says how late
    /// the send was. Bounded: the schedule is finite, a response takes at most
    /// `timeout`, and senders exit once the queue is drained.
    fn generate(port: u16, arrivals: &[Arrival], requests: Vec<Vec<u8>>, oo: &OpenOpts) -> Generated {
        let sh = Arc::new(Shared {
            jobs: Mutex::new(Jobs {
                queue: VecDeque::new(),
                done: false,
            }),
            ready: Condvar::new(),
            busy: AtomicUsize::new(0),
            requests,
            port,
            timeout: oo.timeout,
            nice: oo.nice,
        });
        let nice_before = boost_thread(oo.nice);
        let spawn = |n: usize| {
            let sh = sh.clone();
            thread::Builder::new()
                .name(format!("open-{n}"))
                .stack_size(128 * 1024)
                .spawn(move || sender(&sh))
                .expect("spawn sender thread")
        };
        let mut senders: Vec<_> = (0..PRESPAWN).map(spawn).collect();
        // Let the pre-started senders connect.
        thread::sleep(Duration::from_millis(200));
        let t0 = Instant::now() + Duration::from_millis(20);
        let (mut starved, mut sent, mut dispatch_late) = (0u64, 0usize, (0u64, 0u64));
        for (i, a) in arrivals.iter().enumerate() {
            let due = t0 + Duration::from_micros(a.at_us);
            let now = Instant::now();
            if due > now {
                thread::sleep(due - now);
            }
            if stopping() {
                break;
            }
            sh.jobs.lock().unwrap().queue.push_back((i as u32, due));
            let late = due.elapsed().as_micros() as u64;
            if late > LATE_US {
                dispatch_late.0 += 1;
            }
            dispatch_late.1 = dispatch_late.1.max(late);
            let busy = sh.busy.fetch_add(1, Ordering::SeqCst) + 1;
            if busy > senders.len() {
                if senders.len() < oo.max_conns {
                    senders.push(spawn(senders.len()));
                } else {
                    starved += 1;
                }
            }
            sh.ready.notify_one();
            sent += 1;
        }
        boost_thread(nice_before);
        sh.jobs.lock().unwrap().done = true;
        sh.ready.notify_all();
        let conns = senders.len();
        let mut samples = Vec::with_capacity(sent);
        for h in senders {
            samples.extend(h.join().expect("sender thread panicked"));
        }
        Generated {
            samples,
            conns,
            starved,
            unsent: arrivals.len() - sent,
            dispatch_late,
        }
    }

    /// Figures of one class (or of all) in one run's measured phase.
    #[derive(Default, Clone)]
    struct ClassFig {
        offered: u64,
        ok: u64,
        /// 2xx answers completed in the measured window, whenever they arrived (the
        /// goodput: arrivals of the window may be served after it, warm-up ones in it).
        ok_in_window: u64,
        s5xx: u64,
        s429: u64,
        /// Neither 2xx, 429 nor 5xx, or no answer at all.
        other: u64,
        /// End-to-end latency of the 2xx answers, µs.
        lat_ok: Vec<u64>,
        /// End-to-end latency of the other answers, µs.
        lat_bad: Vec<u64>,
        /// Time in the gateway outside any node of the 2xx answers, µs.
        wait: Vec<u64>,
    }

    /// Non-2xx answers of one kind: how many per class, and the statuses of their tries
    /// at the nodes (the nodes' own log), e.g. "429 429" -> count; "" = no try.
    #[derive(Default, Clone)]
    struct NonOk {
        per_class: [u64; CLASSES.len()],
        tries: BTreeMap<String, u64>,
    }

    struct OpenRun {
        /// Per class, then all classes together (last).
        classes: Vec<ClassFig>,
        measure_s: f64,
        lag: Vec<u64>,
        /// Lateness of the senders' pickups (sorted).
        pickup: Vec<u64>,
        /// CPU of the gateway's workers while the load ran, % of one CPU.
        gw_cpu: f64,
        dispatch_late: (u64, u64),
        conns: usize,
        starved: u64,
        unsent: usize,
        /// Non-2xx answers of the measured phase by (status, source).
        non2xx: BTreeMap<(u16, Source), NonOk>,
        gw_errors: Vec<String>,
        admission: Option<Value>,
    }

    fn is_rsb(k: &Kind) -> bool {
        !matches!(k, Kind::Native { .. } | Kind::Seed { .. })
    }

    /// The request bytes of each arrival: POST chat completion with X-Bench-Id
    /// "<tag>.<w|m>.<class>.<index>" and X-Priority of its class.
    fn requests(port: u16, tag: &str, arrivals: &[Arrival], warm_us: u64) -> Vec<Vec<u8>> {
        arrivals
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let phase = if a.at_us < warm_us { 'w' } else { 'm' };
                let id = format!("{tag}.{phase}.{}.{i}", a.class);
                let mut req = request_bytes("POST", "/v1/chat/completions", port, &id, CHAT_BODY);
                let at = req.windows(2).position(|w| w == b"\r\n").map_or(0, |i| i + 2);
                let h = format!("X-Priority: {}\r\n", CLASSES[a.class as usize].0);
                req.splice(at..at, h.bytes());
                req
            })
            .collect()
    }

    fn run_one(
        env: &Env,
        run: &RunDir,
        c: &Contender,
        ci: usize,
        round: usize,
        arrivals: &[Arrival],
        oo: &OpenOpts,
    ) -> OpenRun {
        check_stop();
        let inst = format!("openloop-r{round}-c{ci}");
        let (mut mocks, nodes, attempts_log, mut gw, port) =
            start_over_capacity(env, run, &inst, &overload_nodes(), c);
        let tag = format!("ol{round}c{ci}");
        let warm_us = (oo.warm_s * 1e6) as u64;
        let end_us = ((oo.warm_s + oo.measure_s) * 1e6) as u64;
        let (cpu0, t0) = (gw.workers_cpu(), Instant::now());
        let g = generate(port, arrivals, requests(port, &tag, arrivals, warm_us), oo);
        let gw_cpu = 100.0 * (gw.workers_cpu() - cpu0) / t0.elapsed().as_secs_f64();
        check_stop();
        let admission = is_rsb(&c.kind)
            .then(|| get_status(port).and_then(|v| v.pointer("/pools/llm/admission").cloned()))
            .flatten();
        // Every request was answered or timed out; give the buffered access log a flush.
        thread::sleep(Duration::from_millis(300));
        let gw_errors = gw.error_lines();
        gw.stop();
        mocks.stop();
        let log = run.path.join(format!("{inst}-gw-access.log"));
        let waits = read_waits(&log);
        let attempts = read_attempts(&attempts_log, &nodes);
        let mut classes = vec![ClassFig::default(); CLASSES.len() + 1];
        let mut non2xx = BTreeMap::new();
        let mut lag = Vec::with_capacity(g.samples.len());
        let mut pickup = Vec::with_capacity(g.samples.len());
        for s in &g.samples {
            let a = arrivals[s.index as usize];
            lag.push(s.lag_us);
            pickup.push(s.pickup_us);
            let done_us = a.at_us + s.latency_us;
            if (200..300).contains(&s.status) && done_us >= warm_us && done_us < end_us {
                classes[a.class as usize].ok_in_window += 1;
                classes[CLASSES.len()].ok_in_window += 1;
            }
            if a.at_us < warm_us {
                continue;
            }
            let id = format!("{tag}.m.{}.{}", a.class, s.index);
            for k in [a.class as usize, CLASSES.len()] {
                let cf = &mut classes[k];
                cf.offered += 1;
                match s.status {
                    200..=299 => {
                        cf.ok += 1;
                        cf.lat_ok.push(s.latency_us);
                        if let Some(&w) = waits.get(&id) {
                            cf.wait.push(w);
                        }
                        continue;
                    }
                    429 => cf.s429 += 1,
                    500..=599 => cf.s5xx += 1,
                    _ => cf.other += 1,
                }
                cf.lat_bad.push(s.latency_us);
            }
            if !(200..300).contains(&s.status) {
                let e: &mut NonOk = non2xx.entry((s.status, s.source.clone())).or_default();
                e.per_class[a.class as usize] += 1;
                let tries: Vec<String> = attempts
                    .get(&id)
                    .into_iter()
                    .flatten()
                    .map(|(_, st)| st.to_string())
                    .collect();
                *e.tries.entry(tries.join(" ")).or_insert(0) += 1;
            }
        }
        for cf in &mut classes {
            cf.lat_ok.sort_unstable();
            cf.lat_bad.sort_unstable();
            cf.wait.sort_unstable();
        }
        lag.sort_unstable();
        pickup.sort_unstable();
        if !oo.keep {
            let _ = fs::remove_file(&attempts_log);
            let _ = fs::remove_file(&log);
        }
        OpenRun {
            classes,
            measure_s: oo.measure_s,
            lag,
            pickup,
            gw_cpu,
            dispatch_late: g.dispatch_late,
            conns: g.conns,
            starved: g.starved,
            unsent: g.unsent,
            non2xx,
            gw_errors,
            admission,
        }
    }

    /// The contenders: the baselines of the other over-capacity scenarios, then one
    /// entry per rsbalancer configuration (another mode is one more entry).
    fn contenders(o: &Opts) -> Vec<Contender> {
        let mut v = baselines(o);
        v.extend([
            Contender {
                label: "rsbalancer + admission",
                kind: Kind::RsbQueue { increase_every: 4 },
            },
            // Rare AIMD probes (the advice for nodes of fixed capacity): tells what the
            // refused probes cost (their retries, the 502s of a retry with no node).
            Contender {
                label: "rsbalancer + adm., incr_every 100",
                kind: Kind::RsbQueue { increase_every: 100 },
            },
        ]);
        v
    }

    /// Success share per class when a gateway serves capacity strictly by priority:
    /// the top class first, what is left to the next.
    fn ideal_success(x: f64) -> Vec<f64> {
        let mut left = 1.0;
        CLASSES
            .iter()
            .map(|(_, share)| {
                let offered = x * share;
                let served = offered.min(left);
                left -= served;
                100.0 * served / offered
            })
            .collect()
    }

    /// An error-log line without its time, pid, connection number and request details:
    /// what to count alike lines by.
    fn error_key(line: &str) -> String {
        let msg = line.split_once("]: ").map_or(line, |(_, m)| m);
        let msg = msg
            .split_once("*")
            .map_or(msg, |(_, m)| m.split_once(' ').map_or(m, |(_, r)| r));
        let msg = msg.split(", client: ").next().unwrap_or(msg);
        let level = line.split(' ').nth(2).unwrap_or("");
        format!("{level} {msg}")
    }

    fn med(runs: &[OpenRun], g: impl Fn(&OpenRun) -> f64) -> f64 {
        let mut v: Vec<f64> = runs.iter().map(g).collect();
        median(&mut v)
    }

    fn report(label: &str, runs: &[OpenRun], capacity: f64, oo: &OpenOpts) {
        let ideal = ideal_success(oo.x);
        let ms = |v: &[u64], q: f64| percentile(v, q) / 1000.0;
        let lag_p99 = med(runs, |r| ms(&r.lag, 0.99));
        let lag_max = runs.iter().map(|r| ms(&r.lag, 1.0)).fold(f64::NAN, f64::max);
        let late: usize = runs
            .iter()
            .map(|r| r.lag.iter().filter(|&&l| l > LATE_US).count())
            .sum();
        let late_pickup: usize = runs
            .iter()
            .map(|r| r.pickup.iter().filter(|&&l| l > LATE_US).count())
            .sum();
        let sends: usize = runs.iter().map(|r| r.lag.len()).sum();
        let dispatch_late: u64 = runs.iter().map(|r| r.dispatch_late.0).sum();
        let dispatch_max = runs.iter().map(|r| r.dispatch_late.1).max().unwrap_or(0);
        let starved: u64 = runs.iter().map(|r| r.starved).sum();
        let unsent: usize = runs.iter().map(|r| r.unsent).sum();
        let conns = runs.iter().map(|r| r.conns).max().unwrap_or(0);
        let offered = med(runs, |r| r.classes[CLASSES.len()].offered as f64 / r.measure_s);
        println!();
        println!(
            "   {label}: offered {offered:.1} req/s ({:.2} x capacity), gw CPU {}%; generator: send lag p99 {} ms, max {} ms, {late} of {sends} sent > {} ms late ({late_pickup} picked up late, {dispatch_late} of them queued late by the dispatcher, worst {} ms; the rest waited for a new connection), {conns} connections at most{}",
            offered / capacity,
            num(med(runs, |r| r.gw_cpu), 0),
            num(lag_p99, 2),
            num(lag_max, 1),
            LATE_US / 1000,
            num(dispatch_max as f64 / 1000.0, 1),
            if starved > 0 || unsent > 0 {
                format!(", {starved} found no free connection, {unsent} never sent")
            } else {
                String::new()
            }
        );
        if starved > 0 || unsent > 0 || late_pickup * 100 > sends {
            println!("   ! the generator fell behind its schedule (> 1% picked up late): the offered rate above is not what the gateway saw on time");
        } else if late * 100 > sends {
            println!("   ! > 1% of the sends waited > {} ms for a new connection (the gateway accepted slowly; the wait counts in e2e)", LATE_US / 1000);
        }
        println!(
            "     {:<8} {:>9} {:>17} {:>5} {:>7} {:>6} {:>10} {:>17} {:>17} {:>13}",
            "class",
            "offered/s",
            "2xx % [ideal]",
            "5xx",
            "429 %",
            "other",
            "goodput",
            "e2e p50/p99 ms",
            "wait p50/p99 ms",
            "non-2xx p50"
        );
        for k in 0..=CLASSES.len() {
            let name = if k < CLASSES.len() {
                format!("prio {}", CLASSES[k].0)
            } else {
                "all".to_string()
            };
            let cf = |r: &OpenRun| r.classes[k].clone();
            let ok = med(runs, |r| pct(cf(r).ok, cf(r).offered));
            let goodput = med(runs, |r| {
                100.0 * r.classes[k].ok_in_window as f64 / r.measure_s / capacity
            });
            let s5xx: u64 = runs.iter().map(|r| r.classes[k].s5xx).sum();
            let other: u64 = runs.iter().map(|r| r.classes[k].other).sum();
            let idl = if k < CLASSES.len() {
                ideal[k]
            } else {
                100.0 * oo.x.min(1.0) / oo.x
            };
            println!(
                "     {:<8} {:>9.1} {:>17} {:>5} {:>7} {:>6} {:>9}% {:>17} {:>17} {:>13}",
                name,
                med(runs, |r| r.classes[k].offered as f64 / r.measure_s),
                format!("{} [{:.1}]", num(ok, 2), idl),
                s5xx,
                num(med(runs, |r| pct(r.classes[k].s429, r.classes[k].offered)), 1),
                other,
                num(goodput, 1),
                format!(
                    "{} / {}",
                    num(med(runs, |r| ms(&r.classes[k].lat_ok, 0.5)), 0),
                    num(med(runs, |r| ms(&r.classes[k].lat_ok, 0.99)), 0)
                ),
                format!(
                    "{} / {}",
                    num(med(runs, |r| ms(&r.classes[k].wait, 0.5)), 0),
                    num(med(runs, |r| ms(&r.classes[k].wait, 0.99)), 0)
                ),
                num(med(runs, |r| ms(&r.classes[k].lat_bad, 0.5)), 0),
            );
        }
        // Against the targets.
        let top_ok = med(runs, |r| pct(r.classes[0].ok, r.classes[0].offered));
        let top_5xx: u64 = runs.iter().map(|r| r.classes[0].s5xx).sum();
        let refused: Vec<f64> = (0..CLASSES.len())
            .map(|k| med(runs, |r| 100.0 - pct(r.classes[k].ok, r.classes[k].offered)))
            .collect();
        // The low class's part of all non-2xx answers (a gateway without priorities:
        // about its share of the arrivals; shedding strictly by priority: 100%).
        let low = CLASSES.len() - 1;
        let low_part = med(runs, |r| {
            let bad = |k: usize| r.classes[k].offered - r.classes[k].ok;
            pct(bad(low), bad(CLASSES.len()))
        });
        let low_first = refused.windows(2).all(|w| w[0] <= w[1]) && low_part >= 90.0;
        let goodput = med(runs, |r| {
            100.0 * r.classes[CLASSES.len()].ok_in_window as f64 / r.measure_s / capacity
        });
        let yes = |b: bool| if b { "yes" } else { "NO" };
        let per_round = |g: &dyn Fn(&OpenRun) -> f64, prec: usize| -> String {
            runs.iter()
                .map(|r| num(g(r), prec))
                .collect::<Vec<_>>()
                .join(" / ")
        };
        println!(
            "     per round: top class 2xx % {}; 5xx {}; goodput % {}",
            per_round(&|r| pct(r.classes[0].ok, r.classes[0].offered), 2),
            per_round(&|r| r.classes[CLASSES.len()].s5xx as f64, 0),
            per_round(
                &|r| 100.0 * r.classes[CLASSES.len()].ok_in_window as f64 / r.measure_s / capacity,
                1
            ),
        );
        let refused_s: Vec<String> = refused.iter().map(|v| num(*v, 1)).collect();
        println!(
            "     targets: top class >= 99.9% 2xx and no 5xx: {} ({}%, {top_5xx}); low class shed first (non-2xx % top <= mid <= low, low's part of all non-2xx >= 90%): {} ({}; {}%); goodput >= 97% of capacity: {} ({}%)",
            yes(top_ok >= 99.9 && top_5xx == 0),
            num(top_ok, 2),
            yes(low_first),
            refused_s.join(" / "),
            num(low_part, 1),
            yes(goodput >= 97.0),
            num(goodput, 1)
        );
        // Non-2xx by status and source, all rounds, per class.
        let mut non2xx: BTreeMap<(u16, Source), NonOk> = BTreeMap::new();
        for r in runs {
            for (k, v) in &r.non2xx {
                let t = non2xx.entry(k.clone()).or_default();
                for (t, v) in t.per_class.iter_mut().zip(v.per_class) {
                    *t += v;
                }
                for (seq, n) in &v.tries {
                    *t.tries.entry(seq.clone()).or_insert(0) += n;
                }
            }
        }
        if !non2xx.is_empty() {
            println!(
                "     non-2xx answers, all {} round(s), by status and source: count (top / mid / low), the statuses of their tries at the nodes",
                runs.len()
            );
            for ((st, src), n) in &non2xx {
                let what = if *st == 0 {
                    "no answer (reset, timeout)".to_string()
                } else {
                    format!("{st} {}", src.label())
                };
                let per: Vec<String> = n.per_class.iter().map(u64::to_string).collect();
                let mut tries: Vec<(&String, &u64)> = n.tries.iter().collect();
                tries.sort_by_key(|t| std::cmp::Reverse(*t.1));
                let mut tries: Vec<String> = tries
                    .iter()
                    .take(4)
                    .map(|(seq, c)| format!("{} x{c}", if seq.is_empty() { "no try" } else { seq }))
                    .collect();
                if n.tries.len() > 4 {
                    tries.push("...".into());
                }
                println!(
                    "       {what:<28} {:>6} ({:>15}): {}",
                    n.per_class.iter().sum::<u64>(),
                    per.join(" / "),
                    tries.join(", ")
                );
            }
        }
        // Error-log lines ([error] and worse), alike lines counted together, with one
        // whole line of each kind (which request, which upstream).
        let mut errs: BTreeMap<String, (u64, &str)> = BTreeMap::new();
        for l in runs.iter().flat_map(|r| r.gw_errors.iter()) {
            errs.entry(error_key(l)).or_insert((0, l)).0 += 1;
        }
        let mut errs: Vec<(String, (u64, &str))> = errs.into_iter().collect();
        errs.sort_by_key(|e| std::cmp::Reverse(e.1 .0));
        for (msg, (n, example)) in errs.iter().take(4) {
            println!("     gateway error log: {n} x {msg}");
            println!("       e.g. {}", example.chars().take(300).collect::<String>());
        }
        if errs.len() > 4 {
            println!("     gateway error log: {} more kinds of line", errs.len() - 4);
        }
        if let Some(a) = runs.last().and_then(|r| r.admission.as_ref()) {
            println!("     admission counters (last round, warm-up included): {a}");
        }
    }

    pub(super) fn openloop(env: &Env, run: &RunDir, o: &Opts) {
        let oo = OpenOpts::from(o);
        let specs = overload_nodes();
        let slots: u32 = specs.iter().map(|s| s.max_conc).sum();
        let capacity = slots as f64 * 1000.0 / OVERLOAD_LATENCY_MS as f64;
        let rate = oo.x * capacity;
        let contenders = contenders(o);
        let shares: Vec<String> = CLASSES
            .iter()
            .map(|(p, s)| format!("{:.0}% prio {p}", 100.0 * s))
            .collect();
        println!();
        println!(
            "== 6. open loop: caps a=8 b=16 c=8 ({OVERLOAD_LATENCY_MS} ms each, 429 over the cap) = {slots} slots = {capacity:.0} req/s; Poisson arrivals at {rate:.0} req/s = {} x capacity; {}",
            oo.x,
            shares.join(", ")
        );
        println!(
            "   POST /v1/chat/completions, X-Priority per class; each request sent at its arrival time on an idle keep-alive connection (a new one when none is idle), latency from the arrival time;"
        );
        println!(
            "   warm-up {:.0} s + {:.0} s measured; {} round(s), the same arrivals for every contender of a round, fresh nodes and gateway per run; responses time out after {:.0} s",
            oo.warm_s,
            oo.measure_s,
            oo.rounds,
            oo.timeout.as_secs_f64()
        );
        println!("   rsbalancer: admission classes 1-3 max wait 1 s, 4-7 5 s, 8-10 30 s (as in `overload`)");
        let before = boost_thread(oo.nice);
        let got = boost_thread(before);
        println!(
            "   generator threads at nice {got} (RSB_BENCH_OPEN_NICE={}; the process: {before}); gw CPU: the gateway workers' CPU time over the run, in % of one CPU",
            oo.nice
        );
        let mut runs: Vec<Vec<OpenRun>> = contenders.iter().map(|_| Vec::new()).collect();
        for round in 0..oo.rounds {
            let arrivals = poisson(rate, oo.warm_s + oo.measure_s, 0x6f70_656e + round as u64);
            for k in 0..contenders.len() {
                let i = (k + round) % contenders.len();
                runs[i].push(run_one(env, run, &contenders[i], i, round, &arrivals, &oo));
            }
        }
        println!();
        println!(
            "   measured phase, median over rounds (5xx and other: counts over all rounds); [ideal]: a gateway serving capacity strictly by priority;"
        );
        println!("   goodput: 2xx answers completed in the measured window per second, as % of capacity; e2e: 2xx answers, from the scheduled arrival to the end of the answer; wait: 2xx answers, $request_time minus the");
        println!("   $upstream_response_times (time in the gateway outside any node); non-2xx p50: e2e ms of the other answers (how fast a refusal comes)");
        for (i, c) in contenders.iter().enumerate() {
            report(c.label, &runs[i], capacity, &oo);
        }
    }
}
