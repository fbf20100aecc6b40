//! End-to-end tests of queue-depth scraping (`src/scrape.rs`,
//! `lua/resty/rsbalancer/scrape.lua`) inside real nginx (2 workers) in front of mock
//! nodes that expose `/metrics` as vLLM and SGLang do (`mock_llm.lua`: the waiting
//! queue is a knob, the running count their real in-flight count).
//!
//! Run with `make build` then `RSB_LUA_SO=$PWD/build/lib/rsbalancer.so cargo test
//! --no-default-features --test nginx_queue -- --test-threads=1`. They need nginx with
//! lua-nginx-module and fail (never skip) without them: see tests/support/mod.rs.
//!
//! No assertion depends on how long something took: the tests wait (with a generous
//! timeout) until the status document shows what a scrape brought, then count.

mod support;

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{json, Value};
use support::*;

/// One test at a time: the load tests need the machine.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

const WAIT: Duration = Duration::from_secs(20);

/// One pool "llm" of equal nodes, scraped every 200 ms.
fn config(algorithm: &str, nodes: &[&MockNode]) -> Value {
    let nodes: Vec<Value> = nodes
        .iter()
        .map(|m| json!({ "id": m.name, "addr": m.addr(), "weight": 1 }))
        .collect();
    json!({ "pools": { "llm": {
        "algorithm": algorithm,
        "slow_start_ms": 0,
        "nodes": nodes,
        "scrape": { "kind": "auto", "scrape_ms": 200, "timeout_ms": 500 },
    } } })
}

/// The `queue` object of node `id` in the status document.
fn queue(g: &Gateway, id: &str) -> Value {
    let st = get(g.port, "/rsbalancer/status").json();
    let nodes = st["pools"]["llm"]["nodes"].as_array().expect("nodes").clone();
    let n = nodes
        .into_iter()
        .find(|n| n["id"] == id)
        .unwrap_or_else(|| panic!("node {id} in {st}"));
    n["queue"].clone()
}

fn node_state(g: &Gateway, id: &str) -> String {
    let st = get(g.port, "/rsbalancer/status").json();
    let nodes = st["pools"]["llm"]["nodes"].as_array().expect("nodes").clone();
    let n = nodes.into_iter().find(|n| n["id"] == id).expect("node");
    n["state"].as_str().expect("state").to_string()
}

/// Waits until a scrape of `id` newer than the knob change brought `waiting`.
fn wait_waiting(g: &Gateway, id: &str, waiting: u64) {
    wait_until(WAIT, &format!("node {id} scraped with {waiting} waiting"), || {
        let q = queue(g, id);
        q["waiting"].as_u64() == Some(waiting) && q["stale"] == json!(false)
    });
}

/// `n` chat requests, 8 at a time: the node each was answered by (all must be 200).
fn load(g: &Gateway, n: usize) -> std::collections::BTreeMap<String, usize> {
    let answers = run_parallel(n, 8, |_| {
        let r = g.chat();
        assert_eq!(r.status, 200, "chat: {}", r.text());
        r.header("X-Node").expect("X-Node").to_string()
    });
    count(answers.iter().map(String::as_str))
}

/// How many of a `load` node `id` answered.
fn of(answers: &std::collections::BTreeMap<String, usize>, id: &str) -> usize {
    answers.get(id).copied().unwrap_or(0)
}

/// The value of the sample of `name` for node `id` in the gateway's /metrics.
fn metric(g: &Gateway, name: &str, id: &str) -> Option<f64> {
    let text = get(g.port, "/metrics").text();
    let node = format!("node=\"{id}\"");
    text.lines()
        .find(|l| l.starts_with(&format!("{name}{{")) && l.contains(&node))
        .map(|l| l.rsplit(' ').next().unwrap().parse().expect("sample value"))
}

/// The status page as headless Chromium renders it (`--dump-dom`; Debian's `chromium`,
/// as tests/nginx_admin.rs): the queue cell's text of each node of pool llm.
fn page_queue_cells(g: &Gateway, dir: &TestDir) -> Vec<(String, String)> {
    let dom = status_page_dom(g, dir);
    dom.split("<tr class=\"node\" data-id=\"")
        .skip(1)
        .map(|tr| {
            let id = tr.split('"').next().unwrap().to_string();
            let cell = tr
                .split("</tr>")
                .next()
                .unwrap()
                .split("<td class=\"c-queue")
                .nth(1)
                .unwrap_or_else(|| panic!("no queue cell for {id}:\n{dom}"));
            let text = cell.split_once('>').unwrap().1.split("</td>").next().unwrap();
            (id, text.replace("&nbsp;", " "))
        })
        .collect()
}

/// `promtool check metrics` (Debian package `prometheus`, as tests/nginx_metrics.rs)
/// finds nothing to say about `text`.
fn promtool_accepts(text: &str) {
    use std::io::Write as _;
    use std::process::{Command, Stdio};
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool (Debian: apt-get install prometheus; make deps)");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics: {said}"
    );
}

