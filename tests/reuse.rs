//! Prefix reuse on the CPU against re-prefilling, on the three tiny references: a conversation
//! continued in its kept sequence (`dynamic+reuse` with chunks of 1, 7, 16 and 256, and
//! `static+reuse`) gives the logits of a fresh cache within 1e-4 and the same ids, turn after
//! turn, with the common prefix ending inside a chunk and after a tail the template re-rendered
//! (kvlab::selftest::reuse says how the turns are built); a second conversation shares the
//! first one's chunks.

mod common;

use common::{fixture, reference, MODELS};
use kvlab::backend::cpu::CpuBackend;
use kvlab::generate::{Engine, GenerateOptions, Generator, KvOptions};
use kvlab::kv::Strategy;
use kvlab::model::forward::Model;
use kvlab::selftest::reuse::conversation;

const TOLERANCE: f32 = 1e-4;

fn engine(name: &str) -> Engine<CpuBackend> {
    let backend = CpuBackend::new();
    let model = Model::load(&backend, &fixture(name)).unwrap();
    Engine::new(backend, model)
}

#[test]
fn reuse_gives_the_logits_of_re_prefilling_turn_after_turn() {
    for name in MODELS {
        let prompt = reference(name).prompt_ids;
        let (mut reuse, mut fresh) = (engine(name), engine(name));
        for chunk in [1, 7, 16, 256] {
            let report = conversation(
                &mut reuse,
                &mut fresh,
                &prompt,
                Strategy::DynamicReuse,
                chunk,
                TOLERANCE,
            )
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
            // Turn 3's common prefix ends 2 tokens into the second answer: inside a chunk for
            // every chunk size but 1 (the copy-on-write or in-place rewrite of a partly
            // filled chunk is exercised).
            let held = report.turns[2].reused_tokens;
            assert!(
                chunk == 1 || held % chunk != 0,
                "{name} chunk {chunk}: {held}"
            );
        }
        conversation(
            &mut reuse,
            &mut fresh,
            &prompt,
            Strategy::StaticReuse,
            1,
            TOLERANCE,
        )
        .unwrap_or_else(|e| panic!("{name}: {e:#}"));
    }
}

fn opts(strategy: Strategy, chunk_tokens: usize, max_new_tokens: usize) -> GenerateOptions {
    GenerateOptions {
        strategy,
        chunk_tokens,
        max_new_tokens,
        ignore_eos: true,
        ..GenerateOptions::default()
    }
}

/// KV bytes per position of tiny-llama3-gqa4-bf16 in f32: 3 layers x K,V x 2 KV heads x 16 x 4.
const BYTES_PER_POSITION: u64 = 3 * 2 * 2 * 16 * 4;

#[test]
fn a_budget_or_capacity_too_small_is_an_error_that_names_both() {
    let name = MODELS[0];
    let prompt = reference(name).prompt_ids;
    let mut e = engine(name);
    // Not even one chunk of 16 positions.
    e.set_kv_options(KvOptions {
        budget_bytes: Some(100),
        ..KvOptions::default()
    })
    .unwrap();
    let err = e
        .generate(&prompt, &opts(Strategy::Dynamic, 16, 4), &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("--kv-budget 100 bytes holds no chunk"),
        "{err}"
    );
    // Four chunks of 16 hold the 45-token prompt, not 30 more tokens: the error comes mid-way.
    e.set_kv_options(KvOptions {
        budget_bytes: Some(4 * 16 * BYTES_PER_POSITION),
        ..KvOptions::default()
    })
    .unwrap();
    let mut generated = 0;
    let err = e
        .generate(&prompt, &opts(Strategy::Dynamic, 16, 30), &mut |_| {
            generated += 1
        })
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("the KV pool is exhausted") && err.contains("raise --kv-budget"),
        "{err}"
    );
    assert_eq!(
        generated,
        4 * 16 - prompt.len() + 1,
        "tokens before the pool ran dry"
    );
    // The failed call let go of its chunks: the next one fits.
    e.generate(&prompt, &opts(Strategy::Dynamic, 16, 8), &mut |_| {})
        .unwrap();
    // A static capacity below the prompt.
    let err = e
        .generate(
            &prompt,
            &GenerateOptions {
                max_context: Some(10),
                ..opts(Strategy::Static, 16, 4)
            },
            &mut |_| {},
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("context overflow") && err.contains("holds 10"),
        "{err}"
    );
}

#[test]
fn a_full_pool_evicts_idle_cached_chunks_before_it_fails() {
    let name = MODELS[0];
    let prompt = reference(name).prompt_ids;
    let mut e = engine(name);
    e.set_kv_options(KvOptions {
        budget_bytes: Some(4 * 16 * BYTES_PER_POSITION),
        ..KvOptions::default()
    })
    .unwrap();
    let reuse = opts(Strategy::DynamicReuse, 16, 3);
    // The first call (45 + 2 positions) leaves its two full chunks cached when it ends.
    e.generate(&prompt, &reuse, &mut |_| {}).unwrap();
    assert_eq!(
        e.kv_pool_stats().unwrap().cached_idle_bytes,
        2 * 16 * BYTES_PER_POSITION
    );
    // Another prompt needs all four chunks (45 + 19 positions): the cached ones are evicted,
    // not an error.
    let other: Vec<u32> = prompt.iter().rev().copied().collect();
    let gen = e
        .generate(&other, &opts(Strategy::DynamicReuse, 16, 20), &mut |_| {})
        .unwrap();
    assert_eq!(gen.reuse.unwrap().reused_tokens, 0);
    assert_eq!(e.kv_pool_stats().unwrap().evictions, 2);
    // The first prompt again: its chunks were evicted, and the call says so.
    let again = e.generate(&prompt, &reuse, &mut |_| {}).unwrap();
    let stats = again.reuse.unwrap();
    assert_eq!(
        (stats.reused_tokens, stats.missed_evicted),
        (0, 32),
        "{stats:?}"
    );
}
