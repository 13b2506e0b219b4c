//! The kernels compile for real: every kernels/*.cu through NVRTC for sm_80 and sm_90, and
//! ptxas reports registers, spills and shared memory per kernel.
//!
//! Without NVRTC (or ptxas) a test prints why it skips; under `CI=true` it fails instead.
//! scripts/setup-cuda-tools.sh installs both into .cuda-tools/, where kvlab finds them.
use kvlab::backend::cuda::device::{KernelSource, KERNELS, KERNEL_SOURCES};
use kvlab::backend::cuda::nvrtc::{
    find_ptxas, format_kernel_resources, kernel_resources, parse_ptxas_log, KernelResources, Nvrtc,
    TARGET_ARCHES,
};

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
            let options = Nvrtc::options(arch).unwrap();
            let ptx = nvrtc
                .compile_uncached(source, &options)
                .unwrap_or_else(|e| panic!("{e:#}"));
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
        .compile_uncached(&broken, &Nvrtc::options("sm_80").unwrap())
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
        .compile_cached_in(source, "sm_80", dir.path())
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
            .compile_cached_in(source, "sm_80", dir.path())
            .unwrap(),
        "// cached\n"
    );
    let sm90 = nvrtc
        .compile_cached_in(source, "sm_90", dir.path())
        .unwrap();
    assert_ne!(sm90, first);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
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
    assert!(Nvrtc::options("80").is_err());
    assert!(Nvrtc::options("sm_").is_err());
    assert_eq!(
        Nvrtc::options("sm_90a").unwrap()[0],
        "--gpu-architecture=compute_90a"
    );
}
