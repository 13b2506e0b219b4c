//! The CPU backend's hot path: `out = x · Wᵀ` with W read straight from the checkpoint (bf16, f16
//! or f32, possibly unaligned in an mmap) and x, out and all arithmetic in f32.
//!
//! Two shapes of work, split across the global rayon pool:
//! - decode (m == 1): a matrix-vector product bound by memory bandwidth. Each task streams a
//!   contiguous range of weight rows, several rows at once so every x load feeds several FMAs.
//! - prefill (m > 1): a blocked product. Each task owns a contiguous range of output columns
//!   (= weight rows) in panels of [`NR`]; a panel of W is converted to f32 once per [`KC`] columns
//!   into a packed, cache-resident buffer and then reused by every group of [`MR`] rows of x.
//!
//! The instruction set is picked at run time ([`Isa::detect`]); the portable scalar kernels are
//! the fallback on every target and are tested beside the SIMD ones.

use std::ops::Range;

use rayon::prelude::*;

use crate::model::DType;

#[cfg(target_arch = "x86_64")]
mod avx2;

/// A weight matrix as stored by HF: [rows = out_features, cols = in_features] row-major,
/// little-endian, `data.len() == rows * cols * dtype.size_bytes()`. `data` may be unaligned (it
/// points into an mmap'd safetensors file); every kernel reads it with unaligned loads.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    pub data: &'a [u8],
}

impl MatRef<'_> {
    fn assert_consistent(&self) {
        assert_eq!(
            self.data.len(),
            self.rows * self.cols * self.dtype.size_bytes(),
            "MatRef: {} bytes of data for a {:?} matrix of {} x {}",
            self.data.len(),
            self.dtype,
            self.rows,
            self.cols
        );
    }
}

/// out[m, rows] = x[m, cols] · Wᵀ   (x: [m, cols] row-major; out: [m, rows] row-major).
/// m == 1 is decode (matrix-vector), m > 1 is prefill (blocked matrix-matrix). Runs on the
/// global rayon pool, so the caller sets the thread count.
pub fn matmul(x: &[f32], m: usize, w: MatRef, out: &mut [f32]) {
    matmul_with(Isa::detect(), x, m, w, out);
}

/// out[..cols] = W[row, ..] as f32 (embedding gather).
pub fn row_to_f32(w: MatRef, row: usize, out: &mut [f32]) {
    w.assert_consistent();
    assert!(
        row < w.rows,
        "row_to_f32: row {row} of a matrix of {} rows",
        w.rows
    );
    assert!(
        out.len() >= w.cols,
        "row_to_f32: output of {} floats for a row of {}",
        out.len(),
        w.cols
    );
    let row_bytes = w.cols * w.dtype.size_bytes();
    let bytes = &w.data[row * row_bytes..(row + 1) * row_bytes];
    let out = &mut out[..w.cols];
    match w.dtype {
        DType::BF16 => convert_to_f32::<Bf16>(bytes, out),
        DType::F16 => convert_to_f32::<F16>(bytes, out),
        DType::F32 => convert_to_f32::<F32>(bytes, out),
    }
}

/// The definition the fast paths are checked against: plain loops, products and sums in f64
/// (a product of two f32 values is exact in f64), one rounding to f32 per output.
pub fn matmul_reference(x: &[f32], m: usize, w: MatRef, out: &mut [f32]) {
    assert_shapes(x, m, w, out);
    let elem_bytes = w.dtype.size_bytes();
    for i in 0..m {
        let x_row = &x[i * w.cols..(i + 1) * w.cols];
        for n in 0..w.rows {
            let w_row = &w.data[n * w.cols * elem_bytes..(n + 1) * w.cols * elem_bytes];
            let sum: f64 = x_row
                .iter()
                .zip(w_row.chunks_exact(elem_bytes))
                .map(|(&xv, wb)| xv as f64 * weight_to_f32(w.dtype, wb) as f64)
                .sum();
            out[i * w.rows + n] = sum as f32;
        }
    }
}

/// Instruction set the kernels run with, detected at run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Isa {
    /// Portable Rust; the compiler vectorises what it can for the build target.
    Scalar,
    /// AVX2 + FMA + F16C (x86_64).
    #[cfg(target_arch = "x86_64")]
    Avx2Fma,
}

impl Isa {
    fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            return Isa::Avx2Fma;
        }
        Isa::Scalar
    }
}

