//! Bad GGUF files: each an error that names the file, the key or tensor and the numbers, never a
//! panic. Every case starts from a small valid llama file (which loads) and breaks one thing.

mod common;

use common::gguf::{llama_metadata, Gguf, Meta, Q8_0};
use kvlab::backend::cpu::CpuBackend;
use kvlab::model::forward::Model;
use kvlab::model::gguf::GgufFile;
use kvlab::model::tokenizer::Tokenizer;
use std::path::Path;

const VOCAB: usize = 40;
const HIDDEN: usize = 32;
const FF: usize = 64;

/// A valid 1-layer llama: 2 heads of 16 over 1 KV head, tied output, f32 tensors.
fn valid() -> Gguf {
    let mut g = Gguf::default();
    llama_metadata(
        &mut g,
        1,
        HIDDEN as u32,
        FF as u32,
        2,
        1,
        VOCAB,
        1e-5,
        10000.0,
    );
    let values = |n: usize| {
        (0..n)
            .map(|i| ((i % 7) as f32 - 3.0) * 0.01)
            .collect::<Vec<_>>()
    };
    let mut add = |name: &str, shape: &[usize]| {
        g.add_f32(name, shape, &values(shape.iter().product()));
    };
    add("token_embd.weight", &[VOCAB, HIDDEN]);
    add("output_norm.weight", &[HIDDEN]);
    add("blk.0.attn_norm.weight", &[HIDDEN]);
    add("blk.0.attn_q.weight", &[HIDDEN, HIDDEN]);
    add("blk.0.attn_k.weight", &[16, HIDDEN]);
    add("blk.0.attn_v.weight", &[16, HIDDEN]);
    add("blk.0.attn_output.weight", &[HIDDEN, HIDDEN]);
    add("blk.0.ffn_norm.weight", &[HIDDEN]);
    add("blk.0.ffn_gate.weight", &[FF, HIDDEN]);
    add("blk.0.ffn_up.weight", &[FF, HIDDEN]);
    add("blk.0.ffn_down.weight", &[HIDDEN, FF]);
    g
}

/// The error of loading `bytes` as model and tokenizer, with its whole chain.
fn load_error(dir: &Path, bytes: &[u8]) -> String {
    let path = dir.join("bad.gguf");
    std::fs::write(&path, bytes).unwrap();
    let result = GgufFile::open(&path).and_then(|file| {
        Tokenizer::from_gguf(&file)?;
        Model::load_gguf(&CpuBackend::new(), &file, kvlab::model::DType::F32)
    });
    match result {
        Ok(_) => panic!("a bad file loaded"),
        Err(e) => format!("{e:#}"),
    }
}

fn assert_names(err: &str, parts: &[&str]) {
    for part in parts {
        assert!(err.contains(part), "{part:?} is not in: {err}");
    }
    assert!(err.contains("bad.gguf"), "the file is not named: {err}");
}

#[test]
fn the_valid_file_loads_and_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("ok.gguf");
    valid().write(&path);
    let file = GgufFile::open(&path).unwrap();
    let model = Model::load_gguf(&CpuBackend::new(), &file, kvlab::model::DType::F32).unwrap();
    assert!(model.config.tie_word_embeddings);
    assert_eq!(model.config.vocab_size, VOCAB);
    assert_eq!(Tokenizer::from_gguf(&file).unwrap().vocab_size(), VOCAB);
}

#[test]
fn a_truncated_file_names_what_it_was_reading() {
    let tmp = tempfile::tempdir().unwrap();
    let bytes = valid().to_bytes();
    // In the header, in the metadata, in the tensor directory, in the tensor data.
    for (cut, what) in [
        (10, "the tensor count"),
        (100, "truncated"),
        (1500, "truncated"),
        (bytes.len() - 8, "blk.0.ffn_down.weight"),
    ] {
        let err = load_error(tmp.path(), &bytes[..cut]);
        assert_names(&err, &[what]);
    }
    let err = load_error(tmp.path(), &bytes[..bytes.len() - 8]);
    assert_names(&err, &["truncated", &(bytes.len() - 8).to_string()]);
}

#[test]
fn a_wrong_magic_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let mut g = valid();
    g.magic = Some(*b"GGML");
    assert_names(
        &load_error(tmp.path(), &g.to_bytes()),
        &["not a GGUF file", "GGML"],
    );
}

#[test]
fn an_unsupported_version_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let mut g = valid();
    g.version = Some(2);
    assert_names(
        &load_error(tmp.path(), &g.to_bytes()),
        &["version 2", "version 3"],
    );
    g.version = Some(3u32.swap_bytes());
    assert_names(&load_error(tmp.path(), &g.to_bytes()), &["big-endian"]);
}

