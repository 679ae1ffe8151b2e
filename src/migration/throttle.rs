//! Slowing the guest down so pre-copy converges, decided as QEMU decides
//! (`migration/ram.c`: `migration_trigger_throttle`, `mig_throttle_guest_down`).
//!
//! After a dirty-bitmap sync, once at least [`SYNC_PERIOD`] has passed
//! since the last look, compare the bytes dirtied in that period with the
//! bytes sent in it. When the dirtied bytes exceed `trigger` % of the sent
//! ones for the second time (not necessarily in a row: QEMU counts), the
//! guest is throttled down:
//! - auto-converge: the vCPUs sleep `initial` % of their time, then
//!   `increment` % more each time, up to `max`; with `tailslow` the step is
//!   only what would bring the dirty rate down to the trigger, if smaller;
//! - dirty limit: each vCPU's writes are capped at a rate from then on.
//!
//! The same code decides for a real migration and for a prediction, whose
//! guest then dirties at the throttled rate.

use std::time::Duration;

use crate::guest::control::{Throttle, MAX_THROTTLE_PCT};
use crate::util::page::PageSize;
use crate::util::units::fmt_bytes;

/// QEMU looks at the dirty rate at most once a second.
pub const SYNC_PERIOD: Duration = Duration::from_secs(1);

/// QEMU's auto-converge parameters (its defaults in [`Default`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AutoConverge {
    /// `cpu-throttle-initial`, percent.
    pub initial: u32,
    /// `cpu-throttle-increment`, percent.
    pub increment: u32,
    /// `max-cpu-throttle`, percent.
    pub max: u32,
    /// `throttle-trigger-threshold`: dirtied bytes as a percentage of the
    /// bytes sent in a period.
    pub trigger: u32,
    /// `cpu-throttle-tailslow`.
    pub tailslow: bool,
}

impl Default for AutoConverge {
    fn default() -> Self {
        Self {
            initial: 20,
            increment: 10,
            max: MAX_THROTTLE_PCT,
            trigger: 50,
            tailslow: false,
        }
    }
}

/// A cap on each vCPU's writes (QEMU's `vcpu-dirty-limit`, in pages/s here).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DirtyLimit {
    pub pps: u64,
    /// `x-vcpu-dirty-limit-period`: the window the cap is counted over.
    pub period: Duration,
}

/// How a migration may slow its guest down.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum Throttling {
    #[default]
    Off,
    AutoConverge(AutoConverge),
    DirtyLimit(DirtyLimit),
}

/// Throttle parameters that cannot be used; each names its flag.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ThrottleError {
    #[error("--throttle-{name} {value}: a percentage from {min} to {MAX_THROTTLE_PCT}")]
    Percent {
        name: &'static str,
        value: u32,
        min: u32,
    },
    #[error("--throttle-initial {initial} is above --throttle-max {max}")]
    InitialAboveMax { initial: u32, max: u32 },
    #[error("--throttle-trigger {0}: a percentage from 1 to 100")]
    Trigger(u32),
    #[error("--dirty-limit must be above 0 pages/s")]
    ZeroLimit,
    #[error("--dirty-limit {limit} pages/s per vCPU is not below the guest's own rate ({rate:.0} pages/s per vCPU): it would never hold the guest back")]
    LimitAboveRate { limit: u64, rate: f64 },
    #[error("--dirty-limit-period {0:?}: from 1 ms to 1000 ms")]
    Period(Duration),
    #[error(
        "--auto-converge and --dirty-limit are two ways to throttle: choose one (as QEMU does)"
    )]
    Both,
}

