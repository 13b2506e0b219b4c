//! The study's protocol, run per strategy and per scenario:
//!
//! 1. the conversation starts as `[system prompt]`;
//! 2. each turn appends the user message, re-templates the whole history (the chat template,
//!    or the study's `role: content` fallback) and generates from it: the study's strategies
//!    with a fresh cache, so that every turn re-prefills everything (no reuse across turns, as
//!    in the study); the `+reuse` strategies in the conversation's kept sequence, prefilling
//!    only what follows its common prefix with the new prompt;
//! 3. the decoded answer (special tokens skipped) is appended as the assistant message.
//!
//! Unlike the study, one short warm-up generation runs before each strategy and is left out of
//! the statistics (the first call pays for paging in the weights and sizing buffers; what it
//! leaves in the KV cache is cleared), and each turn records prefill and decode apart, the KV
//! bytes actually held and, with reuse, what of the prompt was reused. Strategies run one after
//! another over all scenarios, so that a `+reuse` strategy's pool carries what one conversation
//! cached into the next (the shared system-prompt template, for one).

use super::metrics::{process_memory, TurnRecord};
use super::scenarios::Scenario;
use crate::generate::{GenerateOptions, Generator};
use crate::kv::Strategy;
use crate::model::tokenizer::{ChatOptions, Message, Tokenizer};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// New tokens of the warm-up call: prefill and one decode step, so every code path has run once.
pub const WARMUP_NEW_TOKENS: usize = 2;

/// How the protocol runs.
#[derive(Clone, Debug, Serialize)]
pub struct ProtocolOptions {
    /// In this order; the first one is the reference of the agreement check.
    pub strategies: Vec<Strategy>,
    /// Runs only the first `turns` turns of each scenario (`None`: all of them).
    pub turns: Option<usize>,
    pub max_new_tokens: usize,
    pub ignore_eos: bool,
    pub chunk_tokens: usize,
    /// Static cache capacity; `None` = prompt + max_new_tokens per call, as transformers sizes
    /// it (`static+reuse`: [`static_reuse_capacity`] per conversation).
    pub max_context: Option<usize>,
    /// Runs a [`WARMUP_NEW_TOKENS`] generation before each strategy.
    pub warmup: bool,
    /// The date a chat template sees, fixed for the whole run so every strategy sees the same prompt.
    pub date_string: Option<String>,
}

/// One measured turn: its record and what it generated.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TurnResult {
    pub record: TurnRecord,
    pub new_ids: Vec<u32>,
    /// The decoded answer, as appended to the conversation.
    pub answer: String,
}

/// Hooks for progress display and incremental output; every method has a do-nothing default.
pub trait Observer {
    fn warmup_started(&mut self, _strategy: Strategy) {}
    fn turn_started(&mut self, _scenario: &Scenario, _strategy: Strategy, _turn: usize) {}
    fn token_generated(&mut self) {}
    /// An error here stops the run (e.g. the results file cannot be written).
    fn turn_finished(&mut self, _result: &TurnResult) -> Result<()> {
        Ok(())
    }
}

impl Observer for () {}

/// What a run measured.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub turns: Vec<TurnResult>,
    /// `stop` was raised before every turn had run.
    pub interrupted: bool,
}

