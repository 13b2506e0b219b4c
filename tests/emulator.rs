//! The CUDA emulator: the probes of kvlab::selftest (working kernels, the documented PTX
//! layouts of mma fragments, ldmatrix, shuffles, hardware limits, graph capture; the same code
//! `kvlab selftest` runs on a GPU), and what only the emulator can check: planted bugs, the
//! race check, results independent of its thread count, stray pointers, the driver's stream
//! rules. Kernels live in kernels/emu_selftest.cu.
//!
//! Out-of-bounds reads are only caught by the AddressSanitizer build:
//! `cargo test --release --features emu-asan --test emulator`.
mod common;

use std::sync::Arc;

use kvlab::backend::cuda::device::{
    check_launch_limits, kernel_signature, KernelSignature, StreamKind, KERNELS,
};
use kvlab::backend::cuda::emu::{sanitizer_active, EmuDevice};
use kvlab::backend::cuda::{
    open_device, BackendKind, Device, DeviceBuffer, KernelArg, LaunchConfig,
};
use kvlab::selftest::probes::{mma_matmul, reduce_rows};
use kvlab::selftest::{self, Check, Context, Numbers};

fn emulator(threads: usize) -> Arc<dyn Device> {
    Arc::new(EmuDevice::with_options(threads, false).expect("emulator"))
}

fn race_checked_emulator() -> Arc<dyn Device> {
    Arc::new(EmuDevice::with_options(2, true).expect("emulator"))
}

fn ptr(buffer: &DeviceBuffer) -> KernelArg {
    KernelArg::Ptr(buffer.ptr())
}

fn launch_error(
    device: &dyn Device,
    kernel: &str,
    config: LaunchConfig,
    args: &[KernelArg],
) -> String {
    selftest::probes::launch_error(device, kernel, config, args).unwrap()
}

fn assert_contains(text: &str, parts: &[&str]) {
    selftest::probes::expect_parts(text, parts).unwrap();
}

/// Runs the selftest's probe `name` on a 2-thread emulator.
fn probe(name: &str) {
    common::run_check(&format!("probes/{name}"), Some(2));
}

/// The probes this file runs, one test each (below): a probe added to the selftest must be
/// added here too.
const PROBES: [&str; 12] = [
    "reduce_rows",
    "silu_mul_bf16",
    "conversions",
    "mma_matmul",
    "mma_fragments",
    "ldmatrix",
    "shuffles",
    "votes_and_warp_reductions",
    "cp_async_groups",
    "dynamic_shared_opt_in",
    "static_shared_memory",
    "graph_capture",
];

#[test]
fn every_probe_of_the_selftest_has_a_test() {
    common::assert_group_is("probes", &PROBES);
}

#[test]
fn reduce_rows_matches_reference() {
    probe("reduce_rows");
}

#[test]
fn silu_mul_bf16_matches_reference() {
    probe("silu_mul_bf16");
}

#[test]
fn conversions_match_half_crate() {
    probe("conversions");
}

#[test]
fn mma_matmul_matches_reference() {
    probe("mma_matmul");
}

#[test]
fn mma_fragments_follow_the_ptx_tables() {
    probe("mma_fragments");
}

#[test]
fn ldmatrix_follows_the_ptx_tables() {
    probe("ldmatrix");
}

#[test]
fn shuffles_follow_cuda_semantics() {
    probe("shuffles");
}

#[test]
fn votes_and_warp_reductions() {
    probe("votes_and_warp_reductions");
}

#[test]
fn cp_async_groups_complete_when_waited_for() {
    probe("cp_async_groups");
}

#[test]
fn dynamic_shared_memory_and_the_opt_in() {
    probe("dynamic_shared_opt_in");
}

#[test]
fn static_shared_memory_counts_against_the_limit() {
    probe("static_shared_memory");
    let oversized = KernelSignature {
        name: "oversized",
        source_file: "none.cu",
        params: &[],
        static_shared_bytes: 48 * 1024 + 4,
    };
    let error = check_launch_limits(&oversized, &LaunchConfig::linear(1, 32, 0), None).unwrap_err();
    assert_contains(
        &format!("{error:#}"),
        &["oversized", "49156 bytes of static shared memory"],
    );
    let (_, reduce) = kernel_signature("selftest_reduce_rows").unwrap();
    assert_eq!(reduce.static_shared_bytes, 32 * 4);
}

