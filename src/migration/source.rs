//! The source side of a pre-copy migration.
//!
//! Start the guest, let it warm up, connect, then iterate: round 0 sends every
//! page, round k the pages dirtied during round k-1, paced by the rate
//! limiter. After each round the policy decides whether to go on. Then pause
//! the guest, harvest the last dirty set, send it and the device state, and
//! wait until the destination runs (downtime ends). Verification follows, off
//! the downtime path: the paused source's page digests go to the receiver,
//! which compares them with what it received.
//!
//! Pre-copy never loses the source: on any failure before the destination has
//! confirmed it runs, the source guest is resumed.

use std::io::{IoSlice, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::guest::control::Control;
use crate::guest::dirty::{DirtyError, DirtySet, SharedBitmap, Target, Tracker, TrackerKind};
use crate::guest::memory::{GuestMemory, MemoryError};
use crate::guest::process::{DeviceState, Fresh, Guest, GuestError};
use crate::guest::workload::Workload;
use crate::migration::policy::{Decision, Policy, PolicyConfig, Precopy, RoundFigures};
use crate::migration::postcopy::{self, Mode};
use crate::report::{ms, Report, RoundReport, Status};
use crate::util::netio::{write_all_vectored, IO_TIMEOUT};
use crate::util::units::PageRate;
use crate::wire::datapath::{chunk_pages, DataPathError, Encoder, Reduction, SendStats};
use crate::wire::protocol::{self, Frame, Kind, Limits, Message, ProtocolError, MAX_DIGESTS};
use crate::wire::ratelimit::{Bandwidth, RateLimiter};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Errors of the sending side.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("cannot connect to {addr}")]
    Connect {
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
    #[error("receiver refused the migration: {0}")]
    Refused(String),
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
}

/// Everything `livemig send` / `migrate` needs to know.
#[derive(Clone, Debug)]
pub struct SenderConfig {
    pub memory_bytes: u64,
    pub workload: String,
    pub vcpus: u32,
    pub tracker: TrackerKind,
    pub bandwidth: Bandwidth,
    /// `--bandwidth` as the user wrote it, for the report.
    pub bandwidth_spec: String,
    pub policy: Policy,
    /// `--policy` as the user wrote it, for the report.
    pub policy_spec: String,
    pub downtime_limit: Duration,
    pub max_time: Duration,
    pub warmup: Duration,
    pub seed: u64,
    /// TCP connections the pages travel on (QEMU's multifd channels).
    pub streams: u32,
    pub mode: Mode,
    pub reduction: Reduction,
    /// Draw a progress bar (only drawn when stderr is a terminal).
    pub progress: bool,
}

impl Default for SenderConfig {
    /// The command line's defaults, with the `bitmap` tracker (which every
    /// kernel has) and no progress bar.
    fn default() -> Self {
        Self {
            memory_bytes: 256 << 20,
            workload: "hotset:wws=32M,rate=50k".into(),
            vcpus: 1,
            tracker: TrackerKind::Bitmap,
            bandwidth: Bandwidth::Unlimited,
            bandwidth_spec: "unlimited".into(),
            policy: Policy::Xen,
            policy_spec: "xen".into(),
            downtime_limit: Duration::from_millis(300),
            max_time: Duration::from_secs(120),
            warmup: Duration::from_secs(1),
            seed: 1,
            streams: 1,
            mode: Mode::Precopy,
            reduction: Reduction::default(),
            progress: false,
        }
    }
}

impl SenderConfig {
    /// What the convergence policy decides on, for `page_size`-byte pages.
    pub fn policy_config(&self, page_size: u64) -> PolicyConfig {
        PolicyConfig {
            policy: match self.mode {
                // Hybrid runs its pre-copy rounds, then switches.
                Mode::Hybrid { rounds } => Policy::Fixed(rounds),
                _ => self.policy,
            },
            bandwidth: self.bandwidth,
            page_size,
            memory_bytes: self.memory_bytes,
            downtime_limit: self.downtime_limit,
            max_time: self.max_time,
        }
    }

