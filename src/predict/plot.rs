//! SVG plots of a sweep's [`Row`]s, drawn with plotters' SVG backend.
//!
//! - `total_time.svg`: at each grid point, the measured total time (x)
//!   against the model's and the simulator's prediction (y), with the y = x
//!   diagonal: a marker above it is an over-prediction, below it an
//!   under-prediction. Log-log when the values span more than a factor of
//!   20, linear otherwise.
//! - `downtime.svg`: the same for the downtime.
//! - `rounds.svg`: the rounds (pre-copy plus stop-and-copy) at each grid
//!   point, measured, modelled and simulated.
//!
//! Text is written as SVG `<text>` elements laid out with plotters' built-in
//! size estimate, so no font library or font file is needed.

use std::error::Error;
use std::path::{Path, PathBuf};

use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::predict::sweep::{Figures, Row};

/// Size of every plot, in pixels.
const SIZE: (u32, u32) = (800, 600);
/// Values spanning more than this factor get log axes.
const LOG_SPAN: f64 = 20.0;
const FONT: &str = "sans-serif";
const MEASURED: RGBColor = BLACK;
const MODEL: RGBColor = RGBColor(31, 119, 180);
const SIMULATOR: RGBColor = RGBColor(214, 39, 40);

/// A plot that could not be drawn or written.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("cannot draw {}: {why}", path.display())]
    Draw { path: PathBuf, why: String },
}

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;
/// plotters' errors are generic over the backend: box them, they become
/// [`PlotError`]'s string.
type Drawn = Result<(), Box<dyn Error>>;
/// Which of a row's figures: measured, model or simulated.
type Pick = fn(&Row) -> &Figures;

/// Draw the sweep's plots into `dir` (which exists): total_time.svg,
/// downtime.svg, rounds.svg. Returns the paths written.
pub fn draw(rows: &[Row], dir: &Path) -> Result<Vec<PathBuf>, PlotError> {
    Ok(vec![
        render(dir.join("total_time.svg"), |area| {
            scatter(
                area,
                rows,
                "Total time: measured vs predicted",
                "total time",
                |f| f.total_time_ms,
            )
        })?,
        render(dir.join("downtime.svg"), |area| {
            scatter(
                area,
                rows,
                "Downtime: measured vs predicted",
                "downtime",
                |f| f.downtime_ms,
            )
        })?,
        render(dir.join("rounds.svg"), |area| rounds(area, rows))?,
    ])
}

/// Draw one plot on a white SVG canvas and write it to `path`.
fn render(path: PathBuf, plot: impl FnOnce(&Area) -> Drawn) -> Result<PathBuf, PlotError> {
    let drawn = {
        let area = SVGBackend::new(&path, SIZE).into_drawing_area();
        area.fill(&WHITE)
            .map_err(Into::into)
            .and_then(|()| plot(&area))
            .and_then(|()| area.present().map_err(Into::into))
    };
    match drawn {
        Ok(()) => Ok(path),
        Err(e) => Err(PlotError::Draw {
            path,
            why: e.to_string(),
        }),
    }
}

/// Measured (x) vs predicted (y) of the figure `get` picks, ms.
fn scatter(
    area: &Area,
    rows: &[Row],
    title: &str,
    what: &str,
    get: fn(&Figures) -> Option<f64>,
) -> Drawn {
    let area = area.titled(title, (FONT, 24))?;
    let (mut model, mut sim) = (Vec::new(), Vec::new());
    for r in rows {
        let Some(x) = get(&r.measured).filter(|x| x.is_finite()) else {
            continue;
        };
        let finite = |f: &Figures| get(f).filter(|y| y.is_finite()).map(|y| (x, y));
        model.extend(finite(&r.model));
        sim.extend(finite(&r.simulated));
    }
    let (lo, hi) = model
        .iter()
        .chain(&sim)
        .flat_map(|&(x, y)| [x, y])
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if lo > hi {
        return no_data(
            &area,
            "no data: no point has both a measured and a predicted value",
        );
    }
    let labels = (
        format!("measured {what} (ms)"),
        format!("predicted {what} (ms)"),
    );
    // Same range on both axes, so that the diagonal is at 45 degrees.
    if lo > 0.0 && hi / lo > LOG_SPAN {
        // Whole decades, so that at least two ticks are labelled.
        let decade = |v: f64, round: fn(f64) -> f64| 10f64.powf(round(v.log10()));
        let range = decade(lo / 1.2, f64::floor)..decade(hi * 1.2, f64::ceil);
        scatter_chart(
            &area,
            range.clone().log_scale(),
            range.log_scale(),
            &labels,
            &model,
            &sim,
        )
    } else {
        let pad = if hi > lo {
            (hi - lo) * 0.08
        } else {
            hi.abs().max(1.0) * 0.1
        };
        let start = if lo >= 0.0 {
            (lo - pad).max(0.0)
        } else {
            lo - pad
        };
        let range = start..hi + pad;
        scatter_chart(&area, range.clone(), range, &labels, &model, &sim)
    }
}

