//! Generation: prefill, then greedy decode one token at a time, outside the model.
//! Times are taken after the backend synchronizes, so they hold for asynchronous devices too.
//!
//! Decode steps run in runs of [`Backend::decode_window`] steps whose tokens stay on the
//! backend: each step embeds the id the previous one chose and advances the positions itself,
//! and the host reads the run's ids once at its end (16 on CUDA, where a recorded step then
//! replays with no copy between tokens; 1 on the CPU). The chunks of a run's positions are
//! reserved before it, and the steps it kept are committed after it. Teacher forcing
//! (`feed_ids`), kept step logits and the no-cache strategy decode one host round trip a token.
//!
//! The engine keeps one KV pool (a [`KvStore`]) for the layout the calls ask for, and, with a
//! `+reuse` strategy, each conversation's sequence between calls: the next prompt's longest
//! common token prefix with what the sequence holds is kept and only the rest is prefilled
//! (a static sequence reuses its contiguous run up to that prefix). A new sequence of
//! `dynamic+reuse` takes the full chunks that the prefix index finds for its prompt.

use crate::backend::{Backend, BackendInfo, KvStore};
use crate::kv::{
    ChunkCopy, ChunkPool, EvictionPolicy, KvDtype, KvLayout, PoolStats, SeqId, StepView, Strategy,
};
use crate::model::config::Config;
use crate::model::forward::{Activations, LogitRows, Model};
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::time::Instant;

/// What to generate and how.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub strategy: Strategy,
    /// Static cache capacity; `None` = prompt + max_new_tokens, the way transformers sizes it
    /// (`static+reuse`: the model's whole context, since later turns grow the sequence).
    pub max_context: Option<usize>,
    pub chunk_tokens: usize,
    /// Run all `max_new_tokens` even past a stop token (fixed-length runs for fair timing).
    pub ignore_eos: bool,
    /// Keep the logits that chose each token.
    pub keep_step_logits: bool,
    /// Also return the logits of every prefilled prompt position.
    pub keep_prompt_logits: bool,
    /// Teacher forcing: after step i, feed `feed_ids[i]` instead of the chosen id (while there
    /// is one), so that every step's logits follow a reference's sequence whatever was chosen.
    pub feed_ids: Option<Vec<u32>>,
    /// With a `+reuse` strategy: the conversation this call continues, whose sequence is kept
    /// for its next call (until [`Generator::end_conversation`]). Without one, the call's
    /// sequence is let go at its end (its full chunks stay cached for `dynamic+reuse`).
    pub conversation: Option<u64>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 32,
            strategy: Strategy::Dynamic,
            max_context: None,
            chunk_tokens: 256,
            ignore_eos: false,
            keep_step_logits: false,
            keep_prompt_logits: false,
            feed_ids: None,
            conversation: None,
        }
    }
}

/// The KV pool's settings for every call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvOptions {
    /// Element type of K and V (`None`: the backend's default: f32 on the CPU, bf16 on CUDA).
    pub dtype: Option<KvDtype>,
    /// Bytes of the pool's arena (`None`: one sequence of the model's whole context).
    pub budget_bytes: Option<u64>,
    /// What each sequence keeps between steps (`--kv-policy`).
    pub policy: EvictionPolicy,
}

/// What one call's sequence held.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvStats {
    /// Bytes held by the sequence at the end of the call (the no-cache strategy: 0, its
    /// buffers are transient).
    pub reserved_bytes: u64,
    /// Bytes of those that hold written positions.
    pub live_bytes: u64,
    /// Of `reserved_bytes`, chunks that other sequences hold too.
    pub shared_bytes: u64,
    /// Chunk allocations (contiguous runs count one) made during the call.
    pub allocations: u64,
    /// Largest `reserved_bytes` during the call (the no-cache strategy: its largest buffer).
    pub peak_reserved_bytes: u64,
    /// Positions written.
    pub tokens: u64,
    /// Of those, positions the eviction policy let go of.
    pub evicted_tokens: u64,
    /// Chunks held now.
    pub chunks: u64,
    /// The whole pool at the end of the call.
    pub pool: PoolStats,
}

