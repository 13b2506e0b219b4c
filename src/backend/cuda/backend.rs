//! The CUDA backend: kvlab's kernels (kernels/*.cu) behind the [`Backend`] trait, over a
//! [`Device`] (a real GPU, or the CPU emulator running exactly the same kernels).
//!
//! Storage is bf16 (weights, matmul inputs, KV); the residual stream, the sublayer outputs added
//! to it, the logits, norm weights and RoPE frequencies are f32; every kernel accumulates in f32.
//! Positions, lengths and chunk tables live in device memory and are written by copies before a
//! step's launches, which is what lets a decode step run as a CUDA graph (see [`super::graph`]).

use super::device::{Device, KernelArg, LaunchConfig};
use super::graph::{GraphStats, Launch, StepRecorder};
use super::kernels::{
    decode_attention_groups, DecodePartials, ARGMAX_PARTIALS, DECODE_MAX_SPLITS, PREFILL_HEAD_DIMS,
};
use super::memory::{MemoryLedger, MemoryReport, MemoryUse, TrackedBuffer};
use crate::backend::{Backend, BackendInfo};
use crate::kv::{ChunkCopy, KvDtype, KvLayout, LayoutKind, StepView};
use crate::model::weights::HostTensor;
use crate::model::DType;
use anyhow::{bail, ensure, Context, Result};
use half::bf16;
use rayon::prelude::*;
use std::cell::RefCell;
use std::sync::Arc;

/// Knobs of the CUDA backend.
#[derive(Clone, Copy, Debug)]
pub struct CudaOptions {
    /// Run repeated decode steps as CUDA graphs (`--no-graphs` measures what they buy).
    pub graphs: bool,
    /// Ranges the sequence is cut into by decode attention (flash-decoding). A split covers at
    /// least 32 positions, so short sequences use fewer.
    pub decode_splits: usize,
}

impl Default for CudaOptions {
    fn default() -> Self {
        CudaOptions {
            graphs: true,
            decode_splits: 32,
        }
    }
}

/// Element type of an activation buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActivationType {
    Bf16,
    F32,
}

/// An activation buffer `[rows, cols]` on the device.
pub struct CudaTensor {
    buffer: TrackedBuffer,
    pub rows: usize,
    pub cols: usize,
    pub dtype: ActivationType,
}

impl CudaTensor {
    fn elem_bytes(&self) -> usize {
        match self.dtype {
            ActivationType::Bf16 => 2,
            ActivationType::F32 => 4,
        }
    }

    /// Device address of row `row`.
    fn row_ptr(&self, row: usize) -> u64 {
        self.buffer.ptr() + (row * self.cols * self.elem_bytes()) as u64
    }

    fn ptr(&self) -> u64 {
        self.buffer.ptr()
    }

    fn check_rows(&self, rows: usize, what: &str) -> Result<()> {
        ensure!(
            rows <= self.rows,
            "{what}: {rows} rows requested from a buffer of {} rows",
            self.rows
        );
        Ok(())
    }

    fn check_f32(&self, what: &str) -> Result<()> {
        ensure!(
            self.dtype == ActivationType::F32,
            "{what} expects an f32 buffer (from alloc_precise)"
        );
        Ok(())
    }

    fn check_bf16(&self, what: &str) -> Result<()> {
        ensure!(
            self.dtype == ActivationType::Bf16,
            "{what} expects a bf16 activation buffer"
        );
        Ok(())
    }
}

/// A weight on the device: a bf16 matrix `[rows, cols]` (HF's `[out, in]`) or an f32 vector.
///
/// Matrices of f16 and f32 checkpoints are stored as bf16 pairs `[rows, 2 * cols]`: each row
/// holds the bf16 values, then the bf16 rounding errors (`w - bf16(w)`), about 16 significant
/// bits; a matmul reads its input twice (`duplicate_columns_bf16`) so that the bf16 kernels sum
/// both halves. Rounding such weights to plain bf16 alone moves the tiny fixtures' logits by up
/// to 0.019, nearly the whole 2e-2 budget against transformers.
pub struct CudaWeight {
    buffer: TrackedBuffer,
    pub name: String,
    pub shape: WeightShape,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightShape {
    /// `pair`: stored as bf16 pairs `[rows, 2 * cols]`.
    Matrix {
        rows: usize,
        cols: usize,
        pair: bool,
    },
    Vector {
        len: usize,
    },
}

impl CudaWeight {
    /// (rows, cols, stored as pairs).
    fn matrix(&self) -> Result<(usize, usize, bool)> {
        match self.shape {
            WeightShape::Matrix { rows, cols, pair } => Ok((rows, cols, pair)),
            WeightShape::Vector { .. } => {
                bail!("vector {} was passed where a matrix is expected", self.name)
            }
        }
    }

