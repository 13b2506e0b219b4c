//! Every CUDA kernel alone against its CPU reference (the CPU backend's op), through the CUDA
//! backend: exactly the kernels and launch code the model runs. Inputs are rounded to bf16
//! first, so both sides see the same numbers; differences come from bf16 outputs and summation
//! order only. Shapes are small but awkward: lengths that are not multiples of any tile, one
//! row, chunk boundaries inside a step, GQA ratios 1, 3, 4 and 9.
use super::{Check, Context};
use crate::backend::cpu::{CpuBackend, CpuTensor};
use crate::backend::cuda::{CudaBackend, CudaOptions, CudaWeight};
use crate::backend::Backend;
use crate::backend::{KvStore, CHOSEN_IDS_KEPT};
use crate::kv::quant::e4m3_decode;
use crate::kv::{KvDtype, KvLayout, KvPart, LayoutKind, RowOffsets, SeqId, SeqStep, StepView};
use crate::model::config::Config;
use crate::model::weights::{Checkpoint, HostTensor};
use crate::roofline::fixture::{filled_cache, KvShape};
use anyhow::{bail, ensure, Context as _, Result};
use half::bf16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use safetensors::Dtype::{BF16, F16, F32};
use std::ops::Range;

pub const CHECKS: &[Check] = &[
    Check {
        group: "kernels",
        name: "embedding_gather",
        run: embedding_gather_copies_rows,
    },
    Check {
        group: "kernels",
        name: "rms_norm",
        run: rms_norm_of_the_residual_stream,
    },
    Check {
        group: "kernels",
        name: "matvec",
        run: matvec_for_decode_rows,
    },
    Check {
        group: "kernels",
        name: "matvec_grid_stride",
        run: matvec_covers_more_rows_than_its_grid,
    },
    Check {
        group: "kernels",
        name: "norm_in_matvec",
        run: rms_norm_staged_inside_the_matvec,
    },
    Check {
        group: "kernels",
        name: "residual_add_in_matmul",
        run: residual_added_as_the_projection_is_stored,
    },
    Check {
        group: "kernels",
        name: "swiglu_in_matvec",
        run: swiglu_staged_inside_the_down_projection,
    },
    Check {
        group: "kernels",
        name: "matmul_mma",
        run: tensor_core_matmul_with_ragged_tiles,
    },
    Check {
        group: "kernels",
        name: "matmul_many",
        run: several_weights_of_one_input,
    },
    Check {
        group: "kernels",
        name: "rope",
        run: rope_at_near_and_far_positions,
    },
    Check {
        group: "kernels",
        name: "attention_gqa1_hd16",
        run: attention_gqa1_head_dim_16,
    },
    Check {
        group: "kernels",
        name: "attention_gqa3_hd32",
        run: attention_gqa3_head_dim_32,
    },
    Check {
        group: "kernels",
        name: "attention_gqa4_hd64",
        run: attention_gqa4_head_dim_64,
    },
    Check {
        group: "kernels",
        name: "attention_gqa9_hd128",
        run: attention_gqa9_head_dim_128,
    },
    Check {
        group: "kernels",
        name: "decode_attention_splits",
        run: decode_attention_splits_a_long_sequence,
    },
    Check {
        group: "kernels",
        name: "rope_kv_append_batch",
        run: rope_and_kv_append_of_several_sequences,
    },
    Check {
        group: "kernels",
        name: "rope_kv_append_fused",
        run: rope_and_kv_append_in_one_pass,
    },
    Check {
        group: "kernels",
        name: "batch_attention_gqa1_hd16",
        run: batch_attention_gqa1_head_dim_16,
    },
    Check {
        group: "kernels",
        name: "batch_attention_gqa3_hd32",
        run: batch_attention_gqa3_head_dim_32,
    },
    Check {
        group: "kernels",
        name: "batch_attention_gqa4_hd64_long",
        run: batch_attention_gqa4_head_dim_64_long,
    },
    Check {
        group: "kernels",
        name: "batch_attention_gqa8_hd64",
        run: batch_attention_gqa8_head_dim_64,
    },
    Check {
        group: "kernels",
        name: "batch_attention_gqa9_hd128",
        run: batch_attention_gqa9_head_dim_128,
    },
    Check {
        group: "kernels",
        name: "decode_attention_long",
        run: decode_attention_at_long_contexts,
    },
    Check {
        group: "kernels",
        name: "quantized_kv_append",
        run: quantized_kv_append_matches_the_cpu,
    },
    Check {
        group: "kernels",
        name: "attention_int8",
        run: attention_over_int8_caches,
    },
    Check {
        group: "kernels",
        name: "attention_fp8",
        run: attention_over_fp8_caches,
    },
    Check {
        group: "kernels",
        name: "batch_attention_quantized",
        run: batch_attention_over_quantized_caches,
    },
    Check {
        group: "kernels",
        name: "swiglu",
        run: swiglu_in_place,
    },
    Check {
        group: "kernels",
        name: "argmax",
        run: argmax_on_device_matches_the_cpu_scan,
    },
    Check {
        group: "kernels",
        name: "chosen_ids",
        run: chosen_ids_stay_on_the_backend,
    },
];

/// One bf16 rounding of a value (relative 2^-8) plus f32 summation-order noise.
const RTOL_BF16_OUTPUT: f32 = 1.0 / 128.0;
/// Two roundings in sequence (attention: probabilities rounded to bf16 for p.v, then the output).
const RTOL_TWO_ROUNDINGS: f32 = 1.0 / 64.0;

/// Absolute tolerance of attention over unit-scale K/V: the bf16 probabilities of p.v in the
/// prefill kernel; int8 and fp8 caches add the rounding to bf16 of every dequantized K and V
/// entry in its tiles (2^-9 of each: about 2e-3 on the scores of 64 products of unit values
/// and on the outputs), where the CPU (and the decode kernel) multiply the scales in f32.
fn attention_atol(dtype: KvDtype) -> f32 {
    if dtype.is_quantized() {
        8e-3
    } else {
        4e-3
    }
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

/// |got - want| <= atol + rtol |want| everywhere, or an error naming the worst element.
pub fn check_close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) -> Result<()> {
    ensure!(
        got.len() == want.len(),
        "{what}: {} values on the device, {} on the CPU",
        got.len(),
        want.len()
    );
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
        bail!(
            "{what}: element {i} is {} on the device, {} on the CPU (atol {atol}, rtol {rtol})",
            got[i],
            want[i]
        );
    }
    Ok(())
}

/// A checkpoint in a temporary folder, read back through kvlab's loader so that both backends
/// upload the same `HostTensor`s.
struct TestCheckpoint {
    _dir: tempfile::TempDir,
    checkpoint: Checkpoint,
}

impl TestCheckpoint {
    fn new(dtype: safetensors::Dtype, tensors: &[(&str, Vec<usize>, &[f32])]) -> Result<Self> {
        let dir = tempfile::tempdir().context("creating a temporary checkpoint folder")?;
        let bytes: Vec<Vec<u8>> = tensors
            .iter()
            .map(|(_, _, values)| {
                values
                    .iter()
                    .flat_map(|&v| match dtype {
                        BF16 => bf16::from_f32(v).to_le_bytes().to_vec(),
                        F16 => half::f16::from_f32(v).to_le_bytes().to_vec(),
                        _ => v.to_le_bytes().to_vec(),
                    })
                    .collect()
            })
            .collect();
        let views = tensors
            .iter()
            .zip(&bytes)
            .map(|((name, shape, _), data)| {
                let view = safetensors::tensor::TensorView::new(dtype, shape.clone(), data)?;
                Ok((name.to_string(), view))
            })
            .collect::<Result<Vec<_>>>()?;
        safetensors::serialize_to_file(views, None, &dir.path().join("model.safetensors"))?;
        let checkpoint = Checkpoint::open(dir.path())?;
        Ok(TestCheckpoint {
            _dir: dir,
            checkpoint,
        })
    }

    fn tensor(&self, name: &str, shape: &[usize]) -> Result<HostTensor> {
        self.checkpoint.tensor(name, shape)
    }
}

fn cpu_tensor(cols: usize, values: &[f32]) -> CpuTensor {
    CpuTensor {
        data: values.to_vec(),
        cols,
    }
}

fn embedding_gather_copies_rows(ctx: &Context) -> Result<String> {
    let mut rng = StdRng::seed_from_u64(1);
    let (vocab, hidden) = (37, 96);
    // Unrounded values: an f32 table is stored as bf16 pairs and must come back to 2^-17.
    let table: Vec<f32> = (0..vocab * hidden)
        .map(|_| rng.sample::<f32, _>(StandardNormal))
        .collect();
    for (dtype, rtol) in [(BF16, 0.0), (F32, 1e-5)] {
        let ckpt = TestCheckpoint::new(dtype, &[("embed", vec![vocab, hidden], &table)])?;
        let (cpu, cuda) = (CpuBackend::new(), ctx.backend(CudaOptions::default())?);
        let host = ckpt.tensor("embed", &[vocab, hidden])?;
        let (cw, gw) = (cpu.upload_weight(&host)?, cuda.upload_weight(&host)?);
        let ids = [0u32, 36, 5, 5, 17];
        let mut co = cpu.alloc_precise(ids.len(), hidden)?;
        let mut go = cuda.alloc_precise(ids.len(), hidden)?;
        cpu.embed(&cw, &ids, &mut co)?;
        cuda.embed(&gw, &ids, &mut go)?;
        check_close(
            &format!("embedding {dtype:?}"),
            &cuda.read_rows(&go, 0, ids.len())?,
            &co.data,
            0.0,
            rtol,
        )?;
        match cuda.embed(&gw, &[3, 37], &mut go) {
            Ok(()) => bail!("id 37 of a vocabulary of 37 was accepted"),
            Err(error) => ensure!(error.to_string().contains("37"), "{error}"),
        }
    }
    Ok("bf16 and f32 tables".into())
}

fn rms_norm_of_the_residual_stream(ctx: &Context) -> Result<String> {
    let mut rng = StdRng::seed_from_u64(2);
    for (rows, dim) in [(3, 144), (1, 2056)] {
        let weight: Vec<f32> = (0..dim)
            .map(|_| 1.0 + 0.1 * rng.sample::<f32, _>(StandardNormal))
            .collect();
        let ckpt = TestCheckpoint::new(BF16, &[("norm", vec![dim], &weight)])?;
        let (cpu, cuda) = (CpuBackend::new(), ctx.backend(CudaOptions::default())?);
        let host = ckpt.tensor("norm", &[dim])?;
        let (cw, gw) = (cpu.upload_weight(&host)?, cuda.upload_weight(&host)?);
        let x = randn(&mut rng, rows * dim, 2.0);
        let mut co = cpu.alloc(rows, dim)?;
        let mut go = cuda.alloc(rows, dim)?;
        cpu.rms_norm(&cpu_tensor(dim, &x), &cw, 1e-5, rows, &mut co)?;
        cuda.rms_norm(
            &cuda.upload_precise(rows, dim, &x)?,
            &gw,
            1e-5,
            rows,
            &mut go,
        )?;
        check_close(
            &format!("rms norm rows {rows} dim {dim}"),
            &cuda.read_rows(&go, 0, rows)?,
            &co.data,
            1e-4,
            RTOL_BF16_OUTPUT,
        )?;
    }
    Ok("dims 144 and 2056".into())
}

