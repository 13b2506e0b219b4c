//! The text side of a Hugging Face model folder: `tokenizer.json` (through the `tokenizers`
//! crate), the special tokens and chat template of `tokenizer_config.json` (or
//! `chat_template.jinja`), and the prompt a conversation becomes. GGUF files carry the same in
//! their metadata (`gguf::vocab`).

use std::collections::HashSet;
use std::path::Path;

use anyhow::{anyhow, bail, Context as _};

use super::chat_template::ChatTemplate;
pub use super::chat_template::{ChatOptions, Message};

/// The special tokens transformers puts in a chat template's scope (`special_tokens_map`).
const SPECIAL_TOKEN_NAMES: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    chat_template: Option<ChatTemplate>,
    /// (name, token text) for each of SPECIAL_TOKEN_NAMES that tokenizer_config.json sets.
    special_tokens: Vec<(String, String)>,
    /// transformers' `clean_up_tokenization_spaces` (" ." -> "." etc. after decoding).
    clean_up_spaces: bool,
}

impl Tokenizer {
    /// Loads tokenizer.json, tokenizer_config.json (optional) and chat_template.jinja (optional,
    /// and preferred over the config's template, as transformers does) from a Hugging Face model
    /// folder. `Ok(None)` when the folder has no tokenizer.json.
    pub fn load(dir: &Path) -> anyhow::Result<Option<Tokenizer>> {
        let tokenizer_path = dir.join("tokenizer.json");
        if !tokenizer_path.is_file() {
            return Ok(None);
        }
        let inner = tokenizers::Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| anyhow!("{e}"))
            .with_context(|| format!("loading {}", tokenizer_path.display()))?;

        let config_path = dir.join("tokenizer_config.json");
        let config = if config_path.is_file() {
            let text = std::fs::read_to_string(&config_path)
                .with_context(|| format!("reading {}", config_path.display()))?;
            serde_json::from_str(&text)
                .map_err(anyhow::Error::from)
                .and_then(TokenizerConfig::from_json)
                .with_context(|| format!("parsing {}", config_path.display()))?
        } else {
            TokenizerConfig::default()
        };

        let jinja_path = dir.join("chat_template.jinja");
        let (template_source, template_path) = if jinja_path.is_file() {
            let source = std::fs::read_to_string(&jinja_path)
                .with_context(|| format!("reading {}", jinja_path.display()))?;
            (Some(source), jinja_path)
        } else {
            (config.chat_template, config_path)
        };
        let chat_template = template_source
            .map(|source| ChatTemplate::new(&source))
            .transpose()
            .with_context(|| format!("chat template of {}", template_path.display()))?;

        Ok(Some(Tokenizer {
            inner,
            chat_template,
            special_tokens: config.special_tokens,
            clean_up_spaces: config.clean_up_tokenization_spaces,
        }))
    }

    /// The tokenizer, special tokens and chat template in a GGUF file's metadata.
    pub fn from_gguf(file: &super::gguf::GgufFile) -> anyhow::Result<Tokenizer> {
        let vocab = super::gguf::vocab::load(file)?;
        let chat_template = vocab
            .chat_template
            .map(|source| ChatTemplate::new(&source))
            .transpose()
            .with_context(|| format!("tokenizer.chat_template of {}", file.path.display()))?;
        Ok(Tokenizer {
            inner: vocab.tokenizer,
            chat_template,
            special_tokens: vocab.special_tokens,
            // transformers' GGUF loader leaves it off.
            clean_up_spaces: false,
        })
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// The prompt ids of a conversation. With a chat template: the template rendered and
    /// tokenized without special tokens (the template writes BOS itself), exactly
    /// transformers' `apply_chat_template(messages, tokenize=True, ...)`. Without one: the
    /// study's fallback, `"\n".join(f"{role}: {content}")` tokenized as `tokenizer(text)` (with
    /// the BOS of the post-processor).
    pub fn encode_messages(
        &self,
        messages: &[Message],
        opts: &ChatOptions,
    ) -> anyhow::Result<Vec<u32>> {
        match &self.chat_template {
            Some(template) => {
                let text = template.render(messages, &self.special_tokens, opts)?;
                self.encode_text(&text, false)
            }
            None => {
                let text = messages
                    .iter()
                    .map(|m| format!("{}: {}", m.role, m.content))
                    .collect::<Vec<_>>()
                    .join("\n");
                self.encode_text(&text, true)
            }
        }
    }

    /// `tokenizer(text, add_special_tokens=...)`: with special tokens, whatever the
    /// post-processor adds (BOS for Llama 3).
    pub fn encode_text(&self, text: &str, add_special_tokens: bool) -> anyhow::Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| anyhow!("tokenizing {} bytes of text: {e}", text.len()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// transformers' `decode`, except that it never fails: an id the vocabulary lacks (random
    /// weights can emit one) decodes as the visible placeholder `<|id:N|>`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> String {
        let mut text = String::new();
        // Decode runs of known ids together so that multi-byte characters split across
        // tokens come out whole.
        for run in ids.chunk_by(|&a, &b| self.is_known(a) == self.is_known(b)) {
            let decoded = if self.is_known(run[0]) {
                self.inner.decode(run, skip_special_tokens).ok()
            } else {
                None
            };
            match decoded {
                Some(decoded) => text.push_str(&decoded),
                None => run
                    .iter()
                    .for_each(|id| text.push_str(&format!("<|id:{id}|>"))),
            }
        }
        if self.clean_up_spaces {
            clean_up_tokenization(&text)
        } else {
            text
        }
    }

    /// The number of ids the tokenizer knows, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The id of tokenizer_config.json's `eos_token` (stop tokens proper come from
    /// generation_config.json).
    pub fn eos_token_id(&self) -> Option<u32> {
        let (_, eos) = self.special_tokens.iter().find(|(n, _)| n == "eos_token")?;
        self.token_id(eos)
    }

    /// Indexed by id (length = largest known id + 1): true for the "ordinary" ids, a space
    /// followed by ASCII letters (" the", " Hello") that is not an added token and that
    /// re-encodes alone to exactly itself. Everything else is false: special and added tokens,
    /// ids the vocabulary lacks, lone bytes of a multi-byte character, whitespace, digits,
    /// punctuation, pieces without a leading space (which would glue to the previous word).
    ///
    /// Guarantee: for any sequence of ordinary ids, `encode_text(&decode(ids, false), false)`
    /// gives back exactly `ids`, for pre-tokenizers that cut before every space-led run of
    /// letters (Llama 3 and tiktoken's cl100k pattern, GPT-2's byte level, SentencePiece
    /// metaspace): each word is then its own pre-token, which re-encodes to itself. Placed in a
    /// prompt the count can move by a token or so at the edges (a chat template's `trim`
    /// drops the first space; "role: " + " word" has two spaces).
    pub fn ordinary_text_mask(&self) -> Vec<bool> {
        let vocab = self.inner.get_vocab(true);
        let len = vocab.values().max().map_or(0, |&max| max as usize + 1);
        let added: HashSet<u32> = self
            .inner
            .get_added_tokens_decoder()
            .keys()
            .copied()
            .collect();
        let mut mask = vec![false; len];
        for &id in vocab.values() {
            mask[id as usize] = !added.contains(&id) && self.is_ordinary_word(id);
        }
        mask
    }

    fn is_ordinary_word(&self, id: u32) -> bool {
        let Ok(text) = self.inner.decode(&[id], false) else {
            return false;
        };
        let is_word = text
            .strip_prefix(' ')
            .is_some_and(|word| !word.is_empty() && word.bytes().all(|b| b.is_ascii_alphabetic()));
        is_word
            && self
                .inner
                .encode(text.as_str(), false)
                .is_ok_and(|encoding| encoding.get_ids() == [id])
    }

    fn is_known(&self, id: u32) -> bool {
        self.inner.id_to_token(id).is_some()
    }
}

