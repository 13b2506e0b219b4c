//! The scheduler's decisions over a pool alone: each step is planned, its rows committed as a
//! forward pass would, and every sequence handed the same made-up next id.

use super::*;
use crate::kv::{KvDtype, KvLayout};

/// 2 layers x K,V x 1 head x 4 dims x 4 bytes = 64 bytes per position.
const BYTES_PER_POSITION: u64 = 64;
const NEXT_ID: u32 = 7;

fn pool(kind: LayoutKind, chunk_tokens: usize, chunks: usize, prefix: bool) -> ChunkPool {
    let layout = KvLayout::new(kind, KvDtype::F32, 2, 1, 4, chunk_tokens).unwrap();
    ChunkPool::new(layout, chunks, prefix).unwrap()
}

fn options(mode: Mode, max_batch_tokens: usize) -> SchedulerOptions {
    SchedulerOptions {
        mode,
        prefix_reuse: false,
        max_batch_tokens,
        max_context: None,
        model_positions: 1 << 16,
        stop_ids: Vec::new(),
        keep_logits: false,
    }
}

fn request(id: RequestId, prompt_len: usize, max_new_tokens: usize) -> Request {
    Request {
        id,
        conversation: id,
        prompt: (0..prompt_len as u32)
            .map(|t| t + 100 * id as u32)
            .collect(),
        max_new_tokens,
    }
}

/// One step: planned, committed as the forward pass commits, completed.
fn step(scheduler: &mut Scheduler, pool: &mut ChunkPool) -> StepReport {
    let plan = scheduler.schedule(pool).unwrap();
    for entry in &plan.entries {
        pool.commit(entry.seq, &entry.ids).unwrap();
    }
    let output = BatchOutput {
        next_ids: vec![NEXT_ID; plan.entries.len()],
        logits: Vec::new(),
    };
    scheduler.complete(pool, plan, output).unwrap()
}

/// Steps until idle; every finished request, in order.
fn run_all(scheduler: &mut Scheduler, pool: &mut ChunkPool) -> Vec<Finished> {
    let mut finished = Vec::new();
    for _ in 0..10_000 {
        if scheduler.is_idle() {
            return finished;
        }
        let report = step(scheduler, pool);
        assert!(report.rows() > 0, "a step with work to do ran no row");
        finished.extend(report.finished);
    }
    panic!("the scheduler did not finish in 10000 steps");
}

#[test]
fn static_mode_reserves_each_maximum_context_when_it_admits() {
    let mut pool = pool(LayoutKind::Contiguous, 1, 100, false);
    let mut s = Scheduler::new(options(Mode::Static, 1000)).unwrap();
    // 10 + 20 = 30 positions each: three runs fit 100 positions, the fourth waits.
    for id in 0..4 {
        s.submit(&pool, request(id, 10, 20)).unwrap();
    }
    let first = step(&mut s, &mut pool);
    assert_eq!(first.admitted.len(), 3);
    assert_eq!((s.running(), s.waiting()), (3, 1));
    let stats = pool.stats();
    assert_eq!(stats.reserved_bytes, 90 * BYTES_PER_POSITION);
    assert_eq!(stats.live_bytes, 30 * BYTES_PER_POSITION);
    let finished = run_all(&mut s, &mut pool);
    assert_eq!(finished.len(), 4);
    for f in &finished {
        assert_eq!(f.new_ids, vec![NEXT_ID; 20]);
        assert_eq!((f.preemptions, f.kv.reserved_bytes), (0, 30 * 64));
    }
    assert_eq!(pool.stats().reserved_bytes, 0);
}

#[test]
fn paged_mode_takes_chunks_on_demand_and_preempts_the_newest() {
    // Chunks of 4; 6 + 10 = 16 positions (4 chunks) each, 4 requests, 10 chunks.
    let mut pool = pool(LayoutKind::Chunked, 4, 10, false);
    let mut s = Scheduler::new(options(Mode::Paged, 1000)).unwrap();
    for id in 0..4 {
        s.submit(&pool, request(id, 6, 10)).unwrap();
    }
    // The prompts take 2 chunks each: all four are admitted at once, where static
    // reservation of 16 positions would admit two.
    assert_eq!(step(&mut s, &mut pool).admitted.len(), 4);
    let mut preempted = Vec::new();
    let mut finished = Vec::new();
    let mut readmitted = Vec::new();
    while !s.is_idle() {
        let report = step(&mut s, &mut pool);
        if !report.preempted.is_empty() {
            assert!(
                report.admitted.is_empty(),
                "no admission in a step that preempts"
            );
        }
        preempted.extend(report.preempted);
        finished.extend(report.finished);
        let again = report.admitted.iter().filter(|a| a.readmitted);
        readmitted.extend(again.map(|a| a.request));
    }
    // Every preempted request came back, oldest first: the newest is preempted first and each
    // goes back to the head of the queue.
    let mut order: Vec<RequestId> = preempted.iter().map(|p| p.request).collect();
    order.sort();
    assert_eq!(readmitted, order);
    // At position 8 each needs a third chunk: two are free, so the newest (3) is preempted
    // for the third request (2).
    let first = &preempted[0];
    assert_eq!(first.request, 3);
    assert_eq!(first.positions_freed, 8);
    assert!(
        first.reason.contains("request 2's next 1 row(s)")
            && first.reason.contains("request 3 was admitted last"),
        "{}",
        first.reason
    );
    assert_eq!(finished.len(), 4);
    for f in &finished {
        assert_eq!(f.new_ids.len(), 10, "request {}", f.request);
    }
    let three = finished.iter().find(|f| f.request == 3).unwrap();
    assert!(
        three.preemptions >= 1 && three.recomputed_tokens >= 8,
        "{three:?}"
    );
    assert_eq!(pool.stats().reserved_bytes, 0);
}

