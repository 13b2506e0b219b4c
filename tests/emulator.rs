//! The CUDA emulator against CPU references: working kernels (reduction, elementwise, mma
//! matmul), the documented PTX layouts (mma fragments, ldmatrix, shuffles), hardware limits,
//! planted bugs, graph capture. Kernels live in kernels/emu_selftest.cu.
//!
//! Out-of-bounds reads are only caught by the AddressSanitizer build:
//! `cargo test --release --features emu-asan --test emulator`.
use std::sync::Arc;

use half::{bf16, f16};
use kvlab::backend::cuda::device::{kernel_signature, KERNELS};
use kvlab::backend::cuda::emu::{sanitizer_active, EmuDevice};
use kvlab::backend::cuda::{
    open_device, BackendKind, Device, DeviceBuffer, KernelArg, LaunchConfig,
};

fn emulator(threads: usize) -> Arc<dyn Device> {
    Arc::new(EmuDevice::with_options(threads, false).expect("emulator"))
}

fn race_checked_emulator() -> Arc<dyn Device> {
    Arc::new(EmuDevice::with_options(2, true).expect("emulator"))
}

/// Deterministic pseudo-random numbers (xorshift64*), uniform in [-1, 1).
struct Numbers(u64);

impl Numbers {
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn floats(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.uniform()).collect()
    }
    fn bf16s(&mut self, n: usize) -> Vec<bf16> {
        (0..n).map(|_| bf16::from_f32(self.uniform())).collect()
    }
}

fn ptr(buffer: &DeviceBuffer) -> KernelArg {
    KernelArg::Ptr(buffer.ptr())
}

fn launch_error(
    device: &dyn Device,
    kernel: &str,
    config: LaunchConfig,
    args: &[KernelArg],
) -> String {
    match device.launch(kernel, config, args) {
        Ok(()) => panic!("launching `{kernel}` with {config:?} should have failed"),
        Err(error) => format!("{error:#}"),
    }
}

fn assert_contains(text: &str, parts: &[&str]) {
    for part in parts {
        assert!(text.contains(part), "expected {part:?} in: {text}");
    }
}

fn reduce_rows(device: &dyn Device, x: &[f32], rows: usize, cols: usize, threads: u32) -> Vec<f32> {
    let x_buffer = device.upload(x).unwrap();
    let out = device.alloc(rows * 4).unwrap();
    let args = [
        ptr(&x_buffer),
        ptr(&out),
        KernelArg::I32(rows as i32),
        KernelArg::I32(cols as i32),
    ];
    device
        .launch(
            "selftest_reduce_rows",
            LaunchConfig::linear(rows as u32, threads, 0),
            &args,
        )
        .unwrap();
    device.download(&out).unwrap()
}

#[test]
fn reduce_rows_matches_reference() {
    let device = emulator(2);
    let mut numbers = Numbers(1);
    for (rows, cols, threads) in [
        (1, 1, 32),
        (3, 1000, 128),
        (7, 4097, 256),
        (64, 33, 1024),
        (5, 96, 64),
    ] {
        let x = numbers.floats(rows * cols);
        let got = reduce_rows(device.as_ref(), &x, rows, cols, threads);
        for row in 0..rows {
            let values = &x[row * cols..(row + 1) * cols];
            let expected: f64 = values.iter().map(|&v| v as f64).sum();
            let magnitude: f64 = values.iter().map(|&v| v.abs() as f64).sum();
            // f32 accumulation in a different order: error bounded by ~cols * eps * sum|x|.
            let tolerance = 1e-6 * magnitude * (cols as f64).log2().max(1.0) + 1e-7;
            assert!(
                (got[row] as f64 - expected).abs() <= tolerance,
                "rows {rows} cols {cols} threads {threads} row {row}: {} vs {expected}",
                got[row]
            );
        }
    }
}

