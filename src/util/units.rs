//! Parsing and printing of user-given quantities (sizes, rates, durations).
//!
//! One error type for every command-line value, so a bad value is always
//! reported the same way: the flag, the value as typed, and what was expected.

use std::time::Duration;

/// A value given on the command line (or inside a spec) could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    #[error("invalid {flag} \"{value}\": {reason}")]
    Invalid {
        flag: String,
        value: String,
        reason: String,
    },
}

impl UnitError {
    pub fn new(flag: &str, value: &str, reason: impl Into<String>) -> Self {
        UnitError::Invalid {
            flag: flag.to_owned(),
            value: value.to_owned(),
            reason: reason.into(),
        }
    }
}

/// A page-dirtying rate: a number of pages per second, or as fast as possible.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PageRate {
    Max,
    PerSec(f64),
}

/// A memory size; K/M/G/T are binary (KiB, MiB...) because memory comes in pages.
/// Zero is returned as is: whether it makes sense is the caller's call.
pub fn parse_bytes(flag: &str, s: &str) -> Result<u64, UnitError> {
    parse_size::Config::new()
        .with_binary()
        .parse_size(s.trim())
        .map_err(|e| {
            UnitError::new(
                flag,
                s,
                format!("expected a size like 4096, 4K, 256M, 1G or 512MiB ({e})"),
            )
        })
}

/// Pages per second: `20k`, `1.5M`, `50000` or `max` (k/M/G are decimal).
/// Page rates a guest is asked for: slow enough to teach with, far above
/// what a vCPU can reach (so pacing arithmetic never overflows).
pub const MIN_PAGE_RATE: f64 = 1e-3;
pub const MAX_PAGE_RATE: f64 = 1e10;

pub fn parse_page_rate(flag: &str, s: &str) -> Result<PageRate, UnitError> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("max") {
        return Ok(PageRate::Max);
    }
    let bad = || UnitError::new(flag, s, "expected pages/s like 50000, 20k, 1.5M, or max");
    let (num, mult) = match t
        .char_indices()
        .last()
        .map(|(i, c)| (i, c.to_ascii_lowercase()))
    {
        Some((i, 'k')) => (&t[..i], 1e3),
        Some((i, 'm')) => (&t[..i], 1e6),
        Some((i, 'g')) => (&t[..i], 1e9),
        _ => (t, 1.0),
    };
    let v = num.trim().parse::<f64>().map_err(|_| bad())? * mult;
    if (MIN_PAGE_RATE..=MAX_PAGE_RATE).contains(&v) {
        Ok(PageRate::PerSec(v))
    } else {
        Err(UnitError::new(
            flag,
            s,
            "pages/s must be between 0.001 and 10G (or max)",
        ))
    }
}

/// A transfer rate in **bytes per second**. Bit units (`bit`, `kbit`, `mbit`,
/// `gbit`, `tbit`, decimal) are what networks are sold in; byte units (`B`,
/// `KB`/`MB`/`GB` decimal, `KiB`/`MiB`/`GiB` binary, optional `/s`) are what
/// memory is counted in. Units are case-insensitive; a bare number is refused
/// because bits versus bytes would be a guess.
pub fn parse_rate(flag: &str, s: &str) -> Result<u64, UnitError> {
    let bad = |why: &str| {
        UnitError::new(
            flag,
            s,
            format!("{why}expected a rate like 500mbit, 1gbit, 120MiB/s or 100MB/s"),
        )
    };
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| bad("no unit; "))?;
    let (num, unit) = t.split_at(split);
    let unit = unit.trim().to_ascii_lowercase();
    let unit = unit.strip_suffix("/s").unwrap_or(&unit);
    let factor = match unit {
        "bit" => 1.0 / 8.0,
        "kbit" => 1e3 / 8.0,
        "mbit" => 1e6 / 8.0,
        "gbit" => 1e9 / 8.0,
        "tbit" => 1e12 / 8.0,
        "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        _ => return Err(bad("unknown unit; ")),
    };
    let v = num.parse::<f64>().map_err(|_| bad(""))? * factor;
    // f64 -> u64: rounds a user-given figure; the range check keeps it from saturating.
    let rounded = v.round();
    if !(rounded >= 1.0 && rounded < u64::MAX as f64) {
        return Err(bad("must be at least 1 byte/s; "));
    }
    Ok(rounded as u64)
}

