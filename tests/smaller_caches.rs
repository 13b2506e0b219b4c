//! Smaller caches on the CPU, on the three tiny references: quantized K/V (bf16, int8, fp8 e4m3)
//! against the f32 cache, and eviction policies (window, sinks + window, H2O) giving the same
//! logits in every layout and keeping exactly their budget; bad options are errors that name
//! the option and the numbers.
//!
//! Every run is teacher-forced on the reference's greedy ids, so each step's logits follow the
//! same sequence whatever the cache chose.

mod common;

use common::{fixture, max_abs_diff, reference, MODELS};
use kvlab::backend::cpu::CpuBackend;
use kvlab::generate::{Engine, GenerateOptions, Generation, Generator, KvOptions};
use kvlab::kv::{EvictionPolicy, KvDtype, Strategy};
use kvlab::model::forward::Model;
use kvlab::selftest::reference::kv_dtype_tolerance;

fn engine(name: &str) -> Engine<CpuBackend> {
    let backend = CpuBackend::new();
    let model = Model::load(&backend, &fixture(name)).unwrap();
    Engine::new(backend, model)
}

/// The reference's prompt and generation, teacher-forced on its ids, every logit kept.
fn run(
    e: &mut Engine<CpuBackend>,
    name: &str,
    kv: KvOptions,
    strategy: Strategy,
    chunk_tokens: usize,
) -> Generation {
    let reference = reference(name);
    e.set_kv_options(kv).unwrap();
    let opts = GenerateOptions {
        feed_ids: Some(reference.ids(Strategy::Dynamic).unwrap().to_vec()),
        ..reference.options(strategy, chunk_tokens)
    };
    e.generate(&reference.prompt_ids, &opts, &mut |_| {})
        .unwrap_or_else(|e| panic!("{name} {kv:?} {strategy} chunk {chunk_tokens}: {e:#}"))
}

/// Every logit of a generation: the prompt's, then each step's.
fn logits(gen: &Generation) -> Vec<f32> {
    let mut all = gen.prompt_logits.clone();
    all.extend(gen.step_logits.iter().flatten());
    all
}

fn dtype(dtype: KvDtype) -> KvOptions {
    KvOptions {
        dtype: Some(dtype),
        ..KvOptions::default()
    }
}

#[test]
fn quantized_caches_stay_close_to_the_f32_cache_in_both_layouts() {
    for name in MODELS {
        let mut e = engine(name);
        let exact = logits(&run(
            &mut e,
            name,
            dtype(KvDtype::F32),
            Strategy::Dynamic,
            7,
        ));
        for kv_dtype in KvDtype::ALL {
            let chunked = logits(&run(&mut e, name, dtype(kv_dtype), Strategy::Dynamic, 7));
            let contiguous = logits(&run(&mut e, name, dtype(kv_dtype), Strategy::Static, 1));
            let diff = max_abs_diff(&chunked, &exact);
            eprintln!("{name} {kv_dtype}: logits within {diff:.2e} of the f32 cache");
            assert!(
                diff <= kv_dtype_tolerance(kv_dtype),
                "{name} {kv_dtype}: {diff}"
            );
            // The layouts differ in summation order only, but a difference in the last bit of
            // an activation can flip the rounding of a K or V entry of a later layer (measured:
            // 1.8e-4 in bf16, 2e-6 otherwise).
            let layouts = max_abs_diff(&chunked, &contiguous);
            eprintln!("{name} {kv_dtype}: the two layouts within {layouts:.2e}");
            let bound = if kv_dtype == KvDtype::F32 { 1e-5 } else { 1e-3 };
            assert!(
                layouts <= bound,
                "{name} {kv_dtype}: layouts differ by {layouts}"
            );
        }
    }
}

#[test]
fn a_quantized_cache_is_a_quarter_of_f32_plus_its_scales() {
    let name = MODELS[0];
    let mut e = engine(name);
    let f32 = run(&mut e, name, dtype(KvDtype::F32), Strategy::Static, 1).kv;
    let int8 = run(&mut e, name, dtype(KvDtype::Int8), Strategy::Static, 1).kv;
    // tiny-llama3-gqa4-bf16: 3 layers x K,V x 2 KV heads = 12 rows a position, head_dim 16.
    let rows = 3 * 2 * 2;
    assert_eq!(f32.live_bytes, f32.tokens * rows * 16 * 4);
    assert_eq!(int8.live_bytes, f32.live_bytes / 4 + f32.tokens * rows * 4);
    let capacity = f32.reserved_bytes / (rows * 16 * 4);
    assert_eq!(capacity, 45 + 24, "the static run: prompt + new tokens");
    assert_eq!(
        int8.reserved_bytes,
        f32.reserved_bytes / 4 + capacity * rows * 4
    );
}

fn policy(text: &str) -> KvOptions {
    KvOptions {
        policy: text.parse().unwrap(),
        ..KvOptions::default()
    }
}

