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
//   (split, KV head and head tile, sequence). Flash-decoding: each sequence is cut into up to
//   gridDim.x ranges aligned to its chunks, each block reduces one range for up to
//   DECODE_HEADS_PER_BLOCK query heads of one KV head (the heads share each K/V load), every
//   lane with the K and V rows of several positions in flight, and the last block of a head
//   group to finish merges the ranges (no second launch). Lengths, positions and block tables
//   are read from device memory and the grid depends only on the split count (which the host
//   raises at long contexts) and the number of sequences, so a recorded decode step replays
//   unchanged as its sequences grow.
// K/V entries are bf16, or int8 / fp8 e4m3 codes with f32 scales (kv_quant.cuh): the decode
// kernel dequantizes them in registers, the prefill kernel into its bf16 tiles.
// Softmax runs in base 2: scores are scaled by log2(e) / sqrt(head_dim) once, then exp2.
#include "common.cuh"
#include "kv_layout.cuh"
#include "kv_quant.cuh"
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

// Eight codes of an int8 or fp8 row (dimensions 8 * chunk ..) dequantized to bf16 into a tile's
// 16-byte chunk, or zeros. Plain loads: the tile is ready at the barrier after the copies' wait.
// Four bytes at a time: a chunk of a quantized arena starts on a 4-byte boundary only.
__device__ __forceinline__ void prefill_dequantize_chunk(bf16* dst, const uint8_t* arena, const KvRowOffsets& at,
                                                         const KvLayout& layout, unsigned part, int chunk,
                                                         bool in_bounds) {
    uint4 out = make_uint4(0u, 0u, 0u, 0u);
    if (in_bounds) {
        const uint32_t* codes = reinterpret_cast<const uint32_t*>(arena + at.codes) + 2 * chunk;
        const float* scales = reinterpret_cast<const float*>(arena + at.scale);
        const float scale = scales[kv_scales_per_row(layout, part) > 1u ? chunk * 8 / KV_INT8_KEY_GROUP : 0];
        const uint32_t words[2] = {codes[0], codes[1]};
        float value[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            value[i] = (layout.dtype == KV_DTYPE_INT8 ? kv_code_value<KV_DTYPE_INT8>(words[i / 4], i % 4)
                                                      : kv_code_value<KV_DTYPE_FP8_E4M3>(words[i / 4], i % 4)) *
                       scale;
        }
        out = make_uint4(pack_f32_to_bf16x2(value[0], value[1]), pack_f32_to_bf16x2(value[2], value[3]),
                         pack_f32_to_bf16x2(value[4], value[5]), pack_f32_to_bf16x2(value[6], value[7]));
    }
    *reinterpret_cast<uint4*>(dst) = out;
}

// One K/V tile of kv_rows positions from first_pos into shared memory as bf16: copied from a bf16
// arena (cp.async), dequantized from an int8 or fp8 one.
template <int HEAD_DIM, unsigned KIND>
__device__ __forceinline__ void prefill_load_kv_tile(bf16* k_tile, bf16* v_tile, const uint8_t* arena,
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
#pragma unroll
        for (unsigned part = KV_PART_KEY; part <= KV_PART_VALUE; ++part) {
            const KvRowOffsets at = kv_row_offsets<KIND>(layout, block_table, seq, layer, part, kv_head, safe_pos);
            bf16* dst = tile_chunk<Shape::chunks_per_row>(part == KV_PART_KEY ? k_tile : v_tile, row, chunk);
            if (layout.dtype == KV_DTYPE_BF16) {
                cp_async_16_or_zero(dst, reinterpret_cast<const bf16*>(arena + at.codes) + chunk * 8, in_bounds);
            } else {
                prefill_dequantize_chunk(dst, arena, at, layout, part, chunk, in_bounds);
            }
        }
    }
}

