//! The results folder: `turns.csv`, `generations.jsonl`, `summary.json`, the tables (printed,
//! and in `report.md` beside the plots).

use super::metrics::{Distribution, TurnRecord};
use super::protocol::{ProtocolOptions, TurnResult};
use crate::backend::BackendInfo;
use crate::kv::Strategy;
use anyhow::{Context, Result};
use serde::Serialize;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::kv::MIB;

/// One column of a CSV file of records `R`: its header and how a record writes it (each
/// file's columns are documented in docs/, which tests check against their lists).
pub struct Column<R> {
    pub name: &'static str,
    value: fn(&R) -> String,
}

pub const fn column<R>(name: &'static str, value: fn(&R) -> String) -> Column<R> {
    Column { name, value }
}

fn optional<T: ToString>(value: Option<T>) -> String {
    value.map(|v| v.to_string()).unwrap_or_default()
}

/// The columns of `turns.csv`, in order.
pub const TURN_COLUMNS: &[Column<TurnRecord>] = &[
    column("scenario", |r| r.scenario.clone()),
    column("strategy", |r| r.strategy.to_string()),
    column("turn", |r| r.turn.to_string()),
    column("success", |r| r.success.to_string()),
    column("error", |r| r.error.clone()),
    column("input_tokens", |r| r.input_tokens.to_string()),
    column("output_tokens", |r| r.output_tokens.to_string()),
    column("answer_reencoded_tokens", |r| {
        r.answer_reencoded_tokens.to_string()
    }),
    column("total_seconds", |r| format!("{:.6}", r.total_seconds)),
    column("prefill_seconds", |r| format!("{:.6}", r.prefill_seconds)),
    column("decode_seconds", |r| format!("{:.6}", r.decode_seconds)),
    column("decode_tokens_per_second", |r| {
        format!("{:.4}", r.decode_tokens_per_second)
    }),
    column("tokens_per_second", |r| {
        format!("{:.4}", r.tokens_per_second)
    }),
    column("kv_reserved_bytes", |r| r.kv_reserved_bytes.to_string()),
    column("kv_live_bytes", |r| r.kv_live_bytes.to_string()),
    column("kv_shared_bytes", |r| r.kv_shared_bytes.to_string()),
    column("kv_allocations", |r| r.kv_allocations.to_string()),
    column("kv_pool_capacity_bytes", |r| {
        r.kv_pool_capacity_bytes.to_string()
    }),
    column("kv_pool_reserved_bytes", |r| {
        r.kv_pool_reserved_bytes.to_string()
    }),
    column("kv_pool_cached_idle_bytes", |r| {
        r.kv_pool_cached_idle_bytes.to_string()
    }),
    column("reused_tokens", |r| {
        optional(r.reuse.map(|u| u.reused_tokens))
    }),
    column("prefilled_tokens", |r| {
        optional(r.reuse.map(|u| u.prefilled_tokens))
    }),
    column("reuse_hit_rate", |r| {
        optional(r.reuse.map(|u| format!("{:.4}", u.hit_rate())))
    }),
    column("missed_drift_tokens", |r| {
        optional(r.reuse.map(|u| u.missed_drift))
    }),
    column("missed_granularity_tokens", |r| {
        optional(r.reuse.map(|u| u.missed_granularity))
    }),
    column("missed_evicted_tokens", |r| {
        optional(r.reuse.map(|u| u.missed_evicted))
    }),
    column("process_peak_bytes", |r| optional(r.process_peak_bytes)),
    column("device_peak_bytes", |r| optional(r.device_peak_bytes)),
    column("study_memory_delta_bytes", |r| {
        optional(r.study_memory_delta_bytes)
    }),
    column("stopped_on_eos", |r| r.stopped_on_eos.to_string()),
    column("agrees_with_first_strategy", |r| {
        optional(r.agrees_with_first_strategy)
    }),
];

/// A CSV field, quoted when it holds a comma, a quote or a line break (RFC 4180).
pub fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

