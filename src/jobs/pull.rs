//! The executor of `pull` runs: new rows from the series' source.

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::json;

use super::executor::{ExecutionOutcome, RunContext, RunExecutor, RunFailure};
use super::source::pull_series;
use crate::store::{Run, Store};

pub struct PullExecutor {
    store: Arc<dyn Store>,
}

impl PullExecutor {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }
}

#[async_trait]
impl RunExecutor for PullExecutor {
    async fn execute(&self, run: &Run, ctx: RunContext) -> Result<ExecutionOutcome, RunFailure> {
        ctx.check_continue()?;
        let series = self
            .store
            .get_series_by_id(run.series_id)
            .await
            .map_err(RunFailure::failed)?
            .ok_or_else(|| {
                RunFailure::failed(format!("series {} no longer exists", run.series_id))
            })?;
        ctx.report_progress(json!({"phase": "pulling"}));
        let report = pull_series(self.store.as_ref(), &series)
            .await
            .map_err(RunFailure::failed)?;
        ctx.report_progress(json!({"phase": "done", "pull": report}));
        Ok(ExecutionOutcome::Succeeded {
            model_version_id: None,
        })
    }
}
