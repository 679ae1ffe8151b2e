//! The workloads closer to applications (zipf, compute, phases, trace),
//! `dirtyrate --record`, and `--cpu-cap`, run through the real binary.

mod common;
use common::*;

use std::collections::BTreeSet;
use std::path::Path;

/// `livemig dirtyrate ARGS --record FILE` with small defaults; the report.
fn record(file: &Path, args: &[&str]) -> serde_json::Value {
    let mut a = vec!["dirtyrate", "--quiet", "--mem", "16M", "--warmup", "200ms"];
    a.extend_from_slice(args);
    a.extend_from_slice(&["--record", file.to_str().unwrap()]);
    let r = run(&a);
    assert!(r.ok(), "{}", r.stderr());
    r.report().clone()
}

/// A trace's (t_us, page) lines, comments left out.
fn lines(file: &Path) -> Vec<(u64, u64)> {
    std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let (t, p) = l.split_once(' ').unwrap();
            (t.parse().unwrap(), p.parse().unwrap())
        })
        .collect()
}

fn pages(file: &Path) -> BTreeSet<u64> {
    lines(file).into_iter().map(|(_, p)| p).collect()
}

/// Record a trace from a known workload, replay it for three of its
/// loops and record the replay: the pages harvested are exactly the
/// recorded ones.
#[test]
fn a_replayed_trace_writes_exactly_the_recorded_pages() {
    let dir = tempfile::tempdir().unwrap();
    let (first, second) = (
        dir.path().join("hot.trace"),
        dir.path().join("replay.trace"),
    );
    let rep = record(
        &first,
        &[
            "--workload",
            "hotset:wws=256K,rate=2k,hot=0.9",
            "--duration",
            "1s",
        ],
    );
    let recorded = pages(&first);
    assert_eq!(
        rep["recorded_writes"].as_u64(),
        Some(lines(&first).len() as u64)
    );
    assert!(recorded.len() > 64, "{} pages recorded", recorded.len());
    // The replay loops every trace period (about the recording's length).
    let period_ms = lines(&first).last().unwrap().0 / 1000 + 1;
    let replay = format!("trace:{}", first.display());
    let duration = format!("{}ms", period_ms * 3);
    record(&second, &["--workload", &replay, "--duration", &duration]);
    assert_eq!(pages(&second), recorded);
}

/// An idle phase and a writing one alternate: the harvests show bursts of
/// writes separated by silences most of an idle phase long.
#[test]
fn phases_switch_on_the_guest_clock() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("phases.trace");
    record(
        &file,
        &[
            "--workload",
            "phases:idle@400ms+uniform:rate=5k@400ms",
            "--duration",
            "2s",
        ],
    );
    let times: BTreeSet<u64> = lines(&file).into_iter().map(|(t, _)| t).collect();
    let times: Vec<u64> = times.into_iter().collect();
    let silences = times.windows(2).filter(|w| w[1] - w[0] >= 250_000).count();
    assert!(silences >= 1, "no idle phase between writes: {times:?}");
    let writing = times.windows(2).filter(|w| w[1] - w[0] < 100_000).count();
    assert!(writing >= 10, "too few harvests with writes: {times:?}");
}

/// The guest clock travels in the device state: a guest migrated in its
/// writing phase, after an idle phase longer than the destination's 300 ms
/// rate window, writes on at once at the destination (a clock started
/// afresh there would idle through that window).
#[test]
fn a_migrated_guest_stays_in_its_phase() {
    let r = migrate(&[
        "--workload",
        "phases:idle@500ms+uniform:rate=5k@1h",
        "--warmup",
        "800ms",
    ]);
    let rep = assert_verified(&r);
    let before = rep["guest_dirty_rate_pps"].as_f64().unwrap();
    let after = rep["destination_guest_rate_pps"].as_f64().unwrap();
    assert!(after > 0.0, "the destination idled: {rep:#}");
    assert!(
        before > 0.0,
        "the warm-up ended before the writing phase: {rep:#}"
    );
}

/// A compute guest migrates, its operations counted in the report.
#[test]
fn a_compute_guest_reports_its_operations() {
    let r = migrate(&["--workload", "compute:ops=10000,wws=1M"]);
    let rep = assert_verified(&r);
    let ops = rep["guest_ops_rate"].as_f64().expect("guest_ops_rate");
    assert!(ops > 0.0, "{rep:#}");
    assert!(rep["guest_cpu_pct"].as_f64().unwrap() > 0.0, "{rep:#}");
    // Writes are one per 10000 operations (the counters are read apart,
    // so allow a write either way).
    let writes = rep["guest_dirty_rate_pps"].as_f64().unwrap();
    assert!(
        writes > 0.0 && writes < ops / 1000.0,
        "{writes} writes/s, {ops} ops/s"
    );
}

