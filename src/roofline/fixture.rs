//! Inputs at real shapes for timing one op alone: the Llama-3.2-1B shape, KV caches filled to a
//! context, and a decode step held at a fixed context. Used by `benches/ops.rs` and by
//! `kvlab roofline`, so both time the same thing.

use crate::backend::{Backend, KvStore};
use crate::kv::{KvDtype, LayoutKind, SeqId, StepView};
use crate::model::config::{Config, HfConfig};
use crate::model::forward::{Activations, LogitRows, Model};
use crate::model::synth::{config_json, Preset};
use anyhow::{Context, Result};

/// The shape of meta-llama/Llama-3.2-1B (16 layers, hidden 2048, 32 query and 8 KV heads of 64,
/// intermediate 8192, vocabulary 128256), as the synthetic preset writes it.
pub fn llama_3_2_1b() -> Result<Config> {
    let hf: HfConfig = serde_json::from_value(config_json(Preset::Llama32_1B))
        .context("the Llama-3.2-1B preset's config.json")?;
    Config::from_hf(&hf)
}

/// Bytes of KV that a rotation of caches spans at least for honest timings: several times any
/// CPU's last-level cache or a GPU's L2, so each op call reads its KV from memory, as in a real
/// decode step where the weights stream through the caches between two layers.
pub const ROTATION_BYTES: usize = 256 << 20;

/// Rows written per `kv_append` while filling a cache.
const FILL_ROWS: usize = 512;

/// How a cache is laid out: one contiguous buffer or chunks of `n` positions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvShape {
    Contiguous,
    Chunked(usize),
}

impl KvShape {
    pub fn kind(self) -> LayoutKind {
        match self {
            KvShape::Contiguous => LayoutKind::Contiguous,
            KvShape::Chunked(_) => LayoutKind::Chunked,
        }
    }

    fn chunk_tokens(self) -> usize {
        match self {
            KvShape::Contiguous => 1,
            KvShape::Chunked(n) => n,
        }
    }
}

impl std::fmt::Display for KvShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KvShape::Contiguous => f.write_str("contiguous"),
            KvShape::Chunked(n) => write!(f, "chunk{n}"),
        }
    }
}

/// A KV pool holding one sequence.
pub struct FilledCache<B: Backend> {
    pub store: KvStore<B>,
    pub seq: SeqId,
}

