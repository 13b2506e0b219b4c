// Causal GQA attention over a KV arena, reading K/V through the layout and step view of
// kv_layout.cuh: each query row of the step attends to the positions of its own sequence up to
// its own, in either layout (read from `layout.kind`, each kernel specialised for both by
// template).
//
// A step's sequences are split by their row count (the backend launches one kernel or both):
// - attention_prefill_hd*_bf16: sequences of several rows (prefill, chunked prefill, the
//   no-cache recompute). Flash-attention 2 on tensor cores: a block owns 64 query rows of one
//   sequence and one KV head and streams that sequence's K/V tiles through shared memory
//   (cp.async, double-buffered) with an online softmax in registers; the score matrix never
//   exists in memory. Query rows interleave the heads of the GQA group
//   (row = token * group + head in group) so that the group shares every K/V tile.
// - attention_decode_bf16: sequences of one row (decode), all of them in one launch over
//   (split, KV head and head tile, sequence). Flash-decoding: each sequence is cut into
//   `num_splits` ranges, each block reduces one range for up to DECODE_HEADS_PER_BLOCK query
//   heads of one KV head (the heads share each K/V load), and the last block of a head group to
//   finish merges the ranges (no second launch). Lengths, positions and block tables are read
//   from device memory and the grid depends only on `num_splits` and the number of sequences,
//   so a recorded decode step replays unchanged as its sequences grow.
// Softmax runs in base 2: scores are scaled by log2(e) / sqrt(head_dim) once, then exp2.
#include "common.cuh"
#include "kv_layout.cuh"
#include "mma_tile.cuh"

#define LOG2_E 1.4426950408889634f

__device__ __forceinline__ float negative_infinity() {
    return __uint_as_float(0xff800000u);
}

// ---------------------------------------------------------------------------------------------
// Prefill.

#define PREFILL_THREADS 128
#define PREFILL_QUERY_ROWS 64  // 16 per warp: one mma row tile each

template <int HEAD_DIM>
struct PrefillShape {
    static constexpr int chunks_per_row = HEAD_DIM / 8;
    // K/V positions per tile: 64, or 32 at head_dim 128 so that shared memory stays in 48 KiB.
    static constexpr int kv_rows = HEAD_DIM >= 128 ? 32 : 64;
    // Shared: q [64][HEAD_DIM], then 2 buffers of k [kv_rows][HEAD_DIM] and v [kv_rows][HEAD_DIM].
    static constexpr int shared_elems = (PREFILL_QUERY_ROWS + 4 * kv_rows) * HEAD_DIM;
    static_assert(shared_elems * 2 <= 48 * 1024, "static shared memory is at most 48 KiB a block");
};

// The block's part of a prefill launch: one tile of PREFILL_QUERY_ROWS query rows of one
// sequence with several rows.
struct PrefillTile {
    int seq;         // index in the step's sequences
    int first_query; // its first query row (token * group + head in group) in that sequence
};

// Tiles enumerate the query rows of every sequence of more than one row, sequence after
// sequence; blocks take them in reverse so that a sequence's tiles with the most visible
// positions start first. Every thread walks the sequences (a step has few).
__device__ __forceinline__ PrefillTile prefill_tile(const KvStepView& view, int num_seqs, int group) {
    int tile = (int)(gridDim.x - 1 - blockIdx.x);
    PrefillTile found = {0, 0};
    for (int s = 0; s < num_seqs; ++s) {
        const int rows = (int)view.seqs[s].rows;
        const int tiles = rows > 1 ? (rows * group + PREFILL_QUERY_ROWS - 1) / PREFILL_QUERY_ROWS : 0;
        if (tile < tiles) {
            found.seq = s;
            found.first_query = tile * PREFILL_QUERY_ROWS;
            return found;
        }
        tile -= tiles;
    }
    return found;  // not reached: the grid has one block per tile
}

