//! A GGUF file of llama.cpp's `llama` architecture as the runtime's [`Config`] and weights.
//!
//! The metadata keys become a config.json ([`HfConfig`]) the way transformers' GGUF loader maps
//! them, so that one conversion ([`Config::from_hf`]) checks every model. Tensors are found by
//! their llama.cpp names ([`gguf_tensor_name`], the one place that maps names), checked for
//! presence, type and shape, and dequantized into the weight dtype asked for.
//!
//! llama.cpp's converter permutes the rows of Q and K: within each head it interleaves the two
//! halves that Hugging Face's `rotate_half` RoPE pairs (rows `j` and `j + head_dim/2`), so that
//! its RoPE rotates adjacent rows. Row `2j + i` of a GGUF head is row `i · head_dim/2 + j` of the
//! Hugging Face head (i ∈ {0, 1}); [`hf_row_source`] undoes it, so the one forward pass runs
//! unchanged.

use super::quant::{dequantize_row, GgmlType};
use super::GgufFile;
use crate::model::config::{Config, HfConfig, TokenIds};
use crate::model::weights::{HostTensor, TensorSource};
use crate::model::DType;
use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use std::collections::BTreeMap;

const ARCHITECTURE: &str = "llama";

/// Hugging Face's names of the per-layer weights and llama.cpp's (`blk.N.` + name + `.weight`).
const LAYER_TENSORS: [(&str, &str); 9] = [
    ("input_layernorm", "attn_norm"),
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("post_attention_layernorm", "ffn_norm"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
];

/// The whole-model weights, by both names.
const GLOBAL_TENSORS: [(&str, &str); 3] = [
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
];

/// The GGUF name of the Hugging Face tensor `hf_name`, or None for a name the llama layout lacks.
pub fn gguf_tensor_name(hf_name: &str) -> Option<String> {
    if let Some((_, gguf)) = GLOBAL_TENSORS.iter().find(|(hf, _)| *hf == hf_name) {
        return Some(gguf.to_string());
    }
    let rest = hf_name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let module = rest.strip_suffix(".weight")?;
    let (_, gguf) = LAYER_TENSORS.iter().find(|(hf, _)| *hf == module)?;
    Some(format!("blk.{layer}.{gguf}.weight"))
}

/// The metadata key `llama.<name>`.
fn key(name: &str) -> String {
    format!("{ARCHITECTURE}.{name}")
}

/// The model's shape from the metadata, as a config.json would state it.
pub fn hf_config(file: &GgufFile) -> Result<HfConfig> {
    let path = file.path.display();
    let arch = file.get_str("general.architecture")?;
    if arch != ARCHITECTURE {
        bail!("{path}: general.architecture is {arch:?}; kvlab runs {ARCHITECTURE:?} models");
    }
    let heads = file.get_usize(&key("attention.head_count"))?;
    let head_dim = file.optional(&key("attention.key_length"), GgufFile::get_usize)?;
    if let Some(value_len) = file.optional(&key("attention.value_length"), GgufFile::get_usize)? {
        if Some(value_len) != head_dim {
            bail!(
                "{path}: {} is {value_len} but {} is {head_dim:?}; kvlab needs them equal",
                key("attention.value_length"),
                key("attention.key_length")
            );
        }
    }
    let hidden = file.get_usize(&key("embedding_length"))?;
    let rotary = file.optional(&key("rope.dimension_count"), GgufFile::get_usize)?;
    let rotated = head_dim.unwrap_or(hidden / heads.max(1));
    if rotary.is_some_and(|r| r != rotated) {
        bail!(
            "{path}: {} is {rotary:?} but heads have {rotated} dims; kvlab rotates whole heads",
            key("rope.dimension_count")
        );
    }
    if let Some(scaling) = file.optional(&key("rope.scaling.type"), GgufFile::get_str)? {
        if scaling != "none" {
            bail!(
                "{path}: {} is {scaling:?}; kvlab reads unscaled RoPE in GGUF files",
                key("rope.scaling.type")
            );
        }
    }
    if file.tensor_info("rope_freqs.weight").is_some() {
        bail!(
            "{path}: tensor rope_freqs.weight (per-frequency RoPE factors, Llama 3.1+) is not \
             supported in GGUF files; use the model's Hugging Face folder"
        );
    }
    let vocab_size = vocab_size(file)?;
    let token_id =
        |name: &str| file.optional(&format!("tokenizer.ggml.{name}"), GgufFile::get_usize);
    let bos = token_id("bos_token_id")?;
    let mut eos: Vec<u32> = Vec::new();
    for name in ["eos_token_id", "eot_token_id"] {
        if let Some(id) = token_id(name)? {
            let id = u32::try_from(id).with_context(|| format!("{path}: {name} {id}"))?;
            if !eos.contains(&id) {
                eos.push(id);
            }
        }
    }
    Ok(HfConfig {
        architectures: vec!["LlamaForCausalLM".to_string()],
        model_type: Some(ARCHITECTURE.to_string()),
        hidden_size: hidden,
        intermediate_size: file.get_usize(&key("feed_forward_length"))?,
        num_hidden_layers: file.get_usize(&key("block_count"))?,
        num_attention_heads: heads,
        num_key_value_heads: file.optional(&key("attention.head_count_kv"), GgufFile::get_usize)?,
        head_dim,
        vocab_size,
        rms_norm_eps: file.get_f64(&key("attention.layer_norm_rms_epsilon"))?,
        tie_word_embeddings: file.tensor_info("output.weight").is_none(),
        max_position_embeddings: file.optional(&key("context_length"), GgufFile::get_usize)?,
        bos_token_id: bos.map(|b| b as u32),
        eos_token_id: Some(TokenIds::Many(eos)),
        attention_bias: false,
        mlp_bias: false,
        hidden_act: Some("silu".to_string()),
        rope_theta: Some(
            file.optional(&key("rope.freq_base"), GgufFile::get_f64)?
                .unwrap_or(10000.0),
        ),
        rope_scaling: None,
        rope_parameters: None,
    })
}

/// The vocabulary's size: the tokens of the tokenizer, which `llama.vocab_size` (when present) and
/// the embedding's rows must both equal.
fn vocab_size(file: &GgufFile) -> Result<usize> {
    let path = file.path.display();
    let tokens = file.get_array("tokenizer.ggml.tokens")?.len();
    if let Some(stated) = file.optional(&key("vocab_size"), GgufFile::get_usize)? {
        if stated != tokens {
            bail!(
                "{path}: {} is {stated} but tokenizer.ggml.tokens holds {tokens} tokens",
                key("vocab_size")
            );
        }
    }
    if let Some(embd) = file.tensor_info("token_embd.weight") {
        let rows = embd.dims.get(1).copied().unwrap_or(0);
        if rows != tokens as u64 {
            bail!(
                "{path}: the vocabulary has {tokens} tokens (tokenizer.ggml.tokens) but \
                 token_embd.weight has {rows} rows (dims {:?})",
                embd.dims
            );
        }
    }
    Ok(tokens)
}

/// The runtime config of a llama GGUF file.
pub fn config(file: &GgufFile) -> Result<Config> {
    Config::from_hf(&hf_config(file)?)
        .with_context(|| format!("unsupported model in {}", file.path.display()))
}

/// Which GGUF row holds row `row` of a Hugging Face Q or K matrix with heads of `head_dim` rows
/// (see the module's comment).
fn hf_row_source(row: usize, head_dim: usize) -> usize {
    let half = head_dim / 2;
    let (head, within) = (row / head_dim, row % head_dim);
    let (i, j) = (within / half, within % half);
    head * head_dim + 2 * j + i
}

/// The tensors of a GGUF file, looked up by their Hugging Face names and dequantized on the way.
pub struct GgufWeights<'a> {
    file: &'a GgufFile,
    config: &'a Config,
    dtype: DType,
}

