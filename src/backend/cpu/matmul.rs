//! Stand-in scalar matmul (replaced by the SIMD kernels of the cpumm branch).
use crate::model::DType;
use rayon::prelude::*;

/// A weight matrix as stored by HF: [rows = out_features, cols = in_features] row-major.
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    pub data: &'a [u8],
}

fn load(w: MatRef, i: usize) -> f32 {
    let b = w.data;
    match w.dtype {
        DType::F32 => f32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]),
        DType::BF16 => half::bf16::from_bits(u16::from_le_bytes([b[2 * i], b[2 * i + 1]])).to_f32(),
        DType::F16 => half::f16::from_bits(u16::from_le_bytes([b[2 * i], b[2 * i + 1]])).to_f32(),
    }
}

/// out[m, rows] = x[m, cols] · Wᵀ
pub fn matmul(x: &[f32], m: usize, w: MatRef, out: &mut [f32]) {
    out[..m * w.rows]
        .par_chunks_mut(w.rows)
        .enumerate()
        .for_each(|(r, o)| {
            let xr = &x[r * w.cols..(r + 1) * w.cols];
            for (n, on) in o.iter_mut().enumerate() {
                *on = (0..w.cols).map(|k| xr[k] * load(w, n * w.cols + k)).sum();
            }
        });
}

/// out[..cols] = W[row, ..] as f32.
pub fn row_to_f32(w: MatRef, row: usize, out: &mut [f32]) {
    for (k, o) in out[..w.cols].iter_mut().enumerate() {
        *o = load(w, row * w.cols + k);
    }
}