    /// The guest this configuration starts.
    pub fn fresh(&self) -> Fresh {
        Fresh {
            workload: self.workload.clone(),
            vcpus: self.vcpus,
            seed: self.seed,
        }
    }

    /// A report describing this configuration, its figures still to come.
    pub fn report(&self) -> Report {
        Report {
            mode: self.mode.as_str(),
            tracker: self.tracker.as_str().into(),
            policy: self.policy_spec.clone(),
            bandwidth: self.bandwidth_spec.clone(),
            workload: self.workload.clone(),
            vcpus: self.vcpus,
            memory_bytes: self.memory_bytes,
            page_size: crate::guest::memory::page_size(),
            streams: self.streams,
            compress: self.reduction.compress.map(|c| c.as_str().into()),
            xbzrle_cache_bytes: self.reduction.xbzrle_cache,
            ..Report::default()
        }
    }
}

/// The source: guest memory, the guest process and its dirty tracker.
pub struct Source {
    /// Shared with the data streams' threads.
    pub mem: Arc<GuestMemory>,
    pub guest: Guest,
    tracker: Box<dyn Tracker>,
    pub workload: Workload,
}

impl Source {
    /// Validate the guest's configuration, create its memory, start it with
    /// `tracker` set up and wait until it runs.
    pub fn start(
        tracker: TrackerKind,
        memory_bytes: u64,
        fresh: &Fresh,
    ) -> Result<Self, SendError> {
        let page_size = crate::guest::memory::page_size();
        let workload = crate::guest::process::check_config(
            &fresh.workload,
            memory_bytes,
            page_size,
            fresh.vcpus,
        )?;
        crate::guest::memory::check_fits(
            &format!("--mem {}", crate::util::units::fmt_bytes(memory_bytes)),
            memory_bytes,
        )?;
        let mem = Arc::new(GuestMemory::create(memory_bytes, page_size)?);
        let bitmap = match tracker.uses_bitmap() {
            true => Some(SharedBitmap::create(mem.page_count())?),
            false => None,
        };
        let control = Control::create()?;
        let mut guest = Guest::spawn(&mem, control.clone(), bitmap.as_ref(), tracker, Some(fresh))?;
        // The guest publishes where its memory is mapped before it runs.
        guest.wait_running()?;
        // Map all of guest memory here now, as a hypervisor's own mapping
        // of guest RAM is: otherwise round 0 takes a page fault per page in
        // this process (measured: round 0 of 1 GiB at 16-30 Gbit/s without,
        // 27-36 with).
        mem.populate()?;
        // A new guest: nobody else can have claimed it yet.
        let _ = control.claim(std::process::id());
        let target = Target {
            pid: guest.pid(),
            addr: guest.mem_addr(),
            pages: mem.page_count(),
            page_size,
        };
        let tracker = crate::guest::dirty::open(tracker, &target, bitmap, &control)?;
        Ok(Self {
            mem,
            guest,
            tracker,
            workload,
        })
    }

    /// Stop harvesting (`livemig run`): let another process claim the guest.
    pub fn release(&self) {
        self.guest.control().unclaim(std::process::id());
    }

    /// Add the pages written since the last harvest to `into`; `paused`:
    /// the final harvest, with the guest stopped. Returns how long it took.
    pub fn harvest(&mut self, into: &mut DirtySet, paused: bool) -> Result<Duration, SendError> {
        let t = Instant::now();
        let quiesce = !paused && self.tracker.needs_quiesce();
        if quiesce {
            self.guest.park()?;
        }
        let harvested = self.tracker.harvest(into, paused);
        if quiesce {
            self.guest.unpark();
        }
        if let Err(e) = harvested {
            // A tracker reading a dead guest's page tables fails; say why.
            std::thread::sleep(Duration::from_millis(10));
            self.guest.check_alive()?;
            return Err(e.into());
        }
        Ok(t.elapsed())
    }
}