template <int HEAD_DIM, unsigned KIND>
__device__ __forceinline__ void prefill_load_kv_tile(bf16* k_tile, bf16* v_tile, const bf16* arena,
                                                     const KvLayout& layout, const uint32_t* block_table,
                                                     const KvSeqStep& seq, unsigned layer, unsigned kv_head,
                                                     int first_pos, int kv_end) {
    typedef PrefillShape<HEAD_DIM> Shape;
    for (int index = threadIdx.x; index < Shape::kv_rows * Shape::chunks_per_row; index += PREFILL_THREADS) {
        const int row = index / Shape::chunks_per_row;
        const int chunk = index % Shape::chunks_per_row;
        const int pos = first_pos + row;
        const bool in_bounds = pos < kv_end;
        const unsigned safe_pos = in_bounds ? (unsigned)pos : 0u;
        cp_async_16_or_zero(
            tile_chunk<Shape::chunks_per_row>(k_tile, row, chunk),
            arena + kv_row_offset<KIND>(layout, block_table, seq, layer, KV_PART_KEY, kv_head, safe_pos) + chunk * 8,
            in_bounds);
        cp_async_16_or_zero(
            tile_chunk<Shape::chunks_per_row>(v_tile, row, chunk),
            arena + kv_row_offset<KIND>(layout, block_table, seq, layer, KV_PART_VALUE, kv_head, safe_pos) + chunk * 8,
            in_bounds);
    }
}

// `shared`: PrefillShape<HEAD_DIM>::shared_elems, 16-byte aligned (declared by the entry point).
template <int HEAD_DIM, unsigned KIND>
__device__ __forceinline__ void attention_prefill(bf16* shared, const bf16* q, const bf16* arena,
                                                  const KvLayout& layout, const uint32_t* step, bf16* out,
                                                  int num_seqs, int rows, int num_heads, unsigned layer) {
    typedef PrefillShape<HEAD_DIM> Shape;
    constexpr int CPR = Shape::chunks_per_row;
    constexpr int KV_ROWS = Shape::kv_rows;
    constexpr int DIM_TILES = HEAD_DIM / 8;   // n8 tiles of the output
    constexpr int DIM_STEPS = HEAD_DIM / 16;  // k16 steps of q . k
    constexpr int POS_TILES = KV_ROWS / 8;    // n8 tiles of the scores
    constexpr int POS_STEPS = KV_ROWS / 16;   // k16 steps of p . v

    bf16* q_tile = shared;
    bf16* kv_tiles = shared + PREFILL_QUERY_ROWS * HEAD_DIM;  // [2][k, v][KV_ROWS][HEAD_DIM]

    const KvStepView view = kv_step_view(step, num_seqs, rows);
    const int group = num_heads / (int)layout.num_kv_heads;
    const unsigned kv_head = blockIdx.y;
    const PrefillTile tile = prefill_tile(view, num_seqs, group);
    const KvSeqStep seq = view.seqs[tile.seq];
    const int q0 = tile.first_query;
    const int query_rows = (int)seq.rows * group;
    const int start = (int)seq.start;
    const int last_token = min((int)seq.rows - 1, (q0 + PREFILL_QUERY_ROWS - 1) / group);
    const int kv_end = start + last_token + 1;  // positions this tile can see
    const int kv_tile_count = (kv_end + KV_ROWS - 1) / KV_ROWS;

    for (int index = threadIdx.x; index < PREFILL_QUERY_ROWS * CPR; index += PREFILL_THREADS) {
        const int row = index / CPR;
        const int chunk = index % CPR;
        const int query_row = q0 + row;
        const bool in_bounds = query_row < query_rows;
        const int token = in_bounds ? query_row / group : 0;
        const int head = (int)kv_head * group + (in_bounds ? query_row % group : 0);
        cp_async_16_or_zero(tile_chunk<CPR>(q_tile, row, chunk),
                            q + ((uint64_t)(seq.first_row + token) * num_heads + head) * HEAD_DIM + chunk * 8,
                            in_bounds);
    }
    prefill_load_kv_tile<HEAD_DIM, KIND>(kv_tiles, kv_tiles + KV_ROWS * HEAD_DIM, arena, layout, view.block_table,
                                         seq, layer, kv_head, 0, kv_end);
    cp_async_commit();

    const int warp = threadIdx.x / WARP_SIZE;
    const int lane = threadIdx.x % WARP_SIZE;
    const int g = lane >> 2;
    const int t = lane & 3;
    // This thread's two query rows: g and g + 8 of the warp's 16.
    const int query_row_a = q0 + warp * 16 + g;
    const int query_row_b = query_row_a + 8;
    const int pos_a = start + query_row_a / group;
    const int pos_b = start + query_row_b / group;
    const float scale = LOG2_E / sqrtf((float)HEAD_DIM);

    uint32_t q_frag[DIM_STEPS][4];
    float o[DIM_TILES][4];
#pragma unroll
    for (int d = 0; d < DIM_TILES; ++d) {
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            o[d][c] = 0.0f;
        }
    }
    float max_a = negative_infinity(), max_b = negative_infinity();
    float sum_a = 0.0f, sum_b = 0.0f;  // this thread's share of the row sums

    for (int j = 0; j < kv_tile_count; ++j) {
        if (j + 1 < kv_tile_count) {
            bf16* next = kv_tiles + ((j + 1) & 1) * 2 * KV_ROWS * HEAD_DIM;
            prefill_load_kv_tile<HEAD_DIM, KIND>(next, next + KV_ROWS * HEAD_DIM, arena, layout, view.block_table,
                                                 seq, layer, kv_head, (j + 1) * KV_ROWS, kv_end);
        }
        cp_async_commit();
        cp_async_wait_group<1>();
        __syncthreads();
        if (j == 0) {
#pragma unroll
            for (int kd = 0; kd < DIM_STEPS; ++kd) {
                ldmatrix_x4(q_frag[kd], tile_chunk<CPR>(q_tile, warp * 16 + (lane & 15), kd * 2 + (lane >> 4)));
            }
        }
        bf16* k_tile = kv_tiles + (j & 1) * 2 * KV_ROWS * HEAD_DIM;
        bf16* v_tile = k_tile + KV_ROWS * HEAD_DIM;

        // s = q . kT for this warp's 16 rows and the tile's KV_ROWS positions.
        float s[POS_TILES][4];
#pragma unroll
        for (int p = 0; p < POS_TILES; ++p) {
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                s[p][c] = 0.0f;
            }
        }
