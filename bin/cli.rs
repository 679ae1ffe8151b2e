//! The command line: clap structs whose flags arrive typed (each through
//! its type's `FromStr`), the checks that span flags, and the one place
//! errors are given the name of the flag at fault.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{Args, Parser, Subcommand};

use livemig::guest::args::{Fresh, GuestArgs};
use livemig::guest::control::MAX_VCPUS;
use livemig::guest::dirty::{DirtyError, TrackerKind};
use livemig::guest::workload::{Workload, WorkloadError};
use livemig::migration::phases::Mode;
use livemig::migration::policy::Policy;
use livemig::migration::source::SenderConfig;
use livemig::migration::throttle::{AutoConverge, DirtyLimit, ThrottleError, Throttling};
use livemig::predict::model::Variant;
use livemig::predict::simulate::{SimConfig, SimulateError};
use livemig::util::error::error_chain;
use livemig::util::page::PageSize;
use livemig::util::units::{fmt_bytes, Rate, Size, Span};
use livemig::wire::datapath::Reduction;
use livemig::wire::ratelimit::Bandwidth;
use livemig::wire::reduce::Codec;
use livemig::wire::transport::{Security, TlsFiles};

/// A live-migration emulator: real guest memory, real dirty tracking, real TCP.
#[derive(Parser)]
#[command(
    name = "livemig",
    version,
    about,
    propagate_version = true,
    args_override_self = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Migrate a guest between two ends on this machine over loopback (the demo).
    Migrate(MigrateOpts),
    /// Print a saved report's round table and summary again.
    Report(crate::saved::ReportOpts),
    /// Draw saved reports' timelines in one SVG (one redrawn, several overlaid).
    Plot(crate::saved::PlotOpts),
    /// Source side: start a guest and migrate it to a receiver on another host.
    Send {
        /// Address of the receiver (host:port).
        #[arg(long)]
        to: String,
        #[command(flatten)]
        opts: SendOpts,
        #[command(flatten)]
        security: SecurityFlags,
        #[command(flatten)]
        go: crate::go::GoOpts,
    },
    /// Predict a migration with the analytical pre-copy model.
    Model {
        #[command(flatten)]
        opts: SimulateOpts,
        /// classic (every write a new page: the λ = D/R model) | wws (distinct pages under the workload's pattern)
        #[arg(long, default_value = "wws")]
        variant: Variant,
    },
    /// Run a grid of real migrations with the model and the simulator beside each, and compare.
    Sweep(SweepOpts),
    /// Migrate many VMs over shared links by a strategy (sequential, parallel, batch:K, ...).
    Plan(Box<crate::plan::PlanOpts>),
    /// Simulate a migration with the sender's own policy and rate-limiter code, moving no memory.
    Simulate(SimulateOpts),
    /// Start a guest and keep it running until interrupted (to measure with dirtyrate --pid).
    Run(RunOpts),
    /// Measure a guest's dirty rate and writable working set (like QEMU's calc-dirty-rate).
    Dirtyrate(DirtyRateOpts),
    /// Destination side: accept one migration, resume the guest, verify it.
    Receive(ReceiveOpts),
    /// Make a CA and a certificate per host for --tls-*: DIR/ca.crt, ca.key, HOST.crt, HOST.key (PEM).
    Certs {
        /// Directory to write the files into (made if missing).
        dir: PathBuf,
        /// Host names or IP addresses, comma-separated; each certificate
        /// also names localhost and 127.0.0.1, for loopback tests.
        #[arg(long, value_delimiter = ',', required = true, value_name = "HOST,...")]
        hosts: Vec<String>,
    },
    /// The guest emulator process (started by send/receive, not by hand).
    #[command(hide = true)]
    Guest(GuestArgs),
    /// The floors of a downtime's steps on this machine, as JSON.
    #[command(hide = true)]
    Floors(crate::floors::FloorsOpts),
}

