//! The CUDA backend against transformers' float32 outputs on the tiny checkpoints of
//! tests/fixtures, for every cache strategy, teacher-forced: after each step the reference's id
//! is fed back whatever was chosen, so every step's logits follow the reference's sequence and
//! every one of them is compared (within 2e-2: bf16 weights and activations). The chosen id
//! must be the reference's at every step whose reference top-2 gap exceeds twice that
//! tolerance (where logits within it cannot pick another). Also: CUDA graphs replay exactly what
//! kernel-by-kernel launches compute, and sequences batched into the same steps (prefill chunks
//! beside decode rows) follow the reference each.
use super::fixtures::{max_abs_diff, RefGeneration, MODELS};
use super::{Check, Context};
use crate::backend::cuda::{CudaBackend, CudaOptions};
use crate::backend::{Backend, KvStore};
use crate::generate::{Engine, GenerateOptions, Generation, Generator, KvOptions};
use crate::kv::{KvDtype, KvLayout, Strategy};
use crate::model::forward::{Activations, LogitRows, Model};
use crate::npy::read_f32_array;
use crate::roofline::fixture::KvShape;
use anyhow::{ensure, Context as _, Result};

pub const CHECKS: &[Check] = &[
    Check {
        group: "reference",
        name: "tiny-llama3-gqa4-bf16",
        run: |ctx| every_strategy(ctx, MODELS[0]),
    },
    Check {
        group: "reference",
        name: "tiny-mha-f32-sharded",
        run: |ctx| every_strategy(ctx, MODELS[1]),
    },
    Check {
        group: "reference",
        name: "tiny-gqa3-headdim32-f16",
        run: |ctx| every_strategy(ctx, MODELS[2]),
    },
    Check {
        group: "reference",
        name: "chunks_smaller_than_the_prompt",
        run: dynamic_cache_with_chunks_smaller_than_the_prompt,
    },
    Check {
        group: "reference",
        name: "graphs_replay_launches",
        run: graphs_replay_exactly_what_launches_compute,
    },
    Check {
        group: "reference",
        name: "batched_sequences",
        run: batched_sequences_follow_the_reference,
    },
    Check {
        group: "reference",
        name: "device_token_runs",
        run: device_token_runs_equal_host_round_trips,
    },
    Check {
        group: "reference",
        name: "quantized_caches",
        run: quantized_caches_follow_the_reference,
    },
    Check {
        group: "reference",
        name: "programmatic_launch",
        run: programmatic_launch_equals_plain_launch,
    },
];

/// Largest difference allowed between the device's logits and transformers' float32 ones.
pub const TOLERANCE: f32 = 2e-2;

/// Largest logit difference a KV element type adds to the full-precision cache's logits on the
/// tiny references: about twice the worst the CPU backend measured against its f32 cache (bf16
/// 7.5e-3, int8 1.9e-2, fp8 e4m3 0.11, 2026-12-03; tests/smaller_caches.rs). They follow each
/// type's step: bf16 rounds every value to 2^-9 of itself, int8 a row to 1/254 of its largest
/// value, e4m3 every value to 2^-4 of itself.
pub fn kv_dtype_tolerance(dtype: KvDtype) -> f32 {
    match dtype {
        KvDtype::F32 => 0.0,
        KvDtype::Bf16 => 0.015,
        KvDtype::Int8 => 0.04,
        KvDtype::Fp8E4m3 => 0.2,
    }
}

/// The fixture `name` loaded on a CUDA backend of the context's device.
pub fn engine(ctx: &Context, name: &str, options: CudaOptions) -> Result<Engine<CudaBackend>> {
    let backend = ctx.backend(options)?;
    let dir = ctx.fixtures.join(name);
    let model = Model::load(&backend, &dir)
        .with_context(|| format!("loading the fixture {}", dir.display()))?;
    Ok(Engine::new(backend, model))
}

/// The fixture's generation with `strategy`, the reference's ids fed back when `teacher_forced`.
pub fn generate(
    engine: &mut Engine<CudaBackend>,
    reference: &RefGeneration,
    strategy: Strategy,
    chunk_tokens: usize,
    teacher_forced: bool,
) -> Result<Generation> {
    let opts = GenerateOptions {
        feed_ids: teacher_forced
            .then(|| reference.ids(strategy).map(<[u32]>::to_vec))
            .transpose()?,
        ..reference.options(strategy, chunk_tokens)
    };
    engine.generate(&reference.prompt_ids, &opts, &mut |_| {})
}