fn create_file(path: &Path) -> Result<BufWriter<File>> {
    File::create(path)
        .map(BufWriter::new)
        .with_context(|| format!("cannot create {}", path.display()))
}

/// A CSV file written a record at a time (flushed, so that a run that dies keeps every record
/// it wrote).
pub struct CsvFile<R: 'static> {
    file: BufWriter<File>,
    path: PathBuf,
    columns: &'static [Column<R>],
}

impl<R> CsvFile<R> {
    /// The file with its header line.
    pub fn create(path: &Path, columns: &'static [Column<R>]) -> Result<CsvFile<R>> {
        let mut csv = CsvFile {
            file: create_file(path)?,
            path: path.to_path_buf(),
            columns,
        };
        let header: Vec<&str> = columns.iter().map(|c| c.name).collect();
        csv.write_line(&header.join(","))?;
        Ok(csv)
    }

    pub fn append(&mut self, record: &R) -> Result<()> {
        let row: Vec<String> = self
            .columns
            .iter()
            .map(|c| csv_field(&(c.value)(record)))
            .collect();
        self.write_line(&row.join(","))
    }

    fn write_line(&mut self, line: &str) -> Result<()> {
        writeln!(self.file, "{line}")
            .and_then(|()| self.file.flush())
            .with_context(|| format!("writing {}", self.path.display()))
    }
}

/// `turns.csv` and `generations.jsonl`, written a turn at a time.
pub struct TurnFiles {
    csv: CsvFile<TurnRecord>,
    jsonl: BufWriter<File>,
    jsonl_path: PathBuf,
}

impl TurnFiles {
    pub fn create(dir: &Path) -> Result<TurnFiles> {
        let jsonl_path = dir.join("generations.jsonl");
        Ok(TurnFiles {
            csv: CsvFile::create(&dir.join("turns.csv"), TURN_COLUMNS)?,
            jsonl: create_file(&jsonl_path)?,
            jsonl_path,
        })
    }

    pub fn append(&mut self, result: &TurnResult) -> Result<()> {
        self.csv.append(&result.record)?;
        let line = serde_json::json!({
            "scenario": result.record.scenario,
            "strategy": result.record.strategy,
            "turn": result.record.turn,
            "input_tokens": result.record.input_tokens,
            "new_ids": result.new_ids,
            "answer": result.answer,
        });
        writeln!(self.jsonl, "{line}")
            .and_then(|()| self.jsonl.flush())
            .with_context(|| format!("writing {}", self.jsonl_path.display()))
    }
}

/// The model and backend that ran, for the first line of output and the top of every report.
#[derive(Clone, Debug, Serialize)]
pub struct EngineInfo {
    pub model: String,
    /// Random weights written by `kvlab synth`.
    pub synthetic: bool,
    /// Storage dtype of the checkpoint's weights (config.json), when it says.
    pub weights_dtype: Option<String>,
    pub backend: BackendInfo,
}

impl EngineInfo {
    /// One line: model, backend, device, dtypes, synthetic or not.
    pub fn headline(&self) -> String {
        format!(
            "model {} ({}) | backend {} on {} | dtype: weights {}, activations {}, KV {}",
            self.model,
            if self.synthetic {
                "SYNTHETIC random weights"
            } else {
                "real weights"
            },
            self.backend.name,
            self.backend.device,
            self.weights_dtype.as_deref().unwrap_or("unknown"),
            self.backend.activation_dtype,
            self.backend.kv_dtype,
        )
    }
}

/// Who ran what part of the study.
#[derive(Clone, Debug, Serialize)]
pub struct RunInfo {
    #[serde(flatten)]
    pub engine: EngineInfo,
    /// Greedy choices restricted to ordinary-text ids (the synthetic model's default).
    pub ordinary_text_only: bool,
    /// Which part of the study this run is ("the full study", or the subset and why).
    pub subset: String,
    pub scenarios: Vec<String>,
    pub protocol: ProtocolOptions,
}

