//! The CUDA backend on a GPU, each number beside its bound. One command on a GPU machine:
//! `scripts/bench-cuda.sh` (NVRTC from .cuda-tools/ if the machine has none, then
//! `cargo bench --bench cuda`). With `KVLAB_BENCH_QUICK` it is a smoke run on the GPU (tiny
//! shapes, the tiny fixture model). Without a CUDA device it says once that it was skipped and
//! why: the emulator runs every kernel in the tests, but is never timed.
//!
//! Napkin math for Llama-3.2-1B in bf16: a decode step streams every weight once,
//! 1.236e9 parameters x 2 bytes = 2.47 GB (the tied embedding doubles as lm_head: 0.53 GB of it).
//! At the H100 SXM's 3.35 TB/s that is 0.74 ms, so 1,355 tokens/s is the bandwidth bound and the
//! target (75 % of it) is about 1,000 tokens/s. The bound used below is the device's published
//! HBM bandwidth when known (else `KVLAB_PEAK_GBPS`, else a measured device-to-device copy).
//!
//! Sections:
//! 1. decode matvec alone, per Llama shape: GB/s and share of the bound;
//! 2. prefill matmul (tensor cores) per shape: TFLOP/s, and cuBLAS (bf16 in, f32 compute) on the
//!    same shapes for the ratio (target: half of cuBLAS or better);
//! 3. generation on a Llama-3.2-1B-shaped model (random weights, or `KVLAB_BENCH_MODEL`):
//!    decode tokens/s with and without graphs for the static and dynamic caches, device time per
//!    step from CUDA events, share of the bandwidth bound; prefill time for 512 and 2048 tokens.

