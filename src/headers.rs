//! Response headers from upstream nodes, parsed and bounded in one place.
//!
//! Everything a node says about itself is untrusted: a Retry-After of `4000000`, an
//! HTTP-date in 2099, `inf` or `99999999999` must not rest a node for weeks (or wrap
//! to some random span). This module turns the header text into milliseconds,
//! saturating at a bound, and refuses anything that is not the syntax RFC 9110
//! §10.2.3 allows (delay-seconds, or an HTTP-date); the pool's policy cap
//! (`cooldown.max_retry_after_ms`) is applied by the balancer's report.
//!
//! Accepted beyond the RFC, because providers send it: a fractional delay
//! (`1.5`, read to the millisecond). Not accepted: signs, exponents, hex, `inf`,
//! `nan`, trailing garbage.
//!
//! Provider headroom headers (`crate::headroom`) are parsed here too, as strictly:
//!
//! - [`count`]: a remaining count (`x-ratelimit-remaining-tokens: 149984`), digits
//!   only, saturating at a cap;
//! - [`reset_ms`]: when a limit resets, either as OpenAI writes it, a Go-style duration
//!   (`6m0s`, `1.5s`, `20ms`, `1h2m3.5s`, `0s`; units `h`, `m`, `s`, `ms`, `us`, `µs`,
//!   `ns`; rounded up to the millisecond), or as Anthropic does, an RFC 3339 timestamp
//!   (`2026-12-06T06:00:30Z`, fraction and `±hh:mm` offset allowed);
//! - [`millis`]: Azure's and OpenAI's `retry-after-ms` (`1500`, `1500.5`: a fraction
//!   rounds up).
//!
//! Each saturates at the caller's cap instead of wrapping, and gives `None` for
//! anything that is not its syntax.

/// The largest Retry-After any caller is told (ms): one day, the upper bound of
/// `cooldown.max_retry_after_ms`.
pub const RETRY_AFTER_MAX_MS: u32 = 86_400_000;

/// Parse a Retry-After value: delay-seconds (optionally with a fraction) or an
/// HTTP-date (IMF-fixdate, RFC 850 or asctime). Returns milliseconds from
/// `now_unix_ms`, at most `cap_ms`; a date in the past gives 0; `None` when the value
/// is not a Retry-After.
pub fn retry_after_ms(value: &[u8], now_unix_ms: u64, cap_ms: u32) -> Option<u32> {
    let v = value.trim_ascii();
    if v.is_empty() {
        return None;
    }
    let ms = if v[0].is_ascii_digit() {
        delay_ms(v)?
    } else {
        let date_ms = http_date_s(v)?.saturating_mul(1000);
        date_ms.saturating_sub(now_unix_ms)
    };
    Some(ms.min(cap_ms as u64) as u32)
}

/// `1*DIGIT [ "." 1*DIGIT ]` seconds as milliseconds, saturating.
fn delay_ms(v: &[u8]) -> Option<u64> {
    let (int, frac) = match v.iter().position(|&c| c == b'.') {
        Some(dot) => (&v[..dot], Some(&v[dot + 1..])),
        None => (v, None),
    };
    if int.is_empty() || !int.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let secs = int.iter().fold(0u64, |acc, &d| {
        acc.saturating_mul(10).saturating_add((d - b'0') as u64)
    });
    let mut ms = secs.saturating_mul(1000);
    if let Some(f) = frac {
        if f.is_empty() || !f.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let mut scale = 100;
        for &d in f.iter().take(3) {
            ms = ms.saturating_add((d - b'0') as u64 * scale);
            scale /= 10;
        }
    }
    Some(ms)
}

const MONTHS: [&[u8; 3]; 12] = [
    b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec",
];

