//! Cancelling a migration by SIGINT or SIGTERM: the source guest resumes
//! before the switch-over, the destination keeps the guest after a
//! post-copy one, the receiver is told, the report says `cancelled`, and a
//! second signal ends the process at once. Exit codes as the README says:
//! 130 after SIGINT, 143 after SIGTERM, 3 on a receiver whose sender was
//! cancelled.

mod common;
use common::*;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Guest memory of the paced runs.
const MEM: &str = "16M";
/// Its rate limit: 1 MB/s, 244 pages a second.
const LIMIT: &str = "8mbit";
const LIMIT_BYTES_PER_S: f64 = 1e6;

/// A guest that starts all zero and writes 2000 pages a second: round 0
/// sends the few pages written in the warm-up (the rest are zero-page
/// markers), round 1 the far more written meanwhile (2000 a second against
/// 244 sent), so at this limit round 1 is certainly long.
const PACED: &[&str] = &[
    "--mem",
    MEM,
    "--warmup",
    "100ms",
    "--workload",
    "uniform:rate=2k,zero=1",
    "--bandwidth",
    LIMIT,
    "--policy",
    "fixed:100",
    "--tracker",
    "bitmap",
];

/// `migrate` of the paced guest, its report to `json`, stdout and stderr piped.
fn paced_migrate(json: &Path) -> Child {
    livemig()
        .arg("migrate")
        .args(PACED)
        .arg("--json")
        .arg(json)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn signal(child: &Child, sig: Signal) {
    kill(Pid::from_raw(child.id() as i32), sig).unwrap();
}

/// Read `child`'s stdout until the row of round 0 is printed: the
/// migration is then in round 1.
fn wait_for_round_1(child: &mut Child) -> impl BufRead {
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "no round 0 row");
        if line.split_whitespace().next() == Some("0") {
            return out;
        }
    }
}