#[test]
fn silu_mul_bf16_matches_reference() {
    let device = emulator(2);
    let mut numbers = Numbers(2);
    for n in [1usize, 31, 1000, 65537] {
        let gate: Vec<bf16> = numbers
            .floats(n)
            .iter()
            .map(|v| bf16::from_f32(v * 8.0))
            .collect();
        let up = numbers.bf16s(n);
        let gate_buffer = device.upload(&gate).unwrap();
        let up_buffer = device.upload(&up).unwrap();
        let out = device.alloc(n * 2).unwrap();
        let blocks = (n as u32).div_ceil(256).min(16);
        let args = [
            ptr(&gate_buffer),
            ptr(&up_buffer),
            ptr(&out),
            KernelArg::I32(n as i32),
        ];
        device
            .launch(
                "selftest_silu_mul_bf16",
                LaunchConfig::linear(blocks, 256, 0),
                &args,
            )
            .unwrap();
        let got: Vec<bf16> = device.download(&out).unwrap();
        for i in 0..n {
            let g = gate[i].to_f32();
            let expected = g / (1.0 + (-g).exp()) * up[i].to_f32();
            // One bf16 rounding of a value whose f32 computation may differ in the last ulp.
            let tolerance = expected.abs() * 2f32.powi(-7) + 1e-30;
            assert!(
                (got[i].to_f32() - expected).abs() <= tolerance,
                "n {n} i {i}: {} vs {expected}",
                got[i]
            );
        }
    }
}

#[test]
fn conversions_match_half_crate() {
    let device = emulator(1);
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
    let input = device.upload(&x).unwrap();
    let to_bf16 = device.alloc(n * 2).unwrap();
    let to_f16 = device.alloc(n * 2).unwrap();
    let from_f16 = device.alloc(n * 4).unwrap();
    let args = [
        ptr(&input),
        ptr(&to_bf16),
        ptr(&to_f16),
        ptr(&from_f16),
        KernelArg::I32(n as i32),
    ];
    device
        .launch(
            "selftest_convert",
            LaunchConfig::linear((n as u32).div_ceil(256), 256, 0),
            &args,
        )
        .unwrap();
    let got_bf16: Vec<u16> = device.download(&to_bf16).unwrap();
    let got_f16: Vec<u16> = device.download(&to_f16).unwrap();
    let got_back: Vec<f32> = device.download(&from_f16).unwrap();
    for i in 0..n {
        let expected_bf16 = bf16::from_f32(x[i]);
        let expected_f16 = f16::from_f32(x[i]);
        if x[i].is_nan() {
            assert!(
                bf16::from_bits(got_bf16[i]).is_nan()
                    && f16::from_bits(got_f16[i]).is_nan()
                    && got_back[i].is_nan()
            );
            continue;
        }
        assert_eq!(
            got_bf16[i],
            expected_bf16.to_bits(),
            "bf16 of {:e} ({:#x})",
            x[i],
            x[i].to_bits()
        );
        assert_eq!(
            got_f16[i],
            expected_f16.to_bits(),
            "f16 of {:e} ({:#x})",
            x[i],
            x[i].to_bits()
        );
        assert_eq!(
            got_back[i].to_bits(),
            expected_f16.to_f32().to_bits(),
            "f16 {:#x} back to f32",
            got_f16[i]
        );
    }
}

fn matmul(device: &dyn Device, a: &[bf16], b: &[bf16], m: usize, n: usize, k: usize) -> Vec<f32> {
    let a_buffer = device.upload(a).unwrap();
    let b_buffer = device.upload(b).unwrap();
    let c = device.alloc(m * n * 4).unwrap();
    let config = LaunchConfig {
        grid: [n.div_ceil(32) as u32, m.div_ceil(32) as u32, 1],
        block: [128, 1, 1],
        shared_mem_bytes: 0,
    };
    let args = [
        ptr(&a_buffer),
        ptr(&b_buffer),
        ptr(&c),
        KernelArg::I32(m as i32),
        KernelArg::I32(n as i32),
        KernelArg::I32(k as i32),
    ];
    device
        .launch("selftest_matmul_bf16_mma", config, &args)
        .unwrap();
    device.download(&c).unwrap()
}

