//! Prefix reuse on the CPU against re-prefilling, on the three tiny references: a conversation
//! continued in its kept sequence (`dynamic+reuse` with chunks of 1, 7, 16 and 256, and
//! `static+reuse`) gives the logits of a fresh cache within 1e-4 and the same ids, turn after
//! turn, with the common prefix ending inside a chunk and after a tail the template re-rendered
//! (kvlab::selftest::reuse says how the turns are built); a second conversation shares the
//! first one's chunks.

mod common;

use common::{fixture, reference, MODELS};
use kvlab::backend::cpu::CpuBackend;
use kvlab::generate::Engine;
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
