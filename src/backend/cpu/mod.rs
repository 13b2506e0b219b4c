//! CPU backend: f32 activations, KV entries in f32 (default, exact against transformers' f32),
//! bf16, int8 or fp8 e4m3 (quantized as they are appended, dequantized as attention reads them),
//! weights read in their stored dtype straight from the mmap'd checkpoint, multi-threaded with
//! rayon.

pub mod attention;
pub mod matmul;
pub mod simd;

use super::{Backend, BackendInfo, CHOSEN_IDS_KEPT};
use crate::kv::quant::{quantize_e4m3, quantize_int8, E4m3};
use crate::kv::{ChunkCopy, KvDtype, KvLayout, KvPart, RowOffsets, StepView};
use crate::model::weights::HostTensor;
use anyhow::{bail, ensure, Context, Result};
use half::bf16;
use matmul::MatRef;
use rayon::prelude::*;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::ops::Range;

/// A weight on the CPU: matrices stay in the mapping, vectors become f32.
pub enum CpuWeight {
    Matrix(HostTensor),
    Vector(Vec<f32>),
}

impl CpuWeight {
    fn matrix(&self) -> Result<MatRef<'_>> {
        match self {
            CpuWeight::Matrix(t) => Ok(MatRef {
                dtype: t.dtype,
                rows: t.shape[0],
                cols: t.shape[1],
                data: t.bytes(),
            }),
            CpuWeight::Vector(_) => bail!("a vector was passed where a matrix is expected"),
        }
    }

    fn vector(&self) -> Result<&[f32]> {
        match self {
            CpuWeight::Vector(v) => Ok(v),
            CpuWeight::Matrix(t) => {
                bail!("matrix {} was passed where a vector is expected", t.name)
            }
        }
    }
}

/// An activation buffer `[rows, cols]`; ops use its first `rows` rows.
pub struct CpuTensor {
    pub data: Vec<f32>,
    pub cols: usize,
}

/// The arena of a KV pool: `chunks × chunk_bytes` bytes, zeroed lazily by the OS (an arena
/// sized for a whole context costs memory only where it is written).
pub struct CpuKvMemory {
    layout: KvLayout,
    ptr: std::ptr::NonNull<u8>,
    alloc: std::alloc::Layout,
    /// The step's attention mass per slot of each of its sequences (`accumulate_mass`), summed
    /// over the layers; sized by `set_kv_step` when a sequence tracks it, else empty.
    attention_mass: std::sync::Mutex<Vec<f32>>,
}

// SAFETY: the arena is plain memory owned by this value; access goes through & / &mut self.
unsafe impl Send for CpuKvMemory {}
unsafe impl Sync for CpuKvMemory {}

impl CpuKvMemory {
    fn new(layout: &KvLayout, chunks: usize) -> Result<Self> {
        let bytes = chunks
            .checked_mul(layout.chunk_bytes())
            .filter(|&b| b > 0)
            .ok_or_else(|| anyhow::anyhow!("a KV arena of {chunks} chunks has no valid size"))?;
        // At the allocator's own alignment (16 bytes), `alloc_zeroed` is `calloc`, whose large
        // blocks are fresh zero pages from the OS; a larger alignment would memset every byte.
        // The kernels load unaligned vectors.
        let alloc = std::alloc::Layout::from_size_align(bytes, 16)?;
        // SAFETY: the size is non-zero.
        let ptr = std::ptr::NonNull::new(unsafe { std::alloc::alloc_zeroed(alloc) }).ok_or_else(
            || anyhow::anyhow!("out of host memory for a KV arena of {} MiB", bytes >> 20),
        )?;
        Ok(CpuKvMemory {
            layout: *layout,
            ptr,
            alloc,
            attention_mass: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// The arena's bytes (tests: what was written where).
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `alloc.size()` initialised (zeroed) bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.alloc.size()) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, borrowed mutably through &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.alloc.size()) }
    }

    /// Writes one `head_dim` row of `part` at `at`, as the arena's type stores it.
    fn store_row(&mut self, part: KvPart, at: RowOffsets, row: &[f32]) {
        let dtype = self.layout.dtype();
        write_kv_row(self.bytes_mut(), dtype, part, at, row);
    }
}

