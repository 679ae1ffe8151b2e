//! What each dirty tracker costs, in-process over 1 GiB of shared memory: a
//! harvest at 0%, 1% and 100% of pages written since the previous one, and
//! what the tracker adds to a guest's first write to a page in a round (and
//! to a rewrite). Together they say how short a round can be and how much a
//! tracker slows the guest.
//!
//! `cargo bench --bench trackers` (add `-- first_write` etc. to filter).
//! Trackers this kernel lacks (soft-dirty, maybe uffd-wp) are skipped.

use std::os::fd::{AsFd, IntoRawFd};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use livemig::guest::control::Control;
use livemig::guest::dirty::{self, DirtySet, SharedBitmap, Target, Tracker, TrackerKind};
use livemig::guest::memory::SharedRegion;
use livemig::guest::uffd::{Uffd, WP_ASYNC_FEATURES};
use livemig::util::page::PageSize;

/// The page size everything here assumes (checked in [`beds`]).
const PAGE: u64 = 4096;
const PAGES: u64 = (1 << 30) / PAGE;
/// The per-write benches write every `STRIDE`th page, `WRITES` pages in all.
const WRITES: u64 = 4096;
const STRIDE: u64 = 16;

/// 1 GiB of guest memory and its tracker (`None`: untracked).
struct Bed {
    name: &'static str,
    mem: SharedRegion,
    tracker: Option<Box<dyn Tracker>>,
    /// `bitmap`: the guest's own mapping of the bitmap, which it marks.
    marks: Option<SharedBitmap>,
    /// `uffd-wp`: the registration lives as long as the userfaultfd.
    _uffd: Option<Uffd>,
    set: DirtySet,
}

impl Bed {
    fn new(kind: Option<TrackerKind>) -> Bed {
        let mem = SharedRegion::create("bench-guest", PAGES * PAGE).expect("guest memfd");
        let (ptr, len) = (mem.as_ptr(), mem.len());
        let (mut uffd, mut bitmap, mut marks) = (None, None, None);
        let control = Control::create().expect("control memfd");
        match kind {
            None => {}
            Some(TrackerKind::Bitmap) => {
                let bm = SharedBitmap::create(PAGES).expect("bitmap memfd");
                let fd = bm.region().as_fd().try_clone_to_owned().expect("dup");
                let len = bm.region().len() as u64;
                // SAFETY: a fresh duplicate of the bitmap's memfd, owned by nobody else.
                let view = unsafe { SharedRegion::from_raw_fd("marks", fd.into_raw_fd(), len) };
                marks = Some(SharedBitmap::from_region(view.expect("map bitmap"), PAGES));
                bitmap = Some(bm);
            }
            Some(TrackerKind::UffdWp) => {
                let u = Uffd::open(WP_ASYNC_FEATURES).expect("userfaultfd");
                u.register_wp(ptr, len as u64).expect("register");
                uffd = Some(u);
            }
            Some(TrackerKind::Mprotect) => {
                // The handler and its serving thread know one region per
                // process: `beds` makes the only mprotect bed.
                let bm = SharedBitmap::create(PAGES).expect("bitmap memfd");
                // SAFETY: the bed's memory, bitmap and control block live as
                // long as the bench process (beds are never dropped early).
                unsafe { dirty::mprotect::install(ptr, len, &bm, &control) };
                let c = control.clone();
                std::thread::spawn(move || dirty::mprotect::serve(&c));
                bitmap = Some(bm);
            }
            // Reads /proc/self/pagemap and clears with /proc/self/clear_refs.
            Some(TrackerKind::SoftDirty) => {}
        }
        let target = Target {
            pid: std::process::id() as i32,
            addr: ptr as u64,
            pages: PAGES,
            page_size: PageSize::MIN,
        };
        let tracker = kind.map(|k| dirty::open(k, &target, bitmap, &control).expect("tracker"));
        let mut bed = Bed {
            name: kind.map_or("untracked", |k| k.as_str()),
            mem,
            tracker,
            marks,
            _uffd: uffd,
            set: DirtySet::new(PAGES),
        };
        // Fault every page in, so that no bench pays for first-touch
        // allocation; the first harvest arms the tracker.
        bed.write_every(1);
        bed.harvest();
        bed
    }

