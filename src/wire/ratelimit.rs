//! Bandwidth policy (what `--bandwidth` asks for) and the token bucket that
//! enforces it on the wire. Rates are bytes per second throughout.

use crate::util::cancel::Cancel;
use crate::util::units::{fmt_rate, parse_rate, UnitError};
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

const EXPECTED: &str =
    "expected unlimited, a rate like 500mbit, 1gbit, 120MiB/s, or dynamic:min=RATE,max=RATE,inc=RATE";

/// A bandwidth that cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BandwidthError {
    /// Not a rate (the unit parser's reason adds nothing to the list).
    #[error("{EXPECTED}")]
    Rate,
    #[error("limits below 1mbit are not supported")]
    TooSlow,
    #[error("\"{0}\" is not KEY=RATE ({EXPECTED})")]
    NotKeyValue(String),
    #[error("unknown key \"{0}\" ({EXPECTED})")]
    UnknownKey(String),
    #[error("{0} given twice ({EXPECTED})")]
    Twice(String),
    #[error("{key}=\"{value}\" is not a rate ({EXPECTED})")]
    KeyRate {
        key: String,
        value: String,
        #[source]
        source: UnitError,
    },
    #[error("{0}=RATE is missing ({EXPECTED})")]
    Missing(&'static str),
    #[error("min ({min} B/s) is above max ({max} B/s) ({EXPECTED})")]
    MinAboveMax { min: u64, max: u64 },
}

/// What --bandwidth asks for (bytes/s).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Bandwidth {
    Unlimited,
    Static {
        bytes_per_s: u64,
    },
    /// Clark et al. (NSDI'05) adaptive limit: each round's limit follows the
    /// previous round's dirty rate plus `inc`, within `[min, max]`.
    Dynamic {
        min: u64,
        max: u64,
        inc: u64,
    },
}

/// The lowest limit accepted, 1 Mbit/s: far slower links would leave the
/// receiver waiting for one frame longer than its I/O timeout.
pub const MIN_RATE: u64 = 125_000;

impl Bandwidth {
    /// Limit for round 0 (None = unlimited). Dynamic starts at min.
    pub fn initial_limit(&self) -> Option<u64> {
        match *self {
            Bandwidth::Unlimited => None,
            Bandwidth::Static { bytes_per_s } => Some(bytes_per_s),
            Bandwidth::Dynamic { min, .. } => Some(min),
        }
    }

    /// Clark et al. NSDI'05: next round's limit = last round's dirty rate + inc,
    /// clamped to [min, max]. Static/unlimited: unchanged. Pure, so the
    /// simulator and model reuse it.
    pub fn next_limit(&self, last_dirty_rate_bytes_per_s: f64) -> Option<u64> {
        let Bandwidth::Dynamic { min, max, inc } = *self else {
            return self.initial_limit();
        };
        // f64::max drops NaN; u64 -> f64 of a rate is exact enough.
        let want = last_dirty_rate_bytes_per_s.max(0.0) + inc as f64;
        if want >= max as f64 {
            Some(max)
        } else {
            // f64 -> u64: in range (below max) and a measured figure, truncation is harmless.
            Some((want as u64).max(min))
        }
    }

    /// Dynamic only: the dirty rate exceeds max, so iterating cannot converge.
    pub fn dirty_rate_above_max(&self, dirty_rate_bytes_per_s: f64) -> bool {
        matches!(*self, Bandwidth::Dynamic { max, .. } if dirty_rate_bytes_per_s > max as f64)
    }

    /// The highest limit this bandwidth ever imposes (None = unlimited).
    pub fn max(&self) -> Option<u64> {
        match *self {
            Bandwidth::Unlimited => None,
            Bandwidth::Static { bytes_per_s } => Some(bytes_per_s),
            Bandwidth::Dynamic { max, .. } => Some(max),
        }
    }
}

impl FromStr for Bandwidth {
    type Err = BandwidthError;