#[test]
fn occupancy_follows_the_emulated_multiprocessor() {
    // 132 SMs of 2048 threads, 32 blocks and 228 KiB of shared memory (1 KiB reserved a block);
    // registers are not modelled. The static 40 KiB of selftest_static_shared_40k count too.
    let device = emulator(1);
    assert_eq!(device.multiprocessors(), 132);
    let blocks = |kernel, threads, dynamic| {
        device
            .max_active_blocks_per_multiprocessor(kernel, threads, dynamic)
            .unwrap()
    };
    let kernel = "selftest_dynamic_shared_reverse";
    assert_eq!(blocks(kernel, 256, 4096), 8, "threads limit");
    assert_eq!(blocks(kernel, 32, 0), 32, "blocks limit");
    assert_eq!(
        blocks(kernel, 400, 0),
        4,
        "threads in whole warps: 13 warps, not 400 threads"
    );
    assert_eq!(blocks(kernel, 128, 100 * 1024), 2, "shared memory limit");
    assert_eq!(blocks(kernel, 128, 228 * 1024), 0, "not one block fits");
    assert_eq!(
        blocks("selftest_static_shared_40k", 32, 0),
        5,
        "static shared counts"
    );
    let error = device
        .max_active_blocks_per_multiprocessor("no_such_kernel", 32, 0)
        .unwrap_err();
    assert_contains(&format!("{error:#}"), &["no_such_kernel"]);
}

#[test]
fn graph_capture_replays_launches_with_current_memory() {
    probe("graph_capture");
}

#[test]
fn results_do_not_depend_on_thread_count() {
    let mut numbers = Numbers(5);
    let (m, n, k) = (96, 64, 72);
    let a = numbers.bf16s(m * k);
    let b = numbers.bf16s(n * k);
    let x = numbers.floats(40 * 1000);
    let one = emulator(1);
    let four = emulator(4);
    let bits = |values: Vec<f32>| values.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(
        bits(mma_matmul(one.as_ref(), &a, &b, m, n, k).unwrap()),
        bits(mma_matmul(four.as_ref(), &a, &b, m, n, k).unwrap())
    );
    assert_eq!(
        bits(reduce_rows(one.as_ref(), &x, 40, 1000, 128).unwrap()),
        bits(reduce_rows(four.as_ref(), &x, 40, 1000, 128).unwrap())
    );
}

#[test]
fn race_check_accepts_correct_kernels() {
    let device = race_checked_emulator();
    let mut numbers = Numbers(6);
    let x = numbers.floats(9 * 300);
    let got = reduce_rows(device.as_ref(), &x, 9, 300, 96).unwrap();
    let plain = reduce_rows(emulator(1).as_ref(), &x, 9, 300, 96).unwrap();
    assert_eq!(got, plain);
    let a = numbers.bf16s(40 * 48);
    let b = numbers.bf16s(24 * 48);
    assert_eq!(
        mma_matmul(device.as_ref(), &a, &b, 40, 24, 48).unwrap(),
        mma_matmul(emulator(1).as_ref(), &a, &b, 40, 24, 48).unwrap()
    );
}

