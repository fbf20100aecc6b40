//! Process and template helpers shared by the nginx tests (`tests/support`) and the
//! gateway benchmark (`benches/gateway.rs`, which includes this file by path): free
//! ports, `@NAME@` templates, and starting/stopping nginx masters and their workers.
#![allow(dead_code)]

use std::collections::HashSet;
use std::fs;
use std::io;
use std::net::{TcpListener, TcpStream};
use std::process::Child;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A port on 127.0.0.1 that was free a moment ago and that this process has not handed
/// out before (the kernel may offer the same ephemeral port twice in a row).
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind 127.0.0.1:0")
            .port();
        let mut given = GIVEN.lock().unwrap();
        if given.get_or_insert_with(HashSet::new).insert(port) {
            return port;
        }
    }
}

/// What one mock LLM node (`nginx-conf/demo/lua/mock_llm.lua`) is told to be.
pub struct MockVars<'a> {
    pub name: &'a str,
    pub latency_ms: u32,
    pub chunk_ms: u32,
    pub max_conc: u32,
    pub retry_after: u32,
    pub quota_rps: f64,
    pub quota_burst: u32,
    pub fail: &'a str,
}

/// The `server` block of one mock node on 127.0.0.1:`port` (`listen_extra` appended to
/// its `listen`, `locations` placed before its catch-all location).
pub fn mock_server(port: u16, v: &MockVars, listen_extra: &str, locations: &str) -> String {
    format!(
        r#"
    server {{
        listen 127.0.0.1:{port}{listen_extra};
        set $mock_node {name};
        set $mock_latency_ms {latency};
        set $mock_chunk_ms {chunk};
        set $mock_max_conc {conc};
        set $mock_retry_after {ra};
        set $mock_quota_rps {rps};
        set $mock_quota_burst {burst};
        set $mock_fail "{fail}";
        set $mock_require_host "";
        set $mock_require_key "";
{locations}        location / {{
            content_by_lua_block {{ require("mock_llm").handle() }}
            log_by_lua_block {{ require("mock_llm").log() }}
        }}
    }}
"#,
        name = v.name,
        latency = v.latency_ms,
        chunk = v.chunk_ms,
        conc = v.max_conc,
        ra = v.retry_after,
        rps = v.quota_rps,
        burst = v.quota_burst,
        fail = v.fail,
    )
}

/// True if something accepts connections on 127.0.0.1:`port`.
pub fn port_open(port: u16) -> bool {
    TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)).is_ok()
}

/// Fills `@NAME@` placeholders outside comment lines (comments document them and stay
/// as written); panics if one is left in a directive.
pub fn render(template: &str, vars: &[(&str, String)]) -> String {
    let mut out = String::with_capacity(template.len() * 2);
    for line in template.lines() {
        if line.trim_start().starts_with('#') {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        let mut l = line.to_string();
        for (k, v) in vars {
            l = l.replace(&format!("@{k}@"), v);
        }
        for (i, _) in l.match_indices('@') {
            let rest = &l[i + 1..];
            let n = rest
                .bytes()
                .take_while(|c| c.is_ascii_uppercase() || *c == b'_')
                .count();
            assert!(
                n == 0 || rest.as_bytes().get(n) != Some(&b'@'),
                "placeholder left unfilled in: {l}"
            );
        }
        out.push_str(&l);
        out.push('\n');
    }
    out
}

/// Send `sig` to `pid`; a process already gone is fine.
pub fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) with a pid of a process this test or bench started; no memory is
    // involved.
    let rc = unsafe { libc::kill(pid, sig) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ESRCH) {
            panic!("kill({pid}, {sig}): {e}");
        }
    }
}

/// (pid, command line) of the live children of `parent`, from /proc.
pub fn children(parent: i32) -> Vec<(i32, String)> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Some((ppid, state)) = proc_stat(pid) else {
            continue;
        };
        if ppid == parent && state != 'Z' {
            out.push((pid, cmdline(pid)));
        }
    }
    out.sort();
    out
}

/// (ppid, state) of a process.
fn proc_stat(pid: i32) -> Option<(i32, char)> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = s.rsplit_once(") ")?;
    let mut f = rest.split(' ');
    let state = f.next()?.chars().next()?;
    let ppid = f.next()?.parse().ok()?;
    Some((ppid, state))
}

fn cmdline(pid: i32) -> String {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " ").trim().to_string())
        .unwrap_or_default()
}

/// Is `pid` a live (not zombie) nginx process?
pub fn is_nginx(pid: i32) -> bool {
    matches!(proc_stat(pid), Some((_, s)) if s != 'Z') && cmdline(pid).starts_with("nginx:")
}

/// Stop an nginx master started as `child`: SIGTERM (fast shutdown: the master stops
/// its workers and exits), SIGKILL after 5 s, then SIGKILL for any worker left behind
/// (a worker outlives a master that was SIGKILLed). A pid is only killed while it is
/// still an nginx process, in case it was reused. `name` labels the messages.
pub fn stop_nginx(mut child: Child, name: &str) {
    let master = child.id() as i32;
    let mut workers: Vec<i32> = children(master).into_iter().map(|(p, _)| p).collect();
    signal(master, libc::SIGTERM);
    let start = Instant::now();
    let mut exited = false;
    while start.elapsed() < Duration::from_secs(5) {
        workers.extend(children(master).into_iter().map(|(p, _)| p));
        if child.try_wait().ok().flatten().is_some() {
            exited = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    if !exited {
        eprintln!("{name} nginx (pid {master}) ignored SIGTERM for 5 s: SIGKILL");
        workers.extend(children(master).into_iter().map(|(p, _)| p));
        signal(master, libc::SIGKILL);
        let _ = child.wait();
    }
    workers.sort_unstable();
    workers.dedup();
    let deadline = Instant::now() + Duration::from_secs(2);
    for pid in workers {
        while is_nginx(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if is_nginx(pid) {
            eprintln!("{name}: worker {pid} outlived its master: SIGKILL");
            signal(pid, libc::SIGKILL);
        }
    }
}
