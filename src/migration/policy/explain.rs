//! The policy's decisions in words, with the numbers it weighed
//! (`--explain`, and each round's `decision` in the report).

use std::time::Duration;

use super::*;

impl Precopy {
    /// The decision after the last round in words, with the numbers the
    /// policy weighed (for teaching: `--explain`).
    pub fn explain(&self, decision: Decision, elapsed: Duration) -> String {
        use crate::util::units::{fmt_bytes, fmt_rate_bits};
        let Some(last) = self.rounds.last() else {
            return String::new();
        };
        let c = &self.cfg;
        let n = self.rounds.len();
        let mut why = format!(
            "round {} sent {} pages in {:.1} ms ({}); {} pages were written meanwhile ({:.0} pages/s). ",
            last.round,
            last.pages,
            last.duration.as_secs_f64() * 1e3,
            fmt_rate_bits(last.throughput_bytes_per_s()),
            last.dirty_pages,
            last.dirty_rate_pps(),
        );
        why += &match c.policy {
            Policy::Fixed(k) => format!("fixed: {n} of {k} rounds done"),
            Policy::Xen => {
                let sent = memory_sent(c, &self.rounds);
                format!(
                    "xen: {} pages sent in this round (stops below {XEN_MIN_DIRTY_PAGES}), {n} of {XEN_MAX_ROUNDS} live rounds, {} sent = {:.2}x memory (stops above {XEN_MAX_SENT_FACTOR}x)",
                    last.pages,
                    fmt_bytes(sent),
                    sent as f64 / c.memory_bytes as f64,
                )
            }
            Policy::Qemu => {
                let pending = last.pending_pages().saturating_mul(c.page_size.as_u64());
                let bw = self.iteration.as_ref().map_or(0.0, |i| i.bandwidth());
                let believed = c.switchover_bandwidth.map_or(bw, |b| b as f64);
                format!(
                    "qemu: the sync found {} pending ({} pages carried unsent, {} found dirty) against a threshold of {} = {} x {:.1} ms ({})",
                    fmt_bytes(pending),
                    last.carried_pages,
                    last.dirty_pages,
                    fmt_bytes(last.threshold_bytes.unwrap_or(0)),
                    fmt_rate_bits(believed),
                    c.downtime_limit.as_secs_f64() * 1e3,
                    match c.switchover_bandwidth {
                        Some(_) => "--switchover-bandwidth",
                        None => "measured over the last 100 ms",
                    },
                )
            }
            Policy::Threshold => match expected_downtime(c, last) {
                Some(d) => format!(
                    "threshold: expected downtime = {} dirty / {} = {:.1} ms (stops at or below {:.1} ms)",
                    fmt_bytes(last.pending_pages().saturating_mul(c.page_size.as_u64())),
                    fmt_rate_bits(last.throughput_bytes_per_s()),
                    d.as_secs_f64() * 1e3,
                    c.downtime_limit.as_secs_f64() * 1e3
                ),
                None => "threshold: no bandwidth measured yet".into(),
            },
        };
        if let Bandwidth::Dynamic { inc, max, .. } = c.bandwidth {
            let dirty = last.dirty_rate_pps() * c.page_size.as_u64() as f64;
            why += &format!(
                "; dynamic rate: dirtying {} + inc {} -> next limit {} (max {})",
                fmt_rate_bits(dirty),
                fmt_rate_bits(inc as f64),
                self.limit
                    .map_or("unlimited".into(), |l| fmt_rate_bits(l as f64)),
                fmt_rate_bits(max as f64),
            );
        }
        why += &format!(
            "; {:.2} s of --max-time {:.0} s. ",
            elapsed.as_secs_f64(),
            c.max_time.as_secs_f64()
        );
        why += &match decision {
            Decision::Continue => "Go on: another round.".to_string(),
            Decision::Stop(r) => format!("Stop-and-copy ({}): {}", r.as_str(), r.describe()),
        };
        why
    }
}
