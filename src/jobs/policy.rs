//! The retraining policy around a training executor: a scheduled run first
//! pulls new rows from the series' source (when it has one), and a fine-tune
//! with no data newer than the champion's training range is skipped with the
//! reason instead of training on nothing new.

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::json;

use super::executor::{ExecutionOutcome, RunContext, RunExecutor, RunFailure};
use super::source::pull_series;
use crate::store::{Run, RunKind, Store, StoreError};

/// Wraps the executor of train and finetune runs.
pub struct RetrainingPolicy {
    store: Arc<dyn Store>,
    training: Arc<dyn RunExecutor>,
}

impl RetrainingPolicy {
    pub fn new(store: Arc<dyn Store>, training: Arc<dyn RunExecutor>) -> Self {
        Self { store, training }
    }
}

#[async_trait]
impl RunExecutor for RetrainingPolicy {
    async fn execute(&self, run: &Run, ctx: RunContext) -> Result<ExecutionOutcome, RunFailure> {
        let store = self.store.as_ref();
        let series = store
            .get_series_by_id(run.series_id)
            .await
            .map_err(RunFailure::failed)?
            .ok_or_else(|| {
                RunFailure::failed(format!("series {} no longer exists", run.series_id))
            })?;
        if run.schedule_id.is_some()
            && store
                .get_source(series.id)
                .await
                .map_err(RunFailure::failed)?
                .is_some()
        {
            ctx.check_continue()?;
            let report = pull_series(store, &series).await.map_err(|err| {
                RunFailure::failed(format!(
                    "pulling new rows before the scheduled run failed: {err}"
                ))
            })?;
            ctx.report_progress(json!({"phase": "pulled", "pull": report}));
        }
        if run.kind == RunKind::Finetune
            && let Some(reason) = finetune_skip_reason(store, run.series_id)
                .await
                .map_err(RunFailure::failed)?
        {
            return Ok(ExecutionOutcome::Skipped { reason });
        }
        ctx.check_continue()?;
        self.training.execute(run, ctx).await
    }
}

/// Why a fine-tune of the series would have nothing new to learn from, if
/// so: its last observation is not after the end of the champion's
/// training range. `None` without a champion (the trainer decides).
pub async fn finetune_skip_reason(
    store: &dyn Store,
    series_id: i64,
) -> Result<Option<String>, StoreError> {
    let champion = store
        .list_model_versions(series_id)
        .await?
        .into_iter()
        .find(|version| version.is_champion);
    let Some(champion) = champion else {
        return Ok(None);
    };
    let last = store
        .last_observation_micros(series_id)
        .await?
        .and_then(chrono::DateTime::from_timestamp_micros);
    Ok(match last {
        Some(last) if last > champion.data_to => None,
        last => Some(format!(
            "no new data since the champion (model version {}) was trained: its data ends at {}, \
             the series' last observation is {}",
            champion.id,
            champion.data_to.to_rfc3339(),
            last.map(|at| format!("at {}", at.to_rfc3339()))
                .unwrap_or_else(|| "missing (the series is empty)".to_string())
        )),
    })
}
