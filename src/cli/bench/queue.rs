//! `xlstm-forecast bench queue`: the run queue with trivial runs (an executor
//! that returns at once) on a fresh Postgres database (and a SQLite file).
//!
//! - claim-to-start latency: with idle workers, the time from a run being
//!   queued (its enqueue returned) to its executor starting, over samples
//!   spaced at random so they fall at every phase of the workers' polling;
//! - throughput: a backlog of trivial runs drained by the workers, from the
//!   first claim to the last finish.
//!
//! Goals (issue 6): latency under 1 s with idle workers; at least 200 runs/s
//! across 4 workers on Postgres.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::json;
use tokio::sync::mpsc;

use super::ingest::ScratchPostgres;
use crate::jobs::{
    ExecutionOutcome, Executors, RunContext, RunExecutor, RunFailure, WorkerConfig, WorkerPool,
};
use crate::store::{self, NewRun, Run, RunFilter, RunKind, RunStatus, SeriesSpec, Store};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum QueueBackend {
    Postgres,
    Sqlite,
}

/// A fresh, empty store for one benchmark: a scratch database on the Postgres server, or a
/// SQLite file in its own temporary directory.
pub(super) enum ScratchStore {
    Postgres(ScratchPostgres),
    Sqlite {
        dir: std::path::PathBuf,
        url: String,
    },
}

impl ScratchStore {
    /// `label` names the SQLite directory and file (`xf-bench-{label}-…/{label}.db`).
    pub(super) async fn create(
        backend: QueueBackend,
        postgres_url: &str,
        label: &str,
    ) -> anyhow::Result<Self> {
        Ok(match backend {
            QueueBackend::Postgres => Self::Postgres(ScratchPostgres::create(postgres_url).await?),
            QueueBackend::Sqlite => {
                let dir = std::env::temp_dir().join(format!(
                    "xf-bench-{label}-{}-{}",
                    std::process::id(),
                    rand::random::<u32>()
                ));
                let url = format!("sqlite://{}", dir.join(format!("{label}.db")).display());
                Self::Sqlite { dir, url }
            }
        })
    }

    pub(super) fn url(&self) -> &str {
        match self {
            Self::Postgres(database) => &database.url,
            Self::Sqlite { url, .. } => url,
        }
    }

