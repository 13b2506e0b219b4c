//! `kvlab serve-bench` end to end on the tiny synthetic model: a sweep's files read back (every
//! request, every step, the summary's measures, the plots), preemptions named in the log and
//! the results, requests that can never fit failing alone, and a bad trace file named by line
//! and field.

mod common;

use common::cli::{check_png, kvlab, tiny_model, Csv};
use kvlab::serve::report::{PREEMPTION_COLUMNS, REQUEST_COLUMNS, TIMELINE_COLUMNS};
use serde_json::Value;
use std::path::Path;

/// Tiny model: 2 layers x K,V x 2 KV heads x head_dim 16 x 4 bytes (f32).
const BYTES_PER_POSITION: usize = 2 * 2 * 2 * 16 * 4;

fn serve_bench(extra: &[&str], out: &Path) -> std::process::Output {
    let model = tiny_model();
    let mut args = vec![
        "serve-bench",
        "--model",
        model.to_str().unwrap(),
        "--backend",
        "cpu",
        "--out",
        out.to_str().unwrap(),
        "--no-warmup",
    ];
    args.extend(extra);
    kvlab(&args)
}

fn summary(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap()
}

#[test]
fn a_sweep_writes_every_request_step_and_measure() {
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("run");
    let run = serve_bench(
        &[
            "--concurrency",
            "1,3",
            "--turns",
            "2",
            "--max-new-tokens",
            "5",
            "--max-batch-tokens",
            "64",
        ],
        &dir,
    );
    assert!(run.status.success());
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(stdout.contains("Throughput and latency"), "{stdout}");
    assert!(stdout.contains("paged pool held"), "{stdout}");

    // Each mode at 1 and 3 clients, each client one conversation of 2 turns: 8 requests a
    // mode, every one with all its tokens.
    let requests = Csv::read(&dir.join("requests.csv"));
    let names: Vec<&str> = REQUEST_COLUMNS.iter().map(|c| c.name).collect();
    assert_eq!(requests.header, names);
    assert_eq!(requests.rows.len(), 2 * (2 + 6));
    for row in 0..requests.rows.len() {
        assert_eq!(requests.get(row, "success"), "true", "row {row}");
        assert_eq!(requests.num(row, "output_tokens"), 5.0);
        let ttft = requests.num(row, "ttft_seconds");
        assert!(ttft > 0.0 && ttft <= requests.num(row, "latency_seconds"));
        assert!(requests.num(row, "queue_seconds") <= ttft);
        // A request's sequence held its prompt and all new tokens but the last.
        let live = (requests.num(row, "prompt_tokens") + 4.0) as usize * BYTES_PER_POSITION;
        assert_eq!(requests.num(row, "kv_live_bytes") as usize, live);
        assert!(requests.num(row, "kv_reserved_bytes") as usize >= live);
    }
    let timeline = Csv::read(&dir.join("timeline.csv"));
    let names: Vec<&str> = TIMELINE_COLUMNS.iter().map(|c| c.name).collect();
    assert_eq!(timeline.header, names);
    let mut most_sequences = 0.0f64;
    for row in 0..timeline.rows.len() {
        let rows = timeline.num(row, "decode_rows") + timeline.num(row, "prefill_rows");
        assert!(rows > 0.0 && rows <= 64.0, "step {row}: {rows} rows");
        assert!(timeline.num(row, "live_bytes") <= timeline.num(row, "reserved_bytes"));
        assert!(timeline.num(row, "reserved_bytes") <= timeline.num(row, "capacity_bytes"));
        most_sequences = most_sequences.max(timeline.num(row, "sequences"));
    }
    assert_eq!(most_sequences, 3.0, "three clients decode in one step");

    let s = summary(&dir);
    let runs = s["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 4);
    for r in runs {
        for key in [
            "output_tokens_per_second",
            "decode_tokens_per_second",
            "waste",
        ] {
            assert!(r[key].as_f64().unwrap() > 0.0, "{key}: {r}");
        }
        for key in ["ttft_seconds", "itl_seconds"] {
            for p in ["p50", "p95", "p99"] {
                assert!(r[key][p].as_f64().unwrap() > 0.0, "{key}.{p}: {r}");
            }
        }
        assert_eq!(r["preemptions"], 0);
        assert_eq!(
            r["output_tokens"].as_u64().unwrap(),
            r["requests"].as_u64().unwrap() * 5
        );
    }
    assert_eq!(runs[1]["load"]["concurrency"], 3);
    assert_eq!(runs[1]["peak_running"], 3);
    let report = std::fs::read_to_string(dir.join("report.md")).unwrap();
    assert!(report.contains("## KV memory: how many sequences fit, and the waste"));
    for plot in ["throughput", "kv_over_time"] {
        check_png(&dir.join(format!("{plot}.png")));
        assert!(report.contains(&format!("({plot}.png)")), "{report}");
    }
}

#[test]
fn a_pool_that_runs_dry_preempts_and_says_which_and_why() {
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("run");
    // About 400 positions for 8 clients whose conversations grow to about 120 each.
    let budget = (400 * BYTES_PER_POSITION).to_string();
    let run = serve_bench(
        &[
            "--workload",
            "synthetic",
            "--shared-prefix-tokens",
            "50",
            "--conversation-prefix-tokens",
            "20",
            "--user-tokens",
            "10-20",
            "--answer-tokens",
            "20-40",
            "--turns",
            "2",
            "--concurrency",
            "8",
            "--mode",
            "paged",
            "--max-batch-tokens",
            "32",
            "--kv-budget",
            &budget,
        ],
        &dir,
    );
    assert!(run.status.success());
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    let preemptions = Csv::read(&dir.join("preemptions.csv"));
    let names: Vec<&str> = PREEMPTION_COLUMNS.iter().map(|c| c.name).collect();
    assert_eq!(preemptions.header, names);
    assert!(!preemptions.rows.is_empty(), "{stdout}");
    let reason = preemptions.get(0, "reason");
    assert!(
        reason.contains("the KV pool had no free chunk") && reason.contains("was admitted last"),
        "{reason}"
    );
    let request = preemptions.get(0, "request");
    assert!(
        (stdout.to_string() + &stderr).contains(&format!("preempted request {request} (")),
        "the log names the request"
    );
    // Every request still ends with all its tokens; the preempted ones say so.
    let requests = Csv::read(&dir.join("requests.csv"));
    assert_eq!(requests.rows.len(), 16);
    let trace = std::fs::read_to_string(dir.join("trace-8.jsonl")).unwrap();
    let answers: Vec<usize> = trace
        .lines()
        .flat_map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            v["turns"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["answer_tokens"].as_u64().unwrap() as usize)
                .collect::<Vec<_>>()
        })
        .collect();
    let total: usize = (0..16)
        .map(|r| requests.num(r, "output_tokens") as usize)
        .sum();
    assert_eq!(total, answers.iter().sum::<usize>());
    let preempted: f64 = (0..16).map(|r| requests.num(r, "preemptions")).sum();
    assert_eq!(preempted as usize, preemptions.rows.len());
    assert_eq!(
        summary(&dir)["runs"][0]["preemptions"].as_u64().unwrap() as usize,
        preemptions.rows.len()
    );
}

