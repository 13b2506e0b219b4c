// The rotation of RoPE's half-split (`rotate_half`) layout, shared by rope.cu (q and k rotated
// in place) and kv_cache.cu (k rotated on its way into the arena): one code path, so both write
// exactly the same bits.
#pragma once

#include "common.cuh"

// Rotates the pair (x[i], x[i + half]) of one head by angle = float(position) * inv_freq (which
// already carries the llama3 frequency scaling) into (out[i], out[i + half]); out may be x:
//   out[i] = x[i] cos - x[i + half] sin,   out[i + half] = x[i + half] cos + x[i] sin.
__device__ __forceinline__ void rope_rotate_pair(const bf16* x,  // [head_dim]: one head
                                                 bf16* out,      // [head_dim]: one head
                                                 int i, int half, float inv_freq, unsigned position) {
    const float angle = (float)position * inv_freq;
    float sin_angle, cos_angle;
    sincosf(angle, &sin_angle, &cos_angle);
    const float x1 = bf16_to_f32(x[i]);
    const float x2 = bf16_to_f32(x[i + half]);
    out[i] = f32_to_bf16(x1 * cos_angle - x2 * sin_angle);
    out[i + half] = f32_to_bf16(x2 * cos_angle + x1 * sin_angle);
}
