//! The SQLite store: the embedded default (one file, nothing else to install).
//!
//! Timestamps are INTEGER microseconds since the Unix epoch, JSON is TEXT.
//! Write transactions start with `BEGIN IMMEDIATE` so that a writer waits for
//! the write lock up front (bounded by the busy timeout) instead of failing
//! when it upgrades from reading to writing halfway through.

use std::str::FromStr;
use std::sync::OnceLock;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use serde_json::Value;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, Connection, Row, Sqlite, SqliteConnection, Transaction};

use super::forecast_rows::{ForecastRow, ForecastRows, assemble_points, sorted_points};
use super::validate::{max_option, min_option};
use super::{
    Backend, EnqueuedRun, Forecast, ForecastPoint, ImportSession, ImportSummary, LOAD_SPANS,
    LeaseState, LongObservations, MigrationReport, ModelVersion, ModelVersionStatus,
    ModelVersionSummary, NewForecast, NewModelVersion, NewRun, ObservationBatch, ObservationRange,
    PendingMigration, Run, RunClaim, RunFilter, RunOutcome, RunStatistic, Schedule, ScheduleSpec,
    SecretUrl, Series, SeriesSpec, Source, SourceSpec, Store, StoreError, VersionRef,
    apply_migrations, datetime_from_micros, join_spans, pending_migrations, series_named,
    split_time_span, validate,
};
use crate::config::mask_database_url;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// Observation rows per multi-row upsert: 4 × 4096 bind parameters, well under
/// SQLite's limit of 32766, and few enough statements per million rows.
const UPSERT_CHUNK_ROWS: usize = 4096;
/// Forecast point rows per multi-row insert (6 × 1024 parameters).
const FORECAST_CHUNK_ROWS: usize = 1024;

macro_rules! series_columns {
    () => {
        "id, name, frequency, timezone, channels, created_at, data_revision"
    };
}
macro_rules! model_version_summary_columns {
    () => {
        "id, series_id, config, length(artefact) AS artefact_bytes, normalisation, data_from, data_to, metrics, \
         status, parent_version_id, is_champion, created_at"
    };
}
macro_rules! run_columns {
    () => {
        "id, series_id, kind, status, requested, progress, error, attempts, max_attempts, lease_owner, \
         lease_expires_at, schedule_id, scheduled_for, model_version_id, created_at, started_at, finished_at, \
         heartbeat_at, cancel_requested"
    };
}
macro_rules! source_columns {
    () => {
        "series_id, connection_url, query, time_column, created_at, updated_at"
    };
}
macro_rules! schedule_columns {
    () => {
        "id, series_id, cron, timezone, mode, enabled, created_at, updated_at"
    };
}
macro_rules! forecast_columns {
    () => {
        "id, series_id, model_version_id, issued_at, horizon, quantile_levels"
    };
}
/// The current time in the schema's timestamp form (integer microseconds).
macro_rules! now_micros {
    () => {
        "CAST(unixepoch('subsec') * 1000000 AS INTEGER)"
    };
}

