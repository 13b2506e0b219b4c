//! Continuous batching: which requests run in the next forward step, how many rows each, and
//! which sequence of the KV pool holds what.
//!
//! A request (one turn of a conversation: its prompt and how many tokens to generate) waits in
//! a FIFO queue until it is admitted; then it runs, one step after another, until it has all
//! its tokens (or a stop token). Every step is planned afresh, in this order:
//!
//! 1. **Running requests, oldest admitted first**, each with as many rows as it has tokens not
//!    yet in its sequence (one for a decoding request; the rest of its prompt for one still
//!    prefilling), cut to what is left of `max_batch_tokens` (chunked prefill: a long prompt
//!    spreads over several steps while the others keep decoding).
//! 2. Each of those rows is **reserved in the pool** before the step. In the paged mode a
//!    reservation takes new chunks when a sequence crosses a chunk boundary; when none is free
//!    (after evicting idle cached chunks), the scheduler first lets go of the **kept sequences**
//!    of conversations between turns (least recently used first), then **preempts** the most
//!    recently admitted running request: its sequence is released and the request goes back to
//!    the front of the queue, to be recomputed (prompt and the tokens generated so far) when it
//!    is admitted again (vLLM's recompute preemption). If the request being placed is itself
//!    the most recent, it is the one preempted. Each preemption says which request and
//!    sequence, and why. The static mode never preempts: each sequence holds its whole run.
//! 3. **Waiting requests, first come first served**, while rows are left: the static mode
//!    reserves the sequence's maximum context (its prompt + max new tokens, or `max_context`)
//!    as one contiguous run when it is admitted, as preallocating servers do, and admits no
//!    one once no run fits; the paged mode admits a request when the chunks of its whole
//!    prompt fit beside what the running requests still need for theirs (as vLLM's
//!    `can_allocate`; admitting on its first chunk alone would preempt it again at its next
//!    one), reserves its first rows, and takes the rest on demand. A request that does not fit
//!    waits at the head of the queue (no request overtakes it), and no request is admitted in
//!    a step that preempted one (it would take back the memory just freed).
//!
//! With prefix reuse, a conversation keeps its sequence between turns: its next request takes
//! the kept sequence's longest common prefix with the new prompt (the static mode: while the
//! run can hold the new turn), and the paged mode's new sequences share the full chunks the
//! pool's prefix index finds (a system prompt shared by every conversation, a preempted
//! request's own chunks). A request that can never run (more positions than the maximum
//! context, or more memory than the whole pool) is refused when submitted, alone.

use crate::generate::{
    resume_sequence, start_sequence, BatchEntry, BatchOutput, Generator, ReuseStats,
};
use crate::kv::{
    ChunkCopy, ChunkPool, EvictionPolicy, LayoutKind, PoolExhausted, SeqId, SeqStats, Strategy,
};
use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

use crate::kv::MIB;

