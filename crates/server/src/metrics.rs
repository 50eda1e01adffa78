//! Prometheus metrics of the HTTP layer (requests by status, latency histograms), rendered
//! together with the engine's counters at `GET /metrics`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use mlaserve_engine::EngineMetrics;

pub struct Histogram {
    name: &'static str,
    help: &'static str,
    bounds: &'static [f64],
    buckets: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new(name: &'static str, help: &'static str, bounds: &'static [f64]) -> Self {
        Histogram {
            name,
            help,
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = self.bounds.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_micros.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String) {
        let (name, mut cumulative) = (self.name, 0);
        let _ = writeln!(out, "# HELP {name} {}\n# TYPE {name} histogram", self.help);
        for (bound, bucket) in self.bounds.iter().zip(&self.buckets) {
            cumulative += bucket.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}\n{name}_sum {sum}\n{name}_count {count}");
    }
}

const LATENCY: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];
const PER_TOKEN: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];

pub struct HttpMetrics {
    requests: Mutex<BTreeMap<u16, u64>>,
    pub time_to_first_token: Histogram,
    pub time_per_output_token: Histogram,
    pub e2e_latency: Histogram,
}

impl Default for HttpMetrics {
    fn default() -> Self {
        HttpMetrics {
            requests: Mutex::default(),
            time_to_first_token: Histogram::new(
                "mlaserve_time_to_first_token_seconds",
                "Time from request arrival to the first generated token.",
                LATENCY,
            ),
            time_per_output_token: Histogram::new(
                "mlaserve_time_per_output_token_seconds",
                "Mean time between generated tokens of a request.",
                PER_TOKEN,
            ),
            e2e_latency: Histogram::new(
                "mlaserve_e2e_request_latency_seconds",
                "Time from request arrival to its last token.",
                LATENCY,
            ),
        }
    }
}

impl HttpMetrics {
    pub fn count_response(&self, status: u16) {
        *self.requests.lock().expect("metrics lock").entry(status).or_default() += 1;
    }

    pub fn render(&self, engine: Option<&EngineMetrics>) -> String {
        let mut out = String::new();
        out.push_str("# HELP mlaserve_http_requests_total API requests by response status.\n");
        out.push_str("# TYPE mlaserve_http_requests_total counter\n");
        for (status, n) in self.requests.lock().expect("metrics lock").iter() {
            let _ = writeln!(out, "mlaserve_http_requests_total{{status=\"{status}\"}} {n}");
        }
        for h in [&self.time_to_first_token, &self.time_per_output_token, &self.e2e_latency] {
            h.render(&mut out);
        }
        if let Some(engine) = engine {
            engine.render(&mut out);
        }
        out
    }
}
