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

use std::io::Read;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use crate::guest::control::Control;
use crate::guest::dirty::TrackerKind;
use crate::guest::memory::{check_fits, GuestMemory, MemoryError};
use crate::guest::process::{DeviceState, Guest, GuestError};
use crate::util::netio::IO_TIMEOUT;
use crate::wire::datapath::{Decoder, Landed};
use crate::wire::protocol::{self, Frame, Kind, Limits, Message, ProtocolError};

/// How long the sender has to open its data connections.
const STREAMS_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// Data connections the sender used (1: pages on the control connection).
    pub streams: u32,
    /// Time spent preallocating destination memory (0 when lazy).
    pub prealloc_ms: f64,
    /// Pages received per round (stop-and-copy last).
    pub round_pages: Vec<u64>,
    pub pages_received: u64,
    pub resume_ms: f64,
    pub verified_pages: u64,
    pub mismatched_pages: u64,
    /// Post-copy and hybrid: what the destination saw of demand paging.
    pub postcopy: Option<crate::report::PostcopyStats>,
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

/// Destination memory, made before the sender connects when its size is known.
pub struct Prepared {
    mem: Option<GuestMemory>,
    prealloc: bool,
    prealloc_ms: f64,
    /// Post-copy: pages asked for after each faulted one.
    prepage: u32,
}

impl Prepared {
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
        let mem = GuestMemory::create(bytes, crate::guest::memory::page_size())?;
        if self.prealloc {
            self.prealloc_ms = crate::report::ms(mem.prealloc()?);
        }
        Ok(mem)
    }

    /// Memory for a guest of `bytes`: the one made beforehand if it matches.
    fn take(&mut self, bytes: u64) -> Result<GuestMemory, ReceiveError> {
        match self.mem.take() {
            Some(m) if m.len() == bytes => Ok(m),
            Some(m) => Err(ReceiveError::Invalid(format!(
                "the sender's guest has {}, this receiver was prepared for {} (--mem)",
                crate::util::units::fmt_bytes(bytes),
                crate::util::units::fmt_bytes(m.len())
            ))),
            None => self.make(bytes),
        }
    }
}

