//! `/api/v1/series/{name}/schedule`: the cron schedule that retrains a
//! series (at most one per series).
//!
//! Every change goes through `save_schedule` or `remove_schedule`, so that
//! the running scheduler can be told of it in one place.

use actix_web::{HttpResponse, web};
use chrono::{DateTime, Timelike, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::series::find_series;
use super::startup::AppState;
use crate::jobs::{self, ScheduleError};
use crate::store::{Schedule, ScheduleMode, ScheduleSpec, Series, StoreError, cron_expression};

/// A schedule as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct ScheduleBody {
    /// The series' name.
    pub series: String,
    /// Six fields, seconds first: `sec min hour day-of-month month day-of-week`.
    #[schema(example = "0 0 * * * *")]
    pub cron: String,
    /// The IANA time zone the cron expression is read in.
    #[schema(example = "Europe/Berlin")]
    pub timezone: String,
    /// finetune (continue the champion on recent data) or full (train anew).
    #[schema(example = "finetune")]
    pub mode: String,
    pub enabled: bool,
    /// When it fires next; null while disabled.
    pub next_fire_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl ScheduleBody {
    fn new(schedule: Schedule, series: &Series, now: DateTime<Utc>) -> Self {
        let next_fire_at = if schedule.enabled {
            next_fire_at(&schedule.cron, &schedule.timezone, now)
        } else {
            None
        };
        Self {
            series: series.name.clone(),
            cron: schedule.cron,
            timezone: schedule.timezone,
            mode: schedule.mode.as_str().to_string(),
            enabled: schedule.enabled,
            next_fire_at,
            created_at: schedule.created_at,
            updated_at: schedule.updated_at,
        }
    }
}

/// The first fire time strictly after `now`; `None` when the stored
/// expression or zone no longer parses or never fires again.
fn next_fire_at(cron: &str, timezone: &str, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let zone: Tz = timezone.parse().ok()?;
    // Cron fires on whole seconds; the search keeps the start's fraction.
    let now = now.with_nanosecond(0)?;
    cron_expression(cron)
        .ok()?
        .find_next_occurrence(&now.with_timezone(&zone), false)
        .ok()
        .map(|at| at.with_timezone(&Utc))
}

/// The schedule to store; fields left out take their defaults.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutSchedule {
    /// Six fields, seconds first: `sec min hour day-of-month month day-of-week`.
    #[schema(example = "0 0 * * * *")]
    pub cron: String,
    /// IANA time zone name; the series' time zone when left out.
    #[serde(default)]
    pub timezone: Option<String>,
    /// finetune (default) or full.
    #[serde(default)]
    pub mode: Option<String>,
    /// Default true.
    #[serde(default)]
    pub enabled: Option<bool>,
}

/// The series' schedule.
#[utoipa::path(
    get,
    path = "/api/v1/series/{name}/schedule",
    operation_id = "get_schedule",
    tag = "schedules",
    params(("name" = String, Path, description = "Series name")),
    responses(
        (status = 200, description = "The schedule", body = ScheduleBody),
        (status = 404, description = "No such series, or it has no schedule", body = ErrorBody),
    )
)]
pub async fn get(
    state: web::Data<AppState>,
    name: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let series = find_series(&state, &name).await?;
    let schedule = state
        .store
        .get_schedule(series.id)
        .await?
        .ok_or_else(|| no_schedule(&series))?;
    Ok(HttpResponse::Ok().json(ScheduleBody::new(schedule, &series, Utc::now())))
}

