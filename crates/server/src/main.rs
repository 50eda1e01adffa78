//! `mlaserve`: the command line. `generate` runs one prompt through a model folder.

use mlaserve::generate;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "mlaserve", version, about = "Inference server for DeepSeek-style (MLA + MoE) models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a continuation of one prompt (greedy) and report the speed.
    Generate(generate::GenerateArgs),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Generate(args) => generate::run(args),
    }
}