#[derive(Args)]
pub struct ReceiveOpts {
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:4444")]
    pub listen: String,
    /// Write the receiver's report as JSON to FILE (with --serve: one line
    /// per migration, appended).
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Make (and preallocate) memory for a guest of this size before
    /// accepting, off the migration's clock; the sender's guest must match.
    #[arg(long, value_name = "SIZE")]
    pub mem: Option<Size>,
    /// Allocate each page at its first arrival instead of up front.
    #[arg(long)]
    pub no_prealloc: bool,
    /// Post-copy: with each demand fault, also ask for the N pages around it.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub prepage: u32,
    /// Keep accepting migrations, one after another, each into a guest of
    /// its own, until SIGINT or SIGTERM.
    #[arg(long)]
    pub serve: bool,
    #[command(flatten)]
    pub security: SecurityFlags,
    #[command(flatten)]
    pub teleport: crate::teleport::ReceiveTeleportFlags,
}

/// The guest a command starts.
#[derive(Args)]
pub struct GuestFlags {
    /// Guest memory size (binary units: 256M = 256 MiB).
    #[arg(long, default_value = "256M")]
    pub mem: Size,
    /// Write pattern: idle | uniform:rate=R | hotset:wws=SIZE,rate=R[,hot=F] |
    /// sweep[:from=SIZE,to=SIZE][,rate=R]; R in pages/s (20k, 1.5M) or max.
    /// Content keys, for any kind: zero=F (share of pages that start zero),
    /// random=F (share of each page's bytes that start random),
    /// bytes=N (bytes per write, default 8).
    #[arg(long, default_value = "hotset:wws=32M,rate=50k")]
    pub workload: Workload,
    /// Guest vCPU threads sharing the workload.
    #[arg(long, default_value_t = 1, value_parser = vcpus())]
    pub vcpus: u32,
    /// Dirty tracker: uffd-wp | bitmap | mprotect | soft-dirty
    /// [default: uffd-wp where the kernel has it, else bitmap]
    #[arg(long)]
    pub tracker: Option<TrackerKind>,
    /// How long the guest runs, untracked, before migration (or measurement) starts.
    #[arg(long, default_value = "1s")]
    pub warmup: Span,
    /// Seed of the guest's random write stream.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

#[derive(Args)]
pub struct SendOpts {
    #[command(flatten)]
    pub guest: GuestFlags,
    /// unlimited | RATE (500mbit, 1gbit, 120MiB/s) | dynamic:min=RATE,max=RATE,inc=RATE
    #[arg(long, default_value = "unlimited")]
    pub bandwidth: Bandwidth,
    /// Convergence policy: xen | qemu | threshold | fixed:N.
    #[arg(long, default_value = "xen")]
    pub policy: Policy,
    #[command(flatten)]
    pub switchover: crate::switchover::SwitchoverFlags,
    /// Downtime the qemu policy aims for.
    #[arg(long, default_value = "300ms")]
    pub downtime_limit: Span,
    /// Stop iterating after this long, whatever the policy says.
    #[arg(long, default_value = "120s")]
    pub max_time: Span,
    /// Write the report as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Print only the summary (no round table, no progress bar).
    #[arg(long)]
    pub quiet: bool,
    /// After each round, print why the policy went on or stopped, with its numbers.
    #[arg(long)]
    pub explain: bool,
    /// How memory moves: precopy | postcopy | hybrid[:rounds=N] (N pre-copy
    /// rounds, then post-copy; N defaults to 2) | cold (suspend, copy, resume).
    #[arg(long, default_value = "precopy")]
    pub mode: Mode,
    /// TCP connections the pages travel on, sharing one rate limit (QEMU's multifd).
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub streams: u32,
    /// Compress runs of pages that are not zero: lz4 | zstd.
    #[arg(long, value_name = "CODEC")]
    pub compress: Option<Codec>,
    /// Send pages sent before as XBZRLE deltas, with a cache of this size (64M, 1G).
    #[arg(long, value_name = "CACHE_SIZE")]
    pub xbzrle: Option<Size>,
    /// Send zero pages whole instead of as markers.
    #[arg(long)]
    pub no_zero_pages: bool,
    #[command(flatten)]
    pub throttle: ThrottleFlags,
    #[command(flatten)]
    pub cap: crate::cap::CapFlags,
    #[command(flatten)]
    pub timeline: crate::timeline::TimelineFlags,
    #[command(flatten)]
    pub teleport: crate::teleport::TeleportFlags,
}

/// Slowing the guest down so pre-copy converges, with QEMU's rules and defaults.
#[derive(Args)]
#[command(next_help_heading = "Throttling")]
pub struct ThrottleFlags {
    /// QEMU's auto-converge: when the guest dirties more than
    /// --throttle-trigger % of what was sent in a period (of at least 1 s),
    /// for the second time, throttle its vCPUs (a throttled vCPU sleeps
    /// PCT/(100-PCT) of each 10 ms it runs).
    #[arg(long)]
    pub auto_converge: bool,
    /// First throttle, percent.
    #[arg(
        long,
        value_name = "PCT",
        default_value_t = 20,
        requires = "auto_converge"
    )]
    pub throttle_initial: u32,
    /// Added at each later step, percent.
    #[arg(
        long,
        value_name = "PCT",
        default_value_t = 10,
        requires = "auto_converge"
    )]
    pub throttle_increment: u32,
    /// Highest throttle, percent (at most 99).
    #[arg(
        long,
        value_name = "PCT",
        default_value_t = 99,
        requires = "auto_converge"
    )]
    pub throttle_max: u32,
    /// Dirtied bytes, as a percentage of the bytes sent in a period, above which a period counts.
    #[arg(long, value_name = "PCT", default_value_t = 50)]
    pub throttle_trigger: u32,
    /// Step less than --throttle-increment when less would bring the dirtying down to the trigger.
    #[arg(long, requires = "auto_converge")]
    pub throttle_tailslow: bool,
    /// QEMU's dirty limit: once the trigger is met twice, cap each vCPU at
    /// RATE writes per second (20k, 1.5M).
    #[arg(long, value_name = "RATE", value_parser = page_rate)]
    pub dirty_limit: Option<u64>,
    /// The dirty limit's window: the guest never writes more than RATE x DUR
    /// beyond its pace (1ms..1s).
    #[arg(
        long,
        value_name = "DUR",
        default_value = "1s",
        requires = "dirty_limit"
    )]
    pub dirty_limit_period: Span,
}

