//! What the kernels rely on, probed through the kernels of kernels/emu_selftest.cu: the PTX
//! fragment layouts of `mma.sync` and `ldmatrix`, the shuffle and vote rules, bf16/f16
//! conversions, cp.async groups, shared-memory limits and graph capture, each against a CPU
//! reference. On the emulator they check its model of the hardware; on a GPU, the hardware.
use super::{Check, Context, Numbers};
use crate::backend::cuda::device::kernel_signature;
use crate::backend::cuda::{Device, DeviceBuffer, KernelArg, LaunchConfig};
use anyhow::{bail, ensure, Result};
use half::{bf16, f16};

pub const CHECKS: &[Check] = &[
    Check {
        group: "probes",
        name: "reduce_rows",
        run: reduce_rows_matches_reference,
    },
    Check {
        group: "probes",
        name: "silu_mul_bf16",
        run: silu_mul_bf16_matches_reference,
    },
    Check {
        group: "probes",
        name: "conversions",
        run: conversions_match_half_crate,
    },
    Check {
        group: "probes",
        name: "mma_matmul",
        run: mma_matmul_matches_reference,
    },
    Check {
        group: "probes",
        name: "mma_fragments",
        run: mma_fragments_follow_the_ptx_tables,
    },
    Check {
        group: "probes",
        name: "ldmatrix",
        run: ldmatrix_follows_the_ptx_tables,
    },
    Check {
        group: "probes",
        name: "shuffles",
        run: shuffles_follow_cuda_semantics,
    },
    Check {
        group: "probes",
        name: "votes_and_warp_reductions",
        run: votes_and_warp_reductions,
    },
    Check {
        group: "probes",
        name: "cp_async_groups",
        run: cp_async_groups_complete_when_waited_for,
    },
    Check {
        group: "probes",
        name: "dynamic_shared_opt_in",
        run: dynamic_shared_memory_and_the_opt_in,
    },
    Check {
        group: "probes",
        name: "static_shared_memory",
        run: static_shared_memory_counts_against_the_limit,
    },
    Check {
        group: "probes",
        name: "graph_capture",
        run: graph_capture_replays_launches_with_current_memory,
    },
];

fn ptr(buffer: &DeviceBuffer) -> KernelArg {
    KernelArg::Ptr(buffer.ptr())
}

/// The error of a launch that must fail.
pub fn launch_error(
    device: &dyn Device,
    kernel: &str,
    config: LaunchConfig,
    args: &[KernelArg],
) -> Result<String> {
    match device.launch(kernel, config, args) {
        Ok(()) => bail!("launching `{kernel}` with {config:?} should have failed"),
        Err(error) => Ok(format!("{error:#}")),
    }
}

/// Fails unless `text` contains every part.
pub fn expect_parts(text: &str, parts: &[&str]) -> Result<()> {
    for part in parts {
        ensure!(text.contains(part), "expected {part:?} in: {text}");
    }
    Ok(())
}

/// Row sums of `x` `[rows, cols]` by `selftest_reduce_rows` with `threads` per block.
pub fn reduce_rows(
    device: &dyn Device,
    x: &[f32],
    rows: usize,
    cols: usize,
    threads: u32,
) -> Result<Vec<f32>> {
    let x_buffer = device.upload(x)?;
    let out = device.alloc(rows * 4)?;
    let args = [
        ptr(&x_buffer),
        ptr(&out),
        KernelArg::I32(rows as i32),
        KernelArg::I32(cols as i32),
    ];
    device.launch(
        "selftest_reduce_rows",
        LaunchConfig::linear(rows as u32, threads, 0),
        &args,
    )?;
    device.download(&out)
}

