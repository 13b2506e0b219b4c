// The one shared device header of kvlab's kernels.
//
// Every kernels/*.cu starts with `#include "common.cuh"`. The same text compiles two ways:
// - CUDA (NVRTC, sm_80 / sm_90): no system headers exist, so integer typedefs live here and
//   tensor-core / async-copy wrappers are inline PTX.
// - The CPU emulator: the host C++ compiler with `-include kernels/emu/cuda_emu.h`, which defines
//   KVLAB_EMU and supplies CUDA's vocabulary; the wrappers below call its warp-collective
//   implementations of the documented PTX fragment layouts.
//
// Adding a kernel: write it in a kernels/*.cu (one file per op family); build.rs finds it, the
// emulator build and NVRTC compile it, and the Rust side launches it by name through
// `Device::launch(name, LaunchConfig, &[KernelArg])`, which checks the arguments. Headers shared
// by several files go in kernels/*.cuh (NVRTC receives every one of them as a named header).
//
// Kernel conventions (build.rs parses them; the launch path checks arguments against them):
// - `extern "C" __global__ void name(...)`, no templates at the __global__ level.
// - Arguments only: pointers (`T*`, `const T*`), `int`, `unsigned`, `float`, and `KvLayout`
//   (kv_layout.cuh) by value.
// - Every pointer argument carries a shape comment, e.g. `const float* x,  // [rows, cols]`.
// - Every barrier is reached by every thread of the block: no early `return` before a
//   `__syncthreads()` (CUDA: undefined behaviour; the emulator reports it).
#pragma once

#ifndef KVLAB_EMU
typedef signed char int8_t;
typedef unsigned char uint8_t;
typedef short int16_t;
typedef unsigned short uint16_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef long long int64_t;
typedef unsigned long long uint64_t;
// NVRTC has no <math.h> / <float.h>; the emulator build gets these from the C++ headers.
#define INFINITY __int_as_float(0x7f800000)
#define NAN __int_as_float(0x7fffffff)
#define FLT_MAX 3.402823466e+38f
#endif

#define WARP_SIZE 32
#define FULL_WARP_MASK 0xffffffffu

// Declares `type* name` pointing at the block's dynamic shared memory (the launch's
// shared_mem_bytes), 16-byte aligned.
#ifdef KVLAB_EMU
#define DYNAMIC_SHARED(type, name) type* name = reinterpret_cast<type*>(kvlab_emu::dynamic_shared_base())
#else
#define DYNAMIC_SHARED(type, name)                                        \
    extern __shared__ __align__(16) unsigned char kvlab_dynamic_shared_[]; \
    type* name = reinterpret_cast<type*>(kvlab_dynamic_shared_)
#endif

// ---------------------------------------------------------------------------------------------
// bf16 and f16: plain 2-byte structs, identical in both builds (no cuda_bf16.h under NVRTC).

struct bf16 {
    uint16_t bits;
};

struct f16 {
    uint16_t bits;
};

__device__ __forceinline__ float bf16_to_f32(bf16 h) {
    return __uint_as_float(((uint32_t)h.bits) << 16);
}

// Round to nearest even; NaN stays NaN (quiet), infinities and overflow to inf as in IEEE.
__device__ __forceinline__ bf16 f32_to_bf16(float f) {
    uint32_t u = __float_as_uint(f);
    bf16 out;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        out.bits = (uint16_t)((u >> 16) | 0x0040u);
    } else {
        out.bits = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
    return out;
}

// Two bf16 packed in one 32-bit register as mma fragments hold them: `lo` in bits 0..15.
__device__ __forceinline__ uint32_t pack_bf16x2(bf16 lo, bf16 hi) {
    return (uint32_t)lo.bits | ((uint32_t)hi.bits << 16);
}

__device__ __forceinline__ uint32_t pack_f32_to_bf16x2(float lo, float hi) {
    return pack_bf16x2(f32_to_bf16(lo), f32_to_bf16(hi));
}

__device__ __forceinline__ float bf16x2_lo_to_f32(uint32_t packed) {
    return __uint_as_float(packed << 16);
}

__device__ __forceinline__ float bf16x2_hi_to_f32(uint32_t packed) {
    return __uint_as_float(packed & 0xffff0000u);
}