/// Runs every scenario with every strategy. `stop` is checked between turns: once raised, the
/// run ends after the turn in progress and returns what it measured.
pub fn run_protocol(
    generator: &mut dyn Generator,
    tokenizer: &Tokenizer,
    scenarios: &[Scenario],
    opts: &ProtocolOptions,
    stop: &AtomicBool,
    observer: &mut dyn Observer,
) -> Result<Outcome> {
    let chat = ChatOptions {
        add_generation_prompt: true,
        date_string: opts.date_string.clone(),
    };
    // (scenario index, turn) -> the first strategy's ids, None when its turn failed.
    let mut reference_ids: HashMap<(usize, usize), Option<Vec<u32>>> = HashMap::new();
    let mut turns = Vec::new();
    let mut conversation = 0u64;
    for (strategy_index, &strategy) in opts.strategies.iter().enumerate() {
        if opts.warmup && !stop.load(Ordering::SeqCst) {
            if let Some(scenario) = scenarios.first() {
                observer.warmup_started(strategy);
                let first_turn = [
                    message("system", &scenario.system_prompt),
                    message("user", &scenario.turns[0]),
                ];
                let prompt = tokenizer.encode_messages(&first_turn, &chat)?;
                let warmup_opts = GenerateOptions {
                    max_new_tokens: WARMUP_NEW_TOKENS.min(opts.max_new_tokens),
                    ..generate_options(opts, strategy, None)
                };
                // A warm-up that fails fails the same way in turn 1, which records the error.
                let _ = generator.generate(&prompt, &warmup_opts, &mut |_| {});
                // The measured turns find nothing the warm-up cached.
                generator.clear_kv_cache()?;
            }
        }
        for (scenario_index, scenario) in scenarios.iter().enumerate() {
            let turn_count = opts
                .turns
                .map_or(scenario.turns.len(), |t| t.min(scenario.turns.len()));
            conversation += 1;
            let mut gen_opts = generate_options(opts, strategy, Some(conversation));
            if strategy == Strategy::StaticReuse && opts.max_context.is_none() {
                gen_opts.max_context = Some(static_reuse_capacity(
                    tokenizer, scenario, turn_count, opts, &chat,
                )?);
            }
            let mut messages = vec![message("system", &scenario.system_prompt)];
            for turn in 1..=turn_count {
                if stop.load(Ordering::SeqCst) {
                    generator.end_conversation(conversation)?;
                    return Ok(Outcome {
                        turns,
                        interrupted: true,
                    });
                }
                observer.turn_started(scenario, strategy, turn);
                messages.push(message("user", &scenario.turns[turn - 1]));
                let record = TurnRecord::unmeasured(&scenario.name, strategy, turn);
                let mut result = measure_turn(
                    generator, tokenizer, &messages, &chat, &gen_opts, observer, record,
                );
                if result.record.success {
                    messages.push(message("assistant", &result.answer));
                }
                let succeeded = result.record.success.then(|| result.new_ids.clone());
                result.record.agrees_with_first_strategy = if strategy_index == 0 {
                    reference_ids.insert((scenario_index, turn), succeeded);
                    result.record.success.then_some(true)
                } else {
                    match (reference_ids.get(&(scenario_index, turn)), succeeded) {
                        (Some(Some(reference)), Some(ids)) => Some(*reference == ids),
                        _ => None,
                    }
                };
                observer.turn_finished(&result)?;
                turns.push(result);
            }
            generator.end_conversation(conversation)?;
        }
    }
    Ok(Outcome {
        turns,
        interrupted: false,
    })
}

/// The generate options of `strategy`'s turns; `conversation` is kept by a `+reuse` strategy.
fn generate_options(
    opts: &ProtocolOptions,
    strategy: Strategy,
    conversation: Option<u64>,
) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: opts.max_new_tokens,
        strategy,
        max_context: opts.max_context,
        chunk_tokens: opts.chunk_tokens,
        ignore_eos: opts.ignore_eos,
        keep_step_logits: false,
        keep_prompt_logits: false,
        feed_ids: None,
        conversation: conversation.filter(|_| strategy.reuses()),
    }
}