fn reduce_rows_matches_reference(ctx: &Context) -> Result<String> {
    let device = ctx.device.as_ref();
    let mut numbers = Numbers(1);
    let cases = [
        (1, 1, 32),
        (3, 1000, 128),
        (7, 4097, 256),
        (64, 33, 1024),
        (5, 96, 64),
    ];
    for (rows, cols, threads) in cases {
        let x = numbers.floats(rows * cols);
        let got = reduce_rows(device, &x, rows, cols, threads)?;
        for row in 0..rows {
            let values = &x[row * cols..(row + 1) * cols];
            let expected: f64 = values.iter().map(|&v| v as f64).sum();
            let magnitude: f64 = values.iter().map(|&v| v.abs() as f64).sum();
            // f32 accumulation in a different order: error bounded by ~cols * eps * sum|x|.
            let tolerance = 1e-6 * magnitude * (cols as f64).log2().max(1.0) + 1e-7;
            ensure!(
                (got[row] as f64 - expected).abs() <= tolerance,
                "rows {rows} cols {cols} threads {threads} row {row}: {} vs {expected}",
                got[row]
            );
        }
    }
    Ok(format!("{} shapes", cases.len()))
}

fn silu_mul_bf16_matches_reference(ctx: &Context) -> Result<String> {
    let device = ctx.device.as_ref();
    let mut numbers = Numbers(2);
    for n in [1usize, 31, 1000, 65537] {
        let gate: Vec<bf16> = numbers
            .floats(n)
            .iter()
            .map(|v| bf16::from_f32(v * 8.0))
            .collect();
        let up = numbers.bf16s(n);
        let gate_buffer = device.upload(&gate)?;
        let up_buffer = device.upload(&up)?;
        let out = device.alloc(n * 2)?;
        let blocks = (n as u32).div_ceil(256).min(16);
        let args = [
            ptr(&gate_buffer),
            ptr(&up_buffer),
            ptr(&out),
            KernelArg::I32(n as i32),
        ];
        device.launch(
            "selftest_silu_mul_bf16",
            LaunchConfig::linear(blocks, 256, 0),
            &args,
        )?;
        let got: Vec<bf16> = device.download(&out)?;
        for i in 0..n {
            let g = gate[i].to_f32();
            let expected = g / (1.0 + (-g).exp()) * up[i].to_f32();
            // One bf16 rounding of a value whose f32 computation may differ in the last ulp.
            let tolerance = expected.abs() * 2f32.powi(-7) + 1e-30;
            ensure!(
                (got[i].to_f32() - expected).abs() <= tolerance,
                "n {n} i {i}: {} vs {expected}",
                got[i]
            );
        }
    }
    Ok("4 lengths".into())
}

fn conversions_match_half_crate(ctx: &Context) -> Result<String> {
    let device = ctx.device.as_ref();
    let mut numbers = Numbers(3);
    let mut x: Vec<f32> = vec![
        0.0,
        -0.0,
        1.0,
        -1.5,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::MAX,
        f32::MIN_POSITIVE,
        1e-45,
        65504.0,
        65519.996,
        65520.0,
        2f32.powi(-24),
        2f32.powi(-25),
        3.0 * 2f32.powi(-26),
        2f32.powi(-14),
        2f32.powi(-14) - 2f32.powi(-25),
        1.0 + 2f32.powi(-8),
        1.0 + 3.0 * 2f32.powi(-8),
        1.0 + 2f32.powi(-11),
        1.0 + 3.0 * 2f32.powi(-11),
    ];
    // Random bit patterns, half of them with exponents near the f16 range.
    for i in 0..200_000 {
        let bits = numbers.next_u64() as u32;
        let bits = if i % 2 == 0 {
            (bits & 0x807f_ffff) | ((100 + (bits >> 27) % 50) << 23)
        } else {
            bits
        };
        x.push(f32::from_bits(bits));
    }
    let n = x.len();
    let input = device.upload(&x)?;
    let to_bf16 = device.alloc(n * 2)?;
    let to_f16 = device.alloc(n * 2)?;
    let from_f16 = device.alloc(n * 4)?;
    let args = [
        ptr(&input),
        ptr(&to_bf16),
        ptr(&to_f16),
        ptr(&from_f16),
        KernelArg::I32(n as i32),
    ];
    device.launch(
        "selftest_convert",
        LaunchConfig::linear((n as u32).div_ceil(256), 256, 0),
        &args,
    )?;
    let got_bf16: Vec<u16> = device.download(&to_bf16)?;
    let got_f16: Vec<u16> = device.download(&to_f16)?;
    let got_back: Vec<f32> = device.download(&from_f16)?;
    for i in 0..n {
        let expected_bf16 = bf16::from_f32(x[i]);
        let expected_f16 = f16::from_f32(x[i]);
        if x[i].is_nan() {
            ensure!(
                bf16::from_bits(got_bf16[i]).is_nan()
                    && f16::from_bits(got_f16[i]).is_nan()
                    && got_back[i].is_nan(),
                "NaN {:#x} did not stay NaN",
                x[i].to_bits()
            );
            continue;
        }
        ensure!(
            got_bf16[i] == expected_bf16.to_bits(),
            "bf16 of {:e} ({:#x}): {:#x}, expected {:#x}",
            x[i],
            x[i].to_bits(),
            got_bf16[i],
            expected_bf16.to_bits()
        );
        ensure!(
            got_f16[i] == expected_f16.to_bits(),
            "f16 of {:e} ({:#x}): {:#x}, expected {:#x}",
            x[i],
            x[i].to_bits(),
            got_f16[i],
            expected_f16.to_bits()
        );
        ensure!(
            got_back[i].to_bits() == expected_f16.to_f32().to_bits(),
            "f16 {:#x} back to f32: {}",
            got_f16[i],
            got_back[i]
        );
    }
    Ok(format!("{n} values, bit-exact"))
}

