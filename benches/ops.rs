//! Kernel-level timings: every op of the forward pass alone, at Llama-3.2-1B's shapes, then one
//! whole decode step per cache strategy. One criterion group per op family; each benchmark id
//! is `{backend}-{layout}/{size}`.
//!
//! Throughput reads against the roofline (`kvlab roofline` measures the bounds):
//! - memory-bound ops (decode attention, norms, RoPE, KV append, SwiGLU, decode step) report
//!   bytes (`GB/s`): the bytes the op must move at least (`kvlab::roofline::cost`), per second;
//! - prefill attention reports elements = FLOPs (`Gelem/s` = GFLOP/s).
//!
//! Matrix products on the CPU are in `benches/cpu_matmul.rs` (`cargo bench --bench cpu_matmul`);
//! here the `matmul` group runs on the GPU only.
//!
//! Every group runs on the CPU backend, then on the CUDA backend when a GPU is present, timed
//! there with CUDA events; without a GPU one line says that the CUDA benches were skipped and
//! why. The emulator is never benchmarked.
//!
//! `KVLAB_BENCH_QUICK=1`: a smoke run (few shapes, short timings, the tiny synthetic model).

use anyhow::{Context, Result};
use criterion::{BenchmarkGroup, Criterion, SamplingMode, Throughput};
use kvlab::backend::cpu::CpuBackend;
use kvlab::backend::cuda::{cuda_device_present, BackendKind, CudaBackend, CudaOptions, Device};
use kvlab::backend::Backend;
use kvlab::model::config::Config;
use kvlab::model::forward::Model;
use kvlab::model::synth::{self, write_synthetic, Preset, SynthOptions};
use kvlab::model::weights::LayerWeights;
use kvlab::model::DType;
use kvlab::roofline::cost::{self, OpCost};
use kvlab::roofline::fixture::{
    filled_cache, llama_3_2_1b, DecodeStep, KvRotation, KvShape, ROTATION_BYTES,
};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

type Group<'a> = BenchmarkGroup<'a, criterion::measurement::WallTime>;

fn quick() -> bool {
    std::env::var("KVLAB_BENCH_QUICK").is_ok_and(|v| v == "1")
}

/// The sizes each group runs: full, or a smoke subset.
struct Sizes {
    rows: &'static [usize],
    /// Decode-attention contexts on the CPU and on a GPU.
    contexts: &'static [usize],
    gpu_contexts: &'static [usize],
    layouts: &'static [KvShape],
    /// Rows of the GPU's matmul benches (1 = decode's matrix-vector product).
    matmul_rows: &'static [usize],
    prefill_rows: &'static [usize],
    prefill_layouts: &'static [KvShape],
    step_contexts: &'static [usize],
    step_layouts: &'static [KvShape],
    /// Bytes of KV each rotation spans: enough to leave the caches, or a token in quick mode.
    rotation_bytes: usize,
}

const LAYOUTS: &[KvShape] = &[
    KvShape::Contiguous,
    KvShape::Chunked(16),
    KvShape::Chunked(64),
    KvShape::Chunked(256),
    KvShape::Chunked(1024),
];

const FULL: Sizes = Sizes {
    rows: &[1, 16, 128, 512],
    contexts: &[256, 512, 1024, 2048, 4096, 8192],
    gpu_contexts: &[256, 1024, 2048, 4096, 8192, 16384, 32768],
    layouts: LAYOUTS,
    matmul_rows: &[1, 16, 128, 512],
    prefill_rows: &[128, 512],
    prefill_layouts: &[
        KvShape::Contiguous,
        KvShape::Chunked(16),
        KvShape::Chunked(256),
    ],
    step_contexts: &[256, 2048],
    step_layouts: &[
        KvShape::Contiguous,
        KvShape::Chunked(16),
        KvShape::Chunked(256),
    ],
    rotation_bytes: ROTATION_BYTES,
};

const QUICK: Sizes = Sizes {
    rows: &[1, 16],
    contexts: &[256, 1024],
    gpu_contexts: &[256, 4096],
    layouts: &[KvShape::Contiguous, KvShape::Chunked(16)],
    matmul_rows: &[1, 16],
    prefill_rows: &[16],
    prefill_layouts: &[KvShape::Contiguous],
    step_contexts: &[256],
    step_layouts: &[KvShape::Contiguous, KvShape::Chunked(16)],
    rotation_bytes: 16 << 20,
};

/// How a backend's time is read: the host clock around a loop that ends with the backend's
/// synchronize (CPU), or CUDA events recorded around it on the device's stream (GPU), so that
/// the time is the device's, not the host's.
enum Clock {
    Host,
    Device(Arc<dyn Device>),
}

