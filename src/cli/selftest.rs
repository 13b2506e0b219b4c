use anyhow::{bail, Context};
use clap::Args;
use kvlab::backend::cuda::BackendKind;
use kvlab::selftest::{self, Outcome};
use std::io::Write;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct SelftestArgs {
    /// cuda: the GPU; emu: the CPU emulator; auto: the GPU when present, else the emulator.
    #[arg(long, default_value = "auto")]
    pub backend: BackendKind,
    /// Run only the checks whose id (group/name) contains this text.
    #[arg(long)]
    pub only: Option<String>,
    /// The reference fixtures (default: tests/fixtures of the source tree, else ./tests/fixtures).
    #[arg(long)]
    pub fixtures: Option<PathBuf>,
    /// Also write every outcome as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// List the checks and exit.
    #[arg(long)]
    pub list: bool,
    /// Print what kvlab finds of CUDA (driver, NVRTC, cuBLAS) and exit.
    #[arg(long)]
    pub env: bool,
}

/// Runs every check (a failure does not stop the others), one line each; fails if any failed.
pub fn run(args: SelftestArgs) -> anyhow::Result<()> {
    if args.list {
        for check in selftest::checks() {
            println!("{}", check.id());
        }
        return Ok(());
    }
    println!("{}", selftest::environment());
    if args.env {
        return Ok(());
    }
    let fixtures = args
        .fixtures
        .unwrap_or_else(kvlab::selftest::fixtures::default_dir);
    let ctx = selftest::Context::open(args.backend, fixtures)?;
    println!("device: {}", ctx.device.describe());
    let started = std::time::Instant::now();
    let outcomes = selftest::run(&ctx, args.only.as_deref(), |outcome: &Outcome| {
        let verdict = if outcome.passed { "ok  " } else { "FAIL" };
        println!(
            "{verdict} {:<42} {:>7.2} s  {}",
            outcome.check, outcome.seconds, outcome.detail
        );
        let _ = std::io::stdout().flush();
    });
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| !o.passed).collect();
    println!(
        "{} of {} checks passed on {} in {:.1} s",
        outcomes.len() - failed.len(),
        outcomes.len(),
        ctx.name,
        started.elapsed().as_secs_f64()
    );
    if let Some(path) = &args.json {
        let report = serde_json::json!({
            "device": ctx.device.describe(),
            "environment": selftest::environment(),
            "outcomes": outcomes,
        });
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if outcomes.is_empty() {
        bail!("no check matches {:?}", args.only.unwrap_or_default());
    }
    if !failed.is_empty() {
        let names: Vec<&str> = failed.iter().map(|o| o.check.as_str()).collect();
        bail!("{} checks failed: {}", failed.len(), names.join(", "));
    }
    Ok(())
}
