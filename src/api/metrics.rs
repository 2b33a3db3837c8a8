//! `GET /metrics`: request counts and latencies in the Prometheus text format.
//!
//! Labels are the method, the route *pattern* (`/api/v1/series/{name}`, never
//! the concrete path) and the status, so the number of series never grows the
//! number of time series exported.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

use actix_web::{HttpResponse, web};

use super::forecast_memo::MemoOutcome;
use super::startup::AppState;
use crate::store::RunStatistic;

/// Upper bounds (seconds) of the latency histogram buckets.
const LATENCY_BUCKETS_SECONDS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// The route label of requests that matched no route.
pub const UNMATCHED_ROUTE: &str = "unmatched";

#[derive(Default)]
pub struct HttpMetrics {
    inner: Mutex<Recorded>,
}

#[derive(Default)]
struct Recorded {
    /// (method, route, status) → requests.
    requests: BTreeMap<(String, String, u16), u64>,
    /// (method, route) → latency histogram.
    latencies: BTreeMap<(String, String), LatencyHistogram>,
    forecasts: LatencyHistogram,
    forecasts_reused: u64,
    forecasts_computed: u64,
}

#[derive(Default)]
struct LatencyHistogram {
    /// Non-cumulative counts per bucket; the last slot counts values above every bound.
    buckets: [u64; LATENCY_BUCKETS_SECONDS.len() + 1],
    sum_seconds: f64,
    count: u64,
}

impl HttpMetrics {
    pub fn record(&self, method: &str, route: &str, status: u16, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let mut recorded = self
            .inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *recorded
            .requests
            .entry((method.to_string(), route.to_string(), status))
            .or_default() += 1;
        recorded
            .latencies
            .entry((method.to_string(), route.to_string()))
            .or_default()
            .observe(seconds);
    }

    /// Everything recorded so far in the Prometheus text exposition format (0.0.4).
    pub fn render(&self) -> String {
        let recorded = self
            .inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut text = String::new();
        text.push_str("# HELP http_requests_total HTTP requests answered, by method, route pattern and status.\n");
        text.push_str("# TYPE http_requests_total counter\n");
        for ((method, route, status), count) in &recorded.requests {
            let _ = writeln!(
                text,
                "http_requests_total{{method=\"{}\",route=\"{}\",status=\"{status}\"}} {count}",
                escape_label(method),
                escape_label(route)
            );
        }
        text.push_str("# HELP http_request_duration_seconds Time from receiving a request to producing its response.\n");
        text.push_str("# TYPE http_request_duration_seconds histogram\n");
        for ((method, route), histogram) in &recorded.latencies {
            let labels = format!(
                "method=\"{}\",route=\"{}\"",
                escape_label(method),
                escape_label(route)
            );
            histogram.write(&mut text, "http_request_duration_seconds", &labels);
        }
        text.push_str("# HELP forecast_compute_seconds Time to compute a fresh forecast from the cached champion (reading the recent rows and the model's forward pass).\n");
        text.push_str("# TYPE forecast_compute_seconds histogram\n");
        recorded
            .forecasts
            .write(&mut text, "forecast_compute_seconds", "");
        text.push_str("# HELP forecasts_served_total Forecasts answered, by whether they were computed for the request or reused (same champion, same rows).\n");
        text.push_str("# TYPE forecasts_served_total counter\n");
        let _ = writeln!(
            text,
            "forecasts_served_total{{source=\"computed\"}} {}",
            recorded.forecasts_computed
        );
        let _ = writeln!(
            text,
            "forecasts_served_total{{source=\"reused\"}} {}",
            recorded.forecasts_reused
        );
        text
    }

    /// Counts a forecast served, by whether it was computed for the request.
    pub fn record_forecast_served(&self, outcome: MemoOutcome) {
        let mut recorded = self
            .inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match outcome {
            MemoOutcome::Reused => recorded.forecasts_reused += 1,
            MemoOutcome::Computed => recorded.forecasts_computed += 1,
        }
    }

    /// Records the time one fresh forecast took to compute.
    pub fn record_forecast(&self, elapsed: Duration) {
        let mut recorded = self
            .inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        recorded.forecasts.observe(elapsed.as_secs_f64());
    }
}

