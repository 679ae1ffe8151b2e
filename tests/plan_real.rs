//! `livemig plan` for real: every VM a guest, every migration a sender to a
//! `receive --serve`, through each host's launcher. The strategies run over
//! the namespace testbed (root; skipped with the reason elsewhere); the
//! rest over loopback, with hosts whose launcher is this machine.

mod common;

use std::path::{Path, PathBuf};

use common::run;
use common::testbed::Testbed;
use serde_json::Value;

fn f(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or_else(|| panic!("{key} in {v:#}"))
}

fn vms(p: &Value) -> &Vec<Value> {
    p["vms"].as_array().unwrap()
}

fn at<'a>(p: &'a Value, name: &str) -> &'a Value {
    vms(p).iter().find(|v| v["name"] == name).unwrap()
}

/// Two groups of hosts joined by a shaped interlink (`args`), with a name
/// and subnet of this test's own, or None (and why).
fn two_groups(args: &[&str]) -> Option<Testbed> {
    let id = std::process::id() % 10_000;
    Testbed::up(format!("p{id}"), format!("10.120.{}", id % 250), args)
}

impl Testbed {
    /// Host `i` as a plan's `[[host]]`.
    fn host(&self, i: u32, group: &str) -> String {
        format!(
            "[[host]]\nname = \"h{i}\"\nnic = \"1gbit\"\ngroup = \"{group}\"\n\
             address = \"{}\"\nlauncher = \"ip netns exec {}\"\n\n",
            self.addr(i),
            self.ns(i)
        )
    }
}

