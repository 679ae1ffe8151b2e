//! What the source guest used during a migration: its CPU (under
//! `--cpu-cap`, which is applied here) and a `compute` workload's
//! operations, from the migration's start to the pause.

use std::time::{Duration, Instant};

use super::{SendError, Source};
use crate::guest::cpucap::{Capped, CpuCap};
use crate::guest::process::Guest;
use crate::report::Report;

/// The guest's counters at one moment.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Sample {
    t: Instant,
    cpu: Duration,
    work_ops: u64,
}

impl Sample {
    pub(crate) fn now(guest: &Guest) -> Self {
        Self {
            t: Instant::now(),
            // Its threads' run time from /proc/PID/task/*/schedstat, to the
            // nanosecond (stat's clock ticks are too coarse for a short run).
            cpu: crate::guest::process::cpu_time(guest.pid()),
            work_ops: guest.control().work_ops(guest.vcpus()),
        }
    }
}

/// The cap in force and where the counters started.
pub(super) struct Usage {
    start: Sample,
    cap: Option<Capped>,
}

impl Usage {
    /// Apply `cap` (if any) to `src`'s guest and start counting.
    pub(super) fn start(cap: Option<CpuCap>, src: &Source) -> Result<Self, SendError> {
        let g = &src.guest;
        let cap = cap
            .map(|c| Capped::apply(c, g.pid(), g.vcpus(), g.control()))
            .transpose()
            .map_err(SendError::CpuCap)?;
        Ok(Self {
            start: Sample::now(g),
            cap,
        })
    }

    /// Fill the report's figures up to `paused` (or now, if the guest was
    /// never paused), then lift the cap.
    pub(super) fn finish(self, paused: Option<Sample>, guest: &Guest, report: &mut Report) {
        let end = paused.unwrap_or_else(|| Sample::now(guest));
        let secs = end.t.duration_since(self.start.t).as_secs_f64();
        if secs > 0.0 {
            let cpu = end.cpu.saturating_sub(self.start.cpu);
            report.guest_cpu_pct = Some(cpu.as_secs_f64() / secs * 100.0);
            let ops = end.work_ops.saturating_sub(self.start.work_ops);
            if ops > 0 {
                // u64 -> f64: a count of operations.
                report.guest_ops_rate = Some(ops as f64 / secs);
            }
        }
        if let Some(c) = &self.cap {
            report.cpu_cap_pct = Some(c.pct);
            report.cpu_cap_method = Some(c.method.as_str().into());
        }
    }
}
