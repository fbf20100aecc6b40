//! Support for the nginx end-to-end tests (`tests/nginx.rs`, `make test-nginx`).
//!
//! - Locating what the tests need: nginx (`$NGINX`, `/usr/sbin/nginx` or `PATH`), its
//!   lua modules (`$NGINX_MODULES`, default `/usr/lib/nginx/modules`) and the Lua module
//!   `rsbalancer.so` (`$RSB_LUA_SO`, else `build/lib/rsbalancer.so` of this checkout).
//!   A missing piece PANICS with what to do: a test that needs nginx fails loudly, it
//!   never passes or skips.
//! - [`TestDir`]: a scratch directory for rendered configs, logs and pid files; kept
//!   (and its path printed) when the test panics, removed otherwise.
//! - [`Nginx`]: one nginx started in the foreground (`daemon off; master_process on;`)
//!   as a child of the test. Dropping it (also while a test panics) stops the master,
//!   escalating SIGTERM -> SIGKILL, and SIGKILLs any worker left behind, so no nginx
//!   outlives a test; should the test process itself be killed, the master gets SIGTERM
//!   (PR_SET_PDEATHSIG).
//! - Configs: the mock LLM nodes are `nginx-conf/demo/lua/mock_llm.lua` in servers
//!   written by [`start_mocks`]; the gateway is the demo template
//!   `nginx-conf/demo/gateway.conf`, rendered by [`start_gateway`], so the tests run the
//!   configuration `make run` ships.
//! - A minimal HTTP/1.1 client over `std::net::TcpStream` ([`http`], [`get`], [`post`],
//!   one request per connection) and [`run_parallel`].
//!
//! Privileges: nginx started as root runs its workers as `nobody`, which may not be able
//! to read a checkout under a 0700 home. When the tests run as root the configs say
//! `user root;` (workers keep root's rights; everything listens on 127.0.0.1 only); as
//! any other user no `user` line is written and the workers run as that user. Either
//! way the workers can read the checkout and write the scratch directory.

#![allow(dead_code)] // each test binary uses a different part

use std::fmt::Write as _;
use std::fs;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod consul;
pub mod dnsmasq;
pub mod fleet;
mod proc;
pub mod redis;
pub mod webhook;
pub use proc::*;

/// The checkout (where Cargo.toml is).
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The nginx binary: `$NGINX`, `/usr/sbin/nginx`, or `nginx` on `PATH`. Panics if none.
pub fn nginx_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("NGINX") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "NGINX={} is not a file", p.display());
        return p;
    }
    let mut candidates = vec![PathBuf::from("/usr/sbin/nginx")];
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("nginx")));
    }
    candidates.into_iter().find(|p| p.is_file()).unwrap_or_else(|| {
        panic!(
            "nginx not found (tried $NGINX, /usr/sbin/nginx and PATH): the nginx end-to-end \
             tests need it. Install it with `make deps` (Debian 12: nginx-core \
             libnginx-mod-http-lua lua-resty-core luajit2)."
        )
    })
}

/// nginx's module directory, holding the NDK and lua modules. Panics if they are missing.
pub fn nginx_modules() -> PathBuf {
    let dir = std::env::var_os("NGINX_MODULES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/nginx/modules"));
    for m in ["ndk_http_module.so", "ngx_http_lua_module.so"] {
        assert!(
            dir.join(m).is_file(),
            "{} not found: the nginx tests need lua-nginx-module (Debian: `make deps` installs \
             libnginx-mod-http-lua); set NGINX_MODULES to another module directory",
            dir.join(m).display()
        );
    }
    dir
}

/// The Lua module: `$RSB_LUA_SO`, else `build/lib/rsbalancer.so`. Panics if missing.
pub fn lua_so() -> PathBuf {
    let path = match std::env::var_os("RSB_LUA_SO") {
        Some(p) => PathBuf::from(p),
        None => repo().join("build/lib/rsbalancer.so"),
    };
    assert!(
        path.is_file(),
        "the Lua module {} is missing: run `make build` (or `make test-nginx`, which sets \
         RSB_LUA_SO) before these tests",
        path.display()
    );
    path.canonicalize().expect("canonical path of the Lua module")
}

