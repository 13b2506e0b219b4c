// CUDA's vocabulary for the host C++ compiler: force-included (`-include`) before every
// kernels/*.cu in the emulator build, so that the kernel sources compile unchanged.
//
// Execution model (kernels/emu/cuda_emu.cpp): the threads of a block run as fibers on one OS
// thread and switch only at synchronisation points (__syncthreads, warp-synchronous calls,
// tensor-core and ldmatrix collectives); blocks of a grid run on several OS threads.
// `__shared__` variables are per-OS-thread statics, which is per block because a block never
// leaves its OS thread. Violations of CUDA's rules (divergent barriers, missing lanes, bad
// masks, misaligned async copies) end the launch with an error naming the place.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <type_traits>
#include <utility>

#define KVLAB_EMU 1

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __shared__ static __thread
#define __constant__
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

#define warpSize 32

struct uint3 {
    unsigned x, y, z;
};
typedef uint3 dim3;

struct __attribute__((aligned(8))) float2 {
    float x, y;
};
struct __attribute__((aligned(16))) float4 {
    float x, y, z, w;
};
struct __attribute__((aligned(8))) int2 {
    int x, y;
};
struct __attribute__((aligned(16))) int4 {
    int x, y, z, w;
};
struct __attribute__((aligned(8))) uint2 {
    unsigned x, y;
};
struct __attribute__((aligned(16))) uint4 {
    unsigned x, y, z, w;
};

inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline int2 make_int2(int x, int y) { return int2{x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return int4{x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

// kernels/kv_layout.cuh's layout struct, a kernel argument kind of its own (see parameter_kind).
struct KvLayout;

namespace kvlab_emu {

// The part of a fiber that kernel code reads.
struct ThreadState {
    uint3 thread_idx;
};

extern __thread ThreadState* current_thread;
extern __thread uint3 block_idx;
extern __thread uint3 block_dim;
extern __thread uint3 grid_dim;

void* dynamic_shared_base();

// Block barrier; returns the number of threads whose `predicate` was non-zero.
int sync_block(int predicate, const char* file, int line);

enum class ShuffleMode : uint32_t { Idx = 0, Up = 1, Down = 2, Bfly = 3 };
// PTX shfl.sync with operands b (lane / delta / xor mask) and c (clamp and segment mask).
uint64_t warp_shuffle(ShuffleMode mode, unsigned member_mask, uint64_t value, int b, int c, const char* file,
                      int line);
unsigned warp_ballot(unsigned member_mask, int predicate, const char* file, int line);
void warp_sync(unsigned member_mask, const char* file, int line);
enum class WarpReduce : uint32_t { AddU32 = 0, MinU32 = 1, MaxU32 = 2, MinI32 = 3, MaxI32 = 4 };
unsigned warp_reduce(WarpReduce op, unsigned member_mask, unsigned value, const char* file, int line);
unsigned active_mask();

void mma_m16n8k16_bf16(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4],
                       const char* file = __builtin_FILE(), int line = __builtin_LINE());
void ldmatrix(uint32_t* r, int matrices, bool transpose, const void* row_ptr, const char* file = __builtin_FILE(),
              int line = __builtin_LINE());
void cp_async_16(void* smem_dst, const void* gmem_src, const char* file = __builtin_FILE(),
                 int line = __builtin_LINE());
void cp_async_commit();
void cp_async_wait_group(int pending_groups_allowed);
void cp_async_wait_all();
// griddepcontrol.wait: launches run one after another, so it only notes that this thread waited.
void grid_dependency_wait();

[[noreturn]] void trap(const char* file, int line);

template <class T>
inline uint64_t to_bits(T value) {
    static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "shuffled types are at most 8 bytes");
    uint64_t bits = 0;
    std::memcpy(&bits, &value, sizeof(T));
    return bits;
}

template <class T>
inline T from_bits(uint64_t bits) {
    T value;
    std::memcpy(&value, &bits, sizeof(T));
    return value;
}

// Atomics are real atomics: blocks run concurrently on several OS threads.
template <class T>
inline T atomic_update_float(T* address, T value, int op) {
    T observed;
    __atomic_load(address, &observed, __ATOMIC_RELAXED);
    for (;;) {
        T desired = op == 0 ? observed + value : (op == 1 ? (value < observed ? value : observed)
                                                          : (value > observed ? value : observed));
        if (__atomic_compare_exchange(address, &observed, &desired, false, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) {
            return observed;
        }
    }
}

// Trampoline support: kernel arguments arrive as 64-bit slots (src/backend/cuda/device.rs,
// `KernelArg::push_slots`): a pointer or scalar in the low bytes of one slot, a struct's bytes
// over as many consecutive slots as it needs.
template <class T>
constexpr size_t argument_slot_count() {
    return std::is_pointer<T>::value ? 1 : (sizeof(T) + 7) / 8;
}

template <class T>
inline T argument_from_slots(const uint64_t* slots) {
    if constexpr (std::is_pointer<T>::value) {
        return reinterpret_cast<T>(static_cast<uintptr_t>(slots[0]));
    } else {
        static_assert(std::is_trivially_copyable<T>::value, "kernel arguments are plain data");
        T value;
        std::memcpy(&value, slots, sizeof(T));
        return value;
    }
}

// Index of the first slot of parameter `index` of a kernel taking P...
template <class... P>
constexpr size_t first_argument_slot(size_t index) {
    constexpr size_t counts[] = {argument_slot_count<P>()..., 0};
    size_t first = 0;
    for (size_t i = 0; i < index; ++i) {
        first += counts[i];
    }
    return first;
}

template <class... P, size_t... I>
inline void invoke_with_slots(void (*kernel)(P...), const uint64_t* slots, std::index_sequence<I...>) {
    kernel(argument_from_slots<P>(slots + first_argument_slot<P...>(I))...);
}

template <class... P>
inline void invoke_kernel(void (*kernel)(P...), const uint64_t* slots) {
    invoke_with_slots(kernel, slots, std::index_sequence_for<P...>{});
}

// 'P' pointer, 'I' int, 'U' unsigned, 'F' float, 'L' KvLayout: the kinds build.rs parsed.
template <class T>
constexpr char parameter_kind() {
    if constexpr (std::is_pointer<T>::value) {
        return 'P';
    } else if constexpr (std::is_same<T, int>::value) {
        return 'I';
    } else if constexpr (std::is_same<T, unsigned>::value) {
        return 'U';
    } else if constexpr (std::is_same<T, float>::value) {
        return 'F';
    } else if constexpr (std::is_same<T, ::KvLayout>::value) {
        return 'L';
    } else {
        return '?';
    }
}

template <class... P>
constexpr bool parameter_kinds_are(void (*)(P...), const char* kinds) {
    const char actual[] = {parameter_kind<P>()..., '\0'};
    for (size_t i = 0; i <= sizeof...(P); ++i) {
        if (actual[i] != kinds[i]) {
            return false;
        }
    }
    return true;
}

}  // namespace kvlab_emu

#define threadIdx (kvlab_emu::current_thread->thread_idx)
#define blockIdx (kvlab_emu::block_idx)
#define blockDim (kvlab_emu::block_dim)
#define gridDim (kvlab_emu::grid_dim)

// ---------------------------------------------------------------------------------------------
// Synchronisation and warp-synchronous functions. The trailing file/line defaults record the
// caller's position for error messages.

inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    kvlab_emu::sync_block(0, file, line);
}
inline int __syncthreads_count(int predicate, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return kvlab_emu::sync_block(predicate != 0, file, line);
}
inline int __syncthreads_and(int predicate, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return kvlab_emu::sync_block(predicate != 0, file, line) == (int)(blockDim.x * blockDim.y * blockDim.z);
}
inline int __syncthreads_or(int predicate, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return kvlab_emu::sync_block(predicate != 0, file, line) != 0;
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    kvlab_emu::warp_sync(mask, file, line);
}

// c operands exactly as CUDA's own wrappers build them: segment mask in bits 8..12, clamp in 0..4.
template <class T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32, const char* file = __builtin_FILE(),
                     int line = __builtin_LINE()) {
    return kvlab_emu::from_bits<T>(kvlab_emu::warp_shuffle(kvlab_emu::ShuffleMode::Idx, mask, kvlab_emu::to_bits(var),
                                                           src_lane, ((32 - width) << 8) | 0x1f, file, line));
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32, const char* file = __builtin_FILE(),
                        int line = __builtin_LINE()) {
    return kvlab_emu::from_bits<T>(kvlab_emu::warp_shuffle(kvlab_emu::ShuffleMode::Up, mask, kvlab_emu::to_bits(var),
                                                           (int)delta, (32 - width) << 8, file, line));
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32, const char* file = __builtin_FILE(),
                          int line = __builtin_LINE()) {
    return kvlab_emu::from_bits<T>(kvlab_emu::warp_shuffle(kvlab_emu::ShuffleMode::Down, mask, kvlab_emu::to_bits(var),
                                                           (int)delta, ((32 - width) << 8) | 0x1f, file, line));
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32, const char* file = __builtin_FILE(),
                         int line = __builtin_LINE()) {
    return kvlab_emu::from_bits<T>(kvlab_emu::warp_shuffle(kvlab_emu::ShuffleMode::Bfly, mask, kvlab_emu::to_bits(var),
                                                           lane_mask, ((32 - width) << 8) | 0x1f, file, line));
}

