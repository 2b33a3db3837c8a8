//! `/api/v1/series`: create, list, describe and delete series.

use actix_web::http::header;
use actix_web::{HttpResponse, web};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::rfc3339_micros;
use super::startup::AppState;
use crate::data::Frequency;
use crate::data::ingest::RESERVED_CHANNEL_NAME;
use crate::store::{ObservationRange, Series, SeriesSpec};

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSeries {
    /// Letters, digits, '_', '-' and '.', at most 128 characters, not starting with '.'.
    #[schema(example = "plant-7.load")]
    pub name: String,
    /// Sampling frequency such as "15m" or "1h"; omitted or null when irregular.
    #[serde(default)]
    #[schema(example = "1h")]
    pub frequency: Option<String>,
    /// Channel names in their fixed order.
    pub channels: Vec<String>,
    /// IANA time zone name; UTC when omitted.
    #[serde(default)]
    pub timezone: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SeriesBody {
    pub name: String,
    pub frequency: Option<String>,
    pub timezone: String,
    pub channels: Vec<String>,
    pub created_at: String,
    /// Present when one series is described, absent in listings.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observations: Option<ObservationRangeBody>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SeriesList {
    /// Ordered by name.
    pub series: Vec<SeriesBody>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ObservationRangeBody {
    /// Stored cells (one per timestamp and channel).
    pub count: u64,
    pub first: Option<String>,
    pub last: Option<String>,
}

impl SeriesBody {
    fn new(series: Series, range: Option<ObservationRange>) -> Self {
        Self {
            name: series.name,
            frequency: series.frequency,
            timezone: series.timezone,
            channels: series.channels,
            created_at: series
                .created_at
                .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
            observations: range.map(|range| ObservationRangeBody {
                count: range.count,
                first: range.first_ts_micros.map(rfc3339_micros),
                last: range.last_ts_micros.map(rfc3339_micros),
            }),
        }
    }
}

/// Creates a series.
#[utoipa::path(
    post,
    path = "/api/v1/series",
    operation_id = "create_series",
    tag = "series",
    request_body = CreateSeries,
    security(("api_key" = [])),
    responses(
        (status = 201, description = "Created; Location names it", body = SeriesBody),
        (status = 400, description = "Malformed JSON, a missing or unknown field", body = ErrorBody),
        (status = 401, description = "An API key is configured and was not presented", body = ErrorBody),
        (status = 409, description = "The name is taken", body = ErrorBody),
        (status = 413, description = "The body is too large", body = ErrorBody),
        (status = 415, description = "The body is not application/json", body = ErrorBody),
        (status = 422, description = "A field is unusable; `field` names it", body = ErrorBody),
    )
)]
pub async fn create(
    state: web::Data<AppState>,
    body: web::Json<CreateSeries>,
) -> Result<HttpResponse, ApiError> {
    let request = body.into_inner();
    // The store checks the name (the same rule for every way in); checking it
    // first here keeps the name the first problem reported.
    crate::store::series_name(&request.name)?;
    let frequency = match request.frequency.as_deref() {
        Some(text) => Some(
            Frequency::parse(text)
                .map_err(|err| ApiError::unprocessable("frequency", err.to_string()))?
                .to_string(),
        ),
        None => None,
    };
    if request
        .channels
        .iter()
        .any(|channel| channel == RESERVED_CHANNEL_NAME)
    {
        return Err(ApiError::unprocessable(
            "channels",
            format!("'{RESERVED_CHANNEL_NAME}' is reserved for the time column"),
        ));
    }
    let spec = SeriesSpec {
        name: request.name,
        frequency,
        timezone: request.timezone.unwrap_or_else(|| "UTC".to_string()),
        channels: request.channels,
    };
    let series = state.store.create_series(&spec).await?;
    let location = format!("/api/v1/series/{}", series.name);
    Ok(HttpResponse::Created()
        .insert_header((header::LOCATION, location))
        .json(SeriesBody::new(series, None)))
}

/// Every series, ordered by name.
#[utoipa::path(
    get,
    path = "/api/v1/series",
    operation_id = "list_series",
    tag = "series",
    responses((status = 200, description = "Every series", body = SeriesList))
)]
pub async fn list(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let series: Vec<SeriesBody> = state
        .store
        .list_series()
        .await?
        .into_iter()
        .map(|series| SeriesBody::new(series, None))
        .collect();
    Ok(HttpResponse::Ok().json(SeriesList { series }))
}

/// One series with the count and span of its observations.
#[utoipa::path(
    get,
    path = "/api/v1/series/{name}",
    operation_id = "get_series",
    tag = "series",
    params(("name" = String, Path, description = "Series name")),
    responses(
        (status = 200, description = "The series", body = SeriesBody),
        (status = 404, description = "No such series", body = ErrorBody),
    )
)]
pub async fn get(
    state: web::Data<AppState>,
    name: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let series = find_series(&state, &name).await?;
    let range = state.store.observation_range(&series.name).await?;
    Ok(HttpResponse::Ok().json(SeriesBody::new(series, Some(range))))
}

/// Deletes a series and everything under it (observations, models, runs,
/// schedule, forecasts).
#[utoipa::path(
    delete,
    path = "/api/v1/series/{name}",
    operation_id = "delete_series",
    tag = "series",
    params(("name" = String, Path, description = "Series name")),
    security(("api_key" = [])),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "An API key is configured and was not presented", body = ErrorBody),
        (status = 404, description = "No such series", body = ErrorBody),
    )
)]
pub async fn delete(
    state: web::Data<AppState>,
    name: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    state.store.delete_series(&name).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// The series named `name`, or 404.
pub(super) async fn find_series(state: &AppState, name: &str) -> Result<Series, ApiError> {
    state
        .store
        .get_series(name)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("series '{name}'")))
}
