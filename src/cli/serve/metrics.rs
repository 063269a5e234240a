//! The server's counters and histograms, rendered as Prometheus text at `GET /metrics`:
//! requests by endpoint and status, request latency by endpoint, queue depth, requests in
//! flight, batch sizes and batch compute time by kind, and texts, tokens and images embedded
//! (counters: `rate(clipforge_images_total[1m])` is images/s, `..._tokens_total` tokens/s).
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

/// A Prometheus histogram: cumulative bucket counts at fixed upper bounds, sum and count.
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram { bounds, counts: vec![0; bounds.len()], sum: 0.0, count: 0 }
    }
    fn observe(&mut self, v: f64) {
        for (b, c) in self.bounds.iter().zip(self.counts.iter_mut()) {
            if v <= *b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }
    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", self.count);
        let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

const LATENCY_S: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
const BATCH_ITEMS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

/// Everything `/metrics` shows; shared by the handlers, the middleware and the worker.
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    latency: Mutex<BTreeMap<String, Histogram>>,
    batches: Mutex<BTreeMap<&'static str, (Histogram, Histogram)>>,
    pub queue_depth: AtomicUsize,
    pub in_flight: AtomicUsize,
    pub texts: AtomicU64,
    pub tokens: AtomicU64,
    pub images: AtomicU64,
    pub rejected: AtomicU64,
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics {
            requests: Mutex::default(),
            latency: Mutex::default(),
            batches: Mutex::default(),
            queue_depth: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            texts: AtomicU64::new(0),
            tokens: AtomicU64::new(0),
            images: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
        }
    }

    /// One finished request: its endpoint (route, or "other"), status and seconds.
    pub fn request(&self, endpoint: &str, status: u16, seconds: f64) {
        if let Ok(mut m) = self.requests.lock() {
            *m.entry((endpoint.to_string(), status)).or_default() += 1;
        }
        if let Ok(mut m) = self.latency.lock() {
            m.entry(endpoint.to_string()).or_insert_with(|| Histogram::new(LATENCY_S)).observe(seconds);
        }
    }

    /// One batch the worker ran: kind ("text" or "image"), items, seconds of model time.
    pub fn batch(&self, kind: &'static str, items: usize, seconds: f64) {
        if let Ok(mut m) = self.batches.lock() {
            let (size, time) = m.entry(kind).or_insert_with(|| (Histogram::new(BATCH_ITEMS), Histogram::new(LATENCY_S)));
            size.observe(items as f64);
            time.observe(seconds);
        }
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str("# HELP clipforge_requests_total HTTP requests by endpoint and status.\n# TYPE clipforge_requests_total counter\n");
        if let Ok(m) = self.requests.lock() {
            for ((e, s), n) in m.iter() {
                let _ = writeln!(out, "clipforge_requests_total{{endpoint=\"{e}\",status=\"{s}\"}} {n}");
            }
        }
        out.push_str("# HELP clipforge_request_duration_seconds Request latency by endpoint.\n# TYPE clipforge_request_duration_seconds histogram\n");
        if let Ok(m) = self.latency.lock() {
            for (e, h) in m.iter() {
                h.render(&mut out, "clipforge_request_duration_seconds", &format!("endpoint=\"{e}\""));
            }
        }
        out.push_str("# HELP clipforge_batch_size Inputs per batch the model ran, by kind.\n# TYPE clipforge_batch_size histogram\n");
        let batches = self.batches.lock();
        if let Ok(m) = &batches {
            for (k, (size, _)) in m.iter() {
                size.render(&mut out, "clipforge_batch_size", &format!("kind=\"{k}\""));
            }
        }
        out.push_str("# HELP clipforge_batch_duration_seconds Model time per batch, by kind.\n# TYPE clipforge_batch_duration_seconds histogram\n");
        if let Ok(m) = &batches {
            for (k, (_, time)) in m.iter() {
                time.render(&mut out, "clipforge_batch_duration_seconds", &format!("kind=\"{k}\""));
            }
        }
        drop(batches);
        let gauge = |out: &mut String, name: &str, help: &str, kind: &str, v: u64| {
            let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n");
        };
        gauge(&mut out, "clipforge_queue_depth", "Requests waiting for the model.", "gauge", self.queue_depth.load(Ordering::Relaxed) as u64);
        gauge(&mut out, "clipforge_requests_in_flight", "Requests being served.", "gauge", self.in_flight.load(Ordering::Relaxed) as u64);
        gauge(
            &mut out,
            "clipforge_requests_rejected_total",
            "Requests refused with 429 (over --max-concurrent-requests).",
            "counter",
            self.rejected.load(Ordering::Relaxed),
        );
        gauge(&mut out, "clipforge_texts_total", "Texts embedded.", "counter", self.texts.load(Ordering::Relaxed));
        gauge(
            &mut out,
            "clipforge_tokens_total",
            "Tokens embedded (start and end tokens included); rate() is tokens/s.",
            "counter",
            self.tokens.load(Ordering::Relaxed),
        );
        gauge(&mut out, "clipforge_images_total", "Images embedded; rate() is images/s.", "counter", self.images.load(Ordering::Relaxed));
        out
    }
}
