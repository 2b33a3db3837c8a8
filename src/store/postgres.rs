//! The Postgres store: the production backend and the coordination point when
//! several processes share the work.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgRow};
use sqlx::{AssertSqlSafe, Connection, Postgres, Row, Transaction};

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

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Rows per upsert statement: large enough that round trips do not dominate,
/// small enough that one statement's arrays stay a few MB.
const UPSERT_CHUNK_ROWS: usize = 50_000;

macro_rules! series_columns {
    () => {
        "id, name, frequency, timezone, channels, created_at, data_revision"
    };
}
macro_rules! model_version_summary_columns {
    () => {
        "id, series_id, config, octet_length(artefact)::int8 AS artefact_bytes, normalisation, data_from, data_to, \
         metrics, status, parent_version_id, is_champion, created_at"
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

pub(crate) struct PostgresStore {
    pool: PgPool,
}

impl PostgresStore {
    /// The points of one forecast, ordered by step, then channel.
    async fn forecast_points(
        &self,
        forecast_id: i64,
        levels: &[f64],
    ) -> Result<Vec<ForecastPoint>, StoreError> {
        let rows = sqlx::query(
            "SELECT step, ts, channel, quantile, value FROM forecast_points WHERE forecast_id = $1 \
             ORDER BY step, channel, quantile NULLS FIRST",
        )
        .bind(forecast_id)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|row| {
            Ok(ForecastRow {
                step: row.try_get(0)?,
                ts: row.try_get(1)?,
                channel: row.try_get(2)?,
                quantile: row.try_get(3)?,
                value: row.try_get(4)?,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
        assemble_points(rows, levels)
    }

    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let options: PgConnectOptions = url.parse().map_err(|err| {
            StoreError::invalid("database_url", format!("{}: {err}", mask_database_url(url)))
        })?;
        let unavailable = |err: sqlx::Error| {
            StoreError::Unavailable(format!(
                "cannot connect to {}: {err}",
                mask_database_url(url)
            ))
        };
        // One direct attempt first: the pool retries until its timeout and
        // then reports only "timed out", hiding why (refused, auth, no such database).
        PgConnection::connect_with(&options)
            .await
            .map_err(unavailable)?
            .close()
            .await
            .map_err(unavailable)?;
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .map_err(unavailable)?;
        Ok(Self { pool })
    }

    async fn series_id_and_channels(&self, name: &str) -> Result<(i64, Vec<String>), StoreError> {
        let row = sqlx::query("SELECT id, channels FROM series WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::not_found(series_named(name)))?;
        Ok((row.try_get(0)?, row.try_get(1)?))
    }
}

async fn require_series(
    tx: &mut Transaction<'static, Postgres>,
    series_id: i64,
) -> Result<(), StoreError> {
    sqlx::query("SELECT 1 FROM series WHERE id = $1 FOR KEY SHARE")
        .bind(series_id)
        .fetch_optional(&mut **tx)
        .await?
        .map(|_| ())
        .ok_or_else(|| StoreError::not_found(format!("series {series_id}")))
}

/// The series a model version belongs to, if the version exists.
async fn model_version_series(
    tx: &mut Transaction<'static, Postgres>,
    id: i64,
) -> Result<Option<i64>, StoreError> {
    Ok(
        sqlx::query("SELECT series_id FROM model_versions WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut **tx)
            .await?
            .map(|row| row.try_get(0))
            .transpose()?,
    )
}

fn series_from_row(row: &PgRow) -> Result<Series, StoreError> {
    Ok(Series {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        frequency: row.try_get("frequency")?,
        timezone: row.try_get("timezone")?,
        channels: row.try_get("channels")?,
        created_at: row.try_get("created_at")?,
        data_revision: row.try_get("data_revision")?,
    })
}

fn model_version_summary_from_row(row: &PgRow) -> Result<ModelVersionSummary, StoreError> {
    Ok(ModelVersionSummary {
        id: row.try_get("id")?,
        series_id: row.try_get("series_id")?,
        config: row.try_get("config")?,
        artefact_bytes: row.try_get::<i64, _>("artefact_bytes")? as u64,
        normalisation: row.try_get("normalisation")?,
        data_from: row.try_get("data_from")?,
        data_to: row.try_get("data_to")?,
        metrics: row.try_get("metrics")?,
        status: row.try_get::<&str, _>("status")?.parse()?,
        parent_version_id: row.try_get("parent_version_id")?,
        is_champion: row.try_get("is_champion")?,
        created_at: row.try_get("created_at")?,
    })
}

fn model_version_from_row(row: &PgRow) -> Result<ModelVersion, StoreError> {
    Ok(ModelVersion {
        summary: model_version_summary_from_row(row)?,
        artefact: row.try_get("artefact")?,
    })
}

fn run_from_row(row: &PgRow) -> Result<Run, StoreError> {
    Ok(Run {
        id: row.try_get("id")?,
        series_id: row.try_get("series_id")?,
        kind: row.try_get::<&str, _>("kind")?.parse()?,
        status: row.try_get::<&str, _>("status")?.parse()?,
        requested: row.try_get("requested")?,
        progress: row.try_get("progress")?,
        error: row.try_get("error")?,
        attempts: row.try_get("attempts")?,
        max_attempts: row.try_get("max_attempts")?,
        lease_owner: row.try_get("lease_owner")?,
        lease_expires_at: row.try_get("lease_expires_at")?,
        schedule_id: row.try_get("schedule_id")?,
        scheduled_for: row.try_get("scheduled_for")?,
        model_version_id: row.try_get("model_version_id")?,
        created_at: row.try_get("created_at")?,
        started_at: row.try_get("started_at")?,
        finished_at: row.try_get("finished_at")?,
        heartbeat_at: row.try_get("heartbeat_at")?,
        cancel_requested: row.try_get("cancel_requested")?,
    })
}

fn source_from_row(row: &PgRow) -> Result<Source, StoreError> {
    Ok(Source {
        series_id: row.try_get("series_id")?,
        connection_url: SecretUrl::new(row.try_get::<String, _>("connection_url")?),
        query: row.try_get("query")?,
        time_column: row.try_get("time_column")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

/// Why `owner` could not act on run `id` under its lease: it does not exist
/// (`NotFound`) or is not running under that owner's lease (`Conflict`).
async fn lease_refusal(pool: &PgPool, id: i64, owner: &str) -> StoreError {
    let row = sqlx::query("SELECT status, lease_owner FROM runs WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
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

fn schedule_from_row(row: &PgRow) -> Result<Schedule, StoreError> {
    Ok(Schedule {
        id: row.try_get("id")?,
        series_id: row.try_get("series_id")?,
        cron: row.try_get("cron")?,
        timezone: row.try_get("timezone")?,
        mode: row.try_get::<&str, _>("mode")?.parse()?,
        enabled: row.try_get("enabled")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

fn forecast_header_from_row(row: &PgRow) -> Result<Forecast, StoreError> {
    let horizon: i32 = row.try_get("horizon")?;
    Ok(Forecast {
        id: row.try_get("id")?,
        series_id: row.try_get("series_id")?,
        model_version_id: row.try_get("model_version_id")?,
        issued_at: row.try_get("issued_at")?,
        horizon: horizon as u32,
        quantile_levels: row.try_get("quantile_levels")?,
        points: Vec::new(),
    })
}

/// A finish naming a model version that does not exist is the caller's mistake.
fn model_version_reference(err: sqlx::Error, outcome: &RunOutcome) -> StoreError {
    match &err {
        sqlx::Error::Database(db) if db.is_foreign_key_violation() => StoreError::invalid(
            "model_version_id",
            format!(
                "model version {} does not exist",
                outcome.model_version_id.unwrap_or_default()
            ),
        ),
        _ => err.into(),
    }
}

fn is_unique_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.is_unique_violation())
}

#[async_trait]
impl Store for PostgresStore {
    fn backend(&self) -> Backend {
        Backend::Postgres
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
        let table_exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(table)
            .fetch_one(&self.pool)
            .await?;
        let applied: Vec<i64> = if table_exists {
            // The name is the migrator's own constant, never user input.
            sqlx::query_scalar(AssertSqlSafe(format!(
                "SELECT version FROM {table} WHERE success"
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
            "INSERT INTO series (name, frequency, timezone, channels) VALUES ($1, $2, $3, $4) RETURNING ",
            series_columns!()
        ))
        .bind(&spec.name)
        .bind(&spec.frequency)
        .bind(&spec.timezone)
        .bind(&spec.channels)
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
            " FROM series WHERE name = $1"
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
            " FROM series WHERE id = $1"
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
        let mut tx = self.pool.begin().await?;
        // Observations carry no foreign key (see the migration), so they are
        // deleted here; the row lock waits for running imports of the series
        // and keeps new ones out until this commits.
        let series_id: i64 = sqlx::query_scalar("SELECT id FROM series WHERE name = $1 FOR UPDATE")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| StoreError::not_found(series_named(name)))?;
        sqlx::query("DELETE FROM observations WHERE series_id = $1")
            .bind(series_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM series WHERE id = $1")
            .bind(series_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn begin_import(&self, spec: &SeriesSpec) -> Result<Box<dyn ImportSession>, StoreError> {
        validate::series_spec(spec)?;
        let mut tx = self.pool.begin().await?;
        // Inserting first (instead of looking up first) makes two concurrent
        // imports of a new series safe: the second waits for the first's row.
        let inserted = sqlx::query(
            "INSERT INTO series (name, frequency, timezone, channels) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (name) DO NOTHING RETURNING id",
        )
        .bind(&spec.name)
        .bind(&spec.frequency)
        .bind(&spec.timezone)
        .bind(&spec.channels)
        .fetch_optional(&mut *tx)
        .await?;
        let (series_id, channels, created_series, stored_until) = match inserted {
            Some(row) => (row.try_get(0)?, spec.channels.clone(), true, None),
            None => {
                // NO KEY UPDATE serialises imports of one series (so the
                // latest stored timestamp read here stays true until commit)
                // and keeps the series from being deleted meanwhile, without
                // blocking foreign-key checks of runs or model versions.
                let row = sqlx::query(
                    "SELECT id, channels, (SELECT max(ts) FROM observations WHERE series_id = series.id) \
                     FROM series WHERE name = $1 FOR NO KEY UPDATE",
                )
                .bind(&spec.name)
                .fetch_one(&mut *tx)
                .await?;
                let channels: Vec<String> = row.try_get(1)?;
                validate::channel_indices(&spec.name, &channels, &spec.channels)?;
                let stored_until: Option<DateTime<Utc>> = row.try_get(2)?;
                (
                    row.try_get(0)?,
                    channels,
                    false,
                    stored_until.map(|ts| ts.timestamp_micros()),
                )
            }
        };
        Ok(Box::new(PostgresImport {
            tx,
            series_id,
            series_name: spec.name.clone(),
            channels,
            created_series,
            stored_until,
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
            .transpose()?;
        let bounds = sqlx::query(
            "SELECT min(ts), max(ts) FROM observations WHERE series_id = $1 AND ts >= $2 AND ts <= $3",
        )
        .bind(series_id)
        .bind(datetime_from_micros("from", from)?)
        .bind(datetime_from_micros("to", to)?)
        .fetch_one(&self.pool)
        .await?;
        let first: Option<DateTime<Utc>> = bounds.try_get(0)?;
        let last: Option<DateTime<Utc>> = bounds.try_get(1)?;
        let (Some(first), Some(last)) = (first, last) else {
            return Ok(LongObservations {
                channels: known,
                ..LongObservations::default()
            });
        };
        let tasks = split_time_span(
            first.timestamp_micros(),
            last.timestamp_micros(),
            LOAD_SPANS,
        )
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
            sqlx::query("SELECT count(*), min(ts), max(ts) FROM observations WHERE series_id = $1")
                .bind(series_id)
                .fetch_one(&self.pool)
                .await?;
        Ok(ObservationRange {
            count: row.try_get::<i64, _>(0)? as u64,
            first_ts_micros: row
                .try_get::<Option<DateTime<Utc>>, _>(1)?
                .map(|ts| ts.timestamp_micros()),
            last_ts_micros: row
                .try_get::<Option<DateTime<Utc>>, _>(2)?
                .map(|ts| ts.timestamp_micros()),
        })
    }

    async fn last_observation_micros(&self, series_id: i64) -> Result<Option<i64>, StoreError> {
        let last: Option<DateTime<Utc>> = sqlx::query_scalar(
            "SELECT ts FROM observations WHERE series_id = $1 ORDER BY ts DESC LIMIT 1",
        )
        .bind(series_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(last.map(|ts| ts.timestamp_micros()))
    }

    async fn insert_model_version(
        &self,
        version: &NewModelVersion,
    ) -> Result<ModelVersionSummary, StoreError> {
        validate::new_model_version(version)?;
        let mut tx = self.pool.begin().await?;
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
             status, parent_version_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING ",
            model_version_summary_columns!()
        ))
        .bind(version.series_id)
        .bind(&version.config)
        .bind(&version.artefact)
        .bind(&version.normalisation)
        .bind(version.data_from)
        .bind(version.data_to)
        .bind(&version.metrics)
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
            ", artefact FROM model_versions WHERE id = $1"
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
            " FROM model_versions WHERE id = $1"
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
            " FROM model_versions WHERE series_id = $1 ORDER BY id DESC"
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
            "SELECT id, created_at FROM model_versions WHERE series_id = $1 AND is_champion",
        )
        .bind(series_id)
        .fetch_optional(&self.pool)
        .await?
        .map(|row| {
            Ok(VersionRef {
                id: row.try_get("id")?,
                created_at: row.try_get("created_at")?,
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
            ", artefact FROM model_versions WHERE series_id = $1 AND is_champion"
        ))
        .bind(series_id)
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(model_version_from_row)
        .transpose()
    }

    async fn promote_model_version(&self, id: i64) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query("SELECT series_id, status FROM model_versions WHERE id = $1")
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
        // Locking the series row serialises promotions of the same series, so
        // the clear-then-set below never races another promotion.
        sqlx::query("SELECT 1 FROM series WHERE id = $1 FOR UPDATE")
            .bind(series_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE model_versions SET is_champion = FALSE WHERE series_id = $1 AND is_champion AND id <> $2")
            .bind(series_id)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE model_versions SET is_champion = TRUE WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn enqueue_run(&self, run: &NewRun) -> Result<EnqueuedRun, StoreError> {
        validate::new_run(run)?;
        let mut tx = self.pool.begin().await?;
        require_series(&mut tx, run.series_id).await?;
        let inserted = sqlx::query(concat!(
            "INSERT INTO runs (series_id, kind, requested, max_attempts, schedule_id, scheduled_for) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (schedule_id, scheduled_for) DO NOTHING RETURNING ",
            run_columns!()
        ))
        .bind(run.series_id)
        .bind(run.kind.as_str())
        .bind(&run.requested)
        .bind(run.max_attempts)
        .bind(run.schedule_id)
        .bind(run.scheduled_for)
        .fetch_optional(&mut *tx)
        .await
        .map_err(|err| match &err {
            sqlx::Error::Database(db) if db.is_foreign_key_violation() => StoreError::invalid(
                "schedule_id",
                format!("schedule {} does not exist", run.schedule_id.unwrap_or_default()),
            ),
            _ => err.into(),
        })?;
        let enqueued = match inserted {
            Some(row) => EnqueuedRun {
                run: run_from_row(&row)?,
                created: true,
            },
            None => {
                let row = sqlx::query(concat!(
                    "SELECT ",
                    run_columns!(),
                    " FROM runs WHERE schedule_id = $1 AND scheduled_for = $2"
                ))
                .bind(run.schedule_id)
                .bind(run.scheduled_for)
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
            " FROM runs WHERE id = $1"
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
            " FROM runs WHERE ($1::int8 IS NULL OR series_id = $1) AND ($2::text IS NULL OR status = $2) \
             ORDER BY id DESC LIMIT $3"
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
        sqlx::query("SELECT kind, status, COUNT(*)::int8 AS runs, COALESCE(SUM(EXTRACT(EPOCH FROM (finished_at - started_at))), 0)::float8 AS seconds FROM runs GROUP BY kind, status ORDER BY kind, status")
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
        let updated =
            sqlx::query("UPDATE runs SET progress = $2, heartbeat_at = now() WHERE id = $1")
                .bind(id)
                .bind(progress)
                .execute(&self.pool)
                .await?;
        if updated.rows_affected() == 0 {
            return Err(StoreError::not_found(format!("run {id}")));
        }
        Ok(())
    }

    async fn finish_run(&self, id: i64, outcome: &RunOutcome) -> Result<Run, StoreError> {
        validate::final_outcome(outcome)?;
        let finished = sqlx::query(concat!(
            "UPDATE runs SET status = $2, error = $3, model_version_id = $4, finished_at = now(), \
             lease_owner = NULL, lease_expires_at = NULL \
             WHERE id = $1 AND status IN ('queued', 'running') RETURNING ",
            run_columns!()
        ))
        .bind(id)
        .bind(outcome.status.as_str())
        .bind(&outcome.error)
        .bind(outcome.model_version_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(|err| model_version_reference(err, outcome))?;
        match finished {
            Some(row) => run_from_row(&row),
            None => match self.get_run(id).await? {
                None => Err(StoreError::not_found(format!("run {id}"))),
                Some(run) => Err(StoreError::Conflict(format!(
                    "run {id} already finished as {}",
                    run.status
                ))),
            },
        }
    }

    async fn claim_run(&self, claim: &RunClaim) -> Result<Option<Run>, StoreError> {
        validate::run_claim(claim)?;
        // Runs whose lease lapsed on their last allowed attempt are failed
        // first, so they are never claimed again.
        sqlx::query(
            "UPDATE runs SET status = 'failed', finished_at = now(), \
             error = format('the lease lapsed on attempt %s of %s (last held by %s): the worker stopped \
             heartbeating (killed, crashed or cut off from the store)', attempts, max_attempts, lease_owner), \
             lease_owner = NULL, lease_expires_at = NULL \
             WHERE id IN (SELECT id FROM runs WHERE status = 'running' AND lease_expires_at < now() \
             AND attempts >= max_attempts FOR UPDATE SKIP LOCKED)",
        )
        .execute(&self.pool)
        .await?;
        let kinds: Vec<&str> = claim.kinds.iter().map(|kind| kind.as_str()).collect();
        let claimed = sqlx::query(concat!(
            "UPDATE runs SET status = 'running', attempts = attempts + 1, lease_owner = $1, \
             lease_expires_at = now() + make_interval(secs => $2), started_at = coalesce(started_at, now()), \
             heartbeat_at = now() \
             WHERE id = (SELECT id FROM runs WHERE kind = ANY($3) AND (status = 'queued' \
             OR (status = 'running' AND lease_expires_at < now() AND attempts < max_attempts)) \
             ORDER BY created_at, id LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING ",
            run_columns!()
        ))
        .bind(&claim.owner)
        .bind(claim.lease.as_secs_f64())
        .bind(kinds)
        .fetch_optional(&self.pool)
        .await?;
        claimed.as_ref().map(run_from_row).transpose()
    }

    async fn heartbeat_run(
        &self,
        id: i64,
        owner: &str,
        lease: Duration,
        progress: Option<&Value>,
    ) -> Result<LeaseState, StoreError> {
        validate::lease(lease)?;
        let row = sqlx::query(
            "UPDATE runs SET lease_expires_at = now() + make_interval(secs => $3), heartbeat_at = now(), \
             progress = coalesce($4, progress) \
             WHERE id = $1 AND status = 'running' AND lease_owner = $2 \
             RETURNING lease_expires_at, cancel_requested",
        )
        .bind(id)
        .bind(owner)
        .bind(lease.as_secs_f64())
        .bind(progress)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => Ok(LeaseState {
                expires_at: row.try_get(0)?,
                cancel_requested: row.try_get(1)?,
            }),
            None => Err(lease_refusal(&self.pool, id, owner).await),
        }
    }

    async fn finish_leased_run(
        &self,
        id: i64,
        owner: &str,
        outcome: &RunOutcome,
    ) -> Result<Run, StoreError> {
        validate::final_outcome(outcome)?;
        let finished = sqlx::query(concat!(
            "UPDATE runs SET status = $3, error = $4, model_version_id = $5, finished_at = now(), \
             lease_owner = NULL, lease_expires_at = NULL \
             WHERE id = $1 AND status = 'running' AND lease_owner = $2 RETURNING ",
            run_columns!()
        ))
        .bind(id)
        .bind(owner)
        .bind(outcome.status.as_str())
        .bind(&outcome.error)
        .bind(outcome.model_version_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(|err| model_version_reference(err, outcome))?;
        match finished {
            Some(row) => run_from_row(&row),
            None => Err(lease_refusal(&self.pool, id, owner).await),
        }
    }

    async fn release_run(&self, id: i64, owner: &str) -> Result<Run, StoreError> {
        let released = sqlx::query(concat!(
            "UPDATE runs SET \
             status = CASE WHEN cancel_requested THEN 'cancelled' ELSE 'queued' END, \
             error = CASE WHEN cancel_requested THEN 'cancelled while running' ELSE error END, \
             finished_at = CASE WHEN cancel_requested THEN now() ELSE NULL END, \
             attempts = greatest(attempts - 1, 0), lease_owner = NULL, lease_expires_at = NULL \
             WHERE id = $1 AND status = 'running' AND lease_owner = $2 RETURNING ",
            run_columns!()
        ))
        .bind(id)
        .bind(owner)
        .fetch_optional(&self.pool)
        .await?;
        match released {
            Some(row) => run_from_row(&row),
            None => Err(lease_refusal(&self.pool, id, owner).await),
        }
    }

    async fn request_run_cancel(&self, id: i64) -> Result<Run, StoreError> {
        let cancelled = sqlx::query(concat!(
            "UPDATE runs SET cancel_requested = TRUE, \
             status = CASE WHEN status = 'queued' THEN 'cancelled' ELSE status END, \
             error = CASE WHEN status = 'queued' THEN 'cancelled before it started' ELSE error END, \
             finished_at = CASE WHEN status = 'queued' THEN now() ELSE finished_at END \
             WHERE id = $1 AND status IN ('queued', 'running') RETURNING ",
            run_columns!()
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        match cancelled {
            Some(row) => run_from_row(&row),
            None => match self.get_run(id).await? {
                None => Err(StoreError::not_found(format!("run {id}"))),
                Some(run) => Err(StoreError::Conflict(format!(
                    "run {id} already finished as {}",
                    run.status
                ))),
            },
        }
    }

    async fn upsert_source(&self, source: &SourceSpec) -> Result<Source, StoreError> {
        validate::source(source)?;
        let mut tx = self.pool.begin().await?;
        require_series(&mut tx, source.series_id).await?;
        let row = sqlx::query(concat!(
            "INSERT INTO series_sources (series_id, connection_url, query, time_column) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (series_id) DO UPDATE SET connection_url = EXCLUDED.connection_url, \
             query = EXCLUDED.query, time_column = EXCLUDED.time_column, updated_at = now() RETURNING ",
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
            " FROM series_sources WHERE series_id = $1"
        ))
        .bind(series_id)
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(source_from_row)
        .transpose()
    }

    async fn delete_source(&self, series_id: i64) -> Result<(), StoreError> {
        let deleted = sqlx::query("DELETE FROM series_sources WHERE series_id = $1")
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
        let mut tx = self.pool.begin().await?;
        require_series(&mut tx, schedule.series_id).await?;
        let row = sqlx::query(concat!(
            "INSERT INTO schedules (series_id, cron, timezone, mode, enabled) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (series_id) DO UPDATE SET cron = EXCLUDED.cron, timezone = EXCLUDED.timezone, \
             mode = EXCLUDED.mode, enabled = EXCLUDED.enabled, updated_at = now() RETURNING ",
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
            " FROM schedules WHERE series_id = $1"
        ))
        .bind(series_id)
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(schedule_from_row)
        .transpose()
    }

    async fn delete_schedule(&self, series_id: i64) -> Result<(), StoreError> {
        let deleted = sqlx::query("DELETE FROM schedules WHERE series_id = $1")
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
        let mut tx = self.pool.begin().await?;
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
             VALUES ($1, $2, $3, $4, $5) RETURNING ",
            forecast_columns!()
        ))
        .bind(forecast.series_id)
        .bind(forecast.model_version_id)
        .bind(forecast.issued_at)
        .bind(forecast.horizon as i32)
        .bind(&forecast.quantile_levels)
        .fetch_one(&mut *tx)
        .await?;
        let mut stored = forecast_header_from_row(&row)?;
        let rows = ForecastRows::from_points(&forecast.points, &forecast.quantile_levels);
        sqlx::query(
            "INSERT INTO forecast_points (forecast_id, step, ts, channel, quantile, value) \
             SELECT $1, * FROM UNNEST($2::int4[], $3::timestamptz[], $4::text[], $5::float8[], $6::float8[])",
        )
        .bind(stored.id)
        .bind(&rows.step)
        .bind(&rows.ts)
        .bind(&rows.channel)
        .bind(&rows.quantile)
        .bind(&rows.value)
        .execute(&mut *tx)
        .await?;
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
            " FROM forecasts WHERE series_id = $1 ORDER BY issued_at DESC, id DESC LIMIT $2"
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
async fn load_span(
    pool: PgPool,
    series_id: i64,
    from: i64,
    to: i64,
    channel_filter: Option<Vec<i16>>,
) -> Result<LongObservations, StoreError> {
    let from = datetime_from_micros("from", from)?;
    let to = datetime_from_micros("to", to)?;
    let query = match channel_filter {
        None => sqlx::query(
            "SELECT ts, channel, value FROM observations \
             WHERE series_id = $1 AND ts >= $2 AND ts <= $3 ORDER BY ts, channel",
        )
        .bind(series_id)
        .bind(from)
        .bind(to),
        Some(filter) => sqlx::query(
            "SELECT ts, channel, value FROM observations \
             WHERE series_id = $1 AND ts >= $2 AND ts <= $3 AND channel = ANY($4) ORDER BY ts, channel",
        )
        .bind(series_id)
        .bind(from)
        .bind(to)
        .bind(filter),
    };
    let mut span = LongObservations::default();
    let mut rows = query.fetch(&pool);
    while let Some(row) = rows.try_next().await? {
        let ts: DateTime<Utc> = row.try_get(0)?;
        span.ts_micros.push(ts.timestamp_micros());
        span.channel.push(row.try_get::<i16, _>(1)? as u32);
        span.value.push(row.try_get(2)?);
    }
    Ok(span)
}

struct PostgresImport {
    tx: Transaction<'static, Postgres>,
    series_id: i64,
    series_name: String,
    channels: Vec<String>,
    created_series: bool,
    /// The latest timestamp the series holds, including this session's writes.
    stored_until: Option<i64>,
    cells_written: u64,
    first_ts_micros: Option<i64>,
    last_ts_micros: Option<i64>,
}

#[async_trait]
impl ImportSession for PostgresImport {
    async fn write(&mut self, batch: &ObservationBatch) -> Result<u64, StoreError> {
        let cells = validate::flatten_batch(&self.series_name, &self.channels, batch)?;
        // Rows strictly after everything the series holds cannot conflict, and
        // a plain insert skips the speculative-insertion work of ON CONFLICT.
        let appends_only = match cells.first_ts_micros.zip(self.stored_until) {
            Some((first, stored_until)) => first > stored_until,
            None => true,
        };
        let statement = if appends_only {
            "INSERT INTO observations (series_id, ts, channel, value) \
             SELECT $1, * FROM UNNEST($2::timestamptz[], $3::int2[], $4::float8[])"
        } else {
            // Unchanged values are not rewritten, so re-importing the same
            // data creates no dead rows.
            "INSERT INTO observations (series_id, ts, channel, value) \
             SELECT $1, * FROM UNNEST($2::timestamptz[], $3::int2[], $4::float8[]) \
             ON CONFLICT (series_id, ts, channel) DO UPDATE SET value = EXCLUDED.value \
             WHERE observations.value IS DISTINCT FROM EXCLUDED.value"
        };
        for start in (0..cells.len()).step_by(UPSERT_CHUNK_ROWS) {
            let end = (start + UPSERT_CHUNK_ROWS).min(cells.len());
            let ts = cells.ts_micros[start..end]
                .iter()
                .map(|&micros| datetime_from_micros("ts_micros", micros))
                .collect::<Result<Vec<_>, _>>()?;
            sqlx::query(statement)
                .bind(self.series_id)
                .bind(ts)
                .bind(&cells.channel[start..end])
                .bind(&cells.value[start..end])
                .execute(&mut *self.tx)
                .await?;
        }
        self.stored_until = max_option(self.stored_until, cells.last_ts_micros);
        let written = cells.len() as u64;
        self.cells_written += written;
        self.first_ts_micros = min_option(self.first_ts_micros, cells.first_ts_micros);
        self.last_ts_micros = max_option(self.last_ts_micros, cells.last_ts_micros);
        Ok(written)
    }

    async fn commit(self: Box<Self>) -> Result<ImportSummary, StoreError> {
        let mut this = *self;
        if this.cells_written > 0 {
            sqlx::query("UPDATE series SET data_revision = data_revision + 1 WHERE id = $1")
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
