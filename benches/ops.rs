//! Kernel-level timings: every op of the forward pass alone, at Llama-3.2-1B's shapes, then one
//! whole decode step per cache strategy. One criterion group per op family; each benchmark id
//! is `{backend}-{layout}/{size}`.
//!
//! Throughput reads against the roofline (`kvlab roofline` measures the bounds):
//! - memory-bound ops (decode attention, norms, RoPE, KV append, SwiGLU, decode step) report
//!   bytes (`GB/s`): the bytes the op must move at least (`kvlab::roofline::cost`), per second;
//! - prefill attention reports elements = FLOPs (`Gelem/s` = GFLOP/s).
//!
//! Matrix products on the CPU are in `benches/cpu_matmul.rs` (`cargo bench --bench cpu_matmul`).
//! `KVLAB_BENCH_QUICK=1`: a smoke run (few shapes, short timings, the tiny synthetic model).

use anyhow::Result;
use criterion::{BenchmarkGroup, Criterion, SamplingMode, Throughput};
use kvlab::backend::cpu::CpuBackend;
use kvlab::backend::Backend;
use kvlab::model::config::Config;
use kvlab::model::forward::Model;
use kvlab::model::synth::{self, write_synthetic, Preset, SynthOptions};
use kvlab::roofline::cost::{self, OpCost};
use kvlab::roofline::fixture::{filled_cache, llama_3_2_1b, DecodeStep, KvRotation, KvShape};
use std::path::PathBuf;
use std::time::{Duration, Instant};

type Group<'a> = BenchmarkGroup<'a, criterion::measurement::WallTime>;

fn quick() -> bool {
    std::env::var("KVLAB_BENCH_QUICK").is_ok_and(|v| v == "1")
}

/// The sizes each group runs: full, or a smoke subset.
struct Sizes {
    rows: &'static [usize],
    contexts: &'static [usize],
    layouts: &'static [KvShape],
    prefill_rows: &'static [usize],
    prefill_layouts: &'static [KvShape],
    step_contexts: &'static [usize],
    step_layouts: &'static [KvShape],
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
    layouts: LAYOUTS,
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
};

const QUICK: Sizes = Sizes {
    rows: &[1, 16],
    contexts: &[256, 1024],
    layouts: &[KvShape::Contiguous, KvShape::Chunked(16)],
    prefill_rows: &[16],
    prefill_layouts: &[KvShape::Contiguous],
    step_contexts: &[256],
    step_layouts: &[KvShape::Contiguous, KvShape::Chunked(16)],
};

