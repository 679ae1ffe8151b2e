//! Throttling a guest into convergence: QEMU's auto-converge and dirty
//! limit, in real migrations and in the predictions.
//!
//! The guest: 16 MiB (4096 pages) written at random 40k times a second,
//! over a 100 Mbit/s limit (about 3000 pages/s), with the threshold policy's
//! 300 ms downtime limit. Every round re-dirties all of memory, so it
//! converges only when slowed down. The link is the rate limit, so round
//! times do not depend on the machine's speed.

mod common;

use std::time::Duration;

use common::{assert_verified, migrate, run};
use livemig::guest::control::Throttle;
use livemig::migration::throttle::{AutoConverge, Governor, Throttling};
use livemig::util::page::PageSize;
use serde_json::Value;

const GUEST: [&str; 8] = [
    "--workload",
    "uniform:rate=40k",
    "--bandwidth",
    "100mbit",
    "--policy",
    "threshold",
    "--max-time",
    "60s",
];

fn rounds(rep: &Value) -> &Vec<Value> {
    rep["rounds"].as_array().unwrap()
}

fn num(v: &Value) -> u64 {
    v.as_u64().unwrap()
}

/// Replay QEMU's rule over the run's own rounds: after each pre-copy round
/// that did not end pre-copy, the next round must run at the throttle the
/// rule gives for the figures measured so far.
fn assert_steps_follow_the_rule(rep: &Value, cfg: Throttling) -> Vec<u32> {
    let page_size = PageSize::new(num(&rep["page_size"])).unwrap();
    let mut g = Governor::new(cfg, page_size, Duration::ZERO);
    let precopy: Vec<&Value> = rounds(rep)
        .iter()
        .filter(|r| r["stop_and_copy"] == false)
        .collect();
    let mut steps = Vec::new();
    for pair in precopy.windows(2) {
        let (r, next) = (pair[0], pair[1]);
        let end = Duration::from_secs_f64(r["end_ms"].as_f64().unwrap() / 1e3);
        g.after_sync(end, num(&r["dirty_pages"]), num(&r["bytes"]));
        let pct = match g.throttle() {
            Throttle::Cpu(p) => p,
            _ => 0,
        };
        assert_eq!(num(&next["throttle_pct"]), u64::from(pct), "round {next:#}");
        if steps.last() != Some(&pct) && pct > 0 {
            steps.push(pct);
        }
    }
    steps
}

#[test]
fn auto_converge_makes_a_guest_that_outruns_the_link_converge() {
    let mut args = GUEST.to_vec();
    args.extend([
        "--auto-converge",
        "--throttle-initial",
        "60",
        "--throttle-increment",
        "20",
    ]);
    let r = migrate(&args);
    let rep = assert_verified(&r);
    assert_eq!(rep["converged"], true, "{rep:#}");
    let cfg = Throttling::AutoConverge(AutoConverge {
        initial: 60,
        increment: 20,
        ..AutoConverge::default()
    });
    let steps = assert_steps_follow_the_rule(rep, cfg);
    // 60, then +20, then capped at 99: each step needs two periods above
    // the trigger, and only the last throttle slows the guest enough.
    assert_eq!(steps, [60, 80, 99], "{rep:#}");
    assert_eq!(num(&rep["cpu_throttle_percentage"]), 99);
    assert!(rep["throttled_ms"].as_f64().unwrap() > 0.0);
    assert!(num(&rep["guest_work_lost_writes"]) > 0);
    // The guest's own rate figures show the throttle: a throttled round
    // writes less than the rounds before the first step.
    let rate = |pct: u64| {
        rounds(rep)
            .iter()
            .filter(|r| num(&r["throttle_pct"]) == pct && r["stop_and_copy"] == false)
            .map(|r| r["guest_rate_pps"].as_f64().unwrap())
            .fold(f64::NAN, f64::max)
    };
    assert!(rate(80) < rate(0) * 0.5, "{rep:#}");
}

#[test]
fn without_throttling_the_same_guest_does_not_converge() {
    let mut args = GUEST.to_vec();
    args.extend(["--max-time", "3s"]);
    let r = migrate(&args);
    let rep = assert_verified(&r);
    assert_eq!(rep["stop_reason"], "max_time", "{rep:#}");
    assert_eq!(num(&rep["cpu_throttle_percentage"]), 0);
    assert!(rounds(rep).iter().all(|r| num(&r["throttle_pct"]) == 0));
}