/// A checkpoint weight format, decoded from its little-endian bytes.
trait WeightElem: Copy + Send + Sync + 'static {
    const BYTES: usize;
    /// `bytes.len() == Self::BYTES`.
    fn to_f32(bytes: &[u8]) -> f32;
}

#[derive(Clone, Copy)]
struct Bf16;
#[derive(Clone, Copy)]
struct F16;
#[derive(Clone, Copy)]
struct F32;

impl WeightElem for Bf16 {
    const BYTES: usize = 2;
    fn to_f32(bytes: &[u8]) -> f32 {
        // bf16 is the upper half of an f32.
        f32::from_bits((u16::from_le_bytes([bytes[0], bytes[1]]) as u32) << 16)
    }
}

impl WeightElem for F16 {
    const BYTES: usize = 2;
    fn to_f32(bytes: &[u8]) -> f32 {
        half::f16::from_bits(u16::from_le_bytes([bytes[0], bytes[1]])).to_f32()
    }
}

impl WeightElem for F32 {
    const BYTES: usize = 4;
    fn to_f32(bytes: &[u8]) -> f32 {
        f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
    }
}

fn weight_to_f32(dtype: DType, bytes: &[u8]) -> f32 {
    match dtype {
        DType::BF16 => Bf16::to_f32(bytes),
        DType::F16 => F16::to_f32(bytes),
        DType::F32 => F32::to_f32(bytes),
    }
}

/// out[i] = bytes[i * E::BYTES..][..E::BYTES] as f32.
fn convert_to_f32<E: WeightElem>(bytes: &[u8], out: &mut [f32]) {
    debug_assert_eq!(bytes.len(), out.len() * E::BYTES);
    for (o, b) in out.iter_mut().zip(bytes.chunks_exact(E::BYTES)) {
        *o = E::to_f32(b);
    }
}

fn assert_shapes(x: &[f32], m: usize, w: MatRef, out: &[f32]) {
    w.assert_consistent();
    assert_eq!(
        x.len(),
        m * w.cols,
        "matmul: x has {} floats, expected m {m} x cols {}",
        x.len(),
        w.cols
    );
    assert_eq!(
        out.len(),
        m * w.rows,
        "matmul: out has {} floats, expected m {m} x rows {}",
        out.len(),
        w.rows
    );
}

fn matmul_with(isa: Isa, x: &[f32], m: usize, w: MatRef, out: &mut [f32]) {
    assert_shapes(x, m, w, out);
    if w.cols == 0 {
        // Empty sums; the blocked loops would never touch `out`.
        out.fill(0.0);
        return;
    }
    match (isa, w.dtype) {
        (Isa::Scalar, DType::BF16) => matmul_scalar::<Bf16>(x, m, w, out),
        (Isa::Scalar, DType::F16) => matmul_scalar::<F16>(x, m, w, out),
        (Isa::Scalar, DType::F32) => matmul_scalar::<F32>(x, m, w, out),
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2Fma, DType::BF16) => matmul_avx2::<Bf16>(x, m, w, out),
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2Fma, DType::F16) => matmul_avx2::<F16>(x, m, w, out),
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2Fma, DType::F32) => matmul_avx2::<F32>(x, m, w, out),
    }
}

fn matmul_scalar<E: WeightElem>(x: &[f32], m: usize, w: MatRef, out: &mut [f32]) {
    if m == 1 {
        split_rows(w, out, |row0, out_rows| {
            matvec_rows_scalar::<E>(x, w, row0, out_rows)
        });
    } else {
        // SAFETY: split_panels hands each task a disjoint panel range of an [m, rows] `out`.
        split_panels(w, out, |panels, shared| unsafe {
            matmul_panels_scalar::<E>(x, m, w, panels, shared)
        });
    }
}

/// Only called when the CPU has AVX2, FMA and F16C ([`Isa::detect`]).
#[cfg(target_arch = "x86_64")]
fn matmul_avx2<E: avx2::Avx2Elem>(x: &[f32], m: usize, w: MatRef, out: &mut [f32]) {
    // SAFETY (both arms): the CPU features are present (above); shapes are checked, and
    // split_panels hands each task a disjoint panel range of an [m, rows] `out`.
    if m == 1 {
        split_rows(w, out, |row0, out_rows| unsafe {
            avx2::matvec_rows::<E>(x, w, row0, out_rows)
        });
    } else {
        split_panels(w, out, |panels, shared| unsafe {
            avx2::matmul_panels::<E>(x, m, w, panels, shared)
        });
    }
}