impl Clock {
    /// Time of `iters` calls of `op`.
    fn time<B: Backend>(
        &self,
        backend: &B,
        iters: u64,
        mut op: impl FnMut() -> Result<()>,
    ) -> Result<Duration> {
        match self {
            Clock::Host => {
                let start = Instant::now();
                for _ in 0..iters {
                    op()?;
                }
                backend.synchronize()?;
                Ok(start.elapsed())
            }
            Clock::Device(device) => {
                let start = device.record_event()?;
                for _ in 0..iters {
                    op()?;
                }
                let end = device.record_event()?;
                device.synchronize()?;
                let ms = device.elapsed_ms(&start, &end)?;
                Ok(Duration::from_secs_f64(f64::from(ms) / 1e3))
            }
        }
    }
}

/// One backend under test.
struct Target<'a, B: Backend> {
    /// "cpu" or "cuda": the first part of every benchmark id.
    name: &'static str,
    backend: &'a B,
    clock: Clock,
}

/// How a bench's throughput is counted.
#[derive(Clone, Copy, PartialEq)]
enum Count {
    Bytes,
    Flops,
}

impl<B: Backend> Target<'_, B> {
    /// Benchmarks `op` on the inputs `setup` builds, as `id`, with throughput from `cost`.
    /// `setup` runs only when criterion's filter selects the bench, and its inputs are freed
    /// when the bench ends.
    fn bench<S>(
        &self,
        group: &mut Group,
        id: String,
        cost: OpCost,
        count: Count,
        setup: impl FnOnce() -> Result<S>,
        mut op: impl FnMut(&mut S) -> Result<()>,
    ) {
        group.throughput(match count {
            Count::Bytes => Throughput::BytesDecimal(cost.bytes as u64),
            Count::Flops => Throughput::Elements(cost.flops as u64),
        });
        let mut setup = Some(setup);
        let mut inputs = None;
        group.bench_function(id.clone(), |b| {
            let inputs = match (&mut inputs, setup.take()) {
                (Some(inputs), _) => inputs,
                (slot, Some(setup)) => {
                    slot.insert(setup().unwrap_or_else(|e| panic!("{id}: setup: {e:#}")))
                }
                (None, None) => unreachable!("setup runs on the first call"),
            };
            b.iter_custom(|iters| {
                self.clock
                    .time(self.backend, iters, || op(inputs))
                    .unwrap_or_else(|e| panic!("{id}: {e:#}"))
            })
        });
    }
}

fn group<'a>(c: &'a mut Criterion, name: &str) -> Group<'a> {
    let mut g = c.benchmark_group(name);
    // Some calls take a sizeable part of a second: flat sampling runs sample_size × n calls
    // instead of n × (1 + 2 + ... + sample_size).
    g.sampling_mode(SamplingMode::Flat);
    g
}

fn bench_norm_rope_append_swiglu<B: Backend>(
    c: &mut Criterion,
    t: &Target<B>,
    cfg: &Config,
    sizes: &Sizes,
) {
    let (b, h, ff) = (t.backend, cfg.hidden_size, cfg.intermediate_size);
    let (q_dim, kv_dim) = (cfg.q_dim(), cfg.kv_dim());
    let mut g = group(c, "rms_norm");
    for &rows in sizes.rows {
        t.bench(
            &mut g,
            format!("{}/{rows}", t.name),
            cost::rms_norm(rows, h),
            Count::Bytes,
            || {
                Ok((
                    b.alloc_precise(rows, h)?,
                    b.alloc(rows, h)?,
                    b.upload_vector(&vec![1.0; h])?,
                ))
            },
            |(x, out, weight)| b.rms_norm(x, weight, cfg.rms_norm_eps, rows, out),
        );
    }
    g.finish();

    let mut g = group(c, "rope");
    for &rows in sizes.rows {
        t.bench(
            &mut g,
            format!("{}/{rows}", t.name),
            cost::rope(rows, q_dim, kv_dim),
            Count::Bytes,
            || {
                // RoPE reads only the step's positions from the view.
                let mut cache =
                    filled_cache(b, cfg, KvShape::Contiguous, b.kv_dtypes()[0], 0, rows)?;
                let view = cache.store.prepare_step(b, &[(cache.seq, rows)])?;
                b.set_kv_step(&mut cache.store.memory, &view)?;
                let inv_freq = b.upload_vector(&cfg.rope_inv_freq())?;
                Ok((
                    b.alloc(rows, q_dim)?,
                    b.alloc(rows, kv_dim)?,
                    inv_freq,
                    (cache, view),
                ))
            },
            |(q, k, inv_freq, (cache, view))| b.rope(q, k, inv_freq, &cache.store.memory, view),
        );
    }
    g.finish();

    let mut g = group(c, "kv_append");
    for &shape in &[KvShape::Contiguous, KvShape::Chunked(16)] {
        for &rows in sizes.rows {
            t.bench(
                &mut g,
                format!("{}-{shape}/{rows}", t.name),
                cost::kv_append(cfg, rows, b.kv_dtypes()[0]),
                Count::Bytes,
                || {
                    let rotation = KvRotation::new(
                        b,
                        cfg,
                        shape,
                        b.kv_dtypes()[0],
                        2048,
                        rows,
                        sizes.rotation_bytes,
                    )?;
                    Ok((b.alloc(rows, kv_dim)?, b.alloc(rows, kv_dim)?, rotation))
                },
                |(k, v, rotation)| {
                    let (memory, view, layer) = rotation.next_layer();
                    b.kv_append(memory, view, layer, k, v)
                },
            );
        }
    }
    g.finish();

    let mut g = group(c, "swiglu");
    for &rows in sizes.rows {
        t.bench(
            &mut g,
            format!("{}/{rows}", t.name),
            cost::swiglu(rows, ff),
            Count::Bytes,
            // gate = 0 is a fixed point of the in-place op; other values drift into denormals.
            || Ok((b.alloc(rows, ff)?, b.alloc(rows, ff)?)),
            |(gate, up)| b.swiglu(gate, up, rows),
        );
    }
    g.finish();
}