    fn vector(&self) -> Result<usize> {
        match self.shape {
            WeightShape::Vector { len } => Ok(len),
            WeightShape::Matrix { .. } => {
                bail!("matrix {} was passed where a vector is expected", self.name)
            }
        }
    }
}

/// A KV pool's arena on the device, and the step's sequence as the kernels read it: the base
/// address of each of its blocks and its first position and rows.
pub struct CudaKvMemory {
    layout: KvLayout,
    arena: TrackedBuffer,
    /// `[table_capacity]` u64: base address of each block of the step's sequence.
    block_addresses: TrackedBuffer,
    table_capacity: usize,
    /// What the device table holds, to copy only new entries.
    uploaded: Vec<u64>,
    /// `[2]` i32: the step's first position and row count.
    step: TrackedBuffer,
    /// Positions per block of the step's sequence: `chunk_tokens`, or its run's capacity.
    block_tokens: u32,
}

/// Buffers reused by every step, grown on demand.
#[derive(Default)]
struct Scratch {
    /// `[rows]` u32 token ids of the step.
    ids: Option<TrackedBuffer>,
    /// Decode attention partials (see `DecodePartials`).
    decode_acc: Option<TrackedBuffer>,
    decode_max_sum: Option<TrackedBuffer>,
    decode_counters: Option<TrackedBuffer>,
    /// A matmul input read twice `[rows, 2 * k]`, for weights stored as bf16 pairs.
    pair_input: Option<TrackedBuffer>,
    /// Argmax partials `[ARGMAX_PARTIALS]` f32 + u32, and the chosen id.
    argmax_values: Option<TrackedBuffer>,
    argmax_indices: Option<TrackedBuffer>,
    argmax_id: Option<TrackedBuffer>,
    /// Buffers replaced while a step records: its recorded launches may use them, so they live
    /// until the step's work is issued.
    retired: Vec<TrackedBuffer>,
}

pub struct CudaBackend {
    device: Arc<dyn Device>,
    name: String,
    options: RefCell<CudaOptions>,
    ledger: Arc<MemoryLedger>,
    scratch: RefCell<Scratch>,
    recorder: RefCell<StepRecorder>,
    /// (start, end) events of each forward pass since the last `take_step_device_seconds`.
    step_events: RefCell<Vec<(super::device::Event, super::device::Event)>>,
}

impl CudaBackend {
    /// A backend over `device`; `name` is what reports call it ("cuda" or "emu").
    pub fn new(device: Arc<dyn Device>, name: &str, options: CudaOptions) -> Result<Self> {
        check_decode_splits(options.decode_splits)?;
        Ok(CudaBackend {
            device,
            name: name.to_string(),
            options: RefCell::new(options),
            ledger: Arc::new(MemoryLedger::default()),
            scratch: RefCell::new(Scratch::default()),
            recorder: RefCell::new(StepRecorder::default()),
            step_events: RefCell::new(Vec::new()),
        })
    }

    /// Opens the device of `kind` (cuda or emu; auto resolves first).
    pub fn open(kind: super::BackendKind, options: CudaOptions) -> Result<Self> {
        let (resolved, _) = kind.resolve();
        let device = super::open_device(resolved)?;
        Self::new(device, &resolved.to_string(), options)
    }

    pub fn device(&self) -> &Arc<dyn Device> {
        &self.device
    }

    pub fn options(&self) -> CudaOptions {
        *self.options.borrow()
    }

    /// Turns graphs on or off; turning them off forgets captured graphs.
    pub fn set_graphs(&self, enabled: bool) {
        self.options.borrow_mut().graphs = enabled;
        if !enabled {
            self.recorder.borrow_mut().clear();
        }
    }

    pub fn set_decode_splits(&self, splits: usize) -> Result<()> {
        check_decode_splits(splits)?;
        self.options.borrow_mut().decode_splits = splits;
        Ok(())
    }

    /// How steps ran: launched kernel by kernel, captured, replayed.
    pub fn graph_stats(&self) -> GraphStats {
        self.recorder.borrow().stats
    }

    /// Why graph capture failed on this device, if it did (steps then run launch by launch).
    pub fn graph_capture_error(&self) -> Option<String> {
        self.recorder.borrow().capture_error().map(str::to_string)
    }

