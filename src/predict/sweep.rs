//! `livemig sweep`: a grid over memory, workload, bandwidth, policy and
//! (optionally) auto-converge; at
//! each point a real migration (over loopback, or to a receiver with
//! `--to`), the model and the simulator, side by side, and how far the
//! predictions fall from what was measured.
//!
//! Predictions need the machine's constants: the link's goodput, the fixed
//! cost of a round and of the downtime, and the setup time. Unless given,
//! they are measured first, per memory size, by migrating an idle guest for
//! two rounds: round 0's goodput is the link, the empty round 1 is the
//! per-round cost, the downtime less its last pages is the fixed downtime.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::guest::process::GuestError;
use crate::guest::workload::Workload;
use crate::migration::local::{self, MigrateError};
use crate::migration::policy::Policy;
use crate::migration::source::{self, SendError, SenderConfig, Source};
use crate::migration::throttle::Throttling;
use crate::predict::model::{self, Variant};
use crate::predict::simulate::{self, SimConfig};
use crate::report::Report;
use crate::util::page::PageSize;
use crate::util::units::fmt_bytes;
use crate::wire::ratelimit::Bandwidth;

/// Errors of a sweep (each point's own failures are recorded, not raised).
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error("empty grid: no {0} given")]
    Empty(&'static str),
    #[error("calibration at {} failed", fmt_bytes(*.mem))]
    Calibration {
        mem: u64,
        #[source]
        source: PointError,
    },
    #[error("calibration at {} failed: the calibration run reported no rounds", fmt_bytes(*.0))]
    NoRounds(u64),
    #[error("invalid grid point \"{label}\": memory of {mem} bytes is not a non-zero multiple of the {page}-byte page size")]
    PointSize {
        label: String,
        mem: u64,
        page: PageSize,
    },
    #[error("invalid grid point \"{label}\"")]
    Point {
        label: String,
        #[source]
        source: Box<GuestError>,
    },
    #[error("writing {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Why one grid point's real migration failed.
#[derive(Debug, thiserror::Error)]
pub enum PointError {
    #[error(transparent)]
    Local(Box<MigrateError>),
    #[error(transparent)]
    Send(Box<SendError>),
}

impl From<MigrateError> for PointError {
    fn from(e: MigrateError) -> Self {
        PointError::Local(Box::new(e))
    }
}

impl From<SendError> for PointError {
    fn from(e: SendError) -> Self {
        PointError::Send(Box::new(e))
    }
}

/// One real migration of a sweep: over loopback, or (`to`) to a receiver
/// at that address.
pub fn migrate(to: Option<&str>, c: &SenderConfig) -> Result<Report, PointError> {
    let (report, result) = match to {
        None => {
            let (r, res) = local::run(c, local::Destination::default(), &mut |_| {});
            (r, res.map_err(PointError::from))
        }
        Some(to) => {
            let mut src = Source::start(c.tracker, c.memory_bytes, &c.fresh())?;
            let (r, res) = source::migrate(c, &mut src, to, &mut |_| {});
            (r, res.map_err(PointError::from))
        }
    };
    result.map(|()| report)
}

/// A real migration of a sweep (see [`migrate`]; tests pass their own).
pub type MigrateFn<'a> = dyn FnMut(&SenderConfig) -> Result<Report, PointError> + 'a;

/// The grid and what every point shares.
#[derive(Clone, Debug)]
pub struct SweepConfig {
    pub mems: Vec<u64>,
    pub workloads: Vec<Workload>,
    pub bandwidths: Vec<Bandwidth>,
    pub policies: Vec<Policy>,
    /// How each point may throttle its guest (a dimension of the grid).
    pub throttlings: Vec<Throttling>,
    /// Shares R of page cache teleported (a dimension of the grid when
    /// `base.teleport` is set; empty: the base's own).
    pub shares: Vec<crate::migration::teleport::Share>,
    /// Everything else a migration needs (vCPUs, tracker, limits, warm-up,
    /// seed); its memory, workload, bandwidth and policy are the grid's.
    pub base: SenderConfig,
    pub variant: Variant,
    /// Machine constants; None: calibrate.
    pub link_bytes_per_s: Option<f64>,
    pub round_overhead: Option<Duration>,
    pub downtime_overhead: Option<Duration>,
    /// A harvest's cost per GiB of guest memory; None: calibrate.
    pub harvest_per_gib: Option<Duration>,
}

/// One grid point's figures: measured, modelled and simulated.
/// Times in ms, bytes on the wire; `None` where a run failed.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Row {
    /// 0-based index in the grid.
    pub point: usize,
    /// Short label, e.g. "128M hotset:wws=8M,rate=20k 1gbit xen".
    pub label: String,
    pub memory_bytes: u64,
    pub workload: String,
    pub bandwidth: String,
    pub policy: String,
    /// "off", "auto-converge" or "dirty-limit".
    pub throttling: String,
    pub measured: Figures,
    pub model: Figures,
    pub simulated: Figures,
}