/// One matmul on both backends: `rows` of x against a `[n, k]` weight stored as `dtype`.
fn check_matmul(
    rng: &mut StdRng,
    cuda: &CudaBackend,
    (rows, n, k): (usize, usize, usize),
    f32_out: bool,
    dtype: safetensors::Dtype,
) -> Result<()> {
    let cpu = CpuBackend::new();
    // Unrounded: an f16 / f32 checkpoint keeps digits that plain bf16 would lose.
    let w: Vec<f32> = (0..n * k)
        .map(|_| rng.sample::<f32, _>(StandardNormal) * 0.05)
        .collect();
    let x = randn(rng, rows * k, 1.0);
    let ckpt = TestCheckpoint::new(dtype, &[("w", vec![n, k], &w)])?;
    let host = ckpt.tensor("w", &[n, k])?;
    let (cw, gw) = (cpu.upload_weight(&host)?, cuda.upload_weight(&host)?);
    let cx = cpu_tensor(k, &x);
    let mut co = cpu.alloc(rows, n)?;
    cpu.matmul(&cx, &cw, rows, &mut co)?;
    let gx = cuda.upload_tensor(rows, k, &x)?;
    let mut go = if f32_out {
        cuda.alloc_precise(rows, n)?
    } else {
        cuda.alloc(rows, n)?
    };
    cuda.matmul(&gx, &gw, rows, &mut go)?;
    // f32 outputs differ by summation order only (and, for f16 / f32 weights, by the 2^-17
    // relative error of the bf16 pairs): far below what rounding weights to bf16 would cause.
    let rtol = if f32_out { 1e-4 } else { RTOL_BF16_OUTPUT };
    check_close(
        &format!("matmul rows {rows} n {n} k {k} f32 out {f32_out} weights {dtype:?}"),
        &cuda.read_rows(&go, 0, rows)?,
        &co.data,
        1e-4,
        rtol,
    )
}

fn matvec_for_decode_rows(ctx: &Context) -> Result<String> {
    let mut rng = StdRng::seed_from_u64(3);
    let cuda = ctx.backend(CudaOptions::default())?;
    // k: the tiny models' widths, SmolLM2's 576, Llama-3.2-1B's 2048 (one round trip of a
    // warp's loads exactly) and one vector past it (a second round trip of one load); n: fewer
    // and more rows than a block's 8 warps; 777 logits (odd) in f32.
    for (n, k) in [
        (200, 96),
        (24, 144),
        (320, 128),
        (96, 320),
        (40, 576),
        (64, 2048),
    ] {
        check_matmul(&mut rng, &cuda, (1, n, k), false, BF16)?;
    }
    check_matmul(&mut rng, &cuda, (1, 1000, 2056), false, BF16)?;
    check_matmul(&mut rng, &cuda, (1, 777, 128), true, BF16)?;
    // bf16 pairs: rows of 2k, two round trips at k = 2048.
    check_matmul(&mut rng, &cuda, (1, 200, 96), true, F32)?;
    check_matmul(&mut rng, &cuda, (1, 200, 96), true, F16)?;
    check_matmul(&mut rng, &cuda, (1, 24, 2048), false, F32)?;
    Ok("11 shapes, bf16 / f32 / f16 weights".into())
}

fn matvec_covers_more_rows_than_its_grid(ctx: &Context) -> Result<String> {
    // The grid is what the device holds at once (occupancy x SMs); twice as many rows as its
    // warps make every warp stride over several rows.
    let (kernel, k) = ("matvec_bf16_out_f32", 64);
    let per_sm = ctx
        .device
        .max_active_blocks_per_multiprocessor(kernel, 256, (k * 2) as u32)?;
    let resident = per_sm as usize * ctx.device.multiprocessors() as usize;
    let n = 2 * resident * 8 + 3;
    let mut rng = StdRng::seed_from_u64(4);
    let ckpt = random_weights(&mut rng, BF16, &[(n, k)])?;
    let host = ckpt.tensor("w0", &[n, k])?;
    let (cpu, cuda) = (CpuBackend::new(), ctx.backend(CudaOptions::default())?);
    let (cw, gw) = (cpu.upload_weight(&host)?, cuda.upload_weight(&host)?);
    let x = randn(&mut rng, k, 1.0);
    let mut co = cpu.alloc(1, n)?;
    cpu.matmul(&cpu_tensor(k, &x), &cw, 1, &mut co)?;
    let gx = cuda.upload_tensor(1, k, &x)?;
    let mut go = cuda.alloc_precise(1, n)?;
    // Recorded as a step, so that its launch can be read back.
    cuda.run_step(&mut || cuda.matmul(&gx, &gw, 1, &mut go))?;
    check_close(
        &format!("matvec of {n} rows"),
        &cuda.read_rows(&go, 0, 1)?,
        &co.data,
        1e-4,
        1e-4,
    )?;
    let launches = cuda.last_step_launches();
    ensure!(
        launches.len() == 1 && launches[0].0 == kernel,
        "one {kernel} launch expected, got {launches:?}"
    );
    let grid = launches[0].1.grid[0] as usize;
    ensure!(
        grid == resident,
        "{kernel}: a grid of {grid} blocks where the device holds {resident} at once"
    );
    Ok(format!(
        "{n} rows over {resident} blocks ({per_sm} a multiprocessor x {})",
        ctx.device.multiprocessors()
    ))
}

/// Fused against unfused on the device: the same kernels' code stages the same bf16 values,
/// so the emulator must agree to the bit; a GPU's compiler may contract the two kernels'
/// float arithmetic differently, so there one rounding of a bf16 output is allowed.
fn check_fused(ctx: &Context, what: &str, fused: &[f32], unfused: &[f32]) -> Result<()> {
    if !ctx.emulated {
        return check_close(what, fused, unfused, 1e-3, RTOL_BF16_OUTPUT);
    }
    ensure!(fused.len() == unfused.len(), "{what}: lengths differ");
    match fused
        .iter()
        .zip(unfused)
        .position(|(a, b)| a.to_bits() != b.to_bits())
    {
        Some(i) => bail!(
            "{what}: element {i} is {} fused, {} unfused (bit-identical expected)",
            fused[i],
            unfused[i]
        ),
        None => Ok(()),
    }
}

/// Random `[n, k]` matrices named w0, w1, ... of N(0, 0.05²), unrounded (an f16 / f32
/// checkpoint keeps digits that bf16 would lose), written as `dtype`.
fn random_weights(
    rng: &mut StdRng,
    dtype: safetensors::Dtype,
    shapes: &[(usize, usize)],
) -> Result<TestCheckpoint> {
    let values: Vec<Vec<f32>> = shapes
        .iter()
        .map(|&(n, k)| {
            (0..n * k)
                .map(|_| rng.sample::<f32, _>(StandardNormal) * 0.05)
                .collect()
        })
        .collect();
    let names: Vec<String> = (0..shapes.len()).map(|i| format!("w{i}")).collect();
    let specs: Vec<(&str, Vec<usize>, &[f32])> = names
        .iter()
        .zip(shapes)
        .zip(&values)
        .map(|((name, &(n, k)), v)| (name.as_str(), vec![n, k], v.as_slice()))
        .collect();
    TestCheckpoint::new(dtype, &specs)
}

/// The staged input of a fused matvec is rounded to bf16 on the device, and the CPU reference
/// rounds its f32 input the same way; a value whose f32 lies within an ulp of a bf16 rounding
/// boundary may still round the other way (the sums run in another order), moving an output
/// by |w| x 2^-8 x |x|, about 2e-4 here. Plus the output's own rounding.
const ATOL_STAGED_INPUT: f32 = 1e-3;

/// A norm staged inside a matvec: rows `normed` of an x of `x_rows` rows and `k` columns, into
/// projections of these widths (three a launch), stored as `dtype`, with f32 outputs or bf16.
struct NormCase {
    k: usize,
    widths: &'static [usize],
    x_rows: usize,
    normed: Range<usize>,
    dtype: safetensors::Dtype,
    f32_out: bool,
}