#pragma unroll
        for (int kd = 0; kd < DIM_STEPS; ++kd) {
#pragma unroll
            for (int p2 = 0; p2 < POS_TILES / 2; ++p2) {
                uint32_t r[4];
                ldmatrix_x4(r, tile_chunk<CPR>(k_tile, p2 * 16 + ((lane >> 4) << 3) + (lane & 7),
                                               kd * 2 + ((lane >> 3) & 1)));
                const uint32_t b_lo[2] = {r[0], r[1]};
                const uint32_t b_hi[2] = {r[2], r[3]};
                mma_m16n8k16_bf16(s[2 * p2], q_frag[kd], b_lo, s[2 * p2]);
                mma_m16n8k16_bf16(s[2 * p2 + 1], q_frag[kd], b_hi, s[2 * p2 + 1]);
            }
        }

        // Causal mask and scale; the new row maxima over the 4 lanes that share a row.
        float tile_max_a = negative_infinity(), tile_max_b = negative_infinity();
#pragma unroll
        for (int p = 0; p < POS_TILES; ++p) {
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const int pos = j * KV_ROWS + p * 8 + 2 * t + (c & 1);
                const bool visible = pos <= (c < 2 ? pos_a : pos_b);
                s[p][c] = visible ? s[p][c] * scale : negative_infinity();
            }
            tile_max_a = fmaxf(tile_max_a, fmaxf(s[p][0], s[p][1]));
            tile_max_b = fmaxf(tile_max_b, fmaxf(s[p][2], s[p][3]));
        }
#pragma unroll
        for (int offset = 1; offset < 4; offset <<= 1) {
            tile_max_a = fmaxf(tile_max_a, __shfl_xor_sync(FULL_WARP_MASK, tile_max_a, offset));
            tile_max_b = fmaxf(tile_max_b, __shfl_xor_sync(FULL_WARP_MASK, tile_max_b, offset));
        }
        const float new_max_a = fmaxf(max_a, tile_max_a);
        const float new_max_b = fmaxf(max_b, tile_max_b);
        // A row with nothing visible yet keeps -inf; subtract 0 instead so exp2 gives 0, not NaN.
        const float base_a = new_max_a == negative_infinity() ? 0.0f : new_max_a;
        const float base_b = new_max_b == negative_infinity() ? 0.0f : new_max_b;
        const float alpha_a = exp2f(max_a - base_a);
        const float alpha_b = exp2f(max_b - base_b);
        max_a = new_max_a;
        max_b = new_max_b;
        sum_a *= alpha_a;
        sum_b *= alpha_b;
#pragma unroll
        for (int d = 0; d < DIM_TILES; ++d) {
            o[d][0] *= alpha_a;
            o[d][1] *= alpha_a;
            o[d][2] *= alpha_b;
            o[d][3] *= alpha_b;
        }
