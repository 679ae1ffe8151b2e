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

use crate::guest::dirty::DirtySet;
use crate::guest::workload::{Layout, Pattern, Stream, WorkloadError};
use crate::migration::machine::{Backend, Migration, Round};
use crate::migration::policy::RoundFigures;
use crate::migration::source::SenderConfig;
use crate::report::{ms, DowntimeBreakdown, Report};
use crate::util::page::PageSize;
use crate::util::units::PageRate;
use crate::wire::datapath::chunk_pages;
use crate::wire::protocol::{self, Message};
use crate::wire::ratelimit::RateLimiter;

/// Errors of a simulation.
#[derive(Debug, thiserror::Error)]
pub enum SimulateError {
    #[error(transparent)]
    Workload(#[from] WorkloadError),
    #[error(transparent)]
    Guest(#[from] crate::guest::process::GuestError),
    #[error(transparent)]
    Memory(#[from] crate::guest::memory::MemoryError),
    #[error("a prediction needs a numeric rate (rate=max depends on the machine: measure it with livemig dirtyrate)")]
    MaxRate,
    #[error("the link's rate must be positive")]
    Link,
    #[error("the simulation would compute more than {0} guest writes (a fast writer over long rounds); ask livemig model instead, or lower the rate or the time limit")]
    TooManyWrites(u64),
    #[error("predictions go up to 1 PiB")]
    TooLarge,
    #[error("predictions cover pre-copy and cold migration, not post-copy")]
    Postcopy,
    #[error("pre-copy does not converge: the policy had not stopped after {0} rounds ({1:.0} s of migration); lower the time limit")]
    Runaway(usize, f64),
}

/// Rounds a simulation runs before it calls pre-copy non-converging (real
/// runs of this size would take hours: only --max-time stops them).
pub const MAX_ROUNDS: usize = 10_000;

/// What a simulation assumes beyond the migration's own configuration.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub migration: SenderConfig,
    pub page_size: PageSize,
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
    let workload = check(cfg)?;
    let pages = cfg.page_size.pages(m.memory_bytes);
    // Two page bitmaps are all a simulation holds.
    crate::guest::memory::check_fits(
        &format!(
            "the page bitmaps of a guest of {}",
            crate::util::units::fmt_bytes(m.memory_bytes)
        ),
        pages.div_ceil(8).saturating_mul(2),
    )?;
    let guest = SimGuest::new(&workload, m)?;
    let report = Report {
        mode: crate::report::SIMULATED,
        tracker: "none".into(),
        page_size: cfg.page_size.as_u64(),
        guest_target_rate_pps: guest.rate_pps(),
        ..m.report()
    };
    let sim = Sim {
        cfg,
        guest,
        todo: DirtySet::all(pages),
        dirty: DirtySet::new(pages),
        clock: Clock::default(),
    };
    let mut migration = Migration::new(sim, m.mode, m.policy_config(cfg.page_size), report);
    migration.run()?;
    Ok(migration.report)
}

/// A prediction's simulated time.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Clock {
    /// Since the migration started.
    pub now: Duration,
    /// The stop-and-copy round's send time, once it is known.
    last_pages: Duration,
}

impl Clock {
    /// Connect and handshake.
    pub fn setup(&mut self, cfg: &SimConfig, report: &mut Report) {
        self.now = cfg.setup;
        report.setup_time_ms = ms(cfg.setup);
    }

    /// A pre-copy round of `bytes`: its time, which the clock moves by.
    pub fn round(
        &mut self,
        cfg: &SimConfig,
        bytes: u64,
        limit: Option<u64>,
        round: u32,
    ) -> Duration {
        let d = round_time(cfg, bytes, limit, round);
        self.now += d;
        d
    }

    /// The stop-and-copy round of `pages` pages in `bytes` at the highest
    /// allowed rate (`limit`).
    pub fn stop_and_copy(
        &mut self,
        cfg: &SimConfig,
        round: u32,
        (pages, bytes): (u64, u64),
        limit: Option<u64>,
    ) -> Round {
        self.last_pages = transfer(cfg, bytes, limit, round);
        Round {
            figures: RoundFigures {
                round,
                pages,
                bytes,
                duration: self.last_pages,
                dirty_pages: 0,
                rate_limit: limit,
            },
            harvest: Duration::ZERO,
        }
    }

