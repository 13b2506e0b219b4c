//! `kvlab kv-eval`: what a smaller cache changes in a model's output. Each configuration (KV
//! element type × eviction policy) runs the study's conversations against the f32 full cache,
//! two ways:
//!
//! - **teacher-forced**: the configuration reads exactly the reference's conversation (its
//!   prompts and its own greedy answers, fed back token by token), so that at every answer
//!   position both next-token distributions follow the same text: KL divergence, top-1
//!   agreement, the largest logit error, and the perplexity of the reference's answers.
//! - **free-running**: the configuration answers greedily and its answers enter its history, as
//!   in use; its distributions are compared with the f32 full cache's on the same text (the f32
//!   cache teacher-forced on the configuration's conversation, once it differs from the
//!   reference's), and its answers with the reference's, token by token.
//!
//! Every conversation runs in a kept cache (`dynamic+reuse`), so an eviction policy applies
//! across turns, as in a chat server whose cache holds a budget of tokens; each turn records the
//! KV bytes reserved and live when it ends and the decode rate.

pub mod compare;
pub mod report;

use crate::generate::{GenerateOptions, Generation, Generator, KvOptions};
use crate::kv::{EvictionPolicy, KvDtype, Strategy};
use crate::model::tokenizer::{ChatOptions, Message, Tokenizer};
use crate::scenario::protocol::message;
use crate::scenario::scenarios::Scenario;
use anyhow::{bail, Context, Result};
use compare::compare;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};

/// One cache configuration: the element type of K and V and what the cache keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct EvalConfig {
    pub dtype: KvDtype,
    pub policy: EvictionPolicy,
}

impl EvalConfig {
    /// The reference every configuration is compared with.
    pub const REFERENCE: EvalConfig = EvalConfig {
        dtype: KvDtype::F32,
        policy: EvictionPolicy::Full,
    };

    /// `dtype/policy`, the form `--config` takes.
    pub fn label(&self) -> String {
        format!("{}/{}", self.dtype, self.policy)
    }

    /// The options that make a generator's cache this configuration.
    pub fn kv_options(&self) -> KvOptions {
        KvOptions {
            dtype: Some(self.dtype),
            budget_bytes: None,
            policy: self.policy,
        }
    }

    /// The grid: every `dtypes` with the full cache, then each of `policy_dtypes` under every
    /// policy shape and token budget (`sinks` = 4 sinks and a window of the rest, as
    /// StreamingLLM; `h2o` = half heavy hitters, half recent, as H2O), without repeats.
    pub fn grid(
        dtypes: &[KvDtype],
        policy_dtypes: &[KvDtype],
        policies: &[PolicyShape],
        budgets: &[usize],
    ) -> Result<Vec<EvalConfig>> {
        let mut configs: Vec<EvalConfig> = dtypes
            .iter()
            .map(|&dtype| EvalConfig {
                dtype,
                policy: EvictionPolicy::Full,
            })
            .collect();
        for &dtype in policy_dtypes {
            for &shape in policies {
                for &budget in budgets {
                    let config = EvalConfig {
                        dtype,
                        policy: shape.with_budget(budget)?,
                    };
                    if !configs.contains(&config) {
                        configs.push(config);
                    }
                }
            }
        }
        Ok(configs)
    }
}

impl std::str::FromStr for EvalConfig {
    type Err = anyhow::Error;

    /// `DTYPE/POLICY`, e.g. `int8/full` or `f32/sinks:4,window:60`.
    fn from_str(s: &str) -> Result<Self> {
        let (dtype, policy) = s.split_once('/').with_context(|| {
            format!("--config {s:?}: expected DTYPE/POLICY, e.g. int8/full or f32/window:128")
        })?;
        Ok(EvalConfig {
            dtype: dtype.parse().with_context(|| format!("--config {s:?}"))?,
            policy: policy.parse().with_context(|| format!("--config {s:?}"))?,
        })
    }
}

/// A policy without its budget, for the grid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PolicyShape {
    /// `window:B`
    Window,
    /// `sinks:4,window:B-4`
    Sinks,
    /// `h2o:heavy=B/2,recent=B-B/2`
    H2o,
}

