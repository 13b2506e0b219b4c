//! The study's plots, the cache-map picture and `kvlab kv-eval`'s quality against bytes, as PNG
//! and SVG (plotters, with the embedded DejaVu Sans so that text renders the same everywhere).

use super::metrics::TurnRecord;
use crate::eval::report::{ConfigSummary, EvalSummary};
use crate::kv::map::CacheMap;
use crate::kv::{KvPart, Strategy};
use anyhow::{anyhow, Context, Result};
use plotters::coord::combinators::BindKeyPoints;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::FontStyle;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub(crate) const FONT: &str = "sans-serif";
use crate::kv::MIB;
pub(crate) const CHART_SIZE: (u32, u32) = (1100, 680);
/// Linear y axes reach this multiple of the largest value, leaving the top for the legend.
pub(crate) const LEGEND_HEADROOM: f64 = 1.5;

pub(crate) type Drawn<DB> = Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

/// Draws a chart's legend as every plot does: at `position`, `font_size` px text on a
/// translucent white box with a black border.
pub(crate) fn draw_legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
    position: SeriesLabelPosition,
    font_size: u32,
) -> Drawn<DB> {
    chart
        .configure_series_labels()
        .position(position)
        .label_font((FONT, font_size))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
}

/// A picture that can be drawn on any plotters backend.
pub(crate) trait Figure {
    fn size(&self) -> (u32, u32) {
        CHART_SIZE
    }
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Drawn<DB>;
}

/// Registers the embedded font as "sans-serif", plotters' default family (once per process).
fn register_font() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font(
            FONT,
            FontStyle::Normal,
            include_bytes!("../../assets/DejaVuSans.ttf"),
        )
        .is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(anyhow!("the embedded DejaVu Sans font did not load"))
    }
}

/// Writes `stem.png` and `stem.svg`; returns their paths.
pub(crate) fn save(figure: &impl Figure, stem: &Path) -> Result<[PathBuf; 2]> {
    register_font()?;
    if let Some(parent) = stem.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let size = figure.size();
    let png = stem.with_extension("png");
    let svg = stem.with_extension("svg");
    let failed = |path: &Path| {
        let path = path.display().to_string();
        move |e: String| anyhow!("drawing {path}: {e}")
    };
    {
        let root = BitMapBackend::new(&png, size).into_drawing_area();
        root.fill(&WHITE)
            .and_then(|()| figure.draw(&root))
            .and_then(|()| root.present())
            .map_err(|e| e.to_string())
            .map_err(failed(&png))?;
    }
    {
        let root = SVGBackend::new(&svg, size).into_drawing_area();
        root.fill(&WHITE)
            .and_then(|()| figure.draw(&root))
            .and_then(|()| root.present())
            .map_err(|e| e.to_string())
            .map_err(failed(&svg))?;
    }
    Ok([png, svg])
}

pub(crate) fn strategy_color(strategy: Strategy) -> RGBColor {
    match strategy {
        Strategy::None => RGBColor(214, 39, 40),
        Strategy::Dynamic => RGBColor(31, 119, 180),
        Strategy::Static => RGBColor(44, 160, 44),
        Strategy::DynamicReuse => RGBColor(148, 103, 189),
        Strategy::StaticReuse => RGBColor(255, 127, 14),
    }
}

/// `(lo, hi)` padded by `pad` of the span (or of `hi` when the span is 0).
pub(crate) fn padded(lo: f64, hi: f64, pad: f64) -> (f64, f64) {
    let span = if hi > lo { hi - lo } else { hi.abs().max(1.0) };
    (lo - span * pad, hi + span * pad)
}

