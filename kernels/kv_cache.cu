// Appending the step's K and V to a cache, through the layout of kv_layout.cuh.
#include "common.cuh"
#include "kv_layout.cuh"

// cache[layer, K or V, head, position step[0] + r] = k or v [r, head], for r < rows. The chunk
// table maps positions to chunks (the static cache is a table of one chunk); the step's first
// position is read from device memory. One thread per 16-byte vector (head_dim % 8 == 0).
extern "C" __global__ void kv_append_bf16(const bf16* k,                          // [rows, num_kv_heads, head_dim]
                                          const bf16* v,                          // [rows, num_kv_heads, head_dim]
                                          const unsigned long long* chunk_table,  // [chunks]: chunk base addresses
                                          const int* step,                        // [2]: first position, rows
                                          int rows, unsigned layer, unsigned num_layers, unsigned num_kv_heads,
                                          unsigned head_dim, unsigned chunk_tokens) {
    const KvLayout layout = make_kv_layout(num_layers, num_kv_heads, head_dim, chunk_tokens);
    const int vectors_per_row = (int)(head_dim / 8);
    const int vectors_per_token = (int)num_kv_heads * vectors_per_row;
    const int index = blockIdx.x * blockDim.x + threadIdx.x;
    if (index >= 2 * rows * vectors_per_token) {
        return;
    }
    const unsigned part = index < rows * vectors_per_token ? KV_PART_KEY : KV_PART_VALUE;
    const int within = index - (int)part * rows * vectors_per_token;
    const int row = within / vectors_per_token;
    const unsigned head = (unsigned)((within % vectors_per_token) / vectors_per_row);
    const int vector = within % vectors_per_row;
    const bf16* src = (part == KV_PART_KEY ? k : v) + (uint64_t)row * num_kv_heads * head_dim;
    bf16* dst = kv_row_address(chunk_table, layout, layer, part, head, (unsigned)(step[0] + row));
    reinterpret_cast<uint4*>(dst)[vector] = reinterpret_cast<const uint4*>(src + head * head_dim)[vector];
}
