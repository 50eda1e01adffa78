//! Time to first token of a long prompt, cold and with its prefix in the prefix cache.
//!
//! Each trial takes a fresh random prompt and sends (1) the prompt cold, (2) the same prompt again,
//! (3) the prompt with a different last token. (2) and (3) hit the cached blocks of (1): at most
//! `len − 1` tokens rounded down to whole blocks (the last token is always computed), so 992 of
//! 1,000 tokens with blocks of 16.
//!
//! `cargo bench -p mlaserve-benches --bench prefix_ttft -- --model DIR [--prompt-len 1000]
//!  [--trials 3] [--block-size 16]`

use std::time::{Duration, Instant};

use mlaserve_benches::{collect_timed, greedy, median, memory_gb, print_machine, random_prompt, start, Args, Timed};
use mlaserve_engine::{EngineConfig, EngineHandle};

fn ttft(engine: &EngineHandle, prompt: Vec<u32>) -> anyhow::Result<Timed> {
    let submitted = Instant::now();
    let stream = engine.submit(greedy(prompt, 1)).map_err(|e| anyhow::anyhow!("submit: {e}"))?;
    collect_timed(stream, submitted)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse()?;
    let dir = args.model()?;
    let prompt_len: usize = args.get("prompt-len", 1000)?;
    let trials: usize = args.get("trials", 3)?;
    let block_size: usize = args.get("block-size", 16)?;
    anyhow::ensure!(prompt_len >= 2 && trials >= 1, "--prompt-len must be ≥ 2 and --trials ≥ 1");

    let max_model_len = (prompt_len + 16).max(4096);
    let bench = start(
        &dir,
        EngineConfig {
            block_size,
            // Room for every trial's prompt to stay cached.
            num_blocks: (trials + 2) * prompt_len.div_ceil(block_size) + max_model_len / block_size,
            max_num_batched_tokens: prompt_len.max(2048),
            max_num_seqs: 8,
            max_model_len,
            prefix_caching: true,
        },
    )?;
    print_machine();
    let c = &bench.config;
    println!(
        "model: {} ({} layers, hidden {}, vocab {}), loaded in {:.1?}",
        dir.display(),
        c.num_hidden_layers,
        c.hidden_size,
        c.vocab_size,
        bench.load_time
    );
    println!("workload: {prompt_len}-token prompt, 1 output token, block size {block_size}, {trials} trials (median)");

    ttft(&bench.engine, random_prompt(u64::MAX, 64, bench.vocab))?; // warm-up
    let short: Vec<Duration> = (0..trials)
        .map(|t| ttft(&bench.engine, random_prompt(10_000 + t as u64, 8, bench.vocab)).map(|r| r.ttft()))
        .collect::<anyhow::Result<_>>()?;

    let (mut cold, mut same, mut changed) = (Vec::new(), Vec::new(), Vec::new());
    let (mut hit_same, mut hit_changed) = (0, 0);
    for t in 0..trials {
        let prompt = random_prompt(t as u64 + 1, prompt_len, bench.vocab);
        let first = ttft(&bench.engine, prompt.clone())?;
        assert_eq!(first.usage.cached_tokens, 0, "a fresh prompt must start cold");
        cold.push(first.ttft());
        let again = ttft(&bench.engine, prompt.clone())?;
        hit_same = again.usage.cached_tokens;
        same.push(again.ttft());
        let mut other = prompt;
        let last = other.last_mut().expect("non-empty");
        *last = if *last == 3 { 4 } else { 3 };
        let edited = ttft(&bench.engine, other)?;
        hit_changed = edited.usage.cached_tokens;
        changed.push(edited.ttft());
        eprintln!(
            "trial {t}: cold {:.1?}, same prompt {:.1?}, last token changed {:.1?}",
            first.ttft(),
            again.ttft(),
            edited.ttft()
        );
    }
    let (cold, same, changed, short) = (median(cold), median(same), median(changed), median(short));
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!();
    println!("| request | cached prompt tokens | TTFT ms (median) | speed-up vs cold |");
    println!("|---|---:|---:|---:|");
    println!("| {prompt_len}-token prompt, cold | 0 | {:.1} | 1.00× |", ms(cold));
    println!("| same prompt again | {hit_same} | {:.1} | {:.2}× |", ms(same), ms(cold) / ms(same));
    println!(
        "| same prefix, last token changed | {hit_changed} | {:.1} | {:.2}× |",
        ms(changed),
        ms(cold) / ms(changed)
    );
    println!("| 8-token prompt, cold (floor) | 0 | {:.1} | |", ms(short));
    let ratio = ms(cold) / ms(same).max(ms(changed));
    println!();
    println!("cached / cold speed-up: {ratio:.2}× (target ≥ 5×: {})", if ratio >= 5.0 { "met" } else { "NOT met" });
    let (rss, peak) = memory_gb();
    println!("memory: RSS {rss:.2} GB, peak {peak:.2} GB");
    Ok(())
}