/// The figures compared at each point.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Figures {
    /// Migration start -> destination running.
    pub total_time_ms: Option<f64>,
    pub downtime_ms: Option<f64>,
    /// Pre-copy rounds plus stop-and-copy.
    pub rounds: Option<u32>,
    pub bytes: Option<u64>,
    /// The CPU throttle when pre-copy ended (auto-converge).
    pub cpu_throttle_percentage: Option<u32>,
    /// Why there are no figures, when there are none.
    pub error: Option<String>,
    /// Page-cache teleportation: the share R used (auto's choice).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub teleport_share: Option<f64>,
}

impl Figures {
    fn of<E: std::error::Error>(result: Result<Report, E>) -> Self {
        match result {
            Ok(r) => Self {
                total_time_ms: r.migration_time_ms,
                downtime_ms: r.downtime_ms,
                rounds: Some(
                    (r.rounds.len() as u64 + r.rounds_not_listed).min(u32::MAX.into()) as u32,
                ),
                bytes: Some(r.transferred_bytes),
                cpu_throttle_percentage: Some(r.cpu_throttle_percentage),
                teleport_share: r.teleport.as_ref().map(|t| t.teleport_share),
                error: r.error,
            },
            Err(e) => Self {
                error: Some(crate::util::error::error_chain(&e)),
                ..Self::default()
            },
        }
    }
}

/// Machine constants the predictions used at one memory size.
#[derive(Clone, Debug, Serialize)]
pub struct Calibration {
    pub memory_bytes: u64,
    pub link_mbps: f64,
    pub round_overhead_ms: f64,
    pub downtime_overhead_ms: f64,
    /// A harvest's cost per GiB (the idle run's final harvest); the two
    /// overheads above exclude it.
    pub harvest_ms_per_gib: f64,
    pub setup_ms: f64,
}

/// Median and largest relative error of one prediction of one figure.
#[derive(Clone, Debug, Serialize)]
pub struct Accuracy {
    pub figure: &'static str,
    pub predictor: &'static str,
    pub points: usize,
    pub median_error: Option<f64>,
    pub max_error: Option<f64>,
}

/// Everything a sweep produced.
#[derive(Clone, Debug, Serialize)]
pub struct Sweep {
    pub calibration: Vec<Calibration>,
    pub rows: Vec<Row>,
    pub accuracy: Vec<Accuracy>,
}

/// A grid point before it runs.
struct Point {
    label: String,
    cfg: SenderConfig,
}

fn points(cfg: &SweepConfig) -> Result<Vec<Point>, SweepError> {
    for (name, empty) in [
        ("memory size", cfg.mems.is_empty()),
        ("workload", cfg.workloads.is_empty()),
        ("bandwidth", cfg.bandwidths.is_empty()),
        ("policy", cfg.policies.is_empty()),
        ("throttling", cfg.throttlings.is_empty()),
    ] {
        if empty {
            return Err(SweepError::Empty(name));
        }
    }
    let page = PageSize::host();
    let mut out = Vec::new();
    for &mem in &cfg.mems {
        for workload in &cfg.workloads {
            for bandwidth in &cfg.bandwidths {
                let shares: Vec<_> = match cfg.shares.is_empty() {
                    true => vec![None],
                    false => cfg.shares.iter().map(Some).collect(),
                };
                for ((policy, throttling), share) in cfg
                    .policies
                    .iter()
                    .flat_map(|p| cfg.throttlings.iter().map(move |t| (p, t)))
                    .flat_map(|pt| shares.iter().map(move |s| (pt, *s)))
                {
                    let mut label = format!(
                        "{} {workload} {bandwidth} {policy}",
                        crate::util::units::fmt_bytes(mem)
                    );
                    if *throttling != Throttling::Off {
                        label = format!("{label} {}", throttling.name());
                    }
                    let mut teleport = cfg.base.teleport.clone();
                    if let (Some(t), Some(&share)) = (&mut teleport, share) {
                        t.share = share;
                        label = format!("{label} R={share}");
                    }
                    // Every point is checked before the first one runs.
                    if mem == 0 || !page.divides(mem) {
                        return Err(SweepError::PointSize { label, mem, page });
                    }
                    crate::guest::process::check_config(workload, mem, page, cfg.base.vcpus)
                        .map_err(|e| SweepError::Point {
                            label: label.clone(),
                            source: Box::new(e),
                        })?;
                    let point_cfg = SenderConfig {
                        memory_bytes: mem,
                        workload: workload.clone(),
                        bandwidth: *bandwidth,
                        policy: *policy,
                        throttling: *throttling,
                        progress: false,
                        teleport,
                        ..cfg.base.clone()
                    };
                    out.push(Point {
                        label,
                        cfg: point_cfg,
                    });
                }
            }
        }
    }
    Ok(out)
}