/// Polls `cond` every 20 ms until it holds; panics with `what` after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ----------------------------------------------------------------------------------
// Scratch directories

/// A scratch directory under the system temp dir, world-readable (0755) so that nginx
/// workers running as another user can still read it.
pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    pub fn new(name: &str) -> TestDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "rsb-nginx-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(path.join("tmp")).expect("create test dir");
        set_mode(&path, 0o755);
        TestDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `contents` to `name` inside the directory; returns the full path.
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let p = self.path.join(name);
        fs::write(&p, contents).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        set_mode(&p, 0o644);
        p
    }

    /// A directory holding a private copy of the Lua module as `rsbalancer.so` (the name
    /// `package.cpath` looks for). A copy, so that a rebuild during a test run cannot
    /// change the code under a running nginx: overwriting a mapped .so in place (`cp`)
    /// kills the processes that map it with SIGBUS, as seen here once.
    pub fn lib_dir(&self) -> PathBuf {
        let dir = self.path.join("lib");
        let so = dir.join("rsbalancer.so");
        if !so.exists() {
            fs::create_dir_all(&dir).expect("create lib dir");
            let tmp = dir.join("rsbalancer.so.tmp");
            fs::copy(lua_so(), &tmp).expect("copy the Lua module");
            fs::rename(&tmp, &so).expect("rename the Lua module");
        }
        dir
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("test failed: configs and logs kept in {}", self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

fn set_mode(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let _ = fs::set_permissions(p, fs::Permissions::from_mode(mode));
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The `user` line of a config: see the module documentation.
pub fn user_line() -> &'static str {
    if is_root() {
        "user root;"
    } else {
        ""
    }
}

// ----------------------------------------------------------------------------------
// nginx processes

/// One nginx (master + workers) started by a test; stopped on drop.
pub struct Nginx {
    name: String,
    child: Option<Child>,
    prefix: PathBuf,
    conf: PathBuf,
    /// The error_log file the config names.
    error_log: PathBuf,
    stderr: PathBuf,
}

/// `nginx -p <prefix> -c <conf> ...` with stderr in `<prefix>/<name>.stderr`.
fn nginx_command(prefix: &Path, conf: &Path) -> Command {
    let mut cmd = Command::new(nginx_bin());
    cmd.arg("-p").arg(prefix).arg("-c").arg(conf);
    cmd
}

/// `nginx -t` on a config; returns the process output (status, stderr).
pub fn nginx_test_config(prefix: &Path, conf: &Path) -> Output {
    nginx_command(prefix, conf)
        .arg("-t")
        .stdin(Stdio::null())
        .output()
        .expect("run nginx -t")
}

/// Starts nginx with `conf` expecting it to refuse: returns its exit status and stderr.
/// Panics if it is still running after 15 s (it accepted the config).
pub fn nginx_start_expecting_failure(dir: &TestDir, conf: &Path) -> (std::process::ExitStatus, String) {
    let stderr_path = dir.path().join("refused.stderr");
    let mut child = nginx_command(dir.path(), conf)
        .arg("-g")
        .arg("daemon off; master_process on;")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&stderr_path).expect("create stderr file"))
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", nginx_bin().display()));
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return (status, fs::read_to_string(&stderr_path).unwrap_or_default());
        }
        if start.elapsed() > Duration::from_secs(15) {
            let master = child.id() as i32;
            signal(master, libc::SIGTERM);
            let _ = child.wait();
            panic!(
                "nginx accepted {} and kept running; stderr:\n{}",
                conf.display(),
                fs::read_to_string(&stderr_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Nginx {
    /// Starts `conf` (a file in `dir`) and waits until every port in `ports` accepts
    /// connections. `error_log` is the file the config logs to (for diagnostics).
    pub fn start(dir: &TestDir, name: &str, conf: &Path, error_log: &Path, ports: &[u16]) -> Nginx {
        let stderr = dir.path().join(format!("{name}.stderr"));
        let mut cmd = nginx_command(dir.path(), conf);
        // Should the test process die without running destructors (killed, aborted), the
        // master gets SIGTERM and stops its workers. (The signal comes when the spawning
        // thread ends: every test drops its nginx before that.)
        // SAFETY: prctl and getppid are async-signal-safe; nothing else runs in the child.
        let parent = std::process::id() as libc::pid_t;
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::getppid() != parent {
                    return Err(io::Error::other("parent already exited"));
                }
                Ok(())
            });
        }
        let child = cmd
            .arg("-g")
            .arg("daemon off; master_process on;")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&stderr).expect("create stderr file"))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", nginx_bin().display()));
        let mut n = Nginx {
            name: name.to_string(),
            child: Some(child),
            prefix: dir.path().to_path_buf(),
            conf: conf.to_path_buf(),
            error_log: error_log.to_path_buf(),
            stderr,
        };
        let start = Instant::now();
        for &port in ports {
            while !port_open(port) {
                if let Some(status) = n.child.as_mut().unwrap().try_wait().expect("try_wait") {
                    n.child = None;
                    panic!(
                        "{name} nginx exited ({status}) before listening on {port}\n{}",
                        n.diagnostics()
                    );
                }
                if start.elapsed() > Duration::from_secs(15) {
                    panic!(
                        "{name} nginx does not listen on {port} after 15 s\n{}",
                        n.diagnostics()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        n
    }

    /// The master's pid.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("nginx running").id() as i32
    }

    /// Live workers (not those shutting down after a reload), sorted.
    pub fn workers(&self) -> Vec<i32> {
        children(self.pid())
            .into_iter()
            .filter(|(_, cmd)| cmd.starts_with("nginx: worker process") && !cmd.contains("shutting down"))
            .map(|(pid, _)| pid)
            .collect()
    }

    /// Waits until `n` live workers run, none of them in `not`; returns them.
    pub fn wait_workers(&self, n: usize, not: &[i32]) -> Vec<i32> {
        let mut w = Vec::new();
        wait_until(
            Duration::from_secs(15),
            &format!("{} workers of {}", n, self.name),
            || {
                w = self.workers();
                w.len() == n && w.iter().all(|p| !not.contains(p))
            },
        );
        w
    }

    pub fn signal(&self, sig: i32) {
        signal(self.pid(), sig);
    }

    /// The error log so far.
    pub fn error_log(&self) -> String {
        fs::read_to_string(&self.error_log).unwrap_or_default()
    }

    pub fn error_log_path(&self) -> &Path {
        &self.error_log
    }

    pub fn conf(&self) -> &Path {
        &self.conf
    }

    pub fn prefix(&self) -> &Path {
        &self.prefix
    }

    /// stderr and the tail of the error log, for panic messages.
    pub fn diagnostics(&self) -> String {
        let stderr = fs::read_to_string(&self.stderr).unwrap_or_default();
        let log = self.error_log();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        format!(
            "--- {} stderr ({}):\n{stderr}--- {} error log tail ({}):\n{}",
            self.name,
            self.stderr.display(),
            self.name,
            self.error_log.display(),
            tail.join("\n")
        )
    }

    /// Stops nginx: SIGTERM (fast shutdown: the master stops its workers and exits),
    /// SIGKILL after 5 s, then SIGKILL for any worker left behind. Idempotent.
    pub fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            stop_nginx(child, &self.name);
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if std::thread::panicking() && self.child.is_some() {
            eprintln!("{}", self.diagnostics());
        }
        self.stop();
    }
}

