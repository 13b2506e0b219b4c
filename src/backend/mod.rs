//! Backends: one trait, a CPU implementation and a CUDA implementation.
//!
//! The forward pass (`model::forward`) is written once against [`Backend`]. A backend owns its
//! activation buffers (`Tensor`), its copy of the weights (`Weight`) and the memory of KV pools
//! (`KvMemory`: one arena per [`ChunkPool`], whose bookkeeping lives in `crate::kv`).
//! Activations are row-major `[rows, cols]`; every op takes the number of rows it works on, so
//! buffers are allocated once for the largest step and reused (which CUDA graphs need).
pub mod cpu;
pub mod cuda;

use crate::kv::{ChunkCopy, ChunkPool, KvDtype, KvLayout, SeqId, StepView};
use crate::model::weights::HostTensor;
use anyhow::{Context, Result};
use std::ops::Range;

/// Ids a backend keeps of its latest `argmax` choices for [`Backend::read_chosen`]: the most
/// decode steps a generation runs before it reads their ids ([`Backend::decode_window`]).
pub const CHOSEN_IDS_KEPT: usize = 64;

/// What a backend says about itself in reports.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BackendInfo {
    /// "cpu", "cuda" or "emu".
    pub name: String,
    /// The device: CPU model and threads, or GPU name and compute capability.
    pub device: String,
    /// Element type of activations, and of KV entries (the backend's default until a run
    /// chooses another).
    pub activation_dtype: String,
    pub kv_dtype: String,
}

pub trait Backend: Sized {
    /// An activation buffer, `[rows, cols]` row-major.
    type Tensor;
    /// A weight resident on the backend: matrix `[out, in]` or vector `[n]`.
    type Weight;
    /// The arena of one KV pool (`chunks × KvLayout::chunk_bytes()`), and the backend's copy of
    /// the step view when the ops cannot read it from the host (a device buffer on CUDA).
    type KvMemory;

    fn info(&self) -> BackendInfo;

    /// Copies (or maps) a checkpoint tensor into the backend.
    fn upload_weight(&self, tensor: &HostTensor) -> Result<Self::Weight>;
    /// A vector of f32 values (RoPE frequencies, a logit mask).
    fn upload_vector(&self, values: &[f32]) -> Result<Self::Weight>;
    fn alloc(&self, rows: usize, cols: usize) -> Result<Self::Tensor>;
    /// A buffer that accumulates rather than feeds a matmul: the residual stream, the sublayer
    /// outputs added to it, the logits. A backend may keep these at a higher precision than
    /// other activations (CUDA: f32 beside bf16).
    fn alloc_precise(&self, rows: usize, cols: usize) -> Result<Self::Tensor> {
        self.alloc(rows, cols)
    }

    /// Element types of KV entries this backend stores; the first is its default.
    fn kv_dtypes(&self) -> &'static [KvDtype];
    /// The arena of a pool of `chunks` chunks of `layout` (contents undefined until written).
    fn alloc_kv_memory(&self, layout: &KvLayout, chunks: usize) -> Result<Self::KvMemory>;
    /// Copies whole chunks inside the arena, in order (the pool's copy-on-write).
    fn copy_kv_chunks(&self, memory: &mut Self::KvMemory, copies: &[ChunkCopy]) -> Result<()>;
    /// Called at the start of each forward step, before its first launch: the rows, positions
    /// and block tables that `rope`, `kv_append`, `rope_kv_append` and `attention` will read.
    fn set_kv_step(&self, memory: &mut Self::KvMemory, step: &StepView) -> Result<()>;
    /// Whether `kv_append` and `attention` follow the slot maps of sequences that evicted
    /// positions, and `attention` sums the attention mass that H2O ranks positions by.
    fn supports_eviction(&self) -> bool {
        false
    }
    /// The attention mass each slot received during the last forward step, summed over layers,
    /// query heads and rows: the step's sequences' [`StepView::slots`] values one after another
    /// (zeros for a sequence that does not track it).
    fn take_attention_mass(&self, _memory: &mut Self::KvMemory) -> Result<Vec<f32>> {
        anyhow::bail!(
            "the {} backend does not measure attention mass (H2O)",
            self.info().name
        )
    }

