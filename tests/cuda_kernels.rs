//! Every CUDA kernel alone against its CPU reference (the CPU backend's op), through the CUDA
//! backend on the emulator: exactly the kernels and launch code a GPU runs. Inputs are rounded
//! to bf16 first, so both sides see the same numbers; differences come from bf16 outputs and
//! summation order only. Shapes are small but awkward: lengths that are not multiples of any
//! tile, one row, chunk boundaries inside a step, GQA ratios 1, 3, 4 and 9.

mod common;

use common::fixture;
use half::bf16;
use kvlab::backend::cpu::{CpuBackend, CpuTensor};
use kvlab::backend::cuda::emu::EmuDevice;
use kvlab::backend::cuda::{CudaBackend, CudaOptions};
use kvlab::backend::Backend;
use kvlab::kv::{CacheOptions, KvCache, KvLayout, Strategy};
use kvlab::model::config::Config;
use kvlab::model::weights::{Checkpoint, HostTensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use safetensors::Dtype::{BF16, F16, F32};
use std::sync::Arc;

/// One bf16 rounding of a value (relative 2^-8) plus f32 summation-order noise.
const RTOL_BF16_OUTPUT: f32 = 1.0 / 128.0;
/// Two roundings in sequence (attention: probabilities rounded to bf16 for p.v, then the output).
const RTOL_TWO_ROUNDINGS: f32 = 1.0 / 64.0;

fn emu(options: CudaOptions) -> CudaBackend {
    CudaBackend::new(Arc::new(EmuDevice::new().unwrap()), "emu", options).unwrap()
}

fn round_bf16(values: Vec<f32>) -> Vec<f32> {
    values
        .into_iter()
        .map(|v| bf16::from_f32(v).to_f32())
        .collect()
}

/// `n` values of N(0, scale²), rounded to bf16.
fn randn(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    round_bf16(
        (0..n)
            .map(|_| rng.sample::<f32, _>(StandardNormal) * scale)
            .collect(),
    )
}

/// |got - want| <= atol + rtol |want| everywhere, or a panic naming the worst element.
fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let mut worst: Option<(usize, f32)> = None;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let excess = (g - w).abs() - (atol + rtol * w.abs());
        // A NaN on either side is the worst failure of all.
        let excess = if excess.is_nan() {
            f32::INFINITY
        } else {
            excess
        };
        if excess > 0.0 && worst.is_none_or(|(_, e)| excess > e) {
            worst = Some((i, excess));
        }
    }
    if let Some((i, _)) = worst {
        panic!(
            "{what}: element {i} is {} on the device, {} on the CPU (atol {atol}, rtol {rtol})",
            got[i], want[i]
        );
    }
}

/// A checkpoint in a temporary folder, read back through kvlab's loader so that both backends
/// upload the same `HostTensor`s.
struct TestCheckpoint {
    _dir: tempfile::TempDir,
    checkpoint: Checkpoint,
}

impl TestCheckpoint {
    fn new(dtype: safetensors::Dtype, tensors: &[(&str, Vec<usize>, &[f32])]) -> TestCheckpoint {
        let dir = tempfile::tempdir().unwrap();
        let bytes: Vec<Vec<u8>> = tensors
            .iter()
            .map(|(_, _, values)| {
                values
                    .iter()
                    .flat_map(|&v| match dtype {
                        safetensors::Dtype::BF16 => bf16::from_f32(v).to_le_bytes().to_vec(),
                        safetensors::Dtype::F16 => half::f16::from_f32(v).to_le_bytes().to_vec(),
                        _ => v.to_le_bytes().to_vec(),
                    })
                    .collect()
            })
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
            .iter()
            .zip(&bytes)
            .map(|((name, shape, _), data)| {
                let view =
                    safetensors::tensor::TensorView::new(dtype, shape.clone(), data).unwrap();
                (name.to_string(), view)
            })
            .collect();
        safetensors::serialize_to_file(views, None, &dir.path().join("model.safetensors")).unwrap();
        let checkpoint = Checkpoint::open(dir.path()).unwrap();
        TestCheckpoint {
            _dir: dir,
            checkpoint,
        }
    }

    fn tensor(&self, name: &str, shape: &[usize]) -> HostTensor {
        self.checkpoint.tensor(name, shape).unwrap()
    }
}

fn cpu_tensor(cols: usize, values: &[f32]) -> CpuTensor {
    CpuTensor {
        data: values.to_vec(),
        cols,
    }
}

