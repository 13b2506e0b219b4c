//! The synthetic checkpoint: its tokenizer against the real Llama 3 one, its config against the
//! real Llama-3.2-1B config, and the Tiny preset's folder (loadable, aligned, reproducible).

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use half::bf16;
use kvlab::model::synth::{
    cached_synthetic_dir, config_json, generation_config_json, tokenizer_config_json,
    write_synthetic, Preset, SynthOptions,
};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;
use tokenizers::Tokenizer;

mod common;
use common::shared_dir;

fn read_json(path: &Path) -> Value {
    let text =
        fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

fn load_tokenizer(path: &Path) -> Tokenizer {
    Tokenizer::from_file(path).unwrap_or_else(|e| panic!("loading {}: {e}", path.display()))
}

fn write_tiny(seed: u64, out: &Path) {
    let opts = SynthOptions {
        preset: Preset::Tiny,
        seed,
    };
    write_synthetic(&opts, out).unwrap_or_else(|e| panic!("writing {}: {e:#}", out.display()));
}

/// Every key of `expected` is in `actual` with the same value, and `actual` has no other key.
fn assert_same_keys_and_values(what: &str, actual: &Value, expected: &Value) {
    let (actual, expected) = (actual.as_object().unwrap(), expected.as_object().unwrap());
    for (key, want) in expected {
        assert_eq!(actual.get(key), Some(want), "{what}: key `{key}`");
    }
    for key in actual.keys() {
        assert!(expected.contains_key(key), "{what}: extra key `{key}`");
    }
}

#[test]
fn presets_parse_by_name_and_unknown_names_list_them() {
    assert_eq!(
        "llama-3.2-1b".parse::<Preset>().unwrap(),
        Preset::Llama32_1B
    );
    assert_eq!("tiny".parse::<Preset>().unwrap(), Preset::Tiny);
    for p in Preset::ALL {
        assert_eq!(p.to_string().parse::<Preset>().unwrap(), p);
    }
    let err = "llama-3.2-3b".parse::<Preset>().unwrap_err().to_string();
    assert!(
        err.contains("llama-3.2-3b") && err.contains("llama-3.2-1b") && err.contains("tiny"),
        "{err}"
    );
}

#[test]
fn configs_match_the_real_llama_3_2_1b_key_by_key() {
    let Some(shared) = shared_dir() else { return };
    let real = shared.join("models/llama-3.2-1b");
    assert_same_keys_and_values(
        "config.json",
        &config_json(Preset::Llama32_1B),
        &read_json(&real.join("config.json")),
    );
    assert_same_keys_and_values(
        "generation_config.json",
        &generation_config_json(),
        &read_json(&real.join("generation_config.json")),
    );
    assert_same_keys_and_values(
        "tokenizer_config.json",
        &tokenizer_config_json(),
        &read_json(&real.join("tokenizer_config.json")),
    );
}

/// The study's texts: system prompts, user turns, and each scenario in the study's fallback
/// prompt form (`role: content` lines), plus strings that stress the pre-tokenizer.
fn study_texts(shared: &Path) -> Vec<String> {
    let study = read_json(&shared.join("scenarios/study_scenarios.json"));
    let systems = study["system_prompts"].as_object().unwrap();
    let mut texts: Vec<String> = systems
        .values()
        .map(|s| s.as_str().unwrap().to_string())
        .collect();
    for scenario in study["scenarios"].as_object().unwrap().values() {
        let system = systems[scenario["system"].as_str().unwrap()]
            .as_str()
            .unwrap();
        let mut fallback = vec![format!("system: {system}")];
        for turn in scenario["turns"].as_array().unwrap() {
            let turn = turn.as_str().unwrap();
            texts.push(turn.to_string());
            fallback.push(format!("user: {turn}"));
        }
        texts.push(fallback.join("\n"));
    }
    assert!(texts.len() > 75, "expected 5 scenarios of 15 turns");
    let awkward = [
        "",
        " ",
        "1234567890 3.14159 -0.5e-10 1,000,000 $12.99 2024-07-26",
        "   multiple   spaces\t\ttabs  \n\n\n  trailing   ",
        "line one\r\nline two\n\n\nline three\n",
        "naïve café — déjà vu «quotes» ½ °C ±5 €3",
        "emoji 🙂👍🏽🇵🇹 and ✔︎ ★",
        "I'm sure they'll say it's what we've DONE, isn't it? 'S 'LL",
        "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n",
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
        "<|reserved_special_token_247|>x<|eom_id|><|python_tag|><|finetune_right_pad_id|>",
        "<|endoftext|> is cl100k's own special token, plain text for Llama 3",
    ];
    texts.extend(awkward.iter().map(|s| s.to_string()));
    texts
}

#[test]
fn synthetic_tokenizer_gives_the_real_llama3_ids_on_every_study_text() {
    let Some(shared) = shared_dir() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let folder = tmp.path().join("tiny");
    write_tiny(0, &folder);
    let synthetic = load_tokenizer(&folder.join("tokenizer.json"));
    let real = load_tokenizer(&shared.join("models/llama-3.2-1b/tokenizer.json"));

    for text in study_texts(&shared) {
        for add_special_tokens in [false, true] {
            let want = real.encode(text.as_str(), add_special_tokens).unwrap();
            let got = synthetic.encode(text.as_str(), add_special_tokens).unwrap();
            assert_eq!(
                got.get_ids(),
                want.get_ids(),
                "add_special_tokens={add_special_tokens}, text {text:?}"
            );
        }
        let ids = real
            .encode(text.as_str(), false)
            .unwrap()
            .get_ids()
            .to_vec();
        assert_eq!(
            synthetic.decode(&ids, false).unwrap(),
            text,
            "decode round trip"
        );
    }
    let bos = synthetic.encode("Hello", true).unwrap().get_ids()[0];
    assert_eq!(bos, 128000);

    // Scripts for which Llama 3 added tokens beyond cl100k: other ids, the same text back.
    for text in [
        "「日本語のテキスト」",
        "한국어 Ελληνικά русский हिन्दी",
        "👨\u{200d}👩\u{200d}👧",
    ] {
        let real_ids = real.encode(text, false).unwrap().get_ids().to_vec();
        assert!(real_ids.iter().any(|&id| id >= 100_256), "{text:?}");
        let ids = synthetic.encode(text, false).unwrap().get_ids().to_vec();
        assert!(ids.iter().all(|&id| id < 100_256), "{text:?}: {ids:?}");
        assert_eq!(synthetic.decode(&ids, false).unwrap(), text);
    }
}

#[test]
fn synthetic_tokenizer_json_is_llama3s_restricted_to_cl100k() {
    let Some(shared) = shared_dir() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let folder = tmp.path().join("tiny");
    write_tiny(0, &folder);
    let ours = read_json(&folder.join("tokenizer.json"));
    let real = read_json(&shared.join("models/llama-3.2-1b/tokenizer.json"));

    for key in [
        "version",
        "truncation",
        "padding",
        "added_tokens",
        "normalizer",
        "pre_tokenizer",
        "post_processor",
        "decoder",
    ] {
        assert_eq!(ours[key], real[key], "tokenizer.json `{key}`");
    }
    for (key, value) in ours["model"].as_object().unwrap() {
        if key != "vocab" && key != "merges" {
            assert_eq!(value, &real["model"][key], "model `{key}`");
        }
    }

    // The vocabulary: Llama 3's first 100,256 ranks, and the specials at their ids.
    let real_vocab = real["model"]["vocab"].as_object().unwrap();
    let vocab = ours["model"]["vocab"].as_object().unwrap();
    assert_eq!(vocab.len(), 100_256 + 256);
    let mut by_id = BTreeMap::new();
    for (token, id) in vocab {
        let id = id.as_u64().unwrap();
        assert!(
            id < 100_256 || (128_000..128_256).contains(&id),
            "{token:?}"
        );
        assert!(by_id.insert(id, token.as_str()).is_none(), "id {id} twice");
        if id < 128_000 {
            assert_eq!(real_vocab.get(token), Some(&Value::from(id)), "{token:?}");
        }
    }
    for added in real["added_tokens"].as_array().unwrap() {
        let id = added["id"].as_u64().unwrap();
        assert_eq!(Some(&added["content"].as_str().unwrap()), by_id.get(&id));
    }

    // The merges: Llama 3's, in its order, less those that make or use a token beyond cl100k.
    let real_id = |token: &str| real_vocab[token].as_u64().unwrap();
    let real_merges: Vec<&Value> = real["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| {
            let (l, r) = (m[0].as_str().unwrap(), m[1].as_str().unwrap());
            [real_id(l), real_id(r), real_id(&format!("{l}{r}"))]
                .iter()
                .all(|&id| id < 100_256)
        })
        .collect();
    let merges: Vec<&Value> = ours["model"]["merges"].as_array().unwrap().iter().collect();
    assert_eq!(merges.len(), real_merges.len());
    if let Some(i) = (0..merges.len()).find(|&i| merges[i] != real_merges[i]) {
        panic!("merge {i}: {} != {}", merges[i], real_merges[i]);
    }
}

