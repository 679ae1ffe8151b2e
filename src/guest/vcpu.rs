//! The guest's vCPU threads: each one writes its workload's stream into
//! guest memory at the workload's rate, marks what it wrote when the
//! `bitmap` tracker is in use, and parks at a safe point when its owner asks
//! (between complete write-then-mark operations: see [`crate::guest::dirty`]).
//! At the same safe points it obeys the owner's throttle ([`Throttle`]) and
//! an in-guest CPU cap, and a `phases` workload switches phase by the
//! vCPU's guest clock; a `compute` workload runs its arithmetic in chunks
//! between them. Before they start, a fresh guest stamps every page
//! ([`crate::guest::prepare::stamp`]).

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::time::{Duration, Instant};

use crate::guest::control::{Control, Throttle};
use crate::guest::dirty::SharedBitmap;
use crate::guest::memory::GuestMemory;
use crate::guest::workload::{compute, fill_word, Layout, Pattern, Stream, Write};

/// A vCPU that falls further behind its schedule than this stops trying to
/// catch up (it cannot reach the rate; the achieved rate is reported).
const MAX_BACKLOG: Duration = Duration::from_millis(200);
/// Writes between two looks at the pause flag (and between publications of
/// a vCPU's write counter).
pub const BATCH: u64 = 64;
/// QEMU's throttle timeslice: a vCPU throttled at `pct` sleeps
/// `pct/(100-pct)` of each slice it runs, so it runs `100-pct` % of the time.
pub const THROTTLE_SLICE: Duration = Duration::from_millis(10);

/// The seed of vCPU `i`'s write stream in a guest seeded with `seed`.
pub fn vcpu_seed(seed: u64, i: u32) -> u64 {
    seed ^ u64::from(i).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// One vCPU's view of the guest: what its thread writes, marks and obeys.
pub(super) struct Vcpu<'a> {
    pub mem: &'a GuestMemory,
    pub control: &'a Control,
    /// The `bitmap` tracker's marks (None: another tracker, or untracked).
    pub bitmap: Option<&'a SharedBitmap>,
    pub workload: &'a Layout,
    pub vcpus: u32,
    /// Continue from the cursors in the control block (an incoming guest).
    pub resume: bool,
}