    /// `unlimited` | RATE | `dynamic:min=RATE,max=RATE,inc=RATE` (keys in any order, all required).
    fn from_str(s: &str) -> Result<Bandwidth, BandwidthError> {
        let t = s.trim();
        if t.eq_ignore_ascii_case("unlimited") {
            return Ok(Bandwidth::Unlimited);
        }
        let Some(spec) = t.strip_prefix("dynamic:") else {
            let bytes_per_s = parse_rate(t).map_err(|_| BandwidthError::Rate)?;
            if bytes_per_s < MIN_RATE {
                return Err(BandwidthError::TooSlow);
            }
            return Ok(Bandwidth::Static { bytes_per_s });
        };
        let mut vals: [Option<u64>; 3] = [None; 3];
        for kv in spec.split(',') {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| BandwidthError::NotKeyValue(kv.into()))?;
            let slot = match k.trim() {
                "min" => &mut vals[0],
                "max" => &mut vals[1],
                "inc" => &mut vals[2],
                other => return Err(BandwidthError::UnknownKey(other.into())),
            };
            if slot.is_some() {
                return Err(BandwidthError::Twice(k.into()));
            }
            let rate = parse_rate(v).map_err(|source| BandwidthError::KeyRate {
                key: k.into(),
                value: v.into(),
                source,
            })?;
            *slot = Some(rate);
        }
        let [min, max, inc] = vals;
        let need = |v: Option<u64>, k| v.ok_or(BandwidthError::Missing(k));
        let (min, max, inc) = (need(min, "min")?, need(max, "max")?, need(inc, "inc")?);
        if min > max {
            return Err(BandwidthError::MinAboveMax { min, max });
        }
        if min < MIN_RATE {
            return Err(BandwidthError::TooSlow);
        }
        Ok(Bandwidth::Dynamic { min, max, inc })
    }
}

/// The form [`Bandwidth::from_str`] reads back: `unlimited`, `1gbit`,
/// `dynamic:min=100mbit,max=1gbit,inc=50mbit`.
impl fmt::Display for Bandwidth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Bandwidth::Unlimited => f.write_str("unlimited"),
            Bandwidth::Static { bytes_per_s } => f.write_str(&fmt_rate(bytes_per_s)),
            Bandwidth::Dynamic { min, max, inc } => write!(
                f,
                "dynamic:min={},max={},inc={}",
                fmt_rate(min),
                fmt_rate(max),
                fmt_rate(inc)
            ),
        }
    }
}

/// A token bucket on bytes, shared by every stream of a migration (a clone
/// is the same bucket), so the limit applies to the migration as a whole.
#[derive(Clone, Debug)]
pub struct RateLimiter {
    inner: Arc<Mutex<Bucket>>,
}

#[derive(Debug)]
struct Bucket {
    limit: Option<u64>,
    /// Bytes that may be sent now; negative = debt from a large send.
    tokens: f64,
    last: Instant,
    /// Its firing ends every wait at once (see [`RateLimiter::set_cancel`]).
    cancel: Option<Cancel>,
    /// Bytes booked so far, limited or not ([`RateLimiter::bytes_through`]).
    through: u64,
}

impl Bucket {
    /// Bytes/s as f64; at least 1 so a zero limit crawls instead of dividing by zero.
    fn rate(&self) -> Option<f64> {
        self.limit.map(|l| l.max(1) as f64)
    }

    /// Bucket depth: max(64 KiB, 10 ms worth), enough to absorb scheduling jitter.
    fn burst(rate: f64) -> f64 {
        (rate / 100.0).max(64.0 * 1024.0)
    }

    fn refill(&mut self, now: Instant) {
        if let Some(rate) = self.rate() {
            let add = now.duration_since(self.last).as_secs_f64() * rate;
            self.tokens = (self.tokens + add).min(Self::burst(rate));
        }
        self.last = now;
    }

    /// Book `bytes` sent at `now`; how long their sender must wait until
    /// the debt is paid (zero: none). Time is a parameter so that tests
    /// check the pacing exactly, without a clock.
    fn take(&mut self, bytes: u64, now: Instant) -> Duration {
        self.through = self.through.saturating_add(bytes);
        let Some(rate) = self.rate() else {
            return Duration::ZERO;
        };
        self.refill(now);
        // u64 -> f64: byte counts far below 2^53 in practice; tiny rounding is harmless.
        self.tokens -= bytes as f64;
        if self.tokens >= 0.0 {
            return Duration::ZERO;
        }
        Duration::try_from_secs_f64(-self.tokens / rate).unwrap_or(Duration::MAX)
    }
}

impl RateLimiter {
    /// `limit` in bytes/s; None = unlimited (acquire returns at once). Starts with a full bucket.
    pub fn new(limit: Option<u64>) -> Self {
        let mut b = Bucket {
            limit,
            tokens: 0.0,
            last: Instant::now(),
            cancel: None,
            through: 0,
        };
        b.tokens = b.rate().map_or(0.0, Bucket::burst);
        RateLimiter {
            inner: Arc::new(Mutex::new(b)),
        }
    }

    /// Bytes a new limiter at `limit` lets through at once (its full
    /// bucket): what a prediction credits to the first limited round.
    pub fn initial_burst(limit: Option<u64>) -> u64 {
        // f64 -> u64: a bucket depth, far below 2^53.
        limit.map_or(0, |l| Bucket::burst(l.max(1) as f64) as u64)
    }