    /// Device memory by use, and as the device reports it.
    pub fn memory_report(&self) -> Result<MemoryReport> {
        let device = self.device.memory()?;
        let l = &self.ledger;
        Ok(MemoryReport {
            weights_bytes: l.bytes(MemoryUse::Weights),
            activation_bytes: l.bytes(MemoryUse::Activations),
            kv_cache_bytes: l.bytes(MemoryUse::KvCache),
            scratch_bytes: l.bytes(MemoryUse::Scratch),
            allocated_bytes: device.allocated_by_kvlab,
            device_free_bytes: device.device_free,
            device_total_bytes: device.device_total,
        })
    }

    /// An activation buffer holding `values` `[rows, cols]` rounded to bf16 (tests, benches).
    pub fn upload_tensor(&self, rows: usize, cols: usize, values: &[f32]) -> Result<CudaTensor> {
        ensure!(
            values.len() == rows * cols,
            "upload_tensor: {} values for [{rows}, {cols}]",
            values.len()
        );
        let tensor = self.alloc(rows, cols)?;
        let bits: Vec<u16> = values
            .iter()
            .map(|&v| bf16::from_f32(v).to_bits())
            .collect();
        self.copy_htod(&tensor.buffer, 0, bytemuck::cast_slice(&bits))?;
        Ok(tensor)
    }

    /// A bf16 weight matrix `[rows, cols]` from its bits (benches: weights without a checkpoint).
    pub fn upload_matrix_bf16(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        bits: &[u16],
    ) -> Result<CudaWeight> {
        ensure!(
            bits.len() == rows * cols && cols.is_multiple_of(8),
            "{name}: {} values for [{rows}, {cols}] (columns a multiple of 8)",
            bits.len()
        );
        let buffer = self.tracked(MemoryUse::Weights, bits.len() * 2)?;
        self.copy_htod(&buffer, 0, bytemuck::cast_slice(bits))?;
        Ok(CudaWeight {
            buffer,
            name: name.to_string(),
            shape: WeightShape::Matrix {
                rows,
                cols,
                pair: false,
            },
        })
    }

    /// An f32 buffer (as from `alloc_precise`) holding `values` `[rows, cols]` (tests, benches).
    pub fn upload_precise(&self, rows: usize, cols: usize, values: &[f32]) -> Result<CudaTensor> {
        ensure!(
            values.len() == rows * cols,
            "upload_precise: {} values for [{rows}, {cols}]",
            values.len()
        );
        let tensor = self.alloc_precise(rows, cols)?;
        self.copy_htod(&tensor.buffer, 0, bytemuck::cast_slice(values))?;
        Ok(tensor)
    }

    /// Issues a launch, or records it while a step records.
    pub(super) fn launch(
        &self,
        kernel: &'static str,
        config: LaunchConfig,
        args: Vec<KernelArg>,
    ) -> Result<()> {
        self.recorder.borrow_mut().launch(
            self.device.as_ref(),
            Launch {
                kernel,
                config,
                args,
            },
        )
    }

    fn tracked(&self, what: MemoryUse, bytes: usize) -> Result<TrackedBuffer> {
        TrackedBuffer::alloc(self.device.as_ref(), &self.ledger, what, bytes)
            .with_context(|| format!("allocating {bytes} bytes of device memory for {what:?}"))
    }

    /// Host-to-device copy, ordered after every launch issued or recorded before it.
    fn copy_htod(&self, dst: &TrackedBuffer, offset: usize, bytes: &[u8]) -> Result<()> {
        self.recorder
            .borrow_mut()
            .flush_recording(self.device.as_ref())?;
        self.device.copy_htod(dst.buffer(), offset, bytes)
    }

    fn copy_dtoh(&self, src: &TrackedBuffer, offset: usize, bytes: &mut [u8]) -> Result<()> {
        self.recorder
            .borrow_mut()
            .flush_recording(self.device.as_ref())?;
        self.device.copy_dtoh(src.buffer(), offset, bytes)
    }

    /// The scratch buffer in `slot`, grown to at least `bytes`.
    fn scratch_buffer(
        &self,
        slot: impl Fn(&mut Scratch) -> &mut Option<TrackedBuffer>,
        bytes: usize,
    ) -> Result<u64> {
        self.scratch_buffer_init(slot, bytes, false)
    }

