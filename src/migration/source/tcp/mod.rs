//! The real migration as a backend of the state machine
//! ([`crate::migration::machine`]): the guest process, its memory and
//! tracker on this side, TCP to the destination.

use std::io::{IoSlice, Write};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::ProgressBar;

use super::streams::{connect, peer_reason, proto, proto_waited, Lanes, Pass};
use super::teleport::Teleport;
use super::{progress_bar, src_resume, SendError, SenderConfig, Source};
use crate::guest::control::Throttle;
use crate::guest::dirty::DirtySet;
use crate::guest::memory::work_allowance;
use crate::guest::process::DeviceState;
use crate::migration::cancel;
use crate::migration::gauge;
use crate::migration::iteration::Iteration;
use crate::migration::machine::{Backend, Round};
use crate::migration::phases::SourcePhase;
use crate::migration::policy::RoundFigures;
use crate::migration::postcopy;
use crate::migration::sampler::Probe;
use crate::report::timeline::Phase;
use crate::report::{ms, DowntimeSleeps, Report, RoundReport};
use crate::util::cancel::Why;
use crate::util::netio::{write_all_vectored, IO_TIMEOUT};
use crate::util::process::thread_sleeps;
use crate::wire::protocol::{
    self, HelloAck, Kind, Limits, Message, ProtocolError, Resumed, RoundAck, Verdict, MAX_DIGESTS,
};
use crate::wire::ratelimit::RateLimiter;
use crate::wire::transport::Conn;

mod send;

/// The connections of a migration under way.
struct Connections {
    /// The control connection (and the pages' too with one stream).
    control: Conn,
    /// Where page runs go; closed once the last page is out.
    lanes: Option<Lanes>,
    /// Post-copy: the connection the destination asks for pages on.
    requests: Option<Conn>,
    limits: Limits,
}

/// The moments the downtime is made of, from the pause request on.
#[derive(Clone, Copy, Default)]
struct Downtime {
    pause: Option<Instant>,
    paused: Option<Instant>,
    harvested: Option<Instant>,
    sent: Option<Instant>,
    /// This thread's sleeps at the pause, paused, harvested and sent.
    sleeps: [u64; 4],
}

/// The real migration: a guest process, its memory and tracker, and TCP.
pub(super) struct Tcp<'a> {
    cfg: &'a SenderConfig,
    pub(super) src: &'a mut Source,
    addr: &'a str,
    on_round: &'a mut dyn FnMut(&RoundReport),
    pub(super) progress: ProgressBar,
    /// Migration start (after warm-up), once reached.
    pub(super) start: Option<Instant>,
    conn: Option<Connections>,
    limiter: RateLimiter,
    /// The pages the next round sends, and those dirtied during this one.
    todo: DirtySet,
    dirty: DirtySet,
    /// Where the next pre-copy round's pass starts (`qemu` goes on where
    /// the last sync cut a round short).
    cursor: u64,
    /// The guest's operation count when pre-copy started, and when.
    precopy_ops: Option<(Instant, u64)>,
    /// The guest's use when it was paused (see [`super::usage`]).
    pub(super) at_pause: Option<super::usage::Sample>,
    downtime: Downtime,
    /// The destination confirmed its guest runs: the source must not resume.
    resumed_at_destination: bool,
    /// The final harvest's time (the post-copy push's row shows it).
    last_harvest: Duration,
    /// The phase a cancel ended the migration in.
    pub(super) cancelled_in: Option<SourcePhase>,
    /// The stop-and-copy round's `RoundEnd`, written with the device state
    /// in one write: the receiver reads both on one wake-up.
    pending_end: Vec<u8>,
    /// The timeline's probe, told of every change of phase.
    probe: Option<Arc<Probe>>,
    /// Page-cache teleportation, once offered.
    pub(super) teleport: Option<Teleport>,
}

