//! Every tracker against a ground-truth log of the guest's writes.
//!
//! A real guest process runs a deterministic write stream. Between two
//! harvests taken while its vCPUs are parked, the pages it wrote are known
//! exactly: replay each vCPU's stream from its op counter at the first park
//! to its counter at the second. The harvests in between, taken while it
//! writes, and the last one must report exactly those pages, together.

use std::sync::atomic::Ordering;
use std::time::Duration;

mod common;
use common::available_trackers;

use livemig::guest::control::Control;
use livemig::guest::dirty::{self, DirtySet, SharedBitmap, Target, TrackerKind};
use livemig::guest::memory::GuestMemory;
use livemig::guest::process::{Fresh, Guest, VcpuState, BATCH};
use livemig::guest::workload::{Layout, Stream, Workload};
use livemig::util::page::PageSize;
use livemig::util::skip::cannot_run;

/// Pages vCPUs write going from states `from` to `to`, and among them those
/// of the writes from op `late[vcpu]` on.
fn replay(
    w: &Layout,
    from: &[VcpuState],
    to: &[VcpuState],
    late: &[u64],
    pages: u64,
) -> (DirtySet, DirtySet) {
    let (mut all, mut after) = (DirtySet::new(pages), DirtySet::new(pages));
    let vcpus = from.len() as u32;
    for (id, (a, b)) in from.iter().zip(to).enumerate() {
        let mut s = Stream::new(w, id as u32, vcpus, a.seed, a.ops, Some(a.cursor));
        while s.ops < b.ops {
            let op = s.ops;
            let page = s.next(w).page();
            all.set(page);
            if op >= late[id] {
                after.set(page);
            }
        }
    }
    (all, after)
}

fn ground_truth(kind: TrackerKind, spec: &str, vcpus: u32) {
    std::env::set_var("LIVEMIG_EXE", env!("CARGO_BIN_EXE_livemig"));
    let ps = PageSize::host();
    let mem = GuestMemory::create(8 << 20, ps).unwrap();
    let pages = mem.page_count();
    let bitmap = kind
        .uses_bitmap()
        .then(|| SharedBitmap::create(pages).unwrap());
    let control = Control::create().unwrap();
    let fresh = Fresh {
        workload: spec.parse().unwrap(),
        vcpus,
        seed: 42,
        disk: None,
    };
    let mut guest =
        Guest::spawn(&mem, control.clone(), bitmap.as_ref(), kind, Some(&fresh)).unwrap();
    guest.wait_running().unwrap();
    let target = Target {
        pid: guest.pid(),
        addr: guest.mem_addr(),
        pages,
        page_size: ps,
    };
    let mut tracker = dirty::open(kind, &target, bitmap, &control).unwrap();
    let w = spec
        .parse::<Workload>()
        .unwrap()
        .layout(mem.len(), ps)
        .unwrap();
    let mut scratch = DirtySet::new(pages);
    let (mut checked, mut extra) = (0, 0);
    for i in 0..20 {
        guest.park().unwrap();
        scratch.clear();
        tracker.harvest(&mut scratch, false).unwrap();
        let from = guest.vcpu_states();
        guest.unpark();
        // Harvests while the guest writes (0 to 3 of them), then one with
        // its vCPUs parked: together they must cover the interval, and the
        // last one every write made after the one before it returned (ops
        // are published a batch at a time, so count from a batch later).
        let mut got = DirtySet::new(pages);
        let mut late: Vec<u64> = from.iter().map(|s| s.ops).collect();
        for _ in 0..i % 4 {
            std::thread::sleep(Duration::from_millis(1 + i % 3));
            tracker.harvest(&mut got, false).unwrap();
            late = guest.vcpu_states().iter().map(|s| s.ops + BATCH).collect();
        }
        std::thread::sleep(Duration::from_millis(1 + i % 7));
        guest.park().unwrap();
        let mut last = DirtySet::new(pages);
        tracker.harvest(&mut last, false).unwrap();
        got.union(&last);
        let to = guest.vcpu_states();
        guest.unpark();
        let (want, want_last) = replay(&w, &from, &to, &late, pages);
        for (name, want, got) in [
            ("the interval", &want, &got),
            ("the last harvest", &want_last, &last),
        ] {
            let missed: Vec<u64> = (0..pages)
                .filter(|&p| want.contains(p) && !got.contains(p))
                .take(5)
                .collect();
            assert!(
                missed.is_empty(),
                "{kind:?} {spec}: pages written in {name} not reported: {missed:?}"
            );
        }
        extra += got.count() - want.count();
        checked += want.count();
    }
    // mprotect may over-report only when it coalesces (not at this size).
    assert_eq!(extra, 0, "{kind:?} {spec}: reported pages nobody wrote");
    assert!(
        checked > 1000,
        "{kind:?} {spec}: too few writes checked ({checked})"
    );
    guest.check_alive().unwrap();
}

