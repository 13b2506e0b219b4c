//! cuBLAS as a yardstick for the benches (never in the model path): `cublasGemmEx` on bf16
//! with f32 accumulation, loaded at run time like NVRTC, since cudarc's library names stop at
//! `libcublas.so.12` and CUDA 13 machines have only `.so.13`. Where it is looked for:
//! [`super::libraries`] (`KVLAB_CUBLAS`, a toolkit, Python's `nvidia/*/lib`, the loader).
use std::ffi::{c_int, c_void};

use anyhow::{bail, ensure, Result};

use super::libraries::{self, SearchEnv};

type Handle = *mut c_void;
type CreateFn = unsafe extern "C" fn(*mut Handle) -> c_int;
type DestroyFn = unsafe extern "C" fn(Handle) -> c_int;
type SetStreamFn = unsafe extern "C" fn(Handle, *mut c_void) -> c_int;
type GetPropertyFn = unsafe extern "C" fn(c_int, *mut c_int) -> c_int;
#[allow(clippy::type_complexity)]
type GemmExFn = unsafe extern "C" fn(
    Handle,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    *const c_void,
    *const c_void,
    c_int,
    c_int,
    *const c_void,
    c_int,
    c_int,
    *const c_void,
    *mut c_void,
    c_int,
    c_int,
    c_int,
    c_int,
) -> c_int;

const CUBLAS_STATUS_SUCCESS: c_int = 0;
const CUBLAS_OP_N: c_int = 0;
const CUBLAS_OP_T: c_int = 1;
const CUDA_R_32F: c_int = 0;
const CUDA_R_16BF: c_int = 14;
const CUBLAS_COMPUTE_32F: c_int = 68;
const CUBLAS_GEMM_DEFAULT: c_int = -1;

/// A loaded cuBLAS library.
pub struct Cublas {
    library_path: String,
    /// (major, minor, patch) from `cublasGetProperty`.
    version: (i32, i32, i32),
    create: CreateFn,
    destroy: DestroyFn,
    set_stream: SetStreamFn,
    gemm_ex: GemmExFn,
    // Keeps the function pointers above valid.
    _library: libloading::Library,
}

impl Cublas {
    /// The first cuBLAS of the search that loads; the error lists every place tried.
    pub fn load() -> Result<Cublas> {
        let candidates =
            libraries::candidates(&libraries::CUBLAS, &SearchEnv::current(&libraries::CUBLAS));
        let mut failures = Vec::new();
        for candidate in &candidates {
            match Self::load_from(candidate) {
                Ok(cublas) => return Ok(cublas),
                Err(error) => failures.push(format!("{candidate}: {error:#}")),
            }
        }
        bail!(
            "no cuBLAS found (set KVLAB_CUBLAS=/path/to/libcublas.so.N); tried:\n  {}",
            failures.join("\n  ")
        )
    }

    fn load_from(path: &str) -> Result<Cublas> {
        // SAFETY: loading cuBLAS runs only its initialisers; the symbols are its documented C API.
        unsafe {
            let library = libloading::Library::new(path)?;
            let get_property: GetPropertyFn = *library.get(b"cublasGetProperty\0")?;
            let mut version = [0 as c_int; 3];
            for (which, slot) in version.iter_mut().enumerate() {
                ensure!(
                    get_property(which as c_int, slot) == CUBLAS_STATUS_SUCCESS,
                    "cublasGetProperty failed"
                );
            }
            Ok(Cublas {
                library_path: path.to_string(),
                version: (version[0], version[1], version[2]),
                create: *library.get(b"cublasCreate_v2\0")?,
                destroy: *library.get(b"cublasDestroy_v2\0")?,
                set_stream: *library.get(b"cublasSetStream_v2\0")?,
                gemm_ex: *library.get(b"cublasGemmEx\0")?,
                _library: library,
            })
        }
    }

    /// "cuBLAS 13.0.2 (/path/libcublas.so.13)".
    pub fn describe(&self) -> String {
        let (major, minor, patch) = self.version;
        format!("cuBLAS {major}.{minor}.{patch} ({})", self.library_path)
    }

    /// A handle issuing on `stream`.
    ///
    /// # Safety
    /// `stream` must be a live `CUstream` of the context current on this thread.
    pub unsafe fn handle(&self, stream: *mut c_void) -> Result<CublasHandle<'_>> {
        let mut handle: Handle = std::ptr::null_mut();
        // SAFETY: cublasCreate writes the handle; it is destroyed by CublasHandle's drop.
        let status = unsafe { (self.create)(&mut handle) };
        ensure!(
            status == CUBLAS_STATUS_SUCCESS,
            "cublasCreate failed with status {status} (is a CUDA context current?)"
        );
        let handle = CublasHandle {
            cublas: self,
            handle,
        };
        // SAFETY: the caller's contract.
        let status = unsafe { (self.set_stream)(handle.handle, stream) };
        ensure!(
            status == CUBLAS_STATUS_SUCCESS,
            "cublasSetStream failed with status {status}"
        );
        Ok(handle)
    }
}

/// A cuBLAS handle, destroyed on drop.
pub struct CublasHandle<'a> {
    cublas: &'a Cublas,
    handle: Handle,
}

impl Drop for CublasHandle<'_> {
    fn drop(&mut self) {
        // SAFETY: created by cublasCreate, destroyed once.
        unsafe { (self.cublas.destroy)(self.handle) };
    }
}

impl CublasHandle<'_> {
    /// out[m, n] = a[m, k] . w[n, k]^T, row-major, bf16 inputs, f32 accumulation, out in f32 or
    /// bf16: kvlab's matmul. Column-major that is out^T[n, m] = w[n, k] . a^T[k, m], gemm(T, N)
    /// with w first.
    ///
    /// # Safety
    /// The addresses must be device allocations of the current context holding at least
    /// `m * k`, `n * k` and `m * n` elements.
    pub unsafe fn gemm_bf16(
        &self,
        (m, n, k): (usize, usize, usize),
        a: u64,
        w: u64,
        out: u64,
        f32_out: bool,
    ) -> Result<()> {
        let (alpha, beta) = (1.0f32, 0.0f32);
        let status = (self.cublas.gemm_ex)(
            self.handle,
            CUBLAS_OP_T,
            CUBLAS_OP_N,
            n as c_int,
            m as c_int,
            k as c_int,
            (&alpha as *const f32).cast(),
            w as *const c_void,
            CUDA_R_16BF,
            k as c_int,
            a as *const c_void,
            CUDA_R_16BF,
            k as c_int,
            (&beta as *const f32).cast(),
            out as *mut c_void,
            if f32_out { CUDA_R_32F } else { CUDA_R_16BF },
            n as c_int,
            CUBLAS_COMPUTE_32F,
            CUBLAS_GEMM_DEFAULT,
        );
        ensure!(
            status == CUBLAS_STATUS_SUCCESS,
            "cublasGemmEx ({m} x {n} x {k}) failed with status {status}"
        );
        Ok(())
    }
}
