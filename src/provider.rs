//! What the proxy path sends each node of a pool: scheme, Host (and TLS name), the
//! node's request headers with their values, and the model its requests are rewritten
//! to (`crate::config::provider` for the fields and the secrets policy).
//!
//! This is the one place a header's value leaves process memory, for the request to
//! the node: the topology names the headers and their variables, and the values come
//! from the handle's [`Secrets`](crate::config::Secrets) (the configs loaded in this
//! process), or, for a node a run-time `add_node` in another worker brought, from this
//! process's own environment (nginx's `env VAR;`). The Lua side asks once per
//! topology generation (`bal:node_requests(pool)`, `resty.rsbalancer.provider`).

use crate::balancer::{Balancer, Error};
use crate::config::{Scheme, Secret};

/// One node's request to its provider.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeRequest {
    pub slot: u32,
    pub scheme: Scheme,
    /// Host header and TLS SNI.
    pub host: String,
    pub tls_verify: bool,
    /// Name and value of each header the node sets, in name order.
    pub headers: Vec<(String, Secret)>,
    /// Headers whose value this process does not have (a variable that is not set
    /// here): named so the caller can log them, and not sent.
    pub missing: Vec<String>,
    pub model: Option<String>,
}

/// Every node of `pool` (plain nodes too: http, the host of their address, nothing
/// else), in the topology's order.
pub fn requests(b: &Balancer, pool: &str) -> Result<Vec<NodeRequest>, Error> {
    let topo = b.topology()?;
    let p = topo
        .pool(pool)
        .ok_or_else(|| Error::Invalid(format!("unknown pool \"{pool}\"")))?;
    Ok(p.nodes
        .iter()
        .map(|n| {
            let mut r = NodeRequest {
                slot: n.slot,
                scheme: Scheme::Http,
                host: n.host.clone(),
                tls_verify: true,
                headers: Vec::new(),
                missing: Vec::new(),
                model: None,
            };
            if let Some(pv) = &n.provider {
                r.scheme = pv.scheme;
                r.host = pv.host.clone();
                r.tls_verify = pv.tls_verify;
                r.model = pv.model.clone();
                for h in &pv.headers {
                    match b.secrets().value(pool, &n.id, h) {
                        Some(v) => r.headers.push((h.name.clone(), v)),
                        None => r.missing.push(h.name.clone()),
                    }
                }
            }
            r
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, NodeConfig};

    #[test]
    fn requests_carry_values_topology_does_not() {
        std::env::set_var("RSB_TEST_PROVIDER_KEY", "sk-provider-1");
        let cfg = Config::from_json(
            r#"{"pools": {"llm": {"nodes": [
            {"id": "plain", "addr": "127.0.0.1:8001"},
            {"id": "p", "addr": "127.0.0.1:8443", "scheme": "https", "host": "api.example.com",
             "model": "m2", "headers": {"Authorization": {"env": "RSB_TEST_PROVIDER_KEY", "prefix": "Bearer "},
                                        "X-Lit": "lit-secret"}}]}}}"#,
        )
        .unwrap();
        let b = Balancer::create(&cfg).unwrap();
        let r = requests(&b, "llm").unwrap();
        assert_eq!(
            (r[0].scheme, r[0].host.as_str(), r[0].model.as_deref()),
            (Scheme::Http, "127.0.0.1", None)
        );
        assert!(r[0].headers.is_empty());
        assert_eq!(
            (r[1].scheme, r[1].host.as_str(), r[1].model.as_deref()),
            (Scheme::Https, "api.example.com", Some("m2"))
        );
        let h: Vec<(&str, &str)> = r[1]
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.expose()))
            .collect();
        assert_eq!(
            h,
            [("Authorization", "Bearer sk-provider-1"), ("X-Lit", "lit-secret")]
        );
        // Nothing that other processes or read models see holds a value.
        let text = String::from_utf8(
            b.region()
                .read_text(&b.region().lock(std::time::Duration::from_secs(1)).unwrap()),
        )
        .unwrap();
        let status = crate::status::of(&b).unwrap().to_string();
        let flat = b.topology().unwrap().pool("llm").unwrap().flat().to_string();
        for shown in [&text, &status, &flat] {
            assert!(
                !shown.contains("sk-provider") && !shown.contains("lit-secret"),
                "{shown}"
            );
        }
        assert!(
            text.contains("RSB_TEST_PROVIDER_KEY") && text.contains("X-Lit"),
            "{text}"
        );

        // A run-time change rebuilds the config from the topology: values stay.
        crate::admin::remove_node(&b, "llm", "plain").unwrap();
        let r = requests(&b, "llm").unwrap();
        assert_eq!(r[0].headers.len(), 2, "{r:?}");
        // add_node: env values only, read here.
        std::env::set_var("RSB_TEST_PROVIDER_KEY2", "sk-provider-2");
        let mut node = NodeConfig {
            id: "q".into(),
            addr: "127.0.0.1:9".into(),
            ..NodeConfig::default()
        };
        node.headers.insert(
            "X-Lit".into(),
            crate::config::HeaderSource::Literal(Secret::new("lit".into())),
        );
        let e = crate::admin::add_node(&b, "llm", node.clone()).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("headers.X-Lit: a literal value cannot be set at run time"),
            "{e}"
        );
        node.headers.clear();
        node.headers.insert(
            "Authorization".into(),
            crate::config::HeaderSource::Env {
                env: "RSB_TEST_PROVIDER_UNSET".into(),
                prefix: String::new(),
            },
        );
        let e = crate::admin::add_node(&b, "llm", node.clone()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "headers.Authorization.env: environment variable \"RSB_TEST_PROVIDER_UNSET\" is not set (nginx workers see only the variables named by an `env` directive)"
        );
        node.headers.insert(
            "Authorization".into(),
            crate::config::HeaderSource::Env {
                env: "RSB_TEST_PROVIDER_KEY2".into(),
                prefix: String::new(),
            },
        );
        crate::admin::add_node(&b, "llm", node).unwrap();
        let r = requests(&b, "llm").unwrap();
        assert_eq!(r[1].headers[0].1.expose(), "sk-provider-2");
        assert_eq!(r[0].headers[0].1.expose(), "Bearer sk-provider-1");
    }
}
