//! Pulling new rows from the user's own Postgres into a series.
//!
//! A series' source is a connection URL (a secret) and a read-only query
//! returning a timestamp column and numeric columns, with `{{after}}` where
//! the series' last stored timestamp goes (`WHERE ts > {{after}}`). A pull
//! runs the query in a read-only transaction, turns the rows into CSV text
//! and imports it with `data::import_csv`, the function behind `import` and
//! the HTTP upload: the same validation, one transaction, and nothing
//! written at all when the query fails or any row is bad.

use std::io::Cursor;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use futures::TryStreamExt;
use sqlx::postgres::{PgConnectOptions, PgRow};
use sqlx::{Column, Connection, Executor, PgConnection, Row, Statement, TypeInfo};

use crate::data::{DataError, ImportOptions, import_csv};
use crate::store::{MIN_TS_MICROS, SecretUrl, Series, Source, SourceSpec, Store, StoreError};

/// Stands for the series' last stored timestamp in a source query.
pub const AFTER_PLACEHOLDER: &str = "{{after}}";
/// The time column of the CSV text pulled rows are rewritten to.
const CSV_TIME_COLUMN: &str = "ts";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a source query may run.
const STATEMENT_TIMEOUT: &str = "300s";

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// The source definition itself is unusable; `field` names what to fix.
    #[error("{field}: {message}")]
    InvalidSource {
        field: &'static str,
        message: String,
    },
    #[error("cannot connect to the source {url}: {message}")]
    Connect { url: String, message: String },
    #[error("the source query failed: {0}")]
    Query(String),
    #[error("column '{column}' of the source query: {message}")]
    Column { column: String, message: String },
    /// A pulled row failed the import's validation (nothing was written).
    #[error("pulled rows rejected: {0}")]
    Rows(String),
    #[error("series '{0}' has no source")]
    NoSource(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Checks a source definition before it is stored.
pub fn check_source(spec: &SourceSpec) -> Result<(), PullError> {
    let url = spec.connection_url.expose();
    let scheme = url.split_once("://").map(|(scheme, _)| scheme);
    if !matches!(scheme, Some("postgres" | "postgresql")) {
        return Err(PullError::InvalidSource {
            field: "connection_url",
            message: format!(
                "'{}' is not a Postgres URL (expected postgres://user:password@host:port/database)",
                spec.connection_url.masked()
            ),
        });
    }
    url.parse::<PgConnectOptions>()
        .map_err(|err| PullError::InvalidSource {
            field: "connection_url",
            message: scrub(&err.to_string(), &spec.connection_url),
        })?;
    if !spec.query.contains(AFTER_PLACEHOLDER) {
        return Err(PullError::InvalidSource {
            field: "query",
            message: format!(
                "must contain {AFTER_PLACEHOLDER} where the last stored timestamp goes, \
                 e.g. SELECT ts, load FROM meters WHERE ts > {AFTER_PLACEHOLDER} ORDER BY ts"
            ),
        });
    }
    if spec
        .time_column
        .as_deref()
        .is_some_and(|column| column.trim().is_empty())
    {
        return Err(PullError::InvalidSource {
            field: "time_column",
            message: "must not be empty when given".to_string(),
        });
    }
    Ok(())
}

/// What one pull did.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PullReport {
    /// The last stored timestamp the query was given (`None`: the series was empty).
    pub after: Option<DateTime<Utc>>,
    /// Rows the query returned.
    pub rows: u64,
    /// Cells the store wrote.
    pub cells_written: u64,
    pub first: Option<DateTime<Utc>>,
    pub last: Option<DateTime<Utc>>,
}

/// Pulls the rows after the series' last stored timestamp from its source.
pub async fn pull_series(store: &dyn Store, series: &Series) -> Result<PullReport, PullError> {
    let source = store
        .get_source(series.id)
        .await?
        .ok_or_else(|| PullError::NoSource(series.name.clone()))?;
    pull_from(store, series, &source).await
}

