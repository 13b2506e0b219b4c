// The SwiGLU activation of the Llama MLP.
#include "common.cuh"

__device__ __forceinline__ float silu_times(float gate, float up) {
    return gate / (1.0f + expf(-gate)) * up;
}

// gate[i] = silu(gate[i]) * up[i] for i < count, in f32, stored as bf16. One thread per 8
// elements (count % 8 == 0: rows * intermediate with intermediate % 8 == 0).
extern "C" __global__ void swiglu_bf16(bf16* gate,      // [count] = [rows, intermediate]
                                       const bf16* up,  // [count]
                                       int count) {
    const int v = blockIdx.x * blockDim.x + threadIdx.x;
    if (v >= count / 8) {
        return;
    }
    uint4 g = reinterpret_cast<const uint4*>(gate)[v];
    const uint4 u = reinterpret_cast<const uint4*>(up)[v];
    uint32_t* g_words = reinterpret_cast<uint32_t*>(&g);
    const uint32_t* u_words = reinterpret_cast<const uint32_t*>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        g_words[i] = pack_f32_to_bf16x2(silu_times(bf16x2_lo_to_f32(g_words[i]), bf16x2_lo_to_f32(u_words[i])),
                                        silu_times(bf16x2_hi_to_f32(g_words[i]), bf16x2_hi_to_f32(u_words[i])));
    }
    reinterpret_cast<uint4*>(gate)[v] = g;
}
