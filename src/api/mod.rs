//! The HTTP service (actix-web): health, metrics and the `/api/v1` API over
//! the store and the data pipelines. JSON everywhere; every error has the
//! shape `{"error": {"code", "message"}}` (see `error`). The OpenAPI document
//! is generated from the handlers' annotations (see `openapi`).
//!
//! One file per route group; `startup` wires them together.

mod dashboard;
mod docs;
pub mod error;
mod forecast_memo;
mod forecasts;
mod health;
pub mod metrics;
mod middleware;
mod model_cache;
mod models;
mod observations;
pub mod openapi;
mod query;
pub mod runs;
mod schedules;
mod series;
mod sources;
pub mod startup;
mod training;

use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};

pub use error::ApiError;
pub use forecast_memo::DEFAULT_FORECAST_MEMO_BYTES;
pub use startup::{ApiConfig, AppState, Application, BodyLimits};

/// Epoch microseconds (already within the stored range) as RFC 3339 UTC text.
fn rfc3339_micros(micros: i64) -> String {
    chrono::DateTime::from_timestamp_micros(micros)
        .map(|at| at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
        .unwrap_or_else(|| format!("{micros} µs since the epoch"))
}

/// Named values serialised as a JSON object in the order given (channels in
/// the series' order, quantiles by level), which a map type would sort.
#[derive(Debug, Clone, PartialEq)]
struct OrderedMap<V>(Vec<(String, V)>);

impl<V: Serialize> Serialize for OrderedMap<V> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (name, value) in &self.0 {
            map.serialize_entry(name, value)?;
        }
        map.end()
    }
}
