//! Typed launches of kernels/*.cu: each function knows its kernel's grid, block and shared
//! memory and takes device addresses (`buffer.ptr() + byte offset`) and sizes. The kernels'
//! own constants (threads per block, tile sizes, limits: the integer `#define`s of kernels/*.cu
//! and *.cuh) come from [`constants`], which build.rs generates from the sources, so nothing
//! here copies them; the constants below are the launch's own choices, which the kernels read
//! from `blockDim` / `gridDim`.

use super::backend::CudaBackend;
use super::device::{KernelArg, LaunchConfig, KERNELS};
use crate::kv::quant::{
    E4M3_MAX, E4M3_MAX_CODE, E4M3_NAN_CODE, E4M3_TO_F32_EXPONENT_SHIFT, INT8_KEY_GROUP,
    INT8_MAX_CODE,
};
use crate::kv::{KvDtype, KvLayout, KvPart, LayoutKind, StepView};
use anyhow::{bail, ensure, Context, Result};
use constants::*;

/// The integer `#define`s of kernels/*.cu and *.cuh, as build.rs found them (one namespace).
pub mod constants {
    #![allow(unused_parens)]
    include!(concat!(env!("OUT_DIR"), "/kernel_constants.rs"));
}

// The kernels test `layout.kind`, `layout.dtype` and parts against these values, and quantize
// with kernels/kv_quant.cuh's copies of src/kv/quant.rs's numbers.
const _: () = {
    assert!(LayoutKind::Contiguous as usize == KV_LAYOUT_CONTIGUOUS);
    assert!(LayoutKind::Chunked as usize == KV_LAYOUT_CHUNKED);
    assert!(KvDtype::F32 as usize == KV_DTYPE_F32);
    assert!(KvDtype::Bf16 as usize == KV_DTYPE_BF16);
    assert!(KvDtype::Int8 as usize == KV_DTYPE_INT8);
    assert!(KvDtype::Fp8E4m3 as usize == KV_DTYPE_FP8_E4M3);
    assert!(KvPart::Key as usize == KV_PART_KEY && KvPart::Value as usize == KV_PART_VALUE);
    assert!(INT8_KEY_GROUP == KV_INT8_KEY_GROUP);
    assert!(INT8_MAX_CODE == KV_INT8_MAX_CODE as f32 && E4M3_MAX == KV_E4M3_MAX as f32);
    assert!(E4M3_MAX_CODE as usize == KV_E4M3_MAX_CODE);
    assert!(E4M3_NAN_CODE as usize == KV_E4M3_NAN_CODE);
    assert!(E4M3_TO_F32_EXPONENT_SHIFT as usize == KV_E4M3_TO_F32_EXPONENT_SHIFT);
};

/// A size as a kernel's `int` argument.
fn int(value: usize, what: &str) -> Result<KernelArg> {
    i32::try_from(value)
        .map(KernelArg::I32)
        .ok()
        .with_context(|| format!("{what} = {value} does not fit a kernel's int argument"))
}

fn blocks(count: usize, what: &str) -> Result<u32> {
    u32::try_from(count.max(1))
        .ok()
        .with_context(|| format!("{what}: {count} blocks are more than a grid holds"))
}

// Threads per block of the kernels that take any block size (embedding.cu's copies, rope.cu,
// kv_cache.cu, activation.cu).
const COPY_THREADS: usize = 256;
const ELEMENTWISE_THREADS: usize = 256;
/// Most blocks of argmax: 64 x 256 threads cover a 128k vocabulary in 8 strides.
pub const ARGMAX_PARTIALS: usize = 64;

/// The launch of a kernel that quantizes `rows` head_dim rows, one warp each (kv_cache.cu).
fn quantizing_launch(rows: usize, what: &str) -> Result<LaunchConfig> {
    let grid = blocks(rows.div_ceil(KV_QUANT_WARPS), what)?;
    Ok(LaunchConfig::linear(grid, KV_QUANT_THREADS as u32, 0))
}

/// A KV arena as the kernels take it: its address and, by value, its layout.
#[derive(Clone, Copy)]
pub(super) struct KvArena {
    pub address: u64,
    pub layout: KvLayout,
}

