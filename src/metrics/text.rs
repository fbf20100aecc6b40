//! The Prometheus text format (0.0.4) as `metrics` writes it: sample values, label
//! escaping, `# HELP` / `# TYPE` lines, and families of samples (plain, one per label
//! value, histograms) over a list of snapshots.

use std::fmt::Write as _;

/// A sample value: integers print as integers, floats in Prometheus' float syntax.
#[derive(Clone, Copy)]
pub(super) enum Num {
    U(u64),
    F(f64),
}

impl From<u64> for Num {
    fn from(v: u64) -> Num {
        Num::U(v)
    }
}

impl From<u32> for Num {
    fn from(v: u32) -> Num {
        Num::U(v as u64)
    }
}

impl From<f64> for Num {
    fn from(v: f64) -> Num {
        Num::F(v)
    }
}

pub(super) fn write_num(out: &mut String, v: Num) {
    match v {
        Num::U(u) => {
            let _ = write!(out, "{u}");
        }
        Num::F(f) if f.is_nan() => out.push_str("NaN"),
        Num::F(f) if f.is_infinite() => out.push_str(if f > 0.0 { "+Inf" } else { "-Inf" }),
        Num::F(f) => {
            let _ = write!(out, "{f}");
        }
    }
}

/// Appends `s` as a label value: backslash, double quote and newline escaped.
pub(super) fn escape_label(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// `k1="v1",k2="v2"` (escaped), without braces.
pub(super) fn labels(pairs: &[(&str, &str)]) -> String {
    let mut s = String::new();
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(k);
        s.push_str("=\"");
        escape_label(&mut s, v);
        s.push('"');
    }
    s
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// `# HELP` and `# TYPE` of a family.
pub(super) fn family(out: &mut String, name: &str, kind: Kind, help: &str) {
    let kind = match kind {
        Kind::Counter => "counter",
        Kind::Gauge => "gauge",
        Kind::Histogram => "histogram",
    };
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// One sample line: `name{labels,extra} value`.
pub(super) fn sample(out: &mut String, name: &str, labels: &str, extra: &str, v: impl Into<Num>) {
    out.push_str(name);
    if !labels.is_empty() || !extra.is_empty() {
        out.push('{');
        out.push_str(labels);
        if !labels.is_empty() && !extra.is_empty() {
            out.push(',');
        }
        out.push_str(extra);
        out.push('}');
    }
    out.push(' ');
    write_num(out, v.into());
    out.push('\n');
}

/// A histogram family, one histogram per item: `f(item)` gives its buckets (not
/// cumulative; `bounds_ms` then +Inf) and its sum in seconds.
pub(super) fn histogram_family<T>(
    out: &mut String,
    items: &[T],
    labels_of: fn(&T) -> &str,
    (name, help): (&str, &str),
    bounds_ms: &[u32],
    f: impl Fn(&T) -> (&[u64], f64),
) {
    family(out, name, Kind::Histogram, help);
    let les: Vec<String> = bounds_ms
        .iter()
        .map(|&ms| {
            let mut s = String::from("le=\"");
            write_num(&mut s, Num::F(ms as f64 / 1000.0));
            s.push('"');
            s
        })
        .chain(std::iter::once("le=\"+Inf\"".to_string()))
        .collect();
    let (bucket, sum, count) = (
        format!("{name}_bucket"),
        format!("{name}_sum"),
        format!("{name}_count"),
    );
    for it in items {
        let (hist, sum_s) = f(it);
        let mut cumulative = 0u64;
        for (le, v) in les.iter().zip(hist) {
            cumulative += v;
            sample(out, &bucket, labels_of(it), le, cumulative);
        }
        sample(out, &sum, labels_of(it), "", sum_s);
        sample(out, &count, labels_of(it), "", cumulative);
    }
}

/// A family with one sample per node or per pool: name, type, help, value.
pub(super) type Field<T> = (&'static str, Kind, &'static str, fn(&T) -> Num);

/// Writes each family of `fields` with one sample per item of `items`.
pub(super) fn simple_families<T>(
    out: &mut String,
    items: &[T],
    labels_of: fn(&T) -> &str,
    fields: &[Field<T>],
) {
    for (name, kind, help, f) in fields {
        family(out, name, *kind, help);
        for it in items {
            sample(out, name, labels_of(it), "", f(it));
        }
    }
}

/// A family with one sample per item and value of a label (`label=v` for each of
/// `values`), from `f(item, value index)`.
pub(super) fn labelled_family<T>(
    out: &mut String,
    items: &[T],
    labels_of: fn(&T) -> &str,
    (name, kind, help): (&str, Kind, &str),
    label: &str,
    values: &[&str],
    f: impl Fn(&T, usize) -> Num,
) {
    family(out, name, kind, help);
    for it in items {
        for (i, v) in values.iter().enumerate() {
            sample(out, name, labels_of(it), &labels(&[(label, v)]), f(it, i));
        }
    }
}
