//! Causal GQA attention on the CPU, over the chunks of a [`KvLayout`] (one chunk for the static
//! cache, a chunk table for the dynamic one).
//!
//! A call is cut into items (KV head, block of query rows, split of the context). An item runs an
//! online softmax (running max `m`, running sum `l`, unnormalised output `acc`) for every query
//! head of its KV head and every row of its block over its positions, tile by tile: each K and V
//! row is loaded once and used by all of the item's queries while it is in L1 (GQA-aware). The
//! results are partial softmaxes; a second pass merges the splits of each (row, head) and
//! normalises. Prefill has many row blocks and one split; decode has one row block and, once the
//! context is long, several splits so that every core streams a part of it (flash-decoding).
//!
//! The inner loops over a run of positions ([`RunKernels`]) are plain Rust that LLVM vectorises;
//! on x86_64 with AVX2 + FMA the item kernel is compiled a second time with those features and
//! picked at run time, with hand-written run kernels (`avx2.rs`) for head_dim 16, 32, 64, 128.

use super::simd::{exp, has_avx2_fma, Fused, MulAdd, Unfused};
#[cfg(target_arch = "x86_64")]
mod avx2;
use crate::kv::{KvLayout, KvPart};
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

/// One attention call: the step's queries against a layer of the cache.
pub struct AttentionInput<'a> {
    /// `[rows, num_heads * head_dim]` row-major; row r is at position `start + r`.
    pub q: &'a [f32],
    /// The chunk table: chunk i holds positions `i * chunk_tokens ..`, each chunk
    /// `layout.chunk_elems()` elements.
    pub chunks: &'a [Vec<f32>],
    pub layout: KvLayout,
    pub layer: usize,
    pub num_heads: usize,
    /// Position of the first query row.
    pub start: usize,
    pub rows: usize,
}

/// How a call's work is cut into items.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionPlan {
    /// Query rows per item (the last block may hold fewer).
    pub row_block: usize,
    /// Items that share the context of one (KV head, row block) between them.
    pub splits: usize,
}

impl AttentionPlan {
    /// The plan for `rows` query rows whose last one sees `visible` positions, on `threads`
    /// threads: row blocks of [`ROW_BLOCK`], then context splits until there are
    /// [`ITEMS_PER_THREAD`] items per thread or splits would fall under [`MIN_SPLIT`] positions.
    pub fn for_shape(rows: usize, visible: usize, num_kv_heads: usize, threads: usize) -> Self {
        let row_block = rows.clamp(1, ROW_BLOCK);
        let items = rows.div_ceil(row_block) * num_kv_heads.max(1);
        let wanted = ITEMS_PER_THREAD * threads.max(1);
        let splits = if items >= wanted {
            1
        } else {
            wanted.div_ceil(items).min(visible / MIN_SPLIT).max(1)
        };
        AttentionPlan { row_block, splits }
    }
}

/// out = softmax(q·Kᵀ / sqrt(head_dim), causal) · V for every row and head.
/// `out`: `[rows, num_heads * head_dim]` row-major. The caller has checked the shapes (the
/// backend's `attention` does) and that the chunks cover positions `..start + rows`.
pub fn attention(input: &AttentionInput, plan: AttentionPlan, out: &mut [f32]) {
    attention_with(Isa::detect(), input, plan, out)
}