fn rms_norm_staged_inside_the_matvec(ctx: &Context) -> Result<String> {
    let case = |k, widths, x_rows, normed, dtype, f32_out| NormCase {
        k,
        widths,
        x_rows,
        normed,
        dtype,
        f32_out,
    };
    // Llama-3.2-1B's q, k, v; SmolLM2's q, k, v and (bf16 pairs) gate, up; four odd widths of
    // 8 x 17 (two launches) from the last of 5 rows; the logits of the last row (f32); many
    // rows (the norm kernel, then tensor cores).
    let cases = [
        case(2048, &[2048, 512, 512], 1, 0..1, BF16, false),
        case(576, &[576, 192, 192], 1, 0..1, BF16, false),
        case(576, &[1536, 1536], 1, 0..1, F32, false),
        case(136, &[24, 8, 40, 16], 5, 4..5, BF16, false),
        case(136, &[777], 5, 4..5, F16, true),
        case(136, &[40, 24], 5, 0..5, BF16, false),
    ];
    let mut rng = StdRng::seed_from_u64(10);
    let (cpu, cuda) = (CpuBackend::new(), ctx.backend(CudaOptions::default())?);
    let eps = 1e-5;
    for NormCase {
        k,
        widths,
        x_rows,
        normed,
        dtype,
        f32_out,
    } in cases
    {
        let what = format!("norm + matvec k {k} widths {widths:?} rows {normed:?} of {x_rows}");
        let rows = normed.len();
        let norm: Vec<f32> = (0..k)
            .map(|_| 1.0 + 0.1 * rng.sample::<f32, _>(StandardNormal))
            .collect();
        let norm_ckpt = TestCheckpoint::new(F32, &[("norm", vec![k], &norm)])?;
        let norm_host = norm_ckpt.tensor("norm", &[k])?;
        let (cpu_norm, gpu_norm) = (
            cpu.upload_weight(&norm_host)?,
            cuda.upload_weight(&norm_host)?,
        );
        let shapes: Vec<(usize, usize)> = widths.iter().map(|&n| (n, k)).collect();
        let ckpt = random_weights(&mut rng, dtype, &shapes)?;
        let x: Vec<f32> = (0..x_rows * k)
            .map(|_| 2.0 * rng.sample::<f32, _>(StandardNormal))
            .collect();
        let x_normed = &x[normed.start * k..normed.end * k];
        let alloc_out = |n| {
            if f32_out {
                cuda.alloc_precise(rows, n)
            } else {
                cuda.alloc(rows, n)
            }
        };

        // The CPU reference: the norm in f32, rounded to bf16 as the device stages it, then
        // each projection.
        let mut cpu_normed = cpu.alloc(rows, k)?;
        cpu.rms_norm(
            &cpu_tensor(k, x_normed),
            &cpu_norm,
            eps,
            rows,
            &mut cpu_normed,
        )?;
        let cpu_normed = cpu_tensor(k, &round_bf16(cpu_normed.data));

        let gx = cuda.upload_precise(x_rows, k, &x)?;
        let gx_normed = cuda.upload_precise(rows, k, x_normed)?;
        let mut staged = cuda.alloc(rows, k)?;
        cuda.rms_norm(&gx_normed, &gpu_norm, eps, rows, &mut staged)?;
        let mut weights = Vec::new();
        let (mut fused, mut unfused) = (Vec::new(), Vec::new());
        for (i, &n) in widths.iter().enumerate() {
            weights.push(cuda.upload_weight(&ckpt.tensor(&format!("w{i}"), &[n, k])?)?);
            fused.push(alloc_out(n)?);
            unfused.push(alloc_out(n)?);
        }
        let mut pairs: Vec<_> = weights.iter().zip(fused.iter_mut()).collect();
        cuda.rms_norm_matmul_many(&gx, normed.clone(), &gpu_norm, eps, &mut pairs)?;
        let mut pairs: Vec<_> = weights.iter().zip(unfused.iter_mut()).collect();
        cuda.matmul_many(&staged, &mut pairs, rows)?;

        for (i, &n) in widths.iter().enumerate() {
            let cw = cpu.upload_weight(&ckpt.tensor(&format!("w{i}"), &[n, k])?)?;
            let mut co = cpu.alloc(rows, n)?;
            cpu.matmul(&cpu_normed, &cw, rows, &mut co)?;
            let got = cuda.read_rows(&fused[i], 0, rows)?;
            let what = format!("{what}: w{i} {dtype:?}");
            check_fused(ctx, &what, &got, &cuda.read_rows(&unfused[i], 0, rows)?)?;
            let rtol = if f32_out { 1e-4 } else { RTOL_BF16_OUTPUT };
            check_close(&what, &got, &co.data, ATOL_STAGED_INPUT, rtol)?;
        }
    }
    Ok("6 cases: hidden 2048 and 576, 8 x 17, pairs, last row, many rows".into())
}

fn residual_added_as_the_projection_is_stored(ctx: &Context) -> Result<String> {
    // (rows, n, k, weights): Llama-3.2-1B's and SmolLM2's o_proj; odd shapes with bf16 pairs;
    // many rows (tensor cores).
    let cases = [
        (1, 2048, 2048, BF16),
        (1, 576, 576, BF16),
        (1, 200, 136, F32),
        (5, 200, 136, BF16),
        (45, 136, 200, F16),
    ];
    let mut rng = StdRng::seed_from_u64(11);
    let (cpu, cuda) = (CpuBackend::new(), ctx.backend(CudaOptions::default())?);
    for (rows, n, k, dtype) in cases {
        let what = format!("matmul_add rows {rows} n {n} k {k} {dtype:?}");
        let ckpt = random_weights(&mut rng, dtype, &[(n, k)])?;
        let host = ckpt.tensor("w0", &[n, k])?;
        let (cw, gw) = (cpu.upload_weight(&host)?, cuda.upload_weight(&host)?);
        let x = randn(&mut rng, rows * k, 1.0);
        let residual: Vec<f32> = (0..rows * n)
            .map(|_| rng.sample::<f32, _>(StandardNormal))
            .collect();

        let mut cpu_residual = cpu_tensor(n, &residual);
        cpu.matmul_add(&cpu_tensor(k, &x), &cw, rows, &mut cpu_residual)?;

        let gx = cuda.upload_tensor(rows, k, &x)?;
        let mut fused = cuda.upload_precise(rows, n, &residual)?;
        cuda.matmul_add(&gx, &gw, rows, &mut fused)?;
        let mut product = cuda.alloc_precise(rows, n)?;
        cuda.matmul(&gx, &gw, rows, &mut product)?;
        let unfused: Vec<f32> = residual
            .iter()
            .zip(cuda.read_rows(&product, 0, rows)?)
            .map(|(r, p)| r + p)
            .collect();
        let got = cuda.read_rows(&fused, 0, rows)?;
        check_fused(ctx, &what, &got, &unfused)?;
        // f32 on both sides: summation order only (and the pairs' 2^-17 of the weights).
        check_close(&what, &got, &cpu_residual.data, 1e-4, 1e-4)?;
    }
    Ok("5 cases: 2048 and 576 wide, pairs, many rows".into())
}

fn swiglu_staged_inside_the_down_projection(ctx: &Context) -> Result<String> {
    // (rows, n, k, weights): SmolLM2's down_proj; an intermediate of 8192 (Llama-3.2-1B's: four
    // round trips a row) to 256 outputs; odd shapes with bf16 pairs; many rows.
    let cases = [
        (1, 576, 1536, BF16),
        (1, 256, 8192, BF16),
        (1, 200, 136, F32),
        (3, 200, 136, BF16),
    ];
    let mut rng = StdRng::seed_from_u64(12);
    let (cpu, cuda) = (CpuBackend::new(), ctx.backend(CudaOptions::default())?);
    for (rows, n, k, dtype) in cases {
        let what = format!("swiglu_matmul_add rows {rows} n {n} k {k} {dtype:?}");
        let ckpt = random_weights(&mut rng, dtype, &[(n, k)])?;
        let host = ckpt.tensor("w0", &[n, k])?;
        let (cw, gw) = (cpu.upload_weight(&host)?, cuda.upload_weight(&host)?);
        let gate = randn(&mut rng, rows * k, 3.0);
        let up = randn(&mut rng, rows * k, 1.0);
        let residual: Vec<f32> = (0..rows * n)
            .map(|_| rng.sample::<f32, _>(StandardNormal))
            .collect();

        // The CPU reference: the SwiGLU rounded to bf16 as the device stages it.
        let mut activated = cpu_tensor(k, &gate);
        cpu.swiglu(&mut activated, &cpu_tensor(k, &up), rows)?;
        let mut cpu_residual = cpu_tensor(n, &residual);
        let activated = cpu_tensor(k, &round_bf16(activated.data));
        cpu.matmul_add(&activated, &cw, rows, &mut cpu_residual)?;

        let (gg, gu) = (
            cuda.upload_tensor(rows, k, &gate)?,
            cuda.upload_tensor(rows, k, &up)?,
        );
        let mut fused = cuda.upload_precise(rows, n, &residual)?;
        cuda.swiglu_matmul_add(&gg, &gu, &gw, rows, &mut fused)?;
        ensure!(
            cuda.read_rows(&gg, 0, rows)? == round_bf16(gate.clone()),
            "{what}: gate changed"
        );
        let mut unfused_gate = cuda.upload_tensor(rows, k, &gate)?;
        cuda.swiglu(&mut unfused_gate, &gu, rows)?;
        let mut product = cuda.alloc_precise(rows, n)?;
        cuda.matmul(&unfused_gate, &gw, rows, &mut product)?;
        let unfused: Vec<f32> = residual
            .iter()
            .zip(cuda.read_rows(&product, 0, rows)?)
            .map(|(r, p)| r + p)
            .collect();
        let got = cuda.read_rows(&fused, 0, rows)?;
        check_fused(ctx, &what, &got, &unfused)?;
        check_close(&what, &got, &cpu_residual.data, ATOL_STAGED_INPUT, 1e-4)?;
    }
    Ok("4 cases: intermediate 1536 and 8192, pairs, many rows".into())
}

fn tensor_core_matmul_with_ragged_tiles(ctx: &Context) -> Result<String> {
    let mut rng = StdRng::seed_from_u64(5);
    let cuda = ctx.backend(CudaOptions::default())?;
    // m, n, k around the 128 x 128 x 32 tiles: below, just above, and not multiples.
    for shape in [(2, 200, 96), (45, 128, 144), (130, 136, 200), (45, 96, 328)] {
        check_matmul(&mut rng, &cuda, shape, false, BF16)?;
    }
    check_matmul(&mut rng, &cuda, (45, 777, 128), true, BF16)?;
    check_matmul(&mut rng, &cuda, (45, 200, 136), true, F32)?;
    check_matmul(&mut rng, &cuda, (45, 200, 136), true, F16)?;
    Ok("7 shapes, bf16 / f32 / f16 weights".into())
}

fn several_weights_of_one_input(ctx: &Context) -> Result<String> {
    // q, k, v-like (one launch for three weights at one row) and gate, up-like, at one row and
    // at many rows (one tensor-core launch each).
    let mut rng = StdRng::seed_from_u64(9);
    let (cpu, cuda) = (CpuBackend::new(), ctx.backend(CudaOptions::default())?);
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
        let ckpt = TestCheckpoint::new(BF16, &specs)?;
        let x = randn(&mut rng, rows * k, 1.0);
        let gx = cuda.upload_tensor(rows, k, &x)?;
        let cx = cpu_tensor(k, &x);
        let mut gpu_weights = Vec::new();
        let mut gpu_outs = Vec::new();
        for (name, &n) in names.iter().zip(&widths) {
            gpu_weights.push(cuda.upload_weight(&ckpt.tensor(name, &[n, k])?)?);
            gpu_outs.push(cuda.alloc(rows, n)?);
        }
        let mut pairs: Vec<_> = gpu_weights.iter().zip(gpu_outs.iter_mut()).collect();
        cuda.matmul_many(&gx, &mut pairs, rows)?;
        for ((name, &n), out) in names.iter().zip(&widths).zip(&gpu_outs) {
            let cw = cpu.upload_weight(&ckpt.tensor(name, &[n, k])?)?;
            let mut co = cpu.alloc(rows, n)?;
            cpu.matmul(&cx, &cw, rows, &mut co)?;
            check_close(
                &format!("matmul_many rows {rows} widths {widths:?}: {name}"),
                &cuda.read_rows(out, 0, rows)?,
                &co.data,
                1e-4,
                RTOL_BF16_OUTPUT,
            )?;
        }
    }
    Ok("3 groups".into())
}

/// How a check names its split count.
fn splits_text(decode_splits: Option<usize>) -> String {
    decode_splits.map_or("from the context".into(), |n| n.to_string())
}

/// A config with the attention shape under test (the rest from a tiny fixture).
fn attention_config(
    ctx: &Context,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
) -> Result<Config> {
    let mut cfg = Config::from_dir(&ctx.fixtures.join("tiny-gqa3-headdim32-f16"))?;
    cfg.num_heads = num_heads;
    cfg.num_kv_heads = num_kv_heads;
    cfg.head_dim = head_dim;
    // Three layers: with one KV head (GQA 9) an int8 position is then an odd multiple of 4
    // bytes, so chunks of 7 start on 4-byte boundaries only, where a wider load would fault.
    cfg.num_layers = 3;
    cfg.max_position_embeddings = 8192;
    Ok(cfg)
}

