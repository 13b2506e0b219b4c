// The C mirror of `kvlab::kv::KvLayout` (src/kv/layout.rs) and of the step view
// (`kvlab::kv::StepView`, src/kv/step.rs): the geometry of KV memory and the rows of a forward
// step, which the CPU code and the kernels both read, so that the contiguous and the chunked
// layout differ in one place only. THE TWO SIDES MUST CHANGE TOGETHER: same fields in the same
// order, same formulas for `kv_code_offset_in_block` (`KvLayout::code_offset_in_block`) and
// `kv_scale_offset_in_block` (`KvLayout::scale_offset_in_block`), both in bytes, `kv_locate`
// (`StepView::locate`), `kv_row_offsets` (`StepView::row_offsets`) and `kv_step_advance`
// (`StepView::advance`). The kernels store bf16, int8 and fp8 e4m3 (kv_quant.cuh, the mirror of
// src/kv/quant.rs), not f32; the CUDA backend refuses f32 and sequences with slot maps (eviction
// policies) before any kernel sees them, so a row's slot is its position here. The
// static_asserts below and their twins in src/kv/layout.rs and src/kv/step.rs catch a field
// added on one side only; src/backend/cuda/kernels.rs checks the KV_LAYOUT_*, KV_DTYPE_*,
// KV_PART_* and KV_INT8_KEY_GROUP values below against the Rust ones (build.rs turns them into
// Rust constants); the selftest's kernel checks compare every kernel that reads them with the
// CPU backend, and the arenas the two backends write byte for byte.
//
// The arena of a pool is `[chunks][chunk_bytes]` bytes: chunk `c` starts at byte
// `c * kv_chunk_bytes(layout)`. A *block* is one sequence's positions in one chunk (chunked
// layout, `block_tokens = chunk_tokens`) or in its whole run of consecutive chunks (contiguous
// layout, `block_tokens` = the run's capacity): first its codes, ordered
// `[num_layers][2 (K, V)][num_kv_heads][block_tokens][head_dim]`, so that for one layer and head
// a block's positions are consecutive rows of `head_dim`, which is what attention streams; then,
// for int8 and fp8, the rows' f32 scales in the same order.
//
// Kernels receive the layout by value (one argument, `KvLayout layout`) and the step view as a
// pointer to its packed words in device memory (`StepView::packed`: the sequences, `row_seq`,
// `row_pos`, the block tables), with the step's sequence and row counts as scalars; read it
// through `kv_step_view`.
#pragma once

#include "common.cuh"

#define KV_LAYOUT_CONTIGUOUS 0
#define KV_LAYOUT_CHUNKED 1
#define KV_DTYPE_F32 0
#define KV_DTYPE_BF16 1
#define KV_DTYPE_INT8 2
#define KV_DTYPE_FP8_E4M3 3
// Channels of an int8 key row that share a scale (`kvlab::kv::quant::INT8_KEY_GROUP`).
#define KV_INT8_KEY_GROUP 16

#define KV_PART_KEY 0u
#define KV_PART_VALUE 1u

struct KvLayout {
    uint32_t kind;   // KV_LAYOUT_CONTIGUOUS or KV_LAYOUT_CHUNKED
    uint32_t dtype;  // KV_DTYPE_*: the kernels store bf16, int8 or fp8 e4m3 (not f32)
    uint32_t num_layers;
    uint32_t num_kv_heads;
    uint32_t head_dim;
    // Positions per chunk: the chunked layout's chunk, the contiguous layout's unit of runs.
    uint32_t chunk_tokens;
};

// Six u32 in 24 bytes leave no padding, and aggregate initialisation follows declaration order:
// together they fix every field's offset (NVRTC has no offsetof; the emulator build also checks
// the offsets with it).
static_assert(sizeof(KvLayout) == 24, "KvLayout must match src/kv/layout.rs: six u32 fields");
static_assert(KvLayout{0, 1, 2, 3, 4, 5}.kind == 0 && KvLayout{0, 1, 2, 3, 4, 5}.dtype == 1 &&
                  KvLayout{0, 1, 2, 3, 4, 5}.num_layers == 2 && KvLayout{0, 1, 2, 3, 4, 5}.num_kv_heads == 3 &&
                  KvLayout{0, 1, 2, 3, 4, 5}.head_dim == 4 && KvLayout{0, 1, 2, 3, 4, 5}.chunk_tokens == 5,
              "KvLayout fields must be in the order of src/kv/layout.rs");
#ifdef KVLAB_EMU
static_assert(offsetof(KvLayout, dtype) == 4 && offsetof(KvLayout, num_layers) == 8 &&
                  offsetof(KvLayout, num_kv_heads) == 12 && offsetof(KvLayout, head_dim) == 16 &&
                  offsetof(KvLayout, chunk_tokens) == 20,
              "KvLayout field offsets must be those of src/kv/layout.rs");
