//! Cost of the CUDA emulator: per launch, per thread, per fiber switch, and one mma matmul.
//!
//! `launch/*` runs a kernel without synchronisation: every thread of a block runs on one fiber
//! stack without a switch, so (time - launch/1x32) / threads is the cost of one thread.
//! `sync_loop/256x64`: each iteration is one __syncthreads (each of the 256 threads blocks once:
//! 256 switches, +1 to restart in schedule order) and one __shfl_xor_sync (31 of 32 lanes per
//! warp block: 248 switches); 64 iterations are about 64 * 505 = 32,320 switches, so
//! time / 32,320 is one switch with its barrier or shuffle bookkeeping.
use criterion::{criterion_group, criterion_main, Criterion};
use half::bf16;
use kvlab::backend::cuda::emu::EmuDevice;
use kvlab::backend::cuda::{Device, KernelArg, LaunchConfig};
use std::time::Duration;

fn emulator_costs(c: &mut Criterion) {
    let device = EmuDevice::with_options(1, false).expect("emulator");
    let out = device.alloc(256 * 128 * 4).expect("alloc");
    let sync_loop = |blocks: u32, threads: u32, iterations: i32| {
        let args = [KernelArg::Ptr(out.ptr()), KernelArg::I32(iterations)];
        device
            .launch(
                "selftest_sync_loop",
                LaunchConfig::linear(blocks, threads, 0),
                &args,
            )
            .expect("launch")
    };
    c.bench_function("launch/1x32", |b| b.iter(|| sync_loop(1, 32, 0)));
    c.bench_function("launch/1x256", |b| b.iter(|| sync_loop(1, 256, 0)));
    c.bench_function("launch/128x128", |b| b.iter(|| sync_loop(128, 128, 0)));
    c.bench_function("sync_loop/256x64", |b| b.iter(|| sync_loop(1, 256, 64)));

    let (m, n, k) = (64usize, 64usize, 64usize);
    let a: Vec<bf16> = (0..m * k)
        .map(|i| bf16::from_f32((i % 7) as f32 - 3.0))
        .collect();
    let b_matrix: Vec<bf16> = (0..n * k)
        .map(|i| bf16::from_f32((i % 5) as f32 - 2.0))
        .collect();
    let device_ref: &dyn Device = &device;
    let a_buffer = device_ref.upload(&a).expect("upload");
    let b_buffer = device_ref.upload(&b_matrix).expect("upload");
    let c_buffer = device.alloc(m * n * 4).expect("alloc");
    let args = [
        KernelArg::Ptr(a_buffer.ptr()),
        KernelArg::Ptr(b_buffer.ptr()),
        KernelArg::Ptr(c_buffer.ptr()),
        KernelArg::I32(m as i32),
        KernelArg::I32(n as i32),
        KernelArg::I32(k as i32),
    ];
    let config = LaunchConfig {
        grid: [(n / 32) as u32, (m / 32) as u32, 1],
        block: [128, 1, 1],
        shared_mem_bytes: 0,
    };
    c.bench_function("matmul_bf16_mma/64x64x64", |b| {
        b.iter(|| {
            device
                .launch("selftest_matmul_bf16_mma", config, &args)
                .expect("launch")
        })
    });
}

/// `KVLAB_BENCH_QUICK=1`: a smoke run with short timings, as every kvlab bench.
fn config() -> Criterion {
    let quick = std::env::var("KVLAB_BENCH_QUICK").is_ok_and(|v| v == "1");
    if quick {
        Criterion::default()
            .sample_size(10)
            .warm_up_time(Duration::from_millis(20))
            .measurement_time(Duration::from_millis(60))
    } else {
        Criterion::default()
    }
}

criterion_group! {
    name = benches;
    config = config();
    targets = emulator_costs
}
criterion_main!(benches);
