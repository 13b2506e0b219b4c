//! The CPU runtime against transformers' float32 outputs on the tiny checkpoints of
//! tests/fixtures (copied from ../shared/reference): every prompt position's logits, the 24
//! greedy ids and the logits of each step, for every cache strategy.

mod common;

use common::{fixture, max_abs_diff, read_npy, reference, MODELS};
use kvlab::backend::cpu::CpuBackend;
use kvlab::generate::{Engine, Generator};
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
