//! `/api/v1/series/{name}/source` (bind a series to a query on the user's
//! Postgres) and `/api/v1/series/{name}/pull` (queue a pull run).
//!
//! The connection URL is a secret: responses show it with the password
//! masked, and it appears in no log.

use actix_web::{HttpResponse, web};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::runs::RunBody;
use super::series::find_series;
use super::startup::AppState;
use crate::jobs::{self, PullError};
use crate::store::{SecretUrl, Source, SourceSpec, StoreError};

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutSource {
    /// postgres://user:password@host:port/database
    #[schema(value_type = String)]
    pub connection_url: SecretUrl,
    /// Read-only SQL with `{{after}}` for the last stored timestamp.
    pub query: String,
    /// The timestamp column of the result (default: the first column).
    #[serde(default)]
    pub time_column: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SourceBody {
    series: String,
    /// With the password masked.
    #[schema(value_type = String)]
    connection_url: SecretUrl,
    query: String,
    time_column: Option<String>,
    created_at: String,
    updated_at: String,
}

impl SourceBody {
    fn new(series: String, source: Source) -> Self {
        let time = |at: chrono::DateTime<chrono::Utc>| {
            at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
        };
        Self {
            series,
            connection_url: source.connection_url,
            query: source.query,
            time_column: source.time_column,
            created_at: time(source.created_at),
            updated_at: time(source.updated_at),
        }
    }
}

/// Binds the series to a read-only query on the user's Postgres (replacing any binding).
#[utoipa::path(
    put,
    path = "/api/v1/series/{name}/source",
    operation_id = "put_source",
    tag = "sources",
    params(("name" = String, Path, description = "Series name")),
    request_body = PutSource,
    responses(
        (status = 200, description = "The binding, password masked", body = SourceBody),
        (status = 400, description = "Malformed JSON or unknown field", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "No such series", body = ErrorBody),
        (status = 422, description = "Unusable URL or query; the message names the field", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn put(
    state: web::Data<AppState>,
    name: web::Path<String>,
    body: web::Json<PutSource>,
) -> Result<HttpResponse, ApiError> {
    let series = find_series(&state, &name).await?;
    let request = body.into_inner();
    let spec = SourceSpec {
        series_id: series.id,
        connection_url: request.connection_url,
        query: request.query,
        time_column: request.time_column,
    };
    jobs::check_source(&spec).map_err(pull_error)?;
    let stored = state.store.upsert_source(&spec).await?;
    Ok(HttpResponse::Ok().json(SourceBody::new(series.name, stored)))
}

/// The series' source binding, password masked.
#[utoipa::path(
    get,
    path = "/api/v1/series/{name}/source",
    operation_id = "get_source",
    tag = "sources",
    params(("name" = String, Path, description = "Series name")),
    responses(
        (status = 200, description = "The binding", body = SourceBody),
        (status = 404, description = "No such series or no source", body = ErrorBody),
    )
)]
pub async fn get(
    state: web::Data<AppState>,
    name: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let series = find_series(&state, &name).await?;
    let source = state
        .store
        .get_source(series.id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("source of series '{}'", series.name)))?;
    Ok(HttpResponse::Ok().json(SourceBody::new(series.name, source)))
}

/// Unbinds the series from its source.
#[utoipa::path(
    delete,
    path = "/api/v1/series/{name}/source",
    operation_id = "delete_source",
    tag = "sources",
    params(("name" = String, Path, description = "Series name")),
    responses(
        (status = 204, description = "Unbound"),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "No such series or no source", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn delete(
    state: web::Data<AppState>,
    name: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let series = find_series(&state, &name).await?;
    state
        .store
        .delete_source(series.id)
        .await
        .map_err(|err| match err {
            StoreError::NotFound { .. } => {
                ApiError::NotFound(format!("source of series '{}'", series.name))
            }
            other => other.into(),
        })?;
    Ok(HttpResponse::NoContent().finish())
}

/// Queues a pull run; 202 with the run object.
#[utoipa::path(
    post,
    path = "/api/v1/series/{name}/pull",
    operation_id = "pull",
    tag = "sources",
    params(("name" = String, Path, description = "Series name")),
    responses(
        (status = 202, description = "Queued; poll GET /api/v1/runs/{id}", body = RunBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "No such series", body = ErrorBody),
        (status = 409, description = "The series has no source", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn pull(
    state: web::Data<AppState>,
    name: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let series = find_series(&state, &name).await?;
    let run = jobs::enqueue_pull(state.store.as_ref(), &series)
        .await
        .map_err(pull_error)?;
    Ok(HttpResponse::Accepted()
        .insert_header((
            actix_web::http::header::LOCATION,
            format!("/api/v1/runs/{}", run.id),
        ))
        .json(RunBody::new(run, series.name)))
}

fn pull_error(err: PullError) -> ApiError {
    match err {
        PullError::InvalidSource { field, message } => ApiError::unprocessable(field, message),
        PullError::NoSource(series) => ApiError::Conflict(format!(
            "series '{series}' has no source; bind one with PUT /api/v1/series/{series}/source"
        )),
        PullError::Store(err) => err.into(),
        other => ApiError::unprocessable("source", other.to_string()),
    }
}
