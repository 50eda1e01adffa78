//! `mlaserve generate`: one prompt, greedy decoding, text streamed to stdout, speed to stderr.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use mlaserve_model::{argmax, Checkpoint, SingleSequence};

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// Hugging Face model folder (config.json, *.safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// Text to continue (encoded as is, without a chat template).
    #[arg(long)]
    prompt: String,
    /// Tokens to generate at most (stops earlier at an end-of-sequence token).
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let checkpoint = Checkpoint::open(&args.model)?;
    let model = checkpoint.load_model()?;
    tracing::info!("loaded {} in {:.2?}", args.model.display(), started.elapsed());

    let tok = &checkpoint.tokenizer;
    let prompt = tok.encode(args.prompt.as_str(), false).map_err(anyhow::Error::msg)?.get_ids().to_vec();
    anyhow::ensure!(!prompt.is_empty(), "the prompt encodes to no tokens");
    let eos = checkpoint.eos_token_ids();
    let mut seq = SingleSequence::new(&model, prompt.len() + args.max_tokens, 16);

    let t0 = Instant::now();
    let mut logits: Vec<f32> = seq.prefill(&model, &prompt)?.to_vec1()?;
    let prefill = t0.elapsed();

    let t1 = Instant::now();
    let mut generated: Vec<u32> = Vec::new();
    let mut printed = 0;
    let mut stdout = std::io::stdout().lock();
    while generated.len() < args.max_tokens {
        let next = argmax(&logits);
        if eos.contains(&next) {
            break;
        }
        generated.push(next);
        // Print what decodes cleanly so far; a partial UTF-8 character waits for its next byte.
        let text = tok.decode(&generated, true).map_err(anyhow::Error::msg)?;
        if let Some(new) = text.get(printed..).filter(|t| !t.is_empty() && !t.ends_with('\u{fffd}')) {
            write!(stdout, "{new}").context("stdout")?;
            stdout.flush().ok();
            printed = text.len();
        }
        if generated.len() < args.max_tokens {
            logits = seq.decode(&model, next)?.to_vec1()?;
        }
    }
    let decode = t1.elapsed();
    writeln!(stdout).ok();
    eprintln!(
        "prompt: {} tokens in {:.3}s ({:.1} tokens/s); generated: {} tokens in {:.3}s ({:.1} tokens/s)",
        prompt.len(),
        prefill.as_secs_f64(),
        prompt.len() as f64 / prefill.as_secs_f64(),
        generated.len(),
        decode.as_secs_f64(),
        generated.len() as f64 / decode.as_secs_f64().max(1e-9),
    );
    Ok(())
}
