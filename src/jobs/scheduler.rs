//! Cron schedules: tokio-cron-scheduler fires each enabled schedule (cron
//! with a seconds field, read in the schedule's time zone) and a firing only
//! enqueues a run for (schedule, fire time). Every process may fire the same
//! schedule: the store's unique (schedule_id, scheduled_for) makes the
//! enqueue idempotent, so each fire time gets one run.
//!
//! The fire time is computed from the cron expression (the latest occurrence
//! at or before the moment the job runs), not read from the clock, so that
//! every process records the same `scheduled_for`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Timelike, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds};
use serde_json::json;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tokio_cron_scheduler::{Job, JobScheduler};
use uuid::Uuid;

use crate::store::{EnqueuedRun, NewRun, RunKind, Schedule, ScheduleMode, Store, StoreError};

/// Attempts a scheduled run gets (a lapsed lease is retried up to this).
pub const SCHEDULED_RUN_MAX_ATTEMPTS: i32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    #[error(
        "invalid cron expression '{cron}': {message} (expected 6 fields with seconds first, e.g. \"0 0 3 * * *\")"
    )]
    Cron { cron: String, message: String },
    #[error("unknown time zone '{0}' (expected an IANA name such as Europe/Berlin)")]
    Timezone(String),
    #[error("scheduler: {0}")]
    Scheduler(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ScheduleError {
    /// The request field the error is about, when it is the caller's input.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            Self::Cron { .. } => Some("cron"),
            Self::Timezone(_) => Some("timezone"),
            Self::Scheduler(_) | Self::Store(_) => None,
        }
    }
}

/// Parses a cron expression the way the scheduler reads it: seconds
/// required, day-of-month and day-of-week both honoured.
pub fn parse_cron(cron: &str) -> Result<Cron, ScheduleError> {
    CronParser::builder()
        .seconds(Seconds::Required)
        .dom_and_dow(true)
        .build()
        .parse(cron)
        .map_err(|err| ScheduleError::Cron {
            cron: cron.to_string(),
            message: err.to_string(),
        })
}

pub fn parse_timezone(name: &str) -> Result<Tz, ScheduleError> {
    name.parse()
        .map_err(|_| ScheduleError::Timezone(name.to_string()))
}

/// The next fire time strictly after `after` (for the schedule object's
/// `next_fire_at`); `None` when the expression never fires again.
pub fn next_fire_time(
    cron: &str,
    timezone: &str,
    after: DateTime<Utc>,
) -> Result<Option<DateTime<Utc>>, ScheduleError> {
    let parsed = parse_cron(cron)?;
    let zone = parse_timezone(timezone)?;
    // Cron resolves whole seconds; croner keeps the sub-second part it is given.
    let after = after.with_nanosecond(0).unwrap_or(after);
    Ok(parsed
        .find_next_occurrence(&after.with_timezone(&zone), false)
        .ok()
        .map(|at| at.with_timezone(&Utc)))
}

/// The fire time a job running at `now` belongs to: the latest occurrence
/// at or before `now`.
pub fn fire_time_at(cron: &Cron, zone: Tz, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    // Cron resolves whole seconds; croner returns an inclusive match as given.
    let now = now.with_nanosecond(0).unwrap_or(now);
    cron.find_previous_occurrence(&now.with_timezone(&zone), true)
        .ok()
        .map(|at| at.with_timezone(&Utc))
}

/// The run a firing of `schedule` at `fire_time` enqueues.
pub fn scheduled_run(schedule: &Schedule, fire_time: DateTime<Utc>) -> NewRun {
    NewRun {
        series_id: schedule.series_id,
        kind: match schedule.mode {
            ScheduleMode::Finetune => RunKind::Finetune,
            ScheduleMode::Full => RunKind::Train,
        },
        requested: json!({
            "mode": schedule.mode.as_str(),
            "trigger": "schedule",
        }),
        max_attempts: SCHEDULED_RUN_MAX_ATTEMPTS,
        schedule_id: Some(schedule.id),
        scheduled_for: Some(fire_time),
    }
}

