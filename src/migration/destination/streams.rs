//! The destination's data connections (`--streams N`): accepting them for
//! one session, a thread per connection that decodes its page runs into
//! place, and the control thread's view of their rounds.

use std::net::{Shutdown, TcpListener};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use super::{setup, unexpected_frame, ReceiveError, Receiving};
use crate::guest::memory::GuestMemory;
use crate::migration::phases::DestStepError;
use crate::util::netio::IO_TIMEOUT;
use crate::wire::datapath::{Decoder, Landed};
use crate::wire::protocol::InContext;
use crate::wire::protocol::{
    self, Abort, Frame, Limits, Message, ProtocolError, RoundEnd, StreamHello,
};
use crate::wire::transport::{Conn, TransportError};

/// How long the sender has to open its data connections.
pub(super) const STREAMS_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the data connections' threads have to end once closed.
pub(super) const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// What a data connection's thread tells the control thread: it ended its
/// share of a round (round, pages), or it failed.
type StreamReport = Result<(usize, u32, u64), ReceiveError>;

/// The data connections of a multi-stream migration.
pub(super) struct Streams {
    pub(super) socks: Vec<Conn>,
    pub(super) reports: Receiver<StreamReport>,
    pub(super) tx: Sender<StreamReport>,
    /// Their threads still running.
    pub(super) live: std::sync::atomic::AtomicUsize,
    /// When a data connection last delivered a frame (ms since `born`).
    pub(super) progress: std::sync::atomic::AtomicU64,
    pub(super) born: Instant,
}

impl Streams {
    /// A data connection delivered a frame.
    pub(super) fn progressed(&self) {
        let now = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.progress
            .store(now, std::sync::atomic::Ordering::Relaxed);
    }

    /// Wait until the control connection has a frame to read. During a
    /// round it is silent while the data connections carry the pages, so
    /// it only times out when they have been silent too.
    pub(super) fn wait_control(&self, sock: &Conn) -> Result<(), ReceiveError> {
        loop {
            match sock.wait_readable(Duration::from_secs(1)) {
                Ok(false) => {}
                Ok(true) => return Ok(()),
                Err(e) => {
                    return Err(ReceiveError::Protocol(InContext {
                        context: "waiting on the control connection".into(),
                        source: ProtocolError::Io(e),
                    }))
                }
            }
            let last = self.progress.load(std::sync::atomic::Ordering::Relaxed);
            let idle = self
                .born
                .elapsed()
                .saturating_sub(Duration::from_millis(last));
            if idle > IO_TIMEOUT {
                return Err(ReceiveError::Timeout {
                    context: "the control and data connections".into(),
                });
            }
        }
    }

    /// Wait until every data connection has ended `round`, each once; the
    /// pages they carried, also added to `per_stream`.
    pub(super) fn end_round(
        &self,
        round: u32,
        per_stream: &mut Vec<u64>,
    ) -> Result<u64, ReceiveError> {
        per_stream.resize(per_stream.len().max(self.socks.len()), 0);
        let (mut total, mut ended) = (0, vec![false; self.socks.len()]);
        while ended.iter().any(|e| !e) {
            match self.reports.recv_timeout(IO_TIMEOUT) {
                Ok(Ok((i, r, pages))) if r == round && !ended[i] => {
                    ended[i] = true;
                    total += pages;
                    per_stream[i] += pages;
                }
                Ok(Ok((i, r, _))) => {
                    return Err(ReceiveError::StreamRound {
                        index: i,
                        got: r,
                        ending: round,
                    })
                }
                // Closed after ending this round: the sender's last round.
                Ok(Err(ReceiveError::StreamClosed { index, .. })) if ended[index] => {}
                Ok(Err(ReceiveError::StreamClosed { index, .. })) => {
                    return Err(ReceiveError::StreamClosed {
                        index,
                        round: Some(round),
                    })
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    return Err(ReceiveError::Timeout {
                        context: format!("the data connections of round {round}"),
                    })
                }
            }
        }
        Ok(total)
    }

    /// A data connection's failure, if one was reported.
    pub(super) fn failure(&self) -> Option<ReceiveError> {
        // A data connection closing is the sender's normal end too.
        self.reports.try_iter().find_map(|r| {
            r.err()
                .filter(|e| !matches!(e, ReceiveError::StreamClosed { .. }))
        })
    }