#[test]
fn embedding_gather_copies_rows() {
    let mut rng = StdRng::seed_from_u64(1);
    let (vocab, hidden) = (37, 96);
    // Unrounded values: an f32 table is stored as bf16 pairs and must come back to 2^-17.
    let table: Vec<f32> = (0..vocab * hidden)
        .map(|_| rng.sample::<f32, _>(StandardNormal))
        .collect();
    for (dtype, rtol) in [(BF16, 0.0), (F32, 1e-5)] {
        let ckpt = TestCheckpoint::new(dtype, &[("embed", vec![vocab, hidden], &table)]);
        let (cpu, cuda) = (CpuBackend::new(), emu(CudaOptions::default()));
        let host = ckpt.tensor("embed", &[vocab, hidden]);
        let (cw, gw) = (
            cpu.upload_weight(&host).unwrap(),
            cuda.upload_weight(&host).unwrap(),
        );
        let ids = [0u32, 36, 5, 5, 17];
        let mut co = cpu.alloc_precise(ids.len(), hidden).unwrap();
        let mut go = cuda.alloc_precise(ids.len(), hidden).unwrap();
        cpu.embed(&cw, &ids, &mut co).unwrap();
        cuda.embed(&gw, &ids, &mut go).unwrap();
        assert_close(
            &format!("embedding {dtype:?}"),
            &cuda.read_rows(&go, 0, ids.len()).unwrap(),
            &co.data,
            0.0,
            rtol,
        );
        let err = cuda.embed(&gw, &[3, 37], &mut go).unwrap_err();
        assert!(err.to_string().contains("37"), "{err}");
    }
}

#[test]
fn rms_norm_with_and_without_residual_add() {
    let mut rng = StdRng::seed_from_u64(2);
    for (rows, dim) in [(3, 144), (1, 2056)] {
        let weight: Vec<f32> = (0..dim)
            .map(|_| 1.0 + 0.1 * rng.sample::<f32, _>(StandardNormal))
            .collect();
        let ckpt = TestCheckpoint::new(BF16, &[("norm", vec![dim], &weight)]);
        let (cpu, cuda) = (CpuBackend::new(), emu(CudaOptions::default()));
        let host = ckpt.tensor("norm", &[dim]);
        let (cw, gw) = (
            cpu.upload_weight(&host).unwrap(),
            cuda.upload_weight(&host).unwrap(),
        );
        let x = randn(&mut rng, rows * dim, 2.0);
        let delta = randn(&mut rng, rows * dim, 1.0);
        for with_delta in [false, true] {
            let mut cx = cpu_tensor(dim, &x);
            let cd = cpu_tensor(dim, &delta);
            let mut co = cpu.alloc(rows, dim).unwrap();
            let mut gx = cuda.upload_precise(rows, dim, &x).unwrap();
            let gd = cuda.upload_precise(rows, dim, &delta).unwrap();
            let mut go = cuda.alloc(rows, dim).unwrap();
            cpu.add_rms_norm(&mut cx, with_delta.then_some(&cd), &cw, 1e-5, rows, &mut co)
                .unwrap();
            cuda.add_rms_norm(&mut gx, with_delta.then_some(&gd), &gw, 1e-5, rows, &mut go)
                .unwrap();
            let what = format!("rms norm rows {rows} dim {dim} delta {with_delta}");
            // The residual add is the same f32 addition on both sides.
            assert_close(
                &format!("{what}: residual"),
                &cuda.read_rows(&gx, 0, rows).unwrap(),
                &cx.data,
                0.0,
                0.0,
            );
            assert_close(
                &format!("{what}: output"),
                &cuda.read_rows(&go, 0, rows).unwrap(),
                &co.data,
                1e-4,
                RTOL_BF16_OUTPUT,
            );
        }
    }
}

