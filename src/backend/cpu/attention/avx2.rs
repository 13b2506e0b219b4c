//! AVX2 + FMA run kernels for head_dim = 8 · D8 (D8 in 2, 4, 8, 16: head_dim 16 .. 128), picked
//! by [`super::attend_item_avx2`], for Q (1 to 4) query heads of one KV head at once. K and V
//! entries are widened to f32 as they are loaded ([`KvElement::widen8`]), once for all Q queries,
//! so every element type shares the kernels; a quantized row's scale multiplies its score (keys)
//! or its weight (values) once per row, a key group's scale multiplies its widened vectors.
//!
//! - scores: KB = 8 / Q keys at a time, one accumulator per (key, query) (up to eight
//!   independent FMA chains), the queries read from L1; one transposing horizontal sum gives
//!   the block's scores in one vector.
//! - weighted sum: 16 or 32 channels at a time, the Q outputs of those channels in registers
//!   across the run (8 or more independent FMA chains), each value vector widened once and
//!   added to all Q with their weights.

use super::{KvElement, RunKernels, WeightedSumShape, MAX_QUERIES};
use crate::backend::cpu::simd::horizontal_sum;
use std::arch::x86_64::*;

/// The run kernels for head_dim = 8 · D8. Only instantiated inside the `avx2,fma` target-feature
/// function `attend_item_avx2`, which runs only where the CPU has both.
pub(super) struct Avx2Runs<const D8: usize>;

impl<E: KvElement, const D8: usize> RunKernels<E> for Avx2Runs<D8> {
    #[inline(always)]
    fn scores(
        qs: &[f32],
        count: usize,
        keys: &[E],
        scales: &[f32],
        scale: f32,
        out: &mut [f32],
        out_stride: usize,
    ) {
        let n = keys.len() / (8 * D8);
        assert!(qs.len() == count * 8 * D8 && keys.len() == n * 8 * D8);
        assert!((1..=MAX_QUERIES).contains(&count));
        assert!(out.len() >= (count - 1) * out_stride + n);
        let groups = scales.len() / n.max(1);
        assert!(scales.len() == groups * n && (groups <= 1 || D8.is_multiple_of(groups)));
        // SAFETY: see the type's comment for the CPU features; the lengths are checked above,
        // a key group spans whole vectors of 8.
        unsafe {
            match (count, groups > 1) {
                (1, false) => scores::<E, D8, 1, false>(qs, keys, scales, scale, out, out_stride),
                (2, false) => scores::<E, D8, 2, false>(qs, keys, scales, scale, out, out_stride),
                (3, false) => scores::<E, D8, 3, false>(qs, keys, scales, scale, out, out_stride),
                (_, false) => scores::<E, D8, 4, false>(qs, keys, scales, scale, out, out_stride),
                (1, true) => scores::<E, D8, 1, true>(qs, keys, scales, scale, out, out_stride),
                (2, true) => scores::<E, D8, 2, true>(qs, keys, scales, scale, out, out_stride),
                (3, true) => scores::<E, D8, 3, true>(qs, keys, scales, scale, out, out_stride),
                (_, true) => scores::<E, D8, 4, true>(qs, keys, scales, scale, out, out_stride),
            }
        }
    }

    #[inline(always)]
    fn weighted_sum(
        weights: &[f32],
        values: &[E],
        scales: &[f32],
        accs: &mut [f32],
        shape: WeightedSumShape,
    ) {
        let n = values.len() / (8 * D8);
        let WeightedSumShape {
            count,
            head_dim,
            weight_stride,
            acc_stride,
        } = shape;
        assert!(head_dim == 8 * D8 && values.len() == n * head_dim);
        assert!((1..=MAX_QUERIES).contains(&count) && n <= RUN_ROWS);
        assert!(weights.len() >= (count - 1) * weight_stride + n);
        assert!(accs.len() >= (count - 1) * acc_stride + head_dim);
        assert!(scales.is_empty() || scales.len() == n);
        // SAFETY: as above.
        unsafe {
            match count {
                1 => weighted_sum::<E, D8, 1>(weights, values, scales, accs, shape),
                2 => weighted_sum::<E, D8, 2>(weights, values, scales, accs, shape),
                3 => weighted_sum::<E, D8, 3>(weights, values, scales, accs, shape),
                _ => weighted_sum::<E, D8, 4>(weights, values, scales, accs, shape),
            }
        }
    }
}

/// Rows of a value run the weighted sum takes at once: a run lies in one tile.
const RUN_ROWS: usize = super::TILE;

/// [Σ a0, Σ a1, .., Σ a7]: the horizontal sums of eight vectors, in one vector.
#[target_feature(enable = "avx2,fma")]
#[inline]
fn hsum8(a: [__m256; 8]) -> __m256 {
    // Pairwise adds within 128-bit lanes: [a0 01, a0 23, a1 01, a1 23 | a0 45, a0 67, ..].
    let t0 = _mm256_hadd_ps(a[0], a[1]);
    let t1 = _mm256_hadd_ps(a[2], a[3]);
    let t2 = _mm256_hadd_ps(a[4], a[5]);
    let t3 = _mm256_hadd_ps(a[6], a[7]);
    // [a0 0..3, a1 0..3, a2 0..3, a3 0..3 | a0 4..7, a1 4..7, a2 4..7, a3 4..7], same for a4..a7.
    let u0 = _mm256_hadd_ps(t0, t1);
    let u1 = _mm256_hadd_ps(t2, t3);
    _mm256_add_ps(
        _mm256_permute2f128_ps::<0x20>(u0, u1),
        _mm256_permute2f128_ps::<0x31>(u0, u1),
    )
}