/// What one teacher-forced generation measured against the reference.
#[derive(Clone, Debug)]
pub struct Agreement {
    pub prompt_diff: f32,
    /// The largest difference over every step, and its step.
    pub step_diff: f32,
    pub worst_step: usize,
    /// Steps whose reference top-2 gap exceeds 2 x [`TOLERANCE`]: their ids are checked.
    pub decided_steps: usize,
}

/// One fixture, one strategy, teacher-forced; an error names the step and the difference.
pub fn check_model(
    ctx: &Context,
    name: &str,
    strategy: Strategy,
    chunk_tokens: usize,
) -> Result<Agreement> {
    let dir = ctx.fixtures.join(name);
    let reference = RefGeneration::load(&dir)?;
    let mut engine = engine(ctx, name, CudaOptions::default())?;
    let vocab = engine.model.config.vocab_size;
    let gen = generate(&mut engine, &reference, strategy, chunk_tokens, true)?;
    let what = format!("{name} {strategy} chunk {chunk_tokens}");

    let (shape, prompt_logits) = read_f32_array(&dir.join("ref_prompt_logits.npy"))?;
    ensure!(
        shape == [reference.prompt_ids.len() as u64, vocab as u64],
        "{what}: ref_prompt_logits.npy has shape {shape:?}"
    );
    let prompt_diff = max_abs_diff(&gen.prompt_logits, &prompt_logits)?;
    ensure!(
        prompt_diff <= TOLERANCE,
        "{what}: prompt logits differ from transformers' by {prompt_diff} (tolerance {TOLERANCE})"
    );

    let (_, step_logits) = read_f32_array(&dir.join("ref_step_logits.npy"))?;
    let expected = reference.ids(strategy)?;
    ensure!(
        gen.step_logits.len() == expected.len() && step_logits.len() == expected.len() * vocab,
        "{what}: {} steps generated, {} reference ids, {} reference logit rows",
        gen.step_logits.len(),
        expected.len(),
        step_logits.len() / vocab
    );
    let mut agreement = Agreement {
        prompt_diff,
        step_diff: 0.0,
        worst_step: 0,
        decided_steps: 0,
    };
    for (step, got) in gen.step_logits.iter().enumerate() {
        let want = &step_logits[step * vocab..(step + 1) * vocab];
        let diff = max_abs_diff(got, want)?;
        if diff > agreement.step_diff {
            agreement.step_diff = diff;
            agreement.worst_step = step;
        }
        ensure!(
            diff <= TOLERANCE,
            "{what}: step {step}'s logits differ from transformers' by {diff} (tolerance \
             {TOLERANCE})"
        );
        let mut sorted = want.to_vec();
        sorted.sort_by(|a, b| b.total_cmp(a));
        if sorted[0] - sorted[1] > 2.0 * TOLERANCE {
            agreement.decided_steps += 1;
            ensure!(
                gen.new_ids[step] == expected[step],
                "{what}: step {step} chose id {} where transformers chose {} by a margin of {}",
                gen.new_ids[step],
                expected[step],
                sorted[0] - sorted[1]
            );
        }
    }
    Ok(agreement)
}

fn every_strategy(ctx: &Context, name: &str) -> Result<String> {
    let mut notes = Vec::new();
    for strategy in Strategy::ALL {
        let a = check_model(ctx, name, strategy, 256)?;
        notes.push(format!(
            "{strategy}: prompt {:.4}, steps {:.4} (worst step {}), {} ids decided",
            a.prompt_diff, a.step_diff, a.worst_step, a.decided_steps
        ));
    }
    Ok(notes.join("; "))
}

fn dynamic_cache_with_chunks_smaller_than_the_prompt(ctx: &Context) -> Result<String> {
    // Chunks of 7: boundaries inside the prefill and between decode steps.
    for name in [MODELS[0], MODELS[2]] {
        check_model(ctx, name, Strategy::Dynamic, 7)?;
    }
    Ok("chunks of 7".into())
}

