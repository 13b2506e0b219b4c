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

/// Appends `rows` positions of K/V to `seq` in layer 1 and returns the attention of `q` over
/// the sequence after them.
fn append_and_attend<B: Backend>(
    b: &B,
    store: &mut KvStore<B>,
    seq: SeqId,
    [q, k, v]: [&B::Tensor; 3],
    rows: usize,
    heads: usize,
) -> Vec<f32> {
    let view = store.prepare_step(b, &[(seq, rows)]).unwrap();
    b.set_kv_step(&mut store.memory, &view).unwrap();
    b.kv_append(&mut store.memory, &view, 1, k, v).unwrap();
    let mut out = b.alloc(rows, heads * 16).unwrap();
    b.attention(q, &store.memory, &view, 1, heads, &mut out)
        .unwrap();
    store.pool.commit(seq, &vec![0; rows]).unwrap();
    b.read_rows(&out, 0, rows).unwrap()
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
    let mut outputs = Vec::new();
    for (rows, seed) in [(6, 1), (1, 2), (1, 3), (1, 4)] {
        let q = values(rows * heads * head_dim, seed);
        let k = values(rows * kv_heads * head_dim, seed + 10);
        let v = values(rows * kv_heads * head_dim, seed + 20);
        let cpu_t = |x: &[f32], cols| CpuTensor {
            data: x.to_vec(),
            cols,
        };
        let (cq, ck, cv) = (
            cpu_t(&q, heads * head_dim),
            cpu_t(&k, kv_heads * head_dim),
            cpu_t(&v, kv_heads * head_dim),
        );
        let gq = cuda.upload_tensor(rows, heads * head_dim, &q).unwrap();
        let gk = cuda.upload_tensor(rows, kv_heads * head_dim, &k).unwrap();
        let gv = cuda.upload_tensor(rows, kv_heads * head_dim, &v).unwrap();
        outputs.push((rows, [cq, ck, cv], [gq, gk, gv]));
    }
    let (a_gpu, a_cpu) = (
        gpu_store.pool.new_sequence(None).unwrap(),
        cpu_store.pool.new_sequence(None).unwrap(),
    );
    let (rows, c, g) = &outputs[0];
    let want = append_and_attend(
        &cpu,
        &mut cpu_store,
        a_cpu,
        [&c[0], &c[1], &c[2]],
        *rows,
        heads,
    );
    let got = append_and_attend(
        &cuda,
        &mut gpu_store,
        a_gpu,
        [&g[0], &g[1], &g[2]],
        *rows,
        heads,
    );
    assert_close(&got, &want);
    // b shares a's two chunks; its seventh position lands in the second, which is copied first
    // (positions 4 and 5 travel with it), while a keeps the original.
    let (b_gpu, b_cpu) = (
        gpu_store.pool.fork(a_gpu).unwrap(),
        cpu_store.pool.fork(a_cpu).unwrap(),
    );
    let (rows, c, g) = &outputs[1];
    let want = append_and_attend(
        &cpu,
        &mut cpu_store,
        b_cpu,
        [&c[0], &c[1], &c[2]],
        *rows,
        heads,
    );
    let got = append_and_attend(
        &cuda,
        &mut gpu_store,
        b_gpu,
        [&g[0], &g[1], &g[2]],
        *rows,
        heads,
    );
    assert_eq!(gpu_store.pool.stats().copies, 1);
    assert_ne!(
        gpu_store.pool.seq_table(a_gpu).unwrap()[1],
        gpu_store.pool.seq_table(b_gpu).unwrap()[1]
    );
    assert_close(&got, &want);
    // Each then writes its own seventh position and sees only its own.
    for (seq, (rows, c, g)) in [(a_gpu, &outputs[2]), (b_gpu, &outputs[3])] {
        let cpu_seq = if seq == a_gpu { a_cpu } else { b_cpu };
        let want = append_and_attend(
            &cpu,
            &mut cpu_store,
            cpu_seq,
            [&c[0], &c[1], &c[2]],
            *rows,
            heads,
        );
        let got = append_and_attend(
            &cuda,
            &mut gpu_store,
            seq,
            [&g[0], &g[1], &g[2]],
            *rows,
            heads,
        );
        assert_close(&got, &want);
    }
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
