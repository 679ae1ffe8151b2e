//! The timeline sampler: a thread on the sender's side that reads, every
//! few milliseconds, the guest's write counters in its control block and
//! the sender's own counters (bytes through the rate limiter, the pages
//! left in the round), into [`crate::report::timeline`] samples.
//!
//! The sender tells the [`Probe`] what it does (phase, round, rate limit,
//! harvest sizes); each change of phase takes a sample at once, so a
//! downtime shorter than the period still has its edges. In a local
//! migration the destination hands the probe its guest when that resumes,
//! so the samples go on after the resume and show the guest recover; the
//! destination keeps its guest until the observation ends.
//!
//! Reading the counters costs the guest nothing but the cache line of each
//! vCPU's slot once a period (see the README for the measured cost).

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use indicatif::ProgressBar;

use crate::guest::control::Control;
use crate::report::impact;
use crate::report::timeline::{Phase, Sample};
use crate::wire::ratelimit::RateLimiter;

/// How long the sampler keeps watching a guest that has resumed at the
/// destination, when not told (`--observe`): until it recovers, at most this.
pub const OBSERVE_UNTIL_RECOVERED_MAX: Duration = Duration::from_secs(1);

/// The period for a guest of `memory_bytes`: 10 ms, finer for small guests
/// whose migration lasts tens of milliseconds.
pub fn period_for(memory_bytes: u64) -> Duration {
    match memory_bytes {
        0..=0x400_0000 => Duration::from_millis(2),
        0x400_0001..=0x1000_0000 => Duration::from_millis(5),
        _ => Duration::from_millis(10),
    }
}

/// Whether and how often a migration's timeline is sampled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Sampling {
    Off,
    /// [`period_for`] the guest's memory.
    #[default]
    Auto,
    Every(Duration),
}

impl Sampling {
    /// The period for a guest of `memory_bytes` (None: off).
    pub fn period(self, memory_bytes: u64) -> Option<Duration> {
        match self {
            Sampling::Off => None,
            Sampling::Auto => Some(period_for(memory_bytes)),
            Sampling::Every(d) if d.is_zero() => None,
            Sampling::Every(d) => Some(d),
        }
    }
}

/// What the sender shares with the sampler.
pub struct Probe {
    state: Mutex<State>,
    finished: Condvar,
}

struct State {
    origin: Instant,
    /// The migration's start (after the warm-up): t = 0.
    start: Option<Instant>,
    phase: Phase,
    round: Option<u32>,
    dirty_pages: Option<u64>,
    /// Whose writes are counted: a control block and its vCPUs (None:
    /// not visible from here, as after the resume in `send`).
    guest: Option<(Control, u32)>,
    /// The counters at the last sample: (when, writes).
    last: Option<(Instant, u64)>,
    /// Operations done so far, for workloads that count operations rather
    /// than writes ([`Probe::count_operations`]), and its last reading.
    operations: Option<Box<dyn Fn() -> u64 + Send>>,
    last_operations: Option<(Instant, u64)>,
    progress: Option<ProgressBar>,
    limiter: Option<RateLimiter>,
    /// (when, sample with t_ms still to set)
    samples: Vec<(Instant, Sample)>,
    resumed: Option<Instant>,
    /// The destination holds its guest for the observation.
    destination_attached: bool,
    finished: bool,
}

