//! Generation: prefill, then greedy decode one token at a time, outside the model.
//! Times are taken after the backend synchronizes, so they hold for asynchronous devices too.

use crate::backend::{Backend, BackendInfo};
use crate::kv::{CacheOptions, KvCache, KvStats, Strategy};
use crate::model::config::Config;
use crate::model::forward::{Activations, LogitRows, Model};
use anyhow::{bail, Result};
use serde::Serialize;
use std::time::Instant;

/// What to generate and how.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub strategy: Strategy,
    /// Static cache capacity; `None` = prompt + max_new_tokens, the way transformers sizes it.
    pub max_context: Option<usize>,
    pub chunk_tokens: usize,
    /// Run all `max_new_tokens` even past a stop token (fixed-length runs for fair timing).
    pub ignore_eos: bool,
    /// Keep the logits that chose each token.
    pub keep_step_logits: bool,
    /// Also return the logits of every prompt position (the no-cache and cached prefill alike).
    pub keep_prompt_logits: bool,
    /// Teacher forcing: after step i, feed `feed_ids[i]` instead of the chosen id (while there
    /// is one), so that every step's logits follow a reference's sequence whatever was chosen.
    pub feed_ids: Option<Vec<u32>>,
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
    /// Each decode step's time (tokens 2..).
    pub step_seconds: Vec<f64>,
    /// Device time of each forward pass (prefill first) where the backend measures it (CUDA
    /// events); empty on the CPU.
    pub device_step_seconds: Vec<f64>,
    pub stopped_on_eos: bool,
    /// Accounting of the KV memory this call used (the no-cache strategy: its transient buffers).
    pub kv: KvStats,
    #[serde(skip)]
    pub step_logits: Vec<Vec<f32>>,
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
    fn backend_info(&self) -> BackendInfo;
    /// Bytes of weights read per decoded token.
    fn weight_bytes_per_token(&self) -> usize;
    /// Restricts greedy choices to ids where `allowed[id]` (None lifts the restriction).
    fn set_allowed_tokens(&mut self, allowed: Option<&[bool]>) -> Result<()>;
    /// Greedy generation; `on_token` sees each new id as it is chosen.
    fn generate(
        &mut self,
        prompt: &[u32],
        opts: &GenerateOptions,
        on_token: &mut dyn FnMut(u32),
    ) -> Result<Generation>;
}

/// A model on a backend plus the buffers it runs in.
pub struct Engine<B: Backend> {
    pub backend: B,
    pub model: Model<B>,
    activations: Option<Activations<B>>,
    /// Additive logit mask (0 / -inf) `[vocab]`.
    logit_bias: Option<B::Weight>,
}

impl<B: Backend> Engine<B> {
    pub fn new(backend: B, model: Model<B>) -> Self {
        Engine {
            backend,
            model,
            activations: None,
            logit_bias: None,
        }
    }

    /// Activations for steps of `rows` rows; kept and reused while large enough.
    fn activations(&mut self, rows: usize, logit_rows: LogitRows) -> Result<&mut Activations<B>> {
        let fits = self
            .activations
            .as_ref()
            .is_some_and(|a| a.fits(rows, logit_rows));
        if !fits {
            let capacity = rows.max(self.activations.as_ref().map_or(0, |a| a.capacity()));
            let logit_capacity = if logit_rows == LogitRows::All {
                capacity
            } else {
                1
            };
            self.activations = None; // free before allocating the larger set
            self.activations = Some(Activations::new(
                &self.backend,
                &self.model.config,
                capacity,
                logit_capacity,
            )?);
        }
        Ok(self.activations.as_mut().expect("just allocated"))
    }

    fn cache_options(&self, opts: &GenerateOptions, prompt_len: usize) -> CacheOptions {
        CacheOptions {
            max_context: opts.max_context.unwrap_or(prompt_len + opts.max_new_tokens),
            chunk_tokens: opts.chunk_tokens,
        }
    }

