//! The machine stepped over an in-memory transport: a source of a few
//! small pages that a scripted guest dirties, and a destination that takes
//! each frame through its own phases ([`DestPhase`]), with no process or
//! socket.

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
    /// Fault injection: the destination dies once its guest runs.
    dies_running: bool,
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
    /// Asked to cancel (the test sets it between steps).
    cancel: bool,
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
            cancel: false,
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
                dies_running: false,
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
            ..RoundFigures::default()
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
        _: Option<&mut Iteration>,
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
        if self.dest.dies_running {
            return Err(DestStepError::Unexpected {
                event: "pages",
                phase: "after the destination died",
            });
        }
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
            ..RoundFigures::default()
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

    fn cancelled(&self) -> bool {
        self.cancel
    }
}

fn migration(mode: Mode, policy: Policy, backend: Mem) -> Migration<Mem> {
    throttled(mode, policy, Throttling::Off, backend)
}

fn throttled(mode: Mode, policy: Policy, throttling: Throttling, backend: Mem) -> Migration<Mem> {
    let cfg = PolicyConfig {
        policy,
        bandwidth: Bandwidth::Unlimited,
        page_size: crate::util::page::PageSize::MIN,
        memory_bytes: PAGES as u64 * 4096,
        downtime_limit: Duration::from_millis(300),
        switchover_bandwidth: None,
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

#[test]
fn a_destination_that_dies_in_postcopy_fails_it_and_the_source_stays_paused() {
    for mode in [Mode::Postcopy, Mode::Hybrid { rounds: 1 }] {
        let mut mem = Mem::new(vec![vec![5, 6]], true);
        mem.dest.dies_running = true;
        let mut m = migration(mode, Policy::Xen, mem);
        while !matches!(m.phase(), SourcePhase::Postcopy { .. }) {
            m.step().unwrap();
        }
        assert!(m.backend.dest.running);
        assert!(m.step().is_err());
        assert_eq!(m.phase(), SourcePhase::Failed);
        assert_eq!(m.report.status, Status::Failed);
        // The destination's guest ran ahead of the source's memory:
        // resuming the source would fork the guest.
        assert!(m.backend.paused, "{mode:?}");
        assert!(!m.backend.resumed_after_failure, "{mode:?}");
        // Nothing was verified, and the push is not in the report.
        assert_eq!(m.report.verified_pages, 0);
        assert!(m.report.rounds.iter().all(|r| !r.postcopy));
    }
}

#[test]
fn a_cancel_in_precopy_resumes_the_source_and_keeps_the_rounds() {
    let writes = vec![vec![1, 2], vec![3]];
    let mut m = migration(Mode::Precopy, Policy::Fixed(5), Mem::new(writes, false));
    m.step().unwrap();
    assert_eq!(m.step().unwrap(), SourcePhase::Precopy { round: 1 });
    m.backend.cancel = true;
    assert_eq!(m.step().unwrap(), SourcePhase::Cancelled);
    assert!(m.finished());
    assert_eq!(m.report.status, Status::Cancelled);
    assert_eq!(m.report.rounds.len(), 1, "the round done is kept");
    assert!(m.backend.resumed_after_failure && !m.backend.paused);
    assert!(!m.backend.dest.running);
    // A cancelled migration stays cancelled.
    assert_eq!(m.step().unwrap(), SourcePhase::Cancelled);
}

#[test]
fn a_cancel_in_postcopy_waits_until_the_destination_has_every_page() {
    let mut m = migration(Mode::Postcopy, Policy::Xen, Mem::new(vec![], true));
    m.step().unwrap();
    assert_eq!(m.step().unwrap(), SourcePhase::Postcopy { round: 0 });
    m.backend.cancel = true;
    // The push goes on: the destination runs and lacks pages.
    assert_eq!(m.step().unwrap(), SourcePhase::Verify);
    assert!(m.backend.dest.present.iter().all(|&p| p));
    // Verification is what the cancel skips.
    assert_eq!(m.step().unwrap(), SourcePhase::Cancelled);
    assert_eq!(m.report.status, Status::Cancelled);
    assert_eq!(m.report.verified_pages, 0);
    assert!(m.backend.dest.running && !m.backend.resumed_after_failure);
}
