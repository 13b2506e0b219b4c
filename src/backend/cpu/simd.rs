//! What the hand-vectorised loops of the CPU backend share: a multiply-add that is fused where
//! the code is compiled with FMA, and the run-time check for AVX2 + FMA.
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
