// Writing the step's K and V into a KV arena, through the layout and step view of kv_layout.cuh.
#include "common.cuh"
#include "kv_layout.cuh"
#include "rope.cuh"

// For every row r of the step and KV head h, the head_dim row of (layer, K, h) at position
// row_pos[r] of sequence row_seq[r] = k[r, h], and the same for V: rows of many sequences, in
// either layout. One thread per 16-byte vector (head_dim % 8 == 0); grid
// ceil(2 * rows * num_kv_heads * head_dim / 8 / blockDim.x).
extern "C" __global__ void kv_append_bf16(const bf16* k,          // [rows, num_kv_heads, head_dim]
                                          const bf16* v,          // [rows, num_kv_heads, head_dim]
                                          bf16* arena,            // [chunks, chunk elements] of `layout`
                                          KvLayout layout,        // the arena's geometry, by value
                                          const uint32_t* step,   // packed step view [5 num_seqs + 2 rows + table]
                                          int num_seqs, int rows, unsigned layer) {
    const KvStepView view = kv_step_view(step, num_seqs, rows);
    const unsigned head_dim = layout.head_dim;
    const int vectors_per_row = (int)(head_dim / 8);
    const int vectors_per_token = (int)layout.num_kv_heads * vectors_per_row;
    const int index = blockIdx.x * blockDim.x + threadIdx.x;
    if (index >= 2 * rows * vectors_per_token) {
        return;
    }
    const unsigned part = index < rows * vectors_per_token ? KV_PART_KEY : KV_PART_VALUE;
    const int within = index - (int)part * rows * vectors_per_token;
    const int row = within / vectors_per_token;
    const unsigned head = (unsigned)((within % vectors_per_token) / vectors_per_row);
    const int vector = within % vectors_per_row;
    const bf16* src = (part == KV_PART_KEY ? k : v) + ((uint64_t)row * layout.num_kv_heads + head) * head_dim;
    const KvSeqStep& seq = view.seqs[view.row_seq[row]];
    bf16* dst = arena + kv_row_offset_any(layout, view.block_table, seq, layer, part, head, view.row_pos[row]);
    reinterpret_cast<uint4*>(dst)[vector] = reinterpret_cast<const uint4*>(src)[vector];
}

// RoPE and the append in one pass, the forward pass's one launch between the q/k/v projections
// and attention: for every row r of the step, q's heads are rotated in place, k's heads are
// rotated on their way into the arena (k itself is only read) and v's are copied, at position
// row_pos[r] of sequence row_seq[r]: exactly the bits of rope_half_split_bf16 then
// kv_append_bf16 (the rotation is rope.cuh's). One thread per (row, head, i < head_dim / 2)
// over q's heads, then k's, then v's (thread i moves the pair i, i + head_dim / 2); grid
// ceil(rows * (num_heads + 2 * num_kv_heads) * head_dim / 2 / blockDim.x).
extern "C" __global__ void rope_kv_append_bf16(bf16* q,                // [rows, num_heads, head_dim]
                                               const bf16* k,          // [rows, num_kv_heads, head_dim]
                                               const bf16* v,          // [rows, num_kv_heads, head_dim]
                                               const float* inv_freq,  // [head_dim / 2]
                                               bf16* arena,            // [chunks, chunk elements] of `layout`
                                               KvLayout layout,        // the arena's geometry, by value
                                               const uint32_t* step,   // packed step view [5 num_seqs + 2 rows + table]
                                               int num_seqs, int rows, int num_heads, unsigned layer) {
    grid_dependency_wait();  // before any access: all but inv_freq is other kernels' too
    grid_dependents_launch();
    const KvStepView view = kv_step_view(step, num_seqs, rows);
    const int head_dim = (int)layout.head_dim;
    const int half = head_dim / 2;
    const int kv_heads = (int)layout.num_kv_heads;
    const int heads = num_heads + 2 * kv_heads;
    const int pair = blockIdx.x * blockDim.x + threadIdx.x;
    if (pair >= rows * heads * half) {
        return;
    }
    const int i = pair % half;
    const int head = (pair / half) % heads;
    const int row = pair / (half * heads);
    const unsigned position = view.row_pos[row];
    if (head < num_heads) {
        bf16* x = q + ((uint64_t)row * num_heads + head) * head_dim;
        rope_rotate_pair(x, x, i, half, inv_freq[i], position);
        return;
    }
    const unsigned part = head < num_heads + kv_heads ? KV_PART_KEY : KV_PART_VALUE;
    const unsigned kv_head = (unsigned)(head - num_heads - (int)part * kv_heads);
    const uint64_t src = ((uint64_t)row * kv_heads + kv_head) * head_dim;
    const KvSeqStep& seq = view.seqs[view.row_seq[row]];
    bf16* dst = arena + kv_row_offset_any(layout, view.block_table, seq, layer, part, kv_head, position);
    if (part == KV_PART_KEY) {
        rope_rotate_pair(k + src, dst, i, half, inv_freq[i], position);
    } else {
        dst[i] = v[src + i];
        dst[i + half] = v[src + i + half];
    }
}