impl<'a> Tcp<'a> {
    pub(super) fn new(
        cfg: &'a SenderConfig,
        src: &'a mut Source,
        addr: &'a str,
        on_round: &'a mut dyn FnMut(&RoundReport),
        probe: Option<Arc<Probe>>,
    ) -> Self {
        let limiter = RateLimiter::new(cfg.bandwidth.initial_limit());
        limiter.set_cancel(Some(cfg.cancel.clone()));
        let progress = progress_bar(cfg.progress);
        if let Some(p) = &probe {
            p.attach_sender(&progress, &limiter);
        }
        Tcp {
            cfg,
            src,
            addr,
            on_round,
            progress,
            start: None,
            conn: None,
            limiter,
            todo: DirtySet::new(0),
            dirty: DirtySet::new(0),
            cursor: 0,
            precopy_ops: None,
            at_pause: None,
            downtime: Downtime::default(),
            resumed_at_destination: false,
            last_harvest: Duration::ZERO,
            cancelled_in: None,
            teleport: None,
            pending_end: Vec::new(),
            probe,
        }
    }

    /// Tell the timeline's probe of a change of phase.
    fn phase(&self, phase: Phase, round: Option<u32>) {
        if let Some(p) = &self.probe {
            p.phase(phase, round);
        }
    }

    fn conn(&mut self) -> &mut Connections {
        self.conn.as_mut().expect("connected in setup")
    }

    /// Harvest through the source, counting the harvest and its time.
    fn harvest(&mut self, paused: bool, report: &mut Report) -> Result<Duration, SendError> {
        let into = if paused {
            &mut self.todo
        } else {
            &mut self.dirty
        };
        let took = self.src.harvest(into, paused)?;
        report.dirty_sync_count += 1;
        report.harvest_total_ms += ms(took);
        report.harvest_max_ms = report.harvest_max_ms.max(ms(took));
        Ok(took)
    }
}

