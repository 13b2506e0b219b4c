//! The CPU backend's hot path: `out = x · Wᵀ` with W read straight from the checkpoint (bf16, f16
//! or f32, possibly unaligned in an mmap) and x, out and all arithmetic in f32.
//!
//! Two shapes of work, split across the global rayon pool:
//! - decode (m == 1): a matrix-vector product bound by memory bandwidth. Each task streams a
//!   contiguous range of weight rows, several rows at once so every x load feeds several FMAs.
//!   Projections of one input ([`matmul_many`]: q, k, v; gate, up) share one parallel pass.
//! - prefill (m > 1): a blocked product in the manner of BLIS. x is packed once per call into
//!   tiles of [`MR`] rows. Each task owns a contiguous range of output columns (= weight rows) in
//!   panels of [`NR`]; every panel is converted to f32 once per [`KC`] columns into a packed buffer
//!   and reused from L1 by every tile of an x block of [`MC`] rows (resident in L2), through a
//!   register-blocked FMA kernel of MR x NR.
//!
//! The instruction set is picked at run time ([`Isa::detect`]); the portable scalar kernels are
//! the fallback on every target and are tested beside the SIMD ones.

use std::cell::Cell;
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

impl<'a> MatRef<'a> {
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

    /// The bytes of W[row, ..].
    fn row(&self, row: usize) -> &'a [u8] {
        let row_bytes = self.cols * self.dtype.size_bytes();
        &self.data[row * row_bytes..(row + 1) * row_bytes]
    }
}

/// out[m, rows] = x[m, cols] · Wᵀ   (x: [m, cols] row-major; out: [m, rows] row-major).
/// m == 1 is decode (matrix-vector), m > 1 is prefill (blocked matrix-matrix). Runs on the
/// current rayon pool (the global one unless called inside `ThreadPool::install`), so the caller
/// sets the thread count.
pub fn matmul(x: &[f32], m: usize, w: MatRef, out: &mut [f32]) {
    matmul_with(Isa::detect(), x, m, w, out);
}

/// out_i = x · W_iᵀ for every product `(W_i, out_i)` (as [`matmul`]): projections of one input,
/// q, k and v or gate and up. For a single row of x (decode) whose weights share a dtype, one
/// parallel pass over the rows of all of them.
pub fn matmul_many(x: &[f32], m: usize, products: &mut [(MatRef, &mut [f32])]) {
    matmul_many_with(Isa::detect(), x, m, products);
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
    let bytes = w.row(row);
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
            let w_row = w.row(n);
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
    matmul_many_with(isa, x, m, &mut [(w, out)]);
}

fn matmul_many_with(isa: Isa, x: &[f32], m: usize, products: &mut [(MatRef, &mut [f32])]) {
    for (w, out) in products.iter() {
        assert_shapes(x, m, *w, out);
    }
    let Some(&(first, _)) = products.first() else {
        return;
    };
    // Every weight has x's width (checked above); one pass needs one dtype too.
    if products.iter().all(|(w, _)| w.dtype == first.dtype) {
        return products_with(isa, first.dtype, x, m, products);
    }
    for (w, out) in products.iter_mut() {
        products_with(isa, w.dtype, x, m, &mut [(*w, &mut **out)]);
    }
}

/// The products of weights of one dtype, with the kernels of `isa`.
fn products_with(
    isa: Isa,
    dtype: DType,
    x: &[f32],
    m: usize,
    products: &mut [(MatRef, &mut [f32])],
) {
    match (isa, dtype) {
        (Isa::Scalar, DType::BF16) => products_scalar::<Bf16>(x, m, products),
        (Isa::Scalar, DType::F16) => products_scalar::<F16>(x, m, products),
        (Isa::Scalar, DType::F32) => products_scalar::<F32>(x, m, products),
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2Fma, DType::BF16) => products_avx2::<Bf16>(x, m, products),
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2Fma, DType::F16) => products_avx2::<F16>(x, m, products),
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2Fma, DType::F32) => products_avx2::<F32>(x, m, products),
    }
}

fn products_scalar<E: WeightElem>(x: &[f32], m: usize, products: &mut [(MatRef, &mut [f32])]) {
    if m == 1 {
        // SAFETY: split_rows hands each task a disjoint row range of a [1, rows] `out`.
        return split_rows(products, |w, rows, out| unsafe {
            matvec_rows_scalar::<E>(x, w, rows.start, out.row_range(rows))
        });
    }
    for (w, out) in products.iter_mut() {
        let w = *w;
        // SAFETY: split_panels packs x and hands each task a disjoint panel range of an
        // [m, rows] `out`.
        split_panels(x, m, w, out, |x_packed, panels, shared| unsafe {
            matmul_panels_scalar::<E>(x_packed, m, w, panels, shared)
        });
    }
}

