//! Every connection authenticated: mutual TLS and a pre-shared key over
//! loopback, with every page verified, and each way of getting it wrong
//! refused by both ends with one clear line, no page written at the
//! destination and the source guest running on.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use livemig::wire::transport::certs::{generate, Validity};

mod common;
use common::{assert_verified, migrate, receiver, run, Run};

/// A CA with hosts `a` and `b`, and `old` whose certificate has expired.
fn pki() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let hosts = [
        ("a".to_string(), Validity::Days(1)),
        ("b".to_string(), Validity::Days(1)),
        ("old".to_string(), Validity::Expired),
    ];
    generate(dir.path(), &hosts).unwrap();
    dir
}

/// `--tls-*` for `host` of the CA in `dir`.
fn tls(dir: &Path, host: &str) -> Vec<String> {
    let f = |name: String| dir.join(name).to_string_lossy().into_owned();
    vec![
        "--tls-ca".into(),
        f("ca.crt".into()),
        "--tls-cert".into(),
        f(format!("{host}.crt")),
        "--tls-key".into(),
        f(format!("{host}.key")),
    ]
}

fn psk(dir: &Path, name: &str, key: &str) -> Vec<String> {
    let path: PathBuf = dir.join(name);
    std::fs::write(&path, key).unwrap();
    vec!["--psk".into(), path.to_string_lossy().into_owned()]
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn certs_writes_a_ca_and_a_certificate_per_host() {
    let dir = tempfile::tempdir().unwrap();
    let out = common::livemig()
        .arg("certs")
        .arg(dir.path())
        .args(["--hosts", "a,b"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in ["ca.crt", "ca.key", "a.crt", "a.key", "b.crt", "b.key"] {
        let text = std::fs::read_to_string(dir.path().join(f)).unwrap();
        assert!(text.starts_with("-----BEGIN "), "{f} is PEM");
    }
    // The demo's flags: one certificate for both ends.
    let mut args = tls(dir.path(), "a");
    args.extend(["--workload", "uniform:rate=5k"].map(String::from));
    let r = migrate(&strs(&args));
    assert_eq!(assert_verified(&r)["transport"], "tls");
    assert!(
        r.stdout().contains("transport         tls"),
        "{}",
        r.stdout()
    );
}

#[test]
fn tls_migrations_verify_every_page() {
    let dir = pki();
    let mut args = tls(dir.path(), "a");
    args.extend(
        [
            "--tls-allow",
            "a",
            "--streams",
            "2",
            "--workload",
            "uniform:rate=5k",
        ]
        .map(String::from),
    );
    assert_eq!(assert_verified(&migrate(&strs(&args)))["transport"], "tls");
    args.extend(["--mode", "postcopy"].map(String::from));
    let post = migrate(&strs(&args));
    let rep = assert_verified(&post);
    assert_eq!(
        (&rep["mode"], &rep["transport"]),
        (&"postcopy".into(), &"tls".into())
    );
}

#[test]
fn psk_migrations_verify_every_page() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = psk(dir.path(), "k", "a key of at least sixteen bytes\n");
    args.extend(["--streams", "2", "--workload", "uniform:rate=5k"].map(String::from));
    assert_eq!(assert_verified(&migrate(&strs(&args)))["transport"], "psk");
    args.extend(["--mode", "postcopy"].map(String::from));
    assert_eq!(assert_verified(&migrate(&strs(&args)))["transport"], "psk");
    let plain = migrate(&["--workload", "uniform:rate=5k"]);
    assert_eq!(assert_verified(&plain)["transport"], "plain");
}

/// A receiver with `recv` and a sender with `send` that must both fail:
/// the sender's error line holds `send_says`, the receiver's `recv_says`;
/// no page lands, and the source guest ran on.
fn refused(recv: &[String], send: &[String], recv_says: &[&str], send_says: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let rj = dir.path().join("recv.json");
    let mut rargs: Vec<&OsStr> = recv.iter().map(OsStr::new).collect();
    rargs.extend([OsStr::new("--json"), rj.as_os_str()]);
    let (child, addr) = receiver(&rargs, &[]);
    let mut sargs = vec!["send", "--to", &addr, "--quiet", "--mem", "8M"];
    sargs.extend(["--warmup", "50ms", "--workload", "uniform:rate=10k"]);
    sargs.extend(strs(send));
    let sent = run(&sargs);
    sent.assert_fails_with(send_says);
    assert_eq!(sent.report()["source_guest_kept_running"], true);
    assert_eq!(sent.report()["status"], "failed");
    let output = child.wait_with_output().unwrap();
    let received = Run {
        output,
        report: Some(serde_json::from_slice(&std::fs::read(&rj).unwrap()).unwrap()),
    };
    received.assert_fails_with(recv_says);
    assert_eq!(received.report()["pages_received"], 0);
    assert_eq!(received.report()["status"], "failed");
}

#[test]
fn a_wrong_psk_or_a_psk_on_one_end_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (one, two) = (
        psk(dir.path(), "1", "the first key, long enough"),
        psk(dir.path(), "2", "the second key, long enough"),
    );
    refused(&one, &two, &["--psk keys differ"], &["different key"]);
    refused(
        &[],
        &one,
        &["authenticates with a pre-shared key"],
        &["refused", "--psk"],
    );
    refused(&one, &[], &["did not authenticate"], &["refused", "--psk"]);
}

#[test]
fn a_certificate_of_another_ca_an_expired_one_or_a_name_not_allowed_is_refused() {
    let (ours, theirs) = (pki(), pki());
    let a = tls(ours.path(), "a");
    refused(
        &a,
        &tls(theirs.path(), "a"),
        &["refused this end's certificate"],
        &["receiver's certificate is not signed by this end's --tls-ca"],
    );
    refused(
        &a,
        &tls(ours.path(), "old"),
        &["the sender's certificate has expired"],
        &["refused this end's certificate as expired"],
    );
    let mut picky = a.clone();
    picky.extend(["--tls-allow", "b"].map(String::from));
    refused(
        &picky,
        &a,
        &["names none of --tls-allow b"],
        &["refused", "names none of --tls-allow b"],
    );
}

#[test]
fn tls_on_one_end_only_is_refused() {
    let dir = pki();
    let a = tls(dir.path(), "a");
    // A plain sender on a TLS port.
    refused(
        &a,
        &[],
        &["connected without TLS"],
        &["refused", "requires it", "--tls-ca"],
    );
    refused(
        &[],
        &a,
        &["the sender speaks TLS"],
        &["receiver does not speak TLS"],
    );
}