    /// The destination runs: the downtime and the totals.
    pub fn hand_over(&mut self, cfg: &SimConfig, report: &mut Report) {
        let downtime = self.last_pages + cfg.downtime_overhead;
        self.now += downtime;
        report.downtime_ms = Some(ms(downtime));
        report.downtime_breakdown_ms = DowntimeBreakdown {
            last_pages: ms(self.last_pages),
            device_state: ms(cfg.downtime_overhead),
            ..DowntimeBreakdown::default()
        };
        report.migration_time_ms = Some(ms(self.now));
        report.total_time_ms = ms(self.now);
    }
}

/// The simulator as a migration's backend: page bitmaps, a synthetic guest
/// and a simulated clock.
struct Sim<'a> {
    cfg: &'a SimConfig,
    guest: SimGuest<'a>,
    /// The pages the next round sends, and those dirtied during this one.
    todo: DirtySet,
    dirty: DirtySet,
    clock: Clock,
}

impl Backend for Sim<'_> {
    type Error = SimulateError;

    fn elapsed(&self) -> Duration {
        self.clock.now
    }

    fn setup(&mut self, report: &mut Report) -> Result<(), SimulateError> {
        self.clock.setup(self.cfg, report);
        Ok(())
    }

    fn precopy_round(
        &mut self,
        round: u32,
        limit: Option<u64>,
        report: &mut Report,
    ) -> Result<Round, SimulateError> {
        runaway(round, self.clock.now)?;
        let bytes = round_bytes(&self.todo, round, false, limit, self.cfg.page_size);
        let duration = self.clock.round(self.cfg, bytes, limit, round);
        self.dirty.clear();
        self.guest.run(duration, &mut self.dirty)?;
        report.dirty_sync_count += 1;
        let figures = RoundFigures {
            round,
            pages: self.todo.count(),
            bytes,
            duration,
            dirty_pages: self.dirty.count(),
            rate_limit: limit,
        };
        std::mem::swap(&mut self.todo, &mut self.dirty);
        Ok(Round {
            figures,
            harvest: Duration::ZERO,
        })
    }

    fn switchover(
        &mut self,
        round: u32,
        limit: Option<u64>,
        _postcopy: bool,
        report: &mut Report,
    ) -> Result<Option<Round>, SimulateError> {
        report.dirty_sync_count += 1;
        let bytes = round_bytes(&self.todo, round, true, limit, self.cfg.page_size);
        let last = (self.todo.count(), bytes);
        Ok(Some(self.clock.stop_and_copy(self.cfg, round, last, limit)))
    }

    fn hand_over(&mut self, report: &mut Report) -> Result<(), SimulateError> {
        self.clock.hand_over(self.cfg, report);
        Ok(())
    }

    fn postcopy(&mut self, _: u32, _: Option<u64>, _: &mut Report) -> Result<Round, SimulateError> {
        Err(SimulateError::Postcopy)
    }

    fn verify(&mut self, _report: &mut Report) -> Result<(), SimulateError> {
        Ok(())
    }
}

/// A prediction gives up on pre-copy after [`MAX_ROUNDS`] rounds.
pub(crate) fn runaway(round: u32, now: Duration) -> Result<(), SimulateError> {
    match round as usize >= MAX_ROUNDS {
        true => Err(SimulateError::Runaway(MAX_ROUNDS, now.as_secs_f64())),
        false => Ok(()),
    }
}

/// What every prediction checks first: the guest's configuration, the
/// link, and a memory size arithmetic on bytes cannot overflow.
pub(crate) fn check(cfg: &SimConfig) -> Result<Layout, SimulateError> {
    let m = &cfg.migration;
    if m.memory_bytes > MAX_MEMORY {
        return Err(SimulateError::TooLarge);
    }
    if cfg.link_bytes_per_s.is_nan() || cfg.link_bytes_per_s <= 0.0 {
        return Err(SimulateError::Link);
    }
    if m.mode.is_postcopy() {
        return Err(SimulateError::Postcopy);
    }
    Ok(crate::guest::process::check_config(
        &m.workload,
        m.memory_bytes,
        cfg.page_size,
        m.vcpus,
    )?)
}

/// Largest guest a prediction takes: 1 PiB.
pub const MAX_MEMORY: u64 = 1 << 50;

/// Bytes a round puts on the wire: RoundStart, a Pages frame per run of at
/// most a chunk (as the sender cuts them), RoundEnd.
fn round_bytes(
    set: &DirtySet,
    round: u32,
    stop: bool,
    limit: Option<u64>,
    page_size: PageSize,
) -> u64 {
    let runs = set.runs(chunk_pages(limit, page_size)).count() as u64;
    wire_bytes(round, stop, set.count(), runs, page_size.as_u64())
}

/// Bytes of a round of `pages` pages sent as `frames` Pages frames, with
/// its RoundStart and RoundEnd, encoded as the sender encodes them.
pub(crate) fn wire_bytes(round: u32, stop: bool, pages: u64, frames: u64, page_size: u64) -> u64 {
    let frame = protocol::pages_frame_header(0, 1, page_size as u32).len() as u64;
    let start = Message::round_start(round, stop);
    let end = Message::round_end(round, pages);
    ((start.encode().len() + end.encode().len()) as u64)
        .saturating_add(frames.saturating_mul(frame))
        .saturating_add(pages.saturating_mul(page_size))
}

