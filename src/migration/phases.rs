//! The phases of a migration, one enum per side, and the pure functions
//! that choose the next phase. Nothing here does I/O: the source's driver
//! ([`crate::migration::machine`]) and the destination
//! ([`crate::migration::destination`]) act on the phases, and tests step
//! them alone.
//!
//! Source, for each mode (`--mode`):
//!
//! ```text
//!  precopy:  Setup → Precopy{0} → … → Precopy{n} → Switchover → Verify → Done
//!  hybrid:   Setup → Precopy{0} → … → Precopy{n} → Switchover → Postcopy → Verify → Done
//!  postcopy: Setup → Switchover → Postcopy → Verify → Done
//!  cold:     Setup → Switchover → Verify → Done
//! ```
//!
//! The policy ([`crate::migration::policy::Precopy`]) decides when the
//! pre-copy rounds end; any phase may end in `Failed`, and any but
//! `Postcopy` in `Cancelled` (see [`SourcePhase::cancellable`]).
//!
//! Destination, frame by frame: `Between` rounds, `InRound` while a round's
//! pages arrive, `Switching` while a post-copy source lists the pages to
//! fetch, then `Resume` once the device state is in.

use crate::migration::policy::Decision;

/// How a migration moves memory (`--mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Iterate, then stop and copy what is left.
    Precopy,
    /// Resume at the destination at once; fetch pages on demand while the
    /// source pushes the rest.
    Postcopy,
    /// `rounds` pre-copy rounds, then post-copy for what they left dirty.
    Hybrid { rounds: u32 },
    /// Suspend, copy everything, resume (the stop-and-copy baseline).
    Cold,
}

/// A mode that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModeError {
    #[error("unknown mode (precopy, postcopy, hybrid[:rounds=N], cold)")]
    Unknown,
    #[error(
        "rounds must be a whole number from 1 to 1000 (precopy, postcopy, hybrid[:rounds=N], cold)"
    )]
    Rounds,
}

impl std::str::FromStr for Mode {
    type Err = ModeError;

    /// `precopy` | `postcopy` | `hybrid[:rounds=N]` | `cold`.
    fn from_str(s: &str) -> Result<Mode, ModeError> {
        Ok(match s.trim() {
            "precopy" => Mode::Precopy,
            "postcopy" => Mode::Postcopy,
            "cold" => Mode::Cold,
            "hybrid" => Mode::Hybrid { rounds: 2 },
            other => {
                let n = other
                    .strip_prefix("hybrid:rounds=")
                    .ok_or(ModeError::Unknown)?;
                match n.parse::<u32>() {
                    Ok(rounds @ 1..=1000) => Mode::Hybrid { rounds },
                    _ => return Err(ModeError::Rounds),
                }
            }
        })
    }
}

/// The form `Mode::from_str` reads back (`hybrid:rounds=N` in full).
impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mode::Hybrid { rounds } => write!(f, "hybrid:rounds={rounds}"),
            m => f.write_str(m.as_str()),
        }
    }
}

impl Mode {
    /// The report's `mode`.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Precopy => "precopy",
            Mode::Postcopy => "postcopy",
            Mode::Hybrid { .. } => "hybrid",
            Mode::Cold => "cold",
        }
    }

    /// Whether pre-copy rounds run before the switch-over.
    pub fn iterates(self) -> bool {
        matches!(self, Mode::Precopy | Mode::Hybrid { .. })
    }

    /// Whether the guest resumes before all of its memory has arrived.
    pub fn is_postcopy(self) -> bool {
        matches!(self, Mode::Postcopy | Mode::Hybrid { .. })
    }
}

/// Where the source side of a migration is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourcePhase {
    /// Connect, handshake, open the data connections.
    Setup,
    /// Pre-copy round `round` with the guest running: round 0 sends every
    /// page, round k the pages dirtied during round k-1.
    Precopy {
        round: u32,
    },
    /// The guest is paused (the downtime starts): the last dirty pages, or
    /// for post-copy the list of pages the destination lacks, then the
    /// device state. Ends when the destination runs. `round` numbers the
    /// stop-and-copy round (or the post-copy push) in the report.
    Switchover {
        round: u32,
    },
    /// The guest runs at the destination; the pages it lacks are pushed,
    /// and served first when it faults on them.
    Postcopy {
        round: u32,
    },
    /// The paused source's page digests against what arrived.
    Verify,
    Done,
    Failed,
    /// Cancelled (SIGINT, SIGTERM): the source guest resumed, or, once the
    /// destination ran, left to the destination.
    Cancelled,
}

