use super::ModelArgs;
use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use kvlab::generate::GenerateOptions;
use kvlab::kv::Strategy;
use kvlab::model::tokenizer::{ChatOptions, Tokenizer};
use kvlab::scenario::report::CsvFile;
use kvlab::scenario::scenarios;
use kvlab::scenario::scenarios::Scenario;
use kvlab::serve::plots::draw_bench_plots;
use kvlab::serve::report::{
    BenchSummary, RunSummary, PREEMPTION_COLUMNS, REQUEST_COLUMNS, TIMELINE_COLUMNS,
};
use kvlab::serve::runner::{
    self, Load, Observer, PreemptionRecord, RequestRecord, RunOptions, TimelineSample,
};
use kvlab::serve::scheduler::{Mode, SchedulerOptions, StepReport};
use kvlab::serve::workload::{
    self, Conversation, ConversationState, CountRange, TraceConversation, TraceShape,
};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

/// Conversations of an arrival-rate run when --conversations is not given.
const RATE_CONVERSATIONS: usize = 16;

#[derive(Args, Debug)]
pub struct ServeBenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// What to replay: `scenarios` (copies of the study's), `synthetic` (a multi-turn trace in
    /// the shape of vLLM's benchmarks/multi_turn, generated from the options below), or a trace
    /// file (JSON lines; docs/serve-bench.md).
    #[arg(long, default_value = "scenarios")]
    pub workload: String,
    /// Comma-separated study scenario names, `all`, or scenario files, that the copies are
    /// drawn from [default: all five].
    #[arg(long, value_delimiter = ',')]
    pub scenarios: Option<Vec<String>>,
    /// Conversations replayed in each run [default: as many as the run's --concurrency; with
    /// --arrival-rate, 16].
    #[arg(long)]
    pub conversations: Option<usize>,
    /// Turns per conversation: N, or a range A-B drawn per conversation (scenarios: their first
    /// turns; vLLM's synthetic shape: 12-18).
    #[arg(long, default_value = "2")]
    pub turns: CountRange,
    /// Tokens generated per turn of a scenario copy (a trace gives its own answer lengths).
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    /// Synthetic trace: tokens of the prefix every conversation starts with (vLLM: 500).
    #[arg(long, default_value_t = 500)]
    pub shared_prefix_tokens: usize,
    /// Synthetic trace: mean tokens of each conversation's own prefix, lognormal, at most 5x
    /// (vLLM: 1000); 0 for none.
    #[arg(long, default_value_t = 1000)]
    pub conversation_prefix_tokens: usize,
    /// Synthetic trace: tokens per user message (vLLM: 120-160).
    #[arg(long, default_value = "120-160")]
    pub user_tokens: CountRange,
    /// Synthetic trace: tokens per answer (vLLM: 80-120).
    #[arg(long, default_value = "80-120")]
    pub answer_tokens: CountRange,
    /// Clients, each running one conversation at a time (closed loop); a list runs a sweep,
    /// e.g. 1,2,4,8,16,32 [default: 8].
    #[arg(long, value_delimiter = ',')]
    pub concurrency: Option<Vec<usize>>,
    /// Conversations started per second, Poisson (open loop), instead of --concurrency; a list
    /// runs a sweep.
    #[arg(long, value_delimiter = ',', conflicts_with = "concurrency")]
    pub arrival_rate: Option<Vec<f64>>,
    /// How the KV pool gives sequences memory; both run one after the other by default.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Mode::Paged, Mode::Static])]
    pub mode: Vec<Mode>,
    /// Positions per chunk of the paged pool.
    #[arg(long, default_value_t = 16)]
    pub chunk_tokens: usize,
    /// Rows (tokens) per forward step: decode rows and prefill chunks together.
    #[arg(long, default_value_t = 256)]
    pub max_batch_tokens: usize,
    /// The longest a request may be, and the run each static sequence reserves [default: the
    /// model's positions; a static run holds its prompt + max new tokens].
    #[arg(long)]
    pub max_context: Option<usize>,
    /// Conversations keep their sequence between turns; the paged pool shares cached chunks.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value_t = false)]
    pub prefix_reuse: bool,
    /// Seed of the workload: which scenario each copy is, the synthetic trace and its ids, the
    /// Poisson arrivals.
    #[arg(long, default_value_t = 0)]
    pub workload_seed: u64,
    /// Generate all tokens even past a stop token [default: true for synthetic weights].
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub ignore_eos: Option<bool>,
    /// Restrict greedy choices (and a trace's ids) to ordinary-text ids [default: true for
    /// synthetic weights].
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub ordinary_text_only: Option<bool>,
    /// Results folder (default: results/serve-bench-<date>-<time>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Skip the warm-up generation before the runs.
    #[arg(long)]
    pub no_warmup: bool,
}

