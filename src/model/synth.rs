//! Synthetic checkpoints: a complete Hugging Face Llama folder with random weights and a
//! Llama 3 tokenizer rebuilt from the cl100k_base ranks that `tiktoken-rs` bundles.
//!
//! This is kvlab's embedded default model: with no `--model`, kvlab builds
//! [`default_model_dir`] once and uses it, so every command works without a download.
//! cl100k_base is byte for byte the first 100,256 ranks of Llama 3's tokenizer, so prompts
//! tokenize to the real ids; the ranks 100,256..128,000 of the real vocabulary are absent
//! (decoding them is the tokenizer wrapper's business), the 256 special tokens are at their
//! real ids 128000..128255.

use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{ensure, Context, Result};
use half::bf16;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use rayon::prelude::*;
use serde::{Serialize, Serializer};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// The shapes kvlab can synthesize.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Preset {
    /// The exact shape of meta-llama/Llama-3.2-1B (2.5 GB of bf16 weights).
    Llama32_1B,
    /// A 2-layer Llama with the same tokenizer and vocabulary (16 MB), for tests.
    Tiny,
}

#[derive(Debug, thiserror::Error)]
#[error("unknown preset `{0}`; presets: llama-3.2-1b, tiny")]
pub struct UnknownPreset(String);

impl Preset {
    pub const ALL: [Preset; 2] = [Preset::Llama32_1B, Preset::Tiny];

    pub fn name(self) -> &'static str {
        match self {
            Preset::Llama32_1B => "llama-3.2-1b",
            Preset::Tiny => "tiny",
        }
    }

    fn dims(self) -> Dims {
        match self {
            Preset::Llama32_1B => Dims {
                hidden: 2048,
                layers: 16,
                heads: 32,
                kv_heads: 8,
                head_dim: 64,
                intermediate: 8192,
            },
            Preset::Tiny => Dims {
                hidden: 64,
                layers: 2,
                heads: 4,
                kv_heads: 2,
                head_dim: 16,
                intermediate: 192,
            },
        }
    }
}

impl FromStr for Preset {
    type Err = UnknownPreset;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Preset::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| UnknownPreset(s.to_string()))
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Clone, Debug)]
pub struct SynthOptions {
    pub preset: Preset,
    pub seed: u64,
}

/// The transformer shape of a preset; everything else (vocabulary, RoPE, special ids) is Llama 3's.
#[derive(Clone, Copy, Debug)]
struct Dims {
    hidden: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    intermediate: usize,
}

/// Llama 3 vocabulary: 128,000 BPE ranks, then 256 special tokens.
const VOCAB_SIZE: usize = 128_256;
const FIRST_SPECIAL_ID: u32 = 128_000;
const BOS_ID: u32 = 128_000;
const EOS_ID: u32 = 128_001;
const BOS_TOKEN: &str = "<|begin_of_text|>";
const EOS_TOKEN: &str = "<|end_of_text|>";
const MAX_POSITIONS: usize = 131_072;
/// The config form of the real checkpoint (4.x: `rope_theta` + `rope_scaling`).
const TRANSFORMERS_VERSION: &str = "4.45.0.dev0";
/// Standard deviation of the random matrices (the real config's `initializer_range`).
const INIT_STD: f64 = 0.02;

/// `config.json` of a preset; for [`Preset::Llama32_1B`] the exact values of the real checkpoint.
pub fn config_json(preset: Preset) -> Value {
    let d = preset.dims();
    json!({
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": false,
        "attention_dropout": 0.0,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "head_dim": d.head_dim,
        "hidden_act": "silu",
        "hidden_size": d.hidden,
        "initializer_range": INIT_STD,
        "intermediate_size": d.intermediate,
        "max_position_embeddings": MAX_POSITIONS,
        "mlp_bias": false,
        "model_type": "llama",
        "num_attention_heads": d.heads,
        "num_hidden_layers": d.layers,
        "num_key_value_heads": d.kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-5,
        "rope_scaling": {
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3"
        },
        "rope_theta": 500000.0,
        "tie_word_embeddings": true,
        "torch_dtype": "bfloat16",
        "transformers_version": TRANSFORMERS_VERSION,
        "use_cache": true,
        "vocab_size": VOCAB_SIZE
    })
}