/// StreamingLLM's attention sinks.
const SINKS: usize = 4;

impl PolicyShape {
    pub fn with_budget(self, budget: usize) -> Result<EvictionPolicy> {
        let policy = match self {
            PolicyShape::Window => EvictionPolicy::Window { window: budget },
            PolicyShape::Sinks if budget > SINKS => EvictionPolicy::Sinks {
                sinks: SINKS,
                window: budget - SINKS,
            },
            PolicyShape::Sinks => bail!(
                "--budgets {budget} is smaller than the sinks plus a window: the sinks policy \
                 keeps {SINKS} sinks and a window of at least 1 ({} tokens)",
                SINKS + 1
            ),
            PolicyShape::H2o if budget >= 2 => EvictionPolicy::H2o {
                heavy: budget / 2,
                recent: budget - budget / 2,
            },
            PolicyShape::H2o => bail!(
                "--budgets {budget}: h2o keeps half heavy hitters and half recent tokens, at \
                 least 1 of each (2 tokens)"
            ),
        };
        if budget == 0 {
            bail!("--budgets 0 keeps no token");
        }
        Ok(policy)
    }
}

/// How the conversations run.
#[derive(Clone, Debug, Serialize)]
pub struct EvalOptions {
    /// The first N turns of each conversation (None: all).
    pub turns: Option<usize>,
    pub max_new_tokens: usize,
    /// Positions per chunk of the kept cache.
    pub chunk_tokens: usize,
    /// The date the chat template sees, fixed for the run.
    pub date_string: Option<String>,
}

/// The two ways a configuration reads a conversation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    TeacherForced,
    FreeRunning,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::TeacherForced => "teacher-forced",
            Mode::FreeRunning => "free-running",
        }
    }
}

/// One turn of one configuration in one mode: sums over its answer's steps (means are taken
/// over every step of a summary), its cache and its speed.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TurnEval {
    pub config: String,
    pub dtype: String,
    pub policy: String,
    pub mode: String,
    pub scenario: String,
    pub turn: usize,
    pub prompt_tokens: usize,
    /// Answer positions compared.
    pub steps: usize,
    pub kl_sum: f64,
    pub kl_max: f64,
    /// Steps whose argmax equals the reference's.
    pub top1_agreements: usize,
    /// Of the other steps, the largest margin between the reference's two best logits (0 when
    /// every step agreed): a flip at a small margin is a near-tie.
    pub largest_flip_margin: f64,
    pub max_logit_error: f64,
    /// Σ −log p(next token) under the configuration and under the f32 full cache.
    pub nll_sum: f64,
    pub reference_nll_sum: f64,
    /// Leading tokens of the answer equal to the reference's answer (free-running).
    pub answer_tokens_matching_reference: usize,
    pub answer_tokens: usize,
    /// The configuration's sequence when the turn ended.
    pub kv_reserved_bytes: u64,
    pub kv_live_bytes: u64,
    pub kv_tokens: u64,
    pub evicted_tokens: u64,
    pub decode_tokens_per_second: f64,
}

/// Hooks for progress display and incremental output; every method has a do-nothing default.
pub trait EvalObserver {
    /// A pass over one conversation begins: `what` says which.
    fn pass_started(&mut self, _what: &str) {}
    fn token(&mut self) {}
    /// An error here stops the run (the results file cannot be written).
    fn turn_finished(&mut self, _turn: &TurnEval) -> Result<()> {
        Ok(())
    }
}

/// What a run measured.
#[derive(Clone, Debug, Default)]
pub struct EvalOutcome {
    pub turns: Vec<TurnEval>,
    /// `stop` was raised before every pass had run.
    pub interrupted: bool,
}

/// The turn records a full run makes: every turn of every scenario, per configuration and mode.
pub fn planned_turns(scenarios: &[Scenario], configs: &[EvalConfig], opts: &EvalOptions) -> usize {
    let turns: usize = scenarios
        .iter()
        .map(|s| opts.turns.map_or(s.turns.len(), |t| t.min(s.turns.len())))
        .sum();
    turns * configs.len() * 2
}

