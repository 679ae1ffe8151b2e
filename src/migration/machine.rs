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

use std::time::Duration;

use crate::guest::control::Throttle;
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
    fn precopy_round(
        &mut self,
        round: u32,
        limit: Option<u64>,
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

    /// Whether the migration has ended, completed or failed.
    pub fn finished(&self) -> bool {
        matches!(self.phase, SourcePhase::Done | SourcePhase::Failed)
    }

    /// Carry out the current phase and move to the next. On an error the
    /// backend puts things back ([`Backend::on_failure`]) and the migration
    /// is `Failed`.
    pub fn step(&mut self) -> Result<SourcePhase, B::Error> {
        match self.carry_out() {
            Ok(decision) => {
                self.phase = self.phase.next(self.mode, decision);
                if self.phase == SourcePhase::Done {
                    self.report.status = Status::Completed;
                }
                Ok(self.phase)
            }
            Err(e) => {
                self.backend.on_failure(self.phase, &mut self.report);
                self.phase = SourcePhase::Failed;
                self.report.status = Status::Failed;
                Err(e)
            }
        }
    }

    /// Step until the migration ends.
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
                let r = self
                    .backend
                    .precopy_round(round, self.precopy.limit(), report)?;
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
            SourcePhase::Done | SourcePhase::Failed => {}
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

/// The machine stepped over an in-memory transport: a source of a few
/// small pages that a scripted guest dirties, and a destination that takes
/// each frame through its own phases ([`DestPhase`]), with no process or
/// socket.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::phases::{DestAction, DestEvent, DestPhase, DestStepError};
    use crate::migration::policy::Policy;
    use crate::migration::throttle::Throttling;
    use crate::wire::ratelimit::Bandwidth;

    const PAGES: usize = 32;

    /// The destination: its memory, which pages it has, and its phase.
    struct Dest {
        mem: Vec<u8>,
        present: Vec<bool>,
        phase: DestPhase,
        postcopy: bool,
        running: bool,
        /// Fault injection: a page that is lost on the way.
        drop_page: Option<usize>,
    }

    impl Dest {
        fn on(&mut self, e: DestEvent) -> Result<DestAction, DestStepError> {
            let (next, action) = self.phase.step(e, self.postcopy, false)?;
            self.phase = next;
            Ok(action)
        }
    }

    /// The source: its memory, its dirty pages, and a guest that writes
    /// pages `writes[k]` during round k.
    struct Mem {
        mem: Vec<u8>,
        dirty: Vec<bool>,
        writes: Vec<Vec<usize>>,
        paused: bool,
        resumed_after_failure: bool,
        clock: Duration,
        /// How long each round takes on the clock.
        round_time: Duration,
        /// The throttles the machine set, in order.
        throttles: Vec<Throttle>,
        dest: Dest,
    }

    impl Mem {
        fn new(writes: Vec<Vec<usize>>, postcopy: bool) -> Self {
            Mem {
                mem: (0..PAGES).map(|p| p as u8).collect(),
                dirty: vec![true; PAGES],
                writes,
                paused: false,
                resumed_after_failure: false,
                clock: Duration::ZERO,
                round_time: Duration::from_millis(1),
                throttles: Vec::new(),
                dest: Dest {
                    mem: vec![0; PAGES],
                    present: vec![!postcopy; PAGES],
                    phase: DestPhase::START,
                    postcopy,
                    running: false,
                    drop_page: None,
                },
            }
        }

        /// Send the dirty pages as round `round`; the guest writes its
        /// pages for the round meanwhile unless paused.
        fn send(&mut self, round: u32, stop_and_copy: bool) -> Result<RoundFigures, DestStepError> {
            let todo: Vec<usize> = (0..PAGES).filter(|&p| self.dirty[p]).collect();
            self.dirty = vec![false; PAGES];
            let d = &mut self.dest;
            d.on(DestEvent::RoundStart {
                round,
                stop_and_copy,
            })?;
            for &p in &todo {
                if d.drop_page != Some(p) {
                    d.mem[p] = self.mem[p];
                    d.present[p] = true;
                    d.on(DestEvent::Pages { count: 1 })?;
                }
            }
            let sent = todo.len() as u64;
            let action = d.on(DestEvent::RoundEnd {
                round,
                sent,
                arrived: None,
            })?;
            assert!(matches!(
                action,
                DestAction::Ack { .. } | DestAction::Stopped { .. }
            ));
            if !self.paused {
                for &p in self.writes.get(round as usize).map_or(&[][..], |w| w) {
                    self.mem[p] = self.mem[p].wrapping_add(1);
                    self.dirty[p] = true;
                }
            }
            self.clock += self.round_time;
            Ok(RoundFigures {
                round,
                pages: sent,
                bytes: sent * 4096,
                duration: self.round_time,
                dirty_pages: self.dirty.iter().filter(|&&d| d).count() as u64,
                rate_limit: None,
            })
        }
    }

    impl Backend for Mem {
        type Error = DestStepError;

        fn elapsed(&self) -> Duration {
            self.clock
        }

        fn setup(&mut self, _: &mut Report) -> Result<(), DestStepError> {
            Ok(())
        }

        fn precopy_round(
            &mut self,
            round: u32,
            _: Option<u64>,
            _: &mut Report,
        ) -> Result<Round, DestStepError> {
            let figures = self.send(round, false)?;
            Ok(Round::new(figures, Duration::ZERO))
        }

        fn switchover(
            &mut self,
            round: u32,
            _: Option<u64>,
            postcopy: bool,
            _: &mut Report,
        ) -> Result<Option<Round>, DestStepError> {
            self.paused = true;
            if postcopy {
                for p in (0..PAGES).filter(|&p| self.dirty[p]) {
                    self.dest.on(DestEvent::Discard)?;
                    self.dest.present[p] = false;
                }
                return Ok(None);
            }
            let figures = self.send(round, true)?;
            Ok(Some(Round::new(figures, Duration::ZERO)))
        }

        fn hand_over(&mut self, _: &mut Report) -> Result<(), DestStepError> {
            let action = self.dest.on(DestEvent::DeviceState)?;
            self.dest.running = action == DestAction::Resume;
            Ok(())
        }

        fn postcopy(
            &mut self,
            round: u32,
            _: Option<u64>,
            _: &mut Report,
        ) -> Result<Round, DestStepError> {
            assert!(
                self.dest.running,
                "post-copy pushes to a running destination"
            );
            let missing: Vec<usize> = (0..PAGES).filter(|&p| !self.dest.present[p]).collect();
            for &p in &missing {
                self.dest.mem[p] = self.mem[p];
                self.dest.present[p] = true;
            }
            let pages = missing.len() as u64;
            let figures = RoundFigures {
                round,
                pages,
                bytes: pages * 4096,
                duration: Duration::from_millis(1),
                dirty_pages: 0,
                rate_limit: None,
            };
            Ok(Round::new(figures, Duration::ZERO))
        }

        fn verify(&mut self, report: &mut Report) -> Result<(), DestStepError> {
            let d = &self.dest;
            let same = (0..PAGES)
                .filter(|&p| d.present[p] && d.mem[p] == self.mem[p])
                .count();
            report.verified_pages = same as u64;
            report.mismatched_pages = (PAGES - same) as u64;
            Ok(())
        }

        fn throttle(&mut self, t: Throttle) -> Result<(), DestStepError> {
            self.throttles.push(t);
            Ok(())
        }

        fn on_failure(&mut self, phase: SourcePhase, _: &mut Report) {
            if !phase.destination_runs() {
                self.paused = false;
                self.resumed_after_failure = true;
            }
        }
    }

    fn migration(mode: Mode, policy: Policy, backend: Mem) -> Migration<Mem> {
        throttled(mode, policy, Throttling::Off, backend)
    }

    fn throttled(
        mode: Mode,
        policy: Policy,
        throttling: Throttling,
        backend: Mem,
    ) -> Migration<Mem> {
        let cfg = PolicyConfig {
            policy,
            bandwidth: Bandwidth::Unlimited,
            page_size: crate::util::page::PageSize::MIN,
            memory_bytes: PAGES as u64 * 4096,
            downtime_limit: Duration::from_millis(300),
            max_time: Duration::from_secs(60),
            throttling,
        };
        Migration::new(backend, mode, cfg, Report::default())
    }

    /// Step to the end, listing the phases.
    fn phases(m: &mut Migration<Mem>) -> Vec<SourcePhase> {
        let mut seen = vec![m.phase()];
        while !m.finished() {
            let _ = m.step();
            seen.push(m.phase());
        }
        seen
    }

    #[test]
    fn precopy_sends_shrinking_rounds_then_stops_and_copies() {
        // The guest writes 4 pages in round 0, then 2, then the same 2.
        let writes = vec![vec![1, 2, 3, 4], vec![3, 4], vec![3, 4]];
        let mut m = migration(Mode::Precopy, Policy::Fixed(3), Mem::new(writes, false));
        let seen = phases(&mut m);
        assert_eq!(seen.len(), 7, "{seen:?}");
        assert_eq!(seen[4], SourcePhase::Switchover { round: 3 });
        let r = &m.report;
        assert_eq!(r.status, Status::Completed);
        let pages: Vec<u64> = r.rounds.iter().map(|r| r.pages).collect();
        assert_eq!(pages, [32, 4, 2, 2]);
        assert!(r.rounds[3].stop_and_copy);
        assert_eq!(r.transferred_pages, 40);
        assert_eq!(r.stop_reason.as_deref(), Some("fixed_rounds"));
        assert_eq!((r.verified_pages, r.mismatched_pages), (32, 0));
        assert!(m.backend.dest.running);
    }

    #[test]
    fn postcopy_resumes_first_then_pushes_what_is_missing() {
        let mut m = migration(Mode::Postcopy, Policy::Xen, Mem::new(vec![], true));
        let seen = phases(&mut m);
        use SourcePhase::*;
        assert_eq!(
            seen,
            [
                Setup,
                Switchover { round: 0 },
                Postcopy { round: 0 },
                Verify,
                Done
            ]
        );
        let r = &m.report;
        assert_eq!(r.status, Status::Completed);
        // No round before the switch-over; one push of every page after it.
        assert_eq!(r.rounds.len(), 1);
        assert!(r.rounds[0].postcopy && !r.rounds[0].stop_and_copy);
        assert_eq!(r.rounds[0].pages, 32);
        assert_eq!((r.verified_pages, r.mismatched_pages), (32, 0));

        // Hybrid: its pre-copy rounds, then post-copy for the rest.
        let writes = vec![vec![5, 6]];
        let mut m = migration(
            Mode::Hybrid { rounds: 1 },
            Policy::Xen,
            Mem::new(writes, true),
        );
        phases(&mut m);
        let pages: Vec<u64> = m.report.rounds.iter().map(|r| r.pages).collect();
        assert_eq!(pages, [32, 2]);
        assert_eq!(m.report.mismatched_pages, 0);
    }

    /// 0.6 s rounds that each leave 20 of 32 pages dirty: every period of
    /// two rounds is above the trigger, so every second period (rounds 3
    /// and 7) steps the throttle, which the rows and the report show.
    #[test]
    fn auto_converge_throttles_the_guest_through_the_backend() {
        let writes = vec![(0..20).collect::<Vec<_>>(); 12];
        let mut mem = Mem::new(writes, false);
        mem.round_time = Duration::from_millis(600);
        let ac = Throttling::AutoConverge(Default::default());
        let mut m = throttled(Mode::Precopy, Policy::Fixed(12), ac, mem);
        m.run().unwrap();
        assert_eq!(m.backend.throttles, [Throttle::Cpu(20), Throttle::Cpu(30)]);
        let r = &m.report;
        let pct: Vec<u32> = r.rounds.iter().map(|r| r.throttle_pct).collect();
        assert_eq!(pct, [0, 0, 0, 0, 20, 20, 20, 20, 30, 30, 30, 30, 30]);
        assert!(
            r.rounds[3].decision.contains("Then throttle"),
            "{}",
            r.rounds[3].decision
        );
        assert!(!r.rounds[4].decision.contains("throttle"));
        assert_eq!(r.cpu_throttle_percentage, 30);
        // From the first step (2.4 s) to the pause (7.2 s).
        assert!((r.throttled_ms - 4800.0).abs() < 1e-6, "{}", r.throttled_ms);
        assert_eq!((r.verified_pages, r.mismatched_pages), (32, 0));
    }

    #[test]
    fn a_lost_page_fails_the_round_and_resumes_the_source() {
        let mut mem = Mem::new(vec![vec![1]], false);
        mem.dest.drop_page = Some(7);
        let mut m = migration(Mode::Precopy, Policy::Fixed(2), mem);
        assert_eq!(m.step().unwrap(), SourcePhase::Precopy { round: 0 });
        let err = m.step().unwrap_err();
        assert_eq!(
            err,
            DestStepError::PageCount {
                round: 0,
                sent: 32,
                arrived: 31
            }
        );
        assert_eq!(m.phase(), SourcePhase::Failed);
        assert!(m.finished());
        assert_eq!(m.report.status, Status::Failed);
        assert!(
            m.backend.resumed_after_failure,
            "pre-copy never loses the source"
        );
        assert!(!m.backend.paused);
        // A failed migration stays failed.
        assert_eq!(m.step().unwrap(), SourcePhase::Failed);
    }
}
