//! `kvlab roofline`: the host's bounds, each CPU op timed alone at Llama-3.2-1B's shapes, and
//! whole decode steps, each as a share of its roofline bound; on a GPU also the device and its
//! measured copy bandwidth (the CUDA ops themselves are timed by `cargo bench --bench ops`).

use super::cost::{self, OpCost};
use super::fixture::{llama_3_2_1b, DecodeStep, KvRotation, KvShape, ROTATION_BYTES};
use super::{host_fma_peak, host_read_bandwidth, Spread};
use crate::backend::cpu::matmul::{matmul, MatRef};
use crate::backend::cpu::{CpuBackend, CpuTensor};
use crate::backend::cuda::{cuda_device_present, open_device, BackendKind};
use crate::backend::Backend;
use crate::model::config::Config;
use crate::model::forward::Model;
use crate::model::synth::{self, Preset, SynthOptions};
use crate::model::DType;
use anyhow::{Context, Result};
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

/// What `kvlab roofline` measures.
#[derive(Clone, Debug, Default)]
pub struct RooflineOptions {
    /// Fewer shapes, fewer and shorter repetitions, and the decode step of the tiny synthetic
    /// model instead of Llama-3.2-1B: a smoke run of a few seconds.
    pub quick: bool,
    /// The model of the decode-step rows; default: the synthetic Llama-3.2-1B.
    pub model: Option<PathBuf>,
}

/// The host's bounds.
#[derive(Clone, Debug, Serialize)]
pub struct HostBounds {
    pub device: String,
    pub threads: usize,
    /// Parallel read bandwidth, GB/s.
    pub read_gbps: Spread,
    /// f32 multiply-add peak, GFLOP/s.
    pub peak_gflops: Spread,
}

impl HostBounds {
    /// The bounds are the best samples: other work on the machine only ever lowers a sample.
    fn bandwidth(&self) -> f64 {
        self.read_gbps.max * 1e9
    }

    fn peak(&self) -> f64 {
        self.peak_gflops.max * 1e9
    }

    /// The best time an op of this cost can take: bound by bytes or by FLOPs, whichever is slower.
    pub fn bound_seconds(&self, cost: &OpCost) -> f64 {
        (cost.bytes / self.bandwidth()).max(cost.flops / self.peak())
    }

    /// FLOPs per byte above which an op is bound by compute.
    pub fn ridge_intensity(&self) -> f64 {
        self.peak() / self.bandwidth()
    }
}

/// One op timed at one shape.
#[derive(Clone, Debug, Serialize)]
pub struct OpTiming {
    /// Op family: matvec, matmul, rms_norm, rope, kv_append, swiglu, attention, decode_step.
    pub op: String,
    /// The shape in words: `q_proj 2048x2048, m=1`, `context 8192, chunk16`.
    pub shape: String,
    pub cost: OpCost,
    /// Seconds per call.
    pub seconds: Spread,
}

impl OpTiming {
    pub fn gbps(&self) -> f64 {
        self.cost.bytes / self.seconds.median / 1e9
    }

    pub fn gflops(&self) -> f64 {
        self.cost.flops / self.seconds.median / 1e9
    }

    /// Share of the roofline bound reached: bound time / measured time.
    pub fn share_of_bound(&self, host: &HostBounds) -> f64 {
        host.bound_seconds(&self.cost) / self.seconds.median
    }
}

/// What the report found of a GPU.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum GpuBounds {
    Absent {
        reason: String,
    },
    Present {
        /// Name, architecture, NVRTC version.
        device: String,
        memory_total_bytes: Option<u64>,
        /// cuMemcpy device to device, GB/s counting the read and the write: the bound of the
        /// memory-bound kernels.
        copy_gbps: Spread,
    },
}

#[derive(Clone, Debug, Serialize)]
pub struct RooflineReport {
    pub host: HostBounds,
    pub gpu: GpuBounds,
    /// What the decode-step rows ran: a folder, or the synthetic preset.
    pub model: String,
    pub ops: Vec<OpTiming>,
}