/// Pulls with a given source definition.
pub async fn pull_from(
    store: &dyn Store,
    series: &Series,
    source: &Source,
) -> Result<PullReport, PullError> {
    let spec = SourceSpec {
        series_id: source.series_id,
        connection_url: source.connection_url.clone(),
        query: source.query.clone(),
        time_column: source.time_column.clone(),
    };
    check_source(&spec)?;
    let after = store
        .last_observation_micros(series.id)
        .await?
        .and_then(DateTime::from_timestamp_micros);
    let (csv, rows) = read_source(&spec, series, after).await?;
    let mut report = PullReport {
        after,
        rows,
        cells_written: 0,
        first: None,
        last: None,
    };
    if rows == 0 {
        return Ok(report);
    }
    let options = ImportOptions {
        time_column: Some(CSV_TIME_COLUMN.to_string()),
        ..ImportOptions::new(series.name.clone())
    };
    let imported = import_csv(store, Cursor::new(csv), &options)
        .await
        .map_err(pulled_row_error)?;
    report.cells_written = imported.summary.cells_written;
    report.first = imported
        .summary
        .first_ts_micros
        .and_then(DateTime::from_timestamp_micros);
    report.last = imported
        .summary
        .last_ts_micros
        .and_then(DateTime::from_timestamp_micros);
    Ok(report)
}

/// Runs the source query read-only and writes its rows as CSV text with a
/// `ts` column and one column per value column; returns the text and the
/// number of rows.
async fn read_source(
    spec: &SourceSpec,
    series: &Series,
    after: Option<DateTime<Utc>>,
) -> Result<(Vec<u8>, u64), PullError> {
    let url = &spec.connection_url;
    let options: PgConnectOptions = url
        .expose()
        .parse::<PgConnectOptions>()
        .map_err(|err| PullError::InvalidSource {
            field: "connection_url",
            message: scrub(&err.to_string(), url),
        })?
        .application_name("xlstm-forecast pull")
        .options([
            ("default_transaction_read_only", "on"),
            ("statement_timeout", STATEMENT_TIMEOUT),
        ]);
    let connect_error = |message: String| PullError::Connect {
        url: url.masked(),
        message: scrub(&message, url),
    };
    let mut connection =
        tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(&options))
            .await
            .map_err(|_| connect_error(format!("no answer within {CONNECT_TIMEOUT:?}")))?
            .map_err(|err| connect_error(err.to_string()))?;
    let query_error = |err: sqlx::Error| PullError::Query(scrub(&err.to_string(), url));
    let mut transaction = connection
        .begin_with("BEGIN READ ONLY")
        .await
        .map_err(query_error)?;

    let user_query = spec
        .query
        .trim()
        .trim_end_matches(';')
        .replace(AFTER_PLACEHOLDER, "$1::timestamptz");
    let columns = describe_columns(&mut transaction, &user_query, url).await?;
    let layout = ResultLayout::new(&columns, spec.time_column.as_deref())?;
    let wrapped = layout.wrapping_query(&user_query);

    // An empty series pulls everything: the earliest timestamp the store keeps.
    let after = after.unwrap_or_else(|| {
        DateTime::from_timestamp_micros(MIN_TS_MICROS).expect("the store's earliest timestamp")
    });
    let mut query = sqlx::query(sqlx::AssertSqlSafe(wrapped)).bind(after);
    if layout.needs_timezone() {
        query = query.bind(series.timezone.clone());
    }
    let mut csv = layout.csv_header();
    let mut rows = 0_u64;
    let mut stream = query.fetch(&mut *transaction);
    while let Some(row) = stream.try_next().await.map_err(query_error)? {
        layout.push_csv_row(&row, &mut csv).map_err(query_error)?;
        rows += 1;
    }
    drop(stream);
    transaction.rollback().await.map_err(query_error)?;
    connection.close().await.ok();
    Ok((csv.into_bytes(), rows))
}

async fn describe_columns(
    connection: &mut PgConnection,
    query: &str,
    url: &SecretUrl,
) -> Result<Vec<(String, String)>, PullError> {
    let statement = connection
        .prepare(sqlx::SqlSafeStr::into_sql_str(sqlx::AssertSqlSafe(
            query.to_string(),
        )))
        .await
        .map_err(|err| PullError::Query(scrub(&err.to_string(), url)))?;
    Ok(statement
        .columns()
        .iter()
        .map(|column| {
            (
                column.name().to_string(),
                column.type_info().name().to_string(),
            )
        })
        .collect())
}

