//! Where kvlab looks for the CUDA libraries it loads at run time: NVRTC (the kernels' compiler)
//! and cuBLAS (only the benches' yardstick). Neither is linked, so a binary built here runs on
//! any machine that has them somewhere, in any of these places, in this order:
//!
//! 1. the path in the library's variable (`KVLAB_NVRTC`, `KVLAB_CUBLAS`), and then nothing else:
//!    a library named explicitly either loads or is an error naming it;
//! 2. the repository's `.cuda-tools/nvidia/*/lib` (scripts/setup-cuda-tools.sh);
//! 3. a CUDA toolkit: `$CUDA_HOME`, `$CUDA_PATH`, `/usr/local/cuda` (`lib64`,
//!    `targets/x86_64-linux/lib`);
//! 4. the `nvidia/*/lib` folders of Python's site-packages, where PyPI's CUDA wheels put them
//!    (`nvidia/cu13/lib` for CUDA 13, `nvidia/cuda_nvrtc/lib` and `nvidia/cublas/lib` for 12):
//!    of `$VIRTUAL_ENV`, of every `python3` on the `PATH` (a venv's `bin/python3` means its
//!    `lib/python3.*/site-packages`), of the venvs `/opt/*/.venv` and `/opt/*/venv` (where
//!    images install torch), `~/.local` and the system's `dist-packages`;
//! 5. the bare names, for the dynamic loader (`LD_LIBRARY_PATH`, the ldconfig cache).
//!
//! Within 2-5 the newest major version comes first: `libnvrtc.so.13` anywhere before
//! `libnvrtc.so.12` anywhere.
use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// A library kvlab loads: its override variable and its file names, newest first.
#[derive(Clone, Copy, Debug)]
pub struct Library {
    pub what: &'static str,
    pub variable: &'static str,
    pub names: &'static [&'static str],
}

pub const NVRTC: Library = Library {
    what: "NVRTC",
    variable: "KVLAB_NVRTC",
    names: &["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"],
};

pub const CUBLAS: Library = Library {
    what: "cuBLAS",
    variable: "KVLAB_CUBLAS",
    names: &["libcublas.so.13", "libcublas.so.12", "libcublas.so"],
};

/// The environment the search reads, so that tests can give their own.
#[derive(Clone, Debug, Default)]
pub struct SearchEnv {
    pub override_path: Option<OsString>,
    pub path: Option<OsString>,
    pub virtual_env: Option<OsString>,
    pub cuda_home: Vec<OsString>,
    pub home: Option<PathBuf>,
    /// The repository's `.cuda-tools` (absent on a machine the binary was carried to).
    pub cuda_tools: Option<PathBuf>,
    /// Folders whose `*/.venv` and `*/venv` are Python prefixes (`/opt`).
    pub venv_parents: Vec<PathBuf>,
    /// Folders holding `python3.*/{site,dist}-packages` that are always looked at.
    pub system_python_libs: Vec<PathBuf>,
}

impl SearchEnv {
    /// This process's environment.
    pub fn current(library: &Library) -> SearchEnv {
        SearchEnv {
            override_path: std::env::var_os(library.variable),
            path: std::env::var_os("PATH"),
            virtual_env: std::env::var_os("VIRTUAL_ENV"),
            cuda_home: ["CUDA_HOME", "CUDA_PATH"]
                .iter()
                .filter_map(std::env::var_os)
                .collect(),
            home: dirs::home_dir(),
            cuda_tools: Some(Path::new(env!("CARGO_MANIFEST_DIR")).join(".cuda-tools")),
            venv_parents: vec![PathBuf::from("/opt")],
            system_python_libs: vec![PathBuf::from("/usr/local/lib"), PathBuf::from("/usr/lib")],
        }
    }
}