/// c[m, n] = a[m, k] . b[n, k]^T by `selftest_matmul_bf16_mma` (f32 out).
pub fn mma_matmul(
    device: &dyn Device,
    a: &[bf16],
    b: &[bf16],
    m: usize,
    n: usize,
    k: usize,
) -> Result<Vec<f32>> {
    let a_buffer = device.upload(a)?;
    let b_buffer = device.upload(b)?;
    let c = device.alloc(m * n * 4)?;
    let config = LaunchConfig {
        grid: [n.div_ceil(32) as u32, m.div_ceil(32) as u32, 1],
        block: [128, 1, 1],
        shared_mem_bytes: 0,
        programmatic: false,
    };
    let args = [
        ptr(&a_buffer),
        ptr(&b_buffer),
        ptr(&c),
        KernelArg::I32(m as i32),
        KernelArg::I32(n as i32),
        KernelArg::I32(k as i32),
    ];
    device.launch("selftest_matmul_bf16_mma", config, &args)?;
    device.download(&c)
}

fn mma_matmul_matches_reference(ctx: &Context) -> Result<String> {
    let device = ctx.device.as_ref();
    let mut numbers = Numbers(4);
    // k % 8 != 0 takes the element-wise staging path, k % 32 != 0 a partial last tile.
    let shapes = [
        (16, 8, 16),
        (32, 32, 32),
        (45, 70, 100),
        (33, 17, 40),
        (64, 96, 256),
        (1, 1, 1),
        (70, 5, 8),
    ];
    for (m, n, k) in shapes {
        let a = numbers.bf16s(m * k);
        let b = numbers.bf16s(n * k);
        let got = mma_matmul(device, &a, &b, m, n, k)?;
        for row in 0..m {
            for col in 0..n {
                let products = (0..k).map(|i| a[row * k + i].to_f64() * b[col * k + i].to_f64());
                let expected: f64 = products.clone().sum();
                let magnitude: f64 = products.map(f64::abs).sum();
                let tolerance = 1e-6 * magnitude * (k as f64).log2().max(1.0) + 1e-7;
                let value = got[row * n + col] as f64;
                ensure!(
                    (value - expected).abs() <= tolerance,
                    "{m}x{n}x{k} at ({row}, {col}): {value} vs {expected}"
                );
            }
        }
    }
    Ok(format!("{} shapes", shapes.len()))
}

/// bf16 bits of a small integer (exact).
fn small_bf16(value: i32) -> u32 {
    bf16::from_f32(value as f32).to_bits() as u32
}

