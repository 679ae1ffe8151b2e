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
//! confirmed it runs, the source guest is resumed. So does a cancel
//! ([`SenderConfig::cancel`]), noticed between runs of pages and in the rate
//! limiter's waits; the receiver is told with an `Abort`
//! ([`crate::migration::cancel`]). After a post-copy switch-over the
//! destination keeps the guest: the push finishes first.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::guest::control::{Control, Throttle};
use crate::guest::cpucap::CpuCap;
use crate::guest::dirty::{DirtySet, SharedBitmap, Target, Tracker, TrackerKind};
use crate::guest::memory::GuestMemory;
use crate::guest::process::{Fresh, Guest, GuestError};
use crate::guest::workload::{Layout, Workload};
use crate::migration::machine::Migration;
use crate::migration::phases::Mode;
use crate::migration::policy::{Policy, PolicyConfig};
use crate::migration::sampler::{Probe, Sampler, Sampling};
use crate::migration::throttle::Throttling;
use crate::report::{ms, Report, RoundReport, Status};
use crate::util::cancel::Cancel;
use crate::util::page::PageSize;
use crate::util::units::PageRate;
use crate::wire::datapath::Reduction;
use crate::wire::ratelimit::Bandwidth;
use crate::wire::transport::Security;

mod streams;
mod tcp;
mod teleport;
mod usage;

pub use streams::SendError;
use tcp::Tcp;

/// Everything `livemig send` / `migrate` needs to know.
#[derive(Clone, Debug)]
pub struct SenderConfig {
    pub memory_bytes: u64,
    pub workload: Workload,
    pub vcpus: u32,
    pub tracker: TrackerKind,
    pub bandwidth: Bandwidth,
    pub policy: Policy,
    pub downtime_limit: Duration,
    /// Bytes/s the switch-over will have (qemu policy; None: measured).
    pub switchover_bandwidth: Option<u64>,
    pub max_time: Duration,
    pub warmup: Duration,
    pub seed: u64,
    /// TCP connections the pages travel on (QEMU's multifd channels).
    pub streams: u32,
    pub mode: Mode,
    pub reduction: Reduction,
    /// Draw a progress bar (only drawn when stderr is a terminal).
    pub progress: bool,
    /// Slowing the guest down to converge (auto-converge, dirty limit).
    pub throttling: Throttling,
    /// Fires to cancel the migration (SIGINT or SIGTERM on the command
    /// line); a new token never does.
    pub cancel: Cancel,
    /// How every connection is secured (`--tls-*`, `--psk`).
    pub security: Security,
    /// `--cpu-cap`: the source guest's CPU limit during the migration.
    pub cpu_cap: Option<CpuCap>,
    /// The timeline's sampling (`report.timeline`, `report.impact`).
    pub sampling: Sampling,
    /// Page-cache teleportation (`--teleport FILE`, `--teleport-share`).
    pub teleport: Option<crate::migration::teleport::TeleportConfig>,
}

impl Default for SenderConfig {
    /// The command line's defaults, with the `bitmap` tracker (which every
    /// kernel has) and no progress bar.
    fn default() -> Self {
        Self {
            memory_bytes: 256 << 20,
            workload: "hotset:wws=32M,rate=50k".parse().expect("a valid spec"),
            vcpus: 1,
            tracker: TrackerKind::Bitmap,
            bandwidth: Bandwidth::Unlimited,
            policy: Policy::Xen,
            downtime_limit: Duration::from_millis(300),
            switchover_bandwidth: None,
            max_time: Duration::from_secs(120),
            warmup: Duration::from_secs(1),
            seed: 1,
            streams: 1,
            mode: Mode::Precopy,
            reduction: Reduction::default(),
            progress: false,
            throttling: Throttling::Off,
            cancel: Cancel::new(),
            security: Security::Plain,
            cpu_cap: None,
            sampling: Sampling::Auto,
            teleport: None,
        }
    }
}

