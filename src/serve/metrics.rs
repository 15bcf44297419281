//! Server metrics, written by the engine thread after every step and read by
//! `GET /metrics` (Prometheus text exposition format 0.0.4).

use std::fmt::Write;
use std::sync::Mutex;

/// A cumulative histogram with fixed upper bounds (seconds), as Prometheus
/// expects: `bucket[i]` counts observations `≤ bounds[i]`, `+Inf` all of them.
#[derive(Clone, Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    n: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram { bounds, counts: vec![0; bounds.len()], sum: 0.0, n: 0 }
    }

    fn observe(&mut self, x: f64) {
        for (c, &b) in self.counts.iter_mut().zip(self.bounds) {
            if x <= b {
                *c += 1;
            }
        }
        self.sum += x;
        self.n += 1;
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.n
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (c, b) in self.counts.iter().zip(self.bounds) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ =
            writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {}\n{name}_count {}", self.n, self.sum, self.n);
    }
}

const TTFT_BOUNDS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
const ITL_BOUNDS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

/// Everything `/metrics` shows. Gauges are the state after the last step.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub running: usize,
    pub waiting: usize,
    /// Sequences and query rows of the last step.
    pub batch_seqs: usize,
    pub batch_rows: usize,
    /// Most sequences in one step so far.
    pub batch_seqs_peak: usize,
    pub kv_pages_total: usize,
    pub kv_pages_used: usize,
    /// Most pages ever held at once (never above the total).
    pub kv_pages_peak: usize,
    pub kv_page_tokens: usize,
    pub kv_page_bytes: usize,
    pub prompt_tokens: u64,
    pub generated_tokens: u64,
    /// Finished requests (one per prompt) by outcome.
    pub finished_stop: u64,
    pub finished_length: u64,
    pub cancelled: u64,
    pub timed_out: u64,
    pub failed: u64,
    pub preemptions: u64,
    pub steps: u64,
    pub ttft: Histogram,
    pub itl: Histogram,
}

impl Default for Snapshot {
    fn default() -> Self {
        Snapshot {
            running: 0,
            waiting: 0,
            batch_seqs: 0,
            batch_rows: 0,
            batch_seqs_peak: 0,
            kv_pages_total: 0,
            kv_pages_used: 0,
            kv_pages_peak: 0,
            kv_page_tokens: 0,
            kv_page_bytes: 0,
            prompt_tokens: 0,
            generated_tokens: 0,
            finished_stop: 0,
            finished_length: 0,
            cancelled: 0,
            timed_out: 0,
            failed: 0,
            preemptions: 0,
            steps: 0,
            ttft: Histogram::new(TTFT_BOUNDS),
            itl: Histogram::new(ITL_BOUNDS),
        }
    }
}

/// Raw latency samples (seconds), kept only when asked for (`bench serve`
/// computes exact percentiles from them); capped so a long run cannot grow
/// without bound.
#[derive(Clone, Debug, Default)]
pub struct Samples {
    pub ttft: Vec<f64>,
    pub itl: Vec<f64>,
}

const MAX_SAMPLES: usize = 4 << 20;

/// The shared metrics: one lock, taken once per engine step and once per scrape.
#[derive(Debug, Default)]
pub struct Metrics {
    snap: Mutex<Snapshot>,
    samples: Option<Mutex<Samples>>,
}

impl Metrics {
    pub fn new(keep_samples: bool) -> Self {
        Metrics { snap: Mutex::new(Snapshot::default()), samples: keep_samples.then(Mutex::default) }
    }

