//! The CUDA backend against transformers' float32 outputs on the tiny checkpoints of
//! tests/fixtures, for every cache strategy, teacher-forced: after each step the reference's id
//! is fed back whatever was chosen, so every step's logits follow the reference's sequence and
//! every one of them is compared (within 2e-2: bf16 weights and activations). The chosen id
//! must be the reference's at every step whose reference top-2 gap exceeds twice that
//! tolerance (where logits within it cannot pick another). Also: CUDA graphs replay exactly what
//! kernel-by-kernel launches compute.
use super::fixtures::{max_abs_diff, RefGeneration, MODELS};
use super::{Check, Context};
use crate::backend::cuda::{CudaBackend, CudaOptions};
use crate::generate::{Engine, GenerateOptions, Generation, Generator};
use crate::kv::Strategy;
use crate::model::forward::Model;
use crate::npy::read_f32_array;
use anyhow::{ensure, Context as _, Result};

pub const CHECKS: &[Check] = &[
    Check {
        group: "reference",
        name: "tiny-llama3-gqa4-bf16",
        run: |ctx| every_strategy(ctx, MODELS[0]),
    },
    Check {
        group: "reference",
        name: "tiny-mha-f32-sharded",
        run: |ctx| every_strategy(ctx, MODELS[1]),
    },
    Check {
        group: "reference",
        name: "tiny-gqa3-headdim32-f16",
        run: |ctx| every_strategy(ctx, MODELS[2]),
    },
    Check {
        group: "reference",
        name: "chunks_smaller_than_the_prompt",
        run: dynamic_cache_with_chunks_smaller_than_the_prompt,
    },
    Check {
        group: "reference",
        name: "graphs_replay_launches",
        run: graphs_replay_exactly_what_launches_compute,
    },
];

/// Largest difference allowed between the device's logits and transformers' float32 ones.
pub const TOLERANCE: f32 = 2e-2;

/// The fixture `name` loaded on a CUDA backend of the context's device.
pub fn engine(ctx: &Context, name: &str, options: CudaOptions) -> Result<Engine<CudaBackend>> {
    let backend = ctx.backend(options)?;
    let dir = ctx.fixtures.join(name);
    let model = Model::load(&backend, &dir)
        .with_context(|| format!("loading the fixture {}", dir.display()))?;
    Ok(Engine::new(backend, model))
}

/// The fixture's generation with `strategy`, the reference's ids fed back when `teacher_forced`.
pub fn generate(
    engine: &mut Engine<CudaBackend>,
    reference: &RefGeneration,
    strategy: Strategy,
    chunk_tokens: usize,
    teacher_forced: bool,
) -> Result<Generation> {
    let opts = GenerateOptions {
        feed_ids: teacher_forced
            .then(|| reference.ids(strategy).map(<[u32]>::to_vec))
            .transpose()?,
        ..reference.options(strategy, chunk_tokens)
    };
    engine.generate(&reference.prompt_ids, &opts, &mut |_| {})
}

/// What one teacher-forced generation measured against the reference.
#[derive(Clone, Debug)]
pub struct Agreement {
    pub prompt_diff: f32,
    /// The largest difference over every step, and its step.
    pub step_diff: f32,
    pub worst_step: usize,
    /// Steps whose reference top-2 gap exceeds 2 x [`TOLERANCE`]: their ids are checked.
    pub decided_steps: usize,
}