fn mock_state(m: &MockNode) -> Value {
    get(m.port, "/mock/state").json()
}

/// A node whose /metrics shows a deep waiting queue gets (almost) no new requests
/// while an equal node with an empty queue takes them; with the queue gone, both
/// share again. vLLM-style and SGLang-style nodes in one pool (kind "auto").
fn deep_queue_is_avoided(algorithm: &str) {
    let _s = serial();
    let dir = TestDir::new(&format!("queue-deep-{algorithm}"));
    let (a, b) = (MockNode::new("a", 30), MockNode::new("b", 30));
    let _mocks = start_mocks(&dir, &[a.clone(), b.clone()]);
    mock_set(&b, "metrics_style=sglang");
    let g = start_gateway(&dir, &config(algorithm, &[&a, &b]));

    // Both scraped, with empty queues: shares follow the equal weights.
    wait_waiting(&g, "a", 0);
    wait_waiting(&g, "b", 0);
    let even = load(&g, 160);
    let (ea, eb) = (
        even.get("a").copied().unwrap_or(0),
        even.get("b").copied().unwrap_or(0),
    );
    assert!(
        ea >= 30 && eb >= 30,
        "{algorithm}: with no queue both serve: {even:?}"
    );

    // a's server says 300 requests wait (another client's load).
    mock_set(&a, "queue_waiting=300&kv_usage=0.97");
    wait_waiting(&g, "a", 300);
    let skewed = load(&g, 160);
    let (sa, sb) = (
        skewed.get("a").copied().unwrap_or(0),
        skewed.get("b").copied().unwrap_or(0),
    );
    assert!(
        sa * 10 <= sb,
        "{algorithm}: the node with 300 waiting must get clearly fewer: {skewed:?} (even: {even:?})"
    );

    // (d) The figures are visible: status JSON and /metrics.
    let q = queue(&g, "a");
    assert_eq!(q["waiting"], json!(300), "{q}");
    assert_eq!(q["kv_cache_usage"], json!(0.97), "{q}");
    assert_eq!(q["failing"], json!(false), "{q}");
    assert!(
        q["backlog"].as_u64().unwrap() >= 290,
        "the backlog counts others' queue: {q}"
    );
    let qb = queue(&g, "b");
    assert_eq!(
        (qb["waiting"].clone(), qb["stale"].clone()),
        (json!(0), json!(false)),
        "{qb}"
    );
    assert!(qb["running"].is_u64(), "SGLang's running count read: {qb}");
    assert_eq!(metric(&g, "rsbalancer_node_queue_waiting", "a"), Some(300.0));
    assert_eq!(metric(&g, "rsbalancer_node_kv_cache_usage", "a"), Some(0.97));
    assert_eq!(metric(&g, "rsbalancer_node_queue_stale", "a"), Some(0.0));
    assert_eq!(metric(&g, "rsbalancer_node_queue_waiting", "b"), Some(0.0));
    promtool_accepts(&get(g.port, "/metrics").text());

    // (b) One worker scrapes: every scrape of either node came from the same worker,
    // one of the gateway's.
    let workers = g.nginx.workers();
    let mut agents = Vec::new();
    for m in [&a, &b] {
        let st = mock_state(m);
        assert!(st["scrapes"].as_u64().unwrap() >= 2, "{st}");
        assert_eq!(
            st["scrapers"],
            json!(1),
            "scrapes of {} from one worker: {st}",
            m.name
        );
        agents.push(st["last_scraper"].as_str().unwrap().to_string());
    }
    assert_eq!(agents[0], agents[1], "one scraping worker for both nodes");
    let pid: i32 = agents[0]
        .trim_start_matches("rsbalancer-scrape (worker ")
        .trim_end_matches(')')
        .parse()
        .unwrap_or_else(|_| panic!("User-Agent {:?}", agents[0]));
    assert!(workers.contains(&pid), "scraper {pid} is a worker of {workers:?}");

    // The scraping worker killed: the lease moves at once to one other worker, and
    // the figures stay fresh.
    signal(pid, libc::SIGKILL);
    let now = g.nginx.wait_workers(2, &[pid]);
    wait_until(WAIT, "scrapes by another worker", || {
        let st = mock_state(&a);
        st["scrapers"] == json!(2) && !st["last_scraper"].as_str().unwrap().contains(&pid.to_string())
    });
    let next = mock_state(&a)["last_scraper"].as_str().unwrap().to_string();
    assert!(
        now.iter()
            .any(|w| next == format!("rsbalancer-scrape (worker {w})")),
        "{next} is one of {now:?}"
    );
    mock_set(&a, "queue_waiting=7");
    wait_waiting(&g, "a", 7);
    assert_eq!(mock_state(&b)["scrapers"], json!(2), "b: the same two workers");
}