fn rope_at_near_and_far_positions(ctx: &Context) -> Result<String> {
    let mut rng = StdRng::seed_from_u64(6);
    let cfg = attention_config(ctx, 6, 2, 32)?;
    let (cpu, cuda) = (CpuBackend::new(), ctx.backend(CudaOptions::default())?);
    let inv_freq = cfg.rope_inv_freq();
    let (cf, gf) = (
        cpu.upload_vector(&inv_freq)?,
        cuda.upload_vector(&inv_freq)?,
    );
    for (start, rows) in [(0, 1), (7, 5), (4000, 3)] {
        let mut cpu_cache =
            filled_cache(&cpu, &cfg, KvShape::Contiguous, KvDtype::F32, start, rows)?;
        let mut gpu_cache =
            filled_cache(&cuda, &cfg, KvShape::Contiguous, KvDtype::Bf16, start, rows)?;
        let q = randn(&mut rng, rows * cfg.q_dim(), 1.0);
        let k = randn(&mut rng, rows * cfg.kv_dim(), 1.0);
        let (mut cq, mut ck) = (cpu_tensor(cfg.q_dim(), &q), cpu_tensor(cfg.kv_dim(), &k));
        let mut gq = cuda.upload_tensor(rows, cfg.q_dim(), &q)?;
        let mut gk = cuda.upload_tensor(rows, cfg.kv_dim(), &k)?;
        cpu_cache.step(&cpu, rows, |memory, view| {
            cpu.rope(&mut cq, &mut ck, &cf, memory, view)
        })?;
        gpu_cache.step(&cuda, rows, |memory, view| {
            cuda.rope(&mut gq, &mut gk, &gf, memory, view)
        })?;
        let what = format!("rope at {start}..{}", start + rows);
        check_close(
            &format!("{what}: q"),
            &cuda.read_rows(&gq, 0, rows)?,
            &cq.data,
            1e-3,
            RTOL_BF16_OUTPUT,
        )?;
        check_close(
            &format!("{what}: k"),
            &cuda.read_rows(&gk, 0, rows)?,
            &ck.data,
            1e-3,
            RTOL_BF16_OUTPUT,
        )?;
    }
    Ok("positions 0, 7..12, 4000..4003".into())
}

/// One attention configuration: heads, KV heads, head_dim, layout, and the rows of each step.
struct AttentionCase<'a> {
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    /// The element type of both caches.
    dtype: KvDtype,
    shape: KvShape,
    steps: &'a [usize],
    /// The grid's splits; None: chosen from the context.
    decode_splits: Option<usize>,
}

/// Appends the same K/V to a CPU and a device cache step by step and compares attention after
/// each step. Steps are (rows) in order; rows 1 runs the decode kernels.
fn check_attention(ctx: &Context, case: AttentionCase) -> Result<()> {
    let AttentionCase {
        num_heads,
        num_kv_heads,
        head_dim,
        dtype,
        shape,
        steps,
        decode_splits,
    } = case;
    let mut rng = StdRng::seed_from_u64((num_heads * 1000 + head_dim) as u64);
    let cfg = attention_config(ctx, num_heads, num_kv_heads, head_dim)?;
    let total: usize = steps.iter().sum();
    let cpu = CpuBackend::new();
    let cuda = ctx.backend(CudaOptions {
        decode_splits,
        ..CudaOptions::default()
    })?;
    // The CPU reads the same entries the kernels store: bf16 values, or the same int8 or fp8
    // codes and scales (both quantize the same bf16 inputs alike: kernels/quantized_kv_append).
    let mut cpu_cache = filled_cache(&cpu, &cfg, shape, dtype, 0, total + 3)?;
    let mut gpu_cache = filled_cache(&cuda, &cfg, shape, dtype, 0, total + 3)?;
    let layer = 1;
    for &rows in steps {
        let start = cpu_cache.len();
        let q = randn(&mut rng, rows * cfg.q_dim(), 1.0);
        let k = randn(&mut rng, rows * cfg.kv_dim(), 1.0);
        let v = randn(&mut rng, rows * cfg.kv_dim(), 1.0);
        let (cq, ck, cv) = (
            cpu_tensor(cfg.q_dim(), &q),
            cpu_tensor(cfg.kv_dim(), &k),
            cpu_tensor(cfg.kv_dim(), &v),
        );
        let gq = cuda.upload_tensor(rows, cfg.q_dim(), &q)?;
        let gk = cuda.upload_tensor(rows, cfg.kv_dim(), &k)?;
        let gv = cuda.upload_tensor(rows, cfg.kv_dim(), &v)?;
        let mut co = cpu.alloc(rows, cfg.q_dim())?;
        let mut go = cuda.alloc(rows, cfg.q_dim())?;
        cpu_cache.step(&cpu, rows, |memory, view| {
            cpu.kv_append(memory, view, layer, &ck, &cv)?;
            cpu.attention(&cq, memory, view, layer, num_heads, &mut co)
        })?;
        gpu_cache.step(&cuda, rows, |memory, view| {
            cuda.kv_append(memory, view, layer, &gk, &gv)?;
            cuda.attention(&gq, memory, view, layer, num_heads, &mut go)
        })?;
        // Probabilities enter p.v as bf16 in the prefill kernel: a relative 2^-8 per weight;
        // its K/V tiles hold int8 and fp8 entries dequantized to bf16: 2^-9 of each.
        check_close(
            &format!(
                "attention heads {num_heads}/{num_kv_heads} head_dim {head_dim} {dtype} {shape} \
                 splits {}: positions {start}..{}",
                splits_text(decode_splits),
                start + rows
            ),
            &cuda.read_rows(&go, 0, rows)?,
            &co.data,
            attention_atol(dtype),
            RTOL_TWO_ROUNDINGS,
        )?;
    }
    Ok(())
}

// Every configuration has a prefill step that sees more positions than one K/V tile (64, or
// 32 at head_dim 128) and a decode step whose split covers more positions than a block loads
// at once (256 at head_dim 16, 128 at 32, 64 at 64, 32 at 128): both online softmaxes rescale.

/// Two cases of one shape: (layout, steps, splits) each.
fn attention_cases(
    ctx: &Context,
    (num_heads, num_kv_heads, head_dim): (usize, usize, usize),
    cases: [(KvShape, &[usize], Option<usize>); 2],
) -> Result<String> {
    for (shape, steps, decode_splits) in cases {
        check_attention(
            ctx,
            AttentionCase {
                num_heads,
                num_kv_heads,
                head_dim,
                dtype: KvDtype::Bf16,
                shape,
                steps,
                decode_splits,
            },
        )?;
    }
    Ok("contiguous and chunked".into())
}

/// Attention over int8 or fp8 caches, the codes written by each backend's own append: GQA 1, 3,
/// 4 and 9, head_dim 16 (an int8 key row is one group) to 128 (eight), both layouts, chunks of
/// 7 (a quantized chunk that starts on a 4-byte boundary only) and 16, prefill steps of more
/// than a K/V tile, decode over several splits, over more positions than a block loads and over
/// more chunks than its table window.
fn quantized_attention_cases(ctx: &Context, dtype: KvDtype) -> Result<String> {
    let case = |(num_heads, num_kv_heads, head_dim): (usize, usize, usize),
                shape: KvShape,
                steps: &'static [usize],
                decode_splits: Option<usize>| AttentionCase {
        num_heads,
        num_kv_heads,
        head_dim,
        dtype,
        shape,
        steps,
        decode_splits,
    };
    for case in [
        case((4, 4, 16), KvShape::Contiguous, &[45, 11, 1, 1], Some(4)),
        case(
            (6, 2, 32),
            KvShape::Chunked(7),
            &[1, 44, 140, 1, 1],
            Some(1),
        ),
        case((8, 2, 64), KvShape::Chunked(16), &[45, 11, 1], Some(3)),
        case((8, 2, 64), KvShape::Chunked(7), &[290, 1, 1], Some(8)),
        case((9, 1, 128), KvShape::Contiguous, &[20, 30, 1], Some(1)),
        case((9, 1, 128), KvShape::Chunked(7), &[20, 1, 1], Some(3)),
        // One split over several of a block's loads (128 positions at head_dim 64, 512 at 16)
        // and, in chunks of 7, over more chunks than a block's table window.
        case((8, 2, 64), KvShape::Contiguous, &[600, 1], Some(1)),
        case((4, 4, 16), KvShape::Chunked(7), &[700, 1, 1], Some(1)),
    ] {
        check_attention(ctx, case)?;
    }
    Ok(format!(
        "{dtype}: GQA 1, 3, 4, 9; head_dim 16 to 128; contiguous, chunks of 7 and 16"
    ))
}

fn attention_over_int8_caches(ctx: &Context) -> Result<String> {
    quantized_attention_cases(ctx, KvDtype::Int8)
}

fn attention_over_fp8_caches(ctx: &Context) -> Result<String> {
    quantized_attention_cases(ctx, KvDtype::Fp8E4m3)
}

fn attention_gqa1_head_dim_16(ctx: &Context) -> Result<String> {
    attention_cases(
        ctx,
        (4, 4, 16),
        [
            (KvShape::Contiguous, &[45, 11, 1, 1], Some(4)),
            (KvShape::Chunked(7), &[300, 11, 1], Some(1)),
        ],
    )
}

fn attention_gqa3_head_dim_32(ctx: &Context) -> Result<String> {
    attention_cases(
        ctx,
        (6, 2, 32),
        [
            (KvShape::Contiguous, &[1, 1, 30, 1], Some(2)),
            (KvShape::Chunked(7), &[1, 44, 140, 1, 1], Some(1)),
        ],
    )
}

fn attention_gqa4_head_dim_64(ctx: &Context) -> Result<String> {
    attention_cases(
        ctx,
        (8, 2, 64),
        [
            (KvShape::Contiguous, &[45, 30, 1], Some(1)),
            (KvShape::Chunked(16), &[45, 11, 1], Some(3)),
        ],
    )
}

fn attention_gqa9_head_dim_128(ctx: &Context) -> Result<String> {
    attention_cases(
        ctx,
        (9, 1, 128),
        [
            (KvShape::Contiguous, &[20, 30, 1], Some(1)),
            (KvShape::Chunked(7), &[20, 1, 1], Some(3)),
        ],
    )
}

fn decode_attention_splits_a_long_sequence(ctx: &Context) -> Result<String> {
    // 290 positions in splits of 64 (5 of 8 splits active; 70 in chunks of 7), both layouts.
    attention_cases(
        ctx,
        (8, 2, 64),
        [
            (KvShape::Contiguous, &[290, 1, 1], Some(8)),
            (KvShape::Chunked(7), &[290, 1], Some(8)),
        ],
    )
}

