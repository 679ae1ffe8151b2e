//! The `livemig` command line: parses arguments and calls into the library.

#[macro_use]
mod out;
mod cap;
mod cli;
mod floors;
mod go;
mod harvest_cost;
mod plan;
mod receive;
mod record;
mod saved;
mod switchover;
mod teleport;
mod timeline;

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::error::ErrorKind;
use clap::Parser;

use cli::{Cli, Cmd, DirtyRateOpts, MigrateOpts, RunOpts, SendOpts, SimulateOpts, SweepOpts};
use livemig::guest::process as guest;
use livemig::migration::source::{self, Source};
use livemig::migration::{dirtyrate, local as migrate};
use livemig::predict::{model, simulate};
use livemig::report::{self, Report, Status};
use livemig::util::cancel::Cancel;
use livemig::util::units;
use livemig::wire::transport::certs::Validity;

/// The exit status of a cancelled migration: 128 + the signal's number on
/// the side that got it (130 for SIGINT, 143 for SIGTERM), or
/// [`EXIT_PEER_CANCELLED`] on a receiver whose sender was cancelled.
static EXIT: std::sync::OnceLock<u8> = std::sync::OnceLock::new();
const EXIT_PEER_CANCELLED: u8 = 3;

fn exit_if_cancelled(report: &Report, cancel: &Cancel) {
    if report.status == Status::Cancelled {
        let _ = EXIT.set(cancel.why().map_or(130, |w| w.exit_code()));
    }
}

/// A simulation's or a model's report, printed like a real run's.
fn print_prediction(report: &Report, opts: &SimulateOpts) -> Result<()> {
    let mut print = row_printer(&opts.migration);
    report.rounds.iter().for_each(&mut print);
    finish(report, opts.migration.json.as_deref(), Ok(()))
}

fn sweep(opts: &SweepOpts) -> Result<()> {
    use livemig::predict::sweep;
    let cfg = opts.config()?;
    let n = sweep::grid_size(&cfg)?;
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("creating {}", opts.out.display()))?;
    let bar = progress_bar(
        opts.quiet,
        n as u64,
        "{pos}/{len} [{bar:30}] {elapsed} {msg}",
    );
    let to = opts.to.as_deref();
    let result = sweep::run(&cfg, &mut |c| sweep::migrate(to, c), &mut |row| {
        bar.set_message(row.label.clone());
        bar.inc(1);
    })?;
    bar.finish_and_clear();
    sweep::write(&result, &opts.out, opts.json.as_deref())?;
    let plots = livemig::predict::plot::draw(&result.rows, &opts.out)?;
    out!("{}", sweep::summary(&result, &opts.out, &plots));
    Ok(())
}

fn progress_bar(quiet: bool, len: u64, template: &str) -> indicatif::ProgressBar {
    match quiet {
        true => indicatif::ProgressBar::hidden(),
        false => indicatif::ProgressBar::new(len).with_style(
            indicatif::ProgressStyle::with_template(template)
                .expect("valid template")
                .progress_chars("=> "),
        ),
    }
}

/// `livemig run`: a guest that keeps running until SIGINT or SIGTERM.
fn run_guest(opts: &RunOpts) -> Result<()> {
    let g = opts.guest.config()?;
    cli::fits_mem(g.memory_bytes, 1)?;
    anyhow::ensure!(
        !g.tracker.uses_bitmap(),
        "livemig run: --tracker {} cannot be harvested by another process; use uffd-wp or soft-dirty",
        g.tracker
    );
    let on_start = &mut |pid| {
        outln!(
            "guest {pid} running: {} on {} with {} vCPU(s), --tracker {} (interrupt to stop)",
            g.fresh.workload,
            units::fmt_bytes(g.memory_bytes),
            g.fresh.vcpus,
            g.tracker
        )
    };
    Ok(dirtyrate::serve(
        g.tracker,
        g.memory_bytes,
        &g.fresh,
        on_start,
    )?)
}

