//! End-to-end tests of `/metrics` (src/metrics/, lua/resty/rsbalancer/metrics.lua)
//! inside real nginx (2 workers, the demo template `nginx-conf/demo/gateway.conf`) in
//! front of mock LLM nodes (`nginx-conf/demo/lua/mock_llm.lua`), checked with the real
//! `promtool` and a real Prometheus server (Debian package `prometheus`).
//!
//! Run with `make build` then
//! `RSB_LUA_SO=$PWD/build/lib/rsbalancer.so cargo test --no-default-features --test
//! nginx_metrics -- --test-threads=1`. Needs nginx with lua-nginx-module, `promtool`
//! and `prometheus`, and fails (never skips) without them.
//!
//! The ground truth is counted outside the gateway: every mock node counts the
//! requests it received (`/mock/state`), the client counts the answers it got. The
//! metrics must match those exactly, in both workers. No assertion depends on timing
//! except a lower bound: a node that waits 30 ms before answering cannot be in the
//! 25 ms latency bucket.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;

/// One test at a time, even when the harness runs tests in parallel.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A sample of the exposition: name, labels, value.
type Sample = (String, BTreeMap<String, String>, f64);

/// Parses text exposition (the subset with no timestamps); comment lines skipped.
fn parse(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let (head, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        let (name, labels) = match head.split_once('{') {
            None => (head.to_string(), BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("bad labels in {line:?}"));
                let mut labels = BTreeMap::new();
                // Label values written by rsbalancer hold no ',' '"' or '\\' here.
                for pair in body.split("\",").filter(|p| !p.is_empty()) {
                    let (k, v) = pair
                        .split_once("=\"")
                        .unwrap_or_else(|| panic!("bad label in {line:?}"));
                    labels.insert(k.to_string(), v.trim_end_matches('"').to_string());
                }
                (name.to_string(), labels)
            }
        };
        out.push((name, labels, value));
    }
    out
}