/// `(name, shape)` of every tensor of a tied HF Llama with the Tiny shape.
fn tiny_tensor_shapes() -> BTreeMap<String, Vec<usize>> {
    let (hidden, kv_dim, inter) = (64, 2 * 16, 192);
    let mut shapes = BTreeMap::from([
        (
            "model.embed_tokens.weight".to_string(),
            vec![128_256, hidden],
        ),
        ("model.norm.weight".to_string(), vec![hidden]),
    ]);
    for i in 0..2 {
        let p = format!("model.layers.{i}");
        for (name, shape) in [
            ("input_layernorm", vec![hidden]),
            ("post_attention_layernorm", vec![hidden]),
            ("self_attn.q_proj", vec![hidden, hidden]),
            ("self_attn.k_proj", vec![kv_dim, hidden]),
            ("self_attn.v_proj", vec![kv_dim, hidden]),
            ("self_attn.o_proj", vec![hidden, hidden]),
            ("mlp.gate_proj", vec![inter, hidden]),
            ("mlp.up_proj", vec![inter, hidden]),
            ("mlp.down_proj", vec![hidden, inter]),
        ] {
            shapes.insert(format!("{p}.{name}.weight"), shape);
        }
    }
    shapes
}

fn bf16_values(data: &[u8]) -> Vec<f32> {
    data.chunks_exact(2)
        .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
        .collect()
}

