//! What `kvlab kv-eval` writes: `turns.csv` (a row per configuration, mode, scenario and turn,
//! written as turns finish), `summary.json` (the run and a summary per configuration),
//! `report.md` (the table, the targets, the plot).

use super::{EvalConfig, EvalOptions, Mode, TurnEval};
use crate::backend::BackendInfo;
use crate::scenario::metrics::Distribution;
use crate::scenario::report::{csv_field, Table};
use anyhow::{Context, Result};
use serde::Serialize;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

const MIB: f64 = (1u64 << 20) as f64;

/// A column of `turns.csv`: its name and how it is read from a record.
type Column = (&'static str, fn(&TurnEval) -> String);

/// The columns of `turns.csv`, in order.
const COLUMNS: &[Column] = &[
    ("config", |t| t.config.clone()),
    ("dtype", |t| t.dtype.clone()),
    ("policy", |t| t.policy.clone()),
    ("mode", |t| t.mode.clone()),
    ("scenario", |t| t.scenario.clone()),
    ("turn", |t| t.turn.to_string()),
    ("prompt_tokens", |t| t.prompt_tokens.to_string()),
    ("steps", |t| t.steps.to_string()),
    ("mean_kl_divergence", |t| {
        format!("{:e}", t.kl_sum / t.steps.max(1) as f64)
    }),
    ("max_kl_divergence", |t| format!("{:e}", t.kl_max)),
    ("top1_agreement", |t| {
        format!("{:.4}", ratio(t.top1_agreements, t.steps))
    }),
    ("max_logit_error", |t| format!("{:e}", t.max_logit_error)),
    ("perplexity", |t| {
        format!("{:.4}", (t.nll_sum / t.steps.max(1) as f64).exp())
    }),
    ("reference_perplexity", |t| {
        format!("{:.4}", (t.reference_nll_sum / t.steps.max(1) as f64).exp())
    }),
    ("answer_tokens", |t| t.answer_tokens.to_string()),
    ("answer_tokens_matching_reference", |t| {
        t.answer_tokens_matching_reference.to_string()
    }),
    ("kv_reserved_bytes", |t| t.kv_reserved_bytes.to_string()),
    ("kv_live_bytes", |t| t.kv_live_bytes.to_string()),
    ("kv_tokens", |t| t.kv_tokens.to_string()),
    ("evicted_tokens", |t| t.evicted_tokens.to_string()),
    ("decode_tokens_per_second", |t| {
        format!("{:.2}", t.decode_tokens_per_second)
    }),
];

fn ratio(part: usize, whole: usize) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

/// `turns.csv`, a row at a time (flushed, so that a run that dies keeps every turn it finished).
pub struct TurnsCsv {
    path: PathBuf,
    file: BufWriter<File>,
}

impl TurnsCsv {
    pub fn create(dir: &Path) -> Result<TurnsCsv> {
        let path = dir.join("turns.csv");
        let file =
            File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
        let mut csv = TurnsCsv {
            path,
            file: BufWriter::new(file),
        };
        let header: Vec<&str> = COLUMNS.iter().map(|c| c.0).collect();
        csv.line(&header.join(","))?;
        Ok(csv)
    }

    pub fn append(&mut self, turn: &TurnEval) -> Result<()> {
        let row: Vec<String> = COLUMNS.iter().map(|c| csv_field(&(c.1)(turn))).collect();
        self.line(&row.join(","))
    }

    fn line(&mut self, line: &str) -> Result<()> {
        writeln!(self.file, "{line}")
            .and_then(|()| self.file.flush())
            .with_context(|| format!("writing {}", self.path.display()))
    }
}

/// One mode of one configuration, over every step of every turn it ran.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ModeSummary {
    pub turns: usize,
    pub steps: usize,
    /// Mean over every step (not over turns).
    pub mean_kl_divergence: f64,
    pub max_kl_divergence: f64,
    pub top1_agreement: f64,
    /// Steps whose argmax differs from the reference's, and the largest margin between the
    /// reference's two best logits among them.
    pub top1_flips: usize,
    pub largest_flip_margin: f64,
    pub max_logit_error: f64,
    /// exp(mean −log p) of the next tokens: under the configuration, and under the f32 full
    /// cache (teacher-forced: the reference's answers; free-running: the configuration's own).
    pub perplexity: f64,
    pub reference_perplexity: f64,
    /// Turns whose answer equals the reference's, and the share of answer tokens before the
    /// first difference.
    pub identical_answers: usize,
    pub matching_token_fraction: f64,
    /// KV bytes of the sequence when each turn ended.
    pub kv_live_bytes: Option<Distribution>,
    pub kv_reserved_bytes: Option<Distribution>,
    pub evicted_tokens: Option<Distribution>,
    pub decode_tokens_per_second: Option<Distribution>,
}

