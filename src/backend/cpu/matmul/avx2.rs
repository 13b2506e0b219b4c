//! AVX2 + FMA + F16C kernels (x86_64), chosen at run time by [`super::Isa::detect`]. Every
//! function here requires those three CPU features; all weight and x loads are unaligned loads.

use std::arch::x86_64::*;
use std::ops::Range;

use crate::backend::cpu::simd::horizontal_sum;

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

    /// Whether [`Self::load16`] splits its weights into even and odd elements, so that x must be
    /// arranged by [`arrange_x_for_load16`].
    const LOAD16_EVEN_ODD: bool = false;

    /// The 16 weights at `p` as f32: (w[0..8], w[8..16]), or (w[0, 2, .., 14], w[1, 3, .., 15])
    /// when LOAD16_EVEN_ODD.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C, and the 16 elements at `p` are readable.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load16(p: *const u8) -> (__m256, __m256) {
        (Self::load8(p), Self::load8(p.add(8 * Self::BYTES)))
    }
}

impl Avx2Elem for Bf16 {
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load8(p: *const u8) -> __m256 {
        // bf16 is the upper half of an f32: widen each u16 to u32 and shift it up.
        let bits = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()));
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(bits))
    }

    // Each 32-bit lane of a 32-byte load holds two bf16: element 2i in its low half, which a shift
    // makes an f32, and element 2i + 1 in its high half, already an f32 once the low half is
    // cleared. Two cheap integer ops per 16 weights instead of two widenings and two shifts.
    const LOAD16_EVEN_ODD: bool = true;

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load16(p: *const u8) -> (__m256, __m256) {
        let pairs = _mm256_loadu_si256(p.cast());
        let even = _mm256_slli_epi32::<16>(pairs);
        let odd = _mm256_and_si256(pairs, _mm256_set1_epi32(0xFFFF_0000u32 as i32));
        (_mm256_castsi256_ps(even), _mm256_castsi256_ps(odd))
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

/// x as [`Avx2Elem::load16`] pairs it with weights: each full block of 16 becomes
/// [x0, x2, .., x14, x1, x3, .., x15]; the last cols % 16 stay in order.
pub(super) fn arrange_x_for_load16(x: &[f32], arranged: &mut [f32]) {
    let mut blocks = x.chunks_exact(16);
    let mut arranged_blocks = arranged.chunks_exact_mut(16);
    for (block, dst) in (&mut blocks).zip(&mut arranged_blocks) {
        for i in 0..8 {
            dst[i] = block[2 * i];
            dst[8 + i] = block[2 * i + 1];
        }
    }
    arranged_blocks
        .into_remainder()
        .copy_from_slice(blocks.remainder());
}

/// Decode kernel: out[r] = W[row0 + r, ..] · x[cols] for every r in 0..out.len(), with x
/// arranged by [`arrange_x_for_load16`] when E::LOAD16_EVEN_ODD.
///
/// # Safety
/// AVX2, FMA and F16C are present; `w` is consistent, x.len() == w.cols and
/// row0 + out.len() <= w.rows.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn matvec_rows<E: Avx2Elem>(x: &[f32], w: MatRef, row0: usize, out: &mut [f32]) {
    debug_assert!(x.len() == w.cols && row0 + out.len() <= w.rows);
    // Four rows at a time: each x load feeds four rows, and 4 rows x 2 accumulators = 8
    // independent FMA chains, enough to cover the FMA latency. The four rows come from the four
    // quarters of the range, so the weights stream from four places far apart in memory: on a
    // Zen 3 VM that read 25-35 % faster than four adjacent rows (measured with and without a
    // software prefetch of the next rows, which then only slowed it down).
    let quarter = out.len() / 4;
    for i in 0..quarter {
        let rows = [0, 1, 2, 3].map(|q| q * quarter + i);
        let sums = dot_rows::<E, 4>(x, w, rows.map(|r| row0 + r));
        for (r, sum) in rows.into_iter().zip(sums) {
            out[r] = sum;
        }
    }
    for (r, o) in out.iter_mut().enumerate().skip(4 * quarter) {
        *o = dot_rows::<E, 1>(x, w, [row0 + r])[0];
    }
}

/// W[rows[i], ..] · x for each of the R rows.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn dot_rows<E: Avx2Elem, const R: usize>(
    x: &[f32],
    w: MatRef,
    rows: [usize; R],
) -> [f32; R] {
    let cols = w.cols;
    let row_bytes = cols * E::BYTES;
    // Each row is [cols] of E; in bounds because every row < w.rows (caller).
    let starts = rows.map(|r| w.data.as_ptr().add(r * row_bytes));
    let xp = x.as_ptr();
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    let mut c = 0;
    while c + 16 <= cols {
        // The two halves of x's block of 16, in the order load16 gives the weights.
        let x_a = _mm256_loadu_ps(xp.add(c));
        let x_b = _mm256_loadu_ps(xp.add(c + 8));
        for (start, acc_r) in starts.iter().zip(acc.iter_mut()) {
            let (w_a, w_b) = E::load16(start.add(c * E::BYTES));
            acc_r[0] = _mm256_fmadd_ps(w_a, x_a, acc_r[0]);
            acc_r[1] = _mm256_fmadd_ps(w_b, x_b, acc_r[1]);
        }
        c += 16;
    }
    if c + 8 <= cols {
        let x_lo = _mm256_loadu_ps(xp.add(c));
        for (start, acc_r) in starts.iter().zip(acc.iter_mut()) {
            acc_r[0] = _mm256_fmadd_ps(E::load8(start.add(c * E::BYTES)), x_lo, acc_r[0]);
        }
        c += 8;
    }
    let mut sums = [0.0; R];
    for ((sum, acc_r), &row) in sums.iter_mut().zip(&acc).zip(&rows) {
        *sum = horizontal_sum(_mm256_add_ps(acc_r[0], acc_r[1]));
        for (&xv, wb) in x[c..]
            .iter()
            .zip(w.row(row)[c * E::BYTES..].chunks_exact(E::BYTES))
        {
            *sum += xv * E::to_f32(wb);
        }
    }
    sums
}