#[test]
fn tiny_folder_is_a_loadable_aligned_llama_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let folder = tmp.path().join("tiny");
    write_tiny(3, &folder);

    let mut files: Vec<String> = fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(files, ["tiny"], "no partial folder is left beside it");
    files = fs::read_dir(&folder)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "README.md",
            "config.json",
            "generation_config.json",
            "kvlab-synthetic.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );
    let config = read_json(&folder.join("config.json"));
    assert_eq!(config, config_json(Preset::Tiny));
    assert_eq!(config["vocab_size"], 128_256);
    assert_eq!(config["num_hidden_layers"], 2);
    assert!(read_json(&folder.join("tokenizer_config.json"))
        .get("chat_template")
        .is_none());

    let bytes = fs::read(folder.join("model.safetensors")).unwrap();
    let (header_len, metadata) = SafeTensors::read_metadata(&bytes).unwrap();
    let data_start = 8 + header_len;
    assert_eq!(data_start % 64, 0, "data section starts 64-byte aligned");
    assert_eq!(
        metadata.metadata().as_ref().unwrap().get("format").unwrap(),
        "pt"
    );
    let weights = SafeTensors::deserialize(&bytes).unwrap();
    let shapes: BTreeMap<String, Vec<usize>> = weights
        .iter()
        .map(|(name, t)| (name.to_string(), t.shape().to_vec()))
        .collect();
    assert_eq!(shapes, tiny_tensor_shapes());
    for (name, t) in weights.iter() {
        assert_eq!(t.dtype(), Dtype::BF16, "{name}");
        let start = metadata.info(name).unwrap().data_offsets.0;
        assert_eq!(
            (data_start + start) % 64,
            0,
            "{name} starts 64-byte aligned"
        );
        if name.ends_with("norm.weight") {
            assert!(
                bf16_values(t.data()).iter().all(|&x| x == 1.0),
                "{name} is all ones"
            );
        }
    }

    // Matrices: N(0, 0.02). 8.2M embedding samples: the sample std is within 1e-5 of the true
    // one (1 sigma), the mean within 1e-5; bf16 rounding is 2^-9 relative and unbiased.
    let embed = bf16_values(weights.tensor("model.embed_tokens.weight").unwrap().data());
    let n = embed.len() as f64;
    let mean = embed.iter().map(|&x| x as f64).sum::<f64>() / n;
    let std = (embed
        .iter()
        .map(|&x| (x as f64 - mean).powi(2))
        .sum::<f64>()
        / n)
        .sqrt();
    assert!(mean.abs() < 1e-4, "mean {mean}");
    assert!((std - 0.02).abs() < 2e-4, "std {std}");
    let max = embed.iter().fold(0f32, |m, &x| m.max(x.abs()));
    assert!(max < 0.02 * 7.0, "max |x| {max}");
    // Each RNG stream is distinct: consecutive 2^20-element blocks, and equal-shaped tensors.
    let block = 1 << 20;
    assert_ne!(embed[..block], embed[block..2 * block]);
    for proj in ["self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"] {
        let layer = |i| {
            let name = format!("model.layers.{i}.{proj}.weight");
            weights.tensor(&name).unwrap().data()
        };
        assert_ne!(layer(0), layer(1), "{proj}");
    }
}

