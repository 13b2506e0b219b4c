//! Whole-model throughput on the CPU: prefill tokens/s, decode tokens/s, and decode as a share of
//! this machine's measured read bandwidth (bytes of weights + KV read per token / time per token).
//!
//! `cargo bench --bench model` runs the synthetic Llama-3.2-1B (written once into kvlab's cache)
//! and SmolLM2-135M-Instruct (installed by scripts/fetch-models.sh; skipped with a line when
//! absent) with its Q4_1 tensors dequantized to f32 and to bf16. `KVLAB_BENCH_QUICK=1` runs a
//! tiny synthetic model and a few SmolLM2 tokens instead, as a smoke test.
//!
//! Then, for the first model, decode steps of several sequences at once (the batched step of
//! `kvlab serve-bench`): 1, 2, 4, .., 32 sequences at the prompt's context, the batch sizes
//! interleaved round after round (so that a host whose speed drifts slows them all alike), each
//! as tokens/s and as a multiple of one sequence's in the same round.

use kvlab::backend::cuda::BackendKind;
use kvlab::generate::{BatchEntry, GenerateOptions, Generator};
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
    let mut loaded = bench(
        synthetic.as_deref(),
        LoadOptions::default(),
        &shape,
        &bandwidth,
    )?;
    let (batches, rounds): (&[usize], usize) = if quick {
        (&[1, 2], 2)
    } else {
        (&[1, 2, 4, 8, 16, 32], 8)
    };
    batched_decode(loaded.generator.as_mut(), shape.prompt_len, batches, rounds)?;
    drop(loaded);

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

/// A prompt of ordinary ids spread over the vocabulary; its content does not change the cost.
fn prompt(len: usize, vocab: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| 1000 + (i * 7919) % 20000 % vocab as u32)
        .collect()
}

/// Prefill and decode of one sequence per strategy; returns the loaded model.
fn bench(
    model: Option<&str>,
    opts: LoadOptions,
    shape: &Shape,
    bandwidth: &Spread,
) -> anyhow::Result<kvlab::runtime::LoadedModel> {
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
    let prompt = prompt(prompt_len, cfg.vocab_size);
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
    Ok(loaded)
}

/// Decode steps of `batches` sequences at a time (paged pool, chunks of 16): one sequence
/// prefilled with a prompt of `prompt_len` ids, then forked into as many sequences as the
/// largest batch (the forks share its chunks, so attention reads the same K/V; at this context
/// it is a small part of a step, which streams every weight once). Each round runs one step of
/// every batch size, in alternating order.
fn batched_decode(
    gen: &mut dyn Generator,
    prompt_len: usize,
    batches: &[usize],
    rounds: usize,
) -> anyhow::Result<()> {
    let vocab = gen.config().vocab_size;
    let ids = prompt(prompt_len, vocab);
    gen.clear_kv_cache()?;
    let pool = gen.open_kv_pool(Strategy::Dynamic, 16)?;
    let first = pool.new_sequence(None)?;
    let copies = pool.reserve(first, prompt_len)?;
    gen.forward_batch(
        &copies,
        &[BatchEntry {
            seq: first,
            ids: &ids,
        }],
        false,
    )?;
    let largest = batches.iter().copied().max().unwrap_or(1);
    let pool = gen.kv_pool_mut()?;
    let mut seqs = vec![first];
    for _ in 1..largest {
        seqs.push(pool.fork(first)?);
    }
    let token = [ids[0]];
    let step = |gen: &mut dyn Generator, batch: usize| -> anyhow::Result<f64> {
        let pool = gen.kv_pool_mut()?;
        let mut copies = Vec::new();
        for &seq in &seqs[..batch] {
            copies.extend(pool.reserve(seq, 1)?);
        }
        let entries: Vec<BatchEntry> = seqs[..batch]
            .iter()
            .map(|&seq| BatchEntry { seq, ids: &token })
            .collect();
        let started = std::time::Instant::now();
        gen.forward_batch(&copies, &entries, false)?;
        Ok(started.elapsed().as_secs_f64())
    };
    // One unmeasured round: buffers sized, copies-on-write of every fork made.
    for &batch in batches {
        step(gen, batch)?;
    }
    let mut seconds: Vec<Vec<f64>> = vec![Vec::new(); batches.len()];
    for round in 0..rounds {
        let mut order: Vec<usize> = (0..batches.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for i in order {
            seconds[i].push(step(gen, batches[i])?);
        }
    }
    println!(
        "\nDecode steps of several sequences at once (context {prompt_len}, paged pool, {rounds} interleaved rounds):\n"
    );
    println!("| sequences | decode tok/s median (min..max) | step ms median | x one sequence, per round: median (min..max) |");
    println!("|---|---|---|---|");
    for (i, &batch) in batches.iter().enumerate() {
        let rate: Vec<f64> = seconds[i].iter().map(|s| batch as f64 / s).collect();
        let ratio: Vec<f64> = seconds[i]
            .iter()
            .zip(&seconds[0])
            .map(|(s, one)| batch as f64 * one / s)
            .collect();
        let (r, x, ms) = (
            Spread::of(&rate),
            Spread::of(&ratio),
            Spread::of(&seconds[i]),
        );
        println!(
            "| {batch} | {:.2} ({:.2}..{:.2}) | {:.0} | {:.2} ({:.2}..{:.2}) |",
            r.median,
            r.min,
            r.max,
            ms.median * 1e3,
            x.median,
            x.min,
            x.max
        );
    }
    let pool = gen.kv_pool_mut()?;
    for seq in seqs {
        pool.release(seq)?;
    }
    Ok(())
}