    pub(super) fn backend(&self) -> &'static str {
        match self {
            Self::Postgres(_) => "postgres",
            Self::Sqlite { .. } => "sqlite",
        }
    }

    /// Removes the database or file; the figures are already taken, so failures only warn.
    pub(super) async fn remove(self) {
        match self {
            Self::Postgres(database) => database.drop_database().await,
            Self::Sqlite { dir, .. } => {
                std::fs::remove_dir_all(&dir).ok();
            }
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct QueueBenchArgs {
    /// Runs in the throughput backlog.
    #[arg(long, default_value_t = 2_000)]
    pub runs: usize,
    /// Concurrent workers.
    #[arg(long, default_value_t = 4)]
    pub workers: usize,
    /// Latency samples (one run queued at a time).
    #[arg(long, default_value_t = 40)]
    pub latency_samples: usize,
    /// Postgres server whose role may create databases; a fresh database is
    /// created on it and dropped afterwards.
    #[arg(
        long,
        value_name = "URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pub postgres_url: String,
    /// Backends to measure (repeatable) [default: postgres].
    #[arg(long = "backend", value_enum)]
    pub backends: Vec<QueueBackend>,
    /// Print one JSON object per backend instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, serde::Serialize)]
struct QueueFigures {
    bench: &'static str,
    backend: &'static str,
    build: &'static str,
    workers: usize,
    poll_interval_ms: u128,
    latency_samples: usize,
    latency_p50_ms: f64,
    latency_p95_ms: f64,
    latency_max_ms: f64,
    goal_latency_ms: f64,
    runs: usize,
    throughput_seconds: f64,
    runs_per_second: f64,
    goal_runs_per_second: f64,
}

/// Returns at once; tells the bench when each run started.
struct Trivial {
    started: mpsc::UnboundedSender<(i64, Instant)>,
}

#[async_trait]
impl RunExecutor for Trivial {
    async fn execute(&self, run: &Run, _ctx: RunContext) -> Result<ExecutionOutcome, RunFailure> {
        let _ = self.started.send((run.id, Instant::now()));
        Ok(ExecutionOutcome::Succeeded {
            model_version_id: None,
        })
    }
}

pub async fn run(args: QueueBenchArgs) -> anyhow::Result<()> {
    if args.runs == 0 || args.workers == 0 || args.latency_samples == 0 {
        anyhow::bail!("--runs, --workers and --latency-samples must be positive");
    }
    let backends = if args.backends.is_empty() {
        vec![QueueBackend::Postgres]
    } else {
        args.backends.clone()
    };
    for backend in backends {
        let scratch = ScratchStore::create(backend, &args.postgres_url, "queue").await?;
        let result = measure(scratch.url(), scratch.backend(), &args).await;
        scratch.remove().await;
        let figures = result?;
        print_figures(&figures, args.json)?;
    }
    Ok(())
}

async fn measure(
    url: &str,
    backend: &'static str,
    args: &QueueBenchArgs,
) -> anyhow::Result<QueueFigures> {
    let store = store::connect(url).await?;
    let series = store
        .create_series(&SeriesSpec {
            name: "bench".to_string(),
            frequency: None,
            timezone: "UTC".to_string(),
            channels: vec!["x".to_string()],
        })
        .await?;
    let trivial_run = NewRun {
        series_id: series.id,
        kind: RunKind::Train,
        requested: json!({}),
        max_attempts: 1,
        schedule_id: None,
        scheduled_for: None,
    };
    let config = WorkerConfig {
        workers: args.workers,
        ..WorkerConfig::default()
    };
    let poll_interval = config.poll_interval;
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let executors = Executors::new().with(
        RunKind::Train,
        Arc::new(Trivial {
            started: started_tx,
        }),
    );

    // Latency: idle workers, one run at a time.
    let pool = WorkerPool::start(store.clone(), executors.clone(), config.clone());
    let mut latencies = Vec::with_capacity(args.latency_samples);
    for _ in 0..args.latency_samples {
        // A random pause puts each sample at a different phase of the polling.
        let pause = rand::random_range(0..poll_interval.as_millis() as u64 + 50);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let run = store.enqueue_run(&trivial_run).await?.run;
        let queued = Instant::now();
        let (id, at) = tokio::time::timeout(Duration::from_secs(10), started.recv())
            .await
            .map_err(|_| anyhow::anyhow!("run {} did not start within 10 s", run.id))?
            .ok_or_else(|| anyhow::anyhow!("the executor went away"))?;
        anyhow::ensure!(id == run.id, "run {id} started instead of {}", run.id);
        latencies.push(at.saturating_duration_since(queued));
    }
    wait_until_drained(store.as_ref()).await?;
    pool.shutdown().await;

    // Throughput: a backlog drained by the workers.
    for _ in 0..args.runs {
        store.enqueue_run(&trivial_run).await?;
    }
    while started.try_recv().is_ok() {}
    let begun = Instant::now();
    let pool = WorkerPool::start(store.clone(), executors, config);
    wait_until_drained(store.as_ref()).await?;
    let elapsed = begun.elapsed();
    pool.shutdown().await;
    let succeeded = store
        .list_runs(&RunFilter {
            series_id: Some(series.id),
            status: Some(RunStatus::Succeeded),
            limit: None,
        })
        .await?
        .len();
    anyhow::ensure!(
        succeeded == args.runs + args.latency_samples,
        "{succeeded} runs succeeded, expected {}",
        args.runs + args.latency_samples
    );

    latencies.sort_unstable();
    let percentile = |p: f64| {
        let index = ((latencies.len() as f64 - 1.0) * p).round() as usize;
        latencies[index].as_secs_f64() * 1e3
    };
    Ok(QueueFigures {
        bench: "queue",
        backend,
        build: if cfg!(debug_assertions) {
            "dev"
        } else {
            "release"
        },
        workers: args.workers,
        poll_interval_ms: poll_interval.as_millis(),
        latency_samples: latencies.len(),
        latency_p50_ms: percentile(0.5),
        latency_p95_ms: percentile(0.95),
        latency_max_ms: percentile(1.0),
        goal_latency_ms: 1_000.0,
        runs: args.runs,
        throughput_seconds: elapsed.as_secs_f64(),
        runs_per_second: args.runs as f64 / elapsed.as_secs_f64(),
        goal_runs_per_second: 200.0,
    })
}

/// Waits until no run is queued or running.
async fn wait_until_drained(store: &dyn Store) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let mut busy = false;
        for status in [RunStatus::Queued, RunStatus::Running] {
            let filter = RunFilter {
                series_id: None,
                status: Some(status),
                limit: Some(1),
            };
            busy |= !store.list_runs(&filter).await?.is_empty();
        }
        if !busy {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the queue did not drain within 600 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn print_figures(figures: &QueueFigures, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(figures)?);
        return Ok(());
    }
    println!(
        "queue on {} ({} build, {} workers, idle poll every {} ms):",
        figures.backend, figures.build, figures.workers, figures.poll_interval_ms
    );
    println!(
        "  claim-to-start latency over {} samples: p50 {:.1} ms, p95 {:.1} ms, max {:.1} ms (goal < {:.0} ms)",
        figures.latency_samples,
        figures.latency_p50_ms,
        figures.latency_p95_ms,
        figures.latency_max_ms,
        figures.goal_latency_ms
    );
    println!(
        "  throughput: {} trivial runs in {:.2} s = {:.0} runs/s (goal >= {:.0})",
        figures.runs,
        figures.throughput_seconds,
        figures.runs_per_second,
        figures.goal_runs_per_second
    );
    Ok(())
}
