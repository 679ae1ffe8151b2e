//! The migration report: one struct, serialised to JSON (`--json FILE`) and
//! printed as a human table. Field names carry their unit and keep QEMU's
//! vocabulary (total time, setup time, downtime, dirty sync count,
//! transferred) so QEMU users read it at once. Every figure is measured.

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::util::units::fmt_bytes;

pub mod impact;
pub mod plot;
pub mod saved;
pub mod timeline;

/// The version of the report's layout, in every report as
/// `report_version`. Raise it when a key changes meaning or goes; a reader
/// refuses reports newer than it knows (see [`saved`]). Reports written
/// before the key existed read as version 0.
pub const REPORT_VERSION: u32 = 1;

/// [`Report::report_version`]: [`REPORT_VERSION`] unless read from a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ReportVersion(pub u32);

impl Default for ReportVersion {
    fn default() -> Self {
        Self(REPORT_VERSION)
    }
}
mod teleport;
pub use teleport::TeleportStats;

/// Whether the migration completed: memory verified and the destination
/// running; or failed; or was cancelled (SIGINT, SIGTERM, or the sender's
/// cancel told to the receiver).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Completed,
    #[default]
    Failed,
    Cancelled,
}

/// One round as sent: round 0 carries every page, the last row is stop-and-copy.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct RoundReport {
    pub round: u32,
    /// Pages sent in this round.
    pub pages: u64,
    /// Bytes put on the socket in this round, frame headers included.
    pub bytes: u64,
    pub duration_ms: f64,
    /// Goodput of the round in Mbit/s (10^6 bits).
    pub throughput_mbps: f64,
    /// Pages found dirty at the end of the round per second of the round
    /// (0 for stop-and-copy: the guest is paused).
    pub dirty_rate_pps: f64,
    /// The rate limit in force, bits per second; null when unlimited.
    pub rate_limit_bps: Option<u64>,
    /// Time spent harvesting the dirty set at the end of this round.
    pub harvest_ms: f64,
    pub stop_and_copy: bool,
    /// The post-copy push (the guest running at the destination).
    pub postcopy: bool,
    /// The policy's decision after this round, with its numbers (empty for
    /// stop-and-copy), and any change of throttle.
    pub decision: String,
    /// Pages found dirty at the end of the round (0 for stop-and-copy).
    pub dirty_pages: u64,
    /// When the round ended, on the migration's clock (since its start).
    pub end_ms: f64,
    /// The CPU throttle in force during the round, percent (auto-converge).
    pub throttle_pct: u32,
    /// The guest's write rate during the round (null where not measured).
    pub guest_rate_pps: Option<f64>,
    /// Time each vCPU slept throttled during the round, on average.
    pub throttled_ms: f64,
    /// `qemu`: pages of the round left unsent when it synced early; they
    /// stay pending for the next round.
    #[serde(skip_serializing_if = "is_zero")]
    pub carried_pages: u64,
    /// `qemu`: the threshold (bandwidth x downtime limit) at the round's
    /// sync, bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threshold_bytes: Option<u64>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A duration in milliseconds, as reports give them.
pub fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Downtime split into its phases, in milliseconds.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct DowntimeBreakdown {
    /// Parking the vCPUs at a safe point and SIGSTOP.
    pub pause: f64,
    pub final_harvest: f64,
    /// Sending the pages dirtied since the last round.
    pub last_pages: f64,
    /// Sending the device state until the destination confirmed it running,
    /// less the destination's own resume time (so it includes the network).
    pub device_state: f64,
    /// Destination: device state received -> guest running.
    pub resume: f64,
}

/// [`Report::mode`] of a prediction by the analytical model ([`crate::predict::model`]).
pub const MODEL: &str = "model";

/// [`Report::mode`] of a simulated migration ([`crate::predict::simulate`]).
pub const SIMULATED: &str = "simulated";