/// How the query's result columns become a time column and value columns.
#[derive(Debug)]
struct ResultLayout {
    time_column: String,
    time_kind: TimeKind,
    value_columns: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TimeKind {
    /// TIMESTAMPTZ: an absolute instant.
    Instant,
    /// TIMESTAMP or DATE: a local time in the series' time zone.
    Local,
}

const NUMERIC_TYPES: [&str; 6] = ["INT2", "INT4", "INT8", "FLOAT4", "FLOAT8", "NUMERIC"];

impl ResultLayout {
    fn new(columns: &[(String, String)], time_column: Option<&str>) -> Result<Self, PullError> {
        if columns.is_empty() {
            return Err(PullError::Query(
                "the query returns no columns; it must return a timestamp column and numeric columns"
                    .to_string(),
            ));
        }
        for (index, (name, _)) in columns.iter().enumerate() {
            if columns[..index].iter().any(|(earlier, _)| earlier == name) {
                return Err(PullError::Column {
                    column: name.clone(),
                    message: "appears twice in the result; give each column its own name"
                        .to_string(),
                });
            }
        }
        let time_index = match time_column {
            Some(wanted) => columns
                .iter()
                .position(|(name, _)| name == wanted)
                .ok_or_else(|| PullError::InvalidSource {
                    field: "time_column",
                    message: format!(
                        "'{wanted}' is not a column of the query's result (it has: {})",
                        columns
                            .iter()
                            .map(|(name, _)| name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                })?,
            None => 0,
        };
        let (time_name, time_type) = &columns[time_index];
        let time_kind = match time_type.as_str() {
            "TIMESTAMPTZ" => TimeKind::Instant,
            "TIMESTAMP" | "DATE" => TimeKind::Local,
            other => {
                return Err(PullError::Column {
                    column: time_name.clone(),
                    message: format!(
                        "the time column has type {other}; expected TIMESTAMPTZ, TIMESTAMP or DATE"
                    ),
                });
            }
        };
        let mut value_columns = Vec::with_capacity(columns.len() - 1);
        for (index, (name, type_name)) in columns.iter().enumerate() {
            if index == time_index {
                continue;
            }
            if !NUMERIC_TYPES.contains(&type_name.as_str()) {
                return Err(PullError::Column {
                    column: name.clone(),
                    message: format!(
                        "has type {type_name}; value columns must be numeric ({})",
                        NUMERIC_TYPES.join(", ")
                    ),
                });
            }
            value_columns.push(name.clone());
        }
        if value_columns.is_empty() {
            return Err(PullError::Query(format!(
                "the query returns only the time column '{time_name}'; add numeric value columns"
            )));
        }
        Ok(Self {
            time_column: time_name.clone(),
            time_kind,
            value_columns,
        })
    }

    fn needs_timezone(&self) -> bool {
        self.time_kind == TimeKind::Local
    }

    /// The user's query wrapped to return (timestamptz, float8, ...) in time
    /// order; local times are read in the series' zone ($2).
    fn wrapping_query(&self, user_query: &str) -> String {
        let time = quote_identifier(&self.time_column);
        let time_expression = match self.time_kind {
            TimeKind::Instant => time,
            TimeKind::Local => format!("({time}::timestamp AT TIME ZONE $2::text)"),
        };
        let values: Vec<String> = self
            .value_columns
            .iter()
            .map(|name| format!("{}::float8", quote_identifier(name)))
            .collect();
        format!(
            "SELECT {time_expression}, {} FROM ({user_query}\n) AS source ORDER BY 1",
            values.join(", ")
        )
    }

    fn csv_header(&self) -> String {
        let mut header = String::from(CSV_TIME_COLUMN);
        for name in &self.value_columns {
            header.push(',');
            push_quoted(&mut header, name);
        }
        header.push('\n');
        header
    }

    fn push_csv_row(&self, row: &PgRow, csv: &mut String) -> Result<(), sqlx::Error> {
        use std::fmt::Write;
        let ts: Option<DateTime<Utc>> = row.try_get(0)?;
        if let Some(ts) = ts {
            csv.push_str(&ts.to_rfc3339_opts(SecondsFormat::AutoSi, true));
        }
        for index in 1..=self.value_columns.len() {
            csv.push(',');
            if let Some(value) = row.try_get::<Option<f64>, _>(index)? {
                // Display writes the shortest text that reads back to the same
                // f64; NaN and infinities come out as text the import refuses.
                write!(csv, "{value}").expect("writing to a String");
            }
        }
        csv.push('\n');
        Ok(())
    }
}

fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn push_quoted(csv: &mut String, field: &str) {
    csv.push('"');
    csv.push_str(&field.replace('"', "\"\""));
    csv.push('"');
}

/// Import errors about the rewritten CSV, restated as rows of the query's
/// result (row 1 is the first row).
fn pulled_row_error(err: DataError) -> PullError {
    match err {
        DataError::Invalid {
            line,
            column,
            message,
        } => {
            let column = column.map(|column| {
                if column == CSV_TIME_COLUMN {
                    "the time column".to_string()
                } else {
                    format!("column '{column}'")
                }
            });
            let row = line.and_then(|line| line.checked_sub(1));
            PullError::Rows(match (row, column) {
                (Some(row), Some(column)) => format!("row {row}, {column}: {message}"),
                (Some(row), None) => format!("row {row}: {message}"),
                (None, Some(column)) => format!("{column}: {message}"),
                (None, None) => message,
            })
        }
        DataError::Store(err) => PullError::Store(err),
        other => PullError::Rows(other.to_string()),
    }
}

/// Removes the URL's password from a message, should a driver ever echo it.
fn scrub(message: &str, url: &SecretUrl) -> String {
    match url::Url::parse(url.expose())
        .ok()
        .and_then(|parsed| parsed.password().map(str::to_string))
    {
        Some(password) if !password.is_empty() => message.replace(&password, "****"),
        _ => message.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(url: &str, query: &str) -> SourceSpec {
        SourceSpec {
            series_id: 1,
            connection_url: SecretUrl::new(url),
            query: query.to_string(),
            time_column: None,
        }
    }

    #[test]
    fn source_checks_name_the_field() {
        let good = "SELECT ts, v FROM t WHERE ts > {{after}}";
        assert!(check_source(&spec("postgres://u:p@h/db", good)).is_ok());
        let err = check_source(&spec("mysql://u:s3cret@h/db", good)).unwrap_err();
        assert!(matches!(
            err,
            PullError::InvalidSource {
                field: "connection_url",
                ..
            }
        ));
        assert!(!err.to_string().contains("s3cret"), "{err}");
        let err = check_source(&spec("postgres://u:p@h/db", "SELECT ts, v FROM t")).unwrap_err();
        assert!(matches!(
            err,
            PullError::InvalidSource { field: "query", .. }
        ));
    }

    #[test]
    fn layout_takes_the_time_column_and_numeric_values() {
        let columns = |list: &[(&str, &str)]| -> Vec<(String, String)> {
            list.iter()
                .map(|(name, ty)| (name.to_string(), ty.to_string()))
                .collect()
        };
        let layout = ResultLayout::new(
            &columns(&[("at", "TIMESTAMP"), ("load", "NUMERIC"), ("temp", "FLOAT8")]),
            None,
        )
        .unwrap();
        assert!(layout.needs_timezone());
        assert_eq!(
            layout.wrapping_query("SELECT 1"),
            "SELECT (\"at\"::timestamp AT TIME ZONE $2::text), \"load\"::float8, \"temp\"::float8 \
             FROM (SELECT 1\n) AS source ORDER BY 1"
        );
        assert_eq!(layout.csv_header(), "ts,\"load\",\"temp\"\n");
        let err = ResultLayout::new(&columns(&[("ts", "TIMESTAMPTZ"), ("note", "TEXT")]), None)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "column 'note' of the source query: has type TEXT; value columns must be numeric \
             (INT2, INT4, INT8, FLOAT4, FLOAT8, NUMERIC)"
        );
        let err = ResultLayout::new(&columns(&[("v", "FLOAT8"), ("ts", "TIMESTAMPTZ")]), None)
            .unwrap_err();
        assert!(
            err.to_string().contains("the time column has type FLOAT8"),
            "{err}"
        );
        let by_name = ResultLayout::new(
            &columns(&[("v", "FLOAT8"), ("ts", "TIMESTAMPTZ")]),
            Some("ts"),
        )
        .unwrap();
        assert_eq!(by_name.value_columns, vec!["v"]);
    }

    #[test]
    fn passwords_are_scrubbed_from_messages() {
        let url = SecretUrl::new("postgres://reader:hunter2@db.example/prod");
        assert_eq!(
            scrub("auth failed for reader:hunter2", &url),
            "auth failed for reader:****"
        );
        assert_eq!(format!("{url}"), "postgres://reader:****@db.example/prod");
        assert_eq!(
            format!("{url:?}"),
            "SecretUrl(\"postgres://reader:****@db.example/prod\")"
        );
        assert_eq!(
            serde_json::to_string(&url).unwrap(),
            "\"postgres://reader:****@db.example/prod\""
        );
    }
}