#[test]
fn mma_matmul_matches_reference() {
    let device = emulator(2);
    let mut numbers = Numbers(4);
    // k % 8 != 0 takes the element-wise staging path, k % 32 != 0 a partial last tile.
    for (m, n, k) in [
        (16, 8, 16),
        (32, 32, 32),
        (45, 70, 100),
        (33, 17, 40),
        (64, 96, 256),
        (1, 1, 1),
        (70, 5, 8),
    ] {
        let a = numbers.bf16s(m * k);
        let b = numbers.bf16s(n * k);
        let got = matmul(device.as_ref(), &a, &b, m, n, k);
        for row in 0..m {
            for col in 0..n {
                let products = (0..k).map(|i| a[row * k + i].to_f64() * b[col * k + i].to_f64());
                let expected: f64 = products.clone().sum();
                let magnitude: f64 = products.map(f64::abs).sum();
                let tolerance = 1e-6 * magnitude * (k as f64).log2().max(1.0) + 1e-7;
                let value = got[row * n + col] as f64;
                assert!(
                    (value - expected).abs() <= tolerance,
                    "{m}x{n}x{k} at ({row}, {col}): {value} vs {expected}"
                );
            }
        }
    }
}

#[test]
fn results_do_not_depend_on_thread_count() {
    let mut numbers = Numbers(5);
    let (m, n, k) = (96, 64, 72);
    let a = numbers.bf16s(m * k);
    let b = numbers.bf16s(n * k);
    let x = numbers.floats(40 * 1000);
    let one = emulator(1);
    let four = emulator(4);
    let bits = |values: Vec<f32>| values.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(
        bits(matmul(one.as_ref(), &a, &b, m, n, k)),
        bits(matmul(four.as_ref(), &a, &b, m, n, k))
    );
    assert_eq!(
        bits(reduce_rows(one.as_ref(), &x, 40, 1000, 128)),
        bits(reduce_rows(four.as_ref(), &x, 40, 1000, 128))
    );
}

#[test]
fn race_check_accepts_correct_kernels() {
    let device = race_checked_emulator();
    let mut numbers = Numbers(6);
    let x = numbers.floats(9 * 300);
    let got = reduce_rows(device.as_ref(), &x, 9, 300, 96);
    let plain = reduce_rows(emulator(1).as_ref(), &x, 9, 300, 96);
    assert_eq!(got, plain);
    let a = numbers.bf16s(40 * 48);
    let b = numbers.bf16s(24 * 48);
    assert_eq!(
        matmul(device.as_ref(), &a, &b, 40, 24, 48),
        matmul(emulator(1).as_ref(), &a, &b, 40, 24, 48)
    );
}

/// bf16 bits of a small integer (exact).
fn small_bf16(value: i32) -> u32 {
    bf16::from_f32(value as f32).to_bits() as u32
}

#[test]
fn mma_fragments_follow_the_ptx_tables() {
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
    let device = emulator(1);
    let a_buffer = device.upload(&a_regs).unwrap();
    let b_buffer = device.upload(&b_regs).unwrap();
    let c_buffer = device.upload(&c_regs).unwrap();
    let d_buffer = device.alloc(32 * 4 * 4).unwrap();
    let args = [
        ptr(&a_buffer),
        ptr(&b_buffer),
        ptr(&c_buffer),
        ptr(&d_buffer),
    ];
    device
        .launch(
            "selftest_mma_fragments",
            LaunchConfig::linear(1, 32, 0),
            &args,
        )
        .unwrap();
    let d: Vec<f32> = device.download(&d_buffer).unwrap();
    for lane in 0..32 {
        let (g, t) = (lane >> 2, lane & 3);
        for i in 0..4 {
            let (row, col) = (g + 8 * (i / 2), 2 * t + (i & 1));
            let expected = c(row, col) + (0..16).map(|k| a(row, k) * b(k, col)).sum::<i32>();
            assert_eq!(
                d[lane * 4 + i],
                expected as f32,
                "lane {lane} d[{i}] = D[{row}][{col}]"
            );
        }
    }
}