/// The three plots of a run; returns the files written (PNG and SVG of each) with captions.
pub fn draw_run_plots(
    dir: &Path,
    records: &[TurnRecord],
    strategies: &[Strategy],
) -> Result<Vec<(PathBuf, &'static str)>> {
    let ok: Vec<&TurnRecord> = records.iter().filter(|r| r.success).collect();
    if ok.is_empty() {
        return Ok(Vec::new());
    }
    let mut files = Vec::new();
    let mut add = |paths: [PathBuf; 2], caption: &'static str| {
        files.extend(paths.map(|path| (path, caption)));
    };
    let records = &ok;
    add(
        save(
            &TimePerTurn {
                records,
                strategies,
            },
            &dir.join("time_per_turn"),
        )?,
        "Generation time per turn (mean over scenarios), total and time to first token",
    );
    add(
        save(
            &TokensPerSecond {
                records,
                strategies,
            },
            &dir.join("tokens_per_second"),
        )?,
        "Tokens/s against context length",
    );
    add(
        save(
            &KvMemory {
                records,
                strategies,
            },
            &dir.join("kv_memory"),
        )?,
        "KV cache bytes reserved and live against context length",
    );
    if records.iter().any(|r| r.reuse.is_some()) {
        add(
            save(
                &PrefixReuse {
                    records,
                    strategies,
                },
                &dir.join("prefix_reuse"),
            )?,
            "Time to first token per turn, and the prompt tokens reused and prefilled",
        );
    }
    Ok(files)
}

/// Mean of `value` over scenarios, per turn, for one strategy: `(turn, mean)` in turn order.
fn mean_per_turn(
    records: &[&TurnRecord],
    strategy: Strategy,
    value: fn(&TurnRecord) -> f64,
) -> Vec<(f64, f64)> {
    let mut sums: Vec<(f64, usize)> = Vec::new();
    for r in records.iter().filter(|r| r.strategy == strategy) {
        if sums.len() < r.turn {
            sums.resize(r.turn, (0.0, 0));
        }
        sums[r.turn - 1].0 += value(r);
        sums[r.turn - 1].1 += 1;
    }
    sums.iter()
        .enumerate()
        .filter(|(_, (_, n))| *n > 0)
        .map(|(i, (sum, n))| ((i + 1) as f64, sum / *n as f64))
        .collect()
}

/// The 1-2-5 sequence (.., 0.1, 0.2, 0.5, 1, 2, 5, 10, ..) inside `lo..=hi`: log-axis ticks.
fn one_two_five(lo: f64, hi: f64) -> Vec<f64> {
    let mut ticks = Vec::new();
    let mut exponent = lo.log10().floor() as i32;
    while 10f64.powi(exponent) <= hi {
        for mantissa in [1.0, 2.0, 5.0] {
            let tick = mantissa * 10f64.powi(exponent);
            if (lo..=hi).contains(&tick) {
                ticks.push(tick);
            }
        }
        exponent += 1;
    }
    ticks
}

struct TimePerTurn<'a> {
    records: &'a [&'a TurnRecord],
    strategies: &'a [Strategy],
}

impl Figure for TimePerTurn<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Drawn<DB> {
        let last_turn = self.records.iter().map(|r| r.turn).max().unwrap_or(1) as f64;
        let times = self
            .records
            .iter()
            .flat_map(|r| [r.total_seconds, r.prefill_seconds])
            .filter(|&t| t > 0.0);
        let (lo, hi) = times.fold((f64::MAX, f64::MIN), |(lo, hi), t| (lo.min(t), hi.max(t)));
        let mut chart = ChartBuilder::on(root)
            .caption("Generation time per turn (log scale)", (FONT, 26))
            .margin(20)
            .x_label_area_size(50)
            .y_label_area_size(80)
            // Headroom above the data for the legend.
            .build_cartesian_2d(
                0.5..last_turn + 0.5,
                (lo / 1.5..hi * 8.0)
                    .log_scale()
                    .with_key_points(one_two_five(lo / 1.5, hi * 8.0)),
            )?;
        chart
            .configure_mesh()
            .x_desc("turn (the history grows every turn)")
            .y_desc("seconds per generate call")
            .x_labels(last_turn as usize + 1)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{}", (y * 1000.0).round() / 1000.0))
            .label_style((FONT, 15))
            .axis_desc_style((FONT, 17))
            .draw()?;
        for &strategy in self.strategies {
            let color = strategy_color(strategy);
            let total = mean_per_turn(self.records, strategy, |r| r.total_seconds);
            let prefill = mean_per_turn(self.records, strategy, |r| r.prefill_seconds);
            chart
                .draw_series(LineSeries::new(total.clone(), color.stroke_width(3)))?
                .label(format!("{strategy}: total"))
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 24, y)], color.stroke_width(3))
                });
            chart.draw_series(total.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
            chart
                .draw_series(DashedLineSeries::new(prefill, 8, 5, color.stroke_width(2)))?
                .label(format!("{strategy}: time to first token (prefill)"))
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 8, y)], color.stroke_width(2))
                });
        }
        draw_legend(&mut chart, SeriesLabelPosition::UpperRight, 15)
    }
}

