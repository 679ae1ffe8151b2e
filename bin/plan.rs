//! `livemig plan`: many migrations over shared links, by a strategy.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

use livemig::plan::real;
use livemig::plan::report::PlanReport;
use livemig::plan::simulate::{self, Assumptions};
use livemig::plan::{Plan, Strategy};
use livemig::predict::model::Variant;
use livemig::util::units::{Rate, Span};

use crate::cli::SendOpts;

#[derive(Args)]
pub struct PlanOpts {
    /// The plan: hosts, links and VMs in TOML (see docs/plans.md). Without
    /// it, --vms alike VMs from host "src" to host "dst" over --link.
    pub file: Option<PathBuf>,
    /// sequential | parallel | batch:K (K at a time) | per-host:K (K source
    /// hosts at a time, each host's VMs together) | auto (chosen from
    /// predictions: every migration converges, least mean duration without
    /// a longer plan)
    #[arg(long, default_value = "sequential")]
    pub strategy: Strategy,
    /// shortest-first: start VMs in order of their predicted migration time
    /// alone (default: the plan's order).
    #[arg(long, value_name = "ORDER")]
    pub order: Option<Order>,
    /// Predict the plan (links shared max-min fairly between the migrations
    /// on them) instead of running it (every VM a guest on its source host,
    /// every migration a sender there to a receiver on its destination,
    /// each run through its host's launcher).
    #[arg(long)]
    pub simulate: bool,
    /// Predict with the analytical model instead of the simulator.
    #[arg(long)]
    pub model: bool,
    /// Without a plan file: this many VMs...
    #[arg(long, default_value_t = 4, value_name = "N")]
    pub vms: usize,
    /// ...and this NIC rate on both hosts (predictions; a real run's hosts
    /// are this machine, whose loopback is not shaped).
    #[arg(long, default_value = "1gbit")]
    pub link: Rate,
    /// Write plan.json, plan.csv and gantt.svg here.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Simulation: fixed time each pre-copy round costs besides sending.
    #[arg(long, default_value = "100us")]
    pub round_overhead: Span,
    /// Simulation: fixed part of each downtime.
    #[arg(long, default_value = "500us")]
    pub downtime_overhead: Span,
    /// The VMs' settings (those the plan file does not give).
    #[command(flatten)]
    pub migration: SendOpts,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Order {
    ShortestFirst,
}

pub fn run(opts: &PlanOpts) -> Result<()> {
    let base = opts.migration.config()?;
    let mut plan = match &opts.file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the plan {}", path.display()))?;
            Plan::from_toml(&text, &base).with_context(|| format!("plan {}", path.display()))?
        }
        None => {
            if opts.vms == 0 {
                bail!("--vms must be at least 1");
            }
            // u64 -> f64: a rate in bytes/s.
            Plan::simple(opts.vms, opts.link.0 as f64, &base)?
        }
    };
    let a = Assumptions {
        model: opts.model.then_some(Variant::Wws),
        round_overhead: opts.round_overhead.0,
        downtime_overhead: opts.downtime_overhead.0,
        ..Assumptions::default()
    };
    if matches!(opts.order, Some(Order::ShortestFirst)) {
        simulate::shortest_first(&mut plan, &a);
    }
    if !opts.simulate {
        refuse_unforwarded(&base)?;
    }
    // Auto chooses from predictions, then runs (or predicts) its choice.
    let (strategy, tried) = match opts.strategy {
        Strategy::Auto => {
            let (chosen, tried) = simulate::choose(&mut plan, &a);
            (chosen, Some(tried))
        }
        s => (s, None),
    };
    let mut report = match opts.simulate {
        true => simulate::run(&plan, strategy, &a),
        false => run_real(&plan, strategy, opts)?,
    };
    if let Some(tried) = tried {
        report.strategy = format!("auto ({strategy}; tried {})", tried_list(&tried));
    }
    show(&report, opts)
}

/// A real plan's senders get each VM's settings; refuse the flags they
/// would not get rather than ignore them.
fn refuse_unforwarded(base: &livemig::migration::source::SenderConfig) -> Result<()> {
    let r = &base.reduction;
    let given = [
        (r.compress.is_some(), "--compress"),
        (r.xbzrle_cache.is_some(), "--xbzrle"),
        (
            base.throttling != livemig::migration::throttle::Throttling::Off,
            "--auto-converge and --dirty-limit",
        ),
    ];
    if let Some((_, flag)) = given.iter().find(|(on, _)| *on) {
        bail!("{flag}: a real plan does not pass it to its senders yet (add --simulate to predict with it)");
    }
    Ok(())
}

/// The plan for real: receivers and senders through each host's launcher.
fn run_real(plan: &Plan, strategy: Strategy, opts: &PlanOpts) -> Result<PlanReport> {
    let dir = match &opts.out {
        Some(out) => out.join("runs"),
        None => std::env::temp_dir().join(format!("livemig-plan-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let cfg = real::RealConfig {
        exe: std::env::current_exe().context("finding the livemig binary")?,
        dir: dir.clone(),
    };
    let report = real::run(plan, strategy, &cfg);
    if opts.out.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(report?)
}

fn tried_list(tried: &[PlanReport]) -> String {
    tried
        .iter()
        .map(|r| {
            format!(
                "{}: mean {:.1} s, all {:.1} s{}",
                r.strategy,
                r.mean_duration_ms / 1e3,
                r.completion_time_ms / 1e3,
                if r.not_converged.is_empty() {
                    ""
                } else {
                    ", some did not converge"
                }
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn show(report: &PlanReport, opts: &PlanOpts) -> Result<()> {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(report.text().as_bytes());
    if let Some(path) = &opts.migration.json {
        let text = serde_json::to_vec_pretty(report)?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(dir) = &opts.out {
        let written = report.write(dir)?;
        let names: Vec<String> = written.iter().map(|p| p.display().to_string()).collect();
        let _ = writeln!(out, "written           {}", names.join(", "));
    }
    if report.failed > 0 {
        bail!(
            "{} of {} migrations failed",
            report.failed,
            report.vms.len()
        );
    }
    Ok(())
}