/// One fixture, one strategy, teacher-forced; an error names the step and the difference.
pub fn check_model(
    ctx: &Context,
    name: &str,
    strategy: Strategy,
    chunk_tokens: usize,
) -> Result<Agreement> {
    let dir = ctx.fixtures.join(name);
    let reference = RefGeneration::load(&dir)?;
    let mut engine = engine(ctx, name, CudaOptions::default())?;
    let vocab = engine.model.config.vocab_size;
    let gen = generate(&mut engine, &reference, strategy, chunk_tokens, true)?;
    let what = format!("{name} {strategy} chunk {chunk_tokens}");

    let (shape, prompt_logits) = read_f32_array(&dir.join("ref_prompt_logits.npy"))?;
    ensure!(
        shape == [reference.prompt_ids.len() as u64, vocab as u64],
        "{what}: ref_prompt_logits.npy has shape {shape:?}"
    );
    let prompt_diff = max_abs_diff(&gen.prompt_logits, &prompt_logits)?;
    ensure!(
        prompt_diff <= TOLERANCE,
        "{what}: prompt logits differ from transformers' by {prompt_diff} (tolerance {TOLERANCE})"
    );

    let (_, step_logits) = read_f32_array(&dir.join("ref_step_logits.npy"))?;
    let expected = reference.ids(strategy)?;
    ensure!(
        gen.step_logits.len() == expected.len() && step_logits.len() == expected.len() * vocab,
        "{what}: {} steps generated, {} reference ids, {} reference logit rows",
        gen.step_logits.len(),
        expected.len(),
        step_logits.len() / vocab
    );
    let mut agreement = Agreement {
        prompt_diff,
        step_diff: 0.0,
        worst_step: 0,
        decided_steps: 0,
    };
    for (step, got) in gen.step_logits.iter().enumerate() {
        let want = &step_logits[step * vocab..(step + 1) * vocab];
        let diff = max_abs_diff(got, want)?;
        if diff > agreement.step_diff {
            agreement.step_diff = diff;
            agreement.worst_step = step;
        }
        ensure!(
            diff <= TOLERANCE,
            "{what}: step {step}'s logits differ from transformers' by {diff} (tolerance \
             {TOLERANCE})"
        );
        let mut sorted = want.to_vec();
        sorted.sort_by(|a, b| b.total_cmp(a));
        if sorted[0] - sorted[1] > 2.0 * TOLERANCE {
            agreement.decided_steps += 1;
            ensure!(
                gen.new_ids[step] == expected[step],
                "{what}: step {step} chose id {} where transformers chose {} by a margin of {}",
                gen.new_ids[step],
                expected[step],
                sorted[0] - sorted[1]
            );
        }
    }
    Ok(agreement)
}

fn every_strategy(ctx: &Context, name: &str) -> Result<String> {
    let mut notes = Vec::new();
    for strategy in Strategy::ALL {
        let a = check_model(ctx, name, strategy, 256)?;
        notes.push(format!(
            "{strategy}: prompt {:.4}, steps {:.4} (worst step {}), {} ids decided",
            a.prompt_diff, a.step_diff, a.worst_step, a.decided_steps
        ));
    }
    Ok(notes.join("; "))
}

fn dynamic_cache_with_chunks_smaller_than_the_prompt(ctx: &Context) -> Result<String> {
    // Chunks of 7: boundaries inside the prefill and between decode steps.
    for name in [MODELS[0], MODELS[2]] {
        check_model(ctx, name, Strategy::Dynamic, 7)?;
    }
    Ok("chunks of 7".into())
}

fn graphs_replay_exactly_what_launches_compute(ctx: &Context) -> Result<String> {
    let reference = RefGeneration::load(&ctx.fixtures.join(MODELS[0]))?;
    let without_graphs = CudaOptions {
        graphs: false,
        ..CudaOptions::default()
    };
    for (strategy, chunk_tokens) in [(Strategy::Static, 256), (Strategy::Dynamic, 7)] {
        let mut with = engine(ctx, MODELS[0], CudaOptions::default())?;
        let mut without = engine(ctx, MODELS[0], without_graphs)?;
        let a = generate(&mut with, &reference, strategy, chunk_tokens, false)?;
        let b = generate(&mut without, &reference, strategy, chunk_tokens, false)?;
        ensure!(
            a.new_ids == b.new_ids,
            "{strategy}: ids with graphs {:?}, without {:?}",
            a.new_ids,
            b.new_ids
        );
        ensure!(
            a.step_logits == b.step_logits,
            "{strategy}: logits with and without graphs differ"
        );
        // Prefill and the first decode step run launch by launch, the second is captured, and
        // every later step replays the graph, chunks added mid-decode included.
        let stats = with.backend.graph_stats();
        let decode_steps = a.new_ids.len() as u64 - 1;
        ensure!(
            stats.capture_failures == 0 && stats.graphs_captured == 1,
            "{strategy}: {stats:?}; capture error: {:?}",
            with.backend.graph_capture_error()
        );
        ensure!(
            stats.graphs_replayed == decode_steps - 2,
            "{strategy}: {stats:?}, expected {} replays",
            decode_steps - 2
        );
        ensure!(
            without.backend.graph_stats().graphs_replayed == 0,
            "graphs off, yet {:?}",
            without.backend.graph_stats()
        );
        ensure!(
            a.device_step_seconds.len() == decode_steps as usize + 1,
            "{} device step times for {} steps",
            a.device_step_seconds.len(),
            decode_steps + 1
        );
    }
    // The no-cache strategy's recompute grows every step: nothing repeats, nothing is captured.
    let mut none = engine(ctx, MODELS[0], CudaOptions::default())?;
    generate(&mut none, &reference, Strategy::None, 256, false)?;
    let stats = none.backend.graph_stats();
    ensure!(
        stats.graphs_captured == 0,
        "the no-cache strategy captured: {stats:?}"
    );
    Ok("static and dynamic (chunks of 7), bit-identical".into())
}