#[test]
fn a_long_prompt_is_prefilled_in_chunks_beside_decoding_requests() {
    let mut pool = pool(LayoutKind::Chunked, 4, 100, false);
    let mut s = Scheduler::new(options(Mode::Paged, 8)).unwrap();
    s.submit(&pool, request(0, 3, 6)).unwrap();
    s.submit(&pool, request(1, 20, 2)).unwrap();
    let rows: Vec<(usize, usize)> = (0..5)
        .map(|_| {
            let r = step(&mut s, &mut pool);
            (r.decode_rows, r.prefill_rows)
        })
        .collect();
    // Step 1: request 0's prompt (3) and 5 rows of request 1's; then request 0 decodes one
    // row per step first and request 1 takes the other 7, its prompt done in step 4 (5 + 7 +
    // 7 + 1 = 20), and both decode in step 5.
    assert_eq!(rows, [(0, 8), (1, 7), (1, 7), (1, 1), (2, 0)]);
}

#[test]
fn requests_that_can_never_run_are_refused_alone() {
    let mut pool = pool(LayoutKind::Chunked, 4, 10, false);
    let mut s = Scheduler::new(SchedulerOptions {
        max_context: Some(64),
        ..options(Mode::Paged, 1000)
    })
    .unwrap();
    let too_long = s.submit(&pool, request(0, 60, 10)).unwrap_err().to_string();
    assert!(
        too_long.contains("request 0: 60 prompt + 10 new tokens = 70 positions exceed the maximum context of 64 (--max-context)"),
        "{too_long}"
    );
    let too_big = s.submit(&pool, request(1, 30, 20)).unwrap_err().to_string();
    assert!(
        too_big.contains("request 1: its 50 positions need")
            && too_big.contains("(13 chunks of 4 positions)")
            && too_big.contains("more than the whole --kv-budget")
            && too_big.contains("(10 chunks)"),
        "{too_big}"
    );
    let empty = s.submit(&pool, request(2, 0, 4)).unwrap_err().to_string();
    assert!(empty.contains("request 2: the prompt is empty"), "{empty}");
    s.submit(&pool, request(3, 5, 5)).unwrap();
    let finished = run_all(&mut s, &mut pool);
    assert_eq!(finished.len(), 1);
    assert_eq!(finished[0].new_ids.len(), 5);

    // Static: the run of the whole maximum context must fit the pool.
    let pool = self::pool(LayoutKind::Contiguous, 1, 50, false);
    let mut s = Scheduler::new(SchedulerOptions {
        max_context: Some(64),
        ..options(Mode::Static, 1000)
    })
    .unwrap();
    let err = s.submit(&pool, request(4, 5, 5)).unwrap_err().to_string();
    assert!(err.contains("(64 chunks of 1 positions)"), "{err}");
}

#[test]
fn a_conversation_keeps_its_sequence_until_memory_is_needed() {
    let mut pool = pool(LayoutKind::Chunked, 4, 8, true);
    let mut s = Scheduler::new(SchedulerOptions {
        prefix_reuse: true,
        ..options(Mode::Paged, 1000)
    })
    .unwrap();
    s.submit(&pool, request(0, 9, 3)).unwrap();
    let first = run_all(&mut s, &mut pool).remove(0);
    assert_eq!(s.kept(), 1);
    // The next turn: the history (prompt, answer) and a new message. The kept sequence holds
    // 11 positions (the last answer token was never run): all are reused.
    let mut prompt = request(0, 9, 3).prompt;
    prompt.extend(&first.new_ids);
    prompt.extend([900, 901]);
    s.submit(
        &pool,
        Request {
            id: 1,
            conversation: 0,
            prompt,
            max_new_tokens: 2,
        },
    )
    .unwrap();
    let report = step(&mut s, &mut pool);
    assert_eq!(report.admitted[0].reuse.reused_tokens, 11);
    assert_eq!(report.prefill_rows, 3);
    run_all(&mut s, &mut pool);
    // Another conversation needs 7 of the 8 chunks: the kept sequence (4) is let go (its full
    // chunks stay cached, then are evicted), nothing is preempted.
    s.submit(&pool, request(2, 20, 7)).unwrap();
    let mut preemptions = 0;
    while !s.is_idle() {
        preemptions += step(&mut s, &mut pool).preempted.len();
    }
    assert_eq!((preemptions, s.kept()), (0, 1));
    s.end_conversation(&mut pool, 2).unwrap();
    assert_eq!((s.kept(), pool.stats().reserved_bytes), (0, 0));
}
