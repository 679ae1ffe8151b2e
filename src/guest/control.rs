//! The control block: a small shared memfd through which a guest process and
//! its owner (the sender, or the receiver after migration) talk without
//! sockets. It holds futex words for pausing the vCPUs at safe points, one
//! slot per vCPU with its write counter and its device state, the claim of
//! the one process allowed to harvest the guest's dirty pages, the
//! `mprotect` tracker's re-protection requests, and the throttle the owner
//! sets to slow the guest down (auto-converge, dirty limit).
//!
//! Pausing is two-step and real: the owner asks the vCPUs to park at a safe
//! point (between two complete "write then mark" operations, so no write can
//! be caught half-recorded), waits until all have parked, then SIGSTOPs the
//! whole process so nothing in it runs while its memory is copied.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use linux_futex::{AsFutex, Shared};

use crate::guest::memory::{MemoryError, SharedRegion};

/// Most vCPUs a guest may have (slots are fixed in the block).
pub const MAX_VCPUS: u32 = 64;
/// Longest workload spec an incoming guest can be handed.
pub const MAX_WORKLOAD_LEN: usize = 256;

/// Name of the control block's memfd (how `livemig dirtyrate --pid` finds it).
pub const CONTROL_NAME: &str = "livemig-control";

/// "livemig" and the layout's version, in [`ControlBlock::magic`].
pub const MAGIC: u64 = u64::from_le_bytes(*b"livemig\x03");

/// Highest CPU throttle (QEMU's `max-cpu-throttle` bound).
pub const MAX_THROTTLE_PCT: u32 = 99;

/// How the owner slows the guest's vCPUs down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Throttle {
    Off,
    /// Each vCPU sleeps `pct/(100-pct)` of every 10 ms it runs.
    Cpu(u32),
    /// Each vCPU writes at most `pps` times a second, evenly, bursting no
    /// more than a `period`'s worth.
    DirtyLimit {
        pps: u64,
        period: Duration,
    },
}

/// Values of [`ControlBlock::pause`].
pub const RUN: u32 = 0;
pub const PAUSE: u32 = 1;

/// One vCPU's shared slot, a cache line of its own so vCPUs do not contend.
#[repr(C, align(64))]
#[derive(Default)]
pub struct VcpuSlot {
    /// Write operations done since the guest first booted (resumes carry it on).
    pub ops: AtomicU64,
    /// Seed of the vCPU's counter-based random stream.
    pub seed: AtomicU64,
    /// Workload cursor (the next page of a sweep).
    pub cursor: AtomicU64,
    /// Nanoseconds this vCPU slept because it was throttled.
    pub throttled_ns: AtomicU64,
    /// Operations of a `compute` workload done since the guest first booted
    /// (its progress; `ops` above counts its writes). Resumes carry it on.
    pub work_ops: AtomicU64,
    /// The vCPU's guest clock, microseconds of run time since boot (it
    /// stops while parked): a `phases` workload's phase follows it.
    pub clock_us: AtomicU64,
}