fn graphs_replay_exactly_what_launches_compute(ctx: &Context) -> Result<String> {
    let reference = RefGeneration::load(&ctx.fixtures.join(MODELS[0]))?;
    let without_graphs = CudaOptions {
        graphs: false,
        ..CudaOptions::default()
    };
    for (strategy, chunk_tokens) in [(Strategy::Static, 256), (Strategy::Dynamic, 7)] {
        let mut with = engine(ctx, MODELS[0], CudaOptions::default())?;
        let mut without = engine(ctx, MODELS[0], without_graphs)?;
        let a = generate(&mut with, &reference, strategy, chunk_tokens, false)?;
        let b = generate(&mut without, &reference, strategy, chunk_tokens, false)?;
        ensure!(
            a.new_ids == b.new_ids,
            "{strategy}: ids with graphs {:?}, without {:?}",
            a.new_ids,
            b.new_ids
        );
        ensure!(
            a.step_logits == b.step_logits,
            "{strategy}: logits with and without graphs differ"
        );
        // Prefill and the first decode step run launch by launch, the second is captured, and
        // every later step replays the graph, chunks added mid-decode included.
        let stats = with.backend.graph_stats();
        let decode_steps = a.new_ids.len() as u64 - 1;
        ensure!(
            stats.capture_failures == 0 && stats.graphs_captured == 1,
            "{strategy}: {stats:?}; capture error: {:?}",
            with.backend.graph_capture_error()
        );
        ensure!(
            stats.graphs_replayed == decode_steps - 2,
            "{strategy}: {stats:?}, expected {} replays",
            decode_steps - 2
        );
        ensure!(
            without.backend.graph_stats().graphs_replayed == 0,
            "graphs off, yet {:?}",
            without.backend.graph_stats()
        );
        ensure!(
            a.device_step_seconds.len() == decode_steps as usize + 1,
            "{} device step times for {} steps",
            a.device_step_seconds.len(),
            decode_steps + 1
        );
    }
    // The no-cache strategy's recompute grows every step: nothing repeats, nothing is captured.
    let mut none = engine(ctx, MODELS[0], CudaOptions::default())?;
    generate(&mut none, &reference, Strategy::None, 256, false)?;
    let stats = none.backend.graph_stats();
    ensure!(
        stats.graphs_captured == 0,
        "the no-cache strategy captured: {stats:?}"
    );
    Ok("static and dynamic (chunks of 7), bit-identical".into())
}

