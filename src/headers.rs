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
}
