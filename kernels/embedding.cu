// Embedding gather and the doubled input of bf16-pair weights: pure data movement in 16-byte
// vectors.
#include "common.cuh"

// out_row = table[id, :] as f32 (a row of the residual stream), by the threads of one block. A
// table stored as bf16 pairs (table_cols = 2 * hidden: the bf16 value, then its rounding error;
// see duplicate_columns_bf16) sums the two halves. hidden % 8 == 0 (checked by the caller), so
// each thread reads whole 16-byte vectors of 8 bf16.
__device__ __forceinline__ void embedding_gather_row(const bf16* table,  // [vocab, table_cols]
                                                     unsigned id,
                                                     float* out_row,     // [hidden]
                                                     int hidden, int table_cols) {
    const bf16* table_row = table + (uint64_t)id * table_cols;
    const uint4* high = reinterpret_cast<const uint4*>(table_row);
    const uint4* low = table_cols > hidden ? reinterpret_cast<const uint4*>(table_row + hidden) : nullptr;
    float4* dst = reinterpret_cast<float4*>(out_row);
    for (int v = threadIdx.x; v < hidden / 8; v += blockDim.x) {
        const uint4 h = high[v];
        const uint4 l = low != nullptr ? low[v] : make_uint4(0u, 0u, 0u, 0u);
        dst[2 * v] = make_float4(bf16x2_lo_to_f32(h.x) + bf16x2_lo_to_f32(l.x), bf16x2_hi_to_f32(h.x) + bf16x2_hi_to_f32(l.x),
                                 bf16x2_lo_to_f32(h.y) + bf16x2_lo_to_f32(l.y), bf16x2_hi_to_f32(h.y) + bf16x2_hi_to_f32(l.y));
        dst[2 * v + 1] =
            make_float4(bf16x2_lo_to_f32(h.z) + bf16x2_lo_to_f32(l.z), bf16x2_hi_to_f32(h.z) + bf16x2_hi_to_f32(l.z),
                        bf16x2_lo_to_f32(h.w) + bf16x2_lo_to_f32(l.w), bf16x2_hi_to_f32(h.w) + bf16x2_hi_to_f32(l.w));
    }
}

// out[r, :] = table[ids[r], :] as f32 (the residual stream), one block per row. Ids were
// range-checked on the host.
extern "C" __global__ void embedding_gather_bf16_to_f32(const bf16* table,    // [vocab, table_cols]
                                                        const unsigned* ids,  // [rows]
                                                        float* out,           // [rows, hidden]
                                                        int hidden, int table_cols) {
    grid_dependency_wait();  // before any access: the previous step's kernels may still read `out`
    grid_dependents_launch();
    embedding_gather_row(table, ids[blockIdx.x], out + (uint64_t)blockIdx.x * hidden, hidden, table_cols);
}

// out[0, :] = table[the id argmax_f32 chose last, :] as f32: the input of a decode step whose
// token never went through the host. `chosen` is argmax_f32's: the count n of ids chosen, then
// a ring of the latest `ring` of them (the last at 1 + (n - 1) % ring); the id is an index of
// the logits, so inside the vocabulary. One block.
extern "C" __global__ void embedding_gather_chosen_bf16_to_f32(const bf16* table,       // [vocab, table_cols]
                                                               const unsigned* chosen,  // [1 + ring]
                                                               float* out,              // [1, hidden]
                                                               int hidden, int table_cols, int ring) {
    grid_dependency_wait();  // before any access: `chosen` is argmax_f32's, `out` other kernels' too
    grid_dependents_launch();
    const unsigned id = chosen[1 + (chosen[0] - 1u) % (unsigned)ring];
    embedding_gather_row(table, id, out, hidden, table_cols);
}

// dst[r] = [src[r], src[r]]: the input of a matmul against a weight stored as bf16 pairs
// `[n, 2k]` (the bf16 value of each f16 / f32 checkpoint weight, then the bf16 rounding error),
// so that the tensor-core matmul computes x . high + x . low, about 16 significant bits of the
// weight (a matvec stages its input twice itself). One thread per 16-byte vector of src
// (cols % 8 == 0).
extern "C" __global__ void duplicate_columns_bf16(const bf16* src,  // [rows, cols]
                                                  bf16* dst,        // [rows, 2 * cols]
                                                  int rows, int cols) {
    const int vectors_per_row = cols / 8;
    const int v = blockIdx.x * blockDim.x + threadIdx.x;
    if (v >= rows * vectors_per_row) {
        return;
    }
    const int row = v / vectors_per_row;
    const int column = v % vectors_per_row;
    const uint4 value = reinterpret_cast<const uint4*>(src)[v];
    uint4* dst_row = reinterpret_cast<uint4*>(dst + (uint64_t)row * 2 * cols);
    dst_row[column] = value;
    dst_row[vectors_per_row + column] = value;
}
