//! Quantized K/V rows: int8 and fp8 e4m3 codes with f32 scales, `x ≈ code · scale`. A `head_dim`
//! row (one token, one layer, K or V, one KV head) carries one scale, except an int8 key row,
//! which carries one per [`INT8_KEY_GROUP`] channels. The append quantizes a row once, as it is
//! written; attention multiplies the scales back in as it reads (the CPU's run kernels fold a
//! row's scale into its score or weight, or multiply a key group's into its widened codes), so
//! no dequantized copy of the cache exists.
//!
//! Why keys get finer scales than values: SmolLM2's keys have outlier channels (KIVI's finding:
//! a few channels of a key are much larger than the rest), so one scale per key row leaves the
//! small channels a few levels of 127. Per-channel scales (KIVI) need a scale that covers a
//! block of tokens: in an append-only cache it is known only when the block is complete, so the
//! open block must stay in full precision or be requantized whenever a channel's range grows,
//! the block must lie inside one chunk, and a slot reused after eviction must still fit its
//! block's scales. Scales per group of channels inside each row keep the row self-contained:
//! written once, any chunk size, any eviction. Measured on SmolLM2 (docs/smaller-caches.md),
//! groups of 16 channels come within 1.6x of per-channel scales over 16-token blocks in KL
//! divergence, at the same bytes.
//!
//! fp8 e4m3 is the OCP "E4M3FN" format: 1 sign bit, 4 exponent bits (bias 7), 3 mantissa bits, no
//! infinities, `S.1111.111` is NaN, the largest finite value is ±448, subnormals are `m · 2^-9`.
//! Encoding rounds to nearest, ties to even, and saturates at ±448; NaN codes are never stored.
//! Its precision is relative (2^-4 of each value), so an outlier costs the other channels little:
//! one scale per row.

/// Channels of an int8 key row that share a scale.
pub const INT8_KEY_GROUP: usize = 16;

/// An fp8 e4m3 code as the arena stores it.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct E4m3(pub u8);

/// Largest int8 code magnitude: codes are symmetric, -127..=127 (-128 is never used).
pub const INT8_MAX_CODE: f32 = 127.0;
/// Largest finite e4m3 value.
pub const E4M3_MAX: f32 = 448.0;
/// The e4m3 code of +448 (`0.1111.110`).
pub const E4M3_MAX_CODE: u8 = 0x7e;
/// The e4m3 NaN code (`S.1111.111`); the sign bit may be set too.
pub const E4M3_NAN_CODE: u8 = 0x7f;
/// f32's exponent bias minus e4m3's (127 - 7): an e4m3 code's exponent and mantissa bits, placed
/// in an f32 at bit 20 (its 3 mantissa bits at the top of f32's 23), read as an f32 that is
/// 2^-120 times the e4m3 value, for normal and subnormal codes alike.
pub const E4M3_TO_F32_EXPONENT_SHIFT: i32 = 120;

/// The scale that maps a group's largest magnitude onto `max_code` (0 for an all-zero group).
fn group_scale(x: &[f32], max_code: f32) -> f32 {
    x.iter().fold(0.0f32, |m, v| m.max(v.abs())) / max_code
}

/// int8 codes of a row (`codes.len() == x.len()`) and its scales, one per group of
/// `x.len() / scales.len()` channels: `code = round(x / scale)` with `scale = max|group| / 127`,
/// ties to even.
pub fn quantize_int8(x: &[f32], codes: &mut [i8], scales: &mut [f32]) {
    let group = x.len() / scales.len();
    for ((x, codes), scale) in x.chunks(group).zip(codes.chunks_mut(group)).zip(scales) {
        *scale = group_scale(x, INT8_MAX_CODE);
        for (c, &v) in codes.iter_mut().zip(x) {
            *c = if *scale > 0.0 {
                // In -127..=127 by the choice of scale; `as` saturates a NaN to 0.
                (v / *scale).round_ties_even() as i8
            } else {
                0
            };
        }
    }
}

/// e4m3 codes of a row and its scale: `code = e4m3(x / scale)` with `scale = max|x| / 448`.
pub fn quantize_e4m3(x: &[f32], codes: &mut [E4m3]) -> f32 {
    let scale = group_scale(x, E4M3_MAX);
    for (c, &v) in codes.iter_mut().zip(x) {
        *c = E4m3(if scale > 0.0 {
            e4m3_encode(v / scale)
        } else {
            0
        });
    }
    scale
}

