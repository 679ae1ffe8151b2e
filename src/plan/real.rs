//! A plan run for real: every VM a guest process on its source host, every
//! migration a `livemig send` there to a `livemig receive --serve` on its
//! destination host, over whatever network joins them (on one machine,
//! the namespaces of `scripts/testbed.sh`, whose shaped links they share).
//!
//! A host's commands run through its launcher (`ip netns exec NAME`, `ssh
//! HOST`): the tools testbeds already use, no daemon of our own. Every
//! launcher is tried before anything starts. Then each destination's
//! receiver starts, then every VM's guest (its sender started with
//! `--start-on-stdin`), so all guests run before the first migration as
//! they would on servers being emptied; the plan's clock starts when all
//! are ready, and the strategy ([`Scheduler`]) tells each sender when to
//! go. A migration that fails ends alone: the strategy counts it as ended
//! and the others go on.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Instant;

use serde::Deserialize;

use crate::plan::fabric::Starter;
use crate::plan::report::{PlanReport, VmReport};
use crate::plan::strategy::{Scheduler, Strategy};
use crate::plan::{Host, Plan, Vm};
use crate::report::{Report, RoundReport, Status};
use crate::util::units::{Size, Span};

/// What `livemig send --start-on-stdin` prints on stderr once its guest
/// runs and it waits for the word to migrate.
pub const READY: &str = "livemig: guest running, waiting for a line on stdin to migrate";

/// What `livemig receive` prints on stderr once it listens (then its address).
const LISTENING: &str = "waiting for a migration on ";

/// How a real plan runs.
#[derive(Clone, Debug)]
pub struct RealConfig {
    /// The livemig binary, at the same path on every host.
    pub exe: PathBuf,
    /// Where each sender's JSON report and each receiver's log go.
    pub dir: PathBuf,
}

/// A real plan that could not start.
#[derive(Debug, thiserror::Error)]
pub enum RealError {
    #[error("host \"{host}\": its launcher \"{launcher}\" cannot run {exe}: {why}")]
    Launcher {
        host: String,
        launcher: String,
        exe: String,
        why: String,
    },
    #[error("host \"{host}\": its receiver did not start: {why}")]
    Receiver { host: String, why: String },
    #[error("host \"{0}\": start_receiver = false needs an address with the receiver's port")]
    NoPort(String),
    #[error("starting {what}")]
    Spawn {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// `exe ARGS` run on `host` through its launcher.
fn on(host: &Host, exe: &Path, args: &[String]) -> Command {
    let mut c = match host.launcher.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(exe);
            c
        }
        None => Command::new(exe),
    };
    c.args(args).stdin(Stdio::null());
    c
}

/// The first line of a failed command's stderr, or its status.
fn why(out: &std::process::Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr);
    match err.lines().map(str::trim).find(|l| !l.is_empty()) {
        Some(line) => line.to_string(),
        None => format!("it ended with {}", out.status),
    }
}

/// Every host the plan uses runs `livemig --version` through its launcher.
pub fn check_launchers(plan: &Plan, exe: &Path) -> Result<(), RealError> {
    for (h, host) in plan.hosts.iter().enumerate() {
        if !plan.vms.iter().any(|v| v.from == h || v.to == h) {
            continue;
        }
        let fail = |why: String| RealError::Launcher {
            host: host.name.clone(),
            launcher: host.launcher.join(" "),
            exe: exe.display().to_string(),
            why,
        };
        let out = on(host, exe, &["--version".into()])
            .output()
            .map_err(|e| fail(e.to_string()))?;
        if !out.status.success() {
            return Err(fail(why(&out)));
        }
        if host.start_receiver || plan.vms.iter().all(|v| v.to != h) {
            continue;
        }
        if !host.address.as_deref().is_some_and(has_port) {
            return Err(RealError::NoPort(host.name.clone()));
        }
    }
    Ok(())
}

/// `addr` ends in a port (`10.0.0.1:7000`, `[::1]:7000`, `b1:7000`).
fn has_port(addr: &str) -> bool {
    addr.rsplit_once(':')
        .is_some_and(|(h, p)| p.parse::<u16>().is_ok() && (!h.contains(':') || h.ends_with(']')))
}

/// A receiver started on a host, and where it listens.
struct Receiver {
    child: Child,
    addr: String,
}