/// Decode attention (one query row at the end of `context` positions) over each layout and each
/// KV element type of the backend (the CPU's f32 and bf16), then prefill attention (`rows` rows
/// from position 0, the default element type).
fn bench_attention<B: Backend>(
    c: &mut Criterion,
    t: &Target<B>,
    cfg: &Config,
    sizes: &Sizes,
    contexts: &[usize],
) {
    let b = t.backend;
    let cases = [
        ("decode_attention", sizes.layouts, contexts, Count::Bytes),
        (
            "prefill_attention",
            sizes.prefill_layouts,
            sizes.prefill_rows,
            Count::Flops,
        ),
    ];
    for (name, layouts, lengths, count) in cases {
        let mut g = group(c, name);
        // Context-major, so that the layouts of one context run side by side, under the same
        // conditions of the machine.
        let dtypes = if count == Count::Bytes {
            b.kv_dtypes()
        } else {
            &b.kv_dtypes()[..1]
        };
        for &context in lengths {
            for &shape in layouts {
                for &dtype in dtypes {
                    // Decode: one row at the end of the context; prefill: every row from 0.
                    let rows = if count == Count::Bytes { 1 } else { context };
                    let label = if dtype == b.kv_dtypes()[0] {
                        format!("{}-{shape}/{context}", t.name)
                    } else {
                        format!("{}-{shape}-{dtype}/{context}", t.name)
                    };
                    t.bench(
                        &mut g,
                        label,
                        cost::attention(cfg, context - rows, rows, dtype),
                        count,
                        || {
                            let rotation = KvRotation::new(
                                b,
                                cfg,
                                shape,
                                dtype,
                                context,
                                rows,
                                sizes.rotation_bytes,
                            )?;
                            Ok((
                                b.alloc(rows, cfg.q_dim())?,
                                b.alloc(rows, cfg.q_dim())?,
                                rotation,
                            ))
                        },
                        |(q, out, rotation)| {
                            let (memory, view, layer) = rotation.next_layer();
                            b.attention(q, memory, view, layer, cfg.num_heads, out)
                        },
                    );
                }
            }
        }
        g.finish();
    }
}

/// x[m, in] · Wᵀ for each projection of the model, rotating over the layers' copies so that the
/// weight comes from memory as in a real step (one layer's q_proj would stay in a GPU's L2).
/// m = 1 counts bytes (decode is bound by the weight's bytes), larger m counts FLOPs.
fn bench_matmul<B: Backend>(c: &mut Criterion, t: &Target<B>, model: &Model<B>, sizes: &Sizes) {
    type Pick<W> = fn(&LayerWeights<W>) -> &W;
    let (b, cfg, w) = (t.backend, &model.config, &model.weights);
    let (h, ff) = (cfg.hidden_size, cfg.intermediate_size);
    // (name, weight of a layer, out, in)
    let projections: [(&str, Pick<B::Weight>, usize, usize); 5] = [
        ("q_proj", |l| &l.q_proj, cfg.q_dim(), h),
        ("k_proj", |l| &l.k_proj, cfg.kv_dim(), h),
        ("o_proj", |l| &l.o_proj, h, cfg.q_dim()),
        ("gate_proj", |l| &l.gate_proj, ff, h),
        ("down_proj", |l| &l.down_proj, h, ff),
    ];
    let weights = projections
        .iter()
        .map(|&(name, pick, n, k)| (name, w.layers.iter().map(pick).collect::<Vec<_>>(), n, k))
        .chain([("lm_head", vec![w.output_projection()], cfg.vocab_size, h)]);
    let mut g = group(c, "matmul");
    for (name, copies, n, k) in weights {
        for &m in sizes.matmul_rows {
            let count = if m == 1 { Count::Bytes } else { Count::Flops };
            t.bench(
                &mut g,
                format!("{}-{name}/{m}", t.name),
                // The synthetic checkpoint is bf16.
                cost::matmul(m, n, k, DType::BF16.size_bytes()),
                count,
                || Ok((b.alloc(m, k)?, b.alloc(m, n)?, 0usize)),
                |(x, out, next)| {
                    *next = (*next + 1) % copies.len();
                    b.matmul(x, copies[*next], m, out)
                },
            );
        }
    }
    g.finish();
}