    /// `scratch_buffer`, zero-filled when (re)allocated with `zeroed`.
    fn scratch_buffer_init(
        &self,
        slot: impl Fn(&mut Scratch) -> &mut Option<TrackedBuffer>,
        bytes: usize,
        zeroed: bool,
    ) -> Result<u64> {
        let mut scratch = self.scratch.borrow_mut();
        if let Some(buffer) = slot(&mut scratch).as_ref() {
            if buffer.len() >= bytes {
                return Ok(buffer.ptr());
            }
        }
        let buffer = self.tracked(MemoryUse::Scratch, bytes)?;
        if zeroed {
            self.device.memset_zero(buffer.buffer(), 0, buffer.len())?;
        }
        let ptr = buffer.ptr();
        if let Some(old) = slot(&mut scratch).replace(buffer) {
            if self.recorder.borrow().is_recording() {
                scratch.retired.push(old);
            }
        }
        Ok(ptr)
    }

    fn upload_f32(&self, name: &str, values: &[f32], what: MemoryUse) -> Result<TrackedBuffer> {
        let buffer = self.tracked(what, values.len() * 4)?;
        self.copy_htod(&buffer, 0, bytemuck::cast_slice(values))
            .with_context(|| format!("uploading {name}"))?;
        Ok(buffer)
    }
}

fn check_decode_splits(splits: usize) -> Result<()> {
    ensure!(
        (1..=DECODE_MAX_SPLITS).contains(&splits),
        "decode attention takes 1 to {DECODE_MAX_SPLITS} splits, not {splits}"
    );
    Ok(())
}

/// bf16 bits of a checkpoint matrix `[rows, cols]`: the stored bits of a bf16 checkpoint, or
/// bf16 pairs `[rows, 2 * cols]` (values, then rounding errors) of an f16 or f32 one.
fn matrix_to_bf16(tensor: &HostTensor, cols: usize) -> Vec<u16> {
    let bytes = tensor.bytes();
    let values: Vec<f32> = match tensor.dtype {
        DType::BF16 => {
            return bytes
                .par_chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect()
        }
        DType::F16 => bytes
            .par_chunks_exact(2)
            .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        DType::F32 => bytes
            .par_chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    };
    let mut pairs = vec![0u16; 2 * values.len()];
    pairs
        .par_chunks_mut(2 * cols)
        .zip(values.par_chunks(cols))
        .for_each(|(out, row)| {
            let (high, low) = out.split_at_mut(cols);
            for ((h, l), &v) in high.iter_mut().zip(low).zip(row) {
                let rounded = bf16::from_f32(v);
                *h = rounded.to_bits();
                *l = bf16::from_f32(v - rounded.to_f32()).to_bits();
            }
        });
    pairs
}

impl Backend for CudaBackend {
    type Tensor = CudaTensor;
    type Weight = CudaWeight;
    type KvMemory = CudaKvMemory;

    fn info(&self) -> BackendInfo {
        BackendInfo {
            name: self.name.clone(),
            device: self.device.describe(),
            activation_dtype: "bf16".into(),
            kv_dtype: self.kv_dtypes()[0].name().into(),
        }
    }

    fn upload_weight(&self, tensor: &HostTensor) -> Result<CudaWeight> {
        match tensor.shape[..] {
            [len] => Ok(CudaWeight {
                buffer: self.upload_f32(&tensor.name, &tensor.to_f32(), MemoryUse::Weights)?,
                name: tensor.name.clone(),
                shape: WeightShape::Vector { len },
            }),
            [rows, cols] => {
                ensure!(
                    cols % 8 == 0,
                    "tensor {} has {cols} columns; the CUDA kernels read rows in 16-byte vectors \
                     and need a multiple of 8",
                    tensor.name
                );
                let bits = matrix_to_bf16(tensor, cols);
                let buffer = self.tracked(MemoryUse::Weights, bits.len() * 2)?;
                self.copy_htod(&buffer, 0, bytemuck::cast_slice(&bits))
                    .with_context(|| format!("uploading {}", tensor.name))?;
                Ok(CudaWeight {
                    buffer,
                    name: tensor.name.clone(),
                    shape: WeightShape::Matrix {
                        rows,
                        cols,
                        pair: tensor.dtype != DType::BF16,
                    },
                })
            }
            _ => bail!(
                "tensor {} has rank {}; expected a vector or a matrix",
                tensor.name,
                tensor.shape.len()
            ),
        }
    }

    fn upload_vector(&self, values: &[f32]) -> Result<CudaWeight> {
        Ok(CudaWeight {
            buffer: self.upload_f32("a vector", values, MemoryUse::Weights)?,
            name: format!("vector of {}", values.len()),
            shape: WeightShape::Vector { len: values.len() },
        })
    }