impl<B: Backend> FilledCache<B> {
    /// Positions written.
    pub fn len(&self) -> usize {
        self.store.pool.seq_len(self.seq).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Runs one step of `rows` positions with `f` (which writes their K/V through the view) and
    /// commits them.
    pub fn step(
        &mut self,
        backend: &B,
        rows: usize,
        f: impl FnOnce(&mut B::KvMemory, &StepView) -> Result<()>,
    ) -> Result<()> {
        let view = self.store.prepare_step(backend, &[(self.seq, rows)])?;
        backend.set_kv_step(&mut self.store.memory, &view)?;
        f(&mut self.store.memory, &view)?;
        // Any ids: what the positions hold does not change an op's cost.
        self.store.pool.commit(self.seq, &vec![0; rows])
    }
}

/// A pool sized for one sequence of `len` written positions (zeros: no op's cost depends on the
/// values) with room for `spare` more, in `shape` and `dtype`.
pub fn filled_cache<B: Backend>(
    backend: &B,
    cfg: &Config,
    shape: KvShape,
    dtype: KvDtype,
    len: usize,
    spare: usize,
) -> Result<FilledCache<B>> {
    let positions = (len + spare).max(1);
    let layout = crate::kv::KvLayout::new(
        shape.kind(),
        dtype,
        cfg.num_layers,
        cfg.num_kv_heads,
        cfg.head_dim,
        shape.chunk_tokens(),
    )?;
    let mut store = KvStore::new(
        backend,
        layout,
        positions.div_ceil(shape.chunk_tokens()),
        false,
    )?;
    let seq = store.pool.new_sequence(Some(positions))?;
    let mut cache = FilledCache { store, seq };
    let block = len.clamp(1, FILL_ROWS);
    let k = backend.alloc(block, cfg.kv_dim())?;
    let v = backend.alloc(block, cfg.kv_dim())?;
    while cache.len() < len {
        let rows = block.min(len - cache.len());
        cache.step(backend, rows, |memory, view| {
            (0..cfg.num_layers).try_for_each(|layer| backend.kv_append(memory, view, layer, &k, &v))
        })?;
    }
    backend.synchronize()?;
    Ok(cache)
}

/// Sequences whose step is `rows` rows at positions `context - rows..context` (reserved and
/// never committed, so every visit sees the same step), visited layer by layer and pool by
/// pool, enough of them to span `span_bytes` (see [`ROTATION_BYTES`]).
pub struct KvRotation<B: Backend> {
    caches: Vec<(KvStore<B>, StepView)>,
    num_layers: usize,
    next: usize,
}

impl<B: Backend> KvRotation<B> {
    pub fn new(
        backend: &B,
        cfg: &Config,
        shape: KvShape,
        dtype: KvDtype,
        context: usize,
        rows: usize,
        span_bytes: usize,
    ) -> Result<Self> {
        let start = context.checked_sub(rows).with_context(|| {
            format!("a step of {rows} rows does not fit a context of {context}")
        })?;
        let cache_bytes =
            context * cfg.num_layers * cfg.num_kv_heads * dtype.row_pair_bytes(cfg.head_dim);
        let count = span_bytes.div_ceil(cache_bytes.max(1)).max(1);
        let caches = (0..count)
            .map(|_| {
                let mut cache = filled_cache(backend, cfg, shape, dtype, start, rows)?;
                let view = cache.store.prepare_step(backend, &[(cache.seq, rows)])?;
                backend.set_kv_step(&mut cache.store.memory, &view)?;
                Ok((cache.store, view))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(KvRotation {
            caches,
            num_layers: cfg.num_layers,
            next: 0,
        })
    }

    /// The next (arena, its step, layer) in the rotation.
    pub fn next_layer(&mut self) -> (&mut B::KvMemory, &StepView, usize) {
        let at = self.next;
        self.next = (at + 1) % (self.caches.len() * self.num_layers);
        let (store, view) = &mut self.caches[at / self.num_layers];
        (&mut store.memory, &*view, at % self.num_layers)
    }
}

/// Positions a decode-step fixture lets its context grow by before refilling its cache.
const DRIFT: usize = 8;

/// One decode step of a model at a context held within `context..context + drift` (`DRIFT`
/// unless given): the cache is filled (outside any timing) to `context - 1` positions, each
/// [`DecodeStep::run`] forwards one token, and [`DecodeStep::prepare`] refills the cache once
/// it has drifted.
pub struct DecodeStep<'m, B: Backend> {
    model: &'m Model<B>,
    shape: KvShape,
    dtype: KvDtype,
    context: usize,
    drift: usize,
    cache: FilledCache<B>,
    act: Activations<B>,
}

impl<'m, B: Backend> DecodeStep<'m, B> {
    pub fn new(backend: &B, model: &'m Model<B>, shape: KvShape, context: usize) -> Result<Self> {
        Self::with_drift(
            backend,
            model,
            (shape, backend.kv_dtypes()[0]),
            context,
            DRIFT,
        )
    }

    /// A fixture whose cache of `dtype` has room for `drift` steps before a refill: a series of
    /// that many steps runs on one cache (the same buffers, so that CUDA graphs replay
    /// throughout).
    pub fn with_drift(
        backend: &B,
        model: &'m Model<B>,
        (shape, dtype): (KvShape, KvDtype),
        context: usize,
        drift: usize,
    ) -> Result<Self> {
        let cfg = &model.config;
        let act = Activations::new(backend, cfg, 1, 1)?;
        // A first choice, for `run_on_device`'s first step to embed.
        backend.argmax(&act.logits, 0, None)?;
        Ok(DecodeStep {
            model,
            shape,
            dtype,
            context,
            drift,
            cache: filled_cache(backend, cfg, shape, dtype, context.max(1) - 1, drift + 1)?,
            act,
        })
    }

