//! Turning one sequence's logits into its next token: logit bias, penalties, temperature, top-k,
//! min-p, top-p, then a draw from the request's own generator, so that a seeded request gives the
//! same tokens whatever it is batched with.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Per-request sampling parameters (OpenAI's and vLLM's meanings).
#[derive(Clone, Debug)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 means off.
    pub top_k: usize,
    pub min_p: f32,
    /// Subtracted once from the logit of every token already generated.
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per time it was generated.
    pub frequency_penalty: f32,
    /// Divides positive and multiplies negative logits of tokens in the prompt or output (1 = off).
    pub repetition_penalty: f32,
    pub logit_bias: Vec<(u32, f32)>,
    pub seed: Option<u64>,
    /// Return the chosen token's log-probability and this many top alternatives.
    pub logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: Vec::new(),
            seed: None,
            logprobs: None,
        }
    }
}

/// The chosen token's log-probability under the model (before any sampling transform) and the
/// most likely alternatives.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Sampler { params, rng }
    }

    /// Picks the next token. `prompt` and `output` are the sequence's tokens so far.
    pub fn sample(&mut self, logits: &[f32], prompt: &[u32], output: &[u32]) -> (u32, Option<TokenLogprob>) {
        let p = &self.params;
        let mut scores = logits.to_vec();
        for &(id, bias) in &p.logit_bias {
            if let Some(s) = scores.get_mut(id as usize) {
                *s += bias;
            }
        }
        if p.repetition_penalty != 1.0 {
            let mut seen = vec![false; scores.len()];
            for &t in prompt.iter().chain(output) {
                if let Some(s) = seen.get_mut(t as usize) {
                    *s = true;
                }
            }
            for (s, _) in scores.iter_mut().zip(&seen).filter(|(_, seen)| **seen) {
                *s = if *s > 0.0 { *s / p.repetition_penalty } else { *s * p.repetition_penalty };
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            let mut counts = vec![0u32; scores.len()];
            for &t in output {
                if let Some(c) = counts.get_mut(t as usize) {
                    *c += 1;
                }
            }
            for (s, c) in scores.iter_mut().zip(&counts).filter(|(_, c)| **c > 0) {
                *s -= p.presence_penalty + p.frequency_penalty * *c as f32;
            }
        }
        let (greedy, logprobs) = (p.temperature <= 1e-5, p.logprobs);
        let token = if greedy { argmax(&scores) } else { self.draw(&scores) };
        let logprob = logprobs.map(|k| logprob_of(logits, token, k));
        (token, logprob)
    }

    fn draw(&mut self, scores: &[f32]) -> u32 {
        let p = &self.params;
        let mut candidates: Vec<(u32, f32)> = scores
            .iter()
            .enumerate()
            .filter(|(_, s)| s.is_finite())
            .map(|(i, s)| (i as u32, s / p.temperature))
            .collect();
        candidates.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if p.top_k > 0 {
            candidates.truncate(p.top_k);
        }
        let max = candidates[0].1;
        let mut probs: Vec<f32> = candidates.iter().map(|(_, s)| (s - max).exp()).collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= total);
        // min-p: drop tokens below min_p times the best probability.
        let mut keep = probs.iter().take_while(|&&x| x >= p.min_p * probs[0]).count();
        // top-p: the smallest prefix whose mass reaches top_p.
        if p.top_p < 1.0 {
            let mut mass = 0.0;
            let nucleus = probs.iter().take_while(|&&x| {
                let inside = mass < p.top_p;
                mass += x;
                inside
            });
            keep = keep.min(nucleus.count());
        }
        let keep = keep.max(1);
        let total: f32 = probs[..keep].iter().sum();
        let mut u = self.rng.random::<f32>() * total;
        for (i, x) in probs[..keep].iter().enumerate() {
            u -= x;
            if u <= 0.0 {
                return candidates[i].0;
            }
        }
        candidates[keep - 1].0
    }
}

/// Index of the largest value (the lowest index on ties).
pub fn argmax(xs: &[f32]) -> u32 {
    mlaserve_model::argmax(xs)
}

/// Log-softmax of `logits` at `token`, with the `k` most likely tokens.
fn logprob_of(logits: &[f32], token: u32, k: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_total = logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln() + max;
    let mut top: Vec<(u32, f32)> = Vec::new();
    if k > 0 {
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        let k = k.min(idx.len());
        idx.select_nth_unstable_by(k - 1, |a, b| logits[*b as usize].total_cmp(&logits[*a as usize]));
        idx.truncate(k);
        idx.sort_by(|a, b| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b)));
        top = idx.into_iter().map(|i| (i, logits[i as usize] - log_total)).collect();
    }
    TokenLogprob { logprob: logits[token as usize] - log_total, top }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams { temperature, seed: Some(7), ..Default::default() }
    }

    #[test]
    fn zero_temperature_is_greedy_and_bias_applies_first() {
        let mut s = Sampler::new(params(0.0));
        assert_eq!(s.sample(&[1.0, 3.0, 2.0], &[], &[]).0, 1);
        let mut s = Sampler::new(SamplingParams { logit_bias: vec![(2, 5.0)], ..params(0.0) });
        assert_eq!(s.sample(&[1.0, 3.0, 2.0], &[], &[]).0, 2);
    }

    #[test]
    fn penalties_push_repeated_tokens_down() {
        let logits = [2.0, 1.9, -1.0];
        let mut s = Sampler::new(SamplingParams { frequency_penalty: 0.05, ..params(0.0) });
        // Token 0 generated three times: 2.0 - 0.15 < 1.9.
        assert_eq!(s.sample(&logits, &[], &[0, 0, 0]).0, 1);
        let mut s = Sampler::new(SamplingParams { presence_penalty: 0.2, ..params(0.0) });
        assert_eq!(s.sample(&logits, &[], &[0]).0, 1);
        let mut s = Sampler::new(SamplingParams { repetition_penalty: 1.1, ..params(0.0) });
        // 2.0 / 1.1 = 1.82 < 1.9: repetition counts the prompt too.
        assert_eq!(s.sample(&logits, &[0], &[]).0, 1);
    }

    #[test]
    fn seeded_draws_repeat_and_top_k_one_is_greedy() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let draw = |p: SamplingParams| {
            let mut s = Sampler::new(p);
            (0..20).map(|_| s.sample(&logits, &[], &[]).0).collect::<Vec<_>>()
        };
        assert_eq!(draw(params(1.0)), draw(params(1.0)));
        assert_ne!(draw(params(1.0)), draw(SamplingParams { seed: Some(8), ..params(1.0) }));
        let greedy = argmax(&logits);
        assert!(draw(SamplingParams { top_k: 1, ..params(1.0) }).iter().all(|t| *t == greedy));
        assert!(draw(SamplingParams { top_p: 1e-6, ..params(1.0) }).iter().all(|t| *t == greedy));
        assert!(draw(SamplingParams { min_p: 0.9999, ..params(1.0) }).iter().all(|t| *t == greedy));
    }

    #[test]
    fn logprobs_are_log_softmax_of_the_raw_logits() {
        let mut s = Sampler::new(SamplingParams { logprobs: Some(2), ..params(0.0) });
        let (token, lp) = s.sample(&[0.0, (3.0f32).ln(), f32::NEG_INFINITY], &[], &[]);
        let lp = lp.unwrap();
        assert_eq!(token, 1);
        assert!((lp.logprob - 0.75f32.ln()).abs() < 1e-6);
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), [1, 0]);
    }
}
