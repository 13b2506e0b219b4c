// The SwiGLU activation of the Llama MLP, shared by activation.cu (many rows) and matmul.cu
// (applied while the down projection's matvec stages its input): one code path, one rounding.
#pragma once

#include "common.cuh"

__device__ __forceinline__ float silu_times(float gate, float up) {
    return gate / (1.0f + expf(-gate)) * up;
}

// silu(gate) * up of eight bf16 pairs, in f32, rounded to bf16.
__device__ __forceinline__ uint4 swiglu_bf16x8(uint4 gate, uint4 up) {
    uint32_t* g_words = reinterpret_cast<uint32_t*>(&gate);
    const uint32_t* u_words = reinterpret_cast<const uint32_t*>(&up);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        g_words[i] = pack_f32_to_bf16x2(silu_times(bf16x2_lo_to_f32(g_words[i]), bf16x2_lo_to_f32(u_words[i])),
                                        silu_times(bf16x2_hi_to_f32(g_words[i]), bf16x2_hi_to_f32(u_words[i])));
    }
    return gate;
}