/// Migrate `src` to the receiver at `addr`. The report is filled in as far as
/// the migration got; a failure is also returned as the error.
pub fn migrate(
    cfg: &SenderConfig,
    src: &mut Source,
    addr: &str,
    on_round: &mut dyn FnMut(&RoundReport),
) -> (Report, Result<(), SendError>) {
    let mut report = Report {
        source_guest_pid: Some(src.guest.pid()),
        guest_target_rate_pps: match (src.workload.is_idle(), src.workload.rate) {
            (false, PageRate::PerSec(r)) => Some(r),
            _ => None,
        },
        ..cfg.report()
    };
    let mut run = Run {
        cfg,
        src,
        report: &mut report,
        on_round,
        resumed_at_destination: false,
        progress: progress_bar(cfg.progress),
        start: None,
        lanes: None,
        requests: None,
    };
    let result = run.run(addr);
    run.progress.finish_and_clear();
    if cfg.tracker == TrackerKind::Mprotect {
        let b = run.src.guest.control().block();
        run.report.tracker_faults = Some(b.tracker_faults.load(Ordering::Relaxed));
        run.report.tracker_coalesced = Some(b.tracker_coalesced.load(Ordering::Relaxed));
    }
    if let Some(start) = run.start {
        run.report.total_time_ms = ms(start.elapsed());
    }
    if let Err(e) = &result {
        if !run.resumed_at_destination {
            // Pre-copy never loses the source.
            run.report.source_guest_kept_running = src_resume(run.src).unwrap_or(false);
        }
        report.error = Some(crate::util::error::error_chain(e));
    }
    (report, result)
}

/// Resume the source after a failure and check it really runs on: alive,
/// and writing if its workload writes fast enough to see within a second.
fn src_resume(src: &mut Source) -> Result<bool, GuestError> {
    src.guest.resume()?;
    src.guest.check_alive()?;
    let window = match (src.workload.is_idle(), src.workload.rate) {
        (true, _) => return Ok(true),
        (false, PageRate::Max) => 0.05,
        (false, PageRate::PerSec(r)) if r >= 3.0 => (3.0 / r).max(0.05),
        _ => return Ok(true),
    };
    Ok(src.guest.measure_rate(Duration::from_secs_f64(window))? > 0.0)
}

fn progress_bar(enabled: bool) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    pb.set_style(
        ProgressStyle::with_template("{msg:>14} [{bar:30}] {pos}/{len} pages {per_sec}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb
}

struct Run<'a> {
    cfg: &'a SenderConfig,
    src: &'a mut Source,
    report: &'a mut Report,
    on_round: &'a mut dyn FnMut(&RoundReport),
    resumed_at_destination: bool,
    progress: ProgressBar,
    /// Migration start (after warm-up), once reached.
    start: Option<Instant>,
    /// Where page runs go, once connected.
    lanes: Option<Lanes>,
    /// Post-copy: the connection the destination asks for pages on.
    requests: Option<TcpStream>,
}

fn proto(context: impl Into<String>) -> impl FnOnce(ProtocolError) -> SendError {
    let context = context.into();
    move |source| match source {
        ProtocolError::Aborted(reason) => SendError::Refused(reason),
        source => SendError::Protocol { context, source },
    }
}

