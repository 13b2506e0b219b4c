//! The CPU runtime against transformers' float32 outputs on the tiny checkpoints of
//! tests/fixtures (copied from ../shared/reference): every prompt position's logits, the 24
//! greedy ids and the logits of each step, for every cache strategy.

mod common;

use common::{fixture, max_abs_diff, read_npy, reference, MODELS};
use kvlab::backend::cpu::CpuBackend;
use kvlab::generate::{Engine, GenerateOptions, Generator};
use kvlab::kv::Strategy;
use kvlab::model::forward::Model;

const TOLERANCE: f32 = 1e-4;

fn check_model(name: &str, strategy: Strategy, chunk_tokens: usize) {
    let dir = fixture(name);
    let reference = reference(name);
    let backend = CpuBackend::new();
    let model = Model::load(&backend, &dir).unwrap();
    let vocab = model.config.vocab_size;
    let mut engine = Engine::new(backend, model);
    let opts = reference.options(strategy, chunk_tokens);
    let gen = engine
        .generate(&reference.prompt_ids, &opts, &mut |_| {})
        .unwrap();

    let (shape, prompt_logits) = read_npy(&dir.join("ref_prompt_logits.npy"));
    assert_eq!(shape, vec![reference.prompt_ids.len() as u64, vocab as u64]);
    let diff = max_abs_diff(&gen.prompt_logits, &prompt_logits);
    assert!(
        diff <= TOLERANCE,
        "{name} {strategy}: prompt logits differ by {diff}"
    );

    let expected = &reference.strategies[strategy.name()];
    assert_eq!(&gen.new_ids, expected, "{name} {strategy}: greedy ids");

    let (_, step_logits) = read_npy(&dir.join("ref_step_logits.npy"));
    for (i, got) in gen.step_logits.iter().enumerate() {
        let diff = max_abs_diff(got, &step_logits[i * vocab..(i + 1) * vocab]);
        assert!(
            diff <= TOLERANCE,
            "{name} {strategy}: step {i} logits differ by {diff}"
        );
    }
}

#[test]
fn every_model_and_strategy_matches_transformers() {
    for name in MODELS {
        for strategy in Strategy::ALL {
            check_model(name, strategy, 256);
        }
    }
}

#[test]
fn dynamic_cache_with_chunks_smaller_than_the_prompt() {
    // 45 prompt tokens over chunks of 7 and 1: chunk boundaries inside prefill and decode.
    for chunk in [1, 7, 16] {
        check_model("tiny-llama3-gqa4-bf16", Strategy::Dynamic, chunk);
        check_model("tiny-gqa3-headdim32-f16", Strategy::Dynamic, chunk);
    }
}

#[test]
fn decoding_on_the_backends_own_ids_gives_transformers_ids_and_stops_alike() {
    // Without kept logits, generate decodes on the ids the backend chose itself (embed_chosen,
    // argmax_advance over a view reserved ahead, commit_first after the run), as a device does
    // between reads; on the CPU a run is one step.
    for name in MODELS {
        let dir = fixture(name);
        let reference = reference(name);
        let backend = CpuBackend::new();
        let model = Model::load(&backend, &dir).unwrap();
        let mut engine = Engine::new(backend, model);
        for strategy in [Strategy::Static, Strategy::Dynamic, Strategy::DynamicReuse] {
            let opts = GenerateOptions {
                keep_step_logits: false,
                keep_prompt_logits: false,
                ..reference.options(strategy, 7)
            };
            // transformers has no reuse strategy: its dynamic cache's ids.
            let expected = match strategy {
                Strategy::DynamicReuse => reference.ids(Strategy::Dynamic).unwrap(),
                _ => reference.ids(strategy).unwrap(),
            };
            let gen = engine
                .generate(&reference.prompt_ids, &opts, &mut |_| {})
                .unwrap();
            assert_eq!(gen.new_ids, expected, "{name} {strategy}: greedy ids");
            // A stop token: the first id other than the first one.
            let stop_at = expected.iter().position(|&id| id != expected[0]).unwrap();
            engine.model.config.stop_token_ids = vec![expected[stop_at]];
            let stopping = |keep_step_logits| GenerateOptions {
                ignore_eos: false,
                keep_step_logits,
                ..opts.clone()
            };
            let runs = engine
                .generate(&reference.prompt_ids, &stopping(false), &mut |_| {})
                .unwrap();
            let per_token = engine
                .generate(&reference.prompt_ids, &stopping(true), &mut |_| {})
                .unwrap();
            engine.model.config.stop_token_ids.clear();
            assert_eq!(runs.new_ids, expected[..=stop_at], "{name} {strategy}");
            assert!(runs.stopped_on_eos, "{name} {strategy}");
            assert_eq!(
                (
                    runs.new_ids,
                    runs.kv.tokens,
                    runs.kv.chunks,
                    runs.kv.live_bytes
                ),
                (
                    per_token.new_ids,
                    per_token.kv.tokens,
                    per_token.kv.chunks,
                    per_token.kv.live_bytes
                ),
                "{name} {strategy}"
            );
        }
    }
}