#[test]
fn ldmatrix_follows_the_ptx_tables() {
    let tile: Vec<u16> = (0..256).map(|i| i as u16 + 1000).collect();
    let device = emulator(1);
    let tile_buffer = device.upload(&tile).unwrap();
    let out = device.alloc(32 * 12 * 4).unwrap();
    device
        .launch(
            "selftest_ldmatrix",
            LaunchConfig::linear(1, 32, 0),
            &[ptr(&tile_buffer), ptr(&out)],
        )
        .unwrap();
    let got: Vec<u32> = device.download(&out).unwrap();
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
            assert_eq!(row[m], plain(m), "x4 lane {lane} r[{m}]");
            assert_eq!(row[4 + m], transposed(m), "x4.trans lane {lane} r[{m}]");
        }
        for m in 0..2 {
            assert_eq!(row[8 + m], plain(m), "x2 lane {lane} r[{m}]");
            assert_eq!(row[10 + m], transposed(m), "x2.trans lane {lane} r[{m}]");
        }
    }
}

#[test]
fn shuffles_follow_cuda_semantics() {
    let device = emulator(1);
    let out = device.alloc(5 * 32 * 4).unwrap();
    for width in [32i32, 16, 8, 4, 2, 1] {
        for b in [0i32, 1, 2, 3, 5, 8, 15, 16, 17, 31, 32, 33] {
            let args = [ptr(&out), KernelArg::I32(b), KernelArg::I32(width)];
            device
                .launch(
                    "selftest_shuffle_sources",
                    LaunchConfig::linear(1, 32, 0),
                    &args,
                )
                .unwrap();
            let got: Vec<i32> = device.download(&out).unwrap();
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
                    assert_eq!(
                        got[mode * 32 + lane as usize],
                        want,
                        "mode {mode} width {w} b {b} lane {lane}"
                    );
                }
            }
        }
    }
}

#[test]
fn votes_and_warp_reductions() {
    let device = emulator(1);
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
        let predicate_buffer = device.upload(&predicate).unwrap();
        let out = device.alloc(threads * 5 * 4).unwrap();
        device
            .launch(
                "selftest_votes",
                LaunchConfig::linear(1, threads as u32, 0),
                &[ptr(&predicate_buffer), ptr(&out)],
            )
            .unwrap();
        let got: Vec<u32> = device.download(&out).unwrap();
        for warp in 0..threads / 32 {
            let lanes = &predicate[warp * 32..(warp + 1) * 32];
            let ballot = lanes
                .iter()
                .enumerate()
                .fold(0u32, |acc, (l, &p)| acc | ((p != 0) as u32) << l);
            let sum: u32 = lanes.iter().map(|&p| p as u32).sum();
            let max = *lanes.iter().max().unwrap() as u32;
            for lane in 0..32 {
                let row = &got[(warp * 32 + lane) * 5..(warp * 32 + lane + 1) * 5];
                assert_eq!(
                    row,
                    [
                        ballot,
                        (ballot == u32::MAX) as u32,
                        (ballot != 0) as u32,
                        sum,
                        max
                    ],
                    "warp {warp}"
                );
            }
        }
    }
}