pub(crate) struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|err| {
                StoreError::invalid("database_url", format!("{}: {err}", mask_database_url(url)))
            })?
            .create_if_missing(true)
            .foreign_keys(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(30))
            // Rows cross from SQLite's worker thread in this many per hand-off;
            // the default (50) makes loading a million observations pay for
            // tens of thousands of thread wake-ups.
            .row_buffer_size(8192);
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        if !in_memory
            && let Some(parent) = options.get_filename().parent()
            && !parent.as_os_str().is_empty()
        {
            std::fs::create_dir_all(parent).map_err(|err| {
                StoreError::Unavailable(format!(
                    "cannot create the directory {} for the database: {err}",
                    parent.display()
                ))
            })?;
        }
        // An in-memory database lives in its one connection, so the pool must
        // keep exactly that connection.
        let pool_options = if in_memory {
            SqlitePoolOptions::new()
                .max_connections(1)
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None)
        } else {
            SqlitePoolOptions::new().max_connections(8)
        };
        let unavailable = |err: sqlx::Error| {
            StoreError::Unavailable(format!("cannot open {}: {err}", mask_database_url(url)))
        };
        // One direct attempt first: the pool retries until its timeout and
        // then reports only "timed out", hiding why (permissions, not a database).
        if !in_memory {
            SqliteConnection::connect_with(&options)
                .await
                .map_err(unavailable)?
                .close()
                .await
                .map_err(unavailable)?;
        }
        let pool = pool_options
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options)
            .await
            .map_err(unavailable)?;
        Ok(Self { pool })
    }

    /// The points of one forecast, ordered by step, then channel.
    async fn forecast_points(
        &self,
        forecast_id: i64,
        levels: &[f64],
    ) -> Result<Vec<ForecastPoint>, StoreError> {
        let rows = sqlx::query(
            "SELECT step, ts, channel, quantile, value FROM forecast_points WHERE forecast_id = ?1 \
             ORDER BY step, channel, quantile NULLS FIRST",
        )
        .bind(forecast_id)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|row| {
            Ok(ForecastRow {
                step: row.try_get(0)?,
                ts: datetime_from_micros("ts", row.try_get(1)?)?,
                channel: row.try_get(2)?,
                quantile: row.try_get(3)?,
                value: row.try_get(4)?,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
        assemble_points(rows, levels)
    }

    async fn begin_write(&self) -> Result<Transaction<'static, Sqlite>, StoreError> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }

    async fn series_id_and_channels(&self, name: &str) -> Result<(i64, Vec<String>), StoreError> {
        let row = sqlx::query("SELECT id, channels FROM series WHERE name = ?1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::not_found(series_named(name)))?;
        Ok((row.try_get(0)?, parse_json("channels", row.try_get(1)?)?))
    }
}

async fn require_series(
    tx: &mut Transaction<'static, Sqlite>,
    series_id: i64,
) -> Result<(), StoreError> {
    sqlx::query("SELECT 1 FROM series WHERE id = ?1")
        .bind(series_id)
        .fetch_optional(&mut **tx)
        .await?
        .map(|_| ())
        .ok_or_else(|| StoreError::not_found(format!("series {series_id}")))
}

/// The series a model version belongs to, if the version exists.
async fn model_version_series(
    tx: &mut Transaction<'static, Sqlite>,
    id: i64,
) -> Result<Option<i64>, StoreError> {
    Ok(
        sqlx::query("SELECT series_id FROM model_versions WHERE id = ?1")
            .bind(id)
            .fetch_optional(&mut **tx)
            .await?
            .map(|row| row.try_get(0))
            .transpose()?,
    )
}

fn parse_json<T: serde::de::DeserializeOwned>(
    column: &'static str,
    text: &str,
) -> Result<T, StoreError> {
    serde_json::from_str(text)
        .map_err(|err| StoreError::invalid(column, format!("stored JSON is unreadable: {err}")))
}

fn to_json<T: serde::Serialize + ?Sized>(
    column: &'static str,
    value: &T,
) -> Result<String, StoreError> {
    serde_json::to_string(value)
        .map_err(|err| StoreError::invalid(column, format!("cannot encode as JSON: {err}")))
}

fn timestamp(row: &SqliteRow, column: &'static str) -> Result<DateTime<Utc>, StoreError> {
    datetime_from_micros(column, row.try_get(column)?)
}

fn optional_timestamp(
    row: &SqliteRow,
    column: &'static str,
) -> Result<Option<DateTime<Utc>>, StoreError> {
    row.try_get::<Option<i64>, _>(column)?
        .map(|micros| datetime_from_micros(column, micros))
        .transpose()
}

fn series_from_row(row: &SqliteRow) -> Result<Series, StoreError> {
    Ok(Series {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        frequency: row.try_get("frequency")?,
        timezone: row.try_get("timezone")?,
        channels: parse_json("channels", row.try_get("channels")?)?,
        created_at: timestamp(row, "created_at")?,
        data_revision: row.try_get("data_revision")?,
    })
}

fn model_version_summary_from_row(row: &SqliteRow) -> Result<ModelVersionSummary, StoreError> {
    Ok(ModelVersionSummary {
        id: row.try_get("id")?,
        series_id: row.try_get("series_id")?,
        config: parse_json("config", row.try_get("config")?)?,
        artefact_bytes: row.try_get::<i64, _>("artefact_bytes")? as u64,
        normalisation: parse_json("normalisation", row.try_get("normalisation")?)?,
        data_from: timestamp(row, "data_from")?,
        data_to: timestamp(row, "data_to")?,
        metrics: parse_json("metrics", row.try_get("metrics")?)?,
        status: row.try_get::<&str, _>("status")?.parse()?,
        parent_version_id: row.try_get("parent_version_id")?,
        is_champion: row.try_get("is_champion")?,
        created_at: timestamp(row, "created_at")?,
    })
}

fn model_version_from_row(row: &SqliteRow) -> Result<ModelVersion, StoreError> {
    Ok(ModelVersion {
        summary: model_version_summary_from_row(row)?,
        artefact: row.try_get("artefact")?,
    })
}

fn run_from_row(row: &SqliteRow) -> Result<Run, StoreError> {
    Ok(Run {
        id: row.try_get("id")?,
        series_id: row.try_get("series_id")?,
        kind: row.try_get::<&str, _>("kind")?.parse()?,
        status: row.try_get::<&str, _>("status")?.parse()?,
        requested: parse_json("requested", row.try_get("requested")?)?,
        progress: parse_json("progress", row.try_get("progress")?)?,
        error: row.try_get("error")?,
        attempts: row.try_get("attempts")?,
        max_attempts: row.try_get("max_attempts")?,
        lease_owner: row.try_get("lease_owner")?,
        lease_expires_at: optional_timestamp(row, "lease_expires_at")?,
        schedule_id: row.try_get("schedule_id")?,
        scheduled_for: optional_timestamp(row, "scheduled_for")?,
        model_version_id: row.try_get("model_version_id")?,
        created_at: timestamp(row, "created_at")?,
        started_at: optional_timestamp(row, "started_at")?,
        finished_at: optional_timestamp(row, "finished_at")?,
        heartbeat_at: optional_timestamp(row, "heartbeat_at")?,
        cancel_requested: row.try_get("cancel_requested")?,
    })
}

fn source_from_row(row: &SqliteRow) -> Result<Source, StoreError> {
    Ok(Source {
        series_id: row.try_get("series_id")?,
        connection_url: SecretUrl::new(row.try_get::<String, _>("connection_url")?),
        query: row.try_get("query")?,
        time_column: row.try_get("time_column")?,
        created_at: timestamp(row, "created_at")?,
        updated_at: timestamp(row, "updated_at")?,
    })
}

/// Why `owner` could not act on run `id` under its lease (see the Postgres twin).
async fn lease_refusal(tx: &mut Transaction<'static, Sqlite>, id: i64, owner: &str) -> StoreError {
    let row = sqlx::query("SELECT status, lease_owner FROM runs WHERE id = ?1")
        .bind(id)
        .fetch_optional(&mut **tx)
        .await;
    match row {
        Err(err) => err.into(),
        Ok(None) => StoreError::not_found(format!("run {id}")),
        Ok(Some(row)) => {
            let status: String = row.try_get(0).unwrap_or_default();
            let holder: Option<String> = row.try_get(1).unwrap_or_default();
            super::lease_lost(id, owner, &status, holder.as_deref())
        }
    }
}

fn lease_micros(lease: Duration) -> i64 {
    i64::try_from(lease.as_micros()).unwrap_or(i64::MAX)
}

fn schedule_from_row(row: &SqliteRow) -> Result<Schedule, StoreError> {
    Ok(Schedule {
        id: row.try_get("id")?,
        series_id: row.try_get("series_id")?,
        cron: row.try_get("cron")?,
        timezone: row.try_get("timezone")?,
        mode: row.try_get::<&str, _>("mode")?.parse()?,
        enabled: row.try_get("enabled")?,
        created_at: timestamp(row, "created_at")?,
        updated_at: timestamp(row, "updated_at")?,
    })
}

fn forecast_header_from_row(row: &SqliteRow) -> Result<Forecast, StoreError> {
    let horizon: i64 = row.try_get("horizon")?;
    Ok(Forecast {
        id: row.try_get("id")?,
        series_id: row.try_get("series_id")?,
        model_version_id: row.try_get("model_version_id")?,
        issued_at: timestamp(row, "issued_at")?,
        horizon: horizon as u32,
        quantile_levels: parse_json("quantile_levels", row.try_get("quantile_levels")?)?,
        points: Vec::new(),
    })
}

fn is_unique_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.is_unique_violation())
}

/// `(?, ?, …), (?, ?, …), …`: `rows` tuples of `per_row` parameters.
///
/// Only anonymous `?` parameters: sqlx looks up each numbered parameter's
/// name, and SQLite answers that with a linear scan, which makes binding a
/// statement with thousands of numbered parameters quadratic.
fn anonymous_values(rows: usize, per_row: usize) -> String {
    let tuple = format!("({})", vec!["?"; per_row].join(", "));
    vec![tuple; rows].join(", ")
}

/// The observation upsert for `rows` rows. The statement text is a pure
/// function of the row count, so sqlx's per-connection statement cache
/// prepares each size once.
fn observation_upsert_sql(rows: usize) -> String {
    format!(
        "INSERT INTO observations (series_id, ts, channel, value) VALUES {} \
         ON CONFLICT (series_id, ts, channel) DO UPDATE SET value = excluded.value \
         WHERE observations.value IS NOT excluded.value",
        anonymous_values(rows, 4)
    )
}

fn full_chunk_observation_upsert() -> &'static str {
    static SQL: OnceLock<String> = OnceLock::new();
    SQL.get_or_init(|| observation_upsert_sql(UPSERT_CHUNK_ROWS))
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> Backend {
        Backend::Sqlite
    }

    async fn migrate(&self) -> Result<MigrationReport, StoreError> {
        let mut conn = self.pool.acquire().await?;
        apply_migrations(&MIGRATOR, &mut *conn).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(|err| StoreError::Unavailable(err.to_string()))
    }

    async fn missing_migrations(&self) -> Result<Vec<PendingMigration>, StoreError> {
        let table = MIGRATOR.table_name.as_ref();
        let table_exists: Option<i64> =
            sqlx::query_scalar("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1")
                .bind(table)
                .fetch_optional(&self.pool)
                .await?;
        let applied: Vec<i64> = if table_exists.is_some() {
            // The name is the migrator's own constant, never user input.
            sqlx::query_scalar(AssertSqlSafe(format!(
                "SELECT version FROM \"{table}\" WHERE success"
            )))
            .fetch_all(&self.pool)
            .await?
        } else {
            Vec::new()
        };
        Ok(pending_migrations(&MIGRATOR, &applied))
    }

    async fn create_series(&self, spec: &SeriesSpec) -> Result<Series, StoreError> {
        validate::series_spec(spec)?;
        let row = sqlx::query(concat!(
            "INSERT INTO series (name, frequency, timezone, channels) VALUES (?1, ?2, ?3, ?4) RETURNING ",
            series_columns!()
        ))
        .bind(&spec.name)
        .bind(&spec.frequency)
        .bind(&spec.timezone)
        .bind(to_json("channels", &spec.channels)?)
        .fetch_one(&self.pool)
        .await
        .map_err(|err| {
            if is_unique_violation(&err) {
                StoreError::Conflict(format!("series '{}' already exists", spec.name))
            } else {
                err.into()
            }
        })?;
        series_from_row(&row)
    }

    async fn get_series(&self, name: &str) -> Result<Option<Series>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            series_columns!(),
            " FROM series WHERE name = ?1"
        ))
        .bind(name)
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(series_from_row)
        .transpose()
    }

    async fn get_series_by_id(&self, id: i64) -> Result<Option<Series>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            series_columns!(),
            " FROM series WHERE id = ?1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(series_from_row)
        .transpose()
    }

    async fn list_series(&self) -> Result<Vec<Series>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            series_columns!(),
            " FROM series ORDER BY name"
        ))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(series_from_row)
        .collect()
    }

    async fn delete_series(&self, name: &str) -> Result<(), StoreError> {
        let deleted = sqlx::query("DELETE FROM series WHERE name = ?1")
            .bind(name)
            .execute(&self.pool)
            .await?;
        if deleted.rows_affected() == 0 {
            return Err(StoreError::not_found(series_named(name)));
        }
        Ok(())
    }

    async fn begin_import(&self, spec: &SeriesSpec) -> Result<Box<dyn ImportSession>, StoreError> {
        validate::series_spec(spec)?;
        let mut tx = self.begin_write().await?;
        let existing = sqlx::query("SELECT id, channels FROM series WHERE name = ?1")
            .bind(&spec.name)
            .fetch_optional(&mut *tx)
            .await?;
        let (series_id, channels, created_series) = match existing {
            Some(row) => {
                let channels: Vec<String> = parse_json("channels", row.try_get(1)?)?;
                validate::channel_indices(&spec.name, &channels, &spec.channels)?;
                (row.try_get(0)?, channels, false)
            }
            None => {
                let row = sqlx::query(
                    "INSERT INTO series (name, frequency, timezone, channels) VALUES (?1, ?2, ?3, ?4) RETURNING id",
                )
                .bind(&spec.name)
                .bind(&spec.frequency)
                .bind(&spec.timezone)
                .bind(to_json("channels", &spec.channels)?)
                .fetch_one(&mut *tx)
                .await?;
                (row.try_get(0)?, spec.channels.clone(), true)
            }
        };
        Ok(Box::new(SqliteImport {
            tx,
            series_id,
            series_name: spec.name.clone(),
            channels,
            created_series,
            cells_written: 0,
            first_ts_micros: None,
            last_ts_micros: None,
        }))
    }

    async fn load_observations(
        &self,
        series: &str,
        from_micros: Option<i64>,
        to_micros: Option<i64>,
        channels: Option<&[String]>,
    ) -> Result<LongObservations, StoreError> {
        let (from, to) = validate::load_bounds(from_micros, to_micros)?;
        let (series_id, known) = self.series_id_and_channels(series).await?;
        let channel_filter = channels
            .map(|requested| validate::channel_indices(series, &known, requested))
            .transpose()?
            .map(|indices| to_json("channels", &indices))
            .transpose()?;
        let bounds = sqlx::query(
            "SELECT min(ts), max(ts) FROM observations WHERE series_id = ?1 AND ts >= ?2 AND ts <= ?3",
        )
        .bind(series_id)
        .bind(from)
        .bind(to)
        .fetch_one(&self.pool)
        .await?;
        let (Some(first), Some(last)) = (bounds.try_get(0)?, bounds.try_get(1)?) else {
            return Ok(LongObservations {
                channels: known,
                ..LongObservations::default()
            });
        };
        let tasks = split_time_span(first, last, LOAD_SPANS)
            .into_iter()
            .map(|(span_from, span_to)| {
                tokio::spawn(load_span(
                    self.pool.clone(),
                    series_id,
                    span_from,
                    span_to,
                    channel_filter.clone(),
                ))
            })
            .collect();
        join_spans(known, tasks).await
    }

    async fn observation_range(&self, series: &str) -> Result<ObservationRange, StoreError> {
        let (series_id, _) = self.series_id_and_channels(series).await?;
        let row =
            sqlx::query("SELECT count(*), min(ts), max(ts) FROM observations WHERE series_id = ?1")
                .bind(series_id)
                .fetch_one(&self.pool)
                .await?;
        Ok(ObservationRange {
            count: row.try_get::<i64, _>(0)? as u64,
            first_ts_micros: row.try_get(1)?,
            last_ts_micros: row.try_get(2)?,
        })
    }

    async fn last_observation_micros(&self, series_id: i64) -> Result<Option<i64>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT ts FROM observations WHERE series_id = ?1 ORDER BY ts DESC LIMIT 1",
        )
        .bind(series_id)
        .fetch_optional(&self.pool)
        .await?)
    }

    async fn insert_model_version(
        &self,
        version: &NewModelVersion,
    ) -> Result<ModelVersionSummary, StoreError> {
        validate::new_model_version(version)?;
        let mut tx = self.begin_write().await?;
        require_series(&mut tx, version.series_id).await?;
        if let Some(parent) = version.parent_version_id
            && model_version_series(&mut tx, parent).await? != Some(version.series_id)
        {
            return Err(StoreError::invalid(
                "parent_version_id",
                format!(
                    "model version {parent} does not exist for series {}",
                    version.series_id
                ),
            ));
        }
        let row = sqlx::query(concat!(
            "INSERT INTO model_versions (series_id, config, artefact, normalisation, data_from, data_to, metrics, \
             status, parent_version_id) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) RETURNING ",
            model_version_summary_columns!()
        ))
        .bind(version.series_id)
        .bind(to_json("config", &version.config)?)
        .bind(&version.artefact)
        .bind(to_json("normalisation", &version.normalisation)?)
        .bind(version.data_from.timestamp_micros())
        .bind(version.data_to.timestamp_micros())
        .bind(to_json("metrics", &version.metrics)?)
        .bind(version.status.as_str())
        .bind(version.parent_version_id)
        .fetch_one(&mut *tx)
        .await?;
        let summary = model_version_summary_from_row(&row)?;
        tx.commit().await?;
        Ok(summary)
    }

    async fn get_model_version(&self, id: i64) -> Result<Option<ModelVersion>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            model_version_summary_columns!(),
            ", artefact FROM model_versions WHERE id = ?1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(model_version_from_row)
        .transpose()
    }

    async fn get_model_version_summary(
        &self,
        id: i64,
    ) -> Result<Option<ModelVersionSummary>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            model_version_summary_columns!(),
            " FROM model_versions WHERE id = ?1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(model_version_summary_from_row)
        .transpose()
    }

    async fn list_model_versions(
        &self,
        series_id: i64,
    ) -> Result<Vec<ModelVersionSummary>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            model_version_summary_columns!(),
            " FROM model_versions WHERE series_id = ?1 ORDER BY id DESC"
        ))
        .bind(series_id)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(model_version_summary_from_row)
        .collect()
    }

    async fn champion_ref(&self, series_id: i64) -> Result<Option<VersionRef>, StoreError> {
        sqlx::query(
            "SELECT id, created_at FROM model_versions WHERE series_id = ?1 AND is_champion",
        )
        .bind(series_id)
        .fetch_optional(&self.pool)
        .await?
        .map(|row| {
            Ok(VersionRef {
                id: row.try_get("id")?,
                created_at: timestamp(&row, "created_at")?,
            })
        })
        .transpose()
    }

    async fn champion_model_version(
        &self,
        series_id: i64,
    ) -> Result<Option<ModelVersion>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            model_version_summary_columns!(),
            ", artefact FROM model_versions WHERE series_id = ?1 AND is_champion"
        ))
        .bind(series_id)
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(model_version_from_row)
        .transpose()
    }

    async fn promote_model_version(&self, id: i64) -> Result<(), StoreError> {
        // BEGIN IMMEDIATE serialises promotions: the clear-then-set below
        // cannot interleave with another writer.
        let mut tx = self.begin_write().await?;
        let row = sqlx::query("SELECT series_id, status FROM model_versions WHERE id = ?1")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| StoreError::not_found(format!("model version {id}")))?;
        let series_id: i64 = row.try_get(0)?;
        let status: ModelVersionStatus = row.try_get::<&str, _>(1)?.parse()?;
        if status == ModelVersionStatus::Rejected {
            return Err(StoreError::Conflict(format!(
                "model version {id} was rejected and cannot become the champion"
            )));
        }
        sqlx::query("UPDATE model_versions SET is_champion = 0 WHERE series_id = ?1 AND is_champion AND id <> ?2")
            .bind(series_id)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE model_versions SET is_champion = 1 WHERE id = ?1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn enqueue_run(&self, run: &NewRun) -> Result<EnqueuedRun, StoreError> {
        validate::new_run(run)?;
        let mut tx = self.begin_write().await?;
        require_series(&mut tx, run.series_id).await?;
        if let Some(schedule_id) = run.schedule_id {
            sqlx::query("SELECT 1 FROM schedules WHERE id = ?1")
                .bind(schedule_id)
                .fetch_optional(&mut *tx)
                .await?
                .ok_or_else(|| {
                    StoreError::invalid(
                        "schedule_id",
                        format!("schedule {schedule_id} does not exist"),
                    )
                })?;
        }
        let scheduled_for = run.scheduled_for.map(|ts| ts.timestamp_micros());
        let inserted = sqlx::query(concat!(
            "INSERT INTO runs (series_id, kind, requested, max_attempts, schedule_id, scheduled_for) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (schedule_id, scheduled_for) DO NOTHING RETURNING ",
            run_columns!()
        ))
        .bind(run.series_id)
        .bind(run.kind.as_str())
        .bind(to_json("requested", &run.requested)?)
        .bind(run.max_attempts)
        .bind(run.schedule_id)
        .bind(scheduled_for)
        .fetch_optional(&mut *tx)
        .await?;
        let enqueued = match inserted {
            Some(row) => EnqueuedRun {
                run: run_from_row(&row)?,
                created: true,
            },
            None => {
                let row = sqlx::query(concat!(
                    "SELECT ",
                    run_columns!(),
                    " FROM runs WHERE schedule_id = ?1 AND scheduled_for = ?2"
                ))
                .bind(run.schedule_id)
                .bind(scheduled_for)
                .fetch_one(&mut *tx)
                .await?;
                EnqueuedRun {
                    run: run_from_row(&row)?,
                    created: false,
                }
            }
        };
        tx.commit().await?;
        Ok(enqueued)
    }

    async fn get_run(&self, id: i64) -> Result<Option<Run>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            run_columns!(),
            " FROM runs WHERE id = ?1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(run_from_row)
        .transpose()
    }

    async fn list_runs(&self, filter: &RunFilter) -> Result<Vec<Run>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            run_columns!(),
            " FROM runs WHERE (?1 IS NULL OR series_id = ?1) AND (?2 IS NULL OR status = ?2) \
             ORDER BY id DESC LIMIT coalesce(?3, -1)"
        ))
        .bind(filter.series_id)
        .bind(filter.status.map(|status| status.as_str()))
        .bind(filter.limit.map(i64::from))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(run_from_row)
        .collect()
    }

    async fn run_statistics(&self) -> Result<Vec<RunStatistic>, StoreError> {
        sqlx::query("SELECT kind, status, COUNT(*) AS runs, CAST(COALESCE(SUM(finished_at - started_at), 0) AS REAL) / 1000000.0 AS seconds FROM runs GROUP BY kind, status ORDER BY kind, status")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|row| {
                Ok(RunStatistic {
                    kind: row.try_get::<&str, _>("kind")?.parse()?,
                    status: row.try_get::<&str, _>("status")?.parse()?,
                    runs: u64::try_from(row.try_get::<i64, _>("runs")?).unwrap_or(0),
                    seconds: row.try_get::<Option<f64>, _>("seconds")?.unwrap_or(0.0),
                })
            })
            .collect()
    }

    async fn update_run_progress(&self, id: i64, progress: &Value) -> Result<(), StoreError> {
        let updated = sqlx::query(concat!(
            "UPDATE runs SET progress = ?2, heartbeat_at = ",
            now_micros!(),
            " WHERE id = ?1"
        ))
        .bind(id)
        .bind(to_json("progress", progress)?)
        .execute(&self.pool)
        .await?;
        if updated.rows_affected() == 0 {
            return Err(StoreError::not_found(format!("run {id}")));
        }
        Ok(())
    }

    async fn finish_run(&self, id: i64, outcome: &RunOutcome) -> Result<Run, StoreError> {
        validate::final_outcome(outcome)?;
        let mut tx = self.begin_write().await?;
        if let Some(version) = outcome.model_version_id
            && model_version_series(&mut tx, version).await?.is_none()
        {
            return Err(StoreError::invalid(
                "model_version_id",
                format!("model version {version} does not exist"),
            ));
        }
        let finished = sqlx::query(concat!(
            "UPDATE runs SET status = ?2, error = ?3, model_version_id = ?4, finished_at = ",
            now_micros!(),
            ", lease_owner = NULL, lease_expires_at = NULL \
             WHERE id = ?1 AND status IN ('queued', 'running') RETURNING ",
            run_columns!()
        ))
        .bind(id)
        .bind(outcome.status.as_str())
        .bind(&outcome.error)
        .bind(outcome.model_version_id)
        .fetch_optional(&mut *tx)
        .await?;
        let finished = match finished {
            Some(row) => run_from_row(&row)?,
            None => {
                let status: Option<String> =
                    sqlx::query_scalar("SELECT status FROM runs WHERE id = ?1")
                        .bind(id)
                        .fetch_optional(&mut *tx)
                        .await?;
                return Err(match status {
                    None => StoreError::not_found(format!("run {id}")),
                    Some(status) => {
                        StoreError::Conflict(format!("run {id} already finished as {status}"))
                    }
                });
            }
        };
        tx.commit().await?;
        Ok(finished)
    }

    async fn claim_run(&self, claim: &RunClaim) -> Result<Option<Run>, StoreError> {
        validate::run_claim(claim)?;
        let kinds: Vec<&str> = claim.kinds.iter().map(|kind| kind.as_str()).collect();
        let mut tx = self.begin_write().await?;
        // Runs whose lease lapsed on their last allowed attempt are failed
        // first, so they are never claimed again.
        sqlx::query(concat!(
            "UPDATE runs SET status = 'failed', finished_at = ",
            now_micros!(),
            ", error = 'the lease lapsed on attempt ' || attempts || ' of ' || max_attempts || \
             ' (last held by ' || ifnull(lease_owner, 'nobody') || '): the worker stopped heartbeating \
             (killed, crashed or cut off from the store)', lease_owner = NULL, lease_expires_at = NULL \
             WHERE status = 'running' AND lease_expires_at < ",
            now_micros!(),
            " AND attempts >= max_attempts"
        ))
        .execute(&mut *tx)
        .await?;
        let claimed = sqlx::query(concat!(
            "UPDATE runs SET status = 'running', attempts = attempts + 1, lease_owner = ?1, \
             lease_expires_at = ",
            now_micros!(),
            " + ?2, started_at = coalesce(started_at, ",
            now_micros!(),
            "), heartbeat_at = ",
            now_micros!(),
            " WHERE id = (SELECT id FROM runs WHERE kind IN (SELECT value FROM json_each(?3)) \
             AND (status = 'queued' OR (status = 'running' AND lease_expires_at < ",
            now_micros!(),
            " AND attempts < max_attempts)) ORDER BY created_at, id LIMIT 1) RETURNING ",
            run_columns!()
        ))
        .bind(&claim.owner)
        .bind(lease_micros(claim.lease))
        .bind(to_json("kinds", &kinds)?)
        .fetch_optional(&mut *tx)
        .await?;
        let claimed = claimed.as_ref().map(run_from_row).transpose()?;
        tx.commit().await?;
        Ok(claimed)
    }

    async fn heartbeat_run(
        &self,
        id: i64,
        owner: &str,
        lease: Duration,
        progress: Option<&Value>,
    ) -> Result<LeaseState, StoreError> {
        validate::lease(lease)?;
        let progress = progress
            .map(|progress| to_json("progress", progress))
            .transpose()?;
        let mut tx = self.begin_write().await?;
        let row = sqlx::query(concat!(
            "UPDATE runs SET lease_expires_at = ",
            now_micros!(),
            " + ?3, heartbeat_at = ",
            now_micros!(),
            ", progress = coalesce(?4, progress) \
             WHERE id = ?1 AND status = 'running' AND lease_owner = ?2 \
             RETURNING lease_expires_at, cancel_requested"
        ))
        .bind(id)
        .bind(owner)
        .bind(lease_micros(lease))
        .bind(progress)
        .fetch_optional(&mut *tx)
        .await?;
        let state = match row {
            Some(row) => LeaseState {
                expires_at: timestamp(&row, "lease_expires_at")?,
                cancel_requested: row.try_get("cancel_requested")?,
            },
            None => return Err(lease_refusal(&mut tx, id, owner).await),
        };
        tx.commit().await?;
        Ok(state)
    }

    async fn finish_leased_run(
        &self,
        id: i64,
        owner: &str,
        outcome: &RunOutcome,
    ) -> Result<Run, StoreError> {
        validate::final_outcome(outcome)?;
        let mut tx = self.begin_write().await?;
        if let Some(version) = outcome.model_version_id
            && model_version_series(&mut tx, version).await?.is_none()
        {
            return Err(StoreError::invalid(
                "model_version_id",
                format!("model version {version} does not exist"),
            ));
        }
        let finished = sqlx::query(concat!(
            "UPDATE runs SET status = ?3, error = ?4, model_version_id = ?5, finished_at = ",
            now_micros!(),
            ", lease_owner = NULL, lease_expires_at = NULL \
             WHERE id = ?1 AND status = 'running' AND lease_owner = ?2 RETURNING ",
            run_columns!()
        ))
        .bind(id)
        .bind(owner)
        .bind(outcome.status.as_str())
        .bind(&outcome.error)
        .bind(outcome.model_version_id)
        .fetch_optional(&mut *tx)
        .await?;
        let finished = match finished {
            Some(row) => run_from_row(&row)?,
            None => return Err(lease_refusal(&mut tx, id, owner).await),
        };
        tx.commit().await?;
        Ok(finished)
    }

    async fn release_run(&self, id: i64, owner: &str) -> Result<Run, StoreError> {
        let mut tx = self.begin_write().await?;
        let released = sqlx::query(concat!(
            "UPDATE runs SET \
             status = CASE WHEN cancel_requested THEN 'cancelled' ELSE 'queued' END, \
             error = CASE WHEN cancel_requested THEN 'cancelled while running' ELSE error END, \
             finished_at = CASE WHEN cancel_requested THEN ",
            now_micros!(),
            " ELSE NULL END, \
             attempts = max(attempts - 1, 0), lease_owner = NULL, lease_expires_at = NULL \
             WHERE id = ?1 AND status = 'running' AND lease_owner = ?2 RETURNING ",
            run_columns!()
        ))
        .bind(id)
        .bind(owner)
        .fetch_optional(&mut *tx)
        .await?;
        let released = match released {
            Some(row) => run_from_row(&row)?,
            None => return Err(lease_refusal(&mut tx, id, owner).await),
        };
        tx.commit().await?;
        Ok(released)
    }

    async fn request_run_cancel(&self, id: i64) -> Result<Run, StoreError> {
        let mut tx = self.begin_write().await?;
        let cancelled = sqlx::query(concat!(
            "UPDATE runs SET cancel_requested = 1, \
             status = CASE WHEN status = 'queued' THEN 'cancelled' ELSE status END, \
             error = CASE WHEN status = 'queued' THEN 'cancelled before it started' ELSE error END, \
             finished_at = CASE WHEN status = 'queued' THEN ",
            now_micros!(),
            " ELSE finished_at END \
             WHERE id = ?1 AND status IN ('queued', 'running') RETURNING ",
            run_columns!()
        ))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let cancelled = match cancelled {
            Some(row) => run_from_row(&row)?,
            None => {
                let status: Option<String> =
                    sqlx::query_scalar("SELECT status FROM runs WHERE id = ?1")
                        .bind(id)
                        .fetch_optional(&mut *tx)
                        .await?;
                return Err(match status {
                    None => StoreError::not_found(format!("run {id}")),
                    Some(status) => {
                        StoreError::Conflict(format!("run {id} already finished as {status}"))
                    }
                });
            }
        };
        tx.commit().await?;
        Ok(cancelled)
    }

    async fn upsert_source(&self, source: &SourceSpec) -> Result<Source, StoreError> {
        validate::source(source)?;
        let mut tx = self.begin_write().await?;
        require_series(&mut tx, source.series_id).await?;
        let row = sqlx::query(concat!(
            "INSERT INTO series_sources (series_id, connection_url, query, time_column) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (series_id) DO UPDATE SET connection_url = excluded.connection_url, \
             query = excluded.query, time_column = excluded.time_column, updated_at = ",
            now_micros!(),
            " RETURNING ",
            source_columns!()
        ))
        .bind(source.series_id)
        .bind(source.connection_url.expose())
        .bind(&source.query)
        .bind(&source.time_column)
        .fetch_one(&mut *tx)
        .await?;
        let stored = source_from_row(&row)?;
        tx.commit().await?;
        Ok(stored)
    }

    async fn get_source(&self, series_id: i64) -> Result<Option<Source>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            source_columns!(),
            " FROM series_sources WHERE series_id = ?1"
        ))
        .bind(series_id)
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(source_from_row)
        .transpose()
    }

    async fn delete_source(&self, series_id: i64) -> Result<(), StoreError> {
        let deleted = sqlx::query("DELETE FROM series_sources WHERE series_id = ?1")
            .bind(series_id)
            .execute(&self.pool)
            .await?;
        if deleted.rows_affected() == 0 {
            return Err(StoreError::not_found(format!(
                "source of series {series_id}"
            )));
        }
        Ok(())
    }

    async fn upsert_schedule(&self, schedule: &ScheduleSpec) -> Result<Schedule, StoreError> {
        validate::schedule(schedule)?;
        let mut tx = self.begin_write().await?;
        require_series(&mut tx, schedule.series_id).await?;
        let row = sqlx::query(concat!(
            "INSERT INTO schedules (series_id, cron, timezone, mode, enabled) VALUES (?1, ?2, ?3, ?4, ?5) \
             ON CONFLICT (series_id) DO UPDATE SET cron = excluded.cron, timezone = excluded.timezone, \
             mode = excluded.mode, enabled = excluded.enabled, updated_at = ",
            now_micros!(),
            " RETURNING ",
            schedule_columns!()
        ))
        .bind(schedule.series_id)
        .bind(&schedule.cron)
        .bind(&schedule.timezone)
        .bind(schedule.mode.as_str())
        .bind(schedule.enabled)
        .fetch_one(&mut *tx)
        .await?;
        let stored = schedule_from_row(&row)?;
        tx.commit().await?;
        Ok(stored)
    }

    async fn get_schedule(&self, series_id: i64) -> Result<Option<Schedule>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            schedule_columns!(),
            " FROM schedules WHERE series_id = ?1"
        ))
        .bind(series_id)
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(schedule_from_row)
        .transpose()
    }

    async fn delete_schedule(&self, series_id: i64) -> Result<(), StoreError> {
        let deleted = sqlx::query("DELETE FROM schedules WHERE series_id = ?1")
            .bind(series_id)
            .execute(&self.pool)
            .await?;
        if deleted.rows_affected() == 0 {
            return Err(StoreError::not_found(format!(
                "schedule of series {series_id}"
            )));
        }
        Ok(())
    }

    async fn list_enabled_schedules(&self) -> Result<Vec<Schedule>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            schedule_columns!(),
            " FROM schedules WHERE enabled ORDER BY id"
        ))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(schedule_from_row)
        .collect()
    }

    async fn insert_forecast(&self, forecast: &NewForecast) -> Result<Forecast, StoreError> {
        validate::new_forecast(forecast)?;
        let mut tx = self.begin_write().await?;
        require_series(&mut tx, forecast.series_id).await?;
        if model_version_series(&mut tx, forecast.model_version_id).await?
            != Some(forecast.series_id)
        {
            return Err(StoreError::invalid(
                "model_version_id",
                format!(
                    "model version {} does not exist for series {}",
                    forecast.model_version_id, forecast.series_id
                ),
            ));
        }
        let row = sqlx::query(concat!(
            "INSERT INTO forecasts (series_id, model_version_id, issued_at, horizon, quantile_levels) \
             VALUES (?1, ?2, ?3, ?4, ?5) RETURNING ",
            forecast_columns!()
        ))
        .bind(forecast.series_id)
        .bind(forecast.model_version_id)
        .bind(forecast.issued_at.timestamp_micros())
        .bind(i64::from(forecast.horizon))
        .bind(to_json("quantile_levels", &forecast.quantile_levels)?)
        .fetch_one(&mut *tx)
        .await?;
        let mut stored = forecast_header_from_row(&row)?;
        let rows = ForecastRows::from_points(&forecast.points, &forecast.quantile_levels);
        for start in (0..rows.value.len()).step_by(FORECAST_CHUNK_ROWS) {
            let end = (start + FORECAST_CHUNK_ROWS).min(rows.value.len());
            let sql = format!(
                "INSERT INTO forecast_points (forecast_id, step, ts, channel, quantile, value) VALUES {}",
                anonymous_values(end - start, 6)
            );
            let mut insert = sqlx::query(AssertSqlSafe(sql));
            for row in start..end {
                insert = insert
                    .bind(stored.id)
                    .bind(rows.step[row])
                    .bind(rows.ts[row].timestamp_micros())
                    .bind(&rows.channel[row])
                    .bind(rows.quantile[row])
                    .bind(rows.value[row]);
            }
            insert.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        stored.points = sorted_points(&forecast.points);
        Ok(stored)
    }

    async fn latest_forecast(&self, series_id: i64) -> Result<Option<Forecast>, StoreError> {
        Ok(self.list_forecasts(series_id, 1).await?.pop())
    }

    async fn list_forecasts(
        &self,
        series_id: i64,
        limit: u32,
    ) -> Result<Vec<Forecast>, StoreError> {
        let headers = sqlx::query(concat!(
            "SELECT ",
            forecast_columns!(),
            " FROM forecasts WHERE series_id = ?1 ORDER BY issued_at DESC, id DESC LIMIT ?2"
        ))
        .bind(series_id)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        let mut forecasts = Vec::with_capacity(headers.len());
        for row in &headers {
            let mut forecast = forecast_header_from_row(row)?;
            forecast.points = self
                .forecast_points(forecast.id, &forecast.quantile_levels)
                .await?;
            forecasts.push(forecast);
        }
        Ok(forecasts)
    }
}

