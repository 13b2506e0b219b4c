use super::ModelArgs;
use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use kvlab::kv::Strategy;
use kvlab::model::hub::resolve_model_dir;
use kvlab::model::synth;
use kvlab::scenario::metrics::TurnRecord;
use kvlab::scenario::plots::draw_run_plots;
use kvlab::scenario::protocol::{run_protocol, Observer, ProtocolOptions, TurnResult};
use kvlab::scenario::report::{RunInfo, Summary, TurnFiles};
use kvlab::scenario::scenarios::{self, Scenario};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The study's model, used when it is in the local Hugging Face cache and no --model is given.
const STUDY_MODEL: &str = "meta-llama/Llama-3.2-1B";
/// The study's generation length.
const STUDY_NEW_TOKENS: usize = 150;
/// The default on a CPU without --full: 11 minutes on 2 cores (AMD EPYC, synthetic 1B, the
/// SIMD matmul of the cpumm branch), most of it in `none`.
const CPU_SUBSET_SCENARIOS: [&str; 1] = ["insurance_claim_auto"];
const CPU_SUBSET_TURNS: usize = 3;
const CPU_SUBSET_NEW_TOKENS: usize = 32;

#[derive(Args, Debug)]
pub struct ScenarioArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Comma-separated: study scenario names, `all` (the study's five), or scenario files
    /// (.json / .toml, the shape of the study's). Default: all five (a subset on a CPU).
    #[arg(long, value_delimiter = ',')]
    pub scenarios: Option<Vec<String>>,
    /// Strategies in order; agreement is checked against the first.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = Strategy::ALL)]
    pub strategies: Vec<Strategy>,
    /// Run the first N turns of each scenario (default: all 15; fewer on a CPU).
    #[arg(long)]
    pub turns: Option<usize>,
    /// Tokens generated per turn (default: the study's 150; fewer on a CPU).
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// On a CPU, run the full study instead of the default subset.
    #[arg(long)]
    pub full: bool,
    /// Generate all --max-new-tokens past a stop token [default: true for synthetic weights].
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub ignore_eos: Option<bool>,
    /// Restrict greedy choices to ordinary-text ids (a space and letters), so that an answer
    /// re-encodes to as many tokens as it had [default: true for synthetic weights].
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub ordinary_text_only: Option<bool>,
    /// Positions per chunk of the dynamic cache.
    #[arg(long, default_value_t = 256)]
    pub chunk_tokens: usize,
    /// Static cache capacity in positions (default: prompt + max new tokens, per call).
    #[arg(long)]
    pub max_context: Option<usize>,
    /// Results folder (default: results/scenario-<date>-<time>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Seed of the synthetic weights (without --model; default 0, the default model).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Skip the warm-up generation before each scenario x strategy.
    #[arg(long)]
    pub no_warmup: bool,
}

/// Which part of the study runs: explicit options win, then the CPU subset, then the study.
struct Plan {
    scenarios: Vec<Scenario>,
    turns: Option<usize>,
    max_new_tokens: usize,
    description: String,
}

fn plan(args: &ScenarioArgs, on_gpu: bool) -> Result<Plan> {
    let subset = !on_gpu && !args.full;
    let scenario_items: Vec<String> = match (&args.scenarios, subset) {
        (Some(items), _) => items.clone(),
        (None, true) => CPU_SUBSET_SCENARIOS.iter().map(|s| s.to_string()).collect(),
        (None, false) => vec!["all".to_string()],
    };
    let scenarios = scenarios::select(&scenario_items)?;
    if let Some(twice) = args
        .strategies
        .iter()
        .enumerate()
        .find_map(|(i, s)| args.strategies[..i].contains(s).then_some(s))
    {
        bail!("--strategies names {twice} twice");
    }
    let turns = args.turns.or(subset.then_some(CPU_SUBSET_TURNS));
    if turns == Some(0) {
        bail!("--turns must be at least 1");
    }
    let max_new_tokens = args.max_new_tokens.unwrap_or(if subset {
        CPU_SUBSET_NEW_TOKENS
    } else {
        STUDY_NEW_TOKENS
    });
    if max_new_tokens == 0 {
        bail!("--max-new-tokens must be at least 1");
    }
    let defaults_only =
        args.scenarios.is_none() && args.turns.is_none() && args.max_new_tokens.is_none();
    let description = match (defaults_only, subset) {
        (true, false) => {
            "the full study: 5 scenarios x 15 turns x each strategy x 150 new tokens".to_string()
        }
        (true, true) => format!(
            "the CPU default subset: {}, turns 1-{CPU_SUBSET_TURNS}, {CPU_SUBSET_NEW_TOKENS} new \
             tokens, each strategy (about 10-15 min on 2 cores); the full study (5 scenarios x 15 \
             turns x 3 strategies x 150 tokens, hours on a CPU, mostly in `none`): add --full",
            CPU_SUBSET_SCENARIOS.join(", ")
        ),
        (false, _) => format!(
            "a chosen part of the study: {} scenario(s), {} turn(s) each, {max_new_tokens} new tokens",
            scenarios.len(),
            turns.map_or("all".to_string(), |t| t.to_string())
        ),
    };
    Ok(Plan {
        scenarios,
        turns,
        max_new_tokens,
        description,
    })
}

