//! Workers: tokio tasks that claim runs from the store under a lease, hand
//! them to the executor of their kind, heartbeat while it works (writing its
//! progress), and record how each run ended.
//!
//! Exactly-once rests on the store: a claim is atomic, and every write a
//! worker makes to a run (heartbeat, finish, release) names the lease owner,
//! so a worker whose lease lapsed and was taken over can no longer touch it.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, sleep_until};

use super::executor::{
    ExecutionOutcome, Executors, RunChannels, RunContext, RunFailure, StopReason,
};
use crate::store::{Run, RunClaim, RunOutcome, RunStatus, Store, StoreError};

/// How workers claim and keep runs.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Concurrent workers (each runs one run at a time).
    pub workers: usize,
    /// How long a lease lasts without a heartbeat: a run whose worker died is
    /// claimed again this long after its last heartbeat.
    pub lease: Duration,
    /// How often a running run's lease is extended (well under `lease`).
    pub heartbeat_interval: Duration,
    /// Progress is written at most this often (with a heartbeat).
    pub progress_interval: Duration,
    /// How long an idle worker waits before looking for work again.
    pub poll_interval: Duration,
    /// On shutdown, how long a running executor gets to stop by itself
    /// before it is dropped; either way its run is released or finished.
    pub shutdown_grace: Duration,
    /// Prefix of the lease owner names (host and process by default).
    pub owner_prefix: String,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            workers: 1,
            lease: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(5),
            progress_interval: Duration::from_millis(250),
            poll_interval: Duration::from_millis(200),
            shutdown_grace: Duration::from_secs(10),
            owner_prefix: default_owner_prefix(),
        }
    }
}

/// `host:pid` (plus a random tag, so a restarted process with a recycled pid
/// is a new owner).
pub fn default_owner_prefix() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".to_string());
    format!(
        "{host}:{}:{:04x}",
        std::process::id(),
        rand::random::<u16>()
    )
}

/// Running workers; `shutdown` stops them gracefully.
pub struct WorkerPool {
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    owners: Vec<String>,
}

impl WorkerPool {
    /// Starts `config.workers` workers over `store` that execute the kinds
    /// `executors` knows.
    pub fn start(store: Arc<dyn Store>, executors: Executors, config: WorkerConfig) -> Self {
        let (shutdown, _) = watch::channel(false);
        let mut tasks = Vec::with_capacity(config.workers);
        let mut owners = Vec::with_capacity(config.workers);
        for index in 0..config.workers {
            let worker = Worker {
                store: store.clone(),
                executors: executors.clone(),
                owner: format!("{}:w{index}", config.owner_prefix),
                config: config.clone(),
                shutdown: shutdown.subscribe(),
            };
            owners.push(worker.owner.clone());
            tasks.push(tokio::spawn(worker.run()));
        }
        tracing::info!(workers = config.workers, kinds = ?executors.kinds(), "workers started");
        Self {
            shutdown,
            tasks,
            owners,
        }
    }

    /// The lease owner name of each worker.
    pub fn owners(&self) -> &[String] {
        &self.owners
    }

    /// Stops claiming, asks running executors to stop, and waits until every
    /// worker has finished or released its run.
    pub async fn shutdown(self) {
        self.shutdown.send_replace(true);
        for task in self.tasks {
            if let Err(err) = task.await
                && err.is_panic()
            {
                tracing::error!("a worker panicked: {err}");
            }
        }
    }
}

struct Worker {
    store: Arc<dyn Store>,
    executors: Executors,
    owner: String,
    config: WorkerConfig,
    shutdown: watch::Receiver<bool>,
}

/// Pause after a store error before trying again.
const STORE_RETRY_DELAY: Duration = Duration::from_secs(1);
/// Attempts at recording a run's end before leaving it to lapse.
const FINISH_ATTEMPTS: u32 = 5;