/// How many points the grid has (after checking every one).
pub fn grid_size(cfg: &SweepConfig) -> Result<usize, SweepError> {
    points(cfg).map(|p| p.len())
}

/// Run the sweep. `migrate` runs one real migration (loopback or remote);
/// `on_point` sees each finished row (for progress).
pub fn run(
    cfg: &SweepConfig,
    migrate: &mut MigrateFn,
    on_point: &mut dyn FnMut(&Row),
) -> Result<Sweep, SweepError> {
    let points = points(cfg)?;
    let page_size = PageSize::host();
    let mut calibration: Vec<Calibration> = Vec::new();
    let mut rows = Vec::new();
    for (i, p) in points.into_iter().enumerate() {
        let mem = p.cfg.memory_bytes;
        if !calibration.iter().any(|c| c.memory_bytes == mem) {
            calibration.push(calibrate(cfg, mem, migrate)?);
        }
        let c = calibration
            .iter()
            .find(|c| c.memory_bytes == mem)
            .expect("calibrated above");
        let sim = SimConfig {
            migration: p.cfg.clone(),
            page_size,
            link_bytes_per_s: c.link_mbps * 1e6 / 8.0,
            round_overhead: Duration::from_secs_f64(c.round_overhead_ms / 1e3),
            downtime_overhead: Duration::from_secs_f64(c.downtime_overhead_ms / 1e3),
            harvest_per_gib: Duration::from_secs_f64(c.harvest_ms_per_gib / 1e3),
            setup: Duration::from_secs_f64(c.setup_ms / 1e3),
        };
        let row = Row {
            point: i,
            label: p.label,
            memory_bytes: mem,
            workload: p.cfg.workload.to_string(),
            bandwidth: p.cfg.bandwidth.to_string(),
            policy: p.cfg.policy.to_string(),
            throttling: p.cfg.throttling.name().into(),
            measured: Figures::of(migrate(&p.cfg)),
            model: Figures::of(model::run(&sim, cfg.variant)),
            simulated: Figures::of(simulate::run(&sim)),
        };
        on_point(&row);
        rows.push(row);
    }
    let accuracy = accuracy(&rows);
    Ok(Sweep {
        calibration,
        rows,
        accuracy,
    })
}

/// Measure the machine constants at memory size `mem` (those not given).
fn calibrate(
    cfg: &SweepConfig,
    mem: u64,
    migrate: &mut MigrateFn,
) -> Result<Calibration, SweepError> {
    let idle = SenderConfig {
        memory_bytes: mem,
        workload: "idle".parse().expect("a valid spec"),
        bandwidth: Bandwidth::Unlimited,
        policy: Policy::Fixed(2),
        throttling: Throttling::Off,
        progress: false,
        ..cfg.base.clone()
    };
    let r = migrate(&idle).map_err(|source| SweepError::Calibration { mem, source })?;
    let (Some(r0), Some(r1), Some(downtime)) = (r.rounds.first(), r.rounds.get(1), r.downtime_ms)
    else {
        return Err(SweepError::NoRounds(mem));
    };
    let last = r.downtime_breakdown_ms.last_pages;
    let gib = mem as f64 / (1u64 << 30) as f64;
    let harvest_ms_per_gib = cfg
        .harvest_per_gib
        .map_or(r.downtime_breakdown_ms.final_harvest / gib, |d| {
            d.as_secs_f64() * 1e3
        });
    let harvest_ms = harvest_ms_per_gib * gib;
    Ok(Calibration {
        memory_bytes: mem,
        link_mbps: cfg
            .link_bytes_per_s
            .map_or(r0.throughput_mbps, |b| b * 8.0 / 1e6),
        round_overhead_ms: cfg
            .round_overhead
            .map_or((r1.duration_ms - harvest_ms).max(0.0), |d| {
                d.as_secs_f64() * 1e3
            }),
        downtime_overhead_ms: cfg
            .downtime_overhead
            .map_or((downtime - last - harvest_ms).max(0.0), |d| {
                d.as_secs_f64() * 1e3
            }),
        harvest_ms_per_gib,
        setup_ms: r.setup_time_ms,
    })
}

