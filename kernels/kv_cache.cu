// Writing the step's K and V into a KV arena, through the layout and step view of kv_layout.cuh:
// bf16 rows copied (one thread per 16-byte vector), int8 and fp8 rows quantized as they are
// written (one warp per row, kv_quant.cuh).
#include "common.cuh"
#include "kv_layout.cuh"
#include "kv_quant.cuh"
#include "rope.cuh"

// Threads per block of the kernels that quantize: one warp per row.
#define KV_QUANT_THREADS 256
#define KV_QUANT_WARPS (KV_QUANT_THREADS / WARP_SIZE)

// For every row r of the step and KV head h, the head_dim row of (layer, K, h) at position
// row_pos[r] of sequence row_seq[r] = k[r, h], and the same for V: rows of many sequences, in
// either layout, for a bf16 arena. One thread per 16-byte vector (head_dim % 8 == 0); grid
// ceil(2 * rows * num_kv_heads * head_dim / 8 / blockDim.x).
extern "C" __global__ void kv_append_bf16(const bf16* k,          // [rows, num_kv_heads, head_dim]
                                          const bf16* v,          // [rows, num_kv_heads, head_dim]
                                          uint8_t* arena,         // [chunks, chunk bytes] of `layout`
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
    uint8_t* dst = arena + kv_row_offsets_any(layout, view.block_table, seq, layer, part, head, view.row_pos[row]).codes;
    reinterpret_cast<uint4*>(dst)[vector] = reinterpret_cast<const uint4*>(src)[vector];
}

// The row of (row, part, kv_head) of the step quantized into an int8 or fp8 arena, by one warp.
__device__ __forceinline__ void kv_append_quantized_row(const float x[KV_QUANT_PER_LANE], uint8_t* arena,
                                                        const KvLayout& layout, const KvStepView& view, int row,
                                                        unsigned part, unsigned kv_head, unsigned layer) {
    const KvSeqStep& seq = view.seqs[view.row_seq[row]];
    const KvRowOffsets at = kv_row_offsets_any(layout, view.block_table, seq, layer, part, kv_head, view.row_pos[row]);
    kv_store_quantized_row(x, layout, part, arena + at.codes, reinterpret_cast<float*>(arena + at.scale));
}

// kv_append_bf16 for an int8 or fp8 e4m3 arena: each row quantized as it is written, its codes
// and scales where the layout puts them (kv_quant.cuh). One warp per (row, K or V, KV head);
// block KV_QUANT_THREADS, grid ceil(2 * rows * num_kv_heads / KV_QUANT_WARPS).
extern "C" __global__ void kv_append_quantize_bf16(const bf16* k,         // [rows, num_kv_heads, head_dim]
                                                   const bf16* v,         // [rows, num_kv_heads, head_dim]
                                                   uint8_t* arena,        // [chunks, chunk bytes] of `layout`
                                                   KvLayout layout,       // the arena's geometry, by value
                                                   const uint32_t* step,  // packed step view [5 num_seqs + 2 rows + table]
                                                   int num_seqs, int rows, unsigned layer) {
    const KvStepView view = kv_step_view(step, num_seqs, rows);
    const int kv_heads = (int)layout.num_kv_heads;
    const int item = blockIdx.x * KV_QUANT_WARPS + threadIdx.x / WARP_SIZE;  // uniform across the warp
    if (item >= 2 * rows * kv_heads) {
        return;
    }
    const unsigned part = item < rows * kv_heads ? KV_PART_KEY : KV_PART_VALUE;
    const int within = item - (int)part * rows * kv_heads;
    const int row = within / kv_heads;
    const unsigned kv_head = (unsigned)(within % kv_heads);
    const bf16* src = (part == KV_PART_KEY ? k : v) + ((uint64_t)row * kv_heads + kv_head) * layout.head_dim;
    const int lane = threadIdx.x % WARP_SIZE;
    float x[KV_QUANT_PER_LANE];
#pragma unroll
    for (int j = 0; j < KV_QUANT_PER_LANE; ++j) {
        const int e = lane + WARP_SIZE * j;
        x[j] = e < (int)layout.head_dim ? bf16_to_f32(src[e]) : 0.0f;
    }
    kv_append_quantized_row(x, arena, layout, view, row, part, kv_head, layer);
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
                                               uint8_t* arena,         // [chunks, chunk bytes] of `layout`
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
    bf16* dst = reinterpret_cast<bf16*>(
        arena + kv_row_offsets_any(layout, view.block_table, seq, layer, part, kv_head, position).codes);
    if (part == KV_PART_KEY) {
        rope_rotate_pair(k + src, dst, i, half, inv_freq[i], position);
    } else {
        dst[i] = v[src + i];
        dst[i + half] = v[src + i + half];
    }
}

