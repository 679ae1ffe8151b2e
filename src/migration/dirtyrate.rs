//! `livemig dirtyrate`: how fast a guest dirties its memory and how large
//! its writable working set (WWS) is, measured the way operators do before
//! migrating (QEMU's `calc-dirty-rate`), with any tracker.
//!
//! The guest first runs untracked for the warm-up (its write rate then is
//! the baseline), then the tracker harvests every [`TICK`]. Each harvest is
//! added to one accumulator per window length (30 ms as in Kherbache et
//! al.'s Fig. 3, 100 ms, 1 s); when a window closes, the distinct pages it
//! saw are one WWS sample. The dirty rate is the mean 1 s WWS per second.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::guest::control::MAX_VCPUS;
use crate::guest::dirty::{DirtyError, DirtySet, Target, Tracker, TrackerKind};
use crate::guest::find::Found;
use crate::guest::process::{Fresh, GuestError};
use crate::migration::source::{SendError, Source};
use crate::report::ms;
use crate::util::page::PageSize;

/// How often the tracker harvests; every window is a multiple of it.
pub const TICK: Duration = Duration::from_millis(10);
/// Window lengths, in ticks (30 ms, 100 ms, 1 s).
const WINDOW_TICKS: [u32; 3] = [3, 10, 100];

