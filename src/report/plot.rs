//! SVG pictures of migration timelines (`--plot`, `livemig plot`), in the
//! spirit of QEMU's guestperf: the guest's work rate over time on top, with
//! the pre-copy rounds shaded and the downtime marked; the transfer rate
//! and the bytes still to send below. Several runs overlay on one time
//! axis, a colour and a legend entry each.
//!
//! Text is written as SVG `<text>` elements, so no font file is needed.

use std::error::Error;
use std::path::{Path, PathBuf};

use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::report::timeline::{phase_spans, Phase};
use crate::report::Report;

const SIZE: (u32, u32) = (1000, 760);
const FONT: &str = "sans-serif";
/// Transfer rates are taken over at least this long, so that a sample
/// taken at a change of phase does not spike.
const RATE_WINDOW_MS: f64 = 10.0;
const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
];
const ROUND_SHADES: [RGBColor; 2] = [RGBColor(225, 225, 225), RGBColor(200, 215, 235)];
const DOWNTIME: RGBColor = RGBColor(214, 39, 40);
const POSTCOPY: RGBColor = RGBColor(255, 187, 120);

/// A timeline plot that could not be drawn or written.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("{label} has no timeline to plot (a report from before timelines, or a prediction)")]
    NoTimeline { label: String },
    #[error("cannot draw {}: {why}", path.display())]
    Draw { path: PathBuf, why: String },
}

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;
type Drawn = Result<(), Box<dyn Error>>;

/// One run's series, in seconds and display units.
struct Series<'a> {
    label: &'a str,
    colour: RGBColor,
    /// (s, thousands of writes/s)
    rate: Vec<(f64, f64)>,
    /// (s, Mbit/s)
    transfer: Vec<(f64, f64)>,
    /// (s, MiB)
    remaining: Vec<(f64, f64)>,
    /// (phase, from s, to s)
    spans: Vec<(Phase, f64, f64)>,
    /// Pre-copy rounds: (round, from s, to s).
    rounds: Vec<(u32, f64, f64)>,
    downtime_ms: Option<f64>,
}

/// Steps of a quantity's rate over windows of at least `window_ms`, from
/// its cumulative totals at times in ms (None: unknown there); the rate is
/// per second divided by `unit`, at times in seconds.
fn steps(
    points: impl Iterator<Item = (f64, Option<f64>)>,
    window_ms: f64,
    unit: f64,
) -> Vec<(f64, f64)> {
    let mut out = Vec::new();
    let mut from: Option<(f64, f64)> = None;
    for (t, count) in points {
        let Some(c) = count else {
            from = None;
            continue;
        };
        let Some((t0, c0)) = from else {
            from = Some((t, c));
            continue;
        };
        let dt = t - t0;
        if dt >= window_ms {
            let rate = (c - c0) / dt * 1e3 / unit;
            out.push((t0 / 1e3, rate));
            out.push((t / 1e3, rate));
            from = Some((t, c));
        }
    }
    out
}

fn series<'a>(label: &'a str, r: &Report, colour: RGBColor) -> Series<'a> {
    let s = &r.timeline;
    let secs = |t: f64| t / 1e3;
    // Windows of a 200th of the run, at least the sampling's 10 ms: short
    // samples of a paced guest jitter.
    let span = s.last().map_or(0.0, |l| l.t_ms) - s.first().map_or(0.0, |f| f.t_ms);
    let window = (span / 200.0).max(RATE_WINDOW_MS);
    // The guest's work, integrated from its rates.
    let mut work = Vec::with_capacity(s.len());
    let mut total = Some(0.0);
    for (i, x) in s.iter().enumerate() {
        if i > 0 {
            let dt = x.t_ms - s[i - 1].t_ms;
            total = match (total, x.guest_rate) {
                (Some(w), Some(r)) => Some(w + r * dt / 1e3),
                (_, Some(_)) => Some(0.0),
                (_, None) => None,
            };
        }
        work.push(total);
    }
    let rate = steps(s.iter().map(|x| x.t_ms).zip(work), window, 1e3);
    // u64 -> f64: byte counts far below 2^53.
    let sent = s.iter().map(|x| (x.t_ms, Some(x.sent_bytes as f64)));
    let transfer = steps(sent, window, 1e6 / 8.0);
    let page = r.page_size.max(1) as f64;
    let remaining = s
        .iter()
        .map(|x| {
            (
                secs(x.t_ms),
                x.remaining_pages as f64 * page / f64::from(1 << 20),
            )
        })
        .collect();
    let spans = phase_spans(s)
        .into_iter()
        .map(|(p, a, b)| (p, secs(a), secs(b)))
        .collect();
    let rounds = r
        .rounds
        .iter()
        .filter(|x| !x.stop_and_copy && !x.postcopy)
        .map(|x| (x.round, secs(x.end_ms - x.duration_ms), secs(x.end_ms)))
        .collect();
    Series {
        label,
        colour,
        rate,
        transfer,
        remaining,
        spans,
        rounds,
        downtime_ms: r.downtime_ms,
    }
}

