//! `livemig send --start-on-stdin`: start the guest, then wait for the word
//! to migrate it (a real plan starts every guest first and each migration
//! when its strategy says).

use std::io::BufRead;

use anyhow::{bail, Result};
use clap::Args;

use livemig::plan::real::READY;

#[derive(Args)]
pub struct GoOpts {
    /// Start the guest, say so on stderr, and begin migrating when a line
    /// arrives on stdin (used by `livemig plan`).
    #[arg(long)]
    pub start_on_stdin: bool,
}

impl GoOpts {
    /// Wait for the word to go, if asked to.
    pub fn wait(&self) -> Result<()> {
        if !self.start_on_stdin {
            return Ok(());
        }
        errln!("{READY}");
        let mut line = String::new();
        if std::io::stdin().lock().read_line(&mut line)? == 0 {
            bail!("--start-on-stdin: stdin closed before the word to migrate");
        }
        Ok(())
    }
}