/// How much of a prompt a `+reuse` call found cached, and why the rest was not.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReuseStats {
    pub prompt_tokens: usize,
    /// Leading prompt tokens whose K/V were kept or shared, not recomputed.
    pub reused_tokens: usize,
    pub prefilled_tokens: usize,
    /// Tokens the conversation's sequence held past the point where the new prompt differs
    /// from them (the chat template rendered the previous turns' tail differently from what
    /// was generated).
    pub missed_drift: usize,
    /// Tokens a cached chunk started with that ended inside a chunk (a finer chunk would have
    /// reused them).
    pub missed_granularity: usize,
    /// Tokens of cached chunks evicted to make room before this call.
    pub missed_evicted: usize,
}

impl ReuseStats {
    pub fn hit_rate(&self) -> f64 {
        if self.prompt_tokens == 0 {
            0.0
        } else {
            self.reused_tokens as f64 / self.prompt_tokens as f64
        }
    }
}

/// The outcome of one generate call.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Generation {
    pub prompt_ids: Vec<u32>,
    pub new_ids: Vec<u32>,
    /// Time to first token: the prompt's forward pass and the first token's choice.
    pub prefill_seconds: f64,
    /// The remaining tokens.
    pub decode_seconds: f64,
    /// Each decode step's time (tokens 2..); the steps of a run on the backend's own ids
    /// (`Backend::decode_window` steps between reads) each get an equal share of its time.
    pub step_seconds: Vec<f64>,
    /// Device time of each forward pass (prefill first) where the backend measures it (CUDA
    /// events); empty on the CPU. Steps run past a stop token are not listed.
    pub device_step_seconds: Vec<f64>,
    pub stopped_on_eos: bool,
    /// Accounting of the KV memory this call used (the no-cache strategy: its transient buffers).
    pub kv: KvStats,
    /// With a `+reuse` strategy: what of the prompt was found cached.
    pub reuse: Option<ReuseStats>,
    #[serde(skip)]
    pub step_logits: Vec<Vec<f32>>,
    /// Logits of the prefilled prompt positions (all of them without reuse).
    #[serde(skip)]
    pub prompt_logits: Vec<f32>,
}

impl Generation {
    pub fn total_seconds(&self) -> f64 {
        self.prefill_seconds + self.decode_seconds
    }

    /// Tokens per second of the decode phase (tokens after the first).
    pub fn decode_tokens_per_second(&self) -> f64 {
        let n = self.new_ids.len().saturating_sub(1);
        if n == 0 || self.decode_seconds == 0.0 {
            0.0
        } else {
            n as f64 / self.decode_seconds
        }
    }
}

/// A backend-independent handle on a loaded model, for the CLI and the study runner.
pub trait Generator {
    fn config(&self) -> &Config;
    /// The backend, with the KV element type the engine stores.
    fn backend_info(&self) -> BackendInfo;
    /// Bytes of weights read per decoded token.
    fn weight_bytes_per_token(&self) -> usize;
    /// Restricts greedy choices to ids where `allowed[id]` (None lifts the restriction).
    fn set_allowed_tokens(&mut self, allowed: Option<&[bool]>) -> Result<()>;
    /// The KV pool's element type and budget for later calls (drops the current pool and every
    /// kept conversation).
    fn set_kv_options(&mut self, options: KvOptions) -> Result<()>;
    /// Greedy generation; `on_token` sees each new id as it is chosen.
    fn generate(
        &mut self,
        prompt: &[u32],
        opts: &GenerateOptions,
        on_token: &mut dyn FnMut(u32),
    ) -> Result<Generation>;
    /// Lets go of a conversation's kept sequence (its full chunks stay cached for
    /// `dynamic+reuse`). Unknown ids are ignored.
    fn end_conversation(&mut self, conversation: u64) -> Result<()>;
    /// Lets go of every kept conversation and forgets every cached chunk: the next call starts
    /// from an empty pool.
    fn clear_kv_cache(&mut self) -> Result<()>;
    /// The current KV pool's accounting, if there is a pool.
    fn kv_pool_stats(&self) -> Option<PoolStats>;

    // Many sequences per step (`crate::serve`): a scheduler decides through the pool which
    // sequence holds what and which rows run, and the engine runs them.

    /// The KV pool of `strategy`'s layout (the current one if it matches, as `generate` opens
    /// it; else a new one, every kept conversation let go).
    fn open_kv_pool(&mut self, strategy: Strategy, chunk_tokens: usize) -> Result<&mut ChunkPool>;
    /// The current KV pool.
    fn kv_pool_mut(&mut self) -> Result<&mut ChunkPool>;
    /// One forward step over several sequences of the current pool: after the copy-on-write
    /// `copies` that reserving their rows returned (in that order), each entry's ids run as the
    /// positions after those its sequence holds, the rows are committed, and the greedy choice
    /// after each entry's last row comes back.
    fn forward_batch(
        &mut self,
        copies: &[ChunkCopy],
        entries: &[BatchEntry],
        keep_logits: bool,
    ) -> Result<BatchOutput>;
}

