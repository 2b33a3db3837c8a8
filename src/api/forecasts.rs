//! Persisted forecasts (what dashboards plot): a series' latest forecasts in
//! wide form.

use std::collections::BTreeMap;
use std::sync::Arc;

use actix_web::web::Bytes;
use actix_web::{HttpResponse, web};
use chrono::{DateTime, SubsecRound, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::OrderedMap;
use super::error::{ApiError, ErrorBody};
use super::forecast_memo::{MemoForecast, MemoKey, Selection};
use super::query;
use super::series::find_series;
use super::startup::AppState;
use crate::data::{FrameOptions, Frequency, load_frame};
use crate::forecast::xlstm::{SeriesData, XlstmModel, forecast_latest};
use crate::forecast::{ForecastError, Predict};
use crate::jobs::training::forecast_record;
use crate::store::{Forecast, Series};

/// Forecasts listed when the request names no limit, and the most it may ask for.
const DEFAULT_FORECASTS_LIMIT: u32 = 10;
const MAX_FORECASTS_LIMIT: u32 = 100;

/// A forecast in wide form: one timestamp list and, per channel, the point
/// forecast and each quantile aligned with it.
#[derive(Debug, Serialize, ToSchema)]
pub struct ForecastBody {
    /// The stored forecast's id; null for a fresh forecast that was not persisted.
    pub id: Option<i64>,
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
            id: Some(forecast.id),
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

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct FreshForecastQuery {
    /// Steps to forecast, 1 to the model's horizon (default: the model's horizon).
    #[param(value_type = Option<u32>)]
    pub horizon: Option<String>,
    /// Comma-separated quantile levels among the model's (default: all of them).
    pub quantiles: Option<String>,
    /// `true` stores the forecast for the dashboards (default `false`).
    #[param(value_type = Option<bool>)]
    pub persist: Option<String>,
}

/// A fresh forecast of the steps after the series' last observation, from its champion
/// model (held in memory) and its latest observations. It is computed once per champion and
/// state of the rows: until new observations arrive or another version becomes champion,
/// requests reuse it (same `created_at`).
#[utoipa::path(
    get,
    path = "/api/v1/series/{name}/forecast",
    operation_id = "forecast",
    tag = "forecasts",
    params(("name" = String, Path, description = "Series name"), FreshForecastQuery),
    responses(
        (status = 200, description = "The forecast (`id` set when persisted)", body = ForecastBody),
        (status = 400, description = "A query parameter is malformed; the message names it", body = ErrorBody),
        (status = 404, description = "No such series", body = ErrorBody),
        (status = 409, description = "The series has no trained model yet", body = ErrorBody),
        (status = 422, description = "Horizon beyond the model's, unknown quantile level, or too few recent rows", body = ErrorBody),
    )
)]
pub async fn fresh(
    state: web::Data<AppState>,
    name: web::Path<String>,
    query: web::Query<FreshForecastQuery>,
) -> Result<HttpResponse, ApiError> {
    let series = find_series(&state, &name).await?;
    let champion = state.store.champion_ref(series.id).await?.ok_or_else(|| {
        ApiError::Conflict(format!(
            "series '{0}' has no trained model yet; train one first with POST \
                 /api/v1/series/{0}/train",
            series.name
        ))
    })?;
    let model = match state.models.get(champion) {
        Some(model) => model,
        None => {
            let version = state
                .store
                .get_model_version(champion.id)
                .await?
                .filter(|version| version.summary.created_at == champion.created_at)
                .ok_or_else(|| ApiError::NotFound(format!("model version {}", champion.id)))?;
            state.models.insert(&version).map_err(|err| {
                ApiError::Internal(format!("loading model version {}: {err}", champion.id))
            })?
        }
    };
    let limit = model.horizon();
    let horizon = match query.horizon.as_deref() {
        None => limit,
        Some(text) => text.trim().parse::<usize>().map_err(|_| {
            ApiError::BadRequest(format!("horizon: expected a whole number, got '{text}'"))
        })?,
    };
    if horizon == 0 || horizon > limit {
        return Err(ApiError::Unprocessable {
            field: Some("horizon".into()),
            message: format!("must be between 1 and the model's horizon {limit}, got {horizon}"),
        });
    }
    let levels = model.quantile_levels().to_vec();
    let wanted = match query.quantiles.as_deref() {
        None => (0..levels.len()).collect::<Vec<_>>(),
        Some(text) => text
            .split(',')
            .map(|item| {
                let level: f32 = item.trim().parse().map_err(|_| {
                    ApiError::BadRequest(format!("quantiles: '{item}' is not a number"))
                })?;
                levels
                    .iter()
                    .position(|known| (known - level).abs() < 1e-6)
                    .ok_or_else(|| ApiError::Unprocessable {
                        field: Some("quantiles".into()),
                        message: format!("the model has no level {level}; it has {levels:?}"),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?,
    };
    let persist = match query.persist.as_deref() {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "persist: expected true or false, got '{other}'"
            )));
        }
    };
    let key = MemoKey {
        series_id: series.id,
        series_created_at: series.created_at,
        model_version: champion,
        data_revision: series.data_revision,
    };
    let (memo, outcome) = state
        .forecasts
        .get_or_compute(key, || compute(&state, &series, model))
        .await?;
    state.metrics.record_forecast_served(outcome);
    let selection = Selection {
        horizon,
        levels: wanted,
    };
    if !persist && let Some(body) = memo.rendering(&selection) {
        return Ok(json_response(body));
    }
    let mut record = forecast_record(
        series.id,
        champion.id,
        &memo.forecast.select(selection.horizon, &selection.levels),
    );
    record.issued_at = memo.issued_at;
    if persist {
        let body = ForecastBody::new(state.store.insert_forecast(&record).await?, &series);
        return Ok(HttpResponse::Ok().json(body));
    }
    let mut body = ForecastBody::new(
        Forecast {
            id: 0,
            series_id: record.series_id,
            model_version_id: record.model_version_id,
            issued_at: record.issued_at,
            horizon: record.horizon,
            quantile_levels: record.quantile_levels,
            points: record.points,
        },
        &series,
    );
    body.id = None;
    let body = Bytes::from(
        serde_json::to_vec(&body)
            .map_err(|err| ApiError::Internal(format!("rendering the forecast: {err}")))?,
    );
    state
        .forecasts
        .add_rendering(key, &memo, selection, body.clone());
    Ok(json_response(body))
}

