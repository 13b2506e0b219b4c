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

/// SmolLM2 in bf16 on the emulator, and its vocabulary size.
fn emulator_engine(path: &std::path::Path) -> (Engine<CudaBackend>, usize) {
    let backend = CudaBackend::new(
        Arc::new(EmuDevice::new().unwrap()),
        "emu",
        CudaOptions::default(),
    )
    .unwrap();
    let model = Model::load_gguf(&backend, &GgufFile::open(path).unwrap(), DType::BF16).unwrap();
    let vocab = model.config.vocab_size;
    (Engine::new(backend, model), vocab)
}

#[test]
fn smollm2_on_the_emulator_is_as_close_as_transformers_in_bf16() {
    let Some(path) = smollm2_file() else { return };
    let reference = common::reference(SMOLLM2);
    let (mut engine, vocab) = emulator_engine(&path);
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

/// Mean KL divergence from the emulator's bf16 cache allowed an int8 cache on SmolLM2: the
/// issue's target against the f32 cache (the CPU's int8 measured 2.0e-4 over kv-eval's 480
/// positions, docs/smaller-caches.md).
const INT8_MEAN_KLD: f64 = 1e-3;
/// The same for fp8 e4m3, about three times the CPU's 3.3e-3 against f32.
const FP8_MEAN_KLD: f64 = 1e-2;

#[test]
fn int8_and_fp8_caches_on_the_emulator_stay_close_to_its_bf16_cache() {
    use kvlab::eval::compare::compare;
    use kvlab::generate::{GenerateOptions, KvOptions};
    use kvlab::kv::KvDtype;
    let Some(path) = smollm2_file() else { return };
    let reference = common::reference(SMOLLM2);
    let (mut engine, vocab) = emulator_engine(&path);
    // The prompt (prefill attention over the quantized cache) and four decode steps fed the bf16
    // cache's ids, so that every row follows the same text.
    let opts = GenerateOptions {
        max_new_tokens: 4,
        ..reference.options(Strategy::Dynamic, 16)
    };
    let bf16 = engine
        .generate(&reference.prompt_ids, &opts, &mut |_| {})
        .unwrap();
    let forced = GenerateOptions {
        feed_ids: Some(bf16.new_ids.clone()),
        ..opts
    };
    let rows = |gen: &kvlab::generate::Generation| -> Vec<Vec<f32>> {
        let mut rows: Vec<Vec<f32>> = gen
            .prompt_logits
            .chunks(vocab)
            .map(<[f32]>::to_vec)
            .collect();
        rows.extend(gen.step_logits.iter().cloned());
        rows
    };
    let want = rows(&bf16);
    for (dtype, bound) in [
        (KvDtype::Int8, INT8_MEAN_KLD),
        (KvDtype::Fp8E4m3, FP8_MEAN_KLD),
    ] {
        engine
            .set_kv_options(KvOptions {
                dtype: Some(dtype),
                ..KvOptions::default()
            })
            .unwrap();
        let gen = engine
            .generate(&reference.prompt_ids, &forced, &mut |_| {})
            .unwrap();
        let got = rows(&gen);
        assert_eq!(got.len(), want.len(), "{dtype}: rows of logits");
        let comparisons: Vec<_> = want
            .iter()
            .zip(&got)
            .map(|(w, g)| compare(w, g, 0))
            .collect();
        let mean = comparisons.iter().map(|c| c.kl_divergence).sum::<f64>() / got.len() as f64;
        let same = comparisons.iter().filter(|c| c.same_top1).count();
        eprintln!(
            "{dtype}: mean KLD {mean:.2e} from the bf16 cache over {} positions, top-1 agreement \
             {same} of them",
            got.len()
        );
        assert!(mean <= bound, "{dtype}: mean KLD {mean} (bound {bound})");
    }
}
