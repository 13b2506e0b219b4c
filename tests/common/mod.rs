//! Helpers shared by the integration tests: the reference fixtures of tests/fixtures (the
//! library's kvlab::selftest::fixtures, unwrapped for tests).
#![allow(dead_code, unused_imports)] // each test crate uses its own subset

use std::path::{Path, PathBuf};

pub use kvlab::selftest::fixtures::{RefGeneration, MODELS};

/// `../shared`, or None (test skipped with a printed reason) when absent outside CI.
pub fn shared_dir() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared");
    if dir.is_dir() {
        return Some(dir);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{} is required under CI=true",
        dir.display()
    );
    eprintln!("skipped: {} is absent", dir.display());
    None
}

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

/// Runs the selftest's check `id` on the emulator (`threads` OS threads, all cores when None),
/// panicking with its error.
pub fn run_check(id: &str, threads: Option<usize>) {
    let check = kvlab::selftest::check(id).unwrap_or_else(|| panic!("no check {id}"));
    let ctx = kvlab::selftest::Context::emulator(threads);
    let note = (check.run)(&ctx).unwrap_or_else(|e| panic!("{id}: {e:#}"));
    eprintln!("{id}: {note}");
}

/// Fails unless the selftest's checks of `group` are exactly `names`, in order: a check added
/// to the selftest must get its test too.
pub fn assert_group_is(group: &str, names: &[&str]) {
    let ids: Vec<String> = kvlab::selftest::checks()
        .iter()
        .filter(|c| c.group == group)
        .map(kvlab::selftest::Check::id)
        .collect();
    let covered: Vec<String> = names.iter().map(|n| format!("{group}/{n}")).collect();
    assert_eq!(ids, covered);
}

pub mod cli;
pub mod gguf;

/// The reference outputs of transformers on SmolLM2-135M-Instruct Q4_1 (tests/fixtures, all but
/// the prompt logits: see [`smollm2_prompt_logits`]).
pub const SMOLLM2: &str = "smollm2-135m-instruct-q4_1";

/// transformers' logits at the 44 prompt positions of SmolLM2's reference conversation, read
/// from `../shared/reference` (8.6 MB: too large to copy into git), or None after saying why.
pub fn smollm2_prompt_logits() -> Option<(Vec<u64>, Vec<f32>)> {
    let path = shared_dir()?
        .join("reference")
        .join(SMOLLM2)
        .join("ref_prompt_logits.npy");
    Some(read_npy(&path))
}

/// The installed SmolLM2 file (scripts/fetch-models.sh), or None after saying why the test skips;
/// under `CI=true` its absence fails the test instead.
pub fn smollm2_file() -> Option<PathBuf> {
    let model = kvlab::model::hub::InstalledModel::by_name("smollm2-135m-instruct").unwrap();
    match model.resolve() {
        Ok(path) => Some(path),
        Err(e) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("CI=true needs the model (scripts/test.sh runs scripts/fetch-models.sh): {e:#}")
        }
        Err(e) => {
            eprintln!("skipped: {e:#}");
            None
        }
    }
}
