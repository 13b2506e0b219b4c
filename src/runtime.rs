//! What a command needs to run a model: the folder (given, from the HF cache, or the synthetic
//! default), its tokenizer, and a [`Generator`] on the chosen backend.

use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::{BackendKind, CudaBackend, CudaOptions};
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
    /// Which backend runs it and why (`auto` explains its pick).
    pub backend_choice: String,
}

/// Starts the CPU thread pool (rayon's global one) with `threads` threads (default: one per
/// core, or `RAYON_NUM_THREADS`), once per process, from the thread that will run the model.
///
/// That thread is the pool's worker 0. A thread outside the pool hands every parallel op over and
/// sleeps until a worker wakes it: measured 25-45 us per op on a 2-vCPU VM, where a decode step
/// of Llama-3.2-1B runs about 130 of them. As a worker it runs its share of the op itself.
pub fn set_threads(threads: Option<usize>) -> Result<()> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads.unwrap_or(0))
        .use_current_thread()
        .build_global()
        .context("the thread pool was already started")
}

/// Loads `model` (a folder or hub id; `None` = the synthetic Llama-3.2-1B) on `backend`.
pub fn load(model: Option<&str>, backend: BackendKind, cuda: CudaOptions) -> Result<LoadedModel> {
    let dir = match model {
        Some(spec) => resolve_model_dir(spec)?,
        None => synth::default_model_dir()?,
    };
    let synthetic = synth::is_synthetic(&dir);
    let tokenizer = Tokenizer::load(&dir)?;
    let (kind, backend_choice) = backend.resolve();
    let loading = || format!("loading {}", dir.display());
    let generator: Box<dyn Generator> = match kind {
        BackendKind::Cuda | BackendKind::Emu => {
            let backend = CudaBackend::open(kind, cuda)?;
            let model = Model::load(&backend, &dir).with_context(loading)?;
            Box::new(Engine::new(backend, model))
        }
        BackendKind::Cpu | BackendKind::Auto => {
            let backend = CpuBackend::new();
            let model = Model::load(&backend, &dir).with_context(loading)?;
            Box::new(Engine::new(backend, model))
        }
    };
    Ok(LoadedModel {
        dir,
        synthetic,
        tokenizer,
        generator,
        backend_choice,
    })
}