    /// Close the data connections and wait until their threads are done,
    /// so none writes guest memory once the guest may run.
    pub(super) fn close(&self) -> Result<(), ReceiveError> {
        for s in &self.socks {
            let _ = s.shutdown(Shutdown::Both);
        }
        let deadline = Instant::now() + CLOSE_TIMEOUT;
        while self.live.load(std::sync::atomic::Ordering::Acquire) > 0 {
            if Instant::now() > deadline {
                return Err(ReceiveError::CloseTimeout);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }
}

impl Receiving {
    /// Accept the `n` data connections of session `session`, and its
    /// post-copy request connection if `request`.
    pub(super) fn accept_streams(
        &mut self,
        listener: &TcpListener,
        n: u32,
        request: bool,
        session: u64,
    ) -> Result<(Option<Streams>, Option<Conn>), ReceiveError> {
        if n == 0 && !request {
            return Ok((None, None));
        }
        let what = match (n, request) {
            (0, _) => "the post-copy request connection".to_string(),
            (n, false) => format!("{n} data connections"),
            (n, true) => format!("{n} data connections and the post-copy request connection"),
        };
        self.context = format!("accepting {what}");
        let mut req: Option<Conn> = None;
        let deadline = Instant::now() + STREAMS_TIMEOUT;
        let mut socks: Vec<Option<Conn>> = (0..n).map(|_| None).collect();
        let listen_err = |source| ReceiveError::Listen {
            addr: listener
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default(),
            source,
        };
        listener.set_nonblocking(true).map_err(listen_err)?;
        let mut left = n + u32::from(request);
        while left > 0 {
            let s = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if let Some(cancelled) = self.cancelled_here() {
                        let _ = listener.set_nonblocking(false);
                        return Err(cancelled);
                    }
                    if Instant::now() > deadline {
                        let _ = listener.set_nonblocking(false);
                        return Err(ReceiveError::NeverOpened {
                            missing: left,
                            expected: n + u32::from(request),
                            what: what.clone(),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                Err(e) => return Err(listen_err(e)),
            };
            s.set_nonblocking(false).map_err(listen_err)?;
            setup(&s)?;
            let (mut s, claim) = self.security.server(s).map_err(ReceiveError::Transport)?;
            let StreamHello {
                index,
                session: got,
            } = protocol::read_handshake(&mut s).map_err(|e| self.err(e))?;
            check_claim(claim, index, got)?;
            if index == protocol::REQUEST_STREAM {
                if !(request && req.is_none() && got == session) {
                    return Err(ReceiveError::RequestClaim {
                        session: got,
                        expected: session,
                        postcopy: request,
                    });
                }
                req = Some(s);
                left -= 1;
                continue;
            }
            let slot = socks.get_mut(index as usize).filter(|_| got == session);
            match slot {
                Some(slot @ None) => {
                    *slot = Some(s);
                    left -= 1;
                }
                _ => {
                    return Err(ReceiveError::StreamClaim {
                        index,
                        session: got,
                        streams: n,
                        expected: session,
                    })
                }
            }
        }
        listener.set_nonblocking(false).map_err(listen_err)?;
        if n == 0 {
            return Ok((None, req));
        }
        let (tx, reports) = crossbeam_channel::unbounded();
        let streams = Streams {
            socks: socks.into_iter().flatten().collect(),
            reports,
            tx,
            live: 0.into(),
            progress: 0.into(),
            born: Instant::now(),
        };
        Ok((Some(streams), req))
    }
}

/// A connection that authenticated (PSK) as connection `conn` of `session`
/// must open as that one: no splicing into another stream or session.
pub(super) fn check_claim(
    claim: Option<(u32, u64)>,
    index: u32,
    session: u64,
) -> Result<(), ReceiveError> {
    let name = |(i, s): (u32, u64)| match i {
        protocol::CONTROL_STREAM => format!("the control connection of session {s:#x}"),
        protocol::REQUEST_STREAM => format!("the request connection of session {s:#x}"),
        i => format!("data connection {i} of session {s:#x}"),
    };
    match claim {
        Some(c) if c != (index, session) => Err(ReceiveError::Transport(TransportError::Spliced {
            claimed: name(c),
            opened: name((index, session)),
        })),
        _ => Ok(()),
    }
}

/// A data connection's thread: decode page runs into memory until the
/// sender closes the connection; report each round's end to the control
/// thread.
pub(super) fn data_stream(
    mut sock: Conn,
    index: usize,
    limits: &Limits,
    mem: &GuestMemory,
    landed: &Landed,
    streams: &Streams,
    postcopy: bool,
) -> Result<(), ReceiveError> {
    let mut decoder = Decoder::new(mem.page_size()).populating_zeros(postcopy);
    let mut pages = 0u64;
    let fail = |source: ProtocolError| {
        ReceiveError::Protocol(InContext {
            context: format!("data connection {index}"),
            source,
        })
    };
    loop {
        match protocol::read_frame(&mut sock, Some(limits)) {
            Ok(Frame::Message(Message::RoundEnd(RoundEnd { round, pages: p }))) => {
                if p != pages {
                    return Err(ReceiveError::Step {
                        context: format!("data connection {index}"),
                        source: DestStepError::PageCount {
                            round,
                            sent: p,
                            arrived: pages,
                        },
                    });
                }
                streams.progressed();
                let _ = streams.tx.send(Ok((index, round, pages)));
                pages = 0;
            }
            Ok(Frame::Message(Message::Abort(Abort(why)))) => {
                return Err(fail(ProtocolError::Aborted(why)))
            }
            // SAFETY: within a round the sender sends each page once, on one
            // connection (see Decoder::receive); the guest has not started.
            Ok(Frame::Run(run)) => {
                pages += unsafe { decoder.receive(&mut sock, &run, mem, landed) }.map_err(fail)?;
                streams.progressed();
            }
            Ok(f) => return Err(fail(unexpected_frame("a data connection", f))),
            // The sender closes its data connections after the last round,
            // and the control thread shuts them once the rounds are over.
            Err(ProtocolError::Closed) => return Ok(()),
            Err(ProtocolError::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Ok(())
            }
            Err(e) => return Err(fail(e)),
        }
    }
}
