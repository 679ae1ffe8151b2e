//! A plan's report: each VM's usual report on the plan's clock, and the
//! plan's own figures (Kherbache et al.'s: completion time, mean and spread
//! of migration durations); JSON, CSV, a human table and a Gantt chart.

use std::path::{Path, PathBuf};

use plotters::prelude::*;
use serde::Serialize;

use crate::plan::{Plan, Vm};
use crate::report::{Report, Status};
use crate::util::units::fmt_bytes;

/// One VM's migration in a plan.
#[derive(Clone, Debug, Serialize)]
pub struct VmReport {
    pub name: String,
    pub from: String,
    pub to: String,
    /// On the plan's clock: when its migration started and ended.
    pub start_ms: f64,
    pub end_ms: f64,
    pub duration_ms: f64,
    #[serde(flatten)]
    pub report: Report,
}

impl VmReport {
    pub fn new(vm: &Vm, plan: &Plan, start_s: f64, end_s: f64, report: Report) -> Self {
        Self {
            name: vm.name.clone(),
            from: plan.hosts[vm.from].name.clone(),
            to: plan.hosts[vm.to].name.clone(),
            start_ms: start_s * 1e3,
            end_ms: end_s * 1e3,
            duration_ms: (end_s - start_s) * 1e3,
            report,
        }
    }

    fn failed(&self) -> bool {
        self.report.status != Status::Completed
    }

    /// Pre-copy converged, or did not iterate: a policy's cap or the
    /// clock ending it counts as not converging.
    fn converged(&self) -> bool {
        let r = &self.report;
        r.converged != Some(false) && r.stop_reason.as_deref() != Some("max_time")
    }
}

/// Bytes one link carried.
#[derive(Clone, Debug, Serialize)]
pub struct LinkUse {
    pub link: String,
    pub bytes: u64,
    /// The VMs (indices into [`PlanReport::vms`]) whose migrations cross it.
    #[serde(skip)]
    pub vms: Vec<usize>,
}

/// The plan's report.
#[derive(Clone, Debug, Serialize)]
pub struct PlanReport {
    pub strategy: String,
    pub simulated: bool,
    /// Plan start -> last migration ended.
    pub completion_time_ms: f64,
    pub mean_duration_ms: f64,
    pub stddev_duration_ms: f64,
    pub max_duration_ms: f64,
    pub mean_downtime_ms: f64,
    pub max_downtime_ms: f64,
    /// Migrations that failed.
    pub failed: usize,
    /// VMs whose pre-copy did not converge.
    pub not_converged: Vec<String>,
    pub links: Vec<LinkUse>,
    pub vms: Vec<VmReport>,
}

impl PlanReport {
    pub fn new(
        strategy: String,
        simulated: bool,
        vms: Vec<VmReport>,
        plan: &Plan,
        carried: &[f64],
    ) -> Self {
        let durations: Vec<f64> = vms.iter().map(|v| v.duration_ms).collect();
        let downtimes: Vec<f64> = vms.iter().filter_map(|v| v.report.downtime_ms).collect();
        let mean = |x: &[f64]| match x.len() {
            0 => 0.0,
            n => x.iter().sum::<f64>() / n as f64,
        };
        let m = mean(&durations);
        let var = mean(
            &durations
                .iter()
                .map(|d| (d - m) * (d - m))
                .collect::<Vec<_>>(),
        );
        let max = |x: &[f64]| x.iter().copied().fold(0.0, f64::max);
        let paths: Vec<Vec<usize>> = plan
            .vms
            .iter()
            .map(|v| plan.path(v).unwrap_or_default())
            .collect();
        let links = plan
            .link_names()
            .into_iter()
            .zip(carried)
            .enumerate()
            // f64 -> u64 saturates: bytes carried.
            .map(|(l, (link, &b))| LinkUse {
                link,
                bytes: b as u64,
                vms: (0..paths.len())
                    .filter(|&i| paths[i].contains(&l))
                    .collect(),
            })
            .filter(|l| l.bytes > 0)
            .collect();
        Self {
            strategy,
            simulated,
            completion_time_ms: vms.iter().map(|v| v.end_ms).fold(0.0, f64::max),
            mean_duration_ms: m,
            stddev_duration_ms: var.sqrt(),
            max_duration_ms: max(&durations),
            mean_downtime_ms: mean(&downtimes),
            max_downtime_ms: max(&downtimes),
            failed: vms.iter().filter(|v| v.failed()).count(),
            not_converged: vms
                .iter()
                .filter(|v| !v.converged())
                .map(|v| v.name.clone())
                .collect(),
            links,
            vms,
        }
    }

