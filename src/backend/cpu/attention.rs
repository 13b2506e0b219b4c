//! Causal GQA attention on the CPU, over the arena of a KV pool through a [`StepView`]: every
//! sequence of the step, its rows against its own positions, in either layout (a contiguous run,
//! or chunks through a block table) and any element type: f32 and bf16 widened to f32 as they
//! are read, int8 and fp8 e4m3 widened the same way with each row's scale folded into its score
//! (keys) or its softmax weight (values), so no dequantized copy of the cache is ever written.
//!
//! A call is cut into items (sequence, KV head, block of query rows, split of the context). An
//! item runs an online softmax (running max `m`, running sum `l`, unnormalised output `acc`) for
//! every query head of its KV head and every row of its block over its positions, tile by tile:
//! each K and V row is loaded once and used by all of the item's queries while it is in L1
//! (GQA-aware). The results are partial softmaxes; a second pass merges the splits of each
//! (row, head) and normalises. Prefill has many row blocks and one split; decode has one row
//! block and, once the context is long, several splits so that every core streams a part of it
//! (flash-decoding). Items of all sequences run in one parallel pass.
//!
//! The inner loops over a run of positions ([`RunKernels`]) are plain Rust that LLVM vectorises;
//! on x86_64 with AVX2 + FMA the item kernel is compiled a second time with those features and
//! picked at run time, with hand-written run kernels (`avx2.rs`) for head_dim 16, 32, 64, 128.

use super::simd::{exp, has_avx2_fma, Fused, MulAdd, Unfused};
#[cfg(target_arch = "x86_64")]
mod avx2;
use crate::kv::quant::{e4m3_decode, E4m3, E4M3_TO_F32_EXPONENT_SHIFT};
use crate::kv::{KvPart, SeqStep, StepView};
use half::bf16;
use rayon::prelude::*;
use std::cell::Cell;

/// Positions per tile: a tile of K (then V) rows is 64 × head_dim 64 × 4 B = 16 KiB, which stays
/// in L1 while all of an item's queries use it.
const TILE: usize = 64;
/// Query rows per item in prefill: 16 rows × a group of 4 heads = 64 queries share each K/V row.
const ROW_BLOCK: usize = 16;
/// A split of the context is at least this many positions, so the merge stays negligible.
const MIN_SPLIT: usize = 512;
/// Items per thread the planner aims for, so that rayon can balance uneven items.
const ITEMS_PER_THREAD: usize = 8;
/// Query heads a run kernel serves at once: each K or V row is loaded and widened once for all
/// of them (the query heads of one KV head, GQA), 4 being what the AVX2 registers hold.
const MAX_QUERIES: usize = 4;

/// A K or V code as the arena stores it. The value of an entry is `to_f32(code)`, times its
/// row's (or its key group's) scale for the quantized types.
pub trait KvElement: bytemuck::Pod + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    /// Codes `p[0..8]` widened to f32 (unscaled).
    ///
    /// # Safety
    /// `p` points at 8 readable codes, and the caller runs with AVX2 enabled.
    #[cfg(target_arch = "x86_64")]
    unsafe fn widen8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl KvElement for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn widen8(p: *const f32) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
}

impl KvElement for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }

    /// A bf16 is the high half of an f32: zero-extend to 32 bits and shift into place.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn widen8(p: *const bf16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        let halves = _mm_loadu_si128(p as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(halves)))
    }
}

impl KvElement for i8 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self as f32
    }

    /// Sign-extend eight bytes to 32 bits, convert.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn widen8(p: *const i8) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i)))
    }
}

impl KvElement for E4m3 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        e4m3_decode(self.0)
    }

    /// The code's exponent and mantissa bits placed at bit 20 of an f32 read as 2^-120 times the
    /// value (normal and subnormal codes alike, see [`E4M3_TO_F32_EXPONENT_SHIFT`]): one multiply
    /// restores it, the sign bit goes to bit 31. The NaN codes, never stored, would read 480.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn widen8(p: *const E4m3) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        let codes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i));
        let sign = _mm256_slli_epi32::<24>(_mm256_and_si256(codes, _mm256_set1_epi32(0x80)));
        let bits = _mm256_slli_epi32::<20>(_mm256_and_si256(codes, _mm256_set1_epi32(0x7f)));
        let shift = f32::from_bits(((127 + E4M3_TO_F32_EXPONENT_SHIFT) as u32) << 23);
        let magnitude = _mm256_mul_ps(_mm256_castsi256_ps(bits), _mm256_set1_ps(shift));
        _mm256_or_ps(magnitude, _mm256_castsi256_ps(sign))
    }
}

/// One attention call: the step's queries against a layer of the arena.
pub struct AttentionInput<'a, E> {
    /// `[step rows, num_heads * head_dim]` row-major.
    pub q: &'a [f32],
    /// The pool's arena (`chunks × chunk_bytes`) as codes; the rows' codes sit at their byte
    /// offset divided by the code's size.
    pub codes: &'a [E],
    /// The same arena as f32 words, for the quantized types' scales (empty for the others).
    pub scales: &'a [f32],
    pub step: &'a StepView,
    pub layer: usize,
    pub num_heads: usize,
}

impl<'a, E: KvElement> AttentionInput<'a, E> {
    /// The input over a pool's arena (`chunks × chunk_bytes` bytes, 4-byte aligned).
    pub fn new(
        q: &'a [f32],
        arena: &'a [u8],
        step: &'a StepView,
        layer: usize,
        num_heads: usize,
    ) -> Self {
        AttentionInput {
            q,
            codes: bytemuck::cast_slice(arena),
            scales: if step.layout.dtype().is_quantized() {
                bytemuck::cast_slice(arena)
            } else {
                &[]
            },
            step,
            layer,
            num_heads,
        }
    }
}

/// How one sequence's work is cut into items.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionPlan {
    /// Query rows per item (the last block may hold fewer).
    pub row_block: usize,
    /// Items that share the context of one (KV head, row block) between them.
    pub splits: usize,
}

