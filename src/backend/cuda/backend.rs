//! The CUDA backend: kvlab's kernels (kernels/*.cu) behind the [`Backend`] trait, over a
//! [`Device`] (a real GPU, or the CPU emulator running exactly the same kernels).
//!
//! Storage is bf16 (weights, matmul inputs, KV by default; KV may also be int8 or fp8 e4m3, with
//! f32 scales, quantized by the append and dequantized in registers by attention); the residual stream, the sublayer outputs added
//! to it, the logits, norm weights and RoPE frequencies are f32; every kernel accumulates in f32.
//!
//! KV memory: a pool's arena is one device buffer (`CudaKvMemory`); the kernels take its
//! address, its [`KvLayout`] by value (contiguous or chunked, read by the kernels from the
//! layout itself) and the step view (`StepView::packed`: the step's sequences, each row's
//! sequence and position, the block tables), which [`Backend::set_kv_step`] checks against the
//! arena and copies to device memory before the step's first launch. A step may hold rows of
//! many sequences: rope and kv_append (one launch in the forward pass: `rope_kv_append`) work
//! per row; attention sends sequences of several rows to
//! the prefill kernel and sequences of one row to the decode kernel (one launch for all of
//! them). Because positions, lengths and block tables are read from device memory, a decode
//! step with the same sequences' count and buffers repeats the previous step's launches exactly,
//! which is what lets it run as a CUDA graph (see [`super::graph`]).

use super::device::{Device, KernelArg, LaunchConfig, PROGRAMMATIC_KERNELS};
use super::graph::{GraphStats, Launch, StepRecorder};
use super::kernels::constants::DECODE_MAX_SPLITS;
use super::kernels::{
    decode_attention_groups, decode_attention_splits, prefill_attention_kernel,
    prefill_attention_tiles, DecodePartials, DeviceStep, KvArena, MatmulInput, MatmulOutput,
    ARGMAX_PARTIALS,
};
use super::memory::{MemoryLedger, MemoryReport, MemoryUse, TrackedBuffer};
use crate::backend::{Backend, BackendInfo, CHOSEN_IDS_KEPT};
use crate::kv::{ChunkCopy, KvDtype, KvLayout, StepView};
use crate::model::weights::HostTensor;
use crate::model::DType;
use anyhow::{bail, ensure, Context, Result};
use half::bf16;
use rayon::prelude::*;
use std::cell::RefCell;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

/// Knobs of the CUDA backend.
#[derive(Clone, Copy, Debug)]
pub struct CudaOptions {
    /// Run repeated decode steps as CUDA graphs (`--no-graphs` measures what they buy).
    pub graphs: bool,
    /// Most ranges decode attention cuts a sequence into (flash-decoding: the launch's grid);
    /// None chooses them from the step's longest context (`decode_attention_splits`). A split
    /// covers at least 32 positions, so short sequences use fewer.
    pub decode_splits: Option<usize>,
    /// Decode steps a generation runs before it reads their ids ([`Backend::decode_window`]):
    /// between reads the tokens stay on the device, and a recorded step replays with no copy.
    pub decode_window: usize,
    /// Launch the decode step's kernels as programmatic dependents (`--pdl`; sm_90+), so that
    /// each kernel's first weight loads overlap the previous kernel's tail. Off by default: no
    /// GPU has yet checked the ordering it relies on (the emulator runs launches in order).
    pub programmatic_launch: bool,
}

