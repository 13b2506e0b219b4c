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
use anyhow::{bail, ensure, Context, Result};

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

// kernels/kv_layout.cuh checks the same size and offsets of its mirror, `KvSeqStep`.
const _: () = {
    use std::mem::{offset_of, size_of};
    assert!(size_of::<SeqStep>() == 20);
    assert!(offset_of!(SeqStep, first_row) == 0 && offset_of!(SeqStep, rows) == 4);
    assert!(offset_of!(SeqStep, start) == 8 && offset_of!(SeqStep, table_start) == 12);
    assert!(offset_of!(SeqStep, block_tokens) == 16);
};

impl SeqStep {
    /// Positions the sequence has written once the step's rows are (evicted ones included).
    pub fn end(&self) -> usize {
        self.start as usize + self.rows as usize
    }

    /// One past its last row among the step's rows.
    pub fn end_row(&self) -> usize {
        self.first_row as usize + self.rows as usize
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
    /// A step of no rows over `layout`.
    pub fn empty(layout: KvLayout) -> StepView {
        StepView {
            layout,
            seqs: Vec::new(),
            row_seq: Vec::new(),
            row_pos: Vec::new(),
            row_slot: Vec::new(),
            block_table: Vec::new(),
            slot_positions: Vec::new(),
            track_mass: Vec::new(),
        }
    }

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

    /// Moves every sequence of one row on by one position: the view of the next decode step,
    /// which a backend can run without a copy from the host if the chunks of the new positions
    /// are in the block tables already (`check_fits` says whether they are). Mirrored by
    /// `kv_step_advance` in kernels/kv_layout.cuh. Each row's slot follows its position: runs
    /// of decode steps are for sequences under no eviction policy
    /// ([`super::ChunkPool::decode_view`] refuses the others).
    pub fn advance(&mut self) {
        for seq in &mut self.seqs {
            if seq.rows == 1 {
                seq.start += 1;
                self.row_pos[seq.first_row as usize] += 1;
                self.row_slot[seq.first_row as usize] += 1;
            }
        }
    }

    /// Checks that the view is well formed and fits an arena of `arena_chunks` chunks of
    /// `layout`, so that no op reads or writes outside the arena or the view (the kernels index
    /// both without checks): every row belongs to the sequence whose rows enclose it, at that
    /// sequence's next position, and writes one of its slots; the sequences' rows do not overlap;
    /// positions fit an `i32`; every block a sequence's slots need is listed, before the next
    /// sequence's table, and lies inside the arena.
    pub fn check_fits(&self, layout: &KvLayout, arena_chunks: usize) -> Result<()> {
        ensure!(
            self.layout == *layout,
            "a step view of another KV layout ({:?}) over this arena ({layout:?})",
            self.layout
        );
        let rows = self.rows();
        ensure!(
            self.row_seq.len() == rows,
            "a step view with {} row sequences for {rows} row positions",
            self.row_seq.len()
        );
        let seqs = self.seqs.len();
        ensure!(
            self.row_slot.len() == rows
                && self.slot_positions.len() == seqs
                && self.track_mass.len() == seqs,
            "a step view of {rows} rows and {seqs} sequences with {} row slots, {} slot maps and \
             {} mass flags",
            self.row_slot.len(),
            self.slot_positions.len(),
            self.track_mass.len()
        );
        for (row, (&index, &pos)) in self.row_seq.iter().zip(&self.row_pos).enumerate() {
            let seq = self.seqs.get(index as usize).with_context(|| {
                format!("step row {row}: sequence {index} of {}", self.seqs.len())
            })?;
            let in_seq = (row as u64).checked_sub(seq.first_row as u64);
            ensure!(
                in_seq.is_some_and(|i| i < seq.rows as u64),
                "step row {row}: outside the rows {}..{} of its sequence {index}",
                seq.first_row,
                seq.first_row as u64 + seq.rows as u64
            );
            ensure!(
                pos as u64 == seq.start as u64 + in_seq.unwrap_or(0),
                "step row {row}: position {pos}, but its sequence {index} is at {}",
                seq.start as u64 + in_seq.unwrap_or(0)
            );
        }
        let chunk_tokens = layout.chunk_tokens();
        for (index, seq) in self.seqs.iter().enumerate() {
            let (first_row, end_row) = (seq.first_row as usize, seq.end_row());
            ensure!(
                seq.rows > 0 && end_row <= rows,
                "step sequence {index}: rows {first_row}..{end_row} of a step of {rows}"
            );
            if let Some(other) = self.row_seq[first_row..end_row]
                .iter()
                .find(|&&s| s as usize != index)
            {
                bail!("step sequence {index}: its rows {first_row}..{end_row} hold rows of sequence {other}");
            }
            let end = seq.start as u64 + seq.rows as u64;
            ensure!(
                end <= i32::MAX as u64,
                "step sequence {index}: positions up to {end} (at most {})",
                i32::MAX
            );
            // The slots its blocks must hold: its positions, or its slot map's.
            let slots = self.slots(index);
            if let Some(&bad) = self.row_slot[first_row..end_row]
                .iter()
                .find(|&&s| s as usize >= slots)
            {
                bail!("step sequence {index}: a row writes slot {bad} of {slots}");
            }
            let entries = match layout.kind() {
                LayoutKind::Contiguous => {
                    ensure!(
                        slots as u64 <= seq.block_tokens as u64,
                        "step sequence {index}: slots up to {slots} in a run of {}",
                        seq.block_tokens
                    );
                    1
                }
                LayoutKind::Chunked => {
                    ensure!(
                        seq.block_tokens as usize == chunk_tokens,
                        "step sequence {index}: blocks of {} positions in chunks of {chunk_tokens}",
                        seq.block_tokens
                    );
                    slots.div_ceil(chunk_tokens)
                }
            };
            // A table may list more than the positions need (a run of decode steps reserves its
            // chunks ahead), but never reaches into the next table (the two parts of a sequence
            // split by `last_rows_at_end` share one).
            let table_end = self
                .seqs
                .iter()
                .map(|other| other.table_start as usize)
                .filter(|&start| start > seq.table_start as usize)
                .min()
                .unwrap_or(self.block_table.len());
            ensure!(
                seq.table_start as usize + entries <= table_end,
                "step sequence {index}: its block table of {entries} entries from entry {} reaches \
                 into the next table, from entry {table_end}",
                seq.table_start
            );
            let block_chunks = (seq.block_tokens as usize).div_ceil(chunk_tokens);
            let table = self
                .block_table
                .get(seq.table_start as usize..)
                .and_then(|rest| rest.get(..entries))
                .with_context(|| {
                    format!(
                        "step sequence {index}: its block table of {entries} entries from entry {} \
                         is outside the step's {}",
                        seq.table_start,
                        self.block_table.len()
                    )
                })?;
            if let Some(&bad) = table
                .iter()
                .find(|&&c| c as usize + block_chunks > arena_chunks)
            {
                bail!(
                    "step sequence {index}: a block of {block_chunks} chunks at chunk {bad} is \
                     outside an arena of {arena_chunks} chunks"
                );
            }
        }
        Ok(())
    }

    /// The same step with the last row of each sequence after all the other rows, in the
    /// sequences' order, so that those rows are the step's last `seqs.len()` (the forward pass
    /// computes logits of a step's last rows only: `LogitRows::LastRows`); and, for each row of
    /// the new view, the row of this one it is. A sequence of several rows becomes two parts:
    /// its other rows, then (after every sequence's other rows) its last row, both over its
    /// block table. Every row's K/V is appended before attention reads any, so the last row
    /// still sees the rows before it. A view whose last rows already end it in order (one
    /// sequence, or one row per sequence) comes back as it is.
    pub fn last_rows_at_end(&self) -> (StepView, Vec<usize>) {
        if self.seqs.len() <= 1 || self.seqs.iter().all(|s| s.rows == 1) {
            return (self.clone(), (0..self.rows()).collect());
        }
        let mut view = StepView {
            layout: self.layout,
            seqs: Vec::with_capacity(2 * self.seqs.len()),
            row_seq: Vec::with_capacity(self.rows()),
            row_pos: Vec::with_capacity(self.rows()),
            row_slot: Vec::with_capacity(self.rows()),
            block_table: self.block_table.clone(),
            slot_positions: Vec::with_capacity(2 * self.seqs.len()),
            track_mass: Vec::with_capacity(2 * self.seqs.len()),
        };
        let mut order = Vec::with_capacity(self.rows());
        let mut add =
            |index_in_self: usize, part: SeqStep, from_row: usize, order: &mut Vec<usize>| {
                let index = view.seqs.len() as u32;
                let part = SeqStep {
                    first_row: view.row_pos.len() as u32,
                    ..part
                };
                for row in 0..part.rows {
                    view.row_seq.push(index);
                    view.row_pos.push(part.start + row);
                    view.row_slot.push(self.row_slot[from_row + row as usize]);
                    order.push(from_row + row as usize);
                }
                view.seqs.push(part);
                view.slot_positions
                    .push(self.slot_positions[index_in_self].clone());
                view.track_mass.push(self.track_mass[index_in_self]);
            };
        for (index, seq) in self.seqs.iter().enumerate().filter(|(_, s)| s.rows > 1) {
            let others = SeqStep {
                rows: seq.rows - 1,
                ..*seq
            };
            add(index, others, seq.first_row as usize, &mut order);
        }
        for (index, seq) in self.seqs.iter().enumerate() {
            let last = SeqStep {
                rows: 1,
                start: seq.start + seq.rows - 1,
                ..*seq
            };
            add(index, last, seq.end_row() - 1, &mut order);
        }
        (view, order)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::KvDtype;

    /// Two sequences in chunks of 4: A at positions 5..8 (table [3, 0]), B at 0..1 (table [2]).
    fn view() -> StepView {
        StepView {
            layout: KvLayout::new(LayoutKind::Chunked, KvDtype::Bf16, 2, 1, 8, 4).unwrap(),
            seqs: vec![
                SeqStep {
                    first_row: 0,
                    rows: 3,
                    start: 5,
                    table_start: 0,
                    block_tokens: 4,
                },
                SeqStep {
                    first_row: 3,
                    rows: 1,
                    start: 0,
                    table_start: 2,
                    block_tokens: 4,
                },
            ],
            row_seq: vec![0, 0, 0, 1],
            row_pos: vec![5, 6, 7, 0],
            row_slot: vec![5, 6, 7, 0],
            block_table: vec![3, 0, 2],
            slot_positions: vec![None, None],
            track_mass: vec![false, false],
        }
    }

    #[test]
    fn an_advanced_view_moves_one_row_sequences_and_fits_while_their_tables_last() {
        // A at 5..8 (3 rows) stays; B (one row) moves from position 0 to 1, 2, 3, all in its
        // one chunk; position 4 would need a second entry in B's table.
        let mut view = view();
        let layout = view.layout;
        for expected in 1..=3 {
            view.advance();
            assert_eq!(
                (view.seqs[0].start, view.row_pos[..3].to_vec()),
                (5, vec![5, 6, 7])
            );
            assert_eq!((view.seqs[1].start, view.row_pos[3]), (expected, expected));
            view.check_fits(&layout, 4).unwrap();
        }
        view.advance();
        let error = view.check_fits(&layout, 4).unwrap_err().to_string();
        assert!(error.contains("block table of 2 entries"), "{error}");
    }

    #[test]
    fn views_that_would_reach_outside_the_arena_or_contradict_their_rows_are_refused() {
        let good = view();
        good.check_fits(&good.layout, 4).unwrap();
        let refused = |change: &dyn Fn(&mut StepView), chunks: usize, says: &str| {
            let mut bad = view();
            change(&mut bad);
            let error = bad
                .check_fits(&good.layout, chunks)
                .unwrap_err()
                .to_string();
            assert!(error.contains(says), "{error:?} does not say {says:?}");
        };
        refused(&|_| {}, 3, "chunk 3 is outside an arena of 3 chunks");
        refused(
            &|v| v.block_table.truncate(2),
            4,
            "block table of 1 entries",
        );
        refused(&|v| v.row_seq[3] = 2, 4, "sequence 2 of 2");
        refused(
            &|v| v.row_seq[2] = 1,
            4,
            "step row 2: outside the rows 3..4",
        );
        refused(
            &|v| v.row_pos[1] = 9,
            4,
            "position 9, but its sequence 0 is at 6",
        );
        refused(&|v| v.seqs[1].rows = 2, 4, "rows 3..5 of a step of 4");
        refused(&|v| v.seqs[1].block_tokens = 8, 4, "blocks of 8 positions");
        refused(
            &|v| {
                v.seqs[0].rows = 1;
                v.seqs[0].start = 8;
                v.row_seq = vec![0, 1];
                v.row_pos = vec![8, 0];
                v.row_slot = vec![8, 0];
                v.seqs[1].first_row = 1;
            },
            4,
            "reaches into the next table, from entry 2",
        );
        refused(
            &|v| v.row_pos.push(1),
            4,
            "4 row sequences for 5 row positions",
        );
        refused(&|v| v.row_slot[1] = 8, 4, "a row writes slot 8 of 8");
        refused(
            &|v| {
                v.track_mass.pop();
            },
            4,
            "1 mass flags",
        );
        // A slot map of 13 slots needs 4 chunks; the step's table has 3 entries.
        refused(
            &|v| v.slot_positions[0] = Some((0..13).collect()),
            4,
            "block table of 4 entries",
        );
        let mut other = view();
        other.layout.head_dim = 16;
        assert!(other.check_fits(&good.layout, 4).is_err());
    }

    #[test]
    fn the_last_rows_of_the_sequences_move_to_the_end() {
        // A: rows 0..3 at 5..8, B: row 3 at 0, C: rows 4..6 at 2..4 (table [1]).
        let mut three = view();
        three.seqs.push(SeqStep {
            first_row: 4,
            rows: 2,
            start: 2,
            table_start: 3,
            block_tokens: 4,
        });
        three.row_seq.extend([2, 2]);
        three.row_pos.extend([2, 3]);
        three.row_slot.extend([2, 3]);
        three.slot_positions.push(None);
        three.track_mass.push(false);
        three.block_table.push(1);
        three.check_fits(&three.layout, 4).unwrap();
        let (moved, order) = three.last_rows_at_end();
        moved.check_fits(&moved.layout, 4).unwrap();
        // A's first two rows, C's first, then the last rows of A, B and C.
        assert_eq!(order, [0, 1, 4, 2, 3, 5]);
        assert_eq!(moved.row_pos, [5, 6, 2, 7, 0, 3]);
        assert_eq!(
            moved.row_slot, moved.row_pos,
            "no slot map: each row's slot is its position"
        );
        for (new_row, &old_row) in order.iter().enumerate() {
            let old = &three.seqs[three.row_seq[old_row] as usize];
            let new = &moved.seqs[moved.row_seq[new_row] as usize];
            assert_eq!(moved.row_pos[new_row], three.row_pos[old_row]);
            // Each part reads its sequence's blocks.
            assert_eq!(new.table_start, old.table_start);
            assert_eq!(
                moved.locate(new, moved.row_pos[new_row] as usize),
                three.locate(old, three.row_pos[old_row] as usize)
            );
        }
        // One row per sequence, or one sequence: already in place.
        let mut decode = three.clone();
        decode.seqs.truncate(2);
        decode.seqs[0].rows = 1;
        decode.seqs[1].first_row = 1;
        decode.row_seq = vec![0, 1];
        decode.row_pos = vec![5, 0];
        assert_eq!(decode.last_rows_at_end(), (decode.clone(), vec![0, 1]));
    }
}
