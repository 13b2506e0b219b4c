//! The model's shape. [`HfConfig`] is config.json as found on disk (transformers 4.x or 5.x);
//! [`Config`] is what the runtime uses. The conversion is where the 4.x/5.x differences end.

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::path::Path;

/// config.json of a LlamaForCausalLM, both generations of the format.
#[derive(Debug, Clone, Deserialize)]
pub struct HfConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    pub model_type: Option<String>,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: Option<usize>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    pub hidden_act: Option<String>,
    /// transformers 4.x: `rope_theta` + optional `rope_scaling`.
    pub rope_theta: Option<f64>,
    pub rope_scaling: Option<RopeParameters>,
    /// transformers 5.x: `rope_parameters` holds theta and the scaling together.
    pub rope_parameters: Option<RopeParameters>,
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}

/// One id or a list of ids (eos_token_id takes both forms).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct RopeParameters {
    /// 4.x wrote `type`, later `rope_type`.
    #[serde(alias = "type")]
    pub rope_type: Option<String>,
    pub rope_theta: Option<f64>,
    pub factor: Option<f64>,
    pub low_freq_factor: Option<f64>,
    pub high_freq_factor: Option<f64>,
    pub original_max_position_embeddings: Option<f64>,
}

/// Rotary embedding frequencies, resolved.
#[derive(Debug, Clone, PartialEq)]
pub enum Rope {
    Default {
        theta: f64,
    },
    /// Llama 3.1+ frequency scaling (transformers' `_compute_llama3_parameters`).
    Llama3 {
        theta: f64,
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// The runtime shape of a Llama model.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f32,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
    pub rope: Rope,
    pub bos_token_id: Option<u32>,
    /// From config.json and generation_config.json together.
    pub stop_token_ids: Vec<u32>,
}

#[derive(Debug, Clone, Deserialize)]
struct GenerationConfig {
    eos_token_id: Option<TokenIds>,
}

impl Config {
    /// Reads `config.json` (and `generation_config.json` when present) from a model folder.
    pub fn from_dir(dir: &Path) -> Result<Config> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let hf: HfConfig = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a Llama config.json", path.display()))?;
        let mut config =
            Config::from_hf(&hf).with_context(|| format!("unsupported {}", path.display()))?;
        let gen_path = dir.join("generation_config.json");
        if gen_path.exists() {
            let text = std::fs::read_to_string(&gen_path)
                .with_context(|| format!("cannot read {}", gen_path.display()))?;
            let gen: GenerationConfig = serde_json::from_str(&text)
                .with_context(|| format!("{} is malformed", gen_path.display()))?;
            for id in gen.eos_token_id.map(|ids| ids.to_vec()).unwrap_or_default() {
                if !config.stop_token_ids.contains(&id) {
                    config.stop_token_ids.push(id);
                }
            }
        }
        Ok(config)
    }

    /// The config of a model folder or a `.gguf` file.
    pub fn from_model_path(path: &Path) -> Result<Config> {
        if super::is_gguf(path) {
            super::gguf::llama::config(&super::gguf::GgufFile::open(path)?)
        } else {
            Config::from_dir(path)
        }
    }

