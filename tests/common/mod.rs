//! Helpers shared by the integration tests: the reference fixtures of tests/fixtures (the
//! library's kvlab::selftest::fixtures, unwrapped for tests).
#![allow(dead_code)] // each test crate uses its own subset

use std::path::{Path, PathBuf};

pub use kvlab::selftest::fixtures::{RefGeneration, MODELS};

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The reference generation of fixture `name`.
pub fn reference(name: &str) -> RefGeneration {
    RefGeneration::load(&fixture(name)).unwrap()
}

/// (shape, values) of a float32 .npy file.
pub fn read_npy(path: &Path) -> (Vec<u64>, Vec<f32>) {
    kvlab::npy::read_f32_array(path).unwrap()
}

/// The largest |a - b| (a NaN counts as infinite).
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    kvlab::selftest::fixtures::max_abs_diff(a, b).unwrap()
}
