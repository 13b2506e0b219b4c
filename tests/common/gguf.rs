//! A small GGUF writer for the tests: files built from scratch (bad input, one field at a time)
//! and tiny checkpoints converted the way llama.cpp's converter does (Q and K rows permuted).

use std::path::Path;

/// A metadata value of the kinds the tests write.
#[derive(Clone, Debug)]
pub enum Meta {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    Strs(Vec<String>),
    I32s(Vec<i32>),
}

/// One tensor: dims innermost first, the ggml type id, the stored bytes.
#[derive(Clone, Debug)]
pub struct Tensor {
    pub name: String,
    pub dims: Vec<u64>,
    pub type_id: u32,
    pub data: Vec<u8>,
    /// Written as the tensor's offset instead of its real one, when set.
    pub offset_override: Option<u64>,
}

pub const F32: u32 = 0;
pub const Q8_0: u32 = 8;

/// A GGUF file in the making.
#[derive(Clone, Debug, Default)]
pub struct Gguf {
    pub magic: Option<[u8; 4]>,
    pub version: Option<u32>,
    pub metadata: Vec<(String, Meta)>,
    pub tensors: Vec<Tensor>,
}

fn string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

const ALIGNMENT: usize = 32;

impl Gguf {
    pub fn set(&mut self, key: &str, value: Meta) {
        self.metadata.retain(|(k, _)| k != key);
        self.metadata.push((key.to_string(), value));
    }

    pub fn remove(&mut self, key: &str) {
        self.metadata.retain(|(k, _)| k != key);
    }

    pub fn tensor_mut(&mut self, name: &str) -> &mut Tensor {
        self.tensors
            .iter_mut()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("no tensor {name}"))
    }

    /// An f32 tensor of row-major `shape` (outermost first).
    pub fn add_f32(&mut self, name: &str, shape: &[usize], values: &[f32]) {
        assert_eq!(shape.iter().product::<usize>(), values.len(), "{name}");
        self.tensors.push(Tensor {
            name: name.to_string(),
            dims: shape.iter().rev().map(|&d| d as u64).collect(),
            type_id: F32,
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            offset_override: None,
        });
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend(self.magic.unwrap_or(*b"GGUF"));
        out.extend(self.version.unwrap_or(3).to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            string(&mut out, key);
            match value {
                Meta::U32(v) => {
                    out.extend(4u32.to_le_bytes());
                    out.extend(v.to_le_bytes());
                }
                Meta::F32(v) => {
                    out.extend(6u32.to_le_bytes());
                    out.extend(v.to_le_bytes());
                }
                Meta::Bool(v) => {
                    out.extend(7u32.to_le_bytes());
                    out.push(*v as u8);
                }
                Meta::Str(s) => {
                    out.extend(8u32.to_le_bytes());
                    string(&mut out, s);
                }
                Meta::Strs(items) => {
                    out.extend(9u32.to_le_bytes());
                    out.extend(8u32.to_le_bytes());
                    out.extend((items.len() as u64).to_le_bytes());
                    items.iter().for_each(|s| string(&mut out, s));
                }
                Meta::I32s(items) => {
                    out.extend(9u32.to_le_bytes());
                    out.extend(5u32.to_le_bytes());
                    out.extend((items.len() as u64).to_le_bytes());
                    items.iter().for_each(|v| out.extend(v.to_le_bytes()));
                }
            }
        }
        let mut offset = 0usize;
        let mut offsets = Vec::new();
        for t in &self.tensors {
            offsets.push(offset);
            offset = (offset + t.data.len()).div_ceil(ALIGNMENT) * ALIGNMENT;
        }
        for (t, &offset) in self.tensors.iter().zip(&offsets) {
            string(&mut out, &t.name);
            out.extend((t.dims.len() as u32).to_le_bytes());
            t.dims.iter().for_each(|d| out.extend(d.to_le_bytes()));
            out.extend(t.type_id.to_le_bytes());
            out.extend(t.offset_override.unwrap_or(offset as u64).to_le_bytes());
        }
        out.resize(out.len().div_ceil(ALIGNMENT) * ALIGNMENT, 0);
        let data_start = out.len();
        for (t, &offset) in self.tensors.iter().zip(&offsets) {
            out.resize(data_start + offset, 0);
            out.extend(&t.data);
        }
        out
    }

    pub fn write(&self, path: &Path) {
        std::fs::write(path, self.to_bytes()).unwrap();
    }
}

/// llama.cpp's converter on Q or K `[heads · head_dim, cols]`: within each head, row
/// `i · head_dim/2 + j` moves to row `2j + i` (numpy: reshape(heads, 2, hd/2, cols).swapaxes(1, 2)).
pub fn llama_cpp_permute(values: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    let rows = values.len() / cols;
    let hd = rows / heads;
    let mut out = vec![0.0; values.len()];
    for h in 0..heads {
        for i in 0..2 {
            for j in 0..hd / 2 {
                let from = h * hd + i * hd / 2 + j;
                let to = h * hd + 2 * j + i;
                out[to * cols..(to + 1) * cols]
                    .copy_from_slice(&values[from * cols..(from + 1) * cols]);
            }
        }
    }
    out
}

/// The tokens of a vocabulary of `n` single characters (no merges): enough for tests that need a
/// tokenizer whose size matches the embedding.
pub fn letter_vocab(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| char::from_u32(0x100 + i as u32).unwrap().to_string())
        .collect()
}

/// The llama metadata of a model of this shape, with a vocabulary of `vocab` letters.
#[allow(clippy::too_many_arguments)]
pub fn llama_metadata(
    g: &mut Gguf,
    layers: u32,
    hidden: u32,
    ff: u32,
    heads: u32,
    kv_heads: u32,
    vocab: usize,
    eps: f32,
    theta: f32,
) {
    g.set("general.architecture", Meta::Str("llama".into()));
    g.set("general.name", Meta::Str("test model".into()));
    g.set("llama.block_count", Meta::U32(layers));
    g.set("llama.context_length", Meta::U32(512));
    g.set("llama.embedding_length", Meta::U32(hidden));
    g.set("llama.feed_forward_length", Meta::U32(ff));
    g.set("llama.attention.head_count", Meta::U32(heads));
    g.set("llama.attention.head_count_kv", Meta::U32(kv_heads));
    g.set("llama.attention.layer_norm_rms_epsilon", Meta::F32(eps));
    g.set("llama.rope.freq_base", Meta::F32(theta));
    g.set("tokenizer.ggml.model", Meta::Str("gpt2".into()));
    g.set("tokenizer.ggml.pre", Meta::Str("default".into()));
    g.set("tokenizer.ggml.tokens", Meta::Strs(letter_vocab(vocab)));
    g.set("tokenizer.ggml.token_type", Meta::I32s(vec![1; vocab]));
    g.set("tokenizer.ggml.merges", Meta::Strs(Vec::new()));
    g.set("tokenizer.ggml.bos_token_id", Meta::U32(1));
    g.set("tokenizer.ggml.eos_token_id", Meta::U32(2));
}
