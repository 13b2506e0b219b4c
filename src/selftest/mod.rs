//! `kvlab selftest`: the CUDA backend checked on whichever device runs it, the emulator in CI
//! or a real GPU, with the very code the tests run (tests/emulator.rs, tests/cuda_kernels.rs and
//! tests/cuda_reference.rs call these checks one by one):
//!
//! - [`probes`]: the hardware behaviour the kernels rely on and the emulator models, through
//!   kernels/emu_selftest.cu: mma.sync and ldmatrix fragment layouts, shuffles and votes,
//!   bf16/f16 conversions, cp.async groups, shared-memory limits, graph capture;
//! - [`kernels`]: every kernel of kernels/*.cu against its CPU reference on awkward shapes;
//! - [`reference`]: the three tiny checkpoints against transformers' outputs, every step
//!   teacher-forced, for every cache strategy; graphs replaying exactly what launches compute;
//! - [`reuse`]: prefix reuse against re-prefilling, turn after turn.
//!
//! The planted-bug kernels are not here: only the emulator can see those bugs, so they stay in
//! tests/emulator.rs. A check returns a one-line note on success and an error naming what
//! differs, where and by how much on failure; a check that panics is a failure too, and the
//! next check still runs.

pub mod fixtures;
pub mod kernels;
pub mod probes;
pub mod reference;
pub mod reuse;

use crate::backend::cuda::emu::EmuDevice;
use crate::backend::cuda::{open_device, BackendKind, CudaBackend, CudaOptions, Device};
use anyhow::{bail, Result};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

/// The device under test and where the fixtures are.
pub struct Context {
    pub device: Arc<dyn Device>,
    /// "cuda" or "emu": what backends and reports call it.
    pub name: String,
    /// Whether the device is the emulator (some probes check its stricter guarantees too).
    pub emulated: bool,
    /// tests/fixtures.
    pub fixtures: PathBuf,
}

impl Context {
    /// The device of `kind` (auto: the GPU when present, else the emulator).
    pub fn open(kind: BackendKind, fixtures: PathBuf) -> Result<Context> {
        let kind = match kind {
            BackendKind::Auto if crate::backend::cuda::cuda_device_present() => BackendKind::Cuda,
            BackendKind::Auto => BackendKind::Emu,
            BackendKind::Cpu => bail!("the selftest checks a CUDA device: --backend cuda or emu"),
            other => other,
        };
        Ok(Context {
            device: open_device(kind)?,
            name: kind.to_string(),
            emulated: kind == BackendKind::Emu,
            fixtures,
        })
    }

    /// The emulator with `threads` threads (`KVLAB_EMU_THREADS` / all cores when None) and
    /// the fixtures of this source tree: what the tests use.
    pub fn emulator(threads: Option<usize>) -> Context {
        let device = match threads {
            Some(threads) => EmuDevice::with_options(threads, false),
            None => EmuDevice::new(),
        };
        Context {
            device: Arc::new(device.expect("the emulator starts")),
            name: "emu".into(),
            emulated: true,
            fixtures: fixtures::default_dir(),
        }
    }

    /// A CUDA backend over the device.
    pub fn backend(&self, options: CudaOptions) -> Result<CudaBackend> {
        CudaBackend::new(self.device.clone(), &self.name, options)
    }
}

/// One named check.
#[derive(Clone, Copy)]
pub struct Check {
    pub group: &'static str,
    pub name: &'static str,
    pub run: fn(&Context) -> Result<String>,
}

impl Check {
    /// "group/name".
    pub fn id(&self) -> String {
        format!("{}/{}", self.group, self.name)
    }
}

/// The check `id` ("group/name").
pub fn check(id: &str) -> Option<Check> {
    checks().into_iter().find(|c| c.id() == id)
}

/// Every check, in the order they run: probes first (a wrong fragment layout explains any
/// kernel failure after it), then kernels, then whole models.
pub fn checks() -> Vec<Check> {
    let mut all = probes::CHECKS.to_vec();
    all.extend_from_slice(kernels::CHECKS);
    all.extend_from_slice(reference::CHECKS);
    all.extend_from_slice(reuse::CHECKS);
    all
}