fn start_receiver(host: &Host, cfg: &RealConfig) -> Result<Receiver, RealError> {
    let listen = match host.address.as_deref() {
        Some(a) if has_port(a) => a.to_string(),
        Some(a) => format!("{a}:0"),
        None => "127.0.0.1:0".into(),
    };
    let log = cfg.dir.join(format!("receive-{}.jsonl", host.name));
    let args: Vec<String> = [
        "receive",
        "--serve",
        "--insecure",
        "--listen",
        &listen,
        "--json",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([log.display().to_string()])
    .collect();
    let mut child = on(host, &cfg.exe, &args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| RealError::Spawn {
            what: format!("the receiver on host \"{}\"", host.name),
            source,
        })?;
    let mut err = BufReader::new(child.stderr.take().expect("stderr is piped"));
    let mut last = String::new();
    loop {
        let mut line = String::new();
        match err.read_line(&mut line) {
            Ok(0) | Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(RealError::Receiver {
                    host: host.name.clone(),
                    why: match last.trim() {
                        "" => "it ended without a word".into(),
                        l => l.to_string(),
                    },
                });
            }
            Ok(_) => {}
        }
        if let Some((_, addr)) = line.trim().split_once(LISTENING) {
            let addr = addr.to_string();
            // The rest of its stderr goes to a log (a pipe left unread
            // would stall it).
            let path = cfg.dir.join(format!("receive-{}.log", host.name));
            std::thread::spawn(move || {
                if let Ok(mut f) = std::fs::File::create(path) {
                    let _ = std::io::copy(&mut err, &mut f);
                }
            });
            return Ok(Receiver { child, addr });
        }
        last = line;
    }
}

/// What a sender's stderr tells the plan.
enum Event {
    Ready,
    /// It ended; the last lines it wrote.
    Ended(usize, String),
}

/// Send VM `i`'s flags: what its settings say (flags the plan does not
/// carry, like compression, are refused before a plan runs).
fn send_args(vm: &Vm, to: &str, json: &Path) -> Vec<String> {
    let m = &vm.migration;
    let span = |d: std::time::Duration| Span(d).to_string();
    let mut a: Vec<String> = vec![
        "send".into(),
        "--start-on-stdin".into(),
        "--insecure".into(),
        "--quiet".into(),
        "--to".into(),
        to.into(),
        "--json".into(),
        json.display().to_string(),
        "--mem".into(),
        Size(m.memory_bytes).to_string(),
        "--workload".into(),
        m.workload.to_string(),
        "--vcpus".into(),
        m.vcpus.to_string(),
        "--tracker".into(),
        m.tracker.to_string(),
        "--policy".into(),
        m.policy.to_string(),
        "--bandwidth".into(),
        m.bandwidth.to_string(),
        "--downtime-limit".into(),
        span(m.downtime_limit),
        "--max-time".into(),
        span(m.max_time),
        "--warmup".into(),
        span(m.warmup),
        "--seed".into(),
        m.seed.to_string(),
        "--streams".into(),
        m.streams.to_string(),
        "--mode".into(),
        m.mode.to_string(),
    ];
    if !m.reduction.zero_pages {
        a.push("--no-zero-pages".into());
    }
    a
}

/// A VM's sender while the plan runs.
struct Sender {
    child: Child,
    stdin: Option<ChildStdin>,
    json: PathBuf,
    go: Option<Instant>,
    ended: Option<(Instant, String)>,
}

/// Run `plan` for real under `strategy` (not `auto`: resolve it first).
/// Fails before anything starts when a launcher or a receiver does; a
/// migration's own failure is in its VM's report.
pub fn run(plan: &Plan, strategy: Strategy, cfg: &RealConfig) -> Result<PlanReport, RealError> {
    check_launchers(plan, &cfg.exe)?;
    let mut receivers: Vec<Option<Receiver>> = Vec::new();
    let stop = |receivers: &mut Vec<Option<Receiver>>| {
        for r in receivers.iter_mut().flatten() {
            // SIGINT: it ends its service once its migrations have.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(i32::try_from(r.child.id()).unwrap_or(0)),
                nix::sys::signal::Signal::SIGINT,
            );
            let _ = r.child.wait();
        }
    };
    for (h, host) in plan.hosts.iter().enumerate() {
        let wanted = host.start_receiver && plan.vms.iter().any(|v| v.to == h);
        match wanted.then(|| start_receiver(host, cfg)).transpose() {
            Ok(r) => receivers.push(r),
            Err(e) => {
                stop(&mut receivers);
                return Err(e);
            }
        }
    }
    let result = run_senders(plan, strategy, cfg, &receivers);
    stop(&mut receivers);
    result
}