/// One head_dim row a step writes: its row in the step, its sequence, position and slot, K or V,
/// and KV head.
struct WrittenRow<'a> {
    row: usize,
    seq: &'a SeqStep,
    pos: usize,
    slot: usize,
    part: KvPart,
    head: usize,
}

/// Every head_dim row the step `view` writes in a layer, row by row, K then V, head by head.
fn written_rows(view: &StepView) -> Vec<WrittenRow<'_>> {
    let mut rows = Vec::new();
    for row in 0..view.rows() {
        for part in [KvPart::Key, KvPart::Value] {
            for head in 0..view.layout.num_kv_heads as usize {
                rows.push(WrittenRow {
                    row,
                    seq: &view.seqs[view.row_seq[row] as usize],
                    pos: view.row_pos[row] as usize,
                    slot: view.row_slot[row] as usize,
                    part,
                    head,
                });
            }
        }
    }
    rows
}

/// `n` bf16 entries (their bits) of a device arena from byte `at`.
fn arena_bf16(arena: &[u8], at: usize, n: usize) -> Vec<u16> {
    arena[at..at + 2 * n]
        .chunks_exact(2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .collect()
}

/// Step views over one arena for rope and kv_append, built by hand: three sequences whose block
/// tables are shuffled chunk ids (chunked) or runs apart from one another (contiguous), at
/// positions near 0, around position 256 (a chunk boundary for every power-of-two chunk up to
/// 256) and past 4000, with rows in the step's order C, A, B. Returns the view and the chunks of
/// its arena.
fn hand_built_view(layout: KvLayout, rng: &mut StdRng) -> (StepView, usize) {
    // (start, rows) of sequences C, A, B.
    let parts = [(0u32, 1u32), (4000, 3), (250, 13)];
    let chunk_tokens = layout.chunk_tokens;
    let chunks_of = |&(start, rows): &(u32, u32)| (start + rows).div_ceil(chunk_tokens);
    // Contiguous runs in the arena's order C, B, A, a free chunk or two between them.
    let [c, a, b] = parts.each_ref().map(chunks_of);
    let runs = [(0, c), (c + 3 + b, a), (c + 1, b)];
    let chunks = match layout.kind() {
        LayoutKind::Chunked => (c + a + b + 2) as usize,
        LayoutKind::Contiguous => (c + 3 + b + a + 1) as usize,
    };
    let mut shuffled: Vec<u32> = (0..chunks as u32).collect();
    for i in (1..shuffled.len()).rev() {
        shuffled.swap(i, rng.random_range(0..=i));
    }
    let mut seqs = Vec::new();
    let (mut row_seq, mut row_pos, mut block_table) = (Vec::new(), Vec::new(), Vec::new());
    for (index, (&(start, rows), &(run_start, run_chunks))) in parts.iter().zip(&runs).enumerate() {
        let (table, block_tokens): (Vec<u32>, u32) = match layout.kind() {
            LayoutKind::Chunked => (
                shuffled.drain(..run_chunks as usize).collect(),
                chunk_tokens,
            ),
            LayoutKind::Contiguous => (vec![run_start], run_chunks * chunk_tokens),
        };
        seqs.push(SeqStep {
            first_row: row_pos.len() as u32,
            rows,
            start,
            table_start: block_table.len() as u32,
            block_tokens,
        });
        block_table.extend(table);
        row_seq.extend(std::iter::repeat_n(index as u32, rows as usize));
        row_pos.extend(start..start + rows);
    }
    let view = StepView {
        layout,
        row_slot: row_pos.clone(),
        slot_positions: vec![None; seqs.len()],
        track_mass: vec![false; seqs.len()],
        seqs,
        row_seq,
        row_pos,
        block_table,
    };
    (view, chunks)
}

fn rope_and_kv_append_of_several_sequences(ctx: &Context) -> Result<String> {
    let mut rng = StdRng::seed_from_u64(10);
    let cfg = attention_config(ctx, 6, 2, 32)?;
    let (cpu, cuda) = (CpuBackend::new(), ctx.backend(CudaOptions::default())?);
    let inv_freq = cfg.rope_inv_freq();
    let (cf, gf) = (
        cpu.upload_vector(&inv_freq)?,
        cuda.upload_vector(&inv_freq)?,
    );
    let (kv_dim, head_dim) = (cfg.kv_dim(), cfg.head_dim);
    for kind in [LayoutKind::Chunked, LayoutKind::Contiguous] {
        let layout = KvLayout::new(kind, KvDtype::Bf16, 2, cfg.num_kv_heads, head_dim, 256)?;
        let (view, chunks) = hand_built_view(layout, &mut rng);
        let rows = view.rows();
        let mut cpu_memory = cpu.alloc_kv_memory(&layout, chunks)?;
        let mut gpu_memory = cuda.alloc_kv_memory(&layout, chunks)?;
        cpu.set_kv_step(&mut cpu_memory, &view)?;
        cuda.set_kv_step(&mut gpu_memory, &view)?;

        let q = randn(&mut rng, rows * cfg.q_dim(), 1.0);
        let k = randn(&mut rng, rows * kv_dim, 1.0);
        let (mut cq, mut ck) = (cpu_tensor(cfg.q_dim(), &q), cpu_tensor(kv_dim, &k));
        let mut gq = cuda.upload_tensor(rows, cfg.q_dim(), &q)?;
        let mut gk = cuda.upload_tensor(rows, kv_dim, &k)?;
        cpu.rope(&mut cq, &mut ck, &cf, &cpu_memory, &view)?;
        cuda.rope(&mut gq, &mut gk, &gf, &gpu_memory, &view)?;
        let what = format!("{kind:?} rope of rows at positions {:?}", view.row_pos);
        check_close(
            &format!("{what}: q"),
            &cuda.read_rows(&gq, 0, rows)?,
            &cq.data,
            1e-3,
            RTOL_BF16_OUTPUT,
        )?;
        check_close(
            &format!("{what}: k"),
            &cuda.read_rows(&gk, 0, rows)?,
            &ck.data,
            1e-3,
            RTOL_BF16_OUTPUT,
        )?;

        // kv_append stores bf16 inputs unchanged: each row's K and V must sit, bit for bit,
        // where the view's own formula (StepView::row_offsets, the CPU's) puts them.
        let v = randn(&mut rng, rows * kv_dim, 1.0);
        let (gk, gv) = (
            cuda.upload_tensor(rows, kv_dim, &k)?,
            cuda.upload_tensor(rows, kv_dim, &v)?,
        );
        let layer = 1;
        cuda.kv_append(&mut gpu_memory, &view, layer, &gk, &gv)?;
        let arena = cuda.read_kv_arena(&gpu_memory)?;
        for WrittenRow {
            row,
            seq,
            pos,
            part,
            head,
            ..
        } in written_rows(&view)
        {
            let values = if part == KvPart::Key { &k } else { &v };
            let at = view.row_offsets(seq, layer, part, head, pos).codes;
            let want = &values[(row * cfg.num_kv_heads + head) * head_dim..][..head_dim];
            let got = arena_bf16(&arena, at, head_dim);
            ensure!(
                got.iter()
                    .zip(want)
                    .all(|(&g, &w)| g == bf16::from_f32(w).to_bits()),
                "{kind:?} kv_append: row {row} ({part:?}, head {head}, position {pos}) is not at \
                 arena byte {at}"
            );
        }

        // A view that reaches outside the arena, or whose rows contradict their sequences, is
        // refused before any kernel reads it.
        let mut outside = view.clone();
        *outside.block_table.last_mut().expect("a table") = chunks as u32;
        let mut stray_row = view.clone();
        stray_row.row_seq[0] = 3;
        let mut wrong_position = view.clone();
        wrong_position.row_pos[2] += 1;
        for (bad, expected) in [
            (&outside, "outside an arena"),
            (&stray_row, "sequence 3 of 3"),
            (&wrong_position, "position"),
        ] {
            match cuda.set_kv_step(&mut gpu_memory, bad) {
                Ok(()) => bail!("{kind:?}: set_kv_step accepted a bad view ({expected})"),
                Err(error) => ensure!(
                    error.to_string().contains(expected),
                    "{kind:?}: set_kv_step's error {error:#} does not say {expected:?}"
                ),
            }
        }
    }
    Ok("3 sequences, shuffled tables and far runs, bad views refused".into())
}

/// `rope_kv_append` on the device against `rope` then `kv_append` of the rotated k, each into a
/// fresh arena of `chunks` chunks of the view's layout: q and the whole arenas must be
/// bit-identical. Returns the fused op's q and arena.
fn fused_against_unfused(
    cuda: &CudaBackend,
    what: &str,
    (view, chunks, layer): (&StepView, usize, usize),
    (q, k, v): (&[f32], &[f32], &[f32]),
    inv_freq: &CudaWeight,
) -> Result<(Vec<f32>, Vec<u8>)> {
    let rows = view.rows();
    let (q_dim, kv_dim) = (q.len() / rows, k.len() / rows);
    let (mut fused, mut unfused) = (
        cuda.alloc_kv_memory(&view.layout, chunks)?,
        cuda.alloc_kv_memory(&view.layout, chunks)?,
    );
    let (gk, gv) = (
        cuda.upload_tensor(rows, kv_dim, k)?,
        cuda.upload_tensor(rows, kv_dim, v)?,
    );
    let mut fused_q = cuda.upload_tensor(rows, q_dim, q)?;
    cuda.set_kv_step(&mut fused, view)?;
    cuda.rope_kv_append(&mut fused_q, &gk, &gv, inv_freq, &mut fused, view, layer)?;
    let mut unfused_q = cuda.upload_tensor(rows, q_dim, q)?;
    let mut rotated_k = cuda.upload_tensor(rows, kv_dim, k)?;
    cuda.set_kv_step(&mut unfused, view)?;
    cuda.rope(&mut unfused_q, &mut rotated_k, inv_freq, &unfused, view)?;
    cuda.kv_append(&mut unfused, view, layer, &rotated_k, &gv)?;
    let device_q = cuda.read_rows(&fused_q, 0, rows)?;
    ensure!(
        device_q == cuda.read_rows(&unfused_q, 0, rows)?,
        "{what}: rope_kv_append's q differs from rope's"
    );
    let arena = cuda.read_kv_arena(&fused)?;
    ensure!(
        arena == cuda.read_kv_arena(&unfused)?,
        "{what}: the device's arena differs from rope then kv_append"
    );
    Ok((device_q, arena))
}

/// RoPE and the append in one op (`rope_kv_append`, the forward pass's) against the two ops it
/// replaces, on each backend, over the hand-built views of several sequences (shuffled tables,
/// far runs, rows crossing chunk boundaries) in chunks of 256, 16 and 7 and in contiguous runs:
/// q and the arena must be bit-identical to `rope` then `kv_append` of the rotated k, on the
/// device and on the CPU (whose f32 arena is the reference compared with transformers); the
/// device's rotated rows must match the CPU's within a bf16 rounding.
fn rope_and_kv_append_in_one_pass(ctx: &Context) -> Result<String> {
    let mut rng = StdRng::seed_from_u64(11);
    let cfg = attention_config(ctx, 6, 2, 32)?;
    let (cpu, cuda) = (CpuBackend::new(), ctx.backend(CudaOptions::default())?);
    let inv_freq = cfg.rope_inv_freq();
    let (cf, gf) = (
        cpu.upload_vector(&inv_freq)?,
        cuda.upload_vector(&inv_freq)?,
    );
    let (q_dim, kv_dim, head_dim) = (cfg.q_dim(), cfg.kv_dim(), cfg.head_dim);
    let layer = 1;
    for (kind, chunk_tokens) in [
        (LayoutKind::Chunked, 256),
        (LayoutKind::Chunked, 16),
        (LayoutKind::Chunked, 7),
        (LayoutKind::Contiguous, 256),
    ] {
        let what = format!("{kind:?} in chunks of {chunk_tokens}");
        let (view, chunks) = hand_built_view(
            KvLayout::new(
                kind,
                KvDtype::Bf16,
                2,
                cfg.num_kv_heads,
                head_dim,
                chunk_tokens,
            )?,
            &mut rng,
        );
        let rows = view.rows();
        let q = randn(&mut rng, rows * q_dim, 1.0);
        let k = randn(&mut rng, rows * kv_dim, 1.0);
        let v = randn(&mut rng, rows * kv_dim, 1.0);

        // The device: fused and unfused, each into its own arena.
        let (device_q, arena) =
            fused_against_unfused(&cuda, &what, (&view, chunks, layer), (&q, &k, &v), &gf)?;

        // The CPU, f32 entries: fused and unfused, bit for bit.
        let cpu_layout = KvLayout {
            dtype: KvDtype::F32 as u32,
            ..view.layout
        };
        let cpu_view = StepView {
            layout: cpu_layout,
            ..view.clone()
        };
        let (mut cpu_fused, mut cpu_unfused) = (
            cpu.alloc_kv_memory(&cpu_layout, chunks)?,
            cpu.alloc_kv_memory(&cpu_layout, chunks)?,
        );
        let (mut cq, ck, cv) = (
            cpu_tensor(q_dim, &q),
            cpu_tensor(kv_dim, &k),
            cpu_tensor(kv_dim, &v),
        );
        cpu.set_kv_step(&mut cpu_fused, &cpu_view)?;
        cpu.rope_kv_append(&mut cq, &ck, &cv, &cf, &mut cpu_fused, &cpu_view, layer)?;
        let (mut cq_unfused, mut ck_rotated) = (cpu_tensor(q_dim, &q), cpu_tensor(kv_dim, &k));
        cpu.set_kv_step(&mut cpu_unfused, &cpu_view)?;
        cpu.rope(
            &mut cq_unfused,
            &mut ck_rotated,
            &cf,
            &cpu_unfused,
            &cpu_view,
        )?;
        cpu.kv_append(&mut cpu_unfused, &cpu_view, layer, &ck_rotated, &cv)?;
        ensure!(
            cq.data == cq_unfused.data && ck.data == k,
            "{what}: the CPU's q differs from rope's, or k was changed"
        );
        ensure!(
            cpu_fused.bytes() == cpu_unfused.bytes(),
            "{what}: the CPU's arena differs from rope then kv_append"
        );

        // The device against the CPU: q, and every row where the view puts it.
        check_close(
            &format!("{what}: q"),
            &device_q,
            &cq.data,
            1e-3,
            RTOL_BF16_OUTPUT,
        )?;
        let cpu_arena: &[f32] = bytemuck::cast_slice(cpu_fused.bytes());
        for WrittenRow {
            row,
            seq,
            pos,
            slot,
            part,
            head,
        } in written_rows(&view)
        {
            // Byte offsets: 2 bytes an entry on the device, 4 in the CPU's f32 arena.
            let at = view.row_offsets(seq, layer, part, head, slot).codes;
            let cpu_at = cpu_view.row_offsets(seq, layer, part, head, slot).codes / 4;
            let got: Vec<f32> = arena_bf16(&arena, at, head_dim)
                .into_iter()
                .map(|b| bf16::from_bits(b).to_f32())
                .collect();
            check_close(
                &format!("{what}: row {row} ({part:?}, head {head}, position {pos})"),
                &got,
                &cpu_arena[cpu_at..cpu_at + head_dim],
                1e-3,
                RTOL_BF16_OUTPUT,
            )?;
        }
    }
    Ok(
        "3 sequences; chunks of 256, 16 and 7, contiguous runs; bit-identical to rope + kv_append"
            .into(),
    )
}

/// A quantized row of an arena (`codes` and `scale` from `StepView::row_offsets`): each
/// element's value and the scale it was quantized with.
fn dequantized_row(
    arena: &[u8],
    layout: &KvLayout,
    part: KvPart,
    at: RowOffsets,
) -> (Vec<f32>, Vec<f32>) {
    let (dtype, head_dim) = (layout.dtype(), layout.head_dim());
    let scales: Vec<f32> = arena[at.scale..]
        .chunks_exact(4)
        .take(dtype.scales_per_row(part, head_dim))
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let group = head_dim / scales.len();
    arena[at.codes..at.codes + head_dim]
        .iter()
        .enumerate()
        .map(|(i, &code)| {
            let scale = scales[i / group];
            let value = match dtype {
                KvDtype::Int8 => code as i8 as f32,
                _ => e4m3_decode(code),
            };
            (value * scale, scale)
        })
        .unzip()
}

/// The rows of `layer` the step `view` wrote, equal byte for byte in two arenas of its layout
/// (codes and scales), or an error naming the first row and byte that differ.
fn same_rows(what: &str, view: &StepView, layer: usize, got: &[u8], want: &[u8]) -> Result<()> {
    let (layout, head_dim) = (view.layout, view.layout.head_dim());
    let dtype = layout.dtype();
    for WrittenRow {
        row,
        seq,
        pos,
        slot,
        part,
        head,
    } in written_rows(view)
    {
        let at = view.row_offsets(seq, layer, part, head, slot);
        let codes = at.codes..at.codes + head_dim * dtype.code_bytes();
        let scales = at.scale..at.scale + 4 * dtype.scales_per_row(part, head_dim);
        for (name, bytes) in [("codes", codes), ("scales", scales)] {
            if let Some(i) = got[bytes.clone()]
                .iter()
                .zip(&want[bytes.clone()])
                .position(|(g, w)| g != w)
            {
                bail!(
                    "{what}: row {row} ({part:?}, head {head}, position {pos}): byte {i} of its \
                     {name} (arena byte {}) is {:#04x}, not {:#04x}",
                    bytes.start + i,
                    got[bytes.start + i],
                    want[bytes.start + i]
                );
            }
        }
    }
    Ok(())
}

/// int8 and fp8 e4m3 K/V quantized by the device's append (one warp a row, kv_quant.cuh)
/// exactly as the CPU's append quantizes the same bf16 values: over the hand-built views of
/// several sequences (shuffled tables, far runs, rows crossing chunk boundaries) in chunks of 7
/// (whose quantized chunks start on 4-byte boundaries only), 16 and 256 and in contiguous runs,
/// head_dim 16 (an int8 key row is one group of 16) to 128, with a row of zeros (scale 0), rows
/// with an outlier and a row of tiny values (fp8 subnormal codes), the two arenas must be equal
/// byte for byte: codes and scales where the layout puts them. The fused rope_kv_append must
/// leave the bits of rope then kv_append on the device (the whole arena), and its rows must dequantize to the
/// CPU's f32 rotation within half a quantization step plus a bf16 rounding (the device
/// quantizes the rotated k rounded to bf16, as the unfused path stores it).
fn quantized_kv_append_matches_the_cpu(ctx: &Context) -> Result<String> {
    let mut rng = StdRng::seed_from_u64(13);
    let (cpu, cuda) = (CpuBackend::new(), ctx.backend(CudaOptions::default())?);
    let layer = 1;
    let mut rows_checked = 0;
    for dtype in [KvDtype::Int8, KvDtype::Fp8E4m3] {
        for (kind, chunk_tokens, head_dim) in [
            (LayoutKind::Chunked, 7, 32),
            (LayoutKind::Chunked, 16, 128),
            (LayoutKind::Contiguous, 256, 16),
            (LayoutKind::Chunked, 256, 64),
        ] {
            let cfg = attention_config(ctx, 6, 2, head_dim)?;
            let (q_dim, kv_dim) = (cfg.q_dim(), cfg.kv_dim());
            let what = format!("{dtype} {kind:?} in chunks of {chunk_tokens}, head_dim {head_dim}");
            let layout = KvLayout::new(kind, dtype, 2, cfg.num_kv_heads, head_dim, chunk_tokens)?;
            let (view, chunks) = hand_built_view(layout, &mut rng);
            let rows = view.rows();
            let q = randn(&mut rng, rows * q_dim, 1.0);
            let mut k = randn(&mut rng, rows * kv_dim, 1.0);
            let mut v = randn(&mut rng, rows * kv_dim, 1.0);
            k[..kv_dim].fill(0.0);
            v[kv_dim..2 * kv_dim].fill(0.0);
            k[kv_dim + 3] = 300.0;
            v[2 * kv_dim + head_dim + 5] = -1000.0;
            let tiny = round_bf16(v[3 * kv_dim..4 * kv_dim].iter().map(|x| x * 1e-6).collect());
            v[3 * kv_dim..4 * kv_dim].copy_from_slice(&tiny);
            let (gk, gv) = (
                cuda.upload_tensor(rows, kv_dim, &k)?,
                cuda.upload_tensor(rows, kv_dim, &v)?,
            );

            // The append alone, on both backends.
            let mut cpu_memory = cpu.alloc_kv_memory(&layout, chunks)?;
            let mut gpu_memory = cuda.alloc_kv_memory(&layout, chunks)?;
            cpu.set_kv_step(&mut cpu_memory, &view)?;
            cuda.set_kv_step(&mut gpu_memory, &view)?;
            let (ck, cv) = (cpu_tensor(kv_dim, &k), cpu_tensor(kv_dim, &v));
            cpu.kv_append(&mut cpu_memory, &view, layer, &ck, &cv)?;
            cuda.kv_append(&mut gpu_memory, &view, layer, &gk, &gv)?;
            same_rows(
                &format!("{what}: kv_append, the device's arena against the CPU's"),
                &view,
                layer,
                &cuda.read_kv_arena(&gpu_memory)?,
                cpu_memory.bytes(),
            )?;

            // The fused op against rope then kv_append, on the device.
            let inv_freq = cfg.rope_inv_freq();
            let gf = cuda.upload_vector(&inv_freq)?;
            let (_, arena) =
                fused_against_unfused(&cuda, &what, (&view, chunks, layer), (&q, &k, &v), &gf)?;

            // The fused op's rows against the CPU's f32 rotation.
            let cpu_layout = KvLayout {
                dtype: KvDtype::F32 as u32,
                ..layout
            };
            let cpu_view = StepView {
                layout: cpu_layout,
                ..view.clone()
            };
            let mut cpu_f32 = cpu.alloc_kv_memory(&cpu_layout, chunks)?;
            cpu.set_kv_step(&mut cpu_f32, &cpu_view)?;
            let mut cq = cpu_tensor(q_dim, &q);
            cpu.rope_kv_append(
                &mut cq,
                &ck,
                &cv,
                &cpu.upload_vector(&inv_freq)?,
                &mut cpu_f32,
                &cpu_view,
                layer,
            )?;
            let cpu_arena: &[f32] = bytemuck::cast_slice(cpu_f32.bytes());
            for WrittenRow {
                row,
                seq,
                pos,
                slot,
                part,
                head,
            } in written_rows(&view)
            {
                let at = view.row_offsets(seq, layer, part, head, slot);
                let (got, scales) = dequantized_row(&arena, &layout, part, at);
                let cpu_at = cpu_view.row_offsets(seq, layer, part, head, slot).codes / 4;
                let want = &cpu_arena[cpu_at..cpu_at + head_dim];
                for (d, ((&g, &w), &scale)) in got.iter().zip(want).zip(&scales).enumerate() {
                    // Half a step of the code, and the bf16 rounding of the rotated k.
                    let step = match dtype {
                        KvDtype::Int8 => scale,
                        _ => (w.abs() / 8.0).max(2f32.powi(-9) * scale),
                    };
                    let bound = 0.5 * step * 1.001 + w.abs() / 256.0 + 1e-30;
                    ensure!(
                        (g - w).abs() <= bound,
                        "{what}: rope_kv_append row {row} ({part:?}, head {head}, position \
                         {pos}), dimension {d}: {g} where the CPU's f32 rotation is {w} (bound \
                         {bound:e})"
                    );
                }
                rows_checked += 1;
            }
        }
    }
    Ok(format!(
        "int8 and fp8-e4m3: arenas equal to the CPU's and to rope + kv_append; {rows_checked} \
         rotated rows within half a step of the CPU's"
    ))
}

/// A step of several sequences: their lengths before it (written by kv_append alone, in ragged
/// multi-sequence steps that interleave their chunks), then steps giving each sequence's rows
/// (0: not in that step).
struct BatchCase<'a> {
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    /// The element type of both pools.
    dtype: KvDtype,
    shape: KvShape,
    lengths: &'a [usize],
    steps: &'a [&'a [usize]],
    /// The grid's splits; None: chosen from the context.
    decode_splits: Option<usize>,
}