/// Below this many bytes of weights a product runs on the calling thread: a rayon dispatch costs
/// a few microseconds, the time to stream this much.
const PARALLEL_MIN_WEIGHT_BYTES: usize = 128 << 10;

/// Tasks per pool thread: a little slack so a thread slowed by other work does not hold up the
/// call, while each task still streams a large contiguous range.
const TASKS_PER_THREAD: usize = 4;

/// Splits `units` into contiguous ranges for at most `max_tasks` tasks, each a multiple of
/// `granule` long (except the last).
fn task_ranges(units: usize, max_tasks: usize, granule: usize) -> Vec<Range<usize>> {
    let per_task = units.div_ceil(max_tasks).next_multiple_of(granule).max(1);
    (0..units)
        .step_by(per_task)
        .map(|start| start..(start + per_task).min(units))
        .collect()
}

fn max_tasks(w: MatRef) -> usize {
    if w.data.len() < PARALLEL_MIN_WEIGHT_BYTES {
        1
    } else {
        rayon::current_num_threads() * TASKS_PER_THREAD
    }
}

/// Decode split: `run(row0, out_rows)` computes out_rows[r] = W[row0 + r, ..] · x, for
/// contiguous row ranges in parallel.
fn split_rows(w: MatRef, out: &mut [f32], run: impl Fn(usize, &mut [f32]) + Sync) {
    // Granule of 4 rows: the SIMD kernel's row block.
    let ranges = task_ranges(w.rows, max_tasks(w), 4);
    if ranges.len() <= 1 {
        run(0, out);
        return;
    }
    out.par_chunks_mut(ranges[0].len())
        .zip(ranges)
        .for_each(|(out_rows, rows)| run(rows.start, out_rows));
}

/// Prefill split: `run(panels, out)` computes the output columns of the NR-wide panels in
/// `panels`, for disjoint panel ranges in parallel.
fn split_panels(w: MatRef, out: &mut [f32], run: impl Fn(Range<usize>, SharedOut) + Sync) {
    let shared = SharedOut {
        ptr: out.as_mut_ptr(),
    };
    let panels = w.rows.div_ceil(NR);
    let ranges = task_ranges(panels, max_tasks(w), 1);
    if ranges.len() <= 1 {
        run(0..panels, shared);
    } else {
        ranges
            .into_par_iter()
            .for_each(|panels| run(panels, shared));
    }
}

/// out[r] = W[row0 + r, ..] · x for every r in 0..out.len().
fn matvec_rows_scalar<E: WeightElem>(x: &[f32], w: MatRef, row0: usize, out: &mut [f32]) {
    let row_bytes = w.cols * E::BYTES;
    for (r, o) in out.iter_mut().enumerate() {
        let row = &w.data[(row0 + r) * row_bytes..(row0 + r + 1) * row_bytes];
        // Eight independent partial sums so the compiler can keep them in vector lanes.
        let mut lanes = [0.0f32; 8];
        let x_chunks = x.chunks_exact(8);
        let w_chunks = row.chunks_exact(8 * E::BYTES);
        let (x_tail, w_tail) = (x_chunks.remainder(), w_chunks.remainder());
        for (xc, wc) in x_chunks.zip(w_chunks) {
            for (l, lane) in lanes.iter_mut().enumerate() {
                *lane += xc[l] * E::to_f32(&wc[l * E::BYTES..(l + 1) * E::BYTES]);
            }
        }
        let mut sum: f32 = lanes.iter().sum();
        for (&xv, wb) in x_tail.iter().zip(w_tail.chunks_exact(E::BYTES)) {
            sum += xv * E::to_f32(wb);
        }
        *o = sum;
    }
}

/// Rows of x per register tile of the prefill kernels.
const MR: usize = 6;
/// Output columns (= weight rows) per packed panel: 16 f32, one cache line per panel row.
const NR: usize = 16;
/// Reduction depth of a packed panel: NR x KC f32 = 16 KiB, resident in L1 while every tile of
/// x rows sweeps over it.
const KC: usize = 256;

/// One k-step of a packed panel: `[NR]` f32 = W[n0 + j, k] for j in 0..NR, zero past the last
/// weight row; 64-byte aligned so the SIMD kernels load it without cache-line splits.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct PanelRow([f32; NR]);

/// The packed panel buffer of one task: [KC] rows of [NR], on the stack (no allocation per call).
type Panel = [PanelRow; KC];

/// `out` shared by prefill tasks. Each task writes only columns of its own panel range, so no two
/// tasks ever write the same element.
#[derive(Clone, Copy)]
struct SharedOut {
    /// [m, rows] row-major.
    ptr: *mut f32,
}