/// Statistics of one strategy over its successful turns.
#[derive(Clone, Debug, Serialize)]
pub struct StrategySummary {
    pub strategy: Strategy,
    pub turns: usize,
    pub successes: usize,
    pub success_rate: f64,
    /// Turns compared with the first strategy, and how many gave the same ids.
    pub compared_turns: usize,
    pub agreeing_turns: usize,
    pub input_tokens: Option<Distribution>,
    pub total_seconds: Option<Distribution>,
    pub prefill_seconds: Option<Distribution>,
    pub decode_tokens_per_second: Option<Distribution>,
    pub tokens_per_second: Option<Distribution>,
    pub kv_reserved_mib: Option<Distribution>,
    pub kv_live_mib: Option<Distribution>,
    pub process_peak_mib: Option<Distribution>,
    pub device_peak_mib: Option<Distribution>,
    pub study_memory_delta_mib: Option<Distribution>,
}

impl StrategySummary {
    pub fn of(strategy: Strategy, records: &[TurnRecord]) -> StrategySummary {
        let mine: Vec<&TurnRecord> = records.iter().filter(|r| r.strategy == strategy).collect();
        let ok: Vec<&TurnRecord> = mine.iter().copied().filter(|r| r.success).collect();
        let column =
            |f: fn(&TurnRecord) -> Option<f64>| Distribution::of(ok.iter().filter_map(|r| f(r)));
        let compared: Vec<bool> = mine
            .iter()
            .filter_map(|r| r.agrees_with_first_strategy)
            .collect();
        StrategySummary {
            strategy,
            turns: mine.len(),
            successes: ok.len(),
            success_rate: if mine.is_empty() {
                0.0
            } else {
                ok.len() as f64 / mine.len() as f64
            },
            compared_turns: compared.len(),
            agreeing_turns: compared.iter().filter(|&&a| a).count(),
            input_tokens: column(|r| Some(r.input_tokens as f64)),
            total_seconds: column(|r| Some(r.total_seconds)),
            prefill_seconds: column(|r| Some(r.prefill_seconds)),
            decode_tokens_per_second: column(|r| {
                (r.output_tokens > 1).then_some(r.decode_tokens_per_second)
            }),
            tokens_per_second: column(|r| Some(r.tokens_per_second)),
            kv_reserved_mib: column(|r| Some(r.kv_reserved_bytes as f64 / MIB)),
            kv_live_mib: column(|r| Some(r.kv_live_bytes as f64 / MIB)),
            process_peak_mib: column(|r| r.process_peak_bytes.map(|b| b as f64 / MIB)),
            device_peak_mib: column(|r| r.device_peak_bytes.map(|b| b as f64 / MIB)),
            study_memory_delta_mib: column(|r| r.study_memory_delta_bytes.map(|b| b as f64 / MIB)),
        }
    }
}

/// `summary.json`.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub kvlab_version: String,
    pub started_at: String,
    pub finished_at: String,
    /// Stopped by Ctrl-C before every planned turn ran.
    pub interrupted: bool,
    pub run: RunInfo,
    pub turns_planned: usize,
    pub turns_measured: usize,
    pub turns_failed: usize,
    /// (scenario, strategy, turn) whose ids differ from the first strategy's.
    pub disagreements: Vec<(String, Strategy, usize)>,
    pub strategies: Vec<StrategySummary>,
}

impl Summary {
    pub fn new(
        run: RunInfo,
        records: &[TurnRecord],
        turns_planned: usize,
        started_at: String,
        interrupted: bool,
    ) -> Summary {
        let strategies = run
            .protocol
            .strategies
            .iter()
            .map(|&s| StrategySummary::of(s, records))
            .collect();
        Summary {
            kvlab_version: env!("CARGO_PKG_VERSION").to_string(),
            started_at,
            finished_at: chrono::Local::now().to_rfc3339(),
            interrupted,
            turns_planned,
            turns_measured: records.len(),
            turns_failed: records.iter().filter(|r| !r.success).count(),
            disagreements: records
                .iter()
                .filter(|r| r.agrees_with_first_strategy == Some(false))
                .map(|r| (r.scenario.clone(), r.strategy, r.turn))
                .collect(),
            strategies,
            run,
        }
    }