impl SourcePhase {
    /// The phase after this one in `mode`. `decision` is the policy's after a
    /// pre-copy round; other phases ignore it.
    pub fn next(self, mode: Mode, decision: Decision) -> SourcePhase {
        use SourcePhase::*;
        match self {
            Setup if mode.iterates() => Precopy { round: 0 },
            Setup => Switchover { round: 0 },
            Precopy { round } => match decision {
                Decision::Continue => Precopy { round: round + 1 },
                Decision::Stop(_) => Switchover { round: round + 1 },
            },
            Switchover { round } if mode.is_postcopy() => Postcopy { round },
            Switchover { .. } | Postcopy { .. } => Verify,
            Verify => Done,
            Done => Done,
            Failed => Failed,
            Cancelled => Cancelled,
        }
    }

    /// Whether a cancel may end the migration in this phase. Not during
    /// post-copy: the destination runs the guest and needs every page it
    /// lacks from here, so the push goes on and the cancel takes effect
    /// once it is over (QEMU, too, refuses to cancel a post-copy).
    pub fn cancellable(self) -> bool {
        use SourcePhase::*;
        matches!(self, Setup | Precopy { .. } | Switchover { .. } | Verify)
    }

    /// Whether the guest runs at the destination from this phase on: the
    /// source must never resume after this.
    pub fn destination_runs(self) -> bool {
        matches!(
            self,
            SourcePhase::Postcopy { .. } | SourcePhase::Verify | SourcePhase::Done
        )
    }
}

/// Where the destination side of a migration is, between frames of the
/// control connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DestPhase {
    /// Between rounds: round `next` may start unless the stop-and-copy
    /// round has ended (`stopped`), after which only the device state may
    /// come.
    Between { next: u32, stopped: bool },
    /// Inside round `round`; `pages` landed so far from the control
    /// connection.
    InRound {
        round: u32,
        stop_and_copy: bool,
        pages: u64,
    },
    /// Post-copy: the source lists the pages to fetch before the device
    /// state.
    Switching,
    /// The device state is in: start the guest.
    Resume,
}

/// What arrived on the control connection, as the destination's phases see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DestEvent {
    RoundStart {
        round: u32,
        stop_and_copy: bool,
    },
    /// A run of `count` pages landed from the control connection.
    Pages {
        count: u64,
    },
    /// The sender ended `round` having sent `sent` pages; `arrived`: what
    /// the data connections delivered (None: count the control
    /// connection's pages).
    RoundEnd {
        round: u32,
        sent: u64,
        arrived: Option<u64>,
    },
    /// Post-copy: pages to fetch on demand.
    Discard,
    DeviceState,
}

/// What the destination does after an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DestAction {
    Nothing,
    /// A pre-copy round of `pages` pages is complete: acknowledge it.
    Ack {
        round: u32,
        pages: u64,
    },
    /// The stop-and-copy round of `pages` pages is complete (no ack: the
    /// device state follows).
    Stopped {
        pages: u64,
    },
    /// Drop the listed pages so the guest faults on them.
    Discard,
    /// Start the guest.
    Resume,
}

/// Why an event is not allowed in a phase.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DestStepError {
    #[error("unexpected {event} {phase}")]
    Unexpected {
        event: &'static str,
        phase: &'static str,
    },
    #[error("round {round}: the sender says it sent {sent} pages, {arrived} arrived")]
    PageCount { round: u32, sent: u64, arrived: u64 },
}

impl DestEvent {
    fn name(&self) -> &'static str {
        match self {
            DestEvent::RoundStart { .. } => "round start",
            DestEvent::Pages { .. } => "pages",
            DestEvent::RoundEnd { .. } => "round end",
            DestEvent::Discard => "discard",
            DestEvent::DeviceState => "device state",
        }
    }
}

impl DestPhase {
    /// The phase of a destination that has just accepted a migration.
    pub const START: DestPhase = DestPhase::Between {
        next: 0,
        stopped: false,
    };

