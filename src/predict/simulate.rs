//! `livemig simulate`: a discrete-event simulation of a pre-copy migration
//! that moves no memory. It steps the same state machine as a real
//! migration ([`crate::migration::machine`]: the same policy and
//! rate-limiter code, through the prediction backend) over a synthetic
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
use crate::guest::workload::{Layout, Pattern, Stream};
use crate::migration::machine::Migration;
use crate::migration::source::SenderConfig;
use crate::predict::backend::{Dirtying, Prediction};
pub use crate::predict::backend::{Network, OwnLink};
pub use crate::predict::backend::{SimConfig, SimulateError, MAX_ROUNDS};
use crate::report::Report;
use crate::util::page::PageSize;
use crate::util::units::PageRate;
use crate::wire::datapath::chunk_pages;
use crate::wire::protocol::{self, Message};

/// Simulate one migration; the report has the shape of a real run's, with
/// `mode` "simulated".
pub fn run(cfg: &SimConfig) -> Result<Report, SimulateError> {
    run_on(cfg, OwnLink)
}

/// [`run`] over a network of the caller's.
pub fn run_on(cfg: &SimConfig, net: impl Network) -> Result<Report, SimulateError> {
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
        guest,
        page_size: cfg.page_size,
        todo: DirtySet::all(pages),
        dirty: DirtySet::new(pages),
        cursor: 0,
    };
    let sim = Prediction::new(cfg, sim, net);
    let mut migration = Migration::new(sim, m.mode, m.policy_config(cfg.page_size), report);
    migration.run()?;
    Ok(migration.report)
}

/// The simulator's dirty pages: page bitmaps written by a synthetic guest.
struct Sim<'a> {
    guest: SimGuest<'a>,
    page_size: PageSize,
    /// The pages the next round sends, and those dirtied during this one.
    todo: DirtySet,
    dirty: DirtySet,
    /// Where the next send starts (`qemu` goes on where a sync stopped it).
    cursor: u64,
}

impl Dirtying for Sim<'_> {
    fn pending(&self) -> u64 {
        self.todo.count()
    }

    fn rate_pps(&self) -> f64 {
        self.guest.rate_pps().unwrap_or(0.0)
    }

    fn round_bytes(&self, round: u32, stop_and_copy: bool, limit: Option<u64>) -> u64 {
        round_bytes(&self.todo, round, stop_and_copy, limit, self.page_size)
    }

    fn send(&mut self, pages: u64) {
        if pages >= self.todo.count() {
            self.todo.clear();
            return;
        }
        // The page after the `pages`-th, in the order the sender goes.
        let mut left = pages;
        let mut at = self.cursor;
        for (first, count) in self.todo.runs_from(self.cursor, u64::MAX) {
            if left < count {
                at = first + left;
                break;
            }
            left -= count;
        }
        self.todo.clear_wrapping(self.cursor, at);
        self.cursor = at;
    }

    fn run(&mut self, d: Duration) -> Result<u64, SimulateError> {
        self.dirty.clear();
        self.guest.run(d, &mut self.dirty)?;
        self.todo.union(&self.dirty);
        Ok(self.dirty.count())
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
    let layout =
        crate::guest::process::check_config(&m.workload, m.memory_bytes, cfg.page_size, m.vcpus)?;
    match layout.pattern {
        Pattern::Phases(_) => Err(SimulateError::Unpredictable("phases")),
        Pattern::Trace(_) => Err(SimulateError::Unpredictable("trace")),
        _ => Ok(layout),
    }
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