/// One sequence's rows in a batched step.
#[derive(Clone, Copy, Debug)]
pub struct BatchEntry<'a> {
    pub seq: SeqId,
    /// Token ids of its rows, the positions after those it holds: as many as the pool reserved.
    pub ids: &'a [u32],
}

/// What a batched step chose.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BatchOutput {
    /// Per entry, the greedy choice after its last row.
    pub next_ids: Vec<u32>,
    /// Per entry, the logits of its last row (when asked for).
    pub logits: Vec<Vec<f32>>,
}

/// Keeps of a conversation's sequence the longest common prefix of what it holds with `prompt`
/// (at most `prompt.len() - 1` positions: the last prompt token is always computed, its logits
/// choose the next token), and says what was reused and what the template re-rendered.
pub fn resume_sequence(pool: &mut ChunkPool, seq: SeqId, prompt: &[u32]) -> Result<ReuseStats> {
    let limit = prompt.len().saturating_sub(1);
    let cached = pool.seq_tokens(seq)?;
    let common = cached
        .iter()
        .zip(prompt)
        .take_while(|(a, b)| a == b)
        .count();
    let drift = cached.len() - common;
    let reused = common.min(limit);
    pool.truncate(seq, reused)?;
    Ok(ReuseStats {
        prompt_tokens: prompt.len(),
        reused_tokens: reused,
        prefilled_tokens: prompt.len() - reused,
        missed_drift: drift,
        ..Default::default()
    })
}

/// A new sequence for `prompt` (a contiguous one holds `capacity` positions) that keeps what
/// `policy` keeps. With `reuse`, it
/// takes the chunks the prefix index finds for the prompt (at most `prompt.len() - 1`
/// positions) and says what it found; without, nothing is looked up.
pub fn start_sequence(
    pool: &mut ChunkPool,
    capacity: usize,
    prompt: &[u32],
    reuse: bool,
    policy: EvictionPolicy,
) -> Result<(SeqId, Option<ReuseStats>)> {
    let seq = pool.new_sequence(Some(capacity))?;
    if let Err(e) = pool.set_policy(seq, policy) {
        pool.release(seq)?;
        return Err(e);
    }
    if !reuse {
        return Ok((seq, None));
    }
    let found = match pool.match_prefix(seq, prompt, prompt.len().saturating_sub(1)) {
        Ok(found) => found,
        Err(e) => {
            pool.release(seq)?;
            return Err(e);
        }
    };
    Ok((
        seq,
        Some(ReuseStats {
            prompt_tokens: prompt.len(),
            reused_tokens: found.reused,
            prefilled_tokens: prompt.len() - found.reused,
            missed_granularity: found.missed_granularity,
            missed_evicted: found.missed_evicted,
            ..Default::default()
        }),
    ))
}

/// What identifies a pool: calls that agree on it share one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PoolKey {
    layout: KvLayout,
    chunks: usize,
    prefix_caching: bool,
}

/// A model on a backend plus the buffers it runs in and its KV pool.
pub struct Engine<B: Backend> {
    pub backend: B,
    pub model: Model<B>,
    activations: Option<Activations<B>>,
    /// Additive logit mask (0 / -inf) `[vocab]`.
    logit_bias: Option<B::Weight>,
    kv_options: KvOptions,
    kv: Option<(PoolKey, KvStore<B>)>,
    /// Kept sequences of the current pool, by conversation.
    conversations: HashMap<u64, SeqId>,
}

impl<B: Backend> Engine<B> {
    pub fn new(backend: B, model: Model<B>) -> Self {
        Engine {
            backend,
            model,
            activations: None,
            logit_bias: None,
            kv_options: KvOptions::default(),
            kv: None,
            conversations: HashMap::new(),
        }
    }

    fn kv_dtype(&self) -> KvDtype {
        self.kv_options.dtype.unwrap_or(self.backend.kv_dtypes()[0])
    }

