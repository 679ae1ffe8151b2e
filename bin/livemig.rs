//! The `livemig` command line: parses arguments and calls into the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use livemig::guest::dirty::TrackerKind;
use livemig::guest::process as guest;
use livemig::migration::source::{self, SenderConfig, Source};
use livemig::migration::{destination as receiver, dirtyrate, local as migrate, policy};
use livemig::predict::{model, simulate};
use livemig::report::{self, Report, Status};
use livemig::util::units;
use livemig::wire::ratelimit;

/// `print!` for a command line tool. When stdout fails (its reader has
/// gone, as in a pipe into `head`, or a full disk), printing stops but the
/// work goes on: a migration half done must still finish or resume its
/// source, and write its JSON report. `main` then ends as the failure asks
/// (by SIGPIPE for a closed pipe, as tools do). SIGPIPE itself stays
/// ignored, so a vanished peer is an error on its socket.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if STDOUT_FAILED.get().is_none() {
            if let Err(e) = write!(std::io::stdout(), $($arg)*) {
                let _ = STDOUT_FAILED.set(e.kind());
            }
        }
    }};
}

macro_rules! outln {
    ($($arg:tt)*) => {{
        out!($($arg)*);
        out!("\n");
    }};
}

/// The first failure writing to stdout, if any.
static STDOUT_FAILED: std::sync::OnceLock<std::io::ErrorKind> = std::sync::OnceLock::new();

/// End as a failed stdout asks, once the work is done.
fn stdout_verdict() -> Option<ExitCode> {
    let kind = *STDOUT_FAILED.get()?;
    if kind == std::io::ErrorKind::BrokenPipe {
        // SAFETY: restoring a signal's default action and raising it; the
        // default action of SIGPIPE ends the process.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            libc::raise(libc::SIGPIPE);
        }
    }
    eprintln!("Error: writing to stdout: {}", std::io::Error::from(kind));
    Some(ExitCode::FAILURE)
}

/// A live-migration emulator: real guest memory, real dirty tracking, real TCP.
#[derive(Parser)]
#[command(
    name = "livemig",
    version,
    about,
    propagate_version = true,
    args_override_self = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Migrate a guest between two ends on this machine over loopback (the demo).
    Migrate(MigrateOpts),
    /// Source side: start a guest and migrate it to a receiver on another host.
    Send {
        /// Address of the receiver (host:port).
        #[arg(long)]
        to: String,
        #[command(flatten)]
        opts: SendOpts,
    },
    /// Predict a migration with the analytical pre-copy model.
    Model {
        #[command(flatten)]
        opts: SimulateOpts,
        /// classic (every write a new page: the λ = D/R model) | wws (distinct pages under the workload's pattern)
        #[arg(long, default_value = "wws")]
        variant: String,
    },
    /// Run a grid of real migrations with the model and the simulator beside each, and compare.
    Sweep(SweepOpts),
    /// Simulate a migration with the sender's own policy and rate-limiter code, moving no memory.
    Simulate(SimulateOpts),
    /// Start a guest and keep it running until interrupted (to measure with dirtyrate --pid).
    Run(RunOpts),
    /// Measure a guest's dirty rate and writable working set (like QEMU's calc-dirty-rate).
    Dirtyrate(DirtyRateOpts),
    /// Destination side: accept one migration, resume the guest, verify it.
    Receive {
        /// Address to listen on.
        #[arg(long, default_value = "0.0.0.0:4444")]
        listen: String,
        /// Write the receiver's report as JSON to FILE.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
        /// Make (and preallocate) memory for a guest of this size before
        /// accepting, off the migration's clock; the sender's guest must match.
        #[arg(long, value_name = "SIZE")]
        mem: Option<String>,
        /// Allocate each page at its first arrival instead of up front.
        #[arg(long)]
        no_prealloc: bool,
        /// Post-copy: with each demand fault, also ask for the N pages around it.
        #[arg(long, default_value_t = 0, value_name = "N")]
        prepage: u32,
    },
    /// The guest emulator process (started by send/receive, not by hand).
    #[command(hide = true)]
    Guest(GuestOpts),
}