    pub fn write_json(&self, path: &Path) -> Result<()> {
        let mut text = serde_json::to_string_pretty(self)?;
        text.push('\n');
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
    }

    /// The study's Table 1 (mean time, memory, tokens/s per strategy), each with its median and p95.
    pub fn study_table(&self) -> Table {
        let mut table = Table::new(&[
            "strategy",
            "turns ok",
            "time (s) mean [median, p95]",
            "study memory delta (MiB) mean",
            "tokens/s mean [median, p95]",
        ]);
        for s in &self.strategies {
            table.rows.push(vec![
                s.strategy.to_string(),
                format!("{}/{}", s.successes, s.turns),
                spread(s.total_seconds.as_ref(), 3),
                mean(s.study_memory_delta_mib.as_ref(), 4),
                spread(s.tokens_per_second.as_ref(), 2),
            ]);
        }
        table
    }

    /// What the study's table leaves out: prefill apart from decode, the KV bytes held, the
    /// process's peak, and whether the strategies produced the same tokens.
    pub fn measured_table(&self) -> Table {
        let mut table = Table::new(&[
            "strategy",
            "TTFT (s) mean [median, p95]",
            "decode tok/s mean [median, p95]",
            "KV reserved (MiB) mean [max]",
            "KV live (MiB) mean [max]",
            "process peak (MiB) max",
            "same ids as first",
        ]);
        for s in &self.strategies {
            table.rows.push(vec![
                s.strategy.to_string(),
                spread(s.prefill_seconds.as_ref(), 3),
                spread(s.decode_tokens_per_second.as_ref(), 2),
                mean_max(s.kv_reserved_mib.as_ref()),
                mean_max(s.kv_live_mib.as_ref()),
                s.process_peak_mib
                    .as_ref()
                    .map_or("n/a".into(), |d| format!("{:.0}", d.max)),
                format!("{}/{}", s.agreeing_turns, s.compared_turns),
            ]);
        }
        table
    }

    /// Per `+reuse` strategy and turn (means over scenarios): prompt tokens, what was reused
    /// and prefilled, why the rest missed, the time to first token, and the KV bytes: the
    /// pool's arena, what the conversation's sequence held (live, shared), and the pool's
    /// chunks held by any sequence and cached idle. None when no strategy reuses.
    pub fn reuse_table(records: &[TurnRecord]) -> Option<Table> {
        let mut table = Table::new(&[
            "strategy",
            "turn",
            "prompt",
            "reused",
            "prefilled",
            "hit rate",
            "missed: drift / granularity / evicted",
            "TTFT (s)",
            "KV pool / seq reserved / live / shared / pool held / cached idle (MiB)",
        ]);
        let mut keys: Vec<(Strategy, usize)> = records
            .iter()
            .filter(|r| r.success && r.reuse.is_some())
            .map(|r| (r.strategy, r.turn))
            .collect();
        keys.sort_by_key(|&(s, t)| (s.name(), t));
        keys.dedup();
        for (strategy, turn) in keys {
            let rows: Vec<&TurnRecord> = records
                .iter()
                .filter(|r| r.success && r.strategy == strategy && r.turn == turn)
                .collect();
            let n = rows.len() as f64;
            let avg = |f: &dyn Fn(&TurnRecord) -> f64| rows.iter().map(|r| f(r)).sum::<f64>() / n;
            let reuse = |f: fn(&crate::generate::ReuseStats) -> usize| {
                avg(&|r: &TurnRecord| r.reuse.map_or(0.0, |u| f(&u) as f64))
            };
            let mib = |f: fn(&TurnRecord) -> u64| avg(&|r: &TurnRecord| f(r) as f64 / MIB);
            table.rows.push(vec![
                strategy.to_string(),
                turn.to_string(),
                format!("{:.0}", avg(&|r| r.input_tokens as f64)),
                format!("{:.0}", reuse(|u| u.reused_tokens)),
                format!("{:.0}", reuse(|u| u.prefilled_tokens)),
                format!("{:.2}", avg(&|r| r.reuse.map_or(0.0, |u| u.hit_rate()))),
                format!(
                    "{:.0} / {:.0} / {:.0}",
                    reuse(|u| u.missed_drift),
                    reuse(|u| u.missed_granularity),
                    reuse(|u| u.missed_evicted)
                ),
                format!("{:.3}", avg(&|r| r.prefill_seconds)),
                format!(
                    "{:.1} / {:.2} / {:.2} / {:.2} / {:.2} / {:.2}",
                    mib(|r| r.kv_pool_capacity_bytes),
                    mib(|r| r.kv_reserved_bytes),
                    mib(|r| r.kv_live_bytes),
                    mib(|r| r.kv_shared_bytes),
                    mib(|r| r.kv_pool_reserved_bytes),
                    mib(|r| r.kv_pool_cached_idle_bytes)
                ),
            ]);
        }
        (!table.rows.is_empty()).then_some(table)
    }