/// Where the conversations come from, checked before any run.
enum Source {
    Scenarios(Vec<Scenario>),
    Synthetic(TraceShape),
    /// A trace file: its conversations, and its path.
    File(Vec<TraceConversation>, PathBuf),
}

impl Source {
    fn of(args: &ServeBenchArgs, tokenizer: Option<&Tokenizer>) -> Result<Source> {
        Ok(match args.workload.as_str() {
            "scenarios" => {
                ensure!(
                    tokenizer.is_some(),
                    "the scenario workload is text: the model needs a tokenizer (or use \
                     --workload synthetic)"
                );
                let items = args.scenarios.clone().unwrap_or_else(|| vec!["all".into()]);
                Source::Scenarios(scenarios::select(&items)?)
            }
            "synthetic" => Source::Synthetic(TraceShape {
                conversations: 0,
                turns: args.turns,
                shared_prefix_tokens: args.shared_prefix_tokens,
                prefix_tokens_mean: args.conversation_prefix_tokens,
                user_tokens: args.user_tokens,
                answer_tokens: args.answer_tokens,
            }),
            file => {
                let path = PathBuf::from(file);
                Source::File(workload::read_trace(&path)?, path)
            }
        })
    }

    /// The trace gives arrival times.
    fn timed(&self) -> bool {
        matches!(self, Source::File(trace, _) if trace[0].arrival_seconds.is_some())
    }

    fn describe(&self, args: &ServeBenchArgs) -> String {
        let seed = args.workload_seed;
        match self {
            Source::Scenarios(chosen) => {
                format!(
                "copies of the study's scenarios ({}), seed {seed}, turns {}, {} new tokens a turn",
                chosen.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", "),
                args.turns,
                args.max_new_tokens
            )
            }
            Source::Synthetic(shape) => format!(
                "a synthetic multi-turn trace in the shape of vLLM's benchmarks/multi_turn: \
                 shared prefix {} tokens, conversation prefix lognormal of mean {}, turns {}, \
                 user {} tokens, answers {} tokens, seed {seed} (trace-N.jsonl: the trace of N \
                 conversations)",
                shape.shared_prefix_tokens,
                shape.prefix_tokens_mean,
                shape.turns,
                shape.user_tokens,
                shape.answer_tokens
            ),
            Source::File(_, path) => {
                format!("the trace {}, ids drawn with seed {seed}", path.display())
            }
        }
    }

    /// `count` conversations (a trace file: all of its own); a generated trace is written to
    /// `dir`.
    fn conversations(
        &self,
        args: &ServeBenchArgs,
        count: usize,
        trace_ids: &[u32],
        dir: &Path,
    ) -> Result<Vec<Conversation>> {
        let seed = args.workload_seed;
        match self {
            Source::Scenarios(chosen) => {
                workload::scenario_copies(chosen, count, args.turns, args.max_new_tokens, seed)
            }
            Source::Synthetic(shape) => {
                let shape = TraceShape {
                    conversations: count,
                    ..shape.clone()
                };
                let trace = workload::synthetic_trace(&shape, seed)?;
                let path = dir.join(format!("trace-{count}.jsonl"));
                std::fs::write(&path, workload::trace_to_jsonl(&trace))
                    .with_context(|| format!("cannot write {}", path.display()))?;
                workload::trace_conversations(&trace, trace_ids, seed)
            }
            Source::File(trace, _) => workload::trace_conversations(trace, trace_ids, seed),
        }
    }
}

