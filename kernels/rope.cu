// Rotary position embedding, half-split (`rotate_half`) layout, in place on q and k.
#include "common.cuh"
#include "kv_layout.cuh"
#include "rope.cuh"

// For every row r (at position row_pos[r] of its sequence, from the step view), head and
// i < head_dim / 2: the pair (i, i + head_dim / 2) rotated by `rope_rotate_pair` (rope.cuh).
// One thread per (row, head, i) pair over q's heads then k's; positions come from device
// memory so that a recorded decode step stays valid as its sequences grow. The forward pass
// rotates and appends in one launch (rope_kv_append_bf16 in kv_cache.cu); this kernel serves
// the ops that rotate alone.
extern "C" __global__ void rope_half_split_bf16(bf16* q,                // [rows, num_heads, head_dim]
                                                bf16* k,                // [rows, num_kv_heads, head_dim]
                                                const float* inv_freq,  // [head_dim / 2]
                                                const uint32_t* step,   // packed step view [5 num_seqs + 2 rows + table]
                                                int num_seqs, int rows, int num_heads, int num_kv_heads,
                                                int head_dim) {
    const int half = head_dim / 2;
    const int heads = num_heads + num_kv_heads;
    const int pair = blockIdx.x * blockDim.x + threadIdx.x;
    if (pair >= rows * heads * half) {
        return;
    }
    const int i = pair % half;
    const int head = (pair / half) % heads;
    const int row = pair / (half * heads);
    bf16* x = head < num_heads ? q + ((uint64_t)row * num_heads + head) * head_dim
                               : k + ((uint64_t)row * num_kv_heads + (head - num_heads)) * head_dim;
    rope_rotate_pair(x, x, i, half, inv_freq[i], kv_step_view(step, num_seqs, rows).row_pos[row]);
}