/// Creates or replaces the series' schedule.
#[utoipa::path(
    put,
    path = "/api/v1/series/{name}/schedule",
    operation_id = "put_schedule",
    tag = "schedules",
    params(("name" = String, Path, description = "Series name")),
    request_body = PutSchedule,
    security(("api_key" = [])),
    responses(
        (status = 200, description = "The stored schedule", body = ScheduleBody),
        (status = 400, description = "Malformed JSON or an unknown field", body = ErrorBody),
        (status = 401, description = "An API key is configured and was not presented", body = ErrorBody),
        (status = 404, description = "No such series", body = ErrorBody),
        (status = 422, description = "cron, timezone or mode is unusable; `field` names it", body = ErrorBody),
    )
)]
pub async fn put(
    state: web::Data<AppState>,
    name: web::Path<String>,
    body: web::Json<PutSchedule>,
) -> Result<HttpResponse, ApiError> {
    let request = body.into_inner();
    let series = find_series(&state, &name).await?;
    let mode = match request.mode.as_deref() {
        None => ScheduleMode::Finetune,
        Some(text) => text.parse().map_err(|_| {
            ApiError::unprocessable("mode", format!("'{text}' is not one of finetune, full"))
        })?,
    };
    let spec = ScheduleSpec {
        series_id: series.id,
        cron: request.cron,
        timezone: request.timezone.unwrap_or_else(|| series.timezone.clone()),
        mode,
        enabled: request.enabled.unwrap_or(true),
    };
    let schedule = save_schedule(&state, &spec).await?;
    Ok(HttpResponse::Ok().json(ScheduleBody::new(schedule, &series, Utc::now())))
}

/// Removes the series' schedule; runs it already queued stay queued.
#[utoipa::path(
    delete,
    path = "/api/v1/series/{name}/schedule",
    operation_id = "delete_schedule",
    tag = "schedules",
    params(("name" = String, Path, description = "Series name")),
    security(("api_key" = [])),
    responses(
        (status = 204, description = "Removed"),
        (status = 401, description = "An API key is configured and was not presented", body = ErrorBody),
        (status = 404, description = "No such series, or it has no schedule", body = ErrorBody),
    )
)]
pub async fn delete(
    state: web::Data<AppState>,
    name: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let series = find_series(&state, &name).await?;
    remove_schedule(&state, &series).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// Stores a schedule (the store checks the cron expression and the zone).
/// The one place a schedule is written: the scheduler is told from here.
async fn save_schedule(state: &AppState, spec: &ScheduleSpec) -> Result<Schedule, ApiError> {
    let schedule = jobs::put_schedule(state.store.as_ref(), state.scheduler.as_ref(), spec)
        .await
        .map_err(schedule_error)?;
    tracing::info!(series_id = spec.series_id, cron = %schedule.cron, enabled = schedule.enabled, "schedule stored");
    Ok(schedule)
}

/// Deletes a series' schedule. The one place a schedule is removed: the
/// scheduler is told from here.
async fn remove_schedule(state: &AppState, series: &Series) -> Result<(), ApiError> {
    match jobs::remove_schedule(state.store.as_ref(), state.scheduler.as_ref(), series.id).await {
        Ok(()) => {
            tracing::info!(series = %series.name, "schedule removed");
            Ok(())
        }
        Err(ScheduleError::Store(StoreError::NotFound { .. })) => Err(no_schedule(series)),
        Err(err) => Err(schedule_error(err)),
    }
}

fn schedule_error(err: ScheduleError) -> ApiError {
    match (err.field(), err) {
        (_, ScheduleError::Store(err)) => err.into(),
        (Some(field), err) => ApiError::unprocessable(field, err.to_string()),
        (None, err) => ApiError::Internal(err.to_string()),
    }
}

fn no_schedule(series: &Series) -> ApiError {
    ApiError::NotFound(format!("schedule of series '{}'", series.name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_fire_time_is_read_in_the_schedule_zone() {
        let now = DateTime::parse_from_rfc3339("2024-06-01T10:30:00.25Z")
            .unwrap()
            .with_timezone(&Utc);
        // 03:00 in Berlin (UTC+2 in summer) is 01:00 UTC, the next day.
        assert_eq!(
            next_fire_at("0 0 3 * * *", "Europe/Berlin", now).unwrap(),
            DateTime::parse_from_rfc3339("2024-06-02T01:00:00Z").unwrap()
        );
        assert_eq!(
            next_fire_at("0 0 * * * *", "UTC", now).unwrap(),
            DateTime::parse_from_rfc3339("2024-06-01T11:00:00Z").unwrap()
        );
        assert_eq!(next_fire_at("0 0 * * *", "UTC", now), None);
    }
}