/// One matmul on both backends: `rows` of x against a `[n, k]` weight stored as `dtype`.
#[allow(clippy::too_many_arguments)]
fn check_matmul(
    rng: &mut StdRng,
    cuda: &CudaBackend,
    rows: usize,
    n: usize,
    k: usize,
    f32_out: bool,
    dtype: safetensors::Dtype,
) {
    let cpu = CpuBackend::new();
    // Unrounded: an f16 / f32 checkpoint keeps digits that plain bf16 would lose.
    let w: Vec<f32> = (0..n * k)
        .map(|_| rng.sample::<f32, _>(StandardNormal) * 0.05)
        .collect();
    let x = randn(rng, rows * k, 1.0);
    let ckpt = TestCheckpoint::new(dtype, &[("w", vec![n, k], &w)]);
    let host = ckpt.tensor("w", &[n, k]);
    let (cw, gw) = (
        cpu.upload_weight(&host).unwrap(),
        cuda.upload_weight(&host).unwrap(),
    );
    let cx = cpu_tensor(k, &x);
    let mut co = cpu.alloc(rows, n).unwrap();
    cpu.matmul(&cx, &cw, rows, &mut co).unwrap();
    let gx = cuda.upload_tensor(rows, k, &x).unwrap();
    let mut go = if f32_out {
        cuda.alloc_precise(rows, n).unwrap()
    } else {
        cuda.alloc(rows, n).unwrap()
    };
    cuda.matmul(&gx, &gw, rows, &mut go).unwrap();
    // f32 outputs differ by summation order only (and, for f16 / f32 weights, by the 2^-17
    // relative error of the bf16 pairs): far below what rounding weights to bf16 would cause.
    let rtol = if f32_out { 1e-4 } else { RTOL_BF16_OUTPUT };
    assert_close(
        &format!("matmul rows {rows} n {n} k {k} f32 out {f32_out} weights {dtype:?}"),
        &cuda.read_rows(&go, 0, rows).unwrap(),
        &co.data,
        1e-4,
        rtol,
    );
}

#[test]
fn matvec_for_decode_rows() {
    let mut rng = StdRng::seed_from_u64(3);
    let cuda = emu(CudaOptions::default());
    // k: the tiny models' widths and one past 2048 (not multiples of 32 lanes x 8 elements);
    // n: fewer and more rows than a block's 8 warps; 777 logits (odd) in f32.
    for (n, k) in [(200, 96), (24, 144), (320, 128), (96, 320), (1000, 2056)] {
        check_matmul(&mut rng, &cuda, 1, n, k, false, BF16);
    }
    check_matmul(&mut rng, &cuda, 1, 777, 128, true, BF16);
    check_matmul(&mut rng, &cuda, 1, 200, 96, true, F32);
    check_matmul(&mut rng, &cuda, 1, 200, 96, true, F16);
}

#[test]
fn matvec_covers_more_rows_than_its_grid() {
    // 9000 rows > 1056 blocks x 8 warps: warps stride over several rows each.
    let mut rng = StdRng::seed_from_u64(4);
    check_matmul(
        &mut rng,
        &emu(CudaOptions::default()),
        1,
        9000,
        64,
        true,
        BF16,
    );
}

#[test]
fn tensor_core_matmul_with_ragged_tiles() {
    let mut rng = StdRng::seed_from_u64(5);
    let cuda = emu(CudaOptions::default());
    // m, n, k around the 128 x 128 x 32 tiles: below, just above, and not multiples.
    for (m, n, k) in [(2, 200, 96), (45, 128, 144), (130, 136, 200), (45, 96, 328)] {
        check_matmul(&mut rng, &cuda, m, n, k, false, BF16);
    }
    check_matmul(&mut rng, &cuda, 45, 777, 128, true, BF16);
    check_matmul(&mut rng, &cuda, 45, 200, 136, true, F32);
    check_matmul(&mut rng, &cuda, 45, 200, 136, true, F16);
}