inline unsigned __ballot_sync(unsigned mask, int predicate, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
    return kvlab_emu::warp_ballot(mask, predicate, file, line);
}
inline int __all_sync(unsigned mask, int predicate, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return kvlab_emu::warp_ballot(mask, predicate, file, line) == mask;
}
inline int __any_sync(unsigned mask, int predicate, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return kvlab_emu::warp_ballot(mask, predicate, file, line) != 0;
}
inline unsigned __activemask() { return kvlab_emu::active_mask(); }

inline unsigned __reduce_add_sync(unsigned mask, unsigned value, const char* file = __builtin_FILE(),
                                  int line = __builtin_LINE()) {
    return kvlab_emu::warp_reduce(kvlab_emu::WarpReduce::AddU32, mask, value, file, line);
}
inline unsigned __reduce_min_sync(unsigned mask, unsigned value, const char* file = __builtin_FILE(),
                                  int line = __builtin_LINE()) {
    return kvlab_emu::warp_reduce(kvlab_emu::WarpReduce::MinU32, mask, value, file, line);
}
inline unsigned __reduce_max_sync(unsigned mask, unsigned value, const char* file = __builtin_FILE(),
                                  int line = __builtin_LINE()) {
    return kvlab_emu::warp_reduce(kvlab_emu::WarpReduce::MaxU32, mask, value, file, line);
}
inline int __reduce_min_sync(unsigned mask, int value, const char* file = __builtin_FILE(),
                             int line = __builtin_LINE()) {
    return (int)kvlab_emu::warp_reduce(kvlab_emu::WarpReduce::MinI32, mask, (unsigned)value, file, line);
}
inline int __reduce_max_sync(unsigned mask, int value, const char* file = __builtin_FILE(),
                             int line = __builtin_LINE()) {
    return (int)kvlab_emu::warp_reduce(kvlab_emu::WarpReduce::MaxI32, mask, (unsigned)value, file, line);
}

inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
[[noreturn]] inline void __trap(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    kvlab_emu::trap(file, line);
}

// ---------------------------------------------------------------------------------------------
// Atomics.

