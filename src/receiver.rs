//! The destination side: accept one migration, write every page straight
//! into place, start the guest on the received memory, verify.
//!
//! Each page is hashed as it lands (the last version of a page wins), so
//! verification needs no second pass over memory after the destination guest
//! has started changing it: the sender's digests of the paused source are
//! compared with those arrival hashes, after downtime has ended.

use std::io::Read;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use crate::control::Control;
use crate::dirty::TrackerKind;
use crate::guest::{DeviceState, Guest, GuestError};
use crate::memory::{check_fits, GuestMemory, MemoryError};
use crate::protocol::{self, Frame, Kind, Limits, Message, ProtocolError};
use crate::sender::IO_TIMEOUT;

/// Errors of the receiving side.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error("cannot listen on {addr}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{context}")]
    Protocol {
        context: String,
        #[source]
        source: ProtocolError,
    },
    #[error("no data from the sender for {} s ({context})", IO_TIMEOUT.as_secs())]
    Timeout { context: String },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Guest(#[from] GuestError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
}

/// What the receiving side saw.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ReceiveReport {
    pub status: crate::report::Status,
    pub error: Option<String>,
    pub peer: String,
    pub memory_bytes: u64,
    pub page_size: u64,
    /// Pages received per round (stop-and-copy last).
    pub round_pages: Vec<u64>,
    pub pages_received: u64,
    pub resume_ms: f64,
    pub verified_pages: u64,
    pub mismatched_pages: u64,
    /// Write rate of the resumed guest, measured over `DEST_RATE_WINDOW`.
    pub destination_guest_rate_pps: f64,
    pub destination_guest_pid: i32,
}

/// How long the resumed guest is watched to show it runs its workload.
const DEST_RATE_WINDOW: Duration = Duration::from_millis(300);

pub fn bind(addr: &str) -> Result<TcpListener, ReceiveError> {
    TcpListener::bind(addr).map_err(|source| ReceiveError::Listen {
        addr: addr.into(),
        source,
    })
}

/// Accept one migration on `listener` and carry it through. The report is
/// filled in as far as it got; a failure is also returned as the error.
pub fn receive(listener: &TcpListener) -> (ReceiveReport, Result<(), ReceiveError>) {
    let mut rx = Receiving {
        report: ReceiveReport::default(),
        context: "handshake".into(),
    };
    let result = rx.accept_and_run(listener);
    match &result {
        Ok(()) => rx.report.status = crate::report::Status::Completed,
        Err(e) => rx.report.error = Some(crate::report::error_chain(e)),
    }
    (rx.report, result)
}

impl Receiving {
    fn accept_and_run(&mut self, listener: &TcpListener) -> Result<(), ReceiveError> {
        let (mut sock, peer) = listener.accept().map_err(|source| ReceiveError::Listen {
            addr: listener
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default(),
            source,
        })?;
        self.report.peer = peer.to_string();
        setup(&sock)?;
        let result = self.run(&mut sock);
        if let Err(e) = &result {
            give_up(&mut sock, e);
        }
        result
    }
}

fn setup(sock: &TcpStream) -> Result<(), ReceiveError> {
    let io = |source| ReceiveError::Protocol {
        context: "setting up the connection".into(),
        source: ProtocolError::Io(source),
    };
    sock.set_nodelay(true).map_err(io)?;
    sock.set_read_timeout(Some(IO_TIMEOUT)).map_err(io)?;
    sock.set_write_timeout(Some(IO_TIMEOUT)).map_err(io)
}

/// Tell the sender why, then drain briefly so the reason is not lost to a
/// reset (closing with unread data would send RST).
fn give_up(sock: &mut TcpStream, e: &ReceiveError) {
    let _ = protocol::write_message(sock, &Message::abort(crate::report::error_chain(e)));
    let _ = sock.shutdown(Shutdown::Write);
    let _ = sock.set_read_timeout(Some(Duration::from_millis(100)));
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut sink = vec![0u8; 64 << 10];
    while Instant::now() < deadline {
        match sock.read(&mut sink) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => break,
        }
    }
}

struct Receiving {
    report: ReceiveReport,
    /// Where in the stream we are, for error messages.
    context: String,
}

impl Receiving {
    fn err(&self, source: ProtocolError) -> ReceiveError {
        let context = self.context.clone();
        match source {
            ProtocolError::Io(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                ReceiveError::Timeout { context }
            }
            source => ReceiveError::Protocol { context, source },
        }
    }

    fn next(&self, sock: &mut TcpStream, limits: &Limits) -> Result<Frame, ReceiveError> {
        protocol::read_frame(sock, Some(limits)).map_err(|e| self.err(e))
    }