#[test]
fn several_weights_of_one_input() {
    // q, k, v-like (one launch for three weights at one row) and gate, up-like, at one row and
    // at many rows (one tensor-core launch each).
    let mut rng = StdRng::seed_from_u64(9);
    let (cpu, cuda) = (CpuBackend::new(), emu(CudaOptions::default()));
    let k = 144;
    for (rows, widths) in [
        (1, vec![96, 24, 40]),
        (1, vec![200, 200]),
        (45, vec![200, 136]),
    ] {
        let weights: Vec<Vec<f32>> = widths
            .iter()
            .map(|&n| randn(&mut rng, n * k, 0.05))
            .collect();
        let names: Vec<String> = (0..widths.len()).map(|i| format!("w{i}")).collect();
        let specs: Vec<(&str, Vec<usize>, &[f32])> = names
            .iter()
            .zip(&widths)
            .zip(&weights)
            .map(|((name, &n), w)| (name.as_str(), vec![n, k], w.as_slice()))
            .collect();
        let ckpt = TestCheckpoint::new(BF16, &specs);
        let x = randn(&mut rng, rows * k, 1.0);
        let gx = cuda.upload_tensor(rows, k, &x).unwrap();
        let cx = cpu_tensor(k, &x);
        let mut gpu_weights = Vec::new();
        let mut gpu_outs = Vec::new();
        for (name, &n) in names.iter().zip(&widths) {
            gpu_weights.push(cuda.upload_weight(&ckpt.tensor(name, &[n, k])).unwrap());
            gpu_outs.push(cuda.alloc(rows, n).unwrap());
        }
        let mut pairs: Vec<_> = gpu_weights.iter().zip(gpu_outs.iter_mut()).collect();
        cuda.matmul_many(&gx, &mut pairs, rows).unwrap();
        for ((name, &n), out) in names.iter().zip(&widths).zip(&gpu_outs) {
            let cw = cpu.upload_weight(&ckpt.tensor(name, &[n, k])).unwrap();
            let mut co = cpu.alloc(rows, n).unwrap();
            cpu.matmul(&cx, &cw, rows, &mut co).unwrap();
            assert_close(
                &format!("matmul_many rows {rows} widths {widths:?}: {name}"),
                &cuda.read_rows(out, 0, rows).unwrap(),
                &co.data,
                1e-4,
                RTOL_BF16_OUTPUT,
            );
        }
    }
}

/// A config with the attention shape under test (the rest from a tiny fixture).
fn attention_config(num_heads: usize, num_kv_heads: usize, head_dim: usize) -> Config {
    let mut cfg = Config::from_dir(&fixture("tiny-gqa3-headdim32-f16")).unwrap();
    cfg.num_heads = num_heads;
    cfg.num_kv_heads = num_kv_heads;
    cfg.head_dim = head_dim;
    cfg.num_layers = 2;
    cfg.max_position_embeddings = 8192;
    cfg
}

#[test]
fn rope_at_near_and_far_positions() {
    let mut rng = StdRng::seed_from_u64(6);
    let cfg = attention_config(6, 2, 32);
    let (cpu, cuda) = (CpuBackend::new(), emu(CudaOptions::default()));
    let inv_freq = cfg.rope_inv_freq();
    let (cf, gf) = (
        cpu.upload_vector(&inv_freq).unwrap(),
        cuda.upload_vector(&inv_freq).unwrap(),
    );
    for (start, rows) in [(0, 1), (7, 5), (4000, 3)] {
        let opts = CacheOptions {
            max_context: start + rows,
            chunk_tokens: 16,
        };
        let mut cpu_cache = KvCache::new(&cpu, Strategy::Static, &cfg, opts).unwrap();
        let mut gpu_cache = KvCache::new(&cuda, Strategy::Static, &cfg, opts).unwrap();
        if start > 0 {
            cpu_cache.begin_step(&cpu, start).unwrap();
            cpu_cache.end_step();
            gpu_cache.begin_step(&cuda, start).unwrap();
            gpu_cache.end_step();
        }
        cpu_cache.begin_step(&cpu, rows).unwrap();
        gpu_cache.begin_step(&cuda, rows).unwrap();
        let q = randn(&mut rng, rows * cfg.q_dim(), 1.0);
        let k = randn(&mut rng, rows * cfg.kv_dim(), 1.0);
        let (mut cq, mut ck) = (cpu_tensor(cfg.q_dim(), &q), cpu_tensor(cfg.kv_dim(), &k));
        let mut gq = cuda.upload_tensor(rows, cfg.q_dim(), &q).unwrap();
        let mut gk = cuda.upload_tensor(rows, cfg.kv_dim(), &k).unwrap();
        cpu.rope(&mut cq, &mut ck, &cf, &cpu_cache).unwrap();
        cuda.rope(&mut gq, &mut gk, &gf, &gpu_cache).unwrap();
        let what = format!("rope at {start}..{}", start + rows);
        assert_close(
            &format!("{what}: q"),
            &cuda.read_rows(&gq, 0, rows).unwrap(),
            &cq.data,
            1e-3,
            RTOL_BF16_OUTPUT,
        );
        assert_close(
            &format!("{what}: k"),
            &cuda.read_rows(&gk, 0, rows).unwrap(),
            &ck.data,
            1e-3,
            RTOL_BF16_OUTPUT,
        );
    }
}