/// `generation_config.json` as the real base model ships it.
pub fn generation_config_json() -> Value {
    json!({
        "bos_token_id": BOS_ID,
        "do_sample": true,
        "eos_token_id": EOS_ID,
        "temperature": 0.6,
        "top_p": 0.9,
        "transformers_version": TRANSFORMERS_VERSION
    })
}

/// `tokenizer_config.json` as the real base model ships it: no chat template.
pub fn tokenizer_config_json() -> Value {
    json!({
        "bos_token": BOS_TOKEN,
        "clean_up_tokenization_spaces": true,
        "eos_token": EOS_TOKEN,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": MAX_POSITIONS,
        "tokenizer_class": "PreTrainedTokenizerFast"
    })
}

/// Writes config.json, generation_config.json, tokenizer.json, tokenizer_config.json,
/// model.safetensors and a README.md into `out`, which must not exist (or be an empty folder).
/// The folder is built beside `out` under a temporary name and renamed at the end, so an
/// interrupted run never leaves a folder that looks complete. Shows a progress bar on stderr
/// over the weight bytes. The bytes depend on the preset and seed only, not on the thread count.
pub fn write_synthetic(opts: &SynthOptions, out: &Path) -> Result<()> {
    let name = out
        .file_name()
        .with_context(|| format!("output folder {} has no name", out.display()))?;
    if out.exists() {
        let is_empty_dir = out.is_dir()
            && fs::read_dir(out)
                .with_context(|| format!("reading {}", out.display()))?
                .next()
                .is_none();
        ensure!(
            is_empty_dir,
            "{} already exists; synth writes a new folder",
            out.display()
        );
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    remove_stale_partials(&parent, &name.to_string_lossy());
    let partial = parent.join(format!(
        "{}{}-{}",
        partial_prefix(&name.to_string_lossy()),
        std::process::id(),
        NEXT_PARTIAL.fetch_add(1, Ordering::Relaxed)
    ));
    fs::create_dir(&partial).with_context(|| format!("creating {}", partial.display()))?;

    let written = write_files(opts, &partial).and_then(|()| {
        if out.exists() {
            fs::remove_dir(out).with_context(|| format!("replacing empty {}", out.display()))?;
        }
        fs::rename(&partial, out)
            .with_context(|| format!("renaming {} to {}", partial.display(), out.display()))
    });
    if written.is_err() {
        // Best effort: the error that matters is the one being returned.
        let _ = fs::remove_dir_all(&partial);
    }
    written
}

/// Numbers the partial folders of one process (threads may build side by side).
static NEXT_PARTIAL: AtomicU64 = AtomicU64::new(0);

/// The partial folders of `name` are `.{name}.partial-{pid}-{n}`, beside it.
fn partial_prefix(name: &str) -> String {
    format!(".{name}.partial-")
}

/// Removes the partial folders of `name` left by processes that no longer run (a build
/// interrupted by Ctrl-C leaves up to 2.5 GB). Needs /proc to tell; elsewhere they stay.
fn remove_stale_partials(parent: &Path, name: &str) {
    let proc = Path::new("/proc");
    let (Ok(entries), true) = (fs::read_dir(parent), proc.join("self").exists()) else {
        return;
    };
    let prefix = partial_prefix(name);
    for entry in entries.flatten() {
        let file_name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = file_name
            .strip_prefix(&prefix)
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if !proc.join(pid).exists() {
            // Best effort: a partial folder we cannot remove does no harm but its size.
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// The default model: the synthetic Llama-3.2-1B of seed 0 (see [`synthetic_model_dir`]).
pub fn default_model_dir() -> Result<PathBuf> {
    synthetic_model_dir(Preset::Llama32_1B, 0)
}

/// `$KVLAB_CACHE` (or the platform cache dir joined with "kvlab") joined with
/// "synthetic-{preset}-seed{seed}". Built once, saying so in one line on stderr; reused after.
pub fn synthetic_model_dir(preset: Preset, seed: u64) -> Result<PathBuf> {
    let root = super::hub::kvlab_cache_dir()?;
    cached_synthetic_dir(&root, &SynthOptions { preset, seed })
}

/// `root/synthetic-{preset}-seed{seed}`, built on first use (one line on stderr) and reused after.
/// Safe against a concurrent build of the same folder: the loser of the final rename keeps the winner's.
pub fn cached_synthetic_dir(root: &Path, opts: &SynthOptions) -> Result<PathBuf> {
    let dir = root.join(format!("synthetic-{}-seed{}", opts.preset, opts.seed));
    // Folders appear complete or not at all (see write_synthetic).
    if dir.join("model.safetensors").is_file() {
        return Ok(dir);
    }
    eprintln!(
        "kvlab: building the default model once: a synthetic {} checkpoint (random weights, seed {}) in {}",
        opts.preset,
        opts.seed,
        dir.display()
    );
    match write_synthetic(opts, &dir) {
        Ok(()) => Ok(dir),
        Err(_) if dir.join("model.safetensors").is_file() => Ok(dir),
        Err(e) => Err(e),
    }
}

/// Written beside the weights so that reports can say the weights are random.
const MARKER_FILE: &str = "kvlab-synthetic.json";

/// True for a folder written by [`write_synthetic`].
pub fn is_synthetic(dir: &Path) -> bool {
    dir.join(MARKER_FILE).is_file()
}

fn write_files(opts: &SynthOptions, dir: &Path) -> Result<()> {
    write_json(&dir.join("config.json"), &config_json(opts.preset))?;
    write_json(
        &dir.join("generation_config.json"),
        &generation_config_json(),
    )?;
    write_json(&dir.join("tokenizer_config.json"), &tokenizer_config_json())?;
    write_json(
        &dir.join(MARKER_FILE),
        &serde_json::json!({ "preset": opts.preset.name(), "seed": opts.seed }),
    )?;
    let readme = dir.join("README.md");
    fs::write(&readme, readme_text(opts))
        .with_context(|| format!("writing {}", readme.display()))?;
    write_tokenizer_json(&dir.join("tokenizer.json"))?;
    write_weights(opts, &dir.join("model.safetensors"))
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn readme_text(opts: &SynthOptions) -> String {
    format!(
        "# Synthetic {preset} checkpoint (random weights)\n\n\
         Written by `kvlab synth --preset {preset} --seed {seed}`. The weights are RANDOM: \
         bf16 matrices drawn from N(0, {INIT_STD}) and RMSNorm weights of exactly 1.0, so the \
         model produces gibberish at the real model's cost. It exists to run and measure \
         kvlab without downloading the real checkpoint.\n\n\
         The tokenizer is Llama 3's rebuilt from the cl100k_base ranks bundled by tiktoken-rs \
         (the first 100,256 ranks of Llama 3's vocabulary) plus the 256 special tokens at \
         128000..128255. Ids 100256..127999 have no token here. There is no chat template, \
         as in the base model.\n",
        preset = opts.preset,
        seed = opts.seed,
    )
}

// ---------------------------------------------------------------------------------------------
// Weights

/// Elements per RNG stream: each block of a tensor has its own seeded generator, so blocks can be
/// generated in any order, on any number of threads, with the same bytes.
const BLOCK_ELEMS: usize = 1 << 20;
/// Blocks generated in parallel before they are written (64 MiB of bf16 in flight).
const BLOCKS_IN_FLIGHT: usize = 32;
/// The header is padded so the data section starts at a multiple of this (from the file start).
/// safetensors allows no gaps between tensors, so each tensor starts aligned because every
/// preset's tensors are a multiple of 64 bytes (all dims multiples of 32).
const DATA_ALIGN: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Init {
    Normal,
    Ones,
}

struct TensorSpec {
    name: String,
    shape: Vec<usize>,
    init: Init,
}

impl TensorSpec {
    fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The tensors of a tied HF Llama checkpoint, in file order (the model's order).
fn tensor_specs(d: Dims) -> Vec<TensorSpec> {
    let q_dim = d.heads * d.head_dim;
    let kv_dim = d.kv_heads * d.head_dim;
    let spec = |name: String, shape: Vec<usize>, init| TensorSpec { name, shape, init };
    let mut specs = vec![spec(
        "model.embed_tokens.weight".into(),
        vec![VOCAB_SIZE, d.hidden],
        Init::Normal,
    )];
    for i in 0..d.layers {
        let p = format!("model.layers.{i}");
        specs.extend([
            spec(
                format!("{p}.input_layernorm.weight"),
                vec![d.hidden],
                Init::Ones,
            ),
            spec(
                format!("{p}.self_attn.q_proj.weight"),
                vec![q_dim, d.hidden],
                Init::Normal,
            ),
            spec(
                format!("{p}.self_attn.k_proj.weight"),
                vec![kv_dim, d.hidden],
                Init::Normal,
            ),
            spec(
                format!("{p}.self_attn.v_proj.weight"),
                vec![kv_dim, d.hidden],
                Init::Normal,
            ),
            spec(
                format!("{p}.self_attn.o_proj.weight"),
                vec![d.hidden, q_dim],
                Init::Normal,
            ),
            spec(
                format!("{p}.post_attention_layernorm.weight"),
                vec![d.hidden],
                Init::Ones,
            ),
            spec(
                format!("{p}.mlp.gate_proj.weight"),
                vec![d.intermediate, d.hidden],
                Init::Normal,
            ),
            spec(
                format!("{p}.mlp.up_proj.weight"),
                vec![d.intermediate, d.hidden],
                Init::Normal,
            ),
            spec(
                format!("{p}.mlp.down_proj.weight"),
                vec![d.hidden, d.intermediate],
                Init::Normal,
            ),
        ]);
    }
    specs.push(spec("model.norm.weight".into(), vec![d.hidden], Init::Ones));
    specs
}

/// One RNG stream's worth of a tensor.
struct Block<'a> {
    tensor: &'a TensorSpec,
    index: u64,
    elems: usize,
}

/// The generator of one block, a function of (seed, tensor name, block index) only.
/// StdRng's algorithm is pinned by Cargo.lock; a rand upgrade may change the bytes (not the law).
fn block_rng(seed: u64, tensor: &str, index: u64) -> StdRng {
    let mut h = Sha256::new();
    h.update(b"kvlab-synth\0");
    h.update(seed.to_le_bytes());
    h.update(tensor.as_bytes());
    h.update([0]);
    h.update(index.to_le_bytes());
    StdRng::from_seed(h.finalize().into())
}

/// Fills `out` with the block's bf16 values, little-endian: [elems * 2] bytes.
fn fill_block(seed: u64, normal: &Normal<f32>, block: &Block, out: &mut Vec<u8>) {
    out.clear();
    out.resize(block.elems * 2, 0);
    match block.tensor.init {
        Init::Ones => {
            for v in out.chunks_exact_mut(2) {
                v.copy_from_slice(&bf16::ONE.to_le_bytes());
            }
        }
        Init::Normal => {
            let mut rng = block_rng(seed, &block.tensor.name, block.index);
            for v in out.chunks_exact_mut(2) {
                v.copy_from_slice(&bf16::from_f32(normal.sample(&mut rng)).to_le_bytes());
            }
        }
    }
}

/// The safetensors header (8-byte length + JSON padded with spaces) for tensors laid out
/// back to back in `specs` order; the padding puts the data section at a multiple of DATA_ALIGN.
fn safetensors_header(specs: &[TensorSpec]) -> Vec<u8> {
    let mut entries = serde_json::Map::new();
    entries.insert("__metadata__".into(), json!({ "format": "pt" }));
    let mut offset = 0usize;
    for s in specs {
        let end = offset + s.numel() * 2;
        entries.insert(
            s.name.clone(),
            json!({ "dtype": "BF16", "shape": s.shape, "data_offsets": [offset, end] }),
        );
        offset = end;
    }
    let mut header = Value::Object(entries).to_string().into_bytes();
    let padded_len = (8 + header.len()).next_multiple_of(DATA_ALIGN) - 8;
    header.resize(padded_len, b' ');
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    out
}

fn write_weights(opts: &SynthOptions, path: &Path) -> Result<()> {
    let specs = tensor_specs(opts.preset.dims());
    let normal = Normal::new(0.0f32, INIT_STD as f32).context("normal distribution")?;
    let blocks: Vec<Block> = specs
        .iter()
        .flat_map(|t| {
            let n = t.numel();
            (0..n.div_ceil(BLOCK_ELEMS)).map(move |b| Block {
                tensor: t,
                index: b as u64,
                elems: BLOCK_ELEMS.min(n - b * BLOCK_ELEMS),
            })
        })
        .collect();
    let total_bytes: u64 = specs.iter().map(|t| t.numel() as u64 * 2).sum();

    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut file = BufWriter::new(file);
    let progress = ProgressBar::with_draw_target(Some(total_bytes), ProgressDrawTarget::stderr())
        .with_style(
            ProgressStyle::with_template(
                "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )?
            .progress_chars("=> "),
        )
        .with_message("writing model.safetensors");
    let write_err = || format!("writing {}", path.display());
    file.write_all(&safetensors_header(&specs))
        .with_context(write_err)?;
    // Double buffering: one window is written while the next is generated.
    let windows: Vec<&[Block]> = blocks.chunks(BLOCKS_IN_FLIGHT).collect();
    let fill_window = |buffers: &mut [Vec<u8>], window: &[Block]| {
        buffers
            .par_iter_mut()
            .zip(window)
            .for_each(|(buf, block)| fill_block(opts.seed, &normal, block, buf));
    };
    let mut filled: Vec<Vec<u8>> = vec![Vec::new(); BLOCKS_IN_FLIGHT];
    let mut spare: Vec<Vec<u8>> = vec![Vec::new(); BLOCKS_IN_FLIGHT];
    if let Some(first) = windows.first() {
        fill_window(&mut filled, first);
    }
    for (i, window) in windows.iter().enumerate() {
        let (written, ()) = rayon::join(
            || -> std::io::Result<()> {
                for buf in &filled[..window.len()] {
                    file.write_all(buf)?;
                    progress.inc(buf.len() as u64);
                }
                Ok(())
            },
            || {
                if let Some(next) = windows.get(i + 1) {
                    fill_window(&mut spare, next);
                }
            },
        );
        written.with_context(write_err)?;
        std::mem::swap(&mut filled, &mut spare);
    }
    file.into_inner()
        .map_err(|e| e.into_error())
        .and_then(|f| f.sync_data())
        .with_context(write_err)?;
    progress.finish_and_clear();
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Tokenizer

/// Llama 3's pre-tokenizer regex (cl100k_base's, in the form Llama 3's tokenizer.json states it).
pub(crate) const LLAMA3_SPLIT_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The name of Llama 3's special token `id` (128000..128256): ten named tokens among
/// `<|reserved_special_token_N|>`, which counts up through the gaps.
fn special_token_name(id: u32) -> String {
    match id - FIRST_SPECIAL_ID {
        0 => BOS_TOKEN.into(),
        1 => EOS_TOKEN.into(),
        2 => "<|reserved_special_token_0|>".into(),
        3 => "<|reserved_special_token_1|>".into(),
        4 => "<|finetune_right_pad_id|>".into(),
        5 => "<|reserved_special_token_2|>".into(),
        6 => "<|start_header_id|>".into(),
        7 => "<|end_header_id|>".into(),
        8 => "<|eom_id|>".into(),
        9 => "<|eot_id|>".into(),
        10 => "<|python_tag|>".into(),
        k => format!("<|reserved_special_token_{}|>", k - 8),
    }
}

/// GPT-2's reversible map from bytes to printable characters, which byte-level BPE vocabularies
/// are written in: printable Latin-1 bytes map to themselves, the other 68 to U+0100 onwards.
fn byte_to_char_table() -> [char; 256] {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    let mut table = ['\0'; 256];
    let mut next_unprintable = 256u32;
    for b in 0..256u32 {
        let c = if printable(b) {
            b
        } else {
            next_unprintable += 1;
            next_unprintable - 1
        };
        table[b as usize] = char::from_u32(c).expect("U+0000..U+0143 are all chars");
    }
    table
}

/// cl100k_base's mergeable ranks: element `r` is the bytes of rank `r` (0..100256).
fn cl100k_ranks() -> Result<Vec<Vec<u8>>> {
    let bpe = tiktoken_rs::cl100k_base().context("loading tiktoken-rs's cl100k_base")?;
    // cl100k's ordinary ranks are 0..100256 without gaps; its own specials start at 100257.
    (0..100_256u32)
        .map(|rank| {
            bpe.decode_bytes(&[rank])
                .with_context(|| format!("cl100k_base has no rank {rank}"))
        })
        .collect()
}

/// The merge list that makes HF's BPE reproduce tiktoken: tiktoken repeatedly joins the adjacent
/// pair whose concatenation has the lowest rank, so every split of a token into two tokens is a
/// merge, ordered by the rank of the result (ties between splits of one token: by the ranks of
/// the left, then the right part). Returns (left rank, right rank) pairs in priority order.
fn merges_from_ranks(ranks: &[Vec<u8>]) -> Vec<(u32, u32)> {
    let rank_of: HashMap<&[u8], u32> = ranks
        .iter()
        .enumerate()
        .map(|(r, bytes)| (bytes.as_slice(), r as u32))
        .collect();
    let mut merges = Vec::new();
    for token in ranks {
        let mut splits: Vec<(u32, u32)> = (1..token.len())
            .filter_map(|i| Some((*rank_of.get(&token[..i])?, *rank_of.get(&token[i..])?)))
            .collect();
        splits.sort_unstable();
        merges.extend(splits);
    }
    merges
}

/// Serializes `(token, id)` pairs as a JSON object in the given (id) order.
struct VocabInIdOrder<'a>(&'a [(String, u32)]);

impl Serialize for VocabInIdOrder<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(token, id)| (token, id)))
    }
}

#[derive(Serialize)]
struct BpeModelJson<'a> {
    r#type: &'static str,
    dropout: Option<f32>,
    unk_token: Option<String>,
    continuing_subword_prefix: Option<String>,
    end_of_word_suffix: Option<String>,
    fuse_unk: bool,
    byte_fallback: bool,
    /// A pre-token that is itself a vocabulary entry is kept whole, as tiktoken does.
    ignore_merges: bool,
    vocab: VocabInIdOrder<'a>,
    merges: Vec<[&'a str; 2]>,
}

/// tokenizer.json, laid out as Llama 3's: fields in its order, the same pre-tokenizer, decoder
/// and post-processor (BOS prepended).
#[derive(Serialize)]
struct TokenizerJson<'a> {
    version: &'static str,
    truncation: Option<()>,
    padding: Option<()>,
    added_tokens: Vec<Value>,
    normalizer: Option<()>,
    pre_tokenizer: Value,
    post_processor: Value,
    decoder: Value,
    model: BpeModelJson<'a>,
}

fn write_tokenizer_json(path: &Path) -> Result<()> {
    let ranks = cl100k_ranks()?;
    let byte_char = byte_to_char_table();
    let specials: Vec<(String, u32)> = (FIRST_SPECIAL_ID..VOCAB_SIZE as u32)
        .map(|id| (special_token_name(id), id))
        .collect();
    // The specials are in the model vocabulary too: HF gives an added token a fresh id
    // (vocabulary size and up) unless the model already knows it, and this vocabulary has a gap.
    let vocab: Vec<(String, u32)> = ranks
        .iter()
        .enumerate()
        .map(|(r, bytes)| {
            let token = bytes.iter().map(|&b| byte_char[b as usize]).collect();
            (token, r as u32)
        })
        .chain(specials.iter().cloned())
        .collect();
    let merges = merges_from_ranks(&ranks)
        .into_iter()
        .map(|(l, r)| [vocab[l as usize].0.as_str(), vocab[r as usize].0.as_str()])
        .collect();

    let added_tokens = specials
        .iter()
        .map(|(content, id)| {
            json!({
                "id": id, "content": content, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true
            })
        })
        .collect();
    // Llama 3's pair template gives both sequences type id 0.
    let bos = json!({ "SpecialToken": { "id": BOS_TOKEN, "type_id": 0 } });
    let seq = |id: &str| json!({ "Sequence": { "id": id, "type_id": 0 } });
    let tokenizer = TokenizerJson {
        version: "1.0",
        truncation: None,
        padding: None,
        added_tokens,
        normalizer: None,
        pre_tokenizer: json!({
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": { "Regex": LLAMA3_SPLIT_REGEX },
                    "behavior": "Isolated",
                    "invert": false
                },
                { "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false }
            ]
        }),
        post_processor: json!({
            "type": "TemplateProcessing",
            "single": [bos, seq("A")],
            "pair": [bos, seq("A"), bos, seq("B")],
            "special_tokens": {
                BOS_TOKEN: { "id": BOS_TOKEN, "ids": [BOS_ID], "tokens": [BOS_TOKEN] }
            }
        }),
        decoder: json!({
            "type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true
        }),
        model: BpeModelJson {
            r#type: "BPE",
            dropout: None,
            unk_token: None,
            continuing_subword_prefix: None,
            end_of_word_suffix: None,
            fuse_unk: false,
            byte_fallback: false,
            ignore_merges: true,
            vocab: VocabInIdOrder(&vocab),
            merges,
        },
    };
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut file = BufWriter::new(file);
    serde_json::to_writer(&mut file, &tokenizer)
        .map_err(std::io::Error::from)
        .and_then(|()| file.flush())
        .with_context(|| format!("writing {}", path.display()))
}