/// A whole number of pages per second (`max` is no limit).
fn page_rate(s: &str) -> Result<u64, String> {
    match livemig::util::units::parse_page_rate(s).map_err(|e| e.to_string())? {
        // f64 -> u64 saturates; a page rate.
        livemig::util::units::PageRate::PerSec(r) => Ok(r.round() as u64),
        livemig::util::units::PageRate::Max => Err("give a rate in pages/s, like 20k".into()),
    }
}

impl ThrottleFlags {
    /// The throttling asked for, checked against the workload's rate.
    pub fn config(&self, workload: &Workload, vcpus: u32) -> Result<Throttling> {
        let t = match (self.auto_converge, self.dirty_limit) {
            (false, None) => Throttling::Off,
            (true, Some(_)) => bail!("{}", ThrottleError::Both),
            (true, None) => Throttling::AutoConverge(AutoConverge {
                initial: self.throttle_initial,
                increment: self.throttle_increment,
                max: self.throttle_max,
                trigger: self.throttle_trigger,
                tailslow: self.throttle_tailslow,
            }),
            (false, Some(pps)) => Throttling::DirtyLimit(DirtyLimit {
                pps,
                period: self.dirty_limit_period.0,
            }),
        };
        let rate = match workload.rate {
            livemig::util::units::PageRate::PerSec(r) => Some(r / f64::from(vcpus.max(1))),
            livemig::util::units::PageRate::Max => None,
        };
        t.check(rate).map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(t)
    }
}

#[derive(Args)]
pub struct MigrateOpts {
    #[command(flatten)]
    pub send: SendOpts,
    /// Let the receiver allocate each page at its first arrival instead of
    /// before the migration (which QEMU's -mem-prealloc does).
    #[arg(long)]
    pub no_prealloc: bool,
    /// Post-copy: with each demand fault, also ask for the N pages around it.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub prepage: u32,
    #[command(flatten)]
    pub observe: crate::timeline::ObserveFlags,
    #[command(flatten)]
    pub security: SecurityFlags,
}