use anyhow::Result;
use half::bf16;
use kvlab::backend::cuda::gpu::cuda_device_present;
use kvlab::backend::cuda::{open_device, BackendKind, CudaBackend, CudaOptions, Device};
use kvlab::backend::Backend;
use kvlab::generate::{Engine, GenerateOptions, Generator};
use kvlab::kv::Strategy;
use kvlab::model::forward::Model;
use kvlab::roofline::Spread;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What one run measures: the real plan on a GPU, or the smoke plan on the emulator.
struct Plan {
    /// Repetitions per timed kernel shape.
    reps: usize,
    /// (what, n, k, f32 output) of the decode matvec and the prefill matmul.
    shapes: Vec<(&'static str, usize, usize, bool)>,
    /// The matvec launches that share one input: (what, widths, k).
    fused: Vec<(&'static str, Vec<usize>, usize)>,
    prefill_rows: Vec<usize>,
    copy_bytes: usize,
    new_tokens: usize,
    prompt_lens: Vec<usize>,
    /// A checkpoint folder; None: Llama-3.2-1B's shapes with random weights.
    model: Option<PathBuf>,
}

impl Plan {
    /// Llama-3.2-1B: hidden 2048, intermediate 8192, 32 / 8 heads of 64, vocabulary 128256.
    fn gpu() -> Plan {
        Plan {
            reps: 20,
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
            copy_bytes: 1 << 30,
            new_tokens: 256,
            prompt_lens: vec![512, 2048],
            model: std::env::var_os("KVLAB_BENCH_MODEL").map(PathBuf::from),
        }
    }

    fn smoke() -> Plan {
        Plan {
            reps: 2,
            shapes: vec![
                ("q_proj-like", 256, 256, false),
                ("k_proj-like", 64, 256, false),
                ("down_proj-like", 256, 512, false),
                ("lm_head-like (f32 out)", 1000, 256, true),
            ],
            fused: vec![("q + k + v-like (one launch)", vec![256, 64, 64], 256)],
            prefill_rows: vec![16, 130],
            copy_bytes: 1 << 20,
            new_tokens: 8,
            prompt_lens: vec![40],
            model: Some(
                Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama3-gqa4-bf16"),
            ),
        }
    }
}

fn main() -> Result<()> {
    let quick = std::env::var_os("KVLAB_BENCH_QUICK").is_some();
    if !cuda_device_present() {
        // The emulator is for tests (tests/cuda_kernels.rs runs every kernel on it), never timed.
        println!(
            "CUDA benches skipped: no CUDA driver or no CUDA device on this machine; run \
             scripts/bench-cuda.sh on a GPU machine"
        );
        return Ok(());
    }
    let device = open_device(BackendKind::Cuda)?;
    let plan = if quick { Plan::smoke() } else { Plan::gpu() };
    println!("device: {}", device.describe());
    let copy_gbps = copy_bandwidth_gbps(device.as_ref(), &plan)?;
    let (bound_gbps, source) = match (
        std::env::var("KVLAB_PEAK_GBPS")
            .ok()
            .and_then(|v| v.parse::<f64>().ok()),
        published_bandwidth_gbps(&device.describe()),
    ) {
        (Some(gbps), _) => (gbps, "KVLAB_PEAK_GBPS"),
        (None, Some(gbps)) => (gbps, "published HBM bandwidth"),
        (None, None) => (copy_gbps, "measured copy bandwidth"),
    };
    println!(
        "bandwidth bound: {bound_gbps:.0} GB/s ({source}); device-to-device copy reaches {copy_gbps:.0} GB/s\n"
    );
    decode_matvec(&device, &plan, bound_gbps)?;
    prefill_matmul(&device, &plan)?;
    generation(&device, &plan, bound_gbps)?;
    Ok(())
}

/// HBM bandwidth of common data-centre GPUs, by the name the driver reports.
fn published_bandwidth_gbps(name: &str) -> Option<f64> {
    let table: [(&str, f64); 8] = [
        ("H200", 4800.0),
        ("H100 NVL", 3900.0),
        ("H100 PCIe", 2000.0),
        ("H100", 3350.0),
        ("A100-SXM4-80GB", 2039.0),
        ("A100 80GB PCIe", 1935.0),
        ("A100", 1555.0),
        ("L40S", 864.0),
    ];
    table
        .iter()
        .find(|(key, _)| name.contains(key))
        .map(|&(_, gbps)| gbps)
}

/// Event-timed milliseconds of one call of `work`, averaged over `reps` after a warm-up.
fn time_ms(device: &dyn Device, reps: usize, mut work: impl FnMut() -> Result<()>) -> Result<f64> {
    work()?;
    device.synchronize()?;
    let start = device.record_event()?;
    for _ in 0..reps {
        work()?;
    }
    let end = device.record_event()?;
    Ok(device.elapsed_ms(&start, &end)? as f64 / reps as f64)
}

fn copy_bandwidth_gbps(device: &dyn Device, plan: &Plan) -> Result<f64> {
    let bytes = plan.copy_bytes;
    let (src, dst) = (device.alloc(bytes)?, device.alloc(bytes)?);
    device.memset_zero(&src, 0, bytes)?;
    let ms = time_ms(device, plan.reps, || {
        device.copy_dtod(&src, 0, &dst, 0, bytes)
    })?;
    // A copy reads and writes every byte.
    Ok(2.0 * bytes as f64 / (ms * 1e-3) / 1e9)
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

fn decode_matvec(device: &Arc<dyn Device>, plan: &Plan, bound_gbps: f64) -> Result<()> {
    println!("1. decode matvec (one row), {} launches each", plan.reps);
    println!(
        "{:<24} {:>8} {:>6} {:>10} {:>9} {:>8}",
        "shape", "n", "k", "us", "GB/s", "bound"
    );
    let backend = CudaBackend::new(device.clone(), "cuda", CudaOptions::default())?;
    let report = |name: &str, n: usize, k: usize, us: f64| {
        let gbps = (n * k * 2) as f64 / (us * 1e-6) / 1e9;
        println!(
            "{name:<24} {n:>8} {k:>6} {us:>10.1} {gbps:>9.0} {:>7.0}%",
            100.0 * gbps / bound_gbps
        );
    };
    for (i, &(name, n, k, f32_out)) in plan.shapes.iter().enumerate() {
        let w = backend.upload_matrix_bf16(name, n, k, &random_bf16_bits(n * k, 0.05, i as u64))?;
        let x = backend.upload_tensor(1, k, &vec![0.5; k])?;
        let mut out = if f32_out {
            backend.alloc_precise(1, n)?
        } else {
            backend.alloc(1, n)?
        };
        let ms = time_ms(device.as_ref(), plan.reps, || {
            backend.matmul(&x, &w, 1, &mut out)
        })?;
        report(name, n, k, ms * 1e3);
    }
    // The fused launches the forward pass issues: q, k, v together and gate, up together.
    for (name, widths, k) in &plan.fused {
        let k = *k;
        let weights: Vec<_> = widths
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                backend.upload_matrix_bf16(
                    name,
                    n,
                    k,
                    &random_bf16_bits(n * k, 0.05, 10 + i as u64),
                )
            })
            .collect::<Result<_>>()?;
        let mut outs: Vec<_> = widths
            .iter()
            .map(|&n| backend.alloc(1, n))
            .collect::<Result<_>>()?;
        let x = backend.upload_tensor(1, k, &vec![0.5; k])?;
        let ms = time_ms(device.as_ref(), plan.reps, || {
            let mut targets: Vec<_> = weights.iter().zip(outs.iter_mut()).collect();
            backend.matmul_many(&x, &mut targets, 1)
        })?;
        report(name, widths.iter().sum(), k, ms * 1e3);
    }
    println!();
    Ok(())
}

fn prefill_matmul(device: &Arc<dyn Device>, plan: &Plan) -> Result<()> {
    println!("2. prefill matmul out[m, n] = a[m, k] . w[n, k]^T (bf16 in, f32 accumulate)");
    println!(
        "{:<24} {:>6} {:>8} {:>6} {:>10} {:>10} {:>8}",
        "shape", "m", "n", "k", "kvlab TF/s", "cuBLAS TF/s", "ratio"
    );
    let backend = CudaBackend::new(device.clone(), "cuda", CudaOptions::default())?;
    // cudarc panics when it cannot load libcuda or libcublas: catch it quietly, say so below.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let blas = std::panic::catch_unwind(|| CublasBench::new(plan.reps))
        .map_err(|_| anyhow::anyhow!("libcuda or libcublas could not be loaded"))
        .and_then(|b| b);
    std::panic::set_hook(hook);
    if let Err(e) = &blas {
        println!("(cuBLAS unavailable: {e:#}; kvlab numbers only)");
    }
    for (i, &(name, n, k, f32_out)) in plan.shapes.iter().enumerate() {
        let w_bits = random_bf16_bits(n * k, 0.05, 100 + i as u64);
        let w = backend.upload_matrix_bf16(name, n, k, &w_bits)?;
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
            let ms = time_ms(device.as_ref(), plan.reps, || {
                backend.matmul(&a, &w, m, &mut out)
            })?;
            let flops = 2.0 * (m * n * k) as f64;
            let ours = flops / (ms * 1e-3) / 1e12;
            let theirs = match &blas {
                Ok(blas) => Some(blas.tflops(m, n, k, &a_bits, &w_bits, f32_out)?),
                Err(_) => None,
            };
            println!(
                "{name:<24} {m:>6} {n:>8} {k:>6} {ours:>10.2} {:>10} {:>8}",
                theirs.map_or("-".into(), |t| format!("{t:.2}")),
                theirs.map_or("-".into(), |t| format!("{:.2}", ours / t)),
            );
        }
    }
    println!();
    Ok(())
}