/// The shared layout. A zero-filled mapping is a valid block (all atomics).
#[repr(C)]
pub struct ControlBlock {
    /// [`MAGIC`]: set by the owner that created the block, so a process
    /// attaching through /proc knows the memfd is one (of this layout).
    pub magic: AtomicU64,
    /// The guest process's pid, published by the guest.
    pub guest_pid: AtomicU32,
    /// Futex: [`RUN`] or [`PAUSE`], written by the owner.
    pub pause: AtomicU32,
    /// Futex: vCPUs parked at a safe point, written by the guest.
    pub parked: AtomicU32,
    /// Futex: vCPUs that have started running their workload.
    pub running: AtomicU32,
    /// Futex: an incoming guest waits for 1 (its state is in the block).
    pub start: AtomicU32,
    /// Incoming guest: its vCPU count and workload spec, set before `start`.
    pub vcpus: AtomicU32,
    pub workload_len: AtomicU32,
    pub workload: [AtomicU8; MAX_WORKLOAD_LEN],
    /// Pid of the process that harvests this guest's dirty pages (0: none).
    /// Two harvesters would steal each other's pages, so each claims it.
    pub owner: AtomicU32,
    /// Where the guest mapped its memory, for trackers that read its page
    /// tables from outside (published before its vCPUs run).
    pub mem_addr: AtomicU64,
    /// `mprotect` tracker, futex: re-protections asked for by the owner...
    pub protect_req: AtomicU32,
    /// ...and served by the guest.
    pub protect_done: AtomicU32,
    /// `mprotect` tracker: write faults the guest's handler took.
    pub tracker_faults: AtomicU64,
    /// `mprotect` tracker: faults that unprotected more than their page
    /// because `vm.max_map_count` was reached.
    pub tracker_coalesced: AtomicU64,
    /// Post-copy: the owner asks an incoming guest (before `start`) to
    /// register its memory for missing-page faults...
    pub postcopy: AtomicU32,
    /// ...futex: 1 once it did (or failed), before its vCPUs run...
    pub uffd_ready: AtomicU32,
    /// ...and the userfaultfd's fd number in the guest (-1: it failed).
    pub uffd_fd: std::sync::atomic::AtomicI32,
    /// Throttle set by the owner, read by the vCPUs at their safe points:
    /// the share of time (percent, 0-99) each vCPU sleeps, as QEMU's
    /// auto-converge does...
    pub throttle_pct: AtomicU32,
    /// ...or a cap on each vCPU's writes per second (0: none), enforced
    /// paced evenly with bursts of at most a `dirty_limit_period_us` worth,
    /// as QEMU's dirty limit does.
    pub dirty_limit_pps: AtomicU64,
    pub dirty_limit_period_us: AtomicU32,
    pub slots: [VcpuSlot; MAX_VCPUS as usize],
    /// `--cpu-cap` as an in-guest duty cycle: the whole guest's CPU share
    /// in percent of one CPU (0: none), which each vCPU obeys at its safe
    /// points as a CPU throttle of its share, whichever is deeper.
    pub cpu_cap_pct: AtomicU32,
}

/// A mapped control block (clones share the mapping).
#[derive(Clone)]
pub struct Control {
    region: Arc<SharedRegion>,
}

fn wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let futex = AsFutex::<Shared>::as_futex(word);
    let _ = futex.wait_for(expected, timeout);
}

fn wake(word: &AtomicU32) {
    AsFutex::<Shared>::as_futex(word).wake(i32::MAX);
}

/// Bytes of the memfd holding a control block.
pub fn block_len() -> u64 {
    std::mem::size_of::<ControlBlock>().next_multiple_of(4096) as u64
}

impl Control {
    pub fn create() -> Result<Self, MemoryError> {
        let c = Self {
            region: Arc::new(SharedRegion::create(CONTROL_NAME, block_len())?),
        };
        c.block().magic.store(MAGIC, Ordering::Release);
        Ok(c)
    }

    pub fn from_region(region: SharedRegion) -> Self {
        assert!(region.len() >= std::mem::size_of::<ControlBlock>());
        Self {
            region: Arc::new(region),
        }
    }

    pub fn region(&self) -> &SharedRegion {
        &self.region
    }

    pub fn block(&self) -> &ControlBlock {
        // SAFETY: the mapping is page aligned, at least size_of::<ControlBlock>()
        // long (checked at construction), lives as long as `self`, and any bit
        // pattern (zero-filled at creation) is valid for a block of atomics.
        unsafe { &*(self.region.as_ptr() as *const ControlBlock) }
    }

    /// Total writes by the first `vcpus` vCPUs.
    pub fn ops(&self, vcpus: u32) -> u64 {
        self.block().slots[..vcpus as usize]
            .iter()
            .map(|s| s.ops.load(Ordering::Relaxed))
            .sum()
    }