/// The loads to run, in order.
fn loads(args: &ServeBenchArgs, timed: bool) -> Result<Vec<Load>> {
    if timed {
        ensure!(
            args.concurrency.is_none() && args.arrival_rate.is_none(),
            "the trace gives arrival times: --concurrency and --arrival-rate do not apply"
        );
        return Ok(vec![Load::TraceTimes]);
    }
    if let Some(rates) = &args.arrival_rate {
        if let Some(bad) = rates.iter().find(|r| !(r.is_finite() && **r > 0.0)) {
            bail!("--arrival-rate {bad}: a rate is a positive number of conversations per second");
        }
        return Ok(rates.iter().map(|&r| Load::ArrivalRate(r)).collect());
    }
    let levels = args.concurrency.clone().unwrap_or_else(|| vec![8]);
    ensure!(
        levels.iter().all(|&c| c > 0),
        "--concurrency takes at least one client"
    );
    Ok(levels.into_iter().map(Load::Concurrency).collect())
}

pub fn run(args: ServeBenchArgs) -> Result<()> {
    ensure!(
        args.max_new_tokens > 0,
        "--max-new-tokens must be at least 1"
    );
    if let Some(twice) = args
        .mode
        .iter()
        .enumerate()
        .find_map(|(i, m)| args.mode[..i].contains(m).then_some(m))
    {
        bail!("--mode names {twice} twice");
    }
    ensure!(
        args.model.kv_policy == kvlab::kv::EvictionPolicy::Full,
        "--kv-policy {}: serve-bench keeps every position (the scheduler counts on a sequence's \
         reserved chunks); kvlab kv-eval and kvlab scenario take eviction policies",
        args.model.kv_policy
    );
    let mut loaded = args.model.load()?;
    let tokenizer = loaded.tokenizer.take();
    let engine = loaded.engine_info(loaded.generator.backend_info());
    let synthetic = loaded.synthetic;
    let generator = loaded.generator.as_mut();
    let ignore_eos = args.ignore_eos.unwrap_or(synthetic);
    let ordinary_text_only = args.ordinary_text_only.unwrap_or(synthetic) && tokenizer.is_some();
    let config = generator.config().clone();
    // The ids a trace's tokens are drawn from.
    let trace_ids: Vec<u32> = match (&tokenizer, ordinary_text_only) {
        (Some(t), true) => {
            let mask = t.ordinary_text_mask();
            generator.set_allowed_tokens(Some(&mask))?;
            (0..mask.len().min(config.vocab_size) as u32)
                .filter(|&id| mask[id as usize])
                .collect()
        }
        _ => (0..config.vocab_size as u32)
            .filter(|id| !config.stop_token_ids.contains(id))
            .collect(),
    };
    // A bad trace file or scenario name fails here, before any run.
    let source = Source::of(&args, tokenizer.as_ref())?;
    let loads = loads(&args, source.timed())?;
    let dir = super::results_dir(args.out.as_deref(), "serve-bench")?;
    if let Source::File(_, path) = &source {
        std::fs::copy(path, dir.join("trace.jsonl"))
            .with_context(|| format!("copying {} into {}", path.display(), dir.display()))?;
    }
    let count_for = |load: &Load| match (args.conversations, load) {
        (Some(n), _) => n,
        (None, Load::Concurrency(c)) => *c,
        (None, _) => RATE_CONVERSATIONS,
    };
    // One set of conversations per count (a sweep without --conversations has several).
    let mut workloads: Vec<(usize, Vec<Conversation>)> = Vec::new();
    for load in &loads {
        let count = count_for(load);
        if !workloads.iter().any(|(n, _)| *n == count) {
            workloads.push((count, source.conversations(&args, count, &trace_ids, &dir)?));
        }
    }
    let conversations_of = |load: &Load| -> &[Conversation] {
        let count = count_for(load);
        &workloads
            .iter()
            .find(|(n, _)| *n == count)
            .expect("built above")
            .1
    };
    let description = source.describe(&args);
    let chat = ChatOptions {
        add_generation_prompt: true,
        date_string: Some(chrono::Local::now().format("%d %b %Y").to_string()),
    };
    let scheduler = |mode: Mode| SchedulerOptions {
        mode,
        prefix_reuse: args.prefix_reuse,
        max_batch_tokens: args.max_batch_tokens,
        max_context: args.max_context,
        model_positions: config.max_position_embeddings,
        stop_ids: if ignore_eos {
            Vec::new()
        } else {
            config.stop_token_ids.clone()
        },
        keep_logits: false,
    };
    let runs: Vec<RunOptions> = args
        .mode
        .iter()
        .flat_map(|&mode| loads.iter().map(move |&load| (mode, load)))
        .map(|(mode, load)| RunOptions {
            scheduler: scheduler(mode),
            chunk_tokens: args.chunk_tokens,
            load,
            seed: args.workload_seed,
        })
        .collect();
    println!("{}", engine.headline());
    println!("Workload: {description}.");
    println!(
        "Runs: {} mode(s) x {} load(s): {}; max batch tokens {}, prefix reuse {}, paged chunks of {} positions.",
        args.mode.len(),
        loads.len(),
        runs.iter()
            .map(|r| format!("{} at {}", r.scheduler.mode, r.load))
            .collect::<Vec<_>>()
            .join(", "),
        args.max_batch_tokens,
        if args.prefix_reuse { "on" } else { "off" },
        args.chunk_tokens
    );
    println!(
        "Results go to {} (Ctrl-C stops after the current step and still writes them).",
        dir.display()
    );
    let stop = super::stop_on_ctrl_c("the current step")?;

    if !args.no_warmup {
        if let Some(first) = workloads.first().and_then(|(_, w)| w.first()) {
            let (prompt, _) =
                ConversationState::new(first).next_prompt(first, tokenizer.as_ref(), &chat)?;
            let warmup = GenerateOptions {
                max_new_tokens: 2,
                strategy: Strategy::Dynamic,
                chunk_tokens: args.chunk_tokens,
                ignore_eos: true,
                ..GenerateOptions::default()
            };
            // A warm-up that fails fails the same way in the runs, which record the error.
            let _ = generator.generate(&prompt, &warmup, &mut |_| {});
            generator.clear_kv_cache()?;
        }
    }

    let planned: usize = runs
        .iter()
        .map(|r| {
            conversations_of(&r.load)
                .iter()
                .map(Conversation::turns)
                .sum::<usize>()
        })
        .sum();
    let started_at = chrono::Local::now().to_rfc3339();
    let mut progress = Progress::new(planned as u64, &dir)?;
    let mut summaries = Vec::new();
    let mut timeline = Vec::new();
    let mut preemptions = Vec::new();
    let mut interrupted = false;
    for opts in &runs {
        if stop.load(Ordering::SeqCst) {
            interrupted = true;
            break;
        }
        progress.run = format!("{} at {}", opts.scheduler.mode, opts.load);
        let outcome = runner::run(
            generator,
            tokenizer.as_ref(),
            &chat,
            conversations_of(&opts.load),
            opts,
            stop,
            &mut progress,
        )?;
        interrupted |= outcome.interrupted;
        summaries.push(RunSummary::of(opts, &outcome));
        timeline.extend(outcome.timeline);
        preemptions.extend(outcome.preemptions);
    }
    progress.bar.finish_and_clear();

    let summary = BenchSummary {
        kvlab_version: env!("CARGO_PKG_VERSION").to_string(),
        started_at,
        finished_at: chrono::Local::now().to_rfc3339(),
        interrupted,
        engine,
        workload: description,
        conversations: workloads.iter().map(|(_, w)| w.len()).max().unwrap_or(0),
        options: runs.first().cloned(),
        runs: summaries,
        preemptions,
    };
    summary.write_json(&dir.join("summary.json"))?;
    let plots = draw_bench_plots(&dir, &summary.runs, &timeline)?;
    let png_plots: Vec<(String, &str)> = plots
        .iter()
        .filter(|(path, _)| path.extension().is_some_and(|e| e == "png"))
        .filter_map(|(path, caption)| Some((path.file_name()?.to_str()?.to_string(), *caption)))
        .collect();
    let plot_refs: Vec<(&str, &str)> = png_plots.iter().map(|(f, c)| (f.as_str(), *c)).collect();
    summary.write_report(&dir.join("report.md"), &plot_refs)?;

    if interrupted {
        println!("Interrupted: the results hold what ran before Ctrl-C.");
    }
    println!("\nThroughput and latency:");
    print!("{}", summary.speed_table().to_text());
    println!("\nKV memory (sequences at once, waste = (reserved - live) / reserved):");
    print!("{}", summary.memory_table().to_text());
    for (load, ratio) in summary.fit_ratios() {
        println!("At {load}, the paged pool held {ratio:.2}x the sequences of static reservation at once.");
    }
    let failed: usize = summary.runs.iter().map(|r| r.requests_failed).sum();
    if failed > 0 {
        println!("\n{failed} request(s) failed: see the error column of requests.csv.");
    }
    println!(
        "\nWrote {}: requests.csv, timeline.csv, preemptions.csv, summary.json, report.md and {} plot files.",
        dir.display(),
        plots.len()
    );
    Ok(())
}

