//! The ggml tensor types kvlab reads and their dequantization to f32.
//!
//! A quantized row of `cols` values is `cols / 32` blocks of 32, each block a scale (and for
//! Q4_1 a minimum) in f16 followed by the packed integers:
//!
//! | type | bytes per block | a block                              | value j                    |
//! |------|----------------:|--------------------------------------|----------------------------|
//! | Q8_0 | 34              | d: f16, q: [i8; 32]                  | d · q[j]                   |
//! | Q4_0 | 18              | d: f16, q: [u8; 16] (two 4-bit each) | d · (nibble(j) − 8)        |
//! | Q4_1 | 20              | d: f16, m: f16, q: [u8; 16]          | d · nibble(j) + m          |
//!
//! where nibble(j) is the low 4 bits of q[j] for j < 16 and the high 4 bits of q[j − 16] after.

use anyhow::{bail, Result};
use half::{bf16, f16};

/// Values per block of every quantized type here.
pub const BLOCK_VALUES: usize = 32;

/// A ggml tensor type that kvlab dequantizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
    Q4_1,
}

/// ggml's ids of the types (ggml.h `enum ggml_type`), with their names, for error messages;
/// the ones kvlab reads map to a [`GgmlType`].
const GGML_TYPE_IDS: &[(u32, &str, Option<GgmlType>)] = &[
    (0, "F32", Some(GgmlType::F32)),
    (1, "F16", Some(GgmlType::F16)),
    (2, "Q4_0", Some(GgmlType::Q4_0)),
    (3, "Q4_1", Some(GgmlType::Q4_1)),
    (6, "Q5_0", None),
    (7, "Q5_1", None),
    (8, "Q8_0", Some(GgmlType::Q8_0)),
    (9, "Q8_1", None),
    (10, "Q2_K", None),
    (11, "Q3_K", None),
    (12, "Q4_K", None),
    (13, "Q5_K", None),
    (14, "Q6_K", None),
    (15, "Q8_K", None),
    (16, "IQ2_XXS", None),
    (17, "IQ2_XS", None),
    (18, "IQ3_XXS", None),
    (19, "IQ1_S", None),
    (20, "IQ4_NL", None),
    (21, "IQ3_S", None),
    (22, "IQ2_S", None),
    (23, "IQ4_XS", None),
    (24, "I8", None),
    (25, "I16", None),
    (26, "I32", None),
    (27, "I64", None),
    (28, "F64", None),
    (29, "IQ1_M", None),
    (30, "BF16", Some(GgmlType::BF16)),
    (34, "TQ1_0", None),
    (35, "TQ2_0", None),
    (39, "MXFP4", None),
];

/// The names of the types kvlab reads, for error messages.
pub const SUPPORTED_TYPES: &str = "F32, F16, BF16, Q8_0, Q4_0, Q4_1";

impl GgmlType {
    /// The type of ggml id `id`, or an error that names it (`Q6_K (id 14)`) and what is read.
    pub fn from_id(id: u32) -> Result<GgmlType> {
        match GGML_TYPE_IDS.iter().find(|(known, _, _)| *known == id) {
            Some((_, _, Some(t))) => Ok(*t),
            Some((_, name, None)) => {
                bail!("type {name} (ggml id {id}) is not supported; kvlab reads {SUPPORTED_TYPES}")
            }
            None => bail!("unknown ggml type id {id}; kvlab reads {SUPPORTED_TYPES}"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::BF16 => "BF16",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
        }
    }

    /// (values, bytes) of one storage unit: a single value for the float types, a block for the
    /// quantized ones.
    pub fn unit(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q8_0 => (BLOCK_VALUES, 2 + BLOCK_VALUES),
            GgmlType::Q4_0 => (BLOCK_VALUES, 2 + BLOCK_VALUES / 2),
            GgmlType::Q4_1 => (BLOCK_VALUES, 4 + BLOCK_VALUES / 2),
        }
    }

    /// Bytes of a row of `cols` values, or an error when `cols` is not a whole number of blocks.
    pub fn row_bytes(self, cols: usize) -> Result<usize> {
        let (values, bytes) = self.unit();
        if !cols.is_multiple_of(values) {
            bail!(
                "rows of {cols} values are not a whole number of {} blocks of {values}",
                self.name()
            );
        }
        Ok(cols / values * bytes)
    }
}

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([bytes[at], bytes[at + 1]])).to_f32()
}

