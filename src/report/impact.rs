//! What a migration cost the application: the guest's work rate before it
//! (the baseline), the work lost while it ran, the longest stall and the
//! time the guest took to recover its rate after the resume (Zhao &
//! Figueiredo: recovery can outlast the migration itself).
//!
//! A pure function of a [`Sample`] series, so it is tested on synthetic
//! series and reapplied to saved reports.

use serde::{Deserialize, Serialize};

use crate::report::timeline::Sample;

/// Recovered: the rate within this fraction of the baseline...
pub const RECOVERY_TOLERANCE: f64 = 0.05;
/// ...over this long a window.
pub const RECOVERY_HOLD_MS: f64 = 100.0;
/// A stall: the rate below this fraction of the baseline.
pub const STALL_FRACTION: f64 = 0.1;

/// The application's view of a migration.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Impact {
    /// The guest's rate before the migration (writes/s, or operations/s).
    pub baseline_rate: f64,
    /// Work not done during the migration and the observation after it,
    /// in seconds of baseline work: the integral of (baseline - rate) / baseline.
    pub lost_work_s: f64,
    /// The longest span with the rate below 10 % of the baseline.
    pub longest_stall_ms: f64,
    /// Resume -> the start of the first 100 ms over which the guest's rate
    /// stayed within 5 % of the baseline (null: not within the timeline).
    pub recovery_ms: Option<f64>,
    /// Milliseconds of timeline after the resume the figures cover.
    pub observed_after_resume_ms: f64,
}

/// The summary's line for an impact.
pub fn line(i: &Impact) -> String {
    format!(
        "impact            baseline {:.0}/s; {:.3} s of work lost, longest stall {:.1} ms, {}",
        i.baseline_rate,
        i.lost_work_s,
        i.longest_stall_ms,
        match i.recovery_ms {
            Some(r) => format!("recovered {r:.1} ms after resume"),
            None => format!(
                "not recovered in the {:.0} ms watched after resume",
                i.observed_after_resume_ms
            ),
        }
    )
}

/// One interval of a series: (start ms, end ms, rate over it).
fn intervals(samples: &[Sample]) -> impl Iterator<Item = (f64, f64, Option<f64>)> + '_ {
    samples
        .windows(2)
        .map(|w| (w[0].t_ms, w[1].t_ms, w[1].guest_rate))
        .filter(|(a, b, _)| b > a)
}

/// The impact of a migration on its guest, from its timeline: `baseline`
/// (work per second before it), `resumed_ms` (when the guest ran at the
/// destination, on the timeline's clock). The migration starts at 0;
/// intervals whose rate is unknown are left out. None for a guest that
/// does no work (its baseline is 0) or a series without intervals.
pub fn impact(samples: &[Sample], baseline: f64, resumed_ms: Option<f64>) -> Option<Impact> {
    if baseline.is_nan() || baseline <= 0.0 || samples.len() < 2 {
        return None;
    }
    let mut lost = 0.0;
    let (mut stall, mut longest) = (None::<(f64, f64)>, 0.0f64);
    for (a, b, rate) in intervals(samples) {
        let a = a.max(0.0);
        if b <= a {
            continue;
        }
        let Some(r) = rate else {
            stall = None;
            continue;
        };
        lost += (baseline - r) * (b - a) / 1e3;
        if r < STALL_FRACTION * baseline {
            let s = match stall {
                Some((start, end)) if end == a => (start, b),
                _ => (a, b),
            };
            longest = longest.max(s.1 - s.0);
            stall = Some(s);
        } else {
            stall = None;
        }
    }
    let end = samples.last().map_or(0.0, |s| s.t_ms);
    Some(Impact {
        baseline_rate: baseline,
        lost_work_s: lost / baseline,
        longest_stall_ms: longest,
        recovery_ms: resumed_ms.and_then(|r| recovery(samples, baseline, r)),
        observed_after_resume_ms: resumed_ms.map_or(0.0, |r| (end - r).max(0.0)),
    })
}