impl SenderConfig {
    /// What the convergence policy decides on, for `page_size`-byte pages.
    pub fn policy_config(&self, page_size: PageSize) -> PolicyConfig {
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
            switchover_bandwidth: self.switchover_bandwidth,
            max_time: self.max_time,
            throttling: self.throttling,
        }
    }

    /// The guest this configuration starts.
    pub fn fresh(&self) -> Fresh {
        Fresh {
            workload: self.workload.clone(),
            vcpus: self.vcpus,
            seed: self.seed,
            disk: self.teleport.as_ref().map(|t| t.file.clone()),
        }
    }

    /// A report describing this configuration, its figures still to come.
    pub fn report(&self) -> Report {
        Report {
            mode: self.mode.as_str(),
            tracker: self.tracker.as_str().into(),
            policy: self.policy.to_string(),
            bandwidth: self.bandwidth.to_string(),
            workload: self.workload.to_string(),
            vcpus: self.vcpus,
            memory_bytes: self.memory_bytes,
            page_size: PageSize::host().as_u64(),
            streams: self.streams,
            transport: self.security.name().into(),
            compress: self.reduction.compress.map(|c| c.to_string()),
            xbzrle_cache_bytes: self.reduction.xbzrle_cache,
            teleport: self
                .teleport
                .as_ref()
                .map(|_| crate::report::TeleportStats::default()),
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
    pub workload: Layout,
    /// From spawning the guest until every vCPU runs: its memory
    /// populated and stamped (the report's `guest_start_ms`).
    pub guest_start: Duration,
    /// The page -> block mapping the guest published (`cache=F`).
    pub cache_map: Option<crate::guest::cache::CacheMap>,
}

impl Source {
    /// Validate the guest's configuration, create its memory, start it with
    /// `tracker` set up and wait until it runs.
    pub fn start(
        tracker: TrackerKind,
        memory_bytes: u64,
        fresh: &Fresh,
    ) -> Result<Self, SendError> {
        let page_size = PageSize::host();
        let workload = crate::guest::process::check_config(
            &fresh.workload,
            memory_bytes,
            page_size,
            fresh.vcpus,
        )?;
        crate::guest::memory::check_fits(
            &format!("a guest of {}", crate::util::units::fmt_bytes(memory_bytes)),
            memory_bytes,
        )?;
        if let Some(cache) = &workload.content.cache {
            // Refuse a missing or short file here, in one line, rather
            // than as a guest that exits.
            let map =
                crate::guest::cache::CacheMap::compute(cache, fresh.seed, workload.page_count);
            let no_disk = || crate::guest::cache::CacheError::NoDisk(fresh.workload.to_string());
            let disk = fresh
                .disk
                .as_deref()
                .ok_or_else(no_disk)
                .map_err(GuestError::from)?;
            crate::guest::cache::open_disk(disk, map.blocks_needed(), page_size)
                .map_err(GuestError::from)?;
        }
        let mem = Arc::new(GuestMemory::create(memory_bytes, page_size)?);
        let bitmap = match tracker.uses_bitmap() {
            true => Some(SharedBitmap::create(mem.page_count())?),
            false => None,
        };
        let control = Control::create()?;
        let spawned = Instant::now();
        let mut guest = Guest::spawn(&mem, control.clone(), bitmap.as_ref(), tracker, Some(fresh))?;
        // The guest publishes where its memory is mapped before it runs.
        guest.wait_running()?;
        let guest_start = spawned.elapsed();
        let cache_map = guest.cache_map(mem.page_count())?;
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
            guest_start,
            cache_map,
        })
    }

    /// A sampler of this guest's timeline, started now, as `cfg` asks.
    pub fn sampler(&self, cfg: &SenderConfig) -> Option<Sampler> {
        let period = cfg.sampling.period(cfg.memory_bytes)?;
        let probe = Probe::new(self.guest.control().clone(), cfg.vcpus);
        if cfg.workload.counts_operations() {
            let (control, vcpus) = (self.guest.control().clone(), cfg.vcpus);
            probe.count_operations(Box::new(move || control.work_ops(vcpus)));
        }
        Some(Sampler::start(probe, period))
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
    let sampler = src.sampler(cfg);
    let (mut report, result) = migrate_sampled(cfg, src, addr, on_round, sampler.as_ref());
    if let Some(s) = sampler {
        s.finish_into(&mut report);
    }
    (report, result)
}