/// cuBLAS through cudarc on the device's primary context, its own stream.
struct CublasBench {
    stream: Arc<cudarc::driver::CudaStream>,
    blas: cudarc::cublas::CudaBlas,
    reps: usize,
}

impl CublasBench {
    fn new(reps: usize) -> Result<Self> {
        let ctx = cudarc::driver::CudaContext::new(0)?;
        let stream = ctx.default_stream();
        let blas = cudarc::cublas::CudaBlas::new(stream.clone())?;
        Ok(CublasBench { stream, blas, reps })
    }

    /// TFLOP/s of out[m, n] = a[m, k] . w[n, k]^T. Column-major, that is
    /// out^T[n, m] = w[n, k] . a^T[k, m]: gemm(T, N) with w as the first operand.
    fn tflops(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a_bits: &[u16],
        w_bits: &[u16],
        f32_out: bool,
    ) -> Result<f64> {
        use cudarc::cublas::sys::{
            cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType,
        };
        use cudarc::driver::{DevicePtr, DevicePtrMut};
        let a = self.stream.clone_htod(a_bits)?;
        let w = self.stream.clone_htod(w_bits)?;
        let mut out = self.stream.alloc_zeros::<u32>(m * n)?;
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (a_ptr, _a_sync) = a.device_ptr(&self.stream);
        let (w_ptr, _w_sync) = w.device_ptr(&self.stream);
        let (out_ptr, _out_sync) = out.device_ptr_mut(&self.stream);
        let out_type = if f32_out {
            cudaDataType::CUDA_R_32F
        } else {
            cudaDataType::CUDA_R_16BF
        };
        let gemm = || -> Result<()> {
            // SAFETY: the pointers address live allocations of the sizes gemm reads and writes.
            unsafe {
                cudarc::cublas::result::gemm_ex(
                    *self.blas.handle(),
                    cublasOperation_t::CUBLAS_OP_T,
                    cublasOperation_t::CUBLAS_OP_N,
                    n as i32,
                    m as i32,
                    k as i32,
                    (&alpha as *const f32).cast(),
                    w_ptr as *const std::ffi::c_void,
                    cudaDataType::CUDA_R_16BF,
                    k as i32,
                    a_ptr as *const std::ffi::c_void,
                    cudaDataType::CUDA_R_16BF,
                    k as i32,
                    (&beta as *const f32).cast(),
                    out_ptr as *mut std::ffi::c_void,
                    out_type,
                    n as i32,
                    cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )?;
            }
            Ok(())
        };
        gemm()?;
        self.stream.synchronize()?;
        let timing = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let start = self.stream.record_event(timing)?;
        for _ in 0..self.reps {
            gemm()?;
        }
        let end = self.stream.record_event(timing)?;
        let ms = start.elapsed_ms(&end)? as f64 / self.reps as f64;
        Ok(2.0 * (m * n * k) as f64 / (ms * 1e-3) / 1e12)
    }
}

