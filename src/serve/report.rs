//! The results of `kvlab serve-bench`: `requests.csv`, `timeline.csv`, `preemptions.csv`
//! (columns documented in docs/serve-bench.md, which a test checks against these lists),
//! `summary.json`, the tables (printed, and in `report.md` beside the plots).

use super::runner::{
    Load, PreemptionRecord, RequestRecord, RunOptions, RunOutcome, TimelineSample,
};
use super::scheduler::Mode;
use crate::kv::MIB;
use crate::scenario::metrics::percentile;
use crate::scenario::report::{column, Column, EngineInfo, Table};
use anyhow::{Context, Result};
use serde::Serialize;
use std::path::Path;

pub const REQUEST_COLUMNS: &[Column<RequestRecord>] = &[
    column("mode", |r| r.mode.to_string()),
    column("load", |r| r.load.clone()),
    column("request", |r| r.request.to_string()),
    column("conversation", |r| r.conversation.clone()),
    column("turn", |r| r.turn.to_string()),
    column("success", |r| r.success.to_string()),
    column("error", |r| r.error.clone()),
    column("prompt_tokens", |r| r.prompt_tokens.to_string()),
    column("output_tokens", |r| r.output_tokens.to_string()),
    column("reused_tokens", |r| r.reused_tokens.to_string()),
    column("arrival_seconds", |r| format!("{:.6}", r.arrival_seconds)),
    column("queue_seconds", |r| format!("{:.6}", r.queue_seconds)),
    column("ttft_seconds", |r| format!("{:.6}", r.ttft_seconds)),
    column("latency_seconds", |r| format!("{:.6}", r.latency_seconds)),
    column("tpot_seconds", |r| format!("{:.6}", r.tpot_seconds)),
    column("preemptions", |r| r.preemptions.to_string()),
    column("recomputed_tokens", |r| r.recomputed_tokens.to_string()),
    column("kv_reserved_bytes", |r| r.kv_reserved_bytes.to_string()),
    column("kv_live_bytes", |r| r.kv_live_bytes.to_string()),
    column("stopped_on_eos", |r| r.stopped_on_eos.to_string()),
];

pub const TIMELINE_COLUMNS: &[Column<TimelineSample>] = &[
    column("mode", |s| s.mode.to_string()),
    column("load", |s| s.load.clone()),
    column("seconds", |s| format!("{:.6}", s.seconds)),
    column("step_seconds", |s| format!("{:.6}", s.step_seconds)),
    column("decode_rows", |s| s.decode_rows.to_string()),
    column("prefill_rows", |s| s.prefill_rows.to_string()),
    column("sequences", |s| s.sequences.to_string()),
    column("running", |s| s.running.to_string()),
    column("waiting", |s| s.waiting.to_string()),
    column("kept", |s| s.kept.to_string()),
    column("reserved_bytes", |s| s.reserved_bytes.to_string()),
    column("live_bytes", |s| s.live_bytes.to_string()),
    column("cached_idle_bytes", |s| s.cached_idle_bytes.to_string()),
    column("capacity_bytes", |s| s.capacity_bytes.to_string()),
];

pub const PREEMPTION_COLUMNS: &[Column<PreemptionRecord>] = &[
    column("mode", |p| p.mode.to_string()),
    column("load", |p| p.load.clone()),
    column("seconds", |p| format!("{:.6}", p.seconds)),
    column("request", |p| p.request.to_string()),
    column("conversation", |p| p.conversation.clone()),
    column("turn", |p| p.turn.to_string()),
    column("sequence", |p| p.sequence.clone()),
    column("positions_freed", |p| p.positions_freed.to_string()),
    column("reason", |p| p.reason.clone()),
];

/// The middle of a run, between these fractions of its time: the steady state, past the
/// ramp-up (the pool filling) and before the ramp-down (conversations running out).
const STEADY_STATE: (f64, f64) = (0.1, 0.9);

/// p50 / p95 / p99 (nearest rank) of a measure.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Percentiles {
    pub count: usize,
    pub mean: f64,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    /// `None` for no values.
    pub fn of(values: impl IntoIterator<Item = f64>) -> Option<Percentiles> {
        let mut sorted: Vec<f64> = values.into_iter().filter(|v| !v.is_nan()).collect();
        if sorted.is_empty() {
            return None;
        }
        sorted.sort_by(f64::total_cmp);
        Some(Percentiles {
            count: sorted.len(),
            mean: sorted.iter().sum::<f64>() / sorted.len() as f64,
            p50: percentile(&sorted, 0.5),
            p95: percentile(&sorted, 0.95),
            p99: percentile(&sorted, 0.99),
            max: sorted[sorted.len() - 1],
        })
    }
}

