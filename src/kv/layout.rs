//! The geometry of KV memory that the CPU code and the kernels both read.

use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Serialize};

/// How a sequence's positions sit in the arena.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[repr(u32)]
pub enum LayoutKind {
    /// One run of consecutive chunks per sequence, reserved for its whole capacity; inside the
    /// run a (layer, K or V, head) block spans every position of the sequence.
    Contiguous = 0,
    /// Chunks of `chunk_tokens` positions taken on demand, listed in the sequence's block table.
    Chunked = 1,
}

/// Element type of K and V entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
#[repr(u32)]
pub enum KvDtype {
    F32 = 0,
    Bf16 = 1,
}

impl KvDtype {
    pub fn bytes(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::Bf16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::Bf16 => "bf16",
        }
    }
}

impl std::fmt::Display for KvDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Which of the pair a cache row belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvPart {
    Key = 0,
    Value = 1,
}

/// Geometry of one pool's arena, mirrored by `kernels/kv_layout.cuh` (same fields, same order,
/// same formulas) and passed to the kernels as one argument.
///
/// The arena is `[chunks][chunk_tokens][..]`-sized: chunk `c` starts at element
/// `c * chunk_elems()`. A *block* is the memory of one sequence's positions in one chunk (chunked
/// layout) or in its whole run (contiguous layout), ordered
/// `[num_layers][2 (K, V)][num_kv_heads][block_tokens][head_dim]`: for one layer and head the
/// block's positions are consecutive rows of `head_dim`, which is what attention streams. In the
/// chunked layout `block_tokens = chunk_tokens`; a contiguous run of `n` chunks is one block of
/// `n * chunk_tokens` positions, so its rows of one (layer, head) span the whole sequence.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, bytemuck::Pod, bytemuck::Zeroable)]
pub struct KvLayout {
    /// [`LayoutKind`] as its `u32` value.
    pub kind: u32,
    /// [`KvDtype`] as its `u32` value.
    pub dtype: u32,
    pub num_layers: u32,
    pub num_kv_heads: u32,
    pub head_dim: u32,
    /// Positions per chunk: the chunked layout's chunk, the contiguous layout's unit of runs.
    pub chunk_tokens: u32,
}

// kernels/kv_layout.cuh checks the same size and offsets of its mirror.
const _: () = {
    use std::mem::{offset_of, size_of};
    assert!(size_of::<KvLayout>() == 24);
    assert!(offset_of!(KvLayout, kind) == 0 && offset_of!(KvLayout, dtype) == 4);
    assert!(offset_of!(KvLayout, num_layers) == 8 && offset_of!(KvLayout, num_kv_heads) == 12);
    assert!(offset_of!(KvLayout, head_dim) == 16 && offset_of!(KvLayout, chunk_tokens) == 20);
};

impl KvLayout {
    pub fn new(
        kind: LayoutKind,
        dtype: KvDtype,
        num_layers: usize,
        num_kv_heads: usize,
        head_dim: usize,
        chunk_tokens: usize,
    ) -> Result<Self> {
        ensure!(
            num_layers > 0 && num_kv_heads > 0 && head_dim > 0,
            "a KV layout needs at least one layer, KV head and dimension ({num_layers} layers, \
             {num_kv_heads} KV heads, head_dim {head_dim})"
        );
        if chunk_tokens == 0 {
            bail!("--chunk-tokens must be at least 1");
        }
        let small = |value: usize, what: &str| {
            u32::try_from(value).map_err(|_| anyhow::anyhow!("{what} = {value} is too large"))
        };
        Ok(KvLayout {
            kind: kind as u32,
            dtype: dtype as u32,
            num_layers: small(num_layers, "num_layers")?,
            num_kv_heads: small(num_kv_heads, "num_kv_heads")?,
            head_dim: small(head_dim, "head_dim")?,
            chunk_tokens: small(chunk_tokens, "chunk_tokens")?,
        })
    }

    pub fn kind(&self) -> LayoutKind {
        if self.kind == LayoutKind::Chunked as u32 {
            LayoutKind::Chunked
        } else {
            LayoutKind::Contiguous
        }
    }

    pub fn dtype(&self) -> KvDtype {
        if self.dtype == KvDtype::Bf16 as u32 {
            KvDtype::Bf16
        } else {
            KvDtype::F32
        }
    }

    pub fn chunk_tokens(&self) -> usize {
        self.chunk_tokens as usize
    }

    /// Elements that one position occupies across all layers, K and V.
    pub fn elems_per_token(&self) -> usize {
        self.num_layers as usize * 2 * self.num_kv_heads as usize * self.head_dim as usize
    }

    pub fn bytes_per_token(&self) -> usize {
        self.elems_per_token() * self.dtype().bytes()
    }

    /// Elements in one chunk.
    pub fn chunk_elems(&self) -> usize {
        self.chunk_tokens() * self.elems_per_token()
    }

    pub fn chunk_bytes(&self) -> usize {
        self.chunk_elems() * self.dtype().bytes()
    }

    /// Element offset, inside a block of `block_tokens` positions, of the `head_dim` row of
    /// (layer, part, head, slot).
    pub fn offset_in_block(
        &self,
        layer: usize,
        part: KvPart,
        head: usize,
        slot: usize,
        block_tokens: usize,
    ) -> usize {
        let row_block = layer * 2 + part as usize;
        ((row_block * self.num_kv_heads as usize + head) * block_tokens + slot)
            * self.head_dim as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_tile_a_block_exactly_once() {
        for kind in [LayoutKind::Contiguous, LayoutKind::Chunked] {
            let layout = KvLayout::new(kind, KvDtype::Bf16, 3, 2, 4, 5).unwrap();
            assert_eq!(layout.kind(), kind);
            assert_eq!(layout.dtype(), KvDtype::Bf16);
            // A chunk is one block of chunk_tokens; a run of 3 chunks one block of 15.
            for block_tokens in [5, 15] {
                let mut seen = vec![false; layout.elems_per_token() * block_tokens];
                for layer in 0..3 {
                    for part in [KvPart::Key, KvPart::Value] {
                        for head in 0..2 {
                            for slot in 0..block_tokens {
                                let off =
                                    layout.offset_in_block(layer, part, head, slot, block_tokens);
                                for d in 0..4 {
                                    assert!(!seen[off + d], "element {} written twice", off + d);
                                    seen[off + d] = true;
                                }
                            }
                        }
                    }
                }
                assert!(seen.iter().all(|&s| s));
            }
        }
        let layout = KvLayout::new(LayoutKind::Chunked, KvDtype::F32, 3, 2, 4, 5).unwrap();
        assert_eq!(layout.elems_per_token() * 5, layout.chunk_elems());
        assert_eq!(layout.chunk_bytes(), 3 * 2 * 2 * 4 * 5 * 4);
        assert!(KvLayout::new(LayoutKind::Chunked, KvDtype::F32, 3, 2, 4, 0).is_err());
    }
}
