//! The kernels compile for real: every kernels/*.cu through NVRTC for sm_80 and sm_90, to PTX
//! (ptxas then reports registers, spills and shared memory per kernel) and to the cubins a GPU
//! loads; and how NVRTC and cuBLAS are found (Python venv layouts included) and matched to the
//! driver.
//!
//! Without NVRTC (or ptxas) a test prints why it skips; under `CI=true` it fails instead.
//! scripts/setup-cuda-tools.sh installs both into .cuda-tools/, where kvlab finds them.
use kvlab::backend::cuda::device::{KernelSource, KERNELS, KERNEL_SOURCES};
use kvlab::backend::cuda::libraries::{self, SearchEnv};
use kvlab::backend::cuda::nvrtc::{
    cubin_compatible, find_ptxas, format_kernel_resources, kernel_resources, parse_ptxas_log,
    CudaVersion, KernelResources, Nvrtc, Output, TARGET_ARCHES,
};
use std::path::Path;

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

fn nvrtc_or_skip() -> Option<&'static Nvrtc> {
    match Nvrtc::shared() {
        Ok(nvrtc) => Some(nvrtc),
        Err(error) if in_ci() => panic!("CI=true needs NVRTC: {error:#}"),
        Err(error) => {
            eprintln!("skipped: {error:#}");
            None
        }
    }
}

#[test]
fn every_kernel_compiles_for_sm80_and_sm90() {
    let Some(nvrtc) = nvrtc_or_skip() else { return };
    eprintln!("{}", nvrtc.describe());
    assert!(!KERNEL_SOURCES.is_empty());
    for source in KERNEL_SOURCES {
        for arch in TARGET_ARCHES {
            let options = Nvrtc::options(arch, Output::Ptx).unwrap();
            let ptx = nvrtc
                .compile_uncached(source, &options, Output::Ptx)
                .unwrap_or_else(|e| panic!("{e:#}"));
            let ptx = String::from_utf8(ptx).unwrap();
            assert!(
                ptx.contains(&format!(".target {arch}")),
                "kernels/{} for {arch}: no .target line",
                source.file
            );
            for kernel in KERNELS.iter().filter(|k| k.source_file == source.file) {
                assert!(
                    ptx.contains(&format!(".entry {}(", kernel.name)),
                    "kernels/{} for {arch}: no entry for `{}`",
                    source.file,
                    kernel.name
                );
            }
        }
    }
}

#[test]
fn compile_errors_carry_the_nvrtc_log() {
    let Some(nvrtc) = nvrtc_or_skip() else { return };
    let broken = KernelSource {
        file: "broken.cu",
        text: "#include \"common.cuh\"\nextern \"C\" __global__ void broken(float* x) { undefined_helper(x); }\n",
    };
    let error = nvrtc
        .compile_uncached(
            &broken,
            &Nvrtc::options("sm_80", Output::Cubin).unwrap(),
            Output::Cubin,
        )
        .unwrap_err();
    let message = format!("{error:#}");
    assert!(
        message.contains("kernels/broken.cu") && message.contains("undefined_helper"),
        "{message}"
    );
}

#[test]
fn ptx_cache_is_keyed_by_source_and_arch() {
    let Some(nvrtc) = nvrtc_or_skip() else { return };
    let dir = tempfile::tempdir().unwrap();
    let source = &KERNEL_SOURCES[0];
    let first = nvrtc
        .compile_cached_in(source, "sm_80", Output::Ptx, dir.path())
        .unwrap();
    let files: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    // A second compile reads the file: prove it by changing what the file says.
    std::fs::write(&files[0], "// cached\n").unwrap();
    assert_eq!(
        nvrtc
            .compile_cached_in(source, "sm_80", Output::Ptx, dir.path())
            .unwrap(),
        b"// cached\n"
    );
    let sm90 = nvrtc
        .compile_cached_in(source, "sm_90", Output::Ptx, dir.path())
        .unwrap();
    assert_ne!(sm90, first);
    // The cubin of the same source and arch is another entry.
    let cubin = nvrtc
        .compile_cached_in(source, "sm_80", Output::Cubin, dir.path())
        .unwrap();
    assert_eq!(&cubin[..4], b"\x7fELF");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 3);
}