#[test]
fn cp_async_groups_complete_when_waited_for() {
    let device = emulator(1);
    let threads = 64usize;
    let src: Vec<f32> = (0..3 * threads * 4).map(|i| i as f32).collect();
    let src_buffer = device.upload(&src).unwrap();
    let early = device.alloc(src.len() * 4).unwrap();
    let late = device.alloc(src.len() * 4).unwrap();
    let config = LaunchConfig::linear(1, threads as u32, (3 * threads * 16) as u32);
    device
        .launch(
            "selftest_cp_async_groups",
            config,
            &[ptr(&src_buffer), ptr(&early), ptr(&late)],
        )
        .unwrap();
    let early: Vec<u32> = device.download(&early).unwrap();
    let late: Vec<f32> = device.download(&late).unwrap();
    assert_eq!(late, src);
    let group = threads * 4;
    for (i, &bits) in early.iter().enumerate() {
        // Group 0 was waited for; groups 1 and 2 still hold fresh shared memory (0xff bytes).
        let expected = if i < group {
            src[i].to_bits()
        } else {
            u32::MAX
        };
        assert_eq!(bits, expected, "element {i}");
    }
}

#[test]
fn dynamic_shared_memory_and_the_opt_in() {
    let device = emulator(1);
    let mut numbers = Numbers(8);
    let reverse = |device: &dyn Device, n: usize| -> anyhow::Result<()> {
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
        assert!(got.iter().eq(x.iter().rev()), "reversed {n} floats");
        Ok(())
    };
    reverse(device.as_ref(), 1000 + (numbers.next_u64() % 7) as usize).unwrap();
    let big = 50_000; // 200,000 bytes: above 48 KiB, below 227 KiB.
    let error = format!("{:#}", reverse(device.as_ref(), big).unwrap_err());
    assert_contains(
        &error,
        &["selftest_dynamic_shared_reverse", "set_max_dynamic_shared"],
    );
    device
        .set_max_dynamic_shared("selftest_dynamic_shared_reverse", (big * 4) as u32)
        .unwrap();
    reverse(device.as_ref(), big).unwrap();
    let error = format!("{:#}", reverse(device.as_ref(), big + 1).unwrap_err());
    assert_contains(
        &error,
        &["exceed the 200000 bytes set by set_max_dynamic_shared"],
    );
    let error = format!(
        "{:#}",
        device
            .set_max_dynamic_shared("selftest_dynamic_shared_reverse", 228 * 1024)
            .unwrap_err()
    );
    assert_contains(&error, &["selftest_dynamic_shared_reverse", "232448"]);
}

#[test]
fn static_shared_memory_counts_against_the_limit() {
    let (_, signature) = kernel_signature("selftest_static_shared_40k").unwrap();
    assert_eq!(signature.static_shared_bytes, 40 * 1024);
    let (_, reduce) = kernel_signature("selftest_reduce_rows").unwrap();
    assert_eq!(reduce.static_shared_bytes, 32 * 4);
    let device = emulator(1);
    let out = device.alloc(64 * 4).unwrap();
    device
        .launch(
            "selftest_static_shared_40k",
            LaunchConfig::linear(1, 64, 8 * 1024),
            &[ptr(&out)],
        )
        .unwrap();
    let got: Vec<f32> = device.download(&out).unwrap();
    assert!(got
        .iter()
        .enumerate()
        .all(|(t, &v)| v == (10239 - t) as f32));
    let error = launch_error(
        device.as_ref(),
        "selftest_static_shared_40k",
        LaunchConfig::linear(1, 64, 8 * 1024 + 1),
        &[ptr(&out)],
    );
    assert_contains(
        &error,
        &["selftest_static_shared_40k", "40960 bytes of static"],
    );
}