impl Backend for Tcp<'_> {
    type Error = SendError;

    fn elapsed(&self) -> Duration {
        self.start.map_or(Duration::ZERO, |s| s.elapsed())
    }

    fn setup(&mut self, report: &mut Report) -> Result<(), SendError> {
        let (cfg, addr, page_size) = (self.cfg, self.addr, self.src.mem.page_size());
        report.guest_dirty_rate_pps = self.src.guest.measure_rate(cfg.warmup)?;
        if let Some(p) = &self.probe {
            p.start();
        }

        let start = *self.start.insert(Instant::now());
        // Ties the data connections to this migration.
        let session =
            xxhash_rust::xxh3::xxh3_64(format!("{:?} {}", start, std::process::id()).as_bytes());
        let security = &cfg.security;
        let mut sock = connect(addr, security, protocol::CONTROL_STREAM, session)?;
        let mut hello =
            Message::hello(page_size.as_u32(), self.src.mem.len(), cfg.streams, session);
        if let Message::Hello(h) = &mut hello {
            h.postcopy = cfg.mode.is_postcopy();
        }
        protocol::write_message(&mut sock, &hello)
            .map_err(proto(format!("sending the handshake to {addr}")))?;
        // A receiver not told the size beforehand makes (and preallocates)
        // the guest's memory now: the wait grows with it.
        let wait = IO_TIMEOUT + work_allowance(self.src.mem.len());
        let io = |e| proto(format!("setting up the connection to {addr}"))(ProtocolError::Io(e));
        sock.set_read_timeout(Some(wait)).map_err(io)?;
        protocol::read_handshake::<HelloAck>(&mut sock)
            .map_err(proto_waited(format!("handshake with {addr}"), wait))?;
        sock.set_read_timeout(Some(IO_TIMEOUT)).map_err(io)?;
        if let (Some(tc), Some(map)) = (&cfg.teleport, &self.src.cache_map) {
            let pages = self.src.mem.page_count();
            let tp = Teleport::offer(tc, map.clone(), &mut sock, page_size, pages)?;
            self.teleport = Some(tp);
        }
        let lanes = Lanes::open(
            security,
            cfg.streams,
            cfg.reduction,
            addr,
            session,
            &self.src.mem,
            &self.limiter,
            &self.progress,
        )?;
        let requests = match cfg.mode.is_postcopy() {
            true => {
                let mut conn = connect(addr, security, protocol::REQUEST_STREAM, session)?;
                let hello = Message::stream_hello(protocol::REQUEST_STREAM, session);
                protocol::write_message(&mut conn, &hello)
                    .map_err(proto(format!("opening the request connection to {addr}")))?;
                Some(conn)
            }
            false => None,
        };
        let pages = self.src.mem.page_count();
        self.conn = Some(Connections {
            control: sock,
            lanes: Some(lanes),
            requests,
            limits: Limits {
                streams: cfg.streams,
                page_size: page_size.as_u32(),
                page_count: pages,
            },
        });
        report.setup_time_ms = ms(start.elapsed());

        // Start tracking afresh: round 0 (or the switch-over) sends everything.
        self.dirty = DirtySet::new(pages);
        self.harvest(false, report)?;
        if let Some(tp) = self.teleport.as_mut().filter(|t| t.accepted()) {
            let file = tp.file.clone();
            tp.choose_candidates(&self.src.mem, &file)?;
        }
        self.todo = DirtySet::all(pages);
        self.precopy_ops = Some((Instant::now(), self.src.guest.ops()));
        Ok(())
    }

    fn precopy_round(
        &mut self,
        round: u32,
        limit: Option<u64>,
        mut iteration: Option<&mut Iteration>,
        report: &mut Report,
    ) -> Result<Round, SendError> {
        self.limiter.set_limit(limit);
        self.phase(Phase::Precopy, Some(round));
        let t0 = Instant::now();
        let (ops0, throttled0) = (self.src.guest.ops(), self.src.guest.throttled());
        let cpu0 = (round == 0).then(crate::guest::process::own_cpu_time);
        // QEMU's migration thread: tick the bandwidth periods with the
        // bytes booked on the wire, and sync once the pending estimate
        // (this round's pages not handed out yet) is below the threshold.
        let (start, limiter) = (self.start.expect("started"), self.limiter.clone());
        let (page, total) = (self.src.mem.page_size().as_u64(), self.todo.count());
        let mut booked = limiter.bytes_through();
        let mut stop = |handed: u64| {
            let Some(it) = iteration.as_deref_mut() else {
                return false;
            };
            let now = limiter.bytes_through();
            it.tick(start.elapsed(), now - booked);
            booked = now;
            it.wants_sync(total.saturating_sub(handed).saturating_mul(page))
        };
        let from = self.cursor;
        let pass = Pass {
            from,
            stop: &mut stop,
        };
        let (pages, bytes, stopped_at) = self.send_round(round, false, pass, report)?;
        if let Some(cpu0) = cpu0 {
            report.sender_round0_cpu_ms = Some(ms(
                crate::guest::process::own_cpu_time().saturating_sub(cpu0)
            ));
        }
        // The pages sent leave the set; those not sent stay pending, and
        // the next round goes on from where this one stopped.
        match stopped_at {
            Some(at) => {
                self.todo.clear_wrapping(from, at);
                self.cursor = at;
            }
            None => self.todo.clear(),
        }
        let carried = self.todo.count();
        self.dirty.clear();
        let harvest = self.harvest(false, report)?;
        let dirty_pages = self.dirty.count();
        if let Some(p) = &self.probe {
            p.harvested(dirty_pages);
        }
        self.dirty.union(&self.todo);
        let guest_ops = self.src.guest.ops().saturating_sub(ops0);
        let throttled = self.src.guest.throttled().saturating_sub(throttled0);
        // A dead guest writes nothing: no point iterating over it.
        self.src.guest.check_alive()?;
        let figures = RoundFigures {
            round,
            pages,
            bytes,
            duration: t0.elapsed(),
            dirty_pages,
            rate_limit: limit,
            carried_pages: carried,
            pending: (carried > 0).then(|| self.dirty.count()),
            ..RoundFigures::default()
        };
        // The live view: the dirty set against the policy's threshold.
        let page_size = self.src.mem.page_size();
        let gauge = gauge::line(
            &self.cfg.policy_config(page_size),
            &figures,
            self.src.mem.page_count(),
        );
        self.progress.set_prefix(gauge);
        std::mem::swap(&mut self.todo, &mut self.dirty);
        Ok(Round {
            guest_ops: Some(guest_ops),
            throttled,
            ..Round::new(figures, harvest)
        })
    }

    fn switchover(
        &mut self,
        round: u32,
        limit: Option<u64>,
        postcopy: bool,
        report: &mut Report,
    ) -> Result<Option<Round>, SendError> {
        // Stop-and-copy at the highest rate allowed (Clark et al.: the final
        // phase runs at max). The downtime starts now.
        self.limiter.set_limit(limit);
        if let Some((t, ops)) = self.precopy_ops.filter(|_| round > 0) {
            report.guest_rate_precopy_pps =
                Some((self.src.guest.ops() - ops) as f64 / t.elapsed().as_secs_f64());
        }
        if let Some(tp) = self.teleport.as_mut().filter(|t| t.accepted()) {
            let sock = &mut self.conn.as_mut().expect("connected in setup").control;
            tp.sync(sock)?;
        }
        if !postcopy {
            // Announced before the pause: the receiver has nothing to do
            // until pages come.
            let sock = &mut self.conn().control;
            protocol::write_message(sock, &Message::round_start(round, true))
                .map_err(proto(format!("sending round {round}")))?;
        }
        self.at_pause = Some(super::usage::Sample::now(&self.src.guest));
        self.downtime.sleeps[0] = thread_sleeps();
        self.phase(Phase::Downtime, None);
        self.downtime.pause = Some(Instant::now());
        self.src.guest.pause()?;
        self.downtime.paused = Some(Instant::now());
        self.downtime.sleeps[1] = thread_sleeps();
        self.last_harvest = self.harvest(true, report)?;
        let harvested = Instant::now();
        self.downtime.harvested = Some(harvested);
        self.downtime.sleeps[2] = thread_sleeps();
        if postcopy {
            // The pre-copy rounds are over: close their data connections.
            self.conn().lanes = None;
            self.announce_missing(report)?;
            // The pages to fetch (Discard runs) count as the last pages.
            self.downtime.sent = Some(Instant::now());
            self.downtime.sleeps[3] = thread_sleeps();
            return Ok(None);
        }
        let pass = Pass {
            from: 0,
            stop: &mut |_| false,
        };
        let (pages, bytes, _) = self.send_round(round, true, pass, report)?;
        let sent = Instant::now();
        self.downtime.sent = Some(sent);
        self.downtime.sleeps[3] = thread_sleeps();
        // Every page is out: close the data connections.
        self.conn().lanes = None;
        let figures = RoundFigures {
            round,
            pages,
            bytes,
            duration: sent - harvested,
            rate_limit: limit,
            ..RoundFigures::default()
        };
        Ok(Some(Round::new(figures, self.last_harvest)))
    }

    fn hand_over(&mut self, report: &mut Report) -> Result<(), SendError> {
        let state = DeviceState {
            workload: self.cfg.workload.clone(),
            memory_bytes: self.src.mem.len(),
            page_size: self.src.mem.page_size().as_u64(),
            vcpus: self.src.guest.vcpu_states(),
        };
        let mut frames = std::mem::take(&mut self.pending_end);
        report.transferred_bytes +=
            protocol::write_message(&mut frames, &Message::device_state(state.to_bytes()))
                .map_err(proto("sending the device state"))? as u64;
        let sock = &mut self.conn.as_mut().expect("connected in setup").control;
        sock.write_all(&frames)
            .map_err(|e| proto("sending the device state")(ProtocolError::Io(e)))?;
        // Post-copy: the destination discards the pages it lacks first,
        // work that grows with memory.
        let wait = IO_TIMEOUT + work_allowance(self.src.mem.len());
        let ctx = "waiting for the destination to resume";
        let io = |e| proto(ctx)(ProtocolError::Io(e));
        sock.set_read_timeout(Some(wait)).map_err(io)?;
        let Resumed { resume_ns, .. } =
            protocol::expect_message(sock, None).map_err(proto_waited(ctx, wait))?;
        sock.set_read_timeout(Some(IO_TIMEOUT)).map_err(io)?;
        let t_resumed = Instant::now();
        let sleeps = thread_sleeps();
        self.resumed_at_destination = true;
        // The source guest stopped meanwhile (the pause did not wait for
        // it); a guest that died instead is past mattering: it runs there.
        let _ = self.src.guest.confirm_stopped();
        self.phase(
            match self.cfg.mode.is_postcopy() {
                true => Phase::Postcopy,
                false => Phase::Verify,
            },
            None,
        );
        let d = self.downtime;
        let at = |t: Option<Instant>| t.expect("set in the switch-over");
        let (t_pause, t_sent) = (at(d.pause), at(d.sent));
        // The peer's figure, bounded by what this side waited.
        let resume = Duration::from_nanos(resume_ns).min(t_resumed - t_sent);
        report.downtime_ms = Some(ms(t_resumed - t_pause));
        let b = &mut report.downtime_breakdown_ms;
        b.pause = ms(at(d.paused) - t_pause);
        b.final_harvest = ms(at(d.harvested) - at(d.paused));
        b.last_pages = ms(t_sent - at(d.harvested));
        b.resume = ms(resume);
        b.device_state = ms((t_resumed - t_sent) - resume);
        let s = d.sleeps;
        report.downtime_sleeps = Some(DowntimeSleeps {
            pause: s[1].saturating_sub(s[0]),
            final_harvest: s[2].saturating_sub(s[1]),
            last_pages: s[3].saturating_sub(s[2]),
            device_state_and_resume: sleeps.saturating_sub(s[3]),
        });
        if !self.cfg.mode.is_postcopy() {
            report.migration_time_ms = Some(ms(t_resumed - self.start.expect("started")));
            let f = &report.forms;
            if f.compressed_bytes > 0 {
                let raw = self.src.mem.page_size().bytes(f.compressed_pages);
                report.compression_ratio = Some(raw as f64 / f.compressed_bytes as f64);
            }
        }
        Ok(())
    }

    fn postcopy(
        &mut self,
        round: u32,
        limit: Option<u64>,
        report: &mut Report,
    ) -> Result<Round, SendError> {
        // Serve requests on their own connection while pushing the rest here.
        self.limiter.set_limit(limit);
        // The destination needs every page it lacks: a cancel waits for the
        // push to end, paced as before.
        self.limiter.set_cancel(None);
        let t0 = Instant::now();
        let limits = self.conn().limits;
        let server = postcopy::Server::new(limits.page_count);
        let conn = self.conn().requests.take().expect("opened in setup");
        let closer = conn
            .try_clone()
            .map_err(|e| proto("serving page requests")(ProtocolError::Io(e)))?;
        let mem = Arc::clone(&self.src.mem);
        let limiter = self.limiter.clone();
        let control = self
            .conn()
            .control
            .try_clone()
            .map_err(|e| proto("serving page requests")(ProtocolError::Io(e)))?;
        // A request that breaks the protocol (not a connection that ends)
        // is the destination's fault: stop the push too, and name it.
        let broken = |e: &ProtocolError| !matches!(e, ProtocolError::Io(_) | ProtocolError::Closed);
        let pushed = std::thread::scope(|scope| {
            let serving = scope.spawn(|| {
                let served = server.serve(conn, &mem, &limits, &limiter);
                if served.as_ref().is_err_and(broken) {
                    let _ = control.shutdown(std::net::Shutdown::Both);
                }
                served
            });
            // The destination closes the request connection once it has
            // every page; on a failure here, do not wait for that.
            let pushed = match self.push(round, &server) {
                Ok(pushed) => pushed,
                Err(e) => {
                    let _ = closer.shutdown(std::net::Shutdown::Both);
                    return Err(match serving.join() {
                        Ok(Err(bad)) if broken(&bad) => proto("serving page requests")(bad),
                        _ => e,
                    });
                }
            };
            // Every page is present (acknowledged): how the request
            // connection ends no longer matters.
            let _ = serving.join();
            // The clone kept the connection open: close it, so the
            // destination's reader sees the end.
            let _ = closer.shutdown(std::net::Shutdown::Both);
            Ok::<_, SendError>(pushed)
        });
        let (pages, bytes) = pushed?;
        let p = &mut report.postcopy;
        p.pages_pushed = pages;
        p.postcopy_requests = server.requests.load(Ordering::Relaxed);
        p.pages_pulled = server.pulled.load(Ordering::Relaxed);
        report.transferred_pages += p.pages_pulled;
        report.transferred_bytes += server.bytes.load(Ordering::Relaxed);
        report.migration_time_ms = Some(ms(self.elapsed()));
        self.phase(Phase::Verify, None);
        let figures = RoundFigures {
            round,
            pages,
            bytes,
            duration: t0.elapsed(),
            rate_limit: limit,
            ..RoundFigures::default()
        };
        Ok(Round::new(figures, self.last_harvest))
    }

    /// Send the paused source's page digests; read the receiver's verdict.
    fn verify(&mut self, report: &mut Report) -> Result<(), SendError> {
        self.progress.set_message("verifying");
        let pages = self.src.mem.page_count();
        let conn = self.conn.as_mut().expect("connected in setup");
        let (sock, limits) = (&mut conn.control, conn.limits);
        let mut hashes = Vec::with_capacity(MAX_DIGESTS as usize * 8);
        let mut first = 0;
        while first < pages {
            let count = (pages - first).min(u64::from(MAX_DIGESTS));
            hashes.clear();
            for p in first..first + count {
                // SAFETY: the source guest is paused (SIGSTOP): nothing writes.
                hashes.extend_from_slice(&unsafe { self.src.mem.page_hash(p) }.to_le_bytes());
            }
            let header = protocol::digests_frame_header(first, count as u32);
            write_all_vectored(sock, &mut [IoSlice::new(&header), IoSlice::new(&hashes)])
                .map_err(|e| proto("sending page digests")(ProtocolError::Io(e)))?;
            first += count;
        }
        protocol::write_message(sock, &Message::complete())
            .map_err(proto("sending page digests"))?;
        let Verdict {
            verified_pages,
            mismatched_pages,
            first_mismatch,
        } = protocol::expect_message(sock, Some(&limits))
            .map_err(proto("waiting for the verdict"))?;
        report.verified_pages = verified_pages;
        report.mismatched_pages = mismatched_pages;
        // Every page must have been compared (the protocol checked the sum fits).
        let compared = verified_pages + mismatched_pages;
        if compared != limits.page_count {
            return Err(SendError::Unverified {
                compared,
                pages: limits.page_count,
            });
        }
        if mismatched_pages > 0 {
            return Err(SendError::Mismatch {
                count: mismatched_pages,
                first: first_mismatch,
            });
        }
        Ok(())
    }

    /// Every livemig guest obeys at its vCPUs' safe points.
    fn throttle(&mut self, t: Throttle) -> Result<(), SendError> {
        self.src.guest.control().set_throttle(t);
        Ok(())
    }

    fn on_round(&mut self, row: &RoundReport) {
        let on_round = &mut self.on_round;
        self.progress.suspend(|| on_round(row));
    }

    fn on_failure(&mut self, _phase: SourcePhase, report: &mut Report) {
        // Pre-copy never loses the source.
        if !self.resumed_at_destination {
            report.source_guest_kept_running = src_resume(self.src).unwrap_or(false);
        }
    }

    fn cancelled(&self) -> bool {
        self.cfg.cancel.is_cancelled()
    }

    /// Tell the receiver first (and wait briefly for it to take it in, so
    /// closing the data connections cannot race the reason), then close
    /// every connection, then resume the source guest unless the
    /// destination runs it.
    fn on_cancel(&mut self, phase: SourcePhase, report: &mut Report) {
        self.cancelled_in = Some(phase);
        let why = self.cfg.cancel.why().unwrap_or(Why::Requested);
        if let Some(conn) = self.conn.as_mut() {
            let abort = Message::abort(cancel::abort_reason(why, phase));
            if protocol::write_message(&mut conn.control, &abort).is_ok() {
                let _ = conn.control.shutdown(std::net::Shutdown::Write);
                let _ = peer_reason(&mut conn.control, Duration::from_secs(2));
            }
        }
        self.conn = None;
        self.progress.finish_and_clear();
        self.on_failure(phase, report);
    }
}

/// Wait for the receiver's acknowledgement of `round`.
fn expect_ack(sock: &mut Conn, round: u32, ctx: &str) -> Result<(), SendError> {
    match protocol::expect_message(sock, None).map_err(proto(ctx))? {
        RoundAck { round: r } if r == round => Ok(()),
        other => Err(proto(ctx)(ProtocolError::BadField {
            kind: Kind::RoundAck,
            detail: format!("acknowledges {other:?}, not round {round}"),
        })),
    }
}