/// Appends the same K/V to a CPU and a device cache step by step and compares attention after
/// each step. Steps are (rows) in order; rows 1 runs the decode kernels.
fn check_attention(
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    strategy: Strategy,
    chunk_tokens: usize,
    steps: &[usize],
    decode_splits: usize,
) {
    let mut rng = StdRng::seed_from_u64((num_heads * 1000 + head_dim) as u64);
    let cfg = attention_config(num_heads, num_kv_heads, head_dim);
    let total: usize = steps.iter().sum();
    let opts = CacheOptions {
        max_context: total + 3,
        chunk_tokens,
    };
    let cpu = CpuBackend::new();
    let cuda = emu(CudaOptions {
        decode_splits,
        ..CudaOptions::default()
    });
    let mut cpu_cache = KvCache::new(&cpu, strategy, &cfg, opts).unwrap();
    let mut gpu_cache = KvCache::new(&cuda, strategy, &cfg, opts).unwrap();
    let layer = 1;
    for &rows in steps {
        let start = cpu_cache.len();
        cpu_cache.begin_step(&cpu, rows).unwrap();
        gpu_cache.begin_step(&cuda, rows).unwrap();
        let q = randn(&mut rng, rows * cfg.q_dim(), 1.0);
        let k = randn(&mut rng, rows * cfg.kv_dim(), 1.0);
        let v = randn(&mut rng, rows * cfg.kv_dim(), 1.0);
        let (cq, ck, cv) = (
            cpu_tensor(cfg.q_dim(), &q),
            cpu_tensor(cfg.kv_dim(), &k),
            cpu_tensor(cfg.kv_dim(), &v),
        );
        let gq = cuda.upload_tensor(rows, cfg.q_dim(), &q).unwrap();
        let gk = cuda.upload_tensor(rows, cfg.kv_dim(), &k).unwrap();
        let gv = cuda.upload_tensor(rows, cfg.kv_dim(), &v).unwrap();
        cpu.kv_append(&mut cpu_cache, layer, &ck, &cv).unwrap();
        cuda.kv_append(&mut gpu_cache, layer, &gk, &gv).unwrap();
        let mut co = cpu.alloc(rows, cfg.q_dim()).unwrap();
        let mut go = cuda.alloc(rows, cfg.q_dim()).unwrap();
        cpu.attention(&cq, &cpu_cache, layer, num_heads, &mut co)
            .unwrap();
        cuda.attention(&gq, &gpu_cache, layer, num_heads, &mut go)
            .unwrap();
        // Probabilities enter p.v as bf16 in the prefill kernel: a relative 2^-8 per weight.
        assert_close(
            &format!(
                "attention heads {num_heads}/{num_kv_heads} head_dim {head_dim} {strategy} \
                 chunk {chunk_tokens} splits {decode_splits}: positions {start}..{}",
                start + rows
            ),
            &cuda.read_rows(&go, 0, rows).unwrap(),
            &co.data,
            4e-3,
            RTOL_TWO_ROUNDINGS,
        );
        cpu_cache.end_step();
        gpu_cache.end_step();
    }
}

// Every configuration has a prefill step that sees more positions than one K/V tile (64, or
// 32 at head_dim 128) and a decode step whose split covers more positions than a block reads
// at once (64 at head_dim 16, 32 at 32, 16 at 64): both online softmaxes rescale.

#[test]
fn attention_gqa1_head_dim_16() {
    check_attention(4, 4, 16, Strategy::Static, 0, &[45, 11, 1, 1], 4);
    check_attention(4, 4, 16, Strategy::Dynamic, 7, &[130, 11, 1], 1);
}

#[test]
fn attention_gqa3_head_dim_32() {
    check_attention(6, 2, 32, Strategy::Static, 0, &[1, 1, 30, 1], 2);
    check_attention(6, 2, 32, Strategy::Dynamic, 7, &[1, 44, 40, 1, 1], 1);
}

#[test]
fn attention_gqa4_head_dim_64() {
    check_attention(8, 2, 64, Strategy::Static, 0, &[45, 30, 1], 1);
    check_attention(8, 2, 64, Strategy::Dynamic, 16, &[45, 11, 1], 3);
}

#[test]
fn attention_gqa9_head_dim_128() {
    check_attention(9, 1, 128, Strategy::Static, 0, &[20, 30, 1], 3);
    check_attention(9, 1, 128, Strategy::Dynamic, 7, &[20, 1, 1], 3);
}