#endif

// One sequence's part of a step: the mirror of `kvlab::kv::SeqStep`.
struct KvSeqStep {
    uint32_t first_row;     // its first row among the step's rows (its rows are consecutive)
    uint32_t rows;          // its rows in this step
    uint32_t start;         // position of its first row: the positions cached before the step
    uint32_t table_start;   // its first entry in the step's block table
    uint32_t block_tokens;  // positions per block: chunk_tokens, or its run's capacity
};

static_assert(sizeof(KvSeqStep) == 20, "KvSeqStep must match src/kv/step.rs: five u32 fields");
static_assert(KvSeqStep{0, 1, 2, 3, 4}.first_row == 0 && KvSeqStep{0, 1, 2, 3, 4}.rows == 1 &&
                  KvSeqStep{0, 1, 2, 3, 4}.start == 2 && KvSeqStep{0, 1, 2, 3, 4}.table_start == 3 &&
                  KvSeqStep{0, 1, 2, 3, 4}.block_tokens == 4,
              "KvSeqStep fields must be in the order of src/kv/step.rs");
#ifdef KVLAB_EMU
static_assert(offsetof(KvSeqStep, rows) == 4 && offsetof(KvSeqStep, start) == 8 &&
                  offsetof(KvSeqStep, table_start) == 12 && offsetof(KvSeqStep, block_tokens) == 16,
              "KvSeqStep field offsets must be those of src/kv/step.rs");
#endif

// The packed step view, split into its parts.
struct KvStepView {
    const KvSeqStep* seqs;        // [num_seqs]
    const uint32_t* row_seq;      // [rows]: index of each row's sequence in seqs
    const uint32_t* row_pos;      // [rows]: each row's position in its sequence
    const uint32_t* block_table;  // the sequences' block tables, one after another (chunk ids)
};

// `packed`: [5 * num_seqs + 2 * rows + table entries] u32, as `StepView::packed` writes it.
__device__ __forceinline__ KvStepView kv_step_view(const uint32_t* packed, int num_seqs, int rows) {
    KvStepView view;
    view.seqs = reinterpret_cast<const KvSeqStep*>(packed);
    view.row_seq = packed + 5 * (uint64_t)num_seqs;
    view.row_pos = view.row_seq + rows;
    view.block_table = view.row_pos + rows;
    return view;
}

// Moves sequence `seq` of the packed view on by one position if it has one row: the view of the
// next decode step (`StepView::advance`). The chunks of its new position must be in its block
// table already (the host reserves a run's chunks before its first step).
__device__ __forceinline__ void kv_step_advance(uint32_t* packed, int num_seqs, int rows, int seq) {
    KvSeqStep* seqs = reinterpret_cast<KvSeqStep*>(packed);
    if (seqs[seq].rows == 1) {
        seqs[seq].start += 1;
        packed[5 * (uint64_t)num_seqs + rows + seqs[seq].first_row] += 1;
    }
}

// Bytes of one stored code (`KvDtype::code_bytes`).
__device__ __forceinline__ unsigned kv_code_bytes(const KvLayout& layout) {
    return layout.dtype == KV_DTYPE_F32 ? 4u : layout.dtype == KV_DTYPE_BF16 ? 2u : 1u;
}

// f32 scales a head_dim row of `part` carries (`KvDtype::scales_per_row`): none for f32 and
// bf16, one per KV_INT8_KEY_GROUP channels of an int8 key row, one for any other quantized row.
__device__ __forceinline__ unsigned kv_scales_per_row(const KvLayout& layout, unsigned part) {
    if (layout.dtype == KV_DTYPE_F32 || layout.dtype == KV_DTYPE_BF16) {
        return 0u;
    }
    return layout.dtype == KV_DTYPE_INT8 && part == KV_PART_KEY ? layout.head_dim / KV_INT8_KEY_GROUP : 1u;
}

// Bytes of one row's codes (`KvLayout::row_code_bytes`).
__device__ __forceinline__ uint64_t kv_row_code_bytes(const KvLayout& layout) {
    return (uint64_t)layout.head_dim * kv_code_bytes(layout);
}

// Bytes one position occupies across all layers, K and V: codes and scales
// (`KvLayout::bytes_per_token`).
__device__ __forceinline__ uint64_t kv_bytes_per_token(const KvLayout& layout) {
    const uint64_t scales = kv_scales_per_row(layout, KV_PART_KEY) + kv_scales_per_row(layout, KV_PART_VALUE);
    return (uint64_t)layout.num_layers * layout.num_kv_heads * (2u * kv_row_code_bytes(layout) + 4u * scales);
}