    /// One forward pass over `ids`; returns the chosen next token.
    fn step(
        &mut self,
        cache: &mut KvCache<B>,
        ids: &[u32],
        logit_rows: LogitRows,
        keep_logits: Option<&mut Vec<Vec<f32>>>,
        prompt_logits: Option<&mut Vec<f32>>,
    ) -> Result<u32> {
        self.activations(ids.len(), logit_rows)?;
        let act = self.activations.as_mut().expect("allocated above");
        let (backend, model, bias) = (&self.backend, &self.model, self.logit_bias.as_ref());
        let last = if logit_rows == LogitRows::All {
            ids.len() - 1
        } else {
            0
        };
        // The choice is part of the step, so that a CUDA graph replays it with the forward pass.
        backend.run_step(&mut || {
            model.forward(backend, cache, ids, act, logit_rows)?;
            backend.argmax(&act.logits, last, bias)
        })?;
        if let Some(all) = prompt_logits {
            *all = backend.read_rows(&act.logits, 0, ids.len())?;
        }
        if let Some(keep) = keep_logits {
            keep.push(backend.read_rows(&act.logits, last, 1)?);
        }
        backend.read_argmax()
    }

    fn is_stop(&self, id: u32) -> bool {
        self.model.config.stop_token_ids.contains(&id)
    }
}

impl<B: Backend> Generator for Engine<B> {
    fn config(&self) -> &Config {
        &self.model.config
    }

    fn backend_info(&self) -> BackendInfo {
        self.backend.info()
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
            LogitRows::Last
        };
        let mut step_logits = Vec::new();
        let keep = opts.keep_step_logits;
        let cache_opts = self.cache_options(opts, prompt.len());
        let started = Instant::now();

        // The cached strategies keep one cache for the whole call; the no-cache strategy builds
        // a transient one per forward pass over the whole sequence.
        let mut cache = match opts.strategy {
            Strategy::None => None,
            s => Some(KvCache::new(&self.backend, s, cfg, cache_opts)?),
        };
        let mut kv = KvStats::default();
        let mut sequence = prompt.to_vec();
        let mut next = {
            let mut transient;
            let c = match cache.as_mut() {
                Some(c) => c,
                None => {
                    let sized = CacheOptions {
                        max_context: sequence.len(),
                        ..cache_opts
                    };
                    transient =
                        KvCache::new(&self.backend, Strategy::None, &self.model.config, sized)?;
                    &mut transient
                }
            };
            let id = self.step(
                c,
                &sequence,
                prompt_rows,
                keep.then_some(&mut step_logits),
                opts.keep_prompt_logits.then_some(&mut gen.prompt_logits),
            )?;
            kv.absorb(&c.stats());
            id
        };
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
            if gen.new_ids.len() == opts.max_new_tokens || (!opts.ignore_eos && self.is_stop(next))
            {
                gen.stopped_on_eos = self.is_stop(next);
                break;
            }
            let step_start = Instant::now();
            next = match cache.as_mut() {
                Some(c) => self.step(
                    c,
                    &[fed],
                    LogitRows::Last,
                    keep.then_some(&mut step_logits),
                    None,
                )?,
                None => {
                    let sized = CacheOptions {
                        max_context: sequence.len(),
                        ..cache_opts
                    };
                    let mut transient =
                        KvCache::new(&self.backend, Strategy::None, &self.model.config, sized)?;
                    let id = self.step(
                        &mut transient,
                        &sequence,
                        LogitRows::Last,
                        keep.then_some(&mut step_logits),
                        None,
                    )?;
                    kv.absorb(&transient.stats());
                    id
                }
            };
            self.backend.synchronize()?;
            gen.step_seconds.push(step_start.elapsed().as_secs_f64());
        }
        gen.decode_seconds = started.elapsed().as_secs_f64() - gen.prefill_seconds;
        if let Some(c) = &cache {
            let s = c.stats();
            kv = KvStats {
                allocations: s.allocations,
                ..s
            };
        }
        gen.kv = kv;
        gen.device_step_seconds = self.backend.take_step_device_seconds()?;
        gen.step_logits = step_logits;
        Ok(gen)
    }
}