/// Repetitions and the least time one repetition runs (short ops repeat inside it).
#[derive(Clone, Copy)]
struct Timing {
    reps: usize,
    min_rep_seconds: f64,
}

impl Timing {
    /// Seconds per call of `op`: a warm-up call, then `reps` repetitions of as many calls as
    /// fill `min_rep_seconds`.
    fn measure(&self, mut op: impl FnMut() -> Result<()>) -> Result<Spread> {
        let warm = Instant::now();
        op()?;
        let one = warm.elapsed().as_secs_f64().max(1e-7);
        let calls = ((self.min_rep_seconds / one).ceil() as usize).max(1);
        let mut samples = Vec::with_capacity(self.reps);
        for _ in 0..self.reps {
            let start = Instant::now();
            for _ in 0..calls {
                op()?;
            }
            samples.push(start.elapsed().as_secs_f64() / calls as f64);
        }
        Ok(Spread::of(&samples))
    }
}

/// Measures the host's bounds, times every op and the decode steps.
pub fn run(opts: &RooflineOptions) -> Result<RooflineReport> {
    let backend = CpuBackend::new();
    let host = HostBounds {
        device: backend.info().device,
        threads: rayon::current_num_threads(),
        read_gbps: host_read_bandwidth(
            if opts.quick { 256 << 20 } else { 1 << 30 },
            if opts.quick { 3 } else { 10 },
        )?,
        peak_gflops: host_fma_peak(if opts.quick { 3 } else { 10 }),
    };
    let timing = if opts.quick {
        Timing {
            reps: 3,
            min_rep_seconds: 0.005,
        }
    } else {
        Timing {
            reps: 5,
            min_rep_seconds: 0.05,
        }
    };
    let cfg = llama_3_2_1b()?;
    let mut ops = Vec::new();
    time_matmuls(&cfg, opts.quick, timing, &mut ops)?;
    time_elementwise(&backend, &cfg, opts.quick, timing, &mut ops)?;
    time_attention(&backend, &cfg, opts.quick, timing, &mut ops)?;
    let model = time_decode_steps(&backend, opts, timing, &mut ops)?;
    let gpu = measure_gpu(opts.quick)?;
    Ok(RooflineReport {
        host,
        gpu,
        model,
        ops,
    })
}

/// The GPU's description and its device-to-device copy bandwidth, timed with CUDA events.
fn measure_gpu(quick: bool) -> Result<GpuBounds> {
    if !cuda_device_present() {
        return Ok(GpuBounds::Absent {
            reason: "no CUDA driver or no CUDA device on this machine".into(),
        });
    }
    let device = open_device(BackendKind::Cuda)?;
    let (bytes, reps) = if quick { (256 << 20, 3) } else { (1 << 30, 10) };
    let src = device.alloc(bytes)?;
    let dst = device.alloc(bytes)?;
    device.memset_zero(&src, 0, bytes)?;
    let copy_gbps = || -> Result<f64> {
        let start = device.record_event()?;
        device.copy_dtod(&src, 0, &dst, 0, bytes)?;
        let end = device.record_event()?;
        device.synchronize()?;
        let seconds = f64::from(device.elapsed_ms(&start, &end)?) / 1e3;
        Ok(2.0 * bytes as f64 / seconds / 1e9)
    };
    copy_gbps()?;
    let samples = (0..reps).map(|_| copy_gbps()).collect::<Result<Vec<_>>>()?;
    Ok(GpuBounds::Present {
        device: device.describe(),
        memory_total_bytes: device.memory()?.device_total,
        copy_gbps: Spread::of(&samples),
    })
}

/// Bytes each rotation of inputs spans ([`ROTATION_BYTES`]; a token amount in quick mode): a
/// decode step streams every weight and every layer's KV from memory, none is in cache when its
/// op runs, and neither may it be here.
fn rotation_bytes(quick: bool) -> usize {
    if quick {
        16 << 20
    } else {
        ROTATION_BYTES
    }
}