/// Decode kernel for several rows of x (one step of several sequences): out[i, r] =
/// W[r, ..] · x[i, ..] for every r in `rows` and i < m, x in its natural order. Each weight row
/// is read from memory once for all rows of x: three weight rows at a time (from the three
/// thirds of the range, far apart in memory as in [`matvec_rows`]) against groups of up to
/// four rows of x, the weight rows staying in L1 from one group to the next.
///
/// # Safety
/// AVX2, FMA and F16C are present; `w` is consistent, x.len() == m * w.cols, `rows` lies
/// inside w's rows, `out` is [m, w.rows] and no other thread writes the columns `rows`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn matvec_rows_multi<E: Avx2Elem>(
    x: &[f32],
    m: usize,
    w: MatRef,
    rows: Range<usize>,
    out: SharedOut,
) {
    debug_assert!(x.len() == m * w.cols && rows.end <= w.rows);
    let third = rows.len() / 3;
    for i in 0..third {
        let triple = [0, 1, 2].map(|t| rows.start + t * third + i);
        for_x_groups::<E, 3>(x, m, w, triple, out);
    }
    for row in rows.start + 3 * third..rows.end {
        for_x_groups::<E, 1>(x, m, w, [row], out);
    }
}

/// out[i, rows[j]] = W[rows[j], ..] · x[i, ..] for every i < m, in groups of up to four rows of x.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn for_x_groups<E: Avx2Elem, const R: usize>(
    x: &[f32],
    m: usize,
    w: MatRef,
    rows: [usize; R],
    out: SharedOut,
) {
    let store = |first: usize, sums: &[[f32; R]]| {
        for (i, row_sums) in sums.iter().enumerate() {
            for (&row, &sum) in rows.iter().zip(row_sums) {
                *out.ptr.add((first + i) * w.rows + row) = sum;
            }
        }
    };
    let cols = w.cols;
    for first in (0..m).step_by(4) {
        let group = &x[first * cols..];
        match m - first {
            1 => store(first, &dot_rows_multi::<E, R, 1>(group, w, rows)),
            2 => store(first, &dot_rows_multi::<E, R, 2>(group, w, rows)),
            3 => store(first, &dot_rows_multi::<E, R, 3>(group, w, rows)),
            _ => store(first, &dot_rows_multi::<E, R, 4>(group, w, rows)),
        }
    }
}

/// W[rows[j], ..] · x[i, ..] for each of the R weight rows and the first M rows of `x` (rows of
/// w.cols), eight columns at a time: R x M independent accumulators (12 at R = 3, M = 4: with
/// the 3 weight vectors and one x vector, the 16 ymm registers), one FMA each per step.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn dot_rows_multi<E: Avx2Elem, const R: usize, const M: usize>(
    x: &[f32],
    w: MatRef,
    rows: [usize; R],
) -> [[f32; R]; M] {
    let cols = w.cols;
    let row_bytes = cols * E::BYTES;
    // Each row is [cols] of E; in bounds because every row < w.rows (caller).
    let starts = rows.map(|r| w.data.as_ptr().add(r * row_bytes));
    // x holds at least M rows of cols (caller).
    let x_rows: [*const f32; M] = std::array::from_fn(|i| x.as_ptr().add(i * cols));
    let mut acc = [[_mm256_setzero_ps(); R]; M];
    let mut c = 0;
    while c + 8 <= cols {
        let ws = starts.map(|start| E::load8(start.add(c * E::BYTES)));
        for (x_row, acc_i) in x_rows.iter().zip(acc.iter_mut()) {
            let xv = _mm256_loadu_ps(x_row.add(c));
            for (wv, acc_ir) in ws.iter().zip(acc_i.iter_mut()) {
                *acc_ir = _mm256_fmadd_ps(*wv, xv, *acc_ir);
            }
        }
        c += 8;
    }
    let mut sums = [[0.0; R]; M];
    for (i, sums_i) in sums.iter_mut().enumerate() {
        let x_tail = &x[i * cols + c..(i + 1) * cols];
        for ((sum, acc_ir), &row) in sums_i.iter_mut().zip(&acc[i]).zip(&rows) {
            *sum = horizontal_sum(*acc_ir);
            for (&xv, wb) in x_tail
                .iter()
                .zip(w.row(row)[c * E::BYTES..].chunks_exact(E::BYTES))
            {
                *sum += xv * E::to_f32(wb);
            }
        }
    }
    sums
}

/// Prefill kernel for the output columns of `panels` (see [`super::for_each_tile`]).
///
/// # Safety
/// AVX2, FMA and F16C are present; as [`super::for_each_tile`].
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn matmul_panels<E: Avx2Elem>(
    x_packed: &[f32],
    m: usize,
    w: MatRef,
    panels: Range<usize>,
    out: SharedOut,
) {
    for_each_tile(
        x_packed,
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
    pack_panel_scalar::<E>(w, n0, NR, k0 + kc8, &mut panel[kc8..]);
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
            // x[i0 + r, k0 + k]: inside t.x ([kc][R]) because r < R and k < kc.
            let xb = _mm256_broadcast_ss(&*xp.add(k * R + r));
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
