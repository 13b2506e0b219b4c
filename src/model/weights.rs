//! Checkpoint loading: safetensors files mapped with mmap, every tensor checked for presence,
//! dtype and shape before any compute. Tensors stay in their stored dtype in the mapping.
//! GGUF files (`gguf::llama`) go through the same checks; their tensors are dequantized into
//! memory that the [`HostTensor`] owns.

use super::config::Config;
use super::DType;
use anyhow::{bail, Context, Result};
use memmap2::{Mmap, MmapMut, MmapOptions};
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One tensor of the checkpoint: a byte range of a mapped file (little-endian, row-major).
#[derive(Clone)]
pub struct HostTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub file: PathBuf,
    map: Arc<Mmap>,
    start: usize,
    len: usize,
}

impl std::fmt::Debug for HostTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {:?} {:?}", self.name, self.dtype, self.shape)
    }
}

impl HostTensor {
    /// A tensor of `shape` whose bytes `fill` writes (dequantized weights): an anonymous mapping,
    /// read-only once filled, and on Linux backed by transparent huge pages where the kernel
    /// allows, as a file in the page cache may be (decode streams 2 MiB pages faster).
    pub fn owned(
        name: &str,
        dtype: DType,
        shape: Vec<usize>,
        file: &Path,
        fill: impl FnOnce(&mut [u8]),
    ) -> Result<HostTensor> {
        let len = shape.iter().product::<usize>() * dtype.size_bytes();
        let mut map = MmapMut::map_anon(len.max(1))
            .with_context(|| format!("cannot allocate {len} bytes for tensor {name}"))?;
        #[cfg(target_os = "linux")]
        {
            // Advice only: without huge pages the tensor still works.
            let _ = map.advise(memmap2::Advice::HugePage);
        }
        fill(&mut map[..len]);
        Ok(HostTensor {
            name: name.to_string(),
            dtype,
            shape,
            file: file.to_path_buf(),
            map: Arc::new(map.make_read_only()?),
            start: 0,
            len,
        })
    }

    pub fn bytes(&self) -> &[u8] {
        &self.map[self.start..self.start + self.len]
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The values as f32 (a copy; for norms and small tensors).
    pub fn to_f32(&self) -> Vec<f32> {
        let b = self.bytes();
        match self.dtype {
            DType::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            DType::BF16 => b
                .chunks_exact(2)
                .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
            DType::F16 => b
                .chunks_exact(2)
                .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
        }
    }
}

/// All tensors of a model folder (`model.safetensors` or shards + `model.safetensors.index.json`).
pub struct Checkpoint {
    tensors: HashMap<String, HostTensor>,
    pub files: Vec<PathBuf>,
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.exists() {
            shard_files(&index)?
        } else if single.exists() {
            vec![single]
        } else {
            bail!(
                "{} has neither model.safetensors nor model.safetensors.index.json",
                dir.display()
            );
        };
        let mut tensors = HashMap::new();
        for file in &files {
            for t in read_safetensors(file)? {
                if let Some(prev) = tensors.insert(t.name.clone(), t) {
                    bail!(
                        "tensor {} appears twice: in {} and {}",
                        prev.name,
                        prev.file.display(),
                        file.display()
                    );
                }
            }
        }
        Ok(Checkpoint { tensors, files })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

/// Where the weights come from: tensors looked up by their Hugging Face names.
pub trait TensorSource {
    /// The tensor `name` with exactly `shape`, or an error naming the tensor, file and shapes.
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<HostTensor>;
    /// The file(s), for messages.
    fn describe(&self) -> String;
}

impl TensorSource for Checkpoint {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<HostTensor> {
        Checkpoint::tensor(self, name, shape)
    }