    /// out[r, :] = table[ids[r], :] (out: the residual stream, from `alloc_precise`)
    fn embed(&self, table: &Self::Weight, ids: &[u32], out: &mut Self::Tensor) -> Result<()>;
    /// out[0] = table[the id chosen by the latest `argmax`] (out: the residual stream): the input
    /// of a decode step whose token never went to the host.
    fn embed_chosen(&self, table: &Self::Weight, out: &mut Self::Tensor) -> Result<()>;
    /// out[r] = rmsnorm(x[r]) * weight for r < rows (x: the residual stream, from
    /// `alloc_precise`; out from `alloc`).
    fn rms_norm(
        &self,
        x: &Self::Tensor,
        weight: &Self::Weight,
        eps: f32,
        rows: usize,
        out: &mut Self::Tensor,
    ) -> Result<()>;
    /// out[rows, w.out] = x[rows, w.in] · wᵀ
    fn matmul(
        &self,
        x: &Self::Tensor,
        w: &Self::Weight,
        rows: usize,
        out: &mut Self::Tensor,
    ) -> Result<()>;
    /// outputs[i] = x · w_iᵀ for every (w_i, output_i): projections of one input (q, k, v; gate,
    /// up), which a backend may compute in one pass over x.
    fn matmul_many(
        &self,
        x: &Self::Tensor,
        outputs: &mut [(&Self::Weight, &mut Self::Tensor)],
        rows: usize,
    ) -> Result<()> {
        for (w, out) in outputs.iter_mut() {
            self.matmul(x, w, rows, out)?;
        }
        Ok(())
    }

    /// Rotates q `[rows, num_heads * head_dim]` and k `[rows, num_kv_heads * head_dim]` in place
    /// (half-split `rotate_half` layout), each row at its position in the step view.
    fn rope(
        &self,
        q: &mut Self::Tensor,
        k: &mut Self::Tensor,
        inv_freq: &Self::Weight,
        memory: &Self::KvMemory,
        step: &StepView,
    ) -> Result<()>;
    /// Writes the step's k and v `[rows, num_kv_heads * head_dim]` for `layer` at each row's
    /// position of its sequence.
    fn kv_append(
        &self,
        memory: &mut Self::KvMemory,
        step: &StepView,
        layer: usize,
        k: &Self::Tensor,
        v: &Self::Tensor,
    ) -> Result<()>;
    /// Rotates q in place as `rope` does, and writes k rotated the same way and v
    /// `[rows, num_kv_heads * head_dim]` for `layer` at each row's position of its sequence, as
    /// `kv_append` does; k itself is only read. Equals `rope`, then `kv_append` of the rotated k:
    /// the forward pass's one op between the projections and attention (one launch on CUDA).
    #[allow(clippy::too_many_arguments)]
    fn rope_kv_append(
        &self,
        q: &mut Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        inv_freq: &Self::Weight,
        memory: &mut Self::KvMemory,
        step: &StepView,
        layer: usize,
    ) -> Result<()>;
    /// Causal GQA attention of the step's queries `[rows, num_heads * head_dim]`: each row over
    /// the positions of its own sequence up to its own; out has q's shape.
    fn attention(
        &self,
        q: &Self::Tensor,
        memory: &Self::KvMemory,
        step: &StepView,
        layer: usize,
        num_heads: usize,
        out: &mut Self::Tensor,
    ) -> Result<()>;
    /// gate = silu(gate) * up, in place, `[rows, intermediate]`.
    fn swiglu(&self, gate: &mut Self::Tensor, up: &Self::Tensor, rows: usize) -> Result<()>;

    // The fused ops of the forward pass. Each equals the composition its doc names (a backend
    // may compute it in fewer passes: the CUDA decode step stages a norm or a SwiGLU inside the
    // matvec that reads it, and adds a projection to the residual stream as it stores it).

