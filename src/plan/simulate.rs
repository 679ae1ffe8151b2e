//! A plan simulated: every VM's migration predicted by the simulator (or
//! the model), stepped by the migration state machine, with its rounds
//! timed by its share of the links ([`Fabric`]).

use std::sync::Arc;
use std::time::Duration;

use crate::plan::fabric::Fabric;
use crate::plan::report::{PlanReport, VmReport};
use crate::plan::strategy::{Scheduler, Strategy};
use crate::plan::Plan;
use crate::predict::model::{self, Variant};
use crate::predict::simulate::{self, Network, SimConfig, SimulateError};
use crate::report::Report;
use crate::util::page::PageSize;

/// What a simulated plan assumes beyond the plan.
#[derive(Clone, Debug)]
pub struct Assumptions {
    /// The analytical model's variant instead of the simulator (faster for
    /// big plans).
    pub model: Option<Variant>,
    pub round_overhead: Duration,
    pub downtime_overhead: Duration,
    pub setup: Duration,
}

impl Default for Assumptions {
    /// The defaults of `livemig simulate`.
    fn default() -> Self {
        Self {
            model: None,
            round_overhead: Duration::from_micros(100),
            downtime_overhead: Duration::from_micros(500),
            setup: Duration::from_millis(1),
        }
    }
}

/// One migration's view of the fabric.
struct Share {
    fabric: Arc<Fabric>,
    id: usize,
    path: Vec<usize>,
}

impl Network for Share {
    fn transfer(&mut self, _: &SimConfig, bytes: u64, limit: Option<u64>, _: u32) -> Duration {
        // u64 -> f64: byte counts and rates.
        let cap = limit.map(|l| l as f64);
        self.fabric.transfer(self.id, bytes as f64, &self.path, cap)
    }

    fn pass(&mut self, d: Duration) -> Duration {
        self.fabric.sleep(self.id, d)
    }
}

/// Leaves the fabric however the migration's thread ends, so the others'
/// clock never waits for it.
struct Leave<'a>(&'a Fabric, usize);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        self.0.leave(self.1);
    }
}

/// Simulate `plan` under `strategy` (not `auto`: see [`choose`]).
pub fn run(plan: &Plan, strategy: Strategy, a: &Assumptions) -> PlanReport {
    let n = plan.vms.len();
    let paths: Vec<Vec<usize>> = plan
        .vms
        .iter()
        .map(|v| plan.path(v).expect("checked when the plan was made"))
        .collect();
    let scheduler = Scheduler::new(
        strategy,
        plan.order.clone(),
        plan.vms.iter().map(|v| v.from).collect(),
        plan.vms.iter().map(|v| v.after.clone()).collect(),
    );
    let fabric = Arc::new(Fabric::new(plan.capacities(), n, Box::new(scheduler)));
    let results: Vec<(f64, f64, Result<Report, SimulateError>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let fabric = Arc::clone(&fabric);
                let path = paths[i].clone();
                let link = path
                    .iter()
                    .map(|&l| plan.capacities()[l])
                    .fold(f64::INFINITY, f64::min);
                let cfg = SimConfig {
                    migration: plan.vms[i].migration.clone(),
                    page_size: PageSize::host(),
                    link_bytes_per_s: link,
                    round_overhead: a.round_overhead,
                    downtime_overhead: a.downtime_overhead,
                    // A plan's round overhead includes the harvest.
                    harvest_per_gib: Duration::ZERO,
                    setup: a.setup,
                };
                let model = a.model;
                std::thread::Builder::new()
                    .stack_size(1 << 20)
                    .spawn_scoped(scope, move || {
                        let _leave = Leave(&fabric, i);
                        let start = fabric.wait_turn(i);
                        let net = Share {
                            fabric: Arc::clone(&fabric),
                            id: i,
                            path,
                        };
                        let r = match model {
                            Some(v) => model::run_on(&cfg, v, net),
                            None => simulate::run_on(&cfg, net),
                        };
                        (start, fabric.now(), r)
                    })
                    .expect("a thread per simulated migration")
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a simulated migration does not panic"))
            .collect()
    });
    let vms = results
        .into_iter()
        .zip(&plan.vms)
        .map(|((start, end, r), vm)| {
            let report = r.unwrap_or_else(|e| Report {
                error: Some(crate::util::error::error_chain(&e)),
                ..vm.migration.report()
            });
            VmReport::new(vm, plan, start, end, report)
        })
        .collect();
    PlanReport::new(strategy.to_string(), true, vms, plan, &fabric.carried())
}

/// Each VM's predicted migration time with its path to itself, seconds.
pub fn alone(plan: &Plan, a: &Assumptions) -> Vec<f64> {
    plan.vms
        .iter()
        .map(|v| {
            let path = plan.path(v).expect("checked when the plan was made");
            let caps = plan.capacities();
            let cfg = SimConfig {
                migration: v.migration.clone(),
                page_size: PageSize::host(),
                link_bytes_per_s: path.iter().map(|&l| caps[l]).fold(f64::INFINITY, f64::min),
                round_overhead: a.round_overhead,
                downtime_overhead: a.downtime_overhead,
                harvest_per_gib: Duration::ZERO,
                setup: a.setup,
            };
            let r = match a.model {
                Some(variant) => model::run(&cfg, variant),
                None => simulate::run(&cfg),
            };
            r.ok()
                .and_then(|r| r.migration_time_ms)
                .map_or(f64::INFINITY, |t| t / 1e3)
        })
        .collect()
}

/// The plan in order of predicted migration time alone, shortest first.
pub fn shortest_first(plan: &mut Plan, a: &Assumptions) {
    let t = alone(plan, a);
    plan.order
        .sort_by(|&i, &j| t[i].total_cmp(&t[j]).then(i.cmp(&j)));
}

/// `auto`: shortest first, and the level of parallelism (1, 2, 3, 4, 6,
/// 8, ... all) whose simulated plan has every migration converging and the
/// least mean migration time, among those that finish the whole plan no
/// more than 5 % later than the quickest such level. Returns the chosen
/// strategy and every candidate's report.
pub fn choose(plan: &mut Plan, a: &Assumptions) -> (Strategy, Vec<PlanReport>) {
    shortest_first(plan, a);
    let n = plan.vms.len();
    let mut levels: Vec<usize> = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]
        .into_iter()
        .filter(|&k| k < n)
        .collect();
    levels.push(n);
    let tried: Vec<PlanReport> = levels
        .iter()
        .map(|&k| run(plan, Strategy::Batch(k), a))
        .collect();
    let ok: Vec<&PlanReport> = tried
        .iter()
        .filter(|r| r.failed == 0 && r.not_converged.is_empty())
        .collect();
    let pool = if ok.is_empty() {
        tried.iter().collect()
    } else {
        ok
    };
    let quickest = pool
        .iter()
        .map(|r| r.completion_time_ms)
        .fold(f64::INFINITY, f64::min);
    let best = pool
        .iter()
        .filter(|r| r.completion_time_ms <= quickest * 1.05)
        .min_by(|x, y| x.mean_duration_ms.total_cmp(&y.mean_duration_ms))
        .expect("at least one level is tried");
    let k = levels[tried
        .iter()
        .position(|r| std::ptr::eq(r, *best))
        .expect("best is one of those tried")];
    (Strategy::Batch(k), tried)
}