/// Enqueues the run of one firing; idempotent per (schedule, fire time).
pub async fn fire(
    store: &dyn Store,
    schedule: &Schedule,
    fire_time: DateTime<Utc>,
) -> Result<EnqueuedRun, StoreError> {
    store.enqueue_run(&scheduled_run(schedule, fire_time)).await
}

/// One registered job and what it was built from.
struct Registered {
    job: Uuid,
    schedule: Schedule,
}

struct Inner {
    store: Arc<dyn Store>,
    scheduler: Mutex<JobScheduler>,
    /// By schedule id.
    jobs: Mutex<HashMap<i64, Registered>>,
    reloader: std::sync::Mutex<Option<JoinHandle<()>>>,
}

/// The running scheduler of this process. Cheap to clone. Changes through
/// the API reach it with `upsert`/`remove` (this process) and `reload`
/// (every process, periodically), without a restart.
#[derive(Clone)]
pub struct SchedulerHandle {
    inner: Arc<Inner>,
}

impl SchedulerHandle {
    /// Starts the scheduler with every enabled schedule in the store, and
    /// reloads from the store every `reload_every` so that changes made by
    /// other processes take effect here too.
    pub async fn start(
        store: Arc<dyn Store>,
        reload_every: Duration,
    ) -> Result<Self, ScheduleError> {
        let scheduler = JobScheduler::new().await.map_err(scheduler_error)?;
        scheduler.start().await.map_err(scheduler_error)?;
        let handle = Self {
            inner: Arc::new(Inner {
                store,
                scheduler: Mutex::new(scheduler),
                jobs: Mutex::new(HashMap::new()),
                reloader: std::sync::Mutex::new(None),
            }),
        };
        handle.reload().await?;
        let weak = Arc::downgrade(&handle.inner);
        let reloader = tokio::spawn(async move {
            let mut ticks = tokio::time::interval(reload_every);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                let handle = SchedulerHandle { inner };
                if let Err(err) = handle.reload().await {
                    tracing::warn!("cannot reload schedules: {err}");
                }
            }
        });
        *handle.inner.reloader.lock().expect("reloader lock") = Some(reloader);
        Ok(handle)
    }

    /// Brings the registered jobs in line with the store's enabled
    /// schedules: adds new ones, replaces changed ones, removes deleted or
    /// disabled ones.
    pub async fn reload(&self) -> Result<(), ScheduleError> {
        let enabled = self.inner.store.list_enabled_schedules().await?;
        let wanted: HashMap<i64, Schedule> = enabled
            .into_iter()
            .map(|schedule| (schedule.id, schedule))
            .collect();
        let registered: Vec<i64> = self.inner.jobs.lock().await.keys().copied().collect();
        for id in registered {
            if !wanted.contains_key(&id) {
                self.unregister(id).await?;
            }
        }
        for schedule in wanted.into_values() {
            if let Err(err) = self.upsert(&schedule).await {
                // One broken schedule must not keep the others from firing.
                tracing::warn!(schedule = schedule.id, "cannot register schedule: {err}");
            }
        }
        Ok(())
    }

    /// Registers or replaces the job of a stored schedule (a disabled one is
    /// removed).
    pub async fn upsert(&self, schedule: &Schedule) -> Result<(), ScheduleError> {
        if !schedule.enabled {
            return self.unregister(schedule.id).await;
        }
        {
            let jobs = self.inner.jobs.lock().await;
            if let Some(current) = jobs.get(&schedule.id)
                && same_firing(&current.schedule, schedule)
            {
                return Ok(());
            }
        }
        let job = self.job_for(schedule)?;
        let scheduler = self.inner.scheduler.lock().await;
        let job_id = scheduler.add(job).await.map_err(scheduler_error)?;
        let previous = self.inner.jobs.lock().await.insert(
            schedule.id,
            Registered {
                job: job_id,
                schedule: schedule.clone(),
            },
        );
        if let Some(previous) = previous {
            scheduler
                .remove(&previous.job)
                .await
                .map_err(scheduler_error)?;
        }
        tracing::info!(schedule = schedule.id, cron = %schedule.cron, timezone = %schedule.timezone, "schedule registered");
        Ok(())
    }

    /// Removes the job of a schedule (no-op when none is registered).
    pub async fn remove(&self, schedule_id: i64) -> Result<(), ScheduleError> {
        self.unregister(schedule_id).await
    }

    /// The ids of the schedules with a registered job.
    pub async fn registered(&self) -> Vec<i64> {
        let mut ids: Vec<i64> = self.inner.jobs.lock().await.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// Stops firing (running enqueues complete).
    pub async fn shutdown(&self) {
        if let Some(reloader) = self.inner.reloader.lock().expect("reloader lock").take() {
            reloader.abort();
        }
        if let Err(err) = self.inner.scheduler.lock().await.shutdown().await {
            tracing::warn!("scheduler shutdown: {err}");
        }
    }

    async fn unregister(&self, schedule_id: i64) -> Result<(), ScheduleError> {
        let removed = self.inner.jobs.lock().await.remove(&schedule_id);
        if let Some(removed) = removed {
            self.inner
                .scheduler
                .lock()
                .await
                .remove(&removed.job)
                .await
                .map_err(scheduler_error)?;
            tracing::info!(schedule = schedule_id, "schedule unregistered");
        }
        Ok(())
    }

    fn job_for(&self, schedule: &Schedule) -> Result<Job, ScheduleError> {
        let cron = parse_cron(&schedule.cron)?;
        let zone = parse_timezone(&schedule.timezone)?;
        let store = self.inner.store.clone();
        let fired = schedule.clone();
        Job::new_async_tz(schedule.cron.as_str(), zone, move |_job, _scheduler| {
            let store = store.clone();
            let schedule = fired.clone();
            let cron = cron.clone();
            Box::pin(async move {
                let Some(fire_time) = fire_time_at(&cron, zone, Utc::now()) else {
                    return;
                };
                match fire(store.as_ref(), &schedule, fire_time).await {
                    Ok(enqueued) => tracing::info!(
                        schedule = schedule.id,
                        run = enqueued.run.id,
                        created = enqueued.created,
                        %fire_time,
                        "schedule fired"
                    ),
                    Err(err) => tracing::warn!(schedule = schedule.id, %fire_time, "cannot enqueue the scheduled run: {err}"),
                }
            })
        })
        .map_err(|err| ScheduleError::Cron {
            cron: schedule.cron.clone(),
            message: err.to_string(),
        })
    }
}

