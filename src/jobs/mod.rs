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
//! - `training`: the train / finetune executor: train, record the version, promote
//! - `requests`: what the API calls (enqueue, cancel, schedules)

pub mod executor;
pub mod policy;
pub mod pull;
pub mod requests;
pub mod scheduler;
pub mod source;
pub mod training;
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
pub use training::{TrainOverrides, TrainRequest, TrainingExecutor};
pub use worker::{WorkerConfig, WorkerPool};

use crate::store::{RunKind, Store};

/// The executors this build has: pulls, and training and fine-tuning on `device` behind the
/// retraining policy (pull before a scheduled run, skip a fine-tune with nothing new).
pub fn standard_executors(store: Arc<dyn Store>, device: candle_core::Device) -> Executors {
    let training: Arc<dyn RunExecutor> = Arc::new(RetrainingPolicy::new(
        store.clone(),
        Arc::new(TrainingExecutor::new(store.clone(), device)),
    ));
    Executors::new()
        .with(RunKind::Pull, Arc::new(PullExecutor::new(store)))
        .with(RunKind::Train, training.clone())
        .with(RunKind::Finetune, training)
}
