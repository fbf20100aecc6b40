//! End-to-end tests of DNS service discovery (`src/discovery`, docs/discovery.md) in
//! real nginx with 2 workers (the demo gateway) in front of mock LLM nodes, with a
//! real `dnsmasq` of the test's own serving the records (tests/support/dnsmasq.rs).
//!
//! The mock nodes of an A-record pool share one port and differ by address: each
//! listens on 127.0.0.1:<own port> (for the test's checks) and on 127.0.0.N:<shared
//! port> (what the records name). dnsmasq answers with a TTL of 1 s, and the pools
//! ask with `min_ttl_s: 1`, so every change is seen through TTL expiry alone.
//!
//! Run with `make build` then `RSB_LUA_SO=$PWD/build/lib/rsbalancer.so cargo test
//! --no-default-features --test nginx_discovery -- --test-threads=1`. Needs nginx with
//! lua-nginx-module and dnsmasq; fails (never skips) without them.
//!
//! No assertion is on elapsed time: the tests wait (bounded) for what the gateway
//! shows, then check it.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{json, Value};
use support::dnsmasq::Dnsmasq;
use support::*;

/// One test at a time: the load tests need the machine.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

const WAIT: Duration = Duration::from_secs(30);

/// A mock node that also listens on `ip:shared` (the address its A record names).
fn mock_at(name: &str, ip: &str, shared: u16) -> MockNode {
    let mut m = MockNode::new(name, 5);
    m.server_extra = format!("listen {ip}:{shared};");
    m
}

/// A config with the one pool "llm" found by `dns`; `extra` is merged into the pool.
fn pool(dns: Value, extra: Value) -> Value {
    let mut p = json!({ "algorithm": "p2c_ewma", "slow_start_ms": 0, "discovery": { "dns": dns } });
    if let Value::Object(m) = extra {
        for (k, v) in m {
            p[k] = v;
        }
    }
    json!({ "pools": { "llm": p } })
}

fn status(g: &Gateway) -> Value {
    let r = get(g.port, "/rsbalancer/status");
    assert_eq!(r.status, 200, "status: {}", r.text());
    r.json()
}

/// The pool's nodes in the status document, by id.
fn nodes(g: &Gateway) -> Vec<Value> {
    status(g)["pools"]["llm"]["nodes"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn ids(g: &Gateway) -> Vec<String> {
    let mut v: Vec<String> = nodes(g)
        .iter()
        .map(|n| n["id"].as_str().unwrap().to_string())
        .collect();
    v.sort();
    v
}

fn node(g: &Gateway, id: &str) -> Value {
    nodes(g)
        .into_iter()
        .find(|n| n["id"] == id)
        .unwrap_or_else(|| panic!("no node {id} in {}", status(g)))
}

fn discovery(g: &Gateway) -> Value {
    status(g)["pools"]["llm"]["discovery"].clone()
}

fn metrics(g: &Gateway) -> String {
    let r = get(g.port, "/metrics");
    assert_eq!(r.status, 200);
    r.text()
}

/// The discovery line of pool llm on the status page as headless Chromium renders it
/// (`--dump-dom`; Debian's `chromium`, as tests/nginx_admin.rs).
fn page_discovery_line(g: &Gateway, dir: &TestDir) -> String {
    let dom = status_page_dom(g, dir);
    dom.split("<div class=\"discovery\">")
        .nth(1)
        .and_then(|d| d.split("</div>").next())
        .unwrap_or_else(|| panic!("no discovery line on the status page:\n{dom}"))
        .replace("&nbsp;", " ")
}

/// `promtool check metrics` finds nothing to say about `text` (Debian's
/// `prometheus`; fails loudly without it).
fn promtool_accepts(text: &str) {
    use std::io::Write;
    let mut c = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; `make deps` installs it)");
    c.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = c.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool check metrics: {report}"
    );
}

fn wait_ids(g: &Gateway, want: &[&str]) {
    let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    want.sort();
    let mut last = Vec::new();
    let ok = (0..(WAIT.as_millis() / 50)).any(|_| {
        last = ids(g);
        last == want || {
            std::thread::sleep(Duration::from_millis(50));
            false
        }
    });
    assert!(ok, "pool nodes {last:?}, want {want:?}\n{}", g.nginx.error_log());
}