impl Drop for CpuKvMemory {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.alloc) }
    }
}

pub struct CpuBackend {
    threads: usize,
    /// What a fused op computes on the way (the normed rows, the activated rows; the product
    /// before its add), kept between calls so that a decode step allocates nothing.
    input_scratch: Cell<Vec<f32>>,
    product_scratch: Cell<Vec<f32>>,
    /// The ids chosen by the latest `argmax` calls, oldest first (at most CHOSEN_IDS_KEPT).
    chosen: RefCell<VecDeque<u32>>,
}

impl CpuBackend {
    pub fn new() -> CpuBackend {
        CpuBackend {
            threads: rayon::current_num_threads(),
            input_scratch: Cell::default(),
            product_scratch: Cell::default(),
            chosen: RefCell::default(),
        }
    }

    /// A `[rows, cols]` tensor over the buffer taken from `slot`; give the buffer back with
    /// `slot.set(tensor.data)`.
    fn scratch(slot: &Cell<Vec<f32>>, rows: usize, cols: usize) -> CpuTensor {
        let mut data = slot.take();
        if data.len() < rows * cols {
            data.resize(rows * cols, 0.0);
        }
        CpuTensor { data, cols }
    }
}

/// Fails unless `t` has `cols` columns and at least `rows` rows.
fn check_shape(t: &CpuTensor, rows: usize, cols: usize, what: &str) -> Result<()> {
    ensure!(
        t.cols == cols && t.data.len() >= rows * cols,
        "{what}: [{rows}, {cols}] requested from a tensor of {} columns and {} rows",
        t.cols,
        t.data.len() / t.cols.max(1)
    );
    Ok(())
}

/// out[r] = rmsnorm(x[r]) * w for every row of x `[rows, w.len()]`.
fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let dim = w.len();
    out.par_chunks_mut(dim)
        .zip(x.par_chunks(dim))
        .for_each(|(o, x)| {
            let mean_square = x.iter().map(|v| v * v).sum::<f32>() / dim as f32;
            let scale = 1.0 / (mean_square + eps).sqrt();
            for ((o, x), w) in o.iter_mut().zip(x).zip(w) {
                *o = w * (x * scale);
            }
        });
}

/// cos and sin of RoPE's angles at `position`, as transformers computes them: angle =
/// float32(position) * inv_freq in float32, its cos and sin.
fn rope_cos_sin(inv_freq: &[f32], position: u32) -> (Vec<f32>, Vec<f32>) {
    inv_freq
        .iter()
        .map(|f| {
            let angle = (position as f32 * f) as f64;
            (angle.cos() as f32, angle.sin() as f32)
        })
        .unzip()
}

/// Rotates one head `[2 * cos.len()]` in place, half-split (`rotate_half`) layout.
fn rotate_half(head: &mut [f32], cos: &[f32], sin: &[f32]) {
    let (x1, x2) = head.split_at_mut(cos.len());
    for i in 0..cos.len() {
        let (a, b) = (x1[i], x2[i]);
        x1[i] = a * cos[i] - b * sin[i];
        x2[i] = b * cos[i] + a * sin[i];
    }
}

