//! Page-cache teleportation end to end: a guest whose page cache was read
//! from a backing file, migrated with a share of it read by the destination
//! from storage. Every page is verified in every case.

mod common;
use common::*;

use std::io::Write;
use std::path::{Path, PathBuf};

/// A backing file of `mib` MiB of random bytes (incompressible, and a
/// different file every time).
fn disk(dir: &Path, name: &str, mib: usize) -> PathBuf {
    let path = dir.join(name);
    let mut f = std::fs::File::create(&path).unwrap();
    let mut block = vec![0u8; 1 << 20];
    for _ in 0..mib {
        block.iter_mut().for_each(|b| *b = fastrand::u8(..));
        f.write_all(&block).unwrap();
    }
    path
}

fn teleport(workload: &str, file: &Path, extra: &[&str]) -> Run {
    let file = file.to_str().unwrap();
    let mut args = vec!["--workload", workload, "--teleport", file];
    args.extend_from_slice(extra);
    migrate(&args)
}

fn u(rep: &serde_json::Value, key: &str) -> u64 {
    rep[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} in {rep:#}"))
}

/// An idle guest's cache pages are all restorable: with R = 1 every one
/// arrives by storage, and the network carries only the other pages.
#[test]
fn restorable_pages_arrive_by_storage() {
    let dir = tempfile::tempdir().unwrap();
    let file = disk(dir.path(), "disk", 12);
    for layout in ["seq", "scatter"] {
        let w = format!("idle:cache=0.75,layout={layout}");
        let r = teleport(&w, &file, &["--teleport-share", "1"]);
        let rep = assert_verified(&r);
        let pages = u(rep, "memory_bytes") / u(rep, "page_size");
        let cache = u(rep, "teleport_candidates");
        // 75% of the pages, exactly for seq, about for scatter.
        assert!(
            cache.abs_diff(pages * 3 / 4) < pages / 20,
            "{layout}: {rep:#}"
        );
        assert_eq!(rep["teleport_share"], 1.0);
        assert_eq!(u(rep, "teleported_pages"), cache, "{layout}: {rep:#}");
        assert_eq!(u(rep, "storage_bytes"), cache * u(rep, "page_size"));
        assert_eq!(u(rep, "teleport_fallback_pages"), 0);
        assert_eq!(
            u(rep, "transferred_pages"),
            pages - cache,
            "{layout}: {rep:#}"
        );
        assert!(rep["storage_busy_ms"].as_f64().unwrap() > 0.0);
        assert!(rep["network_busy_ms"].as_f64().unwrap() > 0.0);
        assert!(r.stdout().contains("from storage"), "{}", r.stdout());
    }
}

/// A writing guest: cache pages written after their mapping was sent go
/// by network as dirty pages, and that copy wins over the block (the
/// verification would find a stale block).
#[test]
fn a_cache_page_written_during_migration_arrives_by_network_and_wins() {
    let dir = tempfile::tempdir().unwrap();
    let file = disk(dir.path(), "disk", 12);
    // Round 0 takes over a second at 100 Mbit/s, storage reads at 4 MB/s:
    // thousands of writes land on pages whose mapping is out.
    let r = teleport(
        "uniform:rate=3k,cache=0.75,layout=scatter",
        &file,
        &[
            "--teleport-share",
            "1",
            "--bandwidth",
            "100mbit",
            "--storage-rate",
            "4MB",
        ],
    );
    let rep = assert_verified(&r);
    let fell_back = u(rep, "teleport_fallback_pages");
    assert!(fell_back > 0, "{rep:#}");
    // Every page mapped either came from storage or was skipped there for
    // a network copy; the ones written went by network either way.
    assert!(u(rep, "teleported_pages") <= u(rep, "teleport_candidates"));
    assert!(u(rep, "teleported_pages") > 0, "{rep:#}");
}

/// A destination whose file differs: it refuses, says why, and every page
/// goes over the network.
#[test]
fn a_mismatched_backing_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = disk(dir.path(), "disk", 12);
    let other = disk(dir.path(), "other", 12);
    let r = teleport(
        "idle:cache=0.5",
        &file,
        &["--teleport-dest", other.to_str().unwrap()],
    );
    let rep = assert_verified(&r);
    let why = rep["teleport_refused"].as_str().unwrap_or_default();
    assert!(why.contains("differs from the sender's"), "{rep:#}");
    assert!(
        r.stdout().contains("refused by the destination"),
        "{}",
        r.stdout()
    );
    assert_eq!(u(rep, "teleported_pages"), 0);
    let pages = u(rep, "memory_bytes") / u(rep, "page_size");
    assert_eq!(u(rep, "transferred_pages"), pages);
}