impl Vcpu<'_> {
    /// Run vCPU `id` until the process ends: write, mark, park when asked.
    pub fn run(&self, id: u32) {
        let slot = &self.control.block().slots[id as usize];
        let cursor = self.resume.then(|| slot.cursor.load(Ordering::Relaxed));
        let (seed, ops) = (
            slot.seed.load(Ordering::Relaxed),
            slot.ops.load(Ordering::Relaxed),
        );
        let mut clock = Clock::at(slot.clock_us.load(Ordering::Relaxed));
        // The phase writing now (the whole workload unless it has phases).
        let (mut layout, mut left) = self.workload.at(clock.now());
        let mut stream = Stream::new(layout, id, self.vcpus, seed, ops, cursor);
        let mut work = slot.work_ops.load(Ordering::Relaxed);
        let mut kernel = compute::Kernel::default();
        self.control.mark_running();
        let (mut t0, mut base) = (Instant::now(), stream.ops);
        let mut throttled = Throttled::new(Throttle::Off, stream.ops);
        loop {
            // The safe point: no write is between its store and its mark here.
            if self.control.pause_requested() {
                let now = clock.now();
                slot.work_ops.store(work, Ordering::Relaxed);
                slot.clock_us.store(micros(now), Ordering::Relaxed);
                self.control.park(id as usize, stream.ops, stream.cursor);
                // Parked time is not guest time.
                clock = Clock::at(micros(now));
                (t0, base) = (Instant::now(), stream.ops);
                continue;
            }
            if self.workload.is_phased() {
                let now = clock.now();
                slot.clock_us.store(micros(now), Ordering::Relaxed);
                let (phase, phase_left) = self.workload.at(now);
                if !std::ptr::eq(phase, layout) {
                    layout = phase;
                    stream.enter(layout);
                    (t0, base) = (Instant::now(), stream.ops);
                }
                left = phase_left;
            }
            // Sleeps end at the phase's end, to switch on time.
            let nap = |d: Duration| {
                let d = d.min(Duration::from_millis(100));
                self.control
                    .sleep_unless_paused(left.map_or(d, |l| d.min(l)));
            };
            if layout.is_idle() {
                nap(Duration::MAX);
                continue;
            }
            // Throttled time is lost, not caught up on afterwards: the
            // schedule stands still while the vCPU sleeps.
            if let Some(slept) = throttled.obey(self.control, self.vcpus, stream.ops) {
                slot.throttled_ns
                    .fetch_add(slept.as_nanos() as u64, Ordering::Relaxed);
                t0 += slept;
                continue;
            }
            if let Pattern::Compute { ops: every, .. } = layout.pattern {
                // Arithmetic in chunks, one write each `every` operations.
                let n = (every - work % every).min(compute::CHUNK);
                kernel.run(n);
                work += n;
                slot.work_ops.store(work, Ordering::Relaxed);
                if work.is_multiple_of(every) {
                    self.apply(stream.next(layout));
                    slot.ops.store(stream.ops, Ordering::Relaxed);
                }
                continue;
            }
            let batch = if let Some(from) = stream.due_us(layout, base) {
                // A trace: each write is due at its own time.
                let elapsed = micros(t0.elapsed());
                let due = |n: u64| stream.due_us(layout, n).unwrap_or(from) - from;
                let next = due(stream.ops);
                if next > elapsed {
                    nap(Duration::from_micros(next - elapsed));
                    continue;
                }
                if elapsed - next > micros(MAX_BACKLOG) {
                    (t0, base) = (Instant::now(), stream.ops);
                    continue;
                }
                (1..BATCH)
                    .find(|k| due(stream.ops + k) > elapsed)
                    .unwrap_or(BATCH)
            } else {
                match layout.rate_per_vcpu(self.vcpus) {
                    None => BATCH,
                    Some(r) => {
                        let elapsed = t0.elapsed().as_secs_f64();
                        // Float to int saturates; rates are bounded (units::MAX_PAGE_RATE).
                        let due = base.saturating_add((elapsed * r) as u64);
                        if due <= stream.ops {
                            let next_at = (stream.ops - base + 1) as f64 / r;
                            nap(Duration::try_from_secs_f64(next_at - elapsed).unwrap_or_default());
                            continue;
                        }
                        if (due - stream.ops) as f64 > r * MAX_BACKLOG.as_secs_f64() {
                            (t0, base) = (Instant::now(), stream.ops);
                            continue;
                        }
                        (due - stream.ops).min(BATCH)
                    }
                }
            }
            .min(throttled.allowed());
            for _ in 0..batch {
                self.apply(stream.next(layout));
            }
            slot.ops.store(stream.ops, Ordering::Relaxed);
        }
    }

    /// Write, then mark (see [`crate::guest::dirty`] for why this order).
    #[inline]
    fn apply(&self, w: Write) {
        let (ptr, _) = self.mem.pages_ptr(w.page(), 1);
        match w {
            Write::Store {
                offset, value, len, ..
            } => {
                for k in 0..len / 8 {
                    let v = if k == 0 { value } else { fill_word(value, k) };
                    // SAFETY: offset + len <= page_size and 8-aligned (Stream),
                    // so the word is inside this page of the mapping, which
                    // outlives the vCPUs. Accesses are atomic: two vCPUs may
                    // hit the same word (a relaxed store is a plain store on x86).
                    unsafe { AtomicU64::from_ptr(ptr.add((offset + k * 8) as usize).cast()) }
                        .store(v, Ordering::Relaxed);
                }
            }
            Write::Increment { .. } => {
                // SAFETY: byte 0 of a page inside the mapping, as above.
                unsafe { AtomicU8::from_ptr(ptr) }.fetch_add(1, Ordering::Relaxed);
            }
        }
        if let Some(b) = self.bitmap {
            b.mark(w.page());
        }
    }
}

/// Microseconds, saturating (a guest clock does not reach 584,000 years).
fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// A vCPU's guest clock: run time since boot, parked time left out.
struct Clock {
    base: Duration,
    since: Instant,
}

impl Clock {
    fn at(us: u64) -> Self {
        Self {
            base: Duration::from_micros(us),
            since: Instant::now(),
        }
    }

    fn now(&self) -> Duration {
        self.base + self.since.elapsed()
    }
}

/// A vCPU's side of the throttle.
struct Throttled {
    seen: Throttle,
    /// CPU throttle: when the vCPU last woke from a throttle sleep, and by
    /// how much it overslept then (taken off the next sleep, so the share
    /// of time slept is the throttle's, whatever the wake-up latency).
    slice: Instant,
    overslept: Duration,
    /// Dirty limit, a token bucket that fills at the cap, up to a period's
    /// worth, and starts empty: the writes allowed are the cap times the
    /// time since `since` less the writes done since `since_ops`.
    since: Instant,
    since_ops: u64,
    /// Writes the last look allowed before the next.
    allowed: u64,
}