struct PrefixReuse<'a> {
    records: &'a [&'a TurnRecord],
    strategies: &'a [Strategy],
}

impl Figure for PrefixReuse<'_> {
    /// Left: TTFT per turn (mean over scenarios) of every strategy, on a linear scale, so that
    /// a flat line reads as flat. Right: for each `+reuse` strategy, each turn's prompt as a bar
    /// of reused tokens (solid) under prefilled ones (light).
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Drawn<DB> {
        let last_turn = self.records.iter().map(|r| r.turn).max().unwrap_or(1) as f64;
        let (left, right) = root.split_horizontally(root.dim_in_pixel().0 / 2);
        let ttft_hi = self
            .records
            .iter()
            .map(|r| r.prefill_seconds)
            .fold(0.0, f64::max);
        let mut chart = ChartBuilder::on(&left)
            .caption("Time to first token per turn", (FONT, 24))
            .margin(18)
            .x_label_area_size(50)
            .y_label_area_size(70)
            .build_cartesian_2d(
                0.5..last_turn + 0.5,
                0.0..(ttft_hi * LEGEND_HEADROOM).max(1e-3),
            )?;
        chart
            .configure_mesh()
            .x_desc("turn (the history grows every turn)")
            .y_desc("seconds (prefill of the call)")
            .x_labels(last_turn as usize + 1)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .label_style((FONT, 15))
            .axis_desc_style((FONT, 17))
            .draw()?;
        for &strategy in self.strategies {
            let color = strategy_color(strategy);
            let ttft = mean_per_turn(self.records, strategy, |r| r.prefill_seconds);
            chart
                .draw_series(LineSeries::new(ttft.clone(), color.stroke_width(3)))?
                .label(strategy.to_string())
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 24, y)], color.stroke_width(3))
                });
            chart.draw_series(ttft.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
        }
        draw_legend(&mut chart, SeriesLabelPosition::UpperLeft, 15)?;

        let reusing: Vec<Strategy> = self
            .strategies
            .iter()
            .copied()
            .filter(|s| s.reuses())
            .collect();
        let tokens_hi = self
            .records
            .iter()
            .map(|r| r.input_tokens as f64)
            .fold(0.0, f64::max);
        let mut chart = ChartBuilder::on(&right)
            .caption("Prompt tokens: reused (solid) and prefilled", (FONT, 24))
            .margin(18)
            .x_label_area_size(50)
            .y_label_area_size(70)
            .build_cartesian_2d(
                0.5..last_turn + 0.5,
                0.0..(tokens_hi * LEGEND_HEADROOM).max(1.0),
            )?;
        chart
            .configure_mesh()
            .x_desc("turn")
            .y_desc("prompt tokens (mean over scenarios)")
            .x_labels(last_turn as usize + 1)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .label_style((FONT, 15))
            .axis_desc_style((FONT, 17))
            .draw()?;
        let width = 0.8 / reusing.len().max(1) as f64;
        for (i, &strategy) in reusing.iter().enumerate() {
            let color = strategy_color(strategy);
            let reused = mean_per_turn(self.records, strategy, |r| {
                r.reuse.map_or(0.0, |u| u.reused_tokens as f64)
            });
            let prompt = mean_per_turn(self.records, strategy, |r| r.input_tokens as f64);
            let left_edge = |turn: f64| turn - 0.4 + i as f64 * width;
            chart
                .draw_series(reused.iter().map(|&(turn, n)| {
                    let x = left_edge(turn);
                    Rectangle::new([(x, 0.0), (x + width * 0.9, n)], color.filled())
                }))?
                .label(format!("{strategy}: reused"))
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 6), (x + 16, y + 6)], color.filled())
                });
            chart
                .draw_series(reused.iter().zip(&prompt).map(|(&(turn, n), &(_, total))| {
                    let x = left_edge(turn);
                    Rectangle::new([(x, n), (x + width * 0.9, total)], color.mix(0.3).filled())
                }))?
                .label(format!("{strategy}: prefilled"))
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 6), (x + 16, y + 6)], color.mix(0.3).filled())
                });
        }
        draw_legend(&mut chart, SeriesLabelPosition::UpperLeft, 15)
    }
}

struct TokensPerSecond<'a> {
    records: &'a [&'a TurnRecord],
    strategies: &'a [Strategy],
}

