//! `xlstm-forecast serve --role worker` processes sharing one Postgres:
//! twelve runs over three processes execute exactly once, and a run whose
//! worker process is killed with SIGKILL is finished by another process
//! after the lease lapses, with nothing half-written.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use sqlx::{Connection, Executor, PgConnection};
use xlstm_forecast::jobs::enqueue_pull;
use xlstm_forecast::store::{self, RunStatus, SecretUrl, SourceSpec, Store};

use crate::common::fresh_postgres;
use crate::fixtures::{create_series, run_of, wait_until};

/// A worker process; its stderr goes to a file shown when the test fails.
struct WorkerProcess(Child, tempfile::NamedTempFile);

impl WorkerProcess {
    fn start(database_url: &str, lease_seconds: f64) -> Self {
        let log = tempfile::NamedTempFile::new().expect("a log file");
        let child = Command::new(env!("CARGO_BIN_EXE_xlstm-forecast"))
            .args([
                "serve",
                "--role",
                "worker",
                "--workers",
                "2",
                "--lease-seconds",
            ])
            .arg(lease_seconds.to_string())
            .env("DATABASE_URL", database_url)
            .env_remove("XLSTM_FORECAST_CONFIG")
            .env("XLSTM_FORECAST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log.reopen().expect("the log file"))
            .spawn()
            .expect("start a worker process");
        Self(child, log)
    }

    fn kill(&mut self) {
        self.0.kill().ok();
        self.0.wait().ok();
    }

    /// SIGTERM, then waits for the graceful exit.
    fn terminate(&mut self) -> std::process::ExitStatus {
        Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status()
            .expect("send SIGTERM");
        self.0.wait().expect("wait for the worker")
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.1.path()).unwrap_or_default();
            eprintln!("--- worker process {} stderr ---\n{log}", self.0.id());
        }
    }
}

async fn user_table(url: &str) -> PgConnection {
    let mut connection = PgConnection::connect(url).await.unwrap();
    connection
        .execute(
            "CREATE TABLE meters AS SELECT TIMESTAMPTZ '2024-01-01 00:00:00+00' + make_interval(hours => h) AS ts,
                 (100 + h)::float8 AS load, (20 + h)::float8 AS temp FROM generate_series(0, 4) AS h",
        )
        .await
        .unwrap();
    connection
}

async fn bind(store: &Arc<dyn Store>, series_id: i64, url: &str, query: &str) {
    store
        .upsert_source(&SourceSpec {
            series_id,
            connection_url: SecretUrl::new(url),
            query: query.to_string(),
            time_column: None,
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_worker_processes_execute_twelve_runs_exactly_once() {
    let database = fresh_postgres().await;
    let user = fresh_postgres().await;
    let _user_connection = user_table(user.url()).await;
    let store = store::connect(database.url()).await.unwrap();
    let mut runs = Vec::new();
    for index in 0..12 {
        let series = create_series(&store, &format!("s{index}")).await;
        bind(
            &store,
            series.id,
            user.url(),
            "SELECT ts, load, temp FROM meters WHERE ts > {{after}}",
        )
        .await;
        runs.push(enqueue_pull(store.as_ref(), &series).await.unwrap().id);
    }
    let mut workers: Vec<WorkerProcess> = (0..3)
        .map(|_| WorkerProcess::start(database.url(), 10.0))
        .collect();
    wait_until(Duration::from_secs(60), "all twelve runs", || {
        let store = store.clone();
        let runs = runs.clone();
        async move {
            for id in runs {
                if !run_of(&store, id).await.status.is_final() {
                    return false;
                }
            }
            true
        }
    })
    .await;
    for worker in &mut workers {
        assert!(worker.terminate().success(), "graceful exit on SIGTERM");
    }
    for (index, id) in runs.iter().enumerate() {
        let run = run_of(&store, *id).await;
        assert_eq!(run.status, RunStatus::Succeeded, "{run:?}");
        assert_eq!(run.attempts, 1, "claimed once: {run:?}");
        let range = store.observation_range(&format!("s{index}")).await.unwrap();
        assert_eq!(range.count, 10, "each pull imported once");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_of_a_killed_worker_process_is_finished_by_another() {
    let database = fresh_postgres().await;
    let user = fresh_postgres().await;
    let _user_connection = user_table(user.url()).await;
    let store = store::connect(database.url()).await.unwrap();
    let series = create_series(&store, "s").await;
    // A slow source: the query takes three seconds.
    bind(
        &store,
        series.id,
        user.url(),
        "WITH pause AS (SELECT pg_sleep(3)) SELECT ts, load, temp FROM meters WHERE ts > {{after}} AND EXISTS (SELECT 1 FROM pause)",
    )
    .await;
    let run = enqueue_pull(store.as_ref(), &series).await.unwrap();
    let mut doomed = WorkerProcess::start(database.url(), 1.0);
    wait_until(
        Duration::from_secs(30),
        "the first worker to claim the run",
        || {
            let store = store.clone();
            async move { run_of(&store, run.id).await.status == RunStatus::Running }
        },
    )
    .await;
    doomed.kill();
    assert_eq!(
        store.observation_range("s").await.unwrap().count,
        0,
        "nothing half-written"
    );

    let _rescuer = WorkerProcess::start(database.url(), 1.0);
    wait_until(
        Duration::from_secs(40),
        "another worker to finish the run",
        || {
            let store = store.clone();
            async move { run_of(&store, run.id).await.status.is_final() }
        },
    )
    .await;
    let finished = run_of(&store, run.id).await;
    assert_eq!(finished.status, RunStatus::Succeeded, "{finished:?}");
    assert_eq!(finished.attempts, 2);
    assert_eq!(store.observation_range("s").await.unwrap().count, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_running_run_finish_before_the_process_exits() {
    let database = fresh_postgres().await;
    let user = fresh_postgres().await;
    let _user_connection = user_table(user.url()).await;
    let store = store::connect(database.url()).await.unwrap();
    let series = create_series(&store, "s").await;
    bind(
        &store,
        series.id,
        user.url(),
        "WITH pause AS (SELECT pg_sleep(2)) SELECT ts, load, temp FROM meters WHERE ts > {{after}} AND EXISTS (SELECT 1 FROM pause)",
    )
    .await;
    let run = enqueue_pull(store.as_ref(), &series).await.unwrap();
    let mut worker = WorkerProcess::start(database.url(), 10.0);
    wait_until(
        Duration::from_secs(30),
        "the worker to claim the run",
        || {
            let store = store.clone();
            async move { run_of(&store, run.id).await.status == RunStatus::Running }
        },
    )
    .await;
    assert!(worker.terminate().success(), "graceful exit on SIGTERM");
    let finished = run_of(&store, run.id).await;
    assert_eq!(finished.status, RunStatus::Succeeded, "{finished:?}");
    assert_eq!(finished.lease_owner, None);
    assert_eq!(store.observation_range("s").await.unwrap().count, 10);
}