/// Fails unless k and v `[step rows, num_kv_heads * head_dim]` fit the cache of `memory` and
/// `layer` is one of its layers.
fn check_kv_rows(
    memory: &CpuKvMemory,
    step: &StepView,
    layer: usize,
    k: &CpuTensor,
    v: &CpuTensor,
    what: &str,
) -> Result<()> {
    let layout = memory.layout;
    let kv_dim = layout.num_kv_heads as usize * layout.head_dim as usize;
    ensure!(
        k.cols == kv_dim && v.cols == kv_dim,
        "{what}: k has {} and v {} columns, the cache {kv_dim}",
        k.cols,
        v.cols
    );
    ensure!(
        layer < layout.num_layers as usize,
        "{what}: layer {layer} of a cache of {} layers",
        layout.num_layers
    );
    let rows = step.rows();
    ensure!(
        k.data.len() >= rows * kv_dim && v.data.len() >= rows * kv_dim,
        "{what}: a step of {rows} rows does not fit k or v"
    );
    Ok(())
}

impl Default for CpuBackend {
    fn default() -> Self {
        Self::new()
    }
}

fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|n| n.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;
    type Weight = CpuWeight;
    type KvMemory = CpuKvMemory;

    fn info(&self) -> BackendInfo {
        BackendInfo {
            name: "cpu".into(),
            device: format!("{}, {} threads", cpu_name(), self.threads),
            activation_dtype: "f32".into(),
            kv_dtype: self.kv_dtypes()[0].name().into(),
        }
    }

    fn upload_weight(&self, tensor: &HostTensor) -> Result<CpuWeight> {
        Ok(match tensor.shape.len() {
            1 => CpuWeight::Vector(tensor.to_f32()),
            2 => CpuWeight::Matrix(tensor.clone()),
            _ => bail!(
                "tensor {} has rank {}; expected a vector or a matrix",
                tensor.name,
                tensor.shape.len()
            ),
        })
    }

    fn upload_vector(&self, values: &[f32]) -> Result<CpuWeight> {
        Ok(CpuWeight::Vector(values.to_vec()))
    }

    fn alloc(&self, rows: usize, cols: usize) -> Result<CpuTensor> {
        Ok(CpuTensor {
            data: vec![0.0; rows * cols],
            cols,
        })
    }

    fn kv_dtypes(&self) -> &'static [KvDtype] {
        &KvDtype::ALL
    }

    fn alloc_kv_memory(&self, layout: &KvLayout, chunks: usize) -> Result<CpuKvMemory> {
        CpuKvMemory::new(layout, chunks)
    }

    fn copy_kv_chunks(&self, memory: &mut CpuKvMemory, copies: &[ChunkCopy]) -> Result<()> {
        let chunk_bytes = memory.layout.chunk_bytes();
        let chunks = memory.alloc.size() / chunk_bytes;
        for copy in copies {
            let (src, dst) = (copy.src as usize, copy.dst as usize);
            ensure!(
                src < chunks && dst < chunks,
                "KV chunk copy {src} -> {dst} outside an arena of {chunks} chunks"
            );
            memory.bytes_mut().copy_within(
                src * chunk_bytes..(src + 1) * chunk_bytes,
                dst * chunk_bytes,
            );
        }
        Ok(())
    }

    fn set_kv_step(&self, memory: &mut CpuKvMemory, step: &StepView) -> Result<()> {
        step.check_fits(
            &memory.layout,
            memory.alloc.size() / memory.layout.chunk_bytes(),
        )?;
        let mass = memory.attention_mass.get_mut().map_err(|_| poisoned())?;
        mass.clear();
        if step.track_mass.contains(&true) {
            mass.resize((0..step.seqs.len()).map(|i| step.slots(i)).sum(), 0.0);
        }
        Ok(())
    }

    fn supports_eviction(&self) -> bool {
        true
    }

    fn take_attention_mass(&self, memory: &mut CpuKvMemory) -> Result<Vec<f32>> {
        let mass = memory.attention_mass.get_mut().map_err(|_| poisoned())?;
        Ok(std::mem::take(mass))
    }

    fn embed(&self, table: &CpuWeight, ids: &[u32], out: &mut CpuTensor) -> Result<()> {
        let w = table.matrix()?;
        for (r, &id) in ids.iter().enumerate() {
            if id as usize >= w.rows {
                bail!(
                    "token id {id} is outside the vocabulary of {} tokens",
                    w.rows
                );
            }
            matmul::row_to_f32(w, id as usize, &mut out.data[r * w.cols..(r + 1) * w.cols]);
        }
        Ok(())
    }

    fn embed_chosen(&self, table: &CpuWeight, out: &mut CpuTensor) -> Result<()> {
        let id = *self
            .chosen
            .borrow()
            .back()
            .context("embed_chosen before any argmax chose an id")?;
        self.embed(table, &[id], out)
    }

    fn rms_norm(
        &self,
        x: &CpuTensor,
        weight: &CpuWeight,
        eps: f32,
        rows: usize,
        out: &mut CpuTensor,
    ) -> Result<()> {
        let w = weight.vector()?;
        let dim = w.len();
        check_shape(x, rows, dim, "rms_norm input")?;
        check_shape(out, rows, dim, "rms_norm output")?;
        rms_norm_rows(&x.data[..rows * dim], w, eps, &mut out.data[..rows * dim]);
        Ok(())
    }

    fn matmul(&self, x: &CpuTensor, w: &CpuWeight, rows: usize, out: &mut CpuTensor) -> Result<()> {
        self.matmul_many(x, &mut [(w, out)], rows)
    }

    fn matmul_many(
        &self,
        x: &CpuTensor,
        outputs: &mut [(&CpuWeight, &mut CpuTensor)],
        rows: usize,
    ) -> Result<()> {
        let mut products = Vec::with_capacity(outputs.len());
        for (w, out) in outputs.iter_mut() {
            let m = w.matrix()?;
            if x.cols != m.cols || out.cols != m.rows {
                bail!(
                    "matmul shape mismatch: x has {} columns, weight is [{}, {}], out has {} columns",
                    x.cols,
                    m.rows,
                    m.cols,
                    out.cols
                );
            }
            products.push((m, &mut out.data[..rows * m.rows]));
        }
        matmul::matmul_many(&x.data[..rows * x.cols], rows, &mut products);
        Ok(())
    }

    fn rope(
        &self,
        q: &mut CpuTensor,
        k: &mut CpuTensor,
        inv_freq: &CpuWeight,
        _memory: &CpuKvMemory,
        step: &StepView,
    ) -> Result<()> {
        let inv_freq = inv_freq.vector()?;
        let head_dim = 2 * inv_freq.len();
        for (r, &position) in step.row_pos.iter().enumerate() {
            let (cos, sin) = rope_cos_sin(inv_freq, position);
            for t in [&mut *q, &mut *k] {
                let cols = t.cols;
                for head in t.data[r * cols..(r + 1) * cols].chunks_mut(head_dim) {
                    rotate_half(head, &cos, &sin);
                }
            }
        }
        Ok(())
    }

    fn kv_append(
        &self,
        memory: &mut CpuKvMemory,
        step: &StepView,
        layer: usize,
        k: &CpuTensor,
        v: &CpuTensor,
    ) -> Result<()> {
        check_kv_rows(memory, step, layer, k, v, "kv_append")?;
        let head_dim = memory.layout.head_dim as usize;
        for r in 0..step.rows() {
            let seq = &step.seqs[step.row_seq[r] as usize];
            let slot = step.row_slot[r] as usize;
            for (part, src) in [(KvPart::Key, k), (KvPart::Value, v)] {
                for (head, row) in src.data[r * src.cols..(r + 1) * src.cols]
                    .chunks(head_dim)
                    .enumerate()
                {
                    memory.store_row(part, step.row_offsets(seq, layer, part, head, slot), row);
                }
            }
        }
        Ok(())
    }

    fn rope_kv_append(
        &self,
        q: &mut CpuTensor,
        k: &CpuTensor,
        v: &CpuTensor,
        inv_freq: &CpuWeight,
        memory: &mut CpuKvMemory,
        step: &StepView,
        layer: usize,
    ) -> Result<()> {
        check_kv_rows(memory, step, layer, k, v, "rope_kv_append")?;
        let inv_freq = inv_freq.vector()?;
        let head_dim = memory.layout.head_dim as usize;
        ensure!(
            2 * inv_freq.len() == head_dim,
            "rope_kv_append: {} RoPE frequencies for heads of {head_dim}",
            inv_freq.len()
        );
        check_shape(q, step.rows(), q.cols, "rope_kv_append q")?;
        let mut rotated = vec![0.0; head_dim];
        for r in 0..step.rows() {
            let seq = &step.seqs[step.row_seq[r] as usize];
            let (pos, slot) = (step.row_pos[r], step.row_slot[r] as usize);
            let (cos, sin) = rope_cos_sin(inv_freq, pos);
            let cols = q.cols;
            for head in q.data[r * cols..(r + 1) * cols].chunks_mut(head_dim) {
                rotate_half(head, &cos, &sin);
            }
            let (k_row, v_row) = (r * k.cols..(r + 1) * k.cols, r * v.cols..(r + 1) * v.cols);
            for (head, (k_head, v_head)) in k.data[k_row]
                .chunks(head_dim)
                .zip(v.data[v_row].chunks(head_dim))
                .enumerate()
            {
                rotated.copy_from_slice(k_head);
                rotate_half(&mut rotated, &cos, &sin);
                let at = |part| step.row_offsets(seq, layer, part, head, slot);
                memory.store_row(KvPart::Key, at(KvPart::Key), &rotated);
                memory.store_row(KvPart::Value, at(KvPart::Value), v_head);
            }
        }
        Ok(())
    }

    fn attention(
        &self,
        q: &CpuTensor,
        memory: &CpuKvMemory,
        step: &StepView,
        layer: usize,
        num_heads: usize,
        out: &mut CpuTensor,
    ) -> Result<()> {
        let layout = memory.layout;
        let (kv_heads, head_dim) = (layout.num_kv_heads as usize, layout.head_dim as usize);
        let rows = step.rows();
        if num_heads == 0 || !num_heads.is_multiple_of(kv_heads) {
            bail!("attention: {num_heads} query heads do not share {kv_heads} KV heads evenly");
        }
        if q.cols != num_heads * head_dim || out.cols != q.cols {
            bail!(
                "attention: q has {} columns and out {}, expected {num_heads} heads x {head_dim}",
                q.cols,
                out.cols
            );
        }
        if q.data.len() < rows * q.cols || out.data.len() < rows * out.cols {
            bail!("attention: a step of {rows} rows does not fit q or out");
        }
        if layer >= layout.num_layers as usize {
            bail!(
                "attention: layer {layer} of a cache of {} layers",
                layout.num_layers
            );
        }
        let plans =
            attention::AttentionPlan::for_step(step, kv_heads, rayon::current_num_threads());
        let (q, out) = (&q.data, &mut out.data);
        match layout.dtype() {
            KvDtype::F32 => attend::<f32>(memory, q, step, layer, num_heads, &plans, out),
            KvDtype::Bf16 => attend::<bf16>(memory, q, step, layer, num_heads, &plans, out),
            KvDtype::Int8 => attend::<i8>(memory, q, step, layer, num_heads, &plans, out),
            KvDtype::Fp8E4m3 => attend::<E4m3>(memory, q, step, layer, num_heads, &plans, out),
        }
    }

    fn swiglu(&self, gate: &mut CpuTensor, up: &CpuTensor, rows: usize) -> Result<()> {
        let n = rows * gate.cols;
        // A decode row (8192 for Llama-3.2-1B) takes a few microseconds on one thread, less than
        // handing half of it to a second one (measured: 6 us inline, 31 us split).
        if n <= 16384 {
            silu_mul(&mut gate.data[..n], &up.data[..n]);
            return Ok(());
        }
        gate.data[..n]
            .par_chunks_mut(4096)
            .zip(up.data[..n].par_chunks(4096))
            .for_each(|(g, u)| silu_mul(g, u));
        Ok(())
    }

    fn rms_norm_matmul_many(
        &self,
        x: &CpuTensor,
        x_rows: Range<usize>,
        norm: &CpuWeight,
        eps: f32,
        outputs: &mut [(&CpuWeight, &mut CpuTensor)],
    ) -> Result<()> {
        let w = norm.vector()?;
        let dim = w.len();
        check_shape(x, x_rows.end, dim, "rms_norm_matmul_many input")?;
        ensure!(
            x_rows.start <= x_rows.end,
            "rms_norm_matmul_many: rows {x_rows:?} run backwards"
        );
        let rows = x_rows.len();
        let mut normed = Self::scratch(&self.input_scratch, rows, dim);
        let x_rows = &x.data[x_rows.start * dim..x_rows.end * dim];
        rms_norm_rows(x_rows, w, eps, &mut normed.data[..rows * dim]);
        let done = self.matmul_many(&normed, outputs, rows);
        self.input_scratch.set(normed.data);
        done
    }

    fn matmul_add(
        &self,
        x: &CpuTensor,
        w: &CpuWeight,
        rows: usize,
        residual: &mut CpuTensor,
    ) -> Result<()> {
        let cols = residual.cols;
        check_shape(residual, rows, cols, "matmul_add residual")?;
        let mut product = Self::scratch(&self.product_scratch, rows, cols);
        let done = self.matmul(x, w, rows, &mut product);
        if done.is_ok() {
            residual.data[..rows * cols]
                .iter_mut()
                .zip(&product.data[..rows * cols])
                .for_each(|(r, p)| *r += p);
        }
        self.product_scratch.set(product.data);
        done
    }

    fn swiglu_matmul_add(
        &self,
        gate: &CpuTensor,
        up: &CpuTensor,
        w: &CpuWeight,
        rows: usize,
        residual: &mut CpuTensor,
    ) -> Result<()> {
        let cols = gate.cols;
        check_shape(gate, rows, cols, "swiglu_matmul_add gate")?;
        check_shape(up, rows, cols, "swiglu_matmul_add up")?;
        let mut activated = Self::scratch(&self.input_scratch, rows, cols);
        activated.data[..rows * cols].copy_from_slice(&gate.data[..rows * cols]);
        let done = self
            .swiglu(&mut activated, up, rows)
            .and_then(|()| self.matmul_add(&activated, w, rows, residual));
        self.input_scratch.set(activated.data);
        done
    }

    fn read_rows(&self, x: &CpuTensor, first: usize, rows: usize) -> Result<Vec<f32>> {
        Ok(x.data[first * x.cols..(first + rows) * x.cols].to_vec())
    }

    fn argmax(&self, logits: &CpuTensor, row: usize, bias: Option<&CpuWeight>) -> Result<()> {
        let cols = logits.cols;
        check_shape(logits, row + 1, cols, "argmax")?;
        let l = &logits.data[row * cols..(row + 1) * cols];
        let bias = bias.map(|b| b.vector()).transpose()?;
        if let Some(b) = bias {
            ensure!(
                b.len() == cols,
                "logit mask of {} entries for {cols} logits",
                b.len()
            );
        }
        let mut best = (0usize, f32::NEG_INFINITY);
        for (i, &v) in l.iter().enumerate() {
            let v = v + bias.map_or(0.0, |b| b[i]);
            // First index wins ties, as torch.argmax does.
            if v > best.1 {
                best = (i, v);
            }
        }
        let mut chosen = self.chosen.borrow_mut();
        if chosen.len() == CHOSEN_IDS_KEPT {
            chosen.pop_front();
        }
        chosen.push_back(best.0 as u32);
        Ok(())
    }

    fn argmax_advance(
        &self,
        logits: &CpuTensor,
        row: usize,
        bias: Option<&CpuWeight>,
        _memory: &mut CpuKvMemory,
        step: &mut StepView,
    ) -> Result<()> {
        // The ops read the view they are given: advancing it is all there is to do.
        self.argmax(logits, row, bias)?;
        step.advance();
        Ok(())
    }

    fn read_chosen(&self, n: usize) -> Result<Vec<u32>> {
        let chosen = self.chosen.borrow();
        ensure!(
            (1..=chosen.len()).contains(&n),
            "{n} chosen ids asked for; argmax has chosen {} (the latest {CHOSEN_IDS_KEPT} are kept)",
            chosen.len()
        );
        Ok(chosen.range(chosen.len() - n..).copied().collect())
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
}

