//! Workers in this process over both backends: exactly-once execution, lease
//! take-over, cancellation, graceful shutdown, progress.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use xlstm_forecast::jobs::{
    ExecutionOutcome, Executors, RunContext, RunExecutor, RunFailure, WorkerConfig, WorkerPool,
};
use xlstm_forecast::store::{Run, RunClaim, RunKind, RunStatus, Store};

use crate::fixtures::{StepExecutor, create_series, enqueue, run_of, wait_until};

fn config(workers: usize) -> WorkerConfig {
    WorkerConfig {
        workers,
        lease: Duration::from_secs(3),
        heartbeat_interval: Duration::from_millis(100),
        progress_interval: Duration::from_millis(20),
        poll_interval: Duration::from_millis(20),
        shutdown_grace: Duration::from_secs(3),
        owner_prefix: "test".to_string(),
    }
}

fn training(executor: Arc<StepExecutor>) -> Executors {
    Executors::new()
        .with(RunKind::Train, executor.clone())
        .with(RunKind::Finetune, executor)
}

async fn all_final(store: &Arc<dyn Store>, ids: Vec<i64>) -> bool {
    for id in ids {
        if !run_of(store, id).await.status.is_final() {
            return false;
        }
    }
    true
}

struct Panicking;

#[async_trait]
impl RunExecutor for Panicking {
    async fn execute(&self, _run: &Run, _ctx: RunContext) -> Result<ExecutionOutcome, RunFailure> {
        panic!("boom in the executor");
    }
}