/// Write a sweep's results into `out` (sweep.csv, sweep.json) and
/// sweep.json to `json` too.
pub fn write(sweep: &Sweep, out: &Path, json: Option<&Path>) -> Result<(), SweepError> {
    let fail = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SweepError::Write { path, source }
    };
    let csv_path = out.join("sweep.csv");
    std::fs::write(&csv_path, csv(sweep)).map_err(fail(&csv_path))?;
    for path in std::iter::once(out.join("sweep.json")).chain(json.map(Path::to_path_buf)) {
        let text = serde_json::to_vec_pretty(sweep).expect("a sweep serialises");
        std::fs::write(&path, text).map_err(fail(&path))?;
    }
    Ok(())
}

/// What to tell the user of a sweep written to `out` with `plots`.
pub fn summary(sweep: &Sweep, out: &Path, plots: &[PathBuf]) -> String {
    let mut said = String::new();
    for c in &sweep.calibration {
        said += &format!(
            "calibrated at {}: link {:.0} Mbit/s, round overhead {:.3} ms, downtime overhead {:.3} ms, harvest {:.3} ms per GiB\n",
            crate::util::units::fmt_bytes(c.memory_bytes),
            c.link_mbps,
            c.round_overhead_ms,
            c.downtime_overhead_ms,
            c.harvest_ms_per_gib
        );
    }
    let failed = sweep
        .rows
        .iter()
        .filter(|r| r.measured.error.is_some())
        .count();
    let names: Vec<_> = plots
        .iter()
        .filter_map(|p| p.file_name())
        .map(|f| f.to_string_lossy())
        .collect();
    said += &format!(
        "{} points ({failed} failed migrations), results in {}: sweep.csv, sweep.json, {}\n",
        sweep.rows.len(),
        out.display(),
        names.join(", ")
    );
    said += &accuracy_table(sweep);
    said
}