/// Writes one `head_dim` row of `part` at `at` in the arena as `dtype` stores it: the values,
/// rounded to bf16, or quantized to codes and scales (see [`crate::kv::quant`]).
pub fn write_kv_row(
    arena: &mut [u8],
    dtype: KvDtype,
    part: KvPart,
    at: RowOffsets,
    values: &[f32],
) {
    let (codes, scales) = {
        let scale_count = dtype.scales_per_row(part, values.len());
        // A block's scales follow all of its codes.
        let (head, tail) = arena.split_at_mut(at.scale);
        let codes = &mut head[at.codes..at.codes + values.len() * dtype.code_bytes()];
        let scales: &mut [f32] = if scale_count > 0 {
            bytemuck::cast_slice_mut(&mut tail[..4 * scale_count])
        } else {
            &mut []
        };
        (codes, scales)
    };
    match dtype {
        KvDtype::F32 => bytemuck::cast_slice_mut(codes).copy_from_slice(values),
        KvDtype::Bf16 => {
            let codes: &mut [bf16] = bytemuck::cast_slice_mut(codes);
            for (c, &v) in codes.iter_mut().zip(values) {
                *c = bf16::from_f32(v);
            }
        }
        KvDtype::Int8 => quantize_int8(values, bytemuck::cast_slice_mut(codes), scales),
        KvDtype::Fp8E4m3 => scales[0] = quantize_e4m3(values, bytemuck::cast_slice_mut(codes)),
    }
}