impl<'a> GgufWeights<'a> {
    /// `dtype`: what every tensor is dequantized to.
    pub fn new(file: &'a GgufFile, config: &'a Config, dtype: DType) -> Self {
        GgufWeights {
            file,
            config,
            dtype,
        }
    }
}

impl TensorSource for GgufWeights<'_> {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<HostTensor> {
        let path = self.file.path.display();
        let gguf_name = gguf_tensor_name(name)
            .with_context(|| format!("tensor {name} has no llama.cpp name"))?;
        let info = self.file.tensor_info(&gguf_name).with_context(|| {
            format!("tensor {gguf_name} ({name}, expected shape {shape:?}) is missing from {path}")
        })?;
        if info.shape() != shape {
            bail!(
                "tensor {gguf_name} ({name}) in {path} has shape {:?} (GGUF dims {:?}), expected \
                 {shape:?}",
                info.shape(),
                info.dims
            );
        }
        let (ty, data) = self.file.tensor_data(info)?;
        let cols = *shape.last().expect("a checked shape has a dim");
        let rows = shape.iter().product::<usize>() / cols;
        let row_bytes = ty.row_bytes(cols)?;
        let permuted_heads =
            if gguf_name.ends_with("attn_q.weight") || gguf_name.ends_with("attn_k.weight") {
                Some(self.config.head_dim)
            } else {
                None
            };
        let source_row = |r: usize| permuted_heads.map_or(r, |hd| hf_row_source(r, hd));
        let elem = self.dtype.size_bytes();
        HostTensor::owned(name, self.dtype, shape.to_vec(), &self.file.path, |out| {
            out.par_chunks_mut(cols * elem).enumerate().for_each_init(
                || vec![0f32; cols],
                |values, (r, out)| {
                    let src = source_row(r);
                    dequantize_row(ty, &data[src * row_bytes..(src + 1) * row_bytes], values);
                    write_values(values, self.dtype, out);
                },
            );
            debug_assert_eq!(rows * cols * elem, out.len());
        })
    }

    fn describe(&self) -> String {
        self.file.path.display().to_string()
    }
}

