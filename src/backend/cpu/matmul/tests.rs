//! Every ISA's kernels against `matmul_reference`, for every dtype, on awkward shapes and
//! unaligned weight bytes.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;

/// Relative tolerance, relative to sum_k |x[i, k] * W[n, k]| (the size of the terms, which is
/// what bounds f32 rounding in a sum; |result| alone can be tiny through cancellation).
const REL_TOL: f64 = 1e-5;

/// Decode of one row and of several (up to SMALL_M = 32: groups of 4 rows of x and a partial
/// one), tiles of every height 1..=6 (33 and up), one x block (MC = 144) and two (151: 25
/// tiles, the last one of a single row).
const M_VALUES: [usize; 9] = [1, 2, 3, 7, 16, 32, 33, 130, 151];
/// Partial panels (1, 5, 17, 777), a single full panel (16), several parallel tasks (777).
const ROW_VALUES: [usize; 5] = [1, 5, 16, 17, 777];
/// Shorter than a vector, odd, multiples of 8 and 16 but not of 64, and past KC = 256 (513 = two
/// full KC blocks and one column).
const COL_VALUES: [usize; 8] = [1, 3, 15, 96, 144, 200, 257, 513];
const DTYPES: [DType; 3] = [DType::BF16, DType::F16, DType::F32];

fn isas() -> Vec<Isa> {
    let detected = Isa::detect();
    if detected == Isa::Scalar {
        static NOTE: std::sync::Once = std::sync::Once::new();
        NOTE.call_once(|| {
            println!("note: no SIMD kernels on this CPU, testing the scalar ones only")
        });
        vec![Isa::Scalar]
    } else {
        vec![Isa::Scalar, detected]
    }
}

/// Weight bytes placed at an address that is 2 mod 4, as in an mmap'd safetensors file.
struct Weights {
    backing: Vec<u8>,
    offset: usize,
    dtype: DType,
    rows: usize,
    cols: usize,
}

impl Weights {
    /// `values`: [rows, cols] row-major, rounded to `dtype`.
    fn new(dtype: DType, rows: usize, cols: usize, values: &[f32]) -> Weights {
        let bytes: Vec<u8> = values
            .iter()
            .flat_map(|&v| match dtype {
                DType::BF16 => half::bf16::from_f32(v).to_le_bytes().to_vec(),
                DType::F16 => half::f16::from_f32(v).to_le_bytes().to_vec(),
                DType::F32 => v.to_le_bytes().to_vec(),
            })
            .collect();
        let mut backing = vec![0u8; bytes.len() + 4];
        let offset = (6 - backing.as_ptr() as usize % 4) % 4;
        backing[offset..offset + bytes.len()].copy_from_slice(&bytes);
        Weights {
            backing,
            offset,
            dtype,
            rows,
            cols,
        }
    }

    fn mat(&self) -> MatRef<'_> {
        let len = self.rows * self.cols * self.dtype.size_bytes();
        let data = &self.backing[self.offset..self.offset + len];
        assert_eq!(data.as_ptr() as usize % 4, 2);
        MatRef {
            dtype: self.dtype,
            rows: self.rows,
            cols: self.cols,
            data,
        }
    }
}

fn uniform(rng: &mut StdRng, len: usize) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// Small integers: every product and partial sum is exact in f32, so any order of summation
/// gives the reference's result bit for bit.
fn small_integers(rng: &mut StdRng, len: usize) -> Vec<f32> {
    (0..len)
        .map(|_| rng.random_range(-3i32..=3) as f32)
        .collect()
}

/// Checks `got` against the reference within REL_TOL of the size of the terms.
fn assert_close(got: &[f32], expected: &[f32], x: &[f32], m: usize, w: MatRef, what: &str) {
    let mut w_row = vec![0.0f32; w.cols];
    for n in 0..w.rows {
        row_to_f32(w, n, &mut w_row);
        for i in 0..m {
            let x_row = &x[i * w.cols..(i + 1) * w.cols];
            let terms: f64 = x_row
                .iter()
                .zip(&w_row)
                .map(|(&a, &b)| (a as f64 * b as f64).abs())
                .sum();
            let (g, e) = (got[i * w.rows + n], expected[i * w.rows + n]);
            assert!(
                ((g as f64) - (e as f64)).abs() <= REL_TOL * terms,
                "{what}: out[{i}, {n}] = {g}, reference {e} (terms sum to {terms})"
            );
        }
    }
}