impl Worker {
    async fn run(mut self) {
        let claim = RunClaim {
            owner: self.owner.clone(),
            lease: self.config.lease,
            kinds: self.executors.kinds(),
        };
        if claim.kinds.is_empty() {
            tracing::warn!(owner = %self.owner, "no executors registered; the worker stays idle");
        }
        while !*self.shutdown.borrow() {
            let pause = if claim.kinds.is_empty() {
                self.config.poll_interval
            } else {
                match self.store.claim_run(&claim).await {
                    Ok(Some(run)) => {
                        self.execute(run).await;
                        continue;
                    }
                    Ok(None) => self.config.poll_interval,
                    Err(err) => {
                        tracing::warn!(owner = %self.owner, "cannot claim runs: {err}");
                        STORE_RETRY_DELAY
                    }
                }
            };
            tokio::select! {
                _ = sleep(pause) => {}
                changed = self.shutdown.changed() => {
                    // The pool was dropped without a shutdown: stop too.
                    if changed.is_err() {
                        break;
                    }
                }
            }
        }
    }

    async fn execute(&mut self, run: Run) {
        let run_id = run.id;
        tracing::info!(run = run_id, kind = %run.kind, attempt = run.attempts, owner = %self.owner, "run claimed");
        let Some(executor) = self.executors.get(run.kind) else {
            // Claims only ask for registered kinds; this is a bug, not a user error.
            self.record(
                run_id,
                Ending::Finish(failed(format!("no executor for run kind {}", run.kind))),
            )
            .await;
            return;
        };
        let channels = RunChannels::new();
        let context = RunContext::new(run_id, &channels);
        if run.cancel_requested {
            channels.request_stop(StopReason::Cancelled);
        }
        let mut progress = channels.progress.subscribe();
        let mut task = tokio::spawn(async move { executor.execute(&run, context).await });

        let mut next_heartbeat = Instant::now() + self.config.heartbeat_interval;
        let mut progress_allowed_at = Instant::now();
        let mut progress_pending = false;
        let mut grace_deadline: Option<Instant> = None;
        let result = loop {
            tokio::select! {
                joined = &mut task => break Some(joined),
                _ = sleep_until(next_heartbeat) => {
                    self.heartbeat(run_id, &channels, &mut progress, &mut progress_pending).await;
                    next_heartbeat = Instant::now() + self.config.heartbeat_interval;
                    progress_allowed_at = Instant::now() + self.config.progress_interval;
                }
                changed = progress.changed(), if !progress_pending => {
                    if changed.is_ok() {
                        progress_pending = true;
                    }
                }
                _ = sleep_until(progress_allowed_at), if progress_pending => {
                    self.heartbeat(run_id, &channels, &mut progress, &mut progress_pending).await;
                    next_heartbeat = Instant::now() + self.config.heartbeat_interval;
                    progress_allowed_at = Instant::now() + self.config.progress_interval;
                }
                _ = self.shutdown.changed(), if grace_deadline.is_none() => {
                    channels.request_stop(StopReason::Shutdown);
                    grace_deadline = Some(Instant::now() + self.config.shutdown_grace);
                }
                _ = sleep_until(grace_deadline.unwrap_or_else(Instant::now)), if grace_deadline.is_some() => {
                    tracing::warn!(run = run_id, "the executor did not stop within the shutdown grace period; dropping it");
                    task.abort();
                    break None;
                }
            }
        };
        if channels.stop_reason() == Some(StopReason::LeaseLost) {
            tracing::warn!(run = run_id, owner = %self.owner, "lease lost; the run's result is discarded");
            return;
        }
        // The last progress document is written before the run ends.
        if progress.has_changed().unwrap_or(false) || progress_pending {
            self.heartbeat(run_id, &channels, &mut progress, &mut progress_pending)
                .await;
            if channels.stop_reason() == Some(StopReason::LeaseLost) {
                return;
            }
        }
        let ending = match result {
            None => Ending::Release,
            Some(joined) => ending_of(joined, channels.stop_reason()),
        };
        self.record(run_id, ending).await;
    }

