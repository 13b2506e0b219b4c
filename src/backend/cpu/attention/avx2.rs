//! AVX2 + FMA run kernels for head_dim = 8 · D8 (D8 in 2, 4, 8, 16: head_dim 16 .. 128), picked
//! by [`super::attend_item_avx2`]: the whole head row lives in D8 registers. K and V entries are
//! widened to f32 as they are loaded ([`KvElement::widen8`]), so every element type shares them;
//! a quantized row's scale multiplies its score (keys) or its weight (values), once per row.
//!
//! - scores: eight keys at a time, one accumulator per key (eight independent FMA chains), then
//!   one transposing horizontal sum gives the eight scores in one vector.
//! - weighted sum: the output row stays in registers across the run, one broadcast weight and D8
//!   FMAs per value row, written back once per run.

use super::{KvElement, RunKernels};
use crate::backend::cpu::simd::horizontal_sum;
use std::arch::x86_64::*;

/// The run kernels for head_dim = 8 · D8. Only instantiated inside the `avx2,fma` target-feature
/// function `attend_item_avx2`, which runs only where the CPU has both.
pub(super) struct Avx2Runs<const D8: usize>;

impl<E: KvElement, const D8: usize> RunKernels<E> for Avx2Runs<D8> {
    #[inline(always)]
    fn scores(q: &[f32], keys: &[E], scales: &[f32], scale: f32, out: &mut [f32]) {
        assert!(q.len() == 8 * D8 && keys.len() == out.len() * q.len());
        // SAFETY (both): see the type's comment for the CPU features; the lengths are checked
        // here, a group spans whole vectors of 8.
        match scales.len() / out.len().max(1) {
            0 | 1 => {
                assert!(scales.is_empty() || scales.len() == out.len());
                unsafe { scores::<E, D8, false>(q, keys, scales, scale, out) }
            }
            groups => {
                assert!(scales.len() == groups * out.len() && D8.is_multiple_of(groups));
                unsafe { scores::<E, D8, true>(q, keys, scales, scale, out) }
            }
        }
    }

    #[inline(always)]
    fn weighted_sum(weights: &[f32], values: &[E], scales: &[f32], acc: &mut [f32]) {
        assert!(acc.len() == 8 * D8 && values.len() == weights.len() * acc.len());
        assert!(scales.is_empty() || scales.len() == weights.len());
        // SAFETY: as above.
        unsafe { weighted_sum::<E, D8>(weights, values, scales, acc) }
    }
}

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

/// out[i] = scale · q · keys[i] with each key's scales applied; q: [8 · D8], keys:
/// [out.len(), 8 · D8]. Without GROUPED, scales is empty or one per key, multiplied into its
/// score; with it, `groups` per key, each multiplied into the key's widened vectors of its group
/// (`D8 / groups` vectors of 8 channels).
///
/// # Safety
/// AVX2 and FMA are present; the lengths are as stated.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn scores<E: KvElement, const D8: usize, const GROUPED: bool>(
    q: &[f32],
    keys: &[E],
    scales: &[f32],
    scale: f32,
    out: &mut [f32],
) {
    let head_dim = 8 * D8;
    let n = out.len();
    let groups = if GROUPED { scales.len() / n } else { 1 };
    let vectors_per_group = D8 / groups;
    let mut qv = [_mm256_setzero_ps(); D8];
    for (j, v) in qv.iter_mut().enumerate() {
        *v = _mm256_loadu_ps(q.as_ptr().add(8 * j));
    }
    let k = keys.as_ptr();
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
    let row_scales = !GROUPED && !scales.is_empty();
    let mut i = 0;
    while i + 8 <= n {
        let mut acc = [_mm256_setzero_ps(); 8];
        for (j, &qj) in qv.iter().enumerate() {
            for (key, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(qj, load(i + key, j), *a);
            }
        }
        let mut s = _mm256_mul_ps(hsum8(acc), _mm256_set1_ps(scale));
        if row_scales {
            s = _mm256_mul_ps(s, _mm256_loadu_ps(scales.as_ptr().add(i)));
        }
        _mm256_storeu_ps(out.as_mut_ptr().add(i), s);
        i += 8;
    }
    for (key, o) in out.iter_mut().enumerate().skip(i) {
        let mut acc = _mm256_setzero_ps();
        for (j, &qj) in qv.iter().enumerate() {
            acc = _mm256_fmadd_ps(qj, load(key, j), acc);
        }
        let row_scale = if row_scales { scales[key] } else { 1.0 };
        *o = horizontal_sum(acc) * (scale * row_scale);
    }
}

/// acc += Σ_i weights[i] · row_scale[i] · values[i]; values: [weights.len(), 8 · D8],
/// scales: [weights.len()] for the quantized types, acc: [8 · D8].
///
/// # Safety
/// AVX2 and FMA are present; the lengths are as stated.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn weighted_sum<E: KvElement, const D8: usize>(
    weights: &[f32],
    values: &[E],
    scales: &[f32],
    acc: &mut [f32],
) {
    let head_dim = 8 * D8;
    let v = values.as_ptr();
    let mut sum = [_mm256_setzero_ps(); D8];
    for (i, &w) in weights.iter().enumerate() {
        let w = if scales.is_empty() { w } else { w * scales[i] };
        let wv = _mm256_set1_ps(w);
        for (j, s) in sum.iter_mut().enumerate() {
            *s = _mm256_fmadd_ps(wv, E::widen8(v.add(i * head_dim + 8 * j)), *s);
        }
    }
    for (j, s) in sum.iter().enumerate() {
        let a = acc.as_mut_ptr().add(8 * j);
        _mm256_storeu_ps(a, _mm256_add_ps(_mm256_loadu_ps(a), *s));
    }
}
