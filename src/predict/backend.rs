//! The backend both predictions share: a migration stepped by the same
//! state machine as a real one ([`crate::migration::machine`]) on a
//! simulated clock. Rounds last a fixed overhead plus their bytes over the
//! rate limit or the link; the stop-and-copy round runs at the highest
//! allowed rate and the downtime adds a fixed overhead. What differs
//! between the simulator and the model is only where dirty pages come
//! from: a [`Dirtying`].

use std::time::Duration;

use crate::guest::control::Throttle;
use crate::guest::workload::WorkloadError;
use crate::migration::iteration::Iteration;
use crate::migration::machine::{Backend, Round};
use crate::migration::policy::{Precopy, RoundFigures, StopReason};
use crate::migration::source::SenderConfig;
use crate::migration::throttle::rate_factor;
use crate::predict::teleport::SecondChannel;
use crate::report::{ms, DowntimeBreakdown, Report};
use crate::util::page::PageSize;
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
    #[error("a prediction cannot follow a {0} workload's changing writes: predict its parts with their own --workload")]
    Unpredictable(&'static str),
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

impl SimConfig {
    /// What one harvest of this guest's memory costs.
    pub fn harvest(&self) -> Duration {
        let gib = self.migration.memory_bytes as f64 / (1u64 << 30) as f64;
        self.harvest_per_gib.mul_f64(gib)
    }
}

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
    /// What one harvest of the dirty tracker costs per GiB of guest
    /// memory (a `uffd-wp` harvest walks every page-table entry): every
    /// round pays it, and the downtime pays it once more (the final
    /// harvest). Zero: counted in the overheads above.
    pub harvest_per_gib: Duration,
    /// Connect and handshake.
    pub setup: Duration,
}

/// Where a prediction's dirty pages come from.
pub(crate) trait Dirtying {
    /// Pages the next round sends.
    fn pending(&self) -> u64;

    /// The guest's writes per second, unthrottled (0 when idle).
    fn rate_pps(&self) -> f64;

    /// Bytes a round of the pending pages puts on the wire at `limit`.
    fn round_bytes(&self, round: u32, stop_and_copy: bool, limit: Option<u64>) -> u64;

    /// The next `pages` pending pages went out, in order from where the
    /// last send stopped (every pending page, for a full pass); the rest
    /// stay pending.
    fn send(&mut self, pages: u64);

    /// The guest runs for `d`: what it dirties joins the pending pages.
    /// Returns how many pages it dirtied.
    fn run(&mut self, d: Duration) -> Result<u64, SimulateError>;

    /// As [`Backend::fast_forward`], moving the clock `now` over the
    /// rounds it accounts for.
    fn fast_forward(
        &mut self,
        _cfg: &SimConfig,
        _precopy: &Precopy,
        _now: &mut Duration,
        _report: &mut Report,
    ) -> Option<StopReason> {
        None
    }
}

/// How long the network takes: a link of the migration's own (the
/// default, [`OwnLink`]), or a share of links other migrations use too (a
/// plan's fabric).
pub trait Network {
    /// Carry round `round`'s `bytes`, at most at `limit` bytes/s: the time
    /// it took.
    fn transfer(&mut self, cfg: &SimConfig, bytes: u64, limit: Option<u64>, round: u32)
        -> Duration;

    /// Let a fixed cost `d` pass (setup, a round's overhead, the downtime's).
    fn pass(&mut self, d: Duration) -> Duration {
        d
    }
}

/// The migration has the link (`SimConfig::link_bytes_per_s`) to itself.
pub struct OwnLink;

impl Network for OwnLink {
    fn transfer(
        &mut self,
        cfg: &SimConfig,
        bytes: u64,
        limit: Option<u64>,
        round: u32,
    ) -> Duration {
        transfer(cfg, bytes, limit, round)
    }
}

/// A predicted migration: its configuration, its dirty pages, its clock.
pub(crate) struct Prediction<'a, D, N = OwnLink> {
    cfg: &'a SimConfig,
    net: N,
    dirtying: D,
    /// Since the migration started.
    now: Duration,
    /// The stop-and-copy round's send time.
    last_pages: Duration,
    /// Pre-copy reached a fixed point that only the clock ends.
    fast_forwarded: bool,
    /// The guest dirties at this share of its rate (see [`rate_factor`]).
    throttle: Throttle,
    /// Page-cache teleportation: storage's part, and when round 0 began.
    second: Option<SecondChannel>,
    round0_at: Duration,
    network_busy: Duration,
}