#[test]
fn launch_checks_name_the_kernel() {
    let device = emulator(1);
    let out = device.alloc(4096).unwrap();
    let args = [ptr(&out), KernelArg::I32(1)];
    let cases: [(LaunchConfig, &[&str]); 6] = [
        (
            LaunchConfig::linear(1, 1025, 0),
            &["block dimension 0 is 1025"],
        ),
        (
            LaunchConfig {
                grid: [1, 1, 1],
                block: [32, 32, 2],
                shared_mem_bytes: 0,
                programmatic: false,
            },
            &["2048 threads"],
        ),
        (
            LaunchConfig {
                grid: [1, 1, 1],
                block: [1, 1, 65],
                shared_mem_bytes: 0,
                programmatic: false,
            },
            &["block dimension 2 is 65"],
        ),
        (
            LaunchConfig {
                grid: [1, 65536, 1],
                block: [32, 1, 1],
                shared_mem_bytes: 0,
                programmatic: false,
            },
            &["grid dimension 1 is 65536"],
        ),
        (LaunchConfig::linear(0, 32, 0), &["grid dimension 0 is 0"]),
        (
            LaunchConfig::linear(1, 32, 49 * 1024),
            &["50176 bytes of dynamic"],
        ),
    ];
    for (config, parts) in cases {
        let error = launch_error(device.as_ref(), "planted_oob_write", config, &args);
        assert_contains(&error, &["planted_oob_write"]);
        assert_contains(&error, parts);
    }
    let ok = LaunchConfig::linear(1, 1, 0);
    let error = launch_error(device.as_ref(), "planted_oob_write", ok, &[ptr(&out)]);
    assert_contains(&error, &["planted_oob_write", "takes 2 arguments, got 1"]);
    let error = launch_error(
        device.as_ref(),
        "planted_oob_write",
        ok,
        &[ptr(&out), KernelArg::F32(1.0)],
    );
    assert_contains(&error, &["planted_oob_write", "argument 1 (`n`)", "I32"]);
    let error = launch_error(device.as_ref(), "no_such_kernel", ok, &[]);
    assert_contains(&error, &["no kernel named `no_such_kernel`"]);
    let stray = KernelArg::Ptr(out.ptr() + 1_000_000);
    let error = launch_error(
        device.as_ref(),
        "planted_oob_write",
        ok,
        &[stray, KernelArg::I32(0)],
    );
    assert_contains(
        &error,
        &[
            "planted_oob_write",
            "argument 0 (`out`)",
            "not inside any live device buffer",
        ],
    );
}

#[test]
fn planted_out_of_bounds_write_is_caught() {
    let device = emulator(2);
    let n = 100;
    let out = device.alloc(n * 4).unwrap();
    let error = launch_error(
        device.as_ref(),
        "planted_oob_write",
        LaunchConfig::linear(1, 128, 0),
        &[ptr(&out), KernelArg::I32(n as i32)],
    );
    if sanitizer_active() {
        assert_contains(
            &error,
            &[
                "planted_oob_write",
                "thread (100,0,0)",
                "AddressSanitizer: use-after-poison",
                "out of bounds",
            ],
        );
    } else {
        assert_contains(
            &error,
            &[
                "planted_oob_write",
                "wrote out of bounds",
                "up to 4 bytes past the end",
            ],
        );
    }
    // The guard is restored: the next correct launch on the same buffer passes.
    device
        .launch(
            "planted_oob_write",
            LaunchConfig::linear(1, 64, 0),
            &[ptr(&out), KernelArg::I32(64)],
        )
        .unwrap();
}

#[test]
fn planted_out_of_bounds_read_is_caught_under_asan() {
    if !sanitizer_active() {
        eprintln!(
            "skipped: reads are checked only by the AddressSanitizer build (--features emu-asan)"
        );
        return;
    }
    let device = emulator(1);
    let n = 50;
    let x = device.upload(&vec![1.0f32; n]).unwrap();
    let out = device.alloc(n * 4).unwrap();
    let args = [ptr(&x), ptr(&out), KernelArg::I32(n as i32)];
    let error = launch_error(
        device.as_ref(),
        "planted_oob_read",
        LaunchConfig::linear(1, 64, 0),
        &args,
    );
    assert_contains(
        &error,
        &[
            "planted_oob_read",
            "thread (49,0,0)",
            "AddressSanitizer: use-after-poison",
            "out of bounds",
        ],
    );
    // Dynamic shared memory one float too small: the last thread writes past its end.
    let args = [ptr(&x), ptr(&out), KernelArg::I32(n as i32)];
    let config = LaunchConfig::linear(1, 64, (n * 4 - 4) as u32);
    let error = launch_error(
        device.as_ref(),
        "selftest_dynamic_shared_reverse",
        config,
        &args,
    );
    assert_contains(
        &error,
        &[
            "selftest_dynamic_shared_reverse",
            "AddressSanitizer: use-after-poison",
        ],
    );
}

