//! `/api/v1/series`: create, list, describe and delete series.

use actix_web::http::header;
use actix_web::{HttpResponse, web};
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::rfc3339_micros;
use super::startup::AppState;
use crate::data::Frequency;
use crate::data::ingest::RESERVED_CHANNEL_NAME;
use crate::store::{ObservationRange, Series, SeriesSpec};

/// Series names appear in URL paths, so they are limited to characters that
/// never need escaping there.
const MAX_SERIES_NAME_CHARS: usize = 128;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSeries {
    pub name: String,
    /// Sampling frequency such as "15m" or "1h"; omitted or null when irregular.
    #[serde(default)]
    pub frequency: Option<String>,
    pub channels: Vec<String>,
    /// IANA time zone name; UTC when omitted.
    #[serde(default)]
    pub timezone: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct SeriesBody {
    pub name: String,
    pub frequency: Option<String>,
    pub timezone: String,
    pub channels: Vec<String>,
    pub created_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observations: Option<ObservationRangeBody>,
}

#[derive(Debug, Serialize)]
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

pub async fn create(
    state: web::Data<AppState>,
    body: web::Json<CreateSeries>,
) -> Result<HttpResponse, ApiError> {
    let request = body.into_inner();
    check_series_name(&request.name)?;
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

pub async fn list(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let series: Vec<SeriesBody> = state
        .store
        .list_series()
        .await?
        .into_iter()
        .map(|series| SeriesBody::new(series, None))
        .collect();
    Ok(HttpResponse::Ok().json(serde_json::json!({ "series": series })))
}

pub async fn get(
    state: web::Data<AppState>,
    name: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let series = find_series(&state, &name).await?;
    let range = state.store.observation_range(&series.name).await?;
    Ok(HttpResponse::Ok().json(SeriesBody::new(series, Some(range))))
}

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

fn check_series_name(name: &str) -> Result<(), ApiError> {
    let problem = if name.is_empty() {
        Some("must not be empty".to_string())
    } else if name.chars().count() > MAX_SERIES_NAME_CHARS {
        Some(format!(
            "must be at most {MAX_SERIES_NAME_CHARS} characters"
        ))
    } else if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
    {
        Some(format!(
            "'{bad}' is not allowed; use letters, digits, '_', '-' and '.'"
        ))
    } else if name.starts_with('.') {
        Some("must not start with '.'".to_string())
    } else {
        None
    };
    match problem {
        Some(message) => Err(ApiError::unprocessable("name", message)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::check_series_name;

    #[test]
    fn series_names_are_path_safe() {
        for good in ["load", "site-1.power_kW", "A9"] {
            assert!(check_series_name(good).is_ok(), "{good}");
        }
        for bad in ["", "a b", "a/b", "..", ".hidden", "é", &"x".repeat(129)] {
            assert!(check_series_name(bad).is_err(), "{bad}");
        }
    }
}