/// How many times the sender's thread blocked in each phase of the
/// downtime: each block is a wake-up the downtime waited for, whatever the
/// machine's speed (a measure that load does not change).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DowntimeSleeps {
    pub pause: u64,
    pub final_harvest: u64,
    pub last_pages: u64,
    /// Device state and resume (the sender waits for `Resumed`).
    pub device_state_and_resume: u64,
}

/// The report of one migration, from the source's point of view.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Report {
    /// The layout's version ([`REPORT_VERSION`]).
    pub report_version: ReportVersion,
    pub status: Status,
    /// Why it failed, when it did.
    pub error: Option<String>,
    /// Why pre-copy stopped iterating (policy's reason), when it got that far.
    pub stop_reason: Option<String>,
    /// Whether pre-copy converged (null for fixed rounds, or not that far).
    pub converged: Option<bool>,
    /// A prediction's remark (why it does not converge), if any.
    pub note: Option<String>,
    /// Identical pre-copy rounds a model predicted but did not list (a
    /// fixed point repeated until --max-time); 0 otherwise.
    pub rounds_not_listed: u64,
    #[serde(deserialize_with = "saved::mode")]
    pub mode: &'static str,
    pub tracker: String,
    pub policy: String,
    pub bandwidth: String,
    pub workload: String,
    pub vcpus: u32,
    pub memory_bytes: u64,
    pub page_size: u64,
    /// Migration start (after warm-up) -> verified completion.
    pub total_time_ms: f64,
    /// Connect and handshake, before round 0.
    pub setup_time_ms: f64,
    /// Source paused -> destination guest running.
    pub downtime_ms: Option<f64>,
    /// Migration start -> destination guest running (total time less the
    /// verification that follows): what models and simulations predict.
    /// Post-copy and hybrid: until every page is present at the destination.
    pub migration_time_ms: Option<f64>,
    pub downtime_breakdown_ms: DowntimeBreakdown,
    /// Real runs: times the sender blocked in each phase of the downtime.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downtime_sleeps: Option<DowntimeSleeps>,
    /// Bytes of the migration stream (pages, headers, device state); the
    /// verification digests are not counted.
    pub transferred_bytes: u64,
    pub transferred_pages: u64,
    /// Data connections the pages travelled on (QEMU: multifd channels).
    pub streams: u32,
    /// How the connections were secured: `plain`, `tls` (mutual TLS) or
    /// `psk` (a pre-shared key authenticated them; pages in the clear).
    pub transport: String,
    /// `--compress` codec, if any.
    pub compress: Option<String>,
    /// `--xbzrle` cache size, if any.
    pub xbzrle_cache_bytes: Option<u64>,
    /// How the transferred pages travelled.
    #[serde(flatten)]
    pub forms: crate::wire::datapath::SendStats,
    /// Raw size of the compressed pages over their compressed size.
    pub compression_ratio: Option<f64>,
    /// Post-copy and hybrid: requests, pulled and pushed pages, fault
    /// latency (local runs), time to populate, guest rate meanwhile.
    #[serde(flatten)]
    pub postcopy: PostcopyStats,
    /// Destination: time spent preallocating its memory before the
    /// migration (local runs; null when lazy).
    pub receiver_prealloc_ms: Option<f64>,
    /// Starting the source guest before the warm-up: spawning it, its
    /// memory filled, mapped here (local runs).
    pub source_start_ms: Option<f64>,
    /// The source guest's own start: from spawning it until every vCPU
    /// runs, its memory populated and stamped (part of `source_start_ms`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_start_ms: Option<f64>,
    /// CPU time of this process (every thread, from /proc) while round 0
    /// was sent until acknowledged: the sender's cost of moving memory.
    /// In `migrate` the receiver's threads share the process and count too.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sender_round0_cpu_ms: Option<f64>,
    /// Dirty-set harvests done.
    pub dirty_sync_count: u64,
    /// Time spent harvesting dirty sets, over all harvests and the longest.
    pub harvest_total_ms: f64,
    pub harvest_max_ms: f64,
    /// `mprotect` tracker: write faults the guest took, and those that had
    /// to unprotect more than their page (`vm.max_map_count` reached).
    pub tracker_faults: Option<u64>,
    pub tracker_coalesced: Option<u64>,
    pub verified_pages: u64,
    pub mismatched_pages: u64,
    /// Guest write rate achieved during warm-up, before migration.
    pub guest_dirty_rate_pps: f64,
    /// The workload's target rate (null for `max` and `idle`).
    pub guest_target_rate_pps: Option<f64>,
    /// Guest write rate during pre-copy, while tracked (and competing with
    /// the sender for CPU); null when migration did not get that far.
    pub guest_rate_precopy_pps: Option<f64>,
    /// The CPU throttle when pre-copy ended, percent (QEMU's
    /// `cpu-throttle-percentage`; 0 when auto-converge did not throttle).
    pub cpu_throttle_percentage: u32,
    /// From the first throttle (auto-converge or dirty limit) to the pause.
    pub throttled_ms: f64,
    /// Writes the guest did not do in its throttled rounds, against its
    /// rate before migration.
    pub guest_work_lost_writes: u64,
    /// Write rate of the destination guest right after it resumed (local runs).
    pub destination_guest_rate_pps: Option<f64>,
    pub source_guest_pid: Option<i32>,
    /// `--cpu-cap`: the source guest's cap, percent of one CPU, and how it
    /// was enforced (`cgroup-v2`, `cgroup-v1` or `duty-cycle`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub cpu_cap_pct: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub cpu_cap_method: Option<String>,
    /// The source guest's CPU use from the migration's start to its pause,
    /// percent of one CPU (its threads' run time, /proc/PID/task/*/schedstat).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub guest_cpu_pct: Option<f64>,
    /// A `compute` workload's operations per second on the source over the
    /// same span (its progress, where writes/s says little).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub guest_ops_rate: Option<f64>,
    /// Local runs: how the destination's side ended (a sender's cancel
    /// reaches it as `cancelled`).
    pub destination_status: Option<Status>,
    /// After a failure: the source guest is running again (resumed if it
    /// had been paused; for a writing workload, its writes were seen to go on).
    pub source_guest_kept_running: bool,
    /// With `--streams N` > 1: the pages each data connection carried, as
    /// the source counted them (empty with one stream).
    pub stream_pages: Vec<u64>,
    /// The same as the destination counted them (local migrations).
    pub destination_stream_pages: Vec<u64>,
    /// Page-cache teleportation (`--teleport`), when used.
    #[serde(flatten)]
    pub teleport: Option<TeleportStats>,
    pub rounds: Vec<RoundReport>,
    /// The guest and the sender over time (see [`timeline`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub timeline: Vec<timeline::Sample>,
    /// What the migration cost the guest's work (see [`impact`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub impact: Option<impact::Impact>,
    /// CPU time the timeline's sampler thread used (its cost).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sampler_cpu_ms: Option<f64>,
}

