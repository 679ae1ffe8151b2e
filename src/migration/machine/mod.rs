//! One migration from the source's side, driven phase by phase
//! ([`SourcePhase`]) over a [`Backend`] that does the work.
//!
//! The driver owns what every kind of migration shares: the phase, the
//! convergence policy ([`Precopy`]) with its rate limit, the throttle
//! ([`Governor`]), and the report's rounds and stop reason. The round loop exists here once. A backend owns
//! how a phase is carried out: the real sender over TCP
//! ([`crate::migration::source`]), the simulator and the analytical model
//! ([`crate::predict`]), or an in-memory transport in tests. Each
//! [`Migration::step`] carries out one phase, so an event loop can step
//! many migrations side by side.
//!
//! A cancel ([`Backend::cancelled`]) is honoured before a phase and when a
//! phase fails because of it, in every phase but post-copy
//! ([`SourcePhase::cancellable`]): the backend puts things back
//! ([`Backend::on_cancel`]) and the migration ends `Cancelled`.

use std::time::Duration;

use crate::guest::control::Throttle;
use crate::migration::iteration::Iteration;
use crate::migration::phases::{Mode, SourcePhase};
use crate::migration::policy::{Decision, PolicyConfig, Precopy, RoundFigures, StopReason};
use crate::migration::throttle::Governor;
use crate::report::{ms, Report, RoundReport, Status};

/// A round as a backend carried it out.
#[derive(Clone, Debug)]
pub struct Round {
    pub figures: RoundFigures,
    /// The harvest that ended it (zero where nothing is harvested).
    pub harvest: Duration,
    /// What the guest did meanwhile, where known: its writes, and the time
    /// each vCPU slept throttled (on average).
    pub guest_ops: Option<u64>,
    pub throttled: Duration,
}

impl Round {
    /// A round with no guest figures.
    pub fn new(figures: RoundFigures, harvest: Duration) -> Self {
        Self {
            figures,
            harvest,
            guest_ops: None,
            throttled: Duration::ZERO,
        }
    }
}

/// How the phases of a migration are carried out.
pub trait Backend {
    type Error: std::error::Error + 'static;

    /// Time since the migration started: the wall clock of a real
    /// migration, the simulated clock of a prediction.
    fn elapsed(&self) -> Duration;

    /// Connect and get ready to send ([`SourcePhase::Setup`]).
    fn setup(&mut self, report: &mut Report) -> Result<(), Self::Error>;

    /// Send pre-copy round `round` at `limit` bytes/s (None: unlimited):
    /// every page in round 0, else the pages the last harvest found; then
    /// harvest the pages dirtied meanwhile, the next round's.
    ///
    /// With an `iteration` (`--policy qemu`) the round is one sync period:
    /// tick it with the clock and the bytes sent as they go, and end the
    /// round (harvest) as soon as it [`Iteration::wants_sync`] for the
    /// bytes still pending; the pages not sent stay pending (counted in
    /// `carried_pages`), and the next round goes on from where this one
    /// stopped.
    fn precopy_round(
        &mut self,
        round: u32,
        limit: Option<u64>,
        iteration: Option<&mut Iteration>,
        report: &mut Report,
    ) -> Result<Round, Self::Error>;

    /// After a round the policy let continue: a backend that knows every
    /// later round repeats this one may account for them all at once and
    /// say why pre-copy then ends (the model does). None: go on stepping.
    fn fast_forward(&mut self, _precopy: &Precopy, _report: &mut Report) -> Option<StopReason> {
        None
    }

    /// Pause the guest (the downtime starts) and take its last dirty
    /// pages; send them (stop-and-copy, returning that round) or, for
    /// `postcopy`, announce them as the pages to fetch (returning None).
    fn switchover(
        &mut self,
        round: u32,
        limit: Option<u64>,
        postcopy: bool,
        report: &mut Report,
    ) -> Result<Option<Round>, Self::Error>;

    /// Send the device state and wait until the destination runs: the
    /// downtime ends.
    fn hand_over(&mut self, report: &mut Report) -> Result<(), Self::Error>;

    /// Post-copy, with the guest running at the destination: push the
    /// pages it lacks, serving its requests first, until it has them all.
    fn postcopy(
        &mut self,
        round: u32,
        limit: Option<u64>,
        report: &mut Report,
    ) -> Result<Round, Self::Error>;

    /// Check the destination's memory against the source's.
    fn verify(&mut self, report: &mut Report) -> Result<(), Self::Error>;

