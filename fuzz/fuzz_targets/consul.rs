//! The Consul answer reader and parser (`rsbalancer::discovery::consul`): never panic
//! on any bytes, and every node they let through is within bounds: an id of at most
//! 64 bytes of `[A-Za-z0-9._:@-]`, unique; a port of 1..=65535; a weight in the weight
//! range; no more nodes than entries. The first byte picks the config (tags, weight
//! key) and whether the rest is a whole HTTP response or a body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rsbalancer::config::consul::ConsulDiscovery;
use rsbalancer::discovery::consul::{parse, read_response};

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let cfg = ConsulDiscovery {
        service: "deepseek-api".into(),
        tags: if first & 1 == 1 {
            vec!["v1.2".into()]
        } else {
            Vec::new()
        },
        weight_meta: if first & 2 == 2 {
            "w".into()
        } else {
            "weight".into()
        },
        ..ConsulDiscovery::default()
    };
    let body = if first & 4 == 4 {
        match read_response(rest) {
            Ok(a) => a.body,
            Err(_) => return,
        }
    } else {
        rest.to_vec()
    };
    let Ok(p) = parse(&body, &cfg) else {
        return;
    };
    let mut ids = std::collections::HashSet::new();
    for n in &p.nodes {
        assert!(n.id.len() <= 64 && !n.id.is_empty(), "{n:?}");
        assert!(
            n.id.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._:@-".contains(&b)),
            "{n:?}"
        );
        assert!(ids.insert(n.id.clone()), "{n:?} twice");
        assert!(n.addr.port() >= 1, "{n:?}");
        assert!((1..=10_000).contains(&n.weight), "{n:?}");
    }
});
