//! Parsing and printing of user-given quantities (sizes, rates, durations).
//!
//! Parsers say what was expected and name neither a flag nor the value: the
//! caller (the command line, or a spec's parser) knows which one was at fault
//! and names it. The newtypes ([`Size`], [`Rate`], [`Span`]) are the
//! quantities as typed values: each parses with [`FromStr`] and prints with
//! [`Display`] in a form that parses back to the same value.

use std::fmt::{self, Display};
use std::str::FromStr;
use std::time::Duration;

/// A quantity could not be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum UnitError {
    #[error("expected a size like 4096, 4K, 256M, 1G or 512MiB")]
    Size(#[source] parse_size::Error),
    #[error("expected pages/s like 50000, 20k, 1.5M, or max")]
    PageRate,
    #[error("pages/s must be between 0.001 and 10G (or max)")]
    PageRateRange,
    #[error("no unit; expected a rate like 500mbit, 1gbit, 120MiB/s or 100MB/s")]
    RateUnitMissing,
    #[error("unknown unit; expected a rate like 500mbit, 1gbit, 120MiB/s or 100MB/s")]
    RateUnit,
    #[error("expected a rate like 500mbit, 1gbit, 120MiB/s or 100MB/s")]
    RateNumber,
    #[error("must be at least 1 byte/s; expected a rate like 500mbit, 1gbit, 120MiB/s or 100MB/s")]
    RateRange,
    #[error("expected a duration like 300ms, 2s or 1m")]
    Duration(#[source] humantime::DurationError),
}

/// A page-dirtying rate: a number of pages per second, or as fast as possible.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PageRate {
    Max,
    PerSec(f64),
}

/// A memory size; K/M/G/T are binary (KiB, MiB...) because memory comes in pages.
/// Zero is returned as is: whether it makes sense is the caller's call.
pub fn parse_bytes(s: &str) -> Result<u64, UnitError> {
    parse_size::Config::new()
        .with_binary()
        .parse_size(s.trim())
        .map_err(UnitError::Size)
}

/// Page rates a guest is asked for: slow enough to teach with, far above
/// what a vCPU can reach (so pacing arithmetic never overflows).
pub const MIN_PAGE_RATE: f64 = 1e-3;
pub const MAX_PAGE_RATE: f64 = 1e10;

/// Pages per second: `20k`, `1.5M`, `50000` or `max` (k/M/G are decimal).
pub fn parse_page_rate(s: &str) -> Result<PageRate, UnitError> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("max") {
        return Ok(PageRate::Max);
    }
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
    let v = num.trim().parse::<f64>().map_err(|_| UnitError::PageRate)? * mult;
    if (MIN_PAGE_RATE..=MAX_PAGE_RATE).contains(&v) {
        Ok(PageRate::PerSec(v))
    } else {
        Err(UnitError::PageRateRange)
    }
}

/// A transfer rate in **bytes per second**. Bit units (`bit`, `kbit`, `mbit`,
/// `gbit`, `tbit`, decimal) are what networks are sold in; byte units (`B`,
/// `KB`/`MB`/`GB` decimal, `KiB`/`MiB`/`GiB` binary, optional `/s`) are what
/// memory is counted in. Units are case-insensitive; a bare number is refused
/// because bits versus bytes would be a guess.
pub fn parse_rate(s: &str) -> Result<u64, UnitError> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or(UnitError::RateUnitMissing)?;
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
        _ => return Err(UnitError::RateUnit),
    };
    let v = num.parse::<f64>().map_err(|_| UnitError::RateNumber)? * factor;
    // f64 -> u64: rounds a user-given figure; the range check keeps it from saturating.
    let rounded = v.round();
    if !(rounded >= 1.0 && rounded < u64::MAX as f64) {
        return Err(UnitError::RateRange);
    }
    Ok(rounded as u64)
}

/// A rate in bytes/s as [`parse_rate`] reads it back: bit units where the
/// rate is a whole number of them (networks), else binary byte units.
pub fn fmt_rate(bytes_per_s: u64) -> String {
    let b = bytes_per_s;
    for (unit, bytes) in [
        ("tbit", 125_000_000_000),
        ("gbit", 125_000_000),
        ("mbit", 125_000),
        ("kbit", 125),
    ] {
        if b.is_multiple_of(bytes) {
            return format!("{}{unit}", b / bytes);
        }
    }
    for (unit, bytes) in [("GiB/s", 1 << 30), ("MiB/s", 1 << 20), ("KiB/s", 1 << 10)] {
        if b.is_multiple_of(bytes) {
            return format!("{}{unit}", b / bytes);
        }
    }
    format!("{b}B/s")
}

