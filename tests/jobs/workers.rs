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

/// Cuts every connection to the test database, repeatedly, for `outage`.
async fn cut_connections(admin_url: &str, database: &str, outage: Duration) {
    use sqlx::Connection;
    let mut admin = sqlx::PgConnection::connect(admin_url).await.unwrap();
    let until = tokio::time::Instant::now() + outage;
    while tokio::time::Instant::now() < until {
        sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()")
            .bind(database)
            .execute(&mut admin)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_going_away_mid_run_leaves_the_run_clean_and_the_worker_serving() {
    let database = crate::common::fresh_postgres().await;
    let store = xlstm_forecast::store::connect(database.url())
        .await
        .unwrap();
    let series = create_series(&store, "s").await;
    let run = enqueue(&store, series.id, RunKind::Train).await;
    let executor = StepExecutor::new(30, Duration::from_millis(50));
    let pool = WorkerPool::start(store.clone(), training(executor.clone()), config(1));
    wait_until(Duration::from_secs(10), "the run to start", || {
        let store = store.clone();
        async move {
            run_of(&store, run.id).await.progress["step"]
                .as_u64()
                .unwrap_or(0)
                >= 1
        }
    })
    .await;
    let url = url::Url::parse(database.url()).unwrap();
    let name = url.path().trim_start_matches('/').to_string();
    let mut admin = url.clone();
    admin.set_path("/postgres");
    cut_connections(admin.as_str(), &name, Duration::from_millis(1_200)).await;

    wait_until(Duration::from_secs(30), "the run to end", || {
        all_final(&store, vec![run.id])
    })
    .await;
    let ended = run_of(&store, run.id).await;
    assert!(
        matches!(ended.status, RunStatus::Succeeded | RunStatus::Failed),
        "{ended:?}"
    );
    assert_eq!(ended.lease_owner, None);
    // The worker keeps serving without a restart.
    let next = enqueue(&store, series.id, RunKind::Train).await;
    wait_until(Duration::from_secs(30), "the next run", || {
        all_final(&store, vec![next.id])
    })
    .await;
    pool.shutdown().await;
    assert_eq!(run_of(&store, next.id).await.status, RunStatus::Succeeded);
    assert_eq!(
        executor
            .executed()
            .iter()
            .filter(|(id, _)| *id == run.id)
            .count(),
        1,
        "the interrupted run was not executed twice: {:?}",
        executor.executed()
    );
}