/// Decode steps in runs on the device's own ids (`CudaOptions::decode_window` of 1, 5 and 16
/// steps between reads) against one host round trip a token (kept step logits make generate
/// read every step): the same ids, with and without a stop token inside a run, and the same
/// sequence in the pool after the call (positions, chunks, and, through a conversation's next
/// turn, the committed token ids), for the static cache, the dynamic one in chunks of 7 (new
/// chunks inside runs) and dynamic+reuse (full chunks registered after a run). Every run
/// replays the graph from the third decode step on.
fn device_token_runs_equal_host_round_trips(ctx: &Context) -> Result<String> {
    let reference = RefGeneration::load(&ctx.fixtures.join(MODELS[0]))?;
    let prompt = &reference.prompt_ids;
    let mut notes = Vec::new();
    for (strategy, chunk_tokens) in [
        (Strategy::Static, 256),
        (Strategy::Dynamic, 7),
        (Strategy::DynamicReuse, 7),
    ] {
        let base_opts = GenerateOptions {
            max_new_tokens: reference.max_new_tokens,
            strategy,
            chunk_tokens,
            ignore_eos: true,
            conversation: strategy.reuses().then_some(1),
            ..GenerateOptions::default()
        };
        // One call, then (reuse) the conversation's next turn: how much of it was found cached.
        let call = |engine: &mut Engine<CudaBackend>,
                    opts: &GenerateOptions,
                    stop: Option<u32>|
         -> Result<(Generation, Option<usize>)> {
            engine.clear_kv_cache()?;
            engine.model.config.stop_token_ids = stop.into_iter().collect();
            let opts = GenerateOptions {
                ignore_eos: stop.is_none(),
                ..opts.clone()
            };
            let gen = engine.generate(prompt, &opts, &mut |_| {})?;
            let reused = match opts.conversation {
                Some(_) => {
                    let next: Vec<u32> = prompt.iter().chain(&gen.new_ids).copied().collect();
                    let turn = GenerateOptions {
                        max_new_tokens: 1,
                        ..opts.clone()
                    };
                    let again = engine.generate(&next, &turn, &mut |_| {})?;
                    again.reuse.map(|r| r.reused_tokens)
                }
                None => None,
            };
            Ok((gen, reused))
        };
        let mut host = engine(ctx, MODELS[0], CudaOptions::default())?;
        let per_token = GenerateOptions {
            keep_step_logits: true,
            ..base_opts.clone()
        };
        let (full, full_reused) = call(&mut host, &per_token, None)?;
        // The first id that is not the first one, as a stop token: inside a run of 5 or 16
        // (the fixture's ids: 12 times 486, then 628).
        let (stop_at, &stop) = full
            .new_ids
            .iter()
            .enumerate()
            .find(|&(_, &id)| id != full.new_ids[0])
            .context("the fixture's generation repeats one id: no stop token to place")?;
        let (stopped, stopped_reused) = call(&mut host, &per_token, Some(stop))?;
        ensure!(
            stopped.stopped_on_eos && stopped.new_ids.len() == stop_at + 1,
            "{strategy}: the stop token {stop} (id {stop_at}) did not stop the per-token \
             generation there: {:?}",
            stopped.new_ids
        );
        let same_sequence = |a: &Generation, b: &Generation| {
            (
                a.kv.tokens,
                a.kv.chunks,
                a.kv.reserved_bytes,
                a.kv.live_bytes,
            ) == (
                b.kv.tokens,
                b.kv.chunks,
                b.kv.reserved_bytes,
                b.kv.live_bytes,
            )
        };
        for window in [1, 5, 16] {
            let what = format!("{strategy} chunks of {chunk_tokens}, runs of {window}");
            let mut device = engine(
                ctx,
                MODELS[0],
                CudaOptions {
                    decode_window: window,
                    ..CudaOptions::default()
                },
            )?;
            let (gen, reused) = call(&mut device, &base_opts, None)?;
            ensure!(
                gen.new_ids == full.new_ids,
                "{what}: ids {:?}, one round trip a token {:?}",
                gen.new_ids,
                full.new_ids
            );
            ensure!(
                same_sequence(&gen, &full) && reused == full_reused,
                "{what}: the sequence holds {:?} (next turn reused {reused:?}), one round trip a \
                 token {:?} ({full_reused:?})",
                gen.kv,
                full.kv
            );
            let decode_steps = gen.new_ids.len() as u64 - 1;
            let stats = device.backend.graph_stats();
            ensure!(
                stats.graphs_replayed >= decode_steps - 2 && stats.capture_failures == 0,
                "{what}: {stats:?} for {decode_steps} decode steps"
            );
            ensure!(
                gen.device_step_seconds.len() == gen.new_ids.len()
                    && gen.step_seconds.len() == gen.new_ids.len() - 1,
                "{what}: {} device and {} host step times for {} ids",
                gen.device_step_seconds.len(),
                gen.step_seconds.len(),
                gen.new_ids.len()
            );
            let (gen, reused) = call(&mut device, &base_opts, Some(stop))?;
            ensure!(
                gen.new_ids == stopped.new_ids && gen.stopped_on_eos,
                "{what}, stop token {stop}: ids {:?}, one round trip a token {:?}",
                gen.new_ids,
                stopped.new_ids
            );
            ensure!(
                same_sequence(&gen, &stopped) && reused == stopped_reused,
                "{what}, stop token {stop}: the sequence holds {:?} (next turn reused \
                 {reused:?}), one round trip a token {:?} ({stopped_reused:?})",
                gen.kv,
                stopped.kv
            );
        }
        notes.push(format!(
            "{strategy}: {} ids, stopped after {}",
            full.new_ids.len(),
            stopped.new_ids.len()
        ));
    }
    Ok(notes.join("; "))
}