fn time_matmuls(cfg: &Config, quick: bool, timing: Timing, ops: &mut Vec<OpTiming>) -> Result<()> {
    let (h, kv, ff, vocab) = (
        cfg.hidden_size,
        cfg.kv_dim(),
        cfg.intermediate_size,
        cfg.vocab_size,
    );
    // Decode (m = 1) and a 512-token prefill; m = 16 and 128 are in `benches/cpu_matmul.rs`.
    let ms: &[usize] = if quick { &[1, 16] } else { &[1, 512] };
    // [out, in] of each projection, bf16 as in the checkpoint, and the m it runs at.
    let mut shapes = vec![
        ("q_proj, o_proj", h, h, ms),
        ("k_proj, v_proj", kv, h, ms),
        ("gate_proj, up_proj", ff, h, ms),
        ("down_proj", h, ff, ms),
    ];
    if !quick {
        // Prefill computes the logits of its last row only.
        shapes.push(("lm_head", vocab, h, &[1]));
    }
    for (name, rows, cols, ms) in shapes {
        let bytes_each = rows * cols * DType::BF16.size_bytes();
        let copies = rotation_bytes(quick).div_ceil(bytes_each).max(1);
        // Any bf16 pattern will do: 0x3c3c is 0.0115.
        let weights = vec![0x3cu8; copies * bytes_each];
        for &m in ms {
            // Prefill shapes reuse each weight m times; cache residency no longer matters.
            let x = vec![0.01f32; m * cols];
            let mut out = vec![0.0f32; m * rows];
            let mut next = 0;
            let seconds = timing.measure(|| {
                let w = MatRef {
                    dtype: DType::BF16,
                    rows,
                    cols,
                    data: &weights[next * bytes_each..(next + 1) * bytes_each],
                };
                next = (next + 1) % copies;
                matmul(&x, m, w, &mut out);
                Ok(())
            })?;
            ops.push(OpTiming {
                op: if m == 1 { "matvec" } else { "matmul" }.into(),
                shape: format!("{name} {rows}x{cols}, m={m}"),
                cost: cost::matmul(m, rows, cols, DType::BF16.size_bytes()),
                seconds,
            });
        }
    }
    Ok(())
}

fn time_elementwise(
    backend: &CpuBackend,
    cfg: &Config,
    quick: bool,
    timing: Timing,
    ops: &mut Vec<OpTiming>,
) -> Result<()> {
    let all_rows: &[usize] = if quick { &[1] } else { &[1, 512] };
    for &rows in all_rows {
        let h = cfg.hidden_size;
        let x = tensor(rows, h);
        let mut normed = backend.alloc(rows, h)?;
        let weight = backend.upload_vector(&vec![1.0; h])?;
        let seconds = timing
            .measure(|| backend.rms_norm(&x, &weight, cfg.rms_norm_eps, rows, &mut normed))?;
        ops.push(OpTiming {
            op: "rms_norm".into(),
            shape: format!("rows {rows} x {h}"),
            cost: cost::rms_norm(rows, h),
            seconds,
        });

        let mut q = tensor(rows, cfg.q_dim());
        let mut k = tensor(rows, cfg.kv_dim());
        let inv_freq = backend.upload_vector(&cfg.rope_inv_freq())?;
        let kv_dtype = backend.kv_dtypes()[0];
        let mut rotation = KvRotation::new(
            backend,
            cfg,
            KvShape::Contiguous,
            kv_dtype,
            1024,
            rows,
            rotation_bytes(quick),
        )?;
        let seconds = timing.measure(|| {
            let (memory, view, _) = rotation.next_layer();
            backend.rope(&mut q, &mut k, &inv_freq, memory, view)
        })?;
        ops.push(OpTiming {
            op: "rope".into(),
            shape: format!("rows {rows}, q {} + k {}", cfg.q_dim(), cfg.kv_dim()),
            cost: cost::rope(rows, cfg.q_dim(), cfg.kv_dim()),
            seconds,
        });

        let v = tensor(rows, cfg.kv_dim());
        let seconds = timing.measure(|| {
            let (memory, view, layer) = rotation.next_layer();
            backend.kv_append(memory, view, layer, &k, &v)
        })?;
        ops.push(OpTiming {
            op: "kv_append".into(),
            shape: format!("rows {rows} x {}, contiguous", cfg.kv_dim()),
            cost: cost::kv_append(cfg, rows, kv_dtype),
            seconds,
        });

        let ff = cfg.intermediate_size;
        // gate = 0 is a fixed point of the in-place op; other values drift into denormals.
        let mut gate = backend.alloc(rows, ff)?;
        let up = tensor(rows, ff);
        let seconds = timing.measure(|| backend.swiglu(&mut gate, &up, rows))?;
        ops.push(OpTiming {
            op: "swiglu".into(),
            shape: format!("rows {rows} x {ff}"),
            cost: cost::swiglu(rows, ff),
            seconds,
        });
    }
    Ok(())
}