/// One turn as a pass produced it: the prompt, the answer's ids and the logits that chose each.
struct TurnRun {
    prompt: Vec<u32>,
    ids: Vec<u32>,
    logits: Vec<Vec<f32>>,
    generation: Generation,
}

/// A conversation: the templated prompt of each turn follows from the answers before it.
struct Conversation<'a> {
    tokenizer: &'a Tokenizer,
    chat: ChatOptions,
    messages: Vec<Message>,
}

impl<'a> Conversation<'a> {
    fn new(tokenizer: &'a Tokenizer, scenario: &Scenario, date: Option<String>) -> Self {
        Conversation {
            tokenizer,
            chat: ChatOptions {
                add_generation_prompt: true,
                date_string: date,
            },
            messages: vec![message("system", &scenario.system_prompt)],
        }
    }

    /// The prompt of the next turn: the history with `user` appended, templated.
    fn ask(&mut self, user: &str) -> Result<Vec<u32>> {
        self.messages.push(message("user", user));
        self.tokenizer
            .encode_messages(&self.messages, &self.chat)
            .context("templating the conversation")
    }

    /// The answer joins the history as its decoded text, as the study does.
    fn answer(&mut self, ids: &[u32]) {
        let text = self.tokenizer.decode(ids, true);
        self.messages.push(message("assistant", &text));
    }
}

/// Runs one conversation with the generator's current KV options, in a kept cache: greedily, or
/// fed `forced` (each turn's ids) when given.
fn run_conversation(
    generator: &mut dyn Generator,
    tokenizer: &Tokenizer,
    scenario: &Scenario,
    opts: &EvalOptions,
    forced: Option<&[Vec<u32>]>,
    observer: &mut dyn EvalObserver,
) -> Result<Vec<TurnRun>> {
    const CONVERSATION: u64 = 1;
    generator.clear_kv_cache()?;
    let turns = opts
        .turns
        .map_or(scenario.turns.len(), |t| t.min(scenario.turns.len()));
    let mut conversation = Conversation::new(tokenizer, scenario, opts.date_string.clone());
    let mut runs = Vec::with_capacity(turns);
    for (turn, user) in scenario.turns.iter().take(turns).enumerate() {
        let prompt = conversation.ask(user)?;
        let feed = forced.map(|f| f[turn].clone());
        let gen_opts = GenerateOptions {
            max_new_tokens: feed.as_ref().map_or(opts.max_new_tokens, Vec::len),
            strategy: Strategy::DynamicReuse,
            chunk_tokens: opts.chunk_tokens,
            // A forced answer runs to its end whatever the configuration would choose.
            ignore_eos: feed.is_some(),
            keep_step_logits: true,
            feed_ids: feed.clone(),
            conversation: Some(CONVERSATION),
            ..GenerateOptions::default()
        };
        let mut generation = generator
            .generate(&prompt, &gen_opts, &mut |_| observer.token())
            .with_context(|| format!("{} turn {}", scenario.name, turn + 1))?;
        let ids = feed.unwrap_or_else(|| generation.new_ids.clone());
        conversation.answer(&ids);
        runs.push(TurnRun {
            prompt,
            ids,
            logits: std::mem::take(&mut generation.step_logits),
            generation,
        });
    }
    generator.end_conversation(CONVERSATION)?;
    Ok(runs)
}