fn mma_fragments_follow_the_ptx_tables(ctx: &Context) -> Result<String> {
    // Distinct small integers: every product and sum is exact in f32, so a misplaced element
    // changes the result.
    let a = |row: usize, col: usize| ((row * 16 + col) % 23) as i32 - 11;
    let b = |k: usize, n: usize| ((k * 8 + n) % 19) as i32 - 9;
    let c = |row: usize, n: usize| (row * 8 + n) as i32 * 3 - 100;
    let mut a_regs = vec![0u32; 32 * 4];
    let mut b_regs = vec![0u32; 32 * 2];
    let mut c_regs = vec![0f32; 32 * 4];
    for lane in 0..32 {
        let (g, t) = (lane >> 2, lane & 3);
        // A: reg0 = (g, 2t..2t+1), reg1 = (g+8, 2t..), reg2 = (g, 2t+8..), reg3 = (g+8, 2t+8..).
        let a_origin = [
            (g, 2 * t),
            (g + 8, 2 * t),
            (g, 2 * t + 8),
            (g + 8, 2 * t + 8),
        ];
        for (reg, &(row, col)) in a_origin.iter().enumerate() {
            a_regs[lane * 4 + reg] = small_bf16(a(row, col)) | small_bf16(a(row, col + 1)) << 16;
        }
        // B: element i (i = 0..3, two per register, low half first): k = 2t + (i & 1) (+8 for
        // i >= 2), n = g.
        for reg in 0..2 {
            let k0 = 2 * t + 8 * reg;
            b_regs[lane * 2 + reg] = small_bf16(b(k0, g)) | small_bf16(b(k0 + 1, g)) << 16;
        }
        // C: c[i] = (g + 8 * (i >= 2), 2t + (i & 1)).
        for i in 0..4 {
            c_regs[lane * 4 + i] = c(g + 8 * (i / 2), 2 * t + (i & 1)) as f32;
        }
    }
    let device = ctx.device.as_ref();
    let a_buffer = device.upload(&a_regs)?;
    let b_buffer = device.upload(&b_regs)?;
    let c_buffer = device.upload(&c_regs)?;
    let d_buffer = device.alloc(32 * 4 * 4)?;
    let args = [
        ptr(&a_buffer),
        ptr(&b_buffer),
        ptr(&c_buffer),
        ptr(&d_buffer),
    ];
    device.launch(
        "selftest_mma_fragments",
        LaunchConfig::linear(1, 32, 0),
        &args,
    )?;
    let d: Vec<f32> = device.download(&d_buffer)?;
    for lane in 0..32 {
        let (g, t) = (lane >> 2, lane & 3);
        for i in 0..4 {
            let (row, col) = (g + 8 * (i / 2), 2 * t + (i & 1));
            let expected = c(row, col) + (0..16).map(|k| a(row, k) * b(k, col)).sum::<i32>();
            ensure!(
                d[lane * 4 + i] == expected as f32,
                "lane {lane} d[{i}] = D[{row}][{col}]: {}, expected {expected}",
                d[lane * 4 + i]
            );
        }
    }
    Ok("m16n8k16 bf16, every lane and register".into())
}

fn ldmatrix_follows_the_ptx_tables(ctx: &Context) -> Result<String> {
    let tile: Vec<u16> = (0..256).map(|i| i as u16 + 1000).collect();
    let device = ctx.device.as_ref();
    let tile_buffer = device.upload(&tile)?;
    let out = device.alloc(32 * 12 * 4)?;
    device.launch(
        "selftest_ldmatrix",
        LaunchConfig::linear(1, 32, 0),
        &[ptr(&tile_buffer), ptr(&out)],
    )?;
    let got: Vec<u32> = device.download(&out)?;
    // Matrix m covers rows (m & 1) * 8.., columns (m >> 1) * 8.. of the tile (see the kernel).
    let element = |m: usize, row: usize, col: usize| {
        tile[((m & 1) * 8 + row) * 16 + (m >> 1) * 8 + col] as u32
    };
    for lane in 0..32 {
        let (g, t) = (lane >> 2, lane & 3);
        let plain = |m: usize| element(m, g, 2 * t) | element(m, g, 2 * t + 1) << 16;
        let transposed = |m: usize| element(m, 2 * t, g) | element(m, 2 * t + 1, g) << 16;
        let row = &got[lane * 12..(lane + 1) * 12];
        for m in 0..4 {
            ensure!(row[m] == plain(m), "x4 lane {lane} r[{m}]: {:#x}", row[m]);
            ensure!(
                row[4 + m] == transposed(m),
                "x4.trans lane {lane} r[{m}]: {:#x}",
                row[4 + m]
            );
        }
        for m in 0..2 {
            ensure!(
                row[8 + m] == plain(m),
                "x2 lane {lane} r[{m}]: {:#x}",
                row[8 + m]
            );
            ensure!(
                row[10 + m] == transposed(m),
                "x2.trans lane {lane} r[{m}]: {:#x}",
                row[10 + m]
            );
        }
    }
    Ok("x4, x2, plain and .trans".into())
}