// `shared`: PrefillShape<HEAD_DIM>::shared_elems, 16-byte aligned (declared by the entry point).
template <int HEAD_DIM, unsigned KIND>
__device__ __forceinline__ void attention_prefill(bf16* shared, const bf16* q, const uint8_t* arena,
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
__device__ __forceinline__ void attention_prefill_entry(const bf16* q, const uint8_t* arena, const KvLayout& layout,
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
                                                       const uint8_t* arena,  // [chunks, chunk bytes] of layout
                                                       KvLayout layout,       // by value; head_dim 16
                                                       const uint32_t* step,  // packed step view
                                                       bf16* out,             // [rows, num_heads, 16]
                                                       int num_seqs, int rows, int num_heads, unsigned layer) {
    __shared__ __align__(16) bf16 shared[PrefillShape<16>::shared_elems];
    attention_prefill_entry<16>(q, arena, layout, step, out, num_seqs, rows, num_heads, layer, shared);
}

extern "C" __global__ void attention_prefill_hd32_bf16(const bf16* q,         // [rows, num_heads, 32]
                                                       const uint8_t* arena,  // [chunks, chunk bytes] of layout
                                                       KvLayout layout,       // by value; head_dim 32
                                                       const uint32_t* step,  // packed step view
                                                       bf16* out,             // [rows, num_heads, 32]
                                                       int num_seqs, int rows, int num_heads, unsigned layer) {
    __shared__ __align__(16) bf16 shared[PrefillShape<32>::shared_elems];
    attention_prefill_entry<32>(q, arena, layout, step, out, num_seqs, rows, num_heads, layer, shared);
}

extern "C" __global__ void attention_prefill_hd64_bf16(const bf16* q,         // [rows, num_heads, 64]
                                                       const uint8_t* arena,  // [chunks, chunk bytes] of layout
                                                       KvLayout layout,       // by value; head_dim 64
                                                       const uint32_t* step,  // packed step view
                                                       bf16* out,             // [rows, num_heads, 64]
                                                       int num_seqs, int rows, int num_heads, unsigned layer) {
    __shared__ __align__(16) bf16 shared[PrefillShape<64>::shared_elems];
    attention_prefill_entry<64>(q, arena, layout, step, out, num_seqs, rows, num_heads, layer, shared);
}

extern "C" __global__ void attention_prefill_hd128_bf16(const bf16* q,         // [rows, num_heads, 128]
                                                        const uint8_t* arena,  // [chunks, chunk bytes] of layout
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
#define DECODE_MAX_SPLITS 128
// Positions per split are a multiple of this, so short sequences use few splits.
#define DECODE_SPLIT_QUANTUM 32
// Positions each lane loads (a 16-byte vector of K and one of V each) before it uses any.
#define DECODE_ROWS_IN_FLIGHT 4
// Chunks whose bases a block keeps in shared memory at once.
#define DECODE_TABLE_WINDOW 64

static_assert(DECODE_MAX_SPLITS <= DECODE_THREADS, "the merge gives each split one thread");

// Positions per split of a sequence of kv_len positions cut into at most max_splits ranges
// (the launch's gridDim.x): a multiple of DECODE_SPLIT_QUANTUM and, in the chunked layout,
// aligned to chunks: whole chunks when a split is as long as a chunk, else a power of two that
// divides a power-of-two chunk, so that a split never straddles a chunk boundary it need not.
// Every block of the sequence computes the same.
__device__ __forceinline__ int decode_split_len(int kv_len, int max_splits, const KvLayout& layout) {
    const int even = (kv_len + max_splits - 1) / max_splits;
    int len = (even + DECODE_SPLIT_QUANTUM - 1) / DECODE_SPLIT_QUANTUM * DECODE_SPLIT_QUANTUM;
    if (layout.kind == KV_LAYOUT_CHUNKED) {
        const int chunk = (int)layout.chunk_tokens;
        if (len >= chunk) {
            len = (len + chunk - 1) / chunk * chunk;
        } else if ((chunk & (chunk - 1)) == 0) {
            int power = DECODE_SPLIT_QUANTUM;
            while (power < len) {
                power <<= 1;
            }
            len = power;
        }
    }
    return len;
}

// How a decode block finds the K row of a position (its V row sits a fixed distance after it):
// one base for the whole contiguous run, or the bases of the chunks of the current window of
// the block table, read once per chunk into shared memory, and the position's chunk and slot
// by shift and mask (power-of-two chunks) or by division.
enum DecodeAddressing { DECODE_CONTIGUOUS, DECODE_CHUNKS_BY_SHIFT, DECODE_CHUNKS_BY_DIVISION };

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

// The 8 values of a lane's dimensions in a K or V row it loaded (a 16-byte vector of bf16, or 8
// codes in x and y), without the row's scale.
template <unsigned DTYPE>
__device__ __forceinline__ void decode_unpack(const uint4& loaded, float values[8]) {
    if constexpr (DTYPE == KV_DTYPE_BF16) {
        const uint32_t words[4] = {loaded.x, loaded.y, loaded.z, loaded.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            values[2 * i] = bf16x2_lo_to_f32(words[i]);
            values[2 * i + 1] = bf16x2_hi_to_f32(words[i]);
        }
    } else {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            values[i] = kv_code_value<DTYPE>(loaded.x, i);
            values[4 + i] = kv_code_value<DTYPE>(loaded.y, i);
        }
    }
}

// Shared memory of a decode block, declared once by the entry point (every addressing's code
// uses it).
struct DecodeShared {
    float warp_acc[DECODE_WARPS][DECODE_HEADS_PER_BLOCK][DECODE_MAX_HEAD_DIM];
    float warp_max[DECODE_WARPS][DECODE_HEADS_PER_BLOCK];
    float warp_sum[DECODE_WARPS][DECODE_HEADS_PER_BLOCK];
    // Byte offset of the K row of slot 0 of (layer, KV head) in each chunk of the window.
    uint64_t chunk_base[DECODE_TABLE_WINDOW];
    float reduce[DECODE_WARPS][DECODE_HEADS_PER_BLOCK];
    float split_weight[DECODE_HEADS_PER_BLOCK][DECODE_MAX_SPLITS];
    bool is_last_block;
};

// values[h] reduced over the block (the largest, or the sum) for every head h; every thread gets
// the results. Contains barriers: every thread of the block calls it.
template <bool LARGEST>
__device__ __forceinline__ void decode_block_reduce(DecodeShared& shared, float values[DECODE_HEADS_PER_BLOCK]) {
    const int warp = threadIdx.x / WARP_SIZE;
#pragma unroll
    for (int h = 0; h < DECODE_HEADS_PER_BLOCK; ++h) {
        values[h] = LARGEST ? warp_reduce_max(values[h]) : warp_reduce_sum(values[h]);
        if (threadIdx.x % WARP_SIZE == 0) {
            shared.reduce[warp][h] = values[h];
        }
    }
    __syncthreads();
#pragma unroll
    for (int h = 0; h < DECODE_HEADS_PER_BLOCK; ++h) {
        float value = shared.reduce[0][h];
#pragma unroll
        for (int w = 1; w < DECODE_WARPS; ++w) {
            value = LARGEST ? fmaxf(value, shared.reduce[w][h]) : value + shared.reduce[w][h];
        }
        values[h] = value;
    }
    __syncthreads();
}

// One block: split blockIdx.x of the one-row sequence blockIdx.z, for the head tile blockIdx.y
// (a KV head's query heads in tiles of DECODE_HEADS_PER_BLOCK). Each row of head_dim is read by
// `lanes_per_row` = head_dim / 8 lanes, 8 dimensions each (a 16-byte vector of bf16, or 8 bytes
// of int8 or fp8 codes and the row's scale for them), so a warp covers `rows_per_warp` =
// 32 / lanes_per_row positions per load, and every lane issues the loads of
// ROWS_IN_FLIGHT positions (rows_per_warp apart) before it uses one: a warp keeps 4 KiB of K
// and V in flight (DECODE_ROWS_IN_FLIGHT positions a lane in bf16, twice as many in int8 and
// fp8, whose rows are half the bytes).
// Quantized codes are dequantized in registers: a lane's K dot product is scaled once by its
// key group's scale, a position's weight by its V row's scale. head_dim is a power of two in
// [16, 256]; DTYPE is the layout's `dtype` (bf16, int8 or fp8 e4m3).
template <int ADDRESSING, unsigned DTYPE>
__device__ __forceinline__ void attention_decode_split(DecodeShared& shared, const bf16* q, const uint8_t* arena,
                                                       const KvLayout& layout, const uint32_t* step,
                                                       float* partial_acc, float* partial_max_sum,
                                                       unsigned* split_counters, bf16* out, int num_seqs, int rows,
                                                       int num_heads, unsigned layer) {
    const KvStepView view = kv_step_view(step, num_seqs, rows);
    const int seq_index = blockIdx.z;
    const KvSeqStep seq = view.seqs[seq_index];
    if (seq.rows != 1) {
        return;  // the whole block: a sequence of several rows is attention_prefill's
    }
    const int head_dim = (int)layout.head_dim;
    const int kv_len = (int)seq.start + 1;
    const int max_splits = (int)gridDim.x;
    const int split = blockIdx.x;
    const int split_len = decode_split_len(kv_len, max_splits, layout);
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
    const uint64_t first_seq_slot = (uint64_t)seq_index * num_heads * max_splits;
    unsigned* split_counter = split_counters + (uint64_t)seq_index * gridDim.y + blockIdx.y;

    const int warp = threadIdx.x / WARP_SIZE;
    const int lane = threadIdx.x % WARP_SIZE;
    const int lanes_per_row = head_dim / 8;
    const int rows_per_warp = WARP_SIZE / lanes_per_row;
    const int row_in_warp = lane / lanes_per_row;
    const int vector = lane % lanes_per_row;  // this lane's 8 dimensions: 8 * vector ..
    constexpr int ROWS_IN_FLIGHT = DTYPE == KV_DTYPE_BF16 ? DECODE_ROWS_IN_FLIGHT : 2 * DECODE_ROWS_IN_FLIGHT;
    const int warp_span = rows_per_warp * ROWS_IN_FLIGHT;  // positions a warp loads at once
    const int block_span = DECODE_WARPS * warp_span;

    // Inside a block (a chunk, or the contiguous run) the K rows of (layer, kv_head) follow one
    // another `row_bytes` apart from `head_offset`; each V row sits `value_offset` after its K
    // row. The scales of slot 0 sit `key_scale_offset` and `value_scale_offset` after the K row
    // of slot 0, those of the next slots `key_scale_bytes` and 4 bytes apart (int8 and fp8).
    const uint64_t row_bytes = kv_row_code_bytes(layout);
    const uint64_t head_offset = kv_code_offset_in_block(layout, layer, KV_PART_KEY, kv_head, 0, seq.block_tokens);
    const uint64_t value_offset =
        kv_code_offset_in_block(layout, layer, KV_PART_VALUE, kv_head, 0, seq.block_tokens) - head_offset;
    const uint64_t key_scale_offset =
        kv_scale_offset_in_block(layout, layer, KV_PART_KEY, kv_head, 0, seq.block_tokens) - head_offset;
    const uint64_t value_scale_offset =
        kv_scale_offset_in_block(layout, layer, KV_PART_VALUE, kv_head, 0, seq.block_tokens) - head_offset;
    const uint64_t key_scale_bytes = 4u * kv_scales_per_row(layout, KV_PART_KEY);
    // This lane's key scale among its row's: its key group's (int8), the row's one (fp8).
    const int key_scale_index = kv_scales_per_row(layout, KV_PART_KEY) > 1u ? vector * 8 / KV_INT8_KEY_GROUP : 0;
    const uint32_t* table = view.block_table + seq.table_start;
    const unsigned chunk_tokens = layout.chunk_tokens;
    const unsigned chunk_shift = (unsigned)(__ffs((int)chunk_tokens) - 1);

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

    // The split in windows of whole table entries (contiguous: one window). The loop bounds are
    // uniform across the block (the barriers need every thread) and a warp's tile bound across
    // the warp (the shuffles need every lane); lanes past the window load nothing and skip the
    // update.
    for (int window = begin; window < end;) {
        int window_end = end;
        uint64_t run_base = 0;  // contiguous: the K row of slot 0
        int first_entry = 0;
        if constexpr (ADDRESSING == DECODE_CONTIGUOUS) {
            run_base = table[0] * kv_chunk_bytes(layout) + head_offset;
        } else {
            first_entry = ADDRESSING == DECODE_CHUNKS_BY_SHIFT ? window >> chunk_shift : window / (int)chunk_tokens;
            const int last_entry = ADDRESSING == DECODE_CHUNKS_BY_SHIFT ? (end - 1) >> chunk_shift
                                                                        : (end - 1) / (int)chunk_tokens;
            const int entries = min(DECODE_TABLE_WINDOW, last_entry - first_entry + 1);
            window_end = min(end, (first_entry + entries) * (int)chunk_tokens);
            __syncthreads();  // every warp is done with the previous window's bases
            for (int e = threadIdx.x; e < entries; e += DECODE_THREADS) {
                shared.chunk_base[e] = table[first_entry + e] * kv_chunk_bytes(layout) + head_offset;
            }
            __syncthreads();
        }
        for (int tile = window + warp * warp_span; tile < window_end; tile += block_span) {
            // bf16: a 16-byte vector of each row; int8 and fp8: 8 bytes (x, y) of codes, read as
            // two words (a quantized arena's chunks start on 4-byte boundaries only).
            uint4 k_vec[ROWS_IN_FLIGHT], v_vec[ROWS_IN_FLIGHT];
            float k_scale[ROWS_IN_FLIGHT], v_scale[ROWS_IN_FLIGHT];
#pragma unroll
            for (int r = 0; r < ROWS_IN_FLIGHT; ++r) {
                const int pos = tile + r * rows_per_warp + row_in_warp;
                k_vec[r] = make_uint4(0u, 0u, 0u, 0u);
                v_vec[r] = make_uint4(0u, 0u, 0u, 0u);
                k_scale[r] = 0.0f;
                v_scale[r] = 0.0f;
                if (pos < window_end) {
                    uint64_t block;  // the K row of slot 0 of the position's block
                    unsigned slot;
                    if constexpr (ADDRESSING == DECODE_CONTIGUOUS) {
                        block = run_base;
                        slot = (unsigned)pos;
                    } else if constexpr (ADDRESSING == DECODE_CHUNKS_BY_SHIFT) {
                        block = shared.chunk_base[(pos >> chunk_shift) - first_entry];
                        slot = (unsigned)pos & (chunk_tokens - 1);
                    } else {
                        block = shared.chunk_base[pos / (int)chunk_tokens - first_entry];
                        slot = (unsigned)pos % chunk_tokens;
                    }
                    const uint8_t* row = arena + block + slot * row_bytes;
                    if constexpr (DTYPE == KV_DTYPE_BF16) {
                        k_vec[r] = reinterpret_cast<const uint4*>(row)[vector];
                        v_vec[r] = reinterpret_cast<const uint4*>(row + value_offset)[vector];
                    } else {
                        const uint32_t* k_codes = reinterpret_cast<const uint32_t*>(row) + 2 * vector;
                        const uint32_t* v_codes = reinterpret_cast<const uint32_t*>(row + value_offset) + 2 * vector;
                        k_vec[r].x = k_codes[0];
                        k_vec[r].y = k_codes[1];
                        v_vec[r].x = v_codes[0];
                        v_vec[r].y = v_codes[1];
                        const uint8_t* scales = arena + block;
                        k_scale[r] = reinterpret_cast<const float*>(scales + key_scale_offset +
                                                                    slot * key_scale_bytes)[key_scale_index];
                        v_scale[r] = reinterpret_cast<const float*>(scales + value_scale_offset)[slot];
                    }
                }
            }
            float score[ROWS_IN_FLIGHT][DECODE_HEADS_PER_BLOCK];
#pragma unroll
            for (int r = 0; r < ROWS_IN_FLIGHT; ++r) {
                float k_values[8];
                decode_unpack<DTYPE>(k_vec[r], k_values);
#pragma unroll
                for (int h = 0; h < DECODE_HEADS_PER_BLOCK; ++h) {
                    float dot = 0.0f;
#pragma unroll
                    for (int d = 0; d < 8; ++d) {
                        dot = fmaf(q_reg[h][d], k_values[d], dot);
                    }
                    if constexpr (DTYPE != KV_DTYPE_BF16) {
                        dot *= k_scale[r];
                    }
                    for (int offset = lanes_per_row / 2; offset > 0; offset >>= 1) {
                        dot += __shfl_xor_sync(FULL_WARP_MASK, dot, offset);
                    }
                    score[r][h] = dot;
                }
            }
            // The online softmax over this lane's positions: one rescale per head for all of them.
#pragma unroll
            for (int h = 0; h < DECODE_HEADS_PER_BLOCK; ++h) {
                float tile_max = negative_infinity();
#pragma unroll
                for (int r = 0; r < ROWS_IN_FLIGHT; ++r) {
                    if (tile + r * rows_per_warp + row_in_warp < window_end) {
                        tile_max = fmaxf(tile_max, score[r][h]);
                    }
                }
                if (h >= heads_here || tile_max == negative_infinity()) {
                    continue;  // a padding head, or no position of this lane in the window
                }
                const float new_max = fmaxf(max[h], tile_max);
                const float alpha = exp2f(max[h] - new_max);
                max[h] = new_max;
                sum[h] *= alpha;
#pragma unroll
                for (int d = 0; d < 8; ++d) {
                    acc[h][d] *= alpha;
                }
#pragma unroll
                for (int r = 0; r < ROWS_IN_FLIGHT; ++r) {
                    if (tile + r * rows_per_warp + row_in_warp < window_end) {
                        const float p = exp2f(score[r][h] - new_max);
                        sum[h] += p;
                        const float weight = DTYPE == KV_DTYPE_BF16 ? p : p * v_scale[r];
                        float v_values[8];
                        decode_unpack<DTYPE>(v_vec[r], v_values);
#pragma unroll
                        for (int d = 0; d < 8; ++d) {
                            acc[h][d] = fmaf(weight, v_values[d], acc[h][d]);
                        }
                    }
                }
            }
        }
        window = window_end;
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
    for (int item = threadIdx.x; item < heads_here * head_dim; item += DECODE_THREADS) {
        const int h = item / head_dim;
        const int d = item % head_dim;
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
        const uint64_t slot = first_seq_slot + (uint64_t)(first_head + h) * max_splits + split;
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
    // Each split's weight, all splits at once: thread s reads split s of every head (other
    // blocks' partials, read past L1: they were written on other SMs).
    const int s = threadIdx.x;
    float split_max[DECODE_HEADS_PER_BLOCK], split_sum[DECODE_HEADS_PER_BLOCK];
#pragma unroll
    for (int h = 0; h < DECODE_HEADS_PER_BLOCK; ++h) {
        const bool present = h < heads_here && s < active_splits;
        const uint64_t slot = first_seq_slot + (uint64_t)(first_head + h) * max_splits + s;
        split_max[h] = present ? load_past_l1(partial_max_sum + 2 * slot) : negative_infinity();
        split_sum[h] = present ? load_past_l1(partial_max_sum + 2 * slot + 1) : 0.0f;
    }
    float overall_max[DECODE_HEADS_PER_BLOCK], weighted_sum[DECODE_HEADS_PER_BLOCK];
#pragma unroll
    for (int h = 0; h < DECODE_HEADS_PER_BLOCK; ++h) {
        overall_max[h] = split_max[h];
    }
    decode_block_reduce<true>(shared, overall_max);
#pragma unroll
    for (int h = 0; h < DECODE_HEADS_PER_BLOCK; ++h) {
        // Every active split saw at least one position: its max is finite.
        split_max[h] = split_max[h] == negative_infinity() ? 0.0f : exp2f(split_max[h] - overall_max[h]);
        weighted_sum[h] = split_sum[h] * split_max[h];
    }
    decode_block_reduce<false>(shared, weighted_sum);
    if (s < active_splits) {
#pragma unroll
        for (int h = 0; h < DECODE_HEADS_PER_BLOCK; ++h) {
            shared.split_weight[h][s] = split_max[h] / weighted_sum[h];
        }
    }
    __syncthreads();
    for (int item = threadIdx.x; item < heads_here * head_dim; item += DECODE_THREADS) {
        const int h = item / head_dim;
        const int d = item % head_dim;
        const float* first = partial_acc + (first_seq_slot + (uint64_t)(first_head + h) * max_splits) * head_dim + d;
        float value = 0.0f;
        int t = 0;
        // Four loads in flight at a time.
        for (; t + 4 <= active_splits; t += 4) {
            float part[4];
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                part[u] = load_past_l1(first + (uint64_t)(t + u) * head_dim);
            }
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                value += part[u] * shared.split_weight[h][t + u];
            }
        }
        for (; t < active_splits; ++t) {
            value += load_past_l1(first + (uint64_t)t * head_dim) * shared.split_weight[h][t];
        }
        out[(uint64_t)(first_head + h) * head_dim + d] = f32_to_bf16(value);
    }
    if (threadIdx.x == 0) {
        *split_counter = 0u;  // ready for the next step
    }
}

// The layout's addressing for one element type.
template <unsigned DTYPE>
__device__ __forceinline__ void attention_decode_dtype(DecodeShared& shared, const bf16* q, const uint8_t* arena,
                                                       const KvLayout& layout, const uint32_t* step,
                                                       float* partial_acc, float* partial_max_sum,
                                                       unsigned* split_counters, bf16* out, int num_seqs, int rows,
                                                       int num_heads, unsigned layer) {
    grid_dependency_wait();  // before any access: q, the arena, the view, the counters are other kernels' too
    grid_dependents_launch();
    if (layout.kind != KV_LAYOUT_CHUNKED) {
        attention_decode_split<DECODE_CONTIGUOUS, DTYPE>(shared, q, arena, layout, step, partial_acc,
                                                         partial_max_sum, split_counters, out, num_seqs, rows,
                                                         num_heads, layer);
    } else if ((layout.chunk_tokens & (layout.chunk_tokens - 1)) == 0) {
        attention_decode_split<DECODE_CHUNKS_BY_SHIFT, DTYPE>(shared, q, arena, layout, step, partial_acc,
                                                              partial_max_sum, split_counters, out, num_seqs, rows,
                                                              num_heads, layer);
    } else {
        attention_decode_split<DECODE_CHUNKS_BY_DIVISION, DTYPE>(shared, q, arena, layout, step, partial_acc,
                                                                 partial_max_sum, split_counters, out, num_seqs,
                                                                 rows, num_heads, layer);
    }
}

// Decode attention of every sequence of the step with one row, in one launch; sequences of
// several rows are left alone (attention_prefill_hd* computes them). Grid (max_splits,
// num_kv_heads * ceil(group / DECODE_HEADS_PER_BLOCK), num_seqs), block DECODE_THREADS,
// max_splits <= DECODE_MAX_SPLITS: each sequence is cut into splits of decode_split_len
// positions, as many as needed up to gridDim.x. split_counters start at zero and are left at
// zero. One entry point per KV element type (a bf16 arena here), so that each is compiled with
// the registers its own type needs.
extern "C" __global__ void attention_decode_bf16(const bf16* q,            // [rows, num_heads, head_dim]
                                                 const uint8_t* arena,     // [chunks, chunk bytes] of layout
                                                 KvLayout layout,          // the arena's geometry, by value
                                                 const uint32_t* step,     // packed step view [5 num_seqs + 2 rows + table]
                                                 float* partial_acc,       // [num_seqs, num_heads, gridDim.x, head_dim]
                                                 float* partial_max_sum,   // [num_seqs, num_heads, gridDim.x, 2]
                                                 unsigned* split_counters, // [num_seqs, gridDim.y]
                                                 bf16* out,                // [rows, num_heads, head_dim]
                                                 int num_seqs, int rows, int num_heads, unsigned layer) {
    __shared__ DecodeShared shared;
    attention_decode_dtype<KV_DTYPE_BF16>(shared, q, arena, layout, step, partial_acc, partial_max_sum, split_counters, out,
                                          num_seqs, rows, num_heads, layer);
}

// attention_decode_bf16 over an int8 arena.
extern "C" __global__ void attention_decode_int8_kv_bf16(const bf16* q,            // [rows, num_heads, head_dim]
                                                         const uint8_t* arena,     // [chunks, chunk bytes] of layout
                                                         KvLayout layout,          // the arena's geometry, by value
                                                         const uint32_t* step,     // packed step view [5 num_seqs + 2 rows + table]
                                                         float* partial_acc,       // [num_seqs, num_heads, gridDim.x, head_dim]
                                                         float* partial_max_sum,   // [num_seqs, num_heads, gridDim.x, 2]
                                                         unsigned* split_counters, // [num_seqs, gridDim.y]
                                                         bf16* out,                // [rows, num_heads, head_dim]
                                                         int num_seqs, int rows, int num_heads, unsigned layer) {
    __shared__ DecodeShared shared;
    attention_decode_dtype<KV_DTYPE_INT8>(shared, q, arena, layout, step, partial_acc, partial_max_sum, split_counters, out,
                                          num_seqs, rows, num_heads, layer);
}

// attention_decode_bf16 over an fp8 e4m3 arena.
extern "C" __global__ void attention_decode_fp8_kv_bf16(const bf16* q,            // [rows, num_heads, head_dim]
                                                        const uint8_t* arena,     // [chunks, chunk bytes] of layout
                                                        KvLayout layout,          // the arena's geometry, by value
                                                        const uint32_t* step,     // packed step view [5 num_seqs + 2 rows + table]
                                                        float* partial_acc,       // [num_seqs, num_heads, gridDim.x, head_dim]
                                                        float* partial_max_sum,   // [num_seqs, num_heads, gridDim.x, 2]
                                                        unsigned* split_counters, // [num_seqs, gridDim.y]
                                                        bf16* out,                // [rows, num_heads, head_dim]
                                                        int num_seqs, int rows, int num_heads, unsigned layer) {
    __shared__ DecodeShared shared;
    attention_decode_dtype<KV_DTYPE_FP8_E4M3>(shared, q, arena, layout, step, partial_acc, partial_max_sum, split_counters, out,
                                              num_seqs, rows, num_heads, layer);
}