/// One run (a mode at a load), summed up.
#[derive(Clone, Debug, Serialize)]
pub struct RunSummary {
    pub mode: Mode,
    pub load: Load,
    pub interrupted: bool,
    pub requests: usize,
    pub requests_failed: usize,
    pub output_tokens: usize,
    pub wall_seconds: f64,
    /// Output tokens of the run over its wall time.
    pub output_tokens_per_second: f64,
    /// Tokens of the steps that only decoded, over those steps' time: the speed of a decode
    /// step of the run's batch sizes.
    pub decode_tokens_per_second: f64,
    pub decode_steps: usize,
    /// Rows (sequences) of those steps, on average.
    pub mean_decode_batch: f64,
    pub ttft_seconds: Option<Percentiles>,
    /// Every gap between two consecutive tokens of a request.
    pub itl_seconds: Option<Percentiles>,
    pub tpot_seconds: Option<Percentiles>,
    pub latency_seconds: Option<Percentiles>,
    pub preemptions: usize,
    pub recomputed_tokens: usize,
    pub prompt_tokens: usize,
    pub reused_tokens: usize,
    pub kv_capacity_bytes: u64,
    pub peak_reserved_bytes: u64,
    /// Time-weighted means over the steady state (the middle 80 % of the run's time), each
    /// step weighted by its duration.
    pub steady_reserved_bytes: f64,
    pub steady_live_bytes: f64,
    /// (reserved - live) / reserved over the steady state.
    pub waste: Option<f64>,
    /// The same over the whole run.
    pub waste_whole_run: Option<f64>,
    /// Requests holding a sequence at once: the most, and the steady state's mean.
    pub peak_running: usize,
    pub steady_running: f64,
}

impl RunSummary {
    pub fn of(opts: &RunOptions, outcome: &RunOutcome) -> RunSummary {
        let requests = &outcome.requests;
        let ok: Vec<&RequestRecord> = requests.iter().filter(|r| r.success).collect();
        let output_tokens: usize = ok.iter().map(|r| r.output_tokens).sum();
        let timeline = &outcome.timeline;
        let decode_only: Vec<&TimelineSample> = timeline
            .iter()
            .filter(|s| s.prefill_rows == 0 && s.decode_rows > 0)
            .collect();
        let decode_rows: usize = decode_only.iter().map(|s| s.decode_rows).sum();
        let decode_time: f64 = decode_only.iter().map(|s| s.step_seconds).sum();
        let end = timeline.last().map_or(0.0, |s| s.seconds);
        let window = |s: &&TimelineSample| {
            s.seconds >= STEADY_STATE.0 * end && s.seconds <= STEADY_STATE.1 * end
        };
        let mut steady: Vec<&TimelineSample> = timeline.iter().filter(window).collect();
        if steady.is_empty() {
            steady = timeline.iter().collect();
        }
        let weighted = |samples: &[&TimelineSample], f: fn(&TimelineSample) -> f64| {
            let time: f64 = samples.iter().map(|s| s.step_seconds).sum();
            (time > 0.0).then(|| samples.iter().map(|s| f(s) * s.step_seconds).sum::<f64>() / time)
        };
        let waste = |samples: &[&TimelineSample]| {
            let reserved = weighted(samples, |s| s.reserved_bytes as f64)?;
            let live = weighted(samples, |s| s.live_bytes as f64)?;
            (reserved > 0.0).then(|| (reserved - live) / reserved)
        };
        let all: Vec<&TimelineSample> = timeline.iter().collect();
        RunSummary {
            mode: opts.scheduler.mode,
            load: opts.load,
            interrupted: outcome.interrupted,
            requests: requests.len(),
            requests_failed: requests.len() - ok.len(),
            output_tokens,
            wall_seconds: outcome.wall_seconds,
            output_tokens_per_second: rate(output_tokens as f64, outcome.wall_seconds),
            decode_tokens_per_second: rate(decode_rows as f64, decode_time),
            decode_steps: decode_only.len(),
            mean_decode_batch: rate(decode_rows as f64, decode_only.len() as f64),
            ttft_seconds: Percentiles::of(ok.iter().map(|r| r.ttft_seconds)),
            itl_seconds: Percentiles::of(outcome.inter_token_seconds.iter().copied()),
            tpot_seconds: Percentiles::of(
                ok.iter()
                    .filter(|r| r.output_tokens > 1)
                    .map(|r| r.tpot_seconds),
            ),
            latency_seconds: Percentiles::of(ok.iter().map(|r| r.latency_seconds)),
            preemptions: outcome.preemptions.len(),
            recomputed_tokens: ok.iter().map(|r| r.recomputed_tokens).sum(),
            prompt_tokens: ok.iter().map(|r| r.prompt_tokens).sum(),
            reused_tokens: ok.iter().map(|r| r.reused_tokens).sum(),
            kv_capacity_bytes: timeline.first().map_or(0, |s| s.capacity_bytes),
            peak_reserved_bytes: timeline.iter().map(|s| s.reserved_bytes).max().unwrap_or(0),
            steady_reserved_bytes: weighted(&steady, |s| s.reserved_bytes as f64).unwrap_or(0.0),
            steady_live_bytes: weighted(&steady, |s| s.live_bytes as f64).unwrap_or(0.0),
            waste: waste(&steady),
            waste_whole_run: waste(&all),
            peak_running: timeline.iter().map(|s| s.running).max().unwrap_or(0),
            steady_running: weighted(&steady, |s| s.running as f64).unwrap_or(0.0),
        }
    }
}