    fn alloc(&self, rows: usize, cols: usize) -> Result<CudaTensor> {
        ensure!(
            cols.is_multiple_of(8),
            "CUDA activations are moved in 16-byte vectors: {cols} columns is not a multiple of 8"
        );
        Ok(CudaTensor {
            buffer: self.tracked(MemoryUse::Activations, rows * cols * 2)?,
            rows,
            cols,
            dtype: ActivationType::Bf16,
        })
    }

    fn alloc_precise(&self, rows: usize, cols: usize) -> Result<CudaTensor> {
        Ok(CudaTensor {
            buffer: self.tracked(MemoryUse::Activations, rows * cols * 4)?,
            rows,
            cols,
            dtype: ActivationType::F32,
        })
    }

    fn kv_dtypes(&self) -> &'static [KvDtype] {
        &[KvDtype::Bf16]
    }

    fn alloc_kv_memory(&self, layout: &KvLayout, chunks: usize) -> Result<CudaKvMemory> {
        let head_dim = layout.head_dim as usize;
        ensure!(
            PREFILL_HEAD_DIMS.contains(&head_dim),
            "the CUDA attention kernels support head_dim {PREFILL_HEAD_DIMS:?}, not {head_dim}"
        );
        ensure!(
            layout.dtype() == KvDtype::Bf16,
            "the CUDA kernels store KV as bf16, not {}",
            layout.dtype()
        );
        let table_capacity = match layout.kind() {
            LayoutKind::Chunked => chunks,
            LayoutKind::Contiguous => 1,
        };
        Ok(CudaKvMemory {
            layout: *layout,
            arena: self.tracked(MemoryUse::KvCache, chunks * layout.chunk_bytes())?,
            block_addresses: self.tracked(MemoryUse::KvCache, table_capacity * 8)?,
            table_capacity,
            uploaded: Vec::new(),
            step: self.tracked(MemoryUse::KvCache, 8)?,
            block_tokens: layout.chunk_tokens,
        })
    }

    fn copy_kv_chunks(&self, memory: &mut CudaKvMemory, copies: &[ChunkCopy]) -> Result<()> {
        let chunk_bytes = memory.layout.chunk_bytes();
        for copy in copies {
            self.recorder
                .borrow_mut()
                .flush_recording(self.device.as_ref())?;
            self.device.copy_dtod(
                memory.arena.buffer(),
                copy.src as usize * chunk_bytes,
                memory.arena.buffer(),
                copy.dst as usize * chunk_bytes,
                chunk_bytes,
            )?;
        }
        Ok(())
    }

    fn set_kv_step(&self, memory: &mut CudaKvMemory, step: &StepView) -> Result<()> {
        ensure!(
            step.layout == memory.layout,
            "a step view of another KV layout over this arena"
        );
        let [seq] = step.seqs[..] else {
            bail!(
                "the CUDA kernels take one sequence per step, not {}",
                step.seqs.len()
            );
        };
        let chunk_bytes = memory.layout.chunk_bytes() as u64;
        let arena_chunks = memory.arena.len() / chunk_bytes as usize;
        let entries = match memory.layout.kind() {
            LayoutKind::Contiguous => 1,
            LayoutKind::Chunked => seq.end().div_ceil(memory.layout.chunk_tokens()),
        };
        let table = &step.block_table[seq.table_start as usize..][..entries];
        ensure!(
            entries <= memory.table_capacity,
            "{entries} KV blocks exceed the table's {} entries",
            memory.table_capacity
        );
        let block_chunks = (seq.block_tokens as usize).div_ceil(memory.layout.chunk_tokens());
        if let Some(&bad) = table
            .iter()
            .find(|&&c| c as usize + block_chunks > arena_chunks)
        {
            bail!("KV chunk {bad} is outside an arena of {arena_chunks} chunks");
        }
        let addresses: Vec<u64> = table
            .iter()
            .map(|&c| memory.arena.ptr() + c as u64 * chunk_bytes)
            .collect();
        let first_new = addresses
            .iter()
            .zip(&memory.uploaded)
            .position(|(a, b)| a != b)
            .unwrap_or(memory.uploaded.len().min(addresses.len()));
        if first_new < addresses.len() {
            self.copy_htod(
                &memory.block_addresses,
                first_new * 8,
                bytemuck::cast_slice(&addresses[first_new..]),
            )?;
        }
        memory.uploaded = addresses;
        memory.block_tokens = seq.block_tokens;
        let step_words = [
            i32::try_from(seq.start).context("position beyond i32")?,
            i32::try_from(seq.rows).context("step rows beyond i32")?,
        ];
        self.copy_htod(&memory.step, 0, bytemuck::cast_slice(&step_words))
    }

