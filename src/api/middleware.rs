//! Request middleware: a tracing span, a log line and metrics for every
//! request, and the API key check for writes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::{Method, header};
use actix_web::middleware::Next;
use actix_web::{Error, ResponseError, web};
use tracing::Instrument;

use super::error::ApiError;
use super::metrics::UNMATCHED_ROUTE;
use super::startup::AppState;

/// Wraps each request in an `http_request` span, logs its outcome and records
/// it in the metrics by route pattern.
pub async fn observe_request(
    request: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, Error> {
    static NEXT_REQUEST_ID: AtomicU64 = AtomicU64::new(1);
    let started = Instant::now();
    let method = request.method().to_string();
    let route = request
        .match_pattern()
        .unwrap_or_else(|| UNMATCHED_ROUTE.to_string());
    let state = request.app_data::<web::Data<AppState>>().cloned();
    let span = tracing::info_span!(
        "http_request",
        id = NEXT_REQUEST_ID.fetch_add(1, Ordering::Relaxed),
        method = %method,
        route = %route,
        path = %request.path(),
    );
    let outcome = next.call(request).instrument(span.clone()).await;
    let status = match &outcome {
        Ok(response) => response.status(),
        Err(err) => err.as_response_error().status_code(),
    };
    let elapsed = started.elapsed();
    span.in_scope(|| {
        tracing::info!(
            status = status.as_u16(),
            elapsed_ms = elapsed.as_secs_f64() * 1000.0,
            "answered"
        )
    });
    if let Some(state) = state {
        state
            .metrics
            .record(&method, &route, status.as_u16(), elapsed);
    }
    outcome
}

/// When an API key is configured, every request that is not a read (GET or
/// HEAD) must carry `Authorization: Bearer <key>`.
pub async fn require_api_key(
    request: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, Error> {
    let expected = request
        .app_data::<web::Data<AppState>>()
        .and_then(|state| state.api_key.clone());
    let is_read = matches!(*request.method(), Method::GET | Method::HEAD);
    if let (Some(expected), false) = (expected, is_read) {
        let presented = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "));
        let refusal = match presented {
            None => Some("this request needs an 'Authorization: Bearer <API key>' header"),
            Some(key) if !constant_time_eq(key.as_bytes(), expected.as_bytes()) => {
                Some("the API key is not valid")
            }
            Some(_) => None,
        };
        if let Some(message) = refusal {
            let response = ApiError::Unauthorized(message).error_response();
            return Ok(request.into_response(response).map_into_right_body());
        }
    }
    next.call(request)
        .await
        .map(ServiceResponse::map_into_left_body)
}

/// Compares two byte strings in time that depends only on their lengths, not
/// on where they first differ, so the key cannot be guessed byte by byte from
/// response times.
fn constant_time_eq(presented: &[u8], expected: &[u8]) -> bool {
    let mut difference = u8::from(presented.len() != expected.len());
    for (index, expected_byte) in expected.iter().enumerate() {
        let presented_byte = presented.get(index).copied().unwrap_or(0);
        difference |= presented_byte ^ expected_byte;
    }
    difference == 0
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn equal_only_for_identical_keys() {
        assert!(constant_time_eq(b"s3cret", b"s3cret"));
        assert!(!constant_time_eq(b"s3cres", b"s3cret"));
        assert!(!constant_time_eq(b"s3cre", b"s3cret"));
        assert!(!constant_time_eq(b"s3cret!", b"s3cret"));
        assert!(!constant_time_eq(b"", b"s3cret"));
        // A presented key that is a prefix padded with NUL bytes is not equal either.
        assert!(!constant_time_eq(b"s3cret\0", b"s3cret"));
    }
}