inline int atomicAdd(int* address, int value) { return __atomic_fetch_add(address, value, __ATOMIC_SEQ_CST); }
inline unsigned atomicAdd(unsigned* address, unsigned value) {
    return __atomic_fetch_add(address, value, __ATOMIC_SEQ_CST);
}
inline unsigned long long atomicAdd(unsigned long long* address, unsigned long long value) {
    return __atomic_fetch_add(address, value, __ATOMIC_SEQ_CST);
}
inline float atomicAdd(float* address, float value) { return kvlab_emu::atomic_update_float(address, value, 0); }
inline double atomicAdd(double* address, double value) { return kvlab_emu::atomic_update_float(address, value, 0); }
inline int atomicSub(int* address, int value) { return __atomic_fetch_sub(address, value, __ATOMIC_SEQ_CST); }
inline unsigned atomicSub(unsigned* address, unsigned value) {
    return __atomic_fetch_sub(address, value, __ATOMIC_SEQ_CST);
}
inline int atomicExch(int* address, int value) { return __atomic_exchange_n(address, value, __ATOMIC_SEQ_CST); }
inline unsigned atomicExch(unsigned* address, unsigned value) {
    return __atomic_exchange_n(address, value, __ATOMIC_SEQ_CST);
}
inline float atomicExch(float* address, float value) {
    float previous;
    __atomic_exchange(address, &value, &previous, __ATOMIC_SEQ_CST);
    return previous;
}
template <class T>
inline T kvlab_atomic_cas(T* address, T compare, T value) {
    __atomic_compare_exchange_n(address, &compare, value, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return compare;
}
inline int atomicCAS(int* address, int compare, int value) { return kvlab_atomic_cas(address, compare, value); }
inline unsigned atomicCAS(unsigned* address, unsigned compare, unsigned value) {
    return kvlab_atomic_cas(address, compare, value);
}
inline unsigned long long atomicCAS(unsigned long long* address, unsigned long long compare,
                                    unsigned long long value) {
    return kvlab_atomic_cas(address, compare, value);
}
template <class T>
inline T kvlab_atomic_min_max(T* address, T value, bool is_max) {
    T observed = __atomic_load_n(address, __ATOMIC_RELAXED);
    while ((is_max ? value > observed : value < observed) &&
           !__atomic_compare_exchange_n(address, &observed, value, false, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) {
    }
    return observed;
}
inline int atomicMax(int* address, int value) { return kvlab_atomic_min_max(address, value, true); }
inline unsigned atomicMax(unsigned* address, unsigned value) { return kvlab_atomic_min_max(address, value, true); }
inline int atomicMin(int* address, int value) { return kvlab_atomic_min_max(address, value, false); }
inline unsigned atomicMin(unsigned* address, unsigned value) { return kvlab_atomic_min_max(address, value, false); }
inline int atomicOr(int* address, int value) { return __atomic_fetch_or(address, value, __ATOMIC_SEQ_CST); }
inline unsigned atomicOr(unsigned* address, unsigned value) {
    return __atomic_fetch_or(address, value, __ATOMIC_SEQ_CST);
}
inline int atomicAnd(int* address, int value) { return __atomic_fetch_and(address, value, __ATOMIC_SEQ_CST); }
inline unsigned atomicAnd(unsigned* address, unsigned value) {
    return __atomic_fetch_and(address, value, __ATOMIC_SEQ_CST);
}

// ---------------------------------------------------------------------------------------------
// Math and bit intrinsics: the fast variants are the precise host functions.

inline float __int_as_float(int value) { return kvlab_emu::from_bits<float>((uint32_t)value); }
inline int __float_as_int(float value) { return (int)(uint32_t)kvlab_emu::to_bits(value); }
inline float __uint_as_float(unsigned value) { return kvlab_emu::from_bits<float>(value); }
inline unsigned __float_as_uint(float value) { return (unsigned)kvlab_emu::to_bits(value); }
inline double __longlong_as_double(long long value) { return kvlab_emu::from_bits<double>((uint64_t)value); }
inline long long __double_as_longlong(double value) { return (long long)kvlab_emu::to_bits(value); }

inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __tanhf(float x) { return tanhf(x); }
inline float __exp2f(float x) { return exp2f(x); }
inline float __log2f(float x) { return log2f(x); }
inline void __sincosf(float x, float* s, float* c) {
    *s = sinf(x);
    *c = cosf(x);
}
inline void sincosf(float x, float* s, float* c) {
    *s = sinf(x);
    *c = cosf(x);
}
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __frsqrt_rn(float x) { return 1.0f / sqrtf(x); }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fdividef(float x, float y) { return x / y; }
inline float __fdiv_rn(float x, float y) { return x / y; }
inline float __fadd_rn(float x, float y) { return x + y; }
inline float __fmul_rn(float x, float y) { return x * y; }
inline float __fmaf_rn(float x, float y, float z) { return fmaf(x, y, z); }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : (x == x ? x : 0.0f)); }
inline int __float2int_rn(float x) { return (int)nearbyintf(x); }
inline int __float2int_rz(float x) { return (int)x; }
inline unsigned __float2uint_rn(float x) { return (unsigned)nearbyintf(x); }
inline float __int2float_rn(int x) { return (float)x; }

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline unsigned min(int a, unsigned b) { return min((unsigned)a, b); }
inline unsigned max(int a, unsigned b) { return max((unsigned)a, b); }
inline unsigned min(unsigned a, int b) { return min(a, (unsigned)b); }
inline unsigned max(unsigned a, int b) { return max(a, (unsigned)b); }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
    x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
    x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
    x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
    x = ((x >> 8) & 0x00ff00ffu) | ((x & 0x00ff00ffu) << 8);
    return (x >> 16) | (x << 16);
}
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a * b) >> 32); }

template <class T>
inline T __ldg(const T* address) {
    return *address;
}
