//! The CUDA backend on a GPU, each number beside a bound measured in the same run. On a lent
//! GPU machine (no cargo there) scripts/gpu-run.sh runs this binary as scripts/gpu-bundle.sh
//! built it; where cargo and a GPU meet, `cargo bench --bench cuda` (scripts/bench-cuda.sh).
//! Without a CUDA device it says once that it was skipped and why.
//!
//! Napkin math for Llama-3.2-1B in bf16: a decode step streams every weight once,
//! 1.236e9 parameters x 2 bytes = 2.47 GB (the tied embedding doubles as lm_head: 0.53 GB of it),
//! plus the KV cache: 32 KiB per position (16 layers x 8 heads x 64 x K, V x 2 bytes), 1.07 GB at
//! 32k. At an H200's measured 4.3 TB/s copy bandwidth a step at context 128 takes at least
//! 0.57 ms: 1,740 tokens/s is the bound. The bound of every memory-bound figure below is the
//! device-to-device copy bandwidth measured first (bytes read + bytes written), not a datasheet.
//!
//! Sections, in this order (`KVLAB_BENCH_SECTIONS=decode,attention,matvec,matmul,prefill`,
//! default all; the copy bandwidth always comes first, the others are shares of it):
//! 1. decode: whole decode steps of the model at contexts 128, 1k, 8k, 32k, static cache and
//!    chunks of 16, 64, 256, graphs on and off, runs on the device's ids with and without
//!    programmatic launch, int8 and fp8 caches in runs: wall tokens/s, device time per step (CUDA
//!    events around the step's device work), share of the copy bandwidth;
//! 2. attention: decode attention of one layer at 8k and 32k positions, contiguous vs chunks of
//!    16, 64 and 256, bf16 vs int8 vs fp8 e4m3 KV (a quarter of the bytes plus the scales), over
//!    caches rotating through more than 4x the L2;
//! 3. matvec: the decode matvec alone per Llama shape, rotating over copies of each weight that
//!    together span over 4x the L2 (at least 4 copies), so that every call reads from memory;
//! 4. matmul: the prefill matmul (tensor cores) per shape, beside cuBLAS (bf16 in, f32 compute)
//!    on the same operands, with the largest difference between the two;
//! 5. prefill: 512 and 2048 prompt tokens.
//!
//! Environment: `KVLAB_BENCH_MODEL` (a checkpoint folder; default the synthetic Llama-3.2-1B,
//! the tiny fixture in quick mode); `KVLAB_BENCH_QUICK=1` (tiny shapes: a smoke run);
//! `KVLAB_BENCH_BACKEND=emu` (the emulator, quick plan: runs every code path of this file, its
//! timings mean nothing); `KVLAB_BENCH_JSON=FILE` (every row, rewritten after each section, so
//! that a run stopped early keeps what it measured; the sections of an earlier run in the file
//! are kept, so that several runs of some sections each fill one file). A section that fails
//! says why and the next one runs; the exit status then says that one failed.

