//! NVRTC: compiles the embedded kernels/*.cu to PTX, with every kernels/*.cuh passed as a named
//! header (NVRTC sees no file system), and caches the PTX on disk.
//!
//! kvlab loads NVRTC itself instead of through cudarc, whose library search knows
//! `libnvrtc.so.12` but not `libnvrtc.so.13` (the only one on CUDA 13 machines). Search order:
//! `$KVLAB_NVRTC` (a path), the repository's `.cuda-tools/` (scripts/setup-cuda-tools.sh), the
//! usual CUDA install directories, then the dynamic loader's path by name, newest major first.
//!
//! The PTX cache key is (source, headers, options, arch, NVRTC version); the cache lives in
//! `$KVLAB_CACHE/ptx` or `<user cache dir>/kvlab/ptx`. Nothing ever reads a stale entry: any
//! change of the key changes the file name.
use std::ffi::{c_char, c_int, CStr, CString};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{bail, ensure, Context, Result};
use sha2::{Digest, Sha256};

use super::device::{KernelSource, KERNELS, KERNEL_HEADERS, KERNEL_SOURCES};

/// Architectures the kernels must compile for.
pub const TARGET_ARCHES: [&str; 2] = ["sm_80", "sm_90"];

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

/// A loaded NVRTC library.
pub struct Nvrtc {
    library_path: String,
    version: (i32, i32),
    create_program: CreateProgramFn,
    compile_program: CompileProgramFn,
    get_ptx_size: SizeFn,
    get_ptx: GetTextFn,
    get_log_size: SizeFn,
    get_log: GetTextFn,
    destroy_program: DestroyProgramFn,
    error_string: ErrorStringFn,
    // Keeps the function pointers above valid.
    _library: libloading::Library,
}

fn repo_cuda_tools() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(".cuda-tools")
}

/// Where NVRTC is looked for, in order.
pub fn nvrtc_candidates() -> Vec<String> {
    let mut candidates = Vec::new();
    if let Ok(path) = std::env::var("KVLAB_NVRTC") {
        candidates.push(path);
    }
    let names = ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"];
    let tools = repo_cuda_tools().join("nvidia");
    let mut tool_dirs: Vec<PathBuf> = std::fs::read_dir(&tools)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.path().join("lib"))
                .collect()
        })
        .unwrap_or_default();
    tool_dirs.sort();
    let system_dirs = [
        "/usr/local/cuda/lib64",
        "/usr/local/cuda/targets/x86_64-linux/lib",
    ];
    for name in names {
        for dir in tool_dirs
            .iter()
            .map(PathBuf::as_path)
            .chain(system_dirs.iter().map(Path::new))
        {
            let path = dir.join(name);
            if path.exists() {
                candidates.push(path.display().to_string());
            }
        }
    }
    candidates.extend(names.iter().map(|name| name.to_string()));
    candidates
}

impl Nvrtc {
    /// Loads the first NVRTC of [`nvrtc_candidates`].
    pub fn load() -> Result<Nvrtc> {
        let candidates = nvrtc_candidates();
        let mut failures = Vec::new();
        for candidate in &candidates {
            match Self::load_from(candidate) {
                Ok(nvrtc) => return Ok(nvrtc),
                Err(error) => failures.push(format!("{candidate}: {error:#}")),
            }
        }
        bail!(
            "no usable NVRTC (run scripts/setup-cuda-tools.sh or set KVLAB_NVRTC=/path/to/libnvrtc.so.N); tried:\n  {}",
            failures.join("\n  ")
        )
    }

