//! The `Store` interface and its Postgres and SQLite implementations: queries only.
//!
//! Both backends keep the same schema meaning (see `migrations/`): series,
//! observations in long form keyed by (series, ts, channel), model versions with
//! at most one champion per series, runs, schedules and forecasts. Deleting a
//! series deletes everything under it.

mod forecast_rows;
mod postgres;
mod records;
mod sqlite;
mod validate;

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

pub use records::*;
pub use validate::{
    MAX_SERIES_NAME_CHARS, MAX_TS_MICROS, MIN_TS_MICROS, cron_expression, series_name,
};

/// The errors every store operation can return; each maps to one HTTP status
/// (404, 409, 422, 503, 500).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{what} not found")]
    NotFound { what: String },
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("invalid {field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("database error: {0}")]
    Database(sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

impl StoreError {
    pub(crate) fn not_found(what: impl Into<String>) -> Self {
        Self::NotFound { what: what.into() }
    }

    pub(crate) fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Self::Invalid {
            field,
            message: message.into(),
        }
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(err: sqlx::Error) -> Self {
        match err {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => Self::Unavailable(err.to_string()),
            other => Self::Database(other),
        }
    }
}

/// Which database a store talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

impl Backend {
    /// The backend a database URL selects, by its scheme.
    pub fn from_url(url: &str) -> Result<Self, StoreError> {
        let scheme = url.split_once(':').map(|(scheme, _)| scheme).unwrap_or("");
        match scheme {
            "postgres" | "postgresql" => Ok(Self::Postgres),
            "sqlite" => Ok(Self::Sqlite),
            _ => Err(StoreError::invalid(
                "database_url",
                format!(
                    "unsupported scheme '{scheme}' (expected postgres://, postgresql:// or sqlite:)"
                ),
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Postgres => "postgres",
            Self::Sqlite => "sqlite",
        }
    }
}

/// What `Store::migrate` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationReport {
    /// Migrations applied by this call, as (version, description).
    pub newly_applied: Vec<(i64, String)>,
    /// All migrations now recorded in the database.
    pub total_applied: usize,
}

/// A migration this build embeds that the database has not applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingMigration {
    pub version: i64,
    pub description: String,
}

impl std::fmt::Display for PendingMigration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.version, self.description)
    }
}

/// The up-migrations of `migrator` whose versions are not in `applied`.
pub(crate) fn pending_migrations(
    migrator: &sqlx::migrate::Migrator,
    applied: &[i64],
) -> Vec<PendingMigration> {
    migrator
        .iter()
        .filter(|migration| !migration.migration_type.is_down_migration())
        .filter(|migration| !applied.contains(&migration.version))
        .map(|migration| PendingMigration {
            version: migration.version,
            description: migration.description.to_string(),
        })
        .collect()
}

/// Opens the store a URL names (`postgres://`, `postgresql://`, or `sqlite:`;
/// a missing SQLite file and its parent directory are created) and applies
/// pending migrations.
pub async fn connect(url: &str) -> Result<Arc<dyn Store>, StoreError> {
    let store = open(url).await?;
    store.migrate().await?;
    Ok(store)
}

/// Opens the store a URL names without applying migrations (for
/// `xlstm-forecast migrate`, which reports what it applies).
pub async fn open(url: &str) -> Result<Arc<dyn Store>, StoreError> {
    match Backend::from_url(url)? {
        Backend::Postgres => Ok(Arc::new(postgres::PostgresStore::open(url).await?)),
        Backend::Sqlite => Ok(Arc::new(sqlite::SqliteStore::open(url).await?)),
    }
}

#[async_trait]
pub trait Store: Send + Sync {
    fn backend(&self) -> Backend;

    /// Applies pending migrations (idempotent).
    async fn migrate(&self) -> Result<MigrationReport, StoreError>;

    /// Checks the database answers; `Unavailable` when it does not.
    async fn ping(&self) -> Result<(), StoreError>;

    /// The migrations embedded in this build that the database has not
    /// applied successfully, oldest first; empty when the schema is current.
    /// Reads only (a database never migrated has them all missing).
    async fn missing_migrations(&self) -> Result<Vec<PendingMigration>, StoreError>;

    // --- series ---

