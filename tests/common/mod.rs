//! Helpers shared by the integration tests: the reference fixtures of tests/fixtures.
#![allow(dead_code)] // each test crate uses its own subset

use kvlab::generate::GenerateOptions;
use kvlab::kv::Strategy;
use std::path::{Path, PathBuf};

/// Models of tests/fixtures, with transformers' float32 outputs.
pub const MODELS: [&str; 3] = [
    "tiny-llama3-gqa4-bf16",
    "tiny-mha-f32-sharded",
    "tiny-gqa3-headdim32-f16",
];

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// (shape, values) of a float32 .npy file.
pub fn read_npy(path: &Path) -> (Vec<u64>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
    let npy = npyz::NpyFile::new(&bytes[..]).unwrap();
    let shape = npy.shape().to_vec();
    (shape, npy.into_vec::<f32>().unwrap())
}

#[derive(serde::Deserialize)]
pub struct RefGeneration {
    pub prompt_ids: Vec<u32>,
    pub max_new_tokens: usize,
    pub strategies: std::collections::HashMap<String, Vec<u32>>,
}

impl RefGeneration {
    pub fn load(model: &str) -> RefGeneration {
        let path = fixture(model).join("ref_generation.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
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

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

pub mod gguf;

/// The reference outputs of transformers on SmolLM2-135M-Instruct Q4_1 (tests/fixtures).
pub const SMOLLM2: &str = "smollm2-135m-instruct-q4_1";

/// The installed SmolLM2 file (scripts/fetch-models.sh), or None after saying why the test skips;
/// under `CI=true` its absence fails the test instead.
pub fn smollm2_file() -> Option<PathBuf> {
    let model = kvlab::model::hub::InstalledModel::by_name("smollm2-135m-instruct").unwrap();
    match model.resolve() {
        Ok(path) => Some(path),
        Err(e) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("CI=true needs the model (scripts/test.sh runs scripts/fetch-models.sh): {e:#}")
        }
        Err(e) => {
            eprintln!("skipped: {e:#}");
            None
        }
    }
}
