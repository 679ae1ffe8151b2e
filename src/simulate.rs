//! `livemig simulate`: a discrete-event simulation of a pre-copy migration
//! that moves no memory. It drives the real sender's decisions
//! ([`Precopy`]: the same policy and rate-limiter code) over a synthetic
//! dirty process: the guest's own deterministic write streams
//! ([`Stream`], same seeds), so with the same `--seed` it dirties the very
//! pages the real guest would after the same number of writes.
//!
//! Time is simulated: a round lasts a fixed overhead (harvest, the
//! receiver's acknowledgement) plus its bytes, framed as the sender frames
//! them, over the rate limit or the link, whichever is lower. The guest
//! writes at its workload's rate meanwhile. Stop-and-copy runs at the
//! highest allowed rate; downtime is its send time plus a fixed overhead
//! (pause, device state, resume). Only page bitmaps are kept, so a 1 TiB
//! guest costs 64 MiB and its writes, not its memory.

use std::time::Duration;

use crate::dirty::DirtySet;
use crate::policy::{Decision, Precopy, RoundFigures, StopReason};
use crate::protocol::{self, Message};
use crate::ratelimit::RateLimiter;
use crate::report::{DowntimeBreakdown, Report, RoundReport, Status};
use crate::sender::{chunk_pages, SenderConfig};
use crate::units::PageRate;
use crate::workload::{Stream, Workload, WorkloadError};

/// Errors of a simulation.
#[derive(Debug, thiserror::Error)]
pub enum SimulateError {
    #[error(transparent)]
    Workload(#[from] WorkloadError),
    #[error(transparent)]
    Guest(#[from] crate::guest::GuestError),
    #[error("--workload \"{0}\": a simulation needs a numeric rate (rate=max depends on the machine: measure it with livemig dirtyrate)")]
    MaxRate(String),
    #[error("--link must be a positive rate")]
    Link,
    #[error("pre-copy does not converge: the policy had not stopped after {0} simulated rounds ({1:.0} s); lower --max-time, or ask livemig model")]
    Runaway(usize, f64),
}

/// Rounds a simulation runs before it calls pre-copy non-converging (real
/// runs of this size would take hours: only --max-time stops them).
pub const MAX_ROUNDS: usize = 10_000;

/// What a simulation assumes beyond the migration's own configuration.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub migration: SenderConfig,
    pub page_size: u64,
    /// Network bytes/s when the rate limit allows more.
    pub link_bytes_per_s: f64,
    /// Fixed time every pre-copy round costs besides sending.
    pub round_overhead: Duration,
    /// Fixed part of the downtime: pause, device state, resume.
    pub downtime_overhead: Duration,
    /// Connect and handshake.
    pub setup: Duration,
}

/// Simulate one migration; the report has the shape of a real run's, with
/// `mode` "simulated".
pub fn run(cfg: &SimConfig) -> Result<Report, SimulateError> {
    let m = &cfg.migration;
    let workload = crate::guest::check_config(&m.workload, m.memory_bytes, cfg.page_size, m.vcpus)?;
    if cfg.link_bytes_per_s.is_nan() || cfg.link_bytes_per_s <= 0.0 {
        return Err(SimulateError::Link);
    }
    let mut guest = SimGuest::new(&workload, m)?;
    let pages = m.memory_bytes / cfg.page_size;
    let mut report = Report {
        mode: crate::report::SIMULATED,
        tracker: "none".into(),
        ..m.report()
    };
    report.page_size = cfg.page_size;
    report.setup_time_ms = ms(cfg.setup);
    let mut precopy = Precopy::new(m.policy_config(cfg.page_size));
    let mut elapsed = cfg.setup;
    let mut todo = DirtySet::all(pages);
    let mut dirty = DirtySet::new(pages);
    let stop = loop {
        let round = precopy.rounds().len() as u32;
        if round as usize >= MAX_ROUNDS {
            return Err(SimulateError::Runaway(MAX_ROUNDS, elapsed.as_secs_f64()));
        }
        let limit = precopy.limit();
        let bytes = round_bytes(&todo, round, false, limit, cfg.page_size);
        let duration = cfg.round_overhead + transfer(bytes, limit, cfg.link_bytes_per_s, round);
        dirty.clear();
        guest.run(duration, &mut dirty);
        elapsed += duration;
        let f = RoundFigures {
            round,
            pages: todo.count(),
            bytes,
            duration,
            dirty_pages: dirty.count(),
            rate_limit: limit,
        };
        std::mem::swap(&mut todo, &mut dirty);
        let decision = precopy.end_round(f.clone(), elapsed);
        push_round(&mut report, &f, false, precopy.explain(decision, elapsed));
        if let Decision::Stop(reason) = decision {
            break reason;
        }
    };
    let limit = precopy.final_limit();
    let bytes = round_bytes(
        &todo,
        precopy.rounds().len() as u32,
        true,
        limit,
        cfg.page_size,
    );
    report.guest_target_rate_pps = guest.rate_pps();
    finish(
        &mut report,
        &precopy,
        cfg,
        stop,
        (todo.count(), bytes),
        elapsed,
    );
    Ok(report)
}

/// Close a prediction (simulated or modelled): the stop-and-copy round of
/// `last` (pages, bytes) at the highest allowed rate, the downtime, totals.
pub(crate) fn finish(
    report: &mut Report,
    precopy: &Precopy,
    cfg: &SimConfig,
    stop: StopReason,
    (pages, bytes): (u64, u64),
    elapsed: Duration,
) {
    report.stop_reason = Some(stop.as_str().into());
    report.converged = stop.converged();
    let limit = precopy.final_limit();
    let last = transfer(
        bytes,
        limit,
        cfg.link_bytes_per_s,
        precopy.rounds().len() as u32,
    );
    push_round(
        report,
        &RoundFigures {
            round: precopy.rounds().len() as u32,
            pages,
            bytes,
            duration: last,
            dirty_pages: 0,
            rate_limit: limit,
        },
        true,
        String::new(),
    );
    let downtime = last + cfg.downtime_overhead;
    report.downtime_ms = Some(ms(downtime));
    report.downtime_breakdown_ms = DowntimeBreakdown {
        last_pages: ms(last),
        device_state: ms(cfg.downtime_overhead),
        ..DowntimeBreakdown::default()
    };
    report.migration_time_ms = Some(ms(elapsed + downtime));
    report.total_time_ms = ms(elapsed + downtime);
    report.dirty_sync_count = precopy.rounds().len() as u64 + 1;
    report.status = Status::Completed;
}

/// Bytes a round puts on the wire: RoundStart, a Pages frame per run of at
/// most a chunk (as the sender cuts them), RoundEnd.
fn round_bytes(set: &DirtySet, round: u32, stop: bool, limit: Option<u64>, page_size: u64) -> u64 {
    let chunk = chunk_pages(limit, page_size);
    let frame = protocol::pages_frame_header(0, 1, page_size as u32).len() as u64;
    let runs = set.runs(chunk).count() as u64;
    let start = Message::RoundStart {
        round,
        stop_and_copy: stop,
    };
    let pages = set.count();
    let end = Message::round_end(round, pages);
    (start.encode().len() + end.encode().len()) as u64 + runs * frame + pages * page_size
}

/// Time to move `bytes` of round `round` at the limit or the link,
/// whichever is lower. The sender's limiter starts with a full bucket, so
/// round 0's first bytes go at link speed (RateLimiter::initial_burst).
pub(crate) fn transfer(bytes: u64, limit: Option<u64>, link: f64, round: u32) -> Duration {
    let Some(l) = limit.map(|l| l as f64).filter(|&l| l < link) else {
        return Duration::from_secs_f64(bytes as f64 / link);
    };
    let burst = match round {
        0 => RateLimiter::initial_burst(limit).min(bytes),
        _ => 0,
    };
    Duration::from_secs_f64(burst as f64 / link + (bytes - burst) as f64 / l)
}

/// Add a predicted round to the report, as the sender adds a real one.
pub(crate) fn push_round(
    report: &mut Report,
    f: &RoundFigures,
    stop_and_copy: bool,
    decision: String,
) {
    report
        .rounds
        .push(RoundReport::new(f, Duration::ZERO, stop_and_copy, decision));
    report.transferred_bytes += f.bytes;
    report.transferred_pages += f.pages;
}

/// The guest's writes without the guest: its vCPUs' streams, advanced by
/// the number of writes each makes in a stretch of simulated time.
struct SimGuest<'a> {
    workload: &'a Workload,
    streams: Vec<Stream>,
    /// Writes per second per vCPU (0 when idle).
    rate: f64,
    /// Fractional writes carried from one stretch to the next.
    owed: f64,
}