// SAFETY: see the type's comment: concurrent writers touch disjoint elements.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

/// Geometry of one register tile: rows i0..i0 + mr of x, one panel, one KC block.
struct Tile<'a> {
    /// [mr, ldx] row-major, starting at x[i0, k0]; `kc` columns are read from each row.
    x: &'a [f32],
    ldx: usize,
    mr: usize,
    /// Packed W[n0.., k0..k0 + kc].
    panel: &'a [PanelRow],
    /// Valid columns of the panel (the last panel of a matrix may be partial).
    nvalid: usize,
    /// First block of the reduction: store instead of adding to `out`.
    first: bool,
}

/// The blocking loops shared by every ISA: for each panel and KC block, `pack` it once, then run
/// `tile` for every group of MR rows of x. `tile` receives the tile and `out` at [i0, n0].
///
/// # Safety
/// `out` must be [m, w.rows], and no other thread may write the columns of `panels`.
#[inline(always)]
unsafe fn for_each_tile<E: WeightElem>(
    x: &[f32],
    m: usize,
    w: MatRef,
    panels: Range<usize>,
    out: SharedOut,
    mut pack: impl FnMut(usize, usize, usize, &mut [PanelRow]),
    mut tile: impl FnMut(&Tile, *mut f32),
) {
    let mut panel: Panel = [PanelRow([0.0; NR]); KC];
    for p in panels {
        let n0 = p * NR;
        let nvalid = NR.min(w.rows - n0);
        for k0 in (0..w.cols).step_by(KC) {
            let kc = KC.min(w.cols - k0);
            pack(n0, nvalid, k0, &mut panel[..kc]);
            for i0 in (0..m).step_by(MR) {
                let mr = MR.min(m - i0);
                let tile_x = &x[i0 * w.cols + k0..(i0 + mr - 1) * w.cols + k0 + kc];
                let t = Tile {
                    x: tile_x,
                    ldx: w.cols,
                    mr,
                    panel: &panel[..kc],
                    nvalid,
                    first: k0 == 0,
                };
                tile(&t, out.ptr.add(i0 * w.rows + n0));
            }
        }
    }
}

/// panel[k][j] = W[n0 + j, k0 + k] for j < nvalid, 0 beyond; `panel.len()` is kc.
fn pack_panel_scalar<E: WeightElem>(
    w: MatRef,
    n0: usize,
    nvalid: usize,
    k0: usize,
    panel: &mut [PanelRow],
) {
    let kc = panel.len();
    let mut row = [0.0f32; KC];
    for j in 0..NR {
        if j < nvalid {
            let start = ((n0 + j) * w.cols + k0) * E::BYTES;
            convert_to_f32::<E>(&w.data[start..start + kc * E::BYTES], &mut row[..kc]);
        } else {
            row[..kc].fill(0.0);
        }
        for (dst, &v) in panel.iter_mut().zip(&row[..kc]) {
            dst.0[j] = v;
        }
    }
}

/// Adds (or, for the first KC block, stores) `acc[r][j]` to out[r * ldc + j] for r < mr, j < nvalid.
///
/// # Safety
/// `out` must point at a [mr, ldc] region with at least `nvalid` writable columns per row.
unsafe fn store_tile(acc: &[[f32; NR]], out: *mut f32, ldc: usize, nvalid: usize, first: bool) {
    for (r, acc_row) in acc.iter().enumerate() {
        for (j, &v) in acc_row[..nvalid].iter().enumerate() {
            let o = out.add(r * ldc + j);
            *o = if first { v } else { *o + v };
        }
    }
}

/// # Safety
/// As [`for_each_tile`].
unsafe fn matmul_panels_scalar<E: WeightElem>(
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
        |n0, nvalid, k0, panel| pack_panel_scalar::<E>(w, n0, nvalid, k0, panel),
        |t, out_tile| {
            let mut acc = [[0.0f32; NR]; MR];
            for (k, prow) in t.panel.iter().enumerate() {
                for (r, acc_row) in acc[..t.mr].iter_mut().enumerate() {
                    let xv = t.x[r * t.ldx + k];
                    for (a, &wv) in acc_row.iter_mut().zip(&prow.0) {
                        *a += xv * wv;
                    }
                }
            }
            store_tile(&acc[..t.mr], out_tile, w.rows, t.nvalid, t.first);
        },
    );
}

#[cfg(test)]
mod tests;