    /// The pool for `strategy`: the current one if it has that layout, else a new one (the old
    /// pool and its conversations are let go first, so that both never hold memory at once).
    fn kv_store(&mut self, strategy: Strategy, chunk_tokens: usize) -> Result<&mut KvStore<B>> {
        let cfg = &self.model.config;
        let chunk_tokens = match strategy.layout_kind() {
            crate::kv::LayoutKind::Chunked => chunk_tokens,
            // Runs are sized to the position: a static cache holds exactly its capacity.
            crate::kv::LayoutKind::Contiguous => 1,
        };
        let layout = KvLayout::new(
            strategy.layout_kind(),
            self.kv_dtype(),
            cfg.num_layers,
            cfg.num_kv_heads,
            cfg.head_dim,
            chunk_tokens,
        )?;
        let chunks = match self.kv_options.budget_bytes {
            Some(budget) => ChunkPool::chunks_for_budget(&layout, budget),
            None => cfg.max_position_embeddings.div_ceil(chunk_tokens),
        };
        if chunks == 0 {
            bail!(
                "--kv-budget {} bytes holds no chunk of {} positions ({} bytes)",
                self.kv_options.budget_bytes.unwrap_or(0),
                chunk_tokens,
                layout.chunk_bytes()
            );
        }
        let policy = self.kv_options.policy;
        if let (Some(budget), Some(kept)) = (self.kv_options.budget_bytes, policy.kept_tokens()) {
            // A decode step holds the kept positions and the new token.
            let holds = chunks * chunk_tokens;
            if holds <= kept {
                bail!(
                    "--kv-budget {budget} bytes holds {holds} positions of {} KV ({} bytes a \
                     position), fewer than --kv-policy {policy} keeps plus the token a decode step \
                     adds ({}); raise --kv-budget to at least {} bytes or keep fewer tokens",
                    layout.dtype(),
                    layout.bytes_per_token(),
                    kept + 1,
                    (kept + 1).div_ceil(chunk_tokens) * layout.chunk_bytes()
                );
            }
        }
        // A sequence that evicts shares no chunk (src/kv/pool.rs), so no prefix index.
        let key = PoolKey {
            layout,
            chunks,
            prefix_caching: strategy == Strategy::DynamicReuse && policy == EvictionPolicy::Full,
        };
        if self.kv.as_ref().map(|(k, _)| *k) != Some(key) {
            self.kv = None;
            self.conversations.clear();
            let store = KvStore::new(&self.backend, layout, chunks, key.prefix_caching)?;
            self.kv = Some((key, store));
        }
        Ok(&mut self.kv.as_mut().expect("set above").1)
    }

    /// Activations for steps of `rows` rows and `logit_rows` of logits; kept and reused while
    /// large enough.
    fn sized_activations(&mut self, rows: usize, logit_rows: LogitRows) -> Result<()> {
        let fits = self
            .activations
            .as_ref()
            .is_some_and(|a| a.fits(rows, logit_rows));
        if !fits {
            let (old_rows, old_logits) = self
                .activations
                .as_ref()
                .map_or((0, 0), |a| (a.capacity(), a.logit_capacity()));
            let capacity = rows.max(old_rows);
            let logit_capacity = logit_rows.count(rows).max(old_logits);
            self.activations = None; // free before allocating the larger set
            self.activations = Some(Activations::new(
                &self.backend,
                &self.model.config,
                capacity,
                logit_capacity,
            )?);
        }
        Ok(())
    }

    /// The activations of the last forward pass.
    fn activations(&self) -> Result<&Activations<B>> {
        self.activations.as_ref().context("no forward pass has run")
    }

    /// One forward pass of `ids` as the next positions of `seq`; returns the chosen next token.
    fn step(
        &mut self,
        seq: SeqId,
        ids: &[u32],
        logit_rows: LogitRows,
        keep_logits: Option<&mut Vec<Vec<f32>>>,
        prompt_logits: Option<&mut Vec<f32>>,
    ) -> Result<u32> {
        let store = &mut self.kv.as_mut().context("no KV pool")?.1;
        let view = store.prepare_step(&self.backend, &[(seq, ids.len())])?;
        let last = if logit_rows == LogitRows::All {
            ids.len() - 1
        } else {
            0
        };
        let id = self.forward_view(&view, ids, logit_rows, last)?;
        let store = &mut self.kv.as_mut().context("no KV pool")?.1;
        store.finish_step(&self.backend, &view, &[(seq, ids)])?;
        let (backend, act) = (&self.backend, self.activations()?);
        if let Some(all) = prompt_logits {
            *all = backend.read_rows(&act.logits, 0, ids.len())?;
        }
        if let Some(keep) = keep_logits {
            keep.push(backend.read_rows(&act.logits, last, 1)?);
        }
        Ok(id)
    }

