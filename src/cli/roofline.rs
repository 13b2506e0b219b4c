use anyhow::Context;
use clap::Args;
use kvlab::roofline::report::{self, RooflineOptions};
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct RooflineArgs {
    /// A smoke run of a few seconds: fewer shapes and repetitions, the tiny synthetic model.
    #[arg(long)]
    pub quick: bool,
    /// Model folder of the decode-step rows (default: the synthetic Llama-3.2-1B).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// CPU threads (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

pub fn run(args: RooflineArgs) -> anyhow::Result<()> {
    kvlab::runtime::set_threads(args.threads)?;
    let report = report::run(&RooflineOptions {
        quick: args.quick,
        model: args.model,
    })?;
    print!("{}", report.to_markdown());
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}
