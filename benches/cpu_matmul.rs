//! Throughput of the CPU backend's matmul on Llama-3.2-1B's bf16 shapes, beside the machine's
//! own bounds measured the same way:
//! - `bound/read_bandwidth`: a parallel sum over a 1 GiB buffer, the bound of decode (GB/s);
//! - `bound/fma_peak`: independent AVX2 FMA chains on every pool thread, the bound of prefill
//!   (elements/s = FLOP/s);
//! - `matvec_bf16` (m = 1): bytes of weights streamed from memory per second, to read against
//!   read_bandwidth. Napkin math: a decode token reads ~2.5 GB of weights, so 40 GB/s is ~16
//!   tokens/s;
//! - `batched_decode_bf16` (m = 1, 2, .., 128): the products of a decode step of m sequences,
//!   weights streamed from memory as in `matvec_bf16`; bytes of weights per second, so that a
//!   flat rate means m rows cost what one costs (up to m = 32 the streaming kernel, then the
//!   blocked one);
//! - `matmul_bf16` (m = 16, 128, 512): elements/s = FLOP/s (2 m rows cols per product), to read
//!   against fma_peak.
//!
//! `KVLAB_BENCH_QUICK=1` cuts it to a smoke run of a few seconds (one shape, short timings).

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkGroup, Criterion, SamplingMode, Throughput};
use kvlab::backend::cpu::matmul::{matmul, MatRef};
use kvlab::model::DType;
use rayon::prelude::*;

/// Llama-3.2-1B's weight matrices as [rows = out_features, cols = in_features].
const LLAMA_1B_SHAPES: [(&str, usize, usize); 5] = [
    ("q_o_2048x2048", 2048, 2048),
    ("k_v_512x2048", 512, 2048),
    ("gate_up_8192x2048", 8192, 2048),
    ("down_2048x8192", 2048, 8192),
    ("lm_head_128256x2048", 128256, 2048),
];

fn quick() -> bool {
    std::env::var("KVLAB_BENCH_QUICK").is_ok_and(|v| v == "1")
}

/// `len` bf16 weights in [-1, 1) from a fixed xorshift sequence: [rows, cols] row-major bytes.
fn bf16_weights(len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len * 2];
    bytes
        .par_chunks_mut(1 << 20)
        .enumerate()
        .for_each(|(chunk, out)| {
            let mut state =
                0x9E37_79B9_7F4A_7C15u64 ^ (chunk as u64 + 1).wrapping_mul(0xA24B_AED4_963E_E407);
            for pair in out.chunks_exact_mut(2) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let v = (state >> 40) as f32 / (1u64 << 23) as f32 * 2.0 - 1.0;
                pair.copy_from_slice(&half::bf16::from_f32(v).to_le_bytes());
            }
        });
    bytes
}

fn group<'a>(
    c: &'a mut Criterion,
    name: &str,
) -> BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(name);
    // One iteration can take a large fraction of a second (lm_head, m = 512): flat sampling
    // keeps the run to sample_size iterations instead of 1 + 2 + ... + sample_size.
    g.sampling_mode(SamplingMode::Flat);
    g
}

fn bench_bounds(c: &mut Criterion) {
    let mut g = group(c, "bound");
    let len = if quick() { 64 << 20 } else { 1 << 30 } / 8;
    let buffer: Vec<u64> = (0..len as u64).into_par_iter().collect();
    g.throughput(Throughput::BytesDecimal((len * 8) as u64));
    g.bench_function("read_bandwidth", |b| {
        b.iter(|| {
            buffer
                .par_chunks(1 << 17)
                .map(|chunk| chunk.iter().fold(0u64, |sum, &v| sum.wrapping_add(v)))
                .reduce(|| 0, u64::wrapping_add)
        })
    });
    drop(buffer);

    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        let threads = rayon::current_num_threads();
        let iterations = 1 << 22;
        g.throughput(Throughput::Elements(
            (threads * iterations * FMA_FLOP_PER_ITERATION) as u64,
        ));
        g.bench_function("fma_peak", |b| {
            b.iter(|| {
                (0..threads)
                    .into_par_iter()
                    // SAFETY: AVX2 and FMA are present (checked above).
                    .map(|_| unsafe { fma_chains(black_box(iterations)) })
                    .sum::<f32>()
            })
        });
    }
    g.finish();
}

/// 12 independent chains (more than FMA latency x throughput = 4 x 2 on current x86 cores) of
/// 8-wide FMAs, 2 FLOP per lane.
#[cfg(target_arch = "x86_64")]
const FMA_FLOP_PER_ITERATION: usize = 12 * 8 * 2;