    /// `report.md`: the run, both tables, the plots, failures and disagreements.
    pub fn write_report(
        &self,
        path: &Path,
        records: &[TurnRecord],
        plots: &[(&str, &str)],
    ) -> Result<()> {
        let run = &self.run;
        let mut md = String::new();
        md.push_str("# kvlab scenario results\n\n");
        md.push_str(&format!("{}\n\n", run.engine.headline()));
        md.push_str(&format!(
            "- Run: {} to {}{}\n- Which: {}\n- Scenarios: {}\n- Strategies: {} (agreement is checked against `{}`)\n",
            self.started_at,
            self.finished_at,
            if self.interrupted { " (**interrupted**: the tables hold the turns measured before Ctrl-C)" } else { "" },
            run.subset,
            run.scenarios.join(", "),
            run.protocol.strategies.iter().map(|s| s.name()).collect::<Vec<_>>().join(", "),
            run.protocol.strategies.first().map_or("-", |s| s.name()),
        ));
        let p = &run.protocol;
        md.push_str(&format!(
            "- Protocol: the study's (history re-templated every turn; the study's strategies re-prefill it in a fresh cache per call, the `+reuse` ones keep the conversation's cache); turns per scenario: {}; max new tokens: {}; ignore EOS: {}; ordinary-text ids only: {}; dynamic chunk: {} positions; static capacity: {}; warm-up before each strategy: {}\n",
            p.turns.map_or("all".into(), |t| t.to_string()),
            p.max_new_tokens,
            p.ignore_eos,
            run.ordinary_text_only,
            p.chunk_tokens,
            p.max_context.map_or(
                "prompt + max new tokens (static+reuse: the conversation's templated turns + 2 x max new tokens per turn)".into(),
                |c| c.to_string()
            ),
            p.warmup,
        ));
        md.push_str(&format!(
            "- Turns: {} measured of {} planned, {} failed\n\n",
            self.turns_measured, self.turns_planned, self.turns_failed
        ));
        md.push_str("## The study's Table 1, with medians and p95\n\n");
        md.push_str(&self.study_table().to_markdown());
        md.push_str(
            "\n\"study memory delta\" is the study's memory figure: resident memory after the \
             generate call minus before it. The cache is freed when the call returns, so it reads \
             about zero whatever the cache held; the next table has the bytes actually held.\n\n",
        );
        md.push_str("## What the study's table leaves out\n\n");
        md.push_str(&self.measured_table().to_markdown());
        md.push_str(
            "\nTTFT = time to first token (the prompt's forward pass). KV reserved = the largest \
             KV memory a strategy held at once in a call; live = the part holding written \
             positions when the call ended (`none` keeps nothing between tokens: it rebuilds a \
             transient cache for every token). Process peak = peak resident memory during the \
             call (weights mapped from disk included).\n\n",
        );
        if let Some(table) = Self::reuse_table(records) {
            md.push_str("## Prefix reuse, turn by turn (means over scenarios)\n\n");
            md.push_str(&table.to_markdown());
            md.push_str(
                "\nreused = leading prompt tokens whose K/V the call kept (the conversation's \
                 sequence up to its common prefix with the new prompt) or shared (full chunks \
                 another sequence cached, `dynamic+reuse`); prefilled = the rest, computed by \
                 the call's prefill. Missed: drift = tokens the sequence held past the point \
                 where the re-templated prompt differs from them; granularity = tokens a cached \
                 chunk also starts with that end inside a chunk; evicted = cached chunks \
                 evicted to make room. KV: the pool's arena, the bytes the conversation's \
                 sequence reserved, live and shared, then the pool's chunks held by any sequence \
                 and those cached but idle, when the call ended.\n\n",
            );
        }
        if !self.disagreements.is_empty() {
            md.push_str(
                "## Disagreements\n\nThese turns generated other ids than the first strategy:\n\n",
            );
            for (scenario, strategy, turn) in &self.disagreements {
                md.push_str(&format!("- {scenario}, {strategy}, turn {turn}\n"));
            }
            md.push('\n');
        }
        if !plots.is_empty() {
            md.push_str("## Plots\n\n");
            for (file, caption) in plots {
                md.push_str(&format!("![{caption}]({file})\n\n"));
            }
        }
        md.push_str("Per-turn data: `turns.csv` (columns in kvlab's docs/scenario.md); generated ids and text: `generations.jsonl`; everything above: `summary.json`.\n");
        std::fs::write(path, md).with_context(|| format!("cannot write {}", path.display()))
    }
}

