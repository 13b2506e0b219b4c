//! NVRTC: compiles the embedded kernels/*.cu, with every kernels/*.cuh passed as a named header
//! (NVRTC sees no file system), to a cubin for the device's own architecture (what the GPU
//! loads: the driver never JIT-compiles PTX, so a PTX version newer than the driver cannot
//! stop a run) or to PTX (the ptxas resource report), and caches the output on disk.
//!
//! kvlab loads NVRTC itself instead of through cudarc, whose library search knows
//! `libnvrtc.so.12` but not `libnvrtc.so.13` (the only one on CUDA 13 machines); where it looks
//! is [`super::libraries`]. With a driver present, the first NVRTC whose cubins that driver can
//! load is taken ([`cubin_compatible`]): CUDA's minor-version compatibility lets a 13.0 driver
//! load what NVRTC 13.2 compiles, but not what NVRTC 14 does.
//!
//! The cache key is (source, headers, options, output, NVRTC version); the cache lives in
//! `$KVLAB_CACHE/nvrtc` or `<user cache dir>/kvlab/nvrtc`. Nothing ever reads a stale entry: any
//! change of the key changes the file name.
use std::ffi::{c_char, c_int, CStr, CString};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{bail, ensure, Context, Result};
use sha2::{Digest, Sha256};

use super::device::{KernelSource, KERNELS, KERNEL_HEADERS, KERNEL_SOURCES};
use super::libraries::{self, SearchEnv};

/// Architectures the kernels must compile for.
pub const TARGET_ARCHES: [&str; 2] = ["sm_80", "sm_90"];

/// A CUDA version, as NVRTC (`nvrtcVersion`) and the driver (`cuDriverGetVersion`) report it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct CudaVersion {
    pub major: i32,
    pub minor: i32,
}

impl CudaVersion {
    /// From the driver's encoding, 1000 * major + 10 * minor (13000 = 13.0).
    pub fn from_driver_code(code: i32) -> CudaVersion {
        CudaVersion {
            major: code / 1000,
            minor: code % 1000 / 10,
        }
    }
}

impl std::fmt::Display for CudaVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// Whether a driver of CUDA `driver` loads the cubins NVRTC `nvrtc` compiles: an NVRTC of the
/// driver's major version or older (minor-version compatibility covers a newer minor).
pub fn cubin_compatible(nvrtc: CudaVersion, driver: CudaVersion) -> Result<()> {
    ensure!(
        nvrtc.major <= driver.major,
        "NVRTC {nvrtc} is newer than the CUDA driver (CUDA {driver}): a CUDA {driver} driver \
         cannot load what an NVRTC of CUDA {} compiles; point KVLAB_NVRTC at a libnvrtc.so.{} \
         (or older), or update the driver",
        nvrtc.major,
        driver.major
    );
    Ok(())
}

/// What NVRTC is asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// Machine code for one real architecture (`--gpu-architecture=sm_NN`): what a GPU loads.
    Cubin,
    /// PTX for the matching virtual architecture (`compute_NN`): what ptxas reports on.
    Ptx,
}

impl Output {
    fn extension(self) -> &'static str {
        match self {
            Output::Cubin => "cubin",
            Output::Ptx => "ptx",
        }
    }
}

const NVRTC_SUCCESS: c_int = 0;

type NvrtcProgram = *mut std::ffi::c_void;
type VersionFn = unsafe extern "C" fn(*mut c_int, *mut c_int) -> c_int;
type CreateProgramFn = unsafe extern "C" fn(
    *mut NvrtcProgram,
    *const c_char,
    *const c_char,
    c_int,
    *const *const c_char,
    *const *const c_char,
) -> c_int;
type CompileProgramFn = unsafe extern "C" fn(NvrtcProgram, c_int, *const *const c_char) -> c_int;
type SizeFn = unsafe extern "C" fn(NvrtcProgram, *mut usize) -> c_int;
type GetTextFn = unsafe extern "C" fn(NvrtcProgram, *mut c_char) -> c_int;
type DestroyProgramFn = unsafe extern "C" fn(*mut NvrtcProgram) -> c_int;
type ErrorStringFn = unsafe extern "C" fn(c_int) -> *const c_char;
type ArchCountFn = unsafe extern "C" fn(*mut c_int) -> c_int;
type ArchListFn = unsafe extern "C" fn(*mut c_int) -> c_int;

