//! `--record FILE`: a flag of `dirtyrate`.

use std::path::PathBuf;

use clap::Args;

#[derive(Args, Clone, Debug)]
pub struct RecordFlags {
    /// Write every harvest to FILE as a page-write trace (lines `t_us
    /// page_index`) that --workload trace:FILE replays.
    #[arg(long, value_name = "FILE")]
    pub record: Option<PathBuf>,
}
