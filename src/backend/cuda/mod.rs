//! CUDA backend: real GPU through cudarc, or the CPU emulator of CUDA semantics.
//!
//! - [`device`]: the [`Device`] interface the backend is written against, kernel signatures.
//! - [`gpu`]: [`Device`] on a real GPU (cudarc driver API, NVRTC-compiled cubins).
//! - [`emu`]: [`Device`] on the CPU: kernels/*.cu compiled for the host, run with CUDA's semantics.
//! - [`nvrtc`]: NVRTC loading, compilation, the compile cache, the ptxas resource report;
//!   [`libraries`] where NVRTC and cuBLAS are looked for; [`cublas`] the benches' yardstick.
//! - [`backend`]: [`CudaBackend`], kvlab's kernels behind the `Backend` trait, over a [`Device`];
//!   [`kernels`] its typed launches, [`graph`] CUDA graphs for repeated steps, [`memory`] the
//!   accounting of device memory and the KV chunk pool.
pub mod backend;
pub mod cublas;
pub mod device;
pub mod emu;
pub mod gpu;
pub mod graph;
pub mod kernels;
pub mod libraries;
pub mod memory;
pub mod nvrtc;

use std::str::FromStr;
use std::sync::Arc;

use anyhow::{bail, Result};

pub use backend::{CudaBackend, CudaOptions, CudaWeight};
pub use device::{Device, DeviceBuffer, DeviceMemory, Event, Graph, KernelArg, LaunchConfig};
pub use gpu::cuda_device_present;

/// `--backend auto|cpu|cuda|emu`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    /// CUDA when a driver and a device are present, else CPU.
    Auto,
    /// The CPU backend (no device).
    Cpu,
    /// A real GPU; an error without one.
    Cuda,
    /// The CUDA backend on the CPU emulator: for tests and kernel debugging, slow by design.
    Emu,
}

impl FromStr for BackendKind {
    type Err = anyhow::Error;

    fn from_str(text: &str) -> Result<Self> {
        match text {
            "auto" => Ok(BackendKind::Auto),
            "cpu" => Ok(BackendKind::Cpu),
            "cuda" => Ok(BackendKind::Cuda),
            "emu" => Ok(BackendKind::Emu),
            other => bail!("unknown backend {other:?}: expected auto, cpu, cuda or emu"),
        }
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackendKind::Auto => "auto",
            BackendKind::Cpu => "cpu",
            BackendKind::Cuda => "cuda",
            BackendKind::Emu => "emu",
        })
    }
}

impl BackendKind {
    /// The concrete backend (never `Auto`) and why it was chosen.
    pub fn resolve(self) -> (BackendKind, String) {
        match self {
            BackendKind::Auto if cuda_device_present() => (
                BackendKind::Cuda,
                "auto: a CUDA driver and device are present".to_string(),
            ),
            BackendKind::Auto => (
                BackendKind::Cpu,
                "auto: no CUDA driver or no CUDA device".to_string(),
            ),
            other => (other, format!("{other}: chosen explicitly")),
        }
    }
}

/// The device for a CUDA-backed kind (`Auto` resolves first). `Cpu` has no device.
pub fn open_device(kind: BackendKind) -> Result<Arc<dyn Device>> {
    match kind.resolve().0 {
        BackendKind::Cuda => {
            if !cuda_device_present() {
                bail!("--backend cuda: no CUDA driver or no CUDA device on this machine (try --backend emu)");
            }
            Ok(Arc::new(gpu::GpuDevice::open(0)?))
        }
        BackendKind::Emu => Ok(Arc::new(emu::EmuDevice::new()?)),
        BackendKind::Cpu => bail!("the cpu backend has no CUDA device"),
        BackendKind::Auto => unreachable!("resolve() never returns Auto"),
    }
}