impl LatencyHistogram {
    fn observe(&mut self, seconds: f64) {
        let bucket = LATENCY_BUCKETS_SECONDS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(LATENCY_BUCKETS_SECONDS.len());
        self.buckets[bucket] += 1;
        self.sum_seconds += seconds;
        self.count += 1;
    }

    /// The histogram's lines under `name` with `labels` (may be empty).
    fn write(&self, text: &mut String, name: &str, labels: &str) {
        let join = |extra: &str| match (labels.is_empty(), extra.is_empty()) {
            (true, true) => String::new(),
            (true, false) => format!("{{{extra}}}"),
            (false, true) => format!("{{{labels}}}"),
            (false, false) => format!("{{{labels},{extra}}}"),
        };
        let mut cumulative = 0;
        for (bound, count) in LATENCY_BUCKETS_SECONDS.iter().zip(&self.buckets) {
            cumulative += count;
            let _ = writeln!(
                text,
                "{name}_bucket{} {cumulative}",
                join(&format!("le=\"{bound}\""))
            );
        }
        let _ = writeln!(text, "{name}_bucket{} {}", join("le=\"+Inf\""), self.count);
        let _ = writeln!(text, "{name}_sum{} {}", join(""), self.sum_seconds);
        let _ = writeln!(text, "{name}_count{} {}", join(""), self.count);
    }
}

/// Runs in the store by kind and status, and their seconds from start to finish: the same
/// figures from every process that shares the store.
fn render_runs(statistics: &[RunStatistic]) -> String {
    let mut text = String::new();
    text.push_str("# HELP runs Runs in the store, by kind and status.\n# TYPE runs gauge\n");
    for stat in statistics {
        let _ = writeln!(
            text,
            "runs{{kind=\"{}\",status=\"{}\"}} {}",
            stat.kind, stat.status, stat.runs
        );
    }
    text.push_str("# HELP run_seconds Seconds from start to finish of the runs in the store (training time for train and finetune runs), by kind and status.\n# TYPE run_seconds gauge\n");
    for stat in statistics {
        let _ = writeln!(
            text,
            "run_seconds{{kind=\"{}\",status=\"{}\"}} {}",
            stat.kind, stat.status, stat.seconds
        );
    }
    text
}

/// Label values escape backslash, double quote and line feed.
fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Request counts and latencies, forecast compute time, and runs by kind and status, in the
/// Prometheus text format.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "health",
    responses((status = 200, description = "Prometheus text exposition format 0.0.4", body = String, content_type = "text/plain"))
)]
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    let mut text = state.metrics.render();
    match state.store.run_statistics().await {
        Ok(statistics) => text.push_str(&render_runs(&statistics)),
        // The HTTP figures are still worth serving when the store is away.
        Err(err) => tracing::warn!(error = %err, "run statistics unavailable for /metrics"),
    }
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_counts_are_per_status() {
        let metrics = HttpMetrics::default();
        metrics.record("GET", "/livez", 200, Duration::from_micros(500));
        metrics.record("GET", "/livez", 200, Duration::from_millis(20));
        metrics.record("GET", "/livez", 503, Duration::from_secs(30));
        let text = metrics.render();
        assert!(
            text.contains(
                "http_requests_total{method=\"GET\",route=\"/livez\",status=\"200\"} 2\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "http_requests_total{method=\"GET\",route=\"/livez\",status=\"503\"} 1\n"
            ),
            "{text}"
        );
        assert!(text.contains("http_request_duration_seconds_bucket{method=\"GET\",route=\"/livez\",le=\"0.001\"} 1\n"), "{text}");
        assert!(text.contains("http_request_duration_seconds_bucket{method=\"GET\",route=\"/livez\",le=\"0.025\"} 2\n"), "{text}");
        assert!(text.contains("http_request_duration_seconds_bucket{method=\"GET\",route=\"/livez\",le=\"10\"} 2\n"), "{text}");
        assert!(text.contains("http_request_duration_seconds_bucket{method=\"GET\",route=\"/livez\",le=\"+Inf\"} 3\n"), "{text}");
        assert!(
            text.contains(
                "http_request_duration_seconds_count{method=\"GET\",route=\"/livez\"} 3\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