__device__ __forceinline__ float f16_to_f32(f16 h) {
    uint32_t sign = ((uint32_t)h.bits & 0x8000u) << 16;
    uint32_t exponent = ((uint32_t)h.bits >> 10) & 0x1fu;
    uint32_t mantissa = (uint32_t)h.bits & 0x3ffu;
    if (exponent == 0x1fu) {
        return __uint_as_float(sign | 0x7f800000u | (mantissa << 13));
    }
    if (exponent == 0) {
        // Zero or subnormal: mantissa * 2^-24, exact in f32.
        float magnitude = (float)mantissa * 5.9604644775390625e-8f;
        return sign ? -magnitude : magnitude;
    }
    return __uint_as_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

// Round to nearest even, with f16 subnormals, overflow to inf, NaN kept quiet.
__device__ __forceinline__ f16 f32_to_f16(float f) {
    uint32_t u = __float_as_uint(f);
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t magnitude = u & 0x7fffffffu;
    f16 out;
    if (magnitude > 0x7f800000u) {
        out.bits = (uint16_t)(sign | 0x7e00u | ((magnitude >> 13) & 0x3ffu));
    } else if (magnitude >= 0x477ff000u) {
        // >= 65520 rounds to infinity.
        out.bits = (uint16_t)(sign | 0x7c00u);
    } else if (magnitude < 0x38800000u) {
        // Below the smallest normal f16 (2^-14): the f16 subnormal integer is x * 2^24 rounded
        // to nearest even, i.e. the 24-bit significand shifted right by 126 - exponent.
        uint32_t exponent = magnitude >> 23;
        uint32_t shift = 126u - exponent;
        if (shift > 24u) {
            out.bits = (uint16_t)sign;
        } else {
            uint32_t significand = (magnitude & 0x7fffffu) | 0x800000u;
            uint32_t integer = significand >> shift;
            uint32_t remainder = significand & ((1u << shift) - 1u);
            uint32_t half = 1u << (shift - 1u);
            if (remainder > half || (remainder == half && (integer & 1u))) {
                integer += 1u;
            }
            out.bits = (uint16_t)(sign | integer);
        }
    } else {
        uint32_t rounded = magnitude + 0xfffu + ((magnitude >> 13) & 1u);
        out.bits = (uint16_t)(sign | ((rounded - 0x38000000u) >> 13));
    }
    return out;
}

// ---------------------------------------------------------------------------------------------
// Warp reductions: butterfly over the full warp; every lane ends with the result.

__device__ __forceinline__ float warp_reduce_sum(float value) {
#pragma unroll
    for (int offset = WARP_SIZE / 2; offset > 0; offset >>= 1) {
        value += __shfl_xor_sync(FULL_WARP_MASK, value, offset);
    }
    return value;
}

__device__ __forceinline__ float warp_reduce_max(float value) {
#pragma unroll
    for (int offset = WARP_SIZE / 2; offset > 0; offset >>= 1) {
        value = fmaxf(value, __shfl_xor_sync(FULL_WARP_MASK, value, offset));
    }
    return value;
}

// A global load that bypasses L1 (ld.global.cg): a value another block wrote during this launch
// and made visible with __threadfence (a split reduction's partials). Issue several before using
// the first to have them in flight together.
__device__ __forceinline__ float load_past_l1(const float* address) {
#ifdef KVLAB_EMU
    return *reinterpret_cast<const volatile float*>(address);
#else
    float value;
    asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(value) : "l"(address) : "memory");
    return value;
#endif
}

// ---------------------------------------------------------------------------------------------
// Programmatic dependent launch (sm_90+; LaunchConfig::programmatic on the Rust side). A kernel
// launched with it may start while the previous kernel of the stream still runs.
// grid_dependency_wait() returns once that kernel has completed and its writes are visible; since
// that kernel waited for its own predecessor, so has every earlier one. Every thread of such a
// kernel calls it before its first read of anything a kernel writes (activations, the residual
// stream, the KV arena, the step view, chosen ids, counters) and before its first global write:
// only reads of weights, which no kernel writes, may come before it. grid_dependents_launch()
// lets the next kernel start (and issue its own weight loads); called right after the wait, so
// at most two grids of a step are in flight. Both are no-ops without the launch attribute and
// below sm_90. The emulator runs launches one after another, so the wait has nothing to wait
// for there; it checks that every thread of a programmatic launch reaches it.
#ifdef KVLAB_EMU
__device__ __forceinline__ void grid_dependency_wait() {
    kvlab_emu::grid_dependency_wait();
}
__device__ __forceinline__ void grid_dependents_launch() {}
#else
__device__ __forceinline__ void grid_dependency_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void grid_dependents_launch() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
#endif