#[test]
fn launch_checks_name_the_kernel() {
    let device = emulator(1);
    let out = device.alloc(4096).unwrap();
    let args = [ptr(&out), KernelArg::I32(1)];
    let cases: [(LaunchConfig, &[&str]); 6] = [
        (
            LaunchConfig::linear(1, 1025, 0),
            &["block dimension 0 is 1025"],
        ),
        (
            LaunchConfig {
                grid: [1, 1, 1],
                block: [32, 32, 2],
                shared_mem_bytes: 0,
            },
            &["2048 threads"],
        ),
        (
            LaunchConfig {
                grid: [1, 1, 1],
                block: [1, 1, 65],
                shared_mem_bytes: 0,
            },
            &["block dimension 2 is 65"],
        ),
        (
            LaunchConfig {
                grid: [1, 65536, 1],
                block: [32, 1, 1],
                shared_mem_bytes: 0,
            },
            &["grid dimension 1 is 65536"],
        ),
        (LaunchConfig::linear(0, 32, 0), &["grid dimension 0 is 0"]),
        (
            LaunchConfig::linear(1, 32, 49 * 1024),
            &["50176 bytes of dynamic"],
        ),
    ];
    for (config, parts) in cases {
        let error = launch_error(device.as_ref(), "planted_oob_write", config, &args);
        assert_contains(&error, &["planted_oob_write"]);
        assert_contains(&error, parts);
    }
    let ok = LaunchConfig::linear(1, 1, 0);
    let error = launch_error(device.as_ref(), "planted_oob_write", ok, &[ptr(&out)]);
    assert_contains(&error, &["planted_oob_write", "takes 2 arguments, got 1"]);
    let error = launch_error(
        device.as_ref(),
        "planted_oob_write",
        ok,
        &[ptr(&out), KernelArg::F32(1.0)],
    );
    assert_contains(&error, &["planted_oob_write", "argument 1 (`n`)", "I32"]);
    let error = launch_error(device.as_ref(), "no_such_kernel", ok, &[]);
    assert_contains(&error, &["no kernel named `no_such_kernel`"]);
    let stray = KernelArg::Ptr(out.ptr() + 1_000_000);
    let error = launch_error(
        device.as_ref(),
        "planted_oob_write",
        ok,
        &[stray, KernelArg::I32(0)],
    );
    assert_contains(
        &error,
        &[
            "planted_oob_write",
            "argument 0 (`out`)",
            "not inside any live device buffer",
        ],
    );
}

#[test]
fn planted_out_of_bounds_write_is_caught() {
    let device = emulator(2);
    let n = 100;
    let out = device.alloc(n * 4).unwrap();
    let error = launch_error(
        device.as_ref(),
        "planted_oob_write",
        LaunchConfig::linear(1, 128, 0),
        &[ptr(&out), KernelArg::I32(n as i32)],
    );
    if sanitizer_active() {
        assert_contains(
            &error,
            &[
                "planted_oob_write",
                "thread (100,0,0)",
                "AddressSanitizer: use-after-poison",
                "out of bounds",
            ],
        );
    } else {
        assert_contains(
            &error,
            &[
                "planted_oob_write",
                "wrote out of bounds",
                "up to 4 bytes past the end",
            ],
        );
    }
    // The guard is restored: the next correct launch on the same buffer passes.
    device
        .launch(
            "planted_oob_write",
            LaunchConfig::linear(1, 64, 0),
            &[ptr(&out), KernelArg::I32(64)],
        )
        .unwrap();
}

#[test]
fn planted_out_of_bounds_read_is_caught_under_asan() {
    if !sanitizer_active() {
        eprintln!(
            "skipped: reads are checked only by the AddressSanitizer build (--features emu-asan)"
        );
        return;
    }
    let device = emulator(1);
    let n = 50;
    let x = device.upload(&vec![1.0f32; n]).unwrap();
    let out = device.alloc(n * 4).unwrap();
    let args = [ptr(&x), ptr(&out), KernelArg::I32(n as i32)];
    let error = launch_error(
        device.as_ref(),
        "planted_oob_read",
        LaunchConfig::linear(1, 64, 0),
        &args,
    );
    assert_contains(
        &error,
        &[
            "planted_oob_read",
            "thread (49,0,0)",
            "AddressSanitizer: use-after-poison",
            "out of bounds",
        ],
    );
}