    /// A guest write to `page`: a u64 store, then the mark for `bitmap`.
    #[inline]
    fn write(&self, page: u64) {
        let at = (page * PAGE + 8) as usize;
        // SAFETY: an 8-aligned u64 inside the 1 GiB mapping (page < PAGES).
        unsafe { self.mem.as_ptr().add(at).cast::<u64>().write_volatile(page) };
        if let Some(m) = &self.marks {
            m.mark(page);
        }
    }

    /// Write every `stride`th page of the 1 GiB.
    fn write_every(&self, stride: u64) {
        (0..PAGES)
            .step_by(stride as usize)
            .for_each(|p| self.write(p));
    }

    /// Harvest into a cleared `set` (untracked: nothing); how long it took.
    fn harvest(&mut self) -> Duration {
        self.set.clear();
        let t = Instant::now();
        if let Some(tr) = &mut self.tracker {
            tr.harvest(&mut self.set, false).expect("harvest");
        }
        t.elapsed()
    }

    /// Total harvest time of `iters` rounds each writing every `stride`th
    /// page (`None`: none) first.
    fn time_harvests(&mut self, stride: Option<u64>, iters: u64) -> Duration {
        (0..iters)
            .map(|_| {
                if let Some(s) = stride {
                    self.write_every(s);
                }
                self.harvest()
            })
            .sum()
    }

    /// Total time of `iters` passes writing the `WRITES` scattered pages,
    /// each pass right after a harvest (`first`) or after a first pass.
    fn time_writes(&mut self, first: bool, iters: u64) -> Duration {
        let pass = |bed: &Bed| (0..WRITES).for_each(|i| bed.write(i * STRIDE));
        if !first {
            self.harvest();
            pass(self);
        }
        let mut timed = Duration::ZERO;
        for _ in 0..iters {
            if first {
                self.harvest();
            }
            let t = Instant::now();
            pass(self);
            timed += t.elapsed();
        }
        timed
    }
}

/// Untracked memory and each tracker this kernel offers, over 1 GiB each.
fn beds() -> Vec<Bed> {
    use TrackerKind::*;
    assert_eq!(PageSize::host().as_u64(), PAGE, "4 KiB pages assumed");
    let mut beds = vec![Bed::new(None)];
    for kind in [Bitmap, UffdWp, Mprotect, SoftDirty] {
        match kind.check_kernel() {
            Ok(()) => beds.push(Bed::new(Some(kind))),
            Err(e) => eprintln!("skipping {}: {e}", kind.as_str()),
        }
    }
    beds
}

fn harvest(c: &mut Criterion, beds: &mut [Bed]) {
    let mut g = c.benchmark_group("harvest_1GiB");
    // Writing 1 GiB between harvests costs far more than the harvest.
    g.sampling_mode(SamplingMode::Flat).sample_size(20);
    for bed in beds.iter_mut().filter(|b| b.tracker.is_some()) {
        for (pct, stride) in [("0%", None), ("1%", Some(100)), ("100%", Some(1))] {
            if let Some(s) = stride {
                bed.write_every(s);
            }
            bed.harvest();
            let found = bed.set.count();
            let want = stride.map_or(0, |s| PAGES.div_ceil(s));
            assert_eq!(found, want, "{}/{pct}", bed.name);
            g.bench_function(format!("{}/{pct}", bed.name), |b| {
                b.iter_custom(|iters| bed.time_harvests(stride, iters))
            });
        }
    }
    g.finish();
}

fn first_write(c: &mut Criterion, beds: &mut [Bed]) {
    let mut g = c.benchmark_group("first_write");
    g.throughput(Throughput::Elements(WRITES));
    for bed in beds.iter_mut() {
        for (variant, first) in [("first", true), ("rewrite", false)] {
            g.bench_function(format!("{}/{variant}", bed.name), |b| {
                b.iter_custom(|iters| bed.time_writes(first, iters))
            });
        }
    }
    g.finish();
}

fn trackers(c: &mut Criterion) {
    let mut beds = beds();
    harvest(c, &mut beds);
    first_write(c, &mut beds);
}

criterion_group!(benches, trackers);
criterion_main!(benches);