/// Runs the same ragged steps of several sequences through the CPU and the CUDA backend (one
/// pool each, making the same decisions) and compares the attention of every row of every
/// step; layer 0 holds other K/V than the layer attended (1). Sequences of one row in a step
/// run the decode kernel, the others the prefill kernel, in the same step.
fn check_batch_attention(ctx: &Context, case: BatchCase) -> Result<()> {
    let BatchCase {
        num_heads,
        num_kv_heads,
        head_dim,
        dtype,
        shape,
        lengths,
        steps,
        decode_splits,
    } = case;
    let mut rng = StdRng::seed_from_u64((num_heads * 1000 + head_dim * 10 + lengths.len()) as u64);
    let cfg = attention_config(ctx, num_heads, num_kv_heads, head_dim)?;
    let cpu = CpuBackend::new();
    let cuda = ctx.backend(CudaOptions {
        decode_splits,
        ..CudaOptions::default()
    })?;
    // Contiguous runs grow in units of 8 positions, so a run is longer than its sequence.
    let unit = match shape {
        KvShape::Contiguous => 8,
        KvShape::Chunked(n) => n,
    };
    let totals: Vec<usize> = (0..lengths.len())
        .map(|i| lengths[i] + steps.iter().map(|rows| rows[i]).sum::<usize>())
        .collect();
    let chunks = totals
        .iter()
        .map(|&t| t.max(1).div_ceil(unit))
        .sum::<usize>();
    let layout = KvLayout::new(shape.kind(), dtype, 2, num_kv_heads, head_dim, unit)?;
    let mut cpu_store = KvStore::new(&cpu, layout, chunks, false)?;
    let mut gpu_store = KvStore::new(&cuda, layout, chunks, false)?;
    let mut seqs = Vec::new();
    for &total in &totals {
        let id = cpu_store.pool.new_sequence(Some(total.max(1)))?;
        ensure!(gpu_store.pool.new_sequence(Some(total.max(1)))? == id);
        seqs.push(id);
    }

    // One step on both backends: `rows[i]` rows of sequence i; `attend` also runs attention of
    // layer 1 and compares it.
    let mut run_step = |rows: &[usize], attend: bool| -> Result<()> {
        let members: Vec<(SeqId, usize)> = seqs
            .iter()
            .zip(rows)
            .filter(|(_, &r)| r > 0)
            .map(|(&id, &r)| (id, r))
            .collect();
        let cpu_view = cpu_store.prepare_step(&cpu, &members)?;
        let gpu_view = gpu_store.prepare_step(&cuda, &members)?;
        ensure!(cpu_view == gpu_view, "the two pools made different steps");
        let total_rows = cpu_view.rows();
        cpu.set_kv_step(&mut cpu_store.memory, &cpu_view)?;
        cuda.set_kv_step(&mut gpu_store.memory, &cpu_view)?;
        for layer in [0, 1] {
            let k = randn(&mut rng, total_rows * cfg.kv_dim(), 1.0);
            let v = randn(&mut rng, total_rows * cfg.kv_dim(), 1.0);
            let (ck, cv) = (cpu_tensor(cfg.kv_dim(), &k), cpu_tensor(cfg.kv_dim(), &v));
            let gk = cuda.upload_tensor(total_rows, cfg.kv_dim(), &k)?;
            let gv = cuda.upload_tensor(total_rows, cfg.kv_dim(), &v)?;
            cpu.kv_append(&mut cpu_store.memory, &cpu_view, layer, &ck, &cv)?;
            cuda.kv_append(&mut gpu_store.memory, &cpu_view, layer, &gk, &gv)?;
        }
        if attend {
            let q = randn(&mut rng, total_rows * cfg.q_dim(), 1.0);
            let cq = cpu_tensor(cfg.q_dim(), &q);
            let gq = cuda.upload_tensor(total_rows, cfg.q_dim(), &q)?;
            let mut co = cpu.alloc(total_rows, cfg.q_dim())?;
            let mut go = cuda.alloc(total_rows, cfg.q_dim())?;
            cpu.attention(&cq, &cpu_store.memory, &cpu_view, 1, num_heads, &mut co)?;
            cuda.attention(&gq, &gpu_store.memory, &cpu_view, 1, num_heads, &mut go)?;
            let got = cuda.read_rows(&go, 0, total_rows)?;
            // As check_attention: probabilities enter p.v as bf16 in the prefill kernel.
            for seq in &cpu_view.seqs {
                let cols = cfg.q_dim();
                let span = seq.first_row as usize * cols..seq.end_row() * cols;
                check_close(
                    &format!(
                        "attention heads {num_heads}/{num_kv_heads} head_dim {head_dim} {dtype} \
                         {shape} splits {}, step {rows:?}: the sequence at positions {}..{}",
                        splits_text(decode_splits),
                        seq.start,
                        seq.end()
                    ),
                    &got[span.clone()],
                    &co.data[span],
                    attention_atol(dtype),
                    RTOL_TWO_ROUNDINGS,
                )?;
            }
        }
        for &(id, r) in &members {
            cpu_store.pool.commit(id, &vec![0; r])?;
            gpu_store.pool.commit(id, &vec![0; r])?;
        }
        Ok(())
    };

    // The lengths, written by steps of every sequence still short of its length, in pieces of
    // different sizes so that the sequences' chunks interleave in the arena.
    let mut written = vec![0; lengths.len()];
    for round in 0.. {
        let rows: Vec<usize> = (0..lengths.len())
            .map(|i| (lengths[i] - written[i]).min(FILL_PIECE + 37 * ((round + i) % 5)))
            .collect();
        if rows.iter().all(|&r| r == 0) {
            break;
        }
        run_step(&rows, false)?;
        written.iter_mut().zip(&rows).for_each(|(w, r)| *w += r);
    }
    for rows in steps {
        run_step(rows, true)?;
    }
    Ok(())
}