/// A loaded NVRTC library.
pub struct Nvrtc {
    library_path: String,
    version: CudaVersion,
    create_program: CreateProgramFn,
    compile_program: CompileProgramFn,
    get_ptx_size: SizeFn,
    get_ptx: GetTextFn,
    get_cubin_size: SizeFn,
    get_cubin: GetTextFn,
    get_log_size: SizeFn,
    get_log: GetTextFn,
    destroy_program: DestroyProgramFn,
    error_string: ErrorStringFn,
    /// `nvrtcGetNumSupportedArchs` / `nvrtcGetSupportedArchs` (CUDA 11.2 and newer).
    supported_archs: Option<(ArchCountFn, ArchListFn)>,
    // Keeps the function pointers above valid.
    _library: libloading::Library,
}

fn repo_cuda_tools() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(".cuda-tools")
}

/// Where NVRTC is looked for, in order (see [`super::libraries`]).
pub fn nvrtc_candidates() -> Vec<String> {
    libraries::candidates(&libraries::NVRTC, &SearchEnv::current(&libraries::NVRTC))
}

impl Nvrtc {
    /// Loads the first NVRTC of [`nvrtc_candidates`] whose cubins a driver of CUDA `driver`
    /// loads (any NVRTC when `driver` is None: no GPU here).
    pub fn load(driver: Option<CudaVersion>) -> Result<Nvrtc> {
        let candidates = nvrtc_candidates();
        let mut failures = Vec::new();
        for candidate in &candidates {
            let loaded = Self::load_from(candidate).and_then(|nvrtc| match driver {
                Some(driver) => cubin_compatible(nvrtc.version, driver).map(|()| nvrtc),
                None => Ok(nvrtc),
            });
            match loaded {
                Ok(nvrtc) => return Ok(nvrtc),
                Err(error) => failures.push(format!("{candidate}: {error:#}")),
            }
        }
        bail!(
            "no usable NVRTC{} (run scripts/setup-cuda-tools.sh or set \
             KVLAB_NVRTC=/path/to/libnvrtc.so.N); tried:\n  {}",
            driver.map_or(String::new(), |d| format!(" for a CUDA {d} driver")),
            failures.join("\n  ")
        )
    }

    /// The process-wide NVRTC, loaded once: the first one the machine's driver can use (any,
    /// without a driver).
    pub fn shared() -> Result<&'static Nvrtc> {
        static SHARED: OnceLock<Result<Nvrtc, String>> = OnceLock::new();
        SHARED
            .get_or_init(|| {
                Nvrtc::load(super::gpu::driver_cuda_version()).map_err(|e| format!("{e:#}"))
            })
            .as_ref()
            .map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// Loads the NVRTC at `path` (a path or a name for the dynamic loader).
    pub fn load_from(path: &str) -> Result<Nvrtc> {
        // SAFETY: loading NVRTC runs only its initialisers; the symbols are the documented C API.
        unsafe {
            let library = libloading::Library::new(path)?;
            let version: VersionFn = *library.get(b"nvrtcVersion\0")?;
            let (mut major, mut minor) = (0, 0);
            ensure!(
                version(&mut major, &mut minor) == NVRTC_SUCCESS,
                "nvrtcVersion failed"
            );
            let supported_archs = match (
                library.get::<ArchCountFn>(b"nvrtcGetNumSupportedArchs\0"),
                library.get::<ArchListFn>(b"nvrtcGetSupportedArchs\0"),
            ) {
                (Ok(count), Ok(list)) => Some((*count, *list)),
                _ => None,
            };
            Ok(Nvrtc {
                library_path: path.to_string(),
                version: CudaVersion { major, minor },
                create_program: *library.get(b"nvrtcCreateProgram\0")?,
                compile_program: *library.get(b"nvrtcCompileProgram\0")?,
                get_ptx_size: *library.get(b"nvrtcGetPTXSize\0")?,
                get_ptx: *library.get(b"nvrtcGetPTX\0")?,
                get_cubin_size: *library.get(b"nvrtcGetCUBINSize\0")?,
                get_cubin: *library.get(b"nvrtcGetCUBIN\0")?,
                get_log_size: *library.get(b"nvrtcGetProgramLogSize\0")?,
                get_log: *library.get(b"nvrtcGetProgramLog\0")?,
                destroy_program: *library.get(b"nvrtcDestroyProgram\0")?,
                error_string: *library.get(b"nvrtcGetErrorString\0")?,
                supported_archs,
                _library: library,
            })
        }
    }