/// An HTTP-date as seconds since the Unix epoch (RFC 9110 §5.6.7: IMF-fixdate
/// `Sun, 06 Nov 1994 08:49:37 GMT`, obsolete RFC 850 `Sunday, 06-Nov-94 08:49:37 GMT`
/// and asctime `Sun Nov  6 08:49:37 1994`). The weekday is not checked.
fn http_date_s(v: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(v).ok()?;
    let mut it = s.split_ascii_whitespace();
    let first = it.next()?;
    let (day, month, year, time) = if let Some(wd) = first.strip_suffix(',') {
        if wd.len() == 3 {
            // IMF-fixdate: day month year time GMT
            let day = it.next()?;
            let month = it.next()?;
            let year = it.next()?;
            let time = it.next()?;
            (day, month, year, time)
        } else {
            // RFC 850: dd-Mon-yy time GMT
            let mut dmy = it.next()?.split('-');
            let (day, month, yy) = (dmy.next()?, dmy.next()?, dmy.next()?);
            if dmy.next().is_some() || yy.len() != 2 {
                return None;
            }
            let time = it.next()?;
            // Two-digit years: 70-99 are 19xx, the rest 20xx (RFC 9110 says to read a
            // year more than 50 years ahead as the past one).
            let y: u64 = digits(yy)?;
            let year = if y >= 70 { 1900 + y } else { 2000 + y };
            if it.next()? != "GMT" || it.next().is_some() {
                return None;
            }
            return civil_s(digits(day)?, month_of(month)?, year, time);
        }
    } else {
        // asctime: Mon day time year
        let month = it.next()?;
        let day = it.next()?;
        let time = it.next()?;
        let year = it.next()?;
        if it.next().is_some() {
            return None;
        }
        return civil_s(digits(day)?, month_of(month)?, digits(year)?, time);
    };
    if it.next()? != "GMT" || it.next().is_some() || year.len() != 4 {
        return None;
    }
    civil_s(digits(day)?, month_of(month)?, digits(year)?, time)
}

