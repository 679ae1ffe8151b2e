//! `livemig plan --simulate`: strategies over a shared link, the plan
//! report, and a plan file's bad input.

mod common;

use common::run;
use serde_json::Value;

/// 3 VMs of 64 MiB whose 4 MiB hot set one 100 Mbit/s link drains alone
/// but not shared three ways.
fn plan(strategy: &str) -> Value {
    let r = run(&[
        "plan",
        "--simulate",
        "--vms",
        "3",
        "--mem",
        "64M",
        "--workload",
        "hotset:wws=4M,rate=1500",
        "--link",
        "100mbit",
        "--policy",
        "threshold",
        "--max-time",
        "60s",
        "--strategy",
        strategy,
    ]);
    assert!(r.ok(), "{strategy}: {}", r.stderr());
    r.report().clone()
}

fn f(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or_else(|| panic!("{key} in {v:#}"))
}

#[test]
fn strategies_trade_completion_for_each_migrations_time() {
    let (seq, batch, par) = (plan("sequential"), plan("batch:2"), plan("parallel"));
    for p in [&seq, &batch, &par] {
        assert_eq!(p["simulated"], true);
        let vms = p["vms"].as_array().unwrap();
        assert_eq!(vms.len(), 3);
        for v in vms {
            assert_eq!(v["status"], "completed", "{v:#}");
            let d = f(v, "end_ms") - f(v, "start_ms");
            assert!((f(v, "duration_ms") - d).abs() < 1e-6);
        }
        let end = vms.iter().map(|v| f(v, "end_ms")).fold(0.0, f64::max);
        assert!((f(p, "completion_time_ms") - end).abs() < 1e-6);
    }
    // Sequential: each starts when the one before ends.
    let vms = seq["vms"].as_array().unwrap();
    for w in vms.windows(2) {
        assert!((f(&w[1], "start_ms") - f(&w[0], "end_ms")).abs() < 1e-6);
    }
    // Parallel: all at once, each slower, none converging on a third of the link.
    assert!(par["vms"]
        .as_array()
        .unwrap()
        .iter()
        .all(|v| f(v, "start_ms") == 0.0));
    assert_eq!(par["not_converged"].as_array().unwrap().len(), 3, "{par:#}");
    assert!(seq["not_converged"].as_array().unwrap().is_empty());
    let mean = |p: &Value| f(p, "mean_duration_ms");
    assert!(
        mean(&par) > 2.0 * mean(&batch),
        "{} vs {}",
        mean(&par),
        mean(&batch)
    );
    assert!(mean(&batch) > mean(&seq));
    // Auto picks a level where all converge, no slower on average than sequential.
    let auto = plan("auto");
    assert!(
        auto["not_converged"].as_array().unwrap().is_empty(),
        "{auto:#}"
    );
    assert!(mean(&auto) <= mean(&seq) * 1.1, "{auto:#}");
    assert!(auto["strategy"]
        .as_str()
        .unwrap()
        .starts_with("auto (batch:"));
}

#[test]
fn per_host_frees_one_host_after_another_through_an_interlink() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.toml");
    std::fs::write(&file, PLAN).unwrap();
    let r = run(&[
        "plan",
        file.to_str().unwrap(),
        "--simulate",
        "--strategy",
        "per-host:1",
    ]);
    assert!(r.ok(), "{}", r.stderr());
    let p = r.report();
    let vms = p["vms"].as_array().unwrap();
    let at = |name: &str| vms.iter().find(|v| v["name"] == name).unwrap();
    // a1's two VMs together, then a2's once a1 is empty.
    assert_eq!(f(at("x-1"), "start_ms"), 0.0);
    assert_eq!(f(at("x-2"), "start_ms"), 0.0);
    let a1_done = f(at("x-1"), "end_ms").max(f(at("x-2"), "end_ms"));
    assert!((f(at("y"), "start_ms") - a1_done).abs() < 1e-6, "{p:#}");
    // Everything crossed the interlink, and only one way.
    let links = p["links"].as_array().unwrap();
    let link = |n: &str| {
        links
            .iter()
            .find(|l| l["link"] == n)
            .map(|l| l["bytes"].as_u64().unwrap())
    };
    let sent: u64 = vms
        .iter()
        .map(|v| v["transferred_bytes"].as_u64().unwrap())
        .sum();
    let crossed = link("r1->r2").unwrap();
    assert!(crossed.abs_diff(sent) < sent / 100, "{crossed} vs {sent}");
    assert_eq!(link("r2->r1"), None);
}

const PLAN: &str = r#"
[defaults]
mem = "32M"
workload = "hotset:wws=2M,rate=1k"
[[host]]
name = "a1"
nic = "1gbit"
group = "r1"
[[host]]
name = "a2"
nic = "1gbit"
group = "r1"
[[host]]
name = "b"
nic = "1gbit"
group = "r2"
[[link]]
between = ["r1", "r2"]
rate = "500mbit"
[[vm]]
name = "x"
count = 2
from = "a1"
to = "b"
[[vm]]
name = "y"
from = "a2"
to = "b"
"#;