    fn describe(&self) -> String {
        let names: Vec<String> = self.files.iter().map(|f| f.display().to_string()).collect();
        names.join(", ")
    }
}

impl Checkpoint {
    /// The tensor `name` with exactly `shape`, or an error naming the tensor, file and shapes.
    pub fn tensor(&self, name: &str, shape: &[usize]) -> Result<HostTensor> {
        let t = self.tensors.get(name).with_context(|| {
            format!(
                "tensor {name} (expected shape {shape:?}) is missing from {}",
                TensorSource::describe(self)
            )
        })?;
        if t.shape != shape {
            bail!(
                "tensor {name} in {} has shape {:?}, expected {shape:?}",
                t.file.display(),
                t.shape
            );
        }
        Ok(t.clone())
    }
}

fn shard_files(index: &Path) -> Result<Vec<PathBuf>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: HashMap<String, String>,
    }
    let text = std::fs::read_to_string(index)
        .with_context(|| format!("cannot read {}", index.display()))?;
    let parsed: Index = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a safetensors index", index.display()))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<String> = parsed.weight_map.into_values().collect();
    files.sort();
    files.dedup();
    files
        .into_iter()
        .map(|name| {
            let path = dir.join(&name);
            if path.exists() {
                Ok(path)
            } else {
                bail!(
                    "{} lists shard {name}, which does not exist",
                    index.display()
                )
            }
        })
        .collect()
}

fn read_safetensors(path: &Path) -> Result<Vec<HostTensor>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: the mapping is read-only; a checkpoint changed on disk while kvlab runs is outside
    // what any inference engine can defend against. `populate` reads the file and maps every page
    // now, at load time: otherwise the first forward pass would fault in 2.5 GB page by page and
    // its prefill time would measure the disk and the kernel, not the model.
    let map = Arc::new(
        unsafe { MmapOptions::new().populate().map(&file) }
            .with_context(|| format!("cannot mmap {}", path.display()))?,
    );
    let parsed = SafeTensors::deserialize(&map).map_err(|e| {
        anyhow::anyhow!(
            "{} is not a valid safetensors file (truncated or corrupt?): {e}",
            path.display()
        )
    })?;
    let base = map.as_ptr() as usize;
    let mut out = Vec::new();
    for (name, view) in parsed.tensors() {
        let dtype = match view.dtype() {
            safetensors::Dtype::BF16 => DType::BF16,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::F32 => DType::F32,
            other => bail!(
                "tensor {name} in {} has dtype {other:?}; kvlab reads BF16, F16 and F32",
                path.display()
            ),
        };
        let data = view.data();
        out.push(HostTensor {
            name,
            dtype,
            shape: view.shape().to_vec(),
            file: path.to_path_buf(),
            map: map.clone(),
            start: data.as_ptr() as usize - base,
            len: data.len(),
        });
    }
    Ok(out)
}

/// The weights of one decoder layer, by their Hugging Face names.
pub struct LayerWeights<W> {
    pub input_layernorm: W,          // [hidden]
    pub q_proj: W,                   // [num_heads * head_dim, hidden]
    pub k_proj: W,                   // [num_kv_heads * head_dim, hidden]
    pub v_proj: W,                   // [num_kv_heads * head_dim, hidden]
    pub o_proj: W,                   // [hidden, num_heads * head_dim]
    pub post_attention_layernorm: W, // [hidden]
    pub gate_proj: W,                // [intermediate, hidden]
    pub up_proj: W,                  // [intermediate, hidden]
    pub down_proj: W,                // [hidden, intermediate]
}

/// All weights of a LlamaForCausalLM. `W` is a host tensor after loading, and a backend's own
/// weight type after [`ModelWeights::upload`].
pub struct ModelWeights<W> {
    pub embed_tokens: W, // [vocab, hidden]
    pub layers: Vec<LayerWeights<W>>,
    pub norm: W, // [hidden]
    /// [vocab, hidden]; `None` when tied to `embed_tokens`.
    pub lm_head: Option<W>,
}

impl ModelWeights<HostTensor> {
    /// Finds and checks every tensor the forward pass needs, in a Hugging Face folder, before any
    /// compute.
    pub fn load(dir: &Path, cfg: &Config) -> Result<Self> {
        Self::load_from(&Checkpoint::open(dir)?, cfg)
    }