/// Draw the timelines of `runs` (a label and a report each) into `path`:
/// one run with its rounds shaded, several overlaid.
pub fn draw(runs: &[(String, &Report)], path: &Path) -> Result<(), PlotError> {
    if let Some((label, _)) = runs.iter().find(|(_, r)| r.timeline.len() < 2) {
        return Err(PlotError::NoTimeline {
            label: label.clone(),
        });
    }
    let all: Vec<Series> = runs
        .iter()
        .enumerate()
        .map(|(i, (l, r))| series(l, r, PALETTE[i % PALETTE.len()]))
        .collect();
    let title = match runs {
        [(_, r)] => format!(
            "{} migration of {} ({}, {})",
            r.mode, r.workload, r.policy, r.bandwidth
        ),
        _ => "Migration comparison".to_string(),
    };
    let drawn = {
        let area = SVGBackend::new(path, SIZE).into_drawing_area();
        area.fill(&WHITE)
            .map_err(Into::into)
            .and_then(|()| panels(&area, &title, &all))
            .and_then(|()| area.present().map_err(Into::into))
    };
    drawn.map_err(|e| PlotError::Draw {
        path: path.into(),
        why: e.to_string(),
    })
}

fn panels(area: &Area, title: &str, all: &[Series]) -> Drawn {
    let area = area.titled(title, (FONT, 22))?;
    let (top, rest) = area.split_vertically(area.dim_in_pixel().1 / 2);
    let (mid, low) = rest.split_vertically(rest.dim_in_pixel().1 / 2);
    let (t0, t1) = all
        .iter()
        .flat_map(|s| s.rate.iter().chain(&s.remaining).map(|p| p.0))
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), t| {
            (a.min(t), b.max(t))
        });
    // Enough of the warm-up to show the baseline, not to crowd the migration.
    let t0 = t0.max(-(0.25 * t1).max(0.2));
    let x = t0..t1.max(t0 + 1e-3);
    let single = all.len() == 1;
    let rate_max = max_of(all.iter().flat_map(|s| &s.rate));
    let mut chart = ChartBuilder::on(&top)
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(x.clone(), 0.0..rate_max * 1.25)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(TRANSPARENT)
        .y_desc("guest k writes/s")
        .axis_desc_style((FONT, 15))
        .label_style((FONT, 12))
        .draw()?;
    let top_y = rate_max * 1.25;
    for s in all {
        shade(&mut chart, s, single, top_y)?;
    }
    for s in all {
        let label = match (single, s.downtime_ms) {
            (true, _) => "guest writes/s".to_string(),
            (false, Some(d)) => format!("{} (downtime {d:.1} ms)", s.label),
            (false, None) => s.label.to_string(),
        };
        let c = s.colour;
        chart
            .draw_series([PathElement::new(s.rate.clone(), c.stroke_width(2))])?
            .label(label)
            .legend(move |(x, y)| PathElement::new([(x - 10, y), (x + 10, y)], c.stroke_width(2)));
    }
    if single {
        let sw = |c: RGBAColor| {
            move |(x, y): (i32, i32)| Rectangle::new([(x - 8, y - 6), (x + 8, y + 6)], c.filled())
        };
        let s = &all[0];
        if !s.rounds.is_empty() {
            chart
                .draw_series(std::iter::empty::<Rectangle<(f64, f64)>>())?
                .label("pre-copy rounds (alternate shades)")
                .legend(sw(ROUND_SHADES[1].to_rgba()));
        }
        chart
            .draw_series(std::iter::empty::<Rectangle<(f64, f64)>>())?
            .label(match s.downtime_ms {
                Some(d) => format!("downtime ({d:.1} ms): guest paused"),
                None => "downtime".into(),
            })
            .legend(sw(DOWNTIME.mix(0.45)));
        if s.spans.iter().any(|p| p.0 == Phase::Postcopy) {
            chart
                .draw_series(std::iter::empty::<Rectangle<(f64, f64)>>())?
                .label("post-copy: guest at the destination, pages missing")
                .legend(sw(POSTCOPY.to_rgba()));
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.5))
        .label_font((FONT, 13))
        .draw()?;
    lines(
        &mid,
        x.clone(),
        all,
        |s| &s.transfer,
        "transfer Mbit/s",
        false,
    )?;
    lines(&low, x, all, |s| &s.remaining, "to send (MiB)", true)?;
    Ok(())
}

fn max_of<'a>(points: impl Iterator<Item = &'a (f64, f64)>) -> f64 {
    let m = points.map(|p| p.1).fold(0.0, f64::max);
    if m > 0.0 {
        m
    } else {
        1.0
    }
}

