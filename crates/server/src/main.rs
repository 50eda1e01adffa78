//! `mlaserve`: the command line. With no subcommand it serves (`mlaserve --model DIR` is
//! `mlaserve serve --model DIR`).

use std::ffi::OsString;

use anyhow::Context;
use clap::{Parser, Subcommand};
use mlaserve::{generate, make_model, serve};

#[derive(Parser)]
#[command(name = "mlaserve", version, about = "OpenAI-compatible server for DeepSeek-style (MLA + MoE) models")]
#[command(args_conflicts_with_subcommands = true, args_override_self = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: serve::ServeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the OpenAI API (the default).
    Serve(serve::ServeArgs),
    /// Generate a continuation of one prompt (greedy) and report the speed.
    Generate(generate::GenerateArgs),
    /// Write a random-weight model with a real model's widths, for benchmarks.
    MakeModel(make_model::MakeModelArgs),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    match parse()? {
        Cli { command: Some(Command::Generate(args)), .. } => generate::run(args),
        Cli { command: Some(Command::MakeModel(args)), .. } => make_model::run(args),
        Cli { command: Some(Command::Serve(args)), .. } | Cli { command: None, serve: args } => {
            tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(serve::run(args))
        }
    }
}

/// Parses the command line; a `--config` TOML file's options go in first, so flags override them.
fn parse() -> anyhow::Result<Cli> {
    let argv: Vec<OsString> = std::env::args_os().collect();
    let cli = Cli::parse_from(&argv);
    let config = match &cli.command {
        Some(Command::Serve(a)) => a.config.clone(),
        None => cli.serve.config.clone(),
        _ => None,
    };
    let Some(path) = config else { return Ok(cli) };
    let text = std::fs::read_to_string(&path).with_context(|| format!("--config {}", path.display()))?;
    let table: toml::Table = text.parse().with_context(|| format!("--config {}", path.display()))?;
    let mut injected = Vec::new();
    for (key, value) in table {
        let flag = format!("--{}", key.replace('_', "-"));
        match value {
            toml::Value::Boolean(true) => injected.push(flag),
            toml::Value::Boolean(false) => {}
            toml::Value::String(s) => injected.extend([flag, s]),
            toml::Value::Integer(i) => injected.extend([flag, i.to_string()]),
            toml::Value::Float(f) => injected.extend([flag, f.to_string()]),
            other => anyhow::bail!("--config {}: `{key}` has an unsupported value {other}", path.display()),
        }
    }
    let at = if cli.command.is_some() { 2 } else { 1 };
    let mut full = argv[..at].to_vec();
    full.extend(injected.into_iter().map(OsString::from));
    full.extend_from_slice(&argv[at..]);
    Ok(Cli::parse_from(full))
}
