//! The CUDA backend on the emulator (exactly the kernels and launches a GPU runs) against
//! transformers' float32 outputs on the tiny checkpoints of tests/fixtures, for every cache
//! strategy: prompt and step logits within 2e-2 (bf16 weights and activations), and the greedy
//! ids up to the first step whose reference top-2 gap is under that tolerance (beyond it, bf16
//! rounding may legitimately pick the other token). Also: CUDA graphs replay exactly what
//! kernel-by-kernel launches compute.

mod common;

use common::{fixture, max_abs_diff, read_npy, RefGeneration, MODELS};
use kvlab::backend::cuda::emu::EmuDevice;
use kvlab::backend::cuda::{CudaBackend, CudaOptions};
use kvlab::generate::{Engine, Generation, Generator};
use kvlab::kv::Strategy;
use kvlab::model::forward::Model;
use std::sync::Arc;

const TOLERANCE: f32 = 2e-2;

fn engine(name: &str, options: CudaOptions) -> Engine<CudaBackend> {
    let backend = CudaBackend::new(Arc::new(EmuDevice::new().unwrap()), "emu", options).unwrap();
    let model = Model::load(&backend, &fixture(name)).unwrap();
    Engine::new(backend, model)
}

fn generate(
    engine: &mut Engine<CudaBackend>,
    name: &str,
    strategy: Strategy,
    chunk_tokens: usize,
) -> Generation {
    let reference = RefGeneration::load(name);
    let opts = reference.options(strategy, chunk_tokens);
    engine
        .generate(&reference.prompt_ids, &opts, &mut |_| {})
        .unwrap()
}

/// The first step whose top-2 logit gap in the reference is under the tolerance (or the step
/// count): greedy ids must agree before it.
fn first_close_call(step_logits: &[f32], vocab: usize) -> usize {
    step_logits
        .chunks(vocab)
        .position(|row| {
            let mut sorted = row.to_vec();
            sorted.sort_by(|a, b| b.total_cmp(a));
            sorted[0] - sorted[1] < TOLERANCE
        })
        .unwrap_or(step_logits.len() / vocab)
}

fn check_model(name: &str, strategy: Strategy, chunk_tokens: usize) {
    let dir = fixture(name);
    let reference = RefGeneration::load(name);
    let mut engine = engine(name, CudaOptions::default());
    let vocab = engine.model.config.vocab_size;
    let gen = generate(&mut engine, name, strategy, chunk_tokens);

    let (shape, prompt_logits) = read_npy(&dir.join("ref_prompt_logits.npy"));
    assert_eq!(shape, vec![reference.prompt_ids.len() as u64, vocab as u64]);
    let prompt_diff = max_abs_diff(&gen.prompt_logits, &prompt_logits);

    let (_, step_logits) = read_npy(&dir.join("ref_step_logits.npy"));
    let decided = first_close_call(&step_logits, vocab);
    let expected = &reference.strategies[strategy.name()];
    // Step i's logits follow the ids before it: comparable while those agree.
    let agreed = gen
        .new_ids
        .iter()
        .zip(expected)
        .take_while(|(a, b)| a == b)
        .count();
    let compared = (agreed + 1).min(expected.len());
    let step_diff = gen.step_logits[..compared]
        .iter()
        .enumerate()
        .map(|(i, got)| max_abs_diff(got, &step_logits[i * vocab..(i + 1) * vocab]))
        .fold(0.0, f32::max);
    eprintln!(
        "{name} {strategy} chunk {chunk_tokens}: prompt logits max diff {prompt_diff:.5}; \
         {agreed} of {} ids agree (first close call at step {decided}); step logits max diff \
         {step_diff:.5} over {compared} steps",
        expected.len()
    );
    assert!(
        prompt_diff <= TOLERANCE,
        "{name} {strategy}: prompt logits differ by {prompt_diff}"
    );
    assert!(
        agreed >= decided,
        "{name} {strategy}: greedy ids differ at step {agreed}, before the first close call \
         (step {decided}): {:?} vs {:?}",
        gen.new_ids,
        expected
    );
    assert!(
        step_diff <= TOLERANCE,
        "{name} {strategy}: step logits differ by {step_diff}"
    );
}

#[test]
fn tiny_llama3_gqa4_bf16_every_strategy() {
    for strategy in Strategy::ALL {
        check_model(MODELS[0], strategy, 256);
    }
}

#[test]
fn tiny_mha_f32_sharded_every_strategy() {
    for strategy in Strategy::ALL {
        check_model(MODELS[1], strategy, 256);
    }
}

#[test]
fn tiny_gqa3_headdim32_f16_every_strategy() {
    for strategy in Strategy::ALL {
        check_model(MODELS[2], strategy, 256);
    }
}

#[test]
fn dynamic_cache_with_chunks_smaller_than_the_prompt() {
    // Chunks of 7: boundaries inside the prefill and between decode steps.
    check_model(MODELS[0], Strategy::Dynamic, 7);
    check_model(MODELS[2], Strategy::Dynamic, 7);
}

#[test]
fn graphs_replay_exactly_what_launches_compute() {
    for (strategy, chunk_tokens) in [(Strategy::Static, 256), (Strategy::Dynamic, 7)] {
        let mut with = engine(MODELS[0], CudaOptions::default());
        let mut without = engine(
            MODELS[0],
            CudaOptions {
                graphs: false,
                ..CudaOptions::default()
            },
        );
        let a = generate(&mut with, MODELS[0], strategy, chunk_tokens);
        let b = generate(&mut without, MODELS[0], strategy, chunk_tokens);
        assert_eq!(
            a.new_ids, b.new_ids,
            "{strategy}: ids with and without graphs"
        );
        assert_eq!(
            a.step_logits, b.step_logits,
            "{strategy}: logits with and without graphs"
        );
        // Prefill and the first decode step run launch by launch, the second is captured, and
        // every later step replays the graph, chunks added mid-decode included.
        let stats = with.backend.graph_stats();
        let decode_steps = a.new_ids.len() as u64 - 1;
        assert_eq!(stats.graphs_captured, 1, "{strategy}: {stats:?}");
        assert_eq!(
            stats.graphs_replayed,
            decode_steps - 2,
            "{strategy}: {stats:?}"
        );
        assert_eq!(without.backend.graph_stats().graphs_replayed, 0);
        assert_eq!(a.device_step_seconds.len(), decode_steps as usize + 1);
    }
    // The no-cache strategy's recompute grows every step: nothing repeats, nothing is captured.
    let mut none = engine(MODELS[0], CudaOptions::default());
    generate(&mut none, MODELS[0], Strategy::None, 256);
    assert_eq!(none.backend.graph_stats().graphs_captured, 0);
}