#[test]
fn planted_divergent_barriers_are_reported() {
    let device = emulator(1);
    let out = device.alloc(256 * 4).unwrap();
    let error = launch_error(
        device.as_ref(),
        "planted_divergent_barrier",
        LaunchConfig::linear(2, 256, 0),
        &[ptr(&out)],
    );
    assert_contains(
        &error,
        &[
            "planted_divergent_barrier",
            "emu_selftest.cu",
            "every thread of a block must reach every barrier",
        ],
    );
    let error = launch_error(
        device.as_ref(),
        "planted_if_else_barrier",
        LaunchConfig::linear(1, 64, 0),
        &[ptr(&out)],
    );
    assert_contains(
        &error,
        &[
            "planted_if_else_barrier",
            "divergent __syncthreads()",
            "emu_selftest.cu",
        ],
    );
}

#[test]
fn planted_shared_memory_race_is_caught_by_the_race_check() {
    let x: Vec<f32> = (0..128).map(|i| i as f32).collect();
    let launch = |device: &dyn Device| -> anyhow::Result<()> {
        let x_buffer = device.upload(&x)?;
        let out = device.alloc(128 * 4)?;
        device.launch(
            "planted_shared_race",
            LaunchConfig::linear(1, 128, 0),
            &[ptr(&x_buffer), ptr(&out)],
        )
    };
    // A single schedule cannot see the race; running both thread orders does.
    launch(emulator(1).as_ref()).unwrap();
    let error = format!(
        "{:#}",
        launch(race_checked_emulator().as_ref()).unwrap_err()
    );
    assert_contains(
        &error,
        &[
            "planted_shared_race",
            "race check failed",
            "forward and reverse thread order",
        ],
    );
}

#[test]
fn planted_missing_lane_is_reported() {
    let device = emulator(1);
    let out = device.alloc(64 * 4).unwrap();
    let error = launch_error(
        device.as_ref(),
        "planted_shuffle_missing_lane",
        LaunchConfig::linear(1, 64, 0),
        &[ptr(&out)],
    );
    assert_contains(
        &error,
        &[
            "planted_shuffle_missing_lane",
            "__shfl_xor_sync",
            "member mask 0xffffffff",
            "exited",
        ],
    );
    // A full-warp mask in a block whose last warp is partial names lanes that do not exist.
    let x = device.upload(&vec![1.0f32; 64]).unwrap();
    let sums = device.alloc(2 * 4).unwrap();
    let error = launch_error(
        device.as_ref(),
        "selftest_warp_sums",
        LaunchConfig::linear(1, 48, 0),
        &[ptr(&x), ptr(&sums)],
    );
    assert_contains(
        &error,
        &["selftest_warp_sums", "do not exist", "48 threads"],
    );
    device
        .launch(
            "selftest_warp_sums",
            LaunchConfig::linear(1, 64, 0),
            &[ptr(&x), ptr(&sums)],
        )
        .unwrap();
    assert_eq!(device.download::<f32>(&sums).unwrap(), [32.0, 32.0]);
}

#[test]
fn graph_capture_replays_launches_with_current_memory() {
    let device = emulator(2);
    let (rows, cols) = (4usize, 50usize);
    let x = device.upload(&vec![1.0f32; rows * cols]).unwrap();
    let out = device.alloc(rows * 4).unwrap();
    let args = [
        ptr(&x),
        ptr(&out),
        KernelArg::I32(rows as i32),
        KernelArg::I32(cols as i32),
    ];
    device.begin_capture().unwrap();
    device.memset_zero(&out, 0, rows * 4).unwrap();
    device
        .launch(
            "selftest_reduce_rows",
            LaunchConfig::linear(rows as u32, 64, 0),
            &args,
        )
        .unwrap();
    let error = format!("{:#}", device.copy_htod(&x, 0, &[0u8; 4]).unwrap_err());
    assert_contains(&error, &["during graph capture"]);
    let graph = device.end_capture().unwrap();
    // Nothing ran during capture: out still holds fresh memory.
    assert!(device
        .download::<f32>(&out)
        .unwrap()
        .iter()
        .all(|v| v.is_nan()));
    for scale in [1.0f32, 2.5] {
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| scale * (i / cols) as f32)
            .collect();
        device
            .copy_htod(&x, 0, bytemuck::cast_slice(&values))
            .unwrap();
        let start = device.record_event().unwrap();
        device.launch_graph(&graph).unwrap();
        let end = device.record_event().unwrap();
        assert!(device.elapsed_ms(&start, &end).unwrap() >= 0.0);
        let expected: Vec<f32> = (0..rows).map(|r| scale * (r * cols) as f32).collect();
        assert_eq!(device.download::<f32>(&out).unwrap(), expected);
    }
    drop(x);
    let error = format!("{:#}", device.launch_graph(&graph).unwrap_err());
    assert_contains(&error, &["graph node 1", "freed after capture"]);
}