    /// Owner side: set the throttle the vCPUs obey from their next safe
    /// point on ([`Throttle::Off`] lifts it).
    pub fn set_throttle(&self, t: Throttle) {
        let b = self.block();
        let (pct, pps, period) = match t {
            Throttle::Off => (0, 0, 0),
            Throttle::Cpu(pct) => (pct.min(MAX_THROTTLE_PCT), 0, 0),
            Throttle::DirtyLimit { pps, period } => {
                let us = u32::try_from(period.as_micros()).unwrap_or(u32::MAX);
                (0, pps.max(1), us.max(1))
            }
        };
        b.dirty_limit_period_us.store(period, Ordering::Relaxed);
        b.dirty_limit_pps.store(pps, Ordering::Relaxed);
        b.throttle_pct.store(pct, Ordering::Release);
    }

    /// The throttle in force.
    pub fn throttle(&self) -> Throttle {
        let b = self.block();
        let pct = b.throttle_pct.load(Ordering::Acquire);
        let pps = b.dirty_limit_pps.load(Ordering::Relaxed);
        let us = b.dirty_limit_period_us.load(Ordering::Relaxed);
        match (pct, pps) {
            (0, 0) => Throttle::Off,
            (0, pps) => Throttle::DirtyLimit {
                pps,
                period: Duration::from_micros(u64::from(us.max(1))),
            },
            (pct, _) => Throttle::Cpu(pct.min(MAX_THROTTLE_PCT)),
        }
    }

    /// Compute operations by the first `vcpus` vCPUs (see [`VcpuSlot::work_ops`]).
    pub fn work_ops(&self, vcpus: u32) -> u64 {
        self.block().slots[..vcpus as usize]
            .iter()
            .map(|s| s.work_ops.load(Ordering::Relaxed))
            .sum()
    }

    /// Owner side: cap the guest's CPU at `pct` percent of one CPU with an
    /// in-guest duty cycle (0 lifts it).
    pub fn set_cpu_cap(&self, pct: u32) {
        self.block().cpu_cap_pct.store(pct, Ordering::Release);
    }

    /// What a vCPU of `vcpus` obeys: the throttle, deepened to the CPU
    /// cap's duty cycle (each vCPU runs its share, `cap / vcpus` %, of the
    /// time). A dirty limit stands as it is.
    pub fn throttle_capped(&self, vcpus: u32) -> Throttle {
        let t = self.throttle();
        let cap = self.block().cpu_cap_pct.load(Ordering::Acquire);
        if cap == 0 || cap >= vcpus.saturating_mul(100) {
            return t;
        }
        let floor = (100 - cap / vcpus.max(1)).min(MAX_THROTTLE_PCT);
        match t {
            Throttle::Off => Throttle::Cpu(floor),
            Throttle::Cpu(p) => Throttle::Cpu(p.max(floor)),
            dirty_limit => dirty_limit,
        }
    }

    /// Time the first `vcpus` vCPUs slept throttled, summed.
    pub fn throttled(&self, vcpus: u32) -> Duration {
        let ns = self.block().slots[..vcpus as usize]
            .iter()
            .map(|s| s.throttled_ns.load(Ordering::Relaxed))
            .sum();
        Duration::from_nanos(ns)
    }

    /// Owner side: ask every vCPU to park and wait until `vcpus` have.
    /// Returns false on timeout (the caller checks whether the guest died).
    pub fn request_pause(&self, vcpus: u32, timeout: Duration) -> bool {
        let b = self.block();
        b.pause.store(PAUSE, Ordering::SeqCst);
        wake(&b.pause);
        wait_count(&b.parked, vcpus, timeout)
    }

    /// Owner side: let parked vCPUs run again.
    pub fn release(&self) {
        let b = self.block();
        b.pause.store(RUN, Ordering::SeqCst);
        wake(&b.pause);
    }

    /// Owner side: hand an incoming guest its workload and let it start
    /// (the vCPU slots must already hold its state).
    pub fn start(&self, workload: &str, vcpus: u32) {
        self.publish(workload, vcpus);
        let b = self.block();
        b.start.store(1, Ordering::Release);
        wake(&b.start);
    }

