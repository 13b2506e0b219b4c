//! Where a cache's bytes sit: per chunk and per (layer, K/V, head) block, reserved against
//! written. Offsets come from [`KvLayout::offset_in_chunk`] and totals from the cache's own
//! [`KvStats`], so this view cannot drift from what the cache does.

use super::{KvCache, KvLayout, KvPart, KvStats, Strategy};
use crate::backend::Backend;

/// A cache's memory, as laid out after its last step.
#[derive(Clone, Debug, PartialEq)]
pub struct CacheMap {
    pub strategy: Strategy,
    pub layout: KvLayout,
    /// Bytes of one K or V element on the cache's backend.
    pub elem_bytes: usize,
    /// Positions the cache can hold.
    pub capacity: usize,
    pub stats: KvStats,
}

/// One chunk (one allocation) and how many of its slots hold positions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkUse {
    /// Index in the chunk table.
    pub index: usize,
    /// Sequence position of slot 0.
    pub first_position: usize,
    pub written_slots: usize,
}

/// The `[chunk_tokens, head_dim]` rows of one (layer, K or V, head) inside a chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockUse {
    pub layer: usize,
    pub part: KvPart,
    pub head: usize,
    /// Byte offset of slot 0 inside the chunk.
    pub offset_bytes: u64,
    pub reserved_bytes: u64,
    /// Bytes of the written slots, which come first; the rest of the block is its unwritten tail.
    pub written_bytes: u64,
}

/// One layer's share of the cache, summed over its blocks in every chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerUse {
    pub layer: usize,
    /// Byte offsets, inside each chunk, of the layer's first K row and first V row.
    pub key_offset_bytes: u64,
    pub value_offset_bytes: u64,
    pub reserved_bytes: u64,
    pub written_bytes: u64,
}

impl CacheMap {
    pub fn of<B: Backend>(cache: &KvCache<B>) -> CacheMap {
        let layout = cache.layout;
        CacheMap {
            strategy: cache.strategy,
            layout,
            elem_bytes: cache.chunk_bytes() as usize / layout.chunk_elems(),
            capacity: cache.capacity(),
            stats: cache.stats(),
        }
    }

    pub fn chunk_bytes(&self) -> u64 {
        (self.layout.chunk_elems() * self.elem_bytes) as u64
    }

    /// Reserved bytes that hold no position.
    pub fn unwritten_bytes(&self) -> u64 {
        self.stats.reserved_bytes - self.stats.live_bytes
    }

    /// Every chunk the cache holds, in table order.
    pub fn chunks(&self) -> Vec<ChunkUse> {
        let chunk_tokens = self.layout.chunk_tokens as usize;
        let (last_chunk, slots_in_last) = self.layout.locate(self.stats.tokens as usize);
        (0..self.stats.chunks as usize)
            .map(|index| ChunkUse {
                index,
                first_position: index * chunk_tokens,
                written_slots: match index.cmp(&last_chunk) {
                    std::cmp::Ordering::Less => chunk_tokens,
                    std::cmp::Ordering::Equal => slots_in_last,
                    std::cmp::Ordering::Greater => 0,
                },
            })
            .collect()
    }

    /// The blocks of one chunk, in memory order.
    pub fn blocks(&self, chunk: &ChunkUse) -> Vec<BlockUse> {
        let layout = &self.layout;
        let row_bytes = (layout.head_dim as usize * self.elem_bytes) as u64;
        let mut blocks = Vec::new();
        for layer in 0..layout.num_layers as usize {
            for part in [KvPart::Key, KvPart::Value] {
                for head in 0..layout.num_kv_heads as usize {
                    let offset = layout.offset_in_chunk(layer, part, head, 0);
                    blocks.push(BlockUse {
                        layer,
                        part,
                        head,
                        offset_bytes: (offset * self.elem_bytes) as u64,
                        reserved_bytes: layout.chunk_tokens as u64 * row_bytes,
                        written_bytes: chunk.written_slots as u64 * row_bytes,
                    });
                }
            }
        }
        blocks.sort_by_key(|b| b.offset_bytes);
        blocks
    }

