//! The reference fixtures of tests/fixtures: tiny checkpoints with transformers' float32 outputs
//! (prompt logits, 24 greedy ids per strategy, the logits of each step).

use crate::generate::GenerateOptions;
use crate::kv::Strategy;
use anyhow::{ensure, Context, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The fixtures' models: bf16 + llama3 RoPE + GQA 4 with tied embeddings; f32 sharded with a
/// 5.x config; f16 with an explicit head_dim of 32 and GQA 3.
pub const MODELS: [&str; 3] = [
    "tiny-llama3-gqa4-bf16",
    "tiny-mha-f32-sharded",
    "tiny-gqa3-headdim32-f16",
];

/// tests/fixtures of the source tree this binary was built from, else of the current folder
/// (a binary carried to another machine, run from the repository's root).
pub fn default_dir() -> PathBuf {
    let built_from = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    if built_from.is_dir() {
        built_from
    } else {
        PathBuf::from("tests/fixtures")
    }
}

/// ref_generation.json: the prompt and each strategy's greedy ids.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct RefGeneration {
    pub prompt_ids: Vec<u32>,
    pub max_new_tokens: usize,
    pub strategies: HashMap<String, Vec<u32>>,
}

impl RefGeneration {
    /// Reads `model_dir/ref_generation.json`.
    pub fn load(model_dir: &Path) -> Result<RefGeneration> {
        let path = model_dir.join("ref_generation.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is malformed", path.display()))
    }

    /// The reference's greedy ids for `strategy`.
    pub fn ids(&self, strategy: Strategy) -> Result<&[u32]> {
        self.strategies
            .get(strategy.name())
            .map(Vec::as_slice)
            .with_context(|| format!("the reference has no ids for strategy {strategy}"))
    }

    /// The reference's generation: its token count, EOS ignored, every logit kept.
    pub fn options(&self, strategy: Strategy, chunk_tokens: usize) -> GenerateOptions {
        GenerateOptions {
            max_new_tokens: self.max_new_tokens,
            strategy,
            chunk_tokens,
            ignore_eos: true,
            keep_step_logits: true,
            keep_prompt_logits: true,
            ..Default::default()
        }
    }
}

/// The largest |a - b|; a NaN on either side counts as infinite (it must never pass).
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> Result<f32> {
    ensure!(
        a.len() == b.len(),
        "comparing {} values with {}",
        a.len(),
        b.len()
    );
    Ok(a.iter()
        .zip(b)
        .map(|(x, y)| {
            let d = (x - y).abs();
            if d.is_nan() {
                f32::INFINITY
            } else {
                d
            }
        })
        .fold(0.0, f32::max))
}