/// One token through the whole model at a fixed context, per layout; bytes = weights + KV read.
fn bench_decode_step<B: Backend>(
    c: &mut Criterion,
    t: &Target<B>,
    model: &Model<B>,
    sizes: &Sizes,
) {
    let b = t.backend;
    let mut g = group(c, "decode_step");
    for &shape in sizes.step_layouts {
        for &context in sizes.step_contexts {
            let id = format!("{}-{shape}/{context}", t.name);
            let cost = cost::decode_step(
                &model.config,
                model.weight_bytes_per_token,
                context,
                b.kv_dtypes()[0],
            );
            g.throughput(Throughput::BytesDecimal(cost.bytes as u64));
            let mut step = None;
            g.bench_function(id.clone(), |bencher| {
                let step = match &mut step {
                    Some(step) => step,
                    slot => slot.insert(
                        DecodeStep::new(b, model, shape, context)
                            .unwrap_or_else(|e| panic!("{id}: setup: {e:#}")),
                    ),
                };
                bencher.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        // The refill of a drifted cache stays outside the timing.
                        step.prepare(b)
                            .and_then(|()| t.clock.time(b, 1, || step.run(b)))
                            .map(|d| total += d)
                            .unwrap_or_else(|e| panic!("{id}: {e:#}"));
                    }
                    total
                })
            });
        }
    }
    g.finish();
}

/// The decode-step model: the synthetic Llama-3.2-1B (written once into kvlab's cache), or in
/// quick mode a tiny synthetic model in a temporary folder.
fn decode_step_model(quick: bool) -> Result<(PathBuf, Option<tempfile::TempDir>)> {
    if quick {
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path().join("tiny");
        write_synthetic(
            &SynthOptions {
                preset: Preset::Tiny,
                seed: 0,
            },
            &dir,
        )?;
        Ok((dir, Some(tmp)))
    } else {
        Ok((synth::default_model_dir()?, None))
    }
}

fn main() -> Result<()> {
    let quick = quick();
    let sizes = if quick { &QUICK } else { &FULL };
    let (warm_up, measurement) = if quick {
        (Duration::from_millis(20), Duration::from_millis(60))
    } else {
        (Duration::from_millis(300), Duration::from_millis(1500))
    };
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(warm_up)
        .measurement_time(measurement)
        .configure_from_args();
    let cfg = llama_3_2_1b()?;
    println!("matrix products on the CPU: see `cargo bench --bench cpu_matmul`");

    let cpu = CpuBackend::new();
    let target = Target {
        name: "cpu",
        backend: &cpu,
        clock: Clock::Host,
    };
    bench_norm_rope_append_swiglu(&mut c, &target, &cfg, sizes);
    bench_attention(&mut c, &target, &cfg, sizes, sizes.contexts);
    let (dir, _tmp) = decode_step_model(quick)?;
    let model = Model::load(&cpu, &dir)?;
    bench_decode_step(&mut c, &target, &model, sizes);

    if !cuda_device_present() {
        println!("CUDA benches skipped: no CUDA driver or no CUDA device on this machine");
    } else {
        let gpu = CudaBackend::open(BackendKind::Cuda, CudaOptions::default())
            .context("a GPU is present, but the CUDA backend does not open on it")?;
        let target = Target {
            name: "cuda",
            backend: &gpu,
            clock: Clock::Device(gpu.device().clone()),
        };
        let model = Model::load(&gpu, &dir)?;
        bench_matmul(&mut c, &target, &model, sizes);
        bench_norm_rope_append_swiglu(&mut c, &target, &cfg, sizes);
        bench_attention(&mut c, &target, &cfg, sizes, sizes.gpu_contexts);
        bench_decode_step(&mut c, &target, &model, sizes);
    }

    c.final_summary();
    Ok(())
}
