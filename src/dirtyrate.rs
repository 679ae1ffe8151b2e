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

use crate::dirty::{DirtySet, TrackerKind};
use crate::guest::Fresh;
use crate::sender::{SendError, Source};

/// How often the tracker harvests; every window is a multiple of it.
pub const TICK: Duration = Duration::from_millis(10);
/// Window lengths, in ticks (30 ms, 100 ms, 1 s).
const WINDOW_TICKS: [u32; 3] = [3, 10, 100];

/// What `livemig dirtyrate` runs.
#[derive(Clone, Debug)]
pub struct DirtyRateConfig {
    pub memory_bytes: u64,
    pub guest: Fresh,
    pub tracker: TrackerKind,
    /// Untracked run before measuring (the baseline write rate).
    pub warmup: Duration,
    /// How long to measure while tracked.
    pub duration: Duration,
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
}

/// Start a guest, measure it, stop it. `on_tick` sees the progress (0..=1).
pub fn run(
    cfg: &DirtyRateConfig,
    on_tick: &mut dyn FnMut(f64),
) -> Result<DirtyRateReport, SendError> {
    let mut src = Source::start(cfg.tracker, cfg.memory_bytes, &cfg.guest)?;
    let page_size = src.mem.page_size();
    let pages = src.mem.page_count();
    let (cpu0, ops_w) = (src.guest.cpu_time(), src.guest.ops());
    let untracked = src.guest.measure_rate(cfg.warmup)?;
    let cpu_untracked = per_write(src.guest.cpu_time() - cpu0, src.guest.ops() - ops_w);

    // The first harvest starts tracking (and reports the warm-up's writes).
    let mut tick = DirtySet::new(pages);
    src.harvest(&mut tick, false)?;
    let (t0, ops0, cpu0) = (Instant::now(), src.guest.ops(), src.guest.cpu_time());
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
        let took = src.harvest(&mut tick, false)?;
        (harvests, harvest_total, harvest_max) =
            (harvests + 1, harvest_total + took, harvest_max.max(took));
        total.union(&tick);
        let now = Instant::now();
        windows.iter_mut().for_each(|w| w.add(&tick, now));
        on_tick((t0.elapsed().as_secs_f64() / cfg.duration.as_secs_f64()).min(1.0));
    }
    let elapsed = t0.elapsed();
    let tracked = (src.guest.ops() - ops0) as f64 / elapsed.as_secs_f64();
    let cpu_tracked = per_write(src.guest.cpu_time() - cpu0, src.guest.ops() - ops0);
    src.guest.check_alive()?;

    let windows: Vec<WindowStats> = windows.iter().map(Window::stats).collect();
    let rate = windows.iter().rev().find_map(|w| w.dirty_rate_pps);
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    Ok(DirtyRateReport {
        tracker: cfg.tracker.as_str().into(),
        workload: cfg.guest.workload.clone(),
        vcpus: cfg.guest.vcpus,
        memory_bytes: cfg.memory_bytes,
        page_size,
        duration_ms: ms(elapsed),
        dirty_rate_pps: rate,
        dirty_rate_mbps: rate.map(|r| r * page_size as f64 / 1e6),
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
    })
}

fn per_write(cpu: Duration, writes: u64) -> Option<f64> {
    (writes > 0).then(|| cpu.as_nanos() as f64 / writes as f64)
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
    use crate::units::fmt_bytes;
    let ps = r.page_size;
    let mut s = format!(
        "dirtyrate         {} tracker, {}, {} vCPU(s), {}, measured {:.0} ms\n",
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
    s + "\n"
}
