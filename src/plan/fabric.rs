//! Links shared by many simulated migrations, on one clock.
//!
//! Each migration of a simulated plan runs in a thread of its own, stepped
//! by the same state machine as a real one; whenever it needs time to pass
//! (bytes to move, a fixed cost, its turn to start) it blocks here. Once
//! every migration still running is blocked, the fabric advances the clock
//! to the next moment one of them can go on: the end of a transfer, at the
//! rates a max-min fair share of the links gives every transfer under way,
//! or the end of a wait. So rates change exactly when a transfer starts or
//! ends, the result does not depend on how threads are scheduled, and a
//! migration's round lasts as long as its share of the links allows.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// Bytes a transfer may be short of its size and still be done (rounding).
const EPS_BYTES: f64 = 1e-3;

/// What decides who starts when (a plan's strategy).
pub trait Starter: Send {
    /// Participants to start now, at the beginning.
    fn start(&mut self) -> Vec<usize>;
    /// Participant `i` finished: those to start now.
    fn finished(&mut self, i: usize) -> Vec<usize>;
}

/// What a blocked participant waits for.
#[derive(Clone, Debug)]
enum Wait {
    /// Its turn to start.
    Turn,
    /// The clock to reach this time (seconds).
    Until(f64),
    /// Bytes to move over these links, at most at `cap` bytes/s.
    Transfer {
        remaining: f64,
        path: Vec<usize>,
        cap: Option<f64>,
    },
}

struct State {
    /// Seconds since the plan started.
    now: f64,
    /// Link capacities, bytes/s, and the bytes each has carried.
    capacity: Vec<f64>,
    carried: Vec<f64>,
    /// Per participant: what it waits for, and whether that has come.
    waits: Vec<Option<(Wait, bool)>>,
    /// Started before it asked for its turn.
    started: Vec<bool>,
    /// Participants that have not left, and those of them blocked here.
    live: usize,
    blocked: usize,
    starter: Box<dyn Starter>,
}

/// Links and a clock shared by `n` participants.
pub struct Fabric {
    state: Mutex<State>,
    /// One per participant: only those whose wait ends are woken.
    cv: Vec<Condvar>,
}