    /// The human table and summary.
    pub fn text(&self) -> String {
        let mut s = format!(
            "{:<12} {:>6} {:>6} {:>10} {:>10} {:>11} {:>10} {:>7} {:>10}  {}\n",
            "vm",
            "from",
            "to",
            "start s",
            "end s",
            "duration s",
            "downtime",
            "rounds",
            "sent",
            "status"
        );
        for v in &self.vms {
            let r = &v.report;
            let status = match (&r.error, v.converged()) {
                (Some(e), _) => format!("failed: {e}"),
                (None, false) => "did not converge".into(),
                (None, true) => "completed".into(),
            };
            s += &format!(
                "{:<12} {:>6} {:>6} {:>10.2} {:>10.2} {:>11.2} {:>7.1} ms {:>7} {:>10}  {status}\n",
                v.name,
                v.from,
                v.to,
                v.start_ms / 1e3,
                v.end_ms / 1e3,
                v.duration_ms / 1e3,
                r.downtime_ms.unwrap_or(0.0),
                r.rounds.len() as u64 + r.rounds_not_listed,
                fmt_bytes(r.transferred_bytes),
            );
        }
        s += &format!(
            "strategy          {}{}\ncompletion        {:.2} s\nmigration time    mean {:.2} s, sd {:.2} s, max {:.2} s\ndowntime          mean {:.1} ms, max {:.1} ms\n",
            self.strategy,
            if self.simulated { " (simulated)" } else { "" },
            self.completion_time_ms / 1e3,
            self.mean_duration_ms / 1e3,
            self.stddev_duration_ms / 1e3,
            self.max_duration_ms / 1e3,
            self.mean_downtime_ms,
            self.max_downtime_ms,
        );
        let links: Vec<String> = self
            .links
            .iter()
            .map(|l| format!("{} {}", l.link, fmt_bytes(l.bytes)))
            .collect();
        s += &format!("links             {}\n", links.join(", "));
        s += &format!("failed            {}", self.failed);
        if !self.not_converged.is_empty() {
            s += &format!("; did not converge: {}", self.not_converged.join(", "));
        }
        s.push('\n');
        s
    }

    /// One CSV line per VM (header first).
    pub fn csv(&self) -> String {
        let mut out = String::from(
            "name,from,to,start_ms,end_ms,duration_ms,downtime_ms,rounds,transferred_bytes,converged,status,error,guest_rate_before_pps,guest_rate_during_pps\n",
        );
        let quote = |t: &str| format!("\"{}\"", t.replace('"', "\"\""));
        for v in &self.vms {
            let r = &v.report;
            out += &format!(
                "{},{},{},{:.3},{:.3},{:.3},{},{},{},{},{},{},{:.1},{}\n",
                quote(&v.name),
                quote(&v.from),
                quote(&v.to),
                v.start_ms,
                v.end_ms,
                v.duration_ms,
                r.downtime_ms.map_or(String::new(), |d| format!("{d:.3}")),
                r.rounds.len(),
                r.transferred_bytes,
                v.converged(),
                if v.failed() { "failed" } else { "completed" },
                quote(r.error.as_deref().unwrap_or("")),
                r.guest_dirty_rate_pps,
                r.guest_rate_precopy_pps
                    .map_or(String::new(), |g| format!("{g:.1}")),
            );
        }
        out
    }

    /// Write plan.json, plan.csv and gantt.svg into `dir`; the paths.
    pub fn write(&self, dir: &Path) -> Result<Vec<PathBuf>, PlanWriteError> {
        let fail = |path: &Path| {
            let path = path.to_path_buf();
            move |e: std::io::Error| PlanWriteError {
                path,
                why: e.to_string(),
            }
        };
        std::fs::create_dir_all(dir).map_err(fail(dir))?;
        let json = dir.join("plan.json");
        let text = serde_json::to_vec_pretty(self).expect("a report serialises");
        std::fs::write(&json, text).map_err(fail(&json))?;
        let csv = dir.join("plan.csv");
        std::fs::write(&csv, self.csv()).map_err(fail(&csv))?;
        let svg = dir.join("gantt.svg");
        self.gantt(&svg).map_err(|why| PlanWriteError {
            path: svg.clone(),
            why,
        })?;
        Ok(vec![json, csv, svg])
    }

