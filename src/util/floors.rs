//! What the steps of a downtime cost at the least on this machine: the
//! floor each phase is measured against (`livemig floors`).
//!
//! - `signal_stop`: SIGSTOP a child process blocked in a wait, and wait
//!   (`waitpid(WUNTRACED)`) until the kernel reports it stopped: the bare
//!   form of pausing a guest.
//! - `futex_wake`: one thread wakes another blocked on a futex word and is
//!   woken back; half that round trip is one wake-up, the unit a pause
//!   (park the vCPUs) and a resume (start them) are made of.
//! - `loopback_rtt`: 8 bytes to a thread over loopback TCP (no delay) and
//!   8 bytes back: the least a request and its answer cost (the device
//!   state and the destination's `Resumed`).
//!
//! Each is sampled `samples` times; percentiles in microseconds.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use linux_futex::{AsFutex, Private};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// Errors measuring a floor.
#[derive(Debug, thiserror::Error)]
pub enum FloorError {
    #[error("cannot start the child process to signal")]
    Spawn(#[source] std::io::Error),
    #[error("signalling the child process")]
    Signal(#[source] nix::Error),
    #[error("the child process did not stop (status {0})")]
    NotStopped(String),
    #[error("loopback TCP")]
    Loopback(#[source] std::io::Error),
}

/// The distribution of one floor, in microseconds.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Spread {
    pub samples: usize,
    pub p50_us: f64,
    pub p99_us: f64,
    pub min_us: f64,
}

impl Spread {
    /// Of `samples` (any order; at least one).
    pub fn of(mut samples: Vec<Duration>) -> Spread {
        assert!(!samples.is_empty(), "at least one sample");
        samples.sort();
        let at = |q: f64| {
            let i = ((samples.len() - 1) as f64 * q).round() as usize;
            samples[i].as_secs_f64() * 1e6
        };
        Spread {
            samples: samples.len(),
            p50_us: at(0.5),
            p99_us: at(0.99),
            min_us: at(0.0),
        }
    }
}

/// Every floor.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Floors {
    pub signal_stop: Spread,
    pub futex_wake: Spread,
    pub loopback_rtt: Spread,
}

/// Measure every floor with `samples` samples each.
pub fn measure(samples: usize) -> Result<Floors, FloorError> {
    let samples = samples.max(1);
    Ok(Floors {
        signal_stop: signal_stop(samples)?,
        futex_wake: futex_wake(samples),
        loopback_rtt: loopback_rtt(samples)?,
    })
}

/// SIGSTOP a sleeping child until it is reported stopped; SIGCONT it
/// (untimed) for the next sample.
pub fn signal_stop(samples: usize) -> Result<Spread, FloorError> {
    let mut child = Command::new("sleep")
        .arg("600")
        .stdin(Stdio::null())
        .spawn()
        .map_err(FloorError::Spawn)?;
    let pid = Pid::from_raw(child.id() as i32);
    let measured = (|| {
        let mut took = Vec::with_capacity(samples);
        for _ in 0..samples {
            let t = Instant::now();
            kill(pid, Signal::SIGSTOP).map_err(FloorError::Signal)?;
            match waitpid(pid, Some(WaitPidFlag::WUNTRACED)).map_err(FloorError::Signal)? {
                WaitStatus::Stopped(..) => took.push(t.elapsed()),
                other => return Err(FloorError::NotStopped(format!("{other:?}"))),
            }
            kill(pid, Signal::SIGCONT).map_err(FloorError::Signal)?;
            waitpid(pid, Some(WaitPidFlag::WCONTINUED)).map_err(FloorError::Signal)?;
        }
        Ok(Spread::of(took))
    })();
    let _ = child.kill();
    let _ = child.wait();
    measured
}

/// Half a futex ping-pong between two threads.
pub fn futex_wake(samples: usize) -> Spread {
    let word = AtomicU32::new(0);
    let futex = AsFutex::<Private>::as_futex(&word);
    let mut took = Vec::with_capacity(samples);
    std::thread::scope(|s| {
        s.spawn(|| {
            // Even values are the measuring thread's turn, odd ones ours.
            for i in 0..samples as u32 {
                let mine = 2 * i + 1;
                while word.load(Ordering::Acquire) != mine {
                    let _ = futex.wait(mine - 1);
                }
                word.store(mine + 1, Ordering::Release);
                futex.wake(1);
            }
        });
        for i in 0..samples as u32 {
            let t = Instant::now();
            word.store(2 * i + 1, Ordering::Release);
            futex.wake(1);
            while word.load(Ordering::Acquire) != 2 * i + 2 {
                let _ = futex.wait(2 * i + 1);
            }
            took.push(t.elapsed() / 2);
        }
    });
    Spread::of(took)
}

/// 8 bytes there and back over loopback TCP.
pub fn loopback_rtt(samples: usize) -> Result<Spread, FloorError> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(FloorError::Loopback)?;
    let addr = listener.local_addr().map_err(FloorError::Loopback)?;
    std::thread::scope(|s| {
        let echo = s.spawn(move || -> std::io::Result<()> {
            let (mut sock, _) = listener.accept()?;
            sock.set_nodelay(true)?;
            let mut b = [0u8; 8];
            for _ in 0..samples {
                sock.read_exact(&mut b)?;
                sock.write_all(&b)?;
            }
            Ok(())
        });
        let measured = (|| {
            let mut sock = TcpStream::connect(addr)?;
            sock.set_nodelay(true)?;
            let mut took = Vec::with_capacity(samples);
            let mut b = [0u8; 8];
            for _ in 0..samples {
                let t = Instant::now();
                sock.write_all(&b)?;
                sock.read_exact(&mut b)?;
                took.push(t.elapsed());
            }
            Ok(Spread::of(took))
        })();
        let echoed = echo.join().expect("the echo thread panicked");
        let spread = measured.map_err(FloorError::Loopback)?;
        echoed.map_err(FloorError::Loopback)?;
        Ok(spread)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_known_spread() {
        let s = Spread::of((1..=100).rev().map(Duration::from_micros).collect());
        assert_eq!(
            (s.samples, s.min_us, s.p50_us, s.p99_us),
            (100, 1.0, 51.0, 99.0)
        );
    }

    #[test]
    fn every_floor_measures() {
        let f = measure(5).unwrap();
        for s in [&f.signal_stop, &f.futex_wake, &f.loopback_rtt] {
            assert_eq!(s.samples, 5);
            assert!(s.min_us > 0.0 && s.min_us <= s.p50_us && s.p50_us <= s.p99_us);
        }
    }
}