    /// Slow the guest down (or lift the throttle) from now on. A backend
    /// whose guest cannot be throttled refuses: never silently unthrottled.
    fn throttle(&mut self, t: Throttle) -> Result<(), Self::Error>;

    /// A row went into the report (to print it as it happens).
    fn on_round(&mut self, _row: &RoundReport) {}

    /// The migration failed in `phase`: put things back as far as they can
    /// be (a real source resumes its guest unless the destination runs).
    fn on_failure(&mut self, _phase: SourcePhase, _report: &mut Report) {}

    /// Whether the migration has been asked to stop (SIGINT, SIGTERM).
    fn cancelled(&self) -> bool {
        false
    }

    /// The migration is cancelled in `phase`: put things back as after a
    /// failure, and tell the destination.
    fn on_cancel(&mut self, phase: SourcePhase, report: &mut Report) {
        self.on_failure(phase, report);
    }
}

/// One migration: its phase, its policy, its report, and the backend.
pub struct Migration<B: Backend> {
    pub backend: B,
    pub report: Report,
    mode: Mode,
    precopy: Precopy,
    governor: Governor,
    phase: SourcePhase,
}

impl<B: Backend> Migration<B> {
    /// A migration in `mode` deciding by `policy`, about to start; `report`
    /// describes its configuration.
    pub fn new(backend: B, mode: Mode, policy: PolicyConfig, report: Report) -> Self {
        // Its first period starts with the migration (QEMU: at setup).
        let governor = Governor::new(policy.throttling, policy.page_size, Duration::ZERO);
        Self {
            backend,
            report,
            mode,
            precopy: Precopy::new(policy),
            governor,
            phase: SourcePhase::Setup,
        }
    }

    pub fn phase(&self) -> SourcePhase {
        self.phase
    }

    /// The policy's state: the rounds so far and the rate limit.
    pub fn precopy(&self) -> &Precopy {
        &self.precopy
    }

    /// Whether the migration has ended: completed, failed or cancelled.
    pub fn finished(&self) -> bool {
        matches!(
            self.phase,
            SourcePhase::Done | SourcePhase::Failed | SourcePhase::Cancelled
        )
    }

    /// Carry out the current phase and move to the next. On an error the
    /// backend puts things back ([`Backend::on_failure`]) and the migration
    /// is `Failed`. A cancel, before the phase or as the cause of its
    /// error, ends it `Cancelled` instead ([`Backend::on_cancel`]); that
    /// is no error of the step: the report says so.
    pub fn step(&mut self) -> Result<SourcePhase, B::Error> {
        if self.finished() {
            return Ok(self.phase);
        }
        if self.cancel_now() {
            return Ok(self.phase);
        }
        match self.carry_out() {
            Ok(decision) => {
                self.phase = self.phase.next(self.mode, decision);
                if self.phase == SourcePhase::Done {
                    self.report.status = Status::Completed;
                }
                Ok(self.phase)
            }
            Err(_) if self.cancel_now() => Ok(self.phase),
            Err(e) => {
                self.backend.on_failure(self.phase, &mut self.report);
                self.phase = SourcePhase::Failed;
                self.report.status = Status::Failed;
                Err(e)
            }
        }
    }

    /// End the migration as cancelled if it was asked to and the phase
    /// allows it; whether it did.
    fn cancel_now(&mut self) -> bool {
        if !self.phase.cancellable() || !self.backend.cancelled() {
            return false;
        }
        self.backend.on_cancel(self.phase, &mut self.report);
        self.phase = SourcePhase::Cancelled;
        self.report.status = Status::Cancelled;
        true
    }

    /// Step until the migration ends (a cancelled one ends `Ok`, its
    /// report `Cancelled`).
    pub fn run(&mut self) -> Result<(), B::Error> {
        while !self.finished() {
            self.step()?;
        }
        Ok(())
    }