fn digits(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 4 || !s.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn month_of(s: &str) -> Option<u64> {
    MONTHS
        .iter()
        .position(|m| m.as_slice() == s.as_bytes())
        .map(|i| i as u64 + 1)
}

/// Seconds since the epoch of a civil date and `hh:mm:ss` (UTC), after checking ranges.
fn civil_s(day: u64, month: u64, year: u64, time: &str) -> Option<u64> {
    let mut hms = time.split(':');
    let (h, m, s) = (digits(hms.next()?)?, digits(hms.next()?)?, digits(hms.next()?)?);
    if hms.next().is_some() || h > 23 || m > 59 || s > 60 || !(1970..=9999).contains(&year) {
        return None;
    }
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if day == 0 || day > month_days[month as usize - 1] {
        return None;
    }
    // Days from the epoch (Howard Hinnant's days_from_civil, for years >= 1970).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + m * 60 + s)
}

/// A remaining count (`1*DIGIT`, surrounding blanks allowed), saturating at `cap`.
pub fn count(value: &[u8], cap: u64) -> Option<u64> {
    let v = value.trim_ascii();
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(saturating_digits(v).min(cap))
}

fn saturating_digits(v: &[u8]) -> u64 {
    v.iter().fold(0u64, |acc, &d| {
        acc.saturating_mul(10).saturating_add((d - b'0') as u64)
    })
}

/// `retry-after-ms`: whole milliseconds, a fraction rounding up; at most `cap_ms`.
pub fn millis(value: &[u8], cap_ms: u32) -> Option<u32> {
    let v = value.trim_ascii();
    let (int, frac) = match v.iter().position(|&c| c == b'.') {
        Some(dot) => (&v[..dot], Some(&v[dot + 1..])),
        None => (v, None),
    };
    if int.is_empty() || !int.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let mut ms = saturating_digits(int);
    if let Some(f) = frac {
        if f.is_empty() || !f.iter().all(u8::is_ascii_digit) {
            return None;
        }
        if f.iter().any(|&d| d != b'0') {
            ms = ms.saturating_add(1);
        }
    }
    Some(ms.min(cap_ms as u64) as u32)
}

/// When a rate limit resets, in milliseconds from now (at most `cap_ms`): a Go-style
/// duration (OpenAI: `6m0s`, `1.5s`, `20ms`) or an RFC 3339 timestamp (Anthropic: a
/// moment in the past gives 0).
pub fn reset_ms(value: &[u8], now_unix_ms: u64, cap_ms: u32) -> Option<u32> {
    let v = value.trim_ascii();
    let ms = if v.len() >= 5 && v[4] == b'-' {
        rfc3339_ms(v)?.saturating_sub(now_unix_ms)
    } else {
        duration_us(v)?.div_ceil(1000)
    };
    Some(ms.min(cap_ms as u64) as u32)
}

/// A Go `time.Duration` string as microseconds (saturating; nanoseconds round up):
/// one or more `number unit` with number `1*DIGIT ["." 1*DIGIT]`, or `0`.
fn duration_us(v: &[u8]) -> Option<u64> {
    if v == b"0" {
        return Some(0);
    }
    if v.is_empty() || v.len() > 64 {
        return None;
    }
    let (mut i, mut total_ns) = (0, 0u128);
    while i < v.len() {
        let start = i;
        while i < v.len() && (v[i].is_ascii_digit() || v[i] == b'.') {
            i += 1;
        }
        let num = &v[start..i];
        let unit_start = i;
        while i < v.len() && !(v[i].is_ascii_digit() || v[i] == b'.') {
            i += 1;
        }
        let scale_ns: u128 = match &v[unit_start..i] {
            b"h" => 3_600_000_000_000,
            b"m" => 60_000_000_000,
            b"s" => 1_000_000_000,
            b"ms" => 1_000_000,
            b"us" | [0xc2, 0xb5, b's'] | [0xce, 0xbc, b's'] => 1_000,
            b"ns" => 1,
            _ => return None,
        };
        let (int, frac) = match num.iter().position(|&c| c == b'.') {
            Some(dot) => (&num[..dot], &num[dot + 1..]),
            None => (num, &b""[..]),
        };
        let dot = int.len() < num.len();
        if int.is_empty() || (dot && frac.is_empty()) || frac.contains(&b'.') {
            return None;
        }
        // At most 64 bytes: 20 digits of integer part fit a u128 times any scale.
        let mut part = saturating_digits(int) as u128 * scale_ns;
        let mut place = scale_ns;
        for &d in frac.iter().take(12) {
            place /= 10;
            part += (d - b'0') as u128 * place;
        }
        if place > 0 && frac.iter().skip(12).any(|&d| d != b'0') {
            part += 1;
        }
        total_ns = total_ns.saturating_add(part);
    }
    Some(u64::try_from(total_ns.div_ceil(1000)).unwrap_or(u64::MAX))
}

/// An RFC 3339 date-time (`2026-12-06T06:00:30.25Z`, `...+02:00`) as Unix ms.
fn rfc3339_ms(v: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(v).ok()?;
    if s.len() < 20 || !s.is_char_boundary(10) || !s.is_char_boundary(19) {
        return None;
    }
    let (date, rest) = (&s[..10], &s[10..]);
    let sep = rest.as_bytes()[0];
    if !matches!(sep, b'T' | b't' | b' ') {
        return None;
    }
    let (time, mut tail) = (&rest[1..9], &rest[9..]);
    let b = date.as_bytes();
    if b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let (year, month, day) = (digits(&date[..4])?, digits(&date[5..7])?, digits(&date[8..10])?);
    if !(1..=12).contains(&month) || time.as_bytes().get(2) != Some(&b':') {
        return None;
    }
    let secs = civil_s(day, month, year, time)?;
    let mut ms = 0u64;
    if let Some(f) = tail.strip_prefix('.') {
        let n = f.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 || n > 18 {
            return None;
        }
        let mut scale = 100;
        for d in f[..n].bytes().take(3) {
            ms += (d - b'0') as u64 * scale;
            scale /= 10;
        }
        // Sub-millisecond digits round up: a reset is never taken as earlier.
        if f[..n].bytes().skip(3).any(|d| d != b'0') {
            ms += 1;
        }
        tail = &f[n..];
    }
    let offset_s: i64 = match tail {
        "Z" | "z" => 0,
        _ => {
            let t = tail.as_bytes();
            if t.len() != 6 || !matches!(t[0], b'+' | b'-') || t[3] != b':' {
                return None;
            }
            let (h, m) = (digits(&tail[1..3])?, digits(&tail[4..6])?);
            if h > 23 || m > 59 {
                return None;
            }
            let o = (h * 3600 + m * 60) as i64;
            if t[0] == b'+' {
                o
            } else {
                -o
            }
        }
    };
    let utc = (secs as i64).checked_sub(offset_s)?;
    Some(u64::try_from(utc).ok()?.saturating_mul(1000).saturating_add(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 784_111_777_000; // Sun, 06 Nov 1994 08:49:37 GMT
    const CAP: u32 = 3_600_000;

    #[test]
    fn delay_seconds() {
        assert_eq!(retry_after_ms(b"0", NOW, CAP), Some(0));
        assert_eq!(retry_after_ms(b"  120 ", NOW, CAP), Some(120_000));
        assert_eq!(retry_after_ms(b"1.5", NOW, CAP), Some(1_500));
        assert_eq!(retry_after_ms(b"0.0209", NOW, CAP), Some(20));
    }

    #[test]
    fn huge_values_saturate_at_the_cap_never_wrap() {
        assert_eq!(retry_after_ms(b"4000000", NOW, CAP), Some(CAP));
        assert_eq!(retry_after_ms(b"99999999999", NOW, CAP), Some(CAP));
        assert_eq!(retry_after_ms(&[b'9'; 400], NOW, CAP), Some(CAP));
        assert_eq!(retry_after_ms(b"4000000", NOW, u32::MAX), Some(4_000_000_000));
    }

    #[test]
    fn garbage_is_not_a_retry_after() {
        for bad in [
            &b""[..],
            b" ",
            b"inf",
            b"-5",
            b"+5",
            b"1e3",
            b"0x10",
            b"nan",
            b"5s",
            b"1.",
            b".5",
            b"1.2.3",
            b"Sun, 06 Nov 1994 08:49:37",
            b"Sun, 31 Feb 2026 08:49:37 GMT",
            b"Sun, 06 Nov 1994 25:49:37 GMT",
            b"Sun, 06 Foo 1994 08:49:37 GMT",
            b"\xff\xfe",
        ] {
            assert_eq!(
                retry_after_ms(bad, NOW, CAP),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn http_dates_in_all_three_forms() {
        let later = b"Sun, 06 Nov 1994 08:50:07 GMT";
        assert_eq!(retry_after_ms(later, NOW, CAP), Some(30_000));
        assert_eq!(
            retry_after_ms(b"Sunday, 06-Nov-94 08:50:07 GMT", NOW, CAP),
            Some(30_000)
        );
        assert_eq!(
            retry_after_ms(b"Sun Nov  6 08:50:07 1994", NOW, CAP),
            Some(30_000)
        );
        // In the past: come back now.
        assert_eq!(
            retry_after_ms(b"Sat, 05 Nov 1994 08:49:37 GMT", NOW, CAP),
            Some(0)
        );
        // Far future: the cap.
        assert_eq!(
            retry_after_ms(b"Thu, 01 Jan 2099 00:00:00 GMT", NOW, CAP),
            Some(CAP)
        );
    }

    #[test]
    fn civil_dates_match_known_epochs() {
        assert_eq!(civil_s(1, 1, 1970, "00:00:00"), Some(0));
        assert_eq!(civil_s(6, 11, 1994, "08:49:37"), Some(784_111_777));
        assert_eq!(civil_s(29, 2, 2000, "00:00:00"), Some(951_782_400));
        assert_eq!(civil_s(29, 2, 2100, "00:00:00"), None);
        assert_eq!(civil_s(4, 12, 2026, "03:32:22"), Some(1_796_355_142));
    }
    #[test]
    fn counts_are_digits_and_saturate() {
        assert_eq!(count(b" 149984 ", u64::MAX), Some(149_984));
        assert_eq!(count(b"0", 10), Some(0));
        assert_eq!(count(b"99999999999999999999999999", 1_000), Some(1_000));
        for bad in [&b""[..], b"-1", b"1.5", b"1e3", b"12a", b"inf"] {
            assert_eq!(count(bad, 10), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn retry_after_ms_header() {
        assert_eq!(millis(b"1500", CAP), Some(1_500));
        assert_eq!(millis(b"20.1", CAP), Some(21));
        assert_eq!(millis(b"20.000", CAP), Some(20));
        assert_eq!(millis(b"99999999999999", CAP), Some(CAP));
        for bad in [&b""[..], b"-5", b"1.", b".5", b"5s", b"1e3"] {
            assert_eq!(millis(bad, CAP), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn openai_durations() {
        let r = |v: &[u8]| reset_ms(v, NOW, CAP);
        assert_eq!(r(b"6m0s"), Some(360_000));
        assert_eq!(r(b"1.5s"), Some(1_500));
        assert_eq!(r(b"20ms"), Some(20));
        assert_eq!(reset_ms(b"1h2m3.5s", NOW, u32::MAX), Some(3_723_500));
        assert_eq!(r(b"0s"), Some(0));
        assert_eq!(r(b"0"), Some(0));
        assert_eq!(r(b"17.001ms"), Some(18), "rounded up");
        assert_eq!(r(b"500us"), Some(1));
        assert_eq!(r("250\u{b5}s".as_bytes()), Some(1));
        assert_eq!(r(b"1ns"), Some(1));
        assert_eq!(r(b"2562047h47m16.854775807s"), Some(CAP), "saturates at the cap");
        assert_eq!(reset_ms(b"9999999999h", NOW, u32::MAX), Some(u32::MAX));
        for bad in [
            &b""[..],
            b"s",
            b"5",
            b"1.s",
            b".5s",
            b"1.2.3s",
            b"5x",
            b"-5s",
            b"5 s",
            b"1e3s",
            b"inf",
            &[b'1'; 80],
        ] {
            assert_eq!(r(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn rfc3339_resets() {
        // NOW is 1994-11-06T08:49:37Z.
        let r = |v: &[u8]| reset_ms(v, NOW, CAP);
        assert_eq!(r(b"1994-11-06T08:49:39Z"), Some(2_000));
        assert_eq!(r(b"1994-11-06T08:49:37.250Z"), Some(250));
        assert_eq!(r(b"1994-11-06T08:49:37.0001Z"), Some(1), "rounded up");
        assert_eq!(r(b"1994-11-06t09:49:40+01:00"), Some(3_000));
        assert_eq!(r(b"1994-11-06T03:49:40-05:00"), Some(3_000));
        assert_eq!(r(b"1994-11-06T08:49:00Z"), Some(0), "in the past");
        assert_eq!(r(b"2099-01-01T00:00:00Z"), Some(CAP));
        for bad in [
            &b"1994-11-06T08:49:39"[..],
            b"1994-11-06T08:49:39+0100",
            b"1994-13-06T08:49:39Z",
            b"1994-02-30T08:49:39Z",
            b"1994-11-06T24:49:39Z",
            b"1994-11-06X08:49:39Z",
            b"1994-11-06T08:49:39.Z",
            b"1994-11-06T08-49-39Z",
            b"1994-11-06T08:49:39+24:00",
            "1994-11-06T08:49:3\u{e9}Z".as_bytes(),
        ] {
            assert_eq!(r(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