/// Only called when the CPU has AVX2, FMA and F16C ([`Isa::detect`]).
#[cfg(target_arch = "x86_64")]
fn products_avx2<E: avx2::Avx2Elem>(x: &[f32], m: usize, products: &mut [(MatRef, &mut [f32])]) {
    // SAFETY (every call): the CPU features are present (above); shapes are checked;
    // split_rows hands each task a disjoint row range, and split_panels packs x and hands each
    // task a disjoint panel range, of an [m, rows] `out`.
    if m == 1 && E::LOAD16_EVEN_ODD {
        return with_x_buffer(
            x.len(),
            |arranged| avx2::arrange_x_for_load16(x, arranged),
            |arranged| {
                split_rows(products, |w, rows, out| unsafe {
                    avx2::matvec_rows::<E>(arranged, w, rows.start, out.row_range(rows))
                })
            },
        );
    }
    if m <= SMALL_M {
        return split_rows(products, |w, rows, out| unsafe {
            if m == 1 {
                avx2::matvec_rows::<E>(x, w, rows.start, out.row_range(rows))
            } else {
                avx2::matvec_rows_multi::<E>(x, m, w, rows, out)
            }
        });
    }
    for (w, out) in products.iter_mut() {
        let w = *w;
        split_panels(x, m, w, out, |x_packed, panels, shared| unsafe {
            avx2::matmul_panels::<E>(x_packed, m, w, panels, shared)
        });
    }
}

/// Bytes of input (weights of a product, x to pack) below which a step is not split further: a
/// rayon dispatch costs a few microseconds, the time to stream this much.
const PARALLEL_MIN_BYTES: usize = 128 << 10;

/// Tasks per pool thread: a little slack so a thread slowed by other work does not hold up the
/// call, while each task still streams a large contiguous range.
const TASKS_PER_THREAD: usize = 4;

/// Length of each task's contiguous range when `units` (rows or panels) spanning `bytes` of
/// weights are split: a multiple of `granule`, and all of `units` when the work is too small to
/// share out.
fn units_per_task(bytes: usize, units: usize, granule: usize) -> usize {
    // At least PARALLEL_MIN_BYTES of weights per task, so that wide pools do not cut small
    // matrices into slivers whose dispatch costs more than their streaming.
    let tasks =
        (bytes / PARALLEL_MIN_BYTES).clamp(1, rayon::current_num_threads() * TASKS_PER_THREAD);
    units.div_ceil(tasks).next_multiple_of(granule).max(1)
}

/// Rows of x up to which the AVX2 products stream each weight row once for all of them (the
/// decode kernels: one step of several sequences) instead of packing W into panels. Measured
/// interleaved on Llama-3.2-1B's gate/up and down shapes (2-vCPU Xeon, 2026-12): streaming is
/// 1.3-2.2x faster up to 32 rows; at 64 rows of down (x: 2 MiB) the panels win.
const SMALL_M: usize = 32;

/// Decode split: `run(w, rows, out)` computes out[i, r] = W[r, ..] · x[i, ..] for every row i of
/// x and every r in `rows`, `out` being the product's [m, w.rows] output. The rows of all
/// products are cut into contiguous ranges of about equal length, run in one parallel pass (one
/// dispatch and one join for q, k and v together, say, rather than three).
fn split_rows(
    products: &mut [(MatRef, &mut [f32])],
    run: impl Fn(MatRef, Range<usize>, SharedOut) + Sync,
) {
    let bytes = products.iter().map(|(w, _)| w.data.len()).sum();
    let rows = products.iter().map(|(w, _)| w.rows).sum();
    // Granule of 4 rows: the SIMD kernel's row block.
    let rows_per_task = units_per_task(bytes, rows, 4);
    let tasks: Vec<(MatRef, Range<usize>, SharedOut)> = products
        .iter_mut()
        .flat_map(|(w, out)| {
            let (w, out) = (
                *w,
                SharedOut {
                    ptr: out.as_mut_ptr(),
                },
            );
            (0..w.rows)
                .step_by(rows_per_task)
                .map(move |row0| (w, row0..w.rows.min(row0 + rows_per_task), out))
        })
        .collect();
    if rows_per_task >= rows {
        for (w, rows, out) in tasks {
            run(w, rows, out);
        }
        return;
    }
    tasks
        .into_par_iter()
        .for_each(|(w, rows, out)| run(w, rows, out));
}

