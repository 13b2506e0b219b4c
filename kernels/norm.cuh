// RMSNorm of one f32 row by one block, shared by norm.cu (the norm alone, for many rows) and
// matmul.cu (the norm applied while a matvec stages its input): one code path, so both round
// exactly the same values to bf16.
#pragma once

#include "common.cuh"

// 1 / sqrt(mean(row^2) + eps) of `dim` f32 values (dim % 4 == 0), computed by all
// BLOCK_THREADS threads of the block together; every thread returns it. Contains a barrier:
// every thread of the block calls it. The sum's order is fixed: thread t adds the float4s
// t, t + BLOCK_THREADS, ...; then each warp's butterfly; then the warps' sums in order.
template <int BLOCK_THREADS>
__device__ __forceinline__ float rms_norm_scale(const float* row,  // [dim]
                                                int dim, float eps) {
    __shared__ float warp_sums[BLOCK_THREADS / WARP_SIZE];
    const float4* x4 = reinterpret_cast<const float4*>(row);
    float sum_squares = 0.0f;
    for (int v = threadIdx.x; v < dim / 4; v += BLOCK_THREADS) {
        const float4 x = x4[v];
        sum_squares += x.x * x.x + x.y * x.y + x.z * x.z + x.w * x.w;
    }
    sum_squares = warp_reduce_sum(sum_squares);
    if (threadIdx.x % WARP_SIZE == 0) {
        warp_sums[threadIdx.x / WARP_SIZE] = sum_squares;
    }
    __syncthreads();
    float total = 0.0f;
#pragma unroll
    for (int w = 0; w < BLOCK_THREADS / WARP_SIZE; ++w) {
        total += warp_sums[w];
    }
    return 1.0f / sqrtf(total / (float)dim + eps);
}

// weight * (x * scale) of four values, rounded to bf16 and packed in order.
__device__ __forceinline__ uint2 rms_norm_bf16x4(float4 x, float4 weight, float scale) {
    uint2 packed;
    packed.x = pack_f32_to_bf16x2(weight.x * (x.x * scale), weight.y * (x.y * scale));
    packed.y = pack_f32_to_bf16x2(weight.z * (x.z * scale), weight.w * (x.w * scale));
    return packed;
}
