//! The scheduler on the CUDA backend (the emulator: the kernels and launches a GPU runs). Its
//! interim KV kernels take one sequence per step (`Backend::max_step_sequences`), so the
//! scheduler runs its requests one step each: their tokens equal their solo runs on the same
//! backend (ids equal, logits within the bf16 tolerance the CUDA reference checks use), and a
//! step of two sequences is refused with an error that says so.

mod common;

use kvlab::backend::cuda::CudaOptions;
use kvlab::generate::{BatchEntry, GenerateOptions, Generator};
use kvlab::kv::Strategy;
use kvlab::selftest::fixtures::{RefGeneration, MODELS};
use kvlab::selftest::reference::{engine, TOLERANCE};
use kvlab::selftest::Context;
use kvlab::serve::scheduler::{Mode, Request, Scheduler, SchedulerOptions};
use std::collections::HashMap;

const CHUNK_TOKENS: usize = 16;

#[test]
fn the_scheduler_runs_one_sequence_per_step_and_matches_solo_runs() {
    let ctx = Context::emulator(None);
    let prompt = RefGeneration::load(&ctx.fixtures.join(MODELS[0]))
        .unwrap()
        .prompt_ids;
    let mut solo = engine(&ctx, MODELS[0], CudaOptions::default()).unwrap();
    let mut batched = engine(&ctx, MODELS[0], CudaOptions::default()).unwrap();
    assert_eq!(batched.max_step_sequences(), Some(1));
    // Three requests: the prompt's first 20, 31 and 45 ids, 3 to 5 new tokens.
    let requests: Vec<Request> = [(20, 5), (31, 3), (45, 4)]
        .iter()
        .enumerate()
        .map(|(i, &(len, new))| Request {
            id: i as u64,
            conversation: i as u64,
            prompt: prompt[..len].to_vec(),
            max_new_tokens: new,
        })
        .collect();
    batched
        .open_kv_pool(Strategy::Dynamic, CHUNK_TOKENS)
        .unwrap();
    let mut scheduler = Scheduler::new(SchedulerOptions {
        mode: Mode::Paged,
        prefix_reuse: false,
        max_batch_tokens: 64,
        max_context: None,
        model_positions: batched.config().max_position_embeddings,
        max_step_sequences: batched.max_step_sequences(),
        stop_ids: Vec::new(),
        keep_logits: true,
    })
    .unwrap();
    for request in &requests {
        scheduler
            .submit(batched.kv_pool_mut().unwrap(), request.clone())
            .unwrap();
    }
    let mut logits: HashMap<u64, Vec<Vec<f32>>> = HashMap::new();
    let mut finished = Vec::new();
    while !scheduler.is_idle() {
        let report = scheduler.step(&mut batched).unwrap();
        assert_eq!(report.sequences, 1);
        for token in report.tokens {
            logits
                .entry(token.request)
                .or_default()
                .push(token.logits.unwrap());
        }
        finished.extend(report.finished);
    }
    assert_eq!(finished.len(), requests.len());
    for done in finished {
        let request = &requests[done.request as usize];
        let reference = solo
            .generate(
                &request.prompt,
                &GenerateOptions {
                    max_new_tokens: request.max_new_tokens,
                    strategy: Strategy::Dynamic,
                    chunk_tokens: CHUNK_TOKENS,
                    ignore_eos: true,
                    keep_step_logits: true,
                    ..GenerateOptions::default()
                },
                &mut |_| {},
            )
            .unwrap();
        assert_eq!(done.new_ids, reference.new_ids, "request {}", done.request);
        for (got, want) in logits[&done.request].iter().zip(&reference.step_logits) {
            let diff = common::max_abs_diff(got, want);
            assert!(diff <= TOLERANCE, "request {}: {diff}", done.request);
        }
    }
}

#[test]
fn a_step_of_two_sequences_is_refused_with_a_clear_error() {
    let ctx = Context::emulator(None);
    let mut batched = engine(&ctx, MODELS[0], CudaOptions::default()).unwrap();
    let pool = batched
        .open_kv_pool(Strategy::Dynamic, CHUNK_TOKENS)
        .unwrap();
    let (a, b) = (
        pool.new_sequence(None).unwrap(),
        pool.new_sequence(None).unwrap(),
    );
    let mut copies = pool.reserve(a, 2).unwrap();
    copies.extend(pool.reserve(b, 2).unwrap());
    let entries = [
        BatchEntry {
            seq: a,
            ids: &[1, 2],
        },
        BatchEntry {
            seq: b,
            ids: &[3, 4],
        },
    ];
    let err = batched
        .forward_batch(&copies, &entries, false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("the emu backend runs at most 1 sequence(s) per step, not 2"),
        "{err}"
    );
}