impl<'a, D: Dirtying, N: Network> Prediction<'a, D, N> {
    pub fn new(cfg: &'a SimConfig, dirtying: D, net: N) -> Self {
        Self {
            cfg,
            net,
            dirtying,
            now: Duration::ZERO,
            last_pages: Duration::ZERO,
            fast_forwarded: false,
            throttle: Throttle::Off,
            second: SecondChannel::plan(&cfg.migration, cfg.page_size, cfg.link_bytes_per_s),
            round0_at: Duration::ZERO,
            network_busy: Duration::ZERO,
        }
    }
}

impl<D: Dirtying, N: Network> Prediction<'_, D, N> {
    /// A `qemu` round: send the `pending` pages (`all_bytes` on the wire)
    /// in steps that end where the pending estimate would fall below the
    /// threshold or where the thread's 100 ms period ends (and the
    /// threshold is measured again), until it wants a sync. Returns (pages
    /// sent, bytes, duration).
    fn until_sync(
        &mut self,
        it: &mut Iteration,
        round: u32,
        limit: Option<u64>,
        pending: u64,
        all_bytes: u64,
    ) -> (u64, u64, Duration) {
        let page = self.cfg.page_size.as_u64();
        // u64 -> f64: byte and page counts.
        let per_page = all_bytes as f64 / pending.max(1) as f64;
        let link = self.cfg.link_bytes_per_s;
        let rate = limit
            .map(|l| l as f64)
            .filter(|&l| l < link)
            .unwrap_or(link);
        let mut t = self.net.pass(self.cfg.round_overhead + self.cfg.harvest());
        it.tick(self.now + t, 0);
        let (mut sent, mut bytes) = (0u64, 0u64);
        while !it.wants_sync((pending - sent).saturating_mul(page)) {
            let left = pending - sent;
            // The most pages the estimate may hold and still sync.
            let below = it.threshold().saturating_sub(1) / page;
            let need = left - below.min(left);
            let until = it.period_end().saturating_sub(self.now + t);
            // f64 -> u64 saturates: a count of pages.
            let fit = (until.as_secs_f64() * rate / per_page) as u64;
            let n = need.min(fit.max(1));
            let b = (n as f64 * per_page).round() as u64;
            // The bucket's credit goes to the round's first bytes only.
            let part = if sent == 0 { round } else { MID_ROUND };
            t += self.net.transfer(self.cfg, b, limit, part);
            sent += n;
            bytes += b;
            it.tick(self.now + t, b);
        }
        (sent, bytes, t)
    }
}