#pragma unroll
        for (int p = 0; p < POS_TILES; ++p) {
            s[p][0] = exp2f(s[p][0] - base_a);
            s[p][1] = exp2f(s[p][1] - base_a);
            s[p][2] = exp2f(s[p][2] - base_b);
            s[p][3] = exp2f(s[p][3] - base_b);
            sum_a += s[p][0] + s[p][1];
            sum_b += s[p][2] + s[p][3];
        }

        // o += p . v: the score accumulators of two n8 tiles form one k16 A fragment.
#pragma unroll
        for (int kk = 0; kk < POS_STEPS; ++kk) {
            uint32_t p_frag[4];
            p_frag[0] = pack_f32_to_bf16x2(s[2 * kk][0], s[2 * kk][1]);
            p_frag[1] = pack_f32_to_bf16x2(s[2 * kk][2], s[2 * kk][3]);
            p_frag[2] = pack_f32_to_bf16x2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            p_frag[3] = pack_f32_to_bf16x2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
            for (int d2 = 0; d2 < DIM_TILES / 2; ++d2) {
                uint32_t r[4];
                ldmatrix_x4_trans(r, tile_chunk<CPR>(v_tile, kk * 16 + (lane & 15), d2 * 2 + (lane >> 4)));
                const uint32_t b_lo[2] = {r[0], r[1]};
                const uint32_t b_hi[2] = {r[2], r[3]};
                mma_m16n8k16_bf16(o[2 * d2], p_frag, b_lo, o[2 * d2]);
                mma_m16n8k16_bf16(o[2 * d2 + 1], p_frag, b_hi, o[2 * d2 + 1]);
            }
        }
        // Every warp is done with this buffer before the next iteration refills it.
        __syncthreads();
    }
    cp_async_wait_all();

#pragma unroll
    for (int offset = 1; offset < 4; offset <<= 1) {
        sum_a += __shfl_xor_sync(FULL_WARP_MASK, sum_a, offset);
        sum_b += __shfl_xor_sync(FULL_WARP_MASK, sum_b, offset);
    }
    const float inv_a = 1.0f / sum_a;
    const float inv_b = 1.0f / sum_b;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int query_row = half == 0 ? query_row_a : query_row_b;
        if (query_row < query_rows) {
            const int token = query_row / group;
            const int head = (int)kv_head * group + query_row % group;
            const float inv = half == 0 ? inv_a : inv_b;
            uint32_t* dst =
                reinterpret_cast<uint32_t*>(out + ((uint64_t)(seq.first_row + token) * num_heads + head) * HEAD_DIM);
#pragma unroll
            for (int d = 0; d < DIM_TILES; ++d) {
                dst[(d * 8 + 2 * t) / 2] = pack_f32_to_bf16x2(o[d][2 * half] * inv, o[d][2 * half + 1] * inv);
            }
        }
    }
}

// One entry point per head_dim: the block's static shared memory, then the layout's kind.
template <int HEAD_DIM>
__device__ __forceinline__ void attention_prefill_entry(const bf16* q, const bf16* arena, const KvLayout& layout,
                                                        const uint32_t* step, bf16* out, int num_seqs, int rows,
                                                        int num_heads, unsigned layer, bf16* shared) {
    if (layout.kind == KV_LAYOUT_CHUNKED) {
        attention_prefill<HEAD_DIM, KV_LAYOUT_CHUNKED>(shared, q, arena, layout, step, out, num_seqs, rows, num_heads,
                                                       layer);
    } else {
        attention_prefill<HEAD_DIM, KV_LAYOUT_CONTIGUOUS>(shared, q, arena, layout, step, out, num_seqs, rows,
                                                          num_heads, layer);
    }
}

// Prefill attention of every sequence of the step with more than one row; the rows of one-row
// sequences are left alone (attention_decode_bf16 computes them). Grid (the sequences' tiles:
// the sum of ceil(rows * group / PREFILL_QUERY_ROWS) over sequences of more than one row,
// num_kv_heads), block PREFILL_THREADS, static shared memory only (48 KiB at head_dim 128).
extern "C" __global__ void attention_prefill_hd16_bf16(const bf16* q,         // [rows, num_heads, 16]
                                                       const bf16* arena,     // [chunks, chunk elements] of layout
                                                       KvLayout layout,       // by value; head_dim 16
                                                       const uint32_t* step,  // packed step view
                                                       bf16* out,             // [rows, num_heads, 16]
                                                       int num_seqs, int rows, int num_heads, unsigned layer) {
    __shared__ __align__(16) bf16 shared[PrefillShape<16>::shared_elems];
    attention_prefill_entry<16>(q, arena, layout, step, out, num_seqs, rows, num_heads, layer, shared);
}