/// One time span of a series' observations, ordered by ts then channel.
/// `channel_filter` is a JSON array of channel indices.
async fn load_span(
    pool: SqlitePool,
    series_id: i64,
    from: i64,
    to: i64,
    channel_filter: Option<String>,
) -> Result<LongObservations, StoreError> {
    let query = match channel_filter {
        None => sqlx::query(
            "SELECT ts, channel, value FROM observations \
             WHERE series_id = ?1 AND ts >= ?2 AND ts <= ?3 ORDER BY ts, channel",
        )
        .bind(series_id)
        .bind(from)
        .bind(to),
        Some(filter) => sqlx::query(
            "SELECT ts, channel, value FROM observations \
             WHERE series_id = ?1 AND ts >= ?2 AND ts <= ?3 \
             AND channel IN (SELECT value FROM json_each(?4)) ORDER BY ts, channel",
        )
        .bind(series_id)
        .bind(from)
        .bind(to)
        .bind(filter),
    };
    let mut span = LongObservations::default();
    let mut rows = query.fetch(&pool);
    while let Some(row) = rows.try_next().await? {
        span.ts_micros.push(row.try_get(0)?);
        span.channel.push(row.try_get::<i64, _>(1)? as u32);
        span.value.push(row.try_get(2)?);
    }
    Ok(span)
}