impl Fabric {
    /// A fabric of links with these capacities (bytes/s) for `n`
    /// participants, started by `starter`.
    pub fn new(capacity: Vec<f64>, n: usize, mut starter: Box<dyn Starter>) -> Self {
        let mut started = vec![false; n];
        for i in starter.start() {
            started[i] = true;
        }
        Self {
            state: Mutex::new(State {
                now: 0.0,
                carried: vec![0.0; capacity.len()],
                capacity,
                waits: vec![None; n],
                started,
                live: n,
                blocked: 0,
                starter,
            }),
            cv: (0..n).map(|_| Condvar::new()).collect(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The clock, seconds since the plan started.
    pub fn now(&self) -> f64 {
        self.lock().now
    }

    /// Bytes each link has carried so far.
    pub fn carried(&self) -> Vec<f64> {
        self.lock().carried.clone()
    }

    /// Wait for participant `i`'s turn; the time it starts.
    pub fn wait_turn(&self, i: usize) -> f64 {
        self.block(i, Wait::Turn);
        self.now()
    }

    /// Let `d` pass for participant `i`.
    pub fn sleep(&self, i: usize, d: Duration) -> Duration {
        let until = self.now() + d.as_secs_f64();
        self.block(i, Wait::Until(until))
    }

    /// Move `bytes` over `path` (link indices) at most at `cap` bytes/s:
    /// the time it took.
    pub fn transfer(&self, i: usize, bytes: f64, path: &[usize], cap: Option<f64>) -> Duration {
        if bytes <= EPS_BYTES {
            return Duration::ZERO;
        }
        let w = Wait::Transfer {
            remaining: bytes,
            path: path.to_vec(),
            cap,
        };
        self.block(i, w)
    }

    /// Participant `i` is done: it no longer holds the clock back, and the
    /// starter may start others.
    pub fn leave(&self, i: usize) {
        let mut s = self.lock();
        s.live -= 1;
        let next = s.starter.finished(i);
        let mut woken = Vec::new();
        for j in next {
            s.started[j] = true;
            if let Some((Wait::Turn, done)) = &mut s.waits[j] {
                *done = true;
                s.blocked -= 1;
                woken.push(j);
            }
        }
        if s.live > 0 && s.blocked == s.live {
            woken.extend(advance(&mut s));
        }
        drop(s);
        for j in woken {
            self.cv[j].notify_one();
        }
    }

    /// Block participant `i` until its wait is over; the time that took.
    fn block(&self, i: usize, w: Wait) -> Duration {
        let mut s = self.lock();
        let t0 = s.now;
        if matches!(w, Wait::Turn) && s.started[i] {
            return Duration::ZERO;
        }
        s.waits[i] = Some((w, false));
        s.blocked += 1;
        if s.blocked == s.live {
            for j in advance(&mut s) {
                self.cv[j].notify_one();
            }
        }
        while !matches!(s.waits[i], Some((_, true))) {
            s = self.cv[i].wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.waits[i] = None;
        Duration::from_secs_f64((s.now - t0).max(0.0))
    }
}

/// Every participant is blocked: move the clock to the next moment one can
/// go on, and let it (and any other whose wait ends then); those let go.
fn advance(s: &mut State) -> Vec<usize> {
    let owned: Vec<(usize, Vec<usize>, Option<f64>)> = s
        .waits
        .iter()
        .enumerate()
        .filter_map(|(i, w)| match w {
            Some((Wait::Transfer { path, cap, .. }, false)) => Some((i, path.clone(), *cap)),
            _ => None,
        })
        .collect();
    let flows: Vec<(usize, &[usize], Option<f64>)> = owned
        .iter()
        .map(|(i, p, c)| (*i, p.as_slice(), *c))
        .collect();
    let rates = max_min(&s.capacity, &flows);
    // The next end: of a transfer at its rate, or of a wait.
    let mut next: Option<(f64, usize)> = None;
    for (k, &(i, _, _)) in flows.iter().enumerate() {
        if let (Some((Wait::Transfer { remaining, .. }, _)), true) = (&s.waits[i], rates[k] > 0.0) {
            let dt = remaining / rates[k];
            if next.is_none_or(|(best, _)| dt < best) {
                next = Some((dt, i));
            }
        }
    }
    for (i, w) in s.waits.iter().enumerate() {
        if let Some((Wait::Until(t), false)) = w {
            let dt = (t - s.now).max(0.0);
            if next.is_none_or(|(best, _)| dt < best) {
                next = Some((dt, i));
            }
        }
    }
    let (dt, first) =
        next.expect("every migration of the plan waits for its turn: the strategy started none");
    s.now += dt;
    let now = s.now;
    for (k, &(i, path, _)) in flows.iter().enumerate() {
        for &l in path {
            s.carried[l] += rates[k] * dt;
        }
        if let Some((Wait::Transfer { remaining, .. }, _)) = &mut s.waits[i] {
            *remaining -= rates[k] * dt;
        }
    }
    let mut woken = Vec::new();
    for (i, slot) in s.waits.iter_mut().enumerate() {
        let Some((w, done)) = slot else { continue };
        let over = match w {
            Wait::Until(t) => *t <= now,
            Wait::Transfer { remaining, .. } => *remaining <= EPS_BYTES,
            Wait::Turn => false,
        };
        // The one that set the step ends now, whatever the rounding.
        if (over || i == first) && !*done {
            *done = true;
            woken.push(i);
        }
    }
    s.blocked -= woken.len();
    woken
}

/// Max-min fair rates of `flows` (each a path of links and an optional
/// cap) over links of `capacity`: every flow's rate grows alike until a
/// link it crosses is full or it reaches its cap; then the others go on.
pub fn max_min(capacity: &[f64], flows: &[(usize, &[usize], Option<f64>)]) -> Vec<f64> {
    let mut rate = vec![0.0; flows.len()];
    let mut frozen: Vec<bool> = flows
        .iter()
        .map(|f| f.1.is_empty() && f.2.is_none())
        .collect();
    let mut residual = capacity.to_vec();
    loop {
        let mut on_link = vec![0usize; capacity.len()];
        for (k, f) in flows.iter().enumerate() {
            if !frozen[k] {
                for &l in f.1 {
                    on_link[l] += 1;
                }
            }
        }
        let mut inc = f64::INFINITY;
        for (l, &n) in on_link.iter().enumerate() {
            if n > 0 {
                inc = inc.min(residual[l] / n as f64);
            }
        }
        for (k, f) in flows.iter().enumerate() {
            if let (false, Some(cap)) = (frozen[k], f.2) {
                inc = inc.min(cap - rate[k]);
            }
        }
        if !inc.is_finite() {
            return rate;
        }
        let inc = inc.max(0.0);
        for (k, f) in flows.iter().enumerate() {
            if !frozen[k] {
                rate[k] += inc;
                for &l in f.1 {
                    residual[l] -= inc;
                }
            }
        }
        let full: Vec<bool> = residual
            .iter()
            .zip(capacity)
            .map(|(r, c)| *r <= c * 1e-12)
            .collect();
        for (k, f) in flows.iter().enumerate() {
            let capped = f.2.is_some_and(|c| rate[k] >= c * (1.0 - 1e-12));
            if capped || f.1.iter().any(|&l| full[l]) {
                frozen[k] = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// By hand: links A out (100), C in (100), D in (30). Flows A->C, B->C,
    /// A->D. A->D is held to 30 by D; A->C and B->C share C's 100, and A's
    /// 100 leaves A->C room for 70, so they split C evenly: 50 and 50.
    #[test]
    fn max_min_by_hand() {
        let (a_out, b_out, c_in, d_in) = (0, 1, 2, 3);
        let cap = [100.0, 100.0, 100.0, 30.0];
        let flows: [(usize, &[usize], Option<f64>); 3] = [
            (0, &[a_out, c_in], None),
            (1, &[b_out, c_in], None),
            (2, &[a_out, d_in], None),
        ];
        assert_eq!(max_min(&cap, &flows), [50.0, 50.0, 30.0]);
        // A cap below the fair share frees the rest for the others.
        let capped: [(usize, &[usize], Option<f64>); 3] = [
            (0, &[a_out, c_in], Some(10.0)),
            (1, &[b_out, c_in], None),
            (2, &[a_out, d_in], None),
        ];
        assert_eq!(max_min(&cap, &capped), [10.0, 90.0, 30.0]);
    }

    struct All;
    impl Starter for All {
        fn start(&mut self) -> Vec<usize> {
            vec![0, 1]
        }
        fn finished(&mut self, _: usize) -> Vec<usize> {
            vec![]
        }
    }

    /// Two transfers on one 100 B/s link: 100 B and 300 B. Together at 50
    /// each, the first ends at 2 s; the second then has the link alone for
    /// its last 200 B: 4 s in all. Threads, one clock.
    #[test]
    fn a_transfer_speeds_up_when_the_other_ends() {
        let f = Arc::new(Fabric::new(vec![100.0], 2, Box::new(All)));
        let run = |i: usize, bytes: f64| {
            let f = Arc::clone(&f);
            std::thread::spawn(move || {
                f.wait_turn(i);
                let took = f.transfer(i, bytes, &[0], None);
                f.leave(i);
                took
            })
        };
        let (a, b) = (run(0, 100.0), run(1, 300.0));
        assert!((a.join().unwrap().as_secs_f64() - 2.0).abs() < 1e-9);
        assert!((b.join().unwrap().as_secs_f64() - 4.0).abs() < 1e-9);
        assert!((f.carried()[0] - 400.0).abs() < 1e-6);
    }

    struct OneByOne(usize);
    impl Starter for OneByOne {
        fn start(&mut self) -> Vec<usize> {
            vec![0]
        }
        fn finished(&mut self, i: usize) -> Vec<usize> {
            (i + 1 < self.0).then_some(i + 1).into_iter().collect()
        }
    }

    /// Sequential: each waits for its turn, then has the link alone.
    #[test]
    fn turns_follow_the_starter() {
        let n = 3;
        let f = Arc::new(Fabric::new(vec![10.0], n, Box::new(OneByOne(n))));
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let f = Arc::clone(&f);
                std::thread::spawn(move || {
                    let start = f.wait_turn(i);
                    f.sleep(i, Duration::from_secs(1));
                    f.transfer(i, 10.0, &[0], None);
                    f.leave(i);
                    start
                })
            })
            .collect();
        let starts: Vec<f64> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(starts, [0.0, 2.0, 4.0]);
    }
}
