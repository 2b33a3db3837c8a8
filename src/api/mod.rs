//! The HTTP service (actix-web): health, metrics and the `/api/v1` API over
//! the store and the data pipelines. JSON everywhere; every error has the
//! shape `{"error": {"code", "message"}}` (see `error`).
//!
//! One file per route group; `startup` wires them together.

mod dashboard;
pub mod error;
mod health;
pub mod metrics;
mod middleware;
mod observations;
mod series;
pub mod startup;

pub use error::ApiError;
pub use startup::{ApiConfig, AppState, Application, BodyLimits};

/// Epoch microseconds (already within the stored range) as RFC 3339 UTC text.
fn rfc3339_micros(micros: i64) -> String {
    chrono::DateTime::from_timestamp_micros(micros)
        .map(|at| at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
        .unwrap_or_else(|| format!("{micros} µs since the epoch"))
}
