//! livemig between network namespaces over a shaped link, built by
//! scripts/testbed.sh. Needs root and network namespaces (CI has both, and
//! fails if a test here could not run); elsewhere a test without them says
//! why on stderr and passes.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::Command;

mod common;
use common::testbed::Testbed;

/// A testbed of two hosts with a name and subnet of this test's own, or
/// None (and why).
fn two_hosts(tag: u32, rate: &str) -> Option<Testbed> {
    let id = std::process::id() % 10_000;
    Testbed::up(
        format!("t{id}x{tag}"),
        format!("10.{}.{}", 100 + tag, id % 250),
        &["--rate", rate],
    )
}

impl Testbed {
    /// Times host `i`'s shaper has held a packet back for want of tokens
    /// (tbf's `overlimits`): above 0 once the sender offered more than the
    /// link carries.
    fn overlimits(&self, i: u32) -> u64 {
        let out = Command::new("tc")
            .args(["-s", "-n", &self.ns(i), "qdisc", "show", "dev", "eth0"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let words: Vec<&str> = text.split_whitespace().collect();
        let at = words.iter().position(|&w| w == "overlimits");
        at.and_then(|i| words.get(i + 1)?.parse().ok())
            .unwrap_or_else(|| panic!("no overlimits in: {text}"))
    }

    /// `livemig ARGS` inside host `i`.
    fn livemig(&self, i: u32) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(i), env!("CARGO_BIN_EXE_livemig")]);
        c
    }

    /// Receive in host 1, send from host 0; both reports.
    fn migrate(&self, send_args: &[&str]) -> (serde_json::Value, serde_json::Value) {
        self.migrate_with(&[], send_args)
    }

    /// As [`Testbed::migrate`], with extra arguments for the receiver.
    fn migrate_with(
        &self,
        recv_args: &[&str],
        send_args: &[&str],
    ) -> (serde_json::Value, serde_json::Value) {
        let dir = tempfile::tempdir().unwrap();
        let (rj, sj) = (dir.path().join("recv.json"), dir.path().join("send.json"));
        // Off loopback, a plain end must say it accepts anyone.
        let secured = |args: &[&str]| args.iter().any(|a| a.starts_with("--tls") || *a == "--psk");
        let plain = |args: &[&str]| match secured(args) {
            true => vec![],
            false => vec!["--insecure"],
        };
        let listen = format!("{}:4444", self.addr(1));
        let mut rx = self
            .livemig(1)
            .args(["receive", "--listen", &listen, "--json"])
            .arg(&rj)
            .args(recv_args)
            .args(plain(recv_args))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Ready once it says it waits (it has bound and prepared by then);
        // the rest of its stderr is kept for a failure's message.
        let mut rx_err = BufReader::new(rx.stderr.take().unwrap());
        let mut first = String::new();
        rx_err.read_line(&mut first).unwrap();
        assert!(first.contains("waiting for a migration"), "{first}");
        let rx_err = std::thread::spawn(move || {
            let mut rest = first;
            let _ = rx_err.read_to_string(&mut rest);
            rest
        });
        let out = self
            .livemig(0)
            .args(["send", "--to", &listen, "--quiet", "--json"])
            .arg(&sj)
            .args(send_args)
            .args(plain(send_args))
            .output()
            .unwrap();
        let rs = rx.wait().unwrap();
        let rx_err = rx_err.join().unwrap();
        assert!(
            out.status.success() && rs.success(),
            "send: {}\nreceive: {rx_err}",
            String::from_utf8_lossy(&out.stderr)
        );
        let read = |p: &Path| serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
        (read(&sj), read(&rj))
    }
}

/// Round 0 of `sent` ran at the rate of the shaped link, `mbit` Mbit/s:
/// never faster (1 % for tbf's burst; it counts headers too, so goodput
/// stays below the rate), and the link, not the sender, set the pace: the
/// shaper had to hold packets back. A loaded machine may send slower, but
/// then the claim is false and the test says so; a fast one cannot flip it.
fn assert_link_set_the_pace(bed: &Testbed, sent: &serde_json::Value, mbit: f64) {
    let goodput = sent["rounds"][0]["throughput_mbps"].as_f64().unwrap();
    assert!(
        goodput <= mbit * 1.01,
        "{goodput} Mbit/s over a {mbit} Mbit/s link"
    );
    let held = bed.overlimits(0);
    assert!(
        held > 0,
        "the {mbit} Mbit/s shaper never held a packet back ({goodput} Mbit/s)"
    );
}