/// Who may connect, and whether pages travel encrypted. Without these,
/// only loopback addresses are allowed (or any, with --insecure).
#[derive(Args)]
pub struct SecurityFlags {
    /// Mutual TLS on every connection: this end's certificate (PEM; `livemig certs` makes one).
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// TLS: this end's private key (PEM).
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// TLS: the CA certificate (PEM) that must have signed the other end's certificate.
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// TLS: accept only a peer whose certificate names NAME (repeat the flag; like QEMU's tls-authz).
    #[arg(long, value_name = "NAME")]
    pub tls_allow: Vec<String>,
    /// Authenticate both ends with the pre-shared key in FILE (16 bytes or more):
    /// it decides who may connect (a challenge-response with HMAC-SHA-256 on
    /// every connection), but encrypts nothing: pages travel in the clear and
    /// can be read or altered on the way. Use --tls-* for that.
    #[arg(long, value_name = "FILE")]
    pub psk: Option<PathBuf>,
    /// Allow an unauthenticated connection to or from an address that is not loopback.
    #[arg(long)]
    pub insecure: bool,
}

impl SecurityFlags {
    /// The security the flags ask for, refusing a plain end at `addr`
    /// that is not loopback (`what`: "listen on" or "send to").
    pub fn config(&self, what: &'static str, addr: &str) -> Result<Security> {
        let tls = [&self.tls_cert, &self.tls_key, &self.tls_ca];
        let given = tls.iter().filter(|f| f.is_some()).count();
        let security = match (&self.tls_cert, &self.tls_key, &self.tls_ca, &self.psk) {
            _ if given > 0 && self.psk.is_some() => {
                bail!("--psk and --tls-* exclude each other: choose one")
            }
            (Some(cert), Some(key), Some(ca), None) => Security::tls(&TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                ca: ca.clone(),
                allow: self.tls_allow.clone(),
            })?,
            _ if given > 0 => {
                bail!("--tls-cert, --tls-key and --tls-ca go together: give all three")
            }
            _ if !self.tls_allow.is_empty() => {
                bail!("--tls-allow needs --tls-cert, --tls-key and --tls-ca")
            }
            (_, _, _, Some(psk)) => Security::psk(psk)?,
            _ => Security::Plain,
        };
        security.check_exposure(what, addr, self.insecure)?;
        Ok(security)
    }
}

#[derive(Args)]
pub struct SimulateOpts {
    #[command(flatten)]
    pub migration: SendOpts,
    /// Network rate when the rate limit allows more.
    #[arg(long, default_value = "10gbit")]
    pub link: Rate,
    /// Fixed time each pre-copy round costs besides sending (harvest, acknowledgement).
    #[arg(long, default_value = "100us")]
    pub round_overhead: Span,
    /// Fixed part of the downtime (pause, device state, resume).
    #[arg(long, default_value = "500us")]
    pub downtime_overhead: Span,
    /// Connect and handshake.
    #[arg(long, default_value = "1ms")]
    pub setup: Span,
    #[command(flatten)]
    pub harvest: crate::harvest_cost::HarvestCost,
}

#[derive(Args)]
pub struct SweepOpts {
    /// Guest memory sizes (repeat the flag)
    #[arg(long = "mem", value_name = "SIZE", default_values = ["64M", "128M"])]
    pub mems: Vec<Size>,
    /// Workloads (repeat the flag; specs contain commas)
    #[arg(long = "workload", value_name = "SPEC",
          default_values = ["hotset:wws=8M,rate=20k", "uniform:rate=10k", "sweep:rate=50k"])]
    pub workloads: Vec<Workload>,
    /// Bandwidths (repeat the flag)
    #[arg(long = "bandwidth", value_name = "RATE", default_values = ["1gbit", "4gbit"])]
    pub bandwidths: Vec<Bandwidth>,
    /// Policies (repeat the flag)
    #[arg(long = "policy", value_name = "POLICY", default_values = ["xen", "qemu"])]
    pub policies: Vec<Policy>,
    /// Run every point twice: without throttling, and with QEMU's
    /// auto-converge at its defaults.
    #[arg(long)]
    pub auto_converge: bool,
    /// Migrate to a receiver there instead of over loopback (run
    /// `livemig receive` in a loop on it: each point is one migration).
    #[arg(long)]
    pub to: Option<String>,
    /// Directory for sweep.csv, sweep.json and the SVG plots.
    #[arg(long, default_value = "sweep-out")]
    pub out: PathBuf,
    /// The model's variant: classic | wws.
    #[arg(long, default_value = "wws")]
    pub variant: Variant,
    /// Also write the results (sweep.json) to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Link goodput for the predictions [default: measured]
    #[arg(long)]
    pub link: Option<Rate>,
    /// Fixed cost of a round for the predictions [default: measured]
    #[arg(long)]
    pub round_overhead: Option<Span>,
    /// Fixed part of the downtime for the predictions [default: measured]
    #[arg(long)]
    pub downtime_overhead: Option<Span>,
    #[command(flatten)]
    pub harvest: crate::harvest_cost::CalibratedHarvestCost,
    /// Guest vCPU threads sharing each workload.
    #[arg(long, default_value_t = 1, value_parser = vcpus())]
    pub vcpus: u32,
    /// Dirty tracker [default: uffd-wp where the kernel has it, else bitmap]
    #[arg(long)]
    pub tracker: Option<TrackerKind>,
    /// Downtime the qemu policy aims for.
    #[arg(long, default_value = "300ms")]
    pub downtime_limit: Span,
    /// Cap on each migration's pre-copy (shorter than migrate's 120 s, so a
    /// point that cannot converge does not hold up the sweep).
    #[arg(long, default_value = "10s")]
    pub max_time: Span,
    #[command(flatten)]
    pub teleport: crate::teleport::SweepTeleportFlags,
    /// How long each guest runs before its migration starts.
    #[arg(long, default_value = "200ms")]
    pub warmup: Span,
    /// Seed of the guests' random write streams.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Args)]