/// Time to move `bytes` of a round at the limit or the link, whichever is
/// lower. The sender's token bucket fills while it is not sending: it
/// starts full, and refills during the round overhead before later rounds
/// (acknowledgement, harvest, pause), so a round's first bytes go at link
/// speed (RateLimiter::initial_burst is the bucket's depth).
pub(crate) fn transfer(cfg: &SimConfig, bytes: u64, limit: Option<u64>, round: u32) -> Duration {
    let link = cfg.link_bytes_per_s;
    let Some(l) = limit.map(|l| l as f64).filter(|&l| l < link) else {
        return Duration::from_secs_f64(bytes as f64 / link);
    };
    let depth = RateLimiter::initial_burst(limit);
    let refilled = match round {
        0 => depth,
        // f64 -> u64 saturates: bytes the bucket gained while idle.
        _ => depth.min((l * cfg.round_overhead.as_secs_f64()) as u64),
    };
    let credit = refilled.min(bytes);
    Duration::from_secs_f64(credit as f64 / link + (bytes - credit) as f64 / l)
}

/// A pre-copy round's time: its fixed overhead, then its bytes.
pub(crate) fn round_time(cfg: &SimConfig, bytes: u64, limit: Option<u64>, round: u32) -> Duration {
    cfg.round_overhead + transfer(cfg, bytes, limit, round)
}

/// The guest's writes without the guest: its vCPUs' streams, advanced by
/// the number of writes each makes in a stretch of simulated time.
struct SimGuest<'a> {
    workload: &'a Layout,
    streams: Vec<Stream>,
    /// Writes per second per vCPU (0 when idle).
    rate: f64,
    /// Fractional writes carried from one stretch to the next.
    owed: f64,
    /// Writes computed so far (saturated stretches excepted).
    computed: u64,
}

impl<'a> SimGuest<'a> {
    fn new(workload: &'a Layout, m: &SenderConfig) -> Result<Self, SimulateError> {
        let rate = match (workload.is_idle(), workload.rate) {
            (true, _) => 0.0,
            (false, PageRate::PerSec(_)) => workload.rate_per_vcpu(m.vcpus).unwrap_or(0.0),
            (false, PageRate::Max) => return Err(SimulateError::MaxRate),
        };
        let streams = (0..m.vcpus)
            .map(|i| {
                // The seeds the guest process gives its vCPUs.
                let seed = crate::guest::process::vcpu_seed(m.seed, i);
                Stream::new(workload, i, m.vcpus, seed, 0, None)
            })
            .collect();
        Ok(Self {
            workload,
            streams,
            rate,
            owed: 0.0,
            computed: 0,
        })
    }

    fn rate_pps(&self) -> Option<f64> {
        (self.rate > 0.0).then_some(self.rate * self.streams.len() as f64)
    }

    /// Let the guest run for `d`, adding the pages it writes to `into`.
    /// A stretch with more than [`SATURATION`] writes per page a stream can
    /// reach marks all those pages without computing the writes (for a
    /// sweep, exactly; at random, each page escapes with odds e^-8).
    fn run(&mut self, d: Duration, into: &mut DirtySet) -> Result<(), SimulateError> {
        let due = self.rate * d.as_secs_f64() + self.owed;
        let writes = due.floor();
        self.owed = due - writes;
        // f64 -> u64 saturates; a count of writes.
        let writes = writes as u64;
        for s in &mut self.streams {
            let (first, count) = s.reach(self.workload);
            let saturation = match self.workload.pattern {
                Pattern::Sweep { .. } => count,
                Pattern::HotSet { hot, .. } if hot < 1.0 => {
                    (SATURATION as f64 * count as f64 / (1.0 - hot)) as u64
                }
                _ => count.saturating_mul(SATURATION),
            };
            if writes >= saturation {
                into.set_range(first, count);
                s.skip(self.workload, writes);
                continue;
            }
            self.computed = self.computed.saturating_add(writes);
            if self.computed > MAX_WRITES {
                return Err(SimulateError::TooManyWrites(MAX_WRITES));
            }
            for _ in 0..writes {
                into.set(s.next(self.workload).page());
            }
        }
        Ok(())
    }
}

/// Writes per reachable page past which a stretch counts as saturating.
const SATURATION: u64 = 8;
/// Writes one simulation may compute (about a minute of work).
const MAX_WRITES: u64 = 4_000_000_000;