/// A folder with Llama-3.2-1B's config and random bf16 weights of its exact shapes.
fn generation(device: &Arc<dyn Device>, plan: &Plan, bound_gbps: f64) -> Result<()> {
    let dir: PathBuf = match &plan.model {
        Some(dir) => dir.clone(),
        None => kvlab::model::synth::default_model_dir()?,
    };
    println!("3. generation, {}", dir.display());
    let backend = CudaBackend::new(device.clone(), "cuda", CudaOptions::default())?;
    let model = Model::load(&backend, &dir)?;
    let bytes_per_token = model.weight_bytes_per_token as f64;
    println!(
        "weights read per token: {:.3} GB -> bound {:.0} tokens/s",
        bytes_per_token / 1e9,
        bound_gbps * 1e9 / bytes_per_token
    );
    let mut engine = Engine::new(backend, model);
    println!(
        "{:<8} {:<7} {:>12} {:>15} {:>15} {:>8}",
        "cache", "graphs", "wall tok/s", "device us/step", "device tok/s", "bound"
    );
    let vocab = engine.model.config.vocab_size as u32;
    let prompt: Vec<u32> = (0..16).map(|i| (1000 + i) % vocab).collect();
    for strategy in [Strategy::Static, Strategy::Dynamic] {
        for graphs in [true, false] {
            engine.backend.set_graphs(graphs);
            let opts = GenerateOptions {
                max_new_tokens: plan.new_tokens,
                strategy,
                ignore_eos: true,
                ..Default::default()
            };
            let gen = engine.generate(&prompt, &opts, &mut |_| {})?;
            // Skip the prefill and the first steps (graph capture).
            let steps = &gen.device_step_seconds[gen.device_step_seconds.len().min(4)..];
            let step = Spread::of(steps).median;
            println!(
                "{:<8} {:<7} {:>12.0} {:>15.1} {:>15.0} {:>7.0}%",
                strategy.name(),
                if graphs { "on" } else { "off" },
                gen.decode_tokens_per_second(),
                step * 1e6,
                1.0 / step,
                100.0 * bytes_per_token / step / (bound_gbps * 1e9)
            );
        }
    }
    engine.backend.set_graphs(true);
    for &prompt_len in &plan.prompt_lens {
        let prompt: Vec<u32> = (0..prompt_len as u32).map(|i| (1000 + i) % vocab).collect();
        let opts = GenerateOptions {
            max_new_tokens: 1,
            strategy: Strategy::Static,
            ignore_eos: true,
            ..Default::default()
        };
        let gen = engine.generate(&prompt, &opts, &mut |_| {})?;
        let seconds = gen.device_step_seconds.first().copied().unwrap_or(f64::NAN);
        println!(
            "prefill of {prompt_len} tokens: {:.2} ms on the device, {:.0} tokens/s",
            seconds * 1e3,
            prompt_len as f64 / seconds
        );
    }
    println!("graphs: {:?}", engine.backend.graph_stats());
    println!("memory: {:?}", engine.backend.memory_report()?);
    Ok(())
}
