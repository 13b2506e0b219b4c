//! Model: config, weights, tokenizer, forward pass.
pub mod config;
pub mod forward;
pub mod gguf;
pub mod hub;
pub mod weights;

pub mod chat_template;
pub mod tokenizer;

pub mod synth;

/// Storage dtype of a checkpoint tensor (activations are computed in f32 on the CPU).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
pub enum DType {
    BF16,
    F16,
    F32,
}

impl DType {
    pub fn size_bytes(self) -> usize {
        match self {
            DType::BF16 | DType::F16 => 2,
            DType::F32 => 4,
        }
    }
}

/// True for a path to a GGUF file (by its extension; its magic is checked when it is read).
pub fn is_gguf(path: &std::path::Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}
