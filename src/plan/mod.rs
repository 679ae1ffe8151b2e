//! Migration plans: many VMs moved between hosts over links they share
//! (Kherbache et al., Euro-Par 2014), in an order and with a level of
//! parallelism a [`Strategy`] gives.
//!
//! A plan names its hosts (each with its NIC's rate and, optionally, a
//! group and the memory it can hold), the interlinks between groups of
//! hosts, and the VMs (memory, workload, vCPUs, migration settings, source
//! and destination). A migration from host A to host B crosses A's NIC
//! out, B's NIC in and, when A and B are in different groups, the
//! interlink between them (each direction of a link is its own). Plans are
//! read from TOML (see `docs/plans.md`) or built from flags for the simple
//! case of N alike VMs between two hosts.

pub mod fabric;
pub mod real;
pub mod report;
pub mod simulate;
pub mod strategy;

use std::collections::HashMap;
use std::str::FromStr;

use serde::Deserialize;

use crate::guest::workload::Workload;
use crate::migration::policy::Policy;
use crate::migration::source::SenderConfig;
use crate::util::units::{fmt_bytes, Rate, Size, Span};
use crate::wire::ratelimit::Bandwidth;
pub use strategy::{Scheduler, Strategy};

/// A host of a plan.
#[derive(Clone, Debug)]
pub struct Host {
    pub name: String,
    /// Where its receiver listens (real runs).
    pub address: Option<String>,
    /// The command prefix that runs a command there (`ip netns exec a`,
    /// `ssh a`); empty: this machine.
    pub launcher: Vec<String>,
    /// NIC rate, bytes/s, each direction.
    pub nic: f64,
    pub group: Option<String>,
    /// Memory it can take in, bytes.
    pub memory: Option<u64>,
    /// Real runs: start its receiver (`receive --serve`); false: one is
    /// running already at `address` (which then gives its port).
    pub start_receiver: bool,
}

/// A link between two groups of hosts, bytes/s each direction.
#[derive(Clone, Debug)]
pub struct Interlink {
    pub between: [String; 2],
    pub rate: f64,
}

/// A VM to migrate.
#[derive(Clone, Debug)]
pub struct Vm {
    pub name: String,
    pub from: usize,
    pub to: usize,
    /// Memory, workload, vCPUs and how it migrates.
    pub migration: SenderConfig,
    /// VMs this one starts after.
    pub after: Vec<usize>,
}

/// A whole plan.
#[derive(Clone, Debug)]
pub struct Plan {
    pub hosts: Vec<Host>,
    pub links: Vec<Interlink>,
    pub vms: Vec<Vm>,
    /// The order to start VMs in (indices; every VM once).
    pub order: Vec<usize>,
}

/// A plan that cannot be used; each names the host, link, VM or key.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("reading {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Toml(String),
    #[error("the plan has no VMs")]
    Empty,
    #[error("the plan has no hosts")]
    NoHosts,
    #[error("host \"{0}\" is named twice")]
    HostTwice(String),
    #[error("VM \"{0}\" is named twice")]
    VmTwice(String),
    #[error("{what} names an unknown host \"{name}\"")]
    UnknownHost { what: String, name: String },
    #[error("{what} names an unknown VM \"{name}\"")]
    UnknownVm { what: String, name: String },
    #[error("link {a}-{b} joins unknown group \"{group}\"")]
    UnknownGroup { a: String, b: String, group: String },
    #[error("VM \"{vm}\" goes from group {a} to group {b}, and no link joins them")]
    NoLink { vm: String, a: String, b: String },
    #[error("{what}: the rate must be above 0")]
    ZeroRate { what: String },
    #[error("VM \"{0}\" migrates from a host to itself")]
    SameHost(String),
    #[error("VM \"{vm}\" needs {key}")]
    Missing { vm: String, key: &'static str },
    #[error("{what}: {key} = \"{value}\"")]
    Value {
        what: String,
        key: &'static str,
        value: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("host \"{host}\" can hold {}, but the VMs migrating to it need {}", fmt_bytes(*.memory), fmt_bytes(*.need))]
    TooBig {
        host: String,
        memory: u64,
        need: u64,
    },
    #[error("the order of VMs has a cycle: {0}")]
    Cycle(String),
}