    fn run(&mut self, sock: &mut TcpStream) -> Result<(), ReceiveError> {
        let Message::Hello(hello) =
            protocol::read_handshake(sock, Kind::Hello).map_err(|e| self.err(e))?
        else {
            unreachable!("read_handshake returns the kind asked for")
        };
        let limits = hello.limits().map_err(|e| self.err(e))?;
        let page_size = u64::from(limits.page_size);
        if page_size != crate::memory::page_size() {
            return Err(ReceiveError::Invalid(format!(
                "sender uses {page_size}-byte pages, this host {}",
                crate::memory::page_size()
            )));
        }
        check_fits(
            &format!(
                "receiving a guest of {}",
                crate::units::fmt_bytes(hello.memory_bytes)
            ),
            hello.memory_bytes,
        )?;
        let mem = GuestMemory::create(hello.memory_bytes, page_size)?;
        let pages = mem.page_count();
        self.report.memory_bytes = hello.memory_bytes;
        self.report.page_size = page_size;
        let mut hashes = vec![0u64; usize::try_from(pages).expect("fits: memory was mapped")];
        // The destination guest process starts now, like QEMU's -incoming,
        // and waits for its device state: start-up is not downtime.
        let mut guest = Guest::spawn(&mem, Control::create()?, None, TrackerKind::Bitmap, None)?;
        protocol::write_message(sock, &Message::hello_ack()).map_err(|e| self.err(e))?;
        self.context = "waiting for round 0".into();

        // Rounds until the device state arrives.
        let mut round: Option<(u32, u64)> = None; // (round, pages so far)
        let mut next_round = 0u32;
        let mut stop_and_copy = false;
        let state = loop {
            match self.next(sock, &limits)? {
                Frame::Message(Message::RoundStart {
                    round: r,
                    stop_and_copy: s,
                }) if round.is_none() && r == next_round && !stop_and_copy => {
                    self.context = format!("round {r}");
                    stop_and_copy = s;
                    round = Some((r, 0));
                }
                Frame::Pages { first_page, count } if round.is_some() => {
                    let count = u64::from(count);
                    // SAFETY: the waiting destination guest maps this memory
                    // but touches none of it until it is handed its device
                    // state, after the last page; nothing else writes it.
                    let buf = unsafe { mem.pages_mut(first_page, count) };
                    protocol::read_bulk(sock, buf, Kind::Pages).map_err(|e| self.err(e))?;
                    for (i, page) in buf.chunks_exact(page_size as usize).enumerate() {
                        hashes[(first_page + i as u64) as usize] = crate::memory::page_digest(page);
                    }
                    if let Some((_, n)) = &mut round {
                        *n += count;
                    }
                }
                Frame::Message(Message::RoundEnd { round: r, pages: p })
                    if round.map(|x| x.0) == Some(r) =>
                {
                    let got = round.take().map_or(0, |x| x.1);
                    if got != p {
                        return Err(ReceiveError::Invalid(format!(
                            "round {r}: the sender says it sent {p} pages, {got} arrived"
                        )));
                    }
                    self.report.round_pages.push(got);
                    self.report.pages_received += got;
                    next_round = r + 1;
                    if !stop_and_copy {
                        let ack = Message::round_ack(r);
                        protocol::write_message(sock, &ack).map_err(|e| self.err(e))?;
                    }
                }
                Frame::Message(Message::DeviceState(blob)) if round.is_none() && stop_and_copy => {
                    break blob
                }
                Frame::Message(Message::Abort(reason)) => {
                    return Err(self.err(ProtocolError::Aborted(reason)))
                }
                other => return Err(self.err(unexpected_frame(&self.context, other))),
            }
        };

        // Resume: downtime ends when the guest runs here.
        self.context = "resuming the guest".into();
        let t0 = Instant::now();
        let state = DeviceState::from_bytes(&state, hello.memory_bytes, page_size)?;
        guest.start_incoming(&state);
        guest.wait_running()?;
        let resume = t0.elapsed();
        self.report.resume_ms = resume.as_secs_f64() * 1e3;
        self.report.destination_guest_pid = guest.pid();
        let resumed = Message::Resumed {
            resume_ns: u64::try_from(resume.as_nanos()).unwrap_or(u64::MAX),
            pages_received: self.report.pages_received,
        };
        protocol::write_message(sock, &resumed).map_err(|e| self.err(e))?;

        // Verification, off the downtime path.
        self.context = "verification".into();
        // Digests arrive in page order, so one cursor tells a missing or
        // repeated page apart from the next one.
        let mut next_page = 0u64;
        let (mut verified, mut mismatched, mut first_mismatch) = (0u64, 0u64, None);
        loop {
            match self.next(sock, &limits)? {
                Frame::Digests { first_page, count } if first_page == next_page => {
                    let digests = protocol::read_digests(sock, count).map_err(|e| self.err(e))?;
                    for (page, &d) in (first_page..).zip(&digests) {
                        if d == hashes[page as usize] {
                            verified += 1;
                        } else {
                            mismatched += 1;
                            first_mismatch.get_or_insert(page);
                        }
                    }
                    next_page += u64::from(count);
                }
                Frame::Digests { first_page, .. } => {
                    return Err(ReceiveError::Invalid(format!(
                        "digests for page {first_page} arrived where page {next_page} was due"
                    )))
                }
                Frame::Message(Message::Complete) => break,
                Frame::Message(Message::Abort(reason)) => {
                    return Err(self.err(ProtocolError::Aborted(reason)))
                }
                other => return Err(self.err(unexpected_frame(&self.context, other))),
            }
        }
        if next_page != pages {
            return Err(ReceiveError::Invalid(format!(
                "{} pages had no digest",
                pages - next_page
            )));
        }
        self.report.verified_pages = verified;
        self.report.mismatched_pages = mismatched;
        let verdict = Message::Verdict {
            verified_pages: verified,
            mismatched_pages: mismatched,
            first_mismatch,
        };
        protocol::write_message(sock, &verdict).map_err(|e| self.err(e))?;
        // Show the migrated guest carries on with its workload.
        self.report.destination_guest_rate_pps = guest.measure_rate(DEST_RATE_WINDOW)?;
        Ok(())
    }
}

fn unexpected_frame(context: &str, got: Frame) -> ProtocolError {
    ProtocolError::Unexpected {
        got: got.kind(),
        expected: format!("the next frame of {context}"),
    }
}
