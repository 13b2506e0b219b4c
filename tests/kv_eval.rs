//! `kvlab kv-eval` end to end on SmolLM2 (installed by scripts/fetch-models.sh; skipped with a
//! reason when absent, required under `CI=true`): one short run's files read back, a complete
//! run not marked interrupted, the f32 cache against itself exactly zero, and an eviction
//! policy that really evicts.

mod common;

use common::cli::{check_png, kvlab, Csv};
use common::smollm2_file;
use serde_json::Value;

#[test]
fn a_short_run_writes_every_turn_and_a_complete_summary() {
    let Some(model) = smollm2_file() else { return };
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("run");
    let run = kvlab(&[
        "kv-eval",
        "--model",
        model.to_str().unwrap(),
        "--scenarios",
        "insurance_claim_auto",
        "--turns",
        "2",
        "--max-new-tokens",
        "4",
        "--config",
        "f32/full",
        "--config",
        "int8/full",
        "--config",
        "f32/window:16",
        "--out",
        dir.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");

    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap();
    // 3 configurations x 2 modes x 2 turns.
    assert_eq!(summary["planned_turns"], 12);
    assert_eq!(summary["measured_turns"], 12);
    assert_eq!(summary["interrupted"], false, "a complete run");
    let report = std::fs::read_to_string(dir.join("report.md")).unwrap();
    assert!(!report.contains("INTERRUPTED"), "{report}");

    let turns = Csv::read(&dir.join("turns.csv"));
    assert_eq!(turns.rows.len(), 12);
    for row in 0..turns.rows.len() {
        let config = turns.get(row, "config");
        let kld = turns.num(row, "mean_kl_divergence");
        assert!(kld.is_finite() && kld >= 0.0, "row {row}: KLD {kld}");
        match config {
            "f32/full" => {
                assert_eq!(kld, 0.0, "row {row}: the f32 cache against itself");
                assert_eq!(turns.num(row, "top1_agreement"), 1.0);
            }
            // A quarter of f32's bytes plus scales: close, not equal.
            "int8/full" => assert!(kld > 0.0 && kld < 1e-2, "row {row}: int8 KLD {kld}"),
            "f32/window:16" => {
                // Positions written minus those evicted: the window, and only it, is held.
                let held = turns.num(row, "kv_tokens") - turns.num(row, "evicted_tokens");
                assert_eq!(held, 16.0, "row {row}: {held} positions held");
                // SmolLM2 in f32: 30 layers x K, V x 3 KV heads x 64 x 4 bytes a position.
                assert_eq!(
                    turns.num(row, "kv_live_bytes"),
                    16.0 * 46_080.0,
                    "row {row}"
                );
            }
            other => panic!("row {row}: unexpected configuration {other}"),
        }
    }
    check_png(&dir.join("quality_vs_bytes.png"));
}

#[test]
fn a_backend_without_the_f32_reference_is_refused_before_anything_runs() {
    let Some(model) = smollm2_file() else { return };
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("run");
    let run = kvlab(&[
        "kv-eval",
        "--model",
        model.to_str().unwrap(),
        "--backend",
        "emu",
        "--config",
        "int8/full",
        "--out",
        dir.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "{stderr}");
    assert!(
        stderr.contains("f32 full cache")
            && stderr.contains("--kv-dtype f32")
            && stderr.contains("--backend cpu"),
        "{stderr}"
    );
    assert!(!dir.exists(), "nothing written");
}