impl Figure for TokensPerSecond<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Drawn<DB> {
        let contexts = self.records.iter().map(|r| r.input_tokens as f64);
        let (x_lo, x_hi) =
            contexts.fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(x), hi.max(x)));
        let (x_lo, x_hi) = padded(x_lo, x_hi, 0.05);
        let y_hi = self
            .records
            .iter()
            .flat_map(|r| [r.tokens_per_second, r.decode_tokens_per_second])
            .fold(0.0, f64::max);
        let mut chart = ChartBuilder::on(root)
            .caption("Tokens per second against context length", (FONT, 26))
            .margin(20)
            .x_label_area_size(50)
            .y_label_area_size(80)
            .build_cartesian_2d(x_lo..x_hi, 0.0..(y_hi * LEGEND_HEADROOM).max(1e-3))?;
        chart
            .configure_mesh()
            .x_desc("context length: prompt tokens (history re-prefilled each turn)")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_desc("tokens per second")
            .label_style((FONT, 15))
            .axis_desc_style((FONT, 17))
            .draw()?;
        for &strategy in self.strategies {
            let color = strategy_color(strategy);
            let mine: Vec<&&TurnRecord> = self
                .records
                .iter()
                .filter(|r| r.strategy == strategy)
                .collect();
            chart
                .draw_series(mine.iter().map(|r| {
                    Circle::new(
                        (r.input_tokens as f64, r.tokens_per_second),
                        5,
                        color.filled(),
                    )
                }))?
                .label(format!(
                    "{strategy}: overall (new tokens / total time, the study's)"
                ))
                .legend(move |(x, y)| Circle::new((x + 10, y), 5, color.filled()));
            chart
                .draw_series(mine.iter().filter(|r| r.output_tokens > 1).map(|r| {
                    TriangleMarker::new(
                        (r.input_tokens as f64, r.decode_tokens_per_second),
                        6,
                        color.stroke_width(2),
                    )
                }))?
                .label(format!("{strategy}: decode only (after the first token)"))
                .legend(move |(x, y)| TriangleMarker::new((x + 10, y), 6, color.stroke_width(2)));
        }
        draw_legend(&mut chart, SeriesLabelPosition::UpperRight, 15)
    }
}

struct KvMemory<'a> {
    records: &'a [&'a TurnRecord],
    strategies: &'a [Strategy],
}

impl Figure for KvMemory<'_> {
    /// One panel per strategy on a shared scale: reserved bytes as dots, live bytes as rings,
    /// and a bar between them for what is reserved but unused. Markers only: a dynamic cache
    /// grows in chunk-sized steps between the measured turns, which a line would hide.
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Drawn<DB> {
        let context = |r: &TurnRecord| (r.input_tokens + r.output_tokens) as f64;
        let (x_lo, x_hi) = self
            .records
            .iter()
            .map(|r| context(r))
            .fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(x), hi.max(x)));
        let (x_lo, x_hi) = padded(x_lo, x_hi, 0.08);
        let y_hi = self
            .records
            .iter()
            .map(|r| r.kv_reserved_bytes.max(r.kv_live_bytes) as f64 / MIB)
            .fold(0.0, f64::max);
        let body = root.titled(
            "KV cache memory per call: reserved (dots) vs live (rings)",
            (FONT, 26),
        )?;
        let (panels, footer) = body.split_vertically(body.dim_in_pixel().1 - 40);
        footer.draw(&Text::new(
            "x: context length at the end of the call (prompt + generated tokens); y: MiB (2^20 bytes)",
            (90, 10),
            (FONT, 17),
        ))?;
        let panels = panels.split_evenly((1, self.strategies.len().max(1)));
        for (panel, &strategy) in panels.iter().zip(self.strategies) {
            let color = strategy_color(strategy);
            let mine: Vec<&&TurnRecord> = self
                .records
                .iter()
                .filter(|r| r.strategy == strategy)
                .collect();
            let caption = match strategy {
                Strategy::None => "none (transient per token; keeps 0)".to_string(),
                s => s.to_string(),
            };
            let mut chart = ChartBuilder::on(panel)
                .caption(caption, (FONT, 20))
                .margin(12)
                .x_label_area_size(35)
                .y_label_area_size(55)
                .build_cartesian_2d(x_lo..x_hi, 0.0..(y_hi * 1.1).max(1e-3))?;
            chart
                .configure_mesh()
                .x_labels(5)
                .x_label_formatter(&|x| format!("{x:.0}"))
                .label_style((FONT, 14))
                .draw()?;
            chart.draw_series(mine.iter().map(|r| {
                let x = context(r);
                let live = r.kv_live_bytes as f64 / MIB;
                let reserved = r.kv_reserved_bytes as f64 / MIB;
                PathElement::new([(x, live), (x, reserved)], color.mix(0.35).stroke_width(4))
            }))?;
            chart.draw_series(mine.iter().map(|r| {
                Circle::new(
                    (context(r), r.kv_reserved_bytes as f64 / MIB),
                    4,
                    color.filled(),
                )
            }))?;
            chart.draw_series(mine.iter().map(|r| {
                Circle::new(
                    (context(r), r.kv_live_bytes as f64 / MIB),
                    8,
                    color.stroke_width(2),
                )
            }))?;
        }
        Ok(())
    }
}

