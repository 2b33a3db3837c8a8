//! The rows the store reads and writes, as plain Rust values.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::StoreError;

// --- series and observations (the ingest contract) ---

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeriesSpec {
    pub name: String,
    /// Sampling frequency such as "1h" or "15m"; `None` when irregular or unknown.
    pub frequency: Option<String>,
    /// IANA time zone name used for calendar features and schedules.
    pub timezone: String,
    /// Channel names in their fixed order.
    pub channels: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Series {
    pub id: i64,
    pub name: String,
    pub frequency: Option<String>,
    pub timezone: String,
    pub channels: Vec<String>,
    pub created_at: DateTime<Utc>,
    /// Grows with every import that writes observations: equal revisions, equal rows.
    pub data_revision: i64,
}

/// Columnar batch for one series: values[c][r] is channel `channels[c]` at
/// `ts_micros[r]` (epoch microseconds, UTC); None = missing cell (nothing stored).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ObservationBatch {
    pub channels: Vec<String>,
    pub ts_micros: Vec<i64>,
    pub values: Vec<Vec<Option<f64>>>,
}

/// Long form as read back, ordered by ts then channel; channel[i] indexes
/// `channels` (the series' channel order).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LongObservations {
    pub channels: Vec<String>,
    pub channel: Vec<u32>,
    pub ts_micros: Vec<i64>,
    pub value: Vec<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImportSummary {
    pub series: String,
    pub created_series: bool,
    pub cells_written: u64,
    pub first_ts_micros: Option<i64>,
    pub last_ts_micros: Option<i64>,
}

/// How much data a series holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservationRange {
    pub count: u64,
    pub first_ts_micros: Option<i64>,
    pub last_ts_micros: Option<i64>,
}

// --- model versions ---

/// Names one model version for good: SQLite may give a deleted version's id to a new one,
/// never with the same creation time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VersionRef {
    pub id: i64,
    pub created_at: DateTime<Utc>,
}

/// Whether a trained version may serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelVersionStatus {
    /// Complete and eligible to become the champion.
    Ready,
    /// Complete but refused (worse than the champion, or diverged); never promoted.
    Rejected,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NewModelVersion {
    pub series_id: i64,
    /// The model configuration (architecture and training settings).
    pub config: Value,
    /// The weights (safetensors bytes).
    pub artefact: Vec<u8>,
    /// Per-channel normalisation statistics the weights expect.
    pub normalisation: Value,
    /// The span of observations the version was trained on.
    pub data_from: DateTime<Utc>,
    pub data_to: DateTime<Utc>,
    pub metrics: Value,
    pub status: ModelVersionStatus,
    /// The version this one was fine-tuned from.
    pub parent_version_id: Option<i64>,
}

/// A model version without its artefact bytes (for listings).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelVersionSummary {
    pub id: i64,
    pub series_id: i64,
    pub config: Value,
    pub artefact_bytes: u64,
    pub normalisation: Value,
    pub data_from: DateTime<Utc>,
    pub data_to: DateTime<Utc>,
    pub metrics: Value,
    pub status: ModelVersionStatus,
    pub parent_version_id: Option<i64>,
    pub is_champion: bool,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelVersion {
    pub summary: ModelVersionSummary,
    pub artefact: Vec<u8>,
}

// --- runs ---

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunKind {
    /// Train a model from scratch.
    Train,
    /// Continue training the champion on recent data.
    Finetune,
    /// Pull new observations from a source.
    Pull,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    Skipped,
}

