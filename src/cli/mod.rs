//! Subcommands. Each module holds its clap arguments and its `run`.
pub mod generate;
pub mod roofline;
pub mod synth;

use clap::Args;

/// Which model, on which backend.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model folder, or a hub id (org/name[@revision]) found in the local Hugging Face cache.
    /// Default: the synthetic Llama-3.2-1B, written once into kvlab's cache folder.
    #[arg(long)]
    pub model: Option<String>,
    /// auto picks cuda when a GPU and driver are present, else cpu; emu runs the CUDA kernels
    /// on the CPU emulator (slow, for tests and kernel debugging).
    #[arg(long, default_value = "auto", value_parser = ["auto", "cpu", "cuda", "emu"])]
    pub backend: String,
    /// CPU threads (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
}

impl ModelArgs {
    pub fn load(&self) -> anyhow::Result<kvlab::runtime::LoadedModel> {
        kvlab::runtime::set_threads(self.threads)?;
        kvlab::runtime::load(self.model.as_deref(), &self.backend)
    }
}