/// A receiver without --teleport (teleport on one end only) refuses too.
#[test]
fn a_receiver_without_teleport_refuses_and_everything_goes_by_network() {
    let dir = tempfile::tempdir().unwrap();
    let file = disk(dir.path(), "disk", 12);
    let (mut rx, addr) = receiver(&[], &[]);
    let r = run(&[
        "send",
        "--to",
        &addr,
        "--quiet",
        "--mem",
        "16M",
        "--warmup",
        "100ms",
        "--workload",
        "idle:cache=0.5",
        "--teleport",
        file.to_str().unwrap(),
    ]);
    let status = rx.wait().unwrap();
    let rep = assert_verified(&r);
    assert!(status.success());
    let why = rep["teleport_refused"].as_str().unwrap_or_default();
    assert!(why.contains("no --teleport FILE"), "{rep:#}");
}

/// `auto` chooses a share strictly between the ends when both channels
/// have work, from rates it measured.
#[test]
fn auto_chooses_from_measured_rates() {
    let dir = tempfile::tempdir().unwrap();
    let file = disk(dir.path(), "disk", 12);
    let r = teleport(
        "idle:cache=0.75",
        &file,
        &["--bandwidth", "100mbit", "--storage-rate", "12MB"],
    );
    let rep = assert_verified(&r);
    let share = rep["teleport_share"].as_f64().unwrap();
    assert!(share > 0.0 && share < 1.0, "{rep:#}");
    assert!(u(rep, "storage_rate_bps") > 0 && u(rep, "network_rate_bps") > 0);
}

#[test]
fn bad_teleport_input_fails_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = disk(dir.path(), "disk", 4);
    let f = file.to_str().unwrap();
    let missing = dir.path().join("missing");
    let missing = missing.to_str().unwrap();
    for (args, needles) in [
        (
            vec![
                "--workload",
                "idle:cache=0.5",
                "--teleport",
                f,
                "--teleport-share",
                "1.5",
            ],
            vec!["--teleport-share", "1.5", "between 0 and 1"],
        ),
        (
            vec![
                "--workload",
                "idle:cache=0.5",
                "--teleport",
                f,
                "--teleport-share=-0.5",
            ],
            vec!["--teleport-share", "-0.5", "between 0 and 1"],
        ),
        (
            vec!["--workload", "idle:cache=0.5", "--teleport", missing],
            vec!["cannot open the backing file", "missing"],
        ),
        (
            // 16 MiB at 75%: 12 MiB of blocks, the file has 4.
            vec!["--workload", "idle:cache=0.75", "--teleport", f],
            vec!["has 1024 blocks", "needs 3072"],
        ),
        (
            vec!["--workload", "idle", "--teleport", f],
            vec!["has no page cache"],
        ),
        (
            vec!["--workload", "idle:cache=0.5"],
            vec!["give its backing file with --teleport FILE"],
        ),
        (
            vec![
                "--workload",
                "idle:cache=0.5,layout=zigzag",
                "--teleport",
                f,
            ],
            vec!["layout=\"zigzag\""],
        ),
        (
            vec![
                "--workload",
                "idle:cache=0.5",
                "--teleport",
                f,
                "--streams",
                "2",
            ],
            vec!["--streams 1"],
        ),
    ] {
        migrate(&args).assert_fails_with(&needles);
    }
}