impl ModeSummary {
    fn of(turns: &[&TurnEval]) -> ModeSummary {
        let steps: usize = turns.iter().map(|t| t.steps).sum();
        let sum = |f: fn(&TurnEval) -> f64| turns.iter().map(|t| f(t)).sum::<f64>();
        let max = |f: fn(&TurnEval) -> f64| turns.iter().map(|t| f(t)).fold(0.0, f64::max);
        let per_step = |total: f64| total / steps.max(1) as f64;
        let answer_tokens: usize = turns.iter().map(|t| t.answer_tokens).sum();
        let matching: usize = turns
            .iter()
            .map(|t| t.answer_tokens_matching_reference)
            .sum();
        let of = |f: fn(&TurnEval) -> f64| Distribution::of(turns.iter().map(|t| f(t)));
        ModeSummary {
            turns: turns.len(),
            steps,
            mean_kl_divergence: per_step(sum(|t| t.kl_sum)),
            max_kl_divergence: max(|t| t.kl_max),
            top1_agreement: ratio(turns.iter().map(|t| t.top1_agreements).sum(), steps),
            top1_flips: steps - turns.iter().map(|t| t.top1_agreements).sum::<usize>(),
            largest_flip_margin: max(|t| t.largest_flip_margin),
            max_logit_error: max(|t| t.max_logit_error),
            perplexity: per_step(sum(|t| t.nll_sum)).exp(),
            reference_perplexity: per_step(sum(|t| t.reference_nll_sum)).exp(),
            identical_answers: turns
                .iter()
                .filter(|t| t.answer_tokens_matching_reference == t.answer_tokens)
                .count(),
            matching_token_fraction: ratio(matching, answer_tokens),
            kv_live_bytes: of(|t| t.kv_live_bytes as f64),
            kv_reserved_bytes: of(|t| t.kv_reserved_bytes as f64),
            evicted_tokens: of(|t| t.evicted_tokens as f64),
            decode_tokens_per_second: of(|t| t.decode_tokens_per_second),
        }
    }
}

/// A configuration over the whole run.
#[derive(Clone, Debug, Serialize)]
pub struct ConfigSummary {
    pub config: String,
    pub dtype: String,
    pub policy: String,
    /// KV bytes one position takes (codes and scales).
    pub kv_bytes_per_token: usize,
    pub teacher_forced: ModeSummary,
    pub free_running: ModeSummary,
}

/// Who ran what.
#[derive(Clone, Debug, Serialize)]
pub struct EvalRunInfo {
    pub model: String,
    pub weights_dtype: Option<String>,
    pub backend: BackendInfo,
    /// Which part of the evaluation this run is.
    pub subset: String,
    pub scenarios: Vec<String>,
    pub options: EvalOptions,
}

/// `summary.json`.
#[derive(Clone, Debug, Serialize)]
pub struct EvalSummary {
    pub run: EvalRunInfo,
    pub started_at: String,
    pub finished_at: String,
    pub interrupted: bool,
    pub planned_turns: usize,
    pub measured_turns: usize,
    pub configs: Vec<ConfigSummary>,
}

impl EvalSummary {
    /// `bytes_per_token(config)`: KV bytes a position of that configuration takes.
    pub fn new(
        run: EvalRunInfo,
        configs: &[EvalConfig],
        turns: &[TurnEval],
        bytes_per_token: impl Fn(&EvalConfig) -> usize,
        planned_turns: usize,
        started_at: String,
        interrupted: bool,
    ) -> EvalSummary {
        let summaries = configs
            .iter()
            .map(|config| {
                let label = config.label();
                let of_mode = |mode: Mode| {
                    let turns: Vec<&TurnEval> = turns
                        .iter()
                        .filter(|t| t.config == label && t.mode == mode.name())
                        .collect();
                    ModeSummary::of(&turns)
                };
                ConfigSummary {
                    config: label.clone(),
                    dtype: config.dtype.to_string(),
                    policy: config.policy.to_string(),
                    kv_bytes_per_token: bytes_per_token(config),
                    teacher_forced: of_mode(Mode::TeacherForced),
                    free_running: of_mode(Mode::FreeRunning),
                }
            })
            .filter(|c| c.teacher_forced.turns + c.free_running.turns > 0)
            .collect();
        EvalSummary {
            run,
            started_at,
            finished_at: chrono::Local::now().to_rfc3339(),
            interrupted,
            planned_turns,
            measured_turns: turns.len(),
            configs: summaries,
        }
    }