store_tests! {
    async fn four_workers_execute_twelve_runs_exactly_once(store) {
        let series = create_series(&store, "s").await;
        let mut ids = Vec::new();
        for _ in 0..12 {
            ids.push(enqueue(&store, series.id, RunKind::Train).await.id);
        }
        let executor = StepExecutor::new(3, Duration::from_millis(15));
        let pool = WorkerPool::start(store.clone(), training(executor.clone()), config(4));
        wait_until(Duration::from_secs(20), "all runs to finish", || all_final(&store, ids.clone())).await;
        pool.shutdown().await;
        let mut executed: Vec<i64> = executor.executed().iter().map(|(id, _)| *id).collect();
        executed.sort_unstable();
        assert_eq!(executed, ids, "every run executed exactly once");
        for id in &ids {
            let run = run_of(&store, *id).await;
            assert_eq!(run.status, RunStatus::Succeeded, "{run:?}");
            assert_eq!(run.attempts, 1);
            assert_eq!(run.progress["step"], 3, "the last progress is written before the end");
            assert!(run.started_at.is_some() && run.finished_at.is_some());
        }
    }

    async fn a_dead_workers_run_is_taken_over_after_its_lease_lapses(store) {
        let series = create_series(&store, "s").await;
        let run = enqueue(&store, series.id, RunKind::Train).await;
        // A worker that claims and dies: it never heartbeats.
        let dead = RunClaim { owner: "dead".into(), lease: Duration::from_millis(300), kinds: vec![RunKind::Train] };
        store.claim_run(&dead).await.unwrap().expect("claimed by the dead worker");
        let executor = StepExecutor::new(2, Duration::from_millis(10));
        let pool = WorkerPool::start(store.clone(), training(executor.clone()), config(1));
        wait_until(Duration::from_secs(10), "the run to finish", || all_final(&store, vec![run.id])).await;
        pool.shutdown().await;
        let finished = run_of(&store, run.id).await;
        assert_eq!(finished.status, RunStatus::Succeeded);
        assert_eq!(finished.attempts, 2);
        assert_eq!(executor.executed(), vec![(run.id, 2)]);
    }

    async fn cancelling_a_running_run_stops_it_at_the_next_heartbeat(store) {
        let series = create_series(&store, "s").await;
        let run = enqueue(&store, series.id, RunKind::Train).await;
        let executor = StepExecutor::new(500, Duration::from_millis(20));
        let pool = WorkerPool::start(store.clone(), training(executor.clone()), config(1));
        wait_until(Duration::from_secs(10), "progress", || {
            let store = store.clone();
            async move { run_of(&store, run.id).await.progress["step"].as_u64().unwrap_or(0) >= 2 }
        })
        .await;
        let flagged = xlstm_forecast::jobs::cancel_run(store.as_ref(), run.id).await.unwrap();
        assert_eq!(flagged.status, RunStatus::Running);
        wait_until(Duration::from_secs(5), "the run to stop", || all_final(&store, vec![run.id])).await;
        pool.shutdown().await;
        let cancelled = run_of(&store, run.id).await;
        assert_eq!(cancelled.status, RunStatus::Cancelled);
        assert_eq!(cancelled.error.as_deref(), Some("cancelled while running"));
        assert!(cancelled.progress["step"].as_u64().unwrap() < 100, "{:?}", cancelled.progress);
    }

    async fn graceful_shutdown_releases_the_running_run_for_another_worker(store) {
        let series = create_series(&store, "s").await;
        let run = enqueue(&store, series.id, RunKind::Finetune).await;
        let slow = StepExecutor::new(1_000, Duration::from_millis(20));
        let pool = WorkerPool::start(store.clone(), training(slow.clone()), config(1));
        wait_until(Duration::from_secs(10), "the run to start", || {
            let store = store.clone();
            async move { run_of(&store, run.id).await.status == RunStatus::Running }
        })
        .await;
        pool.shutdown().await;
        let released = run_of(&store, run.id).await;
        assert_eq!(released.status, RunStatus::Queued, "{released:?}");
        assert_eq!(released.attempts, 0, "an interrupted attempt does not count");

        let quick = StepExecutor::new(1, Duration::from_millis(1));
        let pool = WorkerPool::start(store.clone(), training(quick.clone()), config(1));
        wait_until(Duration::from_secs(10), "the run to finish", || all_final(&store, vec![run.id])).await;
        pool.shutdown().await;
        assert_eq!(run_of(&store, run.id).await.status, RunStatus::Succeeded);
        assert_eq!(quick.executed(), vec![(run.id, 1)]);
    }

    async fn a_panicking_executor_fails_the_run_and_the_worker_goes_on(store) {
        let series = create_series(&store, "s").await;
        let doomed = enqueue(&store, series.id, RunKind::Train).await;
        let fine = enqueue(&store, series.id, RunKind::Finetune).await;
        let steps = StepExecutor::new(1, Duration::from_millis(1));
        let executors = Executors::new()
            .with(RunKind::Train, Arc::new(Panicking))
            .with(RunKind::Finetune, steps.clone());
        let pool = WorkerPool::start(store.clone(), executors, config(1));
        wait_until(Duration::from_secs(10), "both runs", || all_final(&store, vec![doomed.id, fine.id])).await;
        pool.shutdown().await;
        let failed = run_of(&store, doomed.id).await;
        assert_eq!(failed.status, RunStatus::Failed);
        assert_eq!(failed.error.as_deref(), Some("the executor panicked: boom in the executor"));
        assert_eq!(run_of(&store, fine.id).await.status, RunStatus::Succeeded);
    }

    async fn runs_of_kinds_without_an_executor_stay_queued(store) {
        let series = create_series(&store, "s").await;
        let pull = enqueue(&store, series.id, RunKind::Pull).await;
        let train = enqueue(&store, series.id, RunKind::Train).await;
        let executor = StepExecutor::new(1, Duration::from_millis(1));
        let pool = WorkerPool::start(store.clone(), training(executor.clone()), config(2));
        wait_until(Duration::from_secs(10), "the train run", || all_final(&store, vec![train.id])).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        pool.shutdown().await;
        assert_eq!(run_of(&store, pull.id).await.status, RunStatus::Queued);
        assert_eq!(executor.executed(), vec![(train.id, 1)]);
    }
}
