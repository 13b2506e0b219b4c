//! AVX2 + FMA + F16C kernels (x86_64), chosen at run time by [`super::Isa::detect`]. Every
//! function here requires those three CPU features; all weight and x loads are unaligned loads.

use std::arch::x86_64::*;
use std::ops::Range;

use super::{
    for_each_tile, pack_panel_scalar, store_tile, Bf16, MatRef, PanelRow, SharedOut, Tile,
    WeightElem, F16, F32, MR, NR,
};

/// A weight format the AVX2 kernels can widen to f32, eight at a time.
pub(super) trait Avx2Elem: WeightElem {
    /// The 8 weights at `p` (any alignment; 8 * BYTES readable bytes) as f32.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C, and the 8 elements at `p` are readable.
    unsafe fn load8(p: *const u8) -> __m256;
}

impl Avx2Elem for Bf16 {
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load8(p: *const u8) -> __m256 {
        // bf16 is the upper half of an f32: widen each u16 to u32 and shift it up.
        let bits = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()));
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(bits))
    }
}

impl Avx2Elem for F16 {
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load8(p: *const u8) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
    }
}

impl Avx2Elem for F32 {
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load8(p: *const u8) -> __m256 {
        _mm256_loadu_ps(p.cast())
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn horizontal_sum(v: __m256) -> f32 {
    let quad = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
    _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps::<1>(pair, pair)))
}

/// Decode kernel: out[r] = W[row0 + r, ..] · x[cols] for every r in 0..out.len().
///
/// # Safety
/// AVX2, FMA and F16C are present; `w` is consistent, x.len() == w.cols and
/// row0 + out.len() <= w.rows.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn matvec_rows<E: Avx2Elem>(x: &[f32], w: MatRef, row0: usize, out: &mut [f32]) {
    debug_assert!(x.len() == w.cols && row0 + out.len() <= w.rows);
    // Four rows at a time: each x load feeds four rows, and 4 rows x 2 accumulators = 8
    // independent FMA chains, enough to cover the FMA latency.
    let mut blocks = out.chunks_exact_mut(4);
    let mut row = row0;
    for block in &mut blocks {
        dot_rows::<E, 4>(x, w, row, block);
        row += 4;
    }
    for o in blocks.into_remainder().chunks_mut(1) {
        dot_rows::<E, 1>(x, w, row, o);
        row += 1;
    }
}

/// out[r] = W[row0 + r, ..] · x for r in 0..R (out.len() == R).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn dot_rows<E: Avx2Elem, const R: usize>(
    x: &[f32],
    w: MatRef,
    row0: usize,
    out: &mut [f32],
) {
    let cols = w.cols;
    let row_bytes = cols * E::BYTES;
    // [R, cols] of E, row-major; in bounds because row0 + R <= w.rows (caller).
    let rows = w.data.as_ptr().add(row0 * row_bytes);
    let xp = x.as_ptr();
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    let mut c = 0;
    while c + 16 <= cols {
        let x_lo = _mm256_loadu_ps(xp.add(c));
        let x_hi = _mm256_loadu_ps(xp.add(c + 8));
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let p = rows.add(r * row_bytes + c * E::BYTES);
            acc_r[0] = _mm256_fmadd_ps(E::load8(p), x_lo, acc_r[0]);
            acc_r[1] = _mm256_fmadd_ps(E::load8(p.add(8 * E::BYTES)), x_hi, acc_r[1]);
        }
        c += 16;
    }
    if c + 8 <= cols {
        let x_lo = _mm256_loadu_ps(xp.add(c));
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let p = rows.add(r * row_bytes + c * E::BYTES);
            acc_r[0] = _mm256_fmadd_ps(E::load8(p), x_lo, acc_r[0]);
        }
        c += 8;
    }
    for (r, (acc_r, o)) in acc.iter().zip(out.iter_mut()).enumerate() {
        let mut sum = horizontal_sum(_mm256_add_ps(acc_r[0], acc_r[1]));
        let row = &w.data[(row0 + r) * row_bytes..(row0 + r + 1) * row_bytes];
        for (&xv, wb) in x[c..]
            .iter()
            .zip(row[c * E::BYTES..].chunks_exact(E::BYTES))
        {
            sum += xv * E::to_f32(wb);
        }
        *o = sum;
    }
}

/// Prefill kernel for the output columns of `panels` (see [`super::for_each_tile`]).
///
/// # Safety
/// AVX2, FMA and F16C are present; as [`super::for_each_tile`].
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn matmul_panels<E: Avx2Elem>(
    x: &[f32],
    m: usize,
    w: MatRef,
    panels: Range<usize>,
    out: SharedOut,
) {
    for_each_tile::<E>(
        x,
        m,
        w,
        panels,
        out,
        |n0, nvalid, k0, panel| pack_panel::<E>(w, n0, nvalid, k0, panel),
        |t, out_tile| match t.mr {
            6 => tile::<6>(t, out_tile, w.rows),
            5 => tile::<5>(t, out_tile, w.rows),
            4 => tile::<4>(t, out_tile, w.rows),
            3 => tile::<3>(t, out_tile, w.rows),
            2 => tile::<2>(t, out_tile, w.rows),
            _ => tile::<1>(t, out_tile, w.rows),
        },
    );
}

