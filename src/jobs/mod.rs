//! The job queue: runs (train, finetune, pull) are rows in the store that
//! workers claim under a lease, heartbeat while they work and finish; cron
//! schedules only enqueue runs; pull runs bring new rows from the user's
//! Postgres. No HTTP here: the API calls `requests`.
//!
//! - `executor`: the `RunExecutor` trait, `RunContext` (progress, stop), `Executors` by kind
//! - `worker`: the claim → execute → heartbeat → finish loop (`WorkerPool`)
//! - `scheduler`: tokio-cron-scheduler jobs that enqueue idempotently (`SchedulerHandle`)
//! - `source`, `pull`: pulling from a series' source, and the pull executor
//! - `policy`: pull before scheduled training, skip fine-tunes with no new data
//! - `requests`: what the API calls (enqueue, cancel, schedules)

pub mod executor;
pub mod policy;
pub mod pull;
pub mod requests;
pub mod scheduler;
pub mod source;
pub mod worker;

use std::sync::Arc;

pub use executor::{
    ExecutionOutcome, Executors, ProgressReporter, RunContext, RunExecutor, RunFailure, StopReason,
};
pub use policy::RetrainingPolicy;
pub use pull::PullExecutor;
pub use requests::{
    DEFAULT_MAX_ATTEMPTS, TrainMode, cancel_run, enqueue_pull, enqueue_train, put_schedule,
    remove_schedule,
};
pub use scheduler::{ScheduleError, SchedulerHandle};
pub use source::{PullError, PullReport, check_source, pull_series};
pub use worker::{WorkerConfig, WorkerPool};

use crate::store::{RunKind, Store};

/// The executors this build has: pull runs. Train and finetune executors are
/// added by the forecaster, wrapped in the retraining policy:
///
/// ```ignore
/// let training = Arc::new(RetrainingPolicy::new(store.clone(), Arc::new(TrainingExecutor::new(..))));
/// standard_executors(store).with(RunKind::Train, training.clone()).with(RunKind::Finetune, training)
/// ```
///
/// The training executor reads `run.requested` (mode, preset, overrides),
/// reports the progress document of api_contract.md through
/// `ctx.reporter()` from its training thread, stops when
/// `reporter.stop_reason()` is `Some` (returning `RunFailure::Stopped`),
/// writes the complete model version, promotes per the registry, and returns
/// `ExecutionOutcome::Succeeded { model_version_id }`. Until it exists, train
/// and finetune runs stay queued (workers only claim kinds they execute).
pub fn standard_executors(store: Arc<dyn Store>) -> Executors {
    Executors::new().with(RunKind::Pull, Arc::new(PullExecutor::new(store)))
}
