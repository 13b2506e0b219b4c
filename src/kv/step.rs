//! The step view: which sequence each row of a forward step belongs to, its position and the
//! slot its K/V go to, and the block tables of the step's sequences. `rope` reads the positions,
//! `kv_append` the slots, `attention` every slot of a sequence; the CUDA kernels read its packed
//! form (`kernels/kv_layout.cuh`).
//!
//! A slot is a place in a sequence's blocks: slot `s` is slot `s % chunk_tokens` of chunk
//! `s / chunk_tokens` of its block table (chunked), or slot `s` of its run (contiguous). Slot `s`
//! holds position `s`, unless the sequence has evicted positions: then its slot map says which
//! position each slot holds, and attention masks the freed slots and, causally, the step's own
//! later rows.

use super::{KvLayout, KvPart, LayoutKind};

/// A slot that holds no position (freed by eviction), in a slot map.
pub const EMPTY_SLOT: u32 = u32::MAX;

/// One sequence's part of a step, mirrored by `KvSeqStep` in `kernels/kv_layout.cuh`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct SeqStep {
    /// The sequence's first row among the step's activation rows (its rows are consecutive).
    pub first_row: u32,
    pub rows: u32,
    /// Position of its first row: the positions cached before this step.
    pub start: u32,
    /// Its first entry in the step's block table.
    pub table_start: u32,
    /// Slots per block: `chunk_tokens` (chunked) or the capacity of its run (contiguous).
    pub block_tokens: u32,
}

impl SeqStep {
    /// Positions the sequence has written once the step's rows are (evicted ones included).
    pub fn end(&self) -> usize {
        (self.start + self.rows) as usize
    }
}

/// Where one `head_dim` row of K or V sits in the arena, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowOffsets {
    pub codes: usize,
    /// Its f32 scale (meaningful for the quantized types only).
    pub scale: usize,
}

/// The rows of one forward step and where their K/V live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepView {
    pub layout: KvLayout,
    pub seqs: Vec<SeqStep>,
    /// Per row: index of its sequence in `seqs`.
    pub row_seq: Vec<u32>,
    /// Per row: its position in its sequence (what RoPE rotates by).
    pub row_pos: Vec<u32>,
    /// Per row: the slot its K/V are written to (its position, until its sequence evicts).
    pub row_slot: Vec<u32>,
    /// The step's block tables, one after another (chunk ids into the arena). A contiguous
    /// sequence has one entry: the first chunk of its run.
    pub block_table: Vec<u32>,
    /// Per sequence: once it has evicted positions, the position each of its slots holds
    /// ([`EMPTY_SLOT`]: none), the step's rows included; None: slot `s` holds position `s` and
    /// the sequence spans `end()` slots.
    pub slot_positions: Vec<Option<Vec<u32>>>,
    /// Per sequence: whether attention sums the probability mass each slot receives (H2O).
    pub track_mass: Vec<bool>,
}

impl StepView {
    pub fn rows(&self) -> usize {
        self.row_pos.len()
    }

    /// Slots sequence `index` of the step spans once the step's rows are written.
    pub fn slots(&self, index: usize) -> usize {
        self.slot_positions[index]
            .as_ref()
            .map_or(self.seqs[index].end(), Vec::len)
    }

    /// Whether any sequence of the step has evicted positions.
    pub fn has_slot_maps(&self) -> bool {
        self.slot_positions.iter().any(Option::is_some)
    }

    /// (chunk id in the arena, slot in its block) of slot `slot` of `seq`.
    pub fn locate(&self, seq: &SeqStep, slot: usize) -> (usize, usize) {
        match self.layout.kind() {
            LayoutKind::Contiguous => (self.block_table[seq.table_start as usize] as usize, slot),
            LayoutKind::Chunked => {
                let chunk_tokens = self.layout.chunk_tokens();
                let entry = seq.table_start as usize + slot / chunk_tokens;
                (self.block_table[entry] as usize, slot % chunk_tokens)
            }
        }
    }

    /// Byte offsets in the arena of the codes of the `head_dim` row of (layer, part, head) in
    /// slot `slot` of `seq`, and of its scale (quantized types; see [`KvLayout`]).
    pub fn row_offsets(
        &self,
        seq: &SeqStep,
        layer: usize,
        part: KvPart,
        head: usize,
        slot: usize,
    ) -> RowOffsets {
        let (chunk, slot) = self.locate(seq, slot);
        let block = chunk * self.layout.chunk_bytes();
        let block_tokens = seq.block_tokens as usize;
        RowOffsets {
            codes: block
                + self
                    .layout
                    .code_offset_in_block(layer, part, head, slot, block_tokens),
            scale: block
                + self
                    .layout
                    .scale_offset_in_block(layer, part, head, slot, block_tokens),
        }
    }

    /// Calls `f(first_slot, count, offsets)` for each run of the slots `range` whose rows of
    /// (layer, part, head) are consecutive in the arena (one block), with the offsets of its
    /// first row: its codes are `count` consecutive rows from there, and so are its scales.
    pub fn for_each_run(
        &self,
        seq: &SeqStep,
        layer: usize,
        part: KvPart,
        head: usize,
        range: std::ops::Range<usize>,
        mut f: impl FnMut(usize, usize, RowOffsets),
    ) {
        let mut slot = range.start;
        while slot < range.end {
            let (_, in_block) = self.locate(seq, slot);
            let count = (seq.block_tokens as usize - in_block).min(range.end - slot);
            f(slot, count, self.row_offsets(seq, layer, part, head, slot));
            slot += count;
        }
    }

    /// The view as the kernels read it: `u32` words, in order the sequences (`KvSeqStep`, 5
    /// words each), `row_seq`, `row_pos`, then the block table.
    pub fn packed(&self) -> Vec<u32> {
        let mut words =
            Vec::with_capacity(self.seqs.len() * 5 + 2 * self.rows() + self.block_table.len());
        words.extend_from_slice(bytemuck::cast_slice(&self.seqs));
        words.extend_from_slice(&self.row_seq);
        words.extend_from_slice(&self.row_pos);
        words.extend_from_slice(&self.block_table);
        words
    }
}