impl Throttled {
    fn new(seen: Throttle, ops: u64) -> Self {
        let now = Instant::now();
        Self {
            seen,
            slice: now,
            overslept: Duration::ZERO,
            since: now,
            since_ops: ops,
            allowed: u64::MAX,
        }
    }

    /// At a safe point: sleep if the throttle says so (cut short by a pause
    /// request), returning how long; None to go on writing.
    fn obey(&mut self, control: &Control, vcpus: u32, ops: u64) -> Option<Duration> {
        let t = control.throttle_capped(vcpus);
        if t != self.seen {
            *self = Self::new(t, ops);
        }
        let now = Instant::now();
        let sleep = match t {
            Throttle::Off => return None,
            Throttle::Cpu(pct) => {
                let ran = now - self.slice;
                if ran < THROTTLE_SLICE {
                    return None;
                }
                (ran * pct / (100 - pct.min(99))).saturating_sub(self.overslept)
            }
            Throttle::DirtyLimit { pps, period } => {
                // u64 -> f64: counts of writes and a page rate.
                let (rate, depth) = (pps as f64, budget(pps, period) as f64);
                let done = (ops - self.since_ops) as f64;
                let mut tokens = rate * (now - self.since).as_secs_f64() - done;
                if tokens > depth {
                    // A full bucket: time beyond it is not credited.
                    self.since += Duration::from_secs_f64((tokens - depth) / rate);
                    tokens = depth;
                }
                if tokens >= 1.0 {
                    // f64 -> u64 truncates: whole writes.
                    self.allowed = tokens as u64;
                    return None;
                }
                // Wait for a batch's worth (or the whole bucket, if smaller).
                let want = depth.min(BATCH as f64);
                Duration::from_secs_f64((want - tokens) / rate)
            }
        };
        control.sleep_unless_paused(sleep);
        let woke = Instant::now();
        self.slice = woke;
        self.overslept = (woke - now).saturating_sub(sleep);
        Some(woke - now)
    }

    /// Writes allowed before the next look (the dirty limit's tokens).
    fn allowed(&self) -> u64 {
        match self.seen {
            Throttle::DirtyLimit { .. } => self.allowed,
            _ => u64::MAX,
        }
    }
}