/// transformers' `clean_up_tokenization`: drops the space the old word-level tokenizers put
/// before punctuation and English contractions.
fn clean_up_tokenization(text: &str) -> String {
    [
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ]
    .iter()
    .fold(text.to_string(), |text, (from, to)| text.replace(from, to))
}

/// What kvlab reads from tokenizer_config.json.
#[derive(Default)]
struct TokenizerConfig {
    chat_template: Option<String>,
    special_tokens: Vec<(String, String)>,
    clean_up_tokenization_spaces: bool,
}

impl TokenizerConfig {
    fn from_json(json: serde_json::Value) -> anyhow::Result<Self> {
        let mut special_tokens = Vec::new();
        for name in SPECIAL_TOKEN_NAMES {
            // A token is a string or an AddedToken dict {"content": ..., ...}.
            let token = match json.get(name) {
                None | Some(serde_json::Value::Null) => continue,
                Some(serde_json::Value::String(text)) => text.clone(),
                Some(other) => other
                    .get("content")
                    .and_then(|c| c.as_str())
                    .with_context(|| {
                        format!("`{name}` is neither a string nor {{\"content\": ...}}")
                    })?
                    .to_string(),
            };
            special_tokens.push((name.to_string(), token));
        }
        let clean_up_tokenization_spaces = match json.get("clean_up_tokenization_spaces") {
            None | Some(serde_json::Value::Null) => false,
            Some(value) => value
                .as_bool()
                .context("`clean_up_tokenization_spaces` is not a boolean")?,
        };
        Ok(TokenizerConfig {
            chat_template: chat_template_of(&json)?,
            special_tokens,
            clean_up_tokenization_spaces,
        })
    }
}

/// `chat_template` is a string, or a list of {"name", "template"} of which "default" is the
/// one `apply_chat_template` uses.
fn chat_template_of(json: &serde_json::Value) -> anyhow::Result<Option<String>> {
    match json.get("chat_template") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(source)) => Ok(Some(source.clone())),
        Some(serde_json::Value::Array(named)) => {
            let mut names = Vec::new();
            for entry in named {
                let name = entry.get("name").and_then(|n| n.as_str());
                let template = entry.get("template").and_then(|t| t.as_str());
                let (Some(name), Some(template)) = (name, template) else {
                    bail!(
                        "`chat_template` list entries must be {{\"name\": ..., \"template\": ...}}"
                    );
                };
                if name == "default" {
                    return Ok(Some(template.to_string()));
                }
                names.push(name);
            }
            bail!("`chat_template` names {names:?} but none is \"default\"")
        }
        Some(_) => bail!("`chat_template` is neither a string nor a list of named templates"),
    }
}