/// Dequantizes one row: `src` holds exactly `out.len()` values of type `t`
/// (`t.row_bytes(out.len())` bytes).
pub fn dequantize_row(t: GgmlType, src: &[u8], out: &mut [f32]) {
    let (values, bytes) = t.unit();
    debug_assert_eq!(src.len(), out.len() / values * bytes);
    match t {
        GgmlType::F32 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        GgmlType::F16 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        GgmlType::Q8_0 => {
            for (o, block) in out.chunks_exact_mut(values).zip(src.chunks_exact(bytes)) {
                let d = f16_at(block, 0);
                for (o, &q) in o.iter_mut().zip(&block[2..]) {
                    *o = d * f32::from(q as i8);
                }
            }
        }
        GgmlType::Q4_0 | GgmlType::Q4_1 => {
            let half = values / 2;
            for (o, block) in out.chunks_exact_mut(values).zip(src.chunks_exact(bytes)) {
                let d = f16_at(block, 0);
                // Q4_0 centres the nibble on 8; Q4_1 adds its stored minimum instead.
                let (offset, min, packed) = match t {
                    GgmlType::Q4_0 => (8.0, 0.0, &block[2..]),
                    _ => (0.0, f16_at(block, 2), &block[4..]),
                };
                let (low, high) = o.split_at_mut(half);
                for ((lo, hi), &q) in low.iter_mut().zip(high).zip(packed) {
                    *lo = d * (f32::from(q & 0x0f) - offset) + min;
                    *hi = d * (f32::from(q >> 4) - offset) + min;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A block written by hand: scale, minimum, and the nibbles 0..15, 15..0.
    fn q4_block(d: f32, m: Option<f32>) -> Vec<u8> {
        let mut block = f16::from_f32(d).to_le_bytes().to_vec();
        if let Some(m) = m {
            block.extend(f16::from_f32(m).to_le_bytes());
        }
        block.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        block
    }

    #[test]
    fn q4_nibbles_fill_the_first_then_the_second_half_of_a_block() {
        let mut out = [0.0f32; 32];
        dequantize_row(GgmlType::Q4_1, &q4_block(0.5, Some(-1.0)), &mut out);
        for j in 0..16 {
            assert_eq!(out[j], 0.5 * j as f32 - 1.0, "low nibble {j}");
            assert_eq!(out[16 + j], 0.5 * (15 - j) as f32 - 1.0, "high nibble {j}");
        }
        dequantize_row(GgmlType::Q4_0, &q4_block(0.25, None), &mut out);
        for j in 0..16 {
            assert_eq!(out[j], 0.25 * (j as f32 - 8.0), "low nibble {j}");
            assert_eq!(out[16 + j], 0.25 * (7.0 - j as f32), "high nibble {j}");
        }
    }

    #[test]
    fn q8_0_is_a_signed_byte_times_the_scale() {
        let mut block = f16::from_f32(0.125).to_le_bytes().to_vec();
        block.extend((0..32).map(|j| (j as i8 * 4 - 64) as u8));
        let mut out = [0.0f32; 64];
        let two = [block.clone(), block].concat();
        dequantize_row(GgmlType::Q8_0, &two, &mut out);
        for (j, v) in out.iter().enumerate() {
            assert_eq!(*v, 0.125 * ((j % 32) as f32 * 4.0 - 64.0), "value {j}");
        }
    }

    #[test]
    fn unsupported_and_unknown_ids_are_named() {
        let err = GgmlType::from_id(14).unwrap_err().to_string();
        assert!(err.contains("Q6_K") && err.contains("14"), "{err}");
        let err = GgmlType::from_id(77).unwrap_err().to_string();
        assert!(err.contains("77") && err.contains("Q4_1"), "{err}");
        assert_eq!(GgmlType::from_id(30).unwrap(), GgmlType::BF16);
        let err = GgmlType::Q4_1.row_bytes(48).unwrap_err().to_string();
        assert!(err.contains("48"), "{err}");
        assert_eq!(GgmlType::Q4_1.row_bytes(64).unwrap(), 40);
    }
}
