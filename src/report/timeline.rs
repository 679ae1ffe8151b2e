//! A migration's timeline: what the guest and the sender did, sampled every
//! few milliseconds (see `crate::migration::sampler`), with a sample at
//! every change of phase so a downtime shorter than the period still shows.
//!
//! Times are on the migration's clock (`t_ms` 0 when the migration starts,
//! after the warm-up; warm-up samples are negative). Rates are averages
//! over the interval that ends at the sample, so integrating a rate over
//! the samples gives the guest's work exactly.

use std::io::Write;

use serde::{Deserialize, Serialize};

/// What the migration was doing at a sample.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Before the migration: the guest runs untracked (its baseline rate).
    #[default]
    Warmup,
    /// Connecting and the handshake.
    Setup,
    /// A pre-copy round: the guest runs at the source.
    Precopy,
    /// The guest is paused: stop-and-copy, device state, resume.
    Downtime,
    /// The guest runs at the destination while pages are still missing.
    Postcopy,
    /// The guest runs at the destination; the source sends page digests.
    Verify,
    /// The migration is over; the destination guest is watched.
    Resumed,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Warmup => "warmup",
            Phase::Setup => "setup",
            Phase::Precopy => "precopy",
            Phase::Downtime => "downtime",
            Phase::Postcopy => "postcopy",
            Phase::Verify => "verify",
            Phase::Resumed => "resumed",
        }
    }

    /// The guest runs at the destination.
    pub fn after_resume(self) -> bool {
        matches!(self, Phase::Postcopy | Phase::Verify | Phase::Resumed)
    }
}

/// One sample of the timeline.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Sample {
    /// Milliseconds since the migration started (negative: warm-up).
    pub t_ms: f64,
    pub phase: Phase,
    /// The pre-copy round under way (null outside pre-copy).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub round: Option<u32>,
    /// The guest's writes per second over the interval ending here (null
    /// where this side cannot see the guest: `send` after the resume).
    pub guest_rate: Option<f64>,
    /// Operations per second, for workloads that count operations rather
    /// than writes (null otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_ops_rate: Option<f64>,
    /// Bytes the sender has put through its rate limiter so far.
    pub sent_bytes: u64,
    /// Pages of the current round (or stop-and-copy, or post-copy push)
    /// not sent yet.
    pub remaining_pages: u64,
    /// The rate limit in force, bits per second (null: unlimited).
    pub rate_limit_bps: Option<u64>,
    /// Pages the last harvest found dirty (on the sample right after it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dirty_pages: Option<u64>,
    /// Post-copy: page requests the source has served so far.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postcopy_requests: Option<u64>,
}

/// The CSV header, the fields in the order [`write_csv`] writes them.
pub const CSV_HEADER: &str = "t_ms,phase,round,guest_rate,guest_ops_rate,sent_bytes,remaining_pages,rate_limit_bps,dirty_pages,postcopy_requests";

/// Write the samples as CSV (empty cells for missing values).
pub fn write_csv(samples: &[Sample], w: &mut impl Write) -> std::io::Result<()> {
    fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
        v.map_or(String::new(), |v| v.to_string())
    }
    writeln!(w, "{CSV_HEADER}")?;
    for s in samples {
        writeln!(
            w,
            "{:.3},{},{},{},{},{},{},{},{},{}",
            s.t_ms,
            s.phase.as_str(),
            opt(s.round),
            opt(s.guest_rate.map(|r| format!("{r:.1}"))),
            opt(s.guest_ops_rate.map(|r| format!("{r:.1}"))),
            s.sent_bytes,
            s.remaining_pages,
            opt(s.rate_limit_bps),
            opt(s.dirty_pages),
            opt(s.postcopy_requests)
        )?;
    }
    Ok(())
}

/// Spans of consecutive samples in one phase: (phase, start ms, end ms),
/// a span ending where the next begins.
pub fn phase_spans(samples: &[Sample]) -> Vec<(Phase, f64, f64)> {
    let mut spans: Vec<(Phase, f64, f64)> = Vec::new();
    let mut prev_t = None;
    for s in samples {
        // A sample closes the interval since the previous one.
        let start = prev_t.unwrap_or(s.t_ms);
        match spans.last_mut() {
            Some(last) if last.0 == s.phase => last.2 = s.t_ms,
            _ => spans.push((s.phase, start, s.t_ms)),
        }
        prev_t = Some(s.t_ms);
    }
    spans
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t_ms: f64, phase: Phase) -> Sample {
        Sample {
            t_ms,
            phase,
            guest_rate: Some(1.0),
            ..Sample::default()
        }
    }

    #[test]
    fn csv_has_a_header_and_a_line_per_sample_with_empty_cells_for_nulls() {
        let mut s = vec![at(-10.0, Phase::Warmup), at(0.5, Phase::Precopy)];
        s[1].round = Some(0);
        s[1].guest_rate = None;
        let mut out = Vec::new();
        write_csv(&s, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines[0], CSV_HEADER);
        assert_eq!(lines[1], "-10.000,warmup,,1.0,,0,0,,,");
        assert_eq!(lines[2], "0.500,precopy,0,,,0,0,,,");
    }

    #[test]
    fn spans_join_samples_of_a_phase_and_start_where_the_last_ended() {
        let s = [
            at(0.0, Phase::Precopy),
            at(10.0, Phase::Precopy),
            at(12.0, Phase::Downtime),
            at(13.0, Phase::Downtime),
            at(20.0, Phase::Verify),
        ];
        assert_eq!(
            phase_spans(&s),
            vec![
                (Phase::Precopy, 0.0, 10.0),
                (Phase::Downtime, 10.0, 13.0),
                (Phase::Verify, 13.0, 20.0)
            ]
        );
    }
}
