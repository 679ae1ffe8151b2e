//! `livemig sweep`: real migrations with the model and the simulator beside
//! each, written as CSV, JSON and plots, with an accuracy summary.

mod common;
use common::*;

#[test]
fn a_small_sweep_writes_its_results_and_compares() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sweep");
    let o = livemig()
        .args([
            "sweep",
            "--quiet",
            "--mem",
            "16M",
            "--workload",
            "uniform:rate=5k",
        ])
        .args([
            "--workload",
            "hotset:wws=2M,rate=10k",
            "--bandwidth",
            "1gbit",
        ])
        .args(["--policy", "xen", "--tracker", "bitmap", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        stdout.contains("2 points (0 failed migrations)"),
        "{stdout}"
    );
    assert!(stdout.contains("calibrated at 16.0 MiB: link"), "{stdout}");
    let model_line = stdout
        .lines()
        .find(|l| l.starts_with("total_time") && l.contains("model"));
    let words: Vec<&str> = model_line.unwrap_or_default().split_whitespace().collect();
    assert_eq!(words.get(2), Some(&"2"), "{stdout}");
    let csv = std::fs::read_to_string(out.join("sweep.csv")).unwrap();
    assert_eq!(csv.lines().count(), 3, "{csv}");
    assert!(csv.starts_with("point,memory_bytes,workload,bandwidth,policy,measured_total_time_ms"));
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("sweep.json")).unwrap()).unwrap();
    let rows = json["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for r in rows {
        // 16 MiB at 1 Gbit/s: about 134 ms of round 0 alone, measured and predicted.
        for who in ["measured", "model", "simulated"] {
            let t = r[who]["total_time_ms"].as_f64().unwrap();
            assert!(t > 130.0 && t < 1000.0, "{who}: {r}");
        }
    }
    assert_eq!(json["accuracy"].as_array().unwrap().len(), 6);
    for (svg, title) in [
        ("total_time.svg", "Total time: measured vs predicted"),
        ("downtime.svg", "Downtime"),
        ("rounds.svg", "Rounds per point"),
    ] {
        let text = std::fs::read_to_string(out.join(svg)).unwrap();
        assert!(text.starts_with("<svg") && text.contains(title), "{svg}");
    }
}

#[test]
fn a_bad_grid_point_is_refused_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("never");
    let out = out.to_str().unwrap();
    let sweep = |args: &[&str]| {
        let mut all = vec!["sweep", "--quiet", "--out", out];
        all.extend_from_slice(args);
        run(&all)
    };
    sweep(&["--policy", "xen", "--policy", "fastest"])
        .assert_fails_with(&["--policy", "\"fastest\""]);
    sweep(&["--mem", "16M", "--workload", "hotset:wws=64M,rate=1k"])
        .assert_fails_with(&["invalid grid point", "wws"]);
    sweep(&["--variant", "exact"]).assert_fails_with(&["--variant"]);
    // Refused up front: nothing ran, nothing was written.
    assert!(!std::path::Path::new(out).exists());
}

/// A host running `livemig receive` in a loop, `n` times: its port listens
/// throughout (a sender that comes early waits in the backlog instead of
/// being refused while the next receiver starts), and each connection is
/// relayed to a fresh receiver once it says it is waiting. One connection
/// per migration: one stream, pre-copy. Whether each receiver succeeded.
fn receivers_in_a_loop(n: usize) -> (String, std::thread::JoinHandle<Vec<bool>>) {
    use std::net::{Shutdown, TcpListener, TcpStream};
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let relay = |mut from: TcpStream, mut to: TcpStream| {
        let _ = std::io::copy(&mut from, &mut to);
        let _ = to.shutdown(Shutdown::Write);
    };
    let loop_ = std::thread::spawn(move || {
        (0..n)
            .map(|_| {
                let (sender, _) = l.accept().unwrap();
                let (rx, at) = receiver(&[], &[]);
                let conn = TcpStream::connect(at).unwrap();
                let (s2, c2) = (sender.try_clone().unwrap(), conn.try_clone().unwrap());
                let up = std::thread::spawn(move || relay(sender, conn));
                relay(c2, s2);
                up.join().unwrap();
                rx.wait_with_output().unwrap().status.success()
            })
            .collect()
    });
    (addr, loop_)
}

#[test]
fn a_sweep_can_migrate_to_a_remote_receiver() {
    // `receive` takes one migration; a remote sweep runs it in a loop
    // (here: calibration, then the one point).
    let (listen, receivers) = receivers_in_a_loop(2);
    let dir = tempfile::tempdir().unwrap();
    let r = run(&[
        "sweep",
        "--quiet",
        "--to",
        &listen,
        "--mem",
        "16M",
        "--workload",
        "uniform:rate=5k",
        "--bandwidth",
        "1gbit",
        "--policy",
        "xen",
        "--tracker",
        "bitmap",
        "--out",
        dir.path().to_str().unwrap(),
    ]);
    assert!(r.ok(), "{}", r.stderr());
    let rows = r.report()["rows"].as_array().unwrap().clone();
    assert_eq!(rows.len(), 1);
    assert!(rows[0]["measured"]["error"].is_null(), "{}", rows[0]);
    // 16 MiB at 1 Gbit/s: round 0 alone lasts 134 ms at least.
    assert!(rows[0]["measured"]["total_time_ms"].as_f64().unwrap() > 130.0);
    assert_eq!(receivers.join().unwrap(), vec![true, true]);
}
