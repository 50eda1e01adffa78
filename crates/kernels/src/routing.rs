//! DeepSeekMoE router: from router logits to each token's experts and weights, in f32.
//!
//! - V2-Lite `greedy`: top-k of softmax scores.
//! - V2 `group_limited_greedy`: a group's score is its best expert; only the `topk_group` best
//!   groups compete.
//! - V3 `noaux_tc`: sigmoid scores plus `e_score_correction_bias` select (a group's score is the sum
//!   of its two best biased scores), but the weights come from the unbiased scores.
//!
//! Weights are renormalised over the chosen experts when `norm_topk_prob`, then multiplied by
//! `routed_scaling_factor`. Excluded experts are masked with −∞, as DeepSeek's reference does.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scoring {
    Softmax,
    Sigmoid,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopkMethod {
    Greedy,
    GroupLimitedGreedy,
    NoauxTc,
}

#[derive(Clone, Debug)]
pub struct RouterConfig {
    pub num_experts: usize,
    pub top_k: usize,
    pub scoring: Scoring,
    pub method: TopkMethod,
    pub n_group: usize,
    pub topk_group: usize,
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f32,
}

/// The routing of a batch of tokens: `top_k` (expert, weight) pairs per token, best first.
#[derive(Clone, Debug, PartialEq)]
pub struct Routing {
    pub top_k: usize,
    pub experts: Vec<u32>,
    pub weights: Vec<f32>,
}

/// Routes every token. `logits` is `[tokens, num_experts]`; `bias` is the correction bias, used for
/// selection only.
pub fn route(cfg: &RouterConfig, logits: &[f32], bias: Option<&[f32]>) -> Routing {
    let e = cfg.num_experts;
    assert_eq!(logits.len() % e, 0);
    assert!(cfg.top_k <= e && cfg.n_group >= 1 && e.is_multiple_of(cfg.n_group));
    let tokens = logits.len() / e;
    let mut routing = Routing {
        top_k: cfg.top_k,
        experts: Vec::with_capacity(tokens * cfg.top_k),
        weights: Vec::with_capacity(tokens * cfg.top_k),
    };
    let mut scores = vec![0f32; e];
    let mut select = vec![0f32; e];
    for row in logits.chunks_exact(e) {
        scores.copy_from_slice(row);
        match cfg.scoring {
            Scoring::Softmax => crate::vector::softmax_in_place(&mut scores),
            Scoring::Sigmoid => scores.iter_mut().for_each(|s| *s = 1.0 / (1.0 + (-*s).exp())),
        }
        select.copy_from_slice(&scores);
        if let Some(bias) = bias {
            select.iter_mut().zip(bias).for_each(|(s, b)| *s += b);
        }
        match cfg.method {
            TopkMethod::Greedy => {}
            TopkMethod::GroupLimitedGreedy => mask_groups(cfg, &mut select, |g| top_n_sum(g, 1)),
            TopkMethod::NoauxTc => mask_groups(cfg, &mut select, |g| top_n_sum(g, 2)),
        }
        let chosen = top_n_indices(&select, cfg.top_k);
        let mut weights: Vec<f32> = chosen.iter().map(|&i| scores[i]).collect();
        if cfg.norm_topk_prob && cfg.top_k > 1 {
            let denom = weights.iter().sum::<f32>() + 1e-20;
            weights.iter_mut().for_each(|w| *w /= denom);
        }
        routing.experts.extend(chosen.iter().map(|&i| i as u32));
        routing.weights.extend(weights.iter().map(|w| w * cfg.routed_scaling_factor));
    }
    routing
}

/// Keeps the experts of the `topk_group` best groups (by `group_score`) and sets the rest to −∞.
fn mask_groups(cfg: &RouterConfig, select: &mut [f32], group_score: impl Fn(&[f32]) -> f32) {
    let size = cfg.num_experts / cfg.n_group;
    let group_scores: Vec<f32> = select.chunks_exact(size).map(group_score).collect();
    let keep = top_n_indices(&group_scores, cfg.topk_group);
    for (g, group) in select.chunks_exact_mut(size).enumerate() {
        if !keep.contains(&g) {
            group.fill(f32::NEG_INFINITY);
        }
    }
}

fn top_n_sum(xs: &[f32], n: usize) -> f32 {
    top_n_indices(xs, n).iter().map(|&i| xs[i]).sum()
}

