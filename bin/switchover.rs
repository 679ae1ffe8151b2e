//! `--switchover-bandwidth`: the bandwidth `--policy qemu` believes the
//! switch-over will have (QEMU 8.2's `avail-switchover-bandwidth`).

use clap::Args;
use livemig::util::units::Rate;

#[derive(Args)]
pub struct SwitchoverFlags {
    /// The bandwidth the switch-over will have (RATE: 1gbit, 120MiB/s),
    /// used for qemu's threshold (bandwidth x --downtime-limit) instead of
    /// the bandwidth measured over each 100 ms (QEMU 8.2's
    /// avail-switchover-bandwidth; 0, as there, means measured).
    #[arg(long, value_name = "RATE")]
    pub switchover_bandwidth: Option<Rate>,
}

impl SwitchoverFlags {
    /// Bytes/s, where given.
    pub fn bytes_per_s(&self) -> Option<u64> {
        self.switchover_bandwidth.map(|r| r.0).filter(|&b| b > 0)
    }
}
