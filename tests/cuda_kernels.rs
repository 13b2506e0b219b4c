//! Every CUDA kernel alone against its CPU reference, through the CUDA backend on the
//! emulator: the checks of kvlab::selftest::kernels (the same code `kvlab selftest` runs on a
//! GPU; what each compares, on which shapes and within which tolerance, is said there), one test
//! each; and the KV arena: its accounting and its copy-on-write copies.

mod common;

use kvlab::backend::cpu::{CpuBackend, CpuTensor};
use kvlab::backend::cuda::emu::EmuDevice;
use kvlab::backend::cuda::{CudaBackend, CudaOptions};
use kvlab::backend::{Backend, KvStore};
use kvlab::kv::{KvDtype, KvLayout, LayoutKind, SeqId};
use std::sync::Arc;

fn kernel_check(name: &str) {
    common::run_check(&format!("kernels/{name}"), None);
}

/// The kernel checks this file runs, one test each (below).
const KERNEL_CHECKS: [&str; 30] = [
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
    "rope_kv_append_batch",
    "rope_kv_append_fused",
    "batch_attention_gqa1_hd16",
    "batch_attention_gqa3_hd32",
    "batch_attention_gqa4_hd64_long",
    "batch_attention_gqa8_hd64",
    "batch_attention_gqa9_hd128",
    "decode_attention_long",
    "quantized_kv_append",
    "attention_int8",
    "attention_fp8",
    "batch_attention_quantized",
    "swiglu",
    "argmax",
    "chosen_ids",
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
fn rope_and_kv_append_of_several_sequences() {
    kernel_check("rope_kv_append_batch");
}

#[test]
fn rope_and_kv_append_in_one_pass() {
    kernel_check("rope_kv_append_fused");
}

#[test]
fn batch_attention_gqa1_head_dim_16() {
    kernel_check("batch_attention_gqa1_hd16");
}

#[test]
fn batch_attention_gqa3_head_dim_32() {
    kernel_check("batch_attention_gqa3_hd32");
}

#[test]
fn batch_attention_gqa4_head_dim_64_long() {
    kernel_check("batch_attention_gqa4_hd64_long");
}

#[test]
fn batch_attention_gqa8_head_dim_64() {
    kernel_check("batch_attention_gqa8_hd64");
}

#[test]
fn batch_attention_gqa9_head_dim_128() {
    kernel_check("batch_attention_gqa9_hd128");
}

#[test]
fn decode_attention_at_long_contexts() {
    kernel_check("decode_attention_long");
}

#[test]
fn quantized_kv_append_matches_the_cpu() {
    kernel_check("quantized_kv_append");
}

#[test]
fn attention_over_int8_caches() {
    kernel_check("attention_int8");
}

#[test]
fn attention_over_fp8_caches() {
    kernel_check("attention_fp8");
}

#[test]
fn batch_attention_over_quantized_caches() {
    kernel_check("batch_attention_quantized");
}

#[test]
fn swiglu_in_place() {
    kernel_check("swiglu");
}

#[test]
fn argmax_on_device_matches_the_cpu_scan() {
    kernel_check("argmax");
}

#[test]
fn chosen_ids_stay_on_the_backend() {
    kernel_check("chosen_ids");
}

fn emu(options: CudaOptions) -> CudaBackend {
    CudaBackend::new(Arc::new(EmuDevice::new().unwrap()), "emu", options).unwrap()
}

/// One step of `steps` (sequence, rows) on `b`: appends their K/V to layer 1 and returns the
/// attention of `q` (the step's rows) over each row's sequence.
fn append_and_attend<B: Backend>(
    b: &B,
    store: &mut KvStore<B>,
    steps: &[(SeqId, usize)],
    [q, k, v]: [&B::Tensor; 3],
    heads: usize,
) -> Vec<f32> {
    let view = store.prepare_step(b, steps).unwrap();
    b.set_kv_step(&mut store.memory, &view).unwrap();
    b.kv_append(&mut store.memory, &view, 1, k, v).unwrap();
    let mut out = b.alloc(view.rows(), heads * 16).unwrap();
    b.attention(q, &store.memory, &view, 1, heads, &mut out)
        .unwrap();
    for &(seq, rows) in steps {
        store.pool.commit(seq, &vec![0; rows]).unwrap();
    }
    b.read_rows(&out, 0, view.rows()).unwrap()
}

#[test]
fn kv_arena_is_counted_and_shared_chunks_are_copied_on_write() {
    let cuda = emu(CudaOptions::default());
    let cpu = CpuBackend::new();
    let (heads, kv_heads, head_dim) = (4, 2, 16);
    let layout =
        KvLayout::new(LayoutKind::Chunked, KvDtype::Bf16, 2, kv_heads, head_dim, 4).unwrap();
    let mut gpu_store = KvStore::new(&cuda, layout, 6, false).unwrap();
    let mut cpu_store = KvStore::new(&cpu, layout, 6, false).unwrap();
    let report = cuda.memory_report().unwrap();
    assert!(report.kv_cache_bytes >= 6 * layout.chunk_bytes() as u64);
    // Values that are exact in bf16, so that both sides store the same K/V.
    let values = |n: usize, seed: usize| -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7 + seed * 13) % 17) as f32 - 8.0) / 8.0)
            .collect()
    };
    // One step on both backends (the pools make the same choices, so ids agree): q, k, v of
    // its rows from `seed`, then the two attentions compared.
    let step = |cpu_store: &mut KvStore<CpuBackend>,
                gpu_store: &mut KvStore<CudaBackend>,
                steps: &[(SeqId, usize)],
                seed: usize| {
        let rows: usize = steps.iter().map(|s| s.1).sum();
        let q = values(rows * heads * head_dim, seed);
        let k = values(rows * kv_heads * head_dim, seed + 10);
        let v = values(rows * kv_heads * head_dim, seed + 20);
        let cpu_t = |x: &[f32], cols| CpuTensor {
            data: x.to_vec(),
            cols,
        };
        let c = [
            cpu_t(&q, heads * head_dim),
            cpu_t(&k, kv_heads * head_dim),
            cpu_t(&v, kv_heads * head_dim),
        ];
        let g = [
            cuda.upload_tensor(rows, heads * head_dim, &q).unwrap(),
            cuda.upload_tensor(rows, kv_heads * head_dim, &k).unwrap(),
            cuda.upload_tensor(rows, kv_heads * head_dim, &v).unwrap(),
        ];
        let want = append_and_attend(&cpu, cpu_store, steps, [&c[0], &c[1], &c[2]], heads);
        let got = append_and_attend(&cuda, gpu_store, steps, [&g[0], &g[1], &g[2]], heads);
        assert_close(&got, &want);
    };
    let a = gpu_store.pool.new_sequence(None).unwrap();
    assert_eq!(cpu_store.pool.new_sequence(None).unwrap(), a);
    step(&mut cpu_store, &mut gpu_store, &[(a, 6)], 1);
    // b shares a's two chunks; its seventh position lands in the second, which is copied first
    // (positions 4 and 5 travel with it), while a keeps the original.
    let b = gpu_store.pool.fork(a).unwrap();
    assert_eq!(cpu_store.pool.fork(a).unwrap(), b);
    step(&mut cpu_store, &mut gpu_store, &[(b, 1)], 2);
    assert_eq!(gpu_store.pool.stats().copies, 1);
    assert_ne!(
        gpu_store.pool.seq_table(a).unwrap()[1],
        gpu_store.pool.seq_table(b).unwrap()[1]
    );
    // Then both in the same steps, each writing its own positions and seeing only its own:
    // one decode launch over both, then a prefill chunk of a beside b's decode row.
    step(&mut cpu_store, &mut gpu_store, &[(a, 1), (b, 1)], 3);
    step(&mut cpu_store, &mut gpu_store, &[(b, 1), (a, 3)], 4);
    assert_eq!(gpu_store.pool.stats().copies, 1);
}

/// Within the kernels' bf16 output rounding and summation order (see the selftest's attention).
fn assert_close(got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= 4e-3 + 1e-2 * w.abs(),
            "element {i}: {g} vs {w}"
        );
    }
}