/// Relative errors of model and simulator against the measurement.
fn accuracy(rows: &[Row]) -> Vec<Accuracy> {
    type Pick = fn(&Figures) -> Option<f64>;
    let figures: [(&'static str, Pick); 3] = [
        ("total_time", |f| f.total_time_ms),
        ("downtime", |f| f.downtime_ms),
        ("bytes", |f| f.bytes.map(|b| b as f64)),
    ];
    let mut out = Vec::new();
    for (figure, pick) in figures {
        for (predictor, of) in [
            ("model", (|r: &Row| &r.model) as fn(&Row) -> &Figures),
            ("simulator", |r: &Row| &r.simulated),
        ] {
            let mut errors: Vec<f64> = rows
                .iter()
                .filter_map(|r| {
                    let m = pick(&r.measured).filter(|m| *m > 0.0)?;
                    Some((pick(of(r))? - m).abs() / m)
                })
                .collect();
            errors.sort_by(f64::total_cmp);
            out.push(Accuracy {
                figure,
                predictor,
                points: errors.len(),
                median_error: median(&errors),
                max_error: errors.last().copied(),
            });
        }
    }
    out
}

fn median(sorted: &[f64]) -> Option<f64> {
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

/// The accuracy table, for people.
pub fn accuracy_table(s: &Sweep) -> String {
    let pct = |e: Option<f64>| e.map_or("-".into(), |e| format!("{:.1}%", e * 100.0));
    let mut t =
        String::from("accuracy vs measured   predictor   points   median error   max error\n");
    for a in &s.accuracy {
        t += &format!(
            "{:<22} {:<11} {:>6}   {:>12}   {:>9}\n",
            a.figure,
            a.predictor,
            a.points,
            pct(a.median_error),
            pct(a.max_error)
        );
    }
    t
}

/// One CSV line per point (header first).
pub fn csv(s: &Sweep) -> String {
    let mut out = String::from("point,memory_bytes,workload,bandwidth,policy");
    for who in ["measured", "model", "simulated"] {
        for f in ["total_time_ms", "downtime_ms", "rounds", "bytes"] {
            out += &format!(",{who}_{f}");
        }
    }
    out += ",throttling";
    for who in ["measured", "model", "simulated"] {
        out += &format!(",{who}_cpu_throttle_percentage");
    }
    out.push('\n');
    let opt = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.3}"));
    for r in &s.rows {
        let quote = |t: &str| format!("\"{}\"", t.replace('"', "\"\""));
        out += &format!(
            "{},{},{},{},{}",
            r.point,
            r.memory_bytes,
            quote(&r.workload),
            quote(&r.bandwidth),
            quote(&r.policy)
        );
        for f in [&r.measured, &r.model, &r.simulated] {
            out += &format!(
                ",{},{},{},{}",
                opt(f.total_time_ms),
                opt(f.downtime_ms),
                f.rounds.map_or(String::new(), |v| v.to_string()),
                f.bytes.map_or(String::new(), |v| v.to_string())
            );
        }
        out += &format!(",{}", r.throttling);
        for f in [&r.measured, &r.model, &r.simulated] {
            let pct = f.cpu_throttle_percentage;
            out += &format!(",{}", pct.map_or(String::new(), |v| v.to_string()));
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(measured: f64, model: f64) -> Row {
        let f = |t| Figures {
            total_time_ms: Some(t),
            ..Figures::default()
        };
        Row {
            measured: f(measured),
            model: f(model),
            ..Row::default()
        }
    }

    #[test]
    fn csv_text_fields_are_quoted() {
        let s = Sweep {
            calibration: vec![],
            rows: vec![Row {
                workload: "hotset:wws=8M,rate=20k".into(),
                bandwidth: "dynamic:min=1mbit,max=1gbit,inc=5mbit".into(),
                policy: "xen".into(),
                ..Row::default()
            }],
            accuracy: vec![],
        };
        let csv = csv(&s);
        let line = csv.lines().nth(1).unwrap();
        assert!(
            line.starts_with(
                "0,0,\"hotset:wws=8M,rate=20k\",\"dynamic:min=1mbit,max=1gbit,inc=5mbit\",\"xen\","
            ),
            "{line}"
        );
    }

    #[test]
    fn an_empty_grid_is_refused() {
        let cfg = SweepConfig {
            mems: vec![1 << 24],
            workloads: vec!["idle".parse().unwrap()],
            bandwidths: vec![],
            policies: vec![Policy::Xen],
            throttlings: vec![Throttling::Off],
            shares: vec![],
            base: SenderConfig::default(),
            variant: Variant::Wws,
            link_bytes_per_s: None,
            round_overhead: None,
            downtime_overhead: None,
            harvest_per_gib: None,
        };
        let e = grid_size(&cfg).unwrap_err().to_string();
        assert_eq!(e, "empty grid: no bandwidth given");
    }

    #[test]
    fn teleport_shares_are_a_dimension_of_the_grid() {
        use crate::migration::teleport::{Share, TeleportConfig};
        let cfg = SweepConfig {
            mems: vec![1 << 24],
            workloads: vec!["idle:cache=0.5".parse().unwrap()],
            bandwidths: vec![Bandwidth::Unlimited],
            policies: vec![Policy::Xen],
            throttlings: vec![Throttling::Off],
            shares: vec![Share::Fixed(0.0), Share::Fixed(0.5), Share::Auto],
            base: SenderConfig {
                teleport: Some(TeleportConfig {
                    file: "disk".into(),
                    share: Share::Auto,
                    storage_rate: None,
                }),
                ..SenderConfig::default()
            },
            variant: Variant::Wws,
            link_bytes_per_s: None,
            round_overhead: None,
            downtime_overhead: None,
            harvest_per_gib: None,
        };
        let p = points(&cfg).unwrap();
        let labels: Vec<_> = p
            .iter()
            .map(|p| p.label.rsplit(' ').next().unwrap())
            .collect();
        assert_eq!(labels, ["R=0", "R=0.5", "R=auto"]);
        let shares: Vec<_> = p
            .iter()
            .map(|p| p.cfg.teleport.as_ref().unwrap().share)
            .collect();
        assert_eq!(shares, cfg.shares);
    }

    #[test]
    fn accuracy_is_relative_error_median_and_max() {
        let rows = [row(100.0, 110.0), row(200.0, 180.0), row(50.0, 50.0)];
        let a = accuracy(&rows);
        let t = a
            .iter()
            .find(|a| a.figure == "total_time" && a.predictor == "model")
            .unwrap();
        assert_eq!(t.points, 3);
        assert!((t.median_error.unwrap() - 0.10).abs() < 1e-9);
        assert!((t.max_error.unwrap() - 0.10).abs() < 1e-9);
        let s = a
            .iter()
            .find(|a| a.figure == "total_time" && a.predictor == "simulator")
            .unwrap();
        assert_eq!((s.points, s.median_error), (0, None));
        assert_eq!(median(&[1.0, 2.0, 3.0, 4.0]), Some(2.5));
    }
}