/// The guest a command starts.
#[derive(Args)]
struct GuestFlags {
    /// Guest memory size (binary units: 256M = 256 MiB).
    #[arg(long, default_value = "256M")]
    mem: String,
    /// Write pattern: idle | uniform:rate=R | hotset:wws=SIZE,rate=R[,hot=F] |
    /// sweep[:from=SIZE,to=SIZE][,rate=R]; R in pages/s (20k, 1.5M) or max.
    /// Content keys, for any kind: zero=F (share of pages that start zero),
    /// random=F (share of each page's bytes that start random),
    /// bytes=N (bytes per write, default 8).
    #[arg(long, default_value = "hotset:wws=32M,rate=50k")]
    workload: String,
    /// Guest vCPU threads sharing the workload.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Dirty tracker: uffd-wp | bitmap | mprotect | soft-dirty
    /// [default: uffd-wp where the kernel has it, else bitmap]
    #[arg(long)]
    tracker: Option<String>,
    /// How long the guest runs, untracked, before migration (or measurement) starts.
    #[arg(long, default_value = "1s")]
    warmup: String,
    /// Seed of the guest's random write stream.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Args)]
struct SendOpts {
    #[command(flatten)]
    guest: GuestFlags,
    /// unlimited | RATE (500mbit, 1gbit, 120MiB/s) | dynamic:min=RATE,max=RATE,inc=RATE
    #[arg(long, default_value = "unlimited")]
    bandwidth: String,
    /// Convergence policy: xen | qemu | fixed:N.
    #[arg(long, default_value = "xen")]
    policy: String,
    /// Downtime the qemu policy aims for.
    #[arg(long, default_value = "300ms")]
    downtime_limit: String,
    /// Stop iterating after this long, whatever the policy says.
    #[arg(long, default_value = "120s")]
    max_time: String,
    /// Write the report as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Print only the summary (no round table, no progress bar).
    #[arg(long)]
    quiet: bool,
    /// After each round, print why the policy went on or stopped, with its numbers.
    #[arg(long)]
    explain: bool,
    /// How memory moves: precopy | postcopy | hybrid[:rounds=N] (N pre-copy
    /// rounds, then post-copy; N defaults to 2) | cold (suspend, copy, resume).
    #[arg(long, default_value = "precopy")]
    mode: String,
    /// TCP connections the pages travel on, sharing one rate limit (QEMU's multifd).
    #[arg(long, default_value_t = 1, value_name = "N")]
    streams: u32,
    /// Compress runs of pages that are not zero: lz4 | zstd.
    #[arg(long, value_name = "CODEC")]
    compress: Option<String>,
    /// Send pages sent before as XBZRLE deltas, with a cache of this size (64M, 1G).
    #[arg(long, value_name = "CACHE_SIZE")]
    xbzrle: Option<String>,
    /// Send zero pages whole instead of as markers.
    #[arg(long)]
    no_zero_pages: bool,
}

#[derive(Args)]
struct MigrateOpts {
    #[command(flatten)]
    send: SendOpts,
    /// Let the receiver allocate each page at its first arrival instead of
    /// before the migration (which QEMU's -mem-prealloc does).
    #[arg(long)]
    no_prealloc: bool,
    /// Post-copy: with each demand fault, also ask for the N pages around it.
    #[arg(long, default_value_t = 0, value_name = "N")]
    prepage: u32,
}

#[derive(Args)]
struct SimulateOpts {
    #[command(flatten)]
    migration: SendOpts,
    /// Network rate when the rate limit allows more.
    #[arg(long, default_value = "10gbit")]
    link: String,
    /// Fixed time each pre-copy round costs besides sending (harvest, acknowledgement).
    #[arg(long, default_value = "100us")]
    round_overhead: String,
    /// Fixed part of the downtime (pause, device state, resume).
    #[arg(long, default_value = "500us")]
    downtime_overhead: String,
    /// Connect and handshake.
    #[arg(long, default_value = "1ms")]
    setup: String,
}

#[derive(Args)]
struct SweepOpts {
    /// Guest memory sizes (repeat the flag) [default: 64M, 128M]
    #[arg(long = "mem", value_name = "SIZE")]
    mems: Vec<String>,
    /// Workloads (repeat the flag; specs contain commas)
    /// [default: hotset:wws=8M,rate=20k, uniform:rate=10k, sweep:rate=50k]
    #[arg(long = "workload", value_name = "SPEC")]
    workloads: Vec<String>,
    /// Bandwidths (repeat the flag) [default: 1gbit, 4gbit]
    #[arg(long = "bandwidth", value_name = "RATE")]
    bandwidths: Vec<String>,
    /// Policies (repeat the flag) [default: xen, qemu]
    #[arg(long = "policy", value_name = "POLICY")]
    policies: Vec<String>,
    /// Migrate to a receiver there instead of over loopback (run
    /// `livemig receive` in a loop on it: each point is one migration).
    #[arg(long)]
    to: Option<String>,
    /// Directory for sweep.csv, sweep.json and the SVG plots.
    #[arg(long, default_value = "sweep-out")]
    out: PathBuf,
    /// The model's variant: classic | wws.
    #[arg(long, default_value = "wws")]
    variant: String,
    /// Also write the results (sweep.json) to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Link goodput for the predictions [default: measured]
    #[arg(long)]
    link: Option<String>,
    /// Fixed cost of a round for the predictions [default: measured]
    #[arg(long)]
    round_overhead: Option<String>,
    /// Fixed part of the downtime for the predictions [default: measured]
    #[arg(long)]
    downtime_overhead: Option<String>,
    /// Guest vCPU threads sharing each workload.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Dirty tracker [default: uffd-wp where the kernel has it, else bitmap]
    #[arg(long)]
    tracker: Option<String>,
    /// Downtime the qemu policy aims for.
    #[arg(long, default_value = "300ms")]
    downtime_limit: String,
    /// Cap on each migration's pre-copy (shorter than migrate's 120 s, so a
    /// point that cannot converge does not hold up the sweep).
    #[arg(long, default_value = "10s")]
    max_time: String,
    /// How long each guest runs before its migration starts.
    #[arg(long, default_value = "200ms")]
    warmup: String,
    /// Seed of the guests' random write streams.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
struct RunOpts {
    #[command(flatten)]
    guest: GuestFlags,
}

#[derive(Args)]
struct DirtyRateOpts {
    #[command(flatten)]
    guest: GuestFlags,
    /// How long to measure, tracked (after the warm-up).
    #[arg(long, default_value = "3s")]
    duration: String,
    /// Measure a running guest (started by `livemig run --tracker uffd-wp`)
    /// instead of starting one; --mem, --workload, --vcpus, --seed are then unused.
    #[arg(long)]
    pid: Option<i32>,
    /// Write the report as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
struct GuestOpts {
    #[arg(long)]
    mem_fd: i32,
    #[arg(long)]
    mem_bytes: u64,
    #[arg(long)]
    control_fd: i32,
    #[arg(long)]
    dirty_fd: Option<i32>,
    #[arg(long, default_value = "bitmap")]
    tracker: String,
    /// Fresh guest: its workload (with --vcpus and --seed).
    #[arg(long, required_unless_present = "incoming")]
    workload: Option<String>,
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Destination guest: wait for the device state in the control block.
    #[arg(long, conflicts_with = "workload")]
    incoming: bool,
}

/// A guest's parsed flags.
struct GuestConfig {
    memory_bytes: u64,
    fresh: guest::Fresh,
    tracker: TrackerKind,
    warmup: std::time::Duration,
}

/// `--tracker` as given, or the kernel's best, saying so when it falls back.
fn choose_tracker(given: Option<&str>) -> Result<TrackerKind> {
    let (tracker, notice) = TrackerKind::choose(given)?;
    if let Some(notice) = notice {
        eprintln!("{notice}");
    }
    Ok(tracker)
}

impl GuestFlags {
    fn config(&self) -> Result<GuestConfig> {
        let memory_bytes = units::parse_bytes("--mem", &self.mem)?;
        let page = livemig::guest::memory::page_size();
        if memory_bytes == 0 || !memory_bytes.is_multiple_of(page) {
            anyhow::bail!(
                "invalid --mem \"{}\": must be a non-zero multiple of the {page}-byte page size",
                self.mem
            );
        }
        let tracker = choose_tracker(self.tracker.as_deref())?;
        Ok(GuestConfig {
            memory_bytes,
            fresh: guest::Fresh {
                workload: self.workload.clone(),
                vcpus: self.vcpus,
                seed: self.seed,
            },
            tracker,
            warmup: units::parse_duration("--warmup", &self.warmup)?,
        })
    }
}

impl SendOpts {
    fn config(&self) -> Result<SenderConfig> {
        let g = self.guest.config()?;
        Ok(SenderConfig {
            memory_bytes: g.memory_bytes,
            workload: g.fresh.workload,
            vcpus: g.fresh.vcpus,
            tracker: g.tracker,
            bandwidth: ratelimit::Bandwidth::parse(&self.bandwidth)?,
            bandwidth_spec: self.bandwidth.clone(),
            policy: policy::parse(&self.policy)?,
            policy_spec: self.policy.clone(),
            downtime_limit: units::parse_duration("--downtime-limit", &self.downtime_limit)?,
            max_time: units::parse_duration("--max-time", &self.max_time)?,
            warmup: g.warmup,
            seed: g.fresh.seed,
            streams: self.streams,
            mode: livemig::migration::postcopy::Mode::parse(&self.mode)
                .map_err(anyhow::Error::msg)?,
            reduction: self.reduction()?,
            progress: !self.quiet,
        })
    }

