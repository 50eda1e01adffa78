//! Rotary position embedding with DeepSeek's YaRN extension, on the interleaved pair layout the
//! checkpoints use: dims `(2i, 2i+1)` rotate together by `p · ω'_i` (design doc §3, §4).

use crate::config::{yarn_mscale, Config};

pub struct Rope {
    inv_freq: Vec<f32>,
    /// cos/sin factor `mscale(s, mscale) / mscale(s, mscale_all_dim)` (1 for released checkpoints).
    attention_factor: f32,
}

impl Rope {
    pub fn new(cfg: &Config) -> Self {
        let dim = cfg.qk_rope_head_dim;
        let base = cfg.rope_theta;
        let mut inv_freq: Vec<f64> = (0..dim / 2).map(|i| 1.0 / base.powf((2 * i) as f64 / dim as f64)).collect();
        let mut attention_factor = 1.0;
        if let Some(y) = &cfg.yarn {
            let correction_dim = |rotations: f64| {
                dim as f64 * (y.original_max_position_embeddings as f64 / (rotations * 2.0 * std::f64::consts::PI)).ln()
                    / (2.0 * base.ln())
            };
            let low = correction_dim(y.beta_fast).floor().max(0.0);
            let mut high = correction_dim(y.beta_slow).ceil().min(dim as f64 - 1.0);
            if low == high {
                high += 0.001;
            }
            for (i, f) in inv_freq.iter_mut().enumerate() {
                let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                // Pairs below `low` keep their frequency; above `high` they are interpolated by 1/s.
                *f = *f * (1.0 - ramp) + (*f / y.factor) * ramp;
            }
            attention_factor = yarn_mscale(y.factor, y.mscale) / yarn_mscale(y.factor, y.mscale_all_dim);
        }
        Rope { inv_freq: inv_freq.iter().map(|f| *f as f32).collect(), attention_factor: attention_factor as f32 }
    }

    /// Rotates `x`, laid out `[tokens, heads, rope_dim]`, in place; token `t` sits at `positions[t]`.
    pub fn apply(&self, x: &mut [f32], heads: usize, positions: &[u32]) {
        let dim = self.inv_freq.len() * 2;
        assert_eq!(x.len(), positions.len() * heads * dim);
        let mut cos_sin = vec![(0f32, 0f32); dim / 2];
        for (token, &pos) in x.chunks_exact_mut(heads * dim).zip(positions) {
            for (cs, f) in cos_sin.iter_mut().zip(&self.inv_freq) {
                let angle = pos as f32 * f;
                *cs = (angle.cos() * self.attention_factor, angle.sin() * self.attention_factor);
            }
            for head in token.chunks_exact_mut(dim) {
                for (pair, (cos, sin)) in head.chunks_exact_mut(2).zip(&cos_sin) {
                    let (a, b) = (pair[0], pair[1]);
                    pair[0] = a * cos - b * sin;
                    pair[1] = a * sin + b * cos;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Arch, Config, Yarn};

    fn config(yarn: Option<Yarn>) -> Config {
        Config {
            arch: Arch::DeepseekV3,
            vocab_size: 8,
            hidden_size: 8,
            intermediate_size: 8,
            num_hidden_layers: 1,
            num_attention_heads: 1,
            q_lora_rank: None,
            kv_lora_rank: 4,
            qk_nope_head_dim: 4,
            qk_rope_head_dim: 64,
            v_head_dim: 4,
            rms_norm_eps: 1e-6,
            rope_theta: 10000.0,
            yarn,
            max_position_embeddings: 163840,
            moe: None,
            tie_word_embeddings: false,
            bos_token_id: None,
            eos_token_ids: vec![],
            fp8_block_size: None,
        }
    }

    #[test]
    fn yarn_keeps_high_frequencies_and_interpolates_low_ones() {
        let plain = Rope::new(&config(None));
        let yarn = Rope::new(&config(Some(Yarn {
            factor: 40.0,
            original_max_position_embeddings: 4096,
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale: 1.0,
            mscale_all_dim: 1.0,
        })));
        // Design doc: low = 10, high = 23 for V2/V3.
        for i in 0..=10 {
            assert_eq!(yarn.inv_freq[i], plain.inv_freq[i], "pair {i}");
        }
        for i in 23..32 {
            assert!((yarn.inv_freq[i] * 40.0 / plain.inv_freq[i] - 1.0).abs() < 1e-5, "pair {i}");
        }
        let mid = yarn.inv_freq[16] / plain.inv_freq[16];
        assert!(mid < 1.0 && mid > 1.0 / 40.0);
        assert_eq!(yarn.attention_factor, 1.0);
    }

    #[test]
    fn rotation_is_interleaved_and_norm_preserving() {
        let rope = Rope::new(&config(None));
        let mut x = vec![0f32; 64];
        x[0] = 1.0; // pair 0 has ω = 1: position 1 rotates it by one radian within dims (0, 1).
        rope.apply(&mut x, 1, &[1]);
        assert!((x[0] - 1f32.cos()).abs() < 1e-6 && (x[1] - 1f32.sin()).abs() < 1e-6);
        assert!(x[2..].iter().all(|v| *v == 0.0));
    }
}
