//! `livemig floors` (hidden): the least each step of a downtime costs on
//! this machine, for `scripts/bench-downtime.sh`.

use anyhow::Result;
use clap::Args;

#[derive(Args)]
pub struct FloorsOpts {
    /// Samples of each floor.
    #[arg(long, default_value_t = 1000)]
    pub samples: usize,
}

pub fn run(opts: &FloorsOpts) -> Result<()> {
    let floors = livemig::util::floors::measure(opts.samples)?;
    println!("{}", serde_json::to_string(&floors)?);
    Ok(())
}