#[test]
fn p2c_ewma_avoids_a_node_with_a_deep_queue() {
    deep_queue_is_avoided("p2c_ewma");
}

#[test]
fn least_conn_avoids_a_node_with_a_deep_queue() {
    deep_queue_is_avoided("least_conn");
}

/// (c) A node whose /metrics fails (connection dropped; an HTML page; a body over
/// `max_bytes`) is flagged stale
/// and failing, logged once, never taken out, and keeps serving with no failed client
/// request; its figures come back when its /metrics does.
#[test]
fn failing_metrics_are_flagged_stale_and_never_fail_a_request() {
    let _s = serial();
    let dir = TestDir::new("queue-failing");
    let (a, b, c, d) = (
        MockNode::new("a", 20),
        MockNode::new("b", 20),
        MockNode::new("c", 20),
        MockNode::new("d", 20),
    );
    let _mocks = start_mocks(&dir, &[a.clone(), b.clone(), c.clone(), d.clone()]);
    mock_set(&a, "queue_waiting=50");
    mock_set(&c, "metrics_fail=garbage");
    mock_set(&d, "metrics_fail=huge");
    let g = start_gateway(&dir, &config("p2c_ewma", &[&a, &b, &c, &d]));
    wait_waiting(&g, "a", 50);
    wait_waiting(&g, "b", 0);

    // a's /metrics starts dropping the connection: after three intervals its 50
    // waiting no longer count, and it is flagged.
    mock_set(&a, "metrics_fail=close");
    wait_until(WAIT, "a stale and failing", || {
        let q = queue(&g, "a");
        q["stale"] == json!(true) && q["failing"] == json!(true) && q["scrape_failures"].as_u64() >= Some(5)
    });
    let qa = queue(&g, "a");
    assert_eq!(qa["backlog"], json!(0), "stale figures are ignored: {qa}");
    assert_eq!(qa["waiting"], json!(50), "the last figures are still shown: {qa}");
    for id in ["c", "d"] {
        let q = queue(&g, id);
        assert_eq!(
            (q["stale"].clone(), q["failing"].clone()),
            (json!(true), json!(true)),
            "{id}: a body without the metrics, or too long, is a failed scrape: {q}"
        );
        assert!(q.get("waiting").is_none(), "{q}");
    }
    assert_eq!(metric(&g, "rsbalancer_node_queue_stale", "a"), Some(1.0));
    assert_eq!(
        metric(&g, "rsbalancer_node_queue_waiting", "a"),
        None,
        "stale: no sample"
    );
    assert!(metric(&g, "rsbalancer_node_queue_scrape_failures_total", "c").unwrap() >= 5.0);

    // Every request succeeds, and the failing nodes take their share (they are
    // never cooled, ejected or taken down for it).
    let got = load(&g, 200);
    for id in ["a", "c", "d"] {
        assert!(of(&got, id) >= 15, "{id} keeps serving: {got:?}");
        assert_eq!(node_state(&g, id), "healthy");
    }

    // One log line per transition, not per scrape.
    let log = g.nginx.error_log();
    let lines = |what: &str, id: &str| {
        log.lines()
            .filter(|l| l.contains(&format!("node {id} (")) && l.contains(what))
            .count()
    };
    assert_eq!(lines("queue scrapes failing", "a"), 1, "{log}");
    assert_eq!(lines("queue figures stale", "a"), 1, "{log}");
    assert_eq!(lines("queue scrapes failing", "c"), 1, "{log}");
    assert_eq!(lines("queue scrapes failing", "d"), 1, "{log}");
    assert!(
        log.lines()
            .any(|l| l.contains("node d (") && l.contains("longer than 1048576 bytes")),
        "{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("node c (") && l.contains("no queue metrics in the response")),
        "{log}"
    );

    // Its /metrics back: fresh again, counted again, logged once.
    mock_set(&a, "metrics_fail=");
    wait_waiting(&g, "a", 50);
    assert_eq!(queue(&g, "a")["failing"], json!(false));

    // The status page's queue column says the same.
    let cells = page_queue_cells(&g, &dir);
    let cell = |id: &str| {
        cells
            .iter()
            .find(|(n, _)| n == id)
            .map(|(_, t)| t.as_str())
            .unwrap()
    };
    assert!(cell("a").starts_with("50 / "), "{cells:?}");
    assert!(
        cell("a").contains("in cost") && !cell("a").contains("stale"),
        "{cells:?}"
    );
    for id in ["c", "d"] {
        assert!(
            cell(id).contains("stale") && cell(id).contains("scrape failing"),
            "{cells:?}"
        );
    }
    let log = g.nginx.error_log();
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("node a (") && l.contains("queue scrapes work again"))
            .count(),
        1,
        "{log}"
    );
}