    pub fn write_json(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("cannot write {}", path.display()))
    }

    /// The table of every configuration: bytes, quality both ways, speed.
    pub fn table(&self) -> Table {
        let mut table = Table::new(&[
            "config",
            "KV B/token",
            "live KV MiB mean (max)",
            "TF mean KLD",
            "TF top-1 (flips: largest ref margin)",
            "TF max logit err",
            "TF ppl (f32: ppl)",
            "FR mean KLD",
            "FR top-1",
            "FR same answers",
            "decode tok/s median",
        ]);
        for c in &self.configs {
            let (tf, fr) = (&c.teacher_forced, &c.free_running);
            let live = fr.kv_live_bytes.or(tf.kv_live_bytes);
            table.rows.push(vec![
                c.config.clone(),
                c.kv_bytes_per_token.to_string(),
                live.map_or("-".into(), |d| {
                    format!("{:.2} ({:.2})", d.mean / MIB, d.max / MIB)
                }),
                format!("{:.2e}", tf.mean_kl_divergence),
                format!(
                    "{:.2}% ({}: {:.3})",
                    100.0 * tf.top1_agreement,
                    tf.top1_flips,
                    tf.largest_flip_margin
                ),
                format!("{:.3}", tf.max_logit_error),
                format!("{:.3} ({:.3})", tf.perplexity, tf.reference_perplexity),
                format!("{:.2e}", fr.mean_kl_divergence),
                format!("{:.2}%", 100.0 * fr.top1_agreement),
                format!("{}/{}", fr.identical_answers, fr.turns),
                fr.decode_tokens_per_second
                    .map_or("-".into(), |d| format!("{:.1}", d.median)),
            ]);
        }
        table
    }

    /// The targets for int8 (mean KLD at most 1e-3 and top-1 agreement at least 99%,
    /// teacher-forced), and the same figures for every other configuration.
    pub fn targets(&self) -> Vec<String> {
        self.configs
            .iter()
            .map(|c| {
                let tf = &c.teacher_forced;
                let met = tf.mean_kl_divergence <= 1e-3 && tf.top1_agreement >= 0.99;
                format!(
                    "{}: mean KLD {:.2e} (target ≤ 1e-3), top-1 {:.2}% (target ≥ 99%) over {} \
                     steps, {} flips, the largest at a reference margin of {:.3}: {}",
                    c.config,
                    tf.mean_kl_divergence,
                    100.0 * tf.top1_agreement,
                    tf.steps,
                    tf.top1_flips,
                    tf.largest_flip_margin,
                    if met { "met" } else { "not met" }
                )
            })
            .collect()
    }

    pub fn write_report(&self, path: &Path, plots: &[(&str, &str)]) -> Result<()> {
        let mut md = String::new();
        md.push_str("# kvlab kv-eval\n\n");
        md.push_str(&format!(
            "Model {} (weights {}), backend {} on {}. {} Scenarios: {}. Started {}, finished {}{}.\n\n",
            self.run.model,
            self.run.weights_dtype.as_deref().unwrap_or("unknown"),
            self.run.backend.name,
            self.run.backend.device,
            self.run.subset,
            self.run.scenarios.join(", "),
            self.started_at,
            self.finished_at,
            if self.interrupted {
                format!(
                    "; INTERRUPTED after {} of {} turn records",
                    self.measured_turns, self.planned_turns
                )
            } else {
                String::new()
            }
        ));
        md.push_str(
            "Every configuration against the f32 full cache. TF = teacher-forced on the f32 \
             cache's own answers (KLD and top-1 at every answer position; for the positions whose \
             top-1 differs, their count and the largest margin between the reference's two best \
             logits there; the largest logit error, the perplexity of those answers under the configuration and, in brackets, \
             under the f32 cache); FR = free-running, compared with the f32 cache fed the \
             configuration's own conversation (same answers: turns whose answer equals the \
             reference's). Live KV: the sequence's bytes when a free-running turn ended. Decode \
             tok/s: free-running turns.\n\n",
        );
        md.push_str(&self.table().to_markdown());
        md.push_str("\n## Targets\n\n");
        for line in self.targets() {
            md.push_str(&format!("- {line}\n"));
        }
        for (file, caption) in plots {
            md.push_str(&format!("\n![{caption}]({file})\n"));
        }
        std::fs::write(path, md).with_context(|| format!("cannot write {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turn(config: &str, mode: Mode, steps: usize, kl_sum: f64, top1: usize) -> TurnEval {
        TurnEval {
            config: config.into(),
            mode: mode.name().into(),
            steps,
            kl_sum,
            kl_max: kl_sum,
            top1_agreements: top1,
            answer_tokens: steps,
            answer_tokens_matching_reference: top1,
            nll_sum: steps as f64,
            ..TurnEval::default()
        }
    }

    #[test]
    fn summaries_pool_every_step_of_every_turn() {
        let turns = [
            turn("int8/full", Mode::TeacherForced, 10, 0.01, 10),
            turn("int8/full", Mode::TeacherForced, 30, 0.01, 29),
            turn("int8/full", Mode::FreeRunning, 40, 0.08, 39),
        ];
        let refs: Vec<&TurnEval> = turns[..2].iter().collect();
        let tf = ModeSummary::of(&refs);
        // Means over the 40 steps, not over the two turns.
        assert_eq!(tf.steps, 40);
        assert!((tf.mean_kl_divergence - 0.02 / 40.0).abs() < 1e-15);
        assert!((tf.top1_agreement - 39.0 / 40.0).abs() < 1e-15);
        assert_eq!(tf.top1_flips, 1);
        assert!((tf.perplexity - 1f64.exp()).abs() < 1e-12);
        assert_eq!(tf.identical_answers, 1);
        let mut csv = Vec::new();
        for t in &turns {
            let row: Vec<String> = COLUMNS.iter().map(|c| csv_field(&(c.1)(t))).collect();
            csv.push(row.join(","));
        }
        assert!(
            csv[0].starts_with("int8/full,,,teacher-forced,"),
            "{}",
            csv[0]
        );
        assert_eq!(csv[0].split(',').count(), COLUMNS.len());
    }
}
