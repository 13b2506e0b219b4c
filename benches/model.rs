//! Whole-model throughput on the CPU: prefill tokens/s, decode tokens/s, and decode as a share of
//! this machine's measured read bandwidth (bytes of weights + KV read per token / time per token).
//!
//! `cargo bench --bench model` runs the synthetic Llama-3.2-1B (written once into kvlab's cache)
//! and SmolLM2-135M-Instruct (installed by scripts/fetch-models.sh; skipped with a line when
//! absent) with its Q4_1 tensors dequantized to f32 and to bf16. `KVLAB_BENCH_QUICK=1` runs a
//! tiny synthetic model and a few SmolLM2 tokens instead, as a smoke test.

use kvlab::backend::cuda::BackendKind;
use kvlab::generate::GenerateOptions;
use kvlab::kv::Strategy;
use kvlab::model::hub::InstalledModel;
use kvlab::model::synth::{write_synthetic, Preset, SynthOptions};
use kvlab::model::DType;
use kvlab::roofline::{host_read_bandwidth, Spread};
use kvlab::runtime::LoadOptions;

struct Shape {
    prompt_len: usize,
    new_tokens: usize,
    reps: usize,
}

fn main() -> anyhow::Result<()> {
    let quick = std::env::var_os("KVLAB_BENCH_QUICK").is_some();
    // The thread pool as `kvlab` starts it (this thread is one of its workers).
    kvlab::runtime::set_threads(None)?;
    let shape = if quick {
        Shape {
            prompt_len: 16,
            new_tokens: 8,
            reps: 2,
        }
    } else {
        Shape {
            prompt_len: 128,
            new_tokens: 64,
            reps: 3,
        }
    };
    let bandwidth = host_read_bandwidth(
        if quick { 64 << 20 } else { 1 << 30 },
        if quick { 2 } else { 5 },
    )?;
    println!(
        "measured read bandwidth: {:.1} GB/s median (min {:.1}, max {:.1}, {} passes)",
        bandwidth.median, bandwidth.min, bandwidth.max, bandwidth.samples
    );
    let tiny_dir = tempfile::tempdir()?;
    let synthetic = if quick {
        let dir = tiny_dir.path().join("tiny");
        write_synthetic(
            &SynthOptions {
                preset: Preset::Tiny,
                seed: 0,
            },
            &dir,
        )?;
        Some(dir.to_string_lossy().to_string())
    } else {
        None
    };
    bench(
        synthetic.as_deref(),
        LoadOptions::default(),
        &shape,
        &bandwidth,
    )?;

    let smollm2 = InstalledModel::by_name("smollm2-135m-instruct").expect("a known model");
    if smollm2.resolve().is_err() {
        println!(
            "\nsmollm2-135m-instruct: skipped, not installed (scripts/fetch-models.sh installs it)"
        );
        return Ok(());
    }
    for dtype in [DType::F32, DType::BF16] {
        let opts = LoadOptions {
            weight_dtype: Some(dtype),
        };
        bench(Some(smollm2.name), opts, &shape, &bandwidth)?;
    }
    Ok(())
}

fn bench(
    model: Option<&str>,
    opts: LoadOptions,
    shape: &Shape,
    bandwidth: &Spread,
) -> anyhow::Result<()> {
    let mut loaded = kvlab::runtime::load(model, BackendKind::Cpu, Default::default(), opts)?;
    let gen = &mut loaded.generator;
    let info = gen.backend_info();
    let cfg = gen.config().clone();
    println!(
        "\nmodel: {} ({} layers, hidden {}; weights {}; {:.1} MB read per token)",
        loaded.label,
        cfg.num_layers,
        cfg.hidden_size,
        loaded.weights_dtype.as_deref().unwrap_or("as stored"),
        gen.weight_bytes_per_token() as f64 / 1e6
    );
    println!("device: {}", info.device);
    let prompt_len = shape.prompt_len;
    // A prompt of ordinary ids spread over the vocabulary; its content does not change the cost.
    let prompt: Vec<u32> = (0..prompt_len as u32)
        .map(|i| 1000 + (i * 7919) % 20000 % cfg.vocab_size as u32)
        .collect();
    println!("\n| cache | prefill tok/s ({prompt_len} tokens) | decode tok/s | decode GB/s | share of bandwidth |");
    println!("|---|---|---|---|---|");
    for strategy in [Strategy::Dynamic, Strategy::Static] {
        let opts = GenerateOptions {
            max_new_tokens: shape.new_tokens,
            strategy,
            ignore_eos: true,
            ..Default::default()
        };
        gen.generate(&prompt, &opts, &mut |_| {})?; // warm-up
        let mut prefill = Vec::new();
        let mut decode = Vec::new();
        let mut gbps = Vec::new();
        for _ in 0..shape.reps {
            let g = gen.generate(&prompt, &opts, &mut |_| {})?;
            prefill.push(prompt_len as f64 / g.prefill_seconds);
            // Each step reads every weight once and the K/V of every position so far.
            for (i, s) in g.step_seconds.iter().enumerate() {
                let context = prompt_len + i + 1;
                let kv_bytes = context * g.kv.live_bytes as usize / g.kv.tokens.max(1) as usize;
                gbps.push((gen.weight_bytes_per_token() + kv_bytes) as f64 / s / 1e9);
                decode.push(1.0 / s);
            }
        }
        let (p, d, b) = (Spread::of(&prefill), Spread::of(&decode), Spread::of(&gbps));
        println!(
            "| {strategy} | {:.1} ({:.1}..{:.1}) | {:.2} ({:.2}..{:.2}) | {:.1} | {:.0}% |",
            p.median,
            p.min,
            p.max,
            d.median,
            d.min,
            d.max,
            b.median,
            100.0 * b.median / bandwidth.median
        );
    }
    Ok(())
}
