//! `--harvest-cost`: what one harvest of the dirty tracker costs per GiB
//! of guest memory, for the predictions (`simulate`, `sweep`).

use clap::Args;
use livemig::util::units::Span;

/// `livemig simulate`: given, or nothing (counted in the overheads).
#[derive(Args)]
pub struct HarvestCost {
    /// Time one harvest takes per GiB of guest memory (uffd-wp walks every
    /// page-table entry: about 0.2-0.4 ms here); each round and the
    /// downtime pay it on top of the overheads
    #[arg(long, value_name = "DURATION", default_value = "0s")]
    pub harvest_cost: Span,
}

/// `livemig sweep`: given, or measured with the link.
#[derive(Args)]
pub struct CalibratedHarvestCost {
    /// Time one harvest takes per GiB of guest memory, for the predictions
    /// [default: measured]
    #[arg(long, value_name = "DURATION")]
    pub harvest_cost: Option<Span>,
}