impl Probe {
    /// A probe counting the writes of `vcpus` vCPUs in `control`.
    pub fn new(control: Control, vcpus: u32) -> Arc<Self> {
        let now = Instant::now();
        let ops = control.ops(vcpus);
        Arc::new(Self {
            state: Mutex::new(State {
                origin: now,
                start: None,
                phase: Phase::Warmup,
                round: None,
                dirty_pages: None,
                guest: Some((control, vcpus)),
                last: Some((now, ops)),
                operations: None,
                last_operations: None,
                progress: None,
                limiter: None,
                samples: Vec::new(),
                resumed: None,
                destination_attached: false,
                finished: false,
            }),
            finished: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The sender's counters: its progress bar (pages of the round) and
    /// its rate limiter (bytes through, the limit).
    pub fn attach_sender(&self, progress: &ProgressBar, limiter: &RateLimiter) {
        let mut s = self.lock();
        s.progress = Some(progress.clone());
        s.limiter = Some(limiter.clone());
    }

    /// The hook for workloads whose progress is operations, not writes:
    /// `count` returns the operations done so far; samples then carry
    /// `guest_ops_rate`. Set it again with the destination's counter when
    /// the guest resumes there.
    pub fn count_operations(&self, count: Box<dyn Fn() -> u64 + Send>) {
        let mut s = self.lock();
        s.last_operations = Some((Instant::now(), count()));
        s.operations = Some(count);
    }

    /// Take a sample now.
    pub fn sample(&self) {
        self.lock().sample();
    }

    /// The migration starts (the warm-up is over): t = 0.
    pub fn start(&self) {
        let mut s = self.lock();
        s.sample();
        s.start = Some(Instant::now());
        s.phase = Phase::Setup;
    }

    /// A change of phase, sampled at once; `round` for pre-copy.
    pub fn phase(&self, phase: Phase, round: Option<u32>) {
        let mut s = self.lock();
        s.sample();
        if phase.after_resume() && s.resumed.is_none() {
            s.resumed = Some(Instant::now());
            if !s.destination_attached {
                // The guest runs elsewhere, out of sight.
                s.guest = None;
            }
        }
        s.phase = phase;
        s.round = round;
    }

    /// A harvest found `pages` dirty (shown on the next sample).
    pub fn harvested(&self, pages: u64) {
        self.lock().dirty_pages = Some(pages);
    }

    /// Destination (local runs): its guest runs now; count its writes from
    /// here on, and keep it until [`Sampler::finish`].
    pub fn attach_destination(&self, control: Control, vcpus: u32) {
        let mut s = self.lock();
        s.sample();
        let now = Instant::now();
        s.last = Some((now, control.ops(vcpus)));
        if s.operations.is_some() {
            // The guest's operations go on at the destination.
            let counter = control.clone();
            s.operations = Some(Box::new(move || counter.work_ops(vcpus)));
            s.last_operations = Some((now, control.work_ops(vcpus)));
        }
        s.guest = Some((control, vcpus));
        s.destination_attached = true;
    }

    /// Destination: wait (at most `limit`) until the observation is over,
    /// if this probe watches its guest.
    pub fn wait_observed(&self, limit: Duration) {
        let s = self.lock();
        if !s.destination_attached {
            return;
        }
        let _ = self
            .finished
            .wait_timeout_while(s, limit, |s| !s.finished)
            .map_err(|_| ());
    }

    fn finish(&self) -> (Vec<Sample>, Option<f64>) {
        let mut s = self.lock();
        s.sample();
        s.finished = true;
        self.finished.notify_all();
        let start = s.start.unwrap_or(s.origin);
        let signed_ms = |t: Instant| match t.checked_duration_since(start) {
            Some(d) => d.as_secs_f64() * 1e3,
            None => -(start - t).as_secs_f64() * 1e3,
        };
        let samples = std::mem::take(&mut s.samples)
            .into_iter()
            .map(|(t, mut x)| {
                x.t_ms = signed_ms(t);
                x
            })
            .collect();
        (samples, s.resumed.map(signed_ms))
    }

    /// The samples so far, with t_ms set, and the resume's time.
    fn snapshot(&self) -> (Vec<Sample>, Option<f64>) {
        let s = self.lock();
        let start = s.start.unwrap_or(s.origin);
        let ms = |t: Instant| match t.checked_duration_since(start) {
            Some(d) => d.as_secs_f64() * 1e3,
            None => -(start - t).as_secs_f64() * 1e3,
        };
        let v = s
            .samples
            .iter()
            .map(|(t, x)| Sample {
                t_ms: ms(*t),
                ..x.clone()
            })
            .collect();
        (v, s.resumed.map(ms))
    }
}

impl State {
    fn sample(&mut self) {
        let now = Instant::now();
        let guest_rate = match (&self.guest, self.last) {
            (Some((control, vcpus)), Some((t, ops))) => {
                let now_ops = control.ops(*vcpus);
                self.last = Some((now, now_ops));
                let dt = now.duration_since(t).as_secs_f64();
                // u64 -> f64: write counts far below 2^53.
                (dt > 0.0).then(|| now_ops.saturating_sub(ops) as f64 / dt)
            }
            _ => None,
        };
        let guest_ops_rate = match (&self.operations, self.last_operations) {
            (Some(count), Some((t, before))) => {
                let done = count();
                self.last_operations = Some((now, done));
                let dt = now.duration_since(t).as_secs_f64();
                (dt > 0.0).then(|| done.saturating_sub(before) as f64 / dt)
            }
            _ => None,
        };
        let remaining = self
            .progress
            .as_ref()
            .map_or(0, |p| p.length().unwrap_or(0).saturating_sub(p.position()));
        let (sent, limit) = self
            .limiter
            .as_ref()
            .map_or((0, None), |l| (l.bytes_through(), l.limit()));
        let sample = Sample {
            t_ms: 0.0,
            phase: self.phase,
            round: self.round,
            guest_rate,
            guest_ops_rate,
            sent_bytes: sent,
            remaining_pages: remaining,
            rate_limit_bps: limit.map(|b| b.saturating_mul(8)),
            dirty_pages: self.dirty_pages.take(),
            postcopy_requests: None,
        };
        self.samples.push((now, sample));
    }
}

/// After the migration: how long to keep watching the destination's guest.
#[derive(Clone, Copy, Debug)]
pub enum Observe {
    /// Until its rate is back within 5 % of `baseline` for 100 ms, or
    /// [`OBSERVE_UNTIL_RECOVERED_MAX`] after the resume.
    UntilRecovered,
    /// This long after the resume, whatever the rate.
    For(Duration),
}

/// The sampling thread.
pub struct Sampler {
    probe: Arc<Probe>,
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<Duration>>,
}

impl Sampler {
    /// Sample `probe` every `period` on a thread of its own.
    pub fn start(probe: Arc<Probe>, period: Duration) -> Self {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let (p, st) = (Arc::clone(&probe), Arc::clone(&stop));
        let thread = std::thread::Builder::new()
            .name("timeline".into())
            .spawn(move || {
                let (lock, cv) = &*st;
                let mut stopped = lock.lock().unwrap_or_else(|e| e.into_inner());
                let mut next = Instant::now() + period;
                while !*stopped {
                    let wait = next.saturating_duration_since(Instant::now());
                    stopped = cv
                        .wait_timeout(stopped, wait)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                    if !*stopped && Instant::now() >= next {
                        p.sample();
                        next += period;
                    }
                }
                thread_cpu_time()
            })
            .ok();
        Self {
            probe,
            stop,
            thread,
        }
    }

    pub fn probe(&self) -> &Arc<Probe> {
        &self.probe
    }

    /// Keep sampling the resumed guest as `observe` says (returns at once
    /// when no destination guest is in sight), with `baseline` its rate
    /// before the migration.
    pub fn observe(&self, observe: Observe, baseline: f64) {
        let (attached, resumed) = {
            let s = self.probe.lock();
            (s.destination_attached, s.resumed)
        };
        let Some(resumed) = resumed.filter(|_| attached) else {
            return;
        };
        self.probe.phase(Phase::Resumed, None);
        let (until, check) = match observe {
            Observe::For(d) => (resumed + d, false),
            Observe::UntilRecovered => (resumed + OBSERVE_UNTIL_RECOVERED_MAX, true),
        };
        let step = Duration::from_millis(20);
        while Instant::now() < until {
            if check {
                let (samples, at) = self.probe.snapshot();
                let recovered = impact::impact(&samples, baseline, at)
                    .and_then(|i| i.recovery_ms)
                    .is_some();
                if recovered || baseline <= 0.0 {
                    return;
                }
            }
            std::thread::sleep(step.min(until.saturating_duration_since(Instant::now())));
        }
    }

    /// Stop sampling, let a waiting destination go, and put the timeline
    /// and the guest's [`impact`] into `report` (its warm-up rate the
    /// baseline). Returns the sampler thread's CPU time.
    pub fn finish_into(self, report: &mut crate::report::Report) -> Duration {
        let (samples, resumed, cpu) = self.finish();
        report.impact = impact::impact(&samples, report.guest_dirty_rate_pps, resumed);
        report.timeline = samples;
        report.sampler_cpu_ms = Some(crate::report::ms(cpu));
        cpu
    }

    /// Stop sampling and let a waiting destination go. Returns the samples,
    /// the resume's time on their clock, and the sampler's CPU time.
    pub fn finish(mut self) -> (Vec<Sample>, Option<f64>, Duration) {
        let cpu = self.stop_thread();
        let (samples, resumed) = self.probe.finish();
        (samples, resumed, cpu)
    }

    fn stop_thread(&mut self) -> Duration {
        {
            let (lock, cv) = &*self.stop;
            *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
            cv.notify_all();
        }
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop_thread();
            let _ = self.probe.finish();
        }
    }
}

/// CPU time the calling thread has used.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid, owned `ts`.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// Phases sample at once, in order; an operations counter handed to
    /// the hook gives `guest_ops_rate`; the samples' clock starts at `start`.
    #[test]
    fn phases_are_sampled_in_order_and_the_operations_hook_gives_a_rate() {
        let probe = Probe::new(Control::create().unwrap(), 1);
        let ops = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&ops);
        probe.count_operations(Box::new(move || counter.load(Ordering::Relaxed)));
        probe.sample();
        probe.start();
        ops.store(1000, Ordering::Relaxed);
        probe.phase(Phase::Precopy, Some(0));
        probe.harvested(7);
        probe.phase(Phase::Downtime, None);
        let (samples, resumed) = probe.finish();
        let phases: Vec<_> = samples.iter().map(|s| s.phase).collect();
        assert_eq!(
            phases,
            [
                Phase::Warmup,
                Phase::Warmup,
                Phase::Setup,
                Phase::Precopy,
                Phase::Downtime
            ]
        );
        assert!(
            samples[0].t_ms <= 0.0 && samples[2].t_ms >= 0.0,
            "{samples:?}"
        );
        assert!(samples.windows(2).all(|w| w[0].t_ms <= w[1].t_ms));
        assert!(samples[2].guest_ops_rate.unwrap() > 0.0, "{samples:?}");
        assert_eq!(samples[3].guest_ops_rate, Some(0.0));
        assert_eq!(samples[3].dirty_pages, Some(7));
        // Writes are counted too (none here); no resume was seen.
        assert_eq!(samples[2].guest_rate, Some(0.0));
        assert_eq!(resumed, None);
    }
}
