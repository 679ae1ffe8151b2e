//! `livemig report A.json` and `livemig plot A.json [B.json ...] -o FILE.svg`:
//! a saved run's table printed again, saved runs' timelines drawn.

use std::path::PathBuf;

use anyhow::Result;
use livemig::report::{self, plot, saved};

/// `livemig report`: print a saved report's round table and summary again.
#[derive(clap::Args)]
pub struct ReportOpts {
    /// A report written by `--json FILE`.
    pub file: PathBuf,
}

/// `livemig plot`: draw saved reports' timelines in one SVG.
#[derive(clap::Args)]
pub struct PlotOpts {
    /// Reports written by `--json FILE` (one is redrawn; several overlaid).
    #[arg(required = true, value_name = "REPORT.json")]
    pub files: Vec<PathBuf>,
    /// The SVG to write.
    #[arg(short = 'o', long = "output", value_name = "FILE.svg")]
    pub output: PathBuf,
}

pub fn print(opts: &ReportOpts) -> Result<()> {
    let r = saved::load(&opts.file)?;
    if !r.rounds.is_empty() {
        outln!("{}", report::round_header());
        for row in &r.rounds {
            outln!("{}", report::round_row(row));
        }
    }
    out!("{}", report::summary(&r));
    Ok(())
}

pub fn draw(opts: &PlotOpts) -> Result<()> {
    crate::timeline::check_dir("-o", &opts.output)?;
    let reports = opts
        .files
        .iter()
        .map(|f| saved::load(f))
        .collect::<Result<Vec<_>, _>>()?;
    let runs: Vec<_> = opts
        .files
        .iter()
        .zip(&reports)
        .map(|(f, r)| (label(f), r))
        .collect();
    plot::draw(&runs, &opts.output)?;
    outln!("wrote {}", opts.output.display());
    Ok(())
}

/// A run's name in the legend: its file's name without `.json`.
fn label(f: &std::path::Path) -> String {
    f.file_stem()
        .map_or_else(|| f.display().to_string(), |s| s.to_string_lossy().into())
}