    fn reduction(&self) -> Result<livemig::wire::datapath::Reduction> {
        let max = livemig::wire::protocol::MAX_STREAMS;
        if !(1..=max).contains(&self.streams) {
            anyhow::bail!(
                "invalid --streams {}: must be between 1 and {max}",
                self.streams
            );
        }
        let xbzrle_cache = match &self.xbzrle {
            Some(v) => {
                if self.streams > 1 {
                    anyhow::bail!(
                        "--xbzrle works on one stream (--streams 1): its cache must see every \
                         send of a page in order"
                    );
                }
                let bytes = units::parse_bytes("--xbzrle", v)?;
                let page = livemig::guest::memory::page_size();
                if bytes < page {
                    anyhow::bail!(
                        "invalid --xbzrle \"{v}\": the cache must hold at least one {page}-byte page"
                    );
                }
                Some(bytes)
            }
            None => None,
        };
        Ok(livemig::wire::datapath::Reduction {
            zero_pages: !self.no_zero_pages,
            compress: self
                .compress
                .as_deref()
                .map(livemig::wire::reduce::Codec::parse)
                .transpose()?,
            xbzrle_cache,
        })
    }
}

impl SimulateOpts {
    fn config(&self) -> Result<simulate::SimConfig> {
        let d = |flag: &str, v: &str| units::parse_duration(flag, v);
        Ok(simulate::SimConfig {
            migration: self.migration.config()?,
            page_size: livemig::guest::memory::page_size(),
            link_bytes_per_s: units::parse_rate("--link", &self.link)? as f64,
            round_overhead: d("--round-overhead", &self.round_overhead)?,
            downtime_overhead: d("--downtime-overhead", &self.downtime_overhead)?,
            setup: d("--setup", &self.setup)?,
        })
    }
}

/// A simulation's or a model's report, printed like a real run's.
fn print_prediction(report: &Report, opts: &SimulateOpts) -> Result<()> {
    let mut print = row_printer(&opts.migration);
    report.rounds.iter().for_each(&mut print);
    finish(report, opts.migration.json.as_deref(), Ok(()))
}

fn sweep(opts: &SweepOpts) -> Result<()> {
    let or = |given: &[String], default: &[&str]| -> Vec<String> {
        match given.is_empty() {
            true => default.iter().map(|s| s.to_string()).collect(),
            false => given.to_vec(),
        }
    };
    let mems = or(&opts.mems, &["64M", "128M"])
        .iter()
        .map(|m| units::parse_bytes("--mem", m))
        .collect::<Result<Vec<_>, _>>()?;
    let d = |flag: &str, v: &str| units::parse_duration(flag, v);
    let cfg = livemig::predict::sweep::SweepConfig {
        mems,
        workloads: or(
            &opts.workloads,
            &[
                "hotset:wws=8M,rate=20k",
                "uniform:rate=10k",
                "sweep:rate=50k",
            ],
        ),
        bandwidths: or(&opts.bandwidths, &["1gbit", "4gbit"]),
        policies: or(&opts.policies, &["xen", "qemu"]),
        base: SenderConfig {
            vcpus: opts.vcpus,
            tracker: choose_tracker(opts.tracker.as_deref())?,
            downtime_limit: d("--downtime-limit", &opts.downtime_limit)?,
            max_time: d("--max-time", &opts.max_time)?,
            warmup: d("--warmup", &opts.warmup)?,
            seed: opts.seed,
            ..SenderConfig::default()
        },
        variant: model::Variant::parse(&opts.variant)?,
        link_bytes_per_s: opts
            .link
            .as_deref()
            .map(|l| units::parse_rate("--link", l).map(|b| b as f64))
            .transpose()?,
        round_overhead: opts
            .round_overhead
            .as_deref()
            .map(|v| d("--round-overhead", v))
            .transpose()?,
        downtime_overhead: opts
            .downtime_overhead
            .as_deref()
            .map(|v| d("--downtime-overhead", v))
            .transpose()?,
    };
    let n = livemig::predict::sweep::grid_size(&cfg)?;
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("creating {}", opts.out.display()))?;
    let bar = match opts.quiet {
        true => indicatif::ProgressBar::hidden(),
        false => indicatif::ProgressBar::new(n as u64).with_style(
            indicatif::ProgressStyle::with_template("{pos}/{len} [{bar:30}] {elapsed} {msg}")
                .expect("valid template")
                .progress_chars("=> "),
        ),
    };
    let mut migrate_one = |c: &SenderConfig| -> Result<Report, String> {
        let (report, result) = match &opts.to {
            None => {
                let (r, res) = migrate::run(c, migrate::Destination::default(), &mut |_| {});
                (r, res.map_err(anyhow::Error::from))
            }
            Some(to) => match Source::start(c.tracker, c.memory_bytes, &c.fresh()) {
                Ok(mut src) => {
                    let (r, res) = source::migrate(c, &mut src, to, &mut |_| {});
                    (r, res.map_err(anyhow::Error::from))
                }
                Err(e) => return Err(format!("{:#}", anyhow::Error::from(e))),
            },
        };
        result.map(|()| report).map_err(|e| format!("{e:#}"))
    };
    let sweep = livemig::predict::sweep::run(&cfg, &mut migrate_one, &mut |row| {
        bar.set_message(row.label.clone());
        bar.inc(1);
    })?;
    bar.finish_and_clear();
    let out = |name: &str| opts.out.join(name);
    std::fs::write(out("sweep.csv"), livemig::predict::sweep::csv(&sweep))
        .with_context(|| format!("writing {}", out("sweep.csv").display()))?;
    for path in std::iter::once(out("sweep.json")).chain(opts.json.clone()) {
        let f =
            std::fs::File::create(&path).with_context(|| format!("writing {}", path.display()))?;
        serde_json::to_writer_pretty(f, &sweep)?;
    }
    let plots = livemig::predict::plot::draw(&sweep.rows, &opts.out)?;
    for c in &sweep.calibration {
        outln!(
            "calibrated at {}: link {:.0} Mbit/s, round overhead {:.3} ms, downtime overhead {:.3} ms",
            units::fmt_bytes(c.memory_bytes),
            c.link_mbps,
            c.round_overhead_ms,
            c.downtime_overhead_ms
        );
    }
    let failed = sweep
        .rows
        .iter()
        .filter(|r| r.measured.error.is_some())
        .count();
    outln!(
        "{} points ({failed} failed migrations), results in {}: sweep.csv, sweep.json, {}",
        sweep.rows.len(),
        opts.out.display(),
        plots
            .iter()
            .filter_map(|p| p.file_name())
            .map(|f| f.to_string_lossy())
            .collect::<Vec<_>>()
            .join(", ")
    );
    out!("{}", livemig::predict::sweep::accuracy_table(&sweep));
    Ok(())
}

/// `livemig run`: a guest that keeps running until SIGINT or SIGTERM.
fn run_guest(opts: &RunOpts) -> Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    let g = opts.guest.config()?;
    anyhow::ensure!(
        !g.tracker.uses_bitmap(),
        "livemig run: --tracker {} cannot be harvested by another process; use uffd-wp or soft-dirty",
        g.tracker.as_str()
    );
    // Block the signals before any thread starts, then wait for them.
    let mut stop = SigSet::empty();
    stop.add(Signal::SIGINT);
    stop.add(Signal::SIGTERM);
    stop.thread_block()?;
    let mut src = Source::start(g.tracker, g.memory_bytes, &g.fresh)?;
    src.release();
    outln!(
        "guest {} running: {} on {} with {} vCPU(s), --tracker {} (interrupt to stop)",
        src.guest.pid(),
        g.fresh.workload,
        units::fmt_bytes(g.memory_bytes),
        g.fresh.vcpus,
        g.tracker.as_str()
    );
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

fn dirtyrate(opts: &DirtyRateOpts) -> Result<()> {
    let g = opts.guest.config()?;
    let cfg = dirtyrate::DirtyRateConfig {
        subject: match opts.pid {
            Some(pid) => dirtyrate::Subject::Attach(pid),
            None => dirtyrate::Subject::Start {
                memory_bytes: g.memory_bytes,
                guest: g.fresh,
            },
        },
        tracker: g.tracker,
        warmup: g.warmup,
        duration: units::parse_duration("--duration", &opts.duration)?,
    };
    let bar = match opts.quiet {
        true => indicatif::ProgressBar::hidden(),
        false => indicatif::ProgressBar::new(1000).with_style(
            indicatif::ProgressStyle::with_template("measuring [{bar:30}] {elapsed}")
                .expect("valid template")
                .progress_chars("=> "),
        ),
    };
    let result = dirtyrate::run(&cfg, &mut |f| bar.set_position((f * 1000.0) as u64));
    bar.finish_and_clear();
    let report = result?;
    out!("{}", dirtyrate::summary(&report));
    if let Some(path) = &opts.json {
        let f = std::fs::File::create(path)
            .with_context(|| format!("writing the report to {}", path.display()))?;
        serde_json::to_writer_pretty(f, &report)?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let result = run(Cli::parse());
    if let Some(code) = stdout_verdict() {
        if let Err(e) = result {
            eprintln!("Error: {e:#}");
        }
        return code;
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Migrate(MigrateOpts {
            send: opts,
            no_prealloc,
            prepage,
        }) => {
            let cfg = opts.config()?;
            let mut print = row_printer(&opts);
            let rx = migrate::Destination {
                prealloc: !no_prealloc,
                prepage,
            };
            let (report, result) = migrate::run(&cfg, rx, &mut print);
            finish(&report, opts.json.as_deref(), result.map_err(Into::into))
        }
        Cmd::Send { to, opts } => {
            let cfg = opts.config()?;
            let mut src = Source::start(cfg.tracker, cfg.memory_bytes, &cfg.fresh())?;
            let mut print = row_printer(&opts);
            let (report, result) = source::migrate(&cfg, &mut src, &to, &mut print);
            finish(&report, opts.json.as_deref(), result.map_err(Into::into))
        }
        Cmd::Dirtyrate(opts) => dirtyrate(&opts),
        Cmd::Run(opts) => run_guest(&opts),
        Cmd::Sweep(opts) => sweep(&opts),
        Cmd::Simulate(opts) => {
            let report = simulate::run(&opts.config()?)?;
            print_prediction(&report, &opts)
        }
        Cmd::Model { opts, variant } => {
            let variant = model::Variant::parse(&variant)?;
            let report = model::run(&opts.config()?, variant)?;
            print_prediction(&report, &opts)
        }
        Cmd::Receive {
            listen,
            json,
            mem,
            no_prealloc,
            prepage,
        } => {
            let listener = receiver::bind(&listen)?;
            let mem = mem.map(|m| units::parse_bytes("--mem", &m)).transpose()?;
            let prepared = receiver::Prepared::new(mem, !no_prealloc, prepage)?;
            eprintln!(
                "livemig: waiting for a migration on {}",
                listener.local_addr()?
            );
            let (r, result) = receiver::receive(&listener, prepared);
            if let Some(path) = json {
                let f = std::fs::File::create(&path)
                    .with_context(|| format!("writing {}", path.display()))?;
                serde_json::to_writer_pretty(f, &r)?;
            }
            result?;
            outln!(
                "received          {} pages from {} in {} rounds ({})",
                r.pages_received,
                r.peer,
                r.round_pages.len(),
                units::fmt_bytes(r.memory_bytes)
            );
            outln!("resume            {:.2} ms", r.resume_ms);
            outln!(
                "verified          {} pages, {} mismatched",
                r.verified_pages,
                r.mismatched_pages
            );
            outln!(
                "guest rate        {:.0} pages/s after resume",
                r.destination_guest_rate_pps
            );
            anyhow::ensure!(
                r.mismatched_pages == 0,
                "{} mismatched pages",
                r.mismatched_pages
            );
            Ok(())
        }
        Cmd::Guest(g) => Ok(guest::run(guest::GuestArgs {
            mem_fd: g.mem_fd,
            memory_bytes: g.mem_bytes,
            control_fd: g.control_fd,
            dirty_fd: g.dirty_fd,
            tracker: TrackerKind::parse(&g.tracker)?,
            fresh: g.workload.map(|workload| guest::Fresh {
                workload,
                vcpus: g.vcpus,
                seed: g.seed,
            }),
        })?),
    }
}

fn row_printer(opts: &SendOpts) -> impl FnMut(&report::RoundReport) {
    let (quiet, explain) = (opts.quiet, opts.explain);
    let mut first = true;
    move |r| {
        if quiet {
            return;
        }
        if std::mem::take(&mut first) {
            outln!("{}", report::round_header());
        }
        outln!("{}", report::round_row(r));
        if explain && !r.decision.is_empty() {
            outln!("      {}", r.decision);
        }
    }
}

/// Print the summary, write the JSON report (failed runs too), pass the error on.
fn finish(report: &Report, json: Option<&std::path::Path>, result: Result<()>) -> Result<()> {
    if report.status == Status::Completed || !report.rounds.is_empty() {
        out!("{}", report::summary(report));
    }
    if let Some(path) = json {
        report
            .write_json(path)
            .with_context(|| format!("writing the report to {}", path.display()))?;
    }
    result.map_err(|e| match report.source_guest_kept_running {
        true => e.context("migration failed, the source guest kept running"),
        false => e,
    })
}