fn json_response(body: Bytes) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(actix_web::http::header::ContentType::json())
        .body(body)
}

/// The champion's forecast at its full horizon from the series' latest rows.
async fn compute(
    state: &AppState,
    series: &Series,
    model: Arc<XlstmModel>,
) -> Result<MemoForecast, ApiError> {
    let started = std::time::Instant::now();
    let data = recent_rows(state, series, model.lookback()).await?;
    let forecast = web::block(move || forecast_latest(&model, &data, model.horizon()))
        .await
        .map_err(|err| ApiError::Internal(format!("forecast thread: {err}")))?
        .map_err(|err| match err {
            ForecastError::InvalidArgument { argument, message } => ApiError::Unprocessable {
                field: Some(argument),
                message,
            },
            other => ApiError::Internal(other.to_string()),
        })?;
    state.metrics.record_forecast(started.elapsed());
    // The store keeps microseconds: a persisted copy then shows the same time.
    Ok(MemoForecast::new(forecast, Utc::now().trunc_subsecs(6)))
}

/// The series' most recent `lookback` rows (a few more, the forecaster takes the last ones).
async fn recent_rows(
    state: &AppState,
    series: &Series,
    lookback: usize,
) -> Result<SeriesData, ApiError> {
    let last = state.store.last_observation_micros(series.id).await?;
    let frequency = series
        .frequency
        .as_deref()
        .and_then(|text| Frequency::parse(text).ok());
    let from = match (last, frequency) {
        (Some(last), Some(frequency)) => {
            DateTime::from_timestamp_micros(last - (lookback as i64 + 1) * frequency.micros())
        }
        _ => None,
    };
    let frame = load_frame(
        state.store.as_ref(),
        &series.name,
        from,
        None,
        &FrameOptions::for_forecasting(),
    )
    .await?;
    Ok(SeriesData::from_frame(&frame)?)
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
            data_revision: 0,
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