/// Errors of a measurement.
#[derive(Debug, thiserror::Error)]
pub enum DirtyRateError {
    #[error(transparent)]
    Source(#[from] SendError),
    #[error(transparent)]
    Guest(#[from] GuestError),
    #[error(transparent)]
    Dirty(#[from] DirtyError),
    #[error("cannot block SIGINT and SIGTERM")]
    Signals(#[source] nix::Error),
    #[error(transparent)]
    Record(#[from] crate::migration::record::RecordError),
    #[error("attaching to a running guest needs the uffd-wp or soft-dirty tracker: the {0} tracker needs the guest started by this command")]
    AttachTracker(&'static str),
}

/// Whose writes are measured.
#[derive(Clone, Debug)]
pub enum Subject {
    /// A guest this command starts (and stops).
    Start { memory_bytes: u64, guest: Fresh },
    /// A running livemig guest (`livemig run`), by pid.
    Attach(i32),
}

/// What `livemig dirtyrate` runs.
#[derive(Clone, Debug)]
pub struct DirtyRateConfig {
    pub subject: Subject,
    pub tracker: TrackerKind,
    /// Untracked run before measuring (the baseline write rate).
    pub warmup: Duration,
    /// How long to measure while tracked.
    pub duration: Duration,
    /// Write the harvests to this file as a page-write trace.
    pub record: Option<std::path::PathBuf>,
}

/// `livemig run`: start a guest that another process may harvest
/// ([`Subject::Attach`]), tell `on_start` its pid, and keep it running
/// until SIGINT or SIGTERM.
pub fn serve(
    tracker: TrackerKind,
    memory_bytes: u64,
    fresh: &Fresh,
    on_start: &mut dyn FnMut(i32),
) -> Result<(), DirtyRateError> {
    use nix::sys::signal::{SigSet, Signal};
    // Block the signals before any thread starts, then wait for them.
    let mut stop = SigSet::empty();
    stop.add(Signal::SIGINT);
    stop.add(Signal::SIGTERM);
    stop.thread_block().map_err(DirtyRateError::Signals)?;
    let mut src = Source::start(tracker, memory_bytes, fresh)?;
    src.release();
    on_start(src.guest.pid());
    let timeout = libc::timespec {
        tv_sec: 0,
        tv_nsec: 200_000_000,
    };
    loop {
        // SAFETY: a valid signal set and timeout; no siginfo wanted.
        let sig = unsafe { libc::sigtimedwait(stop.as_ref(), std::ptr::null_mut(), &timeout) };
        if sig > 0 {
            return Ok(());
        }
        src.guest.check_alive()?;
    }
}

/// WWS over windows of one length.
#[derive(Clone, Debug, Default, Serialize)]
pub struct WindowStats {
    pub window_ms: f64,
    /// Complete windows measured.
    pub samples: usize,
    /// Distinct pages dirtied per window: mean and 95th percentile.
    pub wws_pages_mean: Option<f64>,
    pub wws_pages_p95: Option<u64>,
    /// Mean WWS over the windows' measured length, pages per second.
    pub dirty_rate_pps: Option<f64>,
}

/// The report of one measurement. Every figure is measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DirtyRateReport {
    pub tracker: String,
    /// The measured guest process.
    pub pid: i32,
    pub workload: String,
    pub vcpus: u32,
    pub memory_bytes: u64,
    pub page_size: u64,
    pub duration_ms: f64,
    /// Dirty rate over 1 s windows (the longest complete window if the
    /// measurement was shorter), pages/s and MB/s (10^6 bytes).
    pub dirty_rate_pps: Option<f64>,
    pub dirty_rate_mbps: Option<f64>,
    pub windows: Vec<WindowStats>,
    /// Distinct pages dirtied over the whole measurement.
    pub distinct_pages: u64,
    pub harvests: u64,
    pub harvest_total_ms: f64,
    pub harvest_mean_ms: f64,
    pub harvest_max_ms: f64,
    /// The guest's own write counters: untracked (warm-up) and tracked.
    pub guest_rate_untracked_pps: f64,
    pub guest_rate_tracked_pps: f64,
    /// How much slower the guest wrote while tracked, in percent.
    pub tracked_slowdown_pct: Option<f64>,
    /// The guest's CPU time per write (its threads' run time, faults and
    /// handlers included), untracked and tracked: the tracker's cost to a
    /// guest even when pacing hides it in the rate.
    pub guest_cpu_ns_per_write_untracked: Option<f64>,
    pub guest_cpu_ns_per_write_tracked: Option<f64>,
    /// `--record`: the page writes written to the trace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recorded_writes: Option<u64>,
}

/// Measure the subject. `on_tick` sees the progress (0..=1).
pub fn run(
    cfg: &DirtyRateConfig,
    on_tick: &mut dyn FnMut(f64),
) -> Result<DirtyRateReport, DirtyRateError> {
    let mut guest = match &cfg.subject {
        Subject::Start {
            memory_bytes,
            guest,
        } => Measured::Own(Box::new(Source::start(cfg.tracker, *memory_bytes, guest)?)),
        Subject::Attach(pid) => Measured::attach(*pid, cfg.tracker)?,
    };
    let result = measure(cfg, &mut guest, on_tick);
    if let Measured::Attached { found, .. } = &guest {
        found.control.unclaim(std::process::id());
    }
    result
}

fn measure(
    cfg: &DirtyRateConfig,
    guest: &mut Measured,
    on_tick: &mut dyn FnMut(f64),
) -> Result<DirtyRateReport, DirtyRateError> {
    let (page_size, pages) = guest.pages();
    let (cpu0, ops_w, t_w) = (guest.cpu_time(), guest.ops(), Instant::now());
    std::thread::sleep(cfg.warmup);
    guest.check_alive()?;
    let untracked = (guest.ops() - ops_w) as f64 / t_w.elapsed().as_secs_f64();
    let cpu_untracked = per_write(guest.cpu_time() - cpu0, guest.ops() - ops_w);

    let mut recorder = match &cfg.record {
        Some(path) => {
            let (workload, vcpus) = guest.describe();
            let about = format!(
                "{workload} on {vcpus} vCPU(s), {pages} pages of {page_size} bytes, --tracker {}",
                cfg.tracker.as_str()
            );
            Some(crate::migration::record::Recorder::create(path, &about)?)
        }
        None => None,
    };
    // The first harvest starts tracking (and reports the warm-up's writes).
    let mut tick = DirtySet::new(pages);
    guest.harvest(&mut tick)?;
    let (t0, ops0, cpu0) = (Instant::now(), guest.ops(), guest.cpu_time());
    if let Some(r) = &mut recorder {
        r.start(t0);
    }
    let mut windows: Vec<Window> = WINDOW_TICKS
        .iter()
        .map(|&ticks| Window::new(ticks, pages, t0))
        .collect();
    let mut total = DirtySet::new(pages);
    let (mut harvests, mut harvest_total, mut harvest_max) = (0u64, Duration::ZERO, Duration::ZERO);
    let mut next = t0;
    while t0.elapsed() < cfg.duration {
        next += TICK;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        tick.clear();
        let took = guest.harvest(&mut tick)?;
        (harvests, harvest_total, harvest_max) =
            (harvests + 1, harvest_total + took, harvest_max.max(took));
        total.union(&tick);
        let now = Instant::now();
        if let Some(r) = &mut recorder {
            r.add(now, &tick)?;
        }
        windows.iter_mut().for_each(|w| w.add(&tick, now));
        on_tick((t0.elapsed().as_secs_f64() / cfg.duration.as_secs_f64()).min(1.0));
    }
    let elapsed = t0.elapsed();
    let tracked = (guest.ops() - ops0) as f64 / elapsed.as_secs_f64();
    let cpu_tracked = per_write(guest.cpu_time() - cpu0, guest.ops() - ops0);
    guest.check_alive()?;

    let recorded_writes = recorder.map(|r| r.finish()).transpose()?;
    let windows: Vec<WindowStats> = windows.iter().map(Window::stats).collect();
    let rate = windows.iter().rev().find_map(|w| w.dirty_rate_pps);
    let (workload, vcpus) = guest.describe();
    Ok(DirtyRateReport {
        tracker: cfg.tracker.as_str().into(),
        pid: guest.pid(),
        workload,
        vcpus,
        memory_bytes: page_size.bytes(pages),
        page_size: page_size.as_u64(),
        duration_ms: ms(elapsed),
        dirty_rate_pps: rate,
        dirty_rate_mbps: rate.map(|r| r * page_size.as_u64() as f64 / 1e6),
        windows,
        distinct_pages: total.count(),
        harvests,
        harvest_total_ms: ms(harvest_total),
        harvest_mean_ms: ms(harvest_total) / harvests.max(1) as f64,
        harvest_max_ms: ms(harvest_max),
        guest_rate_untracked_pps: untracked,
        guest_rate_tracked_pps: tracked,
        tracked_slowdown_pct: (untracked > 0.0).then(|| (1.0 - tracked / untracked) * 100.0),
        guest_cpu_ns_per_write_untracked: cpu_untracked,
        guest_cpu_ns_per_write_tracked: cpu_tracked,
        recorded_writes,
    })
}

fn per_write(cpu: Duration, writes: u64) -> Option<f64> {
    (writes > 0).then(|| cpu.as_nanos() as f64 / writes as f64)
}

/// The guest being measured: started here, or attached to.
enum Measured {
    Own(Box<Source>),
    Attached {
        found: Found,
        tracker: Box<dyn Tracker>,
        vcpus: u32,
    },
}

impl Measured {
    /// Find guest `pid`, claim it and open `kind` over its memory.
    fn attach(pid: i32, kind: TrackerKind) -> Result<Self, DirtyRateError> {
        if kind.uses_bitmap() {
            return Err(DirtyRateError::AttachTracker(kind.as_str()));
        }
        let found = crate::guest::find::find(pid)?;
        found
            .control
            .claim(std::process::id())
            .map_err(|holder| GuestError::Claimed { pid, holder })?;
        let page_size = PageSize::host();
        let target = Target {
            pid,
            addr: found.mem_addr,
            pages: page_size.pages(found.mem_bytes),
            page_size,
        };
        let opened = crate::guest::dirty::open(kind, &target, None, &found.control);
        let tracker = match opened {
            Ok(t) => t,
            Err(e) => {
                found.control.unclaim(std::process::id());
                return Err(e.into());
            }
        };
        let vcpus = found.control.published().1;
        if tracker.needs_quiesce() && vcpus == 0 {
            found.control.unclaim(std::process::id());
            return Err(GuestError::NotAGuest {
                pid,
                why: "it did not publish its vCPU count, which the soft-dirty tracker needs to park them".into(),
            }
            .into());
        }
        Ok(Self::Attached {
            found,
            tracker,
            vcpus,
        })
    }

    fn pid(&self) -> i32 {
        match self {
            Self::Own(src) => src.guest.pid(),
            Self::Attached { found, .. } => found.pid,
        }
    }

    /// (page size, pages).
    fn pages(&self) -> (PageSize, u64) {
        match self {
            Self::Own(src) => (src.mem.page_size(), src.mem.page_count()),
            Self::Attached { found, .. } => {
                let ps = PageSize::host();
                (ps, ps.pages(found.mem_bytes))
            }
        }
    }

    /// (workload, vCPUs) as the guest published them.
    fn describe(&self) -> (String, u32) {
        match self {
            Self::Own(src) => src.guest.control().published(),
            Self::Attached { found, .. } => found.control.published(),
        }
    }

    fn ops(&self) -> u64 {
        match self {
            Self::Own(src) => src.guest.ops(),
            Self::Attached { found, .. } => found.control.ops(MAX_VCPUS),
        }
    }

    fn cpu_time(&self) -> Duration {
        crate::guest::process::cpu_time(self.pid())
    }

    fn check_alive(&mut self) -> Result<(), DirtyRateError> {
        match self {
            Self::Own(src) => Ok(src.guest.check_alive()?),
            Self::Attached { found, .. } if crate::util::process::process_gone(found.pid) => {
                Err(DirtyError::Guest {
                    pid: found.pid,
                    what: "exited".into(),
                }
                .into())
            }
            Self::Attached { .. } => Ok(()),
        }
    }

    fn harvest(&mut self, into: &mut DirtySet) -> Result<Duration, DirtyRateError> {
        match self {
            Self::Own(src) => Ok(src.harvest(into, false)?),
            Self::Attached {
                found,
                tracker,
                vcpus,
            } => {
                let t = Instant::now();
                let quiesce = tracker.needs_quiesce();
                if quiesce {
                    crate::guest::process::park(&found.control, *vcpus, found.pid)?;
                }
                let harvested = tracker.harvest(into, false);
                if quiesce {
                    found.control.release();
                }
                if let Err(e) = harvested {
                    self.check_alive()?;
                    return Err(e.into());
                }
                Ok(t.elapsed())
            }
        }
    }
}

/// Tumbling windows of `ticks` harvests.
struct Window {
    ticks: u32,
    seen: u32,
    acc: DirtySet,
    opened: Instant,
    /// (distinct pages, measured length) per closed window.
    samples: Vec<(u64, Duration)>,
}

impl Window {
    fn new(ticks: u32, pages: u64, opened: Instant) -> Self {
        Self {
            ticks,
            seen: 0,
            acc: DirtySet::new(pages),
            opened,
            samples: Vec::new(),
        }
    }

    fn add(&mut self, tick: &DirtySet, now: Instant) {
        self.acc.union(tick);
        self.seen += 1;
        if self.seen == self.ticks {
            self.samples.push((self.acc.count(), now - self.opened));
            self.acc.clear();
            (self.seen, self.opened) = (0, now);
        }
    }

    fn stats(&self) -> WindowStats {
        let n = self.samples.len();
        let mut s = WindowStats {
            window_ms: (TICK * self.ticks).as_secs_f64() * 1e3,
            samples: n,
            ..WindowStats::default()
        };
        if n > 0 {
            let mut pages: Vec<u64> = self.samples.iter().map(|&(p, _)| p).collect();
            pages.sort_unstable();
            let sum: u64 = pages.iter().sum();
            let secs: f64 = self.samples.iter().map(|(_, d)| d.as_secs_f64()).sum();
            s.wws_pages_mean = Some(sum as f64 / n as f64);
            s.wws_pages_p95 = Some(pages[(n * 95).div_ceil(100) - 1]);
            s.dirty_rate_pps = Some(sum as f64 / secs);
        }
        s
    }
}

/// The human form of a report.
pub fn summary(r: &DirtyRateReport) -> String {
    use crate::util::units::fmt_bytes;
    let ps = r.page_size;
    let mut s = format!(
        "dirtyrate         guest {}, {} tracker, {}, {} vCPU(s), {}, measured {:.0} ms\n",
        r.pid,
        r.tracker,
        r.workload,
        r.vcpus,
        fmt_bytes(r.memory_bytes),
        r.duration_ms
    );
    match (r.dirty_rate_pps, r.dirty_rate_mbps) {
        (Some(p), Some(m)) => s += &format!("dirty rate        {p:.0} pages/s ({m:.1} MB/s)\n"),
        _ => s += "dirty rate        no complete window (measure longer)\n",
    }
    s += "window     samples   WWS mean          WWS p95           pages/s\n";
    for w in &r.windows {
        let (mean, p95, rate) = match (w.wws_pages_mean, w.wws_pages_p95, w.dirty_rate_pps) {
            (Some(m), Some(p), Some(r)) => (
                format!("{m:.0} ({})", fmt_bytes((m * ps as f64) as u64)),
                format!("{p} ({})", fmt_bytes(p * ps)),
                format!("{r:.0}"),
            ),
            _ => ("-".into(), "-".into(), "-".into()),
        };
        s += &format!(
            "{:>6.0} ms {:>8}   {mean:<17} {p95:<17} {rate}\n",
            w.window_ms, w.samples
        );
    }
    s += &format!(
        "distinct pages    {} ({}) over the whole run\n",
        r.distinct_pages,
        fmt_bytes(r.distinct_pages * ps)
    );
    s += &format!(
        "harvests          {}, {:.3} ms mean, {:.3} ms longest\n",
        r.harvests, r.harvest_mean_ms, r.harvest_max_ms
    );
    s += &format!(
        "guest rate        {:.0} pages/s untracked, {:.0} tracked",
        r.guest_rate_untracked_pps, r.guest_rate_tracked_pps
    );
    if let Some(slow) = r.tracked_slowdown_pct {
        s += &format!(" (slowdown {slow:.1}%)");
    }
    if let (Some(u), Some(t)) = (
        r.guest_cpu_ns_per_write_untracked,
        r.guest_cpu_ns_per_write_tracked,
    ) {
        s += &format!("\nguest CPU         {u:.0} ns per write untracked, {t:.0} tracked");
    }
    if let Some(n) = r.recorded_writes {
        s += &format!("\nrecorded          {n} page writes (harvest time, page)");
    }
    s + "\n"
}
