//! `--cpu-cap PCT`: limit a guest process to PCT percent of one CPU, as
//! Shreya et al. cap VMs at 25-200 % to rank their migrations.
//!
//! Three ways, tried in this order unless one is asked for:
//! - `cgroup-v2`: a child cgroup of ours on the unified hierarchy with
//!   `cpu.max` = `PCT*1000 100000`, the guest's pid moved into it;
//! - `cgroup-v1`: the same with the v1 `cpu` controller's CFS quota
//!   (`cpu.cfs_quota_us`), on hosts where the cpu controller is still
//!   bound to v1 (these machines: their unified hierarchy has no `cpu`);
//! - `duty-cycle`: the guest's vCPUs sleep at their safe points so each
//!   runs `PCT / vcpus` % of the time (the CPU throttle's mechanism). It
//!   also slows a guest that is not CPU-bound, since sleeping time is not
//!   counted as idle: a kernel cap takes only CPU actually used.
//!
//! The cgroup is removed when the [`Capped`] is dropped (the guest, if it
//! still runs, moved back first).

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::guest::control::Control;

/// How the cap is enforced.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CapMethod {
    /// The kernel's cgroup cap if there is one, else the duty cycle.
    #[default]
    Auto,
    CgroupV2,
    CgroupV1,
    DutyCycle,
}

impl CapMethod {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::CgroupV2 => "cgroup-v2",
            Self::CgroupV1 => "cgroup-v1",
            Self::DutyCycle => "duty-cycle",
        }
    }
}

impl fmt::Display for CapMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CapMethod {
    type Err = CapError;

    fn from_str(s: &str) -> Result<Self, CapError> {
        [Self::Auto, Self::CgroupV2, Self::CgroupV1, Self::DutyCycle]
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| CapError::Method(s.into()))
    }
}

/// A cap asked for: percent of one CPU and how.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuCap {
    pub pct: u32,
    pub method: CapMethod,
}

/// Lowest cap (Shreya et al.'s smallest).
pub const MIN_CAP_PCT: u32 = 25;

