//! The checks every section uses: ranges and ratios that name the field and the
//! value, host names, node ids, address resolution, and serde's errors turned into
//! a path and a message.

use super::*;

pub(crate) fn check_ratio(path: &str, field: &str, value: f64, max: f64) -> Result<(), ConfigError> {
    if value.is_finite() && (0.0..=max).contains(&value) {
        return Ok(());
    }
    Err(ConfigError::new(
        format!("{path}.{field}"),
        format!("{value} is out of range 0..={max}"),
    ))
}

pub(crate) fn check_range(
    path: &str,
    field: &str,
    value: u32,
    range: RangeInclusive<u32>,
) -> Result<(), ConfigError> {
    if range.contains(&value) {
        return Ok(());
    }
    Err(ConfigError::new(
        format!("{path}.{field}"),
        format!("{value} is out of range {}..={}", range.start(), range.end()),
    ))
}

/// A Host header value as the probes send it: `host` or `host:port`, the host a DNS
/// name or IPv4 address (1..=253 bytes of `[A-Za-z0-9._-]`) or an IPv6 address in
/// brackets, the port 1..=65535. Anything else (a CR or LF above all, which would
/// inject headers into every probe) is refused, naming the value.
pub(super) fn check_host_header(path: &str, host: &str) -> Result<(), ConfigError> {
    let (name, port) = match host.rsplit_once(':') {
        Some((name, port)) if !name.starts_with('[') || name.ends_with(']') => (name, Some(port)),
        _ => (host, None),
    };
    let name_ok = match name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => {
            (1..=253).contains(&name.len())
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        }
    };
    let port_ok = port.is_none_or(|p| {
        !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && matches!(p.parse::<u16>(), Ok(1..))
    });
    if name_ok && port_ok {
        return Ok(());
    }
    Err(ConfigError::new(
        path,
        format!(
            "{host:?} is not a valid host[:port] (a DNS name, an IPv4 address or [IPv6], port 1..=65535)"
        ),
    ))
}

/// 1..=64 bytes, each ASCII alphanumeric or one of `extra`.
pub(super) fn valid_name(name: &str, extra: &[u8]) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || extra.contains(&b))
}

/// Resolves `ip:port`, `[v6]:port` or `host:port`; the error message names `addr`.
pub(super) fn resolve(addr: &str) -> Result<SocketAddr, String> {
    let port_range = |port: &str| format!("{addr:?}: port {port} is out of range 1..=65535");
    if let Ok(sa) = SocketAddr::from_str(addr) {
        return match sa.port() {
            0 => Err(port_range("0")),
            _ => Ok(sa),
        };
    }
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| format!("{addr:?} has no port (expected ip:port, [v6]:port or host:port)"))?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{addr:?}: invalid port {port:?}"));
    }
    let port = match port.parse::<u16>() {
        Ok(p) if p != 0 => p,
        _ => return Err(port_range(port)),
    };
    if host.is_empty() {
        return Err(format!("{addr:?} has no host"));
    }
    if host.starts_with('[') {
        return Err(format!("{addr:?}: {host} is not an IPv6 address"));
    }
    if host.contains(':') {
        return Err(format!(
            "{addr:?}: an IPv6 address must be in brackets, as in [::1]:80"
        ));
    }
    let found: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("{addr:?} does not resolve: {e}"))?
        .collect();
    found
        .iter()
        .find(|a| a.is_ipv4())
        .or(found.first())
        .copied()
        .ok_or_else(|| format!("{addr:?} resolves to no address"))
}

/// A serde error with its path. The path names the object that holds the offending
/// key, not the key itself, for an unknown key (the message names it) and for a syntax
/// error in a key not yet read. serde_json's " at line X column Y" is dropped for data
/// errors (the path says where) and kept for syntax errors.
pub(super) fn serde_error(err: serde_path_to_error::Error<serde_json::Error>) -> ConfigError {
    use serde_path_to_error::Segment;

    let inner_message = err.inner().to_string();
    let mut segments: Vec<&Segment> = err.path().iter().collect();
    if matches!(segments.last(), Some(Segment::Unknown))
        || (err.inner().is_data() && inner_message.starts_with("unknown field `"))
    {
        segments.pop();
    }
    let mut path = String::new();
    for segment in segments {
        if !path.is_empty() && !matches!(segment, Segment::Seq { .. }) {
            path.push('.');
        }
        path.push_str(&segment.to_string());
    }
    if path.is_empty() {
        path.push_str("config");
    }

    let inner = err.into_inner();
    let mut message = inner_message;
    if inner.is_data() && inner.line() != 0 {
        let suffix = format!(" at line {} column {}", inner.line(), inner.column());
        if let Some(stripped) = message.strip_suffix(&suffix) {
            message = stripped.to_string();
        }
    }
    ConfigError::new(path, message)
}
