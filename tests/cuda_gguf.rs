//! The CUDA backend on the emulator (the kernels a GPU runs, bf16 weights and activations) on
//! SmolLM2-135M-Instruct Q4_1 dequantized to bf16, against transformers' float32 outputs: no
//! further from them than transformers itself run in bf16 on the same file.
//!
//! transformers 5.24 + torch 2.15 (CPU, its GGUF loader, `dtype=bfloat16`), measured 2026-12-02
//! against the same float32 references: prompt logits (44 positions) within 1.20, the logits of
//! the 24 steps (forward over prompt + greedy ids) within 0.58, and all 24 greedy ids equal.
//! Those two figures are the bounds. Strategies dynamic and static (24 decode steps each, about a
//! minute apiece on the emulator); `none` runs the same prefill kernels 24 times over and is
//! covered on the tiny checkpoints (tests/cuda_reference.rs).

mod common;

use common::{fixture, max_abs_diff, read_npy, smollm2_file, smollm2_prompt_logits, SMOLLM2};
use kvlab::backend::cuda::emu::EmuDevice;
use kvlab::backend::cuda::{CudaBackend, CudaOptions};
use kvlab::generate::{Engine, Generator};
use kvlab::kv::Strategy;
use kvlab::model::forward::Model;
use kvlab::model::gguf::GgufFile;
use kvlab::model::DType;
use std::sync::Arc;

/// transformers in bf16: its prompt logits' largest distance from its float32 ones.
const BF16_PROMPT_BOUND: f32 = 1.20;
/// transformers in bf16: its 24 step logits' largest distance from its float32 ones.
const BF16_STEP_BOUND: f32 = 0.58;

#[test]
fn smollm2_on_the_emulator_is_as_close_as_transformers_in_bf16() {
    let Some(path) = smollm2_file() else { return };
    let reference = common::reference(SMOLLM2);
    let backend = CudaBackend::new(
        Arc::new(EmuDevice::new().unwrap()),
        "emu",
        CudaOptions::default(),
    )
    .unwrap();
    let model = Model::load_gguf(&backend, &GgufFile::open(&path).unwrap(), DType::BF16).unwrap();
    let vocab = model.config.vocab_size;
    let mut engine = Engine::new(backend, model);
    let Some((_, prompt_logits)) = smollm2_prompt_logits() else {
        return;
    };
    let (_, step_logits) = read_npy(&fixture(SMOLLM2).join("forward_step_logits.npy"));
    for strategy in [Strategy::Dynamic, Strategy::Static] {
        let gen = engine
            .generate(
                &reference.prompt_ids,
                &reference.options(strategy, 16),
                &mut |_| {},
            )
            .unwrap();
        let prompt_diff = max_abs_diff(&gen.prompt_logits, &prompt_logits);
        let expected = &reference.strategies[strategy.name()];
        let agreed = gen
            .new_ids
            .iter()
            .zip(expected)
            .take_while(|(a, b)| a == b)
            .count();
        // Step i's logits follow the ids before it: comparable while those agree.
        let compared = (agreed + 1).min(expected.len());
        let step_diff = gen.step_logits[..compared]
            .iter()
            .enumerate()
            .map(|(i, got)| max_abs_diff(got, &step_logits[i * vocab..(i + 1) * vocab]))
            .fold(0.0, f32::max);
        eprintln!(
            "{strategy}: prompt logits within {prompt_diff:.3}, {agreed} of 24 ids agree, step \
             logits within {step_diff:.3} over {compared} steps"
        );
        assert!(
            prompt_diff <= BF16_PROMPT_BOUND,
            "{strategy}: prompt logits differ by {prompt_diff}"
        );
        assert!(
            step_diff <= BF16_STEP_BOUND,
            "{strategy}: step logits differ by {step_diff}"
        );
        assert_eq!(
            agreed,
            expected.len(),
            "{strategy}: transformers in bf16 keeps all 24 ids"
        );
    }
}
