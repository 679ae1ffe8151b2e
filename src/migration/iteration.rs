//! QEMU's migration thread between two dirty syncs, as `--policy qemu`
//! runs it (`migration/migration.c`: `migration_iteration_run`,
//! `migration_update_counters`; `migration/ram.c`: the pending estimate).
//!
//! QEMU does not send a full pass and then sync the dirty bitmap. It sends
//! while it estimates the bytes still pending (the pages of the bitmap not
//! sent yet); only when that estimate drops below `threshold = bandwidth x
//! downtime limit` does it sync the bitmap for an exact count, and it
//! completes if the exact count is still below, else it goes on sending.
//! The bandwidth is measured over each 100 ms period of the thread
//! (`BUFFER_DELAY`), or stated by the operator (QEMU 8.2's
//! `avail-switchover-bandwidth`, our `--switchover-bandwidth`). Until a
//! period has ended the threshold is 0: only an empty bitmap syncs.
//!
//! In livemig a round under this policy is one sync period: it ends when
//! [`Iteration::wants_sync`] says so, possibly before every page of it went
//! out (the rest stay pending), and the next round continues the scan where
//! this one stopped, as QEMU's does. The same object paces the real sender
//! and the predictions.

use std::time::Duration;

/// The length of one bandwidth period (QEMU's `BUFFER_DELAY`).
pub const PERIOD: Duration = Duration::from_millis(100);

/// The migration thread's view of bandwidth and threshold.
#[derive(Clone, Debug)]
pub struct Iteration {
    downtime_limit: Duration,
    /// Bytes/s the operator says the switch-over will have (None: measured).
    switchover_bandwidth: Option<u64>,
    /// Bytes sent since the thread started.
    sent: u64,
    /// When the current period started, and the bytes sent by then.
    period_start: Duration,
    period_bytes: u64,
    /// Bytes/s measured over the last complete period (0.0: none yet).
    bandwidth: f64,
    /// Pending bytes below which the thread syncs (and may complete).
    threshold: u64,
}

impl Iteration {
    /// The thread starts its first period at `now`.
    pub fn new(downtime_limit: Duration, switchover_bandwidth: Option<u64>, now: Duration) -> Self {
        Self {
            downtime_limit,
            switchover_bandwidth,
            sent: 0,
            period_start: now,
            period_bytes: 0,
            bandwidth: 0.0,
            threshold: 0,
        }
    }

    /// The clock, and the bytes sent since the last tick: once a period of
    /// at least [`PERIOD`] has passed, measure its bandwidth, set the
    /// threshold from it and start the next period.
    pub fn tick(&mut self, now: Duration, sent: u64) {
        self.sent = self.sent.saturating_add(sent);
        let bytes = self.sent;
        let spent = now.saturating_sub(self.period_start);
        if spent < PERIOD {
            return;
        }
        // u64 -> f64: a byte count, exact far beyond a period's worth.
        self.bandwidth = bytes.saturating_sub(self.period_bytes) as f64 / spent.as_secs_f64();
        let believed = self
            .switchover_bandwidth
            .map_or(self.bandwidth, |b| b as f64);
        // f64 -> u64 saturates: a byte count.
        self.threshold = (believed * self.downtime_limit.as_secs_f64()) as u64;
        self.period_start = now;
        self.period_bytes = bytes;
    }

    /// When the current period ends (the threshold may change then).
    pub fn period_end(&self) -> Duration {
        self.period_start + PERIOD
    }

    /// Bytes/s measured over the last complete period (0.0 before one).
    pub fn bandwidth(&self) -> f64 {
        self.bandwidth
    }

    /// Pending bytes below which the thread syncs and may complete.
    pub fn threshold(&self) -> u64 {
        self.threshold
    }

    /// Whether to sync now, given the bytes still pending (the estimate:
    /// pages found dirty and not sent yet). Nothing pending syncs too:
    /// there is nothing left to send until a sync finds more.
    pub fn wants_sync(&self, pending_bytes: u64) -> bool {
        pending_bytes == 0 || pending_bytes < self.threshold
    }

    /// After a sync, whether the exact pending bytes let it complete.
    pub fn completes(&self, pending_bytes: u64) -> bool {
        self.wants_sync(pending_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn the_threshold_follows_each_periods_bandwidth() {
        let mut it = Iteration::new(MS(300), None, MS(0));
        assert_eq!(it.threshold(), 0);
        assert!(
            !it.wants_sync(1),
            "no period measured: only nothing pending syncs"
        );
        assert!(it.wants_sync(0));
        it.tick(MS(99), 1_000_000);
        assert_eq!(it.threshold(), 0, "the period has not ended");
        // 10 MB in 100 ms: 100 MB/s; x 300 ms = 30 MB.
        it.tick(MS(100), 9_000_000);
        assert_eq!((it.bandwidth(), it.threshold()), (1e8, 30_000_000));
        assert_eq!(it.period_end(), MS(200));
        assert!(it.wants_sync(29_999_999) && !it.wants_sync(30_000_000));
        // A slower period (150 ms for 3 MB: 20 MB/s) lowers it.
        it.tick(MS(250), 3_000_000);
        assert_eq!(it.threshold(), 6_000_000);
    }

    #[test]
    fn a_stated_switchover_bandwidth_overrides_the_measured_one() {
        let mut it = Iteration::new(MS(300), Some(1_000_000_000), MS(0));
        it.tick(MS(100), 1_000);
        assert_eq!(it.bandwidth(), 10_000.0);
        assert_eq!(it.threshold(), 300_000_000);
        assert!(it.completes(299_999_999) && !it.completes(300_000_000));
    }
}