/// How the pool gives sequences their memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Chunks taken on demand (the chunked layout, vLLM's paged attention).
    Paged,
    /// Each sequence's maximum context reserved when it is admitted (one contiguous run).
    Static,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Paged => "paged",
            Mode::Static => "static",
        }
    }

    /// The cache strategy whose layout (and prefix caching) the mode's pool has.
    pub fn strategy(self, prefix_reuse: bool) -> Strategy {
        match (self, prefix_reuse) {
            (Mode::Paged, false) => Strategy::Dynamic,
            (Mode::Paged, true) => Strategy::DynamicReuse,
            (Mode::Static, false) => Strategy::Static,
            (Mode::Static, true) => Strategy::StaticReuse,
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How the scheduler decides.
#[derive(Clone, Debug, Serialize)]
pub struct SchedulerOptions {
    pub mode: Mode,
    /// Conversations keep their sequence between turns; the paged mode shares cached chunks.
    pub prefix_reuse: bool,
    /// Rows (tokens) of one forward step, decode and prefill together.
    pub max_batch_tokens: usize,
    /// The longest a request may be, in positions, and the run a static sequence reserves
    /// (`None`: the model's positions; a static run then holds its prompt + max new tokens).
    pub max_context: Option<usize>,
    /// The model's `max_position_embeddings`.
    pub model_positions: usize,
    /// Ids that end a request before its max new tokens (empty: every request generates all).
    pub stop_ids: Vec<u32>,
    /// Return the logits that chose each token (tests).
    pub keep_logits: bool,
}

pub type RequestId = u64;

/// One turn of a conversation to generate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub id: RequestId,
    pub conversation: u64,
    pub prompt: Vec<u32>,
    pub max_new_tokens: usize,
}

/// A request given a sequence.
#[derive(Clone, Debug, PartialEq)]
pub struct Admission {
    pub request: RequestId,
    /// What of its tokens was already cached (kept or shared) and what it must compute.
    pub reuse: ReuseStats,
    /// It had been preempted before.
    pub readmitted: bool,
}

/// A running request whose sequence was released to make room, to be recomputed later.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Preemption {
    pub request: RequestId,
    pub conversation: u64,
    /// The sequence released, as the pool names it.
    pub sequence: String,
    /// Positions it held, now to be recomputed (less what the prefix index still finds).
    pub positions_freed: usize,
    pub reason: String,
}

/// A token chosen for a request in a step.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenEvent {
    pub request: RequestId,
    pub id: u32,
    /// The logits that chose it (with `keep_logits`).
    pub logits: Option<Vec<f32>>,
}

/// A request with all its tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct Finished {
    pub request: RequestId,
    pub conversation: u64,
    pub new_ids: Vec<u32>,
    pub stopped_on_eos: bool,
    /// What its first admission found cached.
    pub reuse: ReuseStats,
    pub preemptions: usize,
    /// Positions computed again after preemptions.
    pub recomputed_tokens: usize,
    /// Its sequence when it finished.
    pub kv: SeqStats,
}

/// What one step did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepReport {
    /// Rows run: decode rows (one per decoding request) and prefill rows (prompts, and
    /// recomputation after preemptions).
    pub decode_rows: usize,
    pub prefill_rows: usize,
    /// Sequences in the step.
    pub sequences: usize,
    pub admitted: Vec<Admission>,
    pub preempted: Vec<Preemption>,
    pub tokens: Vec<TokenEvent>,
    pub finished: Vec<Finished>,
}

impl StepReport {
    pub fn rows(&self) -> usize {
        self.decode_rows + self.prefill_rows
    }
}

/// A request the scheduler holds: waiting or running.
#[derive(Clone, Debug)]
struct Active {
    request: Request,
    /// Its prompt followed by the tokens generated so far.
    tokens: Vec<u32>,
    seq: Option<SeqId>,
    /// Leading `tokens` its sequence holds.
    computed: usize,
    /// What its first admission found cached.
    reuse: Option<ReuseStats>,
    preemptions: usize,
    /// Positions its last preemption freed, not yet recomputed or found again.
    freed: usize,
    recomputed_tokens: usize,
}

impl Active {
    fn generated(&self) -> &[u32] {
        &self.tokens[self.request.prompt.len()..]
    }
}

/// One sequence's rows in a planned step.
#[derive(Clone, Debug)]
struct PlannedEntry {
    request: RequestId,
    seq: SeqId,
    ids: Vec<u32>,
    /// One row, the request's latest generated token: a decode row (else prefill rows: the
    /// prompt, or a recomputation).
    decode: bool,
}

/// A step before it runs.
#[derive(Clone, Debug, Default)]
struct StepPlan {
    entries: Vec<PlannedEntry>,
    copies: Vec<ChunkCopy>,
    admitted: Vec<Admission>,
    preempted: Vec<Preemption>,
}