/// `values` as little-endian `dtype` into `out`.
fn write_values(values: &[f32], dtype: DType, out: &mut [u8]) {
    match dtype {
        DType::F32 => out
            .chunks_exact_mut(4)
            .zip(values)
            .for_each(|(o, v)| o.copy_from_slice(&v.to_le_bytes())),
        DType::BF16 => out
            .chunks_exact_mut(2)
            .zip(values)
            .for_each(|(o, v)| o.copy_from_slice(&half::bf16::from_f32(*v).to_le_bytes())),
        DType::F16 => out
            .chunks_exact_mut(2)
            .zip(values)
            .for_each(|(o, v)| o.copy_from_slice(&half::f16::from_f32(*v).to_le_bytes())),
    }
}

/// How the file's tensors are stored, for reports: `"Q4_1 ×182, F32 ×61, Q8_0 ×1"` (most first).
pub fn storage_summary(file: &GgufFile) -> String {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for t in &file.tensors {
        let name = GgmlType::from_id(t.type_id)
            .map(|t| t.name().to_string())
            .unwrap_or_else(|_| format!("type {}", t.type_id));
        *counts.entry(name).or_default() += 1;
    }
    let mut counts: Vec<_> = counts.into_iter().collect();
    counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    counts
        .iter()
        .map(|(name, n)| format!("{name} ×{n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_weight_name_maps_to_a_llama_cpp_name() {
        assert_eq!(
            gguf_tensor_name("model.layers.12.self_attn.k_proj.weight").as_deref(),
            Some("blk.12.attn_k.weight")
        );
        assert_eq!(
            gguf_tensor_name("model.layers.0.post_attention_layernorm.weight").as_deref(),
            Some("blk.0.ffn_norm.weight")
        );
        assert_eq!(
            gguf_tensor_name("lm_head.weight").as_deref(),
            Some("output.weight")
        );
        assert_eq!(gguf_tensor_name("model.layers.x.mlp.up_proj.weight"), None);
        assert_eq!(gguf_tensor_name("model.layers.1.mlp.act.weight"), None);
    }

    #[test]
    fn q_and_k_rows_come_back_from_llama_cpp_s_interleaving() {
        // llama.cpp's converter: reshape(heads, 2, hd/2, cols).swapaxes(1, 2): GGUF row
        // h·hd + 2j + i holds Hugging Face row h·hd + i·hd/2 + j.
        let (heads, hd) = (3, 8);
        let mut gguf_of_hf = vec![usize::MAX; heads * hd];
        for h in 0..heads {
            for i in 0..2 {
                for j in 0..hd / 2 {
                    gguf_of_hf[h * hd + i * hd / 2 + j] = h * hd + 2 * j + i;
                }
            }
        }
        let ours: Vec<usize> = (0..heads * hd).map(|r| hf_row_source(r, hd)).collect();
        assert_eq!(ours, gguf_of_hf);
    }
}
