//! The layering of `src/` (docs/architecture.md): every file imports only from its own
//! layer or lower ones. Reads each file's `crate::` paths (outside `#[cfg(test)]`
//! modules and comments) and fails on one that reaches a higher layer, naming it.

use std::collections::BTreeMap;
use std::path::Path;

/// Layers from the bottom; a module belongs to the first layer whose list holds its
/// path or a prefix of it (`shm` holds `shm/layout`).
const LAYERS: &[&[&str]] = &[
    &[
        "abi", "shm", "select", "load", "limit", "health", "retry", "headers", "strict", "writer", "model",
        "notice", "ask", "headroom", "stream", "prefix", "fleet",
    ],
    &["config"],
    &["budget", "window", "tally"],
    &["node", "topology", "scrape", "discovery/keep"],
    &["params"],
    &["admission/queue", "admission/fleet"],
    &["balancer"],
    &[
        "admission",
        "canary",
        "emergency",
        "admin",
        "provider",
        "scrape/report",
        "cluster",
        "discovery",
    ],
    &["status", "metrics"],
    &["ffi", "lua", "lib"],
];

fn layer_of(module: &str) -> usize {
    // The longest listed prefix decides (`admission/queue` before `admission`).
    let mut best: Option<(usize, usize)> = None;
    for (layer, names) in LAYERS.iter().enumerate() {
        for name in *names {
            let hit = module == *name || module.starts_with(&format!("{name}/"));
            if hit && best.is_none_or(|(len, _)| name.len() > len) {
                best = Some((name.len(), layer));
            }
        }
    }
    best.map(|(_, l)| l).unwrap_or_else(|| {
        panic!("src/{module}.rs is in no layer of tests/layers.rs (and docs/architecture.md)")
    })
}

fn modules(dir: &Path, base: &Path, out: &mut BTreeMap<String, String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            modules(&path, base, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let rel = path.strip_prefix(base).unwrap().with_extension("");
            let mut name = rel.to_string_lossy().replace('\\', "/");
            if let Some(parent) = name.strip_suffix("/mod") {
                name = parent.to_string();
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let code = text.split("#[cfg(test)]").next().unwrap().to_string();
            out.insert(name, code);
        }
    }
}

/// `crate::a::b` paths of a file, as module names (`a/b` when that is a file).
fn imports(code: &str, known: &BTreeMap<String, String>) -> Vec<String> {
    let mut out = Vec::new();
    for line in code.lines() {
        let line = line.split("//").next().unwrap();
        let mut rest = line;
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            let segs: Vec<&str> = rest
                .split("::")
                .take(2)
                .map(|s| {
                    s.split(|c: char| !(c.is_ascii_lowercase() || c == '_'))
                        .next()
                        .unwrap()
                })
                .collect();
            let two = segs.join("/");
            let name = if segs.len() == 2 && known.contains_key(&two) {
                two
            } else {
                segs[0].to_string()
            };
            if known.contains_key(&name) {
                out.push(name);
            }
        }
    }
    out
}

#[test]
fn imports_only_run_down_the_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = BTreeMap::new();
    modules(&src, &src, &mut files);
    let mut upward = Vec::new();
    for (module, code) in &files {
        let mine = layer_of(module);
        for target in imports(code, &files) {
            if target == *module || module.starts_with(&format!("{target}/")) {
                continue; // itself, or a file of the module it belongs to
            }
            if layer_of(&target) > mine {
                upward.push(format!(
                    "src/{module} (layer {mine}) imports {target} (layer {})",
                    layer_of(&target)
                ));
            }
        }
    }
    upward.sort();
    upward.dedup();
    assert!(
        upward.is_empty(),
        "imports that run up the layers:\n{}",
        upward.join("\n")
    );
}

#[test]
fn the_scan_sees_imports() {
    // The scan itself: a file that names a higher layer is caught.
    let mut files = BTreeMap::new();
    files.insert("node".to_string(), String::new());
    files.insert("balancer".to_string(), String::new());
    let found = imports(
        "use crate::balancer::Balancer; // crate::node in a comment",
        &files,
    );
    assert_eq!(found, ["balancer"]);
    assert!(layer_of("balancer") > layer_of("node"));
    assert_eq!(layer_of("admission/queue"), 5);
    assert_eq!(layer_of("admission"), 7);
}