    /// The loaded NVRTC's CUDA version.
    pub fn version(&self) -> CudaVersion {
        self.version
    }

    pub fn library_path(&self) -> &str {
        &self.library_path
    }

    /// "NVRTC 12.9 (/path/libnvrtc.so.12)".
    pub fn describe(&self) -> String {
        format!("NVRTC {} ({})", self.version, self.library_path)
    }

    /// The real architectures this NVRTC compiles for (80 = sm_80), when it can say.
    pub fn supported_archs(&self) -> Option<Vec<i32>> {
        let (count, list) = self.supported_archs?;
        // SAFETY: the list has the length the first call reports.
        unsafe {
            let mut n: c_int = 0;
            if count(&mut n) != NVRTC_SUCCESS || n <= 0 {
                return None;
            }
            let mut archs = vec![0 as c_int; n as usize];
            if list(archs.as_mut_ptr()) != NVRTC_SUCCESS {
                return None;
            }
            Some(archs)
        }
    }

    /// An error naming this NVRTC and the device when it cannot compile for `arch` ("sm_90").
    pub fn check_arch(&self, arch: &str, device: &str) -> Result<()> {
        let Some(archs) = self.supported_archs() else {
            return Ok(());
        };
        let number: Option<i32> = arch.strip_prefix("sm_").and_then(|n| n.parse().ok());
        ensure!(
            number.is_some_and(|n| archs.contains(&n)),
            "{} cannot compile for {device} ({arch}): it knows sm_{}; point KVLAB_NVRTC at a \
             newer libnvrtc",
            self.describe(),
            archs
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(", sm_")
        );
        Ok(())
    }

    fn error_text(&self, code: c_int) -> String {
        // SAFETY: nvrtcGetErrorString returns a static C string for any code.
        unsafe {
            CStr::from_ptr((self.error_string)(code))
                .to_string_lossy()
                .into_owned()
        }
    }