/// # Safety
/// The CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_chains(iterations: usize) -> f32 {
    use std::arch::x86_64::*;
    let scale = _mm256_set1_ps(0.999);
    let offset = _mm256_set1_ps(1e-3);
    let mut chains = [_mm256_setzero_ps(); 12];
    for _ in 0..iterations {
        for chain in chains.iter_mut() {
            *chain = _mm256_fmadd_ps(*chain, scale, offset);
        }
    }
    let mut lanes = [0.0f32; 8];
    let total = chains
        .iter()
        .fold(_mm256_setzero_ps(), |s, &v| _mm256_add_ps(s, v));
    _mm256_storeu_ps(lanes.as_mut_ptr(), total);
    lanes.iter().sum()
}

fn shapes() -> &'static [(&'static str, usize, usize)] {
    if quick() {
        &LLAMA_1B_SHAPES[..1]
    } else {
        &LLAMA_1B_SHAPES
    }
}

fn bench_matvec(c: &mut Criterion) {
    let mut g = group(c, "matvec_bf16");
    // One buffer as large as the largest matrix (lm_head, 0.5 GB), and each call reads the next
    // matrix-sized window of it: like a real decode step, whose 2.5 GB of weights never stay in
    // the L3 cache, every call streams its weights from memory.
    let largest = shapes()
        .iter()
        .map(|&(_, rows, cols)| rows * cols)
        .max()
        .unwrap_or(0);
    let buffer = bf16_weights(largest);
    for &(name, rows, cols) in shapes() {
        let matrix_bytes = rows * cols * 2;
        let windows = buffer.len() / matrix_bytes;
        let x: Vec<f32> = (0..cols).map(|k| (k % 7) as f32 * 0.25 - 0.75).collect();
        let mut out = vec![0.0f32; rows];
        let mut next = 0;
        g.throughput(Throughput::BytesDecimal(matrix_bytes as u64));
        g.bench_function(name, |b| {
            b.iter(|| {
                let w = MatRef {
                    dtype: DType::BF16,
                    rows,
                    cols,
                    data: &buffer[next * matrix_bytes..(next + 1) * matrix_bytes],
                };
                next = (next + 1) % windows;
                matmul(black_box(&x), 1, w, &mut out)
            })
        });
    }
    g.finish();
}

fn bench_batched_decode(c: &mut Criterion) {
    let mut g = group(c, "batched_decode_bf16");
    let m_values: &[usize] = if quick() {
        &[8]
    } else {
        &[1, 2, 4, 8, 16, 32, 64, 128]
    };
    // gate_up: the largest matrix of a layer. Windows of one buffer larger than the L3 cache, as
    // in bench_matvec, so every call streams its weights from memory.
    let (name, rows, cols) = LLAMA_1B_SHAPES[2];
    let matrix_bytes = rows * cols * 2;
    let buffer = bf16_weights(rows * cols * if quick() { 2 } else { 16 });
    let windows = buffer.len() / matrix_bytes;
    for &m in m_values {
        let x: Vec<f32> = (0..m * cols)
            .map(|k| (k % 7) as f32 * 0.25 - 0.75)
            .collect();
        let mut out = vec![0.0f32; m * rows];
        let mut next = 0;
        g.throughput(Throughput::BytesDecimal(matrix_bytes as u64));
        g.bench_function(format!("{name}/m{m}"), |b| {
            b.iter(|| {
                let w = MatRef {
                    dtype: DType::BF16,
                    rows,
                    cols,
                    data: &buffer[next * matrix_bytes..(next + 1) * matrix_bytes],
                };
                next = (next + 1) % windows;
                matmul(black_box(&x), m, w, &mut out)
            })
        });
    }
    g.finish();
}

fn bench_matmul(c: &mut Criterion) {
    let mut g = group(c, "matmul_bf16");
    let m_values: &[usize] = if quick() { &[16] } else { &[16, 128, 512] };
    // lm_head is left out: prefill computes logits for the last position only.
    for &(name, rows, cols) in shapes().iter().filter(|s| !s.0.starts_with("lm_head")) {
        let data = bf16_weights(rows * cols);
        let w = MatRef {
            dtype: DType::BF16,
            rows,
            cols,
            data: &data,
        };
        for &m in m_values {
            let x: Vec<f32> = (0..m * cols)
                .map(|k| (k % 7) as f32 * 0.25 - 0.75)
                .collect();
            let mut out = vec![0.0f32; m * rows];
            g.throughput(Throughput::Elements((2 * m * rows * cols) as u64));
            g.bench_function(format!("{name}/m{m}"), |b| {
                b.iter(|| matmul(black_box(&x), m, w, &mut out))
            });
        }
    }
    g.finish();
}

fn main() {
    let (warm_up, measurement) = if quick() {
        (Duration::from_millis(50), Duration::from_millis(150))
    } else {
        (Duration::from_millis(300), Duration::from_millis(1500))
    };
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(warm_up)
        .measurement_time(measurement)
        .configure_from_args();
    bench_bounds(&mut c);
    bench_matvec(&mut c);
    bench_batched_decode(&mut c);
    bench_matmul(&mut c);
    c.final_summary();
}