    /// The current phase's work; the policy's decision for a pre-copy round.
    fn carry_out(&mut self) -> Result<Decision, B::Error> {
        let report = &mut self.report;
        match self.phase {
            SourcePhase::Setup => self.backend.setup(report)?,
            SourcePhase::Precopy { round } => {
                if round == 0 {
                    self.precopy.start(self.backend.elapsed());
                }
                let limit = self.precopy.limit();
                let it = self.precopy.iteration_mut();
                let mut r = self.backend.precopy_round(round, limit, it, report)?;
                // The threshold the round's sync was weighed against.
                r.figures.threshold_bytes = self.precopy.iteration_mut().map(|i| i.threshold());
                let elapsed = self.backend.elapsed();
                let mut decision = self.precopy.end_round(r.figures.clone(), elapsed);
                let why = self.precopy.explain(decision, elapsed);
                self.record(&r, false, why);
                // Throttling is for the rounds to come: none when pre-copy ends.
                let step = match decision {
                    Decision::Continue => {
                        let f = &r.figures;
                        self.governor.after_sync(elapsed, f.dirty_pages, f.bytes)
                    }
                    Decision::Stop(_) => None,
                };
                if let (Some(s), Some(row)) = (&step, self.report.rounds.last_mut()) {
                    row.decision = format!("{} Then {}.", row.decision, s.why);
                }
                self.show_last();
                if let Some(s) = step {
                    self.backend.throttle(s.throttle)?;
                    self.report.cpu_throttle_percentage = cpu_pct(s.throttle);
                }
                // A throttle that can still tighten breaks any fixed point.
                if matches!(decision, Decision::Continue) && !self.governor.can_tighten() {
                    if let Some(stop) = self.backend.fast_forward(&self.precopy, &mut self.report) {
                        decision = Decision::Stop(stop);
                    }
                }
                if let Decision::Stop(stop) = decision {
                    self.report.stop_reason = Some(stop.as_str().into());
                    self.report.converged = stop.converged();
                }
                return Ok(decision);
            }
            SourcePhase::Switchover { round } => {
                if let Some(since) = self.governor.since() {
                    report.throttled_ms = ms(self.backend.elapsed().saturating_sub(since));
                }
                let (limit, postcopy) = (self.precopy.final_limit(), self.mode.is_postcopy());
                let last = self.backend.switchover(round, limit, postcopy, report)?;
                if let Some(r) = &last {
                    self.record(r, true, String::new());
                }
                self.backend.hand_over(&mut self.report)?;
                // Shown once the downtime is over: printing is not downtime.
                if last.is_some() {
                    self.show_last();
                }
            }
            SourcePhase::Postcopy { round } => {
                let limit = self.precopy.final_limit();
                let r = self.backend.postcopy(round, limit, report)?;
                self.record(
                    &r,
                    false,
                    "post-copy: pushed while the destination ran".into(),
                );
                self.show_last();
            }
            SourcePhase::Verify => self.backend.verify(report)?,
            SourcePhase::Done | SourcePhase::Failed | SourcePhase::Cancelled => {}
        }
        Ok(Decision::Continue)
    }

    /// Add a round's row to the report.
    fn record(&mut self, r: &Round, stop_and_copy: bool, decision: String) {
        let mut row = r.figures.to_report(r.harvest, stop_and_copy, decision);
        row.postcopy = matches!(self.phase, SourcePhase::Postcopy { .. });
        let secs = r.figures.duration.as_secs_f64();
        // u64 -> f64: a count of writes.
        row.guest_rate_pps = r.guest_ops.filter(|_| secs > 0.0).map(|n| n as f64 / secs);
        row.throttled_ms = ms(r.throttled);
        row.throttle_pct = cpu_pct(self.governor.throttle());
        row.end_ms = ms(self.backend.elapsed());
        let report = &mut self.report;
        // Work a throttled guest did not do, against its target rate (or
        // for `max`, its rate before migration).
        if let (Some(ops), false) = (r.guest_ops, self.governor.throttle() == Throttle::Off) {
            let rate = report.guest_target_rate_pps;
            let due = rate.unwrap_or(report.guest_dirty_rate_pps) * secs;
            // f64 -> u64 saturates: a count of writes.
            let lost = (due as u64).saturating_sub(ops);
            report.guest_work_lost_writes = report.guest_work_lost_writes.saturating_add(lost);
        }
        report.transferred_bytes = report.transferred_bytes.saturating_add(r.figures.bytes);
        report.transferred_pages = report.transferred_pages.saturating_add(r.figures.pages);
        report.rounds.push(row);
    }

    fn show_last(&mut self) {
        if let Some(row) = self.report.rounds.last() {
            self.backend.on_round(row);
        }
    }
}

/// The CPU throttle's percentage (0 for none or a dirty limit).
fn cpu_pct(t: Throttle) -> u32 {
    match t {
        Throttle::Cpu(p) => p,
        _ => 0,
    }
}

// Tests: the machine stepped over an in-memory transport.
#[cfg(test)]
mod tests;
