//! The geometry of KV memory that the CPU code and the kernels both read.

use super::quant::INT8_KEY_GROUP;
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

/// Element type of K and V entries. The quantized types store a code per element and f32
/// scales per `head_dim` row (one token, one layer, K or V, one KV head): see [`super::quant`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[repr(u32)]
pub enum KvDtype {
    #[serde(rename = "f32")]
    F32 = 0,
    #[serde(rename = "bf16")]
    Bf16 = 1,
    /// Symmetric int8 codes: keys with a scale per 16 channels, values one per row.
    #[serde(rename = "int8")]
    Int8 = 2,
    /// OCP fp8 E4M3FN codes, a scale per row (max|row| / 448).
    #[serde(rename = "fp8-e4m3")]
    #[value(name = "fp8-e4m3")]
    Fp8E4m3 = 3,
}

impl KvDtype {
    pub const ALL: [KvDtype; 4] = [KvDtype::F32, KvDtype::Bf16, KvDtype::Int8, KvDtype::Fp8E4m3];

    /// Bytes of one stored code.
    pub fn code_bytes(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::Bf16 => 2,
            KvDtype::Int8 | KvDtype::Fp8E4m3 => 1,
        }
    }

    pub fn is_quantized(self) -> bool {
        matches!(self, KvDtype::Int8 | KvDtype::Fp8E4m3)
    }

    /// f32 scales a `head_dim` row of `part` carries (0: the codes are the values). A value row
    /// carries at most one.
    pub fn scales_per_row(self, part: KvPart, head_dim: usize) -> usize {
        match (self, part) {
            (KvDtype::F32 | KvDtype::Bf16, _) => 0,
            (KvDtype::Int8, KvPart::Key) => head_dim / INT8_KEY_GROUP,
            (KvDtype::Int8, KvPart::Value) | (KvDtype::Fp8E4m3, _) => 1,
        }
    }

    /// Bytes of one `head_dim` row of `part`: its codes and its scales.
    pub fn row_bytes(self, part: KvPart, head_dim: usize) -> usize {
        head_dim * self.code_bytes() + 4 * self.scales_per_row(part, head_dim)
    }

    /// Bytes of a K row and a V row of one head: what one position takes per layer and head.
    pub fn row_pair_bytes(self, head_dim: usize) -> usize {
        self.row_bytes(KvPart::Key, head_dim) + self.row_bytes(KvPart::Value, head_dim)
    }

    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::Bf16 => "bf16",
            KvDtype::Int8 => "int8",
            KvDtype::Fp8E4m3 => "fp8-e4m3",
        }
    }
}

