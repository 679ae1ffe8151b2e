//! `livemig simulate`: the sender's own policy and rate-limiter code over a
//! synthetic guest, with the report shape of a real run.

mod common;
use common::*;

fn simulate(extra: &[&str]) -> Run {
    let mut args = vec!["simulate", "--quiet", "--tracker", "bitmap"];
    args.extend_from_slice(extra);
    run(&args)
}

fn rounds(rep: &serde_json::Value) -> &Vec<serde_json::Value> {
    rep["rounds"].as_array().unwrap()
}

#[test]
fn a_simulation_reports_like_a_real_run() {
    let r = simulate(&[
        "--policy",
        "fixed:3",
        "--link",
        "1gbit",
        "--workload",
        "uniform:rate=10k",
    ]);
    assert!(r.ok(), "{}", r.stderr());
    let rep = r.report();
    assert_eq!(rep["mode"], "simulated");
    assert_eq!(rep["status"], "completed");
    assert_eq!(rep["stop_reason"], "fixed_rounds");
    let rs = rounds(rep);
    assert_eq!(rs.len(), 4);
    assert_eq!(rs[0]["pages"], 65536);
    assert_eq!(rs[3]["stop_and_copy"], true);
    // Round k+1 sends what round k dirtied: 10k writes/s for round k's time,
    // fewer distinct pages than writes.
    for w in rs.windows(2) {
        let written = 10_000.0 * w[0]["duration_ms"].as_f64().unwrap() / 1e3;
        let next = w[1]["pages"].as_f64().unwrap();
        assert!(next <= written + 1.0 && next > written * 0.5, "{w:?}");
    }
    // 1 Gbit/s on the wire, framing included.
    let tput = rs[0]["throughput_mbps"].as_f64().unwrap();
    assert!((tput - 1000.0).abs() < 1.0, "{tput}");
    let last = rs[3]["duration_ms"].as_f64().unwrap();
    let downtime = rep["downtime_ms"].as_f64().unwrap();
    assert!((downtime - (last + 0.5)).abs() < 1e-6, "{rep}");
}

#[test]
fn the_dynamic_limit_follows_clarks_rule_as_in_the_sender() {
    let r = simulate(&[
        "--mem",
        "64M",
        "--workload",
        "uniform:rate=5k",
        "--bandwidth",
        "dynamic:min=100mbit,max=1gbit,inc=50mbit",
        "--link",
        "10gbit",
    ]);
    assert!(r.ok(), "{}", r.stderr());
    let rep = r.report();
    let rs = rounds(rep);
    assert_eq!(rs[0]["rate_limit_bps"].as_f64().unwrap(), 100e6);
    for w in rs.windows(2).filter(|w| w[1]["stop_and_copy"] == false) {
        let dirty_bps = w[0]["dirty_rate_pps"].as_f64().unwrap() * 4096.0 * 8.0;
        let want = (dirty_bps + 50e6).clamp(100e6, 1e9);
        let got = w[1]["rate_limit_bps"].as_f64().unwrap();
        assert!((got - want).abs() <= 8.0, "{got} vs {want}: {w:?}");
    }
    assert_eq!(rs.last().unwrap()["rate_limit_bps"].as_f64().unwrap(), 1e9);
}

#[test]
fn a_terabyte_guest_simulates() {
    let r = simulate(&[
        "--mem",
        "1T",
        "--workload",
        "hotset:wws=1G,rate=100k",
        "--max-time",
        "1h",
    ]);
    assert!(r.ok(), "{}", r.stderr());
    let rep = r.report();
    assert_eq!(rep["memory_bytes"].as_u64().unwrap(), 1 << 40);
    assert!(rep["transferred_pages"].as_u64().unwrap() > (1 << 28));
    assert_eq!(rep["status"], "completed");
}

#[test]
fn a_simulation_refuses_what_it_cannot_know() {
    simulate(&["--workload", "uniform:rate=max"])
        .assert_fails_with(&["rate=max", "livemig dirtyrate"]);
    simulate(&["--link", "0"]).assert_fails_with(&["--link"]);
    simulate(&["--round-overhead", "soon"]).assert_fails_with(&["--round-overhead"]);
}
