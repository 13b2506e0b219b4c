//! KV cache layouts and their accounting.
//!
//! Both layouts are described by one [`KvLayout`]: memory is a list of chunks, each chunk holds
//! `chunk_tokens` consecutive positions of every layer's K and V. The **static** cache is one
//! chunk as large as its capacity (one contiguous preallocated buffer); the **dynamic** cache
//! takes fixed-size chunks on demand and never moves them, so a chunk table maps a position to
//! its chunk (the paged layout of vLLM). `kernels/kv_layout.cuh` mirrors this type for the
//! CUDA kernels, so the CPU code and the kernels compute the same offsets.

mod cache;
pub mod map;
pub use cache::{CacheOptions, KvCache, KvStats};

use serde::{Deserialize, Serialize};

/// What the forward pass keeps between tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// No cache: every new token reruns the forward pass over the whole sequence.
    None,
    /// One contiguous buffer preallocated to a maximum context.
    Static,
    /// Fixed-size chunks allocated on demand, found through a chunk table.
    Dynamic,
}

impl Strategy {
    pub const ALL: [Strategy; 3] = [Strategy::None, Strategy::Dynamic, Strategy::Static];

    pub fn name(self) -> &'static str {
        match self {
            Strategy::None => "none",
            Strategy::Static => "static",
            Strategy::Dynamic => "dynamic",
        }
    }
}

impl std::fmt::Display for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Strategy {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s.trim() {
            "none" => Ok(Strategy::None),
            "static" => Ok(Strategy::Static),
            "dynamic" => Ok(Strategy::Dynamic),
            other => {
                anyhow::bail!("unknown cache strategy {other:?} (expected none, static or dynamic)")
            }
        }
    }
}

/// Geometry of KV memory, shared by CPU code and kernels (mirrored in `kernels/kv_layout.cuh`).
///
/// A chunk is `[num_layers][2 (K, V)][num_kv_heads][chunk_tokens][head_dim]` elements: for one
/// layer and head, a chunk's positions are contiguous rows of `head_dim`, which is what decode
/// attention streams.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct KvLayout {
    pub num_layers: u32,
    pub num_kv_heads: u32,
    pub head_dim: u32,
    /// Positions per chunk. Static cache: its whole capacity.
    pub chunk_tokens: u32,
}

/// Which of the pair a cache row belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvPart {
    Key = 0,
    Value = 1,
}

impl KvLayout {
    /// Elements in one chunk.
    pub fn chunk_elems(&self) -> usize {
        self.num_layers as usize * 2 * self.kv_block_elems()
    }

    /// Elements of one (layer, K or V) block inside a chunk: `[num_kv_heads][chunk_tokens][head_dim]`.
    pub fn kv_block_elems(&self) -> usize {
        self.num_kv_heads as usize * self.chunk_tokens as usize * self.head_dim as usize
    }

    /// Element offset, inside its chunk, of the `head_dim` row of (layer, part, head, slot).
    pub fn offset_in_chunk(&self, layer: usize, part: KvPart, head: usize, slot: usize) -> usize {
        let block = layer * 2 + part as usize;
        ((block * self.num_kv_heads as usize + head) * self.chunk_tokens as usize + slot)
            * self.head_dim as usize
    }

    /// (chunk index in the table, slot inside the chunk) of sequence position `pos`.
    pub fn locate(&self, pos: usize) -> (usize, usize) {
        (
            pos / self.chunk_tokens as usize,
            pos % self.chunk_tokens as usize,
        )
    }

    /// Elements that one position occupies across all layers, K and V.
    pub fn elems_per_token(&self) -> usize {
        self.num_layers as usize * 2 * self.num_kv_heads as usize * self.head_dim as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_tile_a_chunk_exactly_once() {
        let layout = KvLayout {
            num_layers: 3,
            num_kv_heads: 2,
            head_dim: 4,
            chunk_tokens: 5,
        };
        let mut seen = vec![false; layout.chunk_elems()];
        for layer in 0..3 {
            for part in [KvPart::Key, KvPart::Value] {
                for head in 0..2 {
                    for slot in 0..5 {
                        let off = layout.offset_in_chunk(layer, part, head, slot);
                        for d in 0..4 {
                            assert!(!seen[off + d], "element {} written twice", off + d);
                            seen[off + d] = true;
                        }
                    }
                }
            }
        }
        assert!(seen.iter().all(|&s| s));
        assert_eq!(layout.locate(12), (2, 2));
        assert_eq!(layout.elems_per_token() * 5, layout.chunk_elems());
    }
}