/// `--model`, else the study's model when the HF cache has its weights, else the synthetic one.
fn model_spec(args: &ScenarioArgs) -> Result<Option<String>> {
    if let Some(model) = &args.model.model {
        if args.seed.is_some() {
            bail!("--seed picks the synthetic weights; it does not apply to --model");
        }
        return Ok(Some(model.clone()));
    }
    if let Some(seed) = args.seed {
        let dir = synth::synthetic_model_dir(synth::Preset::Llama32_1B, seed)?;
        return Ok(Some(dir.display().to_string()));
    }
    Ok(resolve_model_dir(STUDY_MODEL)
        .ok()
        .filter(|dir| has_weights(dir))
        .map(|dir| dir.display().to_string()))
}

fn has_weights(dir: &Path) -> bool {
    dir.join("model.safetensors").is_file() || dir.join("model.safetensors.index.json").is_file()
}

pub fn run(args: ScenarioArgs) -> Result<()> {
    let model_args = super::ModelArgs {
        model: model_spec(&args)?,
        ..args.model.clone()
    };
    let mut loaded = model_args.load()?;
    let tokenizer = loaded.tokenizer.take().with_context(|| {
        format!(
            "{} has no tokenizer.json: the scenarios are text conversations",
            loaded.path.display()
        )
    })?;
    let backend = loaded.generator.backend_info();
    let plan = plan(&args, backend.name == "cuda")?;
    let ignore_eos = args.ignore_eos.unwrap_or(loaded.synthetic);
    let ordinary_text_only = args.ordinary_text_only.unwrap_or(loaded.synthetic);
    if ordinary_text_only {
        loaded
            .generator
            .set_allowed_tokens(Some(&tokenizer.ordinary_text_mask()))?;
    }
    let protocol = ProtocolOptions {
        strategies: args.strategies.clone(),
        turns: plan.turns,
        max_new_tokens: plan.max_new_tokens,
        ignore_eos,
        chunk_tokens: args.chunk_tokens,
        max_context: args.max_context,
        warmup: !args.no_warmup,
        date_string: Some(chrono::Local::now().format("%d %b %Y").to_string()),
    };
    let info = RunInfo {
        engine: loaded.engine_info(backend),
        ordinary_text_only,
        subset: plan.description.clone(),
        scenarios: plan.scenarios.iter().map(|s| s.name.clone()).collect(),
        protocol: protocol.clone(),
    };
    let dir = super::results_dir(args.out.as_deref(), "scenario")?;

    println!("{}", info.engine.headline());
    println!("Running {}.", plan.description);
    if loaded.synthetic {
        println!(
            "Synthetic weights: greedy choices {} ordinary-text ids (a space and letters) so that an \
             answer of N tokens adds about N tokens to the next prompt, as a real model's does \
             (re-encoded count per turn: answer_reencoded_tokens); EOS {}.",
            if ordinary_text_only { "restricted to" } else { "NOT restricted to" },
            if ignore_eos { "ignored" } else { "stops a turn" },
        );
    }
    println!(
        "Results go to {} (Ctrl-C stops after the current turn and still writes them).",
        dir.display()
    );

    let stop = super::stop_on_ctrl_c("the current turn")?;

    let planned: usize = plan
        .scenarios
        .iter()
        .map(|s| plan.turns.map_or(s.turns.len(), |t| t.min(s.turns.len())))
        .sum::<usize>()
        * protocol.strategies.len();
    let started_at = chrono::Local::now().to_rfc3339();
    let mut progress = Progress::new(planned as u64, TurnFiles::create(&dir)?);
    let outcome = run_protocol(
        loaded.generator.as_mut(),
        &tokenizer,
        &plan.scenarios,
        &protocol,
        stop,
        &mut progress,
    )?;
    progress.bar.finish_and_clear();

    let records: Vec<TurnRecord> = outcome.turns.iter().map(|t| t.record.clone()).collect();
    let summary = Summary::new(info, &records, planned, started_at, outcome.interrupted);
    summary.write_json(&dir.join("summary.json"))?;
    let plots = draw_run_plots(&dir, &records, &protocol.strategies)?;
    let png_plots: Vec<(String, &str)> = plots
        .iter()
        .filter(|(path, _)| path.extension().is_some_and(|e| e == "png"))
        .filter_map(|(path, caption)| Some((path.file_name()?.to_str()?.to_string(), *caption)))
        .collect();
    let plot_refs: Vec<(&str, &str)> = png_plots.iter().map(|(f, c)| (f.as_str(), *c)).collect();
    summary.write_report(&dir.join("report.md"), &records, &plot_refs)?;

    if outcome.interrupted {
        println!(
            "Interrupted: {} of {planned} turns measured.",
            records.len()
        );
    }
    println!("\nThe study's Table 1 (means over turns; median and p95 in brackets):");
    print!("{}", summary.study_table().to_text());
    println!("\nWhat the study's table leaves out:");
    print!("{}", summary.measured_table().to_text());
    if let Some(table) = Summary::reuse_table(&records) {
        println!("\nPrefix reuse, turn by turn (means over scenarios):");
        print!("{}", table.to_text());
    }
    if !summary.disagreements.is_empty() {
        println!(
            "\n{} turn(s) generated other ids than `{}`: see report.md.",
            summary.disagreements.len(),
            protocol.strategies[0]
        );
    }
    if summary.turns_failed > 0 {
        println!(
            "\n{} turn(s) failed: see the error column of turns.csv.",
            summary.turns_failed
        );
    }
    println!(
        "\nWrote {}: turns.csv, generations.jsonl, summary.json, report.md and {} plot files.",
        dir.display(),
        plots.len()
    );
    Ok(())
}

