//! Persisted forecasts (what dashboards plot): a series' latest forecasts in
//! wide form.

use std::collections::BTreeMap;

use actix_web::{HttpResponse, web};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::OrderedMap;
use super::error::{ApiError, ErrorBody};
use super::query;
use super::series::find_series;
use super::startup::AppState;
use crate::data::Frequency;
use crate::store::{Forecast, Series};

/// Forecasts listed when the request names no limit, and the most it may ask for.
const DEFAULT_FORECASTS_LIMIT: u32 = 10;
const MAX_FORECASTS_LIMIT: u32 = 100;

/// A forecast in wide form: one timestamp list and, per channel, the point
/// forecast and each quantile aligned with it.
#[derive(Debug, Serialize, ToSchema)]
pub struct ForecastBody {
    pub id: i64,
    /// The series' name.
    pub series: String,
    /// The model version that produced it.
    pub model_version_id: i64,
    /// When it was issued.
    pub created_at: DateTime<Utc>,
    /// The time of the last observation it used: one step of the series'
    /// frequency before the first timestamp; null for a series without a
    /// regular frequency.
    pub origin: Option<DateTime<Utc>>,
    /// Steps forecast.
    pub horizon: u32,
    /// The quantile levels, ascending; each is a key of every channel's `quantiles`.
    pub quantile_levels: Vec<f64>,
    /// One per step.
    pub timestamps: Vec<DateTime<Utc>>,
    /// Channel name → its forecast, in the series' channel order.
    #[schema(value_type = HashMap<String, ChannelForecast>)]
    pub channels: OrderedMap<ChannelForecast>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ChannelForecast {
    /// The point forecast, one value per timestamp (null where a step is
    /// missing for this channel).
    pub mean: Vec<Option<f64>>,
    /// Quantile level (as written in `quantile_levels`, e.g. "0.1") → one value per timestamp.
    #[schema(value_type = HashMap<String, Vec<Option<f64>>>)]
    pub quantiles: OrderedMap<Vec<Option<f64>>>,
}

impl ForecastBody {
    pub fn new(forecast: Forecast, series: &Series) -> Self {
        // Points come ordered by step, then channel.
        let steps: BTreeMap<u32, DateTime<Utc>> = forecast
            .points
            .iter()
            .map(|point| (point.step, point.ts))
            .collect();
        let position: BTreeMap<u32, usize> = steps
            .keys()
            .enumerate()
            .map(|(index, step)| (*step, index))
            .collect();
        let mut channel_names: Vec<&str> = series
            .channels
            .iter()
            .map(String::as_str)
            .filter(|name| forecast.points.iter().any(|point| point.channel == *name))
            .collect();
        for point in &forecast.points {
            if !channel_names.contains(&point.channel.as_str()) {
                channel_names.push(&point.channel);
            }
        }
        let empty = || vec![None; steps.len()];
        let mut channels: Vec<(String, ChannelForecast)> = channel_names
            .iter()
            .map(|name| {
                let quantiles = forecast
                    .quantile_levels
                    .iter()
                    .map(|level| (level.to_string(), empty()))
                    .collect();
                (
                    name.to_string(),
                    ChannelForecast {
                        mean: empty(),
                        quantiles: OrderedMap(quantiles),
                    },
                )
            })
            .collect();
        for point in &forecast.points {
            let column = position[&point.step];
            let Some((_, channel)) = channels.iter_mut().find(|(name, _)| *name == point.channel)
            else {
                continue;
            };
            channel.mean[column] = Some(point.mean);
            for ((_, values), value) in channel.quantiles.0.iter_mut().zip(&point.quantiles) {
                values[column] = Some(*value);
            }
        }
        let frequency = series
            .frequency
            .as_deref()
            .and_then(|text| Frequency::parse(text).ok());
        let origin = match (frequency, steps.first_key_value()) {
            (Some(frequency), Some((&step, &ts))) => {
                Some(ts - frequency.to_duration() * i32::try_from(step).unwrap_or(1))
            }
            _ => None,
        };
        Self {
            id: forecast.id,
            series: series.name.clone(),
            model_version_id: forecast.model_version_id,
            created_at: forecast.issued_at,
            origin,
            horizon: forecast.horizon,
            quantile_levels: forecast.quantile_levels,
            timestamps: steps.into_values().collect(),
            channels: OrderedMap(channels),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ForecastList {
    /// Most recently issued first.
    pub forecasts: Vec<ForecastBody>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ForecastsQuery {
    /// At most this many forecasts, 1 to 100 (default 10).
    #[param(value_type = Option<u32>)]
    pub limit: Option<String>,
}

/// A series' persisted forecasts, most recently issued first.
#[utoipa::path(
    get,
    path = "/api/v1/series/{name}/forecasts",
    operation_id = "list_forecasts",
    tag = "forecasts",
    params(("name" = String, Path, description = "Series name"), ForecastsQuery),
    responses(
        (status = 200, description = "The forecasts, newest first", body = ForecastList),
        (status = 400, description = "A query parameter is malformed; the message names it", body = ErrorBody),
        (status = 404, description = "No such series", body = ErrorBody),
    )
)]
pub async fn list(
    state: web::Data<AppState>,
    name: web::Path<String>,
    query: web::Query<ForecastsQuery>,
) -> Result<HttpResponse, ApiError> {
    let limit = query::limit(
        query.limit.as_deref(),
        DEFAULT_FORECASTS_LIMIT,
        MAX_FORECASTS_LIMIT,
    )?;
    let series = find_series(&state, &name).await?;
    let forecasts = state
        .store
        .list_forecasts(series.id, limit)
        .await?
        .into_iter()
        .map(|forecast| ForecastBody::new(forecast, &series))
        .collect();
    Ok(HttpResponse::Ok().json(ForecastList { forecasts }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ForecastPoint;

    fn at(hour: u32) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(&format!("2024-01-01T{hour:02}:00:00Z"))
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn points_become_channel_columns_in_series_order_with_an_origin() {
        let series = Series {
            id: 1,
            name: "s".into(),
            frequency: Some("1h".into()),
            timezone: "UTC".into(),
            channels: vec!["load".into(), "temp".into()],
            created_at: at(0),
        };
        let point = |step: u32, channel: &str, mean: f64| ForecastPoint {
            step,
            ts: at(10 + step),
            channel: channel.into(),
            mean,
            quantiles: vec![mean - 1.0, mean + 1.0],
        };
        let forecast = Forecast {
            id: 7,
            series_id: 1,
            model_version_id: 3,
            issued_at: at(11),
            horizon: 2,
            quantile_levels: vec![0.1, 0.9],
            // Sorted by step, then channel name, as the store returns them.
            points: vec![
                point(1, "load", 5.0),
                point(1, "temp", 20.0),
                point(2, "load", 6.0),
                point(2, "temp", 21.0),
            ],
        };
        let body = serde_json::to_value(ForecastBody::new(forecast, &series)).unwrap();
        assert_eq!(body["origin"], "2024-01-01T10:00:00Z");
        assert_eq!(
            body["timestamps"],
            serde_json::json!(["2024-01-01T11:00:00Z", "2024-01-01T12:00:00Z"])
        );
        assert_eq!(
            body["channels"],
            serde_json::json!({
                "load": {"mean": [5.0, 6.0], "quantiles": {"0.1": [4.0, 5.0], "0.9": [6.0, 7.0]}},
                "temp": {"mean": [20.0, 21.0], "quantiles": {"0.1": [19.0, 20.0], "0.9": [21.0, 22.0]}},
            })
        );
    }
}