    /// One forward pass of `ids` over `view` (rows the pool reserved; the caller commits them),
    /// with the greedy choice of logits row `choose` made inside the step (so that a CUDA graph
    /// replays it too); returns that choice. The logits stay in the activations.
    fn forward_view(
        &mut self,
        view: &StepView,
        ids: &[u32],
        logit_rows: LogitRows,
        choose: usize,
    ) -> Result<u32> {
        self.sized_activations(ids.len(), logit_rows)?;
        let act = self.activations.as_mut().expect("allocated above");
        let (backend, model, bias) = (&self.backend, &self.model, self.logit_bias.as_ref());
        let memory = &mut self.kv.as_mut().context("no KV pool")?.1.memory;
        backend.run_step(&mut || {
            model.forward(backend, memory, view, ids, act, logit_rows)?;
            backend.argmax(&act.logits, choose, bias)
        })?;
        backend.read_argmax()
    }

    /// `steps` decode steps of `seq` on the backend's own ids ([`Model::decode_run`]).
    fn decode_run(&mut self, seq: SeqId, steps: usize) -> Result<Vec<u32>> {
        self.sized_activations(1, LogitRows::LastRows(1))?;
        let act = self.activations.as_mut().expect("allocated above");
        let store = &mut self.kv.as_mut().context("no KV pool")?.1;
        self.model.decode_run(
            &self.backend,
            store,
            seq,
            steps,
            act,
            self.logit_bias.as_ref(),
        )
    }

    /// The decode steps of `seq` after the prompt chose `first` (handed out already), in runs
    /// of up to `decode_window` steps (`decode_run`): after each run the host hands out its
    /// ids, stops at a stop token or at `max_new_tokens` (steps a run made past a stop token are
    /// dropped), and commits the positions of the steps it keeps.
    fn decode_in_runs(
        &mut self,
        seq: SeqId,
        first: u32,
        opts: &GenerateOptions,
        gen: &mut Generation,
        on_token: &mut dyn FnMut(u32),
    ) -> Result<()> {
        let mut input = first;
        loop {
            let steps = (opts.max_new_tokens - gen.new_ids.len()).min(self.backend.decode_window());
            let run_start = Instant::now();
            let chosen = self.decode_run(seq, steps)?;
            let step_seconds = run_start.elapsed().as_secs_f64() / steps as f64;
            // Step i of the run read `input` (i = 0) or chosen[i - 1], and chose chosen[i].
            let mut kept = steps;
            let mut done = false;
            for (i, &id) in chosen.iter().enumerate() {
                gen.new_ids.push(id);
                on_token(id);
                if self.finished(gen, opts, id) {
                    (kept, done) = (i + 1, true);
                    break;
                }
            }
            let inputs: Vec<u32> = std::iter::once(input)
                .chain(chosen[..kept - 1].iter().copied())
                .collect();
            self.pool_mut()?.commit_first(seq, &inputs)?;
            gen.step_seconds
                .extend(std::iter::repeat_n(step_seconds, kept));
            if done {
                return Ok(());
            }
            input = chosen[steps - 1];
        }
    }

    /// Whether `id`, just handed out, ends the generation (and says so in `gen`).
    fn finished(&self, gen: &mut Generation, opts: &GenerateOptions, id: u32) -> bool {
        let done =
            gen.new_ids.len() == opts.max_new_tokens || (!opts.ignore_eos && self.is_stop(id));
        if done {
            gen.stopped_on_eos = self.is_stop(id);
        }
        done
    }