impl Report {
    pub fn write_json(&self, path: &Path) -> std::io::Result<()> {
        let mut f = std::fs::File::create(path)?;
        serde_json::to_writer_pretty(&mut f, self)?;
        f.write_all(b"\n")
    }
}

/// Header of the per-round table.
pub fn round_header() -> String {
    format!(
        "{:>5} {:>9} {:>9} {:>9} {:>10} {:>14} {:>12} {:>14} {:>8}",
        "round",
        "pages",
        "MiB",
        "ms",
        "Mbit/s",
        "dirty pages/s",
        "rate limit",
        "guest writes/s",
        "throttle"
    )
}

/// One row of the per-round table.
pub fn round_row(r: &RoundReport) -> String {
    let round = if r.stop_and_copy {
        "stop".to_string()
    } else if r.postcopy {
        "post".to_string()
    } else {
        r.round.to_string()
    };
    let limit = r.rate_limit_bps.map_or("unlimited".to_string(), |b| {
        format!("{:.0} Mbit/s", b as f64 / 1e6)
    });
    let guest = r
        .guest_rate_pps
        .map_or("-".to_string(), |g| format!("{g:.0}"));
    let throttle = match (r.throttle_pct, r.throttled_ms > 0.0) {
        (0, false) => "-".to_string(),
        (0, true) => "limit".to_string(),
        (p, _) => format!("{p}%"),
    };
    format!(
        "{:>5} {:>9} {:>9.1} {:>9.1} {:>10.1} {:>14.0} {:>12} {:>14} {:>8}",
        round,
        r.pages,
        r.bytes as f64 / (1u64 << 20) as f64,
        r.duration_ms,
        r.throughput_mbps,
        r.dirty_rate_pps,
        limit,
        guest,
        throttle
    )
}

