//! candle-peer: prefill / greedy-decode throughput of a Llama checkpoint run with
//! Hugging Face candle (candle-transformers' `models::llama`) on the CPU, for
//! comparison with kvlab. See README.md.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::llama::{Cache, Llama, LlamaConfig};

struct Args {
    model: PathBuf,
    dtype: DType,
    dtype_name: String,
    prompt_len: usize,
    new_tokens: usize,
    reps: usize,
    threads: usize,
}

fn usage() -> &'static str {
    "usage: candle-peer --model DIR --dtype f32|bf16 [--prompt-len 128] [--new-tokens 64] \
     [--reps 1] [--threads 2]"
}

fn parse_args() -> Result<Args> {
    let mut model = None;
    let mut dtype_name = String::from("f32");
    let mut prompt_len = 128usize;
    let mut new_tokens = 64usize;
    let mut reps = 1usize;
    let mut threads = 2usize;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            println!("{}", usage());
            std::process::exit(0);
        }
        let value = it
            .next()
            .with_context(|| format!("missing value for {flag}\n{}", usage()))?;
        match flag.as_str() {
            "--model" => model = Some(PathBuf::from(value)),
            "--dtype" => dtype_name = value,
            "--prompt-len" => prompt_len = value.parse().context("--prompt-len")?,
            "--new-tokens" => new_tokens = value.parse().context("--new-tokens")?,
            "--reps" => reps = value.parse().context("--reps")?,
            "--threads" => threads = value.parse().context("--threads")?,
            other => bail!("unknown flag {other}\n{}", usage()),
        }
    }
    let dtype = match dtype_name.as_str() {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        other => bail!("unsupported --dtype {other} (f32 or bf16)"),
    };
    if prompt_len == 0 || reps == 0 || threads == 0 {
        bail!("--prompt-len, --reps and --threads must be > 0");
    }
    Ok(Args {
        model: model.with_context(|| format!("--model is required\n{}", usage()))?,
        dtype,
        dtype_name,
        prompt_len,
        new_tokens,
        reps,
        threads,
    })
}

/// Pin candle's CPU parallelism to `n` threads. Must run before any tensor work.
///
/// candle-core 0.11 has three places that decide a thread count, all read lazily:
/// * `utils::get_num_threads()` reads `RAYON_NUM_THREADS` (default: physical cores)
///   on every call; the CPU matmul passes it to gemm as `Parallelism::Rayon(n)`.
/// * the barrier pool used by large element-wise ops is sized once from
///   `CANDLE_NUM_THREADS` (falling back to `RAYON_NUM_THREADS`), n-1 workers + caller.
/// * rayon's global pool (used by gemm's `par_for_each`, softmax, etc.) reads
///   `RAYON_NUM_THREADS` when first used; we also build it explicitly.
fn pin_threads(n: usize) -> Result<()> {
    // Edition 2021: set_var is safe; we are still single-threaded here.
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    std::env::set_var("CANDLE_NUM_THREADS", n.to_string());
    candle_core::utils::init_global_threadpool();
    let got = candle_core::utils::get_num_threads();
    if got != n {
        bail!("candle reports {got} threads, wanted {n}");
    }
    Ok(())
}

fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index_path = dir.join("model.safetensors.index.json");
    let index: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&index_path).with_context(|| format!("reading {index_path:?}"))?,
    )?;
    let map = index["weight_map"]
        .as_object()
        .context("index.json has no weight_map object")?;
    let files: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
    if files.is_empty() {
        bail!("empty weight_map in {index_path:?}");
    }
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

fn argmax(v: &[f32]) -> u32 {
    // First maximum wins (same tie-breaking as torch.argmax).
    let mut best = 0usize;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Forward `ids` at `pos`; returns the last position's logits as host f32.
fn step(model: &Llama, ids: &[u32], pos: usize, cache: &mut Cache, dev: &Device) -> Result<Vec<f32>> {
    let input = Tensor::new(ids, dev)?.unsqueeze(0)?;
    let logits = model.forward(&input, pos, cache)?; // (1, vocab), f32
    Ok(logits.squeeze(0)?.to_vec1::<f32>()?)
}

fn main() -> Result<()> {
    let args = parse_args()?;
    pin_threads(args.threads)?;
    let dev = Device::Cpu;

    let cfg_path = args.model.join("config.json");
    let llama_cfg: LlamaConfig = serde_json::from_slice(
        &std::fs::read(&cfg_path).with_context(|| format!("reading {cfg_path:?}"))?,
    )
    .with_context(|| format!("parsing {cfg_path:?}"))?;
    let cfg = llama_cfg.into_config(false);
    if cfg.hidden_size % cfg.num_attention_heads != 0 {
        bail!("hidden_size not divisible by num_attention_heads");
    }
    let files = safetensors_files(&args.model)?;
    let t_load = Instant::now();
    // SAFETY: the checkpoint files are not modified while mapped.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, args.dtype, &dev)? };
    let model = Llama::load(vb, &cfg)?;
    eprintln!(
        "candle-peer: threads={} (candle get_num_threads={}, rayon pool={}) dtype={} layers={} \
         hidden={} vocab={} load={:.2}s files={}",
        args.threads,
        candle_core::utils::get_num_threads(),
        rayon::current_num_threads(),
        args.dtype_name,
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.vocab_size,
        t_load.elapsed().as_secs_f64(),
        files.len()
    );

    // The prompt of kvlab's benches/model.rs: ordinary ids spread over the vocabulary
    // (the final `% vocab_size` only matters for the tiny test checkpoints).
    let prompt: Vec<u32> = (0..args.prompt_len)
        .map(|i| ((1000 + (i * 7919) % 20000) % cfg.vocab_size) as u32)
        .collect();
    if args.prompt_len + args.new_tokens >= cfg.max_position_embeddings {
        bail!("prompt_len + new_tokens exceeds max_position_embeddings");
    }

    for rep in 0..args.reps {
        // Fresh KV cache per rep (built outside the timed region: it precomputes
        // the rope tables for max_position_embeddings positions).
        let mut cache = Cache::new(true, args.dtype, &cfg, &dev)?;

        let t0 = Instant::now();
        let logits = step(&model, &prompt, 0, &mut cache, &dev)?;
        let mut next = argmax(&logits);
        let prefill_s = t0.elapsed().as_secs_f64();

        // Greedy decode: the prefill's argmax is the first generated token; each of
        // the `new_tokens` steps feeds the latest token at its position and yields one
        // more, so `generated` ends with new_tokens + 1 ids (its first N are what a
        // generate with max-new-tokens N returns).
        let mut generated = Vec::with_capacity(args.new_tokens + 1);
        generated.push(next);
        let t1 = Instant::now();
        for k in 0..args.new_tokens {
            let logits = step(&model, &[next], args.prompt_len + k, &mut cache, &dev)?;
            next = argmax(&logits);
            generated.push(next);
        }
        let decode_s = t1.elapsed().as_secs_f64();

        let line = serde_json::json!({
            "rep": rep,
            "dtype": args.dtype_name,
            "threads": args.threads,
            "prompt_tokens": args.prompt_len,
            "new_tokens": args.new_tokens,
            "prefill_seconds": prefill_s,
            "decode_seconds": decode_s,
            "prefill_tokens_per_second": args.prompt_len as f64 / prefill_s,
            "decode_tokens_per_second": if decode_s > 0.0 { args.new_tokens as f64 / decode_s } else { 0.0 },
            "generated_ids": generated,
        });
        println!("{line}");
    }
    Ok(())
}