/// Resume -> the first sample time from which, for the next
/// [`RECOVERY_HOLD_MS`], the guest's work never strays from the
/// baseline's by more than [`RECOVERY_TOLERANCE`] of the window's work: its
/// rate is within 5 % over every stretch of the window that starts with
/// it, so a stall made up by a burst is not recovery, while the jitter of
/// short samples averages out.
fn recovery(samples: &[Sample], baseline: f64, resumed_ms: f64) -> Option<f64> {
    // Cumulative work at each sample time after the resume; None where a
    // rate is unknown (the window cannot be judged across it).
    let mut points: Vec<(f64, Option<f64>)> = Vec::new();
    let mut work = Some(0.0);
    for (a, b, rate) in intervals(samples).filter(|&(_, b, _)| b > resumed_ms) {
        let a = a.max(resumed_ms);
        if points.is_empty() {
            points.push((a, work));
        }
        work = work.zip(rate).map(|(w, r)| w + r * (b - a) / 1e3);
        points.push((b, work));
    }
    let at = |t: f64| -> Option<f64> {
        let i = points.partition_point(|p| p.0 < t);
        let (t1, w1) = *points.get(i)?;
        if i == 0 || t1 == t {
            return w1;
        }
        let (t0, w0) = points[i - 1];
        Some(w0? + (w1? - w0?) * (t - t0) / (t1 - t0))
    };
    let band = RECOVERY_TOLERANCE * baseline * RECOVERY_HOLD_MS / 1e3;
    points.iter().enumerate().find_map(|(k, &(t, w))| {
        let (w, end) = (w?, t + RECOVERY_HOLD_MS);
        let off = |s: f64, ws: Option<f64>| Some((ws? - w - baseline * (s - t) / 1e3).abs());
        let inside = points[k + 1..]
            .iter()
            .take_while(|p| p.0 < end)
            .map(|&(s, ws)| off(s, ws))
            .chain([off(end, at(end))])
            .try_fold(true, |ok, d| Some(ok && d? <= band))?;
        inside.then_some(t - resumed_ms)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A series sampled every `step` ms from `from`, the rate given by `f(t)`
    /// over each interval ending at t.
    fn series(from: f64, to: f64, step: f64, f: impl Fn(f64) -> Option<f64>) -> Vec<Sample> {
        let n = ((to - from) / step).round() as usize;
        (0..=n)
            .map(|i| {
                let t = from + i as f64 * step;
                Sample {
                    t_ms: t,
                    guest_rate: f(t),
                    ..Sample::default()
                }
            })
            .collect()
    }

    #[test]
    fn an_undisturbed_guest_loses_nothing_stalls_never_and_recovers_at_once() {
        let s = series(-100.0, 1000.0, 10.0, |_| Some(1000.0));
        let i = impact(&s, 1000.0, Some(500.0)).unwrap();
        assert!(i.lost_work_s.abs() < 1e-9, "{i:?}");
        assert_eq!(i.longest_stall_ms, 0.0);
        assert_eq!(i.recovery_ms, Some(0.0));
        assert_eq!(i.observed_after_resume_ms, 500.0);
    }

    /// Paused 50 ms (rate 0), then at a quarter rate for 200 ms, then back:
    /// the work lost is 50 ms + 150 ms of baseline work; the stall is the
    /// pause; recovery starts where the half rate ends.
    #[test]
    fn a_pause_and_a_slow_start_cost_their_integral_and_recovery_waits_for_the_full_rate() {
        let rate = |t: f64| {
            Some(match t {
                t if t <= 300.0 => 2000.0,
                t if t <= 350.0 => 0.0,
                t if t <= 550.0 => 500.0,
                _ => 2000.0,
            })
        };
        let s = series(-200.0, 1500.0, 10.0, rate);
        let i = impact(&s, 2000.0, Some(350.0)).unwrap();
        assert!((i.lost_work_s - 0.200).abs() < 1e-9, "{i:?}");
        assert_eq!(i.longest_stall_ms, 50.0);
        assert_eq!(i.recovery_ms, Some(200.0));
        // The warm-up before 0 does not count, even when slow.
        let mut slow_warmup = s.clone();
        slow_warmup[1].guest_rate = Some(0.0);
        assert_eq!(impact(&slow_warmup, 2000.0, Some(350.0)), Some(i));
    }

    /// 4 % below the baseline is recovered; 6 % is not; a 100 ms window
    /// needs 100 ms of timeline after it starts.
    #[test]
    fn recovery_holds_within_five_percent_for_a_hundred_milliseconds() {
        let near = series(0.0, 300.0, 10.0, |_| Some(960.0));
        assert_eq!(
            impact(&near, 1000.0, Some(0.0)).unwrap().recovery_ms,
            Some(0.0)
        );
        let far = series(0.0, 300.0, 10.0, |_| Some(940.0));
        assert_eq!(impact(&far, 1000.0, Some(0.0)).unwrap().recovery_ms, None);
        let short = series(0.0, 90.0, 10.0, |_| Some(1000.0));
        assert_eq!(impact(&short, 1000.0, Some(0.0)).unwrap().recovery_ms, None);
        // A burst above the baseline (a guest catching up) is not recovery
        // either, nor a stall that a burst makes up within the window.
        let burst = series(0.0, 300.0, 10.0, |t| {
            Some(if t <= 100.0 { 2000.0 } else { 1000.0 })
        });
        assert_eq!(
            impact(&burst, 1000.0, Some(0.0)).unwrap().recovery_ms,
            Some(100.0)
        );
        let made_up = series(0.0, 300.0, 10.0, |t| {
            Some(match t {
                t if t <= 20.0 => 0.0,
                t if t <= 40.0 => 2000.0,
                _ => 1000.0,
            })
        });
        let i = impact(&made_up, 1000.0, Some(0.0)).unwrap();
        assert_eq!(i.recovery_ms, Some(40.0));
        assert!(i.lost_work_s.abs() < 1e-9, "made up: {i:?}");
        // Jitter around the baseline within the band is recovered.
        let jitter = series(0.0, 300.0, 5.0, |t| {
            Some(if ((t / 5.0) as u64).is_multiple_of(2) {
                1400.0
            } else {
                600.0
            })
        });
        assert_eq!(
            impact(&jitter, 1000.0, Some(0.0)).unwrap().recovery_ms,
            Some(0.0)
        );
    }

    /// Sample times need not be even: a pause between two event samples
    /// 3 ms apart is a 3 ms stall, and stalls split by work are separate.
    #[test]
    fn stalls_are_joined_only_when_adjacent() {
        let ts = [0.0, 10.0, 13.0, 20.0, 30.0, 40.0, 41.0, 60.0];
        let rates = [0.0, 100.0, 0.0, 0.0, 100.0, 0.0, 5.0, 100.0];
        let s: Vec<_> = ts
            .iter()
            .zip(rates)
            .map(|(&t, r)| Sample {
                t_ms: t,
                guest_rate: Some(r),
                ..Sample::default()
            })
            .collect();
        let i = impact(&s, 100.0, None).unwrap();
        // Stalled 10..20 (two intervals at 0) and 30..41 (0, then 5 < 10 % of 100).
        assert_eq!(i.longest_stall_ms, 11.0);
        assert_eq!(i.recovery_ms, None);
        // Unknown rates are left out and break a stall.
        let mut gap = s.clone();
        gap[2].guest_rate = None;
        let g = impact(&gap, 100.0, None).unwrap();
        assert_eq!(g.longest_stall_ms, 11.0);
        assert!(g.lost_work_s < i.lost_work_s);
    }

    #[test]
    fn an_idle_guest_or_a_lone_sample_has_no_impact() {
        let s = series(0.0, 100.0, 10.0, |_| Some(0.0));
        assert_eq!(impact(&s, 0.0, Some(10.0)), None);
        assert_eq!(impact(&s[..1], 100.0, Some(10.0)), None);
    }
}