    /// Creates a series; `Conflict` when the name is taken.
    async fn create_series(&self, spec: &SeriesSpec) -> Result<Series, StoreError>;
    async fn get_series(&self, name: &str) -> Result<Option<Series>, StoreError>;
    async fn get_series_by_id(&self, id: i64) -> Result<Option<Series>, StoreError>;
    /// All series, ordered by name.
    async fn list_series(&self) -> Result<Vec<Series>, StoreError>;
    /// Deletes a series and everything under it; `NotFound` when it does not exist.
    async fn delete_series(&self, name: &str) -> Result<(), StoreError>;

    // --- observations ---

    /// Opens ONE transaction. Creates the series from `spec` if it does not
    /// exist (inside the same transaction); if it exists, every channel in
    /// `spec.channels` must be one of its channels, else
    /// `StoreError::Invalid{field: "channels", ..}`.
    async fn begin_import(&self, spec: &SeriesSpec) -> Result<Box<dyn ImportSession>, StoreError>;

    /// Observations of a series in long form, ordered by ts then channel;
    /// `from`/`to` are inclusive bounds (epoch microseconds, UTC);
    /// `channels` restricts to those channels (each must exist).
    /// `NotFound` if the series does not exist.
    async fn load_observations(
        &self,
        series: &str,
        from_micros: Option<i64>,
        to_micros: Option<i64>,
        channels: Option<&[String]>,
    ) -> Result<LongObservations, StoreError>;

    /// Count and first/last timestamp of a series' observations; `NotFound` if
    /// the series does not exist.
    async fn observation_range(&self, series: &str) -> Result<ObservationRange, StoreError>;

    /// The timestamp of a series' last observation (an index lookup, unlike
    /// `observation_range`); `None` when it has none or does not exist.
    async fn last_observation_micros(&self, series_id: i64) -> Result<Option<i64>, StoreError>;

    // --- model versions ---

    /// Writes a complete model version (artefact, stats, metrics) in one
    /// statement; it is never the champion until promoted.
    async fn insert_model_version(
        &self,
        version: &NewModelVersion,
    ) -> Result<ModelVersionSummary, StoreError>;
    /// One model version with its artefact bytes.
    async fn get_model_version(&self, id: i64) -> Result<Option<ModelVersion>, StoreError>;
    /// One model version without its artefact bytes (for describing it).
    async fn get_model_version_summary(
        &self,
        id: i64,
    ) -> Result<Option<ModelVersionSummary>, StoreError>;
    /// A series' model versions, newest first, without artefact bytes.
    async fn list_model_versions(
        &self,
        series_id: i64,
    ) -> Result<Vec<ModelVersionSummary>, StoreError>;
    /// A series' champion, if it has one (what a forecast looks up per request).
    async fn champion_ref(&self, series_id: i64) -> Result<Option<VersionRef>, StoreError>;
    /// The champion of a series with its artefact bytes, if there is one.
    async fn champion_model_version(
        &self,
        series_id: i64,
    ) -> Result<Option<ModelVersion>, StoreError>;
    /// Makes a version the champion of its series and the previous champion a
    /// plain version, atomically. `NotFound` for an unknown id, `Conflict` for
    /// a rejected version.
    async fn promote_model_version(&self, id: i64) -> Result<(), StoreError>;

    // --- runs ---

    /// Queues a run. A run for a (schedule, fire time) that is already queued
    /// is not queued again: the existing run comes back with `created: false`.
    async fn enqueue_run(&self, run: &NewRun) -> Result<EnqueuedRun, StoreError>;
    async fn get_run(&self, id: i64) -> Result<Option<Run>, StoreError>;
    /// Runs matching the filter, newest first.
    async fn list_runs(&self, filter: &RunFilter) -> Result<Vec<Run>, StoreError>;
    /// Run counts and run seconds by kind and status (for `/metrics`).
    async fn run_statistics(&self) -> Result<Vec<RunStatistic>, StoreError>;
    /// Replaces a run's progress document and records a heartbeat.
    async fn update_run_progress(
        &self,
        id: i64,
        progress: &serde_json::Value,
    ) -> Result<(), StoreError>;
    /// Moves a queued or running run to a final status (releasing its lease);
    /// `Conflict` when it already finished, `Invalid` for a non-final status.
    async fn finish_run(&self, id: i64, outcome: &RunOutcome) -> Result<Run, StoreError>;