    /// Extends the lease (writing the latest progress when it changed) and
    /// raises the stop signal on a cancel request or a lost lease. Store
    /// errors are logged and retried at the next beat: the lease outlasts a
    /// few missed beats.
    async fn heartbeat(
        &self,
        run_id: i64,
        channels: &RunChannels,
        progress: &mut watch::Receiver<Option<Value>>,
        progress_pending: &mut bool,
    ) {
        let document = progress.borrow_and_update().clone();
        let result = self
            .store
            .heartbeat_run(run_id, &self.owner, self.config.lease, document.as_ref())
            .await;
        match result {
            Ok(state) => {
                *progress_pending = false;
                if state.cancel_requested {
                    channels.request_stop(StopReason::Cancelled);
                }
            }
            Err(StoreError::Conflict(message)) | Err(StoreError::NotFound { what: message }) => {
                tracing::warn!(run = run_id, "{message}");
                channels.request_stop(StopReason::LeaseLost);
            }
            Err(err) => {
                // Keep the document pending so the next beat writes it.
                *progress_pending = document.is_some();
                tracing::warn!(run = run_id, "heartbeat failed: {err}");
            }
        }
    }

    /// Records how the run ended, retrying while the store is unavailable.
    /// If it stays unavailable the lease lapses and another worker retries
    /// the run.
    async fn record(&self, run_id: i64, ending: Ending) {
        for attempt in 1..=FINISH_ATTEMPTS {
            let result = match &ending {
                Ending::Finish(outcome) => self
                    .store
                    .finish_leased_run(run_id, &self.owner, outcome)
                    .await
                    .map(|run| run.status),
                Ending::Release => self
                    .store
                    .release_run(run_id, &self.owner)
                    .await
                    .map(|run| run.status),
            };
            match result {
                Ok(status) => {
                    tracing::info!(run = run_id, %status, "run ended");
                    return;
                }
                Err(err @ (StoreError::Conflict(_) | StoreError::NotFound { .. })) => {
                    tracing::warn!(run = run_id, "cannot record the run's end: {err}");
                    return;
                }
                Err(err) => {
                    tracing::warn!(run = run_id, attempt, "cannot record the run's end: {err}");
                    sleep(STORE_RETRY_DELAY * attempt).await;
                }
            }
        }
        tracing::error!(
            run = run_id,
            "giving up recording the run's end; its lease will lapse and it will be retried"
        );
    }
}

enum Ending {
    Finish(RunOutcome),
    /// Back to the queue (graceful shutdown).
    Release,
}

fn failed(reason: String) -> RunOutcome {
    RunOutcome {
        status: RunStatus::Failed,
        error: Some(reason),
        model_version_id: None,
    }
}

/// Maps the executor's result to how the run ends.
fn ending_of(
    joined: Result<Result<ExecutionOutcome, RunFailure>, tokio::task::JoinError>,
    stop: Option<StopReason>,
) -> Ending {
    let result = match joined {
        Ok(result) => result,
        Err(err) => {
            let detail = if err.is_panic() {
                panic_message(err.into_panic())
            } else {
                err.to_string()
            };
            return Ending::Finish(failed(format!("the executor panicked: {detail}")));
        }
    };
    match result {
        Ok(ExecutionOutcome::Succeeded { model_version_id }) => Ending::Finish(RunOutcome {
            status: RunStatus::Succeeded,
            error: None,
            model_version_id,
        }),
        Ok(ExecutionOutcome::Skipped { reason }) => Ending::Finish(RunOutcome {
            status: RunStatus::Skipped,
            error: Some(reason),
            model_version_id: None,
        }),
        Err(RunFailure::Failed(reason)) => Ending::Finish(failed(reason)),
        Err(RunFailure::Stopped(reason)) => match stop.unwrap_or(reason) {
            StopReason::Cancelled => Ending::Finish(RunOutcome {
                status: RunStatus::Cancelled,
                error: Some("cancelled while running".to_string()),
                model_version_id: None,
            }),
            // A lost lease is handled before; both mean "not ours to finish".
            StopReason::Shutdown | StopReason::LeaseLost => Ending::Release,
        },
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|text| text.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_string())
}
