//! The plots of `kvlab serve-bench` (PNG and SVG, drawn with the study's plot helpers).

use super::report::RunSummary;
use super::runner::{Load, TimelineSample};
use super::scheduler::Mode;
use crate::kv::MIB;
use crate::scenario::plots::{
    draw_legend, padded, save, strategy_color, Drawn, Figure, CHART_SIZE, FONT, LEGEND_HEADROOM,
};
use anyhow::Result;
use plotters::coord::combinators::BindKeyPoints;
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::{Path, PathBuf};

/// A mode's color: the cache strategy's of its layout (paged = dynamic, static = static).
fn mode_color(mode: Mode) -> RGBColor {
    strategy_color(mode.strategy(false))
}

/// The plots of a bench; returns the files written (PNG and SVG of each) with captions.
pub fn draw_bench_plots(
    dir: &Path,
    runs: &[RunSummary],
    timeline: &[TimelineSample],
) -> Result<Vec<(PathBuf, &'static str)>> {
    let mut files = Vec::new();
    let mut add = |paths: [PathBuf; 2], caption: &'static str| {
        files.extend(paths.map(|path| (path, caption)));
    };
    let loads = |mode: Mode| runs.iter().filter(|r| r.mode == mode).count();
    if loads(Mode::Paged).max(loads(Mode::Static)) > 1 {
        add(
            save(&Throughput { runs }, &dir.join("throughput"))?,
            "Output and decode tokens per second against the load",
        );
    }
    // Each mode at its highest load.
    let mut shown: Vec<(Mode, String)> = Vec::new();
    for mode in [Mode::Paged, Mode::Static] {
        let top = runs
            .iter()
            .filter(|r| r.mode == mode)
            .max_by(|a, b| a.load.value().total_cmp(&b.load.value()));
        if let Some(run) = top {
            shown.push((mode, run.load.to_string()));
        }
    }
    if timeline.len() > 1 && !shown.is_empty() {
        add(
            save(
                &MemoryOverTime {
                    timeline,
                    shown: &shown,
                },
                &dir.join("kv_over_time"),
            )?,
            "KV memory reserved and live, and sequences running and waiting, over time",
        );
    }
    Ok(files)
}

struct Throughput<'a> {
    runs: &'a [RunSummary],
}

impl Figure for Throughput<'_> {
    /// Output tokens/s (solid) and decode tokens/s (dashed) per mode against the load, on a
    /// log2 axis of the loads run.
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Drawn<DB> {
        let mut loads: Vec<f64> = self.runs.iter().map(|r| r.load.value()).collect();
        loads.sort_by(f64::total_cmp);
        loads.dedup();
        let (lo, hi) = (loads[0], loads[loads.len() - 1]);
        let y_hi = self
            .runs
            .iter()
            .flat_map(|r| [r.output_tokens_per_second, r.decode_tokens_per_second])
            .fold(0.0, f64::max);
        let closed = matches!(self.runs[0].load, Load::Concurrency(_));
        let x_desc = if closed {
            "concurrency: clients, each running one conversation at a time (log scale)"
        } else {
            "arrival rate: conversations per second (log scale)"
        };
        let mut chart = ChartBuilder::on(root)
            .caption("Tokens per second against the load", (FONT, 26))
            .margin(20)
            .x_label_area_size(50)
            .y_label_area_size(80)
            .build_cartesian_2d(
                (lo / 1.3..hi * 1.3)
                    .log_scale()
                    .with_key_points(loads.clone()),
                0.0..(y_hi * LEGEND_HEADROOM).max(1e-3),
            )?;
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc("tokens per second")
            .x_label_formatter(&|x| format!("{x}"))
            .label_style((FONT, 15))
            .axis_desc_style((FONT, 17))
            .draw()?;
        for mode in [Mode::Paged, Mode::Static] {
            let mut mine: Vec<&RunSummary> = self.runs.iter().filter(|r| r.mode == mode).collect();
            if mine.is_empty() {
                continue;
            }
            mine.sort_by(|a, b| a.load.value().total_cmp(&b.load.value()));
            let color = mode_color(mode);
            let output: Vec<(f64, f64)> = mine
                .iter()
                .map(|r| (r.load.value(), r.output_tokens_per_second))
                .collect();
            let decode: Vec<(f64, f64)> = mine
                .iter()
                .map(|r| (r.load.value(), r.decode_tokens_per_second))
                .collect();
            chart
                .draw_series(LineSeries::new(output.clone(), color.stroke_width(3)))?
                .label(format!("{mode}: output tokens / wall time"))
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 24, y)], color.stroke_width(3))
                });
            chart.draw_series(output.iter().map(|&p| Circle::new(p, 5, color.filled())))?;
            chart
                .draw_series(DashedLineSeries::new(
                    decode.clone(),
                    8,
                    5,
                    color.stroke_width(2),
                ))?
                .label(format!("{mode}: decode-only steps (tokens / step time)"))
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 8, y)], color.stroke_width(2))
                });
            chart.draw_series(
                decode
                    .iter()
                    .map(|&p| TriangleMarker::new(p, 6, color.stroke_width(2))),
            )?;
        }
        draw_legend(&mut chart, SeriesLabelPosition::UpperLeft, 15)
    }
}