/// Whether two versions of a schedule fire the same runs.
fn same_firing(a: &Schedule, b: &Schedule) -> bool {
    a.cron == b.cron
        && a.timezone == b.timezone
        && a.mode == b.mode
        && a.series_id == b.series_id
        && a.enabled == b.enabled
}

fn scheduler_error(err: tokio_cron_scheduler::JobSchedulerError) -> ScheduleError {
    ScheduleError::Scheduler(err.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn cron_needs_seconds_and_names_the_field() {
        assert!(parse_cron("0 0 3 * * *").is_ok());
        assert!(parse_cron("*/5 * * * * *").is_ok());
        let err = parse_cron("0 3 * * *").unwrap_err();
        assert_eq!(err.field(), Some("cron"));
        assert!(err.to_string().contains("'0 3 * * *'"), "{err}");
        assert_eq!(
            parse_timezone("Mars/Base").unwrap_err().field(),
            Some("timezone")
        );
    }

    #[test]
    fn fire_time_is_the_occurrence_at_or_before_now_in_the_zone() {
        let cron = parse_cron("0 30 2 * * *").unwrap();
        let zone: Tz = "Europe/Berlin".parse().unwrap();
        // 02:30 in Berlin (winter, UTC+1) is 01:30Z; a job running a few
        // hundred milliseconds late still belongs to that fire time.
        let now = Utc.with_ymd_and_hms(2024, 1, 10, 1, 30, 0).unwrap()
            + chrono::Duration::milliseconds(700);
        assert_eq!(
            fire_time_at(&cron, zone, now),
            Some(Utc.with_ymd_and_hms(2024, 1, 10, 1, 30, 0).unwrap())
        );
        assert_eq!(
            next_fire_time("0 30 2 * * *", "Europe/Berlin", now).unwrap(),
            Some(Utc.with_ymd_and_hms(2024, 1, 11, 1, 30, 0).unwrap())
        );
    }
}
