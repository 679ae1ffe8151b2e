//! The guest emulator: a separate OS process (`livemig guest`) whose vCPU
//! threads ([`crate::guest::vcpu`]) write into guest memory, and the [`Guest`]
//! handle its owner uses to start, pause, resume and stop it.
//!
//! The guest inherits up to three memfds from its owner: its RAM, the control
//! block ([`crate::guest::control`]) and, for the `bitmap` and `mprotect` trackers,
//! the dirty bitmap. It sets up its tracker itself ([`crate::guest::dirty`]). A
//! fresh guest stamps every page (so a page lost in transit cannot pass
//! verification by being zero) and starts its workload. An incoming guest
//! (`--incoming`, on the destination) is started before migration, like
//! QEMU's `-incoming`, so process start-up stays out of the downtime: it maps
//! its memory and waits until the receiver hands it the device state through
//! the control block, then continues where the source stopped.

use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

pub use crate::guest::args::{Fresh, GuestArgs};
use crate::guest::cache::CacheMap;
use crate::guest::control::{Control, MAX_VCPUS};
use crate::guest::dirty::{DirtyError, SharedBitmap, TrackerKind};
use crate::guest::memory::{GuestMemory, MemoryError, SharedRegion};
use crate::guest::vcpu::Vcpu;
pub use crate::guest::vcpu::{vcpu_seed, BATCH};
use crate::guest::workload::{Layout, Workload, WorkloadError};
use crate::util::page::PageSize;

/// How long a guest may take to start: its fixed part, and the time per
/// GiB of memory it fills first (a 4 GiB guest took about 15 s here).
const START_TIMEOUT: Duration = Duration::from_secs(20);
const START_TIMEOUT_PER_GIB: Duration = Duration::from_secs(10);
/// How long a guest may take to park its vCPUs.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors of the guest and its handle.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("cannot start the guest process")]
    Spawn(#[source] std::io::Error),
    #[error("the guest process (pid {pid}) exited: {status}")]
    Exited { pid: i32, status: String },
    #[error("the guest process (pid {pid}) did not {what} within {secs} s")]
    Timeout {
        pid: i32,
        what: &'static str,
        secs: u64,
    },
    #[error("cannot signal the guest process (pid {pid})")]
    Signal {
        pid: i32,
        #[source]
        source: nix::Error,
    },
    #[error("{0} vCPUs: must be between 1 and {MAX_VCPUS}")]
    Vcpus(u32),
    #[error("device state: {0}")]
    DeviceState(String),
    #[error("post-copy: the guest cannot register its memory for missing-page faults: {0}")]
    Postcopy(String),
    #[error("workload \"{spec}\"")]
    Workload {
        spec: String,
        #[source]
        source: WorkloadError,
    },
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error("the guest's page cache")]
    Cache(#[from] crate::guest::cache::CacheError),

    #[error("process {pid} is not a livemig guest: {why}")]
    NotAGuest { pid: i32, why: String },
    #[error("guest {pid} is tracked by process {holder} (a migration or another measurement); harvesting it too would steal its dirty pages")]
    Claimed { pid: i32, holder: u32 },
    #[error("cannot set up the {tracker} tracker in the guest")]
    Tracker {
        tracker: &'static str,
        #[source]
        source: DirtyError,
    },
}

/// One vCPU's state: all it needs to continue exactly where it stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuState {
    pub seed: u64,
    pub ops: u64,
    pub cursor: u64,
    /// A `compute` workload's operations (absent from older peers: 0).
    #[serde(default)]
    pub work_ops: u64,
    /// The vCPU's guest clock, microseconds (a `phases` workload's phase).
    #[serde(default)]
    pub clock_us: u64,
}

/// The guest's "CPU state", sent during stop-and-copy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceState {
    pub workload: Workload,
    pub memory_bytes: u64,
    pub page_size: u64,
    pub vcpus: Vec<VcpuState>,
}

