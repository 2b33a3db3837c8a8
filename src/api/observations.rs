//! `/api/v1/series/{name}/observations`: upload (JSON rows or CSV) and read
//! back (wide JSON).
//!
//! Uploads go through `data::import_csv`, the function behind
//! `xlstm-forecast import`, so HTTP and CLI imports validate identically and
//! are equally atomic (one transaction; nothing is written on any error).
//! JSON rows are rewritten as CSV text for it, and its line/column errors are
//! translated back to `rows[i].values.<channel>`.

use std::io::Cursor;

use actix_web::http::header;
use actix_web::web::{Bytes, BytesMut};
use actix_web::{HttpMessage, HttpRequest, HttpResponse, web};
use chrono_tz::Tz;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, ErrorBody};
use super::series::find_series;
use super::startup::AppState;
use super::{OrderedMap, rfc3339_micros};
use crate::data::timestamp::parse_timestamp_micros;
use crate::data::{DataError, ImportOptions, ImportReport, import_csv};
use crate::store::{LongObservations, Series};

/// The time column of the CSV text JSON rows are rewritten to.
const JSON_TIME_COLUMN: &str = "ts";
/// The header is line 1 of the rewritten CSV, so row `i` is on line `i + 2`.
const FIRST_ROW_LINE: u64 = 2;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ObservationRows {
    pub rows: Vec<ObservationRow>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ObservationRow {
    /// RFC 3339 text, a local date-time in the series' zone, or epoch seconds.
    #[schema(value_type = String, example = "2024-01-01T00:00:00Z")]
    pub ts: Value,
    /// Channel → number, or null for a missing value.
    #[schema(value_type = HashMap<String, Option<f64>>)]
    pub values: serde_json::Map<String, Value>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct CsvUploadQuery {
    /// The CSV time column (default: ts/timestamp/time/date/datetime, else the first column).
    pub time_column: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UploadSummary {
    series: String,
    rows: u64,
    cells_written: u64,
    first: Option<String>,
    last: Option<String>,
}

/// Adds observations (JSON rows or CSV text), all or nothing: on any error
/// nothing is written. Existing values at the same time and channel are replaced.
#[utoipa::path(
    post,
    path = "/api/v1/series/{name}/observations",
    operation_id = "upload_observations",
    tag = "series",
    params(("name" = String, Path, description = "Series name"), CsvUploadQuery),
    request_body(content(
        (ObservationRows = "application/json"),
        (String = "text/csv", example = "ts,load,temp\n2024-01-01T00:00:00Z,1.5,20.1\n"),
    )),
    security(("api_key" = [])),
    responses(
        (status = 200, description = "Stored", body = UploadSummary),
        (status = 400, description = "Malformed JSON or query", body = ErrorBody),
        (status = 401, description = "An API key is configured and was not presented", body = ErrorBody),
        (status = 404, description = "No such series", body = ErrorBody),
        (status = 413, description = "The body is too large", body = ErrorBody),
        (status = 415, description = "Neither application/json nor text/csv", body = ErrorBody),
        (status = 422, description = "A value, timestamp or channel is unusable; `field` names it", body = ErrorBody),
    )
)]
pub async fn upload(
    state: web::Data<AppState>,
    name: web::Path<String>,
    query: web::Query<CsvUploadQuery>,
    request: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let series = find_series(&state, &name).await?;
    let media_type = request.content_type().to_ascii_lowercase();
    let body_format = match media_type.as_str() {
        "application/json" => BodyFormat::JsonRows,
        "text/csv" => BodyFormat::Csv,
        other => {
            return Err(ApiError::UnsupportedMediaType(format!(
                "Content-Type '{other}' is not accepted; send application/json rows or text/csv"
            )));
        }
    };
    if body_format == BodyFormat::JsonRows && query.time_column.is_some() {
        return Err(ApiError::BadRequest(
            "time_column applies to text/csv uploads only".to_string(),
        ));
    }
    let body = read_body(&request, payload, state.limits.observations_bytes).await?;
    let options = ImportOptions {
        time_column: match body_format {
            BodyFormat::JsonRows => Some(JSON_TIME_COLUMN.to_string()),
            BodyFormat::Csv => query.into_inner().time_column,
        },
        ..ImportOptions::new(series.name.clone())
    };
    let report = match body_format {
        BodyFormat::Csv => import_csv(state.store.as_ref(), Cursor::new(body), &options).await?,
        BodyFormat::JsonRows => {
            let rows: ObservationRows = serde_json::from_slice(&body)
                .map_err(|err| ApiError::BadRequest(format!("malformed JSON body: {err}")))?;
            let csv = rows_to_csv(&series, &rows)?;
            import_csv(state.store.as_ref(), Cursor::new(csv), &options)
                .await
                .map_err(json_row_error)?
        }
    };
    Ok(HttpResponse::Ok().json(summary(report)))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyFormat {
    JsonRows,
    Csv,
}

fn summary(report: ImportReport) -> UploadSummary {
    UploadSummary {
        series: report.summary.series,
        rows: report.rows,
        cells_written: report.summary.cells_written,
        first: report.summary.first_ts_micros.map(rfc3339_micros),
        last: report.summary.last_ts_micros.map(rfc3339_micros),
    }
}

/// The whole body, refused with 413 as soon as it (or its declared length)
/// exceeds `limit_bytes`.
async fn read_body(
    request: &HttpRequest,
    mut payload: web::Payload,
    limit_bytes: usize,
) -> Result<Bytes, ApiError> {
    let too_large = ApiError::PayloadTooLarge { limit_bytes };
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<usize>().ok());
    if declared.is_some_and(|length| length > limit_bytes) {
        return Err(too_large);
    }
    let mut body = BytesMut::with_capacity(declared.unwrap_or(0));
    while let Some(chunk) = payload.next().await {
        let chunk = chunk
            .map_err(|err| ApiError::BadRequest(format!("cannot read the request body: {err}")))?;
        if body.len() + chunk.len() > limit_bytes {
            return Err(too_large);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// JSON rows as CSV text with a `ts` column and one column per channel (the
/// series' channels first, in their order, then any unknown names, which the
/// import rejects by name). Only numbers and nulls become cells; anything else
/// is refused here, naming the row and channel.
fn rows_to_csv(series: &Series, rows: &ObservationRows) -> Result<Vec<u8>, ApiError> {
    if rows.rows.is_empty() {
        return Err(ApiError::unprocessable(
            "rows",
            "must hold at least one row",
        ));
    }
    let mut channels: Vec<&str> = series
        .channels
        .iter()
        .map(String::as_str)
        .filter(|channel| {
            rows.rows
                .iter()
                .any(|row| row.values.contains_key(*channel))
        })
        .collect();
    for row in &rows.rows {
        for channel in row.values.keys() {
            if !channels.contains(&channel.as_str()) {
                channels.push(channel);
            }
        }
    }
    let mut csv = String::with_capacity(rows.rows.len() * (16 + 12 * channels.len()));
    csv.push_str(JSON_TIME_COLUMN);
    for channel in &channels {
        csv.push(',');
        push_quoted(&mut csv, channel);
    }
    csv.push('\n');
    for (index, row) in rows.rows.iter().enumerate() {
        match &row.ts {
            Value::String(text) if !text.contains(['\n', '\r']) => push_quoted(&mut csv, text),
            Value::Number(number) => csv.push_str(&number.to_string()),
            other => {
                return Err(ApiError::unprocessable(
                    format!("rows[{index}].ts"),
                    format!(
                        "expected a timestamp (RFC 3339 text or epoch seconds), found {}",
                        describe(other)
                    ),
                ));
            }
        }
        for channel in &channels {
            csv.push(',');
            match row.values.get(*channel) {
                None | Some(Value::Null) => {}
                Some(Value::Number(number)) => csv.push_str(&number.to_string()),
                Some(other) => {
                    return Err(ApiError::unprocessable(
                        format!("rows[{index}].values.{channel}"),
                        format!("expected a number or null, found {}", describe(other)),
                    ));
                }
            }
        }
        csv.push('\n');
    }
    Ok(csv.into_bytes())
}

fn push_quoted(csv: &mut String, field: &str) {
    csv.push('"');
    csv.push_str(&field.replace('"', "\"\""));
    csv.push('"');
}

fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".to_string(),
        Value::Bool(flag) => format!("the boolean {flag}"),
        Value::Number(number) => format!("the number {number}"),
        Value::String(text) => format!("the text {text:?}"),
        Value::Array(_) => "an array".to_string(),
        Value::Object(_) => "an object".to_string(),
    }
}

/// Import errors about the rewritten CSV, restated in terms of the JSON rows.
fn json_row_error(err: DataError) -> ApiError {
    let DataError::Invalid {
        line,
        column,
        message,
    } = err
    else {
        return err.into();
    };
    let location = match (&column, line) {
        (Some(column), _) if column == JSON_TIME_COLUMN => "ts".to_string(),
        (Some(column), _) => format!("values.{column}"),
        (None, _) => String::new(),
    };
    let field = match line.and_then(|line| line.checked_sub(FIRST_ROW_LINE)) {
        Some(row) if location.is_empty() => format!("rows[{row}]"),
        Some(row) => format!("rows[{row}].{location}"),
        None if location.is_empty() => "rows".to_string(),
        None => location,
    };
    ApiError::unprocessable(field, message)
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ReadQuery {
    /// Inclusive bounds; RFC 3339, a local date-time in the series' zone, or epoch seconds.
    pub from: Option<String>,
    pub to: Option<String>,
    /// Comma-separated channel names (default: all).
    pub channels: Option<String>,
}

/// The observations in wide form: one timestamp list and, per channel, one
/// value (or null) per timestamp.
#[derive(Debug, Serialize, ToSchema)]
pub struct WideObservations {
    series: String,
    timestamps: Vec<String>,
    /// Channel name → one value (or null) per timestamp, in the series' channel order.
    #[schema(value_type = HashMap<String, Vec<Option<f64>>>)]
    channels: OrderedMap<Vec<Option<f64>>>,
}

/// A series' observations in wide form.
#[utoipa::path(
    get,
    path = "/api/v1/series/{name}/observations",
    operation_id = "read_observations",
    tag = "series",
    params(("name" = String, Path, description = "Series name"), ReadQuery),
    responses(
        (status = 200, description = "The observations", body = WideObservations),
        (status = 400, description = "A query parameter is malformed; the message names it", body = ErrorBody),
        (status = 404, description = "No such series", body = ErrorBody),
        (status = 422, description = "An unknown channel", body = ErrorBody),
    )
)]
pub async fn read(
    state: web::Data<AppState>,
    name: web::Path<String>,
    query: web::Query<ReadQuery>,
) -> Result<HttpResponse, ApiError> {
    let series = find_series(&state, &name).await?;
    let timezone: Tz = series.timezone.parse().map_err(|_| {
        ApiError::Internal(format!(
            "series '{}' has the unknown time zone '{}'",
            series.name, series.timezone
        ))
    })?;
    let bound = |param: &str, text: &Option<String>| {
        text.as_deref()
            .map(|text| {
                parse_timestamp_micros(text, timezone).map_err(|message| {
                    ApiError::BadRequest(format!("query parameter {param}: {message}"))
                })
            })
            .transpose()
    };
    let from = bound("from", &query.from)?;
    let to = bound("to", &query.to)?;
    if let (Some(from), Some(to)) = (from, to)
        && from > to
    {
        return Err(ApiError::BadRequest(
            "query parameters from and to: from is after to".to_string(),
        ));
    }
    let requested: Option<Vec<String>> = query.channels.as_deref().map(|list| {
        list.split(',')
            .map(str::trim)
            .filter(|channel| !channel.is_empty())
            .map(str::to_string)
            .collect()
    });
    let output_channels = requested.clone().unwrap_or_else(|| series.channels.clone());
    let observations = state
        .store
        .load_observations(&series.name, from, to, requested.as_deref())
        .await?;
    Ok(HttpResponse::Ok().json(widen(series.name, &output_channels, observations)))
}

/// Long observations (ordered by ts, then channel) as one column per channel.
fn widen(series: String, channels: &[String], long: LongObservations) -> WideObservations {
    // Position of each stored channel index in the output, if it is shown.
    let output_position: Vec<Option<usize>> = long
        .channels
        .iter()
        .map(|name| channels.iter().position(|shown| shown == name))
        .collect();
    let mut timestamps: Vec<i64> = Vec::new();
    let mut columns: Vec<Vec<Option<f64>>> = vec![Vec::new(); channels.len()];
    for ((channel, ts), value) in long.channel.iter().zip(&long.ts_micros).zip(&long.value) {
        if timestamps.last() != Some(ts) {
            timestamps.push(*ts);
            for column in &mut columns {
                column.push(None);
            }
        }
        if let Some(Some(position)) = output_position.get(*channel as usize) {
            *columns[*position]
                .last_mut()
                .expect("pushed with its timestamp") = Some(*value);
        }
    }
    WideObservations {
        series,
        timestamps: timestamps.into_iter().map(rfc3339_micros).collect(),
        channels: OrderedMap(channels.iter().cloned().zip(columns).collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_rows_widen_with_nulls_for_missing_cells() {
        let long = LongObservations {
            channels: vec!["a".into(), "b".into()],
            channel: vec![0, 1, 1],
            ts_micros: vec![0, 0, 1_000_000],
            value: vec![1.0, 2.0, 3.0],
        };
        let wide = widen("s".into(), &["b".into(), "a".into()], long);
        assert_eq!(
            wide.timestamps,
            vec!["1970-01-01T00:00:00Z", "1970-01-01T00:00:01Z"]
        );
        assert_eq!(
            serde_json::to_string(&wide.channels).unwrap(),
            r#"{"b":[2.0,3.0],"a":[1.0,null]}"#
        );
    }

    #[test]
    fn csv_line_errors_become_row_fields() {
        let err = json_row_error(DataError::invalid_at(
            4,
            Some("load"),
            "value must be finite",
        ));
        assert_eq!(err.to_string(), "rows[2].values.load: value must be finite");
        let err = json_row_error(DataError::invalid_at(2, Some("ts"), "timestamp is empty"));
        assert_eq!(err.to_string(), "rows[0].ts: timestamp is empty");
    }
}
