//! The run object of the HTTP API (see api_contract.md).

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use serde_json::Value;

use crate::store::{Run, RunKind, RunStatus};

#[derive(Debug, Serialize)]
pub struct RunBody {
    pub id: i64,
    pub series: String,
    pub kind: RunKind,
    pub status: RunStatus,
    pub attempts: i32,
    pub max_attempts: i32,
    pub requested: Value,
    pub progress: Value,
    pub error: Option<String>,
    pub cancel_requested: bool,
    pub model_version_id: Option<i64>,
    pub schedule_id: Option<i64>,
    pub scheduled_for: Option<String>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub heartbeat_at: Option<String>,
}

impl RunBody {
    pub fn new(run: Run, series: String) -> Self {
        let time = |at: DateTime<Utc>| at.to_rfc3339_opts(SecondsFormat::AutoSi, true);
        Self {
            id: run.id,
            series,
            kind: run.kind,
            status: run.status,
            attempts: run.attempts,
            max_attempts: run.max_attempts,
            requested: run.requested,
            progress: run.progress,
            error: run.error,
            cancel_requested: run.cancel_requested,
            model_version_id: run.model_version_id,
            schedule_id: run.schedule_id,
            scheduled_for: run.scheduled_for.map(time),
            created_at: time(run.created_at),
            started_at: run.started_at.map(time),
            finished_at: run.finished_at.map(time),
            heartbeat_at: run.heartbeat_at.map(time),
        }
    }
}