/// Folders that may hold CUDA libraries, in search order (see the module's comment), existing
/// ones only, each once.
pub fn library_dirs(env: &SearchEnv) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(tools) = &env.cuda_tools {
        dirs.extend(wheel_lib_dirs(tools));
    }
    let toolkits = env
        .cuda_home
        .iter()
        .map(PathBuf::from)
        .chain([PathBuf::from("/usr/local/cuda")]);
    for toolkit in toolkits {
        dirs.push(toolkit.join("lib64"));
        dirs.push(toolkit.join("targets/x86_64-linux/lib"));
    }
    for site in python_site_dirs(env) {
        dirs.extend(wheel_lib_dirs(&site));
    }
    let mut seen = BTreeSet::new();
    dirs.into_iter()
        .filter(|dir| dir.is_dir())
        .filter(|dir| seen.insert(dir.canonicalize().unwrap_or_else(|_| dir.clone())))
        .collect()
}

/// `root/nvidia/*/lib`, sorted: the layout of PyPI's CUDA wheels (`nvidia/cu13/lib`,
/// `nvidia/cuda_nvrtc/lib`, `nvidia/cublas/lib`, ...).
fn wheel_lib_dirs(root: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root.join("nvidia"))
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.path().join("lib"))
                .filter(|lib| lib.is_dir())
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    dirs
}

/// Python's package folders: `$VIRTUAL_ENV`, the prefix of each `python3` on the `PATH`, the
/// user's `~/.local`, then the system's.
pub fn python_site_dirs(env: &SearchEnv) -> Vec<PathBuf> {
    let mut prefixes: Vec<PathBuf> = env.virtual_env.iter().map(PathBuf::from).collect();
    if let Some(path) = &env.path {
        for dir in std::env::split_paths(path) {
            let python = dir.join("python3");
            if !python.exists() {
                continue;
            }
            // A venv's bin/python3 links to the base interpreter: the venv is the folder above
            // the link, the base installation the one above its target. Both may hold wheels.
            if let Some(prefix) = dir.parent() {
                prefixes.push(prefix.to_path_buf());
            }
            if let Some(prefix) = python
                .canonicalize()
                .ok()
                .and_then(|target| target.parent()?.parent().map(Path::to_path_buf))
            {
                prefixes.push(prefix);
            }
        }
    }
    for parent in &env.venv_parents {
        let Ok(entries) = std::fs::read_dir(parent) else {
            continue;
        };
        let mut venvs: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .flat_map(|e| [e.path().join(".venv"), e.path().join("venv")])
            .filter(|venv| venv.join("pyvenv.cfg").is_file())
            .collect();
        venvs.sort();
        prefixes.extend(venvs);
    }
    if let Some(home) = &env.home {
        prefixes.push(home.join(".local"));
    }
    let mut libs: Vec<PathBuf> = prefixes.iter().map(|p| p.join("lib")).collect();
    libs.extend(env.system_python_libs.iter().cloned());
    let mut sites = Vec::new();
    for lib in libs {
        let Ok(entries) = std::fs::read_dir(&lib) else {
            continue;
        };
        let mut versions: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("python3"))
            })
            .collect();
        versions.sort();
        for version in versions {
            for packages in ["site-packages", "dist-packages"] {
                let site = version.join(packages);
                if site.is_dir() && !sites.contains(&site) {
                    sites.push(site);
                }
            }
        }
    }
    sites
}

/// Every place `library` is tried, in order: the override alone when set, else files found in
/// [`library_dirs`] (newest major first), then bare names for the dynamic loader.
pub fn candidates(library: &Library, env: &SearchEnv) -> Vec<String> {
    if let Some(path) = &env.override_path {
        return vec![path.to_string_lossy().into_owned()];
    }
    let mut candidates = Vec::new();
    let dirs = library_dirs(env);
    for name in library.names {
        for dir in &dirs {
            let path = dir.join(name);
            if path.exists() {
                candidates.push(path.display().to_string());
            }
        }
    }
    candidates.extend(library.names.iter().map(|name| name.to_string()));
    candidates
}
