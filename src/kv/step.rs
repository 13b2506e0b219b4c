//! The step view: which sequence each row of a forward step belongs to, its position, and the
//! block tables of the step's sequences. `rope`, `kv_append` and `attention` read K/V through it
//! on every backend; the CUDA kernels read its packed form (`kernels/kv_layout.cuh`).

use super::{KvLayout, KvPart, LayoutKind};

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
    /// Positions per block: `chunk_tokens` (chunked) or the capacity of its run (contiguous).
    pub block_tokens: u32,
}

impl SeqStep {
    /// Positions the sequence holds once the step's rows are written.
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
    /// Per row: its position in its sequence.
    pub row_pos: Vec<u32>,
    /// The step's block tables, one after another (chunk ids into the arena). A contiguous
    /// sequence has one entry: the first chunk of its run.
    pub block_table: Vec<u32>,
}

impl StepView {
    pub fn rows(&self) -> usize {
        self.row_pos.len()
    }

    /// (chunk id in the arena, slot in its block) of position `pos` of `seq`.
    pub fn locate(&self, seq: &SeqStep, pos: usize) -> (usize, usize) {
        match self.layout.kind() {
            LayoutKind::Contiguous => (self.block_table[seq.table_start as usize] as usize, pos),
            LayoutKind::Chunked => {
                let chunk_tokens = self.layout.chunk_tokens();
                let entry = seq.table_start as usize + pos / chunk_tokens;
                (self.block_table[entry] as usize, pos % chunk_tokens)
            }
        }
    }

    /// Byte offsets in the arena of the codes of the `head_dim` row of (layer, part, head) at
    /// `pos` of `seq`, and of its scale (quantized types; see [`KvLayout`]).
    pub fn row_offsets(
        &self,
        seq: &SeqStep,
        layer: usize,
        part: KvPart,
        head: usize,
        pos: usize,
    ) -> RowOffsets {
        let (chunk, slot) = self.locate(seq, pos);
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

    /// Calls `f(first_pos, count, offsets)` for each run of `range` whose rows of (layer, part,
    /// head) are consecutive in the arena (one block), with the offsets of its first row: its
    /// codes are `count` consecutive rows from there, and so are its scales.
    pub fn for_each_run(
        &self,
        seq: &SeqStep,
        layer: usize,
        part: KvPart,
        head: usize,
        range: std::ops::Range<usize>,
        mut f: impl FnMut(usize, usize, RowOffsets),
    ) {
        let mut pos = range.start;
        while pos < range.end {
            let (_, slot) = self.locate(seq, pos);
            let count = (seq.block_tokens as usize - slot).min(range.end - pos);
            f(pos, count, self.row_offsets(seq, layer, part, head, pos));
            pos += count;
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