// rope_kv_append_bf16 for an int8 or fp8 e4m3 arena: q rotated in place, k rotated and rounded
// to bf16 (exactly the bits rope_half_split_bf16 leaves in k) then quantized, v quantized, so
// the arena holds the bits of rope_half_split_bf16 then kv_append_quantize_bf16. One warp per
// (row, head) over q's heads, then k's, then v's; block KV_QUANT_THREADS, grid
// ceil(rows * (num_heads + 2 * num_kv_heads) / KV_QUANT_WARPS).
extern "C" __global__ void rope_kv_append_quantize_bf16(bf16* q,                // [rows, num_heads, head_dim]
                                                        const bf16* k,          // [rows, num_kv_heads, head_dim]
                                                        const bf16* v,          // [rows, num_kv_heads, head_dim]
                                                        const float* inv_freq,  // [head_dim / 2]
                                                        uint8_t* arena,         // [chunks, chunk bytes] of `layout`
                                                        KvLayout layout,        // the arena's geometry, by value
                                                        const uint32_t* step,   // packed step view [5 num_seqs + 2 rows + table]
                                                        int num_seqs, int rows, int num_heads, unsigned layer) {
    // Each warp's rotated k row, read back in the quantizer's element order.
    __shared__ bf16 rotated[KV_QUANT_WARPS][KV_QUANT_MAX_HEAD_DIM];
    grid_dependency_wait();  // before any access: all but inv_freq is other kernels' too
    grid_dependents_launch();
    const KvStepView view = kv_step_view(step, num_seqs, rows);
    const int head_dim = (int)layout.head_dim;
    const int half = head_dim / 2;
    const int kv_heads = (int)layout.num_kv_heads;
    const int heads = num_heads + 2 * kv_heads;
    const int warp = threadIdx.x / WARP_SIZE;
    const int lane = threadIdx.x % WARP_SIZE;
    const int item = blockIdx.x * KV_QUANT_WARPS + warp;  // uniform across the warp
    if (item >= rows * heads) {
        return;
    }
    const int row = item / heads;
    const int head = item % heads;
    const unsigned position = view.row_pos[row];
    if (head < num_heads) {
        bf16* x = q + ((uint64_t)row * num_heads + head) * head_dim;
        for (int i = lane; i < half; i += WARP_SIZE) {
            rope_rotate_pair(x, x, i, half, inv_freq[i], position);
        }
        return;
    }
    const unsigned part = head < num_heads + kv_heads ? KV_PART_KEY : KV_PART_VALUE;
    const unsigned kv_head = (unsigned)(head - num_heads - (int)part * kv_heads);
    const uint64_t src = ((uint64_t)row * kv_heads + kv_head) * head_dim;
    const bf16* x = part == KV_PART_KEY ? rotated[warp] : v + src;
    if (part == KV_PART_KEY) {
        for (int i = lane; i < half; i += WARP_SIZE) {
            rope_rotate_pair(k + src, rotated[warp], i, half, inv_freq[i], position);
        }
        __syncwarp();
    }
    float values[KV_QUANT_PER_LANE];
#pragma unroll
    for (int j = 0; j < KV_QUANT_PER_LANE; ++j) {
        const int e = lane + WARP_SIZE * j;
        values[j] = e < head_dim ? bf16_to_f32(x[e]) : 0.0f;
    }
    kv_append_quantized_row(values, arena, layout, view, row, part, kv_head, layer);
}