#[test]
fn an_unknown_or_unsupported_tensor_type_names_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let mut g = valid();
    g.tensor_mut("blk.0.attn_q.weight").type_id = 77;
    assert_names(
        &load_error(tmp.path(), &g.to_bytes()),
        &["blk.0.attn_q.weight", "77"],
    );
    let mut g = valid();
    g.tensor_mut("blk.0.ffn_up.weight").type_id = 14;
    assert_names(
        &load_error(tmp.path(), &g.to_bytes()),
        &["blk.0.ffn_up.weight", "Q6_K"],
    );
    // Q8_0 rows must be whole blocks of 32 values: 16-wide rows are not.
    let mut g = valid();
    let t = g.tensor_mut("blk.0.ffn_down.weight");
    t.type_id = Q8_0;
    t.dims = vec![16, 32];
    assert_names(
        &load_error(tmp.path(), &g.to_bytes()),
        &["blk.0.ffn_down.weight"],
    );
}

#[test]
fn a_tensor_past_the_end_names_the_tensor_and_the_sizes() {
    let tmp = tempfile::tempdir().unwrap();
    let mut g = valid();
    g.tensor_mut("blk.0.attn_v.weight").offset_override = Some(1 << 40);
    let err = load_error(tmp.path(), &g.to_bytes());
    assert_names(
        &err,
        &[
            "blk.0.attn_v.weight",
            &(1u64 << 40).to_string(),
            "past the end",
        ],
    );
    // A size that runs past the end: the last tensor's data cut short by 8 bytes.
    let bytes = valid().to_bytes();
    let err = load_error(tmp.path(), &bytes[..bytes.len() - 8]);
    let need = (HIDDEN * FF * 4).to_string();
    assert_names(&err, &["blk.0.ffn_down.weight", "past the end", &need]);
}

#[test]
fn a_missing_key_or_tensor_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    for key in [
        "llama.block_count",
        "llama.attention.head_count",
        "tokenizer.ggml.tokens",
    ] {
        let mut g = valid();
        g.remove(key);
        assert_names(&load_error(tmp.path(), &g.to_bytes()), &[key]);
    }
    let mut g = valid();
    g.tensors.retain(|t| t.name != "blk.0.attn_k.weight");
    let err = load_error(tmp.path(), &g.to_bytes());
    assert_names(&err, &["blk.0.attn_k.weight", "missing", "[16, 32]"]);
    let mut g = valid();
    g.tensor_mut("blk.0.attn_k.weight").dims = vec![16, HIDDEN as u64];
    let err = load_error(tmp.path(), &g.to_bytes());
    assert_names(
        &err,
        &["blk.0.attn_k.weight", "[32, 16]", "expected [16, 32]"],
    );
}

#[test]
fn an_architecture_other_than_llama_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let mut g = valid();
    g.set("general.architecture", Meta::Str("qwen2".into()));
    assert_names(
        &load_error(tmp.path(), &g.to_bytes()),
        &["general.architecture", "qwen2", "llama"],
    );
}

#[test]
fn a_vocabulary_that_disagrees_with_the_embedding_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let mut g = valid();
    g.set(
        "tokenizer.ggml.tokens",
        Meta::Strs(common::gguf::letter_vocab(VOCAB + 1)),
    );
    g.set("tokenizer.ggml.token_type", Meta::I32s(vec![1; VOCAB + 1]));
    let err = load_error(tmp.path(), &g.to_bytes());
    assert_names(
        &err,
        &[
            "token_embd.weight",
            &(VOCAB + 1).to_string(),
            &format!("{VOCAB} rows"),
        ],
    );
    let mut g = valid();
    g.set("llama.vocab_size", Meta::U32(VOCAB as u32 + 5));
    let err = load_error(tmp.path(), &g.to_bytes());
    assert_names(
        &err,
        &[
            "llama.vocab_size",
            &(VOCAB + 5).to_string(),
            &VOCAB.to_string(),
        ],
    );
}

#[test]
fn a_tokenizer_the_file_cannot_build_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let mut g = valid();
    g.set("tokenizer.ggml.pre", Meta::Str("mystery".into()));
    assert_names(
        &load_error(tmp.path(), &g.to_bytes()),
        &["tokenizer.ggml.pre", "mystery"],
    );
    let mut g = valid();
    g.set("tokenizer.ggml.merges", Meta::Strs(vec!["nospace".into()]));
    assert_names(
        &load_error(tmp.path(), &g.to_bytes()),
        &["tokenizer.ggml.merges[0]"],
    );
    let mut g = valid();
    g.set("tokenizer.ggml.add_bos_token", Meta::Bool(true));
    g.set("tokenizer.ggml.bos_token_id", Meta::U32(VOCAB as u32 + 3));
    assert_names(
        &load_error(tmp.path(), &g.to_bytes()),
        &["bos_token_id", &(VOCAB + 3).to_string()],
    );
}