/// The dirty limit's bucket: `pps` writes a second over one `period`.
fn budget(pps: u64, period: Duration) -> u64 {
    // f64 -> u64 saturates; a count of writes.
    ((pps as f64 * period.as_secs_f64()).round() as u64).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::dirty::DirtySet;
    use crate::guest::workload::Workload;
    use crate::util::page::PageSize;

    /// The invariant the pause race would break: once a vCPU is parked,
    /// every page it wrote since a harvest is in the next harvest. The
    /// stream is deterministic, so op `i`'s page is known; ops from the
    /// counter published after the harvest (plus one unpublished batch) up
    /// to the exact count published at the park must all be marked.
    #[test]
    fn a_parked_vcpu_has_marked_every_page_it_wrote() {
        let page_size = PageSize::host();
        let pages = 16384;
        let bytes = page_size.bytes(pages);
        // Leaked: the vCPU thread outlives the test body (it stays parked).
        let mem = Box::leak(Box::new(GuestMemory::create(bytes, page_size).unwrap()));
        let control = Box::leak(Box::new(Control::create().unwrap()));
        let bitmap = Box::leak(Box::new(SharedBitmap::create(pages).unwrap()));
        let workload: Workload = "uniform:rate=max".parse().unwrap();
        let workload = workload.layout(bytes, page_size).unwrap();
        let workload: &'static Layout = Box::leak(Box::new(workload));
        let slot = &control.block().slots[0];
        slot.seed.store(7, Ordering::Relaxed);
        let vcpu = Box::leak(Box::new(Vcpu {
            mem,
            control,
            bitmap: Some(bitmap),
            workload,
            vcpus: 1,
            resume: false,
        }));
        std::thread::spawn(|| vcpu.run(0));
        assert!(control.wait_running(1, Duration::from_secs(5)));
        let page_of = |op| {
            Stream::new(workload, 0, 1, 7, op, None)
                .next(workload)
                .page()
        };
        let mut checked = 0;
        for _ in 0..300 {
            let mut since = DirtySet::new(pages);
            bitmap.take_into(&mut since);
            let first = slot.ops.load(Ordering::SeqCst) + BATCH;
            // Let the vCPU write past the harvest whatever the machine's
            // speed: until it has published a few writes beyond `first`.
            let t = Instant::now();
            while slot.ops.load(Ordering::SeqCst) < first + 8 {
                assert!(t.elapsed() < Duration::from_secs(5), "vCPU stopped writing");
                std::hint::spin_loop();
            }
            assert!(
                control.request_pause(1, Duration::from_secs(5)),
                "vCPU did not park"
            );
            let done = slot.ops.load(Ordering::SeqCst);
            let mut harvest = DirtySet::new(pages);
            bitmap.take_into(&mut harvest);
            for op in first..done {
                assert!(
                    harvest.contains(page_of(op)),
                    "op {op} (page {}) unmarked",
                    page_of(op)
                );
                checked += 1;
            }
            control.release();
            // Wait until the vCPU has left park, so the next pause is fresh.
            while control.block().parked.load(Ordering::SeqCst) != 0 {
                std::thread::yield_now();
            }
        }
        assert!(checked > 1000, "too few writes checked: {checked}");
    }

    /// One vCPU running `spec` over 4 MiB, its own control block; leaked,
    /// as the thread outlives the test.
    fn spawn(spec: &str) -> &'static Control {
        let page_size = PageSize::host();
        let bytes = page_size.bytes(1024);
        let mem = Box::leak(Box::new(GuestMemory::create(bytes, page_size).unwrap()));
        let control: &'static Control = Box::leak(Box::new(Control::create().unwrap()));
        let workload: Workload = spec.parse().unwrap();
        let workload = Box::leak(Box::new(workload.layout(bytes, page_size).unwrap()));
        let vcpu = Box::leak(Box::new(Vcpu {
            mem,
            control,
            bitmap: None,
            workload,
            vcpus: 1,
            resume: false,
        }));
        std::thread::spawn(|| vcpu.run(0));
        assert!(control.wait_running(1, Duration::from_secs(5)));
        control
    }

    /// Writes per second and the share of the time slept throttled, over `d`.
    fn measure(control: &Control, d: Duration) -> (f64, f64) {
        let (t0, ops0, slept0) = (Instant::now(), control.ops(1), control.throttled(1));
        std::thread::sleep(d);
        let secs = t0.elapsed().as_secs_f64();
        let slept = (control.throttled(1) - slept0).as_secs_f64();
        ((control.ops(1) - ops0) as f64 / secs, slept / secs)
    }

    /// A vCPU writing flat out, capped at 20k writes/s (a bucket of 20 ms,
    /// 400 writes), never writes above the cap by more than 5 % (the
    /// bucket's depth is 1 % of the 40k in the window; the counters are
    /// read inside the timed window, so the estimate can only be low), and
    /// sleeps most of the time. Below the cap it loses the tokens of any
    /// wait for a CPU longer than the bucket's depth, which a loaded
    /// machine causes, so the lower bound only catches a limit that holds
    /// the vCPU far below its cap.
    #[test]
    fn a_dirty_limit_holds_a_vcpu_to_its_cap() {
        let control = spawn("uniform:rate=max");
        let period = Duration::from_millis(20);
        control.set_throttle(Throttle::DirtyLimit {
            pps: 20_000,
            period,
        });
        std::thread::sleep(period * 2);
        let (rate, slept) = measure(control, Duration::from_secs(2));
        assert!(rate < 20_000.0 * 1.05, "{rate:.0} writes/s");
        assert!(rate > 20_000.0 * 0.5, "{rate:.0} writes/s");
        assert!(slept > 0.5, "slept {slept:.2} of the time");
        // Lifted: flat out again, far above the cap.
        control.set_throttle(Throttle::Off);
        let (rate, _) = measure(control, Duration::from_millis(200));
        assert!(rate > 100_000.0, "{rate:.0} writes/s");
    }

    /// QEMU's CPU throttle at 50 %: a vCPU paced at 20k writes/s sleeps
    /// 10 ms after each 10 ms it runs and does not catch up, so it writes
    /// at most half its rate. Oversleeping is taken off the next sleep, so
    /// it writes about half; the lower bound allows for a loaded machine.
    #[test]
    fn a_cpu_throttle_takes_its_share_of_a_vcpus_time() {
        let control = spawn("uniform:rate=20k");
        control.set_throttle(Throttle::Cpu(50));
        std::thread::sleep(Duration::from_millis(50));
        let (rate, slept) = measure(control, Duration::from_secs(1));
        assert!(rate <= 20_000.0 * 0.55, "{rate:.0} writes/s");
        assert!(rate >= 20_000.0 * 0.35, "{rate:.0} writes/s");
        assert!(slept >= 0.45, "slept {slept:.2} of the time");
        assert_eq!(control.throttle(), Throttle::Cpu(50));
    }
}