#[test]
fn every_isa_matches_the_reference_on_awkward_shapes() {
    let mut rng = StdRng::seed_from_u64(7);
    for dtype in DTYPES {
        for rows in ROW_VALUES {
            for cols in COL_VALUES {
                let w = Weights::new(dtype, rows, cols, &uniform(&mut rng, rows * cols));
                for m in M_VALUES {
                    let x = uniform(&mut rng, m * cols);
                    let mut expected = vec![0.0; m * rows];
                    matmul_reference(&x, m, w.mat(), &mut expected);
                    for isa in isas() {
                        let mut got = vec![f32::NAN; m * rows];
                        matmul_with(isa, &x, m, w.mat(), &mut got);
                        let what = format!("{isa:?} {dtype:?} m {m} rows {rows} cols {cols}");
                        assert_close(&got, &expected, &x, m, w.mat(), &what);
                    }
                }
            }
        }
    }
}

#[test]
fn every_isa_is_exact_on_small_integers() {
    let mut rng = StdRng::seed_from_u64(11);
    for dtype in DTYPES {
        for (rows, cols) in [(5, 3), (17, 200), (40, 513), (777, 144)] {
            let w = Weights::new(dtype, rows, cols, &small_integers(&mut rng, rows * cols));
            for m in M_VALUES {
                let x = small_integers(&mut rng, m * cols);
                let mut expected = vec![0.0; m * rows];
                matmul_reference(&x, m, w.mat(), &mut expected);
                for isa in isas() {
                    let mut got = vec![f32::NAN; m * rows];
                    matmul_with(isa, &x, m, w.mat(), &mut got);
                    assert_eq!(
                        got, expected,
                        "{isa:?} {dtype:?} m {m} rows {rows} cols {cols}"
                    );
                }
            }
        }
    }
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    let mut rng = StdRng::seed_from_u64(13);
    // 600 KiB of bf16 weights: parallel in both pools.
    let (rows, cols) = (1003, 300);
    let w = Weights::new(DType::BF16, rows, cols, &uniform(&mut rng, rows * cols));
    for m in [1, 9, 151] {
        let x = uniform(&mut rng, m * cols);
        for isa in isas() {
            let run_with_threads = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let mut out = vec![f32::NAN; m * rows];
                pool.install(|| matmul_with(isa, &x, m, w.mat(), &mut out));
                out
            };
            assert_eq!(run_with_threads(1), run_with_threads(3), "{isa:?} m {m}");
        }
    }
}

#[test]
fn concurrent_calls_from_pool_threads_agree() {
    // Calls nested in rayon jobs share the pool, and a thread waiting in one call may run
    // another: each call must still get its own x buffer.
    let mut rng = StdRng::seed_from_u64(19);
    let (rows, cols) = (700, 200);
    let w = Weights::new(DType::BF16, rows, cols, &uniform(&mut rng, rows * cols));
    for m in [1, 20] {
        let xs: Vec<Vec<f32>> = (0..6).map(|_| uniform(&mut rng, m * cols)).collect();
        let serial: Vec<Vec<f32>> = xs
            .iter()
            .map(|x| {
                let mut out = vec![0.0; m * rows];
                matmul(x, m, w.mat(), &mut out);
                out
            })
            .collect();
        let concurrent: Vec<Vec<f32>> = xs
            .par_iter()
            .map(|x| {
                let mut out = vec![0.0; m * rows];
                matmul(x, m, w.mat(), &mut out);
                out
            })
            .collect();
        assert_eq!(serial, concurrent, "m {m}");
    }
}

