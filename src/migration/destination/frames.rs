//! The destination's frames on the control connection until the device
//! state arrives, each checked against the phase before anything is
//! written (see [`crate::migration::phases`]). The connection is any
//! [`ControlConn`]: a migration's, or bytes in memory when a recorded
//! session is replayed ([`super::replay`]).

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use super::teleport::Storage;
use super::{unexpected_frame, ReceiveError, Receiving, Streams};
use crate::guest::memory::GuestMemory;
use crate::migration::phases::{DestAction, DestEvent, DestPhase};
use crate::migration::teleport::Claims;
use crate::wire::datapath::{Decoder, Landed};
use crate::wire::protocol::{
    self, Abort, Frame, Limits, Message, ProtocolError, RoundEnd, RoundStart, TeleportDone,
    TeleportMap,
};
use crate::wire::transport::Conn;

/// The control connection as the destination's frame loop reads it.
pub trait ControlConn: Read + Write {
    /// The connection to wait on while data connections carry a round;
    /// `None` for one that never has data connections beside it.
    fn conn(&self) -> Option<&Conn>;
}

impl ControlConn for Conn {
    fn conn(&self) -> Option<&Conn> {
        Some(self)
    }
}

/// What the frames before the device state left: the device state, and
/// for post-copy the pages to fetch and the time spent discarding them.
pub(super) struct Switched {
    pub(super) state: Vec<u8>,
    pub(super) missing: crate::guest::dirty::DirtySet,
    pub(super) discard: Duration,
}

impl Receiving {
    /// What the storage channel did, into the report.
    fn storage_report(&mut self, storage: &Storage) {
        self.report.teleport_refused = storage.refused.clone();
        if let Some(f) = storage.figures {
            self.report.teleported_pages = Some(f.pages);
            self.report.storage_bytes = Some(f.bytes);
            self.report.storage_busy_ms = Some(crate::report::ms(f.busy));
        }
    }