/// A step view as the kernels take it: the address of its packed words in device memory
/// (`StepView::packed`) and the counts that locate its parts.
#[derive(Clone, Copy)]
pub(super) struct DeviceStep {
    pub address: u64,
    pub num_seqs: usize,
    pub rows: usize,
}

impl DeviceStep {
    fn args(&self) -> Result<[KernelArg; 2]> {
        Ok([
            int(self.num_seqs, "step sequences")?,
            int(self.rows, "step rows")?,
        ])
    }
}

/// Device scratch of decode attention: `acc` `[num_seqs, num_heads, splits, head_dim]` f32,
/// `max_sum` `[num_seqs, num_heads, splits, 2]` f32 (splits: the grid's), `split_counters` one
/// zeroed u32 per block of the grid's (y, z) plane.
#[derive(Clone, Copy)]
pub(super) struct DecodePartials {
    pub acc: u64,
    pub max_sum: u64,
    pub split_counters: u64,
}

/// Positions per split that decode attention aims at once a sequence is long enough for 32
/// splits of them: the split count doubles with the context from 4096 positions.
const DECODE_SPLIT_POSITIONS: usize = 128;

/// The most splits of decode attention (its grid's x) for a step whose longest one-row sequence
/// holds `kv_len` positions: 32 up to 4096 positions, 64 up to 8192, then DECODE_MAX_SPLITS
/// (128): splits of at most 128 positions up to 16k, 256 at 32k. Short sequences use fewer of
/// the grid's splits (at least DECODE_SPLIT_QUANTUM positions each).
pub(super) fn decode_attention_splits(kv_len: usize) -> usize {
    kv_len
        .div_ceil(DECODE_SPLIT_POSITIONS)
        .next_power_of_two()
        .clamp(32, DECODE_MAX_SPLITS)
}

/// Head tiles of decode attention per sequence: a KV head's query heads in tiles of
/// DECODE_HEADS_PER_BLOCK.
pub(super) fn decode_attention_groups(num_heads: usize, layout: &KvLayout) -> usize {
    let kv_heads = layout.num_kv_heads as usize;
    kv_heads * (num_heads / kv_heads).div_ceil(DECODE_HEADS_PER_BLOCK)
}

/// Blocks along x of prefill attention: the query tiles of every sequence of more than one row
/// (`prefill_tile` in attention.cu walks the same sequences in the same order).
pub(super) fn prefill_attention_tiles(step: &StepView, group: usize) -> usize {
    step.seqs
        .iter()
        .filter(|seq| seq.rows > 1)
        .map(|seq| (seq.rows as usize * group).div_ceil(PREFILL_QUERY_ROWS))
        .sum()
}

/// The prefill attention kernel for `head_dim`: an entry point `attention_prefill_hd{N}_bf16`
/// of attention.cu.
pub(super) fn prefill_attention_kernel(head_dim: usize) -> Result<&'static str> {
    let name = format!("attention_prefill_hd{head_dim}_bf16");
    if let Some(kernel) = KERNELS.iter().find(|k| k.name == name) {
        return Ok(kernel.name);
    }
    let supported: Vec<&str> = KERNELS
        .iter()
        .filter_map(|k| {
            k.name
                .strip_prefix("attention_prefill_hd")?
                .strip_suffix("_bf16")
        })
        .collect();
    anyhow::bail!(
        "the CUDA attention kernels have no entry point for head_dim {head_dim} (they have {})",
        supported.join(", ")
    )
}

/// Where a matmul's products land.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum MatmulOutput {
    /// out = x · wᵀ in bf16.
    Bf16,
    /// out = x · wᵀ in f32 (logits).
    F32,
    /// out += x · wᵀ in f32 (the residual stream).
    AddF32,
}

/// What a matmul's input `[rows, k]` is. A matvec's blocks compute it while they stage it;
/// for many rows it is computed into a buffer first (`rms_norm_f32_to_bf16`, `swiglu_bf16`).
#[derive(Clone, Copy, Debug)]
pub(super) enum MatmulInput {
    /// x bf16, as stored.
    Bf16 { x: u64 },
    /// rmsnorm(residual) * weight, rounded to bf16: residual (the f32 residual stream) and
    /// weight f32.
    RmsNorm {
        residual: u64,
        weight: u64,
        eps: f32,
    },
    /// silu(gate) * up rounded to bf16: gate and up bf16.
    Swiglu { gate: u64, up: u64 },
}