impl std::fmt::Display for KvDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for KvDtype {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        KvDtype::ALL
            .into_iter()
            .find(|d| d.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = KvDtype::ALL.iter().map(|d| d.name()).collect();
                anyhow::anyhow!("unknown KV dtype {s:?} (expected {})", names.join(", "))
            })
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
/// The arena is `chunks × chunk_bytes()` bytes: chunk `c` starts at byte `c * chunk_bytes()`. A
/// *block* is the memory of one sequence's slots in one chunk (chunked layout) or in its whole
/// run (contiguous layout): first the codes, ordered
/// `[num_layers][2 (K, V)][num_kv_heads][block_tokens][head_dim]`, so that for one layer and head
/// the block's slots are consecutive rows of `head_dim`, which is what attention streams; then,
/// for the quantized types, the rows' f32 scales in the same order
/// (`[num_layers][2][num_kv_heads][block_tokens][scales per row]`). In the chunked layout
/// `block_tokens = chunk_tokens`; a contiguous run of `n` chunks is one block of
/// `n * chunk_tokens` slots, so its rows of one (layer, head) span the whole sequence. Either way
/// a block of `t` slots is exactly `t * bytes_per_token()` bytes.
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
        // The scales follow the codes; rows of a multiple of 4 bytes keep them aligned for f32
        // loads, and an int8 key row is whole groups.
        let multiple = match dtype {
            KvDtype::Int8 => INT8_KEY_GROUP,
            _ => 4,
        };
        if dtype.is_quantized() && !head_dim.is_multiple_of(multiple) {
            bail!(
                "--kv-dtype {dtype} keeps f32 scales beside rows of head_dim codes (int8 keys: \
                 one per {INT8_KEY_GROUP} channels), which needs head_dim to be a multiple of \
                 {multiple} (this model's is {head_dim})"
            );
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
        KvDtype::ALL
            .into_iter()
            .find(|d| *d as u32 == self.dtype)
            .unwrap_or(KvDtype::F32)
    }

    pub fn chunk_tokens(&self) -> usize {
        self.chunk_tokens as usize
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim as usize
    }

    /// `head_dim` rows that one position occupies: one per layer, K and V, and KV head.
    pub fn rows_per_token(&self) -> usize {
        self.num_layers as usize * 2 * self.num_kv_heads as usize
    }

    /// Bytes of one row's codes.
    pub fn row_code_bytes(&self) -> usize {
        self.head_dim() * self.dtype().code_bytes()
    }

    /// Bytes one position occupies across all layers, K and V: codes and scales.
    pub fn bytes_per_token(&self) -> usize {
        self.num_layers as usize
            * self.num_kv_heads as usize
            * self.dtype().row_pair_bytes(self.head_dim())
    }

    pub fn chunk_bytes(&self) -> usize {
        self.chunk_tokens() * self.bytes_per_token()
    }

    /// Index of the (layer, part, head) rows among a block's `[layer][K, V][head]` row blocks.
    fn row_block(&self, layer: usize, part: KvPart, head: usize) -> usize {
        (layer * 2 + part as usize) * self.num_kv_heads as usize + head
    }

    /// Byte offset, inside a block of `block_tokens` slots, of the codes of the `head_dim` row
    /// of (layer, part, head, slot).
    pub fn code_offset_in_block(
        &self,
        layer: usize,
        part: KvPart,
        head: usize,
        slot: usize,
        block_tokens: usize,
    ) -> usize {
        (self.row_block(layer, part, head) * block_tokens + slot) * self.row_code_bytes()
    }

    /// Byte offset, inside a block of `block_tokens` slots, of the f32 scales of the row of
    /// (layer, part, head, slot) (quantized types: [`KvDtype::scales_per_row`] of them).
    pub fn scale_offset_in_block(
        &self,
        layer: usize,
        part: KvPart,
        head: usize,
        slot: usize,
        block_tokens: usize,
    ) -> usize {
        let (dtype, hd, heads) = (self.dtype(), self.head_dim(), self.num_kv_heads as usize);
        let (key, value) = (
            dtype.scales_per_row(KvPart::Key, hd),
            dtype.scales_per_row(KvPart::Value, hd),
        );
        let codes = block_tokens * self.rows_per_token() * self.row_code_bytes();
        // Per layer: every head's key scales, then every head's value scales.
        let in_layer = match part {
            KvPart::Key => (head * block_tokens + slot) * key,
            KvPart::Value => heads * block_tokens * key + (head * block_tokens + slot) * value,
        };
        codes + (layer * heads * block_tokens * (key + value) + in_layer) * 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_scales_tile_a_block_exactly_once() {
        for dtype in KvDtype::ALL {
            for kind in [LayoutKind::Contiguous, LayoutKind::Chunked] {
                let code = dtype.code_bytes();
                // Rows of 32 channels: an int8 key row carries 2 scales, a value row 1.
                let layout = KvLayout::new(kind, dtype, 3, 2, 32, 5).unwrap();
                assert_eq!((layout.kind(), layout.dtype()), (kind, dtype));
                // A chunk is one block of chunk_tokens; a run of 3 chunks one block of 15.
                for block_tokens in [5, 15] {
                    let mut seen = vec![false; layout.bytes_per_token() * block_tokens];
                    let mut mark = |from: usize, len: usize| {
                        for (b, used) in seen.iter_mut().enumerate().skip(from).take(len) {
                            assert!(!*used, "{dtype} byte {b} used twice");
                            *used = true;
                        }
                    };
                    for layer in 0..3 {
                        for part in [KvPart::Key, KvPart::Value] {
                            let scales = dtype.scales_per_row(part, 32);
                            for head in 0..2 {
                                for slot in 0..block_tokens {
                                    let at = |f: fn(
                                        &KvLayout,
                                        usize,
                                        KvPart,
                                        usize,
                                        usize,
                                        usize,
                                    )
                                        -> usize| {
                                        f(&layout, layer, part, head, slot, block_tokens)
                                    };
                                    mark(at(KvLayout::code_offset_in_block), 32 * code);
                                    if scales > 0 {
                                        let s = at(KvLayout::scale_offset_in_block);
                                        assert_eq!(s % 4, 0, "scales are f32-aligned");
                                        mark(s, 4 * scales);
                                    }
                                }
                            }
                        }
                    }
                    assert!(seen.iter().all(|&s| s), "{dtype}: a block has unused bytes");
                }
            }
        }
        let f32 = KvLayout::new(LayoutKind::Chunked, KvDtype::F32, 3, 2, 4, 5).unwrap();
        assert_eq!(f32.chunk_bytes(), 3 * 2 * 2 * 4 * 5 * 4);
        assert!(KvLayout::new(LayoutKind::Chunked, KvDtype::F32, 3, 2, 4, 0).is_err());
    }

    #[test]
    fn quantized_rows_are_a_quarter_of_f32_plus_their_scales() {
        // SmolLM2-135M: 30 layers, 3 KV heads of 64.
        let bytes = |dtype| {
            KvLayout::new(LayoutKind::Chunked, dtype, 30, 3, 64, 16)
                .unwrap()
                .bytes_per_token()
        };
        let heads = 30 * 3;
        assert_eq!(bytes(KvDtype::F32), heads * 2 * 64 * 4);
        assert_eq!(bytes(KvDtype::Bf16), heads * 2 * 64 * 2);
        // int8: 4 scales a key row (groups of 16 channels), 1 a value row; fp8: 1 and 1.
        assert_eq!(
            bytes(KvDtype::Int8),
            bytes(KvDtype::F32) / 4 + heads * (4 + 1) * 4
        );
        assert_eq!(
            bytes(KvDtype::Fp8E4m3),
            bytes(KvDtype::F32) / 4 + heads * 2 * 4
        );
        for (dtype, head_dim, multiple) in [(KvDtype::Int8, 24, 16), (KvDtype::Fp8E4m3, 6, 4)] {
            let err = KvLayout::new(LayoutKind::Chunked, dtype, 2, 1, head_dim, 16).unwrap_err();
            let err = err.to_string();
            assert!(
                err.contains(&format!(
                    "multiple of {multiple} (this model's is {head_dim})"
                )),
                "{err}"
            );
        }
        for dtype in KvDtype::ALL {
            assert_eq!(dtype.name().parse::<KvDtype>().unwrap(), dtype);
        }
        let unknown = "int4".parse::<KvDtype>().unwrap_err().to_string();
        assert!(
            unknown.contains("int4") && unknown.contains("fp8-e4m3"),
            "{unknown}"
        );
    }
}