fn shuffles_follow_cuda_semantics(ctx: &Context) -> Result<String> {
    let device = ctx.device.as_ref();
    let out = device.alloc(5 * 32 * 4)?;
    for width in [32i32, 16, 8, 4, 2, 1] {
        for b in [0i32, 1, 2, 3, 5, 8, 15, 16, 17, 31, 32, 33] {
            let args = [ptr(&out), KernelArg::I32(b), KernelArg::I32(width)];
            device.launch(
                "selftest_shuffle_sources",
                LaunchConfig::linear(1, 32, 0),
                &args,
            )?;
            let got: Vec<i32> = device.download(&out)?;
            // The CUDA Programming Guide's rules per segment of `width` lanes; PTX reads only
            // the low 5 bits of the lane operand.
            let w = width;
            let b5 = b & 31;
            for lane in 0..32i32 {
                let segment = lane / w * w;
                let idx = segment + b5 % w;
                let up = if lane % w >= b5 { lane - b5 } else { lane };
                let down = if lane % w + b5 < w { lane + b5 } else { lane };
                // xor may read earlier segments, never later ones.
                let xor = if (lane ^ b5) < segment + w {
                    lane ^ b5
                } else {
                    lane
                };
                let per_lane_idx = segment + ((lane * 7 + b) & 31) % w;
                let expected = [idx, up, down, xor, per_lane_idx];
                for (mode, &want) in expected.iter().enumerate() {
                    let value = got[mode * 32 + lane as usize];
                    ensure!(
                        value == want,
                        "mode {mode} (idx, up, down, xor, per-lane idx) width {w} b {b} lane \
                         {lane}: read lane {value}, expected {want}"
                    );
                }
            }
        }
    }
    Ok("5 modes x 6 widths x 12 offsets".into())
}

fn votes_and_warp_reductions(ctx: &Context) -> Result<String> {
    let device = ctx.device.as_ref();
    let mut numbers = Numbers(7);
    let threads = 96usize;
    for round in 0..4 {
        let predicate: Vec<i32> = (0..threads)
            .map(|i| match round {
                0 => 0,
                1 => 3,
                _ => (numbers.next_u64() % 3) as i32 * (i % 2) as i32,
            })
            .collect();
        let predicate_buffer = device.upload(&predicate)?;
        let out = device.alloc(threads * 5 * 4)?;
        device.launch(
            "selftest_votes",
            LaunchConfig::linear(1, threads as u32, 0),
            &[ptr(&predicate_buffer), ptr(&out)],
        )?;
        let got: Vec<u32> = device.download(&out)?;
        for warp in 0..threads / 32 {
            let lanes = &predicate[warp * 32..(warp + 1) * 32];
            let ballot = lanes
                .iter()
                .enumerate()
                .fold(0u32, |acc, (l, &p)| acc | ((p != 0) as u32) << l);
            let sum: u32 = lanes.iter().map(|&p| p as u32).sum();
            let max = *lanes.iter().max().expect("32 lanes") as u32;
            let expected = [
                ballot,
                (ballot == u32::MAX) as u32,
                (ballot != 0) as u32,
                sum,
                max,
            ];
            for lane in 0..32 {
                let row = &got[(warp * 32 + lane) * 5..(warp * 32 + lane + 1) * 5];
                ensure!(
                    row == expected,
                    "round {round} warp {warp} lane {lane}: (ballot, all, any, sum, max) = \
                     {row:?}, expected {expected:?}"
                );
            }
        }
    }
    // A full-warp mask in full warps.
    let x = device.upload(&vec![1.0f32; 64])?;
    let sums = device.alloc(2 * 4)?;
    device.launch(
        "selftest_warp_sums",
        LaunchConfig::linear(1, 64, 0),
        &[ptr(&x), ptr(&sums)],
    )?;
    let sums: Vec<f32> = device.download(&sums)?;
    ensure!(
        sums == [32.0, 32.0],
        "warp sums {sums:?}, expected [32, 32]"
    );
    Ok("ballot, all, any, sums, max".into())
}

