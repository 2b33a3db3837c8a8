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

use super::startup::AppState;

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
        let histogram = recorded
            .latencies
            .entry((method.to_string(), route.to_string()))
            .or_default();
        let bucket = LATENCY_BUCKETS_SECONDS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(LATENCY_BUCKETS_SECONDS.len());
        histogram.buckets[bucket] += 1;
        histogram.sum_seconds += seconds;
        histogram.count += 1;
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
            let mut cumulative = 0;
            for (bound, count) in LATENCY_BUCKETS_SECONDS.iter().zip(&histogram.buckets) {
                cumulative += count;
                let _ = writeln!(
                    text,
                    "http_request_duration_seconds_bucket{{{labels},le=\"{bound}\"}} {cumulative}"
                );
            }
            let _ = writeln!(
                text,
                "http_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
                histogram.count
            );
            let _ = writeln!(
                text,
                "http_request_duration_seconds_sum{{{labels}}} {}",
                histogram.sum_seconds
            );
            let _ = writeln!(
                text,
                "http_request_duration_seconds_count{{{labels}}} {}",
                histogram.count
            );
        }
        text
    }
}

/// Label values escape backslash, double quote and line feed.
fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Request counts and latencies in the Prometheus text format.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "health",
    responses((status = 200, description = "Prometheus text exposition format 0.0.4", body = String, content_type = "text/plain"))
)]
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(state.metrics.render())
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
