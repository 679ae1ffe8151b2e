//! Post-copy, hybrid and cold migrations over loopback, every page verified;
//! and what post-copy does when the source dies after the switch.

mod common;
use common::*;

use std::process::Stdio;
use std::time::{Duration, Instant};

fn u(rep: &serde_json::Value, key: &str) -> u64 {
    rep[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing: {rep:#}"))
}

fn rounds(rep: &serde_json::Value) -> &Vec<serde_json::Value> {
    rep["rounds"].as_array().unwrap()
}

#[test]
fn postcopy_resumes_at_once_and_fetches_what_the_guest_touches() {
    // The push is paced (1.3 s for 16 MiB at 100 Mbit/s; demand pages are
    // not held back by the limit), so the guest meets missing pages however
    // late its vCPU gets to run, rather than only if it runs before an
    // unlimited push of a few ms is over.
    let r = migrate(&[
        "--mode",
        "postcopy",
        "--workload",
        "uniform:rate=max",
        "--bandwidth",
        "100mbit",
    ]);
    let rep = assert_verified(&r);
    assert_eq!(rep["mode"], "postcopy");
    // No pre-copy round, no stop-and-copy: one post-copy push.
    let rs = rounds(rep);
    assert_eq!(rs.len(), 1, "{rep:#}");
    assert_eq!(rs[0]["postcopy"], true);
    // Every page was placed exactly once, by one path or the other (both
    // may race; the destination counts the one that placed it).
    let (pulled, pushed) = (u(rep, "pages_pulled"), u(rep, "pages_pushed"));
    assert_eq!(pulled + pushed, 4096, "{rep:#}");
    // A guest writing flat out faults at once and waits for its pages: the
    // faults that waited are some of the faults taken.
    assert!(u(rep, "postcopy_requests") > 0, "{rep:#}");
    let waited = u(&rep["fault_latency_us"], "count");
    assert!(waited > 0 && waited <= u(rep, "postcopy_faults"), "{rep:#}");
    assert!(rep["postcopy_populated_ms"].as_f64().unwrap() > 0.0);
    assert!(rep["guest_rate_postcopy_pps"].as_f64().unwrap() > 0.0);
    // The guest ran at the destination long before its memory was all there.
    let downtime = rep["downtime_ms"].as_f64().unwrap();
    assert!(
        downtime < rep["migration_time_ms"].as_f64().unwrap(),
        "{rep:#}"
    );
    assert!(rep["guest_rate_precopy_pps"].is_null());
}

#[test]
fn prepaging_fetches_more_pages_per_request() {
    let pulled_per_request = |extra: &[&str]| {
        let mut args = vec![
            "--mode",
            "postcopy",
            "--workload",
            "sweep:from=0,to=16M,rate=max",
            "--bandwidth",
            "50mbit",
        ];
        args.extend_from_slice(extra);
        let r = migrate(&args);
        let rep = assert_verified(&r);
        u(rep, "pages_pulled") as f64 / u(rep, "postcopy_requests").max(1) as f64
    };
    // A sweep faults page after page; pushing at 50 Mbit/s leaves it to
    // requests. Without pre-paging a request asks for its page alone, and
    // one whose page the push sent meanwhile pulls none.
    let one = pulled_per_request(&[]);
    assert!((0.9..1.1).contains(&one), "{one} pages per request");
    let many = pulled_per_request(&["--prepage", "15"]);
    assert!(many > 4.0, "{many} pages per request with --prepage 15");
}

#[test]
fn hybrid_runs_its_precopy_rounds_then_switches() {
    let r = migrate(&[
        "--mode",
        "hybrid:rounds=2",
        "--workload",
        "hotset:wws=2M,rate=20k",
    ]);
    let rep = assert_verified(&r);
    assert_eq!(rep["mode"], "hybrid");
    let rs = rounds(rep);
    assert_eq!(rs.len(), 3, "{rep:#}");
    assert_eq!(rs[0]["pages"], 4096);
    assert_eq!(
        (rs[1]["postcopy"].as_bool(), rs[2]["postcopy"].as_bool()),
        (Some(false), Some(true))
    );
    // Only what the last round left dirty goes after the switch.
    assert!(u(&rs[2], "pages") < 1024, "{rep:#}");
}

#[test]
fn hybrid_leaves_no_page_that_can_fault_after_the_switch() {
    // Zero pages go as markers and, without preallocation, would stay
    // unallocated; once post-copy is over nobody would serve their fault.
    let r = migrate(&[
        "--mode",
        "hybrid:rounds=1",
        "--workload",
        "uniform:rate=20k,zero=1",
        "--no-prealloc",
    ]);
    let rep = assert_verified(&r);
    let rate = rep["destination_guest_rate_pps"].as_f64().unwrap();
    assert!(
        rate > 10_000.0,
        "destination guest writes {rate} pages/s: {rep:#}"
    );
}

/// With `--streams 2` the pre-copy rounds travel on both data connections
/// and post-copy runs on the control and request connections: every page
/// arrives once, by one path, and is verified.
#[test]
fn hybrid_and_postcopy_over_two_streams_verify_every_page() {
    // Paced, so each data connection takes runs while the other waits on
    // the limiter, whatever this machine's speed.
    let r = migrate(&[
        "--mode",
        "hybrid:rounds=2",
        "--streams",
        "2",
        "--workload",
        "hotset:wws=2M,rate=20k",
        "--bandwidth",
        "200mbit",
    ]);
    let rep = assert_verified(&r);
    let rs = rounds(rep);
    assert_eq!(rs.len(), 3, "{rep:#}");
    assert_eq!(rs[2]["postcopy"], true, "{rep:#}");
    // Both ends counted each connection's pages of the pre-copy rounds:
    // they agree, both connections carried some, and they add up.
    let sent: Vec<u64> = serde_json::from_value(rep["stream_pages"].clone()).unwrap();
    let got: Vec<u64> = serde_json::from_value(rep["destination_stream_pages"].clone()).unwrap();
    assert_eq!(sent, got, "{rep:#}");
    assert!(sent.len() == 2 && sent.iter().all(|&p| p > 0), "{sent:?}");
    let precopy: u64 = rs[..2].iter().map(|r| u(r, "pages")).sum();
    assert_eq!(sent.iter().sum::<u64>(), precopy, "{rep:#}");
    // What the last round left went after the switch, each page placed once.
    assert!(
        u(rep, "pages_pulled") + u(rep, "pages_pushed") > 0,
        "{rep:#}"
    );

    let r = migrate(&[
        "--mode",
        "postcopy",
        "--streams",
        "2",
        "--workload",
        "uniform:rate=max",
        "--bandwidth",
        "100mbit",
    ]);
    let rep = assert_verified(&r);
    assert_eq!(rep["streams"], 2);
    let (pulled, pushed) = (u(rep, "pages_pulled"), u(rep, "pages_pushed"));
    assert_eq!(pulled + pushed, 4096, "{rep:#}");
    assert!(u(rep, "postcopy_requests") > 0, "{rep:#}");
}

#[test]
fn cold_copies_everything_with_the_guest_stopped() {
    let r = migrate(&["--mode", "cold", "--workload", "hotset:wws=2M,rate=20k"]);
    let rep = assert_verified(&r);
    assert_eq!(rep["mode"], "cold");
    let rs = rounds(rep);
    assert_eq!(rs.len(), 1, "{rep:#}");
    assert_eq!(
        (rs[0]["stop_and_copy"].as_bool(), u(&rs[0], "pages")),
        (Some(true), 4096)
    );
    // Every page is copied inside the downtime (a share of the total time
    // would depend on how long set-up takes on this machine), and there was
    // no pre-copy phase for the guest to run in.
    let down = rep["downtime_ms"].as_f64().unwrap();
    let copy = rs[0]["duration_ms"].as_f64().unwrap();
    assert!(
        copy > 0.0 && down >= copy,
        "downtime {down} ms, copy {copy} ms"
    );
    assert!(rep["guest_rate_precopy_pps"].is_null(), "{rep:#}");
}

#[test]
fn modes_are_checked() {
    for (mode, needle) in [
        ("warp", "unknown mode"),
        ("hybrid:rounds=0", "rounds must be"),
        ("hybrid:rounds=x", "rounds must be"),
    ] {
        migrate(&["--mode", mode]).assert_fails_with(&["--mode", needle]);
    }
}

/// The source vanishes while the destination runs in post-copy: the
/// destination says so with the pages it lacks, exits 1, and leaves no
/// guest behind waiting on a fault.
#[test]
fn postcopy_destination_fails_cleanly_when_the_source_dies() {
    let dir = tempfile::tempdir().unwrap();
    let rx_json = dir.path().join("rx.json");
    let (rx, addr) = receiver(&["--json".as_ref(), rx_json.as_os_str()], &[]);
    // 16 MiB pushed at 20 Mbit/s: about 7 s of post-copy to die in.
    let mut tx = livemig()
        .args([
            "send", "--to", &addr, "--quiet", "--mem", "16M", "--warmup", "100ms",
        ])
        .args(["--mode", "postcopy", "--bandwidth", "20mbit"])
        .args(["--workload", "hotset:wws=1M,rate=10k"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill the source once the destination guest runs: post-copy has
    // begun, and its push has seconds left whatever this machine's speed.
    let guest = wait_until("the destination guest", || {
        livemig::guest::find::find(child_of(rx.id())?).ok()
    });
    assert!(
        guest.control.wait_running(1, Duration::from_secs(60)),
        "the destination guest never ran"
    );
    tx.kill().unwrap();
    let _ = tx.wait();
    let t = Instant::now();
    let out = rx.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "took {:?}",
        t.elapsed()
    );
    let lines: Vec<_> = err.lines().filter(|l| l.starts_with("Error:")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].contains("post-copy failed with") && lines[0].contains("pages still missing"),
        "{err}"
    );
    let rep: serde_json::Value = serde_json::from_slice(&std::fs::read(&rx_json).unwrap()).unwrap();
    assert_eq!(rep["status"], "failed");
    assert_gone(&rep["destination_guest_pid"]);
}

/// The destination dies while its guest runs in post-copy: the source says
/// so in one line, exits 1, and does not resume its own guest, whose
/// memory the destination's guest had already moved past; its report says
/// failed, with the push it got through.
#[test]
fn postcopy_source_fails_cleanly_when_the_destination_dies() {
    let dir = tempfile::tempdir().unwrap();
    let tx_json = dir.path().join("tx.json");
    let (mut rx, addr) = receiver(&[], &[]);
    // 16 MiB pushed at 20 Mbit/s: about 7 s of post-copy to die in.
    let tx = livemig()
        .args([
            "send", "--to", &addr, "--quiet", "--mem", "16M", "--warmup", "100ms",
        ])
        .args(["--mode", "postcopy", "--bandwidth", "20mbit"])
        .args(["--workload", "hotset:wws=1M,rate=10k", "--json"])
        .arg(&tx_json)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Kill the destination once its guest has written: a page it faulted
    // on was placed, so the source has heard it resumed and serves or
    // pushes pages (post-copy has begun on both ends).
    let guest = wait_until("the destination guest", || {
        livemig::guest::find::find(child_of(rx.id())?).ok()
    });
    assert!(
        guest.control.wait_running(1, Duration::from_secs(60)),
        "the destination guest never ran"
    );
    let ops = guest.control.ops(1);
    wait_until("a write at the destination", || {
        (guest.control.ops(1) > ops).then_some(())
    });
    rx.kill().unwrap();
    let _ = rx.wait();
    let out = tx.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let lines: Vec<_> = err.lines().filter(|l| l.starts_with("Error:")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // What failed, and that the guest is not running on at the source.
    for needle in [
        "post-copy failed after the guest resumed at the destination",
        "the source guest was not resumed",
        "pushing post-copy pages",
    ] {
        assert!(lines[0].contains(needle), "{needle:?} not in {err}");
    }
    let rep: serde_json::Value = serde_json::from_slice(&std::fs::read(&tx_json).unwrap()).unwrap();
    assert_eq!(rep["status"], "failed");
    assert!(
        rep["error"]
            .as_str()
            .unwrap()
            .contains("pushing post-copy pages"),
        "{rep:#}"
    );
    assert_eq!(rep["source_guest_kept_running"], false, "{rep:#}");
    // The switch-over completed (the downtime ended), the push did not.
    assert!(rep["downtime_ms"].as_f64().is_some(), "{rep:#}");
    assert!(rep["migration_time_ms"].is_null(), "{rep:#}");
    assert_gone(&rep["source_guest_pid"]);
}