/// The scatter's chart on linear or log axes.
fn scatter_chart<S>(
    area: &Area,
    x: S,
    y: S,
    (x_desc, y_desc): &(String, String),
    model: &[(f64, f64)],
    sim: &[(f64, f64)],
) -> Drawn
where
    S: AsRangedCoord<Value = f64>,
    S::CoordDescType: ValueFormatter<f64>,
{
    let mut chart = ChartBuilder::on(area)
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(x, y)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_label_formatter(&ms)
        .y_label_formatter(&ms)
        .axis_desc_style((FONT, 16))
        .label_style((FONT, 13))
        .draw()?;
    let r = chart.x_range();
    let diagonal = BLACK.mix(0.5).stroke_width(1);
    chart
        .draw_series([PathElement::new(
            [(r.start, r.start), (r.end, r.end)],
            diagonal,
        )])?
        .label("y = x")
        .legend(move |(x, y)| PathElement::new([(x - 10, y), (x + 10, y)], diagonal));
    chart
        .draw_series(
            model
                .iter()
                .map(|&p| Circle::new(p, 6, MODEL.stroke_width(2))),
        )?
        .label("model")
        .legend(|p| Circle::new(p, 6, MODEL.stroke_width(2)));
    chart
        .draw_series(
            sim.iter()
                .map(|&p| Cross::new(p, 6, SIMULATOR.stroke_width(2))),
        )?
        .label("simulator")
        .legend(|p| Cross::new(p, 6, SIMULATOR.stroke_width(2)));
    legend(&mut chart)
}

/// A tick's label: at most 3 decimals, no trailing zeros ("100", "2.5").
fn ms(v: &f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// Rounds at each grid point: lines between neighbouring points that both
/// have a figure, markers where there is one.
fn rounds(area: &Area, rows: &[Row]) -> Drawn {
    let area = area.titled("Rounds per point", (FONT, 24))?;
    let series: [(RGBColor, Pick); 3] = [
        (MEASURED, |r| &r.measured),
        (MODEL, |r| &r.model),
        (SIMULATOR, |r| &r.simulated),
    ];
    let max = rows
        .iter()
        .flat_map(|r| series.map(|(_, fig)| fig(r).rounds))
        .flatten()
        .max();
    let Some(max) = max else {
        return no_data(&area, "no data: no point has a rounds figure");
    };
    let last = rows.iter().map(|r| r.point).max().unwrap_or(0);
    // Headroom above the highest marker for the legend.
    let mut chart = ChartBuilder::on(&area)
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(60)
        .build_cartesian_2d((0..last).into_segmented(), 0..max + 2 + max / 4)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_desc("grid point")
        .y_desc("rounds")
        .axis_desc_style((FONT, 16))
        .label_style((FONT, 13))
        .draw()?;
    let at = |r: &Row, fig: Pick| fig(r).rounds.map(|y| (SegmentValue::CenterOf(r.point), y));
    for (colour, fig) in series {
        chart.draw_series(rows.windows(2).filter_map(|w| {
            Some(PathElement::new(
                [at(&w[0], fig)?, at(&w[1], fig)?],
                colour.stroke_width(2),
            ))
        }))?;
    }
    let line = |c: RGBColor| PathElement::new([(-10, 0), (10, 0)], c.stroke_width(2));
    chart
        .draw_series(
            rows.iter()
                .filter_map(|r| at(r, |r| &r.measured))
                .map(|c| Circle::new(c, 4, MEASURED.filled())),
        )?
        .label("measured")
        .legend(move |c| {
            EmptyElement::at(c) + line(MEASURED) + Circle::new((0, 0), 4, MEASURED.filled())
        });
    chart
        .draw_series(
            rows.iter()
                .filter_map(|r| at(r, |r| &r.model))
                .map(|c| Circle::new(c, 7, MODEL.stroke_width(2))),
        )?
        .label("model")
        .legend(move |c| {
            EmptyElement::at(c) + line(MODEL) + Circle::new((0, 0), 7, MODEL.stroke_width(2))
        });
    chart
        .draw_series(
            rows.iter()
                .filter_map(|r| at(r, |r| &r.simulated))
                .map(|c| Cross::new(c, 6, SIMULATOR.stroke_width(2))),
        )?
        .label("simulator")
        .legend(move |c| {
            EmptyElement::at(c) + line(SIMULATOR) + Cross::new((0, 0), 6, SIMULATOR.stroke_width(2))
        });
    legend(&mut chart)
}

/// The series' legend, top left over a translucent white box.
fn legend<'a, 'b: 'a, X: Ranged, Y: Ranged>(
    chart: &mut ChartContext<'a, SVGBackend<'b>, Cartesian2d<X, Y>>,
) -> Drawn {
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.5))
        .label_font((FONT, 14))
        .draw()?;
    Ok(())
}

