use super::ModelArgs;
use anyhow::{bail, Context, Result};
use clap::Args;
use kvlab::generate::GenerateOptions;
use kvlab::kv::Strategy;
use kvlab::model::tokenizer::{ChatOptions, Message};
use std::io::Write;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// One user message, put through the model's chat template (or the role: content fallback).
    #[arg(long, group = "input")]
    pub prompt: Option<String>,
    /// A JSON file with a list of {"role", "content"} messages.
    #[arg(long, group = "input")]
    pub messages: Option<PathBuf>,
    /// Prompt token ids, comma-separated (for folders without a tokenizer).
    #[arg(long, group = "input", value_delimiter = ',')]
    pub prompt_ids: Option<Vec<u32>>,
    /// Tokenize --prompt as plain text, without the chat template.
    #[arg(long)]
    pub raw: bool,
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    #[arg(long, value_enum, default_value_t = Strategy::Dynamic)]
    pub cache: Strategy,
    /// Static cache capacity in positions (default: prompt + new tokens).
    #[arg(long)]
    pub max_context: Option<usize>,
    /// Positions per chunk of the dynamic cache.
    #[arg(long, default_value_t = 256)]
    pub chunk_tokens: usize,
    /// Generate all --max-new-tokens even past a stop token.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Write the logits that chose each token as float32 .npy [new_tokens, vocab].
    #[arg(long)]
    pub logits_out: Option<PathBuf>,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let mut loaded = args.model.load()?;
    let prompt_ids = match (&args.prompt, &args.messages, &args.prompt_ids) {
        (_, _, Some(ids)) => ids.clone(),
        (None, None, None) => {
            bail!("give a prompt: --prompt TEXT, --messages FILE.json or --prompt-ids 1,2,3")
        }
        (prompt, messages, None) => {
            let tokenizer = loaded.tokenizer.as_ref().with_context(|| {
                format!(
                    "{} has no tokenizer.json: pass --prompt-ids",
                    loaded.path.display()
                )
            })?;
            match (prompt, messages) {
                (Some(text), _) if args.raw => tokenizer.encode_text(text, true)?,
                (Some(text), _) => tokenizer.encode_messages(
                    &[Message {
                        role: "user".into(),
                        content: text.clone(),
                    }],
                    &ChatOptions {
                        add_generation_prompt: true,
                        date_string: None,
                    },
                )?,
                (None, Some(path)) => {
                    let text = std::fs::read_to_string(path)
                        .with_context(|| format!("cannot read {}", path.display()))?;
                    let messages: Vec<Message> =
                        serde_json::from_str(&text).with_context(|| {
                            format!(
                                "{}: expected a JSON list of {{\"role\", \"content\"}} messages",
                                path.display()
                            )
                        })?;
                    tokenizer.encode_messages(
                        &messages,
                        &ChatOptions {
                            add_generation_prompt: true,
                            date_string: None,
                        },
                    )?
                }
                (None, None) => unreachable!("handled above"),
            }
        }
    };
    let opts = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        strategy: args.cache,
        max_context: args.max_context,
        chunk_tokens: args.chunk_tokens,
        ignore_eos: args.ignore_eos,
        keep_step_logits: args.logits_out.is_some(),
        keep_prompt_logits: false,
        feed_ids: None,
        conversation: None,
    };
    let tokenizer = loaded.tokenizer.as_ref();
    let stream = !args.json && tokenizer.is_some();
    let mut streamer = tokenizer.filter(|_| stream).map(TextStreamer::new);
    let gen = loaded.generator.generate(&prompt_ids, &opts, &mut |id| {
        if let Some(s) = streamer.as_mut() {
            s.push(id);
        }
    })?;
    if let Some(path) = &args.logits_out {
        kvlab::npy::write_f32_matrix(path, &gen.step_logits)?;
    }
    let text = tokenizer.map(|t| t.decode(&gen.new_ids, true));
    if args.json {
        let out = serde_json::json!({
            "model": loaded.path,
            "synthetic": loaded.synthetic,
            "backend": loaded.generator.backend_info(),
            "cache": args.cache,
            "prompt_ids": gen.prompt_ids,
            "generated_ids": gen.new_ids,
            "text": text,
            "prefill_seconds": gen.prefill_seconds,
            "decode_seconds": gen.decode_seconds,
            "decode_tokens_per_second": gen.decode_tokens_per_second(),
            "tokens_per_second": gen.new_ids.len() as f64 / gen.total_seconds(),
            "stopped_on_eos": gen.stopped_on_eos,
            "kv": gen.kv,
        });
        writeln!(std::io::stdout(), "{}", serde_json::to_string_pretty(&out)?)?;
    } else {
        match text {
            None => writeln!(std::io::stdout(), "{:?}", gen.new_ids)?,
            Some(_) => writeln!(std::io::stdout())?,
        }
        eprintln!(
            "{} prompt + {} new tokens | prefill {:.3} s ({:.1} tok/s) | decode {:.1} tok/s | {} cache: {:.2} MiB reserved, {:.2} MiB live",
            gen.prompt_ids.len(),
            gen.new_ids.len(),
            gen.prefill_seconds,
            gen.prompt_ids.len() as f64 / gen.prefill_seconds,
            gen.decode_tokens_per_second(),
            args.cache,
            gen.kv.peak_reserved_bytes as f64 / (1 << 20) as f64,
            gen.kv.live_bytes as f64 / (1 << 20) as f64,
        );
    }
    Ok(())
}

/// Prints generated text as it arrives. Ids are decoded together since they may hold parts of one
/// character; the pending ids are flushed at each whitespace, so the work stays linear.
struct TextStreamer<'a> {
    tokenizer: &'a kvlab::model::tokenizer::Tokenizer,
    pending: Vec<u32>,
    shown: usize,
}

impl<'a> TextStreamer<'a> {
    fn new(tokenizer: &'a kvlab::model::tokenizer::Tokenizer) -> Self {
        TextStreamer {
            tokenizer,
            pending: Vec::new(),
            shown: 0,
        }
    }

    fn push(&mut self, id: u32) {
        self.pending.push(id);
        let text = self.tokenizer.decode(&self.pending, true);
        // A trailing U+FFFD is an incomplete character: wait for the rest of its bytes.
        if text.ends_with('\u{fffd}')
            || text.len() <= self.shown
            || !text.is_char_boundary(self.shown)
        {
            return;
        }
        let mut out = std::io::stdout().lock();
        // A closed pipe only ends the streaming; the final write reports it.
        if out
            .write_all(&text.as_bytes()[self.shown..])
            .and_then(|_| out.flush())
            .is_ok()
        {
            self.shown = text.len();
        }
        if text.ends_with(char::is_whitespace) {
            self.pending.clear();
            self.shown = 0;
        }
    }
}