type Chart<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// A run's phases behind its rate: rounds shaded alternately (one run),
/// the downtime in red, post-copy in orange.
fn shade(chart: &mut Chart, s: &Series, single: bool, top: f64) -> Drawn {
    if single {
        let x = chart.x_range();
        // Numbers only on rounds wide enough to hold one.
        let room = (x.end - x.start) / 80.0;
        for &(round, a, b) in &s.rounds {
            let c = ROUND_SHADES[round as usize % 2];
            chart.draw_series([Rectangle::new(
                [(a.max(x.start), 0.0), (b, top)],
                c.mix(0.6).filled(),
            )])?;
            if b - a < room {
                continue;
            }
            chart.draw_series([Text::new(
                format!("{round}"),
                ((a + b) / 2.0, top * 0.97),
                (FONT, 12).into_font().color(&BLACK.mix(0.7)),
            )])?;
        }
    }
    for &(phase, a, b) in &s.spans {
        let colour = match phase {
            Phase::Downtime if single => DOWNTIME.mix(0.45),
            Phase::Downtime => s.colour.mix(0.3),
            Phase::Postcopy if single => POSTCOPY.mix(0.5),
            _ => continue,
        };
        chart.draw_series([Rectangle::new([(a, 0.0), (b, top)], colour.filled())])?;
        if phase == Phase::Downtime {
            chart.draw_series([PathElement::new(
                [(a, 0.0), (a, top)],
                colour.stroke_width(2),
            )])?;
        }
    }
    Ok(())
}

fn lines(
    area: &Area,
    x: std::ops::Range<f64>,
    all: &[Series],
    pick: for<'s> fn(&'s Series<'_>) -> &'s Vec<(f64, f64)>,
    desc: &str,
    x_desc: bool,
) -> Drawn {
    let max = max_of(all.iter().flat_map(|s| pick(s).iter()));
    let mut chart = ChartBuilder::on(area)
        .margin(12)
        .x_label_area_size(if x_desc { 45 } else { 30 })
        .y_label_area_size(70)
        .build_cartesian_2d(x, 0.0..max * 1.1)?;
    let mut mesh = chart.configure_mesh();
    mesh.disable_x_mesh()
        .light_line_style(TRANSPARENT)
        .y_desc(desc)
        .axis_desc_style((FONT, 15))
        .label_style((FONT, 12));
    if x_desc {
        mesh.x_desc("time since the migration started (s)");
    }
    mesh.draw()?;
    for s in all {
        chart.draw_series([PathElement::new(pick(s).clone(), s.colour.stroke_width(2))])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::timeline::Sample;
    use crate::report::RoundReport;

    fn run(downtime_at: f64) -> Report {
        let timeline = (0..=100)
            .map(|i| {
                let t = i as f64 * 10.0 - 100.0;
                let phase = match t {
                    t if t < 0.0 => Phase::Warmup,
                    t if t < downtime_at => Phase::Precopy,
                    t if t < downtime_at + 20.0 => Phase::Downtime,
                    _ => Phase::Verify,
                };
                Sample {
                    t_ms: t,
                    phase,
                    guest_rate: Some(if phase == Phase::Downtime { 0.0 } else { 5e4 }),
                    sent_bytes: (t.max(0.0) * 1e5) as u64,
                    remaining_pages: (900.0 - t).max(0.0) as u64,
                    ..Sample::default()
                }
            })
            .collect();
        Report {
            mode: "precopy",
            page_size: 4096,
            downtime_ms: Some(20.0),
            rounds: vec![RoundReport {
                round: 0,
                end_ms: downtime_at,
                duration_ms: downtime_at,
                ..RoundReport::default()
            }],
            timeline,
            ..Report::default()
        }
    }

    #[test]
    fn one_run_shows_its_rounds_and_downtime_and_two_overlay_with_a_legend() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (run(500.0), run(700.0));
        let one = dir.path().join("one.svg");
        draw(&[("a".into(), &a)], &one).unwrap();
        let svg = std::fs::read_to_string(&one).unwrap();
        assert!(svg.contains("downtime (20.0 ms)"), "{svg}");
        assert!(svg.contains("pre-copy rounds"));
        let two = dir.path().join("two.svg");
        draw(&[("run-a".into(), &a), ("run-b".into(), &b)], &two).unwrap();
        let svg = std::fs::read_to_string(&two).unwrap();
        assert!(svg.contains("Migration comparison"));
        assert!(svg.contains("run-a (downtime 20.0 ms)") && svg.contains("run-b"));
        assert!(svg.trim_end().ends_with("</svg>"));
    }

    #[test]
    fn a_report_without_a_timeline_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let old = Report::default();
        let e = draw(&[("old.json".into(), &old)], &dir.path().join("x.svg")).unwrap_err();
        assert!(e.to_string().starts_with("old.json has no timeline"), "{e}");
    }
}
