//! The model registry: a series' model versions, one version, and manual
//! promotion (which is also how a rollback is done: promote the older version).

use actix_web::{HttpResponse, web};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::series::find_series;
use super::startup::AppState;
use crate::store::{ModelVersionStatus, ModelVersionSummary, Series};

/// A trained model version as the API shows it (the weights stay in the store).
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelVersionBody {
    pub id: i64,
    /// The series' name.
    pub series: String,
    /// The registry status as stored: `ready` (complete, may become the
    /// champion) or `rejected` (worse than the champion or diverged; never
    /// promoted). Whether it serves is `is_champion`.
    #[schema(example = "ready")]
    pub status: String,
    /// True for the one version that serves the series' forecasts.
    pub is_champion: bool,
    /// The registry's word for it: `champion` (serves the forecasts), `challenger` (ready,
    /// not serving; a manual promotion may make it the champion) or `rejected`.
    #[schema(example = "champion")]
    pub role: ModelRole,
    /// The version this one was fine-tuned from.
    pub parent_version_id: Option<i64>,
    pub created_at: DateTime<Utc>,
    /// The span of observations it was trained on.
    pub data_from: DateTime<Utc>,
    pub data_to: DateTime<Utc>,
    /// Size of the stored weights.
    pub artefact_bytes: u64,
    /// Architecture and training settings (includes preset, lookback, horizon).
    #[schema(value_type = Object)]
    pub config: Value,
    /// Validation figures (includes val_mse, val_mae, coverage_80, epochs,
    /// train_seconds, params).
    #[schema(value_type = Object)]
    pub metrics: Value,
}

impl ModelVersionBody {
    pub fn new(version: ModelVersionSummary, series: &Series) -> Self {
        Self {
            id: version.id,
            series: series.name.clone(),
            status: version.status.as_str().to_string(),
            is_champion: version.is_champion,
            role: match (version.is_champion, version.status) {
                (true, _) => ModelRole::Champion,
                (false, ModelVersionStatus::Ready) => ModelRole::Challenger,
                (false, ModelVersionStatus::Rejected) => ModelRole::Rejected,
            },
            parent_version_id: version.parent_version_id,
            created_at: version.created_at,
            data_from: version.data_from,
            data_to: version.data_to,
            artefact_bytes: version.artefact_bytes,
            config: version.config,
            metrics: version.metrics,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ModelRole {
    Champion,
    Challenger,
    Rejected,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelVersionList {
    /// Newest first.
    pub models: Vec<ModelVersionBody>,
}

/// A series' model versions, newest first.
#[utoipa::path(
    get,
    path = "/api/v1/series/{name}/models",
    operation_id = "list_model_versions",
    tag = "models",
    params(("name" = String, Path, description = "Series name")),
    responses(
        (status = 200, description = "The series' model versions, newest first", body = ModelVersionList),
        (status = 404, description = "No such series", body = ErrorBody),
    )
)]
pub async fn list(
    state: web::Data<AppState>,
    name: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let series = find_series(&state, &name).await?;
    let models = state
        .store
        .list_model_versions(series.id)
        .await?
        .into_iter()
        .map(|version| ModelVersionBody::new(version, &series))
        .collect();
    Ok(HttpResponse::Ok().json(ModelVersionList { models }))
}

/// One model version.
#[utoipa::path(
    get,
    path = "/api/v1/models/{id}",
    operation_id = "get_model_version",
    tag = "models",
    params(("id" = i64, Path, description = "Model version id")),
    responses(
        (status = 200, description = "The model version", body = ModelVersionBody),
        (status = 400, description = "The id is not an integer", body = ErrorBody),
        (status = 404, description = "No such model version", body = ErrorBody),
    )
)]
pub async fn get(state: web::Data<AppState>, id: web::Path<i64>) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(describe(&state, *id).await?))
}

/// Makes a version the champion of its series; the previous champion stays
/// in the registry and can be promoted back (rollback).
#[utoipa::path(
    post,
    path = "/api/v1/models/{id}/promote",
    operation_id = "promote_model_version",
    tag = "models",
    params(("id" = i64, Path, description = "Model version id")),
    security(("api_key" = [])),
    responses(
        (status = 200, description = "The promoted version, now the champion", body = ModelVersionBody),
        (status = 400, description = "The id is not an integer", body = ErrorBody),
        (status = 401, description = "An API key is configured and was not presented", body = ErrorBody),
        (status = 404, description = "No such model version", body = ErrorBody),
        (status = 409, description = "The version was rejected and cannot serve", body = ErrorBody),
    )
)]
pub async fn promote(
    state: web::Data<AppState>,
    id: web::Path<i64>,
) -> Result<HttpResponse, ApiError> {
    state.store.promote_model_version(*id).await?;
    tracing::info!(model_version = *id, "model version promoted by request");
    Ok(HttpResponse::Ok().json(describe(&state, *id).await?))
}

async fn describe(state: &AppState, id: i64) -> Result<ModelVersionBody, ApiError> {
    let not_found = || ApiError::NotFound(format!("model version {id}"));
    let version = state
        .store
        .get_model_version_summary(id)
        .await?
        .ok_or_else(not_found)?;
    // A version belongs to its series until both are deleted together, so a
    // missing series means the version went with it in between.
    let series = state
        .store
        .get_series_by_id(version.series_id)
        .await?
        .ok_or_else(not_found)?;
    Ok(ModelVersionBody::new(version, &series))
}
