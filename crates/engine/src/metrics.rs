//! The engine's counters and gauges, written by the engine thread and read by the server's
//! `/metrics` endpoint under these names.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
pub struct EngineMetrics {
    pub requests_running: AtomicU64,
    pub requests_waiting: AtomicU64,
    /// Blocks held by live sequences (evictable prefix-cache blocks are not counted).
    pub kv_blocks_used: AtomicU64,
    pub kv_blocks_total: AtomicU64,
    pub prefix_cache_hit_tokens_total: AtomicU64,
    pub preemptions_total: AtomicU64,
    pub prompt_tokens_total: AtomicU64,
    pub generation_tokens_total: AtomicU64,
}

impl EngineMetrics {
    /// (name, type, help, value) of every metric.
    pub fn samples(&self) -> [(&'static str, &'static str, &'static str, u64); 8] {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        [
            ("mlaserve_requests_running", "gauge", "Requests being generated.", get(&self.requests_running)),
            ("mlaserve_requests_waiting", "gauge", "Requests queued for admission.", get(&self.requests_waiting)),
            (
                "mlaserve_kv_blocks_used",
                "gauge",
                "Latent-cache blocks held by live sequences.",
                get(&self.kv_blocks_used),
            ),
            ("mlaserve_kv_blocks_total", "gauge", "Latent-cache blocks in all.", get(&self.kv_blocks_total)),
            (
                "mlaserve_prefix_cache_hit_tokens_total",
                "counter",
                "Prompt tokens served from the prefix cache.",
                get(&self.prefix_cache_hit_tokens_total),
            ),
            (
                "mlaserve_preemptions_total",
                "counter",
                "Sequences preempted for lack of blocks.",
                get(&self.preemptions_total),
            ),
            ("mlaserve_prompt_tokens_total", "counter", "Prompt tokens submitted.", get(&self.prompt_tokens_total)),
            ("mlaserve_generation_tokens_total", "counter", "Tokens generated.", get(&self.generation_tokens_total)),
        ]
    }

    /// Prometheus text exposition of every metric.
    pub fn render(&self, out: &mut String) {
        for (name, kind, help, value) in self.samples() {
            let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n");
        }
    }
}