    // --- the run queue (leases) ---

    /// Claims the oldest run of one of `claim.kinds` that is queued or whose
    /// lease lapsed, atomically (Postgres `FOR UPDATE SKIP LOCKED`, SQLite one
    /// write transaction): it becomes running under a lease held by
    /// `claim.owner` and its attempts count up by one. Before that, running
    /// runs whose lease lapsed on their last allowed attempt are failed with
    /// the reason. `None` when nothing is claimable.
    async fn claim_run(&self, claim: &RunClaim) -> Result<Option<Run>, StoreError>;
    /// Extends the lease `owner` holds on a running run by `lease` from now,
    /// records a heartbeat and, when given, replaces the progress document.
    /// `Conflict` when the run is no longer running under this owner's lease
    /// (it lapsed and another worker claimed it, or it finished).
    async fn heartbeat_run(
        &self,
        id: i64,
        owner: &str,
        lease: std::time::Duration,
        progress: Option<&serde_json::Value>,
    ) -> Result<LeaseState, StoreError>;
    /// `finish_run` for the worker holding the lease: `Conflict` when `owner`
    /// no longer holds it, so a run is never finished twice.
    async fn finish_leased_run(
        &self,
        id: i64,
        owner: &str,
        outcome: &RunOutcome,
    ) -> Result<Run, StoreError>;
    /// Gives a run back on graceful shutdown: it is queued again and the
    /// interrupted attempt does not count (cancelled instead when a cancel was
    /// requested). `Conflict` when `owner` no longer holds the lease.
    async fn release_run(&self, id: i64, owner: &str) -> Result<Run, StoreError>;
    /// Cancels a run: a queued one becomes cancelled at once; a running one is
    /// flagged, and its worker stops at its next heartbeat. `Conflict` when it
    /// already finished, `NotFound` for an unknown id.
    async fn request_run_cancel(&self, id: i64) -> Result<Run, StoreError>;

    // --- sources ---

    /// Creates or replaces the source a series pulls from (one per series).
    async fn upsert_source(&self, source: &SourceSpec) -> Result<Source, StoreError>;
    async fn get_source(&self, series_id: i64) -> Result<Option<Source>, StoreError>;
    /// `NotFound` when the series has no source.
    async fn delete_source(&self, series_id: i64) -> Result<(), StoreError>;

    // --- schedules ---

    /// Creates or replaces the schedule of a series (one per series).
    async fn upsert_schedule(&self, schedule: &ScheduleSpec) -> Result<Schedule, StoreError>;
    async fn get_schedule(&self, series_id: i64) -> Result<Option<Schedule>, StoreError>;
    /// `NotFound` when the series has no schedule.
    async fn delete_schedule(&self, series_id: i64) -> Result<(), StoreError>;
    async fn list_enabled_schedules(&self) -> Result<Vec<Schedule>, StoreError>;

    // --- forecasts ---

    /// Writes a forecast header and all its points in one transaction.
    async fn insert_forecast(&self, forecast: &NewForecast) -> Result<Forecast, StoreError>;
    /// The most recently issued forecast of a series.
    async fn latest_forecast(&self, series_id: i64) -> Result<Option<Forecast>, StoreError>;
    /// A series' forecasts with their points, most recently issued first, at
    /// most `limit` of them.
    async fn list_forecasts(&self, series_id: i64, limit: u32)
    -> Result<Vec<Forecast>, StoreError>;
}

#[async_trait]
pub trait ImportSession: Send {
    /// Upserts one batch (by series, channel, ts) inside the open transaction;
    /// returns cells written.
    async fn write(&mut self, batch: &ObservationBatch) -> Result<u64, StoreError>;
    /// Commits everything written; dropping the session without committing
    /// rolls everything back (nothing written, series not created).
    async fn commit(self: Box<Self>) -> Result<ImportSummary, StoreError>;
}