impl Run<'_> {
    fn run(&mut self, addr: &str) -> Result<(), SendError> {
        let (cfg, page_size) = (self.cfg, self.src.mem.page_size());
        self.report.guest_dirty_rate_pps = self.src.guest.measure_rate(cfg.warmup)?;

        let start = *self.start.insert(Instant::now());
        let mut sock = connect(addr)?;
        // Ties the data connections to this migration.
        let session =
            xxhash_rust::xxh3::xxh3_64(format!("{:?} {}", start, std::process::id()).as_bytes());
        let mut hello = Message::hello(page_size as u32, self.src.mem.len(), cfg.streams, session);
        if let Message::Hello(h) = &mut hello {
            h.postcopy = cfg.mode.is_postcopy();
        }
        protocol::write_message(&mut sock, &hello)
            .map_err(proto(format!("sending the handshake to {addr}")))?;
        protocol::read_handshake(&mut sock, Kind::HelloAck)
            .map_err(proto(format!("handshake with {addr}")))?;
        let mut precopy = Precopy::new(cfg.policy_config(page_size));
        let limiter = RateLimiter::new(precopy.limit());
        self.lanes = Some(Lanes::open(
            cfg,
            addr,
            session,
            &self.src.mem,
            &limiter,
            &self.progress,
        )?);
        if cfg.mode.is_postcopy() {
            let mut conn = connect(addr)?;
            let hello = Message::stream_hello(protocol::REQUEST_STREAM, session);
            protocol::write_message(&mut conn, &hello)
                .map_err(proto(format!("opening the request connection to {addr}")))?;
            self.requests = Some(conn);
        }
        self.report.setup_time_ms = ms(start.elapsed());

        let pages = self.src.mem.page_count();
        // Start tracking afresh: round 0 sends everything anyway.
        let mut dirty = DirtySet::new(pages);
        self.harvest(&mut dirty, false)?;
        let ops0 = (Instant::now(), self.src.guest.ops());
        let mut todo = DirtySet::all(pages);
        let iterate = matches!(cfg.mode, Mode::Precopy | Mode::Hybrid { .. });
        if iterate {
            loop {
                let round = precopy.rounds().len() as u32;
                let t0 = Instant::now();
                let (sent, bytes) = self.send_round(&mut sock, round, false, &todo, &limiter)?;
                dirty.clear();
                let harvest = self.harvest(&mut dirty, false)?;
                // A dead guest writes nothing: no point iterating over it.
                self.src.guest.check_alive()?;
                let f = RoundFigures {
                    round,
                    pages: sent,
                    bytes,
                    duration: t0.elapsed(),
                    dirty_pages: dirty.count(),
                    rate_limit: limiter.limit(),
                };
                std::mem::swap(&mut todo, &mut dirty);
                let elapsed = start.elapsed();
                let decision = precopy.end_round(f.clone(), elapsed);
                self.push_round(&f, harvest, false, precopy.explain(decision, elapsed));
                limiter.set_limit(precopy.limit());
                if let Decision::Stop(stop) = decision {
                    self.report.stop_reason = Some(stop.as_str().into());
                    self.report.converged = stop.converged();
                    break;
                }
            }
        }

        // Stop-and-copy at the highest rate allowed (Clark et al.: the final
        // phase runs at max). The downtime starts now.
        limiter.set_limit(precopy.final_limit());
        self.report.guest_rate_precopy_pps = iterate
            .then(|| (self.src.guest.ops() - ops0.1) as f64 / ops0.0.elapsed().as_secs_f64());
        let t_pause = Instant::now();
        self.src.guest.pause()?;
        let t_paused = Instant::now();
        let harvest = self.harvest(&mut todo, true)?;
        let t_harvested = Instant::now();
        let round = precopy.rounds().len() as u32;
        if cfg.mode.is_postcopy() {
            return self.postcopy(
                &mut sock,
                round,
                &todo,
                &limiter,
                (t_pause, t_paused, t_harvested),
                harvest,
            );
        }
        let (sent, bytes) = self.send_round(&mut sock, round, true, &todo, &limiter)?;
        let t_sent = Instant::now();
        // Every page is out: close the data connections.
        self.lanes = None;
        self.push_round(
            &RoundFigures {
                round,
                pages: sent,
                bytes,
                duration: t_sent - t_harvested,
                dirty_pages: 0,
                rate_limit: limiter.limit(),
            },
            harvest,
            true,
            String::new(),
        );
        let t_resumed = self.hand_over(&mut sock, [t_pause, t_paused, t_harvested, t_sent])?;
        self.report.migration_time_ms = Some(ms(t_resumed - start));
        let f = &self.report.forms;
        if f.compressed_bytes > 0 {
            let raw = f.compressed_pages * page_size;
            self.report.compression_ratio = Some(raw as f64 / f.compressed_bytes as f64);
        }
        self.print_last_round();

        self.verify(
            &mut sock,
            Limits {
                streams: cfg.streams,
                page_size: page_size as u32,
                page_count: pages,
            },
        )?;
        self.report.status = Status::Completed;
        Ok(())
    }

    /// Post-copy from the paused source: tell the destination which pages
    /// it lacks, hand it the device state, and once it runs push those
    /// pages while serving its requests; then verify.
    fn postcopy(
        &mut self,
        sock: &mut TcpStream,
        round: u32,
        missing: &DirtySet,
        limiter: &RateLimiter,
        (t_pause, t_paused, t_harvested): (Instant, Instant, Instant),
        harvest: Duration,
    ) -> Result<(), SendError> {
        let start = self.start.expect("started");
        let page_size = self.src.mem.page_size();
        let limits = Limits {
            streams: self.cfg.streams,
            page_size: page_size as u32,
            page_count: self.src.mem.page_count(),
        };
        // The pre-copy rounds are over: close their data connections.
        self.lanes = None;
        let mut bytes = 0u64;
        for (first, count) in missing.runs(u64::from(u32::MAX)) {
            let frame = protocol::discard_frame_header(first, count as u32);
            sock.write_all(&frame)
                .map_err(|e| proto("sending the pages to fetch")(ProtocolError::Io(e)))?;
            bytes += frame.len() as u64;
        }
        self.report.transferred_bytes += bytes;
        // The pages to fetch (Discard runs) count as the last pages.
        let t_sent = Instant::now();
        self.hand_over(sock, [t_pause, t_paused, t_harvested, t_sent])?;

        // Serve requests on their own connection while pushing the rest here.
        limiter.set_limit(self.cfg.bandwidth.max());
        let server = postcopy::Server::new(limits.page_count);
        let conn = self.requests.take().expect("opened with the handshake");
        let closer = conn
            .try_clone()
            .map_err(|e| proto("serving page requests")(ProtocolError::Io(e)))?;
        let mem = Arc::clone(&self.src.mem);
        let served: Result<(), SendError> = std::thread::scope(|scope| {
            let serving = scope.spawn(|| server.serve(conn, &mem, &limits, limiter));
            // The destination closes the request connection once it has
            // every page; on a failure here, do not wait for that.
            self.push(sock, round, missing, limiter, &server, harvest)
                .inspect_err(|_| {
                    let _ = closer.shutdown(std::net::Shutdown::Both);
                })?;
            // Every page is present (acknowledged): how the request
            // connection ends no longer matters.
            let _ = serving.join();
            // The clone kept the connection open: close it, so the
            // destination's reader sees the end.
            let _ = closer.shutdown(std::net::Shutdown::Both);
            Ok(())
        });
        served?;
        let p = &mut self.report.postcopy;
        p.postcopy_requests = server.requests.load(Ordering::Relaxed);
        p.pages_pulled = server.pulled.load(Ordering::Relaxed);
        self.report.transferred_pages += p.pages_pulled;
        self.report.transferred_bytes += server.bytes.load(Ordering::Relaxed);
        self.report.migration_time_ms = Some(ms(start.elapsed()));
        self.print_last_round();
        self.verify(sock, limits)?;
        self.report.status = Status::Completed;
        Ok(())
    }

    /// Send the device state and wait until the destination guest runs;
    /// the downtime and its phases, from the pause (`t`: paused, harvested,
    /// last pages sent). From then on the source must never resume: the
    /// guest runs at the destination.
    fn hand_over(&mut self, sock: &mut TcpStream, t: [Instant; 4]) -> Result<Instant, SendError> {
        let [t_pause, t_paused, t_harvested, t_sent] = t;
        let state = DeviceState {
            workload: self.cfg.workload.clone(),
            memory_bytes: self.src.mem.len(),
            page_size: self.src.mem.page_size(),
            vcpus: self.src.guest.vcpu_states(),
        };
        self.report.transferred_bytes +=
            protocol::write_message(sock, &Message::DeviceState(state.to_bytes()))
                .map_err(proto("sending the device state"))? as u64;
        let resume_ns = match protocol::expect_message(sock, None, Kind::Resumed)
            .map_err(proto("waiting for the destination to resume"))?
        {
            Message::Resumed { resume_ns, .. } => resume_ns,
            _ => unreachable!("expect_message returns the kind asked for"),
        };
        let t_resumed = Instant::now();
        self.resumed_at_destination = true;
        // The peer's figure, bounded by what this side waited.
        let resume = Duration::from_nanos(resume_ns).min(t_resumed - t_sent);
        self.report.downtime_ms = Some(ms(t_resumed - t_pause));
        let b = &mut self.report.downtime_breakdown_ms;
        b.pause = ms(t_paused - t_pause);
        b.final_harvest = ms(t_harvested - t_paused);
        b.last_pages = ms(t_sent - t_harvested);
        b.resume = ms(resume);
        b.device_state = ms((t_resumed - t_sent) - resume);
        Ok(t_resumed)
    }

    /// The background push of post-copy: the missing pages the server has
    /// not sent yet, then wait until the destination has every page.
    fn push(
        &mut self,
        sock: &mut TcpStream,
        round: u32,
        missing: &DirtySet,
        limiter: &RateLimiter,
        server: &postcopy::Server,
        harvest: Duration,
    ) -> Result<(), SendError> {
        let t0 = Instant::now();
        let ctx = "pushing post-copy pages";
        let page_size = self.src.mem.page_size();
        let mut bytes = protocol::write_message(sock, &Message::round_start(round, false))
            .map_err(proto(ctx))? as u64;
        let mut pushed = 0u64;
        self.progress.set_message("post-copy");
        self.progress.set_length(missing.count());
        self.progress.set_position(0);
        for (first, count) in missing.runs(chunk_pages(limiter.limit(), page_size)) {
            // Skip what a request already took; send the rest in sub-runs.
            let mut p = first;
            while p < first + count {
                if !server.sent.mark(p) {
                    p += 1;
                    continue;
                }
                let mut end = p + 1;
                while end < first + count && server.sent.mark(end) {
                    end += 1;
                }
                let n = end - p;
                let header = protocol::pages_frame_header(p, n as u32, page_size as u32);
                // SAFETY: the source guest is paused: nothing writes its memory.
                let data = unsafe { self.src.mem.pages(p, n) };
                limiter.acquire((header.len() + data.len()) as u64);
                write_all_vectored(sock, &mut [IoSlice::new(&header), IoSlice::new(data)])
                    .map_err(|e| {
                        peer_error(sock, ctx).unwrap_or_else(|| proto(ctx)(ProtocolError::Io(e)))
                    })?;
                bytes += (header.len() + data.len()) as u64;
                pushed += n;
                self.progress.inc(n);
                p = end;
            }
        }
        bytes += protocol::write_message(sock, &Message::round_end(round, pushed))
            .map_err(proto(ctx))? as u64;
        // Acknowledged once every page is present at the destination.
        expect_ack(sock, round, ctx)?;
        self.report.postcopy.pages_pushed = pushed;
        let f = RoundFigures {
            round,
            pages: pushed,
            bytes,
            duration: t0.elapsed(),
            dirty_pages: 0,
            rate_limit: limiter.limit(),
        };
        let mut r = f.to_report(
            harvest,
            false,
            "post-copy: pushed while the destination ran".into(),
        );
        r.postcopy = true;
        self.report.transferred_bytes += f.bytes;
        self.report.transferred_pages += f.pages;
        self.report.rounds.push(r);
        Ok(())
    }

    /// Harvest through the source, counting the harvest and its time.
    fn harvest(&mut self, into: &mut DirtySet, paused: bool) -> Result<Duration, SendError> {
        let took = self.src.harvest(into, paused)?;
        self.report.dirty_sync_count += 1;
        self.report.harvest_total_ms += ms(took);
        self.report.harvest_max_ms = self.report.harvest_max_ms.max(ms(took));
        Ok(took)
    }

    /// Record a round in the report; print its row unless it is the
    /// stop-and-copy round, which is printed once the downtime is over.
    fn push_round(
        &mut self,
        f: &RoundFigures,
        harvest: Duration,
        stop_and_copy: bool,
        decision: String,
    ) {
        let r = f.to_report(harvest, stop_and_copy, decision);
        self.report.transferred_bytes += f.bytes;
        self.report.transferred_pages += f.pages;
        self.report.rounds.push(r);
        if !stop_and_copy {
            self.print_last_round();
        }
    }

    fn print_last_round(&mut self) {
        if let Some(r) = self.report.rounds.last() {
            self.progress.suspend(|| (self.on_round)(r));
        }
    }

    /// Send one round: RoundStart, the set as Pages frames straight from the
    /// mapping, RoundEnd. Returns (pages, bytes on the socket).
    fn send_round(
        &mut self,
        sock: &mut TcpStream,
        round: u32,
        stop_and_copy: bool,
        set: &DirtySet,
        limiter: &RateLimiter,
    ) -> Result<(u64, u64), SendError> {
        let ctx = format!("sending round {round}");
        let ctx = ctx.as_str();
        let page_size = self.src.mem.page_size();
        let start = Message::RoundStart {
            round,
            stop_and_copy,
        };
        let mut bytes = protocol::write_message(sock, &start).map_err(proto(ctx))? as u64;
        let chunk = chunk_pages(limiter.limit(), page_size);
        let label = if stop_and_copy {
            "stop-and-copy".into()
        } else {
            format!("round {round}")
        };
        self.progress.set_message(label);
        self.progress.set_length(set.count());
        self.progress.set_position(0);
        let lanes = self.lanes.as_mut().expect("connected before the rounds");
        let (pages, stream_bytes, forms) = lanes.send(sock, round, set, chunk, ctx)?;
        bytes += stream_bytes;
        self.report.forms += forms;
        let end = Message::RoundEnd { round, pages };
        bytes += protocol::write_message(sock, &end).map_err(proto(ctx))? as u64;
        if !stop_and_copy {
            // The round ends when its pages have landed (see crate::wire::protocol).
            expect_ack(sock, round, ctx)?;
        }
        Ok((pages, bytes))
    }

    /// Send the paused source's page digests; read the receiver's verdict.
    fn verify(&mut self, sock: &mut TcpStream, limits: Limits) -> Result<(), SendError> {
        self.progress.set_message("verifying");
        let pages = self.src.mem.page_count();
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
        protocol::write_message(sock, &Message::Complete).map_err(proto("sending page digests"))?;
        let verdict = protocol::expect_message(sock, Some(&limits), Kind::Verdict)
            .map_err(proto("waiting for the verdict"))?;
        let Message::Verdict {
            verified_pages,
            mismatched_pages,
            first_mismatch,
        } = verdict
        else {
            unreachable!("expect_message returns the kind asked for")
        };
        self.report.verified_pages = verified_pages;
        self.report.mismatched_pages = mismatched_pages;
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
}

