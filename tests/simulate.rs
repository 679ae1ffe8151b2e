//! `livemig simulate` and `livemig model`: the sender's own policy and
//! rate-limiter code over a synthetic guest or the analytical model, with
//! the report shape of a real run.

mod common;
use common::*;

fn simulate(extra: &[&str]) -> Run {
    let mut args = vec!["simulate", "--quiet", "--tracker", "bitmap"];
    args.extend_from_slice(extra);
    run(&args)
}

/// 300k pages/s of 4 KiB is 1.2 GB/s of dirtying over a 1 Gbit/s link, and
/// the threshold policy has no round cap: only --max-time (1000 h) stops it.
const NON_CONVERGING: &[&str] = &[
    "--mem",
    "16M",
    "--workload",
    "uniform:rate=300k",
    "--bandwidth",
    "1gbit",
    "--policy",
    "threshold",
    "--downtime-limit",
    "1ms",
    "--max-time",
    "1000h",
];

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
    // A fast writer over long rounds saturates memory: the simulator marks
    // it all instead of computing billions of writes.
    let r = simulate(&[
        "--mem",
        "1T",
        "--workload",
        "uniform:rate=1M",
        "--bandwidth",
        "1gbit",
    ]);
    assert!(r.ok(), "{}", r.stderr());
    assert_eq!(r.report()["rounds"][1]["pages"].as_u64().unwrap(), 1 << 28);
}

#[test]
fn the_models_shortcut_at_a_fixed_point_is_exact() {
    // Under threshold a non-converging model jumps to --max-time; going round by
    // round (fixed:N with a huge N also stops at --max-time) must agree.
    let common = [
        "--variant",
        "classic",
        "--workload",
        "uniform:rate=1M",
        "--mem",
        "64M",
        "--bandwidth",
        "1gbit",
        "--max-time",
        "10130ms",
    ];
    let jump = model(&[&common[..], &["--policy", "threshold"]].concat());
    let walk = model(&[&common[..], &["--policy", "fixed:100000"]].concat());
    let (j, w) = (jump.report(), walk.report());
    assert!(j["rounds_not_listed"].as_u64().unwrap() > 0, "{j}");
    assert_eq!(j["converged"], false);
    assert_eq!(j["transferred_bytes"], w["transferred_bytes"]);
    let (tj, tw) = (
        j["total_time_ms"].as_f64().unwrap(),
        w["total_time_ms"].as_f64().unwrap(),
    );
    assert!((tj - tw).abs() < 0.01, "{tj} vs {tw}");
}

#[test]
fn a_simulation_refuses_what_it_cannot_know() {
    simulate(&["--workload", "uniform:rate=max"])
        .assert_fails_with(&["rate=max", "livemig dirtyrate"]);
    simulate(&["--link", "0"]).assert_fails_with(&["--link"]);
    simulate(&["--round-overhead", "soon"]).assert_fails_with(&["--round-overhead"]);
    simulate(&["--mem", "2P"]).assert_fails_with(&["--mem 2.0 PiB", "up to 1 PiB"]);
    // Dirtying faster than the link, a policy without a round cap and no
    // time cap to speak of: the simulator must say so, not run for days.
    simulate(NON_CONVERGING).assert_fails_with(&["does not converge", "after 10000 rounds"]);
}

fn model(extra: &[&str]) -> Run {
    let mut args = vec!["model", "--quiet", "--tracker", "bitmap"];
    args.extend_from_slice(extra);
    run(&args)
}

fn pages(rep: &serde_json::Value) -> Vec<f64> {
    rounds(rep)
        .iter()
        .map(|r| r["pages"].as_f64().unwrap())
        .collect()
}

#[test]
fn the_classic_model_is_the_textbook_geometric_series() {
    // 256 MiB at 1 Gbit/s while 5k pages/s (20.48 MB/s) are written:
    // lambda = D/R = 0.16384, V_i = M lambda^i (framing aside).
    let r = model(&[
        "--variant",
        "classic",
        "--workload",
        "uniform:rate=5k",
        "--link",
        "1gbit",
        "--round-overhead",
        "0s",
        "--policy",
        "fixed:4",
    ]);
    assert!(r.ok(), "{}", r.stderr());
    let v = pages(r.report());
    let lambda = 5000.0 * 4096.0 / 125e6;
    for (i, got) in v.iter().enumerate().take(5) {
        let want = 65536.0 * f64::powi(lambda, i as i32);
        assert!(
            (got - want).abs() <= want * 0.01 + 1.0,
            "V_{i}: {got} vs {want}"
        );
    }
}