    /// Compile options for `arch` ("sm_80", "sm_90"): a cubin for that real architecture, or
    /// PTX for the matching virtual one.
    pub fn options(arch: &str, output: Output) -> Result<Vec<String>> {
        let number = arch
            .strip_prefix("sm_")
            .filter(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric()))
            .with_context(|| format!("architecture {arch:?} is not of the form sm_NN"))?;
        let target = match output {
            Output::Cubin => format!("--gpu-architecture=sm_{number}"),
            Output::Ptx => format!("--gpu-architecture=compute_{number}"),
        };
        Ok(vec![
            target,
            "--std=c++17".to_string(),
            "-default-device".to_string(),
            "-lineinfo".to_string(),
        ])
    }

    /// One kernel source compiled for `arch`, through the cache in [`cache_dir`].
    pub fn compile(&self, source: &KernelSource, arch: &str, output: Output) -> Result<Vec<u8>> {
        self.compile_cached_in(source, arch, output, &cache_dir().join("nvrtc"))
    }

    /// The PTX of one kernel source for `arch` (cached).
    pub fn ptx(&self, source: &KernelSource, arch: &str) -> Result<String> {
        String::from_utf8(self.compile(source, arch, Output::Ptx)?).context("PTX is not UTF-8")
    }

    /// One kernel source compiled for `arch`, from `cache` when compiled before. The cache is an
    /// optimisation: an unwritable directory only costs a recompile next time.
    pub fn compile_cached_in(
        &self,
        source: &KernelSource,
        arch: &str,
        output: Output,
        cache: &Path,
    ) -> Result<Vec<u8>> {
        let options = Self::options(arch, output)?;
        let mut hasher = Sha256::new();
        let headers = KERNEL_HEADERS.iter().map(|h| h.text);
        for part in [source.text]
            .into_iter()
            .chain(headers)
            .chain([options.join(" ").as_str(), &self.version.to_string()])
        {
            hasher.update(part.as_bytes());
            hasher.update([0u8]);
        }
        let digest: String = hasher
            .finalize()
            .iter()
            .take(12)
            .map(|b| format!("{b:02x}"))
            .collect();
        let stem = source.file.trim_end_matches(".cu");
        let cached = cache.join(format!("{stem}-{arch}-{digest}.{}", output.extension()));
        if let Ok(bytes) = std::fs::read(&cached) {
            return Ok(bytes);
        }
        let bytes = self.compile_uncached(source, &options, output)?;
        if std::fs::create_dir_all(cache).is_ok() {
            let temporary = cached.with_extension(format!("tmp{}", std::process::id()));
            if std::fs::write(&temporary, &bytes).is_ok() {
                let _ = std::fs::rename(&temporary, &cached);
            }
        }
        Ok(bytes)
    }

    /// Compiles with NVRTC; on failure the error carries NVRTC's full log.
    pub fn compile_uncached(
        &self,
        source: &KernelSource,
        options: &[String],
        output: Output,
    ) -> Result<Vec<u8>> {
        let text = CString::new(source.text)
            .with_context(|| format!("kernels/{} contains a NUL byte", source.file))?;
        let name = CString::new(source.file)?;
        let header_texts: Vec<CString> = KERNEL_HEADERS
            .iter()
            .map(|h| CString::new(h.text))
            .collect::<Result<_, _>>()?;
        let header_names: Vec<CString> = KERNEL_HEADERS
            .iter()
            .map(|h| CString::new(h.file))
            .collect::<Result<_, _>>()?;
        let header_texts: Vec<*const c_char> = header_texts.iter().map(|h| h.as_ptr()).collect();
        let header_names: Vec<*const c_char> = header_names.iter().map(|h| h.as_ptr()).collect();
        let options: Vec<CString> = options
            .iter()
            .map(|o| CString::new(o.as_str()))
            .collect::<Result<_, _>>()?;
        let option_pointers: Vec<*const c_char> = options.iter().map(|o| o.as_ptr()).collect();
        let mut program: NvrtcProgram = std::ptr::null_mut();
        // SAFETY: every pointer passed lives until the calls return; the program is destroyed below.
        unsafe {
            let code = (self.create_program)(
                &mut program,
                text.as_ptr(),
                name.as_ptr(),
                header_texts.len() as c_int,
                header_texts.as_ptr(),
                header_names.as_ptr(),
            );
            ensure!(
                code == NVRTC_SUCCESS,
                "nvrtcCreateProgram(kernels/{}): {}",
                source.file,
                self.error_text(code)
            );
            let compiled = (self.compile_program)(
                program,
                option_pointers.len() as c_int,
                option_pointers.as_ptr(),
            );
            let log = self.program_log(program);
            let result = if compiled != NVRTC_SUCCESS {
                Err(anyhow::anyhow!(
                    "NVRTC failed to compile kernels/{} ({}; options {:?}):\n{}",
                    source.file,
                    self.error_text(compiled),
                    options,
                    log
                ))
            } else {
                self.program_output(program, output)
                    .with_context(|| format!("reading the {output:?} of kernels/{}", source.file))
            };
            (self.destroy_program)(&mut program);
            result
        }
    }

    unsafe fn program_log(&self, program: NvrtcProgram) -> String {
        let mut size = 0usize;
        if (self.get_log_size)(program, &mut size) != NVRTC_SUCCESS || size == 0 {
            return String::new();
        }
        let mut log = vec![0u8; size];
        if (self.get_log)(program, log.as_mut_ptr().cast()) != NVRTC_SUCCESS {
            return String::new();
        }
        String::from_utf8_lossy(&log[..size - 1]).into_owned()
    }

    /// The compiled PTX (without its NUL) or cubin.
    unsafe fn program_output(&self, program: NvrtcProgram, output: Output) -> Result<Vec<u8>> {
        let (get_size, get, name) = match output {
            Output::Ptx => (self.get_ptx_size, self.get_ptx, "nvrtcGetPTX"),
            Output::Cubin => (self.get_cubin_size, self.get_cubin, "nvrtcGetCUBIN"),
        };
        let mut size = 0usize;
        let code = get_size(program, &mut size);
        ensure!(
            code == NVRTC_SUCCESS,
            "{name}Size: {}",
            self.error_text(code)
        );
        ensure!(size > 0, "{name}Size: NVRTC produced no {output:?}");
        let mut bytes = vec![0u8; size];
        let code = get(program, bytes.as_mut_ptr().cast());
        ensure!(code == NVRTC_SUCCESS, "{name}: {}", self.error_text(code));
        if output == Output::Ptx {
            bytes.truncate(size - 1);
        }
        Ok(bytes)
    }
}

