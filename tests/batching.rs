//! Continuous batching on the CPU against solo runs, on the three tiny references: every
//! request's tokens in a batch equal its solo run (ids equal, the logits that chose each token
//! within 1e-4), under random arrival orders, chunked-prefill boundaries (random
//! `max_batch_tokens`), preemptions (a pool too small for every request at once), both modes,
//! prefix reuse on and off, and conversations whose next turn continues the last one.

mod common;

use common::{fixture, MODELS};
use kvlab::backend::cpu::CpuBackend;
use kvlab::generate::{Engine, GenerateOptions, Generator, KvOptions};
use kvlab::kv::Strategy;
use kvlab::model::forward::Model;
use kvlab::serve::scheduler::{Mode, Request, Scheduler, SchedulerOptions, StepReport};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;

const TOLERANCE: f32 = 1e-4;
const SEEDS: u64 = 12;
const CHUNK_TOKENS: usize = 8;

fn engine(name: &str) -> Engine<CpuBackend> {
    let backend = CpuBackend::new();
    let model = Model::load(&backend, &fixture(name)).unwrap();
    Engine::new(backend, model)
}

/// A request and what its solo run generated.
struct Case {
    request: Request,
    /// The next turn of its conversation, submitted when it finishes.
    follow_up: Option<usize>,
    ids: Vec<u32>,
    logits: Vec<Vec<f32>>,
}

/// Random requests (4..8 conversations, prompts of 1..40 ids, 1..12 new tokens), a third followed by a
/// second turn that continues them (their prompt, their answer, a few more ids), each run solo.
fn cases(solo: &mut Engine<CpuBackend>, rng: &mut StdRng) -> Vec<Case> {
    let vocab = solo.config().vocab_size as u32;
    let mut cases: Vec<Case> = Vec::new();
    for conversation in 0..rng.random_range(4..9u64) {
        let mut prompt: Vec<u32> = (0..rng.random_range(1..40))
            .map(|_| rng.random_range(0..vocab))
            .collect();
        let turns = if rng.random_bool(1.0 / 3.0) { 2 } else { 1 };
        for turn in 0..turns {
            let max_new_tokens = rng.random_range(1..12);
            let gen = solo
                .generate(
                    &prompt,
                    &GenerateOptions {
                        max_new_tokens,
                        strategy: Strategy::Dynamic,
                        chunk_tokens: CHUNK_TOKENS,
                        ignore_eos: true,
                        keep_step_logits: true,
                        ..GenerateOptions::default()
                    },
                    &mut |_| {},
                )
                .unwrap();
            if turn > 0 {
                let last = cases.len() - 1;
                cases[last].follow_up = Some(cases.len());
            }
            cases.push(Case {
                request: Request {
                    id: cases.len() as u64,
                    conversation,
                    prompt: prompt.clone(),
                    max_new_tokens,
                },
                follow_up: None,
                ids: gen.new_ids.clone(),
                logits: gen.step_logits,
            });
            prompt.extend(&gen.new_ids);
            prompt.extend((0..rng.random_range(1..6)).map(|_| rng.random_range(0..vocab)));
        }
    }
    cases
}

/// What the batched runs of one model did, to check that the test covered what it claims.
#[derive(Default)]
struct Coverage {
    preemptions: usize,
    split_prefills: usize,
    multi_sequence_steps: usize,
    reused_tokens: usize,
}

