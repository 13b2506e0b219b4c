use clap::Args;
use kvlab::model::synth::{write_synthetic, Preset, SynthOptions};
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct SynthArgs {
    /// Shape to write: llama-3.2-1b (the real config), or tiny (for tests).
    #[arg(long, default_value = "llama-3.2-1b")]
    pub preset: Preset,
    /// Output folder (created; must not exist yet).
    #[arg(long)]
    pub out: PathBuf,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(args: SynthArgs) -> anyhow::Result<()> {
    write_synthetic(
        &SynthOptions {
            preset: args.preset,
            seed: args.seed,
        },
        &args.out,
    )?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}