/// The capacity a `static+reuse` conversation reserves up front when no `--max-context` is
/// given: its user turns templated with empty answers, plus twice `max_new_tokens` per turn
/// (an answer re-encodes to about as many tokens as were generated; the factor covers the
/// difference), rounded up to 256 positions.
pub fn static_reuse_capacity(
    tokenizer: &Tokenizer,
    scenario: &Scenario,
    turns: usize,
    opts: &ProtocolOptions,
    chat: &ChatOptions,
) -> Result<usize> {
    let mut messages = vec![message("system", &scenario.system_prompt)];
    for user in scenario.turns.iter().take(turns) {
        messages.push(message("user", user));
        messages.push(message("assistant", ""));
    }
    let templated = tokenizer
        .encode_messages(&messages, chat)
        .context("templating the conversation to size its static cache")?
        .len();
    Ok((templated + 2 * turns * opts.max_new_tokens).next_multiple_of(256))
}

/// A chat message.
pub fn message(role: &str, content: &str) -> Message {
    Message {
        role: role.to_string(),
        content: content.to_string(),
    }
}

/// One generate call on the templated history, measured. Errors become a failed turn.
fn measure_turn(
    generator: &mut dyn Generator,
    tokenizer: &Tokenizer,
    messages: &[Message],
    chat: &ChatOptions,
    opts: &GenerateOptions,
    observer: &mut dyn Observer,
    mut record: TurnRecord,
) -> TurnResult {
    match generate_measured(
        generator,
        tokenizer,
        messages,
        chat,
        opts,
        observer,
        &mut record,
    ) {
        Ok((new_ids, answer)) => {
            record.success = true;
            TurnResult {
                record,
                new_ids,
                answer,
            }
        }
        Err(e) => {
            record.error = format!("{e:#}");
            TurnResult {
                record,
                new_ids: Vec::new(),
                answer: String::new(),
            }
        }
    }
}

/// Fills `record` as far as the turn gets; returns the new ids and the decoded answer.
fn generate_measured(
    generator: &mut dyn Generator,
    tokenizer: &Tokenizer,
    messages: &[Message],
    chat: &ChatOptions,
    opts: &GenerateOptions,
    observer: &mut dyn Observer,
    record: &mut TurnRecord,
) -> Result<(Vec<u32>, String)> {
    let prompt = tokenizer
        .encode_messages(messages, chat)
        .context("templating the history")?;
    record.input_tokens = prompt.len();

    let peak_was_reset = process_memory::reset_peak();
    let resident_before = process_memory::resident_bytes();
    let started = Instant::now();
    let generated = generator.generate(&prompt, opts, &mut |_| observer.token_generated());
    record.total_seconds = started.elapsed().as_secs_f64();
    let resident_after = process_memory::resident_bytes();
    if peak_was_reset {
        record.process_peak_bytes = process_memory::peak_bytes();
    }
    if let (Some(before), Some(after)) = (resident_before, resident_after) {
        record.study_memory_delta_bytes = Some(after as i64 - before as i64);
    }
    let generation = generated?;

    let answer = tokenizer.decode(&generation.new_ids, true);
    record.answer_reencoded_tokens = tokenizer
        .encode_text(&answer, false)
        .context("re-encoding the answer")?
        .len();
    record.output_tokens = generation.new_ids.len();
    record.prefill_seconds = generation.prefill_seconds;
    record.decode_seconds = generation.decode_seconds;
    record.decode_tokens_per_second = generation.decode_tokens_per_second();
    record.tokens_per_second = if record.total_seconds > 0.0 {
        record.output_tokens as f64 / record.total_seconds
    } else {
        0.0
    };
    record.kv_reserved_bytes = generation.kv.peak_reserved_bytes;
    record.kv_live_bytes = generation.kv.live_bytes;
    record.kv_shared_bytes = generation.kv.shared_bytes;
    record.kv_allocations = generation.kv.allocations;
    record.kv_pool_capacity_bytes = generation.kv.pool.capacity_bytes;
    record.kv_pool_reserved_bytes = generation.kv.pool.reserved_bytes;
    record.kv_pool_cached_idle_bytes = generation.kv.pool.cached_idle_bytes;
    record.reuse = generation.reuse;
    record.stopped_on_eos = generation.stopped_on_eos;
    Ok((generation.new_ids, answer))
}