#[test]
fn bad_plans_get_one_line_each() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            PLAN.replace("to = \"b\"\n[[vm]]", "to = \"c\"\n[[vm]]"),
            "unknown host \"c\"",
        ),
        (
            PLAN.replace("between = [\"r1\", \"r2\"]", "between = [\"r1\", \"r3\"]"),
            "unknown group \"r3\"",
        ),
        (
            PLAN.replace("rate = \"500mbit\"", "rate = \"0\""),
            "link r1-r2",
        ),
        (
            PLAN.replace(
                "name = \"b\"\nnic = \"1gbit\"",
                "name = \"b\"\nnic = \"1gbit\"\nmemory = \"64M\"",
            ),
            "can hold 64.0 MiB",
        ),
        (
            PLAN.replace("name = \"y\"", "name = \"y\"\nafter = [\"z\"]")
                + "[[vm]]\nname = \"z\"\nfrom = \"a2\"\nto = \"b\"\nafter = [\"y\"]\n",
            "cycle",
        ),
        (PLAN.split("[[vm]]").next().unwrap().to_string(), "no VMs"),
        (
            PLAN.replace(
                "[[link]]\nbetween = [\"r1\", \"r2\"]\nrate = \"500mbit\"",
                "",
            ),
            "no link joins them",
        ),
        (
            PLAN.replace("mem = \"32M\"", "mem = \"32Q\""),
            "mem = \"32Q\"",
        ),
        (
            PLAN.replace(
                "nic = \"1gbit\"\ngroup = \"r1\"",
                "nic = \"1gbit\"\ngroup = \"r1\"\ncolour = 1",
            ),
            "unknown field `colour`",
        ),
    ];
    for (k, (text, needle)) in cases.iter().enumerate() {
        let file = dir.path().join(format!("{k}.toml"));
        std::fs::write(&file, text).unwrap();
        let r = run(&["plan", file.to_str().unwrap(), "--simulate"]);
        r.assert_fails_with(&[needle]);
    }
    let r = run(&["plan", "/nonexistent/plan.toml", "--simulate"]);
    r.assert_fails_with(&["/nonexistent/plan.toml"]);
}

/// `receive --serve` takes migrations one after another, each into a guest
/// of its own, a failed one included, until SIGINT; one JSON line each.
#[test]
fn a_serving_receiver_takes_migration_after_migration() {
    use std::ffi::OsStr;
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("served.jsonl");
    let args = [
        OsStr::new("--serve"),
        OsStr::new("--json"),
        json.as_os_str(),
    ];
    let (mut rx, addr) = common::receiver(&args, &[]);
    let send = |extra: &[&str]| {
        let mut a = vec![
            "send",
            "--to",
            &addr,
            "--mem",
            "16M",
            "--workload",
            "idle",
            "--warmup",
            "10ms",
        ];
        a.extend_from_slice(extra);
        common::livemig().args(&a).output().unwrap()
    };
    assert!(send(&[]).status.success());
    // A sender that gives up mid-handshake: one failed migration, and the
    // service goes on.
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    std::io::Write::write_all(&mut s, b"LIVEMIG\0garbage").unwrap();
    drop(s);
    assert!(send(&["--streams", "2"]).status.success());
    common::wait_until("both migrations reported", || {
        let text = std::fs::read_to_string(&json).ok()?;
        (text.lines().count() == 3).then_some(())
    });
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(rx.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    assert!(rx.wait().unwrap().success());
    let mut reports: Vec<Value> = std::fs::read_to_string(&json)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // Written as they end; numbered as they were accepted.
    reports.sort_by_key(|r| r["served"].as_u64().unwrap());
    let served: Vec<u64> = reports
        .iter()
        .map(|r| r["served"].as_u64().unwrap())
        .collect();
    assert_eq!(served, [1, 2, 3]);
    let status: Vec<&str> = reports
        .iter()
        .map(|r| r["status"].as_str().unwrap())
        .collect();
    assert_eq!(status, ["completed", "failed", "completed"]);
    assert_eq!(reports[2]["streams"], 2);
    let pids: Vec<i64> = [&reports[0], &reports[2]]
        .iter()
        .map(|r| r["destination_guest_pid"].as_i64().unwrap())
        .collect();
    assert_ne!(pids[0], pids[1], "a guest of its own each");
}

/// A migration that fails mid-plan fails alone: the next one starts, the
/// report names the failure, and the exit status is non-zero.
#[test]
fn a_failed_migration_fails_alone() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.toml");
    // `max` cannot be predicted: the middle VM fails at once.
    let text = PLAN.replace(
        "name = \"y\"",
        "name = \"y\"\nworkload = \"uniform:rate=max\"",
    ) + "[[vm]]\nname = \"z\"\nfrom = \"a2\"\nto = \"b\"\n";
    std::fs::write(&file, text).unwrap();
    let r = run(&[
        "plan",
        file.to_str().unwrap(),
        "--simulate",
        "--strategy",
        "sequential",
    ]);
    r.assert_fails_with(&["1 of 4 migrations failed"]);
    let p = r.report();
    assert_eq!(p["failed"], 1);
    let vms = p["vms"].as_array().unwrap();
    let y = vms.iter().find(|v| v["name"] == "y").unwrap();
    assert_eq!(y["status"], "failed");
    assert!(
        y["error"].as_str().unwrap().contains("numeric rate"),
        "{y:#}"
    );
    let z = vms.iter().find(|v| v["name"] == "z").unwrap();
    assert_eq!(z["status"], "completed");
    assert!((f(z, "start_ms") - f(y, "end_ms")).abs() < 1e-6);
}