/// The record of `run` compared step by step with `reference` (the f32 full cache's logits on
/// the same text).
fn evaluate(
    config: &EvalConfig,
    mode: Mode,
    scenario: &str,
    turn: usize,
    run: &TurnRun,
    reference: &TurnRun,
    reference_answer: &[u32],
) -> TurnEval {
    let mut eval = TurnEval {
        config: config.label(),
        dtype: config.dtype.to_string(),
        policy: config.policy.to_string(),
        mode: mode.name().into(),
        scenario: scenario.into(),
        turn,
        prompt_tokens: run.prompt.len(),
        steps: run.logits.len(),
        answer_tokens: run.ids.len(),
        answer_tokens_matching_reference: run
            .ids
            .iter()
            .zip(reference_answer)
            .take_while(|(a, b)| a == b)
            .count(),
        kv_reserved_bytes: run.generation.kv.reserved_bytes,
        kv_live_bytes: run.generation.kv.live_bytes,
        kv_tokens: run.generation.kv.tokens,
        evicted_tokens: run.generation.kv.evicted_tokens,
        decode_tokens_per_second: run.generation.decode_tokens_per_second(),
        ..TurnEval::default()
    };
    for (step, (logits, reference_logits)) in run.logits.iter().zip(&reference.logits).enumerate() {
        let c = compare(reference_logits, logits, run.ids[step]);
        eval.kl_sum += c.kl_divergence;
        eval.kl_max = eval.kl_max.max(c.kl_divergence);
        eval.top1_agreements += usize::from(c.same_top1);
        if !c.same_top1 {
            eval.largest_flip_margin = eval.largest_flip_margin.max(c.reference_margin);
        }
        eval.max_logit_error = eval.max_logit_error.max(c.max_logit_error);
        eval.nll_sum += c.candidate_nll;
        eval.reference_nll_sum += c.reference_nll;
    }
    eval
}

/// Runs every configuration over every scenario. `stop` is checked between passes: once raised,
/// the run ends after the pass in progress and returns what it measured.
pub fn run_eval(
    generator: &mut dyn Generator,
    tokenizer: &Tokenizer,
    scenarios: &[Scenario],
    configs: &[EvalConfig],
    opts: &EvalOptions,
    stop: &AtomicBool,
    observer: &mut dyn EvalObserver,
) -> Result<EvalOutcome> {
    let mut outcome = EvalOutcome::default();
    // Written as a branch, not `interrupted |= raised`: rustc 1.95 and nightly 1.97 at
    // opt-level 2 and 3 compile that form of this closure to an unconditional `true` (a
    // reduced program reproduces it), which marked every complete run interrupted.
    let stopped = |outcome: &mut EvalOutcome| {
        let raised = stop.load(Ordering::SeqCst);
        if raised {
            outcome.interrupted = true;
        }
        raised
    };
    let reference_options = EvalConfig::REFERENCE.kv_options();
    for scenario in scenarios {
        if stopped(&mut outcome) {
            break;
        }
        observer.pass_started(&format!("{}: the f32 full cache", scenario.name));
        generator.set_kv_options(reference_options)?;
        let reference = run_conversation(generator, tokenizer, scenario, opts, None, observer)?;
        let reference_ids: Vec<Vec<u32>> = reference.iter().map(|r| r.ids.clone()).collect();
        for config in configs {
            for mode in [Mode::TeacherForced, Mode::FreeRunning] {
                if stopped(&mut outcome) {
                    return Ok(outcome);
                }
                let label = format!("{}: {} {}", scenario.name, config.label(), mode.name());
                observer.pass_started(&label);
                generator.set_kv_options(config.kv_options())?;
                let forced = (mode == Mode::TeacherForced).then_some(reference_ids.as_slice());
                let runs =
                    run_conversation(generator, tokenizer, scenario, opts, forced, observer)?;
                let ids: Vec<Vec<u32>> = runs.iter().map(|r| r.ids.clone()).collect();
                // The f32 full cache on the same text: the reference itself, or, once the
                // conversation differs from it, the reference fed this conversation.
                let rerun;
                let same_text = if ids == reference_ids {
                    &reference
                } else {
                    observer.pass_started(&format!("{label}: the f32 full cache on its text"));
                    generator.set_kv_options(reference_options)?;
                    rerun = run_conversation(
                        generator,
                        tokenizer,
                        scenario,
                        opts,
                        Some(&ids),
                        observer,
                    )?;
                    &rerun
                };
                for (turn, (run, on_text)) in runs.iter().zip(same_text).enumerate() {
                    let eval = evaluate(
                        config,
                        mode,
                        &scenario.name,
                        turn + 1,
                        run,
                        on_text,
                        &reference_ids[turn],
                    );
                    observer.turn_finished(&eval)?;
                    outcome.turns.push(eval);
                }
            }
        }
    }
    Ok(outcome)
}