    /// Record the guest's workload and vCPU count in the block (a fresh
    /// guest does so itself, for whoever attaches to it later).
    pub fn publish(&self, workload: &str, vcpus: u32) {
        let b = self.block();
        assert!(workload.len() <= MAX_WORKLOAD_LEN && vcpus <= MAX_VCPUS);
        for (cell, byte) in b.workload.iter().zip(workload.bytes()) {
            cell.store(byte, Ordering::Relaxed);
        }
        b.workload_len
            .store(workload.len() as u32, Ordering::Relaxed);
        b.vcpus.store(vcpus, Ordering::Release);
    }

    /// The workload and vCPU count last published.
    pub fn published(&self) -> (String, u32) {
        let b = self.block();
        let vcpus = b.vcpus.load(Ordering::Acquire).min(MAX_VCPUS);
        let len = (b.workload_len.load(Ordering::Relaxed) as usize).min(MAX_WORKLOAD_LEN);
        let bytes: Vec<u8> = b.workload[..len]
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        (String::from_utf8_lossy(&bytes).into_owned(), vcpus)
    }

    /// Owner side, before [`Control::start`]: have the incoming guest
    /// register its memory for missing-page faults (post-copy).
    pub fn request_postcopy(&self) {
        self.block().postcopy.store(1, Ordering::Release);
    }

    pub fn postcopy_requested(&self) -> bool {
        self.block().postcopy.load(Ordering::Acquire) == 1
    }

    /// Guest side: the userfaultfd is registered (`Some(fd)`) or failed.
    pub fn publish_uffd(&self, fd: Option<i32>) {
        let b = self.block();
        b.uffd_fd.store(fd.unwrap_or(-1), Ordering::Relaxed);
        b.uffd_ready.store(1, Ordering::Release);
        wake(&b.uffd_ready);
    }

