//! Every CUDA kernel alone against its CPU reference, through the CUDA backend on the
//! emulator: the checks of kvlab::selftest::kernels (the same code `kvlab selftest` runs on a
//! GPU; what each compares, on which shapes and within which tolerance, is said there), one test
//! each; and the KV chunk pool's accounting.

mod common;

use kvlab::backend::cuda::emu::EmuDevice;
use kvlab::backend::cuda::{CudaBackend, CudaOptions};
use kvlab::backend::Backend;
use kvlab::kv::KvLayout;
use std::sync::Arc;

fn kernel_check(name: &str) {
    common::run_check(&format!("kernels/{name}"), None);
}

/// The kernel checks this file runs, one test each (below).
const KERNEL_CHECKS: [&str; 17] = [
    "embedding_gather",
    "rms_norm",
    "matvec",
    "matvec_grid_stride",
    "norm_in_matvec",
    "residual_add_in_matmul",
    "swiglu_in_matvec",
    "matmul_mma",
    "matmul_many",
    "rope",
    "attention_gqa1_hd16",
    "attention_gqa3_hd32",
    "attention_gqa4_hd64",
    "attention_gqa9_hd128",
    "decode_attention_splits",
    "swiglu",
    "argmax",
];

#[test]
fn every_kernel_check_of_the_selftest_has_a_test() {
    common::assert_group_is("kernels", &KERNEL_CHECKS);
}

#[test]
fn embedding_gather_copies_rows() {
    kernel_check("embedding_gather");
}

#[test]
fn rms_norm_of_the_residual_stream() {
    kernel_check("rms_norm");
}

#[test]
fn matvec_for_decode_rows() {
    kernel_check("matvec");
}

#[test]
fn matvec_covers_more_rows_than_its_grid() {
    kernel_check("matvec_grid_stride");
}

#[test]
fn rms_norm_staged_inside_the_matvec() {
    kernel_check("norm_in_matvec");
}

#[test]
fn residual_added_as_the_projection_is_stored() {
    kernel_check("residual_add_in_matmul");
}

#[test]
fn swiglu_staged_inside_the_down_projection() {
    kernel_check("swiglu_in_matvec");
}

#[test]
fn tensor_core_matmul_with_ragged_tiles() {
    kernel_check("matmul_mma");
}

#[test]
fn several_weights_of_one_input() {
    kernel_check("matmul_many");
}

#[test]
fn rope_at_near_and_far_positions() {
    kernel_check("rope");
}

#[test]
fn attention_gqa1_head_dim_16() {
    kernel_check("attention_gqa1_hd16");
}

#[test]
fn attention_gqa3_head_dim_32() {
    kernel_check("attention_gqa3_hd32");
}

#[test]
fn attention_gqa4_head_dim_64() {
    kernel_check("attention_gqa4_hd64");
}

#[test]
fn attention_gqa9_head_dim_128() {
    kernel_check("attention_gqa9_hd128");
}

#[test]
fn decode_attention_splits_a_long_sequence() {
    kernel_check("decode_attention_splits");
}

#[test]
fn swiglu_in_place() {
    kernel_check("swiglu");
}

#[test]
fn argmax_on_device_matches_the_cpu_scan() {
    kernel_check("argmax");
}

fn emu(options: CudaOptions) -> CudaBackend {
    CudaBackend::new(Arc::new(EmuDevice::new().unwrap()), "emu", options).unwrap()
}

#[test]
fn kv_chunk_pool_reuses_one_size_and_frees_the_rest() {
    let cuda = emu(CudaOptions::default());
    let small = KvLayout {
        num_layers: 2,
        num_kv_heads: 2,
        head_dim: 16,
        chunk_tokens: 7,
    };
    let large = KvLayout {
        chunk_tokens: 8,
        ..small
    };
    let chunk_bytes = (small.chunk_elems() * 2) as u64;
    let chunks: Vec<_> = (0..3)
        .map(|_| cuda.alloc_kv_chunk(&small).unwrap())
        .collect();
    let addresses: Vec<u64> = chunks.iter().map(|c| c.ptr()).collect();
    drop(chunks);
    let report = cuda.memory_report().unwrap();
    assert_eq!(
        (report.kv_cache_bytes, report.kv_pool_bytes),
        (0, 3 * chunk_bytes)
    );
    // Same size: the released chunks come back.
    let again = cuda.alloc_kv_chunk(&small).unwrap();
    assert!(addresses.contains(&again.ptr()));
    // Another size (the no-cache strategy's next, longer cache): the pool empties first.
    let other = cuda.alloc_kv_chunk(&large).unwrap();
    let report = cuda.memory_report().unwrap();
    assert_eq!(report.kv_pool_bytes, 0);
    assert_eq!(
        report.kv_cache_bytes,
        chunk_bytes + (large.chunk_elems() * 2) as u64
    );
    drop((again, other));
}