impl DeviceState {
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("device state serialises")
    }

    /// Decode and check a received blob against the negotiated memory.
    pub fn from_bytes(
        b: &[u8],
        memory_bytes: u64,
        page_size: PageSize,
    ) -> Result<Self, GuestError> {
        // The peer's bytes may end up in the message: make them printable.
        let bad = |e: String| GuestError::DeviceState(crate::util::text::printable(&e, 300));
        let s: Self = serde_json::from_slice(b).map_err(|e| bad(e.to_string()))?;
        if s.memory_bytes != memory_bytes || s.page_size != page_size.as_u64() {
            return Err(GuestError::DeviceState(format!(
                "it describes {} bytes of {}-byte pages, the migration {memory_bytes} of {page_size}",
                s.memory_bytes, s.page_size
            )));
        }
        check_config(&s.workload, memory_bytes, page_size, s.vcpus.len() as u32)?;
        Ok(s)
    }
}

/// Everything a guest's configuration must satisfy, checked wherever one
/// comes in (flags, a received device state, the guest's own arguments).
pub fn check_config(
    workload: &Workload,
    memory_bytes: u64,
    page_size: PageSize,
    vcpus: u32,
) -> Result<Layout, GuestError> {
    if !(1..=MAX_VCPUS).contains(&vcpus) {
        return Err(GuestError::Vcpus(vcpus));
    }
    let bad = |source| GuestError::Workload {
        spec: workload.to_string(),
        source,
    };
    let layout = workload.layout(memory_bytes, page_size).map_err(bad)?;
    layout.check_vcpus(vcpus).map_err(bad)?;
    Ok(layout)
}

