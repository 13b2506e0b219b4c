// The C mirror of `kvlab::kv::KvLayout` (src/kv/mod.rs): the geometry of KV memory that the
// CPU code and the kernels both read, so the contiguous and the chunked layout differ in one
// place only. THE TWO MUST CHANGE TOGETHER: same fields in the same order, same formulas for
// `offset_in_chunk` and `locate`; the static_assert below and a Rust test on
// `size_of::<KvLayout>()` catch a field added on one side only.
//
// A chunk is `[num_layers][2 (K, V)][num_kv_heads][chunk_tokens][head_dim]` bf16: for one layer
// and head, a chunk's positions are contiguous rows of `head_dim`. The static cache is one chunk
// as large as its capacity; the dynamic cache finds position `pos` in chunk `pos / chunk_tokens`
// of its chunk table (an array of chunk base addresses in device memory).
#pragma once

#include "common.cuh"

struct KvLayout {
    uint32_t num_layers;
    uint32_t num_kv_heads;
    uint32_t head_dim;
    // Positions per chunk. Static cache: its whole capacity.
    uint32_t chunk_tokens;
};

static_assert(sizeof(KvLayout) == 16, "KvLayout must match src/kv/mod.rs: four u32 fields");

#define KV_PART_KEY 0u
#define KV_PART_VALUE 1u

// Kernels receive the four fields as scalar arguments (kernel arguments are pointers and
// scalars only) and rebuild the struct with this.
__device__ __forceinline__ KvLayout make_kv_layout(unsigned num_layers, unsigned num_kv_heads, unsigned head_dim,
                                                   unsigned chunk_tokens) {
    KvLayout layout;
    layout.num_layers = num_layers;
    layout.num_kv_heads = num_kv_heads;
    layout.head_dim = head_dim;
    layout.chunk_tokens = chunk_tokens;
    return layout;
}

// Element offset, inside its chunk, of the head_dim row of (layer, part, head, slot). 64-bit: a
// static chunk of a long context holds more than 2^32 elements.
__device__ __forceinline__ uint64_t kv_offset_in_chunk(const KvLayout& layout, unsigned layer, unsigned part,
                                                       unsigned head, unsigned slot) {
    const uint64_t block = (uint64_t)layer * 2u + part;
    return ((block * layout.num_kv_heads + head) * layout.chunk_tokens + slot) * layout.head_dim;
}

// (chunk index in the table, slot inside the chunk) of sequence position `pos`.
struct KvLocation {
    unsigned chunk;
    unsigned slot;
};

__device__ __forceinline__ KvLocation kv_locate(const KvLayout& layout, unsigned pos) {
    KvLocation location;
    location.chunk = pos / layout.chunk_tokens;
    location.slot = pos % layout.chunk_tokens;
    return location;
}

// Address of the head_dim row of (layer, part, head) at sequence position `pos`, through the
// chunk table `[chunks]` of chunk base addresses.
__device__ __forceinline__ bf16* kv_row_address(const unsigned long long* chunk_table, const KvLayout& layout,
                                                unsigned layer, unsigned part, unsigned head, unsigned pos) {
    const KvLocation location = kv_locate(layout, pos);
    bf16* chunk = reinterpret_cast<bf16*>(chunk_table[location.chunk]);
    return chunk + kv_offset_in_chunk(layout, layer, part, head, location.slot);
}