/// Programmatic dependent launch (`CudaOptions::programmatic_launch`) against plain launches,
/// for every fixture: the same prompt and step logits and ids, bit for bit, with the step
/// logits kept (static cache: a round trip a token, graphs replaying) and the same ids in runs
/// of 16 steps on the device's own ids (chunks of 7); every launch of a decode step is marked
/// programmatic, and none without the option. On the emulator launches run one after another:
/// this checks the plumbing and that every thread of those kernels waits. On a GPU (sm_90+)
/// the kernels overlap, and a kernel that reads or writes an earlier kernel's memory before its
/// `grid_dependency_wait()` races: that shows here as a difference, if the race is lost.
fn programmatic_launch_equals_plain_launch(ctx: &Context) -> Result<String> {
    let programmatic = CudaOptions {
        programmatic_launch: true,
        ..CudaOptions::default()
    };
    let mut steps = 0;
    for name in MODELS {
        let reference = RefGeneration::load(&ctx.fixtures.join(name))?;
        let kept_logits = reference.options(Strategy::Static, 256);
        let runs = GenerateOptions {
            keep_step_logits: false,
            keep_prompt_logits: false,
            ..reference.options(Strategy::Dynamic, 7)
        };
        for (what, opts) in [("kept logits", kept_logits), ("runs", runs)] {
            let mut generations = Vec::new();
            for options in [CudaOptions::default(), programmatic] {
                let mut engine = engine(ctx, name, options)?;
                let gen = engine.generate(&reference.prompt_ids, &opts, &mut |_| {})?;
                let launches = engine.backend.last_step_launches();
                let marked = launches.iter().filter(|(_, c)| c.programmatic).count();
                let expected = if options.programmatic_launch {
                    launches.len()
                } else {
                    0
                };
                ensure!(
                    !launches.is_empty() && marked == expected,
                    "{name} {what}, programmatic launch {}: {marked} of the last step's {} \
                     launches are programmatic, expected {expected}",
                    options.programmatic_launch,
                    launches.len()
                );
                generations.push(gen);
            }
            let (plain, pdl) = (&generations[0], &generations[1]);
            ensure!(
                plain.new_ids == pdl.new_ids,
                "{name} {what}: ids with programmatic launch {:?}, without {:?}",
                pdl.new_ids,
                plain.new_ids
            );
            ensure!(
                plain.step_logits == pdl.step_logits && plain.prompt_logits == pdl.prompt_logits,
                "{name} {what}: logits with and without programmatic launch differ"
            );
            steps += pdl.new_ids.len();
        }
    }
    Ok(format!(
        "{steps} tokens of the three fixtures, bit-identical with and without"
    ))
}

/// Steps of each batched sequence of [`batched_sequences_follow_the_reference`]: the step it
/// joins at, and its first steps' rows before it goes one row at a time: A prefills in chunks
/// of 20, B its whole prompt at once beside them, C one row per step from the first (its prompt
/// through the decode kernel).
const BATCH_SCHEDULE: [(usize, &[usize]); 3] = [(0, &[20, 20, 20]), (1, &[45]), (0, &[])];