    pub fn from_hf(hf: &HfConfig) -> Result<Config> {
        if let Some(mt) = &hf.model_type {
            if mt != "llama" {
                bail!("model_type is {mt:?}; kvlab runs Llama models (model_type \"llama\")");
            }
        }
        if hf.attention_bias || hf.mlp_bias {
            bail!("attention_bias / mlp_bias are not supported (Llama has no biases)");
        }
        if let Some(act) = &hf.hidden_act {
            if act != "silu" {
                bail!("hidden_act is {act:?}; only \"silu\" (SwiGLU) is supported");
            }
        }
        let num_kv_heads = hf.num_key_value_heads.unwrap_or(hf.num_attention_heads);
        if hf.num_attention_heads == 0 || num_kv_heads == 0 {
            bail!("num_attention_heads and num_key_value_heads must be positive");
        }
        if !hf.num_attention_heads.is_multiple_of(num_kv_heads) {
            bail!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({num_kv_heads})",
                hf.num_attention_heads
            );
        }
        let head_dim = hf
            .head_dim
            .unwrap_or(hf.hidden_size / hf.num_attention_heads);
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            bail!("head_dim {head_dim} must be even and positive (RoPE rotates pairs)");
        }
        let rope = resolve_rope(hf)?;
        Ok(Config {
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_layers: hf.num_hidden_layers,
            num_heads: hf.num_attention_heads,
            num_kv_heads,
            head_dim,
            vocab_size: hf.vocab_size,
            rms_norm_eps: hf.rms_norm_eps as f32,
            tie_word_embeddings: hf.tie_word_embeddings,
            max_position_embeddings: hf.max_position_embeddings.unwrap_or(usize::MAX),
            rope,
            bos_token_id: hf.bos_token_id,
            stop_token_ids: hf
                .eos_token_id
                .as_ref()
                .map(|ids| ids.to_vec())
                .unwrap_or_default(),
        })
    }

    /// Query heads that share one KV head.
    pub fn gqa_group(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    /// Width of the query projection (may differ from hidden_size when head_dim is explicit).
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Parameters that a forward pass reads once per token (embedding row aside).
    pub fn num_parameters(&self) -> usize {
        let per_layer = 2 * self.hidden_size
            + self.hidden_size * (self.q_dim() + 2 * self.kv_dim())
            + self.q_dim() * self.hidden_size
            + 3 * self.hidden_size * self.intermediate_size;
        let lm_head = if self.tie_word_embeddings {
            0
        } else {
            self.vocab_size * self.hidden_size
        };
        self.vocab_size * self.hidden_size
            + self.num_layers * per_layer
            + self.hidden_size
            + lm_head
    }

    /// RoPE inverse frequencies, [head_dim / 2], as transformers computes them in float32.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let dim = self.head_dim;
        let base_freq = |theta: f64, i: usize| -> f32 {
            // transformers: 1 / theta ** (arange(0, dim, 2).float() / dim), all in float32.
            let exponent = (i as f32 * 2.0) / dim as f32;
            1.0 / (theta as f32).powf(exponent)
        };
        match self.rope {
            Rope::Default { theta } => (0..dim / 2).map(|i| base_freq(theta, i)).collect(),
            Rope::Llama3 {
                theta,
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old_len,
            } => (0..dim / 2)
                .map(|i| {
                    let inv_freq = base_freq(theta, i) as f64;
                    let low_freq_wavelen = old_len / low_freq_factor;
                    let high_freq_wavelen = old_len / high_freq_factor;
                    let wavelen = 2.0 * std::f64::consts::PI / inv_freq;
                    if wavelen > low_freq_wavelen {
                        (inv_freq / factor) as f32
                    } else if wavelen < high_freq_wavelen {
                        inv_freq as f32
                    } else {
                        let smooth = (old_len / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        ((1.0 - smooth) * inv_freq / factor + smooth * inv_freq) as f32
                    }
                })
                .collect(),
        }
    }
}

fn resolve_rope(hf: &HfConfig) -> Result<Rope> {
    // 5.x puts everything in rope_parameters; 4.x splits theta and scaling.
    let params = hf.rope_parameters.as_ref().or(hf.rope_scaling.as_ref());
    let theta = params
        .and_then(|p| p.rope_theta)
        .or(hf.rope_theta)
        .unwrap_or(10000.0);
    let rope_type = params
        .and_then(|p| p.rope_type.clone())
        .unwrap_or_else(|| "default".to_string());
    match rope_type.as_str() {
        "default" => Ok(Rope::Default { theta }),
        "llama3" => {
            let p = params.context("rope type llama3 needs its parameters")?;
            let need = |v: Option<f64>, name: &str| {
                v.with_context(|| format!("rope type llama3 needs `{name}`"))
            };
            let rope = Rope::Llama3 {
                theta,
                factor: need(p.factor, "factor")?,
                low_freq_factor: need(p.low_freq_factor, "low_freq_factor")?,
                high_freq_factor: need(p.high_freq_factor, "high_freq_factor")?,
                original_max_position_embeddings: need(
                    p.original_max_position_embeddings,
                    "original_max_position_embeddings",
                )?,
            };
            if let Rope::Llama3 {
                low_freq_factor,
                high_freq_factor,
                ..
            } = rope
            {
                if high_freq_factor <= low_freq_factor {
                    bail!("llama3 rope: high_freq_factor must exceed low_freq_factor");
                }
            }
            Ok(rope)
        }
        other => bail!("rope type {other:?} is not supported (supported: default, llama3)"),
    }
}