#[test]
fn ptxas_reports_every_kernel() {
    let Some(nvrtc) = nvrtc_or_skip() else { return };
    let Some(ptxas) = find_ptxas() else {
        assert!(
            !in_ci(),
            "CI=true needs ptxas (scripts/setup-cuda-tools.sh)"
        );
        eprintln!("skipped: no ptxas (run scripts/setup-cuda-tools.sh or set KVLAB_PTXAS)");
        return;
    };
    let rows = kernel_resources(nvrtc, &ptxas, &TARGET_ARCHES).unwrap_or_else(|e| panic!("{e:#}"));
    println!("{}", format_kernel_resources(&rows));
    for kernel in KERNELS {
        for arch in TARGET_ARCHES {
            let row = rows
                .iter()
                .find(|r| r.kernel == kernel.name && r.arch == arch);
            let row = row.unwrap_or_else(|| {
                panic!("ptxas reported nothing for `{}` on {arch}", kernel.name)
            });
            assert!(row.registers > 0, "{row:?}");
            assert!(
                row.shared_bytes >= kernel.static_shared_bytes,
                "emulator counts more shared memory: {row:?}"
            );
        }
    }
}

#[test]
fn ptxas_log_is_parsed() {
    let log = "ptxas info    : 0 bytes gmem\n\
               ptxas info    : Compiling entry function 'first' for 'sm_80'\n\
               ptxas info    : Function properties for first\n\
               \x20   16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n\
               ptxas info    : Used 40 registers, 4224 bytes smem, 380 bytes cmem[0]\n\
               ptxas info    : Compiling entry function 'second' for 'sm_80'\n\
               ptxas info    : Function properties for second\n\
               \x20   0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
               ptxas info    : Used 8 registers, 372 bytes cmem[0]\n";
    let rows = parse_ptxas_log(log, "sm_80");
    let expected = [
        KernelResources {
            kernel: "first".into(),
            arch: "sm_80".into(),
            registers: 40,
            spill_stores_bytes: 8,
            spill_loads_bytes: 4,
            stack_frame_bytes: 16,
            shared_bytes: 4224,
        },
        KernelResources {
            kernel: "second".into(),
            arch: "sm_80".into(),
            registers: 8,
            ..Default::default()
        },
    ];
    assert_eq!(rows, expected);
}

#[test]
fn options_need_an_sm_architecture() {
    assert!(Nvrtc::options("80", Output::Cubin).is_err());
    assert!(Nvrtc::options("sm_", Output::Ptx).is_err());
    assert_eq!(
        Nvrtc::options("sm_90a", Output::Ptx).unwrap()[0],
        "--gpu-architecture=compute_90a"
    );
    assert_eq!(
        Nvrtc::options("sm_90", Output::Cubin).unwrap()[0],
        "--gpu-architecture=sm_90"
    );
}

/// The ELF header fields of a cubin: (e_machine, e_flags).
fn elf_machine_and_flags(cubin: &[u8]) -> (u16, u32) {
    assert_eq!(&cubin[..4], b"\x7fELF", "not an ELF file");
    assert_eq!(cubin[4], 2, "not a 64-bit ELF");
    let machine = u16::from_le_bytes([cubin[18], cubin[19]]);
    let flags = u32::from_le_bytes(cubin[48..52].try_into().unwrap());
    (machine, flags)
}

#[test]
fn every_kernel_compiles_to_a_cubin_for_the_device_arch() {
    let Some(nvrtc) = nvrtc_or_skip() else { return };
    const EM_CUDA: u16 = 190;
    for arch in TARGET_ARCHES {
        let number: u32 = arch[3..].parse().unwrap();
        for source in KERNEL_SOURCES {
            let options = Nvrtc::options(arch, Output::Cubin).unwrap();
            let cubin = nvrtc
                .compile_uncached(source, &options, Output::Cubin)
                .unwrap_or_else(|e| panic!("{e:#}"));
            let (machine, flags) = elf_machine_and_flags(&cubin);
            assert_eq!(machine, EM_CUDA, "kernels/{} for {arch}", source.file);
            // The SM number sits in e_flags: bits 0-7 (ABI before CUDA 12.9's) or 8-15.
            assert!(
                flags & 0xff == number || (flags >> 8) & 0xff == number,
                "kernels/{} for {arch}: e_flags {flags:#x} name another SM",
                source.file
            );
            let text = String::from_utf8_lossy(&cubin);
            for kernel in KERNELS.iter().filter(|k| k.source_file == source.file) {
                assert!(
                    text.contains(kernel.name),
                    "kernels/{} for {arch}: no symbol `{}`",
                    source.file,
                    kernel.name
                );
            }
        }
    }
}

#[test]
fn nvrtc_names_the_architectures_it_cannot_compile_for() {
    let Some(nvrtc) = nvrtc_or_skip() else { return };
    let archs = nvrtc
        .supported_archs()
        .expect("NVRTC 11.2+ lists its architectures");
    assert!(archs.contains(&80) && archs.contains(&90), "{archs:?}");
    nvrtc.check_arch("sm_90", "NVIDIA H200").unwrap();
    let error = format!(
        "{:#}",
        nvrtc.check_arch("sm_999", "a future GPU").unwrap_err()
    );
    for part in ["a future GPU", "sm_999", &nvrtc.describe(), "sm_90"] {
        assert!(error.contains(part), "{part:?} missing from: {error}");
    }
}

