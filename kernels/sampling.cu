// Greedy sampling on the device: only the chosen id crosses to the host.
#include "common.cuh"

#define ARGMAX_THREADS 256

// The better of two candidates: the larger value, the smaller index on ties (torch.argmax).
// NaN never wins: comparisons with NaN are false.
__device__ __forceinline__ void argmax_keep_better(float& value, unsigned& index, float other_value,
                                                   unsigned other_index) {
    if (other_value > value || (other_value == value && other_index < index)) {
        value = other_value;
        index = other_index;
    }
}

// Reduces the block's candidates into thread 0's (value, index).
__device__ __forceinline__ void argmax_block_reduce(float& value, unsigned& index) {
    __shared__ float warp_values[ARGMAX_THREADS / WARP_SIZE];
    __shared__ unsigned warp_indices[ARGMAX_THREADS / WARP_SIZE];
#pragma unroll
    for (int offset = WARP_SIZE / 2; offset > 0; offset >>= 1) {
        const float other_value = __shfl_xor_sync(FULL_WARP_MASK, value, offset);
        const unsigned other_index = __shfl_xor_sync(FULL_WARP_MASK, index, offset);
        argmax_keep_better(value, index, other_value, other_index);
    }
    if (threadIdx.x % WARP_SIZE == 0) {
        warp_values[threadIdx.x / WARP_SIZE] = value;
        warp_indices[threadIdx.x / WARP_SIZE] = index;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < ARGMAX_THREADS / WARP_SIZE; ++w) {
            argmax_keep_better(value, index, warp_values[w], warp_indices[w]);
        }
    }
}

// Stage 1: block b finds the best of its slice of logits + bias (bias may be null: a 0 / -inf
// mask restricting the choice). Grid = partial count, block ARGMAX_THREADS.
extern "C" __global__ void argmax_partial_f32(const float* logits,      // [count]
                                              const float* bias,        // [count] or null
                                              float* partial_values,    // [gridDim.x]
                                              unsigned* partial_indices,  // [gridDim.x]
                                              int count) {
    float value = -INFINITY;
    unsigned index = 0xffffffffu;
    for (int i = blockIdx.x * ARGMAX_THREADS + threadIdx.x; i < count; i += gridDim.x * ARGMAX_THREADS) {
        const float candidate = logits[i] + (bias != nullptr ? bias[i] : 0.0f);
        argmax_keep_better(value, index, candidate, (unsigned)i);
    }
    argmax_block_reduce(value, index);
    if (threadIdx.x == 0) {
        partial_values[blockIdx.x] = value;
        partial_indices[blockIdx.x] = index;
    }
}

// Stage 2: one block reduces the partials to the id. An all -inf or NaN row yields index 0,
// as a first-wins scan starting from index 0 does.
extern "C" __global__ void argmax_final(const float* partial_values,      // [partials]
                                        const unsigned* partial_indices,  // [partials]
                                        unsigned* id,                     // [1]
                                        int partials) {
    float value = -INFINITY;
    unsigned index = 0xffffffffu;
    for (int p = threadIdx.x; p < partials; p += ARGMAX_THREADS) {
        argmax_keep_better(value, index, partial_values[p], partial_indices[p]);
    }
    argmax_block_reduce(value, index);
    if (threadIdx.x == 0) {
        id[0] = index == 0xffffffffu ? 0u : index;
    }
}