/// The closing summary, several lines.
/// The summary's words for a transport.
pub fn transport_line(t: &str) -> String {
    match t {
        "tls" => "tls (mutual TLS 1.3: authenticated and encrypted)".into(),
        "psk" => "psk (pre-shared key: authenticated, pages in the clear)".into(),
        "plain" => "plain (neither authenticated nor encrypted)".into(),
        other => other.into(),
    }
}

pub fn summary(r: &Report) -> String {
    let mut s = String::new();
    let status = match r.status {
        Status::Completed => "completed".to_string(),
        Status::Failed => format!("FAILED: {}", r.error.as_deref().unwrap_or("unknown error")),
        Status::Cancelled => format!("CANCELLED: {}", r.error.as_deref().unwrap_or("cancelled")),
    };
    s += &format!("status            {status}\n");
    if let Some(reason) = &r.stop_reason {
        let converged = match r.converged {
            Some(true) => " (pre-copy converged)",
            Some(false) => " (pre-copy did not converge)",
            None => "",
        };
        s += &format!("stop reason       {reason}{converged}\n");
    }
    if let Some(note) = &r.note {
        s += &format!("note              {note}\n");
    }
    if let Some(t) = &r.teleport {
        s += &t.summary();
    }
    s += &format!(
        "total time        {:.1} ms (setup {:.1} ms)\n",
        r.total_time_ms, r.setup_time_ms
    );
    if let Some(d) = r.downtime_ms {
        let b = &r.downtime_breakdown_ms;
        s += &format!(
            "downtime          {d:.2} ms = pause {:.2} + final harvest {:.2} + last pages {:.2} + device state {:.2} + resume {:.2}\n",
            b.pause, b.final_harvest, b.last_pages, b.device_state, b.resume
        );
    }
    s += &format!(
        "transferred       {} ({} pages) in {} rounds{}\n",
        fmt_bytes(r.transferred_bytes),
        r.transferred_pages,
        r.rounds.len() as u64 + r.rounds_not_listed,
        match r.rounds_not_listed {
            0 => String::new(),
            n => format!(" ({n} identical ones not listed)"),
        }
    );
    if !r.transport.is_empty() && r.mode != SIMULATED && r.mode != MODEL {
        s += &format!("transport         {}\n", transport_line(&r.transport));
    }
    let f = &r.forms;
    if f.duplicate_pages + f.compressed_pages + f.xbzrle_pages > 0 || r.streams > 1 {
        let mut parts = vec![
            match r.streams {
                0 | 1 => "1 stream".to_string(),
                n => format!("{n} streams"),
            },
            format!("{} normal pages", f.normal_pages),
            format!("{} zero pages as markers", f.duplicate_pages),
        ];
        if let (Some(c), Some(ratio)) = (&r.compress, r.compression_ratio) {
            parts.push(format!(
                "{c}: {} pages in {} (ratio {ratio:.1})",
                f.compressed_pages,
                fmt_bytes(f.compressed_bytes)
            ));
        }
        if r.xbzrle_cache_bytes.is_some() {
            parts.push(format!(
                "xbzrle: {} pages in {}, cache {} hits / {} misses, {} overflows",
                f.xbzrle_pages,
                fmt_bytes(f.xbzrle_bytes),
                f.xbzrle_cache_hits,
                f.xbzrle_cache_misses,
                f.xbzrle_overflow
            ));
        }
        s += &format!("data path         {}\n", parts.join(", "));
    }
    let p = &r.postcopy;
    if p.pages_pushed + p.pages_pulled > 0 {
        s += &format!(
            "post-copy         {} requests; {} pages pulled, {} pushed",
            p.postcopy_requests, p.pages_pulled, p.pages_pushed
        );
        if let Some(l) = p.fault_latency_us {
            s += &format!(
                "; {} faults waited p50 {} us, p99 {} us, max {} us",
                l.count, l.p50, l.p99, l.max
            );
        }
        if let Some(t) = p.postcopy_populated_ms {
            s += &format!("; all present {t:.1} ms after resume");
        }
        if let Some(g) = p.guest_rate_postcopy_pps {
            s += &format!("; guest {g:.0} pages/s meanwhile");
        }
        s.push('\n');
    }
    if r.throttled_ms > 0.0 {
        s += &format!(
            "throttle          {} for {:.0} ms before the pause; {} guest writes lost\n",
            match r.cpu_throttle_percentage {
                0 => "dirty limit".to_string(),
                p => format!("cpu {p}% at the end"),
            },
            r.throttled_ms,
            r.guest_work_lost_writes
        );
    }
    if r.mode == SIMULATED || r.mode == MODEL {
        s += &format!(
            "{:<18}no memory moved: rounds, times and bytes are predicted\n",
            r.mode
        );
        s += &format!(
            "guest dirty rate  {:.0} pages/s (the workload's rate)",
            r.guest_target_rate_pps.unwrap_or(0.0)
        );
    } else {
        s += &format!(
            "tracker           {}: {} harvests, {:.2} ms in all, longest {:.3} ms{}\n",
            r.tracker,
            r.dirty_sync_count,
            r.harvest_total_ms,
            r.harvest_max_ms,
            match (r.tracker_faults, r.tracker_coalesced) {
                (Some(f), Some(c)) => format!(", {f} write faults ({c} coalesced)"),
                _ => String::new(),
            }
        );
        if r.status == Status::Completed || r.verified_pages.saturating_add(r.mismatched_pages) > 0
        {
            s += &format!(
                "verified          {} pages, {} mismatched\n",
                r.verified_pages, r.mismatched_pages
            );
        }
        let target = r
            .guest_target_rate_pps
            .map_or(String::new(), |t| format!(" (target {t:.0})"));
        s += &format!(
            "guest dirty rate  {:.0} pages/s before migration{target}",
            r.guest_dirty_rate_pps
        );
        if let Some(p) = r.guest_rate_precopy_pps {
            s += &format!(", {p:.0} during pre-copy");
        }
        if let Some(d) = r.destination_guest_rate_pps {
            s += &format!(", {d:.0} pages/s on the destination");
        }
    }
    s.push('\n');
    if let Some(i) = &r.impact {
        s += &impact::line(i);
        s.push('\n');
    }
    s
}

/// Post-copy figures, in the reports of both ends.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PostcopyStats {
    /// Page requests the destination sent (one per demand fault it could
    /// not find already requested).
    pub postcopy_requests: u64,
    /// Pages by request and by the background push: as sent (the source's
    /// report), or as first placed (the destination's, and `migrate`'s).
    pub pages_pulled: u64,
    pub pages_pushed: u64,
    /// Missing-page faults the destination's guest took.
    pub postcopy_faults: u64,
    /// Fault read -> page placed, over the faults that waited (destination only).
    pub fault_latency_us: Option<Latency>,
    /// Destination resumed -> every page present.
    pub postcopy_populated_ms: Option<f64>,
    /// Destination: dropping its stale copies of the pages to fetch (punching
    /// them out of its memory), inside the downtime.
    pub postcopy_discard_ms: Option<f64>,
    /// The destination guest's write rate while pages were still missing.
    pub guest_rate_postcopy_pps: Option<f64>,
}

/// A latency distribution in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Latency {
    pub count: u64,
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
}