#[test]
fn a_programmatic_launch_fails_when_a_thread_returns_before_waiting() {
    // On a GPU such a grid may finish while the kernel it depends on still runs, and let the
    // next kernel start too early; the emulator's launches are ordered, so it checks the waits.
    let device = emulator(2);
    let out = device.alloc(128 * 4).unwrap();
    let programmatic = LaunchConfig {
        programmatic: true,
        ..LaunchConfig::linear(1, 128, 0)
    };
    let error = launch_error(
        device.as_ref(),
        "planted_return_before_wait",
        programmatic,
        &[ptr(&out), KernelArg::I32(100)],
    );
    assert_contains(
        &error,
        &[
            "planted_return_before_wait",
            "thread (100,0,0)",
            "without calling grid_dependency_wait() in a programmatic launch",
        ],
    );
    // Every thread waits: the same launch passes; a plain launch needs no wait.
    device
        .launch(
            "planted_return_before_wait",
            programmatic,
            &[ptr(&out), KernelArg::I32(128)],
        )
        .unwrap();
    device
        .launch(
            "planted_return_before_wait",
            LaunchConfig::linear(1, 128, 0),
            &[ptr(&out), KernelArg::I32(100)],
        )
        .unwrap();
}

#[test]
fn planted_divergent_barriers_are_reported() {
    let device = emulator(1);
    let out = device.alloc(256 * 4).unwrap();
    let error = launch_error(
        device.as_ref(),
        "planted_divergent_barrier",
        LaunchConfig::linear(2, 256, 0),
        &[ptr(&out)],
    );
    assert_contains(
        &error,
        &[
            "planted_divergent_barrier",
            "emu_selftest.cu",
            "every thread of a block must reach every barrier",
        ],
    );
    let error = launch_error(
        device.as_ref(),
        "planted_if_else_barrier",
        LaunchConfig::linear(1, 64, 0),
        &[ptr(&out)],
    );
    assert_contains(
        &error,
        &[
            "planted_if_else_barrier",
            "divergent __syncthreads()",
            "emu_selftest.cu",
        ],
    );
}

#[test]
fn planted_shared_memory_race_is_caught_by_the_race_check() {
    let x: Vec<f32> = (0..128).map(|i| i as f32).collect();
    let launch = |device: &dyn Device| -> anyhow::Result<()> {
        let x_buffer = device.upload(&x)?;
        let out = device.alloc(128 * 4)?;
        device.launch(
            "planted_shared_race",
            LaunchConfig::linear(1, 128, 0),
            &[ptr(&x_buffer), ptr(&out)],
        )
    };
    // A single schedule cannot see the race; running both thread orders does.
    launch(emulator(1).as_ref()).unwrap();
    let error = format!(
        "{:#}",
        launch(race_checked_emulator().as_ref()).unwrap_err()
    );
    assert_contains(
        &error,
        &[
            "planted_shared_race",
            "race check failed",
            "forward and reverse thread order",
        ],
    );
}

#[test]
fn planted_missing_lane_is_reported() {
    let device = emulator(1);
    let out = device.alloc(64 * 4).unwrap();
    let error = launch_error(
        device.as_ref(),
        "planted_shuffle_missing_lane",
        LaunchConfig::linear(1, 64, 0),
        &[ptr(&out)],
    );
    assert_contains(
        &error,
        &[
            "planted_shuffle_missing_lane",
            "__shfl_xor_sync",
            "member mask 0xffffffff",
            "exited",
        ],
    );
    // A full-warp mask in a block whose last warp is partial names lanes that do not exist.
    let x = device.upload(&vec![1.0f32; 64]).unwrap();
    let sums = device.alloc(2 * 4).unwrap();
    let error = launch_error(
        device.as_ref(),
        "selftest_warp_sums",
        LaunchConfig::linear(1, 48, 0),
        &[ptr(&x), ptr(&sums)],
    );
    assert_contains(
        &error,
        &["selftest_warp_sums", "do not exist", "48 threads"],
    );
    device
        .launch(
            "selftest_warp_sums",
            LaunchConfig::linear(1, 64, 0),
            &[ptr(&x), ptr(&sums)],
        )
        .unwrap();
    assert_eq!(device.download::<f32>(&sums).unwrap(), [32.0, 32.0]);
}