/// Projections of one input in one call (q, k, v; gate, up) give each product's own result:
/// decode's single pass over the rows of all of them (several tasks per matrix, a matrix smaller
/// than a task), weights of mixed dtypes (one pass per weight), and prefill rows.
#[test]
fn matmul_many_equals_one_matmul_per_weight() {
    let mut rng = StdRng::seed_from_u64(23);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(3)
        .build()
        .unwrap();
    let cols = 200;
    for dtype in DTYPES {
        // 1143 rows of 200: 457 KiB of bf16, split into several tasks.
        let same: Vec<Weights> = [777, 5, 361]
            .into_iter()
            .map(|rows| Weights::new(dtype, rows, cols, &uniform(&mut rng, rows * cols)))
            .collect();
        let other_dtype = if dtype == DType::F32 {
            DType::BF16
        } else {
            DType::F32
        };
        let mixed = vec![
            Weights::new(dtype, 33, cols, &uniform(&mut rng, 33 * cols)),
            Weights::new(other_dtype, 17, cols, &uniform(&mut rng, 17 * cols)),
        ];
        for (weights, what) in [(&same, "one dtype"), (&mixed, "mixed dtypes")] {
            for m in [1, 7] {
                let x = uniform(&mut rng, m * cols);
                for isa in isas() {
                    let separate: Vec<Vec<f32>> = weights
                        .iter()
                        .map(|w| {
                            let mut out = vec![f32::NAN; m * w.rows];
                            pool.install(|| matmul_with(isa, &x, m, w.mat(), &mut out));
                            out
                        })
                        .collect();
                    let mut together: Vec<Vec<f32>> =
                        weights.iter().map(|w| vec![f32::NAN; m * w.rows]).collect();
                    let mut products: Vec<(MatRef, &mut [f32])> = weights
                        .iter()
                        .zip(together.iter_mut())
                        .map(|(w, out)| (w.mat(), out.as_mut_slice()))
                        .collect();
                    pool.install(|| matmul_many_with(isa, &x, m, &mut products));
                    assert_eq!(separate, together, "{isa:?} {dtype:?} {what} m {m}");
                    for (w, got) in weights.iter().zip(&together) {
                        let mut expected = vec![0.0; m * w.rows];
                        matmul_reference(&x, m, w.mat(), &mut expected);
                        let what = format!("{isa:?} {what} m {m} rows {}", w.rows);
                        assert_close(got, &expected, &x, m, w.mat(), &what);
                    }
                }
            }
        }
    }
}

#[test]
#[should_panic(expected = "x has 300 floats, expected m 1 x cols 200")]
fn matmul_many_checks_every_product() {
    let a = Weights::new(DType::F32, 4, 300, &[0.0; 1200]);
    let b = Weights::new(DType::F32, 4, 200, &[0.0; 800]);
    let (mut out_a, mut out_b) = (vec![0.0; 4], vec![0.0; 4]);
    matmul_many(
        &[0.0; 300],
        1,
        &mut [(a.mat(), &mut out_a), (b.mat(), &mut out_b)],
    );
}

#[test]
fn matmul_uses_the_detected_isa() {
    let mut rng = StdRng::seed_from_u64(17);
    let (m, rows, cols) = (3, 33, 70);
    let w = Weights::new(DType::F16, rows, cols, &uniform(&mut rng, rows * cols));
    let x = uniform(&mut rng, m * cols);
    let (mut public, mut detected) = (vec![0.0; m * rows], vec![0.0; m * rows]);
    matmul(&x, m, w.mat(), &mut public);
    matmul_with(Isa::detect(), &x, m, w.mat(), &mut detected);
    assert_eq!(public, detected);
}

#[test]
fn empty_reductions_give_zeros() {
    let w = Weights::new(DType::BF16, 5, 0, &[]);
    for m in [1, 4] {
        for isa in isas() {
            let mut out = vec![f32::NAN; m * 5];
            matmul_with(isa, &[], m, w.mat(), &mut out);
            assert!(out.iter().all(|&v| v == 0.0), "{isa:?} m {m}: {out:?}");
        }
    }
}