/// The one sample of `name` whose labels include `want`; panics unless exactly one.
fn metric(samples: &[Sample], name: &str, want: &[(&str, &str)]) -> f64 {
    let hits: Vec<&Sample> = samples
        .iter()
        .filter(|(n, l, _)| {
            n == name
                && want
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .collect();
    assert_eq!(
        hits.len(),
        1,
        "{name} {want:?}: {} samples, want 1: {hits:?}",
        hits.len()
    );
    hits[0].2
}

/// `GET /metrics`: (worker pid that answered, body). Checks status and content type.
fn scrape(g: &Gateway) -> (String, String) {
    let r = get(g.port, "/metrics");
    assert_eq!(r.status, 200, "/metrics: {}\n{}", r.text(), g.nginx.diagnostics());
    assert_eq!(
        r.header("Content-Type"),
        Some("text/plain; version=0.0.4; charset=utf-8"),
        "content type of /metrics"
    );
    (r.header("X-Worker").unwrap_or_default().to_string(), r.text())
}

/// Scrapes until both workers answered once; returns their bodies by worker pid.
fn scrape_both_workers(g: &Gateway) -> BTreeMap<String, String> {
    let mut by_worker = BTreeMap::new();
    for _ in 0..200 {
        let (w, text) = scrape(g);
        by_worker.insert(w, text);
        if by_worker.len() == 2 {
            return by_worker;
        }
    }
    panic!(
        "200 scrapes of /metrics were all answered by one worker: {:?}",
        by_worker.keys()
    );
}

fn received(m: &MockNode) -> u64 {
    let st = mock_state_idle(m.port);
    st["received"]
        .as_u64()
        .unwrap_or_else(|| panic!("no `received` in {st}"))
}

/// Waits until no try is in flight (the log phase may trail the client's answer).
fn quiesce(g: &Gateway) {
    wait_until(Duration::from_secs(10), "no try in flight", || {
        g.stats()
            .as_object()
            .expect("stats object")
            .values()
            .all(|n| n["inflight"].as_u64() == Some(0))
    });
}

fn node(id: &str, m: &MockNode, weight: u32) -> Value {
    json!({ "id": id, "addr": m.addr(), "weight": weight })
}

/// Node a serves (after 30 ms), b answers every chat request 429 (no Retry-After),
/// c answers 503. Returns the mocks' nginx and the three nodes.
fn three_mocks(dir: &TestDir) -> (Nginx, [MockNode; 3]) {
    let a = MockNode::new("a", 30);
    let mut b = MockNode::new("b", 5);
    b.fail = "429".into();
    let mut c = MockNode::new("c", 5);
    c.fail = "503".into();
    let ngx = start_mocks(dir, &[a.clone(), b.clone(), c.clone()]);
    (ngx, [a, b, c])
}

#[test]
fn metrics_count_exactly_what_the_nodes_saw_in_both_workers() {
    let _s = serial();
    let dir = TestDir::new("metrics-exact");
    let (_mocks, [a, b, c]) = three_mocks(&dir);
    let cfg = json!({ "pools": { "llm": {
        "algorithm": "weighted_random",
        "slow_start_ms": 0,
        "nodes": [node("a", &a, 1), node("b", &b, 1), node("c", &c, 1)],
    } } });
    let g = start_gateway(&dir, &cfg);

    const N: usize = 60;
    let statuses = run_parallel(N, 2, |_| g.chat().status);
    quiesce(&g);
    let ok = statuses.iter().filter(|&&s| s == 200).count() as u64;
    let not_ok = N as u64 - ok;
    let (ra, rb, rc) = (received(&a), received(&b), received(&c));
    assert!(
        rb > 0 && rc > 0,
        "b and c got no tries (a {ra}, b {rb}, c {rc}): nothing to count"
    );

    let bodies = scrape_both_workers(&g);
    for (worker, text) in &bodies {
        let s = parse(text);
        let n = |id: &'static str| [("pool", "llm"), ("node", id), ("arm", "primary")];
        let class = |id: &'static str, class: &'static str| {
            let mut l = n(id).to_vec();
            l.push(("class", class));
            metric(&s, "rsbalancer_node_requests_total", &l)
        };
        let ctx = format!("worker {worker}: a {ra}, b {rb}, c {rc} tries received; {ok} of {N} ok");
        // Every try a node received, in its status class, nothing elsewhere.
        assert_eq!(class("a", "2xx"), ra as f64, "{ctx}");
        assert_eq!(class("b", "4xx"), rb as f64, "{ctx}");
        assert_eq!(class("c", "5xx"), rc as f64, "{ctx}");
        for (id, other) in [
            ("a", ["no_response", "4xx", "5xx"]),
            ("b", ["no_response", "2xx", "5xx"]),
        ] {
            for cl in other {
                assert_eq!(class(id, cl), 0.0, "{ctx}: {id} {cl}");
            }
        }
        assert_eq!(
            metric(&s, "rsbalancer_node_429_total", &n("b")),
            rb as f64,
            "{ctx}"
        );
        assert_eq!(metric(&s, "rsbalancer_node_429_total", &n("a")), 0.0, "{ctx}");
        assert_eq!(
            metric(&s, "rsbalancer_node_errors_total", &n("c")),
            rc as f64,
            "{ctx}"
        );
        assert_eq!(metric(&s, "rsbalancer_node_errors_total", &n("a")), 0.0, "{ctx}");
        // Picks: every try handed out was one a node received.
        let picks: f64 = ["a", "b", "c"]
            .iter()
            .map(|id| metric(&s, "rsbalancer_node_picks_total", &n(id)))
            .sum();
        assert_eq!(picks, (ra + rb + rc) as f64, "{ctx}");
        // Histogram: one observation per served try (b's 429s and c's 503s are not
        // served); a waits 30 ms before answering.
        for (id, count) in [("a", ra), ("b", 0), ("c", 0)] {
            let h = "rsbalancer_node_upstream_latency_seconds";
            assert_eq!(
                metric(&s, &format!("{h}_count"), &n(id)),
                count as f64,
                "{ctx}: {id}"
            );
            let mut inf = n(id).to_vec();
            inf.push(("le", "+Inf"));
            assert_eq!(
                metric(&s, &format!("{h}_bucket"), &inf),
                count as f64,
                "{ctx}: {id}"
            );
        }
        let mut fast = n("a").to_vec();
        fast.push(("le", "0.025"));
        assert_eq!(
            metric(&s, "rsbalancer_node_upstream_latency_seconds_bucket", &fast),
            0.0,
            "{ctx}: a answers after 30 ms"
        );
        let sum_a = metric(&s, "rsbalancer_node_upstream_latency_seconds_sum", &n("a"));
        assert!(
            sum_a >= 0.030 * ra as f64 - 1e-9,
            "{ctx}: latency sum of a {sum_a}"
        );
        // Pool: every request got a first try (a was always free); every other try was
        // a retry; each request whose last try failed reached the client as a failure.
        let p = [("pool", "llm"), ("arm", "primary")];
        assert_eq!(
            metric(&s, "rsbalancer_pool_requests_total", &p),
            N as f64,
            "{ctx}"
        );
        let retries = metric(&s, "rsbalancer_pool_retries_total", &p);
        assert_eq!(retries, (ra + rb + rc - N as u64) as f64, "{ctx}");
        assert_eq!(ok, ra, "{ctx}: every success is one of a's answers");
        assert_eq!(
            not_ok as f64,
            (rb + rc) as f64 - retries,
            "{ctx}: failed requests = failed tries - retries (the success-rate recording rule)"
        );
        assert_eq!(
            metric(&s, "rsbalancer_pool_window_tries", &p),
            (ra + rb + rc) as f64,
            "{ctx}"
        );
        assert_eq!(
            metric(&s, "rsbalancer_pool_window_429_tries", &p),
            rb as f64,
            "{ctx}"
        );
        assert_eq!(
            metric(&s, "rsbalancer_pool_window_failed_tries", &p),
            rc as f64,
            "{ctx}"
        );
        // Nothing in flight; exactly one state per node.
        for id in ["a", "b", "c"] {
            assert_eq!(metric(&s, "rsbalancer_node_inflight", &n(id)), 0.0, "{ctx}");
            let states: f64 = STATES
                .iter()
                .map(|st| {
                    let mut l = n(id).to_vec();
                    l.push(("state", st));
                    metric(&s, "rsbalancer_node_state", &l)
                })
                .sum();
            assert_eq!(states, 1.0, "{ctx}: states of {id}");
        }
    }
    // Both workers read the same shared counters: every counter is equal.
    let counters: Vec<Vec<Sample>> = bodies
        .values()
        .map(|t| {
            parse(t)
                .into_iter()
                .filter(|(n, _, _)| n.ends_with("_total") || n.ends_with("_count") || n.ends_with("_bucket"))
                .collect()
        })
        .collect();
    assert!(counters[0].len() > 40, "few counters: {:?}", counters[0]);
    assert_eq!(counters[0], counters[1], "the two workers disagree on counters");
}

/// The values of `rsbalancer_node_state{state=...}`.
const STATES: [&str; 6] = ["healthy", "slow_start", "cooling", "ejected", "down", "draining"];

/// `promtool`: `$PROMTOOL`, or on PATH / /usr/bin. Panics (fails loudly) if missing.
fn tool(name: &str, env: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return PathBuf::from(p);
    }
    let mut c = vec![PathBuf::from("/usr/bin").join(name)];
    if let Some(path) = std::env::var_os("PATH") {
        c.extend(std::env::split_paths(&path).map(|d| d.join(name)));
    }
    c.into_iter().find(|p| p.is_file()).unwrap_or_else(|| {
        panic!(
            "{name} not found (${env}, /usr/bin, PATH): install the Debian package `prometheus` (make deps)"
        )
    })
}

#[test]
fn promtool_check_metrics_accepts_the_real_output() {
    let _s = serial();
    let dir = TestDir::new("metrics-promtool");
    let (_mocks, [a, b, c]) = three_mocks(&dir);
    let cfg = json!({ "pools": {
        "llm": {
            "algorithm": "p2c_ewma",
            "nodes": [node("a", &a, 3), node("b", &b, 1),
                      { "id": "c", "addr": c.addr(), "backup": true }],
        },
        "spare": { "nodes": [node("s1", &a, 1)] },
    } });
    let g = start_gateway(&dir, &cfg);
    let statuses = run_parallel(30, 2, |_| g.chat().status);
    assert!(statuses.contains(&200), "no request succeeded: {statuses:?}");
    quiesce(&g);
    let (_, text) = scrape(&g);
    // Both pools, every family, with HELP and TYPE.
    let s = parse(&text);
    assert!(s
        .iter()
        .any(|(n, l, _)| n == "rsbalancer_node_info" && l["pool"] == "spare"));
    let families: BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| l.split(' ').next().unwrap())
        .collect();
    assert!(families.len() >= 40, "{} families: {families:?}", families.len());

    // Methods other than GET and HEAD: 405.
    assert_eq!(post(g.port, "/metrics", "").status, 405, "POST /metrics");

    let (ok, report) = promtool_check_metrics(&text);
    assert!(ok && report.trim().is_empty(), "promtool check metrics: {report}");
    // And it does complain about a broken exposition (the check is live).
    let broken = text.replacen("rsbalancer_pool_requests_total", "rsbalancer_pool_requests", 3);
    let (ok, _) = promtool_check_metrics(&broken);
    assert!(!ok, "promtool accepted a counter without _total");
}