/// The same CPU-bound guest with and without a cap, migrated side by
/// side so both meet the same load. Capped at 25 % of a CPU by the duty
/// cycle, it uses at most about that, and works at most about 25 / (the
/// free guest's CPU %) of the free one's rate: a quarter on an idle
/// machine; nothing to cut where the load leaves the free one under 25 %
/// (the bound comes from the run's own figures, with room for a loaded
/// machine). The kernel's cap, where there is one, holds its CPU use near
/// 25 % and leaves no cgroup behind.
#[test]
fn a_cpu_cap_slows_a_cpu_bound_guest() {
    let rate = |extra: &'static [&'static str]| {
        std::thread::spawn(move || {
            let mut a = vec![
                "--workload",
                "compute:ops=10000,wws=1M",
                "--bandwidth",
                "100mbit",
            ];
            a.extend_from_slice(extra);
            let r = migrate(&a);
            let rep = assert_verified(&r).clone();
            (rep["guest_ops_rate"].as_f64().unwrap(), rep)
        })
    };
    let free = rate(&[]);
    let duty = rate(&["--cpu-cap", "25", "--cpu-cap-method", "duty-cycle"]);
    let ((free, rep), (duty, capped)) = (free.join().unwrap(), duty.join().unwrap());
    assert!(rep.get("cpu_cap_pct").is_none(), "{rep:#}");
    assert_eq!(capped["cpu_cap_pct"], 25);
    assert_eq!(capped["cpu_cap_method"], "duty-cycle");
    let cpu = |r: &serde_json::Value| r["guest_cpu_pct"].as_f64().unwrap();
    assert!(
        cpu(&capped) < 25.0 * 1.6,
        "used {:.1} % of a CPU",
        cpu(&capped)
    );
    let expected = (25.0 / cpu(&rep)).min(1.0);
    assert!(
        duty / free < 1.5 * expected + 0.05,
        "capped {duty:.0} ops/s, free {free:.0} at {:.1} % CPU",
        cpu(&rep)
    );
    let (_, rep) = rate(&["--cpu-cap", "25"]).join().unwrap();
    let method = rep["cpu_cap_method"].as_str().unwrap().to_string();
    assert!(
        ["cgroup-v2", "cgroup-v1", "duty-cycle"].contains(&method.as_str()),
        "{method}"
    );
    if method.starts_with("cgroup") {
        let cpu = rep["guest_cpu_pct"].as_f64().unwrap();
        assert!(
            cpu < 25.0 * 1.6,
            "used {cpu:.1} % of a CPU under a 25 % cap"
        );
        let pid = rep["source_guest_pid"].as_i64().unwrap();
        for root in [
            "/sys/fs/cgroup",
            "/sys/fs/cgroup/cpu",
            "/sys/fs/cgroup/unified",
        ] {
            let dir = format!("{root}/livemig-{pid}");
            assert!(!Path::new(&dir).exists(), "{dir} left behind");
        }
    }
}

#[test]
fn bad_workloads_and_caps_are_refused_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        format!("trace:{}", p.display())
    };
    let malformed = write("bad.trace", "# fine\n10 1\n20 x\n");
    let beyond = write("big.trace", "10 1\n20 4096\n");
    let empty = write("empty.trace", "# nothing\n");
    let missing = format!("trace:{}", dir.path().join("none.trace").display());
    for (args, needles) in [
        (
            vec!["--workload", "zipf:s=0,rate=1k"],
            &["--workload", "s=\"0\" is not an exponent above 0"][..],
        ),
        (vec!["--workload", "zipf:s=-2,rate=1k"], &["s=\"-2\""]),
        (
            vec!["--workload", "phases:idle@0s+uniform:rate=1k@0ms"],
            &["--workload", "sum to zero time"],
        ),
        (vec!["--workload", "phases:idle"], &["has no @DURATION"]),
        (vec!["--workload", "compute:ops=0,wws=1M"], &["ops=\"0\""]),
        (vec!["--workload", &malformed], &["line 3", "\"20 x\""]),
        (
            vec!["--workload", &beyond],
            &["line 2", "page 4096 is beyond"],
        ),
        (vec!["--workload", &empty], &["holds no writes"]),
        (
            vec!["--workload", &missing],
            &["none.trace", "cannot read it"],
        ),
        (
            vec!["--cpu-cap", "0", "--workload", "idle"],
            &["--cpu-cap 0", "between 25 and 100"],
        ),
        (
            vec!["--cpu-cap", "201", "--vcpus", "2", "--workload", "idle"],
            &["--cpu-cap 201", "between 25 and 200"],
        ),
        (
            vec![
                "--cpu-cap",
                "50",
                "--cpu-cap-method",
                "cgroup",
                "--workload",
                "idle",
            ],
            &["--cpu-cap-method", "unknown method"],
        ),
    ] {
        migrate(&args).assert_fails_with(needles);
    }
    // Predictions cannot follow phases or traces.
    run(&[
        "simulate",
        "--mem",
        "16M",
        "--workload",
        "phases:idle@1s+uniform:rate=1k@1s",
    ])
    .assert_fails_with(&["phases"]);
}
