//! Big guests: an 8 GiB guest migrates, every page verified, with the
//! default workload. Ignored by default: each needs 16 GiB of free memory
//! and minutes (most of them making the memory: on a loaded 2-core machine
//! the destination's preallocation alone took over a minute). Run them
//! with `cargo test --release --test big -- --ignored --test-threads 1`;
//! `scripts/big-guest.sh` says where the time goes.

mod common;
use common::*;

#[test]
#[ignore = "needs 16 GiB of free memory and minutes"]
fn an_8_gib_guest_migrates_locally() {
    let r = run(&["migrate", "--quiet", "--mem", "8G"]);
    let rep = assert_verified(&r);
    assert_eq!(rep["memory_bytes"], 8u64 << 30);
}

#[test]
#[ignore = "needs 16 GiB of free memory and minutes"]
fn an_8_gib_guest_migrates_to_a_receiver_that_makes_its_memory_in_the_handshake() {
    // Without --mem the receiver makes and preallocates 8 GiB while the
    // sender waits for the handshake's answer: that wait grows with memory.
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("rx.json");
    let (rx, addr) = receiver(&["--json".as_ref(), json.as_os_str()], &[]);
    let r = run(&["send", "--to", &addr, "--quiet", "--mem", "8G"]);
    let out = rx.wait_with_output().unwrap();
    assert_verified(&r);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(got["status"], "completed", "{got:#}");
    assert!(got["prealloc_ms"].as_f64().unwrap() > 0.0, "{got:#}");
}
