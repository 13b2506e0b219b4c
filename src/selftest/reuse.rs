//! Prefix reuse against re-prefilling: a three-turn conversation whose every turn runs twice,
//! once continuing the conversation's kept sequence (`dynamic+reuse`, `static+reuse`) and once
//! from scratch in a fresh cache (the study's protocol). The reused run is teacher-forced with
//! the fresh run's ids, so that every step's logits are compared whatever either chose; ids must
//! be equal wherever the fresh run's top-2 gap exceeds twice the tolerance.
//!
//! Turn 2 appends the whole first answer and new tokens (the common prefix is everything the
//! sequence holds); turn 3 changes the tail of the second answer (as a chat template that
//! renders the answer differently from the generated ids would), so the common prefix ends
//! inside what was cached, mid-chunk for most chunk sizes. A second conversation with the first
//! one's opening turn then shares its chunks through the prefix index (`dynamic+reuse`).
//!
//! Generic over the backend: the CPU test holds it to 1e-4 (tests/reuse.rs), the CUDA backend
//! to the bf16 tolerance of [`super::reference::TOLERANCE`].
use super::fixtures::{max_abs_diff, RefGeneration, MODELS};
use super::reference::{engine, TOLERANCE};
use super::{Check, Context};
use crate::backend::cuda::CudaOptions;
use crate::backend::Backend;
use crate::generate::{Engine, GenerateOptions, Generation, Generator, ReuseStats};
use crate::kv::Strategy;
use anyhow::{ensure, Result};

pub const CHECKS: &[Check] = &[Check {
    group: "reference",
    name: "prefix_reuse",
    run: prefix_reuse_on_the_device,
}];

/// New tokens per turn.
const NEW_TOKENS: usize = 6;

/// The run with reuse, the fresh run, and what the reuse found.
pub struct TurnPair {
    pub reused: Generation,
    pub fresh: Generation,
}

/// The three prompts' stats and the largest logit difference seen.
pub struct ConversationReport {
    pub turns: Vec<ReuseStats>,
    pub max_diff: f32,
}

fn options(strategy: Strategy, chunk_tokens: usize, max_context: usize) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: NEW_TOKENS,
        strategy,
        chunk_tokens,
        max_context: Some(max_context),
        ignore_eos: true,
        keep_step_logits: true,
        ..GenerateOptions::default()
    }
}

/// One turn: `prompt` fresh (the study's strategy of the same layout) in `fresh`, then in
/// `reuse` as `conversation`, teacher-forced with the fresh ids; compared within `tolerance`.
#[allow(clippy::too_many_arguments)]
fn turn<B: Backend>(
    reuse: &mut Engine<B>,
    fresh: &mut Engine<B>,
    prompt: &[u32],
    strategy: Strategy,
    chunk_tokens: usize,
    conversation: u64,
    tolerance: f32,
    what: &str,
) -> Result<(TurnPair, f32)> {
    let plain = match strategy {
        Strategy::StaticReuse => Strategy::Static,
        _ => Strategy::Dynamic,
    };
    // Room for all three turns, so that a static sequence keeps one run throughout.
    let max_context = prompt.len() + 4 * NEW_TOKENS + 64;
    let fresh_gen = fresh.generate(
        prompt,
        &options(plain, chunk_tokens, max_context),
        &mut |_| {},
    )?;
    let opts = GenerateOptions {
        conversation: Some(conversation),
        feed_ids: Some(fresh_gen.new_ids.clone()),
        ..options(strategy, chunk_tokens, max_context)
    };
    let reused = reuse.generate(prompt, &opts, &mut |_| {})?;
    ensure!(
        reused.step_logits.len() == fresh_gen.step_logits.len(),
        "{what}: {} steps with reuse, {} without",
        reused.step_logits.len(),
        fresh_gen.step_logits.len()
    );
    let mut worst = 0.0f32;
    for (step, (got, want)) in reused
        .step_logits
        .iter()
        .zip(&fresh_gen.step_logits)
        .enumerate()
    {
        let diff = max_abs_diff(got, want)?;
        worst = worst.max(diff);
        ensure!(
            diff <= tolerance,
            "{what}: step {step}'s logits differ from re-prefilling by {diff} (tolerance \
             {tolerance})"
        );
        let mut sorted = want.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        if sorted[0] - sorted[1] > 2.0 * tolerance {
            ensure!(
                reused.new_ids[step] == fresh_gen.new_ids[step],
                "{what}: step {step} chose {} with reuse, {} without (margin {})",
                reused.new_ids[step],
                fresh_gen.new_ids[step],
                sorted[0] - sorted[1]
            );
        }
    }
    Ok((
        TurnPair {
            reused,
            fresh: fresh_gen,
        },
        worst,
    ))
}

