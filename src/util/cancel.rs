//! Cancelling work from outside (QEMU's `migrate_cancel`): a token that
//! the work checks at its safe points, that wakes its waits at once, and
//! that runs hooks (shutting a socket that a read blocks on) when it fires.
//!
//! [`Cancel::on_signals`] fires it on the first SIGINT or SIGTERM; a
//! second one ends the process at once. The handlers come from
//! `signal-hook`: the signal only wakes a thread of ours, which does the
//! rest outside signal context.

use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A hook run once when the token fires.
type Hook = Box<dyn FnOnce() + Send>;

/// Why the work was cancelled: a signal (its number), or a plain request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    Signal(i32),
    Requested,
}

impl std::fmt::Display for Why {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Why::Signal(libc::SIGINT) => f.write_str("SIGINT"),
            Why::Signal(libc::SIGTERM) => f.write_str("SIGTERM"),
            Why::Signal(n) => write!(f, "signal {n}"),
            Why::Requested => f.write_str("request"),
        }
    }
}

impl Why {
    /// The exit status a shell gives a process killed by the signal
    /// (128 + its number); 130, as for SIGINT, for a plain request.
    pub fn exit_code(self) -> u8 {
        let n = match self {
            Why::Signal(n) => n,
            Why::Requested => libc::SIGINT,
        };
        u8::try_from(128 + n).unwrap_or(u8::MAX)
    }
}

/// Setting up the signal handlers failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot catch SIGINT and SIGTERM")]
pub struct SignalError(#[source] std::io::Error);

/// A cancellation token; clones are the same token. A new one never fires
/// unless [`Cancel::cancel`] is called.
#[derive(Clone, Default)]
pub struct Cancel {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    /// 0: not cancelled; else the signal, or -1 for a plain request.
    why: AtomicI32,
    state: Mutex<Hooks>,
    wake: Condvar,
    next_hook: AtomicU64,
}

#[derive(Default)]
struct Hooks {
    fired: bool,
    hooks: Vec<(u64, Hook)>,
}

impl std::fmt::Debug for Cancel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cancel")
            .field("cancelled", &self.why())
            .finish()
    }
}

/// Removes its hook when dropped: the work it guarded is over.
#[must_use = "the hook is removed when this is dropped"]
pub struct HookGuard {
    cancel: Cancel,
    id: u64,
}

impl Drop for HookGuard {
    fn drop(&mut self) {
        self.cancel.lock().hooks.retain(|(id, _)| *id != self.id);
    }
}

impl Cancel {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Hooks> {
        // Hooks are taken out before they run: the list stays consistent.
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Fire the token: record why (the first reason stays), wake every
    /// wait, run the hooks. Firing again does nothing.
    pub fn cancel(&self, why: Why) {
        let code = match why {
            Why::Signal(n) => n,
            Why::Requested => -1,
        };
        let _ = self
            .inner
            .why
            .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire);
        let hooks = {
            let mut s = self.lock();
            if std::mem::replace(&mut s.fired, true) {
                return;
            }
            std::mem::take(&mut s.hooks)
        };
        self.inner.wake.notify_all();
        for (_, hook) in hooks {
            hook();
        }
    }

    pub fn is_cancelled(&self) -> bool {
        self.why().is_some()
    }

    /// Why the token fired, if it has.
    pub fn why(&self) -> Option<Why> {
        match self.inner.why.load(Ordering::Acquire) {
            0 => None,
            -1 => Some(Why::Requested),
            n => Some(Why::Signal(n)),
        }
    }

    /// Run `hook` when the token fires (at once if it has), unless the
    /// guard is dropped first.
    pub fn on_cancel(&self, hook: impl FnOnce() + Send + 'static) -> HookGuard {
        let id = self.inner.next_hook.fetch_add(1, Ordering::Relaxed);
        let mut s = self.lock();
        if s.fired {
            drop(s);
            hook();
        } else {
            s.hooks.push((id, Box::new(hook)));
        }
        HookGuard {
            cancel: self.clone(),
            id,
        }
    }

    /// Sleep for `d`, or less if the token fires; whether it slept it all.
    pub fn sleep(&self, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        let mut s = self.lock();
        while !s.fired {
            let now = Instant::now();
            if now >= deadline {
                return true;
            }
            s = match self.inner.wake.wait_timeout(s, deadline - now) {
                Ok((s, _)) => s,
                Err(e) => e.into_inner().0,
            };
        }
        false
    }

    /// A token that SIGINT or SIGTERM fires. A second one ends the process
    /// at once with 128 + its number; the guests it started die with it.
    /// Call once per process, before starting the work.
    pub fn on_signals() -> Result<Cancel, SignalError> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let mut signals =
            signal_hook::iterator::Signals::new([SIGINT, SIGTERM]).map_err(SignalError)?;
        let cancel = Cancel::new();
        let token = cancel.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                // Writes to stderr ignore errors: eprintln! panics on a
                // closed pipe, and this thread must still cancel or exit.
                use std::io::Write;
                for sig in signals.forever() {
                    let why = Why::Signal(sig);
                    if token.is_cancelled() {
                        let _ =
                            writeln!(std::io::stderr(), "livemig: {why} again: exiting at once");
                        std::process::exit(i32::from(why.exit_code()));
                    }
                    token.cancel(why);
                    let _ = writeln!(
                        std::io::stderr(),
                        "livemig: {why}: cancelling (again to exit at once)"
                    );
                }
            })
            .map_err(SignalError)?;
        Ok(cancel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    #[test]
    fn fires_once_runs_live_hooks_and_wakes_sleepers() {
        let c = Cancel::new();
        assert!(!c.is_cancelled());
        assert!(c.sleep(Duration::from_millis(1)), "nothing to wake it");
        let ran = Arc::new(AtomicBool::new(false));
        let dropped = Arc::new(AtomicBool::new(false));
        let (r, d) = (Arc::clone(&ran), Arc::clone(&dropped));
        let _kept = c.on_cancel(move || r.store(true, Ordering::SeqCst));
        drop(c.on_cancel(move || d.store(true, Ordering::SeqCst)));
        let sleeper = {
            let c = c.clone();
            // A sleep far longer than any test: only the cancel ends it.
            std::thread::spawn(move || c.sleep(Duration::from_secs(3600)))
        };
        c.cancel(Why::Signal(libc::SIGTERM));
        c.cancel(Why::Signal(libc::SIGINT));
        assert!(!sleeper.join().unwrap(), "woken, not slept out");
        assert!(ran.load(Ordering::SeqCst));
        assert!(!dropped.load(Ordering::SeqCst), "its guard was dropped");
        assert_eq!(c.why(), Some(Why::Signal(libc::SIGTERM)), "the first stays");
        assert_eq!(c.why().unwrap().exit_code(), 143);
        assert_eq!(c.why().unwrap().to_string(), "SIGTERM");
        // A hook added afterwards runs at once.
        let late = Arc::new(AtomicBool::new(false));
        let l = Arc::clone(&late);
        let _g = c.on_cancel(move || l.store(true, Ordering::SeqCst));
        assert!(late.load(Ordering::SeqCst));
        assert!(!c.sleep(Duration::from_secs(3600)));
    }
}