#[test]
fn every_tracker_reports_every_written_page() {
    for kind in available_trackers() {
        for (spec, vcpus) in [
            ("uniform:rate=200k", 2),
            ("hotset:wws=1M,rate=max", 1),
            ("sweep:from=0,to=8M,rate=500k", 2),
        ] {
            ground_truth(kind, spec, vcpus);
        }
    }
}

/// `mprotect` past `vm.max_map_count`: write every other page of a region,
/// so each unprotected page splits a VMA, until single pages no longer fit
/// and the handler unprotects whole blocks. No write may go unreported.
/// (In this test process, like in a guest: the handler is process-wide.)
#[test]
fn mprotect_coalesces_when_vm_max_map_count_runs_out() {
    let max_maps: u64 = std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    if max_maps > 300_000 {
        // CI's machine has the default 65530: there it runs, or fails.
        return cannot_run(format_args!(
            "vm.max_map_count is {max_maps}: exhausting it needs more memory than a test should take"
        ));
    }
    let ps = PageSize::host();
    // Every other page written: about max_maps / 2 writes split the VMA
    // into max_maps maps; go 20% past that.
    let pages = max_maps * 12 / 10;
    let mem = GuestMemory::create(ps.bytes(pages), ps).unwrap();
    let bitmap = SharedBitmap::create(pages).unwrap();
    let control = Control::create().unwrap();
    // SAFETY: the region, bitmap and control block live until the process ends.
    unsafe {
        dirty::mprotect::install(mem.region().as_ptr(), mem.len() as usize, &bitmap, &control)
    };
    let server = control.clone();
    std::thread::spawn(move || dirty::mprotect::serve(&server));
    let target = Target {
        pid: std::process::id() as i32,
        addr: mem.region().as_ptr() as u64,
        pages,
        page_size: ps,
    };
    let mut tracker = dirty::open(TrackerKind::Mprotect, &target, Some(bitmap), &control).unwrap();
    let mut got = DirtySet::new(pages);
    tracker.harvest(&mut got, false).unwrap();
    got.clear();
    let written: Vec<u64> = (0..pages).step_by(2).collect();
    for &p in &written {
        let (ptr, _) = mem.pages_ptr(p, 1);
        // SAFETY: a page of the mapping this test owns.
        unsafe { ptr.add(16).cast::<u64>().write_volatile(p) };
    }
    tracker.harvest(&mut got, false).unwrap();
    let b = control.block();
    let coalesced = b
        .tracker_coalesced
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        coalesced > 0,
        "never ran out of maps (max_map_count {max_maps})"
    );
    let missed = written.iter().filter(|&&p| !got.contains(p)).count();
    assert_eq!(missed, 0, "written pages not reported");
    // Re-protected as one VMA again: the next round starts with no splits.
    let mut next = DirtySet::new(pages);
    for &p in written.iter().take(10) {
        let (ptr, _) = mem.pages_ptr(p, 1);
        // SAFETY: as above.
        unsafe { ptr.add(24).cast::<u64>().write_volatile(p) };
    }
    tracker.harvest(&mut next, false).unwrap();
    assert_eq!(next.count(), 10);
}

/// `livemig dirtyrate` against a guest whose working set is known: a sweep
/// over 4096 pages writes each page once per pass (410 ms at 10k pages/s),
/// so a window shorter than a pass (30 ms and 100 ms, even if a late
/// harvest stretches one fourfold) holds as many distinct pages as the
/// guest wrote in it, and a 1 s window holds all 4096, whatever the
/// tracker. The windows are checked against the guest's own write counter
/// over the same run, not against the nominal rate, so a guest or harvester
/// slowed by a loaded machine cannot flip them.
#[test]
fn dirtyrate_measures_a_known_working_set() {
    for kind in available_trackers() {
        let r = common::run(&[
            "dirtyrate",
            "--quiet",
            "--mem",
            "16M",
            "--workload",
            "sweep:from=0,to=16M,rate=10k",
            "--tracker",
            kind.as_str(),
            "--warmup",
            "200ms",
            "--duration",
            "1100ms",
        ]);
        assert!(r.ok(), "{}", r.stderr());
        let rep = r.report();
        assert_eq!(rep["tracker"], kind.as_str());
        let f = |v: &serde_json::Value| v.as_f64().unwrap_or_else(|| panic!("{rep:#}"));
        let w = |i: usize, key: &str| f(&rep["windows"][i][key]);
        // The guest's own count of its tracked writes per second. Pacing
        // never runs ahead of 10k/s but to catch up a backlog (at most
        // 200 ms of writes). How far behind a starved guest falls depends
        // on the machine, so below only a guest that barely ran fails.
        let g = f(&rep["guest_rate_tracked_pps"]);
        let secs = f(&rep["duration_ms"]) / 1e3;
        assert!(
            g <= 10_000.0 + (2_000.0 + 64.0) / secs && g >= 2_000.0,
            "{kind:?} guest rate {g}"
        );
        // Windows shorter than a pass: distinct pages per second of window
        // (its measured length, not its nominal one) are the guest's
        // writes per second. They cover all of the run but its last 30 ms
        // at most, so they agree with the guest's count within 5 %.
        for (i, name) in [(0, "30 ms"), (1, "100 ms")] {
            let rate = w(i, "dirty_rate_pps");
            assert!(
                (rate - g).abs() <= 0.05 * g,
                "{kind:?} {name} windows: {rate} pages/s, guest wrote {g}/s: {rep:#}"
            );
        }
        // A 1 s window holds a whole pass, and lasts at least 1 s (ticks
        // keep an absolute schedule) and at most the run.
        assert_eq!(w(2, "wws_pages_mean"), 4096.0, "{kind:?} 1 s");
        let rate = f(&rep["dirty_rate_pps"]);
        let windows = w(2, "samples");
        assert!(
            rate <= 4096.0 * 1.000_001 && rate >= 4096.0 * windows / secs,
            "{rep}"
        );
    }
}

