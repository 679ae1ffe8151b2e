//! The flags of page-cache teleportation (`--teleport`, `--teleport-share`,
//! `--storage-rate`), on both ends.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

use livemig::migration::phases::Mode;
use livemig::migration::teleport::{Share, StorageConfig, TeleportConfig};
use livemig::util::units::Rate;

/// The sender's (and `migrate`'s) teleportation flags.
#[derive(Args, Clone, Debug)]
pub struct TeleportFlags {
    /// Page-cache teleportation: the backing file the guest's page cache
    /// (workload key cache=F) is read from; the destination reads a share of
    /// it itself from its own path to the same data (`receive --teleport`)
    #[arg(long, value_name = "FILE")]
    pub teleport: Option<PathBuf>,
    /// Share of the clean page cache the destination reads from storage
    /// (0-1), or auto: chosen from both channels' measured rates so they
    /// finish together [default: auto]
    #[arg(long, value_name = "R|auto")]
    pub teleport_share: Option<Share>,
    /// `migrate`: how fast the destination may read the backing file
    /// (emulates the storage network, like --bandwidth), e.g. 1gbit, 100MB
    #[arg(long, value_name = "RATE")]
    pub storage_rate: Option<Rate>,
    /// `migrate`: the destination's path to the backing file, if not the
    /// same FILE (a copy, which must hold the same data)
    #[arg(long, value_name = "FILE")]
    pub teleport_dest: Option<PathBuf>,
}

impl TeleportFlags {
    /// The sender's configuration; `local`: both ends in this process.
    pub fn config(&self, mode: Mode, streams: u32, local: bool) -> Result<Option<TeleportConfig>> {
        let Some(file) = &self.teleport else {
            if self.teleport_share.is_some() || self.storage_rate.is_some() {
                bail!("--teleport-share and --storage-rate need --teleport FILE");
            }
            return Ok(None);
        };
        if !local && (self.storage_rate.is_some() || self.teleport_dest.is_some()) {
            bail!("--storage-rate and --teleport-dest belong to the destination: give them to livemig receive (as --storage-rate and --teleport)");
        }
        if mode != Mode::Precopy {
            bail!("--teleport works with --mode precopy, not {mode}");
        }
        if streams > 1 {
            bail!("--teleport works over one stream (--streams 1)");
        }
        Ok(Some(TeleportConfig {
            file: file.clone(),
            share: self.teleport_share.unwrap_or(Share::Auto),
            storage_rate: self.storage_rate.map(|r| r.0),
        }))
    }
}

/// The receiver's teleportation flags.
#[derive(Args, Clone, Debug)]
pub struct ReceiveTeleportFlags {
    /// Page-cache teleportation: this host's path to the sender's backing
    /// file (the same file, filesystem, NFS or iSCSI mount); pages the
    /// sender maps to it are read from here
    #[arg(long, value_name = "FILE")]
    pub teleport: Option<PathBuf>,
    /// How fast to read the backing file (emulates the storage network)
    #[arg(long, value_name = "RATE")]
    pub storage_rate: Option<Rate>,
}

impl ReceiveTeleportFlags {
    pub fn config(&self) -> Result<Option<StorageConfig>> {
        match (&self.teleport, self.storage_rate) {
            (None, Some(_)) => bail!("--storage-rate needs --teleport FILE"),
            (None, None) => Ok(None),
            (Some(file), rate) => Ok(Some(StorageConfig {
                file: file.clone(),
                rate: rate.map(|r| r.0),
            })),
        }
    }
}

/// `sweep`'s teleportation flags: the shares R are a dimension of the grid.
#[derive(Args, Clone, Debug)]
pub struct SweepTeleportFlags {
    /// Page-cache teleportation: the guests' backing file (workloads with cache=F)
    #[arg(long, value_name = "FILE")]
    pub teleport: Option<PathBuf>,
    /// Shares R to sweep, 0-1 or auto (repeat the flag) [default: auto]
    #[arg(long = "teleport-share", value_name = "R|auto")]
    pub teleport_shares: Vec<Share>,
    /// How fast the destination reads the backing file
    #[arg(long, value_name = "RATE")]
    pub storage_rate: Option<Rate>,
}

impl SweepTeleportFlags {
    /// The base configuration and the shares to sweep.
    pub fn config(&self) -> Result<(Option<TeleportConfig>, Vec<Share>)> {
        let Some(file) = &self.teleport else {
            if !self.teleport_shares.is_empty() || self.storage_rate.is_some() {
                bail!("--teleport-share and --storage-rate need --teleport FILE");
            }
            return Ok((None, Vec::new()));
        };
        let t = TeleportConfig {
            file: file.clone(),
            share: self.teleport_shares.first().copied().unwrap_or(Share::Auto),
            storage_rate: self.storage_rate.map(|r| r.0),
        };
        Ok((Some(t), self.teleport_shares.clone()))
    }
}
