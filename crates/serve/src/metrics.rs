//! Prometheus metrics in the text exposition format: counters, gauges and
//! latency histograms, without a metrics library (a few atomics and a mutex).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;

/// Latency buckets in seconds, from sub-millisecond to minutes.
const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// A cumulative histogram of seconds.
pub struct Histogram {
    counts: Vec<AtomicU64>,
    count: AtomicU64,
    /// Sum in microseconds, so it can be atomic.
    sum_us: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: BUCKETS.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, seconds: f64) {
        let seconds = seconds.max(0.0);
        for (b, c) in BUCKETS.iter().zip(&self.counts) {
            if seconds <= *b {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in BUCKETS.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {}", c.load(Ordering::Relaxed));
        }
        let n = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {n}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_us.load(Ordering::Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {n}");
    }
}

/// The gateway's metrics.
#[derive(Default)]
pub struct GatewayMetrics {
    /// (endpoint, status) → requests answered.
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    pub prompt_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
    pub in_flight: AtomicI64,
    /// Time to pick a worker (controller round trip).
    pub dispatch: Histogram,
    /// Request start to the first generated text (queue + prefill).
    pub time_to_first_token: Histogram,
    /// Between successive chunks of generated text (decode).
    pub inter_token: Histogram,
    /// Whole request.
    pub request_duration: Histogram,
}

impl GatewayMetrics {
    /// Counts a request answered with `status`.
    pub fn count_request(&self, endpoint: &str, status: u16) {
        let mut m = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry((endpoint.to_string(), status)).or_default() += 1;
    }

    /// The text exposition; `queue` is the workers' total queue length, if known.
    pub fn render(&self, queue: Option<usize>) -> String {
        let mut out = String::new();
        out.push_str("# HELP vicugna_requests_total Requests answered, by endpoint and HTTP status.\n");
        out.push_str("# TYPE vicugna_requests_total counter\n");
        for ((ep, st), n) in self.requests.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(out, "vicugna_requests_total{{endpoint=\"{ep}\",status=\"{st}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP vicugna_prompt_tokens_total Prompt tokens processed.\n# TYPE vicugna_prompt_tokens_total counter\nvicugna_prompt_tokens_total {}",
            self.prompt_tokens.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP vicugna_completion_tokens_total Tokens generated.\n# TYPE vicugna_completion_tokens_total counter\nvicugna_completion_tokens_total {}",
            self.completion_tokens.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP vicugna_requests_in_flight Requests being answered now.\n# TYPE vicugna_requests_in_flight gauge\nvicugna_requests_in_flight {}",
            self.in_flight.load(Ordering::Relaxed)
        );
        if let Some(q) = queue {
            let _ = writeln!(
                out,
                "# HELP vicugna_worker_queue_length Requests running or waiting on all workers.\n# TYPE vicugna_worker_queue_length gauge\nvicugna_worker_queue_length {q}"
            );
        }
        self.dispatch.render(
            &mut out,
            "vicugna_dispatch_seconds",
            "Time to pick a worker through the controller.",
        );
        self.time_to_first_token.render(
            &mut out,
            "vicugna_time_to_first_token_seconds",
            "Request start to first generated text (queue and prefill).",
        );
        self.inter_token.render(
            &mut out,
            "vicugna_inter_token_seconds",
            "Time between streamed pieces of generated text (decode).",
        );
        self.request_duration.render(
            &mut out,
            "vicugna_request_duration_seconds",
            "Whole request, first byte in to last byte out.",
        );
        out
    }
}

/// A worker's metrics.
#[derive(Default)]
pub struct WorkerMetrics {
    pub requests: AtomicU64,
    pub rejected: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
    /// Waiting for a batch slot.
    pub queue: Histogram,
    /// Slot granted to first token (prefill).
    pub prefill: Histogram,
    /// Per generated token after the first (decode).
    pub decode_per_token: Histogram,
}

impl WorkerMetrics {
    /// The text exposition, with the current queue.
    pub fn render(&self, running: usize, waiting: usize) -> String {
        let mut out = String::new();
        for (name, help, kind, v) in [
            (
                "vicugna_worker_requests_total",
                "Generation requests admitted.",
                "counter",
                self.requests.load(Ordering::Relaxed),
            ),
            (
                "vicugna_worker_rejected_total",
                "Requests refused because the queue was full.",
                "counter",
                self.rejected.load(Ordering::Relaxed),
            ),
            (
                "vicugna_worker_prompt_tokens_total",
                "Prompt tokens processed.",
                "counter",
                self.prompt_tokens.load(Ordering::Relaxed),
            ),
            (
                "vicugna_worker_completion_tokens_total",
                "Tokens generated.",
                "counter",
                self.completion_tokens.load(Ordering::Relaxed),
            ),
            (
                "vicugna_worker_running",
                "Requests in the batch.",
                "gauge",
                running as u64,
            ),
            (
                "vicugna_worker_waiting",
                "Requests waiting for a batch slot.",
                "gauge",
                waiting as u64,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        }
        self.queue.render(
            &mut out,
            "vicugna_worker_queue_seconds",
            "Time waiting for a batch slot.",
        );
        self.prefill.render(
            &mut out,
            "vicugna_worker_prefill_seconds",
            "Batch slot to first token (prefill).",
        );
        self.decode_per_token.render(
            &mut out,
            "vicugna_worker_decode_token_seconds",
            "Time per generated token after the first.",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let h = Histogram::default();
        h.observe(0.003);
        h.observe(0.7);
        let mut s = String::new();
        h.render(&mut s, "x", "help");
        assert!(s.contains("x_bucket{le=\"0.0025\"} 0"));
        assert!(s.contains("x_bucket{le=\"0.005\"} 1"));
        assert!(s.contains("x_bucket{le=\"1\"} 2"));
        assert!(s.contains("x_bucket{le=\"+Inf\"} 2"));
        assert!(s.contains("x_count 2"));
    }
}