    /// outputs[i][r] = (rmsnorm(x[x_rows.start + r]) * norm) · w_iᵀ for every (w_i, output_i)
    /// and r < x_rows.len(): a sublayer's norm and its projections (q, k, v; gate, up; the
    /// logits of the last row only). x is the residual stream (`alloc_precise`); the normed rows
    /// are not kept. Equals `rms_norm` of those rows, then `matmul_many`.
    fn rms_norm_matmul_many(
        &self,
        x: &Self::Tensor,
        x_rows: Range<usize>,
        norm: &Self::Weight,
        eps: f32,
        outputs: &mut [(&Self::Weight, &mut Self::Tensor)],
    ) -> Result<()>;
    /// residual[r] += x[r] · wᵀ for r < rows: a sublayer's output projection added to the
    /// residual stream (`alloc_precise`). Equals `matmul` into an f32 buffer, then an f32 add.
    fn matmul_add(
        &self,
        x: &Self::Tensor,
        w: &Self::Weight,
        rows: usize,
        residual: &mut Self::Tensor,
    ) -> Result<()>;
    /// residual[r] += (silu(gate[r]) * up[r]) · wᵀ for r < rows: the MLP's activation and down
    /// projection added to the residual stream; gate and up are left as they are. Equals
    /// `swiglu` into a copy of gate, then `matmul_add`.
    fn swiglu_matmul_add(
        &self,
        gate: &Self::Tensor,
        up: &Self::Tensor,
        w: &Self::Weight,
        rows: usize,
        residual: &mut Self::Tensor,
    ) -> Result<()>;

    /// Rows `first..first + rows` of x as f32 on the host.
    fn read_rows(&self, x: &Self::Tensor, first: usize, rows: usize) -> Result<Vec<f32>>;
    /// Chooses the index of the largest value of row `row` of `logits` (plus `bias` when given:
    /// a mask of 0 / -inf that restricts the choice). Queued like any op, so that inside
    /// `run_step` it is part of the step (a CUDA graph replays it); [`Backend::read_argmax`]
    /// brings the id to the host.
    fn argmax(&self, logits: &Self::Tensor, row: usize, bias: Option<&Self::Weight>) -> Result<()>;
    /// `argmax`, then every sequence of one row in `step` moves on by one position
    /// ([`StepView::advance`]), in `step` and where the ops read the view (device memory on
    /// CUDA): the next decode step's positions need no copy from the host. Its chunks must be
    /// in the view's block tables already ([`KvStore::prepare_decode`] reserves a run's). A
    /// backend may do both in one pass (CUDA: the argmax's last block advances the view).
    fn argmax_advance(
        &self,
        logits: &Self::Tensor,
        row: usize,
        bias: Option<&Self::Weight>,
        memory: &mut Self::KvMemory,
        step: &mut StepView,
    ) -> Result<()>;
    /// The ids chosen by the latest `n` `argmax` calls (`n` at most [`CHOSEN_IDS_KEPT`]),
    /// oldest first, once they are done: only these `4 n` bytes (and a count) leave the device.
    fn read_chosen(&self, n: usize) -> Result<Vec<u32>>;
    /// The id chosen by the latest `argmax`, once it is done.
    fn read_argmax(&self) -> Result<u32> {
        Ok(self.read_chosen(1)?[0])
    }
    /// Decode steps a generation runs before it reads their ids (`read_chosen`): 1 where
    /// reading an id costs nothing (the CPU; a step run past a stop token is wasted work), more
    /// where each read is a round trip to a device, at most [`CHOSEN_IDS_KEPT`].
    fn decode_window(&self) -> usize {
        1
    }
    /// Waits for queued work (a no-op on the CPU); timings are taken after it.
    fn synchronize(&self) -> Result<()>;

    /// Runs `forward`, one whole forward pass. A backend may record the work it queues and
    /// replay an identical recording from an earlier step instead (CUDA graphs); the default
    /// just runs it.
    fn run_step(&self, forward: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        forward()
    }

    /// Device time of each `run_step` since the last call, in seconds, where the backend
    /// measures it apart from the host clock (CUDA events); empty otherwise.
    fn take_step_device_seconds(&self) -> Result<Vec<f64>> {
        Ok(Vec::new())
    }
}

/// A KV pool: its bookkeeping (`crate::kv`) beside the backend's arena for it.
pub struct KvStore<B: Backend> {
    pub pool: ChunkPool,
    pub memory: B::KvMemory,
}