impl AttentionPlan {
    /// The plan for one sequence of `rows` query rows whose last one sees `visible` positions,
    /// on `threads` threads: row blocks of [`ROW_BLOCK`], then context splits until there are
    /// [`ITEMS_PER_THREAD`] items per thread or splits would fall under [`MIN_SPLIT`] positions.
    pub fn for_shape(rows: usize, visible: usize, num_kv_heads: usize, threads: usize) -> Self {
        let row_block = rows.clamp(1, ROW_BLOCK);
        let items = rows.div_ceil(row_block) * num_kv_heads.max(1);
        AttentionPlan {
            row_block,
            splits: Self::splits(items, visible, threads),
        }
    }

    /// One plan per sequence of `step`: the items of all of them count toward the target.
    pub fn for_step(step: &StepView, num_kv_heads: usize, threads: usize) -> Vec<Self> {
        let items: usize = step
            .seqs
            .iter()
            .map(|s| (s.rows as usize).div_ceil((s.rows as usize).clamp(1, ROW_BLOCK)))
            .sum::<usize>()
            * num_kv_heads.max(1);
        step.seqs
            .iter()
            .enumerate()
            .map(|(index, s)| AttentionPlan {
                row_block: (s.rows as usize).clamp(1, ROW_BLOCK),
                splits: Self::splits(items, step.slots(index), threads),
            })
            .collect()
    }

    fn splits(items: usize, visible: usize, threads: usize) -> usize {
        let wanted = ITEMS_PER_THREAD * threads.max(1);
        if items >= wanted {
            1
        } else {
            wanted.div_ceil(items).min(visible / MIN_SPLIT).max(1)
        }
    }
}

/// out = softmax(q·Kᵀ / sqrt(head_dim), causal) · V for every row and head, each row over its
/// own sequence. `out`: `[step rows, num_heads * head_dim]` row-major; `plans`: one per
/// sequence of the step. The caller has checked the shapes (the backend's `attention` does).
pub fn attention<E: KvElement>(
    input: &AttentionInput<E>,
    plans: &[AttentionPlan],
    out: &mut [f32],
) {
    attention_with(Isa::detect(), input, plans, out)
}

/// Where a sequence's items start among the call's items, and its plan.
struct SeqItems {
    first_item: usize,
    plan: AttentionPlan,
}

fn attention_with<E: KvElement>(
    isa: Isa,
    input: &AttentionInput<E>,
    plans: &[AttentionPlan],
    out: &mut [f32],
) {
    let layout = input.step.layout;
    let head_dim = layout.head_dim as usize;
    let num_kv_heads = layout.num_kv_heads as usize;
    let group = input.num_heads / num_kv_heads;
    let q_cols = input.num_heads * head_dim;
    // An item's partial results: per (row of its block, head of its group) a record
    // [m, l, acc[head_dim]].
    let record = head_dim + 2;
    let max_row_block = plans.iter().map(|p| p.row_block.max(1)).max().unwrap_or(1);
    let item_elems = max_row_block * group * record;
    // Item index = first_item + (block * num_kv_heads + kv_head) * splits + split.
    let mut seq_items = Vec::with_capacity(plans.len());
    let mut items = Vec::new();
    for (index, (seq, plan)) in input.step.seqs.iter().zip(plans).enumerate() {
        let plan = AttentionPlan {
            row_block: plan.row_block.max(1),
            splits: plan.splits.max(1),
        };
        seq_items.push(SeqItems {
            first_item: items.len(),
            plan,
        });
        let blocks = (seq.rows as usize).div_ceil(plan.row_block);
        for block in 0..blocks {
            for kv_head in 0..num_kv_heads {
                for split in 0..plan.splits {
                    items.push((index, block, kv_head, split));
                }
            }
        }
    }

    let mut partials = PARTIALS.take();
    partials.clear();
    partials.resize(items.len() * item_elems, 0.0);
    partials
        .par_chunks_mut(item_elems)
        .zip(items.par_iter())
        .for_each(|(partial, &(index, block, kv_head, split))| {
            let seq = &input.step.seqs[index];
            let plan = seq_items[index].plan;
            let first_row = seq.first_row as usize + block * plan.row_block;
            let end_row = (first_row + plan.row_block).min((seq.first_row + seq.rows) as usize);
            // The block's last row sees the most slots (all of them once the sequence has a
            // slot map); the splits share those, in whole tiles.
            let slot_pos = input.step.slot_positions[index].as_deref();
            let visible = match slot_pos {
                None => seq.start as usize + end_row - seq.first_row as usize,
                Some(map) => map.len(),
            };
            let split_len = visible.div_ceil(plan.splits).next_multiple_of(TILE);
            let slots = (split * split_len).min(visible)..((split + 1) * split_len).min(visible);
            let work = Item {
                input,
                seq,
                slot_pos,
                kv_head,
                group,
                rows: first_row..end_row,
                slots,
            };
            let mut scores = SCORES.take();
            scores.resize(MAX_QUERIES * TILE, 0.0);
            isa.attend(&work, partial, &mut scores);
            SCORES.set(scores);
        });

    // Merge the splits of each (row, head): rescale each partial to the common max, add, divide.
    out[..input.step.rows() * q_cols]
        .par_chunks_mut(q_cols)
        .enumerate()
        .for_each(|(row, out_row)| {
            let index = input.step.row_seq[row] as usize;
            let seq = &input.step.seqs[index];
            let SeqItems { first_item, plan } = seq_items[index];
            let in_seq = row - seq.first_row as usize;
            let (block, row_in_block) = (in_seq / plan.row_block, in_seq % plan.row_block);
            for (head, out_head) in out_row.chunks_exact_mut(head_dim).enumerate() {
                let (kv_head, head_in_group) = (head / group, head % group);
                let first = first_item + (block * num_kv_heads + kv_head) * plan.splits;
                let records = (0..plan.splits).map(|split| {
                    let at = (first + split) * item_elems
                        + (row_in_block * group + head_in_group) * record;
                    &partials[at..at + record]
                });
                let max = records
                    .clone()
                    .map(|r| r[0])
                    .fold(f32::NEG_INFINITY, f32::max);
                out_head.fill(0.0);
                let mut sum = 0.0f32;
                // A split past the row's causal limit saw nothing: l = 0, m = -inf.
                for r in records.filter(|r| r[1] > 0.0) {
                    let weight = (r[0] - max).exp();
                    sum += r[1] * weight;
                    axpy::<Unfused, f32>(out_head, weight, &r[2..]);
                }
                // Every row sees its own slot, so sum > 0.
                let inv = 1.0 / sum;
                out_head.iter_mut().for_each(|o| *o *= inv);
            }
        });
    PARTIALS.set(partials);
}