#[test]
fn the_wws_model_agrees_with_the_simulator() {
    for workload in [
        "uniform:rate=20k",
        "hotset:wws=32M,rate=50k",
        "sweep:from=0,to=64M,rate=30k",
    ] {
        let args = [
            "--workload",
            workload,
            "--link",
            "5gbit",
            "--policy",
            "fixed:5",
        ];
        let (m, s) = (model(&args), simulate(&args));
        assert!(m.ok() && s.ok(), "{} {}", m.stderr(), s.stderr());
        for (i, (a, b)) in pages(m.report()).iter().zip(pages(s.report())).enumerate() {
            assert!(
                (a - b).abs() <= b * 0.05 + 5.0,
                "{workload} round {i}: model {a}, simulator {b}"
            );
        }
    }
}

#[test]
fn a_model_that_cannot_converge_says_so() {
    let r = model(NON_CONVERGING);
    assert!(r.ok(), "{}", r.stderr());
    let rep = r.report();
    assert_eq!(rep["converged"], false);
    assert_eq!(rep["stop_reason"], "max_time");
    assert!(
        rep["note"].as_str().unwrap().contains("does not converge"),
        "{rep}"
    );
    assert!(r.stdout().contains("does not converge"));
    let x = model(&["--workload", "idle", "--policy", "xen"]);
    assert_eq!(x.report()["converged"], true);
}

#[test]
fn a_model_refuses_impossible_parameters() {
    model(&["--variant", "exact"]).assert_fails_with(&["--variant", "exact"]);
    model(&["--bandwidth", "0"]).assert_fails_with(&["--bandwidth"]);
    model(&["--link", "0"]).assert_fails_with(&["--link"]);
    model(&["--workload", "uniform:rate=max"]).assert_fails_with(&["rate=max"]);
}

#[test]
fn explain_gives_each_decision_with_its_numbers() {
    // The same text for a real run and a simulation: both come from the
    // sender's Precopy.
    let sim = livemig()
        .args([
            "simulate",
            "--explain",
            "--tracker",
            "bitmap",
            "--policy",
            "threshold",
        ])
        .args(["--workload", "uniform:rate=10k", "--bandwidth", "1gbit"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&sim.stdout);
    assert!(sim.status.success(), "{out}");
    assert!(out.contains("threshold: expected downtime = "), "{out}");
    assert!(out.contains("(stops at or below 300.0 ms)"), "{out}");
    assert!(out.contains("Go on: another round."), "{out}");
    assert!(out.contains("Stop-and-copy (downtime_limit): "), "{out}");

    let real = migrate(&[
        "--tracker",
        "bitmap",
        "--workload",
        "hotset:wws=1M,rate=10k",
    ]);
    let rs = real.report()["rounds"].as_array().unwrap().clone();
    let (last, precopy) = rs.split_last().unwrap();
    assert_eq!(last["decision"], "");
    for r in precopy {
        assert!(r["decision"].as_str().unwrap().contains("xen: "), "{r}");
    }
    let stop = precopy.last().unwrap()["decision"].as_str().unwrap();
    let reason = real.report()["stop_reason"].as_str().unwrap();
    assert!(
        stop.contains(&format!("Stop-and-copy ({reason})")),
        "{stop}"
    );
}

/// A harvest's cost per GiB (`--harvest-cost`) lengthens every round and
/// the downtime by the walk of the whole guest: at 4 GiB, 0.4 ms per GiB
/// makes each round long enough for the default hot set to dirty more
/// than xen's 50 pages, so pre-copy no longer converges.
#[test]
fn a_harvest_cost_per_gib_lengthens_rounds_and_downtime() {
    let at = |cost: &str| {
        let r = simulate(&[
            "--mem",
            "4G",
            "--workload",
            "hotset:wws=64M,rate=50k",
            "--link",
            "20gbit",
            "--round-overhead",
            "150us",
            "--harvest-cost",
            cost,
        ]);
        assert!(r.ok(), "{}", r.stderr());
        r.report().clone()
    };
    let (free, walked) = (at("0s"), at("0.4ms"));
    assert_eq!(free["stop_reason"], "few_dirty_pages");
    assert_eq!(walked["stop_reason"], "round_limit");
    let harvest = walked["downtime_breakdown_ms"]["final_harvest"]
        .as_f64()
        .unwrap();
    assert!((harvest - 1.6).abs() < 1e-9, "4 GiB x 0.4 ms: {harvest}");
    for r in rounds(&walked).iter().skip(1) {
        if r["stop_and_copy"] == false {
            assert!(r["duration_ms"].as_f64().unwrap() >= 1.6 + 0.15, "{r}");
        }
    }
    let d = |rep: &serde_json::Value| rep["downtime_ms"].as_f64().unwrap();
    assert!(
        d(&walked) >= d(&free) + harvest,
        "the final harvest is in the downtime"
    );
}