/// What one check found.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Outcome {
    pub check: String,
    pub passed: bool,
    pub seconds: f64,
    /// The check's note, or its error.
    pub detail: String,
}

/// Runs the checks whose id contains `filter` (all without one), each after the last, failures
/// included; `on_outcome` sees each result as it comes.
pub fn run(ctx: &Context, filter: Option<&str>, on_outcome: impl FnMut(&Outcome)) -> Vec<Outcome> {
    run_checks(ctx, &checks(), filter, on_outcome)
}

/// [`run`] over the given checks.
pub fn run_checks(
    ctx: &Context,
    checks: &[Check],
    filter: Option<&str>,
    mut on_outcome: impl FnMut(&Outcome),
) -> Vec<Outcome> {
    let mut outcomes = Vec::new();
    for check in checks {
        let id = check.id();
        if filter.is_some_and(|f| !id.contains(f)) {
            continue;
        }
        let started = Instant::now();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (check.run)(ctx)));
        let (passed, detail) = match result {
            Ok(Ok(note)) => (true, note),
            Ok(Err(error)) => (false, format!("{error:#}")),
            Err(panic) => {
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "a panic without a message".into());
                (false, format!("panicked: {message}"))
            }
        };
        let outcome = Outcome {
            check: id,
            passed,
            seconds: started.elapsed().as_secs_f64(),
            detail,
        };
        on_outcome(&outcome);
        outcomes.push(outcome);
    }
    outcomes
}

/// What kvlab finds of CUDA on this machine: the driver and its devices, the NVRTC it would
/// compile with (and every NVRTC and cuBLAS file the search sees), the cuBLAS of the benches.
pub fn environment() -> String {
    use crate::backend::cuda::cublas::Cublas;
    use crate::backend::cuda::gpu::{driver_cuda_version, kernel_driver_version};
    use crate::backend::cuda::libraries::{self, SearchEnv};
    use crate::backend::cuda::nvrtc::Nvrtc;
    let mut lines = Vec::new();
    match driver_cuda_version() {
        Some(version) => lines.push(format!(
            "driver: CUDA {version}, kernel module {}",
            kernel_driver_version().unwrap_or_else(|| "unknown".into())
        )),
        None => lines.push("driver: none (libcuda cannot be loaded or initialised)".into()),
    }
    match Nvrtc::shared() {
        Ok(nvrtc) => lines.push(format!(
            "NVRTC used: {}; compiles for sm_{}",
            nvrtc.describe(),
            nvrtc.supported_archs().map_or("?".into(), |archs| archs
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(", sm_"))
        )),
        Err(error) => lines.push(format!("NVRTC used: none: {error:#}")),
    }
    match Cublas::load() {
        Ok(cublas) => lines.push(format!(
            "cuBLAS (benches' yardstick): {}",
            cublas.describe()
        )),
        Err(error) => lines.push(format!(
            "cuBLAS (benches' yardstick): absent: {}",
            format!("{error:#}")
                .lines()
                .map(str::trim)
                .collect::<Vec<_>>()
                .join(" ")
        )),
    }
    for library in [libraries::NVRTC, libraries::CUBLAS] {
        let env = SearchEnv::current(&library);
        let found: Vec<String> = libraries::candidates(&library, &env)
            .into_iter()
            .filter(|c| c.contains('/'))
            .collect();
        lines.push(format!(
            "{} files found ({} first): {}",
            library.what,
            library.variable,
            if found.is_empty() {
                "none".to_string()
            } else {
                found.join(", ")
            }
        ));
    }
    let sites = libraries::python_site_dirs(&SearchEnv::current(&libraries::NVRTC));
    lines.push(format!(
        "Python package folders searched: {}",
        if sites.is_empty() {
            "none".to_string()
        } else {
            sites
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        }
    ));
    lines.join("\n")
}

/// Deterministic pseudo-random numbers (xorshift64*), uniform in [-1, 1).
pub struct Numbers(pub u64);

impl Numbers {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    pub fn floats(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.uniform()).collect()
    }
    pub fn bf16s(&mut self, n: usize) -> Vec<half::bf16> {
        (0..n)
            .map(|_| half::bf16::from_f32(self.uniform()))
            .collect()
    }
}