thread_local! {
    /// Per-thread scores of the queries in progress over one tile, `[MAX_QUERIES][TILE]`; kept
    /// between calls.
    static SCORES: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    /// The calling thread's partial results of a call; kept between calls.
    static PARTIALS: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// The work of one item: the `group` query heads of `kv_head`, for step rows `rows` of `seq`,
/// over `slots` of that sequence.
struct Item<'a, E> {
    input: &'a AttentionInput<'a, E>,
    seq: &'a SeqStep,
    /// The sequence's slot map, once it has evicted positions (None: slot s holds position s).
    slot_pos: Option<&'a [u32]>,
    kv_head: usize,
    group: usize,
    rows: std::ops::Range<usize>,
    slots: std::ops::Range<usize>,
}

impl<E: KvElement> Item<'_, E> {
    fn queries(&self) -> usize {
        self.rows.len() * self.group
    }

    /// Position of step row `row`.
    fn position(&self, row: usize) -> usize {
        self.seq.start as usize + row - self.seq.first_row as usize
    }

    /// Calls `f(first_slot, rows, scales)` for each run of the slots `range` that lies in one
    /// block, with that run's `[n, head_dim]` codes of (layer, part, kv_head) and, for the
    /// quantized types, their `[n, scales per row]` scales (empty otherwise).
    #[inline(always)]
    fn for_each_run(
        &self,
        part: KvPart,
        range: std::ops::Range<usize>,
        mut f: impl FnMut(usize, &[E], &[f32]),
    ) {
        let input = self.input;
        let layout = input.step.layout;
        let head_dim = layout.head_dim();
        let code_bytes = std::mem::size_of::<E>();
        let scales_per_row = layout.dtype().scales_per_row(part, head_dim);
        input.step.for_each_run(
            self.seq,
            input.layer,
            part,
            self.kv_head,
            range,
            |slot, count, at| {
                let codes = &input.codes[at.codes / code_bytes..][..count * head_dim];
                let scales = match scales_per_row {
                    0 => &[],
                    n => &input.scales[at.scale / 4..][..count * n],
                };
                f(slot, codes, scales)
            },
        );
    }
}

/// Independent partial sums of the dot product: two vectors of 8 lanes (AVX2), enough to hide
/// the latency of the adds.
const DOT_LANES: usize = 16;

/// Σ a[i]·b[i] over equal-length slices (b's codes unscaled).
#[inline(always)]
fn dot<M: MulAdd, E: KvElement>(a: &[f32], b: &[E]) -> f32 {
    let mut lanes = [0.0f32; DOT_LANES];
    let (a_main, a_tail) = a.split_at(a.len() / DOT_LANES * DOT_LANES);
    let (b_main, b_tail) = b.split_at(a_main.len());
    for (x, y) in a_main
        .chunks_exact(DOT_LANES)
        .zip(b_main.chunks_exact(DOT_LANES))
    {
        for i in 0..DOT_LANES {
            lanes[i] = M::mul_add(x[i], y[i].to_f32(), lanes[i]);
        }
    }
    let mut tail_sum = 0.0;
    for (x, y) in a_tail.iter().zip(b_tail) {
        tail_sum = M::mul_add(*x, y.to_f32(), tail_sum);
    }
    tail_sum + reduce(lanes)
}

/// Σ values, in [`DOT_LANES`] independent partial sums.
#[inline(always)]
fn sum(values: &[f32]) -> f32 {
    let mut lanes = [0.0f32; DOT_LANES];
    let (main, tail) = values.split_at(values.len() / DOT_LANES * DOT_LANES);
    for x in main.chunks_exact(DOT_LANES) {
        for i in 0..DOT_LANES {
            lanes[i] += x[i];
        }
    }
    reduce(lanes) + tail.iter().sum::<f32>()
}

/// The sum of the lanes, pairwise.
#[inline(always)]
fn reduce(mut lanes: [f32; DOT_LANES]) -> f32 {
    let mut width = DOT_LANES / 2;
    while width > 0 {
        for i in 0..width {
            lanes[i] += lanes[i + width];
        }
        width /= 2;
    }
    lanes[0]
}

/// y += a·x over equal-length slices.
#[inline(always)]
fn axpy<M: MulAdd, E: KvElement>(y: &mut [f32], a: f32, x: &[E]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y = M::mul_add(a, x.to_f32(), *y);
    }
}

/// The two inner loops of an item, over one run of slots that lie in one block, for `count`
/// (at most [`MAX_QUERIES`]) query heads at once. `scales` are the run's row scales (quantized
/// types; empty otherwise): a key row may carry several, one per group of
/// `head_dim / scales per row` channels; a value row carries at most one.
trait RunKernels<E> {
    /// out[h · out_stride + i] = scale · Σ_g row_scale[i, g] · q_h,g · keys[i]_g for each of the
    /// run's `[n, head_dim]` keys and each query q_h = qs[h · head_dim..][..head_dim] (g: the
    /// row's channel groups).
    fn scores(
        qs: &[f32],
        count: usize,
        keys: &[E],
        scales: &[f32],
        scale: f32,
        out: &mut [f32],
        out_stride: usize,
    );
    /// acc_h += Σ_i weights[h · shape.weight_stride + i] · row_scale[i] · values[i] over the
    /// run's `[n, head_dim]` values, for acc_h = accs[h · shape.acc_stride..][..head_dim].
    fn weighted_sum(
        weights: &[f32],
        values: &[E],
        scales: &[f32],
        accs: &mut [f32],
        shape: WeightedSumShape,
    );
}