#[test]
fn memory_accounting_and_copies() {
    let device = emulator(1);
    let before = device.memory().unwrap();
    assert_eq!(before.device_total, None);
    let a = device.alloc(1000).unwrap();
    let b = device.alloc(24).unwrap();
    assert_eq!(
        device.memory().unwrap().allocated_by_kvlab,
        before.allocated_by_kvlab + 1024
    );
    assert_eq!(a.ptr() % 256, 0);
    device.copy_htod(&a, 100, &[7u8; 20]).unwrap();
    device.memset_zero(&a, 104, 4).unwrap();
    device.copy_dtod(&a, 100, &b, 2, 20).unwrap();
    let mut got = [0u8; 24];
    device.copy_dtoh(&b, 0, &mut got).unwrap();
    assert_eq!(got[2..6], [7, 7, 7, 7]);
    assert_eq!(got[6..10], [0, 0, 0, 0]);
    assert_eq!(got[10..22], [7; 12]);
    let error = format!("{:#}", device.copy_htod(&b, 20, &[0u8; 5]).unwrap_err());
    assert_contains(&error, &["copy_htod", "20..25", "24 bytes"]);
    drop(a);
    drop(b);
    assert_eq!(
        device.memory().unwrap().allocated_by_kvlab,
        before.allocated_by_kvlab
    );
    assert!(device
        .describe()
        .starts_with("CUDA emulator on CPU, 1 threads"));
}

#[test]
fn kernel_table_lists_every_selftest_kernel() {
    let names: Vec<&str> = KERNELS.iter().map(|k| k.name).collect();
    for name in [
        "selftest_reduce_rows",
        "selftest_matmul_bf16_mma",
        "planted_oob_write",
        "planted_shared_race",
    ] {
        assert!(names.contains(&name), "{name} missing from {names:?}");
    }
    let (_, matmul) = kernel_signature("selftest_matmul_bf16_mma").unwrap();
    let kinds: Vec<String> = matmul
        .params
        .iter()
        .map(|p| format!("{}:{:?}", p.name, p.kind))
        .collect();
    assert_eq!(
        kinds,
        ["a:Ptr", "b:Ptr", "c:Ptr", "m:I32", "n:I32", "k:I32"]
    );
}

#[test]
fn backend_selection() {
    assert_eq!("emu".parse::<BackendKind>().unwrap(), BackendKind::Emu);
    assert_eq!("auto".parse::<BackendKind>().unwrap(), BackendKind::Auto);
    assert!(format!("{:#}", "gpu".parse::<BackendKind>().unwrap_err())
        .contains("auto, cpu, cuda or emu"));
    let (resolved, reason) = BackendKind::Auto.resolve();
    let present = kvlab::backend::cuda::cuda_device_present();
    assert_eq!(
        resolved,
        if present {
            BackendKind::Cuda
        } else {
            BackendKind::Cpu
        },
        "{reason}"
    );
    assert_eq!(BackendKind::Emu.resolve().0, BackendKind::Emu);
    if !present {
        let error = format!("{:#}", open_device(BackendKind::Cuda).err().unwrap());
        assert_contains(&error, &["--backend cuda", "no CUDA"]);
    }
    assert!(open_device(BackendKind::Emu)
        .unwrap()
        .describe()
        .contains("CUDA emulator"));
    assert!(open_device(BackendKind::Cpu).is_err());
}