/// The TOML form of a plan.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PlanFile {
    #[serde(default)]
    defaults: VmSpec,
    #[serde(default)]
    host: Vec<HostSpec>,
    #[serde(default)]
    link: Vec<LinkSpec>,
    #[serde(default)]
    vm: Vec<VmSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HostSpec {
    name: String,
    address: Option<String>,
    launcher: Option<String>,
    nic: String,
    group: Option<String>,
    memory: Option<String>,
    start_receiver: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LinkSpec {
    between: [String; 2],
    rate: String,
}

#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
struct VmSpec {
    name: Option<String>,
    from: Option<String>,
    to: Option<String>,
    /// This many alike VMs (named NAME-1, NAME-2...).
    count: Option<u32>,
    mem: Option<String>,
    workload: Option<String>,
    vcpus: Option<u32>,
    policy: Option<String>,
    bandwidth: Option<String>,
    downtime_limit: Option<String>,
    max_time: Option<String>,
    #[serde(default)]
    after: Vec<String>,
}

impl VmSpec {
    /// This spec with the defaults filled in.
    fn or(&self, d: &VmSpec) -> VmSpec {
        let pick = |a: &Option<String>, b: &Option<String>| a.clone().or_else(|| b.clone());
        VmSpec {
            name: self.name.clone(),
            from: pick(&self.from, &d.from),
            to: pick(&self.to, &d.to),
            count: self.count,
            mem: pick(&self.mem, &d.mem),
            workload: pick(&self.workload, &d.workload),
            vcpus: self.vcpus.or(d.vcpus),
            policy: pick(&self.policy, &d.policy),
            bandwidth: pick(&self.bandwidth, &d.bandwidth),
            downtime_limit: pick(&self.downtime_limit, &d.downtime_limit),
            max_time: pick(&self.max_time, &d.max_time),
            after: self.after.clone(),
        }
    }
}

/// Parse `value` of `key` for `what`, naming all three on failure.
fn parse<T: FromStr>(what: &str, key: &'static str, value: &str) -> Result<T, PlanError>
where
    T::Err: std::error::Error + Send + Sync + 'static,
{
    value.parse().map_err(|e| PlanError::Value {
        what: what.into(),
        key,
        value: value.into(),
        source: Box::new(e),
    })
}

fn rate(what: &str, value: &str) -> Result<f64, PlanError> {
    // u64 -> f64: a rate in bytes/s.
    let r = parse::<Rate>(what, "rate", value)?.0 as f64;
    if r <= 0.0 {
        return Err(PlanError::ZeroRate { what: what.into() });
    }
    Ok(r)
}

impl Plan {
    /// Read a plan from TOML text; `base` gives what a VM does not say.
    pub fn from_toml(text: &str, base: &SenderConfig) -> Result<Plan, PlanError> {
        let file: PlanFile = toml::from_str(text).map_err(|e| PlanError::Toml(one_line(&e)))?;
        let mut hosts = Vec::new();
        for h in &file.host {
            let what = format!("host \"{}\"", h.name);
            if hosts.iter().any(|x: &Host| x.name == h.name) {
                return Err(PlanError::HostTwice(h.name.clone()));
            }
            hosts.push(Host {
                name: h.name.clone(),
                address: h.address.clone(),
                launcher: h
                    .launcher
                    .as_deref()
                    .map(|l| l.split_whitespace().map(String::from).collect())
                    .unwrap_or_default(),
                nic: rate(&format!("{what} nic"), &h.nic)?,
                group: h.group.clone(),
                memory: h
                    .memory
                    .as_deref()
                    .map(|m| parse::<Size>(&what, "memory", m).map(|s| s.0))
                    .transpose()?,
                start_receiver: h.start_receiver.unwrap_or(true),
            });
        }
        let groups: Vec<&str> = hosts.iter().filter_map(|h| h.group.as_deref()).collect();
        let mut links = Vec::new();
        for l in &file.link {
            let [a, b] = &l.between;
            for g in [a, b] {
                if !groups.contains(&g.as_str()) {
                    return Err(PlanError::UnknownGroup {
                        a: a.clone(),
                        b: b.clone(),
                        group: g.clone(),
                    });
                }
            }
            links.push(Interlink {
                between: l.between.clone(),
                rate: rate(&format!("link {a}-{b}"), &l.rate)?,
            });
        }
        let host = |what: &str, name: &Option<String>, key: &'static str, vm: &str| {
            let name = name
                .as_deref()
                .ok_or(PlanError::Missing { vm: vm.into(), key })?;
            hosts
                .iter()
                .position(|h| h.name == name)
                .ok_or_else(|| PlanError::UnknownHost {
                    what: what.into(),
                    name: name.into(),
                })
        };
        let mut vms = Vec::new();
        let mut afters = Vec::new();
        for (k, spec) in file.vm.iter().enumerate() {
            let s = spec.or(&file.defaults);
            let base_name = s.name.clone().unwrap_or_else(|| format!("vm{}", k + 1));
            let count = s.count.unwrap_or(1);
            for c in 1..=count {
                let name = match count {
                    1 => base_name.clone(),
                    _ => format!("{base_name}-{c}"),
                };
                let what = format!("VM \"{name}\"");
                let (from, to) = (
                    host(&what, &s.from, "from", &name)?,
                    host(&what, &s.to, "to", &name)?,
                );
                if from == to {
                    return Err(PlanError::SameHost(name));
                }
                let mut migration = vm_config(&what, &s, base)?;
                // Each VM writes its own stream.
                migration.seed = base.seed.wrapping_add(vms.len() as u64);
                vms.push(Vm {
                    name,
                    from,
                    to,
                    migration,
                    after: Vec::new(),
                });
                afters.push(s.after.clone());
            }
        }
        for (i, after) in afters.iter().enumerate() {
            for a in after {
                let Some(j) = vms.iter().position(|v| &v.name == a) else {
                    return Err(PlanError::UnknownVm {
                        what: format!("VM \"{}\" (after)", vms[i].name),
                        name: a.clone(),
                    });
                };
                vms[i].after.push(j);
            }
        }
        let order = (0..vms.len()).collect();
        let plan = Plan {
            hosts,
            links,
            vms,
            order,
        };
        plan.check()?;
        Ok(plan)
    }

    /// `n` VMs alike (`base`) from host "src" to host "dst", each host's
    /// NIC at `link` bytes/s.
    pub fn simple(n: usize, link: f64, base: &SenderConfig) -> Result<Plan, PlanError> {
        let host = |name: &str| Host {
            name: name.into(),
            address: None,
            launcher: Vec::new(),
            nic: link,
            group: None,
            memory: None,
            start_receiver: true,
        };
        if link <= 0.0 {
            return Err(PlanError::ZeroRate {
                what: "--link".into(),
            });
        }
        let vms = (0..n)
            .map(|i| Vm {
                name: format!("vm{}", i + 1),
                from: 0,
                to: 1,
                migration: SenderConfig {
                    seed: base.seed.wrapping_add(i as u64),
                    ..base.clone()
                },
                after: Vec::new(),
            })
            .collect();
        let plan = Plan {
            hosts: vec![host("src"), host("dst")],
            links: Vec::new(),
            vms,
            order: (0..n).collect(),
        };
        plan.check()?;
        Ok(plan)
    }

    /// What every plan must hold before anything starts.
    fn check(&self) -> Result<(), PlanError> {
        if self.hosts.is_empty() {
            return Err(PlanError::NoHosts);
        }
        if self.vms.is_empty() {
            return Err(PlanError::Empty);
        }
        for (i, v) in self.vms.iter().enumerate() {
            if self.vms[..i].iter().any(|w| w.name == v.name) {
                return Err(PlanError::VmTwice(v.name.clone()));
            }
            self.path(v)?;
        }
        for (h, host) in self.hosts.iter().enumerate() {
            let need: u64 = self
                .vms
                .iter()
                .filter(|v| v.to == h)
                .map(|v| v.migration.memory_bytes)
                .sum();
            if let Some(memory) = host.memory.filter(|&m| need > m) {
                return Err(PlanError::TooBig {
                    host: host.name.clone(),
                    memory,
                    need,
                });
            }
        }
        self.check_cycles()
    }

    fn check_cycles(&self) -> Result<(), PlanError> {
        // 0 unseen, 1 on the current path, 2 done.
        fn visit(
            p: &Plan,
            i: usize,
            state: &mut [u8],
            path: &mut Vec<usize>,
        ) -> Result<(), PlanError> {
            match state[i] {
                2 => return Ok(()),
                1 => {
                    let from = path.iter().position(|&j| j == i).unwrap_or(0);
                    let names: Vec<&str> = path[from..]
                        .iter()
                        .chain(std::iter::once(&i))
                        .map(|&j| p.vms[j].name.as_str())
                        .collect();
                    return Err(PlanError::Cycle(names.join(" after ")));
                }
                _ => {}
            }
            state[i] = 1;
            path.push(i);
            for &j in &p.vms[i].after {
                visit(p, j, state, path)?;
            }
            path.pop();
            state[i] = 2;
            Ok(())
        }
        let mut state = vec![0u8; self.vms.len()];
        for i in 0..self.vms.len() {
            visit(self, i, &mut state, &mut Vec::new())?;
        }
        Ok(())
    }

    /// The links a VM's migration crosses, as indices into [`Plan::capacities`]:
    /// its source's NIC out, its destination's NIC in, and the interlink
    /// between their groups when they differ.
    pub fn path(&self, v: &Vm) -> Result<Vec<usize>, PlanError> {
        let n = self.hosts.len();
        let mut path = vec![2 * v.from, 2 * v.to + 1];
        let (a, b) = (&self.hosts[v.from].group, &self.hosts[v.to].group);
        if let (Some(a), Some(b)) = (a, b) {
            if a != b {
                let k = self
                    .links
                    .iter()
                    .position(|l| {
                        l.between == [a.clone(), b.clone()] || l.between == [b.clone(), a.clone()]
                    })
                    .ok_or_else(|| PlanError::NoLink {
                        vm: v.name.clone(),
                        a: a.clone(),
                        b: b.clone(),
                    })?;
                // Each direction of an interlink is its own.
                let forward = self.links[k].between[0] == *a;
                path.push(2 * n + 2 * k + usize::from(!forward));
            }
        }
        Ok(path)
    }

    /// Every link's capacity, bytes/s: NICs out and in, then interlinks
    /// each way.
    pub fn capacities(&self) -> Vec<f64> {
        let nics = self.hosts.iter().flat_map(|h| [h.nic, h.nic]);
        let inter = self.links.iter().flat_map(|l| [l.rate, l.rate]);
        nics.chain(inter).collect()
    }

    /// Each link's name, as [`Plan::capacities`] orders them.
    pub fn link_names(&self) -> Vec<String> {
        let nics = self
            .hosts
            .iter()
            .flat_map(|h| [format!("{} out", h.name), format!("{} in", h.name)]);
        let inter = self.links.iter().flat_map(|l| {
            let [a, b] = &l.between;
            [format!("{a}->{b}"), format!("{b}->{a}")]
        });
        nics.chain(inter).collect()
    }

    /// VM indices by name.
    pub fn names(&self) -> HashMap<&str, usize> {
        self.vms
            .iter()
            .enumerate()
            .map(|(i, v)| (v.name.as_str(), i))
            .collect()
    }
}

/// A VM's migration settings: the spec's, else `base`'s.
fn vm_config(what: &str, s: &VmSpec, base: &SenderConfig) -> Result<SenderConfig, PlanError> {
    let mut c = base.clone();
    if let Some(m) = &s.mem {
        c.memory_bytes = parse::<Size>(what, "mem", m)?.0;
    }
    if let Some(w) = &s.workload {
        c.workload = parse::<Workload>(what, "workload", w)?;
    }
    if let Some(v) = s.vcpus {
        c.vcpus = v;
    }
    if let Some(p) = &s.policy {
        c.policy = parse::<Policy>(what, "policy", p)?;
    }
    if let Some(b) = &s.bandwidth {
        c.bandwidth = parse::<Bandwidth>(what, "bandwidth", b)?;
    }
    if let Some(d) = &s.downtime_limit {
        c.downtime_limit = parse::<Span>(what, "downtime_limit", d)?.0;
    }
    if let Some(d) = &s.max_time {
        c.max_time = parse::<Span>(what, "max_time", d)?.0;
    }
    crate::guest::process::check_config(
        &c.workload,
        c.memory_bytes,
        crate::util::page::PageSize::host(),
        c.vcpus,
    )
    .map_err(|e| PlanError::Value {
        what: what.into(),
        key: "workload",
        value: c.workload.to_string(),
        source: Box::new(e),
    })?;
    Ok(c)
}

/// A TOML error on one line, with where it is.
fn one_line(e: &toml::de::Error) -> String {
    let msg = e.message().trim().replace('\n', " ");
    match e.span() {
        Some(span) => format!("plan file: {msg} (at byte {})", span.start),
        None => format!("plan file: {msg}"),
    }
}