/// What a data connection's thread reports when it ended a round.
type LaneReport = Result<(u64, u64, SendStats), std::io::Error>;

/// Where page runs go: the control connection itself (one stream), or
/// data connections, each with a thread that encodes and writes the runs it
/// takes from a shared queue (QEMU's multifd), paced by the one limiter.
enum Lanes {
    One(Box<Lane>),
    Many {
        runs: Sender<(u64, u64)>,
        ends: Vec<Sender<u32>>,
        done: Receiver<(usize, LaneReport)>,
        threads: Vec<JoinHandle<()>>,
    },
}

impl Lanes {
    fn open(
        cfg: &SenderConfig,
        addr: &str,
        session: u64,
        mem: &Arc<GuestMemory>,
        limiter: &RateLimiter,
        progress: &ProgressBar,
    ) -> Result<Lanes, SendError> {
        let lane = |sock| -> Result<Lane, SendError> {
            Ok(Lane {
                sock,
                encoder: Encoder::new(cfg.reduction, mem.page_size())?,
                mem: Arc::clone(mem),
                limiter: limiter.clone(),
                progress: progress.clone(),
                pages: 0,
                bytes: 0,
                failed: None,
            })
        };
        if cfg.streams <= 1 {
            return Ok(Lanes::One(Box::new(lane(None)?)));
        }
        if cfg.reduction.xbzrle_cache.is_some() {
            // Runs go to whichever stream is free: a stream's cache would
            // not hold the version the receiver has.
            return Err(SendError::Config(
                "--xbzrle works on one stream (--streams 1): its cache must see every send of a page in order".into(),
            ));
        }
        let n = cfg.streams as usize;
        let (runs, queue) = crossbeam_channel::bounded::<(u64, u64)>(2 * n);
        let (done_tx, done) = crossbeam_channel::unbounded();
        let (mut ends, mut threads) = (Vec::new(), Vec::new());
        for index in 0..n {
            let mut sock = connect(addr)?;
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

    /// Send the pages of `set` in runs of at most `chunk` pages. Returns
    /// (pages, bytes on the data connections, forms).
    fn send(
        &mut self,
        sock: &mut TcpStream,
        round: u32,
        set: &DirtySet,
        chunk: u64,
        ctx: &str,
    ) -> Result<(u64, u64, SendStats), SendError> {
        let mem_err = |sock: &mut TcpStream, e: std::io::Error| {
            peer_error(sock, ctx).unwrap_or_else(|| proto(ctx)(ProtocolError::Io(e)))
        };
        match self {
            Lanes::One(lane) => {
                lane.encoder.start_round(round);
                for run in set.runs(chunk) {
                    if let Err(e) = lane.send(sock, run) {
                        return Err(mem_err(sock, e));
                    }
                    if let Some(e) = peer_error(sock, ctx) {
                        return Err(e);
                    }
                }
                let (pages, bytes) = (lane.pages, lane.bytes);
                (lane.pages, lane.bytes) = (0, 0);
                Ok((pages, bytes, std::mem::take(&mut lane.encoder.stats)))
            }
            Lanes::Many {
                runs, ends, done, ..
            } => {
                for run in set.runs(chunk) {
                    if runs.send(run).is_err() {
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
                        Ok((_, Ok((p, b, f)))) => {
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
                Ok((pages, bytes, forms))
            }
        }
    }
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
struct Lane {
    /// A data connection (None: the control connection, passed in).
    sock: Option<TcpStream>,
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

fn connect(addr: &str) -> Result<TcpStream, SendError> {
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

/// Wait for the receiver's acknowledgement of `round`.
fn expect_ack(sock: &mut TcpStream, round: u32, ctx: &str) -> Result<(), SendError> {
    match protocol::expect_message(sock, None, Kind::RoundAck).map_err(proto(ctx))? {
        Message::RoundAck { round: r } if r == round => Ok(()),
        other => Err(proto(ctx)(ProtocolError::BadField {
            kind: Kind::RoundAck,
            detail: format!("acknowledges {other:?}, not round {round}"),
        })),
    }
}

/// The receiver's reason for giving up, if it sends one within `wait`.
fn peer_reason(sock: &mut TcpStream, wait: Duration) -> Option<SendError> {
    let _ = sock.set_read_timeout(Some(wait));
    let reason = match protocol::read_frame(sock, None) {
        Ok(Frame::Message(Message::Abort(reason))) => Some(SendError::Refused(reason)),
        _ => None,
    };
    let _ = sock.set_read_timeout(Some(IO_TIMEOUT));
    reason
}

/// The receiver speaks during rounds only to give up (Abort) or by closing.
/// One non-blocking peek per chunk notices either without waiting.
fn peer_error(sock: &mut TcpStream, context: &str) -> Option<SendError> {
    use nix::sys::socket::{recv, MsgFlags};
    use std::os::fd::AsRawFd;
    let mut b = [0u8; 1];
    match recv(
        sock.as_raw_fd(),
        &mut b,
        MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
    ) {
        Err(nix::Error::EAGAIN) => None,
        Ok(0) => Some(proto(context)(ProtocolError::Closed)),
        _ => Some(match protocol::read_frame(sock, None) {
            Ok(Frame::Message(Message::Abort(reason))) => SendError::Refused(reason),
            Ok(other) => proto(context)(ProtocolError::Unexpected {
                got: other.kind(),
                expected: "nothing from the receiver during a round".into(),
            }),
            Err(e) => proto(context)(e),
        }),
    }
}
