//! The destination side: accept one migration, write every page straight
//! into place, start the guest on the received memory, verify.
//!
//! Each page is hashed as it lands (the last version of a page wins), so
//! verification needs no second pass over memory after the destination guest
//! has started changing it: the sender's digests of the paused source are
//! compared with those arrival hashes, after downtime has ended.
//!
//! With `streams` > 1 each data connection has a thread of its own that
//! decodes its page runs into memory; the control thread waits for every
//! data connection to end a round before acknowledging it.
//!
//! Destination memory is preallocated by default (QEMU's `-mem-prealloc`):
//! otherwise the kernel allocates and zeroes each page at its first arrival,
//! which on loopback costs more than moving it (measured: round 0 of 1 GiB
//! at 3-6 Gbit/s lazily, about 30 Gbit/s preallocated). The time it takes
//! is reported as `prealloc_ms`; `migrate` and `receive --mem` do it before
//! the migration starts, otherwise it happens during the handshake.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};

use crate::wire::transport::{Conn, Security, TransportError};
use std::time::{Duration, Instant};

use crate::guest::control::Control;
use crate::guest::dirty::TrackerKind;
use crate::guest::memory::{check_fits, GuestMemory, MemoryError};
use crate::guest::process::{DeviceState, Guest, GuestError};
use crate::report::Status;
use crate::util::cancel::{Cancel, HookGuard};
use crate::util::netio::IO_TIMEOUT;
use crate::util::page::PageSize;
use crate::util::units::fmt_bytes;
use crate::wire::datapath::Landed;
use crate::wire::protocol::InContext;
use crate::wire::protocol::{self, Abort, Frame, Hello, Limits, Message, ProtocolError};

use crate::migration::phases::DestStepError;

mod frames;
mod postcopy;
mod replay;
mod report;
mod serve;
mod streams;
mod teleport;
pub use frames::ControlConn;
use frames::Switched;
pub use replay::{replay, ReplayConn};
pub use report::ReceiveReport;
pub use serve::{serve, Served};
use streams::{data_stream, Streams, CLOSE_TIMEOUT, STREAMS_TIMEOUT};