/// `promtool check metrics` on `text`: (exit status success, stdout + stderr).
fn promtool_check_metrics(text: &str) -> (bool, String) {
    let mut child = Command::new(tool("promtool", "PROMTOOL"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .expect("feed promtool");
    let out = child.wait_with_output().expect("promtool output");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), report)
}

/// A Prometheus server started by a test: stopped (SIGTERM, then SIGKILL) on drop.
struct Prometheus {
    child: Option<Child>,
    port: u16,
    log: PathBuf,
}

impl Prometheus {
    fn start(dir: &TestDir, target_port: u16) -> Prometheus {
        let rules = repo().join("nginx-conf/prometheus");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {}\n  - {}\n\
             scrape_configs:\n  - job_name: rsbalancer\n    metrics_path: /metrics\n    \
             static_configs:\n      - targets: [\"127.0.0.1:{target_port}\"]\n",
            rules.join("rsbalancer.rules.yml").display(),
            rules.join("rsbalancer.alerts.yml").display()
        );
        let conf = dir.write("prometheus.yml", &config);
        let port = free_port();
        let log = dir.path().join("prometheus.log");
        let mut cmd = Command::new(tool("prometheus", "PROMETHEUS"));
        cmd.arg(format!("--config.file={}", conf.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("create prometheus log"));
        // SAFETY: prctl is async-signal-safe; nothing else runs in the child.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong);
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn prometheus");
        let mut p = Prometheus {
            child: Some(child),
            port,
            log,
        };
        let start = Instant::now();
        loop {
            if let Ok(r) = http(port, "GET", "/-/ready", None) {
                if r.status == 200 {
                    return p;
                }
            }
            if let Some(st) = p.child.as_mut().unwrap().try_wait().unwrap() {
                p.child = None;
                panic!("prometheus exited ({st}):\n{}", p.log_text());
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "prometheus not ready after 30 s:\n{}",
                p.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `/api/v1/query`: the result vector.
    fn query(&self, q: &str) -> Vec<Value> {
        let r = get(self.port, &format!("/api/v1/query?query={}", percent_encode(q)));
        assert_eq!(r.status, 200, "query {q}: {}", r.text());
        let v = r.json();
        assert_eq!(v["status"], "success", "query {q}: {v}");
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// Polls `q` until it returns one sample; returns its value. Panics after `secs`.
    fn wait_value(&self, q: &str, secs: u64, mut accept: impl FnMut(f64) -> bool) -> f64 {
        let start = Instant::now();
        let mut last = Vec::new();
        while start.elapsed() < Duration::from_secs(secs) {
            last = self.query(q);
            if let [one] = last.as_slice() {
                let v: f64 = one["value"][1]
                    .as_str()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_else(|| panic!("bad sample {one}"));
                if accept(v) {
                    return v;
                }
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        let targets = get(self.port, "/api/v1/targets").text();
        panic!(
            "{q}: no accepted value in {secs} s, last {last:?}\ntargets: {targets}\n{}",
            self.log_text()
        );
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = child.id() as i32;
            signal(pid, libc::SIGTERM);
            let start = Instant::now();
            while child.try_wait().ok().flatten().is_none() {
                if start.elapsed() > Duration::from_secs(10) {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        if std::thread::panicking() {
            eprintln!("--- prometheus log:\n{}", self.log_text());
        }
    }
}

fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[test]
fn a_real_prometheus_scrapes_the_gateway_and_evaluates_the_rules() {
    let _s = serial();
    let dir = TestDir::new("metrics-prometheus");
    let a = MockNode::new("a", 10);
    let mut b = MockNode::new("b", 5);
    b.fail = "429".into();
    let _mocks = start_mocks(&dir, &[a.clone(), b.clone()]);
    let cfg = json!({ "pools": { "llm": {
        "algorithm": "weighted_random",
        "slow_start_ms": 0,
        "nodes": [node("a", &a, 1), node("b", &b, 1)],
    } } });
    let g = start_gateway(&dir, &cfg);
    let prom = Prometheus::start(&dir, g.port);

    // First a scrape of the idle gateway, so that every counter's first sample is 0:
    // rate() then extrapolates all of them alike and the ratios below are exact.
    prom.wait_value(
        r#"rsbalancer_pool_requests_total{job="rsbalancer",pool="llm",arm="primary"}"#,
        60,
        |v| v == 0.0,
    );
    const N: usize = 25;
    let statuses = run_parallel(N, 2, |_| g.chat().status);
    quiesce(&g);
    let ok = statuses.iter().filter(|&&s| s == 200).count();
    let rb = received(&b);

    // The raw counters, read back through Prometheus' query API.
    let got = prom.wait_value(
        r#"rsbalancer_pool_requests_total{job="rsbalancer",pool="llm",arm="primary"}"#,
        60,
        |v| v == N as f64,
    );
    assert_eq!(got, N as f64);
    let got_429 = prom.wait_value(r#"sum(rsbalancer_node_429_total{pool="llm"})"#, 30, |v| {
        v == rb as f64
    });
    assert_eq!(got_429, rb as f64);
    // A recording rule over the scraped data: the request success rate. Every request
    // that failed was a 429 from b not retried; once the window holds the whole run,
    // the rule's value is the client's own success share.
    let want = ok as f64 / N as f64;
    let success = prom.wait_value(
        r#"rsbalancer:pool_request_success:ratio_rate5m{pool="llm"}"#,
        60,
        |v| (v - want).abs() < 1e-9,
    );
    assert!((success - want).abs() < 1e-9, "{success} vs {want}");
    // The alert rule file loaded too (the success alert is pending or firing only when
    // below 95%).
    let rules = get(prom.port, "/api/v1/rules").json();
    let names: Vec<&str> = rules["data"]["groups"]
        .as_array()
        .expect("rule groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().iter())
        .filter_map(|r| r["name"].as_str())
        .collect();
    for alert in [
        "RsbalancerPoolSuccessRateLow",
        "RsbalancerPoolLatencyHigh",
        "RsbalancerNodeLoadImbalance",
        "RsbalancerPoolAllNodesCooling",
    ] {
        assert!(names.contains(&alert), "{alert} not loaded: {names:?}");
    }
}