/// Where [`RunKernels::weighted_sum`] finds its queries' weights and accumulators.
#[derive(Clone, Copy, Debug)]
struct WeightedSumShape {
    /// Query heads (at most [`MAX_QUERIES`]).
    count: usize,
    head_dim: usize,
    weight_stride: usize,
    acc_stride: usize,
}

/// The loops in plain Rust (any head_dim), query by query: a dot product per key (per channel
/// group), an axpy per value.
struct PlainRuns<M>(std::marker::PhantomData<M>);

impl<M: MulAdd, E: KvElement> RunKernels<E> for PlainRuns<M> {
    #[inline(always)]
    fn scores(
        qs: &[f32],
        count: usize,
        keys: &[E],
        scales: &[f32],
        scale: f32,
        out: &mut [f32],
        out_stride: usize,
    ) {
        let head_dim = qs.len() / count;
        let n = keys.len() / head_dim;
        let groups = scales.len() / n.max(1);
        for h in 0..count {
            let q = &qs[h * head_dim..][..head_dim];
            let out = &mut out[h * out_stride..][..n];
            for (i, (o, key)) in out.iter_mut().zip(keys.chunks_exact(head_dim)).enumerate() {
                *o = if let Some(width) = head_dim.checked_div(groups) {
                    let row = &scales[i * groups..(i + 1) * groups];
                    q.chunks_exact(width)
                        .zip(key.chunks_exact(width))
                        .zip(row)
                        .map(|((q, k), s)| dot::<M, E>(q, k) * s)
                        .sum::<f32>()
                        * scale
                } else {
                    dot::<M, E>(q, key) * scale
                };
            }
        }
    }

    #[inline(always)]
    fn weighted_sum(
        weights: &[f32],
        values: &[E],
        scales: &[f32],
        accs: &mut [f32],
        shape: WeightedSumShape,
    ) {
        let head_dim = shape.head_dim;
        for h in 0..shape.count {
            let acc = &mut accs[h * shape.acc_stride..][..head_dim];
            let weights = &weights[h * shape.weight_stride..];
            for (i, value) in values.chunks_exact(head_dim).enumerate() {
                let w = if scales.is_empty() {
                    weights[i]
                } else {
                    weights[i] * scales[i]
                };
                axpy::<M, E>(acc, w, value);
            }
        }
    }
}

/// The item kernel: fills `partial` (`[queries][m, l, acc[head_dim]]`, query = row_in_block *
/// group + head_in_group) with the online softmax of the item's queries over its slots.
/// `scores`: `[MAX_QUERIES][TILE]` scratch.
///
/// Tile by tile, row by row, up to [`MAX_QUERIES`] query heads at a time: their scores against
/// the tile's keys (each key row loaded and widened once for all of them), each one's online
/// softmax update, then their weighted sums of the tile's values (each value row widened once).
/// A tile of K (or V) rows stays in L1 while all of the item's rows use it; each row reads only
/// the slots it sees (causal).
#[inline(always)]
fn attend_item<E: KvElement, M: MulAdd, K: RunKernels<E>>(
    item: &Item<E>,
    partial: &mut [f32],
    scores: &mut [f32],
) {
    let input = item.input;
    let head_dim = input.step.layout.head_dim as usize;
    let record = head_dim + 2;
    let q_cols = input.num_heads * head_dim;
    let group = item.group;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let first_head = item.kv_head * group;
    let first_row = item.rows.start;
    for r in partial.chunks_exact_mut(record).take(item.queries()) {
        r[0] = f32::NEG_INFINITY;
        r[1] = 0.0;
        r[2..].fill(0.0);
    }

    let mut tile_start = item.slots.start;
    while tile_start < item.slots.end {
        let tile_end = (tile_start + TILE).min(item.slots.end);
        for row in item.rows.clone() {
            let position = item.position(row);
            // Slots tile_start..seen of the tile may be visible to this row: up to its own
            // position, or, with a slot map, every slot (masked below).
            let seen = match item.slot_pos {
                None => (position + 1).min(tile_end),
                Some(_) => tile_end,
            };
            if seen <= tile_start {
                continue;
            }
            let q_row = &input.q[row * q_cols..][..q_cols];
            let tile = seen - tile_start;
            // The group's query heads, up to MAX_QUERIES at a time: their scores over the tile,
            // each one's online softmax, then their weighted sums.
            for first in (0..group).step_by(MAX_QUERIES) {
                let count = MAX_QUERIES.min(group - first);
                let qs = &q_row[(first_head + first) * head_dim..][..count * head_dim];
                item.for_each_run(KvPart::Key, tile_start..seen, |first_slot, keys, scales| {
                    let out = &mut scores[first_slot - tile_start..];
                    K::scores(qs, count, keys, scales, scale, out, TILE);
                });
                for h in 0..count {
                    let s = &mut scores[h * TILE..][..tile];
                    if let Some(map) = item.slot_pos {
                        // A freed slot (EMPTY_SLOT) or a later row of this step is not visible.
                        for (x, &p) in s.iter_mut().zip(&map[tile_start..seen]) {
                            if p as usize > position {
                                *x = f32::NEG_INFINITY;
                            }
                        }
                    }
                    // Online softmax: fold the tile into the running max and sum; the scores
                    // become the tile's weights exp(s - m) (all 0 when nothing is visible).
                    let query = (row - first_row) * group + first + h;
                    let r = &mut partial[query * record..][..record];
                    let tile_max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    if tile_max == f32::NEG_INFINITY {
                        s.fill(0.0);
                        continue;
                    }
                    let max = r[0].max(tile_max);
                    let rescale = exp::<M>(r[0] - max);
                    if rescale != 1.0 {
                        r[1] *= rescale;
                        r[2..].iter_mut().for_each(|a| *a *= rescale);
                    }
                    s.iter_mut().for_each(|x| *x = exp::<M>(*x - max));
                    r[0] = max;
                    r[1] += sum(s);
                }
                let query = (row - first_row) * group + first;
                let accs = &mut partial[query * record + 2..];
                let shape = WeightedSumShape {
                    count,
                    head_dim,
                    weight_stride: TILE,
                    acc_stride: record,
                };
                item.for_each_run(
                    KvPart::Value,
                    tile_start..seen,
                    |first_slot, values, scales| {
                        let weights = &scores[first_slot - tile_start..];
                        K::weighted_sum(weights, values, scales, accs, shape);
                    },
                );
            }
        }
        tile_start = tile_end;
    }
}