/// Applies pending migrations on one connection and reports what changed.
pub(crate) async fn apply_migrations<C: sqlx::migrate::Migrate>(
    migrator: &sqlx::migrate::Migrator,
    conn: &mut C,
) -> Result<MigrationReport, StoreError> {
    let table = migrator.table_name.as_ref();
    conn.ensure_migrations_table(table).await?;
    let before: std::collections::HashSet<i64> = conn
        .list_applied_migrations(table)
        .await?
        .iter()
        .map(|applied| applied.version)
        .collect();
    migrator.run_direct(None, conn, false).await?;
    let after = conn.list_applied_migrations(table).await?;
    let newly_applied = migrator
        .iter()
        .filter(|migration| !before.contains(&migration.version))
        .filter(|migration| {
            after
                .iter()
                .any(|applied| applied.version == migration.version)
        })
        .map(|migration| (migration.version, migration.description.to_string()))
        .collect();
    Ok(MigrationReport {
        newly_applied,
        total_applied: after.len(),
    })
}

/// How many time spans a large load is split into; each span is read on its
/// own connection and decoded on its own task, so loading a long series uses
/// several cores.
pub(crate) const LOAD_SPANS: i64 = 4;

/// Splits the inclusive range `first..=last` into at most `parts` contiguous,
/// non-overlapping inclusive ranges covering it exactly.
pub(crate) fn split_time_span(first: i64, last: i64, parts: i64) -> Vec<(i64, i64)> {
    let width = i128::from(last) - i128::from(first) + 1;
    let parts = i128::from(parts.max(1)).min(width.max(1));
    let boundary = |part: i128| (i128::from(first) + width * part / parts) as i64;
    (0..parts)
        .map(|part| (boundary(part), boundary(part + 1) - 1))
        .collect()
}

/// Waits for the span-loading tasks in order and concatenates their rows
/// (spans are in time order, so the result stays ordered by ts then channel).
pub(crate) async fn join_spans(
    channels: Vec<String>,
    tasks: Vec<tokio::task::JoinHandle<Result<LongObservations, StoreError>>>,
) -> Result<LongObservations, StoreError> {
    let mut observations = LongObservations {
        channels,
        ..LongObservations::default()
    };
    for task in tasks {
        let part = match task.await {
            Ok(part) => part?,
            Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
            Err(err) => {
                return Err(StoreError::Unavailable(format!(
                    "loading observations was cancelled: {err}"
                )));
            }
        };
        if observations.value.is_empty() {
            observations.channel = part.channel;
            observations.ts_micros = part.ts_micros;
            observations.value = part.value;
        } else {
            observations.channel.extend(part.channel);
            observations.ts_micros.extend(part.ts_micros);
            observations.value.extend(part.value);
        }
    }
    Ok(observations)
}

/// The error for a worker acting on a run it no longer holds the lease of.
pub(crate) fn lease_lost(id: i64, owner: &str, status: &str, holder: Option<&str>) -> StoreError {
    StoreError::Conflict(match holder {
        Some(holder) => {
            format!("run {id} is not leased to {owner}: it is {status} under the lease of {holder}")
        }
        None => format!("run {id} is not leased to {owner}: it is {status}"),
    })
}

/// The `what` of a `NotFound` for a series named `name`.
pub(crate) fn series_named(name: &str) -> String {
    format!("series '{name}'")
}

/// Converts epoch microseconds already checked to lie in the stored range.
pub(crate) fn datetime_from_micros(
    field: &'static str,
    micros: i64,
) -> Result<DateTime<Utc>, StoreError> {
    DateTime::from_timestamp_micros(micros).ok_or_else(|| {
        StoreError::invalid(
            field,
            format!("{micros} µs since the epoch is out of range"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::split_time_span;

    #[test]
    fn time_spans_cover_the_range_exactly_once() {
        for (first, last, parts) in [
            (0, 99, 4),
            (10, 12, 4),
            (5, 5, 4),
            (-7, 1_000_003, 4),
            (0, 10, 1),
        ] {
            let spans = split_time_span(first, last, parts);
            assert!(spans.len() as i64 <= parts);
            assert_eq!(spans.first().unwrap().0, first);
            assert_eq!(spans.last().unwrap().1, last);
            for (start, end) in &spans {
                assert!(start <= end, "{spans:?}");
            }
            for pair in spans.windows(2) {
                assert_eq!(pair[0].1 + 1, pair[1].0, "{spans:?}");
            }
        }
        assert_eq!(
            split_time_span(0, 99, 4),
            vec![(0, 24), (25, 49), (50, 74), (75, 99)]
        );
        let extreme = split_time_span(super::MIN_TS_MICROS, super::MAX_TS_MICROS, 4);
        assert_eq!(extreme.len(), 4);
    }
}