/// Accept one migration on `listener` and carry it through. The report is
/// filled in as far as it got; a failure is also returned as the error.
pub fn receive(
    listener: &TcpListener,
    prepared: Prepared,
) -> (ReceiveReport, Result<(), ReceiveError>) {
    let mut rx = Receiving {
        report: ReceiveReport::default(),
        context: "handshake".into(),
        prepared,
    };
    let result = rx.accept_and_run(listener);
    match &result {
        Ok(()) => rx.report.status = crate::report::Status::Completed,
        Err(e) => rx.report.error = Some(crate::util::error::error_chain(e)),
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
        let result = self.run(&mut sock, listener);
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
}

/// What a data connection's thread tells the control thread: it ended its
/// share of a round (round, pages), or it failed.
type StreamReport = Result<(usize, u32, u64), ReceiveError>;

/// The data connections of a multi-stream migration.
struct Streams {
    socks: Vec<TcpStream>,
    reports: Receiver<StreamReport>,
    tx: Sender<StreamReport>,
    /// Their threads still running.
    live: std::sync::atomic::AtomicUsize,
    /// When a data connection last delivered a frame (ms since `born`).
    progress: std::sync::atomic::AtomicU64,
    born: Instant,
}

impl Streams {
    /// A data connection delivered a frame.
    fn progressed(&self) {
        let now = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.progress
            .store(now, std::sync::atomic::Ordering::Relaxed);
    }

    /// Wait until the control connection has a frame to read. During a
    /// round it is silent while the data connections carry the pages, so
    /// it only times out when they have been silent too.
    fn wait_control(&self, sock: &TcpStream) -> Result<(), ReceiveError> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::AsFd;
        loop {
            let mut fds = [PollFd::new(sock.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(1000u16)) {
                Ok(0) | Err(nix::Error::EINTR) => {}
                Ok(_) => return Ok(()),
                Err(e) => {
                    return Err(ReceiveError::Protocol {
                        context: "waiting on the control connection".into(),
                        source: ProtocolError::Io(e.into()),
                    })
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
    /// pages they carried.
    fn end_round(&self, round: u32) -> Result<u64, ReceiveError> {
        let (mut total, mut ended) = (0, vec![false; self.socks.len()]);
        while ended.iter().any(|e| !e) {
            match self.reports.recv_timeout(IO_TIMEOUT) {
                Ok(Ok((i, r, pages))) if r == round && !ended[i] => {
                    ended[i] = true;
                    total += pages;
                }
                Ok(Ok((i, r, _))) => {
                    return Err(ReceiveError::Invalid(format!(
                        "data connection {i} ended round {r} while round {round} was ending"
                    )))
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
    fn failure(&self) -> Option<ReceiveError> {
        self.reports.try_iter().find_map(Result::err)
    }

    /// Close the data connections and wait until their threads are done,
    /// so none writes guest memory once the guest may run.
    fn close(&self) -> Result<(), ReceiveError> {
        for s in &self.socks {
            let _ = s.shutdown(Shutdown::Both);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.live.load(std::sync::atomic::Ordering::Acquire) > 0 {
            if Instant::now() > deadline {
                return Err(ReceiveError::Timeout {
                    context: "closing the data connections".into(),
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }
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

    fn run(&mut self, sock: &mut TcpStream, listener: &TcpListener) -> Result<(), ReceiveError> {
        let Message::Hello(hello) =
            protocol::read_handshake(sock, Kind::Hello).map_err(|e| self.err(e))?
        else {
            unreachable!("read_handshake returns the kind asked for")
        };
        let limits = hello.limits().map_err(|e| self.err(e))?;
        let page_size = u64::from(limits.page_size);
        if page_size != crate::guest::memory::page_size() {
            return Err(ReceiveError::Invalid(format!(
                "sender uses {page_size}-byte pages, this host {}",
                crate::guest::memory::page_size()
            )));
        }
        self.report.memory_bytes = hello.memory_bytes;
        self.report.page_size = page_size;
        self.report.streams = hello.streams;
        let mem = self.prepared.take(hello.memory_bytes)?;
        self.report.prealloc_ms = self.prepared.prealloc_ms;
        let pages = mem.page_count();
        let landed = Landed::new(pages, page_size);
        // The destination guest process starts now, like QEMU's -incoming,
        // and waits for its device state: start-up is not downtime.
        let mut guest = Guest::spawn(&mem, Control::create()?, None, TrackerKind::Bitmap, None)?;
        protocol::write_message(sock, &Message::hello_ack()).map_err(|e| self.err(e))?;
        let data = if hello.streams > 1 { hello.streams } else { 0 };
        let (streams, requests) =
            self.accept_streams(listener, data, hello.postcopy, hello.session)?;
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
                            Err(e) => Err(ReceiveError::Protocol {
                                context: "setting up a data connection".into(),
                                source: ProtocolError::Io(e),
                            }),
                        };
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
        Ok(())
    }

    /// Accept the `n` data connections of session `session`, and its
    /// post-copy request connection if `request`.
    fn accept_streams(
        &mut self,
        listener: &TcpListener,
        n: u32,
        request: bool,
        session: u64,
    ) -> Result<(Option<Streams>, Option<TcpStream>), ReceiveError> {
        if n == 0 && !request {
            return Ok((None, None));
        }
        self.context = format!(
            "accepting {n} data connections{}",
            if request {
                " and a request connection"
            } else {
                ""
            }
        );
        let mut req: Option<TcpStream> = None;
        let deadline = Instant::now() + STREAMS_TIMEOUT;
        let mut socks: Vec<Option<TcpStream>> = (0..n).map(|_| None).collect();
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
            let mut s = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        let _ = listener.set_nonblocking(false);
                        return Err(ReceiveError::Timeout {
                            context: format!("{left} of {n} data connections never opened"),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                Err(e) => return Err(listen_err(e)),
            };
            s.set_nonblocking(false).map_err(listen_err)?;
            setup(&s)?;
            let Message::StreamHello {
                index,
                session: got,
            } = protocol::read_handshake(&mut s, Kind::StreamHello).map_err(|e| self.err(e))?
            else {
                unreachable!("read_handshake returns the kind asked for")
            };
            if index == protocol::REQUEST_STREAM && request && req.is_none() && got == session {
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
                    return Err(ReceiveError::Invalid(format!(
                        "a data connection claims stream {index} of session {got:#x}; \
                         expected one of {n} streams of session {session:#x}, each once"
                    )))
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

    /// The rounds, then the guest's start here.
    #[allow(clippy::too_many_arguments)]
    fn rounds_and_resume(
        &mut self,
        sock: &mut TcpStream,
        mem: &GuestMemory,
        landed: &Landed,
        guest: &mut Guest,
        limits: &Limits,
        streams: Option<&Streams>,
        requests: &mut Option<TcpStream>,
    ) -> Result<(), ReceiveError> {
        let postcopy = requests.is_some();
        // Post-copy: the pages to fetch, announced before the device state.
        let mut missing = crate::guest::dirty::DirtySet::new(limits.page_count);
        let mut discard = Duration::ZERO;
        let hello_bytes = self.report.memory_bytes;
        let page_size = self.report.page_size;
        // Post-copy: a page left unallocated would fault with nobody to
        // serve it once post-copy is over, so zero pages are written too.
        let mut decoder = Decoder::new(page_size).populating_zeros(postcopy);
        self.context = "waiting for round 0".into();

        // Rounds until the device state arrives.
        let mut round: Option<(u32, u64)> = None; // (round, pages so far)
        let mut next_round = 0u32;
        let mut stop_and_copy = false;
        let state = loop {
            if let Some(st) = streams {
                st.wait_control(sock)?;
            }
            let frame = match self.next(sock, limits) {
                Ok(f) => f,
                // A data connection's failure names the cause better.
                Err(e) => return Err(streams.and_then(Streams::failure).unwrap_or(e)),
            };
            match frame {
                Frame::Message(Message::RoundStart {
                    round: r,
                    stop_and_copy: s,
                }) if round.is_none() && r == next_round && !stop_and_copy => {
                    self.context = format!("round {r}");
                    stop_and_copy = s;
                    round = Some((r, 0));
                }
                ref f @ (Frame::Pages { .. }
                | Frame::ZeroPages { .. }
                | Frame::CompressedPages { .. }
                | Frame::XbzrlePages { .. })
                    if round.is_some() && streams.is_none() =>
                {
                    // SAFETY: the waiting destination guest maps this memory
                    // but touches none of it until it is handed its device
                    // state, after the last page; with one stream nothing
                    // else writes it.
                    let count = unsafe { decoder.receive(sock, f, mem, landed) }
                        .map_err(|e| self.err(e))?;
                    if let Some((_, n)) = &mut round {
                        *n += count;
                    }
                }
                Frame::Message(Message::RoundEnd { round: r, pages: p })
                    if round.map(|x| x.0) == Some(r) =>
                {
                    let mut got = round.take().map_or(0, |x| x.1);
                    if let Some(st) = streams {
                        got = st.end_round(r)?;
                    }
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
                Frame::Message(Message::DeviceState(blob))
                    if round.is_none() && (stop_and_copy || postcopy) =>
                {
                    // No data connection may write memory once the guest runs.
                    if let Some(st) = streams {
                        st.close()?;
                    }
                    break blob;
                }
                Frame::Discard { first_page, count } if round.is_none() && postcopy => {
                    self.context = "post-copy switch".into();
                    // Stale or never sent: drop what is there, so the guest
                    // faults and the page is fetched.
                    let t = Instant::now();
                    mem.discard(first_page, u64::from(count))?;
                    discard += t.elapsed();
                    for p in first_page..first_page + u64::from(count) {
                        missing.set(p);
                    }
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
        let state = DeviceState::from_bytes(&state, hello_bytes, page_size)?;
        if postcopy {
            guest.control().request_postcopy();
        }
        guest.start_incoming(&state);
        guest.wait_running()?;
        let dest = match postcopy {
            true => Some(self.take_faults(guest, limits, &missing)?),
            false => None,
        };
        let resume = t0.elapsed();
        self.report.resume_ms = resume.as_secs_f64() * 1e3;
        self.report.destination_guest_pid = guest.pid();
        let resumed = Message::Resumed {
            resume_ns: u64::try_from(resume.as_nanos()).unwrap_or(u64::MAX),
            pages_received: self.report.pages_received,
        };
        protocol::write_message(sock, &resumed).map_err(|e| self.err(e))?;
        if let (Some(dest), Some(req)) = (dest, requests.take()) {
            self.postcopy_phase(sock, landed, guest, limits, &dest, req)?;
            if let Some(p) = &mut self.report.postcopy {
                p.postcopy_discard_ms = Some(crate::report::ms(discard));
            }
        }
        Ok(())
    }

    /// Take the post-copy guest's userfaultfd: its missing pages fault to us.
    fn take_faults(
        &mut self,
        guest: &mut Guest,
        limits: &Limits,
        missing: &crate::guest::dirty::DirtySet,
    ) -> Result<crate::migration::postcopy::Destination, ReceiveError> {
        let pid = guest.pid();
        let Some(fd) = guest.control().wait_uffd(Duration::from_secs(5)) else {
            guest.check_alive()?;
            return Err(ReceiveError::Invalid(
                "post-copy: the destination guest could not register its memory for missing-page faults".into(),
            ));
        };
        let uffd = crate::guest::uffd::Uffd::take_from(pid, fd)
            .map_err(|e| ReceiveError::Invalid(format!("post-copy: {e}")))?;
        Ok(crate::migration::postcopy::Destination::new(
            uffd,
            guest.mem_addr(),
            limits,
            missing,
            self.prepared.prepage,
        ))
    }

    /// The guest runs; its missing pages arrive by request and by the
    /// source's push. Done when every page is present.
    fn postcopy_phase(
        &mut self,
        sock: &mut TcpStream,
        landed: &Landed,
        guest: &mut Guest,
        limits: &Limits,
        dest: &crate::migration::postcopy::Destination,
        req: TcpStream,
    ) -> Result<(), ReceiveError> {
        self.context = "the source's post-copy push".into();
        let (t0, ops0) = (Instant::now(), guest.ops());
        let io = |e: std::io::Error| ReceiveError::Protocol {
            context: "post-copy: the request connection".into(),
            source: ProtocolError::Io(e),
        };
        let reader = req.try_clone().map_err(io)?;
        let closer = req.try_clone().map_err(io)?;
        dest.wake_on_failure(sock.try_clone().map_err(io)?);
        let result = std::thread::scope(|scope| {
            scope.spawn(|| dest.serve_faults(req));
            scope.spawn(|| dest.serve_replies(reader, limits, landed));
            let r = self.push_phase(sock, landed, limits, dest);
            let populated = t0.elapsed();
            dest.stop();
            // Done: close our side and let the reader drain replies still
            // in flight until the source closes (a reset there would fail a
            // finished migration). Failed: close both at once.
            let how = if r.is_ok() {
                Shutdown::Write
            } else {
                Shutdown::Both
            };
            let _ = closer.shutdown(how);
            r.map(|()| populated)
        });
        let mut stats = dest.stats();
        if let Err(e) = &result {
            // The guest cannot run on without its missing pages.
            self.report.postcopy = Some(stats);
            let why = dest.failure().map_or(String::new(), |f| format!(" ({f})"));
            return Err(ReceiveError::Invalid(format!(
                "post-copy failed with {} pages still missing, so the destination guest cannot continue and is stopped: {}{why}",
                dest.remaining(),
                crate::util::error::error_chain(e),
            )));
        }
        let took = result.expect("failures returned above");
        stats.postcopy_populated_ms = Some(crate::report::ms(took));
        stats.guest_rate_postcopy_pps =
            Some((guest.ops() - ops0) as f64 / took.as_secs_f64().max(1e-9));
        self.report.postcopy = Some(stats);
        Ok(())
    }

    /// The source's push on the control connection: one round of pages,
    /// then wait until every page is present and acknowledge it.
    fn push_phase(
        &mut self,
        sock: &mut TcpStream,
        landed: &Landed,
        limits: &Limits,
        dest: &crate::migration::postcopy::Destination,
    ) -> Result<(), ReceiveError> {
        use crate::migration::postcopy::Path;
        let failed = |why: String| ReceiveError::Invalid(why);
        let mut buf = Vec::new();
        let mut round = None;
        loop {
            if let Some(why) = dest.failure() {
                return Err(failed(why));
            }
            match self.next(sock, limits)? {
                Frame::Message(Message::RoundStart {
                    round: r,
                    stop_and_copy: false,
                }) if round.is_none() => round = Some(r),
                Frame::Pages { first_page, count } if round.is_some() => {
                    buf.resize(count as usize * limits.page_size as usize, 0);
                    protocol::read_bulk(sock, &mut buf, Kind::Pages).map_err(|e| self.err(e))?;
                    dest.place(first_page, &buf, landed, Path::Pushed)
                        .map_err(failed)?;
                }
                Frame::Message(Message::RoundEnd { round: r, .. }) if round == Some(r) => {
                    let deadline = Instant::now() + crate::migration::postcopy::request_timeout();
                    while dest.remaining() > 0 {
                        if let Some(why) = dest.failure() {
                            return Err(failed(why));
                        }
                        if Instant::now() > deadline {
                            return Err(failed(format!(
                                "the push ended with {} pages still missing",
                                dest.remaining()
                            )));
                        }
                        std::thread::sleep(Duration::from_micros(200));
                    }
                    let ack = Message::round_ack(r);
                    protocol::write_message(sock, &ack).map_err(|e| self.err(e))?;
                    return Ok(());
                }
                Frame::Message(Message::Abort(reason)) => {
                    return Err(self.err(ProtocolError::Aborted(reason)))
                }
                other => return Err(self.err(unexpected_frame(&self.context, other))),
            }
        }
    }

    /// Verification, off the downtime path: the source's digests against
    /// those of the pages as they landed.
    fn verify(
        &mut self,
        sock: &mut TcpStream,
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
        Ok(())
    }
}

/// A data connection's thread: decode page runs into memory until the
/// sender closes the connection; report each round's end to the control
/// thread.
fn data_stream(
    mut sock: TcpStream,
    index: usize,
    limits: &Limits,
    mem: &GuestMemory,
    landed: &Landed,
    streams: &Streams,
    postcopy: bool,
) -> Result<(), ReceiveError> {
    let mut decoder = Decoder::new(u64::from(limits.page_size)).populating_zeros(postcopy);
    let mut pages = 0u64;
    let fail = |source: ProtocolError| ReceiveError::Protocol {
        context: format!("data connection {index}"),
        source,
    };
    loop {
        match protocol::read_frame(&mut sock, Some(limits)) {
            Ok(Frame::Message(Message::RoundEnd { round, pages: p })) => {
                if p != pages {
                    return Err(ReceiveError::Invalid(format!(
                        "data connection {index}: round {round}: the sender says it sent {p} pages, {pages} arrived"
                    )));
                }
                streams.progressed();
                let _ = streams.tx.send(Ok((index, round, pages)));
                pages = 0;
            }
            Ok(Frame::Message(Message::Abort(why))) => {
                return Err(fail(ProtocolError::Aborted(why)))
            }
            Ok(f @ Frame::Message(_)) | Ok(f @ Frame::Digests { .. }) => {
                return Err(fail(unexpected_frame("a data connection", f)))
            }
            // SAFETY: within a round the sender sends each page once, on one
            // connection (see Decoder::receive); the guest has not started.
            Ok(f) => {
                pages += unsafe { decoder.receive(&mut sock, &f, mem, landed) }.map_err(fail)?;
                streams.progressed();
            }
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

fn unexpected_frame(context: &str, got: Frame) -> ProtocolError {
    ProtocolError::Unexpected {
        got: got.kind(),
        expected: format!("the next frame of {context}"),
    }
}
