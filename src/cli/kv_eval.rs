use super::ModelArgs;
use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use kvlab::eval::report::{EvalRunInfo, EvalSummary, TurnsCsv};
use kvlab::eval::{
    planned_turns, run_eval, EvalConfig, EvalObserver, EvalOptions, PolicyShape, TurnEval,
};
use kvlab::kv::{EvictionPolicy, KvDtype, KvLayout, LayoutKind};
use kvlab::scenario::plots::draw_quality_vs_bytes;
use kvlab::scenario::scenarios;
use std::path::PathBuf;

/// The default on a CPU without --full: the study's five conversations, 3 turns of 32 tokens.
const CPU_SUBSET_TURNS: usize = 3;
const CPU_SUBSET_NEW_TOKENS: usize = 32;
/// Token budgets of the policies: about a fifth and two fifths of the subset's last turn
/// (300-400 positions), and of a full conversation's middle turns.
const CPU_SUBSET_BUDGETS: [usize; 2] = [64, 128];
const FULL_BUDGETS: [usize; 2] = [256, 512];
/// The study's generation length.
const STUDY_NEW_TOKENS: usize = 150;

#[derive(Args, Debug)]
pub struct KvEvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Comma-separated study scenario names, `all`, or scenario files. Default: all five.
    #[arg(long, value_delimiter = ',')]
    pub scenarios: Option<Vec<String>>,
    /// Element types run with the full cache.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = KvDtype::ALL)]
    pub dtypes: Vec<KvDtype>,
    /// Eviction policies, each at every --budgets: window:B, sinks:4,window:B-4,
    /// h2o:heavy=B/2,recent=B-B/2.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [PolicyShape::Window, PolicyShape::Sinks, PolicyShape::H2o])]
    pub policies: Vec<PolicyShape>,
    /// Token budgets of the policies [default: 64,128 (CPU subset); 256,512 (--full)].
    #[arg(long, value_delimiter = ',')]
    pub budgets: Option<Vec<usize>>,
    /// Element types the policies run with.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [KvDtype::F32])]
    pub policy_dtypes: Vec<KvDtype>,
    /// Explicit configurations DTYPE/POLICY (repeat the option), e.g. --config int8/full
    /// --config 'f32/sinks:4,window:60'; replaces the grid of the options above.
    #[arg(long = "config")]
    pub configs: Vec<String>,
    /// The first N turns of each conversation [default: 3 on a CPU, else all 15].
    #[arg(long)]
    pub turns: Option<usize>,
    /// Tokens generated per turn [default: 32 on a CPU, else the study's 150].
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// On a CPU, run all 15 turns of 150 tokens (hours).
    #[arg(long)]
    pub full: bool,
    /// Positions per chunk of the kept cache (small, so that reserved bytes follow live ones).
    #[arg(long, default_value_t = 16)]
    pub chunk_tokens: usize,
    /// Results folder (default: results/kv-eval-<date>-<time>).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(args: KvEvalArgs) -> Result<()> {
    if args.model.kv_dtype.is_some()
        || args.model.kv_budget.is_some()
        || args.model.kv_policy != EvictionPolicy::Full
    {
        bail!(
            "kv-eval sets the KV options of each configuration itself: give them with --dtypes, \
             --policies, --budgets, --policy-dtypes or --config, not --kv-dtype, --kv-budget or \
             --kv-policy"
        );
    }
    let mut loaded = args.model.load()?;
    let tokenizer = loaded.tokenizer.take().with_context(|| {
        format!(
            "{} has no tokenizer: the conversations are text",
            loaded.path.display()
        )
    })?;
    let backend = loaded.generator.backend_info();
    // A backend that cannot hold the reference is refused before anything runs.
    loaded
        .generator
        .set_kv_options(EvalConfig::REFERENCE.kv_options())
        .context("kv-eval compares every configuration with the f32 full cache")?;
    let subset = backend.name != "cuda" && !args.full;
    let scenario_items = args.scenarios.clone().unwrap_or_else(|| vec!["all".into()]);
    let scenarios = scenarios::select(&scenario_items)?;
    let turns = args.turns.or(subset.then_some(CPU_SUBSET_TURNS));
    let max_new_tokens = args.max_new_tokens.unwrap_or(if subset {
        CPU_SUBSET_NEW_TOKENS
    } else {
        STUDY_NEW_TOKENS
    });
    if turns == Some(0) || max_new_tokens == 0 {
        bail!("--turns and --max-new-tokens must be at least 1");
    }
    let budgets = args.budgets.clone().unwrap_or_else(|| {
        if subset {
            CPU_SUBSET_BUDGETS.to_vec()
        } else {
            FULL_BUDGETS.to_vec()
        }
    });
    let configs = if args.configs.is_empty() {
        EvalConfig::grid(&args.dtypes, &args.policy_dtypes, &args.policies, &budgets)?
    } else {
        args.configs
            .iter()
            .map(|c| c.parse())
            .collect::<Result<Vec<EvalConfig>>>()?
    };
    let cfg = loaded.generator.config().clone();
    let bytes_per_token = |config: &EvalConfig| {
        KvLayout::new(
            LayoutKind::Chunked,
            config.dtype,
            cfg.num_layers,
            cfg.num_kv_heads,
            cfg.head_dim,
            args.chunk_tokens,
        )
        .map(|layout| layout.bytes_per_token())
    };
    for config in &configs {
        bytes_per_token(config)?;
    }
    let opts = EvalOptions {
        turns,
        max_new_tokens,
        chunk_tokens: args.chunk_tokens,
        date_string: Some(chrono::Local::now().format("%d %b %Y").to_string()),
    };
    let description = if subset && args.turns.is_none() && args.max_new_tokens.is_none() {
        format!(
            "The CPU default subset: turns 1-{CPU_SUBSET_TURNS} of each conversation, \
             {CPU_SUBSET_NEW_TOKENS} new tokens, budgets {budgets:?}; --full runs all 15 turns of \
             {STUDY_NEW_TOKENS} tokens (hours on a CPU)."
        )
    } else {
        format!(
            "{} turn(s) of each conversation, {max_new_tokens} new tokens.",
            turns.map_or("All".to_string(), |t| t.to_string())
        )
    };
    let run_info = EvalRunInfo {
        model: loaded.label.clone(),
        weights_dtype: loaded.weights_dtype.clone(),
        backend,
        subset: description.clone(),
        scenarios: scenarios.iter().map(|s| s.name.clone()).collect(),
        options: opts.clone(),
    };
    let dir = super::results_dir(args.out.as_deref(), "kv-eval")?;
    let planned = planned_turns(&scenarios, &configs, &opts);
    println!(
        "model {} | backend {} on {}",
        run_info.model, run_info.backend.name, run_info.backend.device
    );
    println!("{description}");
    println!(
        "{} configurations against the f32 full cache: {}",
        configs.len(),
        configs
            .iter()
            .map(EvalConfig::label)
            .collect::<Vec<_>>()
            .join("  ")
    );
    println!(
        "Results go to {} (Ctrl-C stops after the current pass and still writes them).",
        dir.display()
    );
    let stop = super::stop_on_ctrl_c("the current pass")?;

    let started_at = chrono::Local::now().to_rfc3339();
    let mut progress = Progress::new(planned as u64, TurnsCsv::create(&dir)?);
    let outcome = run_eval(
        loaded.generator.as_mut(),
        &tokenizer,
        &scenarios,
        &configs,
        &opts,
        stop,
        &mut progress,
    );
    progress.bar.finish_and_clear();
    // A pass that failed ends the run, but what was measured is still written.
    let (turns, interrupted, failure) = match outcome {
        Ok(outcome) => (outcome.turns, outcome.interrupted, None),
        Err(e) => (progress.turns.clone(), true, Some(e)),
    };
    let summary = EvalSummary::new(
        run_info,
        &configs,
        &turns,
        |config| bytes_per_token(config).unwrap_or(0),
        planned,
        started_at,
        interrupted,
    );
    summary.write_json(&dir.join("summary.json"))?;
    let plots = if summary.configs.is_empty() {
        Vec::new()
    } else {
        draw_quality_vs_bytes(&summary, &dir.join("quality_vs_bytes"))?.to_vec()
    };
    let caption = "Quality against KV bytes: mean KL divergence and top-1 agreement \
                   (teacher-forced) against the live KV bytes of each configuration";
    let png: Vec<(&str, &str)> = plots
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .filter_map(|p| Some((p.file_name()?.to_str()?, caption)))
        .collect();
    summary.write_report(&dir.join("report.md"), &png)?;
    print!("\n{}", summary.table().to_text());
    println!();
    for line in summary.targets() {
        println!("{line}");
    }
    println!(
        "\nWrote {}: turns.csv, summary.json, report.md, quality_vs_bytes.png/.svg.",
        dir.display()
    );
    match failure {
        Some(e) => Err(e.context(format!(
            "the evaluation stopped after {} turn records",
            turns.len()
        ))),
        None => Ok(()),
    }
}