impl<D: Dirtying, N: Network> Backend for Prediction<'_, D, N> {
    type Error = SimulateError;

    fn elapsed(&self) -> Duration {
        self.now
    }

    fn setup(&mut self, report: &mut Report) -> Result<(), SimulateError> {
        self.now = self.net.pass(self.cfg.setup);
        if let Some(s) = &self.second {
            self.now += s.setup;
        }
        report.setup_time_ms = ms(self.now);
        // The sync that starts dirty tracking, as a real sender's (and
        // QEMU's ram_init_bitmaps) does.
        report.dirty_sync_count += 1;
        Ok(())
    }

    fn precopy_round(
        &mut self,
        round: u32,
        limit: Option<u64>,
        iteration: Option<&mut Iteration>,
        report: &mut Report,
    ) -> Result<Round, SimulateError> {
        if round as usize >= MAX_ROUNDS {
            return Err(SimulateError::Runaway(MAX_ROUNDS, self.now.as_secs_f64()));
        }
        let pending = self.dirtying.pending();
        let all_bytes = self.dirtying.round_bytes(round, false, limit);
        // Storage carries round 0's teleported pages instead.
        let teleported = match self.second.filter(|_| round == 0) {
            Some(s) => {
                self.round0_at = self.now;
                s.pages.min(pending)
            }
            None => 0,
        };
        let net_pending = pending - teleported;
        let net_bytes = all_bytes.saturating_sub(self.cfg.page_size.bytes(teleported));
        let (pages, bytes, duration) = match iteration {
            None => {
                let d = self.net.pass(self.cfg.round_overhead + self.cfg.harvest())
                    + self.net.transfer(self.cfg, net_bytes, limit, round);
                (net_pending, net_bytes, d)
            }
            Some(it) => self.until_sync(it, round, limit, net_pending, net_bytes),
        };
        self.network_busy += duration;
        self.dirtying.send(pages + teleported);
        let carried = net_pending - pages;
        self.now += duration;
        // A throttled guest writes as if it ran for a share of the round.
        let vcpus = f64::from(self.cfg.migration.vcpus.max(1));
        let rate = self.dirtying.rate_pps();
        let factor = rate_factor(self.throttle, Some(rate / vcpus));
        let dirty_pages = self.dirtying.run(duration.mul_f64(factor))?;
        report.dirty_sync_count += 1;
        let figures = RoundFigures {
            round,
            pages,
            bytes,
            duration,
            dirty_pages,
            rate_limit: limit,
            carried_pages: carried,
            pending: (carried > 0).then(|| self.dirtying.pending()),
            ..RoundFigures::default()
        };
        Ok(Round {
            // f64 -> u64 saturates: a count of writes.
            guest_ops: Some((rate * factor * duration.as_secs_f64()) as u64),
            throttled: duration.mul_f64(1.0 - factor),
            ..Round::new(figures, Duration::ZERO)
        })
    }

    fn fast_forward(&mut self, precopy: &Precopy, report: &mut Report) -> Option<StopReason> {
        let stop = self
            .dirtying
            .fast_forward(self.cfg, precopy, &mut self.now, report);
        self.fast_forwarded |= stop.is_some();
        stop
    }

    fn switchover(
        &mut self,
        round: u32,
        limit: Option<u64>,
        _postcopy: bool,
        report: &mut Report,
    ) -> Result<Option<Round>, SimulateError> {
        if let Some(s) = self.second {
            // The sender waits for storage before it pauses the guest.
            self.now = self.now.max(self.round0_at + s.done_after);
        }
        report.dirty_sync_count += 1;
        let bytes = self.dirtying.round_bytes(round, true, limit);
        self.last_pages = self.net.transfer(self.cfg, bytes, limit, round);
        self.network_busy += self.last_pages;
        let figures = RoundFigures {
            round,
            pages: self.dirtying.pending(),
            bytes,
            duration: self.last_pages,
            rate_limit: limit,
            ..RoundFigures::default()
        };
        Ok(Some(Round::new(figures, Duration::ZERO)))
    }

    fn hand_over(&mut self, report: &mut Report) -> Result<(), SimulateError> {
        let harvest = self.cfg.harvest();
        let downtime = self.last_pages + self.net.pass(self.cfg.downtime_overhead + harvest);
        self.now += downtime;
        report.downtime_ms = Some(ms(downtime));
        report.downtime_breakdown_ms = DowntimeBreakdown {
            final_harvest: ms(harvest),
            last_pages: ms(self.last_pages),
            device_state: ms(self.cfg.downtime_overhead),
            ..DowntimeBreakdown::default()
        };
        report.migration_time_ms = Some(ms(self.now));
        report.total_time_ms = ms(self.now);
        if let Some(s) = &self.second {
            report.teleport = Some(s.stats(self.cfg.page_size, self.network_busy));
        }
        if self.fast_forwarded {
            report.converged = Some(false);
        }
        Ok(())
    }

    fn postcopy(&mut self, _: u32, _: Option<u64>, _: &mut Report) -> Result<Round, SimulateError> {
        Err(SimulateError::Postcopy)
    }

    fn verify(&mut self, _report: &mut Report) -> Result<(), SimulateError> {
        Ok(())
    }

    fn throttle(&mut self, t: Throttle) -> Result<(), SimulateError> {
        self.throttle = t;
        Ok(())
    }
}

/// Time to move `bytes` of a round at the limit or the link, whichever is
/// lower. The sender's token bucket fills while it is not sending: it
/// starts full, and refills during the round overhead before later rounds
/// (acknowledgement, harvest, pause), so a round's first bytes go at link
/// speed (RateLimiter::initial_burst is the bucket's depth).
/// The `round` of [`transfer`] for a later part of a round cut into steps
/// (`qemu`): the bucket was emptied by the part before, no credit.
pub(crate) const MID_ROUND: u32 = u32::MAX;

pub(crate) fn transfer(cfg: &SimConfig, bytes: u64, limit: Option<u64>, round: u32) -> Duration {
    let link = cfg.link_bytes_per_s;
    let Some(l) = limit.map(|l| l as f64).filter(|&l| l < link) else {
        return Duration::from_secs_f64(bytes as f64 / link);
    };
    let depth = RateLimiter::initial_burst(limit);
    let refilled = match round {
        0 => depth,
        MID_ROUND => 0,
        // f64 -> u64 saturates: bytes the bucket gained while idle.
        _ => depth.min((l * cfg.round_overhead.as_secs_f64()) as u64),
    };
    let credit = refilled.min(bytes);
    Duration::from_secs_f64(credit as f64 / link + (bytes - credit) as f64 / l)
}