    /// Finds and checks every tensor the forward pass needs in `ckpt`.
    pub fn load_from(ckpt: &impl TensorSource, cfg: &Config) -> Result<Self> {
        let (h, q, kv, ff) = (
            cfg.hidden_size,
            cfg.q_dim(),
            cfg.kv_dim(),
            cfg.intermediate_size,
        );
        let layers = (0..cfg.num_layers)
            .map(|i| {
                let p = format!("model.layers.{i}");
                Ok(LayerWeights {
                    input_layernorm: ckpt.tensor(&format!("{p}.input_layernorm.weight"), &[h])?,
                    q_proj: ckpt.tensor(&format!("{p}.self_attn.q_proj.weight"), &[q, h])?,
                    k_proj: ckpt.tensor(&format!("{p}.self_attn.k_proj.weight"), &[kv, h])?,
                    v_proj: ckpt.tensor(&format!("{p}.self_attn.v_proj.weight"), &[kv, h])?,
                    o_proj: ckpt.tensor(&format!("{p}.self_attn.o_proj.weight"), &[h, q])?,
                    post_attention_layernorm: ckpt
                        .tensor(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                    gate_proj: ckpt.tensor(&format!("{p}.mlp.gate_proj.weight"), &[ff, h])?,
                    up_proj: ckpt.tensor(&format!("{p}.mlp.up_proj.weight"), &[ff, h])?,
                    down_proj: ckpt.tensor(&format!("{p}.mlp.down_proj.weight"), &[h, ff])?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        // Some tied checkpoints still store lm_head.weight; the tie decides which one is read.
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(ckpt.tensor("lm_head.weight", &[cfg.vocab_size, h])?)
        };
        Ok(ModelWeights {
            embed_tokens: ckpt.tensor("model.embed_tokens.weight", &[cfg.vocab_size, h])?,
            layers,
            norm: ckpt.tensor("model.norm.weight", &[h])?,
            lm_head,
        })
    }

    /// Bytes of weights that one decode step streams (every matrix once, one embedding row).
    pub fn bytes_read_per_token(&self) -> usize {
        let mut total = self.embed_tokens.bytes().len() / self.embed_tokens.shape[0];
        for l in &self.layers {
            for t in [
                &l.input_layernorm,
                &l.q_proj,
                &l.k_proj,
                &l.v_proj,
                &l.o_proj,
                &l.post_attention_layernorm,
                &l.gate_proj,
                &l.up_proj,
                &l.down_proj,
            ] {
                total += t.bytes().len();
            }
        }
        total += self.norm.bytes().len();
        total += self
            .lm_head
            .as_ref()
            .unwrap_or(&self.embed_tokens)
            .bytes()
            .len();
        total
    }
}

impl<W> ModelWeights<W> {
    /// Converts every tensor with `f` (a backend's upload), keeping the structure.
    pub fn upload<V>(&self, mut f: impl FnMut(&W) -> Result<V>) -> Result<ModelWeights<V>> {
        let layers = self
            .layers
            .iter()
            .map(|l| {
                Ok(LayerWeights {
                    input_layernorm: f(&l.input_layernorm)?,
                    q_proj: f(&l.q_proj)?,
                    k_proj: f(&l.k_proj)?,
                    v_proj: f(&l.v_proj)?,
                    o_proj: f(&l.o_proj)?,
                    post_attention_layernorm: f(&l.post_attention_layernorm)?,
                    gate_proj: f(&l.gate_proj)?,
                    up_proj: f(&l.up_proj)?,
                    down_proj: f(&l.down_proj)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ModelWeights {
            embed_tokens: f(&self.embed_tokens)?,
            layers,
            norm: f(&self.norm)?,
            lm_head: self.lm_head.as_ref().map(&mut f).transpose()?,
        })
    }

    /// The output projection: lm_head, or the embedding when tied.
    pub fn output_projection(&self) -> &W {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }
}
