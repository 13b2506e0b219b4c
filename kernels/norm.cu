// RMSNorm, optionally fused with the residual add that precedes it in every Llama sublayer.
#include "common.cuh"

#define NORM_THREADS 256

// For each row r: residual[r] += delta[r] (rounded to bf16, the stored residual stream), then
// out[r] = weight * (residual[r] / sqrt(mean(residual[r]^2) + eps)), statistics in f32.
// `delta` may be null (the norm alone). One block of NORM_THREADS per row; dim % 8 == 0.
extern "C" __global__ void add_rms_norm_bf16(bf16* residual,       // [rows, dim]
                                             const bf16* delta,    // [rows, dim] or null
                                             const float* weight,  // [dim]
                                             bf16* out,            // [rows, dim]
                                             int dim, float eps) {
    __shared__ float warp_sums[NORM_THREADS / WARP_SIZE];
    const uint64_t row_offset = (uint64_t)blockIdx.x * dim;
    uint4* res = reinterpret_cast<uint4*>(residual + row_offset);
    const int vectors = dim / 8;

    float sum_squares = 0.0f;
    for (int v = threadIdx.x; v < vectors; v += NORM_THREADS) {
        uint4 packed = res[v];
        uint32_t* words = reinterpret_cast<uint32_t*>(&packed);
        if (delta != nullptr) {
            uint4 delta_packed = reinterpret_cast<const uint4*>(delta + row_offset)[v];
            const uint32_t* delta_words = reinterpret_cast<const uint32_t*>(&delta_packed);
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                words[i] = pack_f32_to_bf16x2(bf16x2_lo_to_f32(words[i]) + bf16x2_lo_to_f32(delta_words[i]),
                                              bf16x2_hi_to_f32(words[i]) + bf16x2_hi_to_f32(delta_words[i]));
            }
            res[v] = packed;
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const float lo = bf16x2_lo_to_f32(words[i]);
            const float hi = bf16x2_hi_to_f32(words[i]);
            sum_squares += lo * lo + hi * hi;
        }
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

    uint4* dst = reinterpret_cast<uint4*>(out + row_offset);
    for (int v = threadIdx.x; v < vectors; v += NORM_THREADS) {
        const uint4 packed = res[v];
        const uint32_t* words = reinterpret_cast<const uint32_t*>(&packed);
        const float4 w_lo = reinterpret_cast<const float4*>(weight)[2 * v];
        const float4 w_hi = reinterpret_cast<const float4*>(weight)[2 * v + 1];
        uint4 result;
        result.x = pack_f32_to_bf16x2(w_lo.x * (bf16x2_lo_to_f32(words[0]) * scale),
                                      w_lo.y * (bf16x2_hi_to_f32(words[0]) * scale));
        result.y = pack_f32_to_bf16x2(w_lo.z * (bf16x2_lo_to_f32(words[1]) * scale),
                                      w_lo.w * (bf16x2_hi_to_f32(words[1]) * scale));
        result.z = pack_f32_to_bf16x2(w_hi.x * (bf16x2_lo_to_f32(words[2]) * scale),
                                      w_hi.y * (bf16x2_hi_to_f32(words[2]) * scale));
        result.w = pack_f32_to_bf16x2(w_hi.z * (bf16x2_lo_to_f32(words[3]) * scale),
                                      w_hi.w * (bf16x2_hi_to_f32(words[3]) * scale));
        dst[v] = result;
    }
}