extern "C" __global__ void attention_prefill_hd32_bf16(const bf16* q,         // [rows, num_heads, 32]
                                                       const bf16* arena,     // [chunks, chunk elements] of layout
                                                       KvLayout layout,       // by value; head_dim 32
                                                       const uint32_t* step,  // packed step view
                                                       bf16* out,             // [rows, num_heads, 32]
                                                       int num_seqs, int rows, int num_heads, unsigned layer) {
    __shared__ __align__(16) bf16 shared[PrefillShape<32>::shared_elems];
    attention_prefill_entry<32>(q, arena, layout, step, out, num_seqs, rows, num_heads, layer, shared);
}

extern "C" __global__ void attention_prefill_hd64_bf16(const bf16* q,         // [rows, num_heads, 64]
                                                       const bf16* arena,     // [chunks, chunk elements] of layout
                                                       KvLayout layout,       // by value; head_dim 64
                                                       const uint32_t* step,  // packed step view
                                                       bf16* out,             // [rows, num_heads, 64]
                                                       int num_seqs, int rows, int num_heads, unsigned layer) {
    __shared__ __align__(16) bf16 shared[PrefillShape<64>::shared_elems];
    attention_prefill_entry<64>(q, arena, layout, step, out, num_seqs, rows, num_heads, layer, shared);
}

extern "C" __global__ void attention_prefill_hd128_bf16(const bf16* q,         // [rows, num_heads, 128]
                                                        const bf16* arena,     // [chunks, chunk elements] of layout
                                                        KvLayout layout,       // by value; head_dim 128
                                                        const uint32_t* step,  // packed step view
                                                        bf16* out,             // [rows, num_heads, 128]
                                                        int num_seqs, int rows, int num_heads, unsigned layer) {
    __shared__ __align__(16) bf16 shared[PrefillShape<128>::shared_elems];
    attention_prefill_entry<128>(q, arena, layout, step, out, num_seqs, rows, num_heads, layer, shared);
}

// ---------------------------------------------------------------------------------------------
// Decode.

#define DECODE_THREADS 128
#define DECODE_WARPS (DECODE_THREADS / WARP_SIZE)
#define DECODE_HEADS_PER_BLOCK 4
#define DECODE_MAX_HEAD_DIM 256
#define DECODE_MAX_SPLITS 64
// Positions per split are a multiple of this, so short sequences use few splits.
#define DECODE_SPLIT_QUANTUM 32

// Positions per split for a sequence of kv_len positions; every block of the sequence computes it.
__device__ __forceinline__ int decode_split_len(int kv_len, int num_splits) {
    const int even = (kv_len + num_splits - 1) / num_splits;
    return (even + DECODE_SPLIT_QUANTUM - 1) / DECODE_SPLIT_QUANTUM * DECODE_SPLIT_QUANTUM;
}

// The 16-byte vectors of the head_dim row of (layer, part, head) at position `pos` of `seq`.
template <unsigned KIND>
__device__ __forceinline__ const uint4* decode_kv_row(const bf16* arena, const KvLayout& layout,
                                                      const uint32_t* block_table, const KvSeqStep& seq,
                                                      unsigned layer, unsigned part, unsigned head, int pos) {
    return reinterpret_cast<const uint4*>(arena +
                                          kv_row_offset<KIND>(layout, block_table, seq, layer, part, head, (unsigned)pos));
}

// Folds (other_max, other_sum, other_acc) into (max, sum, acc): two partial softmax states.
__device__ __forceinline__ void decode_merge_state(float& max, float& sum, float acc[8], float other_max,
                                                   float other_sum, const float other_acc[8]) {
    const float new_max = fmaxf(max, other_max);
    if (new_max == negative_infinity()) {
        return;  // both empty
    }
    const float a = exp2f(max - new_max);
    const float b = exp2f(other_max - new_max);
    max = new_max;
    sum = sum * a + other_sum * b;
#pragma unroll
    for (int d = 0; d < 8; ++d) {
        acc[d] = acc[d] * a + other_acc[d] * b;
    }
}