    /// Runs `f` on the snapshot under the lock.
    pub fn update<R>(&self, f: impl FnOnce(&mut Snapshot) -> R) -> R {
        let mut g = self.snap.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut g)
    }

    pub fn snapshot(&self) -> Snapshot {
        self.update(|s| s.clone())
    }

    pub(crate) fn observe_ttft(&self, s: &mut Snapshot, secs: f64) {
        s.ttft.observe(secs);
        if let Some(m) = &self.samples {
            let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
            if g.ttft.len() < MAX_SAMPLES {
                g.ttft.push(secs);
            }
        }
    }

    pub(crate) fn observe_itl(&self, s: &mut Snapshot, secs: f64) {
        s.itl.observe(secs);
        if let Some(m) = &self.samples {
            let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
            if g.itl.len() < MAX_SAMPLES {
                g.itl.push(secs);
            }
        }
    }

    /// Takes the latency samples gathered since the last call (empty unless kept).
    pub fn take_samples(&self) -> Samples {
        self.samples
            .as_ref()
            .map(|m| std::mem::take(&mut *m.lock().unwrap_or_else(|e| e.into_inner())))
            .unwrap_or_default()
    }

    /// Prometheus text format.
    pub fn render(&self) -> String {
        let s = self.snapshot();
        let mut o = String::new();
        let gauge = |o: &mut String, name: &str, help: &str, v: f64| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        gauge(&mut o, "dynsparse_requests_running", "Sequences holding a KV slot.", s.running as f64);
        gauge(
            &mut o,
            "dynsparse_requests_waiting",
            "Sequences queued for admission (preempted ones included).",
            s.waiting as f64,
        );
        gauge(&mut o, "dynsparse_batch_sequences", "Sequences in the last engine step.", s.batch_seqs as f64);
        gauge(
            &mut o,
            "dynsparse_batch_tokens",
            "Query rows (prefill + decode tokens) in the last engine step.",
            s.batch_rows as f64,
        );
        gauge(&mut o, "dynsparse_batch_sequences_peak", "Most sequences in one engine step.", s.batch_seqs_peak as f64);
        gauge(&mut o, "dynsparse_kv_pages_total", "KV cache pages in the pool.", s.kv_pages_total as f64);
        gauge(&mut o, "dynsparse_kv_pages_used", "KV cache pages held by sequences.", s.kv_pages_used as f64);
        gauge(
            &mut o,
            "dynsparse_kv_pages_free",
            "KV cache pages free.",
            s.kv_pages_total.saturating_sub(s.kv_pages_used) as f64,
        );
        gauge(&mut o, "dynsparse_kv_pages_used_peak", "Most KV cache pages held at once.", s.kv_pages_peak as f64);
        gauge(&mut o, "dynsparse_kv_page_tokens", "Tokens per KV cache page.", s.kv_page_tokens as f64);
        gauge(&mut o, "dynsparse_kv_page_bytes", "Bytes of one KV cache page over all layers.", s.kv_page_bytes as f64);
        let counter = |o: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        counter(&mut o, "dynsparse_prompt_tokens_total", "Prompt tokens admitted.", s.prompt_tokens);
        counter(&mut o, "dynsparse_generation_tokens_total", "Tokens generated.", s.generated_tokens);
        counter(
            &mut o,
            "dynsparse_preemptions_total",
            "Sequences preempted (KV pages freed, recomputed later).",
            s.preemptions,
        );
        counter(&mut o, "dynsparse_engine_steps_total", "Engine steps run.", s.steps);
        let _ = writeln!(
            o,
            "# HELP dynsparse_requests_finished_total Finished prompts by outcome.\n# TYPE dynsparse_requests_finished_total counter"
        );
        for (k, v) in [
            ("stop", s.finished_stop),
            ("length", s.finished_length),
            ("cancelled", s.cancelled),
            ("timeout", s.timed_out),
            ("error", s.failed),
        ] {
            let _ = writeln!(o, "dynsparse_requests_finished_total{{reason=\"{k}\"}} {v}");
        }
        s.ttft.render(&mut o, "dynsparse_time_to_first_token_seconds", "From arrival to the first generated token.");
        s.itl.render(
            &mut o,
            "dynsparse_inter_token_latency_seconds",
            "Between consecutive generated tokens of a sequence.",
        );
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_render_in_prometheus_form() {
        let mut h = Histogram::new(&[0.1, 1.0]);
        for x in [0.05, 0.5, 0.5, 2.0] {
            h.observe(x);
        }
        let mut s = String::new();
        h.render(&mut s, "x", "help");
        assert!(s.contains("x_bucket{le=\"0.1\"} 1\n"), "{s}");
        assert!(s.contains("x_bucket{le=\"1\"} 3\n"), "{s}");
        assert!(s.contains("x_bucket{le=\"+Inf\"} 4\n"), "{s}");
        assert!(s.contains("x_count 4\n") && s.contains("x_sum 3.05"), "{s}");
    }
}
