//! In which order, and how many at a time, a plan's migrations run.

use std::fmt;
use std::str::FromStr;

use crate::plan::fabric::Starter;

/// How many migrations run at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// One at a time.
    Sequential,
    /// All at once.
    Parallel,
    /// At most K at a time; the next starts when one ends.
    Batch(usize),
    /// Free K source hosts at a time: all the VMs of a host together; the
    /// next host starts when one is empty.
    PerHost(usize),
    /// Chosen from predictions: the order and the level of parallelism.
    Auto,
}

/// A strategy that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StrategyError {
    #[error("expected sequential, parallel, batch:K, per-host:K or auto")]
    Unknown,
    #[error("K must be a whole number of at least 1, like batch:2")]
    K,
}

impl FromStr for Strategy {
    type Err = StrategyError;

    fn from_str(s: &str) -> Result<Self, StrategyError> {
        let k = |n: &str| match n.trim().parse::<usize>() {
            Ok(k) if k >= 1 => Ok(k),
            _ => Err(StrategyError::K),
        };
        match s.trim() {
            "sequential" => Ok(Strategy::Sequential),
            "parallel" => Ok(Strategy::Parallel),
            "auto" => Ok(Strategy::Auto),
            t => {
                if let Some(n) = t.strip_prefix("batch:") {
                    Ok(Strategy::Batch(k(n)?))
                } else if let Some(n) = t.strip_prefix("per-host:") {
                    Ok(Strategy::PerHost(k(n)?))
                } else {
                    Err(StrategyError::Unknown)
                }
            }
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Strategy::Sequential => f.write_str("sequential"),
            Strategy::Parallel => f.write_str("parallel"),
            Strategy::Batch(k) => write!(f, "batch:{k}"),
            Strategy::PerHost(k) => write!(f, "per-host:{k}"),
            Strategy::Auto => f.write_str("auto"),
        }
    }
}

/// Decides which migrations start, as others end: the strategy over the
/// order given, honouring each migration's `after` list.
#[derive(Clone, Debug)]
pub struct Scheduler {
    strategy: Strategy,
    /// Migrations not started yet, first to start first.
    queue: Vec<usize>,
    /// Each migration's source host, and those it must wait for.
    host: Vec<usize>,
    after: Vec<Vec<usize>>,
    done: Vec<bool>,
    running: Vec<usize>,
    /// Per-host: the source hosts being freed.
    hosts_active: Vec<usize>,
}

impl Scheduler {
    /// `order`: every migration once, first to start first; `host[i]`:
    /// migration i's source host; `after[i]`: migrations i waits for.
    pub fn new(
        strategy: Strategy,
        order: Vec<usize>,
        host: Vec<usize>,
        after: Vec<Vec<usize>>,
    ) -> Self {
        let n = host.len();
        Self {
            strategy,
            queue: order,
            host,
            after,
            done: vec![false; n],
            running: Vec::new(),
            hosts_active: Vec::new(),
        }
    }

    fn ready(&self, i: usize) -> bool {
        self.after[i].iter().all(|&j| self.done[j])
    }

    /// Start what the strategy allows now.
    fn fill(&mut self) -> Vec<usize> {
        let limit = match self.strategy {
            Strategy::Sequential => 1,
            Strategy::Parallel | Strategy::PerHost(_) => usize::MAX,
            Strategy::Batch(k) => k,
            Strategy::Auto => unreachable!("auto is resolved into a batch before it runs"),
        };
        if let Strategy::PerHost(k) = self.strategy {
            // Hosts are freed in the order of their first queued VM.
            self.hosts_active.retain(|&h| {
                self.running.iter().any(|&i| self.host[i] == h)
                    || self.queue.iter().any(|&i| self.host[i] == h)
            });
            for &i in &self.queue {
                let h = self.host[i];
                if self.hosts_active.len() >= k {
                    break;
                }
                if !self.hosts_active.contains(&h) {
                    self.hosts_active.push(h);
                }
            }
        }
        let mut started = Vec::new();
        let mut k = 0;
        while k < self.queue.len() && self.running.len() < limit {
            let i = self.queue[k];
            let host_ok = !matches!(self.strategy, Strategy::PerHost(_))
                || self.hosts_active.contains(&self.host[i]);
            if host_ok && self.ready(i) {
                self.queue.remove(k);
                self.running.push(i);
                started.push(i);
            } else {
                k += 1;
            }
        }
        started
    }
}

impl Starter for Scheduler {
    fn start(&mut self) -> Vec<usize> {
        self.fill()
    }

    fn finished(&mut self, i: usize) -> Vec<usize> {
        self.done[i] = true;
        self.running.retain(|&r| r != i);
        self.fill()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(s: Strategy, host: Vec<usize>, after: Vec<Vec<usize>>) -> Vec<Vec<usize>> {
        let n = host.len();
        let mut sch = Scheduler::new(s, (0..n).collect(), host, after);
        let mut waves = vec![sch.start()];
        // Each wave's first migration ends first.
        let mut running: Vec<usize> = waves[0].clone();
        while !running.is_empty() {
            let i = running.remove(0);
            let next = sch.finished(i);
            running.extend(&next);
            if !next.is_empty() {
                waves.push(next);
            }
        }
        waves
    }

    #[test]
    fn strategies_read_back() {
        for s in ["sequential", "parallel", "batch:3", "per-host:2", "auto"] {
            assert_eq!(s.parse::<Strategy>().unwrap().to_string(), s);
        }
        assert_eq!("batch:0".parse::<Strategy>(), Err(StrategyError::K));
        assert_eq!("batch".parse::<Strategy>(), Err(StrategyError::Unknown));
    }

    #[test]
    fn batches_keep_k_running() {
        let waves = run(Strategy::Batch(2), vec![0; 5], vec![vec![]; 5]);
        assert_eq!(waves, [vec![0, 1], vec![2], vec![3], vec![4]]);
        let waves = run(Strategy::Sequential, vec![0; 3], vec![vec![]; 3]);
        assert_eq!(waves, [vec![0], vec![1], vec![2]]);
        let waves = run(Strategy::Parallel, vec![0; 3], vec![vec![]; 3]);
        assert_eq!(waves, [vec![0, 1, 2]]);
    }

    /// Per-host:1 over hosts 0, 0, 1, 1: host 0's two VMs together, then
    /// host 1's once host 0 is empty.
    #[test]
    fn per_host_frees_hosts_in_turn() {
        let waves = run(Strategy::PerHost(1), vec![0, 0, 1, 1], vec![vec![]; 4]);
        assert_eq!(waves, [vec![0, 1], vec![2, 3]]);
    }

    #[test]
    fn after_lists_hold_migrations_back() {
        // 0 waits for 2: in parallel, 1 and 2 start, then 0.
        let waves = run(
            Strategy::Parallel,
            vec![0; 3],
            vec![vec![2], vec![], vec![]],
        );
        assert_eq!(waves, [vec![1, 2], vec![0]]);
    }
}