// ----------------------------------------------------------------------------------
// Mock LLM nodes

/// One mock node: a server block running `mock_llm.lua` (knobs documented there).
#[derive(Clone, Debug)]
pub struct MockNode {
    pub name: String,
    pub port: u16,
    pub latency_ms: u32,
    pub chunk_ms: u32,
    pub max_conc: u32,
    pub retry_after: u32,
    /// Tokens per second (fractions allowed).
    pub quota_rps: f64,
    pub quota_burst: u32,
    /// "", "503" or "close".
    pub fail: String,
    /// Appended to the server's `listen` (" ssl").
    pub listen_extra: String,
    /// Directives in the server block (`ssl_certificate ...;`, `set $mock_require_key k;`).
    pub server_extra: String,
}

impl MockNode {
    /// A healthy node on a fresh port, answering after `latency_ms`.
    pub fn new(name: &str, latency_ms: u32) -> MockNode {
        MockNode {
            name: name.to_string(),
            port: free_port(),
            latency_ms,
            chunk_ms: 5,
            max_conc: 0,
            retry_after: 0,
            quota_rps: 0.0,
            quota_burst: 0,
            fail: String::new(),
            listen_extra: String::new(),
            server_extra: String::new(),
        }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// The start of an nginx config of a test, up to and including `http {`: the `user`,
/// the NDK and lua modules, 2 workers, `<name>.pid` and `<name>-error.log` (at
/// `level`) in `dir`, and the temp paths under `dir/tmp/<name>_*`.
pub fn conf_head(dir: &TestDir, name: &str, level: &str) -> String {
    let d = dir.path().display();
    let modules = nginx_modules();
    let m = modules.display();
    let mut out = format!(
        "{user}\nload_module {m}/ndk_http_module.so;\nload_module {m}/ngx_http_lua_module.so;\n\
         worker_processes 2;\npid {d}/{name}.pid;\nerror_log {d}/{name}-error.log {level};\n\
         events {{ worker_connections 1024; }}\nhttp {{\n",
        user = user_line(),
    );
    for t in ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"] {
        let _ = writeln!(out, "    {t}_temp_path {d}/tmp/{name}_{t};");
    }
    out
}

/// `POST /mock/set?<query>` on a mock node (a runtime knob change in all its workers).
pub fn mock_set(m: &MockNode, query: &str) {
    let r = post(m.port, &format!("/mock/set?{query}"), "");
    assert_eq!(r.status, 200, "mock {} /mock/set?{query}: {}", m.name, r.text());
}

/// Writes `mocks.conf` for `nodes` (2 workers, shared in-flight counters) and starts it.
pub fn start_mocks(dir: &TestDir, nodes: &[MockNode]) -> Nginx {
    start_mocks_with(dir, nodes, "")
}

/// [`start_mocks`] with `http_extra` (directives) in the mocks' `http` block: e.g.
/// `lua_check_client_abort on;`, with which a node ends a request (499, its in-flight
/// count released) as soon as the gateway's connection closes, as LLM servers that
/// cancel a generation on disconnect do.
pub fn start_mocks_with(dir: &TestDir, nodes: &[MockNode], http_extra: &str) -> Nginx {
    let mut servers = String::new();
    for n in nodes {
        servers.push_str(&mock_server(
            n.port,
            &MockVars {
                name: &n.name,
                latency_ms: n.latency_ms,
                chunk_ms: n.chunk_ms,
                max_conc: n.max_conc,
                retry_after: n.retry_after,
                quota_rps: n.quota_rps,
                quota_burst: n.quota_burst,
                fail: &n.fail,
            },
            &n.listen_extra,
            &n.server_extra,
        ));
    }
    let conf = format!(
        r#"# Mock LLM nodes, written by tests/support/mod.rs.
{head}
    access_log off;
    client_body_buffer_size 1m;
    keepalive_requests 100000;
    lua_package_path "{demo}/lua/?.lua;;";
    lua_shared_dict mock_llm 1m;
    init_by_lua_block {{ require("mock_llm") }}
    {http_extra}
{servers}}}
"#,
        head = conf_head(dir, "mocks", "notice"),
        demo = repo().join("nginx-conf/demo").display(),
    );
    let path = dir.write("mocks.conf", &conf);
    let ports: Vec<u16> = nodes.iter().map(|n| n.port).collect();
    let ngx = Nginx::start(dir, "mocks", &path, &dir.path().join("mocks-error.log"), &ports);
    for n in nodes
        .iter()
        .filter(|n| n.listen_extra.is_empty() && n.server_extra.is_empty())
    {
        if n.fail.is_empty() {
            let r = get(n.port, "/health");
            assert_eq!(r.status, 200, "mock {} /health: {}", n.name, r.text());
        }
    }
    ngx
}

