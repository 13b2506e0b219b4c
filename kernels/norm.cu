// RMSNorm, fused with the residual add that precedes it in every Llama sublayer.
#include "common.cuh"

#define NORM_THREADS 256

// For each row r: residual[r] += delta[r], then
// out[r] = weight * (residual[r] / sqrt(mean(residual[r]^2) + eps)) rounded to bf16.
// The residual stream and the sublayer output added to it stay f32 (they accumulate across
// layers; the normed output only feeds matmuls). `delta` may be null (the norm alone).
// One block of NORM_THREADS per row; dim % 8 == 0.
extern "C" __global__ void add_rms_norm_f32_to_bf16(float* residual,      // [rows, dim]
                                                    const float* delta,   // [rows, dim] or null
                                                    const float* weight,  // [dim]
                                                    bf16* out,            // [rows, dim]
                                                    int dim, float eps) {
    __shared__ float warp_sums[NORM_THREADS / WARP_SIZE];
    const uint64_t row_offset = (uint64_t)blockIdx.x * dim;
    float4* res = reinterpret_cast<float4*>(residual + row_offset);
    const float4* add = delta != nullptr ? reinterpret_cast<const float4*>(delta + row_offset) : nullptr;
    const int vectors = dim / 4;

    float sum_squares = 0.0f;
    for (int v = threadIdx.x; v < vectors; v += NORM_THREADS) {
        float4 x = res[v];
        if (add != nullptr) {
            const float4 d = add[v];
            x.x += d.x;
            x.y += d.y;
            x.z += d.z;
            x.w += d.w;
            res[v] = x;
        }
        sum_squares += x.x * x.x + x.y * x.y + x.z * x.z + x.w * x.w;
    }
    sum_squares = warp_reduce_sum(sum_squares);
    if (threadIdx.x % WARP_SIZE == 0) {
        warp_sums[threadIdx.x / WARP_SIZE] = sum_squares;
    }
    __syncthreads();
    float total = 0.0f;
#pragma unroll
    for (int w = 0; w < NORM_THREADS / WARP_SIZE; ++w) {
        total += warp_sums[w];
    }
    const float scale = 1.0f / sqrtf(total / (float)dim + eps);

    const float4* w4 = reinterpret_cast<const float4*>(weight);
    uint2* dst = reinterpret_cast<uint2*>(out + row_offset);
    for (int v = threadIdx.x; v < vectors; v += NORM_THREADS) {
        const float4 x = res[v];
        const float4 w = w4[v];
        uint2 packed;
        packed.x = pack_f32_to_bf16x2(w.x * (x.x * scale), w.y * (x.y * scale));
        packed.y = pack_f32_to_bf16x2(w.z * (x.z * scale), w.w * (x.w * scale));
        dst[v] = packed;
    }
}
