//! The argv contract of the guest process: how an owner starts
//! `livemig guest` ([`GuestArgs::to_argv`]) and how the guest reads its
//! arguments back (the clap derive on the same struct), in one place so the
//! two cannot drift apart.

use std::ffi::OsString;
use std::os::fd::RawFd;
use std::path::PathBuf;

use crate::guest::dirty::TrackerKind;
use crate::guest::workload::Workload;

/// How a fresh guest starts (`--workload`, `--vcpus`, `--seed`).
#[derive(Clone, Debug, PartialEq)]
pub struct Fresh {
    pub workload: Workload,
    pub vcpus: u32,
    pub seed: u64,
    /// The backing file its page cache is read from (`cache=F`).
    pub disk: Option<PathBuf>,
}

/// Arguments of the `livemig guest` process (after the `guest` word).
#[derive(Clone, Debug, PartialEq, clap::Args)]
pub struct GuestArgs {
    /// Guest RAM (a memfd inherited from the owner).
    #[arg(long)]
    pub mem_fd: RawFd,
    #[arg(long = "mem-bytes")]
    pub memory_bytes: u64,
    /// The control block's memfd.
    #[arg(long)]
    pub control_fd: RawFd,
    /// The dirty bitmap's memfd (`bitmap` and `mprotect` trackers).
    #[arg(long)]
    pub dirty_fd: Option<RawFd>,
    /// How the owner tracks this guest's writes (a fresh guest sets it up).
    #[arg(long, default_value = "bitmap")]
    pub tracker: TrackerKind,
    /// Fresh guest: its workload (with --vcpus and --seed).
    #[arg(long, required_unless_present = "incoming")]
    pub workload: Option<Workload>,
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Fresh guest with page cache: the backing file it is read from.
    #[arg(long)]
    pub disk: Option<PathBuf>,
    /// The memfd the guest publishes its page -> block mapping into.
    #[arg(long)]
    pub cache_map_fd: Option<RawFd>,
    /// Destination guest: wait for the device state in the control block.
    #[arg(long, conflicts_with = "workload")]
    pub incoming: bool,
}

impl GuestArgs {
    /// A guest over these fds: fresh, running `fresh`, or (None) incoming.
    pub fn new(
        (mem_fd, memory_bytes): (RawFd, u64),
        control_fd: RawFd,
        dirty_fd: Option<RawFd>,
        tracker: TrackerKind,
        fresh: Option<&Fresh>,
        cache_map_fd: Option<RawFd>,
    ) -> Self {
        Self {
            mem_fd,
            memory_bytes,
            control_fd,
            dirty_fd,
            tracker,
            workload: fresh.map(|f| f.workload.clone()),
            vcpus: fresh.map_or(1, |f| f.vcpus),
            seed: fresh.map_or(1, |f| f.seed),
            disk: fresh.and_then(|f| f.disk.clone()),
            cache_map_fd,
            incoming: fresh.is_none(),
        }
    }

    /// A fresh guest's start; None for an incoming guest.
    pub fn fresh(&self) -> Option<Fresh> {
        self.workload.as_ref().map(|w| Fresh {
            workload: w.clone(),
            vcpus: self.vcpus,
            seed: self.seed,
            disk: self.disk.clone(),
        })
    }

    /// The arguments after `guest`, as the derive reads them back.
    pub fn to_argv(&self) -> Vec<OsString> {
        let mut a: Vec<String> = vec![
            "--mem-fd".into(),
            self.mem_fd.to_string(),
            "--mem-bytes".into(),
            self.memory_bytes.to_string(),
            "--control-fd".into(),
            self.control_fd.to_string(),
            "--tracker".into(),
            self.tracker.to_string(),
        ];
        if let Some(fd) = self.dirty_fd {
            a.extend(["--dirty-fd".into(), fd.to_string()]);
        }
        match &self.workload {
            Some(w) => a.extend([
                "--workload".into(),
                w.to_string(),
                "--vcpus".into(),
                self.vcpus.to_string(),
                "--seed".into(),
                self.seed.to_string(),
            ]),
            None => a.push("--incoming".into()),
        }
        if let Some(fd) = self.cache_map_fd {
            a.extend(["--cache-map-fd".into(), fd.to_string()]);
        }
        let mut a: Vec<OsString> = a.into_iter().map(OsString::from).collect();
        if let Some(disk) = &self.disk {
            a.extend(["--disk".into(), disk.clone().into_os_string()]);
        }
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: GuestArgs,
    }

    fn round_trip(a: &GuestArgs) -> GuestArgs {
        let argv = std::iter::once(OsString::from("guest")).chain(a.to_argv());
        Cli::try_parse_from(argv).unwrap().args
    }

    #[test]
    fn argv_reads_back() {
        let fresh = Fresh {
            workload: "hotset:wws=8M,rate=20k,zero=0.5".parse().unwrap(),
            vcpus: 3,
            seed: 42,
            disk: Some("/tmp/disk".into()),
        };
        let a = GuestArgs::new(
            (7, 1 << 30),
            8,
            Some(9),
            TrackerKind::Mprotect,
            Some(&fresh),
            Some(10),
        );
        assert_eq!(round_trip(&a), a);
        assert_eq!(round_trip(&a).fresh(), Some(fresh));
        let incoming = GuestArgs::new((3, 4096), 4, None, TrackerKind::UffdWp, None, None);
        assert_eq!(round_trip(&incoming), incoming);
        assert_eq!(round_trip(&incoming).fresh(), None);
    }
}