/// The progress bar over scenario x strategy x turn, and the per-turn files.
struct Progress {
    bar: ProgressBar,
    files: TurnFiles,
    /// Strategy and turn in progress, and its scenario.
    label: String,
    scenario: String,
    turn_started: Instant,
    tokens: usize,
}

impl Progress {
    fn new(turns: u64, files: TurnFiles) -> Progress {
        let bar = ProgressBar::new(turns);
        bar.set_style(
            ProgressStyle::with_template(
                "{elapsed_precise} [{bar:24}] {pos}/{len} turns | {wide_msg}",
            )
            .expect("the template is valid")
            .progress_chars("=> "),
        );
        Progress {
            bar,
            files,
            label: String::new(),
            scenario: String::new(),
            turn_started: Instant::now(),
            tokens: 0,
        }
    }
}

impl Observer for Progress {
    fn warmup_started(&mut self, strategy: Strategy) {
        self.bar
            .set_message(format!("{strategy} warm-up, not measured"));
    }

    fn turn_started(&mut self, scenario: &Scenario, strategy: Strategy, turn: usize) {
        self.label = format!("{strategy} turn {turn}");
        self.scenario = scenario.name.clone();
        self.turn_started = Instant::now();
        self.tokens = 0;
        self.bar
            .set_message(format!("{}: prefill | {}", self.label, self.scenario));
    }

    fn token_generated(&mut self) {
        self.tokens += 1;
        let rate = self.tokens as f64 / self.turn_started.elapsed().as_secs_f64();
        self.bar.set_message(format!(
            "{}: {} tokens, {rate:.1} tok/s | {}",
            self.label, self.tokens, self.scenario
        ));
    }

    fn turn_finished(&mut self, result: &TurnResult) -> Result<()> {
        self.files.append(result)?;
        let r = &result.record;
        if !r.success {
            self.bar.println(format!(
                "{} {} turn {} failed: {}",
                r.scenario, r.strategy, r.turn, r.error
            ));
        } else if r.agrees_with_first_strategy == Some(false) {
            self.bar.println(format!(
                "{} {} turn {}: other ids than the first strategy's",
                r.scenario, r.strategy, r.turn
            ));
        }
        self.bar.inc(1);
        Ok(())
    }
}