#[derive(Debug, thiserror::Error)]
pub enum CapError {
    #[error("unknown method \"{0}\" (auto, cgroup-v2, cgroup-v1, duty-cycle)")]
    Method(String),
    #[error("{pct}: must be between {MIN_CAP_PCT} and {max} (100 per vCPU, {vcpus} vCPU(s))")]
    Range { pct: u32, vcpus: u32, max: u32 },
    #[error("{method} is not available here: {why}")]
    Unavailable { method: &'static str, why: String },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl CpuCap {
    /// Check the cap against a guest of `vcpus` vCPUs.
    pub fn check(&self, vcpus: u32) -> Result<(), CapError> {
        let max = vcpus.saturating_mul(100);
        match (MIN_CAP_PCT..=max).contains(&self.pct) {
            true => Ok(()),
            false => Err(CapError::Range {
                pct: self.pct,
                vcpus,
                max,
            }),
        }
    }
}

/// A cap in force on a guest; dropping it lifts it.
pub struct Capped {
    pub pct: u32,
    /// The method used (never `Auto`).
    pub method: CapMethod,
    pid: i32,
    cgroup: Option<Cgroup>,
    control: Control,
}

/// A cgroup of ours holding the guest, and where to move it back.
struct Cgroup {
    dir: PathBuf,
    parent_procs: PathBuf,
}

impl Capped {
    /// Cap guest `pid` (of `vcpus` vCPUs, steered through `control`).
    pub fn apply(cap: CpuCap, pid: i32, vcpus: u32, control: &Control) -> Result<Self, CapError> {
        cap.check(vcpus)?;
        let tries: &[CapMethod] = match cap.method {
            CapMethod::Auto => &[CapMethod::CgroupV2, CapMethod::CgroupV1],
            CapMethod::DutyCycle => &[],
            ref m => std::slice::from_ref(m),
        };
        let mut cgroup = None;
        let mut method = CapMethod::DutyCycle;
        for &m in tries {
            match cgroup_cap(m, cap.pct, pid) {
                Ok(g) => {
                    (cgroup, method) = (Some(g), m);
                    break;
                }
                Err(e) if cap.method == m => return Err(e),
                Err(_) => {}
            }
        }
        if method == CapMethod::DutyCycle {
            control.set_cpu_cap(cap.pct);
        }
        Ok(Self {
            pct: cap.pct,
            method,
            pid,
            cgroup,
            control: control.clone(),
        })
    }
}

impl Drop for Capped {
    fn drop(&mut self) {
        if let Some(g) = self.cgroup.take() {
            // A guest still running goes back where it was, so the empty
            // cgroup can go.
            let _ = std::fs::write(&g.parent_procs, self.pid.to_string());
            let _ = std::fs::remove_dir(&g.dir);
        } else {
            self.control.set_cpu_cap(0);
        }
    }
}

/// Put `pid` in a new cgroup capped at `pct` % with `method`'s files.
fn cgroup_cap(method: CapMethod, pct: u32, pid: i32) -> Result<Cgroup, CapError> {
    let name = method.as_str();
    let unavailable = |why: String| CapError::Unavailable { method: name, why };
    let parent = own_cgroup(method).ok_or_else(|| {
        unavailable(match method {
            CapMethod::CgroupV2 => "no cgroup2 hierarchy with the cpu controller".into(),
            _ => "no cgroup v1 hierarchy with the cpu controller".into(),
        })
    })?;
    let write = |path: &Path, what: &str| {
        std::fs::write(path, what).map_err(|source| CapError::Write {
            path: path.into(),
            source,
        })
    };
    if method == CapMethod::CgroupV2 {
        // The children of our cgroup need the cpu controller handed down.
        let control = parent.join("cgroup.subtree_control");
        let on = std::fs::read_to_string(&control).unwrap_or_default();
        if !on.split_whitespace().any(|c| c == "cpu") {
            write(&control, "+cpu")?;
        }
    }
    let dir = parent.join(format!("livemig-{pid}"));
    std::fs::create_dir(&dir).map_err(|source| CapError::Write {
        path: dir.clone(),
        source,
    })?;
    let quota = u64::from(pct) * 1000;
    let set = match method {
        CapMethod::CgroupV2 => write(&dir.join("cpu.max"), &format!("{quota} 100000")),
        _ => write(&dir.join("cpu.cfs_period_us"), "100000")
            .and_then(|()| write(&dir.join("cpu.cfs_quota_us"), &quota.to_string())),
    }
    .and_then(|()| write(&dir.join("cgroup.procs"), &pid.to_string()));
    if let Err(e) = set {
        let _ = std::fs::remove_dir(&dir);
        return Err(e);
    }
    Ok(Cgroup {
        dir,
        parent_procs: parent.join("cgroup.procs"),
    })
}

/// The directory of this process's cgroup in the hierarchy `method` uses,
/// if it is mounted and offers the cpu controller.
fn own_cgroup(method: CapMethod) -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    let ours = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let v2 = method == CapMethod::CgroupV2;
    let mount = mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let (dir, fstype, opts) = (f.get(1)?, f.get(2)?, f.get(3)?);
        let fits = match v2 {
            true => *fstype == "cgroup2",
            false => *fstype == "cgroup" && opts.split(',').any(|o| o == "cpu"),
        };
        fits.then(|| PathBuf::from(dir))
    })?;
    // Lines are `id:controllers:path`; v2's has no controllers.
    let path = ours.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, ctl, path) = (f.next()?, f.next()?, f.next()?);
        let fits = match v2 {
            true => ctl.is_empty(),
            false => ctl.split(',').any(|c| c == "cpu"),
        };
        fits.then_some(path)
    })?;
    let dir = mount.join(path.trim_start_matches('/'));
    if v2 {
        let ctl = std::fs::read_to_string(dir.join("cgroup.controllers")).ok()?;
        ctl.split_whitespace().any(|c| c == "cpu").then_some(dir)
    } else {
        dir.join("cpu.cfs_quota_us").exists().then_some(dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cap_is_checked_against_the_vcpus() {
        let cap = |pct| CpuCap {
            pct,
            method: CapMethod::Auto,
        };
        assert!(cap(25).check(1).is_ok() && cap(200).check(2).is_ok());
        for (pct, vcpus, needle) in [
            (0, 1, "0: must be between 25 and 100"),
            (24, 2, "between 25 and 200"),
            (
                201,
                2,
                "201: must be between 25 and 200 (100 per vCPU, 2 vCPU(s))",
            ),
        ] {
            let e = cap(pct).check(vcpus).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
        assert_eq!(
            "cgroup-v1".parse::<CapMethod>().unwrap(),
            CapMethod::CgroupV1
        );
        assert!("cgroup"
            .parse::<CapMethod>()
            .unwrap_err()
            .to_string()
            .contains("auto"));
    }
}