/// Waiting and running requests over one KV pool.
pub struct Scheduler {
    opts: SchedulerOptions,
    waiting: VecDeque<Active>,
    /// In the order they were admitted.
    running: Vec<Active>,
    /// Sequences conversations keep between turns, least recently used first.
    kept: Vec<(u64, SeqId)>,
}

impl Scheduler {
    pub fn new(opts: SchedulerOptions) -> Result<Scheduler> {
        ensure!(
            opts.max_batch_tokens > 0,
            "--max-batch-tokens must be at least 1"
        );
        Ok(Scheduler {
            opts,
            waiting: VecDeque::new(),
            running: Vec::new(),
            kept: Vec::new(),
        })
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Conversations holding a kept sequence between turns.
    pub fn kept(&self) -> usize {
        self.kept.len()
    }

    /// Nothing waits and nothing runs.
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// Queues a request, or refuses it (alone) when it can never run in `pool`: more positions
    /// than the maximum context, or more memory than the whole pool.
    pub fn submit(&mut self, pool: &ChunkPool, request: Request) -> Result<()> {
        let id = request.id;
        ensure!(
            !request.prompt.is_empty(),
            "request {id}: the prompt is empty"
        );
        ensure!(
            request.max_new_tokens > 0,
            "request {id}: it asks for no new token"
        );
        let total = request.prompt.len() + request.max_new_tokens;
        let (limit, what) = match self.opts.max_context {
            Some(c) if c <= self.opts.model_positions => (c, "--max-context"),
            _ => (
                self.opts.model_positions,
                "the model's max_position_embeddings",
            ),
        };
        ensure!(
            total <= limit,
            "request {id}: {} prompt + {} new tokens = {total} positions exceed the maximum \
             context of {limit} ({what})",
            request.prompt.len(),
            request.max_new_tokens
        );
        let layout = pool.layout();
        let chunk_tokens = layout.chunk_tokens();
        let needed = match layout.kind() {
            LayoutKind::Contiguous => self.static_capacity(&request).div_ceil(chunk_tokens),
            // A copy-on-write of a shared chunk takes one more for a moment.
            LayoutKind::Chunked => {
                total.div_ceil(chunk_tokens) + usize::from(pool.prefix_caching())
            }
        };
        ensure!(
            needed <= pool.num_chunks(),
            "request {id}: its {total} positions need {:.2} MiB of KV ({needed} chunks of \
             {chunk_tokens} positions), more than the whole --kv-budget of {:.2} MiB ({} chunks)",
            (needed * layout.chunk_bytes()) as f64 / MIB,
            (pool.num_chunks() * layout.chunk_bytes()) as f64 / MIB,
            pool.num_chunks()
        );
        self.waiting.push_back(Active {
            tokens: request.prompt.clone(),
            request,
            seq: None,
            computed: 0,
            reuse: None,
            preemptions: 0,
            freed: 0,
            recomputed_tokens: 0,
        });
        Ok(())
    }

    /// The run a static sequence reserves for `request`.
    fn static_capacity(&self, request: &Request) -> usize {
        self.opts
            .max_context
            .unwrap_or(request.prompt.len() + request.max_new_tokens)
    }

    /// Plans a step, runs it on `generator` (whose open pool the scheduler manages), and
    /// records its tokens. A step with no rows means there is nothing to do.
    pub fn step(&mut self, generator: &mut dyn Generator) -> Result<StepReport> {
        let plan = self.schedule(generator.kv_pool_mut()?)?;
        if plan.entries.is_empty() {
            if !self.is_idle() {
                let stats = generator.kv_pool_mut()?.stats();
                bail!(
                    "the scheduler placed no request although {} wait and {} run ({:.2} of \
                     {:.2} MiB of KV reserved)",
                    self.waiting.len(),
                    self.running.len(),
                    stats.reserved_bytes as f64 / MIB,
                    stats.capacity_bytes as f64 / MIB
                );
            }
            return Ok(StepReport::default());
        }
        let entries: Vec<BatchEntry> = plan
            .entries
            .iter()
            .map(|e| BatchEntry {
                seq: e.seq,
                ids: &e.ids,
            })
            .collect();
        let output = generator.forward_batch(&plan.copies, &entries, self.opts.keep_logits)?;
        self.complete(generator.kv_pool_mut()?, plan, output)
    }

    /// Lets go of a conversation's kept sequence (its last turn is done).
    pub fn end_conversation(&mut self, pool: &mut ChunkPool, conversation: u64) -> Result<()> {
        if let Some(at) = self.kept.iter().position(|&(c, _)| c == conversation) {
            pool.release(self.kept.remove(at).1)?;
        }
        Ok(())
    }

    /// Lets go of every sequence it holds (running, or kept) and forgets every request: the
    /// pool is left as if the scheduler had never run (but for its cached chunks).
    pub fn release_all(&mut self, pool: &mut ChunkPool) -> Result<()> {
        for active in self.running.drain(..) {
            if let Some(seq) = active.seq {
                pool.release(seq)?;
            }
        }
        for (_, seq) in self.kept.drain(..) {
            pool.release(seq)?;
        }
        self.waiting.clear();
        Ok(())
    }

    /// Decides the step's rows, reserving them in `pool` (see the module's doc).
    fn schedule(&mut self, pool: &mut ChunkPool) -> Result<StepPlan> {
        let mut plan = StepPlan::default();
        let mut budget = self.opts.max_batch_tokens;
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let active = &self.running[i];
            let rows = (active.tokens.len() - active.computed).min(budget);
            if !self.reserve_running(pool, i, rows, &mut plan)? {
                break;
            }
            plan.entries.push(self.entry(i, rows));
            budget -= rows;
            i += 1;
        }
        while budget > 0 && plan.preempted.is_empty() {
            match self.admit_front(pool, budget, &mut plan)? {
                Some(rows) => budget -= rows,
                None => break,
            }
        }
        Ok(plan)
    }

