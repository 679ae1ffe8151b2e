//! Timelines of real migrations, their impact figures, and the commands
//! that read saved reports back (`livemig plot`, `livemig report`).

mod common;
use common::*;

use serde_json::Value;

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// The order phases come in; a timeline never goes back.
const ORDER: [&str; 7] = [
    "warmup", "setup", "precopy", "downtime", "postcopy", "verify", "resumed",
];

fn check_monotone(rep: &Value) -> Vec<String> {
    let tl = rep["timeline"].as_array().expect("a timeline");
    assert!(tl.len() > 10, "{} samples", tl.len());
    let mut phases: Vec<String> = Vec::new();
    for w in tl.windows(2) {
        assert!(
            f(&w[1]["t_ms"]) >= f(&w[0]["t_ms"]),
            "time goes back: {w:?}"
        );
        let (a, b) = (&w[0]["sent_bytes"], &w[1]["sent_bytes"]);
        assert!(b.as_u64() >= a.as_u64(), "sent bytes go back: {w:?}");
    }
    for s in tl {
        for key in [
            "t_ms",
            "guest_rate",
            "sent_bytes",
            "remaining_pages",
            "phase",
        ] {
            assert!(s.get(key).is_some(), "{key} missing in {s}");
        }
        let p = s["phase"].as_str().unwrap().to_string();
        if phases.last() != Some(&p) {
            phases.push(p);
        }
    }
    let rank = |p: &String| ORDER.iter().position(|o| o == p).expect("a known phase");
    assert!(
        phases.windows(2).all(|w| rank(&w[0]) < rank(&w[1])),
        "phases out of order: {phases:?}"
    );
    // The sender's bytes are the migration stream's, less its messages.
    let sent = tl.last().unwrap()["sent_bytes"].as_u64().unwrap();
    assert!(sent > 0 && sent <= rep["transferred_bytes"].as_u64().unwrap());
    phases
}

#[test]
fn a_precopy_run_has_a_monotone_timeline_watched_after_the_resume() {
    let dir = tempfile::tempdir().unwrap();
    let (csv, svg) = (dir.path().join("t.csv"), dir.path().join("t.svg"));
    let r = migrate(&[
        "--workload",
        "hotset:wws=2M,rate=20k",
        "--observe",
        "200ms",
        "--timeline-csv",
        csv.to_str().unwrap(),
        "--plot",
        svg.to_str().unwrap(),
    ]);
    let rep = assert_verified(&r);
    let phases = check_monotone(rep);
    assert_eq!(
        phases,
        ["warmup", "setup", "precopy", "downtime", "verify", "resumed"]
    );
    let tl = rep["timeline"].as_array().unwrap();
    // Watched for --observe after the guest ran at the destination: the
    // samples after the downtime carry its rate.
    // The resume falls between the last sample before the first "verify"
    // one (taken as the phase changed) and that one (taken a period later,
    // or later still on a loaded machine): the watch starts at the resume.
    let first_verify = tl.iter().position(|s| s["phase"] == "verify").unwrap();
    let resumed = f(&tl[first_verify - 1]["t_ms"]);
    let last = f(&tl.last().unwrap()["t_ms"]);
    assert!(
        last - resumed >= 200.0 * 0.99,
        "watched {} ms",
        last - resumed
    );
    assert!(tl
        .iter()
        .filter(|s| s["phase"] == "resumed")
        .all(|s| s["guest_rate"].is_f64()));
    let impact = &rep["impact"];
    assert_eq!(f(&impact["baseline_rate"]), f(&rep["guest_dirty_rate_pps"]));
    for key in ["lost_work_s", "longest_stall_ms", "recovery_ms"] {
        assert!(impact.get(key).is_some(), "{key} missing: {impact}");
    }
    // The CSV has a line per sample; the SVG is whole.
    let text = std::fs::read_to_string(&csv).unwrap();
    assert_eq!(text.lines().count(), tl.len() + 1);
    assert!(text.starts_with("t_ms,phase,"));
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(svg.trim_end().ends_with("</svg>") && svg.contains("downtime"));
}