#[test]
fn driver_and_nvrtc_versions_are_matched() {
    let v = |major, minor| CudaVersion { major, minor };
    assert_eq!(CudaVersion::from_driver_code(13000), v(13, 0));
    assert_eq!(CudaVersion::from_driver_code(12090), v(12, 9));
    // Same major, newer minor: minor-version compatibility (cubins, not PTX).
    cubin_compatible(v(13, 2), v(13, 0)).unwrap();
    cubin_compatible(v(12, 9), v(13, 0)).unwrap();
    let error = format!("{:#}", cubin_compatible(v(13, 0), v(12, 8)).unwrap_err());
    for part in ["NVRTC 13.0", "CUDA 12.8", "KVLAB_NVRTC", "libnvrtc.so.12"] {
        assert!(error.contains(part), "{part:?} missing from: {error}");
    }
}

/// A fake Python prefix `root` whose site-packages hold `nvidia/<package>/lib/<name>`, each a
/// link to `target`.
fn fake_venv(root: &Path, files: &[(&str, &str)], target: &Path) {
    let site = root.join("lib/python3.12/site-packages");
    for (package, name) in files {
        let lib = site.join("nvidia").join(package).join("lib");
        std::fs::create_dir_all(&lib).unwrap();
        std::os::unix::fs::symlink(target, lib.join(name)).unwrap();
    }
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::os::unix::fs::symlink("/bin/sh", root.join("bin/python3")).unwrap();
}

#[test]
fn libraries_are_found_in_python_venv_layouts() {
    let Some(nvrtc) = nvrtc_or_skip() else { return };
    let real = Path::new(nvrtc.library_path());
    let dir = tempfile::tempdir().unwrap();
    // CUDA 13 wheels (one nvidia/cu13/lib) in a venv on the PATH; CUDA 12 wheels (one folder per
    // library) in $VIRTUAL_ENV.
    let path_venv = dir.path().join("torch-venv");
    fake_venv(
        &path_venv,
        &[("cu13", "libnvrtc.so.13"), ("cu13", "libcublas.so.13")],
        real,
    );
    let virtual_env = dir.path().join("venv12");
    fake_venv(
        &virtual_env,
        &[
            ("cuda_nvrtc", "libnvrtc.so.12"),
            ("cublas", "libcublas.so.12"),
        ],
        real,
    );
    // And a venv under /opt, as the GPU machines' image has torch in /opt/torch/.venv.
    let opt = dir.path().join("opt");
    let opt_venv = opt.join("torch/.venv");
    fake_venv(&opt_venv, &[("cu13", "libnvrtc.so.13")], real);
    std::fs::write(opt_venv.join("pyvenv.cfg"), "home = /usr/bin\n").unwrap();
    let env = SearchEnv {
        path: Some(path_venv.join("bin").into_os_string()),
        virtual_env: Some(virtual_env.clone().into_os_string()),
        venv_parents: vec![opt],
        ..SearchEnv::default()
    };
    let site = |root: &Path, package: &str, name: &str| {
        root.join("lib/python3.12/site-packages/nvidia")
            .join(package)
            .join("lib")
            .join(name)
            .display()
            .to_string()
    };
    let nvrtc_found = libraries::candidates(&libraries::NVRTC, &env);
    assert_eq!(
        nvrtc_found[..3],
        [
            site(&path_venv, "cu13", "libnvrtc.so.13"),
            site(&opt_venv, "cu13", "libnvrtc.so.13"),
            site(&virtual_env, "cuda_nvrtc", "libnvrtc.so.12"),
        ]
    );
    let cublas_found = libraries::candidates(&libraries::CUBLAS, &env);
    assert_eq!(
        cublas_found[..2],
        [
            site(&path_venv, "cu13", "libcublas.so.13"),
            site(&virtual_env, "cublas", "libcublas.so.12"),
        ]
    );
    // The bare names for the dynamic loader come last.
    assert_eq!(nvrtc_found.last().unwrap(), "libnvrtc.so");
    let overridden = SearchEnv {
        override_path: Some("/opt/nvrtc/libnvrtc.so.13".into()),
        ..env
    };
    assert_eq!(
        libraries::candidates(&libraries::NVRTC, &overridden),
        ["/opt/nvrtc/libnvrtc.so.13"],
        "a library named explicitly is the only one tried"
    );
    // What the search finds loads.
    let loaded = Nvrtc::load_from(&nvrtc_found[0]).unwrap();
    assert_eq!(loaded.version(), nvrtc.version());
}