    fn lock(&self) -> MutexGuard<'_, Bucket> {
        // The bucket stays consistent even if a holder panicked: every update is one assignment.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Change the limit (per round, for dynamic bandwidth). Time so far is
    /// credited at the old rate and any debt is kept, so the long-run rate stays exact.
    pub fn set_limit(&self, limit: Option<u64>) {
        let mut b = self.lock();
        let was_unlimited = b.limit.is_none();
        b.refill(Instant::now());
        b.limit = limit;
        if let Some(rate) = b.rate() {
            let burst = Bucket::burst(rate);
            b.tokens = if was_unlimited {
                burst
            } else {
                b.tokens.min(burst)
            };
        }
    }

    pub fn limit(&self) -> Option<u64> {
        self.lock().limit
    }

    /// Waits end as soon as `cancel` fires (None: never cut short), so a
    /// cancelled sender at a low limit stops within one wait's slice of
    /// time rather than after the debt is paid.
    pub fn set_cancel(&self, cancel: Option<Cancel>) {
        self.lock().cancel = cancel;
    }

    /// Books `bytes` sent without waiting (priority traffic: post-copy's
    /// demand pages); whoever acquires next waits for the debt instead.
    pub fn charge(&self, bytes: u64) {
        let mut b = self.lock();
        let _debt = b.take(bytes, Instant::now());
    }

    /// Bytes acquired or charged through this limiter (and its clones) so
    /// far, limited or not: what a timeline samples as sent, and what
    /// QEMU's migration thread counts for its bandwidth.
    pub fn bytes_through(&self) -> u64 {
        self.lock().through
    }