/// Cold migration pauses the guest for the whole copy: its longest stall
/// covers most of the downtime (all of it but the resume's message on its
/// way back, and more when the resumed guest is slow to write again), and
/// post-copy's timeline shows its phase.
/// A compute guest's progress is operations: its samples carry
/// `guest_ops_rate`, from the source's counter during pre-copy and from the
/// destination's after the resume, where it keeps computing.
#[test]
fn a_compute_guest_s_timeline_carries_its_operations() {
    let r = migrate(&[
        "--workload",
        "compute:ops=1000,wws=1M",
        "--observe",
        "200ms",
    ]);
    let rep = assert_verified(&r);
    let tl = rep["timeline"].as_array().unwrap();
    for phase in ["precopy", "resumed"] {
        let ops: Vec<f64> = tl
            .iter()
            .filter(|s| s["phase"] == phase)
            .filter_map(|s| s["guest_ops_rate"].as_f64())
            .collect();
        assert!(
            ops.iter().any(|&o| o > 0.0),
            "no operations counted in {phase}: {tl:#?}"
        );
    }
}

#[test]
fn cold_stalls_for_its_downtime_and_postcopy_shows_its_phase() {
    let r = migrate(&["--workload", "uniform:rate=20k", "--mode", "cold"]);
    let rep = assert_verified(&r);
    check_monotone(rep);
    let (stall, down) = (
        f(&rep["impact"]["longest_stall_ms"]),
        f(&rep["downtime_ms"]),
    );
    assert!(stall >= 0.5 * down, "stall {stall} ms, downtime {down} ms");
    let r = migrate(&["--workload", "uniform:rate=20k", "--mode", "postcopy"]);
    let rep = assert_verified(&r);
    assert!(check_monotone(rep).contains(&"postcopy".to_string()));
}

#[test]
fn plot_overlays_two_saved_runs_and_report_prints_one_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    let mut printed = Vec::new();
    for mode in ["precopy", "cold"] {
        let json = dir.path().join(format!("{mode}-run.json"));
        let out = livemig()
            .args(["migrate", "--mem", "16M", "--warmup", "100ms"])
            .args(["--workload", "uniform:rate=10k", "--mode", mode, "--json"])
            .arg(&json)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        printed.push(String::from_utf8(out.stdout).unwrap());
        files.push(json);
    }
    let svg = dir.path().join("both.svg");
    let out = livemig()
        .arg("plot")
        .args(&files)
        .arg("-o")
        .arg(&svg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.contains("precopy-run") && text.contains("cold-run"));
    assert!(text.contains("Migration comparison"));
    // Reprinted: the same table and summary as the run printed.
    let out = livemig().arg("report").arg(&files[0]).output().unwrap();
    assert!(out.status.success());
    let again = String::from_utf8(out.stdout).unwrap();
    assert_eq!(again, printed[0]);
}

#[test]
fn files_that_are_not_reports_are_refused_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    };
    let cases = [
        (write("text.json", "not json at all"), "is not JSON"),
        (
            write("other.json", r#"{"name": "x"}"#),
            "not a livemig migration report",
        ),
        (
            write(
                "newer.json",
                r#"{"report_version": 999, "mode": "precopy"}"#,
            ),
            "newer than this livemig reads",
        ),
        (
            write(
                "old.json",
                r#"{"status":"completed","mode":"precopy","rounds":[],"transferred_bytes":0}"#,
            ),
            "has no timeline",
        ),
        (
            dir.path().join("missing.json").display().to_string(),
            "cannot read",
        ),
    ];
    let svg = dir.path().join("x.svg");
    for (file, why) in &cases {
        let r = Run {
            output: livemig()
                .args(["plot", file, "-o", svg.to_str().unwrap()])
                .output()
                .unwrap(),
            report: None,
        };
        r.assert_fails_with(&[why]);
        if *why != "has no timeline" {
            let r = Run {
                output: livemig().args(["report", file]).output().unwrap(),
                report: None,
            };
            r.assert_fails_with(&[why, file.rsplit('/').next().unwrap()]);
        }
    }
    // A plot into a directory that does not exist is refused before any guest starts.
    let r = migrate(&["--workload", "idle", "--plot", "/nonexistent-dir/x.svg"]);
    r.assert_fails_with(&["--plot", "/nonexistent-dir"]);
    assert!(r.report.is_none());
}