    /// The next `rows` of running request `i`.
    fn entry(&self, i: usize, rows: usize) -> PlannedEntry {
        let active = &self.running[i];
        let start = active.computed;
        PlannedEntry {
            request: active.request.id,
            seq: active.seq.expect("a running request has a sequence"),
            ids: active.tokens[start..start + rows].to_vec(),
            decode: rows == 1
                && start >= active.request.prompt.len()
                && start + 1 == active.tokens.len(),
        }
    }

    /// Reserves `rows` for running request `i`, freeing memory as the module's doc says when
    /// the pool is dry. False when `i` itself was preempted.
    fn reserve_running(
        &mut self,
        pool: &mut ChunkPool,
        i: usize,
        rows: usize,
        plan: &mut StepPlan,
    ) -> Result<bool> {
        let seq = self.running[i]
            .seq
            .expect("a running request has a sequence");
        loop {
            let exhausted = match pool.reserve(seq, rows) {
                Ok(copies) => {
                    plan.copies.extend(copies);
                    return Ok(true);
                }
                Err(e) => e.downcast::<PoolExhausted>()?,
            };
            if self.release_oldest_kept(pool)? {
                continue;
            }
            let victim = self.running.len() - 1;
            let reason = format!(
                "the KV pool had no free chunk for request {}'s next {rows} row(s) ({} chunk(s) \
                 missing); request {} was admitted last",
                self.running[i].request.id,
                exhausted.missing_chunks,
                self.running[victim].request.id
            );
            self.preempt(pool, victim, reason, plan)?;
            if victim == i {
                return Ok(false);
            }
        }
    }