/// The e4m3 code nearest to `x` (ties to the even mantissa), saturated to ±448; NaN gives the NaN
/// code.
pub fn e4m3_encode(x: f32) -> u8 {
    let sign = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = x.abs();
    if a.is_nan() {
        return sign | E4M3_NAN_CODE;
    }
    // Below the smallest normal (2^-6) the codes are m · 2^-9, m = 0..=8: m = 8 is the code of
    // 2^-6 itself (exponent 1, mantissa 0), so the subnormal and normal codes join up. a · 512 is
    // exact.
    if a < 2.0f32.powi(-6) {
        return sign | (a * 512.0).round_ties_even() as u8;
    }
    if a >= E4M3_MAX {
        return sign | E4M3_MAX_CODE;
    }
    // Round f32's 23 mantissa bits to 3, ties to even; a carry moves into the exponent.
    let bits = a.to_bits();
    let dropped = 20;
    let half = (1u32 << (dropped - 1)) - 1 + ((bits >> dropped) & 1);
    let rounded = (bits + half) >> dropped;
    // At most 0x7e: below 448 the nearest is at most 448.
    sign | (rounded - ((E4M3_TO_F32_EXPONENT_SHIFT as u32) << 3)) as u8
}

/// The value of an e4m3 code (NaN for the NaN codes).
pub fn e4m3_decode(code: u8) -> f32 {
    let magnitude = code & 0x7f;
    if magnitude == E4M3_NAN_CODE {
        return f32::NAN;
    }
    let value = f32::from_bits((magnitude as u32) << 20) * 2.0f32.powi(E4M3_TO_F32_EXPONENT_SHIFT);
    if code & 0x80 != 0 {
        -value
    } else {
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// e4m3 from its definition, in f64: sign, exponent, mantissa.
    fn e4m3_value(code: u8) -> f64 {
        let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
        let exponent = ((code >> 3) & 0xf) as i32;
        let mantissa = (code & 7) as f64;
        sign * if exponent == 0 {
            mantissa / 8.0 * 2f64.powi(-6)
        } else {
            (1.0 + mantissa / 8.0) * 2f64.powi(exponent - 7)
        }
    }

    /// The nearest finite code by search over all of them, ties to the even code, saturated.
    fn e4m3_reference(x: f32) -> u8 {
        if x.is_nan() {
            return E4M3_NAN_CODE | if x.is_sign_negative() { 0x80 } else { 0 };
        }
        let x = x as f64;
        let sign: u8 = if x.is_sign_negative() { 0x80 } else { 0 };
        let a = x.abs().min(448.0);
        let mut best = 0u8;
        for code in 0..=0x7eu8 {
            let (d, b) = ((e4m3_value(code) - a).abs(), (e4m3_value(best) - a).abs());
            if d < b || (d == b && code % 2 == 0) {
                best = code;
            }
        }
        sign | best
    }

    #[test]
    fn e4m3_decodes_every_code_as_defined_and_encodes_it_back() {
        for code in 0..=255u8 {
            let value = e4m3_decode(code);
            if code & 0x7f == E4M3_NAN_CODE {
                assert!(value.is_nan(), "code {code:#04x}");
                continue;
            }
            assert_eq!(value as f64, e4m3_value(code), "code {code:#04x}");
            assert_eq!(e4m3_encode(value), code, "code {code:#04x} = {value}");
        }
        assert_eq!(e4m3_decode(E4M3_MAX_CODE), E4M3_MAX);
        assert_eq!(e4m3_decode(1), 2f32.powi(-9), "the smallest subnormal");
        assert_eq!(e4m3_decode(8), 2f32.powi(-6), "the smallest normal");
    }

    #[test]
    fn e4m3_rounds_to_nearest_even_and_saturates() {
        let mut awkward = vec![
            0.0,
            -0.0,
            f32::MIN_POSITIVE,
            1e-45,
            2f32.powi(-10), // half the smallest subnormal: a tie, to 0
            3.0 * 2f32.powi(-10),
            2f32.powi(-6) - 2f32.powi(-11),
            447.9,
            448.0,
            463.9,
            464.0,
            480.0,
            1e9,
            f32::MAX,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            1.0 / 3.0,
            std::f32::consts::PI,
        ];
        // Every midpoint between neighbouring codes (a tie), and just below and above it.
        for code in 0..0x7eu8 {
            let mid = ((e4m3_value(code) + e4m3_value(code + 1)) / 2.0) as f32;
            awkward.extend([mid, mid.next_down(), mid.next_up()]);
        }
        for x in awkward.iter().flat_map(|&x| [x, -x]) {
            let want = e4m3_reference(x);
            assert_eq!(e4m3_encode(x), want, "{x:e}: want {want:#04x}");
        }
        assert_eq!(e4m3_encode(1e9), E4M3_MAX_CODE);
        assert_eq!(e4m3_encode(-f32::NAN), 0x80 | E4M3_NAN_CODE);
        assert_eq!(e4m3_encode(f32::NEG_INFINITY), 0x80 | E4M3_MAX_CODE);
        // 2^-10 ties between 0 and the smallest subnormal: to 0 (even).
        assert_eq!(e4m3_encode(2f32.powi(-10)), 0);
        // 1 + 1/16 ties between 1 and 1 + 1/8: to 1 (mantissa 0, even).
        assert_eq!(e4m3_decode(e4m3_encode(1.0625)), 1.0);
        assert_eq!(e4m3_decode(e4m3_encode(1.1875)), 1.25);
    }

    /// Rows of awkward lengths and ranges: zeros, one outlier, tiny and huge magnitudes.
    fn awkward_rows() -> Vec<Vec<f32>> {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        };
        let mut rows = Vec::new();
        for len in [1, 3, 12, 64, 128] {
            for magnitude in [1e-30, 1e-3, 1.0, 37.5, 1e30] {
                rows.push((0..len).map(|_| next() * magnitude).collect::<Vec<f32>>());
            }
            rows.push(vec![0.0; len]);
            let mut outlier: Vec<f32> = (0..len).map(|_| next() * 0.01).collect();
            outlier[len / 2] = -250.0;
            rows.push(outlier);
        }
        rows
    }

    #[test]
    fn int8_rows_round_trip_within_half_a_step_of_their_group() {
        for x in awkward_rows() {
            // One scale for the row, and (where the row divides) one per 4 channels.
            for groups in [1, x.len() / 4].into_iter().filter(|&g| g > 0) {
                if x.len() % groups != 0 {
                    continue;
                }
                let mut codes = vec![0i8; x.len()];
                let mut scales = vec![0.0f32; groups];
                quantize_int8(&x, &mut codes, &mut scales);
                let width = x.len() / groups;
                for (g, &scale) in scales.iter().enumerate() {
                    let group = &x[g * width..(g + 1) * width];
                    let amax = group.iter().fold(0.0f64, |m, v| m.max(v.abs() as f64));
                    // Plain reference: scale = max|group| / 127, code = round(x / scale).
                    assert!(((scale as f64) - amax / 127.0).abs() <= amax / 127.0 * 1e-6);
                    for (&c, &v) in codes[g * width..(g + 1) * width].iter().zip(group) {
                        let want = if scale > 0.0 {
                            ((v / scale) as f64).round_ties_even()
                        } else {
                            0.0
                        };
                        assert_eq!(c as f64, want, "{v} / {scale}");
                        assert!((-127..=127).contains(&c));
                        let err = (c as f64 * scale as f64 - v as f64).abs();
                        assert!(err <= scale as f64 * 0.5 * (1.0 + 1e-6), "{v}: {err}");
                    }
                    if amax > 0.0 {
                        let codes = &codes[g * width..(g + 1) * width];
                        assert!(
                            codes.iter().any(|&c| c.abs() == 127),
                            "the largest maps to 127"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn e4m3_rows_round_trip_within_the_format_precision() {
        for x in awkward_rows() {
            let mut codes = vec![E4m3(0); x.len()];
            let scale = quantize_e4m3(&x, &mut codes);
            for (&E4m3(c), &v) in codes.iter().zip(&x) {
                assert_ne!(c & 0x7f, E4M3_NAN_CODE, "no NaN is stored");
                let want = if scale > 0.0 {
                    e4m3_reference(v / scale)
                } else {
                    0
                };
                assert_eq!(c, want, "{v} / {scale}");
                // Half a step: 2^-4 relative for normals, 2^-10 absolute below them.
                let err = ((e4m3_decode(c) * scale) as f64 - v as f64).abs();
                let bound = ((v.abs() as f64) / 16.0).max(2f64.powi(-10) * scale as f64);
                assert!(err <= bound * (1.0 + 1e-5), "{v}: {err} > {bound}");
            }
        }
    }
}