impl Throttling {
    /// Check the parameters against the guest's target rate per vCPU
    /// (None: `max` or idle).
    pub fn check(&self, rate_per_vcpu: Option<f64>) -> Result<(), ThrottleError> {
        match *self {
            Throttling::Off => Ok(()),
            Throttling::AutoConverge(a) => {
                for (name, value, min) in [
                    ("initial", a.initial, 1),
                    ("increment", a.increment, 1),
                    ("max", a.max, 1),
                ] {
                    if !(min..=MAX_THROTTLE_PCT).contains(&value) {
                        return Err(ThrottleError::Percent { name, value, min });
                    }
                }
                if a.initial > a.max {
                    return Err(ThrottleError::InitialAboveMax {
                        initial: a.initial,
                        max: a.max,
                    });
                }
                if !(1..=100).contains(&a.trigger) {
                    return Err(ThrottleError::Trigger(a.trigger));
                }
                Ok(())
            }
            Throttling::DirtyLimit(d) => {
                if d.pps == 0 {
                    return Err(ThrottleError::ZeroLimit);
                }
                if !(Duration::from_millis(1)..=Duration::from_secs(1)).contains(&d.period) {
                    return Err(ThrottleError::Period(d.period));
                }
                match rate_per_vcpu {
                    // u64 -> f64: a page rate, exact.
                    Some(rate) if d.pps as f64 >= rate => {
                        Err(ThrottleError::LimitAboveRate { limit: d.pps, rate })
                    }
                    _ => Ok(()),
                }
            }
        }
    }

    /// A short name: off, auto-converge, dirty-limit.
    pub fn name(&self) -> &'static str {
        match self {
            Throttling::Off => "off",
            Throttling::AutoConverge(_) => "auto-converge",
            Throttling::DirtyLimit(_) => "dirty-limit",
        }
    }

    /// Whether a later sync can still tighten the throttle.
    pub fn can_tighten(&self, now: Throttle) -> bool {
        match (*self, now) {
            (Throttling::Off, _) => false,
            (Throttling::AutoConverge(a), Throttle::Cpu(p)) => p < a.max,
            (Throttling::DirtyLimit(_), Throttle::DirtyLimit { .. }) => false,
            _ => true,
        }
    }
}

/// The decision's state over one migration.
#[derive(Clone, Debug)]
pub struct Governor {
    cfg: Throttling,
    page_size: PageSize,
    /// When the current period began, and what it has seen so far.
    period_start: Duration,
    dirty_pages: u64,
    bytes: u64,
    /// Periods whose dirtying exceeded the trigger since the last step.
    high: u32,
    now: Throttle,
    /// When the guest was first throttled.
    since: Option<Duration>,
}

/// A change of throttle, and why (for `--explain`).
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    pub throttle: Throttle,
    pub why: String,
}

impl Governor {
    /// A migration's throttle decisions; its clock starts at `start`.
    pub fn new(cfg: Throttling, page_size: PageSize, start: Duration) -> Self {
        Self {
            cfg,
            page_size,
            period_start: start,
            dirty_pages: 0,
            bytes: 0,
            high: 0,
            now: Throttle::Off,
            since: None,
        }
    }

    /// The throttle in force.
    pub fn throttle(&self) -> Throttle {
        self.now
    }

    /// When the guest was first throttled, on the migration's clock.
    pub fn since(&self) -> Option<Duration> {
        self.since
    }

    /// Whether a later sync can still tighten the throttle.
    pub fn can_tighten(&self) -> bool {
        self.cfg.can_tighten(self.now)
    }

    /// After a sync at `now` that found `dirty_pages` pages dirtied since
    /// the last one, `bytes` having been sent since the last one: the new
    /// throttle, if it changes.
    pub fn after_sync(&mut self, now: Duration, dirty_pages: u64, bytes: u64) -> Option<Step> {
        if matches!(self.cfg, Throttling::Off) {
            return None;
        }
        self.dirty_pages = self.dirty_pages.saturating_add(dirty_pages);
        self.bytes = self.bytes.saturating_add(bytes);
        if now <= self.period_start + SYNC_PERIOD {
            return None;
        }
        let trigger = match self.cfg {
            Throttling::AutoConverge(a) => a.trigger,
            _ => AutoConverge::default().trigger,
        };
        let (dirtied, sent) = (self.page_size.bytes(self.dirty_pages), self.bytes);
        let threshold = sent.saturating_mul(u64::from(trigger)) / 100;
        let period = now - self.period_start;
        (self.period_start, self.dirty_pages, self.bytes) = (now, 0, 0);
        if dirtied <= threshold {
            return None;
        }
        self.high += 1;
        if self.high < 2 {
            return None;
        }
        self.high = 0;
        let next = self.tighten(dirtied, threshold);
        if next == self.now {
            return None;
        }
        let why = format!(
            "throttle: {} dirtied in the last {:.0} ms > {trigger}% of the {} sent, a second time: {} -> {}",
            fmt_bytes(dirtied),
            period.as_secs_f64() * 1e3,
            fmt_bytes(sent),
            describe(self.now),
            describe(next)
        );
        self.now = next;
        self.since.get_or_insert(now);
        Some(Step {
            throttle: next,
            why,
        })
    }