/// The most chunks drawn as rows; beyond it the first ones and the last one are drawn.
const MAX_DRAWN_CHUNKS: usize = 24;

/// Draws `map` as `stem.png` / `stem.svg`: one row per chunk, each (layer, K/V, head) block as
/// a bar along the chunk's bytes, its written slots colored and its unwritten tail in grey.
pub fn draw_cache_map(map: &CacheMap, title: &str, stem: &Path) -> Result<[PathBuf; 2]> {
    save(&CacheMapFigure { map, title }, stem)
}

struct CacheMapFigure<'a> {
    map: &'a CacheMap,
    title: &'a str,
}

impl CacheMapFigure<'_> {
    /// Chunks drawn, top to bottom.
    fn drawn_chunks(&self) -> Vec<crate::kv::map::ChunkUse> {
        let chunks = self.map.chunks();
        if chunks.len() <= MAX_DRAWN_CHUNKS {
            return chunks.to_vec();
        }
        let mut drawn = chunks[..MAX_DRAWN_CHUNKS - 1].to_vec();
        drawn.push(chunks[chunks.len() - 1]);
        drawn
    }
}

impl Figure for CacheMapFigure<'_> {
    fn size(&self) -> (u32, u32) {
        let rows = self.drawn_chunks().len() as u32;
        (CHART_SIZE.0, 280 + rows * 34)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Drawn<DB> {
        let map = self.map;
        let chunks = self.drawn_chunks();
        let rows = chunks.len() as f64;
        let layers = map.layout.num_layers as f64;
        let chunk_mib = map.block_bytes() as f64 / MIB;
        let (chart_area, legend_area) = root.split_vertically(self.size().1 - 80);
        let mut chart = ChartBuilder::on(&chart_area)
            .caption(self.title, (FONT, 22))
            .margin(15)
            .x_label_area_size(50)
            .y_label_area_size(150)
            .build_cartesian_2d(0.0..chunk_mib, 0.0..rows)?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(0)
            .x_desc(if map.layout.dtype().is_quantized() {
                "byte offset inside the block (MiB); order: [layer][K, V][KV head][slot][head_dim] \
                 codes, then their scales"
            } else {
                "byte offset inside the block (MiB); order: [layer][K, V][KV head][slot][head_dim]"
            })
            .label_style((FONT, 14))
            .axis_desc_style((FONT, 16))
            .draw()?;
        let label_style =
            TextStyle::from((FONT, 14).into_font()).pos(Pos::new(HPos::Right, VPos::Center));
        let unwritten = RGBColor(215, 215, 215);
        for (row, chunk) in chunks.iter().enumerate() {
            // y grows upwards: the first chunk is the top row.
            let (bottom, top) = (rows - row as f64 - 0.88, rows - row as f64 - 0.12);
            let (x, y) = chart.backend_coord(&(0.0, (bottom + top) / 2.0));
            let what = match map.layout.kind() {
                crate::kv::LayoutKind::Contiguous => "run".to_string(),
                crate::kv::LayoutKind::Chunked => format!("chunk {}", chunk.chunk),
            };
            root.draw(&Text::new(
                format!(
                    "{what} ({}-{})",
                    chunk.first_position,
                    chunk.first_position + map.block_tokens - 1
                ),
                (x - 8, y),
                label_style.clone(),
            ))?;
            for block in map.blocks(chunk) {
                // K rows darker than V rows; the hue walks through the layers; scales pale.
                let lightness = match (block.part, block.scales) {
                    (_, true) => 0.82,
                    (KvPart::Key, false) => 0.38,
                    (KvPart::Value, false) => 0.58,
                };
                let color = HSLColor(block.layer as f64 / layers * 0.8, 0.65, lightness);
                let start = block.offset_bytes as f64 / MIB;
                let written_end = (block.offset_bytes + block.written_bytes) as f64 / MIB;
                let end = (block.offset_bytes + block.reserved_bytes) as f64 / MIB;
                chart.draw_series([
                    Rectangle::new([(start, top), (written_end, bottom)], color.filled()),
                    Rectangle::new([(written_end, top), (end, bottom)], unwritten.filled()),
                ])?;
            }
        }
        let mut legend = vec![
            (
                "K rows written (hue = layer)",
                HSLColor(0.0, 0.65, 0.38).to_rgba(),
            ),
            ("V rows written", HSLColor(0.0, 0.65, 0.58).to_rgba()),
        ];
        if map.layout.dtype().is_quantized() {
            legend.push(("their scales", HSLColor(0.0, 0.65, 0.82).to_rgba()));
        }
        legend.push((
            "reserved, not written (each block's tail)",
            unwritten.to_rgba(),
        ));
        let all_chunks = map.chunks().len();
        if all_chunks > chunks.len() {
            legend_area.draw(&Text::new(
                format!(
                    "Not drawn: chunks {}-{} (full, like the ones above).",
                    MAX_DRAWN_CHUNKS - 1,
                    all_chunks - 2
                ),
                (160, 46),
                (FONT, 15),
            ))?;
        }
        let mut x = 160;
        for (text, color) in legend {
            legend_area.draw(&Rectangle::new([(x, 20), (x + 22, 38)], color.filled()))?;
            legend_area.draw(&Text::new(text, (x + 30, 20), (FONT, 15)))?;
            x += 40 + 8 * text.len() as i32;
        }
        Ok(())
    }
}