impl CudaBackend {
    /// `table_cols`: `hidden`, or `2 * hidden` for a table of bf16 pairs.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn launch_embedding_gather(
        &self,
        table: u64,
        ids: u64,
        out: u64,
        rows: usize,
        hidden: usize,
        table_cols: usize,
    ) -> Result<()> {
        let threads = (hidden / 8).clamp(32, 256) as u32;
        self.launch(
            "embedding_gather_bf16_to_f32",
            LaunchConfig::linear(blocks(rows, "embedding")?, threads, 0),
            vec![
                KernelArg::Ptr(table),
                KernelArg::Ptr(ids),
                KernelArg::Ptr(out),
                int(hidden, "hidden")?,
                int(table_cols, "table columns")?,
            ],
        )
    }

    /// out `[1, hidden]` = the row of the id argmax chose last (`chosen`: the argmax's count and
    /// ring of `ring` ids).
    pub(super) fn launch_embedding_gather_chosen(
        &self,
        table: u64,
        chosen: u64,
        out: u64,
        (hidden, table_cols): (usize, usize),
        ring: usize,
    ) -> Result<()> {
        let threads = (hidden / 8).clamp(32, 256) as u32;
        self.launch(
            "embedding_gather_chosen_bf16_to_f32",
            LaunchConfig::linear(1, threads, 0),
            vec![
                KernelArg::Ptr(table),
                KernelArg::Ptr(chosen),
                KernelArg::Ptr(out),
                int(hidden, "hidden")?,
                int(table_cols, "table columns")?,
                int(ring, "chosen ids kept")?,
            ],
        )
    }

    /// dst `[rows, 2 * cols]` = src `[rows, cols]` twice side by side.
    pub(super) fn launch_duplicate_columns(
        &self,
        src: u64,
        dst: u64,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let grid = blocks(
            (rows * cols / 8).div_ceil(COPY_THREADS),
            "duplicate columns",
        )?;
        self.launch(
            "duplicate_columns_bf16",
            LaunchConfig::linear(grid, COPY_THREADS as u32, 0),
            vec![
                KernelArg::Ptr(src),
                KernelArg::Ptr(dst),
                int(rows, "rows")?,
                int(cols, "cols")?,
            ],
        )
    }

    /// out[r] = rmsnorm(x[r]) * weight in bf16 for r < rows (x f32, `[rows, dim]`).
    pub(super) fn launch_rms_norm(
        &self,
        x: u64,
        weight: u64,
        out: u64,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<()> {
        self.launch(
            "rms_norm_f32_to_bf16",
            LaunchConfig::linear(blocks(rows, "rms norm")?, NORM_THREADS as u32, 0),
            vec![
                KernelArg::Ptr(x),
                KernelArg::Ptr(weight),
                KernelArg::Ptr(out),
                int(dim, "norm dim")?,
                KernelArg::F32(eps),
            ],
        )
    }

    /// out_i[n_i] = w_i[n_i, :] . input (one row) for up to three (w_i, out_i, n_i) sharing the
    /// input, in one launch; an f32 output (stored or added) takes one target. `pair`: the
    /// weights are bf16 pairs `[n_i, 2k]`. The grid is the blocks resident at once (the
    /// occupancy API times the SM count), fewer when the rows need fewer.
    pub(super) fn launch_matvec(
        &self,
        input: MatmulInput,
        targets: &[(u64, u64, usize)],
        k: usize,
        pair: bool,
        output: MatmulOutput,
    ) -> Result<()> {
        use MatmulInput as In;
        use MatmulOutput as Out;
        let (kernel, slots, mut args) = match (input, output) {
            (In::Bf16 { x }, Out::Bf16) => ("matvec_bf16", 3, vec![KernelArg::Ptr(x)]),
            (In::Bf16 { x }, Out::F32) => ("matvec_bf16_out_f32", 1, vec![KernelArg::Ptr(x)]),
            (In::Bf16 { x }, Out::AddF32) => ("matvec_bf16_add_f32", 1, vec![KernelArg::Ptr(x)]),
            (
                In::RmsNorm {
                    residual,
                    weight,
                    eps,
                },
                Out::Bf16 | Out::F32,
            ) => (
                if output == Out::Bf16 {
                    "matvec_rms_norm_bf16"
                } else {
                    "matvec_rms_norm_bf16_out_f32"
                },
                if output == Out::Bf16 { 3 } else { 1 },
                vec![
                    KernelArg::Ptr(residual),
                    KernelArg::Ptr(weight),
                    KernelArg::F32(eps),
                ],
            ),
            (In::Swiglu { gate, up }, Out::AddF32) => (
                "matvec_swiglu_bf16_add_f32",
                1,
                vec![KernelArg::Ptr(gate), KernelArg::Ptr(up)],
            ),
            (input, output) => bail!("no matvec kernel stages {input:?} into {output:?} outputs"),
        };
        ensure!(
            (1..=slots).contains(&targets.len()),
            "matvec `{kernel}`: {} weights in one launch, it takes 1 to {slots}",
            targets.len()
        );
        let weight_cols = if pair { 2 * k } else { k };
        for slot in 0..slots {
            let (w, out, n) = targets.get(slot).copied().unwrap_or((0, 0, 0));
            args.extend([KernelArg::Ptr(w), KernelArg::Ptr(out), int(n, "matvec n")?]);
        }
        args.extend([
            int(k, "matvec k")?,
            int(weight_cols, "matvec weight columns")?,
        ]);
        let shared = u32::try_from(weight_cols * 2).context("matvec: input row too long")?;
        let rows: usize = targets.iter().map(|t| t.2).sum();
        let resident = self.resident_blocks(kernel, MATVEC_THREADS as u32, shared)?;
        let grid = rows.div_ceil(MATVEC_WARPS).min(resident);
        let config = LaunchConfig::linear(blocks(grid, "matvec")?, MATVEC_THREADS as u32, shared);
        self.launch(kernel, config, args)
    }

    /// out[m, n] = a[m, :] . w[n, :] (or +=, see [`MatmulOutput`]) on tensor cores.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn launch_matmul_mma(
        &self,
        a: u64,
        w: u64,
        out: u64,
        m: usize,
        n: usize,
        k: usize,
        output: MatmulOutput,
    ) -> Result<()> {
        let shared = MATMUL_SHARED_BYTES as u32;
        let config = LaunchConfig {
            grid: [
                blocks(n.div_ceil(MATMUL_BN), "matmul n")?,
                blocks(m.div_ceil(MATMUL_BM), "matmul m")?,
                1,
            ],
            block: [MATMUL_THREADS as u32, 1, 1],
            shared_mem_bytes: shared,
            programmatic: false,
        };
        self.launch(
            match output {
                MatmulOutput::Bf16 => "matmul_mma_bf16",
                MatmulOutput::F32 => "matmul_mma_bf16_out_f32",
                MatmulOutput::AddF32 => "matmul_mma_bf16_add_f32",
            },
            config,
            vec![
                KernelArg::Ptr(a),
                KernelArg::Ptr(w),
                KernelArg::Ptr(out),
                int(m, "matmul m")?,
                int(n, "matmul n")?,
                int(k, "matmul k")?,
            ],
        )
    }

    /// Rotates q and k in place, each row at its position in the step view.
    pub(super) fn launch_rope(
        &self,
        q: u64,
        k: u64,
        inv_freq: u64,
        step: DeviceStep,
        (num_heads, num_kv_heads, head_dim): (usize, usize, usize),
    ) -> Result<()> {
        let pairs = step.rows * (num_heads + num_kv_heads) * (head_dim / 2);
        let mut args = vec![
            KernelArg::Ptr(q),
            KernelArg::Ptr(k),
            KernelArg::Ptr(inv_freq),
            KernelArg::Ptr(step.address),
        ];
        args.extend(step.args()?);
        args.extend([
            int(num_heads, "num_heads")?,
            int(num_kv_heads, "num_kv_heads")?,
            int(head_dim, "head_dim")?,
        ]);
        self.launch(
            "rope_half_split_bf16",
            LaunchConfig::linear(
                blocks(pairs.div_ceil(ELEMENTWISE_THREADS), "rope")?,
                ELEMENTWISE_THREADS as u32,
                0,
            ),
            args,
        )
    }

    /// Writes k and v `[rows, num_kv_heads * head_dim]` of `layer` into the arena, each row at
    /// its sequence's position: copied into a bf16 arena, quantized into an int8 or fp8 one.
    pub(super) fn launch_kv_append(
        &self,
        k: u64,
        v: u64,
        arena: KvArena,
        step: DeviceStep,
        layer: usize,
    ) -> Result<()> {
        let layout = arena.layout;
        let rows = 2 * step.rows * layout.num_kv_heads as usize;
        let mut args = vec![
            KernelArg::Ptr(k),
            KernelArg::Ptr(v),
            KernelArg::Ptr(arena.address),
            KernelArg::KvLayout(layout),
            KernelArg::Ptr(step.address),
        ];
        args.extend(step.args()?);
        args.push(KernelArg::U32(layer as u32));
        let (kernel, config) = if layout.dtype() == KvDtype::Bf16 {
            let vectors = rows * layout.head_dim as usize / 8;
            let grid = blocks(vectors.div_ceil(ELEMENTWISE_THREADS), "kv append")?;
            let config = LaunchConfig::linear(grid, ELEMENTWISE_THREADS as u32, 0);
            ("kv_append_bf16", config)
        } else {
            (
                "kv_append_quantize_bf16",
                quantizing_launch(rows, "kv append")?,
            )
        };
        self.launch(kernel, config, args)
    }

    /// Rotates q in place and writes k, rotated, and v `[rows, num_kv_heads * head_dim]` of
    /// `layer` into the arena, each row at its sequence's position: RoPE and the append in one
    /// launch.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn launch_rope_kv_append(
        &self,
        q: u64,
        k: u64,
        v: u64,
        inv_freq: u64,
        arena: KvArena,
        step: DeviceStep,
        num_heads: usize,
        layer: usize,
    ) -> Result<()> {
        let layout = arena.layout;
        let heads = step.rows * (num_heads + 2 * layout.num_kv_heads as usize);
        let mut args = vec![
            KernelArg::Ptr(q),
            KernelArg::Ptr(k),
            KernelArg::Ptr(v),
            KernelArg::Ptr(inv_freq),
            KernelArg::Ptr(arena.address),
            KernelArg::KvLayout(layout),
            KernelArg::Ptr(step.address),
        ];
        args.extend(step.args()?);
        args.extend([int(num_heads, "num_heads")?, KernelArg::U32(layer as u32)]);
        let what = "rope and kv append";
        let (kernel, config) = if layout.dtype() == KvDtype::Bf16 {
            let pairs = heads * (layout.head_dim as usize / 2);
            let grid = blocks(pairs.div_ceil(ELEMENTWISE_THREADS), what)?;
            let config = LaunchConfig::linear(grid, ELEMENTWISE_THREADS as u32, 0);
            ("rope_kv_append_bf16", config)
        } else {
            (
                "rope_kv_append_quantize_bf16",
                quantizing_launch(heads, what)?,
            )
        };
        self.launch(kernel, config, args)
    }

    /// Flash attention of the step's sequences of more than one row: `tiles` blocks of query
    /// rows ([`prefill_attention_tiles`]) per KV head.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn launch_attention_prefill(
        &self,
        q: u64,
        arena: KvArena,
        step: DeviceStep,
        out: u64,
        tiles: usize,
        num_heads: usize,
        layer: usize,
    ) -> Result<()> {
        let layout = arena.layout;
        let config = LaunchConfig {
            grid: [blocks(tiles, "prefill attention")?, layout.num_kv_heads, 1],
            block: [PREFILL_THREADS as u32, 1, 1],
            shared_mem_bytes: 0,
            programmatic: false,
        };
        let mut args = vec![
            KernelArg::Ptr(q),
            KernelArg::Ptr(arena.address),
            KernelArg::KvLayout(layout),
            KernelArg::Ptr(step.address),
            KernelArg::Ptr(out),
        ];
        args.extend(step.args()?);
        args.extend([int(num_heads, "num_heads")?, KernelArg::U32(layer as u32)]);
        self.launch(
            prefill_attention_kernel(layout.head_dim as usize)?,
            config,
            args,
        )
    }

    /// Split-sequence decode attention of the step's sequences of one row, all in one launch,
    /// each cut into at most `num_splits` ranges aligned to its chunks, merged in the kernel;
    /// `split_counters` holds `num_seqs` x [`decode_attention_groups`] zeros.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn launch_attention_decode(
        &self,
        q: u64,
        arena: KvArena,
        step: DeviceStep,
        partials: DecodePartials,
        out: u64,
        num_heads: usize,
        layer: usize,
        num_splits: usize,
    ) -> Result<()> {
        ensure!(
            (1..=DECODE_MAX_SPLITS).contains(&num_splits),
            "decode attention takes 1 to {DECODE_MAX_SPLITS} splits, not {num_splits}"
        );
        let layout = arena.layout;
        let config = LaunchConfig {
            grid: [
                blocks(num_splits, "decode attention splits")?,
                blocks(
                    decode_attention_groups(num_heads, &layout),
                    "decode attention heads",
                )?,
                blocks(step.num_seqs, "decode attention sequences")?,
            ],
            block: [DECODE_THREADS as u32, 1, 1],
            shared_mem_bytes: 0,
            programmatic: false,
        };
        let mut args = vec![
            KernelArg::Ptr(q),
            KernelArg::Ptr(arena.address),
            KernelArg::KvLayout(layout),
            KernelArg::Ptr(step.address),
            KernelArg::Ptr(partials.acc),
            KernelArg::Ptr(partials.max_sum),
            KernelArg::Ptr(partials.split_counters),
            KernelArg::Ptr(out),
        ];
        args.extend(step.args()?);
        args.extend([int(num_heads, "num_heads")?, KernelArg::U32(layer as u32)]);
        let kernel = match layout.dtype() {
            KvDtype::Int8 => "attention_decode_int8_kv_bf16",
            KvDtype::Fp8E4m3 => "attention_decode_fp8_kv_bf16",
            KvDtype::Bf16 | KvDtype::F32 => "attention_decode_bf16",
        };
        self.launch(kernel, config, args)
    }

    /// out = silu(gate) * up for `count` bf16 values (out may be gate).
    pub(super) fn launch_swiglu(&self, gate: u64, up: u64, out: u64, count: usize) -> Result<()> {
        let grid = blocks((count / 8).div_ceil(ELEMENTWISE_THREADS), "swiglu")?;
        self.launch(
            "swiglu_bf16",
            LaunchConfig::linear(grid, ELEMENTWISE_THREADS as u32, 0),
            vec![
                KernelArg::Ptr(gate),
                KernelArg::Ptr(up),
                KernelArg::Ptr(out),
                int(count, "swiglu count")?,
            ],
        )
    }

    /// The argmax of `count` f32 logits (+ bias) in one launch; the id is appended to `chosen`
    /// (a count, then a ring of `ring` ids). With `advance`, the kernel then moves the step
    /// view's one-row sequences on by one position. `blocks_done` is a zeroed u32 that the kernel
    /// leaves zeroed.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn launch_argmax(
        &self,
        logits: u64,
        bias: Option<u64>,
        (partial_values, partial_indices, blocks_done): (u64, u64, u64),
        chosen: u64,
        ring: usize,
        advance: Option<DeviceStep>,
        count: usize,
    ) -> Result<()> {
        let partials = count.div_ceil(ARGMAX_THREADS * 8).clamp(1, ARGMAX_PARTIALS);
        let step = advance.unwrap_or(DeviceStep {
            address: 0,
            num_seqs: 0,
            rows: 0,
        });
        let mut args = vec![
            KernelArg::Ptr(logits),
            KernelArg::Ptr(bias.unwrap_or(0)),
            KernelArg::Ptr(partial_values),
            KernelArg::Ptr(partial_indices),
            KernelArg::Ptr(blocks_done),
            KernelArg::Ptr(chosen),
            KernelArg::Ptr(step.address),
            int(count, "argmax count")?,
            int(ring, "chosen ids kept")?,
        ];
        args.extend(step.args()?);
        self.launch(
            "argmax_f32",
            LaunchConfig::linear(partials as u32, ARGMAX_THREADS as u32, 0),
            args,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_attention_takes_more_splits_as_the_context_grows() {
        let splits: Vec<usize> = [1, 4096, 4097, 8192, 8193, 16384, 131072]
            .map(decode_attention_splits)
            .to_vec();
        assert_eq!(splits, [32, 32, 64, 64, 128, 128, 128]);
    }
}
