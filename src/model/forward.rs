//! The Llama forward pass, written once against [`Backend`].
//!
//! ```text
//! x = embed(ids)                                         [rows, hidden]
//! for each layer:
//!     h = rmsnorm(x) · input_layernorm
//!     q, k, v = h·Wqᵀ, h·Wkᵀ, h·Wvᵀ                       [rows, heads·hd], [rows, kv_heads·hd] ×2
//!     rope(q, k) at the step's positions; append k, v to the cache
//!     x += attention(q, cache)·Woᵀ
//!     h = rmsnorm(x) · post_attention_layernorm
//!     x += (silu(h·Wgateᵀ) * h·Wupᵀ)·Wdownᵀ
//! logits = (rmsnorm(x) · norm)·lm_headᵀ                  [rows, or the last n, vocab]
//! ```
//! Each norm is one op with the projections that read it (`rms_norm_matmul_many`: h is never
//! stored), and each residual add one op with the projection it adds (`matmul_add`,
//! `swiglu_matmul_add`), and RoPE one op with the append it feeds (`rope_kv_append`), so that a
//! CUDA decode step needs no launches for norms, adds, copies or RoPE alone.

use super::config::Config;
use super::gguf::{llama, GgufFile};
use super::weights::{HostTensor, ModelWeights};
use super::DType;
use crate::backend::{Backend, KvStore};
use crate::kv::{SeqId, StepView};
use anyhow::{bail, Result};
use std::path::Path;

/// A model resident on a backend.
pub struct Model<B: Backend> {
    pub config: Config,
    pub weights: ModelWeights<B::Weight>,
    /// RoPE inverse frequencies `[head_dim / 2]`.
    inv_freq: B::Weight,
    /// Bytes of weights one decode step reads (for bandwidth figures).
    pub weight_bytes_per_token: usize,
}

/// Which rows of the final hidden state become logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitRows {
    /// The step's last `n` rows (generation: each sequence's last row; a step of several
    /// sequences puts those at its end, `StepView::last_rows_at_end`).
    LastRows(usize),
    /// Every row (prompt logits for comparisons).
    All,
}

impl LogitRows {
    /// Rows of logits for a step of `rows` rows.
    pub fn count(self, rows: usize) -> usize {
        match self {
            LogitRows::LastRows(n) => n,
            LogitRows::All => rows,
        }
    }
}

/// Activation buffers for steps of up to `capacity` rows and `logit_rows` rows of logits,
/// allocated once and reused.
pub struct Activations<B: Backend> {
    capacity: usize,
    logit_rows: usize,
    x: B::Tensor,          // residual stream [rows, hidden]
    q: B::Tensor,          // [rows, heads·hd]
    k: B::Tensor,          // [rows, kv_heads·hd]
    v: B::Tensor,          // [rows, kv_heads·hd]
    attn: B::Tensor,       // attention output [rows, heads·hd]
    gate: B::Tensor,       // [rows, intermediate]
    up: B::Tensor,         // [rows, intermediate]
    pub logits: B::Tensor, // [logit_rows, vocab]
}

impl<B: Backend> Activations<B> {
    pub fn new(b: &B, cfg: &Config, capacity: usize, logit_rows: usize) -> Result<Self> {
        let (h, ff) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Activations {
            capacity,
            logit_rows,
            x: b.alloc_precise(capacity, h)?,
            q: b.alloc(capacity, cfg.q_dim())?,
            k: b.alloc(capacity, cfg.kv_dim())?,
            v: b.alloc(capacity, cfg.kv_dim())?,
            attn: b.alloc(capacity, cfg.q_dim())?,
            gate: b.alloc(capacity, ff)?,
            up: b.alloc(capacity, ff)?,
            logits: b.alloc_precise(logit_rows, cfg.vocab_size)?,
        })
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Rows of logits it holds.
    pub fn logit_capacity(&self) -> usize {
        self.logit_rows
    }

    pub fn fits(&self, rows: usize, logits: LogitRows) -> bool {
        rows <= self.capacity && logits.count(rows) <= self.logit_rows
    }
}

impl<B: Backend> Model<B> {
    /// Loads config and weights from a HF folder or a `.gguf` file (dequantized to f32), checks
    /// every tensor, and uploads them.
    pub fn load(b: &B, path: &Path) -> Result<Self> {
        if super::is_gguf(path) {
            return Self::load_gguf(b, &GgufFile::open(path)?, DType::F32);
        }
        let config = Config::from_dir(path)?;
        let host = ModelWeights::<HostTensor>::load(path, &config)?;
        Self::from_host(b, config, &host)
    }

    /// Loads a llama GGUF file, every tensor checked and dequantized to `dtype`.
    pub fn load_gguf(b: &B, file: &GgufFile, dtype: DType) -> Result<Self> {
        let config = llama::config(file)?;
        let source = llama::GgufWeights::new(file, &config, dtype);
        let host = ModelWeights::<HostTensor>::load_from(&source, &config)?;
        Self::from_host(b, config, &host)
    }

    pub fn from_host(b: &B, config: Config, host: &ModelWeights<HostTensor>) -> Result<Self> {
        let weights = host.upload(|t| b.upload_weight(t))?;
        let inv_freq = b.upload_vector(&config.rope_inv_freq())?;
        Ok(Model {
            weight_bytes_per_token: host.bytes_read_per_token(),
            config,
            weights,
            inv_freq,
        })
    }