#[test]
fn requests_that_can_never_fit_fail_alone() {
    let out = tempfile::tempdir().unwrap();
    let trace = out.path().join("trace.jsonl");
    std::fs::write(
        &trace,
        "{\"conversation\": \"ok\", \"turns\": [{\"user_tokens\": 20, \"answer_tokens\": 4}, {\"user_tokens\": 5, \"answer_tokens\": 4}]}\n\
         {\"conversation\": \"too-long\", \"prefix_tokens\": 300, \"turns\": [{\"user_tokens\": 5, \"answer_tokens\": 4}]}\n\
         {\"conversation\": \"too-big\", \"prefix_tokens\": 150, \"turns\": [{\"user_tokens\": 5, \"answer_tokens\": 4}]}\n",
    )
    .unwrap();
    // Paged: 128 positions of KV, at most 256 positions a request: too-long is refused for its
    // length, too-big (159 positions) for the budget.
    let budget = (128 * BYTES_PER_POSITION).to_string();
    let paged = out.path().join("paged");
    let common = [
        "--workload",
        trace.to_str().unwrap(),
        "--concurrency",
        "3",
        "--kv-budget",
        &budget,
    ];
    let run = serve_bench(
        &[&common[..], &["--mode", "paged", "--max-context", "256"]].concat(),
        &paged,
    );
    assert!(run.status.success());
    let requests = Csv::read(&paged.join("requests.csv"));
    assert_eq!(requests.rows.len(), 4);
    for row in 0..requests.rows.len() {
        let (conversation, error) = (
            requests.get(row, "conversation"),
            requests.get(row, "error"),
        );
        match conversation {
            "ok" => assert_eq!(requests.get(row, "success"), "true", "{error}"),
            "too-long" => assert!(
                error.contains("305 prompt + 4 new tokens = 309 positions exceed the maximum context of 256 (--max-context)"),
                "{error}"
            ),
            _ => assert!(
                error.contains("its 159 positions need")
                    && error.contains("more than the whole --kv-budget"),
                "{error}"
            ),
        }
    }
    assert!(std::fs::read_to_string(paged.join("trace.jsonl"))
        .unwrap()
        .contains("too-big"));
    // Static, each run sized to its request: both long ones exceed the budget, alone.
    let fixed = out.path().join("static");
    let run = serve_bench(&[&common[..], &["--mode", "static"]].concat(), &fixed);
    assert!(run.status.success());
    let requests = Csv::read(&fixed.join("requests.csv"));
    let ok: Vec<bool> = (0..4)
        .map(|r| requests.get(r, "success") == "true")
        .collect();
    assert_eq!(
        ok.iter().filter(|&&ok| ok).count(),
        2,
        "the two turns of ok"
    );
    for row in (0..4).filter(|&r| !ok[r]) {
        assert!(
            requests
                .get(row, "error")
                .contains("more than the whole --kv-budget"),
            "{}",
            requests.get(row, "error")
        );
    }
}