    /// QEMU's `mig_throttle_guest_down` (or, for a dirty limit, turning it on).
    fn tighten(&self, dirtied: u64, threshold: u64) -> Throttle {
        let a = match self.cfg {
            Throttling::Off => return Throttle::Off,
            Throttling::DirtyLimit(d) => {
                return Throttle::DirtyLimit {
                    pps: d.pps,
                    period: d.period,
                }
            }
            Throttling::AutoConverge(a) => a,
        };
        let Throttle::Cpu(pct) = self.now else {
            return Throttle::Cpu(a.initial);
        };
        let inc = if a.tailslow {
            // The CPU share that would bring the dirtying down to the trigger.
            let cpu_now = f64::from(100 - pct);
            let ideal = cpu_now * (threshold as f64 / dirtied as f64);
            // f64 -> u32 truncates, as QEMU's uint64_t arithmetic does.
            ((cpu_now - ideal) as u32).min(a.increment)
        } else {
            a.increment
        };
        Throttle::Cpu((pct + inc).min(a.max))
    }
}

/// A throttle in words.
pub fn describe(t: Throttle) -> String {
    match t {
        Throttle::Off => "none".into(),
        Throttle::Cpu(p) => format!("{p}%"),
        Throttle::DirtyLimit { pps, period } => {
            format!("{pps} pages/s per vCPU (over {} ms)", period.as_millis())
        }
    }
}