/// Runs `cases` through the scheduler: first turns submitted in a random order at random
/// steps, second turns when their first one finishes; checks each request against its solo
/// run.
fn run_batched(
    batched: &mut Engine<CpuBackend>,
    cases: &[Case],
    rng: &mut StdRng,
    what: &str,
    coverage: &mut Coverage,
) {
    let mode = if rng.random_bool(0.5) {
        Mode::Paged
    } else {
        Mode::Static
    };
    let prefix_reuse = rng.random_bool(0.5);
    let max_batch_tokens = rng.random_range(1..32);
    let cfg = batched.config().clone();
    let bytes_per_position = (cfg.num_layers * 2 * cfg.kv_dim() * 4) as u64;
    let longest = cases
        .iter()
        .map(|c| c.request.prompt.len() + c.request.max_new_tokens)
        .max()
        .unwrap();
    // Room for the longest request and a little more (paged: two chunks; static: about one
    // more request): sequences wait, and the paged mode preempts.
    let positions = match mode {
        Mode::Paged => longest.next_multiple_of(CHUNK_TOKENS) + 2 * CHUNK_TOKENS,
        Mode::Static => 2 * longest,
    };
    let what = format!(
        "{what}, {mode} mode, prefix reuse {prefix_reuse}, max batch tokens {max_batch_tokens}, \
         {positions} positions of KV"
    );
    batched
        .set_kv_options(KvOptions {
            dtype: None,
            budget_bytes: Some(positions as u64 * bytes_per_position),
            ..Default::default()
        })
        .unwrap();
    batched
        .open_kv_pool(mode.strategy(prefix_reuse), CHUNK_TOKENS)
        .unwrap();
    let mut scheduler = Scheduler::new(SchedulerOptions {
        mode,
        prefix_reuse,
        max_batch_tokens,
        max_context: None,
        model_positions: cfg.max_position_embeddings,
        stop_ids: Vec::new(),
        keep_logits: true,
    })
    .unwrap();

    let is_follow_up: Vec<bool> = (0..cases.len())
        .map(|i| cases.iter().any(|c| c.follow_up == Some(i)))
        .collect();
    let mut arrivals: Vec<usize> = (0..cases.len()).filter(|&i| !is_follow_up[i]).collect();
    arrivals.shuffle(rng);
    let mut generated: HashMap<u64, (Vec<u32>, Vec<Vec<f32>>)> = HashMap::new();
    let mut finished = 0;
    let mut steps = 0;
    while finished < cases.len() {
        // Each step, the next arrival comes with probability 1/2 (always when idle).
        if !arrivals.is_empty() && (scheduler.is_idle() || rng.random_bool(0.5)) {
            let next = arrivals.remove(0);
            let pool = batched.kv_pool_mut().unwrap();
            scheduler.submit(pool, cases[next].request.clone()).unwrap();
        }
        let report: StepReport = scheduler
            .step(batched)
            .unwrap_or_else(|e| panic!("{what}: {e:#}"));
        steps += 1;
        assert!(steps < 10_000, "{what}: no end in sight");
        coverage.preemptions += report.preempted.len();
        coverage.multi_sequence_steps += usize::from(report.sequences > 1);
        for admission in &report.admitted {
            let case = &cases[admission.request as usize];
            let prompt = case.request.prompt.len();
            coverage.reused_tokens += admission.reuse.reused_tokens;
            if prompt - admission.reuse.reused_tokens > max_batch_tokens {
                coverage.split_prefills += 1;
            }
        }
        for token in report.tokens {
            let entry = generated.entry(token.request).or_default();
            entry.0.push(token.id);
            entry.1.push(token.logits.expect("keep_logits"));
        }
        for done in report.finished {
            finished += 1;
            let case = &cases[done.request as usize];
            let (ids, logits) = &generated[&done.request];
            assert_eq!(ids, &done.new_ids, "{what}: request {}", done.request);
            assert_eq!(
                ids, &case.ids,
                "{what}: request {} generated other ids than its solo run",
                done.request
            );
            for (step, (got, solo)) in logits.iter().zip(&case.logits).enumerate() {
                let diff = common::max_abs_diff(got, solo);
                assert!(
                    diff <= TOLERANCE,
                    "{what}: request {} token {step}: logits differ from the solo run by {diff}",
                    done.request
                );
            }
            let pool = batched.kv_pool_mut().unwrap();
            match case.follow_up {
                Some(next) => scheduler.submit(pool, cases[next].request.clone()).unwrap(),
                None => scheduler
                    .end_conversation(pool, case.request.conversation)
                    .unwrap(),
            }
        }
    }
    let pool = batched.kv_pool_mut().unwrap();
    assert_eq!(scheduler.kept(), 0, "{what}");
    assert_eq!(
        pool.stats().reserved_bytes,
        0,
        "{what}: sequences left behind"
    );
}

#[test]
fn every_request_in_a_batch_equals_its_solo_run() {
    for name in MODELS {
        let (mut solo, mut batched) = (engine(name), engine(name));
        let mut coverage = Coverage::default();
        for seed in 0..SEEDS {
            let mut rng = StdRng::seed_from_u64(seed);
            let cases = cases(&mut solo, &mut rng);
            let what = format!("{name} seed {seed}");
            run_batched(&mut batched, &cases, &mut rng, &what, &mut coverage);
        }
        eprintln!(
            "{name}: {} preemptions, {} prompts prefilled over several steps, {} steps of several \
             sequences, {} tokens reused",
            coverage.preemptions,
            coverage.split_prefills,
            coverage.multi_sequence_steps,
            coverage.reused_tokens
        );
        // The seeds exercised what the test is about.
        assert!(
            coverage.preemptions > 0
                && coverage.split_prefills > 0
                && coverage.multi_sequence_steps > 0
                && coverage.reused_tokens > 0,
            "{name}: {} preemptions, {} prompts prefilled over several steps, {} steps of \
             several sequences, {} tokens reused",
            coverage.preemptions,
            coverage.split_prefills,
            coverage.multi_sequence_steps,
            coverage.reused_tokens
        );
    }
}