/// The progress bar over every run's requests, and the per-request and per-step files.
struct Progress {
    bar: ProgressBar,
    requests: CsvFile<RequestRecord>,
    timeline: CsvFile<TimelineSample>,
    preemptions: CsvFile<PreemptionRecord>,
    /// The run in progress.
    run: String,
}

impl Progress {
    fn new(requests: u64, dir: &Path) -> Result<Progress> {
        let bar = ProgressBar::new(requests);
        bar.set_style(
            ProgressStyle::with_template(
                "{elapsed_precise} [{bar:24}] {pos}/{len} requests | {wide_msg}",
            )
            .expect("the template is valid")
            .progress_chars("=> "),
        );
        Ok(Progress {
            bar,
            requests: CsvFile::create(&dir.join("requests.csv"), REQUEST_COLUMNS)?,
            timeline: CsvFile::create(&dir.join("timeline.csv"), TIMELINE_COLUMNS)?,
            preemptions: CsvFile::create(&dir.join("preemptions.csv"), PREEMPTION_COLUMNS)?,
            run: String::new(),
        })
    }
}

impl Observer for Progress {
    fn step(&mut self, sample: &TimelineSample, report: &StepReport) -> Result<()> {
        self.timeline.append(sample)?;
        self.bar.set_message(format!(
            "{}: {} running, {} waiting | step {} rows in {:.2} s | KV {:.0} of {:.0} MiB",
            self.run,
            sample.running,
            sample.waiting,
            report.rows(),
            sample.step_seconds,
            sample.reserved_bytes as f64 / kvlab::kv::MIB,
            sample.capacity_bytes as f64 / kvlab::kv::MIB,
        ));
        Ok(())
    }

    fn preempted(&mut self, p: &PreemptionRecord) -> Result<()> {
        self.preemptions.append(p)?;
        // Printed even when the bar is hidden (output not a terminal): the log says it.
        self.bar.suspend(|| {
            eprintln!(
            "{} at {}, {:.2} s: preempted request {} ({} turn {}), {} ({} positions) released: {}",
            p.mode,
            p.load,
            p.seconds,
            p.request,
            p.conversation,
            p.turn,
            p.sequence,
            p.positions_freed,
            p.reason
        )
        });
        Ok(())
    }

    fn request_finished(&mut self, record: &RequestRecord) -> Result<()> {
        self.requests.append(record)?;
        if !record.success {
            self.bar.suspend(|| {
                eprintln!(
                    "{} at {}: request {} ({} turn {}) failed: {}",
                    record.mode,
                    record.load,
                    record.request,
                    record.conversation,
                    record.turn,
                    record.error
                )
            });
        }
        self.bar.inc(1);
        Ok(())
    }
}