/// Body of the `livemig guest` process. Runs until killed.
pub fn run(args: GuestArgs) -> Result<(), GuestError> {
    // Never outlive the owner: a crashed sender must not orphan its guest.
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    if nix::unistd::getppid() == Pid::from_raw(1) {
        return Ok(());
    }
    // Fine-grained sleeps pace the workload accurately.
    // SAFETY: PR_SET_TIMERSLACK takes an integer argument and touches no memory.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1000u64) };
    let page_size = PageSize::host();
    // SAFETY: these fds were handed to this process by its owner for this use.
    let (mem, control, bitmap) = unsafe {
        let mem = SharedRegion::from_raw_fd("guest RAM", args.mem_fd, args.memory_bytes)?;
        let control = Control::from_region(SharedRegion::from_raw_fd(
            "control",
            args.control_fd,
            crate::guest::control::block_len(),
        )?);
        let pages = page_size.pages(args.memory_bytes);
        let bitmap = match args.dirty_fd {
            Some(fd) => Some(SharedBitmap::from_region(
                SharedRegion::from_raw_fd("dirty bitmap", fd, SharedBitmap::bytes_for(pages))?,
                pages,
            )),
            None => None,
        };
        (GuestMemory::from_region(mem, page_size), control, bitmap)
    };
    let resume = args.incoming;
    let (workload, vcpus) = match args.fresh() {
        Some(f) => {
            let content = check_config(&f.workload, args.memory_bytes, page_size, f.vcpus)?.content;
            crate::guest::prepare::stamp(&mem, f.seed, &content)?;
            if let Some(cache) = &content.cache {
                let disk = f.disk.as_deref();
                let who = (f.seed, f.workload.spec());
                crate::guest::cache::fill_and_publish(&mem, cache, who, disk, args.cache_map_fd)?;
            }
            for (i, slot) in control.block().slots[..f.vcpus as usize].iter().enumerate() {
                slot.seed
                    .store(vcpu_seed(f.seed, i as u32), Ordering::Relaxed);
                slot.ops.store(0, Ordering::Relaxed);
            }
            if f.workload.spec().len() <= crate::guest::control::MAX_WORKLOAD_LEN {
                // For whoever attaches later (`livemig dirtyrate --pid`).
                control.publish(f.workload.spec(), f.vcpus);
            }
            (f.workload, f.vcpus)
        }
        None => {
            let (spec, vcpus) = control.wait_start();
            let workload = spec
                .parse()
                .map_err(|source| GuestError::Workload { spec, source })?;
            (workload, vcpus)
        }
    };
    // Post-copy: missing pages fault to the receiver, which must hear of
    // the registration before any vCPU runs. The fd lives as long as we do.
    let _uffd = match resume && control.postcopy_requested() {
        true => {
            let (ptr, len) = mem.pages_ptr(0, mem.page_count());
            let uffd = crate::guest::uffd::Uffd::open(crate::guest::uffd::FEATURE_MISSING_SHMEM)
                .and_then(|u| u.register_missing(ptr, len as u64).map(|()| u));
            control.publish_uffd(uffd.as_ref().ok().map(|u| u.raw_fd()));
            Some(uffd.map_err(|e| GuestError::Postcopy(e.to_string()))?)
        }
        false => None,
    };
    let workload = check_config(&workload, args.memory_bytes, page_size, vcpus)?;
    // An incoming guest is not tracked: nothing migrates it onwards.
    let tracker = (!resume).then_some(args.tracker);
    let tracker_err = |source: DirtyError| GuestError::Tracker {
        tracker: args.tracker.as_str(),
        source,
    };
    // Held for the process's life: closing it would end the write protection.
    let _uffd = match tracker {
        Some(TrackerKind::UffdWp) => {
            let uffd = crate::guest::uffd::Uffd::open(crate::guest::uffd::WP_ASYNC_FEATURES)
                .map_err(|e| tracker_err(e.into()))?;
            uffd.register_wp(mem.region().as_ptr(), mem.len())
                .map_err(|e| tracker_err(e.into()))?;
            Some(uffd)
        }
        _ => None,
    };
    let protect = match (tracker, &bitmap) {
        (Some(TrackerKind::Mprotect), Some(b)) => {
            // SAFETY: guest RAM, the bitmap and the control block stay
            // mapped until this process exits.
            unsafe {
                crate::guest::dirty::mprotect::install(
                    mem.region().as_ptr(),
                    mem.len() as usize,
                    b,
                    &control,
                )
            };
            true
        }
        (Some(TrackerKind::Mprotect), None) => {
            return Err(tracker_err(DirtyError::Guest {
                pid: std::process::id() as i32,
                what: "has no dirty bitmap to mark".into(),
            }))
        }
        _ => false,
    };
    let b = control.block();
    b.mem_addr
        .store(mem.region().as_ptr() as u64, Ordering::Release);
    b.guest_pid.store(std::process::id(), Ordering::Release);
    let vcpu = Vcpu {
        mem: &mem,
        control: &control,
        bitmap: bitmap
            .as_ref()
            .filter(|_| tracker == Some(TrackerKind::Bitmap)),
        workload: &workload,
        vcpus,
        resume,
    };
    std::thread::scope(|s| {
        if protect {
            s.spawn(|| crate::guest::dirty::mprotect::serve(&control));
        }
        for id in 1..vcpus {
            let vcpu = &vcpu;
            s.spawn(move || vcpu.run(id));
        }
        // vCPU 0 runs on this thread: an incoming guest woken with its
        // device state starts running without waiting for a new thread
        // (a spawn costs the downtime's resume tens of microseconds).
        if vcpus > 0 {
            vcpu.run(0);
        }
    });
    Ok(())
}

/// Park the `vcpus` vCPUs of guest `pid` at a safe point; on failure they
/// are released again.
pub fn park(control: &Control, vcpus: u32, pid: i32) -> Result<(), GuestError> {
    park_within(control, vcpus, pid, PAUSE_TIMEOUT)
}

fn park_within(control: &Control, vcpus: u32, pid: i32, limit: Duration) -> Result<(), GuestError> {
    let start = Instant::now();
    while !control.request_pause(vcpus, Duration::from_millis(50)) {
        let timeout = start.elapsed() > limit;
        if timeout || crate::util::process::process_gone(pid) {
            control.release();
            return Err(match timeout {
                true => GuestError::Timeout {
                    pid,
                    what: "pause",
                    secs: limit.as_secs(),
                },
                false => GuestError::Exited {
                    pid,
                    status: "gone".into(),
                },
            });
        }
    }
    Ok(())
}

pub use crate::util::process::{cpu_time, own_cpu_time};