fn attention_with(isa: Isa, input: &AttentionInput, plan: AttentionPlan, out: &mut [f32]) {
    let layout = input.layout;
    let head_dim = layout.head_dim as usize;
    let num_kv_heads = layout.num_kv_heads as usize;
    let group = input.num_heads / num_kv_heads;
    let q_cols = input.num_heads * head_dim;
    let row_block = plan.row_block.max(1);
    let splits = plan.splits.max(1);
    let blocks = input.rows.div_ceil(row_block);
    // An item's partial results: per (row of its block, head of its group) a record
    // [m, l, acc[head_dim]].
    let record = head_dim + 2;
    let item_elems = row_block * group * record;
    let items = blocks * num_kv_heads * splits;

    let mut partials = PARTIALS.take();
    partials.clear();
    partials.resize(items * item_elems, 0.0);
    // Item index = (block * num_kv_heads + kv_head) * splits + split.
    partials
        .par_chunks_mut(item_elems)
        .enumerate()
        .for_each(|(item, partial)| {
            let split = item % splits;
            let kv_head = item / splits % num_kv_heads;
            let block = item / splits / num_kv_heads;
            let first_row = block * row_block;
            let end_row = (first_row + row_block).min(input.rows);
            // The block's last row sees the most positions; the splits share those, in whole
            // tiles.
            let visible = input.start + end_row;
            let split_len = visible.div_ceil(splits).next_multiple_of(TILE);
            let positions =
                (split * split_len).min(visible)..((split + 1) * split_len).min(visible);
            let work = Item {
                input,
                kv_head,
                group,
                rows: first_row..end_row,
                positions,
            };
            let mut scores = SCORES.take();
            scores.resize(TILE, 0.0);
            isa.attend(&work, partial, &mut scores);
            SCORES.set(scores);
        });

    // Merge the splits of each (row, head): rescale each partial to the common max, add, divide.
    out[..input.rows * q_cols]
        .par_chunks_mut(q_cols)
        .enumerate()
        .for_each(|(row, out_row)| {
            let (block, row_in_block) = (row / row_block, row % row_block);
            for (head, out_head) in out_row.chunks_exact_mut(head_dim).enumerate() {
                let (kv_head, head_in_group) = (head / group, head % group);
                let first_item = (block * num_kv_heads + kv_head) * splits;
                let records = (0..splits).map(|split| {
                    let at = (first_item + split) * item_elems
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
                    axpy::<Unfused>(out_head, weight, &r[2..]);
                }
                // Row `row` always sees position 0, so sum > 0.
                let inv = 1.0 / sum;
                out_head.iter_mut().for_each(|o| *o *= inv);
            }
        });
    PARTIALS.set(partials);
}

thread_local! {
    /// Per-thread scores of the query in progress over one tile, `[TILE]`; kept between calls.
    static SCORES: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    /// The calling thread's partial results of a call; kept between calls.
    static PARTIALS: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// The work of one item: the `group` query heads of `kv_head`, for `rows`, over `positions`.
struct Item<'a> {
    input: &'a AttentionInput<'a>,
    kv_head: usize,
    group: usize,
    rows: std::ops::Range<usize>,
    positions: std::ops::Range<usize>,
}

impl Item<'_> {
    fn queries(&self) -> usize {
        self.rows.len() * self.group
    }

    /// Calls `f(first_pos, rows)` for each run of `range` that lies in one chunk, with that run's
    /// `[n, head_dim]` rows of (layer, part, kv_head).
    #[inline(always)]
    fn for_each_run(
        &self,
        part: KvPart,
        range: std::ops::Range<usize>,
        mut f: impl FnMut(usize, &[f32]),
    ) {
        let layout = &self.input.layout;
        let head_dim = layout.head_dim as usize;
        let mut pos = range.start;
        while pos < range.end {
            let (chunk, slot) = layout.locate(pos);
            let n = (layout.chunk_tokens as usize - slot).min(range.end - pos);
            let at = layout.offset_in_chunk(self.input.layer, part, self.kv_head, slot);
            f(pos, &self.input.chunks[chunk][at..at + n * head_dim]);
            pos += n;
        }
    }
}

/// Independent partial sums of the dot product: two vectors of 8 lanes (AVX2), enough to hide
/// the latency of the adds.
const DOT_LANES: usize = 16;

/// Σ a[i]·b[i] over equal-length slices.
#[inline(always)]
fn dot<M: MulAdd>(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; DOT_LANES];
    let (a_main, a_tail) = a.split_at(a.len() / DOT_LANES * DOT_LANES);
    let (b_main, b_tail) = b.split_at(a_main.len());
    for (x, y) in a_main
        .chunks_exact(DOT_LANES)
        .zip(b_main.chunks_exact(DOT_LANES))
    {
        for i in 0..DOT_LANES {
            lanes[i] = M::mul_add(x[i], y[i], lanes[i]);
        }
    }
    let mut tail_sum = 0.0;
    for (x, y) in a_tail.iter().zip(b_tail) {
        tail_sum = M::mul_add(*x, *y, tail_sum);
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
fn axpy<M: MulAdd>(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y = M::mul_add(a, *x, *y);
    }
}

/// The two inner loops of an item, over one run of positions that lie in one chunk.
trait RunKernels {
    /// out[i] = scale · q · keys[i] for each of the run's `[out.len(), head_dim]` keys.
    fn scores(q: &[f32], keys: &[f32], scale: f32, out: &mut [f32]);
    /// acc += Σ_i weights[i] · values[i] over the run's `[weights.len(), head_dim]` values.
    fn weighted_sum(weights: &[f32], values: &[f32], acc: &mut [f32]);
}

