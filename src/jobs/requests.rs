//! What the HTTP API calls to act on the queue and the schedules, so that
//! handlers stay thin and the rules live in one place.

use serde_json::Value;

use super::scheduler::{ScheduleError, SchedulerHandle, parse_cron, parse_timezone};
use super::source::PullError;
use crate::store::{NewRun, Run, RunKind, Schedule, ScheduleSpec, Series, Store, StoreError};

/// Attempts a run gets by default: a lapsed lease (worker killed, machine
/// lost) is retried until this many attempts were made.
pub const DEFAULT_MAX_ATTEMPTS: i32 = 3;

/// How a requested training run trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TrainMode {
    /// From scratch.
    Full,
    /// Warm start from the champion on recent data.
    Finetune,
}

impl TrainMode {
    pub fn run_kind(self) -> RunKind {
        match self {
            Self::Full => RunKind::Train,
            Self::Finetune => RunKind::Finetune,
        }
    }
}

/// Queues a training run of `series`; `requested` is the request as
/// submitted (preset, overrides…), kept on the run for the executor.
pub async fn enqueue_train(
    store: &dyn Store,
    series: &Series,
    mode: TrainMode,
    requested: Value,
) -> Result<Run, StoreError> {
    let enqueued = store
        .enqueue_run(&NewRun {
            series_id: series.id,
            kind: mode.run_kind(),
            requested,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            schedule_id: None,
            scheduled_for: None,
        })
        .await?;
    Ok(enqueued.run)
}

/// Queues a pull of `series` from its source; `NoSource` when it has none.
pub async fn enqueue_pull(store: &dyn Store, series: &Series) -> Result<Run, PullError> {
    if store.get_source(series.id).await?.is_none() {
        return Err(PullError::NoSource(series.name.clone()));
    }
    let enqueued = store
        .enqueue_run(&NewRun {
            series_id: series.id,
            kind: RunKind::Pull,
            requested: serde_json::json!({"trigger": "api"}),
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            schedule_id: None,
            scheduled_for: None,
        })
        .await?;
    Ok(enqueued.run)
}

/// Cancels a run: a queued one at once, a running one at its worker's next
/// heartbeat. `Conflict` when it already finished.
pub async fn cancel_run(store: &dyn Store, run_id: i64) -> Result<Run, StoreError> {
    store.request_run_cancel(run_id).await
}

/// Validates and stores a series' schedule and, when this process runs a
/// scheduler, registers it there at once (other processes pick it up at
/// their next reload).
pub async fn put_schedule(
    store: &dyn Store,
    scheduler: Option<&SchedulerHandle>,
    spec: &ScheduleSpec,
) -> Result<Schedule, ScheduleError> {
    parse_cron(&spec.cron)?;
    parse_timezone(&spec.timezone)?;
    let stored = store.upsert_schedule(spec).await?;
    if let Some(scheduler) = scheduler {
        scheduler.upsert(&stored).await?;
    }
    Ok(stored)
}

/// Deletes a series' schedule and stops firing it in this process.
/// `NotFound` (as a store error) when the series has no schedule.
pub async fn remove_schedule(
    store: &dyn Store,
    scheduler: Option<&SchedulerHandle>,
    series_id: i64,
) -> Result<(), ScheduleError> {
    let schedule = store
        .get_schedule(series_id)
        .await?
        .ok_or_else(|| StoreError::NotFound {
            what: format!("schedule of series {series_id}"),
        })?;
    store.delete_schedule(series_id).await?;
    if let Some(scheduler) = scheduler {
        scheduler.remove(schedule.id).await?;
    }
    Ok(())
}
