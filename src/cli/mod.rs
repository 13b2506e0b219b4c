//! Subcommands. Each module holds its clap arguments and its `run`.
pub mod cache_map;
pub mod generate;
pub mod kernel_report;
pub mod roofline;
pub mod scenario;
pub mod selftest;
pub mod synth;

use clap::Args;

/// Which model, on which backend.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model folder, .gguf file, `smollm2-135m-instruct` (installed by scripts/fetch-models.sh),
    /// or a hub id (org/name[@revision]) found in the local Hugging Face cache.
    /// Default: the synthetic Llama-3.2-1B, written once into kvlab's cache folder.
    #[arg(long)]
    pub model: Option<String>,
    /// What a .gguf file's tensors are dequantized to [default: f32 on the CPU, bf16 on CUDA].
    #[arg(long, value_enum)]
    pub weight_dtype: Option<kvlab::model::DType>,
    /// auto picks cuda when a GPU and driver are present, else cpu; emu runs the CUDA kernels
    /// on the CPU emulator (slow, for tests and kernel debugging).
    #[arg(long, default_value = "auto")]
    pub backend: kvlab::backend::cuda::BackendKind,
    /// CUDA backend: run decode steps without CUDA graphs (to measure what graphs buy).
    #[arg(long)]
    pub no_graphs: bool,
    /// CPU threads (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
}

impl ModelArgs {
    pub fn load(&self) -> anyhow::Result<kvlab::runtime::LoadedModel> {
        kvlab::runtime::set_threads(self.threads)?;
        let cuda = kvlab::backend::cuda::CudaOptions {
            graphs: !self.no_graphs,
            ..Default::default()
        };
        let opts = kvlab::runtime::LoadOptions {
            weight_dtype: self.weight_dtype,
        };
        kvlab::runtime::load(self.model.as_deref(), self.backend, cuda, opts)
    }
}