fn rate(amount: f64, per: f64) -> f64 {
    if per > 0.0 {
        amount / per
    } else {
        0.0
    }
}

/// `summary.json`.
#[derive(Clone, Debug, Serialize)]
pub struct BenchSummary {
    pub kvlab_version: String,
    pub started_at: String,
    pub finished_at: String,
    /// Stopped by Ctrl-C before every planned run ended.
    pub interrupted: bool,
    #[serde(flatten)]
    pub engine: EngineInfo,
    /// What the conversations are (scenario copies or a trace, and their shape).
    pub workload: String,
    pub conversations: usize,
    /// The settings shared by every run (the first run's; mode and load vary).
    pub options: Option<RunOptions>,
    pub runs: Vec<RunSummary>,
    pub preemptions: Vec<PreemptionRecord>,
}

impl BenchSummary {
    pub fn write_json(&self, path: &Path) -> Result<()> {
        let mut text = serde_json::to_string_pretty(self)?;
        text.push('\n');
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
    }

    /// Throughput and latency per run.
    pub fn speed_table(&self) -> Table {
        let mut table = Table::new(&[
            "mode",
            "load",
            "requests (failed)",
            "output tok/s",
            "decode tok/s (mean batch)",
            "TTFT p50 / p95 / p99 (s)",
            "ITL p50 / p95 / p99 (ms)",
            "preemptions",
        ]);
        for run in &self.runs {
            table.rows.push(vec![
                run.mode.to_string(),
                run.load.to_string(),
                format!("{} ({})", run.requests, run.requests_failed),
                format!("{:.2}", run.output_tokens_per_second),
                format!(
                    "{:.2} ({:.1})",
                    run.decode_tokens_per_second, run.mean_decode_batch
                ),
                percentiles(run.ttft_seconds, 1.0, 2),
                percentiles(run.itl_seconds, 1e3, 0),
                run.preemptions.to_string(),
            ]);
        }
        table
    }

    /// How many sequences the KV budget held in each mode, and what of it was waste.
    pub fn memory_table(&self) -> Table {
        let mut table = Table::new(&[
            "mode",
            "load",
            "KV budget (MiB)",
            "sequences at once: peak / steady mean",
            "reserved / live, steady mean (MiB)",
            "waste, steady (whole run)",
            "peak reserved (MiB)",
        ]);
        for run in &self.runs {
            table.rows.push(vec![
                run.mode.to_string(),
                run.load.to_string(),
                format!("{:.1}", run.kv_capacity_bytes as f64 / MIB),
                format!("{} / {:.1}", run.peak_running, run.steady_running),
                format!(
                    "{:.1} / {:.1}",
                    run.steady_reserved_bytes / MIB,
                    run.steady_live_bytes / MIB
                ),
                format!(
                    "{} ({})",
                    fraction(run.waste),
                    fraction(run.waste_whole_run)
                ),
                format!("{:.1}", run.peak_reserved_bytes as f64 / MIB),
            ]);
        }
        table
    }

    /// Per load present in both modes: how many more sequences the paged pool held at once.
    pub fn fit_ratios(&self) -> Vec<(Load, f64)> {
        let of = |mode: Mode, load: Load| {
            self.runs
                .iter()
                .find(|r| r.mode == mode && r.load == load)
                .map(|r| r.steady_running)
        };
        self.runs
            .iter()
            .filter(|r| r.mode == Mode::Paged)
            .filter_map(|r| {
                let static_mean = of(Mode::Static, r.load)?;
                (static_mean > 0.0).then(|| (r.load, r.steady_running / static_mean))
            })
            .collect()
    }