#[test]
fn decode_attention_splits_a_long_sequence() {
    // 290 positions in splits of 64 (5 of 8 splits active), through both layouts.
    check_attention(8, 2, 64, Strategy::Static, 0, &[290, 1, 1], 8);
    check_attention(8, 2, 64, Strategy::Dynamic, 7, &[290, 1], 8);
}

#[test]
fn swiglu_and_row_copies() {
    let mut rng = StdRng::seed_from_u64(7);
    let (cpu, cuda) = (CpuBackend::new(), emu(CudaOptions::default()));
    let (rows, cols) = (3, 200);
    let gate = randn(&mut rng, rows * cols, 3.0);
    let up = randn(&mut rng, rows * cols, 1.0);
    let (mut cg, cu) = (cpu_tensor(cols, &gate), cpu_tensor(cols, &up));
    let mut gg = cuda.upload_tensor(rows, cols, &gate).unwrap();
    let gu = cuda.upload_tensor(rows, cols, &up).unwrap();
    cpu.swiglu(&mut cg, &cu, rows).unwrap();
    cuda.swiglu(&mut gg, &gu, rows).unwrap();
    let got = cuda.read_rows(&gg, 0, rows).unwrap();
    assert_close("swiglu", &got, &cg.data, 1e-4, RTOL_BF16_OUTPUT);

    let mut dst = cuda.alloc(4, cols).unwrap();
    cuda.copy_rows(&gg, 1, &mut dst, 2, 2).unwrap();
    assert_eq!(cuda.read_rows(&dst, 2, 2).unwrap(), got[cols..].to_vec());
}

#[test]
fn argmax_on_device_matches_the_cpu_scan() {
    let mut rng = StdRng::seed_from_u64(8);
    let (cpu, cuda) = (CpuBackend::new(), emu(CudaOptions::default()));
    for vocab in [777, 128_256] {
        let mut logits: Vec<f32> = randn(&mut rng, 2 * vocab, 1.0);
        // Row 1: a tie between two maxima far apart; the first must win.
        logits[vocab + vocab / 3] = 9.0;
        logits[vocab + vocab - 2] = 9.0;
        let cl = cpu_tensor(vocab, &logits);
        let gl = cuda.upload_precise(2, vocab, &logits).unwrap();
        let allowed: Vec<f32> = (0..vocab)
            .map(|i| if i % 5 == 3 { 0.0 } else { f32::NEG_INFINITY })
            .collect();
        let (cb, gb) = (
            cpu.upload_vector(&allowed).unwrap(),
            cuda.upload_vector(&allowed).unwrap(),
        );
        for row in 0..2 {
            assert_eq!(
                cuda.argmax(&gl, row, None).unwrap(),
                cpu.argmax(&cl, row, None).unwrap(),
                "vocab {vocab} row {row}"
            );
            assert_eq!(
                cuda.argmax(&gl, row, Some(&gb)).unwrap(),
                cpu.argmax(&cl, row, Some(&cb)).unwrap(),
                "vocab {vocab} row {row} masked"
            );
        }
    }
}

#[test]
fn kv_chunk_pool_reuses_one_size_and_frees_the_rest() {
    let cuda = emu(CudaOptions::default());
    let small = KvLayout {
        num_layers: 2,
        num_kv_heads: 2,
        head_dim: 16,
        chunk_tokens: 7,
    };
    let large = KvLayout {
        chunk_tokens: 8,
        ..small
    };
    let chunk_bytes = (small.chunk_elems() * 2) as u64;
    let chunks: Vec<_> = (0..3)
        .map(|_| cuda.alloc_kv_chunk(&small).unwrap())
        .collect();
    let addresses: Vec<u64> = chunks.iter().map(|c| c.ptr()).collect();
    drop(chunks);
    let report = cuda.memory_report().unwrap();
    assert_eq!(
        (report.kv_cache_bytes, report.kv_pool_bytes),
        (0, 3 * chunk_bytes)
    );
    // Same size: the released chunks come back.
    let again = cuda.alloc_kv_chunk(&small).unwrap();
    assert!(addresses.contains(&again.ptr()));
    // Another size (the no-cache strategy's next, longer cache): the pool empties first.
    let other = cuda.alloc_kv_chunk(&large).unwrap();
    let report = cuda.memory_report().unwrap();
    assert_eq!(report.kv_pool_bytes, 0);
    assert_eq!(
        report.kv_cache_bytes,
        chunk_bytes + (large.chunk_elems() * 2) as u64
    );
    drop((again, other));
}