fn dirtyrate(opts: &DirtyRateOpts) -> Result<()> {
    let cfg = opts.config()?;
    let bar = progress_bar(opts.quiet, 1000, "measuring [{bar:30}] {elapsed}");
    let result = dirtyrate::run(&cfg, &mut |f| bar.set_position((f * 1000.0) as u64));
    bar.finish_and_clear();
    let report = match (result, opts.pid) {
        (Err(e), Some(pid)) => return Err(anyhow::Error::new(e).context(format!("--pid {pid}"))),
        (r, _) => r?,
    };
    out!("{}", dirtyrate::summary(&report));
    if let Some(path) = &opts.json {
        let f = std::fs::File::create(path)
            .with_context(|| format!("writing the report to {}", path.display()))?;
        serde_json::to_writer_pretty(f, &report)?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            e.exit()
        }
        Err(e) if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => e.exit(),
        Err(e) => {
            errln!("Error: {}", cli::one_line(&e));
            return ExitCode::FAILURE;
        }
    };
    let result = run(cli);
    if let Some(code) = out::stdout_verdict() {
        if let Err(e) = result {
            errln!("Error: {e:#}");
        }
        return code;
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            errln!("Error: {e:#}");
            EXIT.get().map_or(ExitCode::FAILURE, |&c| ExitCode::from(c))
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Migrate(MigrateOpts {
            send: opts,
            no_prealloc,
            prepage,
            observe,
            security,
        }) => {
            let security = security.config("listen on", "127.0.0.1:0")?;
            let mut cfg = opts.config()?;
            cfg.security = security;
            cfg.cancel = Cancel::on_signals()?;
            cli::fits_mem(cfg.memory_bytes, 2)?;
            opts.timeline.check()?;
            let mut print = row_printer(&opts);
            let rx = migrate::Destination {
                prealloc: !no_prealloc,
                prepage,
                observe: observe.config(),
                teleport_file: opts.teleport.teleport_dest.clone(),
                storage_rate: opts.teleport.storage_rate.map(|r| r.0),
            };
            let (report, result) = migrate::run(&cfg, rx, &mut print);
            exit_if_cancelled(&report, &cfg.cancel);
            let drawn = opts.timeline.write(&report);
            finish(&report, opts.json.as_deref(), result.map_err(Into::into)).and(drawn)
        }
        Cmd::Send {
            to,
            opts,
            security,
            go,
        } => {
            let security = security.config("send to", &to)?;
            let mut cfg = opts.config()?;
            cfg.teleport = opts.teleport.config(opts.mode, opts.streams, false)?;
            cfg.security = security;
            cfg.cancel = Cancel::on_signals()?;
            cli::fits_mem(cfg.memory_bytes, 1)?;
            opts.timeline.check()?;
            let mut src = Source::start(cfg.tracker, cfg.memory_bytes, &cfg.fresh())?;
            go.wait()?;
            let mut print = row_printer(&opts);
            let (report, result) = source::migrate(&cfg, &mut src, &to, &mut print);
            exit_if_cancelled(&report, &cfg.cancel);
            let drawn = opts.timeline.write(&report);
            finish(&report, opts.json.as_deref(), result.map_err(Into::into)).and(drawn)
        }
        Cmd::Dirtyrate(opts) => dirtyrate(&opts),
        Cmd::Report(opts) => saved::print(&opts),
        Cmd::Plot(opts) => saved::draw(&opts),
        Cmd::Run(opts) => run_guest(&opts),
        Cmd::Sweep(opts) => sweep(&opts),
        Cmd::Plan(opts) => plan::run(&opts),
        Cmd::Simulate(opts) => {
            let report = simulate::run(&opts.config()?).map_err(|e| opts.blame(e))?;
            print_prediction(&report, &opts)
        }
        Cmd::Model { opts, variant } => {
            let report = model::run(&opts.config()?, variant).map_err(|e| opts.blame(e))?;
            print_prediction(&report, &opts)
        }
        Cmd::Receive(opts) => receive::run(opts),
        Cmd::Guest(args) => Ok(guest::run(args)?),
        Cmd::Floors(opts) => floors::run(&opts),
        Cmd::Certs { dir, hosts } => {
            let hosts: Vec<_> = hosts
                .into_iter()
                .map(|h| (h, Validity::Days(365)))
                .collect();
            for f in livemig::wire::transport::certs::generate(&dir, &hosts)? {
                outln!("wrote {}", f.display());
            }
            Ok(())
        }
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
    // Post-copy past the switch-over: the destination's guest ran ahead.
    let ahead = matches!(report.mode, "postcopy" | "hybrid") && report.downtime_ms.is_some();
    result.map_err(|e| match (report.source_guest_kept_running, ahead) {
        _ if report.status == Status::Cancelled => e,
        (true, _) => e.context(
            "migration failed; the source guest was resumed and ran on until this command ended",
        ),
        (false, true) => e.context("post-copy failed after the guest resumed at the destination; the source guest was not resumed, its memory being older"),
        (false, false) => e,
    })
}
