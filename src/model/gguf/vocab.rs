//! The tokenizer of a GGUF file, built from its metadata as a `tokenizers` Tokenizer.
//!
//! `tokenizer.ggml.model` "gpt2" is byte-level BPE: `tokens` (in id order, written in GPT-2's
//! byte-to-character alphabet), `merges` ("a b", by rank), `token_type` (1 normal, 3 control,
//! 4 user-defined, ...), and `pre`, the name llama.cpp gives the pre-tokenizer (how text is cut
//! before BPE). Control and user-defined tokens become added tokens (control ones special), as
//! transformers' GGUF loader makes them; `add_bos_token` puts BOS before `tokenizer(text)`.

use super::GgufFile;
use anyhow::{anyhow, bail, Context, Result};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

/// llama.cpp's token types (`llama_token_type`).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// The text side of a GGUF file.
pub struct GgufVocab {
    pub tokenizer: tokenizers::Tokenizer,
    /// (name, token text) of the special tokens the metadata names, as transformers puts them in a
    /// chat template's scope.
    pub special_tokens: Vec<(String, String)>,
    pub chat_template: Option<String>,
}

/// The special-token ids of the metadata and transformers' names for them.
const SPECIAL_TOKEN_IDS: [(&str, &str); 4] = [
    ("bos_token_id", "bos_token"),
    ("eos_token_id", "eos_token"),
    ("unknown_token_id", "unk_token"),
    ("padding_token_id", "pad_token"),
];

/// The pre-tokenizer llama.cpp names `pre` (llama-vocab.cpp's regex lists), in the form the
/// model's own tokenizer.json states it, and whether merges are ignored for whole-word tokens.
fn pre_tokenizer(pre: &str, path: &str) -> Result<(PreTokenizerWrapper, bool)> {
    let byte_level = |use_regex| ByteLevel::new(false, true, use_regex).into();
    Ok(match pre {
        // GPT-2's own pattern, applied by the byte-level step.
        "default" | "gpt2" => (byte_level(true), false),
        // Every digit on its own, then GPT-2's pattern (SmolLM, StarCoder).
        "smollm" | "starcoder" | "refact" | "codeshell" => (
            Sequence::new(vec![Digits::new(true).into(), byte_level(true)]).into(),
            false,
        ),
        "llama-bpe" | "llama3" => {
            let split = Split::new(
                SplitPattern::Regex(crate::model::synth::LLAMA3_SPLIT_REGEX.to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| anyhow!("{e}"))?;
            (
                Sequence::new(vec![split.into(), byte_level(false)]).into(),
                true,
            )
        }
        other => bail!(
            "{path}: tokenizer.ggml.pre is {other:?}; kvlab knows the pre-tokenizers default, gpt2, \
             smollm, starcoder, refact, codeshell and llama-bpe"
        ),
    })
}

/// Builds the tokenizer of `file` (which must use `tokenizer.ggml.model` "gpt2").
pub fn load(file: &GgufFile) -> Result<GgufVocab> {
    let path = file.path.display().to_string();
    let model = file.get_str("tokenizer.ggml.model")?;
    if model != "gpt2" {
        bail!(
            "{path}: tokenizer.ggml.model is {model:?}; kvlab reads byte-level BPE (\"gpt2\") \
             vocabularies"
        );
    }
    let strings = |key: &str| -> Result<Vec<String>> {
        file.get_array(key)?
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_str().map(str::to_string).with_context(|| {
                    format!("{path}: {key}[{i}] is a {}, not a string", v.type_name())
                })
            })
            .collect()
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let merges: Vec<(String, String)> = strings("tokenizer.ggml.merges")?
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .with_context(|| format!("{path}: tokenizer.ggml.merges[{i}] {m:?} is not \"a b\""))
        })
        .collect::<Result<_>>()?;
    let token_types: Vec<i64> =
        match file.optional("tokenizer.ggml.token_type", GgufFile::get_array)? {
            None => vec![1; tokens.len()],
            Some(types) => types
                .iter()
                .map(|v| {
                    v.as_i64()
                        .with_context(|| format!("{path}: token_type holds a {}", v.type_name()))
                })
                .collect::<Result<_>>()?,
        };
    if token_types.len() != tokens.len() {
        bail!(
            "{path}: tokenizer.ggml.token_type has {} entries for {} tokens",
            token_types.len(),
            tokens.len()
        );
    }

    let mut vocab = Vocab::with_capacity(tokens.len());
    for (id, token) in tokens.iter().enumerate() {
        if vocab.insert(token.clone(), id as u32).is_some() {
            bail!("{path}: token {token:?} appears twice in tokenizer.ggml.tokens");
        }
    }
    let pre = file
        .optional("tokenizer.ggml.pre", GgufFile::get_str)?
        .unwrap_or("default");
    let (pre_tokenizer, ignore_merges) = pre_tokenizer(pre, &path)?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(ignore_merges)
        .build()
        .map_err(|e| anyhow!("{path}: the BPE vocabulary does not build: {e}"))?;
    let mut tokenizer = tokenizers::Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));

    let added: Vec<AddedToken> = tokens
        .iter()
        .zip(&token_types)
        .filter(|(_, &t)| t == TOKEN_TYPE_CONTROL || t == TOKEN_TYPE_USER_DEFINED)
        .map(|(token, &t)| {
            AddedToken::from(token.clone(), t == TOKEN_TYPE_CONTROL).normalized(false)
        })
        .collect();
    tokenizer.add_special_tokens(&added);

    let token_text = |key: &str| -> Result<Option<(u32, String)>> {
        let full = format!("tokenizer.ggml.{key}");
        let Some(id) = file.optional(&full, GgufFile::get_usize)? else {
            return Ok(None);
        };
        let token = tokens.get(id).with_context(|| {
            format!(
                "{path}: {full} is {id}, outside the vocabulary of {} tokens",
                tokens.len()
            )
        })?;
        Ok(Some((id as u32, token.clone())))
    };
    let mut special_tokens = Vec::new();
    for (key, name) in SPECIAL_TOKEN_IDS {
        if let Some((_, token)) = token_text(key)? {
            special_tokens.push((name.to_string(), token));
        }
    }
    let add_bos = file
        .optional("tokenizer.ggml.add_bos_token", |f, k| match f.get(k)? {
            super::Value::Bool(b) => Ok(*b),
            v => bail!("{path}: {k} is a {}, not a bool", v.type_name()),
        })?
        .unwrap_or(false);
    if add_bos {
        let (bos_id, bos) = token_text("bos_token_id")?
            .with_context(|| format!("{path}: add_bos_token is set but bos_token_id is absent"))?;
        let template = TemplateProcessing::builder()
            .try_single(format!("{bos} $A"))
            .and_then(|b| b.try_pair(format!("{bos} $A {bos} $B")))
            .map_err(|e| anyhow!("{e}"))?
            .special_tokens(vec![(bos.clone(), bos_id)])
            .build()
            .map_err(|e| anyhow!("{path}: the BOS template does not build: {e}"))?;
        tokenizer.with_post_processor(Some(template));
    }
    Ok(GgufVocab {
        tokenizer,
        special_tokens,
        chat_template: file
            .optional("tokenizer.chat_template", GgufFile::get_str)?
            .map(str::to_string),
    })
}