    fn describe(&self) -> &'static str {
        match self {
            DestPhase::Between { stopped: false, .. } => "between rounds",
            DestPhase::Between { stopped: true, .. } => "after the stop-and-copy round",
            DestPhase::InRound { .. } => "inside a round",
            DestPhase::Switching => "while switching over to post-copy",
            DestPhase::Resume => "after the device state",
        }
    }

    /// The next phase after `event`, and what to do. `postcopy`: the
    /// sender announced a post-copy migration; `streams`: pages come on
    /// data connections, never on the control one.
    pub fn step(
        self,
        event: DestEvent,
        postcopy: bool,
        streams: bool,
    ) -> Result<(DestPhase, DestAction), DestStepError> {
        use DestAction as A;
        use DestPhase::*;
        let unexpected = || DestStepError::Unexpected {
            event: event.name(),
            phase: self.describe(),
        };
        Ok(match (self, event) {
            (
                Between {
                    next,
                    stopped: false,
                },
                DestEvent::RoundStart {
                    round,
                    stop_and_copy,
                },
            ) if round == next => (
                InRound {
                    round,
                    stop_and_copy,
                    pages: 0,
                },
                A::Nothing,
            ),
            (
                InRound {
                    round,
                    stop_and_copy,
                    pages,
                },
                DestEvent::Pages { count },
            ) if !streams => (
                InRound {
                    round,
                    stop_and_copy,
                    pages: pages + count,
                },
                A::Nothing,
            ),
            (
                InRound {
                    round,
                    stop_and_copy,
                    pages,
                },
                DestEvent::RoundEnd {
                    round: r,
                    sent,
                    arrived,
                },
            ) if r == round => {
                let arrived = arrived.unwrap_or(pages);
                if arrived != sent {
                    return Err(DestStepError::PageCount {
                        round,
                        sent,
                        arrived,
                    });
                }
                let next = Between {
                    next: round + 1,
                    stopped: stop_and_copy,
                };
                match stop_and_copy {
                    true => (next, A::Stopped { pages: arrived }),
                    false => (
                        next,
                        A::Ack {
                            round,
                            pages: arrived,
                        },
                    ),
                }
            }
            (Between { .. } | Switching, DestEvent::Discard) if postcopy => (Switching, A::Discard),
            (Between { stopped: true, .. } | Switching, DestEvent::DeviceState) => {
                (Resume, A::Resume)
            }
            (Between { .. }, DestEvent::DeviceState) if postcopy => (Resume, A::Resume),
            _ => return Err(unexpected()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::policy::StopReason;

    const GO: Decision = Decision::Continue;
    const STOP: Decision = Decision::Stop(StopReason::FewDirtyPages);

    /// The phases a source goes through in `mode` when the policy stops
    /// after `rounds` rounds.
    fn path(mode: Mode, rounds: u32) -> Vec<SourcePhase> {
        let mut p = SourcePhase::Setup;
        let mut out = vec![p];
        while p != SourcePhase::Done {
            let d = match p {
                SourcePhase::Precopy { round } if round + 1 < rounds => GO,
                _ => STOP,
            };
            p = p.next(mode, d);
            out.push(p);
        }
        out
    }

    #[test]
    fn modes_read_back_and_bad_ones_are_refused() {
        for m in [
            Mode::Precopy,
            Mode::Postcopy,
            Mode::Cold,
            Mode::Hybrid { rounds: 7 },
        ] {
            assert_eq!(m.to_string().parse(), Ok(m));
        }
        assert_eq!("hybrid".parse(), Ok(Mode::Hybrid { rounds: 2 }));
        assert_eq!("warp".parse::<Mode>(), Err(ModeError::Unknown));
        assert_eq!("hybrid:rounds=0".parse::<Mode>(), Err(ModeError::Rounds));
        assert_eq!("hybrid:rounds=x".parse::<Mode>(), Err(ModeError::Rounds));
    }

    #[test]
    fn each_mode_is_a_path_through_the_same_phases() {
        use SourcePhase::*;
        assert_eq!(
            path(Mode::Precopy, 3),
            [
                Setup,
                Precopy { round: 0 },
                Precopy { round: 1 },
                Precopy { round: 2 },
                Switchover { round: 3 },
                Verify,
                Done
            ]
        );
        assert_eq!(
            path(Mode::Hybrid { rounds: 1 }, 1),
            [
                Setup,
                Precopy { round: 0 },
                Switchover { round: 1 },
                Postcopy { round: 1 },
                Verify,
                Done
            ]
        );
        assert_eq!(
            path(Mode::Postcopy, 0),
            [
                Setup,
                Switchover { round: 0 },
                Postcopy { round: 0 },
                Verify,
                Done
            ]
        );
        assert_eq!(
            path(Mode::Cold, 0),
            [Setup, Switchover { round: 0 }, Verify, Done]
        );
        assert_eq!(
            SourcePhase::Failed.next(Mode::Precopy, GO),
            SourcePhase::Failed
        );
        assert!(!Switchover { round: 0 }.destination_runs());
        assert!(Postcopy { round: 0 }.destination_runs());
    }

    fn run(
        events: &[DestEvent],
        postcopy: bool,
        streams: bool,
    ) -> Result<Vec<DestAction>, DestStepError> {
        let mut p = DestPhase::START;
        let mut actions = Vec::new();
        for &e in events {
            let (next, a) = p.step(e, postcopy, streams)?;
            p = next;
            actions.push(a);
        }
        Ok(actions)
    }

    fn start(round: u32, stop_and_copy: bool) -> DestEvent {
        DestEvent::RoundStart {
            round,
            stop_and_copy,
        }
    }

    fn end(round: u32, sent: u64, arrived: Option<u64>) -> DestEvent {
        DestEvent::RoundEnd {
            round,
            sent,
            arrived,
        }
    }

    #[test]
    fn a_precopy_destination_acks_rounds_then_resumes() {
        use DestAction as A;
        let pages = DestEvent::Pages { count: 4 };
        let got = run(
            &[
                start(0, false),
                pages,
                pages,
                end(0, 8, None),
                start(1, false),
                pages,
                end(1, 4, None),
                start(2, true),
                end(2, 0, None),
                DestEvent::DeviceState,
            ],
            false,
            false,
        );
        assert_eq!(
            got.unwrap(),
            [
                A::Nothing,
                A::Nothing,
                A::Nothing,
                A::Ack { round: 0, pages: 8 },
                A::Nothing,
                A::Nothing,
                A::Ack { round: 1, pages: 4 },
                A::Nothing,
                A::Stopped { pages: 0 },
                A::Resume
            ]
        );
    }

    #[test]
    fn a_postcopy_destination_takes_discards_then_resumes() {
        let got = run(
            &[
                start(0, false),
                end(0, 10, Some(10)),
                DestEvent::Discard,
                DestEvent::Discard,
                DestEvent::DeviceState,
            ],
            true,
            true,
        );
        assert_eq!(got.unwrap().last(), Some(&DestAction::Resume));
        // A post-copy destination may resume before any round.
        assert!(run(&[DestEvent::DeviceState], true, false).is_ok());
    }

    #[test]
    fn out_of_order_frames_are_refused_naming_the_phase() {
        let e =
            |events: &[DestEvent], postcopy| run(events, postcopy, false).unwrap_err().to_string();
        assert_eq!(
            e(&[start(1, false)], false),
            "unexpected round start between rounds"
        );
        assert_eq!(
            e(&[DestEvent::Pages { count: 1 }], false),
            "unexpected pages between rounds"
        );
        assert_eq!(
            e(&[start(0, false), end(1, 0, None)], false),
            "unexpected round end inside a round"
        );
        assert_eq!(
            e(&[start(0, false), DestEvent::DeviceState], false),
            "unexpected device state inside a round"
        );
        // Pre-copy: no device state before the stop-and-copy round.
        assert_eq!(
            e(
                &[start(0, false), end(0, 0, None), DestEvent::DeviceState],
                false
            ),
            "unexpected device state between rounds"
        );
        assert_eq!(
            e(&[DestEvent::Discard], false),
            "unexpected discard between rounds"
        );
        assert_eq!(
            e(&[start(0, true), end(0, 0, None), start(1, false)], false),
            "unexpected round start after the stop-and-copy round"
        );
        // After a post-copy discard, no round may start.
        assert_eq!(
            e(&[DestEvent::Discard, start(0, false)], true),
            "unexpected round start while switching over to post-copy"
        );
        // Pages on the control connection when data connections carry them.
        assert!(run(
            &[start(0, false), DestEvent::Pages { count: 1 }],
            false,
            true
        )
        .is_err());
    }

    #[test]
    fn a_round_whose_count_does_not_match_is_refused() {
        let err = run(
            &[
                start(0, false),
                DestEvent::Pages { count: 3 },
                end(0, 4, None),
            ],
            false,
            false,
        );
        assert_eq!(
            err.unwrap_err(),
            DestStepError::PageCount {
                round: 0,
                sent: 4,
                arrived: 3
            }
        );
        let err = run(&[start(0, false), end(0, 4, Some(5))], false, true);
        assert!(matches!(
            err,
            Err(DestStepError::PageCount { arrived: 5, .. })
        ));
    }
}
