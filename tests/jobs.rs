//! The job queue against real stores: leases in both backends, workers,
//! schedules, pulls from a second Postgres, and `serve --role worker`
//! processes.

#[macro_use]
mod common;

#[path = "jobs/fixtures.rs"]
mod fixtures;
#[path = "jobs/policy.rs"]
mod policy;
#[path = "jobs/processes.rs"]
mod processes;
#[path = "jobs/pull.rs"]
mod pull;
#[path = "jobs/queue_store.rs"]
mod queue_store;
#[path = "jobs/schedules.rs"]
mod schedules;
#[path = "jobs/workers.rs"]
mod workers;