/// The conversation of the module doc over `prompt` with `strategy` and `chunk_tokens`,
/// checking each turn's logits and what the reuse found.
pub fn conversation<B: Backend>(
    reuse: &mut Engine<B>,
    fresh: &mut Engine<B>,
    prompt: &[u32],
    strategy: Strategy,
    chunk_tokens: usize,
    tolerance: f32,
) -> Result<ConversationReport> {
    let what = |turn: usize| format!("{strategy} chunk {chunk_tokens} turn {turn}");
    reuse.clear_kv_cache()?;
    let vocab = reuse.config().vocab_size as u32;
    // New "user" tokens of each turn: pieces of the prompt, so they are ordinary ids.
    let user = |turn: usize| -> Vec<u32> { prompt[turn..turn + 5].to_vec() };
    let mut report = ConversationReport {
        turns: Vec::new(),
        max_diff: 0.0,
    };

    let p1 = prompt.to_vec();
    let (t1, d1) = turn(
        reuse,
        fresh,
        &p1,
        strategy,
        chunk_tokens,
        1,
        tolerance,
        &what(1),
    )?;
    let s1 = t1.reused.reuse.unwrap_or_default();
    ensure!(
        s1.reused_tokens == 0 && s1.prefilled_tokens == p1.len(),
        "{}: a new conversation reused {s1:?}",
        what(1)
    );

    // Turn 2: everything the sequence holds is the prompt's start.
    let mut p2 = p1.clone();
    p2.extend(&t1.fresh.new_ids);
    p2.extend(user(2));
    let (t2, d2) = turn(
        reuse,
        fresh,
        &p2,
        strategy,
        chunk_tokens,
        1,
        tolerance,
        &what(2),
    )?;
    let s2 = t2.reused.reuse.unwrap_or_default();
    let held = p1.len() + NEW_TOKENS - 1;
    ensure!(
        s2.reused_tokens == held && s2.missed_drift == 0 && s2.prefilled_tokens == p2.len() - held,
        "{}: expected {held} tokens reused, no drift: {s2:?}",
        what(2)
    );

    // Turn 3: the answer's tail re-rendered differently: the common prefix ends 2 tokens into
    // the second answer, and the 3 cached positions after it are drift.
    let mut p3 = p2.clone();
    p3.extend(&t2.fresh.new_ids[..2]);
    p3.extend(t2.fresh.new_ids[2..].iter().map(|&id| (id + 1) % vocab));
    p3.extend(user(3));
    let (t3, d3) = turn(
        reuse,
        fresh,
        &p3,
        strategy,
        chunk_tokens,
        1,
        tolerance,
        &what(3),
    )?;
    let s3 = t3.reused.reuse.unwrap_or_default();
    ensure!(
        s3.reused_tokens == p2.len() + 2 && s3.missed_drift == NEW_TOKENS - 3,
        "{}: expected {} tokens reused and {} of drift: {s3:?}",
        what(3),
        p2.len() + 2,
        NEW_TOKENS - 3
    );
    report.turns.extend([s1, s2, s3]);
    report.max_diff = d1.max(d2).max(d3);

    // Another conversation opening like the first shares its full chunks.
    if strategy == Strategy::DynamicReuse {
        let (t4, d4) = turn(
            reuse,
            fresh,
            &p1,
            strategy,
            chunk_tokens,
            2,
            tolerance,
            "second conversation",
        )?;
        let s4 = t4.reused.reuse.unwrap_or_default();
        let shareable = (p1.len() - 1) / chunk_tokens * chunk_tokens;
        ensure!(
            s4.reused_tokens >= shareable,
            "second conversation, chunk {chunk_tokens}: {} tokens reused, {shareable} shareable",
            s4.reused_tokens
        );
        if s4.reused_tokens > 0 {
            ensure!(
                t4.reused.kv.shared_bytes > 0,
                "second conversation: reused {} tokens but shares no chunk",
                s4.reused_tokens
            );
        }
        report.turns.push(s4);
        report.max_diff = report.max_diff.max(d4);
    }
    reuse.end_conversation(1)?;
    reuse.end_conversation(2)?;
    Ok(report)
}

/// Every tiny model on the device, both reuse strategies; chunks of 1, 7, 16 and 256 on the
/// first model, 7 on the others.
fn prefix_reuse_on_the_device(ctx: &Context) -> Result<String> {
    let mut worst = 0.0f32;
    for (i, name) in MODELS.iter().enumerate() {
        let prompt = RefGeneration::load(&ctx.fixtures.join(name))?.prompt_ids;
        let mut reuse = engine(ctx, name, CudaOptions::default())?;
        let mut fresh = engine(ctx, name, CudaOptions::default())?;
        let chunks: &[usize] = if i == 0 { &[1, 7, 16, 256] } else { &[7] };
        for &chunk in chunks {
            for strategy in [Strategy::DynamicReuse, Strategy::StaticReuse] {
                if strategy == Strategy::StaticReuse && chunk != chunks[0] {
                    continue; // a static run has no chunks: once per model
                }
                let report =
                    conversation(&mut reuse, &mut fresh, &prompt, strategy, chunk, TOLERANCE)
                        .map_err(|e| e.context(name.to_string()))?;
                worst = worst.max(report.max_diff);
            }
        }
    }
    Ok(format!(
        "3 turns x both reuse strategies x chunks 1/7/16/256, largest logit difference {worst:.4}"
    ))
}