/// out[r] = W[row0 + r, ..] · x for every r in 0..out.len().
fn matvec_rows_scalar<E: WeightElem>(x: &[f32], w: MatRef, row0: usize, out: &mut [f32]) {
    for (r, o) in out.iter_mut().enumerate() {
        let row = w.row(row0 + r);
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
/// Reduction depth of a packed block: a panel of NR x KC f32 = 16 KiB stays in L1 while the
/// tiles of an x block sweep over it.
const KC: usize = 256;
/// Rows of x per block (a multiple of MR): MC x KC f32 of packed x = 144 KiB stays in L2 while
/// the panels of a W block sweep over it.
const MC: usize = 144;
/// Panels per W block when x spans several x blocks (m > MC): NC_PANELS x NR x KC f32 = 64 KiB,
/// converted once per KC columns and read back from L2 once per x block, so that each x block is
/// loaded into L2 once per NC_PANELS panels.
const NC_PANELS: usize = 4;

/// One k-step of a packed panel: `[NR]` f32 = W[n0 + j, k] for j in 0..NR, zero past the last
/// weight row; 64-byte aligned so the SIMD kernels load it without cache-line splits.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct PanelRow([f32; NR]);

thread_local! {
    /// x rearranged for the kernels by the calls made from this thread, grown to the largest.
    static X_BUFFER: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    /// Packed W block of the prefill tasks run on this thread: [NC_PANELS][KC] panel rows.
    static W_BLOCK: Cell<Vec<PanelRow>> = const { Cell::new(Vec::new()) };
}

/// `out` shared by the tasks of a product. Each task writes only the columns of its own row or
/// panel range, so no two tasks ever write the same element.
#[derive(Clone, Copy)]
struct SharedOut {
    /// [m, rows] row-major.
    ptr: *mut f32,
}

impl SharedOut {
    /// out[range] of a one-row output.
    ///
    /// # Safety
    /// `range` lies inside the output, and no other task touches it while the slice lives.
    unsafe fn row_range<'a>(self, range: Range<usize>) -> &'a mut [f32] {
        std::slice::from_raw_parts_mut(self.ptr.add(range.start), range.len())
    }
}

// SAFETY: see the type's comment: concurrent writers touch disjoint elements.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

/// Prefill split: packs x once ([`pack_x`]), then `run(x_packed, panels, out)` computes the
/// output columns of the NR-wide panels in `panels`, for disjoint panel ranges in parallel.
fn split_panels(
    x: &[f32],
    m: usize,
    w: MatRef,
    out: &mut [f32],
    run: impl Fn(&[f32], Range<usize>, SharedOut) + Sync,
) {
    if w.cols == 0 {
        // Empty sums; the blocked loops would never touch `out`.
        out.fill(0.0);
        return;
    }
    let shared = SharedOut {
        ptr: out.as_mut_ptr(),
    };
    let panels = w.rows.div_ceil(NR);
    let panels_per_task = units_per_task(w.data.len(), panels, 1);
    with_x_buffer(
        m * w.cols,
        |x_packed| pack_x(x, m, w.cols, x_packed),
        |x_packed| {
            if panels_per_task >= panels {
                run(x_packed, 0..panels, shared);
            } else {
                (0..panels.div_ceil(panels_per_task))
                    .into_par_iter()
                    .for_each(|t| {
                        let start = t * panels_per_task;
                        run(x_packed, start..panels.min(start + panels_per_task), shared)
                    });
            }
        },
    );
}

/// Runs `use_x` on `len` floats of this thread's [`X_BUFFER`] after `fill` has written them.
fn with_x_buffer(len: usize, fill: impl FnOnce(&mut [f32]), use_x: impl FnOnce(&[f32])) {
    // Taken out of the thread-local (not borrowed) so that a nested call on this thread, e.g.
    // from a rayon job run while this one waits, simply gets a buffer of its own.
    let mut buffer = X_BUFFER.take();
    if buffer.len() < len {
        buffer.resize(len, 0.0);
    }
    fill(&mut buffer[..len]);
    use_x(&buffer[..len]);
    X_BUFFER.set(buffer);
}

/// x [m, cols] row-major -> tiles of MR rows, tile t = [cols][mr] at t * MR * cols (mr = MR but
/// for the last tile): a tile kernel then reads one contiguous stream instead of mr rows `cols`
/// apart (which, at multiples of 4 KiB, would all fall into the same L1 set).
fn pack_x(x: &[f32], m: usize, cols: usize, packed: &mut [f32]) {
    let pack_tile = |(t, tile): (usize, &mut [f32])| {
        let mr = MR.min(m - t * MR);
        for r in 0..mr {
            let row = &x[(t * MR + r) * cols..(t * MR + r + 1) * cols];
            for (dst, &v) in tile[r..].iter_mut().step_by(mr).zip(row) {
                *dst = v;
            }
        }
    };
    if std::mem::size_of_val(packed) < PARALLEL_MIN_BYTES {
        packed.chunks_mut(MR * cols).enumerate().for_each(pack_tile);
    } else {
        packed
            .par_chunks_mut(MR * cols)
            .enumerate()
            .for_each(pack_tile);
    }
}

/// Geometry of one register tile: x rows i0..i0 + mr, one panel, one KC block.
struct Tile<'a> {
    /// Packed x[i0.., k0..k0 + kc]: [kc][mr].
    x: &'a [f32],
    mr: usize,
    /// Packed W[n0.., k0..k0 + kc]: [kc] panel rows.
    panel: &'a [PanelRow],
    /// Valid columns of the panel (the last panel of a matrix may be partial).
    nvalid: usize,
    /// First block of the reduction: store instead of adding to `out`.
    first: bool,
}

/// The blocking loops shared by every ISA. `pack_w` converts a panel of W for one KC block of
/// columns; `tile` receives each register tile and `out` at [i0, n0].
///
/// - m <= MC (one x block): for each KC block, every panel of the task is converted and then
///   swept by all tiles of x straight from L1. x[.., k0..k0 + KC] (at most MC x KC f32 = 144 KiB)
///   stays in L2 while all the task's panels pass over it, and comes from L3 once per KC block.
/// - m > MC: for each W block of NC_PANELS panels and each KC block, the block is converted once,
///   then every x block of MC rows (loaded into L2 once per W block) sweeps each of its panels.
///
/// # Safety
/// `x_packed` is x packed by [`pack_x`], `out` is [m, w.rows], and no other thread writes the
/// columns of `panels`.
#[inline(always)]
unsafe fn for_each_tile(
    x_packed: &[f32],
    m: usize,
    w: MatRef,
    panels: Range<usize>,
    out: SharedOut,
    mut pack_w: impl FnMut(usize, usize, usize, &mut [PanelRow]),
    mut tile: impl FnMut(&Tile, *mut f32),
) {
    let cols = w.cols;
    let mut w_block = W_BLOCK.take();
    w_block.resize(NC_PANELS * KC, PanelRow([0.0; NR]));
    // The tiles of x rows `rows` over panel p, packed for columns k0..k0 + kc in `panel`.
    let mut sweep = |p: usize, k0: usize, panel: &[PanelRow], rows: Range<usize>| {
        let n0 = p * NR;
        for t0 in rows.clone().step_by(MR) {
            let mr = MR.min(rows.end - t0);
            let t = Tile {
                x: &x_packed[t0 * cols + k0 * mr..][..panel.len() * mr],
                mr,
                panel,
                nvalid: NR.min(w.rows - n0),
                first: k0 == 0,
            };
            tile(&t, out.ptr.add(t0 * w.rows + n0));
        }
    };
    if m <= MC {
        for k0 in (0..cols).step_by(KC) {
            let panel = &mut w_block[..KC.min(cols - k0)];
            for p in panels.clone() {
                pack_w(p * NR, NR.min(w.rows - p * NR), k0, panel);
                sweep(p, k0, panel, 0..m);
            }
        }
    } else {
        for block_start in panels.clone().step_by(NC_PANELS) {
            let block = block_start..(block_start + NC_PANELS).min(panels.end);
            for k0 in (0..cols).step_by(KC) {
                let kc = KC.min(cols - k0);
                for (b, p) in block.clone().enumerate() {
                    let n0 = p * NR;
                    pack_w(
                        n0,
                        NR.min(w.rows - n0),
                        k0,
                        &mut w_block[b * KC..b * KC + kc],
                    );
                }
                for i0 in (0..m).step_by(MC) {
                    for (b, p) in block.clone().enumerate() {
                        sweep(p, k0, &w_block[b * KC..b * KC + kc], i0..m.min(i0 + MC));
                    }
                }
            }
        }
    }
    W_BLOCK.set(w_block);
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
        |n0, nvalid, k0, panel| pack_panel_scalar::<E>(w, n0, nvalid, k0, panel),
        |t, out_tile| {
            let mut acc = [[0.0f32; NR]; MR];
            for (k, prow) in t.panel.iter().enumerate() {
                for (r, acc_row) in acc[..t.mr].iter_mut().enumerate() {
                    let xv = t.x[k * t.mr + r];
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
