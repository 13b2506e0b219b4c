//! Bad checkpoints give errors that name what is wrong and where, never a panic.

use kvlab::backend::cpu::CpuBackend;
use kvlab::model::config::{Config, Rope};
use kvlab::model::forward::Model;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A writable copy of a fixture folder.
fn copy_fixture(name: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), tmp.path().join(entry.file_name())).unwrap();
    }
    tmp
}

fn load_error(dir: &Path) -> String {
    match Model::load(&CpuBackend::new(), dir) {
        Ok(_) => panic!("{} loaded but should not have", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

/// Rewrites model.safetensors of `dir` with `edit` applied to its (name, dtype, shape, bytes) list.
fn rewrite_tensors(
    dir: &Path,
    edit: impl FnOnce(&mut Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>),
) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    edit(&mut tensors);
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
}

#[test]
fn missing_tensor_is_named_with_its_file() {
    let dir = copy_fixture("tiny-llama3-gqa4-bf16");
    rewrite_tensors(dir.path(), |t| {
        t.retain(|(n, ..)| n != "model.layers.1.mlp.up_proj.weight")
    });
    let err = load_error(dir.path());
    assert!(
        err.contains("model.layers.1.mlp.up_proj.weight") && err.contains("missing"),
        "{err}"
    );
    assert!(err.contains("model.safetensors"), "{err}");
}

#[test]
fn wrong_shape_names_expected_and_found() {
    let dir = copy_fixture("tiny-llama3-gqa4-bf16");
    rewrite_tensors(dir.path(), |t| {
        let k = t
            .iter_mut()
            .find(|(n, ..)| n == "model.layers.0.self_attn.k_proj.weight")
            .unwrap();
        k.2 = vec![16, 128];
        k.3.truncate(16 * 128 * 2);
    });
    let err = load_error(dir.path());
    assert!(
        err.contains("model.layers.0.self_attn.k_proj.weight"),
        "{err}"
    );
    assert!(
        err.contains("[16, 128]") && err.contains("[32, 128]"),
        "{err}"
    );
}

#[test]
fn unsupported_dtype_is_named() {
    let dir = copy_fixture("tiny-llama3-gqa4-bf16");
    rewrite_tensors(dir.path(), |t| {
        let n = t
            .iter_mut()
            .find(|(n, ..)| n == "model.norm.weight")
            .unwrap();
        n.1 = safetensors::Dtype::I16;
    });
    let err = load_error(dir.path());
    assert!(
        err.contains("model.norm.weight") && err.contains("I16"),
        "{err}"
    );
}

#[test]
fn truncated_file_is_an_error() {
    let dir = copy_fixture("tiny-llama3-gqa4-bf16");
    let path = dir.path().join("model.safetensors");
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 1000)
        .unwrap();
    let err = load_error(dir.path());
    assert!(
        err.contains("model.safetensors") && err.contains("truncated or corrupt"),
        "{err}"
    );
}

#[test]
fn corrupt_header_is_an_error() {
    let dir = copy_fixture("tiny-gqa3-headdim32-f16");
    let path = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[8..16].copy_from_slice(b"{garbage");
    std::fs::write(&path, bytes).unwrap();
    let err = load_error(dir.path());
    assert!(err.contains("not a valid safetensors file"), "{err}");
    std::fs::write(&path, b"abc").unwrap();
    assert!(load_error(dir.path()).contains("not a valid safetensors file"));
}

#[test]
fn missing_shard_is_named() {
    let dir = copy_fixture("tiny-mha-f32-sharded");
    std::fs::remove_file(dir.path().join("model-00003-of-00005.safetensors")).unwrap();
    let err = load_error(dir.path());
    assert!(
        err.contains("model-00003-of-00005.safetensors") && err.contains("does not exist"),
        "{err}"
    );
}

#[test]
fn folder_without_weights_says_what_it_looked_for() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("tiny-mha-f32-sharded/config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let err = load_error(dir.path());
    assert!(err.contains("model.safetensors.index.json"), "{err}");
}

#[test]
fn bad_configs_are_named() {
    let dir = copy_fixture("tiny-llama3-gqa4-bf16");
    let cfg_path = dir.path().join("config.json");
    let original = std::fs::read_to_string(&cfg_path).unwrap();
    std::fs::write(&cfg_path, original.replace("\"llama3\"", "\"yarn\"")).unwrap();
    let err = load_error(dir.path());
    assert!(err.contains("yarn") && err.contains("config.json"), "{err}");
    std::fs::write(&cfg_path, original.replace("\"hidden_size\": 128,", "")).unwrap();
    let err = load_error(dir.path());
    assert!(
        err.contains("hidden_size") && err.contains("config.json"),
        "{err}"
    );
    std::fs::write(&cfg_path, "{ not json").unwrap();
    assert!(load_error(dir.path()).contains("config.json"));
}

#[test]
fn both_config_generations_resolve() {
    let v4 = Config::from_dir(&fixture("tiny-llama3-gqa4-bf16")).unwrap();
    assert!(matches!(v4.rope, Rope::Llama3 { factor, .. } if factor == 8.0));
    assert_eq!(
        (v4.num_kv_heads, v4.head_dim, v4.tie_word_embeddings),
        (2, 16, true)
    );
    let v5 = Config::from_dir(&fixture("tiny-mha-f32-sharded")).unwrap();
    assert_eq!(v5.rope, Rope::Default { theta: 10000.0 });
    assert_eq!((v5.num_kv_heads, v5.rms_norm_eps), (6, 1e-6));
    let explicit = Config::from_dir(&fixture("tiny-gqa3-headdim32-f16")).unwrap();
    assert_eq!(
        (explicit.head_dim, explicit.q_dim(), explicit.hidden_size),
        (32, 192, 144)
    );
}

#[test]
fn real_llama_config_and_stop_tokens() {
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/models");
    if !shared.exists() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "../shared/models is required under CI=true"
        );
        eprintln!("skipped: {} is absent", shared.display());
        return;
    }
    let base = Config::from_dir(&shared.join("llama-3.2-1b")).unwrap();
    assert_eq!(
        (
            base.num_layers,
            base.hidden_size,
            base.num_kv_heads,
            base.head_dim
        ),
        (16, 2048, 8, 64)
    );
    assert_eq!(base.stop_token_ids, vec![128001]);
    assert_eq!(base.num_parameters(), 1_235_814_400);
    let instruct = Config::from_dir(&shared.join("llama-3.2-1b-instruct")).unwrap();
    assert_eq!(instruct.stop_token_ids, vec![128001, 128008, 128009]);
}
