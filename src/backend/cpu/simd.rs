//! What the hand-vectorised loops of the CPU backend share: a multiply-add that is fused where
//! the code is compiled with FMA, the run-time check for AVX2 + FMA, and the horizontal sum of an
//! AVX register.
//!
//! The pattern: write a kernel once as an `#[inline(always)]` generic over [`MulAdd`], then
//! instantiate it twice, plain (`Unfused`, build-target instructions) and inside a
//! `#[target_feature(enable = "avx2,fma")]` wrapper (`Fused`), and pick one at run time.

/// a·b + c.
pub trait MulAdd {
    fn mul_add(a: f32, b: f32, c: f32) -> f32;
}

/// One rounding (`vfmadd` under the FMA target feature; a slow libm call without it).
pub struct Fused;
/// Two roundings; what plain Rust compiles to.
pub struct Unfused;

impl MulAdd for Fused {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

impl MulAdd for Unfused {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

/// Whether this CPU runs AVX2 and FMA instructions (cached by std after the first call).
pub fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// e^x in f32 for x ≤ 88, within 1.5e-7 of the exact value relative (about 1 ulp), 0 below -87
/// (where e^x is no longer a normal f32), and exactly 1 at 0. Branch-free (a select), so loops over it vectorise, which
/// a call of `f32::exp` (libm) prevents.
///
/// Cephes' `expf`: x = n·ln2 + r with |r| ≤ ln2/2 and n an integer, e^r by a degree-7 minimax
/// polynomial, 2^n put straight into the exponent bits.
#[inline(always)]
pub fn exp<M: MulAdd>(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so that n·LN2_HI is exact for |n| < 2^9.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5·2^23 rounds to the nearest integer and leaves it in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let clamped = x.clamp(-87.0, 88.0);
    let shifted = M::mul_add(clamped, LOG2_E, ROUND);
    let n = shifted - ROUND;
    let r = M::mul_add(n, -LN2_LO, M::mul_add(n, -LN2_HI, clamped));
    let mut p = 1.987_569_1e-4;
    p = M::mul_add(p, r, 1.398_199_9e-3);
    p = M::mul_add(p, r, 8.333_452e-3);
    p = M::mul_add(p, r, 4.166_579_6e-2);
    p = M::mul_add(p, r, 1.666_666_5e-1);
    p = M::mul_add(p, r, 5e-1);
    let e_r = M::mul_add(p, r * r, r) + 1.0;
    // The low bits of `shifted` hold n + 2^22; n + 127 is the biased exponent of 2^n.
    let biased = (shifted.to_bits() as i32 - 0x4B40_0000 + 127) as u32;
    let scaled = e_r * f32::from_bits(biased << 23);
    if x < -87.0 {
        0.0
    } else {
        scaled
    }
}

/// The sum of the eight lanes of `v`.
///
/// # Safety
/// The CPU has AVX2 (its callers are AVX2 kernels, compiled for it themselves).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
pub fn horizontal_sum(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let quad = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
    _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps::<1>(pair, pair)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_exp<M: MulAdd>() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let want = (x as f64).exp();
            let got = exp::<M>(x) as f64;
            worst = worst.max((got - want).abs() / want);
            x += 0.000_37;
        }
        assert!(worst <= 1.5e-7, "relative error {worst}");
        assert_eq!(exp::<M>(0.0), 1.0);
        assert_eq!(exp::<M>(-87.5), 0.0);
        assert_eq!(exp::<M>(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp::<M>(-1e30), 0.0);
    }

    #[test]
    fn exp_is_within_an_ulp() {
        check_exp::<Unfused>();
        check_exp::<Fused>();
    }
}
