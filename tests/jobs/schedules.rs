//! Cron schedules: several schedulers firing the same schedule queue one run
//! per fire time; API changes take effect without a restart.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::Timelike;
use xlstm_forecast::jobs::scheduler::{SchedulerHandle, fire};
use xlstm_forecast::jobs::{put_schedule, remove_schedule};
use xlstm_forecast::store::{self, RunFilter, RunKind, ScheduleMode, ScheduleSpec, Store};

use crate::common::fresh_postgres;
use crate::fixtures::create_series;

fn every_second(series_id: i64) -> ScheduleSpec {
    ScheduleSpec {
        series_id,
        cron: "* * * * * *".to_string(),
        timezone: "Asia/Kolkata".to_string(),
        mode: ScheduleMode::Finetune,
        enabled: true,
    }
}

async fn scheduled_runs(store: &Arc<dyn Store>) -> Vec<xlstm_forecast::store::Run> {
    store
        .list_runs(&RunFilter::default())
        .await
        .unwrap()
        .into_iter()
        .filter(|run| run.schedule_id.is_some())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_schedulers_queue_one_run_per_fire_time() {
    let database = fresh_postgres().await;
    let first_store = store::connect(database.url()).await.unwrap();
    let second_store = store::connect(database.url()).await.unwrap();
    let series = create_series(&first_store, "s").await;
    let schedule = first_store
        .upsert_schedule(&every_second(series.id))
        .await
        .unwrap();

    let first = SchedulerHandle::start(first_store.clone(), Duration::from_secs(60))
        .await
        .unwrap();
    let second = SchedulerHandle::start(second_store.clone(), Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(
        first.registered().await,
        vec![schedule.id],
        "loaded at start"
    );
    assert_eq!(second.registered().await, vec![schedule.id]);
    tokio::time::sleep(Duration::from_millis(3_600)).await;
    first.shutdown().await;
    second.shutdown().await;

    let runs = scheduled_runs(&first_store).await;
    let fire_times: BTreeSet<_> = runs.iter().map(|run| run.scheduled_for.unwrap()).collect();
    assert_eq!(
        fire_times.len(),
        runs.len(),
        "one run per fire time: {runs:#?}"
    );
    assert!(runs.len() >= 2, "fired at least twice in 3.6 s: {runs:#?}");
    for run in &runs {
        assert_eq!(run.kind, RunKind::Finetune);
        assert_eq!(run.schedule_id, Some(schedule.id));
        assert_eq!(
            run.scheduled_for.unwrap().nanosecond(),
            0,
            "the fire time, not the clock"
        );
        assert_eq!(run.requested["trigger"], "schedule");
    }
}

#[tokio::test]
async fn firing_twice_for_one_fire_time_queues_once() {
    let database = fresh_postgres().await;
    let first_store = store::connect(database.url()).await.unwrap();
    let second_store = store::connect(database.url()).await.unwrap();
    let series = create_series(&first_store, "s").await;
    let schedule = first_store
        .upsert_schedule(&every_second(series.id))
        .await
        .unwrap();
    let at = chrono::Utc::now().with_nanosecond(0).unwrap();
    let (a, b) = tokio::join!(
        fire(first_store.as_ref(), &schedule, at),
        fire(second_store.as_ref(), &schedule, at)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.run.id, b.run.id);
    assert_eq!(
        [a.created, b.created]
            .iter()
            .filter(|created| **created)
            .count(),
        1
    );
}

store_tests! {
    async fn schedule_changes_take_effect_without_a_restart(store) {
        let series = create_series(&store, "s").await;
        let scheduler = SchedulerHandle::start(store.clone(), Duration::from_secs(60)).await.unwrap();
        assert!(scheduler.registered().await.is_empty());

        // Registered at once in this process.
        let schedule = put_schedule(store.as_ref(), Some(&scheduler), &every_second(series.id)).await.unwrap();
        assert_eq!(scheduler.registered().await, vec![schedule.id]);
        crate::fixtures::wait_until(Duration::from_secs(5), "a scheduled run", || {
            let store = store.clone();
            async move { !scheduled_runs(&store).await.is_empty() }
        })
        .await;

        // Another process's scheduler learns of the change at its reload.
        let other = SchedulerHandle::start(store.clone(), Duration::from_secs(60)).await.unwrap();
        assert_eq!(other.registered().await, vec![schedule.id]);
        let disabled = ScheduleSpec { enabled: false, ..every_second(series.id) };
        put_schedule(store.as_ref(), None, &disabled).await.unwrap();
        other.reload().await.unwrap();
        assert!(other.registered().await.is_empty(), "disabled schedules do not fire");
        other.shutdown().await;

        remove_schedule(store.as_ref(), Some(&scheduler), series.id).await.unwrap();
        assert!(scheduler.registered().await.is_empty());
        let all_runs = || async { store.list_runs(&RunFilter::default()).await.unwrap().len() };
        tokio::time::sleep(Duration::from_millis(1_200)).await;
        let settled = all_runs().await;
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        assert_eq!(all_runs().await, settled, "a removed schedule stops firing");
        scheduler.shutdown().await;

        let bad = ScheduleSpec { cron: "0 3 * * *".into(), ..every_second(series.id) };
        let err = put_schedule(store.as_ref(), None, &bad).await.unwrap_err();
        assert_eq!(err.field(), Some("cron"));
    }
}