/// kvlab's cache directory: `$KVLAB_CACHE`, else `<user cache dir>/kvlab`.
pub fn cache_dir() -> PathBuf {
    match std::env::var_os("KVLAB_CACHE") {
        Some(dir) => PathBuf::from(dir),
        None => dirs::cache_dir()
            .unwrap_or_else(std::env::temp_dir)
            .join("kvlab"),
    }
}

/// The embedded source that defines `kernel`'s file.
pub fn kernel_source(file: &str) -> Result<&'static KernelSource> {
    KERNEL_SOURCES
        .iter()
        .find(|source| source.file == file)
        .with_context(|| format!("no embedded kernel source kernels/{file}"))
}

/// ptxas: `$KVLAB_PTXAS`, the repository's `.cuda-tools/`, or `ptxas` on the PATH.
pub fn find_ptxas() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("KVLAB_PTXAS") {
        return Some(PathBuf::from(path));
    }
    let local = repo_cuda_tools().join("nvidia/cuda_nvcc/bin/ptxas");
    if local.exists() {
        return Some(local);
    }
    let on_path = std::env::var_os("PATH")?;
    std::env::split_paths(&on_path)
        .map(|dir| dir.join("ptxas"))
        .find(|path| path.exists())
}

/// What ptxas reports for one kernel on one architecture.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelResources {
    pub kernel: String,
    pub arch: String,
    pub registers: u32,
    pub spill_stores_bytes: u32,
    pub spill_loads_bytes: u32,
    pub stack_frame_bytes: u32,
    pub shared_bytes: u32,
}

/// Runs `ptxas -v` over the PTX of every kernel source for each arch.
pub fn kernel_resources(
    nvrtc: &Nvrtc,
    ptxas: &Path,
    arches: &[&str],
) -> Result<Vec<KernelResources>> {
    let work_dir = std::env::temp_dir().join(format!("kvlab-ptxas-{}", std::process::id()));
    std::fs::create_dir_all(&work_dir)
        .with_context(|| format!("creating {}", work_dir.display()))?;
    let mut rows = Vec::new();
    for &arch in arches {
        for source in KERNEL_SOURCES {
            let ptx = nvrtc.ptx(source, arch)?;
            let ptx_path = work_dir.join(format!(
                "{}-{arch}.ptx",
                source.file.trim_end_matches(".cu")
            ));
            std::fs::write(&ptx_path, &ptx)
                .with_context(|| format!("writing {}", ptx_path.display()))?;
            let output = Command::new(ptxas)
                .arg("-v")
                .arg(format!("--gpu-name={arch}"))
                .arg(&ptx_path)
                .arg("-o")
                .arg("/dev/null")
                .output()
                .with_context(|| format!("running {}", ptxas.display()))?;
            let log = String::from_utf8_lossy(&output.stderr);
            ensure!(
                output.status.success(),
                "ptxas failed on kernels/{} for {arch}:\n{log}",
                source.file
            );
            rows.extend(parse_ptxas_log(&log, arch));
        }
    }
    let _ = std::fs::remove_dir_all(&work_dir);
    // ptxas lists entries in reverse; keep kvlab's table order within each arch.
    let position = |name: &str| {
        KERNELS
            .iter()
            .position(|k| k.name == name)
            .unwrap_or(usize::MAX)
    };
    rows.sort_by_key(|row| {
        (
            arches.iter().position(|a| *a == row.arch),
            position(&row.kernel),
        )
    });
    Ok(rows)
}