/// The loops in plain Rust (any head_dim): a dot product per key, an axpy per value.
struct PlainRuns<M>(std::marker::PhantomData<M>);

impl<M: MulAdd> RunKernels for PlainRuns<M> {
    #[inline(always)]
    fn scores(q: &[f32], keys: &[f32], scale: f32, out: &mut [f32]) {
        for (o, key) in out.iter_mut().zip(keys.chunks_exact(q.len())) {
            *o = dot::<M>(q, key) * scale;
        }
    }

    #[inline(always)]
    fn weighted_sum(weights: &[f32], values: &[f32], acc: &mut [f32]) {
        for (&w, value) in weights.iter().zip(values.chunks_exact(acc.len())) {
            axpy::<M>(acc, w, value);
        }
    }
}

/// The item kernel: fills `partial` (`[queries][m, l, acc[head_dim]]`, query = row_in_block *
/// group + head_in_group) with the online softmax of the item's queries over its positions.
/// `scores`: `[TILE]` scratch.
///
/// Tile by tile, one query at a time: its scores against the tile's keys, the online softmax
/// update, then its weighted sum of the tile's values. A tile of K (or V) rows stays in L1 while
/// all of the item's queries use it; each query reads only the positions it sees (causal).
#[inline(always)]
fn attend_item<M: MulAdd, K: RunKernels>(item: &Item, partial: &mut [f32], scores: &mut [f32]) {
    let input = item.input;
    let head_dim = input.layout.head_dim as usize;
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

    let mut tile_start = item.positions.start;
    while tile_start < item.positions.end {
        let tile_end = (tile_start + TILE).min(item.positions.end);
        for row in item.rows.clone() {
            // Positions tile_start..seen of the tile are visible to this row.
            let seen = (input.start + row + 1).min(tile_end);
            if seen <= tile_start {
                continue;
            }
            let q_row = &input.q[row * q_cols..][..q_cols];
            for h in 0..group {
                let query = (row - first_row) * group + h;
                let q = &q_row[(first_head + h) * head_dim..][..head_dim];
                let s = &mut scores[..seen - tile_start];
                item.for_each_run(KvPart::Key, tile_start..seen, |first_pos, keys| {
                    let at = first_pos - tile_start;
                    K::scores(q, keys, scale, &mut s[at..at + keys.len() / head_dim]);
                });

                // Online softmax: fold the tile into the running max and sum; the scores become
                // the tile's weights exp(s - m).
                let r = &mut partial[query * record..][..record];
                let tile_max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let max = r[0].max(tile_max);
                let rescale = exp::<M>(r[0] - max);
                if rescale != 1.0 {
                    r[1] *= rescale;
                    r[2..].iter_mut().for_each(|a| *a *= rescale);
                }
                s.iter_mut().for_each(|x| *x = exp::<M>(*x - max));
                r[0] = max;
                r[1] += sum(s);

                let acc = &mut r[2..];
                item.for_each_run(KvPart::Value, tile_start..seen, |first_pos, values| {
                    let at = first_pos - tile_start;
                    K::weighted_sum(&s[at..at + values.len() / head_dim], values, acc);
                });
            }
        }
        tile_start = tile_end;
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

    fn attend(self, item: &Item, partial: &mut [f32], scores: &mut [f32]) {
        match self {
            Isa::Portable => attend_item::<Unfused, PlainRuns<Unfused>>(item, partial, scores),
            // SAFETY: Avx2Fma is only chosen where `available` saw AVX2 and FMA on this CPU.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma => unsafe { attend_item_avx2(item, partial, scores) },
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn attend_item_avx2(item: &Item, partial: &mut [f32], scores: &mut [f32]) {
    use avx2::Avx2Runs;
    match item.input.layout.head_dim {
        16 => attend_item::<Fused, Avx2Runs<2>>(item, partial, scores),
        32 => attend_item::<Fused, Avx2Runs<4>>(item, partial, scores),
        64 => attend_item::<Fused, Avx2Runs<8>>(item, partial, scores),
        128 => attend_item::<Fused, Avx2Runs<16>>(item, partial, scores),
        _ => attend_item::<Fused, PlainRuns<Fused>>(item, partial, scores),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// A chunk table whose written positions `..len` hold `kv(layer, part, head, pos)` and whose
    /// other slots hold NaN, so reading past the causal limit poisons the result.
    fn build_chunks(layout: &KvLayout, len: usize, kv: &[f32]) -> Vec<Vec<f32>> {
        let hd = layout.head_dim as usize;
        let heads = layout.num_kv_heads as usize;
        let mut chunks =
            vec![vec![f32::NAN; layout.chunk_elems()]; len.div_ceil(layout.chunk_tokens as usize)];
        for layer in 0..layout.num_layers as usize {
            for (p, part) in [KvPart::Key, KvPart::Value].into_iter().enumerate() {
                for head in 0..heads {
                    for pos in 0..len {
                        let (c, slot) = layout.locate(pos);
                        let at = layout.offset_in_chunk(layer, part, head, slot);
                        let src = (((layer * 2 + p) * heads + head) * len + pos) * hd;
                        chunks[c][at..at + hd].copy_from_slice(&kv[src..src + hd]);
                    }
                }
            }
        }
        chunks
    }

    /// Two-pass softmax attention in f64 straight from the definition.
    fn reference(
        q: &[f32],
        kv: &[f32],
        layer: usize,
        heads: usize,
        kv_heads: usize,
        hd: usize,
        len: usize,
        start: usize,
        rows: usize,
    ) -> Vec<f32> {
        let group = heads / kv_heads;
        let row_of = |part: usize, head: usize, pos: usize| {
            let at = (((layer * 2 + part) * kv_heads + head) * len + pos) * hd;
            &kv[at..at + hd]
        };
        let mut out = vec![0.0f32; rows * heads * hd];
        for r in 0..rows {
            for h in 0..heads {
                let qv = &q[(r * heads + h) * hd..][..hd];
                let visible = start + r + 1;
                let scores: Vec<f64> = (0..visible)
                    .map(|pos| {
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
                for d in 0..hd {
                    let v: f64 = (0..visible)
                        .map(|pos| weights[pos] * row_of(1, h / group, pos)[d] as f64)
                        .sum();
                    out[(r * heads + h) * hd + d] = (v / sum) as f32;
                }
            }
        }
        out
    }

    fn check(
        group: usize,
        hd: usize,
        chunk: usize,
        start: usize,
        rows: usize,
        plans: &[AttentionPlan],
    ) {
        let (layers, kv_heads, layer) = (2, 2, 1);
        let heads = kv_heads * group;
        let len = start + rows;
        let layout = KvLayout {
            num_layers: layers as u32,
            num_kv_heads: kv_heads as u32,
            head_dim: hd as u32,
            chunk_tokens: chunk as u32,
        };
        // Scaled so that softmaxes are peaked: a wrong max or rescale shows.
        let q: Vec<f32> = fill(7, rows * heads * hd).iter().map(|x| 4.0 * x).collect();
        let kv = fill(11, layers * 2 * kv_heads * len * hd);
        let chunks = build_chunks(&layout, len, &kv);
        let want = reference(&q, &kv, layer, heads, kv_heads, hd, len, start, rows);
        let input = AttentionInput {
            q: &q,
            chunks: &chunks,
            layout,
            layer,
            num_heads: heads,
            start,
            rows,
        };
        for (&plan, isa) in plans
            .iter()
            .flat_map(|p| Isa::ALL.iter().map(move |i| (p, *i)))
        {
            if !isa.available() {
                continue;
            }
            let mut out = vec![f32::NAN; rows * heads * hd];
            attention_with(isa, &input, plan, &mut out);
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
                "group {group} head_dim {hd} chunk {chunk} start {start} rows {rows} {plan:?} \
                 {isa:?}: \
                 differs by {diff}"
            );
        }
    }

    #[test]
    fn matches_the_reference_on_awkward_shapes() {
        for group in [1, 3, 4, 9] {
            for hd in [12, 16, 32, 64, 128] {
                for chunk in [1, 5, 16, 1024] {
                    // (start, rows): decode at contexts 1, 7, 300; prefills of 1, 7 and 37
                    // rows from scratch and after 300 positions.
                    for (start, rows) in [
                        (0, 1),
                        (6, 1),
                        (299, 1),
                        (0, 7),
                        (0, 37),
                        (300, 37),
                        (263, 37),
                    ] {
                        let visible = start + rows;
                        let plans = [
                            AttentionPlan::for_shape(rows, visible, 2, 2),
                            AttentionPlan {
                                row_block: 16,
                                splits: 1,
                            },
                            AttentionPlan {
                                row_block: 5,
                                splits: 3,
                            },
                            AttentionPlan {
                                row_block: 1,
                                splits: 7,
                            },
                            AttentionPlan {
                                row_block: 64,
                                splits: 2,
                            },
                        ];
                        check(group, hd, chunk, start, rows, &plans);
                    }
                }
            }
        }
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
