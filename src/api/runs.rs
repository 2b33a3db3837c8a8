//! Training and data runs as the job queue records them: one run, and runs
//! filtered by series and status.

use std::collections::HashMap;

use actix_web::{HttpResponse, web};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, ErrorBody};
use super::query;
use super::series::find_series;
use super::startup::AppState;
use crate::store::{Run, RunFilter, RunStatus};

/// Runs listed when the request names no limit, and the most it may ask for.
const DEFAULT_RUNS_LIMIT: u32 = 100;
const MAX_RUNS_LIMIT: u32 = 1000;
const RUN_STATUSES: [&str; 6] = [
    "queued",
    "running",
    "succeeded",
    "failed",
    "cancelled",
    "skipped",
];

/// A run as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct RunBody {
    pub id: i64,
    /// The series' name.
    pub series: String,
    /// train, finetune or pull.
    #[schema(example = "train")]
    pub kind: String,
    /// queued, running, succeeded, failed, cancelled or skipped.
    #[schema(example = "running")]
    pub status: String,
    pub attempts: i32,
    pub max_attempts: i32,
    /// The request as submitted (mode, preset, overrides).
    #[schema(value_type = Object)]
    pub requested: Value,
    /// What the worker reported so far: epoch, max_epochs, step,
    /// steps_per_epoch, train_loss, val_loss, best_val_loss, eta_seconds and
    /// a per-epoch history; empty before the first report.
    #[schema(value_type = Object)]
    pub progress: Value,
    pub error: Option<String>,
    /// The model version a successful training run wrote.
    pub model_version_id: Option<i64>,
    /// Set for runs a schedule queued, with the fire time they belong to.
    pub schedule_id: Option<i64>,
    pub scheduled_for: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// The worker's last sign of life.
    pub heartbeat_at: Option<DateTime<Utc>>,
}

impl RunBody {
    pub fn new(run: Run, series: String) -> Self {
        Self {
            id: run.id,
            series,
            kind: run.kind.as_str().to_string(),
            status: run.status.as_str().to_string(),
            attempts: run.attempts,
            max_attempts: run.max_attempts,
            requested: run.requested,
            progress: run.progress,
            error: run.error,
            model_version_id: run.model_version_id,
            schedule_id: run.schedule_id,
            scheduled_for: run.scheduled_for,
            created_at: run.created_at,
            started_at: run.started_at,
            finished_at: run.finished_at,
            heartbeat_at: run.heartbeat_at,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RunList {
    /// Newest first.
    pub runs: Vec<RunBody>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RunsQuery {
    /// Only runs of this series.
    pub series: Option<String>,
    /// Only runs in this status (queued, running, succeeded, failed,
    /// cancelled, skipped).
    pub status: Option<String>,
    /// At most this many runs, 1 to 1000 (default 100).
    #[param(value_type = Option<u32>)]
    pub limit: Option<String>,
}

/// One run.
#[utoipa::path(
    get,
    path = "/api/v1/runs/{id}",
    operation_id = "get_run",
    tag = "runs",
    params(("id" = i64, Path, description = "Run id")),
    responses(
        (status = 200, description = "The run", body = RunBody),
        (status = 400, description = "The id is not an integer", body = ErrorBody),
        (status = 404, description = "No such run", body = ErrorBody),
    )
)]
pub async fn get(state: web::Data<AppState>, id: web::Path<i64>) -> Result<HttpResponse, ApiError> {
    let not_found = || ApiError::NotFound(format!("run {id}"));
    let run = state.store.get_run(*id).await?.ok_or_else(not_found)?;
    let series = state
        .store
        .get_series_by_id(run.series_id)
        .await?
        .ok_or_else(not_found)?;
    Ok(HttpResponse::Ok().json(RunBody::new(run, series.name)))
}

/// Runs, newest first, optionally of one series and in one status.
#[utoipa::path(
    get,
    path = "/api/v1/runs",
    operation_id = "list_runs",
    tag = "runs",
    params(RunsQuery),
    responses(
        (status = 200, description = "The matching runs, newest first", body = RunList),
        (status = 400, description = "A query parameter is malformed; the message names it", body = ErrorBody),
        (status = 404, description = "The series filter names no series", body = ErrorBody),
    )
)]
pub async fn list(
    state: web::Data<AppState>,
    query: web::Query<RunsQuery>,
) -> Result<HttpResponse, ApiError> {
    let status: Option<RunStatus> = query
        .status
        .as_deref()
        .map(|text| query::one_of("status", text, &RUN_STATUSES))
        .transpose()?;
    let limit = query::limit(query.limit.as_deref(), DEFAULT_RUNS_LIMIT, MAX_RUNS_LIMIT)?;
    let series = match query.series.as_deref() {
        Some(name) => Some(find_series(&state, name).await?),
        None => None,
    };
    let filter = RunFilter {
        series_id: series.as_ref().map(|series| series.id),
        status,
        limit: Some(limit),
    };
    let runs = state.store.list_runs(&filter).await?;
    let mut names: HashMap<i64, String> = series
        .into_iter()
        .map(|series| (series.id, series.name))
        .collect();
    let mut bodies = Vec::with_capacity(runs.len());
    for run in runs {
        let name = match names.get(&run.series_id) {
            Some(name) => name.clone(),
            None => {
                // Runs go with their series, so a run whose series vanished
                // since the listing was deleted with it: leave it out.
                let Some(series) = state.store.get_series_by_id(run.series_id).await? else {
                    continue;
                };
                names.insert(series.id, series.name.clone());
                series.name
            }
        };
        bodies.push(RunBody::new(run, name));
    }
    Ok(HttpResponse::Ok().json(RunList { runs: bodies }))
}