pub struct RunOpts {
    #[command(flatten)]
    pub guest: GuestFlags,
}

#[derive(Args)]
pub struct DirtyRateOpts {
    #[command(flatten)]
    pub guest: GuestFlags,
    /// How long to measure, tracked (after the warm-up).
    #[arg(long, default_value = "3s")]
    pub duration: Span,
    #[command(flatten)]
    pub record: crate::record::RecordFlags,
    /// Measure a running guest (started by `livemig run --tracker uffd-wp`)
    /// instead of starting one; --mem, --workload, --vcpus, --seed are then unused.
    #[arg(long)]
    pub pid: Option<i32>,
    /// Write the report as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

fn vcpus() -> clap::builder::RangedI64ValueParser<u32> {
    clap::value_parser!(u32).range(1..=i64::from(MAX_VCPUS))
}

/// A clap error as one line for `Error: ...`: a value that did not parse
/// as `invalid --flag "value": why`, like every other bad value.
pub fn one_line(e: &clap::Error) -> String {
    if e.kind() == ErrorKind::ValueValidation {
        if let (Some(ContextValue::String(arg)), Some(ContextValue::String(value))) = (
            e.get(ContextKind::InvalidArg),
            e.get(ContextKind::InvalidValue),
        ) {
            let flag = arg.split_whitespace().next().unwrap_or(arg);
            let why = std::error::Error::source(e).map_or(String::new(), error_chain);
            return format!("invalid {flag} \"{value}\": {why}");
        }
    }
    if e.kind() == ErrorKind::MissingRequiredArgument {
        if let Some(ContextValue::Strings(missing)) = e.get(ContextKind::InvalidArg) {
            let flags: Vec<&str> = missing
                .iter()
                .filter_map(|a| a.split_whitespace().next())
                .collect();
            return format!("missing {}: a flag given needs it", flags.join(", "));
        }
    }
    let text = e.render().to_string();
    let first = text.lines().next().unwrap_or_default();
    first.strip_prefix("error: ").unwrap_or(first).to_string()
}

/// A guest's checked flags.
pub struct GuestConfig {
    pub memory_bytes: u64,
    pub fresh: Fresh,
    pub tracker: TrackerKind,
    pub warmup: Duration,
}

/// Refuse `--mem` the machine cannot hold `copies` times over (a local
/// migration holds guest memory twice), before any guest is started.
pub fn fits_mem(bytes: u64, copies: u64) -> Result<()> {
    let mut what = format!("--mem {}", fmt_bytes(bytes));
    if copies == 2 {
        what += " (a local migration holds it twice)";
    }
    livemig::guest::memory::check_fits(&what, bytes.saturating_mul(copies))
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// `--tracker` as given, or the kernel's best, saying so when it falls back.
pub fn choose_tracker(given: Option<TrackerKind>) -> Result<TrackerKind> {
    match TrackerKind::choose(given) {
        Ok((tracker, None)) => Ok(tracker),
        Ok((tracker, Some(why))) => {
            errln!(
                "notice: using --tracker {tracker}: uffd-wp is not available here ({})",
                error_chain(&*why)
            );
            Ok(tracker)
        }
        Err(DirtyError::Unsupported {
            tracker,
            reason,
            instead,
        }) => bail!(
            "--tracker {tracker} is not available here: {}; use --tracker {instead}",
            error_chain(&*reason)
        ),
        Err(e) => Err(e.into()),
    }
}

/// `--workload` over the guest's memory and vCPUs, or why not.
fn check_workload(w: &Workload, memory_bytes: u64, page: PageSize, vcpus: u32) -> Result<()> {
    let layout = w
        .layout(memory_bytes, page)
        .and_then(|l| l.check_vcpus(vcpus));
    match layout {
        Ok(()) => Ok(()),
        Err(WorkloadError::FewerPagesThanVcpus { pages, vcpus }) => bail!(
            "invalid --workload \"{w}\": the sweep range has {pages} pages, fewer than --vcpus {vcpus}"
        ),
        Err(e) => bail!("invalid --workload \"{w}\": {}", error_chain(&e)),
    }
}

impl GuestFlags {
    pub fn config(&self) -> Result<GuestConfig> {
        let memory_bytes = self.mem.0;
        let page = PageSize::host();
        if memory_bytes == 0 || !page.divides(memory_bytes) {
            bail!(
                "invalid --mem \"{}\": must be a non-zero multiple of the {page}-byte page size",
                self.mem
            );
        }
        let tracker = choose_tracker(self.tracker)?;
        check_workload(&self.workload, memory_bytes, page, self.vcpus)?;
        Ok(GuestConfig {
            memory_bytes,
            fresh: Fresh {
                workload: self.workload.clone(),
                vcpus: self.vcpus,
                seed: self.seed,
                disk: None,
            },
            tracker,
            warmup: self.warmup.0,
        })
    }
}

impl SendOpts {
    pub fn config(&self) -> Result<SenderConfig> {
        // The data path's flags first: the workload is checked last, as
        // the guest starts.
        let reduction = self.reduction()?;
        let g = self.guest.config()?;
        let throttling = self.throttle.config(&g.fresh.workload, g.fresh.vcpus)?;
        let cpu_cap = self.cap.config(g.fresh.vcpus)?;
        if throttling != Throttling::Off && matches!(self.mode, Mode::Postcopy | Mode::Cold) {
            bail!(
                "--{} slows the guest between pre-copy rounds, and --mode {} has none \
                 (use precopy or hybrid)",
                throttling.name(),
                self.mode
            );
        }
        let teleport = match (self.teleport.config(self.mode, self.streams, true)?, &g.fresh.workload) {
            (Some(_), w) if w.content.cache.is_none() => bail!(
                "--teleport FILE: workload \"{w}\" has no page cache (add cache=F[,layout=seq|scatter])"
            ),
            (None, w) if w.content.cache.is_some() => bail!(
                "workload \"{w}\" has a page cache (cache=F): give its backing file with --teleport FILE"
            ),
            (t, _) => t,
        };
        Ok(SenderConfig {
            memory_bytes: g.memory_bytes,
            workload: g.fresh.workload,
            vcpus: g.fresh.vcpus,
            tracker: g.tracker,
            bandwidth: self.bandwidth,
            policy: self.policy,
            downtime_limit: self.downtime_limit.0,
            switchover_bandwidth: self.switchover.bytes_per_s(),
            max_time: self.max_time.0,
            warmup: g.warmup,
            seed: g.fresh.seed,
            streams: self.streams,
            mode: self.mode,
            reduction,
            // The live view is off when the report goes to stdout.
            progress: !self.quiet && self.json.as_deref() != Some(std::path::Path::new("-")),
            throttling,
            // The command catches SIGINT and SIGTERM with its own.
            cancel: livemig::util::cancel::Cancel::new(),
            security: Security::Plain,
            cpu_cap,
            sampling: self.timeline.sampling(),
            teleport,
        })
    }

    fn reduction(&self) -> Result<Reduction> {
        let max = livemig::wire::protocol::MAX_STREAMS;
        if !(1..=max).contains(&self.streams) {
            bail!(
                "invalid --streams {}: must be between 1 and {max}",
                self.streams
            );
        }
        if let Some(cache) = self.xbzrle {
            if self.streams > 1 {
                bail!(
                    "--xbzrle works on one stream (--streams 1): its cache must see every \
                     send of a page in order"
                );
            }
            let page = PageSize::host();
            if cache.0 < page.as_u64() {
                bail!("invalid --xbzrle \"{cache}\": the cache must hold at least one {page}-byte page");
            }
        }
        Ok(Reduction {
            zero_pages: !self.no_zero_pages,
            compress: self.compress,
            xbzrle_cache: self.xbzrle.map(|s| s.0),
        })
    }
}

impl DirtyRateOpts {
    pub fn config(&self) -> Result<livemig::migration::dirtyrate::DirtyRateConfig> {
        use livemig::migration::dirtyrate::{DirtyRateConfig, Subject};
        let g = self.guest.config()?;
        if let (Some(pid), true) = (self.pid, g.tracker.uses_bitmap()) {
            bail!(
                "--pid {pid} needs --tracker uffd-wp or soft-dirty: --tracker {} works only with the guest this command starts",
                g.tracker
            );
        }
        if self.pid.is_none() {
            fits_mem(g.memory_bytes, 1)?;
        }
        Ok(DirtyRateConfig {
            subject: match self.pid {
                Some(pid) => Subject::Attach(pid),
                None => Subject::Start {
                    memory_bytes: g.memory_bytes,
                    guest: g.fresh,
                },
            },
            tracker: g.tracker,
            warmup: g.warmup,
            duration: self.duration.0,
            record: self.record.record.clone(),
        })
    }
}

impl SimulateOpts {
    /// A prediction's error, named after the flag at its origin.
    pub fn blame(&self, e: SimulateError) -> anyhow::Error {
        let m = &self.migration;
        let flag = match e {
            SimulateError::MaxRate => format!("--workload \"{}\"", m.guest.workload),
            SimulateError::Link => format!("--link {}", self.link),
            SimulateError::TooLarge => {
                format!("--mem {}", livemig::util::units::fmt_bytes(m.guest.mem.0))
            }
            SimulateError::TooManyWrites(_) | SimulateError::Runaway(..) => {
                format!("--max-time {}", m.max_time)
            }
            e => return e.into(),
        };
        anyhow::Error::new(e).context(flag)
    }

    pub fn config(&self) -> Result<SimConfig> {
        Ok(SimConfig {
            migration: self.migration.config()?,
            page_size: PageSize::host(),
            link_bytes_per_s: self.link.0 as f64,
            round_overhead: self.round_overhead.0,
            downtime_overhead: self.downtime_overhead.0,
            harvest_per_gib: self.harvest.harvest_cost.0,
            setup: self.setup.0,
        })
    }
}

impl SweepOpts {
    pub fn config(&self) -> Result<livemig::predict::sweep::SweepConfig> {
        let (teleport, shares) = self.teleport.config()?;
        Ok(livemig::predict::sweep::SweepConfig {
            shares,
            mems: self.mems.iter().map(|m| m.0).collect(),
            workloads: self.workloads.clone(),
            bandwidths: self.bandwidths.clone(),
            policies: self.policies.clone(),
            throttlings: match self.auto_converge {
                false => vec![Throttling::Off],
                true => vec![
                    Throttling::Off,
                    Throttling::AutoConverge(AutoConverge::default()),
                ],
            },
            base: SenderConfig {
                vcpus: self.vcpus,
                tracker: choose_tracker(self.tracker)?,
                downtime_limit: self.downtime_limit.0,
                max_time: self.max_time.0,
                warmup: self.warmup.0,
                seed: self.seed,
                teleport,
                ..SenderConfig::default()
            },
            variant: self.variant,
            link_bytes_per_s: self.link.map(|l| l.0 as f64),
            round_overhead: self.round_overhead.map(|d| d.0),
            downtime_overhead: self.downtime_overhead.map(|d| d.0),
            harvest_per_gib: self.harvest.harvest_cost.map(|d| d.0),
        })
    }
}