// Shared memory of a decode block, declared once by the entry point (both layouts' code uses it).
struct DecodeShared {
    float warp_acc[DECODE_WARPS][DECODE_HEADS_PER_BLOCK][DECODE_MAX_HEAD_DIM];
    float warp_max[DECODE_WARPS][DECODE_HEADS_PER_BLOCK];
    float warp_sum[DECODE_WARPS][DECODE_HEADS_PER_BLOCK];
    float split_weight[DECODE_HEADS_PER_BLOCK][DECODE_MAX_SPLITS];
    bool is_last_block;
};

// One block: split blockIdx.x of the one-row sequence blockIdx.z, for the head tile blockIdx.y
// (a KV head's query heads in tiles of DECODE_HEADS_PER_BLOCK). Each row of head_dim is read by
// `lanes_per_row` = head_dim / 8 lanes, one 16-byte vector each; a warp covers
// 32 / lanes_per_row positions per step. head_dim is a power of two in [16, 256].
template <unsigned KIND>
__device__ __forceinline__ void attention_decode_split(DecodeShared& shared, const bf16* q, const bf16* arena,
                                                       const KvLayout& layout, const uint32_t* step,
                                                       float* partial_acc, float* partial_max_sum,
                                                       unsigned* split_counters, bf16* out, int num_seqs, int rows,
                                                       int num_heads, unsigned layer, int num_splits) {
    const KvStepView view = kv_step_view(step, num_seqs, rows);
    const int seq_index = blockIdx.z;
    const KvSeqStep seq = view.seqs[seq_index];
    if (seq.rows != 1) {
        return;  // the whole block: a sequence of several rows is attention_prefill's
    }
    const unsigned head_dim = layout.head_dim;
    const int kv_len = (int)seq.start + 1;
    const int split = blockIdx.x;
    const int split_len = decode_split_len(kv_len, num_splits);
    const int begin = split * split_len;
    const int end = min(kv_len, begin + split_len);
    if (begin >= end) {
        return;  // the whole block: this split is past the sequence; the merge counts active splits only
    }
    const int group = num_heads / (int)layout.num_kv_heads;
    const int head_tiles = (group + DECODE_HEADS_PER_BLOCK - 1) / DECODE_HEADS_PER_BLOCK;
    const unsigned kv_head = blockIdx.y / head_tiles;
    const int first_head = (int)kv_head * group + (blockIdx.y % head_tiles) * DECODE_HEADS_PER_BLOCK;
    const int heads_here = min(DECODE_HEADS_PER_BLOCK, (int)kv_head * group + group - first_head);
    // The sequence's query and output row, and its heads' partials.
    const uint64_t row_elems = (uint64_t)seq.first_row * num_heads * head_dim;
    q += row_elems;
    out += row_elems;
    const uint64_t first_seq_slot = (uint64_t)seq_index * num_heads * num_splits;
    unsigned* split_counter = split_counters + (uint64_t)seq_index * gridDim.y + blockIdx.y;

    const int warp = threadIdx.x / WARP_SIZE;
    const int lane = threadIdx.x % WARP_SIZE;
    const int lanes_per_row = (int)head_dim / 8;
    const int rows_per_warp = WARP_SIZE / lanes_per_row;
    const int row_in_warp = lane / lanes_per_row;
    const int vector = lane % lanes_per_row;  // this lane's 8 dimensions: 8 * vector ..

    const float scale = LOG2_E / sqrtf((float)head_dim);
    float q_reg[DECODE_HEADS_PER_BLOCK][8];
    float max[DECODE_HEADS_PER_BLOCK], sum[DECODE_HEADS_PER_BLOCK], acc[DECODE_HEADS_PER_BLOCK][8];
#pragma unroll
    for (int h = 0; h < DECODE_HEADS_PER_BLOCK; ++h) {
        const uint4 packed = h < heads_here ? reinterpret_cast<const uint4*>(q + (uint64_t)(first_head + h) *
                                                                                  head_dim)[vector]
                                            : make_uint4(0u, 0u, 0u, 0u);
        const uint32_t words[4] = {packed.x, packed.y, packed.z, packed.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            q_reg[h][2 * i] = bf16x2_lo_to_f32(words[i]) * scale;
            q_reg[h][2 * i + 1] = bf16x2_hi_to_f32(words[i]) * scale;
        }
        max[h] = negative_infinity();
        sum[h] = 0.0f;
#pragma unroll
        for (int d = 0; d < 8; ++d) {
            acc[h][d] = 0.0f;
        }
    }

    // The loop bound is uniform across the warp (the shuffles need every lane); lanes past the
    // range load nothing and skip the update.
    const int step_positions = DECODE_WARPS * rows_per_warp;
    for (int base = begin + warp * rows_per_warp; base < end; base += step_positions) {
        const int pos = base + row_in_warp;
        const bool valid = pos < end;
        uint4 k_vec = make_uint4(0u, 0u, 0u, 0u);
        uint4 v_vec = make_uint4(0u, 0u, 0u, 0u);
        if (valid) {
            k_vec = decode_kv_row<KIND>(arena, layout, view.block_table, seq, layer, KV_PART_KEY, kv_head, pos)[vector];
            v_vec = decode_kv_row<KIND>(arena, layout, view.block_table, seq, layer, KV_PART_VALUE, kv_head, pos)[vector];
        }
        const uint32_t k_words[4] = {k_vec.x, k_vec.y, k_vec.z, k_vec.w};
        const uint32_t v_words[4] = {v_vec.x, v_vec.y, v_vec.z, v_vec.w};
        float v_val[8];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            v_val[2 * i] = bf16x2_lo_to_f32(v_words[i]);
            v_val[2 * i + 1] = bf16x2_hi_to_f32(v_words[i]);
        }
#pragma unroll
        for (int h = 0; h < DECODE_HEADS_PER_BLOCK; ++h) {
            float score = 0.0f;
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                score = fmaf(q_reg[h][2 * i], bf16x2_lo_to_f32(k_words[i]), score);
                score = fmaf(q_reg[h][2 * i + 1], bf16x2_hi_to_f32(k_words[i]), score);
            }
            for (int offset = lanes_per_row / 2; offset > 0; offset >>= 1) {
                score += __shfl_xor_sync(FULL_WARP_MASK, score, offset);
            }
            if (valid && h < heads_here) {
                const float new_max = fmaxf(max[h], score);
                const float alpha = exp2f(max[h] - new_max);
                const float p = exp2f(score - new_max);
                max[h] = new_max;
                sum[h] = sum[h] * alpha + p;
#pragma unroll
                for (int d = 0; d < 8; ++d) {
                    acc[h][d] = fmaf(p, v_val[d], acc[h][d] * alpha);
                }
            }
        }
    }

    // Fold the warp's rows into its first row (lanes 0 .. lanes_per_row - 1).
    for (int offset = lanes_per_row; offset < WARP_SIZE; offset <<= 1) {
#pragma unroll
        for (int h = 0; h < DECODE_HEADS_PER_BLOCK; ++h) {
            float other_acc[8];
#pragma unroll
            for (int d = 0; d < 8; ++d) {
                other_acc[d] = __shfl_xor_sync(FULL_WARP_MASK, acc[h][d], offset);
            }
            const float other_max = __shfl_xor_sync(FULL_WARP_MASK, max[h], offset);
            const float other_sum = __shfl_xor_sync(FULL_WARP_MASK, sum[h], offset);
            decode_merge_state(max[h], sum[h], acc[h], other_max, other_sum, other_acc);
        }
    }
    if (row_in_warp == 0) {
#pragma unroll
        for (int h = 0; h < DECODE_HEADS_PER_BLOCK; ++h) {
#pragma unroll
            for (int d = 0; d < 8; ++d) {
                shared.warp_acc[warp][h][vector * 8 + d] = acc[h][d];
            }
            if (vector == 0) {
                shared.warp_max[warp][h] = max[h];
                shared.warp_sum[warp][h] = sum[h];
            }
        }
    }
    __syncthreads();

    // Fold the warps: one thread per (head, dimension); the split's unnormalised state goes out.
    for (int item = threadIdx.x; item < heads_here * (int)head_dim; item += DECODE_THREADS) {
        const int h = item / (int)head_dim;
        const int d = item % (int)head_dim;
        float block_max = negative_infinity();
#pragma unroll
        for (int w = 0; w < DECODE_WARPS; ++w) {
            block_max = fmaxf(block_max, shared.warp_max[w][h]);
        }
        float block_sum = 0.0f, block_acc = 0.0f;
#pragma unroll
        for (int w = 0; w < DECODE_WARPS; ++w) {
            const float warp_max = shared.warp_max[w][h];
            const float weight = warp_max == negative_infinity() ? 0.0f : exp2f(warp_max - block_max);
            block_sum += shared.warp_sum[w][h] * weight;
            block_acc += shared.warp_acc[w][h][d] * weight;
        }
        const uint64_t slot = first_seq_slot + (uint64_t)(first_head + h) * num_splits + split;
        partial_acc[slot * head_dim + d] = block_acc;
        if (d == 0) {
            partial_max_sum[2 * slot] = block_max;
            partial_max_sum[2 * slot + 1] = block_sum;
        }
    }

    // The last block of this head group to finish merges every active split (the classic
    // threadfence reduction): each block makes its partials visible, then takes a ticket.
    __threadfence();
    __syncthreads();
    const int active_splits = (kv_len + split_len - 1) / split_len;
    if (threadIdx.x == 0) {
        shared.is_last_block = atomicAdd(split_counter, 1u) == (unsigned)(active_splits - 1);
    }
    __syncthreads();
    if (!shared.is_last_block) {
        return;
    }
    // Other blocks' partials are read past L1 (volatile): they were written on other SMs.
    const volatile float* all_acc = partial_acc;
    const volatile float* all_max_sum = partial_max_sum;
    if ((int)threadIdx.x < heads_here) {
        const int h = threadIdx.x;
        const uint64_t first_slot = first_seq_slot + (uint64_t)(first_head + h) * num_splits;
        float overall_max = negative_infinity();
        for (int s = 0; s < active_splits; ++s) {
            overall_max = fmaxf(overall_max, all_max_sum[2 * (first_slot + s)]);
        }
        float total_sum = 0.0f;
        for (int s = 0; s < active_splits; ++s) {
            const float weight = exp2f(all_max_sum[2 * (first_slot + s)] - overall_max);
            shared.split_weight[h][s] = weight;
            total_sum += all_max_sum[2 * (first_slot + s) + 1] * weight;
        }
        for (int s = 0; s < active_splits; ++s) {
            shared.split_weight[h][s] /= total_sum;
        }
    }
    __syncthreads();
    for (int item = threadIdx.x; item < heads_here * (int)head_dim; item += DECODE_THREADS) {
        const int h = item / (int)head_dim;
        const int d = item % (int)head_dim;
        const uint64_t first_slot = first_seq_slot + (uint64_t)(first_head + h) * num_splits;
        float value = 0.0f;
        for (int s = 0; s < active_splits; ++s) {
            value += all_acc[(first_slot + s) * head_dim + d] * shared.split_weight[h][s];
        }
        out[(uint64_t)(first_head + h) * head_dim + d] = f32_to_bf16(value);
    }
    if (threadIdx.x == 0) {
        *split_counter = 0u;  // ready for the next step
    }
}

