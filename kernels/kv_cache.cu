// Appending the step's K and V to a KV arena, through the layout and step view of kv_layout.cuh.
#include "common.cuh"
#include "kv_layout.cuh"

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