/// `GET /mock/state` of a mock node once its in-flight count is back to 0 (it may lag
/// the client by a moment: see `quiesce` in tests/nginx.rs). Panics after 10 s.
pub fn mock_state_idle(port: u16) -> Value {
    let mut st = Value::Null;
    for _ in 0..500 {
        st = get(port, "/mock/state").json();
        // This request counts itself only in paths other than /mock/state.
        if st["inflight"] == serde_json::json!(0) {
            return st;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("mock on port {port} still has requests in flight after 10 s: {st}");
}

// ----------------------------------------------------------------------------------
// The gateway

/// The placeholders of the demo templates, for a gateway in `dir` on `port`.
pub fn gateway_vars(dir: &TestDir, port: u16, config: &Path) -> Vec<(&'static str, String)> {
    vec![
        ("USER", user_line().to_string()),
        ("MODULES", nginx_modules().display().to_string()),
        ("RUNTIME", dir.path().display().to_string()),
        ("REPO", repo().display().to_string()),
        ("LIBDIR", dir.lib_dir().display().to_string()),
        ("CONFIG", config.display().to_string()),
        ("PORT", port.to_string()),
    ]
}

/// Renders `nginx-conf/demo/gateway.conf` into `dir/gateway.conf` with the pool config
/// `json` in `dir/rsbalancer.json`; returns (conf path, json path).
pub fn write_gateway(dir: &TestDir, port: u16, json: &Value) -> (PathBuf, PathBuf) {
    let json_path = dir.write("rsbalancer.json", &serde_json::to_string_pretty(json).unwrap());
    let template =
        fs::read_to_string(repo().join("nginx-conf/demo/gateway.conf")).expect("read gateway.conf");
    let conf = render(&template, &gateway_vars(dir, port, &json_path));
    (dir.write("gateway.conf", &conf), json_path)
}

/// An example config of `nginx-conf/` (`text`) pointed at this checkout and `dir`:
/// the pool config `json` in place of `/etc/nginx/<name>.json`, the Lua and library
/// paths, the snippets (nginx-conf/snippets/), nginx's modules, the `user`, and the one-line Perl module `<name>.pm` the
/// example's `perl_require` asks for (checking `json` at `nginx -t`).
pub fn example_conf(dir: &TestDir, text: &str, name: &str, json: &Path) -> String {
    let perl_dir = dir.path().join("perl");
    fs::create_dir_all(&perl_dir).unwrap();
    fs::write(
        perl_dir.join(format!("{name}.pm")),
        format!(
            "use RsbalancerCheck; RsbalancerCheck::config('{}', '{}'); 1;\n",
            json.display(),
            dir.lib_dir().display()
        ),
    )
    .unwrap();
    text.replace(&format!("/etc/nginx/{name}.json"), &json.display().to_string())
        .replace("/usr/local/share/lua/5.1/", &format!("{}/lua/", repo().display()))
        .replace(
            "/usr/local/share/rsbalancer/nginx/",
            &format!("{}/nginx-conf/snippets/", repo().display()),
        )
        .replace("/usr/local/lib/lua/5.1", &dir.lib_dir().display().to_string())
        .replace(
            "perl_modules /usr/local/share/rsbalancer/perl;",
            &format!(
                "perl_modules {}; perl_modules {};",
                perl_dir.display(),
                repo().join("nginx-conf/perl").display()
            ),
        )
        .replace("/usr/lib/nginx/modules", &nginx_modules().display().to_string())
        .replace("user www-data;", user_line())
}

/// A running gateway.
pub struct Gateway {
    pub nginx: Nginx,
    pub port: u16,
    pub json: PathBuf,
}

/// Starts the demo gateway (2 workers) with pool config `json`, and waits until both
/// workers run and it answers.
pub fn start_gateway(dir: &TestDir, json: &Value) -> Gateway {
    start_gateway_with(dir, json, |conf| conf)
}

/// [`start_gateway`] with the rendered gateway.conf passed through `edit` first (to add
/// a test location, say).
pub fn start_gateway_with(dir: &TestDir, json: &Value, edit: impl FnOnce(String) -> String) -> Gateway {
    let port = free_port();
    let (conf, json_path) = write_gateway(dir, port, json);
    let text = fs::read_to_string(&conf).unwrap_or_else(|e| panic!("read {}: {e}", conf.display()));
    let conf = dir.write("gateway.conf", &edit(text));
    start_gateway_conf(dir, port, &conf, json_path)
}

/// Starts a gateway config already written (by [`write_gateway`], maybe edited after)
/// listening on `port`, and waits until both workers run and it answers.
pub fn start_gateway_conf(dir: &TestDir, port: u16, conf: &Path, json_path: PathBuf) -> Gateway {
    let nginx = Nginx::start(
        dir,
        "gateway",
        conf,
        &dir.path().join("gateway-error.log"),
        &[port],
    );
    nginx.wait_workers(2, &[]);
    let r = get(port, "/rsbalancer/stats");
    assert_eq!(
        r.status,
        200,
        "gateway stats: {}\n{}",
        r.text(),
        nginx.diagnostics()
    );
    Gateway {
        nginx,
        port,
        json: json_path,
    }
}

/// The status page of `g` as headless Chromium renders it (`--dump-dom`; Debian's
/// `chromium`, which `make deps` installs; fails loudly without it).
pub fn status_page_dom(g: &Gateway, dir: &TestDir) -> String {
    let profile = dir.path().join("chromium-profile");
    let out = Command::new("chromium")
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"])
        .args([
            "--disable-dev-shm-usage",
            "--virtual-time-budget=5000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("http://127.0.0.1:{}/rsbalancer/status", g.port))
        .output()
        .expect("run chromium (Debian: apt-get install chromium; make deps)");
    assert!(
        out.status.success(),
        "chromium: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `PUT /rsbalancer/pools/llm/nodes/<id>` with `{"drain": on}` of pool "llm" (the admin API).
pub fn drain(g: &Gateway, id: &str, on: bool) {
    let r = http(
        g.port,
        "PUT",
        &format!("/rsbalancer/pools/llm/nodes/{id}"),
        Some(&format!(r#"{{"drain": {on}}}"#)),
    )
    .expect("admin PUT");
    assert_eq!(r.status, 200, "drain {id} {on}: {}", r.text());
}

/// Requests in flight over every node of a stats document.
pub fn inflight(stats: &Value) -> u64 {
    let ids = stats.as_object().expect("stats object").keys();
    ids.map(|id| stat(stats, id, "inflight")).sum()
}

/// Waits until no node has a request in flight and returns the stats then. nginx runs
/// a request's log phase (where its tries are reported) when it frees the request,
/// which may come a moment after the client has read the whole response (lingering
/// close: nginx shuts down its side, then frees the request once the client closes).
/// A leak never clears, and fails here.
pub fn quiesce(g: &Gateway) -> Value {
    for _ in 0..500 {
        let s = g.stats();
        if inflight(&s) == 0 {
            return s;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!(
        "requests still in flight 10 s after the load ended: {}",
        g.stats()
    );
}

impl Gateway {
    /// `GET /rsbalancer/stats`: { node id: { weight, inflight, picks, requests, ... } }.
    pub fn stats(&self) -> Value {
        let r = get(self.port, "/rsbalancer/stats");
        assert_eq!(r.status, 200, "stats: {}", r.text());
        r.json()
    }

    /// A chat completion through the gateway.
    pub fn chat(&self) -> Response {
        post(self.port, "/v1/chat/completions", CHAT_BODY)
    }

    /// A chat completion with this body through the gateway.
    pub fn chat_with(&self, body: &str) -> Response {
        post(self.port, "/v1/chat/completions", body)
    }

    pub fn set_weight(&self, node: &str, weight: u32) -> Response {
        post(
            self.port,
            &format!("/rsbalancer/weight?node={node}&weight={weight}"),
            "",
        )
    }
}

pub const CHAT_BODY: &str = r#"{"model":"mock-llm","messages":[{"role":"user","content":"Say hello."}]}"#;
pub const STREAM_BODY: &str =
    r#"{"model":"mock-llm","stream":true,"messages":[{"role":"user","content":"Say hello."}]}"#;

/// The learned concurrency limits of pool llm's nodes, whole part (0: none learned).
pub fn limits(g: &Gateway) -> Vec<f64> {
    let r = get(g.port, "/rsbalancer/status").json();
    r["pools"]["llm"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["limit"].as_f64().unwrap().floor())
        .collect()
}

/// A counter field of a node in a stats document, as u64 (panics if absent).
pub fn stat(stats: &Value, node: &str, field: &str) -> u64 {
    stats[node][field]
        .as_f64()
        .unwrap_or_else(|| panic!("stats[{node}][{field}] missing in {stats}")) as u64
}

// ----------------------------------------------------------------------------------
// HTTP client

/// A response: status, headers (names as sent), body (de-chunked).
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("response is not JSON ({e}): {}", self.text()))
    }
}

/// One HTTP/1.1 request on a new connection to 127.0.0.1:`port` (`Connection: close`).
pub fn http(port: u16, method: &str, path: &str, body: Option<&str>) -> io::Result<Response> {
    http_with(port, method, path, &[], body)
}

/// [`http`] with extra request headers (`Authorization`, `Accept`, ...).
pub fn http_with(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> io::Result<Response> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n");
    for (k, v) in headers {
        write!(req, "{k}: {v}\r\n").unwrap();
    }
    if let Some(b) = body {
        write!(
            req,
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        )
        .unwrap();
    }
    req.push_str("\r\n");
    if let Some(b) = body {
        req.push_str(b);
    }
    // No shutdown(Write) after the request: nginx takes a half-closed client
    // connection for an aborted request (499).
    s.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse_response(&raw)
}

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

fn parse_response(raw: &[u8]) -> io::Result<Response> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad(format!("no end of headers in {:?}", String::from_utf8_lossy(raw))))?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|e| bad(e.to_string()))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("bad status line {status_line:?}")))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut r = Response {
        status,
        headers,
        body: raw[end + 4..].to_vec(),
    };
    if r.header("Transfer-Encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        r.body = dechunk(&r.body)?;
    } else if let Some(len) = r.header("Content-Length").and_then(|v| v.parse::<usize>().ok()) {
        if r.body.len() < len {
            return Err(bad(format!(
                "body of {} bytes, Content-Length {len}",
                r.body.len()
            )));
        }
        r.body.truncate(len);
    }
    Ok(r)
}

fn dechunk(mut b: &[u8]) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = b
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| bad("truncated chunk size".into()))?;
        let size_text = std::str::from_utf8(&b[..eol]).map_err(|e| bad(e.to_string()))?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size =
            usize::from_str_radix(size_text, 16).map_err(|_| bad(format!("bad chunk size {size_text:?}")))?;
        b = &b[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if b.len() < size + 2 {
            return Err(bad("truncated chunk".into()));
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

/// GET, panicking on a transport error.
pub fn get(port: u16, path: &str) -> Response {
    http(port, "GET", path, None).unwrap_or_else(|e| panic!("GET 127.0.0.1:{port}{path}: {e}"))
}

/// POST with a JSON body, panicking on a transport error.
pub fn post(port: u16, path: &str, body: &str) -> Response {
    http(port, "POST", path, Some(body)).unwrap_or_else(|e| panic!("POST 127.0.0.1:{port}{path}: {e}"))
}

/// Runs `f(0..n)` on `threads` threads; results in index order. A panic in `f` fails
/// the caller.
pub fn run_parallel<T: Send>(n: usize, threads: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let next = AtomicUsize::new(0);
    let mut all: Vec<(usize, T)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads.max(1))
            .map(|_| {
                s.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            return mine;
                        }
                        mine.push((i, f(i)));
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    });
    all.sort_by_key(|(i, _)| *i);
    all.into_iter().map(|(_, t)| t).collect()
}

/// How many times each value occurs.
pub fn count<'a>(values: impl IntoIterator<Item = &'a str>) -> std::collections::BTreeMap<String, usize> {
    let mut m = std::collections::BTreeMap::new();
    for v in values {
        *m.entry(v.to_string()).or_insert(0) += 1;
    }
    m
}