    /// Frames until the device state; `postcopy`: the sender announced a
    /// post-copy migration.
    pub(super) fn until_device_state(
        &mut self,
        sock: &mut impl ControlConn,
        mem: &GuestMemory,
        landed: &Landed,
        limits: &Limits,
        streams: Option<&Streams>,
        postcopy: bool,
    ) -> Result<Switched, ReceiveError> {
        let cfg = self.prepared.storage.clone();
        let claims = cfg.as_ref().map(|_| Claims::new(limits.page_count));
        std::thread::scope(|scope| {
            let mut storage = Storage::new(cfg.as_ref(), claims.as_ref(), mem, landed);
            let r = self.frame_loop(
                scope,
                &mut storage,
                sock,
                mem,
                landed,
                limits,
                streams,
                postcopy,
            );
            // The guest must not run while storage still writes its memory.
            let done = storage.finish();
            self.storage_report(&storage);
            let switched = r?;
            done?;
            Ok(switched)
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn frame_loop<'s, 'e: 's>(
        &mut self,
        scope: &'s std::thread::Scope<'s, '_>,
        storage: &mut Storage<'s, 'e>,
        sock: &mut impl ControlConn,
        mem: &GuestMemory,
        landed: &Landed,
        limits: &Limits,
        streams: Option<&Streams>,
        postcopy: bool,
    ) -> Result<Switched, ReceiveError> {
        // Post-copy: the pages to fetch, announced before the device state.
        let mut missing = crate::guest::dirty::DirtySet::new(limits.page_count);
        let mut discard = Duration::ZERO;
        let page_size = mem.page_size();
        // Post-copy: a page left unallocated would fault with nobody to
        // serve it once post-copy is over, so zero pages are written too.
        let mut decoder = Decoder::new(page_size).populating_zeros(postcopy);
        self.context = "waiting for round 0".into();
        let mut phase = DestPhase::START;
        // This process's CPU time when round 0 started.
        let mut cpu0 = None;
        let state = loop {
            if let (Some(st), Some(s)) = (streams, sock.conn()) {
                st.wait_control(s)?;
            }
            let frame = match self.next(sock, limits) {
                Ok(f) => f,
                // A data connection's failure names the cause better.
                Err(e) => return Err(streams.and_then(Streams::failure).unwrap_or(e)),
            };
            // The storage channel's frames come between the others.
            let frame = match frame {
                Frame::Message(Message::TeleportOffer(o)) => {
                    let ack = storage.offer(&o, limits);
                    protocol::write_message(sock, &ack).map_err(|e| self.err(e))?;
                    continue;
                }
                Frame::Message(Message::TeleportMap(TeleportMap(entries))) => {
                    storage.map(scope, entries)?;
                    continue;
                }
                Frame::Message(Message::TeleportSync(_)) => {
                    self.context = "waiting for storage".into();
                    let done = storage.finish()?.unwrap_or(TeleportDone {
                        pages: 0,
                        skipped: 0,
                        bytes: 0,
                        busy_ns: 0,
                    });
                    let done = Message::TeleportDone(done);
                    protocol::write_message(sock, &done).map_err(|e| self.err(e))?;
                    continue;
                }
                f => f,
            };
            let event = match &frame {
                Frame::Message(Message::RoundStart(RoundStart {
                    round,
                    stop_and_copy,
                })) => DestEvent::RoundStart {
                    round: *round,
                    stop_and_copy: *stop_and_copy,
                },
                Frame::Run(run) => DestEvent::Pages {
                    count: u64::from(run.pages().1),
                },
                Frame::Message(Message::RoundEnd(RoundEnd { round, pages })) => {
                    DestEvent::RoundEnd {
                        round: *round,
                        sent: *pages,
                        arrived: match (phase, streams) {
                            // The data connections' count, once the round is this one.
                            (DestPhase::InRound { round: r, .. }, Some(st)) if r == *round => {
                                Some(st.end_round(r, &mut self.report.stream_pages)?)
                            }
                            _ => None,
                        },
                    }
                }
                Frame::Discard { .. } => DestEvent::Discard,
                Frame::Message(Message::DeviceState(_)) => DestEvent::DeviceState,
                Frame::Message(Message::Abort(Abort(reason))) => {
                    return Err(self.err(ProtocolError::Aborted(reason.clone())))
                }
                _ => return Err(self.err(unexpected_frame(&self.context, frame))),
            };
            let (next, action) =
                phase
                    .step(event, postcopy, streams.is_some())
                    .map_err(|source| ReceiveError::Step {
                        context: self.context.clone(),
                        source,
                    })?;
            phase = next;
            // The phase allowed the frame: carry it out.
            match frame {
                Frame::Message(Message::RoundStart(RoundStart { round, .. })) => {
                    self.context = format!("round {round}");
                    if round == 0 {
                        cpu0 = Some(crate::guest::process::own_cpu_time());
                    }
                }
                Frame::Message(Message::RoundEnd(_)) => {
                    if let DestAction::Ack { pages, .. } | DestAction::Stopped { pages } = action {
                        self.report.round_pages.push(pages);
                        self.report.pages_received += pages;
                    }
                    if let DestAction::Ack { round, .. } = action {
                        let ack = Message::round_ack(round);
                        protocol::write_message(sock, &ack).map_err(|e| self.err(e))?;
                        if let (0, Some(c)) = (round, cpu0) {
                            let cpu = crate::guest::process::own_cpu_time().saturating_sub(c);
                            self.report.round0_cpu_ms = Some(crate::report::ms(cpu));
                        }
                    }
                }
                Frame::Discard { first_page, count } => {
                    self.context = "post-copy switch".into();
                    // Stale or never sent: drop what is there, so the guest
                    // faults and the page is fetched.
                    let t = Instant::now();
                    mem.discard(first_page, u64::from(count))?;
                    discard += t.elapsed();
                    missing.set_range(first_page, u64::from(count));
                }
                Frame::Message(Message::DeviceState(protocol::DeviceState(blob))) => {
                    // No data connection may write memory once the guest runs.
                    if let Some(st) = streams {
                        st.close()?;
                    }
                    break blob;
                }
                Frame::Run(run) => {
                    let (first, count) = run.pages();
                    storage.network_writes(first, count);
                    // SAFETY: the waiting destination guest maps this memory
                    // but touches none of it until it is handed its device
                    // state, after the last page; with one stream nothing
                    // else writes it.
                    unsafe { decoder.receive(sock, &run, mem, landed) }.map_err(|e| self.err(e))?;
                }
                // Refused above, before the phase step.
                f => return Err(self.err(unexpected_frame(&self.context, f))),
            }
        };
        Ok(Switched {
            state,
            missing,
            discard,
        })
    }
}