fn spread(d: Option<&Distribution>, decimals: usize) -> String {
    d.map_or("n/a".into(), |d| {
        format!(
            "{:.*} [{:.*}, {:.*}]",
            decimals, d.mean, decimals, d.median, decimals, d.p95
        )
    })
}

fn mean(d: Option<&Distribution>, decimals: usize) -> String {
    d.map_or("n/a".into(), |d| format!("{:.*}", decimals, d.mean))
}

fn mean_max(d: Option<&Distribution>) -> String {
    d.map_or("n/a".into(), |d| format!("{:.2} [{:.2}]", d.mean, d.max))
}

/// A table of text cells, printed aligned or as Markdown.
#[derive(Clone, Debug, PartialEq)]
pub struct Table {
    pub headers: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&str]) -> Table {
        Table {
            headers: headers.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Columns padded to their widest cell, two spaces apart.
    pub fn to_text(&self) -> String {
        let widths: Vec<usize> = (0..self.headers.len())
            .map(|i| {
                std::iter::once(&self.headers)
                    .chain(&self.rows)
                    .map(|row| row.get(i).map_or(0, |c| c.chars().count()))
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |row: &[String]| {
            let cells: Vec<String> = row
                .iter()
                .zip(&widths)
                .map(|(cell, &w)| format!("{cell:<w$}"))
                .collect();
            cells.join("  ").trim_end().to_string() + "\n"
        };
        let mut text = line(&self.headers);
        let rule: Vec<String> = widths.iter().map(|&w| "-".repeat(w)).collect();
        text.push_str(&line(&rule));
        for row in &self.rows {
            text.push_str(&line(row));
        }
        text
    }

    pub fn to_markdown(&self) -> String {
        let line = |row: &[String]| format!("| {} |\n", row.join(" | "));
        let mut md = line(&self.headers);
        md.push_str(&line(&vec!["---".to_string(); self.headers.len()]));
        for row in &self.rows {
            md.push_str(&line(row));
        }
        md
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_are_quoted_only_when_needed() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\"\nthen"), "\"say \"\"hi\"\"\nthen\"");
    }

    #[test]
    fn tables_align_and_render_markdown() {
        let mut t = Table::new(&["a", "long header"]);
        t.rows.push(vec!["wide cell".into(), "x".into()]);
        assert_eq!(
            t.to_text(),
            "a          long header\n---------  -----------\nwide cell  x\n"
        );
        assert_eq!(
            t.to_markdown(),
            "| a | long header |\n| --- | --- |\n| wide cell | x |\n"
        );
    }
}