#[test]
fn a_dirty_limit_caps_the_guest_once_the_trigger_is_met() {
    let mut args = GUEST.to_vec();
    args.extend(["--dirty-limit", "2k", "--dirty-limit-period", "10ms"]);
    let r = migrate(&args);
    let rep = assert_verified(&r);
    assert_eq!(rep["converged"], true, "{rep:#}");
    let precopy: Vec<&Value> = rounds(rep)
        .iter()
        .filter(|r| r["stop_and_copy"] == false)
        .collect();
    // Two periods above the trigger before the cap: two rounds of > 1 s.
    let capped: Vec<&&Value> = precopy
        .iter()
        .filter(|r| r["throttled_ms"].as_f64().unwrap() > 0.0)
        .collect();
    assert!(!capped.is_empty(), "{rep:#}");
    assert_eq!(precopy.len() - capped.len(), 2, "{rep:#}");
    for r in capped {
        // 2k/s counted over 10 ms periods: a round's edges add at most a
        // period's 20 writes.
        let rate = r["guest_rate_pps"].as_f64().unwrap();
        let secs = r["duration_ms"].as_f64().unwrap() / 1e3;
        assert!(rate <= 2000.0 + 40.0 / secs, "{r:#}");
    }
    assert_eq!(num(&rep["cpu_throttle_percentage"]), 0);
}

#[test]
fn predictions_throttle_by_the_same_rule() {
    for cmd in ["simulate", "model"] {
        let mut args = vec![cmd, "--mem", "16M", "--link", "1gbit"];
        args.extend(GUEST);
        args.push("--auto-converge");
        let r = run(&args);
        assert!(r.ok(), "{}", r.stderr());
        let rep = r.report();
        assert_eq!(rep["converged"], true, "{cmd}: {rep:#}");
        let steps =
            assert_steps_follow_the_rule(rep, Throttling::AutoConverge(AutoConverge::default()));
        assert_eq!(steps.first(), Some(&20), "{cmd}: {rep:#}");
        // Each step of 10 takes two periods; a throttle that lets the guest
        // write 40k x (1 - p) pages/s converges once 4096 pages' worth of
        // round no longer re-dirties most of them.
        let last = *steps.last().unwrap();
        assert_eq!(num(&rep["cpu_throttle_percentage"]), u64::from(last));
        assert!(last >= 90, "{cmd}: {rep:#}");
    }
}

#[test]
fn bad_throttle_settings_get_one_line_each() {
    let cases: [(&[&str], &str); 8] = [
        (
            &["--auto-converge", "--throttle-initial", "100"],
            "--throttle-initial 100",
        ),
        (
            &["--auto-converge", "--throttle-increment", "0"],
            "--throttle-increment 0",
        ),
        (
            &["--auto-converge", "--throttle-max", "120"],
            "--throttle-max 120",
        ),
        (
            &["--auto-converge", "--throttle-trigger", "0"],
            "--throttle-trigger 0",
        ),
        (&["--dirty-limit", "0"], "--dirty-limit \"0\""),
        (&["--dirty-limit", "40k"], "not below the guest's own rate"),
        (
            &["--dirty-limit", "1k", "--dirty-limit-period", "2s"],
            "--dirty-limit-period",
        ),
        (&["--dirty-limit", "1k", "--auto-converge"], "choose one"),
    ];
    for (extra, needle) in cases {
        let mut args = vec!["migrate", "--mem", "8M", "--workload", "uniform:rate=40k"];
        args.extend_from_slice(extra);
        let r = run(&args);
        r.assert_fails_with(&[needle]);
    }
    // No pre-copy rounds to throttle between.
    for mode in ["postcopy", "cold"] {
        let r = run(&[
            "migrate",
            "--mem",
            "8M",
            "--workload",
            "idle",
            "--mode",
            mode,
            "--auto-converge",
        ]);
        r.assert_fails_with(&["--auto-converge", mode]);
    }
    // A throttle flag without the feature it tunes.
    let r = run(&["migrate", "--mem", "8M", "--throttle-initial", "30"]);
    r.assert_fails_with(&["--auto-converge"]);
}