fn run_senders(
    plan: &Plan,
    strategy: Strategy,
    cfg: &RealConfig,
    receivers: &[Option<Receiver>],
) -> Result<PlanReport, RealError> {
    let n = plan.vms.len();
    let (tx, rx) = crossbeam_channel::unbounded();
    let mut senders = Vec::new();
    for (i, vm) in plan.vms.iter().enumerate() {
        let to = match &receivers[vm.to] {
            Some(r) => r.addr.clone(),
            None => plan.hosts[vm.to].address.clone().unwrap_or_default(),
        };
        let json = cfg.dir.join(format!("vm-{}.json", vm.name));
        let _ = std::fs::remove_file(&json);
        let mut child = on(&plan.hosts[vm.from], &cfg.exe, &send_args(vm, &to, &json))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| RealError::Spawn {
                what: format!("the sender of VM \"{}\"", vm.name),
                source,
            })?;
        let err = BufReader::new(child.stderr.take().expect("stderr is piped"));
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut tail: VecDeque<String> = VecDeque::new();
            for line in err.lines().map_while(Result::ok) {
                if line == READY {
                    let _ = tx.send(Event::Ready);
                    continue;
                }
                if tail.len() == 3 {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
            let _ = tx.send(Event::Ended(i, Vec::from(tail).join("; ")));
        });
        senders.push(Sender {
            stdin: child.stdin.take(),
            child,
            json,
            go: None,
            ended: None,
        });
    }
    drop(tx);
    // Every guest runs (or its sender has given up) before the clock starts.
    let mut ready = 0;
    while ready < n {
        match rx.recv() {
            Ok(Event::Ready) => ready += 1,
            Ok(Event::Ended(i, tail)) => {
                senders[i].ended = Some((Instant::now(), tail));
                ready += 1;
            }
            Err(_) => break,
        }
    }
    let t0 = Instant::now();
    let mut scheduler = Scheduler::new(
        strategy,
        plan.order.clone(),
        plan.vms.iter().map(|v| v.from).collect(),
        plan.vms.iter().map(|v| v.after.clone()).collect(),
    );
    let mut due: VecDeque<usize> = scheduler.start().into();
    let mut finished = 0;
    while finished < n {
        if let Some(i) = due.pop_front() {
            let s = &mut senders[i];
            s.go = Some(Instant::now());
            match s.ended.is_some() {
                // Ended before its turn: it counts as ended now.
                true => {
                    finished += 1;
                    due.extend(scheduler.finished(i));
                }
                false => {
                    if let Some(mut stdin) = s.stdin.take() {
                        // A sender that died meanwhile says so on stderr.
                        let _ = stdin.write_all(b"go\n");
                    }
                }
            }
            continue;
        }
        match rx.recv() {
            Ok(Event::Ended(i, tail)) => {
                senders[i].ended = Some((Instant::now(), tail));
                if senders[i].go.is_some() {
                    finished += 1;
                    due.extend(scheduler.finished(i));
                }
            }
            Ok(Event::Ready) => {}
            Err(_) => break,
        }
    }
    let mut vms = Vec::new();
    for (s, vm) in senders.iter_mut().zip(&plan.vms) {
        s.stdin = None;
        let status = s.child.wait().ok();
        let (end, tail) = s.ended.clone().unwrap_or((Instant::now(), String::new()));
        let go = s.go.unwrap_or(end);
        let mut report = read_report(&s.json, vm.migration.report());
        if report.status != Status::Completed && report.error.is_none() {
            report.error = Some(match tail.is_empty() {
                true => format!("the sender ended with {status:?} and no report"),
                false => tail,
            });
        }
        let (go_s, end_s) = (
            go.duration_since(t0).as_secs_f64(),
            end.duration_since(t0).as_secs_f64(),
        );
        // The migration itself: from the sender's start (after its warm-up
        // and connect) to its verified end, within go..exit.
        let total = report.total_time_ms / 1e3;
        let start = match total > 0.0 && total <= end_s - go_s {
            true => end_s - total,
            false => go_s,
        };
        vms.push(VmReport::new(vm, plan, start, end_s, report));
    }
    let mut carried = vec![0.0; plan.capacities().len()];
    for (v, r) in plan.vms.iter().zip(&vms) {
        for l in plan.path(v).expect("checked when the plan was made") {
            // u64 -> f64: a byte count.
            carried[l] += r.report.transferred_bytes as f64;
        }
    }
    Ok(PlanReport::new(
        strategy.to_string(),
        false,
        vms,
        plan,
        &carried,
    ))
}