#[test]
fn a_bad_trace_file_is_refused_with_its_line_and_field() {
    let out = tempfile::tempdir().unwrap();
    let trace = out.path().join("bad.jsonl");
    std::fs::write(
        &trace,
        "{\"conversation\": \"a\", \"turns\": [{\"user_tokens\": 3, \"answer_tokens\": 2}]}\n\
         {\"conversation\": \"b\", \"turns\": [{\"user_tokens\": 3, \"answer_tokens\": \"many\"}]}\n",
    )
    .unwrap();
    let run = serve_bench(
        &["--workload", trace.to_str().unwrap()],
        &out.path().join("run"),
    );
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("bad.jsonl, line 2: field `turns[0].answer_tokens`: expected a positive integer, found \"many\""),
        "{stderr}"
    );
    assert!(
        !out.path().join("run").exists(),
        "nothing written for a bad trace"
    );
}

#[test]
fn an_eviction_policy_is_refused_by_name() {
    let out = tempfile::tempdir().unwrap();
    let run = serve_bench(
        &["--kv-policy", "window:64", "--concurrency", "2"],
        &out.path().join("run"),
    );
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("--kv-policy window:64: serve-bench keeps every position"),
        "{stderr}"
    );
}

#[test]
fn docs_describe_every_column() {
    let docs =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/serve-bench.md"))
            .expect("docs/serve-bench.md");
    let names = REQUEST_COLUMNS
        .iter()
        .map(|c| c.name)
        .chain(TIMELINE_COLUMNS.iter().map(|c| c.name))
        .chain(PREEMPTION_COLUMNS.iter().map(|c| c.name));
    for name in names {
        assert!(
            docs.contains(&format!("| `{name}` |")),
            "docs/serve-bench.md does not describe the column {name}"
        );
    }
}