/// A note in the middle of an empty plot.
fn no_data(area: &Area, note: &str) -> Drawn {
    let (w, h) = area.dim_in_pixel();
    let style = (FONT, 18)
        .into_font()
        .color(&BLACK.mix(0.6))
        .pos(Pos::new(HPos::Center, VPos::Center));
    area.draw(&Text::new(note, (w as i32 / 2, h as i32 / 2), style))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures(total: Option<f64>, down: Option<f64>, rounds: Option<u32>) -> Figures {
        Figures {
            total_time_ms: total,
            downtime_ms: down,
            rounds,
            ..Figures::default()
        }
    }

    fn sample_rows() -> Vec<Row> {
        let row = |point: usize, measured: Figures, model: Figures, simulated: Figures| Row {
            point,
            label: format!("point {point}"),
            measured,
            model,
            simulated,
            ..Row::default()
        };
        vec![
            row(
                0,
                figures(Some(120.0), Some(4.0), Some(3)),
                figures(Some(110.0), Some(3.5), Some(3)),
                figures(Some(130.0), Some(4.4), Some(4)),
            ),
            // A failed migration: nothing measured.
            row(
                1,
                figures(None, None, None),
                figures(Some(900.0), Some(20.0), Some(6)),
                figures(Some(950.0), Some(22.0), Some(7)),
            ),
            row(
                2,
                figures(Some(4100.0), Some(95.0), Some(12)),
                figures(Some(3500.0), Some(80.0), Some(10)),
                figures(Some(4400.0), Some(101.0), Some(12)),
            ),
        ]
    }

    fn check(dir: &Path, rows: &[Row]) -> Vec<String> {
        let paths = draw(rows, dir).expect("plots drawn");
        let names: Vec<_> = paths
            .iter()
            .filter_map(|p| p.file_name()?.to_str())
            .collect();
        assert_eq!(names, ["total_time.svg", "downtime.svg", "rounds.svg"]);
        let titles = [
            "Total time: measured vs predicted",
            "Downtime: measured vs predicted",
            "Rounds per point",
        ];
        paths
            .iter()
            .zip(titles)
            .map(|(path, title)| {
                let svg = std::fs::read_to_string(path).expect("plot readable");
                assert!(
                    svg.starts_with("<svg") || svg.starts_with("<?xml"),
                    "{path:?}"
                );
                assert!(svg.trim_end().ends_with("</svg>"), "{path:?}");
                assert!(svg.contains(title), "{path:?} lacks its title");
                svg
            })
            .collect()
    }

    #[test]
    fn draws_three_plots() {
        let dir = tempfile::tempdir().expect("tempdir");
        let svgs = check(dir.path(), &sample_rows());
        assert!(svgs[0].contains("measured total time (ms)"));
        assert!(svgs[1].contains("predicted downtime (ms)"));
        assert!(svgs
            .iter()
            .all(|s| s.contains("simulator") && !s.contains("no data")));
    }

    #[test]
    fn no_data_still_draws() {
        let dir = tempfile::tempdir().expect("tempdir");
        let rows = [Row {
            model: figures(Some(1.0), Some(1.0), None),
            ..Row::default()
        }];
        for svg in check(dir.path(), &rows) {
            assert!(svg.contains("no data"));
        }
        assert_eq!(check(dir.path(), &[]).len(), 3);
    }

    #[test]
    fn unwritable_dir_names_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("missing");
        let err = draw(&sample_rows(), &missing).expect_err("no such dir");
        assert!(err.to_string().contains("total_time.svg"), "{err}");
    }
}
