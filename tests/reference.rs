//! The CPU runtime against transformers' float32 outputs on the tiny checkpoints of
//! tests/fixtures (copied from ../shared/reference): every prompt position's logits, the 24
//! greedy ids and the logits of each step, for every cache strategy.

use kvlab::backend::cpu::CpuBackend;
use kvlab::generate::{Engine, GenerateOptions, Generator};
use kvlab::kv::Strategy;
use kvlab::model::forward::Model;
use std::path::{Path, PathBuf};

const MODELS: [&str; 3] = [
    "tiny-llama3-gqa4-bf16",
    "tiny-mha-f32-sharded",
    "tiny-gqa3-headdim32-f16",
];
const TOLERANCE: f32 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn read_npy(path: &Path) -> (Vec<u64>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
    let npy = npyz::NpyFile::new(&bytes[..]).unwrap();
    let shape = npy.shape().to_vec();
    (shape, npy.into_vec::<f32>().unwrap())
}

#[derive(serde::Deserialize)]
struct RefGeneration {
    prompt_ids: Vec<u32>,
    max_new_tokens: usize,
    strategies: std::collections::HashMap<String, Vec<u32>>,
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn check_model(name: &str, strategy: Strategy, chunk_tokens: usize) {
    let dir = fixture(name);
    let reference: RefGeneration =
        serde_json::from_str(&std::fs::read_to_string(dir.join("ref_generation.json")).unwrap())
            .unwrap();
    let backend = CpuBackend::new();
    let model = Model::load(&backend, &dir).unwrap();
    let vocab = model.config.vocab_size;
    let mut engine = Engine::new(backend, model);
    let opts = GenerateOptions {
        max_new_tokens: reference.max_new_tokens,
        strategy,
        chunk_tokens,
        ignore_eos: true,
        keep_step_logits: true,
        keep_prompt_logits: true,
        ..Default::default()
    };
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