fn cp_async_groups_complete_when_waited_for(ctx: &Context) -> Result<String> {
    let device = ctx.device.as_ref();
    let threads = 64usize;
    let src: Vec<f32> = (0..3 * threads * 4).map(|i| i as f32).collect();
    let src_buffer = device.upload(&src)?;
    let early = device.alloc(src.len() * 4)?;
    let late = device.alloc(src.len() * 4)?;
    let config = LaunchConfig::linear(1, threads as u32, (3 * threads * 16) as u32);
    device.launch(
        "selftest_cp_async_groups",
        config,
        &[ptr(&src_buffer), ptr(&early), ptr(&late)],
    )?;
    let early: Vec<u32> = device.download(&early)?;
    let late: Vec<f32> = device.download(&late)?;
    ensure!(
        late == src,
        "after waiting for every group, shared memory differs from the source"
    );
    let group = threads * 4;
    // Group 0 was waited for. Groups 1 and 2 may or may not have landed on a GPU; on the
    // emulator they have not, and shared memory still holds its fresh 0xff bytes.
    for (i, &bits) in early.iter().enumerate() {
        if i < group {
            ensure!(
                bits == src[i].to_bits(),
                "element {i} of the waited-for group: {bits:#x}"
            );
        } else if ctx.emulated {
            ensure!(
                bits == u32::MAX,
                "element {i} of an un-waited group already landed"
            );
        }
    }
    Ok("wait_group 2 then 0".into())
}

fn dynamic_shared_memory_and_the_opt_in(ctx: &Context) -> Result<String> {
    let device = ctx.device.as_ref();
    let mut numbers = Numbers(8);
    let reverse = |n: usize| -> Result<()> {
        let x = Numbers(n as u64).floats(n);
        let x_buffer = device.upload(&x)?;
        let out = device.alloc(n * 4)?;
        let args = [ptr(&x_buffer), ptr(&out), KernelArg::I32(n as i32)];
        device.launch(
            "selftest_dynamic_shared_reverse",
            LaunchConfig::linear(1, 256, (n * 4) as u32),
            &args,
        )?;
        let got: Vec<f32> = device.download(&out)?;
        ensure!(
            got.iter().eq(x.iter().rev()),
            "{n} floats were not reversed"
        );
        Ok(())
    };
    reverse(1000 + (numbers.next_u64() % 7) as usize)?;
    let big = 50_000; // 200,000 bytes: above 48 KiB, below 227 KiB.
    let error = match reverse(big) {
        Ok(()) => bail!("200,000 bytes of dynamic shared memory without the opt-in were accepted"),
        Err(error) => format!("{error:#}"),
    };
    expect_parts(
        &error,
        &["selftest_dynamic_shared_reverse", "set_max_dynamic_shared"],
    )?;
    device.set_max_dynamic_shared("selftest_dynamic_shared_reverse", (big * 4) as u32)?;
    reverse(big)?;
    let error = match reverse(big + 1) {
        Ok(()) => bail!("more dynamic shared memory than the opt-in was accepted"),
        Err(error) => format!("{error:#}"),
    };
    expect_parts(
        &error,
        &["exceed the 200000 bytes set by set_max_dynamic_shared"],
    )?;
    let error = match device.set_max_dynamic_shared("selftest_dynamic_shared_reverse", 228 * 1024) {
        Ok(()) => bail!("an opt-in of 228 KiB was accepted"),
        Err(error) => format!("{error:#}"),
    };
    expect_parts(&error, &["selftest_dynamic_shared_reverse", "232448"])?;
    Ok("200,000 bytes after the opt-in".into())
}