// Bytes of one chunk (`KvLayout::chunk_bytes`).
__device__ __forceinline__ uint64_t kv_chunk_bytes(const KvLayout& layout) {
    return (uint64_t)layout.chunk_tokens * kv_bytes_per_token(layout);
}

// Byte offset, inside a block of `block_tokens` positions, of the codes of the head_dim row of
// (layer, part, head, slot) (`KvLayout::code_offset_in_block`). 64-bit: a contiguous run of a
// long context holds more than 2^32 bytes.
__device__ __forceinline__ uint64_t kv_code_offset_in_block(const KvLayout& layout, unsigned layer, unsigned part,
                                                            unsigned head, unsigned slot, unsigned block_tokens) {
    const uint64_t row_block = ((uint64_t)layer * 2u + part) * layout.num_kv_heads + head;
    return (row_block * block_tokens + slot) * kv_row_code_bytes(layout);
}

// Byte offset, inside a block of `block_tokens` positions, of the f32 scales of the row of
// (layer, part, head, slot) (`KvLayout::scale_offset_in_block`; quantized types only): after all
// of the block's codes, per layer every head's key scales, then every head's value scales.
__device__ __forceinline__ uint64_t kv_scale_offset_in_block(const KvLayout& layout, unsigned layer, unsigned part,
                                                             unsigned head, unsigned slot, unsigned block_tokens) {
    const uint64_t key = kv_scales_per_row(layout, KV_PART_KEY);
    const uint64_t value = kv_scales_per_row(layout, KV_PART_VALUE);
    const uint64_t heads = layout.num_kv_heads;
    const uint64_t codes = (uint64_t)block_tokens * layout.num_layers * 2u * heads * kv_row_code_bytes(layout);
    const uint64_t in_layer = part == KV_PART_KEY
                                  ? ((uint64_t)head * block_tokens + slot) * key
                                  : heads * block_tokens * key + ((uint64_t)head * block_tokens + slot) * value;
    return codes + ((uint64_t)layer * heads * block_tokens * (key + value) + in_layer) * 4u;
}

// (chunk id in the arena, slot in its block) of position `pos` of `seq` (`StepView::locate`).
struct KvLocation {
    unsigned chunk;
    unsigned slot;
};

template <unsigned KIND>
__device__ __forceinline__ KvLocation kv_locate(const KvLayout& layout, const uint32_t* block_table,
                                                const KvSeqStep& seq, unsigned pos) {
    KvLocation location;
    if constexpr (KIND == KV_LAYOUT_CONTIGUOUS) {
        location.chunk = block_table[seq.table_start];
        location.slot = pos;
    } else {
        static_assert(KIND == KV_LAYOUT_CHUNKED, "a layout is contiguous or chunked");
        location.chunk = block_table[seq.table_start + pos / layout.chunk_tokens];
        location.slot = pos % layout.chunk_tokens;
    }
    return location;
}

// Byte offsets in the arena of the codes of the head_dim row of (layer, part, head) at position
// `pos` of `seq`, and of its scales (`StepView::row_offsets`; `scale` means nothing for f32 and
// bf16). KIND is the layout's kind (`layout.kind`), a template argument so that the position
// loops compile without a branch on it; `kv_row_offsets_any` dispatches.
struct KvRowOffsets {
    uint64_t codes;
    uint64_t scale;
};

template <unsigned KIND>
__device__ __forceinline__ KvRowOffsets kv_row_offsets(const KvLayout& layout, const uint32_t* block_table,
                                                       const KvSeqStep& seq, unsigned layer, unsigned part,
                                                       unsigned head, unsigned pos) {
    const KvLocation location = kv_locate<KIND>(layout, block_table, seq, pos);
    const uint64_t block = location.chunk * kv_chunk_bytes(layout);
    KvRowOffsets offsets;
    offsets.codes = block + kv_code_offset_in_block(layout, layer, part, head, location.slot, seq.block_tokens);
    offsets.scale = block + kv_scale_offset_in_block(layout, layer, part, head, location.slot, seq.block_tokens);
    return offsets;
}

__device__ __forceinline__ KvRowOffsets kv_row_offsets_any(const KvLayout& layout, const uint32_t* block_table,
                                                           const KvSeqStep& seq, unsigned layer, unsigned part,
                                                           unsigned head, unsigned pos) {
    return layout.kind == KV_LAYOUT_CHUNKED
               ? kv_row_offsets<KV_LAYOUT_CHUNKED>(layout, block_table, seq, layer, part, head, pos)
               : kv_row_offsets<KV_LAYOUT_CONTIGUOUS>(layout, block_table, seq, layer, part, head, pos);
}
