//! The lease operations of the `Store`, against both backends.

use std::time::Duration;

use serde_json::json;
use xlstm_forecast::store::{
    RunClaim, RunKind, RunOutcome, RunStatus, SecretUrl, SourceSpec, StoreError,
};

use crate::fixtures::{create_series, enqueue, new_run, run_of};

fn claim(owner: &str, lease_ms: u64) -> RunClaim {
    RunClaim {
        owner: owner.to_string(),
        lease: Duration::from_millis(lease_ms),
        kinds: vec![RunKind::Train, RunKind::Finetune, RunKind::Pull],
    }
}

fn succeeded() -> RunOutcome {
    RunOutcome {
        status: RunStatus::Succeeded,
        error: None,
        model_version_id: None,
    }
}

store_tests! {
    async fn claims_oldest_first_once_and_only_wanted_kinds(store) {
        let series = create_series(&store, "s").await;
        let first = enqueue(&store, series.id, RunKind::Train).await;
        let pull = enqueue(&store, series.id, RunKind::Pull).await;
        let third = enqueue(&store, series.id, RunKind::Finetune).await;

        let pull_only = RunClaim { kinds: vec![RunKind::Pull], ..claim("puller", 60_000) };
        let claimed = store.claim_run(&pull_only).await.unwrap().expect("the pull run");
        assert_eq!(claimed.id, pull.id);
        assert!(store.claim_run(&pull_only).await.unwrap().is_none(), "no second pull run");

        let claimed = store.claim_run(&claim("a", 60_000)).await.unwrap().expect("a run");
        assert_eq!(claimed.id, first.id, "oldest first");
        assert_eq!(claimed.status, RunStatus::Running);
        assert_eq!(claimed.attempts, 1);
        assert_eq!(claimed.lease_owner.as_deref(), Some("a"));
        let expires = claimed.lease_expires_at.expect("lease set");
        let started = claimed.started_at.expect("started");
        assert!(expires - started > chrono::Duration::seconds(59), "{started} → {expires}");
        let next = store.claim_run(&claim("b", 60_000)).await.unwrap().expect("another run");
        assert_eq!(next.id, third.id);
        assert!(store.claim_run(&claim("c", 60_000)).await.unwrap().is_none());

        let bad = RunClaim { owner: " ".into(), ..claim("x", 1000) };
        assert!(matches!(store.claim_run(&bad).await, Err(StoreError::Invalid { field: "owner", .. })));
    }

    async fn heartbeat_extends_writes_progress_and_refuses_other_owners(store) {
        let series = create_series(&store, "s").await;
        let run = enqueue(&store, series.id, RunKind::Train).await;
        let claimed = store.claim_run(&claim("a", 1_000)).await.unwrap().unwrap();
        let state = store
            .heartbeat_run(run.id, "a", Duration::from_secs(120), Some(&json!({"epoch": 1})))
            .await
            .unwrap();
        assert!(!state.cancel_requested);
        assert!(state.expires_at > claimed.lease_expires_at.unwrap() + chrono::Duration::seconds(100));
        store.heartbeat_run(run.id, "a", Duration::from_secs(120), None).await.unwrap();
        let stored = run_of(&store, run.id).await;
        assert_eq!(stored.progress, json!({"epoch": 1}), "no progress keeps the last one");
        assert!(stored.heartbeat_at.is_some());

        let err = store.heartbeat_run(run.id, "intruder", Duration::from_secs(1), None).await.unwrap_err();
        assert!(matches!(&err, StoreError::Conflict(message) if message.contains("under the lease of a")), "{err}");
        let err = store.finish_leased_run(run.id, "intruder", &succeeded()).await.unwrap_err();
        assert!(matches!(err, StoreError::Conflict(_)), "{err}");
        assert!(matches!(
            store.heartbeat_run(9_999, "a", Duration::from_secs(1), None).await,
            Err(StoreError::NotFound { .. })
        ));

        let finished = store.finish_leased_run(run.id, "a", &succeeded()).await.unwrap();
        assert_eq!(finished.status, RunStatus::Succeeded);
        assert_eq!(finished.lease_owner, None);
        assert!(finished.finished_at.is_some());
        let again = store.finish_leased_run(run.id, "a", &succeeded()).await.unwrap_err();
        assert!(matches!(&again, StoreError::Conflict(message) if message.contains("succeeded")), "{again}");
        assert!(matches!(
            store.heartbeat_run(run.id, "a", Duration::from_secs(1), None).await,
            Err(StoreError::Conflict(_))
        ));
    }

    async fn lapsed_lease_is_reclaimed_then_failed_after_max_attempts(store) {
        let series = create_series(&store, "s").await;
        let run = store.enqueue_run(&new_run(series.id, RunKind::Train, 2)).await.unwrap().run;
        store.claim_run(&claim("dead-1", 50)).await.unwrap().expect("first claim");
        assert!(store.claim_run(&claim("b", 50)).await.unwrap().is_none(), "lease still held");
        tokio::time::sleep(Duration::from_millis(80)).await;
        let reclaimed = store.claim_run(&claim("dead-2", 50)).await.unwrap().expect("lapsed lease reclaimed");
        assert_eq!((reclaimed.id, reclaimed.attempts), (run.id, 2));
        assert_eq!(reclaimed.lease_owner.as_deref(), Some("dead-2"));
        // The first owner cannot touch the run any more.
        assert!(matches!(
            store.finish_leased_run(run.id, "dead-1", &succeeded()).await,
            Err(StoreError::Conflict(_))
        ));
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert!(store.claim_run(&claim("c", 50)).await.unwrap().is_none(), "no attempts left");
        let failed = run_of(&store, run.id).await;
        assert_eq!(failed.status, RunStatus::Failed);
        let reason = failed.error.unwrap();
        assert!(reason.contains("lease lapsed on attempt 2 of 2"), "{reason}");
        assert!(reason.contains("dead-2"), "{reason}");
        assert_eq!(failed.lease_owner, None);
    }

    async fn cancel_queued_at_once_and_running_through_the_heartbeat(store) {
        let series = create_series(&store, "s").await;
        let running = enqueue(&store, series.id, RunKind::Train).await;
        let queued = enqueue(&store, series.id, RunKind::Train).await;
        store.claim_run(&claim("a", 60_000)).await.unwrap().unwrap();

        let cancelled = store.request_run_cancel(queued.id).await.unwrap();
        assert_eq!(cancelled.status, RunStatus::Cancelled);
        assert!(cancelled.finished_at.is_some());
        assert!(store.claim_run(&claim("b", 60_000)).await.unwrap().is_none(), "a cancelled run is not claimed");

        let flagged = store.request_run_cancel(running.id).await.unwrap();
        assert_eq!(flagged.status, RunStatus::Running);
        assert!(flagged.cancel_requested);
        let state = store.heartbeat_run(running.id, "a", Duration::from_secs(60), None).await.unwrap();
        assert!(state.cancel_requested);
        // Released on shutdown after a cancel request: cancelled, not queued.
        let released = store.release_run(running.id, "a").await.unwrap();
        assert_eq!(released.status, RunStatus::Cancelled);

        assert!(matches!(store.request_run_cancel(queued.id).await, Err(StoreError::Conflict(_))));
        assert!(matches!(store.request_run_cancel(12_345).await, Err(StoreError::NotFound { .. })));
    }

    async fn release_requeues_without_counting_the_attempt(store) {
        let series = create_series(&store, "s").await;
        let run = enqueue(&store, series.id, RunKind::Finetune).await;
        store.claim_run(&claim("a", 60_000)).await.unwrap().unwrap();
        let released = store.release_run(run.id, "a").await.unwrap();
        assert_eq!(released.status, RunStatus::Queued);
        assert_eq!(released.attempts, 0);
        assert_eq!(released.lease_owner, None);
        assert!(matches!(store.release_run(run.id, "a").await, Err(StoreError::Conflict(_))));
        let again = store.claim_run(&claim("b", 60_000)).await.unwrap().unwrap();
        assert_eq!((again.id, again.attempts), (run.id, 1));
    }

    async fn sources_upsert_get_delete_and_mask_the_url(store) {
        let series = create_series(&store, "s").await;
        let spec = SourceSpec {
            series_id: series.id,
            connection_url: SecretUrl::new("postgres://reader:s3cret@db.example:5432/meters"),
            query: "SELECT ts, load FROM m WHERE ts > {{after}}".to_string(),
            time_column: None,
        };
        let stored = store.upsert_source(&spec).await.unwrap();
        assert_eq!(stored.connection_url.expose(), "postgres://reader:s3cret@db.example:5432/meters");
        assert!(!format!("{stored:?}").contains("s3cret"));
        assert!(!serde_json::to_string(&stored).unwrap().contains("s3cret"));
        let replaced = store
            .upsert_source(&SourceSpec { time_column: Some("ts".into()), ..spec.clone() })
            .await
            .unwrap();
        assert_eq!(replaced.time_column.as_deref(), Some("ts"));
        assert_eq!(store.get_source(series.id).await.unwrap(), Some(replaced));
        let empty = SourceSpec { query: " ".into(), ..spec.clone() };
        assert!(matches!(store.upsert_source(&empty).await, Err(StoreError::Invalid { field: "query", .. })));
        assert!(matches!(
            store.upsert_source(&SourceSpec { series_id: 777, ..spec.clone() }).await,
            Err(StoreError::NotFound { .. })
        ));
        store.delete_source(series.id).await.unwrap();
        assert_eq!(store.get_source(series.id).await.unwrap(), None);
        assert!(matches!(store.delete_source(series.id).await, Err(StoreError::NotFound { .. })));
        // A source goes with its series.
        store.upsert_source(&spec).await.unwrap();
        store.delete_series("s").await.unwrap();
        assert_eq!(store.get_source(series.id).await.unwrap(), None);
    }
}