/// panel[k][j] = W[n0 + j, k0 + k] (see [`pack_panel_scalar`]): full panels are converted and
/// transposed eight rows by eight columns in registers; partial panels and the last kc % 8
/// columns take the scalar path.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn pack_panel<E: Avx2Elem>(
    w: MatRef,
    n0: usize,
    nvalid: usize,
    k0: usize,
    panel: &mut [PanelRow],
) {
    if nvalid < NR {
        pack_panel_scalar::<E>(w, n0, nvalid, k0, panel);
        return;
    }
    let kc = panel.len();
    let kc8 = kc / 8 * 8;
    let row_bytes = w.cols * E::BYTES;
    for group in 0..NR / 8 {
        // W[n0 + 8 * group.., k0..], [8, cols] of E; in bounds because nvalid == NR.
        let rows = w
            .data
            .as_ptr()
            .add((n0 + 8 * group) * row_bytes + k0 * E::BYTES);
        for k in (0..kc8).step_by(8) {
            let mut v = [_mm256_setzero_ps(); 8];
            for (r, vr) in v.iter_mut().enumerate() {
                *vr = E::load8(rows.add(r * row_bytes + k * E::BYTES));
            }
            let v = transpose8x8(v);
            for (t, vt) in v.into_iter().enumerate() {
                _mm256_store_ps(panel[k + t].0.as_mut_ptr().add(8 * group), vt);
            }
        }
    }
    for (k, prow) in panel.iter_mut().enumerate().skip(kc8) {
        for (j, dst) in prow.0.iter_mut().enumerate() {
            let at = ((n0 + j) * w.cols + k0 + k) * E::BYTES;
            *dst = E::to_f32(&w.data[at..at + E::BYTES]);
        }
    }
}

/// Rows of 8 in, columns of 8 out: result[c][r] = v[r][c].
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn transpose8x8(v: [__m256; 8]) -> [__m256; 8] {
    // Interleave pairs of rows: [r0c0 r1c0 r0c1 r1c1 | r0c4 r1c4 r0c5 r1c5] and so on.
    let t0 = _mm256_unpacklo_ps(v[0], v[1]);
    let t1 = _mm256_unpackhi_ps(v[0], v[1]);
    let t2 = _mm256_unpacklo_ps(v[2], v[3]);
    let t3 = _mm256_unpackhi_ps(v[2], v[3]);
    let t4 = _mm256_unpacklo_ps(v[4], v[5]);
    let t5 = _mm256_unpackhi_ps(v[4], v[5]);
    let t6 = _mm256_unpacklo_ps(v[6], v[7]);
    let t7 = _mm256_unpackhi_ps(v[6], v[7]);
    // Columns of four rows: s0 = [r0..r3 of c0 | r0..r3 of c4], s1 = c1 | c5, ...
    let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let s1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let s3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let s5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let s7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    // Join the rows 0..3 and 4..7 halves of each column.
    [
        _mm256_permute2f128_ps::<0x20>(s0, s4),
        _mm256_permute2f128_ps::<0x20>(s1, s5),
        _mm256_permute2f128_ps::<0x20>(s2, s6),
        _mm256_permute2f128_ps::<0x20>(s3, s7),
        _mm256_permute2f128_ps::<0x31>(s0, s4),
        _mm256_permute2f128_ps::<0x31>(s1, s5),
        _mm256_permute2f128_ps::<0x31>(s2, s6),
        _mm256_permute2f128_ps::<0x31>(s3, s7),
    ]
}

/// Register tile of R rows of x by NR = 16 outputs: 2R accumulators, two panel loads and R
/// broadcasts per k (R = MR = 6: 12 accumulators, 15 of the 16 ymm registers).
///
/// # Safety
/// `out` points at out[i0, n0] of an [m, ldc] output owned by this task; t.mr == R.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn tile<const R: usize>(t: &Tile, out: *mut f32, ldc: usize) {
    const { assert!(R <= MR) };
    debug_assert_eq!(t.mr, R);
    let xp = t.x.as_ptr();
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    for (k, prow) in t.panel.iter().enumerate() {
        let w_lo = _mm256_load_ps(prow.0.as_ptr());
        let w_hi = _mm256_load_ps(prow.0.as_ptr().add(8));
        for (r, acc_r) in acc.iter_mut().enumerate() {
            // x[i0 + r, k0 + k]: inside t.x because r < mr and k < kc.
            let xb = _mm256_broadcast_ss(&*xp.add(r * t.ldx + k));
            acc_r[0] = _mm256_fmadd_ps(xb, w_lo, acc_r[0]);
            acc_r[1] = _mm256_fmadd_ps(xb, w_hi, acc_r[1]);
        }
    }
    if t.nvalid == NR {
        for (r, acc_r) in acc.iter().enumerate() {
            let o = out.add(r * ldc);
            let (mut lo, mut hi) = (acc_r[0], acc_r[1]);
            if !t.first {
                lo = _mm256_add_ps(lo, _mm256_loadu_ps(o));
                hi = _mm256_add_ps(hi, _mm256_loadu_ps(o.add(8)));
            }
            _mm256_storeu_ps(o, lo);
            _mm256_storeu_ps(o.add(8), hi);
        }
    } else {
        let mut spill = [[0.0f32; NR]; R];
        for (s, acc_r) in spill.iter_mut().zip(&acc) {
            _mm256_storeu_ps(s.as_mut_ptr(), acc_r[0]);
            _mm256_storeu_ps(s.as_mut_ptr().add(8), acc_r[1]);
        }
        store_tile(&spill, out, ldc, t.nvalid, t.first);
    }
}