    /// Blocks until `bytes` may be sent. Sends larger than the bucket are
    /// allowed and paid for as debt (the caller sleeps until tokens are back
    /// to 0), so the long-run rate is exact for any chunk size. The debt is
    /// booked before sleeping, so concurrent callers queue behind it without
    /// anyone sleeping under the lock. A cancel ends the wait early.
    pub fn acquire(&self, bytes: u64) {
        let (wait, cancel) = {
            let mut b = self.lock();
            (b.take(bytes, Instant::now()), b.cancel.clone())
        };
        match cancel {
            _ if wait.is_zero() => {}
            Some(c) => {
                c.sleep(wait);
            }
            None => std::thread::sleep(wait),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn parse(s: &str) -> Result<Bandwidth, BandwidthError> {
        s.parse()
    }

    /// A limiter's bucket and the instant it was last refilled: taking at
    /// that instant adds no tokens, so the figures below are exact.
    fn bucket(rl: &RateLimiter) -> (MutexGuard<'_, Bucket>, Instant) {
        let b = rl.lock();
        let last = b.last;
        (b, last)
    }

    #[test]
    fn charged_bytes_delay_the_next_acquire() {
        // 1 MB/s; the bucket holds 64 KiB. A charge of 100 KB past it is
        // not waited for, but the next sender waits for that debt: 100 ms.
        let rl = RateLimiter::new(Some(1_000_000));
        let (mut b, t0) = bucket(&rl);
        b.take(64 * 1024 + 100_000, t0);
        assert_eq!(b.take(1, t0), Duration::from_micros(100_001));
        // 40 ms later, 40 KB of it is paid.
        let later = t0 + Duration::from_millis(40);
        assert_eq!(b.take(0, later), Duration::from_micros(60_001));
        drop(b);
        // For real: acquire sleeps at least that long (only a lower bound
        // on time holds on any machine).
        let rl = RateLimiter::new(Some(1_000_000));
        let t = Instant::now();
        rl.charge(64 * 1024 + 100_000);
        rl.acquire(1);
        let waited = t.elapsed();
        assert!(waited >= Duration::from_millis(100), "{waited:?}");
    }

    #[test]
    fn a_cancel_ends_a_wait_at_once() {
        // A debt of an hour at 1 MB/s; a cancelled token does not wait it.
        let rl = RateLimiter::new(Some(1_000_000));
        let c = Cancel::new();
        rl.set_cancel(Some(c.clone()));
        c.cancel(crate::util::cancel::Why::Requested);
        rl.charge(3_600_000_000);
        rl.acquire(1);
        // Still owed: the bucket keeps its debt.
        let (mut b, t0) = bucket(&rl);
        assert!(b.take(0, t0) > Duration::from_secs(3000));
    }

    #[test]
    fn parses_forms() {
        assert_eq!(parse("unlimited"), Ok(Bandwidth::Unlimited));
        assert_eq!(
            parse("500mbit"),
            Ok(Bandwidth::Static {
                bytes_per_s: 62_500_000
            })
        );
        assert_eq!(
            parse("120MiB/s"),
            Ok(Bandwidth::Static {
                bytes_per_s: 120 * MIB
            })
        );
        assert_eq!(
            parse("dynamic:inc=50mbit,max=1gbit,min=100mbit"),
            Ok(Bandwidth::Dynamic {
                min: 12_500_000,
                max: 125_000_000,
                inc: 6_250_000
            })
        );
    }

    #[test]
    fn display_reads_back() {
        for s in [
            "unlimited",
            "1gbit",
            "500mbit",
            "120MiB/s",
            "dynamic:min=100mbit,max=1gbit,inc=50mbit",
        ] {
            let b = parse(s).unwrap();
            assert_eq!(b.to_string(), s);
            assert_eq!(parse(&b.to_string()), Ok(b));
        }
        let b = parse("dynamic:inc=1000B/s,max=64MiB/s,min=1000000B/s").unwrap();
        assert_eq!(parse(&b.to_string()), Ok(b));
    }

    #[test]
    fn rejects_naming_the_problem() {
        let e = parse("fast").unwrap_err().to_string();
        assert_eq!(e, EXPECTED);
        for (s, needle) in [
            (
                "dynamic:min=1gbit,max=100mbit,inc=1mbit",
                "min (125000000 B/s) is above max",
            ),
            ("dynamic:min=1mbit,max=2mbit", "inc=RATE is missing"),
            (
                "dynamic:min=1mbit,max=2mbit,inc=x",
                "inc=\"x\" is not a rate",
            ),
            (
                "dynamic:min=1mbit,min=1mbit,max=2mbit,inc=1mbit",
                "min given twice",
            ),
            (
                "dynamic:min=1mbit,max=2mbit,inc=1mbit,step=1",
                "unknown key \"step\"",
            ),
            ("dynamic:fast", "\"fast\" is not KEY=RATE"),
            ("100kbit", "below 1mbit"),
            ("dynamic:min=100kbit,max=2mbit,inc=1mbit", "below 1mbit"),
        ] {
            let e = parse(s).unwrap_err().to_string();
            assert!(e.contains(needle), "{s}: {e}");
        }
    }

    #[test]
    fn next_limit_clamps() {
        let d = Bandwidth::Dynamic {
            min: 1000,
            max: 10_000,
            inc: 500,
        };
        assert_eq!(d.initial_limit(), Some(1000));
        assert_eq!(d.next_limit(100.0), Some(1000));
        assert_eq!(d.next_limit(4000.0), Some(4500));
        assert_eq!(d.next_limit(50_000.0), Some(10_000));
        assert_eq!(d.next_limit(f64::NAN), Some(1000));
        assert!(d.dirty_rate_above_max(10_001.0) && !d.dirty_rate_above_max(10_000.0));
        assert_eq!(d.max(), Some(10_000));
        let s = Bandwidth::Static { bytes_per_s: 7 };
        assert_eq!(
            (s.next_limit(1e9), s.max(), s.dirty_rate_above_max(1e9)),
            (Some(7), Some(7), false)
        );
        assert_eq!(Bandwidth::Unlimited.next_limit(1e9), None);
    }

    #[test]
    fn bucket_paces_to_the_limit() {
        // Ten sends of 100 KiB at 2 MiB/s, each sent when its wait is over:
        // the first 64 KiB are the full bucket, the rest take exactly
        // (1000 - 64) / 2048 s.
        let rl = RateLimiter::new(Some(2 * MIB));
        let (mut b, t0) = bucket(&rl);
        let mut now = t0;
        for _ in 0..10 {
            now += b.take(100 * 1024, now);
        }
        let want = (1000.0 - 64.0) / 2048.0;
        let took = (now - t0).as_secs_f64();
        assert!((took - want).abs() < 1e-6, "took {took} s, want {want}");
        drop(b);
        // For real, shared by clones: never sooner.
        let rl = RateLimiter::new(Some(2 * MIB));
        let start = Instant::now();
        for _ in 0..10 {
            rl.clone().acquire(100 * 1024);
        }
        let t = start.elapsed().as_secs_f64();
        assert!(t >= want - 1e-6, "took {t} s");
    }

    #[test]
    fn unlimited_returns_at_once() {
        let rl = RateLimiter::new(None);
        let (mut b, t0) = bucket(&rl);
        for _ in 0..1000 {
            assert_eq!(b.take(1 << 30, t0), Duration::ZERO);
        }
        drop(b);
        rl.set_limit(Some(MIB));
        assert_eq!(rl.limit(), Some(MIB));
        // A fresh limit starts with a full bucket: 64 KiB go at once, and
        // not a byte more.
        let (mut b, t0) = bucket(&rl);
        assert_eq!(b.take(64 * 1024, t0), Duration::ZERO);
        assert!(b.take(1, t0) > Duration::ZERO);
    }
}
