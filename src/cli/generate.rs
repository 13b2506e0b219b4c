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
                    loaded.dir.display()
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
    };
    let tokenizer = loaded.tokenizer.as_ref();
    let stream = !args.json && tokenizer.is_some();
    let mut shown = 0usize;
    let mut so_far = Vec::new();
    let gen = loaded.generator.generate(&prompt_ids, &opts, &mut |id| {
        // Print text as it arrives: decode everything so far and print what is new, so that
        // multi-token characters come out whole.
        if let (true, Some(tok)) = (stream, tokenizer) {
            so_far.push(id);
            let text = tok.decode(&so_far, true);
            if text.len() > shown && text.is_char_boundary(shown) {
                print!("{}", &text[shown..]);
                let _ = std::io::stdout().flush();
                shown = text.len();
            }
        }
    })?;
    if let Some(path) = &args.logits_out {
        kvlab::npy::write_f32_matrix(path, &gen.step_logits)?;
    }
    let text = tokenizer.map(|t| t.decode(&gen.new_ids, true));
    if args.json {
        let out = serde_json::json!({
            "model": loaded.dir,
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
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        if text.is_none() {
            println!("{:?}", gen.new_ids);
        } else {
            println!();
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
