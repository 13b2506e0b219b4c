// Quantized K/V rows on the device: the mirror of src/kv/quant.rs, with the same formulas, so
// that a row quantized here has exactly the codes and scales the CPU backend gives the same f32
// values (the selftest compares the two backends' arenas byte for byte).
//
// int8: `code = round(x / scale)` (ties to even), `scale = max|group| / 127`; a key row has one
// scale per KV_INT8_KEY_GROUP channels, a value row one. fp8 e4m3 (OCP E4M3FN: bias 7, 3
// mantissa bits, no infinities, largest finite 448): `code = e4m3(x / scale)`, rounded to
// nearest even and saturated, `scale = max|row| / 448`. A row's scales sit where
// `kv_row_offsets(...).scale` points (kv_layout.cuh).
#pragma once

#include "common.cuh"
#include "kv_layout.cuh"

// Largest int8 code magnitude (`INT8_MAX_CODE`): codes are -127..=127.
#define KV_INT8_MAX_CODE 127
// Largest finite e4m3 value (`E4M3_MAX`) and its code (`E4M3_MAX_CODE`, `0.1111.110`).
#define KV_E4M3_MAX 448
#define KV_E4M3_MAX_CODE 0x7e
// The e4m3 NaN code's magnitude bits (`E4M3_NAN_CODE`).
#define KV_E4M3_NAN_CODE 0x7f
// f32's exponent bias minus e4m3's (`E4M3_TO_F32_EXPONENT_SHIFT`).
#define KV_E4M3_TO_F32_EXPONENT_SHIFT 120
// The longest head_dim row a warp quantizes: KV_QUANT_MAX_HEAD_DIM / 32 elements a lane.
#define KV_QUANT_MAX_HEAD_DIM 256
#define KV_QUANT_PER_LANE (KV_QUANT_MAX_HEAD_DIM / WARP_SIZE)

// The e4m3 code nearest to `x` (ties to the even mantissa), saturated to +-448; NaN gives the NaN
// code (`e4m3_encode`).
__device__ __forceinline__ uint32_t e4m3_encode(float x) {
    const uint32_t sign = (__float_as_uint(x) >> 24) & 0x80u;
    const float a = fabsf(x);
    if (a != a) {
        return sign | KV_E4M3_NAN_CODE;
    }
    // Below the smallest normal (2^-6) the codes are m * 2^-9, m = 0..8 (8 is 2^-6's own code):
    // a * 512 is exact.
    if (a < 0.015625f) {
        return sign | (uint32_t)__float2int_rn(a * 512.0f);
    }
    if (a >= (float)KV_E4M3_MAX) {
        return sign | KV_E4M3_MAX_CODE;
    }
    // f32's 23 mantissa bits rounded to 3, ties to even; a carry moves into the exponent.
    const uint32_t bits = __float_as_uint(a);
    const uint32_t rounded = (bits + 0x7ffffu + ((bits >> 20) & 1u)) >> 20;
    return sign | (rounded - ((uint32_t)KV_E4M3_TO_F32_EXPONENT_SHIFT << 3));
}

// The value of an e4m3 code (`e4m3_decode`; never a NaN code: none is stored). Its exponent and
// mantissa bits placed at bit 20 of an f32 read 2^-120 times the value, for normal and
// subnormal codes alike; the product with 2^120 is exact.
__device__ __forceinline__ float e4m3_decode(uint32_t code) {
    const float magnitude = __uint_as_float((code & 0x7fu) << 20) * 0x1p120f;
    return __uint_as_float(__float_as_uint(magnitude) | ((code & 0x80u) << 24));
}

// The value of an int8 code held in the low byte of `byte`.
__device__ __forceinline__ float int8_decode(uint32_t byte) {
    return (float)(int)(int8_t)(uint8_t)byte;
}

// Code `i` (0..3) of four packed in a 32-bit word, dequantized without its scale.
template <unsigned DTYPE>
__device__ __forceinline__ float kv_code_value(uint32_t word, int i) {
    static_assert(DTYPE == KV_DTYPE_INT8 || DTYPE == KV_DTYPE_FP8_E4M3, "a quantized KV type");
    const uint32_t byte = (word >> (8 * i)) & 0xffu;
    return DTYPE == KV_DTYPE_INT8 ? int8_decode(byte) : e4m3_decode(byte);
}

// Quantizes one head_dim row of `part` held by a warp and stores its codes at `codes` and its
// scales at `scales` (the row's places in the arena, from kv_row_offsets). Lane l holds elements
// l + 32 j in x[j] (zero past head_dim), so the KV_INT8_KEY_GROUP channels of a key group are
// held by the 16 lanes of one half-warp. Warp-collective: every lane calls it.
__device__ __forceinline__ void kv_store_quantized_row(const float x[KV_QUANT_PER_LANE],
                                                       const KvLayout& layout, unsigned part,
                                                       uint8_t* codes,  // [head_dim]: the row's codes
                                                       float* scales) { // [kv_scales_per_row]
    const int lane = threadIdx.x % WARP_SIZE;
    const int head_dim = (int)layout.head_dim;
    const bool int8 = layout.dtype == KV_DTYPE_INT8;
    const bool grouped = int8 && part == KV_PART_KEY;
    const float max_code = int8 ? (float)KV_INT8_MAX_CODE : (float)KV_E4M3_MAX;
    float scale[KV_QUANT_PER_LANE];
    float row_max = 0.0f;
#pragma unroll
    for (int j = 0; j < KV_QUANT_PER_LANE; ++j) {
        float group_max = fabsf(x[j]);
        if (grouped) {
#pragma unroll
            for (int offset = KV_INT8_KEY_GROUP / 2; offset > 0; offset >>= 1) {
                group_max = fmaxf(group_max, __shfl_xor_sync(FULL_WARP_MASK, group_max, offset));
            }
            scale[j] = group_max / max_code;
        } else {
            row_max = fmaxf(row_max, group_max);
        }
    }
    if (!grouped) {
        const float row_scale = warp_reduce_max(row_max) / max_code;
#pragma unroll
        for (int j = 0; j < KV_QUANT_PER_LANE; ++j) {
            scale[j] = row_scale;
        }
    }
#pragma unroll
    for (int j = 0; j < KV_QUANT_PER_LANE; ++j) {
        const int e = lane + WARP_SIZE * j;
        if (e < head_dim) {
            const float ratio = scale[j] > 0.0f ? x[j] / scale[j] : 0.0f;
            codes[e] = (uint8_t)(int8 ? (uint32_t)__float2int_rn(ratio) : e4m3_encode(ratio));
            if (grouped ? e % KV_INT8_KEY_GROUP == 0 : e == 0) {
                scales[grouped ? e / KV_INT8_KEY_GROUP : 0] = scale[j];
            }
        }
    }
}