    /// The sequence a call runs in, and what of the prompt it already holds: the conversation's
    /// kept sequence up to its common prefix with `prompt`, or a new sequence (sharing what the
    /// prefix index finds, for `dynamic+reuse`).
    fn begin_sequence(
        &mut self,
        prompt: &[u32],
        opts: &GenerateOptions,
    ) -> Result<(SeqId, Option<ReuseStats>)> {
        let max_positions = self.model.config.max_position_embeddings;
        let kept = opts
            .conversation
            .filter(|_| opts.strategy.reuses())
            .and_then(|c| self.conversations.get(&c).copied());
        let pool = &mut self.kv.as_mut().context("no KV pool")?.1.pool;
        if let Some(seq) = kept {
            return Ok((seq, Some(resume_sequence(pool, seq, prompt)?)));
        }
        let capacity = match (opts.max_context, opts.strategy) {
            (Some(c), _) => c,
            (None, Strategy::StaticReuse) => max_positions,
            (None, _) => prompt.len() + opts.max_new_tokens,
        };
        if capacity > max_positions {
            bail!("max context {capacity} exceeds the model's max_position_embeddings {max_positions}");
        }
        let policy = self.kv_options.policy;
        let (seq, reuse) = start_sequence(pool, capacity, prompt, opts.strategy.reuses(), policy)?;
        if let Some(c) = opts.conversation.filter(|_| opts.strategy.reuses()) {
            self.conversations.insert(c, seq);
        }
        Ok((seq, reuse))
    }

    fn is_stop(&self, id: u32) -> bool {
        self.model.config.stop_token_ids.contains(&id)
    }

    fn pool(&self) -> Result<&ChunkPool> {
        Ok(&self.kv.as_ref().context("no KV pool")?.1.pool)
    }

    fn pool_mut(&mut self) -> Result<&mut ChunkPool> {
        Ok(&mut self.kv.as_mut().context("no KV pool")?.1.pool)
    }
}

impl<B: Backend> Generator for Engine<B> {
    fn config(&self) -> &Config {
        &self.model.config
    }

    fn backend_info(&self) -> BackendInfo {
        BackendInfo {
            kv_dtype: self.kv_dtype().name().into(),
            ..self.backend.info()
        }
    }

    fn weight_bytes_per_token(&self) -> usize {
        self.model.weight_bytes_per_token
    }

    fn set_allowed_tokens(&mut self, allowed: Option<&[bool]>) -> Result<()> {
        self.logit_bias = match allowed {
            None => None,
            Some(mask) => {
                let vocab = self.model.config.vocab_size;
                if !mask.iter().take(vocab).any(|&a| a) {
                    bail!("the allowed-token mask admits no id of the vocabulary");
                }
                let bias: Vec<f32> = (0..vocab)
                    .map(|i| {
                        if mask.get(i).copied().unwrap_or(false) {
                            0.0
                        } else {
                            f32::NEG_INFINITY
                        }
                    })
                    .collect();
                Some(self.backend.upload_vector(&bias)?)
            }
        };
        Ok(())
    }

    fn set_kv_options(&mut self, options: KvOptions) -> Result<()> {
        if let Some(dtype) = options.dtype {
            if !self.backend.kv_dtypes().contains(&dtype) {
                let names: Vec<&str> = self.backend.kv_dtypes().iter().map(|d| d.name()).collect();
                bail!(
                    "--kv-dtype {dtype}: the {} backend stores KV as {}; the CPU backend stores \
                     every type (--backend cpu)",
                    self.backend.info().name,
                    names.join(", ")
                );
            }
        }
        if options.policy != EvictionPolicy::Full && !self.backend.supports_eviction() {
            bail!(
                "--kv-policy {}: the {} backend keeps every position; eviction runs on the CPU \
                 backend (--backend cpu)",
                options.policy,
                self.backend.info().name
            );
        }
        self.kv = None;
        self.conversations.clear();
        self.kv_options = options;
        Ok(())
    }

    fn end_conversation(&mut self, conversation: u64) -> Result<()> {
        if let Some(seq) = self.conversations.remove(&conversation) {
            if let Some((_, store)) = self.kv.as_mut() {
                store.pool.release(seq)?;
            }
        }
        Ok(())
    }

    fn clear_kv_cache(&mut self) -> Result<()> {
        let kept: Vec<u64> = self.conversations.keys().copied().collect();
        for conversation in kept {
            self.end_conversation(conversation)?;
        }
        if let Some((_, store)) = self.kv.as_mut() {
            store.pool.clear_cached();
        }
        Ok(())
    }

    fn kv_pool_stats(&self) -> Option<PoolStats> {
        self.kv.as_ref().map(|(_, store)| store.pool.stats())
    }

    fn open_kv_pool(&mut self, strategy: Strategy, chunk_tokens: usize) -> Result<&mut ChunkPool> {
        Ok(&mut self.kv_store(strategy, chunk_tokens)?.pool)
    }

    fn kv_pool_mut(&mut self) -> Result<&mut ChunkPool> {
        Ok(&mut self.kv.as_mut().context("no KV pool is open")?.1.pool)
    }