    /// The process-wide NVRTC, loaded once.
    pub fn shared() -> Result<&'static Nvrtc> {
        static SHARED: OnceLock<Result<Nvrtc, String>> = OnceLock::new();
        SHARED
            .get_or_init(|| Nvrtc::load().map_err(|e| format!("{e:#}")))
            .as_ref()
            .map_err(|e| anyhow::anyhow!("{e}"))
    }

    fn load_from(path: &str) -> Result<Nvrtc> {
        // SAFETY: loading NVRTC runs only its initialisers; the symbols are the documented C API.
        unsafe {
            let library = libloading::Library::new(path)?;
            let version: VersionFn = *library.get(b"nvrtcVersion\0")?;
            let (mut major, mut minor) = (0, 0);
            ensure!(
                version(&mut major, &mut minor) == NVRTC_SUCCESS,
                "nvrtcVersion failed"
            );
            Ok(Nvrtc {
                library_path: path.to_string(),
                version: (major, minor),
                create_program: *library.get(b"nvrtcCreateProgram\0")?,
                compile_program: *library.get(b"nvrtcCompileProgram\0")?,
                get_ptx_size: *library.get(b"nvrtcGetPTXSize\0")?,
                get_ptx: *library.get(b"nvrtcGetPTX\0")?,
                get_log_size: *library.get(b"nvrtcGetProgramLogSize\0")?,
                get_log: *library.get(b"nvrtcGetProgramLog\0")?,
                destroy_program: *library.get(b"nvrtcDestroyProgram\0")?,
                error_string: *library.get(b"nvrtcGetErrorString\0")?,
                _library: library,
            })
        }
    }

    /// (major, minor) of the loaded NVRTC.
    pub fn version(&self) -> (i32, i32) {
        self.version
    }

    pub fn library_path(&self) -> &str {
        &self.library_path
    }

    /// "NVRTC 12.9 (/path/libnvrtc.so.12)".
    pub fn describe(&self) -> String {
        format!(
            "NVRTC {}.{} ({})",
            self.version.0, self.version.1, self.library_path
        )
    }

    fn error_text(&self, code: c_int) -> String {
        // SAFETY: nvrtcGetErrorString returns a static C string for any code.
        unsafe {
            CStr::from_ptr((self.error_string)(code))
                .to_string_lossy()
                .into_owned()
        }
    }

    /// Compile options for `arch` ("sm_80", "sm_90"): PTX for the matching virtual architecture,
    /// which the driver JIT-compiles for the device it runs on.
    pub fn options(arch: &str) -> Result<Vec<String>> {
        let number = arch
            .strip_prefix("sm_")
            .filter(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric()))
            .with_context(|| format!("architecture {arch:?} is not of the form sm_NN"))?;
        Ok(vec![
            format!("--gpu-architecture=compute_{number}"),
            "--std=c++17".to_string(),
            "-default-device".to_string(),
            "-lineinfo".to_string(),
        ])
    }

    /// PTX of one kernel source for `arch`, through the PTX cache in [`cache_dir`].
    pub fn compile(&self, source: &KernelSource, arch: &str) -> Result<String> {
        self.compile_cached_in(source, arch, &cache_dir().join("ptx"))
    }

    /// PTX of one kernel source for `arch`, from `ptx_dir` when compiled before. The cache is an
    /// optimisation: an unwritable directory only costs a recompile next time.
    pub fn compile_cached_in(
        &self,
        source: &KernelSource,
        arch: &str,
        ptx_dir: &Path,
    ) -> Result<String> {
        let options = Self::options(arch)?;
        let mut hasher = Sha256::new();
        let headers = KERNEL_HEADERS.iter().map(|h| h.text);
        for part in [source.text]
            .into_iter()
            .chain(headers)
            .chain([options.join(" ").as_str(), &format!("{:?}", self.version)])
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
        let cached = ptx_dir.join(format!("{stem}-{arch}-{digest}.ptx"));
        if let Ok(ptx) = std::fs::read_to_string(&cached) {
            return Ok(ptx);
        }
        let ptx = self.compile_uncached(source, &options)?;
        if std::fs::create_dir_all(ptx_dir).is_ok() {
            let temporary = cached.with_extension(format!("tmp{}", std::process::id()));
            if std::fs::write(&temporary, &ptx).is_ok() {
                let _ = std::fs::rename(&temporary, &cached);
            }
        }
        Ok(ptx)
    }

    /// Compiles with NVRTC; on failure the error carries NVRTC's full log.
    pub fn compile_uncached(&self, source: &KernelSource, options: &[String]) -> Result<String> {
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
                self.program_ptx(program)
                    .with_context(|| format!("reading the PTX of kernels/{}", source.file))
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

    unsafe fn program_ptx(&self, program: NvrtcProgram) -> Result<String> {
        let mut size = 0usize;
        let code = (self.get_ptx_size)(program, &mut size);
        ensure!(
            code == NVRTC_SUCCESS,
            "nvrtcGetPTXSize: {}",
            self.error_text(code)
        );
        let mut ptx = vec![0u8; size];
        let code = (self.get_ptx)(program, ptx.as_mut_ptr().cast());
        ensure!(
            code == NVRTC_SUCCESS,
            "nvrtcGetPTX: {}",
            self.error_text(code)
        );
        ptx.truncate(size.saturating_sub(1));
        String::from_utf8(ptx).context("PTX is not UTF-8")
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
            let ptx = nvrtc.compile(source, arch)?;
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