/// out[h · out_stride + i] = scale · q_h · keys[i] with each key's scales applied, for the Q
/// queries q_h = qs[h · 8 · D8..]; keys: [n, 8 · D8]. Without GROUPED, scales is empty or one
/// per key, multiplied into its scores; with it, `groups` per key, each multiplied into the
/// key's widened vectors of its group (`D8 / groups` vectors of 8 channels).
///
/// # Safety
/// AVX2 and FMA are present; the lengths are as [`Avx2Runs::scores`] checks them.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn scores<E: KvElement, const D8: usize, const Q: usize, const GROUPED: bool>(
    qs: &[f32],
    keys: &[E],
    scales: &[f32],
    scale: f32,
    out: &mut [f32],
    out_stride: usize,
) {
    let head_dim = 8 * D8;
    let n = keys.len() / head_dim;
    let groups = if GROUPED { scales.len() / n } else { 1 };
    let vectors_per_group = D8 / groups;
    let (k, q) = (keys.as_ptr(), qs.as_ptr());
    // Key `key`'s vector j of 8 channels, widened (and, GROUPED, scaled).
    let load = |key: usize, j: usize| {
        let kv = E::widen8(k.add(key * head_dim + 8 * j));
        if GROUPED {
            let s = *scales.get_unchecked(key * groups + j / vectors_per_group);
            _mm256_mul_ps(kv, _mm256_set1_ps(s))
        } else {
            kv
        }
    };
    let query = |h: usize, j: usize| _mm256_loadu_ps(q.add(h * head_dim + 8 * j));
    let row_scales = !GROUPED && !scales.is_empty();
    let finish = |score: f32, key: usize| {
        let row_scale = if row_scales { scales[key] } else { 1.0 };
        score * (scale * row_scale)
    };
    // Keys per block: one accumulator per (key, query), lane `kb * Q + h` of the sums.
    let kb = 8 / Q;
    let mut i = 0;
    while i + kb <= n {
        let mut acc = [_mm256_setzero_ps(); 8];
        for j in 0..D8 {
            for key in 0..kb {
                let kv = load(i + key, j);
                for h in 0..Q {
                    acc[key * Q + h] = _mm256_fmadd_ps(query(h, j), kv, acc[key * Q + h]);
                }
            }
        }
        let mut sums = [0.0f32; 8];
        _mm256_storeu_ps(sums.as_mut_ptr(), hsum8(acc));
        for key in 0..kb {
            for h in 0..Q {
                *out.get_unchecked_mut(h * out_stride + i + key) =
                    finish(sums[key * Q + h], i + key);
            }
        }
        i += kb;
    }
    for key in i..n {
        let mut acc = [_mm256_setzero_ps(); Q];
        for j in 0..D8 {
            let kv = load(key, j);
            for (h, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(query(h, j), kv, *a);
            }
        }
        for (h, a) in acc.iter().enumerate() {
            *out.get_unchecked_mut(h * out_stride + key) = finish(horizontal_sum(*a), key);
        }
    }
}

/// acc_h += Σ_i weights[h · weight_stride + i] · row_scale[i] · values[i] for the Q queries;
/// values: [n, 8 · D8], n ≤ [`RUN_ROWS`], scales: [n] for the quantized types.
///
/// # Safety
/// AVX2 and FMA are present; the lengths are as [`Avx2Runs::weighted_sum`] checks them.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn weighted_sum<E: KvElement, const D8: usize, const Q: usize>(
    weights: &[f32],
    values: &[E],
    scales: &[f32],
    accs: &mut [f32],
    shape: WeightedSumShape,
) {
    let head_dim = 8 * D8;
    let n = values.len() / head_dim;
    // Per value row, each query's weight with the row's scale folded in, once for all channels.
    let mut scaled = [[0.0f32; Q]; RUN_ROWS];
    for (i, row) in scaled[..n].iter_mut().enumerate() {
        for (h, s) in row.iter_mut().enumerate() {
            let w = weights[h * shape.weight_stride + i];
            *s = if scales.is_empty() { w } else { w * scales[i] };
        }
    }
    let v = values.as_ptr();
    // Vectors of 8 channels per pass over the run: `vectors` · Q independent accumulator chains
    // (an FMA waits 4 cycles for the previous one of its chain; one vector a pass left Q chains,
    // and decode attention of f32 and bf16 at 2k-8k 8-10 % slower), at most 16 of them with the
    // widened values in registers. `vectors` divides D8 (2 to 16).
    let vectors = if Q <= 2 { 4.min(D8) } else { 2 };
    let mut j = 0;
    while j < D8 {
        let mut sum = [[_mm256_setzero_ps(); Q]; 4];
        for (i, row) in scaled[..n].iter().enumerate() {
            let p = v.add(i * head_dim + 8 * j);
            for (jj, sum_j) in sum[..vectors].iter_mut().enumerate() {
                let vv = E::widen8(p.add(8 * jj));
                for (s, &w) in sum_j.iter_mut().zip(row) {
                    *s = _mm256_fmadd_ps(_mm256_set1_ps(w), vv, *s);
                }
            }
        }
        for (jj, sum_j) in sum[..vectors].iter().enumerate() {
            for (h, s) in sum_j.iter().enumerate() {
                let a = accs.as_mut_ptr().add(h * shape.acc_stride + 8 * (j + jj));
                _mm256_storeu_ps(a, _mm256_add_ps(_mm256_loadu_ps(a), *s));
            }
        }
        j += vectors;
    }
}