    /// `report.md`: the run, the tables, the preemptions and the plots.
    pub fn write_report(&self, path: &Path, plots: &[(&str, &str)]) -> Result<()> {
        let mut md = String::new();
        md.push_str("# kvlab serve-bench results\n\n");
        md.push_str(&format!("{}\n\n", self.engine.headline()));
        md.push_str(&format!(
            "- Run: {} to {}{}\n- Workload: {} ({} conversations; each turn is a request, sent when the previous turn is answered)\n",
            self.started_at,
            self.finished_at,
            if self.interrupted {
                " (**interrupted**: the tables hold what ran before Ctrl-C)"
            } else {
                ""
            },
            self.workload,
            self.conversations,
        ));
        if let Some(o) = &self.options {
            let s = &o.scheduler;
            md.push_str(&format!(
                "- Scheduler: max batch tokens {}; prefix reuse {}; paged chunks of {} positions; static runs of {}\n\n",
                s.max_batch_tokens,
                if s.prefix_reuse { "on" } else { "off" },
                o.chunk_tokens,
                s.max_context.map_or("the prompt + max new tokens".to_string(), |c| format!("{c} positions (--max-context)")),
            ));
        }
        md.push_str("## Throughput and latency\n\n");
        md.push_str(&self.speed_table().to_markdown());
        md.push_str(
            "\noutput tok/s = output tokens of the run / its wall time; decode tok/s = tokens of \
             the steps that only decoded / those steps' time (mean batch: rows per such step). \
             TTFT = arrival to first token (queueing included); ITL = every gap between two \
             consecutive tokens of a request.\n\n",
        );
        md.push_str("## KV memory: how many sequences fit, and the waste\n\n");
        md.push_str(&self.memory_table().to_markdown());
        md.push_str(
            "\nsequences at once = requests holding a sequence of the pool (admitted, running or \
             prefilling). waste = (reserved - live) / reserved, time-weighted over the steady \
             state (the middle 80 % of the run's time); reserved = chunks (paged) or runs \
             (static) held by sequences, live = their written positions.\n",
        );
        for (load, ratio) in self.fit_ratios() {
            md.push_str(&format!(
                "\nAt {load}, the paged pool held {ratio:.2}x the sequences of static reservation at once (steady-state means).\n"
            ));
        }
        if !self.preemptions.is_empty() {
            md.push_str(&format!(
                "\n## Preemptions ({})\n\nEach released its sequence, to be recomputed when the request was admitted again (all of them: `preemptions.csv`).\n\n",
                self.preemptions.len()
            ));
            let mut table = Table::new(&[
                "mode",
                "load",
                "s",
                "request",
                "conversation, turn",
                "sequence",
                "positions freed",
                "why",
            ]);
            for p in self.preemptions.iter().take(20) {
                table.rows.push(vec![
                    p.mode.to_string(),
                    p.load.clone(),
                    format!("{:.2}", p.seconds),
                    p.request.to_string(),
                    format!("{}, {}", p.conversation, p.turn),
                    p.sequence.clone(),
                    p.positions_freed.to_string(),
                    p.reason.clone(),
                ]);
            }
            md.push_str(&table.to_markdown());
        }
        if !plots.is_empty() {
            md.push_str("\n## Plots\n\n");
            for (file, caption) in plots {
                md.push_str(&format!("![{caption}]({file})\n\n"));
            }
        }
        md.push_str("Per request: `requests.csv`; per step: `timeline.csv`; preemptions: `preemptions.csv` (columns in kvlab's docs/serve-bench.md); everything above: `summary.json`.\n");
        std::fs::write(path, md).with_context(|| format!("cannot write {}", path.display()))
    }
}

fn percentiles(p: Option<Percentiles>, scale: f64, decimals: usize) -> String {
    p.map_or("n/a".into(), |p| {
        format!(
            "{:.*} / {:.*} / {:.*}",
            decimals,
            p.p50 * scale,
            decimals,
            p.p95 * scale,
            decimals,
            p.p99 * scale
        )
    })
}

fn fraction(f: Option<f64>) -> String {
    f.map_or("n/a".into(), |f| format!("{:.1} %", 100.0 * f))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let p = Percentiles::of((1..=200).map(f64::from)).unwrap();
        assert_eq!((p.p50, p.p95, p.p99, p.max), (100.0, 190.0, 198.0, 200.0));
        assert!(Percentiles::of([]).is_none());
    }
}
