//! End-to-end tests of multi-provider pools (`resty.rsbalancer.provider`, docs/providers.md,
//! "Multi-provider pools") in real nginx with 2 workers, in front of mock LLM nodes
//! that act as providers: each demands its own Host name and API key (401 / 421
//! otherwise) and records the `model` it received; one is served over TLS with a
//! certificate of a test CA made here with the `openssl` CLI.
//!
//! Run with `make build` then
//! `RSB_LUA_SO=$PWD/build/lib/rsbalancer.so cargo test --no-default-features --test
//! nginx_providers -- --test-threads=1`. Needs nginx with lua-nginx-module and the
//! `openssl` CLI; fails (never skips) without them.
//!
//! The gateway picks the node in the access phase (a test location: the node named by
//! the request's X-Rsb-Node header), applies its provider there, and the balancer sets
//! that node as the peer: `proxy_pass $rsb_scheme://llm` with the Host and TLS name
//! from `$rsb_host`.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::json;
use support::*;

const KEY_PLAIN: &str = "key-plain-AAAA1111";
const KEY_TLS: &str = "key-tls-BBBB2222";
const KEY_ADDED: &str = "key-added-CCCC3333";
const TLS_HOST: &str = "tls.provider.test";
const PLAIN_HOST: &str = "plain.provider.test";

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("openssl CLI not found ({e}): `make deps` installs it"));
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `openssl req` making a P-256 key `<name>.key` for `/CN=<subject>`, then (`extra`)
/// a self-signed certificate or a signing request.
fn openssl_req(dir: &Path, name: &str, subject: &str, extra: &[&str]) {
    let key = format!("{name}.key");
    let subj = format!("/CN={subject}");
    let mut args = vec![
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    args.extend(["-keyout", &key, "-subj", &subj]);
    args.extend(extra);
    openssl(dir, &args);
}

/// A CA (`<ca>.crt`, `<ca>.key`) made in `dir`.
fn make_ca(dir: &Path, ca: &str) {
    let crt = format!("{ca}.crt");
    openssl_req(
        dir,
        ca,
        &format!("rsbalancer test {ca}"),
        &["-x509", "-days", "2", "-out", &crt],
    );
}

/// A server certificate for `name` signed by CA `ca`: (`<out>.crt`, `<out>.key`).
fn make_cert(dir: &Path, ca: &str, out: &str, name: &str) -> (PathBuf, PathBuf) {
    let (ext, csr, crt) = (format!("{out}.ext"), format!("{out}.csr"), format!("{out}.crt"));
    std::fs::write(dir.join(&ext), format!("subjectAltName=DNS:{name}\n")).unwrap();
    openssl_req(dir, out, name, &["-out", &csr]);
    let (ca_crt, ca_key) = (format!("{ca}.crt"), format!("{ca}.key"));
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_crt,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-out",
            &crt,
            "-days",
            "2",
            "-extfile",
            &ext,
        ],
    );
    for f in [format!("{out}.crt"), format!("{out}.key")] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.join(f), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    (dir.join(format!("{out}.crt")), dir.join(format!("{out}.key")))
}

/// A mock provider: demands `host` and `key`; over TLS with `cert` when given, then
/// with its /mock/ paths also in plain HTTP on `cert.2` (the test client speaks no TLS).
fn provider_mock(
    name: &str,
    port: u16,
    host: &str,
    key: &str,
    cert: Option<(&(PathBuf, PathBuf), u16)>,
) -> MockNode {
    let mut m = MockNode::new(name, 0);
    m.port = port;
    m.server_extra =
        format!("        set $mock_require_host {host};\n        set $mock_require_key {key};\n");
    if let Some(((crt, key), plain_port)) = cert {
        m.listen_extra = " ssl".into();
        m.server_extra += &format!(
            "        listen 127.0.0.1:{plain_port};\n        ssl_certificate {};\n        ssl_certificate_key {};\n",
            crt.display(),
            key.display()
        );
    }
    m
}