/// A duration like `300ms`, `1s`, `120s` or `2m` (humantime syntax).
pub fn parse_duration(flag: &str, s: &str) -> Result<Duration, UnitError> {
    humantime::parse_duration(s.trim()).map_err(|e| {
        UnitError::new(
            flag,
            s,
            format!("expected a duration like 300ms, 2s or 1m ({e})"),
        )
    })
}

/// `256.0 MiB`: binary units, as memory is sized. (u64 -> f64 only loses
/// precision far below the one decimal printed.)
pub fn fmt_bytes(bytes: u64) -> String {
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64;
    let mut unit = "B";
    for u in ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"] {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.1} {unit}")
}

/// `941.2 Mbit/s`: decimal bit units, as links are rated.
pub fn fmt_rate_bits(bytes_per_s: f64) -> String {
    let mut v = bytes_per_s * 8.0;
    let mut unit = "bit/s";
    for u in ["kbit/s", "Mbit/s", "Gbit/s", "Tbit/s"] {
        if v.abs() < 1000.0 {
            break;
        }
        v /= 1000.0;
        unit = u;
    }
    format!("{v:.1} {unit}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes() {
        for (s, v) in [
            ("256M", 256 << 20),
            ("32M", 32 << 20),
            ("1G", 1 << 30),
            ("4K", 4096),
            ("1GiB", 1 << 30),
            ("512MiB", 512 << 20),
            ("4096", 4096),
            ("0", 0),
        ] {
            assert_eq!(parse_bytes("--memory", s), Ok(v), "{s}");
        }
        for s in ["-1M", "lots", "", "1Q"] {
            let e = parse_bytes("--memory", s).unwrap_err().to_string();
            assert!(e.starts_with(&format!("invalid --memory \"{s}\"")), "{e}");
        }
    }

    #[test]
    fn page_rates() {
        assert_eq!(
            parse_page_rate("rate", "20k"),
            Ok(PageRate::PerSec(20_000.0))
        );
        assert_eq!(
            parse_page_rate("rate", "20K"),
            Ok(PageRate::PerSec(20_000.0))
        );
        assert_eq!(
            parse_page_rate("rate", "1.5M"),
            Ok(PageRate::PerSec(1_500_000.0))
        );
        assert_eq!(
            parse_page_rate("rate", "50000"),
            Ok(PageRate::PerSec(50_000.0))
        );
        assert_eq!(parse_page_rate("rate", "MAX"), Ok(PageRate::Max));
        for s in ["0", "-5k", "inf", "NaN", "fast", "k", ""] {
            let e = parse_page_rate("rate", s).unwrap_err().to_string();
            assert!(e.contains(&format!("rate \"{s}\"")), "{e}");
        }
    }

    #[test]
    fn rates() {
        for (s, v) in [
            ("500mbit", 62_500_000),
            ("1gbit", 125_000_000),
            ("1.5gbit", 187_500_000),
            ("100kbit", 12_500),
            ("10Gbit", 1_250_000_000),
            ("800bit", 100),
            ("120MiB/s", 120 << 20),
            ("1GiB/s", 1 << 30),
            ("100MB/s", 100_000_000),
            ("500KB/s", 500_000),
            ("1000B/s", 1000),
            ("64MiB", 64 << 20),
        ] {
            assert_eq!(parse_rate("--bandwidth", s), Ok(v), "{s}");
        }
        for s in [
            "1000",
            "0mbit",
            "1bit",
            "fast",
            "5 furlongs",
            "1.2.3mbit",
            "-5mbit",
            "",
        ] {
            let e = parse_rate("--bandwidth", s).unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("invalid --bandwidth \"{s}\"")),
                "{e}"
            );
        }
    }

    #[test]
    fn durations_and_formatting() {
        assert_eq!(
            parse_duration("--downtime", "300ms"),
            Ok(Duration::from_millis(300))
        );
        assert_eq!(
            parse_duration("--max-time", "2m"),
            Ok(Duration::from_secs(120))
        );
        assert!(parse_duration("--max-time", "soon")
            .unwrap_err()
            .to_string()
            .contains("--max-time \"soon\""));
        assert_eq!(fmt_bytes(256 << 20), "256.0 MiB");
        assert_eq!(fmt_bytes(512), "512 B");
        assert_eq!(fmt_bytes(1536), "1.5 KiB");
        assert_eq!(fmt_rate_bits(117_650_000.0), "941.2 Mbit/s");
        assert_eq!(fmt_rate_bits(100.0), "800.0 bit/s");
    }
}
