//! What page-cache teleportation did, in the source's report (flattened:
//! its keys sit beside the others, and a report without it has none).

use crate::util::units::fmt_bytes;

/// The storage channel's and the network's share of a migration.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TeleportStats {
    /// The share R of clean page cache whose blocks the destination read.
    pub teleport_share: f64,
    /// Pages the destination placed from storage.
    pub teleported_pages: u64,
    /// Bytes the destination read from storage.
    pub storage_bytes: u64,
    /// Time the destination's storage reader was busy.
    pub storage_busy_ms: f64,
    /// Time the network was busy sending pages (every round).
    pub network_busy_ms: f64,
    /// Pages whose mapping was sent but that the guest wrote afterwards:
    /// they went over the network, and that copy won.
    pub teleport_fallback_pages: u64,
    /// Time the sender waited for storage to finish before the pause.
    #[serde(default)]
    pub sync_wait_ms: f64,
    /// Clean page-cache pages when the migration started (R's base).
    pub teleport_candidates: u64,
    /// The rates `auto` chose R from, in bytes/s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_rate_bps: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_rate_bps: Option<u64>,
    /// Why the destination refused: every page went over the network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teleport_refused: Option<String>,
}

impl TeleportStats {
    /// The summary's lines.
    pub fn summary(&self) -> String {
        if let Some(why) = &self.teleport_refused {
            return format!(
                "teleport          refused by the destination ({why}): every page went over the network\n"
            );
        }
        format!(
            "teleport          R = {:.2} of {} clean cache pages: {} pages ({}) from storage, busy {:.0} ms; network busy {:.0} ms; {} written pages fell back to the network\n",
            self.teleport_share,
            self.teleport_candidates,
            self.teleported_pages,
            fmt_bytes(self.storage_bytes),
            self.storage_busy_ms,
            self.network_busy_ms,
            self.teleport_fallback_pages
        )
    }
}