    fn forward_batch(
        &mut self,
        copies: &[ChunkCopy],
        entries: &[BatchEntry],
        keep_logits: bool,
    ) -> Result<BatchOutput> {
        if entries.is_empty() {
            bail!("a batched step of no sequence");
        }
        let steps: Vec<(SeqId, usize)> = entries.iter().map(|e| (e.seq, e.ids.len())).collect();
        let store = &mut self.kv.as_mut().context("no KV pool is open")?.1;
        let view = store.reserved_step(&self.backend, copies, &steps)?;
        // A sequence split in two parts below would count its attention mass twice over.
        ensure!(
            !view.has_slot_maps() && !view.track_mass.contains(&true),
            "a batched step keeps every position: eviction policies (--kv-policy) run one \
             sequence at a time"
        );
        // Each sequence's last row at the step's end, in entry order: logits row i is entry i's.
        let (view, order) = view.last_rows_at_end();
        let rows: Vec<u32> = entries.iter().flat_map(|e| e.ids).copied().collect();
        let ids: Vec<u32> = order.iter().map(|&r| rows[r]).collect();
        let first = self.forward_view(&view, &ids, LogitRows::LastRows(entries.len()), 0)?;
        let store = &mut self.kv.as_mut().context("no KV pool is open")?.1;
        let committed: Vec<(SeqId, &[u32])> = entries.iter().map(|e| (e.seq, e.ids)).collect();
        store.finish_step(&self.backend, &view, &committed)?;
        let (backend, act) = (&self.backend, self.activations()?);
        let mut output = BatchOutput::default();
        for row in 0..entries.len() {
            if keep_logits {
                output.logits.push(backend.read_rows(&act.logits, row, 1)?);
            }
            let id = if row == 0 {
                first
            } else {
                backend.argmax(&act.logits, row, self.logit_bias.as_ref())?;
                backend.read_argmax()?
            };
            output.next_ids.push(id);
        }
        Ok(output)
    }

