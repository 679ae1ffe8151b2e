//! `--cpu-cap` and its method: flags of `migrate` and `send`.

use anyhow::{bail, Result};
use clap::Args;

use livemig::guest::cpucap::{CapMethod, CpuCap};

#[derive(Args, Clone, Debug)]
pub struct CapFlags {
    /// Limit the source guest to PCT percent of one CPU (25 up to 100 per
    /// vCPU): a cgroup's CPU quota where the kernel offers one, else an
    /// in-guest duty cycle; the report says which, and the CPU it used.
    #[arg(long, value_name = "PCT")]
    pub cpu_cap: Option<u32>,
    /// How to enforce --cpu-cap: auto | cgroup-v2 | cgroup-v1 | duty-cycle.
    #[arg(
        long,
        value_name = "METHOD",
        default_value = "auto",
        requires = "cpu_cap"
    )]
    pub cpu_cap_method: CapMethod,
}

impl CapFlags {
    /// The cap asked for, checked against the guest's vCPUs.
    pub fn config(&self, vcpus: u32) -> Result<Option<CpuCap>> {
        let Some(pct) = self.cpu_cap else {
            return Ok(None);
        };
        let cap = CpuCap {
            pct,
            method: self.cpu_cap_method,
        };
        if let Err(e) = cap.check(vcpus) {
            bail!("invalid --cpu-cap {pct}: {e}");
        }
        Ok(Some(cap))
    }
}