    /// `steps` decode steps in one run on the backend's own ids, as generation runs the steps
    /// between two reads of the chosen ids (`Backend::decode_window`): the view set once and
    /// advanced by the backend, each step's input the previous step's choice, the ids read once
    /// at the end.
    pub fn run_on_device(&mut self, backend: &B, steps: usize) -> Result<()> {
        let cache = &mut self.cache;
        let chosen = self.model.decode_run(
            backend,
            &mut cache.store,
            cache.seq,
            steps,
            &mut self.act,
            None,
        )?;
        // The pool's ids are placeholders, as `run`'s are: the cost does not depend on them.
        cache.store.pool.commit_first(cache.seq, &chosen)
    }

    /// Refills the cache when the context has drifted by `drift`; call it outside the timing.
    pub fn prepare(&mut self, backend: &B) -> Result<()> {
        if self.cache.len() + 1 >= self.context + self.drift {
            self.cache = filled_cache(
                backend,
                &self.model.config,
                self.shape,
                self.dtype,
                self.context.max(1) - 1,
                self.drift + 1,
            )?;
        }
        Ok(())
    }

    /// Forwards one token; the logits stay on the backend.
    pub fn run(&mut self, backend: &B) -> Result<()> {
        // Any id of the vocabulary: the step's cost does not depend on it.
        let token = (self.model.config.vocab_size / 2) as u32;
        let (model, cache, act) = (self.model, &mut self.cache, &mut self.act);
        let view = cache.store.prepare_step(backend, &[(cache.seq, 1)])?;
        let memory = &mut cache.store.memory;
        // As generation runs a step: through run_step, which may replay a CUDA graph.
        backend.run_step(&mut || {
            model.forward(
                backend,
                memory,
                &view,
                &[token],
                act,
                LogitRows::LastRows(1),
            )
        })?;
        cache.store.pool.commit(cache.seq, &[token])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;

    fn tiny() -> Config {
        let hf: HfConfig = serde_json::from_value(config_json(Preset::Tiny)).unwrap();
        Config::from_hf(&hf).unwrap()
    }

    #[test]
    fn filled_caches_hold_their_length_in_either_layout() {
        let (b, cfg) = (CpuBackend::new(), tiny());
        for shape in [KvShape::Contiguous, KvShape::Chunked(5)] {
            for len in [0, 1, 7, 1100] {
                let mut cache = filled_cache(&b, &cfg, shape, KvDtype::F32, len, 3).unwrap();
                assert_eq!(cache.len(), len);
                assert_eq!(cache.store.pool.layout().kind(), shape.kind());
                // Room for the spare positions, and not one more (the pool is sized to them).
                cache.store.pool.reserve(cache.seq, 3).unwrap();
                cache.store.pool.commit(cache.seq, &[0; 3]).unwrap();
                assert!(cache
                    .store
                    .pool
                    .reserve(cache.seq, 5.max(shape.chunk_tokens() + 1))
                    .is_err());
            }
        }
    }

    #[test]
    fn a_rotation_visits_every_layer_of_every_cache_at_the_step() {
        let (b, cfg) = (CpuBackend::new(), tiny());
        // The tiny model's cache of 100 positions is 50 KiB: a rotation over 1 MiB needs 21.
        let mut rotation = KvRotation::new(
            &b,
            &cfg,
            KvShape::Chunked(16),
            KvDtype::F32,
            100,
            3,
            1 << 20,
        )
        .unwrap();
        let visits = rotation.caches.len() * cfg.num_layers;
        assert_eq!(rotation.caches.len(), 21);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..visits {
            let (memory, view, layer) = rotation.next_layer();
            assert_eq!((view.seqs[0].start, view.seqs[0].rows), (97, 3));
            seen.insert((memory as *const _, layer));
        }
        assert_eq!(seen.len(), visits);
        assert!(
            KvRotation::new(&b, &cfg, KvShape::Contiguous, KvDtype::F32, 2, 3, 1 << 20).is_err()
        );
    }
}