    /// One bar per VM from its start to its end, round ends as ticks, the
    /// downtime in red at the end; failed migrations hatched grey.
    fn gantt(&self, path: &Path) -> Result<(), String> {
        let n = self.vms.len();
        let bars = (80 + 24 * n as u32).min(4000);
        let area = SVGBackend::new(path, (900, bars + LINKS_HEIGHT)).into_drawing_area();
        area.fill(&WHITE).map_err(|e| e.to_string())?;
        let (area, under) = area.split_vertically(bars);
        let end = (self.completion_time_ms / 1e3).max(1e-3);
        self.links_use(&under, end)?;
        let mut chart = ChartBuilder::on(&area)
            .caption(
                format!("{}: {} VMs, {:.1} s", self.strategy, n, end),
                ("sans-serif", 18),
            )
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(90)
            .build_cartesian_2d(0.0..end * 1.02, 0.0..n as f64)
            .map_err(|e| e.to_string())?;
        let names: Vec<String> = self.vms.iter().map(|v| v.name.clone()).collect();
        chart
            .configure_mesh()
            .x_desc("seconds since the plan started")
            .y_labels(n.min(60))
            .y_label_formatter(&|y| {
                let i = *y as usize;
                names
                    .get(n.saturating_sub(i + 1))
                    .cloned()
                    .unwrap_or_default()
            })
            .disable_y_mesh()
            .draw()
            .map_err(|e| e.to_string())?;
        for (k, v) in self.vms.iter().enumerate() {
            let y = (n - k - 1) as f64;
            let (s, e) = (v.start_ms / 1e3, v.end_ms / 1e3);
            let color = if v.failed() {
                RGBColor(160, 160, 160)
            } else if !v.converged() {
                RGBColor(255, 160, 60)
            } else {
                RGBColor(31, 119, 180)
            };
            let bar = Rectangle::new([(s, y + 0.15), (e, y + 0.85)], color.filled());
            chart
                .draw_series(std::iter::once(bar))
                .map_err(|e| e.to_string())?;
            let ticks = v.report.rounds.iter().map(|r| {
                let t = s + r.end_ms / 1e3;
                PathElement::new(vec![(t, y + 0.15), (t, y + 0.85)], WHITE.stroke_width(1))
            });
            chart.draw_series(ticks).map_err(|e| e.to_string())?;
            if let Some(d) = v.report.downtime_ms {
                let down = Rectangle::new([(e - d / 1e3, y + 0.1), (e, y + 0.9)], RED.filled());
                chart
                    .draw_series(std::iter::once(down))
                    .map_err(|e| e.to_string())?;
            }
        }
        area.present().map_err(|e| e.to_string())
    }
}

/// Height of the Gantt chart's links panel, pixels.
const LINKS_HEIGHT: u32 = 220;

impl PlanReport {
    /// Under the bars: each link's rate over time (its migrations' rounds,
    /// each round's bytes spread over its duration), the busiest links.
    fn links_use<DB: DrawingBackend>(
        &self,
        area: &DrawingArea<DB, plotters::coord::Shift>,
        end: f64,
    ) -> Result<(), String> {
        const STEPS: usize = 300;
        let step = end / STEPS as f64;
        let mut links: Vec<&LinkUse> = self.links.iter().collect();
        links.sort_by_key(|l| std::cmp::Reverse(l.bytes));
        links.truncate(4);
        let series: Vec<Vec<f64>> = links
            .iter()
            .map(|l| {
                let mut mbps = vec![0.0; STEPS];
                for &i in &l.vms {
                    let v = &self.vms[i];
                    for r in &v.report.rounds {
                        let t1 = (v.start_ms + r.end_ms) / 1e3;
                        let t0 = t1 - r.duration_ms / 1e3;
                        if r.duration_ms <= 0.0 {
                            continue;
                        }
                        // u64 -> f64: a byte count.
                        let rate = r.bytes as f64 * 8.0 / 1e6 / (r.duration_ms / 1e3);
                        for (k, m) in mbps.iter_mut().enumerate() {
                            let (a, b) = (k as f64 * step, (k + 1) as f64 * step);
                            let overlap = (t1.min(b) - t0.max(a)).max(0.0);
                            *m += rate * overlap / step;
                        }
                    }
                }
                mbps
            })
            .collect();
        let top = series.iter().flatten().copied().fold(1.0, f64::max);
        let mut chart = ChartBuilder::on(area)
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(90)
            .build_cartesian_2d(0.0..end * 1.02, 0.0..top * 1.1)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .y_desc("link Mbit/s")
            .x_desc("seconds since the plan started")
            .draw()
            .map_err(|e| e.to_string())?;
        for (k, (l, mbps)) in links.iter().zip(&series).enumerate() {
            let color = Palette99::pick(k).to_rgba();
            let points: Vec<(f64, f64)> = mbps
                .iter()
                .enumerate()
                .map(|(i, &m)| ((i as f64 + 0.5) * step, m))
                .collect();
            let line = PathElement::new(points, color.stroke_width(2));
            chart
                .draw_series(std::iter::once(line))
                .map_err(|e| e.to_string())?
                .label(l.link.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
                });
        }
        if !links.is_empty() {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

/// A plan report that could not be written.
#[derive(Debug, thiserror::Error)]
#[error("writing {}: {why}", path.display())]
pub struct PlanWriteError {
    pub path: PathBuf,
    pub why: String,
}