/// The demo gateway with the test location in place of its /v1/: the node chosen in
/// the access phase (header X-Rsb-Node; X-Rsb-First names a node whose provider is
/// applied first, as a previous round's would have been), its provider applied, the
/// peer set by the balancer; one try per request.
fn gateway_edit(conf: String, ca: &Path) -> String {
    let ca = ca.display();
    let location = format!(
        r#"        location /v1/ {{
            client_body_buffer_size 1k;       # larger bodies go to a file: apply() reads those too
            access_by_lua_block {{
                local rsb = require "resty.rsbalancer"
                local provider = require "resty.rsbalancer.provider"
                local bal = rsb.balancer()
                local first = ngx.var.http_x_rsb_first
                if first then assert(provider.apply(assert(bal:node_index("llm", first)))) end
                local want = ngx.var.http_x_rsb_node
                local slot
                for _, n in ipairs(bal:nodes("llm")) do
                    if n.id == want then slot, ngx.ctx.ip, ngx.ctx.port = n.slot, n.ip, n.port end
                end
                if not slot then return ngx.exit(404) end
                local ok, err = provider.apply(slot)
                if not ok then
                    ngx.log(ngx.ERR, "provider: ", err)
                    return ngx.exit(400)
                end
            }}
            proxy_next_upstream off;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass $rsb_scheme://llm;
            proxy_set_header Host $rsb_host;
            proxy_ssl_server_name on;
            proxy_ssl_name $rsb_host;
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {ca};
        }}

        location = /test/add {{
            content_by_lua_block {{
                ngx.req.read_body()
                local node = require("rsbalancer").json_decode(ngx.req.get_body_data())
                local slot, err, kind = require("resty.rsbalancer").add_node("llm", node)
                if not slot then
                    ngx.status = 409
                    ngx.say(err, " (", kind, ")")
                    return
                end
                ngx.say(slot)
            }}
        }}

"#
    );
    let start = conf.find("        location /v1/ {").expect("the demo's /v1/");
    let end = conf
        .find("        location @rsb_round {")
        .expect("the demo's @rsb_round");
    let conf = format!("{}{location}{}", &conf[..start], &conf[end..]);
    let out = conf
        .replace("worker_processes 2;", "worker_processes 2;\nenv RSB_TEST_KEY_ADDED;")
        .replace("gateway-error.log notice;", "gateway-error.log info;")
        .replace(
            "http {\n",
            &format!("http {{\n    lua_ssl_trusted_certificate {ca};\n    lua_ssl_verify_depth 2;\n"),
        )
        .replace(
            "require(\"resty.rsbalancer.admin\")\n",
            "require(\"resty.rsbalancer.admin\")\n        require(\"resty.rsbalancer.provider\")\n",
        )
        .replace(
            "rsbalancer.balance(\"llm\")",
            "assert(require(\"ngx.balancer\").set_current_peer(ngx.ctx.ip, ngx.ctx.port))",
        )
        .replace(
            "add_header X-Worker $pid always;",
            "add_header X-Worker $pid always;\n        set $rsb_scheme http;\n        set $rsb_host \"\";\n        set $rsb_model \"\";",
        );
    for needle in [
        "set_current_peer(ngx.ctx.ip",
        "env RSB_TEST_KEY_ADDED;",
        "lua_ssl_trusted_certificate",
        "set $rsb_model",
    ] {
        assert!(
            out.contains(needle),
            "the demo gateway changed: {needle} not placed"
        );
    }
    out
}

/// The demo gateway as it ships (admit, balance, rounds in @rsb_round, the proxy
/// snippet nginx-conf/snippets/rsbalancer-proxy.conf) with the provider's lines in
/// place of both `proxy_pass http://llm;`: `admit()` and `round()` apply the round's
/// provider themselves (the pool's nodes have provider fields).
fn rounds_gateway_edit(conf: String, ca: &Path) -> String {
    let ca = ca.display();
    assert_eq!(
        conf.matches("proxy_pass http://llm;").count(),
        2,
        "the demo gateway changed: /v1/ and @rsb_round proxy_pass"
    );
    assert_eq!(
        conf.matches("nginx-conf/snippets/rsbalancer-proxy.conf;").count(),
        2,
        "the demo gateway changed: /v1/ and @rsb_round include the proxy snippet"
    );
    let out = conf
        .replace(
            "proxy_pass http://llm;",
            &format!(
                "proxy_pass $rsb_scheme://llm;\n            proxy_set_header Host $rsb_host;\n            \
                 proxy_ssl_server_name on;\n            proxy_ssl_name $rsb_host;\n            \
                 proxy_ssl_verify on;\n            proxy_ssl_trusted_certificate {ca};"
            ),
        )
        .replace(
            "add_header X-Worker $pid always;",
            "add_header X-Worker $pid always;\n        set $rsb_scheme http;\n        set $rsb_host \"\";\n        set $rsb_model \"\";",
        );
    assert!(out.contains("set $rsb_model"), "the demo gateway changed");
    out
}