impl RunStatus {
    /// Whether a run in this status is done for good.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Self::Succeeded | Self::Failed | Self::Cancelled | Self::Skipped
        )
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct NewRun {
    pub series_id: i64,
    pub kind: RunKind,
    /// The requested configuration or overrides, as submitted.
    pub requested: Value,
    pub max_attempts: i32,
    /// Set for runs a cron schedule queued, with the fire time they belong to.
    pub schedule_id: Option<i64>,
    pub scheduled_for: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Run {
    pub id: i64,
    pub series_id: i64,
    pub kind: RunKind,
    pub status: RunStatus,
    pub requested: Value,
    /// Epoch, step, losses, ETA… as the worker reports them.
    pub progress: Value,
    pub error: Option<String>,
    pub attempts: i32,
    pub max_attempts: i32,
    pub lease_owner: Option<String>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub schedule_id: Option<i64>,
    pub scheduled_for: Option<DateTime<Utc>>,
    pub model_version_id: Option<i64>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub heartbeat_at: Option<DateTime<Utc>>,
    /// A cancel was requested while the run was running; its worker stops at
    /// its next heartbeat.
    pub cancel_requested: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EnqueuedRun {
    pub run: Run,
    /// False when the run already existed for the same schedule and fire time.
    pub created: bool,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct RunFilter {
    pub series_id: Option<i64>,
    pub status: Option<RunStatus>,
    /// At most this many runs (all when `None`).
    pub limit: Option<u32>,
}

/// How many runs of a kind are in a status, and the seconds from start to finish they took
/// (0 for runs that have not finished).
#[derive(Debug, Clone, PartialEq)]
pub struct RunStatistic {
    pub kind: RunKind,
    pub status: RunStatus,
    pub runs: u64,
    pub seconds: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RunOutcome {
    /// A final status (succeeded, failed, cancelled or skipped).
    pub status: RunStatus,
    pub error: Option<String>,
    pub model_version_id: Option<i64>,
}

/// What a worker asks for when it claims a run.
#[derive(Debug, Clone, PartialEq)]
pub struct RunClaim {
    /// Who holds the lease (unique per worker, e.g. host:pid:worker).
    pub owner: String,
    /// How long the lease lasts without a heartbeat.
    pub lease: std::time::Duration,
    /// Only runs of these kinds are claimed (the kinds the worker can execute).
    pub kinds: Vec<RunKind>,
}

/// A lease extended by a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseState {
    pub expires_at: DateTime<Utc>,
    /// A cancel was requested: the worker should stop and finish the run as cancelled.
    pub cancel_requested: bool,
}

// --- sources ---

/// A connection URL that usually carries a password: every Debug, Display and
/// Serialize form masks the password; only `expose` gives the real text.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct SecretUrl(String);

impl SecretUrl {
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The real URL, to connect with. Never log or return it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with its password masked (safe to show).
    pub fn masked(&self) -> String {
        crate::config::mask_database_url(&self.0)
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretUrl({:?})", self.masked())
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.masked())
    }
}

impl Serialize for SecretUrl {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.masked())
    }
}

/// Binds a series to a query on the user's Postgres.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceSpec {
    pub series_id: i64,
    pub connection_url: SecretUrl,
    /// Read-only SQL returning a timestamp column and numeric columns, with
    /// `{{after}}` standing for the series' last stored timestamp.
    pub query: String,
    /// The timestamp column of the result; `None` = the first column.
    pub time_column: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Source {
    pub series_id: i64,
    pub connection_url: SecretUrl,
    pub query: String,
    pub time_column: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

// --- schedules ---

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleMode {
    /// Fine-tune the champion on recent data.
    Finetune,
    /// Train from scratch.
    Full,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleSpec {
    pub series_id: i64,
    /// Cron expression with a seconds field, e.g. "0 0 3 * * *".
    pub cron: String,
    /// IANA time zone the cron expression is read in.
    pub timezone: String,
    pub mode: ScheduleMode,
    pub enabled: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Schedule {
    pub id: i64,
    pub series_id: i64,
    pub cron: String,
    pub timezone: String,
    pub mode: ScheduleMode,
    pub enabled: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

// --- forecasts ---

/// One forecast value: channel `channel` at horizon step `step` (1 = the first
/// step after the data), with its point forecast and one value per quantile level.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForecastPoint {
    pub step: u32,
    pub ts: DateTime<Utc>,
    pub channel: String,
    pub mean: f64,
    /// Aligned with the forecast's `quantile_levels`.
    pub quantiles: Vec<f64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NewForecast {
    pub series_id: i64,
    pub model_version_id: i64,
    pub issued_at: DateTime<Utc>,
    pub horizon: u32,
    /// Strictly increasing levels in (0, 1), e.g. [0.1, 0.5, 0.9].
    pub quantile_levels: Vec<f64>,
    pub points: Vec<ForecastPoint>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Forecast {
    pub id: i64,
    pub series_id: i64,
    pub model_version_id: i64,
    pub issued_at: DateTime<Utc>,
    pub horizon: u32,
    pub quantile_levels: Vec<f64>,
    /// Ordered by step, then channel name.
    pub points: Vec<ForecastPoint>,
}

// --- the text form of the enums, as stored in the database ---

macro_rules! text_enum {
    ($name:ident, $column:literal, { $($variant:ident => $text:literal),+ $(,)? }) => {
        impl $name {
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text,)+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = StoreError;

            fn from_str(text: &str) -> Result<Self, StoreError> {
                match text {
                    $($text => Ok(Self::$variant),)+
                    other => Err(StoreError::invalid(
                        $column,
                        format!("unknown value '{other}' (expected one of: {})", [$($text),+].join(", ")),
                    )),
                }
            }
        }
    };
}

text_enum!(ModelVersionStatus, "status", { Ready => "ready", Rejected => "rejected" });
text_enum!(RunKind, "kind", { Train => "train", Finetune => "finetune", Pull => "pull" });
text_enum!(RunStatus, "status", {
    Queued => "queued",
    Running => "running",
    Succeeded => "succeeded",
    Failed => "failed",
    Cancelled => "cancelled",
    Skipped => "skipped",
});
text_enum!(ScheduleMode, "mode", { Finetune => "finetune", Full => "full" });
