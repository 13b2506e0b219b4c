//! Where a sequence's bytes sit: per block (a chunk of the chunked layout, the whole run of the
//! contiguous one) and per (layer, K/V, head) row block inside it, reserved against written.
//! Computed from the layout and the pool's bookkeeping alone, so drawing a cache allocates no
//! KV memory; offsets come from [`KvLayout::code_offset_in_block`] and
//! [`KvLayout::scale_offset_in_block`] and totals from the pool's own accounting, so this view
//! cannot drift from what the pool does.

use super::{ChunkPool, KvLayout, KvPart, LayoutKind, PoolStats, SeqId, SeqStats, Strategy};
use anyhow::Result;

/// A sequence's memory, as laid out after its last step.
#[derive(Clone, Debug, PartialEq)]
pub struct CacheMap {
    pub strategy: Strategy,
    pub layout: KvLayout,
    /// Positions per block: the chunk (chunked) or the run's capacity (contiguous).
    pub block_tokens: usize,
    /// Positions the sequence can hold: its run, or every chunk of the pool.
    pub capacity: usize,
    pub seq: SeqStats,
    pub pool: PoolStats,
    blocks: Vec<ChunkUse>,
}

/// One block of the sequence (one chunk, or its contiguous run) and how many of its slots hold
/// positions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkUse {
    /// Index in the block table.
    pub index: usize,
    /// First chunk id in the arena.
    pub chunk: u32,
    /// Sequence position of slot 0.
    pub first_position: usize,
    pub written_slots: usize,
    /// Sequences holding it.
    pub holders: usize,
}

/// The `[block_tokens, head_dim]` codes of one (layer, K or V, head) inside a block, or (the
/// quantized types) their `[block_tokens]` f32 scales.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockUse {
    pub layer: usize,
    pub part: KvPart,
    pub head: usize,
    /// The row block's scales rather than its codes.
    pub scales: bool,
    /// Byte offset of slot 0 inside the block.
    pub offset_bytes: u64,
    pub reserved_bytes: u64,
    /// Bytes of the written slots, which come first; the rest of the block is its unwritten tail.
    pub written_bytes: u64,
}

/// One layer's share of the sequence (codes and scales), summed over its blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerUse {
    pub layer: usize,
    /// Byte offsets, inside each block, of the codes of the layer's first K row and first V row.
    pub key_offset_bytes: u64,
    pub value_offset_bytes: u64,
    pub reserved_bytes: u64,
    pub written_bytes: u64,
}

impl CacheMap {
    pub fn of(pool: &ChunkPool, id: SeqId, strategy: Strategy) -> Result<CacheMap> {
        let layout = *pool.layout();
        let len = pool.seq_len(id)?;
        let table = pool.seq_table(id)?;
        let (block_tokens, capacity, blocks) = match layout.kind() {
            LayoutKind::Contiguous => {
                let capacity = pool.seq_capacity(id)?.unwrap_or(0);
                let block = ChunkUse {
                    index: 0,
                    chunk: table[0],
                    first_position: 0,
                    written_slots: len,
                    holders: pool.chunk_refs(table[0]),
                };
                (capacity, capacity, vec![block])
            }
            LayoutKind::Chunked => {
                let ct = layout.chunk_tokens();
                let blocks = table
                    .iter()
                    .enumerate()
                    .map(|(index, &chunk)| ChunkUse {
                        index,
                        chunk,
                        first_position: index * ct,
                        written_slots: len.saturating_sub(index * ct).min(ct),
                        holders: pool.chunk_refs(chunk),
                    })
                    .collect();
                (ct, pool.num_chunks() * ct, blocks)
            }
        };
        Ok(CacheMap {
            strategy,
            layout,
            block_tokens,
            capacity,
            seq: pool.seq_stats(id)?,
            pool: pool.stats(),
            blocks,
        })
    }

    /// Bytes of one block.
    pub fn block_bytes(&self) -> u64 {
        (self.block_tokens * self.layout.bytes_per_token()) as u64
    }

    /// Reserved bytes that hold no position.
    pub fn unwritten_bytes(&self) -> u64 {
        self.seq.reserved_bytes - self.seq.live_bytes
    }

    /// Every block of the sequence, in table order.
    pub fn chunks(&self) -> &[ChunkUse] {
        &self.blocks
    }

    /// The row blocks of one block (codes, then the quantized types' scales), in memory order.
    pub fn blocks(&self, chunk: &ChunkUse) -> Vec<BlockUse> {
        let layout = &self.layout;
        let (dtype, hd) = (layout.dtype(), layout.head_dim());
        let mut blocks = Vec::new();
        for layer in 0..layout.num_layers as usize {
            for part in [KvPart::Key, KvPart::Value] {
                let scale_bytes = 4 * dtype.scales_per_row(part, hd) as u64;
                for head in 0..layout.num_kv_heads as usize {
                    let bt = self.block_tokens;
                    let mut row_block = |scales: bool, offset: usize, row_bytes: u64| {
                        blocks.push(BlockUse {
                            layer,
                            part,
                            head,
                            scales,
                            offset_bytes: offset as u64,
                            reserved_bytes: bt as u64 * row_bytes,
                            written_bytes: chunk.written_slots as u64 * row_bytes,
                        })
                    };
                    let codes = layout.code_offset_in_block(layer, part, head, 0, bt);
                    row_block(false, codes, layout.row_code_bytes() as u64);
                    if scale_bytes > 0 {
                        let scales = layout.scale_offset_in_block(layer, part, head, 0, bt);
                        row_block(true, scales, scale_bytes);
                    }
                }
            }
        }
        blocks.sort_by_key(|b| b.offset_bytes);
        blocks
    }