struct SqliteImport {
    tx: Transaction<'static, Sqlite>,
    series_id: i64,
    series_name: String,
    channels: Vec<String>,
    created_series: bool,
    cells_written: u64,
    first_ts_micros: Option<i64>,
    last_ts_micros: Option<i64>,
}

#[async_trait]
impl ImportSession for SqliteImport {
    async fn write(&mut self, batch: &ObservationBatch) -> Result<u64, StoreError> {
        let cells = validate::flatten_batch(&self.series_name, &self.channels, batch)?;
        for start in (0..cells.len()).step_by(UPSERT_CHUNK_ROWS) {
            let end = (start + UPSERT_CHUNK_ROWS).min(cells.len());
            let sql = if end - start == UPSERT_CHUNK_ROWS {
                AssertSqlSafe(std::borrow::Cow::Borrowed(full_chunk_observation_upsert()))
            } else {
                AssertSqlSafe(std::borrow::Cow::Owned(observation_upsert_sql(end - start)))
            };
            let mut upsert = sqlx::query(sql);
            for row in start..end {
                upsert = upsert
                    .bind(self.series_id)
                    .bind(cells.ts_micros[row])
                    .bind(i64::from(cells.channel[row]))
                    .bind(cells.value[row]);
            }
            upsert.execute(&mut *self.tx).await?;
        }
        let written = cells.len() as u64;
        self.cells_written += written;
        self.first_ts_micros = min_option(self.first_ts_micros, cells.first_ts_micros);
        self.last_ts_micros = max_option(self.last_ts_micros, cells.last_ts_micros);
        Ok(written)
    }

    async fn commit(self: Box<Self>) -> Result<ImportSummary, StoreError> {
        let mut this = *self;
        if this.cells_written > 0 {
            sqlx::query("UPDATE series SET data_revision = data_revision + 1 WHERE id = ?1")
                .bind(this.series_id)
                .execute(&mut *this.tx)
                .await?;
        }
        this.tx.commit().await?;
        Ok(ImportSummary {
            series: this.series_name,
            created_series: this.created_series,
            cells_written: this.cells_written,
            first_ts_micros: this.first_ts_micros,
            last_ts_micros: this.last_ts_micros,
        })
    }
}