impl<'a> SimGuest<'a> {
    fn new(workload: &'a Workload, m: &SenderConfig) -> Result<Self, SimulateError> {
        let rate = match (workload.is_idle(), workload.rate) {
            (true, _) => 0.0,
            (false, PageRate::PerSec(_)) => workload.rate_per_vcpu(m.vcpus).unwrap_or(0.0),
            (false, PageRate::Max) => return Err(SimulateError::MaxRate(m.workload.clone())),
        };
        let streams = (0..m.vcpus)
            .map(|i| {
                // The seeds the guest process gives its vCPUs.
                let seed = crate::guest::vcpu_seed(m.seed, i);
                Stream::new(workload, i, m.vcpus, seed, 0, None)
            })
            .collect();
        Ok(Self {
            workload,
            streams,
            rate,
            owed: 0.0,
        })
    }

    fn rate_pps(&self) -> Option<f64> {
        (self.rate > 0.0).then_some(self.rate * self.streams.len() as f64)
    }

    /// Let the guest run for `d`, adding the pages it writes to `into`.
    fn run(&mut self, d: Duration, into: &mut DirtySet) {
        let due = self.rate * d.as_secs_f64() + self.owed;
        let writes = due.floor();
        self.owed = due - writes;
        for s in &mut self.streams {
            for _ in 0..writes as u64 {
                into.set(s.next(self.workload).page());
            }
        }
    }
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
