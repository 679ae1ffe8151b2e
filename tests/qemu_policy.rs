//! `--policy qemu` iterates as QEMU's migration thread: a dirty sync (a
//! round) only once the pending estimate drops below bandwidth x downtime
//! limit, rounds cut short with their unsent pages left pending, and a
//! switch-over that ignores the rate limit. On the simulator, whose clock
//! and link are exact, and in real migrations.

mod common;
use common::*;
use serde_json::Value;

const PAGE: u64 = 4096;

fn rounds(rep: &Value) -> &Vec<Value> {
    rep["rounds"].as_array().unwrap()
}

fn num(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing in {v:#}"))
}

fn float(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} missing in {v:#}"))
}

/// A 64 MiB guest whose 16 MiB hot set takes every write, 20k a second,
/// over a static limit on a 10 Gbit/s link.
fn simulate(policy: &str, bandwidth: &str, extra: &[&str]) -> Value {
    let mut args = vec![
        "simulate",
        "--quiet",
        "--tracker",
        "bitmap",
        "--mem",
        "64M",
        "--workload",
        "hotset:wws=16M,rate=20k,hot=1",
        "--link",
        "10gbit",
        "--bandwidth",
        bandwidth,
        "--policy",
        policy,
        "--max-time",
        "20s",
    ];
    args.extend_from_slice(extra);
    let r = run(&args);
    assert!(r.ok(), "{}", r.stderr());
    r.report().clone()
}

#[test]
fn syncs_happen_only_once_the_pending_estimate_is_below_the_threshold() {
    // 200 Mbit/s x 300 ms = 7.5 MB: 1831 pages, below the 4096-page hot
    // set, so it never converges; 400 Mbit/s doubles it, above.
    for (bandwidth, threshold, converges) in
        [("200mbit", 7_500_000, false), ("400mbit", 15_000_000, true)]
    {
        let rep = simulate("qemu", bandwidth, &[]);
        let rs = rounds(&rep);
        let (last, precopy) = rs.split_last().unwrap();
        assert_eq!(
            rep["converged"].as_bool(),
            converges.then_some(true),
            "{rep:#}"
        );
        // One sync per round, plus the one that starts tracking and the
        // final one: QEMU's dirty-sync-count.
        assert_eq!(num(&rep, "dirty_sync_count"), rs.len() as u64 + 1);
        assert_eq!(num(&rs[0], "pages") + num(&rs[0], "carried_pages"), 16384);
        for (k, r) in precopy.iter().enumerate() {
            // The bandwidth is the limit in every 100 ms period, so is the
            // threshold; a round syncs as soon as its unsent pages fall
            // below it: the last page it sent took them there.
            assert_eq!(num(r, "threshold_bytes"), threshold, "{r:#}");
            let carried = num(r, "carried_pages");
            assert_eq!(carried, (threshold - 1) / PAGE, "{r:#}");
            // The next round starts with the unsent pages and those
            // dirtied meanwhile, each once.
            let next = &rs[k + 1];
            let start = num(next, "pages") + next["carried_pages"].as_u64().unwrap_or(0);
            let dirty = num(r, "dirty_pages");
            assert!(
                start >= carried.max(dirty) && start <= carried + dirty,
                "{r:#} then {next:#}"
            );
        }
        if converges {
            // Completed at a sync that found the pending bytes below it.
            assert!(num(last, "pages") * PAGE < threshold, "{last:#}");
            assert_eq!(rep["stop_reason"], "downtime_limit");
        } else {
            assert_eq!(rep["stop_reason"], "max_time");
            // Syncs far more often than full passes would: every 1831
            // pages' worth of sending, several a second.
            let secs = float(&rep, "total_time_ms") / 1e3;
            assert!(rs.len() as f64 / secs > 2.0, "{rep:#}");
        }
    }
}

#[test]
fn full_passes_under_threshold_never_carry_pages() {
    let rep = simulate("threshold", "400mbit", &[]);
    for r in rounds(&rep) {
        assert!(r.get("carried_pages").is_none(), "{r:#}");
        assert!(r.get("threshold_bytes").is_none(), "{r:#}");
    }
    assert_eq!(rounds(&rep)[0]["pages"], 16384, "round 0 is every page");
}

#[test]
fn the_switchover_is_not_rate_limited_under_qemu_only() {
    // The same guest and limit: qemu's stop-and-copy moves its bytes at
    // the link's 10 Gbit/s, threshold's at the 400 Mbit/s cap.
    let link = 10e9 / 8.0;
    let cap = 400e6 / 8.0;
    for (policy, rate, limit) in [("qemu", link, None), ("threshold", cap, Some(400e6))] {
        let rep = simulate(policy, "400mbit", &[]);
        let last = rounds(&rep).last().unwrap();
        assert_eq!(last["stop_and_copy"], true);
        assert_eq!(last["rate_limit_bps"].as_f64(), limit, "{policy}");
        let secs = float(last, "duration_ms") / 1e3;
        let want = num(last, "bytes") as f64 / rate;
        // Within the limiter's initial credit (10 ms of the rate) of it.
        assert!(
            secs <= want * 1.0001 && secs >= want - 0.0101,
            "{policy}: {secs} s for {} bytes, expected {want} s",
            last["bytes"]
        );
        // The downtime is those last pages plus its fixed part (500 us).
        let downtime = float(&rep, "downtime_ms");
        assert!((downtime - float(last, "duration_ms") - 0.5).abs() < 1e-6);
    }
}

#[test]
fn a_stated_switchover_bandwidth_sets_the_threshold() {
    // 10 Gbit/s x 300 ms = 375 MB, more than the guest: the first sync
    // completes, whatever the measured bandwidth.
    let rep = simulate("qemu", "200mbit", &["--switchover-bandwidth", "10gbit"]);
    let rs = rounds(&rep);
    assert_eq!(rs.len(), 2, "{rep:#}");
    assert_eq!(num(&rs[0], "threshold_bytes"), 375_000_000);
    assert!(num(&rs[0], "carried_pages") > 0);
    assert_eq!(rep["stop_reason"], "downtime_limit");

    run(&["simulate", "--switchover-bandwidth", "fast"])
        .assert_fails_with(&["--switchover-bandwidth"]);
}

#[test]
fn a_real_qemu_migration_converges_and_verifies() {
    // 2 Gbit/s x 300 ms is 75 MB, over twice the 32 MiB guest: a sync as
    // soon as a 100 ms period has been measured (round 0 takes at least
    // 130 ms at the cap) finds every pending page below it.
    let r = migrate(&[
        "--mem",
        "32M",
        "--workload",
        "hotset:wws=1M,rate=2k",
        "--bandwidth",
        "2gbit",
        "--policy",
        "qemu",
        "--max-time",
        "60s",
    ]);
    let rep = assert_verified(&r);
    assert_eq!(rep["stop_reason"], "downtime_limit", "{rep:#}");
    let rs = rounds(rep);
    let (last, precopy) = rs.split_last().unwrap();
    assert_eq!(num(rep, "dirty_sync_count"), rs.len() as u64 + 1);
    for r in precopy {
        assert!(num(r, "threshold_bytes") > 0, "{r:#}");
        let carried = r["carried_pages"].as_u64().unwrap_or(0);
        assert!(carried * PAGE < num(r, "threshold_bytes"), "{r:#}");
    }
    // The unsent pages went at the switch-over, without the cap.
    assert_eq!(last["stop_and_copy"], true);
    assert!(last["rate_limit_bps"].is_null(), "{last:#}");
    let sent: u64 = rs.iter().map(|r| num(r, "pages")).sum();
    assert!(sent >= 8192, "every page went at least once: {rep:#}");
}

#[test]
fn a_real_round_is_cut_at_the_first_sync_when_the_switchover_bandwidth_is_stated() {
    // 1 Gbit/s: round 0's 32 MiB take at least 258 ms, so its first 100 ms
    // period ends inside it, and 10 Gbit/s x 300 ms covers the guest.
    let r = migrate(&[
        "--mem",
        "32M",
        "--workload",
        "hotset:wws=1M,rate=2k",
        "--bandwidth",
        "1gbit",
        "--policy",
        "qemu",
        "--switchover-bandwidth",
        "10gbit",
    ]);
    let rep = assert_verified(&r);
    let rs = rounds(rep);
    assert_eq!(rs.len(), 2, "one cut round, then stop-and-copy: {rep:#}");
    assert_eq!(num(&rs[0], "threshold_bytes"), 375_000_000);
    let carried = num(&rs[0], "carried_pages");
    assert!(
        carried > 0 && num(&rs[0], "pages") + carried == 8192,
        "{rep:#}"
    );
    assert!(num(&rs[1], "pages") >= carried, "{rep:#}");
}
