//! The `kvlab` command line.
mod cli;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "kvlab",
    version,
    about = "A laboratory for the KV cache of LLM inference"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Greedy generation with one cache strategy.
    Generate(cli::generate::GenerateArgs),
    /// Host bandwidth and FMA peak, each op at Llama-3.2-1B's shapes and whole decode steps,
    /// as shares of their roofline bound.
    Roofline(cli::roofline::RooflineArgs),
    /// Write a synthetic checkpoint (random weights, real shape and tokenizer).
    Synth(cli::synth::SynthArgs),
    /// Run the study: its conversations with each cache strategy, measured per turn.
    Scenario(cli::scenario::ScenarioArgs),
    /// Many conversations at once: continuous batching over one KV pool, paged or static,
    /// measured at one or more loads.
    ServeBench(cli::serve_bench::ServeBenchArgs),
    /// What smaller caches (int8/fp8 KV, eviction policies) change in a model's output, against
    /// the f32 full cache, on the study's conversations.
    KvEval(cli::kv_eval::KvEvalArgs),
    /// Show how a static or dynamic KV cache sits in memory after N tokens.
    CacheMap(cli::cache_map::CacheMapArgs),
    /// Registers, spills and shared memory of every CUDA kernel for sm_80 and sm_90.
    KernelReport(cli::kernel_report::KernelReportArgs),
    /// Check the CUDA backend on a device (fragment layouts, every kernel, the tiny references).
    Selftest(cli::selftest::SelftestArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => cli::generate::run(args),
        Command::Roofline(args) => cli::roofline::run(args),
        Command::Synth(args) => cli::synth::run(args),
        Command::Scenario(args) => cli::scenario::run(args),
        Command::ServeBench(args) => cli::serve_bench::run(args),
        Command::KvEval(args) => cli::kv_eval::run(args),
        Command::CacheMap(args) => cli::cache_map::run(args),
        Command::KernelReport(args) => cli::kernel_report::run(args),
        Command::Selftest(args) => cli::selftest::run(args),
    };
    if let Err(err) = result {
        // `kvlab ... | head` closing the pipe early is not a failure.
        let broken_pipe = err
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe);
        if broken_pipe {
            return;
        }
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}