/// Chat requests from `clients` threads until stopped; counts answers and failures.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    bad: Arc<Mutex<Vec<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(port: u16, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let bad = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..clients)
            .map(|_| {
                let (stop, ok, bad) = (stop.clone(), ok.clone(), bad.clone());
                std::thread::spawn(move || {
                    for _ in 0..100_000 {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        match http(port, "POST", "/v1/chat/completions", Some(CHAT_BODY)) {
                            Ok(r) if r.status == 200 => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(r) => bad.lock().unwrap().push(format!("{} {}", r.status, r.text())),
                            Err(e) => bad.lock().unwrap().push(e.to_string()),
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            bad,
            threads,
        }
    }

    /// Stops the clients; returns (answers, failures).
    fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        let bad = self.bad.lock().unwrap().clone();
        (self.ok.load(Ordering::Relaxed), bad)
    }
}

#[test]
fn a_records_add_and_remove_nodes_under_load_and_nodes_that_stay_keep_their_state() {
    let _s = serial();
    let dir = TestDir::new("disc-a");
    let shared = free_port();
    let mocks = [
        mock_at("a", "127.0.0.2", shared),
        mock_at("b", "127.0.0.3", shared),
        mock_at("c", "127.0.0.4", shared),
    ];
    let _m = start_mocks(&dir, &mocks);
    let dns = Dnsmasq::start(&dir, "127.0.0.2 llm.test\n", 1, &[]);
    let g = start_gateway(
        &dir,
        &pool(
            json!({ "name": "llm.test", "port": shared, "min_ttl_s": 1, "max_ttl_s": 5,
                    "nameservers": [dns.addr()] }),
            json!({}),
        ),
    );
    let id = |ip: &str| format!("{ip}:{shared}");
    let (a, b, c) = (id("127.0.0.2"), id("127.0.0.3"), id("127.0.0.4"));
    wait_ids(&g, &[&a]);

    let load = Load::start(g.port, 4);
    wait_until(WAIT, "node a serves", || {
        node(&g, &a)["requests"].as_u64().unwrap_or(0) > 0
    });
    // Records added: the nodes join and serve.
    dns.set_hosts("127.0.0.2 llm.test\n127.0.0.3 llm.test\n127.0.0.4 llm.test\n");
    wait_ids(&g, &[&a, &b, &c]);
    wait_until(WAIT, "b and c serve", || {
        node(&g, &b)["requests"].as_u64().unwrap_or(0) > 0
            && node(&g, &c)["requests"].as_u64().unwrap_or(0) > 0
    });
    // A record removed under load: the node leaves, its tries in flight finish.
    dns.set_hosts("127.0.0.3 llm.test\n127.0.0.4 llm.test\n");
    wait_ids(&g, &[&b, &c]);
    let served_after: u64 = {
        let before = load.ok.load(Ordering::Relaxed);
        wait_until(WAIT, "more answers after the removal", || {
            load.ok.load(Ordering::Relaxed) > before + 20
        });
        load.ok.load(Ordering::Relaxed)
    };
    let (answers, bad) = load.finish();
    assert!(answers >= served_after);
    assert!(
        bad.is_empty(),
        "{} failed requests, first: {:?}",
        bad.len(),
        bad.first()
    );
    let st = quiesce(&g);
    let _ = st;

    // Learned state of a node that stays survives a change of the set: b's counters
    // and latency estimate are what they were, not a new node's.
    let before = node(&g, &b);
    let requests = before["requests"].as_u64().unwrap();
    assert!(requests > 0);
    dns.set_hosts("127.0.0.3 llm.test\n");
    wait_ids(&g, &[&b]);
    let after = node(&g, &b);
    assert_eq!(after["requests"].as_u64().unwrap(), requests, "{after}");
    assert_eq!(after["ewma_us"], before["ewma_us"], "{after}");

    let d = discovery(&g);
    assert_eq!(d["up"], true, "{d}");
    assert_eq!(d["nodes"], 1, "{d}");
    let log = g.nginx.error_log();
    assert!(
        log.contains(&format!("discovery: pool llm (dns): nodes +{b} +{c}")),
        "{log}"
    );
    assert!(log.contains(&format!("-{a}")), "{log}");
}

#[test]
fn srv_weights_become_weights_and_priorities_backup_tiers() {
    let _s = serial();
    let dir = TestDir::new("disc-srv");
    let mocks = [
        MockNode::new("a", 5),
        MockNode::new("b", 5),
        MockNode::new("c", 5),
    ];
    let _m = start_mocks(&dir, &mocks);
    let srv = |wa: u32| -> Vec<String> {
        vec![
            format!("--srv-host=_llm._tcp.test,a.test,{},10,{wa}", mocks[0].port),
            format!("--srv-host=_llm._tcp.test,b.test,{},10,10", mocks[1].port),
            format!("--srv-host=_llm._tcp.test,c.test,{},20,5", mocks[2].port),
            "--host-record=a.test,127.0.0.1".into(),
            "--host-record=b.test,127.0.0.1".into(),
            "--host-record=c.test,127.0.0.1".into(),
        ]
    };
    let mut dns = Dnsmasq::start(&dir, "", 1, &srv(30));
    let g = start_gateway(
        &dir,
        &pool(
            json!({ "name": "_llm._tcp.test", "type": "SRV", "min_ttl_s": 1, "nameservers": [dns.addr()] }),
            json!({}),
        ),
    );
    let (a, b, c) = (
        format!("a.test:{}", mocks[0].port),
        format!("b.test:{}", mocks[1].port),
        format!("c.test:{}", mocks[2].port),
    );
    wait_ids(&g, &[&a, &b, &c]);
    let tier = |id: &str| {
        (
            node(&g, id)["weight"].as_u64().unwrap(),
            node(&g, id)["backup"] == true,
        )
    };
    assert_eq!(tier(&a), (30, false));
    assert_eq!(tier(&b), (10, false));
    assert_eq!(tier(&c), (5, true));
    // The backup takes nothing while the primaries serve.
    for _ in 0..20 {
        assert_eq!(g.chat().status, 200);
    }
    quiesce(&g);
    assert_eq!(node(&g, &c)["requests"], 0, "{}", status(&g));
    // A weight changed in the zone changes the node's weight, slot and state kept.
    let served = node(&g, &a)["requests"].as_u64().unwrap();
    assert!(served > 0, "{}", status(&g));
    dns.restart(&srv(70));
    wait_until(WAIT, "a's weight follows its SRV record", || tier(&a).0 == 70);
    assert_eq!(node(&g, &a)["requests"].as_u64().unwrap(), served);

    // nginx -s reload: the file names no node, yet the discovered ones stay, with
    // their state; the new generation's lease holder goes on following the zone.
    let old = g.nginx.workers();
    g.nginx.signal(libc::SIGHUP);
    g.nginx.wait_workers(2, &old);
    let mut want = vec![a.clone(), b.clone(), c.clone()];
    want.sort();
    assert_eq!(ids(&g), want);
    assert_eq!(node(&g, &a)["requests"].as_u64().unwrap(), served);
    assert_eq!(tier(&a), (70, false));
    dns.restart(&srv(20));
    wait_until(WAIT, "the new workers follow the zone", || tier(&a).0 == 20);
}

#[test]
fn a_nameserver_that_stops_leaves_the_last_known_nodes_and_says_so() {
    let _s = serial();
    let dir = TestDir::new("disc-down");
    let shared = free_port();
    let mocks = [mock_at("a", "127.0.0.2", shared)];
    let _m = start_mocks(&dir, &mocks);
    let mut dns = Dnsmasq::start(&dir, "127.0.0.2 llm.test\n", 1, &[]);
    let g = start_gateway(
        &dir,
        &pool(
            json!({ "name": "llm.test", "port": shared, "min_ttl_s": 1, "timeout_ms": 300,
                    "nameservers": [dns.addr()] }),
            json!({}),
        ),
    );
    let a = format!("127.0.0.2:{shared}");
    wait_ids(&g, &[&a]);
    // TTL expiry drives re-resolution: answers keep coming with nothing changed.
    let answers = discovery(&g)["answers"].as_u64().unwrap();
    wait_until(WAIT, "three more answers", || {
        discovery(&g)["answers"].as_u64().unwrap() >= answers + 3
    });

    dns.stop();
    wait_until(WAIT, "the source is down", || discovery(&g)["up"] == false);
    let d = discovery(&g);
    assert!(d["failing"].as_u64().unwrap() >= 1, "{d}");
    assert!(!d["last_error"].as_str().unwrap_or("").is_empty(), "{d}");
    let m = metrics(&g);
    assert!(
        m.contains("rsbalancer_discovery_up{pool=\"llm\",source=\"dns\"} 0"),
        "{m}"
    );
    assert!(
        !m.contains("rsbalancer_discovery_errors_total{pool=\"llm\",source=\"dns\"} 0\n"),
        "{m}"
    );
    promtool_accepts(&m);
    let line = page_discovery_line(&g, &dir);
    assert!(line.starts_with("discovery dns: FAILING"), "{line}");
    assert!(
        line.contains("1 nodes") && line.contains("last error: "),
        "{line}"
    );
    // The last known node serves on.
    assert_eq!(ids(&g), vec![a.clone()]);
    for _ in 0..5 {
        assert_eq!(g.chat().status, 200);
    }
    // One log line for the transition, however many failures follow.
    wait_until(WAIT, "the failure logged", || {
        g.nginx.error_log().contains("discovery: pool llm (dns) failed")
    });
    wait_until(WAIT, "three failures", || {
        discovery(&g)["failing"].as_u64().unwrap() >= 3
    });
    let log = g.nginx.error_log();
    assert_eq!(
        log.matches("discovery: pool llm (dns) failed").count(),
        1,
        "once per transition:\n{log}"
    );

    dns.restart(&[]);
    wait_until(WAIT, "the source is up again", || discovery(&g)["up"] == true);
    wait_until(WAIT, "the recovery logged", || {
        g.nginx
            .error_log()
            .contains("discovery: pool llm (dns): answers again")
    });
    assert!(metrics(&g).contains("rsbalancer_discovery_up{pool=\"llm\",source=\"dns\"} 1"));
    let line = page_discovery_line(&g, &dir);
    assert!(line.starts_with("discovery dns: up"), "{line}");
}

#[test]
fn a_name_that_does_not_resolve_at_start_leaves_the_pool_empty_until_it_does() {
    let _s = serial();
    let dir = TestDir::new("disc-empty");
    let shared = free_port();
    let mocks = [mock_at("a", "127.0.0.2", shared)];
    let _m = start_mocks(&dir, &mocks);
    let dns = Dnsmasq::start(&dir, "", 1, &[]);
    let g = start_gateway(
        &dir,
        &pool(
            json!({ "name": "llm.test", "port": shared, "min_ttl_s": 1, "nameservers": [dns.addr()] }),
            json!({ "no_node_status": 503 }),
        ),
    );
    assert!(ids(&g).is_empty());
    // The name does not exist: an empty answer, the pool stays empty.
    wait_until(WAIT, "an answer", || {
        discovery(&g)["answers"].as_u64().unwrap_or(0) > 0
    });
    for _ in 0..4 {
        let r = g.chat();
        assert_eq!(r.status, 503, "{}", r.text());
        let ra: u64 = r
            .header("Retry-After")
            .unwrap_or_else(|| panic!("no Retry-After: {r:?}"))
            .parse()
            .unwrap();
        assert!(ra >= 1);
    }
    dns.set_hosts("127.0.0.2 llm.test\n");
    wait_until(WAIT, "the pool fills in", || g.chat().status == 200);
    assert_eq!(ids(&g), [format!("127.0.0.2:{shared}")]);
}

#[test]
fn node_names_re_resolve_and_a_name_missing_at_start_joins_later() {
    let _s = serial();
    let dir = TestDir::new("disc-names");
    let shared = free_port();
    let mut a = mock_at("a", "127.0.0.2", shared);
    a.server_extra.push_str(&format!(" listen 127.0.0.3:{shared};"));
    let b = mock_at("b", "127.0.0.4", shared);
    let _m = start_mocks(&dir, &[a, b]);
    let dns = Dnsmasq::start(&dir, "127.0.0.2 a.test\n", 1, &[]);
    // Both names are unknown to the system resolver nginx's master uses at load:
    // neither stops nginx; each joins when the pool's nameserver resolves it.
    let g = start_gateway(
        &dir,
        &json!({ "pools": { "llm": {
            "algorithm": "p2c_ewma", "slow_start_ms": 0,
            "nodes": [
                { "id": "a", "addr": format!("a.test:{shared}") },
                { "id": "b", "addr": format!("b.test:{shared}"), "weight": 2 }
            ],
            "discovery": { "dns": { "min_ttl_s": 1, "nameservers": [dns.addr()] } }
        } } }),
    );
    wait_ids(&g, &["a"]);
    assert_eq!(node(&g, "a")["addr"], format!("127.0.0.2:{shared}"));
    for _ in 0..5 {
        assert_eq!(g.chat().status, 200);
    }
    quiesce(&g);
    let served = node(&g, "a")["requests"].as_u64().unwrap();
    // a moves to another address (same id, same state); b's name appears.
    dns.set_hosts("127.0.0.3 a.test\n127.0.0.4 b.test\n");
    wait_ids(&g, &["a", "b"]);
    wait_until(WAIT, "a moved", || {
        node(&g, "a")["addr"] == format!("127.0.0.3:{shared}")
    });
    assert_eq!(node(&g, "a")["requests"].as_u64().unwrap(), served);
    assert_eq!(node(&g, "b")["weight"], 2);
    for _ in 0..10 {
        assert_eq!(g.chat().status, 200);
    }
}

#[test]
fn the_admin_api_resolves_a_new_nodes_name_on_a_thread() {
    let _s = serial();
    let dir = TestDir::new("disc-admin");
    let mocks = [MockNode::new("a", 5), MockNode::new("b", 5)];
    let _m = start_mocks(&dir, &mocks);
    let g = start_gateway(
        &dir,
        &json!({ "pools": { "llm": { "algorithm": "weighted_random", "slow_start_ms": 0,
            "nodes": [{ "id": "a", "addr": mocks[0].addr() }] } } }),
    );
    // A host name (/etc/hosts' localhost): resolved off the event loop, then added.
    let body =
        json!({ "id": "b", "addr": format!("localhost:{}", mocks[1].port), "weight": 10000 }).to_string();
    let r = http(g.port, "POST", "/rsbalancer/pools/llm/nodes", Some(&body)).unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(node(&g, "b")["addr"], mocks[1].addr());
    wait_until(WAIT, "b serves", || g.chat().header("X-Node") == Some("b"));
    // A name that does not resolve: refused, naming the field; nothing changed.
    let body = json!({ "id": "c", "addr": "no-such-host.invalid:8000" }).to_string();
    let r = http(g.port, "POST", "/rsbalancer/pools/llm/nodes", Some(&body)).unwrap();
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("addr"), "{}", r.text());
    assert_eq!(ids(&g), ["a", "b"]);
}

#[test]
fn aaaa_records_give_ipv6_nodes() {
    let _s = serial();
    let dir = TestDir::new("disc-aaaa");
    let shared = free_port();
    let mocks = [mock_at("a", "[::1]", shared)];
    let _m = start_mocks(&dir, &mocks);
    let dns = Dnsmasq::start(&dir, "::1 llm.test\n", 1, &[]);
    let g = start_gateway(
        &dir,
        &pool(
            json!({ "name": "llm.test", "type": "AAAA", "port": shared, "min_ttl_s": 1,
                    "nameservers": [dns.addr()] }),
            json!({}),
        ),
    );
    let id = format!("::1:{shared}");
    wait_ids(&g, &[&id]);
    assert_eq!(node(&g, &id)["addr"], format!("[::1]:{shared}"));
    let r = g.chat();
    assert_eq!((r.status, r.header("X-Node")), (200, Some("a")), "{}", r.text());
}
