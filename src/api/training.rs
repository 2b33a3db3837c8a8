//! Asking for training: queue a full training or a fine-tune of a series (the job queue's
//! workers run it), and cancel a run.

use actix_web::{HttpResponse, web};
use serde::Deserialize;
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::runs::RunBody;
use super::series::find_series;
use super::startup::AppState;
use crate::forecast::{DEFAULT_PRESET, ForecastError};
use crate::jobs::{TrainMode, TrainOverrides, TrainRequest, cancel_run, enqueue_train};

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TrainBody {
    /// `full` trains from scratch; `finetune` warm-starts from the champion on the latest
    /// data (a series without a champion trains in full).
    #[schema(value_type = String, example = "full")]
    pub mode: TrainMode,
    /// Model preset: tiny, small (default) or base.
    pub preset: Option<String>,
    /// Preset settings to change: lookback, horizon, max_epochs, seed, learning_rate,
    /// batch_size.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub overrides: TrainOverrides,
}

/// Queues a training run; 202 with the run to poll.
#[utoipa::path(
    post,
    path = "/api/v1/series/{name}/train",
    operation_id = "train",
    tag = "runs",
    params(("name" = String, Path, description = "Series name")),
    request_body = TrainBody,
    responses(
        (status = 202, description = "Queued; poll GET /api/v1/runs/{id}", body = RunBody),
        (status = 400, description = "Malformed JSON or unknown field", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "No such series", body = ErrorBody),
        (status = 422, description = "Unknown preset or an override out of range; the message names it", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn train(
    state: web::Data<AppState>,
    name: web::Path<String>,
    body: web::Json<TrainBody>,
) -> Result<HttpResponse, ApiError> {
    let series = find_series(&state, &name).await?;
    let body = body.into_inner();
    let request = TrainRequest {
        preset: body.preset,
        overrides: body.overrides,
    };
    // Refused now rather than failed later by a worker.
    request.resolve(DEFAULT_PRESET).map_err(|err| match err {
        ForecastError::InvalidArgument { argument, message } => ApiError::Unprocessable {
            field: Some(argument),
            message,
        },
        other => ApiError::Internal(other.to_string()),
    })?;
    let mut requested =
        serde_json::to_value(&request).map_err(|err| ApiError::Internal(err.to_string()))?;
    requested["mode"] = serde_json::json!(body.mode);
    let run = enqueue_train(state.store.as_ref(), &series, body.mode, requested).await?;
    Ok(HttpResponse::Accepted().json(RunBody::new(run, series.name)))
}

/// Cancels a run: a queued one at once, a running one at its next heartbeat.
#[utoipa::path(
    post,
    path = "/api/v1/runs/{id}/cancel",
    operation_id = "cancel_run",
    tag = "runs",
    params(("id" = i64, Path, description = "Run id")),
    responses(
        (status = 200, description = "The run, cancelled or with its cancel requested", body = RunBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "No such run", body = ErrorBody),
        (status = 409, description = "The run already finished", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn cancel(
    state: web::Data<AppState>,
    id: web::Path<i64>,
) -> Result<HttpResponse, ApiError> {
    let run = cancel_run(state.store.as_ref(), *id).await?;
    let series = state
        .store
        .get_series_by_id(run.series_id)
        .await?
        .map_or_else(|| run.series_id.to_string(), |series| series.name);
    Ok(HttpResponse::Ok().json(RunBody::new(run, series)))
}