/// Parses `ptxas -v` output: "Compiling entry function 'NAME'", "N bytes stack frame, N bytes
/// spill stores, N bytes spill loads", "Used N registers, N bytes smem, ...".
pub fn parse_ptxas_log(log: &str, arch: &str) -> Vec<KernelResources> {
    fn number_before(text: &str, unit: &str) -> Option<u32> {
        let end = text.find(unit)?;
        text[..end].split_whitespace().last()?.parse().ok()
    }
    let mut rows: Vec<KernelResources> = Vec::new();
    for line in log.lines() {
        if let Some(start) = line.find("Compiling entry function '") {
            let name = &line[start + "Compiling entry function '".len()..];
            let name = name.split('\'').next().unwrap_or_default();
            rows.push(KernelResources {
                kernel: name.to_string(),
                arch: arch.to_string(),
                ..Default::default()
            });
        } else if let Some(row) = rows.last_mut() {
            if line.contains("bytes stack frame") {
                row.stack_frame_bytes = number_before(line, "bytes stack frame").unwrap_or(0);
                row.spill_stores_bytes = number_before(line, "bytes spill stores").unwrap_or(0);
                row.spill_loads_bytes = number_before(line, "bytes spill loads").unwrap_or(0);
            } else if line.contains("Used") && line.contains("registers") {
                row.registers = number_before(line, "registers").unwrap_or(0);
                row.shared_bytes = number_before(line, "bytes smem").unwrap_or(0);
            }
        }
    }
    rows
}

/// The resource table as aligned text, one line per kernel and arch.
pub fn format_kernel_resources(rows: &[KernelResources]) -> String {
    let width = rows
        .iter()
        .map(|r| r.kernel.len())
        .max()
        .unwrap_or(6)
        .max(6);
    let mut out = format!(
        "{:<width$}  {:<5}  {:>9}  {:>12}  {:>11}  {:>11}  {:>10}\n",
        "kernel", "arch", "registers", "spill stores", "spill loads", "stack frame", "smem bytes"
    );
    for row in rows {
        out.push_str(&format!(
            "{:<width$}  {:<5}  {:>9}  {:>12}  {:>11}  {:>11}  {:>10}\n",
            row.kernel,
            row.arch,
            row.registers,
            row.spill_stores_bytes,
            row.spill_loads_bytes,
            row.stack_frame_bytes,
            row.shared_bytes
        ));
    }
    out
}

/// Registers, spills and shared memory of every kernel for sm_80 and sm_90 (the
/// `kernel-report` command): NVRTC from [`Nvrtc::shared`], ptxas from [`find_ptxas`].
pub fn kernel_report() -> Result<String> {
    let nvrtc = Nvrtc::shared()?;
    let ptxas =
        find_ptxas().context("no ptxas: run scripts/setup-cuda-tools.sh or set KVLAB_PTXAS")?;
    let rows = kernel_resources(nvrtc, &ptxas, &TARGET_ARCHES)?;
    Ok(format!(
        "{}, {}\n{}",
        nvrtc.describe(),
        ptxas.display(),
        format_kernel_resources(&rows)
    ))
}
