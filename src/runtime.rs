//! What a command needs to run a model: the model (a folder or .gguf file given, installed in
//! kvlab's cache, from the HF cache, or the synthetic default), its tokenizer, and a
//! [`Generator`] on the chosen backend.

use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::{BackendKind, CudaBackend, CudaOptions};
use crate::backend::{Backend, BackendInfo};
use crate::generate::{Engine, Generator};
use crate::model::forward::Model;
use crate::model::gguf::{llama, GgufFile};
use crate::model::hub::resolve_model;
use crate::model::tokenizer::Tokenizer;
use crate::model::{is_gguf, synth, DType};
use crate::scenario::report::EngineInfo;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// A model ready to generate.
pub struct LoadedModel {
    /// The model folder or .gguf file.
    pub path: PathBuf,
    /// For reports: the model's own name where the file states it, and its path.
    pub label: String,
    /// Random weights written by `kvlab synth` (the default when no model is given).
    pub synthetic: bool,
    /// How the weights are stored and what they run in (`"bf16"`; `"GGUF Q4_1 ×210, ...,
    /// dequantized to f32"`), when known.
    pub weights_dtype: Option<String>,
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

/// How a model is loaded.
#[derive(Clone, Copy, Debug, Default)]
pub struct LoadOptions {
    /// What GGUF tensors are dequantized to on the CPU (default f32; the CUDA backend always
    /// takes bf16). Safetensors weights stay in their stored dtype.
    pub weight_dtype: Option<DType>,
}

/// Loads `model` (a folder, .gguf file, installed model name or hub id; `None` = the synthetic
/// Llama-3.2-1B) on `backend`.
pub fn load(
    model: Option<&str>,
    backend: BackendKind,
    cuda: CudaOptions,
    opts: LoadOptions,
) -> Result<LoadedModel> {
    let path = match model {
        Some(spec) => resolve_model(spec)?,
        None => synth::default_model_dir()?,
    };
    let (kind, backend_choice) = backend.resolve();
    let on_cuda = matches!(kind, BackendKind::Cuda | BackendKind::Emu);
    let loading = || format!("loading {}", path.display());
    let gguf = if is_gguf(&path) {
        Some(GgufFile::open(&path)?)
    } else {
        if opts.weight_dtype.is_some() {
            bail!(
                "--weight-dtype applies to .gguf files; {} keeps its weights in their stored dtype",
                path.display()
            );
        }
        None
    };
    let weight_dtype = match (&gguf, on_cuda) {
        (None, _) => None,
        (Some(_), true) => match opts.weight_dtype {
            None | Some(DType::BF16) => Some(DType::BF16),
            Some(other) => bail!("the CUDA backend runs GGUF weights in bf16, not {other:?}"),
        },
        (Some(_), false) => Some(opts.weight_dtype.unwrap_or(DType::F32)),
    };
    let generator: Box<dyn Generator> = if on_cuda {
        let backend = CudaBackend::open(kind, cuda)?;
        let model =
            load_model(&backend, &path, gguf.as_ref(), weight_dtype).with_context(loading)?;
        Box::new(Engine::new(backend, model))
    } else {
        let backend = CpuBackend::new();
        let model =
            load_model(&backend, &path, gguf.as_ref(), weight_dtype).with_context(loading)?;
        Box::new(Engine::new(backend, model))
    };
    let (label, weights_dtype, tokenizer) = match &gguf {
        Some(file) => {
            let name = file.optional("general.name", GgufFile::get_str)?;
            let label = match name {
                Some(name) => format!("{name} ({})", path.display()),
                None => path.display().to_string(),
            };
            let dtype = weight_dtype.map_or("", dtype_name);
            let weights = format!(
                "GGUF {}, dequantized to {dtype}",
                llama::storage_summary(file)
            );
            (label, Some(weights), Some(Tokenizer::from_gguf(file)?))
        }
        None => (
            path.display().to_string(),
            stored_dtype(&path),
            Tokenizer::load(&path)?,
        ),
    };
    Ok(LoadedModel {
        synthetic: synth::is_synthetic(&path),
        path,
        label,
        weights_dtype,
        tokenizer,
        generator,
        backend_choice,
    })
}

impl LoadedModel {
    /// What reports say about the model and `backend` (the generator's, with its KV dtype).
    pub fn engine_info(&self, backend: BackendInfo) -> EngineInfo {
        EngineInfo {
            model: self.label.clone(),
            synthetic: self.synthetic,
            weights_dtype: self.weights_dtype.clone(),
            backend,
        }
    }
}

fn load_model<B: Backend>(
    backend: &B,
    path: &Path,
    gguf: Option<&GgufFile>,
    dtype: Option<DType>,
) -> Result<Model<B>> {
    match (gguf, dtype) {
        (Some(file), Some(dtype)) => Model::load_gguf(backend, file, dtype),
        _ => Model::load(backend, path),
    }
}

fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
    }
}

/// The checkpoint's storage dtype as config.json states it (`torch_dtype`, 5.x: `dtype`).
fn stored_dtype(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
    let config: serde_json::Value = serde_json::from_str(&text).ok()?;
    ["torch_dtype", "dtype"]
        .iter()
        .find_map(|key| config.get(key)?.as_str().map(str::to_string))
}
