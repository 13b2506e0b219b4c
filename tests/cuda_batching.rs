//! The scheduler on the CUDA backend (the emulator: the kernels and launches a GPU runs):
//! ragged steps of several sequences (prefill chunks beside decode rows, each sequence's last
//! row moved to the step's end for its logits) give every request the tokens of its solo run on
//! the same backend (ids equal, logits within the bf16 tolerance of the CUDA reference checks),
//! in both layouts; and decode steps of the same sequences replay one CUDA graph.

mod common;

use kvlab::backend::cuda::CudaOptions;
use kvlab::generate::{GenerateOptions, Generator};
use kvlab::selftest::fixtures::{RefGeneration, MODELS};
use kvlab::selftest::reference::{engine, TOLERANCE};
use kvlab::selftest::Context;
use kvlab::serve::scheduler::{Mode, Request, Scheduler, SchedulerOptions};
use std::collections::HashMap;

const CHUNK_TOKENS: usize = 16;

#[test]
fn ragged_batches_on_the_cuda_backend_match_solo_runs() {
    let ctx = Context::emulator(None);
    let prompt = RefGeneration::load(&ctx.fixtures.join(MODELS[0]))
        .unwrap()
        .prompt_ids;
    let mut solo = engine(&ctx, MODELS[0], CudaOptions::default()).unwrap();
    // Four requests of 1 to 45 prompt ids and 2 to 6 new tokens, the last two sent a few
    // steps later: steps mix prefill chunks (at most 24 rows) and decode rows.
    let shapes = [(45, 6), (1, 5), (31, 2), (20, 6)];
    let requests: Vec<Request> = shapes
        .iter()
        .enumerate()
        .map(|(i, &(len, new))| Request {
            id: i as u64,
            conversation: i as u64,
            prompt: prompt[..len].to_vec(),
            max_new_tokens: new,
        })
        .collect();
    let solo_runs: Vec<_> = requests
        .iter()
        .map(|r| {
            solo.generate(
                &r.prompt,
                &GenerateOptions {
                    max_new_tokens: r.max_new_tokens,
                    strategy: kvlab::kv::Strategy::Dynamic,
                    chunk_tokens: CHUNK_TOKENS,
                    ignore_eos: true,
                    keep_step_logits: true,
                    ..GenerateOptions::default()
                },
                &mut |_| {},
            )
            .unwrap()
        })
        .collect();
    for mode in [Mode::Paged, Mode::Static] {
        let mut batched = engine(&ctx, MODELS[0], CudaOptions::default()).unwrap();
        batched
            .open_kv_pool(mode.strategy(false), CHUNK_TOKENS)
            .unwrap();
        let mut scheduler = Scheduler::new(SchedulerOptions {
            mode,
            prefix_reuse: false,
            max_batch_tokens: 24,
            max_context: None,
            model_positions: batched.config().max_position_embeddings,
            stop_ids: Vec::new(),
            keep_logits: true,
        })
        .unwrap();
        let mut logits: HashMap<u64, Vec<Vec<f32>>> = HashMap::new();
        let mut finished = Vec::new();
        let (mut steps, mut mixed, mut most) = (0, 0, 0);
        while finished.len() < requests.len() {
            // Two requests at once, the others at steps 3 and 4.
            for request in requests
                .iter()
                .filter(|r| [0, 0, 3, 4][r.id as usize] == steps)
            {
                scheduler
                    .submit(batched.kv_pool_mut().unwrap(), request.clone())
                    .unwrap();
            }
            let report = scheduler.step(&mut batched).unwrap();
            steps += 1;
            most = most.max(report.sequences);
            mixed += usize::from(report.decode_rows > 0 && report.prefill_rows > 0);
            for token in report.tokens {
                logits
                    .entry(token.request)
                    .or_default()
                    .push(token.logits.unwrap());
            }
            finished.extend(report.finished);
        }
        assert!(
            mixed > 0 && most >= 3,
            "{mode}: {mixed} mixed steps, at most {most} sequences"
        );
        for done in finished {
            let reference = &solo_runs[done.request as usize];
            let what = format!("{mode}: request {}", done.request);
            assert_eq!(done.new_ids, reference.new_ids, "{what}");
            for (got, want) in logits[&done.request].iter().zip(&reference.step_logits) {
                let diff = common::max_abs_diff(got, want);
                assert!(diff <= TOLERANCE, "{what}: logits differ by {diff}");
            }
        }
        // Runs of decode steps over the same sequences replay one graph (the first step of a
        // run launches, the second is captured, the rest replay).
        assert!(
            batched.backend.graph_stats().graphs_replayed > 0,
            "{mode}: {:?}",
            batched.backend.graph_stats()
        );
    }
}
