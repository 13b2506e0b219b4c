// RMSNorm of the f32 residual stream into a bf16 matmul input, for steps of many rows (a decode
// row is normalised inside the matvec that reads it: matmul.cu's matvec_rms_norm_*).
#include "common.cuh"
#include "norm.cuh"

#define NORM_THREADS 256

// out[r] = weight * (x[r] / sqrt(mean(x[r]^2) + eps)) rounded to bf16. One block of
// NORM_THREADS per row; dim % 8 == 0.
extern "C" __global__ void rms_norm_f32_to_bf16(const float* x,       // [rows, dim]
                                                const float* weight,  // [dim]
                                                bf16* out,            // [rows, dim]
                                                int dim, float eps) {
    const uint64_t row_offset = (uint64_t)blockIdx.x * dim;
    const float scale = rms_norm_scale<NORM_THREADS>(x + row_offset, dim, eps);
    const float4* x4 = reinterpret_cast<const float4*>(x + row_offset);
    const float4* w4 = reinterpret_cast<const float4*>(weight);
    uint2* dst = reinterpret_cast<uint2*>(out + row_offset);
    for (int v = threadIdx.x; v < dim / 4; v += NORM_THREADS) {
        dst[v] = rms_norm_bf16x4(x4[v], w4[v], scale);
    }
}