/// 3 VMs of 16 MiB, two on h0 and one on h1 (group a), to h2 and h3
/// (group b) over one 100 Mbit/s interlink, under each strategy: every
/// migration completes and verifies, each strategy starts them as it says,
/// and the interlink carries every byte.
#[test]
fn a_real_plan_runs_under_each_strategy() {
    let Some(bed) = two_groups(&["--hosts", "4", "--split", "2", "--interlink", "100mbit"]) else {
        return;
    };
    let plan = String::from(
        "[defaults]\nmem = \"16M\"\nworkload = \"hotset:wws=1M,rate=500\"\npolicy = \"qemu\"\n\n",
    ) + &bed.host(0, "a")
        + &bed.host(1, "a")
        + &bed.host(2, "b")
        + &bed.host(3, "b")
        + "[[link]]\nbetween = [\"a\", \"b\"]\nrate = \"100mbit\"\n\n\
           [[vm]]\nname = \"x\"\ncount = 2\nfrom = \"h0\"\nto = \"h2\"\n\n\
           [[vm]]\nname = \"y\"\nfrom = \"h1\"\nto = \"h3\"\n";
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.toml");
    std::fs::write(&file, plan).unwrap();
    let names = ["x-1", "x-2", "y"];
    let plan_run = |strategy: &str| -> Value {
        let out = dir.path().join(strategy.replace(':', "-"));
        let r = run(&[
            "plan",
            file.to_str().unwrap(),
            "--strategy",
            strategy,
            "--warmup",
            "100ms",
            "--no-zero-pages",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(r.ok(), "{strategy}: {}\n{}", r.stderr(), r.stdout());
        assert!(out.join("gantt.svg").exists());
        let csv = std::fs::read_to_string(out.join("plan.csv")).unwrap();
        assert!(csv
            .lines()
            .next()
            .unwrap()
            .ends_with(",guest_rate_before_pps,guest_rate_during_pps"));
        assert_eq!(csv.lines().count(), 4, "{csv}");
        let p = r.report().clone();
        assert_eq!(p["simulated"], false);
        assert_eq!(p["failed"], 0, "{p:#}");
        for v in vms(&p) {
            assert_eq!(v["status"], "completed", "{strategy}: {v:#}");
            assert_eq!(v["mismatched_pages"], 0);
            assert_eq!(v["verified_pages"], 16 << 20 >> 12);
            assert!(f(v, "guest_dirty_rate_pps") > 0.0, "{v:#}");
            assert!(v["guest_rate_precopy_pps"].is_number(), "{v:#}");
            assert!(f(v, "end_ms") > f(v, "start_ms"));
        }
        // Everything crossed the interlink one way; each NIC out carried
        // its own VMs' bytes.
        let sent: u64 = vms(&p)
            .iter()
            .map(|v| v["transferred_bytes"].as_u64().unwrap())
            .sum();
        let links = p["links"].as_array().unwrap();
        let link = |n: &str| links.iter().find(|l| l["link"] == n).map(|l| &l["bytes"]);
        assert_eq!(link("a->b").and_then(Value::as_u64), Some(sent));
        assert_eq!(link("b->a"), None);
        assert_eq!(
            link("h1 out").and_then(Value::as_u64),
            at(&p, "y")["transferred_bytes"].as_u64()
        );
        p
    };
    let overlap = |p: &Value, a: &str, b: &str| {
        let (a, b) = (at(p, a), at(p, b));
        f(a, "start_ms") < f(b, "end_ms") && f(b, "start_ms") < f(a, "end_ms")
    };
    // Sequential: one at a time, in the plan's order.
    let seq = plan_run("sequential");
    for w in names.windows(2) {
        assert!(f(at(&seq, w[1]), "start_ms") >= f(at(&seq, w[0]), "end_ms"));
    }
    // Parallel: all three under way together.
    let par = plan_run("parallel");
    let first_end = vms(&par)
        .iter()
        .map(|v| f(v, "end_ms"))
        .fold(f64::MAX, f64::min);
    assert!(vms(&par).iter().all(|v| f(v, "start_ms") < first_end));
    // Batch 2: the first two together, the third once one has ended.
    let batch = plan_run("batch:2");
    assert!(overlap(&batch, "x-1", "x-2"));
    let ended = f(at(&batch, "x-1"), "end_ms").min(f(at(&batch, "x-2"), "end_ms"));
    assert!(f(at(&batch, "y"), "start_ms") >= ended);
    // Per host: h0's two together, then h1's once h0 is empty.
    let host = plan_run("per-host:1");
    assert!(overlap(&host, "x-1", "x-2"));
    let h0_done = f(at(&host, "x-1"), "end_ms").max(f(at(&host, "x-2"), "end_ms"));
    assert!(f(at(&host, "y"), "start_ms") >= h0_done);
    // Auto: a level chosen from predictions, run for real.
    let auto = plan_run("auto");
    assert!(auto["strategy"]
        .as_str()
        .unwrap()
        .starts_with("auto (batch:"));
}

/// A plan on loopback: `hosts` then VMs `vms`, 16 MiB each.
fn loopback_plan(dir: &Path, hosts: &str, vms: &str) -> PathBuf {
    let file = dir.join("p.toml");
    let text = String::from(
        "[defaults]\nmem = \"16M\"\nworkload = \"hotset:wws=1M,rate=500\"\n\n\
         [[host]]\nname = \"src\"\nnic = \"1gbit\"\n\n\
         [[host]]\nname = \"dst\"\nnic = \"1gbit\"\n\n",
    ) + hosts
        + vms;
    std::fs::write(&file, text).unwrap();
    file
}

/// Three migrations in parallel to one host: its `receive --serve` takes
/// them at once. Paced so each lasts a while, none waits for another: each
/// one's handshake was answered before any migration ended.
#[test]
fn one_serving_receiver_takes_several_migrations_at_once() {
    let r = run(&[
        "plan",
        "--vms",
        "3",
        "--mem",
        "16M",
        "--workload",
        "idle",
        "--no-zero-pages",
        "--bandwidth",
        "100mbit",
        "--warmup",
        "50ms",
        "--strategy",
        "parallel",
    ]);
    assert!(r.ok(), "{}", r.stderr());
    let p = r.report();
    assert_eq!(p["failed"], 0, "{p:#}");
    let shortest = vms(p)
        .iter()
        .map(|v| f(v, "duration_ms"))
        .fold(f64::MAX, f64::min);
    for v in vms(p) {
        assert_eq!(v["status"], "completed");
        assert_eq!(v["mismatched_pages"], 0);
        // Served one after another, a later sender's handshake would have
        // waited for an earlier migration's whole length.
        assert!(
            f(v, "setup_time_ms") < shortest / 2.0,
            "{} waited {} ms to be answered; the shortest migration took {shortest} ms",
            v["name"],
            f(v, "setup_time_ms")
        );
    }
}

/// A VM whose destination takes its connection and drops it fails alone:
/// the others complete, the report says which failed and why, its source
/// guest had been resumed, and the exit status is non-zero.
#[test]
fn a_vm_whose_destination_refuses_fails_alone() {
    let dir = tempfile::tempdir().unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            drop(s);
        }
    });
    let file = loopback_plan(
        dir.path(),
        &format!(
            "[[host]]\nname = \"bad\"\nnic = \"1gbit\"\naddress = \"{addr}\"\nstart_receiver = false\n\n"
        ),
        "[[vm]]\nname = \"a\"\nfrom = \"src\"\nto = \"dst\"\n\n\
         [[vm]]\nname = \"b\"\nfrom = \"src\"\nto = \"bad\"\n\n\
         [[vm]]\nname = \"c\"\nfrom = \"src\"\nto = \"dst\"\n",
    );
    let r = run(&[
        "plan",
        file.to_str().unwrap(),
        "--strategy",
        "sequential",
        "--warmup",
        "50ms",
    ]);
    r.assert_fails_with(&["1 of 3 migrations failed"]);
    let p = r.report();
    assert_eq!(p["failed"], 1);
    let b = at(p, "b");
    assert_eq!(b["status"], "failed");
    assert!(!b["error"].as_str().unwrap().is_empty(), "{b:#}");
    assert_eq!(b["source_guest_kept_running"], true, "{b:#}");
    for name in ["a", "c"] {
        assert_eq!(at(p, name)["status"], "completed");
    }
    assert!(f(at(p, "c"), "start_ms") >= f(b, "end_ms"));
    assert!(r.stdout().contains("failed: "), "{}", r.stdout());
}

/// A host whose launcher cannot run livemig: one line naming it, before
/// any guest starts.
#[test]
fn bad_launchers_get_one_line_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let vm = "[[vm]]\nname = \"a\"\nfrom = \"src\"\nto = \"far\"\n";
    let cases = [
        (
            "[[host]]\nname = \"far\"\nnic = \"1gbit\"\nlauncher = \"/nonexistent/launcher\"\n\n",
            &["host \"far\"", "/nonexistent/launcher"][..],
        ),
        (
            "[[host]]\nname = \"far\"\nnic = \"1gbit\"\nlauncher = \"false\"\n\n",
            &["host \"far\"", "launcher \"false\""][..],
        ),
        (
            "[[host]]\nname = \"far\"\nnic = \"1gbit\"\naddress = \"127.0.0.1\"\nstart_receiver = false\n\n",
            &["host \"far\"", "port"][..],
        ),
    ];
    for (host, needles) in cases {
        let file = loopback_plan(dir.path(), host, vm);
        let r = run(&["plan", file.to_str().unwrap()]);
        r.assert_fails_with(needles);
        assert!(r.report.is_none(), "nothing ran, so no report");
    }
}