/// Rows of a filling step of one sequence, before the per-round variation.
const FILL_PIECE: usize = 29;

/// Both layouts of one shape: lengths, steps and splits; bf16 caches.
fn batch_cases(
    ctx: &Context,
    heads: (usize, usize, usize),
    chunk_tokens: usize,
    lengths: &[usize],
    steps: &[&[usize]],
    decode_splits: Option<usize>,
) -> Result<String> {
    let batch = (lengths, steps, decode_splits);
    typed_batch_cases(ctx, heads, KvDtype::Bf16, chunk_tokens, batch)
}

/// [`batch_cases`] with caches of `dtype`.
fn typed_batch_cases(
    ctx: &Context,
    (num_heads, num_kv_heads, head_dim): (usize, usize, usize),
    dtype: KvDtype,
    chunk_tokens: usize,
    (lengths, steps, decode_splits): (&[usize], &[&[usize]], Option<usize>),
) -> Result<String> {
    for shape in [KvShape::Contiguous, KvShape::Chunked(chunk_tokens)] {
        check_batch_attention(
            ctx,
            BatchCase {
                num_heads,
                num_kv_heads,
                head_dim,
                dtype,
                shape,
                lengths,
                steps,
                decode_splits,
            },
        )?;
    }
    Ok(format!(
        "{} sequences of {lengths:?} positions, {} steps, {dtype}, contiguous and chunks of \
         {chunk_tokens}",
        lengths.len(),
        steps.len()
    ))
}

/// Several sequences over int8 and fp8 pools: decode rows beside prefill chunks in one step,
/// interleaved chunks of 7 and contiguous runs, and decode at 8193 positions (128 splits).
fn batch_attention_over_quantized_caches(ctx: &Context) -> Result<String> {
    for dtype in [KvDtype::Int8, KvDtype::Fp8E4m3] {
        typed_batch_cases(
            ctx,
            (6, 2, 32),
            dtype,
            7,
            (
                &[300, 2, 77],
                &[&[1, 1, 1], &[40, 1, 1], &[1, 50, 2]],
                Some(8),
            ),
        )?;
        typed_batch_cases(
            ctx,
            (8, 2, 64),
            dtype,
            256,
            (&[8192, 1], &[&[1, 1], &[1, 20]], None),
        )?;
    }
    Ok("int8 and fp8-e4m3: 3 sequences in chunks of 7 and runs; 8193 positions".into())
}