impl<B: Backend> KvStore<B> {
    /// A pool of `chunks` chunks of `layout` and its arena.
    pub fn new(backend: &B, layout: KvLayout, chunks: usize, prefix_caching: bool) -> Result<Self> {
        if !backend.kv_dtypes().contains(&layout.dtype()) {
            let names: Vec<&str> = backend.kv_dtypes().iter().map(|d| d.name()).collect();
            anyhow::bail!(
                "the {} backend stores KV as {}, not {}",
                backend.info().name,
                names.join(", "),
                layout.dtype()
            );
        }
        let pool = ChunkPool::new(layout, chunks, prefix_caching)?;
        let memory = backend.alloc_kv_memory(&layout, chunks).with_context(|| {
            format!(
                "allocating a KV arena of {chunks} chunks ({:.1} MiB)",
                (chunks * layout.chunk_bytes()) as f64 / (1u64 << 20) as f64
            )
        })?;
        Ok(KvStore { pool, memory })
    }

    /// Reserves `rows` new positions for each sequence, makes the pool's copy-on-write copies,
    /// and returns the step's view (sequences' rows in this order).
    pub fn prepare_step(&mut self, backend: &B, steps: &[(SeqId, usize)]) -> Result<StepView> {
        let mut copies = Vec::new();
        for &(id, rows) in steps {
            copies.extend(self.pool.reserve(id, rows)?);
        }
        self.reserved_step(backend, &copies, steps)
    }

    /// The view of a step whose rows the pool has reserved already (a scheduler reserves them
    /// one sequence at a time, deciding what fits), after making the `copies` those
    /// reservations returned, in their order (a later copy may write a chunk an earlier one
    /// read).
    pub fn reserved_step(
        &mut self,
        backend: &B,
        copies: &[ChunkCopy],
        steps: &[(SeqId, usize)],
    ) -> Result<StepView> {
        if !copies.is_empty() {
            backend.copy_kv_chunks(&mut self.memory, copies)?;
        }
        let view = self.pool.step_view(steps)?;
        refuse_unsupported_eviction(backend, &view)?;
        Ok(view)
    }

    /// Reserves `steps` new positions for each sequence (one a decode step), makes the copies,
    /// and returns the view of the first step: one row each, with the block tables of all the
    /// reserved positions, so that the backend can advance it step by step itself
    /// ([`Backend::argmax_advance`]). The caller commits the steps it keeps
    /// ([`ChunkPool::commit_first`]).
    pub fn prepare_decode(
        &mut self,
        backend: &B,
        seqs: &[SeqId],
        steps: usize,
    ) -> Result<StepView> {
        for &id in seqs {
            let copies = self.pool.reserve(id, steps)?;
            if !copies.is_empty() {
                backend.copy_kv_chunks(&mut self.memory, &copies)?;
            }
        }
        let view = self.pool.decode_view(seqs)?;
        refuse_unsupported_eviction(backend, &view)?;
        Ok(view)
    }

    /// After a step's forward pass: commits each sequence's new tokens, adds the attention mass
    /// the step measured (H2O), and evicts what each sequence's policy no longer keeps.
    pub fn finish_step(
        &mut self,
        backend: &B,
        view: &StepView,
        steps: &[(SeqId, &[u32])],
    ) -> Result<()> {
        for &(id, tokens) in steps {
            self.pool.commit(id, tokens)?;
        }
        if view.track_mass.contains(&true) {
            let mass = backend.take_attention_mass(&mut self.memory)?;
            let mut offset = 0;
            for (index, &(id, _)) in steps.iter().enumerate() {
                let slots = view.slots(index);
                let seq_mass = mass.get(offset..offset + slots).with_context(|| {
                    format!(
                        "attention mass of {} values for a step of more slots",
                        mass.len()
                    )
                })?;
                self.pool.add_attention_mass(id, seq_mass)?;
                offset += slots;
            }
        }
        for &(id, _) in steps {
            self.pool.apply_policy(id)?;
        }
        Ok(())
    }
}

/// A step of a sequence that evicted positions (a slot map) needs a backend whose `kv_append`
/// and `attention` follow slot maps.
fn refuse_unsupported_eviction<B: Backend>(backend: &B, view: &StepView) -> Result<()> {
    if view.has_slot_maps() && !backend.supports_eviction() {
        anyhow::bail!(
            "the {} backend keeps every position: a sequence that evicted positions \
             (--kv-policy) runs on the CPU backend",
            backend.info().name
        );
    }
    Ok(())
}
