//! Timeline flags of `migrate` and `send`, and the files they write.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use livemig::migration::sampler::{Observe, Sampling};
use livemig::report::{plot, timeline, Report};
use livemig::util::units::Span;

/// The migration's timeline, sampled on the sender's side.
#[derive(clap::Args)]
#[command(next_help_heading = "Timeline")]
pub struct TimelineFlags {
    /// Draw the timeline as an SVG: the guest's rate with the rounds shaded
    /// and the downtime marked, the transfer rate and the bytes to send.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// Write the timeline's samples as CSV.
    #[arg(long, value_name = "FILE")]
    pub timeline_csv: Option<PathBuf>,
    /// Sample every DUR (default: 10ms, finer for guests up to 256 MiB;
    /// 0 turns the timeline and the impact figures off).
    #[arg(long, value_name = "DUR")]
    pub sample_every: Option<Span>,
}

/// How long `migrate` watches the guest after it resumed.
#[derive(clap::Args)]
#[command(next_help_heading = "Timeline")]
pub struct ObserveFlags {
    /// Watch the destination's guest for DUR after it resumed (default:
    /// until its rate is back within 5 % of its rate before the migration
    /// for 100 ms, at most 1 s).
    #[arg(long, value_name = "DUR")]
    pub observe: Option<Span>,
}

impl ObserveFlags {
    pub fn config(&self) -> Observe {
        self.observe
            .as_ref()
            .map_or(Observe::UntilRecovered, |d| Observe::For(d.0))
    }
}

impl TimelineFlags {
    pub fn sampling(&self) -> Sampling {
        self.sample_every
            .as_ref()
            .map_or(Sampling::Auto, |d| Sampling::Every(d.0))
    }

    /// Before the migration: the files can be written where asked.
    pub fn check(&self) -> Result<()> {
        for (flag, path) in [
            ("--plot", &self.plot),
            ("--timeline-csv", &self.timeline_csv),
        ] {
            let Some(path) = path else { continue };
            if self.sampling() == Sampling::Every(std::time::Duration::ZERO) {
                bail!("{flag} needs a timeline, and --sample-every 0 turns it off");
            }
            check_dir(flag, path)?;
        }
        Ok(())
    }

    /// After it: write the timeline where asked.
    pub fn write(&self, report: &Report) -> Result<()> {
        if let Some(path) = &self.timeline_csv {
            let mut f = std::fs::File::create(path)
                .with_context(|| format!("writing the timeline to {}", path.display()))?;
            timeline::write_csv(&report.timeline, &mut f)
                .with_context(|| format!("writing the timeline to {}", path.display()))?;
        }
        if let Some(path) = &self.plot {
            plot::draw(&[("this run".to_string(), report)], path)?;
        }
        Ok(())
    }
}

/// The directory `path` goes into exists.
pub fn check_dir(flag: &str, path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        bail!(
            "invalid {flag} {}: no directory {}",
            path.display(),
            dir.display()
        );
    }
    Ok(())
}