/// Adds to `mass` the attention probability each slot receives in this layer, summed over every
/// row and query head, for the step's sequences that track it (H2O). `mass` holds each sequence
/// of the step's [`StepView::slots`] values one after another (all sequences, tracked or not).
/// A second pass over K after [`attention`]: it recomputes each row's scores and softmax in
/// full, the way the reference does, rather than burden the online softmax with them.
pub fn accumulate_mass<E: KvElement>(input: &AttentionInput<E>, mass: &mut [f32]) {
    let step = input.step;
    let head_dim = step.layout.head_dim as usize;
    let num_kv_heads = step.layout.num_kv_heads as usize;
    let group = input.num_heads / num_kv_heads;
    let q_cols = input.num_heads * head_dim;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let mut offset = 0;
    for (index, seq) in step.seqs.iter().enumerate() {
        let slots = step.slots(index);
        if step.track_mass[index] {
            let per_head: Vec<Vec<f32>> = (0..num_kv_heads)
                .into_par_iter()
                .map(|kv_head| {
                    let first_row = seq.first_row as usize;
                    let item = Item {
                        input,
                        seq,
                        slot_pos: step.slot_positions[index].as_deref(),
                        kv_head,
                        group,
                        rows: first_row..first_row + seq.rows as usize,
                        slots: 0..slots,
                    };
                    let mut received = vec![0.0f32; slots];
                    let mut scores = vec![0.0f32; slots];
                    for row in item.rows.clone() {
                        let position = item.position(row);
                        let visible = match item.slot_pos {
                            None => position + 1,
                            Some(_) => slots,
                        };
                        for h in 0..group {
                            let q = &input.q[row * q_cols + (kv_head * group + h) * head_dim..]
                                [..head_dim];
                            let s = &mut scores[..visible];
                            item.for_each_run(KvPart::Key, 0..visible, |first, keys, scales| {
                                let out = &mut s[first..];
                                PlainRuns::<Unfused>::scores(q, 1, keys, scales, scale, out, 0);
                            });
                            if let Some(map) = item.slot_pos {
                                for (x, &p) in s.iter_mut().zip(map) {
                                    if p as usize > position {
                                        *x = f32::NEG_INFINITY;
                                    }
                                }
                            }
                            let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                            s.iter_mut().for_each(|x| *x = exp::<Unfused>(*x - max));
                            let inv = 1.0 / sum(s);
                            for (m, &p) in received.iter_mut().zip(s.iter()) {
                                *m += p * inv;
                            }
                        }
                    }
                    received
                })
                .collect();
            let seq_mass = &mut mass[offset..offset + slots];
            for received in per_head {
                seq_mass.iter_mut().zip(received).for_each(|(m, r)| *m += r);
            }
        }
        offset += slots;
    }
}

/// Instruction set the item kernel runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Isa {
    /// Compiled for the build target (SSE2 on a default x86_64 build).
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2Fma,
}