/// A one-launch graph over `x` and `out` on `device`.
fn capture_reduce(
    device: &dyn Device,
    x: &DeviceBuffer,
    out: &DeviceBuffer,
) -> anyhow::Result<kvlab::backend::cuda::Graph> {
    let args = [ptr(x), ptr(out), KernelArg::I32(1), KernelArg::I32(4)];
    device.begin_capture()?;
    let launched = device.launch(
        "selftest_reduce_rows",
        LaunchConfig::linear(1, 32, 0),
        &args,
    );
    let graph = device.end_capture();
    launched?;
    graph
}

#[test]
fn graph_replay_fails_once_a_captured_buffer_is_freed() {
    let device = emulator(2);
    let x = device.upload(&[1.0f32; 4]).unwrap();
    let out = device.alloc(4).unwrap();
    let graph = capture_reduce(device.as_ref(), &x, &out).unwrap();
    device.launch_graph(&graph).unwrap();
    assert_eq!(device.download::<f32>(&out).unwrap(), [4.0]);
    drop(x);
    let error = format!("{:#}", device.launch_graph(&graph).unwrap_err());
    assert_contains(&error, &["graph node 0", "freed after capture"]);
}

#[test]
fn the_legacy_stream_cannot_be_captured() {
    // As cuStreamBeginCapture refuses the NULL stream: a device on it can never capture.
    let legacy: Arc<dyn Device> = Arc::new(
        EmuDevice::with_options(1, false)
            .unwrap()
            .on_stream(StreamKind::Legacy),
    );
    let x = legacy.upload(&[1.0f32; 4]).unwrap();
    let out = legacy.alloc(4).unwrap();
    let error = format!(
        "{:#}",
        capture_reduce(legacy.as_ref(), &x, &out).err().unwrap()
    );
    assert_contains(
        &error,
        &[
            "cuStreamBeginCapture",
            "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED",
            "legacy",
        ],
    );
    // kvlab's devices issue on a created stream, which captures.
    assert_eq!(
        kvlab::backend::cuda::device::WORK_STREAM,
        StreamKind::Created
    );
    let device = emulator(1);
    let (x, out) = (
        device.upload(&[1.0f32; 4]).unwrap(),
        device.alloc(4).unwrap(),
    );
    capture_reduce(device.as_ref(), &x, &out).unwrap();
}

#[test]
fn prohibited_operations_invalidate_the_capture() {
    let device = emulator(1);
    let x = device.upload(&[1.0f32; 4]).unwrap();
    let out = device.alloc(4).unwrap();
    // A free during capture (the driver refuses cuMemFree while a thread-local capture runs).
    let doomed = device.alloc(64).unwrap();
    device.begin_capture().unwrap();
    drop(doomed);
    let error = format!("{:#}", device.end_capture().err().unwrap());
    assert_contains(
        &error,
        &[
            "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED",
            "freeing a 64-byte buffer",
        ],
    );
    // An allocation, a synchronize and an event alike.
    for refused in ["alloc", "synchronize", "record_event"] {
        device.begin_capture().unwrap();
        let error = match refused {
            "alloc" => device.alloc(4).err(),
            "synchronize" => device.synchronize().err(),
            _ => device.record_event().err(),
        };
        assert_contains(
            &format!("{:#}", error.unwrap()),
            &[refused, "during graph capture"],
        );
        let error = format!("{:#}", device.end_capture().err().unwrap());
        assert_contains(&error, &["CUDA_ERROR_STREAM_CAPTURE_INVALIDATED", refused]);
    }
    // The device captures again afterwards.
    capture_reduce(device.as_ref(), &x, &out).unwrap();
}