use anyhow::{bail, Context, Result};
use half::bf16;
use kvlab::backend::cuda::cublas::Cublas;
use kvlab::backend::cuda::emu::EmuDevice;
use kvlab::backend::cuda::gpu::{cuda_device_present, GpuDevice};
use kvlab::backend::cuda::{CudaBackend, CudaOptions, Device};
use kvlab::backend::Backend;
use kvlab::generate::{Engine, GenerateOptions, Generator};
use kvlab::kv::{KvDtype, Strategy};
use kvlab::model::config::Config;
use kvlab::model::forward::Model;
use kvlab::roofline::cost;
use kvlab::roofline::fixture::{llama_3_2_1b, DecodeStep, KvRotation, KvShape, ROTATION_BYTES};
use kvlab::roofline::Spread;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// What one run measures: the real plan on a GPU, or the smoke plan.
struct Plan {
    /// Timed samples per figure (after one warm-up).
    samples: usize,
    copy_bytes: usize,
    /// Bytes a rotation of inputs spans at least (raised to 4x the L2 on a GPU).
    rotation_bytes: usize,
    /// (what, n, k, f32 output) of the decode matvec and the prefill matmul.
    shapes: Vec<(&'static str, usize, usize, bool)>,
    /// The matvec launches that share one input: (what, widths, k).
    fused: Vec<(&'static str, Vec<usize>, usize)>,
    prefill_rows: Vec<usize>,
    attention_contexts: Vec<usize>,
    layouts: Vec<KvShape>,
    decode_contexts: Vec<usize>,
    decode_steps: usize,
    prompt_lens: Vec<usize>,
    model: PathBuf,
}

const LAYOUTS: [KvShape; 4] = [
    KvShape::Contiguous,
    KvShape::Chunked(16),
    KvShape::Chunked(64),
    KvShape::Chunked(256),
];

/// Steps run before a decode series is timed: the first is launched, the second captured.
const DECODE_WARMUP: usize = 3;

impl Plan {
    /// Llama-3.2-1B: hidden 2048, intermediate 8192, 32 / 8 heads of 64, vocabulary 128256.
    fn gpu(model: Option<PathBuf>) -> Result<Plan> {
        Ok(Plan {
            samples: 20,
            copy_bytes: 1 << 30,
            rotation_bytes: ROTATION_BYTES,
            shapes: vec![
                ("q_proj, o_proj", 2048, 2048, false),
                ("k_proj, v_proj", 512, 2048, false),
                ("gate_proj, up_proj", 8192, 2048, false),
                ("down_proj", 2048, 8192, false),
                ("lm_head (f32 out)", 128_256, 2048, true),
            ],
            fused: vec![
                ("q + k + v (one launch)", vec![2048, 512, 512], 2048),
                ("gate + up (one launch)", vec![8192, 8192], 2048),
            ],
            prefill_rows: vec![128, 512, 2048, 4096],
            attention_contexts: vec![8192, 32768],
            layouts: LAYOUTS.to_vec(),
            decode_contexts: vec![128, 1024, 8192, 32768],
            decode_steps: 32,
            prompt_lens: vec![512, 2048],
            model: match model {
                Some(dir) => dir,
                None => kvlab::model::synth::default_model_dir()?,
            },
        })
    }

    fn smoke(model: Option<PathBuf>) -> Plan {
        Plan {
            samples: 2,
            copy_bytes: 1 << 20,
            rotation_bytes: 1 << 20,
            shapes: vec![
                ("q_proj-like", 256, 256, false),
                ("k_proj-like", 64, 256, false),
                ("down_proj-like", 256, 512, false),
                ("lm_head-like (f32 out)", 1000, 256, true),
            ],
            fused: vec![("q + k + v-like (one launch)", vec![256, 64, 64], 256)],
            prefill_rows: vec![16, 130],
            attention_contexts: vec![64, 300],
            layouts: LAYOUTS.to_vec(),
            decode_contexts: vec![16, 100],
            decode_steps: 3,
            prompt_lens: vec![40],
            model: model.unwrap_or_else(|| {
                Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama3-gqa4-bf16")
            }),
        }
    }
}

/// The device under test: a GPU (cuBLAS can run beside it) or the emulator.
struct Target {
    device: Arc<dyn Device>,
    gpu: Option<Arc<GpuDevice>>,
    name: &'static str,
}

/// The results so far, written to `KVLAB_BENCH_JSON` after each section.
struct Results {
    path: Option<PathBuf>,
    value: Value,
    failed: Vec<String>,
}

impl Results {
    /// Results added to those already in `path` (an earlier run's other sections).
    fn new(path: Option<PathBuf>, header: Value) -> Results {
        let mut value = path
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|text| serde_json::from_str::<Value>(&text).ok())
            .filter(Value::is_object)
            .unwrap_or_else(|| json!({}));
        for (key, field) in header.as_object().expect("an object") {
            value[key] = field.clone();
        }
        Results {
            path,
            value,
            failed: Vec::new(),
        }
    }

    fn write(&self) -> Result<()> {
        if let Some(path) = &self.path {
            std::fs::write(path, serde_json::to_string_pretty(&self.value)?)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    }

    /// Records a section's rows, or its error (said on stdout; the next section still runs).
    fn section(&mut self, name: &str, rows: Result<Vec<Value>>) -> Result<()> {
        match rows {
            Ok(rows) => self.value[name] = Value::Array(rows),
            Err(error) => {
                println!("section {name} failed: {error:#}\n");
                self.value[name] = json!({ "error": format!("{error:#}") });
                self.failed.push(name.to_string());
            }
        }
        self.write()
    }
}

fn main() -> Result<()> {
    let emulated = std::env::var("KVLAB_BENCH_BACKEND").is_ok_and(|b| b == "emu");
    let quick = emulated || std::env::var_os("KVLAB_BENCH_QUICK").is_some();
    let target = if emulated {
        Target {
            device: Arc::new(EmuDevice::new()?),
            gpu: None,
            name: "emu",
        }
    } else if cuda_device_present() {
        let gpu = Arc::new(GpuDevice::open(0)?);
        Target {
            device: gpu.clone(),
            gpu: Some(gpu),
            name: "cuda",
        }
    } else {
        // The emulator runs every kernel in the tests; timed only as a dry run (see above).
        println!(
            "CUDA benches skipped: no CUDA driver or no CUDA device on this machine; run \
             scripts/gpu-run.sh on a GPU machine (or KVLAB_BENCH_BACKEND=emu for a dry run)"
        );
        return Ok(());
    };
    let model = std::env::var_os("KVLAB_BENCH_MODEL").map(PathBuf::from);
    let mut plan = if quick {
        Plan::smoke(model)
    } else {
        Plan::gpu(model)?
    };
    if let Some(l2) = target.device.l2_cache_bytes() {
        plan.rotation_bytes = plan.rotation_bytes.max(4 * l2);
    }
    let sections: Vec<String> = std::env::var("KVLAB_BENCH_SECTIONS")
        .unwrap_or_else(|_| SECTIONS.join(","))
        .split(',')
        .map(|s| s.trim().to_string())
        .collect();
    let wanted = |name: &str| sections.iter().any(|s| s == name);
    for section in &sections {
        if !SECTIONS.contains(&section.as_str()) {
            bail!("KVLAB_BENCH_SECTIONS: unknown section {section:?} (known: {SECTIONS:?})");
        }
    }
    let device = target.device.as_ref();
    println!("device: {}", device.describe());
    if emulated {
        println!("(the emulator: a dry run of every section; its timings mean nothing)");
    }
    let mut results = Results::new(
        std::env::var_os("KVLAB_BENCH_JSON").map(PathBuf::from),
        json!({
            "device": device.describe(),
            "backend": target.name,
            "quick": quick,
            "date": chrono::Local::now().to_rfc3339(),
        }),
    );
    let copy = copy_bandwidth(device, &plan)?;
    println!(
        "bound: device-to-device copy {:.0} GB/s (median of {}, {:.0}..{:.0}; bytes read + written)\n",
        copy.median, copy.samples, copy.min, copy.max
    );
    // Each run's own bound, kept beside the earlier runs' in the file.
    let mut copies = match results.value.get("copy") {
        Some(Value::Array(rows)) => rows.clone(),
        _ => Vec::new(),
    };
    copies.push(json!({ "gbps": copy, "sections": sections }));
    results.section("copy", Ok(copies))?;
    let bound = copy.median;
    // The model stays loaded from the decode steps to the prefill timings.
    let loaded = if wanted("decode") || wanted("prefill") {
        match load_model(&target, &plan) {
            Ok(loaded) => Some(loaded),
            Err(error) => {
                for section in ["decode", "prefill"].into_iter().filter(|s| wanted(s)) {
                    results.section(section, Err(anyhow::anyhow!("{error:#}")))?;
                }
                None
            }
        }
    } else {
        None
    };
    if let (true, Some((backend, model))) = (wanted("decode"), &loaded) {
        results.section("decode", decode_steps(backend, model, &plan, bound))?;
    }
    if wanted("attention") {
        results.section("attention", decode_attention(&target, &plan, bound))?;
    }
    if wanted("matvec") {
        results.section("matvec", decode_matvec(&target, &plan, bound))?;
    }
    if wanted("matmul") {
        results.section("matmul", prefill_matmul(&target, &plan))?;
    }
    if let (true, Some((backend, model))) = (wanted("prefill"), loaded) {
        results.section("prefill", prefill(backend, model, &plan))?;
    }
    if !results.failed.is_empty() {
        bail!("sections failed: {}", results.failed.join(", "));
    }
    Ok(())
}

const SECTIONS: [&str; 5] = ["decode", "attention", "matvec", "matmul", "prefill"];

/// Seconds per call of `call` (the call's index): `samples` samples of `calls` calls each,
/// timed with device events, after one warm-up sample.
fn time_calls(
    device: &dyn Device,
    samples: usize,
    calls: usize,
    mut call: impl FnMut(usize) -> Result<()>,
) -> Result<Spread> {
    let mut run = |timed: bool| -> Result<Option<f64>> {
        let start = device.record_event()?;
        for i in 0..calls {
            call(i)?;
        }
        let end = device.record_event()?;
        device.synchronize()?;
        let ms = device.elapsed_ms(&start, &end)? as f64;
        Ok(timed.then_some(ms / 1e3 / calls as f64))
    };
    run(false)?;
    let seconds = (0..samples)
        .map(|_| run(true).map(|s| s.expect("timed")))
        .collect::<Result<Vec<_>>>()?;
    Ok(Spread::of(&seconds))
}

/// GB/s of a device-to-device copy (bytes read + bytes written).
fn copy_bandwidth(device: &dyn Device, plan: &Plan) -> Result<Spread> {
    let bytes = plan.copy_bytes;
    let (src, dst) = (device.alloc(bytes)?, device.alloc(bytes)?);
    device.memset_zero(&src, 0, bytes)?;
    let seconds = time_calls(device, plan.samples, 1, |_| {
        device.copy_dtod(&src, 0, &dst, 0, bytes)
    })?;
    let gbps = |s: f64| 2.0 * bytes as f64 / s / 1e9;
    Ok(Spread {
        median: gbps(seconds.median),
        min: gbps(seconds.max),
        max: gbps(seconds.min),
        samples: seconds.samples,
    })
}

fn random_bf16_bits(count: usize, scale: f32, seed: u64) -> Vec<u16> {
    let mut bits = vec![0u16; count];
    bits.par_chunks_mut(1 << 20)
        .enumerate()
        .for_each(|(chunk, out)| {
            let mut rng = SmallRng::seed_from_u64(seed ^ (chunk as u64).wrapping_mul(0x9e37_79b9));
            for b in out {
                *b = bf16::from_f32(rng.random_range(-scale..scale)).to_bits();
            }
        });
    bits
}

/// Copies of one weight group needed for a rotation of `rotation_bytes`: at least 4.
fn copies_for(bytes: usize, rotation_bytes: usize) -> usize {
    rotation_bytes.div_ceil(bytes.max(1)).max(4)
}

fn decode_matvec(target: &Target, plan: &Plan, bound_gbps: f64) -> Result<Vec<Value>> {
    println!(
        "3. decode matvec (one row), rotating over weight copies spanning >= {} MiB",
        plan.rotation_bytes >> 20
    );
    println!(
        "{:<26} {:>8} {:>6} {:>7} {:>10} {:>9} {:>8}",
        "shape", "n", "k", "copies", "us", "GB/s", "of copy"
    );
    let device = target.device.as_ref();
    let backend = CudaBackend::new(target.device.clone(), target.name, CudaOptions::default())?;
    let mut rows = Vec::new();
    // (name, widths of one launch, k, f32 out)
    let groups: Vec<(&str, Vec<usize>, usize, bool)> = plan
        .shapes
        .iter()
        .map(|&(name, n, k, f32_out)| (name, vec![n], k, f32_out))
        .chain(
            plan.fused
                .iter()
                .map(|(name, widths, k)| (*name, widths.clone(), *k, false)),
        )
        .collect();
    for (i, (name, widths, k, f32_out)) in groups.into_iter().enumerate() {
        let bytes: usize = widths.iter().map(|n| n * k * 2).sum();
        let copies = copies_for(bytes, plan.rotation_bytes);
        // One random matrix per width, uploaded into every copy: distinct addresses are what
        // keeps the L2 from serving them.
        let bits: Vec<Vec<u16>> = widths
            .iter()
            .enumerate()
            .map(|(j, &n)| random_bf16_bits(n * k, 0.05, (i * 10 + j) as u64))
            .collect();
        let weights: Vec<Vec<_>> = (0..copies)
            .map(|_| {
                widths
                    .iter()
                    .zip(&bits)
                    .map(|(&n, b)| backend.upload_matrix_bf16(name, n, k, b))
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<_>>()?;
        let mut outs: Vec<_> = widths
            .iter()
            .map(|&n| {
                if f32_out {
                    backend.alloc_precise(1, n)
                } else {
                    backend.alloc(1, n)
                }
            })
            .collect::<Result<_>>()?;
        let x = backend.upload_tensor(1, k, &vec![0.5; k])?;
        let seconds = time_calls(device, plan.samples, copies, |c| {
            let mut targets: Vec<_> = weights[c].iter().zip(outs.iter_mut()).collect();
            backend.matmul_many(&x, &mut targets, 1)
        })?;
        let n: usize = widths.iter().sum();
        let gbps = bytes as f64 / seconds.median / 1e9;
        println!(
            "{name:<26} {n:>8} {k:>6} {copies:>7} {:>10.1} {gbps:>9.0} {:>7.0}%",
            seconds.median * 1e6,
            100.0 * gbps / bound_gbps
        );
        rows.push(json!({
            "shape": name, "n": n, "k": k, "copies": copies, "seconds": seconds,
            "gbps": gbps, "share_of_copy": gbps / bound_gbps,
        }));
    }
    println!();
    Ok(rows)
}

/// cuBLAS on the GPU's stream, when the GPU is there and the library is found.
fn cublas_yardstick(target: &Target) -> Result<(Cublas, Arc<GpuDevice>)> {
    let gpu = target.gpu.clone().context("the emulator has no cuBLAS")?;
    Ok((Cublas::load()?, gpu))
}

fn prefill_matmul(target: &Target, plan: &Plan) -> Result<Vec<Value>> {
    println!("4. prefill matmul out[m, n] = a[m, k] . w[n, k]^T (bf16 in, f32 accumulate)");
    let device = target.device.as_ref();
    let backend = CudaBackend::new(target.device.clone(), target.name, CudaOptions::default())?;
    let yardstick = cublas_yardstick(target);
    match &yardstick {
        Ok((cublas, _)) => println!("yardstick: {}", cublas.describe()),
        Err(e) => println!(
            "yardstick: none ({}); kvlab figures only (scripts/gpu-run.sh times torch.matmul)",
            format!("{e:#}").lines().next().unwrap_or_default()
        ),
    }
    let handle = match &yardstick {
        // SAFETY: the stream is the GPU's own, of the context cu_stream made current.
        Ok((cublas, gpu)) => Some(unsafe { cublas.handle(gpu.cu_stream()?.cast()) }?),
        Err(_) => None,
    };
    println!(
        "{:<24} {:>6} {:>8} {:>6} {:>11} {:>12} {:>7} {:>10}",
        "shape", "m", "n", "k", "kvlab TF/s", "cuBLAS TF/s", "ratio", "max diff"
    );
    let mut rows = Vec::new();
    for (i, &(name, n, k, f32_out)) in plan.shapes.iter().enumerate() {
        let w_bits = random_bf16_bits(n * k, 0.05, 100 + i as u64);
        let w = backend.upload_matrix_bf16(name, n, k, &w_bits)?;
        let w_raw = device.upload(&w_bits)?;
        for &m in &plan.prefill_rows {
            let a_bits = random_bf16_bits(m * k, 1.0, 200 + m as u64);
            let a_values: Vec<f32> = a_bits
                .iter()
                .map(|&b| bf16::from_bits(b).to_f32())
                .collect();
            let a = backend.upload_tensor(m, k, &a_values)?;
            let mut out = if f32_out {
                backend.alloc_precise(m, n)?
            } else {
                backend.alloc(m, n)?
            };
            let seconds = time_calls(device, plan.samples, 1, |_| {
                backend.matmul(&a, &w, m, &mut out)
            })?;
            let flops = 2.0 * (m * n * k) as f64;
            let ours = flops / seconds.median / 1e12;
            let mut theirs = None;
            let mut max_diff = None;
            // The comparison reads both outputs back: at the smallest m of each shape only.
            let compare = m == plan.prefill_rows[0];
            let mut blas_out = None;
            if let Some(handle) = &handle {
                let a_raw = device.upload(&a_bits)?;
                let out_raw = blas_out.insert(device.alloc(m * n * if f32_out { 4 } else { 2 })?);
                let gemm = || {
                    // SAFETY: the buffers hold m*k, n*k and m*n elements of the GPU's context.
                    unsafe {
                        handle.gemm_bf16(
                            (m, n, k),
                            a_raw.ptr(),
                            w_raw.ptr(),
                            out_raw.ptr(),
                            f32_out,
                        )
                    }
                };
                let blas = time_calls(device, plan.samples, 1, |_| gemm())?;
                theirs = Some(flops / blas.median / 1e12);
            }
            if let (Some(out_raw), true) = (&blas_out, compare) {
                // The yardstick computes the same product: its largest difference from kvlab's,
                // relative to the largest output.
                let ours_out = backend.read_rows(&out, 0, m)?;
                let blas_values: Vec<f32> = if f32_out {
                    device.download(out_raw)?
                } else {
                    device
                        .download::<u16>(out_raw)?
                        .iter()
                        .map(|&b| bf16::from_bits(b).to_f32())
                        .collect()
                };
                let scale = blas_values
                    .iter()
                    .fold(0f32, |s, v| s.max(v.abs()))
                    .max(1e-30);
                let diff = kvlab::selftest::fixtures::max_abs_diff(&ours_out, &blas_values)?;
                max_diff = Some(diff / scale);
            }
            println!(
                "{name:<24} {m:>6} {n:>8} {k:>6} {ours:>11.1} {:>12} {:>7} {:>10}",
                theirs.map_or("-".into(), |t| format!("{t:.1}")),
                theirs.map_or("-".into(), |t| format!("{:.2}", ours / t)),
                max_diff.map_or("-".into(), |d| format!("{d:.1e}")),
            );
            rows.push(json!({
                "shape": name, "m": m, "n": n, "k": k, "seconds": seconds,
                "kvlab_tflops": ours, "cublas_tflops": theirs, "relative_max_diff": max_diff,
            }));
        }
    }
    println!();
    Ok(rows)
}

fn decode_attention(target: &Target, plan: &Plan, bound_gbps: f64) -> Result<Vec<Value>> {
    let cfg: Config = llama_3_2_1b()?;
    println!(
        "2. decode attention, one layer, one query row, Llama-3.2-1B heads (32 over 8 KV of 64), \
         caches rotating over >= {} MiB",
        plan.rotation_bytes >> 20
    );
    println!(
        "{:>8} {:<12} {:<9} {:>10} {:>9} {:>8} {:>14} {:>8}",
        "context", "layout", "kv", "us", "GB/s", "of copy", "vs contiguous", "vs bf16"
    );
    let device = target.device.as_ref();
    let backend = CudaBackend::new(target.device.clone(), target.name, CudaOptions::default())?;
    let q_values: Vec<f32> = random_bf16_bits(cfg.q_dim(), 1.0, 7)
        .iter()
        .map(|&b| bf16::from_bits(b).to_f32())
        .collect();
    let q = backend.upload_tensor(1, cfg.q_dim(), &q_values)?;
    let mut out = backend.alloc(1, cfg.q_dim())?;
    let mut rows = Vec::new();
    for &context in &plan.attention_contexts {
        // The first type's (bf16's) time per layout, which the other types are compared with.
        let mut first_type = Vec::new();
        for (type_index, &kv_dtype) in backend.kv_dtypes().iter().enumerate() {
            let mut contiguous = None;
            for (layout_index, &shape) in plan.layouts.iter().enumerate() {
                let mut rotation = KvRotation::new(
                    &backend,
                    &cfg,
                    shape,
                    kv_dtype,
                    context,
                    1,
                    plan.rotation_bytes,
                )?;
                let cost = cost::attention(&cfg, context - 1, 1, kv_dtype);
                let calls = plan
                    .rotation_bytes
                    .div_ceil((cost.bytes as usize).max(1))
                    .max(cfg.num_layers);
                let seconds = time_calls(device, plan.samples, calls, |_| {
                    let (memory, view, layer) = rotation.next_layer();
                    backend.attention(&q, memory, view, layer, cfg.num_heads, &mut out)
                })?;
                let gbps = cost.bytes / seconds.median / 1e9;
                let base = *contiguous.get_or_insert(seconds.median);
                if type_index == 0 {
                    first_type.push(seconds.median);
                }
                let vs_first = seconds.median / first_type[layout_index];
                println!(
                    "{context:>8} {:<12} {:<9} {:>10.1} {gbps:>9.0} {:>7.0}% {:>13.2}x {:>7.2}x",
                    shape.to_string(),
                    kv_dtype.name(),
                    seconds.median * 1e6,
                    100.0 * gbps / bound_gbps,
                    seconds.median / base,
                    vs_first
                );
                rows.push(json!({
                    "context": context, "layout": shape.to_string(), "kv_dtype": kv_dtype.name(),
                    "seconds": seconds, "gbps": gbps, "share_of_copy": gbps / bound_gbps,
                    "time_vs_contiguous": seconds.median / base,
                    "time_vs_bf16": vs_first,
                }));
            }
        }
    }
    println!();
    Ok(rows)
}

/// The plan's model on a backend of the target.
fn load_model(target: &Target, plan: &Plan) -> Result<(CudaBackend, Model<CudaBackend>)> {
    let backend = CudaBackend::new(target.device.clone(), target.name, CudaOptions::default())?;
    let started = Instant::now();
    let model = Model::load(&backend, &plan.model)
        .with_context(|| format!("loading {}", plan.model.display()))?;
    println!(
        "model {} loaded in {:.1} s: {:.3} GB of weights read per token\n",
        plan.model.display(),
        started.elapsed().as_secs_f64(),
        model.weight_bytes_per_token as f64 / 1e9
    );
    Ok((backend, model))
}

/// How a decode row runs: (CUDA graphs, runs on the device's own ids, programmatic launch).
type DecodeMode = (bool, bool, bool);

fn decode_steps(
    backend: &CudaBackend,
    model: &Model<CudaBackend>,
    plan: &Plan,
    bound_gbps: f64,
) -> Result<Vec<Value>> {
    let cfg = &model.config;
    println!(
        "1. decode steps ({steps} timed after {DECODE_WARMUP}; device time from CUDA events \
         around each step's device work; graphs on / off: the host's token and step view copied \
         in before every step; runs{window}: that many steps on the device's own ids between two \
         reads; runs{window}+pdl: the same with programmatic dependent launch; kv: the cache's \
         element type, int8 and fp8 in runs on the first layout)",
        steps = plan.decode_steps,
        window = backend.decode_window()
    );
    println!(
        "{:>8} {:<12} {:<9} {:<10} {:>11} {:>15} {:>13} {:>9} {:>8} {:>12}",
        "context",
        "layout",
        "kv",
        "graphs",
        "wall tok/s",
        "device us/step",
        "device tok/s",
        "GB/s",
        "of copy",
        "replayed"
    );
    let mut rows = Vec::new();
    for &context in &plan.decode_contexts {
        if context + DECODE_WARMUP + plan.decode_steps > cfg.max_position_embeddings {
            println!(
                "{context:>8} skipped: beyond the model's {} positions",
                cfg.max_position_embeddings
            );
            continue;
        }
        // Every layout with the default (bf16) cache: graphs on and off with the host's token and
        // view copied in before every step, then runs of decode_window steps on the device's own
        // ids (as generation decodes), without and with programmatic dependent launch. Then the
        // other element types in runs, on the first layout.
        let (default_type, other_types) =
            backend.kv_dtypes().split_first().context("no KV type")?;
        let all_modes = [
            (true, false, false),
            (false, false, false),
            (true, true, false),
            (true, true, true),
        ];
        let mut cases: Vec<(KvShape, KvDtype, &[DecodeMode])> = plan
            .layouts
            .iter()
            .map(|&shape| (shape, *default_type, &all_modes[..]))
            .collect();
        for &kv_dtype in other_types {
            cases.push((plan.layouts[0], kv_dtype, &all_modes[2..3]));
        }
        for (shape, kv_dtype, modes) in cases {
            let cost = cost::decode_step(cfg, model.weight_bytes_per_token, context, kv_dtype);
            let window = backend.decode_window();
            for &(graphs, runs, pdl) in modes {
                backend.set_graphs(graphs);
                backend.set_programmatic_launch(pdl);
                let drift = DECODE_WARMUP + plan.decode_steps;
                let mut step =
                    DecodeStep::with_drift(backend, model, (shape, kv_dtype), context, drift)?;
                if runs {
                    step.run_on_device(backend, DECODE_WARMUP)?;
                } else {
                    for _ in 0..DECODE_WARMUP {
                        step.run(backend)?;
                    }
                }
                backend.synchronize()?;
                backend.take_step_device_seconds()?;
                let before = backend.graph_stats();
                let mut wall = Vec::with_capacity(plan.decode_steps);
                while wall.len() < plan.decode_steps {
                    let steps = if runs {
                        window.min(plan.decode_steps - wall.len())
                    } else {
                        1
                    };
                    let t = Instant::now();
                    if runs {
                        step.run_on_device(backend, steps)?;
                    } else {
                        step.run(backend)?;
                    }
                    backend.synchronize()?;
                    let seconds = t.elapsed().as_secs_f64() / steps as f64;
                    wall.extend(std::iter::repeat_n(seconds, steps));
                }
                let device = Spread::of(&backend.take_step_device_seconds()?);
                let wall = Spread::of(&wall);
                let replayed = backend.graph_stats().graphs_replayed - before.graphs_replayed;
                let gbps = cost.bytes / device.median / 1e9;
                println!(
                    "{context:>8} {:<12} {:<9} {:<10} {:>11.0} {:>15.1} {:>13.0} {gbps:>9.0} {:>7.0}% {:>12}",
                    shape.to_string(),
                    kv_dtype.name(),
                    match (graphs, runs, pdl) {
                        (true, true, false) => format!("runs{window}"),
                        (true, true, true) => format!("runs{window}+pdl"),
                        (true, false, _) => "on".into(),
                        (false, _, _) => "off".into(),
                    },
                    1.0 / wall.median,
                    device.median * 1e6,
                    1.0 / device.median,
                    100.0 * gbps / bound_gbps,
                    format!("{replayed}/{}", plan.decode_steps),
                );
                rows.push(json!({
                    "context": context, "layout": shape.to_string(), "kv_dtype": kv_dtype.name(),
                    "graphs": graphs,
                    "device_token_runs": runs.then_some(window), "programmatic_launch": pdl,
                    "wall_seconds": wall, "device_seconds": device,
                    "wall_tokens_per_second": 1.0 / wall.median,
                    "device_tokens_per_second": 1.0 / device.median,
                    "bytes_per_step": cost.bytes, "gbps": gbps, "share_of_copy": gbps / bound_gbps,
                    "graphs_replayed": replayed,
                }));
            }
        }
    }
    backend.set_graphs(true);
    backend.set_programmatic_launch(false);
    if let Some(error) = backend.graph_capture_error() {
        println!("graph capture failed (steps ran launch by launch): {error}");
    }
    println!("graphs: {:?}\n", backend.graph_stats());
    Ok(rows)
}

fn prefill(backend: CudaBackend, model: Model<CudaBackend>, plan: &Plan) -> Result<Vec<Value>> {
    println!("5. prefill (static cache, device time of the prompt's forward pass)");
    let mut engine = Engine::new(backend, model);
    let vocab = engine.model.config.vocab_size as u32;
    let mut rows = Vec::new();
    for &prompt_len in &plan.prompt_lens {
        let prompt: Vec<u32> = (0..prompt_len as u32).map(|i| (1000 + i) % vocab).collect();
        let opts = GenerateOptions {
            max_new_tokens: 1,
            strategy: Strategy::Static,
            ignore_eos: true,
            ..Default::default()
        };
        engine.generate(&prompt, &opts, &mut |_| {})?; // warm-up
        let samples = (0..plan.samples.min(5))
            .map(|_| {
                let gen = engine.generate(&prompt, &opts, &mut |_| {})?;
                gen.device_step_seconds
                    .first()
                    .copied()
                    .context("no device time for the prefill")
            })
            .collect::<Result<Vec<_>>>()?;
        let seconds = Spread::of(&samples);
        println!(
            "prefill of {prompt_len} tokens: {:.2} ms on the device, {:.0} tokens/s",
            seconds.median * 1e3,
            prompt_len as f64 / seconds.median
        );
        rows.push(json!({
            "prompt_tokens": prompt_len, "seconds": seconds,
            "tokens_per_second": prompt_len as f64 / seconds.median,
        }));
    }
    println!("memory: {:?}", engine.backend.memory_report()?);
    Ok(rows)
}
