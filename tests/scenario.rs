//! `kvlab scenario` and `kvlab cache-map` end to end on the tiny synthetic model (the real
//! tokenizer, 2 layers): the study's turn-1 prompt length, the files of a run read back, the
//! strategies' agreement, the match with `kvlab generate`, and errors of a bad scenario file.

mod common;

use common::cli::{check_png, check_svg, kvlab, tiny_model, Csv};
use kvlab::model::tokenizer::{ChatOptions, Message, Tokenizer};
use kvlab::scenario::protocol::message;
use kvlab::scenario::report::TURN_COLUMNS;
use kvlab::scenario::scenarios::study_scenario;
use serde_json::Value;
use std::path::Path;

fn first_turn(scenario: &str) -> Vec<Message> {
    let s = study_scenario(scenario).unwrap();
    vec![
        message("system", &s.system_prompt),
        message("user", &s.turns[0]),
    ]
}

const PROMPT_OPTIONS: ChatOptions = ChatOptions {
    add_generation_prompt: true,
    date_string: None,
};

#[test]
fn turn_one_of_insurance_claim_auto_is_152_tokens_as_in_the_study() {
    let tokenizer = Tokenizer::load(&tiny_model())
        .unwrap()
        .expect("tokenizer.json");
    assert!(!tokenizer.has_chat_template(), "the base model has none");
    let ids = tokenizer
        .encode_messages(&first_turn("insurance_claim_auto"), &PROMPT_OPTIONS)
        .unwrap();
    assert_eq!(ids.len(), 152);

    // The same with the real Llama 3.2 tokenizer, when ../shared is there.
    let real = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/models/llama-3.2-1b");
    if !real.is_dir() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{} is missing under CI",
            real.display()
        );
        eprintln!("skipping the real tokenizer: {} is absent", real.display());
        return;
    }
    let real = Tokenizer::load(&real).unwrap().unwrap();
    let real_ids = real
        .encode_messages(&first_turn("insurance_claim_auto"), &PROMPT_OPTIONS)
        .unwrap();
    assert_eq!(real_ids, ids);
}