    /// Releases running request `i`'s sequence and puts the request back at the head of the
    /// queue, to be recomputed.
    fn preempt(
        &mut self,
        pool: &mut ChunkPool,
        i: usize,
        reason: String,
        plan: &mut StepPlan,
    ) -> Result<()> {
        let mut active = self.running.remove(i);
        let seq = active.seq.take().expect("a running request has a sequence");
        let positions = pool.seq_len(seq)?;
        pool.release(seq)?;
        plan.preempted.push(Preemption {
            request: active.request.id,
            conversation: active.request.conversation,
            sequence: seq.to_string(),
            positions_freed: positions,
            reason,
        });
        active.preemptions += 1;
        active.freed = positions;
        active.computed = 0;
        self.waiting.push_front(active);
        Ok(())
    }

    /// Lets go of the least recently used kept sequence; false when none is kept.
    fn release_oldest_kept(&mut self, pool: &mut ChunkPool) -> Result<bool> {
        if self.kept.is_empty() {
            return Ok(false);
        }
        let (_, seq) = self.kept.remove(0);
        pool.release(seq)?;
        Ok(true)
    }

    /// Admits the request at the head of the queue with up to `budget` rows, if its memory
    /// fits (letting go of kept sequences first); returns the rows planned for it.
    fn admit_front(
        &mut self,
        pool: &mut ChunkPool,
        budget: usize,
        plan: &mut StepPlan,
    ) -> Result<Option<usize>> {
        let Some(mut active) = self.waiting.pop_front() else {
            return Ok(None);
        };
        let Some((seq, reuse)) = self.sequence_for(pool, &active)? else {
            self.waiting.push_front(active);
            return Ok(None);
        };
        let rows = (active.tokens.len() - reuse.reused_tokens).min(budget);
        if pool.layout().kind() == LayoutKind::Chunked {
            let chunk_tokens = pool.layout().chunk_tokens();
            let own = (active.tokens.len().div_ceil(chunk_tokens))
                .saturating_sub(pool.seq_table(seq)?.len());
            loop {
                let wanted = own + self.outstanding_chunks(pool)?;
                if wanted <= pool.available_chunks() {
                    break;
                }
                if !self.release_oldest_kept(pool)? {
                    // Its full chunks stay cached (prefix reuse) for when it fits.
                    pool.release(seq)?;
                    self.waiting.push_front(active);
                    return Ok(None);
                }
            }
        }
        loop {
            match pool.reserve(seq, rows) {
                Ok(copies) => {
                    plan.copies.extend(copies);
                    break;
                }
                Err(e) if e.is::<PoolExhausted>() => {
                    if self.release_oldest_kept(pool)? {
                        continue;
                    }
                    // Its full chunks stay cached (prefix reuse) for when it fits.
                    pool.release(seq)?;
                    self.waiting.push_front(active);
                    return Ok(None);
                }
                Err(e) => return Err(e),
            }
        }
        let readmitted = active.preemptions > 0;
        if readmitted {
            active.recomputed_tokens += active.freed.saturating_sub(reuse.reused_tokens);
            active.freed = 0;
        } else {
            active.reuse = Some(reuse);
        }
        active.seq = Some(seq);
        active.computed = reuse.reused_tokens;
        plan.admitted.push(Admission {
            request: active.request.id,
            reuse,
            readmitted,
        });
        self.running.push(active);
        plan.entries.push(self.entry(self.running.len() - 1, rows));
        Ok(Some(rows))
    }

    /// Chunks the running requests' sequences still lack for the tokens they know of (the
    /// rest of a prompt being prefilled; a decoding one's next chunk at a boundary).
    fn outstanding_chunks(&self, pool: &ChunkPool) -> Result<usize> {
        let chunk_tokens = pool.layout().chunk_tokens();
        let mut chunks = 0;
        for active in &self.running {
            let seq = active.seq.expect("a running request has a sequence");
            let held = pool.seq_table(seq)?.len();
            chunks += active
                .tokens
                .len()
                .div_ceil(chunk_tokens)
                .saturating_sub(held);
        }
        Ok(chunks)
    }