    /// Per layer, summed over every chunk.
    pub fn layers(&self) -> Vec<LayerUse> {
        let chunks = self.chunks();
        (0..self.layout.num_layers as usize)
            .map(|layer| {
                let offset = |part| {
                    (self.layout.offset_in_chunk(layer, part, 0, 0) * self.elem_bytes) as u64
                };
                let mut use_ = LayerUse {
                    layer,
                    key_offset_bytes: offset(KvPart::Key),
                    value_offset_bytes: offset(KvPart::Value),
                    reserved_bytes: 0,
                    written_bytes: 0,
                };
                for chunk in &chunks {
                    for block in self.blocks(chunk).iter().filter(|b| b.layer == layer) {
                        use_.reserved_bytes += block.reserved_bytes;
                        use_.written_bytes += block.written_bytes;
                    }
                }
                use_
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::kv::CacheOptions;
    use crate::model::config::Config;

    fn config() -> Config {
        let hf = serde_json::from_value(serde_json::json!({
            "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 3,
            "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 8,
            "vocab_size": 50, "rms_norm_eps": 1e-5, "max_position_embeddings": 1000,
            "rope_theta": 10000.0
        }))
        .unwrap();
        Config::from_hf(&hf).unwrap()
    }

    fn filled(strategy: Strategy, tokens: usize, opts: CacheOptions) -> CacheMap {
        let backend = CpuBackend::new();
        let mut cache = KvCache::new(&backend, strategy, &config(), opts).unwrap();
        // A prompt, then single tokens, the way generation fills a cache.
        let prompt = tokens.min(7);
        for rows in std::iter::once(prompt).chain(std::iter::repeat_n(1, tokens - prompt)) {
            cache.begin_step(&backend, rows).unwrap();
            cache.end_step();
        }
        CacheMap::of(&cache)
    }

    #[test]
    fn layers_and_chunks_add_up_to_the_cache_accounting() {
        for (strategy, opts) in [
            (
                Strategy::Static,
                CacheOptions {
                    max_context: 40,
                    chunk_tokens: 0,
                },
            ),
            (
                Strategy::Dynamic,
                CacheOptions {
                    max_context: 0,
                    chunk_tokens: 5,
                },
            ),
        ] {
            for tokens in [1, 5, 6, 23] {
                let map = filled(strategy, tokens, opts);
                let layers = map.layers();
                let reserved: u64 = layers.iter().map(|l| l.reserved_bytes).sum();
                let written: u64 = layers.iter().map(|l| l.written_bytes).sum();
                assert_eq!(reserved, map.stats.reserved_bytes, "{strategy} {tokens}");
                assert_eq!(written, map.stats.live_bytes, "{strategy} {tokens}");
                let chunks = map.chunks();
                assert_eq!(
                    chunks.iter().map(|c| c.written_slots).sum::<usize>(),
                    tokens
                );
                for chunk in &chunks {
                    let blocks = map.blocks(chunk);
                    // The blocks tile the chunk: each starts where the previous one ends.
                    let mut end = 0;
                    for b in &blocks {
                        assert_eq!(b.offset_bytes, end);
                        end += b.reserved_bytes;
                    }
                    assert_eq!(end, map.chunk_bytes());
                }
            }
        }
        let dynamic = filled(
            Strategy::Dynamic,
            23,
            CacheOptions {
                max_context: 0,
                chunk_tokens: 5,
            },
        );
        assert_eq!(dynamic.stats.allocations, 5);
        assert_eq!(dynamic.chunks()[4].written_slots, 3);
        let stat = filled(
            Strategy::Static,
            23,
            CacheOptions {
                max_context: 40,
                chunk_tokens: 0,
            },
        );
        // 3 layers x K,V x 2 heads x 8 dims x 4 bytes = 384 bytes per position.
        assert_eq!(stat.unwritten_bytes(), (40 - 23) * 384);
        assert_eq!(
            stat.layers()[1].value_offset_bytes,
            (3 * 2 * 40 * 8 * 4) as u64
        );
    }
}