// Decode attention of every sequence of the step with one row, in one launch; sequences of
// several rows are left alone (attention_prefill_hd* computes them). Grid (num_splits,
// num_kv_heads * ceil(group / DECODE_HEADS_PER_BLOCK), num_seqs), block DECODE_THREADS,
// num_splits <= DECODE_MAX_SPLITS. split_counters start at zero and are left at zero.
extern "C" __global__ void attention_decode_bf16(const bf16* q,            // [rows, num_heads, head_dim]
                                                 const bf16* arena,        // [chunks, chunk elements] of layout
                                                 KvLayout layout,          // the arena's geometry, by value
                                                 const uint32_t* step,     // packed step view [5 num_seqs + 2 rows + table]
                                                 float* partial_acc,       // [num_seqs, num_heads, num_splits, head_dim]
                                                 float* partial_max_sum,   // [num_seqs, num_heads, num_splits, 2]
                                                 unsigned* split_counters, // [num_seqs, gridDim.y]
                                                 bf16* out,                // [rows, num_heads, head_dim]
                                                 int num_seqs, int rows, int num_heads, unsigned layer,
                                                 int num_splits) {
    __shared__ DecodeShared shared;
    if (layout.kind == KV_LAYOUT_CHUNKED) {
        attention_decode_split<KV_LAYOUT_CHUNKED>(shared, q, arena, layout, step, partial_acc, partial_max_sum,
                                                  split_counters, out, num_seqs, rows, num_heads, layer, num_splits);
    } else {
        attention_decode_split<KV_LAYOUT_CONTIGUOUS>(shared, q, arena, layout, step, partial_acc, partial_max_sum,
                                                     split_counters, out, num_seqs, rows, num_heads, layer,
                                                     num_splits);
    }
}