#[test]
fn a_migration_over_a_shaped_link_runs_at_the_links_rate() {
    let Some(bed) = two_hosts(1, "200mbit") else {
        return;
    };
    let (sent, received) = bed.migrate(&[
        "--mem",
        "16M",
        "--workload",
        "idle",
        "--tracker",
        "bitmap",
        "--warmup",
        "100ms",
    ]);
    assert_eq!(sent["status"], "completed");
    assert_eq!(sent["mismatched_pages"], 0);
    assert_eq!(received["verified_pages"], 4096);
    assert_link_set_the_pace(&bed, &sent, 200.0);
    // Running `up` again says so and changes nothing.
    let again = bed.run("up", &["--rate", "1gbit"]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("is up already"));
    let status = String::from_utf8_lossy(&bed.run("status", &[]).stdout).into_owned();
    assert!(status.contains("egress 200Mbit"), "{status}");
}

#[test]
fn the_dynamic_limit_follows_clarks_rule_over_a_real_link() {
    let Some(bed) = two_hosts(2, "500mbit") else {
        return;
    };
    let (sent, _) = bed.migrate(&[
        "--mem",
        "16M",
        "--workload",
        "uniform:rate=3k",
        "--tracker",
        "bitmap",
        "--bandwidth",
        "dynamic:min=50mbit,max=300mbit,inc=20mbit",
        "--warmup",
        "100ms",
    ]);
    assert_eq!(sent["mismatched_pages"], 0);
    let rounds = sent["rounds"].as_array().unwrap();
    assert_eq!(rounds[0]["rate_limit_bps"].as_f64().unwrap(), 50e6);
    for w in rounds.windows(2).filter(|w| w[1]["stop_and_copy"] == false) {
        let dirty_bps = w[0]["dirty_rate_pps"].as_f64().unwrap() * 4096.0 * 8.0;
        let want = (dirty_bps + 20e6).clamp(50e6, 300e6);
        let got = w[1]["rate_limit_bps"].as_f64().unwrap();
        assert!((got - want).abs() <= 8.0, "{got} vs {want}");
    }
    // No round runs faster than its limit, so none at the link's rate
    // (500 Mbit/s, above every limit). How much slower a round runs
    // depends on the machine, and is not asserted.
    rounds.iter().for_each(common::assert_paced);
}

#[test]
fn streams_share_a_shaped_link_and_its_rate() {
    let Some(bed) = two_hosts(3, "200mbit") else {
        return;
    };
    let (sent, received) = bed.migrate_with(
        &["--mem", "16M"],
        &[
            "--mem",
            "16M",
            "--workload",
            "idle",
            "--streams",
            "4",
            "--warmup",
            "100ms",
        ],
    );
    assert_eq!(sent["status"], "completed");
    assert_eq!(
        (sent["streams"].as_u64(), received["streams"].as_u64()),
        (Some(4), Some(4))
    );
    assert_eq!(received["verified_pages"], 4096);
    // Memory was made before the sender connected.
    assert!(received["prealloc_ms"].as_f64().unwrap() > 0.0);
    assert_link_set_the_pace(&bed, &sent, 200.0);
}

#[test]
fn plain_ends_off_loopback_refuse_without_insecure() {
    let Some(bed) = two_hosts(4, "1gbit") else {
        return;
    };
    let listen = format!("{}:4444", bed.addr(1));
    let recv = bed
        .livemig(1)
        .args(["receive", "--listen", &listen])
        .output()
        .unwrap();
    let send = bed
        .livemig(0)
        .args(["send", "--to", &listen, "--mem", "8M"])
        .output()
        .unwrap();
    for (what, out) in [("listen on", recv), ("send to", send)] {
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(err.lines().count(), 1, "{err}");
        let want = format!("Error: refusing to {what} {listen} without authentication");
        assert!(err.starts_with(&want), "{err}");
        assert!(err.contains("--tls-ca, --tls-cert and --tls-key, or --psk FILE"));
        assert!(err.contains("--insecure"), "{err}");
    }
}

#[test]
fn tls_between_hosts_verifies_every_page() {
    let Some(bed) = two_hosts(5, "1gbit") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (h0, h1) = (bed.addr(0), bed.addr(1));
    let out = common::livemig()
        .arg("certs")
        .arg(dir.path())
        .args(["--hosts", &format!("{h0},{h1}")])
        .output()
        .unwrap();
    assert!(out.status.success());
    let flags = |me: &str, peer: &str| -> Vec<String> {
        let f = |n: &str| dir.path().join(n).to_string_lossy().into_owned();
        let (cert, key) = (f(&format!("{me}.crt")), f(&format!("{me}.key")));
        let mut v = vec!["--tls-ca".into(), f("ca.crt"), "--tls-cert".into(), cert];
        v.extend(["--tls-key".into(), key, "--tls-allow".into(), peer.into()]);
        v
    };
    let (r, s) = (flags(&h1, &h0), flags(&h0, &h1));
    let mut send = strs(&s);
    send.extend(["--mem", "16M", "--workload", "idle", "--warmup", "100ms"]);
    let (sent, received) = bed.migrate_with(&strs(&r), &send);
    assert_eq!(sent["status"], "completed");
    assert_eq!(
        (&sent["transport"], &received["transport"]),
        (&"tls".into(), &"tls".into())
    );
    assert_eq!(received["verified_pages"], 4096);
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}