/// `(seconds, value)` of each sample as a step function: a sample's state holds until the next
/// sample (its segments are exactly horizontal or vertical, which also keeps plotters' line
/// drawing from overshooting on near-vertical segments).
fn steps(samples: &[&TimelineSample], value: fn(&TimelineSample) -> f64) -> Vec<(f64, f64)> {
    let mut points = Vec::with_capacity(2 * samples.len());
    for (i, s) in samples.iter().enumerate() {
        if i > 0 {
            points.push((s.seconds, value(samples[i - 1])));
        }
        points.push((s.seconds, value(s)));
    }
    points
}

struct MemoryOverTime<'a> {
    timeline: &'a [TimelineSample],
    /// The (mode, load) runs drawn, one column each.
    shown: &'a [(Mode, String)],
}

impl Figure for MemoryOverTime<'_> {
    fn size(&self) -> (u32, u32) {
        (CHART_SIZE.0.max(600 * self.shown.len() as u32), 860)
    }

    /// One column per run: above, KV bytes reserved (solid) and live (filled) against time,
    /// with the pool's capacity; below, requests running (holding a sequence) and waiting.
    /// Both rows share their scales across columns.
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Drawn<DB> {
        let of = |mode: Mode, load: &str| -> Vec<&TimelineSample> {
            self.timeline
                .iter()
                .filter(|s| s.mode == mode && s.load == load)
                .collect()
        };
        let runs: Vec<(Mode, &String, Vec<&TimelineSample>)> = self
            .shown
            .iter()
            .map(|(mode, load)| (*mode, load, of(*mode, load)))
            .collect();
        let all = runs.iter().flat_map(|(_, _, s)| s.iter());
        let t_hi = all.clone().map(|s| s.seconds).fold(0.0, f64::max);
        let reserved_hi = all
            .clone()
            .map(|s| s.reserved_bytes as f64 / MIB)
            .fold(0.0, f64::max);
        let capacity = self.timeline[0].capacity_bytes as f64 / MIB;
        // The pool is drawn when it is near what was used; a pool far larger would flatten
        // the curves, so the caption states it instead.
        let capacity_drawn = capacity <= 2.0 * reserved_hi;
        let mib_hi = if capacity_drawn {
            capacity
        } else {
            reserved_hi
        };
        let count_hi = all
            .map(|s| s.running.max(s.waiting) as f64)
            .fold(0.0, f64::max);
        let title = if capacity_drawn {
            "KV memory and sequences over time (each mode at its highest load)".to_string()
        } else {
            format!(
                "KV memory and sequences over time (each mode at its highest load; the pool: \
                 {capacity:.0} MiB)"
            )
        };
        let body = root.titled(&title, (FONT, 24))?;
        let columns = body.split_evenly((1, runs.len()));
        for (column, (mode, load, samples)) in columns.iter().zip(&runs) {
            let color = mode_color(*mode);
            let (top, bottom) = column.split_vertically(column.dim_in_pixel().1 * 62 / 100);
            let (t_lo, t_hi) = padded(0.0, t_hi, 0.02);
            let mut chart = ChartBuilder::on(&top)
                .caption(format!("{mode}, {load}"), (FONT, 20))
                .margin(12)
                .x_label_area_size(30)
                .y_label_area_size(65)
                .build_cartesian_2d(t_lo..t_hi, 0.0..(mib_hi * 1.35).max(1e-3))?;
            chart
                .configure_mesh()
                .y_desc("KV MiB")
                .label_style((FONT, 14))
                .axis_desc_style((FONT, 16))
                .draw()?;
            let reserved = steps(samples, |s| s.reserved_bytes as f64 / MIB);
            let live = steps(samples, |s| s.live_bytes as f64 / MIB);
            let capacity = samples
                .first()
                .map_or(0.0, |s| s.capacity_bytes as f64 / MIB);
            chart
                .draw_series(AreaSeries::new(live, 0.0, color.mix(0.3)))?
                .label("live (written positions)")
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 6), (x + 16, y + 6)], color.mix(0.3).filled())
                });
            chart
                .draw_series(LineSeries::new(reserved, color.stroke_width(2)))?
                .label("reserved (held by sequences)")
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 24, y)], color.stroke_width(2))
                });
            if capacity_drawn {
                chart
                    .draw_series(DashedLineSeries::new(
                        [(t_lo, capacity), (t_hi, capacity)],
                        6,
                        4,
                        BLACK.stroke_width(1),
                    ))?
                    .label("the pool (--kv-budget)")
                    .legend(|(x, y)| {
                        PathElement::new([(x, y), (x + 24, y)], BLACK.stroke_width(1))
                    });
            }
            draw_legend(&mut chart, SeriesLabelPosition::UpperRight, 14)?;

            let mut chart = ChartBuilder::on(&bottom)
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(65)
                .build_cartesian_2d(t_lo..t_hi, 0.0..(count_hi * 1.4).max(1.0))?;
            chart
                .configure_mesh()
                .x_desc("seconds into the run")
                .y_desc("requests")
                .label_style((FONT, 14))
                .axis_desc_style((FONT, 16))
                .draw()?;
            let running = steps(samples, |s| s.running as f64);
            let waiting = steps(samples, |s| s.waiting as f64);
            chart
                .draw_series(LineSeries::new(running, color.stroke_width(2)))?
                .label("running (holding a sequence)")
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 24, y)], color.stroke_width(2))
                });
            chart
                .draw_series(DashedLineSeries::new(waiting, 6, 4, BLACK.stroke_width(1)))?
                .label("waiting")
                .legend(|(x, y)| PathElement::new([(x, y), (x + 24, y)], BLACK.stroke_width(1)));
            draw_legend(&mut chart, SeriesLabelPosition::UpperRight, 14)?;
        }
        Ok(())
    }
}