// Each batch has decode-only steps, steps that mix decode rows with prefill chunks (which cross
// chunk boundaries and start sequences from nothing), and sequences sitting steps out.

fn batch_attention_gqa1_head_dim_16(ctx: &Context) -> Result<String> {
    batch_cases(
        ctx,
        (4, 4, 16),
        7,
        &[1, 130, 45, 0],
        &[&[1, 1, 1, 0], &[1, 20, 1, 9], &[0, 1, 33, 1], &[1, 1, 1, 1]],
        Some(4),
    )
}

fn batch_attention_gqa3_head_dim_32(ctx: &Context) -> Result<String> {
    batch_cases(
        ctx,
        (6, 2, 32),
        16,
        &[300, 2, 77],
        &[&[1, 1, 1], &[40, 1, 1], &[1, 50, 2], &[1, 1, 0]],
        Some(8),
    )
}

fn batch_attention_gqa4_head_dim_64_long(ctx: &Context) -> Result<String> {
    // Lengths up to 3000 with the default 32 splits: decode splits of 96 positions.
    batch_cases(
        ctx,
        (8, 2, 64),
        16,
        &[3000, 1, 640, 17, 0],
        &[
            &[1, 1, 1, 1, 0],
            &[40, 1, 1, 100, 20],
            &[1, 1, 1, 1, 1],
            &[1, 70, 1, 0, 1],
        ],
        Some(32),
    )
}

fn batch_attention_gqa8_head_dim_64(ctx: &Context) -> Result<String> {
    batch_cases(
        ctx,
        (8, 1, 64),
        16,
        &[200, 33, 1],
        &[&[1, 1, 1], &[17, 1, 3], &[1, 1, 1]],
        Some(5),
    )
}

fn batch_attention_gqa9_head_dim_128(ctx: &Context) -> Result<String> {
    batch_cases(
        ctx,
        (9, 1, 128),
        7,
        &[90, 5, 1],
        &[&[1, 1, 1], &[1, 12, 40], &[1, 1, 1]],
        Some(3),
    )
}

fn decode_attention_at_long_contexts(ctx: &Context) -> Result<String> {
    // The split count chosen from the step's longest context: 64 at 8191 and 8192 positions,
    // 128 at 8193 and 16384; splits of 128 positions, a power of two inside chunks of 256.
    batch_cases(
        ctx,
        (8, 2, 64),
        256,
        &[8190, 16383, 300],
        &[&[1, 0, 1], &[1, 0, 1], &[1, 1, 1]],
        None,
    )?;
    // One split over more chunks than a block keeps at once (DECODE_TABLE_WINDOW): the table
    // read in windows, positions located by division (chunks of 7) and by shift (chunks of 4).
    batch_cases(
        ctx,
        (8, 2, 64),
        7,
        &[700, 64, 1],
        &[&[1, 1, 1], &[1, 3, 1]],
        Some(1),
    )?;
    batch_cases(ctx, (6, 2, 32), 4, &[600, 2], &[&[1, 1], &[1, 1]], Some(2))?;
    Ok(
        "contexts of 8191 to 16384 with the context's split count, one or two splits over 100 to \
        175 chunks of 7 and 4"
            .into(),
    )
}

/// The ids argmax chooses stay on the backend: `read_chosen` gives the latest ones in order (a
/// ring of CHOSEN_IDS_KEPT that wraps), `embed_chosen` embeds the latest as `embed` does, and
/// `argmax_advance` moves the one-row sequences of a step view on by one position where the
/// kernels read it, as `StepView::advance` does on the host, until a position needs a chunk its
/// block table lacks: then the device refuses the view.
fn chosen_ids_stay_on_the_backend(ctx: &Context) -> Result<String> {
    let mut rng = StdRng::seed_from_u64(12);
    let (vocab, hidden) = (777, 64);
    let (cpu, cuda) = (CpuBackend::new(), ctx.backend(CudaOptions::default())?);
    let logits = randn(&mut rng, vocab, 1.0);
    let (cl, gl) = (
        cpu_tensor(vocab, &logits),
        cuda.upload_precise(1, vocab, &logits)?,
    );
    let mut chosen = Vec::new();
    for i in 0..CHOSEN_IDS_KEPT + 6 {
        let mut peaked = logits.clone();
        let id = i * 11 % vocab;
        peaked[id] = 10.0;
        cuda.argmax(&cuda.upload_precise(1, vocab, &peaked)?, 0, None)?;
        cpu.argmax(&cpu_tensor(vocab, &peaked), 0, None)?;
        chosen.push(id as u32);
    }
    for n in [1, 3, CHOSEN_IDS_KEPT] {
        let latest = &chosen[chosen.len() - n..];
        let (device, host) = (cuda.read_chosen(n)?, cpu.read_chosen(n)?);
        ensure!(
            device == latest && host == latest,
            "the latest {n} chosen ids: {device:?} on the device, {host:?} on the CPU, {latest:?} \
             chosen"
        );
    }
    for error in [
        cuda.read_chosen(CHOSEN_IDS_KEPT + 1),
        cpu.read_chosen(CHOSEN_IDS_KEPT + 1),
    ] {
        ensure!(
            error.is_err_and(|e| e.to_string().contains("asked for")),
            "more ids than are kept were read"
        );
    }

    let table = randn(&mut rng, vocab * hidden, 1.0);
    let ckpt = TestCheckpoint::new(BF16, &[("embed", vec![vocab, hidden], &table)])?;
    let host = ckpt.tensor("embed", &[vocab, hidden])?;
    let (cw, gw) = (cpu.upload_weight(&host)?, cuda.upload_weight(&host)?);
    let (mut co, mut go, mut ge) = (
        cpu.alloc_precise(1, hidden)?,
        cuda.alloc_precise(1, hidden)?,
        cuda.alloc_precise(1, hidden)?,
    );
    cpu.embed_chosen(&cw, &mut co)?;
    cuda.embed_chosen(&gw, &mut go)?;
    cuda.embed(&gw, &chosen[chosen.len() - 1..], &mut ge)?;
    let device = cuda.read_rows(&go, 0, 1)?;
    ensure!(
        device == cuda.read_rows(&ge, 0, 1)?,
        "embed_chosen differs from embed of the id"
    );
    check_close("embed_chosen", &device, &co.data, 0.0, 0.0)?;

    // Sequence C of the hand-built view (one row at position 0, one chunk of 16) moves to
    // 1, .., 16; sequences A and B (several rows) stay. Position 16 needs a second chunk.
    let layout = KvLayout::new(LayoutKind::Chunked, KvDtype::Bf16, 2, 2, 32, 16)?;
    let (mut view, chunks) = hand_built_view(layout, &mut rng);
    let mut cpu_view = view.clone();
    let mut gm = cuda.alloc_kv_memory(&layout, chunks)?;
    let mut cm = cpu.alloc_kv_memory(&layout, chunks)?;
    cuda.set_kv_step(&mut gm, &view)?;
    cpu.set_kv_step(&mut cm, &view)?;
    for position in 1..=16u32 {
        cuda.argmax_advance(&gl, 0, None, &mut gm, &mut view)?;
        cpu.argmax_advance(&cl, 0, None, &mut cm, &mut cpu_view)?;
        let device = cuda.read_kv_step(&gm)?;
        ensure!(
            (view.seqs[0].start, view.row_pos[0]) == (position, position)
                && view == cpu_view
                && device == view.packed(),
            "advance to position {position}: the device's view {device:?}, the host's {:?}",
            view.packed()
        );
    }
    match cuda.argmax_advance(&gl, 0, None, &mut gm, &mut view) {
        Ok(()) => bail!("a view advanced past its block table was used"),
        Err(error) => ensure!(
            error.to_string().contains("no longer fits"),
            "the refusal of a view past its table: {error:#}"
        ),
    }
    Ok(format!(
        "{} choices through a ring of {CHOSEN_IDS_KEPT}, the latest embedded, 16 advances",
        chosen.len()
    ))
}

fn swiglu_in_place(ctx: &Context) -> Result<String> {
    let mut rng = StdRng::seed_from_u64(7);
    let (cpu, cuda) = (CpuBackend::new(), ctx.backend(CudaOptions::default())?);
    let (rows, cols) = (3, 200);
    let gate = randn(&mut rng, rows * cols, 3.0);
    let up = randn(&mut rng, rows * cols, 1.0);
    let (mut cg, cu) = (cpu_tensor(cols, &gate), cpu_tensor(cols, &up));
    let mut gg = cuda.upload_tensor(rows, cols, &gate)?;
    let gu = cuda.upload_tensor(rows, cols, &up)?;
    cpu.swiglu(&mut cg, &cu, rows)?;
    cuda.swiglu(&mut gg, &gu, rows)?;
    check_close(
        "swiglu",
        &cuda.read_rows(&gg, 0, rows)?,
        &cg.data,
        1e-4,
        RTOL_BF16_OUTPUT,
    )?;
    Ok("3 x 200".into())
}

fn argmax_on_device_matches_the_cpu_scan(ctx: &Context) -> Result<String> {
    let mut rng = StdRng::seed_from_u64(8);
    let (cpu, cuda) = (CpuBackend::new(), ctx.backend(CudaOptions::default())?);
    for vocab in [777, 128_256] {
        let mut logits: Vec<f32> = randn(&mut rng, 2 * vocab, 1.0);
        // Row 1: a tie between two maxima far apart; the first must win.
        logits[vocab + vocab / 3] = 9.0;
        logits[vocab + vocab - 2] = 9.0;
        let cl = cpu_tensor(vocab, &logits);
        let gl = cuda.upload_precise(2, vocab, &logits)?;
        let allowed: Vec<f32> = (0..vocab)
            .map(|i| if i % 5 == 3 { 0.0 } else { f32::NEG_INFINITY })
            .collect();
        let (cb, gb) = (cpu.upload_vector(&allowed)?, cuda.upload_vector(&allowed)?);
        let choose = |row, cuda_bias, cpu_bias| -> Result<(u32, u32)> {
            cuda.argmax(&gl, row, cuda_bias)?;
            cpu.argmax(&cl, row, cpu_bias)?;
            Ok((cuda.read_argmax()?, cpu.read_argmax()?))
        };
        for row in 0..2 {
            let (device, host) = choose(row, None, None)?;
            ensure!(
                device == host,
                "vocab {vocab} row {row}: id {device} on the device, {host} on the CPU"
            );
            let (device, host) = choose(row, Some(&gb), Some(&cb))?;
            ensure!(
                device == host,
                "vocab {vocab} row {row} masked: id {device} on the device, {host} on the CPU"
            );
        }
    }
    Ok("vocabularies 777 and 128256, ties, masks".into())
}