/// Indices of the `n` largest values, largest first; ties go to the lower index.
pub fn top_n_indices(xs: &[f32], n: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..xs.len()).collect();
    idx.sort_by(|&a, &b| xs[b].total_cmp(&xs[a]).then(a.cmp(&b)));
    idx.truncate(n);
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(scoring: Scoring, method: TopkMethod) -> RouterConfig {
        RouterConfig {
            num_experts: 8,
            top_k: 2,
            scoring,
            method,
            n_group: 4,
            topk_group: 2,
            norm_topk_prob: false,
            routed_scaling_factor: 1.0,
        }
    }

    fn close(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6)
    }

    #[test]
    fn greedy_softmax_takes_the_top_probabilities_unnormalised() {
        // softmax of ln([1,2,3,4]) = [0.1, 0.2, 0.3, 0.4].
        let logits: Vec<f32> = [1f32, 2., 3., 4.].iter().map(|x| x.ln()).collect();
        let c = RouterConfig { num_experts: 4, n_group: 1, topk_group: 1, ..cfg(Scoring::Softmax, TopkMethod::Greedy) };
        let r = route(&c, &logits, None);
        assert_eq!(r.experts, [3, 2]);
        assert!(close(&r.weights, &[0.4, 0.3]));
        let scaled = route(&RouterConfig { routed_scaling_factor: 2.0, ..c }, &logits, None);
        assert!(close(&scaled.weights, &[0.8, 0.6]));
    }

    #[test]
    fn group_limited_greedy_ranks_groups_by_their_best_expert() {
        // Probabilities (already normalised): groups {0,1} {2,3} {4,5} {6,7}.
        // Group maxima: 0.20, 0.19, 0.18, 0.15 → groups 0 and 1 kept. Plain top-2 would pick
        // experts 0 (0.20) and 4 (0.18)... but 4's group is out, so the second is 2 (0.19).
        let p = [0.20f32, 0.01, 0.19, 0.02, 0.18, 0.17, 0.15, 0.08];
        let logits: Vec<f32> = p.iter().map(|x| x.ln()).collect();
        let r = route(&cfg(Scoring::Softmax, TopkMethod::GroupLimitedGreedy), &logits, None);
        assert_eq!(r.experts, [0, 2]);
        assert!(close(&r.weights, &[0.20, 0.19]));
    }

    #[test]
    fn noaux_tc_selects_with_bias_weights_without_and_ranks_groups_by_top2_sum() {
        // Sigmoid scores chosen directly through their logits.
        let s = [0.9f32, 0.1, 0.5, 0.5, 0.8, 0.3, 0.2, 0.2];
        let logits: Vec<f32> = s.iter().map(|p| (p / (1.0 - p)).ln()).collect();
        // Bias lifts expert 7 (0.2 + 0.7 = 0.9) and sinks expert 0 (0.9 - 0.6 = 0.3).
        let bias = [-0.6f32, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.7];
        // Biased: [0.3,0.1 | 0.5,0.5 | 0.8,0.3 | 0.2,0.9]. Top-2 sums: 0.4, 1.0, 1.1, 1.1.
        // A max-based group score would keep groups 3 (0.9) and 2 (0.8) too, but would rank group 1
        // (0.5) above group 0 — the top-2 sum keeps groups 2 and 3 by 1.1 vs 1.0.
        let c = RouterConfig {
            norm_topk_prob: true,
            routed_scaling_factor: 2.5,
            ..cfg(Scoring::Sigmoid, TopkMethod::NoauxTc)
        };
        let r = route(&c, &logits, Some(&bias));
        // Selection among groups 2,3 by biased score: expert 7 (0.9), expert 4 (0.8).
        assert_eq!(r.experts, [7, 4]);
        // Weights from unbiased sigmoid: 0.2 and 0.8, renormalised to 0.2 / 0.8, times 2.5.
        assert!(close(&r.weights, &[0.5, 2.0]), "{:?}", r.weights);
    }

    #[test]
    fn noaux_tc_group_score_is_the_sum_of_the_two_best() {
        // Group 0 has one strong expert, group 1 two good ones: max prefers group 0, top-2 sum group 1.
        let s = [0.95f32, 0.05, 0.7, 0.7, 0.1, 0.1, 0.1, 0.1];
        let logits: Vec<f32> = s.iter().map(|p| (p / (1.0 - p)).ln()).collect();
        let c = RouterConfig { topk_group: 1, ..cfg(Scoring::Sigmoid, TopkMethod::NoauxTc) };
        let r = route(&c, &logits, Some(&[0.0; 8]));
        assert_eq!(r.experts, [2, 3]);
        assert!(close(&r.weights, &[0.7, 0.7]));
    }

    #[test]
    fn masking_uses_negative_infinity_not_zero() {
        // With negative biased scores, a zero fill would let excluded experts win.
        let s = [0.5f32; 8];
        let logits = vec![0.0f32; 8];
        let bias = [-0.1f32, -0.9, -0.95, -0.95, -2.0, -2.0, -2.0, -2.0];
        assert!(s.iter().zip(&bias).all(|(a, b)| a + b < 0.45));
        let c = RouterConfig { topk_group: 1, ..cfg(Scoring::Sigmoid, TopkMethod::NoauxTc) };
        let r = route(&c, &logits, Some(&bias));
        // Group 0 (sum -0.4+... = 0.4 + -0.4 = 0.0) beats the others; both of its experts chosen.
        assert_eq!(r.experts, [0, 1]);
    }
}