fn static_shared_memory_counts_against_the_limit(ctx: &Context) -> Result<String> {
    let device = ctx.device.as_ref();
    let (_, signature) = kernel_signature("selftest_static_shared_40k")?;
    ensure!(
        signature.static_shared_bytes == 40 * 1024,
        "build.rs counted {} bytes of static shared memory, the kernel declares 40 KiB",
        signature.static_shared_bytes
    );
    let out = device.alloc(64 * 4)?;
    device.launch(
        "selftest_static_shared_40k",
        LaunchConfig::linear(1, 64, 8 * 1024),
        &[ptr(&out)],
    )?;
    let got: Vec<f32> = device.download(&out)?;
    if let Some((t, &v)) = got
        .iter()
        .enumerate()
        .find(|&(t, &v)| v != (10239 - t) as f32)
    {
        bail!("thread {t} read {v}, expected {}", 10239 - t);
    }
    let error = launch_error(
        device,
        "selftest_static_shared_40k",
        LaunchConfig::linear(1, 64, 8 * 1024 + 1),
        &[ptr(&out)],
    )?;
    expect_parts(
        &error,
        &["selftest_static_shared_40k", "40960 bytes of static"],
    )?;
    Ok("40 KiB static + 8 KiB dynamic".into())
}

fn graph_capture_replays_launches_with_current_memory(ctx: &Context) -> Result<String> {
    let device = ctx.device.as_ref();
    let (rows, cols) = (4usize, 50usize);
    let x = device.upload(&vec![1.0f32; rows * cols])?;
    let out = device.upload(&vec![-7.0f32; rows])?;
    let args = [
        ptr(&x),
        ptr(&out),
        KernelArg::I32(rows as i32),
        KernelArg::I32(cols as i32),
    ];
    let capture = |refused: bool| -> Result<crate::backend::cuda::Graph> {
        device.begin_capture()?;
        let issued = (|| {
            device.memset_zero(&out, 0, rows * 4)?;
            device.launch(
                "selftest_reduce_rows",
                LaunchConfig::linear(rows as u32, 64, 0),
                &args,
            )?;
            if refused {
                let error = match device.copy_htod(&x, 0, &[0u8; 4]) {
                    Ok(()) => bail!("a copy during capture was accepted"),
                    Err(error) => format!("{error:#}"),
                };
                expect_parts(&error, &["copy_htod during graph capture"])?;
            }
            Ok(())
        })();
        let graph = device.end_capture();
        issued?;
        graph
    };
    // A refused operation invalidates the capture, as the driver does.
    match capture(true) {
        Ok(_) => bail!("a capture with a refused copy ended without an error"),
        Err(error) => expect_parts(
            &format!("{error:#}"),
            &["CUDA_ERROR_STREAM_CAPTURE_INVALIDATED"],
        )?,
    }
    let graph = capture(false)?;
    // Nothing ran during capture.
    let before: Vec<f32> = device.download(&out)?;
    ensure!(
        before == vec![-7.0; rows],
        "capture ran its launches: {before:?}"
    );
    for scale in [1.0f32, 2.5] {
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| scale * (i / cols) as f32)
            .collect();
        device.copy_htod(&x, 0, bytemuck::cast_slice(&values))?;
        let start = device.record_event()?;
        device.launch_graph(&graph)?;
        let end = device.record_event()?;
        device.synchronize()?;
        ensure!(
            device.elapsed_ms(&start, &end)? >= 0.0,
            "negative event time"
        );
        let expected: Vec<f32> = (0..rows).map(|r| scale * (r * cols) as f32).collect();
        let got: Vec<f32> = device.download(&out)?;
        ensure!(
            got == expected,
            "replay with scale {scale}: {got:?}, expected {expected:?}"
        );
    }
    Ok("memset + launch, replayed twice over new inputs".into())
}
