//! Subcommands. Each module holds its clap arguments and its `run`.
pub mod cache_map;
pub mod generate;
pub mod kernel_report;
pub mod kv_eval;
pub mod roofline;
pub mod scenario;
pub mod selftest;
pub mod serve_bench;
pub mod synth;

use anyhow::Context;
use clap::Args;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

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
    /// CUDA backend: launch the decode step's kernels as programmatic dependents (sm_90+), so
    /// that each kernel's first weight loads overlap the previous kernel's tail. Off by default
    /// until a GPU run has checked it.
    #[arg(long)]
    pub pdl: bool,
    /// CPU threads (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Element type of K and V [default: f32 on the CPU (exact against transformers' f32),
    /// bf16 on CUDA]; bf16 halves the KV bytes; int8 and fp8-e4m3 (CPU and CUDA) store a byte
    /// per value and f32 scales (int8 keys: one per 16 channels; other rows: one per row of
    /// head_dim), a quarter of f32 plus the scales. f32: CPU only.
    #[arg(long, value_enum)]
    pub kv_dtype: Option<kvlab::kv::KvDtype>,
    /// Bytes of the KV pool every sequence draws from, e.g. 512MiB, 2GiB, 1.5GB or a plain byte
    /// count [default: one sequence of the model's whole context].
    #[arg(long, value_parser = parse_bytes)]
    pub kv_budget: Option<u64>,
    /// What each sequence keeps between steps: full, window:N (the N most recent positions),
    /// sinks:S,window:N (StreamingLLM: the first S and the N most recent) or
    /// h2o:heavy=H,recent=R (the R most recent and the H that received the most attention).
    /// CPU backend; kept positions keep their RoPE positions.
    #[arg(long, default_value = "full")]
    pub kv_policy: kvlab::kv::EvictionPolicy,
}

/// A byte count: a number with an optional unit (B; KB, MB, GB: powers of 1000; KiB, MiB, GiB:
/// powers of 1024).
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = (t[..split].trim(), t[split..].trim());
    let scale: f64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" | "k" => 1e3,
        "mb" | "m" => 1e6,
        "gb" | "g" => 1e9,
        "kib" => 1024.0,
        "mib" => (1u64 << 20) as f64,
        "gib" => (1u64 << 30) as f64,
        _ => {
            return Err(format!(
                "{text:?}: unknown unit {unit:?} (use B, KB, MB, GB, KiB, MiB or GiB)"
            ))
        }
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size (e.g. 512MiB, 2GiB, 1000000)"))?;
    let bytes = value * scale;
    if !(bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(format!("{text:?} is not a positive size"));
    }
    Ok(bytes as u64)
}

/// A new results folder: `--out` (which must be absent or empty), else a dated one in results/
/// named `<command>-<date>-<time>`.
pub fn results_dir(out: Option<&Path>, command: &str) -> anyhow::Result<PathBuf> {
    let dir = match out {
        Some(dir) => {
            let is_empty = || std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_none());
            if dir.exists() && !is_empty() {
                anyhow::bail!(
                    "{} exists and is not empty; give a new folder to --out",
                    dir.display()
                );
            }
            dir.to_path_buf()
        }
        None => {
            let stamp = chrono::Local::now().format("%Y%m%d-%H%M%S");
            let base = PathBuf::from("results").join(format!("{command}-{stamp}"));
            let mut dir = base.clone();
            let mut n = 2;
            while dir.exists() {
                dir = PathBuf::from(format!("{}-{n}", base.display()));
                n += 1;
            }
            dir
        }
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

/// Raised by Ctrl-C: a long run stops after `what` is done and writes what it measured; a
/// second Ctrl-C quits at once.
pub fn stop_on_ctrl_c(what: &'static str) -> anyhow::Result<&'static AtomicBool> {
    static STOP: AtomicBool = AtomicBool::new(false);
    ctrlc::set_handler(move || {
        if STOP.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\nStopping after {what} (Ctrl-C again quits at once).");
    })
    .context("cannot install the Ctrl-C handler")?;
    Ok(&STOP)
}

impl ModelArgs {
    pub fn load(&self) -> anyhow::Result<kvlab::runtime::LoadedModel> {
        kvlab::runtime::set_threads(self.threads)?;
        let cuda = kvlab::backend::cuda::CudaOptions {
            graphs: !self.no_graphs,
            programmatic_launch: self.pdl,
            ..Default::default()
        };
        let opts = kvlab::runtime::LoadOptions {
            weight_dtype: self.weight_dtype,
        };
        let mut loaded = kvlab::runtime::load(self.model.as_deref(), self.backend, cuda, opts)?;
        loaded
            .generator
            .set_kv_options(kvlab::generate::KvOptions {
                dtype: self.kv_dtype,
                budget_bytes: self.kv_budget,
                policy: self.kv_policy,
            })?;
        Ok(loaded)
    }
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    #[test]
    fn sizes_parse_with_and_without_units() {
        assert_eq!(parse_bytes("1000"), Ok(1000));
        assert_eq!(parse_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("1.5 GB"), Ok(1_500_000_000));
        assert_eq!(parse_bytes("2gib"), Ok(2 << 30));
        assert!(parse_bytes("12 parsecs")
            .unwrap_err()
            .contains("unknown unit"));
        assert!(parse_bytes("MiB").unwrap_err().contains("not a size"));
        assert!(parse_bytes("0").is_err());
    }
}