    /// Per layer, summed over every block.
    pub fn layers(&self) -> Vec<LayerUse> {
        let layout = &self.layout;
        let pair_bytes = layout.dtype().row_pair_bytes(layout.head_dim()) as u64;
        let heads = layout.num_kv_heads as u64;
        let written: u64 = self.blocks.iter().map(|c| c.written_slots as u64).sum();
        (0..layout.num_layers as usize)
            .map(|layer| {
                let offset =
                    |part| layout.code_offset_in_block(layer, part, 0, 0, self.block_tokens) as u64;
                LayerUse {
                    layer,
                    key_offset_bytes: offset(KvPart::Key),
                    value_offset_bytes: offset(KvPart::Value),
                    reserved_bytes: heads
                        * self.blocks.len() as u64
                        * self.block_tokens as u64
                        * pair_bytes,
                    written_bytes: heads * written * pair_bytes,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::KvDtype;

    /// A sequence of `tokens` written the way generation writes them: a prompt, then single
    /// tokens.
    fn filled(kind: LayoutKind, chunk_tokens: usize, capacity: usize, tokens: usize) -> CacheMap {
        filled_as(KvDtype::F32, kind, chunk_tokens, capacity, tokens)
    }

    fn filled_as(
        dtype: KvDtype,
        kind: LayoutKind,
        chunk_tokens: usize,
        capacity: usize,
        tokens: usize,
    ) -> CacheMap {
        // f32: 3 layers x K,V x 2 heads x 16 dims x 4 bytes = 768 bytes per position.
        let layout = KvLayout::new(kind, dtype, 3, 2, 16, chunk_tokens).unwrap();
        let mut pool = ChunkPool::new(layout, 64, false).unwrap();
        let id = pool.new_sequence(Some(capacity)).unwrap();
        let prompt = tokens.min(7);
        for rows in std::iter::once(prompt).chain(std::iter::repeat_n(1, tokens - prompt)) {
            pool.reserve(id, rows).unwrap();
            pool.commit(id, &vec![0; rows]).unwrap();
        }
        let strategy = match kind {
            LayoutKind::Contiguous => Strategy::Static,
            LayoutKind::Chunked => Strategy::Dynamic,
        };
        CacheMap::of(&pool, id, strategy).unwrap()
    }

    #[test]
    fn layers_and_blocks_add_up_to_the_pool_accounting() {
        let cases = KvDtype::ALL.into_iter().flat_map(|dtype| {
            [(LayoutKind::Contiguous, 1), (LayoutKind::Chunked, 5)]
                .map(|(kind, chunk)| (dtype, kind, chunk))
        });
        for (dtype, kind, chunk_tokens) in cases {
            for tokens in [1, 5, 6, 23] {
                let map = filled_as(dtype, kind, chunk_tokens, 40, tokens);
                let blocks = map.blocks(&map.chunks()[0]);
                let scale_blocks = blocks.iter().filter(|b| b.scales).count();
                assert_eq!(scale_blocks, if dtype.is_quantized() { 12 } else { 0 });
                let layers = map.layers();
                let reserved: u64 = layers.iter().map(|l| l.reserved_bytes).sum();
                let written: u64 = layers.iter().map(|l| l.written_bytes).sum();
                assert_eq!(reserved, map.seq.reserved_bytes, "{kind:?} {tokens}");
                assert_eq!(written, map.seq.live_bytes, "{kind:?} {tokens}");
                assert_eq!(map.pool.reserved_bytes, map.seq.reserved_bytes);
                let chunks = map.chunks();
                assert_eq!(
                    chunks.iter().map(|c| c.written_slots).sum::<usize>(),
                    tokens
                );
                for chunk in chunks {
                    // The row blocks tile the block: each starts where the previous one ends.
                    let mut end = 0;
                    for b in map.blocks(chunk) {
                        assert_eq!(b.offset_bytes, end);
                        end += b.reserved_bytes;
                    }
                    assert_eq!(end, map.block_bytes());
                }
            }
        }
        let dynamic = filled(LayoutKind::Chunked, 5, 0, 23);
        assert_eq!(dynamic.pool.allocations, 5);
        assert_eq!(dynamic.chunks()[4].written_slots, 3);
        let stat = filled(LayoutKind::Contiguous, 1, 40, 23);
        assert_eq!(stat.unwritten_bytes(), (40 - 23) * 768);
        assert_eq!(stat.chunks().len(), 1);
        // int8: a quarter of f32's bytes plus an f32 scale per row (12 rows a position; a key
        // row of 16 channels is one group).
        let int8 = filled_as(KvDtype::Int8, LayoutKind::Contiguous, 1, 40, 23);
        assert_eq!(
            int8.seq.reserved_bytes,
            stat.seq.reserved_bytes / 4 + 40 * 12 * 4
        );
        // Layer 1's V rows follow layer 0's K and V and layer 1's K: 3 row blocks of 2 heads.
        assert_eq!(
            stat.layers()[1].value_offset_bytes,
            (3 * 2 * 40 * 16 * 4) as u64
        );
    }
}