/// `kvlab kv-eval`'s picture: each configuration a point, its live KV bytes against its quality
/// (teacher-forced mean KL divergence, log scale, and top-1 agreement); writes `stem.png` and
/// `stem.svg`.
pub fn draw_quality_vs_bytes(summary: &EvalSummary, stem: &Path) -> Result<[PathBuf; 2]> {
    save(&QualityVsBytes { summary }, stem)
}

struct QualityVsBytes<'a> {
    summary: &'a EvalSummary,
}

/// KL divergences below this (the f32 cache against itself: 0) are drawn on it.
const KLD_FLOOR: f64 = 1e-7;

impl QualityVsBytes<'_> {
    /// (live KV MiB, the configuration) of every configuration with a measured turn.
    fn points(&self) -> Vec<(f64, &ConfigSummary)> {
        self.summary
            .configs
            .iter()
            .filter_map(|c| {
                let live = c
                    .free_running
                    .kv_live_bytes
                    .or(c.teacher_forced.kv_live_bytes)?;
                Some((live.mean / MIB, c))
            })
            .collect()
    }

    /// The color of a configuration's policy: full, window, sinks or h2o.
    fn color(config: &ConfigSummary) -> RGBColor {
        Self::kind_color(config.policy.split(':').next().unwrap_or(""))
    }

    fn kind_color(kind: &str) -> RGBColor {
        match kind {
            "full" => RGBColor(31, 119, 180),
            "window" => RGBColor(214, 39, 40),
            "sinks" => RGBColor(44, 160, 44),
            _ => RGBColor(148, 103, 189),
        }
    }
}

/// Configurations per line of the numbered list under the panels.
const LEGEND_COLUMNS: usize = 3;

