// The SwiGLU activation of the Llama MLP, for steps of many rows (a decode row is activated
// inside the down projection's matvec: matmul.cu's matvec_swiglu_bf16_add_f32).
#include "common.cuh"
#include "activation.cuh"

// out[i] = silu(gate[i]) * up[i] for i < count, in f32, stored as bf16; out may be gate. One
// thread per 8 elements (count % 8 == 0: rows * intermediate with intermediate % 8 == 0).
extern "C" __global__ void swiglu_bf16(const bf16* gate,  // [count] = [rows, intermediate]
                                       const bf16* up,    // [count]
                                       bf16* out,         // [count]
                                       int count) {
    const int v = blockIdx.x * blockDim.x + threadIdx.x;
    if (v >= count / 8) {
        return;
    }
    reinterpret_cast<uint4*>(out)[v] =
        swiglu_bf16x8(reinterpret_cast<const uint4*>(gate)[v], reinterpret_cast<const uint4*>(up)[v]);
}