// ---------------------------------------------------------------------------------------------
// Tensor cores and async copies (sm_80+). All are warp-collective except cp.async.
//
// mma.sync.m16n8k16.row.col.f32.bf16.bf16.f32: D[16x8] = A[16x16] * B[16x8] + C[16x8].
// With g = lane >> 2, t = lane & 3 (PTX ISA, "Matrix Fragments for mma.m16n8k16"):
//   A (4 regs, 2 bf16 each, low half first): a[0] = A[g][2t..2t+1],   a[1] = A[g+8][2t..2t+1],
//                                            a[2] = A[g][2t+8..2t+9], a[3] = A[g+8][2t+8..2t+9]
//   B (2 regs): b[i] holds B[k][g] for k = 2t + (i ? 8 : 0) + {0, 1}
//   C, D (4 f32): c[i] = C[g + (i >= 2 ? 8 : 0)][2t + (i & 1)]
//
// ldmatrix.m8n8.b16 (x1/x2/x4): lanes 8m..8m+7 give the row addresses (16 bytes, 16-aligned,
// shared memory) of rows 0..7 of matrix m; lane l receives r[m] = M_m[l >> 2][2(l & 3) .. +1].
// With .trans it receives r[m] = {M_m[2(l & 3)][l >> 2], M_m[2(l & 3) + 1][l >> 2]}.
// x2 reads addresses from lanes 0..15, x1 from lanes 0..7; the other lanes' pointers are ignored.
//
// cp.async.cg 16 bytes global -> shared; groups complete in commit order.

#ifdef KVLAB_EMU

__device__ __forceinline__ void mma_m16n8k16_bf16(float d[4], const uint32_t a[4], const uint32_t b[2],
                                                  const float c[4]) {
    kvlab_emu::mma_m16n8k16_bf16(d, a, b, c);
}
__device__ __forceinline__ void ldmatrix_x1(uint32_t r[1], const void* smem_row_ptr) {
    kvlab_emu::ldmatrix(r, 1, false, smem_row_ptr);
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t r[2], const void* smem_row_ptr) {
    kvlab_emu::ldmatrix(r, 2, false, smem_row_ptr);
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* smem_row_ptr) {
    kvlab_emu::ldmatrix(r, 4, false, smem_row_ptr);
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t r[2], const void* smem_row_ptr) {
    kvlab_emu::ldmatrix(r, 2, true, smem_row_ptr);
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void* smem_row_ptr) {
    kvlab_emu::ldmatrix(r, 4, true, smem_row_ptr);
}
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src) {
    kvlab_emu::cp_async_16(smem_dst, gmem_src);
}
__device__ __forceinline__ void cp_async_commit() {
    kvlab_emu::cp_async_commit();
}
template <int N>
__device__ __forceinline__ void cp_async_wait_group() {
    kvlab_emu::cp_async_wait_group(N);
}
__device__ __forceinline__ void cp_async_wait_all() {
    kvlab_emu::cp_async_wait_all();
}

#else

__device__ __forceinline__ uint32_t kvlab_shared_address(const void* ptr) {
    uint32_t address;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(address) : "l"(ptr));
    return address;
}

__device__ __forceinline__ void mma_m16n8k16_bf16(float d[4], const uint32_t a[4], const uint32_t b[2],
                                                  const float c[4]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]),
          "f"(c[2]), "f"(c[3]));
}
__device__ __forceinline__ void ldmatrix_x1(uint32_t r[1], const void* smem_row_ptr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];"
                 : "=r"(r[0])
                 : "r"(kvlab_shared_address(smem_row_ptr)));
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t r[2], const void* smem_row_ptr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(kvlab_shared_address(smem_row_ptr)));
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* smem_row_ptr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(kvlab_shared_address(smem_row_ptr)));
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t r[2], const void* smem_row_ptr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(kvlab_shared_address(smem_row_ptr)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void* smem_row_ptr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(kvlab_shared_address(smem_row_ptr)));
}
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(kvlab_shared_address(smem_dst)),
                 "l"(gmem_src)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait_group() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}
__device__ __forceinline__ void cp_async_wait_all() {
    asm volatile("cp.async.wait_all;" ::: "memory");
}

#endif