/// Errors of the receiving side.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error("cannot listen on {addr}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("securing the sender's connection")]
    Transport(#[source] TransportError),
    #[error(transparent)]
    Protocol(#[from] InContext),
    #[error("no data from the sender for {} s ({context})", IO_TIMEOUT.as_secs())]
    Timeout { context: String },
    #[error("{missing} of the sender's {expected} connections ({what}) never opened within {} s", STREAMS_TIMEOUT.as_secs())]
    NeverOpened {
        missing: u32,
        expected: u32,
        what: String,
    },
    #[error("data connection {index} closed before it ended {}", round.map_or("its round".into(), |r| format!("round {r}")))]
    StreamClosed { index: usize, round: Option<u32> },
    #[error("closing the data connections: their threads did not end within {} s", CLOSE_TIMEOUT.as_secs())]
    CloseTimeout,
    #[error("{context}")]
    Step {
        context: String,
        #[source]
        source: DestStepError,
    },
    #[error("the sender's guest has {}, this receiver was prepared for {}", fmt_bytes(*.sender), fmt_bytes(*.prepared))]
    PreparedFor { sender: u64, prepared: u64 },
    #[error("sender uses {sender}-byte pages, this host {host}")]
    PageSize { sender: u64, host: u64 },
    #[error("digests for page {got} arrived where page {due} was due")]
    DigestOrder { got: u64, due: u64 },
    #[error("{0} pages had no digest")]
    NoDigest(u64),
    /// Pages whose content here differs from the paused source's.
    #[error("{count} mismatched pages after migration (first: page {first})")]
    Mismatch { count: u64, first: u64 },
    #[error("page-cache teleportation: {0}")]
    Storage(String),
    #[error("data connection {index} ended round {got} while round {ending} was ending")]
    StreamRound { index: usize, got: u32, ending: u32 },
    #[error("a data connection claims stream {index} of session {session:#x}; expected one of {streams} streams of session {expected:#x}, each once")]
    StreamClaim {
        index: u32,
        session: u64,
        streams: u32,
        expected: u64,
    },
    #[error("a connection claims to be the post-copy request connection of session {session:#x}; {}", match .postcopy {
        true => format!("expected one, of session {expected:#x}"),
        false => format!("migration {expected:#x} is not post-copy"),
    })]
    RequestClaim {
        session: u64,
        expected: u64,
        postcopy: bool,
    },
    #[error(
        "post-copy: the destination guest could not register its memory for missing-page faults"
    )]
    NoUserfaultfd,
    #[error("post-copy: taking the guest's userfaultfd")]
    Userfaultfd(#[source] crate::guest::uffd::UffdError),
    #[error("post-copy failed with {missing} pages still missing, so the destination guest cannot continue and is stopped{why}")]
    PostcopyFailed {
        missing: u64,
        /// The fault handler's own failure, if it had one, as ` (cause)`.
        why: String,
        #[source]
        source: Box<ReceiveError>,
    },
    #[error("post-copy")]
    Postcopy(#[source] crate::migration::postcopy::PostcopyError),
    #[error("the push ended with {0} pages still missing")]
    PushIncomplete(u64),
    #[error("a replayed session has one connection; its Hello asks for {0} data connections")]
    ReplayStreams(u32),
    #[error(transparent)]
    Guest(#[from] GuestError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The sender cancelled (its `Abort` reason), or this side was.
    #[error("migration {0}")]
    Cancelled(String),
}

/// How long the resumed guest is watched to show it runs its workload.
const DEST_RATE_WINDOW: Duration = Duration::from_millis(300);

pub fn bind(addr: &str) -> Result<TcpListener, ReceiveError> {
    TcpListener::bind(addr).map_err(|source| ReceiveError::Listen {
        addr: addr.into(),
        source,
    })
}

/// Destination memory, made before the sender connects when its size is known.
pub struct Prepared {
    mem: Option<GuestMemory>,
    prealloc: bool,
    prealloc_ms: f64,
    /// Post-copy: pages asked for after each faulted one.
    prepage: u32,
    /// A local migration's timeline: handed the guest when it resumes here.
    probe: Option<std::sync::Arc<crate::migration::sampler::Probe>>,
    /// Page-cache teleportation: this end's backing file and read rate.
    pub storage: Option<crate::migration::teleport::StorageConfig>,
}

/// Longest a destination keeps its guest for a timeline's observation.
const OBSERVE_LIMIT: Duration = Duration::from_secs(120);

impl Prepared {
    /// Hand the guest to `probe` when it resumes here, and keep it until
    /// the probe's observation is over (a local migration's timeline).
    pub fn observed_by(mut self, probe: std::sync::Arc<crate::migration::sampler::Probe>) -> Self {
        self.probe = Some(probe);
        self
    }

    /// `memory_bytes`: the size to make now (None: when the Hello says);
    /// `prealloc`: allocate every page up front rather than at first arrival.
    /// `prepage`: in post-copy, pages asked for after each faulted one.
    pub fn new(
        memory_bytes: Option<u64>,
        prealloc: bool,
        prepage: u32,
    ) -> Result<Self, ReceiveError> {
        let mut p = Prepared {
            mem: None,
            prealloc,
            prealloc_ms: 0.0,
            prepage,
            probe: None,
            storage: None,
        };
        if let Some(bytes) = memory_bytes {
            p.mem = Some(p.make(bytes)?);
        }
        Ok(p)
    }

    fn make(&mut self, bytes: u64) -> Result<GuestMemory, ReceiveError> {
        let what = format!(
            "receiving a guest of {}",
            crate::util::units::fmt_bytes(bytes)
        );
        check_fits(&what, bytes)?;
        let mem = GuestMemory::create(bytes, PageSize::host())?;
        if self.prealloc {
            self.prealloc_ms = crate::report::ms(mem.prealloc()?);
        }
        Ok(mem)
    }

    /// Memory for a guest of `bytes`: the one made beforehand if it matches.
    fn take(&mut self, bytes: u64) -> Result<GuestMemory, ReceiveError> {
        match self.mem.take() {
            Some(m) if m.len() == bytes => Ok(m),
            Some(m) => Err(ReceiveError::PreparedFor {
                sender: bytes,
                prepared: m.len(),
            }),
            None => self.make(bytes),
        }
    }
}

/// Accept one migration on `listener` and carry it through. The report is
/// filled in as far as it got; a failure is also returned as the error.
///
/// `cancel` (SIGINT, SIGTERM) stops the wait for a sender, or the migration
/// until the guest runs here: the sender is told and the report says
/// `cancelled`. Once the guest runs here the migration goes on to its end
/// (post-copy needs every page). A sender's cancel ends it `cancelled` too.
pub fn receive(
    listener: &TcpListener,
    prepared: Prepared,
    cancel: &Cancel,
    security: &Security,
) -> (ReceiveReport, Result<(), ReceiveError>) {
    let mut rx = Receiving::new(prepared, cancel, security, None);
    let result = rx.accept_and_run(listener);
    rx.finish(result)
}

impl Receiving {
    fn new(
        prepared: Prepared,
        cancel: &Cancel,
        security: &Security,
        gate: Option<std::sync::Arc<std::sync::Mutex<()>>>,
    ) -> Self {
        Receiving {
            report: ReceiveReport {
                transport: security.name().into(),
                ..ReceiveReport::default()
            },
            context: "handshake".into(),
            prepared,
            cancel: cancel.clone(),
            interrupt: None,
            security: security.clone(),
            gate,
        }
    }

    /// The report with the outcome filled in, and the outcome.
    fn finish(
        mut self,
        result: Result<(), ReceiveError>,
    ) -> (ReceiveReport, Result<(), ReceiveError>) {
        let rx = &mut self;
        rx.report.status = match &result {
            Ok(()) => Status::Completed,
            Err(ReceiveError::Cancelled(_)) => Status::Cancelled,
            Err(_) => Status::Failed,
        };
        if let Err(e) = &result {
            rx.report.error = Some(crate::util::error::error_chain(e));
        }
        (self.report, result)
    }
}

/// Shut down `fd`'s socket when `cancel` fires, waking a read or accept
/// blocked on it; a socket this side still writes to keeps its write half.
fn interrupt_on(cancel: &Cancel, fd: std::os::fd::OwnedFd, how: Shutdown) -> HookGuard {
    cancel.on_cancel(move || {
        use nix::sys::socket::{shutdown, Shutdown as S};
        let how = match how {
            Shutdown::Read => S::Read,
            _ => S::Both,
        };
        let _ = shutdown(std::os::fd::AsRawFd::as_raw_fd(&fd), how);
    })
}

impl Receiving {
    fn accept_and_run(&mut self, listener: &TcpListener) -> Result<(), ReceiveError> {
        let listen_fd = listener
            .try_clone()
            .map(std::os::fd::OwnedFd::from)
            .map_err(|source| ReceiveError::Listen {
                addr: "the listening socket".into(),
                source,
            })?;
        let waiting = interrupt_on(&self.cancel, listen_fd, Shutdown::Both);
        self.context = "waiting for a sender".into();
        let accepted = listener.accept();
        drop(waiting);
        if let Some(e) = self.cancelled_here() {
            return Err(e);
        }
        let (sock, peer) = accepted.map_err(|source| ReceiveError::Listen {
            addr: listener
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default(),
            source,
        })?;
        self.run_accepted(sock, peer, listener)
    }

    /// Carry through the migration whose control connection `sock` is.
    fn run_accepted(
        &mut self,
        sock: TcpStream,
        peer: std::net::SocketAddr,
        listener: &TcpListener,
    ) -> Result<(), ReceiveError> {
        self.report.peer = peer.to_string();
        self.context = "handshake".into();
        setup(&sock)?;
        // Until the guest runs here (rounds_and_resume drops it), a cancel
        // ends the control connection's reads; its write half stays for
        // the Abort that tells the sender.
        let ctl = sock.try_clone().map(std::os::fd::OwnedFd::from);
        self.interrupt = ctl
            .ok()
            .map(|fd| interrupt_on(&self.cancel, fd, Shutdown::Read));
        let (mut sock, claim) = match self.security.server(sock) {
            Ok(secured) => secured,
            Err(e) => {
                let e = self.cancelled_here().unwrap_or(ReceiveError::Transport(e));
                self.interrupt = None;
                return Err(e);
            }
        };
        let result = self.run(&mut sock, listener, claim).map_err(|e| {
            let here = self.interrupt.is_some().then(|| self.cancelled_here());
            here.flatten().unwrap_or(e)
        });
        self.interrupt = None;
        if let Err(e) = &result {
            give_up(&mut sock, e);
        }
        result
    }
}

fn setup(sock: &TcpStream) -> Result<(), ReceiveError> {
    let io = |source| {
        ReceiveError::Protocol(InContext {
            context: "setting up the connection".into(),
            source: ProtocolError::Io(source),
        })
    };
    sock.set_nodelay(true).map_err(io)?;
    sock.set_read_timeout(Some(IO_TIMEOUT)).map_err(io)?;
    sock.set_write_timeout(Some(IO_TIMEOUT)).map_err(io)
}

/// Tell the sender why, then drain briefly so the reason is not lost to a
/// reset (closing with unread data would send RST).
fn give_up(sock: &mut Conn, e: &ReceiveError) {
    let _ = protocol::write_message(sock, &Message::abort(crate::util::error::error_chain(e)));
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
    prepared: Prepared,
    cancel: Cancel,
    /// While set, a cancel shuts the control connection's read half.
    interrupt: Option<HookGuard>,
    security: Security,
    /// Serving many at once: held while this migration's data connections
    /// are accepted, so the serving loop does not take them for new ones.
    gate: Option<std::sync::Arc<std::sync::Mutex<()>>>,
}

impl Receiving {
    /// This side's cancel, as the error that ends the migration.
    fn cancelled_here(&self) -> Option<ReceiveError> {
        let why = self.cancel.why()?;
        Some(ReceiveError::Cancelled(format!(
            "cancelled by {why} at the receiver ({})",
            self.context
        )))
    }

    fn err(&self, source: ProtocolError) -> ReceiveError {
        let context = self.context.clone();
        match source {
            ProtocolError::Aborted(reason) if crate::migration::cancel::is_cancel(&reason) => {
                ReceiveError::Cancelled(reason)
            }
            ProtocolError::Io(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                ReceiveError::Timeout { context }
            }
            source => ReceiveError::Protocol(InContext { context, source }),
        }
    }

    fn next(&self, sock: &mut impl Read, limits: &Limits) -> Result<Frame, ReceiveError> {
        protocol::read_frame(sock, Some(limits)).map_err(|e| self.err(e))
    }

    /// The sender's `Hello` (from the connection `claim`, if PSK
    /// authenticated one), the limits it sets, and memory of its size.
    fn accept_hello(
        &mut self,
        sock: &mut impl Read,
        claim: Option<(u32, u64)>,
    ) -> Result<(Hello, Limits, GuestMemory), ReceiveError> {
        let hello: Hello = protocol::read_handshake(sock).map_err(|e| self.err(e))?;
        streams::check_claim(claim, protocol::CONTROL_STREAM, hello.session)?;
        let limits = hello.limits().map_err(|e| self.err(e))?;
        let page_size = PageSize::host();
        if u64::from(limits.page_size) != page_size.as_u64() {
            return Err(ReceiveError::PageSize {
                sender: u64::from(limits.page_size),
                host: page_size.as_u64(),
            });
        }
        self.report.memory_bytes = hello.memory_bytes;
        self.report.page_size = page_size.as_u64();
        self.report.streams = hello.streams;
        let mem = self.prepared.take(hello.memory_bytes)?;
        self.report.prealloc_ms = self.prepared.prealloc_ms;
        Ok((hello, limits, mem))
    }

    fn run(
        &mut self,
        sock: &mut Conn,
        listener: &TcpListener,
        claim: Option<(u32, u64)>,
    ) -> Result<(), ReceiveError> {
        let (hello, limits, mem) = self.accept_hello(sock, claim)?;
        let (pages, page_size) = (mem.page_count(), mem.page_size());
        let landed = Landed::new(pages, page_size);
        // The destination guest process starts now, like QEMU's -incoming,
        // and waits for its device state: start-up is not downtime.
        let mut guest = Guest::spawn(&mem, Control::create()?, None, TrackerKind::Bitmap, None)?;
        let data = if hello.streams > 1 { hello.streams } else { 0 };
        // Serving many: from before the sender may open its other
        // connections until they are in, no new migration is accepted.
        let gate = self.gate.clone().filter(|_| data > 0 || hello.postcopy);
        let held = gate
            .as_ref()
            .map(|g| g.lock().unwrap_or_else(|p| p.into_inner()));
        protocol::write_message(sock, &Message::hello_ack()).map_err(|e| self.err(e))?;
        let (streams, requests) =
            self.accept_streams(listener, data, hello.postcopy, hello.session)?;
        drop(held);
        let mut requests = requests;
        let result = std::thread::scope(|scope| {
            if let Some(st) = &streams {
                st.live
                    .store(st.socks.len(), std::sync::atomic::Ordering::Release);
                for (index, s) in st.socks.iter().enumerate() {
                    let (mem, landed, ctl) = (&mem, &landed, sock.try_clone());
                    let postcopy = hello.postcopy;
                    scope.spawn(move || {
                        let r = match s.try_clone() {
                            Ok(s) => data_stream(s, index, &limits, mem, landed, st, postcopy),
                            Err(e) => Err(ReceiveError::Protocol(InContext {
                                context: "setting up a data connection".into(),
                                source: ProtocolError::Io(e),
                            })),
                        };
                        // The sender closes its data connections after the
                        // last round; one that closes while a round waits for
                        // its end is a failure end_round reports at once.
                        if r.is_ok() {
                            let closed = ReceiveError::StreamClosed { index, round: None };
                            let _ = st.tx.send(Err(closed));
                        }
                        if let Err(e) = r {
                            // Report first, then stop the control thread's
                            // wait, so it finds this cause when it wakes up
                            // (the control connection's write side stays
                            // open for the Abort).
                            let _ = st.tx.send(Err(e));
                            if let Ok(ctl) = ctl {
                                let _ = ctl.shutdown(Shutdown::Read);
                            }
                        }
                        st.live.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
                    });
                }
            }
            let r = self.rounds_and_resume(
                sock,
                &mem,
                &landed,
                &mut guest,
                &limits,
                streams.as_ref(),
                &mut requests,
            );
            if let Some(st) = &streams {
                let _ = st.close();
            }
            r
        });
        result?;
        self.verify(sock, &landed, &limits, pages)?;
        // Show the migrated guest carries on with its workload.
        self.report.destination_guest_rate_pps = guest.measure_rate(DEST_RATE_WINDOW)?;
        if let Some(probe) = &self.prepared.probe {
            probe.wait_observed(OBSERVE_LIMIT);
        }
        Ok(())
    }

    /// The rounds, then the guest's start here.
    #[allow(clippy::too_many_arguments)]
    fn rounds_and_resume(
        &mut self,
        sock: &mut Conn,
        mem: &GuestMemory,
        landed: &Landed,
        guest: &mut Guest,
        limits: &Limits,
        streams: Option<&Streams>,
        requests: &mut Option<Conn>,
    ) -> Result<(), ReceiveError> {
        let postcopy = requests.is_some();
        let Switched {
            state,
            missing,
            discard,
        } = self.until_device_state(sock, mem, landed, limits, streams, postcopy)?;
        let (hello_bytes, page_size) = (self.report.memory_bytes, mem.page_size());

        // Resume: downtime ends when the guest runs here.
        self.context = "resuming the guest".into();
        let t0 = Instant::now();
        let state = DeviceState::from_bytes(&state, hello_bytes, page_size)?;
        if postcopy {
            guest.control().request_postcopy();
        }
        guest.start_incoming(&state);
        guest.wait_running()?;
        if let Some(probe) = &self.prepared.probe {
            // vCPU counts are bounded by MAX_VCPUS (checked in from_bytes).
            probe.attach_destination(guest.control().clone(), state.vcpus.len() as u32);
        }
        let dest = match postcopy {
            true => Some(self.take_faults(guest, limits, &missing)?),
            false => None,
        };
        let resume = t0.elapsed();
        self.report.resume_ms = resume.as_secs_f64() * 1e3;
        self.report.destination_guest_pid = guest.pid();
        let resumed = Message::resumed(
            u64::try_from(resume.as_nanos()).unwrap_or(u64::MAX),
            self.report.pages_received,
        );
        protocol::write_message(sock, &resumed).map_err(|e| self.err(e))?;
        // The guest runs here: from now on it needs this migration to end.
        self.interrupt = None;
        if let (Some(dest), Some(req)) = (dest, requests.take()) {
            self.postcopy_phase(sock, landed, guest, limits, &dest, req)?;
            if let Some(p) = &mut self.report.postcopy {
                p.postcopy_discard_ms = Some(crate::report::ms(discard));
            }
        }
        Ok(())
    }

    /// Verification, off the downtime path: the source's digests against
    /// those of the pages as they landed.
    fn verify(
        &mut self,
        sock: &mut (impl Read + Write),
        landed: &Landed,
        limits: &Limits,
        pages: u64,
    ) -> Result<(), ReceiveError> {
        self.context = "verification".into();
        // Digests arrive in page order, so one cursor tells a missing or
        // repeated page apart from the next one.
        let mut next_page = 0u64;
        let (mut verified, mut mismatched, mut first_mismatch) = (0u64, 0u64, None);
        loop {
            match self.next(sock, limits)? {
                Frame::Digests { first_page, count } if first_page == next_page => {
                    let digests = protocol::read_digests(sock, count).map_err(|e| self.err(e))?;
                    for (page, &d) in (first_page..).zip(&digests) {
                        if d == landed.get(page) {
                            verified += 1;
                        } else {
                            mismatched += 1;
                            first_mismatch.get_or_insert(page);
                        }
                    }
                    next_page += u64::from(count);
                }
                Frame::Digests { first_page, .. } => {
                    return Err(ReceiveError::DigestOrder {
                        got: first_page,
                        due: next_page,
                    })
                }
                Frame::Message(Message::Complete(_)) => break,
                Frame::Message(Message::Abort(Abort(reason))) => {
                    return Err(self.err(ProtocolError::Aborted(reason)))
                }
                other => return Err(self.err(unexpected_frame(&self.context, other))),
            }
        }
        if next_page != pages {
            return Err(ReceiveError::NoDigest(pages - next_page));
        }
        self.report.verified_pages = verified;
        self.report.mismatched_pages = mismatched;
        let verdict = Message::verdict(verified, mismatched, first_mismatch);
        protocol::write_message(sock, &verdict).map_err(|e| self.err(e))?;
        // The sender has its verdict; the migration still failed here.
        match first_mismatch {
            Some(first) => Err(ReceiveError::Mismatch {
                count: mismatched,
                first,
            }),
            None => Ok(()),
        }
    }
}

pub(crate) fn unexpected_frame(context: &str, got: Frame) -> ProtocolError {
    ProtocolError::Unexpected {
        got: got.kind(),
        expected: format!("the next frame of {context}"),
    }
}