fn load(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// The round the cancel cut short began after round 0's row: it must
/// certainly outlast the signal's way there, or this test proves nothing.
fn assert_round_1_is_long(rep: &serde_json::Value) {
    let r0 = &rep["rounds"][0];
    let dirty = r0["dirty_rate_pps"].as_f64().unwrap() * r0["duration_ms"].as_f64().unwrap() / 1e3;
    // What round 1 must send takes at least this long at the limit.
    let secs = dirty * rep["page_size"].as_f64().unwrap() / LIMIT_BYTES_PER_S;
    assert!(secs >= 1.0, "round 1 would take only {secs} s: {rep:#}");
}

#[test]
fn sigint_during_precopy_cancels_resumes_the_source_and_reports_the_rounds() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let mut child = paced_migrate(&json);
    let _rest = wait_for_round_1(&mut child);
    signal(&child, Signal::SIGINT);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    let rep = load(&json);
    assert_eq!(rep["status"], "cancelled", "{rep:#}");
    assert_eq!(rep["destination_status"], "cancelled", "{rep:#}");
    // Round 0 is kept; round 1 was cut short inside, not waited out.
    assert_round_1_is_long(&rep);
    let rounds = rep["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 1, "{rep:#}");
    let error = rep["error"].as_str().unwrap();
    assert!(
        error.contains("cancelled by SIGINT during pre-copy round 1"),
        "{error}"
    );
    // Resumed, and seen writing again, before the command ended.
    assert_eq!(rep["source_guest_kept_running"], true, "{rep:#}");
    assert!(rep["downtime_ms"].is_null(), "never paused for good");
    // One line says what happened.
    let errors: Vec<_> = stderr.lines().filter(|l| l.starts_with("Error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(
        errors[0].contains("the source guest was resumed"),
        "{stderr}"
    );
    assert_gone(&rep["source_guest_pid"]);
}

#[test]
fn sigterm_to_send_tells_the_receiver_which_reports_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    let (rx_json, tx_json) = (dir.path().join("rx.json"), dir.path().join("tx.json"));
    let (rx, addr) = receiver(&["--json".as_ref(), rx_json.as_os_str()], &[]);
    let mut tx = livemig()
        .args(["send", "--to", &addr, "--streams", "2"])
        .args(PACED)
        .arg("--json")
        .arg(&tx_json)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _rest = wait_for_round_1(&mut tx);
    signal(&tx, Signal::SIGTERM);
    let tx_out = tx.wait_with_output().unwrap();
    let rx_out = rx.wait_with_output().unwrap();
    assert_eq!(
        tx_out.status.code(),
        Some(143),
        "{}",
        String::from_utf8_lossy(&tx_out.stderr)
    );
    let sent = load(&tx_json);
    assert_eq!(sent["status"], "cancelled", "{sent:#}");
    assert_eq!(sent["source_guest_kept_running"], true, "{sent:#}");
    assert_round_1_is_long(&sent);
    // The receiver heard why, from the sender, and says so.
    let rx_err = String::from_utf8_lossy(&rx_out.stderr);
    assert_eq!(rx_out.status.code(), Some(3), "{rx_err}");
    let got = load(&rx_json);
    assert_eq!(got["status"], "cancelled", "{got:#}");
    let error = got["error"].as_str().unwrap();
    assert!(
        error.contains("cancelled by the sender (SIGTERM during pre-copy round 1)"),
        "{error}"
    );
    assert_eq!(got["round_pages"].as_array().unwrap().len(), 1, "{got:#}");
    assert_gone(&sent["source_guest_pid"]);
}

/// A paced post-copy migration whose destination guest certainly runs:
/// the child and its destination guest's pid. The source tracks with the
/// bitmap, so the only userfaultfd is the destination guest's, registered
/// once its device state is in: the sender then waits for `Resumed` and
/// cannot take the guest back.
fn postcopy_after_switchover(json: &Path) -> (Child, i32) {
    let child = livemig()
        .args(["migrate", "--mode", "postcopy", "--mem", "2M"])
        .args(["--warmup", "100ms", "--workload", "idle", "--tracker"])
        .args(["bitmap", "--bandwidth", "4mbit", "--quiet", "--json"])
        .arg(json)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let dest = wait_until("the destination guest's userfaultfd", || {
        guests(child.id()).into_iter().find(|pid| {
            let fds = std::fs::read_dir(format!("/proc/{pid}/fd"));
            fds.into_iter().flatten().flatten().any(|fd| {
                std::fs::read_link(fd.path())
                    .is_ok_and(|l| l.to_string_lossy().contains("userfaultfd"))
            })
        })
    });
    (child, dest)
}

/// The child processes of `pid` (its guests).
fn guests(pid: u32) -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return vec![];
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|k| {
            k.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Dead: gone, or a zombie its new parent has yet to reap.
fn dead(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| {
        s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

#[test]
fn sigint_after_a_postcopy_switchover_leaves_the_guest_at_the_destination() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let (child, dest) = postcopy_after_switchover(&json);
    signal(&child, Signal::SIGINT);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    let rep = load(&json);
    assert_eq!(rep["status"], "cancelled", "{rep:#}");
    // The push went on to its acknowledged end (every page at the
    // destination) before the cancel took effect; verification did not run.
    let rounds = rep["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 1, "{rep:#}");
    assert_eq!(rounds[0]["postcopy"], true, "{rep:#}");
    assert!(!rep["migration_time_ms"].is_null(), "{rep:#}");
    assert_eq!(rep["verified_pages"], 0, "{rep:#}");
    assert_eq!(rep["source_guest_kept_running"], false, "{rep:#}");
    assert_eq!(rep["destination_status"], "cancelled", "{rep:#}");
    let error = rep["error"].as_str().unwrap();
    assert!(error.contains("the destination runs the guest"), "{error}");
    assert_gone(&rep["source_guest_pid"]);
    assert_gone(&dest.into());
}

#[test]
fn a_second_sigint_ends_the_process_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    // During the post-copy push the first SIGINT only asks: the push goes on.
    let (mut child, dest) = postcopy_after_switchover(&json);
    let guests_before = guests(child.id());
    assert_eq!(guests_before.len(), 2, "source and destination guests");
    signal(&child, Signal::SIGINT);
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("cancelling") {
        line.clear();
        assert!(err.read_line(&mut line).unwrap() > 0, "no cancel notice");
    }
    signal(&child, Signal::SIGINT);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    line.clear();
    err.read_line(&mut line).unwrap();
    assert!(line.contains("SIGINT again: exiting at once"), "{line}");
    assert!(!json.exists(), "no report: it did not finish");
    // Its guests die with it.
    for pid in guests_before {
        wait_until(&format!("guest {pid} to die"), || dead(pid).then_some(()));
    }
    assert!(dead(dest));
}

/// With its stderr a closed pipe, SIGINT still cancels: writing the
/// signal's line fails, and neither that nor the error line may stop the
/// cancel (eprintln! panics there, which once left a receiver that no
/// signal could end).
#[test]
fn sigint_cancels_with_stderr_closed() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let mut child = paced_migrate(&json);
    drop(child.stderr.take());
    let _rest = wait_for_round_1(&mut child);
    signal(&child, Signal::SIGINT);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    let rep = load(&json);
    assert_eq!(rep["status"], "cancelled", "{rep:#}");
    assert_gone(&rep["source_guest_pid"]);
}