#[test]
fn tiny_folder_is_a_function_of_the_seed_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let in_pool = |threads: usize, seed: u64, name: &str| {
        let folder = tmp.path().join(name);
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| write_tiny(seed, &folder));
        folder
    };
    let one_thread = in_pool(1, 11, "a");
    let three_threads = in_pool(3, 11, "b");
    let other_seed = in_pool(2, 12, "c");
    let read = |folder: &Path, file: &str| fs::read(folder.join(file)).unwrap();
    for file in [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
    ] {
        assert!(
            read(&one_thread, file) == read(&three_threads, file),
            "{file} differs between 1 and 3 threads"
        );
    }
    let weights = |folder: &Path| read(folder, "model.safetensors");
    let (a, c) = (weights(&one_thread), weights(&other_seed));
    assert_eq!(a.len(), c.len());
    assert!(a != c, "seeds 11 and 12 give the same weights");
}

#[test]
fn write_refuses_an_existing_folder_and_fills_an_empty_one() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = SynthOptions {
        preset: Preset::Tiny,
        seed: 0,
    };
    let occupied = tmp.path().join("occupied");
    fs::create_dir(&occupied).unwrap();
    fs::write(occupied.join("keep.txt"), "mine").unwrap();
    let err = write_synthetic(&opts, &occupied).unwrap_err();
    assert!(format!("{err:#}").contains("already exists"), "{err:#}");
    assert_eq!(
        fs::read_to_string(occupied.join("keep.txt")).unwrap(),
        "mine"
    );

    let empty = tmp.path().join("empty");
    fs::create_dir(&empty).unwrap();
    write_synthetic(&opts, &empty).unwrap();
    assert!(empty.join("model.safetensors").is_file());

    let under_a_file = occupied.join("keep.txt").join("model");
    let err = write_synthetic(&opts, &under_a_file).unwrap_err();
    assert!(format!("{err:#}").contains("keep.txt"), "{err:#}");
}

#[test]
fn cached_folder_is_built_once_then_reused() {
    let root = tempfile::tempdir().unwrap();
    let opts = SynthOptions {
        preset: Preset::Tiny,
        seed: 5,
    };
    let dir = cached_synthetic_dir(root.path(), &opts).unwrap();
    assert_eq!(dir, root.path().join("synthetic-tiny-seed5"));
    assert!(dir.join("model.safetensors").is_file());
    // A rebuild would replace the folder and lose this file.
    fs::write(dir.join("marker"), "").unwrap();
    assert_eq!(cached_synthetic_dir(root.path(), &opts).unwrap(), dir);
    assert!(dir.join("marker").is_file());
}

#[test]
fn partial_folders_of_dead_processes_are_removed_live_ones_kept() {
    if !Path::new("/proc/self").exists() {
        eprintln!("skipped: no /proc to tell live processes from dead ones");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // Above Linux's largest pid_max (2^22), so no process has it.
    let dead = tmp.path().join(".model.partial-4194305-0");
    let live = tmp
        .path()
        .join(format!(".model.partial-{}-99", std::process::id()));
    let other_name = tmp.path().join(".other.partial-4194305-0");
    for dir in [&dead, &live, &other_name] {
        fs::create_dir(dir).unwrap();
        fs::write(dir.join("model.safetensors"), "half").unwrap();
    }
    write_tiny(0, &tmp.path().join("model"));
    assert!(!dead.exists());
    assert!(live.exists());
    assert!(other_name.exists());
}

#[test]
fn written_folders_are_marked_synthetic_and_others_are_not() {
    let tmp = tempfile::tempdir().unwrap();
    let folder = tmp.path().join("tiny");
    kvlab::model::synth::write_synthetic(
        &kvlab::model::synth::SynthOptions {
            preset: kvlab::model::synth::Preset::Tiny,
            seed: 1,
        },
        &folder,
    )
    .unwrap();
    assert!(kvlab::model::synth::is_synthetic(&folder));
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama3-gqa4-bf16");
    assert!(!kvlab::model::synth::is_synthetic(&fixture));
}