#[test]
fn a_run_writes_turns_summary_report_and_plots_that_read_back() {
    let model = tiny_model();
    let out = tempfile::tempdir().unwrap();
    let results = out.path().join("run");
    let new_tokens = 6;
    let run = kvlab(&[
        "scenario",
        "--model",
        model.to_str().unwrap(),
        "--backend",
        "cpu",
        "--scenarios",
        "insurance_claim_auto",
        "--turns",
        "2",
        "--max-new-tokens",
        "6",
        "--out",
        results.to_str().unwrap(),
    ]);
    assert!(run.status.success());
    let stdout = String::from_utf8_lossy(&run.stdout);
    let first_line = stdout.lines().next().unwrap();
    assert!(
        first_line.contains("SYNTHETIC")
            && first_line.contains("backend cpu")
            && first_line.contains("dtype"),
        "{first_line}"
    );
    assert!(
        stdout.contains("restricted to ordinary-text ids"),
        "{stdout}"
    );
    assert!(stdout.contains("Table 1"), "{stdout}");

    // turns.csv: one row per strategy x turn, in the documented columns.
    let csv = Csv::read(&results.join("turns.csv"));
    let names: Vec<&str> = TURN_COLUMNS.iter().map(|c| c.name).collect();
    assert_eq!(csv.header, names);
    assert_eq!(csv.rows.len(), 3 * 2);
    assert!(csv.rows.iter().all(|r| r.len() == names.len()));
    // Tiny model: 2 layers x K,V x 2 KV heads x head_dim 16 x 4 bytes (f32).
    let bytes_per_position = 2.0 * 2.0 * 2.0 * 16.0 * 4.0;
    for row in 0..csv.rows.len() {
        let strategy = csv.get(row, "strategy").to_string();
        let turn = csv.num(row, "turn") as usize;
        assert_eq!(csv.get(row, "scenario"), "insurance_claim_auto");
        assert_eq!(
            csv.get(row, "success"),
            "true",
            "row {row}: {}",
            csv.get(row, "error")
        );
        assert_eq!(
            csv.get(row, "agrees_with_first_strategy"),
            "true",
            "{strategy} turn {turn}"
        );
        assert_eq!(csv.num(row, "output_tokens") as usize, new_tokens);
        // Ordinary-text ids re-encode to themselves: the answer adds what it generated.
        assert_eq!(csv.num(row, "answer_reencoded_tokens") as usize, new_tokens);
        let input = csv.num(row, "input_tokens");
        if turn == 1 {
            assert_eq!(input, 152.0);
        }
        assert!(csv.num(row, "total_seconds") > 0.0);
        assert!(csv.num(row, "prefill_seconds") > 0.0);
        assert!(csv.num(row, "total_seconds") >= csv.num(row, "prefill_seconds"));
        let tps = new_tokens as f64 / csv.num(row, "total_seconds");
        assert!((csv.num(row, "tokens_per_second") - tps).abs() / tps < 1e-3);
        // The last generated token is chosen, never fed back: prompt + new - 1 positions.
        let positions = input + new_tokens as f64 - 1.0;
        let (reserved, live) = match strategy.as_str() {
            "none" => (positions, 0.0),
            "static" => (input + new_tokens as f64, positions),
            "dynamic" => (256.0 * (positions / 256.0).ceil(), positions),
            other => panic!("strategy {other}"),
        };
        assert_eq!(
            csv.num(row, "kv_reserved_bytes"),
            reserved * bytes_per_position,
            "{strategy}"
        );
        assert_eq!(
            csv.num(row, "kv_live_bytes"),
            live * bytes_per_position,
            "{strategy}"
        );
        if cfg!(target_os = "linux") {
            assert!(csv.num(row, "process_peak_bytes") > 0.0);
            csv.num(row, "study_memory_delta_bytes");
        }
        assert_eq!(csv.get(row, "device_peak_bytes"), "");
    }

    // generations.jsonl: turn 2's prompt is the history re-templated with turn 1's answer.
    let generations: Vec<Value> = std::fs::read_to_string(results.join("generations.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(generations.len(), 6);
    let tokenizer = Tokenizer::load(&model).unwrap().unwrap();
    let scenario = study_scenario("insurance_claim_auto").unwrap();
    let mut history = first_turn("insurance_claim_auto");
    history.push(message(
        "assistant",
        generations[0]["answer"].as_str().unwrap(),
    ));
    history.push(message("user", &scenario.turns[1]));
    let turn2 = tokenizer
        .encode_messages(&history, &PROMPT_OPTIONS)
        .unwrap();
    assert_eq!(generations[1]["input_tokens"], turn2.len());
    assert_eq!(csv.num(1, "input_tokens") as usize, turn2.len());
    for g in &generations[2..] {
        let same_turn = &generations[g["turn"].as_u64().unwrap() as usize - 1];
        assert_eq!(
            g["new_ids"], same_turn["new_ids"],
            "{} turn {}",
            g["strategy"], g["turn"]
        );
    }

    // summary.json
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(results.join("summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["interrupted"], false);
    assert_eq!(summary["turns_planned"], 6);
    assert_eq!(summary["turns_measured"], 6);
    assert_eq!(summary["turns_failed"], 0);
    assert_eq!(summary["disagreements"].as_array().unwrap().len(), 0);
    assert_eq!(summary["run"]["synthetic"], true);
    assert_eq!(summary["run"]["ordinary_text_only"], true);
    assert_eq!(summary["run"]["protocol"]["ignore_eos"], true);
    let strategies = summary["strategies"].as_array().unwrap();
    let order: Vec<&str> = strategies
        .iter()
        .map(|s| s["strategy"].as_str().unwrap())
        .collect();
    assert_eq!(order, ["none", "dynamic", "static"]);
    for (i, s) in strategies.iter().enumerate() {
        assert_eq!(s["successes"], 2);
        assert_eq!(s["agreeing_turns"], 2);
        let rows: Vec<usize> = (0..6)
            .filter(|&r| csv.get(r, "strategy") == order[i])
            .collect();
        let mean_time = rows
            .iter()
            .map(|&r| csv.num(r, "total_seconds"))
            .sum::<f64>()
            / 2.0;
        let summary_time = s["total_seconds"]["mean"].as_f64().unwrap();
        assert!(
            (summary_time - mean_time).abs() < 1e-5,
            "{summary_time} vs {mean_time}"
        );
        assert_eq!(s["input_tokens"]["min"], 152.0);
    }

    // report.md and the plots
    let report = std::fs::read_to_string(results.join("report.md")).unwrap();
    assert!(report.contains("Table 1") && report.contains("| dynamic |"));
    for (stem, axis_text) in [
        ("time_per_turn", "seconds per generate call"),
        ("tokens_per_second", "tokens per second"),
        ("kv_memory", "MiB"),
    ] {
        assert!(
            report.contains(&format!("({stem}.png)")),
            "report.md lacks {stem}.png"
        );
        check_png(&results.join(format!("{stem}.png")));
        check_svg(&results.join(format!("{stem}.svg")), axis_text);
    }
}

#[test]
fn reuse_strategies_keep_the_conversation_and_say_what_they_reused() {
    let model = tiny_model();
    let out = tempfile::tempdir().unwrap();
    let results = out.path().join("run");
    let run = kvlab(&[
        "scenario",
        "--model",
        model.to_str().unwrap(),
        "--backend",
        "cpu",
        "--scenarios",
        "insurance_claim_auto",
        "--strategies",
        "dynamic,dynamic+reuse,static+reuse",
        "--turns",
        "3",
        "--max-new-tokens",
        "6",
        "--chunk-tokens",
        "16",
        "--out",
        results.to_str().unwrap(),
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(stdout.contains("Prefix reuse, turn by turn"), "{stdout}");
    let csv = Csv::read(&results.join("turns.csv"));
    assert_eq!(csv.rows.len(), 9);
    let bytes_per_position = 2.0 * 2.0 * 2.0 * 16.0 * 4.0;
    let mut static_reserved = None;
    for row in 0..9 {
        let strategy = csv.get(row, "strategy").to_string();
        let turn = csv.num(row, "turn") as usize;
        let what = format!("{strategy} turn {turn}");
        assert_eq!(
            csv.get(row, "success"),
            "true",
            "{what}: {}",
            csv.get(row, "error")
        );
        assert_eq!(csv.get(row, "agrees_with_first_strategy"), "true", "{what}");
        if strategy == "dynamic" {
            assert_eq!(csv.get(row, "reused_tokens"), "", "{what}");
            continue;
        }
        let input = csv.num(row, "input_tokens");
        let (reused, prefilled) = (
            csv.num(row, "reused_tokens"),
            csv.num(row, "prefilled_tokens"),
        );
        assert_eq!(reused + prefilled, input, "{what}");
        if turn == 1 {
            assert_eq!(reused, 0.0, "{what}");
        } else {
            // The previous prompt less its last token at least (the template renders the
            // generation prompt's tail and the answer's start anew).
            let previous = csv.num(row - 1, "input_tokens");
            assert!(reused >= previous - 1.0, "{what}: {reused} of {previous}");
            let rate = csv.num(row, "reuse_hit_rate");
            assert!((rate - reused / input).abs() < 1e-3, "{what}");
        }
        // The conversation's sequence holds the history: live = prompt + new - 1 positions.
        assert_eq!(
            csv.num(row, "kv_live_bytes"),
            (input + 5.0) * bytes_per_position,
            "{what}"
        );
        if strategy == "static+reuse" {
            // One run reserved at turn 1 for the whole conversation.
            let reserved = csv.num(row, "kv_reserved_bytes");
            assert_eq!(*static_reserved.get_or_insert(reserved), reserved, "{what}");
            assert!(reserved >= (input + 6.0) * bytes_per_position, "{what}");
        }
    }
    let report = std::fs::read_to_string(results.join("report.md")).unwrap();
    assert!(report.contains("## Prefix reuse, turn by turn"));
    assert!(report.contains("prefix_reuse.png"));
    check_png(&results.join("prefix_reuse.png"));
}

#[test]
fn a_pool_that_runs_dry_fails_its_turn_and_the_run_goes_on() {
    let model = tiny_model();
    let out = tempfile::tempdir().unwrap();
    let results = out.path().join("run");
    // 11 chunks of 16 positions (512 bytes each): turn 1's 157 positions fit, turn 2's do not.
    let run = kvlab(&[
        "scenario",
        "--model",
        model.to_str().unwrap(),
        "--backend",
        "cpu",
        "--scenarios",
        "insurance_claim_auto",
        "--strategies",
        "dynamic",
        "--turns",
        "3",
        "--max-new-tokens",
        "6",
        "--chunk-tokens",
        "16",
        "--kv-budget",
        "90112",
        "--out",
        results.to_str().unwrap(),
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let csv = Csv::read(&results.join("turns.csv"));
    assert_eq!(csv.rows.len(), 3);
    assert_eq!(csv.get(0, "success"), "true");
    for row in 1..3 {
        assert_eq!(csv.get(row, "success"), "false");
        let error = csv.get(row, "error");
        assert!(
            error.contains("the KV pool is exhausted") && error.contains("raise --kv-budget"),
            "{error}"
        );
    }
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(stdout.contains("2 turn(s) failed"), "{stdout}");
}

#[test]
fn turn_one_equals_kvlab_generate_on_the_same_messages() {
    let model = tiny_model();
    let dir = tempfile::tempdir().unwrap();
    let messages = dir.path().join("messages.json");
    std::fs::write(
        &messages,
        serde_json::to_string(&first_turn("banking_open_account")).unwrap(),
    )
    .unwrap();
    let generated = kvlab(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--messages",
        messages.to_str().unwrap(),
        "--max-new-tokens",
        "8",
        "--ignore-eos",
        "--json",
    ]);
    assert!(generated.status.success());
    let generated: Value = serde_json::from_slice(&generated.stdout).unwrap();

    let results = dir.path().join("run");
    let run = kvlab(&[
        "scenario",
        "--model",
        model.to_str().unwrap(),
        "--scenarios",
        "banking_open_account",
        "--turns",
        "1",
        "--max-new-tokens",
        "8",
        "--ordinary-text-only",
        "false",
        "--out",
        results.to_str().unwrap(),
    ]);
    assert!(run.status.success());
    let text = std::fs::read_to_string(results.join("generations.jsonl")).unwrap();
    for line in text.lines() {
        let turn: Value = serde_json::from_str(line).unwrap();
        assert_eq!(
            turn["new_ids"], generated["generated_ids"],
            "{}",
            turn["strategy"]
        );
        assert_eq!(
            turn["input_tokens"],
            generated["prompt_ids"].as_array().unwrap().len()
        );
    }
}

#[test]
fn a_malformed_scenario_file_is_refused_with_its_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.json");
    std::fs::write(
        &bad,
        "{\n  \"system_prompts\": {\"helper\": \"You help.\"},\n  \"scenarios\": {\n    \"short\": {\"system\": \"helper\",\n      \"turns\": [\"Hi\", 3]}\n  }\n}\n",
    )
    .unwrap();
    let run = kvlab(&[
        "scenario",
        "--model",
        tiny_model().to_str().unwrap(),
        "--scenarios",
        bad.to_str().unwrap(),
        "--out",
        dir.path().join("run").to_str().unwrap(),
    ]);
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("bad.json")
            && stderr.contains("line 5")
            && stderr.contains("expected a string"),
        "{stderr}"
    );
}

#[test]
fn cache_map_prints_and_draws_a_dynamic_cache() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("map.png");
    let run = kvlab(&[
        "cache-map",
        "--model",
        tiny_model().to_str().unwrap(),
        "--cache",
        "dynamic",
        "--tokens",
        "300",
        "--chunk-tokens",
        "128",
        "--out",
        png.to_str().unwrap(),
    ]);
    assert!(run.status.success());
    let stdout = String::from_utf8_lossy(&run.stdout);
    // 300 positions in chunks of 128: 3 chunks, the last with 44 written slots.
    assert!(stdout.contains("3 chunk(s) of 128 positions"), "{stdout}");
    assert!(stdout.contains("allocations: 3"), "{stdout}");
    assert!(stdout.contains("256-383    44"), "{stdout}");
    check_png(&png);
    check_svg(&png.with_extension("svg"), "chunk 2 (256-383)");
}

#[test]
fn docs_describe_every_turns_csv_column() {
    let docs =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/scenario.md"))
            .expect("docs/scenario.md");
    for column in TURN_COLUMNS {
        assert!(
            docs.contains(&format!("| `{}` |", column.name)),
            "docs/scenario.md does not describe the column {}",
            column.name
        );
    }
}
