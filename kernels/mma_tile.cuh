// Shared-memory tiles of bf16 rows for ldmatrix + mma.sync (kernels/matmul.cu, attention.cu).
//
// A tile row is CHUNKS_PER_ROW 16-byte chunks (8 bf16 each). ldmatrix reads one chunk column
// from 8 consecutive rows; without a swizzle those 8 chunks share bank groups whenever a row is
// 64 bytes or more. XOR-ing the chunk index with bits of the row index puts the 8 chunks into
// the 8 different 16-byte bank groups of a 128-byte line, for every CHUNKS_PER_ROW >= 2, and
// cp.async writes of whole rows stay conflict-free too.
#pragma once

#include "common.cuh"

template <int CHUNKS_PER_ROW>
__device__ __forceinline__ int swizzled_chunk(int row, int chunk) {
    static_assert(CHUNKS_PER_ROW >= 2 && (CHUNKS_PER_ROW & (CHUNKS_PER_ROW - 1)) == 0,
                  "tile rows are a power of two of 16-byte chunks, at least 2");
    if constexpr (CHUNKS_PER_ROW >= 8) {
        return chunk ^ (row & 7);
    } else {
        return chunk ^ ((row / (8 / CHUNKS_PER_ROW)) & (CHUNKS_PER_ROW - 1));
    }
}

// Address of 16-byte chunk `chunk` of row `row` in a tile `[rows][CHUNKS_PER_ROW * 8]` bf16.
template <int CHUNKS_PER_ROW>
__device__ __forceinline__ bf16* tile_chunk(bf16* tile, int row, int chunk) {
    return tile + row * (CHUNKS_PER_ROW * 8) + swizzled_chunk<CHUNKS_PER_ROW>(row, chunk) * 8;
}

// Copies 16 bytes global -> shared asynchronously, or zero-fills the shared chunk when the
// source lies outside the tensor (tile edges): every byte a later ldmatrix reads is written.
__device__ __forceinline__ void cp_async_16_or_zero(bf16* smem_dst, const bf16* gmem_src, bool in_bounds) {
    if (in_bounds) {
        cp_async_16(smem_dst, gmem_src);
    } else {
        *reinterpret_cast<uint4*>(smem_dst) = make_uint4(0u, 0u, 0u, 0u);
    }
}