/// Three copies of the reference conversation (prompt, then the reference's ids fed back) in
/// one pool, staggered by [`BATCH_SCHEDULE`] so that steps mix prefill chunks and decode rows
/// of several sequences, in both layouts: every row's logits must be transformers' at that
/// position within [`TOLERANCE`], the same with graphs as without, bit for bit, and runs of
/// steps with the same rows per sequence (decode steps of the same sequences included) must
/// replay one graph.
fn batched_sequences_follow_the_reference(ctx: &Context) -> Result<String> {
    let name = MODELS[0];
    let dir = ctx.fixtures.join(name);
    let reference = RefGeneration::load(&dir)?;
    let (_, prompt_logits) = read_f32_array(&dir.join("ref_prompt_logits.npy"))?;
    let (_, step_logits) = read_f32_array(&dir.join("ref_step_logits.npy"))?;
    let prompt_len = reference.prompt_ids.len();
    let new_ids = reference.ids(Strategy::Dynamic)?;
    // Position p's logits: the prompt's for p < prompt_len, then each step's (step 0 is the
    // last prompt position).
    let ids: Vec<u32> = reference
        .prompt_ids
        .iter()
        .chain(&new_ids[..new_ids.len() - 1])
        .copied()
        .collect();
    let positions = ids.len();
    let mut notes = Vec::new();
    for shape in [KvShape::Contiguous, KvShape::Chunked(7)] {
        let mut runs = Vec::new();
        for graphs in [true, false] {
            let backend = ctx.backend(CudaOptions {
                graphs,
                ..CudaOptions::default()
            })?;
            let model = Model::load(&backend, &dir)?;
            let vocab = model.config.vocab_size;
            let (patterns, logits) = run_batch_schedule(&backend, &model, shape, &ids)?;
            // Every row against transformers at its position.
            let mut worst = 0.0f32;
            for (step, (pattern, rows_logits)) in patterns.iter().zip(&logits).enumerate() {
                for (row, &(seq, pos)) in pattern.iter().enumerate() {
                    let want = if pos < prompt_len {
                        &prompt_logits[pos * vocab..(pos + 1) * vocab]
                    } else {
                        let at = pos + 1 - prompt_len;
                        &step_logits[at * vocab..(at + 1) * vocab]
                    };
                    let diff = max_abs_diff(&rows_logits[row * vocab..(row + 1) * vocab], want)?;
                    ensure!(
                        diff <= TOLERANCE,
                        "{name} batched {shape}, graphs {graphs}: step {step}, sequence {seq} at \
                         position {pos}: logits differ from transformers' by {diff} (tolerance \
                         {TOLERANCE})"
                    );
                    worst = worst.max(diff);
                }
            }
            // Consecutive steps with the same rows per sequence launch the same work: the
            // second is captured, the rest replay (the schedule never returns to an earlier
            // pattern).
            let rows_of = |p: &Vec<(usize, usize)>| -> Vec<(usize, usize)> {
                let mut rows: Vec<(usize, usize)> = Vec::new();
                for &(seq, _) in p {
                    match rows.last_mut() {
                        Some((s, n)) if *s == seq => *n += 1,
                        _ => rows.push((seq, 1)),
                    }
                }
                rows
            };
            let shapes: Vec<_> = patterns.iter().map(rows_of).collect();
            let mut expected_replays = 0u64;
            for run in shapes.chunk_by(|a, b| a == b) {
                expected_replays += run.len().saturating_sub(2) as u64;
            }
            let stats = backend.graph_stats();
            let replays = if graphs { expected_replays } else { 0 };
            ensure!(
                stats.graphs_replayed == replays && stats.capture_failures == 0,
                "{name} batched {shape}, graphs {graphs}: {stats:?}, expected {replays} replays"
            );
            if graphs {
                notes.push(format!(
                    "{shape}: {} steps, {replays} replayed, worst logit difference {worst:.4}",
                    patterns.len()
                ));
            }
            runs.push(logits);
        }
        ensure!(
            runs[0] == runs[1],
            "{name} batched {shape}: logits with and without graphs differ"
        );
    }
    Ok(format!(
        "3 sequences of {positions} positions; {}",
        notes.join("; ")
    ))
}