    fn generate(
        &mut self,
        prompt: &[u32],
        opts: &GenerateOptions,
        on_token: &mut dyn FnMut(u32),
    ) -> Result<Generation> {
        if prompt.is_empty() {
            bail!("the prompt has no tokens");
        }
        let cfg = &self.model.config;
        let total = prompt.len() + opts.max_new_tokens;
        if total > cfg.max_position_embeddings {
            bail!(
                "context overflow: {} prompt + {} new tokens exceed the model's {} positions",
                prompt.len(),
                opts.max_new_tokens,
                cfg.max_position_embeddings
            );
        }
        if opts.strategy == Strategy::None && self.kv_options.policy != EvictionPolicy::Full {
            bail!(
                "--kv-policy {} evicts from a cache, but --cache none keeps nothing between \
                 tokens; choose static or dynamic",
                self.kv_options.policy
            );
        }
        if opts.conversation.is_some() && !opts.strategy.reuses() {
            bail!(
                "a conversation is kept only by the +reuse strategies, not by {}",
                opts.strategy
            );
        }
        // Device times of earlier, unfinished calls are not this call's.
        self.backend.take_step_device_seconds()?;
        let mut gen = Generation {
            prompt_ids: prompt.to_vec(),
            ..Default::default()
        };
        if opts.max_new_tokens == 0 {
            return Ok(gen);
        }
        let prompt_rows = if opts.keep_prompt_logits {
            LogitRows::All
        } else {
            LogitRows::LastRows(1)
        };
        let mut step_logits = Vec::new();
        let keep = opts.keep_step_logits;
        self.kv_store(opts.strategy, opts.chunk_tokens)?;
        let allocations_before = self.pool()?.stats().allocations;
        let started = Instant::now();

        // The cached strategies run every step in one sequence; the no-cache strategy builds a
        // transient one per forward pass over the whole sequence so far.
        let (cached, reuse) = match opts.strategy {
            Strategy::None => (None, None),
            _ => {
                let (seq, reuse) = self.begin_sequence(prompt, opts)?;
                (Some(seq), reuse)
            }
        };
        let mut transient_peak = 0u64;
        let mut sequence = prompt.to_vec();
        let mut forward = |engine: &mut Self,
                           sequence: &[u32],
                           new_rows: usize,
                           logit_rows: LogitRows,
                           keep_logits: Option<&mut Vec<Vec<f32>>>,
                           prompt_logits: Option<&mut Vec<f32>>|
         -> Result<u32> {
            let new = &sequence[sequence.len() - new_rows..];
            match cached {
                Some(seq) => engine.step(seq, new, logit_rows, keep_logits, prompt_logits),
                None => {
                    let pool = &mut engine.kv.as_mut().context("no KV pool")?.1.pool;
                    let seq = pool.new_sequence(Some(sequence.len()))?;
                    transient_peak = transient_peak.max(pool.seq_stats(seq)?.reserved_bytes);
                    let id = engine.step(seq, sequence, logit_rows, keep_logits, prompt_logits);
                    engine
                        .kv
                        .as_mut()
                        .context("no KV pool")?
                        .1
                        .pool
                        .release(seq)?;
                    id
                }
            }
        };
        // Decode steps run on the backend's own ids (`decode_in_runs`) unless the host must see
        // each step: teacher forcing feeds its ids, kept logits are read every step, and the
        // no-cache strategy recomputes the whole sequence.
        // A sequence under an eviction policy also steps on the host: after every step the
        // policy decides what it keeps (`KvStore::finish_step`).
        let on_device = cached.is_some()
            && opts.feed_ids.is_none()
            && !keep
            && self.kv_options.policy == EvictionPolicy::Full;
        let result = (|| -> Result<()> {
            let prefill_rows = match (cached, reuse) {
                (Some(_), Some(r)) => r.prefilled_tokens,
                _ => prompt.len(),
            };
            let mut next = forward(
                self,
                &sequence,
                prefill_rows,
                prompt_rows,
                keep.then_some(&mut step_logits),
                opts.keep_prompt_logits.then_some(&mut gen.prompt_logits),
            )?;
            self.backend.synchronize()?;
            gen.prefill_seconds = started.elapsed().as_secs_f64();
            loop {
                let fed = opts
                    .feed_ids
                    .as_ref()
                    .and_then(|ids| ids.get(gen.new_ids.len()).copied())
                    .unwrap_or(next);
                gen.new_ids.push(next);
                sequence.push(fed);
                on_token(next);
                if self.finished(&mut gen, opts, next) {
                    break;
                }
                if let (Some(seq), true) = (cached, on_device) {
                    return self.decode_in_runs(seq, next, opts, &mut gen, on_token);
                }
                let step_start = Instant::now();
                next = forward(
                    self,
                    &sequence,
                    1,
                    LogitRows::LastRows(1),
                    keep.then_some(&mut step_logits),
                    None,
                )?;
                self.backend.synchronize()?;
                gen.step_seconds.push(step_start.elapsed().as_secs_f64());
            }
            Ok(())
        })();
        gen.decode_seconds = started.elapsed().as_secs_f64() - gen.prefill_seconds;
        let pool_stats = self.pool()?.stats();
        gen.kv = match cached {
            Some(seq) => {
                let s = self.pool()?.seq_stats(seq)?;
                KvStats {
                    reserved_bytes: s.reserved_bytes,
                    live_bytes: s.live_bytes,
                    shared_bytes: s.shared_bytes,
                    allocations: pool_stats.allocations - allocations_before,
                    peak_reserved_bytes: s.reserved_bytes,
                    tokens: s.tokens,
                    evicted_tokens: s.evicted_tokens,
                    chunks: s.chunks,
                    pool: pool_stats,
                }
            }
            None => KvStats {
                allocations: pool_stats.allocations - allocations_before,
                peak_reserved_bytes: transient_peak,
                pool: pool_stats,
                ..Default::default()
            },
        };
        // A sequence that no conversation keeps (or one whose call failed) is let go now.
        if let Some(seq) = cached {
            let kept = opts
                .conversation
                .is_some_and(|c| self.conversations.get(&c) == Some(&seq));
            if result.is_err() || !kept {
                if let Some(c) = opts.conversation {
                    self.conversations.remove(&c);
                }
                self.kv
                    .as_mut()
                    .context("no KV pool")?
                    .1
                    .pool
                    .release(seq)?;
                gen.kv.pool = self.pool()?.stats();
            }
        }
        result?;
        gen.reuse = reuse;
        gen.device_step_seconds = self.backend.take_step_device_seconds()?;
        // Steps a run of decode steps made past a stop token chose nothing handed out.
        gen.device_step_seconds.truncate(gen.new_ids.len());
        gen.step_logits = step_logits;
        Ok(gen)
    }
}