impl Default for CudaOptions {
    fn default() -> Self {
        CudaOptions {
            graphs: true,
            decode_splits: None,
            decode_window: 16,
            programmatic_launch: false,
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

/// A KV pool's arena on the device, and the step view its kernels read.
pub struct CudaKvMemory {
    layout: KvLayout,
    /// `[chunks, chunk_bytes]`: the pool's arena.
    arena: TrackedBuffer,
    /// The step's packed view (`StepView::packed`), as the kernels read it. Grown geometrically
    /// and otherwise kept: recorded launches carry its address, so a decode step replays the
    /// previous step's graph as long as the address stays (a growth prevents one replay).
    step_words: TrackedBuffer,
    /// The view last set ([`Backend::set_kv_step`]) or advanced ([`Backend::argmax_advance`]):
    /// what `step_words` holds once the queued work is done. The ops' launches are sized from it.
    step: StepView,
    /// Why `step` does not fit the arena, once an advance took it past its block tables: no op
    /// may read it then (the kernels index the view without checks).
    unfit: Option<String>,
}

impl CudaKvMemory {
    fn arena(&self) -> KvArena {
        KvArena {
            address: self.arena.ptr(),
            layout: self.layout,
        }
    }

    /// The view set for this step as the kernels take it; `step` must be that view.
    fn device_step(&self, step: &StepView, what: &str) -> Result<DeviceStep> {
        if let Some(why) = &self.unfit {
            bail!("{what}: the step view, advanced on the device, no longer fits its arena: {why}");
        }
        ensure!(
            *step == self.step,
            "{what}: the step view differs from the one set by set_kv_step ({} rows of {} \
             sequences set, {} rows of {} passed)",
            self.step.rows(),
            self.step.seqs.len(),
            step.rows(),
            step.seqs.len()
        );
        Ok(DeviceStep {
            address: self.step_words.ptr(),
            num_seqs: step.seqs.len(),
            rows: step.rows(),
        })
    }
}

/// Words of a fresh step-view buffer: a step of a few sequences of some hundred chunks each.
const STEP_WORDS_INITIAL: usize = 1024;

/// Buffers reused by every step, grown on demand.
#[derive(Default)]
struct Scratch {
    /// `[rows]` u32 token ids of the step.
    ids: Option<TrackedBuffer>,
    /// Decode attention partials (see `DecodePartials`).
    decode_acc: Option<TrackedBuffer>,
    decode_max_sum: Option<TrackedBuffer>,
    decode_counters: Option<TrackedBuffer>,
    /// The input of a many-row matmul computed first, `[rows, k]` bf16: rmsnorm(x) * weight or
    /// silu(gate) * up (one row is computed inside the matvec instead).
    staged_input: Option<TrackedBuffer>,
    /// A many-row matmul input read twice `[rows, 2 * k]`, for weights stored as bf16 pairs.
    pair_input: Option<TrackedBuffer>,
    /// Argmax partials `[ARGMAX_PARTIALS]` f32 + u32, its zeroed u32 block counter, and the
    /// chosen ids `[1 + CHOSEN_IDS_KEPT]` u32 (how many were chosen, then a ring of the latest).
    argmax_values: Option<TrackedBuffer>,
    argmax_indices: Option<TrackedBuffer>,
    argmax_blocks_done: Option<TrackedBuffer>,
    chosen_ids: Option<TrackedBuffer>,
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
    /// Blocks resident at once on the device per (kernel, threads, dynamic shared bytes).
    resident_blocks: RefCell<HashMap<(&'static str, u32, u32), usize>>,
    /// (start, end) events of each forward pass since the last `take_step_device_seconds`.
    step_events: RefCell<Vec<(super::device::Event, super::device::Event)>>,
}

impl CudaBackend {
    /// A backend over `device`; `name` is what reports call it ("cuda" or "emu").
    pub fn new(device: Arc<dyn Device>, name: &str, options: CudaOptions) -> Result<Self> {
        if let Some(splits) = options.decode_splits {
            check_decode_splits(splits)?;
        }
        ensure!(
            (1..=CHOSEN_IDS_KEPT).contains(&options.decode_window),
            "a decode window of 1 to {CHOSEN_IDS_KEPT} steps, not {}",
            options.decode_window
        );
        Ok(CudaBackend {
            device,
            name: name.to_string(),
            options: RefCell::new(options),
            ledger: Arc::new(MemoryLedger::default()),
            scratch: RefCell::new(Scratch::default()),
            recorder: RefCell::new(StepRecorder::default()),
            resident_blocks: RefCell::new(HashMap::new()),
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

    /// Turns programmatic dependent launch of the decode step's kernels on or off (a step's
    /// launches then differ from the captured graph's, so the next steps capture anew).
    pub fn set_programmatic_launch(&self, enabled: bool) {
        self.options.borrow_mut().programmatic_launch = enabled;
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

    /// The arena of a KV pool, `[chunks, chunk bytes]` (tests: what kv_append wrote where).
    pub fn read_kv_arena(&self, memory: &CudaKvMemory) -> Result<Vec<u8>> {
        let mut bytes = vec![0u8; memory.arena.len()];
        self.copy_dtoh(&memory.arena, 0, &mut bytes)?;
        Ok(bytes)
    }

    /// The step view of a KV pool as the kernels read it now (`StepView::packed`'s words; tests:
    /// what an advance on the device made of it).
    pub fn read_kv_step(&self, memory: &CudaKvMemory) -> Result<Vec<u32>> {
        let mut words = vec![0u32; memory.step.packed().len()];
        self.copy_dtoh(&memory.step_words, 0, bytemuck::cast_slice_mut(&mut words))?;
        Ok(words)
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

    /// The launches of the latest step that recorded to its end, in order (also when it
    /// replayed a graph): how many kernels a token costs, and their grids.
    pub fn last_step_launches(&self) -> Vec<(&'static str, LaunchConfig)> {
        self.recorder.borrow().last_step().to_vec()
    }

    /// How many blocks of `kernel` (`threads` threads, `shared` bytes of dynamic shared
    /// memory) the device holds at once: its occupancy times its SM count, asked once.
    pub(super) fn resident_blocks(
        &self,
        kernel: &'static str,
        threads: u32,
        shared: u32,
    ) -> Result<usize> {
        let key = (kernel, threads, shared);
        if let Some(&blocks) = self.resident_blocks.borrow().get(&key) {
            return Ok(blocks);
        }
        let per_multiprocessor = self
            .device
            .max_active_blocks_per_multiprocessor(kernel, threads, shared)?;
        ensure!(
            per_multiprocessor > 0,
            "kernel `{kernel}`: not one block of {threads} threads with {shared} bytes of dynamic \
             shared memory fits on a multiprocessor"
        );
        let blocks = per_multiprocessor as usize * self.device.multiprocessors() as usize;
        self.resident_blocks.borrow_mut().insert(key, blocks);
        Ok(blocks)
    }

    /// Issues a launch, or records it while a step records.
    pub(super) fn launch(
        &self,
        kernel: &'static str,
        mut config: LaunchConfig,
        args: Vec<KernelArg>,
    ) -> Result<()> {
        config.programmatic =
            self.options.borrow().programmatic_launch && PROGRAMMATIC_KERNELS.contains(&kernel);
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

    /// The argmax of row `row` of `logits` (+ bias), appended to the chosen ids; with `advance`,
    /// the kernel then moves that step view on.
    fn queue_argmax(
        &self,
        logits: &CudaTensor,
        row: usize,
        bias: Option<&CudaWeight>,
        advance: Option<DeviceStep>,
    ) -> Result<()> {
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
        let partials = (
            self.scratch_buffer(|s| &mut s.argmax_values, ARGMAX_PARTIALS * 4)?,
            self.scratch_buffer(|s| &mut s.argmax_indices, ARGMAX_PARTIALS * 4)?,
            self.scratch_buffer_init(|s| &mut s.argmax_blocks_done, 4, true)?,
        );
        let chosen =
            self.scratch_buffer_init(|s| &mut s.chosen_ids, (1 + CHOSEN_IDS_KEPT) * 4, true)?;
        self.launch_argmax(
            logits.row_ptr(row),
            bias.map(|b| b.buffer.ptr()),
            partials,
            chosen,
            CHOSEN_IDS_KEPT,
            advance,
            logits.cols,
        )
    }

    /// Launches `projections` of `rows` rows of `input` (`[rows, k]`). One row: matvecs that
    /// compute the input while they stage it, three bf16 outputs per launch. Many rows: the
    /// input is computed into scratch first, then one tensor-core matmul per weight.
    fn launch_projections(
        &self,
        input: MatmulInput,
        k: usize,
        rows: usize,
        projections: &[Projection],
    ) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        let many_rows_input = if rows > 1 {
            Some(self.stage_rows(input, k, rows)?)
        } else {
            None
        };
        // Weights stored differently do not share one staged input.
        for pair in [false, true] {
            let alike: Vec<&Projection> = projections.iter().filter(|p| p.pair == pair).collect();
            if alike.is_empty() {
                continue;
            }
            let Some(x) = many_rows_input else {
                let (bf16_outs, others): (Vec<&Projection>, Vec<&Projection>) = alike
                    .into_iter()
                    .partition(|p| p.output == MatmulOutput::Bf16);
                for group in bf16_outs.chunks(3) {
                    let targets: Vec<_> = group.iter().map(|p| (p.weight, p.out, p.n)).collect();
                    self.launch_matvec(input, &targets, k, pair, MatmulOutput::Bf16)?;
                }
                for p in others {
                    self.launch_matvec(input, &[(p.weight, p.out, p.n)], k, pair, p.output)?;
                }
                continue;
            };
            let (x, weight_cols) = if pair {
                let doubled = self.scratch_buffer(|s| &mut s.pair_input, rows * 2 * k * 2)?;
                self.launch_duplicate_columns(x, doubled, rows, k)?;
                (doubled, 2 * k)
            } else {
                (x, k)
            };
            for p in alike {
                self.launch_matmul_mma(x, p.weight, p.out, rows, p.n, weight_cols, p.output)?;
            }
        }
        Ok(())
    }

    /// `rows` rows of `input` as a bf16 `[rows, k]` buffer: x itself, or the norm or the SwiGLU
    /// computed into scratch.
    fn stage_rows(&self, input: MatmulInput, k: usize, rows: usize) -> Result<u64> {
        let staged = |this: &Self| this.scratch_buffer(|s| &mut s.staged_input, rows * k * 2);
        match input {
            MatmulInput::Bf16 { x } => Ok(x),
            MatmulInput::RmsNorm {
                residual,
                weight,
                eps,
            } => {
                let out = staged(self)?;
                self.launch_rms_norm(residual, weight, out, rows, k, eps)?;
                Ok(out)
            }
            MatmulInput::Swiglu { gate, up } => {
                let out = staged(self)?;
                self.launch_swiglu(gate, up, out, rows * k)?;
                Ok(out)
            }
        }
    }
}

/// One weight of a matmul and where its products go.
struct Projection {
    weight: u64,
    out: u64,
    /// The weight's rows (output features).
    n: usize,
    /// Stored as bf16 pairs `[n, 2k]`.
    pair: bool,
    output: MatmulOutput,
}

/// (weight, output) pairs checked as projections of an input of `rows` rows and `k` columns;
/// `add`: the outputs are f32 buffers that the products are added to.
fn projections(
    outputs: &[(&CudaWeight, &mut CudaTensor)],
    rows: usize,
    k: usize,
    add: bool,
) -> Result<Vec<Projection>> {
    outputs
        .iter()
        .map(|(w, out)| {
            let (n, cols, pair) = w.matrix()?;
            out.check_rows(rows, "matmul output")?;
            ensure!(
                cols == k && out.cols == n,
                "matmul shape mismatch: the input has {k} columns, weight {} is [{n}, {cols}], \
                 the output has {} columns",
                w.name,
                out.cols
            );
            let output = match (out.dtype, add) {
                (ActivationType::Bf16, false) => MatmulOutput::Bf16,
                (ActivationType::F32, false) => MatmulOutput::F32,
                (ActivationType::F32, true) => MatmulOutput::AddF32,
                (ActivationType::Bf16, true) => {
                    bail!("a projection is added to an f32 buffer (from alloc_precise), not bf16")
                }
            };
            Ok(Projection {
                weight: w.buffer.ptr(),
                out: out.ptr(),
                n,
                pair,
                output,
            })
        })
        .collect()
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

    /// bf16 (the default), and int8 and fp8 e4m3 quantized by the append and dequantized in
    /// registers by attention (kernels/kv_quant.cuh).
    fn kv_dtypes(&self) -> &'static [KvDtype] {
        &[KvDtype::Bf16, KvDtype::Int8, KvDtype::Fp8E4m3]
    }

    fn alloc_kv_memory(&self, layout: &KvLayout, chunks: usize) -> Result<CudaKvMemory> {
        prefill_attention_kernel(layout.head_dim as usize)?;
        ensure!(
            self.kv_dtypes().contains(&layout.dtype()),
            "the CUDA kernels store KV as bf16, int8 or fp8-e4m3, not {}",
            layout.dtype()
        );
        let bytes = chunks
            .checked_mul(layout.chunk_bytes())
            .filter(|&b| b > 0)
            .with_context(|| format!("a KV arena of {chunks} chunks has no valid size"))?;
        Ok(CudaKvMemory {
            layout: *layout,
            arena: self.tracked(MemoryUse::KvCache, bytes)?,
            step_words: self.tracked(MemoryUse::KvCache, STEP_WORDS_INITIAL * 4)?,
            step: StepView::empty(*layout),
            unfit: None,
        })
    }

    fn copy_kv_chunks(&self, memory: &mut CudaKvMemory, copies: &[ChunkCopy]) -> Result<()> {
        let chunk_bytes = memory.layout.chunk_bytes();
        let chunks = memory.arena.len() / chunk_bytes;
        for copy in copies {
            let (src, dst) = (copy.src as usize, copy.dst as usize);
            ensure!(
                src < chunks && dst < chunks,
                "KV chunk copy {src} -> {dst} outside an arena of {chunks} chunks"
            );
            // Ordered after the launches recorded so far, as every copy.
            self.recorder
                .borrow_mut()
                .flush_recording(self.device.as_ref())?;
            self.device.copy_dtod(
                memory.arena.buffer(),
                src * chunk_bytes,
                memory.arena.buffer(),
                dst * chunk_bytes,
                chunk_bytes,
            )?;
        }
        Ok(())
    }

    fn set_kv_step(&self, memory: &mut CudaKvMemory, step: &StepView) -> Result<()> {
        step.check_fits(
            &memory.layout,
            memory.arena.len() / memory.layout.chunk_bytes(),
        )?;
        let words = step.packed();
        let bytes: &[u8] = bytemuck::cast_slice(&words);
        if bytes.len() > memory.step_words.len() {
            // The new buffer is written (which issues the launches recorded so far) before
            // the old one is freed.
            let grown = self.tracked(
                MemoryUse::KvCache,
                bytes.len().max(2 * memory.step_words.len()),
            )?;
            self.copy_htod(&grown, 0, bytes)?;
            memory.step_words = grown;
        } else {
            self.copy_htod(&memory.step_words, 0, bytes)?;
        }
        memory.step.clone_from(step);
        memory.unfit = None;
        Ok(())
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

    fn embed_chosen(&self, table: &CudaWeight, out: &mut CudaTensor) -> Result<()> {
        let (_, hidden, pair) = table.matrix()?;
        out.check_f32("embed_chosen output")?;
        out.check_rows(1, "embed_chosen")?;
        ensure!(
            out.cols == hidden,
            "embed_chosen: table rows of {hidden}, output of {} columns",
            out.cols
        );
        let chosen = self
            .scratch
            .borrow()
            .chosen_ids
            .as_ref()
            .map(TrackedBuffer::ptr)
            .context("embed_chosen before any argmax chose an id")?;
        let table_cols = if pair { 2 * hidden } else { hidden };
        self.launch_embedding_gather_chosen(
            table.buffer.ptr(),
            chosen,
            out.ptr(),
            (hidden, table_cols),
            CHOSEN_IDS_KEPT,
        )
    }

    fn rms_norm(
        &self,
        x: &CudaTensor,
        weight: &CudaWeight,
        eps: f32,
        rows: usize,
        out: &mut CudaTensor,
    ) -> Result<()> {
        let dim = weight.vector()?;
        x.check_f32("rms_norm input")?;
        out.check_bf16("rms_norm output")?;
        for (t, what) in [(x, "rms_norm input"), (&*out, "rms_norm output")] {
            t.check_rows(rows, what)?;
            ensure!(
                t.cols == dim,
                "{what} has {} columns, norm weight {dim}",
                t.cols
            );
        }
        self.launch_rms_norm(x.ptr(), weight.buffer.ptr(), out.ptr(), rows, dim, eps)
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
        let projections = projections(outputs, rows, x.cols, false)?;
        self.launch_projections(MatmulInput::Bf16 { x: x.ptr() }, x.cols, rows, &projections)
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
            memory.device_step(step, "rope")?,
            (q.cols / head_dim, k.cols / head_dim, head_dim),
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
            memory.arena(),
            memory.device_step(step, "kv_append")?,
            layer,
        )
    }

    fn rope_kv_append(
        &self,
        q: &mut CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        inv_freq: &CudaWeight,
        memory: &mut CudaKvMemory,
        step: &StepView,
        layer: usize,
    ) -> Result<()> {
        let layout = memory.layout;
        let rows = step.rows();
        let head_dim = layout.head_dim as usize;
        let kv_dim = layout.num_kv_heads as usize * head_dim;
        ensure!(
            2 * inv_freq.vector()? == head_dim,
            "rope_kv_append: {} RoPE frequencies for heads of {head_dim}",
            inv_freq.vector()?
        );
        q.check_bf16("rope_kv_append q")?;
        q.check_rows(rows, "rope_kv_append q")?;
        ensure!(
            q.cols.is_multiple_of(head_dim),
            "rope_kv_append: q has {} columns, not whole heads of {head_dim}",
            q.cols
        );
        for (t, what) in [(k, "k"), (v, "v")] {
            t.check_bf16(what)?;
            t.check_rows(rows, what)?;
            ensure!(
                t.cols == kv_dim,
                "rope_kv_append: {what} has {} columns, the cache {kv_dim}",
                t.cols
            );
        }
        ensure!(
            layer < layout.num_layers as usize,
            "rope_kv_append: layer {layer} of {}",
            layout.num_layers
        );
        self.launch_rope_kv_append(
            q.ptr(),
            k.ptr(),
            v.ptr(),
            inv_freq.buffer.ptr(),
            memory.arena(),
            memory.device_step(step, "rope_kv_append")?,
            q.cols / head_dim,
            layer,
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
            num_heads > 0 && num_heads.is_multiple_of(kv_heads),
            "attention: {num_heads} query heads do not share {kv_heads} KV heads evenly"
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
        let device_step = memory.device_step(step, "attention")?;
        // Sequences of several rows (prefill chunks) go to the prefill kernel and sequences of
        // one row (decode) to the decode kernel, both in the same step when it mixes them: in
        // the prefill kernel a decode row would fill 1/16 to 1/64 of its tile's tensor-core
        // rows and stream its whole context through one block per KV head, where the decode
        // kernel splits the context over many blocks (flash-decoding). Each kernel skips the
        // other's sequences; their output rows are disjoint.
        let tiles = prefill_attention_tiles(step, num_heads / kv_heads);
        if tiles > 0 {
            self.launch_attention_prefill(
                q.ptr(),
                memory.arena(),
                device_step,
                out.ptr(),
                tiles,
                num_heads,
                layer,
            )?;
        }
        let longest_decode = step
            .seqs
            .iter()
            .filter(|seq| seq.rows == 1)
            .map(|seq| seq.end())
            .max();
        if let Some(longest) = longest_decode {
            let num_seqs = step.seqs.len();
            let splits = self
                .options
                .borrow()
                .decode_splits
                .unwrap_or_else(|| decode_attention_splits(longest));
            let partials = DecodePartials {
                acc: self.scratch_buffer(
                    |s| &mut s.decode_acc,
                    num_seqs * num_heads * splits * head_dim * 4,
                )?,
                max_sum: self.scratch_buffer(
                    |s| &mut s.decode_max_sum,
                    num_seqs * num_heads * splits * 2 * 4,
                )?,
                split_counters: self.scratch_buffer_init(
                    |s| &mut s.decode_counters,
                    num_seqs * decode_attention_groups(num_heads, &layout) * 4,
                    true,
                )?,
            };
            self.launch_attention_decode(
                q.ptr(),
                memory.arena(),
                device_step,
                partials,
                out.ptr(),
                num_heads,
                layer,
                splits,
            )?;
        }
        Ok(())
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
        self.launch_swiglu(gate.ptr(), up.ptr(), gate.ptr(), rows * gate.cols)
    }

    /// One row: a matvec that normalises x while it stages it (no norm launch).
    fn rms_norm_matmul_many(
        &self,
        x: &CudaTensor,
        x_rows: Range<usize>,
        norm: &CudaWeight,
        eps: f32,
        outputs: &mut [(&CudaWeight, &mut CudaTensor)],
    ) -> Result<()> {
        let dim = norm.vector()?;
        x.check_f32("rms_norm_matmul_many input")?;
        x.check_rows(x_rows.end, "rms_norm_matmul_many input")?;
        ensure!(
            x.cols == dim,
            "rms_norm_matmul_many: the input has {} columns, norm weight {dim}",
            x.cols
        );
        let rows = x_rows.len();
        let projections = projections(outputs, rows, dim, false)?;
        let input = MatmulInput::RmsNorm {
            residual: x.row_ptr(x_rows.start),
            weight: norm.buffer.ptr(),
            eps,
        };
        self.launch_projections(input, dim, rows, &projections)
    }

    /// One row: the matvec adds each product to the residual as it stores it.
    fn matmul_add(
        &self,
        x: &CudaTensor,
        w: &CudaWeight,
        rows: usize,
        residual: &mut CudaTensor,
    ) -> Result<()> {
        x.check_bf16("matmul_add input")?;
        x.check_rows(rows, "matmul_add input")?;
        let projections = projections(&[(w, residual)], rows, x.cols, true)?;
        self.launch_projections(MatmulInput::Bf16 { x: x.ptr() }, x.cols, rows, &projections)
    }

    /// One row: a matvec that applies the SwiGLU while it stages its input and adds each
    /// product to the residual (no SwiGLU launch).
    fn swiglu_matmul_add(
        &self,
        gate: &CudaTensor,
        up: &CudaTensor,
        w: &CudaWeight,
        rows: usize,
        residual: &mut CudaTensor,
    ) -> Result<()> {
        for (t, what) in [
            (gate, "swiglu_matmul_add gate"),
            (up, "swiglu_matmul_add up"),
        ] {
            t.check_bf16(what)?;
            t.check_rows(rows, what)?;
        }
        ensure!(
            gate.cols == up.cols,
            "swiglu_matmul_add: gate has {} columns, up {}",
            gate.cols,
            up.cols
        );
        let projections = projections(&[(w, residual)], rows, gate.cols, true)?;
        let input = MatmulInput::Swiglu {
            gate: gate.ptr(),
            up: up.ptr(),
        };
        self.launch_projections(input, gate.cols, rows, &projections)
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

    fn argmax(&self, logits: &CudaTensor, row: usize, bias: Option<&CudaWeight>) -> Result<()> {
        self.queue_argmax(logits, row, bias, None)
    }

    fn argmax_advance(
        &self,
        logits: &CudaTensor,
        row: usize,
        bias: Option<&CudaWeight>,
        memory: &mut CudaKvMemory,
        step: &mut StepView,
    ) -> Result<()> {
        let device_step = memory.device_step(step, "argmax_advance")?;
        self.queue_argmax(logits, row, bias, Some(device_step))?;
        step.advance();
        memory.step.advance();
        let chunks = memory.arena.len() / memory.layout.chunk_bytes();
        memory.unfit = memory
            .step
            .check_fits(&memory.layout, chunks)
            .err()
            .map(|e| format!("{e:#}"));
        Ok(())
    }

    fn read_chosen(&self, n: usize) -> Result<Vec<u32>> {
        let scratch = self.scratch.borrow();
        let buffer = scratch
            .chosen_ids
            .as_ref()
            .context("read_chosen before any argmax chose an id")?;
        let mut words = vec![0u32; 1 + CHOSEN_IDS_KEPT];
        self.copy_dtoh(buffer, 0, bytemuck::cast_slice_mut(&mut words))?;
        let count = words[0] as usize;
        ensure!(
            n >= 1 && n <= count.min(CHOSEN_IDS_KEPT),
            "{n} chosen ids asked for; argmax has chosen {count} (the latest {CHOSEN_IDS_KEPT} \
             are kept)"
        );
        Ok((count - n..count)
            .map(|i| words[1 + i % CHOSEN_IDS_KEPT])
            .collect())
    }

    fn decode_window(&self) -> usize {
        self.options.borrow().decode_window
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

    fn take_step_device_seconds(&self) -> Result<Vec<f64>> {
        let events = std::mem::take(&mut *self.step_events.borrow_mut());
        events
            .iter()
            .map(|(start, end)| Ok(self.device.elapsed_ms(start, end)? as f64 / 1e3))
            .collect()
    }
}