/// Runs [`BATCH_SCHEDULE`] over `ids` for three sequences in one pool of `shape`: per step, the
/// (sequence, position) of each row and the logits of every row.
#[allow(clippy::type_complexity)]
fn run_batch_schedule(
    backend: &CudaBackend,
    model: &Model<CudaBackend>,
    shape: KvShape,
    ids: &[u32],
) -> Result<(Vec<Vec<(usize, usize)>>, Vec<Vec<f32>>)> {
    let cfg = &model.config;
    let positions = ids.len();
    let unit = match shape {
        KvShape::Contiguous => 8,
        KvShape::Chunked(n) => n,
    };
    let layout = KvLayout::new(
        shape.kind(),
        backend.kv_dtypes()[0],
        cfg.num_layers,
        cfg.num_kv_heads,
        cfg.head_dim,
        unit,
    )?;
    let mut store = KvStore::new(
        backend,
        layout,
        BATCH_SCHEDULE.len() * positions.div_ceil(unit),
        false,
    )?;
    let seqs = (0..BATCH_SCHEDULE.len())
        .map(|_| store.pool.new_sequence(Some(positions)))
        .collect::<Result<Vec<_>>>()?;
    let max_rows: usize = BATCH_SCHEDULE
        .iter()
        .map(|(_, rows)| rows.iter().copied().max().unwrap_or(1))
        .sum();
    let mut act = Activations::new(backend, cfg, max_rows, max_rows)?;
    let mut written = vec![0usize; seqs.len()];
    let (mut patterns, mut logits) = (Vec::new(), Vec::new());
    for step in 0usize.. {
        let (mut members, mut ends) = (Vec::new(), Vec::new());
        let mut pattern = Vec::new();
        let mut step_ids = Vec::new();
        for (i, &(join, first_rows)) in BATCH_SCHEDULE.iter().enumerate() {
            let Some(k) = step.checked_sub(join) else {
                continue;
            };
            let rows = first_rows.get(k).copied().unwrap_or(1);
            let rows = rows.min(positions - written[i]);
            if rows == 0 {
                continue;
            }
            members.push((seqs[i], rows));
            pattern.extend((written[i]..written[i] + rows).map(|pos| (i, pos)));
            step_ids.extend_from_slice(&ids[written[i]..written[i] + rows]);
            written[i] += rows;
            ends.push(written[i]);
        }
        if members.is_empty() {
            break;
        }
        let view = store.prepare_step(backend, &members)?;
        let memory = &mut store.memory;
        backend.run_step(&mut || {
            model.forward(backend, memory, &view, &step_ids, &mut act, LogitRows::All)
        })?;
        for (&(seq, rows), &end) in members.iter().zip(&ends) {
            store.pool.commit(seq, &ids[end - rows..end])?;
        }
        logits.push(backend.read_rows(&act.logits, 0, step_ids.len())?);
        patterns.push(pattern);
    }
    Ok((patterns, logits))
}

/// The three tiny references with int8 and fp8 e4m3 caches on the device (the append quantizes,
/// attention dequantizes), teacher-forced, in chunks of 7 and in contiguous runs (these as
/// programmatic dependent launches), graphs on: every logit of the prompt and of every step
/// within [`TOLERANCE`] (the device's bf16) plus [`kv_dtype_tolerance`] (the cache's type) of
/// transformers' float32 ones.
fn quantized_caches_follow_the_reference(ctx: &Context) -> Result<String> {
    let mut notes = Vec::new();
    for name in MODELS {
        let dir = ctx.fixtures.join(name);
        let reference = RefGeneration::load(&dir)?;
        let (_, prompt_logits) = read_f32_array(&dir.join("ref_prompt_logits.npy"))?;
        let (_, step_logits) = read_f32_array(&dir.join("ref_step_logits.npy"))?;
        let mut engine = engine(ctx, name, CudaOptions::default())?;
        let vocab = engine.model.config.vocab_size;
        for dtype in [KvDtype::Int8, KvDtype::Fp8E4m3] {
            engine.set_kv_options(KvOptions {
                dtype: Some(dtype),
                ..KvOptions::default()
            })?;
            let bound = TOLERANCE + kv_dtype_tolerance(dtype);
            let mut worst = 0.0f32;
            for (strategy, chunk_tokens) in [(Strategy::Dynamic, 7), (Strategy::Static, 256)] {
                engine
                    .backend
                    .set_programmatic_launch(strategy == Strategy::Static);
                let what = format!("{name} {dtype} {strategy} chunk {chunk_tokens}");
                let gen = generate(&mut engine, &reference, strategy, chunk_tokens, true)?;
                ensure!(
                    gen.step_logits.len() * vocab == step_logits.len(),
                    "{what}: {} steps, the reference has {}",
                    gen.step_logits.len(),
                    step_logits.len() / vocab
                );
                let prompt = max_abs_diff(&gen.prompt_logits, &prompt_logits)?;
                ensure!(
                    prompt <= bound,
                    "{what}: prompt logits differ from transformers' by {prompt} (bound {bound})"
                );
                worst = worst.max(prompt);
                for (step, got) in gen.step_logits.iter().enumerate() {
                    let diff = max_abs_diff(got, &step_logits[step * vocab..(step + 1) * vocab])?;
                    ensure!(
                        diff <= bound,
                        "{what}: step {step}'s logits differ from transformers' by {diff} (bound \
                         {bound})"
                    );
                    worst = worst.max(diff);
                }
            }
            notes.push(format!("{name} {dtype}: within {worst:.4}"));
        }
    }
    Ok(notes.join("; "))
}