#[test]
fn the_selftest_runner_reports_failures_and_panics_and_goes_on() {
    let checks = [
        Check {
            group: "t",
            name: "passes",
            run: |_| Ok("fine".into()),
        },
        Check {
            group: "t",
            name: "fails",
            run: |_| anyhow::bail!("it differs"),
        },
        Check {
            group: "t",
            name: "panics",
            run: |_| panic!("boom"),
        },
        Check {
            group: "t",
            name: "after",
            run: |_| Ok("still ran".into()),
        },
    ];
    let ctx = Context::emulator(Some(1));
    let mut seen = 0;
    let outcomes = selftest::run_checks(&ctx, &checks, None, |_| seen += 1);
    assert_eq!(seen, 4);
    let summary: Vec<(bool, &str)> = outcomes
        .iter()
        .map(|o| (o.passed, o.detail.as_str()))
        .collect();
    assert_eq!(
        summary,
        [
            (true, "fine"),
            (false, "it differs"),
            (false, "panicked: boom"),
            (true, "still ran")
        ]
    );
    let filtered = selftest::run_checks(&ctx, &checks, Some("t/fails"), |_| {});
    assert_eq!(filtered.len(), 1);
}

#[test]
fn memory_accounting_and_copies() {
    let device = emulator(1);
    let before = device.memory().unwrap();
    assert_eq!(before.device_total, None);
    let a = device.alloc(1000).unwrap();
    let b = device.alloc(24).unwrap();
    assert_eq!(
        device.memory().unwrap().allocated_by_kvlab,
        before.allocated_by_kvlab + 1024
    );
    assert_eq!(a.ptr() % 256, 0);
    device.copy_htod(&a, 100, &[7u8; 20]).unwrap();
    device.memset_zero(&a, 104, 4).unwrap();
    device.copy_dtod(&a, 100, &b, 2, 20).unwrap();
    let mut got = [0u8; 24];
    device.copy_dtoh(&b, 0, &mut got).unwrap();
    assert_eq!(got[2..6], [7, 7, 7, 7]);
    assert_eq!(got[6..10], [0, 0, 0, 0]);
    assert_eq!(got[10..22], [7; 12]);
    let error = format!("{:#}", device.copy_htod(&b, 20, &[0u8; 5]).unwrap_err());
    assert_contains(&error, &["copy_htod", "20..25", "24 bytes"]);
    drop(a);
    drop(b);
    assert_eq!(
        device.memory().unwrap().allocated_by_kvlab,
        before.allocated_by_kvlab
    );
    assert!(device
        .describe()
        .starts_with("CUDA emulator on CPU, 1 threads"));
}

#[test]
fn kernel_table_lists_every_selftest_kernel() {
    let names: Vec<&str> = KERNELS.iter().map(|k| k.name).collect();
    for name in [
        "selftest_reduce_rows",
        "selftest_matmul_bf16_mma",
        "planted_oob_write",
        "planted_shared_race",
    ] {
        assert!(names.contains(&name), "{name} missing from {names:?}");
    }
    let (_, matmul) = kernel_signature("selftest_matmul_bf16_mma").unwrap();
    let kinds: Vec<String> = matmul
        .params
        .iter()
        .map(|p| format!("{}:{:?}", p.name, p.kind))
        .collect();
    assert_eq!(
        kinds,
        ["a:Ptr", "b:Ptr", "c:Ptr", "m:I32", "n:I32", "k:I32"]
    );
}

#[test]
fn backend_selection() {
    assert_eq!("emu".parse::<BackendKind>().unwrap(), BackendKind::Emu);
    assert_eq!("auto".parse::<BackendKind>().unwrap(), BackendKind::Auto);
    assert!(format!("{:#}", "gpu".parse::<BackendKind>().unwrap_err())
        .contains("auto, cpu, cuda or emu"));
    let (resolved, reason) = BackendKind::Auto.resolve();
    let present = kvlab::backend::cuda::cuda_device_present();
    assert_eq!(
        resolved,
        if present {
            BackendKind::Cuda
        } else {
            BackendKind::Cpu
        },
        "{reason}"
    );
    assert_eq!(BackendKind::Emu.resolve().0, BackendKind::Emu);
    if !present {
        let error = format!("{:#}", open_device(BackendKind::Cuda).err().unwrap());
        assert_contains(&error, &["--backend cuda", "no CUDA"]);
    }
    assert!(open_device(BackendKind::Emu)
        .unwrap()
        .describe()
        .contains("CUDA emulator"));
    assert!(open_device(BackendKind::Cpu).is_err());
}