/// The share of its unthrottled rate a guest keeps under `t`, given its
/// rate per vCPU (None: unknown, `max`).
pub fn rate_factor(t: Throttle, rate_per_vcpu: Option<f64>) -> f64 {
    match t {
        Throttle::Off => 1.0,
        Throttle::Cpu(p) => f64::from(100 - p.min(MAX_THROTTLE_PCT)) / 100.0,
        // u64 -> f64: a page rate, exact.
        Throttle::DirtyLimit { pps, .. } => {
            rate_per_vcpu.map_or(1.0, |r| (pps as f64 / r).min(1.0))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: u64 = 4096;

    fn gov(cfg: Throttling) -> Governor {
        Governor::new(cfg, PageSize::MIN, Duration::ZERO)
    }

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    /// QEMU's sequence by hand: each 1.5 s round sends 100 pages' bytes
    /// and finds 80 dirty (80 > 50% of 100), so every second period steps
    /// the throttle: 20 after round 2, 30 after round 4, ... up to 99.
    #[test]
    fn auto_converge_steps_every_second_high_period() {
        let mut g = gov(Throttling::AutoConverge(AutoConverge::default()));
        let mut steps = Vec::new();
        for round in 1..=24u32 {
            let now = secs(1.5 * f64::from(round));
            if let Some(s) = g.after_sync(now, 80, 100 * PAGE) {
                steps.push((round, s.throttle));
            }
        }
        let want: Vec<(u32, Throttle)> = [20, 30, 40, 50, 60, 70, 80, 90, 99]
            .iter()
            .enumerate()
            .map(|(i, &p)| (2 * i as u32 + 2, Throttle::Cpu(p)))
            .collect();
        assert_eq!(steps, want);
        assert!(!g.can_tighten());
        assert_eq!(g.since(), Some(secs(3.0)));
    }

    /// Syncs closer than a second apart add up into one period; a low
    /// period does not reset the count of high ones (QEMU's counter).
    #[test]
    fn periods_span_syncs_and_high_periods_need_not_be_consecutive() {
        let mut g = gov(Throttling::AutoConverge(AutoConverge::default()));
        // Three 0.4 s syncs: the third closes a 1.2 s period.
        assert_eq!(g.after_sync(secs(0.4), 10, 20 * PAGE), None);
        assert_eq!(g.after_sync(secs(0.8), 10, 20 * PAGE), None);
        assert_eq!(g.after_sync(secs(1.2), 20, 20 * PAGE), None); // 40 of 60: high (1)
        assert_eq!(g.after_sync(secs(2.4), 10, 100 * PAGE), None); // low
        let s = g.after_sync(secs(3.6), 60, 100 * PAGE).unwrap(); // high (2)
        assert_eq!(s.throttle, Throttle::Cpu(20));
        assert!(s.why.contains("20%"), "{}", s.why);
        // Exactly at the trigger is not above it.
        assert_eq!(g.after_sync(secs(4.8), 50, 100 * PAGE), None);
        assert_eq!(g.after_sync(secs(6.0), 50, 100 * PAGE), None);
        assert_eq!(g.throttle(), Throttle::Cpu(20));
    }

    /// Tailslow: the step is what brings the dirtying to the trigger, if
    /// that is less than the increment (QEMU's arithmetic, truncated).
    #[test]
    fn tailslow_steps_less_near_the_target() {
        let a = AutoConverge {
            tailslow: true,
            ..AutoConverge::default()
        };
        let mut g = gov(Throttling::AutoConverge(a));
        g.after_sync(secs(1.1), 80, 100 * PAGE);
        g.after_sync(secs(2.2), 80, 100 * PAGE);
        assert_eq!(g.throttle(), Throttle::Cpu(20));
        // cpu_now 80, ideal 80 * 50/55 = 72.7: step 7 (< 10).
        g.after_sync(secs(3.3), 55, 100 * PAGE);
        g.after_sync(secs(4.4), 55, 100 * PAGE);
        assert_eq!(g.throttle(), Throttle::Cpu(27));
        // Far above the trigger: the full increment.
        g.after_sync(secs(5.5), 100, 100 * PAGE);
        g.after_sync(secs(6.6), 100, 100 * PAGE);
        assert_eq!(g.throttle(), Throttle::Cpu(37));
    }

    #[test]
    fn dirty_limit_turns_on_once() {
        let d = DirtyLimit {
            pps: 1000,
            period: Duration::from_millis(100),
        };
        let mut g = gov(Throttling::DirtyLimit(d));
        assert_eq!(g.after_sync(secs(1.1), 80, 100 * PAGE), None);
        let s = g.after_sync(secs(2.2), 80, 100 * PAGE).unwrap();
        assert_eq!(
            s.throttle,
            Throttle::DirtyLimit {
                pps: 1000,
                period: d.period
            }
        );
        assert!(!g.can_tighten());
        g.after_sync(secs(3.3), 80, 100 * PAGE);
        assert_eq!(g.after_sync(secs(4.4), 80, 100 * PAGE), None);
        assert_eq!(rate_factor(s.throttle, Some(4000.0)), 0.25);
        assert_eq!(rate_factor(Throttle::Cpu(30), None), 0.7);
    }

    #[test]
    fn bad_parameters_name_their_flag() {
        let ac = |f: fn(&mut AutoConverge)| {
            let mut a = AutoConverge::default();
            f(&mut a);
            Throttling::AutoConverge(a)
                .check(None)
                .unwrap_err()
                .to_string()
        };
        assert!(ac(|a| a.initial = 100).contains("--throttle-initial 100"));
        assert!(ac(|a| a.increment = 0).contains("--throttle-increment 0"));
        assert!(ac(|a| a.max = 0).contains("--throttle-max 0"));
        assert!(ac(|a| a.trigger = 0).contains("--throttle-trigger 0"));
        assert!(ac(|a| (a.initial, a.max) = (50, 40)).contains("above --throttle-max"));
        let dl = |pps, ms, rate| {
            let period = Duration::from_millis(ms);
            Throttling::DirtyLimit(DirtyLimit { pps, period })
                .check(rate)
                .map_err(|e| e.to_string())
        };
        assert!(dl(0, 100, None).unwrap_err().contains("above 0"));
        assert!(dl(10, 0, None)
            .unwrap_err()
            .contains("--dirty-limit-period"));
        assert!(dl(10, 1001, None).unwrap_err().contains("1000 ms"));
        assert!(dl(5000, 100, Some(5000.0))
            .unwrap_err()
            .contains("guest's own rate"));
        assert_eq!(dl(4999, 1000, Some(5000.0)), Ok(()));
    }
}