fn poisoned() -> anyhow::Error {
    anyhow::anyhow!("a thread panicked while adding up attention mass")
}

/// Attention over an arena of `E` codes, then, when a sequence of the step tracks it, the
/// layer's attention mass (H2O).
fn attend<E: attention::KvElement>(
    memory: &CpuKvMemory,
    q: &[f32],
    step: &StepView,
    layer: usize,
    num_heads: usize,
    plans: &[attention::AttentionPlan],
    out: &mut [f32],
) -> Result<()> {
    let input = attention::AttentionInput::<E>::new(q, memory.bytes(), step, layer, num_heads);
    attention::attention(&input, plans, out);
    if step.track_mass.contains(&true) {
        let mut mass = memory.attention_mass.lock().map_err(|_| poisoned())?;
        attention::accumulate_mass(&input, &mut mass);
    }
    Ok(())
}

/// g = silu(g) · u = g / (1 + e^-g) · u, with the vectorisable [`simd::exp`] (libm's `exp` is a
/// call per element), compiled for AVX2 + FMA where the CPU has them.
fn silu_mul(g: &mut [f32], u: &[f32]) {
    #[inline(always)]
    fn kernel<M: simd::MulAdd>(g: &mut [f32], u: &[f32]) {
        for (g, u) in g.iter_mut().zip(u) {
            *g = *g / (1.0 + simd::exp::<M>(-*g)) * u;
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn kernel_avx2(g: &mut [f32], u: &[f32]) {
        kernel::<simd::Fused>(g, u)
    }
    #[cfg(target_arch = "x86_64")]
    if simd::has_avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { kernel_avx2(g, u) };
    }
    kernel::<simd::Unfused>(g, u)
}