    /// Runs `ids` through the model, one row each, at the rows, positions and sequences of
    /// `step` (which the KV pool reserved), writing their K/V into `kv`. The caller commits the
    /// step to the pool afterwards. Logits land in `act.logits`: one row per input row, or for
    /// the last `n`.
    pub fn forward(
        &self,
        b: &B,
        kv: &mut B::KvMemory,
        step: &StepView,
        ids: &[u32],
        act: &mut Activations<B>,
        logit_rows: LogitRows,
    ) -> Result<()> {
        let rows = ids.len();
        if rows == 0 {
            bail!("forward pass over zero tokens");
        }
        if rows != step.rows() {
            bail!("{rows} token ids for a step of {} rows", step.rows());
        }
        if !act.fits(rows, logit_rows) || logit_rows.count(rows) > rows {
            bail!(
                "a step of {rows} rows and {} rows of logits does not fit activations sized for \
                 {} and {}",
                logit_rows.count(rows),
                act.capacity,
                act.logit_rows
            );
        }
        b.set_kv_step(kv, step)?;
        b.embed(&self.weights.embed_tokens, ids, &mut act.x)?;
        self.layers_and_logits(b, kv, step, act, logit_rows)
    }

    /// One decode step of a run whose tokens stay on the backend: the input of the one row of
    /// the step's one sequence is the id the backend chose last (`embed_chosen`), and `step` is
    /// the view the backend holds (set by the caller with `set_kv_step` before the run's first
    /// step, then advanced by `argmax_advance` after each). The logits land in `act.logits`.
    pub fn forward_chosen(
        &self,
        b: &B,
        kv: &mut B::KvMemory,
        step: &StepView,
        act: &mut Activations<B>,
    ) -> Result<()> {
        if step.rows() != 1 || step.seqs.len() != 1 {
            bail!(
                "a decode step on chosen ids takes one row of one sequence, not {} rows of {}",
                step.rows(),
                step.seqs.len()
            );
        }
        b.embed_chosen(&self.weights.embed_tokens, &mut act.x)?;
        self.layers_and_logits(b, kv, step, act, LogitRows::LastRows(1))
    }

    /// `steps` decode steps of `seq` whose tokens stay on the backend: the first step's input
    /// is the id the backend chose last, each step's greedy choice (with the additive logit
    /// `bias`) is the next one's input, the view advances on the backend (a CUDA graph replays
    /// every step with no copy), and the host reads the `steps` chosen ids once, at the end.
    /// Their positions are reserved, not committed: the caller commits the steps it keeps
    /// (`ChunkPool::commit_first`). Generation and the decode benchmark both run this.
    pub fn decode_run(
        &self,
        b: &B,
        store: &mut KvStore<B>,
        seq: SeqId,
        steps: usize,
        act: &mut Activations<B>,
        bias: Option<&B::Weight>,
    ) -> Result<Vec<u32>> {
        let mut view = store.prepare_decode(b, &[seq], steps)?;
        let memory = &mut store.memory;
        b.set_kv_step(memory, &view)?;
        for _ in 0..steps {
            b.run_step(&mut || {
                self.forward_chosen(b, memory, &view, act)?;
                b.argmax_advance(&act.logits, 0, bias, memory, &mut view)
            })?;
        }
        b.read_chosen(steps)
    }

    /// The layers over the embedded rows of `step` in `act.x`, then the logits.
    fn layers_and_logits(
        &self,
        b: &B,
        kv: &mut B::KvMemory,
        step: &StepView,
        act: &mut Activations<B>,
        logit_rows: LogitRows,
    ) -> Result<()> {
        let cfg = &self.config;
        let rows = step.rows();
        let (w, eps) = (&self.weights, cfg.rms_norm_eps);
        for (layer, lw) in w.layers.iter().enumerate() {
            let qkv = &mut [
                (&lw.q_proj, &mut act.q),
                (&lw.k_proj, &mut act.k),
                (&lw.v_proj, &mut act.v),
            ];
            b.rms_norm_matmul_many(&act.x, 0..rows, &lw.input_layernorm, eps, qkv)?;
            b.rope_kv_append(&mut act.q, &act.k, &act.v, &self.inv_freq, kv, step, layer)?;
            b.attention(&act.q, kv, step, layer, cfg.num_heads, &mut act.attn)?;
            b.matmul_add(&act.attn, &lw.o_proj, rows, &mut act.x)?;

            let gate_up = &mut [(&lw.gate_proj, &mut act.gate), (&lw.up_proj, &mut act.up)];
            b.rms_norm_matmul_many(&act.x, 0..rows, &lw.post_attention_layernorm, eps, gate_up)?;
            b.swiglu_matmul_add(&act.gate, &act.up, &lw.down_proj, rows, &mut act.x)?;
        }
        let logit_rows = match logit_rows {
            LogitRows::All => 0..rows,
            LogitRows::LastRows(n) => rows - n..rows,
        };
        let head = &mut [(w.output_projection(), &mut act.logits)];
        b.rms_norm_matmul_many(&act.x, logit_rows, &w.norm, eps, head)
    }
}
