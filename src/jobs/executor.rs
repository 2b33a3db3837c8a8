//! What a worker hands a run to: the `RunExecutor` trait the product
//! implements per run kind, the `RunContext` an executor reports progress
//! through and learns from that it should stop, and the outcomes.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;
use tokio::sync::watch;

use crate::store::{Run, RunKind};

/// Executes runs of one kind (train, finetune, pull).
#[async_trait]
pub trait RunExecutor: Send + Sync {
    /// Does the work of `run`. Long work should call `ctx.report_progress`
    /// as it goes and return `Err(RunFailure::Stopped(..))` soon after
    /// `ctx.stop_reason()` turns `Some` (between steps, not mid-write).
    async fn execute(&self, run: &Run, ctx: RunContext) -> Result<ExecutionOutcome, RunFailure>;
}

/// How a run that did not fail ended.
#[derive(Debug, Clone, PartialEq)]
pub enum ExecutionOutcome {
    /// Done; a training run names the model version it wrote.
    Succeeded { model_version_id: Option<i64> },
    /// Nothing to do (e.g. a fine-tune with no new data); the reason is kept
    /// as the run's `error` text.
    Skipped { reason: String },
}

/// Why a run did not finish its work.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RunFailure {
    /// The run cannot succeed (bad data, unreachable source, diverged
    /// training…); it is failed with this reason and not retried.
    #[error("{0}")]
    Failed(String),
    /// The executor stopped because its context asked it to.
    #[error("stopped: {0}")]
    Stopped(StopReason),
}

impl RunFailure {
    pub fn failed(reason: impl fmt::Display) -> Self {
        Self::Failed(reason.to_string())
    }
}

/// Why a worker asks its executor to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// A user cancelled the run: it ends as cancelled.
    Cancelled,
    /// The process is shutting down: the run is released and queued again.
    Shutdown,
    /// Another worker took the run over (this worker's lease lapsed): its
    /// result would be discarded.
    LeaseLost,
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Cancelled => "the run was cancelled",
            Self::Shutdown => "the worker is shutting down",
            Self::LeaseLost => "the worker lost its lease on the run",
        })
    }
}

/// The executor's side of a running run. Cheap to clone; `reporter` gives a
/// `'static` handle for blocking threads (a trainer's progress callback).
#[derive(Clone)]
pub struct RunContext {
    run_id: i64,
    reporter: ProgressReporter,
}

impl RunContext {
    pub(crate) fn new(run_id: i64, channels: &RunChannels) -> Self {
        Self {
            run_id,
            reporter: ProgressReporter {
                progress: channels.progress.clone(),
                stop: channels.stop.subscribe(),
            },
        }
    }

    pub fn run_id(&self) -> i64 {
        self.run_id
    }

    /// Replaces the run's progress document (see api_contract.md for the
    /// training shape). It is written to the store in the background, with
    /// the heartbeat, at most every few hundred milliseconds; the latest
    /// document always wins and is written before the run finishes.
    pub fn report_progress(&self, progress: Value) {
        self.reporter.report(progress);
    }

    /// `Some` once the executor should stop.
    pub fn stop_reason(&self) -> Option<StopReason> {
        self.reporter.stop_reason()
    }

    /// `Err(RunFailure::Stopped(..))` once the executor should stop, for `?`
    /// between steps.
    pub fn check_continue(&self) -> Result<(), RunFailure> {
        self.reporter.check_continue()
    }

    /// Resolves when the executor should stop (for `tokio::select!`).
    pub async fn stopped(&self) -> StopReason {
        let mut stop = self.reporter.stop.clone();
        match stop.wait_for(Option::is_some).await {
            Ok(reason) => reason.expect("waited for Some"),
            // The worker dropped the run: nobody will record a result.
            Err(_) => StopReason::LeaseLost,
        }
    }

    /// A handle for threads outside the async runtime.
    pub fn reporter(&self) -> ProgressReporter {
        self.reporter.clone()
    }
}

/// Progress reporting and stop checks usable from any thread.
#[derive(Clone)]
pub struct ProgressReporter {
    progress: Arc<watch::Sender<Option<Value>>>,
    stop: watch::Receiver<Option<StopReason>>,
}

impl ProgressReporter {
    pub fn report(&self, progress: Value) {
        self.progress.send_replace(Some(progress));
    }

    pub fn stop_reason(&self) -> Option<StopReason> {
        *self.stop.borrow()
    }

    pub fn check_continue(&self) -> Result<(), RunFailure> {
        match self.stop_reason() {
            Some(reason) => Err(RunFailure::Stopped(reason)),
            None => Ok(()),
        }
    }
}

/// The worker's side of the context: the latest progress to write and the
/// stop signal to raise.
pub(crate) struct RunChannels {
    pub progress: Arc<watch::Sender<Option<Value>>>,
    pub stop: watch::Sender<Option<StopReason>>,
}

impl RunChannels {
    pub fn new() -> Self {
        Self {
            progress: Arc::new(watch::channel(None).0),
            stop: watch::channel(None).0,
        }
    }

    /// Asks the executor to stop; the first reason given sticks.
    pub fn request_stop(&self, reason: StopReason) {
        self.stop.send_if_modified(|current| {
            if current.is_none() {
                *current = Some(reason);
                true
            } else {
                false
            }
        });
    }

    pub fn stop_reason(&self) -> Option<StopReason> {
        *self.stop.borrow()
    }
}

/// The executors of one process, by the run kind they execute. Workers only
/// claim runs of kinds registered here, so runs of other kinds wait for a
/// process that can execute them.
#[derive(Clone, Default)]
pub struct Executors {
    by_kind: BTreeMap<&'static str, (RunKind, Arc<dyn RunExecutor>)>,
}

impl Executors {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers (or replaces) the executor of `kind`.
    pub fn with(mut self, kind: RunKind, executor: Arc<dyn RunExecutor>) -> Self {
        self.by_kind.insert(kind.as_str(), (kind, executor));
        self
    }

    pub fn kinds(&self) -> Vec<RunKind> {
        self.by_kind.values().map(|(kind, _)| *kind).collect()
    }

    pub fn get(&self, kind: RunKind) -> Option<Arc<dyn RunExecutor>> {
        self.by_kind
            .get(kind.as_str())
            .map(|(_, executor)| executor.clone())
    }
}

impl fmt::Debug for Executors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Executors")
            .field("kinds", &self.kinds())
            .finish()
    }
}
