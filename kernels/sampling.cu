// Greedy sampling on the device: only the chosen ids cross to the host.
#include "common.cuh"
#include "kv_layout.cuh"

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

// The id of the largest of logits + bias (bias may be null: a 0 / -inf mask restricting the
// choice), in one launch: block b finds the best of its slice into partial b, then the last
// block to finish (the threadfence reduction, as in decode attention) reduces the partials to
// the id, appends it to `chosen` (the count n of ids chosen so far, then a ring of the latest
// `ring` ids: the new one at 1 + n % ring; embedding_gather_chosen_bf16_to_f32 reads it back)
// and resets the counter for the next call. With a step view (`step` not null), that block then
// moves every sequence of one row on by one position (kv_step_advance), so that the next decode
// step reads its positions without a copy from the host: every kernel of this step that reads
// the view ran before this one. An all -inf or NaN row yields index 0, as a first-wins scan
// starting from index 0 does. Grid = partial count (at most ARGMAX_THREADS), block
// ARGMAX_THREADS; `blocks_done` starts at zero and is zero again after every launch.
extern "C" __global__ void argmax_f32(const float* logits,        // [count]
                                      const float* bias,          // [count] or null
                                      float* partial_values,      // [gridDim.x]
                                      unsigned* partial_indices,  // [gridDim.x]
                                      unsigned* blocks_done,      // [1]
                                      unsigned* chosen,           // [1 + ring]
                                      uint32_t* step,             // packed step view [5 num_seqs + 2 rows + table] or null
                                      int count, int ring, int num_seqs, int rows) {
    grid_dependency_wait();  // before any access: all but the bias is other kernels' too
    grid_dependents_launch();
    float value = -INFINITY;
    unsigned index = 0xffffffffu;
    for (int i = blockIdx.x * ARGMAX_THREADS + threadIdx.x; i < count; i += gridDim.x * ARGMAX_THREADS) {
        const float candidate = logits[i] + (bias != nullptr ? bias[i] : 0.0f);
        argmax_keep_better(value, index, candidate, (unsigned)i);
    }
    argmax_block_reduce(value, index);
    __shared__ bool is_last_block;
    if (threadIdx.x == 0) {
        partial_values[blockIdx.x] = value;
        partial_indices[blockIdx.x] = index;
        __threadfence();
        is_last_block = atomicAdd(blocks_done, 1u) == gridDim.x - 1;
    }
    __syncthreads();
    if (!is_last_block) {
        return;
    }
    // Other blocks' partials are read past L1 (volatile): they were written on other SMs.
    const volatile float* all_values = partial_values;
    const volatile unsigned* all_indices = partial_indices;
    value = -INFINITY;
    index = 0xffffffffu;
    if ((int)threadIdx.x < (int)gridDim.x) {
        value = all_values[threadIdx.x];
        index = all_indices[threadIdx.x];
    }
    argmax_block_reduce(value, index);
    if (threadIdx.x == 0) {
        const unsigned n = chosen[0];
        chosen[1 + n % (unsigned)ring] = index == 0xffffffffu ? 0u : index;
        chosen[0] = n + 1u;
        *blocks_done = 0u;
    }
    if (step != nullptr) {
        for (int seq = threadIdx.x; seq < num_seqs; seq += ARGMAX_THREADS) {
            kv_step_advance(step, num_seqs, rows, seq);
        }
    }
}
