// Embedding gather and row copies: pure data movement in 16-byte vectors.
#include "common.cuh"

// out[r, :] = table[ids[r], :] as f32 (the residual stream). One block per row; hidden % 8 ==
// 0 (checked by the caller), so each thread reads whole 16-byte vectors of 8 bf16. Ids were
// range-checked on the host.
extern "C" __global__ void embedding_gather_bf16_to_f32(const bf16* table,    // [vocab, hidden]
                                                        const unsigned* ids,  // [rows]
                                                        float* out,           // [rows, hidden]
                                                        int hidden) {
    const int row = blockIdx.x;
    const uint4* src = reinterpret_cast<const uint4*>(table + (uint64_t)ids[row] * hidden);
    float4* dst = reinterpret_cast<float4*>(out + (uint64_t)row * hidden);
    for (int v = threadIdx.x; v < hidden / 8; v += blockDim.x) {
        const uint4 packed = src[v];
        dst[2 * v] = make_float4(bf16x2_lo_to_f32(packed.x), bf16x2_hi_to_f32(packed.x), bf16x2_lo_to_f32(packed.y),
                                 bf16x2_hi_to_f32(packed.y));
        dst[2 * v + 1] = make_float4(bf16x2_lo_to_f32(packed.z), bf16x2_hi_to_f32(packed.z),
                                     bf16x2_lo_to_f32(packed.w), bf16x2_hi_to_f32(packed.w));
    }
}

// dst[i] = src[i] for i < count: copies rows between activation buffers (count % 8 == 0).
extern "C" __global__ void copy_bf16(const bf16* src,  // [count]
                                     bf16* dst,        // [count]
                                     int count) {
    const int v = blockIdx.x * blockDim.x + threadIdx.x;
    if (v < count / 8) {
        reinterpret_cast<uint4*>(dst)[v] = reinterpret_cast<const uint4*>(src)[v];
    }
}