/// The progress bar over turn records, and `turns.csv`.
struct Progress {
    bar: ProgressBar,
    csv: TurnsCsv,
    pass: String,
    tokens: usize,
    /// Every turn finished so far, for the summary of a run that fails.
    turns: Vec<TurnEval>,
}

impl Progress {
    fn new(turns: u64, csv: TurnsCsv) -> Progress {
        let bar = ProgressBar::new(turns);
        bar.set_style(
            ProgressStyle::with_template(
                "{elapsed_precise} [{bar:24}] {pos}/{len} turn records (eta {eta}) | {wide_msg}",
            )
            .expect("the template is valid")
            .progress_chars("=> "),
        );
        Progress {
            bar,
            csv,
            pass: String::new(),
            tokens: 0,
            turns: Vec::new(),
        }
    }
}

impl EvalObserver for Progress {
    fn pass_started(&mut self, what: &str) {
        self.pass = what.to_string();
        self.tokens = 0;
        self.bar.set_message(self.pass.clone());
    }

    fn token(&mut self) {
        self.tokens += 1;
        if self.tokens.is_multiple_of(8) {
            self.bar
                .set_message(format!("{} ({} tokens)", self.pass, self.tokens));
        }
    }

    fn turn_finished(&mut self, turn: &TurnEval) -> Result<()> {
        self.csv.append(turn)?;
        self.turns.push(turn.clone());
        self.bar.inc(1);
        Ok(())
    }
}