/// A CPU tensor of small non-zero values.
fn tensor(rows: usize, cols: usize) -> CpuTensor {
    CpuTensor {
        data: (0..rows * cols)
            .map(|i| ((i % 97) as f32 - 48.0) / 97.0)
            .collect(),
        cols,
    }
}

fn time_attention(
    backend: &CpuBackend,
    cfg: &Config,
    quick: bool,
    timing: Timing,
    ops: &mut Vec<OpTiming>,
) -> Result<()> {
    let decode: &[(usize, KvShape)] = if quick {
        &[(2048, KvShape::Contiguous), (2048, KvShape::Chunked(16))]
    } else {
        &[
            (2048, KvShape::Contiguous),
            (8192, KvShape::Contiguous),
            (8192, KvShape::Chunked(16)),
            (8192, KvShape::Chunked(256)),
        ]
    };
    let prefill: &[usize] = if quick { &[] } else { &[512] };
    let cases = decode
        .iter()
        .map(|&(context, shape)| (context, 1, shape))
        .chain(
            prefill
                .iter()
                .map(|&rows| (rows, rows, KvShape::Contiguous)),
        );
    for (context, rows, shape) in cases {
        let q = tensor(rows, cfg.q_dim());
        let mut out = backend.alloc(rows, cfg.q_dim())?;
        let kv_dtype = backend.kv_dtypes()[0];
        let mut rotation = KvRotation::new(
            backend,
            cfg,
            shape,
            kv_dtype,
            context,
            rows,
            rotation_bytes(quick),
        )?;
        let seconds = timing.measure(|| {
            let (memory, view, layer) = rotation.next_layer();
            backend.attention(&q, memory, view, layer, cfg.num_heads, &mut out)
        })?;
        let what = if rows == 1 { "decode" } else { "prefill" };
        ops.push(OpTiming {
            op: "attention".into(),
            shape: format!("{what}, rows {rows}, context {context}, {shape}"),
            cost: cost::attention(cfg, context - rows, rows, kv_dtype),
            seconds,
        });
    }
    Ok(())
}

