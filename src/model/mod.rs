//! Model: config, weights, tokenizer, forward pass.
pub mod config;
pub mod forward;
pub mod hub;
pub mod weights;

pub mod chat_template;
pub mod tokenizer;

pub mod synth;

/// Storage dtype of a checkpoint tensor (activations are computed in f32 on the CPU).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
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