fn chat_as(g: &Gateway, node: &str, first: Option<&str>) -> Response {
    let mut headers = vec![
        ("X-Rsb-Node", node),
        ("Authorization", "Bearer client-gateway-key"),
    ];
    if let Some(f) = first {
        headers.push(("X-Rsb-First", f));
    }
    http_with(g.port, "POST", "/v1/chat/completions", &headers, Some(CHAT_BODY)).unwrap()
}

fn node_state(g: &Gateway, id: &str) -> String {
    g.stats()[id]["state"].as_str().unwrap_or_default().to_string()
}

#[test]
fn providers_with_own_host_key_model_and_tls() {
    std::env::set_var("RSB_TEST_KEY_PLAIN", KEY_PLAIN);
    std::env::set_var("RSB_TEST_KEY_ADDED", KEY_ADDED);
    let dir = TestDir::new("providers");
    make_ca(dir.path(), "ca");
    make_ca(dir.path(), "otherca");
    let good = make_cert(dir.path(), "ca", "tls", TLS_HOST);
    let wrong = make_cert(dir.path(), "otherca", "wrong", TLS_HOST);
    let ca = dir.path().join("ca.crt");

    let plain = provider_mock("plain", free_port(), PLAIN_HOST, KEY_PLAIN, None);
    let selfhosted = MockNode::new("self", 0);
    let added = provider_mock("added", free_port(), "added.provider.test", KEY_ADDED, None);
    // Over TLS with a certificate of another CA: probed only without the check.
    let insecure_state = free_port();
    let insecure = provider_mock(
        "insecure",
        free_port(),
        TLS_HOST,
        "key-insecure",
        Some((&wrong, insecure_state)),
    );
    let mocks_dir = TestDir::new("providers-mocks");
    let _mocks = start_mocks(
        &mocks_dir,
        &[plain.clone(), selfhosted.clone(), added.clone(), insecure.clone()],
    );
    let tls_port = free_port();
    let tls_dir = TestDir::new("providers-tls");
    let tls_state = free_port();
    let tls_node = |cert| provider_mock("tls", tls_port, TLS_HOST, KEY_TLS, Some((cert, tls_state)));
    let mut tls_mock = start_mocks(&tls_dir, &[tls_node(&good)]);

    let config = json!({ "pools": { "llm": {
        "algorithm": "weighted_random", "slow_start_ms": 0,
        "health": { "path": "/health", "interval_ms": 200, "timeout_ms": 1000, "healthy": 1, "unhealthy": 2 },
        "nodes": [
            { "id": "plain", "addr": plain.addr(), "host": PLAIN_HOST, "model": "plain/model-1",
              "headers": { "Authorization": { "env": "RSB_TEST_KEY_PLAIN", "prefix": "Bearer " } } },
            { "id": "tls", "addr": format!("127.0.0.1:{tls_port}"), "scheme": "https", "host": TLS_HOST,
              "model": "org/tls-model", "headers": { "Authorization": format!("Bearer {KEY_TLS}") } },
            { "id": "self", "addr": selfhosted.addr() },
            { "id": "insecure", "addr": insecure.addr(), "scheme": "https", "host": TLS_HOST, "tls_verify": false,
              "headers": { "Authorization": "Bearer key-insecure" } }
        ]
    } } });
    let g = start_gateway_with(&dir, &config, |c| gateway_edit(c, &ca));

    // Each provider gets its own Host, key and model; the client's key never reaches it.
    for (id, port, host, model) in [
        ("plain", plain.port, PLAIN_HOST, "plain/model-1"),
        ("tls", tls_state, TLS_HOST, "org/tls-model"),
    ] {
        for _ in 0..4 {
            let r = chat_as(&g, id, None);
            assert_eq!(r.status, 200, "{id}: {}\n{}", r.text(), g.nginx.diagnostics());
            assert_eq!(r.header("X-Node"), Some(id));
        }
        let st = mock_state_idle(port);
        assert_eq!(st["last_model"], model, "{st}");
        assert_eq!(st["last_host"], host, "{st}");
        let sni = if id == "tls" { TLS_HOST } else { "" };
        assert_eq!(st["last_sni"], sni, "{st}");
        assert_eq!(st["unauthorized"], 0, "{st}");
    }
    // A body nginx buffered to a file is rewritten too, every other byte kept (the
    // mock answers prompt_tokens = its body's length / 4); a body that is not JSON
    // cannot go to a node that rewrites the model.
    let big = json!({ "model": "mock-llm", "messages": [{ "role": "user", "content": "x".repeat(20_000) }] })
        .to_string();
    let r = http_with(
        g.port,
        "POST",
        "/v1/chat/completions",
        &[("X-Rsb-Node", "tls")],
        Some(&big),
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let sent = big.len() - "mock-llm".len() + "org/tls-model".len();
    assert_eq!(r.json()["usage"]["prompt_tokens"], sent / 4);
    assert_eq!(mock_state_idle(tls_state)["last_model"], "org/tls-model");
    let r = http_with(
        g.port,
        "POST",
        "/v1/chat/completions",
        &[("X-Rsb-Node", "tls")],
        Some("not json"),
    )
    .unwrap();
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(g
        .nginx
        .error_log()
        .contains("provider: request body is not a JSON object"));

    // A node without a provider after a round at another: that provider's header is
    // gone and the client's model is back (from $rsb_model).
    let r = chat_as(&g, "self", Some("tls"));
    assert_eq!(r.status, 200, "{}", r.text());
    let st = mock_state_idle(selfhosted.port);
    assert_eq!(st["last_model"], "mock-llm", "{st}");
    // And from one provider to another: the second's key and model win.
    let r = chat_as(&g, "plain", Some("tls"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(mock_state_idle(plain.port)["last_model"], "plain/model-1");

    // Health checks probe over TLS with the node's Host and key: both UP, no 401.
    wait_until(Duration::from_secs(10), "health probes of the TLS node", || {
        get(tls_state, "/mock/state").json()["health_checks"].as_u64() > Some(2)
    });
    assert_eq!(mock_state_idle(tls_state)["unauthorized"], 0);
    assert_eq!(node_state(&g, "tls"), "healthy");
    assert_eq!(node_state(&g, "plain"), "healthy");
    // tls_verify false: the probes of a node whose certificate the CA did not sign
    // pass (the proxy still checks it: nginx's check is per location).
    wait_until(
        Duration::from_secs(10),
        "health probes of the insecure node",
        || get(insecure_state, "/mock/state").json()["health_checks"].as_u64() > Some(2),
    );
    assert_eq!(node_state(&g, "insecure"), "healthy");
    let r = chat_as(&g, "insecure", None);
    assert_eq!(r.status, 502, "{}", r.text());

    // A run-time node with an env header: read by every worker from its environment
    // (`env RSB_TEST_KEY_ADDED;`); a literal value is refused.
    let body = json!({ "id": "added", "addr": added.addr(), "host": "added.provider.test",
                       "headers": { "Authorization": { "env": "RSB_TEST_KEY_ADDED", "prefix": "Bearer " } } });
    let r = post(g.port, "/test/add", &body.to_string());
    assert_eq!(r.status, 200, "{}", r.text());
    let lit = json!({ "id": "lit", "addr": added.addr(), "headers": { "Authorization": "Bearer x" } });
    let r = post(g.port, "/test/add", &lit.to_string());
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(
        r.text().contains("a literal value cannot be set at run time"),
        "{}",
        r.text()
    );
    // So does the HTTP admin API; its answer shows the variable, not the value.
    let r = post(g.port, "/rsbalancer/pools/llm/nodes", &lit.to_string());
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(
        r.text().contains("a literal value cannot be set at run time"),
        "{}",
        r.text()
    );
    let mut body2 = body.clone();
    body2["id"] = json!("added2");
    let r = post(g.port, "/rsbalancer/pools/llm/nodes", &body2.to_string());
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["provider"]["headers"][0]["env"], "RSB_TEST_KEY_ADDED");
    assert!(!r.text().contains(KEY_ADDED));
    let r = chat_as(&g, "added2", None);
    assert_eq!(r.status, 200, "{}", r.text());
    let workers = run_parallel(16, 4, |_| {
        let r = chat_as(&g, "added", None);
        assert_eq!(r.status, 200, "{}", r.text());
        r.header("X-Worker").unwrap().to_string()
    });
    assert_eq!(
        count(workers.iter().map(String::as_str)).len(),
        2,
        "both workers served: {workers:?}"
    );
    assert_eq!(mock_state_idle(added.port)["unauthorized"], 0);

    // A TLS node whose certificate the CA did not sign goes DOWN, and comes back UP
    // with the right one.
    tls_mock.stop();
    let wrong_dir = TestDir::new("providers-wrong");
    let mut wrong_mock = start_mocks(&wrong_dir, &[tls_node(&wrong)]);
    wait_until(Duration::from_secs(15), "the TLS node DOWN", || {
        node_state(&g, "tls") == "down"
    });
    let r = chat_as(&g, "tls", None);
    assert_eq!(
        r.status,
        502,
        "the proxy verifies the certificate too: {}",
        r.text()
    );
    wrong_mock.stop();
    let back_dir = TestDir::new("providers-back");
    let _back = start_mocks(&back_dir, &[tls_node(&good)]);
    wait_until(Duration::from_secs(15), "the TLS node UP", || {
        node_state(&g, "tls") != "down"
    });
    let r = chat_as(&g, "tls", None);
    assert_eq!(r.status, 200, "{}", r.text());

    // A reload reads the keys again in the master (the new workers inherit them).
    let old = g.nginx.workers();
    g.nginx.signal(libc::SIGHUP);
    g.nginx.wait_workers(2, &old);
    for id in ["plain", "tls"] {
        let r = chat_as(&g, id, None);
        assert_eq!(r.status, 200, "{id} after a reload: {}", r.text());
    }
    assert_eq!(mock_state_idle(plain.port)["unauthorized"], 0);

    // No key anywhere an operator or another process can read.
    let status = get(g.port, "/rsbalancer/status").text();
    let state = get(g.port, "/rsbalancer/").text();
    let metrics = get(g.port, "/metrics").text();
    let access = std::fs::read_to_string(dir.path().join("gateway-access.log")).unwrap();
    let error = g.nginx.error_log();
    assert!(
        error.contains("TLS handshake"),
        "the DOWN reason is logged:\n{error}"
    );
    let st: serde_json::Value = serde_json::from_str(&status).unwrap();
    let nodes = st["pools"]["llm"]["nodes"].as_array().unwrap();
    let shown = nodes.iter().find(|n| n["id"] == "plain").unwrap();
    assert_eq!(
        shown["provider"],
        json!({ "host": PLAIN_HOST, "scheme": "http", "tls_verify": true, "model": "plain/model-1",
                "headers": [{ "name": "Authorization", "env": "RSB_TEST_KEY_PLAIN", "prefix": "Bearer " }] })
    );
    for (what, text) in [
        ("status", &status),
        ("admin GET", &state),
        ("metrics", &metrics),
        ("access log", &access),
        ("error log", &error),
    ] {
        for key in [KEY_PLAIN, KEY_TLS, KEY_ADDED] {
            assert!(!text.contains(key), "{what} holds a key:\n{text}");
        }
    }
}

/// The example (nginx-conf/example-deepseek.conf + .json) with its paths pointed at
/// this checkout and its nodes at 127.0.0.1 (the providers' names need DNS).
fn example_deepseek(dir: &TestDir, addrs: [&str; 2], ca: &Path, port: u16) -> PathBuf {
    let json = std::fs::read_to_string(repo().join("nginx-conf/example-deepseek.json")).unwrap();
    assert!(json.contains("\"api.deepseek.com:443\"") && json.contains("\"api.provider-b.example:443\""));
    // The Host and TLS name default to the address's host: kept as the provider's.
    let json = json
        .replace(
            "\"api.deepseek.com:443\"",
            &format!("\"{}\", \"host\": \"api.deepseek.com\"", addrs[0]),
        )
        .replace(
            "\"api.provider-b.example:443\"",
            &format!("\"{}\", \"host\": \"api.provider-b.example\"", addrs[1]),
        );
    let json = dir.write("deepseek.json", &json);
    let text = std::fs::read_to_string(repo().join("nginx-conf/example-deepseek.conf")).unwrap();
    for needle in [
        "env DEEPSEEK_API_KEY;",
        "proxy_pass $rsb_scheme://deepseek;",
        "proxy_set_header Host $rsb_host;",
        "proxy_ssl_server_name on;",
        "proxy_ssl_name $rsb_host;",
        "proxy_ssl_verify on;",
        "rsbalancer.admit(\"deepseek\")",
        "rsbalancer.round(\"deepseek\")",
        "/usr/local/share/rsbalancer/nginx/rsbalancer-proxy.conf;",
    ] {
        assert!(text.contains(needle), "example-deepseek.conf lacks {needle}");
    }
    let d = dir.path().display();
    let conf = example_conf(dir, &text, "rsbalancer-deepseek", &json)
        .replace("/etc/ssl/certs/ca-certificates.crt", &ca.display().to_string())
        .replace(
            "events {",
            &format!("pid {d}/example.pid;\nerror_log {d}/example-error.log info;\nevents {{"),
        )
        .replace(
            "http {\n",
            &format!(
                "http {{\n    access_log {d}/example-access.log;\n    client_body_temp_path {d}/tmp/body;\n    \
                 proxy_temp_path {d}/tmp/proxy;\n    fastcgi_temp_path {d}/tmp/fastcgi;\n    \
                 uwsgi_temp_path {d}/tmp/uwsgi;\n    scgi_temp_path {d}/tmp/scgi;\n"
            ),
        )
        .replace("worker_processes auto;", "worker_processes 2;")
        .replace("listen 127.0.0.1:8080;", &format!("listen 127.0.0.1:{port};"));
    dir.write("example-deepseek.conf", &conf)
}

#[test]
fn example_deepseek_conf_passes_nginx_t_and_serves() {
    let dir = TestDir::new("example-deepseek");
    std::fs::create_dir_all(dir.path().join("logs")).unwrap();
    make_ca(dir.path(), "ca");
    let cert = make_cert(dir.path(), "ca", "ds", "api.deepseek.com");
    let cert_b = make_cert(dir.path(), "ca", "b", "api.provider-b.example");
    let ca = dir.path().join("ca.crt");
    let (ds_port, ds_state, b_state) = (free_port(), free_port(), free_port());
    let other = provider_mock(
        "b",
        free_port(),
        "api.provider-b.example",
        "key-b-DDDD4444",
        Some((&cert_b, b_state)),
    );
    let port = free_port();
    let conf = example_deepseek(&dir, [&format!("127.0.0.1:{ds_port}"), &other.addr()], &ca, port);

    // nginx -t checks the pool config, variables included.
    std::env::remove_var("DEEPSEEK_API_KEY");
    std::env::set_var("PROVIDER_B_API_KEY", "key-b-DDDD4444");
    let out = nginx_test_config(dir.path(), &conf);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "nginx -t passed without DEEPSEEK_API_KEY:\n{err}"
    );
    assert!(
        err.contains("pools.deepseek.nodes[0].headers.Authorization.env: environment variable \"DEEPSEEK_API_KEY\" is not set"),
        "{err}"
    );
    std::env::set_var("DEEPSEEK_API_KEY", "key-ds-EEEE5555");
    let out = nginx_test_config(dir.path(), &conf);
    assert!(
        out.status.success(),
        "nginx -t:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // And it serves: DeepSeek over TLS with its name, key and model; the other
    // provider with its own. (The names resolve nowhere here: the JSON's addresses
    // point at the mocks, the Host and TLS names stay the providers'.)
    let mocks_dir = TestDir::new("example-deepseek-mocks");
    let ds = provider_mock(
        "ds",
        ds_port,
        "api.deepseek.com",
        "key-ds-EEEE5555",
        Some((&cert, ds_state)),
    );
    let _mocks = start_mocks(&mocks_dir, &[ds, other.clone()]);
    let nginx = Nginx::start(
        &dir,
        "example",
        &conf,
        &dir.path().join("example-error.log"),
        &[port],
    );
    nginx.wait_workers(2, &[]);
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..40 {
        let r = http_with(
            port,
            "POST",
            "/v1/chat/completions",
            &[("Authorization", "Bearer client")],
            Some(CHAT_BODY),
        )
        .unwrap();
        assert_eq!(r.status, 200, "{}\n{}", r.text(), nginx.diagnostics());
        seen.insert(r.header("X-Node").unwrap().to_string());
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["b", "ds"]);
    let st = mock_state_idle(ds_state);
    assert_eq!(
        (st["last_model"].as_str(), st["last_sni"].as_str()),
        (Some("deepseek-chat"), Some("api.deepseek.com"))
    );
    let st = mock_state_idle(b_state);
    assert_eq!(st["last_model"], "deepseek-ai/DeepSeek-V3");
    assert_eq!(st["last_sni"], "api.provider-b.example");
    assert_eq!(st["unauthorized"], 0);
    // DeepSeek busy: every request is still answered, by the other provider.
    let r = post(ds_state, "/mock/set?fail=429", "");
    assert_eq!(r.status, 200, "{}", r.text());
    for _ in 0..10 {
        let r = http_with(port, "POST", "/v1/chat/completions", &[], Some(CHAT_BODY)).unwrap();
        assert_eq!(r.status, 200, "{}\n{}", r.text(), nginx.diagnostics());
        assert_eq!(r.header("X-Node"), Some("b"));
    }
    let logs = nginx.error_log() + &std::fs::read_to_string(dir.path().join("example-access.log")).unwrap();
    assert!(!logs.contains("key-ds-") && !logs.contains("key-b-"));
}

/// A pool of one provider (two nodes with the same Host, key and model) behind the
/// demo gateway's admission and rounds: `admit()` applies the provider in the access
/// phase before any node is picked (`apply_pool`), and a retry inside the round (one
/// node answers 429) carries the same key and model to the other node.
#[test]
fn one_provider_pool_behind_admission_and_rounds() {
    std::env::set_var("RSB_TEST_KEY_ONE", "key-one-FFFF6666");
    let dir = TestDir::new("providers-rounds");
    make_ca(dir.path(), "ca");
    let cert = make_cert(dir.path(), "ca", "one", TLS_HOST);
    let ca = dir.path().join("ca.crt");
    let (s1, s2) = (free_port(), free_port());
    let mut busy = provider_mock(
        "busy",
        free_port(),
        TLS_HOST,
        "key-one-FFFF6666",
        Some((&cert, s1)),
    );
    busy.fail = "429".into();
    busy.retry_after = 1;
    let ok = provider_mock("ok", free_port(), TLS_HOST, "key-one-FFFF6666", Some((&cert, s2)));
    let mocks_dir = TestDir::new("providers-rounds-mocks");
    let _mocks = start_mocks(&mocks_dir, &[busy.clone(), ok.clone()]);
    let node = |id: &str, m: &MockNode| {
        json!({ "id": id, "addr": m.addr(), "scheme": "https", "host": TLS_HOST, "model": "org/one",
                "headers": { "Authorization": { "env": "RSB_TEST_KEY_ONE", "prefix": "Bearer " } } })
    };
    let config = json!({ "pools": { "llm": {
        "algorithm": "weighted_random", "slow_start_ms": 0,
        "retry": { "budget_ratio": 1.0, "min_per_s": 10000 },
        "nodes": [node("busy", &busy), node("ok", &ok)]
    } } });
    let g = start_gateway_with(&dir, &config, |c| rounds_gateway_edit(c, &ca));
    for _ in 0..12 {
        let r = http_with(
            g.port,
            "POST",
            "/v1/chat/completions",
            &[("Authorization", "Bearer client")],
            Some(CHAT_BODY),
        )
        .unwrap();
        assert_eq!(r.status, 200, "{}\n{}", r.text(), g.nginx.diagnostics());
        assert_eq!(r.header("X-Node"), Some("ok"));
    }
    let st = mock_state_idle(s2);
    assert_eq!(
        (st["last_model"].as_str(), st["last_sni"].as_str()),
        (Some("org/one"), Some(TLS_HOST))
    );
    assert_eq!(st["unauthorized"], 0, "{st}");
    // The busy node was tried too (its 429s retried on the other node), with the key.
    let st = mock_state_idle(s1);
    assert!(st["received"].as_u64() > Some(0), "{st}");
    assert_eq!(st["unauthorized"], 0, "{st}");
    let log = g.nginx.error_log();
    assert!(!log.contains("key-one-"), "{log}");
}

/// Two providers of one model in one pool behind the demo gateway's admission and
/// rounds: one in plain HTTP (its Host, key A, model "m-plain"), one over TLS (its
/// Host, key B, model "org/m-tls"). While one answers every request 429, requests
/// reach the other within the same client request, through a new round that rebuilds
/// the upstream request for it (Host, key, model); then the other way round.
#[test]
fn two_providers_fail_over_both_ways_through_rounds() {
    std::env::set_var("RSB_TEST_KEY_A", "key-a-GGGG7777");
    std::env::set_var("RSB_TEST_KEY_B", "key-b-HHHH8888");
    let dir = TestDir::new("providers-failover");
    make_ca(dir.path(), "ca");
    let cert = make_cert(dir.path(), "ca", "tls", TLS_HOST);
    let ca = dir.path().join("ca.crt");
    let tls_plain = free_port();
    let plain = provider_mock("plain", free_port(), PLAIN_HOST, "key-a-GGGG7777", None);
    let tls = provider_mock(
        "tls",
        free_port(),
        TLS_HOST,
        "key-b-HHHH8888",
        Some((&cert, tls_plain)),
    );
    let mocks_dir = TestDir::new("providers-failover-mocks");
    let _mocks = start_mocks(&mocks_dir, &[plain.clone(), tls.clone()]);
    let config = json!({ "pools": { "llm": {
        "algorithm": "weighted_random", "slow_start_ms": 0,
        "nodes": [
            { "id": "plain", "addr": plain.addr(), "host": PLAIN_HOST, "model": "m-plain",
              "headers": { "Authorization": { "env": "RSB_TEST_KEY_A", "prefix": "Bearer " } } },
            { "id": "tls", "addr": tls.addr(), "scheme": "https", "host": TLS_HOST, "model": "org/m-tls",
              "headers": { "Authorization": { "env": "RSB_TEST_KEY_B", "prefix": "Bearer " } } }
        ]
    } } });
    let g = start_gateway_with(&dir, &config, |c| rounds_gateway_edit(c, &ca));
    // (busy node, its /mock/ port, the other node, its /mock/ port, the other's model)
    let phases = [
        ("plain", plain.port, "tls", tls_plain, "org/m-tls"),
        ("tls", tls_plain, "plain", plain.port, "m-plain"),
    ];
    for (busy, busy_port, other, other_port, model) in phases {
        let r = post(busy_port, "/mock/set?fail=429&retry_after=1", "");
        assert_eq!(r.status, 200, "{}", r.text());
        let r = post(other_port, "/mock/set?fail=", "");
        assert_eq!(r.status, 200, "{}", r.text());
        let before = mock_state_idle(busy_port)["received"].as_u64().unwrap();
        let mut moved = 0;
        for _ in 0..16 {
            let r = http_with(
                g.port,
                "POST",
                "/v1/chat/completions",
                &[("Authorization", "Bearer client-key")],
                Some(CHAT_BODY),
            )
            .unwrap();
            assert_eq!(r.status, 200, "{}\n{}", r.text(), g.nginx.diagnostics());
            assert_eq!(r.header("X-Node"), Some(other), "{r:?}");
            if r.header("X-Upstream-Addr").unwrap_or("").contains(" : ") {
                moved += 1;
            }
        }
        let st = mock_state_idle(other_port);
        assert_eq!(st["last_model"].as_str(), Some(model), "{st}");
        assert_eq!(st["unauthorized"], 0, "{st}");
        let tried_busy = mock_state_idle(busy_port)["received"].as_u64().unwrap() - before;
        assert_eq!(
            tried_busy as usize, moved,
            "every try of {busy} ended its round busy and moved on"
        );
        assert!(
            moved >= 1,
            "no request went to {busy} first (16 weighted_random picks)"
        );
        assert_eq!(
            mock_state_idle(busy_port)["unauthorized"],
            0,
            "wrong key sent to {busy}"
        );
        // Let the busy node's cooldown run out before the next phase.
        std::thread::sleep(Duration::from_millis(1100));
    }
    let logs = g.nginx.error_log();
    assert!(
        !logs.contains("key-a-") && !logs.contains("key-b-"),
        "a key in the error log"
    );
}