/// Times one-token forward passes of the model at a few contexts and layouts; returns what ran.
fn time_decode_steps(
    backend: &CpuBackend,
    opts: &RooflineOptions,
    timing: Timing,
    ops: &mut Vec<OpTiming>,
) -> Result<String> {
    let (dir, label) = match (&opts.model, opts.quick) {
        (Some(dir), _) => (dir.clone(), dir.display().to_string()),
        (None, false) => (
            synth::default_model_dir()?,
            "synthetic Llama-3.2-1B".to_string(),
        ),
        (None, true) => {
            let tiny = SynthOptions {
                preset: Preset::Tiny,
                seed: 0,
            };
            let root = std::env::temp_dir().join("kvlab");
            (
                synth::cached_synthetic_dir(&root, &tiny)?,
                "synthetic tiny (quick mode)".to_string(),
            )
        }
    };
    let model = Model::load(backend, &dir).with_context(|| format!("loading {}", dir.display()))?;
    let cases: &[(usize, KvShape)] = if opts.quick {
        &[(256, KvShape::Contiguous), (256, KvShape::Chunked(16))]
    } else {
        &[
            (256, KvShape::Contiguous),
            (2048, KvShape::Contiguous),
            (2048, KvShape::Chunked(16)),
            (2048, KvShape::Chunked(256)),
        ]
    };
    // A step takes a large fraction of a second: one call per repetition.
    let step_timing = Timing {
        reps: timing.reps,
        min_rep_seconds: 0.0,
    };
    for &(context, shape) in cases {
        let mut step = DecodeStep::new(backend, &model, shape, context)?;
        let mut samples = Vec::new();
        step.prepare(backend)?;
        step.run(backend)?;
        for _ in 0..step_timing.reps {
            step.prepare(backend)?;
            let start = Instant::now();
            step.run(backend)?;
            samples.push(start.elapsed().as_secs_f64());
        }
        ops.push(OpTiming {
            op: "decode_step".into(),
            shape: format!("context {context}, {shape}"),
            cost: cost::decode_step(
                &model.config,
                model.weight_bytes_per_token,
                context,
                backend.kv_dtypes()[0],
            ),
            seconds: Spread::of(&samples),
        });
    }
    Ok(label)
}

impl RooflineReport {
    /// The report as Markdown: the bounds, then one table row per op.
    pub fn to_markdown(&self) -> String {
        let h = &self.host;
        let mut s = format!(
            "host: {}\n\
             read bandwidth: {:.1} GB/s (best of {}; median {:.1}, worst {:.1})\n\
             f32 FMA peak: {:.1} GFLOP/s (best of {}; median {:.1}, worst {:.1}); ridge {:.1} FLOP/byte\n\
             {}\n\
             decode steps: {}\n\n\
             | op | shape | MB/call | MFLOP/call | time | GB/s | GFLOP/s | bound by | share of bound |\n\
             |---|---|---:|---:|---:|---:|---:|---|---:|\n",
            h.device,
            h.read_gbps.max,
            h.read_gbps.samples,
            h.read_gbps.median,
            h.read_gbps.min,
            h.peak_gflops.max,
            h.peak_gflops.samples,
            h.peak_gflops.median,
            h.peak_gflops.min,
            h.ridge_intensity(),
            self.gpu_line(),
            self.model,
        );
        for op in &self.ops {
            let bound = if op.cost.intensity() > h.ridge_intensity() {
                "compute"
            } else {
                "memory"
            };
            s += &format!(
                "| {} | {} | {:.3} | {:.3} | {} | {:.1} | {:.1} | {} | {:.0}% |\n",
                op.op,
                op.shape,
                op.cost.bytes / 1e6,
                op.cost.flops / 1e6,
                format_seconds(op.seconds.median),
                op.gbps(),
                op.gflops(),
                bound,
                100.0 * op.share_of_bound(h),
            );
        }
        s
    }

    fn gpu_line(&self) -> String {
        match &self.gpu {
            GpuBounds::Absent { reason } => format!("GPU: none ({reason})"),
            GpuBounds::Present {
                device,
                memory_total_bytes,
                copy_gbps,
            } => format!(
                "GPU: {device}, {}; device-to-device copy {:.0} GB/s (read + write, median of {}, \
                 {:.0}..{:.0})",
                memory_total_bytes.map_or("memory unknown".to_string(), |b| format!(
                    "{:.1} GiB",
                    b as f64 / (1u64 << 30) as f64
                )),
                copy_gbps.median,
                copy_gbps.samples,
                copy_gbps.min,
                copy_gbps.max
            ),
        }
    }
}

/// A duration with a unit that keeps 3 significant digits.
pub fn format_seconds(seconds: f64) -> String {
    if seconds >= 1.0 {
        format!("{seconds:.2} s")
    } else if seconds >= 1e-3 {
        format!("{:.2} ms", seconds * 1e3)
    } else {
        format!("{:.1} µs", seconds * 1e6)
    }
}
