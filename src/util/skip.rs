//! What a test does when this machine cannot run it.
//!
//! A test that returns early passes, so a bare `return` would show green
//! having tested nothing. [`cannot_run`] makes the skip visible: outside CI
//! it writes the reason to the real stderr, past the test harness's capture,
//! so `cargo test` shows it; in CI (the `CI` environment variable set, as CI
//! services do), whose machine has everything these tests need (root,
//! network namespaces, uffd-wp, the default `vm.max_map_count`), it panics
//! with the reason: a test that did not run there is a failure.

use std::fmt::Display;
use std::io::Write;

/// Whether this process runs under CI (`CI` set to anything but empty,
/// `0` or `false`).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !matches!(v.trim(), "" | "0" | "false"))
}

/// The calling test cannot run here, because of `reason`: panic in CI,
/// otherwise say so where `cargo test` shows it. The caller returns next.
pub fn cannot_run(reason: impl Display) {
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("a test");
    if in_ci() {
        panic!("{test} cannot run, and CI must run it: {reason}");
    }
    note(format_args!("SKIPPED {test}: {reason}"));
}

/// A line on the process's real stderr, which the test harness does not
/// capture (`eprintln!` output is shown only when a test fails).
pub fn note(line: impl Display) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}