/// How a backend's time is read: the host clock around a loop that ends with the backend's
/// synchronize.
enum Clock {
    Host,
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

impl<B: Backend> Target<'_, B> {
    /// Benchmarks `op` as `id` with the group's throughput set from `cost`: bytes, or FLOPs as
    /// elements.
    fn bench(
        &self,
        group: &mut Group,
        id: String,
        cost: OpCost,
        flops: bool,
        mut op: impl FnMut() -> Result<()>,
    ) {
        group.throughput(if flops {
            Throughput::Elements(cost.flops as u64)
        } else {
            Throughput::BytesDecimal(cost.bytes as u64)
        });
        group.bench_function(id.clone(), |b| {
            b.iter_custom(|iters| {
                self.clock
                    .time(self.backend, iters, &mut op)
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
) -> Result<()> {
    let (b, h) = (t.backend, cfg.hidden_size);
    let mut g = group(c, "rms_norm");
    for &rows in sizes.rows {
        // Zeros: the in-place residual add stays put however often it runs.
        let mut residual = b.alloc(rows, h)?;
        let delta = b.alloc(rows, h)?;
        let mut out = b.alloc(rows, h)?;
        let weight = b.upload_vector(&vec![1.0; h])?;
        let eps = cfg.rms_norm_eps;
        t.bench(
            &mut g,
            format!("{}/{rows}", t.name),
            cost::add_rms_norm(rows, h),
            false,
            || b.add_rms_norm(&mut residual, Some(&delta), &weight, eps, rows, &mut out),
        );
    }
    g.finish();

    let mut g = group(c, "rope");
    let inv_freq = b.upload_vector(&cfg.rope_inv_freq())?;
    for &rows in sizes.rows {
        let mut q = b.alloc(rows, cfg.q_dim())?;
        let mut k = b.alloc(rows, cfg.kv_dim())?;
        // RoPE reads only the step's positions from the cache.
        let mut cache = filled_cache(b, cfg, KvShape::Contiguous, 0, rows)?;
        cache.begin_step(b, rows)?;
        let cost = cost::rope(rows, cfg.q_dim(), cfg.kv_dim());
        t.bench(&mut g, format!("{}/{rows}", t.name), cost, false, || {
            b.rope(&mut q, &mut k, &inv_freq, &cache)
        });
    }
    g.finish();

    let mut g = group(c, "kv_append");
    for &shape in &[KvShape::Contiguous, KvShape::Chunked(16)] {
        for &rows in sizes.rows {
            let k = b.alloc(rows, cfg.kv_dim())?;
            let v = b.alloc(rows, cfg.kv_dim())?;
            let mut rotation = KvRotation::new(b, cfg, shape, 2048, rows)?;
            let cost = cost::kv_append(rows, cfg.kv_dim(), b.kv_elem_bytes());
            t.bench(
                &mut g,
                format!("{}-{shape}/{rows}", t.name),
                cost,
                false,
                || {
                    let (cache, layer) = rotation.next();
                    b.kv_append(cache, layer, &k, &v)
                },
            );
        }
    }
    g.finish();

    let mut g = group(c, "swiglu");
    for &rows in sizes.rows {
        let ff = cfg.intermediate_size;
        // gate = 0 is a fixed point of the in-place op; other values drift into denormals.
        let mut gate = b.alloc(rows, ff)?;
        let up = b.alloc(rows, ff)?;
        t.bench(
            &mut g,
            format!("{}/{rows}", t.name),
            cost::swiglu(rows, ff),
            false,
            || b.swiglu(&mut gate, &up, rows),
        );
    }
    g.finish();
    Ok(())
}

/// Decode attention (one query row at the end of `context` positions) over each layout, then
/// prefill attention (`rows` rows from position 0).
fn bench_attention<B: Backend>(
    c: &mut Criterion,
    t: &Target<B>,
    cfg: &Config,
    sizes: &Sizes,
    contexts: &[usize],
) -> Result<()> {
    let b = t.backend;
    let mut g = group(c, "decode_attention");
    for &shape in sizes.layouts {
        for &context in contexts {
            let q = b.alloc(1, cfg.q_dim())?;
            let mut out = b.alloc(1, cfg.q_dim())?;
            let mut rotation = KvRotation::new(b, cfg, shape, context, 1)?;
            let cost = cost::attention(cfg, context - 1, 1, b.kv_elem_bytes());
            t.bench(
                &mut g,
                format!("{}-{shape}/{context}", t.name),
                cost,
                false,
                || {
                    let (cache, layer) = rotation.next();
                    b.attention(&q, cache, layer, cfg.num_heads, &mut out)
                },
            );
        }
    }
    g.finish();

    let mut g = group(c, "prefill_attention");
    for &shape in sizes.prefill_layouts {
        for &rows in sizes.prefill_rows {
            let q = b.alloc(rows, cfg.q_dim())?;
            let mut out = b.alloc(rows, cfg.q_dim())?;
            let mut rotation = KvRotation::new(b, cfg, shape, rows, rows)?;
            let cost = cost::attention(cfg, 0, rows, b.kv_elem_bytes());
            t.bench(
                &mut g,
                format!("{}-{shape}/{rows}", t.name),
                cost,
                true,
                || {
                    let (cache, layer) = rotation.next();
                    b.attention(&q, cache, layer, cfg.num_heads, &mut out)
                },
            );
        }
    }
    g.finish();
    Ok(())
}

/// One token through the whole model at a fixed context, per layout; bytes = weights + KV read.
fn bench_decode_step<B: Backend>(
    c: &mut Criterion,
    t: &Target<B>,
    model: &Model<B>,
    sizes: &Sizes,
) -> Result<()> {
    let b = t.backend;
    let mut g = group(c, "decode_step");
    for &shape in sizes.step_layouts {
        for &context in sizes.step_contexts {
            let mut step = DecodeStep::new(b, model, shape, context)?;
            let id = format!("{}-{shape}/{context}", t.name);
            let cost = cost::decode_step(
                &model.config,
                model.weight_bytes_per_token,
                context,
                b.kv_elem_bytes(),
            );
            g.throughput(Throughput::BytesDecimal(cost.bytes as u64));
            g.bench_function(id.clone(), |bencher| {
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
    Ok(())
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
    bench_norm_rope_append_swiglu(&mut c, &target, &cfg, sizes)?;
    bench_attention(&mut c, &target, &cfg, sizes, sizes.contexts)?;
    let (dir, _tmp) = decode_step_model(quick)?;
    let model = Model::load(&cpu, &dir)?;
    bench_decode_step(&mut c, &target, &model, sizes)?;

    c.final_summary();
    Ok(())
}