/// The parts of a sender's JSON report a plan uses.
#[derive(Deserialize, Default)]
#[serde(default)]
struct Sent {
    status: String,
    error: Option<String>,
    stop_reason: Option<String>,
    converged: Option<bool>,
    tracker: String,
    total_time_ms: f64,
    setup_time_ms: f64,
    downtime_ms: Option<f64>,
    migration_time_ms: Option<f64>,
    transferred_bytes: u64,
    transferred_pages: u64,
    streams: u32,
    transport: String,
    dirty_sync_count: u64,
    verified_pages: u64,
    mismatched_pages: u64,
    guest_dirty_rate_pps: f64,
    guest_target_rate_pps: Option<f64>,
    guest_rate_precopy_pps: Option<f64>,
    source_guest_pid: Option<i32>,
    source_guest_kept_running: bool,
    rounds: Vec<SentRound>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct SentRound {
    round: u32,
    pages: u64,
    bytes: u64,
    duration_ms: f64,
    throughput_mbps: f64,
    dirty_rate_pps: f64,
    dirty_pages: u64,
    end_ms: f64,
    stop_and_copy: bool,
    guest_rate_pps: Option<f64>,
}

/// A sender's report read back onto `base` (the VM's settings); `base`
/// as failed when there is none.
fn read_report(path: &Path, base: Report) -> Report {
    let Some(s) = std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice::<Sent>(&b).ok())
    else {
        return base;
    };
    Report {
        status: match s.status.as_str() {
            "completed" => Status::Completed,
            "cancelled" => Status::Cancelled,
            _ => Status::Failed,
        },
        error: s.error,
        stop_reason: s.stop_reason,
        converged: s.converged,
        tracker: s.tracker,
        total_time_ms: s.total_time_ms,
        setup_time_ms: s.setup_time_ms,
        downtime_ms: s.downtime_ms,
        migration_time_ms: s.migration_time_ms,
        transferred_bytes: s.transferred_bytes,
        transferred_pages: s.transferred_pages,
        streams: s.streams,
        transport: s.transport,
        dirty_sync_count: s.dirty_sync_count,
        verified_pages: s.verified_pages,
        mismatched_pages: s.mismatched_pages,
        guest_dirty_rate_pps: s.guest_dirty_rate_pps,
        guest_target_rate_pps: s.guest_target_rate_pps,
        guest_rate_precopy_pps: s.guest_rate_precopy_pps,
        source_guest_pid: s.source_guest_pid,
        source_guest_kept_running: s.source_guest_kept_running,
        rounds: s
            .rounds
            .into_iter()
            .map(|r| RoundReport {
                round: r.round,
                pages: r.pages,
                bytes: r.bytes,
                duration_ms: r.duration_ms,
                throughput_mbps: r.throughput_mbps,
                dirty_rate_pps: r.dirty_rate_pps,
                dirty_pages: r.dirty_pages,
                end_ms: r.end_ms,
                stop_and_copy: r.stop_and_copy,
                guest_rate_pps: r.guest_rate_pps,
                ..RoundReport::default()
            })
            .collect(),
        ..base
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_told_from_hosts() {
        assert!(has_port("10.0.0.1:7000"));
        assert!(has_port("b1:7000"));
        assert!(has_port("[::1]:7000"));
        assert!(!has_port("10.0.0.1"));
        assert!(!has_port("::1"));
        assert!(!has_port("b1:port"));
    }

    #[test]
    fn a_missing_report_leaves_the_vm_failed() {
        let r = read_report(Path::new("/nonexistent/vm.json"), Report::default());
        assert_eq!(r.status, Status::Failed);
    }
}