impl Figure for QualityVsBytes<'_> {
    fn size(&self) -> (u32, u32) {
        let lines = self.points().len().div_ceil(LEGEND_COLUMNS) as u32;
        (1500, 740 + 24 * lines)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Drawn<DB> {
        let points = self.points();
        let x_hi = points.iter().map(|p| p.0).fold(0.0, f64::max) * 1.15;
        let (title_area, rest) = root.split_vertically(50);
        let (panels, legend_area) = rest.split_vertically(680);
        // Each point carries its number; the list under the panels names its configuration.
        for (i, &(_, c)) in points.iter().enumerate() {
            let (column, line) = ((i % LEGEND_COLUMNS) as i32, (i / LEGEND_COLUMNS) as i32);
            let (x, y) = (40 + 480 * column, 10 + 24 * line);
            legend_area.draw(&Circle::new((x, y + 8), 6, Self::color(c).filled()))?;
            legend_area.draw(&Text::new(
                format!("{}  {}", i + 1, c.config),
                (x + 14, y),
                (FONT, 15),
            ))?;
        }
        // The model's name without its path.
        let model = self
            .summary
            .run
            .model
            .split(" (")
            .next()
            .unwrap_or_default();
        title_area.draw(&Text::new(
            format!(
                "Quality against KV bytes: {model}, {} configurations against the f32 full \
                 cache ({} of {} turn records)",
                points.len(),
                self.summary.measured_turns,
                self.summary.planned_turns
            ),
            (20, 15),
            (FONT, 21),
        ))?;
        // The legend of the colors, at the right of the title.
        let mut x = 1060;
        for (kind, color) in ["full", "window", "sinks", "h2o"]
            .iter()
            .map(|&k| (k, Self::kind_color(k)))
        {
            title_area.draw(&Circle::new((x, 40), 6, color.filled()))?;
            title_area.draw(&Text::new(kind, (x + 10, 32), (FONT, 15)))?;
            x += 20 + 9 * kind.len() as i32 + 20;
        }
        let (left, right) = panels.split_horizontally(750);
        let kld = |c: &ConfigSummary| c.teacher_forced.mean_kl_divergence.max(KLD_FLOOR);
        let kld_hi = points.iter().map(|p| kld(p.1)).fold(KLD_FLOOR, f64::max) * 10.0;
        let mut chart = ChartBuilder::on(&left)
            .caption(
                "mean KL divergence per answer token (teacher-forced)",
                (FONT, 18),
            )
            .margin(15)
            .x_label_area_size(50)
            .y_label_area_size(80)
            .build_cartesian_2d(0.0..x_hi.max(1e-3), (KLD_FLOOR / 2.0..kld_hi).log_scale())?;
        chart
            .configure_mesh()
            .x_desc("live KV MiB at the end of a turn (mean)")
            .y_desc("KL(f32 full ‖ config), nats")
            .y_label_formatter(&|y| format!("{y:.0e}"))
            .label_style((FONT, 14))
            .axis_desc_style((FONT, 16))
            .draw()?;
        for (i, &(x, c)) in points.iter().enumerate() {
            let y = kld(c);
            let label = if c.teacher_forced.mean_kl_divergence < KLD_FLOOR {
                format!(
                    "{} (KLD {:.0e})",
                    i + 1,
                    c.teacher_forced.mean_kl_divergence
                )
            } else {
                (i + 1).to_string()
            };
            chart.draw_series([EmptyElement::at((x, y))
                + Circle::new((0, 0), 6, Self::color(c).filled())
                + point_label(label, i)])?;
        }
        let mut chart = ChartBuilder::on(&right)
            .caption(
                "top-1 agreement with the f32 full cache (teacher-forced)",
                (FONT, 18),
            )
            .margin(15)
            .x_label_area_size(50)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..x_hi.max(1e-3), 0.0..105.0)?;
        chart
            .configure_mesh()
            .x_desc("live KV MiB at the end of a turn (mean)")
            .y_desc("% of answer positions")
            .label_style((FONT, 14))
            .axis_desc_style((FONT, 16))
            .draw()?;
        for (i, &(x, c)) in points.iter().enumerate() {
            let y = 100.0 * c.teacher_forced.top1_agreement;
            chart.draw_series([EmptyElement::at((x, y))
                + Circle::new((0, 0), 6, Self::color(c).filled())
                + point_label((i + 1).to_string(), i)])?;
        }
        Ok(())
    }
}

/// A point's number beside it: right of it for even indices, left for odd ones, so that
/// neighbours in the configuration list (element types of one size sit at the same bytes) keep
/// apart.
fn point_label(label: String, index: usize) -> Text<'static, (i32, i32), String> {
    let (dx, side) = if index.is_multiple_of(2) {
        (9, HPos::Left)
    } else {
        (-9, HPos::Right)
    };
    let style = TextStyle::from((FONT, 14).into_font()).pos(Pos::new(side, VPos::Center));
    Text::new(label, (dx, 0), style)
}