/// `livemig run` keeps a guest running; `dirtyrate --pid` measures it from
/// outside, one harvester at a time; an interrupt stops both.
#[test]
fn dirtyrate_attaches_to_a_running_guest_one_harvester_at_a_time() {
    use std::io::{BufRead, BufReader};
    if let Err(e) = TrackerKind::UffdWp.check_kernel() {
        return cannot_run(format_args!("attaching needs uffd-wp: {e}"));
    }
    /// `livemig run`, stopped (guest and all) however the test ends.
    struct Running(std::process::Child);
    impl Drop for Running {
        fn drop(&mut self) {
            if let Ok(None) = self.0.try_wait() {
                let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
                let _ = self.0.wait();
            }
        }
    }
    let run = common::livemig()
        .args([
            "run",
            "--mem",
            "16M",
            "--workload",
            "uniform:rate=20k",
            "--tracker",
            "uffd-wp",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut run = Running(run);
    let mut line = String::new();
    BufReader::new(run.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let pid = line.split_whitespace().nth(1).unwrap().to_string();
    let measure = |warmup: &str, duration: &str| {
        let args = [
            "dirtyrate",
            "--quiet",
            "--pid",
            &pid,
            "--warmup",
            warmup,
            "--duration",
            duration,
        ];
        common::run(&args)
    };
    let found = livemig::guest::find::find(pid.parse().unwrap()).unwrap();
    let owner = || found.control.block().owner.load(Ordering::SeqCst);
    let long = std::thread::scope(|s| {
        let long = s.spawn(|| measure("0s", "1500ms"));
        // Once the first measurement holds the claim (not after a guess at
        // how long it takes to get there), a second one is refused.
        let holder = common::wait_until("the first measurement's claim", || {
            Some(owner()).filter(|&o| o != 0)
        });
        measure("100ms", "200ms").assert_fails_with(&[
            "tracked by process",
            &holder.to_string(),
            "steal",
        ]);
        long.join().unwrap()
    });
    let r = long;
    assert!(r.ok(), "{}", r.stderr());
    let rep = r.report();
    assert_eq!(rep["pid"].to_string(), pid);
    assert_eq!(rep["workload"], "uniform:rate=20k");
    // Paced at 20k/s: never ahead but to catch up (at most 200 ms of
    // writes); behind only on a starved machine.
    let rate = rep["guest_rate_tracked_pps"].as_f64().unwrap();
    let secs = rep["duration_ms"].as_f64().unwrap() / 1e3;
    assert!(
        rate <= 20_000.0 + 4_064.0 / secs && rate > 2_000.0,
        "{rate}"
    );
    // Uniform over 4096 pages: a window of at least 1 s holds at least the
    // distinct pages that many writes are expected to reach.
    let expected = 4096.0 * (1.0 - (-rate / 4096.0).exp());
    assert!(
        rep["windows"][2]["wws_pages_mean"].as_f64().unwrap() > 0.97 * expected,
        "{rep}"
    );
    // The owner maps the guest's memfds too; it is pointed at its guest.
    let run_pid = run.0.id();
    common::run(&["dirtyrate", "--quiet", "--pid", &run_pid.to_string()]).assert_fails_with(&[
        &format!("--pid {run_pid}"),
        &format!("runs guest {pid}: attach to process {pid} instead"),
    ]);
    // The guest did not inherit run's blocked SIGINT/SIGTERM.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(status.contains("SigBlk:\t0000000000000000"), "{status}");
    // The claim was given back: a second measurement may run now.
    assert!(measure("100ms", "100ms").ok());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(run_pid as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    assert!(run.0.wait().unwrap().success());
    let guest: i32 = pid.parse().unwrap();
    common::wait_until(&format!("guest {guest} to end with livemig run"), || {
        livemig::util::process::process_gone(guest).then_some(())
    });
}