/// [`migrate`], its timeline sampled by `sampler` (left running: the
/// caller may watch the destination's guest before finishing it).
pub fn migrate_sampled(
    cfg: &SenderConfig,
    src: &mut Source,
    addr: &str,
    on_round: &mut dyn FnMut(&RoundReport),
    sampler: Option<&Sampler>,
) -> (Report, Result<(), SendError>) {
    let report = Report {
        source_guest_pid: Some(src.guest.pid()),
        guest_start_ms: Some(ms(src.guest_start)),
        guest_target_rate_pps: match (src.workload.is_idle(), src.workload.rate) {
            (false, PageRate::PerSec(r)) => Some(r),
            _ => None,
        },
        ..cfg.report()
    };
    let usage = match usage::Usage::start(cfg.cpu_cap, src) {
        Ok(u) => u,
        Err(e) => {
            let report = Report {
                error: Some(crate::util::error::error_chain(&e)),
                status: Status::Failed,
                source_guest_kept_running: true,
                ..report
            };
            return (report, Err(e));
        }
    };
    let page_size = src.mem.page_size();
    let tcp = Tcp::new(cfg, src, addr, on_round, sampler.map(|s| s.probe().clone()));
    let mut m = Migration::new(tcp, cfg.mode, cfg.policy_config(page_size), report);
    let result = m.run();
    let Migration {
        backend: tcp,
        mut report,
        ..
    } = m;
    tcp.progress.finish_and_clear();
    usage.finish(tcp.at_pause, &tcp.src.guest, &mut report);
    if cfg.tracker == TrackerKind::Mprotect {
        let b = tcp.src.guest.control().block();
        report.tracker_faults = Some(b.tracker_faults.load(Ordering::Relaxed));
        report.tracker_coalesced = Some(b.tracker_coalesced.load(Ordering::Relaxed));
    }
    if let Some(start) = tcp.start {
        report.total_time_ms = ms(start.elapsed());
    }
    if let Some(tp) = &tcp.teleport {
        report.teleport = Some(tp.stats.clone());
    }
    let result = match (result, tcp.cancelled_in) {
        (Ok(()), Some(phase)) if report.status == Status::Cancelled => Err(SendError::Cancelled {
            why: cfg
                .cancel
                .why()
                .unwrap_or(crate::util::cancel::Why::Requested),
            during: crate::migration::cancel::describe(phase),
            kept: match phase.destination_runs() {
                true => "the destination runs the guest",
                false if report.source_guest_kept_running => {
                    "the source guest was resumed and ran until this command ended"
                }
                false => "the source guest could not be resumed",
            },
        }),
        (r, _) => r,
    };
    if let Err(e) = &result {
        report.error = Some(crate::util::error::error_chain(e));
    }
    (report, result)
}

/// Resume the source after a failure and check it really runs on: alive,
/// and writing if its workload writes fast enough to see within a second.
fn src_resume(src: &mut Source) -> Result<bool, GuestError> {
    // The source runs on as it was: unthrottled.
    src.guest.control().set_throttle(Throttle::Off);
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
        // The second line: the gauge of the dirty set against the policy's
        // threshold (crate::migration::gauge), set after each round.
        ProgressStyle::with_template("{msg:>14} [{bar:30}] {pos}/{len} pages {per_sec}\n{prefix}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb
}
