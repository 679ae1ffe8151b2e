//! What the receiving side saw: its report and the human summary of it.

use crate::report::Status;
use crate::util::units::fmt_bytes;

/// What the receiving side saw.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ReceiveReport {
    pub status: Status,
    pub error: Option<String>,
    pub peer: String,
    /// How the connections were secured: `plain`, `tls` or `psk`.
    pub transport: String,
    pub memory_bytes: u64,
    pub page_size: u64,
    /// Data connections the sender used (1: pages on the control connection).
    pub streams: u32,
    /// Time spent preallocating destination memory (0 when lazy).
    pub prealloc_ms: f64,
    /// CPU time of this process (every thread, from /proc) from round 0's
    /// start until its pages had landed: the receiver's cost of moving
    /// memory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub round0_cpu_ms: Option<f64>,
    /// Pages received per round (stop-and-copy last).
    pub round_pages: Vec<u64>,
    /// With several data connections: the pages each carried.
    pub stream_pages: Vec<u64>,
    pub pages_received: u64,
    pub resume_ms: f64,
    pub verified_pages: u64,
    pub mismatched_pages: u64,
    /// Post-copy and hybrid: what the destination saw of demand paging.
    pub postcopy: Option<crate::report::PostcopyStats>,
    /// Write rate of the resumed guest, measured over `DEST_RATE_WINDOW`.
    pub destination_guest_rate_pps: f64,
    pub destination_guest_pid: i32,
    /// `--serve`: this migration's number in the service, in the order
    /// they were accepted (reports are written as migrations end, which
    /// with several at once is another order).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub served: Option<u64>,
    /// Page-cache teleportation: pages placed from storage, bytes read,
    /// and the time the reader was busy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub teleported_pages: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storage_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storage_busy_ms: Option<f64>,
    /// Why this receiver refused the sender's offer to teleport.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub teleport_refused: Option<String>,
}

impl ReceiveReport {
    /// The human summary: none for a migration that ended before
    /// verification (it has no figures to show); the guest's rate only
    /// after a clean verification.
    pub fn summary(&self) -> Option<String> {
        if self.verified_pages + self.mismatched_pages == 0 {
            return None;
        }
        let mut s = format!(
            "received          {} pages from {} in {} rounds ({})\n\
             transport         {}\n\
             resume            {:.2} ms\n\
             verified          {} pages, {} mismatched\n",
            self.pages_received,
            self.peer,
            self.round_pages.len(),
            fmt_bytes(self.memory_bytes),
            crate::report::transport_line(&self.transport),
            self.resume_ms,
            self.verified_pages,
            self.mismatched_pages
        );
        if let (Some(p), Some(b)) = (self.teleported_pages, self.storage_bytes) {
            s += &format!(
                "teleported        {p} pages from storage ({} read in {:.0} ms)\n",
                fmt_bytes(b),
                self.storage_busy_ms.unwrap_or(0.0)
            );
        }
        if let Some(why) = &self.teleport_refused {
            s += &format!("teleport          refused: {why}\n");
        }
        if self.status == Status::Completed {
            s += &format!(
                "guest rate        {:.0} pages/s after resume\n",
                self.destination_guest_rate_pps
            );
        }
        Some(s)
    }
}
