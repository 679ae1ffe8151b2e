//! The sender's connections: connecting, noticing a receiver that gives up,
//! and the data streams that carry page runs (QEMU's multifd): one thread
//! per data connection, each with its own encoder, taking runs from one
//! queue and paced by the one rate limiter.

use std::io::Write;
use std::net::{TcpStream, ToSocketAddrs};

use crate::wire::transport::{Conn, Security, TransportError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use indicatif::ProgressBar;

use crate::guest::dirty::DirtyError;
use crate::guest::dirty::DirtySet;
use crate::guest::memory::GuestMemory;
use crate::guest::memory::MemoryError;
use crate::guest::process::GuestError;
use crate::util::cancel::Cancel;
use crate::util::netio::IO_TIMEOUT;
use crate::wire::datapath::{DataPathError, Reduction};
use crate::wire::datapath::{Encoder, SendStats};
use crate::wire::protocol::InContext;
use crate::wire::protocol::{self, Abort, Frame, Message, ProtocolError};
use crate::wire::ratelimit::RateLimiter;

/// Errors of the sending side.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("--cpu-cap")]
    CpuCap(#[source] crate::guest::cpucap::CapError),
    #[error("cannot connect to {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("securing the connection to {addr}")]
    Transport {
        addr: String,
        #[source]
        source: TransportError,
    },
    #[error(transparent)]
    Protocol(#[from] InContext),
    #[error("receiver refused the migration: {}", if .0.is_empty() { "(it gave no reason)" } else { .0 })]
    Refused(String),
    #[error("no answer from the receiver for {secs} s ({context})")]
    Timeout { context: String, secs: u64 },
    #[error("{count} mismatched pages after migration{}", first.map(|p| format!(" (first: page {p})")).unwrap_or_default())]
    Mismatch { count: u64, first: Option<u64> },
    #[error("the receiver compared only {compared} of {pages} pages")]
    Unverified { compared: u64, pages: u64 },
    #[error(transparent)]
    Guest(#[from] GuestError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Dirty(#[from] DirtyError),
    #[error(transparent)]
    DataPath(#[from] DataPathError),
    #[error("{0}")]
    Config(String),
    #[error("page-cache teleportation")]
    Teleport(#[from] crate::migration::teleport::TeleportError),
    /// Asked to stop (SIGINT, SIGTERM); `kept` says where the guest runs on.
    #[error("migration cancelled by {why} during {during}; {kept}")]
    Cancelled {
        why: crate::util::cancel::Why,
        during: String,
        kept: &'static str,
    },
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) fn proto(context: impl Into<String>) -> impl FnOnce(ProtocolError) -> SendError {
    proto_waited(context, IO_TIMEOUT)
}

/// [`proto`] for a read that waited up to `waited`, not [`IO_TIMEOUT`].
pub(crate) fn proto_waited(
    context: impl Into<String>,
    waited: Duration,
) -> impl FnOnce(ProtocolError) -> SendError {
    let context = context.into();
    move |source| match source {
        ProtocolError::Aborted(reason) => SendError::Refused(reason),
        ProtocolError::Io(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            SendError::Timeout {
                context,
                secs: waited.as_secs(),
            }
        }
        source => SendError::Protocol(InContext { context, source }),
    }
}

/// What a data connection's thread reports when it ended a round.
type LaneReport = Result<(u64, u64, SendStats), std::io::Error>;

/// Where page runs go: the control connection itself (one stream), or
/// data connections, each with a thread that encodes and writes the runs it
/// takes from a shared queue (QEMU's multifd), paced by the one limiter.
pub(crate) enum Lanes {
    One(Box<Lane>),
    Many {
        runs: Sender<(u64, u64)>,
        ends: Vec<Sender<u32>>,
        done: Receiver<(usize, LaneReport)>,
        threads: Vec<JoinHandle<()>>,
    },
}

impl Lanes {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn open(
        security: &Security,
        streams: u32,
        reduction: Reduction,
        addr: &str,
        session: u64,
        mem: &Arc<GuestMemory>,
        limiter: &RateLimiter,
        progress: &ProgressBar,
    ) -> Result<Lanes, SendError> {
        let lane = |sock| -> Result<Lane, SendError> {
            Ok(Lane {
                sock,
                encoder: Encoder::new(reduction, mem.page_size())?,
                mem: Arc::clone(mem),
                limiter: limiter.clone(),
                progress: progress.clone(),
                pages: 0,
                bytes: 0,
                failed: None,
            })
        };
        if streams <= 1 {
            return Ok(Lanes::One(Box::new(lane(None)?)));
        }
        if reduction.xbzrle_cache.is_some() {
            // Runs go to whichever stream is free: a stream's cache would
            // not hold the version the receiver has.
            return Err(SendError::Config(
                "XBZRLE works on one stream: its cache must see every send of a page in order"
                    .into(),
            ));
        }
        let n = streams as usize;
        let (runs, queue) = crossbeam_channel::bounded::<(u64, u64)>(2 * n);
        let (done_tx, done) = crossbeam_channel::unbounded();
        let (mut ends, mut threads) = (Vec::new(), Vec::new());
        for index in 0..n {
            let mut sock = connect(addr, security, index as u32, session)?;
            protocol::write_message(&mut sock, &Message::stream_hello(index as u32, session))
                .map_err(proto(format!("opening data connection {index} to {addr}")))?;
            let (end_tx, end_rx) = crossbeam_channel::unbounded();
            ends.push(end_tx);
            let lane = lane(Some(sock))?;
            let (queue, done_tx) = (queue.clone(), done_tx.clone());
            threads.push(std::thread::spawn(move || {
                lane.run(index, &queue, &end_rx, &done_tx)
            }));
        }
        Ok(Lanes::Many {
            runs,
            ends,
            done,
            threads,
        })
    }

    /// Send the pages of `set` in runs of at most `chunk` pages, starting
    /// at page `pass.from` and wrapping around, adding each data
    /// connection's pages to `per_stream`. Before each run `pass.stop`
    /// is asked, with the pages handed out so far, whether to end the
    /// round there (QEMU's sync); [`Sent::stopped_at`] then says where.
    /// A cancel stops the round between runs.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn send(
        &mut self,
        sock: &mut Conn,
        round: u32,
        set: &DirtySet,
        chunk: u64,
        pass: Pass<'_>,
        ctx: &str,
        per_stream: &mut Vec<u64>,
        cancel: &Cancel,
    ) -> Result<Sent, SendError> {
        let Pass { from, stop } = pass;
        let mut stopped_at = None;
        let mut handed = 0u64;
        let mut runs = set.runs_from(from, chunk).take_while(|&(first, count)| {
            if stop(handed) {
                stopped_at = Some(first);
                return false;
            }
            handed += count;
            true
        });
        let mem_err = |sock: &mut Conn, e: std::io::Error| {
            peer_error(sock, ctx).unwrap_or_else(|| proto(ctx)(ProtocolError::Io(e)))
        };
        let cancelled = || -> Result<(), SendError> {
            match cancel.why() {
                Some(why) => Err(SendError::Cancelled {
                    why,
                    during: ctx.into(),
                    kept: "",
                }),
                None => Ok(()),
            }
        };
        match self {
            Lanes::One(lane) => {
                lane.encoder.start_round(round);
                for run in runs.by_ref() {
                    cancelled()?;
                    if let Err(e) = lane.send(sock, run) {
                        return Err(mem_err(sock, e));
                    }
                    if let Some(e) = peer_error(sock, ctx) {
                        return Err(e);
                    }
                }
                let (pages, bytes) = (lane.pages, lane.bytes);
                (lane.pages, lane.bytes) = (0, 0);
                drop(runs);
                Ok(Sent {
                    pages,
                    bytes,
                    forms: std::mem::take(&mut lane.encoder.stats),
                    stopped_at,
                })
            }
            Lanes::Many {
                runs: queue,
                ends,
                done,
                ..
            } => {
                for run in runs.by_ref() {
                    cancelled()?;
                    if queue.send(run).is_err() {
                        break; // every thread is gone: its report says why
                    }
                    if let Some(e) = peer_error(sock, ctx) {
                        return Err(e);
                    }
                }
                for end in ends.iter() {
                    let _ = end.send(round);
                }
                let (mut pages, mut bytes, mut forms) = (0, 0, SendStats::default());
                for _ in 0..ends.len() {
                    // A lane ends its round within its socket timeout.
                    match done.recv_timeout(IO_TIMEOUT + Duration::from_secs(5)) {
                        Ok((index, Ok((p, b, f)))) => {
                            per_stream.resize(per_stream.len().max(ends.len()), 0);
                            per_stream[index] += p;
                            pages += p;
                            bytes += b;
                            forms += f;
                        }
                        Ok((index, Err(e))) => {
                            // A receiver that gave up closes the data
                            // connections and says why on the control one.
                            let ctx = format!("{ctx} on data connection {index}");
                            return Err(peer_reason(sock, Duration::from_secs(2))
                                .unwrap_or_else(|| proto(ctx)(ProtocolError::Io(e))));
                        }
                        Err(_) => {
                            return Err(SendError::Config(format!(
                                "{ctx}: a data connection's thread stopped answering"
                            )))
                        }
                    }
                }
                drop(runs);
                Ok(Sent {
                    pages,
                    bytes,
                    forms,
                    stopped_at,
                })
            }
        }
    }
}

/// Where a round's pass over its pages starts, and what ends it early.
pub(crate) struct Pass<'a> {
    pub from: u64,
    /// Asked before each run with the pages handed out so far: end here?
    pub stop: &'a mut dyn FnMut(u64) -> bool,
}

/// What a round sent.
pub(crate) struct Sent {
    pub pages: u64,
    /// Bytes on the data connections.
    pub bytes: u64,
    pub forms: SendStats,
    /// The page the round stopped at, unsent (None: every page went).
    pub stopped_at: Option<u64>,
}

impl Drop for Lanes {
    fn drop(&mut self) {
        if let Lanes::Many { ends, threads, .. } = self {
            // Closing the queues ends the threads, which close their connections.
            ends.clear();
            for t in threads.drain(..) {
                let _ = t.join();
            }
        }
    }
}

/// One stream's sending state: its encoder, and this round's figures.
pub(crate) struct Lane {
    /// A data connection (None: the control connection, passed in).
    sock: Option<Conn>,
    encoder: Encoder,
    mem: Arc<GuestMemory>,
    limiter: RateLimiter,
    progress: ProgressBar,
    pages: u64,
    bytes: u64,
    /// A write failed: later runs of the round are dropped.
    failed: Option<std::io::Error>,
}

impl Lane {
    fn send(&mut self, w: &mut impl Write, (first, count): (u64, u64)) -> std::io::Result<()> {
        let b = self
            .encoder
            .send_run(w, &self.mem, first, count, &self.limiter)?;
        self.bytes += b;
        self.pages += count;
        self.progress.inc(count);
        Ok(())
    }

    /// A data connection's run; failures are kept for the round's end.
    fn take(&mut self, run: (u64, u64)) {
        if self.failed.is_none() {
            let mut sock = self.sock.take().expect("a data connection");
            if let Err(e) = self.send(&mut sock, run) {
                self.failed = Some(e);
            }
            self.sock = Some(sock);
        }
    }

    /// End round `round` on the data connection: its RoundEnd, then the
    /// round's figures (or failure) for the sender.
    fn end(&mut self, round: u32) -> LaneReport {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        let end = Message::round_end(round, self.pages);
        let sock = self.sock.as_mut().expect("a data connection");
        let n = protocol::write_message(sock, &end).map_err(|e| match e {
            ProtocolError::Io(e) => e,
            e => std::io::Error::other(e.to_string()),
        })?;
        let report = (
            self.pages,
            self.bytes + n as u64,
            std::mem::take(&mut self.encoder.stats),
        );
        (self.pages, self.bytes) = (0, 0);
        Ok(report)
    }

    /// A data connection's thread: runs from the shared queue until the
    /// sender drops it.
    fn run(
        mut self,
        index: usize,
        queue: &Receiver<(u64, u64)>,
        ends: &Receiver<u32>,
        done: &Sender<(usize, LaneReport)>,
    ) {
        loop {
            crossbeam_channel::select! {
                recv(queue) -> run => match run {
                    Ok(run) => self.take(run),
                    Err(_) => return,
                },
                recv(ends) -> end => {
                    let Ok(round) = end else { return };
                    // Every run of the round was queued before its end:
                    // take what is left, so none is sent after it.
                    while let Ok(run) = queue.try_recv() {
                        self.take(run);
                    }
                    if done.send((index, self.end(round))).is_err() {
                        return;
                    }
                }
            }
        }
    }
}

/// Connect to `addr` and open connection `conn` of `session` as
/// `security` says (a TLS handshake, the PSK exchange, or nothing).
pub(crate) fn connect(
    addr: &str,
    security: &Security,
    conn: u32,
    session: u64,
) -> Result<Conn, SendError> {
    let sock = connect_tcp(addr)?;
    security
        .client(sock, addr, conn, session)
        .map_err(|source| match source {
            TransportError::Aborted { reason, .. } => SendError::Refused(reason),
            source => SendError::Transport {
                addr: addr.into(),
                source,
            },
        })
}

fn connect_tcp(addr: &str) -> Result<TcpStream, SendError> {
    let err = |source| SendError::Connect {
        addr: addr.into(),
        source,
    };
    let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "address resolves to nothing");
    for a in addr.to_socket_addrs().map_err(err)? {
        match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
            Ok(s) => {
                s.set_nodelay(true).map_err(err)?;
                s.set_read_timeout(Some(IO_TIMEOUT)).map_err(err)?;
                s.set_write_timeout(Some(IO_TIMEOUT)).map_err(err)?;
                return Ok(s);
            }
            Err(e) => last = e,
        }
    }
    Err(err(last))
}

/// The receiver's reason for giving up, if it sends one within `wait`.
pub(crate) fn peer_reason(sock: &mut Conn, wait: Duration) -> Option<SendError> {
    let _ = sock.set_read_timeout(Some(wait));
    let reason = match protocol::read_frame(sock, None) {
        Ok(Frame::Message(Message::Abort(Abort(reason)))) => Some(SendError::Refused(reason)),
        _ => None,
    };
    let _ = sock.set_read_timeout(Some(IO_TIMEOUT));
    reason
}

/// The receiver speaks during rounds only to give up (Abort) or by closing.
/// One non-blocking peek per chunk notices either without waiting.
pub(crate) fn peer_error(sock: &mut Conn, context: &str) -> Option<SendError> {
    match sock.ready() {
        Ok(false) => None,
        _ => Some(match protocol::read_frame(sock, None) {
            Ok(Frame::Message(Message::Abort(Abort(reason)))) => SendError::Refused(reason),
            Ok(other) => proto(context)(ProtocolError::Unexpected {
                got: other.kind(),
                expected: "nothing from the receiver during a round".into(),
            }),
            Err(e) => proto(context)(e),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_and_a_silent_receiver_say_what_happened() {
        let empty = SendError::Refused(String::new()).to_string();
        assert_eq!(empty, "receiver refused the migration: (it gave no reason)");
        let silent = proto("handshake with h:1")(ProtocolError::Io(std::io::Error::from(
            std::io::ErrorKind::WouldBlock,
        )));
        assert_eq!(
            silent.to_string(),
            "no answer from the receiver for 30 s (handshake with h:1)"
        );
    }
}