/// A duration like `300ms`, `1s`, `120s` or `2m` (humantime syntax).
pub fn parse_duration(s: &str) -> Result<Duration, UnitError> {
    humantime::parse_duration(s.trim()).map_err(UnitError::Duration)
}

/// A memory size in bytes, typed as [`parse_bytes`] reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Size(pub u64);

impl FromStr for Size {
    type Err = UnitError;
    fn from_str(s: &str) -> Result<Self, UnitError> {
        parse_bytes(s).map(Size)
    }
}

/// The largest binary unit that divides the size: `256M`, `1G`, `4100`.
impl Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        for (unit, shift) in [("T", 40), ("G", 30), ("M", 20), ("K", 10)] {
            if b != 0 && b.is_multiple_of(1 << shift) {
                return write!(f, "{}{unit}", b >> shift);
            }
        }
        write!(f, "{b}")
    }
}

/// A transfer rate in bytes per second, typed as [`parse_rate`] reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate(pub u64);

impl FromStr for Rate {
    type Err = UnitError;
    fn from_str(s: &str) -> Result<Self, UnitError> {
        parse_rate(s).map(Rate)
    }
}

impl Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&fmt_rate(self.0))
    }
}

/// A span of time, typed as [`parse_duration`] reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span(pub Duration);

impl FromStr for Span {
    type Err = UnitError;
    fn from_str(s: &str) -> Result<Self, UnitError> {
        parse_duration(s).map(Span)
    }
}

/// humantime's form: `300ms`, `2m`, `1s 500ms`.
impl Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
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
            assert_eq!(parse_bytes(s), Ok(v), "{s}");
            assert_eq!(Size(v).to_string().parse(), Ok(Size(v)), "{s}");
        }
        assert_eq!(Size(256 << 20).to_string(), "256M");
        assert_eq!(Size(4100).to_string(), "4100");
        for s in ["-1M", "lots", "", "1Q"] {
            let e = parse_bytes(s).unwrap_err().to_string();
            assert!(e.starts_with("expected a size like"), "{e}");
        }
    }

    #[test]
    fn page_rates() {
        assert_eq!(parse_page_rate("20k"), Ok(PageRate::PerSec(20_000.0)));
        assert_eq!(parse_page_rate("20K"), Ok(PageRate::PerSec(20_000.0)));
        assert_eq!(parse_page_rate("1.5M"), Ok(PageRate::PerSec(1_500_000.0)));
        assert_eq!(parse_page_rate("50000"), Ok(PageRate::PerSec(50_000.0)));
        assert_eq!(parse_page_rate("MAX"), Ok(PageRate::Max));
        for s in ["0", "-5k", "inf", "NaN", "fast", "k", ""] {
            let e = parse_page_rate(s).unwrap_err().to_string();
            assert!(e.contains("pages/s"), "{s}: {e}");
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
            assert_eq!(parse_rate(s), Ok(v), "{s}");
            assert_eq!(Rate(v).to_string().parse(), Ok(Rate(v)), "{s}");
        }
        for (v, s) in [(125_000_000, "1gbit"), (120 << 20, "120MiB/s"), (7, "7B/s")] {
            assert_eq!(Rate(v).to_string(), s);
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
            let e = parse_rate(s).unwrap_err().to_string();
            assert!(e.contains("expected a rate like"), "{s}: {e}");
        }
    }

    #[test]
    fn durations_and_formatting() {
        assert_eq!(parse_duration("300ms"), Ok(Duration::from_millis(300)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        for d in ["300ms", "2m", "1s 500ms", "100us"] {
            let span: Span = d.parse().unwrap();
            assert_eq!(span.to_string().parse(), Ok(span), "{d}");
        }
        assert_eq!(Span(Duration::from_millis(300)).to_string(), "300ms");
        assert!(matches!(
            "soon".parse::<Span>(),
            Err(UnitError::Duration(_))
        ));
        assert_eq!(fmt_bytes(256 << 20), "256.0 MiB");
        assert_eq!(fmt_bytes(512), "512 B");
        assert_eq!(fmt_bytes(1536), "1.5 KiB");
        assert_eq!(fmt_rate_bits(117_650_000.0), "941.2 Mbit/s");
        assert_eq!(fmt_rate_bits(100.0), "800.0 bit/s");
    }
}