    /// Owner side: the guest's userfaultfd fd number, once published
    /// (None: it failed, or did not say within `timeout`).
    pub fn wait_uffd(&self, timeout: Duration) -> Option<i32> {
        let b = self.block();
        let deadline = Instant::now() + timeout;
        while b.uffd_ready.load(Ordering::Acquire) == 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            wait(&b.uffd_ready, 0, left.min(Duration::from_millis(100)));
        }
        Some(b.uffd_fd.load(Ordering::Relaxed)).filter(|&fd| fd >= 0)
    }

    /// Guest side: wait for [`Control::start`], then read what it handed over.
    pub fn wait_start(&self) -> (String, u32) {
        let b = self.block();
        while b.start.load(Ordering::Acquire) == 0 {
            wait(&b.start, 0, Duration::from_millis(100));
        }
        self.published()
    }

    /// Owner side: wait until `vcpus` vCPUs run their workload.
    pub fn wait_running(&self, vcpus: u32, timeout: Duration) -> bool {
        wait_count(&self.block().running, vcpus, timeout)
    }

    /// Claim the right to harvest this guest's dirty pages for `pid`; on
    /// refusal, the pid of the live process that holds it.
    pub fn claim(&self, pid: u32) -> Result<(), u32> {
        let owner = &self.block().owner;
        loop {
            match owner.compare_exchange(0, pid, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => return Ok(()),
                Err(holder) if holder == pid => return Ok(()),
                // A holder that died without releasing does not count; it
                // may have died with the vCPUs parked for a harvest.
                Err(holder) if crate::util::process::process_gone(holder as i32) => {
                    if owner
                        .compare_exchange(holder, 0, Ordering::SeqCst, Ordering::SeqCst)
                        .is_ok()
                    {
                        self.release();
                    }
                }
                Err(holder) => return Err(holder),
            }
        }
    }

    /// Give up a claim made by `pid`.
    pub fn unclaim(&self, pid: u32) {
        let _ = self
            .block()
            .owner
            .compare_exchange(pid, 0, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// Owner side (`mprotect`): ask the guest to write-protect its memory
    /// again and wait until it has. False on timeout.
    pub fn request_protect(&self, timeout: Duration) -> bool {
        let b = self.block();
        let req = b.protect_req.fetch_add(1, Ordering::SeqCst).wrapping_add(1);
        wake(&b.protect_req);
        let deadline = Instant::now() + timeout;
        loop {
            let done = b.protect_done.load(Ordering::SeqCst);
            if done == req {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            wait(
                &b.protect_done,
                done,
                (deadline - now).min(Duration::from_millis(20)),
            );
        }
    }

    /// Guest side (`mprotect`): wait for a re-protection request, run
    /// `protect` and report it served. Never returns.
    pub fn serve_protect(&self, protect: impl Fn()) -> ! {
        let b = self.block();
        loop {
            let done = b.protect_done.load(Ordering::SeqCst);
            let req = b.protect_req.load(Ordering::SeqCst);
            if req == done {
                wait(&b.protect_req, req, Duration::from_millis(100));
                continue;
            }
            protect();
            b.protect_done.store(req, Ordering::SeqCst);
            wake(&b.protect_done);
        }
    }

    // ---- guest side ----

    /// Guest side: a vCPU starts running.
    pub fn mark_running(&self) {
        let b = self.block();
        b.running.fetch_add(1, Ordering::SeqCst);
        wake(&b.running);
    }

    pub fn pause_requested(&self) -> bool {
        self.block().pause.load(Ordering::Acquire) != RUN
    }

    /// Guest side: sleep until `timeout` passes or a pause is requested.
    pub fn sleep_unless_paused(&self, timeout: Duration) {
        wait(&self.block().pause, RUN, timeout);
    }

    /// Guest side, at a safe point: publish this vCPU's state, count it as
    /// parked and block until released.
    pub fn park(&self, vcpu: usize, ops: u64, cursor: u64) {
        let b = self.block();
        let slot = &b.slots[vcpu];
        slot.ops.store(ops, Ordering::Relaxed);
        slot.cursor.store(cursor, Ordering::Relaxed);
        b.parked.fetch_add(1, Ordering::SeqCst);
        wake(&b.parked);
        while b.pause.load(Ordering::Acquire) != RUN {
            wait(&b.pause, PAUSE, Duration::from_millis(100));
        }
        b.parked.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Wait until `word` reaches at least `target`.
fn wait_count(word: &AtomicU32, target: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let now_val = word.load(Ordering::SeqCst);
        if now_val >= target {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        wait(
            word,
            now_val,
            (deadline - now).min(Duration::from_millis(50)),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pid of a process that has exited and been reaped.
    fn dead_pid() -> u32 {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        pid
    }

    #[test]
    fn a_claim_left_by_a_dead_holder_is_taken_over_and_its_pause_undone() {
        let c = Control::create().unwrap();
        let me = std::process::id();
        // A harvester that died holding the claim, its vCPUs parked for a harvest.
        let dead = dead_pid();
        c.block().owner.store(dead, Ordering::SeqCst);
        c.block().pause.store(PAUSE, Ordering::SeqCst);
        assert_eq!(c.claim(me), Ok(()));
        assert_eq!(c.block().owner.load(Ordering::SeqCst), me);
        assert!(!c.pause_requested(), "the dead holder's pause is released");
        // Claiming again is harmless; a live process (init) is refused, naming us.
        assert_eq!(c.claim(me), Ok(()));
        assert_eq!(c.claim(1), Err(me));
        // Given up, it is anyone's.
        c.unclaim(me);
        assert_eq!(c.claim(1), Ok(()));
    }

    #[test]
    fn a_live_holder_keeps_its_claim_and_its_pause() {
        let c = Control::create().unwrap();
        // Process 1 never dies.
        c.block().owner.store(1, Ordering::SeqCst);
        c.block().pause.store(PAUSE, Ordering::SeqCst);
        assert_eq!(c.claim(std::process::id()), Err(1));
        assert!(c.pause_requested(), "a live holder's pause is its own");
        // Only the holder gives it up.
        c.unclaim(std::process::id());
        assert_eq!(c.block().owner.load(Ordering::SeqCst), 1);
    }
}