#[test]
fn policies_keep_their_budget_and_give_the_same_logits_in_every_layout() {
    for name in MODELS {
        let mut e = engine(name);
        let full = logits(&run(&mut e, name, policy("full"), Strategy::Dynamic, 1));
        // A window longer than the sequence evicts nothing: exactly the full cache.
        let long = run(&mut e, name, policy("window:1000"), Strategy::Dynamic, 1);
        assert_eq!(long.kv.evicted_tokens, 0);
        assert_eq!(max_abs_diff(&logits(&long), &full), 0.0, "{name}");
        for text in ["window:9", "sinks:2,window:7", "h2o:heavy=5,recent=4"] {
            let kept = text
                .parse::<EvictionPolicy>()
                .unwrap()
                .kept_tokens()
                .unwrap() as u64;
            let runs = [
                (Strategy::Dynamic, 1),
                (Strategy::Dynamic, 4),
                (Strategy::Dynamic, 16),
                (Strategy::Static, 1),
            ]
            .map(|(strategy, chunk)| run(&mut e, name, policy(text), strategy, chunk));
            let first = logits(&runs[0]);
            for gen in &runs {
                // The prompt and the generated ids but the last, which was never fed back.
                let written = (gen.prompt_ids.len() + gen.new_ids.len() - 1) as u64;
                assert_eq!(gen.kv.tokens, written, "{name} {text}");
                assert_eq!(gen.kv.evicted_tokens, written - kept, "{name} {text}");
                let diff = max_abs_diff(&logits(gen), &first);
                assert!(diff <= 1e-5, "{name} {text}: layouts differ by {diff}");
            }
            // The prompt's logits come before any eviction (runs[0] has full's layout); the
            // steps' do not.
            let prompt = runs[0].prompt_logits.len();
            assert_eq!(max_abs_diff(&first[..prompt], &full[..prompt]), 0.0);
            let evicting = max_abs_diff(&first[prompt..], &full[prompt..]);
            assert!(evicting > 1e-3, "{name} {text}: eviction changed nothing");
        }
    }
}

#[test]
fn bad_options_are_errors_that_name_the_option_and_the_numbers() {
    let name = MODELS[0];
    let prompt = reference(name).prompt_ids;
    let mut e = engine(name);
    let opts = |strategy, max_context| GenerateOptions {
        strategy,
        max_context,
        chunk_tokens: 4,
        max_new_tokens: 4,
        ..GenerateOptions::default()
    };
    // 12 positions of 768 bytes fit the budget; sinks:4,window:12 keeps 16.
    e.set_kv_options(KvOptions {
        budget_bytes: Some(12 * 768),
        policy: "sinks:4,window:12".parse().unwrap(),
        ..KvOptions::default()
    })
    .unwrap();
    let err = e
        .generate(&prompt, &opts(Strategy::Dynamic, None), &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("--kv-budget 9216 bytes holds 12 positions of f32 KV (768 bytes a position)")
            && err.contains("--kv-policy sinks:4,window:12 keeps")
            && err.contains("(17)"),
        "{err}"
    );
    // A static run that cannot hold the kept positions and the next token.
    e.set_kv_options(policy("window:16")).unwrap();
    let err = e
        .generate(&prompt, &opts(Strategy::Static, Some(16)), &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("--kv-policy window:16 keeps 16 positions")
            && err.contains("holds 16")
            && err.contains("at least 17"),
        "{err}"
    );
    let err = e
        .generate(&prompt, &opts(Strategy::None, None), &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("--cache none keeps nothing"), "{err}");

    // Unknown names, from the command line.
    for (args, says) in [
        (
            ["--kv-dtype", "int4"],
            "invalid value 'int4' for '--kv-dtype",
        ),
        (["--kv-policy", "lru:8"], "unknown --kv-policy \"lru:8\""),
        (
            ["--kv-policy", "sinks:4,window:0"],
            "keeps no recent position",
        ),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_kvlab"))
            .args(["generate", "--prompt-ids", "1,2", "--backend", "cpu"])
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(says),
            "{args:?}: {stderr}"
        );
    }
}

#[test]
fn the_cuda_backend_refuses_what_its_kernels_do_not_store() {
    use kvlab::backend::cuda::{BackendKind, CudaBackend, CudaOptions};
    let backend = CudaBackend::open(BackendKind::Emu, CudaOptions::default()).unwrap();
    let model = Model::load(&backend, &fixture(MODELS[0])).unwrap();
    let mut e = Engine::new(backend, model);
    for stored in [KvDtype::Bf16, KvDtype::Int8, KvDtype::Fp8E4m3] {
        e.set_kv_options(dtype(stored)).unwrap();
    }
    let err = e
        .set_kv_options(dtype(KvDtype::F32))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("--kv-dtype f32") && err.contains("stores KV as bf16, int8, fp8-e4m3"),
        "{err}"
    );
    let err = e
        .set_kv_options(policy("h2o:heavy=8,recent=8"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("--kv-policy h2o:heavy=8,recent=8") && err.contains("CPU backend"),
        "{err}"
    );
}
