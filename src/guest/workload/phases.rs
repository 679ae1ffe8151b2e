//! `phases:SPEC@DUR+SPEC@DUR...`: a sequence of workloads, each for its
//! duration of guest run time, repeating.
//!
//! Items are joined by `+` and each ends in `@DURATION` (humantime: `500ms`,
//! `2s`); the spec before the `@` is any other kind with its own keys, so
//! `phases:idle@2s+sweep:from=0,to=8M@1s+hotset:wws=8M,rate=20k@3s` idles,
//! sweeps, then runs a hot set, and starts over. Guest run time is each
//! vCPU's clock, which stops while the guest is paused and travels in the
//! device state: a migrated guest continues in the phase it was in. A
//! sweep phase restarts from the start of its range each time it begins.

use std::time::Duration;

use super::Layout;

/// The phases of a workload, laid over a memory.
#[derive(Clone, Debug, PartialEq)]
pub struct Phases {
    pub items: Vec<(Layout, Duration)>,
    /// One pass over every phase (never zero: the parser refuses that).
    pub period: Duration,
}

impl Phases {
    pub fn new(items: Vec<(Layout, Duration)>) -> Self {
        let period = items.iter().map(|(_, d)| *d).sum();
        Self { items, period }
    }

    /// The phase in force at guest time `t` and how long it lasts from `t`.
    pub fn at(&self, t: Duration) -> (usize, Duration) {
        let period = self.period.as_nanos().max(1);
        // u64 from a remainder below a period of Durations.
        let mut into = Duration::from_nanos((t.as_nanos() % period) as u64);
        for (i, (_, d)) in self.items.iter().enumerate() {
            if into < *d {
                return (i, *d - into);
            }
            into -= *d;
        }
        // Rounding at the very end of a period: the first phase begins.
        let first = self.items.iter().position(|(_, d)| !d.is_zero());
        let i = first.unwrap_or(0);
        (i, self.items[i].1)
    }
}
