//! What a `uffd-wp` harvest costs per GiB of guest memory, in-process:
//! 256 MiB, 1 GiB and 4 GiB, with nothing written since the previous
//! harvest (an idle guest) and with a 64 MiB hot set written (the default
//! workload's set, all of it), on one thread and split over two, and as the
//! final harvest of a paused guest (no re-protection). Medians of wall time
//! and of CPU time (every thread of this process), in ms per GiB.
//!
//! `cargo bench --bench harvest` (`-- --quick`: 256 MiB and 1 GiB only).
//! Prints one JSON object per line.

use std::time::{Duration, Instant};

use livemig::guest::dirty::pagemap::{Pagemap, UffdWpTracker};
use livemig::guest::dirty::{DirtySet, Tracker, TrackerKind};
use livemig::guest::memory::SharedRegion;
use livemig::guest::uffd::{Uffd, WP_ASYNC_FEATURES};
use livemig::util::page::PageSize;

const HOT_PAGES: u64 = (64 << 20) / 4096;
const SAMPLES: usize = 31;

fn cpu_now() -> Duration {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a timespec to write into.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut t) };
    assert_eq!(rc, 0, "clock_gettime");
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    if let Err(e) = TrackerKind::UffdWp.check_kernel() {
        eprintln!("skipping: {e}");
        return;
    }
    let quick = std::env::args().any(|a| a == "--quick");
    let ps = PageSize::host();
    let sizes: &[u64] = if quick {
        &[256 << 20, 1 << 30]
    } else {
        &[256 << 20, 1 << 30, 4 << 30]
    };
    for &bytes in sizes {
        let pages = ps.pages(bytes);
        let mem = SharedRegion::create("bench-harvest", bytes).expect("memfd");
        let uffd = Uffd::open(WP_ASYNC_FEATURES).expect("userfaultfd");
        uffd.register_wp(mem.as_ptr(), bytes).expect("register");
        let write = |p: u64| {
            // SAFETY: inside the mapping (p < pages).
            unsafe { mem.as_ptr().add(ps.bytes(p) as usize + 8).write_volatile(1) }
        };
        (0..pages).for_each(write);
        let pid = std::process::id() as i32;
        let open = || Pagemap::open(pid, mem.as_ptr() as u64, pages, ps).expect("pagemap");
        let mut set = DirtySet::new(pages);
        for parts in [1usize, 2] {
            let mut tracker = UffdWpTracker::with_parts(open(), parts);
            tracker.harvest(&mut set, false).expect("arm");
            for (load, written) in [("idle", 0), ("hotset64M", HOT_PAGES.min(pages))] {
                for paused in [false, true] {
                    let (mut wall, mut cpu) = (Vec::new(), Vec::new());
                    for _ in 0..SAMPLES {
                        (0..written).for_each(|p| write(p * (pages / written.max(1))));
                        set.clear();
                        let (t, c) = (Instant::now(), cpu_now());
                        tracker.harvest(&mut set, paused).expect("harvest");
                        wall.push(t.elapsed().as_secs_f64() * 1e3);
                        cpu.push((cpu_now() - c).as_secs_f64() * 1e3);
                        assert_eq!(set.count(), written, "every written page found");
                        if paused {
                            // Re-arm what the unprotected scan left written.
                            tracker.harvest(&mut set, false).expect("re-arm");
                        }
                    }
                    let gib = bytes as f64 / (1u64 << 30) as f64;
                    println!(
                        "{{\"mem_mib\":{},\"load\":\"{load}\",\"parts\":{parts},\"paused\":{paused},\"wall_ms_per_gib\":{:.4},\"cpu_ms_per_gib\":{:.4}}}",
                        bytes >> 20,
                        median(wall) / gib,
                        median(cpu) / gib
                    );
                }
            }
        }
    }
}