impl Isa {
    #[cfg(test)]
    const ALL: &'static [Isa] = &[
        Isa::Portable,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma,
    ];

    fn available(self) -> bool {
        match self {
            Isa::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma => has_avx2_fma(),
        }
    }

    /// The fastest instruction set this CPU has.
    fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        if Isa::Avx2Fma.available() {
            return Isa::Avx2Fma;
        }
        Isa::Portable
    }

    fn attend<E: KvElement>(self, item: &Item<E>, partial: &mut [f32], scores: &mut [f32]) {
        match self {
            Isa::Portable => attend_item::<E, Unfused, PlainRuns<Unfused>>(item, partial, scores),
            // SAFETY: Avx2Fma is only chosen where `available` saw AVX2 and FMA on this CPU.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma => unsafe { attend_item_avx2(item, partial, scores) },
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn attend_item_avx2<E: KvElement>(item: &Item<E>, partial: &mut [f32], scores: &mut [f32]) {
    use avx2::Avx2Runs;
    match item.input.step.layout.head_dim {
        16 => attend_item::<E, Fused, Avx2Runs<2>>(item, partial, scores),
        32 => attend_item::<E, Fused, Avx2Runs<4>>(item, partial, scores),
        64 => attend_item::<E, Fused, Avx2Runs<8>>(item, partial, scores),
        128 => attend_item::<E, Fused, Avx2Runs<16>>(item, partial, scores),
        _ => attend_item::<E, Fused, PlainRuns<Fused>>(item, partial, scores),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::write_kv_row;
    use crate::kv::{KvDtype, KvLayout, LayoutKind, RowOffsets, EMPTY_SLOT};

    /// Deterministic values in [-1, 1).
    fn fill(seed: u64, n: usize) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// One sequence of a test step: its first position, its rows, its K/V
    /// `[layers][2][kv_heads][len][hd]` by position (as the cache stores them, once [`build`]
    /// has written them), and, when it has evicted positions, its slot map (the position each
    /// slot holds, EMPTY_SLOT for a freed one; the step's rows included).
    struct TestSeq {
        start: usize,
        rows: usize,
        kv: Vec<f32>,
        map: Option<Vec<u32>>,
    }

    impl TestSeq {
        fn len(&self) -> usize {
            self.start + self.rows
        }

        fn slots(&self) -> usize {
            self.map.as_ref().map_or(self.len(), Vec::len)
        }

        /// The slot holding `pos`, if it is held.
        fn slot_of(&self, pos: usize) -> Option<usize> {
            match &self.map {
                None => Some(pos),
                Some(map) => map.iter().position(|&p| p as usize == pos),
            }
        }
    }

    /// The values a row of the arena holds: codes times scale, decoded one by one (the plain
    /// reference of the kernels' dequantization).
    fn read_kv_row(
        arena: &[u8],
        dtype: KvDtype,
        part: KvPart,
        at: RowOffsets,
        hd: usize,
    ) -> Vec<f32> {
        let codes = &arena[at.codes..at.codes + hd * dtype.code_bytes()];
        let groups = dtype.scales_per_row(part, hd);
        let scales: &[f32] = bytemuck::cast_slice(&arena[at.scale..at.scale + 4 * groups]);
        let scale = |c: usize| scales[c / (hd / groups)];
        match dtype {
            KvDtype::F32 => bytemuck::cast_slice::<u8, f32>(codes).to_vec(),
            KvDtype::Bf16 => bytemuck::cast_slice::<u8, bf16>(codes)
                .iter()
                .map(|c| c.to_f32())
                .collect(),
            KvDtype::Int8 => codes
                .iter()
                .enumerate()
                .map(|(i, &c)| c as i8 as f32 * scale(i))
                .collect(),
            KvDtype::Fp8E4m3 => codes
                .iter()
                .enumerate()
                .map(|(i, &c)| crate::kv::quant::e4m3_decode(c) * scale(i))
                .collect(),
        }
    }

    /// A step over `seqs` in `layout` whose blocks sit in the arena in reverse order (so that a
    /// table lookup that is skipped shows). Each held position's K/V is written at its slot with
    /// the backend's [`write_kv_row`] and read back into `kv` as stored; a freed slot holds a
    /// stale row of large values (a freed slot that is read wins the softmax); every other byte
    /// is 0xFF (NaN as an f32 or bf16 code and as a quantized row's scale), so reading past a
    /// sequence's slots poisons the result. The arena is f32 words, for alignment.
    fn build(layout: KvLayout, seqs: &mut [TestSeq]) -> (StepView, Vec<u32>) {
        let hd = layout.head_dim as usize;
        let heads = layout.num_kv_heads as usize;
        let ct = layout.chunk_tokens();
        // Per sequence: its blocks (chunk ids) and its slots per block.
        let plans: Vec<(usize, usize)> = seqs
            .iter()
            .map(|s| match layout.kind() {
                // A run with some spare room, in chunk units.
                LayoutKind::Contiguous => {
                    let run = (s.slots() + 3).div_ceil(ct);
                    (run, run * ct)
                }
                LayoutKind::Chunked => (s.slots().div_ceil(ct), ct),
            })
            .collect();
        let total: usize = plans.iter().map(|p| p.0).sum();
        let mut view = StepView::empty(layout);
        let mut next = total;
        for (index, (s, &(chunks, block_tokens))) in seqs.iter().zip(&plans).enumerate() {
            next -= chunks;
            view.seqs.push(SeqStep {
                first_row: view.row_pos.len() as u32,
                rows: s.rows as u32,
                start: s.start as u32,
                table_start: view.block_table.len() as u32,
                block_tokens: block_tokens as u32,
            });
            match layout.kind() {
                LayoutKind::Contiguous => view.block_table.push(next as u32),
                LayoutKind::Chunked => view
                    .block_table
                    .extend((0..chunks).rev().map(|c| (next + c) as u32)),
            }
            view.row_seq
                .extend(std::iter::repeat_n(index as u32, s.rows));
            view.row_pos.extend((s.start..s.len()).map(|p| p as u32));
            view.row_slot
                .extend((s.start..s.len()).map(|p| s.slot_of(p).unwrap() as u32));
            view.slot_positions.push(s.map.clone());
            view.track_mass.push(true);
        }
        let mut arena = vec![u32::MAX; total * layout.chunk_bytes() / 4];
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut arena);
        let stale_key = vec![3.0; hd];
        let stale_value = vec![1e3; hd];
        for (s, seq) in seqs.iter_mut().zip(&view.seqs) {
            for layer in 0..layout.num_layers as usize {
                for (p, part) in [KvPart::Key, KvPart::Value].into_iter().enumerate() {
                    for head in 0..heads {
                        for slot in 0..s.slots() {
                            let at = view.row_offsets(seq, layer, part, head, slot);
                            let pos = match &s.map {
                                None => slot,
                                Some(map) if map[slot] != EMPTY_SLOT => map[slot] as usize,
                                Some(_) => {
                                    let stale = [&stale_key, &stale_value][p];
                                    write_kv_row(bytes, layout.dtype(), part, at, stale);
                                    continue;
                                }
                            };
                            let src = (((layer * 2 + p) * heads + head) * s.len() + pos) * hd;
                            let row = &mut s.kv[src..src + hd];
                            write_kv_row(bytes, layout.dtype(), part, at, row);
                            let stored = read_kv_row(bytes, layout.dtype(), part, at, hd);
                            row.copy_from_slice(&stored);
                        }
                    }
                }
            }
        }
        (view, arena)
    }

    /// Two-pass softmax attention in f64 straight from the definition, for one sequence: each
    /// row over the held positions up to its own. Returns the output `[rows, heads * hd]` and
    /// the probability mass each slot received, summed over rows and heads.
    fn reference(
        q: &[f32],
        s: &TestSeq,
        layer: usize,
        heads: usize,
        kv_heads: usize,
        hd: usize,
    ) -> (Vec<f32>, Vec<f64>) {
        let group = heads / kv_heads;
        let len = s.len();
        let row_of = |part: usize, head: usize, pos: usize| {
            let at = (((layer * 2 + part) * kv_heads + head) * len + pos) * hd;
            &s.kv[at..at + hd]
        };
        let mut out = vec![0.0f32; s.rows * heads * hd];
        let mut mass = vec![0.0f64; s.slots()];
        for r in 0..s.rows {
            let visible: Vec<usize> = (0..=s.start + r)
                .filter(|&pos| s.slot_of(pos).is_some())
                .collect();
            for h in 0..heads {
                let qv = &q[(r * heads + h) * hd..][..hd];
                let scores: Vec<f64> = visible
                    .iter()
                    .map(|&pos| {
                        let k = row_of(0, h / group, pos);
                        qv.iter()
                            .zip(k)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 = weights.iter().sum();
                for (&pos, w) in visible.iter().zip(&weights) {
                    mass[s.slot_of(pos).unwrap()] += w / sum;
                }
                for d in 0..hd {
                    let v: f64 = visible
                        .iter()
                        .zip(&weights)
                        .map(|(&pos, w)| w * row_of(1, h / group, pos)[d] as f64)
                        .sum();
                    out[(r * heads + h) * hd + d] = (v / sum) as f32;
                }
            }
        }
        (out, mass)
    }

    /// Attention of `shapes` (start, rows) in one step against the f64 reference, for every
    /// plan and instruction set.
    fn check(
        group: usize,
        hd: usize,
        kind: LayoutKind,
        chunk: usize,
        dtype: KvDtype,
        shapes: &[(usize, usize)],
        plans: &[Vec<AttentionPlan>],
    ) {
        let shapes: Vec<_> = shapes
            .iter()
            .map(|&(start, rows)| (start, rows, None))
            .collect();
        check_with_maps(group, hd, kind, chunk, dtype, &shapes, plans);
    }

    /// [`check`] for sequences that may have slot maps, (start, rows, map); also checks the
    /// attention mass of every slot against the reference's.
    fn check_with_maps(
        group: usize,
        hd: usize,
        kind: LayoutKind,
        chunk: usize,
        dtype: KvDtype,
        shapes: &[(usize, usize, Option<Vec<u32>>)],
        plans: &[Vec<AttentionPlan>],
    ) {
        let (layers, kv_heads, layer) = (2, 2, 1);
        let heads = kv_heads * group;
        let layout = KvLayout::new(kind, dtype, layers, kv_heads, hd, chunk).unwrap();
        let mut seqs: Vec<TestSeq> = shapes
            .iter()
            .enumerate()
            .map(|(i, (start, rows, map))| TestSeq {
                start: *start,
                rows: *rows,
                kv: fill(11 + i as u64, layers * 2 * kv_heads * (start + rows) * hd),
                map: map.clone(),
            })
            .collect();
        let (step, arena) = build(layout, &mut seqs);
        let rows: usize = shapes.iter().map(|s| s.1).sum();
        // Scaled so that softmaxes are peaked: a wrong max or rescale shows.
        let q: Vec<f32> = fill(7, rows * heads * hd).iter().map(|x| 4.0 * x).collect();
        let mut want = Vec::new();
        let mut want_mass = Vec::new();
        let mut first = 0;
        for s in &seqs {
            let q_seq = &q[first * heads * hd..(first + s.rows) * heads * hd];
            let (out, mass) = reference(q_seq, s, layer, heads, kv_heads, hd);
            want.extend(out);
            want_mass.extend(mass);
            first += s.rows;
        }
        let arena: &[u8] = bytemuck::cast_slice(&arena);
        let (q, step) = (q.as_slice(), &step);
        let context = format!("group {group} head_dim {hd} {kind:?} chunk {chunk} {dtype}");
        let run = |out: &mut Vec<f32>, mass: &mut Vec<f32>, isa: Isa, plans: &[AttentionPlan]| {
            fn go<E: KvElement>(
                isa: Isa,
                input: AttentionInput<E>,
                plans: &[AttentionPlan],
                out: &mut [f32],
                mass: &mut [f32],
            ) {
                attention_with(isa, &input, plans, out);
                accumulate_mass(&input, mass);
            }
            match dtype {
                KvDtype::F32 => {
                    let input = AttentionInput::<f32>::new(q, arena, step, layer, heads);
                    go(isa, input, plans, out, mass)
                }
                KvDtype::Bf16 => {
                    let input = AttentionInput::<bf16>::new(q, arena, step, layer, heads);
                    go(isa, input, plans, out, mass)
                }
                KvDtype::Int8 => {
                    let input = AttentionInput::<i8>::new(q, arena, step, layer, heads);
                    go(isa, input, plans, out, mass)
                }
                KvDtype::Fp8E4m3 => {
                    let input = AttentionInput::<E4m3>::new(q, arena, step, layer, heads);
                    go(isa, input, plans, out, mass)
                }
            }
        };
        for (plan, isa) in plans
            .iter()
            .flat_map(|p| Isa::ALL.iter().map(move |i| (p, *i)))
        {
            if !isa.available() {
                continue;
            }
            let mut out = vec![f32::NAN; rows * heads * hd];
            let mut mass = vec![0.0; want_mass.len()];
            run(&mut out, &mut mass, isa, plan);
            let diff = out
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(
                    0.0f32,
                    |m, d| if d.is_nan() { f32::INFINITY } else { m.max(d) },
                );
            assert!(
                diff <= 2e-5,
                "{context} {shapes:?} {plan:?} {isa:?}: differs by {diff}"
            );
            let mass_diff = mass
                .iter()
                .zip(&want_mass)
                .map(|(a, b)| (*a as f64 - b).abs())
                .fold(
                    0.0f64,
                    |m, d| if d.is_nan() { f64::INFINITY } else { m.max(d) },
                );
            // Each (row, head) adds probabilities that sum to 1, each within about 1e-6.
            assert!(
                mass_diff <= 1e-6 * (rows * heads) as f64,
                "{context} {shapes:?}: attention mass differs by {mass_diff}"
            );
        }
    }

    /// The planner's plans and a few forced ones, the same for every sequence.
    fn plans_for(shapes: &[(usize, usize)]) -> Vec<Vec<AttentionPlan>> {
        let forced = [(16, 1), (5, 3), (1, 7), (64, 2)];
        let visible = |s: &(usize, usize)| s.0 + s.1;
        let mut plans = vec![shapes
            .iter()
            .map(|s| AttentionPlan::for_shape(s.1, visible(s), 2, 2))
            .collect()];
        plans.extend(
            forced.iter().map(|&(row_block, splits)| {
                vec![AttentionPlan { row_block, splits }; shapes.len()]
            }),
        );
        plans
    }

    #[test]
    fn matches_the_reference_on_awkward_shapes() {
        // (start, rows): decode at contexts 1, 7, 300; prefills of 1, 7 and 37 rows from
        // scratch and after 300 positions.
        let shapes = [
            (0, 1),
            (6, 1),
            (299, 1),
            (0, 7),
            (0, 37),
            (300, 37),
            (263, 37),
        ];
        for group in [1, 3, 4, 9] {
            for hd in [12, 16, 32, 64, 128] {
                for (kind, chunk) in [
                    (LayoutKind::Contiguous, 1),
                    (LayoutKind::Contiguous, 16),
                    (LayoutKind::Chunked, 1),
                    (LayoutKind::Chunked, 5),
                    (LayoutKind::Chunked, 16),
                    (LayoutKind::Chunked, 1024),
                ] {
                    for shape in shapes {
                        // int8 key rows are whole groups of 16 channels.
                        let dtype = match KvDtype::ALL[(group + hd + chunk) % 4] {
                            KvDtype::Int8 if hd % 16 != 0 => KvDtype::Fp8E4m3,
                            dtype => dtype,
                        };
                        check(
                            group,
                            hd,
                            kind,
                            chunk,
                            dtype,
                            &[shape],
                            &plans_for(&[shape]),
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn every_element_type_in_both_layouts() {
        for dtype in KvDtype::ALL {
            for (kind, chunk) in [(LayoutKind::Contiguous, 1), (LayoutKind::Chunked, 7)] {
                for shape in [(0, 5), (130, 1), (70, 19)] {
                    check(4, 64, kind, chunk, dtype, &[shape], &plans_for(&[shape]));
                    check(3, 32, kind, chunk, dtype, &[shape], &plans_for(&[shape]));
                }
            }
        }
    }

    #[test]
    fn a_step_of_several_sequences_keeps_each_to_its_own() {
        // Decode rows and prefill chunks of ragged lengths, chunk boundaries mid-step.
        let shapes = [(0, 3), (40, 1), (17, 9), (600, 1), (5, 16)];
        for (kind, chunk) in [(LayoutKind::Contiguous, 1), (LayoutKind::Chunked, 8)] {
            for dtype in KvDtype::ALL {
                check(4, 32, kind, chunk, dtype, &shapes, &plans_for(&shapes));
            }
        }
    }

    /// A slot map of a sequence of `len` positions that holds those `kept` names: the held
    /// positions in a scrambled slot order, `gap` freed slots first and one after every seventh.
    fn scattered_map(len: usize, kept: impl Fn(usize) -> bool, gap: usize) -> Vec<u32> {
        let mut held: Vec<u32> = (0..len as u32).filter(|&p| kept(p as usize)).collect();
        let n = held.len();
        // A fixed permutation: a prime stride through the held positions that does not divide
        // their count.
        let stride = [5, 7, 11, 13]
            .into_iter()
            .find(|p| !n.is_multiple_of(*p))
            .unwrap();
        held = (0..n).map(|i| held[(i * stride) % n]).collect();
        let mut map = vec![EMPTY_SLOT; gap];
        for (i, p) in held.into_iter().enumerate() {
            map.push(p);
            if i % 7 == 6 {
                map.push(EMPTY_SLOT);
            }
        }
        map
    }

    #[test]
    fn slot_maps_hide_freed_slots_and_the_steps_later_rows() {
        // (start, rows, which positions are held): decode after a window and after sinks +
        // window; a step of 5 rows into freed and new slots; a long context with a run of freed
        // slots longer than a tile; H2O-like scattered holes.
        type Held = Box<dyn Fn(usize) -> bool>;
        let cases: Vec<(usize, usize, Held)> = vec![
            (22, 1, Box::new(|p| p >= 12)),
            (22, 1, Box::new(|p| !(2..15).contains(&p))),
            (18, 5, Box::new(|p| p % 3 != 1 || p >= 18)),
            (300, 1, Box::new(|p| !(4..200).contains(&p))),
            (260, 40, Box::new(|p| p % 5 != 0 || p >= 260)),
        ];
        for (kind, chunk) in [
            (LayoutKind::Contiguous, 1),
            (LayoutKind::Chunked, 4),
            (LayoutKind::Chunked, 16),
        ] {
            for dtype in KvDtype::ALL {
                for (start, rows, kept) in &cases {
                    let gap = if *start >= 260 { 70 } else { 2 };
                    let map = scattered_map(start + rows, kept, gap);
                    let shape = [(*start, *rows, Some(map))];
                    let plans = plans_for(&[(*start, *rows)]);
                    check_with_maps(3, 32, kind, chunk, dtype, &shape, &plans);
                }
            }
        }
        // Beside a sequence without a map, in one step.
        let map = scattered_map(41, |p| p >= 20, 3);
        let shapes = [(0, 6, None), (40, 1, Some(map)), (17, 9, None)];
        let plans = plans_for(&[(0, 6), (40, 1), (17, 9)]);
        check_with_maps(
            4,
            64,
            LayoutKind::Chunked,
            8,
            KvDtype::Int8,
            &shapes,
            &plans,
        );
    }

    #[test]
    fn plans_split_long_decodes_only() {
        // Llama-3.2-1B decode on 2 threads: 8 KV heads; the 8k context is split in two.
        assert_eq!(
            AttentionPlan::for_shape(1, 8192, 8, 2),
            AttentionPlan {
                row_block: 1,
                splits: 2
            }
        );
        assert_eq!(
            AttentionPlan::for_shape(1, 256, 8, 2),
            AttentionPlan {
                row_block: 1,
                splits: 1
            }
        );
        // Prefill of 512 rows: 32 blocks × 8 heads is enough work.
        assert_eq!(
            AttentionPlan::for_shape(512, 512, 8, 2),
            AttentionPlan {
                row_block: 16,
                splits: 1
            }
        );
        // 16 threads, one KV head: as many splits as MIN_SPLIT allows.
        assert_eq!(AttentionPlan::for_shape(1, 2048, 1, 16).splits, 4);
    }
}
