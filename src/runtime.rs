//! What a command needs to run a model: the folder (given, from the HF cache, or the synthetic
//! default), its tokenizer, and a [`Generator`] on the chosen backend.

use crate::backend::cpu::CpuBackend;
use crate::generate::{Engine, Generator};
use crate::model::forward::Model;
use crate::model::hub::resolve_model_dir;
use crate::model::synth;
use crate::model::tokenizer::Tokenizer;
use anyhow::{Context, Result};
use std::path::PathBuf;

/// A model ready to generate.
pub struct LoadedModel {
    pub dir: PathBuf,
    /// Random weights written by `kvlab synth` (the default when no model is given).
    pub synthetic: bool,
    /// `None` for folders without tokenizer.json (then prompts are given as ids).
    pub tokenizer: Option<Tokenizer>,
    pub generator: Box<dyn Generator>,
}

/// Sets the CPU thread count once per process (rayon's global pool).
pub fn set_threads(threads: Option<usize>) -> Result<()> {
    if let Some(n) = threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("the thread pool was already started")?;
    }
    Ok(())
}

/// Loads `model` (a folder or hub id; `None` = the synthetic Llama-3.2-1B) on `backend`.
pub fn load(model: Option<&str>, backend: &str) -> Result<LoadedModel> {
    let dir = match model {
        Some(spec) => resolve_model_dir(spec)?,
        None => synth::default_model_dir()?,
    };
    let synthetic = synth::is_synthetic(&dir);
    let tokenizer = Tokenizer::load(&dir)?;
    let generator: Box<dyn Generator> = match backend {
        "auto" | "cpu" => {
            let backend = CpuBackend::new();
            let model = Model::load(&backend, &dir)
                .with_context(|| format!("loading {}", dir.display()))?;
            Box::new(Engine::new(backend, model))
        }
        other => anyhow::bail!("unknown backend {other:?} (expected auto, cpu, cuda or emu)"),
    };
    Ok(LoadedModel {
        dir,
        synthetic,
        tokenizer,
        generator,
    })
}