    fn embed(&self, table: &CudaWeight, ids: &[u32], out: &mut CudaTensor) -> Result<()> {
        let (vocab, hidden, pair) = table.matrix()?;
        out.check_f32("embed output")?;
        out.check_rows(ids.len(), "embed")?;
        ensure!(
            out.cols == hidden,
            "embed: table rows of {hidden}, output of {} columns",
            out.cols
        );
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            bail!("token id {bad} is outside the vocabulary of {vocab} tokens");
        }
        let ids_ptr = self.scratch_buffer(|s| &mut s.ids, ids.len() * 4)?;
        {
            let scratch = self.scratch.borrow();
            let buffer = scratch.ids.as_ref().expect("allocated above");
            self.copy_htod(buffer, 0, bytemuck::cast_slice(ids))?;
        }
        let table_cols = if pair { 2 * hidden } else { hidden };
        self.launch_embedding_gather(
            table.buffer.ptr(),
            ids_ptr,
            out.ptr(),
            ids.len(),
            hidden,
            table_cols,
        )
    }

    fn add_rms_norm(
        &self,
        residual: &mut CudaTensor,
        delta: Option<&CudaTensor>,
        weight: &CudaWeight,
        eps: f32,
        rows: usize,
        out: &mut CudaTensor,
    ) -> Result<()> {
        let dim = weight.vector()?;
        residual.check_f32("residual")?;
        out.check_bf16("norm output")?;
        if let Some(d) = delta {
            d.check_f32("residual delta")?;
        }
        for (t, what) in [(&*residual, "residual"), (&*out, "norm output")]
            .into_iter()
            .chain(delta.map(|d| (d, "residual delta")))
        {
            t.check_rows(rows, what)?;
            ensure!(
                t.cols == dim,
                "{what} has {} columns, norm weight {dim}",
                t.cols
            );
        }
        self.launch_add_rms_norm(
            residual.ptr(),
            delta.map(CudaTensor::ptr),
            weight.buffer.ptr(),
            out.ptr(),
            rows,
            dim,
            eps,
        )
    }

    fn matmul(
        &self,
        x: &CudaTensor,
        w: &CudaWeight,
        rows: usize,
        out: &mut CudaTensor,
    ) -> Result<()> {
        self.matmul_many(x, &mut [(w, out)], rows)
    }

    /// One row (decode): up to three weights of one input in a single matvec launch. Many
    /// rows: one tensor-core launch per weight.
    fn matmul_many(
        &self,
        x: &CudaTensor,
        outputs: &mut [(&CudaWeight, &mut CudaTensor)],
        rows: usize,
    ) -> Result<()> {
        x.check_bf16("matmul input")?;
        x.check_rows(rows, "matmul input")?;
        let mut pairs = Vec::with_capacity(outputs.len());
        for (w, out) in outputs.iter() {
            let (n, k, pair) = w.matrix()?;
            out.check_rows(rows, "matmul output")?;
            ensure!(
                x.cols == k && out.cols == n,
                "matmul shape mismatch: x has {} columns, weight {} is [{n}, {k}], out has {} \
                 columns",
                x.cols,
                w.name,
                out.cols
            );
            pairs.push(pair);
        }
        let Some(&pair) = pairs.first() else {
            return Ok(());
        };
        if pairs.iter().any(|&p| p != pair) {
            // Weights stored differently do not share one input: one at a time.
            for (w, out) in outputs.iter_mut() {
                self.matmul_many(x, &mut [(*w, &mut **out)], rows)?;
            }
            return Ok(());
        }
        let (input, k) = if pair {
            let doubled = self.scratch_buffer(|s| &mut s.pair_input, rows * 2 * x.cols * 2)?;
            self.launch_duplicate_columns(x.ptr(), doubled, rows, x.cols)?;
            (doubled, 2 * x.cols)
        } else {
            (x.ptr(), x.cols)
        };
        let all_bf16 = outputs.iter().all(|(_, o)| o.dtype == ActivationType::Bf16);
        if rows == 1 && all_bf16 {
            for group in outputs.chunks(3) {
                let targets: Vec<(u64, u64, usize)> = group
                    .iter()
                    .map(|(w, o)| (w.buffer.ptr(), o.ptr(), o.cols))
                    .collect();
                self.launch_matvec(input, &targets, k, false)?;
            }
            return Ok(());
        }
        for (w, out) in outputs.iter() {
            let (n, f32_out) = (out.cols, out.dtype == ActivationType::F32);
            if rows == 1 {
                self.launch_matvec(input, &[(w.buffer.ptr(), out.ptr(), n)], k, f32_out)?;
            } else {
                self.launch_matmul_mma(input, w.buffer.ptr(), out.ptr(), rows, n, k, f32_out)?;
            }
        }
        Ok(())
    }

    fn rope(
        &self,
        q: &mut CudaTensor,
        k: &mut CudaTensor,
        inv_freq: &CudaWeight,
        memory: &CudaKvMemory,
        step: &StepView,
    ) -> Result<()> {
        let half = inv_freq.vector()?;
        let head_dim = 2 * half;
        let rows = step.rows();
        q.check_bf16("rope q")?;
        k.check_bf16("rope k")?;
        q.check_rows(rows, "rope q")?;
        k.check_rows(rows, "rope k")?;
        ensure!(
            q.cols.is_multiple_of(head_dim) && k.cols.is_multiple_of(head_dim),
            "rope: q ({}) or k ({}) columns are not whole heads of {head_dim}",
            q.cols,
            k.cols
        );
        self.launch_rope(
            q.ptr(),
            k.ptr(),
            inv_freq.buffer.ptr(),
            memory.step.ptr(),
            rows,
            q.cols / head_dim,
            k.cols / head_dim,
            head_dim,
        )
    }

    fn kv_append(
        &self,
        memory: &mut CudaKvMemory,
        step: &StepView,
        layer: usize,
        k: &CudaTensor,
        v: &CudaTensor,
    ) -> Result<()> {
        let layout = memory.layout;
        let rows = step.rows();
        let kv_dim = (layout.num_kv_heads * layout.head_dim) as usize;
        for (t, what) in [(k, "k"), (v, "v")] {
            t.check_bf16(what)?;
            t.check_rows(rows, what)?;
            ensure!(
                t.cols == kv_dim,
                "kv_append: {what} has {} columns, the cache {kv_dim}",
                t.cols
            );
        }
        ensure!(
            layer < layout.num_layers as usize,
            "kv_append: layer {layer} of {}",
            layout.num_layers
        );
        self.launch_kv_append(
            k.ptr(),
            v.ptr(),
            memory.block_addresses.ptr(),
            memory.step.ptr(),
            rows,
            layer,
            &layout,
            memory.block_tokens,
        )
    }

    fn attention(
        &self,
        q: &CudaTensor,
        memory: &CudaKvMemory,
        step: &StepView,
        layer: usize,
        num_heads: usize,
        out: &mut CudaTensor,
    ) -> Result<()> {
        let layout = memory.layout;
        let rows = step.rows();
        let head_dim = layout.head_dim as usize;
        let kv_heads = layout.num_kv_heads as usize;
        ensure!(
            num_heads.is_multiple_of(kv_heads),
            "{num_heads} query heads do not share {kv_heads} KV heads evenly"
        );
        for (t, what) in [(q, "attention q"), (&*out, "attention output")] {
            t.check_bf16(what)?;
            t.check_rows(rows, what)?;
            ensure!(
                t.cols == num_heads * head_dim,
                "{what} has {} columns, expected {num_heads} heads of {head_dim}",
                t.cols
            );
        }
        if rows > 1 {
            return self.launch_attention_prefill(
                q.ptr(),
                memory.block_addresses.ptr(),
                memory.step.ptr(),
                out.ptr(),
                rows,
                num_heads,
                layer,
                &layout,
                memory.block_tokens,
            );
        }
        let splits = self.options.borrow().decode_splits;
        let partials = DecodePartials {
            acc: self.scratch_buffer(|s| &mut s.decode_acc, num_heads * splits * head_dim * 4)?,
            max_sum: self.scratch_buffer(|s| &mut s.decode_max_sum, num_heads * splits * 2 * 4)?,
            split_counters: self.scratch_buffer_init(
                |s| &mut s.decode_counters,
                decode_attention_groups(num_heads, &layout) * 4,
                true,
            )?,
        };
        // The contiguous layout's one block is read directly.
        let (kv, chunked) = match layout.kind() {
            LayoutKind::Contiguous => (
                *memory
                    .uploaded
                    .first()
                    .context("decode attention before the step's view was set")?,
                false,
            ),
            LayoutKind::Chunked => (memory.block_addresses.ptr(), true),
        };
        self.launch_attention_decode(
            q.ptr(),
            kv,
            chunked,
            memory.step.ptr(),
            partials,
            out.ptr(),
            num_heads,
            layer,
            &layout,
            memory.block_tokens,
            splits,
        )
    }

    fn swiglu(&self, gate: &mut CudaTensor, up: &CudaTensor, rows: usize) -> Result<()> {
        gate.check_bf16("swiglu gate")?;
        up.check_bf16("swiglu up")?;
        gate.check_rows(rows, "swiglu gate")?;
        up.check_rows(rows, "swiglu up")?;
        ensure!(
            gate.cols == up.cols,
            "swiglu: gate has {} columns, up {}",
            gate.cols,
            up.cols
        );
        self.launch_swiglu(gate.ptr(), up.ptr(), rows * gate.cols)
    }

    fn copy_rows(
        &self,
        src: &CudaTensor,
        src_row: usize,
        dst: &mut CudaTensor,
        dst_row: usize,
        rows: usize,
    ) -> Result<()> {
        src.check_bf16("copy_rows source")?;
        dst.check_bf16("copy_rows destination")?;
        src.check_rows(src_row + rows, "copy_rows source")?;
        dst.check_rows(dst_row + rows, "copy_rows destination")?;
        ensure!(
            src.cols == dst.cols,
            "copy_rows between tensors of {} and {} columns",
            src.cols,
            dst.cols
        );
        self.launch_copy(src.row_ptr(src_row), dst.row_ptr(dst_row), rows * src.cols)
    }

    fn read_rows(&self, x: &CudaTensor, first: usize, rows: usize) -> Result<Vec<f32>> {
        x.check_rows(first + rows, "read_rows")?;
        let count = rows * x.cols;
        let offset = first * x.cols * x.elem_bytes();
        match x.dtype {
            ActivationType::F32 => {
                let mut out = vec![0f32; count];
                self.copy_dtoh(&x.buffer, offset, bytemuck::cast_slice_mut(&mut out))?;
                Ok(out)
            }
            ActivationType::Bf16 => {
                let mut bits = vec![0u16; count];
                self.copy_dtoh(&x.buffer, offset, bytemuck::cast_slice_mut(&mut bits))?;
                Ok(bits.iter().map(|&b| bf16::from_bits(b).to_f32()).collect())
            }
        }
    }

    fn argmax(&self, logits: &CudaTensor, row: usize, bias: Option<&CudaWeight>) -> Result<u32> {
        logits.check_f32("argmax")?;
        logits.check_rows(row + 1, "argmax")?;
        if let Some(b) = bias {
            let len = b.vector()?;
            ensure!(
                len == logits.cols,
                "logit mask of {len} entries for {} logits",
                logits.cols
            );
        }
        let values = self.scratch_buffer(|s| &mut s.argmax_values, ARGMAX_PARTIALS * 4)?;
        let indices = self.scratch_buffer(|s| &mut s.argmax_indices, ARGMAX_PARTIALS * 4)?;
        let id = self.scratch_buffer(|s| &mut s.argmax_id, 4)?;
        self.launch_argmax(
            logits.row_ptr(row),
            bias.map(|b| b.buffer.ptr()),
            values,
            indices,
            id,
            logits.cols,
        )?;
        let mut out = [0u32; 1];
        let scratch = self.scratch.borrow();
        let buffer = scratch.argmax_id.as_ref().expect("allocated above");
        self.copy_dtoh(buffer, 0, bytemuck::cast_slice_mut(&mut out))?;
        Ok(out[0])
    }

    fn synchronize(&self) -> Result<()> {
        self.device.synchronize()
    }

    fn run_step(&self, forward: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        let graphs = self.options.borrow().graphs;
        self.recorder.borrow_mut().begin(graphs);
        let ran = forward();
        let mut recorder = self.recorder.borrow_mut();
        let finished = match ran {
            Ok(()) => recorder.finish(self.device.as_ref()),
            Err(e) => {
                recorder.abandon();
                Err(e)
            }
        };
        drop(recorder);
        self.scratch.borrow_mut().retired.clear();
        // Timed from the step's first launch (see graph.rs), not from the host's first call.
        let start = match finished? {
            Some(start) => start,
            None => self.device.record_event()?,
        };
        let end = self.device.record_event()?;
        self.step_events.borrow_mut().push((start, end));
        Ok(())
    }

    fn max_step_sequences(&self) -> Option<usize> {
        Some(1)
    }

    fn take_step_device_seconds(&self) -> Result<Vec<f64>> {
        let events = std::mem::take(&mut *self.step_events.borrow_mut());
        events
            .iter()
            .map(|(start, end)| Ok(self.device.elapsed_ms(start, end)? as f64 / 1e3))
            .collect()
    }
}
