//! What the job tests share: series, runs, waiting, and a small executor
//! that stands in for training (it reports progress step by step and records
//! every execution) to exercise the queue.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::json;
use xlstm_forecast::jobs::{ExecutionOutcome, RunContext, RunExecutor, RunFailure};
use xlstm_forecast::store::{NewRun, Run, RunKind, Series, SeriesSpec, Store};

pub async fn create_series(store: &Arc<dyn Store>, name: &str) -> Series {
    store
        .create_series(&SeriesSpec {
            name: name.to_string(),
            frequency: Some("1h".to_string()),
            timezone: "UTC".to_string(),
            channels: vec!["load".to_string(), "temp".to_string()],
        })
        .await
        .expect("create series")
}

pub fn new_run(series_id: i64, kind: RunKind, max_attempts: i32) -> NewRun {
    NewRun {
        series_id,
        kind,
        requested: json!({"preset": "tiny"}),
        max_attempts,
        schedule_id: None,
        scheduled_for: None,
    }
}

pub async fn enqueue(store: &Arc<dyn Store>, series_id: i64, kind: RunKind) -> Run {
    store
        .enqueue_run(&new_run(series_id, kind, 3))
        .await
        .expect("enqueue")
        .run
}

/// Polls `check` every 20 ms until it holds, failing after `limit`.
pub async fn wait_until<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn run_of(store: &Arc<dyn Store>, id: i64) -> Run {
    store
        .get_run(id)
        .await
        .expect("get run")
        .expect("run exists")
}

/// Executes a run as `steps` steps of `step` each, reporting progress after
/// every step and stopping between steps when asked; records each execution
/// (run id and attempt) when it starts.
pub struct StepExecutor {
    pub steps: u32,
    pub step: Duration,
    pub executions: Mutex<Vec<(i64, i32)>>,
}

impl StepExecutor {
    pub fn new(steps: u32, step: Duration) -> Arc<Self> {
        Arc::new(Self {
            steps,
            step,
            executions: Mutex::new(Vec::new()),
        })
    }

    pub fn executed(&self) -> Vec<(i64, i32)> {
        self.executions.lock().unwrap().clone()
    }
}

#[async_trait]
impl RunExecutor for StepExecutor {
    async fn execute(&self, run: &Run, ctx: RunContext) -> Result<ExecutionOutcome, RunFailure> {
        self.executions.lock().unwrap().push((run.id, run.attempts));
        for step in 1..=self.steps {
            ctx.check_continue()?;
            tokio::time::sleep(self.step).await;
            ctx.report_progress(json!({"step": step, "steps_per_epoch": self.steps, "train_loss": 1.0 / f64::from(step)}));
        }
        Ok(ExecutionOutcome::Succeeded {
            model_version_id: None,
        })
    }
}