/// The owner's handle on a guest process. Dropping it kills and reaps the
/// process, stopped or not: a guest is never orphaned.
pub struct Guest {
    child: Child,
    control: Control,
    vcpus: u32,
    stopped: bool,
    reaped: Option<String>,
    /// How long it may take to start: it grows with the guest's memory.
    start_timeout: Duration,
    /// Where a guest with page cache publishes its mapping.
    cache_map: Option<std::fs::File>,
}

/// How long a guest of `memory_bytes` may take to start running.
pub fn start_timeout(memory_bytes: u64) -> Duration {
    let gib = memory_bytes as f64 / (1u64 << 30) as f64;
    START_TIMEOUT + START_TIMEOUT_PER_GIB.mul_f64(gib)
}

impl Guest {
    /// Start `livemig guest` over `mem`: a fresh guest running `fresh`, or
    /// (None) an incoming one that waits for [`Guest::start_incoming`].
    ///
    /// The guest dies with the thread that spawned it (`PR_SET_PDEATHSIG`
    /// follows the forking thread), so spawn from a thread that outlives
    /// the handle, as the `livemig` commands do.
    pub fn spawn(
        mem: &GuestMemory,
        control: Control,
        bitmap: Option<&SharedBitmap>,
        tracker: TrackerKind,
        fresh: Option<&Fresh>,
    ) -> Result<Self, GuestError> {
        // LIVEMIG_EXE: for programs (tests) that use this library and are
        // not themselves the livemig binary.
        let exe = match std::env::var_os("LIVEMIG_EXE") {
            Some(exe) => exe.into(),
            None => std::env::current_exe().map_err(GuestError::Spawn)?,
        };
        let cache_map = (fresh.filter(|f| f.workload.content.cache.is_some()))
            .map(|_| crate::guest::cache::map_memfd().map_err(GuestError::Spawn))
            .transpose()?;
        let args = GuestArgs::new(
            (mem.region().raw_fd(), mem.len()),
            control.region().raw_fd(),
            bitmap.map(|b| b.region().raw_fd()),
            tracker,
            fresh,
            cache_map.as_ref().map(std::os::fd::AsRawFd::as_raw_fd),
        );
        let fds: Vec<RawFd> = [
            Some(args.mem_fd),
            Some(args.control_fd),
            args.dirty_fd,
            args.cache_map_fd,
        ]
        .into_iter()
        .flatten()
        .collect();
        let mut cmd = Command::new(exe);
        cmd.arg("guest")
            .args(args.to_argv())
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        // SAFETY: the closure runs between fork and exec and only calls
        // setpgid, sigemptyset, pthread_sigmask and fcntl, which are
        // async-signal-safe, on itself, a local set and fds this process owns.
        unsafe {
            cmd.pre_exec(move || {
                // A process group of its own: a terminal's Ctrl-C goes to
                // livemig alone, which cancels and resumes the guest; the
                // guest still dies with its owner (PR_SET_PDEATHSIG).
                if libc::setpgid(0, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                // A signal mask survives exec: the guest must not inherit
                // one its owner set for itself (livemig run blocks SIGTERM).
                let mut none: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut none);
                libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
                for &fd in &fds {
                    if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            })
        };
        let child = cmd.spawn().map_err(GuestError::Spawn)?;
        Ok(Self {
            child,
            control,
            vcpus: fresh.map_or(0, |f| f.vcpus),
            stopped: false,
            reaped: None,
            start_timeout: start_timeout(mem.len()),
            cache_map,
        })
    }

    /// The page -> block mapping the guest published, once it runs (None: no cache).
    pub fn cache_map(&self, pages: u64) -> Result<Option<CacheMap>, GuestError> {
        let read = |f| crate::guest::cache::read_published(f, pages);
        Ok(self.cache_map.as_ref().map(read).transpose()?)
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Where the guest mapped its memory (published before its vCPUs run).
    pub fn mem_addr(&self) -> u64 {
        self.control.block().mem_addr.load(Ordering::Acquire)
    }

    /// Park the vCPUs at a safe point without stopping the process (a
    /// tracker that cannot read and reset atomically harvests meanwhile).
    pub fn park(&mut self) -> Result<(), GuestError> {
        park(&self.control, self.vcpus, self.pid()).map_err(|e| match self.check_alive() {
            Err(exited) => exited,
            Ok(()) => e,
        })
    }

    /// Undo [`Guest::park`].
    pub fn unpark(&self) {
        self.control.release();
    }

    /// Its vCPU count.
    pub fn vcpus(&self) -> u32 {
        self.vcpus
    }

    pub fn control(&self) -> &Control {
        &self.control
    }

    /// Total write operations of all vCPUs.
    pub fn ops(&self) -> u64 {
        self.control.ops(self.vcpus)
    }

    /// Time a vCPU slept throttled so far, on average over the vCPUs.
    pub fn throttled(&self) -> Duration {
        self.control.throttled(self.vcpus) / self.vcpus.max(1)
    }

    /// An error if the process has exited.
    pub fn check_alive(&mut self) -> Result<(), GuestError> {
        if self.reaped.is_none() {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.reaped = Some(status.to_string());
            }
        }
        match &self.reaped {
            Some(status) => Err(GuestError::Exited {
                pid: self.pid(),
                status: status.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Wait until every vCPU runs its workload.
    pub fn wait_running(&mut self) -> Result<(), GuestError> {
        let start = Instant::now();
        while !self
            .control
            .wait_running(self.vcpus, Duration::from_millis(20))
        {
            self.check_alive()?;
            if start.elapsed() > self.start_timeout {
                return Err(self.timeout("start running", self.start_timeout));
            }
        }
        Ok(())
    }

    /// A real pause: park every vCPU at a safe point, then SIGSTOP the whole
    /// process. Once parked no vCPU writes memory, so the pause does not
    /// wait for the kernel to report the stop (a wake-up of every thread of
    /// the guest, on a busy machine the slowest step of a downtime):
    /// [`Guest::confirm_stopped`] does, off the downtime.
    pub fn pause(&mut self) -> Result<(), GuestError> {
        self.park()?;
        kill(Pid::from_raw(self.pid()), Signal::SIGSTOP).map_err(|source| GuestError::Signal {
            pid: self.pid(),
            source,
        })?;
        self.stopped = true;
        Ok(())
    }

    /// Wait until the kernel reports the paused guest stopped.
    pub fn confirm_stopped(&mut self) -> Result<(), GuestError> {
        let pid = Pid::from_raw(self.pid());
        while self.stopped {
            match waitpid(pid, Some(WaitPidFlag::WUNTRACED)) {
                Ok(WaitStatus::Stopped(..)) => break,
                Err(nix::Error::EINTR) => continue,
                Ok(status) => {
                    self.reaped = Some(format!("{status:?}"));
                    return self.check_alive();
                }
                Err(source) => {
                    return Err(GuestError::Signal {
                        pid: self.pid(),
                        source,
                    })
                }
            }
        }
        Ok(())
    }

    /// Undo [`Guest::pause`]: SIGCONT, then release the parked vCPUs.
    pub fn resume(&mut self) -> Result<(), GuestError> {
        self.check_alive()?;
        if self.stopped {
            kill(Pid::from_raw(self.pid()), Signal::SIGCONT).map_err(|source| {
                GuestError::Signal {
                    pid: self.pid(),
                    source,
                }
            })?;
            self.stopped = false;
        }
        self.control.release();
        Ok(())
    }

    /// The vCPU states published when they parked (call while paused).
    pub fn vcpu_states(&self) -> Vec<VcpuState> {
        self.control.block().slots[..self.vcpus as usize]
            .iter()
            .map(|s| VcpuState {
                seed: s.seed.load(Ordering::Acquire),
                ops: s.ops.load(Ordering::Acquire),
                cursor: s.cursor.load(Ordering::Acquire),
                work_ops: s.work_ops.load(Ordering::Acquire),
                clock_us: s.clock_us.load(Ordering::Acquire),
            })
            .collect()
    }

    /// Hand an incoming guest its device state and let its vCPUs run.
    pub fn start_incoming(&mut self, state: &DeviceState) {
        for (slot, s) in self.control.block().slots.iter().zip(&state.vcpus) {
            slot.seed.store(s.seed, Ordering::Relaxed);
            slot.ops.store(s.ops, Ordering::Relaxed);
            slot.cursor.store(s.cursor, Ordering::Relaxed);
            slot.work_ops.store(s.work_ops, Ordering::Relaxed);
            slot.clock_us.store(s.clock_us, Ordering::Relaxed);
        }
        self.vcpus = state.vcpus.len() as u32;
        self.control.start(state.workload.spec(), self.vcpus);
    }

    /// Write rate over `window`, in pages per second (measured, not the target).
    pub fn measure_rate(&mut self, window: Duration) -> Result<f64, GuestError> {
        let (t0, ops0) = (Instant::now(), self.ops());
        std::thread::sleep(window);
        self.check_alive()?;
        Ok((self.ops() - ops0) as f64 / t0.elapsed().as_secs_f64())
    }

    fn timeout(&self, what: &'static str, t: Duration) -> GuestError {
        GuestError::Timeout {
            pid: self.pid(),
            what,
            secs: t.as_secs(),
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if self.reaped.is_none() {
            // SIGKILL ends a stopped process too.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn a_peer_s_device_state_reaches_no_terminal_raw() {
        // Short enough for the spec's own length cap, with an escape sequence.
        let spec = "hotset:wws=\u{1b}[2J\u{0}1M,rate=1k";
        let blob = serde_json::json!({
            "workload": spec, "memory_bytes": 1 << 20, "page_size": 4096, "vcpus": []
        });
        let page = crate::util::page::PageSize::MIN;
        let e = super::DeviceState::from_bytes(blob.to_string().as_bytes(), 1 << 20, page)
            .unwrap_err()
            .to_string();
        assert!(!e.contains('\u{1b}') && !e.contains('\u{0}'), "{e}");
        assert!(e.contains("\\u{1b}[2J"), "{e}");
        assert!(e.starts_with("device state: "), "{e}");
    }

    /// A guest whose vCPUs never reach a safe point: the pause gives up
    /// after its time, naming the guest, and takes its request back so the
    /// vCPUs do not park later with nobody to release them.
    #[test]
    fn a_guest_that_does_not_pause_in_time_is_released() {
        use crate::guest::control::Control;
        let c = Control::create().unwrap();
        // Alive (this process), with one vCPU that never parks.
        let me = std::process::id() as i32;
        let t = std::time::Instant::now();
        let e = super::park_within(&c, 1, me, Duration::from_secs(1)).unwrap_err();
        assert!(t.elapsed() >= Duration::from_secs(1), "{:?}", t.elapsed());
        assert!(
            matches!(e, super::GuestError::Timeout { pid, what: "pause", secs: 1 } if pid == me),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            format!("the guest process (pid {me}) did not pause within 1 s")
        );
        assert!(!c.pause_requested(), "the pause request is taken back");

        // The same wait succeeds once the vCPU parks.
        let vcpu = c.clone();
        let parker = std::thread::spawn(move || {
            while !vcpu.pause_requested() {
                vcpu.sleep_unless_paused(Duration::from_millis(10));
            }
            vcpu.park(0, 5, 7);
        });
        super::park_within(&c, 1, me, Duration::from_secs(60)).unwrap();
        assert_eq!(
            c.block().parked.load(std::sync::atomic::Ordering::SeqCst),
            1
        );
        c.release();
        parker.join().unwrap();
    }

    #[test]
    fn a_guest_that_died_is_not_waited_for() {
        use crate::guest::control::Control;
        let c = Control::create().unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id() as i32;
        child.wait().unwrap();
        let e = super::park_within(&c, 1, dead, Duration::from_secs(60)).unwrap_err();
        assert!(
            matches!(e, super::GuestError::Exited { pid, .. } if pid == dead),
            "{e:?}"
        );
        assert!(!c.pause_requested());
    }

    #[test]
    fn the_start_timeout_grows_with_memory() {
        assert_eq!(super::start_timeout(0), Duration::from_secs(20));
        assert_eq!(super::start_timeout(8 << 30), Duration::from_secs(100));
    }
}