#[test]
#[should_panic(expected = "x has 5 floats, expected m 2 x cols 3")]
fn mismatched_shapes_are_reported() {
    let w = Weights::new(DType::F32, 4, 3, &[0.0; 12]);
    matmul(&[0.0; 5], 2, w.mat(), &mut [0.0; 8]);
}

#[test]
fn row_to_f32_decodes_every_dtype_exactly() {
    let values: Vec<f32> = [0.0, -0.0, 1.0, -2.5, 65504.0, 6.1e-5, 3.0e-7, f32::INFINITY]
        .into_iter()
        .cycle()
        .take(3 * 13)
        .collect();
    for dtype in DTYPES {
        let w = Weights::new(dtype, 3, 13, &values);
        for row in 0..3 {
            let mut out = vec![f32::NAN; 15];
            row_to_f32(w.mat(), row, &mut out);
            for (k, &v) in out[..13].iter().enumerate() {
                let expected = match dtype {
                    DType::BF16 => half::bf16::from_f32(values[row * 13 + k]).to_f32(),
                    DType::F16 => half::f16::from_f32(values[row * 13 + k]).to_f32(),
                    DType::F32 => values[row * 13 + k],
                };
                assert_eq!(
                    v.to_bits(),
                    expected.to_bits(),
                    "{dtype:?} row {row} col {k}"
                );
            }
            assert!(out[13..].iter().all(|v| v.is_nan()), "wrote past cols");
        }
    }
}

/// The SIMD widenings (load8, and load16 in its element order) of every 16-bit pattern
/// (subnormals, infinities, NaNs included) agree with the scalar decoding.
#[cfg(target_arch = "x86_64")]
#[test]
fn avx2_widening_matches_scalar_for_every_16_bit_pattern() {
    use avx2::Avx2Elem;
    use std::arch::x86_64::_mm256_storeu_ps;
    if Isa::detect() != Isa::Avx2Fma {
        println!("skipped: this CPU lacks AVX2/FMA/F16C");
        return;
    }
    fn check<E: Avx2Elem>(name: &str) {
        // Offset by one byte so every load is unaligned.
        let bytes: Vec<u8> = std::iter::once(0)
            .chain((0..=u16::MAX).flat_map(u16::to_le_bytes))
            .collect();
        for block in 0..(1 << 16) / 16 {
            let p = &bytes[1 + block * 32..1 + block * 32 + 32];
            // [16] f32: load8 of both halves, then load16's pair.
            let (mut by_load8, mut by_load16) = ([0.0f32; 16], [0.0f32; 16]);
            // SAFETY: the CPU has the features (checked above); p holds 16 elements.
            unsafe {
                _mm256_storeu_ps(by_load8.as_mut_ptr(), E::load8(p.as_ptr()));
                _mm256_storeu_ps(by_load8.as_mut_ptr().add(8), E::load8(p.as_ptr().add(16)));
                let (a, b) = E::load16(p.as_ptr());
                _mm256_storeu_ps(by_load16.as_mut_ptr(), a);
                _mm256_storeu_ps(by_load16.as_mut_ptr().add(8), b);
            }
            for l in 0..16 {
                let element_of_load16 = match (E::LOAD16_EVEN_ODD, l < 8) {
                    (false, _) => l,
                    (true, true) => 2 * l,
                    (true, false) => 2 * (l - 8) + 1,
                };
                for (v, element, how) in [
                    (by_load8[l], l, "load8"),
                    (by_load16[l], element_of_load16, "load16"),
                ] {
                    let expected = E::to_f32(&p[2 * element..2 * element + 2]);
                    assert!(
                        v.to_bits() == expected.to_bits() || (v.is_nan() && expected.is_nan()),
                        "{name} {how} pattern {:#06x}: {v} vs {expected}",
                        block * 16 + element
                    );
                }
            }
        }
    }
    check::<Bf16>("bf16");
    check::<F16>("f16");
}