    /// The sequence a request runs in: its conversation's kept one (up to the common prefix)
    /// or a new one; `None` when no memory can be found for a new one.
    fn sequence_for(
        &mut self,
        pool: &mut ChunkPool,
        active: &Active,
    ) -> Result<Option<(SeqId, ReuseStats)>> {
        let request = &active.request;
        let kept = self
            .kept
            .iter()
            .position(|&(c, _)| c == request.conversation)
            .map(|at| self.kept.remove(at).1);
        if let Some(seq) = kept {
            let room = pool.seq_capacity(seq)?;
            if room.is_none_or(|room| room >= request.prompt.len() + request.max_new_tokens) {
                return Ok(Some((seq, resume_sequence(pool, seq, &active.tokens)?)));
            }
            // A static run too short for this turn: start over in a new one.
            pool.release(seq)?;
        }
        let capacity = self.static_capacity(request);
        loop {
            match start_sequence(
                pool,
                capacity,
                &active.tokens,
                self.opts.prefix_reuse,
                EvictionPolicy::Full,
            ) {
                Ok((seq, reuse)) => {
                    let reuse = reuse.unwrap_or(ReuseStats {
                        prompt_tokens: active.tokens.len(),
                        prefilled_tokens: active.tokens.len(),
                        ..Default::default()
                    });
                    return Ok(Some((seq, reuse)));
                }
                Err(e) if e.is::<PoolExhausted>() => {
                    if !self.release_oldest_kept(pool)? {
                        return Ok(None);
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Records the step's chosen tokens: a request whose last token ran gets the next one, and
    /// one with all its tokens (or a stop token) finishes, its sequence kept for its
    /// conversation's next turn (prefix reuse) or released.
    fn complete(
        &mut self,
        pool: &mut ChunkPool,
        plan: StepPlan,
        output: BatchOutput,
    ) -> Result<StepReport> {
        ensure!(
            output.next_ids.len() == plan.entries.len(),
            "{} ids chosen for a step of {} sequences",
            output.next_ids.len(),
            plan.entries.len()
        );
        let mut report = StepReport {
            sequences: plan.entries.len(),
            admitted: plan.admitted,
            preempted: plan.preempted,
            ..Default::default()
        };
        let mut logits = output.logits.into_iter();
        for (entry, &next) in plan.entries.iter().zip(&output.next_ids) {
            let entry_logits = logits.next();
            if entry.decode {
                report.decode_rows += entry.ids.len();
            } else {
                report.prefill_rows += entry.ids.len();
            }
            let i = self
                .running
                .iter()
                .position(|a| a.request.id == entry.request)
                .expect("a planned request is running");
            let active = &mut self.running[i];
            active.computed += entry.ids.len();
            if active.computed < active.tokens.len() {
                continue; // a prefill chunk before the prompt's last one
            }
            active.tokens.push(next);
            report.tokens.push(TokenEvent {
                request: entry.request,
                id: next,
                logits: entry_logits,
            });
            let stopped = self.opts.stop_ids.contains(&next);
            if stopped || active.generated().len() == active.request.max_new_tokens {
                let active = self.running.remove(i);
                report.finished.push(self.finish(pool, active, stopped)?);
            }
        }
        Ok(report)
    }

    fn finish(&mut self, pool: &mut ChunkPool, active: Active, stopped: bool) -> Result<Finished> {
        let seq = active.seq.expect("a running request has a sequence");
        let kv = pool.seq_stats(seq)?;
        if self.opts.prefix_reuse {
            self.kept.push((active.request.conversation, seq));
        } else {
            pool.release(seq)?;
        }
        Ok(Finished {
            request: active.request.id,
            conversation: active.request.conversation,
            new_ids: active.generated().to_vec(),
            stopped_on_eos: stopped,
            reuse: active.reuse.unwrap_or_default(),
            preemptions: active.preemptions,
            recomputed_tokens: active.recomputed_tokens,
            kv,
        })
    }
}

#[cfg(test)]
mod tests;
